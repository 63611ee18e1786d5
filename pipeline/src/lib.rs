//! The fleetstream engine and the composition of the `pipeline` binary.
//!
//! - [`derive`]: the pure state machine that turns drone events into delivery events.
//! - [`bus`]: in-process fan-out of batches to subscribers.
//! - [`engine`]: router, shard threads and fan-out thread around them; implements the
//!   contract traits of `events` so the ingest and the services can drive it.
//! - [`config`]: the typed configuration of `pipeline serve`.
//! - [`node`]: starts ingest, engine and services from a config and stops them in order.

pub mod bus;
pub mod checkpoint;
pub mod config;
pub mod dedup;
pub mod derive;
pub mod engine;
pub mod log;
pub mod node;

pub use config::Config;
pub use engine::{Engine, EngineConfig};
pub use node::Node;

/// Errors of the engine and of composing a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// A file or socket operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The ingest server failed.
    #[error(transparent)]
    Ingest(#[from] ingest::Error),
    /// The durable log or a checkpoint failed.
    #[error(transparent)]
    Log(#[from] log::LogError),
    /// The engine refused an operation.
    #[error(transparent)]
    Engine(#[from] events::Error),
    /// A background task failed.
    #[error("task failed: {0}")]
    Task(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io("starting engine threads".into(), e)
    }
}
