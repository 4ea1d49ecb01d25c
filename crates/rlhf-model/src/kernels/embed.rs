//! Token (and GPT-2's position) embedding as one op: `table[ids] (+ pos_table[pos])` → the
//! model's `[b, t, d]` input, straight in its final shape.
//!
//! candle's `index_select` backward allocates a zero table, scatters the rows' gradients into it
//! and then adds that table to the parameter's gradient (another zero table and a full add):
//! four passes over a `[vocab, d]` table for a batch that touched a few hundred rows, plus the
//! add of the token and position parts and a reshape, each a gradient buffer of its own. Here the
//! backward scatters the rows straight into the table's gradient — in a gradient sink
//! ([`super::sink`]) onto what the tied LM head already wrote there, so no pass over the table
//! at all.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{out, sink, slice, uninit, with_f32};

/// The ids and positions of the rows, and the output shape (`[..., d]`).
struct Rows {
    ids: Vec<u32>,
    pos: Vec<u32>,
    shape: Shape,
}

fn check(table: &Layout, ids: &[u32], what: &str) -> Result<(usize, usize)> {
    let (v, d) = table.shape().dims2()?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= v) {
        candle_core::bail!("embedding: {what} {bad} out of range for a table of {v} rows")
    }
    Ok((v, d))
}

/// `dst[r] = table[ids[r]] (+ pos_table[pos[r]])`, in parallel over rows.
fn gather(dst: &mut [f32], d: usize, table: &[f32], ids: &[u32], pos: Option<(&[f32], &[u32])>) {
    dst.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
        let i = ids[r] as usize;
        o.copy_from_slice(&table[i * d..(i + 1) * d]);
        if let Some((pt, p)) = pos {
            let j = p[r] as usize;
            o.iter_mut()
                .zip(&pt[j * d..(j + 1) * d])
                .for_each(|(o, x)| *o += x);
        }
    });
}

/// The gradient of `table` (`[v, d]`) for the rows `ids` and their upstream gradient `g`:
/// into the sink's buffer when it holds `table` (`None`), else returned as a tensor.
fn table_grad(table: &Tensor, ids: &[u32], g: &[f32]) -> Result<Option<Tensor>> {
    let (v, d) = table.dims2()?;
    let grad = sink::weight_grad(table, v * d, |dst, acc| {
        if !acc {
            dst.par_chunks_mut(1 << 14).for_each(|c| c.fill(0.0));
        }
        // Rows repeat (a token id appears many times), so the scatter runs over columns in
        // parallel: each task owns a band of columns of every row.
        let band = d.div_ceil(rayon::current_num_threads().max(1)).max(16);
        let cols: Vec<(usize, usize)> = (0..d)
            .step_by(band)
            .map(|c| (c, (c + band).min(d)))
            .collect();
        let dst = super::SharedOut::new(dst);
        cols.par_iter().for_each(|&(c0, c1)| {
            for (r, &i) in ids.iter().enumerate() {
                let src = &g[r * d + c0..r * d + c1];
                // SAFETY: each task adds to columns c0..c1 only, which no other task touches.
                unsafe { dst.add(i as usize * d + c0, src) };
            }
        });
    });
    grad.map(|v| Tensor::from_vec(v, table.shape(), table.device()))
        .transpose()
}

/// Token embedding: `table [v, d]` at `ids`.
struct Embed(Rows);

impl CustomOp1 for Embed {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, d) = check(l, &self.0.ids, "token id")?;
        let table = slice(s, l, "embedding")?;
        let mut o = uninit(self.0.ids.len() * d);
        gather(&mut o, d, table, &self.0.ids, None);
        out(o, &self.0.shape)
    }
    fn bwd(&self, table: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !table.track_op() {
            return Ok(None);
        }
        with_f32(&[g], |g| table_grad(table, &self.0.ids, g[0]))?
    }
}

/// Token plus position embedding (GPT-2): `table [v, d]` at `ids` + `pos_table [p, d]` at `pos`.
struct EmbedPos(Rows);

impl CustomOp2 for EmbedPos {
    fn name(&self) -> &'static str {
        "embedding-positions"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, d) = check(l1, &self.0.ids, "token id")?;
        let (_, dp) = check(l2, &self.0.pos, "position")?;
        if dp != d {
            candle_core::bail!("embedding: token rows of {d} but position rows of {dp}")
        }
        let (table, pt) = (slice(s1, l1, "embedding")?, slice(s2, l2, "embedding")?);
        let mut o = uninit(self.0.ids.len() * d);
        gather(&mut o, d, table, &self.0.ids, Some((pt, &self.0.pos)));
        out(o, &self.0.shape)
    }
    fn bwd(
        &self,
        table: &Tensor,
        pos_table: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        with_f32(&[g], |g| {
            let dt = if table.track_op() {
                table_grad(table, &self.0.ids, g[0])?
            } else {
                None
            };
            let dp = if pos_table.track_op() {
                table_grad(pos_table, &self.0.pos, g[0])?
            } else {
                None
            };
            Ok((dt, dp))
        })?
    }
}

fn rows(ids: &Tensor, pos: Vec<u32>, d: usize) -> Result<Rows> {
    let mut shape = ids.dims().to_vec();
    shape.push(d);
    Ok(Rows {
        ids: ids.flatten_all()?.to_vec1::<u32>()?,
        pos,
        shape: shape.into(),
    })
}

/// `table[ids]` → `[ids.dims(), d]` for u32 `ids` and an f32 `table [v, d]` on the CPU.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let d = table.dim(1)?;
    table.contiguous()?.apply_op1(Embed(rows(ids, vec![], d)?))
}

/// `table[ids] + pos_table[pos]` → `[ids.dims(), d]`, with one position per id (row-major).
pub fn embedding_with_positions(
    table: &Tensor,
    ids: &Tensor,
    pos_table: &Tensor,
    pos: Vec<u32>,
) -> Result<Tensor> {
    let d = table.dim(1)?;
    let r = rows(ids, pos, d)?;
    if r.pos.len() != r.ids.len() {
        candle_core::bail!(
            "embedding: {} ids but {} positions",
            r.ids.len(),
            r.pos.len()
        )
    }
    table
        .contiguous()?
        .apply_op2(&pos_table.contiguous()?, EmbedPos(r))
}
