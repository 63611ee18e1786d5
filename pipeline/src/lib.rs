//! The fleetstream engine and the composition of the `pipeline` binary.
//!
//! - [`derive`]: the pure state machine that turns drone events into delivery events.
//! - [`bus`]: in-process fan-out of batches to subscribers.
//! - [`engine`]: router, shard threads and fan-out thread around them; implements the
//!   contract traits of `events` so the ingest and the services can drive it.
//! - [`config`]: the typed configuration of `pipeline serve`.
//! - [`node`]: starts ingest, engine and services from a config and stops them in order.
//! - [`roles`] and [`gateway`]: split mode, each service a process of its own behind one
//!   public entry.

pub mod admin;
pub mod bus;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod cursor;
pub mod dashboard;
pub mod datadir;
pub mod dedup;
pub mod derive;
pub mod discard;
pub mod engine;
pub mod gateway;
pub mod intake;
pub mod jetstream;
pub mod log;
pub mod mqtt;
pub mod node;
pub mod queue;
pub mod roles;

pub use config::Config;

/// A boxed future, so the seams' traits can be used as objects.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
pub use engine::{Engine, EngineConfig};
pub use node::Node;

/// Errors of the engine, its durable log and checkpoints, and of composing a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A log record (or checkpoint) before the end of the data is damaged.
    #[error(
        "corrupt record in {segment} at byte {position} (offset {offset}): {reason}; records before it are intact — run `pipeline inspect` for details"
    )]
    Corrupt {
        /// The file.
        segment: std::path::PathBuf,
        /// Byte position in that file.
        position: u64,
        /// The offset the record should have had.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The log is at its size cap or the disk is full; nothing was written.
    #[error("storage full: {0}")]
    Full(String),
    /// The offset is no longer (or not yet) in the log.
    #[error("offset {requested} is not available; the log holds {first}..{next}")]
    OutOfRange {
        /// The offset asked for.
        requested: u64,
        /// First offset held.
        first: u64,
        /// Next offset to be written.
        next: u64,
    },
    /// The ingest server failed.
    #[error(transparent)]
    Ingest(#[from] ingest::Error),
    /// The engine refused an operation.
    #[error(transparent)]
    Engine(#[from] events::Error),
    /// A background task failed.
    #[error("task failed: {0}")]
    Task(String),
    /// Another process holds the data directory (see [`datadir`]).
    #[error(
        "data directory {dir} is in use by another fleetstream process ({holder}); stop it first, or give this one another --data-dir"
    )]
    DataDirInUse {
        /// The directory.
        dir: std::path::PathBuf,
        /// What the lock file says of its holder (`pid N`).
        holder: String,
    },
    /// NATS JetStream refused or failed an operation.
    #[error("jetstream: {0}")]
    JetStream(String),
}

impl From<std::io::Error> for Error {
    fn from(source: std::io::Error) -> Self {
        Error::Io { context: "starting engine threads".into(), source }
    }
}
