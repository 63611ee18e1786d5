//! A JetStream work queue whose keys are held exclusively: `drone-commands`, where a drone
//! session takes the messages of its own drones only, and a newer session for the same drones
//! (after a reconnect, to any node) takes them over at once.
//!
//! A message for key `k` is stored on `<prefix>.queue.<name>.k.<b63>. … .<b0>`: its 64 bits,
//! one subject token each. A session attached for keys `lo..hi` gets one durable pull consumer
//! per aligned block of that range (`….k.<the block's fixed bits>.>`; at most 128, and 13 for
//! keys 1..626), so JetStream itself gives each message only to the session that holds its
//! key. A work-queue stream refuses consumers whose subjects overlap, which is the
//! exclusivity: a session that attaches for keys another session holds, on this node or
//! another, first deletes that session's consumers, and their unacknowledged messages go to
//! the new session at once. The old session learns it was superseded when its consumers
//! vanish. As on the competing queue, the ack wait is the visibility timeout, `max_deliver` the
//! attempts (counted per session), and a message whose last lease expires is moved to the
//! dead-letter stream with the reason by the max-deliveries advisory watcher.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use events::KeyRange;
use futures_util::StreamExt;
use rustc_hash::FxHashMap;

use super::{JetStreamConfig, JsLeased, Settler, js_error};
use crate::Error;

/// Messages a session's consumers hand over before the session leases them: a few, since the
/// visibility timeout runs from the hand-over.
const PREFETCH: usize = 8;

/// The subject of `key`'s messages under `prefix`.
pub(crate) fn key_subject(prefix: &str, key: u64) -> String {
    let mut s = String::with_capacity(prefix.len() + 2 + 128);
    s.push_str(prefix);
    s.push_str(".k");
    for bit in (0..64).rev() {
        s.push('.');
        s.push(if (key >> bit) & 1 == 1 { '1' } else { '0' });
    }
    s
}

/// The key of a message subject: its 64 bit tokens after `.k`, or else its last token as a
/// number (the competing queue's `<prefix>.<key>`). 0 when neither.
pub(crate) fn key_of(subject: &str) -> u64 {
    let tokens: Vec<&str> = subject.rsplit('.').take(65).collect();
    if tokens.len() == 65 && tokens[64] == "k" && tokens[..64].iter().all(|t| *t == "0" || *t == "1") {
        return tokens[..64].iter().enumerate().fold(0u64, |k, (i, t)| k | (u64::from(*t == "1") << i));
    }
    tokens.first().and_then(|t| t.parse().ok()).unwrap_or(0)
}

/// Aligned blocks that cover `keys` exactly: (first key, number of fixed leading bits).
pub(crate) fn blocks(keys: KeyRange) -> Vec<(u64, u32)> {
    if keys == KeyRange::ALL {
        return vec![(0, 0)];
    }
    let (mut lo, hi) = (u128::from(keys.lo), u128::from(keys.hi));
    let mut out = Vec::new();
    while lo < hi {
        let mut size: u128 = if lo == 0 { 1 << 64 } else { lo & lo.wrapping_neg() };
        while lo + size > hi {
            size >>= 1;
        }
        out.push((lo as u64, 64 - size.trailing_zeros()));
        lo += size;
    }
    out
}

fn block_filter(prefix: &str, (first, fixed): (u64, u32)) -> String {
    let mut s = format!("{prefix}.k");
    for i in 0..fixed {
        s.push('.');
        s.push(if (first >> (63 - i)) & 1 == 1 { '1' } else { '0' });
    }
    if fixed < 64 {
        s.push_str(".>");
    }
    s
}

/// The keys a consumer's filter subject covers, `[first, end)` (end may be 2^64).
fn filter_keys(prefix: &str, filter: &str) -> Option<(u128, u128)> {
    let rest = filter.strip_prefix(prefix)?.strip_prefix(".k")?;
    let mut first = 0u128;
    let mut fixed = 0u32;
    for token in rest.split('.').skip(1) {
        match token {
            "0" | "1" => {
                first |= u128::from(token == "1") << (63 - fixed);
                fixed += 1;
            }
            ">" => break,
            _ => return None,
        }
    }
    Some((first, first + (1u128 << (64 - fixed))))
}

/// One attached session: its consumers and what they hand over.
struct Session {
    keys: KeyRange,
    consumers: Vec<String>,
    rx: flume::Receiver<jetstream::Message>,
    ended: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// A work queue on JetStream with exclusive keys (see the module docs).
pub struct KeyedQueue {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    subject_prefix: String,
    settler: Arc<Settler>,
    dead_stream: jetstream::stream::Stream,
    dead_subject: String,
    ack_wait: Duration,
    max_deliver: i64,
    /// Tells this process's sessions apart from other nodes' in consumer names.
    tag: String,
    sessions: parking_lot::Mutex<FxHashMap<u64, Session>>,
    next_session: AtomicU64,
    _watcher: super::Watcher,
}

impl std::fmt::Debug for KeyedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedQueue").field("subject", &self.subject_prefix).finish_non_exhaustive()
    }
}

impl KeyedQueue {
    /// Creates (or uses) the queue's stream and the dead-letter stream, and starts the
    /// advisory watcher. Must run inside a tokio runtime.
    pub async fn open(
        client: &async_nats::Client,
        queue: events::QueueName,
        settings: &crate::queue::state::QueueConfig,
        cfg: &JetStreamConfig,
    ) -> Result<Self, Error> {
        let js = jetstream::new(client.clone());
        let name = queue.name();
        let (stream, stream_name, subject_prefix) = super::queue_stream(&js, cfg, queue, settings, "k.>").await?;
        let (dead_stream, dead_subject) = super::dead_letter_stream(&js, cfg, name).await?;
        let watcher = super::spawn_watcher(
            client,
            &js,
            &stream,
            format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream_name}.*"),
            dead_subject.clone(),
            settings.visibility_timeout_ms,
        )
        .await?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let tag = format!("{:x}x{nanos:x}", std::process::id());
        Ok(Self {
            settler: Arc::new(Settler {
                js: js.clone(),
                dead_subject: dead_subject.clone(),
                max_attempts: settings.max_attempts.max(1),
            }),
            js,
            stream,
            subject_prefix,
            dead_stream,
            dead_subject,
            ack_wait: Duration::from_millis(settings.visibility_timeout_ms.max(1)),
            max_deliver: i64::from(settings.max_attempts.max(1)),
            tag,
            sessions: parking_lot::Mutex::default(),
            next_session: AtomicU64::new(1),
            _watcher: watcher,
        })
    }

    /// A new session id (its consumers are made on its first lease).
    pub fn attach(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a message for `key`; resolves once JetStream stored it. Returns its id.
    pub async fn enqueue(&self, key: u64, payload: Bytes) -> Result<u64, Error> {
        let subject = key_subject(&self.subject_prefix, key);
        let ack = self.js.publish(subject, payload).await.map_err(js_error)?.await.map_err(js_error)?;
        Ok(ack.sequence)
    }

    /// Up to `max` messages of `keys` for `session`, waiting up to `wait` for the first.
    /// `Superseded` once a newer session took the keys over.
    pub async fn lease(
        &self,
        session: u64,
        keys: KeyRange,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<JsLeased>, events::Error> {
        let current = {
            let sessions = self.sessions.lock();
            sessions.get(&session).filter(|s| s.keys == keys).map(|s| (s.rx.clone(), s.ended.clone()))
        };
        let (rx, ended) = match current {
            Some(current) => current,
            None => {
                let old = self.sessions.lock().remove(&session);
                if let Some(old) = old {
                    self.close(old).await;
                }
                // Opened without holding the map: other sessions keep leasing meanwhile.
                let opened =
                    self.open_session(session, keys).await.map_err(|e| events::Error::Storage(e.to_string()))?;
                let current = (opened.rx.clone(), opened.ended.clone());
                self.sessions.lock().insert(session, opened);
                current
            }
        };
        if ended.load(Ordering::Acquire) {
            return Err(events::Error::Superseded);
        }
        let first = tokio::time::timeout(wait, rx.recv_async()).await;
        let mut next = match first {
            _ if ended.load(Ordering::Acquire) => return Err(events::Error::Superseded),
            Ok(Ok(msg)) => Some(msg),
            _ => None,
        };
        let mut out = Vec::new();
        while let Some(msg) = next.take() {
            if let Ok(info) = msg.info() {
                let (id, attempt) = (info.stream_sequence, u32::try_from(info.delivered).unwrap_or(u32::MAX));
                out.push(JsLeased { id, key: key_of(&msg.subject), attempt, payload: msg.payload.clone(), msg });
            }
            if out.len() < max {
                next = rx.try_recv().ok();
            }
        }
        Ok(out)
    }

    /// Ends a session: its consumers are deleted, so what it held goes to the next session for
    /// those keys at once.
    pub async fn release(&self, session: u64) {
        let old = self.sessions.lock().remove(&session);
        if let Some(old) = old {
            self.close(old).await;
        }
    }

    async fn close(&self, session: Session) {
        session.task.abort();
        for name in &session.consumers {
            let _ = self.stream.delete_consumer(name).await;
        }
    }

    /// Makes this session's consumers (all at once) and starts handing their messages over.
    /// JetStream refuses them while another session's consumers overlap `keys`: then every
    /// overlapping consumer (of any node) is deleted first and they are made again.
    async fn open_session(&self, session: u64, keys: KeyRange) -> Result<Session, Error> {
        let names: Vec<String> = (0..blocks(keys).len()).map(|i| format!("s{}-{session}-{i}", self.tag)).collect();
        let consumers = match self.create_consumers(&names, keys).await {
            Ok(consumers) => consumers,
            Err(_) => {
                self.take_over(keys).await?;
                self.create_consumers(&names, keys).await?
            }
        };
        let streams = futures_util::future::try_join_all(consumers.iter().map(|c| {
            c.stream()
                .max_messages_per_batch(PREFETCH)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
        }))
        .await
        .map_err(js_error)?;
        let (tx, rx) = flume::bounded(PREFETCH);
        let ended = Arc::new(AtomicBool::new(false));
        let flag = ended.clone();
        let task = tokio::spawn(async move {
            let mut merged = futures_util::stream::select_all(streams);
            while let Some(item) = merged.next().await {
                match item {
                    Ok(msg) => {
                        if tx.send_async(msg).await.is_err() {
                            break;
                        }
                    }
                    Err(error) if error.kind() == pull::MessagesErrorKind::ConsumerDeleted => break,
                    Err(error) => tracing::debug!(%error, "drone session consumer hiccup"),
                }
            }
            flag.store(true, Ordering::Release);
        });
        Ok(Session { keys, consumers: names, rx, ended, task })
    }

    async fn create_consumers(
        &self,
        names: &[String],
        keys: KeyRange,
    ) -> Result<Vec<jetstream::consumer::PullConsumer>, Error> {
        let creating = names.iter().zip(blocks(keys)).map(|(name, block)| {
            self.stream.create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: block_filter(&self.subject_prefix, block),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: self.ack_wait,
                max_deliver: self.max_deliver,
                // A session whose node died without releasing it goes away on its own.
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
        });
        futures_util::future::try_join_all(creating).await.map_err(js_error)
    }

    /// Deletes every consumer whose keys overlap `keys`, this node's or another's. A
    /// superseded session of this node ends at once, and what it had been handed but not
    /// leased yet is dropped (the new session gets those messages from JetStream); one on
    /// another node learns it when its consumers report they were deleted.
    async fn take_over(&self, keys: KeyRange) -> Result<(), Error> {
        let (lo, hi) =
            if keys == KeyRange::ALL { (0, 1u128 << 64) } else { (u128::from(keys.lo), u128::from(keys.hi)) };
        let mut existing = self.stream.consumers();
        let mut overlapping = Vec::new();
        while let Some(info) = existing.next().await {
            let info = info.map_err(js_error)?;
            if let Some((first, end)) = filter_keys(&self.subject_prefix, &info.config.filter_subject)
                && first < hi
                && lo < end
            {
                overlapping.push(info.name.clone());
            }
        }
        for old in self.sessions.lock().values() {
            if old.consumers.iter().any(|c| overlapping.contains(c)) {
                old.task.abort();
                old.ended.store(true, Ordering::Release);
                old.rx.drain().for_each(drop);
            }
        }
        tracing::info!(?keys, consumers = overlapping.len(), "a newer session takes these keys over");
        futures_util::future::join_all(overlapping.iter().map(|name| self.stream.delete_consumer(name))).await;
        Ok(())
    }

    /// The message is done: it leaves the queue.
    pub async fn ack(&self, leased: &JsLeased) -> Result<(), Error> {
        self.settler.settle(leased, None).await
    }

    /// The message failed: it is delivered again, or, on its last attempt, dead-lettered with
    /// `reason`.
    pub async fn nack(&self, leased: &JsLeased, reason: &str) -> Result<(), Error> {
        self.settler.settle(leased, Some(reason)).await
    }

    /// What settling needs.
    pub(super) fn settler(&self) -> Arc<Settler> {
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
    pub async fn dead_letters(&self) -> Result<Vec<super::JsDeadLetter>, Error> {
        super::read_dead_letters(&self.dead_stream, &self.dead_subject).await
    }

    pub(super) fn dead(&self) -> (&jetstream::stream::Stream, &str) {
        (&self.dead_stream, &self.dead_subject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_a_range_exactly_and_subjects_round_trip() {
        for (lo, hi) in [(1u64, 626u64), (0, 1), (5, 6), (0, 1 << 20), (1000, 1_000_000), (u64::MAX - 3, u64::MAX)] {
            let keys = KeyRange { lo, hi };
            let bs = blocks(keys);
            assert!(bs.len() <= 128, "{lo}..{hi}: {} blocks", bs.len());
            let mut next = u128::from(lo);
            for &(first, fixed) in &bs {
                assert_eq!(u128::from(first), next, "contiguous");
                let (start, end) = filter_keys("p", &block_filter("p", (first, fixed))).unwrap_or((0, 0));
                assert_eq!(start, u128::from(first));
                next = end;
            }
            assert_eq!(next, u128::from(hi), "{lo}..{hi} ends where the range ends");
        }
        assert_eq!(blocks(KeyRange { lo: 1, hi: 626 }).len(), 13);
        assert_eq!(blocks(KeyRange::ALL), vec![(0, 0)]);
        for key in [0, 1, 625, 1 << 40, u64::MAX] {
            let subject = key_subject("fleetstream.queue.drone-commands", key);
            assert_eq!(key_of(&subject), key);
            let inside = blocks(KeyRange { lo: key.saturating_sub(3), hi: key.saturating_add(1).max(1) })
                .into_iter()
                .filter_map(|b| {
                    filter_keys(
                        "fleetstream.queue.drone-commands",
                        &block_filter("fleetstream.queue.drone-commands", b),
                    )
                })
                .any(|(s, e)| s <= u128::from(key) && u128::from(key) < e);
            assert!(inside || key == u64::MAX, "{key}");
        }
        assert_eq!(key_of("fleetstream.queue.notifications.42"), 42);
    }
}
