//! The queue path on a real node: competing consumers over QUIC, redelivery after the
//! visibility timeout and on disconnect, dead letters over HTTP, and queue contents across a
//! restart. The competing-consumers test also runs with `notifications` on NATS JetStream
//! (`[jetstream] queues = ["notifications"]`); it reads `FLEETSTREAM_NATS_URL` (default
//! `nats://127.0.0.1:4222`) and prints SKIP without a server, unless
//! `FLEETSTREAM_REQUIRE_SERVICES=1`, when it fails.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use events::{KeyRange, QueueName, Verdict, WorkQueues};
use ingest::{ClientConfig, IngestClient, Trust};
use pipeline::{Config, Node};
use tokio::sync::Mutex;

fn config(dir: &std::path::Path, visibility_ms: u64, attempts: u32) -> Config {
    let mut cfg = Config { data_dir: dir.to_path_buf(), ..Config::default() };
    cfg.ingest.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.engine.shards = 1;
    // These tests consume the queues themselves.
    cfg.notify.notifier = false;
    for q in [&mut cfg.queues.drone_commands, &mut cfg.queues.notifications] {
        q.visibility_timeout_ms = visibility_ms;
        q.max_attempts = attempts;
    }
    cfg
}

fn temp(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fleetstream-queues-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn client(node: &Node) -> IngestClient {
    IngestClient::connect(node.quic_addr, &ClientConfig::new(Trust::Pem(node.certificate_pem.clone()))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_consumers_share_a_queue_and_each_message_is_processed_once() {
    three_consumers(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_consumers_share_a_queue_and_each_message_is_processed_once_on_jetstream() {
    if let Some(js) = JetStream::connect("three_consumers_share_a_queue_on_jetstream").await {
        three_consumers(Some((js.url.clone(), js.prefix.clone()))).await;
        js.clean().await;
    }
}

/// A NATS server for a test, with a stream prefix of its own.
struct JetStream {
    nats: async_nats::Client,
    url: String,
    prefix: String,
}

impl JetStream {
    /// `None` (after printing SKIP) without NATS, unless `FLEETSTREAM_REQUIRE_SERVICES=1`.
    async fn connect(test: &str) -> Option<Self> {
        let (nats, url) = common::nats(test).await?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        Some(Self { nats, url, prefix: format!("FSQ{}X{nanos}", std::process::id()) })
    }

    /// Deletes the streams the test made (there must be some: the queue lived there).
    async fn clean(&self) {
        let js = async_nats::jetstream::new(self.nats.clone());
        let mut names = js.stream_names();
        let mut ours = Vec::new();
        while let Some(Ok(name)) = futures_util::StreamExt::next(&mut names).await {
            if name.starts_with(&self.prefix) {
                ours.push(name);
            }
        }
        assert!(!ours.is_empty(), "the queue lived on JetStream");
        for name in ours {
            js.delete_stream(&name).await.unwrap();
        }
    }
}

fn on_jetstream(cfg: &mut Config, (url, prefix): &(String, String), queue: &str) {
    cfg.jetstream.url = url.clone();
    cfg.jetstream.stream_prefix = prefix.clone();
    cfg.jetstream.subject_prefix = prefix.to_lowercase();
    cfg.jetstream.queues = vec![queue.into()];
}

/// Three QUIC consumers compete on `notifications`, kept locally or, with `(url, prefix)`, on
/// JetStream.
async fn three_consumers(jetstream: Option<(String, String)>) {
    let dir = temp(if jetstream.is_some() { "three-js" } else { "three" });
    let mut cfg = config(&dir, 30_000, 5);
    if let Some(js) = &jetstream {
        on_jetstream(&mut cfg, js, "notifications");
    }
    let node = Node::start(&cfg).await.unwrap();
    let total = 300u64;
    let processed = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for worker in 0..3 {
        let c = client(&node).await;
        let processed = processed.clone();
        tasks.push(tokio::spawn(async move {
            let mut consumer = c.consume(QueueName::Notifications, KeyRange::ALL, 8).await.unwrap();
            let mut mine = 0;
            loop {
                let m = match tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
                    Ok(Some(m)) => m.unwrap(),
                    _ => break,
                };
                let body = String::from_utf8(m.payload.to_vec()).unwrap();
                processed.lock().await.push((body, worker, m.attempt));
                consumer.settle(&m, Verdict::Ack).await.unwrap();
                mine += 1;
            }
            (mine, c)
        }));
    }
    // Give the consumers a moment to attach, then produce.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..total {
        node.engine.enqueue(QueueName::Notifications, i, format!("note-{i}").into_bytes()).await.unwrap();
    }
    let mut per_worker = Vec::new();
    let mut clients = Vec::new();
    for t in tasks {
        let (n, c) = t.await.unwrap();
        per_worker.push(n);
        clients.push(c);
    }
    let processed = processed.lock().await;
    let unique: HashSet<&String> = processed.iter().map(|(b, _, _)| b).collect();
    assert_eq!(processed.len() as u64, total, "each message processed exactly once");
    assert_eq!(unique.len() as u64, total);
    assert!(processed.iter().all(|(_, _, attempt)| *attempt == 1), "nothing was redelivered");
    assert_eq!(per_worker.iter().sum::<u64>(), total);
    assert!(per_worker.iter().filter(|n| **n > 0).count() >= 2, "the work was shared: {per_worker:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let q = node.engine.queue_backend(QueueName::Notifications);
    assert_eq!(q.kind(), if jetstream.is_some() { "jetstream" } else { "embedded" });
    // JetStream takes acks in the background: they land within moments.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while q.pending().await.unwrap() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(q.pending().await.unwrap(), 0, "every message acked");
    drop(clients);
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_come_back_after_the_visibility_timeout_or_at_once_on_disconnect() {
    let dir = temp("redeliver");
    let mut cfg = config(&dir, 600, 5);
    // Competing consumers on the same keys here; takeover has its own test below.
    cfg.queues.drone_commands.exclusive_keys = false;
    let node = Node::start(&cfg).await.unwrap();
    for i in 0..4u64 {
        node.engine.enqueue(QueueName::DroneCommands, 100 + i, vec![i as u8]).await.unwrap();
    }
    // A consumer that stalls: it holds two messages and never settles or goes away.
    let stalled = node.engine.attach(QueueName::DroneCommands, KeyRange { lo: 100, hi: 102 }).unwrap();
    let held = node
        .engine
        .lease(QueueName::DroneCommands, stalled, KeyRange { lo: 100, hi: 102 }, 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(held.len(), 2);
    // A QUIC consumer of the same keys gets nothing until the timeout, then both, as attempt 2.
    let c = client(&node).await;
    let mut consumer = c.consume(QueueName::DroneCommands, KeyRange { lo: 100, hi: 102 }, 8).await.unwrap();
    let started = std::time::Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await.unwrap().unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(400), "not before the visibility timeout");
    let second = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!((first.attempt, second.attempt), (2, 2));
    let mut ids = vec![first.id, second.id];
    ids.sort_unstable();
    let mut held_ids: Vec<u64> = held.iter().map(|m| m.id).collect();
    held_ids.sort_unstable();
    assert_eq!(ids, held_ids);
    // The stalled consumer's late ack is refused: its lease is gone.
    assert_eq!(
        node.engine.settle(QueueName::DroneCommands, held[0].id, held[0].token, Verdict::Ack),
        Err(events::Error::LeaseLost(held[0].id))
    );
    // Disconnecting without acking hands them back at once (well before another timeout).
    drop(consumer);
    drop(c);
    let c2 = client(&node).await;
    let mut again = c2.consume(QueueName::DroneCommands, KeyRange { lo: 100, hi: 102 }, 8).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(3), again.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!(m.attempt, 3, "redelivered after the disconnect");
    again.settle(&m, Verdict::Ack).await.unwrap();
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_inspected_and_replayed_and_queues_survive_a_restart() {
    let dir = temp("dlq");
    let cfg = config(&dir, 30_000, 3);
    let node = Node::start(&cfg).await.unwrap();
    let poison = node.engine.enqueue(QueueName::Notifications, 7, b"poison".to_vec()).await.unwrap();
    let kept = node.engine.enqueue(QueueName::Notifications, 8, b"kept for later".to_vec()).await.unwrap();
    let c = client(&node).await;
    let mut consumer = c.consume(QueueName::Notifications, KeyRange { lo: 7, hi: 8 }, 1).await.unwrap();
    for attempt in 1..=3 {
        let m = tokio::time::timeout(Duration::from_secs(3), consumer.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!((m.id, m.attempt), (poison, attempt));
        consumer.settle(&m, Verdict::Nack("smtp said 550: mailbox unavailable".into())).await.unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await.is_err(),
        "a dead letter is not offered again"
    );
    let http = services::tls::plain_client().unwrap();
    let base = format!("http://{}", node.http_addr);
    let list: serde_json::Value =
        http.get(format!("{base}/v1/queues/notifications/dead-letters")).send().await.unwrap().json().await.unwrap();
    let items = list["dead_letters"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["id"], poison);
    assert_eq!(items[0]["attempts"], 3);
    assert_eq!(items[0]["reason"], "smtp said 550: mailbox unavailable");
    let one: serde_json::Value = http
        .get(format!("{base}/v1/queues/notifications/dead-letters/{poison}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["payload_hex"], "706f69736f6e");
    let missing = http.get(format!("{base}/v1/queues/notifications/dead-letters/{kept}")).send().await.unwrap();
    assert_eq!(missing.status(), 404, "a live message is not a dead letter");
    let bad = http.get(format!("{base}/v1/queues/nope/dead-letters")).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fleetstream_queue_dead_lettered_total{queue=\"notifications\"} 1"), "{metrics}");

    // Both the dead letter and the waiting message survive a restart.
    drop(consumer);
    drop(c);
    node.shutdown().await.unwrap();
    let node = Node::start(&cfg).await.unwrap();
    let q = node.engine.queues().get(QueueName::Notifications);
    assert_eq!(q.counts(), (1, 0, 1), "one waiting, one dead, after the restart");
    let base = format!("http://{}", node.http_addr);
    let replayed =
        http.post(format!("{base}/v1/queues/notifications/dead-letters/{poison}/replay")).send().await.unwrap();
    assert_eq!(replayed.status(), 200);
    let c = client(&node).await;
    let mut consumer = c.consume(QueueName::Notifications, KeyRange::ALL, 4).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(3), consumer.recv()).await.unwrap().unwrap().unwrap();
        got.push((m.id, m.attempt, m.payload.to_vec()));
        consumer.settle(&m, Verdict::Ack).await.unwrap();
    }
    got.sort();
    assert_eq!(got, vec![(poison, 1, b"poison".to_vec()), (kept, 1, b"kept for later".to_vec())]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(q.counts(), (0, 0, 0));
    drop(consumer);
    drop(c);
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_drone_takes_its_commands_over_from_its_old_session_at_once() {
    takeover(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_drone_takes_its_commands_over_from_its_old_session_at_once_on_jetstream() {
    if let Some(js) = JetStream::connect("a_reconnecting_drone_takes_its_commands_over_on_jetstream").await {
        takeover(Some((js.url.clone(), js.prefix.clone()))).await;
        js.clean().await;
    }
}

/// A drone session superseded by a newer one for the same keys, with `drone-commands` kept
/// locally or, with `(url, prefix)`, on JetStream.
async fn takeover(jetstream: Option<(String, String)>) {
    let dir = temp(if jetstream.is_some() { "takeover-js" } else { "takeover" });
    // A long visibility timeout: nothing here may wait for it.
    let mut cfg = config(&dir, 60_000, 5);
    if let Some(js) = &jetstream {
        on_jetstream(&mut cfg, js, "drone-commands");
    }
    let node = Node::start(&cfg).await.unwrap();
    for i in 0..3u64 {
        node.engine.enqueue(QueueName::DroneCommands, 500 + i, vec![i as u8]).await.unwrap();
    }
    // The old session leases the drone's commands and goes silent without closing (a drone
    // that lost its link: its connection lingers until the idle timeout).
    let old = client(&node).await;
    let mut old_consumer = old.consume(QueueName::DroneCommands, KeyRange { lo: 500, hi: 503 }, 8).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::time::timeout(Duration::from_secs(3), old_consumer.recv()).await.unwrap().unwrap().unwrap());
    }
    // The drone reconnects: its new session gets every unacked command at once.
    let new = client(&node).await;
    let mut consumer = new.consume(QueueName::DroneCommands, KeyRange { lo: 500, hi: 503 }, 8).await.unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(3), consumer.recv()).await.unwrap().unwrap().unwrap();
        got.push((m.id, m.attempt));
        consumer.settle(&m, Verdict::Ack).await.unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(3), "no timeout was waited for");
    got.sort_unstable();
    // JetStream counts attempts per session (per consumer): the new session's are its first.
    let attempt = if jetstream.is_some() { 1 } else { 2 };
    let mut expected: Vec<(u64, u32)> = held.iter().map(|m| (m.id, attempt)).collect();
    expected.sort_unstable();
    assert_eq!(got, expected, "the same commands");
    if jetstream.is_some() {
        assert!(held.iter().all(|m| m.attempt == 1));
    }
    // The old session was told it was superseded, and its late acks are refused.
    let end = tokio::time::timeout(Duration::from_secs(3), old_consumer.recv()).await.unwrap();
    assert!(matches!(end, Some(Err(_)) | None), "the old session ends");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let q = node.engine.queue_backend(QueueName::DroneCommands);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while q.pending().await.unwrap() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(q.pending().await.unwrap(), 0, "every command acked");
    assert_eq!(
        node.engine.settle(QueueName::DroneCommands, held[0].id, held[0].token, Verdict::Ack),
        Err(events::Error::UnknownMessage(held[0].id)),
        "acked by the new session already"
    );
    drop((old_consumer, consumer));
    drop((old, new));
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_drone_commands_on_jetstream_are_listed_replayed_and_deleted_over_http() {
    let Some(js) = JetStream::connect("dead_drone_commands_on_jetstream").await else { return };
    let dir = temp("dlq-js");
    let mut cfg = config(&dir, 30_000, 2);
    on_jetstream(&mut cfg, &(js.url.clone(), js.prefix.clone()), "drone-commands");
    let node = Node::start(&cfg).await.unwrap();
    for (key, payload) in [(7u64, &b"poison"[..]), (8, b"doomed too")] {
        node.engine.enqueue(QueueName::DroneCommands, key, payload.to_vec()).await.unwrap();
    }
    let c = client(&node).await;
    let mut consumer = c.consume(QueueName::DroneCommands, KeyRange { lo: 7, hi: 9 }, 4).await.unwrap();
    let mut nacked = 0;
    while nacked < 4 {
        let m = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await.unwrap().unwrap().unwrap();
        consumer.settle(&m, Verdict::Nack(format!("drone {} refused", m.key))).await.unwrap();
        nacked += 1;
    }
    let http = services::tls::plain_client().unwrap();
    let base = format!("http://{}/v1/queues/drone-commands/dead-letters", node.http_addr);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let items = loop {
        let list: serde_json::Value = http.get(&base).send().await.unwrap().json().await.unwrap();
        let items = list["dead_letters"].as_array().unwrap().clone();
        if items.len() == 2 || std::time::Instant::now() > deadline {
            break items;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(items.len(), 2, "{items:?}");
    let poison = items.iter().find(|d| d["key"] == 7).unwrap();
    assert_eq!((poison["attempts"].as_u64(), poison["reason"].as_str()), (Some(2), Some("drone 7 refused")));
    let id = poison["id"].as_u64().unwrap();
    let doomed = items.iter().find(|d| d["key"] == 8).unwrap()["id"].as_u64().unwrap();
    let one: serde_json::Value = http.get(format!("{base}/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(one["payload_hex"], "706f69736f6e");
    let page: serde_json::Value = http.get(format!("{base}?after={id}")).send().await.unwrap().json().await.unwrap();
    assert!(page["dead_letters"].as_array().unwrap().iter().all(|d| d["id"].as_u64().unwrap() > id), "{page}");

    // Replayed, it is delivered again with fresh attempts; deleted, it is gone.
    assert_eq!(http.post(format!("{base}/{id}/replay")).send().await.unwrap().status(), 200);
    let again = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await.unwrap().unwrap().unwrap();
    assert_eq!((again.key, again.attempt, &again.payload[..]), (7, 1, &b"poison"[..]));
    consumer.settle(&again, Verdict::Ack).await.unwrap();
    assert_eq!(http.delete(format!("{base}/{doomed}")).send().await.unwrap().status(), 204);
    assert_eq!(http.get(format!("{base}/{doomed}")).send().await.unwrap().status(), 404);
    assert_eq!(http.post(format!("{base}/{doomed}/replay")).send().await.unwrap().status(), 404);
    let list: serde_json::Value = http.get(&base).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["dead_letters"].as_array().unwrap().len(), 0, "{list}");
    drop(consumer);
    drop(c);
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    js.clean().await;
}
