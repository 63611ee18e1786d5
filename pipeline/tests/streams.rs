//! The stream path on a real node, over QUIC and HTTP: subscribers each see every batch in
//! order, named cursors resume where they were committed and show their lag, replay starts at
//! an offset or a time, and the HTTP Server-Sent Events view carries the same batches. The
//! same tests run on the embedded log and on NATS JetStream (`[log] backend = "jetstream"`);
//! the JetStream runs read `FLEETSTREAM_NATS_URL` (default `nats://127.0.0.1:4222`) and print
//! SKIP without a server, unless `FLEETSTREAM_REQUIRE_SERVICES=1`, when they fail.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use events::wire::Buffer;
use events::{
    BatchMeta, BatchSink, DroneEvent, DroneEventKind, FlightStatus, GeoPoint, StartAt, TelemetryBatch, Topic,
};
use ingest::{ClientConfig, IngestClient, LogSubscription, Trust};
use pipeline::{Config, Node};

/// Where the node keeps its topics: the embedded log, or JetStream under a prefix of its own.
#[derive(Clone)]
enum Backend {
    Embedded,
    JetStream { url: String, prefix: String },
}

impl Backend {
    /// A JetStream backend with fresh streams, or `None` (after printing SKIP) without NATS.
    async fn jetstream(test: &str) -> Option<Self> {
        let (_, url) = common::nats(test).await?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        Some(Backend::JetStream { url, prefix: format!("fsst{}x{nanos}", std::process::id()) })
    }

    /// Deletes what the JetStream backend created.
    async fn clean(&self) {
        if let Backend::JetStream { url, prefix } = self {
            let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
            let p = prefix.to_uppercase();
            for stream in [format!("{p}_TELEMETRY"), format!("{p}_DELIVERIES"), format!("KV_{p}_SHARDS")] {
                let _ = js.delete_stream(&stream).await;
            }
            let _ = js.delete_stream(format!("KV_{p}_CHECKPOINTS")).await;
            let _ = js.delete_stream(format!("KV_{p}_CURSORS")).await;
        }
    }
}

fn config(dir: &std::path::Path, backend: &Backend) -> Config {
    let mut cfg = Config { data_dir: dir.to_path_buf(), ..Config::default() };
    cfg.ingest.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.engine.shards = 1;
    if let Backend::JetStream { url, prefix } = backend {
        cfg.log.backend = pipeline::log::LogBackend::Jetstream;
        cfg.jetstream.url = url.clone();
        cfg.jetstream.stream_prefix = prefix.to_uppercase();
        cfg.jetstream.subject_prefix = prefix.clone();
    }
    cfg
}

/// Batch `i`: one event of drone 1 created at `T0 + i` seconds.
const T0: u64 = 1_700_000_000_000_000;

fn batch(i: u64) -> TelemetryBatch {
    let ev = DroneEvent {
        drone_id: 1,
        seq: i + 1,
        ts_us: T0 + i * 1_000_000,
        position: GeoPoint::new(47.6, -122.3),
        speed_mps: 5.0,
        heading_deg: 0.0,
        battery_pct: 80.0,
        status: FlightStatus::Flying,
        kind: DroneEventKind::Position,
    };
    let meta = BatchMeta { producer_id: 77, batch_seq: i, ..BatchMeta::default() };
    TelemetryBatch::encode(meta, &[ev], Buffer::new()).unwrap()
}

async fn produce(node: &Node, range: std::ops::Range<u64>) {
    for i in range {
        node.engine.submit(batch(i)).await.unwrap().await.unwrap();
    }
}

/// Reads `n` batches: (offset, the batch's number).
async fn read(sub: &mut LogSubscription<DroneEvent>, n: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (offset, b) = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().unwrap().unwrap();
        out.push((offset, b.header().meta.batch_seq));
    }
    out
}

async fn streams_json(node: &Node) -> serde_json::Value {
    reqwest::get(format!("http://{}/v1/streams", node.http_addr)).await.unwrap().json().await.unwrap()
}

fn cursor_lag(v: &serde_json::Value, name: &str) -> u64 {
    v["streams"][0]["cursors"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()["lag"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_subscribers_see_everything_in_order_and_resume_from_their_cursors() {
    named_subscribers(Backend::Embedded, "embedded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_subscribers_see_everything_in_order_and_resume_from_their_cursors_on_jetstream() {
    if let Some(backend) = Backend::jetstream("named_subscribers_on_jetstream").await {
        named_subscribers(backend.clone(), "jetstream").await;
        backend.clean().await;
    }
}

async fn named_subscribers(backend: Backend, tag: &str) {
    let dir = std::env::temp_dir().join(format!("fleetstream-streams-cursors-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let node = Node::start(&config(&dir, &backend)).await.unwrap();
    produce(&node, 0..10).await;
    let client = IngestClient::connect(node.quic_addr, &ClientConfig::new(Trust::Pem(node.certificate_pem.clone())))
        .await
        .unwrap();

    // Two subscribers on one topic each see every batch, in order.
    let mut a = client.subscribe_named::<DroneEvent>(Topic::DroneTelemetry, "alpha", StartAt::Earliest).await.unwrap();
    let mut b = client.subscribe_named::<DroneEvent>(Topic::DroneTelemetry, "beta", StartAt::Earliest).await.unwrap();
    let all: Vec<(u64, u64)> = (0..10).map(|i| (i, i)).collect();
    assert_eq!(read(&mut a, 10).await, all);
    assert_eq!(read(&mut b, 10).await, all);

    // alpha processed four batches and committed, then went away; beta committed everything.
    a.commit(4).await.unwrap();
    b.commit(10).await.unwrap();
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = streams_json(&node).await;
    assert_eq!((cursor_lag(&v, "alpha"), cursor_lag(&v, "beta")), (6, 0), "{v}");
    produce(&node, 10..12).await;
    let metrics = reqwest::get(format!("http://{}/metrics", node.http_addr)).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("fleetstream_stream_cursor_lag{topic=\"drone-telemetry\",cursor=\"alpha\"} 8"),
        "{metrics}"
    );

    // alpha resumes exactly at its commit (the start position only applies to a new name): no
    // gap, and the only repeats are the batches it read after its last commit (4..10).
    let mut a = client.subscribe_named::<DroneEvent>(Topic::DroneTelemetry, "alpha", StartAt::Latest).await.unwrap();
    assert_eq!(a.start(), 4);
    assert_eq!(read(&mut a, 8).await, (4..12).map(|i| (i, i)).collect::<Vec<_>>());
    assert_eq!(read(&mut b, 2).await, vec![(10, 10), (11, 11)], "beta follows live");

    // Cursors survive a restart of the node. On JetStream they are shared by every node: a
    // node with a data directory of its own (another machine) has them too.
    a.commit(12).await.unwrap();
    drop((a, b));
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.close().await;
    node.shutdown().await.unwrap();
    let dir = match backend {
        Backend::Embedded => dir,
        Backend::JetStream { .. } => {
            let _ = std::fs::remove_dir_all(&dir);
            dir.with_extension("other-node")
        }
    };
    let node = Node::start(&config(&dir, &backend)).await.unwrap();
    let v = streams_json(&node).await;
    assert_eq!((cursor_lag(&v, "alpha"), cursor_lag(&v, "beta")), (0, 2), "{v}");
    let client = IngestClient::connect(node.quic_addr, &ClientConfig::new(Trust::Pem(node.certificate_pem.clone())))
        .await
        .unwrap();
    let b = client.subscribe_named::<DroneEvent>(Topic::DroneTelemetry, "beta", StartAt::Earliest).await.unwrap();
    assert_eq!(b.start(), 10);
    assert!(
        client.subscribe_named::<DroneEvent>(Topic::DroneTelemetry, "bad name", StartAt::Earliest).await.is_err(),
        "cursor names are checked"
    );
    drop(b);
    client.close().await;
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_subscribers_see_what_is_published_after_they_subscribe() {
    live(Backend::Embedded, "embedded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_subscribers_see_what_is_published_after_they_subscribe_on_jetstream() {
    if let Some(backend) = Backend::jetstream("live_subscribers_on_jetstream").await {
        live(backend.clone(), "jetstream").await;
        backend.clean().await;
    }
}

async fn live(backend: Backend, tag: &str) {
    let dir = std::env::temp_dir().join(format!("fleetstream-streams-live-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let node = Node::start(&config(&dir, &backend)).await.unwrap();
    produce(&node, 0..3).await;
    let client = IngestClient::connect(node.quic_addr, &ClientConfig::new(Trust::Pem(node.certificate_pem.clone())))
        .await
        .unwrap();
    let mut live = client.subscribe::<DroneEvent>(Topic::DroneTelemetry).await.unwrap();
    // On JetStream the node reads the topic only while someone subscribes: give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    produce(&node, 3..8).await;
    let mut seen = Vec::new();
    while seen.last() != Some(&7) {
        let b = tokio::time::timeout(Duration::from_secs(5), live.next()).await.unwrap().unwrap().unwrap();
        seen.push(b.header().meta.batch_seq);
    }
    assert!(seen.ends_with(&[3, 4, 5, 6, 7]), "every batch after subscribing, in order: {seen:?}");
    drop(live);
    client.close().await;
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_an_offset_or_a_time_and_over_server_sent_events() {
    replay(Backend::Embedded, "embedded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_an_offset_or_a_time_and_over_server_sent_events_on_jetstream() {
    if let Some(backend) = Backend::jetstream("replay_on_jetstream").await {
        replay(backend.clone(), "jetstream").await;
        backend.clean().await;
    }
}

async fn replay(backend: Backend, tag: &str) {
    let dir = std::env::temp_dir().join(format!("fleetstream-streams-replay-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let node = Node::start(&config(&dir, &backend)).await.unwrap();
    produce(&node, 0..20).await;
    let client = IngestClient::connect(node.quic_addr, &ClientConfig::new(Trust::Pem(node.certificate_pem.clone())))
        .await
        .unwrap();

    let mut at = client.subscribe_from::<DroneEvent>(Topic::DroneTelemetry, StartAt::Offset(3)).await.unwrap();
    assert_eq!(read(&mut at, 2).await, vec![(3, 3), (4, 4)]);
    for (time, expected) in [(T0 + 6 * 1_000_000, 6), (T0 + 6 * 1_000_000 + 1, 7), (0, 0), (T0 + 19 * 1_000_000, 19)] {
        let mut sub = client.subscribe_from::<DroneEvent>(Topic::DroneTelemetry, StartAt::Time(time)).await.unwrap();
        assert_eq!(sub.start(), expected, "time {time}");
        assert_eq!(read(&mut sub, 1).await, vec![(expected, expected)]);
    }
    let future = client.subscribe_from::<DroneEvent>(Topic::DroneTelemetry, StartAt::Time(u64::MAX)).await.unwrap();
    assert_eq!(future.start(), 20, "after every batch: the end of the log");
    let gone = client.subscribe_from::<DroneEvent>(Topic::DroneTelemetry, StartAt::Offset(500)).await;
    match gone {
        Err(e) => {
            assert!(e.to_string().contains("offset_unavailable") || e.to_string().contains("offset unavailable"), "{e}")
        }
        Ok(mut sub) => {
            let e = sub.next().await.unwrap_err();
            assert!(e.to_string().contains("offset"), "{e}");
        }
    }

    // The same log over HTTP as Server-Sent Events, resuming after Last-Event-ID.
    let http = services::tls::plain_client().unwrap();
    let mut resp = http
        .get(format!("http://{}/v1/streams/drone-telemetry/events?from=earliest", node.http_addr))
        .header("Last-Event-ID", "16")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    while text.matches("event: batch").count() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await.unwrap().unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let ids: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
    assert_eq!(ids, ["17", "18", "19"], "{text}");
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let v: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["offset"], 17);
    assert_eq!(v["events"][0]["seq"], 18);
    assert_eq!(v["events"][0]["kind"]["type"], "position");
    let bad = http.get(format!("http://{}/v1/streams/nope/events", node.http_addr)).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    drop(resp);
    drop(at);
    client.close().await;
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_asking_for_data_retention_deleted_gets_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("fleetstream-streams-retention-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = config(&dir, &Backend::Embedded);
    cfg.log.segment_bytes = 2_048;
    cfg.log.retention_secs = 0;
    cfg.engine.checkpoint_interval_ms = 50;
    let node = Node::start(&cfg).await.unwrap();
    produce(&node, 0..40).await;
    let client = IngestClient::connect(node.quic_addr, &ClientConfig::new(Trust::Pem(node.certificate_pem.clone())))
        .await
        .unwrap();
    let mut named =
        client.subscribe_named::<DroneEvent>(Topic::DroneTelemetry, "slow", StartAt::Earliest).await.unwrap();
    read(&mut named, 1).await;
    named.commit(1).await.unwrap();
    drop(named);
    // A batch after the checkpoint interval has the shard checkpoint past the old segments;
    // the appender applies retention every 10 s, on its next batch.
    tokio::time::sleep(Duration::from_millis(300)).await;
    produce(&node, 40..41).await;
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    produce(&node, 41..42).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while node.engine.topic_bounds(Topic::DroneTelemetry).0 == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (first, _) = node.engine.topic_bounds(Topic::DroneTelemetry);
    assert!(first > 1, "old segments were deleted (first offset {first})");
    for sub in [
        client.subscribe_from::<DroneEvent>(Topic::DroneTelemetry, StartAt::Offset(0)).await,
        client.subscribe_named::<DroneEvent>(Topic::DroneTelemetry, "slow", StartAt::Earliest).await,
    ] {
        let err = match sub {
            Err(e) => e,
            Ok(mut s) => s.next().await.unwrap_err(),
        };
        assert!(err.to_string().contains("offset unavailable"), "{err}");
    }
    let earliest = client.subscribe_from::<DroneEvent>(Topic::DroneTelemetry, StartAt::Earliest).await.unwrap();
    assert_eq!(earliest.start(), first, "earliest is what retention kept");
    drop(earliest);
    client.close().await;
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
