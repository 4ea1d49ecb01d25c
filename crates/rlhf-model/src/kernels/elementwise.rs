//! Fused element-wise activations with their backward: tanh-GELU (`gelu_new`), SiLU, SwiGLU.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{math, out, slice, uninit, with_f32};

const CHUNK: usize = 1 << 13;
const C0: f32 = 0.797_884_6; // sqrt(2/π)
const C1: f32 = 0.044_715;

crate::multiversion! {
    pub(super) fn gelu_fwd(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            let t = math::tanh(C0 * (x + C1 * x * x * x));
            *y = 0.5 * x * (1.0 + t);
        }
    }
}

crate::multiversion! {
    pub(super) fn gelu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let t = math::tanh(C0 * (x + C1 * x * x * x));
            let dt = (1.0 - t * t) * C0 * (1.0 + 3.0 * C1 * x * x);
            *d = g * (0.5 * (1.0 + t) + 0.5 * x * dt);
        }
    }
}

crate::multiversion! {
    fn silu_fwd(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * math::sigmoid(x);
        }
    }
}

crate::multiversion! {
    fn silu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let s = math::sigmoid(x);
            *d = g * s * (1.0 + x * (1.0 - s));
        }
    }
}

crate::multiversion! {
    pub(super) fn swiglu_fwd(a: &[f32], b: &[f32], y: &mut [f32]) {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = a * math::sigmoid(a) * b;
        }
    }
}

crate::multiversion! {
    /// d gate and d up of silu(gate)·up.
    fn swiglu_bwd(a: &[f32], b: &[f32], g: &[f32], da: &mut [f32], db: &mut [f32]) {
        for i in 0..a.len() {
            let (a, b, g) = (a[i], b[i], g[i]);
            let s = math::sigmoid(a);
            let silu = a * s;
            db[i] = g * silu;
            da[i] = g * b * s * (1.0 + a * (1.0 - s));
        }
    }
}

pub(super) fn unary(x: &[f32], f: fn(&[f32], &mut [f32])) -> Vec<f32> {
    let mut y = uninit(x.len());
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| f(x, y));
    y
}

pub(super) fn binary(a: &[f32], b: &[f32], f: fn(&[f32], &[f32], &mut [f32])) -> Vec<f32> {
    let mut y = uninit(a.len());
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(y, (a, b))| f(a, b, y));
    y
}

/// d gate and d up of `silu(a) · b` for the upstream gradient `g`, in parallel.
pub(super) fn swiglu_grads(a: &[f32], b: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut da, mut db) = (uninit(a.len()), uninit(a.len()));
    da.par_chunks_mut(CHUNK)
        .zip(db.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, (da, db))| {
            let r = c * CHUNK..c * CHUNK + da.len();
            swiglu_bwd(&a[r.clone()], &b[r.clone()], &g[r], da, db);
        });
    (da, db)
}

#[derive(Clone, Copy)]
enum Act {
    Gelu,
    Silu,
}

struct Unary(Act);

impl CustomOp1 for Unary {
    fn name(&self) -> &'static str {
        match self.0 {
            Act::Gelu => "gelu-tanh",
            Act::Silu => "silu",
        }
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let f = match self.0 {
            Act::Gelu => gelu_fwd,
            Act::Silu => silu_fwd,
        };
        out(unary(x, f), l.shape())
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &UnaryBwd(self.0),
        )?))
    }
}

struct UnaryBwd(Act);

impl CustomOp2 for UnaryBwd {
    fn name(&self) -> &'static str {
        "activation-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "activation-bwd")?;
        let g = slice(s2, l2, "activation-bwd")?;
        let f = match self.0 {
            Act::Gelu => gelu_bwd,
            Act::Silu => silu_bwd,
        };
        out(binary(x, g, f), l1.shape())
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = slice(s1, l1, "swiglu")?;
        let b = slice(s2, l2, "swiglu")?;
        if a.len() != b.len() {
            candle_core::bail!("swiglu: gate and up differ in size")
        }
        out(binary(a, b, swiglu_fwd), l1.shape())
    }
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = with_f32(&[gate, up, grad], |s| swiglu_grads(s[0], s[1], s[2]))?;
        Ok((
            Some(Tensor::from_vec(da, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(db, up.shape(), up.device())?),
        ))
    }
}

pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Unary(Act::Gelu))
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Unary(Act::Silu))
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        candle_core::bail!("swiglu: gate {:?} vs up {:?}", gate.shape(), up.shape())
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}
