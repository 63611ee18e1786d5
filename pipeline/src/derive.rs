//! The derive state machine: drone events and delivery commands in, delivery events out.
//!
//! One [`Deriver`] lives in each shard and owns the state of that shard's drones and of the
//! deliveries they fly. It does no I/O and reads no clock: drone events carry their own time and
//! commands are given `now`, so the same inputs always derive the same events with the same ids,
//! which is what makes replay after a restart safe.
//!
//! The rules, per drone with an assigned delivery:
//! - `Create` command: the delivery is `Created` (event seq 0).
//! - the drone reports `Flying` while the delivery is `Created`/`Rescheduled`: `HeadedToPickup`.
//! - `PickedUp` for that delivery before it is in transit: `InTransit`.
//! - `DroppedOff` for that delivery while in transit, within `dropoff_radius_m` of the drop-off
//!   point: `DeliveryComplete`, and the drone is free again. Within the radius of a drop-off
//!   the delivery had before a reschedule counts too (the drone could not be told in time:
//!   disconnected, or the package was picked up before the new mission reached it; the
//!   event's location says where it landed). Farther away it is not a completion; it is
//!   counted in [`DeriveStats::far_dropoffs`] and the delivery stays in transit.
//! - `Reschedule` before pickup: `Rescheduled`; `Cancel` before completion: `Cancelled`.
//!
//! A drone event whose sequence number is not above the last one applied for that drone is a
//! repeat and is dropped.
//!
//! Drone ids come from the wire, so the drones a deriver tracks are capped
//! ([`Deriver::with_max_drones`]). At the cap, the idle drones (no delivery) that reported
//! longest ago are let go, a sixteenth of the cap at once, so the scan that finds them costs
//! about sixteen entries per new drone. The choice depends on the state alone (ties broken
//! by id), so a deriver restored from a checkpoint lets the same drones go. A drone let go
//! only loses its last position and its repeat filter (batches are deduplicated before they
//! reach the deriver); it is tracked again from its next event. When every tracked drone
//! flies a delivery, none is let go: a new drone's events are not applied
//! ([`Applied::Untracked`]) and a delivery for it is refused (`limit_reached`).

use events::model::{ArchivedDroneEvent, ArchivedDroneEventKind, ArchivedFlightStatus};
use events::{
    DeliveryCommand, DeliveryEvent, DeliveryId, DeliveryStage, DroneId, DroneSnapshot, Error, FlightStatus, GeoPoint,
};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

/// Tuning of the derive rules.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeriveConfig {
    /// How close to the drop-off point a `DroppedOff` must be to count as a completion, metres.
    /// Default 30 m: consumer GNSS is good to about 5 m, and a drop-off pad is a few metres
    /// across, so 30 m accepts every honest drop while refusing a drop in the wrong street.
    pub dropoff_radius_m: f64,
}

impl Default for DeriveConfig {
    fn default() -> Self {
        Self { dropoff_radius_m: 30.0 }
    }
}

/// What became of one drone event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied to the drone's state (it may or may not have derived events).
    Fresh,
    /// Its sequence number was already applied; ignored.
    Duplicate,
    /// A drone not tracked, with no room to track it (every tracked drone is flying); ignored.
    Untracked,
}

/// Counters of what the rules saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeriveStats {
    /// Drone events applied.
    pub applied: u64,
    /// Drone events dropped as repeats.
    pub duplicates: u64,
    /// Delivery events derived.
    pub derived: u64,
    /// `DroppedOff` events too far from the drop-off point.
    pub far_dropoffs: u64,
    /// `PickedUp`/`DroppedOff` naming a delivery the drone is not flying, or out of order.
    pub stray: u64,
    /// Idle drones let go to stay within the cap.
    pub evicted: u64,
    /// Events of new drones not applied: the cap was reached and every tracked drone flying.
    pub untracked: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct DroneState {
    last_seq: Option<u64>,
    position: GeoPoint,
    status: FlightStatus,
    battery_pct: f32,
    updated_us: u64,
    delivery: Option<DeliveryId>,
}

impl DroneState {
    const NEW: Self = Self {
        last_seq: None,
        position: GeoPoint::new(0.0, 0.0),
        status: FlightStatus::Idle,
        battery_pct: 0.0,
        updated_us: 0,
        delivery: None,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct DeliveryState {
    drone: DroneId,
    pickup: GeoPoint,
    dropoff: GeoPoint,
    stage: DeliveryStage,
    next_seq: u32,
}

impl DeliveryState {
    fn emit(
        &mut self,
        id: DeliveryId,
        stage: DeliveryStage,
        ts_us: u64,
        location: GeoPoint,
        out: &mut Vec<DeliveryEvent>,
    ) {
        self.stage = stage;
        out.push(DeliveryEvent { delivery_id: id, seq: self.next_seq, drone_id: self.drone, ts_us, location, stage });
        self.next_seq += 1;
    }
}

/// Everything a [`Deriver`] knows, for checkpoints: restoring it and applying the same later
/// inputs derives the same events as if the deriver had never stopped.
#[derive(Debug, Clone, Default, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DeriverState {
    drones: Vec<(DroneId, DroneState)>,
    deliveries: Vec<(DeliveryId, DeliveryState)>,
    earlier_dropoffs: Vec<(DeliveryId, Vec<GeoPoint>)>,
}

/// [`DeriverState`] as checkpoint version 1 wrote it (before earlier drop-offs were kept), so
/// a node upgraded in place restores its shards' state instead of replaying the whole log.
#[derive(Debug, Clone, Default, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DeriverStateV1 {
    drones: Vec<(DroneId, DroneState)>,
    deliveries: Vec<(DeliveryId, DeliveryState)>,
}

impl From<DeriverStateV1> for DeriverState {
    fn from(v1: DeriverStateV1) -> Self {
        Self { drones: v1.drones, deliveries: v1.deliveries, earlier_dropoffs: Vec::new() }
    }
}

impl DeriverState {
    /// Drones and deliveries held.
    pub fn sizes(&self) -> (usize, usize) {
        (self.drones.len(), self.deliveries.len())
    }
}

/// Drones a deriver tracks at most unless told otherwise.
pub const DEFAULT_MAX_DRONES: usize = 250_000;

/// The per-shard state machine. See the module docs for the rules.
#[derive(Debug)]
pub struct Deriver {
    cfg: DeriveConfig,
    max_drones: usize,
    drones: FxHashMap<DroneId, DroneState>,
    deliveries: FxHashMap<DeliveryId, DeliveryState>,
    /// Drop-offs a delivery in flight had before its reschedules (at most
    /// [`EARLIER_DROPOFFS`]), newest last.
    earlier_dropoffs: FxHashMap<DeliveryId, Vec<GeoPoint>>,
    stats: DeriveStats,
}

/// Earlier drop-offs remembered per delivery: a drone can only have missed so many reschedules.
const EARLIER_DROPOFFS: usize = 4;

impl Deriver {
    /// A deriver with no state.
    pub fn new(cfg: DeriveConfig) -> Self {
        Self::restore(cfg, DeriverState::default())
    }

    /// Tracks at most `max` drones (at least 1); see the module docs.
    pub fn with_max_drones(mut self, max: usize) -> Self {
        self.max_drones = max.max(1);
        self
    }

    /// The most drones it tracks.
    pub fn max_drones(&self) -> usize {
        self.max_drones
    }

    /// Drones tracked now.
    pub fn tracked_drones(&self) -> usize {
        self.drones.len()
    }

    /// Makes room for one more drone by letting go of the idle drones that reported longest
    /// ago; `false` when none is idle.
    fn make_room(&mut self) -> bool {
        let mut idle: Vec<(u64, DroneId)> =
            self.drones.iter().filter(|(_, d)| d.delivery.is_none()).map(|(id, d)| (d.updated_us, *id)).collect();
        if idle.is_empty() {
            return false;
        }
        let n = (self.max_drones / 16).clamp(1, idle.len());
        if n < idle.len() {
            idle.select_nth_unstable(n - 1);
        }
        for (_, id) in &idle[..n] {
            self.drones.remove(id);
        }
        self.stats.evicted += n as u64;
        true
    }

    /// Whether `id` is tracked or can be: `false` only at the cap with every drone flying.
    fn room_for(&mut self, id: DroneId) -> bool {
        self.drones.len() < self.max_drones || self.drones.contains_key(&id) || self.make_room()
    }

    /// Applies one drone event read in place from a batch, appending derived events to `out`.
    pub fn on_drone_event(&mut self, ev: &ArchivedDroneEvent, out: &mut Vec<DeliveryEvent>) -> Applied {
        let seq = ev.seq.to_native();
        let drone_id = ev.drone_id.to_native();
        if !self.room_for(drone_id) {
            self.stats.untracked += 1;
            return Applied::Untracked;
        }
        let drone = self.drones.entry(drone_id).or_insert(DroneState::NEW);
        if drone.last_seq.is_some_and(|last| seq <= last) {
            self.stats.duplicates += 1;
            return Applied::Duplicate;
        }
        let ts_us = ev.ts_us.to_native();
        let position = ev.position.to_point();
        drone.last_seq = Some(seq);
        drone.position = position;
        drone.status = ev.status.to_status();
        drone.battery_pct = ev.battery_pct.to_native();
        drone.updated_us = ts_us;
        self.stats.applied += 1;

        let before = out.len();
        if let Some(id) = drone.delivery {
            if let Some(delivery) = self.deliveries.get_mut(&id) {
                let flying = ev.status == ArchivedFlightStatus::Flying;
                if flying && matches!(delivery.stage, DeliveryStage::Created | DeliveryStage::Rescheduled) {
                    delivery.emit(id, DeliveryStage::HeadedToPickup, ts_us, position, out);
                }
                match &ev.kind {
                    ArchivedDroneEventKind::PickedUp { delivery: d } if d.to_native() == id => {
                        if matches!(
                            delivery.stage,
                            DeliveryStage::Created | DeliveryStage::Rescheduled | DeliveryStage::HeadedToPickup
                        ) {
                            delivery.emit(id, DeliveryStage::InTransit, ts_us, position, out);
                        } else {
                            self.stats.stray += 1;
                        }
                    }
                    ArchivedDroneEventKind::DroppedOff { delivery: d } if d.to_native() == id => {
                        if delivery.stage != DeliveryStage::InTransit {
                            self.stats.stray += 1;
                        } else if std::iter::once(&delivery.dropoff)
                            .chain(self.earlier_dropoffs.get(&id).into_iter().flatten())
                            .any(|at| position.distance_m(at) <= self.cfg.dropoff_radius_m)
                        {
                            delivery.emit(id, DeliveryStage::DeliveryComplete, ts_us, position, out);
                            drone.delivery = None;
                            self.deliveries.remove(&id);
                            self.earlier_dropoffs.remove(&id);
                        } else {
                            self.stats.far_dropoffs += 1;
                        }
                    }
                    ArchivedDroneEventKind::PickedUp { .. } | ArchivedDroneEventKind::DroppedOff { .. } => {
                        self.stats.stray += 1;
                    }
                    _ => {}
                }
            }
        } else if matches!(ev.kind, ArchivedDroneEventKind::PickedUp { .. } | ArchivedDroneEventKind::DroppedOff { .. })
        {
            self.stats.stray += 1;
        }
        self.stats.derived += (out.len() - before) as u64;
        Applied::Fresh
    }

    /// Applies a command from the scheduling edge, appending derived events to `out`.
    ///
    /// `now_us` stands in for a command that carries no time of its own (`ts_us == 0`).
    pub fn on_command(
        &mut self,
        cmd: &DeliveryCommand,
        now_us: u64,
        out: &mut Vec<DeliveryEvent>,
    ) -> Result<(), Error> {
        let before = out.len();
        let result = self.apply_command(cmd, now_us, out);
        self.stats.derived += (out.len() - before) as u64;
        result
    }

    fn apply_command(&mut self, cmd: &DeliveryCommand, now_us: u64, out: &mut Vec<DeliveryEvent>) -> Result<(), Error> {
        let at = |ts: u64| if ts == 0 { now_us } else { ts };
        match *cmd {
            DeliveryCommand::Create { delivery_id, drone_id, pickup, dropoff, ts_us } => {
                if let Some(existing) = self.deliveries.get(&delivery_id) {
                    return if existing.drone == drone_id {
                        Ok(())
                    } else {
                        Err(Error::InvalidTransition {
                            delivery: delivery_id,
                            reason: "already assigned to another drone",
                        })
                    };
                }
                if !self.room_for(drone_id) {
                    self.stats.untracked += 1;
                    return Err(Error::LimitReached {
                        what: "drones tracked by a shard ([engine] max_drones_per_shard), every one flying",
                        limit: self.max_drones as u64,
                    });
                }
                let drone = self.drones.entry(drone_id).or_insert(DroneState::NEW);
                if let Some(busy) = drone.delivery {
                    return Err(Error::DroneBusy { drone: drone_id, delivery: busy });
                }
                drone.delivery = Some(delivery_id);
                let mut state =
                    DeliveryState { drone: drone_id, pickup, dropoff, stage: DeliveryStage::Created, next_seq: 0 };
                state.emit(delivery_id, DeliveryStage::Created, at(ts_us), pickup, out);
                self.deliveries.insert(delivery_id, state);
                Ok(())
            }
            DeliveryCommand::Reschedule { delivery_id, pickup, dropoff, ts_us, .. } => {
                let state = self.deliveries.get_mut(&delivery_id).ok_or(Error::UnknownDelivery(delivery_id))?;
                if !matches!(
                    state.stage,
                    DeliveryStage::Created | DeliveryStage::Rescheduled | DeliveryStage::HeadedToPickup
                ) {
                    return Err(Error::InvalidTransition {
                        delivery: delivery_id,
                        reason: "the package is already picked up",
                    });
                }
                if state.pickup == pickup && state.dropoff == dropoff {
                    // Already there (a reschedule carried forward again after a crash): nothing
                    // changes, so nothing is derived.
                    return Ok(());
                }
                if state.dropoff != dropoff {
                    let earlier = self.earlier_dropoffs.entry(delivery_id).or_default();
                    if earlier.len() == EARLIER_DROPOFFS {
                        earlier.remove(0);
                    }
                    earlier.push(state.dropoff);
                }
                state.pickup = pickup;
                state.dropoff = dropoff;
                state.emit(delivery_id, DeliveryStage::Rescheduled, at(ts_us), pickup, out);
                Ok(())
            }
            DeliveryCommand::Cancel { delivery_id, ts_us, .. } => {
                let mut state = self.deliveries.remove(&delivery_id).ok_or(Error::UnknownDelivery(delivery_id))?;
                self.earlier_dropoffs.remove(&delivery_id);
                let location = self.drones.get(&state.drone).map_or(state.pickup, |d| d.position);
                state.emit(delivery_id, DeliveryStage::Cancelled, at(ts_us), location, out);
                if let Some(drone) = self.drones.get_mut(&state.drone) {
                    drone.delivery = None;
                }
                Ok(())
            }
        }
    }

    /// The current state of a drone of this shard.
    pub fn drone(&self, id: DroneId) -> Option<DroneSnapshot> {
        let d = self.drones.get(&id)?;
        Some(DroneSnapshot {
            drone_id: id,
            position: d.position,
            status: d.status,
            battery_pct: d.battery_pct,
            last_seq: d.last_seq.unwrap_or(0),
            updated_us: d.updated_us,
            delivery: d.delivery,
        })
    }

    /// [`Deriver::drone`] for a drone that has reported at least once: one known only from a
    /// command (assigned before it ever sent an event) has no position or charge to tell, and
    /// the contract answers `None` for it ([`events::FleetControl::drone`]).
    pub fn reported_drone(&self, id: DroneId) -> Option<DroneSnapshot> {
        self.drones.get(&id).filter(|d| d.last_seq.is_some()).and_then(|_| self.drone(id))
    }

    /// The stage of a delivery still in flight on this shard (terminal deliveries are forgotten).
    pub fn delivery_stage(&self, id: DeliveryId) -> Option<DeliveryStage> {
        self.deliveries.get(&id).map(|d| d.stage)
    }

    /// The rules it applies.
    pub fn config(&self) -> DeriveConfig {
        self.cfg
    }

    /// Counters so far.
    pub fn stats(&self) -> DeriveStats {
        self.stats
    }

    /// The state, for a checkpoint (sorted, so equal states give equal bytes).
    pub fn snapshot(&self) -> DeriverState {
        let mut drones: Vec<_> = self.drones.iter().map(|(k, v)| (*k, *v)).collect();
        let mut deliveries: Vec<_> = self.deliveries.iter().map(|(k, v)| (*k, *v)).collect();
        let mut earlier_dropoffs: Vec<_> = self.earlier_dropoffs.iter().map(|(k, v)| (*k, v.clone())).collect();
        drones.sort_unstable_by_key(|(k, _)| *k);
        deliveries.sort_unstable_by_key(|(k, _)| *k);
        earlier_dropoffs.sort_unstable_by_key(|(k, _)| *k);
        DeriverState { drones, deliveries, earlier_dropoffs }
    }

    /// A deriver continuing from a checkpointed state (counters start at zero).
    pub fn restore(cfg: DeriveConfig, state: DeriverState) -> Self {
        Self {
            cfg,
            max_drones: DEFAULT_MAX_DRONES,
            drones: state.drones.into_iter().collect(),
            deliveries: state.deliveries.into_iter().collect(),
            earlier_dropoffs: state.earlier_dropoffs.into_iter().collect(),
            stats: DeriveStats::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use events::wire::{Buffer, TelemetryBatch};
    use events::{BatchMeta, DroneEvent, DroneEventKind};

    use super::*;

    const PICKUP: GeoPoint = GeoPoint::new(47.60, -122.33);
    const DROPOFF: GeoPoint = GeoPoint::new(47.62, -122.35);

    struct Drone {
        id: DroneId,
        seq: u64,
    }

    impl Drone {
        fn event(&mut self, at: GeoPoint, status: FlightStatus, kind: DroneEventKind) -> DroneEvent {
            self.seq += 1;
            DroneEvent {
                drone_id: self.id,
                seq: self.seq,
                ts_us: 1_000 + self.seq,
                position: at,
                speed_mps: 10.0,
                heading_deg: 0.0,
                battery_pct: 90.0,
                status,
                kind,
            }
        }
    }

    /// Feeds events through a real encoded batch, so the machine reads archived events as in
    /// production.
    fn feed(d: &mut Deriver, events: &[DroneEvent]) -> (Vec<DeliveryEvent>, Vec<Applied>) {
        let batch = TelemetryBatch::encode(BatchMeta::default(), events, Buffer::new()).unwrap();
        let mut out = Vec::new();
        let applied = batch.events().iter().map(|ev| d.on_drone_event(ev, &mut out)).collect();
        (out, applied)
    }

    fn create(d: &mut Deriver, delivery_id: DeliveryId, drone_id: DroneId) -> Vec<DeliveryEvent> {
        let mut out = Vec::new();
        d.on_command(
            &DeliveryCommand::Create { delivery_id, drone_id, pickup: PICKUP, dropoff: DROPOFF, ts_us: 0 },
            500,
            &mut out,
        )
        .unwrap();
        out
    }

    fn stages(events: &[DeliveryEvent]) -> Vec<(u32, DeliveryStage)> {
        events.iter().map(|e| (e.seq, e.stage)).collect()
    }

    #[test]
    fn full_flight_derives_every_stage_once() {
        let mut d = Deriver::new(DeriveConfig::default());
        let created = create(&mut d, 10, 1);
        assert_eq!(stages(&created), vec![(0, DeliveryStage::Created)]);
        assert_eq!(created[0].ts_us, 500, "a command without time takes now");
        let mut drone = Drone { id: 1, seq: 0 };
        let flight = [
            drone.event(PICKUP, FlightStatus::Idle, DroneEventKind::Position),
            drone.event(PICKUP, FlightStatus::Flying, DroneEventKind::StatusChanged { from: FlightStatus::Idle }),
            drone.event(PICKUP, FlightStatus::Flying, DroneEventKind::Position),
            drone.event(PICKUP, FlightStatus::Flying, DroneEventKind::PickedUp { delivery: 10 }),
            drone.event(GeoPoint::new(47.61, -122.34), FlightStatus::Flying, DroneEventKind::Position),
            drone.event(
                GeoPoint::new(47.62001, -122.35001),
                FlightStatus::Flying,
                DroneEventKind::DroppedOff { delivery: 10 },
            ),
            drone.event(DROPOFF, FlightStatus::Flying, DroneEventKind::Position),
        ];
        let (out, _) = feed(&mut d, &flight);
        assert_eq!(
            stages(&out),
            vec![
                (1, DeliveryStage::HeadedToPickup),
                (2, DeliveryStage::InTransit),
                (3, DeliveryStage::DeliveryComplete)
            ]
        );
        assert_eq!(out[0].ts_us, flight[1].ts_us, "derived events carry the causing event's time");
        assert_eq!(d.drone(1).unwrap().delivery, None, "the drone is free after completion");
        assert_eq!(d.delivery_stage(10), None);
        assert_eq!(d.stats().derived, 4);
    }

    #[test]
    fn far_away_dropoff_is_not_a_completion() {
        let mut d = Deriver::new(DeriveConfig::default());
        create(&mut d, 10, 1);
        let mut drone = Drone { id: 1, seq: 0 };
        let far = GeoPoint::new(47.70, -122.35); // about 9 km north of the drop-off point
        let (out, _) = feed(
            &mut d,
            &[
                drone.event(PICKUP, FlightStatus::Flying, DroneEventKind::PickedUp { delivery: 10 }),
                drone.event(far, FlightStatus::Flying, DroneEventKind::DroppedOff { delivery: 10 }),
            ],
        );
        assert_eq!(stages(&out), vec![(1, DeliveryStage::HeadedToPickup), (2, DeliveryStage::InTransit)]);
        assert_eq!(d.delivery_stage(10), Some(DeliveryStage::InTransit));
        assert_eq!(d.stats().far_dropoffs, 1);
        assert_eq!(d.drone(1).unwrap().delivery, Some(10), "the drone still carries the package");
        // Just outside the radius is still refused; just inside completes.
        let outside = GeoPoint::new(DROPOFF.lat + 0.00035, DROPOFF.lon); // about 39 m
        let inside = GeoPoint::new(DROPOFF.lat + 0.0002, DROPOFF.lon); // about 22 m
        let (out, _) =
            feed(&mut d, &[drone.event(outside, FlightStatus::Flying, DroneEventKind::DroppedOff { delivery: 10 })]);
        assert!(out.is_empty());
        let (out, _) =
            feed(&mut d, &[drone.event(inside, FlightStatus::Flying, DroneEventKind::DroppedOff { delivery: 10 })]);
        assert_eq!(stages(&out), vec![(3, DeliveryStage::DeliveryComplete)]);
    }

    #[test]
    fn a_drone_that_missed_a_reschedule_completes_at_the_drop_off_it_had() {
        let mut d = Deriver::new(DeriveConfig::default());
        create(&mut d, 10, 1);
        let moved = GeoPoint::new(47.65, -122.35);
        let mut out = Vec::new();
        let resched =
            DeliveryCommand::Reschedule { delivery_id: 10, drone_id: 1, pickup: PICKUP, dropoff: moved, ts_us: 2 };
        d.on_command(&resched, 2, &mut out).unwrap();
        // Kept across a checkpoint.
        let mut d = Deriver::restore(DeriveConfig::default(), d.snapshot());
        let mut drone = Drone { id: 1, seq: 0 };
        let (out, _) = feed(
            &mut d,
            &[
                drone.event(PICKUP, FlightStatus::Flying, DroneEventKind::PickedUp { delivery: 10 }),
                drone.event(DROPOFF, FlightStatus::Flying, DroneEventKind::DroppedOff { delivery: 10 }),
            ],
        );
        let last = out.last().unwrap();
        assert_eq!((last.stage, last.location), (DeliveryStage::DeliveryComplete, DROPOFF), "where it landed");
        assert_eq!(d.snapshot().earlier_dropoffs, Vec::new(), "forgotten with the delivery");
    }

    #[test]
    fn repeated_sequence_numbers_are_dropped() {
        let mut d = Deriver::new(DeriveConfig::default());
        create(&mut d, 10, 1);
        let mut drone = Drone { id: 1, seq: 0 };
        let pick = drone.event(PICKUP, FlightStatus::Flying, DroneEventKind::PickedUp { delivery: 10 });
        let (out, applied) = feed(&mut d, &[pick, pick]);
        assert_eq!(applied, vec![Applied::Fresh, Applied::Duplicate]);
        assert_eq!(out.len(), 2, "HeadedToPickup and InTransit once each");
        let (out, applied) = feed(&mut d, &[pick]);
        assert_eq!(applied, vec![Applied::Duplicate]);
        assert!(out.is_empty());
        assert_eq!(d.stats().duplicates, 2);
    }

    #[test]
    fn commands_are_idempotent_and_checked() {
        let mut d = Deriver::new(DeriveConfig::default());
        assert_eq!(create(&mut d, 10, 1).len(), 1);
        assert!(create(&mut d, 10, 1).is_empty(), "repeating a create derives nothing");
        let mut out = Vec::new();
        let busy = d.on_command(
            &DeliveryCommand::Create { delivery_id: 11, drone_id: 1, pickup: PICKUP, dropoff: DROPOFF, ts_us: 1 },
            1,
            &mut out,
        );
        assert_eq!(busy, Err(Error::DroneBusy { drone: 1, delivery: 10 }));
        let resched =
            DeliveryCommand::Reschedule { delivery_id: 10, drone_id: 1, pickup: DROPOFF, dropoff: PICKUP, ts_us: 7 };
        d.on_command(&resched, 8, &mut out).unwrap();
        assert_eq!(stages(&out), vec![(1, DeliveryStage::Rescheduled)]);
        out.clear();
        d.on_command(&resched, 8, &mut out).unwrap();
        assert!(out.is_empty(), "the same reschedule again (carried forward after a crash) derives nothing");
        d.on_command(&DeliveryCommand::Cancel { delivery_id: 10, drone_id: 1, ts_us: 9 }, 9, &mut out).unwrap();
        assert_eq!(stages(&out), vec![(2, DeliveryStage::Cancelled)]);
        assert_eq!(d.drone(1).unwrap().delivery, None);
        assert_eq!(
            d.on_command(&DeliveryCommand::Cancel { delivery_id: 10, drone_id: 1, ts_us: 9 }, 9, &mut out),
            Err(Error::UnknownDelivery(10))
        );
    }

    #[test]
    fn reschedule_after_pickup_is_refused() {
        let mut d = Deriver::new(DeriveConfig::default());
        create(&mut d, 10, 1);
        let mut drone = Drone { id: 1, seq: 0 };
        feed(&mut d, &[drone.event(PICKUP, FlightStatus::Flying, DroneEventKind::PickedUp { delivery: 10 })]);
        let mut out = Vec::new();
        let r = d.on_command(
            &DeliveryCommand::Reschedule { delivery_id: 10, drone_id: 1, pickup: PICKUP, dropoff: PICKUP, ts_us: 1 },
            1,
            &mut out,
        );
        assert!(matches!(r, Err(Error::InvalidTransition { delivery: 10, .. })));
    }

    #[test]
    fn a_restored_deriver_continues_exactly() {
        let mut drone = Drone { id: 1, seq: 0 };
        let before = [
            drone.event(PICKUP, FlightStatus::Flying, DroneEventKind::Position),
            drone.event(PICKUP, FlightStatus::Flying, DroneEventKind::PickedUp { delivery: 10 }),
        ];
        let after = [
            drone.event(DROPOFF, FlightStatus::Flying, DroneEventKind::DroppedOff { delivery: 10 }),
            drone.event(DROPOFF, FlightStatus::Idle, DroneEventKind::Position),
        ];
        let mut straight = Deriver::new(DeriveConfig::default());
        create(&mut straight, 10, 1);
        feed(&mut straight, &before);
        let snapshot = straight.snapshot();
        let mut restored = Deriver::restore(DeriveConfig::default(), snapshot.clone());
        assert_eq!(restored.snapshot(), snapshot);
        let (a, _) = feed(&mut straight, &after);
        let (b, applied) = feed(&mut restored, &after);
        assert_eq!(a, b);
        assert_eq!(stages(&b), vec![(3, DeliveryStage::DeliveryComplete)]);
        // Replaying what the checkpoint already covers changes nothing.
        let (c, applied_again) = feed(&mut restored, &before);
        assert!(c.is_empty());
        assert_eq!(applied, vec![Applied::Fresh, Applied::Fresh]);
        assert_eq!(applied_again, vec![Applied::Duplicate, Applied::Duplicate]);
    }

    #[test]
    fn stray_pickups_change_nothing() {
        let mut d = Deriver::new(DeriveConfig::default());
        create(&mut d, 10, 1);
        let mut drone = Drone { id: 1, seq: 0 };
        let mut other = Drone { id: 2, seq: 0 };
        let (out, _) = feed(
            &mut d,
            &[
                other.event(PICKUP, FlightStatus::Idle, DroneEventKind::PickedUp { delivery: 10 }),
                drone.event(PICKUP, FlightStatus::Idle, DroneEventKind::DroppedOff { delivery: 10 }),
                drone.event(PICKUP, FlightStatus::Idle, DroneEventKind::PickedUp { delivery: 99 }),
            ],
        );
        assert!(out.is_empty());
        assert_eq!(d.stats().stray, 3);
        assert_eq!(d.delivery_stage(10), Some(DeliveryStage::Created));
    }

    fn report(id: DroneId, seq: u64) -> DroneEvent {
        Drone { id, seq: seq - 1 }.event(PICKUP, FlightStatus::Idle, DroneEventKind::Position)
    }

    #[test]
    fn tracked_drones_stay_under_the_cap_and_flying_ones_are_kept() {
        let mut d = Deriver::new(DeriveConfig::default()).with_max_drones(64);
        create(&mut d, 1, 7);
        let (_, applied) = feed(&mut d, &[report(7, 1)]);
        assert_eq!(applied, [Applied::Fresh]);
        let hostile: Vec<_> = (1_000..5_000).map(|id| report(id, 1)).collect();
        let (_, applied) = feed(&mut d, &hostile);
        assert!(applied.iter().all(|a| *a == Applied::Fresh), "idle drones make room");
        assert!(d.tracked_drones() <= 64, "{} tracked", d.tracked_drones());
        assert!(d.drone(7).is_some_and(|s| s.delivery == Some(1)), "the flying drone is never let go");
        assert!(d.drone(4_999).is_some(), "the newest drone is tracked");
        assert!(d.drone(1_000).is_none(), "the drone idle longest was let go");
        assert!(d.stats().evicted >= 4_000 - 64);
        // A drone let go is tracked again from its next event.
        let (_, applied) = feed(&mut d, &[report(1_000, 2)]);
        assert_eq!(applied, [Applied::Fresh]);
    }

    #[test]
    fn the_drones_let_go_depend_on_the_state_alone() {
        let mut a = Deriver::new(DeriveConfig::default()).with_max_drones(50);
        feed(&mut a, &(0..50).map(|id| report(id, 1 + id % 7)).collect::<Vec<_>>());
        let mut b = Deriver::restore(DeriveConfig::default(), a.snapshot()).with_max_drones(50);
        let more: Vec<_> = (100..140).map(|id| report(id, 1)).collect();
        feed(&mut a, &more);
        feed(&mut b, &more);
        assert_eq!(a.snapshot(), b.snapshot(), "a restored deriver lets the same drones go");
    }

    #[test]
    fn with_every_tracked_drone_flying_a_new_drone_is_refused() {
        let mut d = Deriver::new(DeriveConfig::default()).with_max_drones(2);
        create(&mut d, 1, 1);
        create(&mut d, 2, 2);
        let (out, applied) = feed(&mut d, &[report(3, 1)]);
        assert_eq!((out.len(), applied), (0, vec![Applied::Untracked]));
        let mut out = Vec::new();
        let cmd = DeliveryCommand::Create { delivery_id: 3, drone_id: 3, pickup: PICKUP, dropoff: DROPOFF, ts_us: 0 };
        let err = d.on_command(&cmd, 9, &mut out).unwrap_err();
        assert_eq!((err.name(), out.len()), ("limit_reached", 0));
        assert_eq!(d.stats().untracked, 2);
        assert_eq!(d.tracked_drones(), 2);
    }
}
