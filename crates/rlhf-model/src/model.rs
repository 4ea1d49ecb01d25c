//! A causal language model: an architecture's backbone, the LM head, its parameters, optional
//! LoRA adapters; loading and saving in the Hugging Face layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::backbone::{Backbone, Ctx, KvCache};
use crate::config::{Family, ModelConfig};
use crate::gpt2::Gpt2;
use crate::linear::{Linear, LoraConfig};
use crate::llama::Llama;
use crate::ops;
use crate::params::ParamStore;
use crate::tokenizer::Tokenizer;
use crate::weights::{Builder, Init, RandomInit, SafetensorsSource, WeightSource};

pub struct CausalLM {
    pub config: ModelConfig,
    /// The original `config.json`, written back on save.
    pub raw_config: serde_json::Value,
    backbone: Box<dyn Backbone>,
    lm_head: Option<Linear>,
    /// Loaded from a sequence-classification checkpoint with an untied (absent) LM head.
    no_lm_head: bool,
    /// Every parameter, base and adapters, by HF/PEFT name.
    pub params: ParamStore,
    adapters_on: Arc<AtomicBool>,
    /// Training-noise seed shared by the adapters (LoRA dropout); 0 = evaluation mode.
    lora_noise: Arc<std::sync::atomic::AtomicU64>,
    pub lora: Option<LoraConfig>,
    pub device: Device,
}

/// A model with its tokenizer and generation settings, as loaded from a directory or GGUF file.
pub struct Loaded {
    pub model: CausalLM,
    pub tokenizer: Option<Tokenizer>,
    pub generation_config: Option<serde_json::Value>,
    pub dir: Option<PathBuf>,
}

impl CausalLM {
    /// Build a model from any weight source.
    pub fn build(
        config: ModelConfig,
        raw_config: serde_json::Value,
        src: &mut dyn WeightSource,
    ) -> Result<Self> {
        config.validate()?;
        crate::kernels::init_cpu_runtime();
        let mut params = ParamStore::new();
        let mut b = Builder {
            src,
            store: &mut params,
        };
        let backbone: Box<dyn Backbone> = match &config {
            ModelConfig::Gpt2(c) => Box::new(Gpt2::new(c, &mut b)?),
            ModelConfig::Llama { family, cfg } => Box::new(Llama::new(cfg, *family, &mut b)?),
        };
        // A reward-model checkpoint (`…ForSequenceClassification`) has a `score` head instead of
        // an LM head: its backbone loads without one.
        let seq_cls = is_sequence_classifier(&raw_config);
        let no_lm_head = seq_cls && !config.tied_embeddings();
        let lm_head = if config.tied_embeddings() || seq_cls {
            None
        } else {
            let w = b.param(
                "lm_head.weight",
                &[config.vocab_size(), config.hidden_size()],
                Init::Normal(0.02),
            )?;
            Some(Linear::new("lm_head", w, None, false))
        };
        Ok(Self {
            config,
            raw_config,
            backbone,
            lm_head,
            no_lm_head,
            params,
            adapters_on: Arc::new(AtomicBool::new(true)),
            lora_noise: Default::default(),
            lora: None,
            device: Device::Cpu,
        })
    }

    /// A randomly initialised model (seeded): for tests and models trained from scratch.
    pub fn random(raw_config: serde_json::Value, seed: u64) -> Result<Self> {
        let config = ModelConfig::from_json(&raw_config)?;
        Self::build(config, raw_config, &mut RandomInit::new(seed))
    }

    /// Load `config.json` + `model.safetensors` (or the shards listed in
    /// `model.safetensors.index.json`) from a Hugging Face directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            bail!("{}: missing config.json", dir.display())
        }
        let (config, raw) = ModelConfig::from_file(&cfg_path)?;
        let files = weight_files(dir)?;
        let mut src = SafetensorsSource::open(&files)?;
        if config.family() == Family::Gpt2 {
            src.strip_prefixes = vec!["transformer.".into()];
        }
        let mut m = Self::build(config, raw, &mut src)?;
        // A reward-model checkpoint (…ForSequenceClassification) has no LM head of its own; an
        // untied LM checkpoint must have one (checked by `build`).
        m.raw_config = normalise_architectures(m.raw_config, m.config.family());
        Ok(m)
    }

    pub fn backbone(&self) -> &dyn Backbone {
        self.backbone.as_ref()
    }

    pub fn num_layers(&self) -> usize {
        self.backbone.num_layers()
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size()
    }

    /// Final hidden states [b, t, d] for token ids [b, t] with a 0/1 padding mask (rows of
    /// length t). Padding may be on either side; positions count real tokens only.
    pub fn hidden(&self, ids: &Tensor, mask: &[Vec<u8>]) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let positions = ops::positions_from_mask(mask);
        let bias = ops::attention_bias(mask, 0, t, &self.device)?;
        let ctx = Ctx {
            mask,
            positions,
            bias,
        };
        self.backbone.forward(ids, &ctx, None)
    }

    /// Final hidden states [b, t, d] of a shared-prompt batch: row `r` of `ids` [b, t] holds
    /// `rows[r]` (a prompt, then responses that each see only the prompt and themselves; see
    /// [`ops::PrefixRow`]). Every response's hidden states are those of its prompt + response
    /// alone, and each prompt is computed once.
    pub fn hidden_prefix_rows(&self, ids: &Tensor, rows: &[Vec<ops::PrefixRow>]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if b != rows.len() {
            bail!("{b} rows of ids for {} prefix rows", rows.len())
        }
        let inputs = ops::prefix_rows_inputs(rows, t, &self.device)?;
        let ctx = Ctx {
            mask: &inputs.mask,
            positions: inputs.positions,
            bias: inputs.bias,
        };
        self.backbone.forward(ids, &ctx, None)
    }

    /// Incremental forward with a KV cache: `mask` covers cached + new slots; `ids` are the new
    /// tokens [b, t_new].
    pub fn hidden_cached(
        &self,
        ids: &Tensor,
        mask: &[Vec<u8>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let past = cache.len();
        let all = ops::positions_from_mask(mask);
        let positions = all.iter().map(|r| r[past..past + t].to_vec()).collect();
        let bias = ops::attention_bias(mask, past, t, &self.device)?;
        let ctx = Ctx {
            mask,
            positions,
            bias,
        };
        self.backbone.forward(ids, &ctx, Some(cache))
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.backbone.num_layers())
    }

    /// LM logits for hidden states [..., d] → [..., vocab].
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        if self.no_lm_head {
            bail!("this model was loaded from a reward-model checkpoint and has no LM head")
        }
        match &self.lm_head {
            Some(h) => h.forward(hidden),
            None => {
                let dims = hidden.dims().to_vec();
                let d = *dims.last().unwrap();
                let n: usize = dims[..dims.len() - 1].iter().product();
                let w = self.backbone.embed().t();
                let h2 = hidden.reshape((n, d))?;
                let y = if crate::kernels::fusable(&[&h2, &w]) {
                    // Few rows (decoding) stream the head once instead of packing it per step.
                    crate::kernels::matmul::matmul_nt_op(&h2, &w)?
                } else {
                    h2.matmul(&w.t()?)?
                };
                let mut out = dims;
                *out.last_mut().unwrap() = self.config.vocab_size();
                Ok(y.reshape(out)?)
            }
        }
    }

    /// Convenience: logits [b, t, V] for ids with a mask.
    pub fn logits(&self, ids: &Tensor, mask: &[Vec<u8>]) -> Result<Tensor> {
        self.lm_logits(&self.hidden(ids, mask)?)
    }

    /// Log-probabilities of each next token: for ids [b, t] returns [b, t-1] where entry j is
    /// log p(ids[j+1] | ids[..=j]), computed with logits / temperature.
    pub fn next_token_logprobs(
        &self,
        ids: &Tensor,
        mask: &[Vec<u8>],
        temperature: f64,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = self.hidden(ids, mask)?.narrow(1, 0, t - 1)?;
        let d = self.hidden_size();
        let targets = ids.narrow(1, 1, t - 1)?.flatten_all()?;
        let lp = self.head_logprobs(&h.reshape((b * (t - 1), d))?, &targets, temperature)?;
        Ok(lp.reshape((b, t - 1))?)
    }

    /// log p(target) under `softmax(lm_logits(hidden) / temperature)`: hidden [n, d], targets
    /// [n] (u32) → [n]. On the CPU in f32 the LM head and the log-softmax are one fused op
    /// ([`crate::fused::head_logprobs`]) that keeps at most one [n × vocab] buffer (none
    /// without gradients); otherwise logits, then [`crate::fused::token_logprobs`].
    pub fn head_logprobs(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        temperature: f64,
    ) -> Result<Tensor> {
        if let Some(w) = self.plain_head_weight() {
            if let Some(lp) = crate::fused::head_logprobs(hidden, &w, targets, 1.0 / temperature)? {
                return Ok(lp);
            }
        }
        let logits = self.scaled_logits(hidden, temperature)?;
        Ok(crate::fused::token_logprobs(&logits, targets)?)
    }

    /// [`CausalLM::head_logprobs`] and each row's entropy of `softmax(lm_logits / temperature)`:
    /// hidden [n, d], targets [n] → (log p(target) [n], entropy [n]), both differentiable. On
    /// the CPU in f32 one fused op ([`crate::fused::head_logprobs_entropy`]) with the same one
    /// [n × vocab] buffer; otherwise logits, [`crate::fused::token_logprobs`] and
    /// [`crate::ops::entropy`].
    pub fn head_logprobs_entropy(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        temperature: f64,
    ) -> Result<(Tensor, Tensor)> {
        if temperature <= 0.0 {
            bail!("temperature must be positive, got {temperature}")
        }
        if let Some(w) = self.plain_head_weight() {
            let scale = 1.0 / temperature;
            if let Some(o) = crate::fused::head_logprobs_entropy(hidden, &w, targets, scale)? {
                return Ok((
                    o.narrow(1, 0, 1)?.squeeze(1)?,
                    o.narrow(1, 1, 1)?.squeeze(1)?,
                ));
            }
        }
        let logits = self.scaled_logits(hidden, temperature)?;
        Ok((
            crate::fused::token_logprobs(&logits, targets)?,
            crate::ops::entropy(&logits)?,
        ))
    }

    /// The LM head's weight [V, d] when the head is a plain product (tied embedding, or a
    /// linear without bias or LoRA), which the fused head ops take.
    fn plain_head_weight(&self) -> Option<Tensor> {
        match &self.lm_head {
            None => Some(self.backbone.embed().t()),
            Some(l) if l.bias.is_none() && l.lora.is_none() && !l.transposed => Some(l.weight.t()),
            Some(_) => None,
        }
    }

    /// `lm_logits(hidden) / temperature`.
    fn scaled_logits(&self, hidden: &Tensor, temperature: f64) -> Result<Tensor> {
        let logits = self.lm_logits(hidden)?;
        Ok(if temperature != 1.0 {
            (logits / temperature)?
        } else {
            logits
        })
    }

    // ----- LoRA -----

    /// Add LoRA adapters to every linear whose name ends with a target module, freeze every
    /// base parameter and leave only the adapters trainable.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<usize> {
        if self.lora.is_some() {
            bail!("this model already has LoRA adapters")
        }
        let switch = self.adapters_on.clone();
        let mut n = 0;
        let mut store = std::mem::take(&mut self.params);
        store.set_trainable_where(|_| true, false);
        for (i, l) in self.backbone.linears_mut().into_iter().enumerate() {
            let short = l.name.rsplit('.').next().unwrap_or("");
            if cfg.target_modules.iter().any(|t| t == short) {
                l.add_lora(
                    cfg,
                    &mut store,
                    switch.clone(),
                    self.lora_noise.clone(),
                    seed.wrapping_add(i as u64),
                )?;
                n += 1;
            }
        }
        self.params = store;
        if n == 0 {
            bail!(
                "LoRA target modules {:?} match no layer of this model (its linear layers end in: {})",
                cfg.target_modules,
                self.linear_suffixes().join(", ")
            )
        }
        self.lora = Some(cfg.clone());
        Ok(n)
    }

    fn linear_suffixes(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .backbone
            .linears()
            .iter()
            .map(|l| l.name.rsplit('.').next().unwrap_or("").to_string())
            .collect();
        s.sort();
        s.dedup();
        s
    }

    /// Training mode with this noise seed (LoRA dropout masks are drawn from it and the layer),
    /// or `None`: evaluation mode, no dropout — the default, and what generation uses.
    pub fn set_train_noise(&self, seed: Option<u64>) {
        // 0 means "off"; a real seed of 0 is remapped.
        let v = seed.map(|s| if s == 0 { 0x5EED } else { s }).unwrap_or(0);
        self.lora_noise.store(v, Ordering::Relaxed)
    }

    /// Turn adapters off: the model computes exactly the base model (the frozen reference).
    pub fn disable_adapters(&self) {
        self.adapters_on.store(false, Ordering::Relaxed)
    }
    pub fn enable_adapters(&self) {
        self.adapters_on.store(true, Ordering::Relaxed)
    }
    pub fn adapters_enabled(&self) -> bool {
        self.lora.is_some() && self.adapters_on.load(Ordering::Relaxed)
    }

    /// Run `f` with adapters disabled (restores the previous state, also on error).
    pub fn with_adapters_disabled<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let prev = self.adapters_on.swap(false, Ordering::Relaxed);
        let r = f();
        self.adapters_on.store(prev, Ordering::Relaxed);
        r
    }

    /// Base weights with adapters merged in, by HF name (no adapter tensors).
    pub fn merged_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out: BTreeMap<String, Tensor> = self
            .params
            .tensors()
            .into_iter()
            .filter(|(k, _)| !k.contains(".lora_"))
            .collect();
        let on = self.adapters_on.load(Ordering::Relaxed);
        if on {
            for l in self.backbone.linears() {
                if l.lora.is_some() {
                    out.insert(format!("{}.weight", l.name), l.merged_weight()?);
                }
            }
        }
        Ok(out)
    }

    /// Adapter tensors only, in PEFT naming (`base_model.model.<name>.lora_A.weight`).
    pub fn adapter_tensors(&self) -> BTreeMap<String, Tensor> {
        self.params
            .tensors()
            .into_iter()
            .filter(|(k, _)| k.contains(".lora_"))
            .map(|(k, v)| (format!("base_model.model.{k}"), v))
            .collect()
    }

    /// Load adapter values saved by [`CausalLM::adapter_tensors`] (adapters must exist).
    pub fn load_adapter_tensors(&self, t: &BTreeMap<String, Tensor>) -> Result<()> {
        for p in self.params.iter().filter(|p| p.name().contains(".lora_")) {
            let key = format!("base_model.model.{}", p.name());
            let Some(v) = t.get(&key) else {
                bail!("adapter tensor `{key}` missing")
            };
            if v.dims() != p.var().dims() {
                bail!(
                    "adapter tensor `{key}` has shape {:?}, expected {:?}",
                    v.dims(),
                    p.var().dims()
                )
            }
            p.var().set(v)?;
        }
        Ok(())
    }

    /// Save as a Hugging Face directory (config.json, model.safetensors, tokenizer files,
    /// generation_config.json). LoRA adapters are merged into the weights. Atomic per file.
    pub fn save(&self, dir: &Path, tokenizer: Option<&Tokenizer>) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let tensors = self.merged_tensors()?;
        save_safetensors(&tensors, &dir.join("model.safetensors"))?;
        let mut cfg = normalise_architectures(self.raw_config.clone(), self.config.family());
        cfg["torch_dtype"] = "float32".into();
        write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&cfg)?.as_bytes(),
        )?;
        if let Some(t) = tokenizer {
            t.save(dir)?;
            let mut g = serde_json::json!({});
            if let Some(e) = t.eos_id() {
                g["eos_token_id"] = e.into();
            }
            if let Some(b) = t.bos_id() {
                g["bos_token_id"] = b.into();
            }
            g["pad_token_id"] = t.pad_id().into();
            write_atomic(
                &dir.join("generation_config.json"),
                serde_json::to_string_pretty(&g)?.as_bytes(),
            )?;
        }
        Ok(())
    }

    /// Convert all parameters to contiguous f32 tensors on `device` (CPU only in this version).
    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// Whether a config describes a `…ForSequenceClassification` (reward model) checkpoint.
pub fn is_sequence_classifier(cfg: &serde_json::Value) -> bool {
    cfg.get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .is_some_and(|a| a.ends_with("ForSequenceClassification"))
}

/// Keep `architectures` consistent with the family and a causal-LM head.
fn normalise_architectures(mut cfg: serde_json::Value, family: Family) -> serde_json::Value {
    let (arch, mt) = match family {
        Family::Gpt2 => ("GPT2LMHeadModel", "gpt2"),
        Family::Llama => ("LlamaForCausalLM", "llama"),
        Family::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    if cfg.get("architectures").is_none() {
        cfg["architectures"] = serde_json::json!([arch]);
    }
    if cfg.get("model_type").is_none() {
        cfg["model_type"] = mt.into();
    }
    cfg
}

/// The safetensors files of a checkpoint directory.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let s = std::fs::read_to_string(&index)?;
        let v: serde_json::Value = serde_json::from_str(&s)
            .with_context(|| format!("{}: malformed JSON", index.display()))?;
        let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
            bail!("{}: no `weight_map`", index.display())
        };
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json (PyTorch .bin checkpoints are not read: convert them to safetensors)",
        dir.display()
    )
}

/// Write bytes atomically: temp file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).with_context(|| format!("{}", tmp.display()))?;
        f.write_all(bytes)?;
        Ok(())
    })
}

/// Write `path` atomically through `write`, which creates the temporary file it is given (in
/// the same directory); that file is then synced and renamed over `path`, and the directory
/// synced.
fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    write(&tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Save tensors as safetensors, atomically.
pub fn save_safetensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let items = tensors
        .iter()
        .map(|(k, v)| (k.clone(), TensorData::Tensor(v.clone())))
        .collect();
    save_tensor_data(items, path)
}

/// One tensor to save: a candle tensor, or f32 values held elsewhere (an optimizer's moments)
/// with their shape, saved without first copying them into a tensor.
pub enum TensorData<'a> {
    Tensor(Tensor),
    Slice { shape: Vec<usize>, data: &'a [f32] },
}

/// Save named tensors as f32 safetensors, atomically (a temporary file, synced, then renamed),
/// streaming them to the file one at a time: the only copy held is one tensor's bytes, never
/// the whole file's (a checkpoint of SmolLM2-135M's AdamW moments is 1.08 GB).
pub fn save_tensor_data(items: Vec<(String, TensorData<'_>)>, path: &Path) -> Result<()> {
    let views = items
        .into_iter()
        .map(|(k, d)| {
            let d = match d {
                TensorData::Tensor(t) => TensorData::Tensor(t.to_dtype(DType::F32)?.contiguous()?),
                slice => slice,
            };
            Ok((k, StView(d)))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_atomic_with(path, |tmp| {
        safetensors::tensor::serialize_to_file(views, Some(meta), tmp)
            .with_context(|| format!("{}", tmp.display()))
    })
}

/// Read every tensor of a safetensors file into memory.
pub fn load_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let m = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}: cannot read safetensors", path.display()))?;
    Ok(m.into_iter().collect())
}

struct StView<'a>(TensorData<'a>);

impl safetensors::View for StView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        match &self.0 {
            TensorData::Tensor(t) => t.dims(),
            TensorData::Slice { shape, .. } => shape,
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        std::borrow::Cow::Owned(match &self.0 {
            TensorData::Tensor(t) => {
                crate::kernels::with_f32(&[t], |s| bytes(s[0])).expect("an f32 tensor on the CPU")
            }
            TensorData::Slice { data, .. } => bytes(data),
        })
    }
    fn data_len(&self) -> usize {
        match &self.0 {
            TensorData::Tensor(t) => t.elem_count() * 4,
            TensorData::Slice { data, .. } => data.len() * 4,
        }
    }
}
