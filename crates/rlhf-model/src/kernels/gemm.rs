//! The GEMM entry point for kernels that multiply raw slices: the `gemm` crate (the GEMM
//! candle itself uses; built here with its AVX-512 micro-kernels, dispatched at run time);
//! few-row products (decoding) stream the weight instead ([`small_rows`]).

/// A strided matrix view: element (r, c) is at `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// The view of `data` with element (r, c) at `data[r * rs + c * cs]`.
pub(crate) fn mat(data: &[f32], rs: usize, cs: usize) -> Mat<'_> {
    Mat { data, rs, cs }
}

/// The precision of the products [`sgemm`] and [`sgemm_serial`] compute (process-wide; this
/// includes the attention kernel's blocked products, as `torch.autocast(bfloat16)` runs
/// attention in BF16 too). Decoding's few-row products, and attention over a few queries, are
/// always f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 inputs and sums (the default).
    #[default]
    F32,
    /// Inputs rounded to BF16, sums in f32 ([`super::bf16`]): mixed precision, as
    /// `torch.autocast(bfloat16)` does for matmuls. Needs a CPU with Intel AMX-BF16 or
    /// AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and later).
    Bf16,
}

impl MatmulPrecision {
    /// The name `--matmul` and `RLHF_MATMUL` take: `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(MatmulPrecision::F32),
            "bf16" => Ok(MatmulPrecision::Bf16),
            _ => Err(format!("unknown matmul precision {s:?} (f32 or bf16)")),
        }
    }
}

static BF16: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set the precision of every later [`sgemm`]. Asking for BF16 where the CPU has neither BF16
/// unit is an error, and the precision stays as it was.
pub fn set_matmul_precision(p: MatmulPrecision) -> Result<(), String> {
    if p == MatmulPrecision::Bf16 && !super::bf16::available() {
        return Err(
            "BF16 matmuls need Intel AMX-BF16 (Xeon Sapphire Rapids or later, with a \
                    Linux kernel that grants it) or AVX512-BF16 (AMD Zen 4 or later, Intel \
                    Cooper Lake or later); this CPU has neither"
                .into(),
        );
    }
    BF16.store(
        p == MatmulPrecision::Bf16,
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(())
}

/// The precision set by [`set_matmul_precision`].
pub fn matmul_precision() -> MatmulPrecision {
    if BF16.load(std::sync::atomic::Ordering::Relaxed) {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    }
}

/// `c[m×n]` (row-major, contiguous) = `(accumulate ? c : 0) + a[m×k] · b[k×n]`.
pub fn sgemm(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], accumulate: bool) {
    sgemm_impl(m, n, k, a, b, c, accumulate, true)
}

/// [`sgemm`] on the calling thread only (for kernels that are already parallel outside).
pub fn sgemm_serial(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], accumulate: bool) {
    sgemm_impl(m, n, k, a, b, c, accumulate, false)
}

#[allow(clippy::too_many_arguments)]
fn sgemm_impl(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let span = |x: &Mat, r: usize, cc: usize| (r - 1) * x.rs + (cc - 1) * x.cs + 1;
    if k > 0 {
        assert!(a.data.len() >= span(&a, m, k) && b.data.len() >= span(&b, k, n));
    }
    if parallel && m <= SMALL_ROWS && k > 0 && a.cs == 1 && b.cs == 1 {
        return small_rows(m, n, k, a, b, c, accumulate);
    }
    if k > 0 && BF16.load(std::sync::atomic::Ordering::Relaxed) {
        let unit = super::bf16::best();
        return super::bf16::sgemm_bf16_on(unit, parallel, m, n, k, a, b, c, accumulate);
    }
    if transpose_b_first(m, n, k, &b) {
        // A column-major `b` with few columns: the crate's product through it runs at 166–208
        // GFLOP/s where the same product through a row-major `b` runs at 208–230 (two
        // threads, m = 1024; `-- gemm` and session 12's BENCHMARKS row). Transposing `b`
        // (k·n floats, against 2·m·n·k flops) first wins that back (the same bits, in every
        // product measured: the crate packs `b` either way).
        let mut bt = super::uninit(k * n);
        transpose(b.data, b.cs, n, k, &mut bt, parallel);
        let b = Mat {
            data: &bt,
            rs: n,
            cs: 1,
        };
        return sgemm_impl(m, n, k, a, b, c, accumulate, parallel);
    }
    let par = if parallel && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the bounds of every operand were checked above; `c` is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Whether [`sgemm_impl`] copies a column-major `b` into row-major order before the f32
/// product: enough rows of `a` to pay for the copy, few columns (up to 640: the products
/// measured with more ran as fast either way), and a `b` of at least 1 MiB (smaller ones, as
/// in the d = 256 models' steps, gained nothing measurable inside the step).
fn transpose_b_first(m: usize, n: usize, k: usize, b: &Mat) -> bool {
    b.rs == 1 && b.cs != 1 && m >= 256 && n <= 640 && k * n >= 1 << 18
}

/// `dst [cols × rows]` (row-major) = the transpose of `src`'s `rows` rows of `cols` floats,
/// row `r` starting at `r · ss`. Panels of 32 destination rows are the parallel tasks; inside,
/// 8 × 8 blocks go through registers.
pub fn transpose(
    src: &[f32],
    ss: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    parallel: bool,
) {
    use rayon::prelude::*;
    assert!(dst.len() >= rows * cols);
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(src.len() >= (rows - 1) * ss + cols);
    const PANEL: usize = 32;
    let panel = |(pi, d): (usize, &mut [f32])| {
        let c0 = pi * PANEL;
        transpose_panel(src, ss, rows, c0, (c0 + PANEL).min(cols), d)
    };
    let dst = &mut dst[..rows * cols];
    if parallel {
        dst.par_chunks_mut(PANEL * rows).enumerate().for_each(panel);
    } else {
        dst.chunks_mut(PANEL * rows).enumerate().for_each(panel);
    }
}

/// Columns `c0..c1` of `src` as rows of `d` (`[c1 − c0, rows]`).
fn transpose_panel(src: &[f32], ss: usize, rows: usize, c0: usize, c1: usize, d: &mut [f32]) {
    let mut r = 0;
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        while r + 8 <= rows {
            let mut c = c0;
            while c + 8 <= c1 {
                let s = &src[r * ss + c..];
                let o = (c - c0) * rows + r;
                // SAFETY: AVX2 is present; the block's 8 rows of 8 floats lie inside `src`
                // (row r + 7 starts at (r + 7)·ss + c, and c + 8 ≤ cols), its 8 rows of 8
                // floats inside `d` (row c − c0 + 7 of `rows` floats, r + 8 ≤ rows).
                unsafe {
                    assert!(7 * ss + 8 <= s.len() && o + 7 * rows + 8 <= d.len());
                    t8x8(s.as_ptr(), ss, d.as_mut_ptr().add(o), rows)
                };
                c += 8;
            }
            for c in c..c1 {
                for i in r..r + 8 {
                    d[(c - c0) * rows + i] = src[i * ss + c];
                }
            }
            r += 8;
        }
    }
    for c in c0..c1 {
        for i in r..rows {
            d[(c - c0) * rows + i] = src[i * ss + c];
        }
    }
}

/// One 8 × 8 block: rows of `s` (stride `ss`) to columns of `d` (stride `ds`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2")]
unsafe fn t8x8(s: *const f32, ss: usize, d: *mut f32, ds: usize) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): the caller checked that 8 rows of 8 floats lie at `s` and at `d`.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(s.add(i * ss)));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let o = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, v) in o.iter().enumerate() {
            _mm256_storeu_ps(d.add(i * ds), *v);
        }
    }
}

/// At most this many rows of `a` take [`small_rows`] (decoding: one row per sequence, as
/// [`super::matmul::SMALL_M`]). At 64 rows it ran SmolLM2's decoding products with [k, n]
/// weights in 76–82 ms against the GEMM's 99; at 128 both took 150–155.
pub const SMALL_ROWS: usize = 64;

/// At most this many columns of `c` per parallel task in [`small_rows`] (its block of `c`
/// stays in L2 while the task's rows of `b` stream through).
const MAX_COLS_PER_TASK: usize = 4096;

/// The longest stretch of the inner dimension that [`small_rows`] sums as one running sum
/// (SmolLM2's decoding products, k = 576 or 1536, are one stretch); a longer one, such as the
/// LM head's backward over the vocabulary, goes in stretches of this, each summed apart.
const K_BLOCK: usize = 4096;

/// `c = (acc ? c : 0) + a · b` for few rows of `a` with row-major `a` and `b`: every row of `b`
/// is streamed once and multiplied into all rows of `c` with broadcast FMAs — no packing of `b`
/// (which the GEMM would do once per call, i.e. once per generated token) and no reductions.
fn small_rows(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], accumulate: bool) {
    use rayon::prelude::*;
    let tasks = n
        .div_ceil(MAX_COLS_PER_TASK)
        .max(rayon::current_num_threads())
        .min(n.div_ceil(64));
    let per = n.div_ceil(tasks).div_ceil(64) * 64;
    let tasks = n.div_ceil(per);
    let blocks: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let (j0, j1) = (t * per, ((t + 1) * per).min(n));
            let mut o = vec![0.0f32; m * (j1 - j0)];
            if k <= K_BLOCK {
                rows_block(a.data, a.rs, b.data, b.rs, m, k, j0, j1, &mut o);
                return o;
            }
            // A long inner dimension (the LM head's backward: k = vocabulary) in blocks, each
            // summed apart and then added: one running sum over 10⁵ terms loses ~10⁻⁴.
            let mut part = vec![0.0f32; o.len()];
            for k0 in (0..k).step_by(K_BLOCK) {
                let kn = (k - k0).min(K_BLOCK);
                part.fill(0.0);
                let (ak, bk) = (&a.data[k0..], &b.data[k0 * b.rs..]);
                rows_block(ak, a.rs, bk, b.rs, m, kn, j0, j1, &mut part);
                o.iter_mut().zip(&part).for_each(|(o, p)| *o += p);
            }
            o
        })
        .collect();
    for (t, o) in blocks.iter().enumerate() {
        let j0 = t * per;
        let w = o.len() / m;
        for r in 0..m {
            let (dst, src) = (&mut c[r * n + j0..r * n + j0 + w], &o[r * w..(r + 1) * w]);
            if accumulate {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

/// Columns `j0..j1` of `a · b` into `o` ([m, j1 − j0]).
#[allow(clippy::too_many_arguments)]
fn rows_block(
    a: &[f32],
    ars: usize,
    b: &[f32],
    brs: usize,
    m: usize,
    k: usize,
    j0: usize,
    j1: usize,
    o: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512() {
        // SAFETY: the CPU has AVX-512F; bounds were checked by `sgemm`.
        return unsafe { rows_block_avx512(a, ars, b, brs, m, k, j0, j1, o) };
    }
    let w = j1 - j0;
    for r in 0..m {
        let or = &mut o[r * w..(r + 1) * w];
        for cc in 0..k {
            let x = a[r * ars + cc];
            let br = &b[cc * brs + j0..cc * brs + j1];
            or.iter_mut().zip(br).for_each(|(d, &v)| *d += x * v);
        }
    }
}

/// Rows of `b` per sweep: a sweep reads `KC` rows of `b` as `KC` sequential streams (which the
/// hardware prefetcher follows), once per group of 4 rows of `a` (from L2 after the first).
const KC: usize = 16;

/// 4 rows × 64 columns per register tile (16 accumulators, loaded from and stored to `o`
/// once per sweep); column tails use masked lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_block_avx512(
    a: &[f32],
    ars: usize,
    b: &[f32],
    brs: usize,
    m: usize,
    k: usize,
    j0: usize,
    j1: usize,
    o: &mut [f32],
) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    let w = j1 - j0;
    let passes = m.div_ceil(4);
    for k0 in (0..k).step_by(KC) {
        let kn = (k - k0).min(KC);
        // The next sweep's rows of `b` are prefetched into L2 while this one runs, split over
        // its passes (rows `pass·KC/passes..`) and tiles (each tile's columns).
        let next = (k0 + KC)..(k0 + 2 * KC).min(k);
        let mut r0 = 0;
        while r0 < m {
            let rows = (m - r0).min(4);
            let pass = r0 / 4;
            let pf_rows = (next.start + pass * KC / passes).min(next.end)
                ..(next.start + (pass + 1) * KC / passes).min(next.end);
            let mut jc = j0;
            while jc < j1 {
                let cols = (j1 - jc).min(64);
                for kr in pf_rows.clone() {
                    for c in (jc..jc + cols).step_by(16) {
                        let p = b.as_ptr().wrapping_add(kr * brs + c) as *const i8;
                        // Prefetches never fault.
                        _mm_prefetch::<_MM_HINT_T1>(p);
                    }
                }
                let t = Tile {
                    r0,
                    k0,
                    kn,
                    jc,
                    cols,
                    ow: w,
                    oc: jc - j0,
                };
                // SAFETY: AVX-512F enabled; `tile_avx512` checks its bounds.
                unsafe {
                    match rows {
                        4 => tile_avx512::<4>(a, ars, b, brs, t, o),
                        3 => tile_avx512::<3>(a, ars, b, brs, t, o),
                        2 => tile_avx512::<2>(a, ars, b, brs, t, o),
                        _ => tile_avx512::<1>(a, ars, b, brs, t, o),
                    }
                }
                jc += cols;
            }
            r0 += rows;
        }
    }
}

/// Rows `r0..r0+R` of `a`, rows `k0..k0+kn` of `b`, columns `jc..jc+cols` (at `oc` in `o`,
/// whose rows are `ow` apart).
#[derive(Clone, Copy)]
struct Tile {
    r0: usize,
    k0: usize,
    kn: usize,
    jc: usize,
    cols: usize,
    ow: usize,
    oc: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_avx512<const R: usize>(
    a: &[f32],
    ars: usize,
    b: &[f32],
    brs: usize,
    t: Tile,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut masks = [0u16; 4];
    for (v, mk) in masks.iter_mut().enumerate() {
        let lanes = t.cols.saturating_sub(16 * v).min(16);
        *mk = if lanes == 16 {
            0xffff
        } else {
            (1u16 << lanes) - 1
        };
    }
    let kend = t.k0 + t.kn;
    assert!((t.r0 + R - 1) * ars + kend <= a.len());
    assert!((kend - 1) * brs + t.jc + t.cols <= b.len());
    assert!((t.r0 + R - 1) * t.ow + t.oc + t.cols <= o.len());
    let (ap, bp, op) = (a.as_ptr(), b.as_ptr(), o.as_mut_ptr());
    let at = |r: usize, v: usize| op.wrapping_add((t.r0 + r) * t.ow + t.oc + 16 * v);
    let mut acc = [_mm512_setzero_ps(); 16];
    for r in 0..R {
        for v in 0..4 {
            // SAFETY: in bounds by the asserts above; masked lanes are not read.
            acc[4 * r + v] = unsafe { _mm512_maskz_loadu_ps(masks[v], at(r, v)) };
        }
    }
    for cc in t.k0..kend {
        // SAFETY: in bounds by the asserts above; masked lanes are not read.
        unsafe {
            let row = bp.add(cc * brs + t.jc);
            let bv = [
                _mm512_maskz_loadu_ps(masks[0], row),
                _mm512_maskz_loadu_ps(masks[1], row.wrapping_add(16)),
                _mm512_maskz_loadu_ps(masks[2], row.wrapping_add(32)),
                _mm512_maskz_loadu_ps(masks[3], row.wrapping_add(48)),
            ];
            for r in 0..R {
                let x = _mm512_set1_ps(*ap.add((t.r0 + r) * ars + cc));
                for v in 0..4 {
                    acc[4 * r + v] = _mm512_fmadd_ps(x, bv[v], acc[4 * r + v]);
                }
            }
        }
    }
    for r in 0..R {
        for v in 0..4 {
            // SAFETY: in bounds by the asserts above; masked lanes are not written.
            unsafe { _mm512_mask_storeu_ps(at(r, v), masks[v], acc[4 * r + v]) };
        }
    }
}
