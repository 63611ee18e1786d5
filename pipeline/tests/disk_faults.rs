//! A disk that slows down or fails under a running fleet. A slow disk holds the fleet back
//! (each producer has at most its window of batches unanswered, so the fleet goes no faster
//! than the log's fsyncs) and loses nothing; a failing one makes the node stop acknowledging
//! instead of acknowledging what it could not keep, and after a restart on the same data the
//! fleet's re-sends fill the gap: nothing lost, nothing twice.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pipeline::log::DiskFault;

fn load_for(node: &pipeline::Node) -> loadgen::LoadConfig {
    let mut load = loadgen::LoadConfig::new(
        node.quic_addr,
        format!("http://{}", node.http_addr),
        ingest::Trust::Pem(node.certificate_pem.clone()),
    );
    load.drones = 20;
    load.connections = 2;
    load.deliveries_per_s = 0.0;
    load
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_disk_holds_the_fleet_back_and_loses_nothing() {
    const SYNC_DELAY: Duration = Duration::from_millis(200);
    let (dir, cfg) = common::loopback_config("slow-disk");
    let node = pipeline::Node::start(&cfg).await.unwrap();
    let metrics = || {
        let m = node.engine.metrics();
        (m.fsync_time.count(), m.batches.load(Ordering::Relaxed))
    };
    node.engine.inject_disk_fault(DiskFault::SlowSyncs(SYNC_DELAY));
    let (syncs_before, batches_before) = metrics();
    let mut load = load_for(&node);
    load.rate = 0.0; // as fast as the node takes them
    load.duration = Duration::from_secs(3);
    let report = loadgen::run(load.clone(), Arc::new(|_: &loadgen::Progress| {})).await.unwrap();
    let (syncs, batches) = metrics();
    let (syncs, batches) = (syncs - syncs_before, batches - batches_before);
    println!("{syncs} fsyncs, {batches} batches\n{report}");
    assert_eq!(report.events_acked, report.events_sent, "{report}");
    assert_eq!(report.events_rejected, 0, "{report}");
    assert_eq!((report.lost, report.duplicates), (0, 0), "{report}");
    assert!(report.events_sent > 0, "{report}");
    // The slow disk was in effect: a group commit at most every SYNC_DELAY (and the drain).
    assert!(syncs <= 3_000 / SYNC_DELAY.as_millis() as u64 + 10, "{syncs} fsyncs");
    // ... and the fleet went no faster than it: each group commit acknowledged at most the
    // fleet's windows (connections × unanswered batches per lane), never a backlog queued
    // past them.
    let window =
        (load.connections * ingest::ClientConfig::new(ingest::Trust::InsecureSkipVerify).max_inflight_per_lane) as u64;
    assert!(batches <= (syncs + 1) * window, "{batches} batches over {syncs} fsyncs, window {window}");
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_disk_stops_acknowledging_and_a_restart_loses_nothing() {
    let (dir, mut cfg) = common::loopback_config("failing-disk");
    let node = pipeline::Node::start(&cfg).await.unwrap();
    // The restarted node comes back where the fleet looks for it.
    cfg.ingest.listen = node.quic_addr;
    cfg.http.listen = node.http_addr;
    let mut load = load_for(&node);
    load.rate = 2_000.0;
    load.duration = Duration::from_secs(8);
    let run = tokio::spawn(loadgen::run(load, Arc::new(|_: &loadgen::Progress| {})));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked_before = node.engine.metrics().batches.load(Ordering::Relaxed);
    node.engine.inject_disk_fault(DiskFault::FailingSyncs);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused = node.engine.metrics().batches.load(Ordering::Relaxed);
    assert!(refused <= acked_before + 64, "the node stopped taking batches once its disk failed");
    let _ = tokio::time::timeout(Duration::from_secs(30), node.shutdown()).await;

    let node = pipeline::Node::start(&cfg).await.unwrap();
    let report = run.await.unwrap().unwrap();
    println!("{report}");
    assert_eq!(report.events_sent, 16_000, "{report}");
    assert_eq!(report.events_acked, report.events_sent, "{report}");
    assert_eq!((report.lost, report.duplicates), (0, 0), "{report}");
    assert_eq!(report.telemetry_events_observed, report.events_acked, "{report}");
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
