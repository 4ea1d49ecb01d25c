//! The ops the architectures call. Each is a single entry point so that a fused CPU kernel with
//! its own backward can replace the composed version without touching the model files; every
//! replacement is tested against [`crate::ops`] (the composed reference) and finite differences.

use candle_core::{Result, Tensor};

use crate::ops;

pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    ops::layer_norm(x, w, b, eps)
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    ops::rms_norm(x, w, eps)
}

pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    ops::gelu_tanh(x)
}

/// SwiGLU: silu(gate) * up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    ops::rope(x, cos, sin)
}

pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    ops::attention(q, k, v, bias)
}

/// Per-token log-probabilities of `targets`: logits [n, V], targets [n] → [n].
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    ops::token_logprobs(logits, targets)
}
