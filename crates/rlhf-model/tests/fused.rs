//! Every fused kernel against the composed reference in `ops` (values and gradients, odd sizes,
//! non-contiguous inputs, masked rows) and against central finite differences of itself.

use rlhf_model::kernels::adamw::{adamw_step, AdamW, AdamWState};
use rlhf_model::{fused, ops, DType, Device, Tensor, Var};

const DEV: Device = Device::Cpu;

fn data(n: usize, seed: u64) -> Vec<f32> {
    rlhf_model::linear::seeded_uniform(seed, n, 1.5)
}

type Op = dyn Fn(&[Tensor]) -> Tensor;

fn probe_for(y: &Tensor) -> Tensor {
    let n = y.elem_count();
    let p: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
    Tensor::from_vec(p, y.shape(), &DEV).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

/// Values and gradients (of sum(y·probe)) of `f` at `inputs`.
fn eval(inputs: &[(Vec<f32>, Vec<usize>)], f: &Op) -> (Vec<f32>, Vec<Vec<f32>>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|(v, s)| Var::from_vec(v.clone(), s.as_slice(), &DEV).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let loss = (&y * probe_for(&y)).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let grads = ts
        .iter()
        .map(|t| vals(g.get(t).expect("no gradient")))
        .collect();
    (vals(&y), grads)
}

/// Fused vs composed (values and gradients), then finite differences of the fused op.
fn check(name: &str, inputs: &[(Vec<f32>, Vec<usize>)], fused: &Op, composed: &Op) {
    let (yf, gf) = eval(inputs, fused);
    let (yc, gc) = eval(inputs, composed);
    let e = max_err(&yf, &yc);
    assert!(
        e < 2e-5,
        "{name}: values differ from the composed op by {e}"
    );
    for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
        let e = max_err(a, b);
        assert!(
            e < 1e-4,
            "{name}: gradient {i} differs from the composed op by {e}"
        );
    }
    // Central differences of the fused forward (f32, so a coarse step and tolerance).
    let loss = |inp: &[(Vec<f32>, Vec<usize>)]| -> f64 {
        let ts: Vec<Tensor> = inp
            .iter()
            .map(|(v, s)| Tensor::from_vec(v.clone(), s.as_slice(), &DEV).unwrap())
            .collect();
        let y = fused(&ts);
        let p = probe_for(&y);
        let y = y.to_dtype(DType::F64).unwrap();
        (y * p.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let eps = 1e-2f32;
    for (i, g) in gf.iter().enumerate() {
        for (j, &gj) in g.iter().enumerate() {
            let mut p = inputs.to_vec();
            p[i].0[j] += eps;
            let mut m = inputs.to_vec();
            m[i].0[j] -= eps;
            let fd = (loss(&p) - loss(&m)) / (2.0 * eps as f64);
            let err = (fd - gj as f64).abs();
            assert!(
                err < 5e-3 * (1.0 + fd.abs()),
                "{name}: input {i} element {j}: backward {gj} vs finite difference {fd}"
            );
        }
    }
}

fn inp(n: usize, shape: &[usize], seed: u64) -> (Vec<f32>, Vec<usize>) {
    assert_eq!(n, shape.iter().product::<usize>());
    (data(n, seed), shape.to_vec())
}

#[test]
fn layer_norm_matches_composed_and_fd() {
    let ins = [inp(30, &[2, 3, 5], 1), inp(5, &[5], 2), inp(5, &[5], 3)];
    check(
        "layer_norm",
        &ins,
        &|t| fused::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        &|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
    );
    // Non-contiguous input (a transposed view) and a wide row (vector path + remainder).
    let ins = [
        inp(3 * 37, &[37, 3], 4),
        inp(37, &[37], 5),
        inp(37, &[37], 6),
    ];
    check(
        "layer_norm (transposed input)",
        &ins,
        &|t| fused::layer_norm(&t[0].t().unwrap(), &t[1], &t[2], 1e-5).unwrap(),
        &|t| ops::layer_norm(&t[0].t().unwrap(), &t[1], &t[2], 1e-5).unwrap(),
    );
}

/// Rows of different scales and offsets, so a row normalised with another row's statistics
/// gives a different value.
fn uneven_rows(rows: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let v = data(rows * d, seed)
        .iter()
        .enumerate()
        .map(|(i, x)| x * (1 + i / d % 7) as f32 + (i / d % 5) as f32)
        .collect();
    (v, vec![rows, d])
}

/// Enough rows for several of the backward's parallel chunks (64 rows each): the backward
/// reads each row's statistics saved by the forward, and must read the right row's.
#[test]
fn norms_over_many_rows_match_composed_and_fd() {
    let (rows, d) = (150, 24);
    let ins = [uneven_rows(rows, d, 11), inp(d, &[d], 12), inp(d, &[d], 13)];
    check(
        "layer_norm (150 rows)",
        &ins,
        &|t| fused::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        &|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
    );
    check(
        "rms_norm (150 rows)",
        &ins[..2],
        &|t| fused::rms_norm(&t[0], &t[1], 1e-6).unwrap(),
        &|t| ops::rms_norm(&t[0], &t[1], 1e-6).unwrap(),
    );
}

#[test]
fn rms_norm_matches_composed_and_fd() {
    let ins = [inp(42, &[2, 3, 7], 7), inp(7, &[7], 8)];
    check(
        "rms_norm",
        &ins,
        &|t| fused::rms_norm(&t[0], &t[1], 1e-6).unwrap(),
        &|t| ops::rms_norm(&t[0], &t[1], 1e-6).unwrap(),
    );
    let ins = [inp(3 * 35, &[35, 3], 9), inp(35, &[35], 10)];
    check(
        "rms_norm (transposed input)",
        &ins,
        &|t| fused::rms_norm(&t[0].t().unwrap(), &t[1], 1e-6).unwrap(),
        &|t| ops::rms_norm(&t[0].t().unwrap(), &t[1], 1e-6).unwrap(),
    );
}

#[test]
fn activations_match_composed_and_fd() {
    let mut x = data(43, 11);
    x[0] = 0.0;
    x[1] = -6.0;
    x[2] = 7.0;
    let ins = [(x, vec![43])];
    check(
        "gelu_tanh",
        &ins,
        &|t| fused::gelu_tanh(&t[0]).unwrap(),
        &|t| ops::gelu_tanh(&t[0]).unwrap(),
    );
    check(
        "gelu_tanh (transposed)",
        &[inp(42, &[6, 7], 12)],
        &|t| fused::gelu_tanh(&t[0].t().unwrap()).unwrap(),
        &|t| ops::gelu_tanh(&t[0].t().unwrap()).unwrap(),
    );
    check(
        "silu",
        &[inp(41, &[41], 13)],
        &|t| rlhf_model::kernels::elementwise::silu(&t[0]).unwrap(),
        &|t| t[0].silu().unwrap(),
    );
    check(
        "swiglu",
        &[inp(39, &[3, 13], 14), inp(39, &[3, 13], 15)],
        &|t| fused::swiglu(&t[0], &t[1]).unwrap(),
        &|t| (t[0].silu().unwrap() * &t[1]).unwrap(),
    );
}

#[test]
fn big_elementwise_ops_match_composed() {
    // Many parallel chunks and every vector tail.
    let n = 3 * 8192 + 13;
    let x = Tensor::from_vec(data(n, 16), n, &DEV).unwrap();
    let e = max_err(
        &vals(&fused::gelu_tanh(&x).unwrap()),
        &vals(&ops::gelu_tanh(&x).unwrap()),
    );
    assert!(e < 2e-6, "gelu: {e}");
}

fn bias(mask: &[Vec<u8>], offset: usize, tq: usize) -> Tensor {
    ops::attention_bias(mask, offset, tq, &DEV).unwrap()
}

#[test]
fn attention_matches_composed_and_fd() {
    // b=2, h=2, t=5, d=4; row 1 left-padded by two: its first two queries see no key at all.
    let mask = vec![vec![1u8; 5], vec![0, 0, 1, 1, 1]];
    let b = bias(&mask, 0, 5);
    let ins = [
        inp(80, &[2, 2, 5, 4], 21),
        inp(80, &[2, 2, 5, 4], 22),
        inp(80, &[2, 2, 5, 4], 23),
    ];
    // Same forward values everywhere, padding queries included.
    let ts: Vec<Tensor> = ins
        .iter()
        .map(|(v, s)| Tensor::from_vec(v.clone(), s.as_slice(), &DEV).unwrap())
        .collect();
    let e = max_err(
        &vals(&fused::attention(&ts[0], &ts[1], &ts[2], &b).unwrap()),
        &vals(&ops::attention(&ts[0], &ts[1], &ts[2], &b).unwrap()),
    );
    assert!(e < 2e-5, "attention with padding: {e}");
    // Gradients as a real loss sees them: padding queries' outputs are masked out.
    let keep: Vec<f32> = (0..80)
        .map(|i| if i / 20 >= 2 && i % 20 < 8 { 0.0 } else { 1.0 })
        .collect();
    let keep = Tensor::from_vec(keep, (2, 2, 5, 4), &DEV).unwrap();
    let (b1, b2, k1, k2) = (b.clone(), b.clone(), keep.clone(), keep);
    check(
        "attention",
        &ins,
        &move |t| (fused::attention(&t[0], &t[1], &t[2], &b1).unwrap() * &k1).unwrap(),
        &move |t| (ops::attention(&t[0], &t[1], &t[2], &b2).unwrap() * &k2).unwrap(),
    );
    // Non-contiguous q/k/v ([b, t, h, d] transposed to [b, h, t, d], as the models do) and a
    // KV-cache shape: 2 new queries over 6 slots with a padded slot in the middle.
    let mask = vec![vec![1u8, 1, 0, 1, 1, 1], vec![1u8; 6]];
    let b = bias(&mask, 4, 2);
    let ins = [
        inp(48, &[2, 2, 3, 4], 24),
        inp(144, &[2, 6, 3, 4], 25),
        inp(144, &[2, 6, 3, 4], 26),
    ];
    let (b1, b2) = (b.clone(), b);
    let tr = |t: &Tensor| t.transpose(1, 2).unwrap();
    check(
        "attention (cache, strided)",
        &ins,
        &move |t| fused::attention(&tr(&t[0]), &tr(&t[1]), &tr(&t[2]), &b1).unwrap(),
        &move |t| ops::attention(&tr(&t[0]), &tr(&t[1]), &tr(&t[2]), &b2).unwrap(),
    );
}

#[test]
fn attention_gqa_and_cache_views() {
    // Grouped-query attention: 4 query heads over 2 kv heads, never repeating k/v; the composed
    // reference repeats them. Row 1 is left-padded.
    let mask = vec![vec![1u8; 5], vec![0, 1, 1, 1, 1]];
    let b = bias(&mask, 0, 5);
    let ins = [
        inp(160, &[2, 4, 5, 4], 41),
        inp(80, &[2, 2, 5, 4], 42),
        inp(80, &[2, 2, 5, 4], 43),
    ];
    let keep: Vec<f32> = (0..160)
        .map(|i| if i / 80 == 1 && i % 20 < 4 { 0.0 } else { 1.0 })
        .collect();
    let keep = Tensor::from_vec(keep, (2, 4, 5, 4), &DEV).unwrap();
    let rep = |t: &Tensor| ops::repeat_kv(t, 2).unwrap();
    let (b1, b2, k1, k2) = (b.clone(), b, keep.clone(), keep);
    check(
        "attention (GQA)",
        &ins,
        &move |t| (fused::attention(&t[0], &t[1], &t[2], &b1).unwrap() * &k1).unwrap(),
        &move |t| (ops::attention(&t[0], &rep(&t[1]), &rep(&t[2]), &b2).unwrap() * &k2).unwrap(),
    );
    // k/v as a KV cache hands them over: the first 6 of 9 preallocated slots of a
    // [b, kv_heads, capacity, d] buffer, read in place (strided blocks), GQA as well.
    let mask = vec![vec![1u8, 1, 0, 1, 1, 1], vec![1u8; 6]];
    let b = bias(&mask, 4, 2);
    let ins = [
        inp(64, &[2, 4, 2, 4], 44),
        inp(144, &[2, 2, 9, 4], 45),
        inp(144, &[2, 2, 9, 4], 46),
    ];
    let n = |t: &Tensor| t.narrow(2, 0, 6).unwrap();
    let (b1, b2) = (b.clone(), b);
    check(
        "attention (cache buffer view, GQA)",
        &ins,
        &move |t| fused::attention(&t[0], &n(&t[1]), &n(&t[2]), &b1).unwrap(),
        &move |t| ops::attention(&t[0], &rep(&n(&t[1])), &rep(&n(&t[2])), &b2).unwrap(),
    );
}

#[test]
fn rope_matches_composed_and_fd() {
    // [b, t, h, d] transposed to [b, h, t, d], as the models call it: read in place.
    let (b, t, h, d) = (2, 3, 2, 6);
    let pos = vec![vec![0u32, 1, 2], vec![5, 6, 7]];
    let (cos, sin) = ops::rope_tables(&pos, d, 10000.0, &DEV).unwrap();
    let ins = [inp(b * t * h * d, &[b, t, h, d], 51)];
    let (c1, s1, c2, s2) = (cos.clone(), sin.clone(), cos.clone(), sin.clone());
    check(
        "rope (transposed input)",
        &ins,
        &move |x| fused::rope(&x[0].transpose(1, 2).unwrap(), &c1, &s1).unwrap(),
        &move |x| ops::rope(&x[0].transpose(1, 2).unwrap(), &c2, &s2).unwrap(),
    );
    // The projection's own [b, t, h·d] output, read in place as h heads.
    let ins = [inp(b * t * h * d, &[b, t, h * d], 53)];
    let (c1, s1, c2, s2) = (cos.clone(), sin.clone(), cos, sin);
    check(
        "rope (merged heads)",
        &ins,
        &move |x| fused::rope_heads(&x[0], fused::Heads::Merged(h), &c1, &s1).unwrap(),
        &move |x| ops::rope(&heads(&x[0], h), &c2, &s2).unwrap(),
    );
    // Contiguous input, head_dim 64 (vector path).
    let (b, h, t, d) = (1, 2, 5, 64);
    let pos = vec![(0..t as u32).collect::<Vec<_>>()];
    let (cos, sin) = ops::rope_tables(&pos, d, 500000.0, &DEV).unwrap();
    let ins = [inp(b * h * t * d, &[b, h, t, d], 52)];
    let (c1, s1, c2, s2) = (cos.clone(), sin.clone(), cos, sin);
    check(
        "rope",
        &ins,
        &move |x| fused::rope(&x[0], &c1, &s1).unwrap(),
        &move |x| ops::rope(&x[0], &c2, &s2).unwrap(),
    );
}

#[test]
fn attention_blocked_over_several_query_blocks() {
    // 70 queries: three blocks of the blocked path (32 + 32 + 6); row 1 left-padded by 5
    // (its first 5 queries see no key), causal, grouped-query (2 query heads per kv head).
    let (b, h, hk, t, d) = (2, 4, 2, 70, 8);
    let mut pad = vec![0u8; 5];
    pad.extend(vec![1u8; t - 5]);
    let mask = vec![vec![1u8; t], pad];
    let bi = bias(&mask, 0, t);
    let ins = [
        inp(b * h * t * d, &[b, h, t, d], 81),
        inp(b * hk * t * d, &[b, hk, t, d], 82),
        inp(b * hk * t * d, &[b, hk, t, d], 83),
    ];
    let keep: Vec<f32> = (0..b * h * t * d)
        .map(|i| {
            let (row, pos) = (i / (h * t * d), (i / d) % t);
            if row == 1 && pos < 5 {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    let keep = Tensor::from_vec(keep, (b, h, t, d), &DEV).unwrap();
    let rep = move |x: &Tensor| ops::repeat_kv(x, h / hk).unwrap();
    let (b1, b2, k1, k2) = (bi.clone(), bi, keep.clone(), keep);
    check(
        "attention (blocked, 3 query blocks)",
        &ins,
        &move |x| (fused::attention(&x[0], &x[1], &x[2], &b1).unwrap() * &k1).unwrap(),
        &move |x| (ops::attention(&x[0], &rep(&x[1]), &rep(&x[2]), &b2).unwrap() * &k2).unwrap(),
    );
}

/// `[b, t, h·d]` → `[b, h, t, d]`, composed.
fn heads(x: &Tensor, h: usize) -> Tensor {
    let (b, t, w) = x.dims3().unwrap();
    x.reshape((b, t, h, w / h))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
}

/// `[b, h, t, d]` → `[b, t, h·d]`, composed.
fn merge(y: &Tensor) -> Tensor {
    let (b, h, t, d) = y.dims4().unwrap();
    y.transpose(1, 2).unwrap().reshape((b, t, h * d)).unwrap()
}

/// Zero the outputs of row 1's first `pad` queries ([b, t, w] output): a padding query's
/// output is masked out of any real loss, and its gradient is not the composed op's.
fn keep_merged(b: usize, t: usize, w: usize, pad: usize) -> Tensor {
    let keep: Vec<f32> = (0..b * t * w)
        .map(|i| {
            if i / (t * w) == 1 && (i / w) % t < pad {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    Tensor::from_vec(keep, (b, t, w), &DEV).unwrap()
}

#[test]
fn attention_packed_matches_composed_and_fd() {
    // GPT-2's c_attn output [b, t, 3·h·d] read in place, output [b, t, h·d]; 37 queries (two
    // blocks), row 1 left-padded by 3. Then grouped-query packing (4 q heads, 2 kv heads).
    for (h, hk, t, seed) in [(2, 2, 37, 61), (4, 2, 6, 62)] {
        let (b, d, pad) = (2, 4, 3);
        let mut row = vec![0u8; pad];
        row.extend(vec![1u8; t - pad]);
        let bi = bias(&[vec![1u8; t], row], 0, t);
        let w = (h + 2 * hk) * d;
        let ins = [inp(b * t * w, &[b, t, w], seed)];
        let keep = keep_merged(b, t, h * d, pad);
        let rep = move |x: &Tensor| ops::repeat_kv(x, h / hk).unwrap();
        let (b1, b2, k1, k2) = (bi.clone(), bi.clone(), keep.clone(), keep);
        check(
            &format!("packed attention (h {h}, hk {hk})"),
            &ins,
            &move |x| (fused::attention_packed(&x[0], h, hk, &b1).unwrap() * &k1).unwrap(),
            &move |x| {
                let part =
                    |first: usize, n: usize| heads(&x[0].narrow(2, first * d, n * d).unwrap(), n);
                let (q, k, v) = (part(0, h), rep(&part(h, hk)), rep(&part(h + hk, hk)));
                (merge(&ops::attention(&q, &k, &v, &b2).unwrap()) * &k2).unwrap()
            },
        );
        // f64 takes the composed path of the same entry point: same values (padding queries
        // aside: in f64 `-1e9 + score` keeps the scores apart, so they do not attend uniformly).
        let keep = keep_merged(b, t, h * d, pad);
        let x = Tensor::from_vec(ins[0].0.clone(), (b, t, w), &DEV).unwrap();
        let y32 = (fused::attention_packed(&x, h, hk, &bi).unwrap() * &keep).unwrap();
        let x64 = x.to_dtype(DType::F64).unwrap();
        let b64 = bi.to_dtype(DType::F64).unwrap();
        let y64 = fused::attention_packed(&x64, h, hk, &b64).unwrap();
        let y64 = (y64.to_dtype(DType::F32).unwrap() * &keep).unwrap();
        assert!(
            max_err(&vals(&y32), &vals(&y64)) < 2e-5,
            "packed attention, f64 path"
        );
    }
}

#[test]
fn attention_forms_match_composed_and_fd() {
    use rlhf_model::fused::Heads::{Merged, Split};
    // Llama's call: q and k [b, h, t, d] (RoPE's output), v the projection's [b, t, hk·d],
    // output [b, t, h·d]; grouped-query, row 1 left-padded by 2.
    let (b, h, hk, t, d, pad) = (2, 4, 2, 7, 4, 2);
    let mut row = vec![0u8; pad];
    row.extend(vec![1u8; t - pad]);
    let bi = bias(&[vec![1u8; t], row], 0, t);
    let ins = [
        inp(b * h * t * d, &[b, h, t, d], 71),
        inp(b * hk * t * d, &[b, hk, t, d], 72),
        inp(b * t * hk * d, &[b, t, hk * d], 73),
    ];
    let keep = keep_merged(b, t, h * d, pad);
    let rep = move |x: &Tensor| ops::repeat_kv(x, h / hk).unwrap();
    let (b1, b2, k1, k2) = (bi.clone(), bi.clone(), keep.clone(), keep);
    check(
        "attention (v merged, output merged)",
        &ins,
        &move |x| {
            let y = fused::attention_forms(
                (&x[0], Split),
                (&x[1], Split),
                (&x[2], Merged(hk)),
                &b1,
                Merged(h),
            );
            (y.unwrap() * &k1).unwrap()
        },
        &move |x| {
            let y = ops::attention(&x[0], &rep(&x[1]), &rep(&heads(&x[2], hk)), &b2).unwrap();
            (merge(&y) * &k2).unwrap()
        },
    );
    // Every input merged, output split; no padding, so nothing masked.
    let bi = bias(&[vec![1u8; t], vec![1u8; t]], 0, t);
    let ins = [
        inp(b * t * h * d, &[b, t, h * d], 74),
        inp(b * t * hk * d, &[b, t, hk * d], 75),
        inp(b * t * hk * d, &[b, t, hk * d], 76),
    ];
    let (b1, b2) = (bi.clone(), bi);
    check(
        "attention (inputs merged, output split)",
        &ins,
        &move |x| {
            let m = |i: usize, n: usize| (&x[i], Merged(n));
            fused::attention_forms(m(0, h), m(1, hk), m(2, hk), &b1, Split).unwrap()
        },
        &move |x| {
            let (q, k, v) = (
                heads(&x[0], h),
                rep(&heads(&x[1], hk)),
                rep(&heads(&x[2], hk)),
            );
            ops::attention(&q, &k, &v, &b2).unwrap()
        },
    );
    // A wrong output head count is an error, not a silent reshape.
    let x = Tensor::zeros((b, h, t, d), DType::F32, &DEV).unwrap();
    let kv = Tensor::zeros((b, hk, t, d), DType::F32, &DEV).unwrap();
    let e = fused::attention_forms(
        (&x, Split),
        (&kv, Split),
        (&kv, Split),
        &bias(&[vec![1u8; t], vec![1u8; t]], 0, t),
        Merged(3),
    );
    assert!(e.is_err());
}

#[test]
fn attention_long_rows() {
    // Longer than the vector width, head_dim 64 as in GPT-2.
    let (b, h, t, d) = (1, 2, 37, 64);
    let mk = |s| Tensor::from_vec(data(b * h * t * d, s), (b, h, t, d), &DEV).unwrap();
    let (q, k, v) = (mk(31), mk(32), mk(33));
    let bi = bias(&[vec![1u8; t]], 0, t);
    let e = max_err(
        &vals(&fused::attention(&q, &k, &v, &bi).unwrap()),
        &vals(&ops::attention(&q, &k, &v, &bi).unwrap()),
    );
    assert!(e < 2e-5, "attention: {e}");
}

#[test]
fn token_logprobs_matches_composed_and_fd() {
    let targets = Tensor::from_vec(vec![0u32, 6, 3, 2, 5], 5, &DEV).unwrap();
    let (t1, t2) = (targets.clone(), targets.clone());
    check(
        "token_logprobs",
        &[inp(35, &[5, 7], 41)],
        &move |t| fused::token_logprobs(&t[0], &t1).unwrap(),
        &move |t| ops::token_logprobs(&t[0], &t2).unwrap(),
    );
    // Non-contiguous logits, and a masked-looking row (one huge negative logit).
    let mut x = data(35, 42);
    x[3] = -1e9;
    let (t1, t2) = (targets.clone(), targets);
    let (yf, gf) = eval(&[(x.clone(), vec![7, 5])], &move |t| {
        fused::token_logprobs(&t[0].t().unwrap(), &t1).unwrap()
    });
    let (yc, gc) = eval(&[(x, vec![7, 5])], &move |t| {
        ops::token_logprobs(&t[0].t().unwrap(), &t2).unwrap()
    });
    assert!(max_err(&yf, &yc) < 2e-5 && max_err(&gf[0], &gc[0]) < 1e-5);
    // Out-of-range targets are an error, not a crash.
    let bad = Tensor::from_vec(vec![9u32], 1, &DEV).unwrap();
    let l = Tensor::zeros((1, 7), DType::F32, &DEV).unwrap();
    assert!(fused::token_logprobs(&l, &bad).is_err());
}

#[test]
fn token_logprobs_wide_vocab() {
    let (n, v) = (3, 1000);
    let x = Tensor::from_vec(data(n * v, 43), (n, v), &DEV).unwrap();
    let t = Tensor::from_vec(vec![0u32, 999, 517], n, &DEV).unwrap();
    let e = max_err(
        &vals(&fused::token_logprobs(&x, &t).unwrap()),
        &vals(&ops::token_logprobs(&x, &t).unwrap()),
    );
    assert!(e < 1e-5, "{e}");
}

/// A second backward over the graph of a head op's output `out` (the first consumed the op's
/// kept buffer, so this one recomputes it) gives the same gradients.
fn assert_second_backward_agrees(out: &Tensor, vars: [&Var; 2]) {
    let loss = (out * probe_for(out)).unwrap().sum_all().unwrap();
    let (g1, g2) = (loss.backward().unwrap(), loss.backward().unwrap());
    for v in vars {
        let e = max_err(&vals(g2.get(v).unwrap()), &vals(g1.get(v).unwrap()));
        assert!(e < 1e-6, "second backward differs by {e}");
    }
}

#[test]
fn head_logprobs_matches_composed_and_fd() {
    let targets = Tensor::from_vec(vec![0u32, 6, 3, 2, 5], 5, &DEV).unwrap();
    for scale in [1.0, 1.0 / 0.7] {
        let (t1, t2) = (targets.clone(), targets.clone());
        check(
            "head_logprobs",
            &[inp(20, &[5, 4], 51), inp(28, &[7, 4], 52)],
            &move |t| {
                fused::head_logprobs(&t[0], &t[1], &t1, scale)
                    .unwrap()
                    .unwrap()
            },
            &move |t| {
                let logits = (t[0].matmul(&t[1].t().unwrap()).unwrap() * scale).unwrap();
                ops::token_logprobs(&logits, &t2).unwrap()
            },
        );
    }
    // A second backward over the same graph (the first consumed the kept exponentials, so this
    // one recomputes them) gives the same gradients.
    let h = Var::from_vec(data(20, 55), (5, 4), &DEV).unwrap();
    let w = Var::from_vec(data(28, 56), (7, 4), &DEV).unwrap();
    let lp = fused::head_logprobs(h.as_tensor(), w.as_tensor(), &targets, 1.0 / 0.7)
        .unwrap()
        .unwrap();
    assert_second_backward_agrees(&lp, [&h, &w]);
    // Without gradients the logits are computed in row blocks (more rows than a block).
    let (n, v, d) = (150, 33, 8);
    let h = Tensor::from_vec(data(n * d, 53), (n, d), &DEV).unwrap();
    let w = Tensor::from_vec(data(v * d, 54), (v, d), &DEV).unwrap();
    let t: Vec<u32> = (0..n as u32).map(|i| i * 7 % v as u32).collect();
    let t = Tensor::from_vec(t, n, &DEV).unwrap();
    let logits = h.matmul(&w.t().unwrap()).unwrap();
    let e = max_err(
        &vals(&fused::head_logprobs(&h, &w, &t, 1.0).unwrap().unwrap()),
        &vals(&ops::token_logprobs(&logits, &t).unwrap()),
    );
    assert!(e < 1e-5, "{e}");
}

/// (log p(target), entropy) per row, composed: [n, 2].
fn composed_lp_entropy(h: &Tensor, w: &Tensor, targets: &Tensor, scale: f64) -> Tensor {
    let logits = (h.matmul(&w.t().unwrap()).unwrap() * scale).unwrap();
    let lp = ops::token_logprobs(&logits, targets).unwrap();
    let ent = ops::entropy(&logits).unwrap();
    Tensor::stack(&[lp, ent], 1).unwrap()
}

#[test]
fn head_logprobs_entropy_matches_composed_and_fd() {
    let targets = Tensor::from_vec(vec![0u32, 6, 3, 2, 5], 5, &DEV).unwrap();
    for scale in [1.0, 1.0 / 0.7, 3.0] {
        let (t1, t2) = (targets.clone(), targets.clone());
        // The probe weights both columns, so the entropy's gradient is checked too.
        check(
            "head_logprobs_entropy",
            &[inp(20, &[5, 4], 71), inp(28, &[7, 4], 72)],
            &move |t| {
                fused::head_logprobs_entropy(&t[0], &t[1], &t1, scale)
                    .unwrap()
                    .unwrap()
            },
            &move |t| composed_lp_entropy(&t[0], &t[1], &t2, scale),
        );
    }
    // Only the log-prob column in the loss (PPO without an entropy bonus): the gradients of
    // `head_logprobs`.
    let h = Var::from_vec(data(20, 73), (5, 4), &DEV).unwrap();
    let w = Var::from_vec(data(28, 74), (7, 4), &DEV).unwrap();
    let grads = |entropy: bool| {
        let lp = if entropy {
            fused::head_logprobs_entropy(h.as_tensor(), w.as_tensor(), &targets, 1.0 / 0.7)
                .unwrap()
                .unwrap()
                .narrow(1, 0, 1)
                .unwrap()
                .squeeze(1)
                .unwrap()
        } else {
            fused::head_logprobs(h.as_tensor(), w.as_tensor(), &targets, 1.0 / 0.7)
                .unwrap()
                .unwrap()
        };
        let g = (&lp * probe_for(&lp))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        [&h, &w].map(|v| vals(g.get(v).unwrap()))
    };
    let (a, b) = (grads(true), grads(false));
    for (x, y) in a.iter().zip(&b) {
        let e = max_err(x, y);
        assert!(e < 1e-6, "log-prob column's gradients differ by {e}");
    }
    // A second backward over the same graph recomputes the consumed buffer.
    let out = fused::head_logprobs_entropy(h.as_tensor(), w.as_tensor(), &targets, 2.0)
        .unwrap()
        .unwrap();
    assert_second_backward_agrees(&out, [&h, &w]);
    // Without gradients, in row blocks, over a wide vocabulary with near-one-hot rows (large
    // logits: entropy ≈ 0 must not lose its precision or turn NaN) and flat ones.
    let (n, v, d) = (150, 1000, 8);
    let mut hd = data(n * d, 75);
    hd[..8 * d].iter_mut().for_each(|x| *x *= 60.0);
    hd[8 * d..16 * d].iter_mut().for_each(|x| *x = 0.0);
    let h = Tensor::from_vec(hd, (n, d), &DEV).unwrap();
    let w = Tensor::from_vec(data(v * d, 76), (v, d), &DEV).unwrap();
    let t: Vec<u32> = (0..n as u32).map(|i| i * 37 % v as u32).collect();
    let t = Tensor::from_vec(t, n, &DEV).unwrap();
    let f = vals(
        &fused::head_logprobs_entropy(&h, &w, &t, 1.0)
            .unwrap()
            .unwrap(),
    );
    let c = vals(&composed_lp_entropy(&h, &w, &t, 1.0));
    assert!(f.iter().all(|x| x.is_finite()));
    let e = max_err(&f, &c);
    assert!(e < 1e-4, "{e}");
    // The flat rows' entropy is ln V.
    assert!(
        (f[2 * 8 + 1] - (v as f32).ln()).abs() < 1e-4,
        "{}",
        f[2 * 8 + 1]
    );
    assert!(fused::head_logprobs_entropy(&h, &w, &t, 0.0).is_err());
}

/// Under gradient checkpointing the head keeps no [n × V] buffer: its backward computes the
/// logits again, a chunk of rows at a time (64 rows at this vocabulary). Both forms' gradients
/// and outputs must be those of the kept buffer.
#[test]
fn head_backward_in_chunks_matches_the_kept_buffer() {
    use rlhf_model::kernels::block::recompute_activations;
    let (n, v, d) = (150, 1 << 18, 8);
    let h = Var::from_vec(data(n * d, 81), (n, d), &DEV).unwrap();
    let w = Var::from_vec(data(v * d, 82), (v, d), &DEV).unwrap();
    let t: Vec<u32> = (0..n as u32).map(|i| i * 7919 % v as u32).collect();
    let t = Tensor::from_vec(t, n, &DEV).unwrap();
    for entropy in [false, true] {
        let run = |recompute: bool| {
            let _r = recompute_activations(recompute);
            let out = match entropy {
                true => fused::head_logprobs_entropy(h.as_tensor(), w.as_tensor(), &t, 1.3),
                false => fused::head_logprobs(h.as_tensor(), w.as_tensor(), &t, 1.3),
            };
            let out = out.unwrap().unwrap();
            let g = (&out * probe_for(&out))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let [dh, dw] = [&h, &w].map(|x| vals(g.get(x).unwrap()));
            (vals(&out), dh, dw)
        };
        let (o0, dh0, dw0) = run(false);
        let (o1, dh1, dw1) = run(true);
        assert!(max_err(&o0, &o1) < 1e-6, "entropy {entropy}: outputs");
        let e = max_err(&dh0, &dh1);
        assert!(e < 1e-5, "entropy {entropy}: dh differs by {e}");
        let scale = dw0.iter().map(|x| x.abs()).fold(0f32, f32::max);
        let e = max_err(&dw0, &dw1);
        assert!(
            e < 1e-5 * scale.max(1.0),
            "entropy {entropy}: dW differs by {e}"
        );
    }
}

/// Few rows (the decoding path streams `b` without packing it) over a long inner dimension:
/// the sums must keep f32's accuracy, not lose it in one running sum over 200 000 terms.
#[test]
fn few_row_products_over_a_long_inner_dimension_stay_accurate() {
    use rlhf_model::kernels::gemm::{sgemm, Mat};
    let (m, n, k) = (8, 40, 200_000);
    let a: Vec<f32> = data(m * k, 91).iter().map(|x| x.abs() + 0.5).collect();
    let b: Vec<f32> = data(k * n, 92).iter().map(|x| x.abs() + 0.5).collect();
    let mut c = vec![0f32; m * n];
    let am = Mat {
        data: &a,
        rs: k,
        cs: 1,
    };
    let bm = Mat {
        data: &b,
        rs: n,
        cs: 1,
    };
    sgemm(m, n, k, am, bm, &mut c, false);
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k)
                .map(|t| a[i * k + t] as f64 * b[t * n + j] as f64)
                .sum();
            let e = (c[i * n + j] as f64 - want).abs() / want;
            assert!(e < 1e-6, "({i}, {j}): relative error {e}");
        }
    }
}

#[test]
fn matmul_nt_matches_matmul() {
    use rlhf_model::kernels::matmul::{linear, linear_bias, matmul_nt_op};
    for (m, k, n) in [(3, 37, 300), (40, 19, 21)] {
        check(
            "matmul_nt",
            &[inp(m * k, &[m, k], 61), inp(n * k, &[n, k], 62)],
            &|t| matmul_nt_op(&t[0], &t[1]).unwrap(),
            &|t| t[0].matmul(&t[1].t().unwrap()).unwrap(),
        );
    }
    // A [b, t, k] input (decoding: one new token per sequence) → [b, t, n].
    let (k, n) = (37, 30);
    check(
        "matmul_nt (3-d input)",
        &[inp(3 * k, &[3, 1, k], 66), inp(n * k, &[n, k], 62)],
        &|t| matmul_nt_op(&t[0], &t[1]).unwrap(),
        &move |t| {
            let x = t[0].reshape((3, k)).unwrap();
            x.matmul(&t[1].t().unwrap())
                .unwrap()
                .reshape((3, 1, n))
                .unwrap()
        },
    );
    // The decode kernel's blocks (4 weight rows × up to 4 input rows) and every tail: input
    // rows 1..=17 and around the kernels' limit (64; 65 takes the GEMM), weight rows not a
    // multiple of 4, k not a multiple of 16.
    use rlhf_model::kernels::{gemm::SMALL_ROWS, matmul::SMALL_M};
    assert_eq!((SMALL_M, SMALL_ROWS), (64, 64), "update the rows below");
    for m in (1..=17).chain([31, 63, 64, 65]) {
        for (k, n) in [(5, 3), (16, 4), (37, 9), (64, 130), (100, 7)] {
            let x = Tensor::from_vec(data(m * k, 63), (m, k), &DEV).unwrap();
            let w = Tensor::from_vec(data(n * k, 64), (n, k), &DEV).unwrap();
            let e = max_err(
                &vals(&matmul_nt_op(&x, &w).unwrap()),
                &vals(&x.matmul(&w.t().unwrap()).unwrap()),
            );
            assert!(e < 1e-5, "matmul_nt m={m} k={k} n={n}: {e}");
            // The same product with the weight stored [k, n] (GPT-2's Conv1D), and with a bias
            // the kernel accumulates onto: few rows take the row-streaming kernel.
            let wt = w.t().unwrap().contiguous().unwrap();
            let bias = Tensor::from_vec(data(n, 65), n, &DEV).unwrap();
            let want = x.matmul(&wt).unwrap();
            let e = max_err(&vals(&linear(&x, &wt, true).unwrap()), &vals(&want));
            assert!(e < 1e-5, "linear (transposed) m={m} k={k} n={n}: {e}");
            let want = want.broadcast_add(&bias).unwrap();
            let got = linear_bias(&x, &wt, &bias, true).unwrap();
            assert!(
                max_err(&vals(&got), &vals(&want)) < 1e-5,
                "linear_bias m={m}"
            );
        }
    }
}

/// Decoding's packed weights: the tile (8 rows × 48 columns) and every tail, against candle's
/// product; then the scope: what it packs, when, and that the result is the same.
#[test]
fn packed_matmul_matches_matmul() {
    use rlhf_model::kernels::matmul::matmul_nt_op;
    use rlhf_model::kernels::packed::{pack_scope, pack_scope_within, packed_in_scope, PackedNt};
    for m in (1..=17).chain([31, 63, 64]) {
        for (k, n) in [(1, 3), (5, 47), (16, 48), (37, 49), (64, 130), (100, 97)] {
            let x = data(m * k, 63);
            let w = data(n * k, 64);
            let mut o = vec![f32::NAN; m * n];
            PackedNt::pack(&w, n, k).matmul(&x, m, &mut o);
            let xt = Tensor::from_vec(x.clone(), (m, k), &DEV).unwrap();
            let wt = Tensor::from_vec(w, (n, k), &DEV).unwrap();
            let want = vals(&xt.matmul(&wt.t().unwrap()).unwrap());
            let e = max_err(&o, &want);
            assert!(e < 1e-5, "packed m={m} k={k} n={n}: {e}");
            // The same weight stored [k, n] (GPT-2's Conv1D).
            let kn = vals(&wt.t().unwrap().contiguous().unwrap());
            let mut o = vec![f32::NAN; m * n];
            PackedNt::pack_as(&kn, n, k, true).matmul(&x, m, &mut o);
            let e = max_err(&o, &want);
            assert!(e < 1e-5, "packed [k, n] m={m} k={k} n={n}: {e}");
        }
    }
    let (k, n) = (37, 130);
    let w = Tensor::from_vec(data(n * k, 64), (n, k), &DEV).unwrap();
    let x = |m: usize| Tensor::from_vec(data(m * k, 63), (m, 1, k), &DEV).unwrap();
    let want = |m: usize| {
        vals(
            &x(m)
                .reshape((m, k))
                .unwrap()
                .matmul(&w.t().unwrap())
                .unwrap(),
        )
    };
    assert_eq!(packed_in_scope(), (0, 0));
    // Packing is on with AVX-512 (unless RLHF_DECODE_PACK=0); elsewhere the dot products.
    let one = |bytes: usize| match rlhf_model::kernels::packed::enabled() {
        true => (1, bytes),
        false => (0, 0),
    };
    {
        let _scope = pack_scope();
        // Fewer rows than the packing threshold: the dot-product kernel, nothing packed.
        let y = matmul_nt_op(&x(8), &w).unwrap();
        assert!(max_err(&vals(&y), &want(8)) < 1e-5);
        assert_eq!(packed_in_scope().0, 0);
        // 16 to 256 rows pack the weight once ([b, 1, k] input, as decoding's), and reuse it.
        for m in [16, 40, 64, 200, 256, 16] {
            let y = matmul_nt_op(&x(m), &w).unwrap();
            assert_eq!(y.dims(), [m, 1, n]);
            assert!(max_err(&vals(&y), &want(m)) < 1e-5, "m={m}");
            assert_eq!(packed_in_scope(), one(3 * 48 * k * 4), "m={m}");
        }
        // More rows take the GEMM.
        let y = matmul_nt_op(&x(257), &w).unwrap();
        assert!(max_err(&vals(&y), &want(257)) < 1e-5);
        assert_eq!(packed_in_scope(), one(3 * 48 * k * 4));
        // The weight stored [k, n] through the linear op: a second packed copy.
        let wkn = w.t().unwrap().contiguous().unwrap();
        let y = rlhf_model::kernels::matmul::linear(&x(100), &wkn, true).unwrap();
        assert!(max_err(&vals(&y), &want(100)) < 1e-5);
        let two = one(0).0 * 2;
        assert_eq!(packed_in_scope(), (two, two * 3 * 48 * k * 4));
        // Nested scopes share the copies; a weight recording a graph is never packed.
        {
            let _inner = pack_scope();
            let v = candle_core::Var::from_tensor(&w).unwrap();
            let y = matmul_nt_op(&x(32), v.as_tensor()).unwrap();
            assert!(y.track_op());
            assert!(max_err(&vals(&y), &want(32)) < 1e-5);
            assert_eq!(packed_in_scope().0, two);
        }
        assert_eq!(packed_in_scope().0, two);
    }
    assert_eq!(
        packed_in_scope(),
        (0, 0),
        "dropped with the outermost scope"
    );
    // Outside a scope, or beyond the scope's budget, the same product without packing.
    let y = matmul_nt_op(&x(32), &w).unwrap();
    assert!(max_err(&vals(&y), &want(32)) < 1e-5);
    assert_eq!(packed_in_scope().0, 0);
    let _small = pack_scope_within(3 * 48 * k * 4 - 1);
    let y = matmul_nt_op(&x(32), &w).unwrap();
    assert!(max_err(&vals(&y), &want(32)) < 1e-5);
    assert_eq!(packed_in_scope().0, 0, "over the budget");
}

#[test]
fn adamw_matches_reference() {
    let n = 40_000; // several parallel chunks
    let p0 = data(n, 71);
    let hp = AdamW {
        lr: 1e-2,
        weight_decay: 0.1,
        ..AdamW::default()
    };
    let var = Var::from_vec(p0.clone(), n, &DEV).unwrap();
    let mut st = AdamWState::new(n);
    let (mut p, mut m, mut v) = (
        p0.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        vec![0f64; n],
        vec![0f64; n],
    );
    for step in 1..=3 {
        let g = data(n, 72 + step as u64);
        adamw_step(
            var.as_tensor(),
            &Tensor::from_vec(g.clone(), n, &DEV).unwrap(),
            &mut st,
            &hp,
        )
        .unwrap();
        for i in 0..n {
            let gi = g[i] as f64;
            p[i] *= 1.0 - hp.lr * hp.weight_decay;
            m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * gi;
            v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * gi * gi;
            let mh = m[i] / (1.0 - hp.beta1.powi(step));
            let vh = v[i] / (1.0 - hp.beta2.powi(step));
            p[i] -= hp.lr * mh / (vh.sqrt() + hp.eps);
        }
    }
    let got = vals(var.as_tensor());
    let want: Vec<f32> = p.iter().map(|&x| x as f32).collect();
    let e = max_err(&got, &want);
    assert!(e < 1e-5, "adamw: {e}");
}

#[test]
fn f64_inputs_take_the_composed_path() {
    let x = Tensor::from_vec(data(12, 81), (3, 4), &DEV)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let w = Tensor::ones(4, DType::F64, &DEV).unwrap();
    let b = Tensor::zeros(4, DType::F64, &DEV).unwrap();
    let y = fused::layer_norm(&x, &w, &b, 1e-5).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let y = fused::gelu_tanh(&x).unwrap();
    assert_eq!(y.dtype(), DType::F64);
}

#[test]
fn softmax_matches_composed_and_fd() {
    let mut x = data(3 * 21, 91);
    x[5] = -1e9; // a masked entry
    check(
        "softmax_last",
        &[(x, vec![3, 21])],
        &|t| fused::softmax_last(&t[0]).unwrap(),
        &|t| ops::softmax_last(&t[0]).unwrap(),
    );
    check(
        "softmax_last (transposed)",
        &[inp(4 * 6, &[6, 4], 92)],
        &|t| fused::softmax_last(&t[0].t().unwrap()).unwrap(),
        &|t| ops::softmax_last(&t[0].t().unwrap()).unwrap(),
    );
}

#[test]
fn linear_bias_matches_composed_and_fd() {
    use rlhf_model::kernels::matmul::linear_bias;
    for transposed in [true, false] {
        let (m, k, n) = (19, 5, 7);
        let wshape = if transposed { [k, n] } else { [n, k] };
        check(
            "linear_bias",
            &[
                inp(m * k, &[m, k], 93),
                inp(n * k, &wshape, 94),
                inp(n, &[n], 95),
            ],
            &move |t| linear_bias(&t[0], &t[1], &t[2], transposed).unwrap(),
            &move |t| {
                let w = if transposed {
                    t[1].clone()
                } else {
                    t[1].t().unwrap()
                };
                t[0].matmul(&w).unwrap().broadcast_add(&t[2]).unwrap()
            },
        );
        // A [b, t, k] input: the leading dimensions are rows, the output is [b, t, n].
        check(
            "linear_bias (3-d input)",
            &[
                inp(3 * 4 * k, &[3, 4, k], 96),
                inp(n * k, &wshape, 94),
                inp(n, &[n], 95),
            ],
            &move |t| {
                let y = linear_bias(&t[0], &t[1], &t[2], transposed).unwrap();
                assert_eq!(y.dims(), [3, 4, n]);
                y
            },
            &move |t| {
                let w = if transposed {
                    t[1].clone()
                } else {
                    t[1].t().unwrap()
                };
                let y = t[0].reshape((12, k)).unwrap().matmul(&w).unwrap();
                y.broadcast_add(&t[2]).unwrap().reshape((3, 4, n)).unwrap()
            },
        );
    }
}

/// A bias wider than one block of the parallel column sums (256): gradients against the
/// composed op (no finite differences at this size).
#[test]
fn linear_bias_wide_output() {
    use rlhf_model::kernels::matmul::linear_bias;
    let (m, k, n) = (40, 8, 600);
    let inputs = [
        inp(m * k, &[m, k], 123),
        inp(k * n, &[k, n], 124),
        inp(n, &[n], 125),
    ];
    let (yf, gf) = eval(&inputs, &|t| {
        linear_bias(&t[0], &t[1], &t[2], true).unwrap()
    });
    let (yc, gc) = eval(&inputs, &|t| {
        t[0].matmul(&t[1]).unwrap().broadcast_add(&t[2]).unwrap()
    });
    assert!(max_err(&yf, &yc) < 2e-5);
    for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
        let e = max_err(a, b);
        assert!(e < 1e-4, "gradient {i} differs from the composed op by {e}");
    }
}

#[test]
fn linear_without_bias_matches_composed_and_fd() {
    use rlhf_model::kernels::matmul::linear;
    for transposed in [true, false] {
        // m * n * k above the threshold where the GEMM goes multi-threaded, and a small one.
        for (m, k, n) in [(19, 5, 7), (70, 24, 33)] {
            let wshape = if transposed { [k, n] } else { [n, k] };
            check(
                "linear",
                &[inp(m * k, &[m, k], 96), inp(n * k, &wshape, 97)],
                &move |t| linear(&t[0], &t[1], transposed).unwrap(),
                &move |t| {
                    let w = if transposed {
                        t[1].clone()
                    } else {
                        t[1].t().unwrap()
                    };
                    t[0].matmul(&w).unwrap()
                },
            );
        }
    }
}

#[test]
fn linear_residual_matches_composed_and_fd() {
    use rlhf_model::kernels::matmul::linear_residual;
    for transposed in [true, false] {
        for (m, k, n) in [(19, 5, 7), (70, 24, 33)] {
            let wshape = if transposed { [k, n] } else { [n, k] };
            check(
                "linear_residual",
                &[
                    inp(m * k, &[m, k], 117),
                    inp(n * k, &wshape, 118),
                    inp(m * n, &[m, n], 119),
                ],
                &move |t| linear_residual(&t[0], &t[1], &t[2], transposed).unwrap(),
                &move |t| {
                    let w = if transposed {
                        t[1].clone()
                    } else {
                        t[1].t().unwrap()
                    };
                    (&t[2] + t[0].matmul(&w).unwrap()).unwrap()
                },
            );
        }
    }
    // [b, t, k] input and [b, t, n] residual; a residual of the wrong shape is an error.
    let (k, n) = (6, 9);
    check(
        "linear_residual (3-d input)",
        &[
            inp(2 * 5 * k, &[2, 5, k], 120),
            inp(n * k, &[n, k], 121),
            inp(2 * 5 * n, &[2, 5, n], 122),
        ],
        &move |t| linear_residual(&t[0], &t[1], &t[2], false).unwrap(),
        &move |t| {
            let y = t[0]
                .reshape((10, k))
                .unwrap()
                .matmul(&t[1].t().unwrap())
                .unwrap();
            (&t[2] + y.reshape((2, 5, n)).unwrap()).unwrap()
        },
    );
    let x = Tensor::zeros((4, k), DType::F32, &DEV).unwrap();
    let w = Tensor::zeros((n, k), DType::F32, &DEV).unwrap();
    let r = Tensor::zeros((4, n + 1), DType::F32, &DEV).unwrap();
    let e = linear_residual(&x, &w, &r, false).unwrap_err().to_string();
    assert!(e.contains("residual [4, 10]"), "{e}");
}

#[test]
fn linear_gelu_matches_composed_and_fd() {
    use rlhf_model::kernels::mlp::linear_gelu;
    for transposed in [true, false] {
        // A small product, and one above the threshold where the GEMM goes multi-threaded.
        for (m, k, n) in [(19, 5, 7), (70, 24, 33)] {
            let wshape = if transposed { [k, n] } else { [n, k] };
            check(
                "linear_gelu",
                &[
                    inp(m * k, &[m, k], 101),
                    inp(n * k, &wshape, 102),
                    inp(n, &[n], 103),
                ],
                &move |t| linear_gelu(&t[0], &t[1], &t[2], transposed).unwrap(),
                &move |t| {
                    let w = if transposed {
                        t[1].clone()
                    } else {
                        t[1].t().unwrap()
                    };
                    let u = t[0].matmul(&w).unwrap().broadcast_add(&t[2]).unwrap();
                    ops::gelu_tanh(&u).unwrap()
                },
            );
        }
    }
    // A [b, t, k] input: the leading dimensions are rows.
    let (k, n) = (6, 9);
    check(
        "linear_gelu (3-d input)",
        &[
            inp(2 * 5 * k, &[2, 5, k], 104),
            inp(k * n, &[k, n], 105),
            inp(n, &[n], 106),
        ],
        &move |t| {
            let y = linear_gelu(&t[0], &t[1], &t[2], true).unwrap();
            assert_eq!(y.dims(), [2, 5, n]);
            y
        },
        &move |t| {
            let u = t[0].reshape((10, k)).unwrap().matmul(&t[1]).unwrap();
            let u = u.broadcast_add(&t[2]).unwrap().reshape((2, 5, n)).unwrap();
            ops::gelu_tanh(&u).unwrap()
        },
    );
}

#[test]
fn swiglu_mlp_matches_composed_and_fd() {
    use rlhf_model::kernels::mlp::swiglu_mlp;
    for (m, d, i) in [(19, 5, 7), (70, 24, 33)] {
        check(
            "swiglu_mlp",
            &[
                inp(m * d, &[m, d], 107),
                inp(i * d, &[i, d], 108),
                inp(i * d, &[i, d], 109),
            ],
            &move |t| swiglu_mlp(&t[0], &t[1], &t[2]).unwrap(),
            &move |t| {
                let a = t[0].matmul(&t[1].t().unwrap()).unwrap();
                let b = t[0].matmul(&t[2].t().unwrap()).unwrap();
                (a.silu().unwrap() * b).unwrap()
            },
        );
    }
    let (d, i) = (6, 10);
    check(
        "swiglu_mlp (3-d input)",
        &[
            inp(3 * 4 * d, &[3, 4, d], 110),
            inp(i * d, &[i, d], 111),
            inp(i * d, &[i, d], 112),
        ],
        &move |t| {
            let y = swiglu_mlp(&t[0], &t[1], &t[2]).unwrap();
            assert_eq!(y.dims(), [3, 4, i]);
            y
        },
        &move |t| {
            let x = t[0].reshape((12, d)).unwrap();
            let a = x.matmul(&t[1].t().unwrap()).unwrap();
            let b = x.matmul(&t[2].t().unwrap()).unwrap();
            (a.silu().unwrap() * b).unwrap().reshape((3, 4, i)).unwrap()
        },
    );
}

/// The fused MLP ops run without gradients too (inference: nothing kept for a backward), and
/// give the same values as with them.
#[test]
fn fused_mlp_without_gradients() {
    use rlhf_model::kernels::mlp::{linear_gelu, swiglu_mlp};
    let (m, d, i) = (40, 16, 24);
    let t = |n: usize, shape: &[usize], seed| Tensor::from_vec(data(n, seed), shape, &DEV).unwrap();
    let (x, w1, w2, b) = (
        t(m * d, &[m, d], 113),
        t(i * d, &[i, d], 114),
        t(i * d, &[i, d], 115),
        t(i, &[i], 116),
    );
    let y = swiglu_mlp(&x, &w1, &w2).unwrap();
    let v = Var::from_tensor(&x).unwrap();
    let y2 = swiglu_mlp(v.as_tensor(), &w1, &w2).unwrap();
    assert_eq!(vals(&y), vals(&y2));
    let g = linear_gelu(&x, &w1, &b, false).unwrap();
    let g2 = linear_gelu(v.as_tensor(), &w1, &b, false).unwrap();
    assert_eq!(vals(&g), vals(&g2));
    assert_eq!(g.dims(), [m, i]);
}

/// `sgemm` (every path it dispatches to: the few-row kernel, the GEMM in parallel and on one
/// thread) against a plain triple loop in f64: every operand layout, odd sizes, accumulate on
/// and off.
#[test]
fn transpose_matches_scalar() {
    use rlhf_model::kernels::gemm::transpose;
    // 8 × 8 register blocks, the edges around them, a row stride wider than the rows, and
    // the serial and parallel paths.
    for (rows, cols, ss) in [
        (1, 1, 1),
        (8, 8, 8),
        (19, 37, 40),
        (64, 33, 33),
        (130, 200, 211),
    ] {
        let src = data((rows - 1) * ss + cols, 97);
        for parallel in [false, true] {
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, ss, rows, cols, &mut dst, parallel);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r].to_bits(),
                        src[r * ss + c].to_bits(),
                        "{rows}×{cols} (stride {ss}, parallel {parallel}): element ({r}, {c})"
                    );
                }
            }
        }
    }
}

#[test]
fn sgemm_matches_naive_product() {
    use rlhf_model::kernels::gemm::{sgemm, sgemm_serial, Mat};
    let shapes = [
        (1, 1, 1),
        (5, 7, 3),
        (12, 32, 16),
        (13, 33, 257),
        (37, 70, 300),
        (400, 45, 30),
        (25, 3100, 20),
        (130, 100, 530),
        // m ≥ 256, n ≤ 640, k·n ≥ 2¹⁸: a column-major `b` is transposed before the f32
        // product.
        (300, 67, 3913),
        (256, 640, 410),
    ];
    for (m, n, k) in shapes {
        let a = data(m * k, 91);
        let b = data(k * n, 92);
        let c0 = data(m * n, 93);
        for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
            let am = if at {
                Mat {
                    data: &a,
                    rs: 1,
                    cs: m,
                }
            } else {
                Mat {
                    data: &a,
                    rs: k,
                    cs: 1,
                }
            };
            let bm = if bt {
                Mat {
                    data: &b,
                    rs: 1,
                    cs: k,
                }
            } else {
                Mat {
                    data: &b,
                    rs: n,
                    cs: 1,
                }
            };
            let want = |acc: bool| -> Vec<f64> {
                let mut w = vec![0f64; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let mut s = if acc { c0[i * n + j] as f64 } else { 0.0 };
                        for p in 0..k {
                            s += am.data[i * am.rs + p * am.cs] as f64
                                * bm.data[p * bm.rs + j * bm.cs] as f64;
                        }
                        w[i * n + j] = s;
                    }
                }
                w
            };
            for acc in [false, true] {
                let w = want(acc);
                let mut runs: Vec<(&str, Vec<f32>)> = vec![];
                let mut c = c0.clone();
                sgemm(m, n, k, am, bm, &mut c, acc);
                runs.push(("sgemm", c));
                let mut c = c0.clone();
                sgemm_serial(m, n, k, am, bm, &mut c, acc);
                runs.push(("sgemm_serial", c));
                for (name, c) in runs {
                    let e = c
                        .iter()
                        .zip(&w)
                        .map(|(x, y)| (*x as f64 - y).abs() / (1.0 + y.abs()))
                        .fold(0.0, f64::max);
                    // f32 rounding grows with the length of the sums (and its maximum with
                    // the number of outputs: 160 K of them in the 256 × 640 product).
                    let tol = 1e-6 + 8e-8 * k as f64;
                    assert!(
                        e < tol,
                        "{name} m={m} n={n} k={k} at={at} bt={bt} acc={acc}: {e}"
                    );
                }
            }
        }
    }
}

/// The embedding op (token rows, plus position rows for GPT-2) against candle's `index_select`
/// and add: the same values, the same table gradients with repeated ids, and with a gradient
/// sink holding the tables, two backward passes accumulated there.
#[test]
fn embedding_matches_index_select_and_accumulates_in_a_sink() {
    use rlhf_model::kernels::embed::{embedding, embedding_with_positions};
    use rlhf_model::kernels::sink::GradSink;
    let (v, d, p, b, t) = (37, 40, 16, 3, 11);
    let table = Var::from_vec(data(v * d, 1), (v, d), &DEV).unwrap();
    let pt = Var::from_vec(data(p * d, 2), (p, d), &DEV).unwrap();
    // Ids repeat within and across rows; positions start at a per-row offset (left padding).
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7) % 13 + i / 17) as u32).collect();
    let pos: Vec<u32> = (0..b * t).map(|i| ((i % t) + i / t) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), &DEV).unwrap();
    let composed = |with_pos: bool| {
        let tok = table
            .as_tensor()
            .index_select(&ids.flatten_all().unwrap(), 0)
            .unwrap();
        let y = if with_pos {
            let pi = Tensor::from_vec(pos.clone(), b * t, &DEV).unwrap();
            (tok + pt.as_tensor().index_select(&pi, 0).unwrap()).unwrap()
        } else {
            tok
        };
        y.reshape((b, t, d)).unwrap()
    };
    let fused_of = |with_pos: bool| {
        if with_pos {
            embedding_with_positions(table.as_tensor(), &ids, pt.as_tensor(), pos.clone()).unwrap()
        } else {
            embedding(table.as_tensor(), &ids).unwrap()
        }
    };
    let grads_of = |y: Tensor| {
        let loss = (&y * probe_for(&y)).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        [&table, &pt].map(|x| g.get(x.as_tensor()).map(vals))
    };
    for with_pos in [false, true] {
        let (want, got) = (composed(with_pos), fused_of(with_pos));
        assert_eq!(got.dims(), &[b, t, d]);
        assert_eq!(vals(&got), vals(&want), "values (positions {with_pos})");
        let (gw, gg) = (grads_of(want), grads_of(got));
        assert_eq!(gg[1].is_some(), with_pos);
        for (w, g) in gw.iter().zip(&gg) {
            if let (Some(w), Some(g)) = (w, g) {
                assert!(
                    max_err(g, w) < 1e-6,
                    "table gradient (positions {with_pos})"
                );
            }
        }
        // In a sink: nothing for candle; both passes accumulated in the sink's buffers.
        let sink = GradSink::install(&[table.as_tensor(), pt.as_tensor()]).unwrap();
        for _ in 0..2 {
            let g = grads_of(fused_of(with_pos));
            assert!(
                g.iter().all(|g| g.is_none()),
                "the sink took the tables' gradients"
            );
        }
        let held = sink.take().unwrap();
        for (w, h) in gw.iter().zip(&held) {
            if let (Some(w), Some(h)) = (w, h) {
                let twice: Vec<f32> = w.iter().map(|x| 2.0 * x).collect();
                assert!(
                    max_err(&vals(h), &twice) < 1e-6,
                    "sink (positions {with_pos})"
                );
            }
        }
        assert_eq!(held[1].is_some(), with_pos);
    }
    let bad = Tensor::from_vec(vec![3u32, 37], (1, 2), &DEV).unwrap();
    let err = embedding(table.as_tensor(), &bad).unwrap_err().to_string();
    assert!(err.contains("37 out of range"), "{err}");
}

/// A block's tensors of `shapes`, drawn from `seed`: small enough that the block stays
/// well-conditioned, and near 1 for the norm weights (`norm(i)`).
fn block_vars(shapes: &[&[usize]], seed: u64, norm: impl Fn(usize) -> bool) -> Vec<Var> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = s.iter().product();
            let v: Vec<f32> = data(n, seed + i as u64)
                .into_iter()
                .map(|v| if norm(i) { 1.0 + 0.2 * v } else { 0.2 * v })
                .collect();
            Var::from_vec(v, *s, &DEV).unwrap()
        })
        .collect()
}

/// LoRA adapters' A `[r, in]` and B `[out, r]` (both non-zero) for `n` products of (in, out)
/// `io(j)`, in product order: A₀, B₀, A₁, …
fn adapter_tensors(
    n: usize,
    io: impl Fn(usize) -> (usize, usize),
    r: usize,
    seed: u64,
) -> Vec<Tensor> {
    let shapes: Vec<Vec<usize>> = (0..n)
        .flat_map(|j| [vec![r, io(j).0], vec![io(j).1, r]])
        .collect();
    let shapes: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
    let vars = block_vars(&shapes, seed, |_| false);
    vars.iter().map(|v| v.as_tensor().clone()).collect()
}

/// `y` plus an adapter on input `x` as `Linear::forward` composes it: (scale · x' Aᵀ) Bᵀ with
/// B's product accumulating onto `y`, x' = x ⊙ mask under dropout.
fn composed_adapter(
    y: Tensor,
    x: &Tensor,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    mask: Option<&rlhf_model::kernels::dropout::DropoutMask>,
) -> Tensor {
    use rlhf_model::kernels::matmul::{linear, linear_residual};
    let x = match mask {
        Some(m) => x
            .mul(&Tensor::from_vec(m.values(), x.shape(), &DEV).unwrap())
            .unwrap(),
        None => x.clone(),
    };
    let h = (linear(&x, a, false).unwrap() * scale).unwrap();
    linear_residual(&h, b, &y, false).unwrap()
}

/// A block's tensors from `vars`: tracking gradients, or frozen (tracking none).
fn block_tensors(vars: &[Var], frozen: bool) -> Vec<Tensor> {
    vars.iter()
        .map(|v| match frozen {
            true => v.as_tensor().detach(),
            false => v.as_tensor().clone(),
        })
        .collect()
}

/// Every weight gradient is in `sink` (none went to candle), twice `want` (two passes), within
/// 1e-5 of the gradient's largest magnitude (as `grads.rs` compares the sink with candle: an
/// element-wise relative error would weigh the rounding of the near-zero elements of a
/// gradient whose scale is 80, as a LoRA block's is).
fn assert_sink_holds_twice(sink: &rlhf_model::kernels::sink::GradSink, want: &[Vec<f32>]) {
    for (i, (h, want)) in sink.take().unwrap().into_iter().zip(want).enumerate() {
        let h = vals(&h.expect("the sink holds every weight gradient"));
        let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
        let scale = twice.iter().fold(1f32, |a, b| a.max(b.abs()));
        let e = h
            .iter()
            .zip(&twice)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
            / scale;
        assert!(
            e < 1e-5,
            "weight {i}: two passes in the sink differ by {e} of {scale}"
        );
    }
}

/// The gradients of `sum(y · probe)`.
fn probed_backward(
    y: &Tensor,
    probe: &Tensor,
) -> candle_core::Result<candle_core::backprop::GradStore> {
    (y * probe)?.sum_all()?.backward()
}

#[test]
fn gpt2_block_is_the_composed_block() {
    // Plain; LoRA adapters on all four products over a frozen base (dropout masks on two);
    // the same on a frozen input (a LoRA model's first block).
    for (lora, frozen_input) in [(false, false), (true, false), (true, true)] {
        gpt2_block_case(lora, frozen_input);
    }
}

fn gpt2_block_case(lora: bool, frozen_input: bool) {
    use rlhf_model::kernels::block::{gpt2_block, Gpt2BlockWeights, LoraWeights};
    use rlhf_model::kernels::dropout::DropoutMask;
    use rlhf_model::kernels::matmul::linear_bias;
    use rlhf_model::kernels::mlp::linear_gelu;
    use rlhf_model::kernels::sink::GradSink;
    // b=2, t=20 (40 rows: more than decoding's few), d=32, 4 heads; row 1 left-padded by 3; an
    // MLP of 80, not 4·d (a checkpoint's `n_inner`).
    let (b, t, d, nh, r, inner) = (2, 20, 32, 4, 4, 80);
    let scale = 2.0;
    let mut mask = vec![vec![1u8; t]; b];
    mask[1][..3].fill(0);
    let bias = bias(&mask, 0, t);
    let shapes: [&[usize]; 12] = [
        &[d],
        &[d],
        &[d, 3 * d],
        &[3 * d],
        &[d, d],
        &[d],
        &[d],
        &[d],
        &[d, inner],
        &[inner],
        &[inner, d],
        &[d],
    ];
    // ln_1 and ln_2's weights are the norms'.
    // A LoRA model's base is frozen (tensors that track no gradient).
    let w = block_tensors(&block_vars(&shapes, 300, |i| i == 0 || i == 6), lora);
    // Product j's Conv1D weight is w[pw[j]] ([in, out]), its bias the next; its adapter
    // A [r, in], B [out, r] (B non-zero so that it matters), and a dropout mask on c_attn's
    // and mlp.c_proj's input.
    let pw = [2, 4, 8, 10];
    let io = |j: usize| (shapes[pw[j]][0], shapes[pw[j]][1]);
    let ad = adapter_tensors(4, io, r, 600);
    let masks: Vec<Option<DropoutMask>> = (0..4)
        .map(|j| {
            (j == 0 || j == 3).then(|| DropoutMask::draw(11, j as u64, 2.0 / 3.0, b * t * io(j).0))
        })
        .collect();
    let trained: Vec<Tensor> = if lora { ad.clone() } else { w.clone() };
    let xv = Var::from_vec(data(b * t * d, 299), (b, t, d), &DEV).unwrap();
    let x = match frozen_input {
        true => xv.as_tensor().detach(),
        false => xv.as_tensor().clone(),
    };
    let weights = || {
        let p = |i: usize| (w[i].clone(), w[i + 1].clone());
        let adapter = |j: usize| {
            lora.then(|| LoraWeights {
                a: ad[2 * j].clone(),
                b: ad[2 * j + 1].clone(),
                scale,
                mask: masks[j].clone(),
            })
        };
        Gpt2BlockWeights {
            ln_1: p(0),
            c_attn: p(2),
            c_proj: p(4),
            ln_2: p(6),
            c_fc: p(8),
            mlp_proj: p(10),
            adapters: [adapter(0), adapter(1), adapter(2), adapter(3)],
        }
    };
    let block = |x: &Tensor| gpt2_block(x, weights(), nh, 1e-5, &bias, false);
    // As `Linear::forward` runs a Conv1D with an active adapter: the biased product, then
    // (scale · x' Aᵀ) Bᵀ onto it, x' = x ⊙ mask under dropout.
    let conv = |x: &Tensor, j: usize| {
        let y = linear_bias(x, &w[pw[j]], &w[pw[j] + 1], true).unwrap();
        if !lora {
            return y;
        }
        composed_adapter(y, x, (&ad[2 * j], &ad[2 * j + 1]), scale, masks[j].as_ref())
    };
    let composed = |x: &Tensor| -> Tensor {
        let h = fused::layer_norm(x, &w[0], &w[1], 1e-5).unwrap();
        let qkv = conv(&h, 0);
        let y = fused::attention_packed(&qkv, nh, nh, &bias).unwrap();
        let x1 = (x + conv(&y, 1)).unwrap();
        let h = fused::layer_norm(&x1, &w[6], &w[7], 1e-5).unwrap();
        // `Linear::forward_gelu`: one op without an adapter, gelu(forward(x)) with one.
        let a = match lora {
            true => fused::gelu_tanh(&conv(&h, 2)).unwrap(),
            false => linear_gelu(&h, &w[8], &w[9], true).unwrap(),
        };
        (x1 + conv(&a, 3)).unwrap()
    };
    let case = format!("lora {lora}, frozen input {frozen_input}");
    // Without a sink the block is not taken (weight gradients would have nowhere to go).
    assert!(block(&x).unwrap().is_none());
    let want = composed(&x);
    let probe = probe_for(&want);
    let gw = probed_backward(&want, &probe).unwrap();
    let grad = |g: &candle_core::backprop::GradStore, t: &Tensor| vals(g.get(t).unwrap());
    let want_grads: Vec<Vec<f32>> = trained.iter().map(|t| grad(&gw, t)).collect();
    let want_dx = (!frozen_input).then(|| grad(&gw, &x));

    // A sink over all but one trained tensor: not taken either.
    let sink = GradSink::install(&trained.iter().skip(1).collect::<Vec<_>>()).unwrap();
    assert!(block(&x).unwrap().is_none());
    drop(sink);

    // With the sink over what trains, before the forward: one node, the same numbers, and
    // every weight gradient in the sink (none for candle), over two passes accumulated.
    let sink = GradSink::install(&trained.iter().collect::<Vec<_>>()).unwrap();
    for _ in 0..2 {
        let got = block(&x)
            .unwrap()
            .expect("the block applies under a sink holding its weights");
        let e = max_err(&vals(&got), &vals(&want));
        // Without adapters the same ops in the same order: the same bits. Adapters add B's
        // product after the product (the composed path's GEMM accumulates it): 1e-7 here.
        let tol = if lora { 1e-5 } else { 0.0 };
        assert!(e <= tol, "block output differs by {e} ({case})");
        let g = probed_backward(&got, &probe).unwrap();
        assert!(
            trained.iter().all(|t| g.get(t).is_none()),
            "weight gradients reached candle ({case})"
        );
        match &want_dx {
            Some(want_dx) => {
                let e = max_err(&grad(&g, &x), want_dx);
                assert!(e <= tol, "block input gradient differs by {e} ({case})");
            }
            None => assert!(
                g.get(&x).is_none(),
                "a frozen input got a gradient ({case})"
            ),
        }
    }
    assert_sink_holds_twice(&sink, &want_grads);
    // One backward per forward (the tape is consumed): a second is an error saying so.
    let got = block(&x).unwrap().unwrap();
    let loss = (&got * &probe).unwrap().sum_all().unwrap();
    loss.backward().unwrap();
    let err = loss.backward().unwrap_err();
    assert!(
        err.to_string().contains("backward run twice"),
        "unexpected error: {err} ({case})"
    );
    sink.take().unwrap();
    // The sink gone between forward and backward: a clear error, not lost gradients.
    let got = block(&x).unwrap().unwrap();
    drop(sink);
    let err = probed_backward(&got, &probe).unwrap_err();
    assert!(
        err.to_string().contains("gradient sink"),
        "unexpected error: {err} ({case})"
    );
}

/// The Llama block node against the same block composed of the fused ops, with and without
/// Qwen2's q/k/v biases, on grouped-query attention and left padding; and as a LoRA model
/// trains it: every base tensor frozen, adapters on q, v and o.
/// Which of a Llama layer's projections (q, k, v, o, gate, up, down) carry adapters in a case
/// of [`llama_block_is_the_composed_block`], which of those draw dropout masks, and whether
/// the block's input is frozen (tracks no gradient: a LoRA model's first layer).
struct LlamaCase {
    qkv_bias: bool,
    adapters: [bool; 7],
    masks: [bool; 7],
    frozen_input: bool,
}

#[test]
fn llama_block_is_the_composed_block() {
    let none = [false; 7];
    let attn = [true, false, true, true, false, false, false];
    let all = [true; 7];
    let some_masks = [true, false, false, true, true, false, true];
    for (qkv_bias, adapters, masks, frozen_input) in [
        (false, none, none, false),
        (true, none, none, false),
        (true, attn, none, false),
        (false, all, some_masks, false),
        (true, all, some_masks, true),
    ] {
        llama_block_case(LlamaCase {
            qkv_bias,
            adapters,
            masks,
            frozen_input,
        });
    }
}

fn llama_block_case(c: LlamaCase) {
    use rlhf_model::kernels::block::{llama_block, LlamaBlockWeights, LoraWeights, Projection};
    use rlhf_model::kernels::dropout::DropoutMask;
    use rlhf_model::kernels::matmul::{linear, linear_bias, linear_residual};
    use rlhf_model::kernels::mlp::swiglu_mlp;
    use rlhf_model::kernels::sink::GradSink;
    let qkv_bias = c.qkv_bias;
    let lora = c.adapters.iter().any(|&a| a);
    // b=2, t=20 (40 rows: more than decoding's few), d=32; 4 query heads over 2 kv heads of 8;
    // an MLP of 48; row 1 left-padded by 3 (its positions start after the padding).
    let (b, t, d, nh, nkv, hd, inner, r) = (2, 20, 32, 4, 2, 8, 48, 4);
    let eps = 1e-5;
    let scale = 2.0;
    let mut mask = vec![vec![1u8; t]; b];
    mask[1][..3].fill(0);
    let bias = bias(&mask, 0, t);
    let positions: Vec<Vec<u32>> = vec![
        (0..t as u32).collect(),
        (0..t as u32).map(|i| i.saturating_sub(3)).collect(),
    ];
    let (cos, sin) = ops::rope_tables(&positions, hd, 10000.0, &DEV).unwrap();
    // input_norm, q, k, v, o, post_norm, gate, up, down, then q/k/v biases.
    let mut shapes: Vec<Vec<usize>> = vec![
        vec![d],
        vec![nh * hd, d],
        vec![nkv * hd, d],
        vec![nkv * hd, d],
        vec![d, nh * hd],
        vec![d],
        vec![inner, d],
        vec![inner, d],
        vec![d, inner],
    ];
    if qkv_bias {
        shapes.extend([vec![nh * hd], vec![nkv * hd], vec![nkv * hd]]);
    }
    let shapes: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
    // A LoRA model's base is frozen (tensors that track no gradient).
    let w = block_tensors(&block_vars(&shapes, 400, |i| i == 0 || i == 5), lora);
    // Projection j's weight in `w`, and its (in, out).
    let widx = [1, 2, 3, 4, 6, 7, 8];
    let io = |j: usize| {
        let s = shapes[widx[j]];
        (s[1], s[0])
    };
    // Adapters (A [r, in], B [out, r]; B non-zero so that they matter) where the case puts
    // them, and dropout masks (p = 1/4) on the adapter's input.
    let ad = adapter_tensors(7, io, r, 500);
    let masks: Vec<Option<DropoutMask>> = (0..7)
        .map(|j| c.masks[j].then(|| DropoutMask::draw(13, j as u64, 0.75, b * t * io(j).0)))
        .collect();
    // What trains: every tensor, or the adapters alone.
    let trained: Vec<Tensor> = match lora {
        true => (0..7)
            .filter(|&j| c.adapters[j])
            .flat_map(|j| [ad[2 * j].clone(), ad[2 * j + 1].clone()])
            .collect(),
        false => w.clone(),
    };
    let xv = Var::from_vec(data(b * t * d, 399), (b, t, d), &DEV).unwrap();
    let x = match c.frozen_input {
        true => xv.as_tensor().detach(),
        false => xv.as_tensor().clone(),
    };
    let adapter = |j: usize| {
        c.adapters[j].then(|| LoraWeights {
            a: ad[2 * j].clone(),
            b: ad[2 * j + 1].clone(),
            scale,
            mask: masks[j].clone(),
        })
    };
    let weights = || {
        let proj = |j: usize| Projection {
            w: w[widx[j]].clone(),
            bias: (qkv_bias && j < 3).then(|| w[9 + j].clone()),
            lora: adapter(j),
        };
        LlamaBlockWeights {
            input_norm: w[0].clone(),
            q: proj(0),
            k: proj(1),
            v: proj(2),
            o: proj(3),
            post_norm: w[5].clone(),
            gate: proj(4),
            up: proj(5),
            down: proj(6),
        }
    };
    let block = |x: &Tensor| llama_block(x, weights(), (nh, nkv), eps, (&cos, &sin), &bias, false);
    // As `Linear::forward` composes an adapter: y + (scale · x' Aᵀ) Bᵀ, B's product onto y,
    // x' = x ⊙ mask under dropout.
    let with_adapter = |y: Tensor, x: &Tensor, j: usize| match c.adapters[j] {
        true => composed_adapter(y, x, (&ad[2 * j], &ad[2 * j + 1]), scale, masks[j].as_ref()),
        false => y,
    };
    // As the Llama layer composes: `Linear::forward_residual` with an active adapter is
    // residual + forward(x); `Linear::swiglu` with one is swiglu(gate(x), up(x)).
    let onto_residual = |y: &Tensor, j: usize, res: &Tensor| match c.adapters[j] {
        true => (res + with_adapter(linear(y, &w[widx[j]], false).unwrap(), y, j)).unwrap(),
        false => linear_residual(y, &w[widx[j]], res, false).unwrap(),
    };
    let composed = |x: &Tensor| -> Tensor {
        let h = fused::rms_norm(x, &w[0], eps).unwrap();
        let proj = |j: usize| {
            let y = match qkv_bias {
                true => linear_bias(&h, &w[widx[j]], &w[9 + j], false).unwrap(),
                false => linear(&h, &w[widx[j]], false).unwrap(),
            };
            with_adapter(y, &h, j)
        };
        let m = fused::Heads::Merged;
        let q = fused::rope_heads(&proj(0), m(nh), &cos, &sin).unwrap();
        let k = fused::rope_heads(&proj(1), m(nkv), &cos, &sin).unwrap();
        let v = proj(2);
        let s = fused::Heads::Split;
        let y = fused::attention_forms((&q, s), (&k, s), (&v, m(nkv)), &bias, m(nh)).unwrap();
        let x1 = onto_residual(&y, 3, x);
        let h = fused::rms_norm(&x1, &w[5], eps).unwrap();
        let g = match c.adapters[4] || c.adapters[5] {
            true => {
                let mlp = |j: usize| with_adapter(linear(&h, &w[widx[j]], false).unwrap(), &h, j);
                fused::swiglu(&mlp(4), &mlp(5)).unwrap()
            }
            false => swiglu_mlp(&h, &w[6], &w[7]).unwrap(),
        };
        onto_residual(&g, 6, &x1)
    };
    let case = format!(
        "bias {qkv_bias}, adapters {:?}, masks {:?}, frozen input {}",
        c.adapters, c.masks, c.frozen_input
    );
    // Without a sink the block is not taken (weight gradients would have nowhere to go).
    assert!(block(&x).unwrap().is_none());
    let want = composed(&x);
    let probe = probe_for(&want);
    let gw = probed_backward(&want, &probe).unwrap();
    let grad = |g: &candle_core::backprop::GradStore, t: &Tensor| vals(g.get(t).unwrap());
    let want_grads: Vec<Vec<f32>> = trained.iter().map(|t| grad(&gw, t)).collect();
    let want_dx = (!c.frozen_input).then(|| grad(&gw, &x));

    // A sink missing one trained tensor (the last): not taken either.
    let sink = GradSink::install(&trained[..trained.len() - 1].iter().collect::<Vec<_>>()).unwrap();
    assert!(block(&x).unwrap().is_none());
    drop(sink);

    // With the sink over what trains, before the forward: one node, the composed block's
    // numbers, and every weight gradient in the sink (none for candle), over two passes.
    let sink = GradSink::install(&trained.iter().collect::<Vec<_>>()).unwrap();
    for _ in 0..2 {
        let got = block(&x)
            .unwrap()
            .expect("the block applies under a sink holding its weights");
        let e = max_err(&vals(&got), &vals(&want));
        if lora {
            // Adapters add B's product onto the projection's output after the product (the
            // composed layer's GEMM accumulates it), and o's and down's onto x + y·Wᵀ where
            // the composed layer adds x last: other roundings of the same sums (1e-6 here).
            assert!(e < 1e-5, "block output differs by {e} ({case})");
        } else {
            // The stacked q/k/v product sums each element as the three products do (one
            // k-block at d = 32), and RoPE in place is the op's arithmetic: the same bits.
            assert!(e == 0.0, "block output differs by {e} ({case})");
        }
        let g = probed_backward(&got, &probe).unwrap();
        assert!(
            trained.iter().all(|t| g.get(t).is_none()),
            "weight gradients reached candle ({case})"
        );
        match &want_dx {
            Some(want_dx) => {
                let e = max_err(&grad(&g, &x), want_dx);
                // dx sums q's, k's and v's contributions in one product, where candle adds
                // three: another order of the same sums (7e-7 here).
                assert!(e < 1e-5, "block input gradient differs by {e} ({case})");
            }
            None => assert!(
                g.get(&x).is_none(),
                "a frozen input got a gradient ({case})"
            ),
        }
    }
    assert_sink_holds_twice(&sink, &want_grads);
    // The sink gone between forward and backward: a clear error, not lost gradients.
    let got = block(&x).unwrap().unwrap();
    drop(sink);
    let err = probed_backward(&got, &probe).unwrap_err();
    assert!(
        err.to_string().contains("gradient sink"),
        "unexpected error: {err} ({case})"
    );
}
