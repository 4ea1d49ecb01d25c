//! LM head + log-softmax + gather, fused: hidden [n, d], head weight [V, d], targets [n] →
//! log p(target) [n] of `softmax(hidden · Wᵀ / T)`.
//!
//! With gradients on, the forward keeps its one [n × V] buffer, holding e^(logit − row max)
//! (the exponentials its log-sum-exp needed anyway) and each row's 1 / Σ, and the backward turns
//! it *in place* into d logits with one multiply per entry, then runs the two GEMMs; so a
//! training step holds a single [n × V] buffer, takes one exponential per logit, and candle
//! never zero-fills and accumulates a logits gradient. Without gradients the logits are computed
//! a block of rows at a time and never materialised.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{sgemm, Mat};
use super::{math, out, sink, slice, uninit, with_f32};

/// Rows per block when the logits are not kept.
const BLOCK: usize = 64;

/// What the forward keeps for the backward: e^(logit − row max) for every logit, and each
/// row's 1 / Σ of those.
type Kept = (Vec<f32>, Vec<f32>);

struct HeadLogprobs {
    targets: Vec<u32>,
    scale: f32,
    keep: bool,
    kept: Mutex<Option<Kept>>,
}

/// logits of rows `r0..r0+rows` into `dst` (scaled), then log p(target) into `o`. With `inv`
/// (one slot per row), `dst` is left holding e^(logit − row max) and `inv` each row's 1 / Σ.
#[allow(clippy::too_many_arguments)]
fn block(
    h: &[f32],
    w: &[f32],
    d: usize,
    v: usize,
    r0: usize,
    rows: usize,
    scale: f32,
    targets: &[u32],
    dst: &mut [f32],
    o: &mut [f32],
    inv: Option<&mut [f32]>,
) {
    sgemm(
        rows,
        v,
        d,
        Mat {
            data: &h[r0 * d..(r0 + rows) * d],
            rs: d,
            cs: 1,
        },
        Mat {
            data: w,
            rs: 1,
            cs: d,
        },
        dst,
        false,
    );
    let row_lp = |i: usize, row: &mut [f32], o: &mut f32, inv: Option<&mut f32>| {
        if scale != 1.0 {
            row.iter_mut().for_each(|x| *x *= scale);
        }
        let m = math::max(row);
        let target = row[targets[r0 + i] as usize];
        let sum = match inv {
            Some(inv) => {
                let sum = math::exp_sub_in_place(row, m);
                *inv = 1.0 / sum;
                sum
            }
            None => math::sum_exp_sub(row, m),
        };
        *o = target - (m + sum.ln());
    };
    let rows_o = dst[..rows * v].par_chunks_mut(v).zip(o.par_iter_mut());
    match inv {
        Some(inv) => rows_o
            .zip(inv.par_iter_mut())
            .enumerate()
            .for_each(|(i, ((row, o), inv))| row_lp(i, row, o, Some(inv))),
        None => rows_o
            .enumerate()
            .for_each(|(i, (row, o))| row_lp(i, row, o, None)),
    }
}

impl HeadLogprobs {
    fn forward(
        &self,
        h: &[f32],
        w: &[f32],
        n: usize,
        d: usize,
        v: usize,
    ) -> (Vec<f32>, Option<Kept>) {
        let mut o = uninit(n);
        if self.keep {
            let (mut e, mut inv) = (uninit(n * v), uninit(n));
            block(
                h,
                w,
                d,
                v,
                0,
                n,
                self.scale,
                &self.targets,
                &mut e,
                &mut o,
                Some(&mut inv),
            );
            (o, Some((e, inv)))
        } else {
            let mut buf = uninit(BLOCK.min(n) * v);
            for (bi, o) in o.chunks_mut(BLOCK).enumerate() {
                let rows = o.len();
                block(
                    h,
                    w,
                    d,
                    v,
                    bi * BLOCK,
                    rows,
                    self.scale,
                    &self.targets,
                    &mut buf,
                    o,
                    None,
                );
            }
            (o, None)
        }
    }
}

impl CustomOp2 for HeadLogprobs {
    fn name(&self) -> &'static str {
        "head-logprobs"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let (v, d2) = l2.shape().dims2()?;
        if d != d2 || self.targets.len() != n {
            candle_core::bail!(
                "head_logprobs: hidden {:?}, weight {:?}, {} targets",
                l1.dims(),
                l2.dims(),
                self.targets.len()
            )
        }
        if let Some(bad) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("head_logprobs: target {bad} out of range for vocabulary {v}")
        }
        let (h, w) = (
            slice(s1, l1, "head_logprobs")?,
            slice(s2, l2, "head_logprobs")?,
        );
        let (o, kept) = self.forward(h, w, n, d, v);
        *self.kept.lock().unwrap() = kept;
        out(o, &Shape::from(n))
    }
    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, d) = h.dims2()?;
        let v = w.dim(0)?;
        let g = grad.to_vec1::<f32>()?;
        let mut guard = self.kept.lock().unwrap();
        let (want_h, want_w) = (h.track_op(), w.track_op());
        let (dh, dw) = with_f32(&[h, w], |t| {
            let (hs, ws) = (t[0], t[1]);
            // The kept exponentials (or, after a first backward consumed them, recomputed ones).
            let (mut logits, inv) = match guard.take() {
                Some(k) => k,
                None => {
                    let (mut e, mut inv) = (uninit(n * v), uninit(n));
                    let mut o = vec![0.0; n];
                    block(
                        hs,
                        ws,
                        d,
                        v,
                        0,
                        n,
                        self.scale,
                        &self.targets,
                        &mut e,
                        &mut o,
                        Some(&mut inv),
                    );
                    (e, inv)
                }
            };
            // d logit = −g·scale·p (+ g·scale at the target), p = e^(logit − max) / Σ.
            logits.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
                let ti = self.targets[i] as usize;
                let gs = g[i] * self.scale;
                let c = -gs * inv[i];
                row.iter_mut().for_each(|x| *x *= c);
                row[ti] += gs;
            });
            let gm = Mat {
                data: &logits,
                rs: v,
                cs: 1,
            };
            let dh = want_h.then(|| {
                let mut dh = uninit(n * d);
                sgemm(
                    n,
                    d,
                    v,
                    gm,
                    Mat {
                        data: ws,
                        rs: d,
                        cs: 1,
                    },
                    &mut dh,
                    false,
                );
                dh
            });
            let dw = if want_w {
                let gt = Mat {
                    data: &logits,
                    rs: 1,
                    cs: v,
                };
                let hm = Mat {
                    data: hs,
                    rs: d,
                    cs: 1,
                };
                // Into the weight's gradient-sink buffer when one holds it.
                sink::weight_grad(w, v * d, |dw, acc| sgemm(v, d, n, gt, hm, dw, acc))
            } else {
                None
            };
            (dh, dw)
        })?;
        Ok((
            dh.map(|x| Tensor::from_vec(x, (n, d), h.device()))
                .transpose()?,
            dw.map(|x| Tensor::from_vec(x, (v, d), w.device()))
                .transpose()?,
        ))
    }
}

/// Fused `log_softmax(hidden · weightᵀ · scale)[target]` (f32, CPU).
pub fn head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let targets = targets.flatten_all()?.to_vec1::<u32>()?;
    let keep = hidden.track_op() || weight.track_op();
    let op = HeadLogprobs {
        targets,
        scale: scale as f32,
        keep,
        kept: Mutex::new(None),
    };
    hidden.contiguous()?.apply_op2(&weight.contiguous()?, op)
}
