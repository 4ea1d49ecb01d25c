//! GPT-2 (`GPT2LMHeadModel`), after nanoGPT's `model.py`: learned positions, pre-LayerNorm,
//! fused q/k/v projection (`c_attn`), tanh-GELU MLP, head tied to the token embedding.
//! HF stores the projections as `Conv1D`, i.e. weights [in, out]: kept as is (`transposed`).

use anyhow::Result;
use candle_core::{Tensor, D};

use crate::backbone::{Backbone, Ctx, KvCache};
use crate::config::Gpt2Config;
use crate::fused::Heads;
use crate::kernels::block::recomputes;
use crate::linear::Linear;
use crate::params::Param;
use crate::weights::{Builder, Init};

struct Norm {
    w: Param,
    b: Param,
    eps: f64,
}

impl Norm {
    fn new(b: &mut Builder, name: &str, d: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            w: b.param(&format!("{name}.weight"), &[d], Init::Ones)?,
            b: b.param(&format!("{name}.bias"), &[d], Init::Zeros)?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::fused::layer_norm(
            x,
            &self.w.t(),
            &self.b.t(),
            self.eps,
        )?)
    }
}

fn conv1d(b: &mut Builder, name: &str, din: usize, dout: usize, std: f64) -> Result<Linear> {
    let w = b.param(&format!("{name}.weight"), &[din, dout], Init::Normal(std))?;
    let bias = b.param(&format!("{name}.bias"), &[dout], Init::Zeros)?;
    Ok(Linear::new(name, w, Some(bias), true))
}

struct Block {
    ln_1: Norm,
    c_attn: Linear,
    c_proj: Linear,
    ln_2: Norm,
    c_fc: Linear,
    mlp_proj: Linear,
}

impl Block {
    /// The block in training as one graph node ([`crate::kernels::block::gpt2_block`]), when
    /// every trained tensor's gradient goes to this thread's gradient sink, every product is a
    /// biased Conv1D on the fused path (adapters on any, their dropout masks drawn here as the
    /// composed block draws them) and the norms share one epsilon; `None` otherwise.
    /// `recompute`: it keeps its input, not its activations (gradient checkpointing).
    fn fused_train(
        &self,
        x: &Tensor,
        n_head: usize,
        bias: &Tensor,
        recompute: bool,
    ) -> Result<Option<Tensor>> {
        use crate::kernels::block::{Gpt2BlockWeights, Projection};
        let linears = [&self.c_attn, &self.c_proj, &self.c_fc, &self.mlp_proj];
        let mut convs: [Option<(Tensor, Tensor)>; 4] = Default::default();
        let mut adapters = [None, None, None, None];
        for ((l, c), a) in linears.iter().zip(&mut convs).zip(&mut adapters) {
            if let Some(Projection {
                w,
                bias: Some(b),
                lora,
            }) = l.block_parts(x, true)
            {
                *c = Some((w, b));
                *a = lora;
            }
        }
        let [Some(c_attn), Some(c_proj), Some(c_fc), Some(mlp_proj)] = convs else {
            return Ok(None);
        };
        if self.ln_1.eps != self.ln_2.eps {
            return Ok(None);
        }
        let norm = |n: &Norm| (n.w.t(), n.b.t());
        let mut w = Gpt2BlockWeights {
            ln_1: norm(&self.ln_1),
            c_attn,
            c_proj,
            ln_2: norm(&self.ln_2),
            c_fc,
            mlp_proj,
            adapters,
        };
        if !w.applies(x) {
            return Ok(None);
        }
        // Dropout masks only now that the block runs (the composed block would draw them).
        for (l, a) in linears.iter().zip(&mut w.adapters) {
            if let Some(a) = a {
                a.mask = l.adapter_mask(x);
            }
        }
        Ok(crate::kernels::block::gpt2_block(
            x,
            w,
            n_head,
            self.ln_1.eps,
            bias,
            recompute,
        )?)
    }
}

pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Param,
    wpe: Param,
    blocks: Vec<Block>,
    ln_f: Norm,
}

impl Gpt2 {
    pub fn new(cfg: &Gpt2Config, b: &mut Builder) -> Result<Self> {
        let d = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * d);
        let std = 0.02;
        // GPT-2 scales the residual projections' init by 1/sqrt(2·n_layer).
        let proj_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
        let wte = b.param(
            "transformer.wte.weight",
            &[cfg.vocab_size, d],
            Init::Normal(std),
        )?;
        let wpe = b.param(
            "transformer.wpe.weight",
            &[cfg.n_positions, d],
            Init::Normal(0.01),
        )?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("transformer.h.{i}");
            blocks.push(Block {
                ln_1: Norm::new(b, &format!("{p}.ln_1"), d, cfg.layer_norm_epsilon)?,
                c_attn: conv1d(b, &format!("{p}.attn.c_attn"), d, 3 * d, std)?,
                c_proj: conv1d(b, &format!("{p}.attn.c_proj"), d, d, proj_std)?,
                ln_2: Norm::new(b, &format!("{p}.ln_2"), d, cfg.layer_norm_epsilon)?,
                c_fc: conv1d(b, &format!("{p}.mlp.c_fc"), d, inner, std)?,
                mlp_proj: conv1d(b, &format!("{p}.mlp.c_proj"), inner, d, proj_std)?,
            });
        }
        let ln_f = Norm::new(b, "transformer.ln_f", d, cfg.layer_norm_epsilon)?;
        Ok(Self {
            cfg: cfg.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
        })
    }
}

impl Backbone for Gpt2 {
    fn forward(&self, ids: &Tensor, ctx: &Ctx, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (bsz, t) = ids.dims2()?;
        let d = self.cfg.n_embd;
        let nh = self.cfg.n_head;
        let hd = d / nh;
        let pos: Vec<u32> = ctx.positions.iter().flatten().copied().collect();
        if let Some(&m) = pos.iter().max() {
            if m as usize >= self.cfg.n_positions {
                anyhow::bail!(
                    "sequence position {m} exceeds GPT-2's n_positions {}",
                    self.cfg.n_positions
                )
            }
        }
        let mut x = crate::fused::embedding_with_positions(&self.wte.t(), ids, &self.wpe.t(), pos)?;
        for (li, blk) in self.blocks.iter().enumerate() {
            if cache.is_none() {
                if let Some(y) = blk.fused_train(&x, nh, &ctx.bias, recomputes(li))? {
                    x = y;
                    continue;
                }
            }
            let h = blk.ln_1.forward(&x)?;
            let qkv = blk.c_attn.forward(&h)?; // [b, t, 3d]
            let y = match cache.as_deref_mut() {
                // Training and prompt scoring: attention reads q, k and v inside qkv.
                None => crate::fused::attention_packed(&qkv, nh, nh, &ctx.bias)?,
                Some(c) => {
                    let split = |i: usize| -> Result<Tensor> {
                        Ok(qkv
                            .narrow(D::Minus1, i * d, d)?
                            .reshape((bsz, t, nh, hd))?
                            .transpose(1, 2)?)
                    };
                    let (k, v) = c.append(li, split(1)?.contiguous()?, split(2)?.contiguous()?)?;
                    let s = Heads::Split;
                    crate::fused::attention_forms(
                        (&split(0)?, s),
                        (&k, s),
                        (&v, s),
                        &ctx.bias,
                        Heads::Merged(nh),
                    )?
                }
            }; // [b, t, d]
            x = (x + blk.c_proj.forward(&y)?)?;
            let h = blk.ln_2.forward(&x)?;
            let h = blk.c_fc.forward_gelu(&h)?;
            x = (x + blk.mlp_proj.forward(&h)?)?;
        }
        self.ln_f.forward(&x)
    }
    fn embed(&self) -> &Param {
        &self.wte
    }
    fn linears(&self) -> Vec<&Linear> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.c_attn, &b.c_proj, &b.c_fc, &b.mlp_proj])
            .collect()
    }
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| [&mut b.c_attn, &mut b.c_proj, &mut b.c_fc, &mut b.mlp_proj])
            .collect()
    }
    fn num_layers(&self) -> usize {
        self.blocks.len()
    }
}
