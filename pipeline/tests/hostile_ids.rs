//! A client that names a new drone for every event cannot grow a node's memory past its caps:
//! two million distinct drone ids are taken and applied, the drones tracked stay at the cap
//! (the idle ones that reported longest ago let go), and resident memory grows by less than
//! the bound the config documents for tracked drones (`[engine] max_drones_per_shard`).
//!
//! A test binary of its own, so the process's memory is this test's alone.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use events::wire::Buffer;
use events::{BatchMeta, GeoPoint, TelemetryBatch};

/// Distinct drone ids sent.
const IDS: u64 = 2_000_000;
/// Events per batch.
const PER_BATCH: u64 = 2_000;
/// Drones tracked per shard (the test's cap; two shards).
const CAP: usize = 100_000;
/// Memory a tracked drone may take at most, bytes: the documented figure (its entry in the
/// shard's table and its share of the table's spare room, a checkpoint's copy and encoding
/// of it). Without the cap the two million drones grew this process by 858 MiB.
const PER_DRONE: u64 = 400;
/// What a node's working memory may grow by beside the drones while it takes a fast stream
/// (queues of batches, QUIC buffers, the log's write buffers, allocator slack), bytes.
const SLACK: u64 = 160 << 20;

fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

async fn metric(http: &reqwest::Client, addr: std::net::SocketAddr, name: &str) -> u64 {
    let text = http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with(name) && !l.starts_with('#')).unwrap_or_else(|| panic!("{name}"));
    line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_million_distinct_drone_ids_leave_memory_under_its_bound() {
    let (dir, mut cfg) = common::loopback_config("hostile-ids");
    cfg.engine.max_drones_per_shard = CAP;
    let node = pipeline::Node::start(&cfg).await.unwrap();
    let http = services::tls::plain_client().unwrap();
    let before = rss_anon();

    let client = common::quic_client(&node).await;
    let (mut lane, mut answers) = client.open_lane().await.unwrap();
    let reader = tokio::spawn(async move {
        let mut acked = 0u64;
        while let Some(answer) = answers.recv().await {
            answer.result.unwrap();
            acked += 1;
            if acked == IDS / PER_BATCH {
                break;
            }
        }
        acked
    });
    let at = GeoPoint::new(47.6, -122.3);
    for b in 0..IDS / PER_BATCH {
        let events: Vec<_> = (0..PER_BATCH).map(|i| common::drone_event(1 + b * PER_BATCH + i, 1, 0, at)).collect();
        let meta = BatchMeta { producer_id: 5, batch_seq: b, ..BatchMeta::default() };
        let batch = TelemetryBatch::encode(meta, &events, Buffer::new()).unwrap();
        lane.send(batch.as_bytes()).await.unwrap();
    }
    assert_eq!(reader.await.unwrap(), IDS / PER_BATCH, "every batch acknowledged");

    // Every event applied (none refused: the drones let go were idle).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while metric(&http, node.http_addr, "fleetstream_engine_events_applied_total").await < IDS {
        assert!(std::time::Instant::now() < deadline, "events not all applied");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let tracked = metric(&http, node.http_addr, "fleetstream_engine_drones_tracked").await;
    let grown = rss_anon().saturating_sub(before);
    let bound = 2 * CAP as u64 * PER_DRONE + SLACK;
    println!(
        "resident memory (anonymous) grew {:.1} MiB over {IDS} drone ids, {tracked} tracked; bound {:.1} MiB",
        grown as f64 / 1048576.0,
        bound as f64 / 1048576.0
    );
    assert!(tracked <= 2 * CAP as u64 && tracked >= CAP as u64, "tracked {tracked}");
    let evicted = metric(&http, node.http_addr, "fleetstream_limit_evicted_total{table=\"tracked_drones\"}").await;
    assert_eq!(evicted + tracked, IDS, "each drone either tracked or let go");
    let refused = metric(&http, node.http_addr, "fleetstream_limit_refused_total{table=\"tracked_drones\"}").await;
    assert_eq!(refused, 0);

    assert!(grown < bound, "grew {grown} bytes, bound {bound}");
    client.close().await;
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
