//! The services composed in one process, and the request types they share.
//!
//! [`Services`] holds every service of the edge (Scheduler, Delivery, Drone Management,
//! Accounts, Package) and wires the scheduler to the others as in-process
//! [`crate::client::Dependency`]s: each call goes through the same resilience stack and the
//! same route handlers as across the network, minus the socket. `pipeline serve --role ...`
//! runs the same services one per process instead.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use events::{DeliveryBatch, DeliveryId, DroneId, FleetControl, GeoPoint, WorkQueues};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::accounts::Accounts;
use crate::client::{CallPolicy, Dependency};
pub use crate::deliveries::DeliveryRecord;
use crate::deliveries::DeliveryService;
use crate::drones::{DroneManagement, DronesConfig};
use crate::packages::Packages;
use crate::scheduler::{Deps, Scheduler};
use crate::store::Store;

/// What a customer sends to schedule a delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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

/// Settings of the services, `[services]` in the pipeline's config.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    /// How internal calls behave (timeouts, retries, breaker, concurrency).
    pub calls: CallPolicy,
    /// Drone assignment.
    pub drones: DronesConfig,
}

/// Every service of the edge in one process.
#[derive(Debug)]
pub struct Services<F> {
    /// Delivery Scheduler.
    pub scheduler: Arc<Scheduler<F>>,
    /// Delivery.
    pub deliveries: Arc<DeliveryService<F>>,
    /// Drone Management.
    pub drones: Arc<DroneManagement<F>>,
    /// Accounts.
    pub accounts: Arc<Accounts>,
    /// Package.
    pub packages: Arc<Packages>,
}

impl<F: FleetControl + WorkQueues + Clone> Services<F> {
    /// The services with their stores in memory (tests, throwaway runs).
    pub fn new(fleet: F) -> Result<Self, Error> {
        let (a, p, d) = (Store::in_memory()?, Store::in_memory()?, Store::in_memory()?);
        Self::with_stores(fleet, [a, p, d], CallPolicy::default(), DronesConfig::default(), None)
    }

    /// The services with their stores in `dir/services.redb`: one file with a namespace per
    /// service, so the writes of one schedule (package, delivery record) share commits. In
    /// split mode each service has a file of its own. `history`, when given, is told who
    /// ordered each delivery (for its owner queries).
    pub fn open(
        fleet: F,
        dir: &Path,
        cfg: ServicesConfig,
        history: Option<Arc<crate::history::History>>,
    ) -> Result<Self, Error> {
        let file = Store::open(&dir.join("services.redb"))?;
        let stores = ["accounts", "packages", "deliveries"].map(|name| file.namespace(name));
        Self::with_stores(fleet, stores, cfg.calls, cfg.drones, history)
    }

    /// `stores`: Accounts', Package's and Delivery's.
    fn with_stores(
        fleet: F,
        [accounts, packages, deliveries]: [Store; 3],
        policy: CallPolicy,
        drones_cfg: DronesConfig,
        history: Option<Arc<crate::history::History>>,
    ) -> Result<Self, Error> {
        let accounts = Accounts::new(accounts);
        let packages = Packages::new(packages);
        let deliveries = DeliveryService::open(fleet.clone(), deliveries)?;
        let drones = DroneManagement::new(fleet.clone(), drones_cfg);
        let deps = Deps {
            accounts: Dependency::local("accounts", accounts.router(), policy),
            packages: Dependency::local("package", packages.router(), policy),
            deliveries: Dependency::local("delivery", deliveries.internal_router(), policy),
            drones: Dependency::local("drone-management", drones.router(), policy),
            history: None,
        };
        let scheduler = Scheduler::new(fleet, deps);
        let scheduler = Arc::new(match history {
            Some(h) => scheduler.with_history(h),
            None => scheduler,
        });
        Ok(Self { scheduler, deliveries, drones, accounts, packages })
    }

    /// Schedules a delivery.
    pub async fn schedule(&self, req: CreateDelivery) -> Result<DeliveryRecord, Error> {
        self.scheduler.schedule(req, events::TraceContext::new_root()).await
    }

    /// The current record of a delivery.
    pub fn delivery(&self, id: DeliveryId) -> Option<DeliveryRecord> {
        self.deliveries.record(id)
    }

    /// Registers drones as available (idempotent).
    pub async fn register_drones(&self, ids: &[DroneId]) -> usize {
        self.drones.register(ids).await
    }

    /// Feeds a batch of the delivery-events stream to the services that follow it: the
    /// Delivery records (stage), Drone Management (a finished delivery frees its drone) and
    /// the notifications.
    pub async fn apply_delivery_events(&self, batch: &DeliveryBatch) -> Result<(), Error> {
        self.apply_delivery_event_batches(&[batch]).await
    }

    /// [`Self::apply_delivery_events`] for consecutive batches at once: each is applied in
    /// order, and the records they changed are stored together, each delivery once as it ended
    /// up. A follower that fell behind passes what it has waiting, so under load the records
    /// cost one store commit (one fsync) per round instead of one per batch.
    pub async fn apply_delivery_event_batches<B: std::ops::Deref<Target = DeliveryBatch>>(
        &self,
        batches: &[B],
    ) -> Result<(), Error> {
        let changed = self.deliveries.apply_delivery_event_batches(batches);
        for batch in batches {
            self.drones.apply_delivery_events(batch).await;
        }
        let persisted = self.deliveries.persist(changed).await;
        // Every batch's notifications are queued even when one batch's could not be.
        let mut notified = Ok(());
        for batch in batches {
            if let Err(e) = self.deliveries.notify(batch).await {
                notified = notified.and(Err(e));
            }
        }
        persisted.and(notified)
    }

    /// Registered drones and how many are free.
    pub fn fleet_size(&self) -> (usize, usize) {
        self.drones.size()
    }

    /// Appends the services' counters in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use events::prom::{counter, gauge};
        let (drones, free) = self.fleet_size();
        let s = &self.scheduler;
        counter(out, "fleetstream_deliveries_scheduled_total", s.scheduled.load(Ordering::Relaxed));
        counter(out, "fleetstream_deliveries_refused_total", s.refused.load(Ordering::Relaxed));
        counter(
            out,
            "fleetstream_scheduler_compensation_failures_total",
            s.compensation_failures.load(Ordering::Relaxed),
        );
        gauge(out, "fleetstream_drones_registered", drones);
        gauge(out, "fleetstream_drones_free", free);
        crate::client::render_metrics(s.deps().all(), out);
    }
}

pub(crate) fn validate(req: &CreateDelivery) -> Result<(), Error> {
    if req.owner.trim().is_empty() {
        return Err(Error::BadRequest("owner must not be empty".into()));
    }
    for (name, p) in [("pickup", &req.pickup), ("dropoff", &req.dropoff)] {
        if !p.is_valid() {
            return Err(Error::BadRequest(format!("{name} is not a valid coordinate (lat -90..90, lon -180..180)")));
        }
    }
    validate_package(&req.package)
}

/// Checks a package's description.
pub(crate) fn validate_package(package: &Package) -> Result<(), Error> {
    if !matches!(package.size.as_str(), "small" | "medium" | "large") {
        return Err(Error::BadRequest("package.size must be small, medium or large".into()));
    }
    if !(package.weight_kg.is_finite() && package.weight_kg > 0.0) {
        return Err(Error::BadRequest("package.weight_kg must be a positive number".into()));
    }
    Ok(())
}
