//! The one seeded PRNG of the project (SplitMix64): tiny, portable and stable across builds and
//! platforms, so a data order, a simulated annotator or a bootstrap interval saved today is
//! reproduced by any later build (library RNGs do not promise stable streams across versions).

/// SplitMix64: a tiny, portable, seeded PRNG (stable across builds and platforms).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator in raw state `state` (no warm-up): the stream `next_u64` continues from it.
    pub fn from_state(state: u64) -> Self {
        Rng(state)
    }

    pub fn new(seed: u64) -> Self {
        let mut r = Rng(seed);
        r.next_u64(); // warm up so that nearby seeds diverge
        r
    }

    /// A generator for `seed` on a named stream: different streams never share a sequence.
    pub fn stream(seed: u64, stream: u64) -> Self {
        let mut s = Rng(stream.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0x5851_F42D_4C95_7F2D);
        Rng::new(seed ^ s.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A uniformly chosen element (`xs` non-empty).
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}
