//! Delivery Scheduler: the public API that schedules, reschedules and cancels deliveries.
//!
//! Scheduling is a saga over the internal services, run synchronously, each step an idempotent
//! PUT of a resource named by the new delivery's id (so a retried step never makes a second
//! one):
//!
//! ```text
//!  1 Accounts          GET  /internal/v1/accounts/{owner}        owner exists and may order
//!  2 Package           PUT  /internal/v1/packages/{id}           ┐ 2 and 3 at once
//!  3 Drone Management  PUT  /internal/v1/assignments/{id}        │
//!  4 Delivery          PUT  /internal/v1/deliveries/{id}         │ 4 and 5 at once
//!  5 engine            Create on the drone's shard               │ undone in reverse order
//!  6 drone-commands    the mission, keyed by drone               ┘ if a later step fails
//! ```
//!
//! Steps that do not depend on each other run concurrently, so a schedule waits for three
//! durable writes in a row (one of 2/3, one of 4/5, then 6), not five.
//!
//! If a step fails, the steps already done are compensated (DELETE, or a Cancel command for
//! the engine) and the caller gets an error naming the failed dependency (`503
//! dependency_failed`, `"dependency": "package"`). A compensation that cannot be made is
//! logged and counted (`fleetstream_scheduler_compensation_failures_total`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{patch, post};
use axum::{Extension, Json, Router};
use events::{
    DeliveryCommand, DeliveryId, DeliveryStage, DroneId, FleetControl, Mission, QueueName, TraceContext, WorkQueues,
};

use crate::Error;
use crate::api::{ApiJson, parse_id};
use crate::client::{Call, Dependency, Reply};
use crate::deliveries::DeliveryRecord;
use crate::drones::{AssignRequest, Assignment};
use crate::state::{CreateDelivery, Reschedule, validate};

/// The internal services the scheduler calls.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Accounts.
    pub accounts: Dependency,
    /// Package.
    pub packages: Dependency,
    /// Delivery.
    pub deliveries: Dependency,
    /// Drone Management.
    pub drones: Dependency,
    /// Delivery History in another process, told who ordered each delivery (in one process the
    /// scheduler writes the note itself).
    pub history: Option<Dependency>,
}

impl Deps {
    /// Every dependency, for metrics.
    pub fn all(&self) -> Vec<&Dependency> {
        let mut all = vec![&self.accounts, &self.packages, &self.deliveries, &self.drones];
        all.extend(self.history.as_ref());
        all
    }
}

/// A scheduled delivery, as `POST /v1/deliveries` answers.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Scheduled {
    /// The new delivery.
    pub delivery_id: DeliveryId,
    /// The drone assigned to it.
    pub drone_id: DroneId,
    /// Its stage: `created`.
    pub stage: DeliveryStage,
}

/// The Delivery Scheduler.
#[derive(Debug)]
pub struct Scheduler<F> {
    fleet: F,
    deps: Deps,
    ids: crate::ids::Allocator,
    pub(crate) keys: crate::idempotency::Keys,
    history: Option<Arc<crate::history::History>>,
    /// Deliveries scheduled.
    pub scheduled: AtomicU64,
    /// Requests refused.
    pub refused: AtomicU64,
    /// Compensations that could not be made.
    pub compensation_failures: AtomicU64,
}

/// A call that must succeed with a 2xx; a failure or an unexpected answer names the dependency.
async fn call(dep: &Dependency, c: Call) -> Result<Reply, Error> {
    let reply = dep.call(c).await.map_err(|e| Error::Dependency { service: dep.name(), reason: e.to_string() })?;
    if reply.status.is_success() {
        return Ok(reply);
    }
    let message = serde_json::from_slice::<serde_json::Value>(&reply.body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_default();
    Err(Error::Dependency { service: dep.name(), reason: format!("answered {}: {message}", reply.status) })
}

/// What the saga has done so far, to undo on failure.
#[derive(Default)]
struct Done {
    package: bool,
    assignment: bool,
    record: bool,
    engine: Option<DroneId>,
}

impl<F: FleetControl + WorkQueues> Scheduler<F> {
    /// A scheduler driving `fleet` (engine commands, missions) through `deps`, taking delivery
    /// ids from an in-memory counter started from the clock ([`Scheduler::with_ids`] for a
    /// durable, shared one).
    pub fn new(fleet: F, deps: Deps) -> Self {
        Self {
            fleet,
            deps,
            ids: crate::ids::Allocator::new(crate::ids::ClockIdBlocks::new()),
            keys: crate::idempotency::Keys::default(),
            history: None,
            scheduled: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            compensation_failures: AtomicU64::new(0),
        }
    }

    /// Takes delivery ids from `blocks` (see [`crate::ids`]): unique across restarts and nodes.
    pub fn with_ids(mut self, blocks: std::sync::Arc<dyn crate::ids::IdBlocks>) -> Self {
        self.ids = crate::ids::Allocator::new(blocks);
        self
    }

    /// Remembers `Idempotency-Key`s in `keys` (for example kept in a store) instead of memory.
    pub fn with_keys(mut self, keys: crate::idempotency::Keys) -> Self {
        self.keys = keys;
        self
    }

    /// Tells `history` who ordered each delivery scheduled from now on (for its owner queries).
    pub fn with_history(mut self, history: Arc<crate::history::History>) -> Self {
        self.history = Some(history);
        self
    }

    /// The dependencies, for metrics.
    pub fn deps(&self) -> &Deps {
        &self.deps
    }

    /// Schedules a delivery (the saga in the module docs).
    pub async fn schedule(&self, req: CreateDelivery, trace: TraceContext) -> Result<DeliveryRecord, Error> {
        validate(&req)?;
        self.check_account(&req.owner, &trace).await?;
        let delivery_id = self.ids.next().await?;
        let mut done = Done::default();
        match self.schedule_steps(delivery_id, req, trace, &mut done).await {
            Ok(record) => {
                self.scheduled.fetch_add(1, Ordering::Relaxed);
                Ok(record)
            }
            Err(error) => {
                self.compensate(delivery_id, &done).await;
                Err(error)
            }
        }
    }

    async fn check_account(&self, owner: &str, trace: &TraceContext) -> Result<(), Error> {
        crate::accounts::valid_owner(owner)?;
        let accounts = &self.deps.accounts;
        let reply = accounts
            .call(Call::new(Method::GET, format!("/internal/v1/accounts/{owner}")).traced(trace))
            .await
            .map_err(|e| Error::Dependency { service: accounts.name(), reason: e.to_string() })?;
        if reply.status == StatusCode::NOT_FOUND {
            return Err(Error::UnknownAccount(owner.to_string()));
        }
        if !reply.status.is_success() {
            return Err(Error::Dependency { service: accounts.name(), reason: format!("answered {}", reply.status) });
        }
        let account: crate::accounts::Account =
            reply.json().map_err(|e| Error::Dependency { service: accounts.name(), reason: e.to_string() })?;
        if !account.may_order {
            return Err(Error::AccountNotAllowed(owner.to_string()));
        }
        Ok(())
    }

    async fn schedule_steps(
        &self,
        id: DeliveryId,
        req: CreateDelivery,
        trace: TraceContext,
        done: &mut Done,
    ) -> Result<DeliveryRecord, Error> {
        let now = events::now_us();
        // The package and the drone do not depend on each other: ask for both at once.
        let package = call(
            &self.deps.packages,
            Call::json(Method::PUT, format!("/internal/v1/packages/{id}"), &req.package).traced(&trace),
        );
        let (package, assignment) = tokio::join!(package, self.assign(id, req.pickup, &trace));
        done.package = package.is_ok();
        done.assignment = assignment.is_ok();
        package?;
        let drone_id = assignment?;

        let record = DeliveryRecord {
            delivery_id: id,
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
        // The record and the engine's delivery at once too: the engine's Created event finds
        // the record either way (the record starts at Created), and the drone is told to fly
        // only once both exist.
        let put_record = call(
            &self.deps.deliveries,
            Call::json(Method::PUT, format!("/internal/v1/deliveries/{id}"), &record).traced(&trace),
        );
        let cmd = DeliveryCommand::Create {
            delivery_id: id,
            drone_id,
            pickup: record.pickup,
            dropoff: record.dropoff,
            ts_us: now,
        };
        let (put_record, created) = tokio::join!(put_record, self.fleet.command_traced(cmd, trace));
        done.record = put_record.is_ok();
        if created.is_ok() {
            done.engine = Some(drone_id);
        }
        put_record?;
        created?;
        if let Some(history) = &self.history {
            history.note_delivery(id, &record.owner, now)?;
        }
        if let Some(history) = &self.deps.history {
            let note = crate::history::OwnerNote { owner: record.owner.clone(), created_us: now };
            call(history, Call::json(Method::PUT, format!("/internal/v1/history/owners/{id}"), &note).traced(&trace))
                .await?;
        }

        // The mission goes to the drone through the drone-commands queue: delivered over the
        // drone's own connection, acknowledged by it, redelivered if it reconnects first.
        let mission =
            Mission { delivery_id: id, drone_id, pickup: record.pickup, dropoff: record.dropoff, ts_us: now, trace };
        self.fleet.enqueue(QueueName::DroneCommands, drone_id, mission.to_bytes()).await?;
        Ok(record)
    }

    /// Step 3: a drone from Drone Management.
    async fn assign(&self, id: DeliveryId, pickup: events::GeoPoint, trace: &TraceContext) -> Result<DroneId, Error> {
        let drones = &self.deps.drones;
        let path = format!("/internal/v1/assignments/{id}");
        let reply = drones
            .call(Call::json(Method::PUT, path, &AssignRequest { pickup }).traced(trace))
            .await
            .map_err(|e| Error::Dependency { service: drones.name(), reason: e.to_string() })?;
        if reply.status == StatusCode::CONFLICT {
            return Err(Error::NoDroneAvailable);
        }
        if !reply.status.is_success() {
            return Err(Error::Dependency { service: drones.name(), reason: format!("answered {}", reply.status) });
        }
        let assignment: Assignment =
            reply.json().map_err(|e| Error::Dependency { service: drones.name(), reason: e.to_string() })?;
        Ok(assignment.drone_id)
    }

    /// Undoes what a failed schedule did, newest first.
    async fn compensate(&self, id: DeliveryId, done: &Done) {
        if let Some(drone_id) = done.engine {
            let cancel = DeliveryCommand::Cancel { delivery_id: id, drone_id, ts_us: events::now_us() };
            if let Err(error) = self.fleet.command(cancel).await {
                self.compensation_failed(id, "engine", &error.to_string());
            }
        }
        let undo = [
            (done.record, &self.deps.deliveries, format!("/internal/v1/deliveries/{id}")),
            (done.assignment, &self.deps.drones, format!("/internal/v1/assignments/{id}")),
            (done.package, &self.deps.packages, format!("/internal/v1/packages/{id}")),
        ];
        for (was_done, dep, path) in undo {
            if was_done && let Err(error) = call(dep, Call::new(Method::DELETE, path)).await {
                self.compensation_failed(id, dep.name(), &error.to_string());
            }
        }
    }

    fn compensation_failed(&self, id: DeliveryId, step: &str, error: &str) {
        self.compensation_failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(delivery_id = id, step, error, "could not undo a step of a failed schedule");
    }

    /// [`Scheduler::schedule`] under an `Idempotency-Key`: the first request with the key runs,
    /// a retry gets its result (`true`: replayed).
    pub async fn schedule_once(
        &self,
        key: &str,
        req: CreateDelivery,
        trace: TraceContext,
    ) -> Result<(DeliveryRecord, bool), Error> {
        use crate::idempotency::{Begin, MAX_KEY_LEN};
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(Error::BadRequest(format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} characters")));
        }
        match self.keys.begin(key, &req).await {
            Begin::Replay(record) => return Ok((record, true)),
            Begin::Mismatch => return Err(Error::KeyReused),
            Begin::Run => {}
        }
        let outcome = self.schedule(req.clone(), trace).await;
        self.keys.finish(key, &req, outcome.as_ref().ok().cloned()).await?;
        outcome.map(|r| (r, false))
    }

    async fn record(&self, id: DeliveryId, trace: &TraceContext) -> Result<DeliveryRecord, Error> {
        let dep = &self.deps.deliveries;
        let reply = dep
            .call(Call::new(Method::GET, format!("/internal/v1/deliveries/{id}")).traced(trace))
            .await
            .map_err(|e| Error::Dependency { service: dep.name(), reason: e.to_string() })?;
        if reply.status == StatusCode::NOT_FOUND {
            return Err(Error::NotFound { what: "delivery", id });
        }
        if !reply.status.is_success() {
            return Err(Error::Dependency { service: dep.name(), reason: format!("answered {}", reply.status) });
        }
        reply.json().map_err(|e| Error::Dependency { service: dep.name(), reason: e.to_string() })
    }

    /// Moves a delivery that has not been picked up yet to new places: the engine applies it
    /// on the drone's shard (and derives `Rescheduled`), the drone gets the updated mission,
    /// and the record is updated. The engine's refusal (already picked up, finished) is `409`.
    pub async fn reschedule(
        &self,
        id: DeliveryId,
        req: Reschedule,
        trace: TraceContext,
    ) -> Result<DeliveryRecord, Error> {
        let mut record = self.record(id, &trace).await?;
        if record.stage.is_terminal() {
            return Err(events::Error::InvalidTransition { delivery: id, reason: "the delivery is finished" }.into());
        }
        let pickup = req.pickup.unwrap_or(record.pickup);
        let dropoff = req.dropoff.unwrap_or(record.dropoff);
        for (name, p) in [("pickup", &pickup), ("dropoff", &dropoff)] {
            if !p.is_valid() {
                return Err(Error::BadRequest(format!(
                    "{name} is not a valid coordinate (lat -90..90, lon -180..180)"
                )));
            }
        }
        let drone_id = record.drone_id;
        let now = events::now_us();
        self.fleet
            .command_traced(
                DeliveryCommand::Reschedule { delivery_id: id, drone_id, pickup, dropoff, ts_us: now },
                trace,
            )
            .await?;
        let mission = Mission { delivery_id: id, drone_id, pickup, dropoff, ts_us: now, trace };
        self.fleet.enqueue(QueueName::DroneCommands, drone_id, mission.to_bytes()).await?;
        record.pickup = pickup;
        record.dropoff = dropoff;
        let put = Call::json(Method::PUT, format!("/internal/v1/deliveries/{id}"), &record).traced(&trace);
        call(&self.deps.deliveries, put).await?;
        Ok(record)
    }

    /// Cancels a delivery that has not been completed: the engine derives `Cancelled`, which
    /// frees the drone. Cancelling a cancelled delivery again changes nothing.
    pub async fn cancel(&self, id: DeliveryId, trace: TraceContext) -> Result<DeliveryRecord, Error> {
        let record = self.record(id, &trace).await?;
        match record.stage {
            DeliveryStage::Cancelled => return Ok(record),
            DeliveryStage::DeliveryComplete => {
                return Err(
                    events::Error::InvalidTransition { delivery: id, reason: "the delivery is complete" }.into()
                );
            }
            _ => {}
        }
        let cmd = DeliveryCommand::Cancel { delivery_id: id, drone_id: record.drone_id, ts_us: events::now_us() };
        self.fleet.command_traced(cmd, trace).await?;
        Ok(record)
    }

    /// The public routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/deliveries", post(create_delivery::<F>))
            .route("/v1/deliveries/{id}", patch(reschedule_delivery::<F>).delete(cancel_delivery::<F>))
            .with_state(self.clone())
    }
}

/// The request's span (set by [`crate::trace::propagate`]); a new trace when the router runs
/// without that layer.
fn span(trace: Option<Extension<TraceContext>>) -> TraceContext {
    trace.map_or_else(TraceContext::new_root, |Extension(t)| t)
}

/// Schedule a delivery.
#[utoipa::path(
    post, path = "/v1/deliveries", tag = "deliveries",
    request_body = CreateDelivery,
    params(("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key returns the first result")),
    responses(
        (status = 201, description = "scheduled", body = Scheduled),
        (status = 400, description = "malformed request", body = crate::error::ErrorBody),
        (status = 403, description = "the account may not order", body = crate::error::ErrorBody),
        (status = 422, description = "unknown account, or an Idempotency-Key reused for another request", body = crate::error::ErrorBody),
        (status = 503, description = "no drone free, or a dependency failed (`dependency` names it)", body = crate::error::ErrorBody),
    )
)]
async fn create_delivery<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<Scheduler<F>>>,
    trace: Option<Extension<TraceContext>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateDelivery>,
) -> Result<impl IntoResponse, Error> {
    let trace = span(trace);
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(v.to_str().map_err(|_| Error::BadRequest("Idempotency-Key must be visible ASCII".into()))?),
        None => None,
    };
    // The saga runs in a task of its own: a client that goes away mid-request must not stop it
    // between two steps (its undo steps would never run, and its Idempotency-Key would stay
    // claimed); it is carried to its end and its key answers retries.
    let key = key.map(str::to_string);
    let saga = {
        let svc = svc.clone();
        tokio::spawn(async move {
            match key {
                Some(key) => svc.schedule_once(&key, req, trace).await,
                None => svc.schedule(req, trace).await.map(|r| (r, false)),
            }
        })
    };
    let outcome = saga.await.map_err(|e| Error::Dependency { service: "scheduler", reason: e.to_string() })?;
    match outcome {
        Ok((record, replayed)) => Ok((
            StatusCode::CREATED,
            [("idempotent-replayed", if replayed { "true" } else { "false" })],
            Json(Scheduled { delivery_id: record.delivery_id, drone_id: record.drone_id, stage: record.stage }),
        )),
        Err(e) => {
            svc.refused.fetch_add(1, Ordering::Relaxed);
            Err(e)
        }
    }
}

/// Reschedule a delivery that has not been picked up.
#[utoipa::path(
    patch, path = "/v1/deliveries/{id}", tag = "deliveries",
    params(("id" = u64, Path, description = "delivery id")),
    request_body = Reschedule,
    responses(
        (status = 200, description = "rescheduled; the drone gets the new mission"),
        (status = 404, description = "no such delivery", body = crate::error::ErrorBody),
        (status = 409, description = "already picked up or finished", body = crate::error::ErrorBody),
    )
)]
async fn reschedule_delivery<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<Scheduler<F>>>,
    Path(id): Path<String>,
    trace: Option<Extension<TraceContext>>,
    ApiJson(req): ApiJson<Reschedule>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let record = svc.reschedule(id, req, span(trace)).await?;
    Ok(Json(serde_json::json!({
        "delivery_id": record.delivery_id,
        "pickup": record.pickup,
        "dropoff": record.dropoff,
    })))
}

/// Cancel a delivery that is not complete.
#[utoipa::path(
    delete, path = "/v1/deliveries/{id}", tag = "deliveries",
    params(("id" = u64, Path, description = "delivery id")),
    responses(
        (status = 202, description = "cancelling: the stage becomes `cancelled`"),
        (status = 404, description = "no such delivery", body = crate::error::ErrorBody),
        (status = 409, description = "already complete", body = crate::error::ErrorBody),
    )
)]
async fn cancel_delivery<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<Scheduler<F>>>,
    Path(id): Path<String>,
    trace: Option<Extension<TraceContext>>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let record = svc.cancel(id, span(trace)).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "delivery_id": record.delivery_id, "cancelling": true }))))
}
