//! Several pipeline nodes on one NATS JetStream (`[log] backend = "jetstream"`): JetStream
//! takes the place of the local log, so any node can ingest, and each shard is run by one node
//! at a time.
//!
//! ```text
//!  QUIC batch ─► split by shard ─► <prefix>.telemetry.<shard>   (one message per batch part,
//!  command ────────────────────►   same subject, marked         msg id producer-seq-shard)
//!                                     │
//!         the node leasing the shard: ordered consumer from its checkpoint ─► shard thread
//!                                     │                                     (derive)
//!                                     ▼
//!                       <prefix>.deliveries.<shard>  (one message per delivery event,
//!                                                     msg id delivery-seq)
//!  every node: live followers ─► local topics ─► its subscribers; offset readers from JetStream
//! ```
//!
//! - **Ingest.** A batch is split by shard and each part published as wire bytes; the QUIC
//!   client is acknowledged only after JetStream acknowledged every part. The message id is
//!   the producer id, batch sequence and shard, so a re-sent batch inside the duplicate window
//!   is dropped by JetStream. A producer that numbers its batches again from lower down (it
//!   restarted without keeping its sequence) would have its new batches dropped as repeats:
//!   the node keeps the same per-producer windows the embedded log does ([`crate::dedup`]) for
//!   the producers it serves, and refuses such a batch with `sequence_regressed` instead.
//! - **Commands** go on the shard's subject too, so a shard applies commands and drone events
//!   in one order whichever node took them. The caller waits for the owning shard's answer on
//!   this node's reply inbox.
//! - **Leases.** Each shard has a key in the `<prefix>_SHARDS` KV bucket whose entries expire
//!   after `lease_ms`; the owner renews it every third of that with a revision check. Every
//!   node announces itself in the same bucket and takes shards (create-if-absent) up to its fair
//!   share, ⌈shards ÷ live nodes⌉; a node above its share hands shards back after a checkpoint.
//!   A node that dies stops renewing, its keys expire, and the others take its shards.
//! - **Checkpoints** (the same bytes as the embedded checkpoint files) live in the
//!   `<prefix>_CHECKPOINTS` bucket. A new owner restores one and reads the shard's subject from
//!   the sequence after it, so it re-derives what the old owner derived after its last
//!   checkpoint.
//! - **Delivery events** are published one per message with the id `<delivery>-<seq>`, and a
//!   shard derives the same events with the same ids from the same inputs, so what a takeover
//!   derives again is dropped by JetStream: nothing is counted twice. A checkpoint is written
//!   only after everything derived before it was acknowledged by JetStream.
//!
//! Offsets on this backend are stream sequences − 1. Named cursors are kept in the node's data
//! directory and shared with every node through the `<prefix>_CURSORS` KV bucket.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::DeliverPolicy, kv, stream::StorageType};
use bytes::Bytes;
use events::contract::LogItem;
use events::wire::{Buffer, DeliveryBatch, Limits, Payload, TelemetryBatch, buffer_from};
use events::{DeliveryCommand, DroneEvent, Error, StartAt, Topic as StreamTopic, TraceContext};
use futures_util::StreamExt;
use futures_util::future::try_join_all;
use rustc_hash::FxHashMap;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::bus::Topic;
use crate::checkpoint::{self, Checkpoint};
use crate::engine::{ShardMsg, shard_of};
use crate::jetstream::{JetStreamConfig, JetStreamTopic};

mod backend;

pub use backend::ClusterBackend;

fn js_error(e: impl std::fmt::Display) -> crate::Error {
    crate::Error::JetStream(e.to_string())
}

fn storage_error(e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("JetStream: {e}"))
}

const KIND: &str = "Fleetstream-Kind";
const REPLY: &str = "Fleetstream-Reply";
const TRACEPARENT: &str = "traceparent";
const COMMAND: &str = "command";

/// How long a publish may wait for JetStream's acknowledgement before it is reported failed.
/// Long: a broker that falls behind is waited for, not given up on (see `Cluster::connect`).
const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a command waits for the shard that owns its drone to answer. Longer than a lease,
/// so a command sent while its shard changes hands is answered by the new owner.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

fn unlimited() -> Limits {
    Limits { max_body_bytes: u32::MAX, max_events: u32::MAX }
}

/// Counters of this node's part in the cluster, read by `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    /// Batch parts published to JetStream.
    pub published: AtomicU64,
    /// Batch parts JetStream already had (re-sends inside the duplicate window).
    pub duplicates: AtomicU64,
    /// Delivery events published (re-derived ones JetStream dropped included).
    pub delivery_events: AtomicU64,
    /// Shards this node owns now.
    pub owned: AtomicU64,
    /// Shards taken over (each acquisition).
    pub acquired: AtomicU64,
    /// Leases lost without handing them back (missed renewals).
    pub lost: AtomicU64,
    /// Messages on a shard subject that were neither a valid batch nor a valid command.
    pub invalid: AtomicU64,
}

/// The shared pieces of a node's connection to the cluster.
pub struct Cluster {
    client: async_nats::Client,
    js: jetstream::Context,
    telemetry: JetStreamTopic,
    deliveries: JetStreamTopic,
    leases: kv::Store,
    checkpoints: kv::Store,
    /// Named cursors, shared by every node.
    cursors: kv::Store,
    node: String,
    subject_prefix: String,
    shards: usize,
    lease: Duration,
    handle: tokio::runtime::Handle,
    owned: Vec<AtomicBool>,
    /// Per shard: the revision of its checkpoint entry this node last read or wrote.
    ckpt_revisions: Vec<AtomicU64>,
    inflight: Arc<tokio::sync::Semaphore>,
    reply_prefix: String,
    pending: parking_lot::Mutex<FxHashMap<u64, oneshot::Sender<Result<(), Error>>>>,
    next_reply: AtomicU64,
    stopping: AtomicBool,
    /// The end (next offset) of each topic as this node's followers last saw it.
    ends: [AtomicU64; 2],
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    stop_leases: parking_lot::Mutex<Option<oneshot::Sender<oneshot::Sender<()>>>>,
    /// The batch numbers of the producers this node took batches from, to refuse one that
    /// numbers again from lower down; with the count of batches taken, their recency.
    windows: parking_lot::Mutex<(crate::dedup::ProducerWindows, u64)>,
    /// Counters.
    pub metrics: ClusterMetrics,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.node).field("shards", &self.shards).finish_non_exhaustive()
    }
}

/// A KV bucket with one value per key. The bucket's stream is created here with the settings
/// a KV bucket has (the client's own bucket creation does not read a 2.9 server's answer).
async fn bucket(
    js: &jetstream::Context,
    name: String,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, crate::Error> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        discard: jetstream::stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: replicas.max(1),
        storage: StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| crate::Error::JetStream(format!("creating the KV bucket {name}: {e}")))?;
    js.get_key_value(&name).await.map_err(|e| crate::Error::JetStream(format!("opening the KV bucket {name}: {e}")))
}

/// This machine's host name as a lease-name part (letters, digits and `-`; `node` if none).
pub fn host_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    if host.is_empty() { "node".into() } else { host }
}

fn default_node_id() -> String {
    format!("{}-{}", host_name(), std::process::id())
}

impl Cluster {
    /// Why NATS cannot be reached now, if it cannot (the client reconnects on its own).
    pub fn nats_unavailable(&self) -> Option<String> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => None,
            state => Some(format!("NATS connection {state:?}; reconnecting")),
        }
    }

    /// Connects, creates (or checks) the streams and buckets, and agrees on the shard count
    /// with the nodes already there. Must run inside a tokio runtime.
    pub async fn connect(
        cfg: &JetStreamConfig,
        shards: usize,
        append_queue: usize,
        max_producers: usize,
    ) -> Result<Arc<Self>, crate::Error> {
        if tokio::runtime::Handle::current().runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return Err(crate::Error::Config("the JetStream backend needs a multi-threaded tokio runtime".into()));
        }
        let client = crate::jetstream::connect(cfg).await?;
        let mut js = jetstream::new(client.clone());
        // A publish whose acknowledgement is late is not failed: failing it makes its producer
        // re-send it after batches that were stored meanwhile, out of order for its drones.
        // Waiting holds the ingest back instead (at most `append_queue` batches in flight).
        js.set_timeout(PUBLISH_ACK_TIMEOUT);
        let telemetry = JetStreamTopic::open_with(js.clone(), StreamTopic::DroneTelemetry, cfg).await?;
        let deliveries = JetStreamTopic::open_with(js.clone(), StreamTopic::DeliveryEvents, cfg).await?;
        let means = crate::jetstream::durability::assess(cfg, &js).await;
        crate::jetstream::durability::enforce(cfg, &means)?;
        let lease = Duration::from_millis(cfg.lease_ms.max(300));
        let leases = bucket(&js, format!("{}_SHARDS", cfg.stream_prefix), lease, cfg.replicas).await?;
        let checkpoints =
            bucket(&js, format!("{}_CHECKPOINTS", cfg.stream_prefix), Duration::ZERO, cfg.replicas).await?;
        let cursors = bucket(&js, format!("{}_CURSORS", cfg.stream_prefix), Duration::ZERO, cfg.replicas).await?;
        // Every node must split drones the same way: the first node records the count.
        let shard_count = Bytes::from(shards.to_string());
        if checkpoints.create("shards", shard_count).await.is_err() {
            let agreed = checkpoints.get("shards").await.map_err(js_error)?.unwrap_or_default();
            if agreed != shards.to_string().as_bytes() {
                return Err(crate::Error::Config(format!(
                    "this node has {shards} shards but the cluster on {} has {}; set [engine] shards to match",
                    cfg.url,
                    String::from_utf8_lossy(&agreed)
                )));
            }
        }
        let node = if cfg.node_id.is_empty() { default_node_id() } else { cfg.node_id.clone() };
        let reply_prefix = client.new_inbox();
        let mut ends = [0, 0];
        for (end, stream) in ends.iter_mut().zip([telemetry.stream(), deliveries.stream()]) {
            let mut stream = stream.clone();
            *end = stream.info().await.map_err(js_error)?.state.last_sequence;
        }
        let cluster = Arc::new(Self {
            client,
            js,
            telemetry,
            deliveries,
            leases,
            checkpoints,
            cursors,
            node,
            subject_prefix: cfg.subject_prefix.clone(),
            shards,
            lease,
            handle: tokio::runtime::Handle::current(),
            owned: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            ckpt_revisions: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            inflight: Arc::new(tokio::sync::Semaphore::new(append_queue.max(1))),
            reply_prefix,
            pending: parking_lot::Mutex::default(),
            next_reply: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            ends: ends.map(AtomicU64::new),
            tasks: parking_lot::Mutex::default(),
            stop_leases: parking_lot::Mutex::default(),
            windows: parking_lot::Mutex::new((crate::dedup::ProducerWindows::new(max_producers), 0)),
            metrics: ClusterMetrics::default(),
        });
        let mut replies = cluster.client.subscribe(format!("{}.*", cluster.reply_prefix)).await.map_err(js_error)?;
        let weak = Arc::downgrade(&cluster);
        let task = tokio::spawn(async move {
            while let Some(msg) = replies.next().await {
                let Some(cluster) = weak.upgrade() else { return };
                let id = msg.subject.rsplit('.').next().and_then(|t| t.parse::<u64>().ok());
                if let Some(tx) = id.and_then(|id| cluster.pending.lock().remove(&id)) {
                    let _ = tx.send(decode_reply(&msg.payload));
                }
            }
        });
        cluster.tasks.lock().push(task);
        info!(node = %cluster.node, shards, lease_ms = lease.as_millis() as u64, url = %cfg.url, "joined the cluster");
        Ok(cluster)
    }

    /// This node's name in the leases.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether this node owns `shard` now.
    pub fn owns(&self, shard: usize) -> bool {
        self.owned.get(shard).is_some_and(|o| o.load(Ordering::Acquire))
    }

    /// The shards this node owns now.
    pub fn owned_shards(&self) -> Vec<usize> {
        (0..self.shards).filter(|&s| self.owns(s)).collect()
    }

    /// `(first, end)` of a topic as far as this node knows: first is not tracked (0).
    pub fn bounds(&self, topic: StreamTopic) -> (u64, u64) {
        (0, self.ends[topic_index(topic)].load(Ordering::Acquire))
    }

    fn topic(&self, which: StreamTopic) -> &JetStreamTopic {
        match which {
            StreamTopic::DroneTelemetry => &self.telemetry,
            StreamTopic::DeliveryEvents => &self.deliveries,
        }
    }

    /// Where the node running `shard` answers questions about its drones.
    fn drone_subject(&self, shard: usize) -> String {
        format!("{}.drone.{shard}", self.subject_prefix)
    }

    /// Hands a batch, split by shard, to the NATS connection, and returns what resolves once
    /// JetStream has stored every part. Callers await this in arrival order, so batches from
    /// one connection reach each shard subject in the order they were sent, while their
    /// acknowledgements overlap. At most `append_queue` batches are in flight per node; more
    /// wait here, which the ingest turns into QUIC flow control.
    pub async fn publish_batch(
        self: &Arc<Self>,
        batch: TelemetryBatch,
    ) -> Result<impl Future<Output = Result<(), Error>> + Send + 'static, Error> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        // Refused through the acknowledgement, as the embedded log refuses it.
        let regressed = {
            let meta = batch.header().meta;
            let (windows, taken) = &mut *self.windows.lock();
            match windows.check(meta.producer_id, meta.batch_seq) {
                crate::dedup::Seen::Regressed { highest } => {
                    Some(Error::SequenceRegressed { producer: meta.producer_id, seq: meta.batch_seq, highest })
                }
                _ => {
                    // Noted before it is published: a re-send after a failed publish is a
                    // repeat here, published again, and JetStream's duplicate window decides.
                    *taken += 1;
                    windows.insert(meta.producer_id, meta.batch_seq, *taken);
                    None
                }
            }
        };
        let permit = self.inflight.clone().acquire_owned().await.map_err(|_| Error::ShuttingDown)?;
        let parts = match regressed {
            Some(e) => Err(e),
            None => self.split(batch),
        };
        let mut acks = Vec::new();
        let mut failed = None;
        match parts {
            Ok(parts) => {
                for (shard, id, bytes) in parts {
                    let publish = jetstream::context::Publish::build().payload(bytes).message_id(id);
                    match self.js.send_publish(self.telemetry.subject(shard), publish).await {
                        Ok(ack) => acks.push(ack),
                        Err(e) => {
                            failed = Some(storage_error(e));
                            break;
                        }
                    }
                }
            }
            Err(e) => failed = Some(e),
        }
        let cluster = self.clone();
        Ok(async move {
            let _permit = permit;
            let acked = try_join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
                .map_err(storage_error)?;
            for ack in &acked {
                cluster.ends[0].fetch_max(ack.sequence, Ordering::AcqRel);
            }
            for ack in acked {
                let counter = if ack.duplicate { &cluster.metrics.duplicates } else { &cluster.metrics.published };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            failed.map_or(Ok(()), Err)
        })
    }

    /// A batch's parts per shard with their message ids. A batch of one shard's drones goes
    /// as it is; others are split (the only copy on this path).
    fn split(&self, batch: TelemetryBatch) -> Result<Vec<(usize, String, Bytes)>, Error> {
        let meta = batch.header().meta;
        let id = |shard: usize| JetStreamTopic::batch_id(meta, shard);
        let mut indices: FxHashMap<usize, Vec<u32>> = FxHashMap::default();
        for (i, ev) in batch.events().iter().enumerate() {
            indices.entry(shard_of(ev.drone_id.to_native(), self.shards)).or_default().push(i as u32);
        }
        if indices.len() <= 1 {
            let shard = indices.keys().next().copied().unwrap_or(0);
            return Ok(vec![(shard, id(shard), Bytes::from_owner(batch.into_buffer()))]);
        }
        let mut parts = Vec::with_capacity(indices.len());
        for (shard, idx) in indices {
            let owned: Vec<DroneEvent> = idx
                .iter()
                .filter_map(|&i| batch.events().get(i as usize))
                .map(rkyv::deserialize::<DroneEvent, rkyv::rancor::Error>)
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Encode(e.to_string()))?;
            let part = TelemetryBatch::encode(meta, &owned, Buffer::with_capacity(64 + owned.len() * 64))?;
            parts.push((shard, id(shard), Bytes::from_owner(part.into_buffer())));
        }
        Ok(parts)
    }

    /// Logs a command on its drone's shard and waits for the owning shard's answer.
    pub async fn command(&self, cmd: DeliveryCommand, trace: TraceContext) -> Result<(), Error> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let shard = shard_of(cmd.drone_id(), self.shards);
        let payload = serde_json::to_vec(&cmd).map_err(|e| Error::Encode(e.to_string()))?;
        let id = self.next_reply.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let mut publish = jetstream::context::Publish::build()
            .payload(payload.into())
            .header(KIND, COMMAND)
            .header(REPLY, format!("{}.{id}", self.reply_prefix).as_str());
        if trace.is_some() {
            publish = publish.header(TRACEPARENT, trace.to_header().as_str());
        }
        let sent = async {
            self.js
                .send_publish(self.telemetry.subject(shard), publish)
                .await
                .map_err(storage_error)?
                .await
                .map_err(storage_error)
        }
        .await;
        if let Err(e) = sent {
            self.pending.lock().remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => {
                self.pending.lock().remove(&id);
                Err(Error::Storage(format!(
                    "no node answered for shard {shard} within {} s; the command is logged and will be applied \
                     when a node owns the shard",
                    COMMAND_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// Publishes derived delivery events, one message each, and returns once JetStream has them
    /// all. Retries until it succeeds or the node stops: derived events must not be dropped,
    /// and waiting here holds the shards back instead. Called from the publisher thread.
    pub(crate) fn publish_deliveries(&self, derived: &[events::DeliveryEvent]) {
        let messages = self.delivery_messages(derived);
        if messages.is_empty() {
            return;
        }
        let mut delay = Duration::from_millis(50);
        let mut attempts = 0;
        loop {
            attempts += 1;
            // Handed over one after another, so a delivery's events are stored in order.
            let publish_all = async {
                let mut acks = Vec::with_capacity(messages.len());
                for (subject, id, bytes) in &messages {
                    let publish = jetstream::context::Publish::build().payload(bytes.clone()).message_id(id);
                    acks.push(self.js.send_publish(subject.clone(), publish).await.map_err(storage_error)?);
                }
                try_join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await.map_err(storage_error)
            };
            match self.handle.block_on(publish_all) {
                Ok(acks) => {
                    for ack in &acks {
                        self.ends[1].fetch_max(ack.sequence, Ordering::AcqRel);
                    }
                    self.metrics.delivery_events.fetch_add(acks.len() as u64, Ordering::Relaxed);
                    return;
                }
                Err(error) if !self.stopping.load(Ordering::Acquire) || attempts < 3 => {
                    warn!(%error, "publishing delivery events failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(error) => {
                    warn!(%error, events = messages.len(), "giving up publishing delivery events at shutdown");
                    return;
                }
            }
        }
    }

    /// One message per derived event: (subject, message id, a batch of that one event).
    fn delivery_messages(&self, derived: &[events::DeliveryEvent]) -> Vec<(String, String, Bytes)> {
        let mut out = Vec::with_capacity(derived.len());
        for ev in derived {
            let shard = shard_of(ev.drone_id, self.shards);
            let one = std::slice::from_ref(ev);
            match DeliveryBatch::encode(events::BatchMeta::default(), one, Buffer::with_capacity(256)) {
                Ok(one) => out.push((
                    self.deliveries.subject(shard),
                    format!("{}-{}", ev.delivery_id, ev.seq),
                    Bytes::from_owner(one.into_buffer()),
                )),
                Err(error) => warn!(%error, "encoding a delivery event failed"),
            }
        }
        out
    }

    /// A drone's live state from the node that runs its shard; `None` when the drone never
    /// reported, or when no node answers within a second (while a shard changes hands nobody
    /// runs it for a moment: the question is asked again until then).
    pub(crate) async fn drone(&self, id: events::DroneId) -> Result<Option<events::DroneSnapshot>, Error> {
        let subject = self.drone_subject(shard_of(id, self.shards));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let asked = self.client.request(subject.clone(), id.to_string().into());
            match tokio::time::timeout_at(deadline, asked).await {
                Ok(Ok(answer)) => {
                    return serde_json::from_slice(&answer.payload)
                        .map_err(|e| storage_error(format!("drone answer: {e}")));
                }
                Ok(Err(error)) if tokio::time::Instant::now() + Duration::from_millis(50) < deadline => {
                    debug!(drone = id, %error, "no node answered for a drone yet");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Err(_)) | Err(_) => return Ok(None),
            }
        }
    }

    /// Waits until some node answers promptly for every shard, or `timeout`; whether all did.
    /// After a restart a shard is nobody's until its lease is taken again and its state
    /// restored, and then its owner replays the shard's subject from the checkpoint: a question
    /// waits behind that replay, so a prompt answer (within 250 ms) means the shard has caught
    /// up. The services start after this, so their first look at the fleet sees it as it is.
    pub async fn wait_until_served(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for shard in 0..self.shards {
            // Any drone id of the shard asks it (an unknown one is answered "never reported").
            let Some(probe) = (0..u64::from(u32::MAX)).find(|id| shard_of(*id, self.shards) == shard) else {
                continue;
            };
            loop {
                let asked = self.client.request(self.drone_subject(shard), probe.to_string().into());
                match tokio::time::timeout(Duration::from_millis(250), asked).await {
                    Ok(Ok(_)) => break,
                    _ if tokio::time::Instant::now() >= deadline => return false,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        true
    }

    /// Stores a shard's checkpoint, if this node still owns the shard. Called from its thread.
    ///
    /// The write expects the revision this node last read or wrote, so a node that lost the
    /// shard without noticing yet (a stalled process whose lease ran out) cannot overwrite the
    /// new owner's checkpoint: its write is refused and the shard is marked not owned.
    pub(crate) fn put_checkpoint(&self, ckpt: &Checkpoint) -> Result<bool, crate::Error> {
        let shard = ckpt.shard as usize;
        if !self.owns(shard) {
            return Ok(false);
        }
        let bytes = Bytes::from(checkpoint::encode(ckpt)?);
        let key = format!("shard-{shard}");
        let expected = self.ckpt_revisions[shard].load(Ordering::Acquire);
        let written = self.handle.block_on(async {
            if expected == 0 {
                self.checkpoints.create(&key, bytes).await.map_err(js_error)
            } else {
                self.checkpoints.update(&key, bytes, expected).await.map_err(js_error)
            }
        });
        match written {
            Ok(revision) => {
                self.ckpt_revisions[shard].store(revision, Ordering::Release);
                Ok(true)
            }
            Err(error) => {
                warn!(shard, %error, "the shard's checkpoint changed under this node: another node owns it now");
                self.owned[shard].store(false, Ordering::Release);
                Ok(false)
            }
        }
    }

    /// Reserves `n` delivery ids in the counter every node shares (the `delivery-ids` entry of
    /// the checkpoints bucket, updated by compare-and-swap); returns the first.
    pub async fn reserve_ids(&self, n: u64) -> Result<u64, crate::Error> {
        const KEY: &str = "delivery-ids";
        for _ in 0..100 {
            let entry = self.checkpoints.entry(KEY).await.map_err(js_error)?;
            let entry = entry.filter(|e| e.operation == kv::Operation::Put);
            let (first, revision) = match &entry {
                Some(e) => {
                    let bytes: [u8; 8] = e.value.as_ref().try_into().map_err(|_| {
                        crate::Error::JetStream(format!("the {KEY} entry is not a counter ({} bytes)", e.value.len()))
                    })?;
                    (u64::from_le_bytes(bytes), Some(e.revision))
                }
                None => (services::ids::counter_start(), None),
            };
            let next = Bytes::copy_from_slice(&(first + n).to_le_bytes());
            let written = match revision {
                Some(revision) => self.checkpoints.update(KEY, next, revision).await.map(|_| ()).map_err(js_error),
                None => self.checkpoints.create(KEY, next).await.map(|_| ()).map_err(js_error),
            };
            if written.is_ok() {
                return Ok(first);
            }
            // Another node reserved in between: read again.
        }
        Err(crate::Error::JetStream("could not reserve delivery ids: the counter kept changing".into()))
    }

    /// A shard's checkpoint (if any, and made with this shard count), remembering its revision
    /// for the next write.
    async fn read_checkpoint(&self, shard: usize) -> Result<Option<Checkpoint>, crate::Error> {
        let key = format!("shard-{shard}");
        let entry = self.checkpoints.entry(&key).await.map_err(js_error)?;
        let entry = entry.filter(|e| e.operation == kv::Operation::Put);
        self.ckpt_revisions[shard].store(entry.as_ref().map_or(0, |e| e.revision), Ordering::Release);
        match entry {
            None => Ok(None),
            Some(entry) => {
                let ckpt = checkpoint::decode(&entry.value, std::path::Path::new(&key))?;
                Ok((ckpt.shards as usize == self.shards).then_some(ckpt))
            }
        }
    }

    /// Stores a named cursor for every node to see (in the background: the local store already
    /// has it).
    pub(crate) fn put_cursor(&self, topic: StreamTopic, name: &str, cursor: crate::cursor::Cursor) {
        let Ok(value) = serde_json::to_vec(&cursor) else { return };
        let (store, key) = (self.cursors.clone(), format!("{}.{name}", topic.name()));
        self.handle.spawn(async move {
            if let Err(error) = store.put(&key, value.into()).await {
                warn!(%error, key, "could not share a cursor commit");
            }
        });
    }

    /// Loads every node's named cursors into `local`, then keeps taking their commits as they
    /// happen, so a subscriber resumes under its name on whichever node it reconnects to.
    pub async fn share_cursors(&self, local: Arc<crate::cursor::CursorStore>) -> Result<(), crate::Error> {
        fn apply(local: &crate::cursor::CursorStore, key: &str, value: &[u8]) {
            let Some((topic, name)) = key.split_once('.') else { return };
            let (Some(topic), Ok(cursor)) = (StreamTopic::from_name(topic), serde_json::from_slice(value)) else {
                return;
            };
            local.merge(topic, name, cursor);
        }
        // The watch starts before the current values are read, so no commit falls between.
        let mut watch = self.cursors.watch_all().await.map_err(js_error)?;
        let mut keys = self.cursors.keys().await.map_err(js_error)?;
        while let Some(key) = keys.next().await {
            let key = key.map_err(js_error)?;
            if let Some(value) = self.cursors.get(&key).await.map_err(js_error)? {
                apply(&local, &key, &value);
            }
        }
        let task = self.handle.spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                if entry.operation == kv::Operation::Put {
                    apply(&local, &entry.key, &entry.value);
                }
            }
        });
        self.tasks.lock().push(task);
        Ok(())
    }

    /// Starts the lease keeper and the live followers of both topics.
    pub(crate) fn start(
        self: &Arc<Self>,
        shards: Vec<flume::Sender<ShardMsg>>,
        telemetry: Arc<Topic<DroneEvent>>,
        deliveries: Arc<Topic<events::DeliveryEvent>>,
    ) -> Result<(), crate::Error> {
        let (stop_tx, stop_rx) = oneshot::channel();
        *self.stop_leases.lock() = Some(stop_tx);
        let keeper = Keeper { cluster: self.clone(), shards, held: FxHashMap::default(), started: false };
        let task = self.handle.spawn(keeper.run(stop_rx));
        self.tasks.lock().push(task);
        self.spawn_follower(telemetry, StreamTopic::DroneTelemetry)?;
        self.spawn_follower(deliveries, StreamTopic::DeliveryEvents)?;
        Ok(())
    }

    fn spawn_follower<T: Payload>(
        self: &Arc<Self>,
        topic: Arc<Topic<T>>,
        which: StreamTopic,
    ) -> Result<(), crate::Error> {
        // Reading is a task (it goes with the runtime, and its timers with it); publishing is a
        // thread, since a subscriber that blocks may hold it up. A bounded channel joins them.
        let (tx, rx) = flume::bounded::<Arc<events::wire::Batch<T>>>(crate::engine::FOLLOW_QUEUE);
        let publishing = topic.clone();
        std::thread::Builder::new().name(format!("js-follow-{}", topic_index(which))).spawn(move || {
            while let Ok(batch) = rx.recv() {
                publishing.publish(batch);
            }
        })?;
        let cluster = Arc::downgrade(self);
        let task = self.handle.spawn(async move {
            // Reading costs the broker as much as writing; with no live subscriber there is
            // nothing to read for. Waking for one, reading starts a little before now, so a
            // subscriber sees at least everything published after it subscribed.
            loop {
                loop {
                    let Some(cluster) = cluster.upgrade() else { return };
                    if cluster.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    if topic.subscribers() > 0 {
                        break;
                    }
                    drop(cluster);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let since = time::OffsetDateTime::now_utc() - Duration::from_millis(250);
                let Some(c) = cluster.upgrade() else { return };
                let mut messages = match c.reader(which, DeliverPolicy::ByStartTime { start_time: since }, None).await {
                    Ok(m) => m,
                    Err(error) => {
                        warn!(%error, "following a JetStream topic failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                drop(c);
                loop {
                    // Wakes at least twice a second to notice the node stopping.
                    let next = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
                    let Some(cluster) = cluster.upgrade() else { return };
                    if cluster.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    if topic.subscribers() == 0 {
                        break;
                    }
                    let msg = match next {
                        Err(_) | Ok(Some(Err(_))) => continue,
                        Ok(None) => break,
                        Ok(Some(Ok(msg))) => msg,
                    };
                    let Some((offset, batch)) = cluster.decode::<T>(&msg) else { continue };
                    cluster.ends[topic_index(which)].fetch_max(offset + 1, Ordering::AcqRel);
                    drop(cluster);
                    if tx.send_async(Arc::new(batch)).await.is_err() {
                        return;
                    }
                }
            }
        });
        self.tasks.lock().push(task);
        Ok(())
    }

    async fn reader(
        &self,
        which: StreamTopic,
        deliver_policy: DeliverPolicy,
        shard: Option<usize>,
    ) -> Result<jetstream::consumer::pull::Ordered, crate::Error> {
        self.topic(which).ordered(deliver_policy, shard).await
    }

    /// A batch message's offset and batch; `None` (and counted) for commands and anything
    /// invalid.
    fn decode<T: Payload>(&self, msg: &jetstream::Message) -> Option<(u64, events::wire::Batch<T>)> {
        if is_command(msg.headers.as_ref()) {
            return None;
        }
        let offset = msg.info().ok()?.stream_sequence.saturating_sub(1);
        match events::wire::Batch::<T>::validate(buffer_from(&msg.payload), &unlimited()) {
            Ok(batch) => Some((offset, batch)),
            Err(error) => {
                self.metrics.invalid.fetch_add(1, Ordering::Relaxed);
                warn!(%error, offset, "skipping an invalid message on a topic");
                None
            }
        }
    }

    /// An offset subscription read straight from JetStream: batches in stream order with their
    /// offsets. Blocks the caller for one round trip to resolve where it starts.
    pub(crate) fn follow<T: Payload>(
        self: &Arc<Self>,
        which: StreamTopic,
        from: StartAt,
    ) -> Result<events::OffsetSubscription<T>, Error> {
        let (tx, rx) = flume::bounded::<LogItem<T>>(crate::engine::FOLLOW_QUEUE);
        let stream = self.topic(which).stream().clone();
        // Where it starts is answered before returning. `block_in_place` lets a runtime worker
        // wait for it without holding up the tasks queued behind it.
        let start = tokio::task::block_in_place(|| self.handle.block_on(start_of::<T>(stream, from)))?;
        let cluster = self.clone();
        // The reading is a task, not a thread: it goes with the runtime, and its timers with it.
        self.handle.spawn(async move {
            let policy = DeliverPolicy::ByStartSequence { start_sequence: start + 1 };
            let mut messages = match cluster.reader(which, policy, None).await {
                Ok(m) => m,
                Err(e) => {
                    let _ = tx.send_async(Err(storage_error(e))).await;
                    return;
                }
            };
            loop {
                let next = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
                if tx.is_disconnected() {
                    return;
                }
                if cluster.stopping.load(Ordering::Acquire) {
                    let _ = tx.send_async(Err(Error::ShuttingDown)).await;
                    return;
                }
                match next {
                    Err(_) => continue,
                    Ok(None) => {
                        let _ = tx.send_async(Err(Error::Storage("the JetStream reader ended".into()))).await;
                        return;
                    }
                    Ok(Some(Err(error))) => debug!(%error, "JetStream reader hiccup"),
                    Ok(Some(Ok(msg))) => {
                        if let Some((offset, batch)) = cluster.decode::<T>(&msg)
                            && tx.send_async(Ok((offset, Arc::new(batch)))).await.is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Ok(events::OffsetSubscription { start, rx })
    }

    /// Hands every shard back (after a checkpoint) and stops the followers and readers. The
    /// shard threads must still be running.
    pub async fn stop(&self) {
        let stop = self.stop_leases.lock().take();
        if let Some(stop) = stop {
            let (done_tx, done_rx) = oneshot::channel();
            if stop.send(done_tx).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(10), done_rx).await;
            }
        }
        self.stopping.store(true, Ordering::Release);
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
        let _ = self.client.flush().await;
    }
}

/// The offset a subscription from `from` starts at: checked against what the stream holds.
async fn start_of<T: Payload>(mut stream: jetstream::stream::Stream, from: StartAt) -> Result<u64, Error> {
    let info = stream.info().await.map_err(storage_error)?;
    let (first, next) = (info.state.first_sequence.saturating_sub(1), info.state.last_sequence);
    let first = first.min(next);
    match from {
        StartAt::Earliest => Ok(first),
        StartAt::Latest => Ok(next),
        StartAt::Offset(o) if o < first || o > next => Err(Error::OffsetUnavailable { requested: o, first, next }),
        StartAt::Offset(o) => Ok(o),
        StartAt::Time(us) => offset_at_time::<T>(&stream, first, next, us).await,
    }
}

/// The first offset whose batch was created at or after `t_us` (by the creation time of its
/// first event, as the embedded log answers it), or `end` when there is none: a binary search
/// over the stream that reads a handful of messages.
async fn offset_at_time<T: Payload>(
    stream: &jetstream::stream::Stream,
    first: u64,
    end: u64,
    t_us: u64,
) -> Result<u64, Error> {
    let (mut lo, mut hi) = (first, end);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let mut found = None;
        for offset in mid..hi {
            let msg = stream.get_raw_message(offset + 1).await.map_err(storage_error)?;
            if is_command(Some(&msg.headers)) {
                continue;
            }
            let created = events::wire::Batch::<T>::validate(buffer_from(&msg.payload), &unlimited())
                .ok()
                .and_then(|b| b.first_created_us());
            if let Some(created) = created {
                found = Some((offset, created));
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

fn topic_index(topic: StreamTopic) -> usize {
    match topic {
        StreamTopic::DroneTelemetry => 0,
        StreamTopic::DeliveryEvents => 1,
    }
}

fn is_command(headers: Option<&HeaderMap>) -> bool {
    headers.and_then(|h| h.get(KIND)).is_some_and(|v| v.as_str() == COMMAND)
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers.and_then(|h| h.get(name)).map(|v| v.as_str())
}

fn encode_reply(result: &Result<(), Error>) -> Bytes {
    match result {
        Ok(()) => Bytes::from_static(b"0"),
        Err(e) => Bytes::from(format!("{}:{e}", e.code())),
    }
}

fn decode_reply(payload: &[u8]) -> Result<(), Error> {
    let text = String::from_utf8_lossy(payload);
    match text.split_once(':') {
        None if text == "0" => Ok(()),
        Some((code, message)) => Err(Error::from_wire(code.parse().unwrap_or(0), message.to_string())),
        None => Err(Error::Storage(format!("unreadable command answer {text:?}"))),
    }
}

/// One shard this node holds: its lease revision and the task feeding it.
struct Held {
    revision: u64,
    feed: tokio::task::JoinHandle<()>,
    /// Answers other nodes' questions about this shard's drones.
    queries: tokio::task::JoinHandle<()>,
}

/// The lease keeper: one task per node that renews, takes and hands back shards.
struct Keeper {
    cluster: Arc<Cluster>,
    shards: Vec<flume::Sender<ShardMsg>>,
    held: FxHashMap<usize, Held>,
    /// Whether the first round ran (it takes back the shards whose leases name this node).
    started: bool,
}

impl Keeper {
    async fn run(mut self, mut stop: oneshot::Receiver<oneshot::Sender<()>>) {
        let tick = self.cluster.lease / 3;
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                done = &mut stop => {
                    let shards: Vec<usize> = self.held.keys().copied().collect();
                    for shard in shards {
                        self.hand_back(shard).await;
                    }
                    let _ = self.cluster.leases.delete(format!("node.{}", self.cluster.node)).await;
                    if let Ok(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                _ = interval.tick() => {
                    if let Err(error) = self.round().await {
                        warn!(%error, "shard lease round failed");
                    }
                }
            }
        }
    }

    /// One round: announce this node, renew what it holds, then balance towards a fair share.
    async fn round(&mut self) -> Result<(), crate::Error> {
        let c = self.cluster.clone();
        c.leases.put(format!("node.{}", c.node), Bytes::from_static(b"up")).await.map_err(js_error)?;
        let held: Vec<(usize, u64)> = self.held.iter().map(|(s, h)| (*s, h.revision)).collect();
        for (shard, revision) in held {
            match c.leases.update(format!("shard-{shard}"), Bytes::from(c.node.clone()), revision).await {
                Ok(revision) => {
                    if let Some(h) = self.held.get_mut(&shard) {
                        h.revision = revision;
                    }
                }
                Err(error) => {
                    warn!(shard, %error, "lost the lease on a shard");
                    c.metrics.lost.fetch_add(1, Ordering::Relaxed);
                    self.drop_shard(shard);
                }
            }
        }
        let mut nodes = 0usize;
        let mut keys = c.leases.keys().await.map_err(js_error)?;
        while let Some(key) = keys.next().await {
            if key.map_err(js_error)?.starts_with("node.") {
                nodes += 1;
            }
        }
        let fair = c.shards.div_ceil(nodes.max(1));
        // Where each topic ends, for cursor lag: every node's appends, not only this one's.
        for (end, stream) in c.ends.iter().zip([c.telemetry.stream(), c.deliveries.stream()]) {
            let mut stream = stream.clone();
            if let Ok(info) = stream.info().await {
                end.fetch_max(info.state.last_sequence, Ordering::AcqRel);
            }
        }
        if self.held.len() > fair {
            let mut extra: Vec<usize> = self.held.keys().copied().collect();
            extra.sort_unstable();
            for shard in extra.into_iter().rev().take(self.held.len() - fair) {
                self.hand_back(shard).await;
            }
        }
        for shard in 0..c.shards {
            if self.held.len() >= fair {
                break;
            }
            if self.held.contains_key(&shard) {
                continue;
            }
            let key = format!("shard-{shard}");
            let mut taken = c.leases.create(&key, Bytes::from(c.node.clone())).await.ok();
            if taken.is_none() && !self.started {
                // A lease naming this node at start is its previous run's (a node name is one
                // data directory's, which one process holds at a time): taken back at once.
                if let Ok(Some(entry)) = c.leases.entry(&key).await
                    && entry.value == c.node.as_bytes()
                {
                    taken = c.leases.update(&key, Bytes::from(c.node.clone()), entry.revision).await.ok();
                }
            }
            if let Some(revision) = taken
                && let Err(error) = self.take(shard, revision).await
            {
                warn!(shard, %error, "taking over a shard failed; handing it back");
                let _ = c.leases.delete(format!("shard-{shard}")).await;
            }
        }
        self.started = true;
        Ok(())
    }

    /// Restores the shard from its checkpoint and starts feeding it from the record after.
    async fn take(&mut self, shard: usize, revision: u64) -> Result<(), crate::Error> {
        let c = self.cluster.clone();
        let started = Instant::now();
        let ckpt = c.read_checkpoint(shard).await?;
        // The last offset the checkpoint covers: the feed starts at the record after it.
        let covered = ckpt.as_ref().map(|ck| ck.offset);
        let (done_tx, done_rx) = oneshot::channel();
        self.shards[shard]
            .send_async(ShardMsg::Restore { ckpt, done: done_tx })
            .await
            .map_err(|_| crate::Error::Task("shard thread stopped".into()))?;
        let _ = done_rx.await;
        c.owned[shard].store(true, Ordering::Release);
        c.metrics.owned.fetch_add(1, Ordering::Relaxed);
        c.metrics.acquired.fetch_add(1, Ordering::Relaxed);
        let feed = tokio::spawn(feed(c.clone(), shard, covered, self.shards[shard].clone()));
        let questions = c.client.subscribe(c.drone_subject(shard)).await.map_err(js_error)?;
        let queries = tokio::spawn(answer_drone_queries(c.client.clone(), questions, self.shards[shard].clone()));
        self.held.insert(shard, Held { revision, feed, queries });
        info!(
            shard,
            from = covered.map_or(0, |c| c + 1),
            restore_ms = started.elapsed().as_millis() as u64,
            "took over a shard"
        );
        Ok(())
    }

    /// Stops feeding a shard whose lease is gone (no checkpoint: it is not ours any more).
    fn drop_shard(&mut self, shard: usize) {
        if let Some(h) = self.held.remove(&shard) {
            h.feed.abort();
            h.queries.abort();
            self.cluster.owned[shard].store(false, Ordering::Release);
            self.cluster.metrics.owned.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Stops feeding a shard, checkpoints what it applied and frees the lease for another node.
    async fn hand_back(&mut self, shard: usize) {
        let Some(h) = self.held.remove(&shard) else { return };
        h.feed.abort();
        h.queries.abort();
        let (done_tx, done_rx) = oneshot::channel();
        if self.shards[shard].send_async(ShardMsg::Checkpoint { done: done_tx }).await.is_ok() {
            let _ = done_rx.await;
        }
        self.cluster.owned[shard].store(false, Ordering::Release);
        self.cluster.metrics.owned.fetch_sub(1, Ordering::Relaxed);
        let _ = self.cluster.leases.delete(format!("shard-{shard}")).await;
        info!(shard, "handed a shard back");
    }
}

/// Answers `<prefix>.drone.<shard>` requests (a drone id) with the shard's snapshot of that
/// drone (JSON, `null` when it knows none), for the nodes that do not run the shard.
async fn answer_drone_queries(
    client: async_nats::Client,
    mut questions: async_nats::Subscriber,
    shard: flume::Sender<ShardMsg>,
) {
    while let Some(question) = questions.next().await {
        let Some(reply_to) = question.reply.clone() else { continue };
        let Some(id) = std::str::from_utf8(&question.payload).ok().and_then(|t| t.parse().ok()) else { continue };
        let (reply, rx) = oneshot::channel();
        if shard.send_async(ShardMsg::Drone { id, reply }).await.is_err() {
            return;
        }
        let snapshot = rx.await.ok().flatten();
        let Ok(answer) = serde_json::to_vec(&snapshot) else { continue };
        let _ = client.publish(reply_to, answer.into()).await;
    }
}

/// Feeds one owned shard from its subject, starting at the record after `covered` (the last
/// offset its checkpoint reflects; `None`: from the first), until aborted.
async fn feed(cluster: Arc<Cluster>, shard: usize, covered: Option<u64>, tx: flume::Sender<ShardMsg>) {
    let mut next = covered.map_or(0, |o| o + 1);
    loop {
        let policy =
            if next == 0 { DeliverPolicy::All } else { DeliverPolicy::ByStartSequence { start_sequence: next + 1 } };
        let mut messages = match cluster.reader(StreamTopic::DroneTelemetry, policy, Some(shard)).await {
            Ok(m) => m,
            Err(error) => {
                warn!(shard, %error, "reading a shard from JetStream failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(msg) = messages.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(error) => {
                    warn!(shard, %error, "shard reader error; reopening");
                    break;
                }
            };
            let Ok(info) = msg.info() else { continue };
            let offset = info.stream_sequence.saturating_sub(1);
            next = offset + 1;
            let Some(item) = shard_msg(&cluster, &msg, offset) else { continue };
            if tx.send_async(item).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a message on a shard subject asks the shard to do.
fn shard_msg(cluster: &Arc<Cluster>, msg: &jetstream::Message, offset: u64) -> Option<ShardMsg> {
    let headers = msg.headers.as_ref();
    if !is_command(headers) {
        return match TelemetryBatch::validate(buffer_from(&msg.payload), &unlimited()) {
            Ok(batch) => Some(ShardMsg::Events { offset, batch: Arc::new(batch), indices: None, received: None }),
            Err(error) => {
                cluster.metrics.invalid.fetch_add(1, Ordering::Relaxed);
                warn!(%error, offset, "skipping an invalid batch on a shard subject");
                None
            }
        };
    }
    let cmd: DeliveryCommand = match serde_json::from_slice(&msg.payload) {
        Ok(cmd) => cmd,
        Err(error) => {
            cluster.metrics.invalid.fetch_add(1, Ordering::Relaxed);
            warn!(%error, offset, "skipping an invalid command on a shard subject");
            return None;
        }
    };
    let trace = header(headers, TRACEPARENT).and_then(TraceContext::parse).unwrap_or_default();
    let reply = header(headers, REPLY).map(str::to_string).map(|subject| {
        let (tx, rx) = oneshot::channel::<Result<(), Error>>();
        let client = cluster.client.clone();
        tokio::spawn(async move {
            if let Ok(result) = rx.await {
                let _ = client.publish(subject, encode_reply(&result)).await;
            }
        });
        tx
    });
    Some(ShardMsg::Command { offset, cmd, reply, trace })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip() {
        assert_eq!(decode_reply(&encode_reply(&Ok(()))), Ok(()));
        let err = Error::DroneBusy { drone: 3, delivery: 9 };
        match decode_reply(&encode_reply(&Err(err.clone()))) {
            Err(Error::Rejected { code, name, message }) => {
                assert_eq!(code, err.code());
                assert_eq!(name, err.name());
                assert_eq!(message, err.to_string());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(decode_reply(b"garbage"), Err(Error::Storage(_))));
    }
}

/// Delivery ids from the counter the nodes share in JetStream (see [`services::ids`]).
#[derive(Debug)]
pub struct ClusterIdBlocks(pub Arc<Cluster>);

impl services::ids::IdBlocks for ClusterIdBlocks {
    fn reserve(
        &self,
        n: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, services::Error>> + Send + '_>> {
        Box::pin(async move {
            self.0
                .reserve_ids(n)
                .await
                .map_err(|e| services::Error::Dependency { service: "delivery-ids", reason: e.to_string() })
        })
    }
}
