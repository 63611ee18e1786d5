//! NATS JetStream as the stream path's store: the first piece of running the pipeline on an
//! existing distributed engine instead of the local log.
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

use crate::Error;

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
        }
    }
}

fn topic_name(topic: Topic) -> &'static str {
    match topic {
        Topic::DroneTelemetry => "telemetry",
        Topic::DeliveryEvents => "deliveries",
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
        let js = jetstream::new(client.clone());
        let name = topic_name(topic);
        let subject_prefix = format!("{}.{name}", cfg.subject_prefix);
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: format!("{}_{}", cfg.stream_prefix, name.to_uppercase()),
                subjects: vec![format!("{subject_prefix}.*")],
                max_age: Duration::from_secs(cfg.max_age_s),
                max_bytes: if cfg.max_bytes == 0 { -1 } else { i64::try_from(cfg.max_bytes).unwrap_or(i64::MAX) },
                duplicate_window: Duration::from_secs(cfg.duplicate_window_s),
                num_replicas: cfg.replicas.max(1),
                storage: StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(js_error)?;
        Ok(Self { js, stream, subject_prefix })
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream.cached_info().config.name
    }

    /// Appends one batch (its wire bytes) on `shard`'s subject; resolves once JetStream has
    /// stored it (or recognised it as a re-send).
    pub async fn append(&self, shard: u32, meta: BatchMeta, bytes: Bytes) -> Result<Appended, Error> {
        let subject = format!("{}.{shard}", self.subject_prefix);
        let publish = jetstream::context::Publish::build()
            .payload(bytes)
            .message_id(format!("{}-{}", meta.producer_id, meta.batch_seq));
        let ack = self.js.send_publish(subject, publish).await.map_err(js_error)?.await.map_err(js_error)?;
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
        let consumer = self
            .stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy,
                filter_subject: format!("{}.*", self.subject_prefix),
                ..Default::default()
            })
            .await
            .map_err(js_error)?;
        let messages = consumer.messages().await.map_err(js_error)?;
        Ok(TopicReader { messages })
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
