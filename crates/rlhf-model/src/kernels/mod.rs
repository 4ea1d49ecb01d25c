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
pub mod block;
pub mod dropout;
pub mod elementwise;
pub mod embed;
pub mod gemm;
pub mod head;
pub mod logprobs;
pub mod math;
pub mod matmul;
pub mod mlp;
pub mod norm;
pub mod packed;
pub mod rope;
pub mod sink;
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
    /// Elements in the buffer.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    /// The buffer's start, for kernels that store through masked vector writes; their callers
    /// check bounds against [`Self::len`] and keep to the `write` contract.
    pub(crate) fn ptr(&self) -> *mut f32 {
        self.ptr
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
    /// Add `src` to elements `at..at + src.len()` (bounds-checked).
    ///
    /// # Safety
    /// No other task may access these elements concurrently.
    #[inline]
    pub(crate) unsafe fn add(&self, at: usize, src: &[f32]) {
        assert!(at + src.len() <= self.len);
        // SAFETY: in bounds (checked above); exclusive per the contract.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), src.len()) };
        math::add_assign(dst, src);
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
///   All threads share its main arena, so this holds on the compute pool's threads too.
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

/// Run `f` on a thread of the compute pool, and wait for it. Training and generation should
/// run this way; the `rlhf` commands and the benchmarks do.
///
/// - A kernel called from a thread outside the pool hands its parallel work to the pool and
///   sleeps until the pool is done, so every kernel costs two wake-ups. From a thread of the
///   pool, a kernel starts its first part at once on that thread and the others join in.
/// - While `f` runs, the pool's other threads spin instead of sleeping between kernels
///   ([`keep_pool_awake`]; `RLHF_SPIN=0` turns that off).
/// - A wake-up costs 50–100 µs on a virtual machine: two 50 µs halves took 150 µs from outside
///   the pool, 65 µs when the threads were busy. A training step runs hundreds of kernels.
///
/// The pool has rayon's usual number of threads (`RAYON_NUM_THREADS`, else one per CPU) and
/// 16 MiB stacks (candle's backward pass walks the graph recursively). Called from a thread of
/// any rayon pool, `f` runs where it is. `RLHF_COMPUTE_POOL=0` runs it on the calling thread, as
/// before this existed; so does a failure to start the pool. The kernels split work by the
/// number of threads, not by which thread runs them, so the results are the same bits either
/// way.
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    init_cpu_runtime();
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    if rayon::current_thread_index().is_some()
        || std::env::var("RLHF_COMPUTE_POOL").is_ok_and(|v| v == "0")
    {
        return f();
    }
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("rlhf-compute-{i}"))
            .stack_size(16 << 20)
            .build()
            .map_err(|e| eprintln!("warning: compute pool not started ({e}); running inline"))
            .ok()
    });
    match pool {
        Some(p) => p.install(|| {
            let _awake = keep_pool_awake();
            f()
        }),
        None => f(),
    }
}

/// While the guard lives, every other thread of the current pool keeps looking for work
/// instead of going to sleep, as OpenMP's threads spin in PyTorch. Between two kernels the
/// calling thread does serial work (graph bookkeeping, candle's element-wise ops) for long
/// enough that idle rayon threads fall asleep, and each kernel would then start with only the
/// calling thread while the others take 50–100 µs to wake.
///
/// A spinning thread that finds nothing to do yields its core (`sched_yield`), so on a machine
/// busy with other processes it gives way to them.
///
/// Only a lone caller spins: a second [`on_compute_pool`] from another thread stops the first
/// one's spinning for good, and no caller spins while another is running (a spinning thread
/// that is also waiting inside another caller's work could otherwise wait on it in a cycle).
/// `RLHF_SPIN=0` turns it off (idle threads then sleep, e.g. on a machine shared with other
/// jobs).
fn keep_pool_awake() -> impl Drop {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};
    /// Callers inside [`on_compute_pool`] now, and the stop flag of the spinning one's threads
    /// if one spins.
    static STATE: Mutex<(usize, Option<Arc<AtomicBool>>)> = Mutex::new((0, None));
    fn state() -> MutexGuard<'static, (usize, Option<Arc<AtomicBool>>)> {
        STATE.lock().unwrap_or_else(|e| e.into_inner())
    }
    struct Leave(Option<Arc<AtomicBool>>);
    impl Drop for Leave {
        fn drop(&mut self) {
            let mut st = state();
            st.0 -= 1;
            if let Some(done) = &self.0 {
                done.store(true, Ordering::Release);
                if st.1.as_ref().is_some_and(|c| Arc::ptr_eq(c, done)) {
                    st.1 = None;
                }
            }
        }
    }
    let mut st = state();
    st.0 += 1;
    if st.0 > 1 {
        if let Some(other) = st.1.take() {
            other.store(true, Ordering::Release);
        }
        return Leave(None);
    }
    let Some(me) = rayon::current_thread_index() else {
        return Leave(None);
    };
    if std::env::var("RLHF_SPIN").is_ok_and(|v| v == "0") {
        return Leave(None);
    }
    let done = Arc::new(AtomicBool::new(false));
    st.1 = Some(done.clone());
    drop(st);
    let d = done.clone();
    rayon::spawn_broadcast(move |ctx| {
        if ctx.index() == me {
            return;
        }
        while !d.load(Ordering::Acquire) {
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                // Nothing to do: give the core to any other runnable thread (another process
                // on a busy machine); on an idle core this returns at once.
                std::thread::yield_now();
            }
        }
    });
    Leave(Some(done))
}

fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        // SAFETY: plain glibc tuning calls with valid parameters.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 1 << 30);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            // One arena for every thread. A thread other than the main one otherwise gets an
            // arena of 64 MiB heaps, which maps anything larger afresh and unmaps it when freed:
            // a training step on the compute pool took 6× the page faults (gpt2-v50k's 206 MB
            // logits buffer) and ran 10–20% slower than on the main thread.
            mallopt(M_ARENA_MAX, 1);
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
