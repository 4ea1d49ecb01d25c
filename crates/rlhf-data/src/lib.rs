//! `rlhf-data`: dataset loading (JSON Lines / JSON arrays, gzip), the TRL data formats (plus
//! Alpaca and LLaMA-Factory ShareGPT), rankings expanded to preference pairs, tokenisation with
//! chat templates and loss masks, packing, batching and a resumable seeded data order.
//!
//! - [`load`]: records with `file:line` errors.
//! - [`formats`]: [`SftExample`], [`PreferencePair`], [`Prompt`] and their loaders.
//! - [`tokenize`]: [`TokenizedSft`], [`TokenizedPair`], truncation counts, [`pack`].
//! - [`batch`]: [`Batch`], [`PairBatch`], [`left_pad_prompts`], [`DataOrder`].
//! - [`vocab`]: a word-level tokenizer with a chat template for tests and toy worlds.
//! - [`world`]: a built-in task world with known preferences (gold utility, annotator panel).

pub mod batch;
pub mod formats;
pub mod load;
pub mod rng;
pub mod tokenize;
pub mod vocab;
pub mod world;

pub use batch::{
    collate_packed, collate_pairs, collate_sft, collate_shared, collate_shared_pairs,
    epoch_permutation, key_ratio, left_pad_prompts, Batch, DataOrder, PackedBatch, PairBatch,
    ResponseSlot, SharedBatch, SharedPairBatch,
};
pub use formats::{
    load_preferences, load_preferences_lenient, load_prompts, load_sft, load_text_prompts,
    prompt_from_text, ranking_pairs, split_implicit_prompt, PreferencePair, Prompt, SftExample,
};
pub use load::{load_records, RecordSet};
pub use tokenize::{
    pack, tokenize_pair, tokenize_pairs, tokenize_prompt, tokenize_sft, tokenize_sft_example,
    PackedSft, PairTokenizeConfig, SftTokenizeConfig, TokenizedPair, TokenizedSft, TruncationStats,
};
pub use vocab::word_level_tokenizer;
