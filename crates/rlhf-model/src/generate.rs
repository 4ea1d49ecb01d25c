//! Batched generation: left-padded prompts, KV cache, greedy / temperature / top-k / top-p,
//! per-row EOS, seeded. Returns the new tokens and the log-probability of each sampled token
//! under the sampling distribution's logits / temperature (what PPO's rollout needs).

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backbone::KvCache;
use crate::model::CausalLM;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 means off.
    pub top_k: usize,
    /// 1.0 means off.
    pub top_p: f64,
    pub seed: u64,
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
    /// Recompute the whole sequence each step instead of using the KV cache (for tests).
    pub use_cache: bool,
    /// This batch's first row's index in a larger job: row `r` samples from the random stream
    /// of row `first_row + r`, so a job generated batch by batch samples what it would in one.
    pub first_row: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos_ids: vec![],
            pad_id: 0,
            use_cache: true,
            first_row: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens per row, up to and including the first EOS.
    pub tokens: Vec<Vec<u32>>,
    /// log p(token) per new token (logits / temperature; plain logits when greedy).
    pub logprobs: Vec<Vec<f32>>,
    /// Whether the row stopped at EOS (false: ran out of `max_new_tokens`).
    pub finished: Vec<bool>,
}

/// Left-pad prompts: returns ids [b, t] and the 0/1 mask rows.
pub fn left_pad(prompts: &[Vec<u32>], pad: u32) -> (Vec<u32>, Vec<Vec<u8>>, usize) {
    let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * t);
    let mut mask = Vec::with_capacity(prompts.len());
    for p in prompts {
        let n = t - p.len();
        ids.extend(std::iter::repeat_n(pad, n));
        ids.extend_from_slice(p);
        let mut m = vec![0u8; n];
        m.extend(std::iter::repeat_n(1u8, p.len()));
        mask.push(m);
    }
    (ids, mask, t)
}

/// Sample one token from a row of logits. Returns (token, logprob under the processed
/// distribution before top-k/top-p truncation, i.e. softmax(logits / T)).
pub fn sample_row(logits: &[f32], cfg: &GenerationConfig, rng: &mut impl Rng) -> (u32, f32) {
    let t = if cfg.temperature > 0.0 {
        cfg.temperature as f32
    } else {
        1.0
    };
    // Dividing by 1 is exact: at T = 1 (and greedy) the logits are used as they are.
    let owned: Vec<f32>;
    let scaled: &[f32] = if t == 1.0 {
        logits
    } else {
        owned = logits.iter().map(|x| x / t).collect();
        &owned
    };
    let m = crate::kernels::math::max(scaled);
    if cfg.temperature <= 0.0 {
        let lse = m + crate::kernels::math::sum_exp_sub(scaled, m).ln();
        // The first index holding the maximum.
        let i = scaled.iter().position(|&x| x == m).unwrap_or(0);
        return (i as u32, scaled[i] - lse);
    }
    if cfg.top_k == 0 && cfg.top_p >= 1.0 {
        // The whole distribution: one vectorised pass for exp(x − max) and one scan of the
        // cumulative mass in vocabulary order — no sort of the vocabulary.
        let mut e = scaled.to_vec();
        let z = crate::kernels::math::exp_sub_in_place(&mut e, m);
        let pick = draw(&e, rng.random::<f32>() * z);
        return (pick as u32, scaled[pick] - (m + z.ln()));
    }
    // The same exp as the vectorised sum, so candidate masses and the total agree.
    use crate::kernels::math::exp;
    let z_full = crate::kernels::math::sum_exp_sub(scaled, m);
    let lse = m + z_full.ln();
    // Truncated sampling walks the tokens from the most likely down (ties: lower id first), but
    // only as far as it needs: the top `n` are selected in O(vocab) and only they are sorted.
    // Top-k needs k; top-p alone starts at 256 and grows until their mass reaches top-p.
    let key = |a: &usize, b: &usize| scaled[*b].total_cmp(&scaled[*a]).then(a.cmp(b));
    let v = scaled.len();
    let mut idx: Vec<usize> = (0..v).collect();
    let mut n = if cfg.top_k > 0 {
        cfg.top_k.min(v)
    } else {
        256.min(v)
    };
    // Top-k renormalises over its k; top-p alone over the whole vocabulary.
    let z_all = (cfg.top_k == 0).then_some(z_full);
    let mut probs: Vec<f32>;
    loop {
        if n < v {
            idx.select_nth_unstable_by(n - 1, key);
        }
        idx[..n].sort_unstable_by(key);
        probs = idx[..n].iter().map(|&i| exp(scaled[i] - m)).collect();
        let Some(z) = z_all else { break };
        let mass: f32 = probs.iter().sum();
        if n == v || mass / z >= cfg.top_p as f32 {
            break;
        }
        n = (n * 4).min(v);
    }
    idx.truncate(n);
    let z = z_all.unwrap_or_else(|| probs.iter().sum());
    probs.iter_mut().for_each(|p| *p /= z);
    if cfg.top_p < 1.0 {
        let mut c = 0.0;
        let mut keep = probs.len();
        for (j, p) in probs.iter().enumerate() {
            c += p;
            if c >= cfg.top_p as f32 {
                keep = j + 1;
                break;
            }
        }
        idx.truncate(keep);
        probs.truncate(keep);
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let pick = idx[draw(&probs, rng.random())];
    (pick as u32, scaled[pick] - lse)
}

/// The first index at which the running sum of `weights` exceeds `target`. If rounding leaves
/// the total just below `target`, the last index with any weight (never a masked, −∞ token).
fn draw(weights: &[f32], target: f32) -> usize {
    let mut c = 0.0;
    for (i, &w) in weights.iter().enumerate() {
        c += w;
        if target < c {
            return i;
        }
    }
    weights
        .iter()
        .rposition(|&w| w > 0.0)
        .unwrap_or(weights.len().saturating_sub(1))
}

/// The rows of a generation batch still being computed, each with its original index, its RNG,
/// its mask and all its ids so far.
struct Live {
    rows: Vec<usize>,
    rngs: Vec<rand::rngs::StdRng>,
    mask: Vec<Vec<u8>>,
    ids: Vec<Vec<u32>>,
}

impl Live {
    /// Keep batch rows `keep` (ascending) only.
    fn keep(&mut self, keep: &[usize]) {
        fn pick<T>(v: &mut Vec<T>, keep: &[usize]) {
            let mut flags = vec![false; v.len()];
            keep.iter().for_each(|&i| flags[i] = true);
            let mut it = flags.into_iter();
            v.retain(|_| it.next().unwrap_or(false));
        }
        pick(&mut self.rows, keep);
        pick(&mut self.rngs, keep);
        pick(&mut self.mask, keep);
        pick(&mut self.ids, keep);
    }
}

/// Share of padding a prefill batch may hold: past it, prompts are computed in groups.
const PREFILL_SLACK: f64 = 0.1;

/// Rows grouped for the prefill, longest prompts first: a group takes the next row while its
/// padded slots stay within [`PREFILL_SLACK`] of its tokens. One group (all rows, in order)
/// when the whole batch is within it.
pub fn prefill_groups(lens: &[usize]) -> Vec<Vec<usize>> {
    let fits = |width: usize, n: usize, sum: usize| {
        (width * n) as f64 <= (1.0 + PREFILL_SLACK) * sum as f64
    };
    let width = lens.iter().copied().max().unwrap_or(0);
    if fits(width, lens.len(), lens.iter().sum()) {
        return vec![(0..lens.len()).collect()];
    }
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&r| std::cmp::Reverse(lens[r]));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut sum = 0;
    for r in order {
        match groups.last_mut() {
            Some(g) if fits(lens[g[0]], g.len() + 1, sum + lens[r]) => {
                g.push(r);
                sum += lens[r];
            }
            _ => {
                groups.push(vec![r]);
                sum = lens[r];
            }
        }
    }
    groups
}

/// The prefill in groups of rows, each left-padded to its own longest prompt: the logits of
/// every row's last prompt token ([b·V], batch order) and the cache of the batch left-padded
/// to `width`.
fn prefill_grouped(
    model: &CausalLM,
    prompts: &[Vec<u32>],
    groups: Vec<Vec<usize>>,
    pad: u32,
    width: usize,
) -> Result<(Vec<f32>, KvCache)> {
    let v = model.config.vocab_size();
    let mut logits = vec![0f32; prompts.len() * v];
    let mut parts = Vec::with_capacity(groups.len());
    for g in groups {
        let ps: Vec<Vec<u32>> = g.iter().map(|&r| prompts[r].clone()).collect();
        let (ids, mask, t) = left_pad(&ps, pad);
        let mut cache = model.new_cache();
        let ids = Tensor::from_vec(ids, (g.len(), t), &Device::Cpu)?;
        let h = model.hidden_cached(&ids, &mask, &mut cache)?;
        let l: Vec<f32> = model
            .lm_logits(&h.narrow(1, t - 1, 1)?.squeeze(1)?)?
            .flatten_all()?
            .to_vec1()?;
        for (i, &r) in g.iter().enumerate() {
            logits[r * v..(r + 1) * v].copy_from_slice(&l[i * v..(i + 1) * v]);
        }
        parts.push((cache, g));
    }
    Ok((logits, KvCache::merge_left_padded(parts, width)?))
}

/// Generate continuations for a batch of tokenised prompts.
pub fn generate(
    model: &CausalLM,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Generation> {
    // No backward follows: build no graph.
    let _no_grad = crate::params::no_grad();
    // The weights stay as they are until it returns: decoding products pack each once.
    let _packed = crate::kernels::packed::pack_scope();
    if prompts.is_empty() {
        return Ok(Generation {
            tokens: vec![],
            logprobs: vec![],
            finished: vec![],
        });
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} is empty: generation needs at least one token (e.g. BOS)")
    }
    let b = prompts.len();
    let (ids, mask, t0) = left_pad(prompts, cfg.pad_id);
    if let Some(maxp) = model.config.max_positions() {
        if t0 + cfg.max_new_tokens > maxp && model.config.family() == crate::config::Family::Gpt2 {
            bail!(
                "prompt length {t0} + max_new_tokens {} exceeds the model's {maxp} positions",
                cfg.max_new_tokens
            )
        }
    }
    // One RNG per row: a row's sample never depends on when other rows finish.
    let rngs: Vec<rand::rngs::StdRng> = (0..b)
        .map(|r| {
            rand::rngs::StdRng::seed_from_u64(
                cfg.seed
                    .wrapping_mul(0x9E37_79B9)
                    .wrapping_add(cfg.first_row.wrapping_add(r as u64)),
            )
        })
        .collect();
    let all_ids: Vec<Vec<u32>> = (0..b).map(|r| ids[r * t0..(r + 1) * t0].to_vec()).collect();
    let mut out = Generation {
        tokens: vec![vec![]; b],
        logprobs: vec![vec![]; b],
        finished: vec![false; b],
    };
    // The rows still computed: finished ones leave the batch (and the cache) once they are an
    // eighth of it, so a step costs what its unfinished rows need.
    let mut live = Live {
        rows: (0..b).collect(),
        rngs,
        mask,
        ids: all_ids,
    };
    let mut cache = model.new_cache();
    let v = model.config.vocab_size();
    let mut step_ids = Tensor::from_vec(ids, (b, t0), &Device::Cpu)?;
    // Prompts of very different lengths: the prompts are computed in groups of similar lengths.
    let groups = prefill_groups(&prompts.iter().map(|p| p.len()).collect::<Vec<_>>());
    let mut prefilled = None;
    if cfg.use_cache && groups.len() > 1 {
        let (logits, c) = prefill_grouped(model, prompts, groups, cfg.pad_id, t0)?;
        prefilled = Some(logits);
        cache = c;
    }
    for step in 0..cfg.max_new_tokens {
        let n = live.rows.len();
        let logits: Vec<f32> = match prefilled.take() {
            Some(l) => l,
            None => {
                let h = if cfg.use_cache {
                    model.hidden_cached(&step_ids, &live.mask, &mut cache)?
                } else {
                    let t = live.ids[0].len();
                    let flat: Vec<u32> = live.ids.iter().flatten().copied().collect();
                    model.hidden(&Tensor::from_vec(flat, (n, t), &Device::Cpu)?, &live.mask)?
                };
                let t = h.dim(1)?;
                let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
                model.lm_logits(&last)?.flatten_all()?.to_vec1()?
            }
        };
        // Rows sample in parallel, each with its own RNG: the same draws as one at a time.
        let finished = &out.finished;
        let picks: Vec<Option<(u32, f32)>> = live
            .rngs
            .par_iter_mut()
            .zip(logits.par_chunks(v))
            .zip(live.rows.par_iter())
            .map(|((rng, row), &r)| (!finished[r]).then(|| sample_row(row, cfg, rng)))
            .collect();
        let mut next = Vec::with_capacity(n);
        for (i, pick) in picks.into_iter().enumerate() {
            let r = live.rows[i];
            let Some((tok, lp)) = pick else {
                next.push(cfg.pad_id);
                continue;
            };
            out.tokens[r].push(tok);
            out.logprobs[r].push(lp);
            if cfg.eos_ids.contains(&tok) {
                out.finished[r] = true;
            }
            next.push(tok);
        }
        if out.finished.iter().all(|&f| f) {
            break;
        }
        for (i, m) in live.mask.iter_mut().enumerate() {
            // A finished row still in the batch attends to its (masked) pad tokens: its output
            // is ignored.
            m.push(u8::from(out.tokens[live.rows[i]].len() == step + 1));
            live.ids[i].push(next[i]);
        }
        let done = live.rows.iter().filter(|&&r| out.finished[r]).count();
        if done > 0 && done * 8 >= n {
            let keep: Vec<usize> = (0..n).filter(|&i| !out.finished[live.rows[i]]).collect();
            cache.keep_rows(&keep)?;
            live.keep(&keep);
            next = keep.iter().map(|&i| next[i]).collect();
        }
        step_ids = Tensor::from_vec(next, (live.rows.len(), 1), &Device::Cpu)?;
    }
    Ok(out)
}
