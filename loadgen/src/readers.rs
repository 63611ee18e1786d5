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
    /// The run in three phases: `before` the stall (a window as long as the stall, just before
    /// it; anything earlier is warm-up and only counts in the totals), `during` it
    /// (`--stall-reader-after-s` to that plus `--stall-reader-s`) and `after` it (the stalled
    /// reader catching up, then the rest). For a reader that kept reading, `before` against
    /// `during` shows within one run whether another reader's stall cost it anything.
    pub phases: Vec<PhaseReport>,
}

/// What a reader received in one phase of the run.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// `before`, `during` or `after` the stall.
    pub phase: &'static str,
    /// Events per second received in the phase.
    pub eps: f64,
    /// Creation to arrival, µs.
    pub latency_us: Percentiles,
}

const PHASES: [&str; 3] = ["before", "during", "after"];

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
    /// By phase: before, during, after the stall, and warm-up.
    latency: [Histogram<u64>; 4],
    events_in: [u64; 4],
    /// The first three phases' lengths.
    lengths: [Duration; 3],
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
            let mut latency = [histogram(), histogram(), histogram(), histogram()];
            let mut events_in = [0u64; 4];
            let control = window.start.saturating_sub(window.end - window.start);
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
                            let at = origin.elapsed();
                            let side = if at < control {
                                3
                            } else if at < window.start {
                                0
                            } else if at < window.end {
                                1
                            } else {
                                2
                            };
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
            let end = origin.elapsed();
            let lengths = [
                window.start.min(end).saturating_sub(control),
                window.end.min(end).saturating_sub(window.start),
                end.saturating_sub(window.end),
            ];
            Ok(Seen { events, elapsed: started.elapsed(), latency, events_in, lengths })
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
                let _ = all.add(&seen.latency[2]);
                let _ = all.add(&seen.latency[3]);
                let phases = (0..3)
                    .filter(|&i| !seen.lengths[i].is_zero())
                    .map(|i| PhaseReport {
                        phase: PHASES[i],
                        eps: seen.events_in[i] as f64 / seen.lengths[i].as_secs_f64(),
                        latency_us: Percentiles::of(&seen.latency[i]),
                    })
                    .collect();
                out.push(ReaderReport {
                    index: r.index,
                    stalled_s: r.stall.as_secs_f64(),
                    events: seen.events,
                    throughput_eps: seen.events as f64 / seen.elapsed.as_secs_f64().max(1e-9),
                    latency_us: Percentiles::of(&all),
                    phases,
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

/// Subscriptions one connection of [`DeliveryReaders`] carries (the server allows 64 streams
/// per connection).
const SUBSCRIPTIONS_PER_CONNECTION: usize = 60;

/// Light subscribers of the delivery-events topic (`--delivery-readers N`): N log subscriptions
/// from the latest offset, 60 to a QUIC connection, each only counting what it receives. They
/// show what many concurrent subscribers cost the ingest (the run's throughput beside one
/// without them) and that each gets every event.
#[derive(Debug)]
pub struct DeliveryReaders {
    clients: Vec<IngestClient>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
}

/// What the delivery-event subscribers received.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DeliveryReadersReport {
    /// Subscribers.
    pub readers: usize,
    /// The fewest delivery events one of them received.
    pub min_events: u64,
    /// The most.
    pub max_events: u64,
}

impl DeliveryReaders {
    /// Opens `n` subscriptions; each counts until `stop`.
    pub async fn start(
        n: usize,
        server: std::net::SocketAddr,
        client_cfg: &ClientConfig,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        let mut tasks = Vec::with_capacity(n);
        for first in (0..n).step_by(SUBSCRIPTIONS_PER_CONNECTION) {
            let client = IngestClient::connect(server, client_cfg).await?;
            for _ in first..(first + SUBSCRIPTIONS_PER_CONNECTION).min(n) {
                let mut sub =
                    client.subscribe_from::<events::DeliveryEvent>(Topic::DeliveryEvents, StartAt::Latest).await?;
                let mut stop = stop.clone();
                tasks.push(tokio::spawn(async move {
                    let mut events = 0u64;
                    loop {
                        tokio::select! {
                            _ = stop.changed() => break,
                            next = sub.next() => match next {
                                Ok(Some((_, batch))) => events += batch.len() as u64,
                                _ => break,
                            }
                        }
                    }
                    events
                }));
            }
            clients.push(client);
        }
        Ok(Self { clients, tasks })
    }

    /// Waits for every subscriber (after the run's stop) and closes their connections.
    pub async fn finish(self) -> DeliveryReadersReport {
        let readers = self.tasks.len();
        let mut counts = Vec::with_capacity(readers);
        for task in self.tasks {
            counts.push(task.await.unwrap_or(0));
        }
        for client in self.clients {
            client.close().await;
        }
        DeliveryReadersReport {
            readers,
            min_events: counts.iter().copied().min().unwrap_or(0),
            max_events: counts.iter().copied().max().unwrap_or(0),
        }
    }
}
