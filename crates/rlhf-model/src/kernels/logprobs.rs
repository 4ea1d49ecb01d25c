//! Log-softmax over the vocabulary + gather of the target, fused: logits [n, V], targets [n]
//! → log p(target) [n]. The forward reads each row twice (max, then Σexp) and writes nothing
//! of size V; the backward writes the one [n, V] gradient, `g·(onehot − softmax)`, directly.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{math, out, slice, uninit};

fn targets_of(s: &CpuStorage, l: &Layout, v: usize) -> Result<Vec<u32>> {
    let t: Vec<u32> = match s {
        CpuStorage::U32(d) => {
            let (a, b) = l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("token_logprobs: targets not contiguous".into())
            })?;
            d[a..b].to_vec()
        }
        _ => candle_core::bail!("token_logprobs: targets must be u32"),
    };
    if let Some(bad) = t.iter().find(|&&x| x as usize >= v) {
        candle_core::bail!("token_logprobs: target {bad} out of range for vocabulary {v}")
    }
    Ok(t)
}

fn row_lse(row: &[f32]) -> f32 {
    let m = math::max(row);
    m + math::sum_exp_sub(row, m).ln()
}

pub struct TokenLogprobs;

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "token-logprobs"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let x = slice(s1, l1, "token_logprobs")?;
        let t = targets_of(s2, l2, v)?;
        if t.len() != n {
            candle_core::bail!("token_logprobs: {n} rows but {} targets", t.len())
        }
        let mut o = uninit(n);
        o.par_iter_mut().enumerate().for_each(|(i, o)| {
            let row = &x[i * v..(i + 1) * v];
            *o = row[t[i] as usize] - row_lse(row);
        });
        out(o, &Shape::from(n))
    }
    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op1_no_bwd(&TokenLogprobsBwd {
            targets: targets.clone(),
            res: res.contiguous()?,
            grad: grad_res.contiguous()?,
        })?;
        Ok((Some(g), None))
    }
}

/// d logits = g·(onehot(target) − exp(logits − lse)), with lse = logits[target] − res.
struct TokenLogprobsBwd {
    targets: Tensor,
    res: Tensor,
    grad: Tensor,
}

crate::multiversion! {
    fn scaled_softmax(row: &[f32], lse: f32, neg_g: f32, dst: &mut [f32]) {
        for (d, &x) in dst.iter_mut().zip(row) {
            *d = neg_g * math::exp(x - lse);
        }
    }
}

impl CustomOp1 for TokenLogprobsBwd {
    fn name(&self) -> &'static str {
        "token-logprobs-bwd"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let x = slice(s, l, "token_logprobs_bwd")?;
        let (ts, tl) = self.targets.storage_and_layout();
        let candle_core::Storage::Cpu(ts) = &*ts else {
            candle_core::bail!("token_logprobs: cpu only")
        };
        let t = targets_of(ts, tl, v)?;
        let res = self.res.to_vec1::<f32>()?;
        let g = self.grad.to_vec1::<f32>()?;
        let mut o = uninit(n * v);
        o.par_chunks_mut(v).enumerate().for_each(|(i, d)| {
            let row = &x[i * v..(i + 1) * v];
            let ti = t[i] as usize;
            let lse = row[ti] - res[i];
            scaled_softmax(row, lse, -g[i], d);
            d[ti] += g[i];
        });
        out(o, l.shape())
    }
}

/// Fused `log_softmax(logits)[target]` (f32, CPU; contiguous logits).
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, TokenLogprobs)
}
