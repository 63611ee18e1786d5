//! The appender thread: the input log's one writer.
//!
//! Owns the log's write side, the producer dedup windows and the offset counter. Reads the
//! append queue (`submit` and `command` callers), takes whatever is waiting as one group, appends
//! it, syncs once under the [`FsyncPolicy`], and only then routes the group to the shard queues
//! and the fan-out queue and answers the callers. It blocks on the fsync and on full shard
//! queues, which is how backpressure reaches the ingest.

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
    pub(super) tail: Arc<Tail>,
    pub(super) next_offset: u64,
    pub(super) windows: ProducerWindows,
    pub(super) shards: Vec<flume::Sender<ShardMsg>>,
    pub(super) fanout: flume::Sender<Option<Arc<TelemetryBatch>>>,
    pub(super) metrics: Arc<EngineMetrics>,
    pub(super) policy: FsyncPolicy,
    pub(super) interval: Duration,
    pub(super) last_sync: Instant,
    pub(super) unsynced: bool,
    pub(super) failed: Option<String>,
    /// Per shard, the lowest offset it still needs (one past its checkpoint).
    pub(super) needed: Arc<[AtomicU64]>,
    pub(super) last_retention: Instant,
}

impl Appender {
    /// Rebuilds the dedup windows from the whole log and routes every record after the oldest
    /// checkpoint to the shards (each skips what its own checkpoint covers). Returns the number
    /// of records routed.
    pub(super) fn replay(&mut self) -> Result<u64, crate::Error> {
        let Some(shared) = self.log.clone() else { return Ok(0) };
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
                        self.route(record.offset, Arc::new(batch), None);
                        routed += 1;
                    }
                }
                RecordKind::Command => {
                    let cmd: DeliveryCommand = serde_json::from_slice(&record.payload).map_err(|e| {
                        crate::Error::Config(format!("log record {} holds an invalid command: {e}", record.offset))
                    })?;
                    if record.offset >= replay_after {
                        let shard = shard_of(cmd.drone_id(), self.shards.len());
                        let _ = self.shards[shard].send(ShardMsg::Command {
                            offset: record.offset,
                            cmd,
                            reply: None,
                            trace: TraceContext::default(),
                        });
                        routed += 1;
                    }
                }
                RecordKind::Deliveries => {}
            }
        }
        if let Some(last) = last {
            self.watermark(last);
        }
        Ok(routed)
    }

    pub(super) fn run(mut self, rx: flume::Receiver<AppendReq>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        let mut appended = Vec::with_capacity(MAX_GROUP);
        let mut stop = false;
        while !stop {
            let first = if self.unsynced && self.policy == FsyncPolicy::Interval {
                match rx.recv_timeout(self.interval.saturating_sub(self.last_sync.elapsed())) {
                    Ok(req) => req,
                    Err(flume::RecvTimeoutError::Timeout) => {
                        let _ = self.sync();
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
            if self.unsynced
                && must_sync
                && let Err(e) = self.sync()
            {
                for a in appended.drain(..) {
                    let (Appended::Batch { ack, .. }
                    | Appended::Duplicate { ack }
                    | Appended::Command { reply: ack, .. }) = a;
                    let _ = ack.send(Err(e.clone()));
                }
            }
            self.deliver(&mut appended);
            if self.last_retention.elapsed() >= Duration::from_secs(10) {
                self.retention();
            }
        }
        if self.unsynced {
            let _ = self.sync();
        }
        for shard in &self.shards {
            let _ = shard.send(ShardMsg::Stop);
        }
        let _ = self.fanout.send(None);
        self.tail.grew.notify_all();
    }

    pub(super) fn append_batch(
        &mut self,
        batch: TelemetryBatch,
        ack: oneshot::Sender<Result<(), Error>>,
        queued: Instant,
        out: &mut Vec<Appended>,
    ) {
        let meta = batch.header().meta;
        if self.windows.contains(meta.producer_id, meta.batch_seq) {
            self.metrics.duplicate_batches.fetch_add(1, Ordering::Relaxed);
            out.push(Appended::Duplicate { ack });
            return;
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
        if let Some(reason) = &self.failed {
            return Err(Error::Storage(reason.clone()));
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

    /// Syncs the log. A failed fsync leaves the kernel's view of the file unknowable, so the
    /// appender refuses everything afterwards; a restart recovers from what is on disk.
    pub(super) fn sync(&mut self) -> Result<(), Error> {
        let Some(shared) = self.log.as_ref() else { return Ok(()) };
        let started = Instant::now();
        let result = shared.lock().sync();
        self.metrics.fsync_time.record(started.elapsed());
        self.last_sync = Instant::now();
        self.unsynced = false;
        result.map_err(|e| {
            self.metrics.stopped.stop("log", &format!("fsync failed: {e}"));
            self.failed = Some(e.to_string());
            Error::Storage(e.to_string())
        })
    }

    /// Routes and acknowledges what the group appended, in log order.
    pub(super) fn deliver(&mut self, appended: &mut Vec<Appended>) {
        let mut last = None;
        for a in appended.drain(..) {
            match a {
                Appended::Batch { offset, batch, ack, queued } => {
                    let created = batch.events().first().map(|e| e.ts_us.to_native());
                    let batch = Arc::new(batch);
                    self.route(offset, batch.clone(), Some(queued));
                    let _ = self.fanout.send(Some(batch));
                    let _ = ack.send(Ok(()));
                    self.metrics.append_time.record(queued.elapsed());
                    if let Some(created) = created {
                        self.metrics.event_age_at_ack.record(age(events::now_us(), created));
                    }
                    last = Some(offset);
                }
                Appended::Duplicate { ack } => {
                    let _ = ack.send(Ok(()));
                }
                Appended::Command { offset, cmd, reply, trace } => {
                    let shard = shard_of(cmd.drone_id(), self.shards.len());
                    let _ = self.shards[shard].send(ShardMsg::Command { offset, cmd, reply: Some(reply), trace });
                    last = Some(offset);
                }
            }
        }
        if let Some(last) = last {
            self.watermark(last);
            *self.tail.end.lock() = last + 1;
            self.tail.grew.notify_all();
        }
    }

    /// Splits a batch over the shards by drone: index lists, never copies.
    pub(super) fn route(&self, offset: u64, batch: Arc<TelemetryBatch>, received: Option<Instant>) {
        let n = self.shards.len();
        if n == 1 {
            let _ = self.shards[0].send(ShardMsg::Events { offset, batch, indices: None, received });
            return;
        }
        let per_shard = split_by_shard(&batch, n);
        let whole = per_shard.iter().filter(|v| !v.is_empty()).count() == 1;
        for (shard, indices) in per_shard.into_iter().enumerate() {
            if !indices.is_empty() {
                let msg =
                    ShardMsg::Events { offset, batch: batch.clone(), indices: (!whole).then_some(indices), received };
                let _ = self.shards[shard].send(msg);
            }
        }
    }

    pub(super) fn watermark(&self, offset: u64) {
        for shard in &self.shards {
            let _ = shard.send(ShardMsg::Watermark(offset));
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
