//! The embedded backend: the input log and the delivery-events log on this node's disk (or
//! nothing at all, in memory, for tests and benches of the stages), shard checkpoints in
//! `DATA_DIR/checkpoints`, and every shard run here.
//!
//! Owns the logs and their delivered ends ([`Tail`]); starts the appender (the input log's one
//! writer), the fan-out thread (telemetry to in-process subscribers) and one follower thread per
//! offset subscriber ([`super::readers`]).

use std::sync::OnceLock;

use super::backend::{Backend, BoxFuture, CheckpointStore, DerivedSink, StartContext, Started};
use super::checkpointer::DirCheckpoints;
use super::readers::PageReader;
use super::*;

/// The embedded backend.
pub struct Local {
    log: Option<SharedLog>,
    tail: Arc<Tail<DroneEvent>>,
    out_log: Option<SharedLog>,
    out_tail: Arc<Tail<DeliveryEvent>>,
    ckpt_dir: Option<PathBuf>,
    policy: FsyncPolicy,
    interval: Duration,
    deliveries: Arc<Topic<DeliveryEvent>>,
    metrics: Arc<EngineMetrics>,
    shards: usize,
    append: OnceLock<flume::Sender<AppendReq>>,
    stopping: Arc<AtomicBool>,
    /// Reads the segment files for subscribers behind the tails.
    reader: PageReader,
}

impl Local {
    /// Keeps nothing: offsets are counted in memory and a restart starts empty.
    pub(super) fn memory(
        deliveries: Arc<Topic<DeliveryEvent>>,
        metrics: Arc<EngineMetrics>,
        shards: usize,
    ) -> Result<Self, crate::Error> {
        Ok(Self {
            log: None,
            tail: Tail::at(0),
            out_log: None,
            out_tail: Tail::at(0),
            ckpt_dir: None,
            policy: FsyncPolicy::None,
            interval: Duration::from_secs(1),
            deliveries,
            metrics,
            shards,
            append: OnceLock::new(),
            stopping: Arc::default(),
            reader: PageReader::start()?,
        })
    }

    /// Opens (recovering) the logs under `dir`.
    pub(super) fn open(
        dir: &std::path::Path,
        cfg: LogConfig,
        deliveries: Arc<Topic<DeliveryEvent>>,
        metrics: Arc<EngineMetrics>,
        shards: usize,
    ) -> Result<(Self, crate::log::Recovery), crate::Error> {
        let (mut log, recovery) = Log::open(&dir.join("log"), cfg)?;
        if recovery.truncated_bytes > 0 {
            warn!(
                bytes = recovery.truncated_bytes,
                reason = recovery.truncated_reason.as_deref().unwrap_or(""),
                "log recovery truncated a torn final record (never acknowledged)"
            );
        }
        let (mut out, out_recovery) = Log::open(&dir.join("deliveries"), cfg)?;
        if out_recovery.truncated_bytes > 0 {
            warn!(bytes = out_recovery.truncated_bytes, "delivery-events log recovery truncated a torn final record");
        }
        let held = log.total_bytes() + out.total_bytes();
        let budget = crate::log::RetentionBudget::for_dir(cfg.retention_bytes, dir, held)?;
        if budget.too_big {
            warn!(
                retention_bytes = cfg.retention_bytes,
                "[log] retention_bytes cannot fit: both logs at that size would not fit on the data directory's disk, \
                 which will fill before retention frees space (0 sizes it from the free space)"
            );
        } else if cfg.retention_bytes == 0 {
            tracing::info!(
                telemetry_bytes = budget.telemetry,
                delivery_events_bytes = budget.deliveries,
                "log retention sized from the free disk (half of it; [log] retention_bytes sets it)"
            );
        }
        log.set_retention_bytes(budget.telemetry);
        out.set_retention_bytes(budget.deliveries);
        let (next, out_next) = (log.next_offset(), out.next_offset());
        let local = Self {
            log: Some(Arc::new(parking_lot::Mutex::new(log))),
            tail: Tail::at(next),
            out_log: Some(Arc::new(parking_lot::Mutex::new(out))),
            out_tail: Tail::at(out_next),
            ckpt_dir: Some(dir.join("checkpoints")),
            policy: cfg.fsync,
            interval: Duration::from_millis(cfg.fsync_interval_ms.max(1)),
            ..Self::memory(deliveries, metrics, shards)?
        };
        Ok((local, recovery))
    }

    async fn to_appender(&self, req: AppendReq) -> Result<(), Error> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let append = self.append.get().ok_or(Error::ShuttingDown)?;
        append.send_async(req).await.map_err(|_| Error::ShuttingDown)
    }

    fn follow<T: events::wire::Payload>(
        &self,
        log: Option<&SharedLog>,
        tail: &Arc<Tail<T>>,
        kind: RecordKind,
        start: StartAt,
    ) -> Result<OffsetSubscription<T>, Error> {
        readers::follow(&self.reader, log, tail, &self.stopping, kind, start)
    }
}

impl Backend for Local {
    fn inject_disk_fault(&self, fault: crate::log::DiskFault) {
        if let Some(log) = &self.log {
            log.lock().inject(fault);
        }
    }

    fn checkpoints(&self, n: usize) -> Result<Vec<Option<Checkpoint>>, crate::Error> {
        let Some(dir) = &self.ckpt_dir else { return Ok(vec![None; n]) };
        let next_offset = self.log.as_ref().map_or(0, |l| l.lock().next_offset());
        let mut checkpoints = Vec::with_capacity(n);
        for shard in 0..n {
            let ckpt = checkpoint::read(dir, shard as u32)?;
            checkpoints.push(ckpt.filter(|c| c.shards as usize == n && c.offset < next_offset));
        }
        if checkpoints.iter().any(Option::is_none) && checkpoints.iter().any(Option::is_some) {
            warn!("some shard checkpoints are missing or stale: every shard replays the whole log");
            checkpoints.iter_mut().for_each(|c| *c = None);
        }
        Ok(checkpoints)
    }

    fn start(&self, ctx: StartContext) -> Result<Started, crate::Error> {
        let mut started = Started::default();
        let (fanout, fanout_rx) = flume::bounded::<Option<Arc<TelemetryBatch>>>(ctx.cfg.shard_queue.max(1));
        let topic = ctx.telemetry.clone();
        started.threads.push(std::thread::Builder::new().name("fanout".into()).spawn(move || {
            while let Ok(Some(batch)) = fanout_rx.recv() {
                topic.publish(batch);
            }
        })?);
        let next_offset = self.log.as_ref().map_or(0, |l| l.lock().next_offset());
        let router = Router { shards: ctx.shards, fanout, tail: self.tail.clone(), metrics: ctx.metrics.clone() };
        let mut appender = Appender {
            log: self.log.clone(),
            next_offset,
            windows: ProducerWindows::new(ctx.cfg.max_producers),
            router: Some(router),
            metrics: ctx.metrics,
            policy: self.policy,
            interval: self.interval,
            last_sync: Instant::now(),
            unsynced: false,
            failed: Arc::default(),
            needed: ctx.needed,
            last_retention: Instant::now(),
        };
        started.replayed = appender.replay()?;
        started.next_offset = appender.next_offset;
        if started.replayed > 0 {
            // The delivery events the replay derives again are in their log before anyone can
            // subscribe: a reader resuming at an offset it saw before a crash finds it there.
            let (done, caught_up) = flume::bounded(1);
            let upto = Some(started.next_offset.saturating_sub(1));
            let _ = ctx.publisher.send(PublishMsg::Barrier { upto, done });
            caught_up.recv().map_err(|_| {
                crate::Error::Config("the delivery-events log failed while the replay derived it again".into())
            })?;
        }
        let (append, append_rx) = flume::bounded(ctx.cfg.append_queue.max(1));
        let _ = self.append.set(append);
        started
            .threads
            .push(std::thread::Builder::new().name("appender".into()).spawn(move || appender.run(append_rx))?);
        Ok(started)
    }

    fn submit(&self, batch: TelemetryBatch) -> BoxFuture<'_, Result<AckFuture, Error>> {
        Box::pin(async move {
            if let Some(first) = batch.events().first() {
                self.metrics.event_age_at_submit.record(age(events::now_us(), first.ts_us.to_native()));
            }
            let (ack, rx) = oneshot::channel();
            self.to_appender(AppendReq::Batch { batch, ack, queued: Instant::now() }).await?;
            Ok(AckFuture::new(rx))
        })
    }

    fn command(&self, cmd: DeliveryCommand, trace: TraceContext) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            self.to_appender(AppendReq::Command { cmd, reply, trace }).await?;
            rx.await.map_err(|_| Error::ShuttingDown)?
        })
    }

    fn follow_telemetry(&self, from: StartAt) -> Result<OffsetSubscription<DroneEvent>, Error> {
        self.follow(self.log.as_ref(), &self.tail, RecordKind::Telemetry, from)
    }

    fn follow_deliveries(&self, from: StartAt) -> Result<OffsetSubscription<DeliveryEvent>, Error> {
        self.follow(self.out_log.as_ref(), &self.out_tail, RecordKind::Deliveries, from)
    }

    fn bounds(&self, topic: StreamTopic) -> (u64, u64) {
        let (log, end) = match topic {
            StreamTopic::DroneTelemetry => (&self.log, self.tail.end()),
            StreamTopic::DeliveryEvents => (&self.out_log, self.out_tail.end()),
        };
        match log {
            Some(log) => (log.lock().first_offset(), end),
            None => (0, 0),
        }
    }

    fn check_cursor(&self, topic: StreamTopic, next: u64) -> Result<(), Error> {
        let (first, end) = self.bounds(topic);
        if next > end {
            return Err(Error::OffsetUnavailable { requested: next, first, next: end });
        }
        Ok(())
    }

    fn derived_sink(&self) -> Result<Box<dyn DerivedSink>, crate::Error> {
        let mut publisher = Publisher::new(
            self.out_log.clone(),
            self.deliveries.clone(),
            self.out_tail.clone(),
            self.metrics.clone(),
            self.shards,
        );
        publisher.rebuild()?;
        Ok(Box::new(publisher))
    }

    fn checkpoint_store(&self) -> Option<Box<dyn CheckpointStore>> {
        self.ckpt_dir.clone().map(|dir| Box::new(DirCheckpoints(dir)) as Box<dyn CheckpointStore>)
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.stopping.store(true, Ordering::Release);
            if let Some(append) = self.append.get() {
                let _ = append.send_async(AppendReq::Stop).await;
            }
        })
    }

    fn queued(&self) -> usize {
        self.append.get().map_or(0, flume::Sender::len)
    }
}
