//! Delivery Scheduler: the public API that schedules, reschedules and cancels deliveries.
//!
//! Scheduling is a saga over the internal services, run synchronously, each step an idempotent
//! PUT of a resource named by the new delivery's id (so a retried step never makes a second
//! one), journaled (see [`crate::saga`]) so that a crash between two steps is carried to an end
//! at the next start:
//!
//! ```text
//!  1 Accounts          GET  /internal/v1/accounts/{owner}        owner exists and may order
//!  2 Drone Management  PUT  /internal/v1/assignments/{id}        a drone near the pickup
//!    journal           the schedule and its drone                ┐ at once (with stored
//!  3 Package           PUT  /internal/v1/packages/{id}           ┘ assignments, the schedule's
//!                                                                  start is journaled before 2)
//!  4 Delivery          PUT  /internal/v1/deliveries/{id}         ┐ 4 and 5 at once
//!  5 engine            Create on the drone's shard               ┘ undone if a later step fails
//!  6 drone-commands    the mission, keyed by drone
//!    journal           entry removed with the key's answer, in one commit
//! ```
//!
//! Steps that do not depend on each other run concurrently, so a schedule waits for three
//! durable writes in a row before its answer (the entry or package, the record or engine, the
//! mission), four with an `Idempotency-Key` (its answer is stored before it is given).
//!
//! If a step fails, the steps already done are compensated (DELETE, or a Cancel command for
//! the engine) and the caller gets an error naming the failed dependency (`503
//! dependency_failed`, `"dependency": "package"`). A compensation that cannot be made is
//! logged and counted (`fleetstream_scheduler_compensation_failures_total`), and its journal
//! entry stays for the next start.

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
use crate::auth::{Caller, Principal};
use crate::client::{Call, Dependency, Reply};
use crate::deliveries::DeliveryRecord;
use crate::drones::{AssignRequest, Assignment};
use crate::saga::{Journal, Saga, ScheduleStep, crash_point};
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
    journal: Journal,
    /// Operations that failed part-way while the node ran and could not be ended then (an
    /// undo or a step that failed): [`Scheduler::retry_left`] tries them again.
    left: parking_lot::Mutex<Vec<Saga>>,
    durable_assignments: bool,
    history: Option<Arc<crate::history::History>>,
    /// Where `scheduler.create` and each call it makes are recorded as spans of the delivery.
    spans: crate::spans::Spans,
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

/// Operations that failed part-way kept in memory for retrying, at most.
pub const MAX_LEFT: usize = 10_000;

/// How a step of a reschedule or cancel failed.
enum Step {
    /// Before anything changed (the engine refused it): the operation is over.
    Refused(Error),
    /// After something changed: the operation stays in the journal for recovery.
    Failed(Error),
}

impl Step {
    fn failed(e: events::Error) -> Self {
        Step::Failed(e.into())
    }
}

/// What [`Scheduler::start_recovery`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Operations completed (or found complete).
    pub completed: u64,
    /// Schedules undone.
    pub undone: u64,
    /// Operations that could not be finished (left for the next start).
    pub left: u64,
}

/// A DELETE that must succeed; one of something already gone (`404`) did what it should.
async fn delete(dep: &Dependency, path: String) -> Result<(), Error> {
    match call(dep, Call::new(Method::DELETE, path)).await {
        Err(Error::Dependency { reason, .. }) if reason.starts_with("answered 404") => Ok(()),
        other => other.map(|_| ()),
    }
}

/// How many times a schedule is tried when the engine refuses its drone as busy.
const BUSY_TRIES: u32 = 4;

/// What the saga has done so far, to undo on failure.
#[derive(Default)]
struct Done {
    package: bool,
    assignment: bool,
    record: bool,
    engine: Option<DroneId>,
    /// The engine refused the drone as busy with another delivery.
    busy: bool,
}

impl Done {
    /// Everything a schedule that got to `step` may have done, when nobody remembers what
    /// it did (recovery, a retried undo): every undo step is idempotent.
    fn possibly(step: &ScheduleStep) -> Self {
        match *step {
            // The record and the engine's delivery come only after the drone is journaled.
            ScheduleStep::Started => Done { package: true, assignment: true, ..Done::default() },
            ScheduleStep::Assigned { drone_id } => {
                Done { package: true, assignment: true, record: true, engine: Some(drone_id), busy: false }
            }
        }
    }
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
            journal: Journal::default(),
            left: parking_lot::Mutex::new(Vec::new()),
            durable_assignments: true,
            history: None,
            spans: crate::spans::Spans::off(),
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

    /// Keeps the `Idempotency-Key`s (the newest `capacity`, for `retention_s`) and the saga
    /// journal in `store`, a file of the scheduler's own (split mode; in one process they share
    /// the services' file).
    pub async fn with_store(
        self,
        store: &crate::store::Store,
        retention_s: u64,
        capacity: usize,
    ) -> Result<Self, Error> {
        let keys = crate::idempotency::Keys::open(store.namespace("idempotency-keys"), retention_s, capacity).await?;
        Ok(self.with_keys(keys).with_journal(store.local("sagas")))
    }

    /// Drone Management keeps its assignments in memory only (one process, where they are
    /// derived from the delivery records): a schedule's first journal entry then waits until it
    /// has a drone, one store commit fewer per schedule. With assignments Drone Management
    /// stores (split mode, the default here), the entry is written before the assignment, so
    /// that a crash between the two cannot leave a drone held by a delivery nobody knows.
    pub fn with_assignments_in_memory(mut self) -> Self {
        self.durable_assignments = false;
        self
    }

    /// Journals every schedule, reschedule and cancel in `store` (see [`crate::saga`]), which
    /// must be the file the keys of [`Scheduler::with_keys`] are in: an operation's answer
    /// commits with the removal of its entry.
    pub fn with_journal(mut self, store: crate::store::Store) -> Self {
        self.journal = Journal::in_store(store);
        self
    }

    /// Tells `history` who ordered each delivery scheduled from now on (for its owner queries).
    pub fn with_history(mut self, history: Arc<crate::history::History>) -> Self {
        self.history = Some(history);
        self
    }

    /// Records each schedule (`scheduler.create`) and every call it makes as spans of the
    /// delivery in `spans`.
    pub fn with_spans(mut self, spans: crate::spans::Spans) -> Self {
        self.spans = spans;
        self
    }

    /// Runs `work` (a step of delivery `id`'s schedule, under `parent`) as a span `name` of
    /// the delivery; `work` is given the span's context to pass on.
    async fn step<T, E: std::fmt::Display, Fut: Future<Output = Result<T, E>>>(
        &self,
        id: DeliveryId,
        parent: &TraceContext,
        name: &'static str,
        work: impl FnOnce(TraceContext) -> Fut,
    ) -> Result<T, E> {
        if !self.spans.is_on() {
            return work(*parent).await;
        }
        let span = parent.child();
        let started = std::time::Instant::now();
        let result = work(span).await;
        let attributes = match &result {
            Ok(_) => crate::spans::Attributes::new(),
            Err(e) => crate::spans::attrs([("error", e.to_string().into())]),
        };
        let of = crate::spans::SpanOf::new(id, name, "scheduler").in_span(span, Some(*parent));
        self.spans.record_since(of.with(attributes), started);
        result
    }

    /// The dependencies, for metrics.
    pub fn deps(&self) -> &Deps {
        &self.deps
    }

    /// Schedules a delivery (the saga in the module docs).
    pub async fn schedule(&self, req: CreateDelivery, trace: TraceContext) -> Result<DeliveryRecord, Error> {
        self.run_schedule(None, req, trace).await.map(|(record, _)| record)
    }

    /// Runs a schedule, journaled (see [`crate::saga`]). With `key`, its stored answer commits
    /// with the removal of the journal entry; the flag says whether it did.
    async fn run_schedule(
        &self,
        key: Option<&str>,
        req: CreateDelivery,
        trace: TraceContext,
    ) -> Result<(DeliveryRecord, bool), Error> {
        let mut tries = 1;
        loop {
            match self.run_schedule_once(key, req.clone(), trace).await {
                // Another node gave the drone a delivery an instant before (each node's
                // registry learns of the others' assignments from the delivery events): the
                // undo has looked it up again, so the next try passes it over.
                Err(Error::Engine(error)) if error.name() == "drone_busy" && tries < BUSY_TRIES => {
                    tries += 1;
                    tracing::debug!(%error, tries, "the engine refused a drone as busy; scheduling again");
                }
                outcome => return outcome,
            }
        }
    }

    async fn run_schedule_once(
        &self,
        key: Option<&str>,
        req: CreateDelivery,
        trace: TraceContext,
    ) -> Result<(DeliveryRecord, bool), Error> {
        validate(&req)?;
        let delivery_id = self.ids.next().await?;
        // The schedule is a span of its own under the request's, and every call it makes one
        // under it.
        let (parent, trace) = (trace, if self.spans.is_on() { trace.child() } else { trace });
        let started = std::time::Instant::now();
        let owner = req.owner.clone();
        let outcome = self.schedule_traced(key, req, delivery_id, trace).await;
        let attributes = match &outcome {
            Ok((record, _)) => crate::spans::attrs([("owner", owner.into()), ("drone_id", record.drone_id.into())]),
            Err(e) => crate::spans::attrs([("owner", owner.into()), ("error", e.to_string().into())]),
        };
        let of = crate::spans::SpanOf::new(delivery_id, "scheduler.create", "scheduler").in_span(trace, Some(parent));
        self.spans.record_since(of.with(attributes), started);
        outcome
    }

    async fn schedule_traced(
        &self,
        key: Option<&str>,
        req: CreateDelivery,
        delivery_id: DeliveryId,
        trace: TraceContext,
    ) -> Result<(DeliveryRecord, bool), Error> {
        let mut saga = Saga::Schedule {
            delivery_id,
            key: key.map(str::to_string),
            request: req.clone(),
            step: ScheduleStep::Started,
            at_us: events::now_us(),
        };
        if self.durable_assignments {
            // Drone Management stores the assignment it is about to make: the entry must be
            // there first. It and the account check at once (the check changes nothing).
            let owner = &req.owner;
            let account = self.step(delivery_id, &trace, "scheduler.call.accounts", |t| async move {
                self.check_account(owner, &t).await
            });
            let (journaled, account) = tokio::join!(self.journal.write(&saga), account);
            journaled?;
            if let Err(error) = account {
                self.forget(&saga).await;
                return Err(error);
            }
        } else {
            // The assignment is a reservation in memory, gone with a crash: the first entry can
            // wait until there is a drone to name.
            let owner = &req.owner;
            self.step(delivery_id, &trace, "scheduler.call.accounts", |t| async move {
                self.check_account(owner, &t).await
            })
            .await?;
        }
        crash_point("schedule-started");
        let mut done = Done::default();
        match self.schedule_steps(&mut saga, req, trace, &mut done).await {
            Ok(outcome) => {
                self.scheduled.fetch_add(1, Ordering::Relaxed);
                Ok(outcome)
            }
            Err(error) => {
                if self.compensate(delivery_id, &done).await {
                    self.forget(&saga).await;
                } else {
                    self.leave(saga);
                }
                Err(error)
            }
        }
    }

    /// Removes a finished operation's journal entry. One that cannot be removed is left for
    /// recovery, which finds nothing to do.
    async fn forget(&self, saga: &Saga) {
        if let Err(error) = self.journal.remove(saga).await {
            tracing::warn!(%error, "could not remove a finished operation from the saga journal");
        }
    }

    async fn check_account(&self, owner: &str, trace: &TraceContext) -> Result<(), Error> {
        crate::accounts::valid_owner(owner)?;
        let accounts = &self.deps.accounts;
        let reply = accounts
            .call(
                Call::new(Method::GET, format!("/internal/v1/accounts/{}", crate::api::path_segment(owner)))
                    .traced(trace),
            )
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
        saga: &mut Saga,
        req: CreateDelivery,
        trace: TraceContext,
        done: &mut Done,
    ) -> Result<(DeliveryRecord, bool), Error> {
        let Saga::Schedule { delivery_id: id, key, step, .. } = saga else {
            return Err(Error::BadRequest("not a schedule".into()));
        };
        let (id, key) = (*id, key.clone());
        let now = events::now_us();
        // The drone first (in one process a reservation in memory), then its entry in the
        // journal and the package at once: from here on the journal names everything to undo.
        // (A crash between the two commits can leave a package row no delivery refers to;
        // nothing reads it.) The package before the record and the engine's delivery, so that
        // a Package service that is down costs no delivery events.
        let pickup = req.pickup;
        let assignment =
            self.step(id, &trace, "scheduler.call.drones", |t| async move { self.assign(id, pickup, &t).await }).await;
        done.assignment = assignment.is_ok();
        let drone_id = assignment?;
        *step = ScheduleStep::Assigned { drone_id };
        let package = self.step(id, &trace, "scheduler.call.packages", |t| {
            call(
                &self.deps.packages,
                Call::json(Method::PUT, format!("/internal/v1/packages/{id}"), &req.package).traced(&t),
            )
        });
        let (journaled, package) = tokio::join!(self.journal.write(saga), package);
        done.package = package.is_ok();
        journaled?;
        package?;
        crash_point("schedule-assigned");

        let record = DeliveryRecord {
            delivery_id: id,
            owner: req.owner.clone(),
            drone_id,
            pickup: req.pickup,
            dropoff: req.dropoff,
            package: req.package.clone(),
            stage: DeliveryStage::Created,
            created_us: now,
            updated_us: now,
            last_seq: None,
        };
        // The record and the engine's delivery at once too: the engine's Created event finds
        // the record either way (the record starts at Created), and the drone is told to fly
        // only once both exist.
        let put_record = self.step(id, &trace, "scheduler.call.deliveries", |t| {
            call(
                &self.deps.deliveries,
                Call::json(Method::PUT, format!("/internal/v1/deliveries/{id}"), &record).traced(&t),
            )
        });
        let cmd = DeliveryCommand::Create {
            delivery_id: id,
            drone_id,
            pickup: record.pickup,
            dropoff: record.dropoff,
            ts_us: now,
        };
        let created = self.step(id, &trace, "scheduler.call.engine", |t| self.fleet.command_traced(cmd, t));
        let (put_record, created) = tokio::join!(put_record, created);
        done.record = put_record.is_ok();
        match &created {
            Ok(()) => done.engine = Some(drone_id),
            Err(error) => done.busy = error.name() == "drone_busy",
        }
        put_record?;
        created?;
        crash_point("schedule-created");
        self.finish_schedule(saga, &record, key.as_deref(), &req, trace).await.map(|staged| (record, staged))
    }

    /// The last steps of a schedule whose record and engine delivery exist (also when a
    /// recovery completes one): the owner note for History, the mission, and then the answer
    /// under its key together with the removal of the journal entry. `true`: the key's answer
    /// was stored.
    async fn finish_schedule(
        &self,
        saga: &Saga,
        record: &DeliveryRecord,
        key: Option<&str>,
        req: &CreateDelivery,
        trace: TraceContext,
    ) -> Result<bool, Error> {
        let id = record.delivery_id;
        if let Some(history) = &self.history {
            history.note_delivery(id, &record.owner, record.created_us)?;
        }
        if let Some(history) = &self.deps.history {
            let note = crate::history::OwnerNote { owner: record.owner.clone(), created_us: record.created_us };
            self.step(id, &trace, "scheduler.call.history", |t| {
                call(history, Call::json(Method::PUT, format!("/internal/v1/history/owners/{id}"), &note).traced(&t))
            })
            .await?;
        }

        // The mission goes to the drone through the drone-commands queue: delivered over the
        // drone's own connection, acknowledged by it, redelivered if it reconnects first. A
        // second copy (a recovery after a crash right after this) is the same mission, which
        // a drone takes once.
        let mission = Mission::fly(id, record.drone_id, record.pickup, record.dropoff, record.created_us, trace);
        self.step(id, &trace, "scheduler.enqueue.mission", |_| {
            self.fleet.enqueue(QueueName::DroneCommands, record.drone_id, mission.to_bytes())
        })
        .await?;
        crash_point("schedule-mission");

        let Some(store) = self.journal.store() else { return Ok(false) };
        let mut batch = crate::store::Batch::new();
        if let Some(key) = key {
            self.keys.stage(key, req, record, &mut batch)?;
        }
        self.journal.remove_in(saga, &mut batch);
        let committed = store.enqueue(batch);
        if key.is_some() {
            // The answer must be durable before it is given: a retry after a crash replays it.
            committed.await?;
            return Ok(true);
        }
        // Without a key nothing waits on the entry's removal: left behind by a crash, recovery
        // finds the delivery complete and only queues the mission again.
        Ok(false)
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

    /// Undoes what a failed schedule did, newest first. `true`: all of it (else the journal
    /// entry stays, and recovery tries again).
    async fn compensate(&self, id: DeliveryId, done: &Done) -> bool {
        let mut undone = true;
        if let Some(drone_id) = done.engine {
            let cancel = DeliveryCommand::Cancel { delivery_id: id, drone_id, ts_us: events::now_us() };
            match self.fleet.command(cancel).await {
                Ok(()) => {}
                Err(error) if error.name() == "unknown_delivery" => {}
                Err(error) => {
                    self.compensation_failed(id, "engine", &error.to_string());
                    undone = false;
                }
            }
        }
        let release = if done.busy { "?busy=true" } else { "" };
        let undo = [
            (done.record, &self.deps.deliveries, format!("/internal/v1/deliveries/{id}")),
            (done.assignment, &self.deps.drones, format!("/internal/v1/assignments/{id}{release}")),
            (done.package, &self.deps.packages, format!("/internal/v1/packages/{id}")),
        ];
        for (was_done, dep, path) in undo {
            if was_done && let Err(error) = delete(dep, path).await {
                self.compensation_failed(id, dep.name(), &error.to_string());
                undone = false;
            }
        }
        undone
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
        if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(Error::BadRequest(format!(
                "Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters (spaces inside)"
            )));
        }
        match self.keys.begin(key, &req).await? {
            Begin::Replay(record) => return Ok((record, true)),
            Begin::Mismatch => return Err(Error::KeyReused),
            Begin::Run => {}
        }
        let outcome = self.run_schedule(Some(key), req.clone(), trace).await;
        let stored = matches!(outcome, Ok((_, true)));
        self.keys.finish(key, &req, outcome.as_ref().ok().map(|(r, _)| r.clone()), stored).await?;
        outcome.map(|(r, _)| (r, false))
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
        caller: &Principal,
    ) -> Result<DeliveryRecord, Error> {
        let span = if self.spans.is_on() { trace.child() } else { trace };
        let started = std::time::Instant::now();
        let outcome = self.reschedule_traced(id, req, span, caller).await;
        self.operation_span(id, &span, &trace, "scheduler.reschedule", started, &outcome);
        outcome
    }

    /// Records a whole operation on delivery `id` (its `span`, under `parent`) and how it ended.
    fn operation_span<T>(
        &self,
        id: DeliveryId,
        span: &TraceContext,
        parent: &TraceContext,
        name: &str,
        started: std::time::Instant,
        outcome: &Result<T, Error>,
    ) {
        // Nothing is kept under the id of a delivery that does not exist, or not for the caller.
        if let Err(Error::NotFound { .. } | Error::NotFoundNamed { .. } | Error::Forbidden(_)) = outcome {
            return;
        }
        let attributes = match outcome {
            Ok(_) => crate::spans::Attributes::new(),
            Err(e) => crate::spans::attrs([("error", e.to_string().into())]),
        };
        let of = crate::spans::SpanOf::new(id, name, "scheduler").in_span(*span, Some(*parent));
        self.spans.record_since(of.with(attributes), started);
    }

    async fn reschedule_traced(
        &self,
        id: DeliveryId,
        req: Reschedule,
        trace: TraceContext,
        caller: &Principal,
    ) -> Result<DeliveryRecord, Error> {
        let record = self.record(id, &trace).await?;
        caller.check_delivery(&record.owner, id)?;
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
        let saga =
            Saga::Reschedule { delivery_id: id, drone_id: record.drone_id, pickup, dropoff, at_us: events::now_us() };
        self.journal.write(&saga).await?;
        crash_point("reschedule-started");
        let outcome = self.reschedule_steps(&saga, Some(record), trace).await;
        self.conclude(&saga, outcome).await
    }

    /// Ends a journaled reschedule or cancel: done, or refused before anything changed (the
    /// engine said no), its entry goes; failed part-way, the entry stays and recovery carries
    /// it forward at the next start.
    async fn conclude<T>(&self, saga: &Saga, outcome: Result<T, Step>) -> Result<T, Error> {
        match outcome {
            Ok(done) => {
                self.forget(saga).await;
                Ok(done)
            }
            Err(Step::Refused(error)) => {
                self.forget(saga).await;
                Err(error)
            }
            Err(Step::Failed(error)) => {
                self.leave(saga.clone());
                Err(error)
            }
        }
    }

    /// Keeps an operation that failed part-way for [`Scheduler::retry_left`], up to
    /// [`MAX_LEFT`] of them (memory stays bounded through a long outage of a dependency);
    /// past that its journal entry alone keeps it, for the next start.
    fn leave(&self, saga: Saga) {
        let mut left = self.left.lock();
        if left.len() >= MAX_LEFT {
            tracing::debug!(?saga, "not kept for retrying: left for the next start");
            return;
        }
        left.push(saga);
        if left.len() == MAX_LEFT {
            tracing::warn!(
                max = MAX_LEFT,
                "as many operations failed part-way as are retried while running; more are ended at the next start"
            );
        }
    }

    /// Tries again to end the operations that failed part-way while the node ran (see
    /// `left`): a schedule is undone (its caller was told it failed, and a retry may have
    /// scheduled afresh), a reschedule or cancel carried forward. What still fails stays for
    /// the next call, and its journal entry for the next start. The node calls this every few
    /// seconds.
    pub async fn retry_left(&self) -> Recovered {
        let left = std::mem::take(&mut *self.left.lock());
        let mut report = Recovered::default();
        for saga in left {
            let ended = match &saga {
                Saga::Schedule { delivery_id, step, .. } => {
                    self.compensate(*delivery_id, &Done::possibly(step)).await.then_some(false)
                }
                _ => self.carry_forward(&saga).await.ok(),
            };
            match ended {
                Some(completed) => {
                    self.forget(&saga).await;
                    if completed { report.completed += 1 } else { report.undone += 1 }
                }
                None => {
                    report.left += 1;
                    self.leave(saga);
                }
            }
        }
        report
    }

    /// The steps of a reschedule, each idempotent, so that recovery may run them again: the
    /// engine's delivery (the same places again change nothing), the drone's mission (a `Fly`
    /// for the delivery it has replaces the places), and the record.
    async fn reschedule_steps(
        &self,
        saga: &Saga,
        record: Option<DeliveryRecord>,
        trace: TraceContext,
    ) -> Result<DeliveryRecord, Step> {
        let &Saga::Reschedule { delivery_id: id, drone_id, pickup, dropoff, at_us } = saga else {
            return Err(Step::Refused(Error::BadRequest("not a reschedule".into())));
        };
        let cmd = DeliveryCommand::Reschedule { delivery_id: id, drone_id, pickup, dropoff, ts_us: at_us };
        self.fleet.command_traced(cmd, trace).await.map_err(|e| Step::Refused(e.into()))?;
        crash_point("reschedule-engine");
        let mission = Mission::fly(id, drone_id, pickup, dropoff, at_us, trace);
        self.fleet.enqueue(QueueName::DroneCommands, drone_id, mission.to_bytes()).await.map_err(Step::failed)?;
        let mut record = match record {
            Some(record) => record,
            None => self.record(id, &trace).await.map_err(Step::Failed)?,
        };
        record.pickup = pickup;
        record.dropoff = dropoff;
        let put = Call::json(Method::PUT, format!("/internal/v1/deliveries/{id}"), &record).traced(&trace);
        call(&self.deps.deliveries, put).await.map_err(Step::Failed)?;
        Ok(record)
    }

    /// Cancels a delivery that has not been completed: the engine derives `Cancelled`, which
    /// frees the drone, and the drone is told to return to base (a drone that has not started
    /// the mission drops it). Cancelling a cancelled delivery again changes nothing.
    pub async fn cancel(
        &self,
        id: DeliveryId,
        trace: TraceContext,
        caller: &Principal,
    ) -> Result<DeliveryRecord, Error> {
        let span = if self.spans.is_on() { trace.child() } else { trace };
        let started = std::time::Instant::now();
        let outcome = self.cancel_traced(id, span, caller).await;
        self.operation_span(id, &span, &trace, "scheduler.cancel", started, &outcome);
        outcome
    }

    async fn cancel_traced(
        &self,
        id: DeliveryId,
        trace: TraceContext,
        caller: &Principal,
    ) -> Result<DeliveryRecord, Error> {
        let record = self.record(id, &trace).await?;
        caller.check_delivery(&record.owner, id)?;
        match record.stage {
            DeliveryStage::Cancelled => return Ok(record),
            DeliveryStage::DeliveryComplete => {
                return Err(
                    events::Error::InvalidTransition { delivery: id, reason: "the delivery is complete" }.into()
                );
            }
            _ => {}
        }
        let saga = Saga::Cancel { delivery_id: id, drone_id: record.drone_id, at_us: events::now_us() };
        self.journal.write(&saga).await?;
        crash_point("cancel-started");
        let outcome = self.cancel_steps(&saga, &record, trace, false).await;
        self.conclude(&saga, outcome).await.map(|()| record)
    }

    /// The steps of a cancel, each idempotent: the engine's cancel (a delivery it no longer
    /// has was cancelled already, or finished), then the drone's return to base.
    async fn cancel_steps(
        &self,
        saga: &Saga,
        record: &DeliveryRecord,
        trace: TraceContext,
        recovering: bool,
    ) -> Result<(), Step> {
        let &Saga::Cancel { delivery_id: id, drone_id, at_us } = saga else {
            return Err(Step::Refused(Error::BadRequest("not a cancel".into())));
        };
        let cmd = DeliveryCommand::Cancel { delivery_id: id, drone_id, ts_us: at_us };
        match self.fleet.command_traced(cmd, trace).await {
            Ok(()) => {}
            // The engine forgets a delivery once it ends: carried forward after a crash, that
            // is this cancel's own first try; asked now, the delivery finished first (its
            // record has not caught up yet), and the drone has nothing left to stop.
            // By name: an engine on another node answers with the code, not the variant.
            Err(error) if error.name() == "unknown_delivery" && recovering => {}
            Err(error) if error.name() == "unknown_delivery" => {
                let finished = events::Error::InvalidTransition { delivery: id, reason: "the delivery is finished" };
                return Err(Step::Refused(finished.into()));
            }
            Err(error) if error.name() == "invalid_transition" => return Err(Step::Refused(error.into())),
            Err(error) => return Err(Step::failed(error)),
        }
        crash_point("cancel-engine");
        // A mission the drone has not been handed yet is taken back; the return to base goes
        // out either way (the drone may have it already, or the backend cannot take it back).
        let its_fly = move |payload: &[u8]| {
            Mission::from_bytes(payload).is_ok_and(|m| m.delivery_id == id && m.kind == events::MissionKind::Fly)
        };
        let withdrawn =
            self.fleet.withdraw(QueueName::DroneCommands, drone_id, &its_fly).await.map_err(Step::failed)?;
        if withdrawn > 0 {
            tracing::debug!(
                delivery_id = id,
                withdrawn,
                "a cancelled delivery's mission was taken back before its drone had it"
            );
        }
        let back = Mission {
            kind: events::MissionKind::ReturnToBase,
            ..Mission::fly(id, drone_id, record.pickup, record.dropoff, at_us, trace)
        };
        self.fleet.enqueue(QueueName::DroneCommands, drone_id, back.to_bytes()).await.map_err(Step::failed)?;
        Ok(())
    }

    /// The deliveries of schedules a crash cut short (left in the journal): recovery completes
    /// or undoes them, so nothing else should act on their records before it has.
    pub fn cut_short_schedules(&self) -> Result<Vec<DeliveryId>, Error> {
        Ok(self
            .journal
            .pending()?
            .into_iter()
            .filter_map(|saga| match saga {
                Saga::Schedule { delivery_id, .. } => Some(delivery_id),
                _ => None,
            })
            .collect())
    }

    /// Carries every operation a crash left in the journal to an end (see [`crate::saga`]):
    /// first claims the `Idempotency-Key`s of unfinished schedules, so that a retry waits for
    /// the outcome instead of running afresh beside it, then returns the task that finishes
    /// them once `ready` resolves (in one process: once the Delivery records have caught up
    /// with the delivery events logged before the crash, so that a record's stage can be
    /// trusted).
    pub async fn start_recovery(
        self: &Arc<Self>,
        ready: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<tokio::task::JoinHandle<Recovered>, Error> {
        let pending = self.journal.pending()?;
        let mut claimed = Vec::new();
        for saga in &pending {
            if let Saga::Schedule { key: Some(key), request, .. } = saga
                && matches!(self.keys.begin(key, request).await, Ok(crate::idempotency::Begin::Run))
            {
                claimed.push((key.clone(), request.clone()));
            }
        }
        let svc = self.clone();
        Ok(tokio::spawn(async move {
            ready.await;
            let mut report = Recovered::default();
            for saga in pending {
                svc.recover_one(saga, &mut claimed, &mut report).await;
            }
            for (key, request) in claimed {
                // Nothing finished it (an entry that could not be recovered): a retry runs afresh.
                let _ = svc.keys.finish(&key, &request, None, false).await;
            }
            if report != Recovered::default() {
                tracing::info!(
                    completed = report.completed,
                    undone = report.undone,
                    left = report.left,
                    "operations cut short by a crash were carried to an end"
                );
            }
            report
        }))
    }

    async fn recover_one(&self, saga: Saga, claimed: &mut Vec<(String, CreateDelivery)>, report: &mut Recovered) {
        let outcome = match &saga {
            Saga::Schedule { delivery_id, key, request, step, .. } => {
                let finished = self.recover_schedule(&saga, *delivery_id, key.as_deref(), request, step).await;
                if let (Some(key), Ok((record, stored))) = (key, &finished) {
                    claimed.retain(|(k, r)| !(k == key && r == request));
                    if let Err(error) = self.keys.finish(key, request, record.clone(), *stored).await {
                        tracing::error!(%error, delivery_id, "a recovered schedule's key could not be stored");
                    }
                }
                finished.map(|(record, _)| record.is_some())
            }
            Saga::Reschedule { .. } | Saga::Cancel { .. } => self.carry_forward(&saga).await,
        };
        match outcome {
            Ok(completed) => {
                if completed {
                    report.completed += 1;
                } else {
                    report.undone += 1;
                }
                if !matches!(saga, Saga::Schedule { .. }) || !completed {
                    self.forget(&saga).await;
                }
            }
            Err(error) => {
                report.left += 1;
                tracing::warn!(%error, ?saga, "an operation cut short by a crash could not be finished yet; it is tried again every few seconds");
                self.leave(saga);
            }
        }
    }

    /// Runs a reschedule's or cancel's steps again (each is idempotent). `true`: it ended (done,
    /// or refused by the engine); `false`: there is no such delivery any more.
    async fn carry_forward(&self, saga: &Saga) -> Result<bool, Error> {
        let trace = TraceContext::new_root();
        match saga {
            Saga::Reschedule { .. } => match self.reschedule_steps(saga, None, trace).await {
                Ok(_) | Err(Step::Refused(_)) => Ok(true),
                Err(Step::Failed(e)) => Err(e),
            },
            Saga::Cancel { delivery_id, .. } => match self.record(*delivery_id, &trace).await {
                Ok(record) => match self.cancel_steps(saga, &record, trace, true).await {
                    Ok(()) | Err(Step::Refused(_)) => Ok(true),
                    Err(Step::Failed(e)) => Err(e),
                },
                Err(Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e),
            },
            Saga::Schedule { .. } => Err(Error::BadRequest("a schedule is not carried forward".into())),
        }
    }

    /// A schedule cut short: completed when its record and the engine's delivery both exist
    /// (`Some(record)`, and whether the key's answer was stored with it), else undone (`None`).
    async fn recover_schedule(
        &self,
        saga: &Saga,
        id: DeliveryId,
        key: Option<&str>,
        request: &CreateDelivery,
        step: &ScheduleStep,
    ) -> Result<(Option<DeliveryRecord>, bool), Error> {
        let trace = TraceContext::new_root();
        let done = Done::possibly(step);
        if let ScheduleStep::Assigned { drone_id } = *step {
            let record = match self.record(id, &trace).await {
                Ok(record) => Some(record),
                Err(Error::NotFound { .. }) => None,
                Err(e) => return Err(e),
            };
            if let Some(record) = record {
                // The engine has it when its drone is on it, or when delivery events for it
                // reached the record already (it may have finished since).
                let flying = self.fleet.drone(drone_id).await?.is_some_and(|d| d.delivery == Some(id));
                if flying || record.stage != DeliveryStage::Created {
                    let stored = self.finish_schedule(saga, &record, key, request, trace).await?;
                    return Ok((Some(record), stored));
                }
            }
        }
        if self.compensate(id, &done).await {
            Ok((None, false))
        } else {
            Err(Error::Dependency { service: "scheduler", reason: format!("could not undo delivery {id}") })
        }
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
    params(("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key returns the first result", min_length = 1, max_length = 255, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses(
        (status = 201, description = "scheduled", body = Scheduled),
        (status = 400, description = "malformed request", body = crate::error::ErrorBody),
        (status = 403, description = "the account may not order", body = crate::error::ErrorBody),
        (status = 422, description = "unknown account, or an Idempotency-Key reused for another request", body = crate::error::ErrorBody),
        (status = 409, description = "no drone free within reach of the pickup now (`no_drone_available`, with `Retry-After`)", body = crate::error::ErrorBody),
        (status = 503, description = "a dependency failed (`dependency` names it)", body = crate::error::ErrorBody),
    )
)]
async fn create_delivery<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<Scheduler<F>>>,
    Caller(caller): Caller,
    trace: Option<Extension<TraceContext>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateDelivery>,
) -> Result<impl IntoResponse, Error> {
    caller.check_owner(&req.owner)?;
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
    Caller(caller): Caller,
    Path(id): Path<String>,
    trace: Option<Extension<TraceContext>>,
    ApiJson(req): ApiJson<Reschedule>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    // In a task of its own, as a schedule: carried to its end if the client goes away.
    let saga = {
        let svc = svc.clone();
        let trace = span(trace);
        tokio::spawn(async move { svc.reschedule(id, req, trace, &caller).await })
    };
    let record = saga.await.map_err(|e| Error::Dependency { service: "scheduler", reason: e.to_string() })??;
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
    Caller(caller): Caller,
    Path(id): Path<String>,
    trace: Option<Extension<TraceContext>>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let saga = {
        let svc = svc.clone();
        let trace = span(trace);
        tokio::spawn(async move { svc.cancel(id, trace, &caller).await })
    };
    let record = saga.await.map_err(|e| Error::Dependency { service: "scheduler", reason: e.to_string() })??;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "delivery_id": record.delivery_id, "cancelling": true }))))
}
