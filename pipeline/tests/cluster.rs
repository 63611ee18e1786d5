//! Two `pipeline serve` nodes sharing the shards on one NATS JetStream
//! (`[log] backend = "jetstream"`), with producers on both. One node is killed with SIGKILL
//! mid-load; its producers re-send what it did not answer to the survivor, which takes the
//! dead node's shards over from their checkpoints. Afterwards every acknowledged drone event is
//! on the stream exactly once, every delivery completes, and no delivery event is there twice.
//! A second run stops the node with SIGSTOP instead and resumes it after the takeover: the
//! paused node wakes up believing it owns its shards, and still nothing is stored or derived
//! twice; then it rejoins and gets its share back.
//!
//! Reads `FLEETSTREAM_NATS_URL` (default `nats://127.0.0.1:4222`); without a server it prints
//! SKIP, unless `FLEETSTREAM_REQUIRE_SERVICES=1`, when it fails.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use common::ClusterNode as Node;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use events::wire::Buffer;
use events::{BatchMeta, DeliveryEvent, DeliveryStage, DroneEvent, GeoPoint, StartAt};
use events::{TelemetryBatch, Topic};
use ingest::{ClientConfig, Producer, ProducerConfig, Trust};

const SHARDS: u32 = 4;
const PRODUCERS: u64 = 4;
const DRONES_PER_PRODUCER: u64 = 6;
const EVENTS_PER_DRONE: u64 = 300;

fn spawn(dir: &Path, url: &str, prefix: &str, name: &str) -> Node {
    common::spawn_cluster_node(dir, url, prefix, name, SHARDS, &[])
}

async fn metric(web: &reqwest::Client, api: &str, name: &str) -> u64 {
    let text = web.get(format!("{api}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} missing from {api}/metrics"))
}

async fn wait_for_owned(web: &reqwest::Client, api: &str, want: u64) {
    let started = Instant::now();
    loop {
        let owned = metric(web, api, "fleetstream_cluster_shards_owned ").await;
        if owned == want {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{api} owns {owned} shards, not {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn frame(p: u64, seq: u64, delivery_of: &BTreeMap<u64, u64>, dropoff: GeoPoint) -> Buffer {
    let events: Vec<_> = (0..DRONES_PER_PRODUCER)
        .map(|i| {
            let drone = p * DRONES_PER_PRODUCER + i + 1;
            common::drone_event(drone, seq, delivery_of[&drone], dropoff)
        })
        .collect();
    let meta = BatchMeta { producer_id: 7000 + p, batch_seq: seq, ..BatchMeta::default() };
    TelemetryBatch::encode(meta, &events, Buffer::new()).unwrap().into_buffer()
}

fn producer_config(pem: &str) -> ProducerConfig {
    let mut cfg = ProducerConfig::new(ClientConfig::new(Trust::Pem(pem.to_string())));
    cfg.answer_timeout = Duration::from_secs(2);
    cfg.connect_timeout = Duration::from_millis(500);
    cfg.max_backoff = Duration::from_millis(200);
    cfg
}

/// Sends batches `seqs` through `node` until done or `stop` is set; returns the sequences
/// acknowledged.
async fn produce(
    p: u64,
    addr: SocketAddr,
    pem: String,
    seqs: Vec<u64>,
    delivery_of: Arc<BTreeMap<u64, u64>>,
    stop: Arc<AtomicBool>,
) -> BTreeSet<u64> {
    let dropoff = GeoPoint::new(47.62, -122.35);
    let (producer, mut answers) = Producer::connect(addr, producer_config(&pem)).await.unwrap();
    let collector = tokio::spawn(async move {
        let mut acked = BTreeSet::new();
        while let Some(a) = answers.recv().await {
            if a.result.is_ok() {
                acked.insert(a.batch_seq);
            }
        }
        acked
    });
    for (i, &seq) in seqs.iter().enumerate() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let sent =
            tokio::time::timeout(Duration::from_secs(1), producer.send(seq, frame(p, seq, &delivery_of, dropoff)));
        if !matches!(sent.await, Ok(Ok(()))) {
            break;
        }
        if i % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let deadline = if stop.load(Ordering::Acquire) { Duration::from_secs(1) } else { Duration::from_secs(60) };
    let stats = producer.finish(deadline).await;
    eprintln!("producer {p} on {addr}: {stats:?}");
    collector.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_or_paused_node_s_shards_move_to_the_survivor_without_loss_or_double_counting() {
    let Some((nats, url)) = common::nats("a_killed_or_paused_node_s_shards_move_to_the_survivor").await else {
        return;
    };
    one_run(&url, &nats, Failure::Kill).await;
    one_run(&url, &nats, Failure::Pause).await;
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Failure {
    /// SIGKILL: the node is gone.
    Kill,
    /// SIGSTOP, and SIGCONT once the survivor took its shards over.
    Pause,
}

async fn one_run(url: &str, nats: &async_nats::Client, failure: Failure) {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let prefix = format!("fscl{}x{nanos}", std::process::id());
    let root = std::env::temp_dir().join(format!("fleetstream-cluster-{}-{failure:?}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let url = url.to_string();

    let a = spawn(&root.join("a"), &url, &prefix, "a");
    let mut b = spawn(&root.join("b"), &url, &prefix, "b");
    let web = services::tls::plain_client().unwrap();
    // The shards are shared out: two each.
    wait_for_owned(&web, &a.api, 2).await;
    wait_for_owned(&web, &b.api, 2).await;

    // Deliveries scheduled through both nodes at once (each registers half the fleet: the
    // registry is per node); their Create commands are answered by whichever node owns each
    // drone's shard. Delivery ids come from the counter the nodes share, so none collide.
    let drones: Vec<u64> = (1..=PRODUCERS * DRONES_PER_PRODUCER).collect();
    common::report_in(a.quic, &a.pem, &a.api, &drones).await;
    let halves: [(&Node, Vec<u64>); 2] = [
        (&a, drones.iter().copied().filter(|d| d % 2 == 1).collect()),
        (&b, drones.iter().copied().filter(|d| d % 2 == 0).collect()),
    ];
    for (node, half) in &halves {
        let registered =
            web.post(format!("{}/v1/drones", node.api)).json(&serde_json::json!({ "drones": half })).send();
        assert!(registered.await.unwrap().status().is_success());
        let account = web.put(format!("{}/v1/accounts/cluster-test", node.api)).json(&serde_json::json!({}));
        assert!(account.send().await.unwrap().status().is_success());
    }
    let schedule_all = |node: &Node, n: usize| {
        let (web, api) = (web.clone(), node.api.clone());
        async move {
            let mut got = Vec::new();
            for _ in 0..n {
                let response = web
                    .post(format!("{api}/v1/deliveries"))
                    .json(&serde_json::json!({
                        "owner": "cluster-test", "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": {"lat": 47.62, "lon": -122.35},
                        "package": {"size": "small", "weight_kg": 1.0}
                    }))
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                let body: serde_json::Value = response.json().await.unwrap();
                assert!(status.is_success(), "scheduling on {api}: {status} {body}");
                got.push((body["drone_id"].as_u64().unwrap(), body["delivery_id"].as_u64().unwrap()));
            }
            got
        }
    };
    let (on_a, on_b) = tokio::join!(schedule_all(&a, halves[0].1.len()), schedule_all(&b, halves[1].1.len()));
    let mut delivery_of = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for (drone, delivery) in on_a.into_iter().chain(on_b) {
        assert!(ids.insert(delivery), "delivery id {delivery} minted twice");
        delivery_of.insert(drone, delivery);
    }
    assert_eq!(delivery_of.len(), drones.len());
    let delivery_of = Arc::new(delivery_of);

    // Producers 0 and 1 send through B, 2 and 3 through A.
    let all: Vec<u64> = (1..=EVENTS_PER_DRONE).collect();
    let b_down = Arc::new(AtomicBool::new(false));
    let never = Arc::new(AtomicBool::new(false));
    let mut on_b = Vec::new();
    let mut on_a = Vec::new();
    for p in 0..PRODUCERS {
        let (node, stop) = if p < 2 { (&b, b_down.clone()) } else { (&a, never.clone()) };
        let task = tokio::spawn(produce(p, node.quic, node.pem.clone(), all.clone(), delivery_of.clone(), stop));
        if p < 2 { on_b.push((p, task)) } else { on_a.push((p, task)) }
    }

    // B dies (or freezes) mid-load, without a chance to hand anything back.
    let jitter = u64::from(nanos % 400);
    tokio::time::sleep(Duration::from_millis(300 + jitter)).await;
    let signal = if failure == Failure::Kill { "-KILL" } else { "-STOP" };
    Command::new("kill").args([signal, &b.child.id().to_string()]).status().unwrap();
    if failure == Failure::Kill {
        b.child.wait().unwrap();
    }
    b_down.store(true, Ordering::Release);
    eprintln!("node b {failure:?} after {} ms", 300 + jitter);

    // Its producers re-send to A whatever B did not acknowledge.
    let mut resent = 0;
    for (p, task) in on_b {
        let acked_by_b = task.await.unwrap();
        let rest: Vec<u64> = all.iter().copied().filter(|s| !acked_by_b.contains(s)).collect();
        resent += rest.len();
        let acked_by_a = produce(p, a.quic, a.pem.clone(), rest.clone(), delivery_of.clone(), never.clone()).await;
        assert_eq!(acked_by_a, rest.into_iter().collect(), "producer {p}: A acknowledged every re-sent batch");
        eprintln!("producer {p}: {} batches acknowledged by B, the rest re-sent to A", acked_by_b.len());
    }
    assert!(resent > 0, "B was killed before its producers finished");
    for (p, task) in on_a {
        assert_eq!(task.await.unwrap(), all.iter().copied().collect(), "producer {p}: A acknowledged every batch");
    }

    // A took the dead node's shards over.
    wait_for_owned(&web, &a.api, u64::from(SHARDS)).await;
    assert!(metric(&web, &a.api, "fleetstream_cluster_shards_acquired_total ").await >= u64::from(SHARDS));
    if failure == Failure::Pause {
        // B wakes up still believing it owns its shards: it finds its leases gone and its
        // checkpoint writes refused, and then rejoins for its share.
        Command::new("kill").args(["-CONT", &b.child.id().to_string()]).status().unwrap();
        let started = Instant::now();
        while metric(&web, &b.api, "fleetstream_cluster_shard_leases_lost_total ").await == 0 {
            assert!(started.elapsed() < Duration::from_secs(30), "B never noticed it lost its leases");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_for_owned(&web, &b.api, u64::from(SHARDS) / 2).await;
        wait_for_owned(&web, &a.api, u64::from(SHARDS) / 2).await;
    }

    // Every acknowledged drone event is on the stream exactly once.
    let reader = ingest::IngestClient::connect(a.quic, &ClientConfig::new(Trust::Pem(a.pem.clone()))).await.unwrap();
    let mut sub = reader.subscribe_from::<DroneEvent>(Topic::DroneTelemetry, StartAt::Earliest).await.unwrap();
    let mut seen = BTreeSet::new();
    let expected = (PRODUCERS * DRONES_PER_PRODUCER * EVENTS_PER_DRONE) as usize;
    while seen.len() < expected {
        let next = tokio::time::timeout(Duration::from_secs(10), sub.next()).await;
        let (_, batch) = next.expect("telemetry arrives").unwrap().unwrap();
        for e in batch.events().iter() {
            let key = (e.drone_id.to_native(), e.seq.to_native());
            assert!(seen.insert(key), "drone event {key:?} stored twice");
        }
    }

    // Every delivery completed, with each delivery event exactly once.
    let mut sub = reader.subscribe_from::<DeliveryEvent>(Topic::DeliveryEvents, StartAt::Earliest).await.unwrap();
    let mut delivered = BTreeMap::new();
    while delivered.len() < delivery_of.len() * 4 {
        let next = tokio::time::timeout(Duration::from_secs(20), sub.next()).await;
        let (_, batch) = next.expect("delivery events arrive").unwrap().unwrap();
        for e in batch.events().iter() {
            let key = (e.delivery_id.to_native(), e.seq.to_native());
            let value = (e.stage.to_stage(), e.ts_us.to_native(), e.drone_id.to_native());
            assert!(delivered.insert(key, value).is_none(), "delivery event {key:?} published twice");
        }
    }
    for (&drone, &delivery) in delivery_of.iter() {
        let ts = |seq: u64| 1_000_000 * drone + seq;
        assert_eq!(delivered[&(delivery, 0)].0, DeliveryStage::Created);
        assert_eq!(delivered[&(delivery, 1)], (DeliveryStage::HeadedToPickup, ts(50), drone));
        assert_eq!(delivered[&(delivery, 2)], (DeliveryStage::InTransit, ts(common::PICKUP_AT), drone));
        assert_eq!(delivered[&(delivery, 3)], (DeliveryStage::DeliveryComplete, ts(common::DROPOFF_AT), drone));
    }
    // Any node answers for any drone: the node running its shard is asked (after a pause,
    // B runs half of them again).
    for &drone in delivery_of.keys() {
        let snap: serde_json::Value =
            web.get(format!("{}/v1/drones/{drone}", a.api)).send().await.unwrap().json().await.unwrap();
        assert_eq!(snap["last_seq"], EVENTS_PER_DRONE, "drone {drone}: {snap}");
        assert!(snap["delivery"].is_null(), "drone {drone} finished its delivery: {snap}");
    }
    // Nothing beyond them: a short wait shows no late duplicate.
    let late = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(late.is_err(), "no further delivery events: {:?}", late.map(|r| r.map(|b| b.map(|(o, _)| o))));
    reader.close().await;

    let mut a = a;
    Command::new("kill").args(["-TERM", &a.child.id().to_string()]).status().unwrap();
    assert!(a.child.wait().unwrap().success());
    if failure == Failure::Pause {
        Command::new("kill").args(["-TERM", &b.child.id().to_string()]).status().unwrap();
        assert!(b.child.wait().unwrap().success());
    }
    let js = async_nats::jetstream::new(nats.clone());
    let upper = prefix.to_uppercase();
    for stream in [format!("{upper}_TELEMETRY"), format!("{upper}_DELIVERIES")].into_iter().chain([
        format!("KV_{upper}_SHARDS"),
        format!("KV_{upper}_CHECKPOINTS"),
        format!("KV_{upper}_CURSORS"),
    ]) {
        let _ = js.delete_stream(&stream).await;
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A node restarted on its data directory keeps its lease name (kept there), so it takes back
/// the shards its killed run held at once, long before those leases would expire (60 s here):
/// it serves, owning every shard, as soon as it is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_on_its_data_dir_takes_its_shards_back_at_once() {
    let Some((nats, url)) = common::nats("a_node_restarted_on_its_data_dir_takes_its_shards_back").await else {
        return;
    };
    let prefix = format!("fsback{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("fleetstream-back-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // No node_id: the name kept in the data directory.
    let env = [("FLEETSTREAM_JETSTREAM__NODE_ID", ""), ("FLEETSTREAM_JETSTREAM__LEASE_MS", "60000")];
    let mut node = common::spawn_cluster_node(&dir, &url, &prefix, "node", 2, &env);
    let web = services::tls::plain_client().unwrap();
    wait_for_owned(&web, &node.api, 2).await;
    common::kill9(&mut node.child);
    let started = Instant::now();
    let mut node = common::spawn_cluster_node(&dir, &url, &prefix, "node", 2, &env);
    assert_eq!(metric(&web, &node.api, "fleetstream_cluster_shards_owned ").await, 2);
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}: waited for its own leases", started.elapsed());
    Command::new("kill").args(["-TERM", &node.child.id().to_string()]).status().unwrap();
    assert!(node.child.wait().unwrap().success());
    common::delete_streams(&nats, &prefix).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A shard taken over from its checkpoint is fed from the record right after the one the
/// checkpoint covers. Here that record was stored while no node ran the shard (as a batch
/// another node took, or a command its scheduler logged, is while a node restarts): the node is
/// stopped cleanly (its shard checkpointed at the last record), a drone's next event is put on
/// the shard's subject, and the restarted node must apply it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_record_after_a_checkpoint_is_applied_after_a_takeover() {
    let Some((nats, url)) = common::nats("the_first_record_after_a_checkpoint_is_applied").await else {
        return;
    };
    let prefix = format!("fsnext{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("fleetstream-next-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let env = [("FLEETSTREAM_ENGINE__CHECKPOINT_INTERVAL_MS", "600000")];
    let mut node = common::spawn_cluster_node(&dir, &url, &prefix, "node", 1, &env);
    let web = services::tls::plain_client().unwrap();
    common::report_in(node.quic, &node.pem, &node.api, &[5]).await;
    Command::new("kill").args(["-TERM", &node.child.id().to_string()]).status().unwrap();
    assert!(node.child.wait().unwrap().success());

    // The drone's next event, stored while the shard is nobody's.
    let event = common::drone_event(5, 1, 0, GeoPoint::new(47.6, -122.3));
    let meta = BatchMeta { producer_id: 9300, batch_seq: 1, ..BatchMeta::default() };
    let batch = TelemetryBatch::encode(meta, &[event], Buffer::new()).unwrap().into_buffer();
    let js = async_nats::jetstream::new(nats.clone());
    let subject = format!("{}.telemetry.0", prefix.to_lowercase());
    js.publish(subject, bytes::Bytes::copy_from_slice(batch.as_slice())).await.unwrap().await.unwrap();

    let mut node = common::spawn_cluster_node(&dir, &url, &prefix, "node", 1, &env);
    let started = Instant::now();
    let drone = loop {
        let drone: serde_json::Value =
            web.get(format!("{}/v1/drones/5", node.api)).send().await.unwrap().json().await.unwrap();
        if drone["last_seq"] == 1 || started.elapsed() > Duration::from_secs(5) {
            break drone;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(drone["last_seq"], 1, "the record after the checkpoint was applied: {drone}");

    Command::new("kill").args(["-TERM", &node.child.id().to_string()]).status().unwrap();
    assert!(node.child.wait().unwrap().success());
    common::delete_streams(&nats, &prefix).await;
    let _ = std::fs::remove_dir_all(&dir);
}
