//! Queue consumers over QUIC: a stream of kind [`STREAM_CONSUME`] on the ingest endpoint.
//!
//! The client opens the stream with a request: queue byte, key range (`lo`, `hi`: u64 each)
//! and how many messages it may hold unsettled (u16, at least 1). The server then leases
//! messages to it, never more than that many unsettled, and writes each as a [`Delivery`]
//! frame; the client answers each with a settle frame (ack, or nack with a reason) whenever it
//! is done. When the stream or the connection ends, everything the consumer still holds is
//! released at once and offered again (to it, when it reconnects, or to another consumer), so a
//! drone that reconnects before acking gets its mission again. A consumer that stays connected
//! but never settles keeps its messages only until the visibility timeout.
//!
//! Frames, little-endian:
//! - delivery (server → client): id u64, key u64, attempt u32, token u64, len u32, payload;
//! - settle (client → server): id u64, token u64, verdict u8 (0 ack, 1 nack), reason len u16,
//!   reason (UTF-8, nack only).

use std::sync::Arc;
use std::time::Duration;

use events::{Error as WireError, KeyRange, Leased, QueueName, Verdict, WorkQueues};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, warn};

use crate::Error;
use crate::proto::STREAM_CONSUME;

/// Bytes of a consume request after the stream kind.
pub const REQUEST_LEN: usize = 1 + 8 + 8 + 2;
const DELIVERY_HEAD: usize = 8 + 8 + 4 + 8 + 4;
const SETTLE_HEAD: usize = 8 + 8 + 1 + 2;
/// How long one lease call waits for a message before the loop asks again. Long: a message
/// wakes its waiting consumer directly, and a stop or a gone client ends the wait at once.
const LEASE_WAIT: Duration = Duration::from_secs(30);
/// Largest payload a consumer accepts.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Longest nack reason carried.
pub const MAX_REASON: usize = 1024;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Encodes a consume request (after the stream kind byte).
pub fn encode_request(queue: QueueName, keys: KeyRange, max_unsettled: u16) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0] = queue.to_byte();
    out[1..9].copy_from_slice(&keys.lo.to_le_bytes());
    out[9..17].copy_from_slice(&keys.hi.to_le_bytes());
    out[17..19].copy_from_slice(&max_unsettled.to_le_bytes());
    out
}

/// Decodes a consume request.
pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Result<(QueueName, KeyRange, u16), WireError> {
    let queue = QueueName::from_byte(b[0])?;
    let keys = KeyRange { lo: u64_at(b, 1), hi: u64_at(b, 9) };
    if keys.lo >= keys.hi {
        return Err(WireError::MalformedFrame("empty key range"));
    }
    let max = u16::from_le_bytes([b[17], b[18]]).max(1);
    Ok((queue, keys, max))
}

/// Length of a settle frame's fixed part: id, token, verdict byte, reason length.
pub const SETTLE_HEAD_LEN: usize = SETTLE_HEAD;

/// Decodes a settle frame's fixed part: id, token and the length of the reason that follows
/// (at most [`MAX_REASON`]).
pub fn decode_settle_head(head: &[u8; SETTLE_HEAD]) -> Result<(u64, u64, usize), WireError> {
    let len = usize::from(u16::from_le_bytes([head[17], head[18]]));
    if len > MAX_REASON {
        return Err(WireError::MalformedFrame("settle reason too long"));
    }
    Ok((u64_at(head, 0), u64_at(head, 8), len))
}

/// Decodes a settle frame's verdict: byte 0 ack, 1 nack with `reason`.
pub fn decode_verdict(code: u8, reason: &[u8]) -> Result<Verdict, WireError> {
    match code {
        0 => Ok(Verdict::Ack),
        1 => Ok(Verdict::Nack(String::from_utf8_lossy(reason).into_owned())),
        _ => Err(WireError::MalformedFrame("unknown settle verdict")),
    }
}

/// Encodes a settle frame.
pub fn encode_settle(id: u64, token: u64, verdict: &Verdict, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&token.to_le_bytes());
    match verdict {
        Verdict::Ack => {
            out.push(0);
            out.extend_from_slice(&0u16.to_le_bytes());
        }
        Verdict::Nack(reason) => {
            let reason = truncate(reason, MAX_REASON);
            out.push(1);
            out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
            out.extend_from_slice(reason.as_bytes());
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Serves one consume stream until the client ends it, the connection goes or the server stops.
pub(crate) async fn serve<E: WorkQueues>(
    mut send: SendStream,
    mut recv: RecvStream,
    engine: Arc<E>,
    mut stop: watch::Receiver<bool>,
) {
    let mut request = [0u8; REQUEST_LEN];
    if recv.read_exact(&mut request).await.is_err() {
        return;
    }
    let (queue, keys, max) = match decode_request(&request) {
        Ok(r) => r,
        Err(error) => {
            warn!(%error, "consume request refused");
            let _ = send.reset(VarInt::from_u32(u32::from(error.code())));
            return;
        }
    };
    let consumer = match engine.attach(queue, keys) {
        Ok(c) => c,
        Err(error) => {
            let _ = send.reset(VarInt::from_u32(u32::from(error.code())));
            return;
        }
    };
    debug!(queue = queue.name(), consumer, ?keys, max, "consumer attached");
    let credit = Arc::new(Semaphore::new(usize::from(max)));
    let settler = {
        let (engine, credit) = (engine.clone(), credit.clone());
        tokio::spawn(async move { read_settles(recv, engine, queue, credit).await })
    };
    let mut out = Vec::new();
    'serve: loop {
        // Wait for room, then lease as much as there is room for.
        let permit = tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            _ = send.stopped() => break,
            permit = credit.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
        };
        permit.forget();
        let room = 1 + credit.available_permits();
        let leased = tokio::select! {
            biased;
            () = stopped(&mut stop) => { credit.add_permits(1); break }
            _ = send.stopped() => { credit.add_permits(1); break }
            leased = engine.lease(queue, consumer, keys, room, LEASE_WAIT) => leased,
        };
        let leased = match leased {
            Ok(l) => l,
            Err(error) => {
                let _ = send.reset(VarInt::from_u32(u32::from(error.code())));
                break;
            }
        };
        // One permit is already taken; take one more per extra message.
        let extra = leased.len().saturating_sub(1);
        if extra > 0 {
            match credit.clone().acquire_many_owned(extra as u32).await {
                Ok(p) => p.forget(),
                Err(_) => break,
            }
        } else if leased.is_empty() {
            credit.add_permits(1);
            continue;
        }
        for m in &leased {
            out.clear();
            encode_delivery(m, &mut out);
            if send.write_all(&out).await.is_err() {
                break 'serve;
            }
        }
    }
    // Settles the client sent before it went (a graceful close finishes its side after the last
    // one) still count; then whatever it holds goes back.
    let abort = settler.abort_handle();
    if tokio::time::timeout(Duration::from_millis(500), settler).await.is_err() {
        abort.abort();
    }
    engine.release(queue, consumer);
    debug!(queue = queue.name(), consumer, "consumer detached; its unsettled messages are offered again");
}

async fn read_settles<E: WorkQueues>(mut recv: RecvStream, engine: Arc<E>, queue: QueueName, credit: Arc<Semaphore>) {
    let mut head = [0u8; SETTLE_HEAD];
    let mut reason = vec![0u8; MAX_REASON];
    loop {
        if recv.read_exact(&mut head).await.is_err() {
            return;
        }
        let Ok((id, token, len)) = decode_settle_head(&head) else {
            let _ = recv.stop(VarInt::from_u32(u32::from(WireError::MalformedFrame("").code())));
            return;
        };
        if recv.read_exact(&mut reason[..len]).await.is_err() {
            return;
        }
        let Ok(verdict) = decode_verdict(head[16], &reason[..len]) else {
            let _ = recv.stop(VarInt::from_u32(u32::from(WireError::MalformedFrame("").code())));
            return;
        };
        match engine.settle(queue, id, token, verdict) {
            Ok(()) => {}
            // The lease ran out first and the message went back to the queue; either way the
            // consumer no longer holds it, so its slot is free again.
            Err(error) => debug!(queue = queue.name(), id, %error, "settle refused"),
        }
        credit.add_permits(1);
    }
}

fn from_read_exact(e: quinn::ReadExactError) -> Error {
    match e {
        quinn::ReadExactError::FinishedEarly(got) => Error::Wire(WireError::Truncated { needed: DELIVERY_HEAD, got }),
        quinn::ReadExactError::ReadError(e) => crate::client::read_error(e),
    }
}

fn encode_delivery(m: &Leased, out: &mut Vec<u8>) {
    out.extend_from_slice(&m.id.to_le_bytes());
    out.extend_from_slice(&m.key.to_le_bytes());
    out.extend_from_slice(&m.attempt.to_le_bytes());
    out.extend_from_slice(&m.token.to_le_bytes());
    out.extend_from_slice(&(m.payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&m.payload);
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A queue consumer on a QUIC connection: messages arrive on [`QueueConsumer::recv`]; settle
/// each with [`QueueConsumer::settle`].
#[derive(Debug)]
pub struct QueueConsumer {
    rx: mpsc::Receiver<Result<Leased, Error>>,
    settle_tx: mpsc::Sender<Vec<u8>>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for QueueConsumer {
    /// Ends the stream at once, so the server hands what this consumer held to others now
    /// rather than at the visibility timeout.
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl QueueConsumer {
    pub(crate) async fn open(
        conn: &quinn::Connection,
        queue: QueueName,
        keys: KeyRange,
        max_unsettled: u16,
    ) -> Result<Self, Error> {
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(&[STREAM_CONSUME]).await?;
        send.write_all(&encode_request(queue, keys, max_unsettled.max(1))).await?;
        let (tx, rx) = mpsc::channel(usize::from(max_unsettled.max(1)));
        let (settle_tx, mut settle_rx) = mpsc::channel::<Vec<u8>>(usize::from(max_unsettled.max(1)));
        let reader = tokio::spawn(read_deliveries(recv, tx));
        let writer = tokio::spawn(async move {
            while let Some(frame) = settle_rx.recv().await {
                if send.write_all(&frame).await.is_err() {
                    return;
                }
            }
            let _ = send.finish();
            // Hold the stream until the server has read every settle (or gone).
            let _ = send.stopped().await;
        });
        Ok(Self { rx, settle_tx, reader, writer })
    }

    /// Ends the consumer gracefully: every settle already given (here or through a
    /// [`Settler`], all of which must have been dropped) reaches the server before the stream
    /// ends; what is still unsettled is then offered again by the server. Waits at most 2 s.
    pub async fn close(mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.settle_tx, closed));
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.writer).await;
    }

    /// The next message; `None` once the stream has ended.
    pub async fn recv(&mut self) -> Option<Result<Leased, Error>> {
        self.rx.recv().await
    }

    /// Acks or nacks a message received on this consumer.
    pub async fn settle(&self, m: &Leased, verdict: Verdict) -> Result<(), Error> {
        self.settler().settle(m, verdict).await
    }

    /// A handle that settles this consumer's messages from another task.
    pub fn settler(&self) -> Settler {
        Settler(self.settle_tx.clone())
    }
}

/// Settles messages of one [`QueueConsumer`] (see [`QueueConsumer::settler`]).
#[derive(Debug, Clone)]
pub struct Settler(mpsc::Sender<Vec<u8>>);

impl Settler {
    /// Acks or nacks a message received on the consumer this settler belongs to.
    pub async fn settle(&self, m: &Leased, verdict: Verdict) -> Result<(), Error> {
        let mut frame = Vec::with_capacity(SETTLE_HEAD);
        encode_settle(m.id, m.token, &verdict, &mut frame);
        self.0.send(frame).await.map_err(|_| Error::Closed)
    }
}

async fn read_deliveries(mut recv: RecvStream, tx: mpsc::Sender<Result<Leased, Error>>) {
    let mut head = [0u8; DELIVERY_HEAD];
    loop {
        match recv.read_exact(&mut head).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return,
            Err(e) => {
                let _ = tx.send(Err(from_read_exact(e))).await;
                return;
            }
        }
        let len = u32::from_le_bytes([head[28], head[29], head[30], head[31]]) as usize;
        if len > MAX_PAYLOAD {
            let _ = tx.send(Err(Error::Wire(WireError::MalformedFrame("queue message over the size limit")))).await;
            return;
        }
        let mut payload = vec![0u8; len];
        if let Err(e) = recv.read_exact(&mut payload).await {
            let _ = tx.send(Err(from_read_exact(e))).await;
            return;
        }
        let m = Leased {
            id: u64_at(&head, 0),
            key: u64_at(&head, 8),
            attempt: u32::from_le_bytes([head[16], head[17], head[18], head[19]]),
            token: u64_at(&head, 20),
            payload: Arc::from(payload),
        };
        if tx.send(Ok(m)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        let r = encode_request(QueueName::DroneCommands, KeyRange { lo: 10, hi: 20 }, 8);
        assert_eq!(decode_request(&r), Ok((QueueName::DroneCommands, KeyRange { lo: 10, hi: 20 }, 8)));
        let empty = encode_request(QueueName::Notifications, KeyRange { lo: 5, hi: 5 }, 1);
        assert!(decode_request(&empty).is_err());
        let mut unknown = r;
        unknown[0] = 99;
        assert!(decode_request(&unknown).is_err());
        let mut long = Vec::new();
        encode_settle(1, 2, &Verdict::Nack("é".repeat(MAX_REASON)), &mut long);
        assert!(long.len() <= SETTLE_HEAD + MAX_REASON);
    }
}
