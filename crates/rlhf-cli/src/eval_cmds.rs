//! `rlhf eval reward` and `rlhf score`.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rlhf_data::formats::Prompt;
use rlhf_model::ChatMessage;

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Accuracy of a reward model on preference data, with a 95% bootstrap interval.
    Reward {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 512)]
        max_len: usize,
        #[arg(long, default_value_t = 0)]
        max_examples: usize,
        /// Skip invalid records instead of stopping at the first.
        #[arg(long)]
        lenient: bool,
    },
}

pub fn eval(cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Reward {
            model,
            data,
            max_len,
            max_examples,
            lenient,
        } => {
            let r = rlhf_train::reward::eval_reward(
                &model,
                &data,
                &rlhf_train::reward::EvalRewardOptions {
                    max_len,
                    max_prompt_len: None,
                    lenient,
                    batch_size: 8,
                    max_examples,
                    ..Default::default()
                },
            )?;
            println!(
                "accuracy {:.4} (95% bootstrap CI {:.4}–{:.4}) on {} pairs; mean margin {:.4}",
                r.accuracy, r.ci_low, r.ci_high, r.n, r.mean_margin
            );
            Ok(())
        }
    }
}

#[derive(Args)]
pub struct ScoreArgs {
    /// Reward model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL of `{"prompt", "response"}` (or `"completion"`) rows; `-` or absent = stdin.
    #[arg(long)]
    pub input: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
}

/// Reads prompt/response rows, writes each row back with a `"score"` field.
pub fn score(a: ScoreArgs) -> Result<()> {
    let reader: Box<dyn BufRead> = match &a.input {
        Some(p) if p.as_os_str() != "-" => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("{}", p.display()))?,
        )),
        _ => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let name = a
        .input
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "stdin".into());
    let mut rows = vec![];
    let mut values = vec![];
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{name}:{}: malformed JSON", i + 1))?;
        let prompt = match v.get("prompt") {
            Some(serde_json::Value::String(s)) => Prompt::Text(s.clone()),
            Some(m @ serde_json::Value::Array(_)) => Prompt::Chat(
                serde_json::from_value::<Vec<ChatMessage>>(m.clone())
                    .with_context(|| format!("{name}:{}: `prompt` messages", i + 1))?,
            ),
            _ => bail!(
                "{name}:{}: missing field `prompt` (string or messages)",
                i + 1
            ),
        };
        let Some(resp) = v
            .get("response")
            .or_else(|| v.get("completion"))
            .and_then(|r| r.as_str())
        else {
            bail!(
                "{name}:{}: missing field `response` (or `completion`)",
                i + 1
            )
        };
        rows.push((prompt, resp.to_string()));
        values.push(v);
    }
    let scores = rlhf_train::reward::score_pairs(&a.model, &rows, a.max_len)?;
    let mut out = std::io::stdout().lock();
    for (mut v, s) in values.into_iter().zip(scores) {
        v["score"] = serde_json::json!(s);
        writeln!(out, "{v}")?;
    }
    Ok(())
}
