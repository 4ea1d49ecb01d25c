//! Stage 1: supervised fine-tuning — next-token loss on completion / assistant tokens only.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rlhf_data::batch::collate_sft;
use rlhf_data::formats::load_sft;
use rlhf_data::tokenize::{pack, pack_refs, tokenize_sft, SftTokenizeConfig, TokenizedSft};
use rlhf_model::params::Param;
use rlhf_model::{CausalLM, LoraConfig, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::metrics::Scalars;
use crate::trainer::{Objective, RunSummary, StepOut, TrainConfig, Trainer};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// HF directory, .gguf file or cached hub id.
    pub model: String,
    /// Training data (JSONL or JSON array, optionally .gz).
    pub data: PathBuf,
    /// Held-out data; when absent, `eval_fraction` of `data` is held out.
    pub eval_data: Option<PathBuf>,
    pub eval_fraction: f64,
    /// Use at most this many training examples (0 = all).
    pub max_examples: usize,
    pub out: PathBuf,
    pub max_len: usize,
    pub completion_only: bool,
    /// Render prompt/completion rows through the chat template.
    pub use_chat_template: bool,
    pub packing: bool,
    /// Lay each batch out padding-free: its examples back to back in rows as wide as its
    /// longest, each its own attention segment with positions from its own start. The same
    /// examples, loss tokens, loss and gradients as one padded row each, in fewer slots.
    /// (Unlike `packing`, which fills rows of `max_len` and so changes what a batch holds.)
    pub padding_free: bool,
    pub lora: Option<LoraConfig>,
    pub train: TrainConfig,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            data: PathBuf::new(),
            eval_data: None,
            eval_fraction: 0.05,
            max_examples: 0,
            out: PathBuf::from("runs/sft"),
            max_len: 512,
            completion_only: true,
            use_chat_template: false,
            packing: false,
            padding_free: true,
            lora: None,
            train: TrainConfig::default(),
        }
    }
}

/// The SFT objective over tokenised examples.
pub struct SftObjective {
    pub model: CausalLM,
    pub tokenizer: Tokenizer,
    pub train: Vec<TokenizedSft>,
    pub eval: Vec<TokenizedSft>,
    pub eval_batch: usize,
    /// Divide each micro-batch's summed token loss by this instead of by its own number of
    /// loss tokens (`None`). Set by [`Objective::set_length_grouped`]: batches of similar
    /// lengths hold very different token counts, and a per-batch mean would weigh a token of a
    /// short batch many times one of a long batch.
    pub token_norm: Option<f64>,
    /// Lay batches out padding-free ([`SftConfig::padding_free`]).
    pub padding_free: bool,
}

/// Mean negative log-likelihood over the loss-masked tokens of a batch, and the token count.
/// Only the hidden states that predict a loss token go through the LM head, as one fused op
/// ([`CausalLM::head_logprobs`]): prompt and padding positions cost no vocabulary product, and
/// no `[tokens × vocab]` logits are materialised. With `padding_free` the rows are laid out
/// back to back ([`padding_free_rows`]).
pub fn sft_loss(
    model: &CausalLM,
    rows: &[&TokenizedSft],
    pad: u32,
    padding_free: bool,
) -> Result<(Tensor, usize)> {
    let flat;
    let b = match padding_free.then(|| padding_free_rows(rows)).flatten() {
        Some(f) => {
            flat = f;
            collate_sft(&flat, pad)
        }
        None => collate_sft(rows.iter().copied(), pad),
    };
    let (n, t) = (b.batch, b.seq_len);
    if t < 2 {
        bail!("SFT batch with sequences shorter than 2 tokens")
    }
    let (slots, targets) = loss_slots(&b.input_ids, &b.loss_mask, t);
    if slots.is_empty() {
        bail!("SFT batch has no loss tokens (every completion was truncated away?)")
    }
    let k = slots.len();
    let ids = Tensor::from_vec(b.input_ids.clone(), (n, t), &Device::Cpu)?;
    let mask: Vec<Vec<u8>> = b.attention_mask.chunks(t).map(|c| c.to_vec()).collect();
    let d = model.hidden_size();
    let h = model
        .hidden(&ids, &mask)?
        .reshape((n * t, d))?
        .index_select(&Tensor::from_vec(slots, (k,), &Device::Cpu)?, 0)?;
    let lp = model.head_logprobs(&h, &Tensor::from_vec(targets, (k,), &Device::Cpu)?, 1.0)?;
    Ok(((lp.sum_all()?.neg()? / k as f64)?, b.real_tokens()))
}

/// A batch's examples back to back in rows as wide as its longest ([`pack_refs`]: best-fit,
/// each example its own segment, its first token never a target, as in its own row). `None`
/// when the rows are packed already (`packing = true`) or would not get fewer.
pub fn padding_free_rows(rows: &[&TokenizedSft]) -> Option<Vec<TokenizedSft>> {
    let width = rows.iter().map(|r| r.len()).max()?;
    if width == 0 || rows.iter().any(|r| !r.segments.is_empty()) {
        return None;
    }
    let packed = pack_refs(rows, width);
    (packed.len() < rows.len()).then(|| packed.into_iter().map(TokenizedSft::from).collect())
}

/// The loss positions of a collated batch (rows of width `t`): each slot (`row·t + j`) whose
/// next token is a loss token, and that token.
pub fn loss_slots(input_ids: &[u32], loss_mask: &[u8], t: usize) -> (Vec<u32>, Vec<u32>) {
    let mut slots = Vec::new();
    let mut targets = Vec::new();
    for (r, m) in loss_mask.chunks(t).enumerate() {
        for j in 0..t - 1 {
            if m[j + 1] != 0 {
                slots.push((r * t + j) as u32);
                targets.push(input_ids[r * t + j + 1]);
            }
        }
    }
    (slots, targets)
}

impl Objective for SftObjective {
    fn name(&self) -> &str {
        "sft"
    }
    fn step_shapes(
        &self,
        batch_size: usize,
    ) -> Vec<(&rlhf_model::CausalLM, crate::memory::StepShape)> {
        // Rows as wide as the widest item (a packed row at most `max_len`), the head on each.
        let lens = self.train.iter().map(TokenizedSft::len);
        crate::memory::StepShape::widest(lens, batch_size, batch_size)
            .map(|shape| (&self.model, shape))
            .into_iter()
            .collect()
    }
    fn len(&self) -> usize {
        self.train.len()
    }
    fn lengths(&self) -> Option<Vec<usize>> {
        Some(self.train.iter().map(|r| r.len()).collect())
    }
    fn batch_tokens(&self, items: &[usize], lengths: &[usize]) -> (usize, usize) {
        let rows: Vec<&TokenizedSft> = items.iter().map(|&i| &self.train[i]).collect();
        match self
            .padding_free
            .then(|| padding_free_rows(&rows))
            .flatten()
        {
            Some(flat) => {
                let width = flat.iter().map(|r| r.len()).max().unwrap_or(0);
                (flat.iter().map(|r| r.len()).sum(), flat.len() * width)
            }
            None => rlhf_data::batch::padded_tokens(items, lengths),
        }
    }
    fn trainable(&self) -> Vec<Param> {
        self.model.params.trainable()
    }
    fn set_train_noise(&mut self, seed: Option<u64>) {
        self.model.set_train_noise(seed)
    }
    fn set_length_grouped(&mut self, batch_size: usize) {
        // The loss tokens of an average batch: every token then weighs the same in every batch,
        // and a step's gradient is as large on average as with per-batch means.
        let total: usize = self.train.iter().map(|r| r.n_loss_tokens()).sum();
        let per_item = total as f64 / self.train.len().max(1) as f64;
        self.token_norm = Some((per_item * batch_size as f64).max(1.0));
    }
    fn loss(&mut self, items: &[usize]) -> Result<StepOut> {
        let rows: Vec<&TokenizedSft> = items.iter().map(|&i| &self.train[i]).collect();
        let pad = self.tokenizer.pad_id();
        let (loss, tokens) = sft_loss(&self.model, &rows, pad, self.padding_free)?;
        let (loss, logged_loss) = match self.token_norm {
            Some(norm) => {
                // `loss` is the batch's token mean: train on the rescaled sum, log the mean.
                let mean = loss.to_scalar::<f32>()? as f64;
                let count: usize = rows.iter().map(|r| r.n_loss_tokens()).sum();
                ((loss * (count as f64 / norm))?, Some(mean))
            }
            None => (loss, None),
        };
        Ok(StepOut {
            loss,
            logged_loss,
            metrics: Scalars::new(),
            tokens,
        })
    }
    fn evaluate(&mut self) -> Result<Scalars> {
        if self.eval.is_empty() {
            return Ok(Scalars::new());
        }
        let mut tot = 0f64;
        let mut n = 0f64;
        // Chunks of similar lengths: the loss is a sum over tokens, whatever the grouping.
        let lens: Vec<usize> = self.eval.iter().map(|r| r.len()).collect();
        for chunk in rlhf_data::batch::length_chunks(&lens, self.eval_batch) {
            let rows: Vec<&TokenizedSft> = chunk.iter().map(|&i| &self.eval[i]).collect();
            let toks: usize = rows.iter().map(|r| r.n_loss_tokens()).sum();
            let pad = self.tokenizer.pad_id();
            let (l, _) = sft_loss(&self.model, &rows, pad, self.padding_free)?;
            tot += l.to_scalar::<f32>()? as f64 * toks as f64;
            n += toks as f64;
        }
        let mut s = Scalars::new();
        s.insert("loss".into(), tot / n.max(1.0));
        Ok(s)
    }
    fn save_final(&self, dir: &Path) -> Result<()> {
        save_policy(&self.model, &self.tokenizer, dir)
    }
}

/// Save a (possibly LoRA) policy: merged HF model in `dir`, and the adapter alone in
/// `dir/adapter` (PEFT layout) when there is one.
pub fn save_policy(model: &CausalLM, tok: &Tokenizer, dir: &Path) -> Result<()> {
    model.save(dir, Some(tok))?;
    if let Some(l) = &model.lora {
        let ad = dir.join("adapter");
        std::fs::create_dir_all(&ad)?;
        rlhf_model::model::save_safetensors(
            &model.adapter_tensors(),
            &ad.join("adapter_model.safetensors"),
        )?;
        let cfg = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": l.r, "lora_alpha": l.alpha,
            "lora_dropout": l.dropout, "target_modules": l.target_modules, "bias": "none",
        });
        rlhf_model::model::write_atomic(
            &ad.join("adapter_config.json"),
            serde_json::to_string_pretty(&cfg)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// Load the policy named in a config (with its tokenizer) and attach LoRA if asked.
pub fn load_policy(
    spec: &str,
    lora: Option<&LoraConfig>,
    seed: u64,
) -> Result<(CausalLM, Tokenizer)> {
    let loaded = rlhf_model::load::load(spec)?;
    let Some(tok) = loaded.tokenizer else {
        bail!("{spec}: no tokenizer (tokenizer.json) with the model")
    };
    let mut model = loaded.model;
    if let Some(l) = lora {
        let n = model.add_lora(l, seed)?;
        eprintln!(
            "LoRA r={} on {n} layers: {} trainable of {} parameters",
            l.r,
            model.params.num_elements(true),
            model.params.num_elements(false)
        );
    }
    Ok((model, tok))
}

/// Deterministically split off a held-out fraction.
pub fn split_holdout<T>(mut v: Vec<T>, frac: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let n = v.len();
    let k = ((n as f64) * frac).round() as usize;
    let perm = rlhf_data::batch::epoch_permutation(seed ^ 0x5EED, 0, n);
    let held: std::collections::HashSet<usize> =
        perm.into_iter().take(k.min(n.saturating_sub(1))).collect();
    let mut train = vec![];
    let mut eval = vec![];
    for (i, x) in v.drain(..).enumerate() {
        if held.contains(&i) {
            eval.push(x)
        } else {
            train.push(x)
        }
    }
    (train, eval)
}

/// Run SFT from a config.
pub fn run_sft(cfg: &SftConfig, resume: bool) -> Result<RunSummary> {
    let (model, tok) = load_policy(&cfg.model, cfg.lora.as_ref(), cfg.train.seed)?;
    let tcfg = SftTokenizeConfig {
        max_len: cfg.max_len,
        completion_only: cfg.completion_only,
        prompt_completion_as_chat: cfg.use_chat_template,
    };
    let mut examples = load_sft(&cfg.data)?;
    let mut eval_examples = match &cfg.eval_data {
        Some(p) => load_sft(p)?,
        None => vec![],
    };
    if cfg.eval_data.is_none() && cfg.eval_fraction > 0.0 {
        let (a, b) = split_holdout(examples, cfg.eval_fraction, cfg.train.seed);
        examples = a;
        eval_examples = b;
    }
    if cfg.max_examples > 0 {
        examples.truncate(cfg.max_examples);
    }
    let (mut train, stats) =
        tokenize_sft(&tok, &examples, &tcfg).with_context(|| format!("{}", cfg.data.display()))?;
    if let Some(w) = stats.warning() {
        eprintln!("{}: {w}", cfg.data.display());
    }
    let (eval, _) = tokenize_sft(&tok, &eval_examples, &tcfg)?;
    if cfg.packing {
        train = pack(&train, cfg.max_len)
            .into_iter()
            .map(TokenizedSft::from)
            .collect();
    }
    let train_cfg = cfg.train.clone();
    let mut obj = SftObjective {
        model,
        tokenizer: tok,
        train,
        eval,
        eval_batch: cfg.train.batch_size,
        token_norm: None,
        padding_free: cfg.padding_free,
    };
    std::fs::create_dir_all(&cfg.out)?;
    crate::trainer::write_run_config(&cfg.out, cfg)?;
    Trainer::new(train_cfg, &cfg.out).run(&mut obj, resume)
}
