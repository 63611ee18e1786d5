//! Extra telemetry subscribers for the stalled-subscriber benchmark: `--readers N` opens N more
//! subscribers (each its own QUIC connection and log subscription from the latest offset) that
//! measure what they receive; `--stall-reader-s S` makes the first of them stop reading for S
//! seconds, then catch up. The report shows whether the others' throughput and latency moved,
//! and the server's peak resident memory during the run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use events::{DroneEvent, StartAt, Topic, now_us};
use hdrhistogram::Histogram;
use ingest::{ClientConfig, IngestClient};
use serde::Serialize;
use tokio::sync::watch;

use crate::Percentiles;
use crate::observe::histogram;

/// What one extra reader saw.
#[derive(Debug, Clone, Serialize)]
pub struct ReaderReport {
    /// Reader number, from 0.
    pub index: usize,
    /// Seconds it stopped reading for (0 for a reader that never stalls).
    pub stalled_s: f64,
    /// Events received.
    pub events: u64,
    /// Events per second over the time it was subscribed.
    pub throughput_eps: f64,
    /// From an event's creation to its arrival at this reader, µs.
    pub latency_us: Percentiles,
    /// The same, for events received while the stalled reader was stalled (the window
    /// `--stall-reader-after-s` to that plus `--stall-reader-s`), and outside that window: for a
    /// reader that kept reading, the two show within one run whether the stall cost it anything.
    pub latency_in_stall_us: Percentiles,
    /// See `latency_in_stall_us`.
    pub latency_outside_stall_us: Percentiles,
    /// Events per second received inside and outside the stall window.
    pub eps_in_stall: f64,
    /// See `eps_in_stall`.
    pub eps_outside_stall: f64,
}

/// A reader in progress.
#[derive(Debug)]
pub struct Reader {
    index: usize,
    stall: Duration,
    /// Events received so far (for the end of the run: wait until every reader caught up).
    pub seen: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<anyhow::Result<Seen>>,
}

/// What a reader task gathered.
#[derive(Debug)]
struct Seen {
    events: u64,
    elapsed: Duration,
    /// Index 0: inside the stall window, 1: outside.
    latency: [Histogram<u64>; 2],
    events_in: [u64; 2],
    window: Duration,
}

/// Starts `n` readers; reader 0 stalls for `stall` beginning `stall_after` after the start.
pub async fn start(
    n: usize,
    stall: Duration,
    stall_after: Duration,
    server: std::net::SocketAddr,
    client_cfg: &ClientConfig,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<Reader>> {
    let mut readers = Vec::with_capacity(n);
    let origin = Instant::now();
    let window = stall_after..stall_after + stall;
    for index in 0..n {
        let client = IngestClient::connect(server, client_cfg).await?;
        let mut sub = client.subscribe_from::<DroneEvent>(Topic::DroneTelemetry, StartAt::Latest).await?;
        let (stall, window) = (if index == 0 { stall } else { Duration::ZERO }, window.clone());
        let mut stop = stop.clone();
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut events = 0u64;
            let mut latency = [histogram(), histogram()];
            let mut events_in = [0u64; 2];
            let mut stalled = stall.is_zero();
            loop {
                if !stalled && origin.elapsed() >= stall_after {
                    stalled = true;
                    tracing::info!(reader = index, seconds = stall.as_secs_f64(), "reader stalls");
                    tokio::time::sleep(stall).await;
                    tracing::info!(reader = index, "reader resumes");
                }
                tokio::select! {
                    _ = stop.changed() => break,
                    next = sub.next() => match next? {
                        Some((_, batch)) => {
                            let now = now_us();
                            let side = usize::from(!window.contains(&origin.elapsed()));
                            for e in batch.events().iter() {
                                let _ = latency[side].record(now.saturating_sub(e.ts_us.to_native()).max(1));
                            }
                            events_in[side] += batch.len() as u64;
                            events += batch.len() as u64;
                            counter.store(events, Ordering::Relaxed);
                        }
                        None => break,
                    }
                }
            }
            drop(sub);
            client.close().await;
            Ok(Seen { events, elapsed: started.elapsed(), latency, events_in, window: window.end - window.start })
        });
        readers.push(Reader { index, stall, seen, task });
    }
    Ok(readers)
}

/// Waits for the readers (after the run's stop) and summarises them.
pub async fn finish(readers: Vec<Reader>) -> Vec<ReaderReport> {
    let mut out = Vec::with_capacity(readers.len());
    for r in readers {
        match r.task.await {
            Ok(Ok(seen)) => {
                let mut all = seen.latency[0].clone();
                let _ = all.add(&seen.latency[1]);
                let (inside, outside) =
                    (seen.window.as_secs_f64(), (seen.elapsed.saturating_sub(seen.window)).as_secs_f64());
                out.push(ReaderReport {
                    index: r.index,
                    stalled_s: r.stall.as_secs_f64(),
                    events: seen.events,
                    throughput_eps: seen.events as f64 / seen.elapsed.as_secs_f64().max(1e-9),
                    latency_us: Percentiles::of(&all),
                    latency_in_stall_us: Percentiles::of(&seen.latency[0]),
                    latency_outside_stall_us: Percentiles::of(&seen.latency[1]),
                    eps_in_stall: if inside > 0.0 { seen.events_in[0] as f64 / inside } else { 0.0 },
                    eps_outside_stall: seen.events_in[1] as f64 / outside.max(1e-9),
                })
            }
            Ok(Err(error)) => tracing::error!(reader = r.index, %error, "reader failed"),
            Err(error) => tracing::error!(reader = r.index, %error, "reader panicked"),
        }
    }
    out
}

/// Samples the server's resident memory every 250 ms until `stop`; returns the peak.
pub fn watch_memory(
    http: reqwest::Client,
    api: String,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0u64;
        let mut every = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = stop.changed() => return peak,
                _ = every.tick() => {
                    if let Some((rss, _)) = crate::server_gauges(&http, &api).await {
                        peak = peak.max(rss);
                    }
                }
            }
        }
    })
}
