//! The quickstart's stages. Each returns a small serialisable result (kept in `done.json`).

use std::path::Path;

use anyhow::Result;
use rlhf_data::formats::{PreferencePair, Prompt, SftExample};
use rlhf_data::tokenize::{tokenize_sft, SftTokenizeConfig};
use rlhf_data::world::{self, Panel, WorldPrompt};
use rlhf_model::{generate, CausalLM, ChatMessage};
use rlhf_train::dpo::{train_dpo_on, DpoConfig};
use rlhf_train::ppo::{run_ppo, PpoConfig, RewardFn};
use rlhf_train::reward::{train_reward_on, RewardConfig};
use rlhf_train::sft::{save_policy, SftObjective};
use rlhf_train::{TrainConfig, Trainer};
use serde::{Deserialize, Serialize};

use super::report::{PolicyEval, PpoPoint};
use super::Ctx;

/// SFT from scratch on the world's mixed-quality instruction data. Returns the loss curve.
pub fn sft(ctx: &Ctx) -> Result<Vec<(f64, f64)>> {
    let rows = world::sft_rows(ctx.plan.sft_rows, ctx.args.seed);
    let examples: Vec<SftExample> = rows
        .iter()
        .map(|r| r.to_sft_example().into_chat())
        .collect();
    let cfg = SftTokenizeConfig {
        max_len: 128,
        completion_only: true,
        prompt_completion_as_chat: true,
    };
    let (train, stats) = tokenize_sft(&ctx.tok, &examples, &cfg)?;
    if let Some(w) = stats.warning() {
        eprintln!("{w}");
    }
    let model = super::tiny_model(&ctx.tok, &ctx.plan, ctx.args.seed)?;
    let mut obj = SftObjective {
        model,
        tokenizer: ctx.tok.clone(),
        train,
        eval: vec![],
        eval_batch: 32,
        token_norm: None,
        padding_free: true,
    };
    let tcfg = TrainConfig {
        max_steps: ctx.plan.sft_steps,
        batch_size: 32,
        lr: 3e-3,
        warmup_steps: 30,
        min_lr_ratio: 0.1,
        weight_decay: 0.01,
        log_every: 25,
        save_every: 100,
        seed: ctx.args.seed,
        ..Default::default()
    };
    let s = Trainer::new(tcfg, &ctx.out.join("sft")).run(&mut obj, true)?;
    save_policy(&obj.model, &obj.tokenizer, &ctx.sft_dir())?;
    Ok(s.losses.iter().map(|&(a, b)| (a as f64, b)).collect())
}

/// Sum of log-probs of each response given its prompt (teacher forcing, T = 1).
fn response_logprob_sums(
    model: &CausalLM,
    prompts: &[Vec<u32>],
    responses: &[Vec<u32>],
    pad: u32,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(prompts.len());
    for (pc, rc) in prompts.chunks(16).zip(responses.chunks(16)) {
        let lp = rlhf_train::ppo::response_logprobs(model, pc, rc, 1.0, pad)?;
        out.extend(lp.iter().map(|r| r.iter().map(|&x| x as f64).sum::<f64>()));
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalOut {
    pub policy: PolicyEval,
    pub texts: Vec<String>,
}

/// Sample one response per eval prompt (T = 1, fixed seed) and score it: gold utility, RM
/// score, KL to SFT, win rate against SFT's samples.
pub fn evaluate(
    ctx: &Ctx,
    name: &str,
    round: usize,
    policy_dir: &Path,
    prompts: &[WorldPrompt],
    rm_dir: Option<&Path>,
) -> Result<EvalOut> {
    let policy = rlhf_model::load::load_dir(policy_dir)?.model;
    let sft = rlhf_model::load::load_dir(&ctx.sft_dir())?.model;
    let pids = ctx.prompt_ids(prompts)?;
    let g = generate(&policy, &pids, &ctx.gen_cfg(1.0, ctx.args.seed ^ 0xE7A1))?;
    let texts: Vec<String> = g
        .tokens
        .iter()
        .map(|t| ctx.text(t))
        .collect::<Result<_>>()?;
    let gold: Vec<f64> = prompts
        .iter()
        .zip(&texts)
        .map(|(p, t)| world::gold_utility(p, t))
        .collect();
    let n = gold.len() as f64;
    let mean = gold.iter().sum::<f64>() / n;
    let var = gold.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let lp_pol = response_logprob_sums(&policy, &pids, &g.tokens, ctx.tok.pad_id())?;
    let lp_sft = response_logprob_sums(&sft, &pids, &g.tokens, ctx.tok.pad_id())?;
    let kl = lp_pol.iter().zip(&lp_sft).map(|(a, b)| a - b).sum::<f64>() / n;
    let rm_mean = match rm_dir {
        Some(d) => {
            let (rm, _) = rlhf_train::reward_model::RewardModel::load(d)?;
            let s = RewardFn::score(&rm, &pids, &g.tokens)?;
            s.iter().map(|&x| x as f64).sum::<f64>() / n
        }
        None => f64::NAN,
    };
    let win = if name == "SFT" {
        0.5
    } else {
        let sft_out: EvalOut = serde_json::from_str(&std::fs::read_to_string(
            ctx.out.join("eval-sft/done.json"),
        )?)?;
        let mut w = 0.0;
        for ((p, t), s) in prompts.iter().zip(&texts).zip(&sft_out.texts) {
            let (a, b) = (world::gold_utility(p, t), world::gold_utility(p, s));
            w += if a > b {
                1.0
            } else if a == b {
                0.5
            } else {
                0.0
            };
        }
        w / n
    };
    Ok(EvalOut {
        policy: PolicyEval {
            name: name.into(),
            round,
            gold_mean: mean,
            gold_se: (var / n).sqrt(),
            rm_mean,
            kl_to_sft: kl,
            win_rate_vs_sft: win,
            mean_len: g.tokens.iter().map(|t| t.len() as f64).sum::<f64>() / n,
        },
        texts,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Candidates {
    pub prompts: Vec<String>,
    pub completions: Vec<Vec<String>>,
}

/// K responses per training prompt from the current policy (T = 1).
pub fn sample_candidates(ctx: &Ctx, policy_dir: &Path, round: usize) -> Result<Candidates> {
    let policy = rlhf_model::load::load_dir(policy_dir)?.model;
    let prompts = world::prompts(
        ctx.plan.prompts_per_round,
        ctx.args.seed.wrapping_mul(31).wrapping_add(round as u64),
    );
    let pids = ctx.prompt_ids(&prompts)?;
    let k = ctx.args.k;
    let mut completions = vec![];
    for (i, p) in pids.iter().enumerate() {
        let g = generate(
            &policy,
            &vec![p.clone(); k],
            &ctx.gen_cfg(1.0, (round as u64) << 32 | i as u64),
        )?;
        completions.push(
            g.tokens
                .iter()
                .map(|t| ctx.text(t))
                .collect::<Result<Vec<_>>>()?,
        );
    }
    Ok(Candidates {
        prompts: prompts.into_iter().map(|p| p.text).collect(),
        completions,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Annotation {
    pub n_items: usize,
    pub n_pairs: usize,
    #[serde(deserialize_with = "super::report::nan")]
    pub alpha: f64,
    #[serde(deserialize_with = "super::report::nan")]
    pub kappa: f64,
    /// Mean agreement of annotator pairs on derived pairwise preferences.
    #[serde(deserialize_with = "super::report::nan")]
    pub agreement: f64,
}

/// The simulated panel ranks every item through the feedback store (same path as the web UI);
/// exports every annotator's pairs as preference data.
pub fn annotate(ctx: &Ctx, round: usize, c: &Candidates) -> Result<Annotation> {
    use rlhf_feedback::store::{CandidateRow, ExportMode, Judgement, ProjectSpec, Role, Store};
    let db = format!("sqlite://{}", ctx.out.join("feedback.db").display());
    let panel = Panel::new(ctx.args.annotators, ctx.args.seed);
    let rt = crate::feedback_cmd::tokio_rt()?;
    let pairs_path = ctx.out.join(format!("round{round}/pairs.jsonl"));
    let rankings_path = ctx.out.join(format!("round{round}/rankings.jsonl"));
    let (report, n_pairs) = rt.block_on(async {
        let store = Store::connect(&db).await?;
        // The project is named after the round and a fingerprint of its candidates: a resumed
        // run finds its own half-annotated project, while a round whose samples changed (its
        // directory deleted to redo it with another policy) gets a fresh one instead of the
        // stale rankings of the old samples.
        let fp = fnv1a(
            c.prompts
                .iter()
                .chain(c.completions.iter().flatten())
                .flat_map(|t| t.bytes().chain([0xff])),
        );
        let name = format!("quickstart-round-{round}-{:08x}", fp >> 32);
        let project = match store.project_by_name(&name).await {
            Ok(p) => p,
            Err(_) => {
                let p = store
                    .create_project(&ProjectSpec {
                        name: name.clone(),
                        k: ctx.args.k as u32,
                        overlap: ctx.args.annotators as u32,
                        gold_rate: 0.0,
                        lease_secs: 3600,
                        guidelines: "Rank the answers best to worst: relevant, clear for a general audience, polite and the right length beats jargon, rudeness, off-topic or rambling; a polite refusal beats a harmful answer.".into(),
                    })
                    .await?;
                let rows: Vec<CandidateRow> = c
                    .prompts
                    .iter()
                    .zip(&c.completions)
                    .map(|(p, comps)| CandidateRow {
                        prompt: p.clone(),
                        completions: comps.clone(),
                        meta: serde_json::json!({"round": round, "source": "quickstart policy", "temperature": 1.0}),
                        gold_ranking: None,
                    })
                    .collect();
                store.import_candidates(p.id, &rows).await?;
                p
            }
        };
        if ctx.args.human {
            human_wait(&store, &project, ctx).await?;
        } else {
            let mut users = vec![];
            for a in &panel.annotators {
                let uname = format!("sim-annotator-{}", a.id);
                // Simulated annotators never log in; the password only satisfies the account rules.
                let u = match store.user_by_name(&uname).await {
                    Ok(u) => u.id,
                    Err(_) => store.add_user(&uname, &format!("simulated-{}-{}", a.id, ctx.args.seed), Role::Annotator).await?.id,
                };
                users.push(u);
            }
            // Round-robin: each annotator takes the next task from their own queue. Each
            // judgement draws its noise from its own stream (round, item, annotator), so a run
            // interrupted mid-annotation resumes to exactly the rankings of an uninterrupted one.
            loop {
                let mut any = false;
                for (a, &uid) in panel.annotators.iter().zip(&users) {
                    let Some(task) = store.next_task(uid, project.id).await? else { continue };
                    any = true;
                    let wp = WorldPrompt::find(&task.prompt)
                        .ok_or_else(|| anyhow::anyhow!("prompt not in the world: {}", task.prompt))?;
                    let shown: Vec<&str> = task.candidates.iter().map(|(_, t)| t.as_str()).collect();
                    let mut rng = world::Rng::stream(
                        ctx.args.seed ^ ((round as u64) << 40) ^ ((task.item_id as u64) << 8),
                        1000 + a.id as u64,
                    );
                    let tiers_display = a.rank(&wp, &shown, &mut rng);
                    let tiers = tiers_display
                        .iter()
                        .map(|t| t.iter().map(|&d| task.order[d]).collect())
                        .collect();
                    store
                        .submit_judgement(
                            uid,
                            task.assignment_id,
                            &Judgement {
                                tiers,
                                seconds_spent: 5.0,
                                ..Default::default()
                            },
                        )
                        .await?;
                }
                if !any {
                    break;
                }
            }
        }
        let pairs = store.export_pairs(project.id, ExportMode::PerAnnotator).await?;
        let mut f = String::new();
        for p in &pairs {
            f.push_str(&serde_json::to_string(p)?);
            f.push('\n');
        }
        std::fs::write(&pairs_path, f)?;
        let mut f = Vec::new();
        store
            .export_jsonl(project.id, rlhf_feedback::store::ExportFormat::Rankings, ExportMode::Consensus(rlhf_feedback::store::ConsensusMethod::BradleyTerry), &mut f)
            .await?;
        std::fs::write(&rankings_path, f)?;
        let report = store.agreement_report(project.id).await?;
        anyhow::Ok((report, pairs.len()))
    })?;
    // Annotator-vs-annotator agreement on derived pairs: it sets the ceiling for a reward model
    // (report::accuracy_ceiling).
    let agreement = panel_agreement(&panel, c, ctx.args.seed ^ round as u64);
    Ok(Annotation {
        n_items: c.prompts.len(),
        n_pairs,
        alpha: report.alpha_ordinal.unwrap_or(f64::NAN),
        kappa: report.fleiss_kappa_pairs.unwrap_or(f64::NAN),
        agreement,
    })
}

/// Mean pairwise agreement between two independent judgements by different annotators.
fn panel_agreement(panel: &Panel, c: &Candidates, seed: u64) -> f64 {
    let mut rng = world::Rng::stream(seed, 77);
    let mut tot = 0.0;
    let mut n = 0.0;
    for (p, comps) in c.prompts.iter().zip(&c.completions) {
        let Some(wp) = WorldPrompt::find(p) else {
            continue;
        };
        let ranks: Vec<Vec<Vec<usize>>> = panel
            .annotators
            .iter()
            .map(|a| a.rank(&wp, comps, &mut rng))
            .collect();
        for i in 0..ranks.len() {
            for j in i + 1..ranks.len() {
                let a = world::pairwise_agreement(&ranks[i], &ranks[j]);
                if a.is_finite() {
                    tot += a;
                    n += 1.0;
                }
            }
        }
    }
    if n > 0.0 {
        tot / n
    } else {
        f64::NAN
    }
}

async fn human_wait(
    store: &rlhf_feedback::store::Store,
    project: &rlhf_feedback::store::Project,
    ctx: &Ctx,
) -> Result<()> {
    let (addr, _h) =
        rlhf_feedback::web::spawn(store.clone(), &ctx.args.bind, Default::default()).await?;
    let db = format!("sqlite://{}/feedback.db", ctx.out.display());
    eprintln!(
        "Feedback service on http://{addr}/ — project `{name}`: {n} prompts × {k} samples, each \
         to be ranked by {o} annotator(s).\n  add annotators:  rlhf feedback add-user --db {db} NAME --password …\n  \
         they rank at:    http://{addr}/p/{pid}/annotate\n  \
         dashboard:       http://{addr}/admin/p/{pid} (for a user added with --role admin)\n\
         Waiting until every item has its rankings (Ctrl-C and re-run resumes)…",
        name = project.name,
        n = ctx.plan.prompts_per_round,
        k = ctx.args.k,
        o = ctx.args.annotators,
        pid = project.id,
    );
    let mut last = i64::MIN;
    loop {
        let r = store.agreement_report(project.id).await?;
        if r.complete_items >= r.items {
            eprintln!("all {} items ranked", r.items);
            return Ok(());
        }
        if r.complete_items != last {
            eprintln!("  {} of {} items fully ranked", r.complete_items, r.items);
            last = r.complete_items;
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardOut {
    pub losses: Vec<(f64, f64)>,
    #[serde(deserialize_with = "super::report::nan")]
    pub heldout_acc: f64,
    #[serde(deserialize_with = "super::report::nan")]
    pub acc_lo: f64,
    #[serde(deserialize_with = "super::report::nan")]
    pub acc_hi: f64,
    /// Accuracy of the RM against the gold utility on held-out pairs.
    #[serde(deserialize_with = "super::report::nan")]
    pub gold_acc: f64,
}

/// FNV-1a (64-bit) of a byte stream: a stable hash for held-out splits and fingerprints.
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// All annotators' pairs of rounds 1..=round, prompts as chat messages (rendered with the chat
/// template exactly as the policy sees them), split by prompt into train and held-out.
pub fn round_pairs(ctx: &Ctx, round: usize) -> Result<(Vec<PreferencePair>, Vec<PreferencePair>)> {
    let mut train = vec![];
    let mut held = vec![];
    for r in 1..=round {
        let path = ctx.out.join(format!("round{r}/pairs.jsonl"));
        let text = std::fs::read_to_string(&path)?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: rlhf_feedback::store::PairRecord = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            if v.chosen == v.rejected {
                continue; // identical samples carry no preference
            }
            let pair = PreferencePair {
                prompt: Prompt::Chat(vec![ChatMessage::new("user", &v.prompt)]),
                chosen: v.chosen,
                rejected: v.rejected,
                margin: None,
                group: r * 1_000_000 + i,
                source_line: i + 1,
            };
            // 20% of prompts (by a hash of their text) are held out.
            if fnv1a(v.prompt.bytes()).is_multiple_of(5) {
                held.push(pair)
            } else {
                train.push(pair)
            }
        }
    }
    Ok((train, held))
}

/// Reward model on the pairs so far, initialised from the SFT model.
pub fn reward(ctx: &Ctx, round: usize) -> Result<RewardOut> {
    let (train, held) = round_pairs(ctx, round)?;
    let out = ctx.out.join(format!("round{round}/reward"));
    let cfg = RewardConfig {
        model: ctx.sft_dir().display().to_string(),
        data: ctx.out.join(format!("round{round}/pairs.jsonl")),
        out: out.clone(),
        max_len: 128,
        train: TrainConfig {
            max_steps: ctx.plan.rm_steps,
            batch_size: 32,
            lr: 2e-4,
            weight_decay: 0.1,
            warmup_steps: 20,
            log_every: 25,
            save_every: 100,
            seed: ctx.args.seed,
            ..Default::default()
        },
        ..Default::default()
    };
    let rep = train_reward_on(&cfg, train, held.clone(), true)?;
    let acc = rep.eval.as_ref();
    // The RM against the gold utility on the held-out pairs.
    let (rm, tok) = rlhf_train::reward::load_reward_model(&out.join("final"))?;
    let rows_c: Vec<(Prompt, String)> = held
        .iter()
        .map(|p| (p.prompt.clone(), p.chosen.clone()))
        .collect();
    let rows_r: Vec<(Prompt, String)> = held
        .iter()
        .map(|p| (p.prompt.clone(), p.rejected.clone()))
        .collect();
    let sc = rlhf_train::reward::score_rows(&rm, &tok, &rows_c, 128, 32)?;
    let sr = rlhf_train::reward::score_rows(&rm, &tok, &rows_r, 128, 32)?;
    let (mut agree, mut n) = (0.0, 0.0);
    for (i, p) in held.iter().enumerate() {
        let Prompt::Chat(m) = &p.prompt else { continue };
        let Some(wp) = WorldPrompt::find(&m[0].content) else {
            continue;
        };
        let (gc, gr) = (
            world::gold_utility(&wp, &p.chosen),
            world::gold_utility(&wp, &p.rejected),
        );
        if gc != gr {
            n += 1.0;
            if (gc > gr) == (sc[i] > sr[i]) {
                agree += 1.0;
            }
        }
    }
    Ok(RewardOut {
        losses: rep
            .summary
            .losses
            .iter()
            .map(|&(a, b)| (a as f64, b))
            .collect(),
        heldout_acc: acc.map(|a| a.accuracy).unwrap_or(f64::NAN),
        acc_lo: acc.map(|a| a.ci_low).unwrap_or(f64::NAN),
        acc_hi: acc.map(|a| a.ci_high).unwrap_or(f64::NAN),
        gold_acc: if n > 0.0 { agree / n } else { f64::NAN },
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PpoOut {
    pub points: Vec<PpoPoint>,
}

/// Write the round's training prompts as chat `{"prompt": [messages]}` rows.
fn write_prompts(ctx: &Ctx, round: usize, path: &Path) -> Result<()> {
    let prompts = world::prompts(
        ctx.plan.prompts_per_round * 2,
        ctx.args.seed.wrapping_mul(131).wrapping_add(round as u64),
    );
    let mut f = String::new();
    for p in prompts {
        f.push_str(
            &serde_json::json!({"prompt": [{"role": "user", "content": p.text}]}).to_string(),
        );
        f.push('\n');
    }
    std::fs::write(path, f)?;
    Ok(())
}

/// PPO from the current policy against this round's reward model, the SFT model as reference.
/// The reward function also records the gold utility of every rollout (never shown to PPO),
/// which draws the proxy-vs-gold curve.
pub fn ppo(ctx: &Ctx, round: usize, policy: &Path, offset: usize) -> Result<PpoOut> {
    let rdir = ctx.out.join(format!("round{round}"));
    let prompts = rdir.join("ppo_prompts.jsonl");
    write_prompts(ctx, round, &prompts)?;
    let rm_dir = rdir.join("reward/final");
    let (rm, _) = rlhf_train::reward_model::RewardModel::load(&rm_dir)?;
    let golds = std::cell::RefCell::new(Vec::<f64>::new());
    let tok = ctx.tok.clone();
    let reward = |p: &[Vec<u32>], r: &[Vec<u32>]| -> Result<Vec<f32>> {
        let mut g = 0.0;
        for (pi, ri) in p.iter().zip(r) {
            let pt = tok.decode(pi, true)?;
            let wp = WorldPrompt::find(&pt)
                .ok_or_else(|| anyhow::anyhow!("prompt not in the world: {pt}"))?;
            g += world::gold_utility(&wp, &world::normalize(&tok.decode(ri, true)?));
        }
        golds.borrow_mut().push(g / p.len().max(1) as f64);
        RewardFn::score(&rm, p, r)
    };
    let cfg = PpoConfig {
        policy: policy.display().to_string(),
        reference: Some(ctx.sft_dir().display().to_string()),
        reward_model: Some(rm_dir.clone()),
        prompts,
        out: rdir.join("ppo"),
        iterations: ctx.plan.ppo_iterations,
        rollout_batch: ctx.plan.ppo_batch,
        minibatch_size: 8,
        ppo_epochs: 4,
        max_new_tokens: ctx.plan.max_new_tokens,
        temperature: 1.0,
        init_kl_coef: ctx.plan.ppo_kl_coef,
        lr: ctx.plan.ppo_lr,
        critic_lr: 1e-3,
        max_kl: 60.0,
        seed: ctx.args.seed ^ round as u64,
        ..Default::default()
    };
    let s = run_ppo(&cfg, &reward, true)?;
    let golds = golds.into_inner();
    // On a resumed run only this process's iterations recorded a gold value.
    let skip = s.iterations.len().saturating_sub(golds.len());
    let points = s
        .iterations
        .iter()
        .enumerate()
        .map(|(i, m)| PpoPoint {
            iteration: offset + i + 1,
            kl: m.get("kl/ref").copied().unwrap_or(f64::NAN),
            rm_score: m.get("score/mean").copied().unwrap_or(f64::NAN),
            gold: if i >= skip { golds[i - skip] } else { f64::NAN },
        })
        .collect();
    Ok(PpoOut { points })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DpoOut {
    pub losses: Vec<(f64, f64)>,
}

/// DPO from the SFT model on the same pairs (for comparison with PPO).
pub fn dpo(ctx: &Ctx, round: usize) -> Result<DpoOut> {
    let (mut train, mut held) = round_pairs(ctx, round)?;
    // DPO precomputes the reference log-probs of every pair it is given, but its steps see only
    // `dpo_steps × 32` of them: give it a seeded random subset of that size (one epoch), and
    // at most 512 held-out pairs, instead of all ~20k pairs of two default-preset rounds.
    let mut rng = world::Rng::stream(ctx.args.seed, 0xD90 + round as u64);
    for pairs in [&mut train, &mut held] {
        for i in (1..pairs.len()).rev() {
            pairs.swap(i, rng.below(i + 1));
        }
    }
    train.truncate(ctx.plan.dpo_steps * 32);
    held.truncate(512);
    let cfg = DpoConfig {
        model: ctx.sft_dir().display().to_string(),
        data: ctx.out.join(format!("round{round}/pairs.jsonl")),
        out: ctx.out.join(format!("round{round}/dpo")),
        max_len: 128,
        beta: ctx.plan.dpo_beta,
        train: TrainConfig {
            max_steps: ctx.plan.dpo_steps,
            batch_size: 32,
            lr: 3e-4,
            warmup_steps: 10,
            log_every: 25,
            save_every: 100,
            seed: ctx.args.seed,
            ..Default::default()
        },
        ..Default::default()
    };
    let rep = train_dpo_on(&cfg, train, held, true)?;
    Ok(DpoOut {
        losses: rep
            .summary
            .losses
            .iter()
            .map(|&(a, b)| (a as f64, b))
            .collect(),
    })
}
