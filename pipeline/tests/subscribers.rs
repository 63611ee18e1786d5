//! Offset subscribers are tasks, not threads: a thousand of them on one engine add a handful of
//! threads at most, each receives every batch in log order (the recent ones shared from memory),
//! and one that starts further back than memory keeps reads the segment files.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::time::Duration;

use events::wire::Buffer;
use events::{BatchMeta, BatchSink, GeoPoint, StartAt, StreamSource, TelemetryBatch};
use pipeline::engine::{Engine, EngineConfig, Storage};
use pipeline::log::LogConfig;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

fn batch(seq: u64) -> TelemetryBatch {
    let ev = common::drone_event(seq % 7 + 1, seq, 0, GeoPoint::new(47.6, -122.3));
    let meta = BatchMeta { producer_id: 9, batch_seq: seq, ..BatchMeta::default() };
    TelemetryBatch::encode(meta, &[ev], Buffer::new()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_are_tasks_and_each_gets_every_batch() {
    let dir = std::env::temp_dir().join(format!("fleetstream-subscribers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let storage = Storage::Durable { dir: dir.clone(), log: LogConfig::default() };
    let (engine, threads_of_engine, _) =
        Engine::start(EngineConfig { shards: 2, ..EngineConfig::default() }, storage).unwrap();
    // More batches than the tail keeps, so a subscriber from 0 starts in the segment files.
    let early = 400u64;
    for seq in 1..=early {
        engine.submit(batch(seq)).await.unwrap().await.unwrap();
    }
    let before = threads();
    // From the log's end by offset: `Latest` is the delivered end, which may still be short of
    // the last acknowledged batch.
    let subs: Vec<_> = (0..1000).map(|_| engine.subscribe_telemetry_from(StartAt::Offset(early)).unwrap()).collect();
    let from_start = engine.subscribe_telemetry_from(StartAt::Offset(0)).unwrap();
    let added = threads().saturating_sub(before);
    assert!(added < 20, "1,001 subscribers added {added} threads");
    let live = 50u64;
    for seq in early + 1..=early + live {
        engine.submit(batch(seq)).await.unwrap().await.unwrap();
    }
    for (i, sub) in subs.into_iter().enumerate() {
        let mut last = None;
        for expected in early + 1..=early + live {
            let (offset, got) =
                tokio::time::timeout(Duration::from_secs(10), sub.rx.recv_async()).await.unwrap().unwrap().unwrap();
            assert!(last < Some(offset), "subscriber {i}: log order");
            last = Some(offset);
            assert_eq!(got.header().meta.batch_seq, expected, "subscriber {i}");
        }
    }
    for expected in 1..=early + live {
        let (offset, got) =
            tokio::time::timeout(Duration::from_secs(10), from_start.rx.recv_async()).await.unwrap().unwrap().unwrap();
        assert_eq!(offset, expected - 1);
        assert_eq!(got.header().meta.batch_seq, expected, "read back from the log, then from memory");
    }
    engine.shutdown(threads_of_engine).await;
    let _ = std::fs::remove_dir_all(&dir);
}
