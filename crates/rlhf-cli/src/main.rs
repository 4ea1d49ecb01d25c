//! `rlhf`: reinforcement learning from human feedback for causal language models.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod generate_cmd;

#[derive(Parser)]
#[command(
    name = "rlhf",
    version,
    about = "RLHF for causal language models: SFT, reward models, PPO, DPO, human feedback"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text with a model (HF directory, .gguf file or cached hub id).
    Generate(generate_cmd::GenerateArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Generate(a) => generate_cmd::run(a),
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
