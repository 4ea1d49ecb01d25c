//! Small self-contained SVG charts (line and bar), drawn in Rust with no font or system
//! dependency: text is left to the browser, so the report renders anywhere.

use std::fmt::Write;

pub const PALETTE: &[&str] = &[
    "#4f46e5", "#e11d48", "#059669", "#d97706", "#0891b2", "#7c3aed", "#64748b",
];

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Draw markers only (no line).
    pub scatter: bool,
    /// Dashed line.
    pub dashed: bool,
}

impl Series {
    pub fn line(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            scatter: false,
            dashed: false,
        }
    }
    pub fn scatter(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            scatter: true,
            ..Self::line(name, points)
        }
    }
    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }
}

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// "Nice" tick positions covering [lo, hi].
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).abs().max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= n as f64)
        .unwrap_or(10.0 * mag);
    // Integer multiples of the step, rounded to the step's decimals (no 0.6000000000000001).
    let scale = 10f64.powi((-step.log10().floor()).max(0.0) as i32 + 1);
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last)
        .map(|k| ((k as f64 * step) * scale).round() / scale)
        .map(|t| if t == 0.0 { 0.0 } else { t })
        .collect()
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 || v.abs() < 0.01 {
        format!("{v:.1e}")
    } else if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.2}").trim_end_matches('0').to_string()
    }
}

/// A line/scatter chart with axes, ticks, grid and legend.
pub fn line_chart(title: &str, xlabel: &str, ylabel: &str, series: &[Series]) -> String {
    let (w, h) = (640.0, 380.0);
    let (ml, mr, mt, mb) = (64.0, 20.0, 40.0, 78.0);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-family="system-ui,-apple-system,Segoe UI,Roboto,sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="600" fill="#111827">{}</text>"##,
        w / 2.0,
        esc(title)
    );
    if pts.is_empty() {
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#6b7280">no data</text></svg>"##,
            w / 2.0,
            h / 2.0
        );
        return s;
    }
    let (mut x0, mut x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (mut y0, mut y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    if x1 - x0 < 1e-12 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    if y1 - y0 < 1e-12 {
        y0 -= 1.0;
        y1 += 1.0;
    }
    let pad = (y1 - y0) * 0.06;
    y0 -= pad;
    y1 += pad;
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + ph - (y - y0) / (y1 - y0) * ph;
    for t in ticks(y0, y1, 6) {
        let y = sy(t);
        let _ = write!(
            s,
            r##"<line x1="{ml}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e7eb"/><text x="{}" y="{:.1}" text-anchor="end" fill="#4b5563">{}</text>"##,
            ml + pw,
            ml - 6.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    for t in ticks(x0, x1, 7) {
        let x = sx(t);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{mt}" y2="{}" stroke="#f3f4f6"/><text x="{x:.1}" y="{}" text-anchor="middle" fill="#4b5563">{}</text>"##,
            mt + ph,
            mt + ph + 16.0,
            fmt_tick(t)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#9ca3af"/><text x="{}" y="{}" text-anchor="middle" fill="#111827">{}</text><text transform="translate(16 {}) rotate(-90)" text-anchor="middle" fill="#111827">{}</text>"##,
        ml + pw / 2.0,
        mt + ph + 34.0,
        esc(xlabel),
        mt + ph / 2.0,
        esc(ylabel)
    );
    for (i, se) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let p: Vec<(f64, f64)> = se
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        if !se.scatter && p.len() > 1 {
            let d: Vec<String> = p
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let dash = if se.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let _ = write!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"{dash}/>"#,
                d.join(" ")
            );
        }
        if se.scatter || p.len() <= 30 {
            let r = if se.scatter { 5.0 } else { 2.5 };
            for &(x, y) in &p {
                let _ = write!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="{r}" fill="{c}"/>"#,
                    sx(x),
                    sy(y)
                );
            }
        }
        // Legend below the plot, in columns.
        let lx = ml + (i % 3) as f64 * 190.0;
        let ly = h - 22.0 + (i / 3) as f64 * 14.0 - if series.len() > 3 { 8.0 } else { 0.0 };
        let _ = write!(
            s,
            r##"<rect x="{lx}" y="{:.1}" width="14" height="4" fill="{c}"/><text x="{}" y="{:.1}" fill="#374151">{}</text>"##,
            ly - 4.0,
            lx + 20.0,
            ly + 1.0,
            esc(&se.name)
        );
    }
    s.push_str("</svg>");
    s
}

/// Horizontal grouped bars: one row per label, values in [0, max].
pub fn bar_chart(title: &str, rows: &[(String, f64)], max: f64) -> String {
    let (w, row_h) = (640.0, 30.0);
    let h = 50.0 + row_h * rows.len() as f64;
    let (ml, mr) = (230.0, 60.0);
    let pw = w - ml - mr;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" font-family="system-ui,-apple-system,Segoe UI,Roboto,sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="600" fill="#111827">{}</text>"##,
        w / 2.0,
        esc(title)
    );
    for (i, (label, v)) in rows.iter().enumerate() {
        let y = 40.0 + i as f64 * row_h;
        let bw = (v.max(0.0) / max.max(1e-12)).min(1.0) * pw;
        let c = PALETTE[i % PALETTE.len()];
        let _ = write!(
            s,
            r##"<text x="{}" y="{:.1}" text-anchor="end" fill="#374151">{}</text><rect x="{ml}" y="{y:.1}" width="{pw}" height="18" fill="#f3f4f6" rx="3"/><rect x="{ml}" y="{y:.1}" width="{bw:.1}" height="18" fill="{c}" rx="3"/><text x="{:.1}" y="{:.1}" fill="#111827">{}</text>"##,
            ml - 8.0,
            y + 13.0,
            esc(label),
            ml + pw + 6.0,
            y + 13.0,
            if v.is_finite() {
                format!("{v:.3}")
            } else {
                "n/a".into()
            }
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_nice_and_cover_the_range() {
        assert_eq!(ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        let t = ticks(-3.3, 7.9, 6);
        assert!(t.first().unwrap() >= &-3.3 && t.last().unwrap() <= &7.9 && t.len() >= 4);
    }

    #[test]
    fn chart_contains_series_and_escapes_text() {
        let svg = line_chart(
            "a<b",
            "x",
            "y",
            &[Series::line("s&1", vec![(0.0, 1.0), (1.0, 2.0)])],
        );
        assert!(svg.contains("a&lt;b") && svg.contains("s&amp;1") && svg.contains("<polyline"));
        assert!(line_chart("t", "x", "y", &[]).contains("no data"));
    }
}
