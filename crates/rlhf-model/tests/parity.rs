//! Our architectures against transformers' reference logits (fixtures made by
//! `scripts/make_fixtures.py`), plus save/load round trips.

mod common;
use common::*;
use rlhf_model::model::load_safetensors;
use rlhf_model::{DType, Tensor};

fn check_parity(name: &str) {
    let m = load(name);
    let exp = load_safetensors(&fixture(name).join("expected.safetensors")).unwrap();
    let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = mask_rows(&exp["attention_mask"]);
    let logits = m.logits(&ids, &mask).unwrap();
    let want = &exp["logits"];
    let (b, t, v) = want.dims3().unwrap();
    let got3: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
    let want3: Vec<Vec<Vec<f32>>> = want.to_vec3().unwrap();
    let mut max = 0f32;
    let mut compared = 0;
    for r in 0..b {
        for i in 0..t {
            if mask[r][i] == 0 {
                continue;
            }
            for j in 0..v {
                max = max.max((got3[r][i][j] - want3[r][i][j]).abs());
                compared += 1;
            }
        }
    }
    assert!(compared > 0);
    assert!(max < 1e-4, "{name}: max |Δlogit| = {max}");
    // Next-token log-probs.
    let lp: Vec<Vec<f32>> = m
        .next_token_logprobs(&ids, &mask, 1.0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let want_lp: Vec<Vec<f32>> = exp["logprobs"].to_vec2().unwrap();
    for r in 0..b {
        for i in 0..t - 1 {
            if mask[r][i] == 1 && mask[r][i + 1] == 1 {
                let d = (lp[r][i] - want_lp[r][i]).abs();
                assert!(
                    d < 1e-4,
                    "{name}: logprob row {r} pos {i}: {} vs {}",
                    lp[r][i],
                    want_lp[r][i]
                );
            }
        }
    }
}

#[test]
fn gpt2_matches_transformers() {
    check_parity("gpt2");
}

#[test]
fn llama_gqa_untied_matches_transformers() {
    check_parity("llama");
}

#[test]
fn qwen2_bias_tied_matches_transformers() {
    check_parity("qwen2");
}

#[test]
fn save_then_load_is_bit_identical() {
    for name in ["gpt2", "llama", "qwen2"] {
        let m = load(name);
        let dir = tmpdir(&format!("save-{name}"));
        m.save(&dir, None).unwrap();
        let m2 = rlhf_model::CausalLM::from_dir(&dir).unwrap();
        let a = m.params.tensors();
        let b = m2.params.tensors();
        assert_eq!(a.len(), b.len(), "{name}");
        for (k, t) in &a {
            let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = b[k].flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{name}: {k}"
            );
        }
        let ids =
            Tensor::from_vec(vec![1u32, 5, 9, 2, 7], (1, 5), &rlhf_model::Device::Cpu).unwrap();
        let mask = vec![vec![1u8; 5]];
        let l1: Vec<f32> = m
            .logits(&ids, &mask)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let l2: Vec<f32> = m2
            .logits(&ids, &mask)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(l1, l2, "{name}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert!(cfg["architectures"].is_array());
        std::fs::remove_dir_all(&dir).ok();
    }
}
