//! LM head + log-softmax + gather, fused: hidden [n, d], head weight [V, d], targets [n] →
//! log p(target) [n] of `softmax(hidden · Wᵀ / T)`.
//!
//! With gradients on, the forward keeps its one [n × V] buffer, holding e^(logit − row max)
//! (the exponentials its log-sum-exp needed anyway) and each row's 1 / Σ, and the backward turns
//! it *in place* into d logits with one multiply per entry, then runs the two GEMMs; so a
//! training step holds a single [n × V] buffer, takes one exponential per logit, and candle
//! never zero-fills and accumulates a logits gradient. Without gradients the logits are computed
//! a block of rows at a time and never materialised; so they are under full gradient
//! checkpointing ([`super::block::recompute_activations`]), and the backward then computes
//! them again a chunk of rows at a time (64 MiB of logits: 341 rows of SmolLM2's vocabulary),
//! turning each chunk into its rows' d logits and running the two GEMMs on it, the weight's
//! gradient accumulated over chunks. A step then never holds `[tokens × vocab]`, which with
//! Qwen2's 151936-token vocabulary is 0.6 MB a token.
//!
//! With `entropy` the op also returns each row's entropy `H = −Σ p log p` (output [n, 2]:
//! log p(target), H), which PPO logs and may add to its loss. The forward then keeps the
//! shifted logits `s = z − max` (not their exponentials) and each row's `ln Σ e^s`; the
//! backward takes one exponential per logit to get `p` again and turns the buffer in place into
//! `d z = g_lp·(onehot − p) − g_H·p·(log p + H)`, so the entropy costs one extra sum in the
//! forward and no second [n × V] buffer.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{sgemm, Mat};
use super::{math, out, sink, slice, uninit, with_f32};

/// Rows per block when the logits are not kept.
const BLOCK: usize = 64;

/// The most logits a backward without the kept buffer holds at once (it takes at least
/// [`BLOCK`] rows a pass): 64 MiB, 341 rows of SmolLM2's 49152-token vocabulary, 110 of
/// Qwen2's 151936.
pub const BWD_CHUNK_BYTES: usize = 64 << 20;

/// What the forward keeps for the backward: e^(logit − row max) for every logit, and each
/// row's 1 / Σ of those; with `entropy`, the shifted logits and each row's ln Σ instead.
type Kept = (Vec<f32>, Vec<f32>);

struct HeadLogprobs {
    targets: Vec<u32>,
    scale: f32,
    keep: bool,
    /// Output [n, 2] (log p(target), entropy) instead of [n].
    entropy: bool,
    kept: Mutex<Option<Kept>>,
}

/// One call's operands: hidden states [n, d] and the head's weight [v, d].
#[derive(Clone, Copy)]
struct Operands<'a> {
    h: &'a [f32],
    w: &'a [f32],
    d: usize,
    v: usize,
}

impl Operands<'_> {
    /// Unscaled logits `h[r0..r0+rows] · wᵀ` into `dst`.
    fn logits_into(&self, r0: usize, rows: usize, dst: &mut [f32]) {
        let (d, v) = (self.d, self.v);
        sgemm(
            rows,
            v,
            d,
            Mat {
                data: &self.h[r0 * d..(r0 + rows) * d],
                rs: d,
                cs: 1,
            },
            Mat {
                data: self.w,
                rs: 1,
                cs: d,
            },
            dst,
            false,
        );
    }
}

impl HeadLogprobs {
    /// Outputs per row: 1, or 2 with the entropy.
    fn width(&self) -> usize {
        1 + self.entropy as usize
    }

    /// Logits of rows `r0..r0+rows` into `dst` (rows × v, scaled), then per row into `o`:
    /// log p(target), and with the entropy also H. With `per_row` (one slot per row, kept for
    /// the backward) `dst` is left holding e^(logit − row max) and `per_row` each row's 1 / Σ;
    /// with the entropy `dst` always holds `s = scale·logit − row max` and `per_row` ln Σ e^s.
    fn rows(
        &self,
        x: Operands,
        r0: usize,
        rows: usize,
        dst: &mut [f32],
        o: &mut [f32],
        per_row: Option<&mut [f32]>,
    ) {
        x.logits_into(r0, rows, dst);
        let keep = per_row.is_some();
        let mut scratch;
        let per_row = match per_row {
            Some(p) => p,
            None => {
                scratch = uninit(rows);
                &mut scratch[..]
            }
        };
        let (scale, entropy) = (self.scale, self.entropy);
        dst[..rows * x.v]
            .par_chunks_mut(x.v)
            .zip(o.par_chunks_mut(self.width()))
            .zip(per_row.par_iter_mut())
            .enumerate()
            .for_each(|(i, ((row, o), pr))| {
                let t = self.targets[r0 + i] as usize;
                if entropy {
                    // scale > 0, so the scaled row's max is scale × the row's max.
                    let m = scale * math::max(row);
                    let (sum, dot) = math::shift_sum_exp_dot(row, scale, m);
                    *pr = sum.ln();
                    o[0] = row[t] - *pr;
                    o[1] = *pr - dot / sum;
                    return;
                }
                if scale != 1.0 {
                    row.iter_mut().for_each(|x| *x *= scale);
                }
                let m = math::max(row);
                let target = row[t];
                let sum = if keep {
                    let sum = math::exp_sub_in_place(row, m);
                    *pr = 1.0 / sum;
                    sum
                } else {
                    math::sum_exp_sub(row, m)
                };
                o[0] = target - (m + sum.ln());
            });
    }

    /// Rows `r0..r0+rows` of the buffer the forward keeps (see [`Self::rows`]), with each
    /// row's `per_row` value, turned in place into d logits for upstream `g` (and each row's
    /// entropy `ent`, from the output).
    fn to_dlogits(
        &self,
        logits: &mut [f32],
        per_row: &[f32],
        r0: usize,
        v: usize,
        (g, ent): (&[f32], &[f32]),
    ) {
        let scale = self.scale;
        if self.entropy {
            // Row holds s = z − max; log p = s − ln Σ, p = e^(log p):
            // d logit = scale·(g_lp·(onehot − p) − g_H·p·(log p + H)).
            logits.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
                let r = r0 + i;
                let (gl, ge, ls) = (g[2 * r], g[2 * r + 1], per_row[i]);
                let c0 = gl + ge * (ent[r] - ls);
                math::entropy_dlogits(row, ls, c0, ge, scale);
                row[self.targets[r] as usize] += gl * scale;
            });
        } else {
            // d logit = −g·scale·p (+ g·scale at the target), p = e^(logit − max) / Σ.
            logits.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
                let r = r0 + i;
                let ti = self.targets[r] as usize;
                let gs = g[r] * scale;
                let c = -gs * per_row[i];
                row.iter_mut().for_each(|x| *x *= c);
                row[ti] += gs;
            });
        }
    }

    fn forward(&self, x: Operands, n: usize) -> (Vec<f32>, Option<Kept>) {
        let k = self.width();
        let mut o = uninit(n * k);
        if self.keep {
            let (mut e, mut per_row) = (uninit(n * x.v), uninit(n));
            self.rows(x, 0, n, &mut e, &mut o, Some(&mut per_row));
            (o, Some((e, per_row)))
        } else {
            let mut buf = uninit(BLOCK.min(n) * x.v);
            for (bi, o) in o.chunks_mut(BLOCK * k).enumerate() {
                let rows = o.len() / k;
                self.rows(x, bi * BLOCK, rows, &mut buf, o, None);
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
        let (o, kept) = self.forward(Operands { h, w, d, v }, n);
        *self.kept.lock().unwrap() = kept;
        if self.entropy {
            out(o, &Shape::from((n, 2)))
        } else {
            out(o, &Shape::from(n))
        }
    }
    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, d) = h.dims2()?;
        let v = w.dim(0)?;
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        // Each row's entropy, from the output.
        let ent: Vec<f32> = if self.entropy {
            res.narrow(1, 1, 1)?.flatten_all()?.to_vec1()?
        } else {
            vec![]
        };
        let kept = self.kept.lock().unwrap().take();
        let (want_h, want_w) = (h.track_op(), w.track_op());
        // With the kept buffer, one pass over every row; without it (gradient checkpointing, or
        // a second backward), passes over chunks of rows whose logits stay near
        // `BWD_CHUNK_BYTES`, so the backward never holds all [n × V] either.
        let chunk = match kept {
            Some(_) => n.max(1),
            None => (BWD_CHUNK_BYTES / (4 * v.max(1))).max(BLOCK),
        };
        let chunks: Vec<(usize, usize)> = (0..n)
            .step_by(chunk)
            .map(|r0| (r0, chunk.min(n - r0)))
            .collect();
        let (dh, dw) = with_f32(&[h, w], |t| {
            let (hs, ws) = (t[0], t[1]);
            let x = Operands { h: hs, w: ws, d, v };
            let mut dh = want_h.then(|| uninit(n * d));
            let run = |mut dw: Option<(&mut [f32], bool)>| {
                if let (true, Some((dw, false))) = (chunks.is_empty(), dw.as_mut()) {
                    dw.fill(0.0);
                }
                // The kept buffer, or one chunk's worth reused by every chunk.
                let fresh = kept.is_none();
                let most = chunks.first().map_or(0, |c| c.1);
                let (mut buf, mut per_row) =
                    kept.unwrap_or_else(|| (uninit(most * v), uninit(most)));
                let mut o = vec![0.0; if fresh { most * self.width() } else { 0 }];
                for &(r0, rows) in &chunks {
                    let (dl, pr) = (&mut buf[..rows * v], &mut per_row[..rows]);
                    if fresh {
                        let o = &mut o[..rows * self.width()];
                        self.rows(x, r0, rows, dl, o, Some(&mut *pr));
                    }
                    self.to_dlogits(dl, pr, r0, v, (&g, &ent));
                    let dl = &*dl;
                    if let Some(dh) = dh.as_mut() {
                        let gm = Mat {
                            data: dl,
                            rs: v,
                            cs: 1,
                        };
                        let wm = Mat {
                            data: ws,
                            rs: d,
                            cs: 1,
                        };
                        sgemm(rows, d, v, gm, wm, &mut dh[r0 * d..(r0 + rows) * d], false);
                    }
                    if let Some((dw, acc)) = dw.as_mut() {
                        let gt = Mat {
                            data: dl,
                            rs: 1,
                            cs: v,
                        };
                        let hm = Mat {
                            data: &hs[r0 * d..(r0 + rows) * d],
                            rs: d,
                            cs: 1,
                        };
                        sgemm(v, d, rows, gt, hm, dw, *acc || r0 > 0);
                    }
                }
            };
            let dw = match want_w {
                // Into the weight's gradient-sink buffer when one holds it.
                true => sink::weight_grad(w, v * d, |dw, acc| run(Some((dw, acc)))),
                false => {
                    run(None);
                    None
                }
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
    apply(hidden, weight, targets, scale, false)
}

/// [`head_logprobs`] and each row's entropy of `softmax(hidden · weightᵀ · scale)`, as [n, 2]
/// (log p(target), H), both differentiable. `scale` must be positive.
pub fn head_logprobs_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if scale <= 0.0 {
        candle_core::bail!("head_logprobs_entropy: scale must be positive, got {scale}")
    }
    apply(hidden, weight, targets, scale, true)
}

fn apply(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    scale: f64,
    entropy: bool,
) -> Result<Tensor> {
    let targets = targets.flatten_all()?.to_vec1::<u32>()?;
    // Under full gradient checkpointing the backward computes the buffer again instead.
    let keep = (hidden.track_op() || weight.track_op()) && !super::block::head_recomputes();
    let op = HeadLogprobs {
        targets,
        scale: scale as f32,
        keep,
        entropy,
        kept: Mutex::new(None),
    };
    hidden.contiguous()?.apply_op2(&weight.contiguous()?, op)
}
