//! Agreement metrics and consensus rankings: pure functions, no I/O.
//!
//! * [`krippendorff_alpha`] / [`krippendorff_alpha_ordinal`]: Krippendorff's α with missing data
//!   (coincidence-matrix formulation, Krippendorff 2011). Units are rows, coders are columns,
//!   `None` is a missing value; units with fewer than two values are not pairable and ignored.
//! * [`fleiss_kappa`]: Fleiss' κ from a subjects × categories count table. Subjects may have
//!   different numbers of raters (subjects with fewer than two raters are ignored); this is the
//!   usual generalisation (mean per-subject agreement, pooled category proportions).
//! * [`kendall_tau_b`]: Kendall's τ-b, tie-corrected.
//! * [`bradley_terry`] and [`ranked_pairs`]: consensus from pairwise preferences; both return
//!   ordered tiers of candidate indices (best first), the same shape as a judgement.
//!
//! Rankings in this crate are *tiers*: `[[0],[2,1],[3]]` means candidate 0 is best, 1 and 2 tie,
//! 3 is worst. [`tiers_to_ranks`] turns them into a rank per candidate (1 = best, tied candidates
//! share a rank), which is what the ordinal α and τ-b are computed on.

#![allow(clippy::needless_range_loop)] // index-based matrix code reads better here

use std::collections::BTreeMap;

/// Distance metric used by Krippendorff's α.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlphaMetric {
    Nominal,
    Ordinal,
    Interval,
}

/// Krippendorff's α, ordinal metric, with missing data. See [`krippendorff_alpha`].
pub fn krippendorff_alpha_ordinal(units: &[Vec<Option<f64>>]) -> Option<f64> {
    krippendorff_alpha(units, AlphaMetric::Ordinal)
}

/// Krippendorff's α for `units[u][coder]` (None = missing). Returns `None` when fewer than two
/// pairable values exist or when the expected disagreement is zero (a single value used).
pub fn krippendorff_alpha(units: &[Vec<Option<f64>>], metric: AlphaMetric) -> Option<f64> {
    // Distinct values, sorted; map each to its index.
    let mut values: Vec<f64> = units
        .iter()
        .flatten()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values.dedup();
    let v = values.len();
    if v == 0 {
        return None;
    }
    let idx = |x: f64| {
        values
            .binary_search_by(|p| p.partial_cmp(&x).unwrap())
            .unwrap()
    };
    // Coincidence matrix.
    let mut o = vec![vec![0.0f64; v]; v];
    for unit in units {
        let vals: Vec<usize> = unit
            .iter()
            .flatten()
            .copied()
            .filter(|x| x.is_finite())
            .map(idx)
            .collect();
        let m = vals.len();
        if m < 2 {
            continue;
        }
        let w = 1.0 / (m as f64 - 1.0);
        for (i, &a) in vals.iter().enumerate() {
            for (j, &b) in vals.iter().enumerate() {
                if i != j {
                    o[a][b] += w;
                }
            }
        }
    }
    let n_c: Vec<f64> = o.iter().map(|row| row.iter().sum()).collect();
    let n: f64 = n_c.iter().sum();
    if n < 2.0 {
        return None;
    }
    let delta2 = |c: usize, k: usize| -> f64 {
        match metric {
            AlphaMetric::Nominal => {
                if c == k {
                    0.0
                } else {
                    1.0
                }
            }
            AlphaMetric::Interval => (values[c] - values[k]).powi(2),
            AlphaMetric::Ordinal => {
                let (lo, hi) = if c <= k { (c, k) } else { (k, c) };
                let s: f64 = n_c[lo..=hi].iter().sum();
                (s - (n_c[lo] + n_c[hi]) / 2.0).powi(2)
            }
        }
    };
    let mut d_o = 0.0;
    let mut d_e = 0.0;
    for c in 0..v {
        for k in 0..v {
            let d = delta2(c, k);
            d_o += o[c][k] * d;
            d_e += n_c[c] * n_c[k] * d;
        }
    }
    if d_e <= 0.0 {
        return None;
    }
    Some(1.0 - (n - 1.0) * d_o / d_e)
}

/// Fleiss' κ. `table[subject][category]` = number of raters who put that subject in that
/// category. Subjects with fewer than two ratings are skipped. `None` when undefined.
pub fn fleiss_kappa(table: &[Vec<usize>]) -> Option<f64> {
    let cats = table.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut p_bar = 0.0;
    let mut subjects = 0usize;
    let mut cat_tot = vec![0.0f64; cats];
    let mut total = 0.0;
    for row in table {
        let n: usize = row.iter().sum();
        if n < 2 {
            continue;
        }
        let agree: usize = row.iter().map(|&c| c * c.saturating_sub(1)).sum();
        p_bar += agree as f64 / (n * (n - 1)) as f64;
        subjects += 1;
        for (j, &c) in row.iter().enumerate() {
            cat_tot[j] += c as f64;
        }
        total += n as f64;
    }
    if subjects == 0 {
        return None;
    }
    p_bar /= subjects as f64;
    let p_e: f64 = cat_tot.iter().map(|c| (c / total).powi(2)).sum();
    if (1.0 - p_e).abs() < 1e-12 {
        return None;
    }
    Some((p_bar - p_e) / (1.0 - p_e))
}

/// Kendall's τ-b between two equally long score vectors (ties allowed in both).
/// `None` when undefined (fewer than two elements or one side entirely tied).
pub fn kendall_tau_b(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len().min(b.len());
    if n < 2 {
        return None;
    }
    let (mut conc, mut disc, mut ties_a, mut ties_b) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in (i + 1)..n {
            let da = a[i] - a[j];
            let db = b[i] - b[j];
            if da == 0.0 {
                ties_a += 1;
            }
            if db == 0.0 {
                ties_b += 1;
            }
            if da != 0.0 && db != 0.0 {
                if (da > 0.0) == (db > 0.0) {
                    conc += 1;
                } else {
                    disc += 1;
                }
            }
        }
    }
    let n0 = (n * (n - 1) / 2) as i64;
    let denom = (((n0 - ties_a) * (n0 - ties_b)) as f64).sqrt();
    if denom == 0.0 {
        return None;
    }
    Some((conc - disc) as f64 / denom)
}

/// Rank per candidate from tiers (1 = best; tied candidates share the rank of their tier).
/// Candidates absent from `tiers` get `None`.
pub fn tiers_to_ranks(tiers: &[Vec<usize>], k: usize) -> Vec<Option<f64>> {
    let mut r = vec![None; k];
    for (t, tier) in tiers.iter().enumerate() {
        for &c in tier {
            if c < k {
                r[c] = Some((t + 1) as f64);
            }
        }
    }
    r
}

/// Strict preference pairs `(better, worse)` implied by tiers (ties give no pair).
pub fn tiers_to_pairs(tiers: &[Vec<usize>]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (i, hi) in tiers.iter().enumerate() {
        for lo in &tiers[i + 1..] {
            for &a in hi {
                for &b in lo {
                    out.push((a, b));
                }
            }
        }
    }
    out
}

/// Pairwise tallies over `k` candidates: `wins[i][j]` = how often i was preferred to j
/// (a tie adds 0.5 to both directions), `seen[i][j]` = how often the pair was compared.
#[derive(Clone, Debug)]
pub struct PairTally {
    pub k: usize,
    pub wins: Vec<Vec<f64>>,
}

impl PairTally {
    pub fn new(k: usize) -> Self {
        PairTally {
            k,
            wins: vec![vec![0.0; k]; k],
        }
    }
    /// Add one annotator's tiers.
    pub fn add_tiers(&mut self, tiers: &[Vec<usize>]) {
        let ranks = tiers_to_ranks(tiers, self.k);
        for i in 0..self.k {
            for j in 0..self.k {
                if i == j {
                    continue;
                }
                if let (Some(ri), Some(rj)) = (ranks[i], ranks[j]) {
                    if ri < rj {
                        self.wins[i][j] += 1.0;
                    } else if ri == rj {
                        self.wins[i][j] += 0.5;
                    }
                }
            }
        }
    }
}

/// Group candidates into tiers by score (higher is better); scores within `eps` tie.
pub fn scores_to_tiers(scores: &[f64], eps: f64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    let mut tiers: Vec<Vec<usize>> = Vec::new();
    let mut last = f64::NAN;
    for i in order {
        if tiers.is_empty() || (last - scores[i]).abs() > eps {
            tiers.push(vec![i]);
            last = scores[i];
        } else {
            tiers.last_mut().unwrap().push(i);
        }
    }
    tiers
}

/// Bradley–Terry log-strengths fitted by Hunter's MM algorithm, with a weak symmetric prior
/// (`prior` virtual ties between every pair) so that unbeaten / winless candidates stay finite.
pub fn bradley_terry_scores(t: &PairTally, prior: f64) -> Vec<f64> {
    let k = t.k;
    let mut p = vec![1.0f64; k];
    let w = |i: usize, j: usize| t.wins[i][j] + prior * 0.5;
    for _ in 0..1000 {
        let mut next = vec![0.0; k];
        let mut max_change: f64 = 0.0;
        for i in 0..k {
            let wi: f64 = (0..k).filter(|&j| j != i).map(|j| w(i, j)).sum();
            let denom: f64 = (0..k)
                .filter(|&j| j != i)
                .map(|j| (w(i, j) + w(j, i)) / (p[i] + p[j]))
                .sum();
            next[i] = if denom > 0.0 { wi / denom } else { p[i] };
        }
        // normalise to geometric mean 1
        let g = (next.iter().map(|x| x.ln()).sum::<f64>() / k as f64).exp();
        for (i, x) in next.iter_mut().enumerate() {
            *x /= g;
            max_change = max_change.max((x.ln() - p[i].ln()).abs());
        }
        p = next;
        if max_change < 1e-12 {
            break;
        }
    }
    p.iter().map(|x| x.ln()).collect()
}

/// Consensus tiers by Bradley–Terry (scores within 1e-6 tie).
pub fn bradley_terry(t: &PairTally) -> Vec<Vec<usize>> {
    scores_to_tiers(&bradley_terry_scores(t, 0.1), 1e-6)
}

/// Consensus tiers by Tideman's ranked pairs: majorities are locked in from the largest margin
/// down unless they would create a cycle; tiers are the layers of the locked graph (candidates
/// with no locked majority between them and the same predecessors end up tied).
pub fn ranked_pairs(t: &PairTally) -> Vec<Vec<usize>> {
    let k = t.k;
    let mut majorities: Vec<(f64, usize, usize)> = Vec::new();
    for i in 0..k {
        for j in 0..k {
            let m = t.wins[i][j] - t.wins[j][i];
            if i != j && m > 0.0 {
                majorities.push((m, i, j));
            }
        }
    }
    majorities.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap()
            .then((a.1, a.2).cmp(&(b.1, b.2)))
    });
    let mut locked = vec![vec![false; k]; k];
    let reaches = |locked: &Vec<Vec<bool>>, from: usize, to: usize| -> bool {
        let mut stack = vec![from];
        let mut seen = vec![false; k];
        while let Some(x) = stack.pop() {
            if x == to {
                return true;
            }
            if seen[x] {
                continue;
            }
            seen[x] = true;
            for y in 0..k {
                if locked[x][y] {
                    stack.push(y);
                }
            }
        }
        false
    };
    for (_, i, j) in majorities {
        if !reaches(&locked, j, i) {
            locked[i][j] = true;
        }
    }
    // Layering: depth = longest path from a source.
    let mut depth = vec![0usize; k];
    for _ in 0..k {
        for i in 0..k {
            for j in 0..k {
                if locked[i][j] && depth[j] < depth[i] + 1 {
                    depth[j] = depth[i] + 1;
                }
            }
        }
    }
    let mut by_depth: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (c, d) in depth.iter().enumerate() {
        by_depth.entry(*d).or_default().push(c);
    }
    by_depth.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() < tol
    }

    /// Krippendorff (2011), "Computing Krippendorff's alpha-reliability", the 4-coder,
    /// 12-unit example with missing data: nominal .743, ordinal .815, interval .849.
    fn kripp_example() -> Vec<Vec<Option<f64>>> {
        let a = "1 2 3 3 2 1 4 1 2 . . .";
        let b = "1 2 3 3 2 2 4 1 2 5 . 3";
        let c = ". 3 3 3 2 3 4 2 2 5 1 .";
        let d = "1 2 3 3 2 4 4 1 2 5 1 .";
        let parse = |s: &str| -> Vec<Option<f64>> {
            s.split_whitespace().map(|x| x.parse().ok()).collect()
        };
        let coders = [parse(a), parse(b), parse(c), parse(d)];
        (0..12)
            .map(|u| coders.iter().map(|cd| cd[u]).collect())
            .collect()
    }

    #[test]
    fn alpha_matches_published_example_with_missing_data() {
        let units = kripp_example();
        let nom = krippendorff_alpha(&units, AlphaMetric::Nominal).unwrap();
        let ord = krippendorff_alpha_ordinal(&units).unwrap();
        let int = krippendorff_alpha(&units, AlphaMetric::Interval).unwrap();
        assert!(close(nom, 0.743, 5e-4), "nominal {nom}");
        assert!(close(ord, 0.815, 5e-4), "ordinal {ord}");
        assert!(close(int, 0.849, 5e-4), "interval {int}");
    }

    #[test]
    fn alpha_small_hand_computed() {
        // Two coders, three units: (1,1), (2,2), (1,2); plus a unit with one value (ignored).
        // Coincidences: o11=2, o22=2, o12=o21=1; n1=n2=3, n=6.
        // Nominal: Do = 2/6, De = 2*3*3/(6*5) = 0.6 -> alpha = 1 - (1/3)/0.6 = 4/9.
        // Ordinal with two values: delta^2_12 = (3+3 - 3)^2 = 9 -> alpha = 1 - 5*2*9/(2*9*9) = 4/9.
        let units = vec![
            vec![Some(1.0), Some(1.0)],
            vec![Some(2.0), Some(2.0)],
            vec![Some(1.0), Some(2.0)],
            vec![None, Some(2.0)],
        ];
        let nom = krippendorff_alpha(&units, AlphaMetric::Nominal).unwrap();
        let ord = krippendorff_alpha_ordinal(&units).unwrap();
        assert!(close(nom, 4.0 / 9.0, 1e-12), "{nom}");
        assert!(close(ord, 4.0 / 9.0, 1e-12), "{ord}");
        // Perfect agreement.
        let perfect = vec![
            vec![Some(1.0), Some(1.0), None],
            vec![Some(3.0), None, Some(3.0)],
        ];
        assert!(close(
            krippendorff_alpha_ordinal(&perfect).unwrap(),
            1.0,
            1e-12
        ));
        // Undefined: only one value anywhere.
        assert!(krippendorff_alpha_ordinal(&[vec![Some(1.0), Some(1.0)]]).is_none());
    }

    #[test]
    fn fleiss_wikipedia_example() {
        let t: Vec<Vec<usize>> = vec![
            vec![0, 0, 0, 0, 14],
            vec![0, 2, 6, 4, 2],
            vec![0, 0, 3, 5, 6],
            vec![0, 3, 9, 2, 0],
            vec![2, 2, 8, 1, 1],
            vec![7, 7, 0, 0, 0],
            vec![3, 2, 6, 3, 0],
            vec![2, 5, 3, 2, 2],
            vec![6, 5, 2, 1, 0],
            vec![0, 2, 2, 3, 7],
        ];
        let k = fleiss_kappa(&t).unwrap();
        assert!(close(k, 0.2099, 5e-4), "{k}");
        // Two raters always agreeing over two categories: kappa = 1.
        let k = fleiss_kappa(&[vec![2, 0], vec![0, 2]]).unwrap();
        assert!(close(k, 1.0, 1e-12));
    }

    #[test]
    fn tau_b_hand_computed() {
        assert!(close(
            kendall_tau_b(&[1., 2., 3., 4.], &[1., 2., 3., 4.]).unwrap(),
            1.0,
            1e-12
        ));
        assert!(close(
            kendall_tau_b(&[1., 2., 3., 4.], &[4., 3., 2., 1.]).unwrap(),
            -1.0,
            1e-12
        ));
        // 5 concordant, 0 discordant, one tie in a: 5 / sqrt(5 * 6).
        let t = kendall_tau_b(&[1., 2., 2., 3.], &[1., 3., 2., 4.]).unwrap();
        assert!(close(t, 5.0 / 30f64.sqrt(), 1e-12), "{t}");
        assert!(kendall_tau_b(&[1., 1.], &[1., 2.]).is_none());
    }

    #[test]
    fn pairs_and_consensus() {
        let tiers = vec![vec![0], vec![2, 1], vec![3]];
        let mut p = tiers_to_pairs(&tiers);
        p.sort();
        assert_eq!(p, vec![(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]);
        let mut t = PairTally::new(4);
        t.add_tiers(&tiers);
        t.add_tiers(&tiers);
        assert_eq!(bradley_terry(&t), vec![vec![0], vec![1, 2], vec![3]]);
        assert_eq!(ranked_pairs(&t), vec![vec![0], vec![1, 2], vec![3]]);
        // Majority wins: two say 0>1, one says 1>0.
        let mut t = PairTally::new(2);
        t.add_tiers(&[vec![0], vec![1]]);
        t.add_tiers(&[vec![0], vec![1]]);
        t.add_tiers(&[vec![1], vec![0]]);
        assert_eq!(bradley_terry(&t), vec![vec![0], vec![1]]);
        assert_eq!(ranked_pairs(&t), vec![vec![0], vec![1]]);
    }
}
