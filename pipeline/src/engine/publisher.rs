//! The publisher thread: the delivery-events log's one writer.
//!
//! Delivery events are a deterministic function of the durable input log: the shards derive them
//! from records that are already synced, and a replay from a checkpoint derives the same events
//! from the same records. So the publisher makes them visible as soon as they are derived, with
//! no fsync of its own on the way: the only fsync between a drone event's arrival and its
//! delivery event reaching a subscriber is the input log's.
//!
//! For a crash to leave the offsets subscribers saw in place, the delivery-events log is laid out
//! by input offset: one record per input record that derived anything, holding the events of
//! every shard for that record in shard order, numbered ([`BatchMeta::batch_seq`]) by its input
//! offset. The publisher therefore merges the shards: it holds what they report until every shard
//! has applied its queue past an offset, then writes and publishes the offsets up to there in
//! order. After a crash the shards re-derive what followed their checkpoints; the publisher drops
//! what the log already holds (by input offset) and appends the rest, which is exactly what was
//! published before, so record `k` holds the same events it held.
//!
//! The log is synced only when a shard's checkpoint asks (a barrier): a checkpoint may only say
//! "no need to derive again" for events that are on disk. (On JetStream offsets come from the
//! streams there, and that backend has its own [`DerivedSink`].)
//!
//! Owns the delivery-events log's write side and the merge. Reads the publisher queue (shards'
//! reports and barriers); blocks on a barrier's fsync and on subscribers that block
//! ([`Overflow::Block`]).

use std::collections::BTreeMap;

use super::backend::DerivedSink;
use super::*;

/// What shards send the publisher.
pub(crate) enum PublishMsg {
    /// What a shard derived since its last report, by the input offset each came from, and the
    /// offset through which it has applied its queue (every record up to it, derived or not).
    Derived { shard: usize, applied: Option<u64>, spans: Vec<Span> },
    /// Answer once every event derived from input offsets up to `upto` is durable.
    Barrier { upto: Option<u64>, done: flume::Sender<()> },
}

/// The delivery events one input record derived in one shard.
#[derive(Debug)]
pub struct Span {
    pub offset: u64,
    /// The trace of the input record (a batch's or a command's).
    pub trace: TraceContext,
    /// When the engine received the input record (a live batch's; not a replayed one's).
    pub received: Option<Instant>,
    pub events: Vec<DeliveryEvent>,
}

/// [`BatchMeta::producer_id`] of a delivery-events record laid out by input offset: its
/// `batch_seq` is the input offset whose events it holds.
pub(crate) const BY_INPUT_OFFSET: u64 = u64::MAX;

/// Deliveries whose last event was terminal, remembered for dedup: a restart re-derives at
/// most the events after the oldest checkpoint (about one checkpoint interval of traffic), far
/// fewer than this.
pub(super) const FINISHED_REMEMBERED: usize = 200_000;

/// The publisher thread: takes what the shards report, in rounds, and hands it to the backend's
/// [`DerivedSink`].
pub(super) fn run(mut sink: Box<dyn DerivedSink>, rx: flume::Receiver<PublishMsg>) {
    while let Ok(first) = rx.recv() {
        let mut msg = Some(first);
        let mut taken = 0;
        while let Some(m) = msg.take() {
            match m {
                PublishMsg::Barrier { upto, done } => sink.barrier(upto, done),
                PublishMsg::Derived { shard, applied, spans } => sink.report(shard, applied, spans),
            }
            taken += 1;
            if taken < MAX_GROUP {
                msg = rx.try_recv().ok();
            }
        }
        sink.end_round();
    }
    sink.finish();
}

/// The embedded backend's sink: the delivery-events log laid out by input offset.
pub(super) struct Publisher {
    pub(super) log: Option<SharedLog>,
    /// Highest event seq logged per delivery: a guard for logs written before they were laid
    /// out by input offset.
    pub(super) seen: FxHashMap<DeliveryId, u32>,
    pub(super) finished: std::collections::VecDeque<DeliveryId>,
    pub(super) topic: Arc<Topic<DeliveryEvent>>,
    pub(super) tail: Arc<Tail<DeliveryEvent>>,
    pub(super) last_retention: Instant,
    pub(super) metrics: Arc<EngineMetrics>,
    /// Set by a failed append or sync of the delivery-events log: from then on nothing is
    /// published and no barrier is answered, so no checkpoint claims events that may not be on
    /// disk; a restart re-derives them from the input log.
    pub(super) failed: bool,
    /// Per shard, the input offset through which it has applied its queue (`None`: not yet).
    pub(super) progress: Vec<Option<u64>>,
    /// Derived events not yet published, by input offset.
    pub(super) pending: BTreeMap<u64, Vec<(usize, Span)>>,
    /// Every input offset up to this one has been published.
    pub(super) emitted: Option<u64>,
    /// The last input offset the log held at start: what is derived again up to it is dropped.
    pub(super) logged_upto: Option<u64>,
    pub(super) unsynced: bool,
    /// Barriers waiting for the merge to pass their offset.
    pub(super) waiting: Vec<(Option<u64>, flume::Sender<()>)>,
}

impl DerivedSink for Publisher {
    fn report(&mut self, shard: usize, applied: Option<u64>, spans: Vec<Span>) {
        self.take(shard, applied, spans);
    }

    fn barrier(&mut self, upto: Option<u64>, done: flume::Sender<()>) {
        self.waiting.push((upto, done));
    }

    fn end_round(&mut self) {
        if !self.failed {
            self.emit();
        }
        self.answer_barriers();
        if self.last_retention.elapsed() >= Duration::from_secs(10) {
            self.last_retention = Instant::now();
            if let Some(log) = &self.log
                && let Err(e) = log.lock().enforce_retention(u64::MAX, SystemTime::now())
            {
                warn!(error = %e, "delivery-events retention failed");
            }
        }
    }

    fn finish(&mut self) {
        self.tail.wake();
    }
}

impl Publisher {
    pub(super) fn new(
        log: Option<SharedLog>,
        topic: Arc<Topic<DeliveryEvent>>,
        tail: Arc<Tail<DeliveryEvent>>,
        metrics: Arc<EngineMetrics>,
        shards: usize,
    ) -> Self {
        Self {
            log,
            seen: FxHashMap::default(),
            finished: std::collections::VecDeque::new(),
            topic,
            tail,
            last_retention: Instant::now(),
            metrics,
            failed: false,
            progress: vec![None; shards],
            pending: BTreeMap::new(),
            emitted: None,
            logged_upto: None,
            unsynced: false,
            waiting: Vec::new(),
        }
    }

    /// Learns what the delivery-events log already holds.
    pub(super) fn rebuild(&mut self) -> Result<(), crate::Error> {
        let Some(shared) = self.log.clone() else { return Ok(()) };
        let mut log = shared.lock();
        let limits = Limits { max_body_bytes: u32::MAX, max_events: u32::MAX };
        let first = log.first_offset();
        for record in log.reader(first)? {
            let record = record?;
            let batch = DeliveryBatch::validate(record.payload, &limits).map_err(|e| {
                crate::Error::Config(format!("delivery-events log record {} is invalid: {e}", record.offset))
            })?;
            let meta = batch.header().meta;
            if meta.producer_id == BY_INPUT_OFFSET {
                self.logged_upto = self.logged_upto.max(Some(meta.batch_seq));
            }
            for ev in batch.events().iter() {
                self.remember(ev.delivery_id.to_native(), ev.seq.to_native(), ev.stage.to_stage().is_terminal());
            }
        }
        Ok(())
    }

    pub(super) fn remember(&mut self, delivery: DeliveryId, seq: u32, terminal: bool) {
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

    pub(super) fn fail(&mut self, reason: &str) {
        self.failed = true;
        self.metrics.stopped.stop("delivery-events log", reason);
    }

    /// Takes a shard's report into the merge.
    fn take(&mut self, shard: usize, applied: Option<u64>, spans: Vec<Span>) {
        if self.failed {
            return; // nothing more is published: the input log derives it again after a restart
        }
        if let Some(p) = self.progress.get_mut(shard) {
            *p = (*p).max(applied);
        }
        for span in spans {
            self.pending.entry(span.offset).or_default().push((shard, span));
        }
    }

    /// Writes and publishes, in input order, every offset all shards have applied.
    fn emit(&mut self) {
        let Some(safe) = self.progress.iter().copied().min().flatten() else { return };
        let mut last = None;
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > safe {
                break;
            }
            let (offset, parts) = entry.remove_entry();
            if let Some(written) = self.publish_offset(offset, parts) {
                last = Some(written);
            }
            if self.failed {
                self.pending.clear();
                return;
            }
        }
        self.emitted = self.emitted.max(Some(safe));
        if let Some(last) = last {
            self.tail.advance(last + 1);
        }
    }

    /// Appends and publishes the events input record `offset` derived; the log offset written.
    fn publish_offset(&mut self, offset: u64, mut parts: Vec<(usize, Span)>) -> Option<u64> {
        if self.logged_upto.is_some_and(|upto| offset <= upto) {
            return None; // in the log before the restart, and published from there
        }
        parts.sort_by_key(|(shard, _)| *shard);
        let trace = parts.iter().map(|(_, s)| s.trace).find(TraceContext::is_some).unwrap_or_default();
        let received = parts.iter().filter_map(|(_, s)| s.received).min();
        let mut events: Vec<DeliveryEvent> = parts.into_iter().flat_map(|(_, s)| s.events).collect();
        if self.log.is_some() {
            events.retain(|e| self.seen.get(&e.delivery_id).is_none_or(|&s| e.seq > s));
            for e in &events {
                self.remember(e.delivery_id, e.seq, e.stage.is_terminal());
            }
        }
        if events.is_empty() {
            return None;
        }
        let meta = BatchMeta { producer_id: BY_INPUT_OFFSET, batch_seq: offset, trace };
        let batch = match DeliveryBatch::encode(meta, &events, Buffer::with_capacity(64 + events.len() * 64)) {
            Ok(batch) => batch,
            Err(e) => {
                self.fail(&format!("encoding delivery events failed: {e}"));
                return None;
            }
        };
        let appended = self.log.as_ref().map(|log| log.lock().append(RecordKind::Deliveries, batch.as_bytes()));
        let written = match appended {
            None => None,
            Some(Ok(written)) => Some(written),
            Some(Err(e)) => {
                self.fail(&format!("append failed: {e}"));
                return None;
            }
        };
        self.unsynced |= written.is_some();
        let now = events::now_us();
        for ev in &events {
            self.metrics.delivery_age_at_publish.record(age(now, ev.ts_us));
        }
        let batch = Arc::new(batch);
        if let Some(written) = written {
            self.tail.push(written, batch.clone());
        }
        self.topic.publish(batch);
        if let Some(received) = received {
            self.metrics.delivery_server_time.record(received.elapsed());
        }
        written
    }

    /// Syncs the log for the barriers the merge has passed, and answers them. After a failure
    /// none is answered: their checkpoints are not written.
    fn answer_barriers(&mut self) {
        if self.failed {
            self.waiting.clear();
            return;
        }
        let emitted = self.emitted;
        let ready = self.waiting.iter().any(|(upto, _)| upto.is_none() || *upto <= emitted);
        if !ready {
            return;
        }
        if self.unsynced
            && let Some(log) = &self.log
        {
            let started = Instant::now();
            let synced = log.lock().sync();
            self.metrics.delivery_fsync_time.record(started.elapsed());
            self.unsynced = false;
            if let Err(e) = synced {
                self.fail(&format!("fsync failed: {e}"));
                self.waiting.clear();
                return;
            }
        }
        self.waiting.retain(|(upto, done)| {
            let passed = upto.is_none() || *upto <= emitted;
            if passed {
                let _ = done.send(());
            }
            !passed
        });
    }
}

#[cfg(test)]
mod tests {
    use events::{DeliveryStage, GeoPoint};

    use super::*;

    fn event(delivery_id: u64, seq: u32) -> DeliveryEvent {
        DeliveryEvent {
            delivery_id,
            seq,
            drone_id: 1,
            ts_us: 1,
            location: GeoPoint::new(0.0, 0.0),
            stage: DeliveryStage::Created,
        }
    }

    fn derived(shard: usize, applied: u64, spans: &[(u64, u64)]) -> PublishMsg {
        let spans = spans
            .iter()
            .map(|&(offset, delivery)| Span {
                offset,
                trace: TraceContext::default(),
                received: None,
                events: vec![event(delivery, 0)],
            })
            .collect();
        PublishMsg::Derived { shard, applied: Some(applied), spans }
    }

    fn open(dir: &std::path::Path) -> SharedLog {
        Arc::new(parking_lot::Mutex::new(Log::open(dir, LogConfig::default()).unwrap().0))
    }

    fn publisher(log: &SharedLog, topic: &Arc<Topic<DeliveryEvent>>, metrics: &Arc<EngineMetrics>) -> Publisher {
        let tail = Tail::at(0);
        let mut p = Publisher::new(Some(log.clone()), topic.clone(), tail, metrics.clone(), 2);
        p.rebuild().unwrap();
        p
    }

    /// `(log offset, input offset, deliveries)` of every record in the log.
    fn records(log: &SharedLog) -> Vec<(u64, u64, Vec<u64>)> {
        let mut log = log.lock();
        let first = log.first_offset();
        let limits = Limits { max_body_bytes: u32::MAX, max_events: u32::MAX };
        log.reader(first)
            .unwrap()
            .map(|r| {
                let r = r.unwrap();
                let b = DeliveryBatch::validate(r.payload, &limits).unwrap();
                let ids = b.events().iter().map(|e| e.delivery_id.to_native()).collect();
                (r.offset, b.header().meta.batch_seq, ids)
            })
            .collect()
    }

    /// Shards report out of step; the log gets one record per input offset, in input order, the
    /// shards' events in shard order, and only once every shard has passed the offset. A
    /// publisher started again on the log after losing its last report (as after a crash) drops
    /// what the log holds and writes the rest at the same log offsets.
    #[test]
    fn the_merge_lays_out_the_log_by_input_offset_and_a_restart_reproduces_it() {
        let dir = std::env::temp_dir().join(format!("fleetstream-publisher-merge-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = open(&dir);
        let metrics = Arc::new(EngineMetrics::default());
        let topic = Arc::new(Topic::<DeliveryEvent>::new("delivery-events", 64));
        let sub = topic.subscribe(events::Overflow::Block);
        let mut p = publisher(&log, &topic, &metrics);
        let take = |p: &mut Publisher, msg| match msg {
            PublishMsg::Derived { shard, applied, spans } => {
                p.take(shard, applied, spans);
                p.emit();
            }
            PublishMsg::Barrier { .. } => unreachable!(),
        };
        take(&mut p, derived(1, 7, &[(5, 51), (7, 71)]));
        assert!(sub.rx.try_recv().is_err(), "shard 0 has not reported: nothing is safe to publish");
        take(&mut p, derived(0, 5, &[(3, 30), (5, 50)]));
        let seen: Vec<u64> = std::iter::from_fn(|| sub.rx.try_recv().ok()).map(|b| b.header().meta.batch_seq).collect();
        assert_eq!(seen, [3, 5], "offsets up to shard 0's progress, in order");
        take(&mut p, derived(0, 9, &[(8, 80)]));
        assert_eq!(records(&log).len(), 3, "offset 8 waits for shard 1");
        take(&mut p, derived(1, 9, &[]));
        let expected = vec![(0, 3, vec![30]), (1, 5, vec![50, 51]), (2, 7, vec![71]), (3, 8, vec![80])];
        assert_eq!(records(&log), expected);
        // A crash after offsets 7 and 8 were written, before 8's record reached the disk.
        drop(p);
        log.lock().sync().unwrap();
        let before = records(&log);
        drop(log);
        file_cut_last_record(&dir).unwrap();
        let log = open(&dir);
        assert_eq!(records(&log), before[..3], "the torn record is gone");
        let mut p = publisher(&log, &topic, &metrics);
        // The shards derive again from their checkpoints (here: everything).
        take(&mut p, derived(0, 9, &[(3, 30), (5, 50), (8, 80)]));
        take(&mut p, derived(1, 9, &[(5, 51), (7, 71)]));
        assert_eq!(records(&log), expected, "the same records at the same offsets");
        drop(p);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Cuts the last record off the only segment file in `dir`, as a crash before its sync may.
    fn file_cut_last_record(dir: &std::path::Path) -> std::io::Result<()> {
        let path = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "log"))
            .ok_or_else(|| std::io::Error::other("no segment"))?;
        let len = std::fs::metadata(&path)?.len();
        std::fs::OpenOptions::new().write(true).open(&path)?.set_len(len - 3)
    }

    /// A failed sync of the delivery-events log: its barrier is never answered (no checkpoint
    /// vouches for events that may not be on disk), and nothing after it is published.
    #[test]
    fn a_failed_sync_of_the_delivery_events_log_stops_publishing_and_answering_barriers() {
        let dir = std::env::temp_dir().join(format!("fleetstream-publisher-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = open(&dir);
        let metrics = Arc::new(EngineMetrics::default());
        let topic = Arc::new(Topic::<DeliveryEvent>::new("delivery-events", 16));
        let sub = topic.subscribe(events::Overflow::Block);
        let mut publisher = publisher(&log, &topic, &metrics);
        publisher.progress = vec![None];
        let (tx, rx) = flume::unbounded();
        let running = std::thread::spawn(move || run(Box::new(publisher), rx));
        let one = |offset: u64, delivery: u64| PublishMsg::Derived {
            shard: 0,
            applied: Some(offset),
            spans: vec![Span {
                offset,
                trace: TraceContext::default(),
                received: None,
                events: vec![event(delivery, 0)],
            }],
        };
        // While the disk works: published, and the barrier behind it answered.
        let (barrier, durable) = flume::bounded(1);
        tx.send(one(0, 1)).unwrap();
        tx.send(PublishMsg::Barrier { upto: Some(0), done: barrier }).unwrap();
        assert!(durable.recv_timeout(Duration::from_secs(5)).is_ok());
        assert_eq!(sub.rx.recv_timeout(Duration::from_secs(5)).unwrap().events()[0].delivery_id.to_native(), 1);
        // The next sync fails: the event derived from durable input is out, but its barrier is
        // never answered (dropped), and nothing after it is published.
        log.lock().fail_syncs();
        let (barrier, durable) = flume::bounded(1);
        tx.send(one(1, 2)).unwrap();
        tx.send(PublishMsg::Barrier { upto: Some(1), done: barrier }).unwrap();
        assert!(durable.recv_timeout(Duration::from_secs(5)).is_err(), "no checkpoint may vouch for it");
        assert_eq!(sub.rx.recv_timeout(Duration::from_secs(5)).unwrap().events()[0].delivery_id.to_native(), 2);
        let (barrier, durable) = flume::bounded(1);
        tx.send(one(2, 3)).unwrap();
        tx.send(PublishMsg::Barrier { upto: Some(2), done: barrier }).unwrap();
        assert!(durable.recv_timeout(Duration::from_secs(5)).is_err());
        assert!(sub.rx.recv_timeout(Duration::from_millis(200)).is_err(), "nothing is published after the failure");
        let stopped = metrics.stopped.parts();
        assert_eq!(stopped.len(), 1, "{stopped:?}");
        assert_eq!(stopped[0].0, "delivery-events log");
        assert!(stopped[0].1.contains("injected failure"), "{stopped:?}");
        drop(tx);
        running.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
