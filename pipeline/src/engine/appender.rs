//! The appender: the input log's one writer, and the syncer behind it.
//!
//! The appender thread owns the log's write side, the producer dedup windows and the offset
//! counter. It reads the append queue (`submit` and `command` callers), takes whatever is waiting
//! as one group, appends it, and hands the group to the syncer with a handle on the log's file.
//! The syncer thread fsyncs (one fsync covers every group waiting for it) and only then has the
//! [`Router`] route the groups to the shard and fan-out queues and answer the callers, in log
//! order. The appender writes the next group while the syncer waits for the disk, so a batch
//! waits for at most one fsync already under way and its own. The appender blocks on a full
//! syncer queue, the syncer on full shard queues: that is how backpressure reaches the ingest.

use super::*;

pub(super) enum AppendReq {
    /// `queued`: when the batch was handed to the appender.
    Batch {
        batch: TelemetryBatch,
        ack: oneshot::Sender<Result<(), Error>>,
        queued: Instant,
    },
    Command {
        cmd: DeliveryCommand,
        reply: oneshot::Sender<Result<(), Error>>,
        trace: TraceContext,
    },
    Stop,
}

/// Requests the appender takes in one group: one fsync covers them all.
pub(super) const MAX_GROUP: usize = 1024;

/// What an appended request still needs after the group's sync.
pub(super) enum Appended {
    Batch { offset: u64, batch: TelemetryBatch, ack: oneshot::Sender<Result<(), Error>>, queued: Instant },
    Duplicate { ack: oneshot::Sender<Result<(), Error>> },
    Command { offset: u64, cmd: DeliveryCommand, reply: oneshot::Sender<Result<(), Error>>, trace: TraceContext },
}

/// The appender thread: the log's one writer.
pub(super) struct Appender {
    pub(super) log: Option<SharedLog>,
    pub(super) next_offset: u64,
    pub(super) windows: ProducerWindows,
    /// Routes what is durable; handed to the syncer when the appender runs.
    pub(super) router: Option<Router>,
    pub(super) metrics: Arc<EngineMetrics>,
    pub(super) policy: FsyncPolicy,
    pub(super) interval: Duration,
    pub(super) last_sync: Instant,
    pub(super) unsynced: bool,
    /// Why the log stopped (a failed fsync, set by the syncer): nothing is appended after it.
    pub(super) failed: Arc<parking_lot::Mutex<Option<String>>>,
    /// Per shard, the lowest offset it still needs (one past its checkpoint).
    pub(super) needed: Arc<[AtomicU64]>,
    pub(super) last_retention: Instant,
}

impl Appender {
    /// Rebuilds the dedup windows from the whole log and routes every record after the oldest
    /// checkpoint to the shards (each skips what its own checkpoint covers). Returns the number
    /// of records routed.
    pub(super) fn replay(&mut self) -> Result<u64, crate::Error> {
        let (Some(shared), Some(router)) = (self.log.clone(), self.router.as_ref()) else { return Ok(0) };
        let mut log = shared.lock();
        let from = log.first_offset();
        let replay_after = self.needed.iter().map(|n| n.load(Ordering::Relaxed)).min().unwrap_or(0);
        let mut routed = 0;
        let limits = Limits { max_body_bytes: u32::MAX, max_events: u32::MAX };
        let mut last = None;
        for record in log.reader(from)? {
            let record = record?;
            last = Some(record.offset);
            match record.kind {
                RecordKind::Telemetry => {
                    let batch = TelemetryBatch::validate(record.payload, &limits).map_err(|e| {
                        crate::Error::Config(format!("log record {} holds an invalid batch: {e}", record.offset))
                    })?;
                    let meta = batch.header().meta;
                    self.windows.insert(meta.producer_id, meta.batch_seq, record.offset);
                    if record.offset >= replay_after {
                        router.route(record.offset, Arc::new(batch), None);
                        routed += 1;
                    }
                }
                RecordKind::Command => {
                    let cmd: DeliveryCommand = serde_json::from_slice(&record.payload).map_err(|e| {
                        crate::Error::Config(format!("log record {} holds an invalid command: {e}", record.offset))
                    })?;
                    if record.offset >= replay_after {
                        router.command(record.offset, cmd, None, TraceContext::default());
                        routed += 1;
                    }
                }
                RecordKind::Deliveries => {}
            }
        }
        if let Some(last) = last {
            router.watermark(last);
        }
        Ok(routed)
    }

    /// Runs the appender, and the syncer on a thread of its own (joined before this returns).
    pub(super) fn run(mut self, rx: flume::Receiver<AppendReq>) {
        let (to_syncer, jobs) = flume::bounded::<SyncJob>(SYNC_QUEUE);
        let Some(router) = self.router.take() else { return };
        let syncer = Syncer { router, metrics: self.metrics.clone(), failed: self.failed.clone() };
        let syncing = std::thread::Builder::new().name("syncer".into()).spawn(move || syncer.run(jobs));
        let syncing = match syncing {
            Ok(handle) => handle,
            Err(e) => {
                error!(error = %e, "could not start the syncer thread");
                self.metrics.stopped.stop("log", &format!("no syncer thread: {e}"));
                return;
            }
        };
        let mut group = Vec::with_capacity(MAX_GROUP);
        let mut stop = false;
        while !stop {
            let first = if self.unsynced && self.policy == FsyncPolicy::Interval {
                match rx.recv_timeout(self.interval.saturating_sub(self.last_sync.elapsed())) {
                    Ok(req) => req,
                    Err(flume::RecvTimeoutError::Timeout) => {
                        self.hand_over(&to_syncer, Vec::new(), true);
                        continue;
                    }
                    Err(flume::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(req) => req,
                    Err(_) => break,
                }
            };
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(req) => group.push(req),
                    Err(_) => break,
                }
            }
            let mut appended = Vec::with_capacity(group.len());
            for req in group.drain(..) {
                match req {
                    AppendReq::Stop => stop = true,
                    AppendReq::Batch { batch, ack, queued } => self.append_batch(batch, ack, queued, &mut appended),
                    AppendReq::Command { cmd, reply, trace } => self.append_command(cmd, reply, trace, &mut appended),
                }
            }
            let must_sync = match self.policy {
                FsyncPolicy::EveryBatch => true,
                FsyncPolicy::Interval => self.last_sync.elapsed() >= self.interval || stop,
                FsyncPolicy::None => false,
            };
            self.hand_over(&to_syncer, appended, must_sync);
            if self.last_retention.elapsed() >= Duration::from_secs(10) {
                self.retention();
            }
        }
        if self.unsynced {
            self.hand_over(&to_syncer, Vec::new(), true);
        }
        drop(to_syncer);
        let _ = syncing.join();
    }

    /// Hands a group to the syncer, with a handle to sync the log if `sync` and anything is
    /// unsynced.
    fn hand_over(&mut self, to_syncer: &flume::Sender<SyncJob>, appended: Vec<Appended>, sync: bool) {
        let mut handle = None;
        if sync
            && self.unsynced
            && let Some(log) = &self.log
        {
            match log.lock().sync_handle() {
                Ok(h) => handle = Some(h),
                Err(e) => {
                    error!(error = %e, "could not open the log for its fsync");
                    self.metrics.stopped.stop("log", &format!("fsync failed: {e}"));
                    *self.failed.lock() = Some(e.to_string());
                }
            }
            self.unsynced = false;
            self.last_sync = Instant::now();
        }
        let failed = self.failed.lock().clone();
        let job = SyncJob { handle, appended, failed };
        if let Err(flume::SendError(job)) = to_syncer.send(job) {
            for a in job.appended {
                a.answer(Err(Error::ShuttingDown));
            }
        }
    }

    pub(super) fn append_batch(
        &mut self,
        batch: TelemetryBatch,
        ack: oneshot::Sender<Result<(), Error>>,
        queued: Instant,
        out: &mut Vec<Appended>,
    ) {
        let meta = batch.header().meta;
        match self.windows.check(meta.producer_id, meta.batch_seq) {
            crate::dedup::Seen::New => {}
            crate::dedup::Seen::Repeat => {
                self.metrics.duplicate_batches.fetch_add(1, Ordering::Relaxed);
                out.push(Appended::Duplicate { ack });
                return;
            }
            crate::dedup::Seen::Regressed { highest } => {
                let (producer, seq) = (meta.producer_id, meta.batch_seq);
                let _ = ack.send(Err(Error::SequenceRegressed { producer, seq, highest }));
                return;
            }
        }
        match self.append(RecordKind::Telemetry, batch.as_bytes()) {
            Ok(offset) => {
                self.windows.insert(meta.producer_id, meta.batch_seq, offset);
                self.metrics.batches.fetch_add(1, Ordering::Relaxed);
                self.metrics.events.fetch_add(batch.len() as u64, Ordering::Relaxed);
                out.push(Appended::Batch { offset, batch, ack, queued });
            }
            Err(e) => {
                let _ = ack.send(Err(e));
            }
        }
    }

    pub(super) fn append_command(
        &mut self,
        cmd: DeliveryCommand,
        reply: oneshot::Sender<Result<(), Error>>,
        trace: TraceContext,
        out: &mut Vec<Appended>,
    ) {
        let payload = match serde_json::to_vec(&cmd) {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(Error::Encode(e.to_string())));
                return;
            }
        };
        match self.append(RecordKind::Command, &payload) {
            Ok(offset) => out.push(Appended::Command { offset, cmd, reply, trace }),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    pub(super) fn append(&mut self, kind: RecordKind, payload: &[u8]) -> Result<u64, Error> {
        if let Some(reason) = self.failed.lock().clone() {
            return Err(Error::Storage(reason));
        }
        let Some(shared) = self.log.as_ref() else {
            self.next_offset += 1;
            return Ok(self.next_offset - 1);
        };
        let mut log = shared.lock();
        match log.append(kind, payload) {
            Ok(offset) => {
                self.next_offset = offset + 1;
                self.unsynced = true;
                self.metrics.log_bytes.store(log.total_bytes(), Ordering::Relaxed);
                Ok(offset)
            }
            Err(crate::Error::Full(reason)) => {
                self.metrics.storage_full.fetch_add(1, Ordering::Relaxed);
                warn!(%reason, "append refused: storage full");
                Err(Error::StorageFull)
            }
            Err(e) => {
                error!(error = %e, "append failed");
                Err(Error::Storage(e.to_string()))
            }
        }
    }

    pub(super) fn retention(&mut self) {
        self.last_retention = Instant::now();
        let keep_from = self.needed.iter().map(|n| n.load(Ordering::Relaxed)).min().unwrap_or(0);
        if let Some(shared) = self.log.as_ref() {
            let mut log = shared.lock();
            match log.enforce_retention(keep_from, SystemTime::now()) {
                Ok(0) => {}
                Ok(n) => info!(segments = n, first_offset = log.first_offset(), "retention deleted old segments"),
                Err(e) => warn!(error = %e, "retention failed"),
            }
            self.metrics.log_bytes.store(log.total_bytes(), Ordering::Relaxed);
        }
    }
}

impl Appended {
    /// Answers the caller without routing (the group was not made durable).
    fn answer(self, result: Result<(), Error>) {
        let (Appended::Batch { ack, .. } | Appended::Duplicate { ack } | Appended::Command { reply: ack, .. }) = self;
        let _ = ack.send(result);
    }
}

/// Groups the appender may have written ahead of the syncer.
const SYNC_QUEUE: usize = 8;

/// A group written to the log, waiting for its fsync.
struct SyncJob {
    /// Syncs the log up to this group (`None`: nothing to sync, or the policy says not now).
    handle: Option<crate::log::SyncHandle>,
    appended: Vec<Appended>,
    /// The log had stopped when the group was handed over.
    failed: Option<String>,
}

/// The syncer thread: fsyncs what the appender wrote, then routes and answers it in log order.
struct Syncer {
    router: Router,
    metrics: Arc<EngineMetrics>,
    failed: Arc<parking_lot::Mutex<Option<String>>>,
}

impl Syncer {
    fn run(self, jobs: flume::Receiver<SyncJob>) {
        let mut waiting = Vec::new();
        while let Ok(first) = jobs.recv() {
            waiting.push(first);
            waiting.extend(jobs.try_iter());
            // The newest handle covers every group before it: an earlier segment was synced when
            // it was closed.
            if let Some(handle) = waiting.iter().rev().find_map(|j| j.handle.as_ref()) {
                let started = Instant::now();
                let synced = handle.sync();
                self.metrics.fsync_time.record(started.elapsed());
                if let Err(e) = synced {
                    // What the kernel holds of the file is unknowable after a failed fsync: the
                    // log takes nothing more; a restart recovers from what is on disk.
                    self.metrics.stopped.stop("log", &format!("fsync failed: {e}"));
                    *self.failed.lock() = Some(e.to_string());
                }
            }
            let failed = self.failed.lock().clone();
            for job in waiting.drain(..) {
                match job.failed.or_else(|| failed.clone()) {
                    Some(reason) => {
                        job.appended.into_iter().for_each(|a| a.answer(Err(Error::Storage(reason.clone()))))
                    }
                    None => self.router.deliver(job.appended),
                }
            }
        }
        self.router.stop();
    }
}

#[cfg(test)]
mod tests {
    use events::DroneEventKind;

    use super::super::tests::ev;
    use super::*;

    fn batch(seq: u64) -> TelemetryBatch {
        let ev = ev(1, seq, DroneEventKind::Position);
        let meta = BatchMeta { producer_id: 7, batch_seq: seq, ..BatchMeta::default() };
        TelemetryBatch::encode(meta, &[ev], Buffer::new()).unwrap()
    }

    async fn submit(tx: &flume::Sender<AppendReq>, seq: u64) -> Result<(), Error> {
        let (ack, rx) = oneshot::channel();
        tx.send_async(AppendReq::Batch { batch: batch(seq), ack, queued: Instant::now() }).await.unwrap();
        rx.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// A batch is routed and acknowledged only after the syncer's fsync; once an fsync fails,
    /// the group it covered is refused, nothing of it reaches a shard, and every later append is
    /// refused with the reason.
    #[tokio::test]
    async fn a_failed_fsync_refuses_its_group_and_everything_after() {
        let dir = std::env::temp_dir().join(format!("fleetstream-appender-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log: SharedLog = Arc::new(parking_lot::Mutex::new(Log::open(&dir, LogConfig::default()).unwrap().0));
        let metrics = Arc::new(EngineMetrics::default());
        let (shard_tx, shard_rx) = flume::unbounded();
        let (fanout, _fanout_rx) = flume::unbounded();
        let router = Router { shards: vec![shard_tx], fanout, tail: Tail::at(0), metrics: metrics.clone() };
        let appender = Appender {
            log: Some(log.clone()),
            next_offset: 0,
            windows: ProducerWindows::new(16),
            router: Some(router),
            metrics: metrics.clone(),
            policy: FsyncPolicy::EveryBatch,
            interval: Duration::from_secs(1),
            last_sync: Instant::now(),
            unsynced: false,
            failed: Arc::default(),
            needed: vec![AtomicU64::new(0)].into(),
            last_retention: Instant::now(),
        };
        let (tx, rx) = flume::bounded(16);
        let running = std::thread::spawn(move || appender.run(rx));
        assert_eq!(submit(&tx, 1).await, Ok(()));
        assert!(matches!(shard_rx.try_recv(), Ok(ShardMsg::Events { offset: 0, .. })), "routed once durable");
        assert_eq!(metrics.fsync_time.count(), 1);
        log.lock().fail_syncs();
        let refused = submit(&tx, 2).await;
        assert!(matches!(&refused, Err(Error::Storage(r)) if r.contains("injected failure")), "{refused:?}");
        assert!(
            shard_rx.try_iter().all(|m| !matches!(m, ShardMsg::Events { .. })),
            "nothing of the failed group reaches a shard"
        );
        let after = submit(&tx, 3).await;
        assert!(matches!(&after, Err(Error::Storage(r)) if r.contains("injected failure")), "{after:?}");
        assert_eq!(metrics.stopped.parts().first().map(|p| p.0.clone()), Some("log".to_string()));
        tx.send(AppendReq::Stop).unwrap();
        running.join().unwrap();
        assert!(shard_rx.try_iter().any(|m| matches!(m, ShardMsg::Stop)), "the shards are told to stop");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
