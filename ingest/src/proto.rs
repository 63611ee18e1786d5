//! The framing on QUIC streams, above the batch wire format of `events`.
//!
//! Every bidirectional stream starts with one byte from the client naming its purpose:
//!
//! - [`STREAM_INGEST`]: the client writes batch frames back to back (each self-delimited by its
//!   header); the server answers each, in order, with a [`Response`] on the same stream. A client
//!   keeps many batches in flight on one stream; a drone's batches stay on one stream so the
//!   server applies them in order.
//! - [`STREAM_SUBSCRIBE`]: the client writes one topic byte ([`TOPIC_TELEMETRY`] or
//!   [`TOPIC_DELIVERIES`]); the server answers with an empty batch once the subscription is in
//!   place, then writes batch frames of that topic, live, until the client stops reading.
//! - [`STREAM_SUBSCRIBE_FROM`]: the client writes a topic byte, a start kind byte (0 = the
//!   offset that follows, 1 = earliest retained, 2 = latest, 3 = the first batch created at or
//!   after the u64 time in µs since the epoch) and a u64 (ignored for 1 and 2). Once the subscription is in place the server writes the resolved start
//!   offset (u64), then each batch of that topic's log from there on as its offset (u64)
//!   followed by the batch frame, from the log and then live. An offset the log no longer (or
//!   not yet) holds resets the stream with code 22 (`offset_unavailable`). A server that ends a subscription resets the stream with an
//!   `events::Error` code (16 = lagged, 14 = shutting down).
//!
//! - [`STREAM_SUBSCRIBE_CURSOR`]: as [`STREAM_SUBSCRIBE_FROM`], with a cursor name after the
//!   offset (u8 length, then 1 to 64 of `A-Z a-z 0-9 - _ .`). When the cursor exists the
//!   subscription starts where it stands and the start position only applies to a new name.
//!   The client then writes u64 commits on its side of the stream: "everything before this
//!   offset is processed". A reconnect under the same name resumes at the last commit, so a
//!   subscriber sees again at most what it read after its last commit.
//! - [`STREAM_CONSUME`]: a queue consumer; the request and the frames are described in
//!   [`crate::consume`].
//!
//! A response is 16 bytes plus an optional UTF-8 reason: batch sequence number (u64), code (u16,
//! 0 = accepted, otherwise an `events::Error` code), reason length (u16), event count (u32).

use events::Error;

/// Stream purpose: sending telemetry batches.
pub const STREAM_INGEST: u8 = 1;
/// Stream purpose: subscribing to a topic.
pub const STREAM_SUBSCRIBE: u8 = 2;
/// Stream purpose: reading the telemetry log from an offset, then following it.
pub const STREAM_SUBSCRIBE_FROM: u8 = 3;
/// Stream purpose: consuming a queue (see [`crate::consume`]).
pub const STREAM_CONSUME: u8 = 4;
/// Stream purpose: reading a topic's log under a named cursor, committing as it goes.
pub const STREAM_SUBSCRIBE_CURSOR: u8 = 5;
/// Topic byte for `drone-telemetry`.
pub const TOPIC_TELEMETRY: u8 = 1;
/// Topic byte for `delivery-events`.
pub const TOPIC_DELIVERIES: u8 = 2;
/// Fixed part of a response.
pub const RESPONSE_LEN: usize = 16;
/// Longest reason a server sends; longer ones are cut.
pub const MAX_REASON: usize = 512;

/// The server's answer to one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The batch's sequence number (0 when the header could not be read).
    pub batch_seq: u64,
    /// Events in the batch (0 when unknown).
    pub events: u32,
    /// Accepted, or why not.
    pub result: Result<(), Error>,
}

impl Response {
    /// Encodes into `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (code, reason) = match &self.result {
            Ok(()) => (0u16, String::new()),
            Err(e) => (e.code(), e.to_string()),
        };
        let mut cut = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let reason = &reason.as_bytes()[..cut];
        out.extend_from_slice(&self.batch_seq.to_le_bytes());
        out.extend_from_slice(&code.to_le_bytes());
        out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.events.to_le_bytes());
        out.extend_from_slice(reason);
    }

    /// Decodes the fixed part; returns the reason length still to read.
    pub fn decode_fixed(b: &[u8; RESPONSE_LEN]) -> (u64, u16, usize, u32) {
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[0..8]);
        let code = u16::from_le_bytes([b[8], b[9]]);
        let len = u16::from_le_bytes([b[10], b[11]]) as usize;
        let events = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        (u64::from_le_bytes(seq), code, len, events)
    }
}

/// Length of an offset subscription's request (after the stream kind byte): topic, start
/// kind, start value (u64).
pub const SUBSCRIBE_FROM_LEN: usize = 10;

/// Decodes an offset subscription's request: the topic and where to start.
pub fn decode_subscribe_from(b: &[u8; SUBSCRIBE_FROM_LEN]) -> Result<(events::Topic, events::StartAt), Error> {
    let topic = match b[0] {
        TOPIC_TELEMETRY => events::Topic::DroneTelemetry,
        TOPIC_DELIVERIES => events::Topic::DeliveryEvents,
        _ => return Err(Error::MalformedFrame("unknown topic")),
    };
    let mut value = [0u8; 8];
    value.copy_from_slice(&b[2..10]);
    Ok((topic, events::StartAt::from_wire(b[1], u64::from_le_bytes(value))?))
}

/// Decodes a named subscription's cursor name (the bytes after its length byte): UTF-8 and a
/// valid cursor name.
pub fn decode_cursor_name(raw: Vec<u8>) -> Result<String, Error> {
    let name = String::from_utf8(raw).map_err(|_| Error::MalformedFrame("a cursor name is UTF-8"))?;
    events::contract::valid_cursor_name(&name)?;
    Ok(name)
}

/// Default upper bound of QUIC path-MTU discovery, bytes of UDP payload: the most UDP allows.
/// Connections start at 1,200 bytes and probe upward; a probe larger than the path carries is
/// simply lost, so a high bound costs a few probes on a 1,500-byte Internet path while letting
/// loopback, jumbo-frame and gateway links use far fewer, larger packets (fewer system calls and
/// per-packet crypto operations for the same bytes).
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 65_527;

/// Path-MTU discovery searching up to `max_udp_payload` (clamped to what QUIC allows).
pub(crate) fn mtu_discovery(max_udp_payload: u16) -> quinn::MtuDiscoveryConfig {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload.clamp(1200, DEFAULT_MAX_UDP_PAYLOAD));
    mtu
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_round_trip() {
        for result in [Ok(()), Err(Error::TooLarge { len: 10, max: 5 })] {
            let r = Response { batch_seq: 99, events: 3, result };
            let mut buf = Vec::new();
            r.encode(&mut buf);
            let fixed: [u8; RESPONSE_LEN] = buf[..RESPONSE_LEN].try_into().unwrap(); // ok: test code
            let (seq, code, len, events) = Response::decode_fixed(&fixed);
            assert_eq!((seq, events), (99, 3));
            assert_eq!(len, buf.len() - RESPONSE_LEN);
            match &r.result {
                Ok(()) => assert_eq!(code, 0),
                Err(e) => {
                    assert_eq!(code, e.code());
                    assert_eq!(std::str::from_utf8(&buf[RESPONSE_LEN..]).unwrap(), e.to_string()); // ok: test code
                }
            }
        }
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let r = Response { batch_seq: 1, events: 0, result: Err(Error::InvalidArchive("é".repeat(400))) };
        let mut buf = Vec::new();
        r.encode(&mut buf);
        assert!(buf.len() - RESPONSE_LEN <= MAX_REASON);
        assert!(std::str::from_utf8(&buf[RESPONSE_LEN..]).is_ok());
    }
}
