//! The ingest client library, used by `loadgen` and by gateways.
//!
//! A [`IngestClient`] holds one QUIC connection. Each [`Lane`] is one ingest stream: batches are
//! written back to back without waiting, up to `max_inflight_per_lane` unanswered, and a reader
//! task turns the server's responses into [`Answer`]s on a channel. Keep each drone on one lane
//! so its batches are applied in order. [`IngestClient::subscribe`] opens a subscription stream
//! and yields validated batches.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use events::wire::{Batch, BatchHeader, Buffer, HEADER_LEN, Payload};
use events::{Error as WireError, Limits, StartAt, Topic};
use quinn::{ReadError, ReadExactError, RecvStream, SendStream, VarInt};
use tokio::sync::{Semaphore, mpsc};

use crate::Error;
use crate::proto::{
    RESPONSE_LEN, Response, STREAM_INGEST, STREAM_SUBSCRIBE, STREAM_SUBSCRIBE_CURSOR, STREAM_SUBSCRIBE_FROM,
    TOPIC_DELIVERIES, TOPIC_TELEMETRY,
};
use crate::tls::{Trust, client_crypto};

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Name the server's certificate must carry. Default `localhost`.
    pub server_name: String,
    /// Whom to trust.
    pub trust: Trust,
    /// Batches a lane may have unanswered before `send` waits. Default 64.
    pub max_inflight_per_lane: usize,
    /// QUIC receive window per stream (for subscriptions), bytes. Default 4 MiB.
    pub stream_window_bytes: u64,
    /// QUIC receive window per connection, bytes. Default 16 MiB.
    pub connection_window_bytes: u64,
    /// Largest UDP payload path-MTU discovery may try, bytes. Default 65,527, as on the server.
    pub max_udp_payload_bytes: u16,
    /// Kernel receive and send buffer asked for the UDP socket, bytes; 0 (the default) keeps
    /// the system's. A subscriber to a busy topic receives as much as a server and should ask
    /// for [`crate::udp::DEFAULT_UDP_BUFFER_BYTES`]; a producer receives only answers.
    pub udp_buffer_bytes: usize,
    /// Keep-alive interval. Default 5 s, well inside the server's idle timeout.
    pub keep_alive: Duration,
    /// Limits applied to batches received on subscriptions.
    pub limits: Limits,
    /// Client certificate and key (PEM files) for a server that requires one
    /// (`ingest.client_ca`). Default none.
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// A QUIC endpoint (one UDP socket) that connections made with this config share, from
    /// [`IngestClient::endpoint`]. Default none: each connection binds its own. quinn's receive
    /// path holds about 3 MB per endpoint (room for 32 reads of 64 coalesced datagrams), so a
    /// process with thousands of connections, such as a load generator with a connection per
    /// drone, shares endpoints between them; each connection keeps its own TLS session.
    pub endpoint: Option<quinn::Endpoint>,
}

impl ClientConfig {
    /// Defaults with the given trust.
    pub fn new(trust: Trust) -> Self {
        Self {
            server_name: "localhost".into(),
            trust,
            max_inflight_per_lane: 64,
            stream_window_bytes: 4 << 20,
            connection_window_bytes: 16 << 20,
            max_udp_payload_bytes: crate::proto::DEFAULT_MAX_UDP_PAYLOAD,
            udp_buffer_bytes: 0,
            keep_alive: Duration::from_secs(5),
            limits: Limits::default(),
            identity: None,
            endpoint: None,
        }
    }
}

/// One QUIC connection to an ingest server.
#[derive(Debug)]
pub struct IngestClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    cfg: ClientConfig,
    /// The endpoint is `cfg.endpoint`, which other connections use too.
    shared: bool,
}

/// The server's answer to one batch sent on a lane.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The batch's sequence number.
    pub batch_seq: u64,
    /// Events in it.
    pub events: u32,
    /// Acknowledged, or the typed rejection.
    pub result: Result<(), WireError>,
}

impl IngestClient {
    /// A client endpoint (one UDP socket, with `cfg.udp_buffer_bytes` of kernel buffers) for
    /// reaching `server`; put it in [`ClientConfig::endpoint`] to share it between connections.
    pub fn endpoint(server: SocketAddr, cfg: &ClientConfig) -> Result<quinn::Endpoint, Error> {
        let bind: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let socket = crate::udp::bind(bind, cfg.udp_buffer_bytes, false)?;
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, Arc::new(quinn::TokioRuntime))
            .map_err(|e| Error::Bind(bind, e))
    }

    /// Connects (TLS 1.3 handshake included).
    pub async fn connect(addr: SocketAddr, cfg: &ClientConfig) -> Result<Self, Error> {
        let (endpoint, shared) = match &cfg.endpoint {
            Some(endpoint) => (endpoint.clone(), true),
            None => (Self::endpoint(addr, cfg)?, false),
        };
        let identity = match &cfg.identity {
            Some((cert, key)) => Some(crate::tls::Identity::from_files(cert, key)?),
            None => None,
        };
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto(&cfg.trust, identity.as_ref())?));
        let mut t = quinn::TransportConfig::default();
        let varint = |v: u64| VarInt::from_u64(v).map_err(|_| Error::Config("window too large".into()));
        t.stream_receive_window(varint(cfg.stream_window_bytes)?);
        t.receive_window(varint(cfg.connection_window_bytes)?);
        t.send_window(cfg.connection_window_bytes);
        t.mtu_discovery_config(Some(crate::proto::mtu_discovery(cfg.max_udp_payload_bytes)));
        t.keep_alive_interval(Some(cfg.keep_alive));
        client.transport_config(Arc::new(t));
        let conn = endpoint.connect_with(client, addr, &cfg.server_name)?.await?;
        Ok(Self { endpoint, conn, cfg: cfg.clone(), shared })
    }

    /// Consumes a queue: messages with keys in `keys`, at most `max_unsettled` held unsettled
    /// at a time (see [`crate::consume`]).
    pub async fn consume(
        &self,
        queue: events::QueueName,
        keys: events::KeyRange,
        max_unsettled: u16,
    ) -> Result<crate::consume::QueueConsumer, Error> {
        crate::consume::QueueConsumer::open(&self.conn, queue, keys, max_unsettled).await
    }

    /// Opens an ingest stream. Answers arrive on the returned channel in send order.
    pub async fn open_lane(&self) -> Result<(Lane, mpsc::Receiver<Answer>), Error> {
        let (mut send, recv) = self.conn.open_bi().await?;
        send.write_all(&[STREAM_INGEST]).await?;
        let window = Arc::new(Semaphore::new(self.cfg.max_inflight_per_lane.max(1)));
        let (tx, rx) = mpsc::channel(self.cfg.max_inflight_per_lane.max(1));
        tokio::spawn(read_answers(recv, window.clone(), tx));
        Ok((Lane { send, window }, rx))
    }

    /// Subscribes to a topic. Returns once the server has the subscription in place: every
    /// batch published after that arrives.
    pub async fn subscribe<T: Payload>(&self, topic: Topic) -> Result<RemoteSubscription<T>, Error> {
        let (mut send, recv) = self.conn.open_bi().await?;
        send.write_all(&[STREAM_SUBSCRIBE, topic_byte(topic)]).await?;
        let mut sub = RemoteSubscription { send, recv, limits: self.cfg.limits, _payload: PhantomData };
        match sub.next().await? {
            Some(ready) if ready.is_empty() => Ok(sub),
            Some(_) => Err(WireError::MalformedFrame("subscription did not start with its ready marker").into()),
            None => Err(Error::Closed),
        }
    }

    /// Reads a topic's log from `from` on, then follows it live. Returns once the server has the
    /// subscription in place (so with [`StartAt::Latest`] every batch appended after this returns
    /// arrives); [`LogSubscription::start`] tells the offset it resolved to.
    pub async fn subscribe_from<T: Payload>(&self, topic: Topic, from: StartAt) -> Result<LogSubscription<T>, Error> {
        self.open_log_subscription(topic, from, None).await
    }

    /// Reads a topic's log under the named cursor `name`: from where that cursor stands, or
    /// from `from` when the name is new. Commit progress with [`LogSubscription::commit`]; a
    /// later subscription under the same name resumes at the last commit.
    pub async fn subscribe_named<T: Payload>(
        &self,
        topic: Topic,
        name: &str,
        from: StartAt,
    ) -> Result<LogSubscription<T>, Error> {
        events::contract::valid_cursor_name(name)?;
        self.open_log_subscription(topic, from, Some(name)).await
    }

    async fn open_log_subscription<T: Payload>(
        &self,
        topic: Topic,
        from: StartAt,
        name: Option<&str>,
    ) -> Result<LogSubscription<T>, Error> {
        let (mut send, recv) = self.conn.open_bi().await?;
        let (kind, value) = from.to_wire();
        let stream_kind = if name.is_some() { STREAM_SUBSCRIBE_CURSOR } else { STREAM_SUBSCRIBE_FROM };
        let mut request = Vec::with_capacity(12 + events::contract::MAX_CURSOR_NAME);
        request.extend_from_slice(&[stream_kind, topic_byte(topic), kind]);
        request.extend_from_slice(&value.to_le_bytes());
        if let Some(name) = name {
            request.push(name.len() as u8);
            request.extend_from_slice(name.as_bytes());
        }
        send.write_all(&request).await?;
        let mut inner = RemoteSubscription { send, recv, limits: self.cfg.limits, _payload: PhantomData };
        let start = match inner.read_offset().await? {
            Some(start) => start,
            None => return Err(Error::Closed),
        };
        Ok(LogSubscription { inner, start, named: name.is_some() })
    }

    /// The underlying connection, for callers that speak the framing themselves.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Closes the connection and waits until the peer has been told (on a shared endpoint, which
    /// goes on sending for the others, it only closes).
    pub async fn close(self) {
        self.conn.close(VarInt::from_u32(0), b"done");
        if !self.shared {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        }
    }
}

/// One ingest stream.
#[derive(Debug)]
pub struct Lane {
    send: SendStream,
    window: Arc<Semaphore>,
}

impl Lane {
    /// Sends one encoded batch frame, first waiting while the in-flight window is full.
    pub async fn send(&mut self, frame: &[u8]) -> Result<(), Error> {
        let permit = self.window.acquire().await.map_err(|_| Error::Closed)?;
        permit.forget();
        self.send.write_all(frame).await?;
        Ok(())
    }

    /// Ends the stream after everything written; answers still arrive.
    pub fn finish(mut self) {
        let _ = self.send.finish();
    }
}

async fn read_answers(mut recv: RecvStream, window: Arc<Semaphore>, tx: mpsc::Sender<Answer>) {
    let mut fixed = [0u8; RESPONSE_LEN];
    let mut reason = vec![0u8; crate::proto::MAX_REASON];
    loop {
        if recv.read_exact(&mut fixed).await.is_err() {
            break;
        }
        let (batch_seq, code, len, events) = Response::decode_fixed(&fixed);
        let len = len.min(reason.len());
        if recv.read_exact(&mut reason[..len]).await.is_err() {
            break;
        }
        window.add_permits(1);
        let result = if code == 0 {
            Ok(())
        } else {
            Err(WireError::from_wire(code, String::from_utf8_lossy(&reason[..len]).into_owned()))
        };
        if tx.send(Answer { batch_seq, events, result }).await.is_err() {
            break;
        }
    }
    window.close();
}

/// A subscription over the network.
#[derive(Debug)]
pub struct RemoteSubscription<T: Payload> {
    send: SendStream,
    recv: RecvStream,
    limits: Limits,
    _payload: PhantomData<fn() -> T>,
}

impl<T: Payload> RemoteSubscription<T> {
    /// The next batch, validated; `None` when the server finished the stream.
    pub async fn next(&mut self) -> Result<Option<Batch<T>>, Error> {
        let mut header = [0u8; HEADER_LEN];
        match self.recv.read_exact(&mut header).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(ReadExactError::FinishedEarly(got)) => {
                return Err(WireError::Truncated { needed: HEADER_LEN, got }.into());
            }
            Err(ReadExactError::ReadError(e)) => return Err(read_error(e)),
        }
        let parsed = BatchHeader::parse(&header, &self.limits)?;
        let mut buf = Buffer::with_capacity(parsed.frame_len());
        buf.extend_from_slice(&header);
        buf.resize(parsed.frame_len(), 0);
        match self.recv.read_exact(&mut buf[HEADER_LEN..]).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(got)) => {
                return Err(WireError::Truncated { needed: parsed.frame_len(), got: HEADER_LEN + got }.into());
            }
            Err(ReadExactError::ReadError(e)) => return Err(read_error(e)),
        }
        Ok(Some(Batch::validate(buf, &self.limits)?))
    }
}

/// A subscription to a topic's log from an offset, over the network.
#[derive(Debug)]
pub struct LogSubscription<T: Payload> {
    inner: RemoteSubscription<T>,
    start: u64,
    named: bool,
}

impl<T: Payload> LogSubscription<T> {
    /// The log offset the subscription started at.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Commits a named subscription's cursor: everything before `next` is processed (pass the
    /// offset of the last batch handled plus one).
    pub async fn commit(&mut self, next: u64) -> Result<(), Error> {
        if !self.named {
            return Err(WireError::MalformedFrame("only a named subscription has a cursor to commit").into());
        }
        self.inner.send.write_all(&next.to_le_bytes()).await?;
        Ok(())
    }

    /// The next batch with its log offset; `None` when the server finished the stream.
    pub async fn next(&mut self) -> Result<Option<(u64, Batch<T>)>, Error> {
        let Some(offset) = self.inner.read_offset().await? else { return Ok(None) };
        match self.inner.next().await? {
            Some(batch) => Ok(Some((offset, batch))),
            None => Err(WireError::Truncated { needed: HEADER_LEN, got: 0 }.into()),
        }
    }
}

impl<T: Payload> RemoteSubscription<T> {
    /// A u64 offset; `None` if the stream ended cleanly before it.
    async fn read_offset(&mut self) -> Result<Option<u64>, Error> {
        let mut offset = [0u8; 8];
        match self.recv.read_exact(&mut offset).await {
            Ok(()) => Ok(Some(u64::from_le_bytes(offset))),
            Err(ReadExactError::FinishedEarly(0)) => Ok(None),
            Err(ReadExactError::FinishedEarly(got)) => Err(WireError::Truncated { needed: 8, got }.into()),
            Err(ReadExactError::ReadError(e)) => Err(read_error(e)),
        }
    }
}

/// A topic's byte on the wire.
fn topic_byte(topic: Topic) -> u8 {
    match topic {
        Topic::DroneTelemetry => TOPIC_TELEMETRY,
        Topic::DeliveryEvents => TOPIC_DELIVERIES,
    }
}

pub(crate) fn read_error(e: ReadError) -> Error {
    match e {
        ReadError::Reset(code) => {
            let code = u16::try_from(code.into_inner()).unwrap_or(u16::MAX);
            Error::Wire(WireError::from_wire(code, events::code_name(code).replace('_', " ")))
        }
        other => Error::Read(other),
    }
}
