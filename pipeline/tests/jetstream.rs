//! The stream path's JetStream store against a real NATS server: batches go in as their wire
//! bytes, a re-sent batch is dropped by the duplicate window, and readers start at the
//! earliest batch, an offset or a time. Reads `FLEETSTREAM_NATS_URL` (default
//! `nats://127.0.0.1:4222`); without a server it prints SKIP, unless
//! `FLEETSTREAM_REQUIRE_SERVICES=1`, when it fails.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

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
    let url = std::env::var("FLEETSTREAM_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = match async_nats::connect(&url).await {
        Ok(c) => c,
        Err(error) if std::env::var("FLEETSTREAM_REQUIRE_SERVICES").as_deref() != Ok("1") => {
            println!("SKIP batches_are_stored_once_and_read_from_any_start: no NATS at {url}: {error}");
            return;
        }
        Err(error) => panic!("NATS at {url} is required (FLEETSTREAM_REQUIRE_SERVICES=1): {error}"),
    };
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
