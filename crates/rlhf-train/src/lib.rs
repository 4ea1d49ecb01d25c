//! `rlhf-train`: one training loop ([`trainer`]: optimizer, schedule, accumulation, clipping,
//! non-finite guard, checkpoints with exact resume, metrics) and one file per algorithm.

pub mod checkpoint;
pub mod dpo;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod ppo;
pub mod reward;
pub mod reward_model;
pub mod sft;
pub mod trainer;

pub use trainer::{Objective, RunSummary, StepOut, TrainConfig, Trainer};
