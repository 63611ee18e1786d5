//! One running node: ingest, engine and services composed from a [`Config`], and their orderly
//! shutdown.
//!
//! Start order: engine threads, the services' delivery-events consumer, the HTTP API, the QUIC
//! ingest. Shutdown runs the other way round so nothing accepted is dropped: the ingest stops
//! reading and answers what it already took, the HTTP API finishes its requests, the engine
//! drains its queues, and the consumer applies the last delivery events.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use events::StreamSource;
use ingest::{IngestMetrics, IngestServer};
use services::Services;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::info;

use crate::Error;
use crate::config::Config;
use crate::engine::{Engine, EngineThreads, StartReport, Storage};

/// A running node.
#[derive(Debug)]
pub struct Node {
    /// The QUIC ingest address.
    pub quic_addr: SocketAddr,
    /// The HTTP API address.
    pub http_addr: SocketAddr,
    http_scheme: &'static str,
    /// The ingest server's certificate chain (PEM), for clients to trust.
    pub certificate_pem: String,
    /// The engine.
    pub engine: Engine,
    /// The services.
    pub services: Arc<Services<Engine>>,
    /// Ingest counters.
    pub ingest_metrics: Arc<IngestMetrics>,
    /// What the engine recovered at start.
    pub start_report: StartReport,
    /// The cluster this node belongs to, on the JetStream backend.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    threads: EngineThreads,
    ingest_stop: oneshot::Sender<()>,
    ingest_task: JoinHandle<Result<(), ingest::Error>>,
    http_stop: oneshot::Sender<()>,
    http_task: JoinHandle<std::io::Result<()>>,
    drain_timeout: std::time::Duration,
    drain_delay: std::time::Duration,
    consumer_stop: oneshot::Sender<()>,
    consumer_task: JoinHandle<()>,
    /// Which parts are running (readiness).
    pub health: Health,
    sweeper_task: JoinHandle<()>,
    probe_task: JoinHandle<()>,
    recovery_task: JoinHandle<services::scheduler::Recovered>,
    history_task: std::thread::JoinHandle<()>,
    history: Arc<services::history::History>,
    /// Where this node's parts record the spans of deliveries.
    spans: services::spans::Spans,
    notifier_stop: tokio::sync::watch::Sender<bool>,
    notifier_task: JoinHandle<()>,
    /// The MQTT bridge, when `[mqtt] url` is set.
    mqtt: Option<crate::mqtt::Bridge>,
    /// Held until the node is dropped, after shutdown has closed everything in the data dir.
    _data_dir_lock: crate::datadir::DataDirLock,
}

/// The JetStream settings with this node's lease name: the configured `node_id`, or else one
/// kept in the data directory (host name and the data directory's node name), so that the
/// node restarted on its data directory holds its shards under the same name and takes them
/// back at once instead of waiting for its previous run's leases to expire.
fn lasting_node_id(cfg: &Config) -> Result<crate::jetstream::JetStreamConfig, Error> {
    let mut js = cfg.jetstream.clone();
    if js.node_id.is_empty() {
        let name = services::node_name(&cfg.data_dir.join("services")).map_err(|e| Error::Task(e.to_string()))?;
        js.node_id = format!("{}-{name}", crate::cluster::host_name());
    }
    Ok(js)
}

impl Node {
    /// Starts everything. The ingest certificate is at `DATA_DIR/tls/ingest-cert.pem` so
    /// clients on this machine can trust a self-signed one.
    pub async fn start(cfg: &Config) -> Result<Self, Error> {
        Self::start_as(cfg, crate::roles::Role::All).await
    }

    /// [`Node::start`] as `role` (`all` or `ingest`): the ingest role keeps the spans of
    /// deliveries with the history role, not in a store of its own.
    pub async fn start_as(cfg: &Config, role: crate::roles::Role) -> Result<Self, Error> {
        // A malformed key entry is a configuration error, reported before anything starts.
        let api_keys = cfg.http.keys()?;
        // Before anything in the data dir is opened: a second node there would damage the logs.
        let data_dir_lock = crate::datadir::DataDirLock::acquire(&cfg.data_dir)?;
        services::trace::install_exporter(&cfg.tracing);
        let cluster = match cfg.log.backend {
            crate::log::LogBackend::Embedded => None,
            crate::log::LogBackend::Jetstream => Some(
                crate::cluster::Cluster::connect(
                    &lasting_node_id(cfg)?,
                    cfg.engine.shard_count(),
                    cfg.engine.append_queue,
                    cfg.engine.max_producers,
                )
                .await?,
            ),
        };
        let storage = match &cluster {
            None => Storage::Durable { dir: cfg.data_dir.clone(), log: cfg.log },
            Some(cluster) => Storage::External {
                dir: cfg.data_dir.clone(),
                backend: crate::cluster::ClusterBackend::new(cluster.clone()),
            },
        };
        let (engine_cfg, queues_cfg) = (cfg.engine, cfg.queues);
        let (engine, threads, report) =
            tokio::task::spawn_blocking(move || Engine::start_with_queues(engine_cfg, storage, &queues_cfg))
                .await
                .map_err(|e| Error::Task(e.to_string()))??;
        if let Some(cluster) = &cluster
            && let Err(error) = cluster.share_cursors(engine.cursors().clone()).await
        {
            engine.shutdown(threads).await;
            return Err(error);
        }
        match crate::jetstream::open_queues(&cfg.jetstream, &cfg.queues, cluster.is_some()).await {
            Ok(opened) => {
                for (queue, backend) in opened {
                    engine.use_queue_backend(queue, backend);
                }
            }
            Err(error) => {
                engine.shutdown(threads).await;
                return Err(error);
            }
        }
        let history_path = cfg.data_dir.join("history").join("history.redb");
        let history = Arc::new(
            services::history::History::open_configured(&cfg.history, &history_path)
                .map_err(|e| Error::Task(format!("opening delivery history: {e}")))?,
        );
        let spans = match role {
            crate::roles::Role::Ingest => crate::roles::remote_spans(cfg, role)?,
            _ => services::spans::Spans::start(cfg.tracing.spans, services::spans::SpanSink::Local(history.clone())),
        };
        engine.keep_spans(spans.clone());
        let history_following = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let history_task = start_history(&engine, history.clone(), history_following.clone(), spans.clone())?;
        let (notifier_stop, notifier_rx) = tokio::sync::watch::channel(false);
        let notifier_task = if cfg.notify.notifier {
            tokio::spawn(services::notify::run(
                Arc::new(engine.clone()),
                cfg.notify.clone(),
                spans.clone(),
                notifier_rx,
            ))
        } else {
            tokio::spawn(async {})
        };
        // On JetStream a shard is nobody's for a moment after a restart (until its lease is
        // taken again and its state restored): the services start once every shard answers, so
        // Drone Management's first look at the fleet finds it and scheduling works at once.
        if let Some(cluster) = &cluster {
            let wait = std::time::Duration::from_millis(cfg.jetstream.lease_ms.saturating_mul(5).max(5_000));
            if !cluster.wait_until_served(wait).await {
                tracing::warn!(
                    waited_ms = wait.as_millis() as u64,
                    "not every shard answers yet; starting the services anyway"
                );
            }
        }
        let services_dir = cfg.data_dir.join("services");
        let services = Arc::new(
            Services::open(
                engine.clone(),
                &services_dir,
                cfg.services.clone(),
                Some(history.clone()),
                cluster
                    .clone()
                    .map(|c| Arc::new(crate::cluster::ClusterIdBlocks(c)) as Arc<dyn services::ids::IdBlocks>),
                spans.clone(),
            )
            .await
            .map_err(|e| Error::Task(format!("opening the services' stores in {}: {e}", services_dir.display())))?,
        );

        // Owner notes reach Delivery History with its next batch, so a crash can lose the last
        // few: the notes of the newest deliveries are written again (idempotently). Not those of
        // schedules a crash cut short: recovery writes theirs if it completes them, and an
        // undone one must not be listed.
        let cut_short: std::collections::HashSet<_> = services
            .scheduler
            .cut_short_schedules()
            .map_err(|e| Error::Task(format!("reading the saga journal: {e}")))?
            .into_iter()
            .collect();
        for (id, owner, created_us) in services.deliveries.recent_owners(OWNER_NOTES_REPLAYED_US) {
            if cut_short.contains(&id) {
                continue;
            }
            history.note_delivery(id, &owner, created_us).map_err(|e| Error::Task(format!("delivery history: {e}")))?;
        }
        history.flush().map_err(|e| Error::Task(format!("delivery history: {e}")))?;

        // The services follow delivery events through the log, never through a blocking live
        // subscription: applying a batch asks the shards for drone state, and a shard that is
        // checkpointing waits for the publisher, so a publisher blocked on this consumer's full
        // queue would close a cycle (seen at 1.2 M events/s: every thread waiting, nothing acked).
        // A log follower blocks only itself. They resume where their store says they stopped
        // (the position commits with the records), never at the latest offset: what was derived
        // while the node was down, or before a crash, is applied too.
        let resume = services.delivery_events_position().map_err(|e| Error::Task(e.to_string()))?;
        let deliveries = follow_deliveries(&engine, "the services", resume)?;
        let following = Arc::new(std::sync::atomic::AtomicBool::new(true));
        // Test hook: hold each round this long before applying it, so a test can kill the node
        // while delivery events are derived but not yet applied by the services.
        let hold = std::env::var("FLEETSTREAM_TEST_SERVICES_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis);
        let (consumer_stop, mut stop_rx) = oneshot::channel::<()>();
        let svc = services.clone();
        let consumer_following = following.clone();
        // How far the records are: the scheduler's recovery waits for them to catch up.
        let (position_tx, position_rx) = tokio::sync::watch::channel(resume.unwrap_or(0));
        let consumer_task = tokio::spawn(async move {
            // Applies `first` and whatever else is already waiting (up to a round's worth):
            // the records they change are stored in one go with the position after them. False
            // once the stream has ended or a round could not be stored: the services stop
            // following (a restart applies the round again) rather than carry on past a hole.
            let apply = async |first: events::contract::LogItem<events::DeliveryEvent>| {
                let mut round = Vec::new();
                let mut next_offset = None;
                let mut item = Some(first);
                let mut going = true;
                while let Some(next) = item.take() {
                    match next {
                        Ok((offset, batch)) => {
                            next_offset = Some(offset + 1);
                            round.push(batch);
                        }
                        Err(events::Error::ShuttingDown) => going = false,
                        Err(error) => {
                            tracing::error!(%error, "the services stopped following delivery events");
                            going = false;
                        }
                    }
                    if going && round.len() < SERVICES_ROUND {
                        item = deliveries.rx.try_recv().ok();
                    }
                }
                if let Some(hold) = hold {
                    tokio::time::sleep(hold).await;
                }
                if !round.is_empty()
                    && let Err(error) = svc.apply_delivery_event_batches(&round, next_offset).await
                {
                    tracing::error!(%error, ?next_offset, "the services could not store what delivery events changed; they stop following until a restart");
                    return false;
                }
                if let Some(next) = next_offset {
                    position_tx.send_replace(next);
                }
                going
            };
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    item = deliveries.rx.recv_async() => match item {
                        Ok(item) => if !apply(item).await { break },
                        Err(_) => break,
                    }
                }
            }
            while let Ok(item) = deliveries.rx.try_recv() {
                if !apply(item).await {
                    break;
                }
            }
            consumer_following.store(false, std::sync::atomic::Ordering::SeqCst);
        });
        // Schedules, reschedules and cancels a crash cut short are carried to an end once the
        // records have caught up with the delivery events logged before the restart (a record's
        // stage tells whether the engine had a cut-short delivery).
        let logged = engine.topic_bounds(events::Topic::DeliveryEvents).1;
        let recovery_task = services
            .scheduler
            .start_recovery(records_caught_up(position_rx, logged))
            .await
            .map_err(|e| Error::Task(format!("reading the saga journal: {e}")))?;
        // Drones registered before they ever reported are looked up until they do; operations
        // that failed part-way (an undo that could not be made) are tried again every 5 s.
        let sweeper_task = tokio::spawn({
            let (drones, scheduler) = (services.drones.clone(), services.scheduler.clone());
            async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
                for tick in 0u64.. {
                    every.tick().await;
                    drones.sweep().await;
                    if tick % 5 == 4 {
                        let retried = scheduler.retry_left().await;
                        if retried.completed + retried.undone > 0 {
                            tracing::info!(?retried, "operations that had failed part-way were ended");
                        }
                    }
                }
            }
        });

        // Without a configured certificate the server keeps a self-signed one in DATA_DIR/tls,
        // so clients that trusted it keep trusting it across restarts.
        let tls_dir = cfg.data_dir.join("tls");
        let mut ingest_cfg = cfg.ingest.clone();
        ingest_cfg.self_signed_dir = Some(tls_dir.clone());
        let ingest = IngestServer::bind(&ingest_cfg)?;
        let quic_addr = ingest.local_addr()?;
        let certificate_pem = ingest.certificate_pem().to_string();
        let cert_path = tls_dir.join("ingest-cert.pem");
        if cfg.ingest.cert.is_some() {
            // A configured certificate: leave a copy where local clients look for it.
            std::fs::create_dir_all(&tls_dir)
                .map_err(|e| Error::Io { context: format!("creating {}", tls_dir.display()), source: e })?;
            std::fs::write(&cert_path, &certificate_pem)
                .map_err(|e| Error::Io { context: format!("writing {}", cert_path.display()), source: e })?;
        }
        let ingest_metrics = ingest.metrics();

        let listener = tokio::net::TcpListener::bind(cfg.http.listen)
            .await
            .map_err(|e| Error::Io { context: format!("binding HTTP {}", cfg.http.listen), source: e })?;
        let http_addr = listener.local_addr().map_err(|e| Error::Io { context: "HTTP address".into(), source: e })?;
        let health = Health {
            engine: engine.clone(),
            services: services.clone(),
            services_following: following.clone(),
            history_following,
            // Readiness waits for it: until then, orders a crash cut short may hold drones.
            recovery: recovery_task.abort_handle(),
            stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            unreachable: Arc::default(),
            cluster: cluster.clone(),
        };
        let probe_task = tokio::spawn(health.clone().probe());
        let throttle = services::throttle::Throttle::new(cfg.http.throttle);
        if !api_keys.enforced() {
            tracing::warn!(http = %http_addr, "the HTTP API is open: no API keys are configured ([http] api_keys)");
        }
        let mqtt = match cfg.mqtt.url {
            None => None,
            Some(_) => {
                let intake = crate::intake::Intake::for_node(engine.clone(), cfg, crate::intake::Adapter::Mqtt)?;
                let lease_for = std::time::Duration::from_millis(cfg.queues.drone_commands.visibility_timeout_ms);
                Some(crate::mqtt::Bridge::start(&cfg.mqtt, intake, lease_for)?)
            }
        };
        let mqtt_metrics = mqtt.as_ref().map(|b| b.metrics.clone());
        let dashboard =
            cfg.dashboard.enabled.then(|| crate::dashboard::Dashboard::start(engine.clone(), cfg.dashboard));
        let router = services::router_with(&services, throttle.clone())
            .merge(dashboard.as_ref().map_or_else(axum::Router::new, crate::dashboard::Dashboard::router))
            .merge(crate::admin::openapi_router())
            .merge(crate::admin::router(engine.clone()))
            .merge(crate::intake::router(crate::intake::Intake::for_node(
                engine.clone(),
                cfg,
                crate::intake::Adapter::Http,
            )?))
            .merge(services::history::router(history.clone()))
            .merge(health.router())
            .route(
                "/metrics",
                get({
                    let (engine, services, ingest_metrics) = (engine.clone(), services.clone(), ingest_metrics.clone());
                    let health = health.clone();
                    let (throttle, api_keys, spans) = (throttle.clone(), api_keys.clone(), spans.clone());
                    move || {
                        let mut out = String::new();
                        ingest_metrics.render(&mut out);
                        if let Some(m) = &mqtt_metrics {
                            m.render(&mut out);
                        }
                        crate::engine::render_metrics(&engine, &mut out);
                        engine.queues().render_metrics(&mut out);
                        crate::admin::render_cursor_metrics(&engine, &mut out);
                        events::prom::counter(
                            &mut out,
                            "fleetstream_http_throttled_total",
                            throttle.throttled.load(std::sync::atomic::Ordering::Relaxed),
                        );
                        services::auth::render_metrics(&api_keys, &mut out);
                        events::limits::render(&mut out);
                        services.render_metrics(&mut out);
                        events::prom::counter(
                            &mut out,
                            "fleetstream_spans_dropped_total",
                            services::trace::spans_dropped(),
                        );
                        spans.render_metrics(&mut out);
                        health.render_metrics(&mut out);
                        render_process_metrics(&mut out);
                        std::future::ready(events::prom::annotate(&out))
                    }
                }),
            )
            .layer(axum::middleware::from_fn_with_state(api_keys, services::auth::require))
            .layer(axum::extract::DefaultBodyLimit::max(cfg.http.max_body_bytes))
            .layer(axum::middleware::from_fn_with_state(cfg.http.request_rules(), services::uniform));
        let (http_stop, http_rx) = oneshot::channel::<()>();
        let http_stopped = async {
            let _ = http_rx.await;
        };
        let http_task = match &cfg.http.tls {
            None => tokio::spawn(services::tls::serve_plain(listener, router, cfg.http.header_timeout(), http_stopped)),
            Some(tls) => {
                // The CA is read only to check client certificates, which the public API does
                // not ask for.
                let files =
                    services::tls::TlsFiles { cert: tls.cert.clone(), key: tls.key.clone(), ca: Default::default() };
                let tls = services::tls::server_config(&files, services::tls::ClientAuth::None)
                    .map_err(|e| Error::Config(format!("[http] tls: {e}")))?;
                let metrics = Arc::new(services::tls::TlsMetrics::default());
                tokio::spawn(services::tls::serve(
                    listener,
                    router,
                    tls,
                    metrics,
                    cfg.http.header_timeout(),
                    http_stopped,
                ))
            }
        };
        let http_scheme = if cfg.http.tls.is_some() { "https" } else { "http" };
        let (ingest_stop, ingest_rx) = oneshot::channel::<()>();
        let sink = Arc::new(engine.clone());
        let ingest_task = tokio::spawn(ingest.serve(sink, async {
            let _ = ingest_rx.await;
        }));
        info!(quic = %quic_addr, http = %http_addr, cert = %cert_path.display(), "node started");
        Ok(Self {
            quic_addr,
            http_addr,
            http_scheme,
            certificate_pem,
            engine,
            services,
            ingest_metrics,
            start_report: report,
            cluster,
            threads,
            ingest_stop,
            ingest_task,
            http_stop,
            http_task,
            drain_timeout: std::time::Duration::from_millis(cfg.http.drain_timeout_ms),
            drain_delay: std::time::Duration::from_millis(cfg.http.drain_delay_ms),
            consumer_stop,
            consumer_task,
            health,
            sweeper_task,
            probe_task,
            recovery_task,
            history_task,
            history,
            spans,
            notifier_stop,
            notifier_task,
            mqtt,
            _data_dir_lock: data_dir_lock,
        })
    }

    /// The HTTP API's base URL.
    pub fn http_url(&self) -> String {
        format!("{}://{}", self.http_scheme, self.http_addr)
    }

    /// Drains and stops everything, in order.
    pub async fn shutdown(self) -> Result<(), Error> {
        // Readiness turns off first; load balancers get `drain_delay` to stop sending new
        // clients before the listeners close.
        // (Already off when the ingest role's engine API drained first and waited.)
        let already = self.health.stopping.swap(true, std::sync::atomic::Ordering::SeqCst);
        if !already && !self.drain_delay.is_zero() {
            info!(delay_ms = self.drain_delay.as_millis() as u64, "shutting down: not ready, still serving");
            tokio::time::sleep(self.drain_delay).await;
        }
        info!("shutting down: ingest");
        let _ = self.ingest_stop.send(());
        let ingest = self.ingest_task.await;
        if let Some(bridge) = self.mqtt {
            info!("shutting down: MQTT bridge");
            bridge.shutdown().await;
        }
        info!("shutting down: http");
        self.engine.begin_drain();
        let _ = self.http_stop.send(());
        // Requests in flight get `drain_timeout` to finish; a client that lingers (a request
        // never finished, an idle keep-alive) must not keep the engine from draining.
        let mut http_task = self.http_task;
        let http = match tokio::time::timeout(self.drain_timeout, &mut http_task).await {
            Ok(joined) => joined,
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.drain_timeout.as_millis() as u64,
                    "HTTP connections still open after the drain timeout: dropping them"
                );
                http_task.abort();
                Ok(Ok(()))
            }
        };
        self.sweeper_task.abort();
        self.probe_task.abort();
        self.recovery_task.abort();
        let _ = self.notifier_stop.send(true);
        let _ = self.notifier_task.await;
        info!("shutting down: engine");
        self.engine.shutdown(self.threads).await;
        let _ = self.consumer_stop.send(());
        let _ = self.consumer_task.await;
        let history_task = self.history_task;
        let _ = tokio::task::spawn_blocking(move || history_task.join()).await;
        if let Err(error) = self.history.flush() {
            tracing::error!(%error, "could not store the last owner notes of delivery history");
        }
        // The spans queued are written, and the keeper lets go of the history's store.
        self.spans.close().await;
        info!("stopped");
        ingest.map_err(|e| Error::Task(e.to_string()))??;
        http.map_err(|e| Error::Task(e.to_string()))?
            .map_err(|e| Error::Io { context: "HTTP server".into(), source: e })?;
        Ok(())
    }
}

/// What readiness and `/metrics` report: every part of the node that stopped after an error on
/// its durable path (see [`crate::engine::Stopped`]) or stopped following the log it feeds on.
/// A stopped part acknowledges nothing more; a restart recovers it from what is on disk.
#[derive(Debug, Clone)]
pub struct Health {
    engine: Engine,
    services: Arc<Services<Engine>>,
    services_following: Arc<std::sync::atomic::AtomicBool>,
    history_following: Arc<std::sync::atomic::AtomicBool>,
    recovery: tokio::task::AbortHandle,
    /// Turned on by the first step of a drain; the ingest role's engine API shares it.
    pub(crate) stopping: Arc<std::sync::atomic::AtomicBool>,
    /// What the last probe of the outside servers found unreachable (see [`Health::probe`]).
    unreachable: Arc<parking_lot::Mutex<Vec<(String, String)>>>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Health {
    /// Each stopped part and why.
    pub fn stopped(&self) -> Vec<(String, String)> {
        use std::sync::atomic::Ordering::SeqCst;
        let mut parts = self.engine.metrics().stopped.parts();
        for (queue, reason) in self.engine.queues().failures() {
            parts.push((format!("queue {}", queue.name()), reason));
        }
        if let Some(reason) = self.services.store_failure() {
            parts.push(("services store".into(), reason));
        }
        parts.extend(self.unreachable.lock().iter().cloned());
        let stopping = self.stopping.load(SeqCst);
        if stopping {
            parts.push(("node".into(), "draining: shutting down".into()));
        } else if !self.recovery.is_finished() {
            parts.push(("recovery".into(), "carrying operations a restart cut short to an end".into()));
        }
        if !stopping && !self.services_following.load(SeqCst) {
            parts.push(("services".into(), "stopped following delivery events (see the log)".into()));
        }
        if !stopping && !self.history_following.load(SeqCst) {
            parts.push(("delivery history".into(), "stopped following delivery events (see the log)".into()));
        }
        parts
    }

    /// Probes what the node depends on outside itself, once a second until aborted:
    /// PostgreSQL (when the services' store is there: a `SELECT 1`, and the writer's own
    /// reconnecting) and NATS (when the log is on JetStream: the client's connection). What
    /// does not answer turns readiness off until it does again.
    pub(crate) async fn probe(self) {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let mut found = Vec::new();
            let store = self.services.store().clone();
            if store.is_shared() {
                let ping = tokio::task::spawn_blocking(move || store.ping());
                match tokio::time::timeout(std::time::Duration::from_secs(3), ping).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(error))) => found.push(("postgres".to_string(), error.to_string())),
                    Ok(Err(error)) => found.push(("postgres".to_string(), error.to_string())),
                    Err(_) => found.push(("postgres".to_string(), "no answer to SELECT 1 within 3 s".to_string())),
                }
            }
            if let Some(reason) = self.services.store().unavailable() {
                found.push(("services store".to_string(), reason));
            }
            if let Some(reason) = self.cluster.as_ref().and_then(|c| c.nats_unavailable()) {
                found.push(("nats".to_string(), reason));
            }
            *self.unreachable.lock() = found;
        }
    }

    /// `GET /readyz`: `200 {"ready": true}`, or `503` naming every stopped part.
    pub fn router(&self) -> axum::Router {
        let health = self.clone();
        axum::Router::new().route("/readyz", get(move || std::future::ready(readiness(health.stopped()))))
    }

    /// `fleetstream_stopped{part}`: 1 for each stopped part.
    pub fn render_metrics(&self, out: &mut String) {
        events::prom::declare(out, "fleetstream_stopped", "gauge");
        for (part, _) in self.stopped() {
            out.push_str(&format!("fleetstream_stopped{{part=\"{part}\"}} 1\n"));
        }
    }
}

/// The answer of `GET /readyz`: `200 {"ready": true, "stopped": []}` when nothing is in
/// `stopped` (part, reason), else `503` naming each.
pub(crate) fn readiness(stopped: Vec<(String, String)>) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    let parts: Vec<_> =
        stopped.iter().map(|(part, reason)| serde_json::json!({"part": part, "reason": reason})).collect();
    let status =
        if stopped.is_empty() { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(serde_json::json!({"ready": stopped.is_empty(), "stopped": parts})))
}

/// How far back from the newest delivery a starting node writes owner notes again: notes wait
/// milliseconds for Delivery History's next batch, so ten minutes covers any crash.
const OWNER_NOTES_REPLAYED_US: u64 = 600_000_000;

/// Delivery-event batches the services apply in one round at most: as many as a log follower
/// reads ahead, so a follower that fell behind is caught up in one store commit.
const SERVICES_ROUND: usize = crate::engine::FOLLOW_QUEUE;

/// A read model's subscription to the delivery-events log from the offset its store says comes
/// next (the earliest held when it has none). An offset retention already deleted is logged:
/// `who` missed those events, and resumes at the earliest held.
/// Resolves once the services' records have applied delivery events up to `logged` (the
/// delivery-events log's end at start), or after a minute without (the node then says in
/// readiness that the services stopped following).
async fn records_caught_up(mut position: tokio::sync::watch::Receiver<u64>, logged: u64) {
    let caught_up = position.wait_for(|next| *next >= logged);
    if tokio::time::timeout(std::time::Duration::from_secs(60), caught_up).await.is_err() {
        tracing::warn!(
            logged,
            "the delivery records did not catch up within a minute; recovering cut-short operations anyway"
        );
    }
}

fn follow_deliveries(
    engine: &Engine,
    who: &str,
    next: Option<u64>,
) -> Result<events::OffsetSubscription<events::DeliveryEvent>, Error> {
    let Some(next) = next else { return Ok(engine.subscribe_deliveries_from(events::StartAt::Earliest)?) };
    engine.subscribe_deliveries_from(events::StartAt::Offset(next)).or_else(|error| {
        tracing::error!(%error, next, who, "behind retention: delivery events were lost to it; resuming at the earliest held");
        Ok(engine.subscribe_deliveries_from(events::StartAt::Earliest)?)
    })
}

/// Delivery History's consumer: reads the delivery-events log from where the store's last
/// commit left off and stores each batch with the offset after it (one transaction), until
/// the engine stops.
/// How long the delivery-events log may be quiet before Delivery History stores the owner
/// notes still waiting for a batch to ride with.
const OWNER_NOTES_IDLE: std::time::Duration = std::time::Duration::from_millis(500);

fn start_history(
    engine: &Engine,
    history: Arc<services::history::History>,
    following: Arc<std::sync::atomic::AtomicBool>,
    spans: services::spans::Spans,
) -> Result<std::thread::JoinHandle<()>, Error> {
    let resume = history.next_offset().map_err(|e| Error::Task(e.to_string()))?;
    let sub = follow_deliveries(engine, "delivery history", resume)?;
    std::thread::Builder::new()
        .name("delivery-history".into())
        .spawn(move || {
            // What arrives within LINGER of the first batch is stored in one transaction, up to
            // MAX_GROUP batches: the history is rebuilt from the log after a crash (its offset
            // commits with its rows), so it can trade a few ms of freshness for far fewer
            // commits, each rewriting fewer pages per event.
            const MAX_GROUP: usize = 256;
            const LINGER: std::time::Duration = std::time::Duration::from_millis(20);
            let mut group = Vec::with_capacity(MAX_GROUP);
            let mut ended = None;
            loop {
                let first = match sub.rx.recv_timeout(OWNER_NOTES_IDLE) {
                    Ok(first) => first,
                    // Owner notes ride with the next stored batch; one noted after its
                    // delivery's last batch (a schedule completed by recovery after the replay
                    // stored its Created) is written once the log is quiet.
                    Err(flume::RecvTimeoutError::Timeout) => {
                        if let Err(error) = history.flush() {
                            tracing::error!(%error, "delivery history could not store owner notes");
                            following.store(false, std::sync::atomic::Ordering::SeqCst);
                            return;
                        }
                        continue;
                    }
                    Err(flume::RecvTimeoutError::Disconnected) => return,
                };
                let until = std::time::Instant::now() + LINGER;
                let mut item = Some(first);
                while let Some(next) = item.take() {
                    match next {
                        Ok(b) => group.push(b),
                        Err(e) => {
                            ended = Some(e);
                            break;
                        }
                    }
                    if group.len() < MAX_GROUP {
                        item = sub.rx.recv_deadline(until).ok();
                    }
                }
                let started = std::time::Instant::now();
                if let Err(error) = history.apply_many(&group) {
                    let offset = group.first().map(|(o, _)| *o);
                    tracing::error!(%error, ?offset, "delivery history could not store its batches; it resumes there after a restart");
                    following.store(false, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                services::spans::history_stored(&spans, &group, started);
                group.clear();
                match ended.take() {
                    None => {}
                    Some(events::Error::ShuttingDown) => return,
                    Some(error) => {
                        tracing::error!(%error, "delivery history's subscription ended");
                        following.store(false, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                }
            }
        })
        .map_err(|e| Error::Io { context: "starting the delivery-history thread".into(), source: e })
}

/// The process's resident memory as `process_resident_memory_bytes` (the name Prometheus client
/// libraries use), read from `/proc/self/status`; nothing where that file does not exist.
fn render_process_metrics(out: &mut String) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return };
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    if let Some(kib) = rss_kib {
        events::prom::gauge(out, "process_resident_memory_bytes", kib * 1024);
    }
}
