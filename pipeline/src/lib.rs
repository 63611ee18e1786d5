//! The fleetstream engine and the composition of the `pipeline` binary.
//!
//! - [`derive`]: the pure state machine that turns drone events into delivery events.
//! - [`bus`]: in-process fan-out of batches to subscribers.
//! - [`engine`]: router, shard threads and fan-out thread around them; implements the
//!   contract traits of `events` so the ingest and the services can drive it.
//! - [`config`]: the typed configuration of `pipeline serve`.
//! - [`node`]: starts ingest, engine and services from a config and stops them in order.

pub mod bus;
pub mod derive;
pub mod engine;

pub use engine::{Engine, EngineConfig};
