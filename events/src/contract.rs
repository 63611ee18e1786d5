//! The traits the edges program against, so that `ingest` and `services` never depend on the
//! engine: the ingest hands batches to a [`BatchSink`] and serves subscriptions from a
//! [`StreamSource`]; the services drive deliveries through [`FleetControl`]. The `pipeline`
//! crate implements all three and composes the parts.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::Error;
use crate::model::{DeliveryCommand, DeliveryEvent, DroneEvent, DroneId, DroneSnapshot};
use crate::wire::{Batch, Payload, TelemetryBatch};

/// Where validated telemetry batches go.
pub trait BatchSink: Send + Sync + 'static {
    /// Resolves when the batch is safe under the engine's durability policy: the moment the
    /// ingest may acknowledge it to the sender.
    type Ack: Future<Output = Result<(), Error>> + Send + 'static;

    /// Takes a batch in order. The returned future waits while the engine is full (that wait is
    /// the backpressure the ingest passes on to the sender) and yields the [`Self::Ack`] once the
    /// batch is queued; batches submitted one after another by one caller keep their order.
    fn submit(&self, batch: TelemetryBatch) -> impl Future<Output = Result<Self::Ack, Error>> + Send;
}

/// The streams a subscriber can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Every accepted telemetry batch, as received.
    DroneTelemetry,
    /// Every derived delivery event.
    DeliveryEvents,
}

impl Topic {
    /// The topic's public name.
    pub const fn name(self) -> &'static str {
        match self {
            Topic::DroneTelemetry => "drone-telemetry",
            Topic::DeliveryEvents => "delivery-events",
        }
    }

    /// Parses a public name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "drone-telemetry" => Some(Topic::DroneTelemetry),
            "delivery-events" => Some(Topic::DeliveryEvents),
            _ => None,
        }
    }
}

/// What happens when a subscriber's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// The publisher waits: nothing is dropped, and a slow subscriber slows the pipeline. Only
    /// for a consumer that never waits on the pipeline itself (a shard, a command, a query):
    /// the publisher blocked on it would then wait in a cycle. A consumer that must see
    /// everything and may call back into the pipeline follows the log instead
    /// ([`StreamSource::subscribe_deliveries_from`]).
    Block,
    /// The subscriber is cut off with [`Error::Lagged`]; the pipeline never waits for it. For
    /// remote subscribers, whose speed the server does not control.
    Disconnect,
}

/// A live subscription: batches arrive on `rx` in publication order. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription<T: Payload> {
    /// The batches, shared with every other subscriber (nothing is copied per subscriber).
    pub rx: flume::Receiver<Arc<Batch<T>>>,
    lagged: Arc<AtomicBool>,
}

impl<T: Payload> Subscription<T> {
    /// Creates a subscription whose publisher marks `lagged` when it cuts the subscriber off.
    pub fn new(rx: flume::Receiver<Arc<Batch<T>>>, lagged: Arc<AtomicBool>) -> Self {
        Self { rx, lagged }
    }

    /// Why the stream ended: [`Error::Lagged`] if the subscriber was cut off, otherwise
    /// [`Error::ShuttingDown`].
    pub fn end_reason(&self) -> Error {
        if self.lagged.load(Ordering::Acquire) { Error::Lagged } else { Error::ShuttingDown }
    }
}

/// Where an offset subscription starts reading its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest batch retention has kept.
    Earliest,
    /// The first batch appended after the subscription is in place: nothing older, nothing
    /// missed.
    Latest,
    /// This log offset (an [`Error::OffsetUnavailable`] if the log no longer or not yet holds it).
    Offset(u64),
    /// The first batch whose first event was created at or after this time (µs since the
    /// epoch); the end of the log if none was.
    Time(u64),
}

impl StartAt {
    /// The position as it travels on the wire: a kind byte and a value.
    pub fn to_wire(self) -> (u8, u64) {
        match self {
            StartAt::Offset(offset) => (0, offset),
            StartAt::Earliest => (1, 0),
            StartAt::Latest => (2, 0),
            StartAt::Time(us) => (3, us),
        }
    }

    /// Reads a position from the wire; an unknown kind is a malformed request.
    pub fn from_wire(kind: u8, value: u64) -> Result<Self, Error> {
        match kind {
            0 => Ok(StartAt::Offset(value)),
            1 => Ok(StartAt::Earliest),
            2 => Ok(StartAt::Latest),
            3 => Ok(StartAt::Time(value)),
            _ => Err(Error::MalformedFrame("unknown subscription start position")),
        }
    }
}

/// A subscription to a log (telemetry or delivery events) from a chosen offset: every batch from there on, in log
/// order, each with its offset, historical and then live. Dropping it unsubscribes. An error
/// (the subscriber fell behind retention, the engine stopped) arrives in-band and ends it.
#[derive(Debug)]
pub struct OffsetSubscription<T: Payload> {
    /// The offset the subscription starts at, with [`StartAt`] resolved.
    pub start: u64,
    /// Batches with their log offsets.
    pub rx: flume::Receiver<LogItem<T>>,
}

/// One item of an [`OffsetSubscription`]: a batch and its log offset, or why the stream ended.
pub type LogItem<T> = Result<(u64, Arc<Batch<T>>), Error>;

/// Source of live streams.
pub trait StreamSource: Send + Sync + 'static {
    /// Subscribes to the telemetry log from `from`, then follows it live. Each subscriber reads
    /// at its own pace from the log; a slow one delays only itself.
    fn subscribe_telemetry_from(&self, from: StartAt) -> Result<OffsetSubscription<DroneEvent>, Error>;
    /// Subscribes to the delivery-events log in the same way.
    fn subscribe_deliveries_from(&self, from: StartAt) -> Result<OffsetSubscription<DeliveryEvent>, Error>;

    /// Where the named cursor of `topic` stands: the next offset its subscriber reads. `None`
    /// for a cursor never committed.
    fn cursor(&self, topic: Topic, name: &str) -> Result<Option<u64>, Error> {
        let _ = (topic, name);
        Ok(None)
    }

    /// Moves a named cursor: its subscriber has processed everything before `next`. A
    /// subscriber that reconnects under the same name resumes there.
    fn commit_cursor(&self, topic: Topic, name: &str, next: u64) -> Result<(), Error> {
        let _ = (topic, name, next);
        Err(Error::MalformedFrame("this source keeps no cursors"))
    }

    /// Subscribes to telemetry from now on.
    fn subscribe_telemetry(&self, overflow: Overflow) -> Result<Subscription<DroneEvent>, Error>;
    /// Subscribes to delivery events from now on.
    fn subscribe_deliveries(&self, overflow: Overflow) -> Result<Subscription<DeliveryEvent>, Error>;
}

/// Longest cursor name.
pub const MAX_CURSOR_NAME: usize = 64;

/// Checks a cursor name: 1 to 64 ASCII letters, digits, `-`, `_` or `.`.
pub fn valid_cursor_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CURSOR_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(()) } else { Err(Error::MalformedFrame("a cursor name is 1 to 64 of A-Z a-z 0-9 - _ .")) }
}

/// What the scheduling edge needs from the engine.
pub trait FleetControl: Send + Sync + 'static {
    /// Applies a delivery command on the assigned drone's shard, in order with that drone's
    /// telemetry, and resolves once it has been applied (so the delivery exists before the drone
    /// is told to fly).
    fn command(&self, cmd: DeliveryCommand) -> impl Future<Output = Result<(), Error>> + Send;

    /// The engine's latest state of a drone, `None` if it never reported.
    fn drone(&self, id: DroneId) -> impl Future<Output = Result<Option<DroneSnapshot>, Error>> + Send;

    /// [`FleetControl::command`] as part of the trace `trace`: the delivery events it derives
    /// carry it. An engine that does not trace ignores it.
    fn command_traced(
        &self,
        cmd: DeliveryCommand,
        trace: crate::TraceContext,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        let _ = trace;
        self.command(cmd)
    }
}

impl<T: FleetControl> FleetControl for Arc<T> {
    fn command(&self, cmd: DeliveryCommand) -> impl Future<Output = Result<(), Error>> + Send {
        (**self).command(cmd)
    }

    fn drone(&self, id: DroneId) -> impl Future<Output = Result<Option<DroneSnapshot>, Error>> + Send {
        (**self).drone(id)
    }

    fn command_traced(
        &self,
        cmd: DeliveryCommand,
        trace: crate::TraceContext,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        (**self).command_traced(cmd, trace)
    }
}

impl<T: crate::WorkQueues> crate::WorkQueues for Arc<T> {
    fn enqueue(
        &self,
        queue: crate::QueueName,
        key: u64,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        (**self).enqueue(queue, key, payload)
    }

    fn enqueue_once(
        &self,
        queue: crate::QueueName,
        key: u64,
        id: String,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        (**self).enqueue_once(queue, key, id, payload)
    }

    fn lease(
        &self,
        queue: crate::QueueName,
        consumer: u64,
        keys: crate::KeyRange,
        max: usize,
        wait: std::time::Duration,
    ) -> impl Future<Output = Result<Vec<crate::Leased>, Error>> + Send {
        (**self).lease(queue, consumer, keys, max, wait)
    }

    fn settle(&self, queue: crate::QueueName, id: u64, token: u64, verdict: crate::Verdict) -> Result<(), Error> {
        (**self).settle(queue, id, token, verdict)
    }

    fn release(&self, queue: crate::QueueName, consumer: u64) {
        (**self).release(queue, consumer);
    }

    fn attach(&self, queue: crate::QueueName, keys: crate::KeyRange) -> Result<u64, Error> {
        (**self).attach(queue, keys)
    }

    fn withdraw<'a>(
        &'a self,
        queue: crate::QueueName,
        key: u64,
        matches: &'a (dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> impl Future<Output = Result<usize, Error>> + Send + 'a {
        (**self).withdraw(queue, key, matches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_positions_round_trip_and_unknown_kinds_are_refused() {
        for start in
            [StartAt::Earliest, StartAt::Latest, StartAt::Offset(0), StartAt::Offset(u64::MAX), StartAt::Time(17)]
        {
            let (kind, value) = start.to_wire();
            assert_eq!(StartAt::from_wire(kind, value).ok(), Some(start));
        }
        assert!(matches!(StartAt::from_wire(9, 0), Err(Error::MalformedFrame(_))));
    }

    #[test]
    fn cursor_names_are_short_and_plain() {
        for good in ["history", "dash-1", "svc.delivery_2"] {
            assert!(valid_cursor_name(good).is_ok(), "{good}");
        }
        for bad in ["", "has space", "ünïcode", &"x".repeat(65)] {
            assert!(valid_cursor_name(bad).is_err(), "{bad}");
        }
    }
}
