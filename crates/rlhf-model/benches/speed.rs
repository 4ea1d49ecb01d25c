//! Training-step and generation throughput on CPU.
//!
//! `cargo bench -p rlhf-model --bench speed -- SHAPE [MODE]` where SHAPE is one of the names in
//! [`shapes`] (or `list`), MODE a sum of bits: 1 = training step, 2 = greedy KV-cache
//! generation, 8 = sampled generation at T = 1 (default 3; 4 = run the training step longer).
//! SHAPE `gemm` times the step's products alone; `decode` a decoding step's products (the rate
//! the weights stream at); `peak` measures the CPU's FP32 FMA and AVX512-BF16 peaks.
//! Prints `RESULT` lines in the format of `scripts/torch_bench.py`, so `scripts/bench_compare.sh`
//! can put them side by side. One shape per process, so the peak RSS is that shape's.

use std::time::Instant;

use candle_core::{Device, Tensor};
use rlhf_model::kernels::adamw::{AdamW, AdamWState};
use rlhf_model::kernels::sink::{sum_grads, GradSink};
use rlhf_model::{generate, CausalLM, GenerationConfig};

const B: usize = 8;
const T: usize = 128;

fn shapes(name: &str) -> Option<serde_json::Value> {
    use serde_json::json;
    let gpt2 = |v: usize, l: usize, d: usize, h: usize| {
        json!({"model_type": "gpt2", "vocab_size": v, "n_positions": 1024, "n_embd": d,
               "n_layer": l, "n_head": h, "tie_word_embeddings": true})
    };
    let llama = |v: usize, l: usize, d: usize, h: usize, kv: usize, i: usize| {
        json!({"model_type": "llama", "vocab_size": v, "hidden_size": d, "intermediate_size": i,
               "num_hidden_layers": l, "num_attention_heads": h, "num_key_value_heads": kv,
               "rms_norm_eps": 1e-5, "max_position_embeddings": 1024,
               "tie_word_embeddings": true})
    };
    Some(match name {
        "gpt2-v50k" => gpt2(50257, 4, 256, 4),
        "gpt2-v8k" => gpt2(8192, 4, 256, 4),
        "gpt2-d512" => gpt2(8192, 6, 512, 8),
        "llama-d256" => llama(8192, 4, 256, 4, 2, 704),
        "llama-d512" => llama(32000, 6, 512, 8, 4, 1376),
        // SmolLM2-135M's own configuration (random weights): the real model users fine-tune.
        "smollm2-135m" => llama(49152, 30, 576, 9, 3, 1536),
        _ => return None,
    })
}

const NAMES: &[&str] = &[
    "gpt2-v50k",
    "gpt2-v8k",
    "gpt2-d512",
    "llama-d256",
    "llama-d512",
    "smollm2-135m",
];

/// The LCG of the PyTorch baseline, so both see the same token ids.
fn lcg(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut s = seed as u128;
    (0..n)
        .map(|_| {
            s = (s * 6364136223846793005 + 1442695040888963407) % (1u128 << 64);
            ((s >> 33) % vocab as u128) as u32
        })
        .collect()
}

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// An environment variable parsed as `T` (`None` when unset or unparsable).
fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `gemm`: GFLOP/s of `kernels::gemm::sgemm` on the training step's products (m = 1024 rows
/// = 8 × 128 tokens), in the layouts a linear layer uses: with a GPT-2 [k, n] weight forward
/// `x·W`, `dX = g·Wᵀ`, `dW = xᵀ·g`; with an HF [n, k] weight forward `x·Wᵀ` and `dW = gᵀ·x`
/// (best of 5 × 5 calls). `scripts/torch_gemm.py` times PyTorch on the first three.
fn gemm_rates() -> anyhow::Result<()> {
    use rlhf_model::kernels::gemm::{sgemm, sgemm_serial, Mat};
    fn row(data: &[f32], rs: usize) -> Mat<'_> {
        Mat { data, rs, cs: 1 }
    }
    fn col(data: &[f32], cs: usize) -> Mat<'_> {
        Mat { data, rs: 1, cs }
    }
    let shapes = [
        (256, 768),
        (256, 256),
        (256, 1024),
        (1024, 256),
        (256, 8192),
        (512, 2048),
        (2048, 512),
    ];
    let m = B * T;
    for (k, n) in shapes {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let g: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32 * 0.1).collect();
        let mut y = vec![0f32; m * n.max(k)];
        let mut dw = vec![0f32; k * n];
        let rate = |f: &mut dyn FnMut()| {
            f();
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t0 = Instant::now();
                for _ in 0..5 {
                    f();
                }
                best = best.min(t0.elapsed().as_secs_f64() / 5.0);
            }
            2.0 * (m * k * n) as f64 / best / 1e9
        };
        // W [k, n] row-major (GPT-2 Conv1D).
        let fwd = rate(&mut || sgemm(m, n, k, row(&x, k), row(&w, n), &mut y, false));
        let dx = rate(&mut || sgemm(m, k, n, row(&g, n), col(&w, n), &mut y, false));
        let dwr = rate(&mut || sgemm(k, n, m, col(&x, k), row(&g, n), &mut dw, false));
        // HF [n, k] weight: forward x · Wᵀ (b column-major) and dW = gᵀ · x.
        let nt = rate(&mut || sgemm(m, n, k, row(&x, k), col(&w, k), &mut y, false));
        let dwt = rate(&mut || sgemm(n, k, m, col(&g, n), row(&x, k), &mut dw, false));
        println!(
            "RESULT gemm m={m} k={k} n={n} fwd={fwd:.0} dx={dx:.0} dw={dwr:.0} fwd_nt={nt:.0} dw_nt={dwt:.0}"
        );
        // The same five products in BF16 (`MatmulPrecision::Bf16`) on each BF16 unit the CPU has.
        for &unit in rlhf_model::kernels::bf16::units() {
            let bf = |m, n, k, a, b, c: &mut [f32]| {
                rlhf_model::kernels::bf16::sgemm_bf16_on(unit, true, m, n, k, a, b, c, false)
            };
            let fwd = rate(&mut || bf(m, n, k, row(&x, k), row(&w, n), &mut y));
            let dx = rate(&mut || bf(m, k, n, row(&g, n), col(&w, n), &mut y));
            let dwr = rate(&mut || bf(k, n, m, col(&x, k), row(&g, n), &mut dw));
            let nt = rate(&mut || bf(m, n, k, row(&x, k), col(&w, k), &mut y));
            let dwt = rate(&mut || bf(n, k, m, col(&g, n), row(&x, k), &mut dw));
            println!(
                "RESULT gemm-bf16 unit={unit:?} m={m} k={k} n={n} fwd={fwd:.0} dx={dx:.0} dw={dwr:.0} fwd_nt={nt:.0} dw_nt={dwt:.0}"
            );
        }
        // Scaling to all threads: the forward product on one thread and on all, alternating
        // (best of 7 × 5 calls each), so both see the same host.
        let (mut one, mut all) = (f64::MAX, f64::MAX);
        for _ in 0..7 {
            for serial in [true, false] {
                let t0 = Instant::now();
                for _ in 0..5 {
                    let (a, b) = (row(&x, k), row(&w, n));
                    if serial {
                        sgemm_serial(m, n, k, a, b, &mut y, false);
                    } else {
                        sgemm(m, n, k, a, b, &mut y, false);
                    }
                }
                let t = t0.elapsed().as_secs_f64() / 5.0;
                if serial {
                    one = one.min(t);
                } else {
                    all = all.min(t);
                }
            }
        }
        let gf = |t: f64| 2.0 * (m * k * n) as f64 / t / 1e9;
        println!(
            "RESULT gemm-threads m={m} k={k} n={n} fwd_1thread={:.0} fwd_{}threads={:.0} scaling={:.2}",
            gf(one),
            rayon::current_num_threads(),
            gf(all),
            one / all
        );
    }
    // Decoding's LM head: 8 rows against a [50257, 256] weight (51 MB), evicted from the caches
    // before each call as a decoding step's other work does; median of 20.
    let (m, k, n) = (B, 256, 50257);
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut o = vec![0f32; m * n];
    let mut times = vec![];
    let mut junk = vec![1f32; 64 << 20];
    for i in 0..20 {
        // Evict the weight from every cache level, as a decoding step's other work does.
        junk.iter_mut().for_each(|v| *v += i as f32);
        let t0 = Instant::now();
        rlhf_model::kernels::matmul::matmul_nt(&x, &w, m, k, n, &mut o);
        times.push(t0.elapsed().as_secs_f64());
    }
    let t = median(times);
    let gbs = (n * k * 4) as f64 / t / 1e9;
    println!(
        "RESULT head-cold m={m} k={k} n={n} ms={:.2} GB/s={gbs:.1}",
        t * 1e3
    );
    Ok(())
}

/// The arithmetic peaks that GFLOP/s figures are judged against: 12 independent accumulators
/// per thread, in registers, on one thread and then on every rayon thread at once. f32 FMA on
/// AVX-512 and, where the CPU has AVX512-BF16, `vdpbf16ps` (2 multiply-adds per lane).
fn peaks() {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        const ITERS: u64 = 100_000_000;
        #[target_feature(enable = "avx512f")]
        fn fma() -> f32 {
            let mut acc = [_mm512_setzero_ps(); 12];
            let (x, y) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            for _ in 0..ITERS {
                for a in acc.iter_mut() {
                    *a = _mm512_fmadd_ps(*a, x, y);
                }
            }
            acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum()
        }
        #[target_feature(enable = "avx512f,avx512bf16")]
        fn dot() -> f32 {
            let mut acc = [_mm512_setzero_ps(); 12];
            // SAFETY: plain bit casts between 512-bit vector types.
            let x: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80)) };
            for _ in 0..ITERS {
                for a in acc.iter_mut() {
                    *a = _mm512_dpbf16_ps(*a, x, x);
                }
            }
            acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum()
        }
        // Best of three: a busy neighbour on the host can halve one measurement.
        let rate = |threads: usize, f: fn() -> f32, flops_per_lane: f64| {
            let mut best = 0f64;
            for _ in 0..3 {
                let t0 = Instant::now();
                let sums: Vec<f32> = std::thread::scope(|s| {
                    let hs: Vec<_> = (0..threads).map(|_| s.spawn(f)).collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                std::hint::black_box(sums);
                let flops = threads as f64 * ITERS as f64 * 12.0 * 16.0 * flops_per_lane;
                best = best.max(flops / t0.elapsed().as_secs_f64() / 1e9);
            }
            best
        };
        let n = rayon::current_num_threads();
        if !is_x86_feature_detected!("avx512f") {
            println!("peak: this CPU has no AVX-512");
            return;
        }
        // SAFETY (both closures): the features were checked just above / below.
        let f = || unsafe { fma() };
        println!(
            "RESULT peak fp32_fma_1thread={:.1} fp32_fma_{n}threads={:.1} GFLOP/s",
            rate(1, f, 2.0),
            rate(n, f, 2.0)
        );
        if is_x86_feature_detected!("avx512bf16") {
            let d = || unsafe { dot() };
            println!(
                "RESULT peak bf16_dot_1thread={:.1} bf16_dot_{n}threads={:.1} GFLOP/s",
                rate(1, d, 4.0),
                rate(n, d, 4.0)
            );
        }
    }
}

/// `decode`: the products of one decoding step of SmolLM2-135M (30 layers of q, k, v, o, gate,
/// up and down; the LM head aside) for m = 1 to 128 sequences: milliseconds per step and
/// the rate the weights stream at, with HF's [n, k] weights (`matmul_nt`, Llama's path) and
/// [k, n] ones (`sgemm`, GPT-2's), best of 5 steps. Decoding reads every weight once per token,
/// so this rate bounds the tokens per second; `memory` is the rate of a plain parallel sum over
/// 1 GiB, for scale. 30 layers of distinct weights (425 MB) keep them out of the caches.
fn decode_rates() {
    use rayon::prelude::*;
    use rlhf_model::kernels::gemm::{sgemm, Mat};
    use rlhf_model::kernels::matmul::matmul_nt;
    use rlhf_model::kernels::packed::PackedNt;
    // [n, k] of q, k, v, o, gate, up and down, from the `smollm2-135m` shape's configuration.
    let cfg = shapes("smollm2-135m").expect("a bench shape");
    let get = |key: &str| cfg[key].as_u64().expect("an integer field") as usize;
    let (d, inner, layers) = (
        get("hidden_size"),
        get("intermediate_size"),
        get("num_hidden_layers"),
    );
    let kv = d / get("num_attention_heads") * get("num_key_value_heads");
    let products = [
        (d, d),
        (kv, d),
        (kv, d),
        (d, d),
        (inner, d),
        (inner, d),
        (d, inner),
    ];
    let weights: Vec<Vec<Vec<f32>>> = (0..layers)
        .map(|l| {
            products
                .iter()
                .map(|&(n, k)| (0..n * k).map(|i| ((i + l) % 7) as f32 * 0.01).collect())
                .collect()
        })
        .collect();
    let bytes = (products.iter().map(|&(n, k)| n * k).sum::<usize>() * layers * 4) as f64;
    let rows = [1, 4, 8, 16, 32, 64, 128];
    let wide = rows[rows.len() - 1] * d.max(inner);
    let x: Vec<f32> = (0..wide).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut o = vec![0f32; wide];
    let best = |f: &mut dyn FnMut()| {
        f();
        (0..5)
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let big: Vec<f32> = vec![1.0; 1 << 28];
    let t = best(&mut || {
        // 16 independent sums, so the loop is not bound by the latency of one.
        let lanes = |c: &[f32]| {
            c.chunks_exact(16).fold([0f32; 16], |mut a, v| {
                a.iter_mut().zip(v).for_each(|(a, v)| *a += v);
                a
            })
        };
        std::hint::black_box(big.par_chunks(1 << 16).map(lanes).collect::<Vec<_>>());
    });
    println!(
        "RESULT decode memory GB/s={:.1}",
        (big.len() * 4) as f64 / t / 1e9
    );
    drop(big);
    // The same weights packed once, as a generation does on its first step with enough rows.
    let t0 = Instant::now();
    let packed: Vec<Vec<PackedNt>> = weights
        .iter()
        .map(|layer| {
            layer
                .iter()
                .zip(&products)
                .map(|(w, &(n, k))| PackedNt::pack(w, n, k))
                .collect()
        })
        .collect();
    println!(
        "RESULT decode pack_ms={:.1}",
        t0.elapsed().as_secs_f64() * 1e3
    );
    // And as BF16 pairs (`--matmul bf16`), where AVX512-BF16 runs them.
    let bf16 =
        rlhf_model::kernels::bf16::units().contains(&rlhf_model::kernels::bf16::Unit::AvxDot);
    let t0 = Instant::now();
    let packed_bf16: Vec<Vec<PackedNt>> = weights
        .iter()
        .filter(|_| bf16)
        .map(|layer| {
            layer
                .iter()
                .zip(&products)
                .map(|(w, &(n, k))| PackedNt::pack_bf16(w, n, k, false))
                .collect()
        })
        .collect();
    if bf16 {
        println!(
            "RESULT decode pack_bf16_ms={:.1}",
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    for m in rows {
        let nt = best(&mut || {
            for layer in &weights {
                for (w, &(n, k)) in layer.iter().zip(&products) {
                    matmul_nt(&x[..m * k], w, m, k, n, &mut o);
                }
            }
        });
        let kn = best(&mut || {
            for layer in &weights {
                for (w, &(n, k)) in layer.iter().zip(&products) {
                    let a = Mat {
                        data: &x[..m * k],
                        rs: k,
                        cs: 1,
                    };
                    let b = Mat {
                        data: w,
                        rs: n,
                        cs: 1,
                    };
                    sgemm(m, n, k, a, b, &mut o, false);
                }
            }
        });
        let pk = best(&mut || {
            for layer in &packed {
                for (w, &(_, k)) in layer.iter().zip(&products) {
                    w.matmul(&x[..m * k], m, &mut o);
                }
            }
        });
        let pb = best(&mut || {
            for layer in &packed_bf16 {
                for (w, &(_, k)) in layer.iter().zip(&products) {
                    w.matmul(&x[..m * k], m, &mut o);
                }
            }
        });
        let flops = bytes / 4.0 * 2.0 * m as f64;
        println!(
            "RESULT decode m={m} nk_ms={:.2} nk_GB/s={:.1} kn_ms={:.2} kn_GB/s={:.1} packed_ms={:.2} packed_GFLOP/s={:.0}{}",
            nt * 1e3,
            bytes / nt / 1e9,
            kn * 1e3,
            bytes / kn / 1e9,
            pk * 1e3,
            flops / pk / 1e9,
            match bf16 {
                true => format!(" packed_bf16_ms={:.2} packed_bf16_GFLOP/s={:.0}", pb * 1e3, flops / pb / 1e9),
                false => String::new(),
            }
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let name = args.first().map(|s| s.as_str()).unwrap_or("gpt2-v50k");
    let mode: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    if name == "gemm" {
        rlhf_model::kernels::init_cpu_runtime();
        return gemm_rates();
    }
    if name == "decode" {
        rlhf_model::kernels::on_compute_pool(decode_rates);
        return Ok(());
    }
    if name == "peak" {
        peaks();
        return Ok(());
    }
    let Some(cfg) = shapes(name) else {
        println!("shapes: {} gemm decode peak", NAMES.join(" "));
        return Ok(());
    };
    // RLHF_BENCH_STOCK=1: keep candle's element-wise barrier pool at one thread per core, as
    // stock candle does (for comparison; see `kernels::init_cpu_runtime`).
    if std::env::var_os("RLHF_BENCH_STOCK").is_some() {
        std::env::set_var(
            "CANDLE_NUM_THREADS",
            rayon::current_num_threads().to_string(),
        );
    }
    rlhf_model::kernels::init_cpu_runtime();
    // RLHF_BENCH_UNFUSED_HEAD=1: logits tensor, then the fused log-softmax+gather.
    let unfused_head = std::env::var_os("RLHF_BENCH_UNFUSED_HEAD").is_some();
    // RLHF_BENCH_COMPOSED=1: the blocks as their ops, not one node each (see the sink below).
    let composed = std::env::var_os("RLHF_BENCH_COMPOSED").is_some();
    let mut model = CausalLM::random(cfg, 0)?;
    // RLHF_BENCH_LORA=r: LoRA of rank r (alpha 2r) on every product, dropout 0.05 drawing masks
    // each step (RLHF_BENCH_LORA_DROPOUT=p for another rate); only the adapters train (the base
    // and the embedding frozen).
    let lora: Option<usize> = env("RLHF_BENCH_LORA");
    if let Some(r) = lora {
        let targets = ["c_attn", "c_proj", "c_fc"]
            .into_iter()
            .chain(rlhf_model::kernels::block::LLAMA_PROJECTIONS);
        let cfg = rlhf_model::LoraConfig {
            r,
            alpha: 2.0 * r as f64,
            dropout: env("RLHF_BENCH_LORA_DROPOUT").unwrap_or(0.05),
            target_modules: targets.map(String::from).collect(),
        };
        model.add_lora(&cfg, 1)?;
    }
    let vocab = model.config.vocab_size();
    let nparams: usize = model.params.iter().map(|p| p.var().elem_count()).sum();
    println!(
        "rlhf {name} threads={} vocab={vocab} params={nparams} matmul={:?} lora={lora:?}",
        rayon::current_num_threads(),
        rlhf_model::kernels::gemm::matmul_precision()
    );
    let dev = Device::Cpu;
    if mode & 1 != 0 {
        let all = lcg(B * (T + 1), 42, vocab);
        let mut x = Vec::with_capacity(B * T);
        let mut y = Vec::with_capacity(B * T);
        for r in 0..B {
            x.extend_from_slice(&all[r * (T + 1)..r * (T + 1) + T]);
            y.extend_from_slice(&all[r * (T + 1) + 1..(r + 1) * (T + 1)]);
        }
        let x = Tensor::from_vec(x, (B, T), &dev)?;
        let y = Tensor::from_vec(y, B * T, &dev)?;
        let mask = vec![vec![1u8; T]; B];
        let hp = AdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..AdamW::default()
        };
        let params: Vec<_> = model
            .params
            .iter()
            .filter(|p| p.is_trainable())
            .cloned()
            .collect();
        let mut states: Vec<AdamWState> = params
            .iter()
            .map(|p| AdamWState::new(p.var().elem_count()))
            .collect();
        let (mut times, mut losses) = (vec![], vec![]);
        for step in 0..32 {
            let t0 = Instant::now();
            if lora.is_some() {
                model.set_train_noise(Some(step + 1));
            }
            let mut body = || -> anyhow::Result<f32> {
                // Weight gradients of the fused ops go to the sink; candle returns the rest.
                // Installed before the forward, so that the blocks run as one node each
                // (after it with RLHF_BENCH_COMPOSED=1: the blocks composed of their ops).
                let tensors: Vec<&Tensor> = params.iter().map(|p| p.var().as_tensor()).collect();
                let early = (!composed)
                    .then(|| GradSink::install(&tensors))
                    .transpose()?;
                let h = model.hidden(&x, &mask)?;
                let h2 = h.reshape((B * T, model.hidden_size()))?;
                let lp = if unfused_head {
                    let logits = model.lm_logits(&h2)?;
                    rlhf_model::fused::token_logprobs(&logits, &y)?
                } else {
                    model.head_logprobs(&h2, &y, 1.0)?
                };
                let loss = lp.mean_all()?.neg()?;
                let sink = match early {
                    Some(s) => s,
                    None => GradSink::install(&tensors)?,
                };
                let grads = loss.backward()?;
                drop((h, h2, lp));
                let sunk = sink.take()?;
                for ((p, st), s) in params.iter().zip(states.iter_mut()).zip(sunk) {
                    if let Some(g) = sum_grads(grads.get(p.var().as_tensor()).cloned(), s)? {
                        rlhf_model::kernels::adamw::adamw_step(p.var().as_tensor(), &g, st, &hp)?;
                    }
                }
                drop(grads);
                Ok(loss.to_scalar::<f32>()?)
            };
            let l = rlhf_model::kernels::on_compute_pool(&mut body)?;
            let dt = t0.elapsed().as_secs_f64();
            if (2..12).contains(&step) {
                times.push(dt);
            }
            losses.push(l);
            if step < 3 || step % 10 == 9 {
                println!("step {step} loss {l:.4} {dt:.3}s");
            }
            if step >= 12 && mode & 4 == 0 {
                break;
            }
        }
        let med = median(times);
        let toks = (B * T) as f64;
        println!(
            "RESULT train median_step={med:.4}s tok/s={:.0} GFLOP/s(6N)={:.1} loss0={:.3} peak_rss_MB={:.0}",
            toks / med,
            6.0 * nparams as f64 * toks / med / 1e9,
            losses[0],
            peak_rss_mb()
        );
        model.set_train_noise(None);
    }
    // Mode 2: greedy decoding; mode 8: sampling at T = 1 (top-k and top-p off, as in PPO's
    // rollouts), seeded. RLHF_BENCH_GEN_ROWS (default 8, as B): sequences decoded together
    // (PPO decodes its whole rollout batch, 64 by default).
    let rows: usize = env("RLHF_BENCH_GEN_ROWS").unwrap_or(B);
    for (bit, label, temperature) in [(2, "gen64", 0.0), (8, "gen64-sample", 1.0)] {
        if mode & bit == 0 {
            continue;
        }
        let prompt = lcg(rows * 64, 7, vocab);
        let prompts: Vec<Vec<u32>> = prompt.chunks(64).map(|c| c.to_vec()).collect();
        let gc = GenerationConfig {
            max_new_tokens: 64,
            temperature,
            seed: 1,
            use_cache: true,
            ..Default::default()
        };
        let mut best = f64::INFINITY;
        let mut first = vec![];
        for _ in 0..3 {
            let t0 = Instant::now();
            let g = rlhf_model::kernels::on_compute_pool(|| generate(&model, &prompts, &gc))?;
            best = best.min(t0.elapsed().as_secs_f64());
            first = g.tokens[0][..6].to_vec();
        }
        println!(
            "RESULT {label} kv_cache=True rows={rows} time={best:.3}s new_tok/s={:.0} first-row-tokens={first:?} peak_rss_MB={:.0}",
            (rows * 64) as f64 / best,
            peak_rss_mb()
        );
    }
    Ok(())
}
