//! Readiness follows what the node depends on: with the services' store on PostgreSQL reached
//! through a relay this test controls, cutting the relay turns `/readyz` to `503` naming
//! PostgreSQL, a write made meanwhile waits instead of failing or being lost, and restoring
//! the relay turns readiness back on and lands the write.
//!
//! Reads `FLEETSTREAM_PG_URL` (default: the local standard port, database `test`); without
//! the server it prints SKIP, unless `FLEETSTREAM_REQUIRE_SERVICES=1`, when it fails.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A TCP relay to `target` on a fixed local port that can be cut (listener and every
/// connection closed) and restored.
struct Relay {
    port: u16,
    target: String,
    tasks: JoinSet<()>,
}

impl Relay {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut relay = Self { port, target, tasks: JoinSet::new() };
        relay.serve(listener);
        relay
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = self.target.clone();
        self.tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
    }

    /// Closes the listener and every connection through it.
    async fn cut(&mut self) {
        self.tasks.shutdown().await;
    }

    async fn restore(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.serve(listener);
    }
}

async fn readiness(http: &reqwest::Client, base: &str) -> (u16, Value) {
    let resp = http.get(format!("{base}/readyz")).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn wait_for(http: &reqwest::Client, base: &str, what: &str, ok: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = readiness(http, base).await;
        if ok(status, &body) {
            return body;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_off_while_postgres_is_unreachable_and_back_on_when_it_returns() {
    let Some(pg) = common::postgres("readiness_turns_off_while_postgres_is_unreachable").await else { return };
    let mut url = reqwest::Url::parse(&pg).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let mut relay = Relay::start(target).await;
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(relay.port)).unwrap();

    let schema = format!("fleetstream_ready_{}", std::process::id());
    let (dir, mut cfg) = common::loopback_config("readiness-pg");
    cfg.services.store = services::ServicesStore::Postgres;
    cfg.services.url = url.to_string();
    cfg.services.schema = schema.clone();
    let node = pipeline::Node::start(&cfg).await.unwrap();
    let base = node.http_url();
    let http = services::tls::plain_client().unwrap();
    wait_for(&http, &base, "ready", |s, _| s == 200).await;
    let opened = http.put(format!("{base}/v1/accounts/before")).json(&json!({})).send().await.unwrap();
    assert_eq!(opened.status(), 201);

    relay.cut().await;
    let body = wait_for(&http, &base, "not ready naming PostgreSQL", |s, b| {
        s == 503 && b["stopped"].as_array().is_some_and(|p| p.iter().any(|p| p["part"] == "postgres"))
    })
    .await;
    assert_eq!(body["ready"], false, "{body}");
    // A write made while PostgreSQL is away waits for it rather than failing.
    let pending = tokio::spawn({
        let (http, base) = (http.clone(), base.clone());
        async move { http.put(format!("{base}/v1/accounts/during")).json(&json!({})).send().await.unwrap().status() }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!pending.is_finished(), "the write answered while PostgreSQL was unreachable");

    relay.restore().await;
    wait_for(&http, &base, "ready again", |s, _| s == 200).await;
    let status = tokio::time::timeout(Duration::from_secs(20), pending).await.unwrap().unwrap();
    assert!(status.is_success(), "{status}");
    for owner in ["before", "during"] {
        let resp = http.get(format!("{base}/v1/accounts/{owner}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{owner}");
    }
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&pg, postgres::NoTls)?;
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
    })
    .await;
}
