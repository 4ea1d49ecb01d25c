//! Memory before a run starts: a rough upper bound on a training step's peak
//! ([`step_memory_gib`]), what this machine can still give (`MemAvailable`, or less where the
//! process's cgroup sets a lower limit, as in a container: [`available_memory_gib`]), and gradient
//! checkpointing planned from the two ([`plan`]): as many layers as the setting asks, or, with
//! `"auto"` (the default), as few as make the step fit.

/// What the machine can still give; in `rlhf-model` since decoding's packed weights ask too.
pub use rlhf_model::sysmem::{available_memory_gib, cgroup_headroom};
use rlhf_model::{CausalLM, ModelConfig};
use serde::{Deserialize, Serialize};

/// Gradient checkpointing (Hugging Face's `gradient_checkpointing`), in a config:
/// `false` (off), `true` (every layer and the LM head), a number of layers (the first ones),
/// or `"auto"`.
///
/// A layer that recomputes keeps only its input for the backward and runs its forward again
/// there to get its activations back ([`rlhf_model::kernels::block::recompute_layers`]). With
/// `true` the fused LM head also rebuilds its logits in chunks of rows instead of keeping them.
/// The blocks' gradients are the same bit for bit, the head's up to float rounding. Each
/// recomputed layer's activations shrink to one `[tokens × hidden]` tensor (SmolLM2-135M: from
/// about 34 KB per token to 2.3 KB) for one more forward of that layer per step. SmolLM2, LoRA
/// SFT (BENCHMARKS.md, session 22): peak RSS 3.03 GB at 290 tokens/s without, 2.38 at 271
/// with 10 of 30 layers, 1.43 at 241 with 30, 1.10 at 212 with `true`.
///
/// `"auto"` recomputes nothing when the step's estimated memory fits in 80% of what is
/// available when the run starts; otherwise the fewest layers that make it fit (then the head
/// as well, then a warning if even that is not enough), and the run says what it chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpointing {
    Off,
    /// Every layer, and the LM head.
    All,
    /// The first `n` layers (more than the model has: all of them, not the head).
    Layers(usize),
    #[default]
    Auto,
}

impl Checkpointing {
    /// The value for [`rlhf_model::kernels::block::recompute_layers`] (`usize::MAX`: every
    /// layer and the head); `None` for `Auto`, which [`plan`] resolves.
    pub fn layers(self) -> Option<usize> {
        match self {
            Checkpointing::Off => Some(0),
            Checkpointing::All => Some(usize::MAX),
            Checkpointing::Layers(k) => Some(k),
            Checkpointing::Auto => None,
        }
    }

    /// Apply the setting to the blocks built on this thread while the guard lives
    /// ([`rlhf_model::kernels::block::recompute_layers`]). An unresolved `Auto` (a trainer
    /// given it directly, without [`plan`]) recomputes nothing.
    pub fn apply(self) -> rlhf_model::kernels::block::RecomputeGuard {
        rlhf_model::kernels::block::recompute_layers(self.layers().unwrap_or(0))
    }

    /// The setting for a [`Checkpointing::layers`] value.
    pub fn of(layers: usize) -> Self {
        match layers {
            0 => Checkpointing::Off,
            usize::MAX => Checkpointing::All,
            k => Checkpointing::Layers(k),
        }
    }
}

impl From<bool> for Checkpointing {
    fn from(on: bool) -> Self {
        if on {
            Checkpointing::All
        } else {
            Checkpointing::Off
        }
    }
}

impl Serialize for Checkpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Checkpointing::Off => s.serialize_bool(false),
            Checkpointing::All => s.serialize_bool(true),
            Checkpointing::Layers(k) => s.serialize_u64(k as u64),
            Checkpointing::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Checkpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Checkpointing;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false, a number of layers (the first ones), or \"auto\"")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(v.into())
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(match v {
                    0 => Checkpointing::Off,
                    k => Checkpointing::Layers(k as usize),
                })
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self)),
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "auto" => Ok(Checkpointing::Auto),
                    "all" | "true" => Ok(Checkpointing::All),
                    "off" | "none" | "false" => Ok(Checkpointing::Off),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The shape of a training step: `rows` sequences of up to `len` tokens through the blocks,
/// `lm_head_rows` of them scored by the causal LM head (SFT's and DPO's all, PPO's policy's but
/// not a separate critic's, a reward model's none: a scalar head holds no `[tokens × vocab]`
/// logits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    pub rows: usize,
    pub len: usize,
    pub lm_head_rows: usize,
}

impl StepShape {
    /// `rows` rows as wide as the widest of `lens` (the data's items), `lm_head_rows` of them
    /// scored by the LM head; `None` for no data.
    pub fn widest(
        lens: impl Iterator<Item = usize>,
        rows: usize,
        lm_head_rows: usize,
    ) -> Option<Self> {
        lens.max().map(|len| Self {
            rows,
            len,
            lm_head_rows,
        })
    }
}

/// Floats a block keeps per token for its backward (its tape, [`rlhf_model::kernels::block`]):
/// a Llama's five `[d]` tensors (input, both norms' outputs, attention's output, the residual),
/// the packed q/k/v and the MLP's gate, up and product (SmolLM2-135M: 8448, 14.7·d); GPT-2's
/// nine of width d (the packed q/k/v as three) and the MLP's two of its inner width.
fn layer_floats(model: &CausalLM) -> f64 {
    match &model.config {
        ModelConfig::Gpt2(c) => (9 * c.n_embd + 2 * c.n_inner.unwrap_or(4 * c.n_embd)) as f64,
        ModelConfig::Llama { cfg, .. } => {
            let qkv = (cfg.num_attention_heads + 2 * cfg.kv_heads()) * cfg.head_dim();
            (5 * cfg.hidden_size + qkv + 3 * cfg.intermediate_size) as f64
        }
    }
}

/// Floats per token a block's backward holds on top of its tape while it runs: the gradients
/// of its MLP's two inner-width tensors and four of width d.
fn backward_floats(model: &CausalLM) -> f64 {
    let d = model.hidden_size();
    let inner = match &model.config {
        ModelConfig::Gpt2(c) => c.n_inner.unwrap_or(4 * d),
        ModelConfig::Llama { cfg, .. } => cfg.intermediate_size,
    };
    (2 * inner + 4 * d) as f64
}

/// An estimate of a training step's memory, GiB, with the first `layers` layers recomputing
/// their activations (`usize::MAX`: all, and the LM head), every row `step.len` tokens long:
/// the weights, and for the trained ones their gradients and AdamW's two moments; each layer's
/// tape ([`layer_floats`] a token) or, for a layer that recomputes, its input (or, if more,
/// those inputs and one rebuilt tape, the other layers' freed by then); one layer's backward
/// ([`backward_floats`]); and, if it has one, the LM head's `[tokens × vocab]` logits, or, when it
/// recomputes, one chunk of them ([`rlhf_model::kernels::head::BWD_CHUNK_BYTES`]). For SmolLM2
/// LoRA SFT (8 × 256 tokens) it came within 2% of the measured peak RSS with none, 10 or 20
/// layers recomputed, and 16–22% under it with all 30 (the process's own few hundred MB are
/// not in it; BENCHMARKS.md, session 22).
pub fn step_memory_gib(model: &CausalLM, step: StepShape, layers: usize) -> f64 {
    let v = model.config.vocab_size() as f64;
    let d = model.hidden_size() as f64;
    let n = model.num_layers();
    let k = layers.min(n) as f64;
    let tape = layer_floats(model);
    // The backward reaches the recomputed (first) layers last: the peak is at its start,
    // with the others' tapes, or during a rebuild, when theirs are gone.
    let kept = ((n as f64 - k) * tape + k * d).max(if k > 0.0 { k * d + tape } else { 0.0 });
    let tokens = (step.rows * step.len) as f64;
    let logits = (step.lm_head_rows.min(step.rows) * step.len) as f64 * v * 4.0;
    let head = match layers == usize::MAX {
        true => logits.min(rlhf_model::kernels::head::BWD_CHUNK_BYTES as f64),
        false => logits,
    };
    let weights = model.params.num_elements(false) as f64 * 4.0;
    let trained = model.params.num_elements(true) as f64 * 4.0 * 3.0;
    let activations = tokens * (kept + backward_floats(model)) * 4.0;
    (head + activations + weights + trained) / GIB
}

const GIB: f64 = (1u64 << 30) as f64;

/// What a step needs on top of the weights already loaded, GiB ([`step_memory_gib`] less them).
fn step_need_gib(model: &CausalLM, step: StepShape, layers: usize) -> f64 {
    step_memory_gib(model, step, layers) - model.params.num_elements(false) as f64 * 4.0 / GIB
}

/// What a step that trains several models at once (PPO's policy and a separate critic, with
/// one backward through both) needs on top of their loaded weights, GiB: each model's
/// [`step_need_gib`], the same first `layers` layers recomputing in each.
fn need_gib(parts: &[(&CausalLM, StepShape)], layers: usize) -> f64 {
    parts
        .iter()
        .map(|&(m, s)| step_need_gib(m, s, layers))
        .sum()
}

/// The layers to recompute for `setting` in a step that trains `parts` (each model with its
/// step's shape; PPO's policy and a separate critic share one backward, each recomputing its
/// first layers alike), when `available` GiB is free (a [`Checkpointing::layers`] value): the
/// setting's own, or for `Auto` the fewest layers whose step needs at most 80% of `available`
/// (the models' needs together), then all of them and the head (`usize::MAX`) when none does;
/// none when `available` is unknown.
pub fn plan_layers(
    parts: &[(&CausalLM, StepShape)],
    setting: Checkpointing,
    available: Option<f64>,
) -> usize {
    if let Some(k) = setting.layers() {
        return k;
    }
    let Some(a) = available else { return 0 };
    let n = parts.iter().map(|(m, _)| m.num_layers()).max().unwrap_or(0);
    (0..=n)
        .find(|&k| need_gib(parts, k) <= 0.8 * a)
        .unwrap_or(usize::MAX)
}

/// Plan gradient checkpointing for a run (`who` names it in what it prints) and resolve the
/// setting: `"auto"` becomes the layers [`plan_layers`] picks from what is available now. Says
/// at the start how many layers recompute, and warns when the step may still not fit, with
/// what would help. The first of `parts` is the model the messages describe (PPO: the policy,
/// then a separate critic with its own shape and parameters).
pub fn plan(who: &str, parts: &[(&CausalLM, StepShape)], setting: Checkpointing) -> Checkpointing {
    let Some(&(model, step)) = parts.first() else {
        return Checkpointing::of(setting.layers().unwrap_or(0));
    };
    let n = parts.iter().map(|(m, _)| m.num_layers()).max().unwrap_or(0);
    let available = available_memory_gib();
    let k = plan_layers(parts, setting, available);
    let need = need_gib(parts, k);
    let mut shape = match step.lm_head_rows > 0 {
        true => format!(
            "batch {} × {} tokens, vocab {}",
            step.rows,
            step.len,
            model.config.vocab_size()
        ),
        false => format!("batch {} × {} tokens", step.rows, step.len),
    };
    for (m, s) in &parts[1..] {
        shape += &format!(
            ", and a second model of {} layers, d = {}, on {} × {}",
            m.num_layers(),
            m.hidden_size(),
            s.rows,
            s.len
        );
    }
    let with_head = parts.iter().any(|(_, s)| s.lm_head_rows > 0);
    let models = match parts.len() {
        1 => String::new(),
        p => format!(" (in each of the {p} models)"),
    };
    if k > 0 {
        let what = match k {
            usize::MAX if with_head => {
                format!("all {n} layers and the LM head keep only their inputs{models}")
            }
            usize::MAX => format!("all {n} layers keep only their inputs{models}"),
            k => format!("{} of {n} layers keep only their inputs{models}", k.min(n)),
        };
        let how = match setting {
            Checkpointing::Auto => format!(
                " (auto: the step needs ~{:.1} GiB without, ~{need:.1} GiB with, {:.1} GiB available)",
                need_gib(parts, 0),
                available.unwrap_or(0.0)
            ),
            _ => String::new(),
        };
        eprintln!(
            "[{who}] gradient checkpointing: {what} and recompute their activations in the backward{how}"
        );
    }
    if let Some(a) = available {
        if need > 0.8 * a {
            let advice = match k {
                usize::MAX => "lower the batch size or the lengths, or accumulate gradients",
                0 => "turn on gradient checkpointing (gradient_checkpointing = \"auto\" or true), lower the batch size or the lengths, or accumulate gradients",
                _ => "recompute more layers (gradient_checkpointing = \"auto\" or true), lower the batch size or the lengths, or accumulate gradients",
            };
            eprintln!(
                "WARNING: [{who}] this run may need ~{need:.1} GiB more ({shape}) but only {a:.1} GiB is available: {advice}"
            );
        }
    }
    Checkpointing::of(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M's shape: 30 layers of width 576, vocabulary 49152.
    fn smollm2() -> CausalLM {
        CausalLM::random(
            serde_json::json!({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "max_position_embeddings": 2048}),
            1,
        )
        .unwrap()
    }

    #[test]
    fn checkpointing_shrinks_the_memory_estimate_by_the_activations() {
        let m = smollm2();
        assert_eq!(layer_floats(&m), 8448.0);
        let p = m.params.num_elements(false) as f64;
        let trained = p * 16.0 / GIB; // weights, gradients and two moments
        let step = StepShape {
            rows: 8,
            len: 512,
            lm_head_rows: 8,
        };
        let at = |k| step_memory_gib(&m, step, k) - trained;
        let gib = |floats: f64| 4096.0 * floats * 4.0 / GIB; // 4096 tokens' worth
        let backward = 2.0 * 1536.0 + 4.0 * 576.0;
        // Without: 30 tapes, a backward and the logits: 3.87 + 0.08 + 0.75 GiB.
        assert!((at(0) - gib(30.0 * 8448.0 + backward + 49152.0)).abs() < 1e-9);
        assert!((at(0) - 4.70).abs() < 0.01, "{}", at(0));
        // Every layer and the head: 30 inputs, one rebuilt tape, a backward, a 64 MiB chunk.
        let all = gib(30.0 * 576.0 + 8448.0 + backward) + 1.0 / 16.0;
        assert!((at(usize::MAX) - all).abs() < 1e-9, "{}", at(usize::MAX));
        // Every layer but not the head: its logits are still kept. (One layer fewer is as good:
        // its tape is held while it runs, as a rebuilt one's would be.)
        let layers = gib(30.0 * 576.0 + 8448.0 + backward + 49152.0);
        assert!((at(30) - layers).abs() < 1e-9, "{}", at(30));
        assert!(at(29) < at(30));
        assert_eq!(at(30), at(99));
        // Half the layers: 15 tapes and 15 inputs.
        let half = gib(15.0 * 8448.0 + 15.0 * 576.0 + backward + 49152.0);
        assert!((at(15) - half).abs() < 1e-9, "{}", at(15));
        // Each further layer saves a tape less an input.
        for k in 0..29 {
            assert!((at(k) - at(k + 1) - gib(8448.0 - 576.0)).abs() < 1e-9);
        }
        // A reward model's scalar head holds no logits.
        let scalar = StepShape {
            lm_head_rows: 0,
            ..step
        };
        for k in [0, 15, 30] {
            let d = at(k) - (step_memory_gib(&m, scalar, k) - trained);
            assert!((d - gib(49152.0)).abs() < 1e-9, "{k}: {d}");
        }
        assert!(
            (step_memory_gib(&m, scalar, usize::MAX) - trained - all + 1.0 / 16.0).abs() < 1e-9
        );
    }

    #[test]
    fn auto_recomputes_the_fewest_layers_that_fit() {
        let m = smollm2();
        let step = StepShape {
            rows: 8,
            len: 512,
            lm_head_rows: 8,
        };
        let plan = |s, a| plan_layers(&[(&m, step)], s, Some(a));
        let need = |k| step_need_gib(&m, step, k);
        // Plenty of room: nothing recomputed; none at all: every layer and the head.
        assert_eq!(plan(Checkpointing::Auto, 100.0), 0);
        assert_eq!(plan(Checkpointing::Auto, 0.1), usize::MAX);
        // Exactly what k layers need (at 80%) gives k; a little less, k + 1.
        for k in [1usize, 7, 20, 28] {
            let a = need(k) / 0.8;
            assert_eq!(plan(Checkpointing::Auto, a * (1.0 + 1e-9)), k);
            assert_eq!(plan(Checkpointing::Auto, a * (1.0 - 1e-9)), k + 1);
        }
        // Past that, the head (the last layer alone saves nothing: see above).
        let a = need(29) / 0.8;
        assert_eq!(plan(Checkpointing::Auto, a * (1.0 - 1e-9)), usize::MAX);
        // The other settings are what they say, whatever is available.
        assert_eq!(plan(Checkpointing::Off, 0.1), 0);
        assert_eq!(plan(Checkpointing::All, 100.0), usize::MAX);
        assert_eq!(plan(Checkpointing::Layers(12), 100.0), 12);
        // Nothing known about the machine: auto recomputes nothing.
        assert_eq!(plan_layers(&[(&m, step)], Checkpointing::Auto, None), 0);
        for k in [0, 12, usize::MAX] {
            assert_eq!(Checkpointing::of(k).layers(), Some(k));
        }
        // Rows as wide as the data's longest item (tokenising capped it at max_len already).
        let shape = StepShape::widest([90, 12, 40].into_iter(), 8, 4).unwrap();
        assert_eq!((shape.rows, shape.len, shape.lm_head_rows), (8, 90, 4));
        assert_eq!(StepShape::widest(std::iter::empty(), 8, 4), None);
    }

    #[test]
    fn a_separate_critic_is_planned_with_its_own_shape_and_parameters() {
        // PPO: one backward through a full-fine-tuned SmolLM2 policy and a smaller separate
        // critic (a GPT-2 of 4 layers, a scalar head), each recomputing its first k layers.
        let policy = smollm2();
        let critic = CausalLM::random(
            serde_json::json!({"model_type": "gpt2", "vocab_size": 1000, "n_embd": 128,
                "n_layer": 4, "n_head": 4, "n_positions": 1024}),
            2,
        )
        .unwrap();
        let step = StepShape {
            rows: 8,
            len: 512,
            lm_head_rows: 8,
        };
        let scalar = StepShape {
            lm_head_rows: 0,
            ..step
        };
        let parts = [(&policy, step), (&critic, scalar)];
        let c = critic.params.num_elements(true) as f64;
        for k in [0, 3, 4, 17, 30, usize::MAX] {
            let both = need_gib(&parts, k);
            assert_eq!(
                both,
                step_need_gib(&policy, step, k) + step_need_gib(&critic, scalar, k)
            );
            // The critic adds its own gradients and moments and activations, far less than a
            // second policy-shaped model would.
            let critic_alone = both - step_need_gib(&policy, step, k);
            assert!(critic_alone > c * 12.0 / GIB, "{k}: {critic_alone}");
            assert!(
                critic_alone < step_need_gib(&policy, scalar, k) / 5.0,
                "{k}"
            );
        }
        // Auto: the fewest layers whose needs together fit.
        for k in [2usize, 10, 25] {
            let a = need_gib(&parts, k) / 0.8;
            assert_eq!(plan_layers(&parts, Checkpointing::Auto, Some(a)), k);
            assert_eq!(
                plan_layers(&parts, Checkpointing::Auto, Some(a * (1.0 - 1e-9))),
                k + 1
            );
            // Room for the policy alone at k layers is not room for both.
            let a = step_need_gib(&policy, step, k) / 0.8 * (1.0 + 1e-9);
            assert_eq!(
                plan_layers(&[(&policy, step)], Checkpointing::Auto, Some(a)),
                k
            );
            assert!(plan_layers(&parts, Checkpointing::Auto, Some(a)) > k);
        }
        // The critic's 4 layers are all recomputed from k = 4 on.
        assert_eq!(need_gib(&parts[1..], 4), need_gib(&parts[1..], 30));
        assert_eq!(plan_layers(&parts, Checkpointing::Layers(7), Some(0.1)), 7);
        assert_eq!(plan_layers(&parts, Checkpointing::Auto, None), 0);
    }

    #[test]
    fn settings_read_and_write_as_toml() {
        #[derive(Serialize, Deserialize)]
        struct C {
            g: Checkpointing,
        }
        for (text, want) in [
            ("true", Checkpointing::All),
            ("false", Checkpointing::Off),
            ("0", Checkpointing::Off),
            ("12", Checkpointing::Layers(12)),
            ("\"auto\"", Checkpointing::Auto),
            ("\"all\"", Checkpointing::All),
            ("\"off\"", Checkpointing::Off),
        ] {
            let c: C = toml::from_str(&format!("g = {text}")).unwrap();
            assert_eq!(c.g, want, "{text}");
            let back: C = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
            assert_eq!(back.g, want, "{text} round trip");
        }
        for bad in ["-1", "\"sometimes\"", "1.5"] {
            let e = toml::from_str::<C>(&format!("g = {bad}"))
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"))
                .to_string();
            assert!(e.contains("a number of layers"), "{bad}: {e}");
        }
    }
}
