//! The engine's counters and histograms, the record of parts stopped by a storage error, and
//! their Prometheus text.

use super::*;

/// Counters of the engine, read by `/metrics`.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Batches appended to the log.
    pub batches: AtomicU64,
    /// Drone events in appended batches.
    pub events: AtomicU64,
    /// Batches acknowledged without appending: already in the log.
    pub duplicate_batches: AtomicU64,
    /// Appends refused for lack of space.
    pub storage_full: AtomicU64,
    /// From a batch handed to the appender to its acknowledgement: the queue, the write, the
    /// group's fsync and the routing to shards.
    pub append_time: events::prom::Histogram,
    /// Age of each batch's first event (by its own timestamp) when the batch is acknowledged:
    /// creation at the drone to durable and routed, for drones whose clocks agree with this
    /// node's (the load generator's do; a drone's clock ahead of the node's counts as 0).
    pub event_age_at_ack: events::prom::Histogram,
    /// Age of each batch's first event when the ingest hands the batch to the engine: the
    /// drone's batching and sending, the transport and validation. With `event_age_at_ack` it
    /// splits an event's time before acknowledgement into the way here and the append.
    pub event_age_at_submit: events::prom::Histogram,
    /// Age of each derived delivery event (by the timestamp it carries, its drone event's or
    /// its command's) when it becomes visible to subscribers: logged, synced and published.
    pub delivery_age_at_publish: events::prom::Histogram,
    /// The server's part of a delivery event's way: from the engine receiving the drone batch
    /// that derived it (handed over by the ingest) to the event being published to subscribers.
    pub delivery_server_time: events::prom::Histogram,
    /// How long each fsync of the input log took (its count is the number of fsyncs).
    pub fsync_time: events::prom::Histogram,
    /// How long each fsync of the delivery-events log took.
    pub delivery_fsync_time: events::prom::Histogram,
    /// Drone events applied by shards.
    pub applied: AtomicU64,
    /// Drone events dropped as repeats.
    pub duplicates: AtomicU64,
    /// Delivery events derived.
    pub derived: AtomicU64,
    /// DroppedOff events refused for distance.
    pub far_dropoffs: AtomicU64,
    /// Pickups and drop-offs naming a delivery the drone is not flying.
    pub stray: AtomicU64,
    /// Checkpoints written.
    pub checkpoints: AtomicU64,
    /// Drones the shards track for the derive rules now (capped by
    /// `[engine] max_drones_per_shard` each).
    pub drones_tracked: std::sync::atomic::AtomicI64,
    /// Bytes in the log.
    pub log_bytes: AtomicU64,
    /// Parts that stopped after a storage error, with the first reason (see [`Stopped`]).
    pub stopped: Stopped,
}

/// The parts of a node that stopped after an error on their durable path (a failed append,
/// fsync or commit): each stops acknowledging and answering barriers rather than carry on past
/// a hole, is logged once with the reason, shows in `/metrics` (`fleetstream_stopped{part}`) and
/// in readiness, and recovers from what is on disk at the next start.
#[derive(Debug, Default)]
pub struct Stopped(parking_lot::Mutex<Vec<(String, String)>>);

impl Stopped {
    /// Records that `part` stopped because of `reason`; the first time per part it is logged.
    pub fn stop(&self, part: &str, reason: &str) {
        let mut parts = self.0.lock();
        if parts.iter().any(|(p, _)| p == part) {
            return;
        }
        error!(part, reason, "stopped after a storage error: it acknowledges nothing more until a restart");
        parts.push((part.to_string(), reason.to_string()));
    }

    /// Every stopped part and why.
    pub fn parts(&self) -> Vec<(String, String)> {
        self.0.lock().clone()
    }
}

/// Appends the engine's counters in Prometheus text format.
pub fn render_metrics(engine: &Engine, out: &mut String) {
    use events::prom::{counter, declare, gauge, sample};
    let m = engine.metrics();
    let counters = [
        ("fleetstream_engine_batches_total", &m.batches),
        ("fleetstream_engine_batches_duplicate_total", &m.duplicate_batches),
        ("fleetstream_log_storage_full_total", &m.storage_full),
        ("fleetstream_engine_checkpoints_total", &m.checkpoints),
        ("fleetstream_engine_events_total", &m.events),
        ("fleetstream_engine_events_applied_total", &m.applied),
        ("fleetstream_engine_events_duplicate_total", &m.duplicates),
        ("fleetstream_engine_delivery_events_total", &m.derived),
        ("fleetstream_engine_dropoffs_far_total", &m.far_dropoffs),
        ("fleetstream_engine_events_stray_total", &m.stray),
    ];
    for (name, c) in counters {
        counter(out, name, c.load(Ordering::Relaxed));
    }
    gauge(out, "fleetstream_log_bytes", m.log_bytes.load(Ordering::Relaxed));
    gauge(out, "fleetstream_engine_drones_tracked", m.drones_tracked.load(Ordering::Relaxed));
    declare(out, "fleetstream_engine_append_seconds", "histogram");
    m.append_time.render(out, "fleetstream_engine_append_seconds", "log", "input");
    declare(out, "fleetstream_engine_event_age_at_ack_seconds", "histogram");
    m.event_age_at_ack.render(out, "fleetstream_engine_event_age_at_ack_seconds", "log", "input");
    declare(out, "fleetstream_engine_event_age_at_submit_seconds", "histogram");
    m.event_age_at_submit.render(out, "fleetstream_engine_event_age_at_submit_seconds", "log", "input");
    declare(out, "fleetstream_engine_delivery_event_age_at_publish_seconds", "histogram");
    m.delivery_age_at_publish.render(
        out,
        "fleetstream_engine_delivery_event_age_at_publish_seconds",
        "log",
        "delivery-events",
    );
    declare(out, "fleetstream_engine_delivery_server_seconds", "histogram");
    m.delivery_server_time.render(out, "fleetstream_engine_delivery_server_seconds", "log", "delivery-events");
    declare(out, "fleetstream_log_fsync_seconds", "histogram");
    m.fsync_time.render(out, "fleetstream_log_fsync_seconds", "log", "input");
    m.delivery_fsync_time.render(out, "fleetstream_log_fsync_seconds", "log", "delivery-events");
    gauge(out, "fleetstream_engine_append_queue_depth", engine.append_depth());
    declare(out, "fleetstream_engine_shard_queue_depth", "gauge");
    for (shard, depth) in engine.queue_depths().into_iter().enumerate() {
        sample(out, "fleetstream_engine_shard_queue_depth", "shard", &shard.to_string(), depth);
    }
    declare(out, "fleetstream_stream_subscribers", "gauge");
    sample(out, "fleetstream_stream_subscribers", "topic", "drone-telemetry", engine.telemetry().subscribers());
    sample(out, "fleetstream_stream_subscribers", "topic", "delivery-events", engine.deliveries().subscribers());
    counter(
        out,
        "fleetstream_stream_subscribers_lagged_total",
        engine.telemetry().cut_off() + engine.deliveries().cut_off(),
    );
    engine.inner.backend.render_metrics(out);
}

/// How long before `now_us` the event time `ts_us` was (both from [`events::now_us`]); 0 for
/// a time after it.
pub(super) fn age(now_us: u64, ts_us: u64) -> Duration {
    Duration::from_micros(now_us.saturating_sub(ts_us))
}
