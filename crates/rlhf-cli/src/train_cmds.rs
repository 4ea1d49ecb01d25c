//! `rlhf sft` (and the shared argument set of the training commands).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Clone)]
pub struct TrainArgs {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override any config key: `--set train.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Shorthand for --set model=…
    #[arg(long)]
    pub model: Option<String>,
    /// Shorthand for --set data=…
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Shorthand for --set out=…
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the newest checkpoint in the output directory.
    #[arg(long)]
    pub resume: bool,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl TrainArgs {
    pub fn all_sets(&self) -> Vec<String> {
        let mut s = self.sets.clone();
        if let Some(m) = &self.model {
            s.push(format!("model={}", toml_str(m)));
        }
        if let Some(d) = &self.data {
            s.push(format!("data={}", toml_str(&d.display().to_string())));
        }
        if let Some(o) = &self.out {
            s.push(format!("out={}", toml_str(&o.display().to_string())));
        }
        s
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

pub fn sft(a: TrainArgs) -> Result<()> {
    let cfg: rlhf_train::sft::SftConfig = crate::config::load(a.config.as_deref(), &a.all_sets())?;
    if a.print_config {
        println!("{}", toml::to_string(&cfg)?);
        return Ok(());
    }
    if cfg.model.is_empty() || cfg.data.as_os_str().is_empty() {
        bail!("sft needs `model` and `data` (in --config or as --model/--data)")
    }
    let s = rlhf_train::sft::run_sft(&cfg, a.resume)?;
    print_summary("sft", &s);
    Ok(())
}

pub fn print_summary(stage: &str, s: &rlhf_train::RunSummary) {
    let first = s.losses.first().map(|x| x.1).unwrap_or(f64::NAN);
    let last = s.losses.last().map(|x| x.1).unwrap_or(f64::NAN);
    println!(
        "{stage}: {} steps in {:.0}s, {:.0} tokens/s; train loss {first:.4} → {last:.4}",
        s.steps, s.wall_secs, s.tokens_per_sec
    );
    if let (Some(a), Some(b)) = (&s.first_eval, &s.last_eval) {
        for (k, v) in b {
            if let Some(v0) = a.get(k) {
                println!("  eval {k}: {v0:.4} → {v:.4}");
            }
        }
    } else if let Some(b) = &s.last_eval {
        for (k, v) in b {
            println!("  eval {k}: {v:.4}");
        }
    }
    if s.skipped_nonfinite > 0 {
        println!("  {} non-finite steps were skipped", s.skipped_nonfinite);
    }
    println!("  model: {}", s.final_dir.display());
}

pub fn reward(a: TrainArgs) -> Result<()> {
    let cfg: rlhf_train::reward::RewardConfig =
        crate::config::load(a.config.as_deref(), &a.all_sets())?;
    if a.print_config {
        println!("{}", toml::to_string(&cfg)?);
        return Ok(());
    }
    if cfg.model.is_empty() || cfg.data.as_os_str().is_empty() {
        bail!("reward needs `model` and `data` (in --config or as --model/--data)")
    }
    let r = rlhf_train::reward::run_reward(&cfg, a.resume)?;
    print_summary("reward", &r.summary);
    println!("  reward offset (normalisation): {:.4}", r.offset);
    if let Some(e) = r.eval {
        println!(
            "  held-out accuracy {:.3} (95% CI {:.3}–{:.3}, n={}), mean margin {:.3}",
            e.accuracy, e.ci_low, e.ci_high, e.n, e.mean_margin
        );
    }
    Ok(())
}

pub fn dpo(a: TrainArgs) -> Result<()> {
    let cfg: rlhf_train::dpo::DpoConfig = crate::config::load(a.config.as_deref(), &a.all_sets())?;
    if a.print_config {
        println!("{}", toml::to_string(&cfg)?);
        return Ok(());
    }
    if cfg.model.is_empty() || cfg.data.as_os_str().is_empty() {
        bail!("dpo needs `model` and `data` (in --config or as --model/--data)")
    }
    let r = rlhf_train::dpo::run_dpo(&cfg, a.resume)?;
    print_summary("dpo", &r.summary);
    for (label, ev) in [("before", &r.eval_before), ("after", &r.eval_after)] {
        if let Some(ev) = ev {
            let line: Vec<String> = ev.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            println!("  held-out {label}: {}", line.join(", "));
        }
    }
    if let Some(e) = r.eval_accuracy {
        println!(
            "  implicit-reward accuracy {:.3} (95% CI {:.3}–{:.3})",
            e.accuracy, e.ci_low, e.ci_high
        );
    }
    Ok(())
}

pub fn ppo(a: TrainArgs) -> Result<()> {
    let mut sets = a.all_sets();
    // `--model` names the policy for PPO.
    for s in sets.iter_mut() {
        if let Some(rest) = s.strip_prefix("model=") {
            *s = format!("policy={rest}");
        }
        if let Some(rest) = s.strip_prefix("data=") {
            *s = format!("prompts={rest}");
        }
    }
    let cfg: rlhf_train::ppo::PpoConfig = crate::config::load(a.config.as_deref(), &sets)?;
    if a.print_config {
        println!("{}", toml::to_string(&cfg)?);
        return Ok(());
    }
    let Some(rm_dir) = &cfg.reward_model else {
        bail!("ppo needs `reward_model` (a directory written by `rlhf reward`)")
    };
    let (rm, _) = rlhf_train::reward_model::RewardModel::load(rm_dir)?;
    let s = rlhf_train::ppo::run_ppo(&cfg, &rm, a.resume)?;
    let first = s.iterations.first();
    let last = s.iterations.last();
    let get = |m: Option<&rlhf_train::metrics::Scalars>, k: &str| {
        m.and_then(|m| m.get(k)).copied().unwrap_or(f64::NAN)
    };
    println!(
        "ppo: {} iterations in {:.0}s; RM score {:.3} → {:.3}; KL to reference {:.3} → {:.3}",
        s.iterations.len(),
        s.wall_secs,
        get(first, "score/mean"),
        get(last, "score/mean"),
        get(first, "kl/ref"),
        get(last, "kl/ref")
    );
    println!("  model: {}", s.final_dir.display());
    Ok(())
}
