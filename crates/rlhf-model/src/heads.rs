//! Scalar heads on top of a backbone: the reward model's score and PPO's value function.
//! HF names the reward head `score` (`…ForSequenceClassification`, no bias); we keep that name
//! so that a saved reward model loads in transformers.

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::linear::Linear;
use crate::params::{Param, ParamStore};
use crate::weights::{Init, WeightSource};

pub struct ScalarHead {
    pub linear: Linear,
}

impl ScalarHead {
    /// A new head `name.weight` [1, d], from `src` (a checkpoint) or initialised N(0, 1/sqrt(d+1)).
    pub fn new(
        name: &str,
        d: usize,
        src: &mut dyn WeightSource,
        store: &mut ParamStore,
    ) -> Result<Self> {
        let w = src.get(
            &format!("{name}.weight"),
            &[1, d],
            Init::Normal(1.0 / ((d + 1) as f64).sqrt()),
        )?;
        let p = Param::new(&format!("{name}.weight"), w, true)?;
        store.insert(p.clone())?;
        Ok(Self {
            linear: Linear::new(name, p, None, false),
        })
    }

    /// Scores of every position: hidden [b, t, d] → [b, t].
    pub fn all(&self, hidden: &Tensor) -> Result<Tensor> {
        let y = self.linear.forward(hidden)?; // [b, t, 1]
        Ok(y.squeeze(candle_core::D::Minus1)?)
    }

    /// The score read at one position per row: hidden [b, t, d], `pos[r]` → [b].
    pub fn at(&self, hidden: &Tensor, pos: &[usize]) -> Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        let idx: Vec<u32> = pos
            .iter()
            .enumerate()
            .map(|(r, &p)| (r * t + p) as u32)
            .collect();
        let idx = Tensor::from_vec(idx, (b,), &Device::Cpu)?;
        let h = hidden.reshape((b * t, d))?.index_select(&idx, 0)?;
        Ok(self.linear.forward(&h)?.squeeze(1)?)
    }
}

/// Index of the last real token of each row of a 0/1 mask (right or left padded).
pub fn last_token_positions(mask: &[Vec<u8>]) -> Vec<usize> {
    mask.iter()
        .map(|m| m.iter().rposition(|&x| x != 0).unwrap_or(0))
        .collect()
}
