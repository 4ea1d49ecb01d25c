//! The Llama family (Llama, SmolLM2, Mistral-style GQA, Qwen2): RMSNorm, rotate-half RoPE with
//! `rope_theta`, grouped-query attention, SwiGLU MLP, optional tied embeddings. Qwen2 differs
//! only by a bias on q/k/v.

use anyhow::Result;
use candle_core::Tensor;

use crate::backbone::{Backbone, Ctx, KvCache};
use crate::config::{Family, LlamaConfig};
use crate::fused::Heads;
use crate::kernels::block::recomputes;
use crate::linear::Linear;
use crate::ops;
use crate::params::Param;
use crate::weights::{Builder, Init};

fn linear(b: &mut Builder, name: &str, din: usize, dout: usize, bias: bool) -> Result<Linear> {
    let w = b.param(&format!("{name}.weight"), &[dout, din], Init::Normal(0.02))?;
    let bias = if bias {
        Some(b.param(&format!("{name}.bias"), &[dout], Init::Zeros)?)
    } else {
        None
    };
    Ok(Linear::new(name, w, bias, false))
}

struct Layer {
    input_norm: Param,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Param,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    /// The layer in training as one graph node ([`crate::kernels::block::llama_block`]), when
    /// every trained tensor's gradient goes to this thread's gradient sink and every
    /// projection is an HF linear on the fused path (biases only on q/k/v; adapters on any,
    /// their dropout masks drawn here as the composed layer draws them); `None` otherwise.
    /// `recompute`: it keeps its input, not its activations (gradient checkpointing).
    fn fused_train(
        &self,
        x: &Tensor,
        heads: (usize, usize),
        eps: f64,
        rope: (&Tensor, &Tensor),
        bias: &Tensor,
        recompute: bool,
    ) -> Result<Option<Tensor>> {
        use crate::kernels::block::LlamaBlockWeights;
        let linears = [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ];
        let [Some(q), Some(k), Some(v), Some(o), Some(gate), Some(up), Some(down)] =
            linears.map(|l| l.block_parts(x, false))
        else {
            return Ok(None);
        };
        let mut w = LlamaBlockWeights {
            input_norm: self.input_norm.t(),
            q,
            k,
            v,
            o,
            post_norm: self.post_norm.t(),
            gate,
            up,
            down,
        };
        if !w.applies(x) {
            return Ok(None);
        }
        // Dropout masks only now that the block runs (the composed layer would draw them).
        for (l, part) in linears.iter().zip(w.projections_mut()) {
            if let Some(lw) = &mut part.lora {
                lw.mask = l.adapter_mask(x);
            }
        }
        Ok(crate::kernels::block::llama_block(
            x, w, heads, eps, rope, bias, recompute,
        )?)
    }
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Param,
    layers: Vec<Layer>,
    norm: Param,
}

impl Llama {
    pub fn new(cfg: &LlamaConfig, family: Family, b: &mut Builder) -> Result<Self> {
        let d = cfg.hidden_size;
        let hd = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
        let qkv_bias = family == Family::Qwen2 || cfg.attention_bias;
        let o_bias = family != Family::Qwen2 && cfg.attention_bias;
        let embed = b.param(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, d],
            Init::Normal(0.02),
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: b.param(&format!("{p}.input_layernorm.weight"), &[d], Init::Ones)?,
                q: linear(b, &format!("{p}.self_attn.q_proj"), d, nh * hd, qkv_bias)?,
                k: linear(b, &format!("{p}.self_attn.k_proj"), d, nkv * hd, qkv_bias)?,
                v: linear(b, &format!("{p}.self_attn.v_proj"), d, nkv * hd, qkv_bias)?,
                o: linear(b, &format!("{p}.self_attn.o_proj"), nh * hd, d, o_bias)?,
                post_norm: b.param(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[d],
                    Init::Ones,
                )?,
                gate: linear(
                    b,
                    &format!("{p}.mlp.gate_proj"),
                    d,
                    cfg.intermediate_size,
                    false,
                )?,
                up: linear(
                    b,
                    &format!("{p}.mlp.up_proj"),
                    d,
                    cfg.intermediate_size,
                    false,
                )?,
                down: linear(
                    b,
                    &format!("{p}.mlp.down_proj"),
                    cfg.intermediate_size,
                    d,
                    false,
                )?,
            });
        }
        let norm = b.param("model.norm.weight", &[d], Init::Ones)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
        })
    }
}

impl Backbone for Llama {
    fn forward(&self, ids: &Tensor, ctx: &Ctx, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (bsz, t) = ids.dims2()?;
        let hd = self.cfg.head_dim();
        let (nh, nkv) = (self.cfg.num_attention_heads, self.cfg.kv_heads());
        let eps = self.cfg.rms_norm_eps;
        let (cos, sin) = ops::rope_tables(&ctx.positions, hd, self.cfg.rope_theta, ids.device())?;
        let mut x = crate::fused::embedding(&self.embed.t(), ids)?;
        for (li, l) in self.layers.iter().enumerate() {
            if cache.is_none() {
                if let Some(y) =
                    l.fused_train(&x, (nh, nkv), eps, (&cos, &sin), &ctx.bias, recomputes(li))?
                {
                    x = y;
                    continue;
                }
            }
            let h = crate::fused::rms_norm(&x, &l.input_norm.t(), eps)?;
            // q and k: RoPE reads the projections' [b, t, h·hd] outputs in place; v is read
            // in place by attention, which writes [b, t, h·hd] for the output projection.
            let q = crate::fused::rope_heads(&l.q.forward(&h)?, Heads::Merged(nh), &cos, &sin)?;
            let k = crate::fused::rope_heads(&l.k.forward(&h)?, Heads::Merged(nkv), &cos, &sin)?;
            let v = l.v.forward(&h)?;
            let s = Heads::Split;
            let y = match cache.as_deref_mut() {
                Some(c) => {
                    let v = v
                        .reshape((bsz, t, nkv, hd))?
                        .transpose(1, 2)?
                        .contiguous()?;
                    let (k, v) = c.append(li, k, v)?;
                    crate::fused::attention_forms(
                        (&q, s),
                        (&k, s),
                        (&v, s),
                        &ctx.bias,
                        Heads::Merged(nh),
                    )?
                }
                None => crate::fused::attention_forms(
                    (&q, s),
                    (&k, s),
                    (&v, Heads::Merged(nkv)),
                    &ctx.bias,
                    Heads::Merged(nh),
                )?,
            };
            x = l.o.forward_residual(&y, &x)?;
            let h = crate::fused::rms_norm(&x, &l.post_norm.t(), eps)?;
            let g = Linear::swiglu(&l.gate, &l.up, &h)?;
            x = l.down.forward_residual(&g, &x)?;
        }
        Ok(crate::fused::rms_norm(&x, &self.norm.t(), eps)?)
    }
    fn embed(&self) -> &Param {
        &self.embed
    }
    fn linears(&self) -> Vec<&Linear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .collect()
    }
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.q,
                    &mut l.k,
                    &mut l.v,
                    &mut l.o,
                    &mut l.gate,
                    &mut l.up,
                    &mut l.down,
                ]
            })
            .collect()
    }
    fn num_layers(&self) -> usize {
        self.layers.len()
    }
}
