//! Linear layers (HF `nn.Linear` [out, in] or GPT-2 `Conv1D` [in, out]) with optional LoRA.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::kernels::dropout::{uniforms, DropoutMask};
use crate::params::{Param, ParamStore};

/// LoRA settings (PEFT names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Module name suffixes to adapt, e.g. `q_proj`, `v_proj`, `c_attn`.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into(), "c_attn".into()],
        }
    }
}

#[derive(Clone)]
pub struct Lora {
    pub a: Param, // [r, in]
    pub b: Param, // [out, r]
    pub scale: f64,
    /// Dropout on the adapter's input (PEFT `lora_dropout`), applied only in training mode.
    pub dropout: f64,
    /// Per-layer salt for the dropout mask.
    pub salt: u64,
    /// Model-wide training-noise seed: 0 = evaluation (no dropout), else the micro-step's seed.
    pub noise: Arc<AtomicU64>,
}

impl Lora {
    /// The adapter input: `x` itself, or in training mode `x ⊙ mask` ([`Self::mask`]).
    fn input(&self, x: &Tensor) -> Result<Tensor> {
        match self.mask(x.elem_count()) {
            Some(mask) => Ok(x.mul(&Tensor::from_vec(mask.values(), x.shape(), x.device())?)?),
            None => Ok(x.clone()),
        }
    }

    /// The dropout mask for an adapter input of `n` elements: `None` in evaluation mode or
    /// without dropout, else a Bernoulli mask of 1/(1 − p) or 0 drawn from (noise seed, layer)
    /// — reproducible, so a resumed run draws the same masks.
    fn mask(&self, n: usize) -> Option<DropoutMask> {
        let seed = self.noise.load(Ordering::Relaxed);
        if self.dropout <= 0.0 || seed == 0 {
            return None;
        }
        Some(DropoutMask::draw(seed, self.salt, 1.0 - self.dropout, n))
    }
}

/// A linear map. `transposed` means the weight is stored [in, out] (GPT-2 Conv1D).
#[derive(Clone)]
pub struct Linear {
    pub name: String,
    pub weight: Param,
    pub bias: Option<Param>,
    pub transposed: bool,
    pub lora: Option<Lora>,
    /// Shared switch for every adapter of a model (`disable_adapters`).
    pub adapters_on: Arc<AtomicBool>,
}

impl Linear {
    pub fn new(name: &str, weight: Param, bias: Option<Param>, transposed: bool) -> Self {
        Self {
            name: name.to_string(),
            weight,
            bias,
            transposed,
            lora: None,
            adapters_on: Arc::new(AtomicBool::new(true)),
        }
    }

    pub fn in_out(&self) -> (usize, usize) {
        let d = self.weight.var().dims();
        if self.transposed {
            (d[0], d[1])
        } else {
            (d[1], d[0])
        }
    }

    /// The effective weight as [in, out] for `x @ W`.
    fn w_in_out(&self) -> Result<Tensor> {
        let w = self.weight.t();
        Ok(if self.transposed { w } else { w.t()? })
    }

    /// y = x W (+ b) (+ scale · x Aᵀ Bᵀ). `x`: [..., in] → [..., out]. The fused ops take the
    /// leading dimensions as rows, so the f32 CPU path adds no reshape nodes to the graph (each
    /// would cost a zero-fill and an add of its gradient in candle's backward).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (din, dout) = self.in_out();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let w = self.weight.t();
        let bias = self.bias.as_ref().map(|b| b.t());
        let fast = self.fused_kernels(x);
        let x2 = if fast {
            x.clone()
        } else {
            x.reshape((n, din))?
        };
        // Inside a generation, each of these ops multiplies 16 to 256 rows by the weight
        // packed for the whole of it (`kernels::packed`).
        let mut y = match &bias {
            // One fused op: bias written first, the GEMM accumulates onto it.
            Some(b) if fast && n > crate::kernels::matmul::SMALL_M => {
                crate::kernels::matmul::linear_bias(&x2, &w, b, self.transposed)?
            }
            _ => {
                let y = if !self.transposed && n <= crate::kernels::matmul::SMALL_M && fast {
                    // HF [out, in] weight and few rows (decoding): stream the weight, no packing.
                    crate::kernels::matmul::matmul_nt_op(&x2, &w)?
                } else if fast {
                    crate::kernels::matmul::linear(&x2, &w, self.transposed)?
                } else {
                    x2.matmul(&self.w_in_out()?)?
                };
                match &bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        };
        if let Some(l) = &self.lora {
            if self.adapters_on.load(Ordering::Relaxed) {
                let (a, b) = (l.a.t(), l.b.t());
                let x2 = l.input(&x2)?;
                if crate::kernels::fusable(&[&x2, &a, &b, &y]) {
                    // y + (scale · x Aᵀ) Bᵀ: the scale on the r-wide intermediate, and B's
                    // product accumulating onto y in one op, so no [rows × out] scale or add
                    // (nor their gradient buffers in candle's backward).
                    let h = (crate::kernels::matmul::linear(&x2, &a, false)? * l.scale)?;
                    y = crate::kernels::matmul::linear_residual(&h, &b, &y, false)?;
                } else {
                    let d = x2.matmul(&a.t()?)?.matmul(&b.t()?)?;
                    y = (y + (d * l.scale)?)?;
                }
            }
        }
        if fast {
            return Ok(y);
        }
        let mut out = dims;
        *out.last_mut().unwrap() = dout;
        Ok(y.reshape(out)?)
    }

    /// Whether `forward` on `x` takes our fused CPU kernels: f32 on the CPU, a rank-1 bias.
    fn fused_kernels(&self, x: &Tensor) -> bool {
        crate::kernels::fusable(&[x, &self.weight.t()])
            && self.bias.as_ref().is_none_or(|b| b.t().rank() == 1)
    }

    /// Whether `forward` on `x` is a plain product on the fused CPU path: [`Self::fused_kernels`],
    /// no active LoRA adapter, more rows than decoding's few (those stream the weight instead),
    /// and not rows that take a packed weight inside a generation (`forward` runs those).
    pub(crate) fn plain_fused(&self, x: &Tensor) -> bool {
        let lora_on = self.lora.is_some() && self.adapters_on.load(Ordering::Relaxed);
        let rows = rows(x);
        self.fused_kernels(x)
            && !lora_on
            && rows > crate::kernels::matmul::SMALL_M
            && !crate::kernels::packed::takes(rows)
    }

    /// This linear inside a fused block in training ([`crate::kernels::block`]) whose input is
    /// `x` (`[..., d]`): its weight, bias and active adapter (its dropout mask not drawn yet:
    /// [`Self::adapter_mask`]); `None` where the block cannot run it (off the fused path, a
    /// weight not in the layout the block expects: `transposed` for GPT-2's Conv1D `[in, out]`,
    /// else HF's `[out, in]`). Decoding never runs the block (it needs a gradient sink), so
    /// few rows need no test here.
    pub(crate) fn block_parts(
        &self,
        x: &Tensor,
        transposed: bool,
    ) -> Option<crate::kernels::block::Projection> {
        use crate::kernels::block::{LoraWeights, Projection};
        if self.transposed != transposed || !self.fused_kernels(x) {
            return None;
        }
        let lora = match &self.lora {
            Some(l) if self.adapters_on.load(Ordering::Relaxed) => Some(LoraWeights {
                a: l.a.t(),
                b: l.b.t(),
                scale: l.scale,
                mask: None,
            }),
            _ => None,
        };
        Some(Projection {
            w: self.weight.t(),
            bias: self.bias.as_ref().map(|b| b.t()),
            lora,
        })
    }

    /// The dropout mask this step's forward would draw for the adapter's input, `x`'s rows of
    /// this linear's input width (the same draw as the composed path's); `None` without an
    /// active adapter drawing one.
    pub(crate) fn adapter_mask(&self, x: &Tensor) -> Option<DropoutMask> {
        match &self.lora {
            Some(l) if self.adapters_on.load(Ordering::Relaxed) => {
                l.mask(rows(x) * self.in_out().0)
            }
            _ => None,
        }
    }

    /// `gelu_tanh(forward(x))`: on the fused path with a bias (GPT-2's `c_fc`), one op for the
    /// product, the bias and the activation ([`crate::kernels::mlp::linear_gelu`]).
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(b) = self.bias.as_ref().filter(|_| self.plain_fused(x)) {
            let w = self.weight.t();
            return Ok(crate::kernels::mlp::linear_gelu(
                x,
                &w,
                &b.t(),
                self.transposed,
            )?);
        }
        Ok(crate::fused::gelu_tanh(&self.forward(x)?)?)
    }

    /// `residual + forward(x)`: for a bias-free linear on the fused path (Llama's `o_proj` and
    /// `down_proj`), one op whose GEMM accumulates onto the residual
    /// ([`crate::kernels::matmul::linear_residual`]).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if self.bias.is_none() && self.plain_fused(x) && crate::kernels::fusable(&[residual]) {
            let w = self.weight.t();
            return Ok(crate::kernels::matmul::linear_residual(
                x,
                &w,
                residual,
                self.transposed,
            )?);
        }
        Ok((residual + self.forward(x)?)?)
    }

    /// `silu(gate(x)) ⊙ up(x)` (Llama's MLP before `down_proj`): when both are bias-free HF
    /// linears of one shape on the fused path, one op for both products and the activation
    /// ([`crate::kernels::mlp::swiglu_mlp`]).
    pub fn swiglu(gate: &Linear, up: &Linear, x: &Tensor) -> Result<Tensor> {
        let (wg, wu) = (gate.weight.t(), up.weight.t());
        if gate.plain_fused(x)
            && up.plain_fused(x)
            && gate.bias.is_none()
            && up.bias.is_none()
            && !gate.transposed
            && !up.transposed
            && wg.dims() == wu.dims()
        {
            return Ok(crate::kernels::mlp::swiglu_mlp(x, &wg, &wu)?);
        }
        Ok(crate::fused::swiglu(&gate.forward(x)?, &up.forward(x)?)?)
    }

    /// Attach a LoRA adapter (A ~ Kaiming-uniform-like small random, B = 0, as PEFT) and register
    /// its parameters under PEFT names `<name>.lora_A.weight` / `<name>.lora_B.weight`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_lora(
        &mut self,
        cfg: &LoraConfig,
        store: &mut ParamStore,
        switch: Arc<AtomicBool>,
        noise: Arc<AtomicU64>,
        seed: u64,
    ) -> Result<()> {
        let (din, dout) = self.in_out();
        let bound = 1.0 / (din as f64).sqrt();
        let a = seeded_uniform(seed, cfg.r * din, bound);
        let a = Tensor::from_vec(a, (cfg.r, din), &Device::Cpu)?;
        let b = Tensor::zeros((dout, cfg.r), DType::F32, &Device::Cpu)?;
        let a = Param::new(&format!("{}.lora_A.weight", self.name), a, true)?;
        let b = Param::new(&format!("{}.lora_B.weight", self.name), b, true)?;
        store.insert(a.clone())?;
        store.insert(b.clone())?;
        self.lora = Some(Lora {
            a,
            b,
            scale: cfg.alpha / cfg.r as f64,
            dropout: cfg.dropout,
            salt: seed,
            noise,
        });
        self.adapters_on = switch;
        Ok(())
    }

    /// W + scale·(B A) in the stored layout: the merged weight for export.
    pub fn merged_weight(&self) -> Result<Tensor> {
        let w = self.weight.var().as_tensor().detach();
        let Some(l) = &self.lora else { return Ok(w) };
        let ba = (l.b.var().as_tensor().matmul(l.a.var().as_tensor())? * l.scale)?; // [out, in]
        Ok(if self.transposed {
            (w + ba.t()?)?
        } else {
            (w + ba)?
        })
    }
}

/// The rows of `x` `[..., d]`: every leading dimension is a row.
fn rows(x: &Tensor) -> usize {
    x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1)
}

/// A small deterministic uniform(-bound, bound) generator (splitmix64), so adapters are
/// reproducible without threading an RNG through model construction.
pub fn seeded_uniform(seed: u64, n: usize, bound: f64) -> Vec<f32> {
    let mut u = uniforms(seed.wrapping_add(0x9E37_79B9_7F4A_7C15), 0);
    (0..n).map(|_| ((2.0 * u() - 1.0) * bound) as f32).collect()
}
