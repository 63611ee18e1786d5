//! Prometheus text exposition, the one format every crate's `/metrics` section is written in.
//! Names follow `fleetstream_<name>_<unit>`, with `_total` for counters.

use std::fmt::Write;

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
}
