//! Rotate-half RoPE, fused forward and backward. The input may be a strided view — the usual
//! `[b, t, h, d] → [b, h, t, d]` transpose of a projection — and is read in place; the output
//! is contiguous `[b, h, t, d]`, so the transpose's copy and the composed version's five
//! temporaries (two halves, a negation, a concatenation, two products) all disappear.
//!
//! `y = x·cos + rot(x)·sin` with `rot(x) = [−x₂, x₁]`; the backward is its transpose:
//! `dx = g·cos + rotᵀ(g·sin)`, `rotᵀ(u) = [u₂, −u₁]`. cos/sin are constants (no gradient).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{out, uninit, with_f32};

struct Rope {
    /// [b, 1, t, d] each, contiguous.
    cos: Tensor,
    sin: Tensor,
}

/// One row: `y = x·c + rot(x)·s` (`back`: `y = x·c + rotᵀ(x·s)`).
#[inline(always)]
fn row(x: &[f32], c: &[f32], s: &[f32], y: &mut [f32], back: bool) {
    let h = x.len() / 2;
    let (x1, x2) = x.split_at(h);
    let (y1, y2) = y.split_at_mut(h);
    let (c1, c2) = c.split_at(h);
    let (s1, s2) = s.split_at(h);
    if back {
        for i in 0..h {
            y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
            y2[i] = x2[i] * c2[i] - x1[i] * s1[i];
        }
    } else {
        for i in 0..h {
            y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
            y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
        }
    }
}

crate::multiversion! {
    /// All rows of one (batch, head) pair; `x` starts at the pair, rows `xs` apart.
    fn pair(x: &[f32], xs: usize, c: &[f32], s: &[f32], y: &mut [f32], d: usize, back: bool) {
        for (ti, yr) in y.chunks_mut(d).enumerate() {
            let o = ti * d;
            row(&x[ti * xs..ti * xs + d], &c[o..o + d], &s[o..o + d], yr, back);
        }
    }
}

fn run(
    x: &[f32],
    strides: [usize; 3],
    dims: (usize, usize, usize, usize),
    cos: &[f32],
    sin: &[f32],
    back: bool,
) -> Vec<f32> {
    let (b, h, t, d) = dims;
    let mut y = uninit(b * h * t * d);
    if d == 0 || t == 0 {
        return y;
    }
    y.par_chunks_mut(t * d).enumerate().for_each(|(p, y)| {
        let (bi, hi) = (p / h, p % h);
        let base = bi * strides[0] + hi * strides[1];
        let tab = bi * t * d..(bi + 1) * t * d;
        pair(
            &x[base..],
            strides[2],
            &cos[tab.clone()],
            &sin[tab],
            y,
            d,
            back,
        )
    });
    y
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("rope: f32 only")
        };
        let (b, h, t, d) = l.shape().dims4()?;
        let st = l.stride();
        if st[3] != 1 && d > 1 {
            candle_core::bail!("rope: the last dimension must be contiguous")
        }
        let x = &data[l.start_offset()..];
        let y = with_f32(&[&self.cos, &self.sin], |cs| {
            run(x, [st[0], st[1], st[2]], (b, h, t, d), cs[0], cs[1], false)
        })?;
        out(y, l.shape())
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (b, h, t, d) = x.dims4()?;
        let dx = with_f32(&[g, &self.cos, &self.sin], |v| {
            run(v[0], [h * t * d, t * d, d], (b, h, t, d), v[1], v[2], true)
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Fused rotate-half RoPE: `x` [b, h, t, d] (any strides with a contiguous last dimension),
/// `cos`/`sin` [b, 1, t, d] → contiguous [b, h, t, d].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, d) = x.dims4()?;
    if cos.dims() != [b, 1, t, d] || sin.dims() != [b, 1, t, d] || d % 2 != 0 {
        candle_core::bail!(
            "rope: x {:?}, cos {:?}, sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    let x = if x.stride()[3] == 1 || d == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    x.apply_op1(Rope {
        cos: cos.contiguous()?.detach(),
        sin: sin.contiguous()?.detach(),
    })
}
