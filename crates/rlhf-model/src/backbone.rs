//! What every architecture provides: token ids → final hidden states, with an optional KV cache.

use anyhow::Result;
use candle_core::Tensor;

use crate::linear::Linear;
use crate::params::Param;

/// Per-layer keys and values of the tokens seen so far, in preallocated buffers
/// [b, kv_heads, capacity, head_dim] written in place: appending a token copies only that
/// token's k/v (no `cat` of the whole cache per step), and attention reads a narrowed view of
/// the buffer without copying it. The capacity doubles when it runs out. (Not `Clone`: a clone
/// would share the buffers that appends write into.)
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
}

struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    fn capacity(&self) -> usize {
        self.k.dims()[2]
    }
}

/// Slots allocated past the first append, for the tokens generation is about to add.
const HEADROOM: usize = 64;

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| None).collect(),
        }
    }
    /// Number of sequence slots already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|l| l.len)
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Append new k/v ([b, kv_heads, t, head_dim]) for one layer and return the full k/v.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        let need = self.layers[layer].as_ref().map_or(0, |l| l.len) + t;
        let grow = match &self.layers[layer] {
            None => true,
            Some(l) => need > l.capacity(),
        };
        if grow {
            let cap = (need + HEADROOM).max(2 * need.saturating_sub(t));
            let alloc = || Tensor::zeros((b, h, cap, d), k.dtype(), k.device());
            let (nk, nv) = (alloc()?, alloc()?);
            let len = match &self.layers[layer] {
                Some(l) if l.len > 0 => {
                    nk.slice_set(&l.k.narrow(2, 0, l.len)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&l.v.narrow(2, 0, l.len)?.contiguous()?, 2, 0)?;
                    l.len
                }
                _ => 0,
            };
            self.layers[layer] = Some(LayerKv { k: nk, v: nv, len });
        }
        let l = self.layers[layer].as_mut().expect("allocated above");
        l.k.slice_set(&k.contiguous()?, 2, l.len)?;
        l.v.slice_set(&v.contiguous()?, 2, l.len)?;
        l.len += t;
        Ok((l.k.narrow(2, 0, l.len)?, l.v.narrow(2, 0, l.len)?))
    }

    /// One cache from caches of disjoint row sets (`parts`: a cache and the batch row of each
    /// of its rows), each part's `len` slots right-aligned in a row of `width` slots: the cache
    /// of a left-padded batch whose rows were computed in groups, each group padded only to its
    /// own longest. The padding slots hold zeros (the mask hides them).
    pub fn merge_left_padded(mut parts: Vec<(KvCache, Vec<usize>)>, width: usize) -> Result<Self> {
        let b: usize = parts.iter().map(|(_, rows)| rows.len()).sum();
        let n_layers = parts.first().map_or(0, |(c, _)| c.layers.len());
        // Batch row → its place in the parts' concatenation.
        let mut place = vec![0u32; b];
        for (i, &r) in parts.iter().flat_map(|(_, rows)| rows).enumerate() {
            place[r] = i as u32;
        }
        let mut layers = Vec::with_capacity(n_layers);
        for li in 0..n_layers {
            let mut ks = Vec::with_capacity(parts.len());
            let mut vs = Vec::with_capacity(parts.len());
            // Each part's layer is dropped once copied: the parts and the merged cache are not
            // both held whole.
            for (c, _) in parts.iter_mut() {
                let Some(l) = c.layers[li].take() else {
                    anyhow::bail!("merge_left_padded: layer {li} of a part is empty")
                };
                if l.len > width {
                    anyhow::bail!("merge_left_padded: a part holds {} > {width} slots", l.len)
                }
                let (pb, h, _, d) = l.k.dims4()?;
                let pad = Tensor::zeros((pb, h, width - l.len, d), l.k.dtype(), l.k.device())?;
                ks.push(Tensor::cat(&[&pad, &l.k.narrow(2, 0, l.len)?], 2)?);
                vs.push(Tensor::cat(&[&pad, &l.v.narrow(2, 0, l.len)?], 2)?);
            }
            let idx = Tensor::from_vec(place.clone(), b, ks[0].device())?;
            let (k, v) = (Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?);
            let (_, h, _, d) = k.dims4()?;
            let room = Tensor::zeros((b, h, HEADROOM, d), k.dtype(), k.device())?;
            layers.push(Some(LayerKv {
                k: Tensor::cat(&[&k.index_select(&idx, 0)?, &room], 2)?,
                v: Tensor::cat(&[&v.index_select(&idx, 0)?, &room], 2)?,
                len: width,
            }));
        }
        Ok(Self { layers })
    }

    /// Keep only batch rows `rows` (in that order) of every layer, e.g. to stop computing
    /// sequences that finished. Copies the kept rows once; their slots and capacity stay.
    pub fn keep_rows(&mut self, rows: &[usize]) -> Result<()> {
        let Some(first) = self.layers.iter().flatten().next() else {
            return Ok(());
        };
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), first.k.device())?;
        for l in self.layers.iter_mut().flatten() {
            l.k = l.k.index_select(&idx, 0)?;
            l.v = l.v.index_select(&idx, 0)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Appends past the capacity (growth copies) and appends of several tokens at once give
    /// exactly the concatenation of everything appended.
    #[test]
    fn cache_equals_concatenation_across_growth() {
        let mut cache = KvCache::new(1);
        let (mut ks, mut vs) = (vec![], vec![]);
        let mut seed = 0.0f32;
        for t in [3usize, 1, 1, 70, 1, 2, 130, 1] {
            let mk = |s: f32| {
                let n = 2 * 3 * t * 4;
                let v: Vec<f32> = (0..n).map(|i| s + i as f32).collect();
                Tensor::from_vec(v, (2, 3, t, 4), &Device::Cpu).unwrap()
            };
            let (k, v) = (mk(seed), mk(-seed));
            seed += 1000.0;
            ks.push(k.clone());
            vs.push(v.clone());
            let (ck, cv) = cache.append(0, k, v).unwrap();
            let want_k = Tensor::cat(&ks, 2).unwrap();
            let want_v = Tensor::cat(&vs, 2).unwrap();
            assert_eq!(ck.dims(), want_k.dims());
            let d = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert_eq!(d(&ck, &want_k), 0.0);
            assert_eq!(d(&cv, &want_v), 0.0);
            assert_eq!(cache.len(), want_k.dims()[2]);
        }
    }
}
