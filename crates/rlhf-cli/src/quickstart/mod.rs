//! `rlhf quickstart`: the whole RLHF loop on a built-in task world, in minutes on a laptop.
//!
//! world → tokenizer + tiny model from scratch → SFT → for each round: sample K responses per
//! prompt → simulated annotators rank them through the feedback service's storage (the web UI's
//! code path) → reward model → PPO (and DPO on the same pairs, for comparison) → evaluate under the
//! hidden gold utility → next round samples from the new policy. Everything lands in one run
//! directory; each finished stage leaves `done.json`, so running again resumes where it stopped.

pub mod report;
pub mod stages;
pub mod svg;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rlhf_data::world;
use rlhf_model::{CausalLM, ChatMessage, GenerationConfig, Tokenizer};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use report::{Report, RoundReport, Sample};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Preset {
    /// The full demonstration (about 3 minutes on 2 cores, release build).
    Default,
    /// A small but real version for CI (a couple of minutes).
    Ci,
    /// Plumbing only (seconds; learns little): for testing the pipeline around the stages,
    /// e.g. `--human` end to end.
    Smoke,
}

#[derive(Args, Clone, Debug)]
pub struct QuickstartArgs {
    /// Run directory (configs, metrics, checkpoints, report). Re-running resumes it.
    #[arg(long, default_value = "runs/quickstart")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Feedback rounds (sample → annotate → RM → PPO/DPO).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Simulated annotators.
    #[arg(long, default_value_t = 5)]
    pub annotators: usize,
    /// Candidates per prompt.
    #[arg(short = 'k', long, default_value_t = 4)]
    pub k: usize,
    #[arg(long, value_enum, default_value = "default")]
    pub preset: Preset,
    /// Instead of simulated annotators, serve the round's samples on the feedback service and
    /// wait for real people to rank them.
    #[arg(long)]
    pub human: bool,
    /// Address for --human.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// With --human: prompts per round to rank (each with K candidates, ranked by
    /// `--annotators` distinct people). Replaces the preset's simulated-panel size.
    #[arg(long, default_value_t = 24)]
    pub human_items: usize,
}

/// Sizes of everything, by preset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub d_model: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub sft_rows: usize,
    pub sft_steps: usize,
    pub prompts_per_round: usize,
    pub eval_prompts: usize,
    pub rm_steps: usize,
    pub ppo_iterations: usize,
    pub ppo_batch: usize,
    /// PPO's policy learning rate. At 3e-4 the default preset's PPO moved ~3 nats of KL per
    /// iteration and over-optimised its reward model within 16 iterations (RM 0.9 → 2.1, gold
    /// utility peaked at iteration 5–8, ended below SFT: 0.59 → 0.28); at 1e-4 for 32
    /// iterations KL grows smoothly to ~4 and gold utility with it (→ 1.60).
    pub ppo_lr: f64,
    /// PPO's KL coefficient β.
    pub ppo_kl_coef: f64,
    pub dpo_steps: usize,
    /// DPO's β. At 0.1 the default preset's round-1 DPO ran to KL 30 from SFT and lost the
    /// task (gold 0.59 → −0.87); at 0.3 it stays at KL 7 and improves it (→ 0.99).
    pub dpo_beta: f64,
    pub max_new_tokens: usize,
}

impl Plan {
    pub fn for_preset(p: Preset) -> Plan {
        match p {
            Preset::Default => Plan {
                d_model: 96,
                n_layer: 3,
                n_head: 4,
                sft_rows: 3000,
                sft_steps: 400,
                prompts_per_round: 384,
                eval_prompts: 128,
                rm_steps: 120,
                ppo_iterations: 32,
                ppo_batch: 32,
                ppo_lr: 1e-4,
                ppo_kl_coef: 0.3,
                dpo_steps: 100,
                dpo_beta: 0.3,
                max_new_tokens: 40,
            },
            Preset::Ci => Plan {
                d_model: 64,
                n_layer: 2,
                n_head: 2,
                sft_rows: 1200,
                sft_steps: 250,
                prompts_per_round: 256,
                eval_prompts: 96,
                rm_steps: 80,
                ppo_iterations: 12,
                ppo_batch: 24,
                ppo_lr: 3e-4,
                ppo_kl_coef: 0.1,
                dpo_steps: 60,
                dpo_beta: 0.1,
                max_new_tokens: 32,
            },
            Preset::Smoke => Plan {
                d_model: 32,
                n_layer: 1,
                n_head: 2,
                sft_rows: 200,
                sft_steps: 20,
                prompts_per_round: 16,
                eval_prompts: 16,
                rm_steps: 10,
                ppo_iterations: 2,
                ppo_batch: 8,
                ppo_lr: 3e-4,
                ppo_kl_coef: 0.1,
                dpo_steps: 4,
                dpo_beta: 0.1,
                max_new_tokens: 16,
            },
        }
    }
}

/// Seconds per stage, including stages finished by an earlier (interrupted) run.
#[derive(Default)]
pub struct StageTimes {
    pub stages: Vec<(String, f64)>,
    /// The part of `stages` that earlier runs spent.
    pub resumed: f64,
}

/// Run a stage once: its result is stored in `dir/done.json` and reused on the next run.
pub fn stage<T: Serialize + DeserializeOwned>(
    dir: &Path,
    name: &str,
    times: &mut StageTimes,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let done = dir.join("done.json");
    // How long the stage took when it ran (kept beside its result, so that a resumed run's
    // report still adds up the whole run).
    let secs_path = dir.join("secs.json");
    if done.exists() {
        let s = std::fs::read_to_string(&done)?;
        if let Ok(v) = serde_json::from_str(&s) {
            eprintln!("== {name}: already done ({})", dir.display());
            let secs = std::fs::read_to_string(&secs_path)
                .ok()
                .and_then(|s| s.trim().parse::<f64>().ok());
            if let Some(secs) = secs {
                times.stages.push((name.to_string(), secs));
                times.resumed += secs;
            }
            return Ok(v);
        }
    }
    std::fs::create_dir_all(dir)?;
    eprintln!("== {name}");
    let t = Instant::now();
    let v = f().with_context(|| format!("quickstart stage `{name}`"))?;
    let secs = t.elapsed().as_secs_f64();
    rlhf_model::model::write_atomic(&secs_path, format!("{secs}\n").as_bytes())?;
    rlhf_model::model::write_atomic(&done, serde_json::to_string_pretty(&v)?.as_bytes())?;
    times.stages.push((name.to_string(), secs));
    Ok(v)
}

/// Everything a stage needs to know about the world and the shared model pieces.
pub struct Ctx {
    pub args: QuickstartArgs,
    pub plan: Plan,
    pub out: PathBuf,
    pub tok: Tokenizer,
}

impl Ctx {
    /// The chat-rendered prompt ids for world prompts.
    pub fn prompt_ids(&self, prompts: &[world::WorldPrompt]) -> Result<Vec<Vec<u32>>> {
        prompts
            .iter()
            .map(|p| {
                let s = self
                    .tok
                    .apply_chat_template(&[ChatMessage::new("user", &p.text)], true)?;
                self.tok.encode(&s, false)
            })
            .collect()
    }

    pub fn gen_cfg(&self, temperature: f64, seed: u64) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: self.plan.max_new_tokens,
            temperature,
            top_p: 1.0,
            top_k: 0,
            seed,
            eos_ids: self.tok.eos_id().into_iter().collect(),
            pad_id: self.tok.pad_id(),
            use_cache: true,
            first_row: 0,
        }
    }

    /// Response text (special tokens dropped) from generated ids.
    pub fn text(&self, ids: &[u32]) -> Result<String> {
        Ok(world::normalize(&self.tok.decode(ids, true)?))
    }

    pub fn sft_dir(&self) -> PathBuf {
        self.out.join("sft/final")
    }
}

/// Build the world's tokenizer (word level, with a chat template).
pub fn world_tokenizer() -> Tokenizer {
    rlhf_data::vocab::word_level_tokenizer(&world::vocabulary())
}

/// A tiny GPT-2 for the world, from scratch.
pub fn tiny_model(tok: &Tokenizer, plan: &Plan, seed: u64) -> Result<CausalLM> {
    CausalLM::random(
        serde_json::json!({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": tok.vocab_size(), "n_positions": 192, "n_embd": plan.d_model,
            "n_layer": plan.n_layer, "n_head": plan.n_head,
            "bos_token_id": tok.bos_id(), "eos_token_id": tok.eos_id()}),
        seed,
    )
}

pub fn run(args: QuickstartArgs) -> Result<()> {
    if !(2..=9).contains(&args.k) {
        bail!("-k must be between 2 and 9")
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1")
    }
    let t0 = Instant::now();
    if args.human && args.human_items == 0 {
        bail!("--human-items must be at least 1")
    }
    let mut plan = Plan::for_preset(args.preset);
    if args.human {
        plan.prompts_per_round = args.human_items;
    }
    let out = args.out.clone();
    std::fs::create_dir_all(&out)?;
    let meta = serde_json::json!({"seed": args.seed, "preset": args.preset, "rounds": args.rounds,
        "annotators": args.annotators, "k": args.k, "plan": plan});
    let meta_path = out.join("quickstart.json");
    if meta_path.exists() {
        let old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta_path)?)?;
        if old != meta {
            bail!(
                "{} holds a run with other settings ({}); use another --out or delete it",
                out.display(),
                old
            )
        }
    }
    std::fs::write(&meta_path, serde_json::to_string_pretty(&meta)?)?;
    let tok = world_tokenizer();
    let ctx = Ctx {
        args: args.clone(),
        plan,
        out: out.clone(),
        tok,
    };
    let mut times = StageTimes::default();
    let mut report = Report {
        seed: args.seed,
        model_desc: format!(
            "GPT-2 {}L d{} from scratch, vocab {}; {} annotators, K={}; {} matmuls",
            ctx.plan.n_layer,
            ctx.plan.d_model,
            ctx.tok.vocab_size(),
            args.annotators,
            args.k,
            rlhf_model::kernels::gemm::matmul_precision().name()
        ),
        ..Default::default()
    };

    let sft_losses = stage(&out.join("sft"), "SFT", &mut times, || stages::sft(&ctx))?;
    report.losses.push(("SFT".into(), sft_losses));
    let eval_prompts = world::eval_prompts(ctx.plan.eval_prompts, args.seed ^ 0xE7A1);
    let sft_eval = stage(&out.join("eval-sft"), "evaluate SFT", &mut times, || {
        stages::evaluate(&ctx, "SFT", 0, &ctx.sft_dir(), &eval_prompts, None)
    })?;
    report.policies.push(sft_eval.policy.clone());
    let mut sample_texts = vec![("SFT".to_string(), sft_eval.texts.clone())];

    let mut policy_dir = ctx.sft_dir();
    let mut ppo_iter_offset = 0;
    for round in 1..=args.rounds {
        let rdir = out.join(format!("round{round}"));
        let samples = stage(
            &rdir.join("samples"),
            &format!("round {round}: sample"),
            &mut times,
            || stages::sample_candidates(&ctx, &policy_dir, round),
        )?;
        let ann = stage(
            &rdir.join("annotate"),
            &format!("round {round}: annotate"),
            &mut times,
            || stages::annotate(&ctx, round, &samples),
        )?;
        let rm = stage(
            &rdir.join("reward"),
            &format!("round {round}: reward model"),
            &mut times,
            || stages::reward(&ctx, round),
        )?;
        report
            .losses
            .push((format!("RM r{round}"), rm.losses.clone()));
        let ppo = stage(
            &rdir.join("ppo"),
            &format!("round {round}: PPO"),
            &mut times,
            || stages::ppo(&ctx, round, &policy_dir, ppo_iter_offset),
        )?;
        ppo_iter_offset += ppo.points.len();
        let dpo = stage(
            &rdir.join("dpo"),
            &format!("round {round}: DPO"),
            &mut times,
            || stages::dpo(&ctx, round),
        )?;
        report
            .losses
            .push((format!("DPO r{round}"), dpo.losses.clone()));
        let rm_dir = rdir.join("reward/final");
        let ppo_eval = stage(
            &rdir.join("eval-ppo"),
            &format!("round {round}: evaluate PPO"),
            &mut times,
            || {
                stages::evaluate(
                    &ctx,
                    "PPO",
                    round,
                    &rdir.join("ppo/final"),
                    &eval_prompts,
                    Some(&rm_dir),
                )
            },
        )?;
        let dpo_eval = stage(
            &rdir.join("eval-dpo"),
            &format!("round {round}: evaluate DPO"),
            &mut times,
            || {
                stages::evaluate(
                    &ctx,
                    "DPO",
                    round,
                    &rdir.join("dpo/final"),
                    &eval_prompts,
                    Some(&rm_dir),
                )
            },
        )?;
        report.policies.push(ppo_eval.policy.clone());
        report.policies.push(dpo_eval.policy.clone());
        if round == args.rounds {
            sample_texts.push((format!("PPO r{round}"), ppo_eval.texts.clone()));
            sample_texts.push((format!("DPO r{round}"), dpo_eval.texts.clone()));
        }
        report.rounds.push(RoundReport {
            round,
            n_items: ann.n_items,
            n_pairs: ann.n_pairs,
            alpha: ann.alpha,
            kappa: ann.kappa,
            annotator_agreement: ann.agreement,
            rm_heldout_acc: rm.heldout_acc,
            rm_acc_lo: rm.acc_lo,
            rm_acc_hi: rm.acc_hi,
            rm_gold_acc: rm.gold_acc,
            ppo: ppo.points.clone(),
            dpo_curve: vec![
                (0.0, sft_eval.policy.gold_mean),
                (dpo_eval.policy.kl_to_sft, dpo_eval.policy.gold_mean),
            ],
        });
        policy_dir = rdir.join("ppo/final");
    }
    // Side-by-side samples for the first eval prompts.
    for (i, p) in eval_prompts.iter().take(8).enumerate() {
        let responses = sample_texts
            .iter()
            .map(|(name, texts)| {
                let t = texts[i].clone();
                let g = world::gold_utility(p, &t);
                (name.clone(), t, g)
            })
            .collect();
        report.samples.push(Sample {
            prompt: p.text.clone(),
            responses,
        });
    }
    let resumed = times.resumed;
    report.stage_secs = times.stages;
    // This process's time plus the recorded time of the stages it found already done: the
    // run's total, however often it was interrupted and resumed.
    report.wall_secs = t0.elapsed().as_secs_f64() + resumed;
    report::write(&report, &out)?;
    print_summary(&report, &out);
    Ok(())
}

fn print_summary(r: &Report, out: &Path) {
    println!();
    println!(
        "{:<10} {:>5} {:>12} {:>9} {:>9} {:>10}",
        "policy", "round", "gold util.", "RM", "KL/SFT", "win vs SFT"
    );
    for p in &r.policies {
        println!(
            "{:<10} {:>5} {:>8.3}±{:.2} {:>9} {:>9.3} {:>9.1}%",
            p.name,
            p.round,
            p.gold_mean,
            p.gold_se,
            report::fixed3(p.rm_mean),
            p.kl_to_sft,
            100.0 * p.win_rate_vs_sft
        );
    }
    for rr in &r.rounds {
        println!(
            "round {}: {} pairs; annotators α {:.3}, agreement {:.3}; RM held-out accuracy {:.3} ({:.3}–{:.3})",
            rr.round, rr.n_pairs, rr.alpha, rr.annotator_agreement, rr.rm_heldout_acc, rr.rm_acc_lo, rr.rm_acc_hi
        );
    }
    println!("report: {}", out.join("report.html").display());
}
