//! Tokenisation of SFT examples (with loss masks) and preference pairs, truncation with counts,
//! and packing.
//!
//! Convention: `loss_mask[t]` says whether token `t` is a training *target* (predicted from
//! tokens `..t`). Position 0 is never predicted, whatever its mask says.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use rlhf_model::tokenizer::{ChatMessage, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::formats::{PreferencePair, Prompt, SftExample};

/// Counts of what truncation removed; report them (see [`TruncationStats::warning`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TruncationStats {
    /// Examples (or pairs) tokenised.
    pub examples: usize,
    /// Examples that lost at least one token.
    pub truncated: usize,
    /// Tokens removed in total.
    pub tokens_dropped: usize,
    /// Pairs whose prompt was cut (from the left).
    pub prompts_truncated: usize,
    /// Responses (chosen or rejected, counted separately) cut from the right; they lose EOS.
    pub responses_truncated: usize,
    /// SFT examples left with no loss token after truncation (they contribute nothing).
    pub no_loss_left: usize,
}

impl TruncationStats {
    /// A one-line warning when anything was truncated, else `None`.
    pub fn warning(&self) -> Option<String> {
        if self.truncated == 0 {
            return None;
        }
        let mut s = format!(
            "truncated {} of {} examples ({} tokens dropped",
            self.truncated, self.examples, self.tokens_dropped
        );
        if self.prompts_truncated > 0 || self.responses_truncated > 0 {
            s += &format!(
                "; {} prompts cut from the left, {} responses cut from the right",
                self.prompts_truncated, self.responses_truncated
            );
        }
        if self.no_loss_left > 0 {
            s += &format!("; {} left with no loss tokens", self.no_loss_left);
        }
        s += "); consider a larger max_len";
        Some(s)
    }

    pub fn merge(&mut self, o: &TruncationStats) {
        self.examples += o.examples;
        self.truncated += o.truncated;
        self.tokens_dropped += o.tokens_dropped;
        self.prompts_truncated += o.prompts_truncated;
        self.responses_truncated += o.responses_truncated;
        self.no_loss_left += o.no_loss_left;
    }
}

/// How SFT examples are tokenised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftTokenizeConfig {
    /// Examples longer than this are cut from the right (counted).
    pub max_len: usize,
    /// Loss on completion / assistant tokens only (else on every token).
    pub completion_only: bool,
    /// Render plain prompt/completion examples as a user/assistant conversation with the chat
    /// template (see [`SftExample::into_chat`]). Off: concatenated as-is (TRL).
    pub prompt_completion_as_chat: bool,
}

impl Default for SftTokenizeConfig {
    fn default() -> Self {
        Self {
            max_len: 1024,
            completion_only: true,
            prompt_completion_as_chat: false,
        }
    }
}

/// One tokenised SFT example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedSft {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
    /// Segment id per token (1, 2, … for packed examples), or empty for a single example. The
    /// attention mask carries them: tokens attend only within their segment.
    #[serde(default)]
    pub segments: Vec<u8>,
}

impl TokenizedSft {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Number of tokens that are targets (position 0 excluded: it is never predicted).
    pub fn n_loss_tokens(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

fn render(tok: &Tokenizer, msgs: &[ChatMessage], gen: bool) -> Result<String> {
    tok.apply_chat_template(msgs, gen)
}

fn push_eos(tok: &Tokenizer, ids: &mut Vec<u32>) {
    if let Some(e) = tok.eos_id() {
        if ids.last() != Some(&e) {
            ids.push(e);
        }
    }
}

/// Encode `text` (no special tokens added; the template supplies them) and mark the tokens that
/// overlap any of the byte `spans`.
fn encode_with_spans(
    tok: &Tokenizer,
    text: &str,
    spans: &[(usize, usize)],
) -> Result<(Vec<u32>, Vec<bool>)> {
    let enc = tok
        .inner()
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let ids = enc.get_ids().to_vec();
    let mask = enc
        .get_offsets()
        .iter()
        .map(|&(s, e)| {
            spans.iter().any(|&(a, b)| {
                if s == e {
                    a <= s && s < b
                } else {
                    s < b && e > a
                }
            })
        })
        .collect();
    Ok((ids, mask))
}

fn prefix_error(what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the chat template does not have the prefix property ({what}), so the assistant tokens \
         cannot be located; use a template whose rendering of a conversation prefix is a text \
         prefix of the rendering of the whole conversation"
    )
}

/// Tokenise without truncation: `(ids, loss_mask)`.
fn sft_ids(
    tok: &Tokenizer,
    ex: &SftExample,
    cfg: &SftTokenizeConfig,
) -> Result<(Vec<u32>, Vec<bool>)> {
    if cfg.prompt_completion_as_chat {
        if let SftExample::PromptCompletion { .. } = ex {
            return sft_ids(
                tok,
                &ex.clone().into_chat(),
                &SftTokenizeConfig {
                    prompt_completion_as_chat: false,
                    ..cfg.clone()
                },
            );
        }
    }
    match ex {
        SftExample::Text(text) => {
            let mut ids = tok.encode(text, true)?;
            push_eos(tok, &mut ids);
            let n = ids.len();
            Ok((ids, vec![true; n]))
        }
        SftExample::PromptCompletion { prompt, completion } => {
            let p = tok.encode(prompt, true)?;
            let full = tok.encode(&format!("{prompt}{completion}"), true)?;
            let mut ids = if full.len() > p.len() && full.starts_with(&p) {
                full
            } else {
                // The tokenisation merges across the boundary: tokenise the parts separately so
                // that the mask boundary is exact.
                let mut ids = p.clone();
                ids.extend(tok.encode(completion, false)?);
                ids
            };
            push_eos(tok, &mut ids);
            let mut mask = vec![!cfg.completion_only; p.len()];
            mask.resize(ids.len(), true);
            Ok((ids, mask))
        }
        SftExample::Chat(msgs) => {
            let full = render(tok, msgs, false)?;
            if !cfg.completion_only {
                return encode_with_spans(tok, &full, &[(0, full.len())]);
            }
            let mut spans = Vec::new();
            for (i, m) in msgs.iter().enumerate() {
                if m.role != "assistant" {
                    continue;
                }
                let pre = render(tok, &msgs[..i], true)?;
                let upto = render(tok, &msgs[..=i], false)?;
                if !upto.starts_with(&pre) {
                    return Err(prefix_error(&format!(
                        "messages[..{i}] with the generation prompt is not a prefix of messages[..={i}]"
                    )));
                }
                if !full.starts_with(&upto) {
                    return Err(prefix_error(&format!(
                        "messages[..={i}] is not a prefix of the whole conversation"
                    )));
                }
                spans.push((pre.len(), upto.len()));
            }
            encode_with_spans(tok, &full, &spans)
        }
        SftExample::ChatPromptCompletion { prompt, completion } => {
            let mut all = prompt.clone();
            all.extend(completion.iter().cloned());
            let full = render(tok, &all, false)?;
            let pre = render(tok, prompt, true)?;
            if !full.starts_with(&pre) {
                return Err(prefix_error(
                    "the prompt with the generation prompt is not a prefix of prompt + completion",
                ));
            }
            let start = if cfg.completion_only { pre.len() } else { 0 };
            encode_with_spans(tok, &full, &[(start, full.len())])
        }
    }
}

/// Tokenise one SFT example, truncating to `cfg.max_len` from the right and counting it.
pub fn tokenize_sft_example(
    tok: &Tokenizer,
    ex: &SftExample,
    cfg: &SftTokenizeConfig,
    stats: &mut TruncationStats,
) -> Result<TokenizedSft> {
    let (mut input_ids, mut loss_mask) = sft_ids(tok, ex, cfg)?;
    stats.examples += 1;
    if input_ids.len() > cfg.max_len {
        stats.truncated += 1;
        stats.tokens_dropped += input_ids.len() - cfg.max_len;
        input_ids.truncate(cfg.max_len);
        loss_mask.truncate(cfg.max_len);
    }
    let out = TokenizedSft {
        input_ids,
        loss_mask,
        segments: vec![],
    };
    if out.n_loss_tokens() == 0 {
        stats.no_loss_left += 1;
    }
    Ok(out)
}

/// Tokenise SFT examples; errors name the example index.
pub fn tokenize_sft(
    tok: &Tokenizer,
    examples: &[SftExample],
    cfg: &SftTokenizeConfig,
) -> Result<(Vec<TokenizedSft>, TruncationStats)> {
    let mut stats = TruncationStats::default();
    let out = examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            tokenize_sft_example(tok, ex, cfg, &mut stats)
                .with_context(|| format!("SFT example {i}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((out, stats))
}

// ---------------------------------------------------------------------------------------------
// Prompts and pairs
// ---------------------------------------------------------------------------------------------

/// Token ids of a prompt: text with the tokenizer's special tokens (BOS when configured), or a
/// conversation rendered with the chat template and the generation prompt.
pub fn tokenize_prompt(tok: &Tokenizer, prompt: &Prompt) -> Result<Vec<u32>> {
    match prompt {
        Prompt::Text(s) => tok.encode(s, true),
        Prompt::Chat(m) => tok.encode(&render(tok, m, true)?, false),
    }
}

/// How preference pairs are tokenised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairTokenizeConfig {
    /// Prompt + the longer response must fit in this.
    pub max_len: usize,
    /// Prompts longer than this are always cut from the left. When prompt + response is too
    /// long, the prompt is cut (from the left) only as far as needed, but not below
    /// `min(prompt length, max_prompt_len or max_len/2)`; then the responses are cut.
    pub max_prompt_len: Option<usize>,
}

impl Default for PairTokenizeConfig {
    fn default() -> Self {
        Self {
            max_len: 1024,
            max_prompt_len: None,
        }
    }
}

/// One tokenised preference pair. Response ids end with EOS unless truncated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizedPair {
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    pub margin: Option<f32>,
    pub group: usize,
}

impl TokenizedPair {
    /// The longer row of the pair (prompt + response): the width a batch holding it pads to.
    pub fn len(&self) -> usize {
        self.prompt_ids.len() + self.chosen_ids.len().max(self.rejected_ids.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens of the pair's row in a shared-prompt batch: prompt + both responses.
    pub fn shared_len(&self) -> usize {
        self.prompt_ids.len() + self.chosen_ids.len() + self.rejected_ids.len()
    }

    /// How many tokens of `(chosen, rejected)` a batch scores: all of them, except the first
    /// token of a response to an empty prompt, which nothing predicts (the counts the log-prob
    /// passes return; [`crate::batch::ResponseSlot::predictor`]).
    pub fn predicted_tokens(&self) -> [usize; 2] {
        let first_unpredicted = |r: &[u32]| (self.prompt_ids.is_empty() && !r.is_empty()) as usize;
        [
            self.chosen_ids.len() - first_unpredicted(&self.chosen_ids),
            self.rejected_ids.len() - first_unpredicted(&self.rejected_ids),
        ]
    }

    /// The width the pair takes in a batch: its shared row ([`TokenizedPair::shared_len`]) when
    /// prompts are shared, else its longer row ([`TokenizedPair::len`]).
    pub fn width(&self, share_prompts: bool) -> usize {
        match share_prompts {
            true => self.shared_len(),
            false => self.len(),
        }
    }
}

/// Response ids: text after a text prompt, or the template's rendering of an assistant turn
/// after a conversational prompt. EOS appended when not already last.
pub fn tokenize_response(tok: &Tokenizer, prompt: &Prompt, response: &str) -> Result<Vec<u32>> {
    let mut ids = match prompt {
        Prompt::Text(_) => tok.encode(response, false)?,
        Prompt::Chat(m) => {
            let pre = render(tok, m, true)?;
            let mut all = m.clone();
            all.push(ChatMessage::new("assistant", response));
            let full = render(tok, &all, false)?;
            let Some(tail) = full.strip_prefix(pre.as_str()) else {
                return Err(prefix_error(
                    "the prompt with the generation prompt is not a prefix of prompt + response",
                ));
            };
            tok.encode(tail, false)?
        }
    };
    push_eos(tok, &mut ids);
    Ok(ids)
}

/// Cut `ids` from the left to `keep` tokens, keeping a leading BOS.
fn cut_left(ids: &mut Vec<u32>, keep: usize, bos: Option<u32>) {
    if ids.len() <= keep {
        return;
    }
    let keep_bos = keep >= 2 && bos.is_some() && ids.first() == bos.as_ref();
    let drop = ids.len() - keep;
    if keep_bos {
        ids.drain(1..1 + drop);
    } else {
        ids.drain(..drop);
    }
}

/// Tokenise one pair and fit it into `cfg.max_len` (prompt cut from the left, responses from
/// the right), counting what was cut.
pub fn tokenize_pair(
    tok: &Tokenizer,
    pair: &PreferencePair,
    cfg: &PairTokenizeConfig,
    stats: &mut TruncationStats,
) -> Result<TokenizedPair> {
    if cfg.max_len < 2 {
        bail!("max_len must be at least 2 for preference pairs");
    }
    let mut prompt_ids = tokenize_prompt(tok, &pair.prompt)?;
    let mut chosen_ids = tokenize_response(tok, &pair.prompt, &pair.chosen)?;
    let mut rejected_ids = tokenize_response(tok, &pair.prompt, &pair.rejected)?;
    stats.examples += 1;
    let before = prompt_ids.len() + chosen_ids.len() + rejected_ids.len();
    let p0 = prompt_ids.len();
    let bos = tok.bos_id();
    let cap = cfg
        .max_prompt_len
        .unwrap_or(cfg.max_len / 2)
        .clamp(1, cfg.max_len - 1);
    if let Some(mp) = cfg.max_prompt_len {
        cut_left(&mut prompt_ids, mp.clamp(1, cfg.max_len - 1), bos);
    }
    let r = chosen_ids.len().max(rejected_ids.len());
    if prompt_ids.len() + r > cfg.max_len {
        let floor = prompt_ids.len().min(cap);
        let keep = cfg.max_len.saturating_sub(r).max(floor);
        cut_left(&mut prompt_ids, keep, bos);
        let budget = cfg.max_len - prompt_ids.len();
        for ids in [&mut chosen_ids, &mut rejected_ids] {
            if ids.len() > budget {
                ids.truncate(budget);
                stats.responses_truncated += 1;
            }
        }
    }
    if prompt_ids.len() < p0 {
        stats.prompts_truncated += 1;
    }
    let after = prompt_ids.len() + chosen_ids.len() + rejected_ids.len();
    if after < before {
        stats.truncated += 1;
        stats.tokens_dropped += before - after;
    }
    Ok(TokenizedPair {
        prompt_ids,
        chosen_ids,
        rejected_ids,
        margin: pair.margin,
        group: pair.group,
    })
}

/// Tokenise pairs; errors name the pair's source line.
pub fn tokenize_pairs(
    tok: &Tokenizer,
    pairs: &[PreferencePair],
    cfg: &PairTokenizeConfig,
) -> Result<(Vec<TokenizedPair>, TruncationStats)> {
    let mut stats = TruncationStats::default();
    let out = pairs
        .iter()
        .map(|p| {
            tokenize_pair(tok, p, cfg, &mut stats)
                .with_context(|| format!("preference pair from line {}", p.source_line))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((out, stats))
}

// ---------------------------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------------------------

/// Several SFT examples packed into one row of at most `max_len` tokens. `position_ids` restart
/// at 0 for each example; `seq_starts` are the offsets where examples begin; `segments` tell
/// the model which tokens belong together (attention stays within an example). The first token
/// of each example has its loss mask off (it would be predicted from the previous example).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedSft {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
    pub position_ids: Vec<u32>,
    pub seq_starts: Vec<usize>,
    /// Segment id per token: 1 for the first example, 2 for the second, …
    pub segments: Vec<u8>,
}

impl From<PackedSft> for TokenizedSft {
    /// A packed row as one training row: its segments keep the examples apart.
    fn from(p: PackedSft) -> Self {
        TokenizedSft {
            input_ids: p.input_ids,
            loss_mask: p.loss_mask,
            segments: p.segments,
        }
    }
}

/// At most this many examples share a packed row (segment ids are one byte; 0 means padding).
pub const MAX_SEGMENTS: usize = 255;

/// Pack examples into rows of at most `max_len` tokens, best-fit decreasing (examples are never
/// split; longer ones are cut to `max_len`, empty ones skipped). Deterministic.
pub fn pack(examples: &[TokenizedSft], max_len: usize) -> Vec<PackedSft> {
    pack_refs(&examples.iter().collect::<Vec<_>>(), max_len)
}

/// [`pack`] over borrowed examples: also how a batch is laid out padding-free (its examples
/// in rows as wide as its longest).
pub fn pack_refs(examples: &[&TokenizedSft], max_len: usize) -> Vec<PackedSft> {
    assert!(max_len > 0, "pack: max_len must be positive");
    let lens: Vec<usize> = examples.iter().map(|e| e.len().min(max_len)).collect();
    pack_bins(&lens, max_len)
        .into_iter()
        .map(|members| {
            let mut row = PackedSft {
                input_ids: Vec::new(),
                loss_mask: Vec::new(),
                position_ids: Vec::new(),
                seq_starts: Vec::new(),
                segments: Vec::new(),
            };
            for (k, i) in members.into_iter().enumerate() {
                let ex = examples[i];
                let len = lens[i];
                row.seq_starts.push(row.input_ids.len());
                row.input_ids.extend_from_slice(&ex.input_ids[..len]);
                row.loss_mask.push(false);
                row.loss_mask.extend_from_slice(&ex.loss_mask[1..len]);
                row.position_ids.extend(0..len as u32);
                row.segments.extend(std::iter::repeat_n(k as u8 + 1, len));
            }
            row
        })
        .collect()
}

/// Items of lengths `lens` (each at most `max_len`) in bins of at most `max_len` tokens and
/// [`MAX_SEGMENTS`] items, best-fit decreasing (ties in input order); empty items are skipped.
/// Each bin lists its items in the order they were placed. Deterministic.
pub fn pack_bins(lens: &[usize], max_len: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).filter(|&i| lens[i] > 0).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut fill: Vec<usize> = Vec::new();
    // remaining capacity -> bins with exactly that much room (in creation order)
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        let len = lens[i];
        let found = by_room.range(len..).next().map(|(&room, bs)| (room, bs[0]));
        let b = match found {
            Some((room, b)) => {
                let v = by_room.get_mut(&room).expect("present");
                v.remove(0);
                if v.is_empty() {
                    by_room.remove(&room);
                }
                b
            }
            None => {
                bins.push(Vec::new());
                fill.push(0);
                bins.len() - 1
            }
        };
        bins[b].push(i);
        fill[b] += len;
        let room = max_len - fill[b];
        if room > 0 && bins[b].len() < MAX_SEGMENTS {
            let v = by_room.entry(room).or_default();
            let pos = v.partition_point(|&x| x < b);
            v.insert(pos, b);
        }
    }
    bins
}
