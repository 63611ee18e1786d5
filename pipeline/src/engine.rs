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
use crate::queue::{Queues, QueuesConfig};

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

/// Where the engine keeps what it accepts.
#[derive(Debug, Clone)]
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
    /// JetStream holds the topics, shard leases and checkpoints ([`crate::cluster`]); queues
    /// and named cursors stay under `dir`.
    Cluster {
        /// Data directory.
        dir: PathBuf,
        /// The connection to the cluster.
        cluster: Arc<crate::cluster::Cluster>,
    },
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

pub(crate) enum ShardMsg {
    Events {
        offset: u64,
        batch: Arc<TelemetryBatch>,
        indices: Option<Vec<u32>>,
    },
    Command {
        offset: u64,
        cmd: DeliveryCommand,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
        /// The caller's trace (not logged: a replayed command has none).
        trace: TraceContext,
    },
    /// Every record up to `offset` has been routed.
    Watermark(u64),
    Drone {
        id: DroneId,
        reply: oneshot::Sender<Option<DroneSnapshot>>,
    },
    /// Start over from this checkpoint (or from nothing): the shard changed hands.
    Restore {
        ckpt: Option<Checkpoint>,
        done: oneshot::Sender<()>,
    },
    /// Checkpoint now (the shard is being handed to another node).
    Checkpoint {
        done: oneshot::Sender<()>,
    },
    Stop,
}

enum AppendReq {
    /// `queued`: when the batch was handed to the appender.
    Batch {
        batch: TelemetryBatch,
        ack: oneshot::Sender<Result<(), Error>>,
        queued: Instant,
    },
    Command {
        cmd: DeliveryCommand,
        reply: oneshot::Sender<Result<(), Error>>,
        trace: TraceContext,
    },
    Stop,
}

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

/// The log, shared between its one writer (the appender) and readers being opened.
type SharedLog = Arc<parking_lot::Mutex<Log>>;

/// How far the log has been delivered (appended, synced under the policy, routed); readers
/// that reached it wait on `grew`.
struct Tail {
    end: parking_lot::Mutex<u64>,
    grew: parking_lot::Condvar,
}

struct Inner {
    /// JetStream in place of the local log (`[log] backend = "jetstream"`).
    cluster: Option<Arc<crate::cluster::Cluster>>,
    log: Option<SharedLog>,
    tail: Arc<Tail>,
    /// The delivery-events log and how far it has been published.
    out_log: Option<SharedLog>,
    out_tail: Arc<Tail>,
    append: flume::Sender<AppendReq>,
    shards: Vec<flume::Sender<ShardMsg>>,
    telemetry: Arc<Topic<DroneEvent>>,
    deliveries: Arc<Topic<DeliveryEvent>>,
    metrics: Arc<EngineMetrics>,
    stopping: AtomicBool,
    /// Set when the node starts draining: long-lived readers outside the engine (SSE streams)
    /// end, so the HTTP server can finish.
    draining: tokio::sync::watch::Sender<bool>,
    queues: Arc<Queues>,
    /// Queues kept on JetStream instead of the local journal (`[jetstream] queues`).
    external_queues: parking_lot::RwLock<Vec<(QueueName, Arc<crate::jetstream::JsWorkQueue>)>>,
    cursors: Arc<CursorStore>,
}

/// Handle to a running engine. Cheap to clone; [`Engine::shutdown`] drains and stops it.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// The engine's threads, joined by [`Engine::shutdown`].
#[derive(Debug)]
pub struct EngineThreads(Vec<JoinHandle<()>>);

/// Resolves when the appender has made a batch durable (or refused it).
#[derive(Debug)]
pub struct AckFuture(oneshot::Receiver<Result<(), Error>>);

impl Future for AckFuture {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or(Err(Error::ShuttingDown)))
    }
}

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
        let queue_dir = match &storage {
            Storage::Durable { dir, .. } | Storage::Cluster { dir, .. } => Some(dir.join("queues")),
            Storage::Memory => None,
        };
        let cluster = match &storage {
            Storage::Cluster { cluster, .. } => Some(cluster.clone()),
            _ => None,
        };
        let (queues, queue_timer) = Queues::open(queues_cfg, queue_dir.as_deref())?;
        let cursors = match &storage {
            Storage::Durable { dir, .. } | Storage::Cluster { dir, .. } => {
                Arc::new(CursorStore::open(Some(&dir.join("cursors.json")))?)
            }
            Storage::Memory => Arc::new(CursorStore::open(None)?),
        };
        let telemetry = Arc::new(Topic::new("drone-telemetry", cfg.subscriber_queue));
        let deliveries = Arc::new(Topic::new("delivery-events", cfg.subscriber_queue));
        let metrics = Arc::new(EngineMetrics::default());
        let mut report = StartReport::default();

        let (log, out_log, ckpt_dir) = match &storage {
            Storage::Memory | Storage::Cluster { .. } => (None, None, None),
            Storage::Durable { dir, log } => {
                let (opened, recovery) = Log::open(&dir.join("log"), *log)?;
                if recovery.truncated_bytes > 0 {
                    warn!(
                        bytes = recovery.truncated_bytes,
                        reason = recovery.truncated_reason.as_deref().unwrap_or(""),
                        "log recovery truncated a torn final record (never acknowledged)"
                    );
                }
                report.recovery = recovery;
                let (out, out_recovery) = Log::open(&dir.join("deliveries"), *log)?;
                if out_recovery.truncated_bytes > 0 {
                    warn!(
                        bytes = out_recovery.truncated_bytes,
                        "delivery-events log recovery truncated a torn final record"
                    );
                }
                (
                    Some(Arc::new(parking_lot::Mutex::new(opened))),
                    Some(Arc::new(parking_lot::Mutex::new(out))),
                    Some(dir.join("checkpoints")),
                )
            }
        };
        let next_offset = log.as_ref().map_or(0, |l| l.lock().next_offset());
        let mut checkpoints = Vec::with_capacity(n);
        if let Some(dir) = &ckpt_dir {
            for shard in 0..n {
                let ckpt = checkpoint::read(dir, shard as u32)?;
                checkpoints.push(ckpt.filter(|c| c.shards as usize == n && c.offset < next_offset));
            }
            if checkpoints.iter().any(Option::is_none) && checkpoints.iter().any(Option::is_some) {
                warn!("some shard checkpoints are missing or stale: every shard replays the whole log");
                checkpoints.iter_mut().for_each(|c| *c = None);
            }
        } else {
            checkpoints.resize(n, None);
        }
        report.restored_shards = checkpoints.iter().filter(|c| c.is_some()).count();
        let needed: Arc<[AtomicU64]> =
            checkpoints.iter().map(|c| AtomicU64::new(c.as_ref().map_or(0, |c| c.offset + 1))).collect();

        let mut threads = Vec::with_capacity(n + 4);
        threads.push(queue_timer);
        let out_next = out_log.as_ref().map_or(0, |l| l.lock().next_offset());
        let out_tail = Arc::new(Tail { end: parking_lot::Mutex::new(out_next), grew: parking_lot::Condvar::new() });
        let (publish_tx, publish_rx) = flume::bounded(cfg.shard_queue.max(1));
        let mut publisher = Publisher {
            log: out_log.clone(),
            seen: FxHashMap::default(),
            finished: std::collections::VecDeque::new(),
            topic: deliveries.clone(),
            tail: out_tail.clone(),
            policy: match &storage {
                Storage::Durable { log, .. } => log.fsync,
                Storage::Memory | Storage::Cluster { .. } => FsyncPolicy::None,
            },
            last_retention: Instant::now(),
            cluster: cluster.clone(),
            metrics: metrics.clone(),
            failed: false,
        };
        publisher.rebuild()?;
        threads.push(std::thread::Builder::new().name("publisher".into()).spawn(move || publisher.run(publish_rx))?);
        let (ckpt_tx, ckpt_rx) = flume::bounded(n);
        let checkpointer = Checkpointer {
            dir: ckpt_dir.clone(),
            cluster: cluster.clone(),
            needed: needed.clone(),
            metrics: metrics.clone(),
        };
        threads.push(std::thread::Builder::new().name("checkpointer".into()).spawn(move || checkpointer.run(ckpt_rx))?);
        let checkpoints_enabled = ckpt_dir.is_some() || cluster.is_some();
        let mut shards = Vec::with_capacity(n);
        for (index, ckpt) in checkpoints.into_iter().enumerate() {
            let (tx, rx) = flume::bounded(cfg.shard_queue.max(1));
            let (deriver, covered) = match ckpt {
                Some(c) => (Deriver::restore(cfg.derive, c.state), Some(c.offset)),
                None => (Deriver::new(cfg.derive), None),
            };
            let shard = Shard {
                index,
                shards: n,
                deriver,
                rx,
                publisher: publish_tx.clone(),
                metrics: metrics.clone(),
                out: Vec::new(),
                published: 0,
                out_trace: None,
                reported: DeriveStats::default(),
                covered,
                applied: covered,
                checkpoints: checkpoints_enabled.then(|| ckpt_tx.clone()),
                needed: needed.clone(),
                ckpt_interval: Duration::from_millis(cfg.checkpoint_interval_ms.max(1)),
                last_ckpt: Instant::now(),
            };
            threads.push(std::thread::Builder::new().name(format!("shard-{index}")).spawn(move || shard.run())?);
            shards.push(tx);
        }
        drop(publish_tx);
        drop(ckpt_tx);
        let (fanout, fanout_rx) = flume::bounded::<Option<Arc<TelemetryBatch>>>(cfg.shard_queue.max(1));
        let topic = telemetry.clone();
        threads.push(std::thread::Builder::new().name("fanout".into()).spawn(move || {
            while let Ok(Some(batch)) = fanout_rx.recv() {
                topic.publish(batch);
            }
        })?);

        let (policy, interval) = match &storage {
            Storage::Durable { log, .. } => (log.fsync, Duration::from_millis(log.fsync_interval_ms.max(1))),
            Storage::Memory | Storage::Cluster { .. } => (FsyncPolicy::None, Duration::from_secs(1)),
        };
        let tail = Arc::new(Tail { end: parking_lot::Mutex::new(next_offset), grew: parking_lot::Condvar::new() });
        let mut appender = Appender {
            log: log.clone(),
            next_offset,
            windows: ProducerWindows::new(cfg.max_producers),
            shards: shards.clone(),
            fanout,
            metrics: metrics.clone(),
            policy,
            interval,
            last_sync: Instant::now(),
            unsynced: false,
            failed: None,
            needed,
            last_retention: Instant::now(),
            tail: tail.clone(),
        };
        report.replayed = appender.replay()?;
        report.next_offset = appender.next_offset;
        let (append, append_rx) = flume::bounded(cfg.append_queue.max(1));
        threads.push(std::thread::Builder::new().name("appender".into()).spawn(move || appender.run(append_rx))?);
        info!(
            shards = n,
            restored = report.restored_shards,
            replayed = report.replayed,
            next_offset = report.next_offset,
            "engine started"
        );
        if let Some(cluster) = &cluster {
            cluster.start(shards.clone(), telemetry.clone(), deliveries.clone())?;
        }
        let inner = Inner {
            cluster,
            append,
            shards,
            telemetry,
            deliveries,
            metrics,
            stopping: AtomicBool::new(false),
            draining: tokio::sync::watch::Sender::new(false),
            log,
            tail,
            out_log,
            out_tail,
            queues,
            external_queues: parking_lot::RwLock::default(),
            cursors,
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
        if let Some(cluster) = &self.inner.cluster {
            // Shards are handed back (checkpointed) while their threads still run.
            cluster.stop().await;
        }
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.queues.stop();
        self.inner.cursors.flush(true);
        let _ = self.inner.append.send_async(AppendReq::Stop).await;
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
        if let Some(cluster) = &self.inner.cluster {
            return cluster.bounds(topic);
        }
        let (log, tail) = match topic {
            StreamTopic::DroneTelemetry => (&self.inner.log, &self.inner.tail),
            StreamTopic::DeliveryEvents => (&self.inner.out_log, &self.inner.out_tail),
        };
        match log {
            Some(log) => (log.lock().first_offset(), *tail.end.lock()),
            None => (0, 0),
        }
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

    /// The cluster this node belongs to, on the JetStream backend.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.inner.cluster.as_ref()
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
        self.inner.append.len()
    }

    /// The telemetry topic.
    pub fn telemetry(&self) -> &Topic<DroneEvent> {
        &self.inner.telemetry
    }

    /// The delivery-events topic.
    pub fn deliveries(&self) -> &Topic<DeliveryEvent> {
        &self.inner.deliveries
    }

    /// Starts a thread that feeds an offset subscription with the `kind` records of `log`, whose
    /// delivered end is `tail`.
    fn follow<T: events::wire::Payload>(
        &self,
        log: Option<SharedLog>,
        tail: Arc<Tail>,
        kind: RecordKind,
        start: StartAt,
    ) -> Result<OffsetSubscription<T>, Error> {
        let Some(log) = log else {
            let requested = if let StartAt::Offset(o) = start { o } else { 0 };
            return Err(Error::OffsetUnavailable { requested, first: 0, next: 0 });
        };
        let self_log = log.clone();
        let from = {
            let log = log.lock();
            let (first, next) = (log.first_offset(), log.next_offset());
            match start {
                StartAt::Earliest => first,
                // Everything from the delivered end on reaches this subscriber; the log may hold
                // a few more records not yet delivered, which it then reads as well.
                StartAt::Latest => (*tail.end.lock()).clamp(first, next),
                StartAt::Offset(from) if from < first || from > next => {
                    return Err(Error::OffsetUnavailable { requested: from, first, next });
                }
                StartAt::Offset(from) => from,
                StartAt::Time(t_us) => {
                    drop(log);
                    let end = *tail.end.lock();
                    offset_at_time::<T>(&self_log, kind, end, t_us)?
                }
            }
        };
        let (tx, rx) = flume::bounded(FOLLOW_QUEUE);
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name("log-subscriber".into())
            .spawn(move || follow_log(&log, &tail, &inner.stopping, kind, from, &tx))
            .map_err(|e| Error::Storage(format!("starting a subscriber thread: {e}")))?;
        Ok(OffsetSubscription { start: from, rx })
    }

    async fn to_appender(&self, req: AppendReq) -> Result<(), Error> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        self.inner.append.send_async(req).await.map_err(|_| Error::ShuttingDown)
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("shards", &self.inner.shards.len()).finish_non_exhaustive()
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
    if let Some(cluster) = engine.cluster() {
        let m = &cluster.metrics;
        let counters = [
            ("fleetstream_cluster_batch_parts_published_total", &m.published),
            ("fleetstream_cluster_batch_parts_duplicate_total", &m.duplicates),
            ("fleetstream_cluster_delivery_events_published_total", &m.delivery_events),
            ("fleetstream_cluster_shards_acquired_total", &m.acquired),
            ("fleetstream_cluster_shard_leases_lost_total", &m.lost),
            ("fleetstream_cluster_invalid_messages_total", &m.invalid),
        ];
        for (name, c) in counters {
            counter(out, name, c.load(Ordering::Relaxed));
        }
        gauge(out, "fleetstream_cluster_shards_owned", m.owned.load(Ordering::Relaxed));
    }
}

/// How long before `now_us` the event time `ts_us` was (both from [`events::now_us`]); 0 for
/// a time after it.
fn age(now_us: u64, ts_us: u64) -> Duration {
    Duration::from_micros(now_us.saturating_sub(ts_us))
}

/// Maps a drone to a shard: a multiplicative hash spread over `n` without a division.
pub fn shard_of(drone: DroneId, n: usize) -> usize {
    let h = drone.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(h) * n as u128) >> 64) as usize
}

/// The indices of `batch`'s events for each of `n` shards, in batch order: how the router
/// splits a batch (index lists; the batch itself is shared, never copied).
pub fn split_by_shard(batch: &TelemetryBatch, n: usize) -> Vec<Vec<u32>> {
    // Sized for an even spread plus slack, so a batch costs one allocation per shard.
    let expected = batch.len() / n + batch.len() / (4 * n) + 8;
    let mut per_shard: Vec<Vec<u32>> = (0..n).map(|_| Vec::with_capacity(expected)).collect();
    for (i, ev) in batch.events().iter().enumerate() {
        per_shard[shard_of(ev.drone_id.to_native(), n)].push(i as u32);
    }
    per_shard
}

impl BatchSink for Engine {
    type Ack = AckFuture;

    async fn submit(&self, batch: TelemetryBatch) -> Result<Self::Ack, Error> {
        let (ack, rx) = oneshot::channel();
        if let Some(cluster) = &self.inner.cluster {
            if self.inner.stopping.load(Ordering::Acquire) {
                return Err(Error::ShuttingDown);
            }
            let stored = cluster.publish_batch(batch).await?;
            tokio::spawn(async move {
                let _ = ack.send(stored.await);
            });
            return Ok(AckFuture(rx));
        }
        if let Some(first) = batch.events().first() {
            self.inner.metrics.event_age_at_submit.record(age(events::now_us(), first.ts_us.to_native()));
        }
        self.to_appender(AppendReq::Batch { batch, ack, queued: Instant::now() }).await?;
        Ok(AckFuture(rx))
    }
}

impl StreamSource for Engine {
    fn subscribe_telemetry_from(&self, from: StartAt) -> Result<OffsetSubscription<DroneEvent>, Error> {
        if let Some(cluster) = &self.inner.cluster {
            return cluster.follow(StreamTopic::DroneTelemetry, from);
        }
        self.follow(self.inner.log.clone(), self.inner.tail.clone(), RecordKind::Telemetry, from)
    }

    fn subscribe_deliveries_from(&self, from: StartAt) -> Result<OffsetSubscription<DeliveryEvent>, Error> {
        if let Some(cluster) = &self.inner.cluster {
            return cluster.follow(StreamTopic::DeliveryEvents, from);
        }
        self.follow(self.inner.out_log.clone(), self.inner.out_tail.clone(), RecordKind::Deliveries, from)
    }

    fn subscribe_telemetry(&self, overflow: Overflow) -> Result<Subscription<DroneEvent>, Error> {
        Ok(self.inner.telemetry.subscribe(overflow))
    }

    fn cursor(&self, topic: StreamTopic, name: &str) -> Result<Option<u64>, Error> {
        events::contract::valid_cursor_name(name)?;
        Ok(self.inner.cursors.get(topic, name).map(|c| c.next))
    }

    fn commit_cursor(&self, topic: StreamTopic, name: &str, next: u64) -> Result<(), Error> {
        events::contract::valid_cursor_name(name)?;
        let (first, end) = self.topic_bounds(topic);
        // On JetStream a reader may be ahead of what this node's follower has seen.
        if next > end && self.inner.cluster.is_none() {
            return Err(Error::OffsetUnavailable { requested: next, first, next: end });
        }
        let now = events::now_us();
        self.inner.cursors.commit(topic, name, next, now);
        if let Some(cluster) = &self.inner.cluster {
            cluster.put_cursor(topic, name, crate::cursor::Cursor { next, updated_us: now });
        }
        Ok(())
    }

    fn subscribe_deliveries(&self, overflow: Overflow) -> Result<Subscription<DeliveryEvent>, Error> {
        Ok(self.inner.deliveries.subscribe(overflow))
    }
}

impl Engine {
    /// Serves `queue` from JetStream from now on (set before consumers attach).
    pub fn use_jetstream_queue(&self, queue: QueueName, q: Arc<crate::jetstream::JsWorkQueue>) {
        let mut external = self.inner.external_queues.write();
        external.retain(|(name, _)| *name != queue);
        external.push((queue, q));
    }

    /// The JetStream queue serving `queue`, if it is kept there.
    pub fn jetstream_queue(&self, queue: QueueName) -> Option<Arc<crate::jetstream::JsWorkQueue>> {
        self.external(queue)
    }

    fn external(&self, queue: QueueName) -> Option<Arc<crate::jetstream::JsWorkQueue>> {
        self.inner.external_queues.read().iter().find(|(name, _)| *name == queue).map(|(_, q)| q.clone())
    }
}

impl WorkQueues for Engine {
    async fn enqueue(&self, queue: QueueName, key: u64, payload: Vec<u8>) -> Result<u64, Error> {
        if let Some(q) = self.external(queue) {
            return q.enqueue(key, payload).await;
        }
        self.inner.queues.enqueue(queue, key, payload).await
    }

    async fn enqueue_once(&self, queue: QueueName, key: u64, id: String, payload: Vec<u8>) -> Result<u64, Error> {
        if let Some(q) = self.external(queue) {
            return q.enqueue_once(key, id, payload).await;
        }
        self.inner.queues.enqueue(queue, key, payload).await
    }

    async fn lease(
        &self,
        queue: QueueName,
        consumer: u64,
        keys: KeyRange,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Leased>, Error> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        if let Some(q) = self.external(queue) {
            return q.lease(consumer, keys, max, wait).await;
        }
        self.inner.queues.lease(queue, consumer, keys, max, wait).await
    }

    fn settle(&self, queue: QueueName, id: u64, token: u64, verdict: Verdict) -> Result<(), Error> {
        if let Some(q) = self.external(queue) {
            return q.settle(id, token, verdict);
        }
        self.inner.queues.settle(queue, id, token, verdict)
    }

    fn release(&self, queue: QueueName, consumer: u64) {
        if let Some(q) = self.external(queue) {
            return q.release(consumer);
        }
        self.inner.queues.release(queue, consumer);
    }

    async fn withdraw(
        &self,
        queue: QueueName,
        key: u64,
        matches: &(dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> Result<usize, Error> {
        if self.external(queue).is_some() {
            // JetStream hands messages to a session's consumers ahead of its leases, so
            // "not yet with the drone" cannot be told apart there: the caller's in-band
            // follow-up (return to base) covers it.
            return Ok(0);
        }
        self.inner.queues.withdraw(queue, key, matches).await
    }

    fn attach(&self, queue: QueueName, keys: KeyRange) -> Result<u64, Error> {
        if let Some(q) = self.external(queue) {
            return Ok(q.attach());
        }
        self.inner.queues.attach(queue, keys)
    }
}

impl FleetControl for Engine {
    async fn command(&self, cmd: DeliveryCommand) -> Result<(), Error> {
        self.command_traced(cmd, TraceContext::default()).await
    }

    async fn command_traced(&self, cmd: DeliveryCommand, trace: TraceContext) -> Result<(), Error> {
        if let Some(cluster) = &self.inner.cluster {
            return cluster.command(cmd, trace).await;
        }
        let (reply, rx) = oneshot::channel();
        self.to_appender(AppendReq::Command { cmd, reply, trace }).await?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    async fn drone(&self, id: DroneId) -> Result<Option<DroneSnapshot>, Error> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let index = self.shard_of(id);
        if let Some(cluster) = self.inner.cluster.as_ref().filter(|c| !c.owns(index)) {
            // Another node runs that shard: it is asked.
            return cluster.drone(id).await;
        }
        let (reply, rx) = oneshot::channel();
        let shard = &self.inner.shards[index];
        shard.send_async(ShardMsg::Drone { id, reply }).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }
}

/// Feeds one offset subscription: reads the log from `next` up to the delivered end, waits for
/// it to grow, and repeats, until the subscriber goes away or the engine stops. Blocking on the
/// subscriber's bounded queue throttles only this reader.
fn follow_log<T: events::wire::Payload>(
    log: &SharedLog,
    tail: &Tail,
    stopping: &AtomicBool,
    kind: RecordKind,
    mut next: u64,
    tx: &flume::Sender<events::contract::LogItem<T>>,
) {
    let limits = Limits { max_body_bytes: u32::MAX, max_events: u32::MAX };
    let mut resume: Option<crate::log::ResumePoint> = None;
    loop {
        let end = {
            let mut end = tail.end.lock();
            while *end <= next && !stopping.load(Ordering::Acquire) {
                tail.grew.wait_for(&mut end, Duration::from_millis(200));
                if tx.is_disconnected() {
                    return;
                }
            }
            *end
        };
        if next >= end {
            let _ = tx.send(Err(Error::ShuttingDown));
            return;
        }
        let reader = {
            let mut log = log.lock();
            let (first, log_next) = (log.first_offset(), log.next_offset());
            match log.reader_near(next, resume.as_ref()) {
                Ok(r) => r.until(end),
                Err(_) => {
                    let _ = tx.send(Err(Error::OffsetUnavailable { requested: next, first, next: log_next }));
                    return;
                }
            }
        };
        let mut reader = reader;
        for record in reader.by_ref() {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(Error::Storage(e.to_string())));
                    return;
                }
            };
            if record.offset >= end {
                break;
            }
            next = record.offset + 1;
            if record.kind != kind {
                continue;
            }
            let item = events::Batch::<T>::validate(record.payload, &limits).map(|b| (record.offset, Arc::new(b)));
            if tx.send(item).is_err() {
                return;
            }
        }
        resume = reader.resume_point();
        next = next.max(end);
    }
}

/// Batches a log follower reads ahead of its subscriber. Short: a follower that falls behind
/// re-reads from the log instead of holding batches in memory, so a stalled subscriber pins at
/// most this many batches (plus its connection's QUIC window) however long it stalls.
pub(crate) const FOLLOW_QUEUE: usize = 64;

/// The first offset whose batch of `kind` was created at or after `t_us` (by its first event),
/// found by bisecting `[first, end)`: batches are appended in about the order they were created,
/// so this is where a replay "from that time" starts. `end` when every batch is older.
fn offset_at_time<T: events::wire::Payload>(
    log: &SharedLog,
    kind: RecordKind,
    end: u64,
    t_us: u64,
) -> Result<u64, Error> {
    let limits = Limits { max_body_bytes: u32::MAX, max_events: u32::MAX };
    let storage = |e: crate::Error| Error::Storage(e.to_string());
    let mut lo = log.lock().first_offset();
    let mut hi = end;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        // The first batch of this kind with events at or after `mid` (the lock is held only to
        // open the reader, never while reading).
        let reader = log.lock().reader_near(mid, None).map_err(storage)?.until(hi);
        let mut found = None;
        for record in reader {
            let record = record.map_err(storage)?;
            if record.kind != kind {
                continue;
            }
            let created = events::Batch::<T>::validate(record.payload, &limits)?.first_created_us();
            if let Some(created) = created {
                found = Some((record.offset, created));
                break;
            }
        }
        match found {
            Some((offset, created)) if created < t_us => lo = offset + 1,
            _ => hi = mid,
        }
    }
    Ok(lo)
}

/// What shards send the publisher.
enum PublishMsg {
    /// Derived events to log and publish.
    Events(DeliveryBatch),
    /// Answer once everything sent before is durable.
    Barrier(flume::Sender<()>),
}

/// Deliveries whose last event was terminal, remembered for dedup: a restart re-derives at
/// most the events after the oldest checkpoint (about one checkpoint interval of traffic), far
/// fewer than this.
const FINISHED_REMEMBERED: usize = 200_000;

/// The publisher thread: the delivery-events log's one writer. It drops events already logged
/// (a restart re-derives the events after each shard's checkpoint, some of which made it to the
/// log before the crash), appends the rest, syncs, and only then publishes them.
struct Publisher {
    log: Option<SharedLog>,
    /// Highest event seq logged per delivery.
    seen: FxHashMap<DeliveryId, u32>,
    finished: std::collections::VecDeque<DeliveryId>,
    topic: Arc<Topic<DeliveryEvent>>,
    tail: Arc<Tail>,
    policy: FsyncPolicy,
    last_retention: Instant,
    /// On JetStream: derived events go there, and this node's topic is fed back from it.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    metrics: Arc<EngineMetrics>,
    /// Set by a failed append or sync of the delivery-events log: from then on nothing is
    /// published and no barrier is answered, so no checkpoint claims events that may not be on
    /// disk; a restart re-derives them from the input log.
    failed: bool,
}

impl Publisher {
    /// Learns what the delivery-events log already holds.
    fn rebuild(&mut self) -> Result<(), crate::Error> {
        let Some(shared) = self.log.clone() else { return Ok(()) };
        let mut log = shared.lock();
        let limits = Limits { max_body_bytes: u32::MAX, max_events: u32::MAX };
        let first = log.first_offset();
        for record in log.reader(first)? {
            let record = record?;
            let batch = DeliveryBatch::validate(record.payload, &limits).map_err(|e| {
                crate::Error::Config(format!("delivery-events log record {} is invalid: {e}", record.offset))
            })?;
            for ev in batch.events().iter() {
                self.remember(ev.delivery_id.to_native(), ev.seq.to_native(), ev.stage.to_stage().is_terminal());
            }
        }
        Ok(())
    }

    fn remember(&mut self, delivery: DeliveryId, seq: u32, terminal: bool) {
        self.seen.insert(delivery, seq);
        if terminal {
            self.finished.push_back(delivery);
            if self.finished.len() > FINISHED_REMEMBERED
                && let Some(old) = self.finished.pop_front()
            {
                self.seen.remove(&old);
            }
        }
    }

    fn fail(&mut self, reason: &str) {
        self.failed = true;
        self.metrics.stopped.stop("delivery-events log", reason);
    }

    /// The batch without events already logged (`None` if nothing is left).
    fn fresh(&mut self, batch: DeliveryBatch) -> Option<DeliveryBatch> {
        if self.log.is_none() {
            return Some(batch);
        }
        let is_new = |seen: &FxHashMap<DeliveryId, u32>, e: &events::model::ArchivedDeliveryEvent| {
            seen.get(&e.delivery_id.to_native()).is_none_or(|&s| e.seq.to_native() > s)
        };
        let fresh = batch.events().iter().filter(|e| is_new(&self.seen, e)).count();
        let result = if fresh == batch.len() {
            Some(batch)
        } else if fresh == 0 {
            None
        } else {
            let owned: Vec<DeliveryEvent> = batch
                .events()
                .iter()
                .filter(|e| is_new(&self.seen, e))
                .filter_map(|e| rkyv::deserialize::<DeliveryEvent, rkyv::rancor::Error>(e).ok())
                .collect();
            DeliveryBatch::encode(batch.header().meta, &owned, Buffer::new()).ok()
        };
        if let Some(b) = &result {
            for ev in b.events().iter() {
                self.remember(ev.delivery_id.to_native(), ev.seq.to_native(), ev.stage.to_stage().is_terminal());
            }
        }
        result
    }

    fn run(mut self, rx: flume::Receiver<PublishMsg>) {
        let mut appended = Vec::new();
        let mut barriers = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut unsynced = false;
            let mut msg = Some(first);
            while let Some(m) = msg.take() {
                match m {
                    PublishMsg::Barrier(done) => barriers.push(done),
                    PublishMsg::Events(batch) if self.cluster.is_some() => appended.push((None, batch)),
                    PublishMsg::Events(_) if self.failed => {}
                    PublishMsg::Events(batch) => {
                        if let Some(batch) = self.fresh(batch) {
                            let written = self
                                .log
                                .as_ref()
                                .map(|log| log.lock().append(RecordKind::Deliveries, batch.as_bytes()));
                            match written {
                                None => appended.push((None, batch)),
                                Some(Ok(offset)) => {
                                    unsynced = true;
                                    appended.push((Some(offset), batch));
                                }
                                Some(Err(e)) => self.fail(&format!("append failed: {e}")),
                            }
                        }
                    }
                }
                if appended.len() + barriers.len() < MAX_GROUP {
                    msg = rx.try_recv().ok();
                }
            }
            if unsynced
                && (self.policy == FsyncPolicy::EveryBatch || !barriers.is_empty())
                && let Some(log) = &self.log
            {
                let started = Instant::now();
                let synced = log.lock().sync();
                self.metrics.delivery_fsync_time.record(started.elapsed());
                if let Err(e) = synced {
                    self.fail(&format!("fsync failed: {e}"));
                }
            }
            if self.failed {
                // What this group appended may not be on disk: it is neither published nor
                // vouched for; dropping the barriers tells their checkpoints so.
                appended.clear();
                barriers.clear();
                continue;
            }
            if let Some(cluster) = &self.cluster {
                // The whole group in one go (acknowledgements overlap); this node's topic is
                // fed back from JetStream.
                cluster.publish_deliveries(appended.drain(..).map(|(_, batch)| batch));
            }
            let mut last = None;
            for (offset, batch) in appended.drain(..) {
                last = offset.or(last);
                let now = events::now_us();
                for ev in batch.events().iter() {
                    self.metrics.delivery_age_at_publish.record(age(now, ev.ts_us.to_native()));
                }
                self.topic.publish(Arc::new(batch));
            }
            if let Some(last) = last {
                *self.tail.end.lock() = last + 1;
                self.tail.grew.notify_all();
            }
            for done in barriers.drain(..) {
                let _ = done.send(());
            }
            if self.last_retention.elapsed() >= Duration::from_secs(10) {
                self.last_retention = Instant::now();
                if let Some(log) = &self.log
                    && let Err(e) = log.lock().enforce_retention(u64::MAX, SystemTime::now())
                {
                    warn!(error = %e, "delivery-events retention failed");
                }
            }
        }
        self.tail.grew.notify_all();
    }
}

/// Requests the appender takes in one group: one fsync covers them all.
const MAX_GROUP: usize = 1024;

/// What an appended request still needs after the group's sync.
enum Appended {
    Batch { offset: u64, batch: TelemetryBatch, ack: oneshot::Sender<Result<(), Error>>, queued: Instant },
    Duplicate { ack: oneshot::Sender<Result<(), Error>> },
    Command { offset: u64, cmd: DeliveryCommand, reply: oneshot::Sender<Result<(), Error>>, trace: TraceContext },
}

/// The appender thread: the log's one writer.
struct Appender {
    log: Option<SharedLog>,
    tail: Arc<Tail>,
    next_offset: u64,
    windows: ProducerWindows,
    shards: Vec<flume::Sender<ShardMsg>>,
    fanout: flume::Sender<Option<Arc<TelemetryBatch>>>,
    metrics: Arc<EngineMetrics>,
    policy: FsyncPolicy,
    interval: Duration,
    last_sync: Instant,
    unsynced: bool,
    failed: Option<String>,
    /// Per shard, the lowest offset it still needs (one past its checkpoint).
    needed: Arc<[AtomicU64]>,
    last_retention: Instant,
}

impl Appender {
    /// Rebuilds the dedup windows from the whole log and routes every record after the oldest
    /// checkpoint to the shards (each skips what its own checkpoint covers). Returns the number
    /// of records routed.
    fn replay(&mut self) -> Result<u64, crate::Error> {
        let Some(shared) = self.log.clone() else { return Ok(0) };
        let mut log = shared.lock();
        let from = log.first_offset();
        let replay_after = self.needed.iter().map(|n| n.load(Ordering::Relaxed)).min().unwrap_or(0);
        let mut routed = 0;
        let limits = Limits { max_body_bytes: u32::MAX, max_events: u32::MAX };
        let mut last = None;
        for record in log.reader(from)? {
            let record = record?;
            last = Some(record.offset);
            match record.kind {
                RecordKind::Telemetry => {
                    let batch = TelemetryBatch::validate(record.payload, &limits).map_err(|e| {
                        crate::Error::Config(format!("log record {} holds an invalid batch: {e}", record.offset))
                    })?;
                    let meta = batch.header().meta;
                    self.windows.insert(meta.producer_id, meta.batch_seq, record.offset);
                    if record.offset >= replay_after {
                        self.route(record.offset, Arc::new(batch));
                        routed += 1;
                    }
                }
                RecordKind::Command => {
                    let cmd: DeliveryCommand = serde_json::from_slice(&record.payload).map_err(|e| {
                        crate::Error::Config(format!("log record {} holds an invalid command: {e}", record.offset))
                    })?;
                    if record.offset >= replay_after {
                        let shard = shard_of(cmd.drone_id(), self.shards.len());
                        let _ = self.shards[shard].send(ShardMsg::Command {
                            offset: record.offset,
                            cmd,
                            reply: None,
                            trace: TraceContext::default(),
                        });
                        routed += 1;
                    }
                }
                RecordKind::Deliveries => {}
            }
        }
        if let Some(last) = last {
            self.watermark(last);
        }
        Ok(routed)
    }

    fn run(mut self, rx: flume::Receiver<AppendReq>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        let mut appended = Vec::with_capacity(MAX_GROUP);
        let mut stop = false;
        while !stop {
            let first = if self.unsynced && self.policy == FsyncPolicy::Interval {
                match rx.recv_timeout(self.interval.saturating_sub(self.last_sync.elapsed())) {
                    Ok(req) => req,
                    Err(flume::RecvTimeoutError::Timeout) => {
                        let _ = self.sync();
                        continue;
                    }
                    Err(flume::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(req) => req,
                    Err(_) => break,
                }
            };
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(req) => group.push(req),
                    Err(_) => break,
                }
            }
            for req in group.drain(..) {
                match req {
                    AppendReq::Stop => stop = true,
                    AppendReq::Batch { batch, ack, queued } => self.append_batch(batch, ack, queued, &mut appended),
                    AppendReq::Command { cmd, reply, trace } => self.append_command(cmd, reply, trace, &mut appended),
                }
            }
            let must_sync = match self.policy {
                FsyncPolicy::EveryBatch => true,
                FsyncPolicy::Interval => self.last_sync.elapsed() >= self.interval || stop,
                FsyncPolicy::None => false,
            };
            if self.unsynced
                && must_sync
                && let Err(e) = self.sync()
            {
                for a in appended.drain(..) {
                    let (Appended::Batch { ack, .. }
                    | Appended::Duplicate { ack }
                    | Appended::Command { reply: ack, .. }) = a;
                    let _ = ack.send(Err(e.clone()));
                }
            }
            self.deliver(&mut appended);
            if self.last_retention.elapsed() >= Duration::from_secs(10) {
                self.retention();
            }
        }
        if self.unsynced {
            let _ = self.sync();
        }
        for shard in &self.shards {
            let _ = shard.send(ShardMsg::Stop);
        }
        let _ = self.fanout.send(None);
        self.tail.grew.notify_all();
    }

    fn append_batch(
        &mut self,
        batch: TelemetryBatch,
        ack: oneshot::Sender<Result<(), Error>>,
        queued: Instant,
        out: &mut Vec<Appended>,
    ) {
        let meta = batch.header().meta;
        if self.windows.contains(meta.producer_id, meta.batch_seq) {
            self.metrics.duplicate_batches.fetch_add(1, Ordering::Relaxed);
            out.push(Appended::Duplicate { ack });
            return;
        }
        match self.append(RecordKind::Telemetry, batch.as_bytes()) {
            Ok(offset) => {
                self.windows.insert(meta.producer_id, meta.batch_seq, offset);
                self.metrics.batches.fetch_add(1, Ordering::Relaxed);
                self.metrics.events.fetch_add(batch.len() as u64, Ordering::Relaxed);
                out.push(Appended::Batch { offset, batch, ack, queued });
            }
            Err(e) => {
                let _ = ack.send(Err(e));
            }
        }
    }

    fn append_command(
        &mut self,
        cmd: DeliveryCommand,
        reply: oneshot::Sender<Result<(), Error>>,
        trace: TraceContext,
        out: &mut Vec<Appended>,
    ) {
        let payload = match serde_json::to_vec(&cmd) {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(Error::Encode(e.to_string())));
                return;
            }
        };
        match self.append(RecordKind::Command, &payload) {
            Ok(offset) => out.push(Appended::Command { offset, cmd, reply, trace }),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn append(&mut self, kind: RecordKind, payload: &[u8]) -> Result<u64, Error> {
        if let Some(reason) = &self.failed {
            return Err(Error::Storage(reason.clone()));
        }
        let Some(shared) = self.log.as_ref() else {
            self.next_offset += 1;
            return Ok(self.next_offset - 1);
        };
        let mut log = shared.lock();
        match log.append(kind, payload) {
            Ok(offset) => {
                self.next_offset = offset + 1;
                self.unsynced = true;
                self.metrics.log_bytes.store(log.total_bytes(), Ordering::Relaxed);
                Ok(offset)
            }
            Err(crate::Error::Full(reason)) => {
                self.metrics.storage_full.fetch_add(1, Ordering::Relaxed);
                warn!(%reason, "append refused: storage full");
                Err(Error::StorageFull)
            }
            Err(e) => {
                error!(error = %e, "append failed");
                Err(Error::Storage(e.to_string()))
            }
        }
    }

    /// Syncs the log. A failed fsync leaves the kernel's view of the file unknowable, so the
    /// appender refuses everything afterwards; a restart recovers from what is on disk.
    fn sync(&mut self) -> Result<(), Error> {
        let Some(shared) = self.log.as_ref() else { return Ok(()) };
        let started = Instant::now();
        let result = shared.lock().sync();
        self.metrics.fsync_time.record(started.elapsed());
        self.last_sync = Instant::now();
        self.unsynced = false;
        result.map_err(|e| {
            self.metrics.stopped.stop("log", &format!("fsync failed: {e}"));
            self.failed = Some(e.to_string());
            Error::Storage(e.to_string())
        })
    }

    /// Routes and acknowledges what the group appended, in log order.
    fn deliver(&mut self, appended: &mut Vec<Appended>) {
        let mut last = None;
        for a in appended.drain(..) {
            match a {
                Appended::Batch { offset, batch, ack, queued } => {
                    let created = batch.events().first().map(|e| e.ts_us.to_native());
                    let batch = Arc::new(batch);
                    self.route(offset, batch.clone());
                    let _ = self.fanout.send(Some(batch));
                    let _ = ack.send(Ok(()));
                    self.metrics.append_time.record(queued.elapsed());
                    if let Some(created) = created {
                        self.metrics.event_age_at_ack.record(age(events::now_us(), created));
                    }
                    last = Some(offset);
                }
                Appended::Duplicate { ack } => {
                    let _ = ack.send(Ok(()));
                }
                Appended::Command { offset, cmd, reply, trace } => {
                    let shard = shard_of(cmd.drone_id(), self.shards.len());
                    let _ = self.shards[shard].send(ShardMsg::Command { offset, cmd, reply: Some(reply), trace });
                    last = Some(offset);
                }
            }
        }
        if let Some(last) = last {
            self.watermark(last);
            *self.tail.end.lock() = last + 1;
            self.tail.grew.notify_all();
        }
    }

    /// Splits a batch over the shards by drone: index lists, never copies.
    fn route(&self, offset: u64, batch: Arc<TelemetryBatch>) {
        let n = self.shards.len();
        if n == 1 {
            let _ = self.shards[0].send(ShardMsg::Events { offset, batch, indices: None });
            return;
        }
        let per_shard = split_by_shard(&batch, n);
        let whole = per_shard.iter().filter(|v| !v.is_empty()).count() == 1;
        for (shard, indices) in per_shard.into_iter().enumerate() {
            if !indices.is_empty() {
                let msg = ShardMsg::Events { offset, batch: batch.clone(), indices: (!whole).then_some(indices) };
                let _ = self.shards[shard].send(msg);
            }
        }
    }

    fn watermark(&self, offset: u64) {
        for shard in &self.shards {
            let _ = shard.send(ShardMsg::Watermark(offset));
        }
    }

    fn retention(&mut self) {
        self.last_retention = Instant::now();
        let keep_from = self.needed.iter().map(|n| n.load(Ordering::Relaxed)).min().unwrap_or(0);
        if let Some(shared) = self.log.as_ref() {
            let mut log = shared.lock();
            match log.enforce_retention(keep_from, SystemTime::now()) {
                Ok(0) => {}
                Ok(n) => info!(segments = n, first_offset = log.first_offset(), "retention deleted old segments"),
                Err(e) => warn!(error = %e, "retention failed"),
            }
            self.metrics.log_bytes.store(log.total_bytes(), Ordering::Relaxed);
        }
    }
}

/// One shard thread: applies its queue in order, publishes what it derives, checkpoints.
struct Shard {
    index: usize,
    shards: usize,
    deriver: Deriver,
    rx: flume::Receiver<ShardMsg>,
    publisher: flume::Sender<PublishMsg>,
    metrics: Arc<EngineMetrics>,
    out: Vec<DeliveryEvent>,
    published: u64,
    /// Trace for the delivery batch being built.
    out_trace: Option<TraceContext>,
    reported: DeriveStats,
    /// The offset the restored checkpoint covers: replayed records up to it are skipped.
    covered: Option<u64>,
    /// Every record up to this offset has been applied.
    applied: Option<u64>,
    /// The checkpointer, when checkpoints are kept (a data dir or JetStream).
    checkpoints: Option<flume::Sender<CkptJob>>,
    /// Per shard, the first offset the log must keep: one past the last checkpoint written.
    needed: Arc<[AtomicU64]>,
    ckpt_interval: Duration,
    last_ckpt: Instant,
}

/// Messages a shard applies before it publishes what they derived: enough to amortise the
/// encode and fan-out under load, few enough to keep the added latency to a few batches.
const PUBLISH_EVERY: usize = 32;

impl Shard {
    fn run(mut self) {
        let mut stop = false;
        while !stop {
            let Ok(msg) = self.rx.recv() else { break };
            stop = !self.handle(msg);
            let mut more = 0;
            while !stop && more < PUBLISH_EVERY {
                match self.rx.try_recv() {
                    Ok(msg) => {
                        more += 1;
                        stop = !self.handle(msg);
                    }
                    Err(_) => break,
                }
            }
            self.flush();
            if stop || self.last_ckpt.elapsed() >= self.ckpt_interval {
                self.checkpoint(None, stop);
            }
        }
    }

    fn covered(&self, offset: u64) -> bool {
        self.covered.is_some_and(|c| offset <= c)
    }

    fn advance(&mut self, offset: u64) {
        self.applied = Some(self.applied.map_or(offset, |a| a.max(offset)));
    }

    /// Applies one message; false on `Stop`.
    fn handle(&mut self, msg: ShardMsg) -> bool {
        match msg {
            ShardMsg::Events { offset, batch, indices } => {
                if !self.covered(offset) {
                    let derived_before = self.out.len();
                    let events = batch.events();
                    match indices {
                        None => {
                            for ev in events.iter() {
                                self.deriver.on_drone_event(ev, &mut self.out);
                            }
                        }
                        Some(indices) => {
                            for i in indices {
                                if let Some(ev) = events.get(i as usize) {
                                    self.deriver.on_drone_event(ev, &mut self.out);
                                }
                            }
                        }
                    }
                    let trace = batch.header().meta.trace;
                    if self.out.len() > derived_before && trace.is_some() && self.out_trace.is_none() {
                        self.out_trace = Some(trace);
                    }
                }
                self.advance(offset);
            }
            ShardMsg::Command { offset, cmd, reply, trace } => {
                if trace.is_some() && self.out_trace.is_none() {
                    self.out_trace = Some(trace);
                }
                let result = if self.covered(offset) {
                    Ok(())
                } else {
                    self.deriver.on_command(&cmd, events::now_us(), &mut self.out)
                };
                self.advance(offset);
                // Publish before replying, so Created is on the stream before the caller acts.
                self.flush();
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            ShardMsg::Watermark(offset) => self.advance(offset),
            ShardMsg::Drone { id, reply } => {
                let _ = reply.send(self.deriver.reported_drone(id));
            }
            ShardMsg::Restore { ckpt, done } => {
                self.out.clear();
                self.out_trace = None;
                let covered = ckpt.as_ref().map(|c| c.offset);
                self.deriver = match ckpt {
                    Some(c) => Deriver::restore(self.deriver.config(), c.state),
                    None => Deriver::new(self.deriver.config()),
                };
                self.reported = self.deriver.stats();
                self.covered = covered;
                self.applied = covered;
                // The checkpoint it starts from is written: nothing to write again until it moves on.
                self.needed[self.index].store(covered.map_or(0, |c| c + 1), Ordering::Relaxed);
                self.last_ckpt = Instant::now();
                let _ = done.send(());
            }
            ShardMsg::Checkpoint { done } => {
                self.flush();
                self.checkpoint(Some(done), true);
            }
            ShardMsg::Stop => return false,
        }
        true
    }

    fn flush(&mut self) {
        let stats = self.deriver.stats();
        let m = &self.metrics;
        m.applied.fetch_add(stats.applied - self.reported.applied, Ordering::Relaxed);
        m.duplicates.fetch_add(stats.duplicates - self.reported.duplicates, Ordering::Relaxed);
        m.derived.fetch_add(stats.derived - self.reported.derived, Ordering::Relaxed);
        m.far_dropoffs.fetch_add(stats.far_dropoffs - self.reported.far_dropoffs, Ordering::Relaxed);
        m.stray.fetch_add(stats.stray - self.reported.stray, Ordering::Relaxed);
        self.reported = stats;
        if self.out.is_empty() {
            return;
        }
        // The batch carries the trace of the first traced input that derived something in it.
        let trace = self.out_trace.take().unwrap_or_default();
        let meta = BatchMeta { producer_id: self.index as u64, batch_seq: self.published, trace };
        match DeliveryBatch::encode(meta, &self.out, Buffer::with_capacity(64 + self.out.len() * 64)) {
            Ok(batch) => {
                self.published += 1;
                let _ = self.publisher.send(PublishMsg::Events(batch));
            }
            Err(error) => error!(%error, shard = self.index, "delivery batch encoding failed"),
        }
        self.out.clear();
    }

    /// Snapshots the state and hands it to the checkpointer, which writes it once the delivery
    /// events it derived are durable; the shard goes straight back to its queue. `done` is told
    /// once the checkpoint is written. A periodic checkpoint (`wait` false) is skipped while the
    /// checkpointer is still busy with earlier ones; until a checkpoint of the applied offset is
    /// written (one that failed included), each interval hands over another.
    fn checkpoint(&mut self, done: Option<oneshot::Sender<()>>, wait: bool) {
        self.last_ckpt = Instant::now();
        let (Some(offset), Some(checkpoints)) = (self.applied, &self.checkpoints) else {
            return tell(done);
        };
        if self.needed[self.index].load(Ordering::Relaxed) == offset + 1 {
            return tell(done); // a checkpoint of this offset is written
        }
        // Everything this state derived must be in the delivery-events log before the
        // checkpoint says it need not be derived again: the barrier follows this shard's events
        // into the publisher's queue, and the checkpointer waits for its answer.
        let (barrier, durable) = flume::bounded(1);
        if self.publisher.send(PublishMsg::Barrier(barrier)).is_err() {
            return tell(done);
        }
        let ckpt =
            Checkpoint { shard: self.index as u32, shards: self.shards as u32, offset, state: self.deriver.snapshot() };
        let job = CkptJob { ckpt, durable, done };
        let sent = if wait {
            checkpoints.send(job).map_err(|e| e.into_inner())
        } else {
            checkpoints.try_send(job).map_err(|e| e.into_inner())
        };
        if let Err(job) = sent {
            tell(job.done);
        }
    }
}

fn tell(done: Option<oneshot::Sender<()>>) {
    if let Some(done) = done {
        let _ = done.send(());
    }
}

/// A shard's checkpoint waiting to be written.
struct CkptJob {
    ckpt: Checkpoint,
    /// Answers once the publisher has synced everything the shard derived before the snapshot.
    durable: flume::Receiver<()>,
    /// Told once the checkpoint is written (or has failed).
    done: Option<oneshot::Sender<()>>,
}

/// Writes shard checkpoints off the shard threads: waiting for the delivery-events log, the
/// file write with its fsyncs (or the JetStream round trip) would otherwise stall a shard's queue
/// for milliseconds every interval, and every batch queued behind it would wait that long.
struct Checkpointer {
    dir: Option<PathBuf>,
    /// On JetStream, checkpoints go to its KV bucket while this node owns the shard.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Per shard, the first offset the log must keep for a replay from its checkpoint.
    needed: Arc<[AtomicU64]>,
    metrics: Arc<EngineMetrics>,
}

impl Checkpointer {
    fn run(self, rx: flume::Receiver<CkptJob>) {
        while let Ok(CkptJob { ckpt, durable, done }) = rx.recv() {
            if durable.recv().is_ok() {
                let written = match (&self.dir, &self.cluster) {
                    (Some(dir), _) => checkpoint::write(dir, &ckpt).map(|()| true),
                    (None, Some(cluster)) => cluster.put_checkpoint(&ckpt),
                    (None, None) => Ok(false),
                };
                match written {
                    Ok(false) => {}
                    Ok(true) => {
                        self.needed[ckpt.shard as usize].store(ckpt.offset + 1, Ordering::Relaxed);
                        self.metrics.checkpoints.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => warn!(error = %e, shard = ckpt.shard, "checkpoint failed; will retry"),
                }
            }
            tell(done);
        }
    }
}

#[cfg(test)]
mod tests {
    use events::{DeliveryStage, DroneEventKind, FlightStatus, GeoPoint};

    use super::*;

    fn ev(drone_id: u64, seq: u64, kind: DroneEventKind) -> DroneEvent {
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

    /// A checkpoint waits for the delivery-events log to be durable, then writes a file with
    /// fsyncs. The shard hands both to the checkpointer: while the publisher has not answered the
    /// barrier, the shard still answers, and the checkpoint lands once it does.
    #[test]
    fn a_failed_sync_of_the_delivery_events_log_stops_publishing_and_answering_barriers() {
        let dir = std::env::temp_dir().join(format!("fleetstream-publisher-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (log, _) = Log::open(&dir, LogConfig::default()).unwrap();
        let log: SharedLog = Arc::new(parking_lot::Mutex::new(log));
        let metrics = Arc::new(EngineMetrics::default());
        let topic = Arc::new(Topic::<DeliveryEvent>::new("delivery-events", 16));
        let sub = topic.subscribe(events::Overflow::Block);
        let publisher = Publisher {
            log: Some(log.clone()),
            seen: FxHashMap::default(),
            finished: std::collections::VecDeque::new(),
            topic: topic.clone(),
            tail: Arc::new(Tail { end: parking_lot::Mutex::new(0), grew: parking_lot::Condvar::new() }),
            policy: FsyncPolicy::EveryBatch,
            last_retention: Instant::now(),
            cluster: None,
            metrics: metrics.clone(),
            failed: false,
        };
        let (tx, rx) = flume::unbounded();
        let running = std::thread::spawn(move || publisher.run(rx));
        let event = |delivery_id| DeliveryEvent {
            delivery_id,
            seq: 0,
            drone_id: 1,
            ts_us: 1,
            location: GeoPoint::new(0.0, 0.0),
            stage: DeliveryStage::Created,
        };
        let batch = |id| DeliveryBatch::encode(BatchMeta::default(), &[event(id)], Buffer::new()).unwrap();
        // While the disk works: published, and the barrier behind it answered.
        let (barrier, durable) = flume::bounded(1);
        tx.send(PublishMsg::Events(batch(1))).unwrap();
        tx.send(PublishMsg::Barrier(barrier)).unwrap();
        assert!(durable.recv_timeout(Duration::from_secs(5)).is_ok());
        assert_eq!(sub.rx.recv_timeout(Duration::from_secs(5)).unwrap().events()[0].delivery_id.to_native(), 1);
        // The next sync fails: the batch is not published, its barrier never answered (dropped),
        // and neither is anything after it.
        log.lock().fail_syncs();
        for id in [2, 3] {
            let (barrier, durable) = flume::bounded(1);
            tx.send(PublishMsg::Events(batch(id))).unwrap();
            tx.send(PublishMsg::Barrier(barrier)).unwrap();
            assert!(durable.recv_timeout(Duration::from_secs(5)).is_err(), "no checkpoint may vouch for it");
        }
        assert!(sub.rx.try_recv().is_err(), "nothing unsynced reaches a subscriber");
        let stopped = metrics.stopped.parts();
        assert_eq!(stopped.len(), 1, "{stopped:?}");
        assert_eq!(stopped[0].0, "delivery-events log");
        assert!(stopped[0].1.contains("injected failure"), "{stopped:?}");
        drop(tx);
        running.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_pending_checkpoint_does_not_stall_its_shard() {
        let dir = std::env::temp_dir().join(format!("fleetstream-ckpt-async-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let needed: Arc<[AtomicU64]> = vec![AtomicU64::new(0)].into();
        let metrics = Arc::new(EngineMetrics::default());
        let (ckpt_tx, ckpt_rx) = flume::bounded(1);
        let checkpointer =
            Checkpointer { dir: Some(dir.clone()), cluster: None, needed: needed.clone(), metrics: metrics.clone() };
        let writer = std::thread::spawn(move || checkpointer.run(ckpt_rx));
        let (publish_tx, publish_rx) = flume::unbounded();
        let (tx, rx) = flume::unbounded();
        let shard = Shard {
            index: 0,
            shards: 1,
            deriver: Deriver::new(DeriveConfig::default()),
            rx,
            publisher: publish_tx,
            metrics: metrics.clone(),
            out: Vec::new(),
            published: 0,
            out_trace: None,
            reported: DeriveStats::default(),
            covered: None,
            applied: None,
            checkpoints: Some(ckpt_tx),
            needed: needed.clone(),
            ckpt_interval: Duration::ZERO,
            last_ckpt: Instant::now(),
        };
        let running = std::thread::spawn(move || shard.run());
        let batch =
            TelemetryBatch::encode(BatchMeta::default(), &[ev(3, 1, DroneEventKind::Position)], Buffer::new()).unwrap();
        tx.send(ShardMsg::Events { offset: 0, batch: Arc::new(batch), indices: None }).unwrap();
        // The shard's periodic checkpoint sends its barrier, which nobody answers yet.
        let barrier = loop {
            match publish_rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                PublishMsg::Barrier(done) => break done,
                PublishMsg::Events(_) => {}
            }
        };
        let (reply, mut answer) = oneshot::channel();
        tx.send(ShardMsg::Drone { id: 3, reply }).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let snapshot = loop {
            match answer.try_recv() {
                Ok(snapshot) => break snapshot,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => panic!("the shard stalled behind its pending checkpoint"),
            }
        };
        assert!(snapshot.is_some(), "the shard knows the drone it applied");
        assert_eq!(needed[0].load(Ordering::Relaxed), 0, "nothing is written before the log is durable");
        barrier.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while needed[0].load(Ordering::Relaxed) != 1 {
            assert!(Instant::now() < deadline, "the checkpoint was never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(checkpoint::read(&dir, 0).unwrap().map(|c| c.offset), Some(0));
        assert_eq!(metrics.checkpoints.load(Ordering::Relaxed), 1);
        // Further barriers (from checkpoints of later offsets) get answers so the shard can stop.
        let answering = std::thread::spawn(move || {
            while let Ok(msg) = publish_rx.recv() {
                if let PublishMsg::Barrier(done) = msg {
                    let _ = done.send(());
                }
            }
        });
        tx.send(ShardMsg::Stop).unwrap();
        running.join().unwrap();
        writer.join().unwrap();
        answering.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shard_of_spreads_and_stays_in_range() {
        let mut counts = [0usize; 4];
        for d in 0..10_000 {
            counts[shard_of(d, 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 2_000), "{counts:?}");
        assert_eq!(shard_of(u64::MAX, 3), shard_of(u64::MAX, 3));
        assert!(shard_of(u64::MAX, 3) < 3);
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
