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

/// Shared-prompt rows ([`rlhf_model::ops::PrefixRow`]): a prompt computed once, then several
/// responses that each see only the prompt and themselves. Every response token's hidden state
/// equals the one of its prompt + response alone, and the gradient of a loss over the responses
/// equals the sum of the separate rows' gradients, on every architecture, with rows long enough
/// for several 32-query attention blocks, with padding, and with two prompt groups back to back
/// in one row.
#[test]
fn prefix_rows_match_separate_rows_in_values_and_gradients() {
    use rlhf_model::ops::PrefixRow;
    let dev = Device::Cpu;
    let toks = |n: usize, s: usize| -> Vec<u32> {
        (0..n)
            .map(|i| ((i * 31 + s * 17) % 90) as u32 + 3)
            .collect()
    };
    // Row 0: a 20-token prompt and responses of 30, 5 and 36 tokens (91 slots, three attention
    // blocks; positions stay below the fixtures' 64); row 1: a 3-token prompt and responses of
    // 1 and 9 tokens, then a 4-token prompt and responses of 6 and 2 tokens, padded. `place`:
    // each group's row and first slot.
    let rows = [
        (toks(20, 1), vec![toks(30, 2), toks(5, 3), toks(36, 4)]),
        (toks(3, 5), vec![toks(1, 6), toks(9, 7)]),
        (toks(4, 8), vec![toks(6, 9), toks(2, 10)]),
    ];
    let place = [(0, 0), (1, 0), (1, 13)];
    let t = 20 + 30 + 5 + 36;
    for arch in ["gpt2", "llama", "qwen2"] {
        let m = load(arch);
        let d = m.hidden_size();
        let w: Vec<f32> = (0..d).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
        let w = Tensor::from_vec(w, (d, 1), &dev).unwrap();
        let grads_of = |loss: Tensor| -> Vec<Vec<f32>> {
            let g = loss.backward().unwrap();
            m.params
                .iter()
                .map(|p| match g.get(p.var().as_tensor()) {
                    Some(x) => x.flatten_all().unwrap().to_vec1().unwrap(),
                    None => vec![0.0; p.var().elem_count()],
                })
                .collect()
        };
        // Shared: each prompt once, its groups placed as `place` says.
        let mut ids = vec![vec![]; 2];
        let mut layout: Vec<Vec<PrefixRow>> = vec![vec![]; 2];
        let mut groups = vec![];
        for ((p, rs), &(r, o)) in rows.iter().zip(&place) {
            assert_eq!(ids[r].len(), o);
            ids[r].extend_from_slice(p);
            rs.iter().for_each(|x| ids[r].extend_from_slice(x));
            let g = PrefixRow {
                prompt: p.len(),
                responses: rs.iter().map(|r| r.len()).collect(),
            };
            layout[r].push(g.clone());
            groups.push(g);
        }
        let ids: Vec<u32> = ids
            .into_iter()
            .flat_map(|mut r| {
                r.resize(t, 0);
                r
            })
            .collect();
        let x = Tensor::from_vec(ids, (2, t), &dev).unwrap();
        let shared = m.hidden_prefix_rows(&x, &layout).unwrap();
        let proj: Vec<Vec<f32>> = shared
            .broadcast_matmul(&w)
            .unwrap()
            .squeeze(2)
            .unwrap()
            .to_vec2()
            .unwrap();
        // The loss reads every response token's projection.
        let mut sel = vec![0f32; 2 * t];
        for (l, &(r, o)) in groups.iter().zip(&place) {
            sel[r * t + o + l.prompt..r * t + o + l.len()].fill(1.0);
        }
        let sel = Tensor::from_vec(sel, (2, t, 1), &dev).unwrap();
        let g_shared = grads_of(
            (shared.broadcast_matmul(&w).unwrap() * &sel)
                .unwrap()
                .sum_all()
                .unwrap(),
        );
        // Separate: prompt + response alone, one at a time.
        let mut g_sep: Option<Vec<Vec<f32>>> = None;
        for (((p, rs), l), &(r0, o)) in rows.iter().zip(&groups).zip(&place) {
            for (k, r) in rs.iter().enumerate() {
                let seq = [p.as_slice(), r].concat();
                let n = seq.len();
                let x = Tensor::from_vec(seq, (1, n), &dev).unwrap();
                let h = m.hidden(&x, &[vec![1; n]]).unwrap();
                let alone: Vec<f32> = h
                    .broadcast_matmul(&w)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (j, &want) in alone.iter().enumerate() {
                    let slot = o + if j < p.len() {
                        j
                    } else {
                        l.response_start(k) + j - p.len()
                    };
                    let e = (want - proj[r0][slot]).abs();
                    assert!(
                        e < 1e-4 * (1.0 + want.abs()),
                        "{arch}: response {k} token {j}: {} vs {want}",
                        proj[r0][slot],
                    );
                }
                let mut s = vec![0f32; n];
                s[p.len()..].fill(1.0);
                let s = Tensor::from_vec(s, (1, n, 1), &dev).unwrap();
                let g = grads_of(
                    (h.broadcast_matmul(&w).unwrap() * s)
                        .unwrap()
                        .sum_all()
                        .unwrap(),
                );
                g_sep = Some(match g_sep {
                    None => g,
                    Some(a) => a
                        .iter()
                        .zip(&g)
                        .map(|(x, y)| x.iter().zip(y).map(|(u, v)| u + v).collect())
                        .collect(),
                });
            }
        }
        let g_sep = g_sep.unwrap();
        let mut checked = 0;
        for ((p, a), b) in m.params.iter().zip(&g_shared).zip(&g_sep) {
            let scale = b.iter().fold(0f32, |s, x| s.max(x.abs())).max(1e-3);
            let e = a.iter().zip(b).fold(0f32, |s, (x, y)| s.max((x - y).abs()));
            assert!(
                e < 2e-3 * scale,
                "{arch}: {}: gradient differs by {e} (scale {scale})",
                p.name()
            );
            checked += (scale > 1e-3) as usize;
        }
        assert!(
            checked > 5,
            "{arch}: only {checked} parameters had a gradient"
        );
    }
}
