//! The one training loop every algorithm plugs its loss into.
//!
//! Per optimizer step: `grad_accum` micro-batches (each `batch_size` items, in a seeded per-epoch
//! order) → loss → backward → gradients summed → non-finite guard → global-norm clipping →
//! AdamW with the scheduled learning rate. Every `log_every` steps a metrics line; every
//! `eval_every` an evaluation; every `save_every` an atomic checkpoint. `resume` continues from the
//! newest checkpoint so the loss curve is identical to an uninterrupted run's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use rlhf_data::batch::DataOrder;
use rlhf_model::kernels::sink::{sum_grads, GradSink};
use rlhf_model::params::Param;
use rlhf_model::CausalLM;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, LoopState};
use crate::metrics::{MetricsWriter, Progress, Scalars};
use crate::optim::{add_sunk, clip_grads, grad_norm, lr_at, AdamW, AdamWConfig, Schedule};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Total optimizer steps; 0 = derive from `epochs`.
    pub max_steps: usize,
    pub epochs: f64,
    /// Items per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    /// Global-norm clip (0 = off).
    pub max_grad_norm: f64,
    pub log_every: usize,
    /// 0 = only at the end.
    pub eval_every: usize,
    /// 0 = only at the end.
    pub save_every: usize,
    pub keep_last: usize,
    pub seed: u64,
    /// Stop after this many consecutive non-finite steps.
    pub max_nonfinite_in_row: usize,
    /// Batch items of similar lengths together (Hugging Face's `group_by_length`): far less
    /// padding on data of mixed lengths, so faster steps, at the cost of batches that are no
    /// longer uniform draws. The run says at its start what share of its batches' tokens are
    /// real either way. Losses that average over tokens adapt their weighting
    /// ([`Objective::set_length_grouped`]).
    pub group_by_length: bool,
    /// Gradient checkpointing (Hugging Face's `gradient_checkpointing`): `"auto"` (the
    /// default: only when the step would not fit otherwise, and then as few layers as make it
    /// fit), `true`, `false`, or a number of layers; see [`crate::memory::Checkpointing`].
    /// [`Trainer::run`] plans it when it starts, from the models and micro-batch shape the
    /// objective names ([`Objective::step_shapes`]) and the memory then available
    /// ([`crate::memory::plan`]); for an objective that names none, `"auto"` recomputes nothing.
    pub gradient_checkpointing: crate::memory::Checkpointing,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_steps: 0,
            epochs: 1.0,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-4,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            log_every: 10,
            eval_every: 0,
            save_every: 0,
            keep_last: 2,
            seed: 42,
            max_nonfinite_in_row: 5,
            group_by_length: false,
            gradient_checkpointing: crate::memory::Checkpointing::Auto,
        }
    }
}

/// What one micro-batch produced.
pub struct StepOut {
    /// Mean loss over the micro-batch (backward runs on it).
    pub loss: Tensor,
    /// The loss to log and print, when it is not `loss`'s value (SFT under `group_by_length`
    /// trains on a rescaled sum and logs the batch's token mean, comparable with other runs).
    pub logged_loss: Option<f64>,
    /// Extra scalars to average over the logging window (accuracy, margins, …).
    pub metrics: Scalars,
    /// Tokens processed (for tokens/s).
    pub tokens: usize,
}

/// An algorithm: a dataset of items and a loss over a micro-batch of them.
pub trait Objective {
    fn name(&self) -> &str;
    /// Number of training items.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Group id per item (items of one group land in one micro-batch), if any.
    fn groups(&self) -> Option<Vec<usize>> {
        None
    }
    /// Each item's padded width in tokens (for `group_by_length` and the padding report), if
    /// known.
    fn lengths(&self) -> Option<Vec<usize>> {
        None
    }
    /// Real tokens and computed slots (real + padding) of the micro-batch `items`, given every
    /// item's [`Objective::lengths`] (for the padding report): by default one row per item,
    /// padded to the longest.
    fn batch_tokens(&self, items: &[usize], lengths: &[usize]) -> (usize, usize) {
        rlhf_data::batch::padded_tokens(items, lengths)
    }
    /// Called once before training when the loop batches items by length, with the
    /// micro-batch size: a loss that averages over tokens should then weigh a token alike in
    /// every batch (SFT); a loss that averages over items needs nothing.
    fn set_length_grouped(&mut self, _batch_size: usize) {}
    /// The models one step's backward runs through, each with the shape of a micro-batch of
    /// `batch_size` items (its widest), for planning `"auto"` gradient checkpointing
    /// ([`crate::memory::plan`]) when the run starts. Empty by default: `"auto"` then
    /// recomputes nothing. SFT, DPO and the reward model name theirs.
    fn step_shapes(&self, _batch_size: usize) -> Vec<(&CausalLM, crate::memory::StepShape)> {
        Vec::new()
    }
    fn trainable(&self) -> Vec<Param>;
    /// Training mode with this noise seed (LoRA dropout), or `None` for evaluation mode. The
    /// loop sets a seed derived from (run seed, step, micro-batch) before every `loss`, so a
    /// resumed run draws the same masks, and clears it before evaluating or saving.
    fn set_train_noise(&mut self, _seed: Option<u64>) {}
    fn loss(&mut self, items: &[usize]) -> Result<StepOut>;
    /// Held-out metrics (names get an `eval/` prefix).
    fn evaluate(&mut self) -> Result<Scalars> {
        Ok(Scalars::new())
    }
    /// Write the final model (HF layout) into `dir`.
    fn save_final(&self, dir: &Path) -> Result<()>;
}

/// Below this share of real tokens in its batches, a run suggests `group_by_length`.
const PADDING_HINT: f64 = 0.7;

/// [`Objective::evaluate`] without a graph: no backward follows it.
fn evaluate(obj: &mut dyn Objective) -> Result<Scalars> {
    let _no_grad = rlhf_model::params::no_grad();
    obj.evaluate()
}

/// What a finished run reports.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub steps: usize,
    /// Loss of every optimizer step (mean over its micro-batches), by step index.
    pub losses: Vec<(usize, f64)>,
    pub first_eval: Option<Scalars>,
    pub last_eval: Option<Scalars>,
    pub tokens_per_sec: f64,
    pub skipped_nonfinite: usize,
    pub final_dir: PathBuf,
    pub wall_secs: f64,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub out: PathBuf,
    /// Stop (as if interrupted) after this many steps of this process — for resume tests.
    pub stop_after: Option<usize>,
}

impl Trainer {
    pub fn new(cfg: TrainConfig, out: &Path) -> Self {
        Self {
            cfg,
            out: out.to_path_buf(),
            stop_after: None,
        }
    }

    pub fn total_steps(&self, n_items: usize) -> usize {
        if self.cfg.max_steps > 0 {
            return self.cfg.max_steps;
        }
        let per_epoch = n_items
            .div_ceil(self.cfg.batch_size)
            .div_ceil(self.cfg.grad_accum);
        ((per_epoch as f64) * self.cfg.epochs).ceil().max(1.0) as usize
    }

    /// Train `obj`; resumes from the newest checkpoint in `out` when `resume`.
    pub fn run(&self, obj: &mut dyn Objective, resume: bool) -> Result<RunSummary> {
        let cfg = &self.cfg;
        if obj.is_empty() {
            bail!("{}: the training set is empty", obj.name())
        }
        if cfg.batch_size == 0 || cfg.grad_accum == 0 {
            bail!("batch_size and grad_accum must be positive")
        }
        let total = self.total_steps(obj.len());
        let params = obj.trainable();
        let sink_tensors: Vec<&Tensor> = params.iter().map(|p| p.var().as_tensor()).collect();
        let mut opt = AdamW::new(
            params.clone(),
            AdamWConfig {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.adam_eps,
                weight_decay: cfg.weight_decay,
            },
        )?;
        let mut state = LoopState {
            step: 0,
            epoch: 0,
            position: 0,
            optimizer_t: 0,
            nonfinite_total: 0,
            seed: cfg.seed,
            extra: serde_json::Value::Null,
        };
        if resume {
            if let Some(ck) = checkpoint::latest(&self.out)? {
                restore_params(&params, &ck.weights)?;
                opt.load_state(ck.state.optimizer_t, &ck.optimizer)?;
                eprintln!(
                    "[{}] resuming from {} (step {})",
                    obj.name(),
                    ck.dir.display(),
                    ck.state.step
                );
                state = ck.state;
            }
        }
        let mut metrics = MetricsWriter::open(&self.out)?;
        let groups = obj.groups();
        let lengths = obj.lengths();
        if cfg.group_by_length {
            if lengths.is_none() {
                bail!(
                    "train.group_by_length: `{}` does not report its items' lengths",
                    obj.name()
                )
            }
            obj.set_length_grouped(cfg.batch_size);
        }
        let order = DataOrder::new(cfg.seed, cfg.batch_size);
        let n_items = obj.len();
        let plan_with = |epoch: u64, by_length: bool| match (&lengths, &groups) {
            (Some(l), g) if by_length => order.length_grouped_plan(epoch, g.as_deref(), l),
            (_, Some(g)) => order.grouped_plan(epoch, g),
            (_, None) => order.plan(epoch, n_items),
        };
        let plan_for = |epoch: u64| plan_with(epoch, cfg.group_by_length);
        if let (Some(l), 0) = (&lengths, state.step) {
            let share = |plan: &[Vec<usize>]| {
                rlhf_data::batch::token_share(plan.iter().map(|b| obj.batch_tokens(b, l)))
            };
            let now = share(&plan_with(0, cfg.group_by_length));
            if cfg.group_by_length {
                eprintln!(
                    "[{}] group_by_length: {:.0}% of the batches' tokens are real (in random batches {:.0}%)",
                    obj.name(),
                    100.0 * now,
                    100.0 * share(&plan_with(0, false))
                );
            } else if now < PADDING_HINT {
                eprintln!(
                    "[{}] padding: only {:.0}% of the batches' tokens are real; train.group_by_length = true would make it {:.0}% (faster steps, batches of similar lengths)",
                    obj.name(),
                    100.0 * now,
                    100.0 * share(&plan_with(0, true))
                );
            } else {
                eprintln!(
                    "[{}] padding: {:.0}% of the batches' tokens are real",
                    obj.name(),
                    100.0 * now
                );
            }
        }
        let mut plan = plan_for(state.epoch);
        let mut summary = RunSummary {
            final_dir: self.out.join("final"),
            ..Default::default()
        };
        let progress = Progress::new(obj.name(), total, state.step);
        let start = Instant::now();
        let mut window = Window::default();
        let mut tokens_total = 0usize;
        let mut nonfinite_in_row = 0usize;
        let mut steps_this_process = 0usize;
        if state.step == 0 && cfg.eval_every > 0 {
            let ev = evaluate(obj)?;
            if !ev.is_empty() {
                metrics.log(0, &prefixed("eval/", &ev))?;
                summary.first_eval = Some(ev);
            }
        }
        // Blocks built on this thread from here on keep their inputs only: as many layers as
        // the setting asks, or for "auto" as few as make the step fit (none for an objective
        // that names no models); the plan says what it chose, and warns if even that may not fit.
        let recompute = crate::memory::plan(
            obj.name(),
            &obj.step_shapes(cfg.batch_size),
            cfg.gradient_checkpointing,
        );
        let _recompute = recompute.apply();
        while state.step < total {
            if let Some(n) = self.stop_after {
                if steps_this_process >= n {
                    return Ok(summary);
                }
            }
            let mut acc: Vec<Option<Tensor>> = vec![None; params.len()];
            // The fused ops write (and accumulate, over the micro-batches) weight gradients
            // into the sink; candle's backward returns the rest.
            let sink = GradSink::install(&sink_tensors)?;
            let mut step_loss = 0f64;
            let mut step_metrics = Scalars::new();
            let mut step_tokens = 0usize;
            for micro in 0..cfg.grad_accum {
                if state.position >= plan.len() {
                    state.epoch += 1;
                    state.position = 0;
                    plan = plan_for(state.epoch);
                }
                let items = plan[state.position].clone();
                state.position += 1;
                obj.set_train_noise(Some(
                    rlhf_data::rng::Rng::stream(cfg.seed, 0xD70F)
                        .next_u64()
                        .wrapping_add(((state.step as u64) << 16) | micro as u64),
                ));
                let out = obj.loss(&items);
                obj.set_train_noise(None);
                let out = out?;
                let lv = out.loss.to_scalar::<f32>()? as f64;
                step_loss += out.logged_loss.unwrap_or(lv) / cfg.grad_accum as f64;
                for (k, v) in out.metrics {
                    *step_metrics.entry(k).or_default() += v / cfg.grad_accum as f64;
                }
                step_tokens += out.tokens;
                if !lv.is_finite() {
                    continue;
                }
                let grads = (out.loss / cfg.grad_accum as f64)?.backward()?;
                for (i, p) in params.iter().enumerate() {
                    acc[i] = sum_grads(acc[i].take(), grads.get(p.var().as_tensor()).cloned())?;
                }
            }
            add_sunk(&mut acc, sink.take()?)?;
            drop(sink);
            let gnorm = grad_norm(&acc)?;
            let lr = lr_at(
                state.step,
                total,
                cfg.warmup_steps,
                cfg.lr,
                cfg.min_lr_ratio,
                cfg.schedule,
            );
            tokens_total += step_tokens;
            if !step_loss.is_finite() || !gnorm.is_finite() {
                // Skip the update: a non-finite loss or gradient never reaches the weights.
                nonfinite_in_row += 1;
                state.nonfinite_total += 1;
                summary.skipped_nonfinite += 1;
                let mut s = Scalars::new();
                s.insert("nonfinite_skipped".into(), state.nonfinite_total as f64);
                metrics.log(state.step, &s)?;
                eprintln!(
                    "[{}] step {}: non-finite loss ({step_loss}) or gradient norm ({gnorm}); update skipped ({} in a row)",
                    obj.name(),
                    state.step,
                    nonfinite_in_row
                );
                if nonfinite_in_row >= cfg.max_nonfinite_in_row {
                    let last = checkpoint::list(&self.out)?.last().cloned();
                    bail!(
                        "{}: {} non-finite steps in a row at step {}; stopping. Last good checkpoint: {}. Lower the learning rate or check the data.",
                        obj.name(),
                        nonfinite_in_row,
                        state.step,
                        last.map(|p| p.display().to_string()).unwrap_or_else(|| "none (nothing was saved yet)".into())
                    )
                }
                state.step += 1;
                steps_this_process += 1;
                continue;
            }
            nonfinite_in_row = 0;
            clip_grads(&mut acc, gnorm, cfg.max_grad_norm)?;
            opt.step(&acc, lr)?;
            state.optimizer_t = opt.t;
            state.step += 1;
            steps_this_process += 1;
            summary.losses.push((state.step, step_loss));
            window.add(step_loss, gnorm, lr, &step_metrics, step_tokens);
            let log_now = state.step.is_multiple_of(cfg.log_every.max(1)) || state.step == total;
            if log_now {
                let el = start.elapsed().as_secs_f64().max(1e-9);
                let mut s = window.take();
                s.insert("tokens_per_sec".into(), tokens_total as f64 / el);
                s.insert(
                    "epoch".into(),
                    state.epoch as f64 + state.position as f64 / plan.len().max(1) as f64,
                );
                metrics.log(state.step, &s)?;
                progress.update(
                    state.step,
                    &format!(
                        "loss {:.4} lr {:.2e} {:.0} tok/s",
                        s["loss"],
                        lr,
                        tokens_total as f64 / el
                    ),
                    true,
                );
            } else {
                progress.update(state.step, &format!("loss {step_loss:.4}"), false);
            }
            if cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every) && state.step < total
            {
                let ev = evaluate(obj)?;
                if !ev.is_empty() {
                    metrics.log(state.step, &prefixed("eval/", &ev))?;
                }
            }
            if cfg.save_every > 0 && state.step.is_multiple_of(cfg.save_every) && state.step < total
            {
                checkpoint::save(
                    &self.out,
                    &state,
                    &param_tensors(&params),
                    opt.state_views(),
                    cfg.keep_last,
                )?;
            }
        }
        let ev = evaluate(obj)?;
        if !ev.is_empty() {
            metrics.log(state.step, &prefixed("eval/", &ev))?;
            summary.last_eval = Some(ev);
        }
        checkpoint::save(
            &self.out,
            &state,
            &param_tensors(&params),
            opt.state_views(),
            cfg.keep_last,
        )?;
        obj.save_final(&summary.final_dir)?;
        summary.steps = state.step;
        summary.wall_secs = start.elapsed().as_secs_f64();
        summary.tokens_per_sec = tokens_total as f64 / summary.wall_secs.max(1e-9);
        progress.finish(&format!(
            "{} steps, {:.0} tok/s",
            state.step, summary.tokens_per_sec
        ));
        Ok(summary)
    }
}

fn prefixed(p: &str, s: &Scalars) -> Scalars {
    s.iter().map(|(k, v)| (format!("{p}{k}"), *v)).collect()
}

/// Write a run's resolved configuration to `out/config.toml` (usable as `--config` as is), headed
/// by a comment naming the matmul precision the run used (`--matmul` / `RLHF_MATMUL`, set
/// outside the config).
pub fn write_run_config<T: Serialize>(out: &Path, cfg: &T) -> Result<()> {
    let precision = rlhf_model::kernels::gemm::matmul_precision().name();
    let text = format!("# matmul precision: {precision}\n{}", toml::to_string(cfg)?);
    std::fs::write(out.join("config.toml"), text)?;
    Ok(())
}

pub fn param_tensors(params: &[Param]) -> std::collections::BTreeMap<String, Tensor> {
    params
        .iter()
        .map(|p| (p.name().to_string(), p.var().as_tensor().detach()))
        .collect()
}

pub fn restore_params(
    params: &[Param],
    w: &std::collections::BTreeMap<String, Tensor>,
) -> Result<()> {
    for p in params {
        let Some(t) = w.get(p.name()) else {
            bail!(
                "checkpoint has no `{}`: it was written for another model or LoRA setting",
                p.name()
            )
        };
        if t.dims() != p.var().dims() {
            bail!(
                "checkpoint `{}` has shape {:?}, expected {:?}",
                p.name(),
                t.dims(),
                p.var().dims()
            )
        }
        p.var().set(t)?;
    }
    Ok(())
}

/// Averages over a logging window.
#[derive(Default)]
struct Window {
    n: usize,
    loss: f64,
    gnorm: f64,
    lr: f64,
    extra: Scalars,
    tokens: usize,
}

impl Window {
    fn add(&mut self, loss: f64, gnorm: f64, lr: f64, m: &Scalars, tokens: usize) {
        self.n += 1;
        self.loss += loss;
        self.gnorm += gnorm;
        self.lr = lr;
        self.tokens += tokens;
        for (k, v) in m {
            *self.extra.entry(k.clone()).or_default() += v;
        }
    }
    fn take(&mut self) -> Scalars {
        let n = self.n.max(1) as f64;
        let mut s: Scalars = self.extra.iter().map(|(k, v)| (k.clone(), v / n)).collect();
        s.insert("loss".into(), self.loss / n);
        s.insert("grad_norm".into(), self.gnorm / n);
        s.insert("lr".into(), self.lr);
        s.insert("tokens".into(), self.tokens as f64);
        *self = Window::default();
        s
    }
}
