//! The services' state: the read model of deliveries and the registry of drones.
//!
//! The read model is fed by the delivery-events stream ([`Services::apply_delivery_events`]),
//! which is also what frees a drone: a drone becomes available again only once the engine has
//! derived its delivery's completion or cancellation, so the registry never hands out a drone
//! the engine still considers busy.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use events::{
    DeliveryBatch, DeliveryCommand, DeliveryId, DeliveryStage, DroneId, FleetControl, GeoPoint, Mission, QueueName,
    WorkQueues,
};
use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::Error;

/// What a customer sends to schedule a delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDelivery {
    /// The ordering account.
    pub owner: String,
    /// Where the package is collected.
    pub pickup: GeoPoint,
    /// Where it goes.
    pub dropoff: GeoPoint,
    /// The package.
    pub package: Package,
}

/// What a customer sends to reschedule: new places (either may be left out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reschedule {
    /// New pickup point.
    #[serde(default)]
    pub pickup: Option<GeoPoint>,
    /// New drop-off point.
    #[serde(default)]
    pub dropoff: Option<GeoPoint>,
}

/// A package's description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    /// Size class: `small`, `medium` or `large`.
    pub size: String,
    /// Weight in kilograms.
    pub weight_kg: f32,
    /// Free-form tag.
    #[serde(default)]
    pub tag: Option<String>,
}

/// The services' view of one delivery.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    #[serde(skip)]
    last_seq: Option<u32>,
}

#[derive(Debug, Default)]
struct Registry {
    /// Registered drones and the delivery each flies.
    drones: FxHashMap<DroneId, Option<DeliveryId>>,
    /// Free drones, oldest-freed first.
    free: VecDeque<DroneId>,
}

/// Shared state of the HTTP services.
#[derive(Debug)]
pub struct Services<F> {
    pub(crate) fleet: F,
    deliveries: RwLock<FxHashMap<DeliveryId, DeliveryRecord>>,
    registry: Mutex<Registry>,
    next_id: AtomicU64,
    pub(crate) scheduled: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) keys: crate::idempotency::Keys,
    history: Option<std::sync::Arc<crate::history::History>>,
    subscriptions: RwLock<FxHashMap<DeliveryId, Vec<crate::notify::Subscription>>>,
}

impl<F: FleetControl + WorkQueues> Services<F> {
    /// Services driving `fleet`. Delivery ids start at the current time in microseconds, so ids
    /// stay unique across restarts without a stored counter.
    pub fn new(fleet: F) -> Self {
        Self {
            fleet,
            deliveries: RwLock::default(),
            registry: Mutex::default(),
            next_id: AtomicU64::new(events::now_us()),
            scheduled: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            keys: crate::idempotency::Keys::default(),
            history: None,
            subscriptions: RwLock::default(),
        }
    }

    /// Tells `history` who ordered each delivery scheduled from now on (for its owner queries).
    pub fn with_history(mut self, history: std::sync::Arc<crate::history::History>) -> Self {
        self.history = Some(history);
        self
    }

    /// Registers drones as available (idempotent: a known drone keeps its state).
    pub fn register_drones(&self, ids: &[DroneId]) -> usize {
        let mut reg = self.registry.lock();
        let mut added = 0;
        for &id in ids {
            if let std::collections::hash_map::Entry::Vacant(slot) = reg.drones.entry(id) {
                slot.insert(None);
                reg.free.push_back(id);
                added += 1;
            }
        }
        added
    }

    /// Schedules a delivery: takes a free drone, has the engine create the delivery on that
    /// drone's shard, and records it. On any failure the drone is released and nothing remains.
    pub async fn schedule(&self, req: CreateDelivery) -> Result<DeliveryRecord, Error> {
        validate(&req)?;
        let delivery_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let drone_id = self.take_drone(delivery_id).ok_or(Error::NoDroneAvailable)?;
        let now = events::now_us();
        let record = DeliveryRecord {
            delivery_id,
            owner: req.owner,
            drone_id,
            pickup: req.pickup,
            dropoff: req.dropoff,
            package: req.package,
            stage: DeliveryStage::Created,
            created_us: now,
            updated_us: now,
            last_seq: None,
        };
        // Record first, so the Created event finds its record whichever arrives first.
        self.deliveries.write().insert(delivery_id, record.clone());
        if let Some(history) = &self.history
            && let Err(error) = history.note_delivery(delivery_id, &record.owner, now)
        {
            self.deliveries.write().remove(&delivery_id);
            self.release_drone(drone_id, delivery_id);
            return Err(error);
        }
        let cmd = DeliveryCommand::Create {
            delivery_id,
            drone_id,
            pickup: record.pickup,
            dropoff: record.dropoff,
            ts_us: now,
        };
        if let Err(error) = self.fleet.command(cmd).await {
            self.deliveries.write().remove(&delivery_id);
            self.release_drone(drone_id, delivery_id);
            return Err(error.into());
        }
        // The mission goes to the drone through the drone-commands queue: delivered over the
        // drone's own connection, acknowledged by it, redelivered if it reconnects first.
        let mission = Mission { delivery_id, drone_id, pickup: record.pickup, dropoff: record.dropoff, ts_us: now };
        if let Err(error) = self.fleet.enqueue(QueueName::DroneCommands, drone_id, mission.to_bytes()).await {
            // Undo the delivery so nothing half-made remains: the engine cancels it, the record
            // goes and the drone is free again.
            let cancel = DeliveryCommand::Cancel { delivery_id, drone_id, ts_us: events::now_us() };
            if let Err(undo) = self.fleet.command(cancel).await {
                tracing::error!(delivery_id, %undo, "could not cancel a delivery whose mission was not queued");
            }
            self.deliveries.write().remove(&delivery_id);
            self.release_drone(drone_id, delivery_id);
            return Err(error.into());
        }
        self.scheduled.fetch_add(1, Ordering::Relaxed);
        Ok(record)
    }

    /// Moves a delivery that has not been picked up yet to new places: the engine applies it
    /// on the drone's shard (and derives `Rescheduled`), then the drone gets the updated mission
    /// through drone-commands. The engine's refusal (already picked up, finished) is the
    /// caller's `409`.
    pub async fn reschedule(&self, id: DeliveryId, req: Reschedule) -> Result<DeliveryRecord, Error> {
        let current = self.delivery(id).ok_or(Error::NotFound { what: "delivery", id })?;
        if current.stage.is_terminal() {
            return Err(events::Error::InvalidTransition { delivery: id, reason: "the delivery is finished" }.into());
        }
        let pickup = req.pickup.unwrap_or(current.pickup);
        let dropoff = req.dropoff.unwrap_or(current.dropoff);
        for (name, p) in [("pickup", &pickup), ("dropoff", &dropoff)] {
            if !p.is_valid() {
                return Err(Error::BadRequest(format!(
                    "{name} is not a valid coordinate (lat -90..90, lon -180..180)"
                )));
            }
        }
        let drone_id = current.drone_id;
        let now = events::now_us();
        self.fleet
            .command(DeliveryCommand::Reschedule { delivery_id: id, drone_id, pickup, dropoff, ts_us: now })
            .await?;
        let mission = Mission { delivery_id: id, drone_id, pickup, dropoff, ts_us: now };
        self.fleet.enqueue(QueueName::DroneCommands, drone_id, mission.to_bytes()).await?;
        let mut deliveries = self.deliveries.write();
        let record = deliveries.get_mut(&id).ok_or(Error::NotFound { what: "delivery", id })?;
        record.pickup = pickup;
        record.dropoff = dropoff;
        Ok(record.clone())
    }

    /// Cancels a delivery that has not been completed: the engine derives `Cancelled`, which
    /// frees the drone. Cancelling a cancelled delivery again changes nothing.
    pub async fn cancel(&self, id: DeliveryId) -> Result<DeliveryRecord, Error> {
        let current = self.delivery(id).ok_or(Error::NotFound { what: "delivery", id })?;
        match current.stage {
            DeliveryStage::Cancelled => return Ok(current),
            DeliveryStage::DeliveryComplete => {
                return Err(
                    events::Error::InvalidTransition { delivery: id, reason: "the delivery is complete" }.into()
                );
            }
            _ => {}
        }
        let cmd = DeliveryCommand::Cancel { delivery_id: id, drone_id: current.drone_id, ts_us: events::now_us() };
        self.fleet.command(cmd).await?;
        Ok(current)
    }

    /// [`Services::schedule`] under an `Idempotency-Key`: the first request with the key runs,
    /// a retry gets its result (`true`: replayed).
    pub async fn schedule_once(&self, key: &str, req: CreateDelivery) -> Result<(DeliveryRecord, bool), Error> {
        use crate::idempotency::{Begin, MAX_KEY_LEN};
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(Error::BadRequest(format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} characters")));
        }
        match self.keys.begin(key, &req).await {
            Begin::Replay(record) => return Ok((record, true)),
            Begin::Mismatch => return Err(Error::KeyReused),
            Begin::Run => {}
        }
        let outcome = self.schedule(req.clone()).await;
        self.keys.finish(key, &req, outcome.as_ref().ok().cloned());
        outcome.map(|r| (r, false))
    }

    /// Subscribes `sub` to a delivery's stage changes from now on.
    pub fn subscribe_notifications(&self, id: DeliveryId, sub: crate::notify::Subscription) -> Result<(), Error> {
        sub.validate()?;
        let record = self.delivery(id).ok_or(Error::NotFound { what: "delivery", id })?;
        if record.stage.is_terminal() {
            return Err(events::Error::InvalidTransition { delivery: id, reason: "the delivery is finished" }.into());
        }
        let mut subs = self.subscriptions.write();
        let list = subs.entry(id).or_default();
        if !list.contains(&sub) {
            list.push(sub);
        }
        Ok(())
    }

    /// Queues the notifications a batch of delivery events causes; subscriptions of finished
    /// deliveries are dropped after their last notification.
    pub async fn notify(&self, batch: &DeliveryBatch) -> Result<(), Error> {
        let due = {
            let subs = self.subscriptions.read();
            if subs.is_empty() {
                return Ok(());
            }
            crate::notify::notifications_for(batch, |id| subs.get(&id).cloned().unwrap_or_default())
        };
        for n in &due {
            let payload = serde_json::to_vec(n).map_err(|e| Error::BadRequest(e.to_string()))?;
            self.fleet.enqueue(QueueName::Notifications, n.delivery_id, payload).await?;
            if n.stage.is_terminal() {
                self.subscriptions.write().remove(&n.delivery_id);
            }
        }
        Ok(())
    }

    /// The current record of a delivery.
    pub fn delivery(&self, id: DeliveryId) -> Option<DeliveryRecord> {
        self.deliveries.read().get(&id).cloned()
    }

    /// Updates the read model from a batch of the delivery-events stream. Repeats (same
    /// delivery, same or older seq) are ignored; a terminal stage frees the drone.
    pub fn apply_delivery_events(&self, batch: &DeliveryBatch) {
        let mut freed = Vec::new();
        {
            let mut deliveries = self.deliveries.write();
            for ev in batch.events().iter() {
                let id = ev.delivery_id.to_native();
                let seq = ev.seq.to_native();
                let Some(record) = deliveries.get_mut(&id) else { continue };
                if record.last_seq.is_some_and(|last| seq <= last) {
                    continue;
                }
                record.last_seq = Some(seq);
                record.stage = ev.stage.to_stage();
                record.updated_us = ev.ts_us.to_native();
                if record.stage.is_terminal() {
                    freed.push((record.drone_id, id));
                }
            }
        }
        for (drone, delivery) in freed {
            self.release_drone(drone, delivery);
        }
    }

    /// Registered drones and how many are free.
    pub fn fleet_size(&self) -> (usize, usize) {
        let reg = self.registry.lock();
        (reg.drones.len(), reg.free.len())
    }

    fn take_drone(&self, delivery: DeliveryId) -> Option<DroneId> {
        let mut reg = self.registry.lock();
        while let Some(id) = reg.free.pop_front() {
            if let Some(slot @ None) = reg.drones.get_mut(&id) {
                *slot = Some(delivery);
                return Some(id);
            }
        }
        None
    }

    fn release_drone(&self, drone: DroneId, delivery: DeliveryId) {
        let mut reg = self.registry.lock();
        if let Some(slot) = reg.drones.get_mut(&drone)
            && *slot == Some(delivery)
        {
            *slot = None;
            reg.free.push_back(drone);
        }
    }
}

fn validate(req: &CreateDelivery) -> Result<(), Error> {
    if req.owner.trim().is_empty() {
        return Err(Error::BadRequest("owner must not be empty".into()));
    }
    for (name, p) in [("pickup", &req.pickup), ("dropoff", &req.dropoff)] {
        if !p.is_valid() {
            return Err(Error::BadRequest(format!("{name} is not a valid coordinate (lat -90..90, lon -180..180)")));
        }
    }
    if !matches!(req.package.size.as_str(), "small" | "medium" | "large") {
        return Err(Error::BadRequest("package.size must be small, medium or large".into()));
    }
    if !(req.package.weight_kg.is_finite() && req.package.weight_kg > 0.0) {
        return Err(Error::BadRequest("package.weight_kg must be a positive number".into()));
    }
    Ok(())
}
