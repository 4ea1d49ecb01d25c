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
    /// Prompts generated at once. A batch's KV cache holds every row's prompt and new tokens
    /// in every layer, so a large prompt file goes through in batches, each printed as it
    /// finishes. Every row samples from its own random stream whatever the batch size, so the
    /// text is the same up to rounding: decoding fewer than 16 rows, 16 to 256 (on weights
    /// packed for the batch; with --matmul bf16, 1 to 256 on BF16 copies) and more run
    /// different product kernels, whose last bits can change a sampled token from the far
    /// tail.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1")
    }
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
        first_row: 0,
    };
    let t0 = std::time::Instant::now();
    let batches = ids.len().div_ceil(a.batch_size);
    let mut n = 0usize;
    for (c, batch) in ids.chunks(a.batch_size).enumerate() {
        let first = c * a.batch_size;
        // Row `first + r` of the job samples from its own stream, as in one batch.
        let cfg = GenerationConfig {
            first_row: first as u64,
            ..cfg.clone()
        };
        let g = generate(&loaded.model, batch, &cfg)?;
        n += g.tokens.iter().map(|t| t.len()).sum::<usize>();
        for (r, toks) in g.tokens.iter().enumerate() {
            let completion = tok.decode(toks, true)?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"prompt": prompts[first + r], "completion": completion,
                        "tokens": toks, "logprobs": g.logprobs[r], "finished": g.finished[r]})
                );
            } else {
                println!("{completion}");
            }
        }
        if batches > 1 {
            eprintln!(
                "[generate] batch {}/{batches}: {} prompts done",
                c + 1,
                first + batch.len()
            );
        }
    }
    eprintln!(
        "{n} tokens in {:.2}s ({:.1} tokens/s)",
        t0.elapsed().as_secs_f64(),
        n as f64 / t0.elapsed().as_secs_f64()
    );
    Ok(())
}
