//! One entry point for "a model": a local HF directory, a `.gguf` file, or a hub id resolved
//! through the standard Hugging Face cache.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::model::{CausalLM, Loaded};
use crate::tokenizer::Tokenizer;

/// Load a model and its tokenizer from `spec`: a directory, a `.gguf` file, or `org/name`.
pub fn load(spec: &str) -> Result<Loaded> {
    let p = Path::new(spec);
    if p.is_file() {
        if spec.ends_with(".gguf") {
            return crate::gguf::load_gguf(p);
        }
        bail!(
            "{spec}: expected a model directory (config.json + model.safetensors) or a .gguf file"
        )
    }
    if p.is_dir() {
        return load_dir(p);
    }
    if looks_like_hub_id(spec) {
        let dir = resolve_hub(spec)?;
        return load_dir(&dir);
    }
    bail!("{spec}: no such model directory or file")
}

pub fn load_dir(dir: &Path) -> Result<Loaded> {
    let model = CausalLM::from_dir(dir)?;
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Some(Tokenizer::from_dir(dir)?)
    } else {
        None
    };
    let gpath = dir.join("generation_config.json");
    let generation_config = if gpath.exists() {
        let s = std::fs::read_to_string(&gpath)?;
        Some(
            serde_json::from_str(&s)
                .with_context(|| format!("{}: malformed JSON", gpath.display()))?,
        )
    } else {
        None
    };
    Ok(Loaded {
        model,
        tokenizer,
        generation_config,
        dir: Some(dir.to_path_buf()),
    })
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The Hugging Face cache root: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

/// Resolve `org/name` to a snapshot directory of the local HF cache (the layout that
/// `huggingface-cli download` and transformers write). This build does not download: with no
/// cached snapshot it fails at once with what to do, rather than hanging on a network call.
pub fn resolve_hub(id: &str) -> Result<PathBuf> {
    let cache = hf_cache_dir();
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let refs = repo.join("refs/main");
    if let Ok(rev) = std::fs::read_to_string(&refs) {
        let snap = repo.join("snapshots").join(rev.trim());
        if snap.join("config.json").exists() {
            return Ok(snap);
        }
    }
    if let Ok(rd) = std::fs::read_dir(repo.join("snapshots")) {
        for e in rd.flatten() {
            if e.path().join("config.json").exists() {
                return Ok(e.path());
            }
        }
    }
    bail!(
        "model `{id}` is not in the local Hugging Face cache ({}) and this build does not download models. \
         Fetch it where there is network (`huggingface-cli download {id}`, then copy the cache or the snapshot directory) \
         and pass the directory, or set HF_HOME",
        repo.display()
    )
}

/// The SmolLM2-135M-Instruct GGUF used by tests and benchmarks: `$RLHF_SMOLLM2_GGUF`, else
/// `target/models/` of this workspace (written by `scripts/fetch-smollm2.sh`).
pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("RLHF_SMOLLM2_GGUF") {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
}
