//! The scheduling benchmark (`loadgen --schedule-bench`): customers only, no flights. Its
//! drones report in once (one position event each over QUIC: Drone Management assigns only
//! drones it has heard from recently), spread over a 2° square around the fleet's centre; it
//! registers enough of them for every delivery it will schedule (a drone stays busy until its
//! delivery completes, and nothing flies here), then keeps `concurrency` `POST /v1/deliveries`
//! requests in flight for `duration`, with pickups spread over the same square, and reports
//! deliveries per second and the latency of each request (closed loop: a request starts when
//! the previous one of its lane ends).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use events::wire::Buffer;
use events::{BatchMeta, DroneEvent, DroneEventKind, FlightStatus, GeoPoint, TelemetryBatch};
use ingest::{ClientConfig, IngestClient};
use rand::{Rng, SeedableRng};
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

/// Half the side of the square the drones and pickups are spread over, degrees.
const SPREAD_DEG: f64 = 1.0;

/// Where the benchmark's drones are, and where one order picks up: the same square.
fn spot(rng: &mut impl Rng) -> GeoPoint {
    crate::near(crate::CENTER, rng, SPREAD_DEG)
}

/// Each drone sends one position event (fully charged, idle, created now), in batches over one
/// QUIC connection to the ingest at `server`; returns once every batch is acknowledged.
async fn report_in(server: std::net::SocketAddr, client: &ClientConfig, ids: &[u64]) -> anyhow::Result<()> {
    let conn = IngestClient::connect(server, client)
        .await
        .with_context(|| format!("connecting to the ingest at {server} for the drones to report in"))?;
    let (mut lane, mut answers) = conn.open_lane().await.context("opening a lane")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xD207E5);
    let producer_id = crate::now_us();
    let chunks: Vec<&[u64]> = ids.chunks(1_000).collect();
    let sending = async {
        for (seq, chunk) in chunks.iter().enumerate() {
            let events: Vec<DroneEvent> = chunk
                .iter()
                .map(|&drone_id| DroneEvent {
                    drone_id,
                    seq: crate::now_us(),
                    ts_us: crate::now_us(),
                    position: spot(&mut rng),
                    speed_mps: 0.0,
                    heading_deg: 0.0,
                    battery_pct: 100.0,
                    status: FlightStatus::Idle,
                    kind: DroneEventKind::Position,
                })
                .collect();
            let meta = BatchMeta { producer_id, batch_seq: seq as u64, ..BatchMeta::default() };
            let batch = TelemetryBatch::encode(meta, &events, Buffer::new())?;
            lane.send(batch.as_bytes()).await?;
        }
        anyhow::Ok(())
    };
    let answering = async {
        for _ in 0..chunks.len() {
            let answer = answers.recv().await.context("the ingest closed the lane")?;
            if let Err(e) = answer.result {
                bail!("the drones' report-in batch was refused: {e}");
            }
        }
        anyhow::Ok(())
    };
    let (sent, answered) = tokio::join!(sending, answering);
    sent?;
    answered?;
    conn.close().await;
    Ok(())
}

/// Runs the benchmark against the API at `api` and the ingest at `server`, with drones
/// `drone_id_base..+drones`.
#[allow(clippy::too_many_arguments)] // one per command-line option it takes
pub async fn bench(
    api: &str,
    server: std::net::SocketAddr,
    client: &ClientConfig,
    drones: usize,
    drone_id_base: u64,
    duration: Duration,
    concurrency: usize,
    api_key: Option<&str>,
    split: &crate::SplitTargets,
) -> anyhow::Result<ScheduleReport> {
    let http = crate::http_client(concurrency, api_key, split.tls_dir.as_deref())?;
    let ids: Vec<u64> = (0..drones as u64).map(|i| drone_id_base + i).collect();
    report_in(server, client, &ids).await?;
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
            let mut rng = rand::rngs::StdRng::seed_from_u64(lane as u64);
            while start.elapsed() < duration {
                n += 1;
                let pickup = spot(&mut rng);
                let body = serde_json::json!({
                    "owner": format!("customer-{}", (lane as u64 * 7919 + n) % crate::CUSTOMERS),
                    "pickup": pickup,
                    "dropoff": { "lat": pickup.lat + 0.01, "lon": pickup.lon - 0.01 },
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
