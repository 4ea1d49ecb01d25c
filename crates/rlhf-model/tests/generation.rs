//! Generation: KV cache equals recomputation, EOS per row, seeded reproducibility.

mod common;
use common::*;
use rlhf_model::{generate, Generation, GenerationConfig};

/// `cfg`'s generation without the KV cache: every step recomputes the whole sequence.
fn uncached(m: &rlhf_model::CausalLM, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Generation {
    let cfg = GenerationConfig {
        use_cache: false,
        ..cfg.clone()
    };
    generate(m, prompts, &cfg).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![3, 17, 42, 8, 11], vec![5, 9], vec![60, 61, 62]]
}

/// The cached decode equals the uncached recomputation (which runs every product as a GEMM),
/// for 3 rows and for 20, which decode on weights packed for the generation (16 to 64 rows).
#[test]
fn kv_cache_equals_no_cache() {
    use rlhf_model::kernels::packed::{enabled, weights_packed};
    let twenty: Vec<Vec<u32>> = (0..20)
        .map(|i| {
            (0..1 + i % 4)
                .map(|j| ((i * 5 + j * 7) % 50 + 3) as u32)
                .collect()
        })
        .collect();
    for name in ["gpt2", "llama", "qwen2"] {
        let m = load(name);
        for (prompts, max_new_tokens) in [(prompts(), 12), (twenty.clone(), 10)] {
            for temperature in [0.0, 1.0] {
                let cfg = GenerationConfig {
                    max_new_tokens,
                    temperature,
                    seed: 7,
                    ..Default::default()
                };
                let before = weights_packed();
                let a = generate(&m, &prompts, &cfg).unwrap();
                // Packing is on with AVX-512 (unless RLHF_DECODE_PACK=0) for 16 to 256 rows:
                // 3 rows decode and prefill (15 positions) below that.
                let packed = weights_packed() > before;
                assert_eq!(packed, enabled() && prompts.len() >= 16, "{name}");
                let b = uncached(&m, &prompts, &cfg);
                let rows = prompts.len();
                assert_eq!(a.tokens, b.tokens, "{name} T={temperature} rows={rows}");
                for (x, y) in a.logprobs.iter().flatten().zip(b.logprobs.iter().flatten()) {
                    assert!((x - y).abs() < 1e-4, "{name} rows={rows}: {x} vs {y}");
                }
                assert!(a.tokens.iter().all(|t| t.len() == max_new_tokens));
            }
        }
    }
}

#[test]
fn padded_batch_equals_single_rows() {
    // Left padding must not change a row's greedy continuation.
    let m = load("llama");
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        temperature: 0.0,
        ..Default::default()
    };
    let batch = generate(&m, &prompts(), &cfg).unwrap();
    for (i, p) in prompts().into_iter().enumerate() {
        let one = generate(&m, &[p], &cfg).unwrap();
        assert_eq!(one.tokens[0], batch.tokens[i], "row {i}");
    }
}

#[test]
fn a_job_in_batches_samples_what_it_samples_in_one() {
    // `first_row`: each batch's rows draw from the streams of their rows in the whole job, so
    // `rlhf generate --batch-size` does not change what is sampled.
    let m = load("llama");
    let cfg = GenerationConfig {
        max_new_tokens: 10,
        temperature: 1.0,
        seed: 11,
        ..Default::default()
    };
    let all: Vec<Vec<u32>> = prompts().into_iter().cycle().take(5).collect();
    let whole = generate(&m, &all, &cfg).unwrap();
    let mut tokens = vec![];
    for (c, batch) in all.chunks(2).enumerate() {
        let part = GenerationConfig {
            first_row: 2 * c as u64,
            ..cfg.clone()
        };
        tokens.extend(generate(&m, batch, &part).unwrap().tokens);
    }
    assert_eq!(tokens, whole.tokens);
    // Rows 3 and 4 repeat rows 0 and 1's prompts. Without the offset a batch of them replays
    // rows 0 and 1's streams and samples their continuations; in the job they sample their own.
    let replayed = generate(&m, &all[3..5], &cfg).unwrap();
    assert_eq!(replayed.tokens, whole.tokens[0..2]);
    assert_ne!(whole.tokens[3], whole.tokens[0]);
    assert_ne!(whole.tokens[4], whole.tokens[1]);
}

#[test]
fn eos_stops_a_row_while_others_continue() {
    let m = load("gpt2");
    let cfg = GenerationConfig {
        max_new_tokens: 10,
        temperature: 1.0,
        seed: 5,
        ..Default::default()
    };
    let free = generate(&m, &prompts(), &cfg).unwrap();
    // Declare as EOS an early sampled token of row 0 that some other row never produces: row 0
    // must stop right there while that row runs on.
    let eos = *free.tokens[0]
        .iter()
        .find(|t| free.tokens[1..].iter().any(|r| !r.contains(t)))
        .expect("rows differ");
    let stopped = generate(
        &m,
        &prompts(),
        &GenerationConfig {
            eos_ids: vec![eos],
            ..cfg
        },
    )
    .unwrap();
    let first = free.tokens[0].iter().position(|&t| t == eos).unwrap();
    assert_eq!(stopped.tokens[0], free.tokens[0][..=first].to_vec());
    assert!(stopped.finished[0]);
    for r in 1..3 {
        let cut = free.tokens[r]
            .iter()
            .position(|&t| t == eos)
            .map(|p| p + 1)
            .unwrap_or(10);
        assert_eq!(stopped.tokens[r], free.tokens[r][..cut].to_vec(), "row {r}");
    }
    assert!(
        stopped.tokens.iter().any(|t| t.len() > first + 1),
        "another row continued"
    );
}

/// Rows that stop at EOS leave the batch and the KV cache (once they are an eighth of it) while
/// the others run on: every row's tokens equal the uncached recomputation's, and each row's
/// equal the run without EOS cut at its first EOS, for rows that stopped at many different
/// steps.
#[test]
fn finished_rows_leave_the_batch_without_changing_the_others() {
    let prompts: Vec<Vec<u32>> = (0..12)
        .map(|i| {
            (0..1 + i % 5)
                .map(|j| ((i * 7 + j * 3) % 50 + 3) as u32)
                .collect()
        })
        .collect();
    for name in ["gpt2", "llama", "qwen2"] {
        let m = load(name);
        let cfg = GenerationConfig {
            max_new_tokens: 16,
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        };
        let free = generate(&m, &prompts, &cfg).unwrap();
        // EOS: the token that most rows sample, so that they stop at different steps.
        let mut rows_with = std::collections::HashMap::<u32, usize>::new();
        for r in &free.tokens {
            let mut seen: Vec<u32> = r.clone();
            seen.sort_unstable();
            seen.dedup();
            seen.into_iter()
                .for_each(|t| *rows_with.entry(t).or_default() += 1);
        }
        let eos = *rows_with.iter().max_by_key(|&(t, c)| (*c, *t)).unwrap().0;
        let cfg = GenerationConfig {
            eos_ids: vec![eos],
            ..cfg
        };
        let cached = generate(&m, &prompts, &cfg).unwrap();
        let uncached = uncached(&m, &prompts, &cfg);
        assert_eq!(cached.tokens, uncached.tokens, "{name}");
        assert_eq!(cached.finished, uncached.finished, "{name}");
        for (x, y) in cached
            .logprobs
            .iter()
            .flatten()
            .zip(uncached.logprobs.iter().flatten())
        {
            assert!((x - y).abs() < 1e-4, "{name}: {x} vs {y}");
        }
        for (r, toks) in cached.tokens.iter().enumerate() {
            let cut = free.tokens[r]
                .iter()
                .position(|&t| t == eos)
                .map_or(16, |p| p + 1);
            assert_eq!(toks, &free.tokens[r][..cut], "{name} row {r}");
            for (x, y) in cached.logprobs[r].iter().zip(&free.logprobs[r]) {
                assert!((x - y).abs() < 1e-4, "{name} row {r}: {x} vs {y}");
            }
        }
        let ends: std::collections::HashSet<usize> = cached
            .tokens
            .iter()
            .zip(&cached.finished)
            .filter(|(_, &f)| f)
            .map(|(t, _)| t.len())
            .collect();
        assert!(ends.len() >= 3, "{name}: rows stopped at steps {ends:?}");
    }
}

/// Prefill groups: every row once; a batch within 10% padding stays one group in order;
/// otherwise each group holds rows of similar lengths, padded within 10% of its tokens.
#[test]
fn prefill_groups_cover_every_row_within_the_slack() {
    use rlhf_model::generate::prefill_groups;
    assert_eq!(prefill_groups(&[10, 10, 9, 10]), vec![vec![0, 1, 2, 3]]);
    let lens: Vec<usize> = (0..64).map(|i| 20 + (i * 37) % 60).collect();
    let groups = prefill_groups(&lens);
    assert!(groups.len() > 1);
    let mut seen: Vec<usize> = groups.concat();
    seen.sort_unstable();
    assert_eq!(seen, (0..64).collect::<Vec<_>>());
    let (mut padded, real) = (0, lens.iter().sum::<usize>());
    for g in &groups {
        let w = g.iter().map(|&r| lens[r]).max().unwrap();
        let sum: usize = g.iter().map(|&r| lens[r]).sum();
        assert!(
            g.len() == 1 || (w * g.len()) as f64 <= 1.1 * sum as f64,
            "{g:?}"
        );
        padded += w * g.len();
    }
    assert!((padded as f64) < 1.1 * real as f64 && 64 * 79 > real * 13 / 10);
}

#[test]
fn same_seed_same_sample_different_seed_differs() {
    let m = load("qwen2");
    let cfg = GenerationConfig {
        max_new_tokens: 16,
        temperature: 1.5,
        top_k: 40,
        top_p: 0.95,
        seed: 123,
        ..Default::default()
    };
    let a = generate(&m, &prompts(), &cfg).unwrap();
    let b = generate(&m, &prompts(), &cfg).unwrap();
    assert_eq!(a, b);
    let c = generate(&m, &prompts(), &GenerationConfig { seed: 124, ..cfg }).unwrap();
    assert_ne!(a.tokens, c.tokens);
}

#[test]
fn sampled_logprobs_match_a_full_forward() {
    // The rollout log-probs PPO stores must equal a recomputation over the whole sequence.
    let m = load("llama");
    let t = 0.7;
    let cfg = GenerationConfig {
        max_new_tokens: 6,
        temperature: t,
        seed: 3,
        ..Default::default()
    };
    let p = vec![vec![4u32, 8, 15, 16]];
    let g = generate(&m, &p, &cfg).unwrap();
    let mut seq = p[0].clone();
    seq.extend(&g.tokens[0]);
    let n = seq.len();
    let ids = rlhf_model::Tensor::from_vec(seq, (1, n), &rlhf_model::Device::Cpu).unwrap();
    let lp: Vec<Vec<f32>> = m
        .next_token_logprobs(&ids, &[vec![1; n]], t)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (j, want) in g.logprobs[0].iter().enumerate() {
        let got = lp[0][p[0].len() - 1 + j];
        assert!((got - want).abs() < 1e-4, "token {j}: {got} vs {want}");
    }
}

/// The distribution `sample_row` should draw from, in f64: softmax(logits / T) over the tokens
/// from the most likely down (ties: lower id first), cut to the top k, then to the shortest
/// prefix whose mass reaches top-p, renormalised.
fn processed_distribution(logits: &[f32], cfg: &GenerationConfig) -> Vec<f64> {
    let x: Vec<f64> = logits.iter().map(|&l| l as f64 / cfg.temperature).collect();
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    let m = x[idx[0]];
    let z: f64 = x.iter().map(|v| (v - m).exp()).sum();
    if cfg.top_k > 0 {
        idx.truncate(cfg.top_k);
    }
    let zk: f64 = idx.iter().map(|&i| (x[i] - m).exp()).sum();
    let zk = if cfg.top_k > 0 { zk } else { z };
    let mut keep = idx.len();
    let mut c = 0.0;
    for (j, &i) in idx.iter().enumerate() {
        c += (x[i] - m).exp() / zk;
        if c >= cfg.top_p {
            keep = j + 1;
            break;
        }
    }
    idx.truncate(keep);
    let zn: f64 = idx.iter().map(|&i| (x[i] - m).exp()).sum();
    let mut p = vec![0.0; x.len()];
    for &i in &idx {
        p[i] = (x[i] - m).exp() / zn;
    }
    p
}

/// `sample_row` draws each token at its processed probability (plain, top-k, top-p, both;
/// tied logits included) and returns log softmax(logits / T) of the token it drew.
#[test]
fn sample_row_draws_the_processed_distribution() {
    use rand::SeedableRng;
    use rlhf_model::generate::sample_row;
    // 40 tokens: two full 16-lane blocks of the vectorised exp and a remainder; tokens i and
    // i + 23 tie, so ties straddle the top-k and top-p cuts.
    let logits: Vec<f32> = (0..40)
        .map(|i| ((i * 37 % 23) as f32) / 8.0 - 0.4)
        .collect();
    let configs = [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.8), (1.3, 5, 0.9)];
    for (temperature, top_k, top_p) in configs {
        let cfg = GenerationConfig {
            temperature,
            top_k,
            top_p,
            ..Default::default()
        };
        let want = processed_distribution(&logits, &cfg);
        let lse = {
            let x: Vec<f64> = logits.iter().map(|&l| l as f64 / temperature).collect();
            let m = x.iter().cloned().fold(f64::MIN, f64::max);
            m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let draws = 100_000;
        let mut count = vec![0usize; logits.len()];
        for _ in 0..draws {
            let (t, lp) = sample_row(&logits, &cfg, &mut rng);
            count[t as usize] += 1;
            let exact = logits[t as usize] as f64 / temperature - lse;
            assert!((lp as f64 - exact).abs() < 1e-5, "logprob {lp} vs {exact}");
        }
        for (i, (&c, &p)) in count.iter().zip(&want).enumerate() {
            let f = c as f64 / draws as f64;
            let sd = (p * (1.0 - p) / draws as f64).sqrt();
            assert!(
                (f - p).abs() <= 5.0 * sd + 1e-4,
                "T={temperature} k={top_k} p={top_p} token {i}: drawn {f:.4}, want {p:.4}"
            );
            if p == 0.0 {
                assert_eq!(c, 0, "token {i} is outside the kept set");
            }
        }
    }
}

/// A uniform draw in [0, 1) from a 64-bit LCG (deterministic test data).
fn unit(s: &mut u64) -> f32 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*s >> 40) as f32 / (1u64 << 24) as f32
}

/// At a GPT-2-sized vocabulary, top-k and top-p select their candidates without sorting the
/// whole vocabulary: every draw must still land in the exact kept set, for a peaked
/// distribution (a small nucleus) and a flat one (a nucleus of most of the vocabulary, which
/// makes the candidate search grow to the full vocabulary).
#[test]
fn truncated_sampling_keeps_the_exact_set_at_full_vocabulary() {
    use rand::SeedableRng;
    use rlhf_model::generate::sample_row;
    let v = 50257;
    let mut s = 42u64;
    let mut next = || unit(&mut s);
    let peaked: Vec<f32> = (0..v).map(|_| 12.0 * next().powi(8)).collect();
    let flat: Vec<f32> = (0..v).map(|_| 0.5 * next()).collect();
    for (name, logits) in [("peaked", &peaked), ("flat", &flat)] {
        for (top_k, top_p) in [(50, 1.0), (0, 0.9), (200, 0.5)] {
            let cfg = GenerationConfig {
                temperature: 1.0,
                top_k,
                top_p,
                ..Default::default()
            };
            // Lenient at the cut by a hair of mass (f32 sums against f64).
            let inner = processed_distribution(
                logits,
                &GenerationConfig {
                    top_p: top_p - 1e-5,
                    ..cfg.clone()
                },
            );
            let outer = processed_distribution(
                logits,
                &GenerationConfig {
                    top_p: (top_p + 1e-5).min(1.0),
                    ..cfg.clone()
                },
            );
            let kept = outer.iter().filter(|&&p| p > 0.0).count();
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            let mut seen = std::collections::HashSet::new();
            for _ in 0..300 {
                let (t, _) = sample_row(logits, &cfg, &mut rng);
                assert!(
                    outer[t as usize] > 0.0,
                    "{name} k={top_k} p={top_p}: token {t} outside the kept set of {kept}"
                );
                seen.insert(t);
            }
            let core = inner.iter().filter(|&&p| p > 0.0).count();
            assert!(core >= 2, "{name} k={top_k} p={top_p}: {core} kept");
            if core > 10_000 {
                // 300 draws from ≥ 10k near-equal tokens are almost all distinct (a search that
                // stopped at 256 candidates would repeat about 120 of them).
                assert!(
                    seen.len() > 280,
                    "{name} p={top_p}: {} distinct of 300",
                    seen.len()
                );
            }
        }
    }
}

/// An RNG at the top of its range: `random::<f32>()` gives 1 − 2⁻²⁴, where f32 rounding can
/// leave the cumulative mass below u.
struct TopRng;
impl rand::RngCore for TopRng {
    fn next_u32(&mut self) -> u32 {
        u32::MAX
    }
    fn next_u64(&mut self) -> u64 {
        u64::MAX
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        dst.fill(0xff)
    }
}

/// Masked tokens (logit −∞) are never drawn, in any mode, even when u sits at the very top of
/// its range and the kept set includes masked tokens (top-k larger than the unmasked count).
#[test]
fn masked_tokens_are_never_drawn() {
    use rlhf_model::generate::sample_row;
    use rlhf_model::kernels::math::exp;
    let u_top: f32 = 1.0 - 2f32.powi(-24);
    // Find logits whose top-k probabilities, normalised and summed in f32 the way the sampler
    // does, fall short of u_top: there the draw runs off the end of the kept list, which ends
    // with the masked tokens.
    let mut s = 7u64;
    let mut found = None;
    for _ in 0..10_000 {
        let mut logits: Vec<f32> = (0..20).map(|_| unit(&mut s) * 3.0).collect();
        let m = logits.iter().cloned().fold(f32::MIN, f32::max);
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let mut probs: Vec<f32> = sorted.iter().map(|&x| exp(x - m)).collect();
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        let c: f32 = probs.iter().sum();
        if c < u_top {
            logits.extend([f32::NEG_INFINITY; 5]);
            found = Some(logits);
            break;
        }
    }
    let logits = found.expect("some logits sum short of u_top in f32");
    for (temperature, top_k, top_p) in [(1.0, 25, 1.0), (1.0, 0, 1.0), (1.0, 25, 0.999_999)] {
        let cfg = GenerationConfig {
            temperature,
            top_k,
            top_p,
            ..Default::default()
        };
        let (t, lp) = sample_row(&logits, &cfg, &mut TopRng);
        assert!(
            logits[t as usize].is_finite() && lp.is_finite(),
            "T={temperature} k={top_k} p={top_p}: drew masked token {t}"
        );
    }
}

/// Inside `params::no_grad` a trainable model's forward builds no graph (its output descends
/// from no `Var`) and computes the same values; the scope nests, ends with its guard, and
/// `generate` (which opens one) leaves the caller's graph-building as it found it.
#[test]
fn no_grad_forwards_build_no_graph() {
    use rlhf_model::params::no_grad;
    let m = load("llama");
    let ids: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 90).collect();
    let ids = rlhf_model::Tensor::from_vec(ids, (2, 6), &rlhf_model::Device::Cpu).unwrap();
    let mask = vec![vec![1u8; 6]; 2];
    let vals = |t: &rlhf_model::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let tracked = m.logits(&ids, &mask).unwrap();
    assert!(
        tracked.track_op(),
        "the fixture's parameters train: the forward is tracked"
    );
    {
        let _outer = no_grad();
        {
            let _inner = no_grad();
            assert!(!m.logits(&ids, &mask).unwrap().track_op());
        }
        let free = m.logits(&ids, &mask).unwrap();
        assert!(!free.track_op(), "the outer scope still holds");
        assert_eq!(vals(&free), vals(&tracked));
    }
    assert!(m.logits(&ids, &mask).unwrap().track_op());
    let cfg = GenerationConfig {
        max_new_tokens: 3,
        ..Default::default()
    };
    generate(&m, &prompts(), &cfg).unwrap();
    assert!(m.logits(&ids, &mask).unwrap().track_op());
}
