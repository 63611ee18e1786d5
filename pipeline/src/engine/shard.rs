//! A shard thread: applies its queue in order, publishes what it derives, checkpoints.
//!
//! Owns one [`Deriver`] (the state of the drones that hash to it). Reads its shard queue (filled
//! by the appender in log order, so a drone's events arrive in order), hands derived events to
//! the publisher queue every few messages, and at each checkpoint interval hands a snapshot to
//! the checkpointer. It blocks only on the publisher's queue when that is full; it never waits
//! for a disk.

use super::*;

/// What a shard thread applies, in order: the protocol between a [`super::Backend`] (which
/// feeds the shards its input) and the engine's shards.
#[derive(Debug)]
pub enum ShardMsg {
    /// Drone events of the input record at `offset`.
    Events {
        /// The input record's offset.
        offset: u64,
        /// The whole batch, shared.
        batch: Arc<TelemetryBatch>,
        /// The indices of this shard's events in it (`None`: all of them).
        indices: Option<Vec<u32>>,
        /// When the engine received the batch (not for a replayed one).
        received: Option<Instant>,
    },
    /// A command from the scheduling edge, the input record at `offset`.
    Command {
        /// The input record's offset.
        offset: u64,
        /// The command.
        cmd: DeliveryCommand,
        /// Told the shard's answer (`None` for a replayed command).
        reply: Option<oneshot::Sender<Result<(), Error>>>,
        /// The caller's trace (not logged: a replayed command has none).
        trace: TraceContext,
    },
    /// Every record up to `offset` has been routed.
    Watermark(u64),
    /// A drone's live state, asked by the API.
    Drone {
        /// The drone.
        id: DroneId,
        /// Told its state.
        reply: oneshot::Sender<Option<DroneSnapshot>>,
    },
    /// Start over from this checkpoint (or from nothing): the shard changed hands.
    Restore {
        /// The checkpoint.
        ckpt: Option<Checkpoint>,
        /// Told once restored.
        done: oneshot::Sender<()>,
    },
    /// Checkpoint now (the shard is being handed to another node).
    Checkpoint {
        /// Told once the checkpoint is written.
        done: oneshot::Sender<()>,
    },
    /// Stop after what is queued.
    Stop,
}

/// One shard thread: applies its queue in order, publishes what it derives, checkpoints.
pub(super) struct Shard {
    pub(super) index: usize,
    pub(super) shards: usize,
    pub(super) deriver: Deriver,
    pub(super) rx: flume::Receiver<ShardMsg>,
    pub(super) publisher: flume::Sender<PublishMsg>,
    pub(super) metrics: Arc<EngineMetrics>,
    /// What the messages since the last report derived, by input offset.
    pub(super) spans: Vec<Span>,
    /// Events the message being applied derives.
    pub(super) scratch: Vec<DeliveryEvent>,
    /// The applied offset last reported to the publisher.
    pub(super) reported_applied: Option<u64>,
    pub(super) reported: DeriveStats,
    /// The tracked drones last added to the engine's gauge.
    pub(super) reported_tracked: usize,
    /// The offset the restored checkpoint covers: replayed records up to it are skipped.
    pub(super) covered: Option<u64>,
    /// Every record up to this offset has been applied.
    pub(super) applied: Option<u64>,
    /// The checkpointer, when checkpoints are kept (a data dir or JetStream).
    pub(super) checkpoints: Option<flume::Sender<CkptJob>>,
    /// Per shard, the first offset the log must keep: one past the last checkpoint written.
    pub(super) needed: Arc<[AtomicU64]>,
    pub(super) ckpt_interval: Duration,
    pub(super) last_ckpt: Instant,
    /// Where each delivery event derived live is recorded as an `engine.derive.<stage>` span.
    pub(super) recorder: Arc<std::sync::OnceLock<services::spans::Spans>>,
}

/// Messages a shard applies before it publishes what they derived: enough to amortise the
/// encode and fan-out under load, few enough to keep the added latency to a few batches.
pub(super) const PUBLISH_EVERY: usize = 32;

impl Shard {
    pub(super) fn run(mut self) {
        let mut stop = false;
        while !stop {
            let Ok(msg) = self.rx.recv() else { break };
            stop = !self.handle(msg);
            let mut more = 0;
            while !stop && more < PUBLISH_EVERY {
                match self.rx.try_recv() {
                    Ok(msg) => {
                        more += 1;
                        stop = !self.handle(msg);
                    }
                    Err(_) => break,
                }
            }
            self.flush();
            if stop || self.last_ckpt.elapsed() >= self.ckpt_interval {
                self.checkpoint(None, stop);
            }
        }
    }

    pub(super) fn covered(&self, offset: u64) -> bool {
        self.covered.is_some_and(|c| offset <= c)
    }

    pub(super) fn advance(&mut self, offset: u64) {
        self.applied = Some(self.applied.map_or(offset, |a| a.max(offset)));
    }

    /// Applies one message; false on `Stop`.
    pub(super) fn handle(&mut self, msg: ShardMsg) -> bool {
        match msg {
            ShardMsg::Events { offset, batch, indices, received } => {
                if !self.covered(offset) {
                    let events = batch.events();
                    match indices {
                        None => {
                            for ev in events.iter() {
                                self.deriver.on_drone_event(ev, &mut self.scratch);
                            }
                        }
                        Some(indices) => {
                            for i in indices {
                                if let Some(ev) = events.get(i as usize) {
                                    self.deriver.on_drone_event(ev, &mut self.scratch);
                                }
                            }
                        }
                    }
                    self.record(offset, None, received);
                    self.derived(offset, batch.header().meta.trace, received);
                }
                self.advance(offset);
            }
            ShardMsg::Command { offset, cmd, reply, trace } => {
                let result = if self.covered(offset) {
                    Ok(())
                } else {
                    let started = Instant::now();
                    let result = self.deriver.on_command(&cmd, events::now_us(), &mut self.scratch);
                    // A command replayed from the log has no one waiting; its spans were
                    // recorded when it was live.
                    if reply.is_some() {
                        self.record(offset, Some(trace), Some(started));
                    }
                    self.derived(offset, trace, None);
                    result
                };
                self.advance(offset);
                // Publish before replying, so Created is on the stream before the caller acts.
                self.flush();
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            ShardMsg::Watermark(offset) => self.advance(offset),
            ShardMsg::Drone { id, reply } => {
                let _ = reply.send(self.deriver.reported_drone(id));
            }
            ShardMsg::Restore { ckpt, done } => {
                self.spans.clear();
                let covered = ckpt.as_ref().map(|c| c.offset);
                let max_drones = self.deriver.max_drones();
                self.deriver = match ckpt {
                    Some(c) => Deriver::restore(self.deriver.config(), c.state),
                    None => Deriver::new(self.deriver.config()),
                }
                .with_max_drones(max_drones);
                self.reported = self.deriver.stats();
                self.covered = covered;
                self.applied = covered;
                // The checkpoint it starts from is written: nothing to write again until it moves on.
                self.needed[self.index].store(covered.map_or(0, |c| c + 1), Ordering::Relaxed);
                self.last_ckpt = Instant::now();
                let _ = done.send(());
            }
            ShardMsg::Checkpoint { done } => {
                self.flush();
                self.checkpoint(Some(done), true);
            }
            ShardMsg::Stop => return false,
        }
        true
    }

    pub(super) fn flush(&mut self) {
        let stats = self.deriver.stats();
        let m = &self.metrics;
        m.applied.fetch_add(stats.applied - self.reported.applied, Ordering::Relaxed);
        m.duplicates.fetch_add(stats.duplicates - self.reported.duplicates, Ordering::Relaxed);
        m.derived.fetch_add(stats.derived - self.reported.derived, Ordering::Relaxed);
        m.far_dropoffs.fetch_add(stats.far_dropoffs - self.reported.far_dropoffs, Ordering::Relaxed);
        m.stray.fetch_add(stats.stray - self.reported.stray, Ordering::Relaxed);
        let drones = events::limits::Table::TrackedDrones;
        events::limits::evicted(drones, stats.evicted - self.reported.evicted);
        events::limits::refused(drones, stats.untracked - self.reported.untracked);
        let tracked = self.deriver.tracked_drones();
        m.drones_tracked.fetch_add(tracked as i64 - self.reported_tracked as i64, Ordering::Relaxed);
        self.reported_tracked = tracked;
        self.reported = stats;
        if self.spans.is_empty() && self.applied == self.reported_applied {
            return;
        }
        self.reported_applied = self.applied;
        let spans = std::mem::take(&mut self.spans);
        let _ = self.publisher.send(PublishMsg::Derived { shard: self.index, applied: self.applied, spans });
    }

    /// Records each delivery event the message at `offset` derived as a span of its delivery:
    /// from `received` (none: a replayed record, whose spans were recorded when it was live)
    /// until now; `command` is a command's trace (a telemetry batch carries the drone's, not
    /// the delivery's, which the store fills in).
    fn record(&self, offset: u64, command: Option<TraceContext>, received: Option<Instant>) {
        let (Some(received), Some(spans)) = (received, self.recorder.get()) else { return };
        if self.scratch.is_empty() || !spans.is_on() {
            return;
        }
        let took = received.elapsed().as_micros() as u64;
        let start_us = events::now_us().saturating_sub(took);
        let offset_key = if command.is_some() { "command_offset" } else { "telemetry_offset" };
        for e in &self.scratch {
            let stage = e.stage.name();
            let attributes = services::spans::attrs([
                (offset_key, offset.into()),
                ("shard", self.index.into()),
                ("drone_id", e.drone_id.into()),
                ("seq", e.seq.into()),
            ]);
            let mut of = services::spans::SpanOf::new(e.delivery_id, format!("engine.derive.{stage}"), "engine");
            if let Some(parent) = command.filter(TraceContext::is_some) {
                of = of.under(parent);
            }
            spans.record(of.with(attributes), start_us, took);
        }
    }

    /// Files what the message at `offset` derived (if anything) for the next report.
    fn derived(&mut self, offset: u64, trace: TraceContext, received: Option<Instant>) {
        if !self.scratch.is_empty() {
            self.spans.push(Span { offset, trace, received, events: std::mem::take(&mut self.scratch) });
        }
    }

    /// Snapshots the state and hands it to the checkpointer, which writes it once the delivery
    /// events it derived are durable; the shard goes straight back to its queue. `done` is told
    /// once the checkpoint is written. A periodic checkpoint (`wait` false) is skipped while the
    /// checkpointer is still busy with earlier ones; until a checkpoint of the applied offset is
    /// written (one that failed included), each interval hands over another.
    pub(super) fn checkpoint(&mut self, done: Option<oneshot::Sender<()>>, wait: bool) {
        self.last_ckpt = Instant::now();
        let (Some(offset), Some(checkpoints)) = (self.applied, &self.checkpoints) else {
            return tell(done);
        };
        if self.needed[self.index].load(Ordering::Relaxed) == offset + 1 {
            return tell(done); // a checkpoint of this offset is written
        }
        // Everything this state derived must be in the delivery-events log before the
        // checkpoint says it need not be derived again: the barrier follows this shard's events
        // into the publisher's queue, and the checkpointer waits for its answer.
        let (barrier, durable) = flume::bounded(1);
        if self.publisher.send(PublishMsg::Barrier { upto: Some(offset), done: barrier }).is_err() {
            return tell(done);
        }
        let ckpt =
            Checkpoint { shard: self.index as u32, shards: self.shards as u32, offset, state: self.deriver.snapshot() };
        let job = CkptJob { ckpt, durable, done };
        let sent = if wait {
            checkpoints.send(job).map_err(|e| e.into_inner())
        } else {
            checkpoints.try_send(job).map_err(|e| e.into_inner())
        };
        if let Err(job) = sent {
            tell(job.done);
        }
    }
}

pub(super) fn tell(done: Option<oneshot::Sender<()>>) {
    if let Some(done) = done {
        let _ = done.send(());
    }
}

#[cfg(test)]
mod tests {
    use events::DroneEventKind;

    use super::super::tests::ev;
    use super::*;

    /// A checkpoint waits for the delivery-events log to be durable, then writes a file with
    /// fsyncs. The shard hands both to the checkpointer: while the publisher has not answered the
    /// barrier, the shard still answers, and the checkpoint lands once it does.
    #[test]
    fn a_pending_checkpoint_does_not_stall_its_shard() {
        let dir = std::env::temp_dir().join(format!("fleetstream-ckpt-async-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let needed: Arc<[AtomicU64]> = vec![AtomicU64::new(0)].into();
        let metrics = Arc::new(EngineMetrics::default());
        let (ckpt_tx, ckpt_rx) = flume::bounded(1);
        let checkpointer = Checkpointer {
            store: Some(Box::new(super::super::checkpointer::DirCheckpoints(dir.clone()))),
            needed: needed.clone(),
            metrics: metrics.clone(),
        };
        let writer = std::thread::spawn(move || checkpointer.run(ckpt_rx));
        let (publish_tx, publish_rx) = flume::unbounded();
        let (tx, rx) = flume::unbounded();
        let shard = Shard {
            index: 0,
            shards: 1,
            deriver: Deriver::new(DeriveConfig::default()),
            rx,
            publisher: publish_tx,
            metrics: metrics.clone(),
            spans: Vec::new(),
            scratch: Vec::new(),
            reported_applied: None,
            reported: DeriveStats::default(),
            reported_tracked: 0,
            covered: None,
            applied: None,
            checkpoints: Some(ckpt_tx),
            needed: needed.clone(),
            ckpt_interval: Duration::ZERO,
            last_ckpt: Instant::now(),
            recorder: Arc::default(),
        };
        let running = std::thread::spawn(move || shard.run());
        let batch =
            TelemetryBatch::encode(BatchMeta::default(), &[ev(3, 1, DroneEventKind::Position)], Buffer::new()).unwrap();
        tx.send(ShardMsg::Events { offset: 0, batch: Arc::new(batch), indices: None, received: None }).unwrap();
        // The shard's periodic checkpoint sends its barrier, which nobody answers yet.
        let barrier = loop {
            match publish_rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                PublishMsg::Barrier { done, .. } => break done,
                PublishMsg::Derived { .. } => {}
            }
        };
        let (reply, mut answer) = oneshot::channel();
        tx.send(ShardMsg::Drone { id: 3, reply }).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let snapshot = loop {
            match answer.try_recv() {
                Ok(snapshot) => break snapshot,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => panic!("the shard stalled behind its pending checkpoint"),
            }
        };
        assert!(snapshot.is_some(), "the shard knows the drone it applied");
        assert_eq!(needed[0].load(Ordering::Relaxed), 0, "nothing is written before the log is durable");
        barrier.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while needed[0].load(Ordering::Relaxed) != 1 {
            assert!(Instant::now() < deadline, "the checkpoint was never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(checkpoint::read(&dir, 0).unwrap().map(|c| c.offset), Some(0));
        assert_eq!(metrics.checkpoints.load(Ordering::Relaxed), 1);
        // Further barriers (from checkpoints of later offsets) get answers so the shard can stop.
        let answering = std::thread::spawn(move || {
            while let Ok(msg) = publish_rx.recv() {
                if let PublishMsg::Barrier { done, .. } = msg {
                    let _ = done.send(());
                }
            }
        });
        tx.send(ShardMsg::Stop).unwrap();
        running.join().unwrap();
        writer.join().unwrap();
        answering.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
