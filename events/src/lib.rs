//! The fleetstream contract: the domain types every crate shares ([`model`]), the batch wire
//! format and its validation ([`wire`]), the single error type ([`Error`]) and the traits the
//! edges program against ([`contract`]).
//!
//! This crate has no async runtime and no sockets; everything here is plain data and pure
//! functions, so the ingest, the engine, the services and the tools can all depend on it.
//!
//! Data flow: a producer builds [`DroneEvent`]s, encodes them with [`wire::Batch::encode`] and
//! sends the frame; the ingest reads the frame into a [`wire::Buffer`], validates it once with
//! [`wire::Batch::validate`] and hands the [`wire::TelemetryBatch`] to a [`BatchSink`]; the engine
//! reads the events in place and publishes derived [`DeliveryEvent`]s as
//! [`wire::DeliveryBatch`]es in the same format.

pub mod contract;
mod error;
pub mod json;
pub mod limits;
pub mod model;
pub mod prom;
pub mod queue;
pub mod trace;
pub mod wire;

pub use contract::{BatchSink, FleetControl, OffsetSubscription, Overflow, StartAt, StreamSource, Subscription, Topic};
pub use error::{Error, all_codes, code_name};
pub use model::*;
pub use queue::{KeyRange, Leased, Mission, MissionKind, QueueName, Verdict, WorkQueues};
pub use wire::{Batch, BatchMeta, DeliveryBatch, Limits, TelemetryBatch, TraceContext};

/// Microseconds since the Unix epoch, from the system clock: the time base of every event
/// timestamp. Only drivers call this; the pure state machines take time as an argument.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
