//! A schedule, reschedule or cancel cut short by a crash is carried to an end after the
//! restart: `pipeline serve` runs with `FLEETSTREAM_TEST_CRASH_AT` naming a step, so the node
//! stops dead between two steps of the operation, as kill -9 would stop it; then it starts again
//! on the same data dir without the hook. Afterwards the operation is completed or undone, its
//! `Idempotency-Key` answers accordingly, and the drone's commands queue says what the drone
//! should do.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use events::{Mission, MissionKind};
use serde_json::{Value, json};

const DRONE: u64 = 1;

struct Node {
    dir: PathBuf,
    quic: SocketAddr,
    http: u16,
    api: String,
    pem: String,
    child: std::process::Child,
}

impl Node {
    /// A node on a fresh data dir that stops at `step`, with drone 1 reported in and
    /// registered and the account `acme` open.
    async fn crashing_at(name: &str, step: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fleetstream-saga-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (quic_port, http) = (common::free_udp_port(), common::free_tcp_port());
        let child = common::spawn_serve(&dir, quic_port, http, &[("FLEETSTREAM_TEST_CRASH_AT", step)]);
        let api = format!("http://127.0.0.1:{http}");
        let quic: SocketAddr = format!("127.0.0.1:{quic_port}").parse().unwrap();
        let pem = std::fs::read_to_string(dir.join("tls/ingest-cert.pem")).unwrap();
        common::report_in(quic, &pem, &api, &[DRONE]).await;
        let web = web();
        assert!(
            web.post(format!("{api}/v1/drones"))
                .json(&json!({"drones": [DRONE]}))
                .send()
                .await
                .unwrap()
                .status()
                .is_success()
        );
        assert!(
            web.put(format!("{api}/v1/accounts/acme")).json(&json!({})).send().await.unwrap().status().is_success()
        );
        Self { dir, quic, http, api, pem, child }
    }

    /// Waits for the process to have stopped itself at its step.
    fn stopped(&mut self) {
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "the node stopped at its crash point: {status}");
    }

    /// Starts the node again on its data dir, without the hook.
    fn restart(&mut self) {
        self.child = common::spawn_serve(&self.dir, self.quic.port(), self.http, &[]);
    }

    /// Sends `request`, which the node stops in the middle of (no answer), and starts the node
    /// again.
    async fn cut_short(&mut self, request: reqwest::RequestBuilder, step: &str) {
        let lost = request.send().await;
        assert!(lost.is_err(), "{step}: the node stopped before answering: {lost:?}");
        self.stopped();
        self.restart();
    }

    /// The drone's commands, as the drone would lease them over QUIC (left unacknowledged).
    async fn missions(&self, wanted: impl Fn(&[Mission]) -> bool) -> Vec<Mission> {
        let client =
            ingest::IngestClient::connect(self.quic, &ingest::ClientConfig::new(ingest::Trust::Pem(self.pem.clone())))
                .await
                .unwrap();
        let keys = events::KeyRange { lo: DRONE, hi: DRONE + 1 };
        let mut consumer = client.consume(events::QueueName::DroneCommands, keys, 16).await.unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !wanted(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.recv()).await {
                Ok(Some(Ok(leased))) => got.push(Mission::from_bytes(&leased.payload).unwrap()),
                other => panic!("the drone's commands so far: {got:?}; then {other:?}"),
            }
        }
        got
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn web() -> reqwest::Client {
    services::tls::plain_client().unwrap()
}

fn order() -> Value {
    json!({
        "owner": "acme", "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": {"lat": 47.61, "lon": -122.31},
        "package": {"size": "small", "weight_kg": 1.0}
    })
}

async fn get(url: String) -> Value {
    web().get(url).send().await.unwrap().json().await.unwrap()
}

/// Polls until `done` holds for the delivery's record and its history's stages.
async fn until(api: &str, id: u64, done: impl Fn(&Value, &[String]) -> bool) -> (Value, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let record = get(format!("{api}/v1/deliveries/{id}")).await;
        let history = get(format!("{api}/v1/deliveries/{id}/history")).await;
        let stages: Vec<String> = history["events"]
            .as_array()
            .map(|e| e.iter().filter_map(|e| e["stage"].as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if done(&record, &stages) {
            return (record, stages);
        }
        assert!(Instant::now() < deadline, "delivery {id}: record {record}, history {stages:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn post_order(api: &str) -> reqwest::RequestBuilder {
    web().post(format!("{api}/v1/deliveries")).header("idempotency-key", "order-1").json(&order())
}

/// A schedule stopped at `step`: the retry with its key after the restart gets `replayed`
/// (the first delivery, completed by recovery) or a fresh delivery (the first undone), and
/// either way the one drone is not left held by a half-made delivery.
async fn schedule_cut_short(step: &str, replayed: bool) {
    let mut node = Node::crashing_at(step, step).await;
    let api = node.api.clone();
    node.cut_short(post_order(&api), step).await;

    let retry = post_order(&api).send().await.unwrap();
    assert_eq!(retry.status(), 201, "{step}: the retry is served: {:?}", retry.text().await);
    assert_eq!(retry.headers()["idempotent-replayed"], if replayed { "true" } else { "false" }, "{step}");
    let id = retry.json::<Value>().await.unwrap()["delivery_id"].as_u64().unwrap();
    // The drone's mission for it is queued (a completed one perhaps twice: the same mission).
    let missions = node.missions(|m| !m.is_empty()).await;
    assert!(missions.iter().all(|m| m.delivery_id == id && m.kind == MissionKind::Fly), "{step}: {missions:?}");
    until(&api, id, |record, stages| record["stage"] == "created" && stages == ["created"]).await;
    // The owner lists exactly this delivery (once History has its batch): an undone one left
    // nothing behind.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = get(format!("{api}/v1/history?owner=acme")).await;
        let ids: Vec<u64> =
            listed["deliveries"].as_array().unwrap().iter().filter_map(|d| d["delivery_id"].as_u64()).collect();
        if !ids.is_empty() || Instant::now() > deadline {
            assert_eq!(ids, vec![id], "{step}: {listed}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_cut_short_before_the_drone_has_it_is_undone_and_its_key_runs_afresh() {
    schedule_cut_short("schedule-started", false).await;
    schedule_cut_short("schedule-assigned", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_cut_short_once_the_engine_has_it_is_completed_and_its_key_replays_it() {
    // Without recovery the retry finds the one drone held by the first delivery: 409.
    schedule_cut_short("schedule-created", true).await;
    schedule_cut_short("schedule-mission", true).await;
}

/// Schedules one delivery on a node that stops at `step`; returns its id.
async fn scheduled(node: &Node) -> u64 {
    let created = post_order(&node.api).send().await.unwrap();
    assert_eq!(created.status(), 201);
    created.json::<Value>().await.unwrap()["delivery_id"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_cut_short_is_carried_forward_and_the_drone_is_told_to_return() {
    for step in ["cancel-started", "cancel-engine"] {
        let mut node = Node::crashing_at(step, step).await;
        let id = scheduled(&node).await;
        let api = node.api.clone();
        node.cut_short(web().delete(format!("{api}/v1/deliveries/{id}")), step).await;
        let (_, stages) = until(&api, id, |record, stages| {
            record["stage"] == "cancelled" && stages.last().map(String::as_str) == Some("cancelled")
        })
        .await;
        assert_eq!(stages, ["created", "cancelled"], "{step}");
        // The drone had not leased its mission: it is taken back, and the drone hears only
        // that the delivery is off.
        let missions = node.missions(|m| m.iter().any(|m| m.kind == MissionKind::ReturnToBase)).await;
        let got: Vec<_> = missions.iter().map(|m| (m.delivery_id, m.kind)).collect();
        assert_eq!(got, [(id, MissionKind::ReturnToBase)], "{step}");
        // The drone is free again: a new order gets it.
        let next = web().post(format!("{api}/v1/deliveries")).json(&order()).send().await.unwrap();
        assert_eq!(next.status(), 201, "{step}: {:?}", next.text().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reschedule_cut_short_is_carried_forward_once() {
    for step in ["reschedule-started", "reschedule-engine"] {
        let mut node = Node::crashing_at(step, step).await;
        let id = scheduled(&node).await;
        let api = node.api.clone();
        let moved = json!({"dropoff": {"lat": 47.7, "lon": -122.4}});
        node.cut_short(web().patch(format!("{api}/v1/deliveries/{id}")).json(&moved), step).await;
        until(&api, id, |record, stages| {
            record["dropoff"]["lat"] == 47.7
                && record["stage"] == "rescheduled"
                && stages.last().map(String::as_str) == Some("rescheduled")
        })
        .await;
        // Derived once, however often the reschedule was applied.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, stages) = until(&api, id, |_, _| true).await;
        assert_eq!(stages, ["created", "rescheduled"], "{step}");
        let missions = node.missions(|m| m.iter().any(|m| m.dropoff.lat == 47.7)).await;
        assert!(missions.iter().all(|m| m.delivery_id == id && m.kind == MissionKind::Fly), "{step}: {missions:?}");
    }
}
