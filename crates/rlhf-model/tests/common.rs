#![allow(dead_code)]
use std::path::PathBuf;

use rlhf_model::{CausalLM, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn load(name: &str) -> CausalLM {
    CausalLM::from_dir(&fixture(name)).unwrap()
}

pub fn mask_rows(mask: &Tensor) -> Vec<Vec<u8>> {
    mask.to_dtype(rlhf_model::DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u8).collect())
        .collect()
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlhf-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fixed next-token batch: inputs [b, t] and targets [b·t] over a vocabulary of 512.
pub fn token_batch(b: usize, t: usize) -> (Tensor, Tensor) {
    let ids: Vec<u32> = (0..b * (t + 1))
        .map(|i| ((i * 37 + i / 7) % 512) as u32)
        .collect();
    let (mut x, mut y) = (vec![], vec![]);
    for r in 0..b {
        x.extend_from_slice(&ids[r * (t + 1)..r * (t + 1) + t]);
        y.extend_from_slice(&ids[r * (t + 1) + 1..(r + 1) * (t + 1)]);
    }
    let dev = rlhf_model::Device::Cpu;
    (
        Tensor::from_vec(x, (b, t), &dev).unwrap(),
        Tensor::from_vec(y, b * t, &dev).unwrap(),
    )
}

/// Give every LoRA `B` of `m` a fixed nonzero pattern (they start at zero, so adapters would
/// otherwise change nothing a test could see).
pub fn fill_lora_b(m: &CausalLM) {
    for p in m.params.iter().filter(|p| p.name().contains("lora_B")) {
        let n = p.var().elem_count();
        let v: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.02).collect();
        let t = Tensor::from_vec(v, p.var().shape(), &rlhf_model::Device::Cpu).unwrap();
        p.var().set(&t).unwrap();
    }
}
