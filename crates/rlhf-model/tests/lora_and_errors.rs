//! LoRA behaviour and clear errors for bad checkpoints.

mod common;
use common::*;
use rlhf_model::{CausalLM, Device, LoraConfig, Tensor};

fn ids() -> (Tensor, Vec<Vec<u8>>) {
    let t = Tensor::from_vec(vec![1u32, 4, 9, 16, 25, 36], (1, 6), &Device::Cpu).unwrap();
    (t, vec![vec![1u8; 6]])
}

fn logits(m: &CausalLM) -> Vec<f32> {
    let (i, mk) = ids();
    m.logits(&i, &mk)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn lora_trains_adapters_only_and_disable_restores_base() {
    let mut m = load("llama");
    let base = logits(&m);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    };
    let n = m.add_lora(&cfg, 1).unwrap();
    assert_eq!(n, 6);
    // B = 0 at init: same outputs.
    assert_eq!(logits(&m), base);
    let trainable = m.params.trainable();
    assert_eq!(trainable.len(), 12);
    assert!(trainable.iter().all(|p| p.name().contains(".lora_")));
    // Perturb B so adapters matter.
    for p in &trainable {
        if p.name().contains("lora_B") {
            let t = Tensor::ones(p.var().shape(), rlhf_model::DType::F32, &Device::Cpu).unwrap();
            p.var().set(&(t * 0.05).unwrap()).unwrap();
        }
    }
    let adapted = logits(&m);
    assert_ne!(adapted, base);
    // Backward reaches adapters only.
    let (i, mk) = ids();
    let loss = m
        .next_token_logprobs(&i, &mk, 1.0)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    for p in m.params.iter() {
        assert_eq!(
            g.get(p.var().as_tensor()).is_some(),
            p.name().contains(".lora_"),
            "{}",
            p.name()
        );
    }
    m.disable_adapters();
    assert_eq!(
        logits(&m),
        base,
        "disable_adapters reproduces the base exactly"
    );
    m.enable_adapters();
    // Merged export equals base + adapter outputs.
    let dir = tmpdir("lora-merge");
    m.save(&dir, None).unwrap();
    let merged = CausalLM::from_dir(&dir).unwrap();
    let diff = logits(&merged)
        .iter()
        .zip(&adapted)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "merged vs adapted: {diff}");
}

#[test]
fn lora_with_unknown_target_names_the_real_modules() {
    let mut m = load("gpt2");
    let err = m
        .add_lora(
            &LoraConfig {
                target_modules: vec!["q_proj".into()],
                ..Default::default()
            },
            0,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("c_attn"), "{err}");
}

fn copy_fixture(name: &str, tag: &str) -> std::path::PathBuf {
    let d = tmpdir(tag);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), d.join(f)).unwrap();
    }
    d
}

fn err_of(dir: &std::path::Path) -> String {
    format!("{:#}", CausalLM::from_dir(dir).err().expect("should fail"))
}

#[test]
fn missing_and_malformed_config() {
    let d = copy_fixture("llama", "badcfg");
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert!(err_of(&d).contains("missing config.json"));
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    let e = err_of(&d);
    assert!(
        e.contains("config.json") && e.contains("malformed JSON"),
        "{e}"
    );
    std::fs::write(d.join("config.json"), r#"{"model_type": "mamba"}"#).unwrap();
    let e = err_of(&d);
    assert!(e.contains("unknown architecture `mamba`"), "{e}");
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let d = copy_fixture("qwen2", "badtensor");
    let m = load("qwen2");
    let mut t = m.params.tensors();
    t.remove("model.layers.1.self_attn.k_proj.bias");
    rlhf_model::model::save_safetensors(&t, &d.join("model.safetensors")).unwrap();
    let e = err_of(&d);
    assert!(
        e.contains("model.safetensors")
            && e.contains("missing tensor `model.layers.1.self_attn.k_proj.bias`"),
        "{e}"
    );
    let mut t = m.params.tensors();
    t.insert(
        "model.layers.0.mlp.up_proj.weight".into(),
        Tensor::zeros((3, 3), rlhf_model::DType::F32, &Device::Cpu).unwrap(),
    );
    rlhf_model::model::save_safetensors(&t, &d.join("model.safetensors")).unwrap();
    let e = err_of(&d);
    assert!(
        e.contains("`model.layers.0.mlp.up_proj.weight` has shape [3, 3], expected [64, 32]"),
        "{e}"
    );
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let d = tmpdir("gguf");
    let p = d.join("broken.gguf");
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00\x02\x00").unwrap();
    let e = format!(
        "{:#}",
        rlhf_model::load::load(p.to_str().unwrap()).err().unwrap()
    );
    assert!(e.contains("broken.gguf"), "{e}");
}

#[test]
fn hub_id_without_cache_fails_fast() {
    std::env::set_var("HF_HUB_CACHE", tmpdir("hub"));
    let t = std::time::Instant::now();
    let e = format!(
        "{:#}",
        rlhf_model::load::load("someorg/some-model").err().unwrap()
    );
    assert!(e.contains("not in the local Hugging Face cache"), "{e}");
    assert!(t.elapsed().as_secs() < 5);
}
