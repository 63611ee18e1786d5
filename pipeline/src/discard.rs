//! The transport ceiling: a sink that takes every batch the ingest validated and drops it.
//!
//! `pipeline serve --discard` serves QUIC, TLS and batch validation exactly as a node does,
//! then discards; `loadgen --raw` against it measures what the transport alone can carry, so a
//! full run can be quoted as a fraction of it.

use std::future::{Ready, ready};
use std::sync::atomic::{AtomicU64, Ordering};

use events::{
    BatchSink, DeliveryEvent, DroneEvent, Error, OffsetSubscription, Overflow, StreamSource, Subscription,
    TelemetryBatch,
};

/// Counts and drops.
#[derive(Debug, Default)]
pub struct Discard {
    /// Batches taken.
    pub batches: AtomicU64,
    /// Events in them.
    pub events: AtomicU64,
}

const NO_SUBSCRIPTIONS: Error = Error::MalformedFrame("a discard server serves no subscriptions");
const NO_QUEUES: Error = Error::MalformedFrame("a discard server serves no queues");

impl BatchSink for Discard {
    type Ack = Ready<Result<(), Error>>;

    async fn submit(&self, batch: TelemetryBatch) -> Result<Self::Ack, Error> {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(ready(Ok(())))
    }
}

impl StreamSource for Discard {
    fn subscribe_telemetry_from(&self, _from: events::StartAt) -> Result<OffsetSubscription<DroneEvent>, Error> {
        Err(NO_SUBSCRIPTIONS)
    }

    fn subscribe_deliveries_from(&self, _from: events::StartAt) -> Result<OffsetSubscription<DeliveryEvent>, Error> {
        Err(NO_SUBSCRIPTIONS)
    }

    fn subscribe_telemetry(&self, _: Overflow) -> Result<Subscription<DroneEvent>, Error> {
        Err(NO_SUBSCRIPTIONS)
    }

    fn subscribe_deliveries(&self, _: Overflow) -> Result<Subscription<DeliveryEvent>, Error> {
        Err(NO_SUBSCRIPTIONS)
    }
}

impl events::WorkQueues for Discard {
    async fn enqueue(&self, _: events::QueueName, _: u64, _: Vec<u8>) -> Result<u64, Error> {
        Err(NO_QUEUES)
    }

    async fn lease(
        &self,
        _: events::QueueName,
        _: u64,
        _: events::KeyRange,
        _: usize,
        _: std::time::Duration,
    ) -> Result<Vec<events::Leased>, Error> {
        Err(NO_QUEUES)
    }

    fn settle(&self, _: events::QueueName, id: u64, _: u64, _: events::Verdict) -> Result<(), Error> {
        Err(Error::UnknownMessage(id))
    }

    fn release(&self, _: events::QueueName, _: u64) {}

    fn attach(&self, _: events::QueueName, _: events::KeyRange) -> Result<u64, Error> {
        Ok(1)
    }
}
