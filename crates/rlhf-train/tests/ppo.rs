//! PPO: the N+ sanity checks (ratio exactly 1 and approx-KL 0 on the first minibatch, masked means
//! ignore padding, GAE by hand, recomputed log-probs equal the rollout's, zero KL penalty when
//! policy = reference), learning on a tiny model with a programmatic reward (and staying put
//! under a large β), safe stops on bad states naming the last good checkpoint, exact resume.

use std::cell::Cell;
use std::path::PathBuf;

// Gradient comparison helpers (its pair builders are for the reward and DPO tests).
#[allow(dead_code)]
mod shared_prompts;

use anyhow::Result;
use rlhf_data::vocab::word_level_tokenizer;
use rlhf_model::{
    generate, CausalLM, Device, GenerationConfig, LoraConfig, Tensor, Tokenizer, Var,
};
use rlhf_train::optim::{AdamW, AdamWConfig};
use rlhf_train::ppo::{
    adaptive_kl_update, frozen_copy, gae, masked_mean, policy_forward, response_logprobs, run_ppo,
    whiten_ragged, CriticInit, MbInput, PpoConfig, PpoSummary, PpoTrainer, RewardFn, ValueFunction,
};
use rlhf_train::reward_model::RewardModel;

const WORDS: &[&str] = &[
    "the", "movie", "film", "was", "is", "a", "story", "great", "bad", "good", "boring", "plot",
    "actors", "i", "think", "it", "and", "but", "very", "not", ".", "!",
];

const PROMPTS: &[&str] = &[
    "the movie was",
    "i think the film",
    "the plot is",
    "the actors",
    "it was a",
    "i think it",
    "the story",
    "a film",
];

fn tok() -> Tokenizer {
    word_level_tokenizer(WORDS)
}

fn tiny_gpt2(tok: &Tokenizer, seed: u64) -> CausalLM {
    CausalLM::random(
        serde_json::json!({"model_type": "gpt2", "vocab_size": tok.vocab_size(), "n_positions": 64,
            "n_embd": 32, "n_layer": 2, "n_head": 2}),
        seed,
    )
    .unwrap()
}

fn prompts(tok: &Tokenizer) -> Vec<Vec<u32>> {
    PROMPTS
        .iter()
        .map(|p| tok.encode(p, true).unwrap())
        .collect()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlhf-ppo-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn base_cfg(out: &std::path::Path) -> PpoConfig {
    PpoConfig {
        out: out.to_path_buf(),
        critic: CriticInit::Shared,
        iterations: 3,
        rollout_batch: 8,
        minibatch_size: 4,
        ppo_epochs: 2,
        max_new_tokens: 6,
        temperature: 1.0,
        init_kl_coef: 0.05,
        penalize_no_eos: false,
        lr: 3e-3,
        max_kl: 0.0,
        log_samples: 2,
        seed: 7,
        ..Default::default()
    }
}

/// A trainer over a tiny random GPT-2 (full fine-tuning, frozen copy as reference, shared value
/// head) or with LoRA (reference = adapters disabled).
fn trainer(cfg: PpoConfig, seed: u64, lora: bool) -> PpoTrainer {
    let tok = tok();
    let mut policy = tiny_gpt2(&tok, seed);
    let reference = if lora {
        policy
            .add_lora(
                &LoraConfig {
                    r: 4,
                    alpha: 8.0,
                    dropout: 0.0,
                    target_modules: vec!["c_attn".into(), "c_fc".into()],
                },
                seed,
            )
            .unwrap();
        None
    } else {
        Some(frozen_copy(&policy).unwrap())
    };
    let critic = ValueFunction::shared(32).unwrap();
    let p = prompts(&tok);
    PpoTrainer::new(cfg, policy, reference, critic, tok, p).unwrap()
}

/// Programmatic reward: the fraction of the `max_new` response slots holding `word`.
fn word_reward(tok: &Tokenizer, word: &str, max_new: usize) -> impl RewardFn {
    let id = tok.token_to_id(word).unwrap();
    move |_p: &[Vec<u32>], r: &[Vec<u32>]| {
        Ok(r.iter()
            .map(|x| x.iter().filter(|&&t| t == id).count() as f32 / max_new as f32)
            .collect())
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

// ----------------------------------------------------------------------------------------------
// The N+ sanity list
// ----------------------------------------------------------------------------------------------

#[test]
fn gae_matches_a_hand_computed_example() {
    // γ = 0.9, λ = 0.8: δ2 = 2 + 0 − (−1) = 3; δ1 = 0 + 0.9·(−1) − 1 = −1.9; δ0 = 1 + 0.9·1 − 0.5 = 1.4
    // A2 = 3; A1 = −1.9 + 0.72·3 = 0.26; A0 = 1.4 + 0.72·0.26 = 1.5872; returns = A + V.
    let (a, r) = gae(&[1.0, 0.0, 2.0], &[0.5, 1.0, -1.0], 0.9, 0.8);
    for (x, y) in a.iter().zip([1.5872f32, 0.26, 3.0]) {
        assert!((x - y).abs() < 1e-5, "{a:?}");
    }
    for (x, y) in r.iter().zip([2.0872f32, 1.26, 2.0]) {
        assert!((x - y).abs() < 1e-5, "{r:?}");
    }
    // Defaults γ = 1, λ = 0.95, zero values, score at the end: A_t = 0.95^(T−1−t).
    let (a, _) = gae(&[0.0, 0.0, 1.0], &[0.0, 0.0, 0.0], 1.0, 0.95);
    for (x, y) in a.iter().zip([0.9025f32, 0.95, 1.0]) {
        assert!((x - y).abs() < 1e-6, "{a:?}");
    }
}

#[test]
fn masked_means_and_whitening_ignore_padding() {
    let x = Var::new(
        &[[1.0f32, 2.0, f32::NAN], [3.0, f32::INFINITY, -1e30]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u8, 1, 0], [1, 0, 0]], &Device::Cpu).unwrap();
    let m = masked_mean(x.as_tensor(), &mask).unwrap();
    assert_eq!(m.to_scalar::<f32>().unwrap(), 2.0);
    // Padding gets exactly zero gradient, real positions 1/3.
    let g: Vec<Vec<f32>> = m
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(
        g,
        vec![vec![1.0 / 3.0, 1.0 / 3.0, 0.0], vec![1.0 / 3.0, 0.0, 0.0]]
    );
    // Whitening over ragged rows (response tokens only): mean 0, unbiased std 1.
    let mut rows = vec![vec![1.0f32, 2.0], vec![3.0], vec![4.0, 5.0, 6.0]];
    whiten_ragged(&mut rows);
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let mu = flat.iter().sum::<f32>() / 6.0;
    let var = flat.iter().map(|x| (x - mu).powi(2)).sum::<f32>() / 5.0;
    assert!(mu.abs() < 1e-6 && (var - 1.0).abs() < 1e-4, "{flat:?}");
    // A minibatch's response mask covers exactly the response tokens.
    let mb = MbInput::new(&[&[2, 5, 6], &[2]], &[&[7], &[8, 9, 3]], 0).unwrap();
    let rm: Vec<Vec<u8>> = mb.rmask.to_vec2().unwrap();
    assert_eq!(rm, vec![vec![1, 0, 0], vec![1, 1, 1]]);
    assert_eq!(mb.mask[1], vec![0, 0, 1, 1, 1, 1]);
    assert_eq!(mb.mask[0], vec![1, 1, 1, 1, 0, 0]);
}

#[test]
fn recomputed_logprobs_equal_the_generators() {
    let tok = tok();
    let model = tiny_gpt2(&tok, 3);
    let p = prompts(&tok);
    for t in [1.0, 0.7] {
        let g = generate(
            &model,
            &p,
            &GenerationConfig {
                max_new_tokens: 8,
                temperature: t,
                seed: 11,
                eos_ids: vec![tok.eos_id().unwrap()],
                pad_id: tok.pad_id(),
                ..Default::default()
            },
        )
        .unwrap();
        let lp = response_logprobs(&model, &p, &g.tokens, t, tok.pad_id()).unwrap();
        let mut worst = 0f32;
        for (a, b) in lp.iter().zip(&g.logprobs) {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs());
            }
        }
        assert!(worst < 1e-5, "T={t}: max |Δ log p| = {worst}");
    }
}

#[test]
fn ratio_is_exactly_one_on_the_first_minibatch_and_kl_penalty_zero_when_policy_is_ref() {
    for lora in [false, true] {
        let out = tmp(&format!("sanity-{lora}"));
        let cfg = PpoConfig {
            lr: if lora { 1e-2 } else { 3e-3 },
            ..base_cfg(&out)
        };
        let tok = tok();
        let r = word_reward(&tok, "great", 6);
        let s = trainer(cfg, 5, lora).run(&r, false).unwrap();
        assert_eq!(s.iterations.len(), 3);
        for (i, m) in s.iterations.iter().enumerate() {
            assert_eq!(m["sanity/first_mb_ratio_dev"], 0.0, "lora={lora} it {i}");
            assert_eq!(m["sanity/first_mb_approx_kl"], 0.0, "lora={lora} it {i}");
            assert!(
                m["sanity/gen_logprob_max_diff"] < 1e-5,
                "lora={lora} it {i}: {m:?}"
            );
        }
        // Before any update the policy is the reference: zero KL, zero KL penalty.
        let m0 = &s.iterations[0];
        assert_eq!(m0["kl/ref"], 0.0, "lora={lora}");
        assert_eq!(m0["reward/non_score"], 0.0, "lora={lora}");
        // After updates the policy has moved (the reference did not move with it).
        assert!(s.iterations[2]["kl/ref"].abs() > 0.0, "lora={lora}");
        assert!(s.iterations[1]["policy/approx_kl"] > 0.0);
        // Everything a run promises to write.
        assert!(out.join("samples.jsonl").exists());
        assert_eq!(
            rlhf_train::metrics::read_metrics(&out.join("metrics.jsonl"))
                .unwrap()
                .len(),
            3
        );
        assert!(s.final_dir.join("model.safetensors").exists());
        std::fs::remove_dir_all(&out).ok();
    }
}

#[test]
fn grouped_minibatches_pad_less_keep_the_first_ratio_exact_and_learn() {
    let run = |grouped: bool, tag: &str| {
        let out = tmp(tag);
        let cfg = PpoConfig {
            iterations: 12,
            rollout_batch: 16,
            minibatch_size: 4,
            ppo_epochs: 2,
            group_by_length: grouped,
            ..base_cfg(&out)
        };
        // Prompts of 1 to 16 tokens, so that minibatches can differ in width.
        let tok = tok();
        let long: Vec<u32> = prompts(&tok).concat();
        let p: Vec<Vec<u32>> = (0..16).map(|i| long[..1 + (i * 7) % 16].to_vec()).collect();
        let policy = tiny_gpt2(&tok, 21);
        let reference = Some(frozen_copy(&policy).unwrap());
        let critic = ValueFunction::shared(32).unwrap();
        let r = word_reward(&tok, "great", 6);
        let mut t = PpoTrainer::new(cfg, policy, reference, critic, tok, p).unwrap();
        let s = t.run(&r, false).unwrap();
        std::fs::remove_dir_all(&out).ok();
        s
    };
    let (random, grouped) = (run(false, "mb-random"), run(true, "mb-grouped"));
    let share = |s: &PpoSummary| mean(&s.series("batch/real_tokens"));
    eprintln!(
        "real tokens: random {:.3}, grouped {:.3}",
        share(&random),
        share(&grouped)
    );
    assert!(share(&grouped) > share(&random) + 0.05);
    for m in &grouped.iterations {
        // The rollout's forwards ran in epoch 0's (grouped) minibatches: the same bits.
        assert_eq!(m["sanity/first_mb_ratio_dev"], 0.0);
        assert!(m["batch/real_tokens"] > 0.0 && m["batch/real_tokens"] <= 1.0);
    }
    let score = grouped.series("score/mean");
    let (first, last) = (mean(&score[..3]), mean(&score[score.len() - 4..]));
    assert!(last > first + 0.15, "grouped: score {first:.3} → {last:.3}");
}

#[test]
fn adaptive_kl_controller_follows_ziegler() {
    // KL above target: error clipped to +0.2; β grows by 0.2·n/horizon.
    let b = adaptive_kl_update(0.1, 12.0, 6.0, 10_000.0, 64);
    assert!((b - 0.1 * (1.0 + 0.2 * 64.0 / 10_000.0)).abs() < 1e-15);
    // Below target: shrinks proportionally.
    let b = adaptive_kl_update(0.1, 5.4, 6.0, 1_000.0, 100);
    assert!((b - 0.1 * (1.0 - 0.1 * 0.1)).abs() < 1e-12);
}

// ----------------------------------------------------------------------------------------------
// Learning
// ----------------------------------------------------------------------------------------------

fn learn(beta: f64, out: &std::path::Path) -> PpoSummary {
    let cfg = PpoConfig {
        iterations: 25,
        rollout_batch: 16,
        minibatch_size: 8,
        ppo_epochs: 4,
        max_new_tokens: 6,
        init_kl_coef: beta,
        lr: 3e-3,
        log_samples: 0,
        ..base_cfg(out)
    };
    let tok = tok();
    let r = word_reward(&tok, "great", 6);
    trainer(cfg, 21, false).run(&r, false).unwrap()
}

#[test]
fn reward_rises_with_bounded_kl_and_a_large_beta_keeps_the_policy_at_the_reference() {
    let out = tmp("learn");
    let s = learn(0.05, &out);
    let score = s.series("score/mean");
    let kl = s.series("kl/ref");
    let kl_small = kl.clone();
    // The second half of the run against its first three iterations (at this learning rate
    // the score can peak and partly fall back as the KL penalty pulls; the last few
    // iterations alone are a noisy measure of whether it learned).
    let (first, last) = (mean(&score[..3]), mean(&score[score.len() / 2..]));
    eprintln!("β 0.05: score {first:.3} → {last:.3} (second half), KL {kl:?}");
    assert!(last > first + 0.25, "score {first:.3} → {last:.3}");
    assert!(kl.iter().all(|k| k.is_finite() && *k < 15.0), "KL {kl:?}");
    std::fs::remove_dir_all(&out).ok();

    let out = tmp("learn-bigbeta");
    let s = learn(20.0, &out);
    let score = s.series("score/mean");
    let kl = s.series("kl/ref");
    let (first2, last2) = (mean(&score[..3]), mean(&score[score.len() - 3..]));
    eprintln!("β 20: score {first2:.3} → {last2:.3}, KL {kl:?}");
    let small_beta_kl = mean(&kl_small[kl_small.len() - 5..]);
    let big_beta_kl = mean(&kl[kl.len() - 5..]);
    assert!(
        big_beta_kl < 0.5 && big_beta_kl < small_beta_kl / 10.0,
        "KL {big_beta_kl} (β 20) vs {small_beta_kl} (β 0.05)"
    );
    assert!(last2 < first2 + 0.1, "score {first2:.3} → {last2:.3}");
    std::fs::remove_dir_all(&out).ok();
}

// ----------------------------------------------------------------------------------------------
// Bad states
// ----------------------------------------------------------------------------------------------

fn trainable_values(t: &PpoTrainer) -> Vec<Vec<f32>> {
    t.policy
        .params
        .trainable()
        .iter()
        .map(|p| {
            p.var()
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

#[test]
fn nan_reward_stops_before_updating_and_names_the_last_good_checkpoint() {
    let out = tmp("nan");
    let cfg = PpoConfig {
        iterations: 6,
        save_every: 1,
        keep_last: 0,
        ..base_cfg(&out)
    };
    let tok = tok();
    let good = word_reward(&tok, "great", 6);
    let calls = Cell::new(0usize);
    let r = |p: &[Vec<u32>], x: &[Vec<u32>]| -> Result<Vec<f32>> {
        calls.set(calls.get() + 1);
        let mut v = good.score(p, x)?;
        if calls.get() == 3 {
            v[1] = f32::NAN;
        }
        Ok(v)
    };
    let mut t = trainer(cfg, 5, false);
    let err = t.run(&r, false).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(
        err.contains("iteration 3") && err.contains("not finite"),
        "{err}"
    );
    let ck = out.join("checkpoints").join("step-00000002");
    assert!(err.contains(&ck.display().to_string()), "{err}");
    // No update from the bad batch: the weights in memory are those of the named checkpoint.
    let saved = rlhf_train::checkpoint::load(&ck).unwrap();
    for (p, now) in t.policy.params.trainable().iter().zip(trainable_values(&t)) {
        let w: Vec<f32> = saved.weights[&format!("policy.{}", p.name())]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(w, now, "{}", p.name());
    }
    let lines = rlhf_train::metrics::read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.len(), 2);
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn exploding_kl_stops_at_max_kl_naming_a_checkpoint_from_before_it() {
    let out = tmp("klboom");
    let cfg = PpoConfig {
        iterations: 40,
        save_every: 1,
        keep_last: 0,
        init_kl_coef: 0.0,
        lr: 1e-2,
        ppo_epochs: 4,
        max_kl: 3.0,
        ..base_cfg(&out)
    };
    let tok = tok();
    let r = word_reward(&tok, "great", 6);
    let err = trainer(cfg, 5, false)
        .run(&r, false)
        .unwrap_err()
        .to_string();
    eprintln!("{err}");
    assert!(err.contains("KL to the reference exploded"), "{err}");
    let it: usize = err
        .split("stopping at iteration ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    let named: usize = err
        .split("step-")
        .nth(1)
        .and_then(|s| s.get(..8))
        .and_then(|s| s.parse().ok())
        .unwrap();
    // Iteration `it` (1-based) rolled out with the policy of checkpoint step-(it−1): the last
    // good one is older.
    assert!(
        it >= 2 && named <= it - 2,
        "iteration {it}, named step {named}: {err}"
    );
    std::fs::remove_dir_all(&out).ok();
}

/// Packed minibatches (sequences back to back in rows, each its own segment) give the
/// log-probs, values and gradients of the left/right-padded layout, from fewer slots; with an
/// empty response among them, and a separate critic that runs its own forward.
#[test]
fn packed_minibatches_give_the_padded_layouts_logprobs_values_and_gradients() {
    let tok = tok();
    let long: Vec<u32> = prompts(&tok).concat();
    assert!(long.len() >= 24);
    let p: Vec<Vec<u32>> = (0..9).map(|i| long[..1 + (i * 7) % 16].to_vec()).collect();
    let r: Vec<Vec<u32>> = (0..9)
        .map(|i| long[(i * 3) % 10..(i * 3) % 10 + (i * 5) % 13].to_vec())
        .collect();
    assert!(r[0].is_empty());
    let pr: Vec<&[u32]> = p.iter().map(|x| x.as_slice()).collect();
    let rr: Vec<&[u32]> = r.iter().map(|x| x.as_slice()).collect();
    let policy = tiny_gpt2(&tok, 5);
    let critic = ValueFunction::separate(tiny_gpt2(&tok, 6)).unwrap();
    let mut params = policy.params.trainable();
    params.extend(critic.trainable());
    let run = |mb: &MbInput| {
        let (h, lp, _) = policy_forward(&policy, mb, 0.7).unwrap();
        let v = critic.values(mb, &h).unwrap();
        let m = mb.rmask.to_dtype(rlhf_model::DType::F32).unwrap();
        // A loss that weighs every response position differently.
        let w: Vec<f32> = (0..mb.n() * mb.tr)
            .map(|k| 1.0 + (k % 7) as f32 / 7.0)
            .collect();
        let w = Tensor::from_vec(w, (mb.n(), mb.tr), &Device::Cpu).unwrap();
        let lm = (&m * &w).unwrap();
        let loss = ((lp.clone() * &lm).unwrap().sum_all().unwrap()
            + (v.sqr().unwrap() * &lm).unwrap().sum_all().unwrap())
        .unwrap();
        let g = shared_prompts::grads_of(&loss, &params);
        (mb.rows(&lp).unwrap(), mb.rows(&v).unwrap(), g)
    };
    let padded = MbInput::new(&pr, &rr, tok.pad_id()).unwrap();
    let packed = MbInput::packed(&pr, &rr, tok.pad_id()).unwrap();
    let real: usize = (0..9).map(|i| p[i].len() + r[i].len()).sum();
    eprintln!(
        "slots: padded {}, packed {}, real {real}",
        padded.slots(),
        packed.slots()
    );
    assert!(packed.slots() * 10 < padded.slots() * 8);
    let (lp0, v0, g0) = run(&padded);
    let (lp1, v1, g1) = run(&packed);
    for i in 0..9 {
        assert_eq!(lp1[i].len(), r[i].len());
        for (a, b) in lp0[i].iter().zip(&lp1[i]).chain(v0[i].iter().zip(&v1[i])) {
            assert!(
                (a - b).abs() < 1e-5 * (1.0 + a.abs()),
                "sequence {i}: {a} vs {b}"
            );
        }
    }
    shared_prompts::assert_same_gradients("packed", &g1, &g0);
    // Only empty prompts are refused.
    assert!(MbInput::packed(&[&[]], &[&[3]], 0).is_err());
}

/// `policy_forward` runs the LM head on the real response tokens only, with the entropy fused
/// in: its log-probs, entropies and gradients (an entropy bonus included) equal those composed
/// from the full `[n·tr × V]` logits, and response padding reads 0.
#[test]
fn policy_forward_matches_logits_composed_over_every_slot() {
    let tok = tok();
    let p = prompts(&tok);
    let r: Vec<Vec<u32>> = (0..p.len())
        .map(|i| p[(i + 1) % p.len()][..i % 5].to_vec())
        .collect();
    assert!(r[0].is_empty() && r.iter().any(|x| x.len() >= 3));
    let pr: Vec<&[u32]> = p.iter().map(|x| x.as_slice()).collect();
    let rr: Vec<&[u32]> = r.iter().map(|x| x.as_slice()).collect();
    let policy = tiny_gpt2(&tok, 7);
    let params = policy.params.trainable();
    let t = 0.7;
    for mb in [
        MbInput::new(&pr, &rr, tok.pad_id()).unwrap(),
        MbInput::packed(&pr, &rr, tok.pad_id()).unwrap(),
    ] {
        let (n, tr) = (mb.n(), mb.tr);
        let m = mb.rmask.to_dtype(rlhf_model::DType::F32).unwrap();
        let w = |k0: usize| {
            let w: Vec<f32> = (0..n * tr)
                .map(|k| 1.0 + ((k + k0) % 5) as f32 / 5.0)
                .collect();
            (Tensor::from_vec(w, (n, tr), &Device::Cpu).unwrap() * &m).unwrap()
        };
        let (w1, w2) = (w(0), w(3));
        let loss = |lp: &Tensor, ent: &Tensor| {
            ((lp * &w1).unwrap().sum_all().unwrap() + (ent * &w2).unwrap().sum_all().unwrap())
                .unwrap()
        };
        let (h, lp, ent) = policy_forward(&policy, &mb, t).unwrap();
        let g = shared_prompts::grads_of(&loss(&lp, &ent), &params);
        // Composed: logits / T at every [n, tr] slot, response padding included.
        let targets: Vec<u32> = r
            .iter()
            .flat_map(|x| {
                x.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, tr - x.len()))
            })
            .collect();
        let targets = Tensor::from_vec(targets, n * tr, &Device::Cpu).unwrap();
        let hc = h.reshape((n * tr, ())).unwrap();
        let logits = (policy.lm_logits(&hc).unwrap() / t).unwrap();
        let lpc = rlhf_model::ops::token_logprobs(&logits, &targets)
            .unwrap()
            .reshape((n, tr))
            .unwrap();
        let entc = rlhf_model::ops::entropy(&logits)
            .unwrap()
            .reshape((n, tr))
            .unwrap();
        let gc = shared_prompts::grads_of(&loss(&lpc, &entc), &params);
        for (a, b) in [(&lp, &lpc), (&ent, &entc)] {
            let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
                (a.to_vec2().unwrap(), b.to_vec2().unwrap());
            for i in 0..n {
                for j in 0..tr {
                    if j < r[i].len() {
                        assert!((a[i][j] - b[i][j]).abs() < 1e-5 * (1.0 + b[i][j].abs()));
                    } else {
                        assert_eq!(a[i][j], 0.0, "padding slot {i},{j}");
                    }
                }
            }
        }
        shared_prompts::assert_same_gradients("fused head", &g, &gc);
    }
}

#[test]
fn empty_generations_stop_with_a_clear_message() {
    let tok = tok();
    let eos = tok.eos_id().unwrap();
    let policy = tiny_gpt2(&tok, 9);
    // Teach the model to answer every prompt with EOS at once.
    let p = prompts(&tok);
    let pr: Vec<&[u32]> = p.iter().map(|x| x.as_slice()).collect();
    let resp: Vec<Vec<u32>> = vec![vec![eos]; p.len()];
    let rr: Vec<&[u32]> = resp.iter().map(|x| x.as_slice()).collect();
    let mb = MbInput::new(&pr, &rr, tok.pad_id()).unwrap();
    let mut opt = AdamW::new(policy.params.trainable(), AdamWConfig::default()).unwrap();
    for _ in 0..60 {
        let (_, lp, _) = policy_forward(&policy, &mb, 1.0).unwrap();
        let loss = lp.mean_all().unwrap().neg().unwrap();
        let g = loss.backward().unwrap();
        let grads: Vec<Option<Tensor>> = opt
            .params()
            .iter()
            .map(|p| g.get(p.var().as_tensor()).cloned())
            .collect();
        opt.step(&grads, 1e-2).unwrap();
    }
    let out = tmp("empty");
    let reference = Some(frozen_copy(&policy).unwrap());
    let mut t = PpoTrainer::new(
        PpoConfig {
            temperature: 0.5,
            ..base_cfg(&out)
        },
        policy,
        reference,
        ValueFunction::shared(32).unwrap(),
        tok.clone(),
        p,
    )
    .unwrap();
    let r = word_reward(&tok, "great", 6);
    let err = t.run(&r, false).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(
        err.contains("empty generation") && err.contains("iteration 1"),
        "{err}"
    );
    assert!(err.contains("Last good checkpoint: none"), "{err}");
    std::fs::remove_dir_all(&out).ok();
}

// ----------------------------------------------------------------------------------------------
// Resume
// ----------------------------------------------------------------------------------------------

fn deterministic(m: &rlhf_train::metrics::Scalars) -> Vec<(String, u64)> {
    m.iter()
        .filter(|(k, _)| !k.starts_with("time/") && !k.starts_with("perf/"))
        .map(|(k, v)| (k.clone(), v.to_bits()))
        .collect()
}

#[test]
fn resume_reproduces_the_uninterrupted_run_exactly() {
    for (lora, critic) in [(false, "shared"), (true, "separate")] {
        let make = |out: &std::path::Path| {
            let cfg = PpoConfig {
                iterations: 4,
                save_every: 1,
                adaptive_kl: true,
                target_kl: 0.5,
                kl_horizon: 100.0,
                ..base_cfg(out)
            };
            let mut t = trainer(cfg, 13, lora);
            if critic == "separate" {
                let tk = tok();
                t.critic = ValueFunction::separate(tiny_gpt2(&tk, 77)).unwrap();
            }
            t
        };
        let tok = tok();
        let r = word_reward(&tok, "great", 6);
        let full_dir = tmp(&format!("resume-full-{lora}"));
        let full = make(&full_dir).run(&r, false).unwrap();
        let part_dir = tmp(&format!("resume-part-{lora}"));
        let mut first = make(&part_dir);
        first.stop_after = Some(2);
        let a = first.run(&r, false).unwrap();
        assert_eq!(a.iterations.len(), 2);
        // A fresh process: new models from the same seeds, state from the checkpoint.
        let b = make(&part_dir).run(&r, true).unwrap();
        assert_eq!(b.iterations.len(), 2);
        let resumed: Vec<_> = a
            .iterations
            .iter()
            .chain(&b.iterations)
            .map(deterministic)
            .collect();
        let straight: Vec<_> = full.iterations.iter().map(deterministic).collect();
        assert_eq!(resumed, straight, "lora={lora} critic={critic}");
        // β moved (adaptive) and was restored.
        assert_ne!(b.iterations[1]["kl/beta"], 0.05);
        std::fs::remove_dir_all(&full_dir).ok();
        std::fs::remove_dir_all(&part_dir).ok();
    }
}

/// `gradient_checkpointing`: PPO's update recomputes the policy's and the critic's block
/// activations, and every iteration's numbers stay the same to the bit.
#[test]
fn gradient_checkpointing_leaves_every_iteration_unchanged() {
    use rlhf_model::kernels::block::blocks_recomputed;
    for (lora, critic) in [(false, "shared"), (true, "separate")] {
        let run = |recompute: bool| {
            let out = tmp(&format!("recompute-{lora}-{recompute}"));
            let cfg = PpoConfig {
                iterations: 2,
                gradient_checkpointing: recompute.into(),
                ..base_cfg(&out)
            };
            let mut t = trainer(cfg, 13, lora);
            if critic == "separate" {
                t.critic = ValueFunction::separate(tiny_gpt2(&tok(), 77)).unwrap();
            }
            let before = blocks_recomputed();
            let s = t.run(&word_reward(&tok(), "great", 6), false).unwrap();
            std::fs::remove_dir_all(&out).ok();
            let its: Vec<_> = s.iterations.iter().map(deterministic).collect();
            (its, blocks_recomputed() - before)
        };
        let (a, ra) = run(false);
        let (b, rb) = run(true);
        assert_eq!(ra, 0);
        assert!(rb > 0, "lora={lora}: no block was rebuilt");
        assert_eq!(a, b, "lora={lora} critic={critic}");
    }
}

// ----------------------------------------------------------------------------------------------
// From a config file, with a reward model as reward and critic initialisation
// ----------------------------------------------------------------------------------------------

#[test]
fn run_ppo_from_toml_with_a_reward_model_critic() {
    let root = tmp("from-config");
    let tok = tok();
    let policy_dir = root.join("sft");
    tiny_gpt2(&tok, 1).save(&policy_dir, Some(&tok)).unwrap();
    let rm_dir = root.join("rm");
    let rm = RewardModel::from_backbone(tiny_gpt2(&tok, 2), 3).unwrap();
    rm.save(&rm_dir, Some(&tok)).unwrap();
    let prompts_path = root.join("prompts.jsonl");
    let rows: Vec<String> = PROMPTS
        .iter()
        .map(|p| serde_json::json!({ "prompt": p }).to_string())
        .collect();
    std::fs::write(&prompts_path, rows.join("\n")).unwrap();
    let text = format!(
        "policy = {:?}\nreward_model = {:?}\nprompts = {:?}\nout = {:?}\ncritic = \"reward_model\"\n\
         iterations = 2\nrollout_batch = 4\nminibatch_size = 2\nppo_epochs = 1\nmax_new_tokens = 4\nlr = 1e-3\n",
        policy_dir.display().to_string(),
        rm_dir.display().to_string(),
        prompts_path.display().to_string(),
        root.join("out").display().to_string(),
    );
    let cfg: PpoConfig = toml::from_str(&text).unwrap();
    assert!(toml::from_str::<PpoConfig>(&format!("{text}\nbogus = 1\n")).is_err());
    let (rm, _) = RewardModel::load(&rm_dir).unwrap();
    let s = run_ppo(&cfg, &rm as &dyn RewardFn, false).unwrap();
    assert_eq!(s.iterations.len(), 2);
    let m0 = &s.iterations[0];
    assert_eq!(m0["kl/ref"], 0.0);
    // The critic starts as the reward model: its values are RM scores of prefixes, not zeros.
    assert!(m0["value/mean"].abs() > 0.0, "{m0:?}");
    // The config written next to the run parses back.
    let back: PpoConfig =
        toml::from_str(&std::fs::read_to_string(root.join("out/config.toml")).unwrap()).unwrap();
    assert_eq!(back, cfg);
    // A config naming a reward-model critic without a reward model is refused clearly.
    let bad = PpoConfig {
        reward_model: None,
        ..cfg
    };
    let e = run_ppo(&bad, &rm as &dyn RewardFn, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("reward_model"), "{e}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn critic_warmup_iterations_leave_the_policy_unchanged() {
    let out = tmp("critic-warmup");
    let cfg = PpoConfig {
        iterations: 2,
        critic_warmup_iterations: 1,
        ..base_cfg(&out)
    };
    let tok = tok();
    let r = word_reward(&tok, "great", 6);
    let values = |ps: Vec<rlhf_model::params::Param>| -> Vec<Vec<f32>> {
        ps.iter()
            .map(|p| {
                p.var()
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    };
    let mut t = trainer(cfg, 5, false);
    let (p0, c0) = (trainable_values(&t), values(t.critic.trainable()));
    t.stop_after = Some(1);
    t.run(&r, false).unwrap();
    assert_eq!(
        trainable_values(&t),
        p0,
        "the policy moved during critic warmup"
    );
    assert_ne!(values(t.critic.trainable()), c0, "the critic did not train");
    // The next iteration updates the policy.
    t.stop_after = None;
    t.run(&r, true).unwrap();
    assert_ne!(trainable_values(&t), p0);
    std::fs::remove_dir_all(&out).ok();
}
