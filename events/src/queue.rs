//! The queue path's contract: work that must be done once, by one of several competing
//! consumers, with acknowledgement, redelivery and a dead-letter queue.
//!
//! The stream path ([`crate::StreamSource`]) shows every subscriber every event; a queue hands
//! each message to one consumer at a time. A consumer leases messages, processes them and acks
//! each; a message not acked within the queue's visibility timeout (or nacked, or whose consumer
//! went away) is offered again, and after the queue's maximum number of attempts it moves to the
//! queue's dead-letter queue with the reason. The two paths share nothing, so neither can stall
//! the other.
//!
//! Every message carries a `key`. A consumer leases from a [`KeyRange`]: the whole queue
//! ([`KeyRange::ALL`], e.g. notifiers) or a slice of it (a fleet gateway takes the commands of
//! the drones it serves, keyed by drone id). Messages of one key are offered in enqueue order.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::Error;
use crate::model::{DeliveryId, DroneId, GeoPoint};

/// The queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueName {
    /// Missions and other commands for drones, keyed by drone id.
    DroneCommands,
    /// Customer notifications to send (email, text), keyed by delivery id.
    Notifications,
}

impl QueueName {
    /// Every queue.
    pub const ALL: [QueueName; 2] = [QueueName::DroneCommands, QueueName::Notifications];

    /// The queue's public name.
    pub const fn name(self) -> &'static str {
        match self {
            QueueName::DroneCommands => "drone-commands",
            QueueName::Notifications => "notifications",
        }
    }

    /// Parses a public name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|q| q.name() == name)
    }

    /// The queue's byte on the wire.
    pub const fn to_byte(self) -> u8 {
        match self {
            QueueName::DroneCommands => 1,
            QueueName::Notifications => 2,
        }
    }

    /// Reads a queue byte.
    pub fn from_byte(b: u8) -> Result<Self, Error> {
        Self::ALL.into_iter().find(|q| q.to_byte() == b).ok_or(Error::MalformedFrame("unknown queue"))
    }
}

/// Keys `lo..hi` (half open) a consumer takes messages of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRange {
    /// First key included.
    pub lo: u64,
    /// First key after the range.
    pub hi: u64,
}

impl KeyRange {
    /// Every key.
    pub const ALL: KeyRange = KeyRange { lo: 0, hi: u64::MAX };

    /// Whether `key` is in the range (`u64::MAX` belongs to [`KeyRange::ALL`] only).
    pub fn contains(&self, key: u64) -> bool {
        (self.lo <= key && key < self.hi) || (*self == Self::ALL)
    }
}

/// One message as a consumer receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leased {
    /// The message's id, unique within its queue.
    pub id: u64,
    /// Its key.
    pub key: u64,
    /// Which delivery attempt this is, from 1.
    pub attempt: u32,
    /// Proves the lease: an ack or nack with an older lease's token is refused, so a consumer
    /// whose lease expired cannot ack a message someone else now holds.
    pub token: u64,
    /// The payload.
    pub payload: Arc<[u8]>,
}

/// A consumer's verdict on a message it leased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Done: the message is removed.
    Ack,
    /// Failed, with the reason: offered again, or dead-lettered once out of attempts.
    Nack(String),
}

/// What the queue path offers the edges.
pub trait WorkQueues: Send + Sync + 'static {
    /// Adds a message; resolves once it is durable. [`Error::StorageFull`] when the queue holds
    /// its maximum number of messages.
    fn enqueue(&self, queue: QueueName, key: u64, payload: Vec<u8>) -> impl Future<Output = Result<u64, Error>> + Send;

    /// [`WorkQueues::enqueue`] of a message that may be enqueued more than once under the same
    /// `id` (several nodes applying the same event): a backend shared by those nodes stores it
    /// once within its duplicate window (JetStream's message id); a queue of one process, which
    /// only that process fills, stores each copy.
    fn enqueue_once(
        &self,
        queue: QueueName,
        key: u64,
        id: String,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        let _ = id;
        self.enqueue(queue, key, payload)
    }

    /// Leases up to `max` ready messages with keys in `keys` to `consumer`, waiting up to `wait`
    /// for the first one. An empty result means nothing was ready in time.
    fn lease(
        &self,
        queue: QueueName,
        consumer: u64,
        keys: KeyRange,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Leased>, Error>> + Send;

    /// Settles a leased message. A stale token (the lease expired and the message moved on) is
    /// [`Error::LeaseLost`].
    fn settle(&self, queue: QueueName, id: u64, token: u64, verdict: Verdict) -> Result<(), Error>;

    /// The consumer went away: everything it holds is offered again now.
    fn release(&self, queue: QueueName, consumer: u64);

    /// Takes back the messages of `key` that are waiting and not leased, and whose payload
    /// `matches` (a cancelled delivery's mission, before its drone has it); returns how many.
    /// Durable once it resolves. A backend that cannot do this answers 0, and the caller
    /// follows up in band (the drone is told to return to base).
    fn withdraw<'a>(
        &'a self,
        queue: QueueName,
        key: u64,
        matches: &'a (dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> impl Future<Output = Result<usize, Error>> + Send + 'a {
        let _ = (queue, key, matches);
        async { Ok(0) }
    }

    /// Attaches a consumer for `keys` and returns its id. On a queue whose keys are exclusive
    /// (`drone-commands`: one session per drone), an older consumer of overlapping keys is
    /// superseded: what it holds is offered again at once and its next lease fails with
    /// [`Error::Superseded`].
    fn attach(&self, queue: QueueName, keys: KeyRange) -> Result<u64, Error>;
}

/// What a drone is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissionKind {
    /// Fly the delivery: to the pickup, then to the drop-off. A second `Fly` for the delivery
    /// a drone already has replaces its places (a reschedule) while the package is not yet
    /// picked up, and is otherwise the same mission again (a redelivery): taken once.
    #[default]
    Fly,
    /// The delivery is cancelled: drop a mission for it that has not started, or stop flying
    /// it and return to base. A drone that never had it remembers not to fly it.
    ReturnToBase,
}

/// A mission for one drone, as it travels in the `drone-commands` queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mission {
    /// What to do.
    pub kind: MissionKind,
    /// The delivery to fly.
    pub delivery_id: DeliveryId,
    /// The drone that flies it (the message's key).
    pub drone_id: DroneId,
    /// Where the package is collected.
    pub pickup: GeoPoint,
    /// Where it is dropped off.
    pub dropoff: GeoPoint,
    /// When the delivery was scheduled, µs since the epoch.
    pub ts_us: u64,
    /// The scheduling request's trace, for the drone to carry on the batch that flies the
    /// mission (all zero: none).
    pub trace: crate::TraceContext,
}

impl Mission {
    /// Encoded length of version 1 (no trace).
    pub const LEN: usize = 1 + 8 + 8 + 2 * 20 + 8;
    /// Encoded length of version 2: version 1 and the trace context (id, span, flags).
    pub const LEN_TRACED: usize = Self::LEN + 16 + 8 + 1;
    const VERSION: u8 = 1;
    const VERSION_TRACED: u8 = 2;
    const VERSION_KIND: u8 = 3;

    /// A mission to fly `delivery_id`.
    pub fn fly(
        delivery_id: DeliveryId,
        drone_id: DroneId,
        pickup: GeoPoint,
        dropoff: GeoPoint,
        ts_us: u64,
        trace: crate::TraceContext,
    ) -> Self {
        Self { kind: MissionKind::Fly, delivery_id, drone_id, pickup, dropoff, ts_us, trace }
    }

    /// Little-endian fixed layout: version, delivery, drone, pickup (lat, lon, alt), drop-off,
    /// time; version 2 (written when there is a trace) appends trace id, span id and flags. A
    /// `Fly` is written as version 1 or 2, which every drone reads. Version 3 carries any
    /// kind: a kind byte after the version, then version 1's fields, a byte saying whether a
    /// trace follows, and the trace when it does.
    pub fn to_bytes(&self) -> Vec<u8> {
        let traced = self.trace.is_some();
        let mut out = Vec::with_capacity(Self::LEN_TRACED + 2);
        let versioned = self.kind != MissionKind::Fly;
        if versioned {
            out.push(Self::VERSION_KIND);
            out.push(1);
        } else {
            out.push(if traced { Self::VERSION_TRACED } else { Self::VERSION });
        }
        out.extend_from_slice(&self.delivery_id.to_le_bytes());
        out.extend_from_slice(&self.drone_id.to_le_bytes());
        for p in [self.pickup, self.dropoff] {
            out.extend_from_slice(&p.lat.to_le_bytes());
            out.extend_from_slice(&p.lon.to_le_bytes());
            out.extend_from_slice(&p.alt_m.to_le_bytes());
        }
        out.extend_from_slice(&self.ts_us.to_le_bytes());
        if versioned {
            out.push(u8::from(traced));
        }
        if traced {
            out.extend_from_slice(&self.trace.trace_id);
            out.extend_from_slice(&self.trace.span_id);
            out.push(self.trace.flags);
        }
        out
    }

    /// Decodes a mission of version 1, 2 or 3; anything else is an error.
    pub fn from_bytes(b: &[u8]) -> Result<Self, Error> {
        let Some(&version) = b.first() else { return Err(Error::MalformedFrame("mission has the wrong length")) };
        let (kind, traced, expected) = match version {
            Self::VERSION => (MissionKind::Fly, false, Self::LEN),
            Self::VERSION_TRACED => (MissionKind::Fly, true, Self::LEN_TRACED),
            Self::VERSION_KIND => {
                // A `Fly` is always written as version 1 or 2: one encoding per mission.
                let kind = match b.get(1) {
                    Some(1) => MissionKind::ReturnToBase,
                    Some(_) => return Err(Error::MalformedFrame("mission of an unknown kind")),
                    None => return Err(Error::MalformedFrame("mission has the wrong length")),
                };
                let traced = match b.get(Self::LEN + 1) {
                    Some(0) => false,
                    Some(1) => true,
                    _ => return Err(Error::MalformedFrame("mission has the wrong length")),
                };
                (kind, traced, if traced { Self::LEN_TRACED + 2 } else { Self::LEN + 2 })
            }
            found => return Err(Error::UnsupportedVersion { found, supported: Self::VERSION_KIND }),
        };
        if b.len() != expected {
            return Err(Error::MalformedFrame("mission has the wrong length"));
        }
        let mut at = if version == Self::VERSION_KIND { 2 } else { 1 };
        let mut take = |n: usize| {
            let s = &b[at..at + n];
            at += n;
            s
        };
        let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
        let f64_of = |s: &[u8]| f64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
        let delivery_id = u64_of(take(8));
        let drone_id = u64_of(take(8));
        let mut point = || {
            let lat = f64_of(take(8));
            let lon = f64_of(take(8));
            let alt_m = f32::from_le_bytes(take(4).try_into().unwrap_or([0; 4]));
            GeoPoint { lat, lon, alt_m }
        };
        let pickup = point();
        let dropoff = point();
        let ts_us = u64_of(take(8));
        if version == Self::VERSION_KIND {
            take(1);
        }
        let mut trace = crate::TraceContext::default();
        if traced {
            trace.trace_id.copy_from_slice(take(16));
            trace.span_id.copy_from_slice(take(8));
            trace.flags = take(1)[0];
            if !trace.is_some() {
                return Err(Error::MalformedFrame("a mission that says it is traced must carry a trace"));
            }
        }
        let m = Mission { kind, delivery_id, drone_id, pickup, dropoff, ts_us, trace };
        if !(m.pickup.is_valid() && m.dropoff.is_valid()) {
            return Err(Error::MalformedFrame("mission has an invalid coordinate"));
        }
        Ok(m)
    }
}

/// How long a consumer may take before redelivery, as the queues are configured by default.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missions_round_trip_and_bad_bytes_are_refused() {
        let m = Mission {
            kind: MissionKind::Fly,
            delivery_id: 7,
            drone_id: 42,
            pickup: GeoPoint::new(47.6, -122.3),
            dropoff: GeoPoint { lat: 47.7, lon: -122.2, alt_m: 3.5 },
            ts_us: 1_700_000_000_000_000,
            trace: crate::TraceContext::default(),
        };
        let bytes = m.to_bytes();
        assert_eq!(bytes.len(), Mission::LEN);
        assert_eq!(Mission::from_bytes(&bytes), Ok(m));
        assert!(Mission::from_bytes(&bytes[1..]).is_err());
        assert!(Mission::from_bytes(&[]).is_err());
        let mut v9 = bytes.clone();
        v9[0] = 9;
        assert!(matches!(Mission::from_bytes(&v9), Err(Error::UnsupportedVersion { found: 9, .. })));
        // With a trace: version 2, and the trace comes back.
        let traced = Mission { trace: crate::TraceContext::new_root(), ..m };
        let tb = traced.to_bytes();
        assert_eq!((tb[0], tb.len()), (2, Mission::LEN_TRACED));
        assert_eq!(Mission::from_bytes(&tb), Ok(traced));
        let mut short = tb.clone();
        short[0] = 1;
        assert!(Mission::from_bytes(&short).is_err(), "version 1 with a trace's length");
        let mut bad = bytes;
        bad[17..25].copy_from_slice(&500.0f64.to_le_bytes());
        assert!(Mission::from_bytes(&bad).is_err(), "latitude 500 is refused");
    }

    #[test]
    fn return_to_base_is_version_3_with_or_without_a_trace_and_fly_stays_readable() {
        let fly = Mission::fly(7, 42, GeoPoint::new(47.6, -122.3), GeoPoint::new(47.7, -122.2), 9, Default::default());
        let back = Mission { kind: MissionKind::ReturnToBase, ..fly };
        let bytes = back.to_bytes();
        assert_eq!((bytes[0], bytes[1], bytes.len()), (3, 1, Mission::LEN + 2));
        assert_eq!(Mission::from_bytes(&bytes), Ok(back));
        let traced = Mission { trace: crate::TraceContext::new_root(), ..back };
        let tb = traced.to_bytes();
        assert_eq!(tb.len(), Mission::LEN_TRACED + 2);
        assert_eq!(Mission::from_bytes(&tb), Ok(traced));
        assert_eq!(fly.to_bytes()[0], 1, "a Fly stays version 1, which older drones read");
        for kind in [0, 7] {
            let mut other = bytes.clone();
            other[1] = kind;
            assert!(Mission::from_bytes(&other).is_err(), "kind {kind} is refused in version 3");
        }
        let mut says_traced = bytes;
        says_traced[Mission::LEN + 1] = 1;
        assert!(Mission::from_bytes(&says_traced).is_err(), "a trace flag without its trace");
    }

    proptest::proptest! {
        /// Any bytes of a mission's length (any version) either decode to a mission that
        /// encodes back to the same bytes or are refused; none panic.
        #[test]
        fn arbitrary_mission_bytes_round_trip_or_are_refused(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, Mission::LEN_TRACED + 2), version in 1u8..=3,
            traced in proptest::bool::ANY,
        ) {
            let mut bytes = bytes;
            bytes[0] = version;
            match (version, traced) {
                (1, _) => bytes.truncate(Mission::LEN),
                (2, _) => bytes.truncate(Mission::LEN_TRACED),
                (_, false) => {
                    bytes.truncate(Mission::LEN + 2);
                    bytes[Mission::LEN + 1] = 0;
                }
                (_, true) => bytes[Mission::LEN + 1] = 1,
            }
            if let Ok(m) = Mission::from_bytes(&bytes) {
                proptest::prop_assert_eq!(m.to_bytes(), bytes);
            }
        }

        /// Every valid mission survives encoding.
        #[test]
        fn valid_missions_round_trip(
            ids in (proptest::num::u64::ANY, proptest::num::u64::ANY, proptest::num::u64::ANY),
            lat in -90.0f64..=90.0, lon in -180.0f64..=180.0, alt in -100.0f32..10_000.0,
        ) {
            let p = GeoPoint { lat, lon, alt_m: alt };
            let m = Mission {
                kind: MissionKind::Fly,
                delivery_id: ids.0, drone_id: ids.1, pickup: p, dropoff: GeoPoint::new(-lat, -lon), ts_us: ids.2,
                trace: crate::TraceContext::default(),
            };
            proptest::prop_assert_eq!(Mission::from_bytes(&m.to_bytes()), Ok(m));
            let traced = Mission { trace: crate::TraceContext::new_root(), ..m };
            proptest::prop_assert_eq!(Mission::from_bytes(&traced.to_bytes()), Ok(traced));
            let back = Mission { kind: MissionKind::ReturnToBase, ..traced };
            proptest::prop_assert_eq!(Mission::from_bytes(&back.to_bytes()), Ok(back));
        }
    }

    #[test]
    fn names_and_bytes_round_trip() {
        for q in QueueName::ALL {
            assert_eq!(QueueName::from_name(q.name()), Some(q));
            assert_eq!(QueueName::from_byte(q.to_byte()), Ok(q));
        }
        assert!(QueueName::from_byte(0).is_err());
        assert!(KeyRange::ALL.contains(u64::MAX));
        assert!(KeyRange { lo: 5, hi: 10 }.contains(5));
        assert!(!KeyRange { lo: 5, hi: 10 }.contains(10));
    }
}
