//! Stage 3: PPO with a KL leash to the SFT model — one file, in the spirit of CleanRL's `ppo.py`,
//! with every implementation detail of "The N+ Implementation Details of RLHF with PPO" (Huang et
//! al. 2024) named where it happens:
//!
//! 1. **Rollout.** A batch of prompts (seeded order over the prompt set, resumable) is
//!    left-padded and sampled at temperature T (top-k/top-p optional) with the KV cache
//!    ([`rlhf_model::generate`]); the generation seed is derived from (seed, iteration) so a run
//!    and its resumed twin sample the same tokens. Responses are truncated after the first EOS;
//!    lengths, not token identities, define every mask, so PAD and EOS never get confused.
//! 2. **Log-probs are recomputed** with a forward pass over prompt+response, logits / T, in the
//!    exact minibatches of the first PPO epoch: the first minibatch of the first epoch then sees
//!    bit-identical old and new log-probs (ratio exactly 1, approx-KL exactly 0). The generator's
//!    own log-probs are only compared against them (`sanity/gen_logprob_max_diff`). Every
//!    forward over a minibatch packs its prompt+response sequences back to back, each its own
//!    attention segment ([`MbInput::packed`], `pack_sequences`), instead of padding each to the
//!    minibatch's longest prompt and response: the same numbers from about half the slots.
//! 3. **Reference** log-probs: the frozen SFT model — with LoRA, the policy itself with adapters
//!    disabled (no second copy of the weights).
//! 4. **Score** by a pluggable [`RewardFn`] (a [`RewardModel`] or a closure); optional batch
//!    whitening and clipping; responses without EOS get `no_eos_penalty` (default −1) instead.
//! 5. **Rewards per token**: `−β·(log π − log π_ref)` (k1) on every response token, plus the score
//!    at the last response token. β fixed or adaptive (Ziegler et al. 2019: target KL, horizon).
//! 6. **GAE** (γ = 1, λ = 0.95) per sequence over response tokens; returns = advantages + values;
//!    advantages whitened over the batch's response tokens only (masked mean / unbiased var).
//! 7. **Loss**: clipped surrogate (ε = 0.2), clipped value loss (0.2) × `vf_coef` (0.1), optional
//!    entropy bonus; `ppo_epochs` (4) over seeded shuffled minibatches; AdamW, lr schedule and
//!    global-norm clipping from [`crate::optim`]; optional early stop of an iteration's epochs when
//!    approx-KL exceeds `target_approx_kl`.
//! 8. **Value function**: a separate critic initialised from the reward model (default: loaded a
//!    second time from the RM directory), or a zero-initialised head on a copy of the SFT model,
//!    or a value head sharing the policy trunk.
//! 9. **Safety**: a non-finite score, a KL to the reference above `max_kl`, empty generations or a
//!    non-finite loss/gradient stop the run before any update with a message naming the last good
//!    checkpoint. Checkpoints (policy trainable params, critic, both optimizers, β, prompt order,
//!    iteration) give exact resume.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rlhf_data::batch::{epoch_permutation, DataOrder};
use rlhf_data::formats::{load_prompts, load_text_prompts, Prompt};
use rlhf_data::tokenize::{pack_bins, tokenize_prompt};
use rlhf_model::heads::ScalarHead;
use rlhf_model::kernels::sink::{sum_grads, GradSink};
use rlhf_model::params::{Param, ParamStore};
use rlhf_model::weights::MapSource;
use rlhf_model::{generate, CausalLM, GenerationConfig, LoraConfig, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, LoopState};
use crate::metrics::{MetricsWriter, Progress, Scalars};
use crate::optim::{clip_grads, grad_norm, lr_at, AdamW, AdamWConfig, Schedule};
use crate::reward_model::RewardModel;
use crate::sft::save_policy;
use crate::trainer::restore_params;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// How the value function is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CriticInit {
    /// A separate backbone + head loaded (a second time) from `reward_model` (N+ default).
    #[default]
    RewardModel,
    /// A separate copy of the SFT model with a zero-initialised `v_head`.
    Policy,
    /// A zero-initialised `v_head` on the policy's own hidden states (shared trunk).
    Shared,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// The SFT policy: HF directory, .gguf file or cached hub id. Also the frozen reference.
    pub policy: String,
    /// The frozen reference (KL anchor) when it differs from `policy` (e.g. the SFT model while
    /// `policy` is a previous round's PPO policy). Absent: a frozen copy of `policy`.
    pub reference: Option<String>,
    /// Reward-model directory (saved by [`RewardModel::save`]); needed for `critic = "reward_model"`.
    pub reward_model: Option<PathBuf>,
    /// Prompts: `{"prompt"}` rows, or `{"text"}` rows when `prompt_words > 0` (first N words).
    pub prompts: PathBuf,
    pub prompt_words: usize,
    /// Use at most this many prompts (0 = all).
    pub max_prompts: usize,
    /// Prompts longer than this (tokens) are skipped, with a count.
    pub max_prompt_len: usize,
    pub out: PathBuf,
    pub critic: CriticInit,

    /// PPO iterations (rollout + update), each on `rollout_batch` prompts.
    pub iterations: usize,
    pub rollout_batch: usize,
    pub minibatch_size: usize,
    pub ppo_epochs: usize,
    /// Minibatches of rollouts of similar lengths (prompt, then response), as
    /// `train.group_by_length` does for the other trainers: less padding, at the cost of the
    /// same minibatches in every epoch (in a fresh order). Each minibatch's loss is then weighed
    /// by its response tokens against the rollout's average, so every token counts alike.
    /// `batch/real_tokens` in the metrics is the share of the update's tokens that are not
    /// padding.
    pub group_by_length: bool,
    /// Pack each minibatch's prompt + response sequences back to back into rows as wide as its
    /// longest sequence (best-fit decreasing, as SFT packs; each sequence attends only to
    /// itself, its positions counted from its own start), instead of one row per sequence with
    /// the prompt left-padded and the response right-padded. The same log-probs, values and
    /// gradients, up to float rounding, with little padding left to compute.
    pub pack_sequences: bool,
    /// Gradient checkpointing in the update, as `train.gradient_checkpointing` of the other
    /// trainers ([`crate::memory::Checkpointing`]: `"auto"`, `true`, `false` or a number of
    /// layers): the policy's and the critic's first layers keep only their inputs and
    /// recompute their activations in the backward (with `true` every layer, and the LM head
    /// its logits, in chunks of rows). The same gradients (the head's up to float rounding),
    /// less memory per minibatch, one more forward of those layers per minibatch. `"auto"` is resolved when
    /// the run starts ([`run_ppo`]); a [`PpoTrainer`] built directly takes it as off.
    pub gradient_checkpointing: crate::memory::Checkpointing,

    pub max_new_tokens: usize,
    /// Sampling temperature (> 0); log-probs are always computed with logits / T.
    pub temperature: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f64,

    /// β: initial (or fixed) KL coefficient.
    pub init_kl_coef: f64,
    /// Adaptive β (Ziegler et al. 2019).
    pub adaptive_kl: bool,
    /// Target KL (nats per sequence) and horizon (samples) of the adaptive controller.
    pub target_kl: f64,
    pub kl_horizon: f64,
    /// Whiten scores over the batch (mean 0, std 1) before the penalty and KL terms.
    pub whiten_scores: bool,
    /// Clip scores to ±this (0 = off), after whitening.
    pub score_clip: f64,
    /// Replace the score of responses that end without EOS by `no_eos_penalty`.
    pub penalize_no_eos: bool,
    pub no_eos_penalty: f64,
    /// Stop (as a bad state) when every response in a batch is empty (just EOS).
    pub allow_empty_responses: bool,

    pub gamma: f64,
    pub lam: f64,
    pub whiten_advantages: bool,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub ent_coef: f64,
    /// Stop an iteration's remaining epochs when the epoch's mean approx-KL exceeds this (0 = off).
    pub target_approx_kl: f64,
    /// Safety bound: stop when the rollout's KL to the reference (per sequence) exceeds this
    /// (0 = off).
    pub max_kl: f64,

    pub lr: f64,
    /// Critic learning rate (0 = `lr`).
    pub critic_lr: f64,
    /// Learning-rate warmup over this many iterations (the first Adam steps, with fresh
    /// moments, are the largest).
    pub warmup_iterations: usize,
    /// The first this-many iterations train the critic only (the policy is not updated): a
    /// critic initialised from the reward model does not yet predict returns, and advantages
    /// from it can push the policy anywhere on the first updates.
    pub critic_warmup_iterations: usize,
    pub schedule: Schedule,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    /// Global-norm clip per optimizer (0 = off).
    pub max_grad_norm: f64,

    /// Checkpoint every N iterations (0 = only at the end).
    pub save_every: usize,
    pub keep_last: usize,
    pub seed: u64,
    /// Prompt/response samples written to `samples.jsonl` per iteration.
    pub log_samples: usize,
    /// LoRA on the policy (the reference is then the same model with adapters disabled).
    pub lora: Option<LoraConfig>,
    /// LoRA on a separate critic's backbone (None = the critic is fully fine-tuned).
    pub critic_lora: Option<LoraConfig>,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            policy: String::new(),
            reference: None,
            reward_model: None,
            prompts: PathBuf::new(),
            prompt_words: 0,
            max_prompts: 0,
            max_prompt_len: 256,
            out: PathBuf::from("runs/ppo"),
            critic: CriticInit::RewardModel,
            iterations: 100,
            rollout_batch: 64,
            minibatch_size: 16,
            ppo_epochs: 4,
            group_by_length: false,
            pack_sequences: true,
            gradient_checkpointing: crate::memory::Checkpointing::Auto,
            max_new_tokens: 48,
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            init_kl_coef: 0.05,
            adaptive_kl: false,
            target_kl: 6.0,
            kl_horizon: 10_000.0,
            whiten_scores: false,
            score_clip: 0.0,
            penalize_no_eos: true,
            no_eos_penalty: -1.0,
            allow_empty_responses: false,
            gamma: 1.0,
            lam: 0.95,
            whiten_advantages: true,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            ent_coef: 0.0,
            target_approx_kl: 0.0,
            max_kl: 100.0,
            lr: 1e-5,
            critic_lr: 0.0,
            warmup_iterations: 0,
            critic_warmup_iterations: 0,
            schedule: Schedule::Constant,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-5,
            max_grad_norm: 1.0,
            save_every: 0,
            keep_last: 2,
            seed: 42,
            log_samples: 4,
            lora: None,
            critic_lora: None,
        }
    }
}

impl PpoConfig {
    pub fn validate(&self) -> Result<()> {
        let pos = |v: usize, n: &str| -> Result<()> {
            if v == 0 {
                bail!("ppo config: `{n}` must be positive")
            }
            Ok(())
        };
        pos(self.iterations, "iterations")?;
        pos(self.rollout_batch, "rollout_batch")?;
        pos(self.minibatch_size, "minibatch_size")?;
        pos(self.ppo_epochs, "ppo_epochs")?;
        pos(self.max_new_tokens, "max_new_tokens")?;
        if self.minibatch_size > self.rollout_batch {
            bail!(
                "ppo config: minibatch_size ({}) is larger than rollout_batch ({})",
                self.minibatch_size,
                self.rollout_batch
            )
        }
        if self.temperature <= 0.0 || !self.temperature.is_finite() {
            bail!("ppo config: temperature must be > 0 (PPO samples; log-probs use logits / T)")
        }
        if !(0.0..=1.0).contains(&self.gamma) || !(0.0..=1.0).contains(&self.lam) {
            bail!("ppo config: gamma and lam must be in [0, 1]")
        }
        if self.adaptive_kl && (self.target_kl <= 0.0 || self.kl_horizon <= 0.0) {
            bail!("ppo config: adaptive_kl needs target_kl > 0 and kl_horizon > 0")
        }
        if self.init_kl_coef < 0.0 {
            bail!("ppo config: init_kl_coef must be >= 0")
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Rewards
// ---------------------------------------------------------------------------------------------

/// A scalar reward for whole responses. `prompts[i]` and `responses[i]` are token ids; a
/// response ends with EOS when the policy produced one (it is truncated after the first).
pub trait RewardFn {
    fn score(&self, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Result<Vec<f32>>;
}

/// The reward model scores prompt + response at the last token (normalised by its offset).
/// The reward model must share the policy's tokenizer.
impl RewardFn for RewardModel {
    fn score(&self, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Result<Vec<f32>> {
        let seqs: Vec<Vec<u32>> = prompts
            .iter()
            .zip(responses)
            .map(|(p, r)| [p.as_slice(), r.as_slice()].concat())
            .collect();
        // The pad value is masked out: any id works.
        RewardModel::score(self, &seqs, 0, 8)
    }
}

/// Programmatic rewards: any `Fn(prompts, responses) -> Result<Vec<f32>>`.
impl<F> RewardFn for F
where
    F: Fn(&[Vec<u32>], &[Vec<u32>]) -> Result<Vec<f32>>,
{
    fn score(&self, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Result<Vec<f32>> {
        self(prompts, responses)
    }
}

/// Ziegler et al. (2019) adaptive KL controller: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).
pub fn adaptive_kl_update(beta: f64, kl: f64, target: f64, horizon: f64, n_samples: usize) -> f64 {
    let err = (kl / target - 1.0).clamp(-0.2, 0.2);
    beta * (1.0 + err * n_samples as f64 / horizon)
}

// ---------------------------------------------------------------------------------------------
// Advantage estimation and masked statistics (plain vectors: ragged rows carry no padding)
// ---------------------------------------------------------------------------------------------

/// Generalised advantage estimation over one response: rewards and values per response token
/// (value t = V(state before token t)); the value after the last token is 0 (episode ends).
/// Returns (advantages, returns = advantages + values).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f64, lam: f64) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    assert_eq!(n, values.len(), "gae: rewards and values differ in length");
    let mut adv = vec![0f32; n];
    let mut last = 0f64;
    for t in (0..n).rev() {
        let next_v = if t + 1 < n { values[t + 1] as f64 } else { 0.0 };
        let delta = rewards[t] as f64 + gamma * next_v - values[t] as f64;
        last = delta + gamma * lam * last;
        adv[t] = last as f32;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// Mean and unbiased variance over every element of ragged rows.
pub fn ragged_mean_var(rows: &[Vec<f32>]) -> (f64, f64) {
    let n: usize = rows.iter().map(|r| r.len()).sum();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = rows.iter().flatten().map(|&x| x as f64).sum::<f64>() / n as f64;
    let ss = rows
        .iter()
        .flatten()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>();
    let var = if n > 1 { ss / (n - 1) as f64 } else { 0.0 };
    (mean, var)
}

/// Whiten ragged rows in place: (x − mean) / sqrt(var + 1e-8) over all elements (TRL's
/// `masked_whiten` with the unbiased variance).
pub fn whiten_ragged(rows: &mut [Vec<f32>]) {
    let (mean, var) = ragged_mean_var(rows);
    let inv = 1.0 / (var + 1e-8).sqrt();
    for x in rows.iter_mut().flatten() {
        *x = ((*x as f64 - mean) * inv) as f32;
    }
}

/// Mean of `x` over positions where `mask` (u8, same shape) is 1. Padding values — even NaN or
/// inf — never enter the result or its gradient (selection, not multiplication by 0).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let n = mask.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if n == 0.0 {
        bail!("masked_mean over an empty mask")
    }
    let z = x.zeros_like()?;
    Ok((mask.where_cond(x, &z)?.sum_all()? / n as f64)?)
}

/// Fraction of the variance of `returns` explained by `values` over ragged rows.
pub fn explained_variance(values: &[Vec<f32>], returns: &[Vec<f32>]) -> f64 {
    let (_, var_r) = ragged_mean_var(returns);
    let diff: Vec<Vec<f32>> = values
        .iter()
        .zip(returns)
        .map(|(v, r)| v.iter().zip(r).map(|(a, b)| b - a).collect())
        .collect();
    let (_, var_d) = ragged_mean_var(&diff);
    if var_r == 0.0 {
        f64::NAN
    } else {
        1.0 - var_d / var_r
    }
}

// ---------------------------------------------------------------------------------------------
// Minibatch tensors: left-padded prompts, right-padded responses
// ---------------------------------------------------------------------------------------------

/// One minibatch as model input, in one of two layouts:
/// - [`MbInput::new`]: row r is `[pad… prompt | response pad…]`, the prompt left-padded to `tp`,
///   the response right-padded to `tr`. The hidden state at slot `tp − 1 + j` predicts response
///   token j, so response position j's log-prob and value are read there.
/// - [`MbInput::packed`]: sequences `[prompt | response]` back to back in rows, each its own
///   segment of the mask; `gather` names the slot that predicts each response token.
///
/// Either way the outputs are `[n, tr]`: one row per sequence, responses right-padded.
pub struct MbInput {
    pub ids: Tensor,
    pub mask: Vec<Vec<u8>>,
    /// The prompts' padded width (left-padded layout; 0 when packed).
    pub tp: usize,
    pub tr: usize,
    /// Packed layout: the row of the flattened `[rows·width]` hidden states that predicts
    /// response token j of sequence i, at `i·tr + j` (past a response's end: its last token's).
    pub gather: Option<Tensor>,
    /// The response slots holding a token: indices into the flattened `[n·tr]` outputs.
    pub real: Tensor,
    /// Their tokens, `[real slots]`.
    pub real_targets: Tensor,
    /// For each of the `[n·tr]` output slots, its index in `real` (the count of real slots, a
    /// zero, on padding).
    pub spread: Tensor,
    /// 1 on response tokens, 0 on response padding: [n, tr] u8.
    pub rmask: Tensor,
    pub lens: Vec<usize>,
}

/// The number of sequences of a minibatch, checked: at least one, a response per prompt.
fn check_sizes(prompts: &[&[u32]], responses: &[&[u32]]) -> Result<usize> {
    let n = prompts.len();
    if n == 0 || n != responses.len() {
        bail!("minibatch: {} prompts, {} responses", n, responses.len())
    }
    Ok(n)
}

impl MbInput {
    pub fn new(prompts: &[&[u32]], responses: &[&[u32]], pad: u32) -> Result<Self> {
        let n = check_sizes(prompts, responses)?;
        let tp = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let tr = responses.iter().map(|r| r.len()).max().unwrap_or(0);
        if tp == 0 || tr == 0 {
            bail!("minibatch with an empty prompt or no response tokens")
        }
        let t = tp + tr;
        let mut ids = Vec::with_capacity(n * t);
        let mut mask = Vec::with_capacity(n);
        for (p, r) in prompts.iter().zip(responses) {
            let lp = tp - p.len();
            let rp = tr - r.len();
            ids.extend(std::iter::repeat_n(pad, lp));
            ids.extend_from_slice(p);
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(pad, rp));
            let mut m = vec![0u8; lp];
            m.extend(std::iter::repeat_n(1u8, p.len() + r.len()));
            m.extend(std::iter::repeat_n(0u8, rp));
            mask.push(m);
        }
        let ids = Tensor::from_vec(ids, (n, t), &Device::Cpu)?;
        Self::with_inputs(ids, mask, tp, None, responses)
    }

    /// The packed layout: prompt + response sequences back to back in rows as wide as the
    /// longest, placed best-fit, longest first, as SFT packs ([`pack_bins`]: at most
    /// [`rlhf_data::tokenize::MAX_SEGMENTS`] to a row). Every prompt must be non-empty (its last
    /// token predicts the response's first).
    pub fn packed(prompts: &[&[u32]], responses: &[&[u32]], pad: u32) -> Result<Self> {
        let n = check_sizes(prompts, responses)?;
        if prompts.iter().any(|p| p.is_empty()) || responses.iter().all(|r| r.is_empty()) {
            bail!("minibatch with an empty prompt or no response tokens")
        }
        let tr = responses.iter().map(|r| r.len()).max().unwrap_or(0);
        let lens: Vec<usize> = (0..n)
            .map(|i| prompts[i].len() + responses[i].len())
            .collect();
        let width = lens.iter().copied().max().unwrap_or(0);
        let rows = pack_bins(&lens, width);
        // The first slot of each sequence in the flattened [rows·width] layout.
        let mut start = vec![0usize; n];
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut mask = Vec::with_capacity(rows.len());
        for (r, seqs) in rows.iter().enumerate() {
            let mut m = Vec::with_capacity(width);
            for (k, &i) in seqs.iter().enumerate() {
                start[i] = r * width + m.len();
                ids.extend_from_slice(prompts[i]);
                ids.extend_from_slice(responses[i]);
                m.extend(std::iter::repeat_n(k as u8 + 1, lens[i]));
            }
            ids.extend(std::iter::repeat_n(pad, width - m.len()));
            m.resize(width, 0);
            mask.push(m);
        }
        let mut gather = Vec::with_capacity(n * tr);
        for (i, (p, r)) in prompts.iter().zip(responses).enumerate() {
            let first = start[i] + p.len() - 1;
            gather.extend((0..tr).map(|j| (first + j.min(r.len().saturating_sub(1))) as u32));
        }
        let ids = Tensor::from_vec(ids, (rows.len(), width), &Device::Cpu)?;
        let gather = Tensor::from_vec(gather, (n * tr,), &Device::Cpu)?;
        Self::with_inputs(ids, mask, 0, Some(gather), responses)
    }

    /// A minibatch of model inputs `ids`/`mask` in either layout, with the response side both
    /// layouts share: the real response slots and their tokens (the LM head runs on these), and
    /// the mask `[n, tr]`, responses right-padded.
    fn with_inputs(
        ids: Tensor,
        mask: Vec<Vec<u8>>,
        tp: usize,
        gather: Option<Tensor>,
        responses: &[&[u32]],
    ) -> Result<Self> {
        let n = responses.len();
        let tr = responses.iter().map(|r| r.len()).max().unwrap_or(0);
        let total: usize = responses.iter().map(|r| r.len()).sum();
        let mut real = Vec::with_capacity(total);
        let mut spread = Vec::with_capacity(n * tr);
        let mut rmask = Vec::with_capacity(n * tr);
        for (i, r) in responses.iter().enumerate() {
            spread.extend((0..r.len()).map(|j| (real.len() + j) as u32));
            spread.extend(std::iter::repeat_n(total as u32, tr - r.len()));
            real.extend((0..r.len()).map(|j| (i * tr + j) as u32));
            rmask.extend(std::iter::repeat_n(1u8, r.len()));
            rmask.extend(std::iter::repeat_n(0u8, tr - r.len()));
        }
        let real_targets: Vec<u32> = responses.iter().flat_map(|r| r.iter().copied()).collect();
        Ok(Self {
            ids,
            mask,
            tp,
            tr,
            gather,
            real: Tensor::from_vec(real, (total,), &Device::Cpu)?,
            real_targets: Tensor::from_vec(real_targets, (total,), &Device::Cpu)?,
            spread: Tensor::from_vec(spread, (n * tr,), &Device::Cpu)?,
            rmask: Tensor::from_vec(rmask, (n, tr), &Device::Cpu)?,
            lens: responses.iter().map(|r| r.len()).collect(),
        })
    }

    /// Token slots the model computes (real and padding).
    pub fn slots(&self) -> usize {
        self.ids.elem_count()
    }

    pub fn n(&self) -> usize {
        self.lens.len()
    }

    /// Hidden states at the slots that predict response tokens: [n, tr, d].
    fn response_hidden(&self, h: &Tensor) -> Result<Tensor> {
        match &self.gather {
            None => Ok(h.narrow(1, self.tp - 1, self.tr)?),
            Some(g) => {
                let (b, t, d) = h.dims3()?;
                let x = h.reshape((b * t, d))?.index_select(g, 0)?;
                Ok(x.reshape((self.n(), self.tr, d))?)
            }
        }
    }

    /// Values at the real response slots `[real slots]` → `[n, tr]`, 0 on padding
    /// (differentiable).
    fn spread_out(&self, x: &Tensor) -> Result<Tensor> {
        let x = Tensor::cat(&[x, &Tensor::zeros(1, x.dtype(), x.device())?], 0)?;
        Ok(x.index_select(&self.spread, 0)?
            .reshape((self.n(), self.tr))?)
    }

    /// Ragged rows (true lengths) of a [n, tr] tensor.
    pub fn rows(&self, t: &Tensor) -> Result<Vec<Vec<f32>>> {
        let v: Vec<Vec<f32>> = t.detach().to_vec2()?;
        Ok(v.into_iter()
            .zip(&self.lens)
            .map(|(mut r, &l)| {
                r.truncate(l);
                r
            })
            .collect())
    }

    /// Ragged rows → a right-padded [n, tr] tensor (padding 0).
    pub fn padded(&self, rows: &[&[f32]]) -> Result<Tensor> {
        let mut v = Vec::with_capacity(self.n() * self.tr);
        for r in rows {
            v.extend_from_slice(r);
            v.extend(std::iter::repeat_n(0f32, self.tr - r.len()));
        }
        Ok(Tensor::from_vec(v, (self.n(), self.tr), &Device::Cpu)?)
    }
}

/// Policy forward over a minibatch: hidden states at response-predicting slots [n, tr, d], and
/// the response tokens' log-probs and the policy's entropy at each, under logits / T, [n, tr]
/// each (0 on response padding), all tracked for gradients. The LM head runs on the response
/// tokens only, as one fused op ([`CausalLM::head_logprobs_entropy`]): no [tokens × vocab]
/// logits are returned or kept beyond its one buffer.
pub fn policy_forward(
    model: &CausalLM,
    mb: &MbInput,
    temperature: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let h = mb.response_hidden(&model.hidden(&mb.ids, &mb.mask)?)?;
    let d = model.hidden_size();
    let hr = h.reshape((mb.n() * mb.tr, d))?.index_select(&mb.real, 0)?;
    let (lp, ent) = model.head_logprobs_entropy(&hr, &mb.real_targets, temperature)?;
    Ok((h, mb.spread_out(&lp)?, mb.spread_out(&ent)?))
}

/// Log-probs (logits / T) of each response token given its prompt, in one batch.
pub fn response_logprobs(
    model: &CausalLM,
    prompts: &[Vec<u32>],
    responses: &[Vec<u32>],
    temperature: f64,
    pad: u32,
) -> Result<Vec<Vec<f32>>> {
    let p: Vec<&[u32]> = prompts.iter().map(|x| x.as_slice()).collect();
    let r: Vec<&[u32]> = responses.iter().map(|x| x.as_slice()).collect();
    let mb = MbInput::new(&p, &r, pad)?;
    let (_, lp, _) = policy_forward(model, &mb, temperature)?;
    mb.rows(&lp)
}

// ---------------------------------------------------------------------------------------------
// Value function
// ---------------------------------------------------------------------------------------------

pub enum ValueFunction {
    /// Own backbone + head (the head's parameter lives in `model.params`).
    Separate {
        model: Box<CausalLM>,
        head: ScalarHead,
    },
    /// A head on the policy's hidden states; its parameter lives in `store`.
    Shared { head: ScalarHead, store: ParamStore },
}

fn zero_head(name: &str, d: usize, store: &mut ParamStore) -> Result<ScalarHead> {
    let mut map = BTreeMap::new();
    map.insert(
        format!("{name}.weight"),
        Tensor::zeros((1, d), DType::F32, &Device::Cpu)?,
    );
    let mut src = MapSource {
        map,
        origin: "zero init".into(),
    };
    ScalarHead::new(name, d, &mut src, store)
}

impl ValueFunction {
    /// The critic initialised from a reward model (backbone and `score` head).
    pub fn from_reward_model(rm: RewardModel) -> Self {
        ValueFunction::Separate {
            model: Box::new(rm.model),
            head: rm.head,
        }
    }

    /// A separate critic on `model` (e.g. a copy of the SFT model) with a zero `v_head`.
    pub fn separate(mut model: CausalLM) -> Result<Self> {
        let d = model.hidden_size();
        let head = zero_head("v_head", d, &mut model.params)?;
        Ok(ValueFunction::Separate {
            model: Box::new(model),
            head,
        })
    }

    /// A zero `v_head` on the policy trunk of hidden size `d`.
    pub fn shared(d: usize) -> Result<Self> {
        let mut store = ParamStore::new();
        let head = zero_head("v_head", d, &mut store)?;
        Ok(ValueFunction::Shared { head, store })
    }

    /// Put LoRA on a separate critic's backbone (its head stays trainable).
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        if let ValueFunction::Separate { model, head } = self {
            model.add_lora(cfg, seed)?;
            head.linear.weight.set_trainable(true);
        }
        Ok(())
    }

    pub fn trainable(&self) -> Vec<Param> {
        match self {
            ValueFunction::Separate { model, .. } => model.params.trainable(),
            ValueFunction::Shared { store, .. } => store.trainable(),
        }
    }

    pub fn head(&self) -> &ScalarHead {
        match self {
            ValueFunction::Separate { head, .. } | ValueFunction::Shared { head, .. } => head,
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, ValueFunction::Shared { .. })
    }

    /// A separate critic's backbone (`None` for a head on the policy's trunk).
    pub fn model(&self) -> Option<&CausalLM> {
        match self {
            ValueFunction::Separate { model, .. } => Some(model),
            ValueFunction::Shared { .. } => None,
        }
    }

    /// Values at response-predicting slots [n, tr]; `policy_hidden` (from [`policy_forward`]) is
    /// used by the shared head.
    pub fn values(&self, mb: &MbInput, policy_hidden: &Tensor) -> Result<Tensor> {
        match self {
            ValueFunction::Shared { head, .. } => head.all(policy_hidden),
            ValueFunction::Separate { model, head } => {
                let h = mb.response_hidden(&model.hidden(&mb.ids, &mb.mask)?)?;
                head.all(&h)
            }
        }
    }
}

/// A deep copy of a model's current weights as a new, fully frozen model (no LoRA).
pub fn frozen_copy(model: &CausalLM) -> Result<CausalLM> {
    let mut src = MapSource {
        map: model.merged_tensors()?,
        origin: "policy copy".into(),
    };
    let m = CausalLM::build(model.config.clone(), model.raw_config.clone(), &mut src)?;
    m.params.set_trainable_where(|_| true, false);
    Ok(m)
}

/// A deep copy of a model's weights, trainable (for a critic initialised from the SFT model).
fn trainable_copy(model: &CausalLM) -> Result<CausalLM> {
    let m = frozen_copy(model)?;
    m.params.set_trainable_where(|_| true, true);
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// The trainer
// ---------------------------------------------------------------------------------------------

/// One iteration's rollout, per sample (ragged rows = response tokens only).
#[derive(Debug, Clone, Default)]
pub struct Rollout {
    pub prompt_idx: Vec<usize>,
    pub responses: Vec<Vec<u32>>,
    pub finished: Vec<bool>,
    pub gen_logprobs: Vec<Vec<f32>>,
    pub logprobs: Vec<Vec<f32>>,
    pub ref_logprobs: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    pub raw_scores: Vec<f32>,
    pub scores: Vec<f32>,
    pub rewards: Vec<Vec<f32>>,
    pub advantages: Vec<Vec<f32>>,
    pub returns: Vec<Vec<f32>>,
}

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone, Default)]
pub struct PpoSummary {
    /// Metrics of every iteration this process ran (`iteration` is 1-based).
    pub iterations: Vec<Scalars>,
    pub final_dir: PathBuf,
    pub wall_secs: f64,
}

impl PpoSummary {
    /// A metric across iterations.
    pub fn series(&self, key: &str) -> Vec<f64> {
        self.iterations
            .iter()
            .map(|m| m.get(key).copied().unwrap_or(f64::NAN))
            .collect()
    }
}

pub struct PpoTrainer {
    pub cfg: PpoConfig,
    pub policy: CausalLM,
    /// Frozen reference; `None` with LoRA (the policy with adapters disabled is the reference).
    pub reference: Option<CausalLM>,
    pub critic: ValueFunction,
    pub tokenizer: Tokenizer,
    /// Tokenised prompts.
    pub prompts: Vec<Vec<u32>>,
    /// Stop (as if interrupted, without a final save) after this many iterations of this
    /// process — for resume tests.
    pub stop_after: Option<usize>,
    eos: u32,
    pad: u32,
}

/// State carried between iterations (and in checkpoints).
struct IterState {
    iteration: usize,
    beta: f64,
    prompt_epoch: u64,
    prompt_pos: usize,
}

impl PpoTrainer {
    pub fn new(
        cfg: PpoConfig,
        policy: CausalLM,
        reference: Option<CausalLM>,
        critic: ValueFunction,
        tokenizer: Tokenizer,
        prompts: Vec<Vec<u32>>,
    ) -> Result<Self> {
        cfg.validate()?;
        let Some(eos) = tokenizer.eos_id() else {
            bail!("the tokenizer has no EOS token: PPO needs one to end responses")
        };
        if reference.is_none() && policy.lora.is_none() {
            bail!("without LoRA the policy needs a separate frozen reference model")
        }
        if prompts.is_empty() {
            bail!("no prompts")
        }
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            bail!("prompt {i} tokenises to nothing")
        }
        let pad = tokenizer.pad_id();
        Ok(Self {
            cfg,
            policy,
            reference,
            critic,
            tokenizer,
            prompts,
            stop_after: None,
            eos,
            pad,
        })
    }

    /// Log-probs of the reference for a minibatch [n, tr] (detached).
    fn ref_logprobs(&self, mb: &MbInput) -> Result<Tensor> {
        let t = self.cfg.temperature;
        let lp = match &self.reference {
            Some(r) => policy_forward(r, mb, t)?.1,
            None => self
                .policy
                .with_adapters_disabled(|| Ok(policy_forward(&self.policy, mb, t)?.1))?,
        };
        Ok(lp.detach())
    }

    fn next_prompts(&self, st: &mut IterState) -> Vec<usize> {
        let n = self.prompts.len();
        let mut out = Vec::with_capacity(self.cfg.rollout_batch);
        let mut perm = epoch_permutation(self.cfg.seed, st.prompt_epoch, n);
        while out.len() < self.cfg.rollout_batch {
            if st.prompt_pos >= n {
                st.prompt_epoch += 1;
                st.prompt_pos = 0;
                perm = epoch_permutation(self.cfg.seed, st.prompt_epoch, n);
            }
            out.push(perm[st.prompt_pos]);
            st.prompt_pos += 1;
        }
        out
    }

    /// The seeded order of rollout rows for `epoch` of `iteration`, cut into minibatches (of
    /// similar lengths under `group_by_length`).
    fn minibatches(&self, ro: &Rollout, iteration: usize, epoch: usize) -> Vec<Vec<usize>> {
        let e = (iteration * self.cfg.ppo_epochs + epoch) as u64;
        let seed = self.cfg.seed ^ 0x5050_4F5F_4D42;
        if self.cfg.group_by_length {
            // A minibatch pads prompts and responses apart (to its longest of each), and
            // responses often all run to `max_new_tokens`: sort by prompt length, then by
            // response length (one key, lexicographic).
            let span = ro.responses.iter().map(|r| r.len()).max().unwrap_or(0) + 1;
            let keys: Vec<usize> = (0..ro.responses.len())
                .map(|i| self.prompts[ro.prompt_idx[i]].len() * span + ro.responses[i].len())
                .collect();
            return DataOrder::new(seed, self.cfg.minibatch_size.max(1))
                .length_grouped_plan(e, None, &keys);
        }
        let perm = epoch_permutation(seed, e, self.cfg.rollout_batch);
        perm.chunks(self.cfg.minibatch_size)
            .map(|c| c.to_vec())
            .collect()
    }

    fn mb_input(&self, ro: &Rollout, rows: &[usize]) -> Result<MbInput> {
        let p: Vec<&[u32]> = rows
            .iter()
            .map(|&i| self.prompts[ro.prompt_idx[i]].as_slice())
            .collect();
        let r: Vec<&[u32]> = rows.iter().map(|&i| ro.responses[i].as_slice()).collect();
        match self.cfg.pack_sequences {
            true => MbInput::packed(&p, &r, self.pad),
            false => MbInput::new(&p, &r, self.pad),
        }
    }

    fn gen_seed(&self, iteration: usize) -> u64 {
        self.cfg
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add((iteration as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    /// The newest checkpoint whose iteration is `< limit` (or `<= limit` when `inclusive`).
    fn last_good(&self, limit: usize, inclusive: bool) -> String {
        let list = checkpoint::list(&self.cfg.out).unwrap_or_default();
        let good = list.iter().rev().find(|p| {
            let step = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("step-"))
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(usize::MAX);
            if inclusive {
                step <= limit
            } else {
                step < limit
            }
        });
        match good {
            Some(p) => p.display().to_string(),
            None => "none (no checkpoint was saved before this point)".into(),
        }
    }

    fn bad_state(&self, iteration: usize, policy_suspect: bool, what: String) -> anyhow::Error {
        let good = self.last_good(iteration, !policy_suspect);
        anyhow!(
            "ppo: stopping at iteration {}: {what}. No update was applied from this batch. Last good checkpoint: {good}. \
             Continue from it (copy it to be the newest and resume) with a lower learning rate, a larger KL coefficient \
             or a fixed reward.",
            iteration + 1
        )
    }

    /// Phase 1: generate, score, recompute log-probs/values, shape rewards, GAE.
    fn rollout(
        &self,
        reward: &dyn RewardFn,
        st: &mut IterState,
        m: &mut Scalars,
    ) -> Result<Rollout> {
        // No backward follows the rollout: its forwards build no graph.
        let _no_grad = rlhf_model::params::no_grad();
        let cfg = &self.cfg;
        let it = st.iteration;
        let idx = self.next_prompts(st);
        let prompts: Vec<Vec<u32>> = idx.iter().map(|&i| self.prompts[i].clone()).collect();

        // --- generate (KV cache, T, top-k/top-p, stop at EOS, seeded by (seed, iteration))
        let t0 = Instant::now();
        let g = generate(
            &self.policy,
            &prompts,
            &GenerationConfig {
                max_new_tokens: cfg.max_new_tokens,
                temperature: cfg.temperature,
                top_k: cfg.top_k,
                top_p: cfg.top_p,
                seed: self.gen_seed(it),
                eos_ids: vec![self.eos],
                pad_id: self.pad,
                use_cache: true,
                first_row: 0,
            },
        )?;
        let gen_s = t0.elapsed().as_secs_f64();
        let mut ro = Rollout {
            prompt_idx: idx,
            ..Default::default()
        };
        // Truncate after the first EOS (generate stops there; kept explicit).
        for (toks, lps) in g.tokens.into_iter().zip(g.logprobs) {
            let end = toks
                .iter()
                .position(|&t| t == self.eos)
                .map(|p| p + 1)
                .unwrap_or(toks.len());
            ro.finished.push(end > 0 && toks[end - 1] == self.eos);
            ro.responses.push(toks[..end].to_vec());
            ro.gen_logprobs.push(lps[..end].to_vec());
        }
        if let Some(i) = ro.responses.iter().position(|r| r.is_empty()) {
            return Err(self.bad_state(
                it,
                true,
                format!("empty generation: response {i} has no tokens at all"),
            ));
        }
        let n_empty = ro
            .responses
            .iter()
            .filter(|r| r.len() == 1 && r[0] == self.eos)
            .count();
        if n_empty == ro.responses.len() && !cfg.allow_empty_responses {
            return Err(self.bad_state(
                it,
                true,
                format!(
                    "empty generation: all {} responses are empty (EOS first) — the policy collapsed",
                    n_empty
                ),
            ));
        }
        let gen_tokens: usize = ro.responses.iter().map(|r| r.len()).sum();

        // --- score
        let t1 = Instant::now();
        let raw = reward.score(&prompts, &ro.responses)?;
        let score_s = t1.elapsed().as_secs_f64();
        if raw.len() != prompts.len() {
            bail!(
                "the reward function returned {} scores for {} responses",
                raw.len(),
                prompts.len()
            )
        }
        let bad: Vec<usize> = (0..raw.len()).filter(|&i| !raw[i].is_finite()).collect();
        if !bad.is_empty() {
            let text = self
                .tokenizer
                .decode(&ro.responses[bad[0]], false)
                .unwrap_or_default();
            return Err(self.bad_state(
                it,
                false,
                format!(
                    "the reward is not finite ({} for {} of {} responses, e.g. response {}: {:?})",
                    raw[bad[0]],
                    bad.len(),
                    raw.len(),
                    bad[0],
                    text
                ),
            ));
        }
        ro.raw_scores = raw.clone();

        // --- recompute log-probs, reference log-probs and values in epoch 0's minibatches
        let t2 = Instant::now();
        let b = cfg.rollout_batch;
        ro.logprobs = vec![vec![]; b];
        ro.ref_logprobs = vec![vec![]; b];
        ro.values = vec![vec![]; b];
        let mut ent_sum = 0f64;
        let mut ent_n = 0f64;
        for rows in self.minibatches(&ro, it, 0) {
            let mb = self.mb_input(&ro, &rows)?;
            let (h, lp, ent) = policy_forward(&self.policy, &mb, cfg.temperature)?;
            let v = self.critic.values(&mb, &h)?;
            ent_sum += (masked_mean(&ent, &mb.rmask)?.to_scalar::<f32>()? as f64) * mb.n() as f64;
            ent_n += mb.n() as f64;
            let rl = self.ref_logprobs(&mb)?;
            for (k, ((a, r), v)) in mb
                .rows(&lp)?
                .into_iter()
                .zip(mb.rows(&rl)?)
                .zip(mb.rows(&v)?)
                .enumerate()
            {
                ro.logprobs[rows[k]] = a;
                ro.ref_logprobs[rows[k]] = r;
                ro.values[rows[k]] = v;
            }
        }
        let fwd_s = t2.elapsed().as_secs_f64();
        let nonfinite = |rows: &[Vec<f32>]| rows.iter().flatten().any(|x| !x.is_finite());
        if nonfinite(&ro.logprobs) || nonfinite(&ro.ref_logprobs) || nonfinite(&ro.values) {
            return Err(self.bad_state(
                it,
                true,
                "non-finite log-probs or values in the rollout".into(),
            ));
        }
        let gen_diff = ro
            .gen_logprobs
            .iter()
            .flatten()
            .zip(ro.logprobs.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);

        // --- KL to the reference (k1 per token, summed per sequence)
        let kl_tok: Vec<Vec<f32>> = ro
            .logprobs
            .iter()
            .zip(&ro.ref_logprobs)
            .map(|(a, r)| a.iter().zip(r).map(|(x, y)| x - y).collect())
            .collect();
        let kl_seq: Vec<f64> = kl_tok
            .iter()
            .map(|r| r.iter().map(|&x| x as f64).sum())
            .collect();
        let kl = kl_seq.iter().sum::<f64>() / b as f64;
        if cfg.max_kl > 0.0 && kl > cfg.max_kl {
            return Err(self.bad_state(
                it,
                true,
                format!(
                    "KL to the reference exploded: {kl:.3} nats per sequence > max_kl {}",
                    cfg.max_kl
                ),
            ));
        }

        // --- scores: whitening, clipping, no-EOS penalty
        let mut scores = raw.clone();
        if cfg.whiten_scores && scores.len() > 1 {
            let (mean, var) = ragged_mean_var(std::slice::from_ref(&scores));
            let inv = 1.0 / (var + 1e-8).sqrt();
            scores
                .iter_mut()
                .for_each(|s| *s = ((*s as f64 - mean) * inv) as f32);
        }
        if cfg.score_clip > 0.0 {
            let c = cfg.score_clip as f32;
            scores.iter_mut().for_each(|s| *s = s.clamp(-c, c));
        }
        if cfg.penalize_no_eos {
            for (s, &f) in scores.iter_mut().zip(&ro.finished) {
                if !f {
                    *s = cfg.no_eos_penalty as f32;
                }
            }
        }
        ro.scores = scores;

        // --- per-token rewards: −β·kl on every token, + score at the last token
        let beta = st.beta as f32;
        ro.rewards = kl_tok
            .iter()
            .zip(&ro.scores)
            .map(|(k, &s)| {
                let mut r: Vec<f32> = k.iter().map(|x| -beta * x).collect();
                *r.last_mut().expect("non-empty response") += s;
                r
            })
            .collect();
        let non_score: f64 = kl_seq.iter().map(|k| -(beta as f64) * k).sum::<f64>() / b as f64;

        // --- GAE, returns, whitened advantages
        for (r, v) in ro.rewards.iter().zip(&ro.values) {
            let (a, ret) = gae(r, v, cfg.gamma, cfg.lam);
            ro.advantages.push(a);
            ro.returns.push(ret);
        }
        if cfg.whiten_advantages {
            whiten_ragged(&mut ro.advantages);
        }

        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        let (_, raw_var) = ragged_mean_var(std::slice::from_ref(&raw));
        let lens: Vec<f32> = ro.responses.iter().map(|r| r.len() as f32).collect();
        let total_tokens: usize = lens.iter().map(|&l| l as usize).sum();
        m.insert("score/mean".into(), mean(&raw));
        m.insert("score/std".into(), raw_var.sqrt());
        m.insert("score/after_shaping".into(), mean(&ro.scores));
        m.insert("kl/ref".into(), kl);
        m.insert(
            "kl/ref_per_token".into(),
            kl_seq.iter().sum::<f64>() / total_tokens as f64,
        );
        m.insert("kl/beta".into(), st.beta);
        m.insert("reward/non_score".into(), non_score);
        m.insert(
            "reward/total".into(),
            ro.rewards
                .iter()
                .map(|r| r.iter().map(|&x| x as f64).sum::<f64>())
                .sum::<f64>()
                / b as f64,
        );
        m.insert("policy/entropy".into(), ent_sum / ent_n.max(1.0));
        m.insert("response/length".into(), mean(&lens));
        m.insert(
            "response/no_eos_frac".into(),
            ro.finished.iter().filter(|f| !**f).count() as f64 / b as f64,
        );
        m.insert("response/empty_frac".into(), n_empty as f64 / b as f64);
        m.insert(
            "value/explained_variance".into(),
            explained_variance(&ro.values, &ro.returns),
        );
        m.insert("value/mean".into(), ragged_mean_var(&ro.values).0);
        m.insert("sanity/gen_logprob_max_diff".into(), gen_diff as f64);
        m.insert("time/generate_s".into(), gen_s);
        m.insert("time/score_s".into(), score_s);
        m.insert("time/rollout_forward_s".into(), fwd_s);
        m.insert(
            "perf/gen_tokens_per_sec".into(),
            gen_tokens as f64 / gen_s.max(1e-9),
        );
        Ok(ro)
    }

    /// Phase 2: `ppo_epochs` over shuffled minibatches.
    fn update(
        &self,
        ro: &Rollout,
        it: usize,
        opts: &mut (AdamW, AdamW),
        m: &mut Scalars,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let total = cfg.iterations;
        let lr = lr_at(
            it,
            total,
            cfg.warmup_iterations,
            cfg.lr,
            cfg.min_lr_ratio,
            cfg.schedule,
        );
        let clr_base = if cfg.critic_lr > 0.0 {
            cfg.critic_lr
        } else {
            cfg.lr
        };
        let clr = lr * clr_base / cfg.lr.max(f64::MIN_POSITIVE);
        let pparams = opts.0.params().to_vec();
        let cparams = opts.1.params().to_vec();
        let mut seen = HashSet::new();
        let sink_tensors: Vec<&Tensor> = pparams
            .iter()
            .chain(&cparams)
            .map(|p| p.var().as_tensor())
            .filter(|t| seen.insert(t.id()))
            .collect();
        let t0 = Instant::now();
        let mut acc: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
        let mut add = |k: &'static str, v: f64| {
            let e = acc.entry(k).or_insert((0.0, 0.0));
            e.0 += v;
            e.1 += 1.0;
        };
        let mut epochs_run = 0;
        let mut train_tokens = 0usize;
        let mut padded_tokens = 0usize;
        let mut first = true;
        // Grouped minibatches hold different numbers of response tokens: each minibatch's
        // token-mean loss is weighed by its tokens against the average minibatch's.
        let resp_tokens: usize = ro.responses.iter().map(|r| r.len()).sum();
        let n_minibatches = ro.responses.len().div_ceil(cfg.minibatch_size.max(1));
        let avg_mb_tokens = resp_tokens as f64 / n_minibatches.max(1) as f64;
        let _recompute = cfg.gradient_checkpointing.apply();
        for epoch in 0..cfg.ppo_epochs {
            epochs_run += 1;
            let mut epoch_kl = 0f64;
            let mut n_mb = 0f64;
            for rows in self.minibatches(ro, it, epoch) {
                let mb = self.mb_input(ro, &rows)?;
                train_tokens += mb.mask.iter().flatten().filter(|&&x| x != 0).count();
                padded_tokens += mb.slots();
                fn pick<'a>(v: &'a [Vec<f32>], rows: &[usize]) -> Vec<&'a [f32]> {
                    rows.iter().map(|&i| v[i].as_slice()).collect()
                }
                let old_lp = mb.padded(&pick(&ro.logprobs, &rows))?;
                let old_v = mb.padded(&pick(&ro.values, &rows))?;
                let adv = mb.padded(&pick(&ro.advantages, &rows))?;
                let ret = mb.padded(&pick(&ro.returns, &rows))?;

                // The fused ops write weight gradients into the sink, candle returns the rest.
                // Installed before the forward: GPT-2's and Llama's blocks then run as one node each
                // (`rlhf_model::kernels::block`).
                let sink = GradSink::install(&sink_tensors)?;
                let (h, new_lp, ent) = policy_forward(&self.policy, &mb, cfg.temperature)?;
                // Clipped surrogate.
                let logratio = (&new_lp - &old_lp)?;
                let ratio = logratio.exp()?;
                let pg1 = (adv.neg()? * &ratio)?;
                let pg2 = (adv.neg()? * ratio.clamp(1.0 - cfg.cliprange, 1.0 + cfg.cliprange)?)?;
                let pg_loss = masked_mean(&pg1.maximum(&pg2)?, &mb.rmask)?;
                // Clipped value loss.
                let vpred = self.critic.values(&mb, &h)?;
                let vclip = (&old_v
                    + (&vpred - &old_v)?.clamp(-cfg.cliprange_value, cfg.cliprange_value)?)?;
                let vf1 = (&vpred - &ret)?.sqr()?;
                let vf2 = (&vclip - &ret)?.sqr()?;
                let vf_loss = (masked_mean(&vf1.maximum(&vf2)?, &mb.rmask)? * 0.5)?;
                let mut loss = (&pg_loss + (&vf_loss * cfg.vf_coef)?)?;
                let ent = masked_mean(&ent, &mb.rmask)?;
                if cfg.ent_coef != 0.0 {
                    loss = (loss - (&ent * cfg.ent_coef)?)?;
                }

                // Statistics (detached).
                let lr_d = logratio.detach();
                let approx_kl =
                    masked_mean(&(lr_d.sqr()? * 0.5)?, &mb.rmask)?.to_scalar::<f32>()? as f64;
                let ratio_d = ratio.detach();
                let clipped =
                    (ratio_d.affine(1.0, -1.0)?.abs()?.gt(cfg.cliprange)?).to_dtype(DType::F32)?;
                let clipfrac = masked_mean(&clipped, &mb.rmask)?.to_scalar::<f32>()? as f64;
                let vclipped = (vpred.detach() - &old_v)?
                    .abs()?
                    .gt(cfg.cliprange_value)?
                    .to_dtype(DType::F32)?;
                let vf_clipfrac = masked_mean(&vclipped, &mb.rmask)?.to_scalar::<f32>()? as f64;
                if first {
                    let dev = mb
                        .rows(&ratio_d.affine(1.0, -1.0)?.abs()?)?
                        .into_iter()
                        .flatten()
                        .fold(0f32, f32::max);
                    m.insert("sanity/first_mb_ratio_dev".into(), dev as f64);
                    m.insert("sanity/first_mb_approx_kl".into(), approx_kl);
                    first = false;
                }
                let lv = loss.to_scalar::<f32>()? as f64;
                add("loss/total", lv);
                add("loss/policy", pg_loss.to_scalar::<f32>()? as f64);
                add("loss/value", vf_loss.to_scalar::<f32>()? as f64);
                add("policy/approx_kl", approx_kl);
                add("policy/clipfrac", clipfrac);
                add(
                    "policy/ratio_mean",
                    masked_mean(&ratio_d, &mb.rmask)?.to_scalar::<f32>()? as f64,
                );
                add("policy/train_entropy", ent.to_scalar::<f32>()? as f64);
                add("value/clipfrac", vf_clipfrac);
                epoch_kl += approx_kl;
                n_mb += 1.0;

                // Backward once; the policy and critic graphs share the trunk when shared.
                let finite_loss = lv.is_finite();
                let grads = if !finite_loss {
                    None
                } else if cfg.group_by_length {
                    let mb_tokens: usize = rows.iter().map(|&i| ro.responses[i].len()).sum();
                    Some((loss * (mb_tokens as f64 / avg_mb_tokens))?.backward()?)
                } else {
                    Some(loss.backward()?)
                };
                let sunk: HashMap<_, _> = sink_tensors
                    .iter()
                    .zip(sink.take()?)
                    .filter_map(|(t, s)| s.map(|s| (t.id(), s)))
                    .collect();
                drop(sink);
                let collect = |ps: &[Param]| -> Result<Vec<Option<Tensor>>> {
                    ps.iter()
                        .map(|p| {
                            let t = p.var().as_tensor();
                            let c = grads.as_ref().and_then(|g| g.get(t).cloned());
                            Ok(sum_grads(c, sunk.get(&t.id()).cloned())?)
                        })
                        .collect()
                };
                let mut pg = collect(&pparams)?;
                let mut cg = collect(&cparams)?;
                let pn = grad_norm(&pg)?;
                let cn = grad_norm(&cg)?;
                if !finite_loss || !pn.is_finite() || !cn.is_finite() {
                    return Err(self.bad_state(
                        it,
                        false,
                        format!(
                            "non-finite PPO loss ({lv}) or gradient norm (policy {pn}, critic {cn}) in epoch {}",
                            epoch + 1
                        ),
                    ));
                }
                add("grad_norm/policy", pn);
                add("grad_norm/critic", cn);
                clip_grads(&mut pg, pn, cfg.max_grad_norm)?;
                clip_grads(&mut cg, cn, cfg.max_grad_norm)?;
                if it >= cfg.critic_warmup_iterations {
                    opts.0.step(&pg, lr)?;
                }
                opts.1.step(&cg, clr)?;
            }
            // Early stop of the remaining epochs when the policy moved too far from the rollout.
            if cfg.target_approx_kl > 0.0 && epoch_kl / n_mb.max(1.0) > cfg.target_approx_kl {
                break;
            }
        }
        let train_s = t0.elapsed().as_secs_f64();
        for (k, (s, n)) in acc {
            m.insert(k.into(), s / n.max(1.0));
        }
        m.insert("epochs_run".into(), epochs_run as f64);
        m.insert("lr".into(), lr);
        m.insert("time/train_s".into(), train_s);
        m.insert(
            "perf/train_tokens_per_sec".into(),
            train_tokens as f64 / train_s.max(1e-9),
        );
        m.insert(
            "batch/real_tokens".into(),
            train_tokens as f64 / padded_tokens.max(1) as f64,
        );
        Ok(())
    }

    fn save(&self, st: &IterState, opts: &(AdamW, AdamW)) -> Result<PathBuf> {
        let mut w = BTreeMap::new();
        let mut o = Vec::new();
        for (pre, opt) in [("policy.", &opts.0), ("critic.", &opts.1)] {
            for p in opt.params() {
                w.insert(format!("{pre}{}", p.name()), p.var().as_tensor().detach());
            }
            for (k, v) in opt.state_views() {
                o.push((format!("{pre}{k}"), v));
            }
        }
        let state = LoopState {
            step: st.iteration,
            epoch: st.prompt_epoch,
            position: st.prompt_pos,
            optimizer_t: opts.0.t,
            nonfinite_total: 0,
            seed: self.cfg.seed,
            extra: serde_json::json!({
                "beta": st.beta,
                "critic_optimizer_t": opts.1.t,
                "prompt_epoch": st.prompt_epoch,
                "prompt_position": st.prompt_pos,
            }),
        };
        checkpoint::save(&self.cfg.out, &state, &w, o, self.cfg.keep_last)
    }

    fn restore(&self, ck: &checkpoint::Checkpoint, opts: &mut (AdamW, AdamW)) -> Result<IterState> {
        let strip = |m: &BTreeMap<String, Tensor>, pre: &str| -> BTreeMap<String, Tensor> {
            m.iter()
                .filter_map(|(k, v)| k.strip_prefix(pre).map(|s| (s.to_string(), v.clone())))
                .collect()
        };
        let ex = &ck.state.extra;
        let beta = ex
            .get("beta")
            .and_then(|v| v.as_f64())
            .with_context(|| format!("{}: not a PPO checkpoint (no β)", ck.dir.display()))?;
        let ct = ex
            .get("critic_optimizer_t")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        restore_params(opts.0.params(), &strip(&ck.weights, "policy."))?;
        restore_params(opts.1.params(), &strip(&ck.weights, "critic."))?;
        opts.0
            .load_state(ck.state.optimizer_t, &strip(&ck.optimizer, "policy."))?;
        opts.1.load_state(ct, &strip(&ck.optimizer, "critic."))?;
        Ok(IterState {
            iteration: ck.state.step,
            beta,
            prompt_epoch: ck.state.epoch,
            prompt_pos: ck.state.position,
        })
    }

    fn write_samples(&self, ro: &Rollout, it: usize) -> Result<()> {
        if self.cfg.log_samples == 0 {
            return Ok(());
        }
        let path = self.cfg.out.join("samples.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}", path.display()))?;
        for i in 0..self.cfg.log_samples.min(ro.responses.len()) {
            let prompt = self
                .tokenizer
                .decode(&self.prompts[ro.prompt_idx[i]], true)?;
            let response = self.tokenizer.decode(&ro.responses[i], false)?;
            let line = serde_json::json!({
                "iteration": it + 1, "prompt": prompt, "response": response,
                "score": ro.raw_scores[i], "eos": ro.finished[i],
            });
            writeln!(f, "{line}")?;
        }
        Ok(())
    }

    /// Run PPO; resumes from the newest checkpoint in `cfg.out` when `resume`.
    pub fn run(&mut self, reward: &dyn RewardFn, resume: bool) -> Result<PpoSummary> {
        let cfg = self.cfg.clone();
        std::fs::create_dir_all(&cfg.out)?;
        let adam = |wd| AdamWConfig {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.adam_eps,
            weight_decay: wd,
        };
        let mut opts = (
            AdamW::new(self.policy.params.trainable(), adam(cfg.weight_decay))?,
            AdamW::new(self.critic.trainable(), adam(cfg.weight_decay))?,
        );
        let mut st = IterState {
            iteration: 0,
            beta: cfg.init_kl_coef,
            prompt_epoch: 0,
            prompt_pos: 0,
        };
        if resume {
            if let Some(ck) = checkpoint::latest(&cfg.out)? {
                st = self.restore(&ck, &mut opts)?;
                eprintln!(
                    "[ppo] resuming from {} (iteration {}, β {:.4})",
                    ck.dir.display(),
                    st.iteration,
                    st.beta
                );
            }
        }
        let mut metrics = MetricsWriter::open(&cfg.out)?;
        let progress = Progress::new("ppo", cfg.iterations, st.iteration);
        let start = Instant::now();
        let mut summary = PpoSummary {
            final_dir: cfg.out.join("final"),
            ..Default::default()
        };
        let mut this_process = 0usize;
        if st.iteration == 0 && cfg.save_every > 0 {
            // The starting point (policy = reference) is always a good state to fall back to.
            self.save(&st, &opts)?;
        }
        while st.iteration < cfg.iterations {
            if self.stop_after.is_some_and(|n| this_process >= n) {
                summary.wall_secs = start.elapsed().as_secs_f64();
                return Ok(summary);
            }
            let it = st.iteration;
            let mut m = Scalars::new();
            m.insert("iteration".into(), (it + 1) as f64);
            let ro = self.rollout(reward, &mut st, &mut m)?;
            self.update(&ro, it, &mut opts, &mut m)?;
            self.write_samples(&ro, it)?;
            let kl = m["kl/ref"];
            if cfg.adaptive_kl {
                st.beta = adaptive_kl_update(
                    st.beta,
                    kl,
                    cfg.target_kl,
                    cfg.kl_horizon,
                    cfg.rollout_batch,
                );
            }
            st.iteration += 1;
            this_process += 1;
            metrics.log(st.iteration, &m)?;
            progress.update(
                st.iteration,
                &format!(
                    "score {:.3} kl {:.3} β {:.3} len {:.1} gen {:.0} tok/s train {:.0} tok/s",
                    m["score/mean"],
                    kl,
                    m["kl/beta"],
                    m["response/length"],
                    m["perf/gen_tokens_per_sec"],
                    m["perf/train_tokens_per_sec"]
                ),
                true,
            );
            summary.iterations.push(m);
            if cfg.save_every > 0
                && st.iteration.is_multiple_of(cfg.save_every)
                && st.iteration < cfg.iterations
            {
                self.save(&st, &opts)?;
            }
        }
        self.save(&st, &opts)?;
        save_policy(&self.policy, &self.tokenizer, &summary.final_dir)?;
        summary.wall_secs = start.elapsed().as_secs_f64();
        progress.finish(&format!("{} iterations", st.iteration));
        Ok(summary)
    }
}

/// Tokenise prompts, skipping those longer than `max_len` tokens (with a count on stderr).
pub fn tokenize_prompts(
    tok: &Tokenizer,
    prompts: &[Prompt],
    max_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(prompts.len());
    let mut skipped = 0usize;
    for p in prompts {
        let ids = tokenize_prompt(tok, p)?;
        if ids.is_empty() || ids.len() > max_len {
            skipped += 1;
        } else {
            out.push(ids);
        }
    }
    if skipped > 0 {
        eprintln!(
            "ppo: skipped {skipped} of {} prompts (empty or longer than max_prompt_len = {max_len} tokens)",
            prompts.len()
        );
    }
    if out.is_empty() {
        bail!(
            "no usable prompts (all {} empty or too long)",
            prompts.len()
        )
    }
    Ok(out)
}

/// Run PPO from a config: load the policy (LoRA optional), the reference (the same weights,
/// frozen; with LoRA the adapters-disabled policy), the critic per `cfg.critic`, the prompts;
/// then train against `reward`.
pub fn run_ppo(cfg: &PpoConfig, reward: &dyn RewardFn, resume: bool) -> Result<PpoSummary> {
    cfg.validate()?;
    let loaded = rlhf_model::load::load(&cfg.policy)?;
    let Some(tok) = loaded.tokenizer else {
        bail!("{}: no tokenizer with the policy model", cfg.policy)
    };
    let mut policy = loaded.model;
    let critic = match cfg.critic {
        CriticInit::RewardModel => {
            let Some(dir) = &cfg.reward_model else {
                bail!(
                    "critic = \"reward_model\" initialises the value function from the reward model: set `reward_model` to its directory, or use critic = \"policy\" or \"shared\""
                )
            };
            let (rm, _) = RewardModel::load(dir)?;
            if rm.model.hidden_size() != policy.hidden_size() {
                eprintln!(
                    "ppo: the critic (reward model, d={}) and policy (d={}) differ in size; that is fine for a separate critic",
                    rm.model.hidden_size(),
                    policy.hidden_size()
                );
            }
            ValueFunction::from_reward_model(rm)
        }
        CriticInit::Policy => ValueFunction::separate(trainable_copy(&policy)?)?,
        CriticInit::Shared => ValueFunction::shared(policy.hidden_size())?,
    };
    let mut critic = critic;
    if let Some(l) = &cfg.critic_lora {
        critic.add_lora(l, cfg.seed ^ 0xC417)?;
    }
    let reference = match &cfg.lora {
        Some(l) => {
            let n = policy.add_lora(l, cfg.seed)?;
            eprintln!(
                "LoRA r={} on {n} layers: {} trainable of {} parameters; reference = adapters disabled",
                l.r,
                policy.params.num_elements(true),
                policy.params.num_elements(false)
            );
            None
        }
        None => match &cfg.reference {
            // A later round continues from an improved policy but keeps the SFT model as the
            // KL anchor.
            Some(r) => {
                let rm = rlhf_model::load::load(r)?.model;
                if rm.config.vocab_size() != policy.config.vocab_size() {
                    bail!(
                        "reference {r} has vocabulary {}, the policy {}",
                        rm.config.vocab_size(),
                        policy.config.vocab_size()
                    )
                }
                rm.params.set_trainable_where(|_| true, false);
                Some(rm)
            }
            None => Some(frozen_copy(&policy)?),
        },
    };
    if cfg.lora.is_some() && cfg.reference.is_some() {
        bail!(
            "with LoRA the reference is the policy with adapters disabled: leave `reference` unset"
        )
    }
    let prompts = if cfg.prompt_words > 0 {
        load_text_prompts(&cfg.prompts, cfg.prompt_words)?
    } else {
        load_prompts(&cfg.prompts)?
    };
    let mut prompts = tokenize_prompts(&tok, &prompts, cfg.max_prompt_len)
        .with_context(|| format!("{}", cfg.prompts.display()))?;
    if cfg.max_prompts > 0 {
        prompts.truncate(cfg.max_prompts);
    }
    // An update minibatch: one backward through the policy (LM head on its responses) and a
    // separate critic (scalar head), each with its own shape and trained parameters.
    let len = prompts
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(cfg.max_prompt_len)
        + cfg.max_new_tokens;
    let policy_step = crate::memory::StepShape {
        rows: cfg.minibatch_size,
        len,
        lm_head_rows: cfg.minibatch_size,
    };
    let critic_step = crate::memory::StepShape {
        lm_head_rows: 0,
        ..policy_step
    };
    let mut parts = vec![(&policy, policy_step)];
    if let Some(m) = critic.model() {
        parts.push((m, critic_step));
    }
    let mut planned = cfg.clone();
    planned.gradient_checkpointing = crate::memory::plan("ppo", &parts, cfg.gradient_checkpointing);
    std::fs::create_dir_all(&cfg.out)?;
    crate::trainer::write_run_config(&cfg.out, cfg)?;
    let mut t = PpoTrainer::new(planned, policy, reference, critic, tok, prompts)?;
    t.run(reward, resume)
}
