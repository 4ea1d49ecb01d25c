//! Thin wrapper over the `gemm` crate (the GEMM candle itself uses; built here with its
//! AVX-512 micro-kernels, dispatched at run time) for kernels that multiply raw slices.

/// A strided matrix view: element (r, c) is at `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// `c[m×n]` (row-major, contiguous) = `(accumulate ? c : 0) + a[m×k] · b[k×n]`.
pub fn sgemm(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], accumulate: bool) {
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let span = |x: &Mat, r: usize, cc: usize| (r - 1) * x.rs + (cc - 1) * x.cs + 1;
    if k > 0 {
        assert!(a.data.len() >= span(&a, m, k) && b.data.len() >= span(&b, k, n));
    }
    let par = if m * n * k >= 1 << 15 {
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
