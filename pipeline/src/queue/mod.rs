//! The queue path: work done once by one of several competing consumers (`drone-commands`,
//! `notifications`), with leases, redelivery and a dead-letter queue.
//!
//! The bookkeeping is the pure [`state::QueueState`]; this driver wraps it in a lock, journals
//! every change ([`journal`]) so a queue survives a restart, wakes waiting consumers, and runs
//! one timer thread that returns expired leases. An enqueue resolves once its record is fsynced
//! (group commit: one fsync covers every enqueue waiting for it); acks and lease changes are
//! written but not waited on, since losing one in a power cut only means a redelivery, which
//! at-least-once consumers handle anyway.
//!
//! The queue path shares nothing with the stream path or the ingest: a stalled consumer only
//! leaves its messages leased until the visibility timeout, and a full queue refuses enqueues
//! with "storage full" instead of growing.

pub mod backend;
pub mod journal;
pub mod state;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use events::{Error, KeyRange, Leased, QueueName, Verdict, WorkQueues};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use self::journal::Journal;
use self::state::{Message, QueueConfig, QueueState, Returned, Status};

/// Journals smaller than this are never compacted.
const COMPACT_MIN_BYTES: u64 = 8 << 20;

/// Settings of every queue (`[queues.drone_commands]`, `[queues.notifications]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueuesConfig {
    /// The `drone-commands` queue: keys exclusive by default (a drone has one session).
    pub drone_commands: QueueConfig,
    /// The `notifications` queue: competing consumers over every key.
    pub notifications: QueueConfig,
}

impl Default for QueuesConfig {
    fn default() -> Self {
        Self {
            drone_commands: QueueConfig { exclusive_keys: true, ..QueueConfig::default() },
            notifications: QueueConfig::default(),
        }
    }
}

/// A message in a dead-letter queue, for listing and inspection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    /// Message id.
    pub id: u64,
    /// Routing key.
    pub key: u64,
    /// Deliveries it had.
    pub attempts: u32,
    /// Why the last one failed.
    pub reason: String,
    /// When it was enqueued, µs since the epoch.
    pub enqueued_us: u64,
    /// When it was dead-lettered, µs since the epoch.
    pub dead_at_us: u64,
    /// The payload.
    #[serde(skip)]
    pub payload: Arc<[u8]>,
}

impl DeadLetter {
    fn of(m: &Message) -> Option<Self> {
        let Status::Dead { at_us } = m.status else { return None };
        Some(Self {
            id: m.id,
            key: m.key,
            attempts: m.attempts,
            reason: m.last_error.clone().unwrap_or_default(),
            enqueued_us: m.enqueued_us,
            dead_at_us: at_us,
            payload: m.payload.clone(),
        })
    }
}

/// Counters of one queue.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    /// Messages enqueued.
    pub enqueued: AtomicU64,
    /// Messages leased (each delivery attempt).
    pub delivered: AtomicU64,
    /// Messages acked.
    pub acked: AtomicU64,
    /// Messages offered again (nack, timeout or consumer gone).
    pub redelivered: AtomicU64,
    /// Messages moved to the dead-letter queue.
    pub dead_lettered: AtomicU64,
    /// Dead letters replayed.
    pub replayed: AtomicU64,
}

struct Inner {
    state: QueueState,
    journal: Option<Journal>,
}

/// One queue.
pub struct Queue {
    name: QueueName,
    inner: Mutex<Inner>,
    /// Attached consumers: their key ranges, and whether a newer consumer took their keys over.
    consumers: Mutex<std::collections::HashMap<u64, (KeyRange, bool)>>,
    exclusive: bool,
    waiters: Waiters,
    synced: AtomicU64,
    sync_lock: Mutex<()>,
    metrics: QueueMetrics,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("name", &self.name).field("counts", &self.counts()).finish()
    }
}

fn storage(e: crate::Error) -> Error {
    match e {
        crate::Error::Full(_) => Error::StorageFull,
        other => Error::Storage(other.to_string()),
    }
}

impl Queue {
    /// Opens a queue, journalled at `path` (replayed if it exists), or in memory only.
    pub fn open(name: QueueName, cfg: QueueConfig, path: Option<&Path>) -> Result<Self, crate::Error> {
        let exclusive = cfg.exclusive_keys;
        let mut state = QueueState::new(cfg);
        let journal = path.map(|p| Journal::open(p, &mut state)).transpose()?;
        Ok(Self {
            name,
            inner: Mutex::new(Inner { state, journal }),
            consumers: Mutex::default(),
            exclusive,
            waiters: Waiters::default(),
            synced: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
            metrics: QueueMetrics::default(),
        })
    }

    /// The queue's name.
    pub fn name(&self) -> QueueName {
        self.name
    }

    /// Counters.
    pub fn metrics(&self) -> &QueueMetrics {
        &self.metrics
    }

    /// Messages (ready, leased, dead).
    pub fn counts(&self) -> (usize, usize, usize) {
        self.inner.lock().state.counts()
    }

    /// Adds a message; returns once it is durable.
    pub async fn enqueue(self: &Arc<Self>, key: u64, payload: Vec<u8>) -> Result<u64, Error> {
        let (id, seq) = {
            let mut inner = self.inner.lock();
            let Inner { state, journal } = &mut *inner;
            let id = state.enqueue(key, Arc::from(payload), events::now_us())?;
            let seq = match journal {
                Some(j) => {
                    let written = state.get(id).map(|m| j.put(m)).transpose();
                    match written {
                        Ok(_) => Some(j.seq()),
                        Err(e) => {
                            state.forget(id);
                            return Err(storage(e));
                        }
                    }
                }
                None => None,
            };
            maybe_compact(&mut inner, &self.synced);
            (id, seq)
        };
        self.metrics.enqueued.fetch_add(1, Ordering::Relaxed);
        self.waiters.wake(key);
        if let Some(seq) = seq {
            self.sync_to_blocking(seq).await?;
        }
        Ok(id)
    }

    async fn sync_to_blocking(self: &Arc<Self>, seq: u64) -> Result<(), Error> {
        if self.synced.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        // The fsync blocks; keep it off the async workers.
        let queue = self.clone();
        tokio::task::spawn_blocking(move || queue.sync_to(seq)).await.map_err(|_| Error::ShuttingDown)?
    }

    /// Makes every record up to `seq` durable, sharing one fsync among all callers waiting.
    fn sync_to(&self, seq: u64) -> Result<(), Error> {
        let _one_at_a_time = self.sync_lock.lock();
        if self.synced.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        let (target, file): (u64, Arc<File>) = {
            let inner = self.inner.lock();
            match &inner.journal {
                Some(j) => (j.seq(), j.sync_handle()),
                None => return Ok(()),
            }
        };
        if let Err(e) = file.sync_data() {
            let reason = format!("syncing the {} journal: {e}", self.name.name());
            tracing::error!(queue = self.name.name(), %reason, "queue journal sync failed: the queue acknowledges nothing more until a restart");
            if let Some(j) = self.inner.lock().journal.as_mut() {
                j.fail(reason.clone());
            }
            return Err(Error::Storage(reason));
        }
        self.synced.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// Why the queue's journal stopped taking writes, if it did (a failed write or sync): the
    /// queue then refuses enqueues, leases and settles until a restart.
    pub fn failure(&self) -> Option<String> {
        self.inner.lock().journal.as_ref().and_then(|j| j.failure().map(str::to_string))
    }

    /// Attaches consumer `consumer` for `keys`. On a queue with `exclusive_keys`, a consumer
    /// whose range overlaps is superseded: what it holds is offered again now and its next
    /// lease fails with [`Error::Superseded`]. That is a drone reconnecting: its new session
    /// takes its commands over at once instead of waiting for the old one to time out.
    pub fn attach(&self, consumer: u64, keys: KeyRange) {
        let mut superseded = Vec::new();
        {
            let mut consumers = self.consumers.lock();
            if self.exclusive {
                for (id, (range, gone)) in consumers.iter_mut() {
                    if !*gone && range.lo < keys.hi && keys.lo < range.hi {
                        *gone = true;
                        superseded.push(*id);
                    }
                }
            }
            consumers.insert(consumer, (keys, false));
        }
        for old in superseded {
            tracing::info!(queue = self.name.name(), old, new = consumer, "a newer consumer took over these keys");
            self.give_back(old);
            self.waiters.wake_consumer(old);
        }
    }

    fn check_attached(&self, consumer: u64) -> Result<(), Error> {
        match self.consumers.lock().get(&consumer) {
            Some((_, false)) => Ok(()),
            Some((_, true)) => Err(Error::Superseded),
            // Not attached (in-process callers that lease directly): nothing to check.
            None => Ok(()),
        }
    }

    /// Leases up to `max` messages with keys in `keys`, waiting up to `wait` for the first.
    pub async fn lease(&self, consumer: u64, keys: KeyRange, max: usize, wait: Duration) -> Result<Vec<Leased>, Error> {
        let deadline = tokio::time::Instant::now() + wait;
        // Registered before looking, so a message that turns up in between leaves a wake-up.
        let waiter = self.waiters.register(keys, consumer);
        loop {
            let got = self.lease_now(consumer, keys, max)?;
            if !got.is_empty() {
                return Ok(got);
            }
            if tokio::time::timeout_at(deadline, waiter.notify.notified()).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    /// Leases what is ready now, without waiting.
    pub fn lease_now(&self, consumer: u64, keys: KeyRange, max: usize) -> Result<Vec<Leased>, Error> {
        self.check_attached(consumer)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut inner = self.inner.lock();
        let Inner { state, journal } = &mut *inner;
        if let Some(reason) = journal.as_ref().and_then(|j| j.failure()) {
            return Err(Error::Storage(format!("the {} queue stopped: {reason}", self.name.name())));
        }
        let got = state.lease(consumer, keys, max, events::now_us());
        if let Some(j) = journal {
            for m in &got {
                if let Some(msg) = state.get(m.id)
                    && let Err(error) = j.update(msg)
                {
                    // The lease stands; a lost attempt count only costs one more attempt.
                    tracing::warn!(queue = self.name.name(), %error, "could not journal a lease");
                }
            }
        }
        self.metrics.delivered.fetch_add(got.len() as u64, Ordering::Relaxed);
        Ok(got)
    }

    /// Acks or nacks a leased message.
    pub fn settle(&self, id: u64, token: u64, verdict: Verdict) -> Result<(), Error> {
        let mut inner = self.inner.lock();
        let Inner { state, journal } = &mut *inner;
        match verdict {
            Verdict::Ack => {
                state.ack(id, token)?;
                self.metrics.acked.fetch_add(1, Ordering::Relaxed);
                if let Some(j) = journal {
                    j.remove(id).map_err(storage)?;
                }
            }
            Verdict::Nack(reason) => {
                let back = state.nack(id, token, &reason, events::now_us())?;
                self.returned(state, journal, &[back]);
            }
        }
        maybe_compact(&mut inner, &self.synced);
        Ok(())
    }

    /// The consumer went away: it is detached, and everything it holds is offered again now.
    pub fn release(&self, consumer: u64) {
        self.consumers.lock().remove(&consumer);
        self.give_back(consumer);
    }

    fn give_back(&self, consumer: u64) {
        let mut inner = self.inner.lock();
        let Inner { state, journal } = &mut *inner;
        let back = state.release(consumer, events::now_us());
        self.returned(state, journal, &back);
    }

    /// Returns expired leases; the time of the next expiry, µs.
    pub fn tick(&self, now_us: u64) -> Option<u64> {
        let mut inner = self.inner.lock();
        let Inner { state, journal } = &mut *inner;
        let back = state.expire(now_us);
        self.returned(state, journal, &back);
        state.next_expiry()
    }

    fn returned(&self, state: &QueueState, journal: &mut Option<Journal>, back: &[Returned]) {
        if back.is_empty() {
            return;
        }
        for r in back {
            let id = match r {
                Returned::Requeued { id } => {
                    self.metrics.redelivered.fetch_add(1, Ordering::Relaxed);
                    if let Some(m) = state.get(*id) {
                        self.waiters.wake(m.key);
                    }
                    *id
                }
                Returned::DeadLettered { id, attempts, reason } => {
                    self.metrics.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(queue = self.name.name(), id, attempts, reason, "message dead-lettered");
                    *id
                }
            };
            if let (Some(j), Some(m)) = (journal.as_mut(), state.get(id))
                && let Err(error) = j.update(m)
            {
                tracing::warn!(queue = self.name.name(), %error, "could not journal a redelivery");
            }
        }
    }

    /// Dead letters with ids above `after`, oldest first.
    pub fn dead_letters(&self, after: u64, limit: usize) -> Vec<DeadLetter> {
        self.inner.lock().state.dead_letters(after, limit).into_iter().filter_map(DeadLetter::of).collect()
    }

    /// One dead letter.
    pub fn dead_letter(&self, id: u64) -> Option<DeadLetter> {
        self.inner.lock().state.get(id).and_then(DeadLetter::of)
    }

    /// Puts a dead letter back in the queue with fresh attempts.
    pub fn replay(&self, id: u64) -> Result<(), Error> {
        let mut inner = self.inner.lock();
        let Inner { state, journal } = &mut *inner;
        state.replay(id)?;
        let key = state.get(id).map(|m| m.key);
        if let (Some(j), Some(m)) = (journal.as_mut(), state.get(id)) {
            j.update(m).map_err(storage)?;
        }
        self.metrics.replayed.fetch_add(1, Ordering::Relaxed);
        drop(inner);
        if let Some(key) = key {
            self.waiters.wake(key);
        }
        Ok(())
    }

    /// Takes back the ready messages of `key` whose payload `matches`; durable once it
    /// returns. How many.
    pub async fn withdraw(
        self: &Arc<Self>,
        key: u64,
        matches: &(dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> Result<usize, Error> {
        let (count, seq) = {
            let mut inner = self.inner.lock();
            let Inner { state, journal } = &mut *inner;
            let ids = state.withdraw(key, matches);
            let mut seq = None;
            if let Some(j) = journal {
                for id in &ids {
                    seq = Some(j.remove(*id).map_err(storage)?);
                }
            }
            (ids.len(), seq)
        };
        if let Some(seq) = seq {
            self.sync_to_blocking(seq).await?;
        }
        Ok(count)
    }

    /// Deletes a dead letter.
    pub fn purge(&self, id: u64) -> Result<(), Error> {
        let mut inner = self.inner.lock();
        let Inner { state, journal } = &mut *inner;
        state.purge(id)?;
        if let Some(j) = journal {
            j.remove(id).map_err(storage)?;
        }
        Ok(())
    }
}

/// Consumers waiting for messages, each with its key range: a message that becomes ready wakes
/// only the waiters whose range holds its key, so a queue keyed by drone with a consumer per
/// fleet connection wakes one task per mission, not every connection's.
#[derive(Default)]
struct Waiters {
    next: AtomicU64,
    list: Mutex<Vec<Registration>>,
}

/// One wait in [`Waiters`].
struct Registration {
    id: u64,
    keys: KeyRange,
    consumer: u64,
    notify: Arc<Notify>,
}

/// A registration in [`Waiters`], removed on drop.
struct Waiter<'a> {
    id: u64,
    notify: Arc<Notify>,
    waiters: &'a Waiters,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.waiters.list.lock().retain(|r| r.id != self.id);
    }
}

impl Waiters {
    fn register(&self, keys: KeyRange, consumer: u64) -> Waiter<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.list.lock().push(Registration { id, keys, consumer, notify: notify.clone() });
        Waiter { id, notify, waiters: self }
    }

    /// Wakes the waiters whose range holds `key` (a waiter not yet asleep keeps the wake-up).
    fn wake(&self, key: u64) {
        for r in self.list.lock().iter() {
            if r.keys.contains(key) {
                r.notify.notify_one();
            }
        }
    }

    /// Wakes `consumer`'s waits (it was superseded and must learn so).
    fn wake_consumer(&self, consumer: u64) {
        for r in self.list.lock().iter() {
            if r.consumer == consumer {
                r.notify.notify_one();
            }
        }
    }
}

fn maybe_compact(inner: &mut Inner, synced: &AtomicU64) {
    let Inner { state, journal } = inner;
    let Some(j) = journal else { return };
    // O(1): the size after the last compaction stands for what the queue holds.
    if j.bytes() < COMPACT_MIN_BYTES.max(4 * j.base_bytes()) {
        return;
    }
    match j.compact(state) {
        Ok(()) => {
            synced.fetch_max(j.seq(), Ordering::AcqRel);
        }
        Err(error) => tracing::warn!(%error, "queue journal compaction failed; the journal keeps growing"),
    }
}

/// Every queue, and the timer that returns expired leases.
pub struct Queues {
    drone_commands: Arc<Queue>,
    notifications: Arc<Queue>,
    next_consumer: AtomicU64,
    stop: AtomicBool,
}

impl std::fmt::Debug for Queues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queues")
            .field("drone_commands", &self.drone_commands)
            .field("notifications", &self.notifications)
            .finish()
    }
}

impl Queues {
    /// Opens every queue, journalled under `dir` (`dir/<queue>.journal`) or in memory, and
    /// starts the lease timer.
    pub fn open(cfg: &QueuesConfig, dir: Option<&Path>) -> Result<(Arc<Self>, JoinHandle<()>), crate::Error> {
        let path = |q: QueueName| dir.map(|d| d.join(format!("{}.journal", q.name())));
        let queues = Arc::new(Self {
            drone_commands: Arc::new(Queue::open(
                QueueName::DroneCommands,
                cfg.drone_commands,
                path(QueueName::DroneCommands).as_deref(),
            )?),
            notifications: Arc::new(Queue::open(
                QueueName::Notifications,
                cfg.notifications,
                path(QueueName::Notifications).as_deref(),
            )?),
            next_consumer: AtomicU64::new(1),
            stop: AtomicBool::new(false),
        });
        let timer = {
            let queues = queues.clone();
            std::thread::Builder::new().name("queue-timer".into()).spawn(move || queues.run_timer())?
        };
        Ok((queues, timer))
    }

    /// A queue by name.
    pub fn get(&self, name: QueueName) -> &Arc<Queue> {
        match name {
            QueueName::DroneCommands => &self.drone_commands,
            QueueName::Notifications => &self.notifications,
        }
    }

    /// The queues whose journal stopped taking writes, and why.
    pub fn failures(&self) -> Vec<(QueueName, String)> {
        [QueueName::DroneCommands, QueueName::Notifications]
            .into_iter()
            .filter_map(|name| self.get(name).failure().map(|reason| (name, reason)))
            .collect()
    }

    /// Stops the timer thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    fn run_timer(&self) {
        while !self.stop.load(Ordering::Acquire) {
            let now = events::now_us();
            let next = QueueName::ALL.into_iter().filter_map(|q| self.get(q).tick(now)).min();
            // Wake at the next expiry, and at least every 100 ms to notice a stop and new leases.
            let wait_us = next.map_or(100_000, |t| t.saturating_sub(now)).clamp(1_000, 100_000);
            let until = Instant::now() + Duration::from_micros(wait_us);
            while Instant::now() < until && !self.stop.load(Ordering::Acquire) {
                std::thread::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(20)));
            }
        }
    }

    /// Appends the queues' metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# TYPE fleetstream_queue_messages gauge");
        for q in QueueName::ALL.map(|q| self.get(q)) {
            let (ready, leased, dead) = q.counts();
            for (state, n) in [("ready", ready), ("leased", leased), ("dead", dead)] {
                let _ =
                    writeln!(out, "fleetstream_queue_messages{{queue=\"{}\",state=\"{state}\"}} {n}", q.name.name());
            }
        }
        for (metric, get) in [
            ("enqueued", (|m: &QueueMetrics| &m.enqueued) as fn(&QueueMetrics) -> &AtomicU64),
            ("delivered", |m| &m.delivered),
            ("acked", |m| &m.acked),
            ("redelivered", |m| &m.redelivered),
            ("dead_lettered", |m| &m.dead_lettered),
            ("replayed", |m| &m.replayed),
        ] {
            let _ = writeln!(out, "# TYPE fleetstream_queue_{metric}_total counter");
            for q in QueueName::ALL.map(|q| self.get(q)) {
                let v = get(&q.metrics).load(Ordering::Relaxed);
                let _ = writeln!(out, "fleetstream_queue_{metric}_total{{queue=\"{}\"}} {v}", q.name.name());
            }
        }
    }
}

impl WorkQueues for Queues {
    async fn enqueue(&self, queue: QueueName, key: u64, payload: Vec<u8>) -> Result<u64, Error> {
        self.get(queue).enqueue(key, payload).await
    }

    async fn lease(
        &self,
        queue: QueueName,
        consumer: u64,
        keys: KeyRange,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Leased>, Error> {
        self.get(queue).lease(consumer, keys, max, wait).await
    }

    fn settle(&self, queue: QueueName, id: u64, token: u64, verdict: Verdict) -> Result<(), Error> {
        self.get(queue).settle(id, token, verdict)
    }

    fn release(&self, queue: QueueName, consumer: u64) {
        self.get(queue).release(consumer);
    }

    async fn withdraw(
        &self,
        queue: QueueName,
        key: u64,
        matches: &(dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> Result<usize, Error> {
        self.get(queue).withdraw(key, matches).await
    }

    fn attach(&self, queue: QueueName, keys: KeyRange) -> Result<u64, Error> {
        let consumer = self.next_consumer.fetch_add(1, Ordering::Relaxed);
        self.get(queue).attach(consumer, keys);
        Ok(consumer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ready_key_wakes_only_the_waiters_whose_range_holds_it() {
        let waiters = Waiters::default();
        let low = waiters.register(KeyRange { lo: 0, hi: 10 }, 1);
        let high = waiters.register(KeyRange { lo: 10, hi: 20 }, 2);
        let all = waiters.register(KeyRange::ALL, 3);
        waiters.wake(15);
        let woke = |w: &Waiter<'_>| {
            let n = w.notify.clone();
            async move { tokio::time::timeout(Duration::from_millis(20), n.notified()).await.is_ok() }
        };
        assert!(!woke(&low).await, "a waiter for other keys sleeps on");
        assert!(woke(&high).await, "the wake-up is kept even though it came before the wait");
        assert!(woke(&all).await);
        waiters.wake_consumer(1);
        assert!(woke(&low).await, "a consumer can be woken by id");
        drop(high);
        assert_eq!(waiters.list.lock().len(), 2, "a finished wait deregisters");
    }

    #[tokio::test]
    async fn a_failed_journal_write_stops_the_queue_until_a_restart() {
        let dir = std::env::temp_dir().join(format!("fleetstream-queue-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("q.journal");
        let queue = Arc::new(Queue::open(QueueName::Notifications, QueueConfig::default(), Some(&path)).unwrap());
        assert!(queue.enqueue(1, b"before".to_vec()).await.is_ok());
        // The journal's file turns unwritable, as a broken disk would.
        if let Some(j) = queue.inner.lock().journal.as_mut() {
            j.break_file_for_tests(&path);
        }
        assert!(queue.enqueue(2, b"lost".to_vec()).await.is_err(), "a write that failed is refused");
        assert!(queue.failure().is_some());
        // Nothing is acknowledged afterwards, not even what the disk might take again.
        assert!(queue.enqueue(3, b"after".to_vec()).await.is_err());
        queue.attach(9, KeyRange::ALL);
        assert!(queue.lease_now(9, KeyRange::ALL, 10).is_err(), "no lease from a stopped queue");
        drop(queue);
        // A restart replays what was acknowledged.
        let again = Queue::open(QueueName::Notifications, QueueConfig::default(), Some(&path)).unwrap();
        assert_eq!(again.counts(), (1, 0, 0));
        assert!(again.failure().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
