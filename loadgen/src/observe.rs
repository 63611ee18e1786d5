//! What the subscriber actually received, checked event by event: per-drone sequence numbers for
//! telemetry (the pipeline keeps each drone in order, so anything at or below the last seen is a
//! repeat), `(delivery, seq)` pairs for delivery events, and end-to-end latency from each event's
//! creation time.
//!
//! Creation times are the times the open-loop schedule intended the events to exist, not when
//! the sender got round to them, so a sender or server that falls behind shows up as latency:
//! the histograms are corrected for coordinated omission by construction.

use events::{DeliveryBatch, DeliveryStage, TelemetryBatch};
use hdrhistogram::Histogram;
use rustc_hash::FxHashMap;

use crate::timeline::Slicer;

/// Latency histogram in microseconds, 1 µs to 10 minutes, 3 significant digits (about 170 KB).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// [`histogram`] at 2 significant digits (about 24 KB), for what every fleet connection keeps
/// of its own: at 3 digits ten thousand connections held 1.7 GB of histograms. Merged into a
/// [`histogram`] at the end, its values keep their 1 % precision.
pub fn small_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 2)
        .unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!()))
}

/// Telemetry as received.
#[derive(Debug)]
pub struct TelemetryObserver {
    base: u64,
    last: Vec<u64>,
    /// Events seen for the first time.
    pub unique: u64,
    /// Events seen again.
    pub duplicates: u64,
    /// Events of drones outside this fleet (ignored).
    pub foreign: u64,
    /// Creation-to-arrival latency of events created from `measure_from_us` on.
    pub latency: Histogram<u64>,
    /// Events created before this time (µs since the epoch) are checked but not timed: the
    /// run's warm-up.
    pub measure_from_us: u64,
    /// Every event's latency by when it arrived, for a long run's timeline.
    pub slices: Option<Slicer>,
}

impl TelemetryObserver {
    /// Observes drones `base..base + drones`.
    pub fn new(base: u64, drones: usize) -> Self {
        Self {
            base,
            last: vec![0; drones],
            unique: 0,
            duplicates: 0,
            foreign: 0,
            latency: histogram(),
            measure_from_us: 0,
            slices: None,
        }
    }

    /// Accounts one batch received at `now_us`.
    pub fn observe(&mut self, batch: &TelemetryBatch, now_us: u64) {
        for ev in batch.events().iter() {
            let Some(slot) = ev
                .drone_id
                .to_native()
                .checked_sub(self.base)
                .and_then(|i| self.last.get_mut(usize::try_from(i).ok()?))
            else {
                self.foreign += 1;
                continue;
            };
            let seq = ev.seq.to_native();
            if seq <= *slot {
                self.duplicates += 1;
                continue;
            }
            *slot = seq;
            self.unique += 1;
            let created = ev.ts_us.to_native();
            let latency = now_us.saturating_sub(created).max(1);
            if created >= self.measure_from_us {
                let _ = self.latency.record(latency);
            }
            if let Some(slices) = &mut self.slices {
                slices.record(now_us, latency);
            }
        }
    }
}

/// Delivery events as received.
#[derive(Debug)]
pub struct DeliveryObserver {
    base: u64,
    drones: u64,
    seen: FxHashMap<u64, u64>,
    /// Events seen for the first time.
    pub unique: u64,
    /// Events seen again.
    pub duplicates: u64,
    /// `DeliveryComplete` events.
    pub completed: u64,
    /// Deliveries seen reach a terminal stage, and which (complete or cancelled).
    ended: FxHashMap<u64, DeliveryStage>,
    /// Each delivery's events seen: (seq, creation time µs).
    times: FxHashMap<u64, Vec<(u32, u64)>>,
    /// Creation-to-arrival latency of events derived from drone events (HeadedToPickup,
    /// InTransit, DeliveryComplete), for events created from `measure_from_us` on.
    pub latency: Histogram<u64>,
    /// As [`TelemetryObserver::measure_from_us`].
    pub measure_from_us: u64,
    /// As [`TelemetryObserver::slices`], for drone-derived events.
    pub slices: Option<Slicer>,
}

impl DeliveryObserver {
    /// Observes deliveries flown by drones `base..base + drones`.
    pub fn new(base: u64, drones: usize) -> Self {
        Self {
            base,
            drones: drones as u64,
            seen: FxHashMap::default(),
            unique: 0,
            duplicates: 0,
            completed: 0,
            ended: FxHashMap::default(),
            times: FxHashMap::default(),
            latency: histogram(),
            measure_from_us: 0,
            slices: None,
        }
    }

    /// Accounts one batch received at `now_us`.
    pub fn observe(&mut self, batch: &DeliveryBatch, now_us: u64) {
        for ev in batch.events().iter() {
            let drone = ev.drone_id.to_native();
            if drone < self.base || drone - self.base >= self.drones {
                continue;
            }
            let seq = ev.seq.to_native();
            let mask = self.seen.entry(ev.delivery_id.to_native()).or_default();
            let bit = 1u64 << seq.min(63);
            if *mask & bit != 0 {
                self.duplicates += 1;
                continue;
            }
            *mask |= bit;
            self.unique += 1;
            self.times.entry(ev.delivery_id.to_native()).or_default().push((seq, ev.ts_us.to_native()));
            let stage = ev.stage.to_stage();
            if stage == DeliveryStage::DeliveryComplete {
                self.completed += 1;
            }
            if stage.is_terminal() {
                self.ended.insert(ev.delivery_id.to_native(), stage);
            }
            if matches!(
                stage,
                DeliveryStage::HeadedToPickup | DeliveryStage::InTransit | DeliveryStage::DeliveryComplete
            ) {
                let latency = now_us.saturating_sub(ev.ts_us.to_native()).max(1);
                if ev.ts_us.to_native() >= self.measure_from_us {
                    let _ = self.latency.record(latency);
                }
                if let Some(slices) = &mut self.slices {
                    slices.record(now_us, latency);
                }
            }
        }
    }

    /// Whether a delivery was seen complete or cancelled.
    pub fn finished(&self, delivery: u64) -> bool {
        self.ended.contains_key(&delivery)
    }

    /// The events seen of a delivery: (seq, creation time µs).
    pub fn events_seen(&self, delivery: u64) -> &[(u32, u64)] {
        self.times.get(&delivery).map_or(&[], Vec::as_slice)
    }

    /// The terminal stage a delivery was seen reach, if any.
    pub fn ended(&self, delivery: u64) -> Option<DeliveryStage> {
        self.ended.get(&delivery).copied()
    }

    /// Distinct events seen for one delivery.
    pub fn events_of(&self, delivery: u64) -> u32 {
        self.seen.get(&delivery).map_or(0, |m| m.count_ones())
    }
}

#[cfg(test)]
mod tests {
    use events::wire::Buffer;
    use events::{BatchMeta, DeliveryEvent, DroneEvent, DroneEventKind, FlightStatus, GeoPoint};

    use super::*;

    fn telemetry(pairs: &[(u64, u64)]) -> TelemetryBatch {
        let evs: Vec<_> = pairs
            .iter()
            .map(|&(drone_id, seq)| DroneEvent {
                drone_id,
                seq,
                ts_us: 100,
                position: GeoPoint::default(),
                speed_mps: 0.0,
                heading_deg: 0.0,
                battery_pct: 1.0,
                status: FlightStatus::Idle,
                kind: DroneEventKind::Position,
            })
            .collect();
        TelemetryBatch::encode(BatchMeta::default(), &evs, Buffer::new()).unwrap()
    }

    #[test]
    fn repeats_and_foreign_drones_are_told_apart() {
        let mut o = TelemetryObserver::new(10, 2);
        o.observe(&telemetry(&[(10, 1), (11, 1), (10, 2), (10, 2), (10, 1), (99, 1)]), 150);
        assert_eq!((o.unique, o.duplicates, o.foreign), (3, 2, 1));
        assert_eq!(o.latency.len(), 3);
        assert_eq!(o.latency.max(), 50);
    }

    #[test]
    fn warm_up_events_are_checked_but_not_timed() {
        let mut o = TelemetryObserver::new(10, 1);
        o.measure_from_us = 101;
        o.observe(&telemetry(&[(10, 1), (10, 1)]), 150);
        assert_eq!((o.unique, o.duplicates), (1, 1));
        assert_eq!(o.latency.len(), 0, "created at 100, before the warm-up ended");
        o.measure_from_us = 100;
        o.observe(&telemetry(&[(10, 2)]), 150);
        assert_eq!(o.latency.len(), 1);
    }

    #[test]
    fn delivery_events_are_counted_once() {
        let ev = |seq, stage| DeliveryEvent {
            delivery_id: 5,
            seq,
            drone_id: 10,
            ts_us: 10,
            location: GeoPoint::default(),
            stage,
        };
        let batch = DeliveryBatch::encode(
            BatchMeta::default(),
            &[
                ev(0, DeliveryStage::Created),
                ev(3, DeliveryStage::DeliveryComplete),
                ev(3, DeliveryStage::DeliveryComplete),
            ],
            Buffer::new(),
        )
        .unwrap();
        let mut o = DeliveryObserver::new(10, 1);
        o.observe(&batch, 20);
        assert_eq!((o.unique, o.duplicates, o.completed), (2, 1, 1));
        assert_eq!(o.events_of(5), 2);
        assert_eq!(o.latency.len(), 1, "Created is not a drone-derived event");
    }
}
