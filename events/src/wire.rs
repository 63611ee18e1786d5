//! The batch wire format: a fixed 64-byte header followed by an rkyv archive of events.
//!
//! A batch is what a drone (or a gateway in front of several drones) sends in one frame, and what
//! the engine forwards to subscribers unchanged. The receiver validates a batch once
//! ([`Batch::validate`]) and from then on reads the events in place through the archived types:
//! nothing is deserialised into owned structs on the hot path.
//!
//! # Layout (all integers little-endian)
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `FLST` |
//! | 4 | 1 | format version (this build: [`VERSION`]) |
//! | 5 | 1 | payload kind: 1 = drone events, 2 = delivery events |
//! | 6 | 2 | flags, zero in version 1 |
//! | 8 | 4 | event count |
//! | 12 | 4 | body length in bytes |
//! | 16 | 8 | producer id (the sending drone or gateway) |
//! | 24 | 8 | batch sequence number, per producer |
//! | 32 | 4 | CRC-32C over bytes 0..32, bytes 36..64 and the body |
//! | 36 | 1 | trace flags (W3C `traceparent` flags) |
//! | 37 | 3 | reserved, zero |
//! | 40 | 16 | trace id (all zero: no trace) |
//! | 56 | 8 | parent span id |
//! | 64 | body length | rkyv archive of `Vec<T>` (16-byte aligned in memory) |
//!
//! # Versioning rule
//!
//! The magic never changes. The version byte changes whenever the header layout or the archived
//! layout of any payload type changes in a way an older reader would misread; a receiver rejects a
//! version it does not know with [`Error::UnsupportedVersion`] naming the versions it speaks, so a
//! sender learns at once instead of having data misread. Within one version nothing changes
//! layout: the flags and reserved bytes must be zero, so that a later version can give them
//! meaning without being misread by this one.

use std::marker::PhantomData;

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::vec::ArchivedVec;

use crate::Error;
use crate::model::{DeliveryEvent, DroneEvent};

/// First four bytes of every batch.
pub const MAGIC: [u8; 4] = *b"FLST";
/// The wire format version this build writes and reads.
pub const VERSION: u8 = 1;
/// Size of the fixed header in bytes; the body starts here, at an aligned offset.
pub const HEADER_LEN: usize = 64;
/// Default limit on a batch body: 4 MiB holds about 50,000 drone events, far more than any
/// sensible batch, while keeping the memory one in-flight frame can pin small.
pub const DEFAULT_MAX_BODY_BYTES: u32 = 4 << 20;
/// Default limit on the events in one batch (see [`DEFAULT_MAX_BODY_BYTES`]).
pub const DEFAULT_MAX_EVENTS: u32 = 65_536;

/// The buffer a batch lives in: 16-byte aligned so the archive can be read in place.
pub type Buffer = AlignedVec<16>;

/// What the archive in a batch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PayloadKind {
    /// [`DroneEvent`]s: telemetry.
    DroneEvents = 1,
    /// [`DeliveryEvent`]s: derived delivery changes.
    DeliveryEvents = 2,
}

impl PayloadKind {
    fn from_byte(b: u8) -> Result<Self, Error> {
        match b {
            1 => Ok(Self::DroneEvents),
            2 => Ok(Self::DeliveryEvents),
            other => Err(Error::UnknownKind(other)),
        }
    }
}

/// W3C trace context carried by a batch (all zero: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct TraceContext {
    /// Trace id; all zero when the batch is not traced.
    pub trace_id: [u8; 16],
    /// The sender's span id.
    pub span_id: [u8; 8],
    /// `traceparent` flags (bit 0: sampled).
    pub flags: u8,
}

/// Who sent a batch and where it stands in that sender's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct BatchMeta {
    /// The sending drone or gateway.
    pub producer_id: u64,
    /// Per-producer batch sequence number.
    pub batch_seq: u64,
    /// Trace context, if any.
    pub trace: TraceContext,
}

/// The decoded fixed header of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Payload kind.
    pub kind: PayloadKind,
    /// Number of events the archive holds.
    pub event_count: u32,
    /// Length of the body following the header.
    pub body_len: u32,
    /// Producer, sequence and trace.
    pub meta: BatchMeta,
    /// CRC-32C as written by the sender.
    pub checksum: u32,
}

/// Limits a receiver enforces before it reads or keeps a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body accepted, bytes.
    pub max_body_bytes: u32,
    /// Most events accepted in one batch.
    pub max_events: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_body_bytes: DEFAULT_MAX_BODY_BYTES, max_events: DEFAULT_MAX_EVENTS }
    }
}

impl BatchHeader {
    /// Parses and checks the fixed header: magic, version, kind, reserved bytes and the limits.
    ///
    /// A stream reader calls this on the first [`HEADER_LEN`] bytes of a frame to learn how many
    /// body bytes follow, before it reads (or refuses to read) them.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Self, Error> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::Truncated { needed: HEADER_LEN, got: bytes.len() });
        }
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(Error::BadMagic { found: magic });
        }
        if bytes[4] != VERSION {
            return Err(Error::UnsupportedVersion { found: bytes[4], supported: VERSION });
        }
        let kind = PayloadKind::from_byte(bytes[5])?;
        if bytes[6..8] != [0, 0] || bytes[37..40] != [0, 0, 0] {
            return Err(Error::ReservedNotZero);
        }
        let event_count = le_u32(bytes, 8);
        let body_len = le_u32(bytes, 12);
        if body_len > limits.max_body_bytes {
            return Err(Error::TooLarge { len: body_len, max: limits.max_body_bytes });
        }
        if event_count > limits.max_events {
            return Err(Error::TooManyEvents { count: event_count, max: limits.max_events });
        }
        let mut trace_id = [0u8; 16];
        trace_id.copy_from_slice(&bytes[40..56]);
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&bytes[56..64]);
        Ok(Self {
            kind,
            event_count,
            body_len,
            meta: BatchMeta {
                producer_id: le_u64(bytes, 16),
                batch_seq: le_u64(bytes, 24),
                trace: TraceContext { trace_id, span_id, flags: bytes[36] },
            },
            checksum: le_u32(bytes, 32),
        })
    }

    /// Total frame length: header plus body.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }

    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.kind as u8;
        out[6..8].fill(0);
        out[8..12].copy_from_slice(&self.event_count.to_le_bytes());
        out[12..16].copy_from_slice(&self.body_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.meta.producer_id.to_le_bytes());
        out[24..32].copy_from_slice(&self.meta.batch_seq.to_le_bytes());
        out[32..36].copy_from_slice(&self.checksum.to_le_bytes());
        out[36] = self.meta.trace.flags;
        out[37..40].fill(0);
        out[40..56].copy_from_slice(&self.meta.trace.trace_id);
        out[56..64].copy_from_slice(&self.meta.trace.span_id);
    }
}

/// An event type that travels in batches.
pub trait Payload: rkyv::Archive + Sized + 'static {
    /// The payload kind byte for this type.
    const KIND: PayloadKind;

    /// Validates an archive of `Vec<Self>` (bounds, alignment, enum tags) and returns it.
    fn check(body: &[u8]) -> Result<&ArchivedVec<Self::Archived>, rancor::Error>;

    /// Appends the archive of `events` to `buf`.
    fn archive_into(events: &[Self], buf: Buffer) -> Result<Buffer, rancor::Error>;

    /// When an archived event was created, µs since the epoch.
    fn created_us(event: &Self::Archived) -> u64;
}

macro_rules! payload {
    ($ty:ty, $kind:expr) => {
        impl Payload for $ty {
            const KIND: PayloadKind = $kind;

            fn check(body: &[u8]) -> Result<&ArchivedVec<Self::Archived>, rancor::Error> {
                rkyv::access::<ArchivedVec<<$ty as rkyv::Archive>::Archived>, rancor::Error>(body)
            }

            fn archive_into(events: &[Self], buf: Buffer) -> Result<Buffer, rancor::Error> {
                rkyv::api::high::to_bytes_in::<_, rancor::Error>(&SliceBody(events), buf)
            }

            fn created_us(event: &Self::Archived) -> u64 {
                event.ts_us.to_native()
            }
        }
    };
}

payload!(DroneEvent, PayloadKind::DroneEvents);
payload!(DeliveryEvent, PayloadKind::DeliveryEvents);

/// A slice serialised exactly as `Vec<T>` would be, so producers need not own a `Vec`.
struct SliceBody<'a, T>(&'a [T]);

impl<T: rkyv::Archive> rkyv::Archive for SliceBody<'_, T> {
    type Archived = ArchivedVec<T::Archived>;
    type Resolver = rkyv::vec::VecResolver;

    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        ArchivedVec::resolve_from_slice(self.0, resolver, out);
    }
}

impl<T, S> rkyv::Serialize<S> for SliceBody<'_, T>
where
    T: rkyv::Serialize<S>,
    S: rancor::Fallible + rkyv::ser::Allocator + rkyv::ser::Writer + ?Sized,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        ArchivedVec::serialize_from_slice(self.0, serializer)
    }
}

/// A validated batch: header and archive in one aligned buffer, read in place.
///
/// The only ways to build one are [`Batch::validate`] (untrusted bytes) and [`Batch::encode`]
/// (bytes this process just produced), and the buffer is never mutated afterwards; that is what
/// makes [`Batch::events`] sound without validating again.
pub struct Batch<T: Payload> {
    buf: Buffer,
    header: BatchHeader,
    _payload: PhantomData<fn() -> T>,
}

/// A batch of drone telemetry.
pub type TelemetryBatch = Batch<DroneEvent>;
/// A batch of derived delivery events.
pub type DeliveryBatch = Batch<DeliveryEvent>;

impl<T: Payload> Batch<T> {
    /// Validates a whole frame (header and body) received from an untrusted sender.
    ///
    /// Checks, in order: header ([`BatchHeader::parse`]), payload kind, frame length, checksum,
    /// archive structure, and that the archive holds as many events as the header says.
    pub fn validate(buf: Buffer, limits: &Limits) -> Result<Self, Error> {
        let header = BatchHeader::parse(&buf, limits)?;
        if header.kind != T::KIND {
            return Err(Error::WrongKind { found: header.kind as u8, expected: T::KIND as u8 });
        }
        let frame_len = header.frame_len();
        if buf.len() < frame_len {
            return Err(Error::Truncated { needed: frame_len, got: buf.len() });
        }
        if buf.len() > frame_len {
            return Err(Error::TrailingBytes { extra: buf.len() - frame_len });
        }
        let computed = checksum(&buf[..HEADER_LEN], &buf[HEADER_LEN..]);
        if computed != header.checksum {
            return Err(Error::ChecksumMismatch { expected: header.checksum, computed });
        }
        let events = T::check(&buf[HEADER_LEN..]).map_err(|e| Error::InvalidArchive(e.to_string()))?;
        if events.len() != header.event_count as usize {
            return Err(Error::CountMismatch { header: header.event_count, archive: events.len() });
        }
        Ok(Self { buf, header, _payload: PhantomData })
    }

    /// Encodes `events` into `buf` (cleared first, so a caller can reuse its allocation).
    pub fn encode(meta: BatchMeta, events: &[T], buf: Buffer) -> Result<Self, Error> {
        let mut buf = buf;
        buf.clear();
        buf.extend_from_slice(&[0u8; HEADER_LEN]);
        let mut buf = T::archive_into(events, buf).map_err(|e| Error::Encode(e.to_string()))?;
        let body_len = u32::try_from(buf.len() - HEADER_LEN).map_err(|_| Error::Encode("body over 4 GiB".into()))?;
        let event_count = u32::try_from(events.len()).map_err(|_| Error::Encode("more than 2^32 events".into()))?;
        let mut header = BatchHeader { kind: T::KIND, event_count, body_len, meta, checksum: 0 };
        header.write(&mut buf[..HEADER_LEN]);
        header.checksum = checksum(&buf[..HEADER_LEN], &buf[HEADER_LEN..]);
        header.write(&mut buf[..HEADER_LEN]);
        Ok(Self { buf, header, _payload: PhantomData })
    }

    /// The header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// When the batch's first event was created (µs since the epoch); `None` for an empty
    /// batch.
    pub fn first_created_us(&self) -> Option<u64> {
        self.events().first().map(T::created_us)
    }

    /// The events, read in place.
    pub fn events(&self) -> &ArchivedVec<T::Archived> {
        // SAFETY: every constructor either validated `buf[HEADER_LEN..]` as an archive of
        // `Vec<T>` (`validate`) or wrote it with rkyv's serializer for that type (`encode`), and
        // the buffer is immutable after construction.
        unsafe { rkyv::access_unchecked::<ArchivedVec<T::Archived>>(&self.buf[HEADER_LEN..]) }
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.header.event_count as usize
    }

    /// Whether the batch holds no events.
    pub fn is_empty(&self) -> bool {
        self.header.event_count == 0
    }

    /// The whole frame as it travels on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Gives the buffer back, for reuse.
    pub fn into_buffer(self) -> Buffer {
        self.buf
    }
}

impl<T: Payload> std::fmt::Debug for Batch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("header", &self.header).finish_non_exhaustive()
    }
}

/// CRC-32C over a header (without its checksum field) and a body.
/// A frame of `kind` around `body`, whatever it holds, with a header whose lengths and checksum
/// are right: what a fuzzer uses to reach the archive validation behind the checksum, and
/// tests to build a frame whose archive is bad.
#[doc(hidden)]
pub fn seal(kind: PayloadKind, event_count: u32, meta: BatchMeta, body: &[u8]) -> Vec<u8> {
    let header = BatchHeader { kind, event_count, body_len: body.len() as u32, meta, checksum: 0 };
    let mut frame = vec![0u8; HEADER_LEN];
    header.write(&mut frame);
    frame.extend_from_slice(body);
    let sum = checksum(&frame[..HEADER_LEN], &frame[HEADER_LEN..]);
    frame[32..36].copy_from_slice(&sum.to_le_bytes());
    frame
}

fn checksum(header: &[u8], body: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&header[..32]);
    let crc = crc32c::crc32c_append(crc, &header[36..HEADER_LEN]);
    crc32c::crc32c_append(crc, body)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Copies arbitrary bytes into an aligned buffer (for tests, fuzzing and readers that did not
/// receive into a [`Buffer`]).
pub fn buffer_from(bytes: &[u8]) -> Buffer {
    let mut buf = Buffer::with_capacity(bytes.len());
    buf.extend_from_slice(bytes);
    buf
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{DeliveryStage, DroneEventKind, FlightStatus, GeoPoint};

    fn event(drone_id: u64, seq: u64) -> DroneEvent {
        DroneEvent {
            drone_id,
            seq,
            ts_us: 1_700_000_000_000_000 + seq,
            position: GeoPoint { lat: 47.6, lon: -122.3, alt_m: 120.0 },
            speed_mps: 12.5,
            heading_deg: 90.0,
            battery_pct: 80.0,
            status: FlightStatus::Flying,
            kind: DroneEventKind::Position,
        }
    }

    fn meta() -> BatchMeta {
        BatchMeta { producer_id: 7, batch_seq: 42, trace: TraceContext::default() }
    }

    fn frame(events: &[DroneEvent]) -> Vec<u8> {
        TelemetryBatch::encode(meta(), events, Buffer::new()).unwrap().as_bytes().to_vec() // ok: test code
    }

    fn validate(bytes: &[u8]) -> Result<TelemetryBatch, Error> {
        TelemetryBatch::validate(buffer_from(bytes), &Limits::default())
    }

    /// Rewrites the checksum so a test can reach the checks that come after it.
    fn reseal(bytes: &mut [u8]) {
        let (header, body) = bytes.split_at_mut(HEADER_LEN);
        let crc = checksum(header, body);
        header[32..36].copy_from_slice(&crc.to_le_bytes());
    }

    fn arb_kind() -> impl Strategy<Value = DroneEventKind> {
        prop_oneof![
            Just(DroneEventKind::Position),
            any::<u64>().prop_map(|delivery| DroneEventKind::PickedUp { delivery }),
            any::<u64>().prop_map(|delivery| DroneEventKind::DroppedOff { delivery }),
            arb_status().prop_map(|from| DroneEventKind::StatusChanged { from }),
        ]
    }

    fn arb_status() -> impl Strategy<Value = FlightStatus> {
        prop_oneof![
            Just(FlightStatus::Idle),
            Just(FlightStatus::Flying),
            Just(FlightStatus::Charging),
            Just(FlightStatus::Fault)
        ]
    }

    prop_compose! {
        fn arb_event()(drone_id in any::<u64>(), seq in any::<u64>(), ts_us in any::<u64>(),
                       lat in -90.0f64..90.0, lon in -180.0f64..180.0, alt in 0.0f32..500.0,
                       speed in 0.0f32..40.0, heading in 0.0f32..360.0, battery in 0.0f32..100.0,
                       status in arb_status(), kind in arb_kind()) -> DroneEvent {
            DroneEvent { drone_id, seq, ts_us, position: GeoPoint { lat, lon, alt_m: alt },
                speed_mps: speed, heading_deg: heading, battery_pct: battery, status, kind }
        }
    }

    proptest! {
        #[test]
        fn round_trip(events in proptest::collection::vec(arb_event(), 0..200),
                      producer_id in any::<u64>(), batch_seq in any::<u64>(),
                      trace_id in any::<[u8; 16]>(), span_id in any::<[u8; 8]>(), flags in any::<u8>()) {
            let meta = BatchMeta { producer_id, batch_seq, trace: TraceContext { trace_id, span_id, flags } };
            let encoded = TelemetryBatch::encode(meta, &events, Buffer::new()).unwrap(); // ok: test code
            let batch = validate(encoded.as_bytes()).unwrap(); // ok: test code
            prop_assert_eq!(batch.header().meta, meta);
            prop_assert_eq!(batch.len(), events.len());
            for (archived, owned) in batch.events().iter().zip(&events) {
                let back: DroneEvent = rkyv::deserialize::<DroneEvent, rancor::Error>(archived).unwrap(); // ok: test code
                prop_assert_eq!(&back, owned);
            }
        }

        /// Whatever bytes arrive, validation returns (never panics), and flipping any single bit
        /// of a good frame is always detected.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = validate(&bytes);
        }

        #[test]
        fn any_bit_flip_is_rejected(n in 1usize..20, pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let events: Vec<_> = (0..n as u64).map(|i| event(i, i)).collect();
            let mut bytes = frame(&events);
            let at = pos.index(bytes.len());
            bytes[at] ^= 1 << bit;
            prop_assert!(validate(&bytes).is_err());
        }
    }

    #[test]
    fn delivery_batches_round_trip() {
        let ev = DeliveryEvent {
            delivery_id: 9,
            seq: 3,
            drone_id: 4,
            ts_us: 5,
            location: GeoPoint::new(1.0, 2.0),
            stage: DeliveryStage::DeliveryComplete,
        };
        let b = DeliveryBatch::encode(meta(), &[ev], Buffer::new()).unwrap(); // ok: test code
        let back = DeliveryBatch::validate(buffer_from(b.as_bytes()), &Limits::default()).unwrap(); // ok: test code
        assert_eq!(back.events()[0].stage, DeliveryStage::DeliveryComplete);
        assert_eq!(back.events()[0].delivery_id.to_native(), 9);
    }

    #[test]
    fn wrong_magic() {
        let mut b = frame(&[event(1, 1)]);
        b[0] = b'X';
        assert!(matches!(validate(&b), Err(Error::BadMagic { found }) if found == *b"XLST"));
    }

    #[test]
    fn unknown_version() {
        let mut b = frame(&[event(1, 1)]);
        b[4] = 9;
        assert_eq!(validate(&b).unwrap_err(), Error::UnsupportedVersion { found: 9, supported: VERSION });
    }

    #[test]
    fn unknown_and_wrong_kind() {
        let mut b = frame(&[event(1, 1)]);
        b[5] = 77;
        assert_eq!(validate(&b).unwrap_err(), Error::UnknownKind(77));
        let mut b = frame(&[event(1, 1)]);
        b[5] = PayloadKind::DeliveryEvents as u8;
        assert!(matches!(validate(&b), Err(Error::WrongKind { found: 2, expected: 1 })));
    }

    #[test]
    fn reserved_bytes_must_be_zero() {
        let mut b = frame(&[event(1, 1)]);
        b[38] = 1;
        assert_eq!(validate(&b).unwrap_err(), Error::ReservedNotZero);
    }

    #[test]
    fn truncated_header_and_body() {
        let b = frame(&[event(1, 1), event(1, 2)]);
        assert_eq!(validate(&b[..10]).unwrap_err(), Error::Truncated { needed: HEADER_LEN, got: 10 });
        let cut = b.len() - 5;
        assert_eq!(validate(&b[..cut]).unwrap_err(), Error::Truncated { needed: b.len(), got: cut });
    }

    #[test]
    fn trailing_bytes() {
        let mut b = frame(&[event(1, 1)]);
        b.extend_from_slice(&[0, 0, 0]);
        assert_eq!(validate(&b).unwrap_err(), Error::TrailingBytes { extra: 3 });
    }

    #[test]
    fn bad_checksum() {
        let mut b = frame(&[event(1, 1)]);
        let last = b.len() - 1;
        b[last] ^= 0xff;
        assert!(matches!(validate(&b), Err(Error::ChecksumMismatch { .. })));
    }

    #[test]
    fn invalid_archive() {
        let mut b = frame(&[event(1, 1)]);
        // The status tag of the first event sits inside the body; an out-of-range tag must be
        // caught by the archive check, not read.
        let end = b.len() - 8;
        for byte in &mut b[HEADER_LEN..end] {
            if *byte == 1 {
                *byte = 200;
            }
        }
        reseal(&mut b);
        assert!(matches!(validate(&b), Err(Error::InvalidArchive(_))), "{:?}", validate(&b));
        let mut garbage = frame(&[]);
        garbage.truncate(HEADER_LEN);
        garbage.extend_from_slice(&[0xAB; 24]);
        garbage[12..16].copy_from_slice(&24u32.to_le_bytes());
        reseal(&mut garbage);
        assert!(matches!(validate(&garbage), Err(Error::InvalidArchive(_))));
    }

    #[test]
    fn count_mismatch() {
        let mut b = frame(&[event(1, 1), event(1, 2)]);
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        reseal(&mut b);
        assert_eq!(validate(&b).unwrap_err(), Error::CountMismatch { header: 3, archive: 2 });
    }

    #[test]
    fn over_the_size_limits() {
        let events: Vec<_> = (0..100).map(|i| event(1, i)).collect();
        let b = frame(&events);
        let small = Limits { max_body_bytes: 100, max_events: 1000 };
        assert!(matches!(TelemetryBatch::validate(buffer_from(&b), &small), Err(Error::TooLarge { max: 100, .. })));
        let few = Limits { max_body_bytes: u32::MAX, max_events: 10 };
        assert_eq!(
            TelemetryBatch::validate(buffer_from(&b), &few).unwrap_err(),
            Error::TooManyEvents { count: 100, max: 10 }
        );
    }

    #[test]
    fn codes_round_trip_through_the_wire() {
        let e = Error::ChecksumMismatch { expected: 1, computed: 2 };
        let back = Error::from_wire(e.code(), e.to_string());
        assert_eq!(back.code(), e.code());
        assert_eq!(back.name(), "checksum_mismatch");
        assert_eq!(crate::code_name(999), "unknown");
    }
}
