//! `x · wᵀ` for a weight stored [out, in] (the HF layout), with backward. Few rows (decoding:
//! one token per sequence) take a dot-product kernel that streams each weight row once instead
//! of packing the whole weight for a GEMM every step; more rows take the GEMM. Inside a
//! generation, 16 to 256 rows take the weight packed once for the whole of it
//! ([`super::packed`]).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::gemm::{mat, sgemm, Mat};
use super::{out, sink, slice, uninit, with_f32, SharedOut};

/// At most this many rows take the dot-product kernel (decoding: one row per sequence; PPO
/// decodes its whole rollout batch, 64 by default, at once). Up to 128 rows it beat the GEMM on
/// SmolLM2's decoding products (`speed -- decode`: 42 against 133 ms at 32 rows, 81 against 165
/// at 64, 165 against 226 at 128), whose [n, k] weights the GEMM reads column by column.
pub const SMALL_M: usize = 64;

/// Tree sum of 16 lanes (log-depth, so LLVM keeps it in vector registers).
#[inline(always)]
fn hsum16(a: &[f32; 16]) -> f32 {
    let mut b = [0.0f32; 8];
    for l in 0..8 {
        b[l] = a[l] + a[l + 8];
    }
    let mut c = [0.0f32; 4];
    for l in 0..4 {
        c[l] = b[l] + b[l + 4];
    }
    (c[0] + c[2]) + (c[1] + c[3])
}

/// `a · b` in 16 lanes (vectorised by the caller's target features), then a tree sum.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = hsum16(&acc);
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

crate::multiversion! {
    /// `o[j * m + r] = x_r · w_j` for the weight rows `w` (`n` rows of `k`).
    fn dots(x: &[f32], m: usize, k: usize, w: &[f32], o: &mut [f32]) {
        let n = w.len() / k;
        for j in 0..n {
            let wj = &w[j * k..(j + 1) * k];
            for r in 0..m {
                o[j * m + r] = dot(wj, &x[r * k..(r + 1) * k]);
            }
        }
    }
}

/// Sum each of 16 vectors: returns `f` with `f[4·j + r] = Σ lanes of a[4·r + j]` (a 4×4
/// transposition falls out of the shuffle tree; 45 shuffles and adds instead of 16 separate
/// horizontal reductions).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn reduce16(a: &[std::arch::x86_64::__m512; 16]) -> [f32; 16] {
    use std::arch::x86_64::*;
    // 512 → 256 bits per vector, two vectors per register.
    let mut c = [_mm512_setzero_ps(); 8];
    for p in 0..8 {
        let (x, y) = (a[2 * p], a[2 * p + 1]);
        c[p] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
        );
    }
    // 256 → 128 bits: lane L of d[q] holds 4 partial sums of a[4q + L].
    let mut d = [_mm512_setzero_ps(); 4];
    for q in 0..4 {
        let (x, y) = (c[2 * q], c[2 * q + 1]);
        d[q] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
        );
    }
    // 128 → 64 → 32 bits inside each 128-bit lane.
    let mut e = [_mm512_setzero_ps(); 2];
    for s in 0..2 {
        let (x, y) = (d[2 * s], d[2 * s + 1]);
        e[s] = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(x, y),
            _mm512_shuffle_ps::<0b11_10_11_10>(x, y),
        );
    }
    let f = _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(e[0], e[1]),
        _mm512_shuffle_ps::<0b11_01_11_01>(e[0], e[1]),
    );
    let mut out = [0.0f32; 16];
    // SAFETY: `out` holds 16 floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), f) };
    out
}

/// The lanes of the 16-float step at `c` that lie below `len` (all 16 but at the tail).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn tail_mask(c: usize, len: usize) -> std::arch::x86_64::__mmask16 {
    if c + 16 <= len {
        0xffff
    } else {
        (1u16 << (len - c)) - 1
    }
}

/// One block: `R` (≤ 4) input rows against 4 weight rows, 16 accumulators in registers
/// (8 loads per 16 FMAs, where one row pair at a time needs 2 loads per FMA). `prefetch`
/// (start, floats): lines to bring into L2 meanwhile, spread evenly over the steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn block4<const R: usize>(
    x: &[f32],
    k: usize,
    w: &[f32],
    o: &mut [f32],
    om: usize,
    prefetch: (*const f32, usize),
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= R * k && w.len() >= 4 * k);
    let mut acc = [_mm512_setzero_ps(); 16];
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let (pf, pf_len) = prefetch;
    let steps = k.div_ceil(16);
    let per_step = pf_len.div_ceil(16).div_ceil(steps);
    let mut c = 0;
    while c < k {
        let mask = tail_mask(c, k);
        // This call's share of the lines to prefetch, spread evenly over its steps.
        // Prefetches never fault.
        for l in 0..per_step {
            let at = (c / 16 * per_step + l) * 16;
            if at < pf_len {
                _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(at) as *const i8);
            }
        }
        // SAFETY: masked loads touch only lanes c..min(c + 16, k) of each row, all in bounds.
        unsafe {
            let wv = [
                _mm512_maskz_loadu_ps(mask, wp.add(c)),
                _mm512_maskz_loadu_ps(mask, wp.add(k + c)),
                _mm512_maskz_loadu_ps(mask, wp.add(2 * k + c)),
                _mm512_maskz_loadu_ps(mask, wp.add(3 * k + c)),
            ];
            for r in 0..R {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(r * k + c));
                for j in 0..4 {
                    acc[4 * r + j] = _mm512_fmadd_ps(wv[j], xv, acc[4 * r + j]);
                }
            }
        }
        c += 16;
    }
    // SAFETY: AVX-512F is enabled for this function.
    let f = unsafe { reduce16(&acc) };
    for j in 0..4 {
        o[j * om..j * om + R].copy_from_slice(&f[4 * j..4 * j + R]);
    }
}

/// AVX-512 `dots`: blocks of 4 weight rows × up to 4 input rows, explicit FMAs (Rust never
/// contracts `a * b + c` on its own).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512(x: &[f32], m: usize, k: usize, w: &[f32], o: &mut [f32]) {
    let n = w.len() / k;
    let nb = n - n % 4;
    let passes = m.div_ceil(4);
    // The next block's 4 rows (one contiguous stretch of 4·k floats) are prefetched into L2
    // while this block runs, spread over all its passes. Prefetching them into L1 in the first
    // pass only left memory idle during the others (passes over rows already in L1): SmolLM2's
    // products streamed their weights at 15–17 GB/s at 8 rows, against 27 now (BENCHMARKS.md).
    let share = (4 * k).div_ceil(passes).next_multiple_of(16);
    for j0 in (0..nb).step_by(4) {
        let wb = &w[j0 * k..(j0 + 4) * k];
        let mut r0 = 0;
        while r0 < m {
            let rows = (m - r0).min(4);
            let xb = &x[r0 * k..(r0 + rows) * k];
            let ob = &mut o[j0 * m + r0..];
            let start = ((j0 + 4) * k + r0 / 4 * share).min(n * k);
            let pf = (w.as_ptr().wrapping_add(start), share.min(n * k - start));
            // SAFETY: AVX-512F is enabled; the slices hold `rows` and 4 rows of `k`.
            unsafe {
                match rows {
                    4 => block4::<4>(xb, k, wb, ob, m, pf),
                    3 => block4::<3>(xb, k, wb, ob, m, pf),
                    2 => block4::<2>(xb, k, wb, ob, m, pf),
                    _ => block4::<1>(xb, k, wb, ob, m, pf),
                }
            }
            r0 += rows;
        }
    }
    if nb < n {
        dots(x, m, k, &w[nb * k..], &mut o[nb * m..]);
    }
}

fn dots_any(x: &[f32], m: usize, k: usize, w: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { dots_avx512(x, m, k, w, o) };
    }
    dots(x, m, k, w, o)
}

/// `(rows, k)` of an input `[..., k]` (rank ≥ 1): every leading dimension is a row.
pub(super) fn rows_k(dims: &[usize]) -> Result<(usize, usize)> {
    match dims.split_last() {
        Some((&k, lead)) => Ok((lead.iter().product(), k)),
        None => candle_core::bail!("linear: a scalar input"),
    }
}

/// The output shape of `x [..., k]` mapped to `n` columns: `[..., n]`.
pub(super) fn with_last(dims: &[usize], n: usize) -> Shape {
    let mut d = dims.to_vec();
    *d.last_mut().expect("rank >= 1") = n;
    Shape::from(d)
}

/// Weight rows per task of [`matmul_nt`]'s few-row path: two tasks per thread, in whole blocks
/// of 4 rows, at most 256. A fixed 128 split SmolLM2's 576-row products 3 : 2 and its 192-row
/// ones 2 : 1 between two threads, so one thread idled for a sixth to a quarter of them.
fn chunk_rows(n: usize) -> usize {
    n.div_ceil(2 * rayon::current_num_threads())
        .next_multiple_of(4)
        .clamp(16, 256)
}

/// `x [m, k] · w[n, k]ᵀ → [m, n]` into `o`.
pub fn matmul_nt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, o: &mut [f32]) {
    if m == 0 || n == 0 || k == 0 {
        o[..m * n].iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    if m <= SMALL_M {
        // Tasks own disjoint column blocks of `o`: each computes its block transposed
        // ([cols, m]) and writes it into place.
        let ch = chunk_rows(n);
        let dst = SharedOut::new(&mut o[..m * n]);
        // The block comes out as [cols, m]; an 8 × 8-blocked transpose turns it into rows (a
        // strided gather per row took 8% of decoding 64 rows at vocabulary 50257 on its own).
        w.par_chunks(ch * k).enumerate().for_each_init(
            || (uninit(ch * m), uninit(ch * m)),
            |(buf, rows), (ci, wc)| {
                let cols = wc.len() / k;
                let bt = &mut buf[..cols * m];
                dots_any(x, m, k, wc, bt);
                let tb = &mut rows[..cols * m];
                super::gemm::transpose(bt, m, cols, m, tb, false);
                for (r, row) in tb.chunks_exact(cols).enumerate() {
                    // SAFETY: columns ci·ch.. of every row belong to this task only.
                    unsafe { dst.write(r * n + ci * ch, row) };
                }
            },
        );
    } else {
        sgemm(
            m,
            n,
            k,
            Mat {
                data: x,
                rs: k,
                cs: 1,
            },
            Mat {
                data: w,
                rs: 1,
                cs: k,
            },
            o,
            false,
        );
    }
}

struct MatmulNt;

impl CustomOp2 for MatmulNt {
    fn name(&self) -> &'static str {
        "matmul-nt"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = rows_k(l1.dims())?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("matmul_nt: {:?} x {:?}ᵀ", l1.dims(), l2.dims())
        }
        let (x, w) = (slice(s1, l1, "matmul_nt")?, slice(s2, l2, "matmul_nt")?);
        let mut o = uninit(m * n);
        matmul_nt(x, w, m, k, n, &mut o);
        out(o, &with_last(l1.dims(), n))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = rows_k(x.dims())?;
        let n = w.dim(0)?;
        let (want_x, want_w) = (x.track_op(), w.track_op());
        let (dx, dw) = with_f32(&[x, w, g], |t| {
            let (xs, ws, gs) = (t[0], t[1], t[2]);
            let dx = want_x.then(|| {
                let mut dx = uninit(m * k);
                let gm = Mat {
                    data: gs,
                    rs: n,
                    cs: 1,
                };
                sgemm(
                    m,
                    k,
                    n,
                    gm,
                    Mat {
                        data: ws,
                        rs: k,
                        cs: 1,
                    },
                    &mut dx,
                    false,
                );
                dx
            });
            let dw = if want_w {
                let gt = Mat {
                    data: gs,
                    rs: 1,
                    cs: n,
                };
                let xm = Mat {
                    data: xs,
                    rs: k,
                    cs: 1,
                };
                sink::weight_grad(w, n * k, |dw, acc| sgemm(n, k, m, gt, xm, dw, acc))
            } else {
                None
            };
            (dx, dw)
        })?;
        Ok((
            dx.map(|v| Tensor::from_vec(v, x.shape(), x.device()))
                .transpose()?,
            dw.map(|v| Tensor::from_vec(v, (n, k), w.device()))
                .transpose()?,
        ))
    }
}

/// `x [..., k] · w [n, k]ᵀ → [..., n]` (f32, CPU).
pub fn matmul_nt_op(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    // Decoding inside a generation: the weight packed once for the whole of it.
    if let Some(y) = super::packed::product(x, w, false)? {
        return Ok(y);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, MatmulNt)
}

/// `x [m, k] · W + b`: W stored [k, n] (`transposed`, GPT-2 Conv1D) or [n, k] (HF Linear);
/// the bias is written into the output before the GEMM accumulates onto it, and its gradient
/// is a column sum in the same backward — one graph node instead of matmul + broadcast add.
pub(super) struct LinearBias {
    pub(super) transposed: bool,
}

impl LinearBias {
    /// (dx, dW, db) for upstream `g`, each only when wanted (`bwd` wants those whose tensor
    /// tracks gradients; [`super::block`] says which itself).
    pub(super) fn grads(
        &self,
        (x, w, b): (&Tensor, &Tensor, &Tensor),
        g: &Tensor,
        wants: (bool, bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = rows_k(x.dims())?;
        let n = b.dim(0)?;
        let grads = linear_grads(x, w, Some(b), g, (m, k, n), self.transposed, wants)?;
        grad_tensors(x, w, n, grads)
    }
}

fn wmat(w: &[f32], k: usize, n: usize, transposed: bool) -> Mat<'_> {
    if transposed {
        Mat {
            data: w,
            rs: n,
            cs: 1,
        }
    } else {
        Mat {
            data: w,
            rs: 1,
            cs: k,
        }
    }
}

/// What [`linear_fwd`]'s product is added onto.
#[derive(Clone, Copy)]
pub(super) enum Onto<'a> {
    /// Nothing: `c = x · W`.
    Zero,
    /// A bias `[n]`, broadcast over the rows.
    Bias(&'a CpuStorage, &'a Layout),
    /// A residual of the output's shape `[..., n]`.
    Residual(&'a CpuStorage, &'a Layout),
}

/// `onto + x [m, k] · W`: a bias or residual is written into the output first and the GEMM
/// accumulates onto it.
pub(super) fn linear_fwd(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    onto: Onto,
    transposed: bool,
) -> Result<(CpuStorage, Shape)> {
    let (m, k) = rows_k(l1.dims())?;
    let (a, b) = l2.shape().dims2()?;
    let (k2, n) = if transposed { (a, b) } else { (b, a) };
    let shape = with_last(l1.dims(), n);
    let ok = k == k2
        && match onto {
            Onto::Zero => true,
            Onto::Bias(_, l3) => l3.dims() == [n],
            Onto::Residual(_, l3) => l3.dims() == shape.dims(),
        };
    if !ok {
        let extra = match onto {
            Onto::Zero => String::new(),
            Onto::Bias(_, l3) => format!(", bias {:?}", l3.dims()),
            Onto::Residual(_, l3) => format!(", residual {:?}", l3.dims()),
        };
        candle_core::bail!("linear: x {:?}, w {:?}{extra}", l1.dims(), l2.dims())
    }
    let x = slice(s1, l1, "linear")?;
    let w = slice(s2, l2, "linear")?;
    let mut o = uninit(m * n);
    match onto {
        Onto::Zero => {}
        Onto::Bias(s3, l3) => {
            let bias = slice(s3, l3, "linear")?;
            o.par_chunks_mut(n * 64).for_each(|c| {
                c.chunks_mut(n).for_each(|r| r.copy_from_slice(bias));
            });
        }
        Onto::Residual(s3, l3) => {
            let r = slice(s3, l3, "linear")?;
            o.par_chunks_mut(1 << 14)
                .zip(r.par_chunks(1 << 14))
                .for_each(|(o, r)| o.copy_from_slice(r));
        }
    }
    let xm = Mat {
        data: x,
        rs: k,
        cs: 1,
    };
    let accumulate = !matches!(onto, Onto::Zero);
    sgemm(m, n, k, xm, wmat(w, k, n, transposed), &mut o, accumulate);
    out(o, &shape)
}

/// The gradients [`linear_grads`] computed, as tensors shaped like `x`, `w` and the bias `[n]`.
#[allow(clippy::type_complexity)]
pub(super) fn grad_tensors(
    x: &Tensor,
    w: &Tensor,
    n: usize,
    (dx, dw, db): (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>),
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let dev = x.device();
    Ok((
        dx.map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?,
        dw.map(|v| Tensor::from_vec(v, w.shape(), dev))
            .transpose()?,
        db.map(|v| Tensor::from_vec(v, n, dev)).transpose()?,
    ))
}

impl candle_core::CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "linear-bias"
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
        linear_fwd(s1, l1, s2, l2, Onto::Bias(s3, l3), self.transposed)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wants = (x.track_op(), w.track_op(), b.track_op());
        self.grads((x, w, b), g, wants)
    }
}

/// `x [..., k] · W + b → [..., n]` with W [k, n] (`transposed`) or [n, k], bias [n] (f32, CPU).
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor, transposed: bool) -> Result<Tensor> {
    // Inside a generation: the weight packed once for the whole of it, the bias added after.
    if let Some(y) = super::packed::product(x, w, transposed)? {
        return y.broadcast_add(b);
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LinearBias { transposed },
    )
}

/// Gradients of `y = x · W (+ b)` for `x [m, k]`, W as in [`LinearBias`], upstream `g [m, n]`:
/// (dx, dW, db), each only when wanted.
#[allow(clippy::type_complexity)]
pub(super) fn linear_grads(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    g: &Tensor,
    (m, k, n): (usize, usize, usize),
    tr: bool,
    (want_x, want_w, want_b): (bool, bool, bool),
) -> Result<(Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>)> {
    with_f32(&[x, w, g], |t| {
        let (xs, ws, gs) = (t[0], t[1], t[2]);
        let gm = Mat {
            data: gs,
            rs: n,
            cs: 1,
        };
        let gt = Mat {
            data: gs,
            rs: 1,
            cs: n,
        };
        let xt = Mat {
            data: xs,
            rs: 1,
            cs: k,
        };
        let dx = want_x.then(|| {
            // dx = g · Wᵀ(as [n, k])
            let mut dx = uninit(m * k);
            let wt = if tr {
                Mat {
                    data: ws,
                    rs: 1,
                    cs: n,
                }
            } else {
                Mat {
                    data: ws,
                    rs: k,
                    cs: 1,
                }
            };
            sgemm(m, k, n, gm, wt, &mut dx, false);
            dx
        });
        // dW (and db) go to the parameter's gradient-sink buffer when one holds it.
        let dw = if want_w {
            sink::weight_grad(w, n * k, |dw, acc| {
                if tr {
                    sgemm(k, n, m, xt, gm, dw, acc); // [k, n] = xᵀ g
                } else {
                    let xm = Mat {
                        data: xs,
                        rs: k,
                        cs: 1,
                    };
                    sgemm(n, k, m, gt, xm, dw, acc); // [n, k] = gᵀ x
                }
            })
        } else {
            None
        };
        // db = column sums of g, in parallel over blocks of columns.
        let col_sums = |db: &mut [f32], acc: bool| {
            if !acc {
                db.fill(0.0);
            }
            db.par_chunks_mut(256)
                .enumerate()
                .for_each(|(j, d)| super::math::add_columns(d, &gs[..m * n], n, j * 256));
        };
        let db = match (want_b, b) {
            (false, _) => None,
            (true, Some(b)) => sink::weight_grad(b, n, col_sums),
            (true, None) => {
                let mut db = vec![0.0f32; n];
                col_sums(&mut db, true);
                Some(db)
            }
        };
        (dx, dw, db)
    })
}

/// Gradients of `y = x · Wᵀ (+ b)` for `x [m, k]` whose HF-layout weight `w [n, k]` is the
/// row-wise concatenation of `parts` (each `[n_i, k]`, with its bias `[n_i]` if any) — q, k
/// and v projections run as one product — and `gs [m, n]` the gradient of `y`. `dx` (a vector
/// shaped like `x`, when `want_dx`) comes from the concatenated weight in one GEMM; each part's dW (and db)
/// from its own columns of `gs`, for those that track gradients (frozen ones get none), into
/// this thread's gradient sink where it holds the part (`None` then), else returned.
#[allow(clippy::type_complexity)]
pub(super) fn split_grads(
    x: &Tensor,
    w: &Tensor,
    parts: &[(&Tensor, Option<&Tensor>)],
    gs: &[f32],
    want_dx: bool,
) -> Result<(Option<Vec<f32>>, Vec<(Option<Tensor>, Option<Tensor>)>)> {
    let (m, k) = rows_k(x.dims())?;
    let n = w.dim(0)?;
    let mut widths = Vec::with_capacity(parts.len());
    for (p, b) in parts {
        let (ni, ki) = p.dims2()?;
        if ki != k || b.is_some_and(|b| b.dims() != [ni]) {
            candle_core::bail!("split linear: x {:?}, part {:?}", x.dims(), p.dims())
        }
        widths.push(ni);
    }
    if widths.iter().sum::<usize>() != n || w.dim(1)? != k || gs.len() != m * n {
        candle_core::bail!(
            "split linear: x {:?}, w {:?}, g of {}",
            x.dims(),
            w.dims(),
            gs.len()
        )
    }
    let (dx, grads) = with_f32(&[x, w], |t| {
        let (xs, ws) = (t[0], t[1]);
        // dx = g · W, W as [n, k].
        let dx = want_dx.then(|| {
            let mut dx = uninit(m * k);
            sgemm(m, k, n, mat(gs, n, 1), mat(ws, k, 1), &mut dx, false);
            dx
        });
        let xm = mat(xs, k, 1);
        let mut c0 = 0;
        let mut grads = Vec::with_capacity(parts.len());
        for (&(p, b), &ni) in parts.iter().zip(&widths) {
            // dW_i = g[:, c0..c0 + n_i]ᵀ · x, [n_i, k]: gᵀ's rows are g's columns.
            let gt = mat(&gs[c0..], 1, n);
            let dw = p
                .track_op()
                .then(|| sink::weight_grad(p, ni * k, |dw, acc| sgemm(ni, k, m, gt, xm, dw, acc)));
            let db = b.filter(|b| b.track_op()).and_then(|b| {
                sink::weight_grad(b, ni, |db, acc| {
                    if !acc {
                        db.fill(0.0);
                    }
                    db.par_chunks_mut(256).enumerate().for_each(|(j, d)| {
                        super::math::add_columns(d, &gs[..m * n], n, c0 + j * 256)
                    });
                })
            });
            grads.push((dw.flatten(), db));
            c0 += ni;
        }
        (dx, grads)
    })?;
    let dev = x.device();
    let grads = grads
        .into_iter()
        .zip(parts)
        .map(|((dw, db), (p, b))| -> Result<_> {
            let dw = dw
                .map(|v| Tensor::from_vec(v, p.shape(), dev))
                .transpose()?;
            let db = match (db, b) {
                (Some(v), Some(b)) => Some(Tensor::from_vec(v, b.shape(), dev)?),
                _ => None,
            };
            Ok((dw, db))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((dx, grads))
}

/// (dx, dW) of a bias-free `x · W` for the upstream gradient `g`, each only when wanted.
fn product_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    transposed: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (m, k) = rows_k(x.dims())?;
    let n = g.dim(D::Minus1)?;
    let wants = (x.track_op(), w.track_op(), false);
    let grads = linear_grads(x, w, None, g, (m, k, n), transposed, wants)?;
    let (dx, dw, _) = grad_tensors(x, w, n, grads)?;
    Ok((dx, dw))
}

/// `r + x · W`: the residual `r` is copied into the output first and the GEMM accumulates onto
/// it, so the residual stream's add is no op (and no gradient buffer) of its own.
struct LinearResidual {
    transposed: bool,
}

impl candle_core::CustomOp3 for LinearResidual {
    fn name(&self) -> &'static str {
        "linear-residual"
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
        linear_fwd(s1, l1, s2, l2, Onto::Residual(s3, l3), self.transposed)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        r: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = product_grads(x, w, g, self.transposed)?;
        Ok((dx, dw, r.track_op().then(|| g.clone())))
    }
}

/// `r + x [..., k] · W → [..., n]` with W [k, n] (`transposed`) or [n, k] and `r` [..., n]
/// (f32, CPU): a bias-free linear layer and the residual add after it, as one op.
pub fn linear_residual(x: &Tensor, w: &Tensor, r: &Tensor, transposed: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &r.contiguous()?,
        LinearResidual { transposed },
    )
}

/// `x [m, k] · W` without bias, W stored [k, n] (`transposed`) or [n, k]: the GEMM runs on the
/// rayon pool (candle's own matmul follows `CANDLE_NUM_THREADS`, which we set to 1).
struct Linear {
    transposed: bool,
}

impl candle_core::CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        linear_fwd(s1, l1, s2, l2, Onto::Zero, self.transposed)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        product_grads(x, w, g, self.transposed)
    }
}

/// `x [..., k] · W → [..., n]` with W [k, n] (`transposed`) or [n, k] (f32, CPU),
/// multi-threaded. Leading dimensions are rows: no reshape (and no graph node for one).
pub fn linear(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    // Inside a generation: the weight packed once for the whole of it.
    if let Some(y) = super::packed::product(x, w, transposed)? {
        return Ok(y);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Linear { transposed })
}
