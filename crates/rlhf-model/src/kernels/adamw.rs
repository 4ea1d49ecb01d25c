//! Fused AdamW update (PyTorch semantics, decoupled weight decay): one pass over the parameter,
//! its gradient and both moments, in place, parallel over chunks.

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

use super::slice;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// First and second moments of one parameter, and its step count.
#[derive(Debug, Clone, Default)]
pub struct AdamWState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u64,
}

impl AdamWState {
    pub fn new(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        }
    }
}

struct Op<'a> {
    m: std::sync::Mutex<&'a mut [f32]>,
    v: std::sync::Mutex<&'a mut [f32]>,
    k: Coef,
}

#[derive(Clone, Copy)]
struct Coef {
    decay: f32,
    b1: f32,
    b2: f32,
    step: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
}

crate::multiversion! {
    fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: Coef) {
        let (a1, a2) = (1.0 - k.b1, 1.0 - k.b2);
        for i in 0..p.len() {
            let gi = g[i];
            let mi = k.b1 * m[i] + a1 * gi;
            let vi = k.b2 * v[i] + a2 * gi * gi;
            m[i] = mi;
            v[i] = vi;
            p[i] = p[i] * k.decay - k.step * mi / (vi.sqrt() * k.inv_bc2_sqrt + k.eps);
        }
    }
}

impl InplaceOp2 for Op<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = slice(s2, l2, "adamw")?;
        let (a, b) = l1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adamw: parameter not contiguous".into()))?;
        let CpuStorage::F32(p) = s1 else {
            candle_core::bail!("adamw: f32 only")
        };
        let p = &mut p[a..b];
        let mut m = self.m.lock().unwrap();
        let mut v = self.v.lock().unwrap();
        if p.len() != g.len() || m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!("adamw: size mismatch")
        }
        const CH: usize = 1 << 14;
        p.par_chunks_mut(CH)
            .zip(g.par_chunks(CH))
            .zip(m.par_chunks_mut(CH))
            .zip(v.par_chunks_mut(CH))
            .for_each(|(((p, g), m), v)| update(p, g, m, v, self.k));
        Ok(())
    }
}

/// One AdamW step on `param` (a contiguous f32 `Var` tensor, updated in place) with gradient
/// `grad`; `state` holds the moments (zeros at first) and counts steps.
pub fn adamw_step(param: &Tensor, grad: &Tensor, state: &mut AdamWState, hp: &AdamW) -> Result<()> {
    state.step += 1;
    let t = state.step as i32;
    let bc1 = 1.0 - hp.beta1.powi(t);
    let bc2 = 1.0 - hp.beta2.powi(t);
    let k = Coef {
        decay: (1.0 - hp.lr * hp.weight_decay) as f32,
        b1: hp.beta1 as f32,
        b2: hp.beta2 as f32,
        step: (hp.lr / bc1) as f32,
        inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
        eps: hp.eps as f32,
    };
    let grad = grad.contiguous()?;
    let n = param.elem_count();
    if state.m.len() != n {
        state.m = vec![0.0; n];
        state.v = vec![0.0; n];
    }
    let op = Op {
        m: std::sync::Mutex::new(&mut state.m),
        v: std::sync::Mutex::new(&mut state.v),
        k,
    };
    param.inplace_op2(&grad, &op)
}
