//! NATS JetStream building blocks: the topic streams (which the JetStream backend of the engine,
//! [`crate::cluster`], writes and reads) and the work queues of the queue path.
//!
//! A topic is one JetStream stream (`FLEETSTREAM_TELEMETRY`, `FLEETSTREAM_DELIVERIES`) whose
//! subjects are partitioned by shard (`fleetstream.telemetry.<shard>`). Each batch is one
//! message carrying its wire bytes unchanged, so readers validate and read it in place as they
//! do a local log record. The message id (`Nats-Msg-Id`) is the batch's producer id and batch
//! sequence, so JetStream's duplicate window drops a re-sent batch and says so
//! ([`Appended::duplicate`]); an append returns only once JetStream has acknowledged it.
//! Retention is by age and size from [`JetStreamConfig`]. Readers start where a local log
//! subscriber can: earliest, latest, an offset (offset = stream sequence − 1) or a time.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, stream::StorageType};
use bytes::Bytes;
use events::{BatchMeta, StartAt, Topic};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::BoxFuture;
use crate::Error;
use crate::queue::DeadLetter;
use crate::queue::backend::QueueBackend;

pub mod durability;
pub mod keyed;

fn js_error(e: impl std::fmt::Display) -> Error {
    Error::JetStream(e.to_string())
}

/// `[jetstream]`: where the broker is and how topics are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// NATS server URL. Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// Stream name prefix (`<prefix>_TELEMETRY`, ...). Default `FLEETSTREAM`.
    pub stream_prefix: String,
    /// Subject prefix (`<prefix>.telemetry.<shard>`). Default `fleetstream`.
    pub subject_prefix: String,
    /// Keep batches this long, seconds. Default 86,400, as the local log.
    pub max_age_s: u64,
    /// Keep at most this many bytes per topic; 0: no cap. Default 0.
    pub max_bytes: u64,
    /// Re-sends of a batch within this window are dropped, seconds. Default 120: longer than
    /// any client's retry of an unanswered batch.
    pub duplicate_window_s: u64,
    /// Replicas of each stream (1 on one server; 3 on a cluster). Default 1.
    pub replicas: usize,
    /// Queues kept on JetStream instead of the local journal: `notifications` (competing
    /// consumers) and `drone-commands` (each drone session holds its keys; see [`keyed`]).
    /// Default none.
    pub queues: Vec<String>,
    /// With `[log] backend = "jetstream"`: this node's name in the shard leases. Default empty:
    /// `pipeline serve` uses the host name and a name kept in its data directory, so a node
    /// restarted there takes its shards back at once (its previous run's leases name it); a
    /// name configured here must be one node's alone.
    pub node_id: String,
    /// With `[log] backend = "jetstream"`: a node that stops renewing its shard leases loses
    /// them after this long, ms, and the other nodes take the shards over. Default 3000: a
    /// dead node's shards move within a few seconds, while a GC-free process on a loaded
    /// machine still renews (every third of it) with a wide margin.
    pub lease_ms: u64,
    /// The NATS server's monitoring endpoint (`http://host:8222`), read at start to learn
    /// whether JetStream syncs a write before acknowledging it (see [`durability`]). Default
    /// none: that stays unknown, and the node warns.
    pub monitor_url: Option<String>,
    /// Refuse to start unless a JetStream acknowledgement is known to mean "on disk" (file
    /// storage, and the server's `sync_interval: always`). Default false: the node warns.
    pub require_sync: bool,
    /// TLS to NATS. Default none: TLS only when the URL is `tls://` or the server asks for
    /// it, verified against the system's roots.
    pub tls: Option<NatsTls>,
}

/// `[jetstream.tls]`: TLS to the NATS server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsTls {
    /// Refuse a server that does not speak TLS. Default true.
    pub required: bool,
    /// CA certificates (PEM) the server's certificate is checked against.
    pub ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM) for servers that verify clients (`verify: true`); needs
    /// `key`.
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<std::path::PathBuf>,
}

/// Connects to NATS as `cfg` says (its URL, and TLS as `[jetstream.tls]` says).
pub async fn connect(cfg: &JetStreamConfig) -> Result<async_nats::Client, Error> {
    let mut options = async_nats::ConnectOptions::new();
    if let Some(tls) = &cfg.tls {
        options = options.require_tls(tls.required);
        if let Some(ca) = &tls.ca {
            if !ca.exists() {
                return Err(js_error(format!("[jetstream.tls] ca = {}: no such file", ca.display())));
            }
            options = options.add_root_certificates(ca.clone());
        }
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => options = options.add_client_certificate(cert.clone(), key.clone()),
            (None, None) => {}
            _ => return Err(js_error("[jetstream.tls] cert and key go together")),
        }
    }
    options.connect(&cfg.url).await.map_err(|e| js_error(format!("connecting to NATS at {}: {e}", cfg.url)))
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream_prefix: "FLEETSTREAM".into(),
            subject_prefix: "fleetstream".into(),
            max_age_s: 86_400,
            max_bytes: 0,
            duplicate_window_s: 120,
            replicas: 1,
            queues: Vec::new(),
            node_id: String::new(),
            lease_ms: 3000,
            monitor_url: None,
            require_sync: false,
            tls: None,
        }
    }
}

fn topic_name(topic: Topic) -> &'static str {
    match topic {
        Topic::DroneTelemetry => "telemetry",
        Topic::DeliveryEvents => "deliveries",
    }
}

/// The stream of a topic (`telemetry`, `deliveries`): `<stream_prefix>_<NAME>` on
/// `<subject_prefix>.<name>.*`, file storage, retention and duplicate window from `cfg`.
pub(crate) fn topic_stream_config(cfg: &JetStreamConfig, name: &str) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: format!("{}_{}", cfg.stream_prefix, name.to_uppercase()),
        subjects: vec![format!("{}.{name}.*", cfg.subject_prefix)],
        max_age: Duration::from_secs(cfg.max_age_s),
        max_bytes: if cfg.max_bytes == 0 { -1 } else { i64::try_from(cfg.max_bytes).unwrap_or(i64::MAX) },
        duplicate_window: Duration::from_secs(cfg.duplicate_window_s),
        num_replicas: cfg.replicas.max(1),
        storage: StorageType::File,
        ..Default::default()
    }
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The batch's offset in the topic (stream sequence − 1).
    pub offset: u64,
    /// JetStream had it already (a re-send inside the duplicate window): nothing was added.
    pub duplicate: bool,
}

/// One topic on JetStream.
#[derive(Debug, Clone)]
pub struct JetStreamTopic {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    subject_prefix: String,
}

impl JetStreamTopic {
    /// Creates the topic's stream if it does not exist (and otherwise uses it as it is).
    pub async fn open(client: &async_nats::Client, topic: Topic, cfg: &JetStreamConfig) -> Result<Self, Error> {
        Self::open_with(jetstream::new(client.clone()), topic, cfg).await
    }

    /// [`JetStreamTopic::open`] on a context of the caller's (its timeouts apply).
    pub(crate) async fn open_with(js: jetstream::Context, topic: Topic, cfg: &JetStreamConfig) -> Result<Self, Error> {
        let name = topic_name(topic);
        let subject_prefix = format!("{}.{name}", cfg.subject_prefix);
        let stream = js
            .get_or_create_stream(topic_stream_config(cfg, name))
            .await
            .map_err(|e| Error::JetStream(format!("creating the stream for {name}: {e}")))?;
        Ok(Self { js, stream, subject_prefix })
    }

    /// The stream.
    pub(crate) fn stream(&self) -> &jetstream::stream::Stream {
        &self.stream
    }

    /// `shard`'s subject.
    pub(crate) fn subject(&self, shard: usize) -> String {
        format!("{}.{shard}", self.subject_prefix)
    }

    /// The message id of `shard`'s part of a batch: a re-send of it is dropped by JetStream.
    pub(crate) fn batch_id(meta: BatchMeta, shard: usize) -> String {
        format!("{}-{}-{shard}", meta.producer_id, meta.batch_seq)
    }

    /// An ordered reader of the topic (or of one shard's subject) from `deliver_policy`.
    pub(crate) async fn ordered(
        &self,
        deliver_policy: DeliverPolicy,
        shard: Option<usize>,
    ) -> Result<jetstream::consumer::pull::Ordered, Error> {
        let filter_subject = match shard {
            Some(s) => self.subject(s),
            None => format!("{}.*", self.subject_prefix),
        };
        let consumer = self
            .stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy,
                filter_subject,
                ..Default::default()
            })
            .await
            .map_err(js_error)?;
        consumer.messages().await.map_err(js_error)
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream.cached_info().config.name
    }

    /// Appends one batch (its wire bytes) on `shard`'s subject; resolves once JetStream has
    /// stored it (or recognised it as a re-send).
    pub async fn append(&self, shard: u32, meta: BatchMeta, bytes: Bytes) -> Result<Appended, Error> {
        let publish =
            jetstream::context::Publish::build().payload(bytes).message_id(Self::batch_id(meta, shard as usize));
        let ack = self
            .js
            .send_publish(self.subject(shard as usize), publish)
            .await
            .map_err(js_error)?
            .await
            .map_err(js_error)?;
        Ok(Appended { offset: ack.sequence.saturating_sub(1), duplicate: ack.duplicate })
    }

    /// Reads the topic from `from`, every shard, in order.
    pub async fn read(&self, from: StartAt) -> Result<TopicReader, Error> {
        let deliver_policy = match from {
            StartAt::Earliest => DeliverPolicy::All,
            StartAt::Latest => DeliverPolicy::New,
            StartAt::Offset(offset) => DeliverPolicy::ByStartSequence { start_sequence: offset + 1 },
            StartAt::Time(us) => DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).map_err(js_error)?,
            },
        };
        Ok(TopicReader { messages: self.ordered(deliver_policy, None).await? })
    }
}

/// Batches of a topic in order, from where a [`JetStreamTopic::read`] started.
pub struct TopicReader {
    messages: jetstream::consumer::pull::Ordered,
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicReader").finish_non_exhaustive()
    }
}

impl TopicReader {
    /// The next batch's offset and wire bytes (waits for one to be appended).
    pub async fn next(&mut self) -> Result<(u64, Bytes), Error> {
        let msg = self.messages.next().await.ok_or_else(|| js_error("the reader ended"))?.map_err(js_error)?;
        let seq = msg.info().map_err(js_error)?.stream_sequence;
        Ok((seq.saturating_sub(1), msg.payload.clone()))
    }
}

/// One message taken from a [`JetStreamQueue`], to settle with [`JetStreamQueue::ack`] or
/// [`JetStreamQueue::nack`].
pub struct JsLeased {
    /// Its sequence in the queue's stream (unique within the queue).
    pub id: u64,
    /// Its key (the drone, for drone-commands).
    pub key: u64,
    /// Which delivery this is, from 1.
    pub attempt: u32,
    /// The payload.
    pub payload: Bytes,
    msg: jetstream::Message,
}

impl std::fmt::Debug for JsLeased {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsLeased")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// A dead letter: a message that used its attempts, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsDeadLetter {
    /// Its id: its sequence in the dead-letter stream.
    pub id: u64,
    /// Its key.
    pub key: u64,
    /// The last failure.
    pub reason: String,
    /// Deliveries made.
    pub attempts: u32,
    /// When it was dead-lettered, µs since the epoch.
    pub dead_at_us: u64,
    /// The payload.
    pub payload: Bytes,
}

impl JsDeadLetter {
    /// The same dead letter as the local queues describe theirs (the enqueue time is not kept).
    pub fn to_local(&self) -> crate::queue::DeadLetter {
        crate::queue::DeadLetter {
            id: self.id,
            key: self.key,
            attempts: self.attempts,
            reason: self.reason.clone(),
            enqueued_us: 0,
            dead_at_us: self.dead_at_us,
            payload: std::sync::Arc::from(&self.payload[..]),
        }
    }
}

const REASON: &str = "Fleetstream-Reason";
const ATTEMPTS: &str = "Fleetstream-Attempts";
const KEY: &str = "Fleetstream-Key";

/// The queue path on JetStream: a work-queue stream per queue (a message is removed once
/// acknowledged), one durable pull consumer its consumers compete on, the ack wait as the
/// visibility timeout and `max_deliver` as the attempts. A message that uses its attempts goes
/// to the dead-letter stream with its reason: at once when a consumer nacks its last attempt,
/// and, when its last lease simply expires, by a watcher of JetStream's max-deliveries
/// advisory, which copies it with the reason and removes it from the queue.
pub struct JetStreamQueue {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    consumer: jetstream::consumer::PullConsumer,
    subject_prefix: String,
    dead_subject: String,
    dead_stream: jetstream::stream::Stream,
    settler: std::sync::Arc<Settler>,
    _watcher: Watcher,
}

impl std::fmt::Debug for JetStreamQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamQueue").field("subject", &self.subject_prefix).finish_non_exhaustive()
    }
}

impl JetStreamQueue {
    /// Creates (or uses) the queue's stream, its consumer and the dead-letter stream, and
    /// starts the advisory watcher. Must run inside a tokio runtime.
    pub async fn open(
        client: &async_nats::Client,
        queue: events::QueueName,
        settings: &crate::queue::state::QueueConfig,
        cfg: &JetStreamConfig,
    ) -> Result<Self, Error> {
        let js = jetstream::new(client.clone());
        let name = queue.name();
        let (stream, stream_name, subject_prefix) = queue_stream(&js, cfg, queue, settings, "*").await?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                "workers",
                jetstream::consumer::pull::Config {
                    durable_name: Some("workers".into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_millis(settings.visibility_timeout_ms.max(1)),
                    max_deliver: i64::from(settings.max_attempts.max(1)),
                    ..Default::default()
                },
            )
            .await
            .map_err(js_error)?;
        let (dead_stream, dead_subject) = dead_letter_stream(&js, cfg, name).await?;
        let watcher = spawn_watcher(
            client,
            &js,
            &stream,
            format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream_name}.workers"),
            dead_subject.clone(),
            settings.visibility_timeout_ms,
        )
        .await?;
        let settler = std::sync::Arc::new(Settler {
            js: js.clone(),
            dead_subject: dead_subject.clone(),
            max_attempts: settings.max_attempts.max(1),
        });
        Ok(Self { js, stream, consumer, subject_prefix, dead_subject, dead_stream, settler, _watcher: watcher })
    }

    /// Adds a message for `key`; resolves once JetStream stored it (or, with `id`, found a
    /// message of that id within the duplicate window). Returns its id.
    pub async fn enqueue(&self, key: u64, payload: Bytes, id: Option<String>) -> Result<u64, Error> {
        let mut publish = jetstream::context::Publish::build().payload(payload);
        if let Some(id) = id {
            publish = publish.message_id(id);
        }
        let ack = self
            .js
            .send_publish(format!("{}.{key}", self.subject_prefix), publish)
            .await
            .map_err(js_error)?
            .await
            .map_err(js_error)?;
        Ok(ack.sequence)
    }

    /// Up to `max` messages, waiting up to `wait` for the first; each is leased to this caller
    /// until it settles it or the visibility timeout passes.
    pub async fn lease(&self, max: usize, wait: Duration) -> Result<Vec<JsLeased>, Error> {
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(max.max(1))
            .expires(wait.max(Duration::from_millis(10)))
            .messages()
            .await
            .map_err(js_error)?;
        let mut out = Vec::new();
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(js_error)?;
            let info = msg.info().map_err(js_error)?;
            let (id, attempt) = (info.stream_sequence, u32::try_from(info.delivered).unwrap_or(u32::MAX));
            let key = keyed::key_of(&msg.subject);
            let payload = msg.payload.clone();
            out.push(JsLeased { id, key, attempt, payload, msg });
        }
        Ok(out)
    }

    /// The message is done: it leaves the queue.
    pub async fn ack(&self, leased: &JsLeased) -> Result<(), Error> {
        self.settler().settle(leased, None).await
    }

    /// The message failed: it is delivered again, or, on its last attempt, dead-lettered with
    /// `reason`.
    pub async fn nack(&self, leased: &JsLeased, reason: &str) -> Result<(), Error> {
        self.settler().settle(leased, Some(reason)).await
    }

    /// What settling needs, detached from the queue (to settle from a spawned task).
    fn settler(&self) -> std::sync::Arc<Settler> {
        self.settler.clone()
    }

    /// Messages waiting or leased.
    pub async fn len(&self) -> Result<u64, Error> {
        let mut stream = self.stream.clone();
        Ok(stream.info().await.map_err(js_error)?.state.messages)
    }

    /// Whether no message waits or is leased.
    pub async fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.len().await? == 0)
    }

    /// This queue's dead letters, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<JsDeadLetter>, Error> {
        read_dead_letters(&self.dead_stream, &self.dead_subject).await
    }
}

/// A queue's work-queue stream, `<prefix>_QUEUE_<NAME>` on `<subject_prefix>.queue.<name>.<tail>`,
/// with the queue's limits: the stream, its name and the subject prefix.
async fn queue_stream(
    js: &jetstream::Context,
    cfg: &JetStreamConfig,
    queue: events::QueueName,
    settings: &crate::queue::state::QueueConfig,
    tail: &str,
) -> Result<(jetstream::stream::Stream, String, String), Error> {
    let name = queue.name();
    let stream_name = format!("{}_QUEUE_{}", cfg.stream_prefix, name.replace('-', "_").to_uppercase());
    let subject_prefix = format!("{}.queue.{name}", cfg.subject_prefix);
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{subject_prefix}.{tail}")],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            max_messages: i64::try_from(settings.max_messages).unwrap_or(i64::MAX),
            max_message_size: i32::try_from(settings.max_payload_bytes).unwrap_or(i32::MAX),
            duplicate_window: Duration::from_secs(cfg.duplicate_window_s),
            num_replicas: cfg.replicas.max(1),
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(js_error)?;
    Ok((stream, stream_name, subject_prefix))
}

/// The dead-letter stream (`<prefix>_DEAD_LETTERS`, one subject per queue) and `queue`'s subject
/// in it.
async fn dead_letter_stream(
    js: &jetstream::Context,
    cfg: &JetStreamConfig,
    queue: &str,
) -> Result<(jetstream::stream::Stream, String), Error> {
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: format!("{}_DEAD_LETTERS", cfg.stream_prefix),
            subjects: vec![format!("{}.dead.*", cfg.subject_prefix)],
            num_replicas: cfg.replicas.max(1),
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(js_error)?;
    Ok((stream, format!("{}.dead.{queue}", cfg.subject_prefix)))
}

/// The max-deliveries watcher of a queue; it stops when the queue is dropped.
#[derive(Debug)]
struct Watcher(tokio::task::JoinHandle<()>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the max-deliveries watcher on `advisories` (a subject of JetStream's advisories).
async fn spawn_watcher(
    client: &async_nats::Client,
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    advisories: String,
    dead_subject: String,
    visibility_ms: u64,
) -> Result<Watcher, Error> {
    let advisories = client.subscribe(advisories).await.map_err(js_error)?;
    Ok(Watcher(tokio::spawn(watch_max_deliveries(advisories, js.clone(), stream.clone(), dead_subject, visibility_ms))))
}

/// The dead letters on `subject`, oldest first.
async fn read_dead_letters(dead: &jetstream::stream::Stream, subject: &str) -> Result<Vec<JsDeadLetter>, Error> {
    dead_letters_after(dead, subject, 0, usize::MAX).await
}

/// Up to `limit` dead letters on `subject` whose id (their sequence in the dead-letter stream)
/// is above `after`, oldest first.
async fn dead_letters_after(
    dead: &jetstream::stream::Stream,
    subject: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<JsDeadLetter>, Error> {
    let mut stream = dead.clone();
    let state = stream.info().await.map_err(js_error)?.state.clone();
    let mut out = Vec::new();
    for seq in (after + 1).max(state.first_sequence)..=state.last_sequence {
        if out.len() >= limit {
            break;
        }
        if let Some(d) = dead_letter_at(dead, subject, seq).await {
            out.push(d);
        }
    }
    Ok(out)
}

/// The dead letter with id `seq`, if it is one of `subject`'s (and still there).
async fn dead_letter_at(dead: &jetstream::stream::Stream, subject: &str, seq: u64) -> Option<JsDeadLetter> {
    let m = dead.get_raw_message(seq).await.ok()?;
    if m.subject.as_str() != subject {
        return None;
    }
    let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_string()).unwrap_or_default();
    Some(JsDeadLetter {
        id: seq,
        key: header(KEY).parse().unwrap_or(0),
        reason: header(REASON),
        attempts: header(ATTEMPTS).parse().unwrap_or(0),
        dead_at_us: u64::try_from(m.time.unix_timestamp_nanos() / 1000).unwrap_or(0),
        payload: m.payload.clone(),
    })
}

/// Settles leased messages: ack, nack (redelivery), or on the last attempt dead-letter.
struct Settler {
    js: jetstream::Context,
    dead_subject: String,
    max_attempts: u32,
}

impl Settler {
    /// `failure`: `None` acknowledges, `Some(reason)` nacks.
    async fn settle(&self, leased: &JsLeased, failure: Option<&str>) -> Result<(), Error> {
        let Some(reason) = failure else { return leased.msg.double_ack().await.map_err(js_error) };
        if leased.attempt >= self.max_attempts {
            let payload = leased.payload.clone();
            dead_letter(&self.js, &self.dead_subject, leased.key, reason, leased.attempt, payload).await?;
            return leased.msg.ack_with(jetstream::AckKind::Term).await.map_err(js_error);
        }
        leased.msg.ack_with(jetstream::AckKind::Nak(None)).await.map_err(js_error)
    }
}

async fn dead_letter(
    js: &jetstream::Context,
    subject: &str,
    key: u64,
    reason: &str,
    attempts: u32,
    payload: Bytes,
) -> Result<(), Error> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(REASON, reason);
    headers.insert(ATTEMPTS, attempts.to_string().as_str());
    headers.insert(KEY, key.to_string().as_str());
    js.publish_with_headers(subject.to_string(), headers, payload).await.map_err(js_error)?.await.map_err(js_error)?;
    Ok(())
}

/// Moves messages whose last lease expired (JetStream's max-deliveries advisory) to the
/// dead-letter stream with the reason, then out of the queue.
async fn watch_max_deliveries(
    mut advisories: async_nats::Subscriber,
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    dead_subject: String,
    visibility_ms: u64,
) {
    #[derive(Deserialize)]
    struct Advisory {
        stream_seq: u64,
        deliveries: u64,
    }
    while let Some(msg) = advisories.next().await {
        let Ok(advisory) = serde_json::from_slice::<Advisory>(&msg.payload) else { continue };
        let Ok(m) = stream.get_raw_message(advisory.stream_seq).await else { continue };
        let key = keyed::key_of(&m.subject);
        let reason =
            format!("not settled within the {visibility_ms} ms visibility timeout, {} times", advisory.deliveries);
        let attempts = u32::try_from(advisory.deliveries).unwrap_or(u32::MAX);
        match dead_letter(&js, &dead_subject, key, &reason, attempts, m.payload.clone()).await {
            Ok(()) => {
                if let Err(error) = stream.delete_message(advisory.stream_seq).await {
                    tracing::warn!(%error, seq = advisory.stream_seq, "dead-lettered message left in its queue");
                }
            }
            Err(error) => tracing::error!(%error, seq = advisory.stream_seq, "could not dead-letter a message"),
        }
    }
}

/// Which kind of JetStream queue a [`JsWorkQueue`] serves.
#[derive(Debug)]
pub enum JsQueueKind {
    /// Every consumer competes for every message (`notifications`).
    Competing(Box<JetStreamQueue>),
    /// Each session holds its keys exclusively (`drone-commands`).
    Keyed(Box<keyed::KeyedQueue>),
}

/// A JetStream queue behind the engine's [`events::WorkQueues`] operations: leases are
/// remembered by message id until settled, so the QUIC and in-process consumers (the
/// notifier) use a JetStream queue exactly as they use a local one.
pub struct JsWorkQueue {
    kind: JsQueueKind,
    leased: parking_lot::Mutex<rustc_hash::FxHashMap<u64, (u64, JsLeased)>>,
    next_consumer: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for JsWorkQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsWorkQueue").field("kind", &self.kind).finish_non_exhaustive()
    }
}

fn queue_error(e: Error) -> events::Error {
    events::Error::Storage(e.to_string())
}

impl JsWorkQueue {
    /// Wraps a competing queue.
    pub fn new(queue: JetStreamQueue) -> Self {
        Self::of(JsQueueKind::Competing(Box::new(queue)))
    }

    /// Wraps either kind.
    pub fn of(kind: JsQueueKind) -> Self {
        Self { kind, leased: parking_lot::Mutex::default(), next_consumer: std::sync::atomic::AtomicU64::new(1) }
    }

    /// The queue.
    pub fn kind(&self) -> &JsQueueKind {
        &self.kind
    }

    /// Messages waiting or leased.
    pub async fn len(&self) -> Result<u64, Error> {
        match &self.kind {
            JsQueueKind::Competing(q) => q.len().await,
            JsQueueKind::Keyed(q) => q.len().await,
        }
    }

    /// Whether no message waits or is leased.
    pub async fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.len().await? == 0)
    }

    /// The dead letters, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<JsDeadLetter>, Error> {
        let (stream, subject) = self.dead();
        read_dead_letters(stream, subject).await
    }

    fn dead(&self) -> (&jetstream::stream::Stream, &str) {
        match &self.kind {
            JsQueueKind::Competing(q) => (&q.dead_stream, &q.dead_subject),
            JsQueueKind::Keyed(q) => q.dead(),
        }
    }

    /// A page of dead letters: up to `limit` with ids above `after`.
    pub async fn dead_letter_page(&self, after: u64, limit: usize) -> Result<Vec<JsDeadLetter>, Error> {
        let (stream, subject) = self.dead();
        dead_letters_after(stream, subject, after, limit).await
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: u64) -> Option<JsDeadLetter> {
        let (stream, subject) = self.dead();
        dead_letter_at(stream, subject, id).await
    }

    /// Puts a dead letter back on the queue (with fresh attempts) and removes it from the dead
    /// letters; `false` when there is no such dead letter.
    pub async fn replay(&self, id: u64) -> Result<bool, Error> {
        let Some(d) = self.dead_letter(id).await else { return Ok(false) };
        self.enqueue(d.key, d.payload.to_vec()).await.map_err(|e| Error::JetStream(e.to_string()))?;
        self.dead().0.delete_message(id).await.map_err(js_error)?;
        Ok(true)
    }

    /// Deletes a dead letter; `false` when there is no such dead letter.
    pub async fn purge(&self, id: u64) -> Result<bool, Error> {
        if self.dead_letter(id).await.is_none() {
            return Ok(false);
        }
        self.dead().0.delete_message(id).await.map_err(js_error)?;
        Ok(true)
    }

    /// See [`events::WorkQueues::enqueue`].
    pub async fn enqueue(&self, key: u64, payload: Vec<u8>) -> Result<u64, events::Error> {
        match &self.kind {
            JsQueueKind::Competing(q) => q.enqueue(key, Bytes::from(payload), None).await,
            JsQueueKind::Keyed(q) => q.enqueue(key, Bytes::from(payload)).await,
        }
        .map_err(queue_error)
    }

    /// See [`events::WorkQueues::enqueue_once`]: on a competing queue the message id is `id`,
    /// so JetStream stores one copy within its duplicate window.
    pub async fn enqueue_once(&self, key: u64, id: String, payload: Vec<u8>) -> Result<u64, events::Error> {
        match &self.kind {
            JsQueueKind::Competing(q) => q.enqueue(key, Bytes::from(payload), Some(id)).await,
            JsQueueKind::Keyed(q) => q.enqueue(key, Bytes::from(payload)).await,
        }
        .map_err(queue_error)
    }

    /// See [`events::WorkQueues::lease`]: every key on a competing queue, `keys` on a keyed one.
    pub async fn lease(
        &self,
        consumer: u64,
        keys: events::KeyRange,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<events::Leased>, events::Error> {
        let got = match &self.kind {
            JsQueueKind::Competing(q) => q.lease(max, wait).await.map_err(queue_error)?,
            JsQueueKind::Keyed(q) => q.lease(consumer, keys, max, wait).await?,
        };
        let mut leased = self.leased.lock();
        Ok(got
            .into_iter()
            .map(|l| {
                let out = events::Leased {
                    id: l.id,
                    key: l.key,
                    attempt: l.attempt,
                    token: u64::from(l.attempt),
                    payload: std::sync::Arc::from(&l.payload[..]),
                };
                leased.insert(l.id, (consumer, l));
                out
            })
            .collect())
    }

    fn settler(&self) -> std::sync::Arc<Settler> {
        match &self.kind {
            JsQueueKind::Competing(q) => q.settler(),
            JsQueueKind::Keyed(q) => q.settler(),
        }
    }

    /// See [`events::WorkQueues::settle`]: the acknowledgement goes to JetStream in the
    /// background (the lease is the consumer's until then, as JetStream counts it).
    pub fn settle(&self, id: u64, token: u64, verdict: events::Verdict) -> Result<(), events::Error> {
        let mut leased = self.leased.lock();
        match leased.get(&id) {
            Some((_, l)) if u64::from(l.attempt) == token => {}
            Some(_) => return Err(events::Error::LeaseLost(id)),
            None => return Err(events::Error::UnknownMessage(id)),
        }
        let Some((_, l)) = leased.remove(&id) else { return Err(events::Error::UnknownMessage(id)) };
        let handle = tokio::runtime::Handle::try_current().map_err(|_| events::Error::ShuttingDown)?;
        let settler = self.settler();
        handle.spawn(async move {
            let failure = match &verdict {
                events::Verdict::Ack => None,
                events::Verdict::Nack(reason) => Some(reason.as_str()),
            };
            if let Err(error) = settler.settle(&l, failure).await {
                tracing::warn!(%error, id, "could not settle a JetStream message; it is redelivered after its visibility timeout");
            }
        });
        Ok(())
    }

    /// See [`events::WorkQueues::release`]: the consumer's leases go back at once (a keyed
    /// session's consumers are deleted, which gives back everything it held).
    pub fn release(self: &std::sync::Arc<Self>, consumer: u64) {
        let mine: Vec<JsLeased> = {
            let mut leased = self.leased.lock();
            let ids: Vec<u64> = leased.iter().filter(|(_, (c, _))| *c == consumer).map(|(id, _)| *id).collect();
            ids.into_iter().filter_map(|id| leased.remove(&id).map(|(_, l)| l)).collect()
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let queue = self.clone();
        handle.spawn(async move {
            match &queue.kind {
                JsQueueKind::Competing(_) => {
                    for l in mine {
                        let _ = l.msg.ack_with(jetstream::AckKind::Nak(None)).await;
                    }
                }
                JsQueueKind::Keyed(q) => q.release(consumer).await,
            }
        });
    }

    /// See [`events::WorkQueues::attach`].
    pub fn attach(&self) -> u64 {
        match &self.kind {
            JsQueueKind::Competing(_) => self.next_consumer.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            JsQueueKind::Keyed(q) => q.attach(),
        }
    }
}

/// Opens on JetStream the queues `cfg.queues` names, for the engine to serve them from
/// ([`crate::Engine::use_queue_backend`]).
pub async fn open_queues(
    cfg: &JetStreamConfig,
    settings: &crate::queue::QueuesConfig,
    on_jetstream_backend: bool,
) -> Result<Vec<(events::QueueName, std::sync::Arc<dyn QueueBackend>)>, Error> {
    let mut opened = Vec::new();
    if cfg.queues.is_empty() {
        return Ok(opened);
    }
    let client = connect(cfg).await?;
    // On the embedded log the queues are all this node keeps in JetStream: say what their
    // acknowledgements mean (the JetStream backend said so when it connected).
    if !on_jetstream_backend {
        let means = durability::assess(cfg, &jetstream::new(client.clone())).await;
        durability::enforce(cfg, &means)?;
    }
    for name in &cfg.queues {
        let kind = match events::QueueName::from_name(name) {
            Some(queue @ events::QueueName::Notifications) => JsQueueKind::Competing(Box::new(
                JetStreamQueue::open(&client, queue, &settings.notifications, cfg).await?,
            )),
            Some(queue @ events::QueueName::DroneCommands) => JsQueueKind::Keyed(Box::new(
                keyed::KeyedQueue::open(&client, queue, &settings.drone_commands, cfg).await?,
            )),
            None => return Err(Error::Config(format!("[jetstream] queues: no queue {name:?}"))),
        };
        let queue = match kind {
            JsQueueKind::Competing(_) => events::QueueName::Notifications,
            JsQueueKind::Keyed(_) => events::QueueName::DroneCommands,
        };
        let backend = JsQueueBackend { queue, inner: std::sync::Arc::new(JsWorkQueue::of(kind)) };
        opened.push((queue, std::sync::Arc::new(backend) as std::sync::Arc<dyn QueueBackend>));
        tracing::info!(queue = name, url = %cfg.url, "queue kept on JetStream");
    }
    Ok(opened)
}

/// A JetStream work queue as the queue path's seam ([`QueueBackend`]) sees it.
#[derive(Debug)]
pub struct JsQueueBackend {
    queue: events::QueueName,
    inner: std::sync::Arc<JsWorkQueue>,
}

impl JsQueueBackend {
    /// The JetStream queue itself.
    pub fn queue(&self) -> &std::sync::Arc<JsWorkQueue> {
        &self.inner
    }
}

fn admin_error(e: Error) -> events::Error {
    events::Error::Storage(e.to_string())
}

impl QueueBackend for JsQueueBackend {
    fn kind(&self) -> &'static str {
        "jetstream"
    }

    fn enqueue(&self, key: u64, id: Option<String>, payload: Vec<u8>) -> BoxFuture<'_, Result<u64, events::Error>> {
        match id {
            Some(id) => Box::pin(self.inner.enqueue_once(key, id, payload)),
            None => Box::pin(self.inner.enqueue(key, payload)),
        }
    }

    fn lease(
        &self,
        consumer: u64,
        keys: events::KeyRange,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<events::Leased>, events::Error>> {
        Box::pin(self.inner.lease(consumer, keys, max, wait))
    }

    fn settle(&self, id: u64, token: u64, verdict: events::Verdict) -> Result<(), events::Error> {
        self.inner.settle(id, token, verdict)
    }

    fn release(&self, consumer: u64) {
        self.inner.release(consumer);
    }

    fn withdraw<'a>(
        &'a self,
        _key: u64,
        _matches: &'a (dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<usize, events::Error>> {
        // JetStream hands messages to a session's consumers ahead of its leases, so "not yet
        // with the drone" cannot be told apart there: the caller's in-band follow-up (return to
        // base) covers it.
        Box::pin(std::future::ready(Ok(0)))
    }

    fn attach(&self, _keys: events::KeyRange) -> Result<u64, events::Error> {
        Ok(self.inner.attach())
    }

    fn pending(&self) -> BoxFuture<'_, Result<u64, events::Error>> {
        Box::pin(async move { self.inner.len().await.map_err(admin_error) })
    }

    fn summary(&self) -> BoxFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let (messages, dead) = (self.inner.len().await, self.inner.dead_letters().await.map(|d| d.len()));
            serde_json::json!({
                "queue": self.queue.name(),
                "backend": self.kind(),
                "waiting_or_leased": messages.ok(),
                "dead": dead.ok(),
            })
        })
    }

    fn dead_letters(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, events::Error>> {
        Box::pin(async move {
            let page = self.inner.dead_letter_page(after, limit).await.map_err(admin_error)?;
            Ok(page.iter().map(JsDeadLetter::to_local).collect())
        })
    }

    fn dead_letter(&self, id: u64) -> BoxFuture<'_, Option<DeadLetter>> {
        Box::pin(async move { self.inner.dead_letter(id).await.map(|d| d.to_local()) })
    }

    fn replay(&self, id: u64) -> BoxFuture<'_, Result<bool, events::Error>> {
        Box::pin(async move { self.inner.replay(id).await.map_err(admin_error) })
    }

    fn purge(&self, id: u64) -> BoxFuture<'_, Result<bool, events::Error>> {
        Box::pin(async move { self.inner.purge(id).await.map_err(admin_error) })
    }
}
