//! Prometheus text exposition, the one format every crate's `/metrics` section is written in.
//! Names follow `fleetstream_<name>_<unit>`, with `_total` for counters.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Appends a counter.
pub fn counter(out: &mut String, name: &str, value: u64) {
    let _ = writeln!(out, "# TYPE {name} counter\n{name} {value}");
}

/// Appends a gauge.
pub fn gauge(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# TYPE {name} gauge\n{name} {value}");
}

/// Appends one labelled sample of a metric whose `# TYPE` line was written already.
pub fn sample(out: &mut String, name: &str, label: &str, label_value: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{name}{{{label}=\"{label_value}\"}} {value}");
}

/// Appends a `# TYPE` line for labelled samples that follow.
pub fn declare(out: &mut String, name: &str, kind: &str) {
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Upper bounds of [`Histogram`] buckets, µs: fine where a disk flush or a hop normally lands
/// (0.1–1 ms) and where end-to-end latency targets sit (1–20 ms), coarse out to the stalls
/// worth knowing about (up to a second).
pub const BUCKETS_US: [u64; 21] = [
    50, 100, 250, 500, 750, 1_000, 1_500, 2_000, 3_000, 4_000, 5_000, 7_500, 10_000, 15_000, 20_000, 25_000, 50_000,
    100_000, 250_000, 500_000, 1_000_000,
];

/// A latency histogram with fixed buckets that any thread can record into without a lock,
/// rendered as a Prometheus histogram in seconds.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_US.iter().position(|&b| us <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The longest observation so far.
    pub fn max(&self) -> Duration {
        Duration::from_micros(self.max_us.load(Ordering::Relaxed))
    }

    /// Appends the histogram's samples under `name` (whose `# TYPE name histogram` line is
    /// written by [`declare`]), each with `label="value"` besides `le`.
    pub fn render(&self, out: &mut String, name: &str, label: &str, value: &str) {
        let mut cumulative = 0;
        for (bound, n) in BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{label}=\"{value}\",le=\"{le}\"}} {cumulative}");
        }
        let count = self.count();
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{{label}=\"{value}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{label}=\"{value}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{{label}=\"{value}\"}} {count}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_the_text_format() {
        let mut out = String::new();
        super::counter(&mut out, "fleetstream_x_total", 3);
        super::gauge(&mut out, "fleetstream_y", 1.5);
        super::declare(&mut out, "fleetstream_z_total", "counter");
        super::sample(&mut out, "fleetstream_z_total", "reason", "bad", 2);
        assert_eq!(
            out,
            "# TYPE fleetstream_x_total counter\nfleetstream_x_total 3\n# TYPE fleetstream_y gauge\nfleetstream_y 1.5\n\
             # TYPE fleetstream_z_total counter\nfleetstream_z_total{reason=\"bad\"} 2\n"
        );
    }

    #[test]
    fn a_histogram_counts_cumulatively_and_keeps_its_maximum() {
        let h = super::Histogram::default();
        for us in [40, 100, 700, 2_000_000] {
            h.record(std::time::Duration::from_micros(us));
        }
        assert_eq!(h.count(), 4);
        assert_eq!(h.max(), std::time::Duration::from_secs(2));
        let mut out = String::new();
        h.render(&mut out, "fleetstream_t_seconds", "log", "x");
        assert!(out.contains("fleetstream_t_seconds_bucket{log=\"x\",le=\"0.00005\"} 1\n"), "{out}");
        assert!(out.contains("fleetstream_t_seconds_bucket{log=\"x\",le=\"0.0001\"} 2\n"), "{out}");
        assert!(out.contains("fleetstream_t_seconds_bucket{log=\"x\",le=\"0.001\"} 3\n"), "{out}");
        assert!(out.contains("fleetstream_t_seconds_bucket{log=\"x\",le=\"1\"} 3\n"), "{out}");
        assert!(out.contains("fleetstream_t_seconds_bucket{log=\"x\",le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("fleetstream_t_seconds_sum{log=\"x\"} 2.00084\n"), "{out}");
        assert!(out.contains("fleetstream_t_seconds_count{log=\"x\"} 4\n"), "{out}");
    }
}
