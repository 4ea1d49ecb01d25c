//! Scaled dot-product attention with an additive bias (0 or [`crate::ops::MASKED`]), fused and
//! flash-style: neither pass builds the [tq × tk] score matrix. Training-sized calls work on
//! blocks of 32 queries — S = Q·Kᵀ over the keys the block can see, probabilities in place,
//! O = P·V, all products on the GEMM micro-kernels — and keep only each row's log-sum-exp; the
//! backward recomputes a block's probabilities from it (dQ, dK, dV as in FlashAttention).
//! Decoding (≤ 4 queries) goes row by row over the keys in place. Grouped-query attention
//! reads each kv head for its group of query heads; k/v may be a KV cache's strided view.
//!
//! Every operand is read where it lies: a head's rows may be strided ([`Rows`]), so q/k/v can
//! come straight from a projection's `[b, t, h·d]` output (or GPT-2's packed `[b, t, 3·d]`
//! c_attn output) and the output can be written as `[b, t, h·d]` for the next projection. The
//! models then need no reshape, transpose, narrow or copy around attention — each of those is a
//! graph node whose gradient candle's backward zero-fills and adds (the narrow's also pads).
//!
//! Masked keys (bias ≤ −1e8) get probability 0; a row whose keys are all masked (a padding
//! query) attends uniformly to every key, exactly as the composed softmax over equal scores
//! does, and passes no gradient to q or k (its output does not depend on them; the composed
//! op's analytic gradient there is an artefact of `-1e9 + score` rounding to `-1e9` in f32).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{sgemm_serial, transpose, Mat};
use super::matmul::dot;
#[cfg(target_arch = "x86_64")]
use super::matmul::tail_mask;
use super::{math, out, uninit, with_f32, SharedOut};

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

/// How a tensor holds its heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heads {
    /// `[b, h, t, d]`, any strides whose rows of `d` are contiguous (a transposed projection, a
    /// KV cache's narrowed buffer).
    Split,
    /// `[b, t, h·d]` with this many heads side by side: a projection's own output.
    Merged(usize),
}

/// Where a tensor's rows lie: row `t` of head `h` in batch `b` starts at
/// `off + b·s0 + h·s1 + t·s2`, and its `d` floats are contiguous.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rows {
    pub(crate) off: usize,
    pub(crate) s0: usize,
    pub(crate) s1: usize,
    pub(crate) s2: usize,
}

impl Rows {
    fn at(&self, b: usize, h: usize, t: usize) -> usize {
        self.off + b * self.s0 + h * self.s1 + t * self.s2
    }
}

/// `[b, h, t, d]` and the rows of a tensor of shape `dims`, strides `st`, offset `off`, read
/// as `form`; `None` if its rows of `d` are not contiguous. (RoPE reads its input the same way.)
pub(crate) fn rows_of(
    dims: &[usize],
    st: &[usize],
    off: usize,
    form: Heads,
) -> Result<Option<([usize; 4], Rows)>> {
    Ok(match form {
        Heads::Split => {
            let [b, h, t, d] = dims else {
                candle_core::bail!("attention: expected [b, h, t, d], got {dims:?}")
            };
            let ok = st[3] == 1 || *d == 1;
            ok.then_some((
                [*b, *h, *t, *d],
                Rows {
                    off,
                    s0: st[0],
                    s1: st[1],
                    s2: st[2],
                },
            ))
        }
        Heads::Merged(h) => {
            let [b, t, w] = dims else {
                candle_core::bail!("attention: expected [b, t, h·d], got {dims:?}")
            };
            if h == 0 || w % h != 0 {
                candle_core::bail!("attention: {w} columns are not {h} heads")
            }
            let d = w / h;
            let ok = st[2] == 1 || *w == 1;
            ok.then_some((
                [*b, h, *t, d],
                Rows {
                    off,
                    s0: st[0],
                    s1: d,
                    s2: st[1],
                },
            ))
        }
    })
}

/// [`rows_of`] for a contiguous tensor of shape `dims`.
pub(crate) fn rows_contiguous(dims: &[usize], form: Heads) -> Result<([usize; 4], Rows)> {
    let st = Layout::contiguous(dims).stride().to_vec();
    Ok(rows_of(dims, &st, 0, form)?.expect("contiguous rows"))
}

/// An operand: all of its storage and where its rows lie in it.
#[derive(Clone, Copy)]
struct Src<'a> {
    data: &'a [f32],
    rows: Rows,
}

impl<'a> Src<'a> {
    /// The data from row `t` of pair (b, h) on; its rows are `self.rows.s2` apart.
    fn from(&self, b: usize, h: usize, t: usize) -> &'a [f32] {
        &self.data[self.rows.at(b, h, t)..]
    }
}

/// A destination written by several tasks at once, each to rows no other task writes.
#[derive(Clone, Copy)]
struct Dst {
    out: SharedOut,
    rows: Rows,
}

impl Dst {
    fn new(buf: &mut [f32], rows: Rows) -> Self {
        Self {
            out: SharedOut::new(buf),
            rows,
        }
    }
    /// Copy `src` ([n × d], contiguous) to rows `t0..t0+n` of pair (b, h).
    ///
    /// # Safety
    /// No other task may write or read these rows concurrently.
    unsafe fn put(&self, b: usize, h: usize, t0: usize, d: usize, src: &[f32]) {
        for (i, r) in src.chunks_exact(d).enumerate() {
            // SAFETY: the caller's contract.
            unsafe { self.out.write(self.rows.at(b, h, t0 + i), r) };
        }
    }
}

/// Fill `s[lo..hi]` with the scaled, biased scores of query `q` against the key rows `k`
/// (`ks` apart), −∞ on masked keys; returns the visible range `lo..hi` (all keys, score 0, when
/// every key is masked).
#[inline(always)]
fn scores_rows(
    q: &[f32],
    k: &[f32],
    ks: usize,
    bias: &[f32],
    g: Dims,
    s: &mut [f32],
) -> (usize, usize) {
    let tk = g.tk;
    let Some((lo, hi)) = visible(bias) else {
        s[..tk].iter_mut().for_each(|x| *x = 0.0);
        return (0, tk);
    };
    key_dots(q, k, ks, lo, hi, s);
    for j in lo..hi {
        s[j] = if bias[j] > MASK_BELOW {
            s[j] * g.scale + bias[j]
        } else {
            f32::NEG_INFINITY
        };
    }
    (lo, hi)
}

/// `s[j] = q · k_j` for keys `lo..hi` (rows `ks` apart).
#[inline(always)]
fn key_dots(q: &[f32], k: &[f32], ks: usize, lo: usize, hi: usize, s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512() {
        // SAFETY: the CPU has AVX-512F; `dots_avx512` checks the rows' bounds.
        return unsafe { dots_avx512(q, k, ks, lo, hi, s) };
    }
    let d = q.len();
    for j in lo..hi {
        s[j] = dot(q, &k[j * ks..j * ks + d]);
    }
}

/// [`key_dots`] with AVX-512: explicit FMAs, sixteen keys at a time while they last (their
/// horizontal sums sharing shuffles, [`reduce16`]), then four at a time with one horizontal sum
/// per key. Both sum each key's lanes in one order: the same bits whichever group a key is in.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512(q: &[f32], k: &[f32], ks: usize, lo: usize, hi: usize, s: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = q.len();
    assert!(hi == lo || (hi - 1) * ks + d <= k.len());
    let mut j = lo;
    while hi - j >= 16 {
        // SAFETY: rows j..j + 16 lie in `k` (asserted above).
        let acc = unsafe { lane_dots::<16>(q, k, ks, j, 16) };
        // SAFETY: s[j..j + 16] lies in `s` (j + 16 ≤ hi ≤ s.len()).
        unsafe { _mm512_storeu_ps(s[j..j + 16].as_mut_ptr(), reduce16(&acc)) };
        j += 16;
    }
    while j < hi {
        let n = (hi - j).min(4);
        // SAFETY: rows j..j + n lie in `k` (asserted above).
        let acc = unsafe { lane_dots::<4>(q, k, ks, j, n) };
        for (i, a) in acc.iter().enumerate().take(n) {
            s[j + i] = _mm512_reduce_add_ps(*a);
        }
        j += n;
    }
}

/// The lane-wise products `q · k_{j+i}` summed over `q`'s 16-wide chunks, for the `n` (≤ N)
/// key rows from `j` (`ks` apart); accumulators past `n` stay zero.
///
/// # Safety
/// The CPU has AVX-512F; rows `j..j + n` of `k` (each `q.len()` long) lie in `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn lane_dots<const N: usize>(
    q: &[f32],
    k: &[f32],
    ks: usize,
    j: usize,
    n: usize,
) -> [std::arch::x86_64::__m512; N] {
    use std::arch::x86_64::*;
    let d = q.len();
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let mut acc = [_mm512_setzero_ps(); N];
    let mut c = 0;
    while c < d {
        let mask = tail_mask(c, d);
        // SAFETY: masked loads touch lanes c..min(c + 16, d) of q and of rows j..j + n (per the
        // contract).
        unsafe {
            let qv = _mm512_maskz_loadu_ps(mask, qp.add(c));
            for (i, a) in acc.iter_mut().enumerate().take(n) {
                let kv = _mm512_maskz_loadu_ps(mask, kp.add((j + i) * ks + c));
                *a = _mm512_fmadd_ps(qv, kv, *a);
            }
        }
        c += 16;
    }
    acc
}

/// The 16 lane sums of `a`, sum `i` in lane `i`, each added in `_mm512_reduce_add_ps`'s order
/// (lanes `l` and `l + 8`, then `+ 4`, `+ 2`, `+ 1`), so the same bits, but with the shuffles
/// shared: 45 shuffles and adds and a permute for 16 sums, where 16 reductions take about 128.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn reduce16(a: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Lanes l and l + 8 of keys 2m and 2m + 1: [key 2m's 8 partial sums, key 2m + 1's].
    let v: [__m512; 8] = std::array::from_fn(|m| {
        let (x, y) = (a[2 * m], a[2 * m + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(x, y),
            _mm512_shuffle_f32x4::<0xEE>(x, y),
        )
    });
    // Then l and l + 4: keys 4p.. 4p + 3, four partial sums each, one per 128-bit lane.
    let u: [__m512; 4] = std::array::from_fn(|p| {
        let (x, y) = (v[2 * p], v[2 * p + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(x, y),
            _mm512_shuffle_f32x4::<0xDD>(x, y),
        )
    });
    // Then l and l + 2: 128-bit lane ℓ of x[0] holds keys ℓ and 4 + ℓ, of x[1] keys 8 + ℓ and
    // 12 + ℓ, two partial sums each.
    let x: [__m512; 2] = std::array::from_fn(|h| {
        let (p, q) = (u[2 * h], u[2 * h + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(p, q),
            _mm512_shuffle_ps::<0xEE>(p, q),
        )
    });
    // Then l and l + 1: element 4ℓ + t holds key 4t + ℓ.
    let y = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(x[0], x[1]),
        _mm512_shuffle_ps::<0xDD>(x[0], x[1]),
    );
    // Key `key` from element 4 · (key % 4) + key / 4.
    const IDX: [i32; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];
    // SAFETY: an unaligned load of a constant array.
    _mm512_permutexvar_ps(unsafe { _mm512_loadu_si512(IDX.as_ptr().cast()) }, y)
}

crate::multiversion! {
    /// Forward for a few queries (decoding): one row of scores at a time, keys read in place.
    /// `o` is [tq × d], contiguous.
    fn fwd_rows(
        q: &[f32], qs: usize, k: &[f32], ks: usize, v: &[f32], vs: usize, bias: &[f32], g: Dims,
        o: &mut [f32], lse: &mut [f32], s: &mut [f32],
    ) {
        let (tk, d) = (g.tk, g.d);
        for i in 0..g.tq {
            let brow = &bias[i * tk..(i + 1) * tk];
            let (lo, hi) = scores_rows(&q[i * qs..i * qs + d], k, ks, brow, g, s);
            let m = math::max(&s[lo..hi]);
            let sum = math::exp_sub_in_place(&mut s[lo..hi], m);
            lse[i] = m + sum.ln();
            let inv = 1.0 / sum;
            let oi = &mut o[i * d..(i + 1) * d];
            oi.iter_mut().for_each(|x| *x = 0.0);
            for j in lo..hi {
                let p = s[j] * inv;
                if p != 0.0 {
                    for (x, &vv) in oi.iter_mut().zip(&v[j * vs..j * vs + d]) {
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

/// [`block_keys`] of every block of `QB` queries, for each of the `bb` masks in `bias`: a
/// mask is shared by every head (and both passes), so its blocks' key ranges are found once.
fn all_block_keys(bias: &[f32], bb: usize, g: Dims) -> Vec<Vec<(usize, usize)>> {
    let (tq, tk) = (g.tq, g.tk);
    (0..bb)
        .map(|bi| {
            let bp = &bias[bi * tq * tk..(bi + 1) * tq * tk];
            (0..tq)
                .step_by(QB)
                .map(|i0| block_keys(bp, tk, i0, (i0 + QB).min(tq)))
                .collect()
        })
        .collect()
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
            match &mut lse {
                Lse::Given(v) => {
                    let l = v[i];
                    for x in row.iter_mut() {
                        *x = if *x == f32::NEG_INFINITY { 0.0 } else { math::exp(*x - l) };
                    }
                }
                Lse::Compute(v) => {
                    // One exponential per score: e^(s − max) in place (−∞ gives 0), then
                    // divided by its sum.
                    let m = math::max(row);
                    let sum = math::exp_sub_in_place(row, m);
                    v[i] = m + sum.ln();
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|x| *x *= inv);
                }
            }
        }
    }
}

/// `m` [d × tk] = the transpose of the `tk` rows of `d` floats at `x` (`xs` apart), returned
/// as a slice of `m`. The blocked kernels multiply by Kᵀ (and the backward by Vᵀ) in every
/// block: the GEMM reads a row-major Kᵀ in place, where a column-major view of K was copied
/// element by element into the GEMM's panels in each block (2.9% of gpt2-d512's training
/// step, more than attention's own products; session 14's `perf`).
fn transposed<'a>(x: &[f32], xs: usize, tk: usize, d: usize, m: &'a mut [f32]) -> &'a [f32] {
    let m = &mut m[..d * tk];
    transpose(x, xs, tk, d, m, false);
    m
}

/// Row-major view helpers for the GEMMs below.
fn rows(data: &[f32], rs: usize) -> Mat<'_> {
    Mat { data, rs, cs: 1 }
}
fn cols(data: &[f32], cs: usize) -> Mat<'_> {
    Mat { data, rs: 1, cs }
}

/// Blocked forward of one (batch, head) pair: per block of `QB` queries, S = Q·Kᵀ over the
/// block's visible keys, probabilities in place, O = P·V. q/k/v rows are `qs`/`ks`/`vs` apart;
/// `o` is [tq × d], contiguous. `kt` [d × tk] is scratch for Kᵀ (see [`transposed`]).
#[allow(clippy::too_many_arguments)]
fn fwd_blocked(
    q: &[f32],
    qs: usize,
    k: &[f32],
    ks: usize,
    v: &[f32],
    vs: usize,
    bias: &[f32],
    g: Dims,
    o: &mut [f32],
    lse: &mut [f32],
    s: &mut [f32],
    kt: &mut [f32],
    keys: &[(usize, usize)],
) {
    let (tq, tk, d) = (g.tq, g.tk, g.d);
    let kt = transposed(k, ks, tk, d, kt);
    for (i0, &(lo, hi)) in (0..tq).step_by(QB).zip(keys) {
        let i1 = (i0 + QB).min(tq);
        let r = i1 - i0;
        let w = hi - lo;
        let sb = &mut s[..r * w];
        sgemm_serial(
            r,
            w,
            d,
            rows(&q[i0 * qs..], qs),
            rows(&kt[lo..], tk),
            sb,
            false,
        );
        probs(sb, bias, g, i0, lo, hi, Lse::Compute(&mut *lse));
        sgemm_serial(
            r,
            d,
            w,
            rows(sb, w),
            rows(&v[lo * vs..], vs),
            &mut o[i0 * d..i1 * d],
            false,
        );
    }
}

/// One pair's operands for the backward: q/k/o/dO rows and their strides (V enters as Vᵀ).
struct PairIn<'a> {
    q: &'a [f32],
    qs: usize,
    k: &'a [f32],
    ks: usize,
    o: &'a [f32],
    os: usize,
    go: &'a [f32],
    gs: usize,
}

/// Blocked backward of one (batch, head) pair (flash-attention's): per block of queries,
/// recompute P from the saved log-sum-exp, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O))·scale,
/// dQ = dS·K, dK += dSᵀ·Q, dV += Pᵀ·dO. A query that sees no key attends uniformly whatever
/// q and k are: only v gets a gradient from it. `dq` [tq × d] is overwritten; `dk`, `dv`
/// [tk × d] are added to (a kv head sums over its group of query heads).
///
/// `kt`, `vt` are Kᵀ and Vᵀ [d × tk] (see [`transposed`]).
fn bwd_blocked(
    x: &PairIn,
    (kt, vt): (&[f32], &[f32]),
    lse: &[f32],
    bias: &[f32],
    g: Dims,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    s: &mut [f32],
    dp: &mut [f32],
    keys: &[(usize, usize)],
) {
    let (tq, tk, d) = (g.tq, g.tk, g.d);
    for (i0, &(lo, hi)) in (0..tq).step_by(QB).zip(keys) {
        let i1 = (i0 + QB).min(tq);
        let r = i1 - i0;
        let w = hi - lo;
        let (sb, db) = (&mut s[..r * w], &mut dp[..r * w]);
        let qb = rows(&x.q[i0 * x.qs..], x.qs);
        let gob = rows(&x.go[i0 * x.gs..], x.gs);
        sgemm_serial(r, w, d, qb, rows(&kt[lo..], tk), sb, false);
        probs(sb, bias, g, i0, lo, hi, Lse::Given(lse));
        sgemm_serial(r, w, d, gob, rows(&vt[lo..], tk), db, false);
        ds_rows(
            sb,
            db,
            &x.o[i0 * x.os..],
            x.os,
            &x.go[i0 * x.gs..],
            x.gs,
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
            rows(&x.k[lo * x.ks..], x.ks),
            &mut dq[i0 * d..i1 * d],
            false,
        );
        sgemm_serial(w, d, r, cols(db, w), qb, &mut dk[lo * d..hi * d], true);
        sgemm_serial(w, d, r, cols(sb, w), gob, &mut dv[lo * d..hi * d], true);
    }
}

crate::multiversion! {
    /// dS = P ⊙ (dP − rowsum(dO ⊙ O)) · scale, in place of dP (0 for rows that see no key).
    /// `o`/`go` start at the block's first row, rows `os`/`gs` apart.
    fn ds_rows(
        p: &[f32], dp: &mut [f32], o: &[f32], os: usize, go: &[f32], gs: usize, bias: &[f32],
        g: Dims, i0: usize, lo: usize, hi: usize,
    ) {
        let (tk, d, w) = (g.tk, g.d, hi - lo);
        for (ii, (pr, dr)) in p.chunks(w).zip(dp.chunks_mut(w)).enumerate() {
            let i = i0 + ii;
            if bias[i * tk..(i + 1) * tk].iter().all(|&b| b <= MASK_BELOW) {
                dr.iter_mut().for_each(|x| *x = 0.0);
                continue;
            }
            let mut dd = 0.0f32;
            for (a, b) in go[ii * gs..ii * gs + d].iter().zip(&o[ii * os..ii * os + d]) {
                dd += a * b;
            }
            for (x, &pv) in dr.iter_mut().zip(pr) {
                *x = pv * (*x - dd) * g.scale;
            }
        }
    }
}

/// Sizes of one call: batch, query heads, kv heads (dividing `h`: query head `i` reads kv
/// head `i / (h / hk)`), and the per-pair geometry.
#[derive(Clone, Copy)]
struct Geo {
    b: usize,
    h: usize,
    hk: usize,
    g: Dims,
}

fn geometry(q: [usize; 4], k: [usize; 4], v: [usize; 4], bias: &Tensor) -> Result<Geo> {
    let [b, h, tq, d] = q;
    let [bk, hk, tk, dk] = k;
    if (bk, dk) != (b, d) || hk == 0 || h % hk != 0 || v != k {
        candle_core::bail!("attention: q {q:?}, k {k:?}, v {v:?} (as [b, h, t, d])")
    }
    let (bb, one, btq, btk) = bias.dims4()?;
    if (one, btq, btk) != (1, tq, tk) || (bb != b && bb != 1) {
        candle_core::bail!(
            "attention: bias {:?} for q {q:?}, k {k:?} (as [b, h, t, d])",
            bias.dims()
        )
    }
    let g = Dims {
        tq,
        tk,
        d,
        scale: 1.0 / (d as f32).sqrt(),
    };
    Ok(Geo { b, h, hk, g })
}

/// The output's shape for `form` (`Merged` here always holds the query head count).
fn out_shape(geo: Geo, form: Heads) -> Vec<usize> {
    let Geo { b, h, g, .. } = geo;
    match form {
        Heads::Split => vec![b, h, g.tq, g.d],
        Heads::Merged(_) => vec![b, g.tq, h * g.d],
    }
}

/// The forward over every (batch, query head) pair: the output (contiguous, `form`) and the
/// per-row log-sum-exp [b·h·tq].
fn forward(
    geo: Geo,
    q: Src,
    k: Src,
    v: Src,
    bias: &[f32],
    bb: usize,
    form: Heads,
) -> Result<(Vec<f32>, Vec<usize>, Vec<f32>)> {
    let Geo { b, h, hk, g } = geo;
    let (tq, tk, d) = (g.tq, g.tk, g.d);
    let rep = h / hk;
    let shape = out_shape(geo, form);
    let (_, orows) = rows_contiguous(&shape, form)?;
    let mut o = uninit(b * h * tq * d);
    let mut lse = vec![0.0f32; b * h * tq];
    let dst = Dst::new(&mut o, orows);
    let keys = if tq <= FEW_QUERIES {
        vec![]
    } else {
        all_block_keys(bias, bb, g)
    };
    lse.par_chunks_mut(tq.max(1)).enumerate().for_each_init(
        || {
            (
                vec![0.0f32; QB.min(tq) * tk],
                uninit(tq * d),
                uninit(tk * d),
            )
        },
        |(s, ob, kt), (p, lse)| {
            let (bi, hi) = (p / h, p % h);
            let (ki, bsel) = (hi / rep, if bb == 1 { 0 } else { bi });
            let bp = &bias[bsel * tq * tk..(bsel + 1) * tq * tk];
            let (qp, kp, vp) = (q.from(bi, hi, 0), k.from(bi, ki, 0), v.from(bi, ki, 0));
            let (qs, ks, vs) = (q.rows.s2, k.rows.s2, v.rows.s2);
            if tq <= FEW_QUERIES {
                fwd_rows(qp, qs, kp, ks, vp, vs, bp, g, ob, lse, s)
            } else {
                fwd_blocked(qp, qs, kp, ks, vp, vs, bp, g, ob, lse, s, kt, &keys[bsel])
            }
            // SAFETY: pair (bi, hi)'s output rows are written by this task only.
            unsafe { dst.put(bi, hi, 0, d, ob) };
        },
    );
    Ok((o, shape, lse))
}

/// The backward over every (batch, kv head) pair, each summing dK/dV over its group of query
/// heads: writes dq, dk, dv through their destinations (every row of each exactly once).
fn backward(
    geo: Geo,
    (q, k, v, o, go): (Src, Src, Src, Src, Src),
    lse: &[f32],
    bias: &[f32],
    bb: usize,
    (dq, dk, dv): (Dst, Dst, Dst),
) {
    let Geo { b, h, hk, g } = geo;
    let (tq, tk, d) = (g.tq, g.tk, g.d);
    let rep = h / hk;
    let keys = all_block_keys(bias, bb, g);
    (0..b * hk).into_par_iter().for_each_init(
        || {
            let n = QB.min(tq) * tk;
            let kv = || vec![0.0f32; tk * d];
            let t = (uninit(tk * d), uninit(tk * d));
            (
                vec![0.0f32; n],
                vec![0.0f32; n],
                uninit(tq * d),
                kv(),
                kv(),
                t,
            )
        },
        |(s, dp, dqb, dkb, dvb, (kt, vt)), kp| {
            let (bi, ki) = (kp / hk, kp % hk);
            let bsel = if bb == 1 { 0 } else { bi };
            let bp = &bias[bsel * tq * tk..(bsel + 1) * tq * tk];
            dkb.fill(0.0);
            dvb.fill(0.0);
            // Kᵀ and Vᵀ once per kv pair, for every query head of its group.
            let kt = transposed(k.from(bi, ki, 0), k.rows.s2, tk, d, kt);
            let vt = transposed(v.from(bi, ki, 0), v.rows.s2, tk, d, vt);
            for hi in ki * rep..(ki + 1) * rep {
                let x = PairIn {
                    q: q.from(bi, hi, 0),
                    qs: q.rows.s2,
                    k: k.from(bi, ki, 0),
                    ks: k.rows.s2,
                    o: o.from(bi, hi, 0),
                    os: o.rows.s2,
                    go: go.from(bi, hi, 0),
                    gs: go.rows.s2,
                };
                let p = bi * h + hi;
                let l = &lse[p * tq..(p + 1) * tq];
                let ks = &keys[bsel];
                bwd_blocked(&x, (kt, vt), l, bp, g, (dqb, dkb, dvb), s, dp, ks);
                // SAFETY: query pair (bi, hi) belongs to this kv pair's task only.
                unsafe { dq.put(bi, hi, 0, d, dqb) };
            }
            // SAFETY: kv pair (bi, ki) is this task's.
            unsafe {
                dk.put(bi, ki, 0, d, dkb);
                dv.put(bi, ki, 0, d, dvb);
            }
        },
    );
}

/// The attention op on three tensors, each holding its heads as its [`Heads`] says.
struct Attention {
    bias: Tensor,
    forms: [Heads; 3],
    out: Heads,
    /// Per-row log-sum-exp of the forward, for the backward.
    lse: Mutex<Vec<f32>>,
}

fn src<'a>(s: &'a CpuStorage, l: &Layout, form: Heads) -> Result<([usize; 4], Src<'a>)> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("attention: f32 only")
    };
    match rows_of(l.dims(), l.stride(), l.start_offset(), form)? {
        Some((dims, rows)) => Ok((dims, Src { data, rows })),
        None => candle_core::bail!("attention: rows of {:?} must be contiguous", l.dims()),
    }
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
        let (qd, q) = src(s1, l1, self.forms[0])?;
        let (kd, k) = src(s2, l2, self.forms[1])?;
        let (vd, v) = src(s3, l3, self.forms[2])?;
        let geo = geometry(qd, kd, vd, &self.bias)?;
        if self.out != Heads::Split && self.out != Heads::Merged(geo.h) {
            candle_core::bail!("attention: output {:?} for {} query heads", self.out, geo.h)
        }
        let bb = self.bias.dim(0)?;
        let (o, shape, lse) = with_f32(&[&self.bias], |bs| {
            forward(geo, q, k, v, bs[0], bb, self.out)
        })??;
        *self.lse.lock().unwrap() = lse;
        out(o, &Shape::from(shape))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [fq, fk, fv] = self.forms;
        let (qd, qr) = rows_contiguous(q.dims(), fq)?;
        let (kd, kr) = rows_contiguous(k.dims(), fk)?;
        let (vd, vr) = rows_contiguous(v.dims(), fv)?;
        let geo = geometry(qd, kd, vd, &self.bias)?;
        let (_, or) = rows_contiguous(res.dims(), self.out)?;
        let bb = self.bias.dim(0)?;
        let lse = self.lse.lock().unwrap();
        let mut dq = uninit(q.elem_count());
        let mut dk = uninit(k.elem_count());
        let mut dv = uninit(v.elem_count());
        let dsts = (
            Dst::new(&mut dq, qr),
            Dst::new(&mut dk, kr),
            Dst::new(&mut dv, vr),
        );
        with_f32(&[q, k, v, res, grad, &self.bias], |t| {
            let at = |i: usize, rows: Rows| Src { data: t[i], rows };
            let ins = (at(0, qr), at(1, kr), at(2, vr), at(3, or), at(4, or));
            backward(geo, ins, &lse, t[5], bb, dsts)
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Whether `t` can be read in place as `form` (rows of `d` contiguous).
fn readable(t: &Tensor, form: Heads) -> bool {
    matches!(rows_of(t.dims(), t.stride(), 0, form), Ok(Some(_)))
}

/// Fused attention: q `[b, h, tq, d]`, k/v `[b, hk, tk, d]` with `hk` dividing `h` (grouped-
/// query attention without repeating k/v), bias `[b or 1, 1, tq, tk]`; each of q/k/v in its own
/// [`Heads`] form (a strided view — a transposed projection, a KV cache's buffer — or a
/// projection's `[b, t, h·d]` output, read in place), the output `[b, h, tq, d]` (`out` =
/// `Split`) or `[b, tq, h·d]` (`Merged(h)`, the next projection's input).
pub fn attention_forms(
    (q, fq): (&Tensor, Heads),
    (k, fk): (&Tensor, Heads),
    (v, fv): (&Tensor, Heads),
    bias: &Tensor,
    out: Heads,
) -> Result<Tensor> {
    let op = Attention {
        bias: bias.contiguous()?.detach(),
        forms: [fq, fk, fv],
        out,
        lse: Mutex::new(vec![]),
    };
    let fit = |t: &Tensor, f: Heads| -> Result<Tensor> {
        if readable(t, f) {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    fit(q, fq)?.apply_op3(&fit(k, fk)?, &fit(v, fv)?, op)
}

/// Attention straight from a packed projection `[b, t, (h + 2·hk)·d]` (GPT-2's c_attn output:
/// q heads, then k heads, then v heads) → `[b, t, h·d]`: one graph node where splitting the
/// projection would take nine (three narrows, reshapes and transposes).
pub(super) struct Packed {
    pub(super) bias: Tensor,
    pub(super) h: usize,
    pub(super) hk: usize,
    pub(super) lse: Mutex<Vec<f32>>,
}

impl Packed {
    /// The geometry and the rows of q, k, v inside a packed tensor of shape `dims`, strides `st`.
    fn split(&self, dims: &[usize], st: &[usize], off: usize) -> Result<(Geo, [Rows; 3])> {
        let (h, hk) = (self.h, self.hk);
        let [b, t, w] = dims else {
            candle_core::bail!("packed attention: expected [b, t, (h+2hk)·d], got {dims:?}")
        };
        let heads = h + 2 * hk;
        if w % heads != 0 || (st[2] != 1 && *w > 1) {
            candle_core::bail!("packed attention: {dims:?} as {h} + 2·{hk} heads, strides {st:?}")
        }
        let d = w / heads;
        let r = |first_head: usize| Rows {
            off: off + first_head * d,
            s0: st[0],
            s1: d,
            s2: st[1],
        };
        let geo = geometry([*b, h, *t, d], [*b, hk, *t, d], [*b, hk, *t, d], &self.bias)?;
        Ok((geo, [r(0), r(h), r(h + hk)]))
    }
}

impl CustomOp1 for Packed {
    fn name(&self) -> &'static str {
        "packed-attention"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("packed attention: f32 only")
        };
        let (geo, [qr, kr, vr]) = self.split(l.dims(), l.stride(), l.start_offset())?;
        let at = |rows: Rows| Src { data, rows };
        let bb = self.bias.dim(0)?;
        let (o, shape, lse) = with_f32(&[&self.bias], |bs| {
            forward(
                geo,
                at(qr),
                at(kr),
                at(vr),
                bs[0],
                bb,
                Heads::Merged(self.h),
            )
        })??;
        *self.lse.lock().unwrap() = lse;
        out(o, &Shape::from(shape))
    }
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = self.grad_vec(x, res, grad)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

impl Packed {
    /// The gradient of the packed input `x` (the forward's output `res`, its gradient
    /// `grad`), as a vector shaped like `x`.
    pub(super) fn grad_vec(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Vec<f32>> {
        let st = Layout::contiguous(x.dims()).stride().to_vec();
        let (geo, [qr, kr, vr]) = self.split(x.dims(), &st, 0)?;
        let (_, or) = rows_contiguous(res.dims(), Heads::Merged(self.h))?;
        let bb = self.bias.dim(0)?;
        let lse = self.lse.lock().unwrap();
        // dq, dk and dv fill disjoint columns of one gradient: every element written once.
        let mut dx = uninit(x.elem_count());
        let dsts = (
            Dst::new(&mut dx, qr),
            Dst::new(&mut dx, kr),
            Dst::new(&mut dx, vr),
        );
        with_f32(&[x, res, grad, &self.bias], |t| {
            let at = |i: usize, rows: Rows| Src { data: t[i], rows };
            let ins = (at(0, qr), at(0, kr), at(0, vr), at(1, or), at(2, or));
            backward(geo, ins, &lse, t[3], bb, dsts)
        })?;
        Ok(dx)
    }
}

/// Fused attention on a packed `[b, t, (h + 2·hk)·d]` projection (q heads, k heads, v heads)
/// → `[b, t, h·d]`.
pub fn attention_packed(qkv: &Tensor, h: usize, hk: usize, bias: &Tensor) -> Result<Tensor> {
    let op = Packed {
        bias: bias.contiguous()?.detach(),
        h,
        hk,
        lse: Mutex::new(vec![]),
    };
    let x = if qkv.rank() == 3 && (qkv.stride()[2] == 1 || qkv.dim(2)? == 1) {
        qkv.clone()
    } else {
        qkv.contiguous()?
    };
    x.apply_op1(op)
}

#[cfg(test)]
mod tests {
    /// `reduce16` gives each key's sum with the bits of `_mm512_reduce_add_ps`, so decoding's
    /// scores (and every sampled token) are what they were with one reduction per key. Values
    /// spread over 40 binary orders of magnitude make any other order of additions show.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn reduce16_adds_in_the_order_of_reduce_add() {
        use std::arch::x86_64::*;
        if !super::super::has_avx512() {
            eprintln!("SKIPPED: no AVX-512 on this CPU");
            return;
        }
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let m = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            m * 2f32.powi(((seed >> 8) % 40) as i32 - 20)
        };
        let mut differ = 0;
        for _ in 0..2000 {
            let vals: Vec<[f32; 16]> = (0..16).map(|_| std::array::from_fn(|_| next())).collect();
            // SAFETY: AVX-512F is present (checked above); loads of local arrays.
            let (got, want) = unsafe {
                let a: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(vals[i].as_ptr()));
                let mut got = [0f32; 16];
                _mm512_storeu_ps(got.as_mut_ptr(), super::reduce16(&a));
                let want: [f32; 16] = std::array::from_fn(|i| _mm512_reduce_add_ps(a[i]));
                (got, want)
            };
            for i in 0..16 {
                assert_eq!(
                    got[i].to_bits(),
                    want[i].to_bits(),
                    "key {i}: {} vs {}",
                    got[i],
                    want[i]
                );
                // How often a plain left-to-right sum would have differed (the test's power).
                differ += (vals[i].iter().sum::<f32>() != want[i]) as usize;
            }
        }
        assert!(
            differ > 1000,
            "the data should separate orders of addition ({differ})"
        );
    }
}
