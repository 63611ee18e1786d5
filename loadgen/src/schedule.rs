//! The scheduling benchmark (`loadgen --schedule-bench`): customers only, no telemetry. It
//! registers enough drones for every delivery it will schedule (a drone stays busy until its
//! delivery completes, and nothing flies here), then keeps `concurrency` `POST /v1/deliveries`
//! requests in flight for `duration` and reports deliveries per second and the latency of each
//! request (closed loop: a request starts when the previous one of its lane ends).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::Percentiles;
use crate::observe::histogram;

/// What the scheduling benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleReport {
    /// Deliveries the API accepted (`201`).
    pub scheduled: u64,
    /// Requests refused (any other status), by the first one's body.
    pub refused: u64,
    /// Seconds of load.
    pub duration_s: f64,
    /// Accepted deliveries per second.
    pub per_s: f64,
    /// Request latency, µs (every request, accepted or not).
    pub latency_us: Percentiles,
    /// Requests in flight.
    pub concurrency: usize,
}

impl std::fmt::Display for ScheduleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.latency_us;
        writeln!(f, "── fleetstream scheduling benchmark ────────────────────")?;
        writeln!(f, "requests in flight {}, {:.1} s", self.concurrency, self.duration_s)?;
        writeln!(f, "scheduled   {} ({:.0} deliveries/s)  refused {}", self.scheduled, self.per_s, self.refused)?;
        write!(
            f,
            "latency µs  p50 {} p90 {} p99 {} p999 {} max {}  (n={})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.count
        )
    }
}

/// Runs the benchmark against the API at `api`, with drones `drone_id_base..+drones`.
pub async fn bench(
    api: &str,
    drones: usize,
    drone_id_base: u64,
    duration: Duration,
    concurrency: usize,
    api_key: Option<&str>,
    split: &crate::SplitTargets,
) -> anyhow::Result<ScheduleReport> {
    let http = crate::http_client(concurrency, api_key, split.tls_dir.as_deref())?;
    let ids: Vec<u64> = (0..drones as u64).map(|i| drone_id_base + i).collect();
    let drones_api = split.drones(api);
    for chunk in ids.chunks(5_000) {
        let resp = http
            .post(format!("{drones_api}/v1/drones"))
            .json(&serde_json::json!({ "drones": chunk }))
            .send()
            .await
            .with_context(|| format!("registering drones at {api}"))?;
        if !resp.status().is_success() {
            bail!("registering drones: {}", resp.status());
        }
    }
    crate::open_accounts(&http, &split.accounts(api)).await?;
    let scheduled = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut lanes = Vec::with_capacity(concurrency);
    for lane in 0..concurrency {
        let (http, url) = (http.clone(), format!("{api}/v1/deliveries"));
        let (scheduled, refused) = (scheduled.clone(), refused.clone());
        lanes.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut n = 0u64;
            while start.elapsed() < duration {
                n += 1;
                let body = serde_json::json!({
                    "owner": format!("customer-{}", (lane as u64 * 7919 + n) % crate::CUSTOMERS),
                    "pickup": { "lat": 47.6, "lon": -122.3 },
                    "dropoff": { "lat": 47.61, "lon": -122.31 },
                    "package": { "size": "small", "weight_kg": 1.0 },
                });
                let sent = Instant::now();
                let ok = match http.post(&url).json(&body).send().await {
                    Ok(resp) => resp.status() == reqwest::StatusCode::CREATED,
                    Err(_) => false,
                };
                let _ = h.record(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
                if ok { &scheduled } else { &refused }.fetch_add(1, Ordering::Relaxed);
            }
            h
        }));
    }
    let mut all = histogram();
    for lane in lanes {
        let _ = all.add(&lane.await.context("a scheduling lane panicked")?);
    }
    let duration_s = start.elapsed().as_secs_f64();
    let scheduled = scheduled.load(Ordering::Relaxed);
    Ok(ScheduleReport {
        scheduled,
        refused: refused.load(Ordering::Relaxed),
        duration_s,
        per_s: scheduled as f64 / duration_s.max(1e-9),
        latency_us: Percentiles::of(&all),
        concurrency,
    })
}
