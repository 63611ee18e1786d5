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
            derive: DeriveConfig::default(),
        }
    }
}

impl EngineConfig {
    /// The shard count after resolving 0 to the number of cores.
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { self.shards }
    }
}
