//! Checkpoints: trainable weights, optimizer state and loop state, written atomically (files
//! fsynced into a hidden temporary directory that is then renamed), keep-last-N.
//!
//! Layout: `<out>/checkpoints/step-00000100/{weights.safetensors, optimizer.safetensors,
//! state.json}`. A directory only ever appears complete under its final name, so a process killed
//! mid-write (even by SIGKILL) leaves the previous checkpoint as the latest loadable one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;
use rlhf_model::model::{load_safetensors, save_safetensors, save_tensor_data, TensorData};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Optimizer steps completed.
    pub step: usize,
    pub epoch: u64,
    /// Micro-batches already taken in the current epoch.
    pub position: usize,
    pub optimizer_t: u64,
    pub nonfinite_total: usize,
    pub seed: u64,
    /// Algorithm-specific state (e.g. PPO's adaptive KL coefficient).
    #[serde(default)]
    pub extra: serde_json::Value,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: LoopState,
    pub weights: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Write a checkpoint atomically and prune to the last `keep` (0 = keep all).
pub fn save(
    out: &Path,
    state: &LoopState,
    weights: &BTreeMap<String, Tensor>,
    optimizer: Vec<(String, TensorData<'_>)>,
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(out);
    std::fs::create_dir_all(&root).with_context(|| format!("{}", root.display()))?;
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    save_safetensors(weights, &tmp.join("weights.safetensors"))?;
    save_tensor_data(optimizer, &tmp.join("optimizer.safetensors"))?;
    rlhf_model::model::write_atomic(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    let fin = root.join(&name);
    if fin.exists() {
        std::fs::remove_dir_all(&fin)?;
    }
    std::fs::rename(&tmp, &fin).with_context(|| format!("{}", fin.display()))?;
    if let Ok(d) = std::fs::File::open(&root) {
        let _ = d.sync_all();
    }
    if keep > 0 {
        let all = list(out)?;
        for old in all.iter().take(all.len().saturating_sub(keep)) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(fin)
}

/// Complete checkpoint directories, oldest first.
pub fn list(out: &Path) -> Result<Vec<PathBuf>> {
    let root = checkpoints_dir(out);
    let mut v: Vec<PathBuf> = match std::fs::read_dir(&root) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
                    && p.join("state.json").exists()
            })
            .collect(),
        Err(_) => vec![],
    };
    v.sort();
    Ok(v)
}

pub fn load(dir: &Path) -> Result<Checkpoint> {
    let sp = dir.join("state.json");
    let state: LoopState = serde_json::from_str(
        &std::fs::read_to_string(&sp).with_context(|| format!("{}", sp.display()))?,
    )
    .with_context(|| format!("{}: malformed checkpoint state", sp.display()))?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        weights: load_safetensors(&dir.join("weights.safetensors"))?,
        optimizer: load_safetensors(&dir.join("optimizer.safetensors"))?,
    })
}

/// The newest complete checkpoint, if any.
pub fn latest(out: &Path) -> Result<Option<Checkpoint>> {
    match list(out)?.last() {
        Some(d) => Ok(Some(load(d)?)),
        None => Ok(None),
    }
}
