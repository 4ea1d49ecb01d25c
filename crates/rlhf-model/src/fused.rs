//! The ops the architectures call. Each is a single entry point so that a fused CPU kernel with
//! its own backward can replace the composed version without touching the model files; every
//! replacement is tested against [`crate::ops`] (the composed reference) and finite differences.
//!
//! f32 tensors on the CPU take the fused kernels in [`crate::kernels`]; anything else (f64 for
//! finite differences, other devices) takes the composed path.

use candle_core::{Result, Tensor};

use crate::kernels::{self, fusable};
use crate::ops;

pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(&[x, w, b]) && w.rank() == 1 && b.rank() == 1 {
        return kernels::norm::layer_norm(x, w, b, eps);
    }
    ops::layer_norm(x, w, b, eps)
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(&[x, w]) && w.rank() == 1 {
        return kernels::norm::rms_norm(x, w, eps);
    }
    ops::rms_norm(x, w, eps)
}

pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fusable(&[x]) {
        return kernels::elementwise::gelu_tanh(x);
    }
    ops::gelu_tanh(x)
}

/// SwiGLU: silu(gate) * up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fusable(&[gate, up]) && gate.shape() == up.shape() {
        return kernels::elementwise::swiglu(gate, up);
    }
    gate.silu()? * up
}

/// Rotate-half RoPE; the fused kernel reads a transposed view in place and returns it
/// contiguous.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fusable(&[x, cos, sin]) && x.rank() == 4 && cos.rank() == 4 {
        return kernels::rope::rope(x, cos, sin);
    }
    ops::rope(x, cos, sin)
}

/// Attention; k/v may have fewer heads than q (grouped-query attention: the fused kernel reads
/// each kv head for its group of query heads, the composed path repeats them).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fusable(&[q, k, v, bias]) && q.rank() == 4 && bias.rank() == 4 {
        return kernels::attention::attention(q, k, v, bias);
    }
    let rep = q.dim(1)? / k.dim(1)?;
    ops::attention(q, &ops::repeat_kv(k, rep)?, &ops::repeat_kv(v, rep)?, bias)
}

/// Per-token log-probabilities of `targets`: logits [n, V], targets [n] → [n].
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fusable(&[logits])
        && logits.rank() == 2
        && targets.dtype() == candle_core::DType::U32
        && targets.rank() == 1
    {
        return kernels::logprobs::token_logprobs(logits, targets);
    }
    ops::token_logprobs(logits, targets)
}

/// LM head + log-softmax + gather in one op: hidden [n, d], head weight [V, d] (the HF layout),
/// targets [n] u32 → log p(target) [n] under `softmax(hidden · weightᵀ · scale)`. `None` when
/// the inputs are not fusable (the caller then computes logits and [`token_logprobs`]).
pub fn head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    if fusable(&[hidden, weight])
        && hidden.rank() == 2
        && weight.rank() == 2
        && targets.dtype() == candle_core::DType::U32
    {
        return kernels::head::head_logprobs(hidden, weight, targets, scale).map(Some);
    }
    Ok(None)
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fusable(&[x]) && x.rank() >= 1 && x.elem_count() > 0 {
        return kernels::softmax::softmax_last(x);
    }
    ops::softmax_last(x)
}
