//! What the dashboard shows, as a pure state machine: fed telemetry and delivery events with
//! the time they were seen, asked for a [`Snapshot`] once a second. No I/O, no clock.
//!
//! Everything it keeps is bounded: at most `max_drones` drones (a drone silent for
//! [`FORGET_AFTER_US`] gives its place up), at most `max_deliveries` deliveries in flight (a
//! delivery leaves when it completes or is cancelled), a minute of per-second counts and the
//! last [`RECENT`] stage changes. What does not fit is counted, not kept.

use std::collections::{HashMap, VecDeque};

use events::{DeliveryStage, FlightStatus};
use serde::Serialize;

/// A drone heard from within this long is online, µs (10 s).
pub const ONLINE_US: u64 = 10_000_000;
/// A drone silent this long is forgotten, µs (10 min).
pub const FORGET_AFTER_US: u64 = 600_000_000;
/// Stage changes kept for the page's list.
pub const RECENT: usize = 30;
/// Seconds of history kept for the charts.
pub const SECONDS: usize = 60;

/// The board's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Drones tracked at most (about 48 bytes each, with the map's own overhead).
    pub max_drones: usize,
    /// Deliveries in flight tracked at most (about 24 bytes each).
    pub max_deliveries: usize,
    /// Drone positions sent per snapshot at most (the most recently heard).
    pub map_drones: usize,
}

#[derive(Debug, Clone, Copy)]
struct Dot {
    lat: f64,
    lon: f64,
    seen_us: u64,
    battery: f32,
    status: FlightStatus,
}

/// Event age (arrival minus the drone's timestamp) in buckets of about 9 % width.
#[derive(Debug, Clone, Default)]
struct Ages {
    counts: HashMap<u16, u64>,
    n: u64,
}

impl Ages {
    /// Values below 8 have a bucket each; above, eight buckets per power of two.
    fn bucket(age_us: u64) -> u16 {
        if age_us < 8 {
            return age_us as u16;
        }
        let log = 63 - age_us.leading_zeros() as u16;
        log * 8 + ((age_us >> (log - 3)) & 7) as u16
    }

    fn upper_us(bucket: u16) -> u64 {
        if bucket < 24 {
            return u64::from(bucket);
        }
        let (log, frac) = (u32::from(bucket / 8), u64::from(bucket % 8));
        ((8 + frac + 1) << (log - 3)).saturating_sub(1)
    }

    fn add(&mut self, age_us: u64) {
        *self.counts.entry(Self::bucket(age_us)).or_insert(0) += 1;
        self.n += 1;
    }

    fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let mut keys: Vec<_> = self.counts.iter().collect();
        keys.sort_unstable_by_key(|(b, _)| **b);
        let want = ((self.n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, c) in keys {
            seen += c;
            if seen >= want {
                return Some(Self::upper_us(*b) as f64 / 1000.0);
            }
        }
        None
    }
}

/// One second of the charts.
#[derive(Debug, Clone, Default)]
struct Second {
    at_s: u64,
    events: u64,
    ages: Ages,
}

/// The board.
#[derive(Debug)]
pub struct Board {
    limits: Limits,
    drones: HashMap<u64, Dot>,
    drones_untracked: u64,
    in_flight: HashMap<u64, DeliveryStage>,
    deliveries_untracked: u64,
    completed: u64,
    cancelled: u64,
    recent: VecDeque<Change>,
    seconds: VecDeque<Second>,
}

/// A delivery's stage change, for the page's list.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Change {
    /// The delivery.
    pub delivery_id: u64,
    /// Its new stage.
    pub stage: DeliveryStage,
    /// Its drone.
    pub drone_id: u64,
    /// When it happened (the event's time), µs since the epoch.
    pub ts_us: u64,
}

/// A drone on the map: `[id, lat, lon, battery %, online, status]`.
pub type DroneDot = (u64, f64, f64, f32, bool, FlightStatus);

/// One second of the charts: its time (s since the epoch), events seen, and event age p50 /
/// p99 in ms (from the drone's timestamp to the dashboard).
pub type ChartPoint = (u64, u64, Option<f64>, Option<f64>);

/// What the page draws, once a second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// When it was taken, µs since the epoch.
    pub now_us: u64,
    /// Drones heard from in the last 10 s.
    pub drones_online: usize,
    /// Drones tracked (heard from in the last 10 min, up to the bound).
    pub drones_tracked: usize,
    /// Drones not tracked because the bound was reached.
    pub drones_untracked: u64,
    /// Telemetry events in the last whole second.
    pub events_per_s: u64,
    /// Event age in the last whole second, ms: p50 and p99.
    pub age_ms: (Option<f64>, Option<f64>),
    /// Deliveries not yet complete or cancelled.
    pub deliveries_in_flight: usize,
    /// Deliveries in flight by stage (snake_case stage names).
    pub stages: Vec<(DeliveryStage, usize)>,
    /// Deliveries completed since the node started following.
    pub deliveries_completed: u64,
    /// Deliveries cancelled since the node started following.
    pub deliveries_cancelled: u64,
    /// Deliveries not tracked because the bound was reached.
    pub deliveries_untracked: u64,
    /// The latest stage changes, newest first.
    pub recent: Vec<Change>,
    /// The most recently heard drones (at most `map_drones`).
    pub drones: Vec<DroneDot>,
    /// The last minute, oldest first.
    pub chart: Vec<ChartPoint>,
}

impl Board {
    /// An empty board.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            drones: HashMap::new(),
            drones_untracked: 0,
            in_flight: HashMap::new(),
            deliveries_untracked: 0,
            completed: 0,
            cancelled: 0,
            recent: VecDeque::with_capacity(RECENT),
            seconds: VecDeque::with_capacity(SECONDS + 1),
        }
    }

    fn second(&mut self, now_us: u64) -> &mut Second {
        let at_s = now_us / 1_000_000;
        if self.seconds.back().is_none_or(|s| s.at_s < at_s) {
            self.seconds.push_back(Second { at_s, ..Second::default() });
            while self.seconds.len() > SECONDS + 1 {
                self.seconds.pop_front();
            }
        }
        // A clock that stepped back counts into the latest second.
        self.seconds.back_mut().unwrap_or_else(|| unreachable!("pushed above"))
    }

    /// A drone's event, seen at `now_us`.
    #[allow(clippy::too_many_arguments)]
    pub fn drone(&mut self, id: u64, lat: f64, lon: f64, ts_us: u64, battery: f32, status: FlightStatus, now_us: u64) {
        let second = self.second(now_us);
        second.events += 1;
        second.ages.add(now_us.saturating_sub(ts_us));
        let dot = Dot { lat, lon, seen_us: now_us, battery, status };
        let room = self.drones.len() < self.limits.max_drones;
        match self.drones.get_mut(&id) {
            Some(d) => *d = dot,
            None if room => {
                self.drones.insert(id, dot);
            }
            None => self.drones_untracked += 1,
        }
    }

    /// A delivery event.
    pub fn delivery(&mut self, change: Change) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(change);
        let id = change.delivery_id;
        let in_room = self.in_flight.len() < self.limits.max_deliveries;
        match change.stage {
            DeliveryStage::DeliveryComplete => {
                self.completed += 1;
                self.in_flight.remove(&id);
            }
            DeliveryStage::Cancelled => {
                self.cancelled += 1;
                self.in_flight.remove(&id);
            }
            stage => match self.in_flight.get_mut(&id) {
                Some(s) => *s = stage,
                None if in_room => {
                    self.in_flight.insert(id, stage);
                }
                None => self.deliveries_untracked += 1,
            },
        }
    }

    /// What the page shows at `now_us`; drones silent for [`FORGET_AFTER_US`] are forgotten.
    pub fn snapshot(&mut self, now_us: u64) -> Snapshot {
        self.drones.retain(|_, d| now_us.saturating_sub(d.seen_us) < FORGET_AFTER_US);
        let online = |d: &Dot| now_us.saturating_sub(d.seen_us) < ONLINE_US;
        let drones_online = self.drones.values().filter(|d| online(d)).count();
        let mut dots: Vec<(&u64, &Dot)> = self.drones.iter().collect();
        if dots.len() > self.limits.map_drones {
            dots.select_nth_unstable_by(self.limits.map_drones, |a, b| b.1.seen_us.cmp(&a.1.seen_us));
            dots.truncate(self.limits.map_drones);
        }
        dots.sort_unstable_by_key(|(id, _)| **id);
        let drones = dots.into_iter().map(|(id, d)| (*id, d.lat, d.lon, d.battery, online(d), d.status)).collect();
        let mut stages: Vec<(DeliveryStage, usize)> = [
            DeliveryStage::Created,
            DeliveryStage::Rescheduled,
            DeliveryStage::HeadedToPickup,
            DeliveryStage::InTransit,
        ]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
        for stage in self.in_flight.values() {
            if let Some(slot) = stages.iter_mut().find(|(s, _)| s == stage) {
                slot.1 += 1;
            }
        }
        // The current second is still filling: the charts end at the last whole one.
        let now_s = now_us / 1_000_000;
        let mut whole: Vec<&Second> = self.seconds.iter().filter(|s| s.at_s < now_s).collect();
        whole.drain(..whole.len().saturating_sub(SECONDS));
        let chart: Vec<ChartPoint> =
            whole.iter().map(|s| (s.at_s, s.events, s.ages.quantile_ms(0.5), s.ages.quantile_ms(0.99))).collect();
        let last = whole.last().filter(|s| s.at_s + 1 == now_s);
        Snapshot {
            now_us,
            drones_online,
            drones_tracked: self.drones.len(),
            drones_untracked: self.drones_untracked,
            events_per_s: last.map_or(0, |s| s.events),
            age_ms: last.map_or((None, None), |s| (s.ages.quantile_ms(0.5), s.ages.quantile_ms(0.99))),
            deliveries_in_flight: self.in_flight.len(),
            stages,
            deliveries_completed: self.completed,
            deliveries_cancelled: self.cancelled,
            deliveries_untracked: self.deliveries_untracked,
            recent: self.recent.iter().rev().copied().collect(),
            drones,
            chart,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000_000;
    const S: u64 = 1_000_000;

    fn board(max_drones: usize, max_deliveries: usize) -> Board {
        Board::new(Limits { max_drones, max_deliveries, map_drones: 2 })
    }

    fn change(delivery_id: u64, stage: DeliveryStage) -> Change {
        Change { delivery_id, stage, drone_id: 1, ts_us: T0 }
    }

    #[test]
    fn rates_ages_and_online_drones_come_from_whole_seconds() {
        let mut b = board(10, 10);
        for i in 0..100 {
            b.drone(i % 4, 47.6, -122.3, T0 - 5_000, 80.0, FlightStatus::Flying, T0 + i * 1_000);
        }
        // Mid-second: the second is not whole yet.
        assert_eq!(b.snapshot(T0 + S / 2).events_per_s, 0);
        let s = b.snapshot(T0 + S + 1);
        assert_eq!((s.events_per_s, s.drones_online, s.drones_tracked), (100, 4, 4));
        let (p50, p99) = s.age_ms;
        assert!(p50.is_some_and(|ms| (5.0..60.0).contains(&ms)), "{p50:?}");
        assert!(p99.is_some_and(|ms| ms >= p50.unwrap_or_default() && ms < 120.0), "{p99:?}");
        assert_eq!(s.drones.len(), 2, "the map holds the most recently heard, at most map_drones");
        assert_eq!(s.chart.len(), 1);
        // Quiet for 11 s: nobody online, the rate falls to 0, the drones are still known.
        let s = b.snapshot(T0 + 12 * S);
        assert_eq!((s.events_per_s, s.drones_online, s.drones_tracked), (0, 0, 4));
        // After 10 min, forgotten.
        assert_eq!(b.snapshot(T0 + FORGET_AFTER_US + 2 * S).drones_tracked, 0);
    }

    #[test]
    fn deliveries_are_counted_by_stage_until_they_end() {
        let mut b = board(10, 10);
        use DeliveryStage::*;
        for (id, stage) in
            [(1, Created), (2, Created), (3, Created), (1, HeadedToPickup), (1, InTransit), (2, Cancelled)]
        {
            b.delivery(change(id, stage));
        }
        let s = b.snapshot(T0);
        assert_eq!(s.deliveries_in_flight, 2);
        assert_eq!(s.stages, [(Created, 1), (Rescheduled, 0), (HeadedToPickup, 0), (InTransit, 1)]);
        b.delivery(change(1, DeliveryComplete));
        let s = b.snapshot(T0);
        assert_eq!((s.deliveries_in_flight, s.deliveries_completed, s.deliveries_cancelled), (1, 1, 1));
        assert_eq!(s.recent[0], change(1, DeliveryComplete), "newest first");
        assert_eq!(s.recent.len(), 7);
    }

    #[test]
    fn what_does_not_fit_is_counted_not_kept() {
        let mut b = board(3, 2);
        for id in 0..1000 {
            b.drone(id, 1.0, 2.0, T0, 50.0, FlightStatus::Idle, T0);
            b.delivery(change(id, DeliveryStage::Created));
        }
        for _ in 0..(RECENT * 3) {
            b.delivery(change(5, DeliveryStage::InTransit));
        }
        let s = b.snapshot(T0 + S);
        assert_eq!((s.drones_tracked, s.drones_untracked), (3, 997));
        assert_eq!((s.deliveries_in_flight, s.deliveries_untracked), (2, 1000 - 2 + RECENT as u64 * 3));
        assert_eq!(s.recent.len(), RECENT);
        for later in 2..200 {
            b.drone(1, 1.0, 2.0, T0, 50.0, FlightStatus::Idle, T0 + later * S);
        }
        assert!(b.snapshot(T0 + 200 * S).chart.len() <= SECONDS, "a minute of charts");
    }

    #[test]
    fn age_buckets_bound_the_value_within_an_eighth() {
        for v in [1u64, 7, 8, 9, 100, 1_000, 123_456, 10_000_000, u64::MAX / 4] {
            let up = Ages::upper_us(Ages::bucket(v));
            assert!(up >= v && (up - v) as f64 <= v as f64 / 8.0 + 1.0, "{v} → {up}");
        }
    }
}
