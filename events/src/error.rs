//! The one error type of the contract: every way a batch can be malformed, and every way the
//! engine can refuse work. Each variant has a stable numeric [`Error::code`] so a rejection can
//! cross the wire and be named again on the other side ([`Error::from_wire`]).

/// Errors of the wire format and of the engine contract.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The first four bytes are not `FLST`: not a fleetstream batch at all.
    #[error("bad magic {found:02x?}: not a fleetstream batch")]
    BadMagic {
        /// The bytes found instead.
        found: [u8; 4],
    },
    /// The sender speaks a wire format version this build does not know.
    #[error("unsupported wire format version {found}; this server speaks version {supported}")]
    UnsupportedVersion {
        /// The version in the header.
        found: u8,
        /// The version this build speaks.
        supported: u8,
    },
    /// The payload kind byte names no known payload.
    #[error("unknown payload kind {0}")]
    UnknownKind(u8),
    /// A batch of one payload kind where another was expected.
    #[error("payload kind {found} where kind {expected} was expected")]
    WrongKind {
        /// Kind in the header.
        found: u8,
        /// Kind the receiver expected.
        expected: u8,
    },
    /// Flags or reserved header bytes are set, which version 1 forbids.
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
    /// Fewer bytes than the header promises.
    #[error("truncated batch: {needed} bytes needed, {got} present")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// More bytes than the header promises.
    #[error("{extra} unexpected bytes after the batch body")]
    TrailingBytes {
        /// Bytes beyond the frame.
        extra: usize,
    },
    /// The body is over the receiver's size limit.
    #[error("batch body of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Body length in the header.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The batch holds more events than the receiver accepts.
    #[error("batch of {count} events is over the limit of {max} events")]
    TooManyEvents {
        /// Event count in the header.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// The checksum does not match: the bytes were corrupted.
    #[error("checksum mismatch: header says {expected:#010x}, content hashes to {computed:#010x}")]
    ChecksumMismatch {
        /// Checksum in the header.
        expected: u32,
        /// Checksum of the bytes received.
        computed: u32,
    },
    /// The body is not a valid archive of the payload type.
    #[error("invalid archive: {0}")]
    InvalidArchive(String),
    /// The header's event count disagrees with the archive.
    #[error("header counts {header} events but the archive holds {archive}")]
    CountMismatch {
        /// Count in the header.
        header: u32,
        /// Count in the archive.
        archive: usize,
    },
    /// Encoding a batch failed.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// The engine is shutting down and takes no more work.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The durable store has no room; nothing was accepted.
    #[error("storage full")]
    StorageFull,
    /// A subscriber fell too far behind and was cut off.
    #[error("subscriber lagged behind and was disconnected")]
    Lagged,
    /// A command named a delivery the engine does not know.
    #[error("unknown delivery {0}")]
    UnknownDelivery(u64),
    /// The drone already flies another delivery.
    #[error("drone {drone} is busy with delivery {delivery}")]
    DroneBusy {
        /// The drone.
        drone: u64,
        /// The delivery it is flying.
        delivery: u64,
    },
    /// The command does not apply to the delivery's current stage.
    #[error("delivery {delivery} cannot be changed: {reason}")]
    InvalidTransition {
        /// The delivery.
        delivery: u64,
        /// Why not.
        reason: &'static str,
    },
    /// A rejection received from a peer, by code; the message is the peer's.
    #[error("rejected ({name}, code {code}): {message}")]
    Rejected {
        /// Wire code.
        code: u16,
        /// Name of the code.
        name: &'static str,
        /// The peer's explanation.
        message: String,
    },
    /// A wire frame other than a batch (a request or response) is malformed.
    #[error("malformed frame: {0}")]
    MalformedFrame(&'static str),
    /// The durable store failed (not for lack of space); nothing was acknowledged.
    #[error("storage failed: {0}")]
    Storage(String),
    /// A subscriber asked for an offset the log no longer (or never) held.
    #[error("offset {requested} is not available; the log holds offsets from {first} to {next}")]
    OffsetUnavailable {
        /// The offset asked for.
        requested: u64,
        /// The first offset still held (retention deleted what came before).
        first: u64,
        /// The next offset to be written.
        next: u64,
    },
    /// An ack or nack for a lease that has expired or was released: the message has been (or
    /// will be) offered again, possibly to another consumer.
    #[error("the lease on message {0} was lost (it expired or was released)")]
    LeaseLost(u64),
    /// A queue operation named a message the queue does not hold.
    #[error("no message {0} in this queue")]
    UnknownMessage(u64),
    /// A newer consumer took this consumer's keys over (the drone reconnected elsewhere).
    #[error("a newer consumer took over these keys")]
    Superseded,
    /// A batch's sequence number is far below its producer's highest: not a re-send (those
    /// are recent) but a producer that started numbering again, whose batches would otherwise
    /// be taken for repeats and dropped. Nothing was stored; the producer must continue its
    /// sequence or take a new producer id.
    #[error(
        "batch {seq} of producer {producer} is far below its highest, {highest}: a restarted producer must continue its sequence or take a new producer id"
    )]
    SequenceRegressed {
        /// The producer.
        producer: u64,
        /// The batch's sequence number.
        seq: u64,
        /// The highest sequence number stored for the producer.
        highest: u64,
    },
    /// A bounded table is full and nothing in it may be let go (a new named cursor past the
    /// cap, a subscription past a delivery's cap, a drone when every tracked drone is flying).
    /// Nothing was changed; the limit is configurable where `what` says.
    #[error("{what}: the limit of {limit} is reached")]
    LimitReached {
        /// What is full, and the setting that sizes it.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
}

/// Stable wire codes with their names. Codes never change meaning; new ones are appended.
const CODES: &[(u16, &str)] = &[
    (1, "bad_magic"),
    (2, "unsupported_version"),
    (3, "unknown_kind"),
    (4, "wrong_kind"),
    (5, "reserved_not_zero"),
    (6, "truncated"),
    (7, "trailing_bytes"),
    (8, "too_large"),
    (9, "too_many_events"),
    (10, "checksum_mismatch"),
    (11, "invalid_archive"),
    (12, "count_mismatch"),
    (13, "encode"),
    (14, "shutting_down"),
    (15, "storage_full"),
    (16, "lagged"),
    (17, "unknown_delivery"),
    (18, "drone_busy"),
    (19, "invalid_transition"),
    (20, "malformed_frame"),
    (21, "storage_failed"),
    (22, "offset_unavailable"),
    (23, "lease_lost"),
    (24, "unknown_message"),
    (25, "superseded"),
    (26, "sequence_regressed"),
    (27, "limit_reached"),
];

impl Error {
    /// Stable numeric code for the wire (0 means success and is never an error).
    pub fn code(&self) -> u16 {
        match self {
            Error::BadMagic { .. } => 1,
            Error::UnsupportedVersion { .. } => 2,
            Error::UnknownKind(_) => 3,
            Error::WrongKind { .. } => 4,
            Error::ReservedNotZero => 5,
            Error::Truncated { .. } => 6,
            Error::TrailingBytes { .. } => 7,
            Error::TooLarge { .. } => 8,
            Error::TooManyEvents { .. } => 9,
            Error::ChecksumMismatch { .. } => 10,
            Error::InvalidArchive(_) => 11,
            Error::CountMismatch { .. } => 12,
            Error::Encode(_) => 13,
            Error::ShuttingDown => 14,
            Error::StorageFull => 15,
            Error::Lagged => 16,
            Error::UnknownDelivery(_) => 17,
            Error::DroneBusy { .. } => 18,
            Error::InvalidTransition { .. } => 19,
            Error::MalformedFrame(_) => 20,
            Error::Storage(_) => 21,
            Error::OffsetUnavailable { .. } => 22,
            Error::LeaseLost(_) => 23,
            Error::UnknownMessage(_) => 24,
            Error::Superseded => 25,
            Error::SequenceRegressed { .. } => 26,
            Error::LimitReached { .. } => 27,
            Error::Rejected { code, .. } => *code,
        }
    }

    /// Short snake_case name of the code, for logs and metric labels.
    pub fn name(&self) -> &'static str {
        code_name(self.code())
    }

    /// Rebuilds an error received from a peer as a code and a message.
    pub fn from_wire(code: u16, message: String) -> Self {
        Error::Rejected { code, name: code_name(code), message }
    }

    /// Whether the sender may try the same batch again later (the batch itself was fine and
    /// the server could not take it now: shutting down, storage full or storage failed).
    pub fn is_retryable(&self) -> bool {
        matches!(self.code(), 14 | 15 | 21)
    }
}

/// Name of a wire code; `"unknown"` for codes this build does not know.
pub fn code_name(code: u16) -> &'static str {
    CODES.iter().find(|(c, _)| *c == code).map_or("unknown", |(_, n)| n)
}

/// All wire codes and their names, for metric registration.
pub fn all_codes() -> &'static [(u16, &'static str)] {
    CODES
}
