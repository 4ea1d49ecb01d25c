//! SFT and the training loop: memorisation, prompt tokens get no loss, exact resume, and a
//! checkpoint killed mid-write leaves the previous one loadable.

use std::path::PathBuf;

use rlhf_data::formats::SftExample;
use rlhf_data::tokenize::TokenizedSft;
use rlhf_data::tokenize::{tokenize_sft, SftTokenizeConfig};
use rlhf_data::vocab::word_level_tokenizer;
use rlhf_model::{generate, CausalLM, Device, GenerationConfig, Tensor, Tokenizer};
use rlhf_train::sft::{loss_slots, padding_free_rows, sft_loss, SftObjective};
use rlhf_train::{checkpoint, TrainConfig, Trainer};

const WORDS: &[&str] = &[
    "what", "is", "the", "capital", "of", "france", "paris", "spain", "madrid", "italy", "rome",
    "color", "sky", "blue", "grass", "green", "?", ".",
];

fn examples() -> Vec<SftExample> {
    [
        ("what is the capital of france ?", "paris ."),
        ("what is the capital of spain ?", "madrid ."),
        ("what is the capital of italy ?", "rome ."),
        ("what is the color of the sky ?", "blue ."),
        ("what is the color of the grass ?", "green ."),
    ]
    .iter()
    .map(|(p, c)| SftExample::PromptCompletion {
        prompt: format!("{p} "),
        completion: c.to_string(),
    })
    .collect()
}

fn tiny_gpt2(tok: &Tokenizer, seed: u64) -> CausalLM {
    CausalLM::random(
        serde_json::json!({"model_type": "gpt2", "vocab_size": tok.vocab_size(), "n_positions": 32,
            "n_embd": 32, "n_layer": 2, "n_head": 2}),
        seed,
    )
    .unwrap()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlhf-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn objective(seed: u64) -> SftObjective {
    objective_on(&examples(), seed)
}

fn objective_on(examples: &[SftExample], seed: u64) -> SftObjective {
    let tok = word_level_tokenizer(WORDS);
    let (train, _) = tokenize_sft(&tok, examples, &SftTokenizeConfig::default()).unwrap();
    SftObjective {
        model: tiny_gpt2(&tok, seed),
        tokenizer: tok,
        train,
        eval: vec![],
        eval_batch: 4,
        token_norm: None,
        padding_free: true,
    }
}

#[test]
fn tiny_model_memorises_and_generates_the_answers() {
    let mut obj = objective(1);
    let out = tmp("overfit");
    let cfg = TrainConfig {
        max_steps: 150,
        batch_size: 5,
        lr: 3e-3,
        warmup_steps: 10,
        min_lr_ratio: 0.1,
        log_every: 50,
        ..Default::default()
    };
    let s = Trainer::new(cfg, &out).run(&mut obj, false).unwrap();
    let last = s.losses.last().unwrap().1;
    assert!(last < 0.05, "final loss {last}");
    assert!(s.losses[0].1 > 1.0);
    // It now answers each prompt with its completion.
    let tok = &obj.tokenizer;
    for ex in examples() {
        let SftExample::PromptCompletion { prompt, completion } = ex else {
            unreachable!()
        };
        let ids = tok.encode(&prompt, true).unwrap();
        let g = generate(
            &obj.model,
            &[ids],
            &GenerationConfig {
                max_new_tokens: 4,
                temperature: 0.0,
                eos_ids: vec![tok.eos_id().unwrap()],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            tok.decode(&g.tokens[0], true).unwrap().trim(),
            completion,
            "{prompt}"
        );
    }
    // The final model was written in HF layout and loads back.
    let back = rlhf_model::load::load(s.final_dir.to_str().unwrap()).unwrap();
    assert!(back.tokenizer.is_some());
    std::fs::remove_dir_all(&out).ok();
}

/// `sft_loss` (the LM head on loss positions only, fused), in the padded layout and
/// padding-free, equals the masked mean over the logits of every position of the padded batch,
/// in value and in every parameter's gradient; prompt and padding positions carry no loss.
#[test]
fn sft_loss_is_the_masked_mean_over_every_positions_logits() {
    let obj = mixed_objective(2);
    // The longest example and the three shortest: padding-free puts the short ones in one row.
    let mut order: Vec<usize> = (0..obj.train.len()).collect();
    order.sort_by_key(|&i| obj.train[i].len());
    let pick = [order[order.len() - 1], order[0], order[1], order[2]];
    let rows: Vec<&TokenizedSft> = pick.iter().map(|&i| &obj.train[i]).collect();
    let flat = padding_free_rows(&rows).expect("fewer rows padding-free");
    assert_eq!(flat.len(), 2);
    let pad = obj.tokenizer.pad_id();
    let params = obj.model.params.trainable();
    let grads = |loss: &Tensor| {
        let g = loss.backward().unwrap();
        params
            .iter()
            .map(|p| vals(g.get(p.var().as_tensor()).unwrap()))
            .collect::<Vec<_>>()
    };
    // Composed: logits at every position, −log p(next token) where the next token is a loss
    // token, mean over those.
    let b = rlhf_data::batch::collate_sft(rows.iter().copied(), pad);
    let (n, t) = (b.batch, b.seq_len);
    let ids = Tensor::from_vec(b.input_ids.clone(), (n, t), &Device::Cpu).unwrap();
    let mask: Vec<Vec<u8>> = b.attention_mask.chunks(t).map(|c| c.to_vec()).collect();
    let h = obj
        .model
        .hidden(&ids, &mask)
        .unwrap()
        .narrow(1, 0, t - 1)
        .unwrap();
    let logits = obj
        .model
        .lm_logits(&h.reshape((n * (t - 1), 32)).unwrap())
        .unwrap();
    let targets = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let lm: Vec<f32> = b
        .loss_mask
        .chunks(t)
        .flat_map(|r| r[1..].iter().map(|&x| x as f32).collect::<Vec<_>>())
        .collect();
    let scored: f32 = lm.iter().sum();
    assert!(
        scored >= 4.0 && scored < lm.len() as f32 / 2.0,
        "{scored}/{}",
        lm.len()
    );
    let lp = rlhf_model::ops::token_logprobs(&logits, &targets).unwrap();
    let m = Tensor::from_vec(lm.clone(), lp.shape(), &Device::Cpu).unwrap();
    let want = ((lp * m).unwrap().sum_all().unwrap().neg().unwrap() / scored as f64).unwrap();
    let exp = want.to_scalar::<f32>().unwrap();
    let gw = grads(&want);
    for padding_free in [false, true] {
        let (loss, real) = sft_loss(&obj.model, &rows, pad, padding_free).unwrap();
        assert_eq!(real, rows.iter().map(|r| r.len()).sum::<usize>());
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got - exp).abs() < 1e-5 * exp.abs(),
            "{padding_free}: loss {got} vs {exp}"
        );
        for (i, (x, y)) in grads(&loss).iter().zip(&gw).enumerate() {
            let top = y.iter().fold(0f32, |s, v| s.max(v.abs()));
            let e = x.iter().zip(y).fold(0f32, |s, (p, q)| s.max((p - q).abs()));
            assert!(
                e <= 1e-4 * top + 1e-7,
                "{padding_free}: parameter {i}: {e} of {top}"
            );
        }
    }
    // The slots that go through the head are the mask's, and each one's target is the next id.
    let (slots, tg) = loss_slots(&b.input_ids, &b.loss_mask, t);
    assert_eq!(slots.len() as f32, scored);
    for (&s, &y) in slots.iter().zip(&tg) {
        let (r, j) = (s as usize / t, s as usize % t);
        assert!(j < t - 1 && lm[r * (t - 1) + j] == 1.0 && b.input_ids[s as usize + 1] == y);
    }
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn weights(obj: &SftObjective) -> Vec<Vec<f32>> {
    obj.model
        .params
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
fn resume_reproduces_the_uninterrupted_run_exactly() {
    resume_case("resume", objective);
}

/// The same with LoRA adapters and dropout 0.3: the masks of a resumed run are the same too.
#[test]
fn resume_with_lora_dropout_reproduces_the_uninterrupted_run_exactly() {
    let lora = |dropout: f64| {
        move |seed| {
            let mut o = objective(seed);
            o.model
                .add_lora(
                    &rlhf_model::LoraConfig {
                        r: 4,
                        alpha: 8.0,
                        dropout,
                        target_modules: vec!["c_attn".into(), "c_fc".into()],
                    },
                    seed,
                )
                .unwrap();
            o
        }
    };
    resume_case("resume-lora", lora(0.3));
    // Dropout is really on while training: the same run without it follows another curve.
    let cfg = TrainConfig {
        max_steps: 4,
        batch_size: 2,
        lr: 2e-3,
        log_every: 1,
        ..Default::default()
    };
    let curve = |dropout: f64, tag: &str| {
        let d = tmp(tag);
        let s = Trainer::new(cfg.clone(), &d)
            .run(&mut lora(dropout)(3), false)
            .unwrap();
        std::fs::remove_dir_all(&d).ok();
        s.losses
    };
    let (with, without) = (curve(0.3, "dropout-on"), curve(0.0, "dropout-off"));
    assert_eq!(
        with[0], without[0],
        "B = 0 at step 1: masks cannot matter yet"
    );
    assert_ne!(with, without, "dropout changed nothing while training");
}

/// `train.gradient_checkpointing`: the same run, step for step, to the bit (full fine-tuning
/// and LoRA with dropout, two micro-batches per step), with every block, or the first only,
/// rebuilding its activations in every backward.
#[test]
fn gradient_checkpointing_trains_exactly_as_without() {
    use rlhf_model::kernels::block::blocks_recomputed;
    use rlhf_train::memory::Checkpointing;
    for lora in [false, true] {
        let run = |recompute: Checkpointing| {
            let mut o = objective(5);
            if lora {
                o.model
                    .add_lora(
                        &rlhf_model::LoraConfig {
                            r: 4,
                            alpha: 8.0,
                            dropout: 0.2,
                            target_modules: vec!["c_attn".into(), "c_fc".into()],
                        },
                        5,
                    )
                    .unwrap();
            }
            let cfg = TrainConfig {
                max_steps: 3,
                batch_size: 2,
                grad_accum: 2,
                lr: 2e-3,
                log_every: 1,
                gradient_checkpointing: recompute,
                ..Default::default()
            };
            let d = tmp(&format!("recompute-{lora}-{recompute:?}"));
            let before = blocks_recomputed();
            let s = Trainer::new(cfg, &d).run(&mut o, false).unwrap();
            let rebuilt = blocks_recomputed() - before;
            std::fs::remove_dir_all(&d).ok();
            (s.losses, weights(&o), rebuilt, o.model.num_layers())
        };
        let (l0, w0, r0, layers) = run(Checkpointing::Off);
        assert_eq!(r0, 0);
        assert!(layers >= 2);
        for (setting, rebuilt) in [(Checkpointing::All, layers), (Checkpointing::Layers(1), 1)] {
            let (l1, w1, r1, _) = run(setting);
            assert_eq!(
                r1,
                3 * 2 * rebuilt,
                "lora {lora}, {setting:?}: a rebuild per recomputed block and micro-batch"
            );
            assert_eq!(l0, l1, "lora {lora}, {setting:?}: losses");
            assert!(
                w0 == w1,
                "lora {lora}, {setting:?}: weights after 3 steps differ"
            );
        }
    }
}

/// SFT items of 4 to 29 tokens: a prompt and 1–20 words of answer.
fn mixed_objective(seed: u64) -> SftObjective {
    let examples: Vec<SftExample> = (0..48)
        .map(|i| SftExample::PromptCompletion {
            prompt: format!("{} ", WORDS[i % 6]),
            completion: (0..1 + (i * 7) % 20)
                .map(|k| WORDS[(i + k) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" "),
        })
        .collect();
    objective_on(&examples, seed)
}

/// An SFT objective that records the items of every micro-batch it trains on.
struct Recording(SftObjective, Vec<Vec<usize>>);

impl rlhf_train::Objective for Recording {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn lengths(&self) -> Option<Vec<usize>> {
        self.0.lengths()
    }
    fn trainable(&self) -> Vec<rlhf_model::params::Param> {
        self.0.trainable()
    }
    fn set_length_grouped(&mut self, batch_size: usize) {
        self.0.set_length_grouped(batch_size)
    }
    fn loss(&mut self, items: &[usize]) -> anyhow::Result<rlhf_train::StepOut> {
        self.1.push(items.to_vec());
        self.0.loss(items)
    }
    fn save_final(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        self.0.save_final(dir)
    }
}

#[test]
fn group_by_length_trains_on_batches_of_similar_lengths_and_resumes_exactly() {
    use rlhf_train::Objective;
    let cfg = |by_length: bool| TrainConfig {
        max_steps: 24,
        batch_size: 4,
        lr: 3e-3,
        log_every: 1,
        group_by_length: by_length,
        ..Default::default()
    };
    let lens = mixed_objective(1).lengths().unwrap();
    let mut runs = vec![];
    for by_length in [false, true] {
        let d = tmp(&format!("by-length-{by_length}"));
        let mut obj = Recording(mixed_objective(1), vec![]);
        let s = Trainer::new(cfg(by_length), &d)
            .run(&mut obj, false)
            .unwrap();
        std::fs::remove_dir_all(&d).ok();
        // Two epochs of 12 batches: every item once in each.
        for epoch in obj.1.chunks(12) {
            let mut all = epoch.concat();
            all.sort();
            assert_eq!(all, (0..48).collect::<Vec<_>>(), "by_length {by_length}");
        }
        let first = s.losses[0].1;
        let last = s.losses.last().unwrap().1;
        assert!(
            last < 0.8 * first,
            "by_length {by_length}: loss {first} → {last}"
        );
        runs.push((
            rlhf_data::batch::real_token_share(&obj.1[..12], &lens),
            last,
        ));
    }
    let ((random, _), (grouped, _)) = (runs[0], runs[1]);
    assert!(
        grouped > 0.9 && random < 0.75,
        "real-token share {grouped} vs {random}"
    );

    // Grouped, a batch's loss is its summed token NLL over the loss tokens of an average batch
    // of 4, so a token weighs the same in a short batch as in a long one; it logs the mean.
    let mut plain = mixed_objective(2);
    let mut grouped = mixed_objective(2);
    grouped.set_length_grouped(4);
    let per_item = plain.train.iter().map(|r| r.n_loss_tokens()).sum::<usize>() as f64 / 48.0;
    assert_eq!(grouped.token_norm, Some(per_item * 4.0));
    for items in [[0usize, 6, 12, 18], [1, 2, 3, 4], [5, 11, 17, 23]] {
        let mean = plain.loss(&items).unwrap().loss.to_scalar::<f32>().unwrap() as f64;
        let out = grouped.loss(&items).unwrap();
        let count: usize = items.iter().map(|&i| plain.train[i].n_loss_tokens()).sum();
        let scaled = out.loss.to_scalar::<f32>().unwrap() as f64;
        assert!((scaled - mean * count as f64 / (per_item * 4.0)).abs() < 1e-5 * mean);
        assert!((out.logged_loss.unwrap() - mean).abs() < 1e-6 * mean);
    }
    resume_case_with("resume-by-length", mixed_objective, cfg(true));
}

fn resume_case(name: &str, objective: impl Fn(u64) -> SftObjective) {
    let cfg = TrainConfig {
        max_steps: 12,
        batch_size: 2,
        grad_accum: 2,
        lr: 2e-3,
        warmup_steps: 3,
        save_every: 3,
        keep_last: 2,
        log_every: 1,
        ..Default::default()
    };
    resume_case_with(name, objective, cfg);
}

fn resume_case_with(name: &str, objective: impl Fn(u64) -> SftObjective, cfg: TrainConfig) {
    let cfg = TrainConfig {
        save_every: 3,
        keep_last: 2,
        ..cfg
    };
    let full_dir = tmp(&format!("{name}-full"));
    let mut full = objective(3);
    let a = Trainer::new(cfg.clone(), &full_dir)
        .run(&mut full, false)
        .unwrap();

    let part_dir = tmp(&format!("{name}-part"));
    let mut first = objective(3);
    let mut t = Trainer::new(cfg.clone(), &part_dir);
    t.stop_after = Some(6);
    let p1 = t.run(&mut first, false).unwrap();
    assert_eq!(p1.losses.len(), 6);
    // A fresh process: new model from the same seed, state from the checkpoint.
    let mut second = objective(3);
    let p2 = Trainer::new(cfg, &part_dir).run(&mut second, true).unwrap();
    let mut resumed = p1.losses.clone();
    resumed.extend(p2.losses.clone());
    assert_eq!(resumed, a.losses, "loss curve after resume differs");
    assert_eq!(weights(&second), weights(&full), "final weights differ");
    // keep_last = 2.
    assert_eq!(checkpoint::list(&part_dir).unwrap().len(), 2);
    std::fs::remove_dir_all(&full_dir).ok();
    std::fs::remove_dir_all(&part_dir).ok();
}

/// Child mode: write checkpoints of a large state forever (killed by the parent test).
#[test]
fn checkpoint_writer_child() {
    let Ok(dir) = std::env::var("RLHF_CKPT_CHILD_DIR") else {
        return;
    };
    let big = Tensor::ones((4096, 1024), rlhf_model::DType::F32, &Device::Cpu).unwrap();
    let mut w = std::collections::BTreeMap::new();
    w.insert("w".to_string(), big);
    for step in 1.. {
        let st = checkpoint::LoopState {
            step,
            epoch: 0,
            position: 0,
            optimizer_t: step as u64,
            nonfinite_total: 0,
            seed: 0,
            extra: serde_json::Value::Null,
        };
        let moments = vec![(
            "w.exp_avg".to_string(),
            rlhf_model::model::TensorData::Tensor(w["w"].clone()),
        )];
        checkpoint::save(std::path::Path::new(&dir), &st, &w, moments, 2).unwrap();
    }
}

#[test]
fn sigkill_during_checkpoint_write_keeps_previous_checkpoint() {
    let dir = tmp("sigkill");
    std::fs::create_dir_all(&dir).unwrap();
    for delay_ms in [150u64, 400, 900] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "checkpoint_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("RLHF_CKPT_CHILD_DIR", &dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        // Whatever instant it died at, the newest listed checkpoint loads completely.
        if let Some(ck) = checkpoint::latest(&dir).unwrap() {
            assert_eq!(ck.weights["w"].dims(), &[4096, 1024]);
            assert_eq!(ck.state.optimizer_t as usize, ck.state.step);
        }
    }
    assert!(
        !checkpoint::list(&dir).unwrap().is_empty(),
        "the child never completed a checkpoint"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn nonfinite_losses_skip_updates_then_stop_with_a_clear_message() {
    let mut obj = objective(4);
    let before = weights(&obj);
    // A learning rate this large makes the loss non-finite after the first update.
    let out = tmp("nan");
    let cfg = TrainConfig {
        max_steps: 30,
        batch_size: 5,
        lr: 1e30,
        max_grad_norm: 0.0,
        max_nonfinite_in_row: 3,
        ..Default::default()
    };
    let err = Trainer::new(cfg, &out)
        .run(&mut obj, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite steps in a row"), "{err}");
    assert_ne!(weights(&obj), before);
    std::fs::remove_dir_all(&out).ok();
}
