//! QUIC ingest for fleetstream: the server that receives telemetry batches and serves
//! subscriptions ([`server`]), the client library drones, gateways and `loadgen` use
//! ([`client`]), the stream framing they share ([`proto`]), TLS ([`tls`]) and the UDP sockets
//! under both ([`udp`]).
//!
//! The crate depends on the contract in `events` only: the server hands batches to any
//! `events::BatchSink` and serves any `events::StreamSource`, so it never sees the engine.
//!
//! ALPN: `fleetstream/1` ([`ALPN`]). TLS 1.3 only.

pub mod client;
pub mod consume;
pub mod lograte;
pub mod producer;
pub mod proto;
pub mod runtime;
pub mod server;
pub mod tls;
pub mod udp;

use std::net::SocketAddr;

pub use client::{Answer, ClientConfig, IngestClient, Lane, LogSubscription, RemoteSubscription};
pub use consume::QueueConsumer;
pub use producer::{Producer, ProducerConfig, ProducerStats};
pub use server::{IngestMetrics, IngestServer, ServerConfig};
pub use tls::Trust;

/// The ALPN protocol id of the fleetstream ingest protocol, version 1.
pub const ALPN: &[u8] = b"fleetstream/1";

/// Errors of the ingest server and client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The UDP socket could not be bound.
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// Another socket error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Certificates, keys or the TLS configuration.
    #[error("TLS: {0}")]
    Tls(String),
    /// An invalid setting.
    #[error("configuration: {0}")]
    Config(String),
    /// The connection could not be started.
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("writing: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("reading: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream is closed.
    #[error("stream closed")]
    Closed,
    /// A batch or rejection in the wire format.
    #[error(transparent)]
    Wire(#[from] events::Error),
}
