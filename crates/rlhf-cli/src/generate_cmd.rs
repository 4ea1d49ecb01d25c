//! `rlhf generate`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use rlhf_model::{generate, ChatMessage, GenerationConfig};

#[derive(Args)]
pub struct GenerateArgs {
    /// Model: HF directory, .gguf file, or `org/name` in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// One prompt (rendered with the chat template unless --raw).
    #[arg(long)]
    pub prompt: Option<String>,
    /// JSONL file of `{"prompt": "..."}` or `{"prompt": [messages]}` rows.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Do not apply the chat template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSONL (prompt, completion, tokens, logprobs) instead of plain text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let prompts: Vec<serde_json::Value> = match (&a.prompt, &a.prompts) {
        (Some(p), None) => vec![serde_json::Value::String(p.clone())],
        (None, Some(f)) => crate::read_prompt_file(f)?,
        _ => bail!("give exactly one of --prompt or --prompts"),
    };
    let loaded = rlhf_model::load::load(&a.model)?;
    let Some(tok) = loaded.tokenizer else {
        bail!("{}: no tokenizer.json next to the model", a.model)
    };
    let mut texts = vec![];
    for p in &prompts {
        let text = match p {
            serde_json::Value::String(s) if a.raw || tok.chat_template().is_none() => s.clone(),
            serde_json::Value::String(s) => {
                tok.apply_chat_template(&[ChatMessage::new("user", s)], true)?
            }
            serde_json::Value::Array(_) => {
                let msgs: Vec<ChatMessage> = serde_json::from_value(p.clone())?;
                tok.apply_chat_template(&msgs, true)?
            }
            _ => bail!("a prompt must be a string or a list of messages"),
        };
        texts.push(text);
    }
    let ids = texts
        .iter()
        .map(|t| tok.encode(t, true))
        .collect::<Result<Vec<_>>>()?;
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        eos_ids: tok.eos_id().into_iter().collect(),
        pad_id: tok.pad_id(),
        use_cache: true,
    };
    let t0 = std::time::Instant::now();
    let g = generate(&loaded.model, &ids, &cfg)?;
    let n: usize = g.tokens.iter().map(|t| t.len()).sum();
    for (i, toks) in g.tokens.iter().enumerate() {
        let completion = tok.decode(toks, true)?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"prompt": prompts[i], "completion": completion,
                    "tokens": toks, "logprobs": g.logprobs[i], "finished": g.finished[i]})
            );
        } else {
            println!("{completion}");
        }
    }
    eprintln!(
        "{n} tokens in {:.2}s ({:.1} tokens/s)",
        t0.elapsed().as_secs_f64(),
        n as f64 / t0.elapsed().as_secs_f64()
    );
    Ok(())
}
