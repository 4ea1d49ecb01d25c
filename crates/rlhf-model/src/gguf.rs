//! GGUF import (llama.cpp's format) for Llama-architecture models: weights dequantised to f32 and
//! renamed to the Hugging Face layout (q/k un-permuted back to rotate-half RoPE order), tokenizer
//! and chat template rebuilt from the metadata.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::config::{Family, ModelConfig};
use crate::model::{CausalLM, Loaded};
use crate::tokenizer::Tokenizer;
use crate::weights::MapSource;

fn meta<'a>(c: &'a Content, key: &str, path: &Path) -> Result<&'a Value> {
    c.metadata
        .get(key)
        .with_context(|| format!("{}: GGUF metadata `{key}` missing", path.display()))
}

fn meta_u(c: &Content, key: &str, path: &Path) -> Result<usize> {
    let v = meta(c, key, path)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .with_context(|| format!("{}: GGUF `{key}` is not an integer", path.display()))
}

/// Undo llama.cpp's q/k permutation (HF rotate-half → interleaved) for a [n_head·hd, d] weight.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, din) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, din))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, din))?)
}

/// Load a Llama-architecture GGUF file.
pub fn load_gguf(path: &Path) -> Result<Loaded> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let c = Content::read(&mut f)
        .with_context(|| format!("{}: not a readable GGUF file", path.display()))?;
    let arch = meta(&c, "general.architecture", path)?.to_string()?.clone();
    if arch != "llama" {
        bail!(
            "{}: GGUF architecture `{arch}` is not supported (llama only)",
            path.display()
        )
    }
    let p = |k: &str| format!("llama.{k}");
    let d = meta_u(&c, &p("embedding_length"), path)?;
    let n_layer = meta_u(&c, &p("block_count"), path)?;
    let n_head = meta_u(&c, &p("attention.head_count"), path)?;
    let n_kv = meta_u(&c, &p("attention.head_count_kv"), path).unwrap_or(n_head);
    let ff = meta_u(&c, &p("feed_forward_length"), path)?;
    let ctx = meta_u(&c, &p("context_length"), path).unwrap_or(2048);
    let eps = meta(&c, &p("attention.layer_norm_rms_epsilon"), path)?.to_f32()? as f64;
    let theta = c
        .metadata
        .get(&p("rope.freq_base"))
        .and_then(|v| v.to_f32().ok())
        .unwrap_or(10000.0) as f64;
    let tokens = meta(&c, "tokenizer.ggml.tokens", path)?.to_vec()?;
    let vocab = tokens.len();
    let tied = !c.tensor_infos.contains_key("output.weight");

    let mut map = BTreeMap::new();
    let mut get = |gname: &str| -> Result<Tensor> {
        let q = c
            .tensor(&mut f, gname, &Device::Cpu)
            .with_context(|| format!("{}: tensor `{gname}`", path.display()))?;
        q.dequantize(&Device::Cpu)
            .with_context(|| format!("{}: cannot dequantise tensor `{gname}`", path.display()))
    };
    map.insert(
        "model.embed_tokens.weight".to_string(),
        get("token_embd.weight")?,
    );
    map.insert("model.norm.weight".to_string(), get("output_norm.weight")?);
    if !tied {
        map.insert("lm_head.weight".to_string(), get("output.weight")?);
    }
    for i in 0..n_layer {
        let hf = |s: &str| format!("model.layers.{i}.{s}");
        let gg = |s: &str| format!("blk.{i}.{s}");
        map.insert(hf("input_layernorm.weight"), get(&gg("attn_norm.weight"))?);
        map.insert(
            hf("post_attention_layernorm.weight"),
            get(&gg("ffn_norm.weight"))?,
        );
        map.insert(
            hf("self_attn.q_proj.weight"),
            unpermute(&get(&gg("attn_q.weight"))?, n_head)?,
        );
        map.insert(
            hf("self_attn.k_proj.weight"),
            unpermute(&get(&gg("attn_k.weight"))?, n_kv)?,
        );
        map.insert(hf("self_attn.v_proj.weight"), get(&gg("attn_v.weight"))?);
        map.insert(
            hf("self_attn.o_proj.weight"),
            get(&gg("attn_output.weight"))?,
        );
        map.insert(hf("mlp.gate_proj.weight"), get(&gg("ffn_gate.weight"))?);
        map.insert(hf("mlp.up_proj.weight"), get(&gg("ffn_up.weight"))?);
        map.insert(hf("mlp.down_proj.weight"), get(&gg("ffn_down.weight"))?);
    }
    let tokenizer = gguf_tokenizer(&c, path)?;
    let raw = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": d,
        "intermediate_size": ff,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "max_position_embeddings": ctx,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": tokenizer.bos_id(),
        "eos_token_id": tokenizer.eos_id(),
    });
    let config = ModelConfig::from_json(&raw)?;
    debug_assert_eq!(config.family(), Family::Llama);
    let mut src = MapSource {
        map,
        origin: path.display().to_string(),
    };
    let model = CausalLM::build(config, raw, &mut src)?;
    Ok(Loaded {
        model,
        tokenizer: Some(tokenizer),
        generation_config: None,
        dir: None,
    })
}

/// Rebuild an HF `tokenizer.json` (byte-level BPE) from GGUF metadata.
fn gguf_tokenizer(c: &Content, path: &Path) -> Result<Tokenizer> {
    let model = meta(c, "tokenizer.ggml.model", path)?.to_string()?.clone();
    if model != "gpt2" {
        bail!(
            "{}: GGUF tokenizer model `{model}` is not supported (byte-level BPE `gpt2` only)",
            path.display()
        )
    }
    let tokens: Vec<String> = meta(c, "tokenizer.ggml.tokens", path)?
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<candle_core::Result<_>>()?;
    let merges: Vec<String> = meta(c, "tokenizer.ggml.merges", path)?
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<candle_core::Result<_>>()?;
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|x| x.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let pre = c
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = if pre == "smollm" || pre == "starcoder" {
        serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]})
    } else {
        byte_level.clone()
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::Value::from(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i) == Some(&3) || types.get(*i) == Some(&4))
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": types[i] == 3})
        })
        .collect();
    let tj = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    });
    let inner: tokenizers::Tokenizer = tj.to_string().parse().map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot build tokenizer from GGUF metadata: {e}",
            path.display()
        )
    })?;
    let tok_at = |key: &str| -> Option<String> {
        let id = c.metadata.get(key)?.to_u32().ok()? as usize;
        tokens.get(id).cloned()
    };
    let mut config = serde_json::json!({"tokenizer_class": "GPT2Tokenizer"});
    if let Some(b) = tok_at("tokenizer.ggml.bos_token_id") {
        config["bos_token"] = b.into();
    }
    if let Some(e) = tok_at("tokenizer.ggml.eos_token_id") {
        config["eos_token"] = e.into();
    }
    if let Some(p) = tok_at("tokenizer.ggml.padding_token_id") {
        config["pad_token"] = p.into();
    }
    if let Some(v) = c
        .metadata
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
    {
        config["add_bos_token"] = v.into();
    }
    if let Some(t) = c
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
    {
        config["chat_template"] = t.clone().into();
    }
    Tokenizer::new(inner, config)
}
