//! Scaled dot-product attention with an additive bias (0 or [`crate::ops::MASKED`]), fused and
//! flash-style: neither pass builds the [tq × tk] score matrix. Training-sized calls work on
//! blocks of 32 queries — S = Q·Kᵀ over the keys the block can see, probabilities in place,
//! O = P·V, all products on the GEMM micro-kernels — and keep only each row's log-sum-exp; the
//! backward recomputes a block's probabilities from it (dQ, dK, dV as in FlashAttention).
//! Decoding (≤ 4 queries) goes row by row over the keys in place. Grouped-query attention
//! reads each kv head for its group of query heads; k/v may be a KV cache's strided view.
//!
//! Masked keys (bias ≤ −1e8) get probability 0; a row whose keys are all masked (a padding
//! query) attends uniformly to every key, exactly as the composed softmax over equal scores
//! does, and passes no gradient to q or k (its output does not depend on them; the composed
//! op's analytic gradient there is an artefact of `-1e9 + score` rounding to `-1e9` in f32).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{sgemm_serial, Mat};
use super::matmul::dot;
use super::{math, out, slice, uninit, with_f32};

const MASK_BELOW: f32 = -1e8;

/// Geometry of one call.
#[derive(Clone, Copy)]
struct Dims {
    tq: usize,
    tk: usize,
    d: usize,
    scale: f32,
}

/// Queries per (batch, head) up to which the forward goes row by row over the keys in place
/// (decoding); more take the blocked path, whose products run on the GEMM micro-kernels.
const FEW_QUERIES: usize = 4;

/// Query rows per block in the blocked path: a block's scores [QB × keys] are the only
/// score-shaped buffer (never the whole [tq × tk]).
const QB: usize = 32;

/// Fill `s[lo..hi]` with the scaled, biased scores of query `q` against the key rows `k`
/// ([tk × d]), −∞ on masked keys; returns the visible range `lo..hi` (all keys, score 0, when
/// every key is masked).
#[inline(always)]
fn scores_rows(q: &[f32], k: &[f32], bias: &[f32], g: Dims, s: &mut [f32]) -> (usize, usize) {
    let (tk, d) = (g.tk, g.d);
    let Some((lo, hi)) = visible(bias) else {
        s[..tk].iter_mut().for_each(|x| *x = 0.0);
        return (0, tk);
    };
    for j in lo..hi {
        s[j] = if bias[j] > MASK_BELOW {
            dot(q, &k[j * d..(j + 1) * d]) * g.scale + bias[j]
        } else {
            f32::NEG_INFINITY
        };
    }
    (lo, hi)
}

crate::multiversion! {
    /// Forward for a few queries (decoding): one row of scores at a time, keys read in place.
    fn fwd_rows(
        q: &[f32], k: &[f32], v: &[f32], bias: &[f32], g: Dims,
        o: &mut [f32], lse: &mut [f32], s: &mut [f32],
    ) {
        let (tk, d) = (g.tk, g.d);
        for i in 0..g.tq {
            let (lo, hi) = scores_rows(&q[i * d..(i + 1) * d], k, &bias[i * tk..(i + 1) * tk], g, s);
            let m = math::max(&s[lo..hi]);
            let mut sum = 0.0f32;
            for x in s[lo..hi].iter_mut() {
                let e = if *x == f32::NEG_INFINITY { 0.0 } else { math::exp(*x - m) };
                *x = e;
                sum += e;
            }
            lse[i] = m + sum.ln();
            let inv = 1.0 / sum;
            let oi = &mut o[i * d..(i + 1) * d];
            oi.iter_mut().for_each(|x| *x = 0.0);
            for j in lo..hi {
                let p = s[j] * inv;
                if p != 0.0 {
                    for (x, &vv) in oi.iter_mut().zip(&v[j * d..(j + 1) * d]) {
                        *x += p * vv;
                    }
                }
            }
        }
    }
}

/// The keys visible to any query of rows `i0..i1`, and whether one of those rows sees no key
/// at all (it then attends uniformly to every key, so the block takes all keys).
fn block_keys(bias: &[f32], tk: usize, i0: usize, i1: usize) -> (usize, usize) {
    let (mut lo, mut hi) = (tk, 0);
    for i in i0..i1 {
        match visible(&bias[i * tk..(i + 1) * tk]) {
            None => return (0, tk),
            Some((l, h)) => (lo, hi) = (lo.min(l), hi.max(h)),
        }
    }
    (lo, hi)
}

/// The keys one query row can see (first visible ..= last visible), or `None` when it sees none.
fn visible(bias_row: &[f32]) -> Option<(usize, usize)> {
    let lo = bias_row.iter().position(|&b| b > MASK_BELOW)?;
    let hi = bias_row.len() - bias_row.iter().rev().position(|&b| b > MASK_BELOW)?;
    Some((lo, hi))
}

/// The per-row log-sum-exp: computed (and stored) by the forward, given to the backward.
enum Lse<'a> {
    Compute(&'a mut [f32]),
    Given(&'a [f32]),
}

crate::multiversion! {
    /// Turn a block's raw scores `s` [rows × (hi − lo)] into probabilities, from the given
    /// log-sum-exp (backward) or computing and storing it (forward). A row that sees no key
    /// gets 1/tk everywhere; masked keys get exactly 0.
    fn probs(s: &mut [f32], bias: &[f32], g: Dims, i0: usize, lo: usize, hi: usize, lse: Lse<'_>) {
        let mut lse = lse;
        let (tk, w) = (g.tk, hi - lo);
        for (ii, row) in s.chunks_mut(w).enumerate() {
            let i = i0 + ii;
            let brow = &bias[i * tk + lo..i * tk + hi];
            if brow.iter().all(|&b| b <= MASK_BELOW) {
                // (lo, hi) = (0, tk) here, see `block_keys`.
                row.iter_mut().for_each(|x| *x = 1.0 / tk as f32);
                if let Lse::Compute(v) = &mut lse {
                    v[i] = (tk as f32).ln();
                }
                continue;
            }
            for (x, &b) in row.iter_mut().zip(brow) {
                *x = if b > MASK_BELOW { *x * g.scale + b } else { f32::NEG_INFINITY };
            }
            let l = match &mut lse {
                Lse::Given(v) => v[i],
                Lse::Compute(v) => {
                    let m = math::max(row);
                    let mut sum = 0.0f32;
                    for &x in row.iter() {
                        if x != f32::NEG_INFINITY {
                            sum += math::exp(x - m);
                        }
                    }
                    v[i] = m + sum.ln();
                    v[i]
                }
            };
            for x in row.iter_mut() {
                *x = if *x == f32::NEG_INFINITY { 0.0 } else { math::exp(*x - l) };
            }
        }
    }
}

/// Row-major view helpers for the GEMMs below.
fn rows(data: &[f32], rs: usize) -> Mat<'_> {
    Mat { data, rs, cs: 1 }
}
fn cols(data: &[f32], cs: usize) -> Mat<'_> {
    Mat { data, rs: 1, cs }
}

/// Blocked forward of one (batch, head) pair: per block of `QB` queries, S = Q·Kᵀ over the
/// block's visible keys, probabilities in place, O = P·V.
fn fwd_blocked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: &[f32],
    g: Dims,
    o: &mut [f32],
    lse: &mut [f32],
    s: &mut [f32],
) {
    let (tq, d) = (g.tq, g.d);
    for i0 in (0..tq).step_by(QB) {
        let i1 = (i0 + QB).min(tq);
        let r = i1 - i0;
        let (lo, hi) = block_keys(bias, g.tk, i0, i1);
        let w = hi - lo;
        let sb = &mut s[..r * w];
        sgemm_serial(
            r,
            w,
            d,
            rows(&q[i0 * d..], d),
            cols(&k[lo * d..], d),
            sb,
            false,
        );
        probs(sb, bias, g, i0, lo, hi, Lse::Compute(&mut *lse));
        sgemm_serial(
            r,
            d,
            w,
            rows(sb, w),
            rows(&v[lo * d..], d),
            &mut o[i0 * d..i1 * d],
            false,
        );
    }
}

/// Blocked backward of one (batch, head) pair (flash-attention's): per block of queries,
/// recompute P from the saved log-sum-exp, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O))·scale,
/// dQ = dS·K, dK += dSᵀ·Q, dV += Pᵀ·dO. A query that sees no key attends uniformly whatever
/// q and k are: only v gets a gradient from it.
#[allow(clippy::too_many_arguments)]
fn bwd_blocked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    go: &[f32],
    lse: &[f32],
    bias: &[f32],
    g: Dims,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    s: &mut [f32],
    dp: &mut [f32],
) {
    let (tq, tk, d) = (g.tq, g.tk, g.d);
    dk.iter_mut().for_each(|x| *x = 0.0);
    dv.iter_mut().for_each(|x| *x = 0.0);
    for i0 in (0..tq).step_by(QB) {
        let i1 = (i0 + QB).min(tq);
        let r = i1 - i0;
        let (lo, hi) = block_keys(bias, tk, i0, i1);
        let w = hi - lo;
        let (sb, db) = (&mut s[..r * w], &mut dp[..r * w]);
        sgemm_serial(
            r,
            w,
            d,
            rows(&q[i0 * d..], d),
            cols(&k[lo * d..], d),
            sb,
            false,
        );
        probs(sb, bias, g, i0, lo, hi, Lse::Given(lse));
        sgemm_serial(
            r,
            w,
            d,
            rows(&go[i0 * d..], d),
            cols(&v[lo * d..], d),
            db,
            false,
        );
        ds_rows(
            sb,
            db,
            &o[i0 * d..i1 * d],
            &go[i0 * d..i1 * d],
            bias,
            g,
            i0,
            lo,
            hi,
        );
        sgemm_serial(
            r,
            d,
            w,
            rows(db, w),
            rows(&k[lo * d..], d),
            &mut dq[i0 * d..i1 * d],
            false,
        );
        sgemm_serial(
            w,
            d,
            r,
            cols(db, w),
            rows(&q[i0 * d..], d),
            &mut dk[lo * d..hi * d],
            true,
        );
        sgemm_serial(
            w,
            d,
            r,
            cols(sb, w),
            rows(&go[i0 * d..], d),
            &mut dv[lo * d..hi * d],
            true,
        );
    }
}

crate::multiversion! {
    /// dS = P ⊙ (dP − rowsum(dO ⊙ O)) · scale, in place of dP (0 for rows that see no key).
    fn ds_rows(
        p: &[f32], dp: &mut [f32], o: &[f32], go: &[f32], bias: &[f32], g: Dims,
        i0: usize, lo: usize, hi: usize,
    ) {
        let (tk, d, w) = (g.tk, g.d, hi - lo);
        for (ii, (pr, dr)) in p.chunks(w).zip(dp.chunks_mut(w)).enumerate() {
            let i = i0 + ii;
            if bias[i * tk..(i + 1) * tk].iter().all(|&b| b <= MASK_BELOW) {
                dr.iter_mut().for_each(|x| *x = 0.0);
                continue;
            }
            let mut dd = 0.0f32;
            for (a, b) in go[ii * d..(ii + 1) * d].iter().zip(&o[ii * d..(ii + 1) * d]) {
                dd += a * b;
            }
            for (x, &pv) in dr.iter_mut().zip(pr) {
                *x = pv * (*x - dd) * g.scale;
            }
        }
    }
}

struct Attention {
    bias: Tensor,
    /// Per-row log-sum-exp of the forward, for the backward.
    lse: Mutex<Vec<f32>>,
}

/// (batch, query heads, key/value heads, geometry). Grouped-query attention: `h` query heads
/// share `hk` key/value heads, query head `i` reading kv head `i / (h / hk)`.
fn dims(q: &Layout, k: &Layout, v: &Layout, bias: &Tensor) -> Result<(usize, usize, usize, Dims)> {
    let (b, h, tq, d) = q.shape().dims4()?;
    let (bk, hk, tk, dk) = k.shape().dims4()?;
    if (bk, dk) != (b, d) || hk == 0 || h % hk != 0 || v.dims() != k.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let (bb, one, btq, btk) = bias.dims4()?;
    if (one, btq, btk) != (1, tq, tk) || (bb != b && bb != 1) {
        candle_core::bail!(
            "attention: bias {:?} for q {:?}, k {:?}",
            bias.dims(),
            q.dims(),
            k.dims()
        )
    }
    let g = Dims {
        tq,
        tk,
        d,
        scale: 1.0 / (d as f32).sqrt(),
    };
    Ok((b, h, hk, g))
}

/// The data of a [b, h, t, d] input whose rows of `d` are contiguous and whose `t` rows of one
/// (batch, head) pair are adjacent, with the pair strides: a KV cache's narrowed view qualifies
/// without a copy. `None` for other layouts.
fn pair_view<'a>(s: &'a CpuStorage, l: &Layout) -> Option<(&'a [f32], usize, usize)> {
    let CpuStorage::F32(data) = s else {
        return None;
    };
    let st = l.stride();
    pair_rows(l.dims(), st).then(|| (&data[l.start_offset()..], st[0], st[1]))
}

/// Whether a [b, h, t, d] layout has contiguous rows of `d`, adjacent within each pair.
fn pair_rows(dims: &[usize], st: &[usize]) -> bool {
    dims.len() == 4 && (st[3] == 1 || dims[3] == 1) && (st[2] == dims[3] || dims[2] == 1)
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, hk, g) = dims(l1, l2, l3, &self.bias)?;
        let q = slice(s1, l1, "attention")?;
        let (Some((k, ks0, ks1)), Some((v, vs0, vs1))) = (pair_view(s2, l2), pair_view(s3, l3))
        else {
            candle_core::bail!("attention: k/v rows must be contiguous")
        };
        let bb = self.bias.dim(0)?;
        let (tq, tk, d) = (g.tq, g.tk, g.d);
        let rep = h / hk;
        let mut o = uninit(b * h * tq * d);
        let mut lse = vec![0.0f32; b * h * tq];
        with_f32(&[&self.bias], |bs| {
            let bias = bs[0];
            o.par_chunks_mut(tq * d)
                .zip(lse.par_chunks_mut(tq))
                .enumerate()
                .for_each_init(
                    || vec![0.0f32; QB.min(tq) * tk],
                    |s, (p, (o, lse))| {
                        let (bi, hi) = (p / h, (p % h) / rep);
                        let bsel = if bb == 1 { 0 } else { bi };
                        let (ko, vo) = (bi * ks0 + hi * ks1, bi * vs0 + hi * vs1);
                        let qp = &q[p * tq * d..(p + 1) * tq * d];
                        let (kp, vp) = (&k[ko..ko + tk * d], &v[vo..vo + tk * d]);
                        let bp = &bias[bsel * tq * tk..(bsel + 1) * tq * tk];
                        if tq <= FEW_QUERIES {
                            fwd_rows(qp, kp, vp, bp, g, o, lse, s)
                        } else {
                            fwd_blocked(qp, kp, vp, bp, g, o, lse, s)
                        }
                    },
                );
        })?;
        *self.lse.lock().unwrap() = lse;
        out(o, l1.shape())
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, hk, g) = dims(q.layout(), k.layout(), v.layout(), &self.bias)?;
        let (tq, tk, d) = (g.tq, g.tk, g.d);
        let rep = h / hk;
        let bb = self.bias.dim(0)?;
        let lse = self.lse.lock().unwrap();
        let mut dq = uninit(b * h * tq * d);
        // Per query head; summed over each group of `rep` heads below.
        let mut dk = uninit(b * h * tk * d);
        let mut dv = uninit(b * h * tk * d);
        with_f32(&[q, k, v, res, grad, &self.bias], |t| {
            let (q, k, v, o, go, bias) = (t[0], t[1], t[2], t[3], t[4], t[5]);
            dq.par_chunks_mut(tq * d)
                .zip(dk.par_chunks_mut(tk * d).zip(dv.par_chunks_mut(tk * d)))
                .enumerate()
                .for_each_init(
                    || (vec![0.0f32; QB.min(tq) * tk], vec![0.0f32; QB.min(tq) * tk]),
                    |(s, dp), (p, (dq, (dk, dv)))| {
                        let bi = if bb == 1 { 0 } else { p / h };
                        let qs = p * tq * d..(p + 1) * tq * d;
                        let kp = (p / h) * hk + (p % h) / rep;
                        let ks = kp * tk * d..(kp + 1) * tk * d;
                        bwd_blocked(
                            &q[qs.clone()],
                            &k[ks.clone()],
                            &v[ks],
                            &o[qs.clone()],
                            &go[qs],
                            &lse[p * tq..(p + 1) * tq],
                            &bias[bi * tq * tk..(bi + 1) * tq * tk],
                            g,
                            dq,
                            dk,
                            dv,
                            s,
                            dp,
                        )
                    },
                );
        })?;
        let (dk, dv) = if rep == 1 {
            (dk, dv)
        } else {
            (group_sum(&dk, rep, tk * d), group_sum(&dv, rep, tk * d))
        };
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Sum consecutive groups of `rep` blocks of `n` floats: [p·rep, n] → [p, n].
fn group_sum(x: &[f32], rep: usize, n: usize) -> Vec<f32> {
    let mut o = uninit(x.len() / rep);
    o.par_chunks_mut(n)
        .zip(x.par_chunks(n * rep))
        .for_each(|(o, g)| {
            o.copy_from_slice(&g[..n]);
            for blk in g[n..].chunks(n) {
                for (a, &b) in o.iter_mut().zip(blk) {
                    *a += b;
                }
            }
        });
    o
}

/// Fused attention: q [b,h,tq,d], k/v [b,hk,tk,d] with `hk` dividing `h` (grouped-query
/// attention without repeating k/v), bias [b or 1, 1, tq, tk]. k and v may be views whose
/// (batch, head) blocks are strided, as a preallocated KV cache's are: they are not copied.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let op = Attention {
        bias: bias.contiguous()?.detach(),
        lse: Mutex::new(vec![]),
    };
    let rows_ok = |t: &Tensor| pair_rows(t.dims(), t.stride());
    let k = if rows_ok(k) {
        k.clone()
    } else {
        k.contiguous()?
    };
    let v = if rows_ok(v) {
        v.clone()
    } else {
        v.contiguous()?
    };
    q.contiguous()?.apply_op3(&k, &v, op)
}
