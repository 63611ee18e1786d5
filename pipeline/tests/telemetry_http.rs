//! `POST /v1/telemetry`: a drone that reports only over HTTP JSON is seen, assigned and flies a
//! delivery to completion through the same log and derivation as QUIC batches; a malformed
//! event is refused with its index and field, and nothing of its request is kept.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::time::Duration;

use events::{GeoPoint, StreamSource};
use pipeline::Node;
use serde_json::{Value, json};

async fn post(http: &reqwest::Client, base: &str, content_type: &str, body: String) -> (u16, Value) {
    let resp = http.post(format!("{base}/v1/telemetry")).header("content-type", content_type).body(body);
    let resp = resp.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drone_reporting_over_http_completes_a_delivery() {
    let (dir, cfg) = common::loopback_config("telemetry-http");
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    let http = services::tls::plain_client().unwrap();

    // Reports in over HTTP (NDJSON), idle at the pickup, and is then seen where it said.
    let mut hello = common::drone_event(9, 0, 0, GeoPoint::default());
    hello.ts_us = events::now_us();
    let (status, v) = post(&http, &base, "application/x-ndjson", serde_json::to_string(&hello).unwrap() + "\n").await;
    assert_eq!((status, v["accepted"].as_u64()), (202, Some(1)), "{v}");
    let drone: Value = http.get(format!("{base}/v1/drones/9")).send().await.unwrap().json().await.unwrap();
    assert_eq!(drone["position"]["lat"], json!(47.6), "{drone}");
    assert_eq!(drone["last_seq"], 0, "{drone}");

    let registered = http.post(format!("{base}/v1/drones")).json(&json!({"drones": [9]})).send().await.unwrap();
    assert!(registered.status().is_success());
    http.put(format!("{base}/v1/accounts/acme")).json(&json!({})).send().await.unwrap();
    let dropoff = GeoPoint::new(47.61, -122.31);
    let order = json!({
        "owner": "acme", "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": dropoff,
        "package": {"size": "small", "weight_kg": 1.0}
    });
    let v: Value = http.post(format!("{base}/v1/deliveries")).json(&order).send().await.unwrap().json().await.unwrap();
    let id = v["delivery_id"].as_u64().unwrap();

    // A malformed event in the middle: refused with its index and field, and none of its batch
    // is kept (the drone's sequence stays where it was).
    let mut flight: Vec<Value> = (1..=common::DROPOFF_AT)
        .map(|seq| serde_json::to_value(common::drone_event(9, seq, id, dropoff)).unwrap())
        .collect();
    let mut spoiled = flight.clone();
    spoiled[7]["battery_pct"] = json!(140);
    let (status, v) = post(&http, &base, "application/json", serde_json::to_string(&spoiled).unwrap()).await;
    assert_eq!((status, v["error"].as_str()), (400, Some("bad_request")), "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(message.contains("event 7") && message.contains("battery_pct"), "{message}");
    spoiled[7]["battery_pct"] = json!(80);
    spoiled[3]["position"] = json!({"lat": "north", "lon": 0});
    let (status, v) = post(&http, &base, "application/json", serde_json::to_string(&spoiled).unwrap()).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("event 3, field position.lat"), "{v}");
    let drone: Value = http.get(format!("{base}/v1/drones/9")).send().await.unwrap().json().await.unwrap();
    assert_eq!(drone["last_seq"], 0, "{drone}");

    // The flight in two requests, the second sent twice (a retry): picked up, then delivered,
    // and each stage derived once.
    let rest = flight.split_off(120);
    let (status, v) = post(&http, &base, "application/json", serde_json::to_string(&flight).unwrap()).await;
    assert_eq!((status, v["accepted"].as_u64()), (202, Some(flight.len() as u64)), "{v}");
    common::stage_becomes(&http, &base, id, "in_transit").await;
    for _ in 0..2 {
        let (status, _) = post(&http, &base, "application/json", serde_json::to_string(&rest).unwrap()).await;
        assert_eq!(status, 202);
    }
    common::stage_becomes(&http, &base, id, "delivery_complete").await;
    let sub = node.engine.subscribe_deliveries_from(events::StartAt::Earliest).unwrap();
    let mut stages = Vec::new();
    while let Ok(Ok(item)) = tokio::time::timeout(Duration::from_millis(500), sub.rx.recv_async()).await {
        let (_, batch) = item.unwrap();
        stages.extend(batch.events().iter().filter(|e| e.delivery_id == id).map(|e| e.stage.to_stage()));
    }
    use events::DeliveryStage::*;
    assert_eq!(stages, [Created, HeadedToPickup, InTransit, DeliveryComplete]);

    // The same route refuses what every body route refuses.
    let (status, v) = post(&http, &base, "text/plain", "{}".into()).await;
    assert_eq!((status, v["error"].as_str()), (415, Some("unsupported_media_type")));
    let (status, _) = post(&http, &base, "application/json", "[]".into()).await;
    assert_eq!(status, 400);

    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every telemetry event in `node`'s log: (drone, seq) → times logged.
async fn logged(node: &Node) -> std::collections::BTreeMap<(u64, u64), u32> {
    let sub = node.engine.subscribe_telemetry_from(events::StartAt::Earliest).unwrap();
    let mut seen = std::collections::BTreeMap::new();
    while let Ok(Ok(item)) = tokio::time::timeout(Duration::from_millis(500), sub.rx.recv_async()).await {
        let (_, batch) = item.unwrap();
        for e in batch.events().iter() {
            *seen.entry((e.drone_id.to_native(), e.seq.to_native())).or_insert(0) += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_again_are_logged_once_even_after_a_restart() {
    let (dir, cfg) = common::loopback_config("telemetry-http-again");
    let http = services::tls::plain_client().unwrap();
    let body = |seqs: std::ops::RangeInclusive<u64>| {
        let events: Vec<_> = seqs.map(|s| common::drone_event(5, s, 0, GeoPoint::default())).collect();
        serde_json::to_string(&events).unwrap()
    };
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    // A request, the same again (a client's retry), and one that overlaps both.
    for seqs in [1..=50, 1..=50, 40..=60] {
        let (status, v) = post(&http, &base, "application/json", body(seqs)).await;
        assert_eq!(status, 202, "{v}");
    }
    let once: std::collections::BTreeMap<_, _> = (1..=60).map(|s| ((5, s), 1)).collect();
    assert_eq!(logged(&node).await, once);
    node.shutdown().await.unwrap();

    // Restarted, the intake knows nothing of its own: the engine tells it what was taken.
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    for seqs in [1..=70, 65..=70] {
        let (status, v) = post(&http, &base, "application/json", body(seqs)).await;
        assert_eq!(status, 202, "{v}");
    }
    let once: std::collections::BTreeMap<_, _> = (1..=70).map(|s| ((5, s), 1)).collect();
    assert_eq!(logged(&node).await, once);
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
