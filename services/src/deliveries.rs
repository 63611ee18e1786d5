//! Delivery: the record of every delivery and where it stands. The scheduler writes records
//! (an idempotent PUT per delivery, kept in the service's own store); the delivery-events
//! stream moves their stage; customers read them and subscribe to notifications.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/v1/deliveries/{id}` | stage, drone, the drone's last known position and an ETA |
//! | POST | `/v1/deliveries/{id}/notifications` | `{sms?, email?}`: be told of each stage change |
//! | PUT | `/internal/v1/deliveries/{id}` | create or update a record (`201` new, `200` updated) |
//! | GET | `/internal/v1/deliveries/{id}` | the record |
//! | DELETE | `/internal/v1/deliveries/{id}` | remove it (a failed order's compensation); `204` |
//!
//! Memory holds every delivery still under way and the most recently finished ones
//! ([`DeliveryLimits::finished_held`]); an older finished delivery is read from the store when
//! asked for, so a node that has flown millions of deliveries holds no more than a busy hour's.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use events::{DeliveryBatch, DeliveryId, DeliveryStage, DroneId, FleetControl, GeoPoint, QueueName, WorkQueues};
use parking_lot::RwLock;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::api::{ApiJson, parse_id};
use crate::auth::Caller;
use crate::state::Package;
use crate::store::{Batch, Store};

/// A record's version in a shared store: one more than the seq of the last event applied, so a
/// node behind another never overwrites what the other stored.
fn version(record: &DeliveryRecord) -> u64 {
    record.last_seq.map_or(0, |seq| u64::from(seq) + 1)
}

/// What `store` holds under the deliveries `ids` (repeats read once), in one read.
fn stored_by_id<T: serde::de::DeserializeOwned>(
    store: &Store,
    mut ids: Vec<DeliveryId>,
) -> Result<Vec<(DeliveryId, T)>, Error> {
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = ids.iter().map(|&id| crate::store::id_key(id)).collect();
    let found = store.get_many::<T>(&keys)?;
    Ok(ids.into_iter().zip(found).filter_map(|(id, value)| value.map(|v| (id, v))).collect())
}

/// Cruise speed assumed for ETAs, m/s.
const CRUISE_M_PER_S: f64 = 15.0;

/// The record of one delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryRecord {
    /// Its id.
    pub delivery_id: DeliveryId,
    /// The ordering account.
    pub owner: String,
    /// The assigned drone.
    pub drone_id: DroneId,
    /// Pickup point.
    pub pickup: GeoPoint,
    /// Drop-off point.
    pub dropoff: GeoPoint,
    /// The package.
    pub package: Package,
    /// Current stage, from the delivery-events stream.
    pub stage: DeliveryStage,
    /// When it was scheduled, µs since the epoch.
    pub created_us: u64,
    /// Time of the last stage change, µs since the epoch.
    pub updated_us: u64,
    /// The seq of the last event applied (so a replayed older event changes nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub(crate) last_seq: Option<u32>,
}

/// Notification subscriptions one delivery holds at most unless configured.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 16;

/// Finished deliveries whose records stay in memory unless configured.
pub const DEFAULT_FINISHED_HELD: usize = 100_000;

/// How much of its state the Delivery service holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryLimits {
    /// Notification subscriptions one delivery holds at most (at least one); past it a new one
    /// is refused with `limit_reached` (`[services] max_subscriptions_per_delivery`).
    pub subscriptions_per_delivery: usize,
    /// Finished (complete or cancelled) deliveries whose records stay in memory, the most
    /// recently finished; older ones are read from the store when asked for
    /// (`[services] finished_deliveries_held`). About 300 B each.
    pub finished_held: usize,
}

impl Default for DeliveryLimits {
    fn default() -> Self {
        Self { subscriptions_per_delivery: DEFAULT_MAX_SUBSCRIPTIONS, finished_held: DEFAULT_FINISHED_HELD }
    }
}

/// The Delivery service.
#[derive(Debug)]
pub struct DeliveryService<F> {
    fleet: F,
    /// Every delivery under way, and finished ones up to `limits.finished_held`.
    records: RwLock<FxHashMap<DeliveryId, DeliveryRecord>>,
    /// The finished deliveries held in `records`, in the order they finished (an id may be
    /// here after its record was let go or removed; letting go skips it then).
    finished: parking_lot::Mutex<std::collections::VecDeque<DeliveryId>>,
    store: DeliveryStores,
    subscriptions: RwLock<FxHashMap<DeliveryId, Vec<crate::notify::Subscription>>>,
    limits: DeliveryLimits,
}

/// Where the Delivery service keeps its state: two namespaces of one file, so a read model's
/// round (records, ended subscriptions, its log position) commits at once.
#[derive(Debug, Clone)]
pub struct DeliveryStores {
    /// The delivery records.
    pub records: Store,
    /// Notification subscriptions, per delivery.
    pub subscriptions: Store,
}

impl DeliveryStores {
    /// The service's namespaces in `file`.
    pub fn in_file(file: &Store) -> Self {
        Self { records: file.namespace("deliveries"), subscriptions: file.namespace("delivery-subscriptions") }
    }
}

impl<F: FleetControl + WorkQueues> DeliveryService<F> {
    /// The service over `store`, with the records it holds in memory (every delivery under way,
    /// the most recently finished up to `limits.finished_held`) and the subscriptions loaded.
    pub fn open(fleet: F, store: DeliveryStores, limits: DeliveryLimits) -> Result<Arc<Self>, Error> {
        let limits = DeliveryLimits {
            subscriptions_per_delivery: limits.subscriptions_per_delivery.max(1),
            finished_held: limits.finished_held,
        };
        let mut records = FxHashMap::default();
        // The newest finished ones, oldest on top.
        let mut newest: std::collections::BinaryHeap<std::cmp::Reverse<(u64, DeliveryId)>> = Default::default();
        store.records.scan(|_, r: DeliveryRecord| {
            if r.stage.is_terminal() {
                if limits.finished_held == 0 {
                    return;
                }
                newest.push(std::cmp::Reverse((r.updated_us, r.delivery_id)));
                if newest.len() > limits.finished_held
                    && let Some(std::cmp::Reverse((_, oldest))) = newest.pop()
                {
                    if oldest == r.delivery_id {
                        return;
                    }
                    records.remove(&oldest);
                }
            }
            records.insert(r.delivery_id, r);
        })?;
        let finished = newest.into_sorted_vec().into_iter().rev().map(|std::cmp::Reverse((_, id))| id).collect();
        let subscriptions = store
            .subscriptions
            .all::<Vec<crate::notify::Subscription>>()?
            .into_iter()
            .filter_map(|(k, subs)| k.parse::<DeliveryId>().ok().map(|id| (id, subs)))
            .collect();
        Ok(Arc::new(Self {
            fleet,
            records: RwLock::new(records),
            finished: parking_lot::Mutex::new(finished),
            store,
            subscriptions: RwLock::new(subscriptions),
            limits,
        }))
    }

    /// Notes deliveries that just finished, in order: their records are let go from memory
    /// (not from the store) once more than `limits.finished_held` have finished since.
    fn finished(&self, ids: impl IntoIterator<Item = DeliveryId>) {
        self.finished.lock().extend(ids);
    }

    /// Lets go of the records of the deliveries that finished longest ago, beyond
    /// `limits.finished_held`. Called once their final stage is stored.
    fn let_go_finished(&self) {
        let mut finished = self.finished.lock();
        if finished.len() <= self.limits.finished_held {
            return;
        }
        let mut records = self.records.write();
        let mut let_go = 0;
        while finished.len() > self.limits.finished_held {
            let Some(id) = finished.pop_front() else { break };
            if records.get(&id).is_some_and(|r| r.stage.is_terminal()) {
                records.remove(&id);
                let_go += 1;
            }
        }
        events::limits::evicted(events::limits::Table::FinishedDeliveries, let_go);
    }

    /// Stores a record (a new one, or new places for a known one, whose stage is kept).
    pub async fn put(&self, record: DeliveryRecord) -> Result<bool, Error> {
        // Merged and queued under the lock, so the store sees the record's changes in the order
        // memory did (a stage change and new places racing must not store a stale mix).
        let stored = {
            let mut records = self.records.write();
            let merged = match records.get_mut(&record.delivery_id) {
                Some(current) => {
                    current.pickup = record.pickup;
                    current.dropoff = record.dropoff;
                    current.package = record.package;
                    current.clone()
                }
                None => {
                    records.insert(record.delivery_id, record.clone());
                    record
                }
            };
            let mut batch = Batch::new();
            batch.put_versioned(
                &self.store.records,
                &crate::store::id_key(merged.delivery_id),
                &merged,
                version(&merged),
            )?;
            (self.store.records.enqueue(batch), merged.stage.is_terminal().then_some(merged.delivery_id))
        };
        // A finished delivery written again (it had been let go from memory) is held among the
        // finished, so it is let go again in its turn.
        self.finished(stored.1);
        Ok(stored.0.await?.first().copied().unwrap_or(false))
    }

    /// Removes a record and its subscriptions.
    pub async fn remove(&self, id: DeliveryId) -> Result<(), Error> {
        let stored = {
            let mut records = self.records.write();
            records.remove(&id);
            self.subscriptions.write().remove(&id);
            let mut batch = Batch::new();
            batch.delete(&self.store.records, &crate::store::id_key(id));
            batch.delete(&self.store.subscriptions, &crate::store::id_key(id));
            self.store.records.enqueue(batch)
        };
        stored.await?;
        Ok(())
    }

    /// Why the service's store stopped taking writes, if it did.
    pub fn store_failure(&self) -> Option<String> {
        self.store.records.failure()
    }

    /// Who ordered the deliveries scheduled within `window_us` before the newest one: Delivery
    /// History's owner notes of these may have been lost with a crash (they are stored with its
    /// next batch), so a starting node writes them again (they are idempotent).
    pub fn recent_owners(&self, window_us: u64) -> Vec<(DeliveryId, String, u64)> {
        let records = self.records.read();
        let newest = records.values().map(|r| r.created_us).max().unwrap_or(0);
        let since = newest.saturating_sub(window_us);
        records
            .values()
            .filter(|r| r.created_us >= since)
            .map(|r| (r.delivery_id, r.owner.clone(), r.created_us))
            .collect()
    }

    /// `(drone, delivery)` for every delivery not yet complete or cancelled: the drones they hold.
    pub fn in_flight(&self) -> Vec<(DroneId, DeliveryId)> {
        self.records.read().values().filter(|r| !r.stage.is_terminal()).map(|r| (r.drone_id, r.delivery_id)).collect()
    }

    /// How many records the service holds in memory.
    pub fn record_count(&self) -> usize {
        self.records.read().len()
    }

    /// The current record of a delivery, as this node holds it in memory.
    pub fn record(&self, id: DeliveryId) -> Option<DeliveryRecord> {
        self.records.read().get(&id).cloned()
    }

    /// The current record of a delivery: held in memory, or read from the store (a delivery
    /// that finished long ago, or on a shared store one another node wrote, which is then held
    /// here too and kept current by the delivery events this node applies).
    pub fn lookup(&self, id: DeliveryId) -> Result<Option<DeliveryRecord>, Error> {
        if let Some(record) = self.record(id) {
            return Ok(Some(record));
        }
        let Some(stored) = self.store.records.get::<DeliveryRecord>(&crate::store::id_key(id))? else {
            return Ok(None);
        };
        // A finished delivery's record no longer changes: it is answered from the store each
        // time rather than held again, so reading old deliveries costs no memory.
        if stored.stage.is_terminal() || !self.store.records.is_shared() {
            return Ok(Some(stored));
        }
        Ok(Some(self.records.write().entry(id).or_insert(stored).clone()))
    }

    /// On a shared store, loads the records of `batches`' deliveries this node does not hold
    /// (scheduled through another node), and the new places of those rescheduled (written by
    /// the node that took the reschedule before the engine derived it), so that applying the
    /// batches keeps every record current here and in the store.
    fn read_through<B: std::ops::Deref<Target = DeliveryBatch>>(&self, batches: &[B]) -> Result<(), Error> {
        if !self.store.records.is_shared() {
            return Ok(());
        }
        let wanted: Vec<DeliveryId> = {
            let records = self.records.read();
            batches
                .iter()
                .flat_map(|b| b.events().iter())
                .filter(|ev| {
                    let id = ev.delivery_id.to_native();
                    !records.contains_key(&id) || ev.stage.to_stage() == DeliveryStage::Rescheduled
                })
                .map(|ev| ev.delivery_id.to_native())
                .collect()
        };
        let found = stored_by_id::<DeliveryRecord>(&self.store.records, wanted)?;
        if found.is_empty() {
            return Ok(());
        }
        let mut held_finished = Vec::new();
        {
            let mut records = self.records.write();
            for (_, stored) in found {
                match records.get_mut(&stored.delivery_id) {
                    Some(held) => {
                        held.pickup = stored.pickup;
                        held.dropoff = stored.dropoff;
                        held.package = stored.package;
                    }
                    None => {
                        if stored.stage.is_terminal() {
                            held_finished.push(stored.delivery_id);
                        }
                        records.insert(stored.delivery_id, stored);
                    }
                }
            }
        }
        self.finished(held_finished);
        Ok(())
    }

    /// Updates stages from a batch of the delivery-events stream. Repeats (same delivery, same
    /// or older seq) are ignored.
    /// Returns the deliveries whose record changed, for [`DeliveryService::persist`].
    pub fn apply_delivery_events(&self, batch: &DeliveryBatch) -> Result<Vec<DeliveryId>, Error> {
        self.apply_delivery_event_batches(&[batch])
    }

    /// [`Self::apply_delivery_events`] for consecutive batches, in order: a delivery changed
    /// in several of them is named once.
    pub fn apply_delivery_event_batches<B: std::ops::Deref<Target = DeliveryBatch>>(
        &self,
        batches: &[B],
    ) -> Result<Vec<DeliveryId>, Error> {
        self.read_through(batches)?;
        let mut changed: Vec<DeliveryId> = Vec::new();
        let mut ended: Vec<DeliveryId> = Vec::new();
        let mut seen: rustc_hash::FxHashSet<DeliveryId> = rustc_hash::FxHashSet::default();
        let mut records = self.records.write();
        for ev in batches.iter().flat_map(|b| b.events().iter()) {
            let id = ev.delivery_id.to_native();
            let seq = ev.seq.to_native();
            let Some(record) = records.get_mut(&id) else { continue };
            if record.last_seq.is_some_and(|last| seq <= last) {
                continue;
            }
            record.last_seq = Some(seq);
            record.updated_us = ev.ts_us.to_native();
            let stage = ev.stage.to_stage();
            // Only a new stage is stored: an event that leaves the stage as it was (the
            // `Created` of a record the scheduler just wrote) changes nothing a reader sees, and
            // a restart resumes after it anyway.
            if record.stage != stage {
                if stage.is_terminal() && !record.stage.is_terminal() {
                    ended.push(id);
                }
                record.stage = stage;
                if seen.insert(id) {
                    changed.push(id);
                }
            }
        }
        drop(records);
        self.finished(ended);
        Ok(changed)
    }

    /// Stores the records `changed` names as they stand now, drops the stored subscriptions of
    /// `ended` deliveries, and adds `extra` (a read model's log position), all in one commit:
    /// a restarted service reads each delivery where it stood at the position it resumes from.
    pub async fn persist(&self, changed: &[DeliveryId], ended: &[DeliveryId], mut extra: Batch) -> Result<(), Error> {
        let stored = {
            let records = self.records.read();
            for id in changed {
                if let Some(record) = records.get(id) {
                    extra.put_versioned(&self.store.records, &crate::store::id_key(*id), record, version(record))?;
                }
            }
            for id in ended {
                extra.delete(&self.store.subscriptions, &crate::store::id_key(*id));
            }
            if extra.is_empty() {
                return Ok(());
            }
            self.store.records.enqueue(extra)
        };
        stored.await?;
        self.let_go_finished();
        Ok(())
    }

    /// Subscribes `sub` to a delivery's stage changes from now on, durably.
    pub async fn subscribe_notifications(&self, id: DeliveryId, sub: crate::notify::Subscription) -> Result<(), Error> {
        sub.validate()?;
        let record = self.lookup(id)?.ok_or(Error::NotFound { what: "delivery", id })?;
        if record.stage.is_terminal() {
            return Err(events::Error::InvalidTransition { delivery: id, reason: "the delivery is finished" }.into());
        }
        // On a shared store another node may hold subscriptions to it too: they are kept.
        let others = if self.store.subscriptions.is_shared() {
            self.store.subscriptions.get::<Vec<crate::notify::Subscription>>(&crate::store::id_key(id))?
        } else {
            None
        };
        let stored = {
            let mut subs = self.subscriptions.write();
            let list = subs.entry(id).or_default();
            for other in others.into_iter().flatten() {
                if !list.contains(&other) {
                    list.push(other);
                }
            }
            if list.contains(&sub) {
                return Ok(());
            }
            let limit = self.limits.subscriptions_per_delivery;
            if list.len() >= limit {
                events::limits::refused(events::limits::Table::Subscriptions, 1);
                return Err(events::Error::LimitReached {
                    what: "notification subscriptions of a delivery ([services] max_subscriptions_per_delivery)",
                    limit: limit as u64,
                }
                .into());
            }
            list.push(sub);
            let mut batch = Batch::new();
            batch.put(&self.store.subscriptions, &crate::store::id_key(id), list)?;
            self.store.subscriptions.enqueue(batch)
        };
        stored.await?;
        Ok(())
    }

    /// Queues (durably) the notifications a batch of delivery events causes. Returns the
    /// deliveries that finished with subscribers: their subscriptions are dropped from memory
    /// here and from the store by [`Self::persist`].
    ///
    /// On a shared store the subscriptions of the batch's deliveries are read from it (another
    /// node may have taken them), and every node queues what is due: each notification is
    /// queued under its id and destination, which a queue the nodes share (JetStream) stores
    /// once. (A copy a killed notifier had leased is then sent when its visibility timeout
    /// runs out.)
    pub async fn notify(&self, batch: &DeliveryBatch) -> Result<Vec<DeliveryId>, Error> {
        let shared = if self.store.subscriptions.is_shared() { self.stored_subscriptions(batch)? } else { None };
        let due = {
            let subs = self.subscriptions.read();
            let subs = shared.as_ref().unwrap_or(&subs);
            if subs.is_empty() {
                return Ok(Vec::new());
            }
            crate::notify::notifications_for(batch, |id| subs.get(&id).cloned().unwrap_or_default())
        };
        let mut ended = Vec::new();
        for n in &due {
            let payload = serde_json::to_vec(n).map_err(|e| Error::BadRequest(e.to_string()))?;
            if shared.is_some() {
                let once = format!(
                    "{}-{}-{}",
                    n.id(),
                    n.to.sms.as_deref().unwrap_or_default(),
                    n.to.email.as_deref().unwrap_or_default()
                );
                self.fleet.enqueue_once(QueueName::Notifications, n.delivery_id, once, payload).await?;
            } else {
                // One node: a copy queued again after a crash is sent at once, while the first
                // copy, leased by the killed notifier, waits out its visibility timeout.
                self.fleet.enqueue(QueueName::Notifications, n.delivery_id, payload).await?;
            }
            if n.stage.is_terminal() && !ended.contains(&n.delivery_id) {
                ended.push(n.delivery_id);
            }
        }
        if !ended.is_empty() {
            let mut subs = self.subscriptions.write();
            for id in &ended {
                subs.remove(id);
            }
        }
        Ok(ended)
    }

    /// The subscriptions the shared store holds for the deliveries `batch` changes (none when
    /// nothing in it can notify).
    fn stored_subscriptions(
        &self,
        batch: &DeliveryBatch,
    ) -> Result<Option<FxHashMap<DeliveryId, Vec<crate::notify::Subscription>>>, Error> {
        let ids: Vec<DeliveryId> = batch
            .events()
            .iter()
            .filter(|e| e.stage.to_stage() != DeliveryStage::Created)
            .map(|e| e.delivery_id.to_native())
            .collect();
        if ids.is_empty() {
            return Ok(None);
        }
        Ok(Some(stored_by_id(&self.store.subscriptions, ids)?.into_iter().collect()))
    }

    /// The public routes.
    pub fn public_router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/deliveries/{id}", get(get_delivery::<F>))
            .route("/v1/deliveries/{id}/notifications", post(subscribe_notifications::<F>))
            .with_state(self.clone())
    }

    /// The internal routes.
    pub fn internal_router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/internal/v1/deliveries/{id}", get(get_record::<F>).put(put_record::<F>).delete(delete_record::<F>))
            .with_state(self.clone())
    }
}

/// Seconds to fly from `from` through `via` (when not yet picked up) to `to`.
fn eta_s(from: GeoPoint, via: Option<GeoPoint>, to: GeoPoint) -> u64 {
    let legs = match via {
        Some(v) => crate::drones::distance_km(from, v) + crate::drones::distance_km(v, to),
        None => crate::drones::distance_km(from, to),
    };
    (legs * 1000.0 / CRUISE_M_PER_S).round() as u64
}

/// Where a delivery stands: its record, stage, ETA (`eta_s`) and its drone's live state (`drone`).
#[utoipa::path(
    get, path = "/v1/deliveries/{id}", tag = "deliveries",
    params(("id" = u64, Path, description = "delivery id")),
    responses(
        (status = 200, description = "the delivery, with `eta_s` and `drone` beside the record's fields", body = DeliveryRecord),
        (status = 404, description = "no such delivery", body = crate::error::ErrorBody),
    )
)]
async fn get_delivery<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<DeliveryService<F>>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let record = svc.lookup(id)?.ok_or(Error::NotFound { what: "delivery", id })?;
    caller.check_delivery(&record.owner, id)?;
    let drone = svc.fleet.drone(record.drone_id).await?;
    let eta = match (record.stage, &drone) {
        (DeliveryStage::Created | DeliveryStage::Rescheduled | DeliveryStage::HeadedToPickup, Some(d)) => {
            Some(eta_s(d.position, Some(record.pickup), record.dropoff))
        }
        (DeliveryStage::InTransit, Some(d)) => Some(eta_s(d.position, None, record.dropoff)),
        _ => None,
    };
    Ok(Json(serde_json::json!({
        "delivery_id": record.delivery_id,
        "owner": record.owner,
        "stage": record.stage,
        "drone_id": record.drone_id,
        "pickup": record.pickup,
        "dropoff": record.dropoff,
        "package": record.package,
        "created_us": record.created_us,
        "updated_us": record.updated_us,
        "eta_s": eta,
        "drone": drone,
    })))
}

/// Be told of each stage change by SMS and/or email.
#[utoipa::path(
    post, path = "/v1/deliveries/{id}/notifications", tag = "deliveries",
    params(("id" = u64, Path, description = "delivery id")),
    request_body = crate::notify::Subscription,
    responses(
        (status = 201, description = "subscribed"),
        (status = 400, description = "not a phone number or email address", body = crate::error::ErrorBody),
        (status = 404, description = "no such delivery", body = crate::error::ErrorBody),
        (status = 409, description = "the delivery is finished (`invalid_transition`), or holds its most subscriptions (`limit_reached`)", body = crate::error::ErrorBody),
    )
)]
async fn subscribe_notifications<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<DeliveryService<F>>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    ApiJson(sub): ApiJson<crate::notify::Subscription>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let record = svc.lookup(id)?.ok_or(Error::NotFound { what: "delivery", id })?;
    caller.check_delivery(&record.owner, id)?;
    svc.subscribe_notifications(id, sub.clone()).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "delivery_id": id, "sms": sub.sms, "email": sub.email }))))
}

async fn put_record<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<DeliveryService<F>>>,
    Path(id): Path<String>,
    ApiJson(record): ApiJson<DeliveryRecord>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    if record.delivery_id != id {
        return Err(Error::BadRequest(format!("the record is of delivery {}, not {id}", record.delivery_id)));
    }
    let fresh = svc.put(record).await?;
    let record = svc.lookup(id)?.ok_or(Error::NotFound { what: "delivery", id })?;
    Ok((if fresh { StatusCode::CREATED } else { StatusCode::OK }, Json(record)))
}

async fn get_record<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<DeliveryService<F>>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    svc.lookup(id)?.map(Json).ok_or(Error::NotFound { what: "delivery", id })
}

async fn delete_record<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<DeliveryService<F>>>,
    Path(id): Path<String>,
) -> Result<StatusCode, Error> {
    let id = parse_id(&id)?;
    svc.remove(id).await?;
    Ok(StatusCode::NO_CONTENT)
}
