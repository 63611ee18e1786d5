//! Drone Management: the fleet registry, and assignment of a free drone near the pickup with
//! enough battery.
//!
//! The core is [`Registry`], a pure state machine: drones are registered, placed (position and
//! battery as last known), assigned to a delivery and released. Free drones with a known
//! position sit in a grid of cells, so finding the nearest one looks at the cells around the
//! pickup ring by ring instead of at every drone. A drone that never reported its position is
//! used only when no placed drone is in range; one whose battery is below `min_battery_pct` is
//! passed over. Assignment is idempotent per delivery: asking again for the same delivery
//! returns the same drone.
//!
//! [`DroneManagement`] drives it: positions and battery come from the engine's live state when
//! a drone registers and when it finishes a delivery (its delivery's terminal event also says
//! where it is), so an assignment itself does no I/O.
//!
//! | method | path | what |
//! |---|---|---|
//! | POST | `/v1/drones` | register drones `{"drones": [ids]}` |
//! | PUT | `/v1/drones/{id}` | register one drone |
//! | GET | `/v1/drones/{id}` | the engine's live state of a drone and its assignment |
//! | PUT | `/internal/v1/assignments/{delivery}` | `{pickup}`: assign a drone (the same one again on a retry); `409` when none is free |
//! | GET | `/internal/v1/assignments/{delivery}` | the assigned drone |
//! | DELETE | `/internal/v1/assignments/{delivery}` | release it (`204`, also when none) |

use std::collections::VecDeque;
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

/// Assignment settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DronesConfig {
    /// Least battery charge (percent) a drone needs to be given a delivery. Default 30.
    pub min_battery_pct: f32,
    /// How far from the pickup a placed drone may be, km. Default 200.
    pub max_distance_km: f64,
}

impl Default for DronesConfig {
    fn default() -> Self {
        Self { min_battery_pct: 30.0, max_distance_km: 200.0 }
    }
}

/// Grid cell size in degrees (about 5.5 km of latitude).
const CELL_DEG: f64 = 0.05;
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
}

/// Why no drone was assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoDrone {
    /// Every drone is busy.
    AllBusy,
    /// Free drones exist but none in range with enough battery.
    NoneSuitable,
}

/// The fleet registry (pure: no clock, no I/O).
#[derive(Debug, Default)]
pub struct Registry {
    drones: FxHashMap<DroneId, DroneState>,
    assignments: FxHashMap<DeliveryId, DroneId>,
    /// Free drones with a known position, by cell.
    cells: FxHashMap<Cell, Vec<DroneId>>,
    /// Free drones that never reported a position, oldest first.
    unplaced: VecDeque<DroneId>,
    free: usize,
}

impl Registry {
    /// Registers a drone as free (a known drone is left as it is). `true`: it is new.
    pub fn register(&mut self, id: DroneId) -> bool {
        if self.drones.contains_key(&id) {
            return false;
        }
        self.drones.insert(id, DroneState { delivery: None, position: None, battery_pct: None });
        self.unplaced.push_back(id);
        self.free += 1;
        true
    }

    /// Records where a drone is and its battery (unknown drones are ignored).
    pub fn place(&mut self, id: DroneId, position: Option<GeoPoint>, battery_pct: Option<f32>) {
        let Some(state) = self.drones.get(&id).copied() else { return };
        let free = state.delivery.is_none();
        if free {
            self.unlist(id, state.position);
        }
        let state = DroneState {
            delivery: state.delivery,
            position: position.or(state.position),
            battery_pct: battery_pct.or(state.battery_pct),
        };
        self.drones.insert(id, state);
        if free {
            self.list(id, state.position);
        }
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

    /// Assigns the nearest suitable free drone to `delivery` (the same drone again if it already
    /// has one).
    pub fn assign(&mut self, delivery: DeliveryId, pickup: GeoPoint, cfg: &DronesConfig) -> Result<DroneId, NoDrone> {
        if let Some(&drone) = self.assignments.get(&delivery) {
            return Ok(drone);
        }
        if self.free == 0 {
            return Err(NoDrone::AllBusy);
        }
        let chosen = self.nearest(pickup, cfg).or_else(|| {
            self.unplaced.iter().copied().find(|id| self.drones.get(id).is_some_and(|s| battery_ok(s, cfg)))
        });
        let drone = chosen.ok_or(NoDrone::NoneSuitable)?;
        let Some(state) = self.drones.get(&drone).copied() else { return Err(NoDrone::NoneSuitable) };
        self.unlist(drone, state.position);
        self.drones.insert(drone, DroneState { delivery: Some(delivery), ..state });
        self.assignments.insert(delivery, drone);
        Ok(drone)
    }

    /// Ends `delivery`'s assignment; its drone is free again, at `at` if given. Returns the
    /// drone, `None` if the delivery had none.
    pub fn release(&mut self, delivery: DeliveryId, at: Option<GeoPoint>) -> Option<DroneId> {
        let drone = self.assignments.remove(&delivery)?;
        let state = self.drones.get_mut(&drone)?;
        state.delivery = None;
        state.position = at.or(state.position);
        let position = state.position;
        self.list(drone, position);
        Some(drone)
    }

    fn list(&mut self, id: DroneId, position: Option<GeoPoint>) {
        match position {
            Some(p) => self.cells.entry(cell_of(p)).or_default().push(id),
            None => self.unplaced.push_back(id),
        }
        self.free += 1;
    }

    fn unlist(&mut self, id: DroneId, position: Option<GeoPoint>) {
        let removed = match position {
            Some(p) => {
                let cell = cell_of(p);
                let list = self.cells.get_mut(&cell);
                let found = list.and_then(|l| l.iter().position(|&d| d == id).map(|i| (l, i)));
                match found {
                    Some((list, i)) => {
                        list.swap_remove(i);
                        if list.is_empty() {
                            self.cells.remove(&cell);
                        }
                        true
                    }
                    None => false,
                }
            }
            None => match self.unplaced.iter().position(|&d| d == id) {
                Some(i) => self.unplaced.remove(i).is_some(),
                None => false,
            },
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
        let consider = |best: &mut Option<(f64, DroneId)>, id: DroneId| {
            let Some(state) = self.drones.get(&id) else { return };
            let Some(p) = state.position else { return };
            if !battery_ok(state, cfg) {
                return;
            }
            let d = distance_km(pickup, p);
            if d <= cfg.max_distance_km && best.is_none_or(|(bd, bid)| d < bd || (d == bd && id < bid)) {
                *best = Some((d, id));
            }
        };
        // Few occupied cells: scanning them beats walking many empty rings.
        if self.cells.len() < 64 {
            for ids in self.cells.values() {
                for &id in ids {
                    consider(&mut best, id);
                }
            }
            return best.map(|(_, id)| id);
        }
        for ring in 0..=max_ring {
            // Every point of this ring is at least (ring - 1) cells away on either axis; a
            // degree of longitude shrinks by cos(latitude), taken at the ring's far edge.
            if let Some((best_d, _)) = best {
                let far_lat = (pickup.lat.abs() + f64::from(ring) * CELL_DEG).min(89.0);
                let floor = f64::from(ring - 1) * CELL_DEG * KM_PER_DEG * far_lat.to_radians().cos();
                if floor > best_d {
                    break;
                }
            }
            for (i, j) in ring_cells(ci, cj, ring) {
                if let Some(ids) = self.cells.get(&(i, j)) {
                    for &id in ids {
                        consider(&mut best, id);
                    }
                }
            }
        }
        best.map(|(_, id)| id)
    }
}

fn battery_ok(state: &DroneState, cfg: &DronesConfig) -> bool {
    state.battery_pct.is_none_or(|b| b >= cfg.min_battery_pct)
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
}

/// Drones to register.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterDrones {
    /// Their ids.
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

impl<F: FleetControl> DroneManagement<F> {
    /// The service, reading drones' live state from `fleet`.
    pub fn new(fleet: F, cfg: DronesConfig) -> Arc<Self> {
        Arc::new(Self { fleet, registry: Mutex::default(), cfg })
    }

    /// Registers drones; each new one is placed from the engine's live state when it has one.
    pub async fn register(&self, ids: &[DroneId]) -> usize {
        let fresh: Vec<DroneId> = {
            let mut reg = self.registry.lock();
            ids.iter().copied().filter(|&id| reg.register(id)).collect()
        };
        // One engine lookup per new drone, a bounded number at a time (registering a fleet of
        // thousands must not wait for them one by one, least of all across the network).
        use futures_util::StreamExt;
        futures_util::stream::iter(&fresh).for_each_concurrent(64, |&id| self.refresh(id, None)).await;
        fresh.len()
    }

    /// Re-reads a drone's position and battery from the engine (`at` wins for the position).
    /// A drone that never reported keeps what the registry knew: the engine's placeholder
    /// state for it (no position, no charge) says nothing.
    async fn refresh(&self, id: DroneId, at: Option<GeoPoint>) {
        match self.fleet.drone(id).await {
            Ok(Some(snap)) if snap.updated_us > 0 => {
                self.registry.lock().place(id, at.or(Some(snap.position)), Some(snap.battery_pct));
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(drone = id, %error, "no live state for a drone"),
        }
    }

    /// Assigns a drone to `delivery`.
    pub fn assign(&self, delivery: DeliveryId, pickup: GeoPoint) -> Result<DroneId, Error> {
        self.registry.lock().assign(delivery, pickup, &self.cfg).map_err(|_| Error::NoDroneAvailable)
    }

    /// Ends `delivery`'s assignment.
    pub fn release(&self, delivery: DeliveryId) -> Option<DroneId> {
        self.registry.lock().release(delivery, None)
    }

    /// Registered drones and how many are free.
    pub fn size(&self) -> (usize, usize) {
        self.registry.lock().size()
    }

    /// Frees the drones of deliveries that reached a terminal stage and places each where its
    /// last event happened, with its battery as the engine last heard.
    pub async fn apply_delivery_events(&self, batch: &DeliveryBatch) {
        let mut freed = Vec::new();
        {
            let mut reg = self.registry.lock();
            for ev in batch.events().iter() {
                if ev.stage.to_stage().is_terminal() {
                    // Where it ended is placed by the refresh, and only if the drone reported.
                    let at = GeoPoint::new(ev.location.lat.to_native(), ev.location.lon.to_native());
                    if let Some(drone) = reg.release(ev.delivery_id.to_native(), None) {
                        freed.push((drone, at));
                    }
                }
            }
        }
        for (drone, at) in freed {
            self.refresh(drone, Some(at)).await;
        }
    }

    /// The service's routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/drones", post(register_drones::<F>))
            .route("/v1/drones/{id}", get(get_drone::<F>).put(register_drone::<F>))
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
    responses((status = 200, description = "`{registered, new}`: how many were sent and how many were new"))
)]
async fn register_drones<F: FleetControl>(
    State(svc): State<Arc<DroneManagement<F>>>,
    ApiJson(req): ApiJson<RegisterDrones>,
) -> impl IntoResponse {
    let added = svc.register(&req.drones).await;
    Json(serde_json::json!({ "registered": req.drones.len(), "new": added }))
}

async fn register_drone<F: FleetControl>(
    State(svc): State<Arc<DroneManagement<F>>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let added = svc.register(&[id]).await;
    let status = if added == 1 { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(serde_json::json!({ "drone_id": id }))))
}

/// A drone's live state from the engine and its assignment.
#[utoipa::path(
    get, path = "/v1/drones/{id}", tag = "drones",
    params(("id" = u64, Path, description = "drone id")),
    responses(
        (status = 200, description = "live state, with `registered` and `assigned_delivery`", body = events::DroneSnapshot),
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
    let mut body = serde_json::to_value(snapshot).unwrap_or_default();
    if body.is_null() {
        body = serde_json::json!({ "drone_id": id });
    }
    if let Some(obj) = body.as_object_mut() {
        obj.insert("registered".into(), registered.is_some().into());
        obj.insert("assigned_delivery".into(), serde_json::json!(registered.and_then(|r| r.delivery)));
    }
    Ok(Json(body))
}

async fn put_assignment<F: FleetControl>(
    State(svc): State<Arc<DroneManagement<F>>>,
    Path(delivery): Path<String>,
    ApiJson(req): ApiJson<AssignRequest>,
) -> Result<impl IntoResponse, Error> {
    let delivery_id = parse_id(&delivery)?;
    if !req.pickup.is_valid() {
        return Err(Error::BadRequest("pickup is not a valid coordinate".into()));
    }
    // No drone is a 409 here, not the public 503: it is an answer, not a failure of this
    // service, so callers must neither retry it nor count it against the circuit.
    match svc.assign(delivery_id, req.pickup) {
        Ok(drone_id) => Ok(Json(Assignment { delivery_id, drone_id }).into_response()),
        Err(e) => Ok((
            StatusCode::CONFLICT,
            Json(serde_json::json!({ "error": "no_drone_available", "message": e.to_string() })),
        )
            .into_response()),
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

async fn delete_assignment<F: FleetControl>(
    State(svc): State<Arc<DroneManagement<F>>>,
    Path(delivery): Path<String>,
) -> Result<StatusCode, Error> {
    let delivery_id = parse_id(&delivery)?;
    svc.release(delivery_id);
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        reg.place(1, at(47.60, -122.30), Some(90.0));
        reg.place(2, at(47.70, -122.30), Some(90.0));
        reg.place(3, at(47.601, -122.301), Some(10.0)); // nearest, but its battery is low
        reg.place(4, at(48.50, -122.30), Some(90.0));
        let pickup = GeoPoint::new(47.6005, -122.3005);
        assert_eq!(reg.assign(100, pickup, &cfg), Ok(1));
        assert_eq!(reg.assign(100, pickup, &cfg), Ok(1), "the same delivery gets the same drone");
        assert_eq!(reg.assign(101, pickup, &cfg), Ok(2));
        assert_eq!(reg.assign(102, pickup, &cfg), Ok(4));
        assert_eq!(reg.assign(103, pickup, &cfg), Err(NoDrone::NoneSuitable), "only the low-battery drone is left");
        assert_eq!(reg.size(), (4, 1));
        // Drone 1 finishes far away and becomes the nearest to a pickup there.
        assert_eq!(reg.release(100, at(40.0, -100.0)), Some(1));
        assert_eq!(reg.release(100, None), None, "released once");
        assert_eq!(reg.assign(104, GeoPoint::new(40.01, -100.01), &cfg), Ok(1));
        assert_eq!(reg.size(), (4, 1));
    }

    #[test]
    fn drones_out_of_range_are_not_used_and_unplaced_drones_are_the_fallback() {
        let cfg = DronesConfig { max_distance_km: 50.0, ..DronesConfig::default() };
        let mut reg = Registry::default();
        reg.register(1);
        reg.register(2);
        reg.place(1, at(10.0, 10.0), None);
        // Drone 2 never reported where it is: used only when no placed drone is in range.
        assert_eq!(reg.assign(7, GeoPoint::new(50.0, 50.0), &cfg), Ok(2));
        assert_eq!(reg.assign(8, GeoPoint::new(50.0, 50.0), &cfg), Err(NoDrone::NoneSuitable));
        assert_eq!(reg.assign(9, GeoPoint::new(10.1, 10.1), &cfg), Ok(1));
        assert_eq!(reg.assign(10, GeoPoint::new(10.1, 10.1), &cfg), Err(NoDrone::AllBusy));
    }

    #[test]
    fn the_grid_search_agrees_with_a_full_scan() {
        let cfg = DronesConfig::default();
        let mut reg = Registry::default();
        // 400 drones on a grid 0.03° apart, so the search walks rings over many cells.
        let mut positions = Vec::new();
        for i in 0..20u64 {
            for j in 0..20u64 {
                let id = i * 20 + j + 1;
                reg.register(id);
                let p = GeoPoint::new(45.0 + 0.03 * i as f64, 7.0 + 0.03 * j as f64);
                reg.place(id, Some(p), Some(80.0));
                positions.push((id, p));
            }
        }
        for (k, pickup) in
            [GeoPoint::new(45.1, 7.1), GeoPoint::new(45.31, 7.52), GeoPoint::new(44.0, 6.0)].into_iter().enumerate()
        {
            let expected = positions
                .iter()
                .filter(|(id, _)| reg.get(*id).is_some_and(|s| s.delivery.is_none()))
                .map(|&(id, p)| (distance_km(pickup, p), id))
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                .map(|(_, id)| id);
            assert_eq!(reg.assign(1000 + k as u64, pickup, &cfg).ok(), expected);
        }
    }
}
