//! BF16 products (`kernels::bf16`, `MatmulPrecision::Bf16`), on every unit this CPU has (Intel
//! AMX, AVX512-BF16's dot product): against an f64 reference on
//! the BF16-rounded inputs, for every operand layout, edge sizes and accumulation; and a short
//! training run in BF16 against the same run in f32. The precision is process-wide, so this file
//! is its own test binary and its tests hold one lock.
//! Skipped, with a message, on CPUs with neither unit.

use rlhf_model::kernels::bf16::{self, round_bf16};
use rlhf_model::kernels::gemm::{self, Mat, MatmulPrecision};
use std::sync::Mutex;

mod common;

static LOCK: Mutex<()> = Mutex::new(());

fn skip() -> bool {
    if !bf16::available() {
        eprintln!(
            "SKIPPED: this CPU has neither AMX-BF16 nor AVX512-BF16; the BF16 matmul path cannot run"
        );
        return true;
    }
    eprintln!("BF16 units on this CPU: {:?}", bf16::units());
    false
}

/// Run a model-level check once per BF16 unit this CPU has, that unit chosen for the whole
/// process (the caller holds `LOCK`); the choice goes back to the default afterwards.
fn on_every_unit(check: fn(bf16::Unit)) {
    for &unit in bf16::units() {
        bf16::set_unit(Some(unit)).unwrap();
        assert_eq!(bf16::unit(), Some(unit));
        check(unit);
    }
    bf16::set_unit(None).unwrap();
}

/// A unit can be chosen exactly when this CPU has it; `None` goes back to the fastest.
#[test]
fn the_unit_can_be_chosen_where_available() {
    let _g = LOCK.lock().unwrap();
    for u in [bf16::Unit::Amx, bf16::Unit::AvxDot] {
        let r = bf16::set_unit(Some(u));
        assert_eq!(r.is_ok(), bf16::units().contains(&u), "{u:?}: {r:?}");
        match r {
            Ok(()) => assert_eq!(bf16::unit(), Some(u)),
            Err(e) => assert!(e.contains(u.name()), "{e}"),
        }
    }
    bf16::set_unit(None).unwrap();
    assert_eq!(bf16::unit(), bf16::units().first().copied());
    assert_eq!("amx".parse(), Ok(bf16::Unit::Amx));
    assert_eq!("avx512".parse(), Ok(bf16::Unit::AvxDot));
    assert!("tpu".parse::<bf16::Unit>().is_err());
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A view of `v` as an r×c matrix: row-major (0), column-major (1), or every other element of
/// a row-major 2c-wide matrix (2: neither stride is 1).
fn view(v: &[f32], r: usize, c: usize, layout: u8) -> Mat<'_> {
    match layout {
        0 => Mat {
            data: v,
            rs: c,
            cs: 1,
        },
        1 => Mat {
            data: v,
            rs: 1,
            cs: r,
        },
        _ => Mat {
            data: v,
            rs: 2 * c,
            cs: 2,
        },
    }
}

#[test]
fn bf16_products_match_the_rounded_reference() {
    let _g = LOCK.lock().unwrap();
    if skip() {
        return;
    }
    let shapes = [
        (1, 1, 1),
        (17, 33, 5),
        (32, 32, 32),
        (64, 48, 96),
        (100, 70, 300),
        (33, 1000, 65),
        (129, 257, 1031),
        // Strides of 2048 floats and more: a column-major `a` and a row-major `b` packed
        // across groups of strips.
        (2050, 33, 70),
        (37, 2100, 45),
    ];
    for (&unit, &(m, n, k)) in bf16::units()
        .iter()
        .flat_map(|u| shapes.iter().map(move |s| (u, s)))
    {
        for (ta, tb) in [(0, 0), (1, 0), (0, 1), (1, 1), (2, 2)] {
            for acc in [false, true] {
                let (av, bv) = (data(2 * m * k, 1 + m as u64), data(2 * k * n, 2 + n as u64));
                let c0 = data(m * n, 3);
                let (a, b) = (view(&av, m, k, ta), view(&bv, k, n, tb));
                let mut c = c0.clone();
                bf16::sgemm_bf16_on(unit, true, m, n, k, a, b, &mut c, acc);
                // The serial variant sums every block the same way: the same bits.
                let mut cs = c0.clone();
                bf16::sgemm_bf16_on(unit, false, m, n, k, a, b, &mut cs, acc);
                assert_eq!(
                    c, cs,
                    "{unit:?} m{m} n{n} k{k} ta{ta} tb{tb} acc{acc}: serial differs"
                );
                for i in 0..m {
                    for j in 0..n {
                        let (mut s, mut mag) = (0f64, 0f64);
                        for l in 0..k {
                            let x = round_bf16(a.data[i * a.rs + l * a.cs]) as f64;
                            let y = round_bf16(b.data[l * b.rs + j * b.cs]) as f64;
                            s += x * y;
                            mag += (x * y).abs();
                        }
                        let want = if acc { c0[i * n + j] as f64 + s } else { s };
                        let got = c[i * n + j] as f64;
                        let tol = 1e-6 * (mag + 1.0) * (k as f64).sqrt().max(1.0);
                        assert!(
                            (got - want).abs() <= tol,
                            "{unit:?} m{m} n{n} k{k} ta{ta} tb{tb} acc{acc}: c[{i},{j}] = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn rounding_is_to_nearest_even() {
    // 1 + 2^-8 lies halfway between BF16 neighbours 1 and 1 + 2^-7: ties go to even (1).
    assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
    // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
    assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
    assert_eq!(
        round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
        1.0 + 2f32.powi(-7)
    );
    assert_eq!(round_bf16(-3.0), -3.0);
    assert!(round_bf16(f32::NAN).is_nan());
    assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
    assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
}

/// `sgemm` follows the process-wide precision: f32 by default, BF16 once set (from more rows
/// than decoding's, which stream the weight in f32: `gemm::SMALL_ROWS`).
#[test]
fn sgemm_follows_the_precision_setting() {
    let _g = LOCK.lock().unwrap();
    if skip() {
        return;
    }
    let (m, n, k) = (gemm::SMALL_ROWS + 32, 64, 256);
    let (av, bv) = (data(m * k, 11), data(k * n, 12));
    let (a, b) = (view(&av, m, k, 0), view(&bv, k, n, 0));
    let run = |p| {
        gemm::set_matmul_precision(p).unwrap();
        let mut c = vec![0f32; m * n];
        gemm::sgemm(m, n, k, a, b, &mut c, false);
        c
    };
    let (f, h) = (run(MatmulPrecision::F32), run(MatmulPrecision::Bf16));
    // `sgemm_serial` (the attention kernel's products) follows the setting too.
    let serial = |p| {
        gemm::set_matmul_precision(p).unwrap();
        let mut c = vec![0f32; m * n];
        gemm::sgemm_serial(m, n, k, a, b, &mut c, false);
        c
    };
    let (fs, hs) = (serial(MatmulPrecision::F32), serial(MatmulPrecision::Bf16));
    gemm::set_matmul_precision(MatmulPrecision::F32).unwrap();
    let mut bf = vec![0f32; m * n];
    bf16::sgemm_bf16(m, n, k, a, b, &mut bf, false);
    assert_eq!(h, bf, "BF16 setting must take the BF16 path");
    assert_eq!(
        hs, bf,
        "BF16 setting must take the BF16 path in sgemm_serial"
    );
    assert_ne!(
        fs, hs,
        "f32 setting must not take the BF16 path in sgemm_serial"
    );
    let err = f
        .iter()
        .zip(&h)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(err > 0.0 && err < 0.05, "f32 and BF16 differ by {err}");
}

/// Mean next-token negative log-likelihood of `y` after `x`.
fn lm_loss(
    model: &rlhf_model::CausalLM,
    x: &candle_core::Tensor,
    y: &candle_core::Tensor,
) -> candle_core::Tensor {
    let (b, t) = x.dims2().unwrap();
    let h = model.hidden(x, &vec![vec![1u8; t]; b]).unwrap();
    let h2 = h.reshape((b * t, model.hidden_size())).unwrap();
    let lp = model.head_logprobs(&h2, y, 1.0).unwrap();
    lp.mean_all().unwrap().neg().unwrap()
}

/// Loss and gradients of a small Llama-shaped model on a fixed batch.
fn loss_and_grads(
    model: &rlhf_model::CausalLM,
    x: &candle_core::Tensor,
    y: &candle_core::Tensor,
) -> (f32, Vec<Vec<f32>>) {
    let loss = lm_loss(model, x, y);
    let grads = loss.backward().unwrap();
    let g = model
        .params
        .iter()
        .map(|p| {
            grads
                .get(p.var().as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), g)
}

fn tiny_model() -> rlhf_model::CausalLM {
    let cfg = serde_json::json!({"model_type": "llama", "vocab_size": 512, "hidden_size": 128,
        "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
        "tie_word_embeddings": true});
    rlhf_model::CausalLM::random(cfg, 0).unwrap()
}

fn batch() -> (candle_core::Tensor, candle_core::Tensor) {
    common::token_batch(4, 64)
}

/// The whole backward pass in BF16 points where the f32 one does: per parameter, the two
/// gradients agree in direction (cosine) and size.
#[test]
fn bf16_gradients_follow_f32() {
    let _g = LOCK.lock().unwrap();
    if skip() {
        return;
    }
    on_every_unit(bf16_gradients_follow_f32_on);
}

fn bf16_gradients_follow_f32_on(unit: bf16::Unit) {
    let model = tiny_model();
    let (x, y) = batch();
    gemm::set_matmul_precision(MatmulPrecision::F32).unwrap();
    let (l32, g32) = loss_and_grads(&model, &x, &y);
    gemm::set_matmul_precision(MatmulPrecision::Bf16).unwrap();
    let (l16, g16) = loss_and_grads(&model, &x, &y);
    gemm::set_matmul_precision(MatmulPrecision::F32).unwrap();
    assert!(
        (l32 - l16).abs() < 1e-2 * l32.abs(),
        "{unit:?}: loss f32 {l32} vs bf16 {l16}"
    );
    assert_ne!(
        g32, g16,
        "the BF16 run must differ (else it did not take the BF16 path)"
    );
    for (i, (a, b)) in g32.iter().zip(&g16).enumerate() {
        let dot: f64 = a.iter().zip(b).map(|(p, q)| *p as f64 * *q as f64).sum();
        let na: f64 = a.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        let name = model.params.iter().nth(i).unwrap().name();
        assert!(
            dot / (na * nb) > 0.995,
            "{unit:?} {name}: cosine {}",
            dot / (na * nb)
        );
        assert!(
            (na - nb).abs() < 0.03 * na,
            "{unit:?} {name}: |g| f32 {na} vs bf16 {nb}"
        );
    }
}

/// Training in BF16 follows training in f32: 40 AdamW steps on one batch from the same start.
#[test]
fn bf16_training_tracks_f32() {
    let _g = LOCK.lock().unwrap();
    if skip() {
        return;
    }
    on_every_unit(bf16_training_tracks_f32_on);
}

fn bf16_training_tracks_f32_on(unit: bf16::Unit) {
    use rlhf_model::kernels::adamw::{adamw_step, AdamW, AdamWState};
    let (x, y) = batch();
    let mut curves = vec![];
    for p in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
        gemm::set_matmul_precision(p).unwrap();
        let model = tiny_model();
        let hp = AdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..AdamW::default()
        };
        let mut st: Vec<AdamWState> = model
            .params
            .iter()
            .map(|q| AdamWState::new(q.var().elem_count()))
            .collect();
        let mut losses = vec![];
        for _ in 0..40 {
            let loss = lm_loss(&model, &x, &y);
            let grads = loss.backward().unwrap();
            for (q, s) in model.params.iter().zip(st.iter_mut()) {
                let g = grads.get(q.var().as_tensor()).unwrap();
                adamw_step(q.var().as_tensor(), g, s, &hp).unwrap();
            }
            losses.push(loss.to_scalar::<f32>().unwrap());
        }
        curves.push(losses);
    }
    gemm::set_matmul_precision(MatmulPrecision::F32).unwrap();
    let (f, h) = (&curves[0], &curves[1]);
    eprintln!(
        "{unit:?}: loss f32 {:.4} → {:.4}, bf16 {:.4} → {:.4}",
        f[0], f[39], h[0], h[39]
    );
    assert!(
        f[39] < 0.5 * f[0] && h[39] < 0.5 * h[0],
        "both must learn: {f:?} {h:?}"
    );
    for s in [9, 19, 39] {
        let rel = (f[s] - h[s]).abs() / f[s];
        assert!(
            rel < 0.05,
            "{unit:?} step {s}: f32 {} vs bf16 {} ({rel:.3})",
            f[s],
            h[s]
        );
    }
}

/// The attention kernel's blocked products follow the BF16 setting (as attention does under
/// `torch.autocast(bfloat16)`): outputs and input gradients stay close to the f32 kernel's, on a
/// causal batch with a left-padded row (queries that see no key) and keys past a 32-wide block.
#[test]
fn attention_in_bf16_follows_f32() {
    let _g = LOCK.lock().unwrap();
    if skip() {
        return;
    }
    on_every_unit(attention_in_bf16_follows_f32_on);
}

fn attention_in_bf16_follows_f32_on(unit: bf16::Unit) {
    use candle_core::{Device, Tensor, Var};
    let (b, h, t, d) = (2, 3, 70, 32);
    let mut mask = vec![vec![1u8; t]; b];
    mask[1][..5].fill(0);
    let bias = rlhf_model::ops::attention_bias(&mask, 0, t, &Device::Cpu).unwrap();
    let run = |p| {
        gemm::set_matmul_precision(p).unwrap();
        let vars: Vec<Var> = (0..3)
            .map(|i| {
                let v = data(b * h * t * d, 40 + i);
                Var::from_tensor(&Tensor::from_vec(v, (b, h, t, d), &Device::Cpu).unwrap()).unwrap()
            })
            .collect();
        let o = rlhf_model::fused::attention(&vars[0], &vars[1], &vars[2], &bias).unwrap();
        // A loss that weights every output differently; padding queries left out.
        let keep: Vec<f32> = (0..b * h * t * d)
            .map(|i| {
                let (bi, ti) = (i / (h * t * d), i / d % t);
                if bi == 1 && ti < 5 {
                    0.0
                } else {
                    data(1, i as u64)[0]
                }
            })
            .collect();
        let keep = Tensor::from_vec(keep, (b, h, t, d), &Device::Cpu).unwrap();
        let loss = (&o * &keep).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut out = vec![flat(&o)];
        out.extend(vars.iter().map(|v| flat(grads.get(v.as_tensor()).unwrap())));
        out
    };
    let (f, hb) = (run(MatmulPrecision::F32), run(MatmulPrecision::Bf16));
    gemm::set_matmul_precision(MatmulPrecision::F32).unwrap();
    for (name, (x, y)) in ["output", "dq", "dk", "dv"].iter().zip(f.iter().zip(&hb)) {
        assert!(
            y.iter().all(|v| v.is_finite()),
            "{unit:?} {name}: not finite in BF16"
        );
        assert_ne!(
            x, y,
            "{unit:?} {name}: BF16 must differ from f32 (else it did not take the BF16 path)"
        );
        let err = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        let mag = x.iter().map(|p| p.abs()).fold(0f32, f32::max);
        assert!(
            err < 2e-2 * mag,
            "{unit:?} {name}: max |f32 - bf16| {err}, max |f32| {mag}"
        );
        let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
        let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        assert!(
            dot / (nx * ny) > 0.9995,
            "{unit:?} {name}: cosine {}",
            dot / (nx * ny)
        );
    }
}

/// Decoding's BF16 panels (`PackedNt::pack_bf16`, `--matmul bf16`): the tile (8 rows × 48
/// columns) and every tail, odd `k` included, both weight layouts, against an f64 reference on
/// the BF16-rounded inputs. Runs on any CPU (a portable loop stands in for `vdpbf16ps`).
#[test]
fn packed_bf16_matches_the_rounded_reference() {
    use rlhf_model::kernels::packed::PackedNt;
    for m in (1..=17).chain([31, 64]) {
        for (k, n) in [(1, 3), (5, 47), (16, 48), (37, 49), (64, 130), (101, 97)] {
            let x = data(m * k, 63);
            let w = data(n * k, 64);
            // The same weight stored [k, n] (GPT-2's Conv1D).
            let kn: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            for (p, layout) in [
                (PackedNt::pack_bf16(&w, n, k, false), "[n, k]"),
                (PackedNt::pack_bf16(&kn, n, k, true), "[k, n]"),
            ] {
                assert!(p.is_bf16());
                assert_eq!(p.bytes(), n.div_ceil(48) * 48 * k.div_ceil(2) * 4);
                let mut o = vec![f32::NAN; m * n];
                p.matmul(&x, m, &mut o);
                for i in 0..m {
                    for j in 0..n {
                        let (mut s, mut mag) = (0f64, 0f64);
                        for l in 0..k {
                            let v =
                                round_bf16(x[i * k + l]) as f64 * round_bf16(w[j * k + l]) as f64;
                            s += v;
                            mag += v.abs();
                        }
                        let got = o[i * n + j] as f64;
                        let tol = 1e-6 * (mag + 1.0) * (k as f64).sqrt();
                        assert!(
                            (got - s).abs() <= tol,
                            "{layout} m{m} k{k} n{n}: o[{i},{j}] = {got}, want {s}"
                        );
                    }
                }
            }
        }
    }
}

/// Inside a generation's pack scope, `--matmul bf16` packs BF16 panels (half the bytes) from
/// one row up where AVX512-BF16 runs them; f32 keeps its own panels from 16 rows. The results
/// follow each precision's reference.
#[test]
fn decoding_packs_bf16_panels_with_the_bf16_precision() {
    use candle_core::{Device, Tensor};
    use rlhf_model::kernels::matmul::matmul_nt_op;
    use rlhf_model::kernels::packed::{enabled, pack_scope, packed_in_scope};
    let _g = LOCK.lock().unwrap();
    if skip() {
        return;
    }
    let dot = bf16::units().contains(&bf16::Unit::AvxDot) && enabled();
    let (k, n) = (37, 130);
    let (xv, wv) = (data(64 * k, 81), data(n * k, 82));
    let w = Tensor::from_vec(wv.clone(), (n, k), &Device::Cpu).unwrap();
    let x = |m: usize| Tensor::from_vec(xv[..m * k].to_vec(), (m, 1, k), &Device::Cpu).unwrap();
    let reference = |m: usize, round: fn(f32) -> f32| -> Vec<f64> {
        (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                (0..k)
                    .map(|l| round(xv[i * k + l]) as f64 * round(wv[j * k + l]) as f64)
                    .sum()
            })
            .collect()
    };
    let close = |y: &Tensor, want: &[f64], what: &str| {
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let e = got
            .iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0f64, f64::max);
        assert!(e < 1e-4, "{what}: off by {e}");
    };
    for m in [1, 4, 16, 64] {
        gemm::set_matmul_precision(MatmulPrecision::Bf16).unwrap();
        {
            let _scope = pack_scope();
            let y = matmul_nt_op(&x(m), &w).unwrap();
            let bytes = 3 * 48 * k.div_ceil(2) * 4;
            assert_eq!(
                packed_in_scope(),
                if dot { (1, bytes) } else { (0, 0) },
                "bf16 m={m}"
            );
            if dot {
                close(&y, &reference(m, round_bf16), &format!("bf16 m={m}"));
            }
        }
        gemm::set_matmul_precision(MatmulPrecision::F32).unwrap();
        {
            let _scope = pack_scope();
            let y = matmul_nt_op(&x(m), &w).unwrap();
            let packed = enabled() && m >= 16;
            let want = if packed { (1, 3 * 48 * k * 4) } else { (0, 0) };
            assert_eq!(packed_in_scope(), want, "f32 m={m}");
            close(&y, &reference(m, |v| v), &format!("f32 m={m}"));
        }
    }
}

/// A generation in BF16 decodes on BF16 panels, and every greedy choice is one the f32 model
/// rates within BF16's rounding of its best (teacher-forced f32 logits of the same sequence);
/// with LoRA adapters too.
#[test]
fn bf16_decoding_chooses_what_f32_rates_best() {
    use rlhf_model::kernels::packed::{enabled, weights_packed};
    use rlhf_model::{generate, GenerationConfig};
    let _g = LOCK.lock().unwrap();
    if skip() {
        return;
    }
    for (name, lora) in [("gpt2", false), ("llama", false), ("llama", true)] {
        let mut m = common::load(name);
        if lora {
            // Adapters on q and v with nonzero B, as a PPO policy decodes.
            let cfg = rlhf_model::LoraConfig {
                target_modules: vec!["q_proj".into(), "v_proj".into()],
                ..rlhf_model::LoraConfig::default()
            };
            m.add_lora(&cfg, 5).unwrap();
            common::fill_lora_b(&m);
        }
        let name = if lora { "llama with LoRA" } else { name };
        let prompts: Vec<Vec<u32>> = vec![vec![3, 17, 42, 8, 11], vec![5, 9], vec![60, 61, 62]];
        let cfg = GenerationConfig {
            max_new_tokens: 12,
            temperature: 0.0,
            ..Default::default()
        };
        gemm::set_matmul_precision(MatmulPrecision::Bf16).unwrap();
        let before = weights_packed();
        let g = generate(&m, &prompts, &cfg).unwrap();
        let packed = weights_packed() > before;
        gemm::set_matmul_precision(MatmulPrecision::F32).unwrap();
        let dot = bf16::units().contains(&bf16::Unit::AvxDot) && enabled();
        assert_eq!(
            packed, dot,
            "{name}: 3 rows pack BF16 panels where AVX512-BF16 runs"
        );
        for (p, toks) in prompts.iter().zip(&g.tokens) {
            let ids: Vec<u32> = p.iter().chain(toks).copied().collect();
            let t = ids.len();
            let x = candle_core::Tensor::from_vec(ids.clone(), (1, t), &candle_core::Device::Cpu)
                .unwrap();
            let logits = m.logits(&x, &[vec![1u8; t]]).unwrap();
            let rows = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            for (s, &tok) in toks.iter().enumerate() {
                let row = &rows[p.len() - 1 + s];
                let best = row.iter().copied().fold(f32::MIN, f32::max);
                let gap = best - row[tok as usize];
                assert!(
                    gap < 0.05,
                    "{name}: step {s} chose {tok}, {gap} below the f32 best"
                );
            }
        }
    }
}
