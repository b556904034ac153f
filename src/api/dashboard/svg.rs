//! Bar charts as inline SVG, drawn by the server (no script, nothing fetched): one stacked bar per
//! month, one colour per series, each segment a link to the search that counted it.
use std::fmt::Write;

use super::data::Grid;
use super::render::escape;

/// Colour-blind-safe palette (Okabe–Ito), one per series in order.
pub const PALETTE: &[&str] = &[
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000",
];

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 240.0;
const LEFT: f64 = 40.0;
const BOTTOM: f64 = 36.0;
const TOP: f64 = 12.0;

/// The smallest "round" maximum (1, 2, 5 × 10ⁿ) at or above `n`, for the y axis.
fn nice_max(n: i64) -> i64 {
    let mut step = 1;
    loop {
        for m in [1, 2, 5] {
            if m * step >= n.max(1) {
                return m * step;
            }
        }
        step *= 10;
    }
}

/// `title` names the chart for screen readers; `epicurve` draws touching bars (a histogram).
pub fn stacked_bars(grid: &Grid, title: &str, epicurve: bool) -> String {
    let months = grid.months.len().max(1);
    let totals: Vec<i64> = (0..grid.months.len())
        .map(|i| grid.series.iter().map(|s| s.cells[i].n).sum())
        .collect();
    let max = nice_max(totals.iter().copied().max().unwrap_or(0));
    let plot_w = WIDTH - LEFT - 8.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let slot = plot_w / months as f64;
    let bar = if epicurve { slot } else { slot * 0.7 };
    let y_of = |v: i64| TOP + plot_h - plot_h * v as f64 / max as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="grafico" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg"><title>{}</title>"#,
        escape(title)
    );
    // y axis: 0, half, max
    for v in [0, max / 2, max] {
        let y = y_of(v);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#ccc"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{v}</text>"##,
            WIDTH - 8.0,
            LEFT - 4.0,
            y + 4.0
        );
    }
    for (i, m) in grid.months.iter().enumerate() {
        let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
        let mut base = 0;
        for (k, series) in grid.series.iter().enumerate() {
            let c = &series.cells[i];
            if c.n == 0 {
                continue;
            }
            let (y_top, y_bottom) = (y_of(base + c.n), y_of(base));
            let _ = write!(
                s,
                r##"<a href="{}"><rect x="{x:.1}" y="{y_top:.1}" width="{:.1}" height="{:.1}" fill="{}" stroke="#fff" stroke-width="0.5"><title>{} — {}: {}</title></rect></a>"##,
                escape(&c.href),
                bar.max(1.0),
                (y_bottom - y_top).max(0.5),
                PALETTE[k % PALETTE.len()],
                escape(&series.label),
                escape(&m.label()),
                c.n
            );
            base += c.n;
        }
        // every month is labelled when they fit, else every third; the year under January
        if months <= 18 || i % 3 == 0 {
            let cx = LEFT + slot * i as f64 + slot / 2.0;
            let _ = write!(
                s,
                r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"#,
                HEIGHT - BOTTOM + 14.0,
                m.short()
            );
            if m.month == 1 || i == 0 {
                let _ = write!(
                    s,
                    r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#555">{}</text>"##,
                    HEIGHT - BOTTOM + 27.0,
                    m.year
                );
            }
        }
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::dashboard::data::{Count, Series};
    use crate::api::dashboard::filters::Month;

    #[test]
    fn round_maxima() {
        assert_eq!(nice_max(0), 1);
        assert_eq!(nice_max(3), 5);
        assert_eq!(nice_max(7), 10);
        assert_eq!(nice_max(101), 200);
    }

    #[test]
    fn segments_link_to_their_search_and_labels_are_escaped() {
        let m = Month::parse("2026-12").unwrap();
        let grid = Grid {
            months: vec![m],
            series: vec![Series {
                code: "x".into(),
                label: "<b>".into(),
                cells: vec![Count {
                    n: 2,
                    href: "/fhir/Communication?a=1&b=2".into(),
                }],
                total: Count {
                    n: 2,
                    href: String::new(),
                },
            }],
        };
        let svg = stacked_bars(&grid, "t", false);
        assert!(svg.contains(r#"href="/fhir/Communication?a=1&amp;b=2""#));
        assert!(svg.contains("&lt;b&gt; — dic 2026: 2"));
        assert!(!svg.contains("<b>"));
    }
}
