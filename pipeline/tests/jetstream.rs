//! The stream path's JetStream store against a real NATS server: batches go in as their wire
//! bytes, a re-sent batch is dropped by the duplicate window, and readers start at the
//! earliest batch, an offset or a time. Reads `FLEETSTREAM_NATS_URL` (default
//! `nats://127.0.0.1:4222`); without a server it prints SKIP, unless
//! `FLEETSTREAM_REQUIRE_SERVICES=1`, when it fails.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::time::Duration;

use bytes::Bytes;
use events::wire::Buffer;
use events::{BatchMeta, DroneEvent, DroneEventKind, FlightStatus, GeoPoint, StartAt, TelemetryBatch, Topic};
use pipeline::jetstream::{JetStreamConfig, JetStreamTopic};

fn batch(batch_seq: u64) -> (BatchMeta, Bytes) {
    let events: Vec<_> = (0..4)
        .map(|i| DroneEvent {
            drone_id: i,
            seq: batch_seq + 1,
            ts_us: events::now_us(),
            position: GeoPoint::new(47.6, -122.3),
            speed_mps: 5.0,
            heading_deg: 90.0,
            battery_pct: 70.0,
            status: FlightStatus::Flying,
            kind: DroneEventKind::Position,
        })
        .collect();
    let meta = BatchMeta { producer_id: 9, batch_seq, ..BatchMeta::default() };
    let b = TelemetryBatch::encode(meta, &events, Buffer::new()).unwrap();
    (meta, Bytes::copy_from_slice(b.as_bytes()))
}

async fn next(reader: &mut pipeline::jetstream::TopicReader) -> (u64, Bytes) {
    tokio::time::timeout(Duration::from_secs(5), reader.next()).await.unwrap().unwrap()
}

#[tokio::test]
async fn batches_are_stored_once_and_read_from_any_start() {
    let Some((client, url)) = common::nats("batches_are_stored_once_and_read_from_any_start").await else { return };
    let cfg = JetStreamConfig {
        url: url.clone(),
        stream_prefix: format!("FSTEST{}", std::process::id()),
        subject_prefix: format!("fstest{}", std::process::id()),
        max_age_s: 600,
        ..JetStreamConfig::default()
    };
    let topic = JetStreamTopic::open(&client, Topic::DroneTelemetry, &cfg).await.unwrap();

    let batches: Vec<_> = (0..3).map(batch).collect();
    let mut before_third = 0;
    for (i, (meta, bytes)) in batches.iter().enumerate() {
        if i == 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            before_third = events::now_us();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let appended = topic.append(i as u32 % 2, *meta, bytes.clone()).await.unwrap();
        assert_eq!((appended.offset, appended.duplicate), (i as u64, false));
    }
    // A re-send of batch 1 (the client never saw its ack) is recognised, not stored again.
    let again = topic.append(1, batches[1].0, batches[1].1.clone()).await.unwrap();
    assert_eq!((again.offset, again.duplicate), (1, true));

    // From the start: every batch once, byte for byte, in order across shards, and each
    // still a valid batch read in place.
    let mut reader = topic.read(StartAt::Earliest).await.unwrap();
    for (i, (meta, bytes)) in batches.iter().enumerate() {
        let (offset, got) = next(&mut reader).await;
        assert_eq!((offset, &got), (i as u64, bytes));
        let mut buf = Buffer::with_capacity(got.len());
        buf.extend_from_slice(&got);
        let decoded = TelemetryBatch::validate(buf, &events::Limits::default()).unwrap();
        assert_eq!(decoded.header().meta, *meta);
        assert_eq!(decoded.events().len(), 4);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), reader.next()).await.is_err(),
        "nothing more: the re-send was not stored"
    );

    // From an offset, and from a time.
    let mut from_one = topic.read(StartAt::Offset(1)).await.unwrap();
    assert_eq!(next(&mut from_one).await.0, 1);
    assert_eq!(next(&mut from_one).await.0, 2);
    let mut from_time = topic.read(StartAt::Time(before_third)).await.unwrap();
    assert_eq!(next(&mut from_time).await.0, 2);

    // And a reader from the latest sees only what is appended after it.
    let mut latest = topic.read(StartAt::Latest).await.unwrap();
    let (meta, bytes) = batch(3);
    topic.append(0, meta, bytes.clone()).await.unwrap();
    assert_eq!(next(&mut latest).await, (3, bytes));

    jetstream_cleanup(&client, topic.stream_name()).await;
}

async fn jetstream_cleanup(client: &async_nats::Client, stream: &str) {
    let js = async_nats::jetstream::new(client.clone());
    js.delete_stream(stream).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_path_leases_redelivers_and_dead_letters_with_the_reason() {
    use pipeline::jetstream::JetStreamQueue;
    let Some((client, url)) = common::nats("the_queue_path_leases_redelivers_and_dead_letters_with_the_reason").await
    else {
        return;
    };
    let (cfg, settings) = queue_test_config(url, "FSQTEST");
    let queue = JetStreamQueue::open(&client, events::QueueName::Notifications, &settings, &cfg).await.unwrap();
    for key in 1..=3u64 {
        queue.enqueue(key, Bytes::from(format!("message {key}")), None).await.unwrap();
    }
    // The same notification queued by a second node, under its id: stored once.
    let once = queue.enqueue(3, Bytes::from("message 3, again"), Some("n-3".into())).await.unwrap();
    assert_eq!(queue.enqueue(3, Bytes::from("message 3, again"), Some("n-3".into())).await.unwrap(), once);

    // Competing consumers: each message goes to one of them.
    let first = queue.lease(2, Duration::from_secs(2)).await.unwrap();
    let second = queue.lease(2, Duration::from_millis(500)).await.unwrap();
    let mut keys: Vec<u64> = first.iter().chain(&second).map(|l| l.key).collect();
    keys.sort_unstable();
    assert_eq!(keys, [1, 2, 3, 3], "each message leased once, the one queued twice under an id once");
    assert!(first.iter().chain(&second).all(|l| l.attempt == 1));

    // Two are done; the third fails until its attempts run out, then is dead-lettered with
    // the consumer's reason.
    let (done, failing): (Vec<_>, Vec<_>) =
        first.into_iter().chain(second).partition(|l| l.key != 3 || l.payload.as_ref() != b"message 3");
    for l in &done {
        queue.ack(l).await.unwrap();
    }
    let mut current = failing.into_iter().next().unwrap();
    loop {
        queue.nack(&current, "smtp relay refused").await.unwrap();
        if current.attempt == 3 {
            break;
        }
        let again = queue.lease(1, Duration::from_secs(2)).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].key, again[0].attempt), (3, current.attempt + 1));
        current = again.into_iter().next().unwrap();
    }

    // A message whose leases all expire is moved by the max-deliveries advisory.
    queue.enqueue(4, Bytes::from_static(b"stalled"), None).await.unwrap();
    for attempt in 1..=3 {
        let leased = queue.lease(1, Duration::from_secs(3)).await.unwrap();
        assert_eq!((leased.len(), leased[0].attempt), (1, attempt), "redelivered after the visibility timeout");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // JetStream notices the exhausted message when it next would deliver it: to a consumer
    // still asking, as a live one is.
    assert!(queue.lease(1, Duration::from_secs(1)).await.unwrap().is_empty(), "no fourth delivery");
    let dead = until_dead_letters(2, || queue.dead_letters()).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!((dead[0].key, dead[0].reason.as_str(), dead[0].attempts), (3, "smtp relay refused", 3));
    assert_eq!(&dead[0].payload[..], b"message 3");
    assert_eq!((dead[1].key, dead[1].attempts), (4, 3));
    assert!(dead[1].reason.contains("visibility timeout"), "{}", dead[1].reason);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !queue.is_empty().await.unwrap() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(queue.is_empty().await.unwrap(), "nothing left in the queue");

    drop(queue);
    let js = async_nats::jetstream::new(client.clone());
    for stream in ["QUEUE_NOTIFICATIONS", "DEAD_LETTERS"] {
        js.delete_stream(format!("{}_{stream}", cfg.stream_prefix)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drone_commands_go_only_to_the_session_holding_their_keys_and_dead_letter_with_the_reason() {
    use events::KeyRange;
    use pipeline::jetstream::keyed::KeyedQueue;
    let Some((client, url)) = common::nats("drone_commands_go_only_to_the_session_holding_their_keys").await else {
        return;
    };
    let (cfg, settings) = queue_test_config(url, "FSKTEST");
    let queue = KeyedQueue::open(&client, events::QueueName::DroneCommands, &settings, &cfg).await.unwrap();
    for key in [10u64, 11, 20] {
        queue.enqueue(key, Bytes::from(format!("mission for {key}"))).await.unwrap();
    }
    let wait = Duration::from_secs(2);

    // Each session gets the commands of its own drones, and nothing else.
    let (low, high) = (queue.attach(), queue.attach());
    let (low_keys, high_keys) = (KeyRange { lo: 10, hi: 12 }, KeyRange { lo: 20, hi: 21 });
    let mut got = queue.lease(low, low_keys, 8, wait).await.unwrap();
    if got.len() < 2 {
        got.extend(queue.lease(low, low_keys, 8, wait).await.unwrap());
    }
    let mut keys: Vec<u64> = got.iter().map(|l| l.key).collect();
    keys.sort_unstable();
    assert_eq!(keys, [10, 11]);
    let other = queue.lease(high, high_keys, 8, wait).await.unwrap();
    assert_eq!(other.iter().map(|l| (l.key, l.attempt)).collect::<Vec<_>>(), [(20, 1)]);

    // 10 is flown; 11 fails until its attempts run out and is dead-lettered with the reason.
    let (done, failing): (Vec<_>, Vec<_>) = got.into_iter().partition(|l| l.key == 10);
    queue.ack(&done[0]).await.unwrap();
    let mut current = failing.into_iter().next().unwrap();
    loop {
        queue.nack(&current, "drone refused: battery low").await.unwrap();
        if current.attempt == 3 {
            break;
        }
        let again = queue.lease(low, low_keys, 1, wait).await.unwrap();
        assert_eq!((again.len(), again[0].key, again[0].attempt), (1, 11, current.attempt + 1));
        current = again.into_iter().next().unwrap();
    }

    // 20's leases all expire: the max-deliveries advisory moves it.
    for attempt in 2..=3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let leased = queue.lease(high, high_keys, 1, Duration::from_secs(3)).await.unwrap();
        assert_eq!((leased.len(), leased[0].attempt), (1, attempt), "redelivered after the visibility timeout");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(queue.lease(high, high_keys, 1, Duration::from_secs(1)).await.unwrap().is_empty(), "no fourth delivery");
    let dead = until_dead_letters(2, || queue.dead_letters()).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!((dead[0].key, dead[0].reason.as_str(), dead[0].attempts), (11, "drone refused: battery low", 3));
    assert_eq!((dead[1].key, dead[1].attempts), (20, 3));
    assert!(dead[1].reason.contains("visibility timeout"), "{}", dead[1].reason);

    // A new session for keys both hold takes them over: the old sessions are told so.
    queue.enqueue(11, Bytes::from_static(b"second mission for 11")).await.unwrap();
    let wide = queue.attach();
    let taken = queue.lease(wide, KeyRange { lo: 0, hi: 100 }, 8, wait).await.unwrap();
    assert_eq!(taken.iter().map(|l| l.key).collect::<Vec<_>>(), [11]);
    assert_eq!(queue.lease(low, low_keys, 1, wait).await.unwrap_err(), events::Error::Superseded);
    queue.ack(&taken[0]).await.unwrap();
    queue.release(wide).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !queue.is_empty().await.unwrap() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(queue.is_empty().await.unwrap(), "nothing left in the queue");

    drop(queue);
    let js = async_nats::jetstream::new(client.clone());
    for stream in ["QUEUE_DRONE_COMMANDS", "DEAD_LETTERS"] {
        js.delete_stream(format!("{}_{stream}", cfg.stream_prefix)).await.unwrap();
    }
}

/// A JetStream config under `prefix` (with this process's id) and queue settings whose 400 ms
/// visibility timeout and three attempts let a test see redelivery and dead letters quickly.
/// The dead letters `read` returns once there are `n` of them, or after 10 s whatever there is.
async fn until_dead_letters<
    F: std::future::Future<Output = Result<Vec<pipeline::jetstream::JsDeadLetter>, pipeline::Error>>,
>(
    n: usize,
    read: impl Fn() -> F,
) -> Vec<pipeline::jetstream::JsDeadLetter> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let dead = read().await.unwrap();
        if dead.len() == n || std::time::Instant::now() > deadline {
            return dead;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn queue_test_config(url: String, prefix: &str) -> (JetStreamConfig, pipeline::queue::state::QueueConfig) {
    let cfg = JetStreamConfig {
        url,
        stream_prefix: format!("{prefix}{}", std::process::id()),
        subject_prefix: format!("{}{}", prefix.to_lowercase(), std::process::id()),
        ..JetStreamConfig::default()
    };
    let settings = pipeline::queue::state::QueueConfig {
        visibility_timeout_ms: 400,
        max_attempts: 3,
        ..pipeline::queue::state::QueueConfig::default()
    };
    (cfg, settings)
}
