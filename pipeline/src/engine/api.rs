//! The engine seen from the edges: the contract traits ([`BatchSink`], [`StreamSource`],
//! [`WorkQueues`], [`FleetControl`]) the ingest and the services program against.

use super::*;

/// Resolves when the appender has made a batch durable (or refused it).
#[derive(Debug)]
pub struct AckFuture(oneshot::Receiver<Result<(), Error>>);

impl Future for AckFuture {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or(Err(Error::ShuttingDown)))
    }
}

impl Engine {
    async fn to_appender(&self, req: AppendReq) -> Result<(), Error> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        self.inner.append.send_async(req).await.map_err(|_| Error::ShuttingDown)
    }
}

impl BatchSink for Engine {
    type Ack = AckFuture;

    async fn submit(&self, batch: TelemetryBatch) -> Result<Self::Ack, Error> {
        let (ack, rx) = oneshot::channel();
        if let Some(cluster) = &self.inner.cluster {
            if self.inner.stopping.load(Ordering::Acquire) {
                return Err(Error::ShuttingDown);
            }
            let stored = cluster.publish_batch(batch).await?;
            tokio::spawn(async move {
                let _ = ack.send(stored.await);
            });
            return Ok(AckFuture(rx));
        }
        if let Some(first) = batch.events().first() {
            self.inner.metrics.event_age_at_submit.record(age(events::now_us(), first.ts_us.to_native()));
        }
        self.to_appender(AppendReq::Batch { batch, ack, queued: Instant::now() }).await?;
        Ok(AckFuture(rx))
    }
}

impl StreamSource for Engine {
    fn subscribe_telemetry_from(&self, from: StartAt) -> Result<OffsetSubscription<DroneEvent>, Error> {
        if let Some(cluster) = &self.inner.cluster {
            return cluster.follow(StreamTopic::DroneTelemetry, from);
        }
        self.follow(self.inner.log.clone(), self.inner.tail.clone(), RecordKind::Telemetry, from)
    }

    fn subscribe_deliveries_from(&self, from: StartAt) -> Result<OffsetSubscription<DeliveryEvent>, Error> {
        if let Some(cluster) = &self.inner.cluster {
            return cluster.follow(StreamTopic::DeliveryEvents, from);
        }
        self.follow(self.inner.out_log.clone(), self.inner.out_tail.clone(), RecordKind::Deliveries, from)
    }

    fn subscribe_telemetry(&self, overflow: Overflow) -> Result<Subscription<DroneEvent>, Error> {
        Ok(self.inner.telemetry.subscribe(overflow))
    }

    fn cursor(&self, topic: StreamTopic, name: &str) -> Result<Option<u64>, Error> {
        events::contract::valid_cursor_name(name)?;
        Ok(self.inner.cursors.get(topic, name).map(|c| c.next))
    }

    fn commit_cursor(&self, topic: StreamTopic, name: &str, next: u64) -> Result<(), Error> {
        events::contract::valid_cursor_name(name)?;
        let (first, end) = self.topic_bounds(topic);
        // On JetStream a reader may be ahead of what this node's follower has seen.
        if next > end && self.inner.cluster.is_none() {
            return Err(Error::OffsetUnavailable { requested: next, first, next: end });
        }
        let now = events::now_us();
        self.inner.cursors.commit(topic, name, next, now);
        if let Some(cluster) = &self.inner.cluster {
            cluster.put_cursor(topic, name, crate::cursor::Cursor { next, updated_us: now });
        }
        Ok(())
    }

    fn subscribe_deliveries(&self, overflow: Overflow) -> Result<Subscription<DeliveryEvent>, Error> {
        Ok(self.inner.deliveries.subscribe(overflow))
    }
}

impl Engine {
    /// Serves `queue` from JetStream from now on (set before consumers attach).
    pub fn use_jetstream_queue(&self, queue: QueueName, q: Arc<crate::jetstream::JsWorkQueue>) {
        let mut external = self.inner.external_queues.write();
        external.retain(|(name, _)| *name != queue);
        external.push((queue, q));
    }

    /// The JetStream queue serving `queue`, if it is kept there.
    pub fn jetstream_queue(&self, queue: QueueName) -> Option<Arc<crate::jetstream::JsWorkQueue>> {
        self.external(queue)
    }

    fn external(&self, queue: QueueName) -> Option<Arc<crate::jetstream::JsWorkQueue>> {
        self.inner.external_queues.read().iter().find(|(name, _)| *name == queue).map(|(_, q)| q.clone())
    }
}

impl WorkQueues for Engine {
    async fn enqueue(&self, queue: QueueName, key: u64, payload: Vec<u8>) -> Result<u64, Error> {
        if let Some(q) = self.external(queue) {
            return q.enqueue(key, payload).await;
        }
        self.inner.queues.enqueue(queue, key, payload).await
    }

    async fn enqueue_once(&self, queue: QueueName, key: u64, id: String, payload: Vec<u8>) -> Result<u64, Error> {
        if let Some(q) = self.external(queue) {
            return q.enqueue_once(key, id, payload).await;
        }
        self.inner.queues.enqueue(queue, key, payload).await
    }

    async fn lease(
        &self,
        queue: QueueName,
        consumer: u64,
        keys: KeyRange,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Leased>, Error> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        if let Some(q) = self.external(queue) {
            return q.lease(consumer, keys, max, wait).await;
        }
        self.inner.queues.lease(queue, consumer, keys, max, wait).await
    }

    fn settle(&self, queue: QueueName, id: u64, token: u64, verdict: Verdict) -> Result<(), Error> {
        if let Some(q) = self.external(queue) {
            return q.settle(id, token, verdict);
        }
        self.inner.queues.settle(queue, id, token, verdict)
    }

    fn release(&self, queue: QueueName, consumer: u64) {
        if let Some(q) = self.external(queue) {
            return q.release(consumer);
        }
        self.inner.queues.release(queue, consumer);
    }

    async fn withdraw(
        &self,
        queue: QueueName,
        key: u64,
        matches: &(dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> Result<usize, Error> {
        if self.external(queue).is_some() {
            // JetStream hands messages to a session's consumers ahead of its leases, so
            // "not yet with the drone" cannot be told apart there: the caller's in-band
            // follow-up (return to base) covers it.
            return Ok(0);
        }
        self.inner.queues.withdraw(queue, key, matches).await
    }

    fn attach(&self, queue: QueueName, keys: KeyRange) -> Result<u64, Error> {
        if let Some(q) = self.external(queue) {
            return Ok(q.attach());
        }
        self.inner.queues.attach(queue, keys)
    }
}

impl FleetControl for Engine {
    async fn command(&self, cmd: DeliveryCommand) -> Result<(), Error> {
        self.command_traced(cmd, TraceContext::default()).await
    }

    async fn command_traced(&self, cmd: DeliveryCommand, trace: TraceContext) -> Result<(), Error> {
        // Stamped before it is logged: a replay of the command derives the same events.
        let cmd = cmd.stamped(events::now_us());
        if let Some(cluster) = &self.inner.cluster {
            return cluster.command(cmd, trace).await;
        }
        let (reply, rx) = oneshot::channel();
        self.to_appender(AppendReq::Command { cmd, reply, trace }).await?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    async fn drone(&self, id: DroneId) -> Result<Option<DroneSnapshot>, Error> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let index = self.shard_of(id);
        if let Some(cluster) = self.inner.cluster.as_ref().filter(|c| !c.owns(index)) {
            // Another node runs that shard: it is asked.
            return cluster.drone(id).await;
        }
        let (reply, rx) = oneshot::channel();
        let shard = &self.inner.shards[index];
        shard.send_async(ShardMsg::Drone { id, reply }).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }
}
