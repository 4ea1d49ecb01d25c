//! Softmax over the last dimension, fused forward and backward
//! (`dx = y · (g − Σ g·y)`, from the saved output).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{math, out, slice, uninit, with_f32};

const ROWS: usize = 8;

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "softmax")?;
        let d = *l.dims().last().unwrap_or(&1);
        let mut y = uninit(x.len());
        if d > 0 {
            y.par_chunks_mut(ROWS * d)
                .zip(x.par_chunks(ROWS * d))
                .for_each(|(y, x)| {
                    for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                        let m = math::max(x);
                        let inv = 1.0 / math::exp_sub_sum(x, m, y);
                        y.iter_mut().for_each(|v| *v *= inv);
                    }
                });
        }
        out(y, l.shape())
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let d = *y.dims().last().unwrap_or(&1);
        let mut dx = uninit(y.elem_count());
        with_f32(&[y, g], |t| {
            let (y, g) = (t[0], t[1]);
            dx.par_chunks_mut(ROWS * d)
                .zip(y.par_chunks(ROWS * d).zip(g.par_chunks(ROWS * d)))
                .for_each(|(dx, (y, g))| {
                    for ((dx, y), g) in dx.chunks_mut(d).zip(y.chunks(d)).zip(g.chunks(d)) {
                        let s: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                        for i in 0..d {
                            dx[i] = y[i] * (g[i] - s);
                        }
                    }
                });
        })?;
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}

/// Fused softmax over the last dimension (f32, CPU).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}
