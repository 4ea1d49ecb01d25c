//! LayerNorm (biased variance, affine) and RMSNorm over the last dimension, fused forward and
//! backward. Row statistics are recomputed in the backward (one cheap pass) instead of stored.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{out, sink, slice, uninit, with_f32};

/// Rows per parallel task.
const ROWS: usize = 16;

crate::multiversion! {
    /// mean and 1/sqrt(var + eps) of a row (`center` false: mean 0, RMS).
    fn stats(x: &[f32], eps: f32, center: bool) -> (f32, f32) {
        let n = x.len() as f32;
        let mean = if center { x.iter().sum::<f32>() / n } else { 0.0 };
        let mut acc = [0.0f32; 16];
        let c = x.chunks_exact(16);
        let r = c.remainder();
        for xs in c {
            for k in 0..16 {
                let d = xs[k] - mean;
                acc[k] += d * d;
            }
        }
        let mut ss: f32 = acc.iter().sum();
        for &v in r {
            ss += (v - mean) * (v - mean);
        }
        (mean, 1.0 / (ss / n + eps).sqrt())
    }
}

crate::multiversion! {
    fn norm_row(x: &[f32], w: &[f32], b: Option<&[f32]>, mean: f32, rstd: f32, y: &mut [f32]) {
        match b {
            Some(b) => {
                for i in 0..y.len() {
                    y[i] = (x[i] - mean) * rstd * w[i] + b[i];
                }
            }
            None => {
                for i in 0..y.len() {
                    y[i] = (x[i] - mean) * rstd * w[i];
                }
            }
        }
    }
}

crate::multiversion! {
    /// dx of one row; accumulates dw (and db) into `acc` = [dw | db].
    fn norm_row_bwd(
        x: &[f32], w: &[f32], g: &[f32], mean: f32, rstd: f32, center: bool,
        dx: &mut [f32], dw: &mut [f32], db: Option<&mut [f32]>,
    ) {
        let n = x.len();
        // sums of gw and gw·xhat
        let (mut s1, mut s2) = ([0.0f32; 16], [0.0f32; 16]);
        let full = n - n % 16;
        for c in (0..full).step_by(16) {
            for k in 0..16 {
                let i = c + k;
                let xh = (x[i] - mean) * rstd;
                let gw = g[i] * w[i];
                s1[k] += gw;
                s2[k] += gw * xh;
                dw[i] += g[i] * xh;
            }
        }
        let (mut a1, mut a2): (f32, f32) = (s1.iter().sum(), s2.iter().sum());
        for i in full..n {
            let xh = (x[i] - mean) * rstd;
            let gw = g[i] * w[i];
            a1 += gw;
            a2 += gw * xh;
            dw[i] += g[i] * xh;
        }
        let m1 = if center { a1 / n as f32 } else { 0.0 };
        let m2 = a2 / n as f32;
        for i in 0..n {
            let xh = (x[i] - mean) * rstd;
            dx[i] = rstd * (g[i] * w[i] - m1 - xh * m2);
        }
        if let Some(db) = db {
            for i in 0..n {
                db[i] += g[i];
            }
        }
    }
}

/// The normalised rows, and each row's (mean, 1/std) for the backward.
fn forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    eps: f32,
    center: bool,
) -> (Vec<f32>, Vec<(f32, f32)>) {
    let d = w.len();
    let mut y = uninit(x.len());
    let mut st = vec![(0.0f32, 0.0f32); x.len() / d.max(1)];
    y.par_chunks_mut(ROWS * d)
        .zip(x.par_chunks(ROWS * d))
        .zip(st.par_chunks_mut(ROWS))
        .for_each(|((y, x), st)| {
            for ((y, x), st) in y.chunks_mut(d).zip(x.chunks(d)).zip(st) {
                *st = stats(x, eps, center);
                norm_row(x, w, b, st.0, st.1, y);
            }
        });
    (y, st)
}

/// (dx, dw, db) — db empty when `center` is false (RMSNorm has no bias) — from the forward's
/// per-row statistics `st`.
fn backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    center: bool,
    st: &[(f32, f32)],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = w.len();
    let nb = if center { d } else { 0 };
    let mut dx = uninit(x.len());
    let rows = ROWS * 4;
    let chunk = rows * d;
    // Per-chunk partial sums, added in chunk order: the result does not depend on how rayon
    // splits the work (a fold/reduce would, and runs would differ in the last bits).
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
        .enumerate()
        .map(|(ci, (dx, (x, g)))| {
            let (mut dw, mut db) = (vec![0.0f32; d], vec![0.0f32; nb]);
            let rows_here = dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d));
            for (ri, ((dx, x), g)) in rows_here.enumerate() {
                let (mean, rstd) = st[ci * rows + ri];
                let dbr = if center { Some(&mut db[..]) } else { None };
                norm_row_bwd(x, w, g, mean, rstd, center, dx, &mut dw, dbr);
            }
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![0.0f32; d], vec![0.0f32; nb]);
    for (pw, pb) in &partials {
        dw.iter_mut().zip(pw).for_each(|(a, c)| *a += c);
        db.iter_mut().zip(pb).for_each(|(a, c)| *a += c);
    }
    (dx, dw, db)
}

fn check(xl: &Layout, wl: &Layout, op: &str) -> Result<()> {
    let d = *xl.dims().last().unwrap_or(&0);
    if wl.dims() != [d] {
        candle_core::bail!("{op}: weight {:?} for input {:?}", wl.dims(), xl.dims())
    }
    Ok(())
}

/// Each row's (mean, 1/std) from the forward, kept for the backward (8 bytes a row).
pub(super) type Saved = std::sync::Mutex<Option<Vec<(f32, f32)>>>;

/// The backward of a norm over `x`'s rows, on the statistics its forward saved.
fn backward_saved(
    saved: &Saved,
    (x, w, g): (&Tensor, &Tensor, &Tensor),
    center: bool,
    op: &str,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let guard = saved.lock().unwrap();
    let rows = x.elem_count() / w.elem_count().max(1);
    let Some(st) = guard.as_deref().filter(|st| st.len() == rows) else {
        candle_core::bail!("{op}: backward without the forward's statistics for {rows} rows")
    };
    with_f32(&[x, w, g], |s| backward(s[0], s[1], s[2], center, st))
}

/// A norm parameter's gradient for candle, or `None` when this thread's gradient sink took it.
fn param_grad(p: &Tensor, g: Vec<f32>) -> Result<Option<Tensor>> {
    sink::offer(p, g)
        .map(|g| Tensor::from_vec(g, p.shape(), p.device()))
        .transpose()
}

pub(super) struct LayerNorm(pub(super) f32, pub(super) Saved);

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        check(l1, l2, "layer_norm")?;
        check(l1, l3, "layer_norm")?;
        let (x, w, b) = (
            slice(s1, l1, "layer_norm")?,
            slice(s2, l2, "layer_norm")?,
            slice(s3, l3, "layer_norm")?,
        );
        let (y, st) = forward(x, w, Some(b), self.0, true);
        *self.1.lock().unwrap() = Some(st);
        out(y, l1.shape())
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = backward_saved(&self.1, (x, w, g), true, "layer_norm")?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            param_grad(w, dw)?,
            param_grad(b, db)?,
        ))
    }
}

pub(super) struct RmsNorm(pub(super) f32, pub(super) Saved);

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check(l1, l2, "rms_norm")?;
        let (x, w) = (slice(s1, l1, "rms_norm")?, slice(s2, l2, "rms_norm")?);
        let (y, st) = forward(x, w, None, self.0, false);
        *self.1.lock().unwrap() = Some(st);
        out(y, l1.shape())
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward_saved(&self.1, (x, w, g), false, "rms_norm")?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            param_grad(w, dw)?,
        ))
    }
}

pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm(eps as f32, Saved::default()),
    )
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm(eps as f32, Saved::default()))
}
