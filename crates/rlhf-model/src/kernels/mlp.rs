//! The MLP's products and activation as one op each, with backward:
//!
//! - [`linear_gelu`]: GPT-2's `gelu_tanh(x · W + b)` (`c_fc` and its activation);
//! - [`swiglu_mlp`]: Llama's `silu(x · W_gateᵀ) ⊙ (x · W_upᵀ)` (`gate_proj`, `up_proj` and the
//!   activation).
//!
//! As separate ops, each pre-activation is a graph node of its own: candle's backward zero-fills
//! a gradient buffer for it and adds the activation's gradient into it, a [tokens × MLP width]
//! pass each, on one core. Fused, the op keeps its pre-activations for its own backward (the
//! same memory the graph kept before) and the activation's gradient goes straight into the
//! products. For SwiGLU the input's gradient is also one buffer: the up product accumulates onto
//! the gate product's, where the separate ops gave candle two gradients of `x` to add.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::elementwise::{binary, gelu_bwd, gelu_fwd, swiglu_fwd, swiglu_grads, unary};
use super::gemm::{mat, sgemm};
use super::matmul::{linear_fwd, rows_k, LinearBias, Onto};
use super::{out, sink, uninit, with_f32};

fn into_vec(s: CpuStorage) -> Result<Vec<f32>> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("fused MLP: f32 only"),
    }
}

/// `gelu_tanh(x · W + b)`; keeps the pre-activation for the backward when `save`.
pub(super) struct LinearGelu {
    pub(super) transposed: bool,
    pub(super) save: bool,
    pub(super) pre: Mutex<Option<Vec<f32>>>,
}

impl LinearGelu {
    /// The pre-activation's gradient for upstream `g` of the activation.
    pub(super) fn pre_grad(&self, g: &Tensor) -> Result<Vec<f32>> {
        let pre = self.pre.lock().expect("linear-gelu state");
        let Some(u) = pre.as_ref() else {
            candle_core::bail!("linear-gelu: backward of a forward run without gradients")
        };
        with_f32(&[g], |s| binary(u, s[0], gelu_bwd))
    }

    /// (dx, dW, db) for upstream `g` of the activation (shaped like the output), each only when
    /// wanted (`bwd` wants those whose tensor tracks gradients).
    pub(super) fn grads(
        &self,
        (x, w, b): (&Tensor, &Tensor, &Tensor),
        g: &Tensor,
        wants: (bool, bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gu = Tensor::from_vec(self.pre_grad(g)?, g.shape(), g.device())?;
        // The product's gradients at the pre-activation's gradient.
        let product = LinearBias {
            transposed: self.transposed,
        };
        product.grads((x, w, b), &gu, wants)
    }
}

impl CustomOp3 for LinearGelu {
    fn name(&self) -> &'static str {
        "linear-gelu"
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
        let (u, shape) = linear_fwd(s1, l1, s2, l2, Onto::Bias(s3, l3), self.transposed)?;
        let u = into_vec(u)?;
        let y = unary(&u, gelu_fwd);
        if self.save {
            *self.pre.lock().expect("linear-gelu state") = Some(u);
        }
        out(y, &shape)
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

/// `gelu_tanh(x [..., k] · W + b) → [..., n]`, W [k, n] (`transposed`) or [n, k], bias [n]
/// (f32, CPU): one op for the product, the bias and the activation.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: &Tensor, transposed: bool) -> Result<Tensor> {
    let op = LinearGelu {
        transposed,
        save: x.track_op() || w.track_op() || b.track_op(),
        pre: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// `silu(x · W_gateᵀ) ⊙ (x · W_upᵀ)` with HF [inner, d] weights; keeps both pre-activations for
/// the backward when `save`.
pub(super) struct SwiGluMlp {
    pub(super) save: bool,
    pub(super) pre: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl SwiGluMlp {
    /// The pre-activations' gradients (d gate, d up) for upstream `g` of the activation.
    pub(super) fn pre_grads(&self, g: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
        let pre = self.pre.lock().expect("swiglu-mlp state");
        let Some((a, b)) = pre.as_ref() else {
            candle_core::bail!("swiglu-mlp: backward of a forward run without gradients")
        };
        with_f32(&[g], |s| swiglu_grads(a, b, s[0]))
    }

    /// (dx, dW_gate, dW_up) for upstream `g`, each only when wanted (`bwd` wants those whose
    /// tensor tracks gradients; [`super::block`] says which itself). Weight gradients go to
    /// this thread's gradient sink where it holds them.
    #[allow(clippy::type_complexity)]
    pub(super) fn grads(
        &self,
        (x, wg, wu): (&Tensor, &Tensor, &Tensor),
        g: &Tensor,
        wants: (bool, bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, db) = self.pre_grads(g)?;
        let (dx, dwg, dwu) = swiglu_product_grads((x, wg, wu), (&da, &db), wants)?;
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
            .transpose()?;
        Ok((dx, dwg, dwu))
    }
}

/// The gradients of SwiGLU's two products `a = x · W_gateᵀ`, `b = x · W_upᵀ` at their
/// gradients `(da, db)`: dx (a vector shaped like `x`) and dW_gate, dW_up (into this thread's
/// gradient sink where it holds them, `None` then), each only when wanted.
#[allow(clippy::type_complexity)]
pub(super) fn swiglu_product_grads(
    (x, wg, wu): (&Tensor, &Tensor, &Tensor),
    (da, db): (&[f32], &[f32]),
    (want_x, want_g, want_u): (bool, bool, bool),
) -> Result<(Option<Vec<f32>>, Option<Tensor>, Option<Tensor>)> {
    let (m, d) = rows_k(x.dims())?;
    let i = wg.dim(0)?;
    if da.len() != m * i || db.len() != m * i || wu.dim(0)? != i {
        candle_core::bail!(
            "swiglu-mlp: x {:?}, gate {:?}, up {:?}",
            x.dims(),
            wg.dims(),
            wu.dims()
        )
    }
    let r = with_f32(&[x, wg, wu], |s| {
        let (xs, wgs, wus) = (s[0], s[1], s[2]);
        let wrow = |data| mat(data, d, 1);
        // dx = da · W_gate + db · W_up: the second product accumulates onto the first.
        let dx = want_x.then(|| {
            let mut dx = uninit(m * d);
            sgemm(m, d, i, mat(da, i, 1), wrow(wgs), &mut dx, false);
            sgemm(m, d, i, mat(db, i, 1), wrow(wus), &mut dx, true);
            dx
        });
        // dW = daᵀ · x, [inner, d].
        let dw = |want: bool, w: &Tensor, dz: &[f32]| {
            if !want {
                return None;
            }
            sink::weight_grad(w, i * d, |dw, acc| {
                sgemm(i, d, m, mat(dz, 1, i), wrow(xs), dw, acc)
            })
        };
        (dx, dw(want_g, wg, da), dw(want_u, wu, db))
    })?;
    let dev = x.device();
    Ok((
        r.0,
        r.1.map(|v| Tensor::from_vec(v, wg.shape(), dev))
            .transpose()?,
        r.2.map(|v| Tensor::from_vec(v, wu.shape(), dev))
            .transpose()?,
    ))
}

impl CustomOp3 for SwiGluMlp {
    fn name(&self) -> &'static str {
        "swiglu-mlp"
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
        if l2.dims() != l3.dims() {
            candle_core::bail!("swiglu-mlp: gate {:?} vs up {:?}", l2.dims(), l3.dims())
        }
        let (a, shape) = linear_fwd(s1, l1, s2, l2, Onto::Zero, false)?;
        let (b, _) = linear_fwd(s1, l1, s3, l3, Onto::Zero, false)?;
        let (a, b) = (into_vec(a)?, into_vec(b)?);
        let y = binary(&a, &b, swiglu_fwd);
        if self.save {
            *self.pre.lock().expect("swiglu-mlp state") = Some((a, b));
        }
        out(y, &shape)
    }
    fn bwd(
        &self,
        x: &Tensor,
        wg: &Tensor,
        wu: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wants = (x.track_op(), wg.track_op(), wu.track_op());
        self.grads((x, wg, wu), g, wants)
    }
}

/// `silu(x · W_gateᵀ) ⊙ (x · W_upᵀ)` for `x [..., d]` and HF weights [inner, d] (f32, CPU) →
/// `[..., inner]`: one op for both products and the activation.
pub fn swiglu_mlp(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<Tensor> {
    let op = SwiGluMlp {
        save: x.track_op() || w_gate.track_op() || w_up.track_op(),
        pre: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&w_gate.contiguous()?, &w_up.contiguous()?, op)
}
