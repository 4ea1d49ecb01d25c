//! Reward model: Bradley–Terry loss and gradient against hand-computed values, a tiny model
//! learning a known preference rule, normalisation, save → load round trip, evaluation with a
//! bootstrap interval, and file:line errors for bad data.

use std::path::{Path, PathBuf};

mod shared_prompts;

use rlhf_data::formats::Prompt;
use rlhf_data::vocab::word_level_tokenizer;
use rlhf_model::{CausalLM, Device, Tensor, Tokenizer, Var};
use rlhf_train::reward::{
    bootstrap_interval, bradley_terry_loss, eval_reward, load_reward_model, log_sigmoid,
    run_reward, score_pairs, EvalRewardOptions, RewardConfig,
};
use rlhf_train::TrainConfig;

const GOOD: &[&str] = &["good", "great", "nice", "happy", "kind"];
const BAD: &[&str] = &["bad", "awful", "sad", "ugly", "mean"];
const NEUTRAL: &[&str] = &[
    "cat", "dog", "tree", "house", "red", "blue", "big", "small", "the", "a",
];
const PROMPT_WORDS: &[&str] = &["tell", "me", "about"];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn vocab() -> Vec<&'static str> {
    [GOOD, BAD, NEUTRAL, PROMPT_WORDS].concat()
}

fn tokenizer() -> Tokenizer {
    word_level_tokenizer(&vocab())
}

fn response(rng: &mut Rng, n: usize) -> String {
    let all = [GOOD, BAD, NEUTRAL].concat();
    (0..n)
        .map(|_| all[rng.below(all.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn n_good(s: &str) -> usize {
    s.split_whitespace().filter(|w| GOOD.contains(w)).count()
}

/// `n` preference records: chosen = the response with more "good" words (ties re-drawn).
fn preference_rows(seed: u64, n: usize) -> Vec<serde_json::Value> {
    let mut rng = Rng(seed);
    let mut out = vec![];
    while out.len() < n {
        let subject = NEUTRAL[rng.below(4)];
        let a = response(&mut rng, 6);
        let b = response(&mut rng, 6);
        if n_good(&a) == n_good(&b) {
            continue;
        }
        let (c, r) = if n_good(&a) > n_good(&b) {
            (a, b)
        } else {
            (b, a)
        };
        out.push(serde_json::json!({
            "prompt": format!("tell me about {subject} "), "chosen": c, "rejected": r
        }));
    }
    out
}

fn write_jsonl(path: &Path, rows: &[serde_json::Value]) {
    let s: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, s).unwrap();
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlhf-reward-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny random-init GPT-2 saved (with the tokenizer) as an HF directory.
fn tiny_model_dir(dir: &Path, seed: u64) -> String {
    let tok = tokenizer();
    let m = CausalLM::random(
        serde_json::json!({"model_type": "gpt2", "vocab_size": tok.vocab_size(), "n_positions": 32,
            "n_embd": 32, "n_layer": 2, "n_head": 2}),
        seed,
    )
    .unwrap();
    let p = dir.join("base");
    m.save(&p, Some(&tok)).unwrap();
    p.to_str().unwrap().to_string()
}

fn close(a: f32, b: f64, tol: f64) -> bool {
    (a as f64 - b).abs() <= tol
}

#[test]
fn bradley_terry_loss_and_gradients_match_hand_computed_values() {
    let rc = Var::new(&[1.0f32, -0.5, 0.0], &Device::Cpu).unwrap();
    let rr = Var::new(&[0.0f32, 0.5, 0.0], &Device::Cpu).unwrap();
    // Without margin: d = [1, −1, 0]; loss = mean log(1 + e^{−d}); ∂/∂r_c = −σ(−d)/3.
    let cases: [(Option<[f32; 3]>, f64, [f64; 3]); 2] = [
        (
            None,
            0.773_223_518_5,
            [-0.089_647_140_5, -0.243_686_192_9, -0.166_666_666_7],
        ),
        // With margins [0.5, 0, 1]: d = [0.5, −1, −1].
        (
            Some([0.5, 0.0, 1.0]),
            1.033_533_453_1,
            [-0.125_846_889_6, -0.243_686_192_9, -0.243_686_192_9],
        ),
    ];
    for (margin, want_loss, want_grad) in cases {
        let m = margin.map(|m| Tensor::new(&m, &Device::Cpu).unwrap());
        let loss = bradley_terry_loss(rc.as_tensor(), rr.as_tensor(), m.as_ref()).unwrap();
        let l = loss.to_scalar::<f32>().unwrap();
        assert!(close(l, want_loss, 1e-5), "loss {l} vs {want_loss}");
        let g = loss.backward().unwrap();
        let gc: Vec<f32> = g.get(rc.as_tensor()).unwrap().to_vec1().unwrap();
        let gr: Vec<f32> = g.get(rr.as_tensor()).unwrap().to_vec1().unwrap();
        for i in 0..3 {
            assert!(close(gc[i], want_grad[i], 1e-6), "∂r_c[{i}] {}", gc[i]);
            assert!(close(gr[i], -want_grad[i], 1e-6), "∂r_r[{i}] {}", gr[i]);
        }
    }
}

#[test]
fn log_sigmoid_is_stable_and_has_the_right_gradient_at_zero() {
    let x = Var::new(&[-200.0f32, -1.0, 0.0, 1.0, 200.0], &Device::Cpu).unwrap();
    let y = log_sigmoid(x.as_tensor()).unwrap();
    let v: Vec<f32> = y.to_vec1().unwrap();
    let want = [
        -200.0,
        -1.313_261_687,
        -std::f64::consts::LN_2,
        -0.313_261_687,
        0.0,
    ];
    for (a, b) in v.iter().zip(want) {
        assert!(close(*a, b, 1e-5), "{a} vs {b}");
    }
    let g: Vec<f32> = y
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(x.as_tensor())
        .unwrap()
        .to_vec1()
        .unwrap();
    // d/dx log σ(x) = σ(−x): 1, 0.731, 0.5 (not 0: the kink at 0 is handled), 0.269, 0.
    let want = [1.0, 0.731_058_578_6, 0.5, 0.268_941_421_4, 0.0];
    for (a, b) in g.iter().zip(want) {
        assert!(close(*a, b, 1e-6), "{a} vs {b}");
    }
}

#[test]
fn tiny_reward_model_learns_the_rule_and_round_trips() {
    let dir = tmp("learn");
    let model = tiny_model_dir(&dir, 11);
    let data = dir.join("train.jsonl");
    let held = dir.join("eval.jsonl");
    write_jsonl(&data, &preference_rows(1, 600));
    write_jsonl(&held, &preference_rows(2, 200));
    let cfg = RewardConfig {
        model,
        data: data.clone(),
        eval_data: Some(held.clone()),
        out: dir.join("rm"),
        max_len: 32,
        train: TrainConfig {
            max_steps: 500,
            batch_size: 16,
            lr: 3e-3,
            warmup_steps: 20,
            weight_decay: 0.0,
            log_every: 100,
            eval_every: 250,
            ..Default::default()
        },
        ..Default::default()
    };
    let rep = run_reward(&cfg, false).unwrap();
    let acc = rep.eval.clone().unwrap();
    eprintln!("held-out: {acc}; offset {}", rep.offset);
    assert!(acc.accuracy > 0.95, "held-out accuracy {acc}");
    assert!(acc.ci_low <= acc.accuracy && acc.accuracy <= acc.ci_high);
    let last = rep.summary.last_eval.as_ref().unwrap();
    for k in ["loss", "accuracy", "margin", "reward_mean", "reward_std"] {
        assert!(last.contains_key(k), "eval metric {k} missing");
    }
    assert!(last["margin"] > 0.0);

    // Load the saved model: same accuracy from the file, identical scores, offset stored.
    let final_dir = rep.summary.final_dir.clone();
    let ev = eval_reward(
        &final_dir,
        &held,
        &EvalRewardOptions {
            max_len: 32,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ev.n, 200);
    assert!((ev.accuracy - acc.accuracy).abs() < 1e-9, "{ev} vs {acc}");
    assert_eq!((ev.ci_low, ev.ci_high), (acc.ci_low, acc.ci_high));
    let (rm, tok) = load_reward_model(&final_dir).unwrap();
    assert_eq!(rm.offset, rep.offset);
    assert!(rep.offset != 0.0);
    let rows: Vec<(Prompt, String)> = preference_rows(3, 20)
        .iter()
        .flat_map(|r| {
            let p = Prompt::Text(r["prompt"].as_str().unwrap().to_string());
            [
                (p.clone(), r["chosen"].as_str().unwrap().to_string()),
                (p, r["rejected"].as_str().unwrap().to_string()),
            ]
        })
        .collect();
    let a = score_pairs(&final_dir, &rows, 32).unwrap();
    let b = score_pairs(&final_dir, &rows, 32).unwrap();
    assert_eq!(a, b);
    // Scores of the loaded model equal the in-memory ones of a second load (bitwise), and
    // chosen outscores rejected on most rows.
    let c = rlhf_train::reward::score_rows(&rm, &tok, &rows, 32, 3).unwrap();
    for (x, y) in a.iter().zip(&c) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y} (batching changes scores)");
    }
    // Rows of one prompt share it in a chunk: the scores of each row alone.
    for (k, (p, r)) in rows.iter().enumerate() {
        let mut ids = rlhf_data::tokenize::tokenize_prompt(&tok, p).unwrap();
        ids.extend(rlhf_data::tokenize::tokenize_response(&tok, p, r).unwrap());
        let alone = rm.score(&[ids], tok.pad_id(), 1).unwrap()[0];
        assert!(
            (c[k] - alone).abs() < 1e-5,
            "row {k}: {} vs {alone} alone",
            c[k]
        );
    }
    let wins = (0..20).filter(|&i| a[2 * i] > a[2 * i + 1]).count();
    assert!(wins >= 18, "{wins}/20");
    // Normalised: the training responses score mean ~0.
    let train_rows: Vec<(Prompt, String)> = preference_rows(1, 600)
        .iter()
        .flat_map(|r| {
            let p = Prompt::Text(r["prompt"].as_str().unwrap().to_string());
            [
                (p.clone(), r["chosen"].as_str().unwrap().to_string()),
                (p, r["rejected"].as_str().unwrap().to_string()),
            ]
        })
        .collect();
    let s = rlhf_train::reward::score_rows(&rm, &tok, &train_rows, 32, 32).unwrap();
    let mean = s.iter().map(|&x| x as f64).sum::<f64>() / s.len() as f64;
    assert!(mean.abs() < 1e-3, "normalised mean {mean}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn lora_reward_model_trains_adapters_and_the_score_head_only() {
    let dir = tmp("lora");
    let model = tiny_model_dir(&dir, 5);
    let data = dir.join("train.jsonl");
    write_jsonl(&data, &preference_rows(4, 40));
    let cfg = RewardConfig {
        model: model.clone(),
        data,
        eval_fraction: 0.2,
        out: dir.join("rm"),
        max_len: 32,
        lora: Some(rlhf_model::LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["c_attn".into()],
        }),
        train: TrainConfig {
            max_steps: 3,
            batch_size: 8,
            lr: 1e-2,
            ..Default::default()
        },
        ..Default::default()
    };
    let rep = run_reward(&cfg, false).unwrap();
    let ck = rlhf_train::checkpoint::latest(&cfg.out).unwrap().unwrap();
    let names: Vec<&String> = ck.weights.keys().collect();
    assert!(names.iter().any(|n| *n == "score.weight"), "{names:?}");
    assert!(names
        .iter()
        .all(|n| *n == "score.weight" || n.contains(".lora_")));
    // The merged model loads as a reward model.
    let (rm, _) = load_reward_model(&rep.summary.final_dir).unwrap();
    assert_eq!(rm.offset, rep.offset);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn run_reward_on_bad_data_names_file_and_line() {
    let dir = tmp("bad");
    let model = tiny_model_dir(&dir, 3);
    let rows = preference_rows(5, 3);
    let cases = [
        (
            serde_json::json!({"prompt": "tell me about cat ", "chosen": "good dog", "rejected": "good dog"}),
            "identical",
        ),
        (
            serde_json::json!({"prompt": "tell me about cat ", "chosen": "good dog", "rejected": "  "}),
            "empty rejected",
        ),
        (
            serde_json::json!({"prompt": "tell me about cat ", "completions": ["good", "bad", "sad"], "ranking": [[0], [1]]}),
            "ranking",
        ),
    ];
    for (bad, what) in cases {
        let data = dir.join("bad.jsonl");
        write_jsonl(
            &data,
            &[rows[0].clone(), rows[1].clone(), bad, rows[2].clone()],
        );
        let cfg = RewardConfig {
            model: model.clone(),
            data: data.clone(),
            out: dir.join("rm"),
            ..Default::default()
        };
        let err = format!("{:#}", run_reward(&cfg, false).unwrap_err());
        assert!(
            err.contains(&format!("{}:3", data.display())),
            "error does not name line 3: {err}"
        );
        assert!(err.contains(what), "{what}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bootstrap_interval_is_seeded_and_sensible() {
    let correct: Vec<bool> = (0..200).map(|i| i % 10 < 7).collect();
    let (lo, hi) = bootstrap_interval(&correct, 1000, 42);
    assert_eq!((lo, hi), bootstrap_interval(&correct, 1000, 42));
    // Binomial standard error sqrt(.7·.3/200) ≈ 0.032: a 95% interval of about ±0.064.
    assert!(lo < 0.7 && hi > 0.7, "{lo}..{hi}");
    assert!(
        (0.62..0.67).contains(&lo) && (0.73..0.78).contains(&hi),
        "{lo}..{hi}"
    );
}

#[test]
fn scoring_in_length_sorted_chunks_keeps_every_rows_score_in_place() {
    // Rows of 1 to 40 tokens: the scoring passes batch them by length, not in their order, and
    // must hand every row its own score, in the order given.
    let tok = tokenizer();
    let m = CausalLM::random(
        serde_json::json!({"model_type": "gpt2", "vocab_size": tok.vocab_size(), "n_positions": 64,
            "n_embd": 32, "n_layer": 2, "n_head": 2}),
        5,
    )
    .unwrap();
    let rm = rlhf_train::reward_model::RewardModel::from_backbone(m, 6).unwrap();
    let mut rng = Rng(9);
    let seqs: Vec<Vec<u32>> = (0..15)
        .map(|i| {
            tok.encode(&response(&mut rng, 1 + (i * 11) % 40), false)
                .unwrap()
        })
        .collect();
    let pad = tok.pad_id();
    let alone: Vec<f32> = seqs
        .iter()
        .map(|s| rm.raw_scores(std::slice::from_ref(s), pad, 1).unwrap()[0])
        .collect();
    let spread = alone.iter().cloned().fold(f32::MIN, f32::max)
        - alone.iter().cloned().fold(f32::MAX, f32::min);
    assert!(
        spread > 1e-3,
        "scores too alike to show the order: {alone:?}"
    );
    for chunk in [2, 4, 15] {
        let s = rm.raw_scores(&seqs, pad, chunk).unwrap();
        for (i, (a, b)) in alone.iter().zip(&s).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "row {i}, chunk {chunk}: {a} alone, {b} batched"
            );
        }
    }
    // Pairs: chosen and rejected of different lengths, scored as rows of similar lengths.
    let pairs: Vec<rlhf_data::tokenize::TokenizedPair> = (0..7)
        .map(|i| rlhf_data::tokenize::TokenizedPair {
            prompt_ids: seqs[i][..1].to_vec(),
            chosen_ids: seqs[i][1..].to_vec(),
            rejected_ids: seqs[14 - i][..].to_vec(),
            margin: None,
            group: i,
        })
        .collect();
    let (rc, rr) = rlhf_train::reward::score_tokenized_pairs(&rm, &tok, &pairs, 3).unwrap();
    for i in 0..7 {
        let rej = [&seqs[i][..1], &seqs[14 - i][..]].concat();
        assert!((rc[i] - alone[i]).abs() < 1e-5, "pair {i} chosen");
        let r = rm.raw_scores(&[rej], pad, 1).unwrap()[0];
        assert!((rr[i] - r).abs() < 1e-5, "pair {i} rejected");
    }
}

#[test]
fn shared_prompt_batches_give_the_losses_and_gradients_of_one_row_per_response() {
    use rlhf_train::reward::RewardObjective;
    use rlhf_train::reward_model::RewardModel;
    use rlhf_train::Objective;
    let tok = tokenizer();
    let pairs = shared_prompts::ranking_and_single_pairs(&tok, &vocab(), |g| Some(0.25 * g as f32));
    // Six prompt groups of different lengths: shorter ones share rows back to back.
    let sb = rlhf_data::batch::collate_shared_pairs(&pairs, tok.pad_id(), 1 << 16).batch;
    assert!(
        sb.groups() == 6 && sb.rows.len() < 6,
        "{} rows",
        sb.rows.len()
    );
    for arch in ["gpt2", "llama"] {
        let cfg = match arch {
            "gpt2" => serde_json::json!({"model_type": "gpt2", "vocab_size": tok.vocab_size(),
                "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}),
            _ => serde_json::json!({"model_type": "llama", "vocab_size": tok.vocab_size(),
                "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64}),
        };
        let rm = RewardModel::from_backbone(CausalLM::random(cfg, 5).unwrap(), 6).unwrap();
        let mut obj = RewardObjective::new(rm, tok.clone(), pairs.clone(), vec![]);
        let items: Vec<usize> = (0..pairs.len()).collect();
        let params = obj.trainable();
        let step = |share| {
            obj.share_prompts = share;
            obj.loss(&items).unwrap()
        };
        let m = shared_prompts::assert_layouts_agree(arch, step, &params);
        assert!(m["accuracy"] > 0.0 && m["accuracy"] < 1.0, "{arch}: {m:?}");
        // The padding report counts the layout that runs: the shared rows' tokens and slots.
        let report = |obj: &mut RewardObjective, share| {
            obj.share_prompts = share;
            obj.batch_tokens(&items, &obj.lengths().unwrap())
        };
        let (single, shared) = (report(&mut obj, false), report(&mut obj, true));
        let real = |p: &rlhf_data::tokenize::TokenizedPair| {
            2 * p.prompt_ids.len() + p.chosen_ids.len() + p.rejected_ids.len()
        };
        assert_eq!(
            single.0,
            pairs.iter().map(real).sum::<usize>(),
            "{arch}: {single:?}"
        );
        assert!(
            shared.0 * 10 < single.0 * 7 && shared.1 < single.1,
            "{arch}: {shared:?} vs {single:?}"
        );
        // Scoring without gradients shares prompts too, with the same numbers.
        let (rc, rr) = rlhf_train::reward::score_tokenized_pairs(&obj.rm, &tok, &pairs, 3).unwrap();
        let alone = |p: &[u32], r: &[u32]| {
            obj.rm
                .raw_scores(&[[p, r].concat()], tok.pad_id(), 1)
                .unwrap()[0]
        };
        // (prompt, response) items (the normalisation set), in chunks of 5 of similar lengths.
        let items: Vec<(Vec<u32>, Vec<u32>)> = pairs
            .iter()
            .flat_map(|p| {
                [&p.chosen_ids, &p.rejected_ids].map(|r| (p.prompt_ids.clone(), r.clone()))
            })
            .collect();
        let scored = obj.rm.raw_response_scores(&items, tok.pad_id(), 5).unwrap();
        // Rows split (a key ratio of 1 gives almost every response its own group of its prompt):
        // the same scores, each read where its response lies.
        let split = rlhf_data::batch::collate_shared(
            items.iter().map(|(p, r)| (&p[..], &r[..])),
            tok.pad_id(),
            1,
        );
        assert!(split.groups() > 8 && split.responses.len() < items.len());
        let split_scores: Vec<f32> = obj.rm.response_scores(&split).unwrap().to_vec1().unwrap();
        for (k, (p, r)) in items.iter().enumerate() {
            let s = split_scores[split.item_response[k]];
            assert!(
                (s - alone(p, r)).abs() < 1e-5,
                "{arch}: item {k} in split rows"
            );
        }
        for (i, p) in pairs.iter().enumerate() {
            let (c, r) = (
                alone(&p.prompt_ids, &p.chosen_ids),
                alone(&p.prompt_ids, &p.rejected_ids),
            );
            assert!((rc[i] - c).abs() < 1e-5, "{arch}: pair {i}");
            assert!((rr[i] - r).abs() < 1e-5, "{arch}: pair {i}");
            assert!((scored[2 * i] - c).abs() < 1e-5, "{arch}: item {}", 2 * i);
            assert!(
                (scored[2 * i + 1] - r).abs() < 1e-5,
                "{arch}: item {}",
                2 * i + 1
            );
        }
    }
}
