//! `rlhf`: reinforcement learning from human feedback for causal language models.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod config;
mod eval_cmds;
mod feedback_cmd;
mod generate_cmd;
mod quickstart;
mod train_cmds;

#[derive(Parser)]
#[command(
    name = "rlhf",
    version,
    about = "RLHF for causal language models: SFT, reward models, PPO, DPO, human feedback"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Matrix-product precision for training, scoring and generation: f32 (default), or bf16 —
    /// inputs rounded to BF16 and sums in f32, as torch.autocast(bfloat16) does, on Intel AMX
    /// (Sapphire Rapids or later) or AVX512-BF16 (AMD Zen 4 or later, Intel Cooper Lake or
    /// later); faster products, and decoding on BF16 copies of the weights where AVX512-BF16
    /// runs them. Also set by RLHF_MATMUL.
    #[arg(long, global = true, value_parser = ["f32", "bf16"])]
    matmul: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text with a model (HF directory, .gguf file or cached hub id).
    Generate(generate_cmd::GenerateArgs),
    /// Stage 1: supervised fine-tuning on instruction/response data.
    Sft(train_cmds::TrainArgs),
    /// Stage 2: a reward model from preference pairs / rankings (Bradley–Terry).
    Reward(train_cmds::TrainArgs),
    /// Stage 3: PPO against a reward model with a KL penalty to the reference.
    Ppo(train_cmds::TrainArgs),
    /// DPO and relatives (IPO, cDPO, RPO, hinge) on preference pairs.
    Dpo(train_cmds::TrainArgs),
    /// Evaluate a model.
    Eval {
        #[command(subcommand)]
        cmd: eval_cmds::EvalCmd,
    },
    /// Score prompt/response rows with a reward model (JSONL in, JSONL out).
    Score(eval_cmds::ScoreArgs),
    /// The whole RLHF loop on a built-in task world, with a report (the main demo).
    Quickstart(quickstart::QuickstartArgs),
    /// The human-feedback service and its admin commands.
    Feedback {
        #[command(subcommand)]
        cmd: feedback_cmd::FeedbackTop,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Some(m) = &cli.matmul {
        use rlhf_model::kernels::gemm::{set_matmul_precision, MatmulPrecision};
        rlhf_model::kernels::init_cpu_runtime();
        let p: MatmulPrecision = m.parse().expect("clap admits only f32 and bf16");
        if let Err(e) = set_matmul_precision(p) {
            eprintln!("error: --matmul {m}: {e}");
            std::process::exit(2);
        }
        if p == MatmulPrecision::Bf16 {
            let unit = rlhf_model::kernels::bf16::unit().expect("set_matmul_precision checked");
            eprintln!("matmul precision: bf16 inputs, f32 sums ({})", unit.name());
        }
    }
    // Model work runs on the compute pool (see `on_compute_pool`: each kernel otherwise waits
    // for the pool's threads to wake); the feedback server keeps the main thread.
    let server = matches!(cli.cmd, Cmd::Feedback { .. });
    let run = move || match cli.cmd {
        Cmd::Generate(a) => generate_cmd::run(a),
        Cmd::Sft(a) => train_cmds::sft(a),
        Cmd::Reward(a) => train_cmds::reward(a),
        Cmd::Ppo(a) => train_cmds::ppo(a),
        Cmd::Dpo(a) => train_cmds::dpo(a),
        Cmd::Eval { cmd } => eval_cmds::eval(cmd),
        Cmd::Score(a) => eval_cmds::score(a),
        Cmd::Feedback { cmd } => feedback_cmd::run(cmd),
        Cmd::Quickstart(a) => quickstart::run(a),
    };
    let r = if server {
        run()
    } else {
        rlhf_model::kernels::on_compute_pool(run)
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Read `{"prompt": ...}` rows (string or chat messages) from a JSONL file.
pub fn read_prompt_file(path: &PathBuf) -> Result<Vec<serde_json::Value>> {
    let s = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut out = vec![];
    for (i, line) in s.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: malformed JSON", path.display(), i + 1))?;
        let Some(p) = v.get("prompt") else {
            bail!("{}:{}: missing field `prompt`", path.display(), i + 1)
        };
        out.push(p.clone());
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display())
    }
    Ok(out)
}
