//! The seam between the engine and where it keeps things.
//!
//! The engine owns its threads (shards, publisher, checkpointer) and the edge API; a [`Backend`]
//! owns the input log (appending, numbering, making batches and commands durable), the offset
//! subscriptions read from it, where derived events go ([`DerivedSink`]), where checkpoints are
//! written ([`CheckpointStore`]) and which shards this node runs. There are two: the embedded
//! log on this node's disk ([`super::local::Local`]) and JetStream (`crate::cluster`). The engine
//! holds one `Arc<dyn Backend>` and never asks which it is.

use super::*;

pub use crate::BoxFuture;

/// What a backend needs from the engine to start feeding it.
#[derive(Debug)]
pub struct StartContext {
    /// The shard queues, by shard index.
    pub shards: Vec<flume::Sender<ShardMsg>>,
    /// The in-process telemetry topic.
    pub telemetry: Arc<Topic<DroneEvent>>,
    /// The in-process delivery-events topic.
    pub deliveries: Arc<Topic<DeliveryEvent>>,
    /// Per shard, the first input offset it still needs (one past its checkpoint).
    pub needed: Arc<[AtomicU64]>,
    /// The publisher's queue, for a backend that waits until a replay is published.
    pub(crate) publisher: flume::Sender<PublishMsg>,
    /// The engine's settings.
    pub cfg: EngineConfig,
    /// The engine's counters.
    pub metrics: Arc<EngineMetrics>,
}

/// What starting a backend did.
#[derive(Debug, Default)]
pub struct Started {
    /// Threads the engine joins at shutdown.
    pub threads: Vec<JoinHandle<()>>,
    /// Log records replayed into the shards.
    pub replayed: u64,
    /// The next input offset.
    pub next_offset: u64,
}

/// Where the engine's input log, derived events, checkpoints and shard ownership live.
pub trait Backend: Send + Sync + 'static {
    /// The checkpoint each shard resumes from (`n` shards); `None` to start a shard empty.
    fn checkpoints(&self, n: usize) -> Result<Vec<Option<Checkpoint>>, crate::Error>;

    /// Starts feeding the shards (and the in-process topics).
    fn start(&self, ctx: StartContext) -> Result<Started, crate::Error>;

    /// Takes a batch; the returned future resolves once it is durable (or refused).
    fn submit(&self, batch: TelemetryBatch) -> BoxFuture<'_, Result<AckFuture, Error>>;

    /// Logs a command and has its drone's shard apply it; resolves with the shard's answer.
    fn command(&self, cmd: DeliveryCommand, trace: TraceContext) -> BoxFuture<'_, Result<(), Error>>;

    /// Reads the telemetry topic from `from`.
    fn follow_telemetry(&self, from: StartAt) -> Result<OffsetSubscription<DroneEvent>, Error>;

    /// Reads the delivery-events topic from `from`.
    fn follow_deliveries(&self, from: StartAt) -> Result<OffsetSubscription<DeliveryEvent>, Error>;

    /// A topic's first held offset and delivered end.
    fn bounds(&self, topic: StreamTopic) -> (u64, u64);

    /// Refuses a cursor this backend cannot hold at `next` (past the end of a local log).
    fn check_cursor(&self, topic: StreamTopic, next: u64) -> Result<(), Error>;

    /// Shares a committed cursor with the other nodes, where there are any.
    fn share_cursor(&self, _topic: StreamTopic, _name: &str, _cursor: crate::cursor::Cursor) {}

    /// The state of a drone whose shard another node runs, asked there; `None` when this node
    /// runs `shard` (its own shard thread answers).
    fn remote_drone(&self, _shard: usize, _id: DroneId) -> Option<BoxFuture<'_, Result<Option<DroneSnapshot>, Error>>> {
        None
    }

    /// Where the publisher sends derived events.
    fn derived_sink(&self) -> Result<Box<dyn DerivedSink>, crate::Error>;

    /// Where shard checkpoints are written; `None` when they are not kept.
    fn checkpoint_store(&self) -> Option<Box<dyn CheckpointStore>>;

    /// Hands this node's part back (shards checkpointed while their threads still run).
    fn stop(&self) -> BoxFuture<'_, ()>;

    /// Stops feeding the shards: what was accepted is made durable, then every shard is told to
    /// stop after its queue.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// Requests waiting to be appended.
    fn queued(&self) -> usize {
        0
    }

    /// Appends the backend's own counters in Prometheus text format.
    fn render_metrics(&self, _out: &mut String) {}

    /// Fault injection for tests: the input log's disk fails or slows down from now on
    /// (backends without a local log ignore it).
    #[doc(hidden)]
    fn inject_disk_fault(&self, _fault: crate::log::DiskFault) {}
}

/// Where derived delivery events go: the publisher thread feeds it what the shards report.
pub trait DerivedSink: Send {
    /// What shard `shard` derived since its last report, and how far it has applied its queue.
    fn report(&mut self, shard: usize, applied: Option<u64>, spans: Vec<Span>);

    /// `done` is to be told once every event derived from input up to `upto` is durable.
    fn barrier(&mut self, upto: Option<u64>, done: flume::Sender<()>);

    /// The end of a round of reports: publish what can be published, answer what can be.
    fn end_round(&mut self);

    /// The publisher is ending.
    fn finish(&mut self) {}
}

/// Where shard checkpoints are written.
pub trait CheckpointStore: Send {
    /// Writes a checkpoint; `false` when it was not written (the shard is no longer this node's).
    fn put(&self, ckpt: &Checkpoint) -> Result<bool, crate::Error>;
}
