//! Hostile and confused clients: one that sends nothing but bad batches is answered batch by
//! batch, each refusal with its reason and counted, while the node's log gets one line per
//! reason per interval, not one per batch; one that numbers its batches again from zero is
//! refused with a typed reason rather than silently dropped.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use events::wire::Buffer;
use events::{BatchMeta, GeoPoint, TelemetryBatch};

/// What the node logs, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_batches_is_answered_and_counted_but_logged_once_per_interval() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).with_env_filter("warn").init();
    let (dir, cfg) = common::loopback_config("hostile");
    let node = pipeline::Node::start(&cfg).await.unwrap();
    let client = common::quic_client(&node).await;
    let (mut lane, mut answers) = client.open_lane().await.unwrap();
    const BAD: u64 = 500;
    for seq in 0..BAD {
        let events = [common::drone_event(7, seq + 1, 1, GeoPoint::new(47.6, -122.3))];
        let meta = BatchMeta { producer_id: 99, batch_seq: seq, ..BatchMeta::default() };
        let mut frame = TelemetryBatch::encode(meta, &events, Buffer::new()).unwrap().as_bytes().to_vec();
        let last = frame.len() - 1;
        frame[last] ^= 0xff; // the body no longer matches its checksum
        lane.send(&frame).await.unwrap();
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), answers.recv()).await.unwrap().unwrap();
        let error = answer.result.unwrap_err();
        assert_eq!((answer.batch_seq, error.name()), (seq, "checksum_mismatch"), "{error}");
    }
    let metrics = services::tls::plain_client()
        .unwrap()
        .get(format!("http://{}/metrics", node.http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(&format!("reason=\"checksum_mismatch\"}} {BAD}")), "every refusal is counted: {metrics}");
    // A good batch after all that is still taken.
    let events = [common::drone_event(7, 1, 1, GeoPoint::new(47.6, -122.3))];
    let good = TelemetryBatch::encode(BatchMeta { producer_id: 100, ..BatchMeta::default() }, &events, Buffer::new());
    lane.send(good.unwrap().as_bytes()).await.unwrap();
    assert!(answers.recv().await.unwrap().result.is_ok());

    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let lines = text.lines().filter(|l| l.contains("batch rejected")).count();
    assert_eq!(lines, 1, "one line for the reason within the interval, not {BAD}:\n{text}");
    client.close().await;
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A producer that starts numbering its batches again (restarted without keeping its
/// sequence) is told so with a typed refusal instead of having its batches acknowledged and
/// dropped as repeats; a re-send of a recent batch is still a repeat, acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_numbering_again_from_zero_is_refused_as_regressed_not_dropped() {
    let (dir, cfg) = common::loopback_config("regressed");
    numbering_again_is_refused(&cfg).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same on the JetStream backend, whose own duplicate window would otherwise take the
/// new batches for repeats of the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream_a_producer_numbering_again_is_refused_as_regressed_too() {
    let Some((nats, url)) = common::nats("on_jetstream_a_producer_numbering_again_is_refused_as_regressed_too").await
    else {
        return;
    };
    let (dir, mut cfg) = common::loopback_config("regressed-js");
    let prefix = format!("FSREGR{}", std::process::id());
    cfg.log.backend = pipeline::log::LogBackend::Jetstream;
    cfg.jetstream.url = url;
    cfg.jetstream.stream_prefix = prefix.clone();
    cfg.jetstream.subject_prefix = prefix.to_lowercase();
    numbering_again_is_refused(&cfg).await;
    common::delete_streams_with(&nats, &prefix).await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn numbering_again_is_refused(cfg: &pipeline::Config) {
    let node = pipeline::Node::start(cfg).await.unwrap();
    let client = common::quic_client(&node).await;
    let (mut lane, mut answers) = client.open_lane().await.unwrap();
    let batch = |seq: u64| {
        let events = [common::drone_event(8, seq + 1, 1, GeoPoint::new(47.6, -122.3))];
        let meta = BatchMeta { producer_id: 4711, batch_seq: seq, ..BatchMeta::default() };
        TelemetryBatch::encode(meta, &events, Buffer::new()).unwrap()
    };
    for (seq, expected) in [(100_000, None), (100_000, None), (0, Some("sequence_regressed")), (100_001, None)] {
        lane.send(batch(seq).as_bytes()).await.unwrap();
        let answer = answers.recv().await.unwrap();
        assert_eq!(answer.result.as_ref().err().map(|e| e.name()), expected, "batch {seq}: {:?}", answer.result);
        if let Err(error) = &answer.result {
            assert!(error.to_string().contains("100000"), "the refusal names the highest: {error}");
        }
    }
    client.close().await;
    node.shutdown().await.unwrap();
}
