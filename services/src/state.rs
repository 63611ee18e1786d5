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
    /// The ordering account: 1 to 128 visible ASCII characters without `/`.
    #[schema(min_length = 1, max_length = 128, pattern = r"^[!-.0-~]+$")]
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
    /// Size class.
    pub size: PackageSize,
    /// Weight in kilograms: more than 0, at most [`MAX_PACKAGE_KG`] (what a delivery drone
    /// carries).
    #[schema(exclusive_minimum = 0, maximum = 5)]
    pub weight_kg: f64,
    /// Free-form tag.
    #[serde(default)]
    pub tag: Option<String>,
}

/// The heaviest package a drone carries, kg (the schema's `maximum` of `weight_kg`).
pub const MAX_PACKAGE_KG: f64 = 5.0;

/// A package's size class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PackageSize {
    /// Fits a letterbox.
    Small,
    /// A shoebox.
    Medium,
    /// The largest a drone carries.
    Large,
}

/// Settings of the services, `[services]` in the pipeline's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    /// How internal calls behave (timeouts, retries, breaker, concurrency).
    pub calls: CallPolicy,
    /// Drone assignment.
    pub drones: DronesConfig,
    /// How long a successful request's `Idempotency-Key` answers retries, seconds. Default
    /// 86,400 (a day): longer than any client's retry loop, short enough that the keys of a
    /// busy day fit the cap of 100,000.
    pub idempotency_retention_s: u64,
    /// Successful requests whose `Idempotency-Key` is remembered at most (the oldest forgotten
    /// first, in memory and in the store). Default 100,000: about 100 MiB of memory at most
    /// (about 1 KiB a key with its stored answer).
    pub idempotency_keys: usize,
    /// Notification subscriptions one delivery holds at most; more are refused with
    /// `limit_reached` (409). Default 16: a customer, a recipient and a few devices each.
    pub max_subscriptions_per_delivery: usize,
    /// Finished deliveries whose records the Delivery service keeps in memory, the most
    /// recently finished (about 300 B each); older ones are read from the store when asked
    /// for. Default 100,000: about 30 MiB.
    pub finished_deliveries_held: usize,
    /// Where the services keep their state: `embedded` (default; `services.redb` in the data
    /// directory) or `postgres` (one store every node shares, for `[log] backend =
    /// "jetstream"` with several nodes).
    pub store: ServicesStore,
    /// PostgreSQL connection URL (`store = "postgres"`); TLS with `sslmode=require` and
    /// `sslrootcert=FILE`, as libpq reads them. Default
    /// `postgresql://postgres@127.0.0.1:5432/fleetstream`.
    pub url: String,
    /// Schema the table lives in (created and migrated at start). Default `fleetstream`.
    pub schema: String,
}

/// Where the services keep their state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServicesStore {
    /// A redb file in the node's data directory (the default).
    #[default]
    Embedded,
    /// PostgreSQL, shared by every node.
    Postgres,
}

impl ServicesConfig {
    /// What the Delivery service holds at most.
    pub fn delivery_limits(&self) -> crate::deliveries::DeliveryLimits {
        crate::deliveries::DeliveryLimits {
            subscriptions_per_delivery: self.max_subscriptions_per_delivery,
            finished_held: self.finished_deliveries_held,
        }
    }
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            calls: CallPolicy::default(),
            drones: DronesConfig::default(),
            idempotency_retention_s: 86_400,
            idempotency_keys: crate::idempotency::CAPACITY,
            max_subscriptions_per_delivery: crate::deliveries::DEFAULT_MAX_SUBSCRIPTIONS,
            finished_deliveries_held: crate::deliveries::DEFAULT_FINISHED_HELD,
            store: ServicesStore::Embedded,
            url: "postgresql://postgres@127.0.0.1:5432/fleetstream".into(),
            schema: "fleetstream".into(),
        }
    }
}

/// Where a read model keeps how far into the delivery-events log it has applied (the next
/// offset), in the same commit as what those events changed: this key in [`positions`].
pub const DELIVERY_EVENTS_POSITION: &str = "delivery-events";

/// The namespace of a store file that holds its read models' log positions.
pub fn positions(file: &Store) -> Store {
    file.local("positions")
}

/// This node's name in a shared store: made once, kept in `dir/node-name`, so a node
/// restarted on its data directory finds its own saga journal and read-model positions.
pub fn node_name(dir: &Path) -> Result<String, Error> {
    let path = dir.join("node-name");
    let storage = |e: std::io::Error| Error::Engine(events::Error::Storage(format!("{}: {e}", path.display())));
    match std::fs::read_to_string(&path) {
        Ok(name) if !name.trim().is_empty() => return Ok(name.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(storage(e)),
    }
    std::fs::create_dir_all(dir).map_err(storage)?;
    let name = format!("{:016x}", events::now_us() ^ (u64::from(std::process::id()) << 40));
    let tmp = dir.join("node-name.tmp");
    std::fs::write(&tmp, &name).map_err(storage)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(storage)?;
    std::fs::rename(&tmp, &path).map_err(storage)?;
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(storage)?;
    Ok(name)
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
    /// The file every service's state is in, for the read models' positions and health.
    store: Store,
}

impl<F: FleetControl + WorkQueues + Clone> Services<F> {
    /// The services with their stores in memory (tests, throwaway runs).
    pub async fn new(fleet: F) -> Result<Self, Error> {
        let spans = crate::spans::Spans::off();
        Self::with_store(fleet, Store::in_memory()?, ServicesConfig::default(), None, None, spans).await
    }

    /// The services with their state in `dir/services.redb`: one file with a namespace per
    /// service (accounts, packages, delivery records and subscriptions, the drone registry,
    /// idempotency keys, the read models' log positions), so the writes of one schedule share
    /// commits and a read model's changes commit with its position. In split mode each service
    /// has a file of its own. `history`, when given, is told who ordered each delivery (for
    /// its owner queries).
    ///
    /// Delivery ids come from `ids` when given (a counter the nodes share), else from a counter
    /// in this file. The scheduler and Drone Management record their work on each delivery
    /// in `spans` (see [`crate::spans`]).
    pub async fn open(
        fleet: F,
        dir: &Path,
        cfg: ServicesConfig,
        history: Option<Arc<crate::history::History>>,
        ids: Option<Arc<dyn crate::ids::IdBlocks>>,
        spans: crate::spans::Spans,
    ) -> Result<Self, Error> {
        let file = match cfg.store {
            ServicesStore::Embedded => Store::open(&dir.join("services.redb"))?,
            ServicesStore::Postgres => Store::open_postgres(&cfg.url, &cfg.schema, &node_name(dir)?)?,
        };
        Self::with_store(fleet, file, cfg, history, ids, spans).await
    }

    async fn with_store(
        fleet: F,
        file: Store,
        cfg: ServicesConfig,
        history: Option<Arc<crate::history::History>>,
        ids: Option<Arc<dyn crate::ids::IdBlocks>>,
        spans: crate::spans::Spans,
    ) -> Result<Self, Error> {
        let policy = cfg.calls;
        let accounts = Accounts::new(file.namespace("accounts"));
        let packages = Packages::new(file.namespace("packages"));
        let deliveries = DeliveryService::open(
            fleet.clone(),
            crate::deliveries::DeliveryStores::in_file(&file),
            cfg.delivery_limits(),
        )?;
        let drones = DroneManagement::open_beside_records(
            fleet.clone(),
            cfg.drones,
            file.namespace("drones"),
            deliveries.in_flight(),
        )?;
        drones.keep_spans(spans.clone());
        let deps = Deps {
            accounts: Dependency::local("accounts", accounts.router(), policy),
            packages: Dependency::local("package", packages.router(), policy),
            deliveries: Dependency::local("delivery", deliveries.internal_router(), policy),
            drones: Dependency::local("drone-management", drones.internal_router(), policy),
            history: None,
        };
        let ids = ids.unwrap_or_else(|| crate::ids::StoreIdBlocks::new(file.namespace("delivery-ids")));
        let scheduler = Scheduler::new(fleet, deps)
            .with_ids(ids)
            .with_store(&file, cfg.idempotency_retention_s, cfg.idempotency_keys)
            .await?
            .with_assignments_in_memory()
            .with_spans(spans);
        let scheduler = Arc::new(match history {
            Some(h) => scheduler.with_history(h),
            None => scheduler,
        });
        Ok(Self { scheduler, deliveries, drones, accounts, packages, store: file })
    }

    /// Where the services' read models resume in the delivery-events log: the offset after the
    /// last batch whose effects they stored (`None`: nothing applied yet, start at the earliest).
    pub fn delivery_events_position(&self) -> Result<Option<u64>, Error> {
        positions(&self.store).get::<u64>(DELIVERY_EVENTS_POSITION)
    }

    /// Fault injection: every later commit of the services' store fails, as on a broken disk.
    #[doc(hidden)]
    pub fn fail_store_commits(&self) {
        self.store.fail_commits();
    }

    /// Why the services' store stopped taking writes, if it did (a failed commit).
    pub fn store_failure(&self) -> Option<String> {
        self.store.failure()
    }

    /// The services' store (readiness probes it).
    pub fn store(&self) -> &crate::store::Store {
        &self.store
    }

    /// Schedules a delivery.
    pub async fn schedule(&self, req: CreateDelivery) -> Result<DeliveryRecord, Error> {
        self.scheduler.schedule(req, events::TraceContext::new_root()).await
    }

    /// The current record of a delivery.
    pub fn delivery(&self, id: DeliveryId) -> Option<DeliveryRecord> {
        self.deliveries.record(id)
    }

    /// Registers drones as available (idempotent, durable). Returns how many were new.
    pub async fn register_drones(&self, ids: &[DroneId]) -> Result<usize, Error> {
        self.drones.register(ids).await
    }

    /// Feeds a batch of the delivery-events stream to the services that follow it: the
    /// Delivery records (stage), Drone Management (a finished delivery frees its drone) and
    /// the notifications. `next_offset`: the log offset after it, stored with its effects.
    pub async fn apply_delivery_events(&self, batch: &DeliveryBatch, next_offset: Option<u64>) -> Result<(), Error> {
        self.apply_delivery_event_batches(&[batch], next_offset).await
    }

    /// [`Self::apply_delivery_events`] for consecutive batches at once: each is applied in
    /// order, and the records they changed are stored together with `next_offset` (the log
    /// offset after the last of them) in one commit, each delivery once as it ended up. A
    /// follower that fell behind passes what it has waiting, so under load the records cost one
    /// store commit (one fsync) per round instead of one per batch.
    ///
    /// Order of effects, so that a crash anywhere repeats work instead of losing it: freed
    /// drones are stored first, then the notifications are queued (durably), then the records
    /// with the position. Applying a batch again changes nothing but queuing its notifications
    /// again, under the same ids. An error means the round's position was not stored: the
    /// caller must stop following, and a restart applies the round again.
    pub async fn apply_delivery_event_batches<B: std::ops::Deref<Target = DeliveryBatch>>(
        &self,
        batches: &[B],
        next_offset: Option<u64>,
    ) -> Result<(), Error> {
        let changed = self.deliveries.apply_delivery_event_batches(batches)?;
        self.drones.apply_delivery_event_batches(batches).await?;
        let mut ended = Vec::new();
        for batch in batches {
            ended.extend(self.deliveries.notify(batch).await?);
        }
        let mut position = crate::store::Batch::new();
        if let Some(next) = next_offset {
            position.put(&positions(&self.store), DELIVERY_EVENTS_POSITION, &next)?;
        }
        self.deliveries.persist(&changed, &ended, position).await
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
        self.store.stats().render("services", out);
    }
}

pub(crate) fn validate(req: &CreateDelivery) -> Result<(), Error> {
    crate::accounts::valid_owner(&req.owner)?;
    for (name, p) in [("pickup", &req.pickup), ("dropoff", &req.dropoff)] {
        if !p.is_valid() {
            return Err(Error::BadRequest(format!("{name} is not a valid coordinate (lat -90..90, lon -180..180)")));
        }
    }
    validate_package(&req.package)
}

/// Checks a package's description.
pub(crate) fn validate_package(package: &Package) -> Result<(), Error> {
    if !(package.weight_kg.is_finite() && package.weight_kg > 0.0 && package.weight_kg <= MAX_PACKAGE_KG) {
        return Err(Error::BadRequest(format!("package.weight_kg must be more than 0 and at most {MAX_PACKAGE_KG}")));
    }
    Ok(())
}
