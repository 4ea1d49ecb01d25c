//! Batches (row-major, right-padded for training, left-padded prompts for generation) and a
//! seeded, resumable data order with group-aware batching.

use std::collections::HashMap;

use rlhf_model::ops::PrefixRow;
use serde::{Deserialize, Serialize};

use crate::tokenize::{pack_bins, PackedSft, TokenizedPair, TokenizedSft};

/// A right-padded batch, row-major `[batch, seq_len]`. Padding has attention 0 and loss 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<u8>,
    pub loss_mask: Vec<u8>,
    pub batch: usize,
    pub seq_len: usize,
}

impl Batch {
    /// Right-pad `(ids, loss_mask)` rows to the longest.
    pub fn right_padded<'a>(
        rows: impl IntoIterator<Item = (&'a [u32], &'a [bool])>,
        pad_id: u32,
    ) -> Batch {
        let rows: Vec<(&[u32], &[bool])> = rows.into_iter().collect();
        let seq_len = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let n = rows.len() * seq_len;
        let mut b = Batch {
            input_ids: Vec::with_capacity(n),
            attention_mask: Vec::with_capacity(n),
            loss_mask: Vec::with_capacity(n),
            batch: rows.len(),
            seq_len,
        };
        for (ids, mask) in rows {
            debug_assert_eq!(ids.len(), mask.len());
            b.input_ids.extend_from_slice(ids);
            b.attention_mask.extend(std::iter::repeat_n(1u8, ids.len()));
            b.loss_mask.extend(mask.iter().map(|&m| m as u8));
            let pad = seq_len - ids.len();
            b.input_ids.extend(std::iter::repeat_n(pad_id, pad));
            b.attention_mask.extend(std::iter::repeat_n(0u8, pad));
            b.loss_mask.extend(std::iter::repeat_n(0u8, pad));
        }
        b
    }

    /// Token ids of row `i` (with padding).
    pub fn row(&self, i: usize) -> &[u32] {
        &self.input_ids[i * self.seq_len..(i + 1) * self.seq_len]
    }

    /// Real (non-padding) tokens in the batch.
    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m != 0).count()
    }

    /// Number of real (non-padding) tokens in row `i`.
    pub fn row_len(&self, i: usize) -> usize {
        self.attention_mask[i * self.seq_len..(i + 1) * self.seq_len]
            .iter()
            .map(|&m| m as usize)
            .sum()
    }
}

/// Collate SFT examples into a right-padded batch. Packed rows put their segment ids into the
/// attention mask (0 stays padding), so their examples do not attend to each other.
pub fn collate_sft<'a>(rows: impl IntoIterator<Item = &'a TokenizedSft>, pad_id: u32) -> Batch {
    let rows: Vec<&TokenizedSft> = rows.into_iter().collect();
    let mut b = Batch::right_padded(
        rows.iter()
            .map(|r| (r.input_ids.as_slice(), r.loss_mask.as_slice())),
        pad_id,
    );
    for (r, row) in rows.iter().enumerate() {
        if !row.segments.is_empty() {
            let t = b.seq_len;
            b.attention_mask[r * t..r * t + row.segments.len()].copy_from_slice(&row.segments);
        }
    }
    b
}

/// A batch of packed rows with per-token position ids (restarting per example; 0 on padding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedBatch {
    pub batch: Batch,
    pub position_ids: Vec<u32>,
}

/// Collate packed rows (see [`crate::tokenize::pack`]).
pub fn collate_packed<'a>(
    rows: impl IntoIterator<Item = &'a PackedSft>,
    pad_id: u32,
) -> PackedBatch {
    let rows: Vec<&PackedSft> = rows.into_iter().collect();
    let batch = Batch::right_padded(
        rows.iter()
            .map(|r| (r.input_ids.as_slice(), r.loss_mask.as_slice())),
        pad_id,
    );
    let mut position_ids = Vec::with_capacity(batch.batch * batch.seq_len);
    for r in &rows {
        position_ids.extend_from_slice(&r.position_ids);
        position_ids.extend(std::iter::repeat_n(0, batch.seq_len - r.position_ids.len()));
    }
    PackedBatch {
        batch,
        position_ids,
    }
}

/// Item indices in chunks of at most `per_chunk`, longest first (ties in their own order), for
/// passes with no gradient, where each item's result does not depend on which others share its
/// chunk: a chunk pads its rows to its longest one, so chunks of similar lengths compute on
/// real tokens instead of padding. In data order, batches of 8 HH-RLHF pairs at 512 tokens
/// are about half real tokens; sorted by length, 90% (pairs) to 100% (single rows). Callers put
/// the results back in item order by index. Longest first, so a chunk too large for memory
/// fails at once.
pub fn length_chunks(lens: &[usize], per_chunk: usize) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    idx.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    idx.chunks(per_chunk.max(1)).map(|c| c.to_vec()).collect()
}

/// The indices of items with identical prompts, a group per distinct prompt, in order of
/// first appearance (and each group in item order).
fn prompt_groups<'a>(prompts: impl IntoIterator<Item = &'a [u32]>) -> Vec<Vec<usize>> {
    let mut group_of: std::collections::HashMap<&[u32], usize> = Default::default();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, p) in prompts.into_iter().enumerate() {
        let g = *group_of.entry(p).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    groups
}

/// [`length_chunks`] for `(prompt, response)` items scored together ([`collate_shared`]):
/// items with the same prompt go into one chunk, so their prompt is computed once. Prompt
/// groups (the prompt and each of its responses) are taken longest first, and a chunk closes
/// once it holds `per_chunk` items; a group of more than `per_chunk` items is cut into chunks
/// of its own. Every item appears once.
pub fn prompt_chunks(items: &[(&[u32], &[u32])], per_chunk: usize) -> Vec<Vec<usize>> {
    let per_chunk = per_chunk.max(1);
    let mut groups: Vec<(usize, Vec<usize>)> = prompt_groups(items.iter().map(|(p, _)| *p))
        .into_iter()
        .map(|g| {
            let len = items[g[0]].0.len() + g.iter().map(|&i| items[i].1.len()).sum::<usize>();
            (len, g)
        })
        .collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.0));
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    let mut cur = Vec::new();
    for (_, members) in groups {
        for piece in members.chunks(per_chunk) {
            if !cur.is_empty() && cur.len() + piece.len() > per_chunk {
                chunks.push(std::mem::take(&mut cur));
            }
            cur.extend_from_slice(piece);
        }
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    chunks
}

/// The share of a batching's padded tokens that are real: each batch (of item indices) pads
/// to its longest item, `lens[i]` being item `i`'s length.
pub fn real_token_share(batches: &[Vec<usize>], lens: &[usize]) -> f64 {
    token_share(batches.iter().map(|b| padded_tokens(b, lens)))
}

/// Real tokens and padded slots of one batch of items (one row each, padded to the longest).
pub fn padded_tokens(batch: &[usize], lens: &[usize]) -> (usize, usize) {
    let real = batch.iter().map(|&i| lens[i]).sum();
    (
        real,
        batch.len() * batch.iter().map(|&i| lens[i]).max().unwrap_or(0),
    )
}

/// Real tokens over slots, summed over batches' `(real, slots)`.
pub fn token_share(batches: impl IntoIterator<Item = (usize, usize)>) -> f64 {
    let (real, slots) = batches
        .into_iter()
        .fold((0, 0), |(r, s), (a, b)| (r + a, s + b));
    real as f64 / slots.max(1) as f64
}

/// Left-pad prompts for generation: `(ids, attention_mask, seq_len)`, row-major.
pub fn left_pad_prompts(prompts: &[Vec<u32>], pad: u32) -> (Vec<u32>, Vec<u8>, usize) {
    let seq_len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * seq_len);
    let mut mask = Vec::with_capacity(prompts.len() * seq_len);
    for p in prompts {
        let padn = seq_len - p.len();
        ids.extend(std::iter::repeat_n(pad, padn));
        mask.extend(std::iter::repeat_n(0u8, padn));
        ids.extend_from_slice(p);
        mask.extend(std::iter::repeat_n(1u8, p.len()));
    }
    (ids, mask, seq_len)
}

/// A batch of `B` preference pairs as `2B` rows: rows `0..B` are prompt+chosen, rows `B..2B`
/// prompt+rejected (same order). `loss_mask` marks response tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairBatch {
    pub batch: Batch,
    /// Number of pairs `B`.
    pub pairs: usize,
    /// Per row (2B): index of the last response token (where a reward model reads its score).
    pub last_index: Vec<usize>,
    /// Per row (2B): prompt length (the first response token's index).
    pub prompt_len: Vec<usize>,
    /// Per pair (B).
    pub margin: Vec<Option<f32>>,
    /// Per pair (B).
    pub group: Vec<usize>,
}

/// Collate preference pairs: chosen rows first, then rejected rows.
pub fn collate_pairs<'a>(
    pairs: impl IntoIterator<Item = &'a TokenizedPair>,
    pad_id: u32,
) -> PairBatch {
    let pairs: Vec<&TokenizedPair> = pairs.into_iter().collect();
    let mut rows: Vec<(Vec<u32>, Vec<bool>)> = Vec::with_capacity(2 * pairs.len());
    let mut last_index = Vec::with_capacity(2 * pairs.len());
    let mut prompt_len = Vec::with_capacity(2 * pairs.len());
    for rejected in [false, true] {
        for p in &pairs {
            let resp = if rejected {
                &p.rejected_ids
            } else {
                &p.chosen_ids
            };
            let mut ids = p.prompt_ids.clone();
            ids.extend_from_slice(resp);
            let mut mask = vec![false; p.prompt_ids.len()];
            mask.resize(ids.len(), true);
            last_index.push(ids.len().saturating_sub(1));
            prompt_len.push(p.prompt_ids.len());
            rows.push((ids, mask));
        }
    }
    let batch = Batch::right_padded(
        rows.iter().map(|(i, m)| (i.as_slice(), m.as_slice())),
        pad_id,
    );
    PairBatch {
        batch,
        pairs: pairs.len(),
        last_index,
        prompt_len,
        margin: pairs.iter().map(|p| p.margin).collect(),
        group: pairs.iter().map(|p| p.group).collect(),
    }
}

/// Where one response of a [`SharedPairBatch`] lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseSlot {
    pub row: usize,
    /// Slot of its prompt group's first token (the prompt's) in the row.
    pub offset: usize,
    /// Length of the prompt it answers (its group's prompt).
    pub prompt_len: usize,
    /// Slot of its first token in the row.
    pub start: usize,
    pub len: usize,
}

impl ResponseSlot {
    /// Slot of the last token of prompt + response, where a reward model reads its score (the
    /// prompt's last token for an empty response, as in a row of prompt + response alone).
    pub fn last(&self) -> usize {
        if self.len > 0 {
            self.start + self.len - 1
        } else {
            self.offset + self.prompt_len.saturating_sub(1)
        }
    }

    /// The slot whose hidden state predicts response token `j` (the prompt's last token for the
    /// first), `None` for the first token after an empty prompt (nothing predicts it).
    pub fn predictor(&self, j: usize) -> Option<usize> {
        match j {
            0 => self.prompt_len.checked_sub(1).map(|p| self.offset + p),
            _ => Some(self.start + j - 1),
        }
    }
}

/// Prompt + response items with every prompt computed once: one row per distinct prompt (in
/// order of first appearance), holding the prompt, then each distinct response to it, each
/// seeing only the prompt and itself ([`PrefixRow`]). The numbers of one row of prompt +
/// response per item, from fewer tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedBatch {
    /// Row-major `[rows, seq_len]`, right-padded.
    pub input_ids: Vec<u32>,
    pub seq_len: usize,
    /// Each row's prompt groups, back to back.
    pub rows: Vec<Vec<PrefixRow>>,
    /// Every distinct (prompt, response) once.
    pub responses: Vec<ResponseSlot>,
    /// Per item: its index into `responses`.
    pub item_response: Vec<usize>,
}

impl SharedBatch {
    /// Real (non-padding) tokens.
    pub fn real_tokens(&self) -> usize {
        self.rows.iter().flatten().map(PrefixRow::len).sum()
    }

    /// Prompt groups (a prompt and the responses that follow it), over all rows.
    pub fn groups(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }

    /// Slots the model computes: rows × width.
    pub fn slots(&self) -> usize {
        self.rows.len() * self.seq_len
    }
}

/// How many attention keys cost as much as one token through a layer's products, for a model
/// of hidden size `d`: a key costs ≈ 4·d multiply-adds per query (q·k and p·v), a token ≈ 24·d²
/// through GPT-2's projections and MLP (more with Llama's wider MLP), so ≈ 6·d keys.
pub fn key_ratio(hidden_size: usize) -> usize {
    6 * hidden_size
}

/// Collate `(prompt, response)` items into a [`SharedBatch`]: each distinct prompt once, each
/// distinct response to it once. A response joins its prompt's row while that pays: its
/// queries also compute (masked) scores over the row's earlier responses, `len × earlier`
/// keys, which must cost less than the prompt it saves, `key_ratio` ([`key_ratio`]) keys per
/// prompt token; otherwise it starts another row of the same prompt. (Long responses to a short
/// prompt, K of them, would otherwise spend ~K²/2 response lengths of attention.) The prompt
/// groups then go back to back into rows as wide as the longest group ([`pack_bins`]), each
/// attending to itself only: the same numbers in fewer slots.
pub fn collate_shared<'a>(
    items: impl IntoIterator<Item = (&'a [u32], &'a [u32])>,
    pad_id: u32,
    key_ratio: usize,
) -> SharedBatch {
    // The prompt's latest row.
    let mut row_of: HashMap<&[u32], usize> = HashMap::new();
    let mut row_ids: Vec<Vec<u32>> = vec![];
    let mut rows: Vec<PrefixRow> = vec![];
    let mut response_of: HashMap<(&[u32], &[u32]), usize> = HashMap::new();
    let mut responses: Vec<ResponseSlot> = vec![];
    let mut item_response = vec![];
    for (prompt, resp) in items {
        let k = *response_of.entry((prompt, resp)).or_insert_with(|| {
            // Response tokens already in row r.
            let earlier = |r: usize| rows[r].len() - rows[r].prompt;
            let r = match row_of.get(prompt) {
                Some(&r) if resp.len() * earlier(r) <= key_ratio * prompt.len() => r,
                _ => {
                    row_ids.push(prompt.to_vec());
                    rows.push(PrefixRow {
                        prompt: prompt.len(),
                        responses: vec![],
                    });
                    rows.len() - 1
                }
            };
            row_of.insert(prompt, r);
            responses.push(ResponseSlot {
                row: r,
                offset: 0,
                prompt_len: rows[r].prompt,
                start: row_ids[r].len(),
                len: resp.len(),
            });
            row_ids[r].extend_from_slice(resp);
            rows[r].responses.push(resp.len());
            responses.len() - 1
        });
        item_response.push(k);
    }
    // Groups (the rows built above) into rows, each group's slots moved to where it lands.
    let seq_len = row_ids.iter().map(Vec::len).max().unwrap_or(0);
    let lens: Vec<usize> = row_ids.iter().map(Vec::len).collect();
    let bins = pack_bins(&lens, seq_len.max(1));
    let mut place = vec![(0, 0); rows.len()];
    let mut input_ids = Vec::with_capacity(bins.len() * seq_len);
    let mut packed = Vec::with_capacity(bins.len());
    for (b, groups) in bins.iter().enumerate() {
        let start = input_ids.len();
        for &g in groups {
            place[g] = (b, input_ids.len() - start);
            input_ids.extend_from_slice(&row_ids[g]);
        }
        input_ids.resize(start + seq_len, pad_id);
        packed.push(groups.iter().map(|&g| rows[g].clone()).collect());
    }
    // Empty groups (an empty prompt with empty responses) hold no slot: place them anywhere.
    for r in &mut responses {
        let (b, o) = place[r.row];
        (r.row, r.offset, r.start) = (b, o, r.start + o);
    }
    SharedBatch {
        input_ids,
        seq_len,
        rows: packed,
        responses,
        item_response,
    }
}

/// A batch of `B` preference pairs with every prompt computed once ([`SharedBatch`]): a pair's
/// two responses, or a K-way ranking's K responses however many pairs it gave, follow their
/// prompt in one row. Same numbers as a [`PairBatch`], fewer tokens: on HH-RLHF the prompts are
/// about 70% of a [`PairBatch`]'s real tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedPairBatch {
    pub batch: SharedBatch,
    /// Per pair: indices into `batch.responses` of its chosen and its rejected response.
    pub pair_responses: Vec<[usize; 2]>,
    /// Per pair.
    pub margin: Vec<Option<f32>>,
    /// Per pair.
    pub group: Vec<usize>,
}

impl SharedPairBatch {
    pub fn pairs(&self) -> usize {
        self.pair_responses.len()
    }

    /// Indices into `batch.responses` of every pair's chosen response, then of every pair's
    /// rejected one: the row order of a [`PairBatch`] (`[2B]`).
    pub fn pair_order(&self) -> Vec<usize> {
        let side = |s: usize| self.pair_responses.iter().map(move |p| p[s]);
        side(0).chain(side(1)).collect()
    }
}

/// Collate preference pairs into a [`SharedPairBatch`] (rows as [`collate_shared`] builds them).
pub fn collate_shared_pairs<'a>(
    pairs: impl IntoIterator<Item = &'a TokenizedPair>,
    pad_id: u32,
    key_ratio: usize,
) -> SharedPairBatch {
    let pairs: Vec<&TokenizedPair> = pairs.into_iter().collect();
    let items = pairs.iter().flat_map(|p| {
        [&p.chosen_ids, &p.rejected_ids].map(|r| (p.prompt_ids.as_slice(), r.as_slice()))
    });
    let batch = collate_shared(items, pad_id, key_ratio);
    let pair_responses = batch
        .item_response
        .chunks(2)
        .map(|c| [c[0], c[1]])
        .collect();
    SharedPairBatch {
        batch,
        pair_responses,
        margin: pairs.iter().map(|p| p.margin).collect(),
        group: pairs.iter().map(|p| p.group).collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Data order
// ---------------------------------------------------------------------------------------------

/// The permutation of `0..n` used for `epoch` under `seed` (Fisher–Yates).
pub fn epoch_permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    // `Rng::new` warms up once, so that nearby seeds diverge.
    let mut rng = crate::rng::Rng::new(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        p.swap(i, j);
    }
    p
}

/// How many recent underfull batches group-aware batching tries to fill before opening another.
const GROUP_WINDOW: usize = 8;

/// Length-grouped batching sorts within windows of this many batches' worth of items (Hugging
/// Face's `LengthGroupedSampler` uses 50): wide enough that neighbours have similar lengths,
/// narrow enough that a window still holds a random draw of the data.
pub const LENGTH_WINDOW: usize = 50;

/// A seeded shuffling order over a dataset, resumable exactly: serialise it (serde) with a
/// checkpoint, deserialise, and the following batches are the same as without the interruption.
/// Each epoch is a fresh permutation; batches never straddle epochs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataOrder {
    pub seed: u64,
    pub batch_size: usize,
    /// Drop the last batch of an epoch when it is smaller than `batch_size`.
    pub drop_last: bool,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Batches already taken in the current epoch.
    pub position: usize,
    #[serde(skip)]
    cache: Option<(u64, u64, Vec<Vec<usize>>)>, // (epoch, dataset fingerprint, plan)
}

impl PartialEq for DataOrder {
    fn eq(&self, o: &Self) -> bool {
        self.seed == o.seed
            && self.batch_size == o.batch_size
            && self.drop_last == o.drop_last
            && self.epoch == o.epoch
            && self.position == o.position
    }
}

fn fingerprint(kind: u64, data: &[usize]) -> u64 {
    // FNV-1a over the group ids (or just the length for ungrouped orders).
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ kind;
    for &x in data {
        h = (h ^ x as u64).wrapping_mul(0x100_0000_01b3);
    }
    (h ^ data.len() as u64).wrapping_mul(0x100_0000_01b3)
}

/// Items grouped by group id, groups in order of first appearance, items in their order.
fn group_units(groups: &[usize]) -> Vec<Vec<usize>> {
    let mut first_seen: HashMap<usize, usize> = HashMap::new();
    let mut units: Vec<Vec<usize>> = Vec::new();
    for (i, &g) in groups.iter().enumerate() {
        let u = *first_seen.entry(g).or_insert_with(|| {
            units.push(Vec::new());
            units.len() - 1
        });
        units[u].push(i);
    }
    units
}

/// Units taken in `order` into batches of at most `bs` items: a unit that fits lands whole in
/// the first of the last few underfull batches with room; a unit larger than `bs` is split.
fn pack_units(units: &[Vec<usize>], order: &[usize], bs: usize) -> Vec<Vec<usize>> {
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut open: Vec<usize> = Vec::new(); // indices of underfull batches, oldest first
    for &u in order {
        let unit = &units[u];
        if unit.len() > bs {
            for c in unit.chunks(bs) {
                batches.push(c.to_vec());
                if c.len() < bs {
                    open.push(batches.len() - 1);
                }
            }
        } else if let Some(k) = open
            .iter()
            .position(|&b| batches[b].len() + unit.len() <= bs)
        {
            let b = open[k];
            batches[b].extend_from_slice(unit);
            if batches[b].len() == bs {
                open.remove(k);
            }
        } else {
            batches.push(unit.clone());
            if unit.len() < bs {
                open.push(batches.len() - 1);
            }
        }
        if open.len() > GROUP_WINDOW {
            open.remove(0);
        }
    }
    batches
}

impl DataOrder {
    pub fn new(seed: u64, batch_size: usize) -> Self {
        assert!(batch_size > 0, "DataOrder: batch_size must be positive");
        Self {
            seed,
            batch_size,
            drop_last: false,
            epoch: 0,
            position: 0,
            cache: None,
        }
    }

    pub fn with_drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self.cache = None;
        self
    }

    /// The batches of `epoch` for a dataset of `n` items.
    pub fn plan(&self, epoch: u64, n: usize) -> Vec<Vec<usize>> {
        let perm = epoch_permutation(self.seed, epoch, n);
        let mut out: Vec<Vec<usize>> = perm.chunks(self.batch_size).map(|c| c.to_vec()).collect();
        if self.drop_last && out.last().is_some_and(|b| b.len() < self.batch_size) {
            out.pop();
        }
        out
    }

    /// The batches of `epoch` when item `i` belongs to group `groups[i]`: groups are shuffled as
    /// units and every group that fits in a batch lands whole in one batch (first fit among the
    /// last few underfull batches); a group larger than `batch_size` is split. Batches may hold
    /// fewer than `batch_size` items. Item order inside a group is kept.
    pub fn grouped_plan(&self, epoch: u64, groups: &[usize]) -> Vec<Vec<usize>> {
        let units = group_units(groups);
        let perm = epoch_permutation(self.seed, epoch, units.len());
        let mut batches = pack_units(&units, &perm, self.batch_size);
        if self.drop_last && batches.last().is_some_and(|b| b.len() < self.batch_size) {
            batches.pop();
        }
        batches
    }

    /// The batches of `epoch` with similar lengths in each (Hugging Face's `group_by_length`):
    /// `lens[i]` is item `i`'s padded width, `groups` as in [`DataOrder::grouped_plan`] (a
    /// group's width is its longest item's). Units are shuffled as in the other plans, then
    /// sorted longest first within windows of [`LENGTH_WINDOW`] batches' worth of items, and
    /// batched; the batches are then shuffled (so the loss curve shows no long-to-short saw
    /// tooth) and the widest goes first, so a batch too large for memory fails at once. Every
    /// item still appears once per epoch; which items share a batch is no longer uniform.
    pub fn length_grouped_plan(
        &self,
        epoch: u64,
        groups: Option<&[usize]>,
        lens: &[usize],
    ) -> Vec<Vec<usize>> {
        let units: Vec<Vec<usize>> = match groups {
            Some(g) => group_units(g),
            None => (0..lens.len()).map(|i| vec![i]).collect(),
        };
        let width = |u: &Vec<usize>| u.iter().map(|&i| lens[i]).max().unwrap_or(0);
        let mut perm = epoch_permutation(self.seed, epoch, units.len());
        let window = LENGTH_WINDOW * self.batch_size;
        let mut start = 0;
        while start < perm.len() {
            let (mut end, mut items) = (start, 0);
            while end < perm.len() && items < window {
                items += units[perm[end]].len();
                end += 1;
            }
            perm[start..end].sort_by_key(|&u| std::cmp::Reverse(width(&units[u])));
            start = end;
        }
        let mut batches = pack_units(&units, &perm, self.batch_size);
        if self.drop_last && batches.last().is_some_and(|b| b.len() < self.batch_size) {
            batches.pop();
        }
        let mut rng = crate::rng::Rng::stream(self.seed ^ epoch.wrapping_mul(0x9E37_79B9), 0x1E46);
        for i in (1..batches.len()).rev() {
            batches.swap(i, rng.below(i + 1));
        }
        let padded = |b: &Vec<usize>| b.len() * width(b);
        if let Some(w) = (0..batches.len()).max_by_key(|&i| (padded(&batches[i]), usize::MAX - i)) {
            batches.swap(0, w);
        }
        batches
    }

    fn take(&mut self, fp: u64, make: impl Fn(&Self, u64) -> Vec<Vec<usize>>) -> Vec<usize> {
        for _ in 0..2 {
            let fresh = !matches!(&self.cache, Some((e, f, _)) if *e == self.epoch && *f == fp);
            if fresh {
                let plan = make(self, self.epoch);
                self.cache = Some((self.epoch, fp, plan));
            }
            let plan = &self.cache.as_ref().expect("just set").2;
            if self.position < plan.len() {
                let b = plan[self.position].clone();
                self.position += 1;
                return b;
            }
            if plan.is_empty() {
                return Vec::new();
            }
            self.epoch += 1;
            self.position = 0;
        }
        Vec::new()
    }

    /// The next batch of item indices for a dataset of `n` items (moving to the next epoch when
    /// this one is exhausted). Empty only when the dataset yields no batch at all.
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        let fp = fingerprint(1, &[n]);
        self.take(fp, |s, e| s.plan(e, n))
    }

    /// The next group-aware batch (see [`DataOrder::grouped_plan`]); `groups[i]` is item `i`'s
    /// group (e.g. [`crate::formats::PreferencePair::group`]).
    pub fn next_grouped_batch(&mut self, groups: &[usize]) -> Vec<usize> {
        let fp = fingerprint(2, groups);
        self.take(fp, |s, e| s.grouped_plan(e, groups))
    }

    /// Number of batches per epoch for a dataset of `n` items (ungrouped).
    pub fn batches_per_epoch(&self, n: usize) -> usize {
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_chunks_sort_longest_first_and_cover_every_item_once() {
        let lens = [3, 9, 1, 9, 4, 7, 2];
        let chunks = length_chunks(&lens, 3);
        assert_eq!(chunks, vec![vec![1, 3, 5], vec![4, 0, 6], vec![2]]);
        let mut all: Vec<usize> = chunks.concat();
        all.sort();
        assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
        // Each chunk pads to its longest: 27 + 12 + 1 padded tokens, against 27 + 27 + 2 in
        // data order, for 35 real ones.
        let in_order: Vec<Vec<usize>> = (0..lens.len())
            .collect::<Vec<_>>()
            .chunks(3)
            .map(|c| c.to_vec())
            .collect();
        assert_eq!(real_token_share(&chunks, &lens), 35.0 / 40.0);
        assert_eq!(real_token_share(&in_order, &lens), 35.0 / 56.0);
        assert!(length_chunks(&[], 4).is_empty());
        assert_eq!(length_chunks(&[5, 5], 0), vec![vec![0], vec![1]]);
    }

    #[test]
    fn prompt_chunks_keep_a_prompts_items_together_longest_first() {
        let (a, b, c, d) = (
            &[1u32, 2, 3][..],
            &[4u32][..],
            &[5u32, 6][..],
            &[7u32; 9][..],
        );
        let r = |n: usize| vec![9u32; n];
        let (r1, r2, r3, r5, r8) = (r(1), r(2), r(3), r(5), r(8));
        // Prompt a: items 0, 3, 5 (3 + 1 + 2 + 5 = 11 tokens); b: 1, 6 (1 + 8 + 3 = 12);
        // c: 2 (2 + 1 = 3); d: 4, 7, 8, 9 (9 + 4·1 = 13, four items).
        let items: Vec<(&[u32], &[u32])> = vec![
            (a, &r1),
            (b, &r8),
            (c, &r1),
            (a, &r2),
            (d, &r1),
            (a, &r5),
            (b, &r3),
            (d, &r1),
            (d, &r1),
            (d, &r1),
        ];
        let chunks = prompt_chunks(&items, 3);
        // d (13 tokens, four items) is cut into 3 + 1; b's two items (12) join d's last one.
        assert_eq!(
            chunks,
            vec![vec![4, 7, 8], vec![9, 1, 6], vec![0, 3, 5], vec![2]]
        );
        let mut all = chunks.concat();
        all.sort();
        assert_eq!(all, (0..items.len()).collect::<Vec<_>>());
        for ch in &chunks {
            assert!(ch.len() <= 3);
        }
        assert!(prompt_chunks(&[], 4).is_empty());
        assert_eq!(prompt_chunks(&items[..2], 0), vec![vec![1], vec![0]]);
    }

    #[test]
    fn right_and_left_padding() {
        let a = TokenizedSft {
            input_ids: vec![1, 2, 3],
            loss_mask: vec![false, true, true],
            segments: vec![],
        };
        let b = TokenizedSft {
            input_ids: vec![4],
            loss_mask: vec![true],
            segments: vec![],
        };
        let batch = collate_sft([&a, &b], 0);
        assert_eq!((batch.batch, batch.seq_len), (2, 3));
        assert_eq!(batch.input_ids, vec![1, 2, 3, 4, 0, 0]);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(batch.loss_mask, vec![0, 1, 1, 1, 0, 0]);
        assert_eq!(batch.row(1), &[4, 0, 0]);
        assert_eq!(batch.row_len(0), 3);

        let (ids, mask, len) = left_pad_prompts(&[vec![7, 8], vec![9]], 0);
        assert_eq!(len, 2);
        assert_eq!(ids, vec![7, 8, 0, 9]);
        assert_eq!(mask, vec![1, 1, 0, 1]);
    }

    #[test]
    fn pair_batch_layout() {
        let p = TokenizedPair {
            prompt_ids: vec![1, 2],
            chosen_ids: vec![3, 9],
            rejected_ids: vec![4, 5, 9],
            margin: Some(1.5),
            group: 7,
        };
        let q = TokenizedPair {
            prompt_ids: vec![1],
            chosen_ids: vec![6],
            rejected_ids: vec![7, 9],
            margin: None,
            group: 8,
        };
        let pb = collate_pairs([&p, &q], 0);
        assert_eq!(pb.pairs, 2);
        assert_eq!(pb.batch.batch, 4);
        assert_eq!(pb.batch.seq_len, 5);
        assert_eq!(pb.batch.row(0), &[1, 2, 3, 9, 0]);
        assert_eq!(pb.batch.row(1), &[1, 6, 0, 0, 0]);
        assert_eq!(pb.batch.row(2), &[1, 2, 4, 5, 9]);
        assert_eq!(pb.batch.row(3), &[1, 7, 9, 0, 0]);
        assert_eq!(pb.last_index, vec![3, 1, 4, 2]);
        assert_eq!(pb.prompt_len, vec![2, 1, 2, 1]);
        assert_eq!(&pb.batch.loss_mask[..5], &[0, 0, 1, 1, 0]);
        assert_eq!(&pb.batch.loss_mask[15..], &[0, 1, 1, 0, 0]);
        assert_eq!(pb.margin, vec![Some(1.5), None]);
        assert_eq!(pb.group, vec![7, 8]);
    }

    /// A ranking's pairs share one row: its prompt once, each of its responses once; another
    /// prompt gets its own row; an empty response reads its score at the prompt's last token.
    #[test]
    fn shared_pair_batch_holds_each_prompt_and_response_once() {
        let pair = |prompt: &[u32], c: &[u32], r: &[u32], group| TokenizedPair {
            prompt_ids: prompt.to_vec(),
            chosen_ids: c.to_vec(),
            rejected_ids: r.to_vec(),
            margin: Some(group as f32),
            group,
        };
        // A ranking a > b > c of prompt [1, 2] gives three pairs; prompt [5] one more pair.
        let (a, b, c) = (
            [3u32, 9].as_slice(),
            [4u32].as_slice(),
            [6u32, 7, 9].as_slice(),
        );
        let pairs = [
            pair(&[1, 2], a, b, 0),
            pair(&[5], &[8], &[], 1),
            pair(&[1, 2], a, c, 0),
            pair(&[1, 2], b, c, 0),
        ];
        let sp = collate_shared_pairs(&pairs, 0, 1 << 16);
        assert_eq!(sp.pairs(), 4);
        let sb = &sp.batch;
        assert_eq!(sb.seq_len, 8);
        assert_eq!(&sb.input_ids[..8], &[1, 2, 3, 9, 4, 6, 7, 9]);
        assert_eq!(&sb.input_ids[8..], &[5, 8, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            sb.rows,
            vec![
                vec![PrefixRow {
                    prompt: 2,
                    responses: vec![2, 1, 3]
                }],
                vec![PrefixRow {
                    prompt: 1,
                    responses: vec![1, 0]
                }]
            ]
        );
        // Responses in order of first appearance: a, b, [8], [], c.
        assert_eq!(sp.pair_responses, vec![[0, 1], [2, 3], [0, 4], [1, 4]]);
        let lasts: Vec<usize> = sb.responses.iter().map(ResponseSlot::last).collect();
        assert_eq!(lasts, vec![3, 4, 1, 0, 7]);
        // The same scores as PairBatch's rows: prompt + response, last token.
        let pb = collate_pairs(&pairs, 0);
        for (k, [ch, rj]) in sp.pair_responses.iter().enumerate() {
            assert_eq!(
                sb.responses[*ch].last(),
                pb.last_index[k] - pb.prompt_len[k] + sb.responses[*ch].start
            );
            assert_eq!(sb.responses[*rj].len, pairs[k].rejected_ids.len());
        }
        // Response 4 (c = [6, 7, 9] at slots 5..8): token 0 is predicted from the prompt's last
        // slot, the others from the slot before them in the row.
        let c_slot = sb.responses[4];
        let pred: Vec<Option<usize>> = (0..3).map(|j| c_slot.predictor(j)).collect();
        assert_eq!(pred, vec![Some(1), Some(5), Some(6)]);
        assert_eq!(sb.real_tokens(), 8 + 2);
        assert_eq!(sp.margin, vec![Some(0.0), Some(1.0), Some(0.0), Some(0.0)]);
        assert_eq!(sp.group, vec![0, 1, 0, 0]);
        // A PairBatch holds 8 rows of 1-5 real tokens for these pairs: 27 real tokens.
        assert_eq!(pb.batch.real_tokens(), 27);
    }

    /// Prompt groups shorter than the longest share a row back to back: each response's slots,
    /// its group's offset, its score slot and its predictors move with its group.
    #[test]
    fn prompt_groups_share_rows_back_to_back() {
        let (p1, p2, p3) = ([1u32; 4], [2u32; 2], [3u32]);
        let items = [
            (&p1[..], &[7u32; 6][..]),
            (&p2[..], &[8u32, 9][..]),
            (&p3[..], &[10u32, 11][..]),
            (&p2[..], &[12u32][..]),
            (&p3[..], &[][..]),
        ];
        let sb = collate_shared(items, 0, 1 << 16);
        // Groups of 10, 5 and 3 tokens: the last two share the second row.
        assert_eq!((sb.seq_len, sb.rows.len(), sb.groups()), (10, 2, 3));
        assert_eq!(
            &sb.input_ids[10..],
            &[2, 2, 8, 9, 12, 3, 10, 11, 0, 0],
            "row 2: p2's group, then p3's"
        );
        let r = &sb.responses;
        assert_eq!((r[1].row, r[1].offset, r[1].start), (1, 0, 2));
        assert_eq!((r[2].row, r[2].offset, r[2].start), (1, 5, 6));
        assert_eq!(r[2].predictor(0), Some(5));
        assert_eq!(r[2].predictor(1), Some(6));
        assert_eq!(r[2].last(), 7);
        // p3's empty response scores at its prompt's last slot, not at the row's first.
        assert_eq!((r[4].row, r[4].last()), (1, 5));
        assert_eq!(sb.real_tokens(), 18);
        assert_eq!(sb.slots(), 20);
    }

    /// A response joins its prompt's row while the keys its queries compute over the row's
    /// earlier responses (len × earlier) cost less than the prompt it saves (key_ratio × prompt
    /// tokens); otherwise the prompt gets another row. A repeated response keeps its slot.
    #[test]
    fn shared_rows_split_when_attention_over_earlier_responses_would_cost_more_than_the_prompt() {
        let p = [1u32, 2];
        let (a, b, c) = ([3u32; 10], [4u32; 10], [5u32; 10]);
        let items = [
            (&p[..], &a[..]),
            (&p[..], &b[..]),
            (&p[..], &c[..]),
            (&p[..], &a[..]),
        ];
        let layout = |key_ratio| {
            let sb = collate_shared(items, 0, key_ratio);
            let rows: Vec<Vec<usize>> = sb
                .rows
                .iter()
                .flatten()
                .map(|r| r.responses.clone())
                .collect();
            (rows, sb.item_response, sb.seq_len)
        };
        // Always worth it: one row of the prompt and three responses.
        assert_eq!(
            layout(1 << 16),
            (vec![vec![10, 10, 10]], vec![0, 1, 2, 0], 32)
        );
        // 10 × 10 = 100 ≤ 50 × 2 joins; 10 × 20 = 200 does not.
        assert_eq!(
            layout(50),
            (vec![vec![10, 10], vec![10]], vec![0, 1, 2, 0], 22)
        );
        // Never worth it: one row per response, each with the prompt.
        let (rows, of_item, width) = layout(6);
        assert_eq!(
            (rows, of_item, width),
            (vec![vec![10]; 3], vec![0, 1, 2, 0], 12)
        );
        let sb = collate_shared(items, 0, 6);
        assert_eq!(&sb.input_ids[12..24], &[1, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]);
        assert_eq!(sb.responses[2].row, 2);
        assert_eq!(sb.responses[2].predictor(0), Some(1));
        assert_eq!(key_ratio(576), 3456);
    }

    #[test]
    fn permutation_is_a_permutation_and_varies_by_epoch() {
        let a = epoch_permutation(42, 0, 100);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_ne!(a, epoch_permutation(42, 1, 100));
        assert_ne!(a, epoch_permutation(43, 0, 100));
        assert_eq!(a, epoch_permutation(42, 0, 100));
    }

    #[test]
    fn data_order_covers_each_epoch_and_resumes_exactly() {
        let n = 23;
        let mut o = DataOrder::new(7, 5);
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.extend(o.next_batch(n));
        }
        // 23 items in batches of 5: 5 batches, the last has 3.
        assert_eq!(seen.len(), 23);
        let mut s = seen.clone();
        s.sort();
        assert_eq!(s, (0..n).collect::<Vec<_>>());
        assert_eq!((o.epoch, o.position), (0, 5));
        let b = o.next_batch(n);
        assert_eq!((o.epoch, o.position), (1, 1));
        assert_eq!(b.len(), 5);

        // Resume from a serialised state mid-epoch.
        let mut reference = DataOrder::new(99, 4);
        let mut resumed_at = DataOrder::new(99, 4);
        for _ in 0..9 {
            resumed_at.next_batch(n);
        }
        let json = serde_json::to_string(&resumed_at).unwrap();
        let mut resumed: DataOrder = serde_json::from_str(&json).unwrap();
        assert_eq!(resumed, resumed_at);
        let full: Vec<Vec<usize>> = (0..30).map(|_| reference.next_batch(n)).collect();
        let tail: Vec<Vec<usize>> = (0..21).map(|_| resumed.next_batch(n)).collect();
        assert_eq!(&full[9..], &tail[..]);
    }

    #[test]
    fn drop_last_drops_the_short_batch() {
        let mut o = DataOrder::new(1, 5).with_drop_last(true);
        for _ in 0..8 {
            assert_eq!(o.next_batch(12).len(), 5);
        }
        assert_eq!(o.epoch, 3);
        let mut e = DataOrder::new(1, 5);
        assert!(e.next_batch(0).is_empty());
        let mut tiny = DataOrder::new(1, 5).with_drop_last(true);
        assert!(tiny.next_batch(3).is_empty());
    }

    #[test]
    fn grouped_batches_keep_groups_together() {
        // Groups of sizes 3 (ranking of K=3), 1, 6 (K=4), 1, 1, 10 (K=5), 2.
        let sizes = [3usize, 1, 6, 1, 1, 10, 2];
        let mut groups = Vec::new();
        for (g, &s) in sizes.iter().enumerate() {
            groups.extend(std::iter::repeat_n(g * 10, s));
        }
        let n = groups.len();
        let o = DataOrder::new(5, 8);
        for epoch in 0..4 {
            let plan = o.grouped_plan(epoch, &groups);
            let mut all: Vec<usize> = plan.iter().flatten().copied().collect();
            all.sort();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "every item exactly once");
            for b in &plan {
                assert!(b.len() <= 8 && !b.is_empty());
            }
            // Every group of size <= 8 is inside a single batch.
            for (g, &s) in sizes.iter().enumerate() {
                if s > 8 {
                    continue;
                }
                let holders: Vec<usize> = plan
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.iter().any(|&i| groups[i] == g * 10))
                    .map(|(k, _)| k)
                    .collect();
                assert_eq!(holders.len(), 1, "group {g} split in epoch {epoch}");
            }
        }
        // Resume determinism through serde for grouped batches too.
        let mut a = DataOrder::new(5, 8);
        let first: Vec<Vec<usize>> = (0..10).map(|_| a.next_grouped_batch(&groups)).collect();
        let mut b = DataOrder::new(5, 8);
        for _ in 0..4 {
            b.next_grouped_batch(&groups);
        }
        let mut b: DataOrder = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        let rest: Vec<Vec<usize>> = (0..6).map(|_| b.next_grouped_batch(&groups)).collect();
        assert_eq!(&first[4..], &rest[..]);
        // Groups of one item each batch exactly as the ungrouped plan.
        let o = DataOrder::new(9, 4);
        let singles: Vec<usize> = (0..23).map(|i| 100 + i).collect();
        assert_eq!(o.grouped_plan(2, &singles), o.plan(2, 23));
    }

    #[test]
    fn length_grouped_batches_pad_less_and_keep_the_plan_contract() {
        // Lengths with a long tail, as chat data has (most short, a few near the limit).
        let mut rng = crate::rng::Rng::new(3);
        let lens: Vec<usize> = (0..1000)
            .map(|_| (20.0 + 480.0 * rng.uniform().powi(3)) as usize)
            .collect();
        let o = DataOrder::new(7, 8);
        let mut firsts = vec![];
        for epoch in 0..3 {
            let plan = o.length_grouped_plan(epoch, None, &lens);
            let mut all: Vec<usize> = plan.concat();
            all.sort();
            assert_eq!(all, (0..lens.len()).collect::<Vec<_>>(), "every item once");
            assert_eq!(plan.len(), 125);
            assert!(plan.iter().all(|b| b.len() == 8));
            // Same seed and epoch: the same plan (what resuming needs).
            assert_eq!(plan, o.length_grouped_plan(epoch, None, &lens));
            // The widest batch first.
            let w = |b: &Vec<usize>| b.len() * b.iter().map(|&i| lens[i]).max().unwrap();
            assert!(plan.iter().all(|b| w(b) <= w(&plan[0])));
            let eff_g = real_token_share(&plan, &lens);
            let eff_r = real_token_share(&o.plan(epoch, 1000), &lens);
            assert!(
                eff_g > 0.9 && eff_r < 0.5,
                "real-token share {eff_g} vs {eff_r}"
            );
            firsts.push(plan[1].clone());
        }
        assert!(
            firsts[0] != firsts[1] && firsts[1] != firsts[2],
            "epochs differ"
        );
        // Batches are shuffled: not longest-to-shortest through the epoch.
        let plan = o.length_grouped_plan(0, None, &lens);
        let widths: Vec<usize> = plan.iter().map(|b| lens[b[0]]).collect();
        let descents = widths.windows(2).filter(|p| p[1] <= p[0]).count();
        assert!(
            descents < widths.len() * 3 / 4,
            "{descents} of {}",
            widths.len()
        );

        // With groups (K = 3 answers to one prompt: lengths alike within a group): every group
        // that fits stays whole, every item once, less padding.
        let groups: Vec<usize> = (0..1000).map(|i| i / 3).collect();
        let lens: Vec<usize> = (0..1000).map(|i| lens[i / 3 * 3] + i % 3 * 10).collect();
        let plan = o.length_grouped_plan(1, Some(&groups), &lens);
        let mut all: Vec<usize> = plan.concat();
        all.sort();
        assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
        for b in &plan {
            assert!(!b.is_empty() && b.len() <= 8);
        }
        for g in 0..334 {
            let holders = plan.iter().filter(|b| b.iter().any(|&i| groups[i] == g));
            assert_eq!(holders.count(), 1, "group {g} split");
        }
        let (eg, er) = (
            real_token_share(&plan, &lens),
            real_token_share(&o.grouped_plan(1, &groups), &lens),
        );
        assert!(eg * 3.0 > er * 4.0, "real-token share {eg} vs {er}");
        // drop_last drops the one short batch.
        let o = DataOrder::new(7, 8).with_drop_last(true);
        let plan = o.length_grouped_plan(0, None, &lens[..995]);
        assert_eq!(plan.concat().len(), 992);
    }
}
