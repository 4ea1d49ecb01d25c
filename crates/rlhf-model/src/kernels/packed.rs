//! Weights packed once for a whole generation, for its few-row products.
//!
//! Decoding multiplies a few rows (one per sequence) by every weight, once per new token, and
//! the weights do not change while a generation runs. An HF weight `[n, k]` is stored row by
//! row along `k`, so [`super::matmul::matmul_nt`]'s few-row path takes dot products: 16
//! accumulators per 4 weight rows × 4 sequences, a horizontal reduction per block, and a
//! transpose of every block into the output's rows. GPT-2's Conv1D weights `[k, n]` take
//! broadcast FMAs over rows of the weight read in place, 16 steps of `k` at a time. The GEMM
//! would instead pack the weight into panels on every call, that is on every token.
//!
//! Here each weight is packed once, the first time a generation multiplies it by
//! [`PACK_MIN_ROWS`] to [`PACK_MAX_ROWS`] rows (decoding 16 or more sequences, a prefill of a
//! few short prompts), into panels of [`NR`] output columns stored `[k][NR]`, and every later
//! product runs a register tile of up to 8 rows × 48 columns over the whole of `k`: per step of
//! `k`, 3 weight loads and 8 broadcasts feed 24 FMAs, with no reduction and the results stored
//! straight into the output's rows. The packed copies live while the [`pack_scope`] that
//! [`crate::generate::generate`] opens does, and hold their weight's storage alive meanwhile,
//! so no address is reused for another tensor inside the scope.
//!
//! With `--matmul bf16`, on a CPU with AVX512-BF16, the panels hold pairs of BF16 values along
//! `k` instead ([`PackedNt::pack_bf16`]) and the tile runs `vdpbf16ps`: half the bytes per
//! token and twice the multiply-adds per instruction. Those are packed from one row up.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::SharedOut;

/// Output columns per packed panel (three 16-float vectors).
pub const NR: usize = 48;
/// Rows per register tile (8 × 3 accumulators of the 32 registers).
const MR: usize = 8;
/// Products with fewer rows keep their old kernels: they are bound by streaming the weight,
/// which any layout does once per call, so packing (a pass over every weight, about eight
/// 8-row steps of SmolLM2) did not pay: 1–4 rows within noise, 8 rows +1–7% over 64 tokens.
pub const PACK_MIN_ROWS: usize = 16;
/// Products with more rows take the GEMM (a generation's prefill of many prompt tokens): on
/// SmolLM2's decoding products (`speed -- decode`, Zen 5) the packed tiles took 64 against the
/// GEMM's 119 ms at 128 rows and 119 against 148 at 256, but 252 against 259 at 512 and 526
/// against 516 at 1024.
pub const PACK_MAX_ROWS: usize = 256;

/// A weight `[n, k]` packed as `⌈n / NR⌉` panels of `[k][NR]` f32 (columns past `n` are zero),
/// or, for products in BF16 ([`PackedNt::pack_bf16`]), of `[⌈k / 2⌉][NR]` pairs of BF16 values
/// (`k = 2q` in the low half of word `q`, `2q + 1` in the high), the layout `vdpbf16ps` takes:
/// half the bytes, and twice the multiply-adds per instruction on CPUs that have it.
pub struct PackedNt {
    n: usize,
    k: usize,
    panels: Panels,
}

/// The panels, the first aligned to 64 bytes (`start` elements into `buf`).
enum Panels {
    F32 { buf: Vec<f32>, start: usize },
    Bf16 { buf: Vec<u32>, start: usize },
}

impl PackedNt {
    /// Pack `w [n, k]` (row-major, HF's `[out, in]`), panels in parallel.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack_as(w, n, k, false)
    }

    /// Pack `w`, stored `[k, n]` when `transposed` (GPT-2's Conv1D `[in, out]`), else `[n, k]`.
    pub fn pack_as(w: &[f32], n: usize, k: usize, transposed: bool) -> Self {
        check_len(w, n, k);
        let len = n.div_ceil(NR) * k * NR;
        let mut buf = super::uninit(len + 16);
        let start = buf.as_ptr().align_offset(64).min(16);
        buf[start..start + len]
            .par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(p, dst)| {
                let (j0, j1) = (p * NR, ((p + 1) * NR).min(n));
                if transposed {
                    // Column block j0..j1 of each of the k rows, zero past n.
                    for (c, d) in dst.chunks_exact_mut(NR).enumerate() {
                        d[..j1 - j0].copy_from_slice(&w[c * n + j0..c * n + j1]);
                        d[j1 - j0..].fill(0.0);
                    }
                    return;
                }
                let src = &w[j0 * k..j1 * k];
                if j1 - j0 == NR {
                    super::gemm::transpose(src, k, NR, k, dst, false);
                } else {
                    dst.fill(0.0);
                    interleave(src, k, NR, dst);
                }
            });
        Self {
            n,
            k,
            panels: Panels::F32 { buf, start },
        }
    }

    /// [`PackedNt::pack_as`] for products in BF16: each weight rounded to BF16 (to nearest
    /// even, as [`super::bf16`]'s GEMM rounds its operands), pairs along `k` in one word. Its
    /// products round `x` the same way and sum in f32; they need AVX512-BF16 to be fast
    /// (elsewhere a portable loop gives the same sums).
    pub fn pack_bf16(w: &[f32], n: usize, k: usize, transposed: bool) -> Self {
        check_len(w, n, k);
        let steps = k.div_ceil(2);
        let len = n.div_ceil(NR) * steps * NR;
        let mut buf = Vec::<u32>::with_capacity(len + 16);
        // SAFETY: u32 has no invalid bit patterns; every word of the panels is written below
        // (the words before `start` and after the panels are never read).
        #[allow(clippy::uninit_vec)]
        unsafe {
            buf.set_len(len + 16)
        };
        let start = buf.as_ptr().align_offset(64).min(16);
        let at = |j: usize, c: usize| match (c < k, transposed) {
            (false, _) => 0,
            (true, true) => super::bf16::bf16_bits(w[c * n + j]) as u32,
            (true, false) => super::bf16::bf16_bits(w[j * k + c]) as u32,
        };
        buf[start..start + len]
            .par_chunks_mut(steps * NR)
            .enumerate()
            .for_each(|(p, dst)| {
                let (j0, j1) = (p * NR, ((p + 1) * NR).min(n));
                if j1 - j0 < NR {
                    // The last panel: its columns past n are zero.
                    dst.fill(0);
                }
                if super::bf16::pack_pairs_panel(w, (n, k), transposed, (j0, j1 - j0), dst) {
                    return;
                }
                for (q, d) in dst.chunks_exact_mut(NR).enumerate() {
                    for (j, d) in (j0..j1).zip(d.iter_mut()) {
                        *d = at(j, 2 * q) | at(j, 2 * q + 1) << 16;
                    }
                }
            });
        Self {
            n,
            k,
            panels: Panels::Bf16 { buf, start },
        }
    }

    /// Whether the panels hold BF16 pairs.
    pub fn is_bf16(&self) -> bool {
        matches!(self.panels, Panels::Bf16 { .. })
    }

    /// The panels' bytes (both kinds of element are 4 bytes: a float, or a pair of BF16).
    pub fn bytes(&self) -> usize {
        let len = match &self.panels {
            Panels::F32 { buf, .. } => buf.len(),
            Panels::Bf16 { buf, .. } => buf.len(),
        };
        (len - 16) * 4
    }

    /// `x [m, k] · Wᵀ → o [m, n]` (`o` fully written).
    pub fn matmul(&self, x: &[f32], m: usize, o: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert!(
            x.len() >= m * k && o.len() >= m * n,
            "packed: x or o too short"
        );
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            o[..m * n].fill(0.0);
            return;
        }
        // x as row tiles of [steps][MR] (rows past m zero), so each step's broadcasts are
        // adjacent: f32, or pairs of BF16 along k.
        let tiles = m.div_ceil(MR);
        let x = &x[..m * k];
        match &self.panels {
            Panels::F32 { buf, start } => {
                let mut xp = vec![0.0f32; tiles * k * MR];
                for (rows, t) in x.chunks(MR * k).zip(xp.chunks_exact_mut(k * MR)) {
                    interleave(rows, k, MR, t);
                }
                let data = &buf[*start..*start + n.div_ceil(NR) * k * NR];
                self.run(data, &xp, k, m, o, tile_any);
            }
            Panels::Bf16 { buf, start } => {
                let steps = k.div_ceil(2);
                let mut xp = vec![0u32; tiles * steps * MR];
                let mut pairs = vec![0u32; steps];
                for (i, row) in x.chunks_exact(k).enumerate() {
                    super::bf16::to_pairs(row, &mut pairs);
                    let t = &mut xp[(i / MR) * steps * MR..];
                    for (q, &w) in pairs.iter().enumerate() {
                        t[q * MR + i % MR] = w;
                    }
                }
                let data = &buf[*start..*start + n.div_ceil(NR) * steps * NR];
                self.run(data, &xp, steps, m, o, tile_bf16_any);
            }
        }
    }

    /// The tiles over every panel: `data` holds the panels (`steps` lines of NR each), `xp` the
    /// row tiles (`steps` lines of MR each).
    fn run<T: Sync>(
        &self,
        data: &[T],
        xp: &[T],
        steps: usize,
        m: usize,
        o: &mut [f32],
        tile: Tile<T>,
    ) {
        let n = self.n;
        let tiles = m.div_ceil(MR);
        let panels = n.div_ceil(NR);
        // Two tasks per thread, in whole panels.
        let per = panels.div_ceil(2 * rayon::current_num_threads()).max(1);
        let dst = SharedOut::new(&mut o[..m * n]);
        (0..panels.div_ceil(per)).into_par_iter().for_each(|task| {
            for p in task * per..((task + 1) * per).min(panels) {
                let j0 = p * NR;
                let cols = (n - j0).min(NR);
                let panel = &data[p * steps * NR..(p + 1) * steps * NR];
                let next = &data[((p + 1) * steps * NR).min(data.len())..];
                for t in 0..tiles {
                    let rows = (m - t * MR).min(MR);
                    let xt = &xp[t * steps * MR..(t + 1) * steps * MR];
                    // The next panel's lines go to L2 while this one runs, a share per tile.
                    let share = (steps * NR / 16).div_ceil(tiles);
                    let pf = &next[(t * share * 16).min(next.len())..];
                    let pf = &pf[..(share * 16).min(pf.len())];
                    // SAFETY: columns j0..j0 + cols of rows t·MR.. belong to this task only.
                    unsafe { tile(xt, panel, steps, rows, cols, &dst, t * MR * n + j0, n, pf) };
                }
            }
        });
    }
}

/// A tile function: `(xt, panel, steps, rows, cols, dst, at, on, prefetch)`, as [`tile_any`].
type Tile<T> = unsafe fn(&[T], &[T], usize, usize, usize, &SharedOut, usize, usize, &[T]);

fn check_len(w: &[f32], n: usize, k: usize) {
    assert_eq!(
        w.len(),
        n * k,
        "packed: weight of {} floats for [{n}, {k}]",
        w.len()
    );
}

/// Rows of `k` floats (at most `width` of them) into `dst [k][width]`, row j in lane j; lanes
/// past the rows are left as they are.
fn interleave(rows: &[f32], k: usize, width: usize, dst: &mut [f32]) {
    for (j, row) in rows.chunks_exact(k).enumerate() {
        for (c, v) in row.iter().enumerate() {
            dst[c * width + j] = *v;
        }
    }
}

/// One tile: `rows` (≤ MR) rows of `xt [k][MR]` times `panel [k][NR]`, `cols` (≤ NR) columns
/// stored at `at + r · on` of `dst`.
///
/// # Safety
/// No other task may access those elements of `dst` concurrently.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_any(
    xt: &[f32],
    panel: &[f32],
    k: usize,
    rows: usize,
    cols: usize,
    dst: &SharedOut,
    at: usize,
    on: usize,
    pf: &[f32],
) {
    assert!(xt.len() >= k * MR && panel.len() >= k * NR && rows <= MR && cols <= NR);
    assert!(at + (rows - 1) * on + cols <= dst.len());
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512() {
        // SAFETY: the CPU has AVX-512F; bounds are checked above.
        unsafe {
            match rows {
                8 => tile_avx512::<8>(xt, panel, k, cols, dst, at, on, pf),
                7 => tile_avx512::<7>(xt, panel, k, cols, dst, at, on, pf),
                6 => tile_avx512::<6>(xt, panel, k, cols, dst, at, on, pf),
                5 => tile_avx512::<5>(xt, panel, k, cols, dst, at, on, pf),
                4 => tile_avx512::<4>(xt, panel, k, cols, dst, at, on, pf),
                3 => tile_avx512::<3>(xt, panel, k, cols, dst, at, on, pf),
                2 => tile_avx512::<2>(xt, panel, k, cols, dst, at, on, pf),
                _ => tile_avx512::<1>(xt, panel, k, cols, dst, at, on, pf),
            }
        }
        return;
    }
    let _ = pf;
    let mut acc = [[0.0f32; NR]; MR];
    for c in 0..k {
        let w = &panel[c * NR..(c + 1) * NR];
        for (r, a) in acc.iter_mut().enumerate().take(rows) {
            let x = xt[c * MR + r];
            a.iter_mut().zip(w).for_each(|(a, w)| *a += x * w);
        }
    }
    for (r, a) in acc.iter().enumerate().take(rows) {
        // SAFETY: in bounds (asserted above); exclusive per the contract.
        unsafe { dst.write(at + r * on, &a[..cols]) };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512<const R: usize>(
    xt: &[f32],
    panel: &[f32],
    k: usize,
    cols: usize,
    dst: &SharedOut,
    at: usize,
    on: usize,
    pf: &[f32],
) {
    use std::arch::x86_64::*;
    let (xp, wp) = (xt.as_ptr(), panel.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 3]; R];
    // Prefetch lines spread evenly over the steps of k.
    let lines = pf.len().div_ceil(16);
    let per_step = lines.div_ceil(k);
    let mut line = 0;
    for c in 0..k {
        for _ in 0..per_step {
            if line < lines {
                _mm_prefetch::<_MM_HINT_T1>(pf.as_ptr().wrapping_add(line * 16) as *const i8);
                line += 1;
            }
        }
        // SAFETY: c < k and the panel holds k · NR floats, xt k · MR (asserted by the caller).
        unsafe {
            let w = wp.add(c * NR);
            let wv = [
                _mm512_loadu_ps(w),
                _mm512_loadu_ps(w.add(16)),
                _mm512_loadu_ps(w.add(32)),
            ];
            let x = xp.add(c * MR);
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(r));
                for v in 0..3 {
                    a[v] = _mm512_fmadd_ps(xv, wv[v], a[v]);
                }
            }
        }
    }
    // SAFETY: the caller's bounds and exclusivity (see `store_rows`).
    unsafe { store_rows(&acc, cols, dst, at, on) };
}

/// Store a tile's accumulators: row r's first `cols` (≤ NR) lanes at `at + r · on` of `dst`.
///
/// # Safety
/// Those elements lie in `dst` and belong to the caller alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_rows<const R: usize>(
    acc: &[[std::arch::x86_64::__m512; 3]; R],
    cols: usize,
    dst: &SharedOut,
    at: usize,
    on: usize,
) {
    use std::arch::x86_64::*;
    let out = dst.ptr();
    for (r, a) in acc.iter().enumerate() {
        for (v, acc) in a.iter().enumerate() {
            let lanes = cols.saturating_sub(16 * v).min(16);
            if lanes == 0 {
                break;
            }
            let mask = if lanes == 16 {
                0xffff
            } else {
                (1u16 << lanes) - 1
            };
            // SAFETY: lanes below `cols` of row r lie in bounds and belong to this task (per
            // the contract); masked lanes are not written.
            unsafe { _mm512_mask_storeu_ps(out.add(at + r * on + 16 * v), mask, *acc) };
        }
    }
}

/// [`tile_any`] on BF16 panels and row tiles (`steps` pairs along k).
///
/// # Safety
/// As [`tile_any`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16_any(
    xt: &[u32],
    panel: &[u32],
    steps: usize,
    rows: usize,
    cols: usize,
    dst: &SharedOut,
    at: usize,
    on: usize,
    pf: &[u32],
) {
    assert!(xt.len() >= steps * MR && panel.len() >= steps * NR && rows <= MR && cols <= NR);
    assert!(at + (rows - 1) * on + cols <= dst.len());
    #[cfg(target_arch = "x86_64")]
    if super::bf16::dot_available() {
        // SAFETY: the CPU has AVX-512F and AVX512-BF16; bounds are checked above.
        unsafe {
            match rows {
                8 => tile_bf16::<8>(xt, panel, steps, cols, dst, at, on, pf),
                7 => tile_bf16::<7>(xt, panel, steps, cols, dst, at, on, pf),
                6 => tile_bf16::<6>(xt, panel, steps, cols, dst, at, on, pf),
                5 => tile_bf16::<5>(xt, panel, steps, cols, dst, at, on, pf),
                4 => tile_bf16::<4>(xt, panel, steps, cols, dst, at, on, pf),
                3 => tile_bf16::<3>(xt, panel, steps, cols, dst, at, on, pf),
                2 => tile_bf16::<2>(xt, panel, steps, cols, dst, at, on, pf),
                _ => tile_bf16::<1>(xt, panel, steps, cols, dst, at, on, pf),
            }
        }
        return;
    }
    let _ = pf;
    let half = |w: u32, s: u32| f32::from_bits((w >> s) << 16);
    let mut acc = [[0.0f32; NR]; MR];
    for q in 0..steps {
        let w = &panel[q * NR..(q + 1) * NR];
        for (r, a) in acc.iter_mut().enumerate().take(rows) {
            let x = xt[q * MR + r];
            for (a, &w) in a.iter_mut().zip(w) {
                *a += half(x, 0) * half(w, 0) + half(x, 16) * half(w, 16);
            }
        }
    }
    for (r, a) in acc.iter().enumerate().take(rows) {
        // SAFETY: in bounds (asserted above); exclusive per the contract.
        unsafe { dst.write(at + r * on, &a[..cols]) };
    }
}

/// [`tile_avx512`] with `vdpbf16ps`: per pair of k, 3 loads of 16 column pairs and `R`
/// broadcasts of a row's pair feed `3R` dot products of two.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16<const R: usize>(
    xt: &[u32],
    panel: &[u32],
    steps: usize,
    cols: usize,
    dst: &SharedOut,
    at: usize,
    on: usize,
    pf: &[u32],
) {
    use std::arch::x86_64::*;
    let (xp, wp) = (xt.as_ptr(), panel.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 3]; R];
    let lines = pf.len().div_ceil(16);
    let per_step = lines.div_ceil(steps);
    let mut line = 0;
    for q in 0..steps {
        for _ in 0..per_step {
            if line < lines {
                _mm_prefetch::<_MM_HINT_T1>(pf.as_ptr().wrapping_add(line * 16) as *const i8);
                line += 1;
            }
        }
        // SAFETY: q < steps and the panel holds steps · NR words, xt steps · MR (asserted by
        // the caller).
        unsafe {
            let w = wp.add(q * NR);
            let wv: [__m512bh; 3] = [
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(w.cast())),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(w.add(16).cast())),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(w.add(32).cast())),
            ];
            let x = xp.add(q * MR);
            for (r, a) in acc.iter_mut().enumerate() {
                let xv =
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*x.add(r) as i32));
                for v in 0..3 {
                    a[v] = _mm512_dpbf16_ps(a[v], xv, wv[v]);
                }
            }
        }
    }
    // SAFETY: as in `tile_avx512`.
    unsafe { store_rows(&acc, cols, dst, at, on) };
}

/// Whether generation packs at all: on an AVX-512 CPU, unless `RLHF_DECODE_PACK=0` (to save
/// the copies' memory, or to compare).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        super::has_avx512() && std::env::var("RLHF_DECODE_PACK").map_or(true, |v| v != "0")
    })
}

/// A packed weight's data address, `n`, `k`, whether it is stored `[k, n]`, and whether its
/// panels are BF16.
type Key = (usize, usize, usize, bool, bool);

/// The packed copies of one thread's open [`pack_scope`]s.
#[derive(Default)]
struct Scope {
    /// Open scopes (they nest).
    depth: usize,
    /// Bytes the scope may still pack: a quarter of the memory available when it opened.
    budget: usize,
    /// By the weight's data address and shape; the tensor is kept so that its storage
    /// outlives the entry and no other tensor can take its address inside the scope.
    packed: HashMap<Key, (Tensor, Arc<PackedNt>)>,
    /// Weights packed on this thread so far, over every scope.
    total: usize,
}

thread_local! {
    static SCOPE: RefCell<Scope> = RefCell::new(Scope::default());
}

/// Of the memory available when a scope opens, the share its packed copies may take.
const BUDGET_SHARE: f64 = 0.25;

/// While the returned guard lives, products on this thread with [`PACK_MIN_ROWS`] to
/// [`PACK_MAX_ROWS`] rows pack each weight once and reuse it (see the module). The copies take
/// as much memory again as the weights they pack (the LM head and every linear layer), at most
/// a quarter of what is available when the scope opens; weights past that keep their old
/// kernels. Guards nest; the copies are dropped with the outermost. Weights must not change
/// inside the scope (generation only reads them).
#[must_use = "the scope ends when the guard is dropped"]
pub fn pack_scope() -> PackScope {
    let gib = crate::sysmem::available_memory_gib().unwrap_or(4.0);
    pack_scope_within((gib * BUDGET_SHARE * (1u64 << 30) as f64) as usize)
}

/// [`pack_scope`] with its packed copies bounded by `bytes` (when it is the outermost).
#[must_use = "the scope ends when the guard is dropped"]
pub fn pack_scope_within(bytes: usize) -> PackScope {
    SCOPE.with(|s| {
        let mut s = s.borrow_mut();
        if s.depth == 0 {
            s.budget = bytes;
        }
        s.depth += 1;
    });
    PackScope(std::marker::PhantomData)
}

/// The scope of [`pack_scope`].
pub struct PackScope(std::marker::PhantomData<*const ()>);

impl Drop for PackScope {
    fn drop(&mut self) {
        SCOPE.with(|s| {
            let mut s = s.borrow_mut();
            s.depth -= 1;
            if s.depth == 0 {
                s.packed.clear();
            }
        });
    }
}

/// Weights packed on this thread so far, over all its scopes (for tests).
pub fn weights_packed() -> usize {
    SCOPE.with(|s| s.borrow().total)
}

/// Weights packed in this thread's open scope, and their bytes (for tests and reports).
pub fn packed_in_scope() -> (usize, usize) {
    SCOPE.with(|s| {
        let s = s.borrow();
        let bytes = s.packed.values().map(|(_, p)| p.bytes()).sum();
        (s.packed.len(), bytes)
    })
}

/// Whether a product of `rows` rows takes a packed weight on this thread now: a scope is open,
/// packing is [`enabled`], and `rows` lies in [`PACK_MIN_ROWS`]`..=`[`PACK_MAX_ROWS`], or, for
/// products in BF16, `1..=`[`PACK_MAX_ROWS`]: BF16 panels are half the bytes of the weight, so
/// even one row's decoding, bound by streaming the weights, runs about twice as fast on them
/// (SmolLM2's decoding products, `speed -- decode`, Zen 5: 10.2 → 4.6 ms at 1 row, 11.2 → 5.6
/// at 8), and the pass that packs them (64–77 ms) is paid back within about 15 tokens. A linear
/// layer asks before fusing its product with the next op, which packed products skip
/// ([`crate::linear::Linear`]'s `plain_fused`).
pub fn takes(rows: usize) -> bool {
    let min = match bf16_products() {
        true => 1,
        false => PACK_MIN_ROWS,
    };
    (min..=PACK_MAX_ROWS).contains(&rows) && SCOPE.with(|s| s.borrow().depth) > 0 && enabled()
}

/// Whether packed products run in BF16: with `--matmul bf16` ([`super::gemm::MatmulPrecision`]),
/// as the GEMM's do, where AVX512-BF16 runs them (AMD Zen 4 and later, Intel Cooper Lake and
/// later).
fn bf16_products() -> bool {
    super::gemm::matmul_precision() == super::gemm::MatmulPrecision::Bf16
        && super::bf16::dot_available()
}

/// `x [..., k] · W → [..., n]` on `W` packed in the open [`pack_scope`], W stored `[k, n]`
/// (`transposed`) or `[n, k]`; `None` where that path does not apply: not [`takes`] for the
/// rows, a graph to record, not contiguous f32 on the CPU, or the scope's budget spent.
pub fn product(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Option<Tensor>> {
    let (m, k) = super::matmul::rows_k(x.dims())?;
    if !takes(m)
        || x.track_op()
        || w.track_op()
        || !super::fusable(&[x, w])
        || w.rank() != 2
        || !w.is_contiguous()
    {
        return Ok(None);
    }
    let (n, k2) = match w.dims2()? {
        (a, b) if transposed => (b, a),
        (a, b) => (a, b),
    };
    if k != k2 {
        return Ok(None);
    }
    let bf16 = bf16_products();
    let key = {
        let (s, l) = w.storage_and_layout();
        let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*s else {
            return Ok(None);
        };
        (
            v.as_ptr() as usize + 4 * l.start_offset(),
            n,
            k,
            transposed,
            bf16,
        )
    };
    let cached = SCOPE.with(|s| s.borrow().packed.get(&key).map(|(_, p)| p.clone()));
    let packed = match cached {
        Some(p) => p,
        None => {
            let steps = if bf16 { k.div_ceil(2) } else { k };
            let bytes = n.div_ceil(NR) * NR * steps * 4;
            if SCOPE.with(|s| s.borrow().budget) < bytes {
                return Ok(None);
            }
            let p = super::with_f32(&[w], |s| match bf16 {
                true => PackedNt::pack_bf16(s[0], n, k, transposed),
                false => PackedNt::pack_as(s[0], n, k, transposed),
            })?;
            let p = Arc::new(p);
            SCOPE.with(|s| {
                let mut s = s.borrow_mut();
                s.budget -= bytes;
                s.total += 1;
                s.packed.insert(key, (w.clone(), p.clone()))
            });
            p
        }
    };
    let x = x.contiguous()?;
    let mut o = super::uninit(m * n);
    super::with_f32(&[&x], |s| packed.matmul(s[0], m, &mut o))?;
    Ok(Some(Tensor::from_vec(
        o,
        super::matmul::with_last(x.dims(), n),
        x.device(),
    )?))
}
