//! The publisher thread: the delivery-events log's one writer.

use super::*;

/// What shards send the publisher.
pub(super) enum PublishMsg {
    /// Derived events to log and publish.
    Events(DeliveryBatch),
    /// Answer once everything sent before is durable.
    Barrier(flume::Sender<()>),
}

/// Deliveries whose last event was terminal, remembered for dedup: a restart re-derives at
/// most the events after the oldest checkpoint (about one checkpoint interval of traffic), far
/// fewer than this.
pub(super) const FINISHED_REMEMBERED: usize = 200_000;

/// The publisher thread: the delivery-events log's one writer. It drops events already logged
/// (a restart re-derives the events after each shard's checkpoint, some of which made it to the
/// log before the crash), appends the rest, syncs, and only then publishes them.
pub(super) struct Publisher {
    pub(super) log: Option<SharedLog>,
    /// Highest event seq logged per delivery.
    pub(super) seen: FxHashMap<DeliveryId, u32>,
    pub(super) finished: std::collections::VecDeque<DeliveryId>,
    pub(super) topic: Arc<Topic<DeliveryEvent>>,
    pub(super) tail: Arc<Tail>,
    pub(super) policy: FsyncPolicy,
    pub(super) last_retention: Instant,
    /// On JetStream: derived events go there, and this node's topic is fed back from it.
    pub(super) cluster: Option<Arc<crate::cluster::Cluster>>,
    pub(super) metrics: Arc<EngineMetrics>,
    /// Set by a failed append or sync of the delivery-events log: from then on nothing is
    /// published and no barrier is answered, so no checkpoint claims events that may not be on
    /// disk; a restart re-derives them from the input log.
    pub(super) failed: bool,
}

impl Publisher {
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

    /// The batch without events already logged (`None` if nothing is left).
    pub(super) fn fresh(&mut self, batch: DeliveryBatch) -> Option<DeliveryBatch> {
        if self.log.is_none() {
            return Some(batch);
        }
        let is_new = |seen: &FxHashMap<DeliveryId, u32>, e: &events::model::ArchivedDeliveryEvent| {
            seen.get(&e.delivery_id.to_native()).is_none_or(|&s| e.seq.to_native() > s)
        };
        let fresh = batch.events().iter().filter(|e| is_new(&self.seen, e)).count();
        let result = if fresh == batch.len() {
            Some(batch)
        } else if fresh == 0 {
            None
        } else {
            let owned: Vec<DeliveryEvent> = batch
                .events()
                .iter()
                .filter(|e| is_new(&self.seen, e))
                .filter_map(|e| rkyv::deserialize::<DeliveryEvent, rkyv::rancor::Error>(e).ok())
                .collect();
            DeliveryBatch::encode(batch.header().meta, &owned, Buffer::new()).ok()
        };
        if let Some(b) = &result {
            for ev in b.events().iter() {
                self.remember(ev.delivery_id.to_native(), ev.seq.to_native(), ev.stage.to_stage().is_terminal());
            }
        }
        result
    }

    pub(super) fn run(mut self, rx: flume::Receiver<PublishMsg>) {
        let mut appended = Vec::new();
        let mut barriers = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut unsynced = false;
            let mut msg = Some(first);
            while let Some(m) = msg.take() {
                match m {
                    PublishMsg::Barrier(done) => barriers.push(done),
                    PublishMsg::Events(batch) if self.cluster.is_some() => appended.push((None, batch)),
                    PublishMsg::Events(_) if self.failed => {}
                    PublishMsg::Events(batch) => {
                        if let Some(batch) = self.fresh(batch) {
                            let written = self
                                .log
                                .as_ref()
                                .map(|log| log.lock().append(RecordKind::Deliveries, batch.as_bytes()));
                            match written {
                                None => appended.push((None, batch)),
                                Some(Ok(offset)) => {
                                    unsynced = true;
                                    appended.push((Some(offset), batch));
                                }
                                Some(Err(e)) => self.fail(&format!("append failed: {e}")),
                            }
                        }
                    }
                }
                if appended.len() + barriers.len() < MAX_GROUP {
                    msg = rx.try_recv().ok();
                }
            }
            if unsynced
                && (self.policy == FsyncPolicy::EveryBatch || !barriers.is_empty())
                && let Some(log) = &self.log
            {
                let started = Instant::now();
                let synced = log.lock().sync();
                self.metrics.delivery_fsync_time.record(started.elapsed());
                if let Err(e) = synced {
                    self.fail(&format!("fsync failed: {e}"));
                }
            }
            if self.failed {
                // What this group appended may not be on disk: it is neither published nor
                // vouched for; dropping the barriers tells their checkpoints so.
                appended.clear();
                barriers.clear();
                continue;
            }
            if let Some(cluster) = &self.cluster {
                // The whole group in one go (acknowledgements overlap); this node's topic is
                // fed back from JetStream.
                cluster.publish_deliveries(appended.drain(..).map(|(_, batch)| batch));
            }
            let mut last = None;
            for (offset, batch) in appended.drain(..) {
                last = offset.or(last);
                let now = events::now_us();
                for ev in batch.events().iter() {
                    self.metrics.delivery_age_at_publish.record(age(now, ev.ts_us.to_native()));
                }
                self.topic.publish(Arc::new(batch));
            }
            if let Some(last) = last {
                *self.tail.end.lock() = last + 1;
                self.tail.grew.notify_all();
            }
            for done in barriers.drain(..) {
                let _ = done.send(());
            }
            if self.last_retention.elapsed() >= Duration::from_secs(10) {
                self.last_retention = Instant::now();
                if let Some(log) = &self.log
                    && let Err(e) = log.lock().enforce_retention(u64::MAX, SystemTime::now())
                {
                    warn!(error = %e, "delivery-events retention failed");
                }
            }
        }
        self.tail.grew.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use events::{DeliveryStage, GeoPoint};

    use super::*;

    /// A failed sync of the delivery-events log: nothing after it is published, and no barrier
    /// behind it is answered, so no checkpoint vouches for events that may not be on disk.
    #[test]
    fn a_failed_sync_of_the_delivery_events_log_stops_publishing_and_answering_barriers() {
        let dir = std::env::temp_dir().join(format!("fleetstream-publisher-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (log, _) = Log::open(&dir, LogConfig::default()).unwrap();
        let log: SharedLog = Arc::new(parking_lot::Mutex::new(log));
        let metrics = Arc::new(EngineMetrics::default());
        let topic = Arc::new(Topic::<DeliveryEvent>::new("delivery-events", 16));
        let sub = topic.subscribe(events::Overflow::Block);
        let publisher = Publisher {
            log: Some(log.clone()),
            seen: FxHashMap::default(),
            finished: std::collections::VecDeque::new(),
            topic: topic.clone(),
            tail: Arc::new(Tail { end: parking_lot::Mutex::new(0), grew: parking_lot::Condvar::new() }),
            policy: FsyncPolicy::EveryBatch,
            last_retention: Instant::now(),
            cluster: None,
            metrics: metrics.clone(),
            failed: false,
        };
        let (tx, rx) = flume::unbounded();
        let running = std::thread::spawn(move || publisher.run(rx));
        let event = |delivery_id| DeliveryEvent {
            delivery_id,
            seq: 0,
            drone_id: 1,
            ts_us: 1,
            location: GeoPoint::new(0.0, 0.0),
            stage: DeliveryStage::Created,
        };
        let batch = |id| DeliveryBatch::encode(BatchMeta::default(), &[event(id)], Buffer::new()).unwrap();
        // While the disk works: published, and the barrier behind it answered.
        let (barrier, durable) = flume::bounded(1);
        tx.send(PublishMsg::Events(batch(1))).unwrap();
        tx.send(PublishMsg::Barrier(barrier)).unwrap();
        assert!(durable.recv_timeout(Duration::from_secs(5)).is_ok());
        assert_eq!(sub.rx.recv_timeout(Duration::from_secs(5)).unwrap().events()[0].delivery_id.to_native(), 1);
        // The next sync fails: the batch is not published, its barrier never answered (dropped),
        // and neither is anything after it.
        log.lock().fail_syncs();
        for id in [2, 3] {
            let (barrier, durable) = flume::bounded(1);
            tx.send(PublishMsg::Events(batch(id))).unwrap();
            tx.send(PublishMsg::Barrier(barrier)).unwrap();
            assert!(durable.recv_timeout(Duration::from_secs(5)).is_err(), "no checkpoint may vouch for it");
        }
        assert!(sub.rx.try_recv().is_err(), "nothing unsynced reaches a subscriber");
        let stopped = metrics.stopped.parts();
        assert_eq!(stopped.len(), 1, "{stopped:?}");
        assert_eq!(stopped[0].0, "delivery-events log");
        assert!(stopped[0].1.contains("injected failure"), "{stopped:?}");
        drop(tx);
        running.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
