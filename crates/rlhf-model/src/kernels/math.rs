//! Branch-free f32 `exp`, `tanh`, `sigmoid` that LLVM vectorises (no libm calls), accurate to a
//! few ulp — well within the 1e-4 parity the models are held to.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding it rounds to the nearest integer and leaves that integer in the low mantissa.
const MAGIC: f32 = 12_582_912.0;

/// e^x; 0 below -87.3, saturates at e^88. (Cephes `expf` coefficients, kept as published.)
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let i = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((i + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else {
        y * scale
    }
}

/// tanh(x) = sign(x)·(1 − e^{−2|x|}) / (1 + e^{−2|x|}).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let e = exp(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

/// 1 / (1 + e^{−x}).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

crate::multiversion! {
    /// `out[i] = exp(x[i] - sub)`, returning the sum of `out`.
    pub fn exp_sub_sum(x: &[f32], sub: f32, out: &mut [f32]) -> f32 {
        let mut acc = [0.0f32; 16];
        let n = x.len().min(out.len());
        let (xc, oc) = (x[..n].chunks_exact(16), out[..n].chunks_exact_mut(16));
        let (xr, orr) = (xc.remainder(), n - n % 16);
        for (xs, os) in xc.zip(oc) {
            for k in 0..16 {
                let e = exp(xs[k] - sub);
                os[k] = e;
                acc[k] += e;
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (k, &xv) in xr.iter().enumerate() {
            let e = exp(xv - sub);
            out[orr + k] = e;
            s += e;
        }
        s
    }
}

crate::multiversion! {
    /// `x[i] = exp(x[i] - sub)` in place (−∞ becomes 0), returning the sum.
    pub fn exp_sub_in_place(x: &mut [f32], sub: f32) -> f32 {
        let mut acc = [0.0f32; 16];
        let mut c = x.chunks_exact_mut(16);
        for xs in &mut c {
            for k in 0..16 {
                let e = exp(xs[k] - sub);
                xs[k] = e;
                acc[k] += e;
            }
        }
        let mut s: f32 = acc.iter().sum();
        for xv in c.into_remainder() {
            *xv = exp(*xv - sub);
            s += *xv;
        }
        s
    }
}

crate::multiversion! {
    /// Sum of `exp(x[i] - sub)`.
    pub fn sum_exp_sub(x: &[f32], sub: f32) -> f32 {
        let mut acc = [0.0f32; 16];
        let c = x.chunks_exact(16);
        let r = c.remainder();
        for xs in c {
            for k in 0..16 {
                acc[k] += exp(xs[k] - sub);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for &xv in r {
            s += exp(xv - sub);
        }
        s
    }
}

crate::multiversion! {
    /// In place `x ← x·scale − sub`, returning `(Σ e^x, Σ e^x·x)` of the new `x`: a row's
    /// partition sum and the numerator of E[x] (the entropy's).
    pub fn shift_sum_exp_dot(x: &mut [f32], scale: f32, sub: f32) -> (f32, f32) {
        let (mut acc, mut dot) = ([0.0f32; 16], [0.0f32; 16]);
        let mut c = x.chunks_exact_mut(16);
        for xs in &mut c {
            for k in 0..16 {
                let y = xs[k] * scale - sub;
                xs[k] = y;
                let e = exp(y);
                acc[k] += e;
                dot[k] += e * y;
            }
        }
        let (mut s, mut t): (f32, f32) = (acc.iter().sum(), dot.iter().sum());
        for xv in c.into_remainder() {
            let y = *xv * scale - sub;
            *xv = y;
            let e = exp(y);
            s += e;
            t += e * y;
        }
        (s, t)
    }
}

crate::multiversion! {
    /// In place over shifted logits `s`: `s ← −scale · e^(s − ls) · (c0 + ge·s)`, the entropy
    /// head's logit gradient without its target term.
    pub fn entropy_dlogits(x: &mut [f32], ls: f32, c0: f32, ge: f32, scale: f32) {
        for v in x.iter_mut() {
            *v = -scale * exp(*v - ls) * (c0 + ge * *v);
        }
    }
}

crate::multiversion! {
    /// Maximum of a slice (−∞ when empty).
    pub fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; 16];
        let c = x.chunks_exact(16);
        let r = c.remainder();
        for xs in c {
            for k in 0..16 {
                acc[k] = if xs[k] > acc[k] { xs[k] } else { acc[k] };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &a in acc.iter().chain(r) {
            m = if a > m { a } else { m };
        }
        m
    }
}

crate::multiversion! {
    /// Σ x² accumulated in f64 (eight lanes).
    fn sum_squares_serial(x: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let c = x.chunks_exact(8);
        let r = c.remainder();
        for xs in c {
            for k in 0..8 {
                let v = xs[k] as f64;
                acc[k] += v * v;
            }
        }
        acc.iter().sum::<f64>() + r.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
    }
}

/// Σ x² of an f32 slice in f64, in parallel over chunks (the gradient norm's sum).
pub fn sum_squares(x: &[f32]) -> f64 {
    use rayon::prelude::*;
    x.par_chunks(1 << 15).map(sum_squares_serial).sum()
}

/// Σ x² of a tensor in f64: [`sum_squares`] for f32 on the CPU, candle's ops otherwise.
pub fn tensor_sum_squares(t: &candle_core::Tensor) -> candle_core::Result<f64> {
    if super::fusable(&[t]) {
        return super::with_f32(&[t], |s| sum_squares(s[0]));
    }
    t.to_dtype(candle_core::DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()
}

/// `t · c` for f32 on the CPU in parallel (candle's own affine map elsewhere).
pub fn tensor_scaled(t: &candle_core::Tensor, c: f64) -> candle_core::Result<candle_core::Tensor> {
    use rayon::prelude::*;
    if !super::fusable(&[t]) {
        return t * c;
    }
    let c = c as f32;
    let v = super::with_f32(&[t], |s| {
        let mut o = super::uninit(s[0].len());
        o.par_chunks_mut(1 << 15)
            .zip(s[0].par_chunks(1 << 15))
            .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, x)| *o = x * c));
        o
    })?;
    candle_core::Tensor::from_vec(v, t.shape(), t.device())
}

crate::multiversion! {
    /// `d[i] += s[i]` (over the shorter of the two).
    pub fn add_assign(d: &mut [f32], s: &[f32]) {
        d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
    }
}

crate::multiversion! {
    /// `o[i] = a[i] + b[i]` (over the shortest of the three).
    pub fn sum_into(o: &mut [f32], a: &[f32], b: &[f32]) {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    }
}

crate::multiversion! {
    /// `d[j] += Σ_r g[r·n + c0 + j]` for `j < d.len()`: columns `c0..` of the rows of `g`
    /// (`n` floats each) summed onto `d`. A bias gradient, a block of columns per task.
    pub fn add_columns(d: &mut [f32], g: &[f32], n: usize, c0: usize) {
        let w = d.len();
        for r in g.chunks_exact(n) {
            d.iter_mut().zip(&r[c0..c0 + w]).for_each(|(d, s)| *d += s);
        }
    }
}

/// `a + b`, element-wise, in parallel (a new vector; `a` and `b` of one length).
pub fn added(a: &[f32], b: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    assert_eq!(a.len(), b.len(), "added: lengths differ");
    let mut o = super::uninit(a.len());
    o.par_chunks_mut(1 << 14)
        .zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14)))
        .for_each(|(o, (a, b))| sum_into(o, a, b));
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn sum_squares_and_scaling() {
        use candle_core::{Device, Tensor};
        // Odd length (a remainder after the lanes), several parallel chunks.
        let x: Vec<f32> = (0..100_003)
            .map(|i| ((i % 97) as f32 - 48.0) / 7.0)
            .collect();
        let want: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let got = super::sum_squares(&x);
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        let t = Tensor::from_vec(x.clone(), 100_003, &Device::Cpu).unwrap();
        assert_eq!(super::tensor_sum_squares(&t).unwrap(), got);
        let t64 = t.to_dtype(candle_core::DType::F64).unwrap();
        let r = super::tensor_sum_squares(&t64).unwrap();
        assert!((r - want).abs() <= 1e-9 * want);
        let s: Vec<f32> = super::tensor_scaled(&t, 0.25).unwrap().to_vec1().unwrap();
        assert!(s.iter().zip(&x).all(|(a, b)| *a == b * 0.25));
    }

    #[test]
    fn adds_and_column_sums() {
        // Odd lengths: lanes and a remainder; `added` over several parallel chunks.
        let a: Vec<f32> = (0..40_007).map(|i| (i % 13) as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..40_007).map(|i| (i % 7) as f32 * 0.25).collect();
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(super::added(&a, &b), want);
        let mut d = a.clone();
        super::add_assign(&mut d, &b);
        assert_eq!(d, want);
        // Columns 5..5+19 of 37 rows of 29, onto a non-zero start.
        let (n, c0, w) = (29, 5, 19);
        let g = &a[..37 * n];
        let mut got: Vec<f32> = (0..w).map(|j| j as f32).collect();
        super::add_columns(&mut got, g, n, c0);
        for (j, v) in got.iter().enumerate() {
            let mut s = j as f32;
            for r in 0..37 {
                s += g[r * n + c0 + j];
            }
            assert_eq!(*v, s, "column {j}");
        }
    }

    #[test]
    fn exp_tanh_accuracy() {
        let mut x = -100.0f32;
        while x < 88.0 {
            let (a, b) = (super::exp(x), x.exp());
            assert!((a - b).abs() <= 4e-7 * b + 1e-37, "exp({x}) = {a} vs {b}");
            let (a, b) = (super::tanh(x), x.tanh());
            assert!((a - b).abs() <= 3e-7, "tanh({x}) = {a} vs {b}");
            x += 0.0137;
        }
        assert_eq!(super::exp(-1e9), 0.0);
        assert_eq!(super::tanh(0.0), 0.0);
    }
}
