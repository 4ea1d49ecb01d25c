//! `rlhf feedback …`: the service's own admin commands, plus `generate`, which samples K
//! candidates per prompt with a model and imports them (settings stored, never shown).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use rlhf_feedback::cli::FeedbackCmd;
use rlhf_model::{generate, ChatMessage, GenerationConfig};

#[derive(Subcommand)]
pub enum FeedbackTop {
    /// Sample K responses per prompt with a model and import them into a project.
    Generate(GenerateCandidates),
    #[command(flatten)]
    Service(FeedbackCmd),
}

#[derive(Args)]
pub struct GenerateCandidates {
    #[arg(long, default_value = "sqlite://feedback.db")]
    pub db: String,
    #[arg(long)]
    pub project: String,
    #[arg(long)]
    pub model: String,
    /// JSONL of `{"prompt": …}` rows.
    #[arg(long)]
    pub prompts: PathBuf,
    #[arg(short = 'k', long, default_value_t = 4)]
    pub k: usize,
    #[arg(long, default_value_t = 0.9)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(cmd: FeedbackTop) -> Result<()> {
    match cmd {
        FeedbackTop::Service(c) => rlhf_feedback::cli::run_blocking(c),
        FeedbackTop::Generate(g) => rlhf_model::kernels::on_compute_pool(|| generate_candidates(g)),
    }
}

fn generate_candidates(g: GenerateCandidates) -> Result<()> {
    if !(2..=9).contains(&g.k) {
        bail!("-k must be between 2 and 9")
    }
    let prompts = crate::read_prompt_file(&g.prompts)?;
    let loaded = rlhf_model::load::load(&g.model)?;
    let Some(tok) = loaded.tokenizer else {
        bail!("{}: no tokenizer next to the model", g.model)
    };
    let mut rows = vec![];
    for (i, p) in prompts.iter().enumerate() {
        let (shown, rendered) = match p {
            serde_json::Value::String(s) => {
                let r = if tok.chat_template().is_some() {
                    tok.apply_chat_template(&[ChatMessage::new("user", s)], true)?
                } else {
                    s.clone()
                };
                (s.clone(), r)
            }
            serde_json::Value::Array(_) => {
                let msgs: Vec<ChatMessage> = serde_json::from_value(p.clone())?;
                let shown = msgs
                    .iter()
                    .map(|m| format!("{}: {}", m.role, m.content))
                    .collect::<Vec<_>>()
                    .join("\n\n");
                (shown, tok.apply_chat_template(&msgs, true)?)
            }
            _ => bail!(
                "{}: prompt {} must be a string or messages",
                g.prompts.display(),
                i + 1
            ),
        };
        let ids = tok.encode(&rendered, true)?;
        let cfg = GenerationConfig {
            max_new_tokens: g.max_new_tokens,
            temperature: g.temperature,
            top_p: g.top_p,
            seed: g.seed.wrapping_add(i as u64),
            eos_ids: tok.eos_id().into_iter().collect(),
            pad_id: tok.pad_id(),
            ..Default::default()
        };
        let out = generate(&loaded.model, &vec![ids; g.k], &cfg)?;
        let completions = out
            .tokens
            .iter()
            .map(|t| tok.decode(t, true))
            .collect::<Result<Vec<_>>>()?;
        rows.push(serde_json::json!({
            "prompt": shown, "completions": completions,
            "meta": {"model": g.model, "temperature": g.temperature, "top_p": g.top_p,
                     "max_new_tokens": g.max_new_tokens, "seed": cfg.seed},
        }));
        eprintln!("prompt {}/{} sampled", i + 1, prompts.len());
    }
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let rt = tokio_rt()?;
    let n = rt.block_on(async {
        let store = rlhf_feedback::store::Store::connect(&g.db).await?;
        let project = store.project_by_name(&g.project).await?;
        anyhow::Ok(store.import_jsonl(project.id, &text).await?)
    })?;
    println!(
        "imported {n} items ({} candidates each) into project {}",
        g.k, g.project
    );
    Ok(())
}

pub fn tokio_rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
