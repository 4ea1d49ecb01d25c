//! Rotate-half RoPE, fused forward and backward. The input may be a strided view — the usual
//! `[b, t, h, d] → [b, h, t, d]` transpose of a projection — or the projection's `[b, t, h·d]`
//! output itself, and is read in place; the output is contiguous `[b, h, t, d]`, so the
//! reshape and transpose nodes, the copy and the composed version's five temporaries (two
//! halves, a negation, a concatenation, two products) all disappear.
//!
//! `y = x·cos + rot(x)·sin` with `rot(x) = [−x₂, x₁]`; the backward is its transpose:
//! `dx = g·cos + rotᵀ(g·sin)`, `rotᵀ(u) = [u₂, −u₁]`. cos/sin are constants (no gradient).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::attention::{rows_contiguous, rows_of, Heads};
use super::{out, uninit, with_f32};

struct Rope {
    /// [b, 1, t, d] each, contiguous.
    cos: Tensor,
    sin: Tensor,
    form: Heads,
}

/// One row: `y = x·c + rot(x)·s` (`back`: `y = x·c + rotᵀ(x·s)`).
#[inline(always)]
fn row(x: &[f32], c: &[f32], s: &[f32], y: &mut [f32], back: bool) {
    let h = x.len() / 2;
    let (x1, x2) = x.split_at(h);
    let (y1, y2) = y.split_at_mut(h);
    let (c1, c2) = c.split_at(h);
    let (s1, s2) = s.split_at(h);
    if back {
        for i in 0..h {
            y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
            y2[i] = x2[i] * c2[i] - x1[i] * s1[i];
        }
    } else {
        for i in 0..h {
            y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
            y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
        }
    }
}

crate::multiversion! {
    /// All rows of one batch: row `ti` of head `hi` is read at `hi·hs + ti·ts` of `x`, and
    /// written to `y` (this batch's block) pair-major (`[h, t, d]`) or, `merged`, `[t, h, d]`.
    fn batch(
        x: &[f32], hs: usize, ts: usize, c: &[f32], s: &[f32], y: &mut [f32],
        hd: (usize, usize, usize), back: bool, merged: bool,
    ) {
        let (h, t, d) = hd;
        for hi in 0..h {
            for ti in 0..t {
                let xo = hi * hs + ti * ts;
                let yo = if merged { (ti * h + hi) * d } else { (hi * t + ti) * d };
                let tab = ti * d..(ti + 1) * d;
                row(&x[xo..xo + d], &c[tab.clone()], &s[tab], &mut y[yo..yo + d], back);
            }
        }
    }
}

/// Every row of `x`, whose pair rows lie at strides `[batch, head, time]`; the output is
/// contiguous `[b, h, t, d]`, or `[b, t, h·d]` when `merged`.
fn run(
    x: &[f32],
    strides: [usize; 3],
    dims: Dims4,
    cos: &[f32],
    sin: &[f32],
    back: bool,
    merged: bool,
) -> Vec<f32> {
    let (b, h, t, d) = dims;
    let mut y = uninit(b * h * t * d);
    if y.is_empty() {
        return y;
    }
    y.par_chunks_mut(h * t * d).enumerate().for_each(|(bi, y)| {
        let tab = bi * t * d..(bi + 1) * t * d;
        batch(
            &x[bi * strides[0]..],
            strides[1],
            strides[2],
            &cos[tab.clone()],
            &sin[tab],
            y,
            (h, t, d),
            back,
            merged,
        )
    });
    y
}

/// One row in place: [`row`]'s arithmetic, each pair read before it is written.
#[inline(always)]
fn row_in_place(x: &mut [f32], c: &[f32], s: &[f32], back: bool) {
    let h = x.len() / 2;
    let (x1, x2) = x.split_at_mut(h);
    let (c1, c2) = c.split_at(h);
    let (s1, s2) = s.split_at(h);
    if back {
        for i in 0..h {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * c1[i] + b * s2[i];
            x2[i] = b * c2[i] - a * s1[i];
        }
    } else {
        for i in 0..h {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * c1[i] - b * s1[i];
            x2[i] = b * c2[i] + a * s2[i];
        }
    }
}

crate::multiversion! {
    /// The first `heads` heads (`d` wide) of each of `rows` (whose rows are `w` floats and
    /// whose first is token `r0` of a sequence of `t`), rotated in place.
    fn packed_rows(
        rows: &mut [f32], w: usize, r0: usize, t: usize, heads: usize, d: usize,
        cos: &[f32], sin: &[f32], back: bool,
    ) {
        for (i, r) in rows.chunks_exact_mut(w).enumerate() {
            let ti = (r0 + i) % t;
            let tab = ti * d..(ti + 1) * d;
            let (c, s) = (&cos[tab.clone()], &sin[tab]);
            for hx in r[..heads * d].chunks_exact_mut(d) {
                row_in_place(hx, c, s, back);
            }
        }
    }
}

/// RoPE in place on a packed projection `[b, t, w]` (`dims`) whose first `heads` heads of `d`
/// (q's, then k's) rotate and the rest (v) do not; cos/sin `[b, 1, t, d]` (contiguous, as
/// slices). `back`: the backward (the rotation's transpose) on the gradient of such a tensor.
/// The same arithmetic as the [`rope`] op, so the same values.
pub(super) fn rope_packed_in_place(
    x: &mut [f32],
    dims: (usize, usize, usize),
    heads: usize,
    d: usize,
    (cos, sin): (&[f32], &[f32]),
    back: bool,
) {
    let (b, t, w) = dims;
    assert!(
        heads * d <= w && x.len() == b * t * w && cos.len() == b * t * d && sin.len() == cos.len(),
        "rope: packed [{b}, {t}, {w}], {heads} heads of {d}, tables of {}",
        cos.len()
    );
    if x.is_empty() {
        return;
    }
    // Blocks of rows within one sequence, so each block reads one sequence's tables.
    let per = 16usize.min(t);
    x.par_chunks_mut(w * per).enumerate().for_each(|(j, rows)| {
        let r0 = j * per;
        let bi = r0 / t;
        // A block may run past its sequence's end when t is not a multiple of `per`: split it.
        let first = rows.len() / w;
        let in_seq = (t - r0 % t).min(first);
        let (a, rest) = rows.split_at_mut(in_seq * w);
        let tab = |bi: usize| bi * t * d..(bi + 1) * t * d;
        packed_rows(
            a,
            w,
            r0 % t,
            t,
            heads,
            d,
            &cos[tab(bi)],
            &sin[tab(bi)],
            back,
        );
        if !rest.is_empty() {
            let tb = tab(bi + 1);
            packed_rows(rest, w, 0, t, heads, d, &cos[tb.clone()], &sin[tb], back);
        }
    });
}

/// `(b, h, t, d)`.
type Dims4 = (usize, usize, usize, usize);

/// `[b, h, t, d]` and the pair-row strides of a tensor (shape `dims`, strides `st`) read as
/// `form` — the rows attention reads, offset aside.
fn geometry(dims: &[usize], st: &[usize], form: Heads) -> Result<(Dims4, [usize; 3])> {
    match rows_of(dims, st, 0, form)? {
        Some(([b, h, t, d], r)) => Ok(((b, h, t, d), [r.s0, r.s1, r.s2])),
        None => candle_core::bail!("rope: the last dimension must be contiguous"),
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("rope: f32 only")
        };
        let (dims, st) = geometry(l.dims(), l.stride(), self.form)?;
        let x = &data[l.start_offset()..];
        let y = with_f32(&[&self.cos, &self.sin], |cs| {
            run(x, st, dims, cs[0], cs[1], false, false)
        })?;
        let (b, h, t, d) = dims;
        out(y, &Shape::from((b, h, t, d)))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let ([b, h, t, d], _) = rows_contiguous(x.dims(), self.form)?;
        let merged = matches!(self.form, Heads::Merged(_));
        let dx = with_f32(&[g, &self.cos, &self.sin], |v| {
            run(
                v[0],
                [h * t * d, t * d, d],
                (b, h, t, d),
                v[1],
                v[2],
                true,
                merged,
            )
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Fused rotate-half RoPE: `x` `[b, h, t, d]` (`Split`: any strides with a contiguous last
/// dimension) or `[b, t, h·d]` (`Merged(h)`: a projection's output), `cos`/`sin` `[b, 1, t, d]`
/// → contiguous `[b, h, t, d]`.
pub fn rope(x: &Tensor, form: Heads, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = if geometry(x.dims(), x.stride(), form).is_ok() {
        x.clone()
    } else {
        x.contiguous()?
    };
    let ((b, _, t, d), _) = geometry(x.dims(), x.stride(), form)?;
    if cos.dims() != [b, 1, t, d] || sin.dims() != [b, 1, t, d] || d % 2 != 0 {
        candle_core::bail!(
            "rope: x {:?}, cos {:?}, sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    x.apply_op1(Rope {
        cos: cos.contiguous()?.detach(),
        sin: sin.contiguous()?.detach(),
        form,
    })
}
