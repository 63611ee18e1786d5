//! Offset subscriptions on the embedded log.
//!
//! A subscriber is a task on the runtime (not a thread): it serves the batches just before the
//! delivered end from the log's [`Tail`] (shared, as the shards got them) and has segment files
//! read, a page at a time by the one [`PageReader`] thread, only for what fell out of the tail. It blocks on nothing:
//! it waits for the end to move, or for room in its subscriber's bounded queue (a slow subscriber
//! throttles only itself).

use events::wire::Payload;

use super::tail::Tail;
use super::*;

/// Records a subscriber takes from memory or the log per step.
const PAGE: usize = 64;

/// A read waiting for the page reader.
type ReadJob = Box<dyn FnOnce() + Send>;

/// The one thread that reads segment files for the subscribers that fell behind memory. One
/// thread, not the runtime's blocking pool: a page's buffers (the file reader's and up to
/// [`PAGE`] batches) come and go on one allocator heap instead of being left cached on up to
/// hundreds of pool threads. It ends once every handle is gone.
#[derive(Clone)]
pub(super) struct PageReader {
    jobs: flume::Sender<ReadJob>,
}

impl PageReader {
    pub(super) fn start() -> Result<Self, crate::Error> {
        let (jobs, rx) = flume::bounded::<ReadJob>(FOLLOW_QUEUE);
        std::thread::Builder::new().name("log-reader".into()).spawn(move || {
            while let Ok(job) = rx.recv() {
                job();
            }
        })?;
        Ok(Self { jobs })
    }

    /// Runs `read` on the reader thread; `None` if it is gone.
    async fn run<R: Send + 'static>(&self, read: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send_async(Box::new(move || {
                let _ = tx.send(read());
            }))
            .await
            .ok()?;
        rx.await.ok()
    }
}

/// Starts a task that feeds an offset subscription with the `kind` records of `log`, whose
/// delivered end and recent batches are `tail`, until the subscriber goes away or `stopping` is
/// set.
pub(super) fn follow<T: Payload>(
    reader: &PageReader,
    log: Option<&SharedLog>,
    tail: &Arc<Tail<T>>,
    stopping: &Arc<AtomicBool>,
    kind: RecordKind,
    start: StartAt,
) -> Result<OffsetSubscription<T>, Error> {
    let Some(log) = log.cloned() else {
        let requested = if let StartAt::Offset(o) = start { o } else { 0 };
        return Err(Error::OffsetUnavailable { requested, first: 0, next: 0 });
    };
    let from = {
        let guard = log.lock();
        let (first, next) = (guard.first_offset(), guard.next_offset());
        match start {
            StartAt::Earliest => first,
            // Everything from the delivered end on reaches this subscriber; the log may hold
            // a few more records not yet delivered, which it then reads as well.
            StartAt::Latest => tail.end().clamp(first, next),
            StartAt::Offset(from) if from < first || from > next => {
                return Err(Error::OffsetUnavailable { requested: from, first, next });
            }
            StartAt::Offset(from) => from,
            StartAt::Time(t_us) => {
                drop(guard);
                offset_at_time::<T>(&log, kind, tail.end(), t_us)?
            }
        }
    };
    let (tx, rx) = flume::bounded(FOLLOW_QUEUE);
    let task = follow_task(reader.clone(), log, tail.clone(), stopping.clone(), kind, from, tx);
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(task);
        }
        // Outside a runtime (a blocking caller): the same task on a small runtime of its own.
        Err(_) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|e| Error::Storage(format!("starting a subscriber: {e}")))?;
            std::thread::Builder::new()
                .name("log-subscriber".into())
                .spawn(move || runtime.block_on(task))
                .map_err(|e| Error::Storage(format!("starting a subscriber thread: {e}")))?;
        }
    }
    Ok(OffsetSubscription { start: from, rx })
}

/// Feeds one offset subscription from `next` on: recent batches from the tail, older ones from
/// the log, then waits for the end to move; ends when the subscriber goes away, or once caught
/// up while the engine stops.
async fn follow_task<T: Payload>(
    reader: PageReader,
    log: SharedLog,
    tail: Arc<Tail<T>>,
    stopping: Arc<AtomicBool>,
    kind: RecordKind,
    mut next: u64,
    tx: flume::Sender<events::contract::LogItem<T>>,
) {
    let mut moved = tail.watch();
    let mut resume: Option<crate::log::ResumePoint> = None;
    let mut page = Vec::with_capacity(PAGE);
    loop {
        if tx.is_disconnected() {
            return;
        }
        let end = *moved.borrow_and_update();
        if next >= end {
            if stopping.load(Ordering::Acquire) {
                let _ = tx.send_async(Err(Error::ShuttingDown)).await;
                return;
            }
            // Woken when the end moves; the timeout notices a subscriber gone or a stop.
            let _ = tokio::time::timeout(Duration::from_millis(200), moved.changed()).await;
            continue;
        }
        match tail.recent(next, end, PAGE, &mut page) {
            Ok(after) => next = after,
            Err(memory_from) => {
                let until = memory_from.min(end);
                let (log, from, hint) = (log.clone(), next, resume.take());
                match reader.run(move || read_page::<T>(&log, kind, from, until, hint)).await {
                    Some(Ok((items, after, hint))) => {
                        page.extend(items);
                        next = after;
                        resume = hint;
                    }
                    Some(Err(e)) => {
                        let _ = tx.send_async(Err(e)).await;
                        return;
                    }
                    None => {
                        let _ = tx.send_async(Err(Error::ShuttingDown)).await;
                        return;
                    }
                }
            }
        }
        for (offset, batch) in page.drain(..) {
            if tx.send_async(Ok((offset, batch))).await.is_err() {
                return;
            }
        }
    }
}

/// Up to [`PAGE`] `kind` batches of the log in `[next, until)`, the offset to go on from, and
/// where the reader stopped (to resume there).
#[allow(clippy::type_complexity)]
fn read_page<T: Payload>(
    log: &SharedLog,
    kind: RecordKind,
    mut next: u64,
    until: u64,
    hint: Option<crate::log::ResumePoint>,
) -> Result<(Vec<(u64, Arc<events::wire::Batch<T>>)>, u64, Option<crate::log::ResumePoint>), Error> {
    let limits = Limits { max_body_bytes: u32::MAX, max_events: u32::MAX };
    let mut reader = {
        let mut log = log.lock();
        let (first, log_next) = (log.first_offset(), log.next_offset());
        log.reader_near(next, hint.as_ref())
            .map_err(|_| Error::OffsetUnavailable { requested: next, first, next: log_next })?
            .until(until)
    };
    let mut items = Vec::new();
    for record in reader.by_ref() {
        let record = record.map_err(|e| Error::Storage(e.to_string()))?;
        if record.offset >= until {
            break;
        }
        next = record.offset + 1;
        if record.kind != kind {
            continue;
        }
        items.push((record.offset, Arc::new(events::wire::Batch::<T>::validate(record.payload, &limits)?)));
        if items.len() == PAGE {
            return Ok((items, next, reader.resume_point()));
        }
    }
    Ok((items, next.max(until), reader.resume_point()))
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
