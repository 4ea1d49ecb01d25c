//! Gradients: every op on the training path against central finite differences, and every
//! parameter of every architecture receives a gradient.

mod common;
use common::*;
use rlhf_model::{ops, DType, Device, Tensor, Var};

/// Check d(sum(f(x) * probe))/dx from backward against central differences for every element.
fn fd_check(name: &str, x0: &[f32], shape: &[usize], f: impl Fn(&Tensor) -> Tensor) {
    let dev = Device::Cpu;
    let x = Var::from_vec(x0.to_vec(), shape, &dev).unwrap();
    let y = f(x.as_tensor());
    let n = y.elem_count();
    // A fixed, non-uniform probe so every output element matters differently.
    let probe: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
    let probe = Tensor::from_vec(probe, y.shape(), &dev).unwrap();
    let loss = (y * &probe).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g: Vec<f32> = grads
        .get(x.as_tensor())
        .expect("no gradient")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let eval = |v: Vec<f64>| -> f64 {
        let t = Tensor::from_vec(v, shape, &dev).unwrap();
        let y = f(&t.to_dtype(DType::F64).unwrap());
        (y * probe.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let eps = 1e-5;
    let base: Vec<f64> = x0.iter().map(|&a| a as f64).collect();
    for i in 0..x0.len() {
        let mut p = base.clone();
        p[i] += eps;
        let mut m = base.clone();
        m[i] -= eps;
        let fd = (eval(p) - eval(m)) / (2.0 * eps);
        let err = (fd - g[i] as f64).abs();
        assert!(
            err < 2e-3 * (1.0 + fd.abs()),
            "{name}: element {i}: backward {} vs finite difference {fd}",
            g[i]
        );
    }
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    rlhf_model::linear::seeded_uniform(seed, n, 1.5)
}

#[test]
fn softmax_and_log_softmax_gradients() {
    fd_check("softmax", &data(12, 1), &[3, 4], |x| {
        ops::softmax_last(x).unwrap()
    });
    fd_check("log_softmax", &data(12, 2), &[3, 4], |x| {
        ops::log_softmax_last(x).unwrap()
    });
}

#[test]
fn norm_gradients() {
    let w = |dt| {
        Tensor::from_vec(vec![0.5f32, 1.5, -1.0, 2.0], 4, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    };
    let b = |dt| {
        Tensor::from_vec(vec![0.1f32, -0.2, 0.3, 0.0], 4, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    };
    fd_check("rms_norm", &data(12, 3), &[3, 4], |x| {
        ops::rms_norm(x, &w(x.dtype()), 1e-6).unwrap()
    });
    fd_check("layer_norm", &data(12, 4), &[3, 4], |x| {
        ops::layer_norm(x, &w(x.dtype()), &b(x.dtype()), 1e-5).unwrap()
    });
    // And with respect to the weight.
    let xs = Tensor::from_vec(data(12, 5), (3, 4), &Device::Cpu).unwrap();
    fd_check("rms_norm weight", &[0.5, 1.5, -1.0, 2.0], &[4], |w| {
        ops::rms_norm(&xs.to_dtype(w.dtype()).unwrap(), w, 1e-6).unwrap()
    });
}

#[test]
fn activation_gradients() {
    fd_check("gelu_tanh", &data(10, 6), &[10], |x| {
        ops::gelu_tanh(x).unwrap()
    });
    fd_check("silu", &data(10, 7), &[10], |x| x.silu().unwrap());
}

#[test]
fn rope_and_attention_gradients() {
    let (cos, sin) = ops::rope_tables(&[vec![0, 1, 2]], 4, 10000.0, &Device::Cpu).unwrap();
    fd_check("rope", &data(12, 8), &[1, 1, 3, 4], |x| {
        ops::rope(
            x,
            &cos.to_dtype(x.dtype()).unwrap(),
            &sin.to_dtype(x.dtype()).unwrap(),
        )
        .unwrap()
    });
    // No fully-masked query row: those are padding whose output is never used.
    let mask = vec![vec![1u8, 0, 1]];
    let bias = ops::attention_bias(&mask, 0, 3, &Device::Cpu).unwrap();
    let k = Tensor::from_vec(data(12, 9), (1, 1, 3, 4), &Device::Cpu).unwrap();
    let v = Tensor::from_vec(data(12, 10), (1, 1, 3, 4), &Device::Cpu).unwrap();
    fd_check("attention wrt q", &data(12, 11), &[1, 1, 3, 4], |q| {
        let dt = q.dtype();
        ops::attention(
            q,
            &k.to_dtype(dt).unwrap(),
            &v.to_dtype(dt).unwrap(),
            &bias.to_dtype(dt).unwrap(),
        )
        .unwrap()
    });
    let q = Tensor::from_vec(data(12, 12), (1, 1, 3, 4), &Device::Cpu).unwrap();
    fd_check("attention wrt k", &data(12, 9), &[1, 1, 3, 4], |k| {
        let dt = k.dtype();
        ops::attention(
            &q.to_dtype(dt).unwrap(),
            k,
            &v.to_dtype(dt).unwrap(),
            &bias.to_dtype(dt).unwrap(),
        )
        .unwrap()
    });
}

#[test]
fn token_logprob_gradient() {
    let targets = Tensor::from_vec(vec![1u32, 3, 0], 3, &Device::Cpu).unwrap();
    fd_check("token_logprobs", &data(12, 13), &[3, 4], |x| {
        ops::token_logprobs(x, &targets).unwrap()
    });
}

#[test]
fn every_parameter_gets_a_gradient() {
    for name in ["gpt2", "llama", "qwen2"] {
        let m = load(name);
        let ids = Tensor::from_vec(
            (0..16u32).map(|i| (i * 5) % 90).collect::<Vec<_>>(),
            (2, 8),
            &Device::Cpu,
        )
        .unwrap();
        let mask = vec![vec![1u8; 8], vec![1u8; 8]];
        let lp = m.next_token_logprobs(&ids, &mask, 1.0).unwrap();
        let loss = lp.mean_all().unwrap().neg().unwrap();
        let grads = loss.backward().unwrap();
        let mut missing = vec![];
        for p in m.params.iter() {
            match grads.get(p.var().as_tensor()) {
                Some(g)
                    if g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0 => {}
                _ => missing.push(p.name().to_string()),
            }
        }
        assert!(
            missing.is_empty(),
            "{name}: parameters without gradient: {missing:?}"
        );
        assert!(m.params.len() > 10);
    }
}

/// Batched rows take the fused MLP ops (`linear_gelu`, `swiglu_mlp`) and the GEMM; a sequence
/// of at most 16 rows takes the separate ops and the few-row products. The same three
/// sequences, as one batch and one by one, must give every parameter the same gradient.
#[test]
fn batched_and_few_row_paths_give_the_same_gradients() {
    for name in ["gpt2", "llama", "qwen2"] {
        let m = load(name);
        let seqs: Vec<Vec<u32>> = (0..3u32)
            .map(|s| (0..8u32).map(|i| (i * 5 + s * 11) % 90).collect())
            .collect();
        let grads_of = |batches: &[&[Vec<u32>]]| {
            let mut total: Option<Tensor> = None;
            for b in batches {
                let flat: Vec<u32> = b.iter().flatten().copied().collect();
                let ids = Tensor::from_vec(flat, (b.len(), 8), &Device::Cpu).unwrap();
                let mask = vec![vec![1u8; 8]; b.len()];
                let lp = m.next_token_logprobs(&ids, &mask, 1.0).unwrap();
                let s = lp.sum_all().unwrap();
                total = Some(match total {
                    None => s,
                    Some(t) => (t + s).unwrap(),
                });
            }
            let loss = (total.unwrap() / 24.0).unwrap();
            let g = loss.backward().unwrap();
            m.params
                .iter()
                .map(|p| {
                    let v: Vec<f32> = g
                        .get(p.var().as_tensor())
                        .expect("no gradient")
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    (p.name().to_string(), v)
                })
                .collect::<Vec<_>>()
        };
        let batched = grads_of(&[&seqs[..]]);
        let single = grads_of(&[&seqs[0..1], &seqs[1..2], &seqs[2..3]]);
        for ((name_p, a), (_, b)) in batched.iter().zip(&single) {
            let scale = b.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-6);
            let err = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                err <= 1e-4 * scale,
                "{name} {name_p}: batched vs one by one differ by {err} (max |g| {scale})"
            );
        }
    }
}

/// With a gradient sink installed, the fused ops write weight gradients into per-parameter
/// buffers (accumulating over backward passes) and candle returns only the rest. candle's
/// gradients plus the sink's must equal candle's alone, summed over the passes, for every
/// architecture and for LoRA adapters; the sink must actually take the products' weights.
/// The LoRA models have adapters on every product (GPT-2's four, Llama's seven) with dropout
/// drawing masks (training mode), so their layers run as one node each with adapters and masks
/// inside, the first layer too (its input, the frozen embedding's output, tracks no gradient).
/// Fixture model `name`, with LoRA (dropout 0.25) on `targets` when given, its B matrices set
/// to non-zero values so that every adapter's gradients matter.
fn model_with_adapters(name: &str, targets: Option<&[&str]>) -> rlhf_model::CausalLM {
    let mut m = load(name);
    if let Some(targets) = targets {
        let cfg = rlhf_model::LoraConfig {
            target_modules: targets.iter().map(|t| t.to_string()).collect(),
            dropout: 0.25,
            ..rlhf_model::LoraConfig::default()
        };
        m.add_lora(&cfg, 3).unwrap();
        fill_lora_b(&m);
    }
    m
}

#[test]
fn gradient_sink_matches_candles_gradients_and_accumulates() {
    use rlhf_model::kernels::sink::GradSink;
    for (name, lora) in [
        ("gpt2", false),
        ("llama", false),
        ("qwen2", false),
        ("gpt2", true),
        ("llama", true),
    ] {
        let targets: &[&str] = match name {
            "gpt2" => &["c_attn", "c_proj", "c_fc"],
            _ => &rlhf_model::kernels::block::LLAMA_PROJECTIONS,
        };
        let m = model_with_adapters(name, lora.then_some(targets));
        if lora {
            m.set_train_noise(Some(7));
        }
        let params: Vec<_> = m.params.iter().filter(|p| p.is_trainable()).collect();
        let batch = |s: u32| {
            let flat: Vec<u32> = (0..36u32).map(|i| (i * 5 + s * 11 + i / 7) % 90).collect();
            Tensor::from_vec(flat, (3, 12), &Device::Cpu).unwrap()
        };
        let mask = vec![vec![1u8; 12]; 3];
        let loss_of = |s: u32| {
            let lp = m.next_token_logprobs(&batch(s), &mask, 1.0).unwrap();
            lp.mean_all().unwrap().neg().unwrap()
        };
        let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let add = |a: &mut Vec<f32>, b: Vec<f32>| {
            if a.is_empty() {
                *a = b;
            } else {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
            }
        };
        // candle alone, two passes summed.
        let mut want: Vec<Vec<f32>> = vec![vec![]; params.len()];
        for s in [1, 2] {
            let g = loss_of(s).backward().unwrap();
            for (w, p) in want.iter_mut().zip(&params) {
                add(w, flat(g.get(p.var().as_tensor()).expect("no gradient")));
            }
        }
        // With the sink: candle's remainder of both passes plus what the sink holds.
        let tensors: Vec<Tensor> = params.iter().map(|p| p.var().as_tensor().clone()).collect();
        let sink = GradSink::install(&tensors.iter().collect::<Vec<_>>()).unwrap();
        assert!(
            GradSink::install(&[]).is_err(),
            "a second sink on one thread must be refused"
        );
        let mut got: Vec<Vec<f32>> = vec![vec![]; params.len()];
        for s in [1, 2] {
            let g = loss_of(s).backward().unwrap();
            for (w, p) in got.iter_mut().zip(&params) {
                if let Some(g) = g.get(p.var().as_tensor()) {
                    add(w, flat(g));
                }
            }
        }
        let held = sink.take().unwrap();
        let mut sunk = vec![];
        for ((w, h), p) in got.iter_mut().zip(held).zip(&params) {
            if let Some(h) = h {
                sunk.push(p.name().to_string());
                add(w, flat(&h));
            }
        }
        assert!(
            sink.take().unwrap().iter().all(|h| h.is_none()),
            "take empties the sink"
        );
        drop(sink);
        let product = if lora { "lora_A" } else { "mlp" };
        assert!(
            sunk.iter().any(|n| n.contains(product)),
            "{name}: the sink took no product weight: {sunk:?}"
        );
        for ((w, g), p) in want.iter().zip(&got).zip(&params) {
            assert_eq!(
                w.len(),
                g.len(),
                "{name} {}: no gradient with the sink",
                p.name()
            );
            let scale = w.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-6);
            let err = w
                .iter()
                .zip(g)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                err <= 1e-5 * scale,
                "{name} (lora {lora}) {}: sink vs candle differ by {err} (max |g| {scale})",
                p.name()
            );
        }
    }
}

#[test]
fn recomputed_activations_give_the_same_gradients_bit_for_bit() {
    // Gradient checkpointing: blocks keep only their inputs and run their forward again in the
    // backward. The rebuilt tape must be the original one (adapter dropout masks included), so
    // every gradient, the sink's and candle's, must be equal to the bit.
    use rlhf_model::kernels::block::{blocks_recomputed, recompute_layers};
    use rlhf_model::kernels::sink::GradSink;
    for (name, lora) in [
        ("gpt2", false),
        ("llama", false),
        ("qwen2", false),
        ("gpt2", true),
        ("llama", true),
    ] {
        let targets: &[&str] = match name {
            "gpt2" => &["c_attn", "c_proj", "c_fc"],
            _ => &["q_proj", "v_proj", "down_proj"],
        };
        let m = model_with_adapters(name, lora.then_some(targets));
        let params: Vec<_> = m.params.iter().filter(|p| p.is_trainable()).collect();
        let ids: Vec<u32> = (0..36u32).map(|i| (i * 5 + 11 + i / 7) % 90).collect();
        let ids = Tensor::from_vec(ids, (3, 12), &Device::Cpu).unwrap();
        let mut mask = vec![vec![1u8; 12]; 3];
        mask[1][..4].fill(0);
        let tensors: Vec<Tensor> = params.iter().map(|p| p.var().as_tensor().clone()).collect();
        let grads = |layers: usize| -> (f32, Vec<Vec<f32>>, usize) {
            let _r = recompute_layers(layers);
            if lora {
                m.set_train_noise(Some(7));
            }
            let sink = GradSink::install(&tensors.iter().collect::<Vec<_>>()).unwrap();
            let before = blocks_recomputed();
            let lp = m.next_token_logprobs(&ids, &mask, 1.0).unwrap();
            let loss = lp.mean_all().unwrap().neg().unwrap();
            let g = loss.backward().unwrap();
            let rebuilt = blocks_recomputed() - before;
            let held = sink.take().unwrap();
            let all = params
                .iter()
                .zip(held)
                .map(|(p, h)| {
                    let t = h
                        .or_else(|| g.get(p.var().as_tensor()).cloned())
                        .unwrap_or_else(|| panic!("{name}: no gradient for {}", p.name()));
                    t.flatten_all().unwrap().to_vec1().unwrap()
                })
                .collect();
            (loss.to_scalar().unwrap(), all, rebuilt)
        };
        let (l0, g0, r0) = grads(0);
        assert_eq!(r0, 0, "{name}: rebuilt blocks without recomputation");
        // Every layer, and the first only (the others keep their tapes).
        assert!(
            m.num_layers() >= 2,
            "{name}: a partial setting needs two layers"
        );
        for (layers, want) in [(usize::MAX, m.num_layers()), (1, 1)] {
            let (l1, g1, r1) = grads(layers);
            assert_eq!(
                r1, want,
                "{name} (lora {lora}): blocks rebuilt with {layers} recomputed"
            );
            assert_eq!(l0.to_bits(), l1.to_bits(), "{name}: loss");
            for ((a, b), p) in g0.iter().zip(&g1).zip(&params) {
                let same =
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(
                    same,
                    "{name} (lora {lora}, {layers} layers) {}: gradients differ",
                    p.name()
                );
            }
        }
        assert!(!rlhf_model::kernels::block::recomputing());
    }
}
