//! `pipeline serve` killed with SIGKILL at random moments under load and restarted on the same
//! data directory, while producers reconnect and re-send what was not answered. Afterwards:
//! every acknowledged batch is in the log exactly once, the engine applied every event exactly
//! once, and the log derives exactly the delivery events a run without crashes derives. The
//! product around the engine rides the kills too: every delivery's stage in the Delivery
//! service is its last stage in Delivery History, every drone is still registered and free
//! again, and scheduling works at once; again after a clean restart.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use events::wire::{Buffer, Limits};
use events::{BatchMeta, DeliveryCommand, DeliveryEvent, DeliveryStage, DroneEvent, GeoPoint, TelemetryBatch};
use ingest::{ClientConfig, Producer, ProducerConfig, Trust};
use pipeline::derive::{DeriveConfig, Deriver};
use pipeline::log::{Log, LogConfig, RecordKind};

const PRODUCERS: u64 = 3;
const DRONES_PER_PRODUCER: u64 = 8;
const EVENTS_PER_DRONE: u64 = 300;

fn spawn(dir: &Path, quic: u16, http: u16) -> Child {
    common::spawn_serve(dir, quic, http, &[("FLEETSTREAM_ENGINE__CHECKPOINT_INTERVAL_MS", "50")])
}

/// A cheap pseudo-random number from the clock, so each run kills at different moments.
fn jitter(max_ms: u64) -> u64 {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % max_ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_nothing_and_counts_nothing_twice() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    for run in 0..2 {
        one_run(run).await;
    }
}

async fn one_run(run: u32) {
    let dir = std::env::temp_dir().join(format!("fleetstream-crash-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (quic, http) = (common::free_udp_port(), common::free_tcp_port());
    let mut server = spawn(&dir, quic, http);
    let api = format!("http://127.0.0.1:{http}");
    let web = services::tls::plain_client().unwrap();
    let drones: Vec<u64> = (1..=PRODUCERS * DRONES_PER_PRODUCER).collect();
    let pem = std::fs::read_to_string(dir.join("tls/ingest-cert.pem")).unwrap();
    common::report_in(format!("127.0.0.1:{quic}").parse().unwrap(), &pem, &api, &drones).await;
    web.post(format!("{api}/v1/drones")).json(&serde_json::json!({ "drones": drones })).send().await.unwrap();
    let account = web.put(format!("{api}/v1/accounts/crash-test")).json(&serde_json::json!({})).send().await;
    assert!(account.unwrap().status().is_success());
    let dropoff = GeoPoint::new(47.62, -122.35);
    let mut delivery_of = BTreeMap::new();
    for _ in &drones {
        let body: serde_json::Value = web
            .post(format!("{api}/v1/deliveries"))
            .json(&serde_json::json!({
                "owner": "crash-test", "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": dropoff,
                "package": {"size": "small", "weight_kg": 1.0}
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        delivery_of.insert(body["drone_id"].as_u64().unwrap(), body["delivery_id"].as_u64().unwrap());
    }
    assert_eq!(delivery_of.len(), drones.len());

    // Producers: each sends its drones' events, one event per drone per batch.
    let pem = std::fs::read_to_string(dir.join("tls/ingest-cert.pem")).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{quic}").parse().unwrap();
    // A subscriber follows the delivery events live across the kills, resuming after the last
    // offset it saw each time the server comes back.
    let (stop_live, stop_rx) = tokio::sync::watch::channel(false);
    let live = tokio::spawn(follow_deliveries(addr, pem.clone(), stop_rx));
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let mut cfg = ProducerConfig::new(ClientConfig::new(Trust::Pem(pem.clone())));
        cfg.answer_timeout = Duration::from_secs(2);
        cfg.connect_timeout = Duration::from_millis(500);
        cfg.max_backoff = Duration::from_millis(200);
        let (producer, mut answers) = Producer::connect(addr, cfg).await.unwrap();
        let delivery_of = delivery_of.clone();
        tasks.push(tokio::spawn(async move {
            let collector = tokio::spawn(async move {
                let mut acked = Vec::new();
                while let Some(a) = answers.recv().await {
                    assert!(a.result.is_ok(), "only acknowledgements expected: {a:?}");
                    acked.push(a.batch_seq);
                }
                acked
            });
            for seq in 1..=EVENTS_PER_DRONE {
                let events: Vec<_> = (0..DRONES_PER_PRODUCER)
                    .map(|i| {
                        let drone = p * DRONES_PER_PRODUCER + i + 1;
                        common::drone_event(drone, seq, delivery_of[&drone], dropoff)
                    })
                    .collect();
                let meta = BatchMeta { producer_id: 1000 + p, batch_seq: seq, ..BatchMeta::default() };
                let frame = TelemetryBatch::encode(meta, &events, Buffer::new()).unwrap();
                producer.send(seq, frame.into_buffer()).await.unwrap();
                if seq % 2 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            let stats = producer.finish(Duration::from_secs(60)).await;
            (stats, collector.await.unwrap())
        }));
    }

    // Kill and restart twice while they send.
    for k in 0..2 {
        tokio::time::sleep(Duration::from_millis(100 + jitter(500))).await;
        common::kill9(&mut server);
        server = spawn(&dir, quic, http);
        eprintln!("run {run}: kill {k} done, server restarted");
    }
    let mut reconnects = 0;
    for (p, task) in tasks.into_iter().enumerate() {
        let (stats, acked) = task.await.unwrap();
        eprintln!("run {run}: producer {p} finished: {stats:?}");
        assert_eq!(stats.unanswered, 0, "producer {p}: {stats:?}");
        reconnects += stats.connections - 1;
        assert_eq!(
            acked,
            (1..=EVENTS_PER_DRONE).collect::<Vec<_>>(),
            "producer {p}: every batch answered once, in order"
        );
    }
    assert!(reconnects >= 1, "the kills forced reconnects");

    // The live engine applied every event exactly once.
    let started = Instant::now();
    for &drone in &drones {
        let snap: serde_json::Value =
            web.get(format!("{api}/v1/drones/{drone}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(snap["last_seq"], EVENTS_PER_DRONE, "drone {drone}: {snap}");
        assert!(snap["delivery"].is_null(), "drone {drone} finished its delivery: {snap}");
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    eprintln!("run {run}: engine state checked");

    // A subscriber reading the telemetry log from the start over QUIC receives every
    // acknowledged batch exactly once, in log order.
    let reader = ingest::IngestClient::connect(addr, &ClientConfig::new(Trust::Pem(pem.clone()))).await.unwrap();
    let mut sub =
        reader.subscribe_from::<DroneEvent>(events::Topic::DroneTelemetry, events::StartAt::Offset(0)).await.unwrap();
    let mut got = BTreeSet::new();
    let mut last_offset = None;
    while got.len() < (PRODUCERS * EVENTS_PER_DRONE) as usize {
        let (offset, batch) =
            tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap().unwrap();
        assert!(last_offset < Some(offset), "log order");
        last_offset = Some(offset);
        let meta = batch.header().meta;
        assert!(got.insert((meta.producer_id, meta.batch_seq)), "batch {meta:?} delivered twice");
    }
    // And the delivery events, each exactly once, exactly those of a run without crashes.
    let mut sub = reader
        .subscribe_from::<DeliveryEvent>(events::Topic::DeliveryEvents, events::StartAt::Offset(0))
        .await
        .unwrap();
    let mut delivered = BTreeMap::new();
    let mut at_offset = BTreeMap::new();
    while delivered.len() < delivery_of.len() * 4 {
        let (offset, batch) =
            tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap().unwrap();
        let mut here = Vec::new();
        for e in batch.events().iter() {
            let key = (e.delivery_id.to_native(), e.seq.to_native());
            let value = (e.stage.to_stage(), e.ts_us.to_native(), e.drone_id.to_native());
            assert!(delivered.insert(key, value).is_none(), "delivery event {key:?} delivered twice");
            here.push(key);
        }
        at_offset.insert(offset, here);
    }
    // What the live subscriber saw before, between and after the kills is what the log holds at
    // the same offsets now: the offsets it would resume from stayed valid.
    stop_live.send_replace(true);
    let (live, refused) = live.await.unwrap();
    assert!(refused.is_empty(), "the live subscriber's position was refused after a restart: {refused:?}");
    assert!(!live.is_empty(), "the live subscriber saw delivery events");
    for (offset, events) in &live {
        assert_eq!(at_offset.get(offset), Some(events), "delivery-events offset {offset} changed across the kills");
    }
    eprintln!(
        "run {run}: {} delivery-event records seen live (last offset {:?}) match the log after the kills ({} records)",
        live.len(),
        live.keys().last(),
        at_offset.len()
    );
    for (&drone, &delivery) in &delivery_of {
        let ts = |seq: u64| 1_000_000 * drone + seq;
        assert_eq!(delivered[&(delivery, 1)], (DeliveryStage::HeadedToPickup, ts(50), drone));
        assert_eq!(delivered[&(delivery, 2)], (DeliveryStage::InTransit, ts(common::PICKUP_AT), drone));
        assert_eq!(delivered[&(delivery, 3)], (DeliveryStage::DeliveryComplete, ts(common::DROPOFF_AT), drone));
        assert_eq!(delivered[&(delivery, 0)].0, DeliveryStage::Created);
    }
    reader.close().await;
    check_product(&web, &api, &delivery_of).await;
    // The drones report again (their scripted events carry made-up times), and scheduling
    // works at once: the registry came through the kills.
    common::report_in_at(addr, &pem, &api, &drones, EVENTS_PER_DRONE + 1).await;
    let order = serde_json::json!({
        "owner": "crash-test", "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": dropoff,
        "package": {"size": "small", "weight_kg": 1.0}
    });
    let resp = web.post(format!("{api}/v1/deliveries")).json(&order).send().await.unwrap();
    assert_eq!(resp.status(), 201, "scheduling after the kills");
    let extra = resp.json::<serde_json::Value>().await.unwrap()["delivery_id"].as_u64().unwrap();
    // Cancelled again, which frees its drone: the clean restart below finds every drone free.
    let resp = web.delete(format!("{api}/v1/deliveries/{extra}")).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(server.wait().unwrap().success());
    // And after a clean restart the product reads the same.
    let mut server = spawn(&dir, quic, http);
    check_product(&web, &api, &delivery_of).await;
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(server.wait().unwrap().success());

    // The log holds every acknowledged batch exactly once, and derives what a run without
    // crashes derives.
    let derived = check_log(&dir.join("log"));
    for (&drone, &delivery) in &delivery_of {
        let stages: Vec<_> =
            derived.iter().filter(|e| e.delivery_id == delivery).map(|e| (e.seq, e.stage, e.ts_us)).collect();
        let ts = |seq: u64| 1_000_000 * drone + seq;
        assert_eq!(
            stages[1..],
            [
                (1, DeliveryStage::HeadedToPickup, ts(50)),
                (2, DeliveryStage::InTransit, ts(common::PICKUP_AT)),
                (3, DeliveryStage::DeliveryComplete, ts(common::DROPOFF_AT)),
            ],
            "delivery {delivery} of drone {drone}"
        );
        assert_eq!((stages[0].0, stages[0].1), (0, DeliveryStage::Created));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Follows the delivery-events topic until `stop`, reconnecting after each kill and resuming at
/// the offset after the last one seen. Returns what each offset held, and the refusals of a
/// resumed position (there should be none: a restart reproduces the offsets).
async fn follow_deliveries(
    addr: SocketAddr,
    pem: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (BTreeMap<u64, Vec<(u64, u32)>>, Vec<String>) {
    let mut seen = BTreeMap::new();
    let mut refused = Vec::new();
    let mut next = 0u64;
    while !*stop.borrow() {
        let mut cfg = ClientConfig::new(Trust::Pem(pem.clone()));
        // Pings draw a stateless reset from a restarted server: the kill is noticed at once.
        cfg.keep_alive = Duration::from_millis(100);
        let Ok(Ok(client)) =
            tokio::time::timeout(Duration::from_secs(2), ingest::IngestClient::connect(addr, &cfg)).await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let from = events::StartAt::Offset(next);
        let mut sub = match client.subscribe_from::<DeliveryEvent>(events::Topic::DeliveryEvents, from).await {
            Ok(sub) => sub,
            Err(e) => {
                if e.to_string().contains("offset unavailable") {
                    refused.push(format!("offset {next}: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                item = sub.next() => match item {
                    Ok(Some((offset, batch))) => {
                        assert!(offset >= next, "offset {offset} after {next}");
                        let events = batch.events().iter().map(|e| (e.delivery_id.to_native(), e.seq.to_native()));
                        seen.insert(offset, events.collect::<Vec<_>>());
                        next = offset + 1;
                    }
                    _ => break,
                },
                _ = stop.changed() => break,
            }
        }
    }
    (seen, refused)
}

/// Every delivery is complete in the Delivery service, with the stage its history ends with,
/// and its drone is registered and free (read models catch up within a few seconds).
async fn check_product(web: &reqwest::Client, api: &str, delivery_of: &BTreeMap<u64, u64>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for (&drone, &delivery) in delivery_of {
        loop {
            let record: serde_json::Value =
                web.get(format!("{api}/v1/deliveries/{delivery}")).send().await.unwrap().json().await.unwrap();
            let history: serde_json::Value =
                web.get(format!("{api}/v1/deliveries/{delivery}/history")).send().await.unwrap().json().await.unwrap();
            let last = history["events"].as_array().and_then(|e| e.last()).map(|e| e["stage"].clone());
            let state: serde_json::Value =
                web.get(format!("{api}/v1/drones/{drone}")).send().await.unwrap().json().await.unwrap();
            let settled = record["stage"] == "delivery_complete"
                && last.as_ref() == Some(&record["stage"])
                && state["registered"] == true
                && state["assigned_delivery"].is_null();
            if settled {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "delivery {delivery}: record {record}, history ends {last:?}, drone {drone}: {state}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Reads the whole log: checks each (producer, batch) appears once and all are there, and
/// derives the delivery events from it with a fresh state machine.
fn check_log(dir: &Path) -> Vec<DeliveryEvent> {
    let (mut log, _) = Log::open(dir, LogConfig::default()).unwrap();
    let mut seen = BTreeSet::new();
    let mut deriver = Deriver::new(DeriveConfig::default());
    let mut out = Vec::new();
    let limits = Limits::default();
    for record in log.reader(log.first_offset()).unwrap() {
        let record = record.unwrap();
        match record.kind {
            RecordKind::Telemetry => {
                let batch = TelemetryBatch::validate(record.payload, &limits).unwrap();
                let meta = batch.header().meta;
                assert!(seen.insert((meta.producer_id, meta.batch_seq)), "batch {meta:?} logged twice");
                for ev in batch.events().iter() {
                    deriver.on_drone_event(ev, &mut out);
                }
            }
            RecordKind::Command => {
                let cmd: DeliveryCommand = serde_json::from_slice(&record.payload).unwrap();
                deriver.on_command(&cmd, 0, &mut out).unwrap();
            }
            RecordKind::Deliveries => panic!("delivery events in the telemetry log"),
        }
    }
    // The producers' batches and the drones' two report-in batches.
    assert_eq!(seen.len() as u64, PRODUCERS * EVENTS_PER_DRONE + 2, "every acknowledged batch is in the log");
    assert_eq!(deriver.stats().duplicates, 0, "no event was logged twice");
    out
}
