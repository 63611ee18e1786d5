//! The whole path through a bad network: loadgen's fleet and subscriber reach the node through
//! a UDP relay that drops, duplicates and reorders datagrams in both directions. QUIC repairs
//! what the network breaks, the producers re-send what went unanswered, and the node's dedup
//! takes each batch once: the run finds nothing lost and nothing duplicated, and every
//! delivery completes.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;

/// Per hundred datagrams in each direction: dropped, sent twice, held back behind the next.
const DROP: u64 = 2;
const DUPLICATE: u64 = 1;
const REORDER: u64 = 2;

#[derive(Default)]
struct Counts {
    passed: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

/// One direction's faults: a seeded generator (the same run each time) and the datagram held
/// back to be sent after the next one.
struct Faults {
    rng: u64,
    held: Option<Vec<u8>>,
    counts: Arc<Counts>,
}

impl Faults {
    fn new(seed: u64, counts: Arc<Counts>) -> Self {
        Self { rng: seed | 1, held: None, counts }
    }

    /// What to send now, in order, for one datagram that arrived.
    fn pass(&mut self, datagram: Vec<u8>) -> Vec<Vec<u8>> {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let roll = self.rng % 100;
        let mut out = Vec::new();
        if roll < DROP {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return out;
        }
        if roll < DROP + DUPLICATE {
            self.counts.duplicated.fetch_add(1, Ordering::Relaxed);
            out.push(datagram.clone());
        } else if roll >= 100 - REORDER && self.held.is_none() {
            self.counts.reordered.fetch_add(1, Ordering::Relaxed);
            self.held = Some(datagram);
            return out;
        }
        self.counts.passed.fetch_add(1, Ordering::Relaxed);
        out.push(datagram);
        out.extend(self.held.take());
        out
    }
}

/// A relay in front of `server`: every client address gets a socket of its own toward the
/// server, and both directions go through [`Faults`].
async fn relay(server: SocketAddr) -> (SocketAddr, Arc<Counts>) {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        let mut toward_server: HashMap<SocketAddr, (Arc<UdpSocket>, Faults)> = HashMap::new();
        let mut buf = vec![0u8; 65_536];
        let mut seed = 0x5eed_u64;
        loop {
            let Ok((n, client)) = front.recv_from(&mut buf).await else { return };
            let (up, faults) = match toward_server.entry(client) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    up.connect(server).await.unwrap();
                    seed += 1;
                    let (back, front, mut faults) = (up.clone(), front.clone(), Faults::new(seed * 7919, c.clone()));
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        while let Ok(n) = back.recv(&mut buf).await {
                            for d in faults.pass(buf[..n].to_vec()) {
                                let _ = front.send_to(&d, client).await;
                            }
                        }
                    });
                    e.insert((up, Faults::new(seed, c.clone())))
                }
            };
            for d in faults.pass(buf[..n].to_vec()) {
                let _ = up.send(&d).await;
            }
        }
    });
    (addr, counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_a_lossy_network_loses_nothing_and_duplicates_nothing() {
    let (dir, cfg) = common::loopback_config("lossy");
    let node = pipeline::Node::start(&cfg).await.unwrap();
    let (relay_addr, counts) = relay(node.quic_addr).await;
    let mut load = loadgen::LoadConfig::new(
        relay_addr,
        format!("http://{}", node.http_addr),
        ingest::Trust::Pem(node.certificate_pem.clone()),
    );
    load.drones = 40;
    load.connections = 4;
    load.rate = 2_000.0;
    load.duration = Duration::from_secs(6);
    load.leg = Duration::from_millis(400);
    load.deliveries_per_s = 10.0;
    let report = loadgen::run(load, Arc::new(|_: &loadgen::Progress| {})).await.unwrap();
    let (dropped, duplicated, reordered) = (
        counts.dropped.load(Ordering::Relaxed),
        counts.duplicated.load(Ordering::Relaxed),
        counts.reordered.load(Ordering::Relaxed),
    );
    println!(
        "relay: {} passed, {dropped} dropped, {duplicated} duplicated, {reordered} reordered\n{report}",
        counts.passed.load(Ordering::Relaxed)
    );
    assert!(dropped > 50 && duplicated > 20 && reordered > 50, "the network was bad enough to test");
    assert_eq!(report.events_sent, 12_000, "{report}");
    assert!(report.deliveries_scheduled >= 20, "{report}");
    common::assert_clean_run(&report);
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
