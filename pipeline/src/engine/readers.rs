//! Offset subscriptions on the embedded log: a follower per subscriber reads records up to the
//! delivered end and waits on the tail for more.
//!
//! Each follower owns a read cursor into the segment files and a short bounded queue to its
//! subscriber; it takes the log lock only to open a reader, and blocks on the tail's condition
//! variable (caught up) or on its subscriber's queue (the subscriber is slow, which throttles only
//! this follower).

use super::*;

/// Starts a thread that feeds an offset subscription with the `kind` records of `log`, whose
/// delivered end is `tail`, until the subscriber goes away or `stopping` is set.
pub(super) fn follow<T: events::wire::Payload>(
    log: Option<&SharedLog>,
    tail: &Arc<Tail>,
    stopping: &Arc<AtomicBool>,
    kind: RecordKind,
    start: StartAt,
) -> Result<OffsetSubscription<T>, Error> {
    {
        let Some(log) = log.cloned() else {
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
        let (tail, stopping) = (tail.clone(), stopping.clone());
        std::thread::Builder::new()
            .name("log-subscriber".into())
            .spawn(move || follow_log(&log, &tail, &stopping, kind, from, &tx))
            .map_err(|e| Error::Storage(format!("starting a subscriber thread: {e}")))?;
        Ok(OffsetSubscription { start: from, rx })
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
