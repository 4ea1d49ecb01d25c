//! AdamW with decoupled weight decay (Loshchilov & Hutter), bias and norm parameters excluded from
//! decay, global-norm gradient clipping, and a learning-rate schedule (linear warmup, then cosine,
//! linear or constant).

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rlhf_model::kernels::adamw::{adamw_step, AdamW as FusedAdamW, AdamWState};
use rlhf_model::kernels::math::{tensor_scaled, tensor_sum_squares};
use rlhf_model::kernels::sink::sum_grads;
use rlhf_model::params::Param;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Whether a parameter is decayed: matrices yes; biases, norm weights (1-D) no.
pub fn decays(p: &Param) -> bool {
    let n = p.name();
    p.var().rank() >= 2 && !n.contains("norm") && !n.contains(".ln_") && !n.ends_with(".bias")
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<Param>,
    /// Moments per parameter, updated in place by the fused kernel.
    state: Vec<AdamWState>,
    /// Number of updates applied.
    pub t: u64,
}

impl AdamW {
    pub fn new(params: Vec<Param>, cfg: AdamWConfig) -> Result<Self> {
        if params.is_empty() {
            bail!("nothing to train: no trainable parameters")
        }
        let state = params
            .iter()
            .map(|p| AdamWState::new(p.var().elem_count()))
            .collect();
        Ok(Self {
            cfg,
            params,
            state,
            t: 0,
        })
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Apply one update with gradients aligned to `params()` (None = no gradient this step).
    /// One fused pass per parameter (moments, bias correction, decoupled decay, in place); bias
    /// correction counts the optimizer's steps, also for a parameter that skipped one.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.t += 1;
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let hp = FusedAdamW {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if decays(p) {
                    self.cfg.weight_decay
                } else {
                    0.0
                },
            };
            self.state[i].step = self.t - 1;
            adamw_step(p.var().as_tensor(), g, &mut self.state[i], &hp)?;
        }
        Ok(())
    }

    /// Optimizer state by parameter name (`<name>.exp_avg`, `<name>.exp_avg_sq`).
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, p) in self.params.iter().enumerate() {
            let shape = p.var().shape();
            let dev = p.var().device();
            let st = &self.state[i];
            for (suffix, v) in [("exp_avg", &st.m), ("exp_avg_sq", &st.v)] {
                let t = Tensor::from_slice(v, shape, dev).expect("state matches its parameter");
                out.insert(format!("{}.{suffix}", p.name()), t);
            }
        }
        out
    }

    /// The moments as [`Self::state_tensors`] names them, borrowed (checkpoints stream them to
    /// their file without a copy).
    pub fn state_views(&self) -> Vec<(String, rlhf_model::model::TensorData<'_>)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (p, st) in self.params.iter().zip(&self.state) {
            let shape = p.var().dims().to_vec();
            for (suffix, v) in [("exp_avg", &st.m), ("exp_avg_sq", &st.v)] {
                let data = rlhf_model::model::TensorData::Slice {
                    shape: shape.clone(),
                    data: &v[..],
                };
                out.push((format!("{}.{suffix}", p.name()), data));
            }
        }
        out
    }

    pub fn load_state(&mut self, t: u64, s: &BTreeMap<String, Tensor>) -> Result<()> {
        for (i, p) in self.params.iter().enumerate() {
            let st = &mut self.state[i];
            for (suffix, slot) in [("exp_avg", &mut st.m), ("exp_avg_sq", &mut st.v)] {
                let key = format!("{}.{suffix}", p.name());
                let Some(x) = s.get(&key) else {
                    bail!(
                        "optimizer state has no `{key}`: the checkpoint does not match this model"
                    )
                };
                if x.dims() != p.var().dims() {
                    bail!(
                        "optimizer state `{key}` has shape {:?}, expected {:?}",
                        x.dims(),
                        p.var().dims()
                    )
                }
                *slot = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Add what a gradient sink held ([`rlhf_model::kernels::sink::GradSink::take`], in the same
/// parameter order) to the gradients collected from candle's backward.
pub fn add_sunk(acc: &mut [Option<Tensor>], sunk: Vec<Option<Tensor>>) -> Result<()> {
    if acc.len() != sunk.len() {
        bail!(
            "gradient sink: {} gradients for {} parameters",
            sunk.len(),
            acc.len()
        )
    }
    for (a, s) in acc.iter_mut().zip(sunk) {
        *a = sum_grads(a.take(), s)?;
    }
    Ok(())
}

/// Global L2 norm of the gradients.
pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut s = 0f64;
    for g in grads.iter().flatten() {
        s += tensor_sum_squares(g)?;
    }
    Ok(s.sqrt())
}

/// Scale gradients so their global norm is at most `max_norm` (no-op when `max_norm <= 0`).
pub fn clip_grads(grads: &mut [Option<Tensor>], norm: f64, max_norm: f64) -> Result<()> {
    if max_norm > 0.0 && norm > max_norm {
        let c = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = tensor_scaled(g, c)?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

/// Learning rate at `step` (0-based) of `total`: linear warmup to `lr`, then the schedule down to
/// `lr · min_ratio`.
pub fn lr_at(
    step: usize,
    total: usize,
    warmup: usize,
    lr: f64,
    min_ratio: f64,
    s: Schedule,
) -> f64 {
    if warmup > 0 && step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup.min(step)) as f64 / span).clamp(0.0, 1.0);
    let min = lr * min_ratio;
    match s {
        Schedule::Constant => lr,
        Schedule::Linear => min + (lr - min) * (1.0 - p),
        Schedule::Cosine => min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_hand_computed_update() {
        let p = Param::new(
            "w",
            Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap(),
            true,
        )
        .unwrap();
        let mut o = AdamW::new(
            vec![p.clone()],
            AdamWConfig {
                weight_decay: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        let g = Tensor::new(&[[0.5f32, 0.25]], &Device::Cpu).unwrap();
        o.step(&[Some(g)], 0.01).unwrap();
        // Step 1: m̂ = g, v̂ = g², update = g/|g| = sign(g) (eps negligible); decay lr·wd·w.
        let w: Vec<Vec<f32>> = p.var().as_tensor().to_vec2().unwrap();
        let want = [
            1.0 - 0.01 - 0.01 * 0.1 * 1.0,
            -2.0 - 0.01 + 0.01 * 0.1 * 2.0,
        ];
        assert!((w[0][0] - want[0] as f32).abs() < 1e-6, "{w:?}");
        assert!((w[0][1] - want[1] as f32).abs() < 1e-6, "{w:?}");
    }

    /// The textbook update, composed from tensor ops (the slow reference for the fused kernel).
    fn reference_step(
        w: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        g: &Tensor,
        t: u64,
        lr: f64,
        wd: f64,
    ) -> Tensor {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        *m = ((&*m * b1).unwrap() + (g * (1.0 - b1)).unwrap()).unwrap();
        *v = ((&*v * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
        let mh = (&*m / (1.0 - b1.powi(t as i32))).unwrap();
        let vh = (&*v / (1.0 - b2.powi(t as i32))).unwrap();
        let upd = (mh / (vh.sqrt().unwrap() + eps).unwrap()).unwrap();
        ((w - (upd * lr).unwrap()).unwrap() - (w * (lr * wd)).unwrap()).unwrap()
    }

    #[test]
    fn fused_update_matches_the_composed_reference_over_steps_and_resume() {
        let dev = Device::Cpu;
        let w0: Vec<f32> = (0..24)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let b0: Vec<f32> = (0..4).map(|i| i as f32 / 10.0).collect();
        let w = Param::new(
            "l.weight",
            Tensor::from_vec(w0.clone(), (4, 6), &dev).unwrap(),
            true,
        )
        .unwrap();
        let b = Param::new(
            "l.bias",
            Tensor::from_vec(b0.clone(), 4, &dev).unwrap(),
            true,
        )
        .unwrap();
        let cfg = AdamWConfig {
            weight_decay: 0.05,
            ..Default::default()
        };
        let mut o = AdamW::new(vec![w.clone(), b.clone()], cfg.clone()).unwrap();
        let mut rw = Tensor::from_vec(w0, (4, 6), &dev).unwrap();
        let mut rb = Tensor::from_vec(b0, 4, &dev).unwrap();
        let (mut mw, mut vw) = (rw.zeros_like().unwrap(), rw.zeros_like().unwrap());
        let (mut mb, mut vb) = (rb.zeros_like().unwrap(), rb.zeros_like().unwrap());
        let grad = |k: u64, n: usize, shape: &[usize]| {
            let g: Vec<f32> = (0..n)
                .map(|i| (((i as u64 * 7 + k * 13) % 17) as f32 - 8.0) / 5.0)
                .collect();
            Tensor::from_vec(g, shape, &dev).unwrap()
        };
        for t in 1..=6u64 {
            let lr = 0.01 * t as f64;
            let gw = grad(t, 24, &[4, 6]);
            // The bias gets no gradient on step 3: skipped, but later steps count it.
            let gb = (t != 3).then(|| grad(t + 100, 4, &[4]));
            o.step(&[Some(gw.clone()), gb.clone()], lr).unwrap();
            rw = reference_step(&rw, &mut mw, &mut vw, &gw, t, lr, 0.05);
            if let Some(gb) = &gb {
                rb = reference_step(&rb, &mut mb, &mut vb, gb, t, lr, 0.0);
            }
            if t == 4 {
                // Checkpoint round trip mid-run, through a file written from the borrowed
                // moments: the same names, shapes and values as the copied ones.
                let path = std::env::temp_dir()
                    .join(format!("rlhf-adamw-{}.safetensors", std::process::id()));
                rlhf_model::model::save_tensor_data(o.state_views(), &path).unwrap();
                let st = rlhf_model::model::load_safetensors(&path).unwrap();
                std::fs::remove_file(&path).ok();
                let copied = o.state_tensors();
                assert_eq!(
                    st.keys().collect::<Vec<_>>(),
                    copied.keys().collect::<Vec<_>>()
                );
                for (k, v) in &copied {
                    assert_eq!(st[k].dims(), v.dims(), "{k}");
                    let (a, b): (Vec<f32>, Vec<f32>) = (
                        st[k].flatten_all().unwrap().to_vec1().unwrap(),
                        v.flatten_all().unwrap().to_vec1().unwrap(),
                    );
                    assert_eq!(a, b, "{k}");
                }
                let mut o2 = AdamW::new(vec![w.clone(), b.clone()], cfg.clone()).unwrap();
                o2.load_state(o.t, &st).unwrap();
                o = o2;
            }
            for (p, r) in [(&w, &rw), (&b, &rb)] {
                let e = (p.var().as_tensor() - r)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(e < 1e-6, "step {t} {}: {e}", p.name());
            }
        }
    }

    #[test]
    fn norm_params_are_not_decayed() {
        let mk = |n: &str, shape: &[usize]| {
            Param::new(
                n,
                Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap(),
                true,
            )
            .unwrap()
        };
        assert!(decays(&mk("model.layers.0.mlp.up_proj.weight", &[2, 2])));
        assert!(!decays(&mk("model.layers.0.input_layernorm.weight", &[2])));
        assert!(!decays(&mk("transformer.h.0.attn.c_attn.bias", &[2])));
    }

    #[test]
    fn clipping_and_schedule() {
        let mut g = vec![
            Some(Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()),
            None,
        ];
        let n = grad_norm(&g).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        clip_grads(&mut g, n, 1.0).unwrap();
        assert!((grad_norm(&g).unwrap() - 1.0).abs() < 1e-4);
        assert!((lr_at(0, 100, 10, 1.0, 0.0, Schedule::Cosine) - 0.1).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.0, Schedule::Cosine) - 1.0).abs() < 1e-12);
        assert!(lr_at(100, 100, 10, 1.0, 0.1, Schedule::Cosine) - 0.1 < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0, 0.0, Schedule::Linear) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(70, 100, 10, 1.0, 0.0, Schedule::Constant), 1.0);
    }
}
