//! The engine's settings: queue sizes, shard count, checkpoint interval and the derive rules.

use super::*;

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Shard threads; 0 means one per CPU core. A shard is one thread, so more shards than cores
    /// only adds switching. Changing it discards the checkpoints (the log is replayed whole).
    pub shards: usize,
    /// Batches (or batch slices) each shard queue holds before the appender waits. Default 256:
    /// with batches of about 1,000 events that is a quarter of a million events of slack per
    /// shard, enough to ride out a scheduling hiccup without holding much memory.
    pub shard_queue: usize,
    /// Requests waiting for the appender before `submit` waits. Default 1024: the largest
    /// group one fsync can cover.
    pub append_queue: usize,
    /// Batches each subscriber may have queued. Default 1024: a subscriber that is more than
    /// about a second behind at full rate is either blocking the pipeline (in-process
    /// consumers) or cut off (remote ones).
    pub subscriber_queue: usize,
    /// How often each shard checkpoints, ms. Default 1000: replay after a crash covers about
    /// a second of traffic. A shard only takes a snapshot of its state (well under a
    /// millisecond for thousands of drones); a background thread writes it.
    pub checkpoint_interval_ms: u64,
    /// Producers whose recent batch numbers are remembered for dedup. Default 100,000: every
    /// drone of a large fleet sending directly, at about 500 bytes each.
    pub max_producers: usize,
    /// Drones each shard tracks for the derive rules at most. Default 250,000: a fleet of half
    /// a million drones on two cores. A tracked drone takes up to about 400 bytes (its entry,
    /// the table's spare room and a checkpoint's copies; measured by `tests/hostile_ids.rs`),
    /// so at most about 100 MiB a shard. Past
    /// it the drones idle longest (no delivery, oldest last report) are let go, a sixteenth of
    /// the cap at a time; a drone let go is tracked again from its next event. When every
    /// tracked drone flies a delivery, a new drone's events are not applied (counted in
    /// `fleetstream_limit_refused_total{table="tracked_drones"}`; they stay in the log and the
    /// telemetry stream).
    pub max_drones_per_shard: usize,
    /// Named cursors a topic holds at most. Default 10,000 (about 100 bytes each). A new name
    /// past it takes the place of one idle for `cursor_idle_h`, or is refused with
    /// `limit_reached`.
    pub max_cursors: usize,
    /// How long a named cursor must go uncommitted before a new name may take its place when
    /// the topic is full, hours. Default 168 (a week).
    pub cursor_idle_h: u64,
    /// The derive rules.
    pub derive: DeriveConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            shards: 0,
            shard_queue: 256,
            append_queue: 1024,
            subscriber_queue: 1024,
            checkpoint_interval_ms: 1000,
            max_producers: 100_000,
            max_drones_per_shard: crate::derive::DEFAULT_MAX_DRONES,
            max_cursors: 10_000,
            cursor_idle_h: 168,
            derive: DeriveConfig::default(),
        }
    }
}

impl EngineConfig {
    /// How many named cursors a topic holds, and when an idle one makes room.
    pub fn cursor_limits(&self) -> crate::cursor::CursorLimits {
        crate::cursor::CursorLimits {
            per_topic: self.max_cursors.max(1),
            idle_us: self.cursor_idle_h.saturating_mul(3_600_000_000),
        }
    }

    /// The shard count after resolving 0 to the number of cores.
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { self.shards }
    }
}
