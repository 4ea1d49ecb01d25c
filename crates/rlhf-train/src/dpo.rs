//! Direct preference optimisation and relatives: train the policy on preference pairs against a
//! frozen reference, no reward model, no sampling.
//!
//! With `h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))` (sequence log-probs
//! summed over the *response* tokens only):
//!
//! | `loss` | per pair |
//! |---|---|
//! | `sigmoid` (DPO) | `−log σ(βh)`; with `label_smoothing` ε: `−(1−ε) log σ(βh) − ε log σ(−βh)` |
//! | `cdpo` | the same with ε = `label_smoothing` (conservative DPO: ε of the labels may be flipped) |
//! | `ipo` | `(h − 1/(2β))²` |
//! | `rpo` | DPO + `rpo_alpha` · NLL of the chosen response (mean per token over the batch) |
//! | `hinge` | `max(0, 1 − βh)` (SLiC) |
//!
//! The reference is the SFT model: a frozen copy, or — with LoRA — the same model with its
//! adapters disabled. Its log-probs are computed ONCE for every pair (train and eval) before
//! training, kept in memory and written to `out/ref_logps.json`, so a resumed run does not
//! recompute them (and needs no second copy of the weights).
//!
//! Logged: `loss`, the implicit rewards `rewards_chosen`/`rewards_rejected`
//! (`β·(log π − log π_ref)`), `reward_margin`, `reward_accuracy` (chosen > rejected; at step 0
//! every pair is a tie, so it starts at 0), `logps_chosen`/`logps_rejected` and `nll_chosen`
//! (per token).
//!
//! **"The chosen reward goes down" is usually normal.** DPO only constrains the *difference* of
//! the log-ratios. Both log π(y_w) and log π(y_l) commonly fall during training (probability mass
//! moves to sequences that are in neither set — the policy sharpens toward its own modes), with
//! the rejected one falling faster: the chosen implicit reward turns negative while the margin
//! and the accuracy grow. That is fine. It is *not* fine when the margin stops growing (or the
//! held-out accuracy stalls) while both rewards keep falling, or when `nll_chosen` climbs steeply
//! (the policy is unlearning the preferred answers — degenerate, often longer or repetitive
//! outputs). Then lower the learning rate, raise β, or use `rpo` (the NLL term anchors the chosen
//! responses' likelihood).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rlhf_data::batch::{
    collate_pairs, collate_shared_pairs, key_ratio, length_chunks, Batch, SharedBatch,
    SharedPairBatch,
};
use rlhf_data::formats::PreferencePair;
use rlhf_data::tokenize::{PairTokenizeConfig, TokenizedPair};
use rlhf_model::params::Param;
use rlhf_model::{CausalLM, LoraConfig, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::metrics::Scalars;
use crate::reward::{
    accuracy_report, batch_tensors, log_sigmoid, pair_batch_tokens, softplus_f64,
    tokenize_pairs_warn, train_eval_pairs, train_last_layers, AccuracyReport,
};
use crate::sft::{load_policy, save_policy};
use crate::trainer::{Objective, RunSummary, StepOut, TrainConfig, Trainer};

/// The preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    #[default]
    Sigmoid,
    Ipo,
    Cdpo,
    Rpo,
    Hinge,
}

impl std::str::FromStr for DpoLoss {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "sigmoid" | "dpo" => DpoLoss::Sigmoid,
            "ipo" => DpoLoss::Ipo,
            "cdpo" => DpoLoss::Cdpo,
            "rpo" => DpoLoss::Rpo,
            "hinge" => DpoLoss::Hinge,
            _ => bail!("unknown DPO loss `{s}`: expected sigmoid, ipo, cdpo, rpo or hinge"),
        })
    }
}

/// The loss and its coefficients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoLossParams {
    pub loss: DpoLoss,
    pub beta: f64,
    /// ε for `cdpo` (and `sigmoid`, where it is 0 by default).
    pub label_smoothing: f64,
    /// Weight of the chosen NLL for `rpo`.
    pub rpo_alpha: f64,
}

impl Default for DpoLossParams {
    fn default() -> Self {
        Self {
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            rpo_alpha: 1.0,
        }
    }
}

impl DpoLossParams {
    pub fn validate(&self) -> Result<()> {
        if self.beta.is_nan() || self.beta <= 0.0 {
            bail!("beta must be positive, got {}", self.beta)
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!(
                "label_smoothing must be in [0, 0.5), got {}",
                self.label_smoothing
            )
        }
        if self.loss == DpoLoss::Cdpo && self.label_smoothing == 0.0 {
            bail!("loss = \"cdpo\" needs label_smoothing > 0 (e.g. 0.1)")
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    /// The policy to train: usually the SFT model (HF directory, .gguf file or cached hub id).
    pub model: String,
    /// The reference; absent = `model` (with LoRA: always the policy with adapters disabled).
    pub reference: Option<String>,
    pub data: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub eval_fraction: f64,
    pub max_examples: usize,
    pub lenient: bool,
    pub out: PathBuf,
    pub max_len: usize,
    pub max_prompt_len: Option<usize>,
    /// `sigmoid` (DPO), `ipo`, `cdpo`, `rpo` or `hinge`.
    pub loss: DpoLoss,
    pub beta: f64,
    /// ε of `cdpo` (also applied to `sigmoid`/`rpo` when set).
    pub label_smoothing: f64,
    /// Weight of the chosen NLL in `rpo`.
    pub rpo_alpha: f64,
    /// Train only the last N transformer layers (with LoRA: only their adapters).
    pub train_last_layers: Option<usize>,
    pub lora: Option<LoraConfig>,
    /// Compute each prompt once per batch: a pair's (or a ranking's) responses follow their
    /// prompt in one row, each attending to the prompt and itself
    /// ([`rlhf_data::batch::SharedPairBatch`]). The same log-probs and gradients as one row per
    /// response, up to float rounding, from fewer tokens. `false`: one row of prompt +
    /// response per response. (The reference pass always shares prompts.)
    pub share_prompts: bool,
    pub train: TrainConfig,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            reference: None,
            data: PathBuf::new(),
            eval_data: None,
            eval_fraction: 0.05,
            max_examples: 0,
            lenient: false,
            out: PathBuf::from("runs/dpo"),
            max_len: 512,
            max_prompt_len: None,
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            rpo_alpha: 1.0,
            train_last_layers: None,
            lora: None,
            share_prompts: true,
            train: TrainConfig {
                lr: 5e-7,
                warmup_steps: 10,
                ..TrainConfig::default()
            },
        }
    }
}

impl DpoConfig {
    /// The loss and its coefficients.
    pub fn loss_params(&self) -> DpoLossParams {
        DpoLossParams {
            loss: self.loss,
            beta: self.beta,
            label_smoothing: self.label_smoothing,
            rpo_alpha: self.rpo_alpha,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Losses
// ---------------------------------------------------------------------------------------------

/// The batch loss (mean over pairs) from sequence log-probs `[B]` of the policy and the
/// reference. `chosen_tokens[i]` is the number of response tokens of chosen response `i` (RPO
/// divides the chosen NLL by their sum).
pub fn dpo_loss(
    p: &DpoLossParams,
    pol_chosen: &Tensor,
    pol_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    chosen_tokens: &[usize],
) -> Result<Tensor> {
    let h = ((pol_chosen - ref_chosen)? - (pol_rejected - ref_rejected)?)?;
    let beta = p.beta;
    let z = (&h * beta)?;
    let sig = |eps: f64| -> Result<Tensor> {
        let a = (log_sigmoid(&z)? * (-(1.0 - eps)))?;
        if eps == 0.0 {
            return Ok(a.mean_all()?);
        }
        let b = (log_sigmoid(&z.neg()?)? * (-eps))?;
        Ok((a + b)?.mean_all()?)
    };
    Ok(match p.loss {
        DpoLoss::Sigmoid | DpoLoss::Cdpo => sig(p.label_smoothing)?,
        DpoLoss::Ipo => (h - 1.0 / (2.0 * beta))?.sqr()?.mean_all()?,
        DpoLoss::Hinge => (z.neg()? + 1.0)?.relu()?.mean_all()?,
        DpoLoss::Rpo => {
            let n: usize = chosen_tokens.iter().sum();
            if n == 0 {
                bail!("rpo: the chosen responses have no tokens")
            }
            let nll = (pol_chosen.sum_all()?.neg()? / n as f64)?;
            (sig(p.label_smoothing)? + (nll * p.rpo_alpha)?)?
        }
    })
}

/// The same loss on the host, for one pair (tests, reports): value only.
pub fn dpo_loss_value(p: &DpoLossParams, h: f64) -> f64 {
    let z = p.beta * h;
    let e = p.label_smoothing;
    match p.loss {
        DpoLoss::Sigmoid | DpoLoss::Cdpo | DpoLoss::Rpo => {
            (1.0 - e) * softplus_f64(-z) + e * softplus_f64(z)
        }
        DpoLoss::Ipo => (h - 1.0 / (2.0 * p.beta)).powi(2),
        DpoLoss::Hinge => (1.0 - z).max(0.0),
    }
}

// ---------------------------------------------------------------------------------------------
// Sequence log-probs
// ---------------------------------------------------------------------------------------------

/// Sum over the response tokens (`loss_mask`) of each row's token log-probs: `[n]`, tracked for
/// gradients, and the number of response tokens per row. Only response positions go through the
/// LM head (prompt positions are skipped before the vocabulary projection).
pub fn response_logps(model: &CausalLM, b: &Batch) -> Result<(Tensor, Vec<usize>)> {
    let (n, t) = (b.batch, b.seq_len);
    if t < 2 {
        bail!("preference batch with sequences shorter than 2 tokens")
    }
    let (ids, mask) = batch_tensors(b)?;
    let mut idx = Vec::new();
    let mut targets = Vec::new();
    let mut row_of = Vec::new();
    let mut counts = vec![0usize; n];
    for (r, count) in counts.iter_mut().enumerate() {
        for j in 0..t - 1 {
            if b.loss_mask[r * t + j + 1] != 0 {
                idx.push((r * (t - 1) + j) as u32);
                targets.push(b.input_ids[r * t + j + 1]);
                row_of.push(r);
                *count += 1;
            }
        }
    }
    if let Some(r) = counts.iter().position(|&c| c == 0) {
        bail!("row {r} of a preference batch has no response tokens")
    }
    let d = model.hidden_size();
    let h = model
        .hidden(&ids, &mask)?
        .narrow(1, 0, t - 1)?
        .reshape((n * (t - 1), d))?;
    let sums = summed_logps(
        model,
        &h,
        Predicted {
            idx,
            targets,
            owner: row_of,
        },
        n,
    )?;
    Ok((sums, counts))
}

/// Which hidden states predict which tokens, and whose sum each belongs to.
struct Predicted {
    /// Rows of the flattened hidden states.
    idx: Vec<u32>,
    /// The token each of them predicts.
    targets: Vec<u32>,
    /// The sequence (`0..n`) each belongs to.
    owner: Vec<usize>,
}

/// Per sequence `0..n`, the sum of log p(target) over its predicted tokens: only those rows of
/// `hidden` (`[rows, d]`) go through the LM head, fused with the log-softmax
/// ([`CausalLM::head_logprobs`]: one `[tokens × vocab]` buffer with gradients, none without).
/// `[n]`, tracked for gradients.
fn summed_logps(model: &CausalLM, hidden: &Tensor, p: Predicted, n: usize) -> Result<Tensor> {
    let k = p.idx.len();
    let sel = hidden.index_select(&Tensor::from_vec(p.idx, (k,), &Device::Cpu)?, 0)?;
    let lp = model.head_logprobs(&sel, &Tensor::from_vec(p.targets, (k,), &Device::Cpu)?, 1.0)?;
    let mut seg = vec![0f32; n * k];
    for (i, &r) in p.owner.iter().enumerate() {
        seg[r * k + i] = 1.0;
    }
    let seg = Tensor::from_vec(seg, (n, k), &Device::Cpu)?;
    Ok(seg.matmul(&lp.reshape((k, 1))?)?.squeeze(1)?)
}

/// Log-probs of the distinct responses of a shared-prompt batch, each summed over its tokens:
/// `[sb.responses.len()]`, tracked for gradients, and each one's token count. Every prompt is
/// computed once ([`CausalLM::hidden_prefix_rows`]); only response positions go through the
/// LM head. The numbers of [`response_logps`] on rows of prompt + response.
pub fn shared_response_logps(model: &CausalLM, sb: &SharedBatch) -> Result<(Tensor, Vec<usize>)> {
    let (n, t) = (sb.rows.len(), sb.seq_len);
    let mut idx = Vec::new();
    let mut targets = Vec::new();
    let mut resp_of = Vec::new();
    let mut counts = vec![0usize; sb.responses.len()];
    for (k, r) in sb.responses.iter().enumerate() {
        for j in 0..r.len {
            if let Some(slot) = r.predictor(j) {
                idx.push((r.row * t + slot) as u32);
                targets.push(sb.input_ids[r.row * t + r.start + j]);
                resp_of.push(k);
                counts[k] += 1;
            }
        }
    }
    if let Some(k) = counts.iter().position(|&c| c == 0) {
        bail!("response {k} of a preference batch has no predicted tokens (empty response, or a one-token response to an empty prompt)")
    }
    let ids = Tensor::from_vec(sb.input_ids.clone(), (n, t), &Device::Cpu)?;
    let h = model.hidden_prefix_rows(&ids, &sb.rows)?;
    let h = h.reshape((n * t, h.dim(2)?))?;
    let p = Predicted {
        idx,
        targets,
        owner: resp_of,
    };
    Ok((summed_logps(model, &h, p, sb.responses.len())?, counts))
}

/// [`shared_response_logps`] per pair: `[2B]` (chosen first, then rejected, as
/// [`response_logps`] on a [`rlhf_data::batch::PairBatch`]) and the token counts in that order.
pub fn shared_pair_logps(model: &CausalLM, sb: &SharedPairBatch) -> Result<(Tensor, Vec<usize>)> {
    let (lp, counts) = shared_response_logps(model, &sb.batch)?;
    let order = sb.pair_order();
    let idx: Vec<u32> = order.iter().map(|&i| i as u32).collect();
    let lp = lp.index_select(&Tensor::from_vec(idx, (order.len(),), &Device::Cpu)?, 0)?;
    Ok((lp, order.iter().map(|&i| counts[i]).collect()))
}

/// Reference log-probs `(chosen, rejected)` of every pair, no gradients, in chunks of `batch`
/// pairs of similar lengths ([`length_chunks`]), each prompt computed once per chunk. With LoRA,
/// computed with the adapters disabled.
pub fn reference_logps(
    model: &CausalLM,
    pairs: &[TokenizedPair],
    pad: u32,
    batch: usize,
) -> Result<Vec<[f32; 2]>> {
    let _no_grad = rlhf_model::params::no_grad();
    let run = || -> Result<Vec<[f32; 2]>> {
        let mut out = vec![[0f32; 2]; pairs.len()];
        let lens: Vec<usize> = pairs.iter().map(TokenizedPair::shared_len).collect();
        for chunk in length_chunks(&lens, batch) {
            let kr = key_ratio(model.hidden_size());
            let sb = collate_shared_pairs(chunk.iter().map(|&i| &pairs[i]), pad, kr);
            let (lp, _) = shared_response_logps(model, &sb.batch)?;
            let v: Vec<f32> = lp.detach().to_vec1()?;
            for (&i, [c, r]) in chunk.iter().zip(&sb.pair_responses) {
                out[i] = [v[*c], v[*r]];
            }
        }
        Ok(out)
    };
    if model.lora.is_some() {
        model.with_adapters_disabled(run)
    } else {
        run()
    }
}

// ---------------------------------------------------------------------------------------------
// Objective
// ---------------------------------------------------------------------------------------------

pub struct DpoObjective {
    pub model: CausalLM,
    pub tokenizer: Tokenizer,
    pub train: Vec<TokenizedPair>,
    pub eval: Vec<TokenizedPair>,
    /// Reference `(chosen, rejected)` log-probs, aligned with `train` / `eval`.
    pub ref_train: Vec<[f32; 2]>,
    pub ref_eval: Vec<[f32; 2]>,
    pub params: DpoLossParams,
    pub eval_batch: usize,
    /// Implicit rewards `(chosen, rejected)` and metrics of the latest [`Objective::evaluate`].
    pub last_eval: Option<(Vec<f32>, Vec<f32>, Scalars)>,
    /// Batches compute each prompt once ([`DpoConfig::share_prompts`]).
    pub share_prompts: bool,
}

/// Per-pair host values of one batch.
struct PairStats {
    pol: Vec<[f32; 2]>,
    refs: Vec<[f32; 2]>,
    chosen_tokens: Vec<usize>,
}

impl DpoObjective {
    /// A new objective; computes the reference log-probs with `model` itself (before any
    /// update it *is* the reference; with LoRA its adapters are disabled for this).
    pub fn new(
        model: CausalLM,
        tokenizer: Tokenizer,
        train: Vec<TokenizedPair>,
        eval: Vec<TokenizedPair>,
        params: DpoLossParams,
    ) -> Result<Self> {
        let pad = tokenizer.pad_id();
        let ref_train = reference_logps(&model, &train, pad, 8)?;
        let ref_eval = reference_logps(&model, &eval, pad, 8)?;
        Ok(Self {
            model,
            tokenizer,
            train,
            eval,
            ref_train,
            ref_eval,
            params,
            eval_batch: 8,
            last_eval: None,
            share_prompts: true,
        })
    }

    /// Loss and per-pair values for pairs `rows` with reference values `refs`.
    fn batch_loss(
        &self,
        rows: &[&TokenizedPair],
        refs: &[[f32; 2]],
    ) -> Result<(Tensor, PairStats, usize)> {
        let b = rows.len();
        let pad = self.tokenizer.pad_id();
        let (lp, counts, tokens) = if self.share_prompts {
            let kr = key_ratio(self.model.hidden_size());
            let sb = collate_shared_pairs(rows.iter().copied(), pad, kr);
            let (lp, counts) = shared_pair_logps(&self.model, &sb)?;
            (lp, counts, sb.batch.real_tokens())
        } else {
            let pb = collate_pairs(rows.iter().copied(), pad);
            let (lp, counts) = response_logps(&self.model, &pb.batch)?;
            (lp, counts, pb.batch.real_tokens())
        };
        let pc = lp.narrow(0, 0, b)?;
        let pr = lp.narrow(0, b, b)?;
        let rc = Tensor::from_vec(refs.iter().map(|r| r[0]).collect(), (b,), &Device::Cpu)?;
        let rr = Tensor::from_vec(refs.iter().map(|r| r[1]).collect(), (b,), &Device::Cpu)?;
        let chosen_tokens = counts[..b].to_vec();
        let loss = dpo_loss(&self.params, &pc, &pr, &rc, &rr, &chosen_tokens)?;
        let v: Vec<f32> = lp.detach().to_vec1()?;
        let stats = PairStats {
            pol: (0..b).map(|i| [v[i], v[b + i]]).collect(),
            refs: refs.to_vec(),
            chosen_tokens,
        };
        Ok((loss, stats, tokens))
    }

    /// The width each pair takes in a batch: its row in a shared-prompt batch, the longer of
    /// its two rows otherwise.
    fn lengths_of(&self, pairs: &[TokenizedPair]) -> Vec<usize> {
        pairs.iter().map(|p| p.width(self.share_prompts)).collect()
    }

    /// The loss and per-pair values of a policy equal to the reference, from the reference
    /// log-probs alone (no forward): what [`Self::batch_loss`] gives before any update.
    fn reference_batch_loss(
        &self,
        rows: &[&TokenizedPair],
        refs: &[[f32; 2]],
    ) -> Result<(Tensor, PairStats)> {
        let b = refs.len();
        let rc = Tensor::from_vec(refs.iter().map(|r| r[0]).collect(), (b,), &Device::Cpu)?;
        let rr = Tensor::from_vec(refs.iter().map(|r| r[1]).collect(), (b,), &Device::Cpu)?;
        let chosen_tokens: Vec<usize> = rows.iter().map(|p| p.predicted_tokens()[0]).collect();
        let loss = dpo_loss(&self.params, &rc, &rr, &rc, &rr, &chosen_tokens)?;
        let stats = PairStats {
            pol: refs.to_vec(),
            refs: refs.to_vec(),
            chosen_tokens,
        };
        Ok((loss, stats))
    }

    /// Held-out implicit rewards `(chosen, rejected)` of every eval pair, and the eval metrics.
    pub fn eval_rewards(&self) -> Result<(Vec<f32>, Vec<f32>, Scalars)> {
        self.eval_pass(false)
    }

    /// The held-out metrics of [`Self::eval_rewards`] for a policy that *is* the reference (DPO
    /// before its first update, when [`policy_is_reference`]), from the reference log-probs
    /// already computed: rewards 0, the loss at margin 0, the reference's log-probs and NLL.
    pub fn eval_at_reference(&self) -> Result<Scalars> {
        Ok(self.eval_pass(true)?.2)
    }

    fn eval_pass(&self, at_reference: bool) -> Result<(Vec<f32>, Vec<f32>, Scalars)> {
        let _no_grad = rlhf_model::params::no_grad();
        // Chunks of similar lengths; every pair's numbers land at its own index.
        let n = self.eval.len();
        let mut all = PairStats {
            pol: vec![[0.0; 2]; n],
            refs: vec![[0.0; 2]; n],
            chosen_tokens: vec![0; n],
        };
        let mut loss_sum = 0f64;
        let lens = self.lengths_of(&self.eval);
        for chunk in length_chunks(&lens, self.eval_batch) {
            let rows: Vec<&TokenizedPair> = chunk.iter().map(|&i| &self.eval[i]).collect();
            let refs: Vec<[f32; 2]> = chunk.iter().map(|&i| self.ref_eval[i]).collect();
            let (l, st) = match at_reference {
                true => self.reference_batch_loss(&rows, &refs)?,
                false => {
                    let (l, st, _) = self.batch_loss(&rows, &refs)?;
                    (l, st)
                }
            };
            loss_sum += l.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            for (k, &i) in chunk.iter().enumerate() {
                all.pol[i] = st.pol[k];
                all.refs[i] = st.refs[k];
                all.chosen_tokens[i] = st.chosen_tokens[k];
            }
        }
        let mut s = dpo_metrics(&all, self.params.beta);
        s.insert("loss".into(), loss_sum / self.eval.len().max(1) as f64);
        let beta = self.params.beta as f32;
        let rc = all
            .pol
            .iter()
            .zip(&all.refs)
            .map(|(p, r)| beta * (p[0] - r[0]))
            .collect();
        let rr = all
            .pol
            .iter()
            .zip(&all.refs)
            .map(|(p, r)| beta * (p[1] - r[1]))
            .collect();
        Ok((rc, rr, s))
    }
}

/// Whether `model` computes what its reference computes (the reference being the model itself,
/// with LoRA its adapters disabled): no adapters, or every adapter's `B` still zero, as
/// [`rlhf_model::LoraConfig`] initialises it.
pub fn policy_is_reference(model: &CausalLM) -> Result<bool> {
    for p in model.params.iter().filter(|p| p.name().contains("lora_B")) {
        if p.var().abs()?.max_all()?.to_scalar::<f32>()? != 0.0 {
            return Ok(false);
        }
    }
    Ok(true)
}

fn dpo_metrics(st: &PairStats, beta: f64) -> Scalars {
    let n = st.pol.len().max(1) as f64;
    let (mut c, mut r, mut acc, mut lc, mut lr) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (p, q) in st.pol.iter().zip(&st.refs) {
        let rc = beta * (p[0] as f64 - q[0] as f64);
        let rr = beta * (p[1] as f64 - q[1] as f64);
        c += rc;
        r += rr;
        acc += (rc > rr) as u8 as f64;
        lc += p[0] as f64;
        lr += p[1] as f64;
    }
    let toks: usize = st.chosen_tokens.iter().sum();
    let mut s = Scalars::new();
    s.insert("rewards_chosen".into(), c / n);
    s.insert("rewards_rejected".into(), r / n);
    s.insert("reward_margin".into(), (c - r) / n);
    s.insert("reward_accuracy".into(), acc / n);
    s.insert("logps_chosen".into(), lc / n);
    s.insert("logps_rejected".into(), lr / n);
    s.insert("nll_chosen".into(), -lc / toks.max(1) as f64);
    s
}

impl Objective for DpoObjective {
    fn name(&self) -> &str {
        "dpo"
    }
    fn step_shapes(
        &self,
        batch_size: usize,
    ) -> Vec<(&rlhf_model::CausalLM, crate::memory::StepShape)> {
        // A chosen and a rejected row per pair, the head on both.
        let lens = self.train.iter().map(TokenizedPair::len);
        crate::memory::StepShape::widest(lens, batch_size * 2, batch_size * 2)
            .map(|shape| (&self.model, shape))
            .into_iter()
            .collect()
    }
    fn len(&self) -> usize {
        self.train.len()
    }
    fn lengths(&self) -> Option<Vec<usize>> {
        Some(self.lengths_of(&self.train))
    }
    fn batch_tokens(&self, items: &[usize], _lengths: &[usize]) -> (usize, usize) {
        let share = self
            .share_prompts
            .then_some(key_ratio(self.model.hidden_size()));
        pair_batch_tokens(items.iter().map(|&i| &self.train[i]), share)
    }
    fn trainable(&self) -> Vec<Param> {
        self.model.params.trainable()
    }
    fn set_train_noise(&mut self, seed: Option<u64>) {
        self.model.set_train_noise(seed)
    }
    fn loss(&mut self, items: &[usize]) -> Result<StepOut> {
        let rows: Vec<&TokenizedPair> = items.iter().map(|&i| &self.train[i]).collect();
        let refs: Vec<[f32; 2]> = items.iter().map(|&i| self.ref_train[i]).collect();
        let (loss, st, tokens) = self.batch_loss(&rows, &refs)?;
        Ok(StepOut {
            loss,
            logged_loss: None,
            metrics: dpo_metrics(&st, self.params.beta),
            tokens,
        })
    }
    fn evaluate(&mut self) -> Result<Scalars> {
        if self.eval.is_empty() {
            return Ok(Scalars::new());
        }
        let r = self.eval_rewards()?;
        let s = r.2.clone();
        self.last_eval = Some(r);
        Ok(s)
    }
    fn save_final(&self, dir: &Path) -> Result<()> {
        save_policy(&self.model, &self.tokenizer, dir)
    }
}

// ---------------------------------------------------------------------------------------------
// Reference cache
// ---------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct RefCache {
    fingerprint: String,
    train: Vec<[f32; 2]>,
    eval: Vec<[f32; 2]>,
}

fn fingerprint(reference: &str, train: &[TokenizedPair], eval: &[TokenizedPair]) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |x: u64| h = (h ^ x).wrapping_mul(0x100_0000_01b3);
    for b in reference.bytes() {
        eat(b as u64);
    }
    for (tag, set) in [(1u64, train), (2, eval)] {
        eat(tag);
        eat(set.len() as u64);
        for p in set {
            for ids in [&p.prompt_ids, &p.chosen_ids, &p.rejected_ids] {
                eat(ids.len() as u64);
                ids.iter().for_each(|&t| eat(t as u64));
            }
        }
    }
    format!("{h:016x}")
}

// ---------------------------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------------------------

/// What a DPO run reports.
#[derive(Debug, Clone)]
pub struct DpoReport {
    pub summary: RunSummary,
    /// Held-out metrics with the initial policy (= reference: rewards 0) and at the end.
    pub eval_before: Option<Scalars>,
    pub eval_after: Option<Scalars>,
    /// Held-out implicit-reward accuracy at the end, with its bootstrap interval.
    pub eval_accuracy: Option<AccuracyReport>,
    /// Whether the reference log-probs came from `out/ref_logps.json`.
    pub reference_cached: bool,
    /// Seconds spent computing reference log-probs (0 when cached).
    pub reference_secs: f64,
}

/// Run DPO (or a relative) from a config.
pub fn run_dpo(cfg: &DpoConfig, resume: bool) -> Result<DpoReport> {
    let (train, eval) = train_eval_pairs(
        &cfg.data,
        cfg.eval_data.as_deref(),
        cfg.eval_fraction,
        cfg.max_examples,
        cfg.lenient,
        cfg.train.seed,
    )?;
    train_dpo_on(cfg, train, eval, resume)
}

/// Run DPO on given pairs (`cfg.data`/`eval_data` are not read).
pub fn train_dpo_on(
    cfg: &DpoConfig,
    train: Vec<PreferencePair>,
    eval: Vec<PreferencePair>,
    resume: bool,
) -> Result<DpoReport> {
    cfg.loss_params().validate()?;
    if train.is_empty() {
        bail!("dpo: no training pairs")
    }
    let (model, tok) = load_policy(&cfg.model, cfg.lora.as_ref(), cfg.train.seed)?;
    if let Some(n) = cfg.train_last_layers {
        train_last_layers(&model, n)?;
    }
    let pcfg = PairTokenizeConfig {
        max_len: cfg.max_len,
        max_prompt_len: cfg.max_prompt_len,
    };
    let train_t = tokenize_pairs_warn(&tok, &train, &pcfg, &cfg.data.display().to_string())?;
    let eval_t = tokenize_pairs_warn(&tok, &eval, &pcfg, "held-out pairs")?;
    std::fs::create_dir_all(&cfg.out)?;
    let ref_spec = match (&cfg.lora, &cfg.reference) {
        (None, Some(r)) => r.clone(),
        _ => cfg.model.clone(),
    };
    let fp = fingerprint(&ref_spec, &train_t, &eval_t);
    let cache_path = cfg.out.join("ref_logps.json");
    let cached: Option<RefCache> = if resume && cache_path.exists() {
        let s = std::fs::read_to_string(&cache_path)?;
        let c: RefCache = serde_json::from_str(&s)
            .with_context(|| format!("{}: malformed", cache_path.display()))?;
        if c.fingerprint == fp && c.train.len() == train_t.len() && c.eval.len() == eval_t.len() {
            Some(c)
        } else {
            eprintln!(
                "{}: written for other data or another reference; recomputing",
                cache_path.display()
            );
            None
        }
    } else {
        None
    };
    let bs = cfg.train.batch_size.max(1);
    let t0 = std::time::Instant::now();
    let reference_cached = cached.is_some();
    let (ref_train, ref_eval) = match cached {
        Some(c) => (c.train, c.eval),
        None => {
            let pad = tok.pad_id();
            let (a, b) = if ref_spec != cfg.model {
                let (r, _) = load_policy(&ref_spec, None, 0)?;
                (
                    reference_logps(&r, &train_t, pad, bs)?,
                    reference_logps(&r, &eval_t, pad, bs)?,
                )
            } else {
                // Before any update the policy is the reference (LoRA: adapters disabled).
                (
                    reference_logps(&model, &train_t, pad, bs)?,
                    reference_logps(&model, &eval_t, pad, bs)?,
                )
            };
            let c = RefCache {
                fingerprint: fp,
                train: a,
                eval: b,
            };
            rlhf_model::model::write_atomic(&cache_path, serde_json::to_string(&c)?.as_bytes())?;
            (c.train, c.eval)
        }
    };
    let reference_secs = if reference_cached {
        0.0
    } else {
        t0.elapsed().as_secs_f64()
    };
    let train_cfg = cfg.train.clone();
    let mut obj = DpoObjective {
        model,
        tokenizer: tok,
        train: train_t,
        eval: eval_t,
        ref_train,
        ref_eval,
        params: cfg.loss_params(),
        eval_batch: bs,
        last_eval: None,
        share_prompts: cfg.share_prompts,
    };
    crate::trainer::write_run_config(&cfg.out, cfg)?;
    // Before the first update the policy is usually the reference itself: its held-out
    // numbers are then the reference log-probs just computed, and need no forward.
    let eval_before = match obj.eval.is_empty() || resume {
        true => None,
        false if ref_spec == cfg.model && policy_is_reference(&obj.model)? => {
            Some(obj.eval_at_reference()?)
        }
        false => Some(obj.eval_rewards()?.2),
    };
    let summary = Trainer::new(train_cfg, &cfg.out).run(&mut obj, resume)?;
    let (eval_after, eval_accuracy) = if obj.eval.is_empty() {
        (None, None)
    } else {
        // The loop's final evaluation (same weights); computed here only if it did not run.
        let (rc, rr, s) = match obj.last_eval.take() {
            Some(r) => r,
            None => obj.eval_rewards()?,
        };
        let acc = accuracy_report(&rc, &rr, cfg.train.seed);
        std::fs::write(
            cfg.out.join("eval_accuracy.json"),
            serde_json::to_string_pretty(&acc)?,
        )?;
        (Some(s), Some(acc))
    };
    Ok(DpoReport {
        summary,
        eval_before,
        eval_after,
        eval_accuracy,
        reference_cached,
        reference_secs,
    })
}
