//! `loadgen --plot FILE`: the run's latency percentile distributions as an SVG chart, in the
//! shape HDR histogram plots use (percentile on a "nines" axis, latency on a log axis), so the
//! tail is as readable as the median. Written by hand: a few lines of SVG need no plotting crate.

use std::fmt::Write;

use crate::{CurvePoint, Report};

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;
/// Where the maximum is drawn, past 99.999%.
const X_MAX: f64 = 5.4;

/// x coordinate of a percentile: log10(1 / (1 - q)), with 100% (the maximum) at `X_MAX`.
fn nines(percentile: f64) -> f64 {
    let tail = 1.0 - percentile / 100.0;
    if tail <= 0.0 { X_MAX } else { (1.0 / tail).log10().min(X_MAX) }
}

/// The chart for one report.
pub fn svg(report: &Report) -> String {
    let series: [(&str, &str, &[CurvePoint]); 3] = [
        ("delivery events (drone event → derived event at the subscriber)", "#d62728", &report.curves.delivery_events),
        ("telemetry (drone event → subscriber)", "#1f77b4", &report.curves.telemetry),
        ("send lag (behind the fleet's schedule)", "#7f7f7f", &report.curves.send_lag),
    ];
    let values = series.iter().flat_map(|(_, _, c)| c.iter().map(|p| p.us.max(1) as f64));
    let (lo, hi) = values.fold((f64::MAX, 1.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let lo = if lo == f64::MAX { 1.0 } else { lo };
    // Whole decades of microseconds.
    let (y0, y1) = (lo.log10().floor(), hi.log10().ceil().max(lo.log10().floor() + 1.0));
    let x0 = nines(50.0);
    let px = |x: f64| LEFT + (x - x0) / (X_MAX - x0) * (WIDTH - LEFT - RIGHT);
    let py = |us: f64| HEIGHT - BOTTOM - (us.max(1.0).log10() - y0) / (y1 - y0) * (HEIGHT - TOP - BOTTOM);

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">fleetstream latency by percentile: {} drones, {} connections, {:.0} events/s acknowledged</text>"#,
        WIDTH / 2.0,
        report.drones,
        report.connections,
        report.throughput_eps
    );
    // Grid and axis labels.
    for (p, label) in [
        (50.0, "50%"),
        (90.0, "90%"),
        (99.0, "99%"),
        (99.9, "99.9%"),
        (99.99, "99.99%"),
        (99.999, "99.999%"),
        (100.0, "max"),
    ] {
        let x = px(nines(p));
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            HEIGHT - BOTTOM,
            HEIGHT - BOTTOM + 18.0
        );
    }
    let mut decade = y0;
    while decade <= y1 {
        let us = 10f64.powf(decade);
        let y = py(us);
        let label = match us {
            us if us >= 1e6 => format!("{} s", us / 1e6),
            us if us >= 1e3 => format!("{} ms", us / 1e3),
            us => format!("{us} µs"),
        };
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
        decade += 1.0;
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        (LEFT + WIDTH - RIGHT) / 2.0,
        HEIGHT - BOTTOM + 40.0
    );
    let _ = writeln!(
        out,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">latency (log scale)</text>"#,
        (TOP + HEIGHT - BOTTOM) / 2.0,
        (TOP + HEIGHT - BOTTOM) / 2.0
    );
    // Curves and legend.
    for (i, (name, colour, curve)) in series.iter().enumerate() {
        if curve.is_empty() {
            continue;
        }
        let points: Vec<String> =
            curve.iter().map(|p| format!("{:.1},{:.1}", px(nines(p.percentile)), py(p.us as f64))).collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let y = TOP + 8.0 + 16.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
            LEFT + 10.0,
            LEFT + 34.0,
            LEFT + 40.0,
            y + 4.0
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::histogram;

    #[test]
    fn percentiles_map_to_nines_and_the_max_sits_at_the_right_edge() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), X_MAX);
    }

    #[test]
    fn a_report_becomes_an_svg_with_one_line_per_measured_series() {
        let mut h = histogram();
        for v in 1..=10_000u64 {
            h.record(v * 10).unwrap();
        }
        let curve = crate::curve(&h);
        assert_eq!(curve.last().map(|p| p.us), Some(h.max()));
        assert!(curve.windows(2).all(|w| w[0].us <= w[1].us), "a distribution never falls");
        let report = crate::tests::report_with(curve);
        let svg = svg(&report);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1, "empty series are left out");
        assert!(svg.contains("99.9%") && svg.contains("ms"));
    }
}
