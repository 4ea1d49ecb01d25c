//! A transformer block in training as **one graph node** — GPT-2's ([`gpt2_block`]) and the
//! Llama family's ([`llama_block`]) — its weight gradients written straight into the thread's
//! gradient sink ([`super::sink`]).
//!
//! The block is the same fused ops as the composed path (GPT-2: LayerNorm, the biased Conv1D
//! products, packed attention, the product with GELU; Llama: RMSNorm, the q/k/v projections,
//! RoPE, grouped-query attention, the output projection onto the residual, the SwiGLU MLP),
//! run in the same order on the same kernels, so its values and gradients are the composed
//! path's. What changes is candle's share: for every input of every node its backward
//! zero-fills a gradient buffer and adds the contribution onto it, on one thread, while the
//! other threads wait. A GPT-2 block of nine nodes made eleven such buffers (`[rows × d]`,
//! `[rows × 3d]`, `[rows × 4d]`); as one node it makes one. The residual adds, forward and
//! backward, run here in parallel.
//!
//! Llama's q, k and v projections run as **one product** on their weights stacked row-wise
//! (with Qwen2's biases, stacked too), so the normalised input is packed once for the GEMM,
//! not three times, and k's and v's narrow products (a GQA model's kv heads are few) become
//! part of one wide one. RoPE rotates q's and k's heads in place inside that packed output,
//! attention reads q, k and v there (as GPT-2's packed attention does), and the backward
//! takes each projection's weight gradient from its own columns of the packed gradient.
//!
//! It applies only where every weight gradient has a destination without candle: each of the
//! block's tensors is held by the sink installed on this thread *before the forward*, and the
//! block's input tracks gradients (otherwise candle would never call its backward). The Llama
//! block also takes frozen tensors (tracking no gradient: it computes none for them) and runs
//! LoRA adapters on any of its seven projections itself, with their dropout masks, so a LoRA
//! model's layers are one node each too. Its input may be frozen as well (a LoRA model's first
//! layer reads the frozen embedding): the node is then applied to the input and one of its
//! trained tensors, for candle to call its backward, which computes no input gradient. The
//! functions return `None` otherwise, and the caller composes the block from its ops.
//!
//! The backward consumes the tape, freeing each block's activations as soon as its gradients
//! are out (part of why a step's peak memory fell by a tenth): one backward per forward, as
//! every trainer here runs. A second backward over the same graph is an error that says so.
//!
//! Under gradient checkpointing ([`recompute_layers`], `train.gradient_checkpointing`) a
//! block keeps its input and tensors instead of its tape, and its backward first runs the same
//! forward again ([`gpt2_run`], [`llama_run`]) to rebuild the tape it would have kept.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::attention::Packed;
use super::dropout::DropoutMask;
use super::elementwise::{binary, gelu_fwd, swiglu_fwd, unary};
use super::gemm::{mat, sgemm};
use super::matmul::{linear_fwd, linear_grads, rows_k, split_grads, Onto};
use super::mlp::{swiglu_product_grads, LinearGelu, SwiGluMlp};
use super::norm::{LayerNorm, RmsNorm, Saved};
use super::rope::rope_packed_in_place;
use super::{fusable, math, out, sink, with_f32};
use rayon::prelude::*;

/// The block's tensors: LayerNorm weights and biases, Conv1D weights `[in, out]` and biases,
/// and the LoRA adapters active on the four products (c_attn, attn.c_proj, c_fc, mlp.c_proj).
/// A tensor that tracks no gradient is frozen: the block computes no gradient for it (a LoRA
/// model's base weights).
pub struct Gpt2BlockWeights {
    pub ln_1: (Tensor, Tensor),
    pub c_attn: (Tensor, Tensor),
    pub c_proj: (Tensor, Tensor),
    pub ln_2: (Tensor, Tensor),
    pub c_fc: (Tensor, Tensor),
    pub mlp_proj: (Tensor, Tensor),
    pub adapters: [Option<LoraWeights>; 4],
}

impl Gpt2BlockWeights {
    /// The twelve tensors in block order (the tape's indices), and the adapters.
    fn into_all(self) -> ([Tensor; 12], [Option<LoraWeights>; 4]) {
        let [a, b, c, d, e, f] = [
            self.ln_1,
            self.c_attn,
            self.c_proj,
            self.ln_2,
            self.c_fc,
            self.mlp_proj,
        ];
        let w = [a.0, a.1, b.0, b.1, c.0, c.1, d.0, d.1, e.0, e.1, f.0, f.1];
        (w, self.adapters)
    }

    /// Every tensor: weights, biases, adapters.
    fn all(&self) -> Vec<&Tensor> {
        let mut all = vec![];
        for (w, b) in [
            &self.ln_1,
            &self.c_attn,
            &self.c_proj,
            &self.ln_2,
            &self.c_fc,
            &self.mlp_proj,
        ] {
            all.extend([w, b]);
        }
        all.extend(
            self.adapters
                .iter()
                .flatten()
                .flat_map(LoraWeights::tensors),
        );
        all
    }

    /// Whether [`gpt2_block`] runs on these tensors and input `x` (see [`node_applies`]).
    pub fn applies(&self, x: &Tensor) -> bool {
        node_applies(x, self.all())
    }
}

/// Whether a block node runs on input `x` and the block's tensors `all`: `x` of rank 3, every
/// tensor f32 on the CPU, something that trains (the input or a tensor), and every trained
/// tensor held by this thread's gradient sink (frozen ones need not be).
fn node_applies<'a>(x: &'a Tensor, mut all: Vec<&'a Tensor>) -> bool {
    let held = all.iter().all(|t| !trains(t) || sink::holds(t));
    let something_trains = x.track_op() || all.iter().any(|t| trains(t));
    all.push(x);
    x.rank() == 3 && fusable(&all) && held && something_trains
}

/// The node in candle's graph over input `x`: applied to the input, or with a frozen input (a
/// LoRA model's first layer reads the frozen embedding) to the input and the first trained
/// tensor of `all`, so that candle still calls its backward.
fn apply_node(x: &Tensor, all: Vec<&Tensor>, block: Block) -> Result<Tensor> {
    match all
        .into_iter()
        .find(|t| trains(t))
        .filter(|_| !x.track_op())
    {
        None => x.apply_op1(block),
        Some(anchor) => x.apply_op2(anchor, block),
    }
}

/// What GPT-2's forward keeps for the backward: the block's activations, its weights and the
/// ops (each holding its own saved state: norm statistics, attention's log-sum-exp, the
/// pre-activation of the GELU).
struct Gpt2Tape {
    w: [Tensor; 12],
    /// The adapters on c_attn, attn.c_proj, c_fc and mlp.c_proj, and each one's
    /// `scale · x' · Aᵀ`, kept for its gradients.
    lora: [Option<LoraWeights>; 4],
    lora_h: [Option<Vec<f32>>; 4],
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

/// A block's tape: GPT-2's or a Llama's, or, when activations are recomputed
/// ([`recompute_activations`]), what it takes to rebuild one.
enum Tape {
    Gpt2(Box<Gpt2Tape>),
    Llama(Box<LlamaTape>),
    Gpt2Recipe(Box<Gpt2Recipe>),
    LlamaRecipe(Box<LlamaRecipe>),
}

thread_local! {
    /// How many layers, from the first, recompute ([`recompute_layers`]).
    static RECOMPUTE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static REBUILT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many blocks this thread's backwards have rebuilt from their recipes so far.
pub fn blocks_recomputed() -> usize {
    REBUILT.with(|r| r.get())
}

/// A recipe's forward (without the block's output, which the backward does not read),
/// counted ([`blocks_recomputed`]).
fn rebuilt<T>(run: Result<(Vec<f32>, T)>) -> Result<T> {
    REBUILT.with(|r| r.set(r.get() + 1));
    Ok(run?.1)
}

/// Gradient checkpointing for every block node built on this thread while the guard lives
/// (`on`; the previous setting comes back when it drops): a block keeps only its input and
/// its tensors for the backward, not its activations, and its backward first runs its forward
/// again to rebuild them. The same tape, so the same gradients bit for bit, for one more
/// forward of every block per step; a step then holds one `[tokens × d]` input per layer
/// instead of the dozen activations of each (a Llama layer keeps about `6·d + 3·ffn` floats
/// per token, GPT-2's `9·d + 8·d`). The fused LM head keeps no logits either
/// ([`head_recomputes`]). [`recompute_layers`] with `usize::MAX` or 0.
pub fn recompute_activations(on: bool) -> RecomputeGuard {
    recompute_layers(if on { usize::MAX } else { 0 })
}

/// Gradient checkpointing for the first `layers` layers of the models run on this thread while
/// the guard lives (the previous setting comes back when it drops): their block nodes keep
/// their inputs only, as [`recompute_activations`] describes, the others their tapes.
/// `usize::MAX` means every layer and the fused LM head too ([`head_recomputes`]), which is
/// otherwise left keeping its logits: rebuilding them costs a head forward (on SmolLM2 as much
/// as 8 layers') for the memory of about 4 layers, so it comes last.
///
/// The first layers, because the backward reaches them last: the kept tapes of the later
/// layers are freed before the first rebuild, so a step's peak holds the kept tapes or one
/// rebuilt one, never both. Memory and the extra forward both scale with `layers`.
pub fn recompute_layers(layers: usize) -> RecomputeGuard {
    RecomputeGuard(RECOMPUTE.with(|r| r.replace(layers)))
}

/// Whether any block node built on this thread now recomputes its activations in the
/// backward.
pub fn recomputing() -> bool {
    RECOMPUTE.with(|r| r.get()) > 0
}

/// Whether the block node of layer `layer` (0-based) recomputes its activations in the
/// backward ([`recompute_layers`]).
pub fn recomputes(layer: usize) -> bool {
    layer < RECOMPUTE.with(|r| r.get())
}

/// Whether the fused LM head rebuilds its logits in the backward instead of keeping them:
/// under [`recompute_activations`]`(true)` (`recompute_layers(usize::MAX)`) only.
pub fn head_recomputes() -> bool {
    RECOMPUTE.with(|r| r.get()) == usize::MAX
}

/// Restores the previous [`recompute_layers`] setting when dropped.
pub struct RecomputeGuard(usize);

impl Drop for RecomputeGuard {
    fn drop(&mut self) {
        RECOMPUTE.with(|r| r.set(self.0));
    }
}

/// What GPT-2's block forward reads: its input (contiguous, detached), its twelve tensors and
/// adapters, the head count, LayerNorm's `eps` and the attention bias.
struct Gpt2Recipe {
    x: Tensor,
    w: [Tensor; 12],
    lora: [Option<LoraWeights>; 4],
    n_head: usize,
    eps: f32,
    bias: Tensor,
}

/// What a Llama block's forward reads: its input (contiguous, detached), its tensors (the
/// adapters' dropout masks included), the head counts, RMSNorm's `eps`, RoPE's tables and
/// the attention bias.
struct LlamaRecipe {
    x: Tensor,
    w: LlamaBlockWeights,
    heads: (usize, usize),
    eps: f32,
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
}

impl Gpt2Tape {
    /// The tape without its activations.
    fn into_recipe(self) -> Gpt2Recipe {
        Gpt2Recipe {
            n_head: self.attn.h,
            eps: self.ln_1.0,
            bias: self.attn.bias,
            x: self.x,
            w: self.w,
            lora: self.lora,
        }
    }
}

impl LlamaTape {
    /// The tape without its activations.
    fn into_recipe(self) -> LlamaRecipe {
        LlamaRecipe {
            heads: (self.attn.h, self.attn.hk),
            eps: self.rms_1.0,
            bias: self.attn.bias,
            x: self.x,
            w: self.w,
            cos: self.cos,
            sin: self.sin,
        }
    }
}

impl Tape {
    /// The tape to keep: itself, or its recipe when its activations are recomputed.
    fn kept(self, recompute: bool) -> Self {
        match (recompute, self) {
            (true, Tape::Gpt2(t)) => Tape::Gpt2Recipe(Box::new(t.into_recipe())),
            (true, Tape::Llama(t)) => Tape::LlamaRecipe(Box::new(t.into_recipe())),
            (_, t) => t,
        }
    }
}

/// The graph node: its forward hands candle the output computed by [`gpt2_block`] or
/// [`llama_block`], its backward runs the block's backward on the tape. It is applied to the
/// block's input (a `CustomOp1`), or, where the input tracks no gradient (the first layer of a
/// model whose embedding is frozen), as a `CustomOp2` on the input and one of the block's
/// trained tensors, so that candle still calls its backward; that backward computes no input
/// gradient and returns nothing for the tensor (its gradient went to the sink).
struct Block {
    name: &'static str,
    out: Mutex<Option<Vec<f32>>>,
    tape: Mutex<Option<Tape>>,
}

/// `Some(t)` as `t`, `None` as an error naming what is missing.
fn need<T>(t: Option<T>, what: &str) -> Result<T> {
    t.ok_or_else(|| candle_core::Error::Msg(format!("block: no gradient for {what}")))
}

/// The error for a weight gradient that found no sink to go to.
fn no_sink(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "block: the gradient of {what} found no gradient sink; the sink installed before the \
         forward must still be installed for the backward"
    ))
}

/// A weight gradient must have gone to the sink: the block returns nothing for candle.
fn sunk(grads: &[Option<Tensor>], what: &str) -> Result<()> {
    if grads.iter().any(Option::is_some) {
        return Err(no_sink(what));
    }
    Ok(())
}

/// `a + b` for two tensors of one shape.
fn added(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let v = with_f32(&[a, b], |s| math::added(s[0], s[1]))?;
    Tensor::from_vec(v, a.shape(), a.device())
}

impl Block {
    /// The output the block's forward computed, handed to candle once.
    fn output(&self, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(o) = self.out.lock().expect("block").take() else {
            candle_core::bail!("{}: forward applied twice", self.name)
        };
        out(o, l.shape())
    }

    /// The backward on the tape: the input's gradient when `want_dx`.
    fn backward(&self, g: &Tensor, want_dx: bool) -> Result<Option<Tensor>> {
        let Some(t) = self.tape.lock().expect("block").take() else {
            candle_core::bail!("{}: backward run twice on one forward", self.name)
        };
        let g = g.contiguous()?;
        Ok(match t {
            Tape::Gpt2(t) => gpt2_bwd(*t, &g, want_dx)?,
            Tape::Llama(t) => llama_bwd(*t, &g, want_dx)?,
            Tape::Gpt2Recipe(r) => gpt2_bwd(rebuilt(gpt2_run(*r, false))?, &g, want_dx)?,
            Tape::LlamaRecipe(r) => llama_bwd(rebuilt(llama_run(*r, false))?, &g, want_dx)?,
        })
    }
}

impl CustomOp1 for Block {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output(l)
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        self.backward(g, true)
    }
}

impl CustomOp2 for Block {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output(l1)
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(g, false)?;
        Ok((None, None))
    }
}

/// The input gradient (when `want_dx`) of GPT-2's product `j` (c_attn, attn.c_proj, c_fc,
/// mlp.c_proj: Conv1D weight `w[i]`, bias `w[i + 1]`, and its adapter if any) at input `x` for
/// upstream `g`, as a vector; its trained tensors' gradients into the sink.
fn gpt2_product_bwd(
    t: &Gpt2Tape,
    j: usize,
    x: &Tensor,
    g: &Tensor,
    want_dx: bool,
) -> Result<Option<Vec<f32>>> {
    const NAMES: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];
    let i = [2, 4, 8, 10][j];
    let mut dx = conv_bwd(x, (&t.w[i], &t.w[i + 1]), g, want_dx, NAMES[j])?;
    if let (Some(l), Some(ha)) = (&t.lora[j], &t.lora_h[j]) {
        let (n, what) = (l.b.dim(0)?, format!("{}'s adapter", NAMES[j]));
        with_f32(&[g], |gv| {
            lora_bwd(x, l, ha, gv[0], (n, 0), dx.as_deref_mut(), &what)
        })??;
    }
    Ok(dx)
}

/// GPT-2's block backward: the input's gradient (when `want_dx`), every trained weight's into
/// the sink.
fn gpt2_bwd(t: Gpt2Tape, g: &Tensor, want_dx: bool) -> Result<Option<Tensor>> {
    let w = &t.w;
    let dev = t.x.device();
    // out = x1 + mlp_proj(gelu(c_fc(ln_2(x1)))), x1 = x + c_proj(attn(c_attn(ln_1(x)))), each
    // product plus its adapter if any.
    let da = need(gpt2_product_bwd(&t, 3, &t.a, g, true)?, "mlp")?;
    let da = Tensor::from_vec(da, t.a.shape(), dev)?;
    let gu = Tensor::from_vec(t.fc.pre_grad(&da)?, da.shape(), dev)?;
    let dh2 = need(gpt2_product_bwd(&t, 2, &t.h2, &gu, true)?, "ln_2")?;
    let dh2 = Tensor::from_vec(dh2, t.h2.shape(), dev)?;
    let (dx1, dw, db) = t.ln_2.bwd(&t.x1, &w[6], &w[7], &t.h2, &dh2)?;
    sunk_unless_frozen(dw, &w[6], "ln_2")?;
    sunk_unless_frozen(db, &w[7], "ln_2")?;
    let g1 = added(g, &need(dx1, "ln_2's input")?)?;
    let dy = need(gpt2_product_bwd(&t, 1, &t.y, &g1, true)?, "attention")?;
    let dy = Tensor::from_vec(dy, t.y.shape(), dev)?;
    let dqkv = Tensor::from_vec(t.attn.grad_vec(&t.qkv, &t.y, &dy)?, t.qkv.shape(), dev)?;
    // The normalised input's gradient is needed for the block's input or ln_1's tensors;
    // without either (the first layer of a LoRA model) only the weights' gradients are taken.
    let want_dh1 = want_dx || trains(&w[0]) || trains(&w[1]);
    let dh1 = gpt2_product_bwd(&t, 0, &t.h1, &dqkv, want_dh1)?;
    let Some(dh1) = dh1 else {
        return Ok(None);
    };
    let dh1 = Tensor::from_vec(dh1, t.h1.shape(), dev)?;
    let (dx, dw, db) = t.ln_1.bwd(&t.x, &w[0], &w[1], &t.h1, &dh1)?;
    sunk_unless_frozen(dw, &w[0], "ln_1")?;
    sunk_unless_frozen(db, &w[1], "ln_1")?;
    if !want_dx {
        return Ok(None);
    }
    Ok(Some(added(&g1, &need(dx, "the block's input")?)?))
}

/// The input gradient (when `want_dx`) of a Conv1D product `x · W + b` (`W [in, out]`) for
/// upstream `g`, as a vector; the weight's and bias's gradients into the sink (none for
/// frozen ones).
fn conv_bwd(
    x: &Tensor,
    (w, b): (&Tensor, &Tensor),
    g: &Tensor,
    want_dx: bool,
    what: &str,
) -> Result<Option<Vec<f32>>> {
    let (m, k) = rows_k(x.dims())?;
    let n = b.dim(0)?;
    let wants = (want_dx, trains(w), trains(b));
    let (dx, dw, db) = linear_grads(x, w, Some(b), g, (m, k, n), true, wants)?;
    if dw.is_some() || db.is_some() {
        return Err(no_sink(what));
    }
    Ok(dx)
}

/// GPT-2's block `[b, t, d] → [b, t, d]` in training as one graph node (see the module's
/// documentation), or `None` where it does not apply ([`Gpt2BlockWeights::applies`]). Frozen
/// tensors (tracking no gradient) get none, and neither does a frozen input; LoRA adapters
/// (with their dropout masks) run inside the block. With `recompute` it keeps its input
/// instead of its activations ([`recompute_layers`]).
pub fn gpt2_block(
    x: &Tensor,
    w: Gpt2BlockWeights,
    n_head: usize,
    eps: f64,
    mask_bias: &Tensor,
    recompute: bool,
) -> Result<Option<Tensor>> {
    if !w.applies(x) || !fusable(&[mask_bias]) {
        return Ok(None);
    }
    let (w, lora) = w.into_all();
    let all: Vec<Tensor> = w
        .iter()
        .chain(lora.iter().flatten().flat_map(LoraWeights::tensors))
        .cloned()
        .collect();
    let recipe = Gpt2Recipe {
        x: x.contiguous()?.detach(),
        w,
        lora,
        n_head,
        eps: eps as f32,
        bias: mask_bias.contiguous()?.detach(),
    };
    let (o, tape) = gpt2_run(recipe, true)?;
    let block = Block {
        name: "gpt2-block",
        out: Mutex::new(Some(o)),
        tape: Mutex::new(Some(Tape::Gpt2(Box::new(tape)).kept(recompute))),
    };
    Ok(Some(apply_node(x, all.iter().collect(), block)?))
}

/// GPT-2's block forward on its recipe: the output (empty without `output`: the last product
/// only makes it, and the backward reads the tape alone) and the tape.
fn gpt2_run(r: Gpt2Recipe, output: bool) -> Result<(Vec<f32>, Gpt2Tape)> {
    let Gpt2Recipe {
        x: xd,
        w,
        lora,
        n_head,
        eps,
        bias,
    } = r;
    let (b, t, d) = xd.dims3()?;
    // The same ops as the composed path, run without recording (candle sees only the block).
    let mut lora_h: [Option<Vec<f32>>; 4] = Default::default();
    // Product `j` (Conv1D weight `w[i]`, bias `w[i + 1]`) of input `x`, plus its adapter.
    let mut conv = |x: &Tensor, i: usize, j: usize| -> Result<Vec<f32>> {
        let mut y = product_vec(x, &w[i], (Some(&w[i + 1]), false), true)?;
        if let Some(l) = &lora[j] {
            let n = w[i].dim(1)?;
            lora_h[j] = Some(lora_fwd(x, l, &mut y, (n, 0))?);
        }
        Ok(y)
    };
    let ln_1 = LayerNorm(eps, Saved::default());
    let h1 = xd.apply_op3_no_bwd(&w[0], &w[1], &ln_1)?;
    let qkv = Tensor::from_vec(conv(&h1, 2, 0)?, (b, t, w[2].dim(1)?), xd.device())?;
    let attn = Packed {
        bias,
        h: n_head,
        hk: n_head,
        lse: Mutex::new(vec![]),
    };
    let y = qkv.apply_op1_no_bwd(&attn)?;
    let p = conv(&y, 4, 1)?;
    let x1 = with_f32(&[&xd], |s| math::added(s[0], &p))?;
    let x1 = Tensor::from_vec(x1, (b, t, d), xd.device())?;
    let ln_2 = LayerNorm(eps, Saved::default());
    let h2 = x1.apply_op3_no_bwd(&w[6], &w[7], &ln_2)?;
    // c_fc and GELU as their fused op runs them; the pre-activation stays for the backward.
    let u = conv(&h2, 8, 2)?;
    let a = Tensor::from_vec(unary(&u, gelu_fwd), (b, t, w[8].dim(1)?), xd.device())?;
    let fc = LinearGelu {
        transposed: true,
        save: true,
        pre: Mutex::new(Some(u)),
    };
    let o = match output {
        true => {
            let m = conv(&a, 10, 3)?;
            with_f32(&[&x1], |s| math::added(s[0], &m))?
        }
        false => {
            if let Some(l) = &lora[3] {
                lora_h[3] = Some(lora_ha(&a, l, (w[10].dim(1)?, 0))?);
            }
            Vec::new()
        }
    };
    let tape = Gpt2Tape {
        w,
        lora,
        lora_h,
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
    };
    Ok((o, tape))
}

/// A LoRA adapter on a projection: `y += scale · (x' · Aᵀ) · Bᵀ`, A `[r, in]`, B `[out, r]`,
/// where `x'` is the projection's input `x`, or `x ⊙ mask` under adapter dropout (a mask over
/// `x`'s elements, as [`crate::linear::Lora`] draws it).
pub struct LoraWeights {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub mask: Option<DropoutMask>,
}

impl LoraWeights {
    /// A and B.
    fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        [&self.a, &self.b].into_iter()
    }
}

/// One of a Llama layer's projections (HF layout `[out, in]`): its weight, its bias (Qwen2's
/// q/k/v; the block takes none elsewhere), and its LoRA adapter if one is active.
pub struct Projection {
    pub w: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraWeights>,
}

/// A Llama-family block's tensors, in HF layouts: the two RMSNorm weights, the q/k/v/o
/// projections (q/k/v biases all three or none), and the bias-free gate, up and down
/// projections; any projection may carry a LoRA adapter. A tensor that tracks no gradient is
/// frozen: the block computes no gradient for it (a LoRA model's base weights).
pub struct LlamaBlockWeights {
    pub input_norm: Tensor,
    pub q: Projection,
    pub k: Projection,
    pub v: Projection,
    pub o: Projection,
    pub post_norm: Tensor,
    pub gate: Projection,
    pub up: Projection,
    pub down: Projection,
}

/// The HF names of a Llama layer's projections in block order (LoRA's `target_modules` for
/// all of them).
pub const LLAMA_PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The adapters' slots, in block order.
const Q: usize = 0;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

impl LlamaBlockWeights {
    /// The seven projections in block order: q, k, v, o, gate, up, down.
    fn projections(&self) -> [&Projection; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    /// The same, mutable.
    pub fn projections_mut(&mut self) -> [&mut Projection; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }

    /// Whether [`llama_block`] runs on these tensors and input `x` (what its `None` depends on,
    /// besides RoPE's tables and the mask bias being f32 on the CPU): [`node_applies`], and
    /// biases on all of q/k/v or none and nowhere else.
    pub fn applies(&self, x: &Tensor) -> bool {
        let qkv_biases = [&self.q, &self.k, &self.v]
            .iter()
            .filter(|p| p.bias.is_some())
            .count();
        let other_biases = [&self.o, &self.gate, &self.up, &self.down]
            .iter()
            .any(|p| p.bias.is_some());
        (qkv_biases == 0 || qkv_biases == 3) && !other_biases && node_applies(x, self.all())
    }

    /// Every tensor: weights, biases, adapters.
    fn all(&self) -> Vec<&Tensor> {
        let mut all = vec![&self.input_norm, &self.post_norm];
        for p in self.projections() {
            all.push(&p.w);
            all.extend(&p.bias);
            all.extend(p.lora.iter().flat_map(LoraWeights::tensors));
        }
        all
    }
}

/// What a Llama block's forward keeps for the backward.
struct LlamaTape {
    w: LlamaBlockWeights,
    /// q, k and v stacked row-wise `[(h + 2·hk)·hd, d]`: the product's weight.
    wqkv: Tensor,
    x: Tensor,
    h1: Tensor,
    /// The packed projection after RoPE (what attention read).
    qkv: Tensor,
    y: Tensor,
    x1: Tensor,
    h2: Tensor,
    s: Tensor,
    /// Each adapter's `scale · x' · Aᵀ` (q, k, v, o, gate, up, down), kept for its gradients.
    lora_h: [Option<Vec<f32>>; 7],
    rms_1: RmsNorm,
    attn: Packed,
    rms_2: RmsNorm,
    /// SwiGLU's pre-activations (gate's and up's products, adapters included).
    mlp: SwiGluMlp,
    cos: Tensor,
    sin: Tensor,
}

/// Whether the block computes `t`'s gradient: it tracks one (a frozen tensor does not).
fn trains(t: &Tensor) -> bool {
    t.track_op()
}

/// A norm weight's gradient must have gone to the sink, unless the weight is frozen.
fn sunk_unless_frozen(grad: Option<Tensor>, w: &Tensor, what: &str) -> Result<()> {
    if trains(w) {
        sunk(&[grad], what)?;
    }
    Ok(())
}

/// The input gradient of a bias-free HF-layout product `x · Wᵀ` for upstream `g` as a vector,
/// its weight gradient into the sink (none for a frozen weight).
fn product_bwd(x: &Tensor, w: &Tensor, g: &Tensor, what: &str) -> Result<Vec<f32>> {
    let (m, k) = rows_k(x.dims())?;
    let n = w.dim(0)?;
    let (dx, dw, _) = linear_grads(x, w, None, g, (m, k, n), false, (true, trains(w), false))?;
    if dw.is_some() {
        return Err(no_sink(what));
    }
    need(dx, what)
}

/// An adapter's operands `x`, A and B, and `[m, k, r, o]`; checked against `x [m, k]` (and its
/// dropout mask, if any) and an output of rows of `n` whose columns `c0..c0 + o` it adds onto.
fn lora_operands<'a>(
    x: &'a Tensor,
    l: &'a LoraWeights,
    (n, c0): (usize, usize),
) -> Result<(Vec<&'a Tensor>, [usize; 4])> {
    let (m, k) = rows_k(x.dims())?;
    let (r, o) = (l.a.dim(0)?, l.b.dim(0)?);
    let mask_ok = l.mask.as_ref().is_none_or(|mk| mk.len() == m * k);
    if l.a.dims() != [r, k] || l.b.dims() != [o, r] || c0 + o > n || !mask_ok {
        candle_core::bail!(
            "block: adapter {:?} {:?} (mask {:?}) on x {:?}",
            l.a.dims(),
            l.b.dims(),
            l.mask.as_ref().map(DropoutMask::len),
            x.dims()
        )
    }
    Ok((vec![x, &l.a, &l.b], [m, k, r, o]))
}

/// An adapter's forward on `x [m, k]`: `ha = scale · x' · Aᵀ` `[m, r]` (kept for the
/// backward), and `y[:, c0..c0 + o] += ha · Bᵀ` on `y`'s rows of `n`.
fn lora_fwd(
    x: &Tensor,
    l: &LoraWeights,
    y: &mut [f32],
    (n, c0): (usize, usize),
) -> Result<Vec<f32>> {
    let (ts, [m, _, r, o]) = lora_operands(x, l, (n, c0))?;
    if y.len() != m * n {
        candle_core::bail!("block: adapter output of {} for {m} × {n}", y.len())
    }
    let ha = lora_ha(x, l, (n, c0))?;
    with_f32(&ts, |s| {
        let mut d = super::uninit(m * o);
        sgemm(m, o, r, mat(&ha, r, 1), mat(s[2], 1, r), &mut d, false);
        y.par_chunks_mut(n)
            .zip(d.par_chunks(o))
            .for_each(|(yr, dr)| math::add_assign(&mut yr[c0..c0 + o], dr));
    })?;
    Ok(ha)
}

/// The adapter's `scale · x' · Aᵀ` alone (what its backward keeps; [`lora_fwd`]).
fn lora_ha(x: &Tensor, l: &LoraWeights, (n, c0): (usize, usize)) -> Result<Vec<f32>> {
    let (ts, [m, k, r, _]) = lora_operands(x, l, (n, c0))?;
    with_f32(&ts, |s| {
        let xm = l.mask.as_ref().map(|mask| mask.apply(s[0]));
        let mut ha = super::uninit(m * r);
        let xs = xm.as_deref().unwrap_or(s[0]);
        sgemm(m, r, k, mat(xs, k, 1), mat(s[1], 1, k), &mut ha, false);
        let scale = l.scale as f32;
        ha.par_chunks_mut(1 << 14)
            .for_each(|c| c.iter_mut().for_each(|v| *v *= scale));
        ha
    })
}

/// An adapter's backward: for the gradient `g` of its output (columns `c0..c0 + o` of rows of
/// `n`), dB = gᵀ · ha and dA = (scale · g · B)ᵀ · x' into the sink, and (scale · g · B) · A
/// (times the mask under dropout) added onto `dx [m, k]` when the input's gradient is wanted.
fn lora_bwd(
    x: &Tensor,
    l: &LoraWeights,
    ha: &[f32],
    g: &[f32],
    (n, c0): (usize, usize),
    dx: Option<&mut [f32]>,
    what: &str,
) -> Result<()> {
    let (ts, [m, k, r, o]) = lora_operands(x, l, (n, c0))?;
    let gc = &g[c0..];
    let (db, da) = with_f32(&ts, |s| {
        let db = sink::weight_grad(&l.b, o * r, |dst, acc| {
            sgemm(o, r, m, mat(gc, 1, n), mat(ha, r, 1), dst, acc)
        });
        let mut du = super::uninit(m * r);
        sgemm(m, r, o, mat(gc, n, 1), mat(s[2], r, 1), &mut du, false);
        let scale = l.scale as f32;
        du.iter_mut().for_each(|v| *v *= scale);
        let xm = l.mask.as_ref().map(|mask| mask.apply(s[0]));
        let xs = xm.as_deref().unwrap_or(s[0]);
        let da = sink::weight_grad(&l.a, r * k, |dst, acc| {
            sgemm(r, k, m, mat(&du, 1, r), mat(xs, k, 1), dst, acc)
        });
        if let Some(dx) = dx {
            match &l.mask {
                Some(mask) => {
                    let mut dxm = super::uninit(m * k);
                    sgemm(m, k, r, mat(&du, r, 1), mat(s[1], k, 1), &mut dxm, false);
                    mask.add_masked(dx, &dxm);
                }
                None => sgemm(m, k, r, mat(&du, r, 1), mat(s[1], k, 1), dx, true),
            }
        }
        (db, da)
    })?;
    if db.is_some() || da.is_some() {
        return Err(no_sink(what));
    }
    Ok(())
}

/// The backward of adapter `i` of the tape (if its projection has one), input `x`, upstream
/// `g` on columns `c0..` of rows of `n`.
fn tape_lora_bwd(
    t: &LlamaTape,
    i: usize,
    x: &Tensor,
    g: &[f32],
    cols: (usize, usize),
    dx: Option<&mut [f32]>,
) -> Result<()> {
    if let (Some(l), Some(ha)) = (&t.w.projections()[i].lora, &t.lora_h[i]) {
        let what = format!("{}'s adapter", LLAMA_PROJECTIONS[i]);
        lora_bwd(x, l, ha, g, cols, dx, &what)?;
    }
    Ok(())
}

/// A Llama block's backward: the input's gradient (when `want_dx`), every trained weight's
/// into the sink.
fn llama_bwd(t: LlamaTape, g: &Tensor, want_dx: bool) -> Result<Option<Tensor>> {
    let w = &t.w;
    let dev = t.x.device();
    let d = g.dim(2)?;
    // out = x1 + down(silu(gate(h2)) ⊙ up(h2)), h2 = rms_2(x1);
    // x1 = x + o(attn(rope(qkv(rms_1(x))))), each projection plus its adapter if any.
    let mut ds = product_bwd(&t.s, &w.down.w, g, "mlp.down_proj")?;
    with_f32(&[g], |gv| {
        tape_lora_bwd(&t, DOWN, &t.s, gv[0], (d, 0), Some(&mut ds))
    })??;
    let ds = Tensor::from_vec(ds, t.s.shape(), dev)?;
    let (da, db) = t.mlp.pre_grads(&ds)?;
    let wants = (true, trains(&w.gate.w), trains(&w.up.w));
    let (dh2, dwg, dwu) = swiglu_product_grads((&t.h2, &w.gate.w, &w.up.w), (&da, &db), wants)?;
    sunk(&[dwg, dwu], "mlp.gate_proj/up_proj")?;
    let mut dh2 = need(dh2, "post_attention_layernorm")?;
    let inner = w.gate.w.dim(0)?;
    tape_lora_bwd(&t, GATE, &t.h2, &da, (inner, 0), Some(&mut dh2))?;
    tape_lora_bwd(&t, UP, &t.h2, &db, (inner, 0), Some(&mut dh2))?;
    let dh2 = Tensor::from_vec(dh2, t.h2.shape(), dev)?;
    let (dx1, dw) = t.rms_2.bwd(&t.x1, &w.post_norm, &t.h2, &dh2)?;
    sunk_unless_frozen(dw, &w.post_norm, "post_attention_layernorm")?;
    let g1 = added(g, &need(dx1, "post_attention_layernorm's input")?)?;
    let mut dy = product_bwd(&t.y, &w.o.w, &g1, "self_attn.o_proj")?;
    with_f32(&[&g1], |gv| {
        tape_lora_bwd(&t, O, &t.y, gv[0], (d, 0), Some(&mut dy))
    })??;
    let dy = Tensor::from_vec(dy, t.y.shape(), dev)?;
    let mut dqkv = t.attn.grad_vec(&t.qkv, &t.y, &dy)?;
    let (b, tt, n) = t.qkv.dims3()?;
    let hd = t.cos.dim(3)?;
    with_f32(&[&t.cos, &t.sin], |cs| {
        rope_packed_in_place(
            &mut dqkv,
            (b, tt, n),
            t.attn.h + t.attn.hk,
            hd,
            (cs[0], cs[1]),
            true,
        )
    })?;
    // The normalised input's gradient is needed for the block's input or input_norm's weight;
    // without either (the first layer of a LoRA model) only the weights' gradients are taken.
    let want_dh1 = want_dx || trains(&w.input_norm);
    let parts = [&w.q, &w.k, &w.v].map(|p| (&p.w, p.bias.as_ref()));
    let (mut dh1, grads) = split_grads(&t.h1, &t.wqkv, &parts, &dqkv, want_dh1)?;
    for (dw, db) in grads {
        sunk(&[dw, db], "self_attn's q/k/v projections")?;
    }
    let mut c0 = 0;
    for (i, p) in [&w.q, &w.k, &w.v].into_iter().enumerate() {
        tape_lora_bwd(&t, Q + i, &t.h1, &dqkv, (n, c0), dh1.as_deref_mut())?;
        c0 += p.w.dim(0)?;
    }
    let Some(dh1) = dh1 else {
        return Ok(None);
    };
    let dh1 = Tensor::from_vec(dh1, t.h1.shape(), dev)?;
    let (dx, dw) = t.rms_1.bwd(&t.x, &w.input_norm, &t.h1, &dh1)?;
    sunk_unless_frozen(dw, &w.input_norm, "input_layernorm")?;
    if !want_dx {
        return Ok(None);
    }
    Ok(Some(added(&g1, &need(dx, "the block's input")?)?))
}

/// `onto + x · Wᵀ` (an HF-layout product, or `x · W` for a `transposed` Conv1D weight
/// `[in, out]`, onto nothing, a bias or a residual) as a vector: Llama's packed projection,
/// which RoPE then rotates in place, the MLP's products and the block's output; GPT-2's
/// products, to which adapters add.
fn product_vec(
    x: &Tensor,
    w: &Tensor,
    onto: (Option<&Tensor>, bool),
    transposed: bool,
) -> Result<Vec<f32>> {
    use candle_core::Storage;
    fn cpu(s: &Storage) -> Result<&CpuStorage> {
        match s {
            Storage::Cpu(s) => Ok(s),
            _ => candle_core::bail!("llama block: cpu only"),
        }
    }
    let (sx, lx) = x.storage_and_layout();
    let (sw, lw) = w.storage_and_layout();
    let (o, _) = match onto {
        (Some(r), residual) => {
            let (sr, lr) = r.storage_and_layout();
            let sr = cpu(&sr)?;
            let onto = if residual {
                Onto::Residual(sr, lr)
            } else {
                Onto::Bias(sr, lr)
            };
            linear_fwd(cpu(&sx)?, lx, cpu(&sw)?, lw, onto, transposed)?
        }
        (None, _) => linear_fwd(cpu(&sx)?, lx, cpu(&sw)?, lw, Onto::Zero, transposed)?,
    };
    match o {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("llama block: f32 only"),
    }
}

/// A Llama-family block `[b, t, d] → [b, t, d]` (Llama, SmolLM2, Mistral-style GQA, Qwen2) in
/// training as one graph node (see the module's documentation): `heads` = (query heads, kv
/// heads), RMSNorm's `eps`, RoPE's `cos`/`sin` tables `[b, 1, t, head_dim]`. Frozen tensors
/// (tracking no gradient) get none; LoRA adapters (with their dropout masks) run inside the
/// block. An input that tracks no gradient gets none either (the first layer of a model with a
/// frozen embedding), as long as something in the block trains. `None` where it does not
/// apply ([`LlamaBlockWeights::applies`]). With `recompute` it keeps its input instead of its
/// activations ([`recompute_layers`]).
pub fn llama_block(
    x: &Tensor,
    w: LlamaBlockWeights,
    heads: (usize, usize),
    eps: f64,
    (cos, sin): (&Tensor, &Tensor),
    mask_bias: &Tensor,
    recompute: bool,
) -> Result<Option<Tensor>> {
    if !w.applies(x) || !fusable(&[cos, sin, mask_bias]) {
        return Ok(None);
    }
    let (h, hk) = heads;
    let (b, t, d) = x.dims3()?;
    let hd = w.q.w.dim(0)? / h.max(1);
    let inner = w.gate.w.dim(0)?;
    let shapes_ok = h > 0
        && hk > 0
        && h % hk == 0
        && hd % 2 == 0
        && w.q.w.dims() == [h * hd, d]
        && w.k.w.dims() == [hk * hd, d]
        && w.v.w.dims() == [hk * hd, d]
        && w.gate.w.dims() == [inner, d]
        && w.up.w.dims() == [inner, d]
        && w.down.w.dims() == [d, inner]
        && cos.dims() == [b, 1, t, hd]
        && sin.dims() == [b, 1, t, hd];
    if !shapes_ok {
        candle_core::bail!(
            "llama block: x {:?}, q {:?}, k {:?}, v {:?}, gate {:?}, up {:?}, down {:?}, {h}/{hk} \
             heads, rope tables {:?}",
            x.dims(),
            w.q.w.dims(),
            w.k.w.dims(),
            w.v.w.dims(),
            w.gate.w.dims(),
            w.up.w.dims(),
            w.down.w.dims(),
            cos.dims()
        )
    }
    let all: Vec<Tensor> = w.all().into_iter().cloned().collect();
    let recipe = LlamaRecipe {
        x: x.contiguous()?.detach(),
        w,
        heads,
        eps: eps as f32,
        cos: cos.contiguous()?.detach(),
        sin: sin.contiguous()?.detach(),
        bias: mask_bias.contiguous()?.detach(),
    };
    let (o, tape) = llama_run(recipe, true)?;
    let block = Block {
        name: "llama-block",
        out: Mutex::new(Some(o)),
        tape: Mutex::new(Some(Tape::Llama(Box::new(tape)).kept(recompute))),
    };
    Ok(Some(apply_node(x, all.iter().collect(), block)?))
}

/// A Llama block's forward on its recipe: the output (empty without `output`: the down
/// projection only makes it, and the backward reads the tape alone) and the tape.
fn llama_run(r: LlamaRecipe, output: bool) -> Result<(Vec<f32>, LlamaTape)> {
    let LlamaRecipe {
        x: xd,
        w,
        heads: (h, hk),
        eps,
        cos,
        sin,
        bias,
    } = r;
    let (b, t, d) = xd.dims3()?;
    let hd = w.q.w.dim(0)? / h.max(1);
    let inner = w.gate.w.dim(0)?;
    // The same ops as the composed path, run without recording (candle sees only the block).
    let rms_1 = RmsNorm(eps, Saved::default());
    let h1 = xd.apply_op2_no_bwd(&w.input_norm, &rms_1)?;
    let wqkv = Tensor::cat(&[w.q.w.detach(), w.k.w.detach(), w.v.w.detach()], 0)?;
    let bqkv = match (&w.q.bias, &w.k.bias, &w.v.bias) {
        (Some(bq), Some(bk), Some(bv)) => {
            Some(Tensor::cat(&[bq.detach(), bk.detach(), bv.detach()], 0)?)
        }
        _ => None,
    };
    let mut qkv = product_vec(&h1, &wqkv, (bqkv.as_ref(), false), false)?;
    let n = (h + 2 * hk) * hd;
    // Adapters add onto their projection's columns before RoPE, as in the composed layer.
    let mut lora_h: [Option<Vec<f32>>; 7] = Default::default();
    let mut c0 = 0;
    for (i, p) in [&w.q, &w.k, &w.v].into_iter().enumerate() {
        if let Some(l) = &p.lora {
            lora_h[Q + i] = Some(lora_fwd(&h1, l, &mut qkv, (n, c0))?);
        }
        c0 += p.w.dim(0)?;
    }
    with_f32(&[&cos, &sin], |cs| {
        rope_packed_in_place(&mut qkv, (b, t, n), h + hk, hd, (cs[0], cs[1]), false)
    })?;
    let qkv = Tensor::from_vec(qkv, (b, t, n), xd.device())?;
    let attn = Packed {
        bias,
        h,
        hk,
        lse: Mutex::new(vec![]),
    };
    let y = qkv.apply_op1_no_bwd(&attn)?;
    let mut x1 = product_vec(&y, &w.o.w, (Some(&xd), true), false)?;
    if let Some(l) = &w.o.lora {
        lora_h[O] = Some(lora_fwd(&y, l, &mut x1, (d, 0))?);
    }
    let x1 = Tensor::from_vec(x1, (b, t, d), xd.device())?;
    let rms_2 = RmsNorm(eps, Saved::default());
    let h2 = x1.apply_op2_no_bwd(&w.post_norm, &rms_2)?;
    // SwiGLU as its fused op runs it (both products, then the activation), each product
    // plus its adapter if any; the pre-activations stay for the backward.
    let mut mlp_product = |p: &Projection, i: usize| -> Result<Vec<f32>> {
        let mut a = product_vec(&h2, &p.w, (None, false), false)?;
        if let Some(l) = &p.lora {
            lora_h[i] = Some(lora_fwd(&h2, l, &mut a, (inner, 0))?);
        }
        Ok(a)
    };
    let a = mlp_product(&w.gate, GATE)?;
    let u = mlp_product(&w.up, UP)?;
    let s = Tensor::from_vec(binary(&a, &u, swiglu_fwd), (b, t, inner), xd.device())?;
    let mlp = SwiGluMlp {
        save: true,
        pre: Mutex::new(Some((a, u))),
    };
    let o = match output {
        true => {
            let mut o = product_vec(&s, &w.down.w, (Some(&x1), true), false)?;
            if let Some(l) = &w.down.lora {
                lora_h[DOWN] = Some(lora_fwd(&s, l, &mut o, (d, 0))?);
            }
            o
        }
        false => {
            if let Some(l) = &w.down.lora {
                lora_h[DOWN] = Some(lora_ha(&s, l, (d, 0))?);
            }
            Vec::new()
        }
    };
    let tape = LlamaTape {
        w,
        wqkv,
        x: xd,
        h1,
        qkv,
        y,
        x1,
        h2,
        s,
        lora_h,
        rms_1,
        attn,
        rms_2,
        mlp,
        cos,
        sin,
    };
    Ok((o, tape))
}
