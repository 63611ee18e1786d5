//! Two `pipeline serve` nodes on one NATS JetStream with the services' state in one
//! PostgreSQL store (`[services] store = "postgres"`): what a customer or operator does
//! through one node is seen through the other. Drones and the account are registered through
//! node A only, deliveries are scheduled through both, one of A's is cancelled through B, one
//! of B's is flown to its drop-off with telemetry sent to A; then A is SIGKILLed, B schedules
//! on, and A, restarted on its data directory, reads every delivery with the stage B reads.
//!
//! Reads `FLEETSTREAM_NATS_URL` and `FLEETSTREAM_PG_URL` (defaults: the local standard
//! ports, database `test`); without either server it prints SKIP, unless
//! `FLEETSTREAM_REQUIRE_SERVICES=1`, when it fails.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use events::wire::Buffer;
use events::{BatchMeta, GeoPoint, TelemetryBatch};
use serde_json::{Value, json};

const DROPOFF: (f64, f64) = (47.61, -122.31);

fn order() -> Value {
    json!({
        "owner": "shared-owner", "pickup": {"lat": 47.6, "lon": -122.3},
        "dropoff": {"lat": DROPOFF.0, "lon": DROPOFF.1}, "package": {"size": "small", "weight_kg": 1.0}
    })
}

/// Schedules one delivery through `api` under the `Idempotency-Key` `key`, retrying while no
/// drone is free there yet (a node learns of drones registered through another within its
/// next sweep). `(delivery, drone)`.
async fn schedule(web: &reqwest::Client, api: &str, key: &str) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let response = web
            .post(format!("{api}/v1/deliveries"))
            .header("Idempotency-Key", key)
            .json(&order())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap_or_default();
        if status.is_success() {
            return (body["delivery_id"].as_u64().unwrap(), body["drone_id"].as_u64().unwrap());
        }
        assert!(
            status == 409 && body["error"] == "no_drone_available" && Instant::now() < deadline,
            "scheduling through {api}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The stage `api` reads for delivery `id` (`None`: not readable right now).
async fn stage(web: &reqwest::Client, api: &str, id: u64) -> Option<String> {
    let response = web.get(format!("{api}/v1/deliveries/{id}")).send().await.ok()?;
    let body: Value = response.json().await.ok()?;
    body["stage"].as_str().map(str::to_string)
}

/// Waits until every node reads every delivery at the stage `want` names (default: the same
/// stage on every node), and returns what they read.
async fn same_everywhere(
    web: &reqwest::Client,
    apis: &[&str],
    ids: &BTreeSet<u64>,
    want: &BTreeMap<u64, &str>,
) -> BTreeMap<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut read = BTreeMap::new();
        let mut differ = Vec::new();
        for &id in ids {
            let mut seen = Vec::new();
            for api in apis {
                seen.push(stage(web, api, id).await);
            }
            let first = seen[0].clone();
            let agreed = first.is_some() && seen.iter().all(|s| *s == first);
            let wanted = want.get(&id).is_none_or(|w| first.as_deref() == Some(*w));
            if agreed && wanted {
                read.insert(id, first.unwrap_or_default());
            } else {
                differ.push((id, seen));
            }
        }
        if differ.is_empty() {
            return read;
        }
        assert!(Instant::now() < deadline, "nodes disagree or are not there yet: {differ:?} (want {want:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Flies `drone` through the scripted flight for `delivery` (to the order's drop-off), sent
/// over QUIC to `node`.
async fn fly(node: &common::ClusterNode, drone: u64, delivery: u64) {
    let client =
        ingest::IngestClient::connect(node.quic, &ingest::ClientConfig::new(ingest::Trust::Pem(node.pem.clone())))
            .await
            .unwrap();
    let (mut lane, mut answers) = client.open_lane().await.unwrap();
    let dropoff = GeoPoint::new(DROPOFF.0, DROPOFF.1);
    let flight: Vec<_> =
        (1..=common::DROPOFF_AT).map(|seq| common::drone_event(drone, seq, delivery, dropoff)).collect();
    let meta = BatchMeta { producer_id: 9100 + drone, batch_seq: 1, ..BatchMeta::default() };
    let batch = TelemetryBatch::encode(meta, &flight, Buffer::new()).unwrap();
    lane.send(batch.as_bytes()).await.unwrap();
    let answer = answers.recv().await.unwrap();
    assert!(answer.result.is_ok(), "the flight was refused: {:?}", answer.result);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_postgres_store_read_the_same_deliveries_across_a_kill() {
    let Some((nats, url)) = common::nats("two_nodes_on_one_postgres_store").await else { return };
    let Some(pg) = common::postgres("two_nodes_on_one_postgres_store").await else { return };
    let schema = format!("fleetstream_shared_{}", std::process::id());
    let prefix = format!("fsshared{}", std::process::id());
    let root = std::env::temp_dir().join(format!("fleetstream-shared-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (mut sms, gateway) = common::sms_gateway().await;
    let webhook = format!("http://{gateway}/send");
    let env = [
        ("FLEETSTREAM_SERVICES__STORE", "postgres"),
        ("FLEETSTREAM_SERVICES__URL", pg.as_str()),
        ("FLEETSTREAM_SERVICES__SCHEMA", schema.as_str()),
        ("FLEETSTREAM_JETSTREAM__QUEUES", "[\"notifications\"]"),
        ("FLEETSTREAM_NOTIFY__SMS_WEBHOOK", webhook.as_str()),
    ];
    let spawn = |name: &str| common::spawn_cluster_node(&root.join(name), &url, &prefix, name, 2, &env);
    let mut a = spawn("a");
    let mut b = spawn("b");
    let web = services::tls::plain_client().unwrap();

    // The fleet and the account exist through A only.
    let drones: Vec<u64> = (1..=8).collect();
    common::report_in(a.quic, &a.pem, &a.api, &drones).await;
    let registered = web.post(format!("{}/v1/drones", a.api)).json(&json!({ "drones": drones })).send().await;
    assert!(registered.unwrap().status().is_success());
    let account = web.put(format!("{}/v1/accounts/shared-owner", a.api)).json(&json!({})).send().await;
    assert!(account.unwrap().status().is_success());

    // Three deliveries through each node, at once.
    let three = |api: String, node: &'static str| {
        let web = web.clone();
        async move {
            let mut got = Vec::new();
            for i in 0..3 {
                got.push(schedule(&web, &api, &format!("{node}-{i}")).await);
            }
            got
        }
    };
    let (on_a, on_b) = tokio::join!(three(a.api.clone(), "a"), three(b.api.clone(), "b"));
    let mut ids = BTreeSet::new();
    let mut drones_used = BTreeSet::new();
    for &(id, drone) in on_a.iter().chain(&on_b) {
        assert!(ids.insert(id), "delivery id {id} minted twice");
        assert!(drones_used.insert(drone), "drone {drone} given two deliveries: {on_a:?} {on_b:?}");
    }
    let created = same_everywhere(&web, &[&a.api, &b.api], &ids, &BTreeMap::new()).await;
    assert!(created.values().all(|s| s == "created"), "{created:?}");
    // A client retrying through B a request A answered gets A's delivery, not a second one.
    assert_eq!(schedule(&web, &b.api, "a-1").await, on_a[1], "the key's answer is shared");

    // A customer subscribes through A to one of B's deliveries, which both nodes follow.
    let (flown, flown_drone) = on_b[0];
    let subscribed =
        web.post(format!("{}/v1/deliveries/{flown}/notifications", a.api)).json(&json!({"sms": "+15550001111"})).send();
    assert_eq!(subscribed.await.unwrap().status(), 201);

    // One of A's cancelled through B; one of B's flown to its drop-off through A's ingest.
    let (cancelled, _) = on_a[0];
    let cancel = web.delete(format!("{}/v1/deliveries/{cancelled}", b.api)).send().await.unwrap();
    assert_eq!(cancel.status(), 202, "{}", cancel.text().await.unwrap_or_default());
    fly(&a, flown_drone, flown).await;
    let want: BTreeMap<u64, &str> = [(cancelled, "cancelled"), (flown, "delivery_complete")].into();
    same_everywhere(&web, &[&a.api, &b.api], &ids, &want).await;
    // Each stage change is sent once, though both nodes queued it (the queue they share keeps
    // one copy of each id).
    let mut texts = Vec::new();
    while texts.len() < 3 {
        let note = tokio::time::timeout(Duration::from_secs(20), sms.recv()).await.unwrap().unwrap();
        assert!(note["id"].as_str().unwrap().starts_with(&format!("{flown}-")), "{note}");
        texts.push(note["text"].as_str().unwrap().to_string());
    }
    let late = tokio::time::timeout(Duration::from_secs(2), sms.recv()).await;
    assert!(late.is_err(), "sent once each: {texts:?} and then {late:?}");

    // A dies; B serves on and schedules again (A's shards move to it).
    Command::new("kill").args(["-KILL", &a.child.id().to_string()]).status().unwrap();
    a.child.wait().unwrap();
    let (after, _) = schedule(&web, &b.api, "b-after").await;
    assert!(ids.insert(after), "delivery id {after} minted twice");
    same_everywhere(&web, &[&b.api], &ids, &want).await;

    // A restarted on its data directory reads what B reads, the delivery made while it was
    // down included.
    a = spawn("a");
    let read = same_everywhere(&web, &[&a.api, &b.api], &ids, &want).await;
    assert_eq!(read.len(), 7, "{read:?}");

    for node in [&mut a, &mut b] {
        Command::new("kill").args(["-TERM", &node.child.id().to_string()]).status().unwrap();
        assert!(node.child.wait().unwrap().success());
    }
    common::delete_streams(&nats, &prefix).await;
    tokio::task::spawn_blocking(move || {
        postgres::Client::connect(&pg, postgres::NoTls)?.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
    })
    .await
    .unwrap()
    .unwrap();
    let _ = std::fs::remove_dir_all(&root);
}
