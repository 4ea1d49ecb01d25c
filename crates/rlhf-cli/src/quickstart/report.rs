//! The quickstart report: one self-contained HTML file (inline SVG charts, inline CSS) plus the
//! charts as separate SVG files.

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::svg::{bar_chart, esc, line_chart, Series};

/// Deserialise an f64 that was written as `null` (serde_json writes NaN as null).
pub fn nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One evaluated policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyEval {
    pub name: String,
    pub round: usize,
    #[serde(deserialize_with = "nan")]
    pub gold_mean: f64,
    /// Standard error of the gold mean over eval prompts.
    #[serde(deserialize_with = "nan")]
    pub gold_se: f64,
    #[serde(deserialize_with = "nan")]
    pub rm_mean: f64,
    /// Mean per-sequence KL to the SFT reference (sum over response tokens of log π − log π_sft).
    #[serde(deserialize_with = "nan")]
    pub kl_to_sft: f64,
    /// Fraction of eval prompts where this policy's response beats SFT's under the gold utility (ties ½).
    pub win_rate_vs_sft: f64,
    pub mean_len: f64,
}

/// `x` to three decimals, or "–" where there is no value: the SFT policy of round 0 is
/// evaluated before any reward model exists, so its RM score is NaN (`null` in the JSON).
pub fn fixed3(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "–".to_string()
    }
}

/// A point of PPO's trajectory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PpoPoint {
    pub iteration: usize,
    #[serde(deserialize_with = "nan")]
    pub kl: f64,
    #[serde(deserialize_with = "nan")]
    pub rm_score: f64,
    #[serde(deserialize_with = "nan")]
    pub gold: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: usize,
    pub n_items: usize,
    pub n_pairs: usize,
    #[serde(deserialize_with = "nan")]
    pub alpha: f64,
    #[serde(deserialize_with = "nan")]
    pub kappa: f64,
    /// Mean pairwise agreement between annotators on derived pairs ([`accuracy_ceiling`] turns
    /// it into the ceiling for RM accuracy).
    #[serde(deserialize_with = "nan")]
    pub annotator_agreement: f64,
    #[serde(deserialize_with = "nan")]
    pub rm_heldout_acc: f64,
    #[serde(deserialize_with = "nan")]
    pub rm_acc_lo: f64,
    #[serde(deserialize_with = "nan")]
    pub rm_acc_hi: f64,
    #[serde(deserialize_with = "nan")]
    pub rm_gold_acc: f64,
    pub ppo: Vec<PpoPoint>,
    pub dpo_curve: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub responses: Vec<(String, String, f64)>, // (policy, text, gold)
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Report {
    pub seed: u64,
    pub wall_secs: f64,
    pub model_desc: String,
    pub policies: Vec<PolicyEval>,
    pub rounds: Vec<RoundReport>,
    /// (stage name, [(step, loss)]).
    pub losses: Vec<(String, Vec<(f64, f64)>)>,
    pub samples: Vec<Sample>,
    pub stage_secs: Vec<(String, f64)>,
}

pub fn charts(r: &Report) -> Vec<(&'static str, String)> {
    let mut out = vec![];
    // 1. Over-optimisation: RM score vs gold utility over PPO iterations.
    let mut s = vec![];
    for rr in &r.rounds {
        s.push(Series::line(
            &format!("RM score (round {})", rr.round),
            rr.ppo
                .iter()
                .map(|p| (p.iteration as f64, p.rm_score))
                .collect(),
        ));
        s.push(
            Series::line(
                &format!("gold utility (round {})", rr.round),
                rr.ppo
                    .iter()
                    .map(|p| (p.iteration as f64, p.gold))
                    .collect(),
            )
            .dashed(),
        );
    }
    out.push((
        "overoptimisation",
        line_chart(
            "Proxy (RM) vs gold utility over PPO iterations",
            "PPO iteration (cumulative)",
            "score",
            &s,
        ),
    ));
    // 2. Gold utility vs KL for PPO and DPO.
    let mut s = vec![];
    for rr in &r.rounds {
        // Per-iteration rollout batches are noisy: markers, not a zig-zag line.
        s.push(Series::scatter(
            &format!("PPO round {} (rollouts)", rr.round),
            rr.ppo.iter().map(|p| (p.kl, p.gold)).collect(),
        ));
        if !rr.dpo_curve.is_empty() {
            s.push(Series::line(
                &format!("DPO round {}", rr.round),
                rr.dpo_curve.clone(),
            ));
        }
    }
    let final_pts: Vec<(f64, f64)> = r
        .policies
        .iter()
        .map(|p| (p.kl_to_sft, p.gold_mean))
        .collect();
    s.push(Series::scatter("evaluated policies", final_pts));
    out.push((
        "reward_vs_kl",
        line_chart(
            "Gold utility vs KL to the SFT reference",
            "KL(π ‖ π_SFT) per response (nats)",
            "gold utility",
            &s,
        ),
    ));
    // 3. Loss curves.
    let s: Vec<Series> = r
        .losses
        .iter()
        .map(|(n, pts)| Series::line(n, pts.clone()))
        .collect();
    out.push((
        "losses",
        line_chart("Training loss per stage", "optimizer step", "loss", &s),
    ));
    // 4. Agreement and RM accuracy.
    let mut rows = vec![];
    for rr in &r.rounds {
        rows.push((
            format!("r{} annotator agreement", rr.round),
            rr.annotator_agreement,
        ));
        rows.push((
            format!("r{} RM ceiling (from agreement)", rr.round),
            accuracy_ceiling(rr.annotator_agreement),
        ));
        rows.push((
            format!("r{} RM held-out accuracy", rr.round),
            rr.rm_heldout_acc,
        ));
        rows.push((format!("r{} RM accuracy vs gold", rr.round), rr.rm_gold_acc));
        rows.push((format!("r{} Krippendorff α (ordinal)", rr.round), rr.alpha));
        rows.push((format!("r{} Fleiss κ (pairs)", rr.round), rr.kappa));
    }
    out.push((
        "agreement",
        bar_chart("Annotators and the reward model", &rows, 1.0),
    ));
    out
}

/// The accuracy against one annotator's labels of a judge who knows the true preference, when
/// two annotators agree on a share `agreement` of pairs: each flips a share e with
/// `1 − 2e(1 − e) = agreement`, so the judge agrees on `1 − e = (1 + √(2·agreement − 1))/2`.
/// (With some pairs harder than others this is still an upper bound: the map is concave.)
pub fn accuracy_ceiling(agreement: f64) -> f64 {
    (1.0 + (2.0 * agreement - 1.0).max(0.0).sqrt()) / 2.0
}

const CSS: &str = r#"
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;background:#f5f6fa;color:#111827;margin:0}
main{max-width:1340px;margin:0 auto;padding:28px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 10px}
.sub{color:#6b7280;margin-bottom:18px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:14px 16px}
.card b{font-size:24px;display:block}.card span{color:#6b7280;font-size:13px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:14px}
.grid .card{padding:8px}.grid svg{width:100%;height:auto}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #e5e7eb;border-radius:10px;overflow:hidden}
th,td{padding:8px 10px;border-bottom:1px solid #f1f5f9;text-align:right;font-size:14px}
th{background:#f9fafb;color:#4b5563;font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.03em}
td:first-child,th:first-child{text-align:left}
.good{color:#059669;font-weight:600}.bad{color:#e11d48;font-weight:600}
.sample{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:12px 14px;margin-bottom:10px}
.sample .p{font-weight:600;margin-bottom:8px}
.resp{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:8px}
.resp div{background:#f9fafb;border-radius:8px;padding:8px 10px;font-size:14px}
.resp em{display:block;font-style:normal;color:#6b7280;font-size:12px;margin-bottom:4px}
.note{color:#4b5563;font-size:14px;line-height:1.5;max-width:980px}
"#;

pub fn html(r: &Report) -> String {
    let mut h = String::new();
    let _ = write!(h, "<!doctype html><html lang=en><head><meta charset=utf-8><title>rlhf quickstart report</title><style>{CSS}</style></head><body><main>");
    let _ = write!(
        h,
        "<h1>RLHF quickstart</h1><div class=sub>seed {} · {} · {:.0} s wall time, all stages</div>",
        r.seed,
        esc(&r.model_desc),
        r.wall_secs
    );
    // Headline cards.
    let sft = r.policies.iter().find(|p| p.name == "SFT");
    let _ = write!(h, "<div class=cards>");
    for p in &r.policies {
        let delta = sft.map(|s| p.gold_mean - s.gold_mean).unwrap_or(0.0);
        let cls = if delta > 0.0 {
            "good"
        } else if delta < 0.0 {
            "bad"
        } else {
            ""
        };
        let _ = write!(
            h,
            "<div class=card><b>{:.2}</b><span>gold utility · {}{}</span><br><span class={cls}>{:+.2} vs SFT · win rate {:.0}% · KL {:.2}</span></div>",
            p.gold_mean,
            esc(&p.name),
            if p.round > 0 { format!(" (round {})", p.round) } else { String::new() },
            delta,
            100.0 * p.win_rate_vs_sft,
            p.kl_to_sft
        );
    }
    let _ = write!(h, "</div>");
    let _ = write!(h, "<h2>Charts</h2><div class=grid>");
    for (_, svg) in charts(r) {
        let _ = write!(h, "<div class=card>{svg}</div>");
    }
    let _ = write!(h, "</div>");
    let _ = write!(h, "<h2>Policies</h2><table><tr><th>policy</th><th>round</th><th>gold utility</th><th>± s.e.</th><th>RM score</th><th>KL to SFT</th><th>win rate vs SFT</th><th>mean length</th></tr>");
    for p in &r.policies {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td>{:.3}</td><td>{:.1}%</td><td>{:.1}</td></tr>",
            esc(&p.name), p.round, p.gold_mean, p.gold_se, fixed3(p.rm_mean), p.kl_to_sft, 100.0 * p.win_rate_vs_sft, p.mean_len
        );
    }
    let _ = write!(h, "</table>");
    let _ = write!(h, "<h2>Feedback rounds</h2><table><tr><th>round</th><th>items</th><th>pairs</th><th>Krippendorff α</th><th>Fleiss κ</th><th>annotator agreement</th><th>RM held-out acc. (95% CI)</th><th>RM acc. vs gold</th></tr>");
    for rr in &r.rounds {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3} ({:.3}–{:.3})</td><td>{:.3}</td></tr>",
            rr.round, rr.n_items, rr.n_pairs, rr.alpha, rr.kappa, rr.annotator_agreement, rr.rm_heldout_acc, rr.rm_acc_lo, rr.rm_acc_hi, rr.rm_gold_acc
        );
    }
    let _ = write!(h, "</table>");
    let _ = write!(h, "<p class=note>The reward model is trained on the simulated annotators' rankings, so on held-out pairs (each labelled by one annotator) it can in expectation be no more accurate than a judge who knew the true preference: if each annotator flips a share e of pairs, two agree on a = 1 − 2e(1 − e) of them and the true judge on 1 − e = (1 + √(2a − 1))/2, the ceiling — above the agreement itself (a = 0.59 gives 0.71). PPO optimises the reward model, a proxy: the first chart shows whether gold utility keeps rising with the proxy or falls behind it (reward over-optimisation); the second how much KL from the SFT policy each method spends for its gain.</p>");
    let _ = write!(h, "<h2>Samples (eval prompts)</h2>");
    for s in &r.samples {
        let _ = write!(
            h,
            "<div class=sample><div class=p>{}</div><div class=resp>",
            esc(&s.prompt)
        );
        for (pol, text, g) in &s.responses {
            let _ = write!(
                h,
                "<div><em>{} · gold {:+.2}</em>{}</div>",
                esc(pol),
                g,
                esc(text)
            );
        }
        let _ = write!(h, "</div></div>");
    }
    if !r.stage_secs.is_empty() {
        let _ = write!(
            h,
            "<h2>Time per stage</h2><table><tr><th>stage</th><th>seconds</th></tr>"
        );
        for (n, s) in &r.stage_secs {
            let _ = write!(h, "<tr><td>{}</td><td>{:.1}</td></tr>", esc(n), s);
        }
        let _ = write!(h, "</table>");
    }
    h.push_str("</main></body></html>");
    h
}

/// Write `report.html`, `report.json` and the charts as SVG and PNG files into `dir`.
pub fn write(r: &Report, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    rlhf_model::model::write_atomic(&dir.join("report.html"), html(r).as_bytes())?;
    rlhf_model::model::write_atomic(
        &dir.join("report.json"),
        serde_json::to_string_pretty(r)?.as_bytes(),
    )?;
    let fonts = PngFonts::load();
    if fonts.sans.is_none() {
        eprintln!(
            "warning: no sans-serif system font found (e.g. Debian's fonts-dejavu-core): the PNG \
             charts will have no text; the SVG charts and report.html are unaffected"
        );
    }
    for (name, svg) in charts(r) {
        rlhf_model::model::write_atomic(&dir.join(format!("{name}.svg")), svg.as_bytes())?;
        let png = svg_to_png(&svg, &fonts, 2.0).with_context(|| format!("rendering {name}.png"))?;
        rlhf_model::model::write_atomic(&dir.join(format!("{name}.png")), &png)?;
    }
    Ok(())
}

/// System fonts for rasterising the charts, with a sans-serif family that exists here.
pub struct PngFonts {
    opt: resvg::usvg::Options<'static>,
    pub sans: Option<String>,
}

impl PngFonts {
    pub fn load() -> Self {
        let mut opt = resvg::usvg::Options::default();
        opt.fontdb_mut().load_system_fonts();
        let has = |want: &str| {
            opt.fontdb
                .faces()
                .any(|f| f.families.iter().any(|(n, _)| n == want))
        };
        let sans = [
            "DejaVu Sans",
            "Liberation Sans",
            "Noto Sans",
            "Arial",
            "Helvetica",
        ]
        .into_iter()
        .find(|w| has(w))
        .map(str::to_string)
        .or_else(|| {
            opt.fontdb
                .faces()
                .next()
                .and_then(|f| f.families.first().map(|(n, _)| n.clone()))
        });
        if let Some(s) = &sans {
            opt.fontdb_mut().set_sans_serif_family(s.clone());
        }
        Self { opt, sans }
    }
}

/// Rasterise one of our SVG charts to PNG bytes at `scale` × its size.
pub fn svg_to_png(svg: &str, fonts: &PngFonts, scale: f32) -> Result<Vec<u8>> {
    let tree = resvg::usvg::Tree::from_str(svg, &fonts.opt)?;
    let size = tree.size().to_int_size();
    let (w, h) = (
        (size.width() as f32 * scale).ceil() as u32,
        (size.height() as f32 * scale).ceil() as u32,
    );
    let mut pm = resvg::tiny_skia::Pixmap::new(w, h).with_context(|| format!("a {w}×{h} image"))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::from_scale(scale, scale),
        &mut pm.as_mut(),
    );
    Ok(pm.encode_png()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Annotators who each flip a share e of pairs agree on 1 − 2e(1 − e); the ceiling recovers
    /// 1 − e, lies above the agreement, and is 1 at full agreement and ½ at chance.
    #[test]
    fn accuracy_ceiling_inverts_the_agreement_of_two_noisy_annotators() {
        for e in [0.0, 0.05, 0.15, 0.29, 0.4, 0.5] {
            let a = 1.0 - 2.0 * e * (1.0 - e);
            assert!((accuracy_ceiling(a) - (1.0 - e)).abs() < 1e-12, "e = {e}");
            assert!(accuracy_ceiling(a) >= a);
        }
        assert!((accuracy_ceiling(0.59) - 0.712).abs() < 1e-3);
        assert_eq!(accuracy_ceiling(0.3), 0.5);
    }

    fn pixels(png: &[u8]) -> Vec<u8> {
        resvg::tiny_skia::Pixmap::decode_png(png)
            .unwrap()
            .data()
            .to_vec()
    }

    #[test]
    fn png_charts_have_the_svg_size_and_draw_its_text() {
        let fonts = PngFonts::load();
        let rows = [("PPO r1".to_string(), 1.0), ("DPO r1".to_string(), 0.5)];
        let plain = svg_to_png(&bar_chart("", &rows, 2.0), &fonts, 2.0).unwrap();
        let titled = svg_to_png(&bar_chart("A title in words", &rows, 2.0), &fonts, 2.0).unwrap();
        let (a, b) = (pixels(&plain), pixels(&titled));
        // 640 × (50 + 2·30) at scale 2, RGBA.
        assert_eq!(a.len(), 1280 * 220 * 4);
        assert_eq!(b.len(), a.len());
        if fonts.sans.is_none() {
            eprintln!("SKIP text check: no system fonts here (install fonts-dejavu-core)");
            return;
        }
        let changed = a.chunks(4).zip(b.chunks(4)).filter(|(x, y)| x != y).count();
        assert!(changed > 500, "the title drew {changed} pixels");
        // The bars themselves are drawn: not all white.
        assert!(a.chunks(4).any(|p| p[..3] != [255, 255, 255]));
    }
}
