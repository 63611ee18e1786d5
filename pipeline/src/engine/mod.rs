//! The engine: an appender that makes each batch durable and numbers it, a router that splits
//! batches by drone over shard threads, the shards that run the derive state machine, and the
//! fan-out of telemetry and delivery events to subscribers.
//!
//! ```text
//!  submit(batch) ─► append queue (bounded) ─► appender thread: group ─► dedup ─► log.append
//!  command(cmd) ──┘                            ─► one fsync for the group (group commit)
//!                                              ─► route: one index list per shard (shared batch)
//!                                              ─► acks
//!          shard queues (bounded) ─► shard threads: Deriver ─► delivery-events topic
//!                                                 └─► checkpoints (state + offset)
//!          fan-out queue (bounded) ─► fan-out thread ─► drone-telemetry topic
//! ```
//!
//! The appender is the one writer of the log: it takes whatever requests are waiting, appends
//! them, syncs once under the configured [`FsyncPolicy`], and only then routes and acknowledges
//! them, so a subscriber never sees, and a producer is never told about, a batch that a crash
//! could take back. A batch whose `(producer, batch_seq)` is already in the log is acknowledged
//! without being appended again ([`ProducerWindows`]).
//!
//! Each drone maps to exactly one shard and a shard applies its queue in order, so a drone's
//! events are applied in log order. Shards checkpoint their state with the offset it covers; on
//! start the engine restores the checkpoints and replays the log after them, so the shards end
//! where they would have been and derive the same events, with the same ids. Every queue is
//! bounded; a full queue makes `submit` wait, which the ingest turns into QUIC flow control.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use events::wire::{Buffer, DeliveryBatch, Limits, TelemetryBatch};
use events::{
    BatchMeta, BatchSink, DeliveryCommand, DeliveryEvent, DeliveryId, DroneEvent, DroneId, DroneSnapshot, Error,
    FleetControl, KeyRange, Leased, OffsetSubscription, Overflow, QueueName, StartAt, StreamSource, Subscription,
    Topic as StreamTopic, TraceContext, Verdict, WorkQueues,
};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::bus::Topic;
use crate::checkpoint::{self, Checkpoint};
use crate::cursor::CursorStore;
use crate::dedup::ProducerWindows;
use crate::derive::{DeriveConfig, DeriveStats, Deriver};
use crate::log::{FsyncPolicy, Log, LogConfig, RecordKind};
use crate::queue::backend::{Embedded, QueueBackend};
use crate::queue::{Queues, QueuesConfig};

mod api;
mod appender;
pub mod backend;
mod checkpointer;
mod config;
mod local;
mod metrics;
mod publisher;
mod readers;
mod router;
mod shard;
mod tail;

pub use api::AckFuture;
use appender::{AppendReq, Appended, Appender, MAX_GROUP};
pub use backend::{Backend, BoxFuture, CheckpointStore, DerivedSink, StartContext, Started};
use checkpointer::{Checkpointer, CkptJob};
pub use config::EngineConfig;
use local::Local;
use metrics::age;
pub use metrics::{EngineMetrics, Stopped, render_metrics};
pub(crate) use publisher::PublishMsg;
use publisher::Publisher;
pub use publisher::Span;
pub(crate) use readers::FOLLOW_QUEUE;
use router::Router;
pub use router::{shard_of, split_by_shard};
pub use shard::ShardMsg;
use shard::{Shard, tell};
use tail::Tail;

/// Where the engine keeps what it accepts.
#[derive(Clone)]
pub enum Storage {
    /// Nothing on disk: offsets are counted in memory and a restart starts empty. For tests and
    /// benches of the stages themselves.
    Memory,
    /// The durable log and shard checkpoints under `dir` (`dir/log`, `dir/checkpoints`).
    Durable {
        /// Data directory.
        dir: PathBuf,
        /// Log settings.
        log: LogConfig,
    },
    /// Another [`Backend`] holds the topics, shard ownership and checkpoints (JetStream:
    /// `crate::cluster`); queues and named cursors stay under `dir`.
    External {
        /// Data directory.
        dir: PathBuf,
        /// The backend.
        backend: Arc<dyn Backend>,
    },
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Memory => f.write_str("Memory"),
            Storage::Durable { dir, log } => f.debug_struct("Durable").field("dir", dir).field("log", log).finish(),
            Storage::External { dir, .. } => f.debug_struct("External").field("dir", dir).finish_non_exhaustive(),
        }
    }
}

/// What the engine found and did when it started.
#[derive(Debug, Clone, Default)]
pub struct StartReport {
    /// What opening the log found.
    pub recovery: crate::log::Recovery,
    /// Shards that resumed from a checkpoint.
    pub restored_shards: usize,
    /// Log records replayed into the shards.
    pub replayed: u64,
    /// The next offset.
    pub next_offset: u64,
}

/// The log, shared between its one writer (the appender) and readers being opened.
type SharedLog = Arc<parking_lot::Mutex<Log>>;

struct Inner {
    /// The log and what goes with it (`[log] backend`).
    backend: Arc<dyn Backend>,
    shards: Vec<flume::Sender<ShardMsg>>,
    telemetry: Arc<Topic<DroneEvent>>,
    deliveries: Arc<Topic<DeliveryEvent>>,
    metrics: Arc<EngineMetrics>,
    stopping: AtomicBool,
    /// Set when the node starts draining: long-lived readers outside the engine (SSE streams)
    /// end, so the HTTP server can finish.
    draining: tokio::sync::watch::Sender<bool>,
    queues: Arc<Queues>,
    /// Queues kept elsewhere than the embedded journal (`[jetstream] queues`).
    queue_backends: parking_lot::RwLock<Vec<(QueueName, Arc<dyn QueueBackend>)>>,
    cursors: Arc<CursorStore>,
    /// Where derived delivery events and missions are recorded as spans of their deliveries
    /// (set once by [`Engine::keep_spans`]).
    recorder: Arc<std::sync::OnceLock<services::spans::Spans>>,
    /// Missions out to drones and not yet answered: message id → (delivery, the send span,
    /// when sent, µs), for the `mission.ack` span.
    missions_out: parking_lot::Mutex<FxHashMap<u64, (DeliveryId, TraceContext, u64)>>,
}

/// Handle to a running engine. Cheap to clone; [`Engine::shutdown`] drains and stops it.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// The engine's threads, joined by [`Engine::shutdown`].
#[derive(Debug)]
pub struct EngineThreads(Vec<JoinHandle<()>>);

impl Engine {
    /// Opens the storage, restores checkpoints, replays the log after them into the shards, and
    /// starts the threads. Blocks for the replay.
    pub fn start(cfg: EngineConfig, storage: Storage) -> Result<(Self, EngineThreads, StartReport), crate::Error> {
        Self::start_with_queues(cfg, storage, &QueuesConfig::default())
    }

    /// [`Engine::start`] with the queue path configured: queues are journalled under
    /// `DATA_DIR/queues` with durable storage, in memory otherwise.
    pub fn start_with_queues(
        cfg: EngineConfig,
        storage: Storage,
        queues_cfg: &QueuesConfig,
    ) -> Result<(Self, EngineThreads, StartReport), crate::Error> {
        let n = cfg.shard_count();
        let dir = match &storage {
            Storage::Durable { dir, .. } | Storage::External { dir, .. } => Some(dir.clone()),
            Storage::Memory => None,
        };
        let (queues, queue_timer) = Queues::open(queues_cfg, dir.as_ref().map(|d| d.join("queues")).as_deref())?;
        let cursor_limits = cfg.cursor_limits();
        let cursors =
            Arc::new(CursorStore::open(dir.as_ref().map(|d| d.join("cursors.json")).as_deref(), cursor_limits)?);
        let telemetry = Arc::new(Topic::new("drone-telemetry", cfg.subscriber_queue));
        let deliveries = Arc::new(Topic::new("delivery-events", cfg.subscriber_queue));
        let metrics = Arc::new(EngineMetrics::default());
        let mut report = StartReport::default();
        let backend: Arc<dyn Backend> = match storage {
            Storage::Memory => Arc::new(Local::memory(deliveries.clone(), metrics.clone(), n)?),
            Storage::Durable { dir, log } => {
                let (local, recovery) = Local::open(&dir, log, deliveries.clone(), metrics.clone(), n)?;
                report.recovery = recovery;
                Arc::new(local)
            }
            Storage::External { backend, .. } => backend,
        };
        let checkpoints = backend.checkpoints(n)?;
        report.restored_shards = checkpoints.iter().filter(|c| c.is_some()).count();
        let needed: Arc<[AtomicU64]> =
            checkpoints.iter().map(|c| AtomicU64::new(c.as_ref().map_or(0, |c| c.offset + 1))).collect();

        let mut threads = Vec::with_capacity(n + 4);
        threads.push(queue_timer);
        let (publish_tx, publish_rx) = flume::bounded(cfg.shard_queue.max(1));
        let sink = backend.derived_sink()?;
        threads.push(
            std::thread::Builder::new().name("publisher".into()).spawn(move || publisher::run(sink, publish_rx))?,
        );
        let (ckpt_tx, ckpt_rx) = flume::bounded(n);
        let store = backend.checkpoint_store();
        let checkpoints_enabled = store.is_some();
        let checkpointer = Checkpointer { store, needed: needed.clone(), metrics: metrics.clone() };
        threads.push(std::thread::Builder::new().name("checkpointer".into()).spawn(move || checkpointer.run(ckpt_rx))?);
        let recorder = Arc::new(std::sync::OnceLock::new());
        let mut shards = Vec::with_capacity(n);
        for (index, ckpt) in checkpoints.into_iter().enumerate() {
            let (tx, rx) = flume::bounded(cfg.shard_queue.max(1));
            let (deriver, covered) = match ckpt {
                Some(c) => (Deriver::restore(cfg.derive, c.state), Some(c.offset)),
                None => (Deriver::new(cfg.derive), None),
            };
            let deriver = deriver.with_max_drones(cfg.max_drones_per_shard);
            let shard = Shard {
                index,
                shards: n,
                deriver,
                rx,
                publisher: publish_tx.clone(),
                metrics: metrics.clone(),
                spans: Vec::new(),
                scratch: Vec::new(),
                reported_applied: None,
                reported: DeriveStats::default(),
                reported_tracked: 0,
                covered,
                applied: covered,
                checkpoints: checkpoints_enabled.then(|| ckpt_tx.clone()),
                needed: needed.clone(),
                ckpt_interval: Duration::from_millis(cfg.checkpoint_interval_ms.max(1)),
                last_ckpt: Instant::now(),
                recorder: recorder.clone(),
            };
            threads.push(std::thread::Builder::new().name(format!("shard-{index}")).spawn(move || shard.run())?);
            shards.push(tx);
        }
        drop(ckpt_tx);
        let started = backend.start(StartContext {
            shards: shards.clone(),
            telemetry: telemetry.clone(),
            deliveries: deliveries.clone(),
            needed,
            publisher: publish_tx,
            cfg,
            metrics: metrics.clone(),
        })?;
        threads.extend(started.threads);
        report.replayed = started.replayed;
        report.next_offset = started.next_offset;
        info!(
            shards = n,
            restored = report.restored_shards,
            replayed = report.replayed,
            next_offset = report.next_offset,
            "engine started"
        );
        let inner = Inner {
            backend,
            shards,
            telemetry,
            deliveries,
            metrics,
            stopping: AtomicBool::new(false),
            draining: tokio::sync::watch::Sender::new(false),
            queues,
            queue_backends: parking_lot::RwLock::default(),
            cursors,
            recorder,
            missions_out: parking_lot::Mutex::default(),
        };
        let inner = Arc::new(inner);
        // Cursors committed and then left alone still reach the file within a flush interval.
        let weak = Arc::downgrade(&inner);
        threads.push(std::thread::Builder::new().name("cursor-flush".into()).spawn(move || {
            while let Some(inner) = weak.upgrade() {
                if inner.stopping.load(Ordering::Acquire) {
                    return;
                }
                inner.cursors.flush(false);
                drop(inner);
                std::thread::sleep(crate::cursor::FLUSH_EVERY);
            }
        })?);
        Ok((Self { inner }, EngineThreads(threads), report))
    }

    /// Refuses new work, lets every queue drain (the appender syncs, shards checkpoint), and
    /// joins the threads.
    pub async fn shutdown(&self, threads: EngineThreads) {
        // Shards are handed back (checkpointed) while their threads still run.
        self.inner.backend.stop().await;
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.queues.stop();
        self.inner.cursors.flush(true);
        self.inner.backend.close().await;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads.0 {
                let _ = t.join();
            }
        })
        .await;
    }

    /// A topic's log bounds: the first offset still held and the delivered end (the offset
    /// the next batch subscribers see will have). `(0, 0)` without a log.
    pub fn topic_bounds(&self, topic: StreamTopic) -> (u64, u64) {
        self.inner.backend.bounds(topic)
    }

    /// Tells long-lived readers outside the engine (SSE streams) to end: the node is draining.
    pub fn begin_drain(&self) {
        self.inner.draining.send_replace(true);
    }

    /// Resolves once the node starts draining.
    pub fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static + use<> {
        let mut rx = self.inner.draining.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// The named cursors of the stream path.
    pub fn cursors(&self) -> &Arc<CursorStore> {
        &self.inner.cursors
    }

    /// The queue path.
    pub fn queues(&self) -> &Arc<Queues> {
        &self.inner.queues
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.inner.shards.len()
    }

    /// The shard a drone belongs to.
    pub fn shard_of(&self, drone: DroneId) -> usize {
        shard_of(drone, self.inner.shards.len())
    }

    /// Fault injection for tests: the input log's disk fails or slows down from now on.
    #[doc(hidden)]
    pub fn inject_disk_fault(&self, fault: crate::log::DiskFault) {
        self.inner.backend.inject_disk_fault(fault);
    }

    /// Counters.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.inner.metrics
    }

    /// Batches waiting in each shard queue.
    pub fn queue_depths(&self) -> Vec<usize> {
        self.inner.shards.iter().map(flume::Sender::len).collect()
    }

    /// Requests waiting for the appender.
    pub fn append_depth(&self) -> usize {
        self.inner.backend.queued()
    }

    /// The telemetry topic.
    pub fn telemetry(&self) -> &Topic<DroneEvent> {
        &self.inner.telemetry
    }

    /// The delivery-events topic.
    pub fn deliveries(&self) -> &Topic<DeliveryEvent> {
        &self.inner.deliveries
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("shards", &self.inner.shards.len()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use events::{DeliveryStage, DroneEventKind, FlightStatus, GeoPoint};

    use super::*;

    /// A drone event for the engine's unit tests (flying, at a fixed place, stamped `seq`).
    pub(super) fn ev(drone_id: u64, seq: u64, kind: DroneEventKind) -> DroneEvent {
        DroneEvent {
            drone_id,
            seq,
            ts_us: seq,
            position: GeoPoint::new(1.0, 1.0),
            speed_mps: 0.0,
            heading_deg: 0.0,
            battery_pct: 50.0,
            status: FlightStatus::Flying,
            kind,
        }
    }

    /// Batches interleaving many drones over several shards: every drone's events reach the
    /// telemetry subscriber and the shards in order, and a delivery completes end to end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_drone_order_is_kept_across_shards() {
        let (engine, threads, _) =
            Engine::start(EngineConfig { shards: 4, shard_queue: 4, ..EngineConfig::default() }, Storage::Memory)
                .unwrap();
        let telemetry = engine.subscribe_telemetry(Overflow::Block).unwrap();
        let deliveries = engine.subscribe_deliveries(Overflow::Block).unwrap();
        let drones = 50u64;
        let per_batch = 3u64;
        engine
            .command(DeliveryCommand::Create {
                delivery_id: 77,
                drone_id: 7,
                pickup: GeoPoint::new(1.0, 1.0),
                dropoff: GeoPoint::new(1.0, 1.0),
                ts_us: 1,
            })
            .await
            .unwrap();
        let reader = tokio::task::spawn_blocking(move || {
            let mut last = vec![0u64; drones as usize];
            let mut seen = 0u64;
            while seen < drones * per_batch * 100 {
                let batch = telemetry.rx.recv().unwrap();
                for e in batch.events().iter() {
                    let (d, s) = (e.drone_id.to_native() as usize, e.seq.to_native());
                    assert_eq!(s, last[d] + 1, "drone {d} out of order");
                    last[d] = s;
                    seen += 1;
                }
            }
        });
        for round in 0..100u64 {
            let mut events = Vec::new();
            for k in 0..per_batch {
                for d in 0..drones {
                    let seq = round * per_batch + k + 1;
                    let kind = match (d, seq) {
                        (7, 10) => DroneEventKind::PickedUp { delivery: 77 },
                        (7, 20) => DroneEventKind::DroppedOff { delivery: 77 },
                        _ => DroneEventKind::Position,
                    };
                    events.push(ev(d, seq, kind));
                }
            }
            let meta = BatchMeta { producer_id: 1, batch_seq: round, ..BatchMeta::default() };
            let batch = TelemetryBatch::encode(meta, &events, Buffer::new()).unwrap();
            engine.submit(batch).await.unwrap().await.unwrap();
        }
        reader.await.unwrap();
        let mut stages = Vec::new();
        while stages.len() < 4 {
            let b = deliveries.rx.recv_async().await.unwrap();
            stages.extend(b.events().iter().map(|e| e.stage.to_stage()));
        }
        assert_eq!(
            stages,
            [
                DeliveryStage::Created,
                DeliveryStage::HeadedToPickup,
                DeliveryStage::InTransit,
                DeliveryStage::DeliveryComplete
            ]
        );
        let snap = engine.drone(7).await.unwrap().unwrap();
        assert_eq!(snap.last_seq, 300);
        assert_eq!(snap.delivery, None);
        engine.shutdown(threads).await;
        assert_eq!(engine.metrics().applied.load(Ordering::Relaxed), drones * per_batch * 100);
        assert_eq!(engine.metrics().duplicates.load(Ordering::Relaxed), 0);
        assert!(matches!(
            engine.submit(TelemetryBatch::encode(BatchMeta::default(), &[], Buffer::new()).unwrap()).await,
            Err(Error::ShuttingDown)
        ));
    }
}
