//! Packed rows: examples that share a row (segment ids in the attention mask) give exactly the
//! logits they give alone — no attention across examples, positions restart per example.

mod common;
use common::*;
use rlhf_model::{Device, Tensor};

fn logits(m: &rlhf_model::CausalLM, ids: &[u32], mask: Vec<u8>) -> Vec<Vec<f32>> {
    let t = ids.len();
    let x = Tensor::from_vec(ids.to_vec(), (1, t), &Device::Cpu).unwrap();
    m.logits(&x, &[mask])
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn packed_examples_match_separate_runs() {
    for arch in ["gpt2", "llama", "qwen2"] {
        let m = load(arch);
        let a = [3u32, 14, 15, 92, 6];
        let b = [5u32, 35, 8, 79, 9, 32, 38];
        let c = [46u32, 26];
        let alone: Vec<Vec<Vec<f32>>> = [&a[..], &b[..], &c[..]]
            .iter()
            .map(|x| logits(&m, x, vec![1; x.len()]))
            .collect();
        // Packed, then right padding.
        let mut ids = vec![];
        let mut mask = vec![];
        for (k, x) in [&a[..], &b[..], &c[..]].iter().enumerate() {
            ids.extend_from_slice(x);
            mask.extend(std::iter::repeat_n(k as u8 + 1, x.len()));
        }
        ids.extend([0, 0]);
        mask.extend([0, 0]);
        let packed = logits(&m, &ids, mask.clone());
        let mut off = 0;
        for one in &alone {
            for (j, row) in one.iter().enumerate() {
                let e = row
                    .iter()
                    .zip(&packed[off + j])
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                assert!(
                    e < 1e-4,
                    "{arch}: token {j} of a packed example differs by {e}"
                );
            }
            off += one.len();
        }
        // Without segment ids the later examples do see the earlier ones.
        let joined = logits(&m, &ids, mask.iter().map(|&s| (s != 0) as u8).collect());
        let e = joined[a.len()]
            .iter()
            .zip(&packed[a.len()])
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(e > 1e-3, "{arch}: segment ids made no difference");
    }
}
