//! Reward model and DPO on real human preferences: Anthropic HH-RLHF (helpful-base +
//! harmless-base test splits from `../shared/data/hh-rlhf/`) with SmolLM2-135M-Instruct + LoRA,
//! sized for a CPU. Not a test (minutes, not seconds).
//!
//! ```sh
//! cargo run --release -p rlhf-train --example hh_rlhf -- reward [N_TRAIN] [N_EVAL]
//! cargo run --release -p rlhf-train --example hh_rlhf -- dpo    [N_TRAIN] [N_EVAL]
//! ```
//!
//! Environment: `HH_LAST_LAYERS` (LoRA adapters train in the last this-many layers only, default
//! 8: backward stops there, ~3× cheaper than all 30), `HH_MAX_LEN` (default 256), `HH_EPOCHS`
//! (default 1), `HH_LR`, `HH_BATCH` (pairs per step, default 8), `HH_OUT` (default
//! `runs/hh-rlhf`), `RLHF_SHARED_DATA` (default `<workspace>/../shared/data`).
//!
//! The data: every record of both files loaded leniently (records whose transcripts share no
//! prompt are skipped and counted), shuffled with a fixed seed, 10% held out; `N_TRAIN` pairs
//! are trained on and `N_EVAL` held-out pairs evaluated (accuracy with a 95% bootstrap interval).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rlhf_data::formats::{load_preferences_lenient, PreferencePair};
use rlhf_model::LoraConfig;
use rlhf_train::dpo::{train_dpo_on, DpoConfig, DpoLoss};
use rlhf_train::reward::{split_pairs_by_group, train_reward_on, RewardConfig};
use rlhf_train::TrainConfig;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("");
    if mode != "reward" && mode != "dpo" {
        bail!("usage: hh_rlhf reward|dpo [N_TRAIN=300] [N_EVAL=100]")
    }
    let n_train: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(300);
    let n_eval: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(100);
    let Some(gguf) = rlhf_model::load::smollm2_gguf() else {
        eprintln!(
            "SmolLM2-135M-Instruct GGUF not found. Fetch it with `scripts/fetch-smollm2.sh` (writes \
             target/models/SmolLM2-135M-Instruct.Q4_1.gguf) or set RLHF_SMOLLM2_GGUF."
        );
        std::process::exit(2);
    };
    let data_root = std::env::var("RLHF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    let mut all: Vec<PreferencePair> = Vec::new();
    for part in ["helpful-base", "harmless-base"] {
        let f = data_root.join("hh-rlhf").join(part).join("test.jsonl.gz");
        if !f.exists() {
            eprintln!(
                "{} not found: HH-RLHF data is read from ../shared/data (set RLHF_SHARED_DATA)",
                f.display()
            );
            std::process::exit(2);
        }
        let (mut pairs, skipped) =
            load_preferences_lenient(&f).with_context(|| format!("{}", f.display()))?;
        eprintln!(
            "{part}: {} pairs, {} records skipped",
            pairs.len(),
            skipped.len()
        );
        // Groups are record indices within a file: make them unique across files.
        let off = all.len() + 1_000_000;
        for p in &mut pairs {
            p.group += off;
        }
        all.extend(pairs);
    }
    // Shuffle (fixed seed), hold out 10% (by group), subsample.
    let perm = rlhf_data::batch::epoch_permutation(2024, 0, all.len());
    let shuffled: Vec<PreferencePair> = perm.into_iter().map(|i| all[i].clone()).collect();
    let (mut train, mut eval) = split_pairs_by_group(shuffled, 0.10, 2024);
    let held_total = eval.len();
    train.truncate(n_train);
    eval.truncate(n_eval);
    // A trivial baseline on the same held-out pairs: "the longer response is preferred".
    let longer = eval
        .iter()
        .filter(|p| p.chosen.len() > p.rejected.len())
        .count() as f64
        / eval.len().max(1) as f64;
    eprintln!(
        "{} train pairs, {} held-out pairs (of {held_total}); length baseline on them: {longer:.3}",
        train.len(),
        eval.len()
    );

    let last_layers: usize = env_or("HH_LAST_LAYERS", 8);
    let max_len: usize = env_or("HH_MAX_LEN", 256);
    let epochs: f64 = env_or("HH_EPOCHS", 1.0);
    let batch: usize = env_or("HH_BATCH", 8);
    let out = PathBuf::from(env_or("HH_OUT", "runs/hh-rlhf".to_string())).join(mode);
    let _ = std::fs::remove_dir_all(&out);
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
    };
    let tcfg = |lr: f64| TrainConfig {
        epochs,
        batch_size: batch,
        lr: env_or("HH_LR", lr),
        warmup_steps: 3,
        log_every: 5,
        // Evaluate at the end only; HH_EVAL_BEFORE=1 adds one at step 0 for the reward model
        // (the random head). DPO always reports "before" (policy = reference).
        eval_every: if mode == "reward" && env_or("HH_EVAL_BEFORE", 0) == 1 {
            1_000_000
        } else {
            0
        },
        seed: 7,
        ..Default::default()
    };
    let start = Instant::now();
    let model = gguf.to_str().context("path")?.to_string();
    match mode {
        "reward" => {
            let cfg = RewardConfig {
                model,
                out: out.clone(),
                max_len,
                max_prompt_len: Some(max_len / 2),
                lora: Some(lora),
                train_last_layers: Some(last_layers),
                normalize_max: 256,
                train: tcfg(2e-4),
                ..Default::default()
            };
            let rep = train_reward_on(&cfg, train, eval, false)?;
            let s = &rep.summary;
            let acc = rep.eval.clone().context("no eval")?;
            println!("== reward model on HH-RLHF (SmolLM2-135M-Instruct, LoRA r8 q/v, last {last_layers} layers) ==");
            if let Some(f) = &s.first_eval {
                println!(
                    "held-out before training (random head): accuracy {:.3}, loss {:.4}",
                    f["accuracy"], f["loss"]
                );
            }
            println!("held-out after {} steps: {acc}", s.steps);
            if let Some(l) = &s.last_eval {
                println!(
                    "  loss {:.4}, reward mean {:.3} std {:.3} (raw; offset {:.3} stored)",
                    l["loss"], l["reward_mean"], l["reward_std"], rep.offset
                );
            }
            println!("length baseline (longer = chosen) on the same pairs: {longer:.3}");
            println!(
                "training: {:.0} tokens/s, {:.1} s in the loop; total wall {:.1} s; model in {}",
                s.tokens_per_sec,
                s.wall_secs,
                start.elapsed().as_secs_f64(),
                s.final_dir.display()
            );
        }
        _ => {
            let cfg = DpoConfig {
                model,
                out: out.clone(),
                max_len,
                max_prompt_len: Some(max_len / 2),
                loss: DpoLoss::Sigmoid,
                beta: 0.1,
                lora: Some(lora),
                train_last_layers: Some(last_layers),
                train: tcfg(1e-4),
                ..Default::default()
            };
            let rep = train_dpo_on(&cfg, train, eval, false)?;
            let s = &rep.summary;
            println!("== DPO on HH-RLHF (SmolLM2-135M-Instruct, LoRA r8 q/v, last {last_layers} layers, β 0.1) ==");
            println!(
                "reference log-probs: {:.1} s (computed once, cached in {})",
                rep.reference_secs,
                out.join("ref_logps.json").display()
            );
            for (name, e) in [("before", &rep.eval_before), ("after", &rep.eval_after)] {
                if let Some(e) = e {
                    println!(
                        "held-out {name}: loss {:.4}, implicit-reward accuracy {:.3}, margin {:.4}, rewards chosen {:.4} rejected {:.4}, logps chosen {:.2} rejected {:.2}",
                        e["loss"], e["reward_accuracy"], e["reward_margin"], e["rewards_chosen"],
                        e["rewards_rejected"], e["logps_chosen"], e["logps_rejected"]
                    );
                }
            }
            if let Some(a) = &rep.eval_accuracy {
                println!("held-out implicit reward after {} steps: {a}", s.steps);
            }
            println!("length baseline (longer = chosen) on the same pairs: {longer:.3}");
            println!(
                "training: {:.0} tokens/s, {:.1} s in the loop; total wall {:.1} s",
                s.tokens_per_sec,
                s.wall_secs,
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
