//! Dropout masks for LoRA adapters' inputs (PEFT's `lora_dropout`), kept as bits.
//!
//! A mask is drawn from splitmix64 on the stream (noise seed, layer), one draw per element in
//! order: element `i` is kept (and scaled by 1/keep) when draw `i` is below `keep`. splitmix64
//! is counter-based, its `i`-th draw a function of `i` alone, so a mask is drawn in parallel
//! and still gives every element the draw a sequential loop would (a resumed run draws the
//! same masks as the run it resumes). The mask is held as one bit per element: a layer's
//! adapters in training keep their masks for the backward, and as `f32` values those were as
//! large as the inputs they mask (the seven adapters of a SmolLM2 layer: 20 MB per
//! micro-batch of 1024 rows, 600 MB over the model; as bits, 19 MB over the model).

use rayon::prelude::*;

/// Words of mask bits per parallel task (64 elements each): the draw and the products split
/// the same way, so a task's elements are its words' bits.
const CHUNK_WORDS: usize = 256;

/// splitmix64's increment (the golden ratio in 64 bits).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The state a stream starts from: the seed, with the stream number mixed in.
fn start(seed: u64, stream: u64) -> u64 {
    seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// splitmix64's output function: the 53 high bits of the mixed state.
#[inline(always)]
fn mix53(s: u64) -> u64 {
    let mut z = s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z >> 11
}

/// The splitmix64 stream (seed, stream) as a sequence of uniforms in [0, 1).
pub fn uniforms(seed: u64, stream: u64) -> impl FnMut() -> f64 {
    let mut s = start(seed, stream);
    move || {
        s = s.wrapping_add(GAMMA);
        mix53(s) as f64 / (1u64 << 53) as f64
    }
}

/// A dropout mask over `n` elements: each kept, multiplied by `1 / keep`, or dropped (0).
#[derive(Clone, Debug)]
pub struct DropoutMask {
    bits: Vec<u64>,
    n: usize,
    scale: f32,
}

impl DropoutMask {
    /// The mask of `n` elements from the stream (seed, stream), keeping each with probability
    /// `keep`: element `i` is kept when the stream's draw `i` ([`uniforms`]) is below `keep`.
    pub fn draw(seed: u64, stream: u64, keep: f64, n: usize) -> Self {
        let s0 = start(seed, stream);
        // u / 2⁵³ < keep ⟺ u < keep · 2⁵³ (exact: a power of two) ⟺ u < ⌈keep · 2⁵³⌉ for the
        // integer u: the comparison in integers gives the f64 comparison's answer.
        let threshold = (keep * (1u64 << 53) as f64).ceil() as u64;
        let mut bits = vec![0u64; n.div_ceil(64)];
        bits.par_chunks_mut(CHUNK_WORDS)
            .enumerate()
            .for_each(|(c, words)| {
                draw_words(
                    words,
                    s0,
                    (c * CHUNK_WORDS * 64) as u64,
                    n as u64,
                    threshold,
                )
            });
        Self {
            bits,
            n,
            scale: (1.0 / keep) as f32,
        }
    }

    /// The number of elements it masks.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether it masks no elements.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The mask as `f32` factors (0 or `1 / keep`), for a composed `x · mask`.
    pub fn values(&self) -> Vec<f32> {
        self.bits
            .iter()
            .flat_map(|&word| factors(word, self.scale))
            .take(self.n)
            .collect()
    }

    /// `f(out, in, factors)` over blocks of [`CHUNK_WORDS`] words' elements in parallel, 64
    /// elements (one word of bits, expanded to their factors) at a time.
    fn each(&self, out: &mut [f32], x: &[f32], f: fn(&mut [f32], &[f32], u64, f32)) {
        assert!(
            out.len() == self.n && x.len() == self.n,
            "dropout mask of {} on {} and {} elements",
            self.n,
            out.len(),
            x.len()
        );
        let chunk = CHUNK_WORDS * 64;
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .enumerate()
            .for_each(|(c, (out, x))| {
                let words = &self.bits[c * CHUNK_WORDS..];
                for ((out, x), &word) in out.chunks_mut(64).zip(x.chunks(64)).zip(words) {
                    f(out, x, word, self.scale);
                }
            });
    }

    /// `x ⊙ mask` (each element times its factor, as `x · mask` computes it).
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut o = super::uninit(x.len());
        self.each(&mut o, x, mul_word);
        o
    }

    /// `dst += g ⊙ mask`: the gradient of a masked input added onto the input's.
    pub fn add_masked(&self, dst: &mut [f32], g: &[f32]) {
        self.each(dst, g, add_mul_word);
    }
}

crate::multiversion! {
    /// The mask bits of elements `i0..` (64 to a word, up to `n`) of the stream from `s0`:
    /// element `i` kept when its draw's 53 bits are below `threshold`. Vectorised (AVX-512's
    /// 64-bit products) over a word's 64 draws.
    fn draw_words(words: &mut [u64], s0: u64, i0: u64, n: u64, threshold: u64) {
        for (w, word) in words.iter_mut().enumerate() {
            let base = i0 + 64 * w as u64;
            let mut keep = [0u64; 64];
            for (j, k) in keep.iter_mut().enumerate() {
                let s = s0.wrapping_add((base + j as u64 + 1).wrapping_mul(GAMMA));
                *k = (mix53(s) < threshold) as u64;
            }
            let len = (n - base).min(64) as usize;
            let mut v = 0u64;
            for (j, k) in keep.iter().enumerate().take(len) {
                v |= k << j;
            }
            *word = v;
        }
    }
}

/// One word's factors: `scale` where the bit is set, else 0 (`scale · 1` and `scale · 0`: the
/// factors themselves, so the products are `x · mask`'s).
#[inline(always)]
fn factors(word: u64, scale: f32) -> [f32; 64] {
    let mut f = [0f32; 64];
    for (j, f) in f.iter_mut().enumerate() {
        *f = scale * ((word >> j) & 1) as f32;
    }
    f
}

crate::multiversion! {
    /// `out = x ⊙ factors(word)` for up to 64 elements.
    fn mul_word(out: &mut [f32], x: &[f32], word: u64, scale: f32) {
        let f = factors(word, scale);
        for ((o, x), f) in out.iter_mut().zip(x).zip(&f) {
            *o = x * f;
        }
    }
}

crate::multiversion! {
    /// `out += g ⊙ factors(word)` for up to 64 elements.
    fn add_mul_word(out: &mut [f32], g: &[f32], word: u64, scale: f32) {
        let f = factors(word, scale);
        for ((o, g), f) in out.iter_mut().zip(g).zip(&f) {
            *o += g * f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel draw gives every element the sequential stream's draw, across word and
    /// chunk boundaries and a ragged end, at several keep probabilities.
    #[test]
    fn parallel_draw_is_the_sequential_stream() {
        for (keep, n) in [(0.95, 40_000), (0.5, 16_411), (0.75, 63), (0.1, 1)] {
            let m = DropoutMask::draw(7, 123, keep, n);
            let mut u = uniforms(7, 123);
            let scale = (1.0 / keep) as f32;
            let want: Vec<f32> = (0..n)
                .map(|_| if u() < keep { scale } else { 0.0 })
                .collect();
            assert_eq!(m.values(), want, "keep {keep}, n {n}");
            let kept = want.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
            if n > 10_000 {
                assert!((kept - keep).abs() < 0.02, "kept {kept} of keep {keep}");
            }
        }
    }

    /// `apply` and `add_masked` are the products with the mask's values.
    #[test]
    fn apply_and_add_masked_are_the_products() {
        let n = 40_000;
        let m = DropoutMask::draw(3, 9, 0.8, n);
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let v = m.values();
        let want: Vec<f32> = x.iter().zip(&v).map(|(x, v)| x * v).collect();
        assert_eq!(m.apply(&x), want);
        let mut d: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
        let want: Vec<f32> = d
            .iter()
            .zip(&x)
            .zip(&v)
            .map(|((d, g), v)| d + g * v)
            .collect();
        m.add_masked(&mut d, &x);
        assert_eq!(d, want);
    }
}
