//! Stage 2: the reward model — a scalar `score` head on a (SFT or base) backbone, trained on
//! preference pairs with the Bradley–Terry loss `−log σ(r_chosen − r_rejected − margin)`.
//!
//! - One forward over the `2B` rows of a [`PairBatch`] (chosen rows first); the score is read at
//!   the last response token of each row.
//! - Pairs expanded from one ranking share a `group` and land in one micro-batch
//!   ([`Objective::groups`]); the held-out split is by group too, so no ranking leaks.
//! - After training the scores are normalised: `offset` = mean raw score of the SFT-side
//!   responses (by default the chosen and rejected responses of the training pairs, or a file of
//!   samples), so that they score mean 0 under [`RewardModel::score`] — PPO wants that.
//! - [`eval_reward`] reports held-out accuracy with a seeded 95% bootstrap interval;
//!   [`score_pairs`] scores prompt/response rows (`rlhf eval reward`, `rlhf score`).

use std::cell::Cell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rlhf_data::batch::{collate_pairs, collate_shared_pairs, key_ratio, Batch, PairBatch};
use rlhf_data::formats::{load_preferences, load_preferences_lenient, load_sft, PreferencePair};
use rlhf_data::formats::{Prompt, SftExample};
use rlhf_data::tokenize::{
    tokenize_pairs, tokenize_prompt, tokenize_response, tokenize_sft, PairTokenizeConfig,
    SftTokenizeConfig, TokenizedPair,
};
use rlhf_model::params::Param;
use rlhf_model::{CausalLM, LoraConfig, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::metrics::Scalars;
use crate::reward_model::RewardModel;
use crate::sft::load_policy;
use crate::trainer::{Objective, RunSummary, StepOut, TrainConfig, Trainer};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// Backbone: an SFT or base model (HF directory, .gguf file or cached hub id).
    pub model: String,
    /// Preference data (JSONL or JSON array, optionally .gz; TRL formats, rankings).
    pub data: PathBuf,
    /// Held-out pairs; when absent, `eval_fraction` of `data` (by ranking group) is held out.
    pub eval_data: Option<PathBuf>,
    pub eval_fraction: f64,
    /// Use at most this many training pairs (0 = all).
    pub max_examples: usize,
    /// Skip (and report) records that fail validation instead of stopping at the first.
    pub lenient: bool,
    pub out: PathBuf,
    /// Prompt + the longer response must fit in this many tokens.
    pub max_len: usize,
    /// Prompts are cut (from the left) to at most this many tokens.
    pub max_prompt_len: Option<usize>,
    /// Subtract each pair's `margin` field (times `margin_scale`) inside the sigmoid.
    pub use_margin: bool,
    pub margin_scale: f64,
    /// After training, shift scores so the normalisation set scores mean 0.
    pub normalize: bool,
    /// Normalisation set: SFT-format samples (prompt/completion, messages, text). Absent: the
    /// chosen and rejected responses of the training pairs.
    pub normalize_samples: Option<PathBuf>,
    /// Score at most this many sequences for the offset (0 = all).
    pub normalize_max: usize,
    /// Train only the last N transformer layers (+ final norm, head; with LoRA: their adapters).
    pub train_last_layers: Option<usize>,
    pub lora: Option<LoraConfig>,
    /// Compute each prompt once per batch: a pair's (or a ranking's) responses follow their
    /// prompt in one row, each attending to the prompt and itself
    /// ([`rlhf_data::batch::SharedPairBatch`]). The same scores and gradients as one row per
    /// response, up to float rounding, from fewer tokens. `false`: one row of prompt +
    /// response per response.
    pub share_prompts: bool,
    pub train: TrainConfig,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            data: PathBuf::new(),
            eval_data: None,
            eval_fraction: 0.05,
            max_examples: 0,
            lenient: false,
            out: PathBuf::from("runs/reward"),
            max_len: 512,
            max_prompt_len: None,
            use_margin: true,
            margin_scale: 1.0,
            normalize: true,
            normalize_samples: None,
            normalize_max: 2048,
            train_last_layers: None,
            lora: None,
            share_prompts: true,
            train: TrainConfig {
                lr: 1e-5,
                ..TrainConfig::default()
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Losses
// ---------------------------------------------------------------------------------------------

/// `log σ(x)`, element-wise, numerically stable and differentiable everywhere (also at 0,
/// where `relu`/`abs` compositions in candle give gradient 0): `−softplus(−x)` with
/// `softplus(y) = max(y, 0) + log(1 + e^{−|y|})`, the kinks written as `y·s` with a constant
/// sign `s` (+1 at 0).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(softplus(&x.neg()?)?.neg()?)
}

/// `log(1 + e^y)`, element-wise (see [`log_sigmoid`]).
pub fn softplus(y: &Tensor) -> Result<Tensor> {
    let pos = y.detach().ge(0f64)?.to_dtype(y.dtype())?; // 1 where y >= 0
    let sign = ((&pos * 2.0)? - 1.0)?;
    let relu = (y * &pos)?;
    let abs = (y * &sign)?;
    Ok((relu + (abs.neg()?.exp()? + 1.0)?.log()?)?)
}

/// Bradley–Terry loss, mean over pairs: `−log σ(r_c − r_r − m)`. `r_chosen`, `r_rejected`
/// (and `margin`) are `[B]`.
pub fn bradley_terry_loss(
    r_chosen: &Tensor,
    r_rejected: &Tensor,
    margin: Option<&Tensor>,
) -> Result<Tensor> {
    let mut d = (r_chosen - r_rejected)?;
    if let Some(m) = margin {
        d = (d - m)?;
    }
    Ok(log_sigmoid(&d)?.mean_all()?.neg()?)
}

/// `log(1 + e^y)` on the host, stable.
pub(crate) fn softplus_f64(y: f64) -> f64 {
    y.max(0.0) + (-y.abs()).exp().ln_1p()
}

/// Pair metrics on the host: loss, accuracy (`r_c > r_r`), margin, reward mean/std, and the
/// chosen/rejected means.
pub fn pair_metrics(rc: &[f32], rr: &[f32], margins: &[f32]) -> Scalars {
    let n = rc.len().max(1) as f64;
    let mut s = Scalars::new();
    let (mut loss, mut acc, mut marg) = (0f64, 0f64, 0f64);
    for i in 0..rc.len() {
        let d = rc[i] as f64 - rr[i] as f64;
        loss += softplus_f64(-(d - margins.get(i).copied().unwrap_or(0.0) as f64));
        acc += (d > 0.0) as u8 as f64;
        marg += d;
    }
    let all: Vec<f64> = rc.iter().chain(rr).map(|&x| x as f64).collect();
    let mean = all.iter().sum::<f64>() / all.len().max(1) as f64;
    let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / all.len().max(1) as f64;
    s.insert("loss".into(), loss / n);
    s.insert("accuracy".into(), acc / n);
    s.insert("margin".into(), marg / n);
    s.insert("reward_mean".into(), mean);
    s.insert("reward_std".into(), var.sqrt());
    s.insert(
        "reward_chosen".into(),
        rc.iter().map(|&x| x as f64).sum::<f64>() / n,
    );
    s.insert(
        "reward_rejected".into(),
        rr.iter().map(|&x| x as f64).sum::<f64>() / n,
    );
    s
}

// ---------------------------------------------------------------------------------------------
// Helpers shared with DPO
// ---------------------------------------------------------------------------------------------

/// Real tokens and computed slots of a batch of `pairs`, laid out with prompts shared (with this
/// [`key_ratio`]) or one row per response (the padding report).
pub fn pair_batch_tokens<'a>(
    pairs: impl IntoIterator<Item = &'a TokenizedPair>,
    share_prompts: Option<usize>,
) -> (usize, usize) {
    if let Some(kr) = share_prompts {
        let sb = collate_shared_pairs(pairs, 0, kr).batch;
        (sb.real_tokens(), sb.slots())
    } else {
        let b = collate_pairs(pairs, 0).batch;
        (b.real_tokens(), b.batch * b.seq_len)
    }
}

/// Token ids `[b, t]` and the mask rows of a right-padded batch.
pub fn batch_tensors(b: &Batch) -> Result<(Tensor, Vec<Vec<u8>>)> {
    let ids = Tensor::from_vec(b.input_ids.clone(), (b.batch, b.seq_len), &Device::Cpu)?;
    let mask = b
        .attention_mask
        .chunks(b.seq_len.max(1))
        .map(|c| c.to_vec())
        .collect();
    Ok((ids, mask))
}

/// Split off a held-out fraction *by group* (the pairs of one ranking stay on one side),
/// deterministically.
pub fn split_pairs_by_group(
    pairs: Vec<PreferencePair>,
    frac: f64,
    seed: u64,
) -> (Vec<PreferencePair>, Vec<PreferencePair>) {
    let mut groups: Vec<usize> = Vec::new();
    let mut seen = HashSet::new();
    for p in &pairs {
        if seen.insert(p.group) {
            groups.push(p.group);
        }
    }
    let k = ((groups.len() as f64) * frac).round() as usize;
    let k = k.min(groups.len().saturating_sub(1));
    let perm = rlhf_data::batch::epoch_permutation(seed ^ 0x5EED, 0, groups.len());
    let held: HashSet<usize> = perm.into_iter().take(k).map(|i| groups[i]).collect();
    pairs.into_iter().partition(|p| !held.contains(&p.group))
}

/// Load preference pairs (strict: the first bad record is an error naming `file:line`; lenient:
/// bad records are skipped and counted on stderr).
pub fn load_pairs(path: &Path, lenient: bool) -> Result<Vec<PreferencePair>> {
    if !lenient {
        return load_preferences(path);
    }
    let (pairs, skipped) = load_preferences_lenient(path)?;
    if !skipped.is_empty() {
        eprintln!(
            "{}: skipped {} invalid records (first: {})",
            path.display(),
            skipped.len(),
            skipped[0]
        );
    }
    Ok(pairs)
}

/// Train/eval pairs from a config's files: explicit eval file, or a held-out fraction by group;
/// then at most `max_examples` training pairs.
pub fn train_eval_pairs(
    data: &Path,
    eval_data: Option<&Path>,
    eval_fraction: f64,
    max_examples: usize,
    lenient: bool,
    seed: u64,
) -> Result<(Vec<PreferencePair>, Vec<PreferencePair>)> {
    let pairs = load_pairs(data, lenient)?;
    let (mut train, eval) = match eval_data {
        Some(p) => (pairs, load_pairs(p, lenient)?),
        None if eval_fraction > 0.0 => split_pairs_by_group(pairs, eval_fraction, seed),
        None => (pairs, vec![]),
    };
    if max_examples > 0 {
        train.truncate(max_examples);
    }
    Ok((train, eval))
}

/// Tokenise pairs and print a truncation warning naming `what`.
pub fn tokenize_pairs_warn(
    tok: &Tokenizer,
    pairs: &[PreferencePair],
    cfg: &PairTokenizeConfig,
    what: &str,
) -> Result<Vec<TokenizedPair>> {
    let (t, stats) = tokenize_pairs(tok, pairs, cfg).with_context(|| what.to_string())?;
    if let Some(w) = stats.warning() {
        eprintln!("{what}: {w}");
    }
    Ok(t)
}

/// Train only the last `n` transformer layers: freeze every parameter of earlier layers and
/// the embeddings (with LoRA, this freezes the earlier adapters). The final norm and heads keep
/// their setting. Backward then stops at the first trainable layer.
pub fn train_last_layers(model: &CausalLM, n: usize) -> Result<()> {
    let l = model.num_layers();
    if n == 0 || n > l {
        bail!("train_last_layers = {n}: the model has {l} layers")
    }
    let first = l - n;
    let layer_of = |name: &str| -> Option<usize> {
        let mut it = name.split('.');
        while let Some(part) = it.next() {
            if part == "layers" || part == "h" {
                if let Some(i) = it.clone().next().and_then(|x| x.parse().ok()) {
                    return Some(i);
                }
            }
        }
        None
    };
    model.params.set_trainable_where(
        |name| {
            layer_of(name).is_some_and(|i| i < first)
                || name.contains("embed_tokens")
                || name.contains("wte")
                || name.contains("wpe")
        },
        false,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Objective
// ---------------------------------------------------------------------------------------------

pub struct RewardObjective {
    pub rm: RewardModel,
    pub tokenizer: Tokenizer,
    pub train: Vec<TokenizedPair>,
    pub eval: Vec<TokenizedPair>,
    /// Pairs per evaluation chunk.
    pub eval_batch: usize,
    /// Multiply the pairs' margins by this; `None` = ignore margins.
    pub margin_scale: Option<f32>,
    /// `(prompt, response)` items whose mean score becomes the offset after training (empty:
    /// no normalisation).
    pub norm_seqs: Vec<(Vec<u32>, Vec<u32>)>,
    /// Raw held-out `(r_chosen, r_rejected)` of the latest [`Objective::evaluate`].
    pub last_eval: Option<(Vec<f32>, Vec<f32>)>,
    /// Training batches compute each prompt once ([`RewardConfig::share_prompts`]).
    pub share_prompts: bool,
    offset: Cell<Option<f32>>,
}

impl RewardObjective {
    pub fn new(
        rm: RewardModel,
        tokenizer: Tokenizer,
        train: Vec<TokenizedPair>,
        eval: Vec<TokenizedPair>,
    ) -> Self {
        Self {
            rm,
            tokenizer,
            train,
            eval,
            eval_batch: 8,
            margin_scale: Some(1.0),
            norm_seqs: vec![],
            last_eval: None,
            share_prompts: true,
            offset: Cell::new(None),
        }
    }

    /// The offset computed by `save_final` (None before it ran or without normalisation).
    pub fn computed_offset(&self) -> Option<f32> {
        self.offset.get()
    }

    fn margins(&self, margin: &[Option<f32>]) -> Vec<f32> {
        margin
            .iter()
            .map(|m| match self.margin_scale {
                Some(s) => m.unwrap_or(0.0) * s,
                None => 0.0,
            })
            .collect()
    }

    /// Raw scores of a pair batch, `[2B]` (chosen rows first), tracked for gradients.
    pub fn pair_scores(&self, pb: &PairBatch) -> Result<Tensor> {
        let (ids, mask) = batch_tensors(&pb.batch)?;
        let h = self.rm.model.hidden(&ids, &mask)?;
        self.rm.head.at(&h, &pb.last_index)
    }

    /// Raw scores `[2B]` (chosen first, tracked), margins and real tokens of the pairs `items`,
    /// laid out as [`RewardObjective::share_prompts`] says.
    fn batch_scores(&self, items: &[usize]) -> Result<(Tensor, Vec<Option<f32>>, usize)> {
        let rows = items.iter().map(|&i| &self.train[i]);
        let pad = self.tokenizer.pad_id();
        if self.share_prompts {
            let sb = collate_shared_pairs(rows, pad, key_ratio(self.rm.model.hidden_size()));
            Ok((
                self.rm.pair_scores(&sb)?,
                sb.margin.clone(),
                sb.batch.real_tokens(),
            ))
        } else {
            let pb = collate_pairs(rows, pad);
            let tokens = pb.batch.real_tokens();
            Ok((self.pair_scores(&pb)?, pb.margin.clone(), tokens))
        }
    }

    /// Held-out `(r_chosen, r_rejected)` raw scores.
    pub fn eval_scores(&self, pairs: &[TokenizedPair]) -> Result<(Vec<f32>, Vec<f32>)> {
        score_tokenized_pairs(&self.rm, &self.tokenizer, pairs, self.eval_batch)
    }

    /// Mean raw score of `norm_seqs` (None when empty).
    pub fn normalization_offset(&self) -> Result<Option<f32>> {
        if self.norm_seqs.is_empty() {
            return Ok(None);
        }
        let raw = self.rm.raw_response_scores(
            &self.norm_seqs,
            self.tokenizer.pad_id(),
            self.eval_batch * 2,
        )?;
        let m = raw.iter().map(|&x| x as f64).sum::<f64>() / raw.len() as f64;
        Ok(Some(m as f32))
    }
}

/// Raw `(r_chosen, r_rejected)` of tokenised pairs: chunks of `batch` pairs of similar lengths,
/// each prompt computed once per chunk ([`RewardModel::raw_pair_scores`]).
pub fn score_tokenized_pairs(
    rm: &RewardModel,
    tok: &Tokenizer,
    pairs: &[TokenizedPair],
    batch: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    rm.raw_pair_scores(pairs, tok.pad_id(), batch.max(1))
}

impl Objective for RewardObjective {
    fn name(&self) -> &str {
        "reward"
    }
    fn step_shapes(
        &self,
        batch_size: usize,
    ) -> Vec<(&rlhf_model::CausalLM, crate::memory::StepShape)> {
        // A chosen and a rejected row per pair; a scalar head, no LM head.
        let lens = self.train.iter().map(TokenizedPair::len);
        crate::memory::StepShape::widest(lens, batch_size * 2, 0)
            .map(|shape| (&self.rm.model, shape))
            .into_iter()
            .collect()
    }
    fn len(&self) -> usize {
        self.train.len()
    }
    fn lengths(&self) -> Option<Vec<usize>> {
        Some(
            self.train
                .iter()
                .map(|p| p.width(self.share_prompts))
                .collect(),
        )
    }
    fn batch_tokens(&self, items: &[usize], _lengths: &[usize]) -> (usize, usize) {
        let kr = key_ratio(self.rm.model.hidden_size());
        let share = self.share_prompts.then_some(kr);
        pair_batch_tokens(items.iter().map(|&i| &self.train[i]), share)
    }
    fn groups(&self) -> Option<Vec<usize>> {
        Some(self.train.iter().map(|p| p.group).collect())
    }
    fn trainable(&self) -> Vec<Param> {
        self.rm.model.params.trainable()
    }
    fn set_train_noise(&mut self, seed: Option<u64>) {
        self.rm.model.set_train_noise(seed)
    }
    fn loss(&mut self, items: &[usize]) -> Result<StepOut> {
        let b = items.len();
        let (scores, margin, tokens) = self.batch_scores(items)?;
        let rc = scores.narrow(0, 0, b)?;
        let rr = scores.narrow(0, b, b)?;
        let m = self.margins(&margin);
        let mt = match self.margin_scale {
            Some(_) => Some(Tensor::from_vec(m.clone(), (b,), &Device::Cpu)?),
            None => None,
        };
        let loss = bradley_terry_loss(&rc, &rr, mt.as_ref())?;
        let s: Vec<f32> = scores.detach().to_vec1()?;
        let mut metrics = pair_metrics(&s[..b], &s[b..], &m);
        metrics.remove("loss");
        Ok(StepOut {
            loss,
            logged_loss: None,
            metrics,
            tokens,
        })
    }
    fn evaluate(&mut self) -> Result<Scalars> {
        if self.eval.is_empty() {
            return Ok(Scalars::new());
        }
        let (rc, rr) = self.eval_scores(&self.eval)?;
        let m: Vec<f32> = self
            .eval
            .iter()
            .map(|p| match self.margin_scale {
                Some(s) => p.margin.unwrap_or(0.0) * s,
                None => 0.0,
            })
            .collect();
        let s = pair_metrics(&rc, &rr, &m);
        self.last_eval = Some((rc, rr));
        Ok(s)
    }
    fn save_final(&self, dir: &Path) -> Result<()> {
        let off = self.normalization_offset()?;
        self.offset.set(off);
        self.rm
            .save_with_offset(dir, Some(&self.tokenizer), off.unwrap_or(self.rm.offset))
    }
}

// ---------------------------------------------------------------------------------------------
// Accuracy with a bootstrap interval
// ---------------------------------------------------------------------------------------------

/// Held-out preference accuracy with a percentile bootstrap interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccuracyReport {
    pub n: usize,
    /// Fraction of pairs with `r_chosen > r_rejected` (ties count as wrong).
    pub accuracy: f64,
    /// 95% percentile bootstrap interval (1000 resamples, seeded).
    pub ci_low: f64,
    pub ci_high: f64,
    /// Mean `r_chosen − r_rejected`.
    pub mean_margin: f64,
}

impl std::fmt::Display for AccuracyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accuracy {:.3} (95% CI {:.3}–{:.3}, n = {}), mean margin {:.3}",
            self.accuracy, self.ci_low, self.ci_high, self.n, self.mean_margin
        )
    }
}

/// Percentile bootstrap 95% interval of the mean of `correct` (`resamples` draws, seeded).
pub fn bootstrap_interval(correct: &[bool], resamples: usize, seed: u64) -> (f64, f64) {
    let n = correct.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = rlhf_data::rng::Rng::from_state(seed);
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).filter(|_| correct[rng.below(n)]).count() as f64 / n as f64)
        .collect();
    means.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let q = |p: f64| means[((p * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    (q(0.025), q(0.975))
}

/// Accuracy report from chosen/rejected scores (or implicit rewards).
pub fn accuracy_report(rc: &[f32], rr: &[f32], seed: u64) -> AccuracyReport {
    let correct: Vec<bool> = rc.iter().zip(rr).map(|(c, r)| c > r).collect();
    let n = correct.len();
    let (lo, hi) = bootstrap_interval(&correct, 1000, seed);
    AccuracyReport {
        n,
        accuracy: correct.iter().filter(|&&c| c).count() as f64 / n.max(1) as f64,
        ci_low: lo,
        ci_high: hi,
        mean_margin: rc.iter().zip(rr).map(|(c, r)| (c - r) as f64).sum::<f64>() / n.max(1) as f64,
    }
}

// ---------------------------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------------------------

/// What a reward-model run reports.
#[derive(Debug, Clone)]
pub struct RewardReport {
    pub summary: RunSummary,
    /// Normalisation offset stored with the model (0 when not normalised).
    pub offset: f32,
    /// Held-out accuracy of the final model, with its bootstrap interval.
    pub eval: Option<AccuracyReport>,
}

fn pair_tokenize_config(max_len: usize, max_prompt_len: Option<usize>) -> PairTokenizeConfig {
    PairTokenizeConfig {
        max_len,
        max_prompt_len,
    }
}

/// Train a reward model from a config (data from the config's files).
pub fn run_reward(cfg: &RewardConfig, resume: bool) -> Result<RewardReport> {
    let (train, eval) = train_eval_pairs(
        &cfg.data,
        cfg.eval_data.as_deref(),
        cfg.eval_fraction,
        cfg.max_examples,
        cfg.lenient,
        cfg.train.seed,
    )?;
    train_reward_on(cfg, train, eval, resume)
}

/// Train a reward model on given pairs (`cfg.data`/`eval_data` are not read).
pub fn train_reward_on(
    cfg: &RewardConfig,
    train: Vec<PreferencePair>,
    eval: Vec<PreferencePair>,
    resume: bool,
) -> Result<RewardReport> {
    if train.is_empty() {
        bail!("reward: no training pairs")
    }
    let (model, tok) = load_policy(&cfg.model, cfg.lora.as_ref(), cfg.train.seed)?;
    let rm = RewardModel::from_backbone(model, cfg.train.seed ^ 0x5C0E)?;
    if let Some(n) = cfg.train_last_layers {
        train_last_layers(&rm.model, n)?;
    }
    let pcfg = pair_tokenize_config(cfg.max_len, cfg.max_prompt_len);
    let train_t = tokenize_pairs_warn(&tok, &train, &pcfg, &cfg.data.display().to_string())?;
    let eval_t = tokenize_pairs_warn(&tok, &eval, &pcfg, "held-out pairs")?;
    let norm_seqs = if !cfg.normalize {
        vec![]
    } else if let Some(p) = &cfg.normalize_samples {
        let ex = load_sft(p)?;
        let (t, _) = tokenize_sft(
            &tok,
            &ex,
            &SftTokenizeConfig {
                max_len: cfg.max_len,
                ..Default::default()
            },
        )
        .with_context(|| format!("{}", p.display()))?;
        // Split where the loss starts, so that samples of one prompt share it when scored.
        let split = |mut x: rlhf_data::tokenize::TokenizedSft| {
            let k = x.loss_mask.iter().position(|&m| m).unwrap_or(0);
            let response = x.input_ids.split_off(k);
            (x.input_ids, response)
        };
        t.into_iter().map(split).collect()
    } else {
        train_t
            .iter()
            .flat_map(|p| {
                [&p.chosen_ids, &p.rejected_ids].map(|r| (p.prompt_ids.clone(), r.clone()))
            })
            .collect()
    };
    // A uniform draw of sequences: the offset is their mean. (Drawing whole prompts would keep
    // more prompts computed once, but ranked data holds dozens of pairs per prompt, and a draw of
    // a few dozen prompts estimates the mean far worse.)
    let mut norm_seqs = norm_seqs;
    if cfg.normalize_max > 0 && norm_seqs.len() > cfg.normalize_max {
        let perm = rlhf_data::batch::epoch_permutation(cfg.train.seed, 7, norm_seqs.len());
        norm_seqs = perm
            .into_iter()
            .take(cfg.normalize_max)
            .map(|i| norm_seqs[i].clone())
            .collect();
    }
    let train_cfg = cfg.train.clone();
    let mut obj = RewardObjective::new(rm, tok, train_t, eval_t);
    obj.share_prompts = cfg.share_prompts;
    obj.eval_batch = cfg.train.batch_size.max(1);
    obj.margin_scale = cfg.use_margin.then_some(cfg.margin_scale as f32);
    obj.norm_seqs = norm_seqs;
    std::fs::create_dir_all(&cfg.out)?;
    crate::trainer::write_run_config(&cfg.out, cfg)?;
    let summary = Trainer::new(train_cfg, &cfg.out).run(&mut obj, resume)?;
    let offset = obj.computed_offset().unwrap_or(0.0);
    obj.rm.offset = offset;
    let eval = if obj.eval.is_empty() {
        None
    } else {
        // The loop's final evaluation (same weights); computed here only if it did not run.
        let (rc, rr) = match obj.last_eval.take() {
            Some(x) => x,
            None => obj.eval_scores(&obj.eval)?,
        };
        let r = accuracy_report(&rc, &rr, cfg.train.seed);
        std::fs::write(
            cfg.out.join("eval_accuracy.json"),
            serde_json::to_string_pretty(&r)?,
        )?;
        Some(r)
    };
    Ok(RewardReport {
        summary,
        offset,
        eval,
    })
}

/// Load a saved reward model with its tokenizer.
pub fn load_reward_model(dir: &Path) -> Result<(RewardModel, Tokenizer)> {
    let (rm, tok) = RewardModel::load(dir)?;
    let Some(tok) = tok else {
        bail!("{}: no tokenizer with the reward model", dir.display())
    };
    Ok((rm, tok))
}

/// Options of [`eval_reward`].
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRewardOptions {
    pub max_len: usize,
    pub max_prompt_len: Option<usize>,
    pub lenient: bool,
    /// Pairs per forward.
    pub batch_size: usize,
    /// Evaluate at most this many pairs (0 = all).
    pub max_examples: usize,
    /// Bootstrap seed.
    pub seed: u64,
}

impl Default for EvalRewardOptions {
    fn default() -> Self {
        Self {
            max_len: 512,
            max_prompt_len: None,
            lenient: false,
            batch_size: 8,
            max_examples: 0,
            seed: 42,
        }
    }
}

/// Accuracy of a saved reward model on a preference file, with a 95% bootstrap interval
/// (1000 resamples, seeded).
pub fn eval_reward(
    model_dir: &Path,
    data: &Path,
    opts: &EvalRewardOptions,
) -> Result<AccuracyReport> {
    let (rm, tok) = load_reward_model(model_dir)?;
    let mut pairs = load_pairs(data, opts.lenient)?;
    if opts.max_examples > 0 {
        pairs.truncate(opts.max_examples);
    }
    let t = tokenize_pairs_warn(
        &tok,
        &pairs,
        &pair_tokenize_config(opts.max_len, opts.max_prompt_len),
        &data.display().to_string(),
    )?;
    let (rc, rr) = score_tokenized_pairs(&rm, &tok, &t, opts.batch_size)?;
    Ok(accuracy_report(&rc, &rr, opts.seed))
}

/// Normalised scores of prompt/response rows with a loaded reward model, in chunks of `batch`
/// rows of similar lengths, each prompt computed once per chunk (several completions of one
/// prompt, as best-of-n files hold, share it). Rows longer than `max_len` lose prompt tokens
/// from the left (then response tokens from the right).
pub fn score_rows(
    rm: &RewardModel,
    tok: &Tokenizer,
    rows: &[(Prompt, String)],
    max_len: usize,
    batch: usize,
) -> Result<Vec<f32>> {
    let mut items = Vec::with_capacity(rows.len());
    for (i, (p, r)) in rows.iter().enumerate() {
        let mut ids = tokenize_prompt(tok, p).with_context(|| format!("row {i}"))?;
        let mut resp = tokenize_response(tok, p, r).with_context(|| format!("row {i}"))?;
        if max_len > 0 && ids.len() + resp.len() > max_len {
            let keep = max_len.saturating_sub(resp.len()).max(max_len / 2);
            let drop = ids.len().saturating_sub(keep);
            ids.drain(..drop);
            ids.truncate(max_len);
            resp.truncate(max_len - ids.len());
        }
        items.push((ids, resp));
    }
    let raw = rm.raw_response_scores(&items, tok.pad_id(), batch)?;
    Ok(raw.into_iter().map(|x| x - rm.offset).collect())
}

/// Normalised scores of prompt/response rows with the reward model saved in `model_dir`.
pub fn score_pairs(
    model_dir: &Path,
    rows: &[(Prompt, String)],
    max_len: usize,
) -> Result<Vec<f32>> {
    let (rm, tok) = load_reward_model(model_dir)?;
    score_rows(&rm, &tok, rows, max_len, 8)
}

/// Rows of an SFT-format file as `(prompt, response)` for [`score_pairs`] (prompt/completion
/// rows only).
pub fn prompt_response_rows(examples: &[SftExample]) -> Result<Vec<(Prompt, String)>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| match e {
            SftExample::PromptCompletion { prompt, completion } => {
                Ok((Prompt::Text(prompt.clone()), completion.clone()))
            }
            SftExample::ChatPromptCompletion { prompt, completion } if completion.len() == 1 => {
                Ok((Prompt::Chat(prompt.clone()), completion[0].content.clone()))
            }
            _ => bail!("row {i}: expected a prompt/completion row"),
        })
        .collect()
}
