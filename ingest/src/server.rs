//! The QUIC ingest server.
//!
//! ```text
//! endpoint ─► connection task (one per client, capped by a semaphore)
//!               └─► stream task (one per bidirectional stream)
//!                     ingest:    read frame ─► validate ─► sink.submit ─► ack queue ─► writer ─► response
//!                     subscribe: subscription ─► write frames
//! ```
//!
//! Backpressure: a stream task reads the next frame only after the previous one was submitted,
//! and `submit` waits while the engine is full, so the server stops reading and QUIC flow control
//! stops the sender; the per-stream ack queue is bounded too. Memory per stream is therefore one
//! frame being read plus the QUIC receive window.
//!
//! Bad input: a frame that fails validation is answered with a typed rejection, logged and
//! counted, and the stream goes on with the next frame. A header that cannot be trusted (bad
//! magic, unknown version, over the size limit) leaves the stream out of step, so after rejecting
//! it the server stops reading that stream; the connection and every other stream carry on.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use events::wire::{Batch, BatchHeader, Buffer, HEADER_LEN, Payload};
use events::{
    BatchSink, Error as WireError, Limits, Overflow, StartAt, StreamSource, Subscription, TelemetryBatch, Topic,
    WorkQueues,
};
use quinn::{ReadExactError, RecvStream, SendStream, VarInt};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::Error;
use crate::proto::{
    Response, STREAM_CONSUME, STREAM_INGEST, STREAM_SUBSCRIBE, STREAM_SUBSCRIBE_CURSOR, STREAM_SUBSCRIBE_FROM,
    TOPIC_DELIVERIES, TOPIC_TELEMETRY,
};
use crate::tls::{Identity, server_crypto};

/// Settings of the ingest server. Every field has a default; see each for why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// UDP address to listen on. Default `127.0.0.1:4433`: loopback until an operator decides
    /// to expose it.
    pub listen: SocketAddr,
    /// PEM certificate chain. Unset: a self-signed certificate is used, generated on first
    /// start and kept in `self_signed_dir` (or generated afresh each start when that is unset).
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA certificates. Set: every client must present a certificate signed by one of
    /// them, or its handshake fails (refused connections are counted). Unset (the default):
    /// clients are not asked for one.
    pub client_ca: Option<PathBuf>,
    /// Where a self-signed identity is kept across restarts (`ingest-cert.pem`,
    /// `ingest-key.pem`), and the keys of the QUIC endpoint (`quic-endpoint.key`: connection
    /// ids and stateless resets that outlive a restart, so clients of a crashed server learn at
    /// their next packet that their connection is gone, instead of after an idle timeout).
    /// `pipeline serve` sets it to `DATA_DIR/tls`.
    #[serde(skip)]
    pub self_signed_dir: Option<PathBuf>,
    /// Largest batch body accepted, bytes. Default 4 MiB (see `events::wire`).
    pub max_body_bytes: u32,
    /// Most events in one batch. Default 65,536.
    pub max_events: u32,
    /// Concurrent connections; more are refused. Default 16,384: room for one connection per
    /// drone in a fleet of ten thousand, at a few tens of kilobytes each.
    pub max_connections: usize,
    /// Concurrent bidirectional streams per connection. Default 64.
    pub max_streams_per_connection: u32,
    /// Batches a stream may have submitted but not yet answered. Default 64: enough to keep a
    /// durable log's group commit full without letting one stream pin much memory.
    pub max_inflight_per_stream: usize,
    /// QUIC receive window per stream, bytes. Default 4 MiB: at 1 GB/s and a 1 ms loopback
    /// round trip a sender needs about 1 MiB in flight; 4 MiB leaves room for scheduling jitter.
    pub stream_window_bytes: u64,
    /// QUIC receive window per connection, bytes. Default 16 MiB.
    pub connection_window_bytes: u64,
    /// Largest UDP payload QUIC path-MTU discovery may try, bytes. Default 65,527 (see
    /// [`crate::proto::DEFAULT_MAX_UDP_PAYLOAD`] for why); 1,452 keeps every packet inside an
    /// Ethernet frame from the start.
    pub max_udp_payload_bytes: u16,
    /// Kernel receive and send buffer asked for the UDP socket, bytes; 0 keeps the system's
    /// default. Default 4 MiB (see [`crate::udp`]: a small buffer drops packets whenever the
    /// server is descheduled for a few milliseconds, and every drop stalls a stream).
    pub udp_buffer_bytes: usize,
    /// UDP sockets sharing the listen address (`SO_REUSEPORT`), each with its own QUIC endpoint
    /// drained by a thread of its own (see [`crate::runtime`]). Default 1, which holds 10,000
    /// connections. The kernel spreads clients over several by address, each with its own
    /// kernel buffer and thread. A client whose address changes mid-connection (NAT rebinding,
    /// QUIC migration) then reaches a socket that does not know it and must reconnect (the
    /// producer re-sends what was unanswered), so keep 1 where drones roam. Unix only.
    pub sockets: usize,
    /// Close a connection after this long without traffic, ms. Default 30,000.
    pub idle_timeout_ms: u64,
    /// On shutdown, how long in-flight streams get to finish, ms. Default 5,000.
    pub drain_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            cert: None,
            key: None,
            client_ca: None,
            self_signed_dir: None,
            max_body_bytes: events::wire::DEFAULT_MAX_BODY_BYTES,
            max_events: events::wire::DEFAULT_MAX_EVENTS,
            max_connections: 16_384,
            max_streams_per_connection: 64,
            max_inflight_per_stream: 64,
            stream_window_bytes: 4 << 20,
            connection_window_bytes: 16 << 20,
            max_udp_payload_bytes: crate::proto::DEFAULT_MAX_UDP_PAYLOAD,
            udp_buffer_bytes: crate::udp::DEFAULT_UDP_BUFFER_BYTES,
            sockets: 1,
            idle_timeout_ms: 30_000,
            drain_timeout_ms: 5_000,
        }
    }
}

impl ServerConfig {
    fn limits(&self) -> Limits {
        Limits { max_body_bytes: self.max_body_bytes, max_events: self.max_events }
    }
}

/// Counters of the ingest server, rendered at `/metrics`.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    /// Connections open now.
    pub connections_open: AtomicI64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections refused at the limit.
    pub connections_refused: AtomicU64,
    /// Handshakes that failed: an untrusted or missing client certificate (with
    /// `client_ca`), a protocol error, a client that gave up.
    pub handshakes_failed: AtomicU64,
    /// Batches acknowledged.
    pub batches_accepted: AtomicU64,
    /// Events in acknowledged batches.
    pub events_accepted: AtomicU64,
    /// Frame bytes received.
    pub bytes_received: AtomicU64,
    /// Rejections by `events::Error` code.
    pub rejected: [AtomicU64; 32],
    /// Subscriptions open now.
    pub subscribers_open: AtomicI64,
}

impl IngestMetrics {
    fn count_rejection(&self, error: &WireError) {
        let code = usize::from(error.code()).min(31);
        self.rejected[code].fetch_add(1, Ordering::Relaxed);
    }

    /// Rejections of all kinds.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Rejections with one code.
    pub fn rejected_with(&self, code: u16) -> u64 {
        self.rejected[usize::from(code).min(31)].load(Ordering::Relaxed)
    }

    /// Appends the counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use events::prom::{counter, declare, gauge, sample};
        let c = |c: &AtomicU64| c.load(Ordering::Relaxed);
        gauge(out, "fleetstream_ingest_connections", self.connections_open.load(Ordering::Relaxed));
        counter(out, "fleetstream_ingest_connections_total", c(&self.connections_total));
        counter(out, "fleetstream_ingest_connections_refused_total", c(&self.connections_refused));
        counter(out, "fleetstream_ingest_handshakes_failed_total", c(&self.handshakes_failed));
        counter(out, "fleetstream_ingest_batches_total", c(&self.batches_accepted));
        counter(out, "fleetstream_ingest_events_total", c(&self.events_accepted));
        counter(out, "fleetstream_ingest_received_bytes_total", c(&self.bytes_received));
        gauge(out, "fleetstream_ingest_subscribers", self.subscribers_open.load(Ordering::Relaxed));
        declare(out, "fleetstream_ingest_batches_rejected_total", "counter");
        for (code, name) in events::all_codes() {
            let n = self.rejected_with(*code);
            if n > 0 {
                sample(out, "fleetstream_ingest_batches_rejected_total", "reason", name, n);
            }
        }
    }
}

/// A bound ingest endpoint (or several on one address), ready to [`serve`](IngestServer::serve).
#[derive(Debug)]
pub struct IngestServer {
    /// One per UDP socket ([`ServerConfig::sockets`]), all bound to `addr`.
    endpoints: Vec<quinn::Endpoint>,
    addr: SocketAddr,
    cfg: ServerConfig,
    certificate_pem: String,
    metrics: Arc<IngestMetrics>,
}

struct Ctx {
    limits: Limits,
    max_inflight: usize,
    metrics: Arc<IngestMetrics>,
    /// Warnings caused by peers, one line per reason per interval.
    log: crate::lograte::LogGate,
}

impl IngestServer {
    /// Binds the UDP socket and prepares TLS. Must run inside a tokio runtime.
    pub fn bind(cfg: &ServerConfig) -> Result<Self, Error> {
        let identity = match (&cfg.cert, &cfg.key) {
            (Some(cert), Some(key)) => Identity::from_files(cert, key)?,
            (None, None) => match &cfg.self_signed_dir {
                Some(dir) => {
                    crate::tls::persistent_self_signed(&dir.join("ingest-cert.pem"), &dir.join("ingest-key.pem"))?
                }
                None => Identity::self_signed()?,
            },
            _ => return Err(Error::Config("ingest.cert and ingest.key must be set together".into())),
        };
        let client_ca = match &cfg.client_ca {
            Some(path) => Some(
                std::fs::read_to_string(path).map_err(|e| Error::Tls(format!("reading {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto(&identity, client_ca.as_deref())?));
        server.transport_config(Arc::new(transport(cfg)?));
        let shared = cfg.sockets > 1;
        let first = crate::udp::bind(cfg.listen, cfg.udp_buffer_bytes, shared)?;
        // With port 0 the first socket picks the port; the others join it there.
        let addr = first.local_addr().map_err(|e| Error::Bind(cfg.listen, e))?;
        let mut sockets = vec![first];
        for _ in 1..cfg.sockets {
            sockets.push(crate::udp::bind(addr, cfg.udp_buffer_bytes, true)?);
        }
        let endpoint_cfg = match &cfg.self_signed_dir {
            Some(dir) => crate::tls::lasting_endpoint(&dir.join("quic-endpoint.key"))?,
            None => quinn::EndpointConfig::default(),
        };
        let endpoints = sockets
            .into_iter()
            .map(|socket| {
                // Each socket drained by a thread of its own (see `crate::runtime`).
                let runtime = crate::runtime::EndpointThread::start("quic-endpoint")?;
                quinn::Endpoint::new(endpoint_cfg.clone(), Some(server.clone()), socket, runtime)
                    .map_err(|e| Error::Bind(addr, e))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { endpoints, addr, cfg: cfg.clone(), certificate_pem: identity.chain_pem, metrics: Arc::default() })
    }

    /// The QUIC endpoints, one per UDP socket.
    pub fn endpoints(&self) -> &[quinn::Endpoint] {
        &self.endpoints
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.addr)
    }

    /// The served certificate chain in PEM, for clients to trust.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The server's counters.
    pub fn metrics(&self) -> Arc<IngestMetrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets open streams finish what
    /// they already submitted (up to `drain_timeout_ms`), and closes.
    pub async fn serve<E>(self, engine: Arc<E>, shutdown: impl Future<Output = ()>) -> Result<(), Error>
    where
        E: BatchSink + StreamSource + WorkQueues,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let permits = Arc::new(Semaphore::new(self.cfg.max_connections));
        let ctx = Arc::new(Ctx {
            limits: self.cfg.limits(),
            max_inflight: self.cfg.max_inflight_per_stream.max(1),
            metrics: self.metrics.clone(),
            log: crate::lograte::LogGate::default(),
        });
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        // Each endpoint's new connections come through one queue, so one loop admits them all.
        let (incoming_tx, mut incoming_rx) = tokio::sync::mpsc::channel::<quinn::Incoming>(64);
        let mut acceptors = JoinSet::new();
        for endpoint in &self.endpoints {
            let (endpoint, tx) = (endpoint.clone(), incoming_tx.clone());
            acceptors.spawn(async move {
                while let Some(incoming) = endpoint.accept().await {
                    if tx.send(incoming).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(incoming_tx);
        info!(addr = %self.local_addr()?, sockets = self.endpoints.len(), "ingest listening");
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                incoming = incoming_rx.recv() => {
                    let Some(incoming) = incoming else { break };
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        self.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                        if let Some(left_out) = ctx.log.allow("max_connections", std::time::Instant::now()) {
                            warn!(peer = %incoming.remote_address(), left_out, "connection refused: at max_connections");
                        }
                        incoming.refuse();
                        continue;
                    };
                    let (engine, ctx, stop) = (engine.clone(), ctx.clone(), stop_rx.clone());
                    connections.spawn(async move {
                        connection(incoming, engine, ctx, stop).await;
                        drop(permit);
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        acceptors.abort_all();
        incoming_rx.close();
        while let Ok(incoming) = incoming_rx.try_recv() {
            incoming.refuse();
        }
        info!(connections = connections.len(), "ingest draining");
        let _ = stop_tx.send(true);
        let drain = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_millis(self.cfg.drain_timeout_ms), drain).await.is_err() {
            warn!("ingest drain timed out; closing the remaining connections");
            connections.abort_all();
        }
        for endpoint in &self.endpoints {
            endpoint.close(VarInt::from_u32(0), b"server shutting down");
        }
        for endpoint in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
        info!("ingest stopped");
        Ok(())
    }
}

fn transport(cfg: &ServerConfig) -> Result<quinn::TransportConfig, Error> {
    let varint = |v: u64, what: &str| VarInt::from_u64(v).map_err(|_| Error::Config(format!("{what} is too large")));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_streams_per_connection));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.stream_receive_window(varint(cfg.stream_window_bytes, "stream_window_bytes")?);
    t.receive_window(varint(cfg.connection_window_bytes, "connection_window_bytes")?);
    t.send_window(cfg.connection_window_bytes);
    t.mtu_discovery_config(Some(crate::proto::mtu_discovery(cfg.max_udp_payload_bytes)));
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    t.max_idle_timeout(Some(idle.try_into().map_err(|_| Error::Config("idle_timeout_ms is too large".into()))?));
    Ok(t)
}

async fn connection<E>(incoming: quinn::Incoming, engine: Arc<E>, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>)
where
    E: BatchSink + StreamSource + WorkQueues,
{
    let peer = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(error) => {
            ctx.metrics.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            if let Some(left_out) = ctx.log.allow("handshake", std::time::Instant::now()) {
                warn!(%peer, %error, left_out, "handshake failed");
            }
            return;
        }
    };
    ctx.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
    ctx.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    debug!(%peer, "connection open");
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(stream(send, recv, engine.clone(), ctx.clone(), stop.clone()));
                }
                Err(error) => {
                    debug!(%peer, %error, "connection closed");
                    break;
                }
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    while streams.join_next().await.is_some() {}
    conn.close(VarInt::from_u32(0), b"bye");
    ctx.metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
}

async fn stream<E>(send: SendStream, mut recv: RecvStream, engine: Arc<E>, ctx: Arc<Ctx>, stop: watch::Receiver<bool>)
where
    E: BatchSink + StreamSource + WorkQueues,
{
    let mut kind = [0u8; 1];
    if recv.read_exact(&mut kind).await.is_err() {
        return;
    }
    match kind[0] {
        STREAM_INGEST => ingest_stream(send, recv, engine, ctx, stop).await,
        STREAM_SUBSCRIBE => subscribe_stream(send, recv, engine, ctx, stop).await,
        STREAM_SUBSCRIBE_FROM => subscribe_from_stream(send, recv, engine, ctx, stop, false).await,
        STREAM_SUBSCRIBE_CURSOR => subscribe_from_stream(send, recv, engine, ctx, stop, true).await,
        STREAM_CONSUME => crate::consume::serve(send, recv, engine, stop).await,
        other => {
            let error = WireError::MalformedFrame("unknown stream kind");
            if let Some(left_out) = ctx.log.allow("stream_kind", std::time::Instant::now()) {
                warn!(kind = other, %error, left_out, "stream refused");
            }
            ctx.metrics.count_rejection(&error);
            let mut send = send;
            let _ = send.reset(VarInt::from_u32(u32::from(error.code())));
            let _ = recv.stop(VarInt::from_u32(u32::from(error.code())));
        }
    }
}

enum Pending<A> {
    Accepted { seq: u64, events: u32, ack: A },
    Rejected { seq: u64, events: u32, error: WireError },
}

async fn ingest_stream<E: BatchSink>(
    mut send: SendStream,
    mut recv: RecvStream,
    engine: Arc<E>,
    ctx: Arc<Ctx>,
    mut stop: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<Pending<E::Ack>>(ctx.max_inflight);
    let (metrics, log_ctx) = (ctx.metrics.clone(), ctx.clone());
    let writer = tokio::spawn(async move {
        let mut out = Vec::with_capacity(64);
        while let Some(pending) = rx.recv().await {
            let response = match pending {
                Pending::Accepted { seq, events, ack } => {
                    let result = ack.await;
                    match &result {
                        Ok(()) => {
                            metrics.batches_accepted.fetch_add(1, Ordering::Relaxed);
                            metrics.events_accepted.fetch_add(u64::from(events), Ordering::Relaxed);
                        }
                        Err(error) => {
                            metrics.count_rejection(error);
                            if let Some(left_out) = log_ctx.log.allow(error.name(), std::time::Instant::now()) {
                                warn!(%error, batch_seq = seq, left_out, "batch not acknowledged");
                            }
                        }
                    }
                    Response { batch_seq: seq, events, result }
                }
                Pending::Rejected { seq, events, error } => Response { batch_seq: seq, events, result: Err(error) },
            };
            out.clear();
            response.encode(&mut out);
            if send.write_all(&out).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });

    let peer_reject = |seq: u64, events: u32, error: WireError| {
        ctx.metrics.count_rejection(&error);
        if let Some(left_out) = ctx.log.allow(error.name(), std::time::Instant::now()) {
            warn!(%error, reason = error.name(), batch_seq = seq, left_out, "batch rejected");
        }
        Pending::Rejected { seq, events, error }
    };
    let mut header = [0u8; HEADER_LEN];
    loop {
        let read = tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            read = recv.read_exact(&mut header) => read,
        };
        match read {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(0)) => break,
            Err(ReadExactError::FinishedEarly(got)) => {
                let _ = tx.send(peer_reject(0, 0, WireError::Truncated { needed: HEADER_LEN, got })).await;
                break;
            }
            Err(ReadExactError::ReadError(error)) => {
                debug!(%error, "ingest stream ended");
                break;
            }
        }
        let parsed = match BatchHeader::parse(&header, &ctx.limits) {
            Ok(parsed) => parsed,
            Err(error) => {
                // The stream is out of step: answer, then stop reading it.
                let seq = if header[0..4] == events::wire::MAGIC { u64_at(&header, 24) } else { 0 };
                let code = VarInt::from_u32(u32::from(error.code()));
                let _ = tx.send(peer_reject(seq, 0, error)).await;
                let _ = recv.stop(code);
                break;
            }
        };
        let (seq, count) = (parsed.meta.batch_seq, parsed.event_count);
        let frame_len = parsed.frame_len();
        // The body is copied once, from QUIC's received chunks into the batch's own buffer
        // (never zero-filled first).
        let mut buf = Buffer::with_capacity(frame_len);
        buf.extend_from_slice(&header);
        let mut broken = false;
        while buf.len() < frame_len && !broken {
            match recv.read_chunk(frame_len - buf.len(), true).await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    let error = WireError::Truncated { needed: frame_len, got: buf.len() };
                    let _ = tx.send(peer_reject(seq, count, error)).await;
                    broken = true;
                }
                Err(error) => {
                    debug!(%error, "ingest stream ended mid-frame");
                    broken = true;
                }
            }
        }
        if broken {
            break;
        }
        ctx.metrics.bytes_received.fetch_add(frame_len as u64, Ordering::Relaxed);
        let pending = match TelemetryBatch::validate(buf, &ctx.limits) {
            Err(error) => peer_reject(seq, count, error),
            Ok(batch) => match engine.submit(batch).await {
                Ok(ack) => Pending::Accepted { seq, events: count, ack },
                Err(error) => peer_reject(seq, count, error),
            },
        };
        let shutting_down = matches!(&pending, Pending::Rejected { error: WireError::ShuttingDown, .. });
        if tx.send(pending).await.is_err() || shutting_down {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn subscribe_stream<E: StreamSource>(
    mut send: SendStream,
    mut recv: RecvStream,
    engine: Arc<E>,
    ctx: Arc<Ctx>,
    stop: watch::Receiver<bool>,
) {
    let mut topic = [0u8; 1];
    if recv.read_exact(&mut topic).await.is_err() {
        return;
    }
    ctx.metrics.subscribers_open.fetch_add(1, Ordering::Relaxed);
    match topic[0] {
        TOPIC_TELEMETRY => match engine.subscribe_telemetry(Overflow::Disconnect) {
            Ok(sub) => forward(&mut send, sub, stop).await,
            Err(error) => reset(&mut send, &error),
        },
        TOPIC_DELIVERIES => match engine.subscribe_deliveries(Overflow::Disconnect) {
            Ok(sub) => forward(&mut send, sub, stop).await,
            Err(error) => reset(&mut send, &error),
        },
        _ => reset(&mut send, &WireError::MalformedFrame("unknown topic")),
    }
    ctx.metrics.subscribers_open.fetch_sub(1, Ordering::Relaxed);
}

/// An offset subscription (stream kind 3), or a named one (kind 5): the request names a cursor
/// after the start position, the subscription starts at that cursor when it exists, and the
/// client commits on its side of the stream (u64 next offsets) as it processes.
async fn subscribe_from_stream<E: StreamSource>(
    send: SendStream,
    mut recv: RecvStream,
    engine: Arc<E>,
    ctx: Arc<Ctx>,
    stop: watch::Receiver<bool>,
    named: bool,
) {
    let mut request = [0u8; crate::proto::SUBSCRIBE_FROM_LEN];
    if recv.read_exact(&mut request).await.is_err() {
        return;
    }
    let (topic, mut from) = match crate::proto::decode_subscribe_from(&request) {
        Ok(request) => request,
        Err(error) => return refuse(&ctx, send, &error),
    };
    let mut name = None;
    if named {
        let mut len = [0u8; 1];
        if recv.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut raw = vec![0u8; usize::from(len[0])];
        if recv.read_exact(&mut raw).await.is_err() {
            return;
        }
        let n = match crate::proto::decode_cursor_name(raw) {
            Ok(n) => n,
            Err(error) => return refuse(&ctx, send, &error),
        };
        match engine.cursor(topic, &n) {
            Ok(Some(next)) => from = StartAt::Offset(next),
            Ok(None) => {}
            Err(error) => return refuse(&ctx, send, &error),
        }
        name = Some(n);
    }
    ctx.metrics.subscribers_open.fetch_add(1, Ordering::Relaxed);
    let commits = name.map(|name| {
        let engine = engine.clone();
        tokio::spawn(async move { read_commits(recv, engine, topic, name).await })
    });
    match topic {
        Topic::DroneTelemetry => match engine.subscribe_telemetry_from(from) {
            Ok(sub) => follow(send, sub, stop).await,
            Err(error) => refuse(&ctx, send, &error),
        },
        Topic::DeliveryEvents => match engine.subscribe_deliveries_from(from) {
            Ok(sub) => follow(send, sub, stop).await,
            Err(error) => refuse(&ctx, send, &error),
        },
    }
    if let Some(commits) = commits {
        // Commits already in flight when the stream ends still count.
        let _ = tokio::time::timeout(Duration::from_millis(500), commits).await;
    }
    ctx.metrics.subscribers_open.fetch_sub(1, Ordering::Relaxed);
}

/// Applies a named subscriber's commits until it stops sending them.
async fn read_commits<E: StreamSource>(mut recv: RecvStream, engine: Arc<E>, topic: Topic, name: String) {
    let mut next = [0u8; 8];
    while recv.read_exact(&mut next).await.is_ok() {
        if let Err(error) = engine.commit_cursor(topic, &name, u64::from_le_bytes(next)) {
            warn!(%error, cursor = %name, topic = topic.name(), "cursor commit refused");
            let _ = recv.stop(VarInt::from_u32(u32::from(error.code())));
            return;
        }
    }
}

fn refuse(ctx: &Ctx, mut send: SendStream, error: &WireError) {
    if let Some(left_out) = ctx.log.allow("subscription", std::time::Instant::now()) {
        warn!(%error, left_out, "subscription refused");
    }
    reset(&mut send, error);
}

/// Batches a remote subscriber's writer takes from its queue for one write.
const COALESCE_MAX: usize = 64;

/// Batches at most this size are copied together into one write; larger ones are written as
/// they are (a copy would cost more than the write it saves).
const COALESCE_BYTES: usize = 16 * 1024;

/// Writes `(offset, batch)` frames to a subscriber's stream, small ones gathered into one write.
async fn write_items<T: Payload>(
    send: &mut SendStream,
    items: impl Iterator<Item = (u64, Arc<events::Batch<T>>)>,
    gathered: &mut Vec<u8>,
) -> Result<(), quinn::WriteError> {
    gathered.clear();
    for (offset, batch) in items {
        let bytes = batch.as_bytes();
        if bytes.len() <= COALESCE_BYTES {
            gathered.extend_from_slice(&offset.to_le_bytes());
            gathered.extend_from_slice(bytes);
            continue;
        }
        if !gathered.is_empty() {
            send.write_all(gathered).await?;
            gathered.clear();
        }
        send.write_all(&offset.to_le_bytes()).await?;
        send.write_all(bytes).await?;
    }
    if !gathered.is_empty() {
        send.write_all(gathered).await?;
    }
    Ok(())
}

async fn follow<T: Payload>(mut send: SendStream, sub: events::OffsetSubscription<T>, mut stop: watch::Receiver<bool>) {
    // The resolved start offset first: it tells the client the subscription is in place and
    // where it begins.
    if send.write_all(&sub.start.to_le_bytes()).await.is_err() {
        return;
    }
    // Reused for every write: what is taken from the queue, and the small frames gathered.
    let (mut more, mut gathered) = (Vec::with_capacity(COALESCE_MAX), Vec::new());
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => {
                reset(&mut send, &WireError::ShuttingDown);
                break;
            }
            // The client stopped reading (or went away): end the subscription now rather than
            // at the next batch, which on a quiet topic may never come.
            _ = send.stopped() => break,
            item = sub.rx.recv_async() => match item {
                Ok(Ok((offset, batch))) => {
                    // Whatever else is already waiting goes out in the same write: a topic of
                    // small batches (delivery events) followed by many subscribers would
                    // otherwise cost two stream writes per batch per subscriber.
                    more.clear();
                    let mut ended = None;
                    while more.len() < COALESCE_MAX {
                        match sub.rx.try_recv() {
                            Ok(Ok(item)) => more.push(item),
                            Ok(Err(error)) => {
                                ended = Some(error);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let items = std::iter::once((offset, batch)).chain(more.drain(..));
                    let written = write_items(&mut send, items, &mut gathered).await;
                    if written.is_err() {
                        break;
                    }
                    if let Some(error) = ended {
                        warn!(%error, "offset subscription ended");
                        reset(&mut send, &error);
                        break;
                    }
                }
                Ok(Err(error)) => {
                    warn!(%error, "offset subscription ended");
                    reset(&mut send, &error);
                    break;
                }
                Err(_) => {
                    reset(&mut send, &WireError::ShuttingDown);
                    break;
                }
            }
        }
    }
}

async fn forward<T: Payload>(send: &mut SendStream, sub: Subscription<T>, mut stop: watch::Receiver<bool>) {
    // An empty batch first: it tells the client the subscription is in place, so everything
    // published after the client's `subscribe` returns reaches it.
    match Batch::<T>::encode(events::BatchMeta::default(), &[], Buffer::new()) {
        Ok(ready) => {
            if send.write_all(ready.as_bytes()).await.is_err() {
                return;
            }
        }
        Err(error) => {
            reset(send, &error);
            return;
        }
    }
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => {
                reset(send, &WireError::ShuttingDown);
                return;
            }
            _ = send.stopped() => return,
            item = sub.rx.recv_async() => match item {
                Ok(batch) => {
                    if send.write_all(batch.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    let reason = sub.end_reason();
                    warn!(%reason, "subscription ended");
                    reset(send, &reason);
                    return;
                }
            }
        }
    }
}

/// Resolves once shutdown has been signalled (at once if it already was).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn reset(send: &mut SendStream, error: &WireError) {
    let _ = send.reset(VarInt::from_u32(u32::from(error.code())));
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
