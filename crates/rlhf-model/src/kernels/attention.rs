//! Scaled dot-product attention with an additive bias (0 or [`crate::ops::MASKED`]), fused and
//! row-at-a-time (flash-style): neither pass builds the [tq × tk] score matrix — one row of
//! scores lives in a per-task buffer, the forward keeps only the per-row log-sum-exp, and the
//! backward recomputes each row's probabilities from it.
//!
//! Masked keys (bias ≤ −1e8) are skipped; a row whose keys are all masked (a padding query)
//! attends uniformly to every key, exactly as the composed softmax over equal scores does, and
//! passes no gradient to q or k (its output does not depend on them; the composed op's analytic
//! gradient there is an artefact of `-1e9 + score` rounding to `-1e9` in f32).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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

/// Fill `s[..tk]` with the scaled, biased scores of query `q` against keys `kt` ([d × tk],
/// transposed), −∞ on masked keys; returns the visible range `lo..hi` (all keys, score 0, when
/// every key is masked).
#[inline(always)]
fn scores(q: &[f32], kt: &[f32], bias: &[f32], g: Dims, s: &mut [f32]) -> (usize, usize) {
    scores_with(q, KeyView::Transposed(kt), bias, g, s)
}

/// The keys as given ([tk × d], for a few queries: no transpose) or transposed ([d × tk]).
#[derive(Clone, Copy)]
enum KeyView<'a> {
    Rows(&'a [f32]),
    Transposed(&'a [f32]),
}

/// Queries per (batch, head) below which the keys are not transposed (decoding).
const FEW_QUERIES: usize = 4;

#[inline(always)]
fn scores_with(q: &[f32], keys: KeyView, bias: &[f32], g: Dims, s: &mut [f32]) -> (usize, usize) {
    let tk = g.tk;
    let lo = bias.iter().position(|&b| b > MASK_BELOW);
    let Some(lo) = lo else {
        s[..tk].iter_mut().for_each(|x| *x = 0.0);
        return (0, tk);
    };
    let hi = tk - bias.iter().rev().position(|&b| b > MASK_BELOW).unwrap();
    let s = &mut s[lo..hi];
    match keys {
        KeyView::Transposed(kt) => {
            s.iter_mut().for_each(|x| *x = 0.0);
            for (c, &qc) in q.iter().enumerate() {
                let kr = &kt[c * tk + lo..c * tk + hi];
                for (x, &kv) in s.iter_mut().zip(kr) {
                    *x += qc * kv;
                }
            }
        }
        KeyView::Rows(k) => {
            let d = g.d;
            for (j, x) in (lo..hi).zip(s.iter_mut()) {
                let kj = &k[j * d..(j + 1) * d];
                let mut acc = [0.0f32; 16];
                let (qc, kc) = (q.chunks_exact(16), kj.chunks_exact(16));
                let (qr, kr) = (qc.remainder(), kc.remainder());
                for (a, b) in qc.zip(kc) {
                    for l in 0..16 {
                        acc[l] += a[l] * b[l];
                    }
                }
                let mut t = super::matmul::hsum16(&acc);
                for (a, b) in qr.iter().zip(kr) {
                    t += a * b;
                }
                *x = t;
            }
        }
    }
    for (x, &b) in s.iter_mut().zip(&bias[lo..hi]) {
        *x = if b > MASK_BELOW {
            *x * g.scale + b
        } else {
            f32::NEG_INFINITY
        };
    }
    (lo, hi)
}

fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for r in 0..rows {
        for c in 0..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
}

crate::multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn fwd_pair(
        q: &[f32], k: &[f32], v: &[f32], bias: &[f32], g: Dims,
        o: &mut [f32], lse: &mut [f32], kt: &mut [f32], s: &mut [f32],
    ) {
        let (tk, d) = (g.tk, g.d);
        let keys = if g.tq <= FEW_QUERIES {
            KeyView::Rows(k)
        } else {
            transpose(k, tk, d, kt);
            KeyView::Transposed(kt)
        };
        for i in 0..g.tq {
            let (lo, hi) =
                scores_with(&q[i * d..(i + 1) * d], keys, &bias[i * tk..(i + 1) * tk], g, s);
            let m = math::max(&s[lo..hi]);
            let sum = {
                let row = &mut s[lo..hi];
                let mut acc = 0.0f32;
                for x in row.iter_mut() {
                    let e = math::exp(*x - m);
                    *x = e;
                    acc += e;
                }
                acc
            };
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

crate::multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn bwd_pair(
        q: &[f32], k: &[f32], v: &[f32], o: &[f32], go: &[f32], lse: &[f32], bias: &[f32],
        g: Dims, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32], kt: &mut [f32], vt: &mut [f32],
        s: &mut [f32], dp: &mut [f32],
    ) {
        let (tk, d) = (g.tk, g.d);
        transpose(k, tk, d, kt);
        transpose(v, tk, d, vt);
        dk.iter_mut().for_each(|x| *x = 0.0);
        dv.iter_mut().for_each(|x| *x = 0.0);
        for i in 0..g.tq {
            let qi = &q[i * d..(i + 1) * d];
            let goi = &go[i * d..(i + 1) * d];
            let (lo, hi) = scores(qi, kt, &bias[i * tk..(i + 1) * tk], g, s);
            let l = lse[i];
            for x in s[lo..hi].iter_mut() {
                *x = math::exp(*x - l);
            }
            let dpr = &mut dp[lo..hi];
            dpr.iter_mut().for_each(|x| *x = 0.0);
            for (c, &gc) in goi.iter().enumerate() {
                for (x, &vv) in dpr.iter_mut().zip(&vt[c * tk + lo..c * tk + hi]) {
                    *x += gc * vv;
                }
            }
            // A query that sees no key attends uniformly whatever q and k are: only v gets a
            // gradient (the composed op's f32 forward is constant there too).
            let all_masked = bias[i * tk..(i + 1) * tk].iter().all(|&b| b <= MASK_BELOW);
            let mut dd = 0.0f32;
            for (a, b) in goi.iter().zip(&o[i * d..(i + 1) * d]) {
                dd += a * b;
            }
            let dqi = &mut dq[i * d..(i + 1) * d];
            dqi.iter_mut().for_each(|x| *x = 0.0);
            for j in lo..hi {
                let p = s[j];
                if p == 0.0 {
                    continue;
                }
                for (x, &gv) in dv[j * d..(j + 1) * d].iter_mut().zip(goi) {
                    *x += p * gv;
                }
                if all_masked {
                    continue;
                }
                let ds = p * (dp[j] - dd) * g.scale;
                let kj = &k[j * d..(j + 1) * d];
                for (x, &kv) in dqi.iter_mut().zip(kj) {
                    *x += ds * kv;
                }
                for (x, &qv) in dk[j * d..(j + 1) * d].iter_mut().zip(qi) {
                    *x += ds * qv;
                }
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
    let dims = l.dims();
    let st = l.stride();
    if dims.len() != 4 || (st[3] != 1 && dims[3] > 1) || (st[2] != dims[3] && dims[2] > 1) {
        return None;
    }
    Some((&data[l.start_offset()..], st[0], st[1]))
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
                    || (vec![0.0f32; tk * d], vec![0.0f32; tk]),
                    |(kt, s), (p, (o, lse))| {
                        let (bi, hi) = (p / h, (p % h) / rep);
                        let bsel = if bb == 1 { 0 } else { bi };
                        let (ko, vo) = (bi * ks0 + hi * ks1, bi * vs0 + hi * vs1);
                        fwd_pair(
                            &q[p * tq * d..(p + 1) * tq * d],
                            &k[ko..ko + tk * d],
                            &v[vo..vo + tk * d],
                            &bias[bsel * tq * tk..(bsel + 1) * tq * tk],
                            g,
                            o,
                            lse,
                            kt,
                            s,
                        )
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
                    || {
                        (
                            vec![0.0f32; tk * d],
                            vec![0.0f32; tk * d],
                            vec![0.0f32; tk],
                            vec![0.0f32; tk],
                        )
                    },
                    |(kt, vt, s, dp), (p, (dq, (dk, dv)))| {
                        let bi = if bb == 1 { 0 } else { p / h };
                        let qs = p * tq * d..(p + 1) * tq * d;
                        let kp = (p / h) * hk + (p % h) / rep;
                        let ks = kp * tk * d..(kp + 1) * tk * d;
                        bwd_pair(
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
                            kt,
                            vt,
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
    let rows_ok = |t: &Tensor| {
        let (st, dims) = (t.stride(), t.dims());
        dims.len() == 4 && (st[3] == 1 || dims[3] == 1) && (st[2] == dims[3] || dims[2] == 1)
    };
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
