//! The scheduler against a Package service in another "process" (its own HTTPS listener with
//! mutual TLS, over a real socket): down, it makes scheduling fail fast with an error naming
//! it and nothing left behind; the circuit opens, and closes again once the service is back;
//! a retried write is stored once.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::FakeFleet;
use serde_json::json;
use services::breaker::{BreakerConfig, State};
use services::client::{CallPolicy, Dependency};
use services::scheduler::{Deps, Scheduler};
use services::tls::{ClientAuth, TlsFiles, TlsMetrics};
use services::{CreateDelivery, Error, Services};

struct Setup {
    fleet: Arc<FakeFleet>,
    local: Services<Arc<FakeFleet>>,
    scheduler: Scheduler<Arc<FakeFleet>>,
    packages: Arc<services::packages::Packages>,
    ca: std::path::PathBuf,
    addr: SocketAddr,
}

fn policy() -> CallPolicy {
    CallPolicy {
        timeout_ms: 500,
        retries: 2,
        backoff_min_ms: 5,
        backoff_max_ms: 20,
        health_interval_ms: 50,
        breaker: BreakerConfig { window_s: 10, min_calls: 6, failure_ratio: 0.5, open_ms: 300, probes: 1 },
        ..CallPolicy::default()
    }
}

/// The scheduler with Accounts, Delivery and Drone Management in process and Package behind
/// HTTPS at a port where nothing listens yet.
async fn setup(tag: &str) -> Setup {
    let ca = std::env::temp_dir().join(format!("fleetstream-resilience-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&ca);
    services::tls::init_ca(&ca, &[], services::tls::Validity::default()).unwrap();
    let fleet = Arc::new(FakeFleet::default());
    let local = Services::new(fleet.clone()).await.unwrap();
    local.accounts.put("acme", true).await.unwrap();
    local.register_drones(&[1, 2, 3]).await.unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let client = services::tls::client(&TlsFiles::in_dir(&ca, "scheduler")).unwrap();
    let deps = Deps {
        accounts: Dependency::local("accounts", local.accounts.router(), policy()),
        packages: Dependency::remote("package", &[format!("https://localhost:{}", addr.port())], client, policy()),
        deliveries: Dependency::local("delivery", local.deliveries.internal_router(), policy()),
        drones: Dependency::local("drone-management", local.drones.internal_router(), policy()),
        history: None,
    };
    let scheduler = Scheduler::new(fleet.clone(), deps);
    let packages = services::packages::Packages::new(services::store::Store::in_memory().unwrap());
    Setup { fleet, local, scheduler, packages, ca, addr }
}

/// Serves `router` as the Package service (client certificates required) until `stop`.
async fn serve_packages(s: &Setup, router: axum::Router) -> tokio::sync::oneshot::Sender<()> {
    let router = router.route("/healthz", axum::routing::get(|| async { "ok" }));
    let tls = services::tls::server_config(&TlsFiles::in_dir(&s.ca, "packages"), ClientAuth::Required).unwrap();
    let listener = tokio::net::TcpListener::bind(s.addr).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(services::tls::serve(
        listener,
        router,
        tls,
        Arc::new(TlsMetrics::default()),
        Duration::from_secs(10),
        async {
            let _ = stopped.await;
        },
    ));
    stop
}

fn order() -> CreateDelivery {
    serde_json::from_value(json!({
        "owner": "acme",
        "pickup": {"lat": 47.6, "lon": -122.3},
        "dropoff": {"lat": 47.62, "lon": -122.35},
        "package": {"size": "small", "weight_kg": 1.2}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_package_down_scheduling_fails_fast_leaves_nothing_and_the_circuit_recovers() {
    let s = setup("down").await;
    let packages = s.scheduler.deps().packages.clone();

    // Down: each attempt is refused at once; the error names the dependency.
    let started = Instant::now();
    let err = s.scheduler.schedule(order(), events::TraceContext::new_root()).await.unwrap_err();
    assert!(matches!(err, Error::Dependency { service: "package", .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "failed fast: {:?}", started.elapsed());
    let resp = axum::response::IntoResponse::into_response(err);
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((body["error"].as_str(), body["dependency"].as_str()), (Some("dependency_failed"), Some("package")));
    // Nothing half-made: no drone taken, no record, nothing sent to the engine.
    assert_eq!(s.local.fleet_size(), (3, 3));
    assert_eq!(s.local.deliveries.record_count(), 0);
    assert!(s.fleet.commands.lock().is_empty());

    // Another failing call (three attempts each) fills the breaker's window: it opens and
    // the next call is refused without touching the network.
    let _ = s.scheduler.schedule(order(), events::TraceContext::new_root()).await.unwrap_err();
    assert!(matches!(packages.breaker_state(), State::Open { .. }), "{:?}", packages.breaker_state());
    let started = Instant::now();
    let err = s.scheduler.schedule(order(), events::TraceContext::new_root()).await.unwrap_err();
    assert!(err.to_string().contains("circuit open"), "{err}");
    assert!(started.elapsed() < Duration::from_millis(100), "short-circuited: {:?}", started.elapsed());
    assert!(packages.metrics().short_circuited.load(Ordering::Relaxed) >= 1);
    assert_eq!(s.local.fleet_size(), (3, 3));

    // The service comes back: once the breaker lets a probe through and it succeeds, the
    // circuit closes and scheduling works again.
    let _stop = serve_packages(&s, s.packages.router()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        assert!(Instant::now() < deadline, "the circuit did not close");
        match s.scheduler.schedule(order(), events::TraceContext::new_root()).await {
            Ok(record) => break record,
            Err(Error::Dependency { service: "package", .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(other) => panic!("{other}"),
        }
    };
    assert_eq!(packages.breaker_state(), State::Closed);
    assert_eq!(s.packages.ids().unwrap(), vec![record.delivery_id]);
    assert_eq!(s.local.fleet_size(), (3, 2));
    let _ = std::fs::remove_dir_all(&s.ca);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_write_whose_answer_was_lost_is_stored_once() {
    let s = setup("retry").await;
    // The first PUT is applied, then its answer is lost (the caller sees a 503).
    let lose_next = Arc::new(AtomicBool::new(true));
    let router = s.packages.router().layer(axum::middleware::from_fn({
        let lose_next = lose_next.clone();
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let lose_next = lose_next.clone();
            async move {
                let put = req.method() == axum::http::Method::PUT;
                let resp = next.run(req).await;
                if put && lose_next.swap(false, Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response_parts();
                }
                resp
            }
        }
    }));
    let _stop = serve_packages(&s, router).await;
    let record = s.scheduler.schedule(order(), events::TraceContext::new_root()).await.unwrap();
    let packages = s.scheduler.deps().packages.metrics();
    assert_eq!(packages.retries.load(Ordering::Relaxed), 1, "the lost answer was retried");
    assert!(!lose_next.load(Ordering::SeqCst));
    assert_eq!(s.packages.ids().unwrap(), vec![record.delivery_id], "one package, not two");
    assert_eq!(s.fleet.commands.lock().len(), 1);
    let _ = std::fs::remove_dir_all(&s.ca);
}

trait IntoResponseParts {
    fn into_response_parts(self) -> axum::response::Response;
}

impl IntoResponseParts for StatusCode {
    fn into_response_parts(self) -> axum::response::Response {
        axum::response::IntoResponse::into_response(self)
    }
}
