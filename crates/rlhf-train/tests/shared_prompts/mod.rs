//! What the reward-model and DPO tests of shared-prompt batches have in common: pairs with a
//! ranking among them, and gradients compared parameter by parameter.

use candle_core::Tensor;
use rlhf_data::tokenize::TokenizedPair;
use rlhf_model::params::Param;
use rlhf_model::Tokenizer;
use rlhf_train::metrics::Scalars;
use rlhf_train::StepOut;

/// A three-way ranking of one prompt (three pairs, three distinct responses) and five pairs with
/// prompts of their own: 4 to 14 prompt tokens and 1 to 15 response tokens of `words` (rows of
/// up to 43 tokens: two attention blocks). `margin(group)` gives each pair's margin.
pub fn ranking_and_single_pairs(
    tok: &Tokenizer,
    words: &[&str],
    margin: impl Fn(usize) -> Option<f32>,
) -> Vec<TokenizedPair> {
    let mut state = 31u64;
    let mut text = |n: usize| -> String {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                words[(state >> 33) as usize % words.len()]
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let enc = |s: &str| tok.encode(s, false).unwrap();
    let mut pairs = vec![];
    let mut pair = |p: &str, c: &str, r: &str, group| {
        pairs.push(TokenizedPair {
            prompt_ids: enc(&format!("tell me about {p}")),
            chosen_ids: enc(c),
            rejected_ids: enc(r),
            margin: margin(group),
            group,
        })
    };
    let p = text(9);
    let ranked = [text(15), text(4), text(9)];
    pair(&p, &ranked[0], &ranked[1], 0);
    pair(&p, &ranked[0], &ranked[2], 0);
    pair(&p, &ranked[1], &ranked[2], 0);
    for i in 0..5 {
        let (p, c, r) = (
            text(1 + 2 * i),
            text(1 + (i * 7) % 15),
            text(1 + (i * 4) % 15),
        );
        pair(&p, &c, &r, i + 1);
    }
    pairs
}

/// One micro-batch's step run with prompts shared (`step(true)`) and with one row per response
/// (`step(false)`): the same loss, metrics and gradients of `params`, from fewer tokens when
/// prompts are shared (the ranking's prompt once instead of six times, each of its responses
/// once instead of twice). Returns the metrics.
pub fn assert_layouts_agree(
    tag: &str,
    mut step: impl FnMut(bool) -> StepOut,
    params: &[Param],
) -> Scalars {
    let (shared, single) = (step(true), step(false));
    let loss = |o: &StepOut| o.loss.to_scalar::<f32>().unwrap();
    let (l1, l0) = (loss(&shared), loss(&single));
    assert!(
        (l1 - l0).abs() < 1e-5,
        "{tag}: loss {l1} shared, {l0} one row each"
    );
    for (k, v) in &single.metrics {
        let w = shared.metrics[k];
        assert!(
            (v - w).abs() < 1e-4 * v.abs().max(1.0),
            "{tag}: {k}: {v} vs {w}"
        );
    }
    assert_same_gradients(
        tag,
        &grads_of(&shared.loss, params),
        &grads_of(&single.loss, params),
    );
    let (t1, t0) = (shared.tokens, single.tokens);
    assert!(
        t1 * 10 < t0 * 7,
        "{tag}: {t1} tokens shared, {t0} one row each"
    );
    single.metrics
}

/// The gradient of `loss` for each of `params` (zeros where the loss does not reach one).
pub fn grads_of(loss: &Tensor, params: &[Param]) -> Vec<Vec<f32>> {
    let g = loss.backward().unwrap();
    params
        .iter()
        .map(|p| match g.get(p.var().as_tensor()) {
            Some(t) => t.flatten_all().unwrap().to_vec1().unwrap(),
            None => vec![0.0; p.var().elem_count()],
        })
        .collect()
}

/// Each parameter's gradient equal to 0.1% of its largest entry (plus 0.001% of the largest
/// entry of any, for parameters whose gradient nearly cancels); some gradient not vanishing.
pub fn assert_same_gradients(tag: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    let top = |g: &[f32]| g.iter().fold(0f32, |s, x| s.max(x.abs()));
    let global = want.iter().map(|g| top(g)).fold(0f32, f32::max);
    assert!(global > 1e-3, "{tag}: gradients vanish: {global}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let e = a.iter().zip(b).fold(0f32, |s, (x, y)| s.max((x - y).abs()));
        let tol = 1e-3 * top(b) + 1e-5 * global;
        assert!(
            e < tol,
            "{tag}: parameter {i}: gradient differs by {e} of {}",
            top(b)
        );
    }
}
