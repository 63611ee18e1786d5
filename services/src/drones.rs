//! Drone Management: the fleet registry, and assignment of a free drone near the pickup with
//! enough battery.
//!
//! The core is [`Registry`], a pure state machine (time passed in): drones are registered,
//! placed (position, battery and when it was last heard from), assigned to a delivery and
//! released. Free drones with a known position sit in a grid of cells, so finding the nearest
//! one looks at the cells around the pickup ring by ring instead of at every drone.
//!
//! **Who may be assigned.** Only a drone that is free, whose position and battery are known,
//! whose battery is at least `min_battery_pct`, that is within `max_distance_km` of the pickup,
//! and that was heard from within `liveness_s` (by the creation time of its last event). A drone
//! that never reported is never assigned: an unknown position does not bypass the distance
//! limit, nor an unknown charge the battery limit. Assignment is idempotent per delivery:
//! asking again for the same delivery returns the same drone.
//!
//! [`DroneManagement`] drives it: positions and battery come from the engine's live state when
//! a drone registers, when it finishes a delivery, and for the chosen candidate at every
//! assignment (so a drone that went quiet or drained since it was placed is passed over and
//! moved where it now is). Drones registered before they ever reported are looked up again by
//! [`DroneManagement::sweep`] until they do.
//!
//! **Durability.** With a store, every registration and every change of assignment is written
//! before it is answered (one record per drone: `{"delivery": id | null}`), in the order the
//! registry made them, so a restart knows every drone and which delivery it flies. Positions are
//! not stored: they come back from the engine.
//!
//! | method | path | what |
//! |---|---|---|
//! | POST | `/v1/drones` | register drones `{"drones": [ids]}` |
//! | PUT | `/v1/drones/{id}` | register one drone |
//! | GET | `/v1/drones/{id}` | the engine's live state of a drone and its assignment |
//! | PUT | `/internal/v1/assignments/{delivery}` | `{pickup}`: assign a drone (the same one again on a retry); `409` when none is free |
//! | GET | `/internal/v1/assignments/{delivery}` | the assigned drone |
//! | DELETE | `/internal/v1/assignments/{delivery}` | release it (`204`, also when none) |

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use events::{DeliveryBatch, DeliveryId, DroneId, FleetControl, GeoPoint};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::api::{ApiJson, parse_id};
use crate::store::{Batch, Store};

/// Assignment settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DronesConfig {
    /// Least battery charge (percent) a drone needs to be given a delivery. Default 30.
    pub min_battery_pct: f32,
    /// How far from the pickup a placed drone may be, km. Default 200.
    pub max_distance_km: f64,
    /// A drone is assignable only if its last event was created at most this many seconds ago.
    /// Default 30: a flying drone reports several times a second, a parked one at least every
    /// few seconds; one silent for half a minute is off, out of range, or gone.
    pub liveness_s: f64,
}

impl Default for DronesConfig {
    fn default() -> Self {
        Self { min_battery_pct: 30.0, max_distance_km: 200.0, liveness_s: 30.0 }
    }
}

impl DronesConfig {
    fn live(&self, heard_us: Option<u64>, now_us: u64) -> bool {
        heard_us.is_some_and(|h| now_us.saturating_sub(h) as f64 <= self.liveness_s * 1e6)
    }
}

/// Grid cell size in degrees (about 550 m of latitude): a dense urban fleet (10,000 drones
/// within 10 km) puts a few dozen drones in a cell, so a search looks at a few hundred; a sparse
/// one falls back to scanning its occupied cells (see [`Registry::nearest`]).
const CELL_DEG: f64 = 0.005;
const KM_PER_DEG: f64 = 111.2;

type Cell = (i32, i32);

fn cell_of(p: GeoPoint) -> Cell {
    ((p.lat / CELL_DEG).floor() as i32, (p.lon / CELL_DEG).floor() as i32)
}

/// Approximate ground distance in km (equirectangular; fine for ranking nearby drones).
pub fn distance_km(a: GeoPoint, b: GeoPoint) -> f64 {
    let (lat1, lat2) = (a.lat, b.lat);
    let mid = ((lat1 + lat2) / 2.0).to_radians();
    let dx = (b.lon - a.lon) * mid.cos();
    let dy = lat2 - lat1;
    (dx * dx + dy * dy).sqrt() * KM_PER_DEG
}

/// What the registry knows of one drone.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DroneState {
    /// The delivery it flies.
    pub delivery: Option<DeliveryId>,
    /// Last known position.
    pub position: Option<GeoPoint>,
    /// Last known battery charge, percent.
    pub battery_pct: Option<f32>,
    /// Creation time of its last event the registry knows of, µs since the epoch.
    pub heard_us: Option<u64>,
}

/// Why no drone was assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoDrone {
    /// Every drone is busy.
    AllBusy,
    /// Free drones exist but none in range with enough battery.
    NoneSuitable,
}

/// A drone in the grid, with what the search needs of it kept beside its id (no lookup per
/// drone considered).
#[derive(Debug, Clone, Copy)]
struct Listed {
    id: DroneId,
    position: GeoPoint,
    battery_pct: Option<f32>,
}

/// The fleet registry (pure: time passed in, no I/O).
///
/// A free drone is listed in one of two places: the grid, when its position is known and it
/// was live when last looked at; or the unplaced set otherwise (never reported, or gone
/// quiet), which [`Registry::unplaced`] hands out in turns to be looked at again.
#[derive(Debug, Default)]
pub struct Registry {
    drones: FxHashMap<DroneId, DroneState>,
    /// Free drones listed in the grid (the rest of the free ones are in `unplaced`).
    in_grid: rustc_hash::FxHashSet<DroneId>,
    assignments: FxHashMap<DeliveryId, DroneId>,
    /// Free drones with a known position, live when last looked at, by cell.
    cells: FxHashMap<Cell, Vec<Listed>>,
    /// Free drones of unknown position or gone quiet.
    unplaced: rustc_hash::FxHashSet<DroneId>,
    /// Where the next [`Registry::unplaced`] turn starts.
    sweep_cursor: usize,
    free: usize,
}

impl Registry {
    /// Registers a drone as free (a known drone is left as it is). `true`: it is new.
    pub fn register(&mut self, id: DroneId) -> bool {
        if self.drones.contains_key(&id) {
            return false;
        }
        self.drones.insert(id, DroneState { delivery: None, position: None, battery_pct: None, heard_us: None });
        self.list(id, false);
        true
    }

    /// Restores a drone as stored: registered, flying `delivery` or free, position unknown.
    pub fn restore(&mut self, id: DroneId, delivery: Option<DeliveryId>) {
        self.register(id);
        if let Some(delivery) = delivery {
            self.assign_to(delivery, id);
        }
    }

    /// Records where a drone is, its battery and when it was heard from (unknown drones are
    /// ignored; `None` keeps what was known). A free drone is listed for assignment only while
    /// live at `now_us`.
    pub fn place(
        &mut self,
        id: DroneId,
        position: Option<GeoPoint>,
        battery_pct: Option<f32>,
        heard_us: Option<u64>,
        cfg: &DronesConfig,
        now_us: u64,
    ) {
        let Some(state) = self.drones.get(&id).copied() else { return };
        let free = state.delivery.is_none();
        if free {
            self.unlist(id);
        }
        let state = DroneState {
            delivery: state.delivery,
            position: position.or(state.position),
            battery_pct: battery_pct.or(state.battery_pct),
            heard_us: heard_us.max(state.heard_us),
        };
        self.drones.insert(id, state);
        if free {
            self.list(id, cfg.live(state.heard_us, now_us));
        }
    }

    /// The next turn of up to `max` free drones not listed in the grid (never reported, or
    /// gone quiet), to be looked at again; successive calls go round all of them.
    pub fn unplaced(&mut self, max: usize) -> Vec<DroneId> {
        if self.sweep_cursor >= self.unplaced.len() {
            self.sweep_cursor = 0;
        }
        let turn: Vec<DroneId> = self.unplaced.iter().skip(self.sweep_cursor).take(max).copied().collect();
        self.sweep_cursor += turn.len();
        turn
    }

    /// A drone's state.
    pub fn get(&self, id: DroneId) -> Option<DroneState> {
        self.drones.get(&id).copied()
    }

    /// The drone assigned to a delivery.
    pub fn assigned(&self, delivery: DeliveryId) -> Option<DroneId> {
        self.assignments.get(&delivery).copied()
    }

    /// Registered drones and how many are free.
    pub fn size(&self) -> (usize, usize) {
        (self.drones.len(), self.free)
    }

    /// The nearest free drone in the grid with enough battery within `max_distance_km` of the
    /// pickup. Liveness is the caller's to check against fresh state ([`Registry::suitable`]):
    /// the grid holds drones that were live when last looked at.
    pub fn candidate(&self, pickup: GeoPoint, cfg: &DronesConfig) -> Result<DroneId, NoDrone> {
        if self.free == 0 {
            return Err(NoDrone::AllBusy);
        }
        self.nearest(pickup, cfg).ok_or(NoDrone::NoneSuitable)
    }

    /// Whether `id` is free and suitable for `pickup` at `now_us`, liveness included.
    pub fn suitable(&self, id: DroneId, pickup: GeoPoint, cfg: &DronesConfig, now_us: u64) -> bool {
        self.drones.get(&id).is_some_and(|s| {
            s.delivery.is_none()
                && cfg.live(s.heard_us, now_us)
                && in_reach(s.position, s.battery_pct, pickup, cfg).is_some()
        })
    }

    /// Takes a free drone out of the grid (it was found gone quiet): it waits among the
    /// unplaced until it is heard from again.
    pub fn park(&mut self, id: DroneId) {
        if self.in_grid.contains(&id) {
            self.unlist(id);
            self.list(id, false);
        }
    }

    /// [`Registry::park`] if the drone has not been heard from within the liveness window.
    pub fn park_if_silent(&mut self, id: DroneId, cfg: &DronesConfig, now_us: u64) {
        if self.drones.get(&id).is_some_and(|s| !cfg.live(s.heard_us, now_us)) {
            self.park(id);
        }
    }

    /// Gives `drone` (free) to `delivery`; false if it is not free.
    pub fn assign_to(&mut self, delivery: DeliveryId, drone: DroneId) -> bool {
        let Some(state) = self.drones.get(&drone).copied() else { return false };
        if state.delivery.is_some() {
            return false;
        }
        self.unlist(drone);
        self.drones.insert(drone, DroneState { delivery: Some(delivery), ..state });
        self.assignments.insert(delivery, drone);
        true
    }

    /// Assigns the nearest suitable free drone to `delivery` (the same drone again if it already
    /// has one), parking candidates found gone quiet at `now_us`. This is
    /// [`DroneManagement::assign`] without the look at the engine's fresh state.
    pub fn assign(
        &mut self,
        delivery: DeliveryId,
        pickup: GeoPoint,
        cfg: &DronesConfig,
        now_us: u64,
    ) -> Result<DroneId, NoDrone> {
        if let Some(&drone) = self.assignments.get(&delivery) {
            return Ok(drone);
        }
        loop {
            let drone = self.candidate(pickup, cfg)?;
            if self.suitable(drone, pickup, cfg, now_us) {
                self.assign_to(delivery, drone);
                return Ok(drone);
            }
            self.park(drone);
        }
    }

    /// Ends `delivery`'s assignment; its drone is free again, at `at` if given. Returns the
    /// drone, `None` if the delivery had none.
    pub fn release(&mut self, delivery: DeliveryId, at: Option<GeoPoint>) -> Option<DroneId> {
        let drone = self.assignments.remove(&delivery)?;
        let state = self.drones.get_mut(&drone)?;
        state.delivery = None;
        state.position = at.or(state.position);
        // It just flew: listed by its position until the next look says otherwise.
        self.list(drone, true);
        Some(drone)
    }

    /// Lists a free drone: in the grid when `live` and its position is known, else unplaced.
    fn list(&mut self, id: DroneId, live: bool) {
        let Some(state) = self.drones.get(&id) else { return };
        match (live, state.position) {
            (true, Some(position)) => {
                let listed = Listed { id, position, battery_pct: state.battery_pct };
                self.cells.entry(cell_of(position)).or_default().push(listed);
                self.in_grid.insert(id);
            }
            _ => {
                self.unplaced.insert(id);
            }
        }
        self.free += 1;
    }

    /// Takes a free drone off whichever list holds it (before its position changes).
    fn unlist(&mut self, id: DroneId) {
        let removed = if self.in_grid.remove(&id) {
            let position = self.drones.get(&id).and_then(|s| s.position);
            let cell = position.map(cell_of);
            match cell.and_then(|c| self.cells.get_mut(&c).map(|l| (c, l))) {
                Some((cell, list)) => match list.iter().position(|d| d.id == id) {
                    Some(i) => {
                        list.swap_remove(i);
                        if list.is_empty() {
                            self.cells.remove(&cell);
                        }
                        true
                    }
                    None => false,
                },
                None => false,
            }
        } else {
            self.unplaced.remove(&id)
        };
        if removed {
            self.free -= 1;
        }
    }

    /// The nearest placed free drone with enough battery within `max_distance_km`: rings of
    /// cells around the pickup, one ring past the first hit (a drone in the next ring may still
    /// be nearer than one in a corner of this one).
    fn nearest(&self, pickup: GeoPoint, cfg: &DronesConfig) -> Option<DroneId> {
        if self.cells.is_empty() {
            return None;
        }
        let (ci, cj) = cell_of(pickup);
        let max_ring = (cfg.max_distance_km / (CELL_DEG * KM_PER_DEG * 0.5)).ceil().min(4000.0) as i32;
        let mut best: Option<(f64, DroneId)> = None;
        let consider = |best: &mut Option<(f64, DroneId)>, listed: &Listed| {
            let Some(d) = in_reach(Some(listed.position), listed.battery_pct, pickup, cfg) else { return };
            let id = listed.id;
            if best.is_none_or(|(bd, bid)| d < bd || (d == bd && id < bid)) {
                *best = Some((d, id));
            }
        };
        // How far the pickup is from the nearest edge of its own cell, in degrees: every point
        // of ring r is at least (r - 1) cells plus this much away on one axis.
        let (lat_off, lon_off) = (pickup.lat / CELL_DEG - f64::from(ci), pickup.lon / CELL_DEG - f64::from(cj));
        let edge_deg = lat_off.min(1.0 - lat_off).min(lon_off).min(1.0 - lon_off).max(0.0) * CELL_DEG;
        let mut visited = 0usize;
        for ring in 0..=max_ring {
            // A degree of longitude shrinks by cos(latitude), taken at the ring's far edge (a
            // degree of latitude does not: the bound stays a lower one on either axis).
            if let Some((best_d, _)) = best
                && ring > 0
            {
                let far_lat = (pickup.lat.abs() + f64::from(ring) * CELL_DEG).min(89.0);
                let floor = (f64::from(ring - 1) * CELL_DEG + edge_deg) * KM_PER_DEG * far_lat.to_radians().cos();
                if floor > best_d {
                    break;
                }
            }
            // Walking (mostly empty) rings past as many cells as are occupied costs more than
            // looking at every occupied cell once: a sparse fleet, or a pickup far from it.
            visited += if ring == 0 { 1 } else { 8 * ring as usize };
            if visited > self.cells.len() {
                best = None;
                for listed in self.cells.values().flatten() {
                    consider(&mut best, listed);
                }
                break;
            }
            for (i, j) in ring_cells(ci, cj, ring) {
                for listed in self.cells.get(&(i, j)).into_iter().flatten() {
                    consider(&mut best, listed);
                }
            }
        }
        best.map(|(_, id)| id)
    }
}

/// The drone's distance to the pickup if it can fly it: position and battery known, charged
/// enough, and in range (liveness is checked apart, against fresh state).
fn in_reach(position: Option<GeoPoint>, battery_pct: Option<f32>, pickup: GeoPoint, cfg: &DronesConfig) -> Option<f64> {
    let position = position?;
    if !battery_pct.is_some_and(|b| b >= cfg.min_battery_pct) {
        return None;
    }
    let d = distance_km(pickup, position);
    (d <= cfg.max_distance_km).then_some(d)
}

/// The cells at Chebyshev distance `ring` from `(ci, cj)`.
fn ring_cells(ci: i32, cj: i32, ring: i32) -> impl Iterator<Item = Cell> {
    let r = ring;
    (-r..=r).flat_map(move |di| {
        let edge = di == -r || di == r;
        let djs: Vec<i32> = if edge {
            (-r..=r).collect()
        } else if r == 0 {
            vec![0]
        } else {
            vec![-r, r]
        };
        djs.into_iter().map(move |dj| (ci + di, cj + dj))
    })
}

/// The Drone Management service.
#[derive(Debug)]
pub struct DroneManagement<F> {
    fleet: F,
    registry: Mutex<Registry>,
    cfg: DronesConfig,
    /// Where registrations (and, [`Assignments::Stored`], assignments) are kept (`None`: in
    /// memory only, for tests).
    store: Option<Store>,
    assignments: Assignments,
    /// Where each assignment is recorded as a `drones.assign` span of its delivery.
    spans: std::sync::OnceLock<crate::spans::Spans>,
}

/// Where a restarted Drone Management learns which drone flies which delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignments {
    /// From its own store: every assignment and release is written before it is answered
    /// (Drone Management in a process of its own).
    Stored,
    /// From the Delivery records beside it (one process): a delivery not yet complete or
    /// cancelled holds its drone. The records are stored with the saga and with the read
    /// model's position, so nothing more is written per assignment.
    FromRecords,
}

/// What the store keeps of a drone.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct StoredDrone {
    delivery: Option<DeliveryId>,
}

/// Drones to register.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterDrones {
    /// Their ids (each at most 2^63 - 1), at most 100,000 at once.
    #[schema(max_items = 100_000)]
    #[serde(deserialize_with = "crate::api::integer_ids")]
    pub drones: Vec<u64>,
}

/// An assignment request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignRequest {
    /// Where the drone must go first.
    pub pickup: GeoPoint,
}

/// An assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// Its drone.
    pub drone_id: DroneId,
}

/// Candidates an assignment looks up in the engine before it gives up.
const ASSIGN_TRIES: usize = 8;
/// Drones of unknown position looked up again per sweep.
const SWEEP_MAX: usize = 4_096;
/// Unplaced drones an assignment looks up itself when no listed drone fits.
const UNPLACED_PER_ASSIGN: usize = 64;

impl<F: FleetControl> DroneManagement<F> {
    /// The service, reading drones' live state from `fleet`, keeping nothing across restarts.
    pub fn new(fleet: F, cfg: DronesConfig) -> Arc<Self> {
        Arc::new(Self {
            fleet,
            registry: Mutex::default(),
            cfg,
            store: None,
            assignments: Assignments::Stored,
            spans: std::sync::OnceLock::new(),
        })
    }

    /// The service with its registry and assignments in `store`, loaded from what it holds.
    pub fn open(fleet: F, cfg: DronesConfig, store: Store) -> Result<Arc<Self>, Error> {
        Self::open_with(fleet, cfg, store, Assignments::Stored, std::iter::empty())
    }

    /// The service with its registrations in `store` and its assignments taken from the
    /// Delivery records beside it: `(drone, delivery)` for each delivery not yet finished.
    pub fn open_beside_records(
        fleet: F,
        cfg: DronesConfig,
        store: Store,
        in_flight: impl IntoIterator<Item = (DroneId, DeliveryId)>,
    ) -> Result<Arc<Self>, Error> {
        Self::open_with(fleet, cfg, store, Assignments::FromRecords, in_flight)
    }

    fn open_with(
        fleet: F,
        cfg: DronesConfig,
        store: Store,
        assignments: Assignments,
        in_flight: impl IntoIterator<Item = (DroneId, DeliveryId)>,
    ) -> Result<Arc<Self>, Error> {
        let mut registry = Registry::default();
        for (key, drone) in store.all::<StoredDrone>()? {
            if let Ok(id) = key.parse::<DroneId>() {
                registry.restore(id, drone.delivery.filter(|_| assignments == Assignments::Stored));
            }
        }
        for (drone, delivery) in in_flight {
            registry.restore(drone, Some(delivery));
        }
        Ok(Arc::new(Self {
            fleet,
            registry: Mutex::new(registry),
            cfg,
            store: Some(store),
            assignments,
            spans: std::sync::OnceLock::new(),
        }))
    }

    /// [`Self::queue_writes`] for a change of assignment: nothing when assignments are taken
    /// from the Delivery records.
    fn queue_assignment_writes(
        &self,
        reg: &Registry,
        drones: &[DroneId],
    ) -> Option<impl std::future::Future<Output = Result<Vec<bool>, Error>> + Send + 'static + use<F>> {
        if self.assignments == Assignments::FromRecords {
            return None;
        }
        self.queue_writes(reg, drones)
    }

    /// Queues the store writes of `drones`' current registry state (called under the registry
    /// lock, so writes land in the order the registry changed).
    fn queue_writes(
        &self,
        reg: &Registry,
        drones: &[DroneId],
    ) -> Option<impl std::future::Future<Output = Result<Vec<bool>, Error>> + Send + 'static + use<F>> {
        let store = self.store.as_ref()?;
        if drones.is_empty() {
            return None;
        }
        let mut batch = Batch::new();
        for &id in drones {
            let delivery = reg.get(id).and_then(|s| s.delivery);
            if let Err(error) = batch.put(store, &crate::store::id_key(id), &StoredDrone { delivery }) {
                return Some(futures_util::future::Either::Left(std::future::ready(Err(error))));
            }
        }
        Some(futures_util::future::Either::Right(store.enqueue(batch)))
    }

    /// Registers drones, durably; each new one is placed from the engine's live state when it
    /// has one. Returns how many were new.
    pub async fn register(&self, ids: &[DroneId]) -> Result<usize, Error> {
        let (fresh, stored) = {
            let mut reg = self.registry.lock();
            let fresh: Vec<DroneId> = ids.iter().copied().filter(|&id| reg.register(id)).collect();
            let stored = self.queue_writes(&reg, &fresh);
            (fresh, stored)
        };
        if let Some(stored) = stored {
            stored.await?;
        }
        self.refresh_all(&fresh).await;
        Ok(fresh.len())
    }

    /// Re-reads a drone's position, battery and last event time from the engine (`at` wins for
    /// the position). A drone that never reported keeps what the registry knew.
    ///
    /// The engine also says which delivery a drone flies. One the registry holds free while the
    /// engine has it on a delivery (a schedule cut short by a crash after the engine took its
    /// create, before the delivery record was stored) is held for that delivery, not offered
    /// again: every order for it would be refused with `drone_busy`. Its delivery's end frees it.
    async fn refresh(&self, id: DroneId, at: Option<GeoPoint>) {
        match self.fleet.drone(id).await {
            Ok(Some(snap)) => {
                let mut reg = self.registry.lock();
                reg.place(
                    id,
                    at.or(Some(snap.position)),
                    Some(snap.battery_pct),
                    Some(snap.updated_us),
                    &self.cfg,
                    events::now_us(),
                );
                if let Some(delivery) = snap.delivery
                    && reg.get(id).is_some_and(|s| s.delivery.is_none())
                    && reg.assigned(delivery).is_none()
                {
                    if self.store.as_ref().is_some_and(Store::is_shared) {
                        // Another node's delivery, normal on a shared store.
                        tracing::debug!(drone = id, delivery, "a drone on another node's delivery: held for it");
                    } else {
                        tracing::warn!(
                            drone = id,
                            delivery,
                            "the engine has this drone on a delivery the registry did not know: held for it"
                        );
                    }
                    reg.assign_to(delivery, id);
                }
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(drone = id, %error, "no live state for a drone"),
        }
    }

    /// [`Self::refresh`] for many drones: one engine lookup each, a bounded number at a time (a
    /// fleet of thousands must not wait for them one by one, least of all across the network).
    async fn refresh_all(&self, ids: &[DroneId]) {
        use futures_util::StreamExt;
        futures_util::stream::iter(ids).for_each_concurrent(64, |&id| self.refresh(id, None)).await;
    }

    /// Looks up drones registered before they ever reported (up to a few thousand per call), so
    /// they become assignable once they do. Returns how many were looked up.
    pub async fn sweep(&self) -> usize {
        if let Some(store) = self.store.as_ref().filter(|s| s.is_shared()) {
            // Other nodes register drones too: theirs join this registry on the next sweep.
            match store.all::<StoredDrone>() {
                Ok(stored) => {
                    let mut reg = self.registry.lock();
                    for id in stored.iter().filter_map(|(key, _)| key.parse::<DroneId>().ok()) {
                        reg.register(id);
                    }
                }
                Err(error) => tracing::warn!(%error, "could not read the drones other nodes registered"),
            }
        }
        let ids = self.registry.lock().unplaced(SWEEP_MAX);
        self.refresh_all(&ids).await;
        ids.len()
    }

    /// Ends `delivery`'s assignment because the engine refused its drone as busy with another
    /// delivery (one another node assigned): the drone is looked up again, which holds it for
    /// that delivery, so the next assignment passes it over.
    pub async fn release_busy(&self, delivery: DeliveryId) -> Result<(), Error> {
        if let Some(drone) = self.release(delivery).await? {
            self.refresh(drone, None).await;
        }
        Ok(())
    }

    /// Assigns a drone to `delivery`, durably. The registry's nearest candidate is checked
    /// against the engine's live state first (position, battery, last heard), and passed over
    /// for the next one when it no longer qualifies.
    pub async fn assign(&self, delivery: DeliveryId, pickup: GeoPoint) -> Result<DroneId, Error> {
        let mut looked_unplaced = false;
        for _ in 0..ASSIGN_TRIES {
            let found = {
                let mut reg = self.registry.lock();
                if let Some(drone) = reg.assigned(delivery) {
                    return Ok(drone);
                }
                match reg.candidate(pickup, &self.cfg) {
                    Ok(drone) => Ok(drone),
                    Err(NoDrone::AllBusy) => return Err(Error::NoDroneAvailable),
                    // None listed fits: look at a turn of the unplaced ones now rather than wait
                    // for the sweep (after a restart every drone starts unplaced).
                    Err(NoDrone::NoneSuitable) if !looked_unplaced => Err(reg.unplaced(UNPLACED_PER_ASSIGN)),
                    Err(NoDrone::NoneSuitable) => return Err(Error::NoDroneAvailable),
                }
            };
            let candidate = match found {
                Ok(drone) => drone,
                Err(turn) if turn.is_empty() => return Err(Error::NoDroneAvailable),
                Err(turn) => {
                    looked_unplaced = true;
                    self.refresh_all(&turn).await;
                    continue;
                }
            };
            // What the registry heard is trusted for a third of the liveness window; older, the
            // engine is asked (one shard round trip) whether the drone is still there.
            let heard = self.registry.lock().get(candidate).and_then(|s| s.heard_us);
            let fresh_for = (self.cfg.liveness_s / 3.0 * 1e6) as u64;
            if heard.is_none_or(|h| events::now_us().saturating_sub(h) > fresh_for) {
                self.refresh(candidate, None).await;
            }
            let stored = {
                let mut reg = self.registry.lock();
                if let Some(drone) = reg.assigned(delivery) {
                    return Ok(drone);
                }
                if !reg.suitable(candidate, pickup, &self.cfg, events::now_us()) {
                    // Gone quiet, drained or moved out of range since it was listed: the
                    // refresh re-listed it where it is now; a silent one waits unplaced.
                    reg.park_if_silent(candidate, &self.cfg, events::now_us());
                    continue;
                }
                if !reg.assign_to(delivery, candidate) {
                    continue;
                }
                self.queue_assignment_writes(&reg, &[candidate])
            };
            if let Some(stored) = stored {
                stored.await?;
            }
            return Ok(candidate);
        }
        Err(Error::NoDroneAvailable)
    }

    /// Ends `delivery`'s assignment, durably.
    pub async fn release(&self, delivery: DeliveryId) -> Result<Option<DroneId>, Error> {
        let (drone, stored) = {
            let mut reg = self.registry.lock();
            let drone = reg.release(delivery, None);
            let stored = drone.and_then(|d| self.queue_assignment_writes(&reg, &[d]));
            (drone, stored)
        };
        if let Some(stored) = stored {
            stored.await?;
        }
        Ok(drone)
    }

    /// Registered drones and how many are free.
    pub fn size(&self) -> (usize, usize) {
        self.registry.lock().size()
    }

    /// Frees the drones of deliveries that reached a terminal stage (durably), then places each
    /// where its last event happened, with its battery as the engine last heard.
    pub async fn apply_delivery_events(&self, batch: &DeliveryBatch) -> Result<(), Error> {
        self.apply_delivery_event_batches(&[batch]).await
    }

    /// [`Self::apply_delivery_events`] for consecutive batches.
    pub async fn apply_delivery_event_batches<B: std::ops::Deref<Target = DeliveryBatch>>(
        &self,
        batches: &[B],
    ) -> Result<(), Error> {
        let (freed, stored) = {
            let mut reg = self.registry.lock();
            let mut freed = Vec::new();
            for ev in batches.iter().flat_map(|b| b.events().iter()) {
                let (delivery, drone) = (ev.delivery_id.to_native(), ev.drone_id.to_native());
                if ev.stage.to_stage().is_terminal() {
                    let at = GeoPoint::new(ev.location.lat.to_native(), ev.location.lon.to_native());
                    if let Some(drone) = reg.release(delivery, None) {
                        freed.push((drone, at));
                    }
                } else if reg.assigned(delivery).is_none() && reg.get(drone).is_some_and(|s| s.delivery.is_none()) {
                    // A delivery this registry did not assign (another node's, on a shared
                    // store): its drone is taken until the delivery ends.
                    reg.assign_to(delivery, drone);
                }
            }
            let ids: Vec<DroneId> = freed.iter().map(|(d, _)| *d).collect();
            let stored = self.queue_assignment_writes(&reg, &ids);
            (freed, stored)
        };
        if let Some(stored) = stored {
            stored.await?;
        }
        // Where it ended is placed by the refresh, and only if the drone reported.
        for (drone, at) in freed {
            self.refresh(drone, Some(at)).await;
        }
        Ok(())
    }

    /// The service's public routes (admin keys only, see [`crate::auth`]).
    pub fn public_router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/drones", post(register_drones::<F>))
            .route("/v1/drones/{id}", get(get_drone::<F>).put(register_drone::<F>))
            .with_state(self.clone())
    }

    /// The routes other services call (`/internal/v1/assignments`).
    /// Records each assignment as a `drones.assign` span of its delivery in `spans` (the
    /// first call wins).
    pub fn keep_spans(&self, spans: crate::spans::Spans) {
        let _ = self.spans.set(spans);
    }

    pub fn internal_router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(
                "/internal/v1/assignments/{delivery}",
                get(get_assignment::<F>).put(put_assignment::<F>).delete(delete_assignment::<F>),
            )
            .with_state(self.clone())
    }
}

/// Register drones as available for deliveries.
#[utoipa::path(
    post, path = "/v1/drones", tag = "drones",
    request_body = RegisterDrones,
    responses(
        (status = 201, description = "`{registered, new}`: how many were sent and how many were new; some were new"),
        (status = 200, description = "`{registered, new}`: every one was registered already"),
    )
)]
async fn register_drones<F: FleetControl>(
    State(svc): State<Arc<DroneManagement<F>>>,
    ApiJson(req): ApiJson<RegisterDrones>,
) -> Result<impl IntoResponse, Error> {
    if req.drones.len() > 100_000 || req.drones.iter().any(|&id| id > crate::api::MAX_ID) {
        return Err(Error::BadRequest(format!("give at most 100,000 drone ids, each at most {}", crate::api::MAX_ID)));
    }
    let added = svc.register(&req.drones).await?;
    // As `PUT /v1/drones/{id}` answers for one: `201` when the call registered any.
    let status = if added > 0 { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(serde_json::json!({ "registered": req.drones.len(), "new": added }))))
}

/// Register one drone as available for deliveries.
#[utoipa::path(
    put, path = "/v1/drones/{id}", tag = "drones",
    params(("id" = u64, Path, description = "drone id")),
    responses(
        (status = 201, description = "`{drone_id}`: registered"),
        (status = 200, description = "`{drone_id}`: it was registered already"),
    )
)]
pub(crate) async fn register_drone<F: FleetControl>(
    State(svc): State<Arc<DroneManagement<F>>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let added = svc.register(&[id]).await?;
    let status = if added == 1 { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(serde_json::json!({ "drone_id": id }))))
}

/// A drone's live state from the engine and its assignment.
#[utoipa::path(
    get, path = "/v1/drones/{id}", tag = "drones",
    params(("id" = u64, Path, description = "drone id")),
    responses(
        (status = 200, description = "live state, with `registered` and `assigned_delivery`", body = DroneView),
        (status = 404, description = "neither registered nor ever reported", body = crate::error::ErrorBody),
    )
)]
async fn get_drone<F: FleetControl>(
    State(svc): State<Arc<DroneManagement<F>>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let registered = svc.registry.lock().get(id);
    let snapshot = svc.fleet.drone(id).await?;
    if snapshot.is_none() && registered.is_none() {
        return Err(Error::NotFound { what: "drone", id });
    }
    // A drone that never reported has no position or charge: they read as null.
    Ok(Json(DroneView {
        drone_id: id,
        position: snapshot.map(|s| s.position),
        status: snapshot.map(|s| s.status),
        battery_pct: snapshot.map(|s| s.battery_pct),
        last_seq: snapshot.map(|s| s.last_seq),
        updated_us: snapshot.map(|s| s.updated_us),
        delivery: snapshot.and_then(|s| s.delivery),
        registered: registered.is_some(),
        assigned_delivery: registered.and_then(|r| r.delivery),
    }))
}

/// `GET /v1/drones/{id}`'s answer: the engine's live state (null until the drone reports) and
/// the registry's.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct DroneView {
    /// The drone.
    drone_id: DroneId,
    /// Last reported position.
    position: Option<GeoPoint>,
    /// Last reported flight status.
    status: Option<events::FlightStatus>,
    /// Last reported battery charge, percent.
    battery_pct: Option<f32>,
    /// Last processed sequence number.
    last_seq: Option<u64>,
    /// Creation time of the last processed event, µs since the epoch.
    updated_us: Option<u64>,
    /// The delivery the engine sees it flying.
    delivery: Option<DeliveryId>,
    /// Whether it is registered with Drone Management.
    registered: bool,
    /// The delivery Drone Management assigned it.
    assigned_delivery: Option<DeliveryId>,
}

async fn put_assignment<F: FleetControl>(
    State(svc): State<Arc<DroneManagement<F>>>,
    Path(delivery): Path<String>,
    trace: Option<axum::Extension<events::TraceContext>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<AssignRequest>,
) -> Result<impl IntoResponse, Error> {
    let delivery_id = parse_id(&delivery)?;
    if !req.pickup.is_valid() {
        return Err(Error::BadRequest("pickup is not a valid coordinate".into()));
    }
    let started = std::time::Instant::now();
    let assigned = svc.assign(delivery_id, req.pickup).await;
    if let Some(spans) = svc.spans.get() {
        let parent = crate::spans::request_trace(trace, &headers).unwrap_or_default();
        let outcome = match &assigned {
            Ok(drone) => ("drone_id", serde_json::json!(drone)),
            Err(e) => ("error", e.to_string().into()),
        };
        let of = crate::spans::SpanOf::new(delivery_id, "drones.assign", "drones").under(parent);
        spans.record_since(of.with(crate::spans::attrs([outcome])), started);
    }
    // No drone is a 409 here, not the public 503: it is an answer, not a failure of this
    // service, so callers must neither retry it nor count it against the circuit.
    match assigned {
        Ok(drone_id) => Ok(Json(Assignment { delivery_id, drone_id }).into_response()),
        Err(e @ Error::NoDroneAvailable) => Ok((
            StatusCode::CONFLICT,
            Json(serde_json::json!({ "error": "no_drone_available", "message": e.to_string() })),
        )
            .into_response()),
        Err(e) => Err(e),
    }
}

async fn get_assignment<F: FleetControl>(
    State(svc): State<Arc<DroneManagement<F>>>,
    Path(delivery): Path<String>,
) -> Result<impl IntoResponse, Error> {
    let delivery_id = parse_id(&delivery)?;
    let drone_id =
        svc.registry.lock().assigned(delivery_id).ok_or(Error::NotFound { what: "assignment", id: delivery_id })?;
    Ok(Json(Assignment { delivery_id, drone_id }))
}

/// `DELETE /internal/v1/assignments/{delivery}?busy=true`: the engine refused the drone as
/// busy; it is looked up again so that it is passed over.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseQuery {
    #[serde(default)]
    busy: bool,
}

async fn delete_assignment<F: FleetControl>(
    State(svc): State<Arc<DroneManagement<F>>>,
    Path(delivery): Path<String>,
    query: axum::extract::Query<ReleaseQuery>,
) -> Result<StatusCode, Error> {
    let delivery_id = parse_id(&delivery)?;
    if query.busy {
        svc.release_busy(delivery_id).await?;
    } else {
        svc.release(delivery_id).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000_000_000_000;

    fn at(lat: f64, lon: f64) -> Option<GeoPoint> {
        Some(GeoPoint::new(lat, lon))
    }

    #[test]
    fn the_nearest_free_drone_with_enough_battery_is_chosen() {
        let cfg = DronesConfig::default();
        let mut reg = Registry::default();
        for id in 1..=4 {
            assert!(reg.register(id));
        }
        assert!(!reg.register(1), "registering twice changes nothing");
        reg.place(1, at(47.60, -122.30), Some(90.0), Some(NOW), &cfg, NOW);
        reg.place(2, at(47.70, -122.30), Some(90.0), Some(NOW), &cfg, NOW);
        reg.place(3, at(47.601, -122.301), Some(10.0), Some(NOW), &cfg, NOW); // nearest, but its battery is low
        reg.place(4, at(48.50, -122.30), Some(90.0), Some(NOW), &cfg, NOW);
        let pickup = GeoPoint::new(47.6005, -122.3005);
        assert_eq!(reg.assign(100, pickup, &cfg, NOW), Ok(1));
        assert_eq!(reg.assign(100, pickup, &cfg, NOW), Ok(1), "the same delivery gets the same drone");
        assert_eq!(reg.assign(101, pickup, &cfg, NOW), Ok(2));
        assert_eq!(reg.assign(102, pickup, &cfg, NOW), Ok(4));
        assert_eq!(
            reg.assign(103, pickup, &cfg, NOW),
            Err(NoDrone::NoneSuitable),
            "only the low-battery drone is left"
        );
        assert_eq!(reg.size(), (4, 1));
        // Drone 1 finishes far away and becomes the nearest to a pickup there.
        assert_eq!(reg.release(100, at(40.0, -100.0)), Some(1));
        assert_eq!(reg.release(100, None), None, "released once");
        assert_eq!(reg.assign(104, GeoPoint::new(40.01, -100.01), &cfg, NOW), Ok(1));
        assert_eq!(reg.size(), (4, 1));
    }

    /// The grid search picks what a scan of every drone picks, for fleets dense (thousands in
    /// a few km: the ring walk) and sparse (a few over a continent: the fallback scan).
    #[test]
    fn the_grid_search_agrees_with_a_scan_of_every_drone() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as f64 / u64::MAX as f64
        };
        let cfg = DronesConfig::default();
        for (drones, spread_deg) in [(3_000u64, 0.05), (200, 0.5), (40, 5.0), (5, 20.0)] {
            let mut reg = Registry::default();
            let mut placed = Vec::new();
            for id in 1..=drones {
                reg.register(id);
                let p = GeoPoint::new(47.6 + (next() - 0.5) * spread_deg, -122.3 + (next() - 0.5) * spread_deg);
                let battery = if next() < 0.1 { 10.0 } else { 90.0 };
                reg.place(id, Some(p), Some(battery), Some(NOW), &cfg, NOW);
                placed.push((id, p, battery));
            }
            // Each pickup takes the drone it gets out of the grid, so later ones search a
            // thinning fleet.
            for k in 0..200 {
                let pickup =
                    GeoPoint::new(47.6 + (next() - 0.5) * spread_deg * 1.5, -122.3 + (next() - 0.5) * spread_deg * 1.5);
                let scan = placed
                    .iter()
                    .filter(|(id, _, _)| reg.get(*id).is_some_and(|s| s.delivery.is_none()))
                    .filter_map(|&(id, p, b)| in_reach(Some(p), Some(b), pickup, &cfg).map(|d| (d, id)))
                    .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                    .map(|(_, id)| id);
                let got = reg.assign(1_000_000 + k, pickup, &cfg, NOW).ok();
                assert_eq!(got, scan, "{drones} drones over {spread_deg}°, pickup {pickup:?}");
            }
        }
    }

    #[test]
    fn drones_out_of_range_unheard_silent_or_of_unknown_charge_are_never_assigned() {
        let cfg = DronesConfig { max_distance_km: 50.0, ..DronesConfig::default() };
        let mut reg = Registry::default();
        for id in 1..=5 {
            reg.register(id);
        }
        reg.place(1, at(10.0, 10.0), Some(90.0), Some(NOW), &cfg, NOW);
        // 2 never reported; 3 reported its place but not its charge; 4 went quiet a minute ago;
        // 5 is in range and live.
        reg.place(3, at(50.0, 50.0), None, Some(NOW), &cfg, NOW);
        reg.place(4, at(50.0, 50.0), Some(90.0), Some(NOW - 60_000_000), &cfg, NOW);
        let far = GeoPoint::new(50.0, 50.0);
        assert_eq!(reg.assign(7, far, &cfg, NOW), Err(NoDrone::NoneSuitable), "no unknown drone is a fallback");
        assert_eq!(reg.assign(9, GeoPoint::new(10.1, 10.1), &cfg, NOW), Ok(1));
        reg.place(5, at(50.01, 50.01), Some(80.0), Some(NOW - 1_000_000), &cfg, NOW);
        assert_eq!(reg.assign(10, far, &cfg, NOW), Ok(5));
        // Heard from again, the quiet one qualifies.
        reg.place(4, None, None, Some(NOW), &cfg, NOW);
        assert_eq!(reg.assign(11, far, &cfg, NOW), Ok(4));
        assert_eq!(reg.size(), (5, 2), "2 and 3 stay free and unassigned");
        assert_eq!(reg.unplaced(10), vec![2], "only the one that never reported is looked up again");
    }

    #[test]
    fn a_restored_registry_knows_its_assignments() {
        let cfg = DronesConfig::default();
        let mut reg = Registry::default();
        reg.restore(1, Some(100));
        reg.restore(2, None);
        assert_eq!(reg.assigned(100), Some(1));
        assert_eq!(reg.size(), (2, 1));
        reg.place(1, at(1.0, 1.0), Some(90.0), Some(NOW), &cfg, NOW);
        reg.place(2, at(1.0, 1.0), Some(90.0), Some(NOW), &cfg, NOW);
        assert_eq!(reg.assign(101, GeoPoint::new(1.0, 1.0), &cfg, NOW), Ok(2), "the flying drone is not offered");
        assert_eq!(reg.release(100, None), Some(1));
        assert_eq!(reg.assign(102, GeoPoint::new(1.0, 1.0), &cfg, NOW), Ok(1));
    }
}
