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

#[test]
fn lora_dropout_applies_in_training_mode_only_and_is_reproducible() {
    let mut m = load("llama");
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.5,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
    };
    m.add_lora(&cfg, 1).unwrap();
    for p in m.params.trainable() {
        if p.name().contains("lora_B") {
            let t = Tensor::ones(p.var().shape(), rlhf_model::DType::F32, &Device::Cpu).unwrap();
            p.var().set(&(t * 0.05).unwrap()).unwrap();
        }
    }
    let eval = logits(&m);
    // Evaluation mode is the default and deterministic.
    assert_eq!(logits(&m), eval);
    m.set_train_noise(Some(7));
    let t7 = logits(&m);
    assert_ne!(
        t7, eval,
        "dropout changes the adapted output in training mode"
    );
    assert_eq!(logits(&m), t7, "same noise seed, same masks");
    m.set_train_noise(Some(8));
    let t8 = logits(&m);
    assert_ne!(t8, t7, "another seed draws other masks");
    // Gradients still reach both adapter matrices through the mask.
    let (i, mk) = ids();
    let loss = m
        .next_token_logprobs(&i, &mk, 1.0)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    for p in m.params.trainable() {
        let gp = g.get(p.var().as_tensor()).expect("adapter gradient");
        let n = gp
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n.is_finite() && n > 0.0, "{}: |g|² = {n}", p.name());
    }
    // Back to evaluation: exactly the no-dropout output; adapters off: the base.
    m.set_train_noise(None);
    assert_eq!(logits(&m), eval);
    // Inverted dropout: with a small adapter (the model ~linear in it) the average output over
    // many masks approaches the evaluation output, while one mask is clearly off.
    for p in m.params.trainable() {
        if p.name().contains("lora_B") {
            let t = Tensor::ones(p.var().shape(), rlhf_model::DType::F32, &Device::Cpu).unwrap();
            p.var().set(&(t * 0.005).unwrap()).unwrap();
        }
    }
    let eval = logits(&m);
    m.set_train_noise(Some(7));
    let t7 = logits(&m);
    m.set_train_noise(None);
    let mut mean = vec![0f64; eval.len()];
    let n = 200;
    for s in 0..n {
        m.set_train_noise(Some(1000 + s));
        for (a, v) in mean.iter_mut().zip(logits(&m)) {
            *a += v as f64 / n as f64;
        }
    }
    m.set_train_noise(None);
    let base_gap = t7
        .iter()
        .zip(&eval)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0f64, f64::max);
    let mean_gap = mean
        .iter()
        .zip(&eval)
        .map(|(a, b)| (a - *b as f64).abs())
        .fold(0f64, f64::max);
    assert!(
        mean_gap < base_gap / 4.0,
        "mean over masks {mean_gap} vs one mask {base_gap}"
    );
}

/// LoRA's fused path (the scale on the r-wide intermediate, B's product accumulating onto the
/// base output) has the gradients of `y + scale · x Aᵀ Bᵀ`: backward against central finite
/// differences of the loss for elements of A and B.
#[test]
fn lora_gradients_match_finite_differences() {
    let mut m = load("gpt2");
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["c_attn".into(), "c_fc".into()],
    };
    m.add_lora(&cfg, 2).unwrap();
    let trainable = m.params.trainable();
    for p in &trainable {
        if p.name().contains("lora_B") {
            let n = p.var().elem_count();
            let v = rlhf_model::linear::seeded_uniform(9, n, 0.3);
            p.var()
                .set(&Tensor::from_vec(v, p.var().shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    // Three sequences of 12 tokens: 36 rows, more than the few-row kernels' 16.
    let flat: Vec<u32> = (0..36u32).map(|i| (i * 7 + i / 5) % 90).collect();
    let ids = Tensor::from_vec(flat, (3, 12), &Device::Cpu).unwrap();
    let mask = vec![vec![1u8; 12]; 3];
    let loss = |m: &CausalLM| {
        m.next_token_logprobs(&ids, &mask, 1.0)
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let g = loss(&m).backward().unwrap();
    let mut checked = 0;
    for p in trainable.iter().filter(|p| p.name().contains("h.0.")) {
        let grad: Vec<f32> = g
            .get(p.var().as_tensor())
            .expect("adapter gradient")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w0: Vec<f32> = p.var().flatten_all().unwrap().to_vec1().unwrap();
        for i in [0, w0.len() / 3, w0.len() - 1] {
            let eps = 1e-2f32;
            let at = |delta: f32| {
                let mut w = w0.clone();
                w[i] += delta;
                let t = Tensor::from_vec(w, p.var().shape(), &Device::Cpu).unwrap();
                p.var().set(&t).unwrap();
                loss(&m).to_scalar::<f32>().unwrap() as f64
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            let t = Tensor::from_vec(w0.clone(), p.var().shape(), &Device::Cpu).unwrap();
            p.var().set(&t).unwrap();
            let err = (fd - grad[i] as f64).abs();
            assert!(
                err <= 2e-3 + 0.03 * fd.abs(),
                "{} [{i}]: backward {} vs finite difference {fd}",
                p.name(),
                grad[i]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12, "A and B of c_attn and c_fc in block 0");
}
