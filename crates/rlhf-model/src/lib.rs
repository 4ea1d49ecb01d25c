//! `rlhf-model`: training-safe transformer architectures on candle.
//!
//! - [`gpt2`], [`llama`]: one file per architecture, every op differentiable ([`ops`], [`fused`]).
//! - [`model::CausalLM`]: backbone + LM head + parameters, LoRA, HF save; [`heads`]: scalar heads.
//! - [`load::load`]: HF directory, GGUF file or hub id (local cache); [`tokenizer`]: tokenizer and
//!   chat template; [`generate`]: batched KV-cache sampling with log-probs.

pub mod backbone;
pub mod config;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod heads;
pub mod kernels;
pub mod linear;
pub mod llama;
pub mod load;
pub mod model;
pub mod ops;
pub mod params;
pub mod sysmem;
pub mod tokenizer;
pub mod weights;

pub use candle_core::{DType, Device, Tensor, Var};
pub use config::{Family, ModelConfig};
pub use generate::{generate, Generation, GenerationConfig};
pub use linear::LoraConfig;
pub use model::{CausalLM, Loaded};
pub use tokenizer::{ChatMessage, Tokenizer};
