//! Differentiable building blocks, composed from candle primitives that all have a backward pass.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm`, `rope*` and `sdpa` drop gradients
//! silently, so nothing here calls them. These composed versions are the reference that the fused
//! kernels in [`crate::fused`] are tested against.

use candle_core::{DType, Device, Result, Tensor, D};

/// Softmax over the last dimension. The max is detached: softmax is shift-invariant, so the
/// gradient is exact.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&m)?;
    let lse = s.exp()?.sum_keepdim(D::Minus1)?.log()?;
    s.broadcast_sub(&lse)
}

/// RMSNorm (Llama): `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

/// LayerNorm (GPT-2): biased variance, affine.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    xc.broadcast_mul(&inv)?.broadcast_mul(w)?.broadcast_add(b)
}

/// tanh-approximated GELU (`gelu_new`), differentiable in candle.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// Rotate-half RoPE. `x`: [b, h, t, d]; `cos`, `sin`: [b, 1, t, d] (halves duplicated).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)?.add(&rot.broadcast_mul(sin)?)
}

/// cos/sin tables for rotate-half RoPE at given positions: returns two [b, 1, t, d] tensors.
pub fn rope_tables(
    positions: &[Vec<u32>],
    head_dim: usize,
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let b = positions.len();
    let t = positions.first().map(|p| p.len()).unwrap_or(0);
    let half = head_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(b * t * head_dim);
    let mut sin = Vec::with_capacity(b * t * head_dim);
    let (mut c, mut s) = (vec![0.0f32; half], vec![0.0f32; half]);
    for row in positions {
        for &p in row {
            for (i, f) in inv_freq.iter().enumerate() {
                // HF computes freqs in f32: match it so long positions agree to 1e-5.
                let a = (p as f32) * (*f as f32);
                (s[i], c[i]) = a.sin_cos();
            }
            // The two halves of the head share their frequencies.
            cos.extend_from_slice(&c);
            cos.extend_from_slice(&c);
            sin.extend_from_slice(&s);
            sin.extend_from_slice(&s);
        }
    }
    let cos = Tensor::from_vec(cos, (b, 1, t, head_dim), device)?;
    let sin = Tensor::from_vec(sin, (b, 1, t, head_dim), device)?;
    Ok((cos, sin))
}

/// Repeat k/v heads for grouped-query attention: [b, kvh, t, d] → [b, kvh·n_rep, t, d].
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kvh, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kvh, n_rep, t, d))?
        .reshape((b, kvh * n_rep, t, d))
}

/// Scaled dot-product attention with an additive bias. q: [b,h,tq,d], k/v: [b,h,tk,d],
/// bias: [b,1,tq,tk] (0 or a large negative number).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(bias)?;
    let p = softmax_last(&scores)?;
    p.matmul(&v.contiguous()?)
}

/// The value used for masked attention scores: finite, so fully-masked (padding) rows stay NaN-free.
pub const MASKED: f32 = -1e9;

/// Additive attention bias [b, 1, tq, tk] for queries at sequence slots `offset..offset+tq` over
/// keys at slots `0..tk`: a key is visible when it is not padding and not in the future.
///
/// Mask values: 0 = padding; any other value is a segment id. A real query sees only keys of
/// its own segment, so several examples packed into one row never attend to each other
/// (an ordinary row has a single segment, 1).
pub fn attention_bias(
    mask: &[Vec<u8>],
    offset: usize,
    tq: usize,
    device: &Device,
) -> Result<Tensor> {
    let b = mask.len();
    let tk = mask.first().map(|m| m.len()).unwrap_or(0);
    let mut v = vec![0f32; b * tq * tk];
    for (r, m) in mask.iter().enumerate() {
        for i in 0..tq {
            let qpos = offset + i;
            let seg = m.get(qpos).copied().unwrap_or(0);
            let row = &mut v[(r * tq + i) * tk..(r * tq + i + 1) * tk];
            for (j, x) in row.iter_mut().enumerate() {
                if j > qpos || m[j] == 0 || (seg != 0 && m[j] != seg) {
                    *x = MASKED;
                }
            }
        }
    }
    Tensor::from_vec(v, (b, 1, tq, tk), device)
}

/// Position ids from a padding mask: each real token's position counts the real tokens of its
/// segment before it (so left-padded prompts start at position 0, as in transformers'
/// `generate`, and each packed example restarts at 0). Pads get 0.
pub fn positions_from_mask(mask: &[Vec<u8>]) -> Vec<Vec<u32>> {
    mask.iter()
        .map(|m| {
            let (mut c, mut seg) = (0u32, 0u8);
            m.iter()
                .map(|&x| {
                    if x != 0 {
                        if x != seg {
                            (c, seg) = (0, x);
                        }
                        c += 1;
                        c - 1
                    } else {
                        0
                    }
                })
                .collect()
        })
        .collect()
}

/// One prompt group of a shared-prompt batch: `prompt` tokens, then each response's tokens in
/// turn. Each response attends to the prompt and to itself, never to another response, and its
/// positions continue the prompt's, so its hidden states equal those of the row prompt +
/// response alone, while the prompt is computed once for all of them. A batch row holds one or
/// more groups back to back (the rest is padding); a group attends to itself only, with
/// positions from its own start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixRow {
    pub prompt: usize,
    /// Lengths of the responses, in the order they follow the prompt.
    pub responses: Vec<usize>,
}

impl PrefixRow {
    /// Real tokens in the group.
    pub fn len(&self) -> usize {
        self.prompt + self.responses.iter().sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slot of response `k`'s first token, from the group's start.
    pub fn response_start(&self, k: usize) -> usize {
        self.prompt + self.responses[..k].iter().sum::<usize>()
    }

    /// Per slot of the group placed at `out` (its start): `Some((position, first visible
    /// response slot))`, slots counted from the group's start (prompt tokens see from the start
    /// only, so their second value is past the group's end).
    fn fill(&self, out: &mut [Option<(u32, usize)>]) {
        let end = self.len();
        for (s, o) in out.iter_mut().enumerate().take(self.prompt) {
            *o = Some((s as u32, end));
        }
        let mut a = self.prompt;
        for &len in &self.responses {
            for (j, o) in out[a..a + len].iter_mut().enumerate() {
                *o = Some(((self.prompt + j) as u32, a));
            }
            a += len;
        }
    }
}

/// What a forward over a batch of [`PrefixRow`]s needs besides the ids.
pub struct PrefixInputs {
    /// Padding mask (1 = real).
    pub mask: Vec<Vec<u8>>,
    pub positions: Vec<Vec<u32>>,
    /// Additive attention bias `[b, 1, t, t]`.
    pub bias: Tensor,
}

/// The [`PrefixInputs`] of a batch of rows of [`PrefixRow`] groups (each row's groups back to
/// back), padded to width `t`.
pub fn prefix_rows_inputs(
    rows: &[Vec<PrefixRow>],
    t: usize,
    device: &Device,
) -> Result<PrefixInputs> {
    let mut mask = Vec::with_capacity(rows.len());
    let mut positions = Vec::with_capacity(rows.len());
    let mut bias = vec![MASKED; rows.len() * t * t];
    for (r, groups) in rows.iter().enumerate() {
        let len: usize = groups.iter().map(PrefixRow::len).sum();
        if len > t {
            candle_core::bail!("prefix row of {len} tokens in a batch of width {t}")
        }
        let mut slots = vec![None; t];
        let mut o = 0;
        for g in groups {
            g.fill(&mut slots[o..o + g.len()]);
            for (i, slot) in slots[o..o + g.len()].iter().enumerate() {
                let Some((_, from)) = *slot else { continue };
                let b = &mut bias[(r * t + o + i) * t..(r * t + o + i + 1) * t];
                b[o..o + g.prompt.min(i + 1)].fill(0.0);
                if from <= i {
                    b[o + from..=o + i].fill(0.0);
                }
            }
            o += g.len();
        }
        mask.push(slots.iter().map(|s| s.is_some() as u8).collect());
        positions.push(slots.iter().map(|s| s.map_or(0, |(p, _)| p)).collect());
    }
    let bias = Tensor::from_vec(bias, (rows.len(), 1, t, t), device)?;
    Ok(PrefixInputs {
        mask,
        positions,
        bias,
    })
}

/// Log-probabilities of `targets` under `logits`: logits [n, V], targets [n] (u32) → [n].
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = log_softmax_last(logits)?;
    lp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
}

/// Entropy of the distribution per row: logits [n, V] → [n].
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let lp = log_softmax_last(logits)?;
    let p = lp.exp()?;
    (p * lp)?.sum(D::Minus1)?.neg()
}

/// Masked mean of `x` (any shape) with a 0/1 mask of the same shape.
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?;
    let n = mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
    (x * mask)?.sum_all()? / n as f64
}
