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
}

/// A reader in progress.
#[derive(Debug)]
pub struct Reader {
    index: usize,
    stall: Duration,
    /// Events received so far (for the end of the run: wait until every reader caught up).
    pub seen: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<anyhow::Result<(u64, Histogram<u64>, Duration)>>,
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
    for index in 0..n {
        let client = IngestClient::connect(server, client_cfg).await?;
        let mut sub = client.subscribe_from::<DroneEvent>(Topic::DroneTelemetry, StartAt::Latest).await?;
        let stall = if index == 0 { stall } else { Duration::ZERO };
        let mut stop = stop.clone();
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut events = 0u64;
            let mut latency = histogram();
            let mut stalled = stall.is_zero();
            loop {
                if !stalled && started.elapsed() >= stall_after {
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
                            for e in batch.events().iter() {
                                let _ = latency.record(now.saturating_sub(e.ts_us.to_native()).max(1));
                            }
                            events += batch.len() as u64;
                            counter.store(events, Ordering::Relaxed);
                        }
                        None => break,
                    }
                }
            }
            drop(sub);
            client.close().await;
            Ok((events, latency, started.elapsed()))
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
            Ok(Ok((events, latency, elapsed))) => out.push(ReaderReport {
                index: r.index,
                stalled_s: r.stall.as_secs_f64(),
                events,
                throughput_eps: events as f64 / elapsed.as_secs_f64().max(1e-9),
                latency_us: Percentiles::of(&latency),
            }),
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
