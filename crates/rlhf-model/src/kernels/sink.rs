//! Weight gradients written by the fused ops straight into per-parameter buffers.
//!
//! candle's backward keeps one gradient per graph node and sums into it by allocating a zero
//! tensor the first time and adding every contribution to it: two serial passes over each
//! parameter's gradient per backward, plus the trainer's own add per micro-batch when it
//! accumulates. With a [`GradSink`] installed on the thread that runs the backward, our fused ops
//! write a parameter's gradient into its buffer instead — the first contribution in place (the
//! product's output *is* the buffer), later ones added onto it (the GEMM accumulates) — and give
//! candle nothing for it. Gradients of parameters the sink does not hold, and gradients candle's
//! own ops compute, still come back in candle's `GradStore`; the caller adds the two
//! ([`GradSink::take`] returns what the sink holds).
//!
//! The sink lives in a thread-local: candle calls every op's backward on the thread that called
//! `backward()`, so ops find the sink of the backward they belong to, and two trainers on two
//! threads never share one.
//!
//! Install it before the forward where you can (the trainer, PPO and the bench do): GPT-2's
//! blocks and Llama-family layers then run in training as one graph node each ([`super::block`]), which needs to know
//! during the forward that its weights' gradients have somewhere to go. Installed only around
//! `backward()`, the sink still takes the weight gradients and the blocks are composed of
//! their ops.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{Result, Shape, Tensor, TensorId};
use rayon::prelude::*;

struct Slot {
    shape: Shape,
    data: Option<Vec<f32>>,
}

thread_local! {
    static SINK: RefCell<Option<HashMap<TensorId, Slot>>> = const { RefCell::new(None) };
}

/// The sink of this thread while it lives (one at a time: installing a second while one is live
/// is an error). Dropping it uninstalls it and drops what it still holds.
pub struct GradSink {
    ids: Vec<TensorId>,
}

impl GradSink {
    /// Take over the weight gradients of `params` (f32 tensors) on this thread.
    pub fn install(params: &[&Tensor]) -> Result<Self> {
        SINK.with(|s| {
            let mut s = s.borrow_mut();
            if s.is_some() {
                candle_core::bail!("a gradient sink is already installed on this thread")
            }
            let map = params
                .iter()
                .map(|p| {
                    let slot = Slot {
                        shape: p.shape().clone(),
                        data: None,
                    };
                    (p.id(), slot)
                })
                .collect();
            *s = Some(map);
            Ok(Self {
                ids: params.iter().map(|p| p.id()).collect(),
            })
        })
    }

    /// What the fused ops wrote since installation or the last `take`, in the order of the
    /// `params` given to [`Self::install`] (`None` where nothing was written); the buffers are
    /// emptied, so the next backward starts afresh.
    pub fn take(&self) -> Result<Vec<Option<Tensor>>> {
        SINK.with(|s| {
            let mut s = s.borrow_mut();
            let Some(map) = s.as_mut() else {
                candle_core::bail!("gradient sink: not installed on this thread")
            };
            self.ids
                .iter()
                .map(|id| {
                    let slot = map.get_mut(id).expect("installed ids have slots");
                    slot.data
                        .take()
                        .map(|v| Tensor::from_vec(v, slot.shape.clone(), &candle_core::Device::Cpu))
                        .transpose()
                })
                .collect()
        })
    }
}

impl Drop for GradSink {
    fn drop(&mut self) {
        SINK.with(|s| *s.borrow_mut() = None);
    }
}

/// The sum of two optional gradients of one parameter (candle's and the sink's, or two
/// micro-batches'): either alone, or both added.
pub fn sum_grads(a: Option<Tensor>, b: Option<Tensor>) -> Result<Option<Tensor>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some((a + b)?),
        (a, None) => a,
        (None, b) => b,
    })
}

/// Whether this thread's sink (if one is installed) takes `w`'s gradient.
pub(crate) fn holds(w: &Tensor) -> bool {
    SINK.with(|s| s.borrow().as_ref().is_some_and(|m| m.contains_key(&w.id())))
}

/// The gradient of weight `w` (`len` elements), produced by `write(dst, accumulate)`, which
/// fills `dst` (`accumulate` false) or adds its contribution onto it (true). With `w` in this
/// thread's sink, `dst` is its buffer and the result `None` (nothing for candle); otherwise a
/// fresh vector, returned for candle.
pub(crate) fn weight_grad(
    w: &Tensor,
    len: usize,
    write: impl FnOnce(&mut [f32], bool),
) -> Option<Vec<f32>> {
    let mut write = Some(write);
    let sunk = SINK.with(|s| {
        let mut s = s.borrow_mut();
        let Some(slot) = s.as_mut().and_then(|m| m.get_mut(&w.id())) else {
            return false;
        };
        let write = write.take().expect("called once");
        assert_eq!(
            slot.shape.elem_count(),
            len,
            "gradient sink: size of {:?}",
            slot.shape
        );
        match &mut slot.data {
            Some(buf) => write(buf, true),
            None => {
                let mut buf = super::uninit(len);
                write(&mut buf, false);
                slot.data = Some(buf);
            }
        }
        true
    });
    if sunk {
        return None;
    }
    let mut v = super::uninit(len);
    (write.take().expect("called once"))(&mut v, false);
    Some(v)
}

/// A weight gradient an op has already computed into `g`: moved into (or added onto, in
/// parallel) `w`'s buffer when this thread's sink holds `w` (`None`: nothing for candle);
/// otherwise handed back.
pub(crate) fn offer(w: &Tensor, g: Vec<f32>) -> Option<Vec<f32>> {
    SINK.with(|s| {
        let mut s = s.borrow_mut();
        let Some(slot) = s.as_mut().and_then(|m| m.get_mut(&w.id())) else {
            return Some(g);
        };
        assert_eq!(
            slot.shape.elem_count(),
            g.len(),
            "gradient sink: size of {:?}",
            slot.shape
        );
        match &mut slot.data {
            Some(buf) => buf
                .par_chunks_mut(1 << 14)
                .zip(g.par_chunks(1 << 14))
                .for_each(|(d, s)| super::math::add_assign(d, s)),
            None => slot.data = Some(g),
        }
        None
    })
}
