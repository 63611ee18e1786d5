//! JetStream as the engine's [`Backend`]: batches and commands go to the per-shard subjects,
//! offset subscriptions read the streams, derived events are published there (deduplicated by
//! delivery and seq), checkpoints go to the KV bucket, and the shards are the ones this node holds
//! leases on. The engine sees only the trait.

use std::sync::OnceLock;

use events::{DeliveryEvent, DroneId, DroneSnapshot, OffsetSubscription};

use super::*;
use crate::engine::{AckFuture, Backend, BoxFuture, CheckpointStore, DerivedSink, Span, StartContext, Started};

/// The JetStream backend as the engine sees it.
#[derive(Debug)]
pub struct ClusterBackend {
    cluster: Arc<Cluster>,
    shards: OnceLock<Vec<flume::Sender<ShardMsg>>>,
}

impl ClusterBackend {
    /// The engine's view of `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> Arc<Self> {
        Arc::new(Self { cluster, shards: OnceLock::new() })
    }
}

impl Backend for ClusterBackend {
    fn checkpoints(&self, n: usize) -> Result<Vec<Option<Checkpoint>>, crate::Error> {
        // A shard's checkpoint is read when this node takes its lease.
        Ok(vec![None; n])
    }

    fn start(&self, ctx: StartContext) -> Result<Started, crate::Error> {
        let _ = self.shards.set(ctx.shards.clone());
        self.cluster.start(ctx.shards, ctx.telemetry, ctx.deliveries)?;
        Ok(Started::default())
    }

    fn submit(&self, batch: TelemetryBatch) -> BoxFuture<'_, Result<AckFuture, Error>> {
        Box::pin(async move {
            let stored = self.cluster.publish_batch(batch).await?;
            let (ack, rx) = oneshot::channel();
            tokio::spawn(async move {
                let _ = ack.send(stored.await);
            });
            Ok(AckFuture::new(rx))
        })
    }

    fn command(&self, cmd: DeliveryCommand, trace: TraceContext) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.cluster.command(cmd, trace))
    }

    fn follow_telemetry(&self, from: StartAt) -> Result<OffsetSubscription<DroneEvent>, Error> {
        self.cluster.follow(StreamTopic::DroneTelemetry, from)
    }

    fn follow_deliveries(&self, from: StartAt) -> Result<OffsetSubscription<DeliveryEvent>, Error> {
        self.cluster.follow(StreamTopic::DeliveryEvents, from)
    }

    fn bounds(&self, topic: StreamTopic) -> (u64, u64) {
        self.cluster.bounds(topic)
    }

    fn check_cursor(&self, _topic: StreamTopic, _next: u64) -> Result<(), Error> {
        // A reader may be ahead of what this node's follower has seen.
        Ok(())
    }

    fn share_cursor(&self, topic: StreamTopic, name: &str, cursor: crate::cursor::Cursor) {
        self.cluster.put_cursor(topic, name, cursor);
    }

    fn remote_drone(&self, shard: usize, id: DroneId) -> Option<BoxFuture<'_, Result<Option<DroneSnapshot>, Error>>> {
        (!self.cluster.owns(shard)).then(|| Box::pin(self.cluster.drone(id)) as BoxFuture<'_, _>)
    }

    fn derived_sink(&self) -> Result<Box<dyn DerivedSink>, crate::Error> {
        Ok(Box::new(JetStreamSink { cluster: self.cluster.clone(), events: Vec::new(), waiting: Vec::new() }))
    }

    fn checkpoint_store(&self) -> Option<Box<dyn CheckpointStore>> {
        Some(Box::new(KvCheckpoints(self.cluster.clone())))
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.cluster.stop())
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for shard in self.shards.get().into_iter().flatten() {
                let _ = shard.send_async(ShardMsg::Stop).await;
            }
        })
    }

    fn render_metrics(&self, out: &mut String) {
        use events::prom::{counter, gauge};
        let m = &self.cluster.metrics;
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

/// Derived events straight to JetStream: each round in one go (acknowledgements overlap), and
/// every barrier waiting answered once it is stored. This node's topic is fed back from there.
struct JetStreamSink {
    cluster: Arc<Cluster>,
    events: Vec<DeliveryEvent>,
    waiting: Vec<flume::Sender<()>>,
}

impl DerivedSink for JetStreamSink {
    fn report(&mut self, _shard: usize, _applied: Option<u64>, spans: Vec<Span>) {
        self.events.extend(spans.into_iter().flat_map(|s| s.events));
    }

    fn barrier(&mut self, _upto: Option<u64>, done: flume::Sender<()>) {
        self.waiting.push(done);
    }

    fn end_round(&mut self) {
        if !self.events.is_empty() {
            self.cluster.publish_deliveries(&self.events);
            self.events.clear();
        }
        for done in self.waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Checkpoints in the KV bucket, written only while this node holds the shard's lease.
struct KvCheckpoints(Arc<Cluster>);

impl CheckpointStore for KvCheckpoints {
    fn put(&self, ckpt: &Checkpoint) -> Result<bool, crate::Error> {
        self.0.put_checkpoint(ckpt)
    }
}
