//! The engine: a router that splits batches by drone over shard threads, the shards that run the
//! derive state machine, and the fan-out of telemetry and delivery events to subscribers.
//!
//! ```text
//!  submit(batch) ──► router: one index list per shard ──► shard queue (bounded) ──► shard thread
//!        │             (the batch is shared, not copied)                            Deriver
//!        └──────────► fan-out queue (bounded) ──► fan-out thread ──► drone-telemetry  │
//!                                                                   delivery-events ◄─┘
//! ```
//!
//! Each drone maps to exactly one shard, and a shard applies its queue in order, so a drone's
//! events are applied in the order they were submitted. Every queue is bounded; a full shard
//! queue makes `submit` wait, which the ingest turns into QUIC flow control toward the sender.

use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use events::wire::{Buffer, DeliveryBatch, TelemetryBatch};
use events::{
    BatchMeta, BatchSink, DeliveryCommand, DeliveryEvent, DroneEvent, DroneId, DroneSnapshot, Error, FleetControl,
    Overflow, StreamSource, Subscription,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::bus::Topic;
use crate::derive::{DeriveConfig, DeriveStats, Deriver};

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Shard threads; 0 means one per CPU core. A shard is one thread, so more shards than cores
    /// only adds switching.
    pub shards: usize,
    /// Batches (or batch slices) each shard queue holds before `submit` waits. Default 256:
    /// with batches of about 1,000 events that is a quarter of a million events of slack per
    /// shard, enough to ride out a scheduling hiccup without holding much memory.
    pub shard_queue: usize,
    /// Batches each subscriber may have queued. Default 1024: a subscriber that is more than
    /// about a second behind at full rate is either blocking the pipeline (in-process
    /// consumers) or cut off (remote ones).
    pub subscriber_queue: usize,
    /// The derive rules.
    pub derive: DeriveConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { shards: 0, shard_queue: 256, subscriber_queue: 1024, derive: DeriveConfig::default() }
    }
}

impl EngineConfig {
    /// The shard count after resolving 0 to the number of cores.
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { self.shards }
    }
}

enum ShardMsg {
    Events { batch: Arc<TelemetryBatch>, indices: Option<Vec<u32>> },
    Command { cmd: DeliveryCommand, reply: oneshot::Sender<Result<(), Error>> },
    Drone { id: DroneId, reply: oneshot::Sender<Option<DroneSnapshot>> },
    Stop,
}

/// Counters of the engine, read by `/metrics`.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Batches submitted.
    pub batches: AtomicU64,
    /// Drone events submitted.
    pub events: AtomicU64,
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
}

struct Inner {
    shards: Vec<flume::Sender<ShardMsg>>,
    fanout: flume::Sender<Option<Arc<TelemetryBatch>>>,
    telemetry: Arc<Topic<DroneEvent>>,
    deliveries: Arc<Topic<DeliveryEvent>>,
    metrics: Arc<EngineMetrics>,
    stopping: AtomicBool,
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
    /// Starts the shard and fan-out threads.
    pub fn start(cfg: EngineConfig) -> std::io::Result<(Self, EngineThreads)> {
        let n = cfg.shard_count();
        let telemetry = Arc::new(Topic::new("drone-telemetry", cfg.subscriber_queue));
        let deliveries = Arc::new(Topic::new("delivery-events", cfg.subscriber_queue));
        let metrics = Arc::new(EngineMetrics::default());
        let mut threads = Vec::with_capacity(n + 1);
        let mut shards = Vec::with_capacity(n);
        for index in 0..n {
            let (tx, rx) = flume::bounded(cfg.shard_queue.max(1));
            let shard = Shard {
                index,
                deriver: Deriver::new(cfg.derive),
                rx,
                deliveries: deliveries.clone(),
                metrics: metrics.clone(),
                out: Vec::new(),
                published: 0,
                reported: DeriveStats::default(),
            };
            threads.push(std::thread::Builder::new().name(format!("shard-{index}")).spawn(move || shard.run())?);
            shards.push(tx);
        }
        let (fanout, fanout_rx) = flume::bounded::<Option<Arc<TelemetryBatch>>>(cfg.shard_queue.max(1));
        let topic = telemetry.clone();
        threads.push(std::thread::Builder::new().name("fanout".into()).spawn(move || {
            while let Ok(Some(batch)) = fanout_rx.recv() {
                topic.publish(batch);
            }
        })?);
        let inner = Inner { shards, fanout, telemetry, deliveries, metrics, stopping: AtomicBool::new(false) };
        Ok((Self { inner: Arc::new(inner) }, EngineThreads(threads)))
    }

    /// Refuses new work, lets every queue drain, and joins the threads.
    pub async fn shutdown(&self, threads: EngineThreads) {
        self.inner.stopping.store(true, Ordering::Release);
        for shard in &self.inner.shards {
            let _ = shard.send_async(ShardMsg::Stop).await;
        }
        let _ = self.inner.fanout.send_async(None).await;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads.0 {
                let _ = t.join();
            }
        })
        .await;
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

    /// The telemetry topic.
    pub fn telemetry(&self) -> &Topic<DroneEvent> {
        &self.inner.telemetry
    }

    /// The delivery-events topic.
    pub fn deliveries(&self) -> &Topic<DeliveryEvent> {
        &self.inner.deliveries
    }

    async fn to_shard(&self, drone: DroneId, msg: ShardMsg) -> Result<(), Error> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        self.inner.shards[self.shard_of(drone)].send_async(msg).await.map_err(|_| Error::ShuttingDown)
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("shards", &self.inner.shards.len()).finish_non_exhaustive()
    }
}

/// Appends the engine's counters in Prometheus text format.
pub fn render_metrics(engine: &Engine, out: &mut String) {
    use std::fmt::Write;
    let m = engine.metrics();
    let counters = [
        ("fleetstream_engine_batches_total", &m.batches),
        ("fleetstream_engine_events_total", &m.events),
        ("fleetstream_engine_events_applied_total", &m.applied),
        ("fleetstream_engine_events_duplicate_total", &m.duplicates),
        ("fleetstream_engine_delivery_events_total", &m.derived),
        ("fleetstream_engine_dropoffs_far_total", &m.far_dropoffs),
        ("fleetstream_engine_events_stray_total", &m.stray),
    ];
    for (name, c) in counters {
        let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", c.load(Ordering::Relaxed));
    }
    let _ = writeln!(out, "# TYPE fleetstream_engine_shard_queue_depth gauge");
    for (shard, depth) in engine.queue_depths().into_iter().enumerate() {
        let _ = writeln!(out, "fleetstream_engine_shard_queue_depth{{shard=\"{shard}\"}} {depth}");
    }
    for topic in [engine.telemetry().subscribers(), engine.deliveries().subscribers()]
        .iter()
        .zip(["drone-telemetry", "delivery-events"])
    {
        let _ = writeln!(out, "fleetstream_stream_subscribers{{topic=\"{}\"}} {}", topic.1, topic.0);
    }
    let _ = writeln!(
        out,
        "# TYPE fleetstream_stream_subscribers_lagged_total counter\nfleetstream_stream_subscribers_lagged_total {}",
        engine.telemetry().cut_off() + engine.deliveries().cut_off()
    );
}

/// Maps a drone to a shard: a multiplicative hash spread over `n` without a division.
pub fn shard_of(drone: DroneId, n: usize) -> usize {
    let h = drone.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(h) * n as u128) >> 64) as usize
}

impl BatchSink for Engine {
    type Ack = Ready<Result<(), Error>>;

    async fn submit(&self, batch: TelemetryBatch) -> Result<Self::Ack, Error> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let n = self.inner.shards.len();
        let events = batch.len() as u64;
        let batch = Arc::new(batch);
        if n == 1 {
            let msg = ShardMsg::Events { batch: batch.clone(), indices: None };
            self.inner.shards[0].send_async(msg).await.map_err(|_| Error::ShuttingDown)?;
        } else {
            let mut per_shard: Vec<Vec<u32>> = vec![Vec::new(); n];
            for (i, ev) in batch.events().iter().enumerate() {
                per_shard[shard_of(ev.drone_id.to_native(), n)].push(i as u32);
            }
            let whole = per_shard.iter().filter(|v| !v.is_empty()).count() == 1;
            for (shard, indices) in per_shard.into_iter().enumerate() {
                if indices.is_empty() {
                    continue;
                }
                let msg = ShardMsg::Events { batch: batch.clone(), indices: (!whole).then_some(indices) };
                self.inner.shards[shard].send_async(msg).await.map_err(|_| Error::ShuttingDown)?;
            }
        }
        self.inner.fanout.send_async(Some(batch)).await.map_err(|_| Error::ShuttingDown)?;
        self.inner.metrics.batches.fetch_add(1, Ordering::Relaxed);
        self.inner.metrics.events.fetch_add(events, Ordering::Relaxed);
        Ok(ready(Ok(())))
    }
}

impl StreamSource for Engine {
    fn subscribe_telemetry(&self, overflow: Overflow) -> Result<Subscription<DroneEvent>, Error> {
        Ok(self.inner.telemetry.subscribe(overflow))
    }

    fn subscribe_deliveries(&self, overflow: Overflow) -> Result<Subscription<DeliveryEvent>, Error> {
        Ok(self.inner.deliveries.subscribe(overflow))
    }
}

impl FleetControl for Engine {
    async fn command(&self, cmd: DeliveryCommand) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.to_shard(cmd.drone_id(), ShardMsg::Command { cmd, reply }).await?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    async fn drone(&self, id: DroneId) -> Result<Option<DroneSnapshot>, Error> {
        let (reply, rx) = oneshot::channel();
        self.to_shard(id, ShardMsg::Drone { id, reply }).await?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }
}

/// One shard thread: applies its queue in order and publishes what it derives.
struct Shard {
    index: usize,
    deriver: Deriver,
    rx: flume::Receiver<ShardMsg>,
    deliveries: Arc<Topic<DeliveryEvent>>,
    metrics: Arc<EngineMetrics>,
    out: Vec<DeliveryEvent>,
    published: u64,
    reported: DeriveStats,
}

/// Messages a shard applies before it publishes what they derived: enough to amortise the
/// encode and fan-out under load, few enough to keep the added latency to a few batches.
const PUBLISH_EVERY: usize = 32;

impl Shard {
    fn run(mut self) {
        while let Ok(msg) = self.rx.recv() {
            if !self.handle(msg) {
                break;
            }
            let mut more = 0;
            let mut stop = false;
            while more < PUBLISH_EVERY {
                match self.rx.try_recv() {
                    Ok(msg) => {
                        more += 1;
                        if !self.handle(msg) {
                            stop = true;
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            self.flush();
            if stop {
                break;
            }
        }
        self.flush();
    }

    /// Applies one message; false on `Stop`.
    fn handle(&mut self, msg: ShardMsg) -> bool {
        match msg {
            ShardMsg::Events { batch, indices } => {
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
            }
            ShardMsg::Command { cmd, reply } => {
                let result = self.deriver.on_command(&cmd, events::now_us(), &mut self.out);
                // Publish before replying, so Created is on the stream before the caller acts.
                self.flush();
                let _ = reply.send(result);
            }
            ShardMsg::Drone { id, reply } => {
                let _ = reply.send(self.deriver.drone(id));
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
        let meta = BatchMeta { producer_id: self.index as u64, batch_seq: self.published, ..BatchMeta::default() };
        match DeliveryBatch::encode(meta, &self.out, Buffer::with_capacity(64 + self.out.len() * 64)) {
            Ok(batch) => {
                self.published += 1;
                self.deliveries.publish(Arc::new(batch));
            }
            Err(error) => tracing::error!(%error, shard = self.index, "delivery batch encoding failed"),
        }
        self.out.clear();
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
        let (engine, threads) =
            Engine::start(EngineConfig { shards: 4, shard_queue: 4, ..EngineConfig::default() }).unwrap();
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
            let batch = TelemetryBatch::encode(BatchMeta::default(), &events, Buffer::new()).unwrap();
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
