//! Matrix products in BF16, accumulated in f32: the opt-in mixed-precision path of
//! [`super::gemm::sgemm`] (see [`super::gemm::MatmulPrecision`]). Two units run them:
//!
//! - **Intel AMX** (Xeon Sapphire Rapids and later): 16 × 16 tile products (`tdpbf16ps`).
//! - **AVX512-BF16's dot product** (AMD Zen 4 and later, Intel Cooper Lake and later):
//!   `vdpbf16ps` multiplies 16 pairs of BF16 values per 512-bit register and adds each pair's
//!   two products to an f32 lane — twice the multiply-adds of an f32 FMA per instruction.
//!
//! [`unit()`] picks AMX where the CPU and kernel grant it, else the dot product; [`set_unit`] (or
//! `RLHF_BF16_UNIT`) chooses one.
//!
//! Operands stay f32 everywhere else (weights, activations, gradients, AdamW state); each product
//! rounds its two inputs to BF16 (round to nearest even) while packing them, and the unit
//! accumulates in f32. This is the numeric recipe of `torch.autocast(bfloat16)` for matmuls,
//! with one difference: the output stays f32 rather than being rounded to BF16.
//!
//! Both units read one packed layout. `c` goes in blocks of 32 × 32; `a` is packed as 16 × 32
//! BF16 tiles (row tiles × k tiles, each tile one contiguous KiB); `b` the same way in the
//! pair-interleaved ("VNNI") layout: row `p` of a `b` tile holds, for 16 columns, the pairs
//! (k = 2p, k = 2p + 1). That is AMX's tile format, and also exactly what `vdpbf16ps` takes: one
//! line of a `b` tile is one register of 16 column pairs, and one pair of an `a` row is the
//! 32-bit value it broadcasts. Edges are zero-padded, so every tile is full. Rayon tasks take a
//! group of 32-row blocks × a group of 32-column blocks of `c` (the group's packed columns of `b`
//! fit in L2). On AMX the tile registers are configured at the start of each task and released
//! at its end. Only x86-64 has either unit: elsewhere [`available`] is false and nothing here
//! runs.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use super::gemm::Mat;
#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;

/// One 64-byte line of a tile: 32 BF16 values (the alignment keeps tile loads on cache lines).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

const ZERO_LINE: Line = Line([0; 32]);
/// Lines per tile (16 rows of 64 bytes).
const TILE: usize = 16;

/// A unit that runs the BF16 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Intel AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX512-BF16's `vdpbf16ps` in 512-bit registers.
    AvxDot,
}

impl Unit {
    /// How `--matmul bf16` reports it.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Amx => "Intel AMX",
            Unit::AvxDot => "AVX512-BF16",
        }
    }
}

/// The units this CPU and kernel run, fastest first (AMX, then the dot product).
pub fn units() -> &'static [Unit] {
    static UNITS: std::sync::OnceLock<Vec<Unit>> = std::sync::OnceLock::new();
    UNITS.get_or_init(|| {
        let mut u = vec![];
        if amx_granted() {
            u.push(Unit::Amx);
        }
        if dot_available() {
            u.push(Unit::AvxDot);
        }
        u
    })
}

impl std::str::FromStr for Unit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "amx" => Ok(Unit::Amx),
            "avx512" | "avx512bf16" | "avx512-bf16" => Ok(Unit::AvxDot),
            _ => Err(format!("unknown BF16 unit {s:?} (amx or avx512)")),
        }
    }
}

/// The unit chosen with [`set_unit`]: 0 for none (the fastest), else 1 + its place in
/// [`Unit`]'s order.
static CHOSEN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Choose the unit of every later BF16 product (process-wide): one of [`units`], to compare
/// them or to run the dot product where AMX is granted; `None` for the fastest (the default).
/// `RLHF_BF16_UNIT=amx|avx512` sets it at start-up ([`super::init_cpu_runtime`]). A unit this
/// CPU lacks is an error, and the choice stays as it was.
pub fn set_unit(u: Option<Unit>) -> Result<(), String> {
    let code = match u {
        None => 0,
        Some(u) if !units().contains(&u) => {
            return Err(format!("{} is not available on this CPU", u.name()))
        }
        Some(Unit::Amx) => 1,
        Some(Unit::AvxDot) => 2,
    };
    CHOSEN.store(code, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The unit [`sgemm_bf16`] uses: the one chosen with [`set_unit`], else the fastest of
/// [`units`].
pub fn unit() -> Option<Unit> {
    match CHOSEN.load(std::sync::atomic::Ordering::Relaxed) {
        1 => Some(Unit::Amx),
        2 => Some(Unit::AvxDot),
        _ => units().first().copied(),
    }
}

/// Whether BF16 products can run here at all (on either unit).
pub fn available() -> bool {
    unit().is_some()
}

/// Whether AVX512-BF16's `vdpbf16ps` runs here (decoding's packed BF16 tiles need it).
#[cfg(target_arch = "x86_64")]
pub(crate) fn dot_available() -> bool {
    super::has_avx512() && is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn dot_available() -> bool {
    false
}

/// Whether this CPU and kernel run AMX-BF16: the CPUID bits, and the kernel's permission for
/// the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked once per process).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_granted() -> bool {
    use std::arch::x86_64::__cpuid_count;
    if __cpuid_count(0, 0).eax < 7 {
        return false;
    }
    let l7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (l7.edx >> 22 & 1 == 1, l7.edx >> 24 & 1 == 1);
    if !(amx_bf16 && amx_tile && dot_available()) {
        return false;
    }
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call; it only changes which register state this process may use.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn amx_granted() -> bool {
    false
}

/// f32 → BF16, rounding to nearest even; NaN stays a (quiet) NaN. (The vector packing uses
/// `vcvtne2ps2bf16`, which rounds the same way but also flushes f32 denormals to zero.)
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The value a BF16 product sees for `x` (for references in tests).
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// Row tile of `a` (rows `r0..r0 + 16`, the k tiles `ts`) into `out` (all `kt` tiles of 16
/// lines): line `r` of k tile `t` holds `a[r0 + r, 32t .. 32t + 32]`, rows past `m` and columns
/// past `k` zero.
///
/// # Safety
/// The CPU has AVX-512F/BW and AVX512-BF16 (implied by every unit); `a` covers `m × k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_a_tile(
    a: Mat,
    m: usize,
    k: usize,
    r0: usize,
    ts: std::ops::Range<usize>,
    out: &mut [Line],
) {
    use std::arch::x86_64::*;
    let rows = 16.min(m.saturating_sub(r0));
    if rows == 0 {
        // A padding tile (m rounds up to 32 rows).
        out[ts.start * TILE..ts.end * TILE].fill(ZERO_LINE);
        return;
    }
    let inter = interleave_halves();
    for t in ts {
        let c0 = t * 32;
        let cn = 32.min(k - c0);
        let tile = &mut out[t * TILE..(t + 1) * TILE];
        tile[rows..].fill(ZERO_LINE);
        if a.cs == 1 {
            // Row-major: each line is 32 consecutive values of one row.
            let (m0, m1) = (mask16(cn), mask16(cn.saturating_sub(16)));
            for (r, line) in tile[..rows].iter_mut().enumerate() {
                let base = (r0 + r) * a.rs + c0;
                assert!(base + cn <= a.data.len());
                // SAFETY: the masked loads read only `a.data[base..base + cn]` (checked).
                unsafe {
                    let p = a.data.as_ptr().add(base);
                    let lo = _mm512_maskz_loadu_ps(m0, p);
                    let hi = _mm512_maskz_loadu_ps(m1, p.add(16));
                    let v = _mm512_cvtne2ps_pbh(hi, lo);
                    _mm512_store_si512(
                        line.0.as_mut_ptr().cast(),
                        std::mem::transmute::<__m512bh, __m512i>(v),
                    );
                }
            }
        } else if a.rs == 1 {
            // Column-major (a transposed view): for each pair of columns, 16 rows of each
            // (contiguous), rounded and interleaved into one u32 per row; then a 16 × 16 u32
            // transpose puts pair `q` of row `r` in slot `q` of line `r`.
            let mr = mask16(rows);
            let mut v = [_mm512_setzero_si512(); 16];
            for (q, vq) in v.iter_mut().enumerate() {
                let col = |c: usize| {
                    if c >= cn {
                        return _mm512_setzero_ps();
                    }
                    let base = r0 + (c0 + c) * a.cs;
                    assert!(base + rows <= a.data.len());
                    // SAFETY: the masked load reads only `a.data[base..base + rows]` (checked).
                    unsafe { _mm512_maskz_loadu_ps(mr, a.data.as_ptr().add(base)) }
                };
                let (x0, x1) = (col(2 * q), col(2 * q + 1));
                let pair = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(x1, x0));
                *vq = _mm512_permutexvar_epi16(inter, pair);
            }
            transpose16(&mut v);
            for (line, vr) in tile[..rows].iter_mut().zip(&v) {
                // SAFETY: an aligned store into the 64-byte line.
                unsafe { _mm512_store_si512(line.0.as_mut_ptr().cast(), *vr) };
            }
        } else {
            // Any other strides: element by element.
            for (r, line) in tile[..rows].iter_mut().enumerate() {
                let base = (r0 + r) * a.rs + c0 * a.cs;
                for c in 0..32 {
                    line.0[c] = if c < cn {
                        bf16_bits(a.data[base + c * a.cs])
                    } else {
                        0
                    };
                }
            }
        }
    }
}

/// `vpermw` indices interleaving the two 16-lane halves: [lo0, hi0, lo1, hi1, …].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn interleave_halves() -> std::arch::x86_64::__m512i {
    let idx: [u16; 32] = std::array::from_fn(|i| (i / 2 + 16 * (i % 2)) as u16);
    // SAFETY: an unaligned load of a local array.
    unsafe { std::arch::x86_64::_mm512_loadu_si512(idx.as_ptr().cast()) }
}

/// `n` ones from the bottom (n ≤ 16 used; more saturates).
#[inline(always)]
fn mask16(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// Column tile of `b` (columns `c0..c0 + 16`, the k tiles `ts`) into `out` (all k tiles) in the
/// pair-interleaved layout: line `p` of k tile `t` holds `(b[32t + 2p, c], b[32t + 2p + 1, c])`
/// for c in 0..16.
///
/// # Safety
/// As [`pack_a_tile`]; `b` covers `k × n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_b_tile(
    b: Mat,
    k: usize,
    n: usize,
    c0: usize,
    ts: std::ops::Range<usize>,
    out: &mut [Line],
) {
    use std::arch::x86_64::*;
    if c0 >= n {
        // A padding tile (n rounds up to 32 columns).
        out[ts.start * TILE..ts.end * TILE].fill(ZERO_LINE);
        return;
    }
    let cn = 16.min(n - c0);
    let inter = interleave_halves();
    for t in ts {
        let tile = &mut out[t * TILE..(t + 1) * TILE];
        if b.cs == 1 {
            // Row-major: rows 2p and 2p + 1, 16 columns each, interleaved.
            let m0 = mask16(cn);
            for (p, line) in tile.iter_mut().enumerate() {
                let row = t * 32 + 2 * p;
                let load = |r: usize| {
                    if r >= k {
                        return _mm512_setzero_ps();
                    }
                    let base = r * b.rs + c0;
                    assert!(base + cn <= b.data.len());
                    // SAFETY: the masked load reads only `b.data[base..base + cn]` (checked).
                    unsafe { _mm512_maskz_loadu_ps(m0, b.data.as_ptr().add(base)) }
                };
                let (r0, r1) = (load(row), load(row + 1));
                // SAFETY: register-only ops and an aligned store into the 64-byte line.
                unsafe {
                    let v: __m512i =
                        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(r1, r0));
                    let v = _mm512_permutexvar_epi16(inter, v);
                    _mm512_store_si512(line.0.as_mut_ptr().cast(), v);
                }
            }
        } else {
            // Strided columns (a transposed view).
            let kn = 32.min(k - t * 32);
            if b.rs == 1 {
                // Column-major: each column's 32 k values at once (contiguous), rounded into 16
                // pairs; a 16 × 16 u32 transpose puts pair `p` of column `c` in slot `c` of
                // line `p`.
                let (m0, m1) = (mask16(kn), mask16(kn.saturating_sub(16)));
                let mut v = [_mm512_setzero_si512(); 16];
                for (c, vc) in v[..cn].iter_mut().enumerate() {
                    let base = t * 32 + (c0 + c) * b.cs;
                    assert!(base + kn <= b.data.len());
                    // SAFETY: the masked loads read only `b.data[base..base + kn]` (checked).
                    let (lo, hi) = unsafe {
                        let p = b.data.as_ptr().add(base);
                        (
                            _mm512_maskz_loadu_ps(m0, p),
                            _mm512_maskz_loadu_ps(m1, p.add(16)),
                        )
                    };
                    *vc = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                }
                transpose16(&mut v);
                for (line, vp) in tile.iter_mut().zip(&v) {
                    // SAFETY: an aligned store into the 64-byte line.
                    unsafe { _mm512_store_si512(line.0.as_mut_ptr().cast(), *vp) };
                }
            } else {
                // Any other strides: element by element.
                tile.fill(ZERO_LINE);
                for c in 0..cn {
                    for (p, line) in tile.iter_mut().enumerate() {
                        for s in 0..2 {
                            let r = t * 32 + 2 * p + s;
                            if r < k {
                                line.0[2 * c + s] = bf16_bits(b.data[r * b.rs + (c0 + c) * b.cs]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Transpose a 16 × 16 matrix of u32 held as 16 rows: afterwards `m[c]` is column `c`.
/// (32-bit then 64-bit interleaves within 128-bit lanes, then two rounds of lane shuffles.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(m: &mut [std::arch::x86_64::__m512i; 16]) {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(m[2 * i], m[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(m[2 * i], m[2 * i + 1]);
    }
    // m[4i + j], lane L: column 4L + j of rows 4i..4i + 4.
    for i in 0..4 {
        m[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        m[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        m[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        m[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for i in 0..2 {
        for j in 0..4 {
            t[8 * i + j] = _mm512_shuffle_i32x4::<0x88>(m[8 * i + j], m[8 * i + 4 + j]);
            t[8 * i + 4 + j] = _mm512_shuffle_i32x4::<0xdd>(m[8 * i + j], m[8 * i + 4 + j]);
        }
    }
    for j in 0..8 {
        m[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[8 + j]);
        m[8 + j] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[8 + j]);
    }
}

/// The tile configuration: palette 1, tiles 0–7 all 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn all_full() -> Self {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for i in 0..8 {
            c.colsb[i] = 64;
            c.rows[i] = 16;
        }
        c
    }
}

/// The 32 × 32 f32 block at `out` (rows `ld` floats apart) = (`accumulate` ? itself : 0) + the
/// product of two packed row tiles of `a` (`a0`, `a1`) and two packed column tiles of `b`
/// (`b0`, `b1`) over `kt` k tiles.
///
/// # Safety
/// AMX is available and the tile configuration of [`TileConfig::all_full`] is loaded on this
/// thread; each of `a0`, `a1`, `b0`, `b1` points to `kt ≥ 1` contiguous packed tiles; `out` is
/// valid for 32 rows of 32 floats, `ld` apart, that no one else accesses meanwhile.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn block_32x32(
    a0: *const Line,
    a1: *const Line,
    b0: *const Line,
    b1: *const Line,
    kt: usize,
    out: *mut f32,
    ld: usize,
    accumulate: bool,
) {
    debug_assert!(kt > 0);
    let os = ld * 4;
    // SAFETY: per the contract; the four 16 × 16 quadrants of `out` are read (when
    // accumulating) and written with a row stride of `ld` floats.
    unsafe {
        let (o0, o1, o2, o3) = (out, out.add(16), out.add(16 * ld), out.add(16 * ld + 16));
        if accumulate {
            std::arch::asm!(
                "tileloadd tmm0, [{o0} + {os}*1]",
                "tileloadd tmm1, [{o1} + {os}*1]",
                "tileloadd tmm2, [{o2} + {os}*1]",
                "tileloadd tmm3, [{o3} + {os}*1]",
                o0 = in(reg) o0, o1 = in(reg) o1, o2 = in(reg) o2, o3 = in(reg) o3,
                os = in(reg) os,
                options(nostack, readonly)
            );
        } else {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        std::arch::asm!(
            "2:",
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {s}*1]",
            // Bring the next k step's tiles of b, then of a, towards L1 while the
            // products run (the tile loads would otherwise wait on L2). Prefetches never
            // fault, so the last step's reach past the end of a panel is harmless.
            ".irp off, 1024, 1088, 1152, 1216, 1280, 1344, 1408, 1472, 1536, 1600, 1664, 1728, 1792, 1856, 1920, 1984",
            "prefetcht0 [{b0} + \\off]",
            "prefetcht0 [{b1} + \\off]",
            ".endr",
            "tdpbf16ps tmm2, tmm5, tmm6",
            ".irp off, 1024, 1088, 1152, 1216, 1280, 1344, 1408, 1472, 1536, 1600, 1664, 1728, 1792, 1856, 1920, 1984",
            "prefetcht0 [{a0} + \\off]",
            "prefetcht0 [{a1} + \\off]",
            ".endr",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {kt}",
            "jnz 2b",
            "tilestored [{o0} + {os}*1], tmm0",
            "tilestored [{o1} + {os}*1], tmm1",
            "tilestored [{o2} + {os}*1], tmm2",
            "tilestored [{o3} + {os}*1], tmm3",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            kt = inout(reg) kt => _,
            s = in(reg) 64usize,
            os = in(reg) os,
            o0 = in(reg) o0,
            o1 = in(reg) o1,
            o2 = in(reg) o2,
            o3 = in(reg) o3,
            options(nostack)
        );
    }
}

/// [`block_32x32`] on AVX512-BF16's `vdpbf16ps` instead of AMX (same operands, same block).
///
/// The block goes in four passes of 8 rows × 32 columns: 16 f32 accumulators (8 rows × two
/// registers of 16 columns). Per pair of k, the two registers of `b`'s line are loaded once and
/// each row's pair of `a` is broadcast from memory into its two dot products.
///
/// # Safety
/// The CPU has AVX-512F and AVX512-BF16; the pointers are as [`block_32x32`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block_32x32_dot(
    a0: *const Line,
    a1: *const Line,
    b0: *const Line,
    b1: *const Line,
    kt: usize,
    out: *mut f32,
    ld: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    for pass in 0..4 {
        // Rows 8·pass .. 8·pass + 8 of the block: lines 8·(pass % 2).. of a0's or a1's tiles.
        let a = if pass < 2 { a0 } else { a1 };
        let (r0, l0) = (8 * pass, 8 * (pass % 2));
        let mut acc = [_mm512_setzero_ps(); 16];
        if accumulate {
            for (r, pair) in acc.chunks_exact_mut(2).enumerate() {
                // SAFETY: row r0 + r of the 32 × 32 block at `out` (per the contract).
                unsafe {
                    let o = out.add((r0 + r) * ld);
                    pair[0] = _mm512_loadu_ps(o);
                    pair[1] = _mm512_loadu_ps(o.add(16));
                }
            }
        }
        for t in 0..kt {
            // SAFETY: k tile t < kt of each operand (per the contract); each line is 64
            // aligned bytes, so the loads of `b` are aligned and `a`'s pairs lie inside.
            unsafe {
                let at = a.add(t * TILE + l0).cast::<i32>();
                let (bt0, bt1) = (b0.add(t * TILE), b1.add(t * TILE));
                for p in 0..16 {
                    let v0: __m512bh = std::mem::transmute(_mm512_load_si512(bt0.add(p).cast()));
                    let v1: __m512bh = std::mem::transmute(_mm512_load_si512(bt1.add(p).cast()));
                    for (r, pair) in acc.chunks_exact_mut(2).enumerate() {
                        // Line r of the tile is 16 pairs (one i32 each) of row r.
                        let x: __m512bh =
                            std::mem::transmute(_mm512_set1_epi32(*at.add(r * 16 + p)));
                        pair[0] = _mm512_dpbf16_ps(pair[0], x, v0);
                        pair[1] = _mm512_dpbf16_ps(pair[1], x, v1);
                    }
                }
            }
        }
        for (r, pair) in acc.chunks_exact(2).enumerate() {
            // SAFETY: as for the loads above.
            unsafe {
                let o = out.add((r0 + r) * ld);
                _mm512_storeu_ps(o, pair[0]);
                _mm512_storeu_ps(o.add(16), pair[1]);
            }
        }
    }
}

/// `row` rounded to BF16 (to nearest even) as pairs, `out[q]` holding `row[2q]` in its low half
/// and `row[2q + 1]` (zero past the row) in its high half: `⌈row.len() / 2⌉` words.
pub(crate) fn to_pairs(row: &[f32], out: &mut [u32]) {
    let steps = row.len().div_ceil(2);
    assert!(out.len() >= steps);
    #[cfg(target_arch = "x86_64")]
    if dot_available() {
        // SAFETY: the CPU has AVX-512F/BW and AVX512-BF16; `out` holds the pairs (asserted).
        unsafe { to_pairs_avx512(row, out) };
        return;
    }
    for (o, pair) in out.iter_mut().zip(row.chunks(2)) {
        let hi = pair.get(1).map_or(0, |&v| bf16_bits(v) as u32);
        *o = bf16_bits(pair[0]) as u32 | hi << 16;
    }
}

/// [`to_pairs`] 32 values at a time: consecutive BF16 values are already the pairs' halves.
///
/// # Safety
/// The CPU has AVX-512F/BW and AVX512-BF16; `out` holds `⌈row.len() / 2⌉` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn to_pairs_avx512(row: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    let (k, rp, op) = (row.len(), row.as_ptr(), out.as_mut_ptr());
    for c0 in (0..k).step_by(32) {
        let cn = 32.min(k - c0);
        // SAFETY: the masked loads read row[c0..c0 + cn], the store writes its ⌈cn / 2⌉ pairs.
        unsafe {
            let lo = _mm512_maskz_loadu_ps(mask16(cn), rp.add(c0));
            let hi = _mm512_maskz_loadu_ps(mask16(cn.saturating_sub(16)), rp.add(c0 + 16));
            let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_mask_storeu_epi32(op.add(c0 / 2).cast(), mask16(cn.div_ceil(2)), v);
        }
    }
}

/// One panel of decoding's BF16 weights ([`super::packed::PackedNt::pack_bf16`]): columns
/// `j0..j0 + cols` (≤ [`NR`](super::packed::NR)) of `w` — stored `[n, k]`, or `[k, n]` when `transposed` — into `dst`
/// as `⌈k / 2⌉` lines of NR words, word `j` of line `q` holding the pair (k = 2q, k = 2q + 1)
/// of column `j0 + j` rounded to nearest even (`2q + 1` zero past `k`). Words past `cols` are
/// left as they are. False, with nothing written, where the CPU lacks AVX512-BF16.
pub(crate) fn pack_pairs_panel(
    w: &[f32],
    (n, k): (usize, usize),
    transposed: bool,
    (j0, cols): (usize, usize),
    dst: &mut [u32],
) -> bool {
    use super::packed::NR;
    assert!(w.len() >= n * k && j0 + cols <= n && cols <= NR);
    assert!(dst.len() >= k.div_ceil(2) * NR);
    #[cfg(target_arch = "x86_64")]
    if dot_available() {
        // SAFETY: the CPU has AVX-512F/BW and AVX512-BF16; the bounds are asserted above.
        unsafe { pairs_panel(w, (n, k), transposed, (j0, cols), dst) };
        return true;
    }
    false
}

/// [`pack_pairs_panel`] on AVX-512: an `[n, k]` weight converts 32 values of each of 16 rows
/// into 16 pairs at once and transposes the 16 × 16 words; a `[k, n]` one interleaves two rows
/// of 16 columns, as [`pack_b_tile`] does.
///
/// # Safety
/// The CPU has AVX-512F/BW and AVX512-BF16; the bounds are as [`pack_pairs_panel`] asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pairs_panel(
    w: &[f32],
    (n, k): (usize, usize),
    transposed: bool,
    (j0, cols): (usize, usize),
    dst: &mut [u32],
) {
    use super::packed::NR;
    use std::arch::x86_64::*;
    let steps = k.div_ceil(2);
    let (wp, dp) = (w.as_ptr(), dst.as_mut_ptr());
    if transposed {
        let inter = interleave_halves();
        for q in 0..steps {
            for jb in (0..cols).step_by(16) {
                let cn = 16.min(cols - jb);
                let m = mask16(cn);
                // SAFETY: rows 2q and 2q + 1 (< k) of `w`, columns j0 + jb.. + cn (< n); the
                // store writes cn words of line q.
                unsafe {
                    let lo = _mm512_maskz_loadu_ps(m, wp.add(2 * q * n + j0 + jb));
                    let hi = match 2 * q + 1 < k {
                        true => _mm512_maskz_loadu_ps(m, wp.add((2 * q + 1) * n + j0 + jb)),
                        false => _mm512_setzero_ps(),
                    };
                    let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                    let v = _mm512_permutexvar_epi16(inter, v);
                    _mm512_mask_storeu_epi32(dp.add(q * NR + jb).cast(), m, v);
                }
            }
        }
        return;
    }
    for jb in (0..cols).step_by(16) {
        let rows = 16.min(cols - jb);
        for t in 0..k.div_ceil(32) {
            let c0 = 32 * t;
            let cn = 32.min(k - c0);
            let (m0, m1) = (mask16(cn), mask16(cn.saturating_sub(16)));
            let mut v = [_mm512_setzero_si512(); 16];
            for (r, vr) in v[..rows].iter_mut().enumerate() {
                // SAFETY: row j0 + jb + r (< n) of `w`, its values c0.. + cn (< k).
                unsafe {
                    let p = wp.add((j0 + jb + r) * k + c0);
                    let lo = _mm512_maskz_loadu_ps(m0, p);
                    let hi = _mm512_maskz_loadu_ps(m1, p.add(16));
                    *vr = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                }
            }
            // Row r's word q is pair 16t + q of column j0 + jb + r; after the transpose v[q]
            // holds pair 16t + q of all 16 columns.
            transpose16(&mut v);
            for (q, vq) in v.iter().enumerate().take(steps - 16 * t) {
                // SAFETY: line 16t + q < steps, words jb.. + rows of it.
                unsafe {
                    _mm512_mask_storeu_epi32(
                        dp.add((16 * t + q) * NR + jb).cast(),
                        mask16(rows),
                        *vq,
                    )
                };
            }
        }
    }
}

/// A Vec of `n` lines whose contents the caller overwrites entirely.
#[allow(clippy::uninit_vec)]
fn lines_uninit(n: usize) -> Vec<Line> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `Line` is plain u16s (no invalid bit patterns); every line is written by the
    // packing before the kernel reads it.
    unsafe { v.set_len(n) };
    v
}

/// `c[m×n]` (row-major, contiguous) = `(accumulate ? c : 0) + a[m×k] · b[k×n]`, with `a` and
/// `b` rounded to BF16 and the sums in f32, on [`unit()`]. Parallel over rayon's threads.
///
/// # Panics
/// If no unit is [`available`] (callers check), or an operand is too short for its view.
pub fn sgemm_bf16(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], accumulate: bool) {
    sgemm_bf16_on(best(), true, m, n, k, a, b, c, accumulate)
}

/// [`sgemm_bf16`] on a chosen unit (tests and benchmarks compare the units where a CPU has
/// both), parallel over rayon's threads or, with `parallel` false, on the calling thread only:
/// for kernels that are parallel outside (the attention kernel's per-block products), with the
/// packed operands in per-thread buffers reused from call to call. Each block of `c` is summed
/// the same way either way, so the two give the same bits.
///
/// # Panics
/// If `unit` is not among [`units`], or an operand is too short for its view.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_bf16_on(
    unit: Unit,
    parallel: bool,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    accumulate: bool,
) {
    if checked(unit, m, n, k, &a, &b, c, accumulate) {
        #[cfg(target_arch = "x86_64")]
        if parallel {
            products(unit, m, n, k, a, b, c, accumulate);
        } else {
            products_serial(unit, m, n, k, a, b, c, accumulate);
        }
    }
}

/// [`unit`], which callers have checked exists.
pub(crate) fn best() -> Unit {
    unit().expect("sgemm_bf16: this CPU has neither AMX-BF16 nor AVX512-BF16")
}

/// The argument checks shared by the entry points; false when nothing is left to multiply
/// (`c` empty, or `k == 0`, where `c` is zeroed unless accumulating).
#[allow(clippy::too_many_arguments)]
fn checked(
    unit: Unit,
    m: usize,
    n: usize,
    k: usize,
    a: &Mat,
    b: &Mat,
    c: &mut [f32],
    accumulate: bool,
) -> bool {
    assert!(
        units().contains(&unit),
        "sgemm_bf16: {} is not available on this CPU",
        unit.name()
    );
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return false;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return false;
    }
    let span = |x: &Mat, r: usize, cc: usize| (r - 1) * x.rs + (cc - 1) * x.cs + 1;
    assert!(a.data.len() >= span(a, m, k) && b.data.len() >= span(b, k, n));
    true
}

/// Run `f` ready for `unit`: on AMX with the tile registers configured
/// ([`TileConfig::all_full`]) on this thread, and released afterwards (the kernel then need not
/// save them on a context switch); the dot product needs no set-up.
#[cfg(target_arch = "x86_64")]
fn with_unit<R>(unit: Unit, f: impl FnOnce() -> R) -> R {
    if unit == Unit::AvxDot {
        return f();
    }
    let cfg = TileConfig::all_full();
    // SAFETY: `unit` is AMX, which `checked` found granted; the configuration outlives its use.
    unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
    let r = f();
    // SAFETY: releases this thread's tile state.
    unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    r
}

/// The 32 × 32 blocks `ibs` × `jbs` of `c` (m × n, row-major at `cp`) from the packed operands
/// (`per` lines per tile column / row, `kt` k tiles).
///
/// # Safety
/// `unit` is available and set up on this thread ([`with_unit`]); `pa` / `pb` hold the packed
/// row / column tiles of an m × k `a` and a k × n `b`; the blocks of `c` belong to the caller
/// alone.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn blocks(
    unit: Unit,
    pa: &[Line],
    pb: &[Line],
    (per, kt): (usize, usize),
    (m, n): (usize, usize),
    ibs: std::ops::Range<usize>,
    jbs: std::ops::Range<usize>,
    cp: *mut f32,
    accumulate: bool,
) {
    type Block =
        unsafe fn(*const Line, *const Line, *const Line, *const Line, usize, *mut f32, usize, bool);
    let block: Block = match unit {
        Unit::Amx => block_32x32,
        Unit::AvxDot => block_32x32_dot,
    };
    let mut buf = [0f32; 32 * 32];
    for ib in ibs {
        let (r0, rows) = (ib * 32, 32.min(m - ib * 32));
        let a0 = pa[2 * ib * per..].as_ptr();
        let a1 = pa[(2 * ib + 1) * per..].as_ptr();
        for jb in jbs.clone() {
            let b0 = pb[2 * jb * per..].as_ptr();
            let b1 = pb[(2 * jb + 1) * per..].as_ptr();
            let (c0, cols) = (jb * 32, 32.min(n - jb * 32));
            if rows == 32 && cols == 32 {
                // SAFETY: the unit is set up on this thread; each pointer starts `kt` packed
                // tiles inside `pa` / `pb`; the block (rows r0.., columns c0.., 32 × 32,
                // inside c's m × n) is the caller's alone.
                unsafe { block(a0, a1, b0, b1, kt, cp.add(r0 * n + c0), n, accumulate) };
                continue;
            }
            // An edge block: through `buf`.
            // SAFETY: as above, with `buf` (32 × 32) as the block.
            unsafe { block(a0, a1, b0, b1, kt, buf.as_mut_ptr(), 32, false) };
            for r in 0..rows {
                // SAFETY: row r0 + r, columns c0..c0 + cols lie inside c's m × n and in the
                // caller's blocks.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(cp.add((r0 + r) * n + c0), cols) };
                let src = &buf[r * 32..r * 32 + cols];
                if accumulate {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                } else {
                    dst.copy_from_slice(src);
                }
            }
        }
    }
}

/// Strips packed by one task, at most.
const GROUP: usize = 8;

/// Operand rows at least this many floats apart (8 KiB) are packed across a group of strips
/// ([`pack_group`]). Closer rows share pages, and there grouping measured no better (Llama's
/// 512-wide layers; session 10 on Zen 4, every layout).
const ACROSS: usize = 2048;

/// Whether `a` reads across a group: column-major, its columns `ACROSS` or more apart.
fn across_a(a: &Mat) -> bool {
    a.cs != 1 && a.cs >= ACROSS
}

/// Whether `b` reads across a group: row-major, its rows `ACROSS` or more apart.
fn across_b(b: &Mat) -> bool {
    b.cs == 1 && b.rs >= ACROSS
}

/// Pack the strips of `outs` (each `kt` tiles) with `pack(strip, k tiles, out)`: strip by strip,
/// or, where a strip reads one 64-byte piece of each of many rows far apart (`across`: the rows
/// of a row-major `b`, the columns of a column-major `a`; [`ACROSS`]), k tile by k tile over all
/// the strips,
/// so that each row's neighbouring pieces are read together (and each page's translation
/// serves the whole group). That took the packing of gpt2-d512's BF16 step from 635–653 to
/// 512–520 ms over 13 steps, and the LM head's weight gradient (`-- gemm`, k 256, n 8192)
/// from 417–462 to 635–641 GFLOP/s.
#[cfg(target_arch = "x86_64")]
fn pack_group(
    outs: &mut [Line],
    kt: usize,
    across: bool,
    pack: impl Fn(usize, std::ops::Range<usize>, &mut [Line]),
) {
    let per = kt * TILE;
    if across {
        for t in 0..kt {
            for (s, out) in outs.chunks_mut(per).enumerate() {
                pack(s, t..t + 1, out);
            }
        }
    } else {
        for (s, out) in outs.chunks_mut(per).enumerate() {
            pack(s, 0..kt, out);
        }
    }
}

/// [`sgemm_bf16`] once its arguments are checked (`k > 0`, non-empty `c`, `unit` available).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn products(
    unit: Unit,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    accumulate: bool,
) {
    let kt = k.div_ceil(32);
    let (mb, nb) = (m.div_ceil(32), n.div_ceil(32));
    // Packed operands: 2·mb row tiles of `a`, 2·nb column tiles of `b`, kt tiles each.
    let per = kt * TILE;
    let mut pa = lines_uninit(2 * mb * per);
    let mut pb = lines_uninit(2 * nb * per);
    let group = |strips: usize| (strips / (2 * rayon::current_num_threads())).clamp(1, GROUP);
    let (ga, gb) = (group(2 * mb), group(2 * nb));
    pa.par_chunks_mut(ga * per)
        .enumerate()
        .for_each(|(g, outs)| {
            // SAFETY: every unit implies the features (AVX-512F/BW, AVX512-BF16); the views were
            // checked above.
            pack_group(outs, kt, across_a(&a), |s, ts, out| unsafe {
                pack_a_tile(a, m, k, (g * ga + s) * 16, ts, out)
            })
        });
    pb.par_chunks_mut(gb * per)
        .enumerate()
        .for_each(|(g, outs)| {
            // SAFETY: as above.
            pack_group(outs, kt, across_b(&b), |s, ts, out| unsafe {
                pack_b_tile(b, k, n, (g * gb + s) * 16, ts, out)
            })
        });
    let (pa, pb) = (&pa, &pb);
    // Tasks: groups of row blocks × groups of column blocks. A group's packed columns of `b`
    // (≤ 512 KiB) stay in L2 while its row blocks pass; each row block's two tiles of `a` stay
    // in L1 while the columns pass. Enough groups of rows for ≥ 4 tasks per thread.
    let panel = 2 * kt * TILE * 64;
    let nper = ((512 << 10) / panel).clamp(1, nb);
    let ngroups = nb.div_ceil(nper);
    let want = (4 * rayon::current_num_threads()).div_ceil(ngroups);
    let mper = mb.div_ceil(want.clamp(1, mb));
    let mgroups = mb.div_ceil(mper);
    let cp = CPtr(c.as_mut_ptr());
    (0..mgroups * ngroups).into_par_iter().for_each(|task| {
        let (gi, gj) = (task / ngroups, task % ngroups);
        let cp = &cp;
        let (ibs, jbs) = (
            gi * mper..((gi + 1) * mper).min(mb),
            gj * nper..((gj + 1) * nper).min(nb),
        );
        // SAFETY: the unit is set up for the call; the packing covers every block; tasks own
        // disjoint blocks of `c`.
        with_unit(unit, || unsafe {
            blocks(unit, pa, pb, (per, kt), (m, n), ibs, jbs, cp.0, accumulate)
        });
    });
}

/// [`sgemm_bf16_on`] on the calling thread, once its arguments are checked.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn products_serial(
    unit: Unit,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    accumulate: bool,
) {
    use std::cell::RefCell;
    thread_local! {
        static PACKED: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }
    let kt = k.div_ceil(32);
    let (mb, nb) = (m.div_ceil(32), n.div_ceil(32));
    let per = kt * TILE;
    let cp = c.as_mut_ptr();
    let run = |pa: &mut Vec<Line>, pb: &mut Vec<Line>| {
        for (v, len) in [(&mut *pa, 2 * mb * per), (&mut *pb, 2 * nb * per)] {
            if v.len() < len {
                *v = lines_uninit(len);
            }
        }
        // SAFETY: every unit implies the features (AVX-512F/BW, AVX512-BF16); the views were
        // checked.
        pack_group(
            &mut pa[..2 * mb * per],
            kt,
            across_a(&a),
            |i, ts, out| unsafe { pack_a_tile(a, m, k, i * 16, ts, out) },
        );
        // SAFETY: as above.
        pack_group(
            &mut pb[..2 * nb * per],
            kt,
            across_b(&b),
            |j, ts, out| unsafe { pack_b_tile(b, k, n, j * 16, ts, out) },
        );
        // SAFETY: the unit is set up; every block packed; `c` is exclusively borrowed.
        with_unit(unit, || unsafe {
            blocks(
                unit,
                pa,
                pb,
                (per, kt),
                (m, n),
                0..mb,
                0..nb,
                cp,
                accumulate,
            )
        });
    };
    PACKED.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => {
            let (pa, pb) = &mut *bufs;
            run(pa, pb)
        }
        // Re-entered on this thread (not done today): fresh buffers.
        Err(_) => run(&mut Vec::new(), &mut Vec::new()),
    });
}

/// `c`'s data for tasks that each write their own blocks of it.
#[cfg(target_arch = "x86_64")]
struct CPtr(*mut f32);
// SAFETY: the tasks of `sgemm_bf16` write disjoint blocks, and `c` outlives them.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for CPtr {}
