//! Split mode: each service of the edge in a process of its own (`pipeline serve --role ...`),
//! behind one public entry, the gateway ([`crate::gateway`]), and calling each other over
//! HTTPS with mutual TLS (certificates from `pipeline certs init`), or over plain HTTP behind a
//! service mesh (`transport = "plain"`).
//!
//! ```text
//!  loadgen / drones ──QUIC──► ingest (engine, log, queues; engine API)
//!  customers ──HTTPS──► gateway ──► scheduler, delivery, history, drones, accounts, ingest
//!  scheduler ──► accounts, packages, delivery, drones, history; ingest: commands, missions
//!  delivery, drones ◄──QUIC named cursor── delivery-events ──► history (offset kept in its store)
//! ```
//!
//! Every role reads the same `[split]` section, so one file describes the deployment: the base
//! URLs of every role (several per role are load-balanced with health checks), where each
//! binds when not at its first URL, and the ingest's QUIC address. With `mtls`, listeners of
//! internal-only roles (accounts, packages, ingest's engine API) require a client certificate
//! from the CA in the handshake; those with public routes (scheduler, delivery, drones,
//! history) accept any TLS client, check API keys on public routes (or take the principal the
//! gateway forwarded, from a service), and require a client certificate on `/internal/`
//! routes.
//!
//! ```toml
//! [split]
//! tls_dir = "ca"                        # from `pipeline certs init --dir ca`
//! engine_quic = "127.0.0.1:4433"        # the ingest role's QUIC address
//! [split.endpoints]
//! ingest = ["https://127.0.0.1:9100"]   # its engine API (mTLS)
//! scheduler = ["https://127.0.0.1:9101"]
//! delivery = ["https://127.0.0.1:9102"]
//! history = ["https://127.0.0.1:9103"]
//! drones = ["https://127.0.0.1:9104"]
//! accounts = ["https://127.0.0.1:9105"]
//! packages = ["https://127.0.0.1:9106"]
//! gateway = ["https://127.0.0.1:9443"]  # the one URL clients use
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use events::{
    DeliveryBatch, DeliveryCommand, DeliveryEvent, DroneId, DroneSnapshot, FleetControl, QueueName, StartAt, Topic,
    TraceContext, WorkQueues,
};
use serde::{Deserialize, Serialize};
use services::client::{Call, CallPolicy, Dependency, Reply};
use services::tls::{ClientAuth, TlsFiles, TlsMetrics};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Error;
use crate::config::Config;
use crate::engine::Engine;

/// Which part of the system a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything in one process (the default).
    All,
    /// QUIC ingest, engine, log and queues, with the engine API for the other roles.
    Ingest,
    /// Delivery Scheduler.
    Scheduler,
    /// Delivery (records, status, notifications).
    Delivery,
    /// Delivery History.
    History,
    /// Drone Management.
    Drones,
    /// Accounts.
    Accounts,
    /// Package.
    Packages,
    /// The one public HTTPS entry: authenticates, throttles and forwards to the others.
    Gateway,
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "all" => Role::All,
            "ingest" => Role::Ingest,
            "scheduler" => Role::Scheduler,
            "delivery" => Role::Delivery,
            "history" => Role::History,
            "drones" => Role::Drones,
            "accounts" => Role::Accounts,
            "packages" => Role::Packages,
            "gateway" => Role::Gateway,
            other => {
                return Err(format!(
                    "unknown role {other:?}: all, ingest, scheduler, delivery, history, drones, accounts, packages or gateway"
                ));
            }
        })
    }
}

impl Role {
    /// Every role of a split deployment.
    pub const SPLIT: [Role; 8] = [
        Role::Ingest,
        Role::Scheduler,
        Role::Delivery,
        Role::History,
        Role::Drones,
        Role::Accounts,
        Role::Packages,
        Role::Gateway,
    ];

    /// The role's name, as in certificates and config.
    pub fn name(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Ingest => "ingest",
            Role::Scheduler => "scheduler",
            Role::Delivery => "delivery",
            Role::History => "history",
            Role::Drones => "drones",
            Role::Accounts => "accounts",
            Role::Packages => "packages",
            Role::Gateway => "gateway",
        }
    }
}

/// `[split]`: where every role of a split deployment is, and how the roles talk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// Directory with `ca.pem` and `<role>.pem` / `<role>-key.pem`. Default `ca`. Needed with
    /// either transport: the ingest's QUIC certificate comes from this CA.
    pub tls_dir: PathBuf,
    /// The ingest role's QUIC address, `host:port` (delivery-event subscriptions), resolved
    /// at each connect (a Kubernetes Service name does). Default `127.0.0.1:4433`.
    pub engine_quic: String,
    /// How the roles call each other. Default `mtls`.
    pub transport: Transport,
    /// With `transport = "plain"`: a service mesh gives the roles their identity and encrypts
    /// their traffic, so they may listen on addresses other than loopback. Default `false`.
    pub mesh: bool,
    /// Base URLs of each role (`https://` with `mtls`, `http://` with `plain`): where the
    /// others call it.
    pub endpoints: Endpoints,
    /// Where each role binds, when not at its first endpoint's host and port (a Kubernetes
    /// pod binds `0.0.0.0:8080` and is called as `drones.fleet.svc:8080`).
    pub listen: Listen,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            tls_dir: PathBuf::from("ca"),
            engine_quic: "127.0.0.1:4433".into(),
            transport: Transport::Mtls,
            mesh: false,
            endpoints: Endpoints::default(),
            listen: Listen::default(),
        }
    }
}

/// `[split] transport`: how the roles call each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// HTTPS with a client certificate from the deployment's CA on every call; a role's
    /// internal routes answer only callers with one.
    Mtls,
    /// Plain HTTP: identity and encryption are left to a service mesh (its sidecars' mTLS and
    /// authorization policy). Every caller that reaches a role is taken for a service, so
    /// only the gateway may be exposed. Refused on a non-loopback bind unless `mesh = true`.
    Plain,
}

impl Transport {
    /// The scheme of its URLs.
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Mtls => "https",
            Transport::Plain => "http",
        }
    }
}

/// `[split.listen]`: a bind address per role, each optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// The ingest role's engine API.
    pub ingest: Option<SocketAddr>,
    /// Delivery Scheduler.
    pub scheduler: Option<SocketAddr>,
    /// Delivery.
    pub delivery: Option<SocketAddr>,
    /// Delivery History.
    pub history: Option<SocketAddr>,
    /// Drone Management.
    pub drones: Option<SocketAddr>,
    /// Accounts.
    pub accounts: Option<SocketAddr>,
    /// Package.
    pub packages: Option<SocketAddr>,
    /// The gateway.
    pub gateway: Option<SocketAddr>,
}

impl Listen {
    /// The bind address given for `role`.
    pub fn of(&self, role: Role) -> Option<SocketAddr> {
        match role {
            Role::All => None,
            Role::Ingest => self.ingest,
            Role::Scheduler => self.scheduler,
            Role::Delivery => self.delivery,
            Role::History => self.history,
            Role::Drones => self.drones,
            Role::Accounts => self.accounts,
            Role::Packages => self.packages,
            Role::Gateway => self.gateway,
        }
    }
}

impl SplitConfig {
    /// Checks the endpoints' schemes against the transport, and a plain transport's binds: a
    /// role that takes every caller for a service listens on loopback unless a mesh stands in
    /// front of it.
    pub fn check(&self, role: Role, bind: SocketAddr) -> Result<(), Error> {
        let scheme = format!("{}://", self.transport.scheme());
        for r in
            [Role::Ingest, Role::Scheduler, Role::Delivery, Role::History, Role::Drones, Role::Accounts, Role::Packages]
        {
            if let Some(url) = self.endpoints.of(r).iter().find(|u| !u.starts_with(&scheme)) {
                return Err(Error::Config(format!(
                    "[split.endpoints] {} has {url:?}: transport {:?} calls {scheme} URLs",
                    r.name(),
                    self.transport
                )));
            }
        }
        if self.transport == Transport::Plain && role != Role::Gateway {
            if !bind.ip().is_loopback() && !self.mesh {
                return Err(Error::Config(format!(
                    "the {} role would listen on {bind} with transport = \"plain\": every caller that reaches it \
                     is taken for a service. Bind loopback, or set [split] mesh = true when a service mesh \
                     authenticates and encrypts the traffic",
                    role.name()
                )));
            }
            tracing::warn!(
                role = role.name(),
                %bind,
                "transport = \"plain\": no TLS between roles; identity and encryption are left to the mesh"
            );
        }
        Ok(())
    }

    /// The HTTP client a role calls the others with: its certificate from `tls_dir` with
    /// `mtls`, a plain one with `plain`.
    fn client(&self, role: Role) -> Result<reqwest::Client, Error> {
        match self.transport {
            Transport::Mtls => services::tls::client(&TlsFiles::in_dir(&self.tls_dir, role.name())).map_err(svc_error),
            Transport::Plain => services::tls::plain_client_builder()
                .pool_max_idle_per_host(256)
                .build()
                .map_err(|e| Error::Config(format!("an HTTP client: {e}"))),
        }
    }
}

/// HTTPS base URLs per role; the first is where that role listens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Endpoints {
    /// The ingest role's engine API.
    pub ingest: Vec<String>,
    /// Delivery Scheduler.
    pub scheduler: Vec<String>,
    /// Delivery.
    pub delivery: Vec<String>,
    /// Delivery History.
    pub history: Vec<String>,
    /// Drone Management.
    pub drones: Vec<String>,
    /// Accounts.
    pub accounts: Vec<String>,
    /// Package.
    pub packages: Vec<String>,
    /// The gateway: the one URL clients use.
    pub gateway: Vec<String>,
}

impl Endpoints {
    /// The base URLs of `role`.
    pub fn of(&self, role: Role) -> &[String] {
        match role {
            Role::All => &[],
            Role::Ingest => &self.ingest,
            Role::Scheduler => &self.scheduler,
            Role::Delivery => &self.delivery,
            Role::History => &self.history,
            Role::Drones => &self.drones,
            Role::Accounts => &self.accounts,
            Role::Packages => &self.packages,
            Role::Gateway => &self.gateway,
        }
    }

    fn required(&self, role: Role) -> Result<&[String], Error> {
        let urls = self.of(role);
        if urls.is_empty() {
            return Err(Error::Config(format!("[split.endpoints] {} is not set", role.name())));
        }
        Ok(urls)
    }
}

/// The socket address a role listens on: `[split.listen]`'s, else its first endpoint's host
/// and port.
async fn listen_addr(split: &SplitConfig, role: Role) -> Result<SocketAddr, Error> {
    if let Some(addr) = split.listen.of(role) {
        return Ok(addr);
    }
    let url = &split.endpoints.required(role)?[0];
    let parsed = reqwest::Url::parse(url).map_err(|e| Error::Config(format!("{url}: {e}")))?;
    let host = parsed.host_str().ok_or_else(|| Error::Config(format!("{url}: no host")))?;
    let port = parsed.port_or_known_default().ok_or_else(|| Error::Config(format!("{url}: no port")))?;
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Error::Io { context: format!("resolving {url}"), source: e })?
        .next()
        .ok_or_else(|| Error::Config(format!("{url} resolves to no address")))
}

/// The engine as the other roles reach it: commands, missions and drone state over the ingest
/// role's engine API, through the same resilience stack as every internal call.
#[derive(Debug, Clone)]
pub struct RemoteEngine {
    dep: Dependency,
}

fn engine_error(reply: &Reply) -> events::Error {
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    let name = body["error"].as_str().unwrap_or("");
    let message = body["message"].as_str().unwrap_or("").to_string();
    match events::all_codes().iter().find(|(_, n)| *n == name) {
        Some(&(code, _)) => events::Error::from_wire(code, message),
        None => events::Error::Storage(format!("engine answered {}: {message}", reply.status)),
    }
}

impl RemoteEngine {
    /// The engine at `urls`, called with `client`.
    pub fn new(urls: &[String], client: reqwest::Client, policy: CallPolicy) -> Self {
        Self { dep: Dependency::remote("engine", urls, client, policy) }
    }

    async fn call(&self, call: Call) -> Result<Reply, events::Error> {
        self.dep.call(call).await.map_err(|e| events::Error::Storage(format!("engine unreachable: {e}")))
    }
}

impl FleetControl for RemoteEngine {
    async fn command(&self, cmd: DeliveryCommand) -> Result<(), events::Error> {
        self.command_traced(cmd, TraceContext::default()).await
    }

    async fn command_traced(&self, cmd: DeliveryCommand, trace: TraceContext) -> Result<(), events::Error> {
        let call = Call::json(Method::POST, "/internal/v1/engine/commands", &cmd).traced(&trace);
        let reply = self.call(call).await?;
        if reply.status.is_success() { Ok(()) } else { Err(engine_error(&reply)) }
    }

    async fn drone(&self, id: DroneId) -> Result<Option<DroneSnapshot>, events::Error> {
        let reply = self.call(Call::new(Method::GET, format!("/internal/v1/engine/drones/{id}"))).await?;
        match reply.status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => serde_json::from_slice(&reply.body)
                .map(Some)
                .map_err(|e| events::Error::Storage(format!("engine's drone state: {e}"))),
            _ => Err(engine_error(&reply)),
        }
    }
}

fn not_here() -> events::Error {
    events::Error::Storage("consuming a queue is done over QUIC against the ingest role".into())
}

impl WorkQueues for RemoteEngine {
    async fn enqueue(&self, queue: QueueName, key: u64, payload: Vec<u8>) -> Result<u64, events::Error> {
        let path = format!("/internal/v1/engine/queues/{}/messages?key={key}", queue.name());
        let call = Call::raw(Method::POST, path, payload.into());
        let reply = self.call(call).await?;
        if !reply.status.is_success() {
            return Err(engine_error(&reply));
        }
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
        body["id"].as_u64().ok_or_else(|| events::Error::Storage("engine's enqueue answer has no id".into()))
    }

    async fn lease(
        &self,
        _: QueueName,
        _: u64,
        _: events::KeyRange,
        _: usize,
        _: Duration,
    ) -> Result<Vec<events::Leased>, events::Error> {
        Err(not_here())
    }

    fn settle(&self, _: QueueName, _: u64, _: u64, _: events::Verdict) -> Result<(), events::Error> {
        Err(not_here())
    }

    fn release(&self, _: QueueName, _: u64) {}

    fn attach(&self, _: QueueName, _: events::KeyRange) -> Result<u64, events::Error> {
        Err(not_here())
    }
}

/// The engine API the ingest role serves to the other roles, and the engine's public routes
/// (queues, dead letters, streams) for the gateway to forward.
pub fn engine_router(engine: Engine, intake: crate::intake::Intake) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/internal/v1/engine/commands", post(engine_command))
        .route("/internal/v1/engine/queues/{queue}/messages", post(engine_enqueue))
        .route("/internal/v1/engine/drones/{id}", get(engine_drone))
        .with_state(engine.clone())
        .merge(crate::admin::router(engine))
        .merge(crate::intake::router(intake))
        .layer(axum::middleware::from_fn(services::trace::propagate))
}

async fn engine_command(
    State(engine): State<Engine>,
    trace: Option<axum::Extension<TraceContext>>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, services::Error> {
    let cmd: DeliveryCommand =
        serde_json::from_slice(&body).map_err(|e| services::Error::BadRequest(format!("a delivery command: {e}")))?;
    let trace = trace.map(|axum::Extension(t)| t).unwrap_or_default();
    engine.command_traced(cmd, trace).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyQuery {
    key: u64,
}

async fn engine_enqueue(
    State(engine): State<Engine>,
    Path(queue): Path<String>,
    Query(q): Query<KeyQuery>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, services::Error> {
    let queue = QueueName::ALL
        .into_iter()
        .find(|n| n.name() == queue)
        .ok_or_else(|| services::Error::BadRequest(format!("no queue {queue:?}")))?;
    let id = engine.enqueue(queue, q.key, body.to_vec()).await?;
    Ok(axum::Json(serde_json::json!({ "id": id })))
}

async fn engine_drone(State(engine): State<Engine>, Path(id): Path<u64>) -> Result<impl IntoResponse, services::Error> {
    let snapshot = engine.drone(id).await?.ok_or(services::Error::NotFound { what: "drone", id })?;
    Ok(axum::Json(snapshot))
}

/// A running role other than `all` and `ingest`.
#[derive(Debug)]
pub struct RoleProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its base URL on that address (`https://` or `http://`, as its transport says).
    pub url: String,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    server: JoinHandle<std::io::Result<()>>,
    /// Readiness is off once this is on.
    stopping: Arc<AtomicBool>,
    /// How long it stays not ready, still serving, before its listener closes.
    drain_delay: Duration,
    /// A role's own hold on its data dir (the engine API's node holds its own).
    _data_dir_lock: Option<crate::datadir::DataDirLock>,
}

impl RoleProcess {
    /// Turns readiness off and waits `[http] drain_delay_ms` (load balancers stop sending
    /// new requests), then stops listening, lets requests in flight finish and stops the
    /// consumers.
    pub async fn shutdown(self) -> Result<(), Error> {
        if !self.stopping.swap(true, Ordering::SeqCst) && !self.drain_delay.is_zero() {
            tracing::info!(delay_ms = self.drain_delay.as_millis() as u64, "shutting down: not ready, still serving");
            tokio::time::sleep(self.drain_delay).await;
        }
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.server
            .await
            .map_err(|e| Error::Task(e.to_string()))?
            .map_err(|e| Error::Io { context: "HTTPS server".into(), source: e })
    }
}

/// Where a role's spans of deliveries are kept: with the history role (`[split.endpoints]
/// history`), over HTTP; nowhere when the deployment has none.
pub fn remote_spans(cfg: &Config, role: Role) -> Result<services::spans::Spans, Error> {
    let split = &cfg.split;
    if split.endpoints.history.is_empty() || !cfg.tracing.spans.keep {
        return Ok(services::spans::Spans::off());
    }
    let client = split.client(role)?;
    let history = Dependency::remote("history", split.endpoints.required(Role::History)?, client, cfg.services.calls);
    Ok(services::spans::Spans::start(cfg.tracing.spans, services::spans::SpanSink::Remote(history)))
}

fn svc_error(e: services::Error) -> Error {
    Error::Task(e.to_string())
}

/// Starts `role` (not `all` or `ingest`, which run a [`crate::Node`]) from `cfg`.
pub async fn start(role: Role, cfg: &Config) -> Result<RoleProcess, Error> {
    if role == Role::Gateway {
        return start_gateway(cfg).await;
    }
    let data_dir_lock = crate::datadir::DataDirLock::acquire(&cfg.data_dir)?;
    let mut tracing_cfg = cfg.tracing.clone();
    tracing_cfg.service_name.get_or_insert_with(|| format!("fleetstream-{}", role.name()));
    services::trace::install_exporter(&tracing_cfg);
    let split = &cfg.split;
    let files = TlsFiles::in_dir(&split.tls_dir, role.name());
    let addr = listen_addr(split, role).await?;
    split.check(role, addr)?;
    let client = split.client(role)?;
    let policy = cfg.services.calls;
    let engine = || -> Result<RemoteEngine, Error> {
        Ok(RemoteEngine::new(split.endpoints.required(Role::Ingest)?, client.clone(), policy))
    };
    let dep = |name: &'static str, role: Role| -> Result<Dependency, Error> {
        Ok(Dependency::remote(name, split.endpoints.required(role)?, client.clone(), policy))
    };
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let data = &cfg.data_dir;
    let quic_target = || -> Result<QuicTarget, Error> {
        let pem = std::fs::read_to_string(&files.ca)
            .map_err(|e| Error::Io { context: format!("reading {}", files.ca.display()), source: e })?;
        QuicTarget::new(&split.engine_quic, ingest::Trust::Pem(pem))
    };
    // The role's stores: a stopped one turns readiness off.
    let mut stores: Vec<services::store::Store> = Vec::new();
    let (router, auth) = match role {
        Role::All | Role::Ingest | Role::Gateway => {
            return Err(Error::Config(format!("role {} is not a service role", role.name())));
        }
        Role::Accounts => {
            let store = services::store::Store::open(&data.join("accounts.redb")).map_err(svc_error)?;
            stores.push(store.clone());
            let accounts = services::accounts::Accounts::new(store);
            // Its public routes are reached through the gateway only: the listener takes
            // service certificates alone.
            (accounts.router().merge(accounts.public_router()), ClientAuth::Required)
        }
        Role::Packages => {
            let store = services::store::Store::open(&data.join("packages.redb")).map_err(svc_error)?;
            stores.push(store.clone());
            (services::packages::Packages::new(store).router(), ClientAuth::Required)
        }
        Role::Delivery => {
            let store = services::store::Store::open(&data.join("deliveries.redb")).map_err(svc_error)?;
            stores.push(store.clone());
            let stores = services::deliveries::DeliveryStores::in_file(&store);
            let svc = services::deliveries::DeliveryService::open(engine()?, stores, cfg.services.delivery_limits())
                .map_err(svc_error)?;
            let router = svc.public_router().merge(svc.internal_router());
            let positions = services::positions(&store);
            let apply = {
                let positions = positions.clone();
                move |batch: DeliveryBatch, next: u64| {
                    let (svc, positions) = (svc.clone(), positions.clone());
                    async move {
                        // Notifications first, then the records with the position, in one commit:
                        // a crash in between repeats notifications (same ids), never skips a stage.
                        let changed = svc.apply_delivery_events(&batch)?;
                        let ended = svc.notify(&batch).await?;
                        let mut position = services::store::Batch::new();
                        position.put(&positions, services::DELIVERY_EVENTS_POSITION, &next)?;
                        svc.persist(&changed, &ended, position).await
                    }
                }
            };
            tasks.push(tokio::spawn(follow_positioned(
                quic_target()?,
                "delivery-service",
                positions,
                apply,
                stop_rx.clone(),
            )));
            (router, ClientAuth::Optional)
        }
        Role::Drones => {
            let store = services::store::Store::open(&data.join("drones.redb")).map_err(svc_error)?;
            stores.push(store.clone());
            let svc =
                services::drones::DroneManagement::open(engine()?, cfg.services.drones, store.namespace("drones"))
                    .map_err(svc_error)?;
            svc.keep_spans(remote_spans(cfg, role)?);
            let router = svc.public_router().merge(svc.internal_router());
            tasks.push(tokio::spawn({
                let (svc, mut stop) = (svc.clone(), stop_rx.clone());
                async move {
                    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
                    loop {
                        tokio::select! {
                            _ = stop.wait_for(|s| *s) => break,
                            _ = every.tick() => {}
                        }
                        tokio::select! {
                            _ = stop.wait_for(|s| *s) => break,
                            _ = svc.sweep() => {}
                        }
                    }
                }
            }));
            let positions = services::positions(&store);
            let apply = {
                let positions = positions.clone();
                move |batch: DeliveryBatch, next: u64| {
                    let (svc, positions) = (svc.clone(), positions.clone());
                    async move {
                        // The freed drones are stored first; a crash before the position is
                        // stored frees them again, which changes nothing.
                        svc.apply_delivery_events(&batch).await?;
                        positions.put(services::DELIVERY_EVENTS_POSITION, &next).await.map(|_| ())
                    }
                }
            };
            tasks.push(tokio::spawn(follow_positioned(
                quic_target()?,
                "drone-management",
                positions,
                apply,
                stop_rx.clone(),
            )));
            (router, ClientAuth::Optional)
        }
        Role::History => {
            let history = Arc::new(
                services::history::History::open_configured(&cfg.history, &data.join("history.redb"))
                    .map_err(svc_error)?,
            );
            let router =
                services::history::router(history.clone()).merge(services::history::internal_router(history.clone()));
            let spans =
                services::spans::Spans::start(cfg.tracing.spans, services::spans::SpanSink::Local(history.clone()));
            tasks.push(tokio::spawn(follow_history(quic_target()?, history, spans, stop_rx.clone())));
            (router, ClientAuth::Optional)
        }
        Role::Scheduler => {
            let deps = services::scheduler::Deps {
                accounts: dep("accounts", Role::Accounts)?,
                packages: dep("package", Role::Packages)?,
                deliveries: dep("delivery", Role::Delivery)?,
                drones: dep("drone-management", Role::Drones)?,
                history: if split.endpoints.history.is_empty() { None } else { Some(dep("history", Role::History)?) },
            };
            // Its idempotency keys and saga journal in a file of its own; cut-short operations
            // are carried to an end at once (the Delivery role keeps its records itself).
            let store = services::store::Store::open(&data.join("scheduler.redb")).map_err(svc_error)?;
            stores.push(store.clone());
            let scheduler = Arc::new(
                services::scheduler::Scheduler::new(engine()?, deps)
                    .with_store(&store, cfg.services.idempotency_retention_s, cfg.services.idempotency_keys)
                    .await
                    .map_err(svc_error)?
                    .with_spans(remote_spans(cfg, role)?),
            );
            tasks.push({
                let recovery = scheduler.start_recovery(async {}).await.map_err(svc_error)?;
                let (scheduler, mut stop) = (scheduler.clone(), stop_rx.clone());
                tokio::spawn(async move {
                    let _ = recovery.await;
                    // Operations that failed part-way are tried again every 5 s, until the role
                    // stops.
                    let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
                    loop {
                        tokio::select! {
                            _ = stop.wait_for(|s| *s) => break,
                            _ = every.tick() => {}
                        }
                        scheduler.retry_left().await;
                    }
                })
            });
            let throttle = services::throttle::Throttle::new(cfg.http.throttle);
            let router = scheduler
                .router()
                .route_layer(axum::middleware::from_fn_with_state(throttle, services::throttle::limit));
            (router, ClientAuth::Optional)
        }
    };
    let api_keys = cfg.http.keys()?;
    // The public API's description, on every role that serves part of it.
    let router = match auth {
        ClientAuth::Optional => router.merge(crate::admin::openapi_router()),
        _ => router,
    };
    let stopping = Arc::new(AtomicBool::new(false));
    let readiness = {
        let stopping = stopping.clone();
        move || {
            let mut parts = Vec::new();
            if stopping.load(Ordering::SeqCst) {
                parts.push(("node".to_string(), "draining: shutting down".to_string()));
            }
            for reason in stores.iter().filter_map(services::store::Store::failure) {
                parts.push(("store".to_string(), reason));
            }
            std::future::ready(crate::node::readiness(parts))
        }
    };
    let router = router
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readiness))
        .layer(axum::middleware::from_fn_with_state(api_keys, services::auth::require_public))
        .layer(axum::middleware::from_fn(services::tls::internal_only))
        .layer(axum::middleware::from_fn(services::trace::propagate))
        .layer(axum::extract::DefaultBodyLimit::max(cfg.http.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(cfg.http.request_rules(), services::uniform));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Io { context: format!("binding {} HTTP {addr}", role.name()), source: e })?;
    let addr = listener.local_addr().map_err(|e| Error::Io { context: "HTTP address".into(), source: e })?;
    let mut server_stop = stop_rx;
    let server = serve_role(split, listener, router, &files, auth, cfg.http.header_timeout(), async move {
        let _ = server_stop.wait_for(|s| *s).await;
    })?;
    tracing::info!(role = role.name(), http = %addr, transport = ?split.transport, "role started");
    let url = format!("{}://{addr}", split.transport.scheme());
    let drain_delay = Duration::from_millis(cfg.http.drain_delay_ms);
    Ok(RoleProcess { addr, url, stop, tasks, server, stopping, drain_delay, _data_dir_lock: Some(data_dir_lock) })
}

/// Serves a role's `router` on `listener` as `[split] transport` says: HTTPS with its
/// certificate from `files` and client certificates checked as `auth` says, or plain HTTP with
/// every caller taken for a service (the mesh authenticated it).
fn serve_role(
    split: &SplitConfig,
    listener: tokio::net::TcpListener,
    router: Router,
    files: &TlsFiles,
    auth: ClientAuth,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<JoinHandle<std::io::Result<()>>, Error> {
    Ok(match split.transport {
        Transport::Mtls => {
            let tls = services::tls::server_config(files, auth).map_err(svc_error)?;
            tokio::spawn(services::tls::serve(
                listener,
                router,
                tls,
                Arc::new(TlsMetrics::default()),
                header_timeout,
                shutdown,
            ))
        }
        Transport::Plain => tokio::spawn(services::tls::serve_plain_as(
            listener,
            router,
            services::tls::PeerCertificate(true),
            header_timeout,
            shutdown,
        )),
    })
}

/// Starts the gateway: the public HTTPS listener (the `[http] tls` certificate, else the CA's
/// `gateway` one) on its first `[split.endpoints] gateway` address, forwarding to every role
/// with endpoints configured (see [`crate::gateway`]).
async fn start_gateway(cfg: &Config) -> Result<RoleProcess, Error> {
    let mut tracing_cfg = cfg.tracing.clone();
    tracing_cfg.service_name.get_or_insert_with(|| "fleetstream-gateway".into());
    services::trace::install_exporter(&tracing_cfg);
    let split = &cfg.split;
    let files = TlsFiles::in_dir(&split.tls_dir, Role::Gateway.name());
    let addr = listen_addr(split, Role::Gateway).await?;
    split.check(Role::Gateway, addr)?;
    let client = split.client(Role::Gateway)?;
    let policy = cfg.services.calls;
    let mut targets = Vec::new();
    for role in [Role::Scheduler, Role::Delivery, Role::History, Role::Drones, Role::Accounts, Role::Ingest] {
        let urls = split.endpoints.of(role);
        if urls.is_empty() {
            tracing::warn!(role = role.name(), "no [split.endpoints] for this role: the gateway leaves its routes out");
            continue;
        }
        targets.push((role, Dependency::remote(role.name(), urls, client.clone(), policy)));
    }
    let stopping = Arc::new(AtomicBool::new(false));
    let gateway =
        crate::gateway::Gateway::new(targets, Duration::from_millis(policy.timeout_ms.max(1)), stopping.clone());
    let api_keys = cfg.http.keys()?;
    if !api_keys.enforced() {
        tracing::warn!("the gateway's API is open: no API keys are configured ([http] api_keys)");
    }
    let throttle = services::throttle::Throttle::new(cfg.http.throttle);
    let tls_metrics = Arc::new(TlsMetrics::default());
    let metrics = {
        let (gateway, throttle, api_keys, tls_metrics) =
            (gateway.clone(), throttle.clone(), api_keys.clone(), tls_metrics.clone());
        move || {
            let mut out = String::new();
            events::prom::counter(
                &mut out,
                "fleetstream_http_throttled_total",
                throttle.throttled.load(std::sync::atomic::Ordering::Relaxed),
            );
            services::auth::render_metrics(&api_keys, &mut out);
            events::limits::render(&mut out);
            tls_metrics.render(&mut out);
            gateway.render_metrics(&mut out);
            std::future::ready(events::prom::annotate(&out))
        }
    };
    let router = gateway
        .router()
        .route_layer(axum::middleware::from_fn_with_state(throttle, services::throttle::limit))
        .merge(crate::admin::openapi_router())
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(api_keys, services::auth::require))
        .layer(axum::middleware::from_fn(services::trace::propagate))
        .layer(axum::extract::DefaultBodyLimit::max(cfg.http.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(cfg.http.request_rules(), services::uniform));
    // Its public side: the `[http] tls` certificate, else the CA's `gateway` one; with the
    // plain transport and no `[http] tls`, plain HTTP behind the mesh's ingress.
    let tls = match (&cfg.http.tls, split.transport) {
        (Some(tls), _) => Some(TlsFiles { cert: tls.cert.clone(), key: tls.key.clone(), ca: Default::default() }),
        (None, Transport::Mtls) => Some(files),
        (None, Transport::Plain) => None,
    }
    .map(|files| services::tls::server_config(&files, ClientAuth::None).map_err(svc_error))
    .transpose()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Io { context: format!("binding the gateway {addr}"), source: e })?;
    let addr = listener.local_addr().map_err(|e| Error::Io { context: "HTTPS address".into(), source: e })?;
    let (stop, mut stop_rx) = watch::channel(false);
    let shutdown = async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = match tls {
        Some(tls) => {
            tokio::spawn(services::tls::serve(listener, router, tls, tls_metrics, cfg.http.header_timeout(), shutdown))
        }
        None => tokio::spawn(services::tls::serve_plain(listener, router, cfg.http.header_timeout(), shutdown)),
    };
    let url = format!("{scheme}://{addr}");
    tracing::info!(%url, "gateway started");
    let drain_delay = Duration::from_millis(cfg.http.drain_delay_ms);
    Ok(RoleProcess { addr, url, stop, tasks: Vec::new(), server, stopping, drain_delay, _data_dir_lock: None })
}

/// The ingest role's engine API for the other roles, on its first `[split.endpoints] ingest`
/// address; callers need a certificate from the CA.
pub async fn start_engine_api(
    engine: Engine,
    health: &crate::node::Health,
    cfg: &Config,
) -> Result<RoleProcess, Error> {
    let files = TlsFiles::in_dir(&cfg.split.tls_dir, Role::Ingest.name());
    let addr = listen_addr(&cfg.split, Role::Ingest).await?;
    cfg.split.check(Role::Ingest, addr)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Io { context: format!("binding the engine API {addr}"), source: e })?;
    let addr = listener.local_addr().map_err(|e| Error::Io { context: "HTTP address".into(), source: e })?;
    let (stop, mut stop_rx) = watch::channel(false);
    let intake = crate::intake::Intake::for_node(engine.clone(), cfg, crate::intake::Adapter::Http)?;
    let router = engine_router(engine, intake)
        .merge(health.router())
        .layer(axum::middleware::from_fn_with_state(cfg.http.keys()?, services::auth::require_public))
        .layer(axum::extract::DefaultBodyLimit::max(cfg.http.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(cfg.http.request_rules(), services::uniform));
    let server = serve_role(
        &cfg.split,
        listener,
        router,
        &files,
        ClientAuth::Required,
        cfg.http.header_timeout(),
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    )?;
    tracing::info!(http = %addr, transport = ?cfg.split.transport, "engine API started");
    let url = format!("{}://{addr}", cfg.split.transport.scheme());
    Ok(RoleProcess {
        addr,
        url,
        stop,
        tasks: Vec::new(),
        server,
        // The node's readiness: the engine API drains first, then the node without waiting
        // again.
        stopping: health.stopping.clone(),
        drain_delay: Duration::from_millis(cfg.http.drain_delay_ms),
        _data_dir_lock: None,
    })
}

/// For the ingest role: serve QUIC with the CA-issued `ingest` certificate (unless one is
/// configured), so the other roles' subscriptions verify it against the CA.
pub fn use_ca_certificate_for_quic(cfg: &mut Config) {
    if cfg.ingest.cert.is_none() {
        let files = TlsFiles::in_dir(&cfg.split.tls_dir, Role::Ingest.name());
        cfg.ingest.cert = Some(files.cert);
        cfg.ingest.key = Some(files.key);
    }
}

/// Where a role subscribes to the ingest role: `host:port`, resolved at each connect, and the
/// name its certificate is checked for (the host; `localhost` for an address, as the CA's
/// certificates name it).
#[derive(Debug, Clone)]
struct QuicTarget {
    host_port: String,
    cfg: ingest::ClientConfig,
}

impl QuicTarget {
    fn new(host_port: &str, trust: ingest::Trust) -> Result<Self, Error> {
        let (host, _port) = host_port
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .ok_or_else(|| Error::Config(format!("[split] engine_quic = {host_port:?}: expected host:port")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut cfg = ingest::ClientConfig::new(trust);
        if host.parse::<std::net::IpAddr>().is_err() {
            cfg.server_name = host.to_string();
        }
        Ok(Self { host_port: host_port.to_string(), cfg })
    }

    async fn connect(&self) -> Result<ingest::IngestClient, ingest::Error> {
        let addr = tokio::net::lookup_host(&self.host_port)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| events::Error::Storage(format!("{} resolves to no address", self.host_port)))?;
        ingest::IngestClient::connect(addr, &self.cfg).await
    }
}

/// Runs `session` (a subscription to the ingest role) until `stop`, starting it again a
/// second after each time it ends with an error (the ingest restarted, the network dropped).
async fn reconnecting<S, Fut>(what: &'static str, mut stop: watch::Receiver<bool>, mut session: S)
where
    S: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), ingest::Error>>,
{
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            outcome = session() => if let Err(error) = outcome {
                tracing::warn!(what, %error, "delivery-events subscription ended; reconnecting");
            },
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Follows delivery-events under the named cursor `name`, applying each batch and then
/// committing past it; after a reconnect it resumes at the last commit.
/// A read model's consumer in its own process: reads delivery-events from the position its
/// store holds (the earliest offset when it holds none, never the latest) and hands each batch
/// to `apply` with the offset after it, which `apply` stores with its writes. An error stops
/// the round: after a backoff the consumer reconnects and starts again from the stored
/// position, so nothing is skipped.
async fn follow_positioned<A, Fut>(
    quic: QuicTarget,
    name: &'static str,
    positions: services::store::Store,
    apply: A,
    stop: watch::Receiver<bool>,
) where
    A: Fn(DeliveryBatch, u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), services::Error>> + Send,
{
    let failed = |e: services::Error| ingest::Error::from(events::Error::Storage(e.to_string()));
    reconnecting(name, stop, || async {
        let next = positions.get::<u64>(services::DELIVERY_EVENTS_POSITION).map_err(failed)?;
        let from = next.map_or(StartAt::Earliest, StartAt::Offset);
        let client = quic.connect().await?;
        let mut sub = client.subscribe_from::<DeliveryEvent>(Topic::DeliveryEvents, from).await?;
        tracing::info!(consumer = name, start = sub.start(), "following delivery-events");
        while let Some((offset, batch)) = sub.next().await? {
            apply(batch, offset + 1).await.map_err(failed)?;
        }
        Ok(())
    })
    .await;
}

/// Delivery History's consumer in its own process: reads delivery-events from the offset its
/// store says comes next and stores each batch with the offset after it.
async fn follow_history(
    quic: QuicTarget,
    history: Arc<services::history::History>,
    spans: services::spans::Spans,
    stop: watch::Receiver<bool>,
) {
    let storage = |e: &dyn std::fmt::Display| ingest::Error::from(events::Error::Storage(e.to_string()));
    reconnecting("history", stop, || async {
        let next = history.next_offset().map_err(|e| storage(&e))?;
        let from = next.map_or(StartAt::Earliest, StartAt::Offset);
        let client = quic.connect().await?;
        let mut sub = client.subscribe_from::<DeliveryEvent>(Topic::DeliveryEvents, from).await?;
        while let Some((offset, batch)) = sub.next().await? {
            let started = std::time::Instant::now();
            let h = history.clone();
            let group = tokio::task::spawn_blocking(move || h.apply(offset, &batch).map(|()| [(offset, batch)]))
                .await
                .map_err(|e| storage(&e))?
                .map_err(|e| storage(&e))?;
            services::spans::history_stored(&spans, &group, started);
        }
        Ok(())
    })
    .await;
    if let Err(error) = history.flush() {
        tracing::error!(%error, "could not store the last owner notes of delivery history");
    }
}
