//! Domain types shared by every crate: what a drone reports and what a delivery goes through.
//!
//! Drone events arrive on the wire in batches (see [`crate::wire`]) and are read in place as their
//! archived forms (`ArchivedDroneEvent`); the owned types here are what producers build and what
//! tests compare against. Delivery events are derived by the engine and travel on the same wire
//! format with a different payload kind.

use rkyv::{Archive, Deserialize, Serialize};

/// Drone identifier. Unique within a fleet.
pub type DroneId = u64;
/// Delivery identifier, assigned by the scheduler.
pub type DeliveryId = u64;

/// A point on the earth: WGS84 degrees and metres above ground.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[rkyv(derive(Debug))]
pub struct GeoPoint {
    /// Latitude in degrees, -90..=90.
    #[schema(minimum = -90, maximum = 90)]
    pub lat: f64,
    /// Longitude in degrees, -180..=180.
    #[schema(minimum = -180, maximum = 180)]
    pub lon: f64,
    /// Altitude in metres above ground (finite: within what 32 bits hold).
    #[serde(default)]
    #[schema(minimum = -3.4e38, maximum = 3.4e38)]
    pub alt_m: f32,
}

impl GeoPoint {
    /// A point at ground level.
    pub const fn new(lat: f64, lon: f64) -> Self {
        Self { lat, lon, alt_m: 0.0 }
    }

    /// Whether the coordinates are finite and within their ranges.
    pub fn is_valid(&self) -> bool {
        self.lat.is_finite()
            && self.lon.is_finite()
            && self.alt_m.is_finite()
            && (-90.0..=90.0).contains(&self.lat)
            && (-180.0..=180.0).contains(&self.lon)
    }

    /// Ground distance in metres (haversine, altitude ignored).
    pub fn distance_m(&self, other: &GeoPoint) -> f64 {
        haversine_m(self.lat, self.lon, other.lat, other.lon)
    }
}

impl ArchivedGeoPoint {
    /// The owned point, read from the archive without allocating.
    pub fn to_point(&self) -> GeoPoint {
        GeoPoint { lat: self.lat.to_native(), lon: self.lon.to_native(), alt_m: self.alt_m.to_native() }
    }
}

/// Great-circle distance in metres between two WGS84 coordinates.
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    const EARTH_RADIUS_M: f64 = 6_371_008.8;
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * a.sqrt().min(1.0).asin()
}

/// What a drone says it is doing.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[rkyv(derive(Debug, PartialEq, Eq), compare(PartialEq))]
#[serde(rename_all = "snake_case")]
pub enum FlightStatus {
    /// On the ground, ready for a mission.
    Idle,
    /// In the air.
    Flying,
    /// On the ground, charging; not available.
    Charging,
    /// Reporting a fault; not available.
    Fault,
}

impl ArchivedFlightStatus {
    /// The owned status.
    pub fn to_status(&self) -> FlightStatus {
        match self {
            ArchivedFlightStatus::Idle => FlightStatus::Idle,
            ArchivedFlightStatus::Flying => FlightStatus::Flying,
            ArchivedFlightStatus::Charging => FlightStatus::Charging,
            ArchivedFlightStatus::Fault => FlightStatus::Fault,
        }
    }
}

/// Why a drone event was sent.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[rkyv(derive(Debug))]
#[serde(rename_all = "snake_case", tag = "type", from = "KindWire")]
pub enum DroneEventKind {
    /// A periodic position report.
    Position,
    /// The drone picked up the package of this delivery.
    PickedUp {
        /// The delivery whose package was picked up.
        delivery: DeliveryId,
    },
    /// The drone dropped off the package of this delivery, at the event's position.
    DroppedOff {
        /// The delivery whose package was dropped off.
        delivery: DeliveryId,
    },
    /// The drone's flight status changed from `from` to the event's `status`.
    StatusChanged {
        /// The status before the change.
        from: FlightStatus,
    },
}

/// [`DroneEventKind`] as JSON is read: serde refuses unknown fields beside the tag of a struct
/// variant only, so `position` is read as one without fields.
#[derive(serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", deny_unknown_fields)]
enum KindWire {
    Position {},
    PickedUp {
        #[serde(deserialize_with = "crate::json::integer")]
        delivery: DeliveryId,
    },
    DroppedOff {
        #[serde(deserialize_with = "crate::json::integer")]
        delivery: DeliveryId,
    },
    StatusChanged {
        from: FlightStatus,
    },
}

impl From<KindWire> for DroneEventKind {
    fn from(k: KindWire) -> Self {
        match k {
            KindWire::Position {} => Self::Position,
            KindWire::PickedUp { delivery } => Self::PickedUp { delivery },
            KindWire::DroppedOff { delivery } => Self::DroppedOff { delivery },
            KindWire::StatusChanged { from } => Self::StatusChanged { from },
        }
    }
}

/// One telemetry event from one drone.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[rkyv(derive(Debug))]
#[serde(deny_unknown_fields)]
pub struct DroneEvent {
    /// The reporting drone.
    #[serde(deserialize_with = "crate::json::integer")]
    pub drone_id: DroneId,
    /// Per-drone sequence number, strictly increasing; the engine drops repeats.
    #[serde(deserialize_with = "crate::json::integer")]
    pub seq: u64,
    /// When the drone created the event, microseconds since the Unix epoch (before 2100,
    /// [`crate::json::MAX_TS_US`]).
    #[serde(deserialize_with = "crate::json::integer")]
    #[schema(minimum = 0, maximum = 4_102_444_800_000_000_u64)]
    pub ts_us: u64,
    /// Where the drone is.
    pub position: GeoPoint,
    /// Ground speed in metres per second (0 up to [`crate::json::MAX_SPEED_MPS`]).
    #[schema(minimum = 0, maximum = 150)]
    pub speed_mps: f32,
    /// Heading in degrees from north, 0..360.
    #[schema(minimum = 0, exclusive_maximum = 360)]
    pub heading_deg: f32,
    /// Battery charge in percent, 0..=100.
    #[schema(minimum = 0, maximum = 100)]
    pub battery_pct: f32,
    /// Flight status at the time of the event.
    pub status: FlightStatus,
    /// Why the event was sent.
    pub kind: DroneEventKind,
}

/// The stages of a delivery, in the order they normally happen.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[rkyv(derive(Debug, PartialEq, Eq), compare(PartialEq))]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStage {
    /// Scheduled and assigned to a drone.
    Created,
    /// Its time or places changed before pickup.
    Rescheduled,
    /// The assigned drone is flying to the pickup point.
    HeadedToPickup,
    /// The package is on board.
    InTransit,
    /// The package was dropped off at the drop-off point.
    DeliveryComplete,
    /// The customer cancelled it.
    Cancelled,
}

impl DeliveryStage {
    /// Whether no further stage can follow.
    pub const fn is_terminal(self) -> bool {
        matches!(self, DeliveryStage::DeliveryComplete | DeliveryStage::Cancelled)
    }

    /// Its name as the JSON and the API spell it (`headed_to_pickup`), without encoding.
    pub const fn name(self) -> &'static str {
        match self {
            DeliveryStage::Created => "created",
            DeliveryStage::Rescheduled => "rescheduled",
            DeliveryStage::HeadedToPickup => "headed_to_pickup",
            DeliveryStage::InTransit => "in_transit",
            DeliveryStage::DeliveryComplete => "delivery_complete",
            DeliveryStage::Cancelled => "cancelled",
        }
    }
}

#[cfg(test)]
mod stage_names {
    use super::DeliveryStage::*;

    #[test]
    fn stage_names_are_the_json_names() {
        for stage in [Created, Rescheduled, HeadedToPickup, InTransit, DeliveryComplete, Cancelled] {
            assert_eq!(serde_json::to_value(stage).ok(), Some(stage.name().into()), "{stage:?}");
        }
    }
}

impl ArchivedDeliveryStage {
    /// The owned stage.
    pub fn to_stage(&self) -> DeliveryStage {
        match self {
            ArchivedDeliveryStage::Created => DeliveryStage::Created,
            ArchivedDeliveryStage::Rescheduled => DeliveryStage::Rescheduled,
            ArchivedDeliveryStage::HeadedToPickup => DeliveryStage::HeadedToPickup,
            ArchivedDeliveryStage::InTransit => DeliveryStage::InTransit,
            ArchivedDeliveryStage::DeliveryComplete => DeliveryStage::DeliveryComplete,
            ArchivedDeliveryStage::Cancelled => DeliveryStage::Cancelled,
        }
    }
}

/// A change in a delivery's life, derived by the engine.
///
/// `(delivery_id, seq)` identifies the event: the engine derives it deterministically, so a
/// subscriber that sees the same pair twice (after a replay) knows it is a repeat.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[rkyv(derive(Debug))]
pub struct DeliveryEvent {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// Position of this event in the delivery's history, from 0 (Created).
    pub seq: u32,
    /// The drone assigned to the delivery.
    pub drone_id: DroneId,
    /// When the causing fact happened (the drone event's creation time, or the command's time),
    /// microseconds since the Unix epoch.
    pub ts_us: u64,
    /// Where it happened.
    pub location: GeoPoint,
    /// The stage the delivery entered.
    pub stage: DeliveryStage,
}

/// An instruction from the scheduling edge to the engine, routed to the assigned drone's shard.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeliveryCommand {
    /// A new delivery assigned to `drone_id`. Idempotent: repeating it changes nothing.
    Create {
        /// The new delivery.
        delivery_id: DeliveryId,
        /// The drone that will fly it.
        drone_id: DroneId,
        /// Where the package is collected.
        pickup: GeoPoint,
        /// Where the package must be dropped off.
        dropoff: GeoPoint,
        /// When the delivery was scheduled, microseconds since the Unix epoch.
        ts_us: u64,
    },
    /// New places for a delivery that has not been picked up yet.
    Reschedule {
        /// The delivery.
        delivery_id: DeliveryId,
        /// Its drone.
        drone_id: DroneId,
        /// New pickup point.
        pickup: GeoPoint,
        /// New drop-off point.
        dropoff: GeoPoint,
        /// When it was rescheduled.
        ts_us: u64,
    },
    /// The customer cancelled the delivery.
    Cancel {
        /// The delivery.
        delivery_id: DeliveryId,
        /// Its drone.
        drone_id: DroneId,
        /// When it was cancelled.
        ts_us: u64,
    },
}

impl DeliveryCommand {
    /// The drone whose shard must apply the command.
    pub const fn drone_id(&self) -> DroneId {
        match self {
            DeliveryCommand::Create { drone_id, .. }
            | DeliveryCommand::Reschedule { drone_id, .. }
            | DeliveryCommand::Cancel { drone_id, .. } => *drone_id,
        }
    }

    /// The command with `now_us` as its time if it carries none (`ts_us == 0`). The engine
    /// stamps a command before logging it, so a replay derives the same events from it.
    #[must_use]
    pub const fn stamped(mut self, now_us: u64) -> Self {
        let (DeliveryCommand::Create { ts_us, .. }
        | DeliveryCommand::Reschedule { ts_us, .. }
        | DeliveryCommand::Cancel { ts_us, .. }) = &mut self;
        if *ts_us == 0 {
            *ts_us = now_us;
        }
        self
    }
}

/// The engine's latest knowledge of a drone.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DroneSnapshot {
    /// The drone.
    pub drone_id: DroneId,
    /// Last reported position.
    pub position: GeoPoint,
    /// Last reported flight status.
    pub status: FlightStatus,
    /// Last reported battery charge, percent.
    pub battery_pct: f32,
    /// Last processed sequence number.
    pub last_seq: u64,
    /// Creation time of the last processed event, microseconds since the Unix epoch.
    pub updated_us: u64,
    /// The delivery it is flying, if any.
    pub delivery: Option<DeliveryId>,
}
