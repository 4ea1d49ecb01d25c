//! GPT-2's transformer block in training as **one graph node**, its weight gradients written
//! straight into the thread's gradient sink ([`super::sink`]).
//!
//! The block is the same fused ops as the composed path (LayerNorm, the biased Conv1D products,
//! packed attention, the product with GELU), run in the same order on the same kernels, so its
//! values and gradients are the composed path's. What changes is candle's share: for every
//! input of every node its backward zero-fills a gradient buffer and adds the contribution onto
//! it, on one thread, while the other threads wait. A block of nine nodes made eleven such
//! buffers (`[rows × d]`, `[rows × 3d]`, `[rows × 4d]`); as one node it makes one. The two
//! residual adds, forward and backward, run here in parallel.
//!
//! It applies only where every weight gradient has a destination without candle: each of the
//! block's twelve tensors is held by the sink installed on this thread *before the forward*,
//! and the block's input tracks gradients (otherwise candle would never call its backward).
//! [`gpt2_block`] returns `None` otherwise, and the caller composes the block from its ops.
//!
//! The backward consumes the tape, freeing each block's activations as soon as its gradients
//! are out (part of why a step's peak memory fell by a tenth): one backward per forward, as
//! every trainer here runs. A second backward over the same graph is an error that says so.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use super::attention::Packed;
use super::matmul::LinearBias;
use super::mlp::LinearGelu;
use super::norm::{LayerNorm, Saved};
use super::{fusable, math, out, sink, with_f32};

/// The block's tensors: LayerNorm weights and biases, Conv1D weights `[in, out]` and biases.
pub struct Gpt2BlockWeights {
    pub ln_1: (Tensor, Tensor),
    pub c_attn: (Tensor, Tensor),
    pub c_proj: (Tensor, Tensor),
    pub ln_2: (Tensor, Tensor),
    pub c_fc: (Tensor, Tensor),
    pub mlp_proj: (Tensor, Tensor),
}

impl Gpt2BlockWeights {
    /// The twelve tensors in block order (the tape's indices).
    fn into_all(self) -> [Tensor; 12] {
        let [a, b, c, d, e, f] = [
            self.ln_1,
            self.c_attn,
            self.c_proj,
            self.ln_2,
            self.c_fc,
            self.mlp_proj,
        ];
        [a.0, a.1, b.0, b.1, c.0, c.1, d.0, d.1, e.0, e.1, f.0, f.1]
    }
}

/// What the forward keeps for the backward: the block's activations, its weights and the ops
/// (each holding its own saved state: norm statistics, attention's log-sum-exp, the
/// pre-activation of the GELU).
struct Tape {
    w: [Tensor; 12],
    x: Tensor,
    h1: Tensor,
    qkv: Tensor,
    y: Tensor,
    x1: Tensor,
    h2: Tensor,
    a: Tensor,
    ln_1: LayerNorm,
    attn: Packed,
    ln_2: LayerNorm,
    fc: LinearGelu,
}

/// The graph node: its forward hands candle the output computed by [`gpt2_block`], its
/// backward runs the block's backward on the tape.
struct Block {
    out: Mutex<Option<Vec<f32>>>,
    tape: Mutex<Option<Tape>>,
}

/// Products of the block, all GPT-2 Conv1D (`[in, out]` weights).
const CONV1D: LinearBias = LinearBias { transposed: true };

/// Every gradient wanted from a product: the input's and both parameters'.
const ALL: (bool, bool, bool) = (true, true, true);

/// `Some(t)` as `t`, `None` as an error naming what is missing.
fn need(t: Option<Tensor>, what: &str) -> Result<Tensor> {
    t.ok_or_else(|| candle_core::Error::Msg(format!("gpt2 block: no gradient for {what}")))
}

/// A weight gradient must have gone to the sink: the block returns nothing for candle.
fn sunk(grads: &[Option<Tensor>], what: &str) -> Result<()> {
    if grads.iter().any(Option::is_some) {
        candle_core::bail!(
            "gpt2 block: the gradient of {what} found no gradient sink; the sink installed \
             before the forward must still be installed for the backward"
        )
    }
    Ok(())
}

/// `a + b` for two tensors of one shape.
fn added(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let v = with_f32(&[a, b], |s| math::added(s[0], s[1]))?;
    Tensor::from_vec(v, a.shape(), a.device())
}

impl CustomOp1 for Block {
    fn name(&self) -> &'static str {
        "gpt2-block"
    }
    fn cpu_fwd(&self, _s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(o) = self.out.lock().expect("gpt2 block").take() else {
            candle_core::bail!("gpt2 block: forward applied twice")
        };
        out(o, l.shape())
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let Some(t) = self.tape.lock().expect("gpt2 block").take() else {
            candle_core::bail!("gpt2 block: backward run twice on one forward")
        };
        let g = g.contiguous()?;
        let w = &t.w;
        // out = x1 + mlp_proj(gelu(c_fc(ln_2(x1)))), x1 = x + c_proj(attn(c_attn(ln_1(x)))).
        let (da, dw, db) = CONV1D.grads((&t.a, &w[10], &w[11]), &g, ALL)?;
        sunk(&[dw, db], "mlp.c_proj")?;
        let (dh2, dw, db) = t.fc.grads((&t.h2, &w[8], &w[9]), &need(da, "mlp")?, ALL)?;
        sunk(&[dw, db], "mlp.c_fc")?;
        let (dx1, dw, db) = t
            .ln_2
            .bwd(&t.x1, &w[6], &w[7], &t.h2, &need(dh2, "ln_2")?)?;
        sunk(&[dw, db], "ln_2")?;
        let g1 = added(&g, &need(dx1, "ln_2's input")?)?;
        let (dy, dw, db) = CONV1D.grads((&t.y, &w[4], &w[5]), &g1, ALL)?;
        sunk(&[dw, db], "attn.c_proj")?;
        let dqkv = t.attn.bwd(&t.qkv, &t.y, &need(dy, "attention")?)?;
        let (dh1, dw, db) = CONV1D.grads((&t.h1, &w[2], &w[3]), &need(dqkv, "qkv")?, ALL)?;
        sunk(&[dw, db], "attn.c_attn")?;
        let (dx, dw, db) = t.ln_1.bwd(&t.x, &w[0], &w[1], &t.h1, &need(dh1, "ln_1")?)?;
        sunk(&[dw, db], "ln_1")?;
        Ok(Some(added(&g1, &need(dx, "the block's input")?)?))
    }
}

/// GPT-2's block `[b, t, d] → [b, t, d]` in training as one graph node (see the module's
/// documentation), or `None` where it does not apply: a tensor not f32 on the CPU, an input
/// that tracks no gradient, or a weight this thread's gradient sink does not hold.
pub fn gpt2_block(
    x: &Tensor,
    w: Gpt2BlockWeights,
    n_head: usize,
    eps: f64,
    mask_bias: &Tensor,
) -> Result<Option<Tensor>> {
    let w = w.into_all();
    let mut all: Vec<&Tensor> = w.iter().collect();
    all.push(x);
    if x.rank() != 3 || !x.track_op() || !fusable(&all) || !w.iter().all(sink::holds) {
        return Ok(None);
    }
    let ws: [&Tensor; 12] = std::array::from_fn(|i| &w[i]);
    let x = x.contiguous()?;
    // The same ops as the composed path, run without recording (candle sees only the block).
    let xd = x.detach();
    let ln_1 = LayerNorm(eps as f32, Saved::default());
    let h1 = xd.apply_op3_no_bwd(ws[0], ws[1], &ln_1)?;
    let qkv = h1.apply_op3_no_bwd(ws[2], ws[3], &CONV1D)?;
    let attn = Packed {
        bias: mask_bias.contiguous()?.detach(),
        h: n_head,
        hk: n_head,
        lse: Mutex::new(vec![]),
    };
    let y = qkv.apply_op1_no_bwd(&attn)?;
    let x1 = added(&xd, &y.apply_op3_no_bwd(ws[4], ws[5], &CONV1D)?)?;
    let ln_2 = LayerNorm(eps as f32, Saved::default());
    let h2 = x1.apply_op3_no_bwd(ws[6], ws[7], &ln_2)?;
    let fc = LinearGelu {
        transposed: true,
        save: true,
        pre: Mutex::new(None),
    };
    let a = h2.apply_op3_no_bwd(ws[8], ws[9], &fc)?;
    let m = a.apply_op3_no_bwd(ws[10], ws[11], &CONV1D)?;
    let o = with_f32(&[&x1, &m], |s| math::added(s[0], s[1]))?;
    let block = Block {
        out: Mutex::new(Some(o)),
        tape: Mutex::new(Some(Tape {
            w,
            x: xd,
            h1,
            qkv,
            y,
            x1,
            h2,
            a,
            ln_1,
            attn,
            ln_2,
            fc,
        })),
    };
    Ok(Some(x.apply_op1(block)?))
}
