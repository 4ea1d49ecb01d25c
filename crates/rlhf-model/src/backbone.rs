//! What every architecture provides: token ids → final hidden states, with an optional KV cache.

use anyhow::Result;
use candle_core::Tensor;

use crate::linear::Linear;
use crate::params::Param;

/// Per-layer keys and values of the tokens seen so far: [b, kv_heads, t, head_dim] each.
#[derive(Clone, Default)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
        }
    }
    /// Number of sequence slots already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dims()[2])
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Append new k/v for one layer and return the full k/v.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.layers[layer] {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
    /// Keep only the rows in `rows` (used when finished sequences leave a generation batch).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }
}

/// The inputs of one forward call besides the token ids.
pub struct Ctx<'a> {
    /// Padding mask over all sequence slots so far (cached + new): rows of 0/1.
    pub mask: &'a [Vec<u8>],
    /// Position id of each new token, [b][t].
    pub positions: Vec<Vec<u32>>,
    /// Additive attention bias [b, 1, t_new, t_total].
    pub bias: Tensor,
}

pub trait Backbone: Send + Sync {
    /// ids: [b, t] u32 → hidden states after the final norm: [b, t, d].
    fn forward(&self, ids: &Tensor, ctx: &Ctx, cache: Option<&mut KvCache>) -> Result<Tensor>;
    /// The token embedding [vocab, d] (also the LM head when tied).
    fn embed(&self) -> &Param;
    fn linears(&self) -> Vec<&Linear>;
    fn linears_mut(&mut self) -> Vec<&mut Linear>;
    fn num_layers(&self) -> usize;
}
