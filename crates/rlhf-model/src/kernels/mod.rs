//! Fused CPU kernels (f32) behind [`crate::fused`]: each op is a candle `CustomOp` with a
//! backward pass, vectorised by compiling the same scalar-looking loop for AVX-512, AVX2+FMA and
//! the baseline, picked at run time ([`multiversion!`]) — no machine-specific build flags — and
//! parallel over rows with rayon.
//!
//! Every op here is tested against the composed reference in [`crate::ops`] and central finite
//! differences (`tests/fused.rs`).

// Kernels take slices and sizes, not structs: many arguments is their natural shape.
#![allow(clippy::too_many_arguments)]

pub mod adamw;
pub mod attention;
pub mod bf16;
pub mod elementwise;
pub mod gemm;
pub mod head;
pub mod logprobs;
pub mod math;
pub mod matmul;
pub mod mlp;
pub mod norm;
pub mod rope;
pub mod softmax;

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

/// Define a function whose body is compiled three times — AVX-512, AVX2+FMA, baseline — and
/// dispatched once per call with `is_x86_feature_detected!` (cached by std).
#[macro_export]
#[doc(hidden)]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi2")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma,bmi2")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if $crate::kernels::has_avx512() {
                    // SAFETY: the CPU has the features `v4` was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if $crate::kernels::has_avx2() {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

#[inline]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("bmi2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether a fused kernel can run on `t`: f32 on the CPU. Anything else (f64 for finite
/// differences, other devices) takes the composed path.
pub fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.dtype() == candle_core::DType::F32 && t.device().is_cpu())
}

/// The f32 slice of a contiguous layout, or an error naming the op.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op}: f32 only"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

pub(crate) fn out(v: Vec<f32>, shape: &Shape) -> Result<(CpuStorage, Shape)> {
    Ok((CpuStorage::F32(v), shape.clone()))
}

/// An output buffer that parallel tasks write at once, each to elements no other task touches
/// (for layouts where the tasks' parts are not contiguous slices).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: every user writes disjoint elements from each task (their `# Safety` contract), and
// the buffer outlives the parallel section that writes it.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(buf: &mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }
    /// Copy `src` to elements `at..at + src.len()` (bounds-checked).
    ///
    /// # Safety
    /// No other task may access these elements concurrently.
    #[inline]
    pub(crate) unsafe fn write(&self, at: usize, src: &[f32]) {
        assert!(at + src.len() <= self.len);
        // SAFETY: in bounds (checked above); exclusive per the contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), src.len()) }
    }
}

/// A Vec of `n` f32 whose contents the caller overwrites entirely.
#[allow(clippy::uninit_vec)]
pub(crate) fn uninit(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns; every caller writes all `n` elements before reading.
    unsafe { v.set_len(n) };
    v
}

/// Process-wide CPU settings for training speed, applied once (the first `CausalLM` built calls
/// this; call it earlier yourself if tensors are created before the model):
///
/// - candle's element-wise ops run on their own spinning "barrier pool" next to rayon (which
///   runs the GEMMs and our kernels); on a small machine the two pools fight for the cores and a
///   training step spends up to half its time spin-waiting. Unless `CANDLE_NUM_THREADS` is set,
///   we set it to 1 (the element-wise ops left to candle are memory-bound anyway).
/// - glibc keeps freed large buffers for reuse instead of unmapping them: a training step
///   allocates and frees the same sizes every step, and fresh mmaps cost ~10% in page faults.
/// - `RLHF_MATMUL=bf16` sets the matmul precision to BF16 on AMX or AVX512-BF16
///   ([`gemm::set_matmul_precision`]); where the CPU has neither it says so and stays f32.
///   `RLHF_BF16_UNIT=amx|avx512` chooses the unit where a CPU has both ([`bf16::set_unit`]).
pub fn init_cpu_runtime() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        tune_allocator();
        if let Ok(v) = std::env::var("RLHF_BF16_UNIT") {
            if let Err(e) = v.parse().and_then(|u| bf16::set_unit(Some(u))) {
                eprintln!("warning: RLHF_BF16_UNIT={v} ignored: {e}");
            }
        }
        if let Ok(v) = std::env::var("RLHF_MATMUL") {
            let set = v.parse().and_then(gemm::set_matmul_precision);
            if let Err(e) = set {
                eprintln!("warning: RLHF_MATMUL={v} ignored, matmuls stay f32: {e}");
            }
        }
    });
}

fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: plain glibc tuning calls with valid parameters.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 1 << 30);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// Run `f` on the contiguous f32 data of `ts` (copied only when a tensor is not contiguous).
pub(crate) fn with_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let cs: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = cs.iter().map(|t| t.storage_and_layout()).collect();
    let mut sl = Vec::with_capacity(guards.len());
    for (g, l) in &guards {
        let candle_core::Storage::Cpu(s) = &**g else {
            candle_core::bail!("fused kernels: cpu only")
        };
        sl.push(slice(s, l, "fused kernel")?);
    }
    Ok(f(&sl))
}
