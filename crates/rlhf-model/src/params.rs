//! Parameters: named `Var`s with a trainable flag.
//!
//! Every weight of a model is a [`Param`]: a candle `Var` (so an optimizer can update it in place)
//! plus a shared flag. A frozen parameter enters the graph detached, so backward neither computes
//! nor stores a gradient for it — this is how LoRA trains adapters only, and how a frozen
//! reference shares its weights with the policy.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

thread_local! {
    /// How many [`no_grad`] scopes this thread is in.
    static NO_GRAD: Cell<usize> = const { Cell::new(0) };
}

/// While the returned guard lives, every parameter enters the graph detached on this thread,
/// as a frozen one does: forwards that no backward follows (generation, scoring, log-probs for
/// a rollout, evaluation) then build no graph. candle records an op's inputs whenever one of
/// them descends from a `Var`, so a forward of a trainable model otherwise keeps every
/// activation alive until its output is dropped: generating 64 sequences from 64-token prompts
/// with SmolLM2-135M peaked at 5.0 GB, nearly all of it the prefill's activations (1.1 GB
/// without). Guards nest; the scope is the calling thread's (it runs the forward; the compute
/// pool's workers only run kernels), so the guard cannot leave it.
#[must_use = "the scope ends when the guard is dropped"]
pub fn no_grad() -> NoGrad {
    NO_GRAD.with(|c| c.set(c.get() + 1));
    NoGrad(std::marker::PhantomData)
}

/// The scope of [`no_grad`].
pub struct NoGrad(std::marker::PhantomData<*const ()>);

impl Drop for NoGrad {
    fn drop(&mut self) {
        NO_GRAD.with(|c| c.set(c.get() - 1));
    }
}

#[derive(Clone)]
pub struct Param {
    name: Arc<str>,
    var: Var,
    trainable: Arc<AtomicBool>,
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Param({}, {:?}, trainable={})",
            self.name,
            self.var.shape(),
            self.is_trainable()
        )
    }
}

impl Param {
    pub fn new(name: &str, t: Tensor, trainable: bool) -> Result<Self> {
        Ok(Self {
            name: name.into(),
            var: Var::from_tensor(&t)?,
            trainable: Arc::new(AtomicBool::new(trainable)),
        })
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The tensor to use in a forward pass: tracked when trainable, detached otherwise (and
    /// inside [`no_grad`]).
    pub fn t(&self) -> Tensor {
        if self.is_trainable() && NO_GRAD.with(Cell::get) == 0 {
            self.var.as_tensor().clone()
        } else {
            self.var.as_tensor().detach()
        }
    }
    pub fn var(&self) -> &Var {
        &self.var
    }
    pub fn is_trainable(&self) -> bool {
        self.trainable.load(Ordering::Relaxed)
    }
    pub fn set_trainable(&self, on: bool) {
        self.trainable.store(on, Ordering::Relaxed)
    }
}

/// All parameters of a model, by their Hugging Face name, in a stable order.
#[derive(Clone, Default, Debug)]
pub struct ParamStore {
    params: BTreeMap<String, Param>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, p: Param) -> Result<()> {
        if self.params.contains_key(p.name()) {
            bail!("parameter `{}` defined twice", p.name())
        }
        self.params.insert(p.name().to_string(), p);
        Ok(())
    }
    pub fn get(&self, name: &str) -> Option<&Param> {
        self.params.get(name)
    }
    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.values()
    }
    pub fn len(&self) -> usize {
        self.params.len()
    }
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
    pub fn trainable(&self) -> Vec<Param> {
        self.iter().filter(|p| p.is_trainable()).cloned().collect()
    }
    /// Freeze or unfreeze every parameter whose name satisfies `pred`.
    pub fn set_trainable_where(&self, pred: impl Fn(&str) -> bool, on: bool) {
        for p in self.iter() {
            if pred(p.name()) {
                p.set_trainable(on)
            }
        }
    }
    pub fn num_elements(&self, trainable_only: bool) -> usize {
        self.iter()
            .filter(|p| !trainable_only || p.is_trainable())
            .map(|p| p.var.elem_count())
            .sum()
    }
    /// Name → current value (detached), for saving.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.params
            .iter()
            .map(|(k, p)| (k.clone(), p.var.as_tensor().detach()))
            .collect()
    }
    /// Overwrite values in place from `src` (every parameter must be present with its shape).
    pub fn load_from(&self, src: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, p) in &self.params {
            let Some(t) = src.get(name) else {
                bail!("missing tensor `{name}`")
            };
            if t.shape() != p.var.shape() {
                bail!(
                    "tensor `{name}` has shape {:?}, expected {:?}",
                    t.dims(),
                    p.var.dims()
                )
            }
            p.var.set(&t.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }
}
