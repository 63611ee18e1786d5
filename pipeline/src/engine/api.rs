//! The engine seen from the edges: the contract traits ([`BatchSink`], [`StreamSource`],
//! [`WorkQueues`], [`FleetControl`]) the ingest and the services program against.

use super::*;

/// Resolves when the backend has made a batch durable (or refused it).
#[derive(Debug)]
pub struct AckFuture(oneshot::Receiver<Result<(), Error>>);

impl AckFuture {
    /// Resolves with what is sent on the other end (a dropped sender: shutting down).
    pub fn new(rx: oneshot::Receiver<Result<(), Error>>) -> Self {
        Self(rx)
    }
}

impl Future for AckFuture {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or(Err(Error::ShuttingDown)))
    }
}

impl Engine {
    fn refuse_when_stopping(&self) -> Result<(), Error> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        Ok(())
    }
}

impl BatchSink for Engine {
    type Ack = AckFuture;

    async fn submit(&self, batch: TelemetryBatch) -> Result<Self::Ack, Error> {
        self.refuse_when_stopping()?;
        self.inner.backend.submit(batch).await
    }
}

impl StreamSource for Engine {
    fn subscribe_telemetry_from(&self, from: StartAt) -> Result<OffsetSubscription<DroneEvent>, Error> {
        self.inner.backend.follow_telemetry(from)
    }

    fn subscribe_deliveries_from(&self, from: StartAt) -> Result<OffsetSubscription<DeliveryEvent>, Error> {
        self.inner.backend.follow_deliveries(from)
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
        self.inner.backend.check_cursor(topic, next)?;
        let now = events::now_us();
        self.inner.cursors.commit(topic, name, next, now)?;
        self.inner.backend.share_cursor(topic, name, crate::cursor::Cursor { next, updated_us: now });
        Ok(())
    }

    fn subscribe_deliveries(&self, overflow: Overflow) -> Result<Subscription<DeliveryEvent>, Error> {
        Ok(self.inner.deliveries.subscribe(overflow))
    }
}

impl Engine {
    /// Serves `queue` from `backend` from now on (set before consumers attach).
    pub fn use_queue_backend(&self, queue: QueueName, backend: Arc<dyn QueueBackend>) {
        let mut backends = self.inner.queue_backends.write();
        backends.retain(|(name, _)| *name != queue);
        backends.push((queue, backend));
    }

    /// What keeps `queue`.
    pub fn queue_backend(&self, queue: QueueName) -> Arc<dyn QueueBackend> {
        let kept = self.inner.queue_backends.read().iter().find(|(name, _)| *name == queue).map(|(_, q)| q.clone());
        kept.unwrap_or_else(|| Arc::new(Embedded::new(self.inner.queues.clone(), queue)))
    }
}

impl WorkQueues for Engine {
    async fn enqueue(&self, queue: QueueName, key: u64, payload: Vec<u8>) -> Result<u64, Error> {
        self.queue_backend(queue).enqueue(key, None, payload).await
    }

    async fn enqueue_once(&self, queue: QueueName, key: u64, id: String, payload: Vec<u8>) -> Result<u64, Error> {
        self.queue_backend(queue).enqueue(key, Some(id), payload).await
    }

    async fn lease(
        &self,
        queue: QueueName,
        consumer: u64,
        keys: KeyRange,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Leased>, Error> {
        self.refuse_when_stopping()?;
        let leased = self.queue_backend(queue).lease(consumer, keys, max, wait).await?;
        if queue == QueueName::DroneCommands {
            self.missions_sent(consumer, &leased);
        }
        Ok(leased)
    }

    fn settle(&self, queue: QueueName, id: u64, token: u64, verdict: Verdict) -> Result<(), Error> {
        let answer = (queue == QueueName::DroneCommands).then(|| match &verdict {
            Verdict::Ack => serde_json::Value::from("ack"),
            Verdict::Nack(reason) => format!("nack: {reason}").into(),
        });
        self.queue_backend(queue).settle(id, token, verdict)?;
        if let Some(answer) = answer {
            self.mission_answered(id, answer);
        }
        Ok(())
    }

    fn release(&self, queue: QueueName, consumer: u64) {
        self.queue_backend(queue).release(consumer);
    }

    async fn withdraw(
        &self,
        queue: QueueName,
        key: u64,
        matches: &(dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> Result<usize, Error> {
        self.queue_backend(queue).withdraw(key, matches).await
    }

    fn attach(&self, queue: QueueName, keys: KeyRange) -> Result<u64, Error> {
        self.queue_backend(queue).attach(keys)
    }
}

/// Missions remembered between their send and their answer, at most (for the `mission.ack`
/// span); past it, those older than a lease are forgotten, and with none such the answer of a
/// new one goes unrecorded.
const MISSIONS_REMEMBERED: usize = 65_536;

impl Engine {
    /// Records derived delivery events and missions as spans of their deliveries in `spans`
    /// (the first call wins).
    pub fn keep_spans(&self, spans: services::spans::Spans) {
        let _ = self.inner.recorder.set(spans);
    }

    /// Records a `mission.send` span for each mission leased to a drone's connection.
    fn missions_sent(&self, consumer: u64, leased: &[Leased]) {
        let Some(spans) = self.inner.recorder.get().filter(|s| s.is_on()) else { return };
        let now = events::now_us();
        let mut out = self.inner.missions_out.lock();
        for m in leased {
            let Ok(mission) = events::Mission::from_bytes(&m.payload) else { continue };
            let parent = mission.trace;
            let span = parent.child();
            let kind = match mission.kind {
                events::MissionKind::Fly => "fly",
                events::MissionKind::ReturnToBase => "return_to_base",
            };
            let attributes = services::spans::attrs([
                ("mission_id", m.id.into()),
                ("drone_id", mission.drone_id.into()),
                ("attempt", m.attempt.into()),
                ("kind", kind.into()),
                ("consumer", consumer.into()),
            ]);
            let of = services::spans::SpanOf::new(mission.delivery_id, "mission.send", "engine");
            spans.record(of.in_span(span, parent.is_some().then_some(parent)).with(attributes), now, 0);
            if out.len() >= MISSIONS_REMEMBERED {
                let lease_us = 600_000_000;
                out.retain(|_, (_, _, sent)| now.saturating_sub(*sent) < lease_us);
            }
            if out.len() < MISSIONS_REMEMBERED {
                out.insert(m.id, (mission.delivery_id, span, now));
            }
        }
    }

    /// Records a `mission.ack` span for a drone's answer to a mission: from the send.
    fn mission_answered(&self, id: u64, answer: serde_json::Value) {
        let Some(spans) = self.inner.recorder.get().filter(|s| s.is_on()) else { return };
        let Some((delivery, sent_span, sent_us)) = self.inner.missions_out.lock().remove(&id) else { return };
        let now = events::now_us();
        let attributes = services::spans::attrs([("mission_id", id.into()), ("answer", answer)]);
        let of = services::spans::SpanOf::new(delivery, "mission.ack", "engine").under(sent_span);
        spans.record(of.with(attributes), sent_us, now.saturating_sub(sent_us));
    }
}

impl FleetControl for Engine {
    async fn command(&self, cmd: DeliveryCommand) -> Result<(), Error> {
        self.command_traced(cmd, TraceContext::default()).await
    }

    async fn command_traced(&self, cmd: DeliveryCommand, trace: TraceContext) -> Result<(), Error> {
        // Stamped before it is logged: a replay of the command derives the same events.
        let cmd = cmd.stamped(events::now_us());
        self.refuse_when_stopping()?;
        self.inner.backend.command(cmd, trace).await
    }

    async fn drone(&self, id: DroneId) -> Result<Option<DroneSnapshot>, Error> {
        self.refuse_when_stopping()?;
        let index = self.shard_of(id);
        if let Some(remote) = self.inner.backend.remote_drone(index, id) {
            // Another node runs that shard: it is asked.
            return remote.await;
        }
        let (reply, rx) = oneshot::channel();
        let shard = &self.inner.shards[index];
        shard.send_async(ShardMsg::Drone { id, reply }).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }
}
