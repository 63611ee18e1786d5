//! Delivery ids stay unique when two nodes on one JetStream hand them out at once: each node's
//! scheduler takes blocks from the counter the nodes share (compare-and-swap on one entry), so
//! two nodes drawing ids concurrently, as two schedulers under load do, never mint the same one.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use pipeline::{Config, Node};
use services::ids::{Allocator, IdBlocks};

fn config(dir: &std::path::Path, url: &str, prefix: &str, node_id: &str) -> Config {
    let mut cfg = Config { data_dir: dir.to_path_buf(), ..Config::default() };
    cfg.ingest.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.engine.shards = 2;
    cfg.log.backend = pipeline::log::LogBackend::Jetstream;
    cfg.jetstream.url = url.to_string();
    cfg.jetstream.stream_prefix = prefix.to_uppercase();
    cfg.jetstream.subject_prefix = prefix.to_string();
    cfg.jetstream.node_id = node_id.to_string();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_drawing_delivery_ids_at_once_never_mint_the_same_one() {
    let Some((client, url)) = common::nats("two_nodes_drawing_delivery_ids").await else { return };
    let prefix = format!("fsids{}", std::process::id());
    let base = std::env::temp_dir().join(format!("fleetstream-ids-{}", std::process::id()));
    let a = Node::start(&config(&base.join("a"), &url, &prefix, "node-a")).await.unwrap();
    let b = Node::start(&config(&base.join("b"), &url, &prefix, "node-b")).await.unwrap();

    // Each node's allocator, as its scheduler holds it; four tasks per node draw at once, each
    // past several blocks, so the nodes race for the counter again and again.
    let allocator = |node: &Node| {
        let blocks: Arc<dyn IdBlocks> = Arc::new(pipeline::cluster::ClusterIdBlocks(node.cluster.clone().unwrap()));
        Arc::new(Allocator::new(blocks))
    };
    let mut tasks = Vec::new();
    for alloc in [allocator(&a), allocator(&a), allocator(&b), allocator(&b)] {
        for _ in 0..2 {
            let alloc = alloc.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::with_capacity(3_000);
                for _ in 0..3_000 {
                    ids.push(alloc.next().await.unwrap());
                }
                ids
            }));
        }
    }
    let mut all = BTreeSet::new();
    let mut drawn = 0;
    for t in tasks {
        let ids = t.await.unwrap();
        drawn += ids.len();
        all.extend(ids);
    }
    assert_eq!(all.len(), drawn, "{} of {drawn} ids were minted twice", drawn - all.len());
    assert!(all.last().is_some_and(|max| *max < 1 << 53), "ids stay below 2^53 (JSON-safe)");

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let js = async_nats::jetstream::new(client);
    let p = prefix.to_uppercase();
    for stream in ["TELEMETRY", "DELIVERIES"] {
        let _ = js.delete_stream(format!("{p}_{stream}")).await;
    }
    for bucket in ["SHARDS", "CHECKPOINTS", "CURSORS"] {
        let _ = js.delete_stream(format!("KV_{p}_{bucket}")).await;
    }
    let _ = std::fs::remove_dir_all(&base);
}
