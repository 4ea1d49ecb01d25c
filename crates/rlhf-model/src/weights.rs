//! Where a model's initial weights come from: a safetensors checkpoint, an in-memory map (GGUF
//! import, tests) or a seeded random initialisation. Every lookup checks the shape and names the
//! file and the tensor when something is wrong.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::params::{Param, ParamStore};

pub trait WeightSource {
    /// The tensor `name` with exactly `shape`, as f32.
    fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor>;
}

/// How a freshly initialised tensor is filled (ignored by checkpoint sources).
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Normal(f64),
    Ones,
    Zeros,
}

fn check_shape(origin: &str, name: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.dims() != shape {
        bail!(
            "{origin}: tensor `{name}` has shape {:?}, expected {:?}",
            t.dims(),
            shape
        )
    }
    Ok(())
}

/// Memory-mapped safetensors (single file or the shards of `model.safetensors.index.json`).
pub struct SafetensorsSource {
    st: candle_core::safetensors::MmapedSafetensors,
    origin: String,
    names: std::collections::HashSet<String>,
    /// Prefixes tried in turn (GPT-2 checkpoints are saved with or without `transformer.`).
    pub strip_prefixes: Vec<String>,
}

impl SafetensorsSource {
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let origin = files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        for f in files {
            if !f.exists() {
                bail!("{}: weights file not found", f.display())
            }
        }
        // SAFETY: the files are memory-mapped read-only; modifying them while the process runs
        // is undefined behaviour, as with every mmap-based loader (transformers included).
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
            .with_context(|| format!("{origin}: not a valid safetensors file"))?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            st,
            origin,
            names,
            strip_prefixes: vec![],
        })
    }
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

impl WeightSource for SafetensorsSource {
    fn get(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<Tensor> {
        let mut candidates = vec![name.to_string()];
        for p in &self.strip_prefixes {
            if let Some(rest) = name.strip_prefix(p.as_str()) {
                candidates.push(rest.to_string());
            }
        }
        for c in &candidates {
            if self.names.contains(c) {
                let t = self
                    .st
                    .load(c, &Device::Cpu)
                    .with_context(|| format!("{}: cannot read tensor `{c}`", self.origin))?
                    .to_dtype(DType::F32)?;
                check_shape(&self.origin, c, &t, shape)?;
                return Ok(t);
            }
        }
        bail!("{}: missing tensor `{name}`", self.origin)
    }
}

/// Tensors already in memory, by name.
pub struct MapSource {
    pub map: BTreeMap<String, Tensor>,
    pub origin: String,
}

impl WeightSource for MapSource {
    fn get(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<Tensor> {
        let Some(t) = self.map.get(name) else {
            bail!("{}: missing tensor `{name}`", self.origin)
        };
        check_shape(&self.origin, name, t, shape)?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

/// Seeded random initialisation (GPT-2 style: N(0, 0.02) weights, ones for norms, zeros for biases).
pub struct RandomInit {
    pub seed: u64,
    counter: u64,
}

impl RandomInit {
    pub fn new(seed: u64) -> Self {
        Self { seed, counter: 0 }
    }
}

impl WeightSource for RandomInit {
    fn get(&mut self, _name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.counter += 1;
        let n: usize = shape.iter().product();
        let v = match init {
            Init::Ones => vec![1f32; n],
            Init::Zeros => vec![0f32; n],
            Init::Normal(std) => {
                // Box–Muller over the crate's deterministic uniform stream.
                let u = crate::linear::seeded_uniform(
                    self.seed.wrapping_mul(1_000_003).wrapping_add(self.counter),
                    n + n % 2,
                    1.0,
                );
                let mut out = Vec::with_capacity(n + 1);
                for pair in u.chunks(2) {
                    let u1 = ((pair[0] as f64 + 1.0) / 2.0).max(1e-12);
                    let u2 = (pair[1] as f64 + 1.0) / 2.0;
                    let r = (-2.0 * u1.ln()).sqrt() * std;
                    let th = 2.0 * std::f64::consts::PI * u2;
                    out.push((r * th.cos()) as f32);
                    out.push((r * th.sin()) as f32);
                }
                out.truncate(n);
                out
            }
        };
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
}

/// Creates parameters from a source and registers them in a store.
pub struct Builder<'a> {
    pub src: &'a mut dyn WeightSource,
    pub store: &'a mut ParamStore,
}

impl Builder<'_> {
    pub fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Param> {
        let t = self.src.get(name, shape, init)?;
        let p = Param::new(name, t, true)?;
        self.store.insert(p.clone())?;
        Ok(p)
    }
}
