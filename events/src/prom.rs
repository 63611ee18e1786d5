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

/// What each metric family means: the `# HELP` line [`annotate`] writes for it.
pub const HELP: &[(&str, &str)] = &[
    ("fleetstream_ingest_connections", "QUIC connections open now"),
    ("fleetstream_ingest_connections_total", "QUIC connections accepted"),
    ("fleetstream_ingest_connections_refused_total", "QUIC connections refused at max_connections"),
    (
        "fleetstream_ingest_handshakes_failed_total",
        "QUIC handshakes that failed (no or an untrusted client certificate, a bad ALPN)",
    ),
    ("fleetstream_ingest_batches_total", "telemetry batches received over QUIC"),
    ("fleetstream_ingest_events_total", "drone events in the batches received over QUIC"),
    ("fleetstream_ingest_received_bytes_total", "bytes of batches received over QUIC"),
    ("fleetstream_ingest_subscribers", "QUIC stream subscriptions open now"),
    (
        "fleetstream_ingest_batches_rejected_total",
        "batches refused with a typed error (malformed, oversize, bad checksum), by reason",
    ),
    ("fleetstream_engine_batches_total", "batches appended to the log"),
    ("fleetstream_engine_batches_duplicate_total", "batches dropped as repeats of a producer's sequence"),
    ("fleetstream_log_storage_full_total", "appends refused because the log's disk was full"),
    ("fleetstream_engine_checkpoints_total", "shard checkpoints written"),
    ("fleetstream_engine_events_total", "drone events appended to the log"),
    ("fleetstream_engine_events_applied_total", "drone events applied by the shards"),
    ("fleetstream_engine_events_duplicate_total", "drone events dropped as repeats of a drone's sequence"),
    ("fleetstream_engine_delivery_events_total", "delivery events derived"),
    ("fleetstream_engine_dropoffs_far_total", "package drops away from the drop-off point (not a completed delivery)"),
    (
        "fleetstream_engine_events_stray_total",
        "pickups and drop-offs naming a delivery the drone is not flying, or out of stage order",
    ),
    ("fleetstream_log_bytes", "bytes held in the log"),
    ("fleetstream_engine_drones_tracked", "drones the shards track for the derive rules now"),
    ("fleetstream_limit_refused_total", "entries refused because their bounded table was full, by table"),
    ("fleetstream_limit_evicted_total", "entries a bounded table let go to make room, by table"),
    ("fleetstream_engine_append_seconds", "time to append a group of batches to the log and make it durable"),
    (
        "fleetstream_engine_event_age_at_ack_seconds",
        "age of an event (from its drone timestamp) when its batch was acknowledged",
    ),
    (
        "fleetstream_engine_event_age_at_submit_seconds",
        "age of an event (from its drone timestamp) when its batch reached the engine",
    ),
    (
        "fleetstream_engine_delivery_event_age_at_publish_seconds",
        "age of the telemetry behind a delivery event when the event was published",
    ),
    (
        "fleetstream_engine_delivery_server_seconds",
        "time from a batch reaching the engine to the delivery events it derived being published",
    ),
    ("fleetstream_log_fsync_seconds", "time of one log fsync, by topic"),
    ("fleetstream_engine_append_queue_depth", "batches waiting for the appender"),
    ("fleetstream_engine_shard_queue_depth", "batches waiting for each shard"),
    ("fleetstream_stream_subscribers", "stream subscribers attached now, by topic"),
    ("fleetstream_stream_subscribers_lagged_total", "subscribers cut off for falling behind their bounded queue"),
    ("fleetstream_queue_messages", "messages in each work queue, by state (ready, leased, dead)"),
    ("fleetstream_queue_enqueued_total", "messages enqueued, by queue"),
    ("fleetstream_queue_delivered_total", "messages handed to a consumer (redeliveries included), by queue"),
    ("fleetstream_queue_acked_total", "messages acknowledged, by queue"),
    ("fleetstream_queue_redelivered_total", "messages delivered again after a nack or an expired lease, by queue"),
    ("fleetstream_queue_dead_lettered_total", "messages moved to the dead-letter queue, by queue"),
    ("fleetstream_queue_replayed_total", "dead letters put back on their queue, by queue"),
    ("fleetstream_stream_cursor_lag", "batches between a named cursor and the end of its topic"),
    ("fleetstream_http_throttled_total", "HTTP requests refused with 429 by the per-client throttle"),
    ("fleetstream_http_unauthenticated_total", "HTTP requests refused with 401 (no API key), by reason"),
    (
        "fleetstream_http_forbidden_total",
        "HTTP requests refused with 403 or hidden as 404 (unknown key, another owner, a customer on an admin route), by reason",
    ),
    ("fleetstream_deliveries_scheduled_total", "deliveries scheduled"),
    (
        "fleetstream_deliveries_refused_total",
        "schedule requests refused (an account that may not order, no drone, a failed dependency)",
    ),
    (
        "fleetstream_scheduler_compensation_failures_total",
        "undo steps of a failed scheduling operation that failed and are retried",
    ),
    ("fleetstream_drones_registered", "drones registered with Drone Management"),
    ("fleetstream_drones_free", "registered drones without a delivery"),
    ("fleetstream_dependency_attempts_total", "internal calls attempted, retries included, by dependency"),
    (
        "fleetstream_dependency_failures_total",
        "internal call attempts that timed out, failed to connect or answered 5xx, by dependency",
    ),
    ("fleetstream_dependency_retries_total", "internal calls retried, by dependency"),
    (
        "fleetstream_dependency_short_circuited_total",
        "internal calls failed at once by an open circuit breaker, by dependency",
    ),
    ("fleetstream_dependency_circuit_open", "1 while a dependency's circuit breaker is open or half open"),
    ("fleetstream_store_commits_total", "service store commits, by store"),
    ("fleetstream_store_writes_total", "records written by service store commits, by store"),
    ("fleetstream_store_written_bytes_total", "bytes written by service store commits, by store"),
    ("fleetstream_store_commit_seconds_total", "time spent in service store commits, by store"),
    ("fleetstream_spans_dropped_total", "trace spans dropped because the export queue was full"),
    ("fleetstream_trace_spans_recorded_total", "spans of deliveries recorded for their kept traces"),
    ("fleetstream_trace_spans_dropped_total", "spans of deliveries dropped because the keeper's queue was full"),
    (
        "fleetstream_trace_spans_not_kept_total",
        "spans of deliveries the store could not take (an error, or a delivery at its cap)",
    ),
    ("fleetstream_trace_spans_expired_total", "kept spans removed by retention or the store's cap"),
    ("fleetstream_stopped", "1 for each part stopped or not ready (readiness answers 503 while any is)"),
    ("process_resident_memory_bytes", "resident memory of the process"),
    ("fleetstream_cluster_batch_parts_published_total", "batch parts published to JetStream"),
    ("fleetstream_cluster_batch_parts_duplicate_total", "batch parts JetStream reported as duplicates"),
    ("fleetstream_cluster_delivery_events_published_total", "delivery-event batches published to JetStream"),
    ("fleetstream_cluster_invalid_messages_total", "JetStream messages that failed validation and were skipped"),
    ("fleetstream_cluster_shard_leases_lost_total", "shard leases lost to another node"),
    ("fleetstream_cluster_shards_acquired_total", "shard leases acquired"),
    ("fleetstream_cluster_shards_owned", "shards this node owns now"),
    ("fleetstream_gateway_forwarded_total", "requests the gateway forwarded, by role"),
    ("fleetstream_tls_handshakes_total", "TLS handshakes completed on the HTTPS listener"),
    ("fleetstream_tls_handshakes_refused_total", "TLS handshakes refused or failed on the HTTPS listener"),
    ("fleetstream_mqtt_messages_total", "MQTT messages the bridge received"),
    ("fleetstream_mqtt_events_total", "drone events the MQTT bridge made durable"),
    ("fleetstream_mqtt_acked_total", "MQTT messages acknowledged to the broker once durable"),
    ("fleetstream_mqtt_rejected_total", "MQTT messages refused as not drone events (acknowledged, not kept)"),
    ("fleetstream_mqtt_disconnects_total", "MQTT connections lost or dropped by the bridge"),
    ("fleetstream_mqtt_failed_batches_total", "MQTT batches the engine could not make durable (not acknowledged)"),
    ("fleetstream_mqtt_connected", "1 while the MQTT bridge is connected and subscribed"),
];

/// The help text of `family`, if it has one.
pub fn help(family: &str) -> Option<&'static str> {
    HELP.iter().find(|(name, _)| *name == family).map(|(_, text)| *text)
}

/// The family a sample line belongs to: its name up to the labels, without a histogram's
/// `_bucket`, `_sum` or `_count` when `histograms` declares it one.
fn family_of<'a>(line: &'a str, histograms: &[&str]) -> &'a str {
    let name = line.split(['{', ' ']).next().unwrap_or(line);
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && histograms.contains(&base)
        {
            return base;
        }
    }
    name
}

/// Finishes a `/metrics` page written by the crates' renderers: every family gets one
/// `# HELP` line (from [`HELP`]) and one `# TYPE` line before its first sample (a family
/// rendered without one is typed `counter` when its name ends in `_total`, else `gauge`), and
/// repeated `# TYPE` lines are dropped.
pub fn annotate(raw: &str) -> String {
    let mut histograms = Vec::new();
    for line in raw.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, "histogram")) = rest.split_once(' ')
        {
            histograms.push(name);
        }
    }
    let mut out = String::with_capacity(raw.len() + raw.len() / 4);
    let mut seen: Vec<&str> = Vec::new();
    let head = |out: &mut String, family: &str, kind: &str| {
        let text = help(family).unwrap_or("fleetstream metric");
        let _ = writeln!(out, "# HELP {family} {text}\n# TYPE {family} {kind}");
    };
    for line in raw.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            if !seen.contains(&name) {
                head(&mut out, name, kind);
                seen.push(name);
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let family = family_of(line, &histograms);
        if !seen.contains(&family) {
            head(&mut out, family, if family.ends_with("_total") { "counter" } else { "gauge" });
            seen.push(family);
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn annotating_gives_every_family_one_help_and_type_line_before_its_samples() {
        let raw = "# TYPE fleetstream_x_total counter\nfleetstream_x_total 3\nfleetstream_y{a=\"b\"} 1\n\
                   # TYPE fleetstream_x_total counter\nfleetstream_z_total{r=\"q\"} 2\n\
                   # TYPE fleetstream_t_seconds histogram\nfleetstream_t_seconds_bucket{le=\"+Inf\"} 1\n\
                   fleetstream_t_seconds_sum 0.5\nfleetstream_t_seconds_count 1\n";
        let out = super::annotate(raw);
        for family in ["fleetstream_x_total", "fleetstream_y", "fleetstream_z_total", "fleetstream_t_seconds"] {
            assert_eq!(out.matches(&format!("# HELP {family} ")).count(), 1, "{out}");
            assert_eq!(out.matches(&format!("# TYPE {family} ")).count(), 1, "{out}");
        }
        assert!(out.contains("# TYPE fleetstream_y gauge\n") && out.contains("# TYPE fleetstream_z_total counter\n"));
        assert!(!out.contains("# TYPE fleetstream_t_seconds_sum"), "{out}");
        assert_eq!(out.lines().filter(|l| !l.starts_with('#')).count(), 6, "{out}");
    }

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
