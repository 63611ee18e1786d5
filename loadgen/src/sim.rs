//! A simulated drone: flies missions as a straight-line plan over time, emitting one event per
//! tick of the schedule. Pure: the caller passes each event's creation time.

use events::{DeliveryId, DroneEvent, DroneEventKind, DroneId, FlightStatus, GeoPoint};

/// A mission handed to a drone after the scheduler assigned it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mission {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// Where to collect.
    pub pickup: GeoPoint,
    /// Where to drop off.
    pub dropoff: GeoPoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    TakeOff,
    ToPickup,
    ToDropoff,
    Returning,
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    mission: Mission,
    origin: GeoPoint,
    start_us: u64,
    phase: Phase,
    /// Milestone events sent: take-off, pickup, drop-off.
    milestones: u8,
    /// When the package was dropped off, µs.
    dropped_off_us: Option<u64>,
}

impl Flight {
    fn outcome(&self) -> MissionOutcome {
        MissionOutcome {
            delivery_id: self.mission.delivery_id,
            milestones: self.milestones,
            dropped_off_us: self.dropped_off_us,
        }
    }
}

/// A finished (or abandoned) mission and how far it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissionOutcome {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// Milestone events sent: 1 take-off (HeadedToPickup), 2 pickup (InTransit), 3 drop-off
    /// (DeliveryComplete).
    pub milestones: u8,
    /// When the drone dropped the package off (the event's creation time), µs.
    pub dropped_off_us: Option<u64>,
}

/// One simulated drone.
#[derive(Debug, Clone)]
pub struct SimDrone {
    /// Its id.
    pub id: DroneId,
    seq: u64,
    home: GeoPoint,
    position: GeoPoint,
    battery: f32,
    flight: Option<Flight>,
    leg_us: u64,
}

impl SimDrone {
    /// A drone idle at `home`; each leg of a mission takes `leg_us`.
    pub fn new(id: DroneId, home: GeoPoint, leg_us: u64) -> Self {
        Self { id, seq: 0, home, position: home, battery: 100.0, flight: None, leg_us: leg_us.max(1) }
    }

    /// Numbers this drone's events after `seq`. A real drone's sequence numbers keep rising
    /// across its flights; a simulated one started after an earlier run against the same server
    /// must do the same, or the engine drops its events as repeats.
    pub fn starting_after(mut self, seq: u64) -> Self {
        self.seq = seq;
        self
    }

    /// Starts a mission at `now_us`. A drone flying home from its last drop-off takes the new
    /// mission from where it is (the finished one is returned); a drone still carrying out a
    /// delivery refuses it.
    pub fn assign(&mut self, mission: Mission, now_us: u64) -> Result<Option<MissionOutcome>, Mission> {
        let finished = match self.flight {
            None => None,
            Some(f) if f.phase == Phase::Returning => Some(f.outcome()),
            Some(_) => return Err(mission),
        };
        self.flight = Some(Flight {
            mission,
            origin: self.position,
            start_us: now_us,
            phase: Phase::TakeOff,
            milestones: 0,
            dropped_off_us: None,
        });
        Ok(finished)
    }

    /// Moves the mission for `delivery` to new places (a reschedule): before the pickup the
    /// drone heads for the new pickup from where it is; carrying the package (the engine took
    /// the reschedule before it heard of the pickup) it takes the new drop-off. `false`: it is
    /// not flying that delivery, or has dropped the package off.
    pub fn reroute(&mut self, delivery: DeliveryId, pickup: GeoPoint, dropoff: GeoPoint, now_us: u64) -> bool {
        let position = self.position;
        match self.flight.as_mut() {
            Some(f) if f.mission.delivery_id == delivery => match f.phase {
                Phase::TakeOff | Phase::ToPickup => {
                    f.mission.pickup = pickup;
                    f.mission.dropoff = dropoff;
                    if f.phase == Phase::ToPickup {
                        f.origin = position;
                        f.start_us = now_us;
                    }
                    true
                }
                Phase::ToDropoff => {
                    f.mission.dropoff = dropoff;
                    true
                }
                Phase::Returning => false,
            },
            _ => false,
        }
    }

    /// Stops flying `delivery` (it was cancelled) and returns to base from where the drone is;
    /// a package already dropped off is past stopping. `true`: the drone was flying it and
    /// turned back.
    pub fn abort(&mut self, delivery: DeliveryId, now_us: u64) -> bool {
        let position = self.position;
        let leg = self.leg_us;
        match self.flight.as_mut() {
            Some(f)
                if f.mission.delivery_id == delivery
                    && matches!(f.phase, Phase::TakeOff | Phase::ToPickup | Phase::ToDropoff) =>
            {
                // The way home starts here and now: the return leg runs from the "drop-off".
                f.mission.dropoff = position;
                f.phase = Phase::Returning;
                f.start_us = now_us.saturating_sub(2 * leg);
                true
            }
            _ => false,
        }
    }

    /// The delivery being flown, if any (also while returning from it).
    pub fn flying(&self) -> Option<DeliveryId> {
        self.flight.map(|f| f.mission.delivery_id)
    }

    /// Whether a mission is under way.
    pub fn busy(&self) -> bool {
        self.flight.is_some()
    }

    /// The next event, created at `ts_us`; a finished mission is returned beside it.
    pub fn next_event(&mut self, ts_us: u64) -> (DroneEvent, Option<MissionOutcome>) {
        self.seq += 1;
        let mut done = None;
        let (status, kind) = match self.flight.as_mut() {
            None => {
                self.position = self.home;
                self.battery = (self.battery + 0.01).min(100.0);
                (FlightStatus::Idle, DroneEventKind::Position)
            }
            Some(f) => {
                let t = ts_us.saturating_sub(f.start_us);
                let leg = self.leg_us;
                let frac = |from: u64| ((t.saturating_sub(from)) as f64 / leg as f64).min(1.0);
                self.battery = (self.battery - 0.001).max(5.0);
                match f.phase {
                    Phase::TakeOff => {
                        f.phase = Phase::ToPickup;
                        f.milestones = 1;
                        (FlightStatus::Flying, DroneEventKind::StatusChanged { from: FlightStatus::Idle })
                    }
                    Phase::ToPickup if t >= leg => {
                        self.position = f.mission.pickup;
                        f.phase = Phase::ToDropoff;
                        f.milestones = 2;
                        (FlightStatus::Flying, DroneEventKind::PickedUp { delivery: f.mission.delivery_id })
                    }
                    Phase::ToPickup => {
                        self.position = lerp(f.origin, f.mission.pickup, frac(0));
                        (FlightStatus::Flying, DroneEventKind::Position)
                    }
                    Phase::ToDropoff if t >= 2 * leg => {
                        self.position = f.mission.dropoff;
                        f.phase = Phase::Returning;
                        f.milestones = 3;
                        f.dropped_off_us = Some(ts_us);
                        (FlightStatus::Flying, DroneEventKind::DroppedOff { delivery: f.mission.delivery_id })
                    }
                    Phase::ToDropoff => {
                        self.position = lerp(f.mission.pickup, f.mission.dropoff, frac(leg));
                        (FlightStatus::Flying, DroneEventKind::Position)
                    }
                    Phase::Returning if t >= 3 * leg => {
                        self.position = self.home;
                        done = Some(f.outcome());
                        self.flight = None;
                        (FlightStatus::Idle, DroneEventKind::StatusChanged { from: FlightStatus::Flying })
                    }
                    Phase::Returning => {
                        self.position = lerp(f.mission.dropoff, self.home, frac(2 * leg));
                        (FlightStatus::Flying, DroneEventKind::Position)
                    }
                }
            }
        };
        let speed = if status == FlightStatus::Flying { 15.0 } else { 0.0 };
        let ev = DroneEvent {
            drone_id: self.id,
            seq: self.seq,
            ts_us,
            position: self.position,
            speed_mps: speed,
            heading_deg: 0.0,
            battery_pct: self.battery,
            status,
            kind,
        };
        (ev, done)
    }

    /// The mission under way, as far as it got (for the end of a run).
    pub fn outcome_so_far(&self) -> Option<MissionOutcome> {
        self.flight.map(|f| f.outcome())
    }
}

fn lerp(a: GeoPoint, b: GeoPoint, f: f64) -> GeoPoint {
    GeoPoint {
        lat: a.lat + (b.lat - a.lat) * f,
        lon: a.lon + (b.lon - a.lon) * f,
        alt_m: if f > 0.0 && f < 1.0 { 60.0 } else { 0.0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mission_emits_its_milestones_in_order() {
        let home = GeoPoint::new(47.0, -122.0);
        let mut d = SimDrone::new(1, home, 1_000);
        let m = Mission { delivery_id: 9, pickup: GeoPoint::new(47.01, -122.0), dropoff: GeoPoint::new(47.02, -122.0) };
        assert_eq!(d.assign(m, 0), Ok(None));
        assert_eq!(d.assign(m, 0), Err(m), "a drone mid-delivery refuses a second mission");
        let mut kinds = Vec::new();
        let mut outcome = None;
        for ts in (0..5_000).step_by(100) {
            let (ev, done) = d.next_event(ts);
            if ev.kind != DroneEventKind::Position {
                kinds.push((ev.kind, ev.position));
            }
            outcome = outcome.or(done);
        }
        assert_eq!(kinds[0].0, DroneEventKind::StatusChanged { from: FlightStatus::Idle });
        assert_eq!(kinds[1], (DroneEventKind::PickedUp { delivery: 9 }, m.pickup));
        assert_eq!(kinds[2], (DroneEventKind::DroppedOff { delivery: 9 }, m.dropoff));
        assert_eq!(kinds[3].0, DroneEventKind::StatusChanged { from: FlightStatus::Flying });
        assert_eq!(outcome, Some(MissionOutcome { delivery_id: 9, milestones: 3, dropped_off_us: Some(2_000) }));
        assert!(!d.busy());
        assert_eq!(d.next_event(6_000).0.seq, 51, "sequence numbers never repeat");
        // A drone on its way home takes the next mission at once.
        d.assign(m, 7_000).unwrap();
        for ts in (7_000..9_500).step_by(100) {
            d.next_event(ts);
        }
        let next = Mission { delivery_id: 10, ..m };
        assert_eq!(
            d.assign(next, 9_500),
            Ok(Some(MissionOutcome { delivery_id: 9, milestones: 3, dropped_off_us: Some(9_000) }))
        );
    }

    #[test]
    fn a_reroute_before_pickup_changes_the_places_and_a_cancel_turns_the_drone_home() {
        let home = GeoPoint::new(47.0, -122.0);
        let m = Mission { delivery_id: 9, pickup: GeoPoint::new(47.01, -122.0), dropoff: GeoPoint::new(47.02, -122.0) };
        let mut d = SimDrone::new(1, home, 1_000);
        d.assign(m, 0).unwrap();
        d.next_event(0);
        let elsewhere = GeoPoint::new(47.05, -122.0);
        assert!(d.reroute(9, elsewhere, m.dropoff, 100));
        assert!(!d.reroute(8, elsewhere, m.dropoff, 100), "another delivery is not rerouted");
        let (e, _) = d.next_event(1_200);
        assert_eq!(e.kind, DroneEventKind::PickedUp { delivery: 9 });
        assert_eq!(e.position, elsewhere, "the package is collected at the new pickup");
        let moved = GeoPoint::new(47.03, -122.0);
        assert!(d.reroute(9, m.pickup, moved, 1_300), "carrying the package: the new drop-off");

        assert!(d.abort(9, 1_500));
        let mut kinds = Vec::new();
        let mut outcome = None;
        for t in (1_600..4_000).step_by(100) {
            let (e, done) = d.next_event(t);
            kinds.push(e.kind);
            outcome = outcome.or(done);
        }
        assert!(!kinds.iter().any(|k| matches!(k, DroneEventKind::DroppedOff { .. })), "never dropped off: {kinds:?}");
        assert_eq!(outcome, Some(MissionOutcome { delivery_id: 9, milestones: 2, dropped_off_us: None }));
        assert!(!d.busy());
        assert!(!d.abort(9, 5_000), "nothing to abort once home");
    }
}
