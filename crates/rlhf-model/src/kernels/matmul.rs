//! `x · wᵀ` for a weight stored [out, in] (the HF layout), with backward. Few rows (decoding:
//! one token per sequence) take a dot-product kernel that streams each weight row once instead
//! of packing the whole weight for a GEMM every step; more rows take the GEMM.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{sgemm, Mat};
use super::{out, slice, uninit, with_f32};

/// At most this many rows take the dot-product kernel.
pub const SMALL_M: usize = 16;

/// Tree sum of 16 lanes (log-depth, so LLVM keeps it in vector registers).
#[inline(always)]
pub fn hsum16(a: &[f32; 16]) -> f32 {
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

crate::multiversion! {
    /// `o[j * m + r] = x_r · w_j` for the weight rows `w` (`n` rows of `k`).
    fn dots(x: &[f32], m: usize, k: usize, w: &[f32], o: &mut [f32]) {
        let n = w.len() / k;
        for j in 0..n {
            let wj = &w[j * k..(j + 1) * k];
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                let mut acc = [0.0f32; 16];
                let (wc, xc) = (wj.chunks_exact(16), xr.chunks_exact(16));
                let (wr, xrr) = (wc.remainder(), xc.remainder());
                for (a, b) in wc.zip(xc) {
                    for l in 0..16 {
                        acc[l] += a[l] * b[l];
                    }
                }
                let mut s = hsum16(&acc);
                for (a, b) in wr.iter().zip(xrr) {
                    s += a * b;
                }
                o[j * m + r] = s;
            }
        }
    }
}

/// AVX-512 `dots`: explicit FMAs (Rust never contracts `a * b + c` on its own).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512(x: &[f32], m: usize, k: usize, w: &[f32], o: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = w.len() / k;
    let full = k - k % 16;
    for j in 0..n {
        let wj = &w[j * k..(j + 1) * k];
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            let mut a0 = _mm512_setzero_ps();
            let mut a1 = _mm512_setzero_ps();
            let mut c = 0;
            while c + 32 <= full {
                // SAFETY: c + 32 <= k, in bounds of both rows.
                unsafe {
                    a0 = _mm512_fmadd_ps(
                        _mm512_loadu_ps(wj.as_ptr().add(c)),
                        _mm512_loadu_ps(xr.as_ptr().add(c)),
                        a0,
                    );
                    a1 = _mm512_fmadd_ps(
                        _mm512_loadu_ps(wj.as_ptr().add(c + 16)),
                        _mm512_loadu_ps(xr.as_ptr().add(c + 16)),
                        a1,
                    );
                }
                c += 32;
            }
            if c < full {
                // SAFETY: c + 16 <= k.
                unsafe {
                    a0 = _mm512_fmadd_ps(
                        _mm512_loadu_ps(wj.as_ptr().add(c)),
                        _mm512_loadu_ps(xr.as_ptr().add(c)),
                        a0,
                    );
                }
            }
            let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            for l in full..k {
                s += wj[l] * xr[l];
            }
            o[j * m + r] = s;
        }
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

/// `x [m, k] · w[n, k]ᵀ → [m, n]` into `o`.
pub fn matmul_nt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, o: &mut [f32]) {
    if m == 0 || n == 0 || k == 0 {
        o[..m * n].iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    if m <= SMALL_M {
        // Tasks own disjoint column blocks: compute oᵀ [n, m] by row blocks, then transpose.
        const CH: usize = 128;
        let mut ot = uninit(n * m);
        ot.par_chunks_mut(CH * m)
            .zip(w.par_chunks(CH * k))
            .for_each(|(ot, wc)| dots_any(x, m, k, wc, ot));
        for (j, col) in ot.chunks(m).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                o[r * n + j] = v;
            }
        }
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
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("matmul_nt: {:?} x {:?}ᵀ", l1.dims(), l2.dims())
        }
        let (x, w) = (slice(s1, l1, "matmul_nt")?, slice(s2, l2, "matmul_nt")?);
        let mut o = uninit(m * n);
        matmul_nt(x, w, m, k, n, &mut o);
        out(o, &Shape::from((m, n)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
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
            let dw = want_w.then(|| {
                let mut dw = uninit(n * k);
                let gt = Mat {
                    data: gs,
                    rs: 1,
                    cs: n,
                };
                sgemm(
                    n,
                    k,
                    m,
                    gt,
                    Mat {
                        data: xs,
                        rs: k,
                        cs: 1,
                    },
                    &mut dw,
                    false,
                );
                dw
            });
            (dx, dw)
        })?;
        Ok((
            dx.map(|v| Tensor::from_vec(v, (m, k), x.device()))
                .transpose()?,
            dw.map(|v| Tensor::from_vec(v, (n, k), w.device()))
                .transpose()?,
        ))
    }
}

/// `x [m, k] · w [n, k]ᵀ` (f32, CPU).
pub fn matmul_nt_op(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, MatmulNt)
}

/// `x [m, k] · W + b`: W stored [k, n] (`transposed`, GPT-2 Conv1D) or [n, k] (HF Linear);
/// the bias is written into the output before the GEMM accumulates onto it, and its gradient
/// is a column sum in the same backward — one graph node instead of matmul + broadcast add.
struct LinearBias {
    transposed: bool,
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

/// `x [m, k] · W (+ bias)`: the bias (if any) is written into the output first and the GEMM
/// accumulates onto it.
fn linear_fwd(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
    transposed: bool,
) -> Result<(CpuStorage, Shape)> {
    let (m, k) = l1.shape().dims2()?;
    let (a, b) = l2.shape().dims2()?;
    let (k2, n) = if transposed { (a, b) } else { (b, a) };
    if k != k2 || bias.is_some_and(|(_, l3)| l3.dims() != [n]) {
        candle_core::bail!(
            "linear: x {:?}, w {:?}, b {:?}",
            l1.dims(),
            l2.dims(),
            bias.map(|(_, l3)| l3.dims())
        )
    }
    let x = slice(s1, l1, "linear")?;
    let w = slice(s2, l2, "linear")?;
    let mut o = uninit(m * n);
    if let Some((s3, l3)) = bias {
        let bias = slice(s3, l3, "linear")?;
        o.par_chunks_mut(n * 64).for_each(|c| {
            c.chunks_mut(n).for_each(|r| r.copy_from_slice(bias));
        });
    }
    let xm = Mat {
        data: x,
        rs: k,
        cs: 1,
    };
    sgemm(
        m,
        n,
        k,
        xm,
        wmat(w, k, n, transposed),
        &mut o,
        bias.is_some(),
    );
    out(o, &Shape::from((m, n)))
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
        linear_fwd(s1, l1, s2, l2, Some((s3, l3)), self.transposed)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let n = b.dim(0)?;
        let (want_x, want_w, want_b) = (x.track_op(), w.track_op(), b.track_op());
        let tr = self.transposed;
        let (dx, dw, db) = linear_grads(x, w, g, (m, k, n), tr, (want_x, want_w, want_b))?;
        let dev = x.device();
        Ok((
            dx.map(|v| Tensor::from_vec(v, (m, k), dev)).transpose()?,
            dw.map(|v| Tensor::from_vec(v, w.shape(), dev))
                .transpose()?,
            db.map(|v| Tensor::from_vec(v, n, dev)).transpose()?,
        ))
    }
}

/// `x [m, k] · W + b` with W [k, n] (`transposed`) or [n, k], bias [n] (f32, CPU).
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor, transposed: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LinearBias { transposed },
    )
}

/// Gradients of `y = x · W (+ b)` for `x [m, k]`, W as in [`LinearBias`], upstream `g [m, n]`:
/// (dx, dW, db), each only when wanted.
#[allow(clippy::type_complexity)]
fn linear_grads(
    x: &Tensor,
    w: &Tensor,
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
        let dw = want_w.then(|| {
            let mut dw = uninit(n * k);
            if tr {
                sgemm(k, n, m, xt, gm, &mut dw, false); // [k, n] = xᵀ g
            } else {
                let xm = Mat {
                    data: xs,
                    rs: k,
                    cs: 1,
                };
                sgemm(n, k, m, gt, xm, &mut dw, false); // [n, k] = gᵀ x
            }
            dw
        });
        let db = want_b.then(|| {
            let mut db = vec![0.0f32; n];
            for r in gs.chunks(n) {
                db.iter_mut().zip(r).for_each(|(d, v)| *d += v);
            }
            db
        });
        (dx, dw, db)
    })
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
        linear_fwd(s1, l1, s2, l2, None, self.transposed)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let n = g.dim(1)?;
        let (dx, dw, _) = linear_grads(
            x,
            w,
            g,
            (m, k, n),
            self.transposed,
            (x.track_op(), w.track_op(), false),
        )?;
        let dev = x.device();
        Ok((
            dx.map(|v| Tensor::from_vec(v, (m, k), dev)).transpose()?,
            dw.map(|v| Tensor::from_vec(v, w.shape(), dev))
                .transpose()?,
        ))
    }
}

/// `x [m, k] · W` with W [k, n] (`transposed`) or [n, k] (f32, CPU), multi-threaded.
pub fn linear(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Linear { transposed })
}
