//! Model configuration, deserialised from a Hugging Face `config.json`.
//!
//! One enum, one variant per architecture family. The original JSON is kept so that saving a
//! checkpoint writes back every field transformers expects, including those we do not use.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// GPT-2 (`GPT2LMHeadModel`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_gelu_new")]
    pub activation_function: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn default_ln_eps() -> f64 {
    1e-5
}
fn default_gelu_new() -> String {
    "gelu_new".into()
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}

/// The Llama family: Llama, Mistral-style GQA, Qwen2 (q/k/v bias), SmolLM2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's `attention_bias` (all of q/k/v/o); Qwen2 always has q/k/v bias and no o bias.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default = "default_true")]
    pub use_cache: bool,
}

fn default_silu() -> String {
    "silu".into()
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// Which architecture a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    Gpt2,
    Llama,
    Qwen2,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Gpt2(Gpt2Config),
    Llama { family: Family, cfg: LlamaConfig },
}

/// Llama-family config; transformers ≥ 5 moved `rope_theta` into `rope_parameters`, and
/// `rope_scaling` variants (llama3, yarn, …) are not implemented, so they are refused.
fn llama_config(v: &serde_json::Value) -> Result<LlamaConfig> {
    let mut c: LlamaConfig = serde_json::from_value(v.clone())?;
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(rp) = v.get(key).filter(|x| x.is_object()) {
            let ty = rp
                .get("rope_type")
                .or_else(|| rp.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if ty != "default" {
                bail!(
                    "RoPE type `{ty}` ({key}) is not supported: only the default rotate-half RoPE"
                )
            }
            if v.get("rope_theta").is_none() {
                if let Some(t) = rp.get("rope_theta").and_then(|t| t.as_f64()) {
                    c.rope_theta = t;
                }
            }
        }
    }
    Ok(c)
}

impl ModelConfig {
    /// Parse a `config.json` value. `model_type` decides the family; `architectures` is
    /// consulted when `model_type` is absent.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .map(|s| s.to_string())
            .or_else(|| {
                let a = v
                    .get("architectures")?
                    .as_array()?
                    .first()?
                    .as_str()?
                    .to_lowercase();
                Some(if a.starts_with("gpt2") {
                    "gpt2".into()
                } else if a.starts_with("qwen2") {
                    "qwen2".into()
                } else if a.starts_with("llama") {
                    "llama".into()
                } else {
                    a
                })
            });
        let Some(model_type) = model_type else {
            bail!("no `model_type` (nor `architectures`) field: cannot tell the architecture")
        };
        match model_type.as_str() {
            "gpt2" => Ok(Self::Gpt2(
                serde_json::from_value(v.clone()).context("GPT-2 config")?,
            )),
            "llama" | "mistral" | "smollm" | "smollm2" => Ok(Self::Llama {
                family: Family::Llama,
                cfg: llama_config(v).context("Llama config")?,
            }),
            "qwen2" => Ok(Self::Llama {
                family: Family::Qwen2,
                cfg: llama_config(v).context("Qwen2 config")?,
            }),
            other => bail!(
                "unknown architecture `{other}`: supported model_type values are gpt2, llama (also SmolLM2, Mistral-style), qwen2"
            ),
        }
    }

    pub fn from_file(path: &Path) -> Result<(Self, serde_json::Value)> {
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read model config", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&s)
            .with_context(|| format!("{}: malformed JSON", path.display()))?;
        let c = Self::from_json(&v).with_context(|| format!("{}", path.display()))?;
        c.validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok((c, v))
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Gpt2(c) => {
                if c.n_embd % c.n_head != 0 {
                    bail!(
                        "n_embd {} is not divisible by n_head {}",
                        c.n_embd,
                        c.n_head
                    )
                }
                if !matches!(
                    c.activation_function.as_str(),
                    "gelu_new" | "gelu" | "gelu_pytorch_tanh"
                ) {
                    bail!(
                        "GPT-2 activation `{}` is not supported",
                        c.activation_function
                    )
                }
            }
            Self::Llama { cfg: c, .. } => {
                if c.num_attention_heads % c.kv_heads() != 0 {
                    bail!(
                        "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                        c.num_attention_heads,
                        c.kv_heads()
                    )
                }
                if c.head_dim() % 2 != 0 {
                    bail!("head_dim {} must be even for RoPE", c.head_dim())
                }
                if c.hidden_act != "silu" {
                    bail!("hidden_act `{}` is not supported (silu only)", c.hidden_act)
                }
            }
        }
        Ok(())
    }

    pub fn family(&self) -> Family {
        match self {
            Self::Gpt2(_) => Family::Gpt2,
            Self::Llama { family, .. } => *family,
        }
    }
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Gpt2(c) => c.vocab_size,
            Self::Llama { cfg, .. } => cfg.vocab_size,
        }
    }
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Gpt2(c) => c.n_embd,
            Self::Llama { cfg, .. } => cfg.hidden_size,
        }
    }
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Gpt2(c) => c.n_layer,
            Self::Llama { cfg, .. } => cfg.num_hidden_layers,
        }
    }
    pub fn max_positions(&self) -> Option<usize> {
        match self {
            Self::Gpt2(c) => Some(c.n_positions),
            Self::Llama { cfg, .. } => cfg.max_position_embeddings,
        }
    }
    pub fn tied_embeddings(&self) -> bool {
        match self {
            Self::Gpt2(_) => true,
            Self::Llama { cfg, .. } => cfg.tie_word_embeddings,
        }
    }
}
