//! The reward model: a transformer backbone with a scalar `score` head read at the last real token
//! of each sequence. Saved as a Hugging Face `…ForSequenceClassification` checkpoint
//! (`score.weight` [1, d], `num_labels = 1`) that transformers loads; the normalisation offset
//! (mean score on SFT samples) is stored in `config.json` as `rlhf_reward_offset` and subtracted
//! by [`RewardModel::score`].

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use rlhf_data::batch::{
    collate_shared, collate_shared_pairs, key_ratio, SharedBatch, SharedPairBatch,
};
use rlhf_data::tokenize::TokenizedPair;
use rlhf_model::heads::{last_token_positions, ScalarHead};
use rlhf_model::weights::{RandomInit, SafetensorsSource};
use rlhf_model::{CausalLM, Family, Tokenizer};

pub struct RewardModel {
    pub model: CausalLM,
    pub head: ScalarHead,
    /// Subtracted from raw scores (set after training so SFT samples score mean 0).
    pub offset: f32,
}

impl RewardModel {
    /// A new reward model on top of a (policy/SFT/base) model: fresh `score` head.
    pub fn from_backbone(mut model: CausalLM, seed: u64) -> Result<Self> {
        let d = model.hidden_size();
        let head = ScalarHead::new("score", d, &mut RandomInit::new(seed), &mut model.params)?;
        Ok(Self {
            model,
            head,
            offset: 0.0,
        })
    }

    /// Load a reward model saved by [`RewardModel::save`] (or by transformers).
    pub fn load(dir: &Path) -> Result<(Self, Option<Tokenizer>)> {
        let loaded = rlhf_model::load::load_dir(dir)?;
        let mut model = loaded.model;
        let d = model.hidden_size();
        let files = rlhf_model::model::weight_files(dir)?;
        let mut src = SafetensorsSource::open(&files)?;
        let head = ScalarHead::new("score", d, &mut src, &mut model.params).with_context(|| {
            format!("{}: not a reward model (no `score.weight`)", dir.display())
        })?;
        let offset = model
            .raw_config
            .get("rlhf_reward_offset")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0) as f32;
        Ok((
            Self {
                model,
                head,
                offset,
            },
            loaded.tokenizer,
        ))
    }

    /// Raw scores (tracked for gradients) at the last real token of each row: ids [b, t].
    pub fn forward(&self, ids: &Tensor, mask: &[Vec<u8>]) -> Result<Tensor> {
        let h = self.model.hidden(ids, mask)?;
        self.head.at(&h, &last_token_positions(mask))
    }

    /// Raw scores (tracked for gradients) of the distinct responses of a shared-prompt batch,
    /// `[sb.responses.len()]`: each read at the last token of its prompt + response, every
    /// prompt computed once ([`CausalLM::hidden_prefix_rows`]).
    pub fn response_scores(&self, sb: &SharedBatch) -> Result<Tensor> {
        let (n, t) = (sb.rows.len(), sb.seq_len);
        let ids = Tensor::from_vec(sb.input_ids.clone(), (n, t), &Device::Cpu)?;
        let h = self.model.hidden_prefix_rows(&ids, &sb.rows)?;
        let d = h.dim(2)?;
        let idx: Vec<u32> = sb
            .responses
            .iter()
            .map(|r| (r.row * t + r.last()) as u32)
            .collect();
        let idx = Tensor::from_vec(idx, (sb.responses.len(),), &Device::Cpu)?;
        let h = h.reshape((n * t, d))?.index_select(&idx, 0)?;
        Ok(self.head.linear.forward(&h)?.squeeze(1)?)
    }

    /// Raw scores (tracked for gradients) of a shared-prompt batch's pairs, `[2B]`: the chosen
    /// responses' first, then the rejected ones' (as [`rlhf_data::batch::PairBatch`] orders
    /// its rows).
    pub fn pair_scores(&self, sb: &SharedPairBatch) -> Result<Tensor> {
        let s = self.response_scores(&sb.batch)?;
        let idx: Vec<u32> = sb.pair_order().into_iter().map(|i| i as u32).collect();
        let n = idx.len();
        Ok(s.index_select(&Tensor::from_vec(idx, (n,), &Device::Cpu)?, 0)?)
    }

    /// Raw `(r_chosen, r_rejected)` of tokenised pairs, no gradients: chunks of `batch` pairs of
    /// similar lengths, each prompt computed once per chunk; results in the order of `pairs`.
    pub fn raw_pair_scores(
        &self,
        pairs: &[TokenizedPair],
        pad: u32,
        batch: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let _no_grad = rlhf_model::params::no_grad();
        let lens: Vec<usize> = pairs.iter().map(TokenizedPair::shared_len).collect();
        let (mut rc, mut rr) = (vec![0f32; pairs.len()], vec![0f32; pairs.len()]);
        for c in rlhf_data::batch::length_chunks(&lens, batch) {
            let kr = key_ratio(self.model.hidden_size());
            let sb = collate_shared_pairs(c.iter().map(|&i| &pairs[i]), pad, kr);
            let s: Vec<f32> = self.response_scores(&sb.batch)?.detach().to_vec1()?;
            for (&i, [ch, rj]) in c.iter().zip(&sb.pair_responses) {
                rc[i] = s[*ch];
                rr[i] = s[*rj];
            }
        }
        Ok((rc, rr))
    }

    /// Raw scores of `(prompt, response)` items, no gradients: chunks of about `chunk` items of
    /// similar lengths, a prompt's items in one chunk and the prompt computed once
    /// ([`rlhf_data::batch::prompt_chunks`]); results in the order of `items`. The scores
    /// of [`RewardModel::raw_scores`] on the items' prompt + response.
    pub fn raw_response_scores(
        &self,
        items: &[(Vec<u32>, Vec<u32>)],
        pad: u32,
        chunk: usize,
    ) -> Result<Vec<f32>> {
        let _no_grad = rlhf_model::params::no_grad();
        let views: Vec<(&[u32], &[u32])> = items.iter().map(|(p, r)| (&p[..], &r[..])).collect();
        let mut out = vec![0f32; items.len()];
        for c in rlhf_data::batch::prompt_chunks(&views, chunk) {
            let it = c.iter().map(|&i| (&items[i].0[..], &items[i].1[..]));
            let sb = collate_shared(it, pad, key_ratio(self.model.hidden_size()));
            let s: Vec<f32> = self.response_scores(&sb)?.detach().to_vec1()?;
            for (&i, &k) in c.iter().zip(&sb.item_response) {
                out[i] = s[k];
            }
        }
        Ok(out)
    }

    /// Normalised scores of whole token sequences, in chunks of `chunk` (see
    /// [`RewardModel::raw_scores`]).
    pub fn score(&self, seqs: &[Vec<u32>], pad: u32, chunk: usize) -> Result<Vec<f32>> {
        let raw = self.raw_scores(seqs, pad, chunk)?;
        Ok(raw.into_iter().map(|x| x - self.offset).collect())
    }

    /// Scores without the normalisation offset, no gradients: sequences in chunks of `chunk`
    /// of similar lengths ([`rlhf_data::batch::length_chunks`]), each right-padded to its
    /// longest; results in the order of `seqs`.
    pub fn raw_scores(&self, seqs: &[Vec<u32>], pad: u32, chunk: usize) -> Result<Vec<f32>> {
        let _no_grad = rlhf_model::params::no_grad();
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let mut out = vec![0f32; seqs.len()];
        for c in rlhf_data::batch::length_chunks(&lens, chunk) {
            let t = c.iter().map(|&i| lens[i]).max().unwrap_or(1).max(1);
            let mut ids = Vec::with_capacity(c.len() * t);
            let mut mask = Vec::with_capacity(c.len());
            for &i in &c {
                let s = &seqs[i];
                ids.extend_from_slice(s);
                ids.extend(std::iter::repeat_n(pad, t - s.len()));
                let mut m = vec![1u8; s.len()];
                m.resize(t, 0);
                mask.push(m);
            }
            let ids = Tensor::from_vec(ids, (c.len(), t), &Device::Cpu)?;
            let r: Vec<f32> = self.forward(&ids, &mask)?.detach().to_vec1()?;
            for (&i, x) in c.iter().zip(r) {
                out[i] = x;
            }
        }
        Ok(out)
    }

    /// Save as an HF sequence-classification checkpoint (LoRA merged), with tokenizer.
    pub fn save(&self, dir: &Path, tok: Option<&Tokenizer>) -> Result<()> {
        self.save_with_offset(dir, tok, self.offset)
    }

    /// [`RewardModel::save`] with `offset` stored instead of `self.offset`.
    pub fn save_with_offset(&self, dir: &Path, tok: Option<&Tokenizer>, offset: f32) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut tensors = self.model.merged_tensors()?;
        tensors.remove("lm_head.weight");
        tensors.insert(
            "score.weight".into(),
            self.head.linear.weight.var().as_tensor().detach(),
        );
        rlhf_model::model::save_safetensors(&tensors, &dir.join("model.safetensors"))?;
        let mut cfg = self.model.raw_config.clone();
        let arch = match self.model.config.family() {
            Family::Gpt2 => "GPT2ForSequenceClassification",
            Family::Llama => "LlamaForSequenceClassification",
            Family::Qwen2 => "Qwen2ForSequenceClassification",
        };
        cfg["architectures"] = serde_json::json!([arch]);
        cfg["num_labels"] = 1.into();
        cfg["rlhf_reward_offset"] = (offset as f64).into();
        if let Some(t) = tok {
            // transformers' sequence classifiers find the last token through pad_token_id.
            cfg["pad_token_id"] = t.pad_id().into();
            t.save(dir)?;
        }
        rlhf_model::model::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&cfg)?.as_bytes(),
        )?;
        Ok(())
    }
}
