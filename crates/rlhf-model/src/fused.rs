//! The ops the architectures call. Each is a single entry point so that a fused CPU kernel with
//! its own backward can replace the composed version without touching the model files; every
//! replacement is tested against [`crate::ops`] (the composed reference) and finite differences.
//!
//! f32 tensors on the CPU take the fused kernels in [`crate::kernels`]; anything else (f64 for
//! finite differences, other devices) takes the composed path.

use candle_core::{Result, Tensor};

use crate::kernels::{self, fusable};
use crate::ops;

/// `table[ids]` → `[ids.dims(), d]` (the token embedding).
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if fusable(&[table]) && table.rank() == 2 {
        return kernels::embed::embedding(table, ids);
    }
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    table.index_select(&ids.flatten_all()?, 0)?.reshape(shape)
}

/// `table[ids] + pos_table[pos]` → `[ids.dims(), d]` (GPT-2's token and position embedding),
/// one position per id in row-major order.
pub fn embedding_with_positions(
    table: &Tensor,
    ids: &Tensor,
    pos_table: &Tensor,
    pos: Vec<u32>,
) -> Result<Tensor> {
    if fusable(&[table, pos_table]) && table.rank() == 2 && pos_table.rank() == 2 {
        return kernels::embed::embedding_with_positions(table, ids, pos_table, pos);
    }
    let mut shape = ids.dims().to_vec();
    shape.push(table.dim(1)?);
    let n = pos.len();
    let pos = Tensor::from_vec(pos, n, ids.device())?;
    let tok = table.index_select(&ids.flatten_all()?, 0)?;
    (tok + pos_table.index_select(&pos, 0)?)?.reshape(shape)
}

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

/// Rotate-half RoPE on `[b, h, t, d]` (any strides; the fused kernel reads a transposed view in
/// place) → contiguous `[b, h, t, d]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_heads(x, Heads::Split, cos, sin)
}

/// [`rope`] on `x` holding its heads as `form` says: a projection's `[b, t, h·d]` output
/// (`Merged(h)`) is read in place, with no reshape or transpose node → `[b, h, t, d]`.
pub fn rope_heads(x: &Tensor, form: Heads, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fusable(&[x, cos, sin]) && cos.rank() == 4 {
        return kernels::rope::rope(x, form, cos, sin);
    }
    ops::rope(&split_heads(x, form)?, cos, sin)
}

pub use crate::kernels::attention::Heads;

/// Attention; k/v may have fewer heads than q (grouped-query attention: the fused kernel reads
/// each kv head for its group of query heads, the composed path repeats them).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let s = Heads::Split;
    attention_forms((q, s), (k, s), (v, s), bias, s)
}

/// `[b, t, h·d]` → `[b, h, t, d]` (`Merged`), or as is (`Split`): the composed path's view.
fn split_heads(x: &Tensor, form: Heads) -> Result<Tensor> {
    match form {
        Heads::Split => Ok(x.clone()),
        Heads::Merged(h) => {
            let (b, t, w) = x.dims3()?;
            x.reshape((b, t, h, w / h))?.transpose(1, 2)
        }
    }
}

/// Attention with each of q/k/v holding its heads as its [`Heads`] says — a projection's
/// `[b, t, h·d]` output is read in place, no reshape or transpose node — and the output
/// `[b, h, tq, d]` (`out` = `Split`) or `[b, tq, h·d]` (`Merged(h)`, ready for the output
/// projection).
pub fn attention_forms(
    q: (&Tensor, Heads),
    k: (&Tensor, Heads),
    v: (&Tensor, Heads),
    bias: &Tensor,
    out: Heads,
) -> Result<Tensor> {
    if fusable(&[q.0, k.0, v.0, bias]) && bias.rank() == 4 {
        return kernels::attention::attention_forms(q, k, v, bias, out);
    }
    let (q, k, v) = (
        split_heads(q.0, q.1)?,
        split_heads(k.0, k.1)?,
        split_heads(v.0, v.1)?,
    );
    let rep = q.dim(1)? / k.dim(1)?;
    let y = ops::attention(
        &q,
        &ops::repeat_kv(&k, rep)?,
        &ops::repeat_kv(&v, rep)?,
        bias,
    )?;
    match out {
        Heads::Split => Ok(y),
        Heads::Merged(_) => {
            let (b, h, t, d) = y.dims4()?;
            y.transpose(1, 2)?.reshape((b, t, h * d))
        }
    }
}

/// Attention on a packed projection `[b, t, (h + 2·hk)·d]` (q heads, then k, then v: GPT-2's
/// c_attn output) → `[b, t, h·d]`, without splitting it into graph nodes.
pub fn attention_packed(qkv: &Tensor, h: usize, hk: usize, bias: &Tensor) -> Result<Tensor> {
    if fusable(&[qkv, bias]) && bias.rank() == 4 {
        return kernels::attention::attention_packed(qkv, h, hk, bias);
    }
    let (_, _, w) = qkv.dims3()?;
    let d = w / (h + 2 * hk);
    let part = |first: usize, n: usize| qkv.narrow(2, first * d, n * d);
    let m = Heads::Merged;
    attention_forms(
        (&part(0, h)?, m(h)),
        (&part(h, hk)?, m(hk)),
        (&part(h + hk, hk)?, m(hk)),
        bias,
        m(h),
    )
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
    if head_fusable(hidden, weight, targets) {
        return kernels::head::head_logprobs(hidden, weight, targets, scale).map(Some);
    }
    Ok(None)
}

/// Whether the fused head ops take these operands.
fn head_fusable(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> bool {
    fusable(&[hidden, weight])
        && hidden.rank() == 2
        && weight.rank() == 2
        && targets.dtype() == candle_core::DType::U32
}

/// [`head_logprobs`] with each row's entropy: [n, 2] (log p(target), H) under
/// `softmax(hidden · weightᵀ · scale)`, both differentiable; `None` when not fusable.
pub fn head_logprobs_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    if head_fusable(hidden, weight, targets) {
        return kernels::head::head_logprobs_entropy(hidden, weight, targets, scale).map(Some);
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
