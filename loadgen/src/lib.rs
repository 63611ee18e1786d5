//! `loadgen`: simulates a fleet against a running pipeline and measures what comes out.
//!
//! ```text
//!  customers ─ POST /v1/deliveries ─► API ─► {delivery_id, drone_id} ─► that drone's mission
//!  drones (C connections, open-loop schedule) ─ batches over QUIC ─► ingest ─► engine
//!  subscriber ◄─ drone-telemetry + delivery-events over QUIC ─ engine
//! ```
//!
//! The drones emit events on a fixed open-loop schedule (`rate` events/s in all), each stamped
//! with the time the schedule meant it to be created. The subscriber checks every event it
//! receives against what was sent ([`observe`]), so `lost` and `duplicates` come from what
//! actually arrived, and latency is measured from intended creation to arrival.

pub mod adapters;
pub mod observe;
pub mod plot;
pub mod readers;
pub mod schedule;
pub mod sim;
pub mod timeline;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use events::wire::Buffer;
use events::{BatchMeta, DeliveryEvent, DroneEvent, GeoPoint, StartAt, TelemetryBatch, Topic, now_us};
use hdrhistogram::Histogram;
use ingest::{ClientConfig, IngestClient, Producer, ProducerConfig, Trust};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::observe::{DeliveryObserver, TelemetryObserver};
use crate::sim::{Mission, MissionOutcome, SimDrone};

/// What to simulate and where.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The ingest server (QUIC).
    pub server: SocketAddr,
    /// Base URL of the HTTP API, e.g. `http://127.0.0.1:8080`.
    pub api: String,
    /// Whom to trust for the QUIC connection.
    pub trust: Trust,
    /// Simulated drones.
    pub drones: usize,
    /// First drone id; the fleet is `drone_id_base..drone_id_base + drones`.
    pub drone_id_base: u64,
    /// Where the fleet and its orders are (spread about 5 km around it). Default Seattle. Two
    /// runs against one deployment, farther apart than Drone Management's `max_distance_km`,
    /// each fly only their own deliveries.
    pub center: GeoPoint,
    /// Telemetry events per second, whole fleet; 0 sends as fast as the server takes them (each
    /// connection sends its next batch as soon as its window allows), to find a ceiling.
    pub rate: f64,
    /// QUIC connections the fleet's telemetry is spread over.
    pub connections: usize,
    /// How long drones send telemetry.
    pub duration: Duration,
    /// The first part of `duration` whose events are sent and checked but not timed, so the
    /// latency figures describe the steady state (connections past slow start, buffers grown).
    /// Default 0: every event is timed.
    pub warmup: Duration,
    /// Record the run over time in stretches this long ([`Report::timeline`]); `None`: no
    /// timeline.
    pub timeline: Option<Duration>,
    /// Most events in one batch.
    pub batch_max_events: usize,
    /// Longest an event waits for its batch to fill before the batch is sent anyway.
    pub linger: Duration,
    /// Deliveries customers schedule per second.
    pub deliveries_per_s: f64,
    /// Percent of scheduled deliveries a customer cancels soon after ordering (0..=100).
    pub cancel_percent: u8,
    /// Percent of scheduled deliveries a customer subscribes to by SMS right after ordering;
    /// the node must post SMS to `sms_listen` (`[notify] sms_webhook =
    /// "http://<sms_listen>/send"`), where loadgen counts what arrives.
    pub notify_percent: u8,
    /// Where loadgen receives the node's SMS posts (with `notify_percent`).
    pub sms_listen: Option<SocketAddr>,
    /// Percent of scheduled deliveries a customer reschedules soon after ordering (to a new
    /// drop-off), besides those cancelled.
    pub reschedule_percent: u8,
    /// Flight time of each mission leg (to pickup, to drop-off, home).
    pub leg: Duration,
    /// At the end, how long to wait for answers and for the subscriber to catch up.
    pub settle: Duration,
    /// When the subscriber reads telemetry.
    pub telemetry_check: TelemetryCheck,
    /// Transport only: send the fleet's telemetry and count answers, with no customers, no API
    /// and no subscriber (for `pipeline serve --discard`, the transport ceiling). Loss and
    /// latency are not measured in this mode.
    pub raw: bool,
    /// Extra telemetry subscribers that only measure what they receive (see [`readers`]).
    pub readers: usize,
    /// Light delivery-event subscribers that only count what they receive
    /// ([`readers::DeliveryReaders`]).
    pub delivery_readers: usize,
    /// How long the first extra reader stops reading (zero: never).
    pub stall_reader: Duration,
    /// When, after the start of sending, it stops.
    pub stall_reader_after: Duration,
    /// API key for the HTTP API (`Authorization: Bearer`), when the server requires one.
    pub api_key: Option<String>,
    /// Split mode: where the services other than the scheduler are, and the certificates.
    pub split: SplitTargets,
    /// Client certificate and key (PEM) for a QUIC ingest that requires one
    /// (`ingest.client_ca`).
    pub quic_identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Telemetry over MQTT to this broker instead of QUIC (missions still come over each
    /// connection's QUIC session): see [`adapters`].
    pub mqtt: Option<adapters::MqttTarget>,
    /// Telemetry as `POST /v1/telemetry` to `api` instead of QUIC (missions still over QUIC).
    pub http_telemetry: bool,
}

/// Where loadgen finds the services when each runs in its own process (`pipeline serve
/// --role ...`). Unset URLs fall back to the main API URL (one process serves everything).
#[derive(Debug, Clone, Default)]
pub struct SplitTargets {
    /// Drone Management, for registering the fleet.
    pub drones_api: Option<String>,
    /// Accounts, for opening the customers' accounts (an internal route: needs `tls_dir`).
    pub accounts_api: Option<String>,
    /// A `pipeline certs init` directory: trust its CA for HTTPS and present its `client`
    /// certificate.
    pub tls_dir: Option<std::path::PathBuf>,
}

impl SplitTargets {
    fn drones<'a>(&'a self, api: &'a str) -> String {
        self.drones_api.as_deref().unwrap_or(api).trim_end_matches('/').to_string()
    }

    /// Where accounts are opened: the Accounts service's internal route in split mode, else
    /// the node's admin route.
    fn accounts<'a>(&'a self, api: &'a str) -> String {
        match &self.accounts_api {
            Some(url) => format!("{}/internal/v1/accounts", url.trim_end_matches('/')),
            None => format!("{}/v1/accounts", api.trim_end_matches('/')),
        }
    }
}

impl LoadConfig {
    /// Defaults for everything but the addresses.
    pub fn new(server: SocketAddr, api: String, trust: Trust) -> Self {
        Self {
            server,
            api,
            trust,
            drones: 1_000,
            drone_id_base: 1,
            center: CENTER,
            rate: 10_000.0,
            connections: 4,
            duration: Duration::from_secs(10),
            warmup: Duration::ZERO,
            timeline: None,
            batch_max_events: 1_024,
            linger: Duration::from_millis(5),
            deliveries_per_s: 100.0,
            cancel_percent: 0,
            reschedule_percent: 0,
            notify_percent: 0,
            sms_listen: None,
            leg: Duration::from_secs(1),
            settle: Duration::from_secs(15),
            telemetry_check: TelemetryCheck::During,
            raw: false,
            readers: 0,
            delivery_readers: 0,
            stall_reader: Duration::ZERO,
            stall_reader_after: Duration::from_secs(2),
            api_key: None,
            split: SplitTargets::default(),
            quic_identity: None,
            mqtt: None,
            http_telemetry: false,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.drones == 0 || self.connections == 0 || self.batch_max_events == 0 {
            bail!("drones, connections and batch size must be positive");
        }
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            bail!("rate must be a number of events per second, or 0 for as fast as the server takes them");
        }
        if self.timeline.is_some_and(|t| t < Duration::from_secs(1)) {
            bail!("timeline stretches must be at least a second long");
        }
        if self.rate > 0.0 && self.rate < self.drones as f64 / self.leg.as_secs_f64() {
            tracing::warn!(
                rate = self.rate,
                drones = self.drones,
                "fewer than one event per drone per mission leg: missions will take longer than planned"
            );
        }
        Ok(())
    }
}

/// When the subscriber reads the telemetry topic. Either way it reads every event from the
/// log offset where the run began, so loss and duplicates are counted the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TelemetryCheck {
    /// Live, while the fleet sends: a firehose reader competing with the pipeline for the
    /// machine, as a dashboard would.
    During,
    /// Once the fleet has stopped: the subscription is opened at the start and held (the server
    /// keeps its place in the log, with no cost while it waits) and read to the end afterwards,
    /// so on a small machine the run's CPU goes to the pipeline, and delivery-event latency is
    /// measured without a firehose reader beside it.
    After,
}

/// Fleet connections handshaking at once while the fleet connects.
const CONCURRENT_HANDSHAKES: usize = 64;

/// Fleet connections sharing one UDP socket, at most: a run with a few connections gets a socket
/// each, a run with a connection per drone one socket per hundred of them.
const CONNECTIONS_PER_SOCKET: usize = 100;

/// The server's resident memory before the fleet connected and with it connected, from the
/// server's `/metrics` (`process_resident_memory_bytes`, `fleetstream_ingest_connections`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ServerMemory {
    /// Resident bytes before the fleet connected (the subscriber connections included).
    pub rss_before_bytes: u64,
    /// Resident bytes with the whole fleet connected, before it sends.
    pub rss_connected_bytes: u64,
    /// Connections the server counted then.
    pub connections: u64,
    /// Growth per fleet connection.
    pub per_connection_bytes: u64,
}

impl ServerMemory {
    fn new((rss_before, conns_before): (u64, u64), (rss_after, conns_after): (u64, u64)) -> Self {
        let added = conns_after.saturating_sub(conns_before).max(1);
        Self {
            rss_before_bytes: rss_before,
            rss_connected_bytes: rss_after,
            connections: conns_after,
            per_connection_bytes: rss_after.saturating_sub(rss_before) / added,
        }
    }
}

/// The server's resident memory and open QUIC connections, read from its `/metrics`.
async fn server_gauges(http: &reqwest::Client, api: &str) -> Option<(u64, u64)> {
    let text = http.get(format!("{api}/metrics")).send().await.ok()?.text().await.ok()?;
    let gauge = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok()).map(|v| v as u64)
    };
    Some((gauge("process_resident_memory_bytes")?, gauge("fleetstream_ingest_connections")?))
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// One point of a latency percentile distribution.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct CurvePoint {
    /// Percentile, 0 to 100.
    pub percentile: f64,
    /// Latency at it, µs.
    pub us: u64,
}

/// A histogram's percentile distribution, sampled from the median out to 99.999% in steps of a
/// tenth of a "nine" (the shape HDR histogram plots show), then the maximum.
pub fn curve(h: &Histogram<u64>) -> Vec<CurvePoint> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut points: Vec<CurvePoint> = (3..=50)
        .map(|tenths| {
            let q = 1.0 - 10f64.powf(-f64::from(tenths) / 10.0);
            CurvePoint { percentile: 100.0 * q, us: h.value_at_quantile(q) }
        })
        .collect();
    points.push(CurvePoint { percentile: 100.0, us: h.max() });
    points
}

/// The latency distributions of a run, for `--plot`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Curves {
    /// Drone event creation to derived delivery event at the subscriber.
    pub delivery_events: Vec<CurvePoint>,
    /// Drone event creation to the raw event at the subscriber.
    pub telemetry: Vec<CurvePoint>,
    /// The fleet's lag behind its own schedule.
    pub send_lag: Vec<CurvePoint>,
}

/// The outcome of a run, written as JSON by `--report`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Telemetry events written to the server.
    pub events_sent: u64,
    /// Events in batches the server acknowledged.
    pub events_acked: u64,
    /// Events in batches the server rejected.
    pub events_rejected: u64,
    /// Events in batches never answered.
    pub events_unanswered: u64,
    /// Deliveries the API accepted.
    pub deliveries_scheduled: u64,
    /// Scheduling attempts the API refused (e.g. no free drone).
    pub deliveries_refused: u64,
    /// Deliveries a customer cancelled (`202`; `--cancel-percent`).
    pub deliveries_cancelled: u64,
    /// Deliveries a customer rescheduled (`200`; `--reschedule-percent`).
    pub deliveries_rescheduled: u64,
    /// Cancelled deliveries the subscriber nevertheless saw complete: a mission flown for a
    /// cancelled delivery. Must be 0.
    pub cancelled_then_completed: u64,
    /// Cancelled deliveries whose drone dropped the package off after it was told to return
    /// to base: the drone did not stop. Must be 0.
    pub cancelled_but_flown: u64,
    /// Cancels answered `202` whose drone was never told to return to base by the end of the
    /// run. Must be 0.
    pub cancels_unheard: u64,
    /// Deliveries a customer subscribed to by SMS (`--notify-percent`).
    pub notifications_subscribed: u64,
    /// Notifications those subscriptions must bring: one per stage change created after the
    /// subscription was answered.
    pub notifications_expected: u64,
    /// Of those, how many never arrived. Must be 0.
    pub notifications_missing: u64,
    /// Notifications that arrived more than once (at-least-once: the receiver drops repeats by
    /// their id).
    pub notifications_repeated: u64,
    /// `DeliveryComplete` events the subscriber received.
    pub deliveries_completed: u64,
    /// Scheduled deliveries the subscriber never saw finish (complete or cancelled): still in
    /// flight when the run stopped, which is not loss (nothing acknowledged went missing).
    pub deliveries_unfinished: u64,
    /// Distinct delivery events the subscriber received.
    pub delivery_events_observed: u64,
    /// Delivery events the scheduled deliveries must have produced, given what the drones sent.
    pub delivery_events_expected: u64,
    /// Distinct telemetry events the subscriber received.
    pub telemetry_events_observed: u64,
    /// Acknowledged telemetry events plus expected delivery events that never arrived.
    pub lost: u64,
    /// The telemetry part of `lost`.
    pub lost_telemetry: u64,
    /// The delivery-event part of `lost`.
    pub lost_delivery_events: u64,
    /// Events the subscriber received more than once.
    pub duplicates: u64,
    /// Length of the sending phase, seconds.
    pub duration_s: f64,
    /// Its first part, whose events were checked but not timed (see [`LoadConfig::warmup`]).
    pub warmup_s: f64,
    /// Acknowledged events per second over the sending phase.
    pub throughput_eps: f64,
    /// The rate asked for.
    pub target_eps: f64,
    /// Drone event creation to derived delivery event at the subscriber, µs.
    pub latency_us: Percentiles,
    /// Drone event creation to the raw event at the subscriber, µs.
    pub telemetry_latency_us: Percentiles,
    /// How far behind its open-loop schedule the fleet sent: a batch's oldest event's creation
    /// to the moment the producer took the batch, µs. High values mean the sender (this
    /// process, or backpressure from the server) held events back; that time is part of every
    /// latency above.
    pub send_lag_us: Percentiles,
    /// The server's memory with the fleet connected, when its `/metrics` could be read.
    pub server_memory: Option<ServerMemory>,
    /// Percentile distributions behind the figures above.
    pub curves: Curves,
    /// Rejections by reason.
    pub rejections: BTreeMap<String, u64>,
    /// `full` (everything measured) or `raw` (transport only: loss and latency not measured).
    pub mode: &'static str,
    /// How telemetry was sent: `quic`, `http`, or `mqtt` (acked then means the broker's
    /// `PUBACK`), `mqtt+missions` when the missions came over MQTT too.
    pub transport: &'static str,
    /// When telemetry was read.
    pub telemetry_check: TelemetryCheck,
    /// The run's shape.
    pub drones: usize,
    /// Connections used.
    pub connections: usize,
    /// The extra readers (`--readers`), the first one stalled when `--stall-reader-s` is set.
    pub readers: Vec<readers::ReaderReport>,
    /// The light delivery-event subscribers (`--delivery-readers`).
    pub delivery_readers: Option<readers::DeliveryReadersReport>,
    /// The server's largest resident memory sampled during the run (every 250 ms).
    pub server_rss_peak_bytes: Option<u64>,
    /// The run over time, stretch by stretch (`--timeline-s`); empty without it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<timeline::Slice>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.latency_us;
        let t = &self.telemetry_latency_us;
        writeln!(f, "── fleetstream load report ─────────────────────────────")?;
        writeln!(f, "drones {} over {} connections, {:.1} s", self.drones, self.connections, self.duration_s)?;
        match self.transport {
            "mqtt" => writeln!(f, "transport   telemetry over MQTT (acked: the broker's PUBACK), missions over QUIC")?,
            "mqtt+missions" => {
                writeln!(f, "transport   telemetry and missions over MQTT (acked: the broker's PUBACK)")?
            }
            "http" => {
                writeln!(f, "transport   telemetry as POST /v1/telemetry (acked: 202, durable), missions over QUIC")?
            }
            _ => {}
        }
        writeln!(
            f,
            "telemetry   sent {}  acked {}  rejected {}  unanswered {}",
            self.events_sent, self.events_acked, self.events_rejected, self.events_unanswered
        )?;
        if self.target_eps > 0.0 {
            writeln!(f, "throughput  {:.0} events/s (target {:.0})", self.throughput_eps, self.target_eps)?;
        } else {
            writeln!(f, "throughput  {:.0} events/s (sent as fast as taken)", self.throughput_eps)?;
        }
        if self.mode == "raw" {
            return write!(f, "mode        raw: transport only; loss, duplicates and latency are not measured");
        }
        writeln!(
            f,
            "deliveries  scheduled {}  refused {}  completed {}  unfinished {} (in flight when the run stopped)",
            self.deliveries_scheduled, self.deliveries_refused, self.deliveries_completed, self.deliveries_unfinished
        )?;
        if self.notifications_subscribed > 0 {
            writeln!(
                f,
                "notify      subscribed {}  expected {}  missing {}  repeated {} (dropped by id)",
                self.notifications_subscribed,
                self.notifications_expected,
                self.notifications_missing,
                self.notifications_repeated
            )?;
        }
        if self.deliveries_cancelled + self.deliveries_rescheduled > 0 {
            writeln!(
                f,
                "changes     cancelled {}  rescheduled {}  cancelled yet completed {}  flown after the drone was told {}  \
                 never told {}",
                self.deliveries_cancelled,
                self.deliveries_rescheduled,
                self.cancelled_then_completed,
                self.cancelled_but_flown,
                self.cancels_unheard
            )?;
        }
        writeln!(
            f,
            "subscriber  telemetry {} (read {})  delivery events {}/{} expected",
            self.telemetry_events_observed,
            match self.telemetry_check {
                TelemetryCheck::During => "during the run",
                TelemetryCheck::After => "after the run",
            },
            self.delivery_events_observed,
            self.delivery_events_expected
        )?;
        writeln!(
            f,
            "lost        {} (telemetry {}, delivery events {})   duplicates {}",
            self.lost, self.lost_telemetry, self.lost_delivery_events, self.duplicates
        )?;
        if self.warmup_s > 0.0 {
            writeln!(
                f,
                "latency     of events created after the first {:.1} s (warm-up, checked but not timed)",
                self.warmup_s
            )?;
        }
        writeln!(
            f,
            "latency µs  delivery events p50 {} p90 {} p99 {} p999 {} max {}  (n={})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.count
        )?;
        writeln!(
            f,
            "            telemetry       p50 {} p90 {} p99 {} p999 {} max {}  (n={})",
            t.p50, t.p90, t.p99, t.p999, t.max, t.count
        )?;
        let g = &self.send_lag_us;
        write!(
            f,
            "            send lag        p50 {} p90 {} p99 {} p999 {} max {}  (batches={})",
            g.p50, g.p90, g.p99, g.p999, g.max, g.count
        )?;
        if let Some(m) = &self.server_memory {
            write!(
                f,
                "\nserver      {:.1} MiB resident before the fleet connected, {:.1} MiB with {} connections: {:.1} KiB of growth per fleet connection",
                m.rss_before_bytes as f64 / 1048576.0,
                m.rss_connected_bytes as f64 / 1048576.0,
                m.connections,
                m.per_connection_bytes as f64 / 1024.0
            )?;
        }
        if let Some(d) = &self.delivery_readers {
            writeln!(
                f,
                "subscribers {} more on delivery events: each received {} to {} events",
                d.readers, d.min_events, d.max_events
            )?;
        }
        for r in &self.readers {
            let p = &r.latency_us;
            let what = if r.stalled_s > 0.0 { format!("stalled {:.0} s", r.stalled_s) } else { "reading".to_string() };
            write!(
                f,
                "\nreader {}    ({what}) events {}  {:.0} ev/s  latency µs p50 {} p99 {} p999 {} max {}",
                r.index, r.events, r.throughput_eps, p.p50, p.p99, p.p999, p.max
            )?;
            if r.phases.len() > 1 {
                write!(f, "\n           ")?;
                for p in &r.phases {
                    let l = &p.latency_us;
                    write!(f, " {} the stall: {:.0} ev/s p50 {} p99 {} |", p.phase, p.eps, l.p50, l.p99)?;
                }
            }
        }
        if let Some(peak) = self.server_rss_peak_bytes {
            write!(f, "\nserver      peak resident memory during the run {:.1} MiB", peak as f64 / 1048576.0)?;
        }
        if !self.timeline.is_empty() {
            write!(f, "\ntimeline    {}", timeline::Table(&self.timeline))?;
        }
        if !self.rejections.is_empty() {
            write!(f, "\nrejections  {:?}", self.rejections)?;
        }
        match self.verdict() {
            Ok(()) => write!(f, "\nresult      OK"),
            Err(why) => write!(f, "\nresult      FAILED: {why}"),
        }
    }
}

/// A raw run that carried this share of its offer or more was limited by the offer, not by the
/// transport: its throughput is no ceiling.
pub const CAPPED_SHARE: f64 = 0.95;

impl Report {
    /// For a raw run meant as the transport's ceiling: `Some(reason)` when it only shows what it
    /// was offered (it carried at least [`CAPPED_SHARE`] of a fixed rate).
    pub fn capped(&self) -> Option<String> {
        (self.target_eps > 0.0 && self.throughput_eps >= CAPPED_SHARE * self.target_eps).then(|| {
            format!(
                "capped: not a ceiling (carried {:.1}% of the {:.0} ev/s offered; use --rate 0)",
                100.0 * self.throughput_eps / self.target_eps,
                self.target_eps
            )
        })
    }

    /// Whether the run kept every promise: nothing acknowledged lost, nothing seen twice, no
    /// order refused, every scheduled delivery seen to its end. `Err` says what was broken.
    pub fn verdict(&self) -> Result<(), String> {
        if self.mode == "raw" {
            return Ok(());
        }
        let checks = [
            (self.lost, "acknowledged events never received"),
            (self.duplicates, "events received twice"),
            (self.deliveries_refused, "orders refused"),
            (self.deliveries_unfinished, "deliveries still in flight at the end"),
            (self.cancelled_then_completed, "cancelled deliveries completed anyway"),
            (self.cancelled_but_flown, "cancelled deliveries flown to their drop-off"),
            (self.cancels_unheard, "cancels never reached their drone"),
            (self.notifications_missing, "notifications never arrived"),
        ];
        let broken: Vec<String> =
            checks.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("{n} {what}")).collect();
        if broken.is_empty() { Ok(()) } else { Err(broken.join(", ")) }
    }
}

/// A snapshot for a progress line. While the fleet connects only `connected` is set (the rest
/// stay zero until sending starts).
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Fleet connections established (all of them once sending starts).
    pub connected: usize,
    /// Seconds since the start of sending.
    pub elapsed_s: f64,
    /// Events sent.
    pub sent: u64,
    /// Events acknowledged.
    pub acked: u64,
    /// Events rejected.
    pub rejected: u64,
    /// Acknowledged events per second over the last interval.
    pub recent_eps: f64,
    /// Deliveries scheduled.
    pub scheduled: u64,
    /// Deliveries completed (seen by the subscriber).
    pub completed: u64,
    /// Distinct telemetry events seen by the subscriber.
    pub observed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    rejected: AtomicU64,
    scheduled: AtomicU64,
    refused: AtomicU64,
    cancelled: AtomicU64,
    rescheduled: AtomicU64,
    completed: AtomicU64,
    telemetry_unique: AtomicU64,
    delivery_unique: AtomicU64,
    /// Events created from this time on (µs since the epoch) are timed.
    measure_from_us: AtomicU64,
    /// The longest a batch has waited to be sent behind its schedule so far, µs: how late the
    /// simulated fleet runs (its process short of CPU), so customers stop ordering early
    /// enough for late drones to finish.
    fleet_lag_us: AtomicU64,
    rejections: Mutex<BTreeMap<String, u64>>,
}

/// Where a run is unless told otherwise: Seattle.
pub const CENTER: GeoPoint = GeoPoint::new(47.6062, -122.3321);

pub(crate) fn near(center: GeoPoint, rng: &mut impl Rng, spread_deg: f64) -> GeoPoint {
    GeoPoint::new(
        center.lat + rng.random_range(-spread_deg..spread_deg),
        center.lon + rng.random_range(-spread_deg..spread_deg),
    )
}

/// How many customer accounts the simulated orders are spread over (`customer-0` ...).
pub(crate) const CUSTOMERS: u64 = 1000;

/// Opens the simulated customers' accounts at `accounts` (`.../accounts`; an idempotent PUT
/// each, so a second run against the same server changes nothing).
pub(crate) async fn open_accounts(http: &reqwest::Client, accounts: &str) -> anyhow::Result<()> {
    let ids: Vec<u64> = (0..CUSTOMERS).collect();
    for chunk in ids.chunks(100) {
        let calls: Vec<_> = chunk
            .iter()
            .map(|i| {
                let req = http.put(format!("{accounts}/customer-{i}")).json(&serde_json::json!({}));
                tokio::spawn(async move { req.send().await })
            })
            .collect();
        for call in calls {
            let resp = call.await?.with_context(|| format!("opening customer accounts at {accounts}"))?;
            if !resp.status().is_success() {
                bail!("opening customer accounts: {} {}", resp.status(), resp.text().await.unwrap_or_default());
            }
        }
    }
    Ok(())
}

/// Runs the simulation. `progress` is called about once a second.
pub async fn run(cfg: LoadConfig, progress: Arc<dyn Fn(&Progress) + Send + Sync>) -> anyhow::Result<Report> {
    cfg.check()?;
    let counters = Arc::new(Counters::default());
    let http = http_client(128, cfg.api_key.as_deref(), cfg.split.tls_dir.as_deref())?;
    let api = cfg.api.trim_end_matches('/').to_string();
    let (drones_api, accounts_api) = (cfg.split.drones(&api), cfg.split.accounts(&api));
    let ids: Vec<u64> = (0..cfg.drones as u64).map(|i| cfg.drone_id_base + i).collect();
    for chunk in ids.chunks(5_000).filter(|_| !cfg.raw) {
        let resp = http
            .post(format!("{drones_api}/v1/drones"))
            .json(&serde_json::json!({ "drones": chunk }))
            .send()
            .await
            .with_context(|| format!("registering drones at {drones_api}"))?;
        if !resp.status().is_success() {
            bail!("registering drones: {} {}", resp.status(), resp.text().await.unwrap_or_default());
        }
    }

    if !cfg.raw {
        open_accounts(&http, &accounts_api).await?;
    }

    // Every socket gets the buffers a server's has: subscribers receive whole topics, and a
    // fleet socket shared by many connections receives for all of them.
    let client_cfg = ClientConfig {
        identity: cfg.quic_identity.clone(),
        udp_buffer_bytes: ingest::udp::DEFAULT_UDP_BUFFER_BYTES,
        ..ClientConfig::new(cfg.trust.clone())
    };
    let observing = if cfg.raw { None } else { Some(subscribe(&cfg, &client_cfg, &counters).await?) };
    let (readers_stop, readers_stop_rx) = watch::channel(false);
    let extra_readers = if cfg.raw || cfg.readers == 0 {
        Vec::new()
    } else {
        readers::start(cfg.readers, cfg.stall_reader, cfg.stall_reader_after, cfg.server, &client_cfg, &readers_stop_rx)
            .await
            .context("starting the extra readers")?
    };
    let memory_peak =
        if cfg.raw { None } else { Some(readers::watch_memory(http.clone(), api.clone(), readers_stop_rx.clone())) };
    let delivery_readers = if cfg.raw || cfg.delivery_readers == 0 {
        None
    } else {
        let started =
            readers::DeliveryReaders::start(cfg.delivery_readers, cfg.server, &client_cfg, &readers_stop_rx).await;
        Some(started.context("starting the delivery-event subscribers")?)
    };

    // Drones, spread over connections in contiguous blocks, so each connection takes its
    // drones' missions from drone-commands as one key range.
    let conns = cfg.connections.min(cfg.drones);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED);
    let leg_us = u64::try_from(cfg.leg.as_micros()).unwrap_or(u64::MAX);
    // Sequence numbers continue from the clock (µs), so a run after an earlier one against the
    // same server numbers its events above the earlier run's.
    let seq_base = now_us();
    let mut plans: Vec<Vec<SimDrone>> = vec![Vec::new(); conns];
    for (i, &id) in ids.iter().enumerate() {
        plans[i * conns / ids.len()]
            .push(SimDrone::new(id, near(cfg.center, &mut rng, 0.05), leg_us).starting_after(seq_base));
    }
    // Producer ids must differ from every earlier run's, or the server takes this run's batches
    // for re-sends of those and acknowledges them without storing them again.
    let run_id = seq_base & 0xFFFF_FFFF_FFFF;
    // Connect the whole fleet first (many handshakes at a time), so the schedule's clock starts
    // with every drone ready.
    let before = if cfg.raw { None } else { server_gauges(&http, &api).await };
    let mut connecting = tokio::task::JoinSet::new();
    let handshakes = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
    // Up to CONNECTIONS_PER_SOCKET connections each have their own socket; beyond that they
    // share, CONNECTIONS_PER_SOCKET to a socket (each keeps its own QUIC connection and TLS
    // session): quinn's receive path holds about 3 MB per socket, which at a socket per drone
    // took a 10,000-connection run past 24 GiB.
    let shared = if conns > CONNECTIONS_PER_SOCKET { conns.div_ceil(CONNECTIONS_PER_SOCKET) } else { 0 };
    let sockets = (0..shared)
        .map(|_| IngestClient::endpoint(cfg.server, &client_cfg))
        .collect::<Result<Vec<_>, _>>()
        .context("binding the fleet's UDP sockets")?;
    for (index, drones) in plans.into_iter().enumerate() {
        let driver = Driver {
            mqtt: None,
            http: None,
            producer_id: (run_id << 16) | index as u64,
            rate: cfg.rate / conns as f64,
            first: drones.first().map_or(0, |d| d.id),
            drones,
        };
        let socket = sockets.get(index / CONNECTIONS_PER_SOCKET).cloned();
        let (handshakes, server, producer_cfg) = (
            handshakes.clone(),
            cfg.server,
            ProducerConfig::new(ClientConfig { endpoint: socket, ..client_cfg.clone() }),
        );
        connecting.spawn(async move {
            let _turn = handshakes.acquire_owned().await;
            (index, driver, Producer::connect(server, producer_cfg).await)
        });
    }
    let mut slots: Vec<Option<_>> = (0..conns).map(|_| None).collect();
    let mut connected = 0;
    while let Some(joined) = connecting.join_next().await {
        let (index, mut driver, producer) = joined.context("a connection task panicked")?;
        let mut producer = producer.context("connecting a fleet connection")?;
        if let Some(target) = &cfg.mqtt {
            // Telemetry goes over MQTT; the QUIC session stays for the drones' missions.
            let client_id = format!("loadgen-{run_id}-{index}");
            let drones: Vec<u64> = driver.drones.iter().map(|d| d.id).collect();
            let (sender, answers) = adapters::MqttSender::connect(target, client_id, index, &drones).await?;
            driver.mqtt = Some(sender);
            producer.1 = answers;
        } else if cfg.http_telemetry {
            let (sender, answers) = adapters::HttpSender::new(http.clone(), &api);
            driver.http = Some(sender);
            producer.1 = answers;
        }
        slots[index] = Some((driver, producer));
        connected += 1;
        if connected % 500 == 0 || connected == conns {
            progress(&Progress { connected, ..Progress::default() });
        }
    }
    let ready: Vec<_> = slots.into_iter().flatten().collect();
    let server_memory = match before {
        Some(before) => {
            // Let the server settle its per-connection state before reading its memory.
            tokio::time::sleep(Duration::from_millis(500)).await;
            server_gauges(&http, &api).await.map(|connected| ServerMemory::new(before, connected))
        }
        None => None,
    };
    let start = Instant::now();
    let start_us = now_us();
    let warmup_us = u64::try_from(cfg.warmup.min(cfg.duration).as_micros()).unwrap_or(u64::MAX);
    counters.measure_from_us.store(start_us.saturating_add(warmup_us), Ordering::Relaxed);
    let (timeline_stop, timeline_stop_rx) = watch::channel(false);
    let sampler = cfg.timeline.map(|slice| {
        let api = (!cfg.raw).then(|| api.clone());
        timeline::Sampler::start(slice, timeline::acked(&counters), http.clone(), api, timeline_stop_rx)
    });
    let drivers: Vec<_> = ready
        .into_iter()
        .map(|(driver, producer)| tokio::spawn(driver.run(producer, cfg.clone(), counters.clone(), start, start_us)))
        .collect();

    let scheduled_ids = Arc::new(Mutex::new(Vec::new()));
    let changes = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let subscribed: Subscribed = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let sms = match (cfg.notify_percent, cfg.sms_listen) {
        (0, _) => None,
        (_, None) => anyhow::bail!("subscribing to notifications needs an address to receive them on (sms_listen)"),
        (_, Some(addr)) => Some(SmsSink::start(addr).await?),
    };
    let customers = tokio::spawn(customers(
        cfg.clone(),
        http.clone(),
        api.clone(),
        counters.clone(),
        (scheduled_ids.clone(), changes.clone(), subscribed.clone()),
        start,
    ));
    let ticker = {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.tick().await;
            loop {
                every.tick().await;
                let acked = counters.acked.load(Ordering::Relaxed);
                let dt = last.0.elapsed().as_secs_f64().max(1e-3);
                let p = Progress {
                    connected: conns,
                    elapsed_s: start.elapsed().as_secs_f64(),
                    sent: counters.sent.load(Ordering::Relaxed),
                    acked,
                    rejected: counters.rejected.load(Ordering::Relaxed),
                    recent_eps: (acked - last.1) as f64 / dt,
                    scheduled: counters.scheduled.load(Ordering::Relaxed),
                    completed: counters.completed.load(Ordering::Relaxed),
                    observed: counters.telemetry_unique.load(Ordering::Relaxed),
                };
                last = (Instant::now(), acked);
                progress(&p);
            }
        })
    };

    let mut outcomes = Vec::new();
    let mut unanswered = 0u64;
    let mut send_lag = observe::histogram();
    // When each cancelled delivery's drone was first told to return to base.
    let mut told = std::collections::HashMap::new();
    for d in drivers {
        let done = d.await.context("a fleet connection panicked")??;
        outcomes.extend(done.outcomes);
        unanswered += done.unanswered;
        let _ = send_lag.add(&done.lag);
        for (delivery, at_us) in done.told {
            told.entry(delivery).or_insert(at_us);
        }
    }
    let duration_s = start.elapsed().as_secs_f64();
    timeline::Sampler::stop(&timeline_stop);
    let _ = customers.await;
    let scheduled_ids = std::mem::take(&mut *scheduled_ids.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let changed = std::mem::take(&mut *changes.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let milestones: BTreeMap<u64, u8> = outcomes.iter().map(|o| (o.delivery_id, o.milestones)).collect();
    // The delivery events each scheduled delivery must have: Created and one per milestone its
    // drone reported, one more when it was rescheduled. A cancelled one: Created and Cancelled
    // (which milestones came before the engine took the cancel is a race the drone cannot see).
    let expected_of = |id: &u64| match changed.get(id).map(|c| c.0) {
        Some(Change::Cancelled) => 2,
        Some(Change::Rescheduled) => 2 + u64::from(milestones.get(id).copied().unwrap_or(0)),
        None => 1 + u64::from(milestones.get(id).copied().unwrap_or(0)),
    };
    let expected_delivery: u64 = scheduled_ids.iter().map(expected_of).sum();

    // Let the subscriber catch up with everything that was acknowledged; give up only once it
    // has made no progress for `settle`.
    let acked = counters.acked.load(Ordering::Relaxed);
    if let Some(o) = &observing {
        let _ = o.read_telemetry.send(true);
    }
    let mut last_progress = (Instant::now(), 0u64);
    let readers_seen = || extra_readers.iter().map(|r| r.seen.load(Ordering::Relaxed)).sum::<u64>();
    while observing.is_some()
        && last_progress.0.elapsed() < cfg.settle
        && (counters.telemetry_unique.load(Ordering::Relaxed) < acked
            || counters.delivery_unique.load(Ordering::Relaxed) < expected_delivery
            || extra_readers.iter().any(|r| r.seen.load(Ordering::Relaxed) < acked))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let seen = counters.telemetry_unique.load(Ordering::Relaxed)
            + counters.delivery_unique.load(Ordering::Relaxed)
            + readers_seen();
        if seen != last_progress.1 {
            last_progress = (Instant::now(), seen);
        }
    }
    ticker.abort();
    let _ = readers_stop.send(true);
    let reader_reports = readers::finish(extra_readers).await;
    let delivery_readers = match delivery_readers {
        Some(r) => Some(r.finish().await),
        None => None,
    };
    let server_rss_peak_bytes = match memory_peak {
        Some(task) => task.await.ok().filter(|peak| *peak > 0),
        None => None,
    };
    let (mut tel, mut del) = match observing {
        Some(o) => {
            let _ = o.stop.send(true);
            let tel = o.telemetry.await.context("telemetry observer panicked")?;
            let del = o.deliveries.await.context("delivery observer panicked")?;
            (tel, del)
        }
        None => (TelemetryObserver::new(cfg.drone_id_base, 0), DeliveryObserver::new(cfg.drone_id_base, 0)),
    };
    let timeline = match sampler {
        Some(sampler) => {
            let telemetry = tel.slices.take().map(timeline::Slicer::finish).unwrap_or_default();
            let delivery = del.slices.take().map(timeline::Slicer::finish).unwrap_or_default();
            sampler.finish(&timeline_stop, start_us, telemetry, delivery).await
        }
        None => Vec::new(),
    };

    let lost_delivery_events: u64 = scheduled_ids
        .iter()
        .map(|id| match changed.get(id).map(|c| c.0) {
            // Created and Cancelled: at least two events, the last one Cancelled.
            Some(Change::Cancelled) => {
                let ended = u64::from(del.ended(*id) != Some(events::DeliveryStage::Cancelled));
                2u64.saturating_sub(u64::from(del.events_of(*id))).max(ended)
            }
            _ => expected_of(id).saturating_sub(u64::from(del.events_of(*id))),
        })
        .sum();
    let cancelled_then_completed = changed
        .iter()
        .filter(|(id, c)| c.0 == Change::Cancelled && del.ended(**id) == Some(events::DeliveryStage::DeliveryComplete))
        .count() as u64;
    // Every cancel answered 202 must reach its drone as a return-to-base (a drone cut off from
    // the node hears it once it is back), and a drone told drops nothing off afterwards.
    let cancelled_but_flown = outcomes
        .iter()
        .filter(|o| match (told.get(&o.delivery_id), o.dropped_off_us) {
            (Some(told_us), Some(dropped)) => dropped > *told_us,
            _ => false,
        })
        .count() as u64;
    let cancels_unheard =
        changed.iter().filter(|(id, c)| c.0 == Change::Cancelled && !told.contains_key(*id)).count() as u64;
    // Every stage change created after a subscription was answered must be notified (the
    // subscription was durable first); wait for stragglers as for events.
    let subscribed = std::mem::take(&mut *subscribed.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let expected_notes: Vec<String> = subscribed
        .iter()
        .flat_map(|(id, at_us)| {
            del.events_seen(*id).iter().filter(|(_, ts)| ts > at_us).map(move |(seq, _)| format!("{id}-{seq}"))
        })
        .collect();
    let (notifications_missing, notifications_repeated) = match &sms {
        Some(sms) => sms.wait_for(&expected_notes, cfg.settle).await,
        None => (0, 0),
    };
    let lost_telemetry = if cfg.raw { 0 } else { acked.saturating_sub(tel.unique) };
    let rejections = counters.rejections.lock().map(|r| r.clone()).unwrap_or_default();
    Ok(Report {
        events_sent: counters.sent.load(Ordering::Relaxed),
        events_acked: acked,
        events_rejected: counters.rejected.load(Ordering::Relaxed),
        events_unanswered: unanswered,
        deliveries_scheduled: counters.scheduled.load(Ordering::Relaxed),
        deliveries_refused: counters.refused.load(Ordering::Relaxed),
        deliveries_cancelled: counters.cancelled.load(Ordering::Relaxed),
        deliveries_rescheduled: counters.rescheduled.load(Ordering::Relaxed),
        cancelled_then_completed,
        cancelled_but_flown,
        cancels_unheard,
        notifications_subscribed: subscribed.len() as u64,
        notifications_expected: expected_notes.len() as u64,
        notifications_missing,
        notifications_repeated,
        deliveries_completed: del.completed,
        deliveries_unfinished: scheduled_ids.iter().filter(|id| !del.finished(**id)).count() as u64,
        delivery_events_observed: del.unique,
        delivery_events_expected: expected_delivery,
        telemetry_events_observed: tel.unique,
        lost: lost_telemetry + lost_delivery_events,
        lost_telemetry,
        lost_delivery_events,
        duplicates: tel.duplicates + del.duplicates,
        duration_s,
        warmup_s: cfg.warmup.min(cfg.duration).as_secs_f64(),
        throughput_eps: acked as f64 / duration_s.max(1e-9),
        target_eps: cfg.rate,
        latency_us: Percentiles::of(&del.latency),
        telemetry_latency_us: Percentiles::of(&tel.latency),
        send_lag_us: Percentiles::of(&send_lag),
        server_memory,
        curves: Curves {
            delivery_events: curve(&del.latency),
            telemetry: curve(&tel.latency),
            send_lag: curve(&send_lag),
        },
        rejections,
        drones: cfg.drones,
        connections: conns,
        mode: if cfg.raw { "raw" } else { "full" },
        transport: match (&cfg.mqtt, cfg.http_telemetry) {
            (Some(t), _) if t.missions => "mqtt+missions",
            (Some(_), _) => "mqtt",
            (None, true) => "http",
            (None, false) => "quic",
        },
        telemetry_check: cfg.telemetry_check,
        readers: reader_reports,
        delivery_readers,
        server_rss_peak_bytes,
        timeline,
    })
}

/// The subscriber side of a full run: a connection and an observer task per topic, so delivery
/// events never queue behind the telemetry firehose on a shared connection.
struct Observing {
    stop: watch::Sender<bool>,
    /// Set when telemetry may be read (at once, or after the run).
    read_telemetry: watch::Sender<bool>,
    telemetry: tokio::task::JoinHandle<TelemetryObserver>,
    deliveries: tokio::task::JoinHandle<DeliveryObserver>,
}

/// A log subscription that rides through a server restart as a real subscriber does: when its
/// connection is lost it reconnects (backing off, 50 ms doubling to 2 s) and resumes at the
/// offset after the last batch it handed out, so nothing acknowledged is missed and nothing is
/// seen twice.
struct Resuming<T: events::wire::Payload> {
    server: SocketAddr,
    client_cfg: ClientConfig,
    topic: Topic,
    client: IngestClient,
    sub: ingest::LogSubscription<T>,
    /// The offset to resume at.
    next: u64,
    /// Reconnections made.
    resumed: u64,
}

impl<T: events::wire::Payload> Resuming<T> {
    async fn open(server: SocketAddr, client_cfg: &ClientConfig, topic: Topic, from: StartAt) -> anyhow::Result<Self> {
        let client = IngestClient::connect(server, client_cfg)
            .await
            .with_context(|| format!("connecting to the ingest server at {server}"))?;
        let sub = client.subscribe_from::<T>(topic, from).await.with_context(|| format!("subscribing to {topic:?}"))?;
        let next = sub.start();
        Ok(Self { server, client_cfg: client_cfg.clone(), topic, client, sub, next, resumed: 0 })
    }

    /// The next batch and its offset; across a lost connection, after reconnecting. `None` only
    /// when the server ended the stream on purpose.
    async fn next(&mut self) -> Option<(u64, events::Batch<T>)> {
        loop {
            match self.sub.next().await {
                Ok(Some((offset, batch))) => {
                    self.next = offset + 1;
                    return Some((offset, batch));
                }
                Ok(None) => return None,
                Err(error) => {
                    tracing::warn!(%error, topic = ?self.topic, next = self.next, "subscription lost; reconnecting to resume");
                    self.reconnect().await;
                }
            }
        }
    }

    async fn reconnect(&mut self) {
        let mut backoff = Duration::from_millis(50);
        loop {
            tokio::time::sleep(backoff).await;
            let attempt = async {
                let client = IngestClient::connect(self.server, &self.client_cfg).await?;
                let sub = client.subscribe_from::<T>(self.topic, StartAt::Offset(self.next)).await?;
                Ok::<_, ingest::Error>((client, sub))
            };
            match attempt.await {
                Ok((client, sub)) => {
                    let old = std::mem::replace(&mut self.client, client);
                    old.connection().close(0u32.into(), b"resumed elsewhere");
                    self.sub = sub;
                    self.resumed += 1;
                    tracing::info!(topic = ?self.topic, next = self.next, "subscription resumed");
                    return;
                }
                Err(error) => tracing::debug!(%error, "reconnecting the subscription failed"),
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn close(self) {
        self.client.close().await;
    }
}

async fn subscribe(cfg: &LoadConfig, client_cfg: &ClientConfig, counters: &Arc<Counters>) -> anyhow::Result<Observing> {
    // Log subscriptions: the subscriber reads at its own pace and catches up from the log if it
    // falls behind, instead of being cut off, so every acknowledged event can be accounted for.
    let tsub = Resuming::<DroneEvent>::open(cfg.server, client_cfg, Topic::DroneTelemetry, StartAt::Latest).await?;
    let dsub = Resuming::<DeliveryEvent>::open(cfg.server, client_cfg, Topic::DeliveryEvents, StartAt::Latest).await?;
    let (stop, stop_rx) = watch::channel(false);
    let (read_telemetry, mut may_read) = watch::channel(cfg.telemetry_check == TelemetryCheck::During);
    let telemetry = {
        let counters = counters.clone();
        let mut obs = TelemetryObserver::new(cfg.drone_id_base, cfg.drones);
        obs.slices = cfg.timeline.map(timeline::Slicer::new);
        let mut stop_early = stop_rx.clone();
        let hold = async move {
            tokio::select! {
                _ = may_read.wait_for(|go| *go) => true,
                _ = stop_early.wait_for(|s| *s) => false,
            }
        };
        observe(tsub, obs, hold, stop_rx.clone(), move |obs, batch| {
            obs.measure_from_us = counters.measure_from_us.load(Ordering::Relaxed);
            obs.observe(batch, now_us());
            counters.telemetry_unique.store(obs.unique, Ordering::Relaxed);
        })
    };
    let deliveries = {
        let counters = counters.clone();
        let mut obs = DeliveryObserver::new(cfg.drone_id_base, cfg.drones);
        obs.slices = cfg.timeline.map(timeline::Slicer::new);
        observe(dsub, obs, std::future::ready(true), stop_rx, move |obs, batch| {
            obs.measure_from_us = counters.measure_from_us.load(Ordering::Relaxed);
            obs.observe(batch, now_us());
            counters.delivery_unique.store(obs.unique, Ordering::Relaxed);
            counters.completed.store(obs.completed, Ordering::Relaxed);
        })
    };
    Ok(Observing { stop, read_telemetry, telemetry, deliveries })
}

/// Once `hold` resolves to true, feeds every batch of a subscription to `on_batch` until `stop`
/// changes or the stream ends; the task closes the connection and returns the observer.
fn observe<T, O>(
    mut sub: Resuming<T>,
    mut obs: O,
    hold: impl Future<Output = bool> + Send + 'static,
    mut stop: watch::Receiver<bool>,
    mut on_batch: impl FnMut(&mut O, &events::Batch<T>) + Send + 'static,
) -> tokio::task::JoinHandle<O>
where
    T: events::wire::Payload,
    O: Send + 'static,
{
    tokio::spawn(async move {
        if hold.await {
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    next = sub.next() => match next {
                        Some((_, batch)) => on_batch(&mut obs, &batch),
                        None => break,
                    }
                }
            }
        }
        if sub.resumed > 0 {
            tracing::info!(topic = ?sub.topic, resumed = sub.resumed, "the subscription resumed after lost connections");
        }
        sub.close().await;
        obs
    })
}

/// One connection's share of the fleet: drones `first..first + drones.len()`.
struct Driver {
    /// Telemetry over MQTT instead of the QUIC producer.
    mqtt: Option<adapters::MqttSender>,
    /// Telemetry over HTTP instead of the QUIC producer.
    http: Option<adapters::HttpSender>,
    producer_id: u64,
    rate: f64,
    first: u64,
    drones: Vec<SimDrone>,
}

/// A mission leased from `drone-commands` and the means to settle it.
type HeldMission = (events::Leased, MissionSettler);

/// How a drone answers its missions: on its connection's QUIC consumer, or on the mission's
/// MQTT answer topic (`--mqtt-missions`).
#[derive(Debug, Clone)]
enum MissionSettler {
    Quic(ingest::consume::Settler),
    Mqtt(adapters::MissionAnswers),
}

impl MissionSettler {
    async fn settle(&self, m: &events::Leased, verdict: events::Verdict) -> anyhow::Result<()> {
        match self {
            Self::Quic(s) => Ok(s.settle(m, verdict).await?),
            Self::Mqtt(a) => a.settle(m, verdict).await,
        }
    }
}

/// What one fleet connection's driver ends with.
struct DriverOutcome {
    /// Its drones' missions, as far as each got.
    outcomes: Vec<MissionOutcome>,
    /// Events never answered.
    unanswered: u64,
    /// Its send lag.
    lag: Histogram<u64>,
    /// Returns to base it was told of: (delivery, when, µs).
    told: Vec<(u64, u64)>,
}

/// The missions a fleet connection's drones hold. A mission is acked only once the batch
/// carrying its drop-off has been acknowledged by the server, so a load generator killed
/// mid-flight leaves its missions unacked and the next session flies them again.
#[derive(Default)]
struct MissionBook {
    /// Leased and being flown, by delivery.
    flying: std::collections::HashMap<u64, HeldMission>,
    /// Leased, waiting for the drone to finish its current mission.
    waiting: Vec<(events::Mission, events::Leased, MissionSettler)>,
    /// Dropped off in the batch being filled.
    in_batch: Vec<HeldMission>,
    /// Deliveries dropped off in this run (a redelivery of one is acked at once).
    done: std::collections::HashSet<u64>,
    /// Deliveries cancelled (told `ReturnToBase`): never flown, even if their mission comes
    /// again.
    cancelled: std::collections::HashSet<u64>,
    /// Each return-to-base as it arrived: the delivery and when, µs.
    told: Vec<(u64, u64)>,
    /// The scheduling trace of each mission being flown, put on the batch with its drop-off.
    traces: std::collections::HashMap<u64, events::TraceContext>,
    /// The trace of the batch being filled.
    batch_trace: Option<events::TraceContext>,
}

impl MissionBook {
    fn dropped_off(&mut self, delivery: u64) {
        self.done.insert(delivery);
        if let Some(trace) = self.traces.remove(&delivery) {
            self.batch_trace.get_or_insert(trace);
        }
        if let Some(held) = self.flying.remove(&delivery) {
            self.in_batch.push(held);
        }
    }

    /// The drop-offs of the batch about to be sent as `batch_seq`: acked when it is.
    async fn ride_with(&mut self, batch_seq: u64, tx: &mpsc::Sender<(u64, Vec<HeldMission>)>) {
        if !self.in_batch.is_empty() {
            let _ = tx.send((batch_seq, std::mem::take(&mut self.in_batch))).await;
        }
    }
}

/// Takes this connection's drones' missions from `drone-commands` on the fleet connection
/// itself, and hands each to the driver with the means to settle it; opens the consumer again
/// when the connection was re-established, until `stop`.
async fn take_missions(
    producer: Arc<Producer>,
    keys: events::KeyRange,
    to_driver: mpsc::Sender<(events::Leased, MissionSettler)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        // Each drone holds its mission until the drop-off is acknowledged, and may have the next
        // one waiting: room for two per drone, so the credit never holds missions back.
        let credit = u16::try_from(keys.hi.saturating_sub(keys.lo).saturating_mul(2)).unwrap_or(u16::MAX).max(16);
        let mut consumer = match producer.consume(events::QueueName::DroneCommands, keys, credit).await {
            Ok(c) => c,
            Err(error) => {
                tracing::debug!(%error, "mission consumer not open yet");
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            }
        };
        let settler = consumer.settler();
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    drop(settler);
                    consumer.close().await;
                    return;
                }
                m = consumer.recv() => match m {
                    Some(Ok(m)) => {
                        if to_driver.send((m, MissionSettler::Quic(settler.clone()))).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "mission stream ended; reopening");
                        break;
                    }
                    None => break,
                },
            }
        }
    }
}

/// Hands the missions that came over MQTT to the driver, each with the means to answer it,
/// until `stop`.
async fn missions_over_mqtt(
    mut from_broker: mpsc::Receiver<events::Leased>,
    answers: adapters::MissionAnswers,
    to_driver: mpsc::Sender<(events::Leased, MissionSettler)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            m = from_broker.recv() => match m {
                Some(m) => {
                    if to_driver.send((m, MissionSettler::Mqtt(answers.clone()))).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
        }
    }
}

impl Driver {
    /// Sends this connection's drones' telemetry on schedule until the duration is over; returns
    /// the missions' outcomes and the events left unanswered.
    async fn run(
        mut self,
        (producer, mut answers): (Producer, mpsc::Receiver<ingest::Answer>),
        cfg: LoadConfig,
        counters: Arc<Counters>,
        start: Instant,
        start_us: u64,
    ) -> anyhow::Result<DriverOutcome> {
        let producer = Arc::new(producer);
        let (mission_tx, mut missions) = mpsc::channel(self.drones.len().clamp(16, 1024));
        let (stop_missions, stop_rx) = tokio::sync::watch::channel(false);
        let keys = events::KeyRange { lo: self.first, hi: self.first + self.drones.len() as u64 };
        let over_mqtt = self.mqtt.as_mut().and_then(adapters::MqttSender::take_missions);
        let taker = match over_mqtt {
            _ if cfg.raw => None,
            Some((from_broker, answers)) => {
                Some(tokio::spawn(missions_over_mqtt(from_broker, answers, mission_tx, stop_rx)))
            }
            None => Some(tokio::spawn(take_missions(producer.clone(), keys, mission_tx, stop_rx))),
        };
        let answer_counters = counters.clone();
        // Missions whose drop-off rides in a batch, by batch number: acked once that batch is.
        let (dropoffs_tx, mut dropoffs_rx) = mpsc::channel::<(u64, Vec<HeldMission>)>(1024);
        let answered_events = Arc::new(AtomicU64::new(0));
        let answered_count = answered_events.clone();
        let answered = tokio::spawn(async move {
            let mut events = 0u64;
            let mut waiting: BTreeMap<u64, Vec<HeldMission>> = BTreeMap::new();
            let mut dropoffs_open = true;
            loop {
                // Drop-offs are registered before their batch is sent, so take them first.
                let a = tokio::select! {
                    biased;
                    d = dropoffs_rx.recv(), if dropoffs_open => {
                        match d {
                            Some((seq, held)) => { waiting.insert(seq, held); }
                            None => dropoffs_open = false,
                        }
                        continue;
                    }
                    a = answers.recv() => match a { Some(a) => a, None => break },
                };
                events += u64::from(a.events);
                let verdict = match &a.result {
                    Ok(()) => events::Verdict::Ack,
                    Err(e) => events::Verdict::Nack(format!("the batch with the drop-off was rejected: {e}")),
                };
                for (leased, settler) in waiting.remove(&a.batch_seq).unwrap_or_default() {
                    let _ = settler.settle(&leased, verdict.clone()).await;
                }
                match a.result {
                    Ok(()) => answer_counters.acked.fetch_add(u64::from(a.events), Ordering::Relaxed),
                    Err(e) => {
                        if let Ok(mut r) = answer_counters.rejections.lock() {
                            *r.entry(e.name().to_string()).or_default() += 1;
                        }
                        answer_counters.rejected.fetch_add(u64::from(a.events), Ordering::Relaxed)
                    }
                };
                answered_count.store(events, Ordering::Relaxed);
            }
            events
        });
        let mut book = MissionBook::default();
        let total = (cfg.duration.as_secs_f64() * self.rate) as u64;
        let mut emitted = 0u64;
        let mut sent = 0u64;
        let mut next_drone = 0usize;
        let mut batch_seq = 0u64;
        let mut outcomes = Vec::new();
        // Grows to the largest batch this connection sends (one drone's connection: a few
        // events), not to `batch_max_events` up front: 80 KB a connection otherwise.
        let mut events = Vec::new();
        let mut lag = observe::small_histogram();
        let mut tick = tokio::time::interval(if self.rate <= 0.0 {
            Duration::from_micros(1) // no schedule to keep: the window paces the sends
        } else {
            cfg.linger.max(Duration::from_micros(100))
        });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            while let Ok((leased, settler)) = missions.try_recv() {
                for (verdict, leased, settler) in self.take_mission(&mut book, leased, settler) {
                    let _ = settler.settle(&leased, verdict).await;
                }
            }
            self.start_waiting(&mut book, &mut outcomes);
            let elapsed = start.elapsed();
            let done = elapsed >= cfg.duration;
            let unlimited = self.rate <= 0.0;
            let target = if unlimited {
                // One batch per round: the send waits for the window, which paces the fleet.
                if done { emitted } else { emitted + cfg.batch_max_events as u64 }
            } else if done {
                total
            } else {
                ((elapsed.as_secs_f64() * self.rate) as u64).min(total)
            };
            let now_us = events::now_us();
            while emitted < target {
                let ts = if unlimited { now_us } else { start_us + (emitted as f64 * 1e6 / self.rate) as u64 };
                let (ev, finished) = self.drones[next_drone].next_event(ts);
                next_drone = (next_drone + 1) % self.drones.len();
                emitted += 1;
                outcomes.extend(finished);
                if let events::DroneEventKind::DroppedOff { delivery } = ev.kind {
                    book.dropped_off(delivery);
                }
                events.push(ev);
                if events.len() == cfg.batch_max_events {
                    book.ride_with(batch_seq, &dropoffs_tx).await;
                    self.send(&producer, &mut events, &mut batch_seq, &counters, &mut lag, &mut book.batch_trace)
                        .await?;
                    sent += cfg.batch_max_events as u64;
                }
            }
            if !events.is_empty() {
                sent += events.len() as u64;
                book.ride_with(batch_seq, &dropoffs_tx).await;
                self.send(&producer, &mut events, &mut batch_seq, &counters, &mut lag, &mut book.batch_trace).await?;
            }
            if done {
                break;
            }
        }
        outcomes.extend(self.drones.iter().filter_map(SimDrone::outcome_so_far));
        // Let the last drop-offs' batches be answered (and their missions acked) before the
        // mission stream closes; missions still in flight stay unacked and go back to the queue.
        drop(dropoffs_tx);
        let told = std::mem::take(&mut book.told);
        drop(book);
        // The HTTP sender holds the answers' channel open: the answer task ends when it closes.
        drop(self.http.take());
        let waited = Instant::now();
        while answered_events.load(Ordering::Relaxed) < sent && waited.elapsed() < cfg.settle {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(missions);
        let _ = stop_missions.send(true);
        if let Some(taker) = taker {
            let _ = taker.await;
        }
        if let Some(mqtt) = self.mqtt.take() {
            mqtt.finish().await;
        }
        let producer =
            Arc::try_unwrap(producer).map_err(|_| anyhow::anyhow!("the mission consumer still holds the producer"))?;
        let stats = producer.finish(cfg.settle).await;
        if stats.connections > 1 {
            tracing::warn!(
                reconnects = stats.connections - 1,
                resent = stats.resent,
                "fleet connection was re-established"
            );
        }
        let answered =
            tokio::time::timeout(Duration::from_secs(1), answered).await.ok().and_then(Result::ok).unwrap_or(0);
        Ok(DriverOutcome { outcomes, unanswered: sent.saturating_sub(answered), lag, told })
    }

    /// Where a drone sits in this connection's list.
    fn index_of(&self, drone_id: u64) -> Option<usize> {
        let idx = usize::try_from(drone_id.checked_sub(self.first)?).ok()?;
        (idx < self.drones.len() && self.drones[idx].id == drone_id).then_some(idx)
    }

    /// A mission arrives from the queue. A malformed one, or one for a drone not on this
    /// connection, is refused at once; one already dropped off or cancelled (a redelivery) is
    /// acked at once; otherwise it waits for its drone (see [`MissionBook`]). A `Fly` for the
    /// delivery a drone already has is a reschedule (newer) or a redelivery; a `ReturnToBase`
    /// withdraws the delivery's waiting mission, or turns its drone home. Returns the verdicts
    /// to give now.
    fn take_mission(
        &mut self,
        book: &mut MissionBook,
        leased: events::Leased,
        settler: MissionSettler,
    ) -> Vec<(events::Verdict, events::Leased, MissionSettler)> {
        let m = match events::Mission::from_bytes(&leased.payload) {
            Ok(m) => m,
            Err(error) => return vec![(events::Verdict::Nack(format!("not a mission: {error}")), leased, settler)],
        };
        let Some(idx) = self.index_of(m.drone_id) else {
            let why = format!("drone {} does not fly on this connection", m.drone_id);
            return vec![(events::Verdict::Nack(why), leased, settler)];
        };
        let mut settle = Vec::new();
        if m.kind == events::MissionKind::ReturnToBase {
            book.cancelled.insert(m.delivery_id);
            book.told.push((m.delivery_id, now_us()));
            book.traces.remove(&m.delivery_id);
            let (withdrawn, kept) =
                std::mem::take(&mut book.waiting).into_iter().partition(|(w, _, _)| w.delivery_id == m.delivery_id);
            book.waiting = kept;
            for (_, l, s) in withdrawn {
                settle.push((events::Verdict::Ack, l, s));
            }
            self.drones[idx].abort(m.delivery_id, now_us());
            if let Some((l, s)) = book.flying.remove(&m.delivery_id) {
                settle.push((events::Verdict::Ack, l, s));
            }
            settle.push((events::Verdict::Ack, leased, settler));
            return settle;
        }
        if book.done.contains(&m.delivery_id) || book.cancelled.contains(&m.delivery_id) {
            return vec![(events::Verdict::Ack, leased, settler)];
        }
        if m.trace.is_some() {
            book.traces.insert(m.delivery_id, m.trace.child());
        }
        let newer =
            |held: &events::Leased| events::Mission::from_bytes(&held.payload).map_or(true, |h| m.ts_us >= h.ts_us);
        if let Some(flying) = book.flying.get_mut(&m.delivery_id) {
            if flying.0.id == leased.id {
                // Redelivered while the drone flies it (the lease ran out or the session
                // changed): the newest lease is the one to ack.
                *flying = (leased, settler);
            } else if newer(&flying.0) {
                // A reschedule: the new places, if the package is not picked up yet; the
                // mission it replaces is done with.
                self.drones[idx].reroute(m.delivery_id, m.pickup, m.dropoff, now_us());
                let (l, s) = std::mem::replace(flying, (leased, settler));
                settle.push((events::Verdict::Ack, l, s));
            } else {
                settle.push((events::Verdict::Ack, leased, settler));
            }
            return settle;
        }
        let mut replaced = Vec::new();
        let mut older = false;
        book.waiting.retain(|(w, l, s)| {
            if w.delivery_id != m.delivery_id {
                return true;
            }
            if l.id != leased.id && !newer(l) {
                older = true;
                return true;
            }
            if l.id != leased.id {
                replaced.push((l.clone(), s.clone()));
            }
            false
        });
        if older {
            return vec![(events::Verdict::Ack, leased, settler)];
        }
        for (l, s) in replaced {
            settle.push((events::Verdict::Ack, l, s));
        }
        book.waiting.push((m, leased, settler));
        settle
    }

    /// Starts every waiting mission whose drone can take it.
    fn start_waiting(&mut self, book: &mut MissionBook, outcomes: &mut Vec<MissionOutcome>) {
        let waiting = std::mem::take(&mut book.waiting);
        for (m, leased, settler) in waiting {
            let Some(idx) = self.index_of(m.drone_id) else { continue };
            let mission = Mission { delivery_id: m.delivery_id, pickup: m.pickup, dropoff: m.dropoff };
            match self.drones[idx].assign(mission, now_us()) {
                Ok(finished) => {
                    outcomes.extend(finished);
                    book.flying.insert(m.delivery_id, (leased, settler));
                }
                Err(_) => book.waiting.push((m, leased, settler)),
            }
        }
    }

    /// Encodes and hands one batch to the producer, which keeps it until it is answered.
    async fn send(
        &self,
        producer: &Producer,
        events: &mut Vec<DroneEvent>,
        batch_seq: &mut u64,
        counters: &Counters,
        lag: &mut Histogram<u64>,
        trace: &mut Option<events::TraceContext>,
    ) -> anyhow::Result<()> {
        let oldest = events.first().map_or(0, |e| e.ts_us);
        let trace = trace.take().unwrap_or_default();
        if let Some(mqtt) = &self.mqtt {
            mqtt.send(*batch_seq, events).await?;
        } else if let Some(http) = &self.http {
            http.send(*batch_seq, events).await?;
        } else {
            let meta = BatchMeta { producer_id: self.producer_id, batch_seq: *batch_seq, trace };
            let buf = Buffer::with_capacity(events::wire::HEADER_LEN + events.len() * 96);
            let batch = TelemetryBatch::encode(meta, events, buf)?;
            producer.send(*batch_seq, batch.into_buffer()).await.context("sending a batch")?;
        }
        let behind = now_us().saturating_sub(oldest).max(1);
        if oldest >= counters.measure_from_us.load(Ordering::Relaxed) {
            let _ = lag.record(behind);
        }
        counters.fleet_lag_us.fetch_max(behind, Ordering::Relaxed);
        *batch_seq += 1;
        counters.sent.fetch_add(events.len() as u64, Ordering::Relaxed);
        events.clear();
        Ok(())
    }
}

/// An HTTP client for the API, presenting `api_key` on every request when there is one.
pub fn http_client(
    pool: usize,
    api_key: Option<&str>,
    tls_dir: Option<&std::path::Path>,
) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = api_key {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).context("the API key")?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let builder = match tls_dir {
        Some(dir) => services::tls::client_builder(&services::tls::TlsFiles::in_dir(dir, "client"))
            .with_context(|| format!("the client certificate in {}", dir.display()))?,
        None => services::tls::plain_client_builder(),
    };
    builder.pool_max_idle_per_host(pool).default_headers(headers).build().context("building the HTTP client")
}

/// Scheduling requests in flight at once (HTTP/1.1, one connection each).
const CUSTOMER_REQUESTS: usize = 256;

/// What customers did to their deliveries after ordering them, by delivery.
/// With when the change was answered, µs.
type Changes = Arc<Mutex<std::collections::HashMap<u64, (Change, u64)>>>;

/// Deliveries subscribed to, with when the subscription was answered (µs).
type Subscribed = Arc<Mutex<std::collections::HashMap<u64, u64>>>;

/// Receives the node's SMS posts (`{id, to, text}`) and counts them by notification id.
struct SmsSink {
    got: Arc<Mutex<std::collections::HashMap<String, u32>>>,
}

impl SmsSink {
    async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let got: Arc<Mutex<std::collections::HashMap<String, u32>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for the node's SMS posts on {addr}"))?;
        let counted = got.clone();
        let app = axum::Router::new().route(
            "/send",
            axum::routing::post(move |axum::Json(sms): axum::Json<serde_json::Value>| {
                let counted = counted.clone();
                async move {
                    let Some(id) = sms["id"].as_str() else { return axum::http::StatusCode::BAD_REQUEST };
                    if let Ok(mut got) = counted.lock() {
                        *got.entry(id.to_string()).or_default() += 1;
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { got })
    }

    /// Waits until every id in `expected` arrived, or until nothing new arrived for `settle`:
    /// (missing, arrived more than once).
    async fn wait_for(&self, expected: &[String], settle: Duration) -> (u64, u64) {
        let count = |got: &std::collections::HashMap<String, u32>| {
            let missing = expected.iter().filter(|id| !got.contains_key(*id)).count() as u64;
            let repeated = got.values().filter(|n| **n > 1).count() as u64;
            (missing, repeated)
        };
        let mut last = (Instant::now(), u64::MAX);
        loop {
            let (missing, repeated) = self.got.lock().map(|g| count(&g)).unwrap_or((u64::MAX, 0));
            if missing == 0 || last.0.elapsed() >= settle {
                return (missing, repeated);
            }
            if missing != last.1 {
                last = (Instant::now(), missing);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What a customer did to a delivery after ordering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Cancelled it (`202`).
    Cancelled,
    /// Moved its drop-off (`200`).
    Rescheduled,
}

/// Schedules deliveries at the configured rate; the server sends each mission to its drone.
/// Some are then cancelled or rescheduled (`cancel_percent`, `reschedule_percent`), within
/// half a leg of being scheduled.
async fn customers(
    cfg: LoadConfig,
    http: reqwest::Client,
    api: String,
    counters: Arc<Counters>,
    (scheduled, changes, subscribed): (Arc<Mutex<Vec<u64>>>, Changes, Subscribed),
    start: Instant,
) {
    if cfg.raw {
        return;
    }
    // Stop early enough that every mission can finish before the drones stop sending (a
    // rescheduled one starts its way to the pickup again).
    let changing = cfg.cancel_percent > 0 || cfg.reschedule_percent > 0;
    let margin = if changing { cfg.leg * 4 } else { cfg.leg * 3 };
    let stop_at = cfg.duration.saturating_sub(margin + Duration::from_secs(1));
    if stop_at.is_zero() {
        tracing::warn!("duration too short for a whole mission: no deliveries are scheduled");
        return;
    }
    let inflight = Arc::new(Semaphore::new(CUSTOMER_REQUESTS));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC057);
    let run_nonce = now_us();
    let mut issued = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    // A fleet running late (its process short of CPU) flies every mission that much later.
    let lag = || Duration::from_micros(counters.fleet_lag_us.load(Ordering::Relaxed));
    let mut warned = false;
    while start.elapsed() + lag() < stop_at {
        tick.tick().await;
        if !warned && lag() > cfg.leg {
            warned = true;
            tracing::warn!(
                lag_ms = lag().as_millis() as u64,
                "the fleet runs behind its schedule (this process is short of CPU): ordering stops earlier"
            );
        }
        let target = (start.elapsed().as_secs_f64() * cfg.deliveries_per_s) as u64;
        while issued < target {
            issued += 1;
            let Ok(permit) = inflight.clone().acquire_owned().await else { return };
            let pickup = near(cfg.center, &mut rng, 0.04);
            let dropoff = near(cfg.center, &mut rng, 0.04);
            let body = serde_json::json!({
                "owner": format!("customer-{}", issued % CUSTOMERS),
                "pickup": pickup,
                "dropoff": dropoff,
                "package": { "size": "small", "weight_kg": 1.5 },
            });
            let (http, api, counters, scheduled, changes, subscribed) =
                (http.clone(), api.clone(), counters.clone(), scheduled.clone(), changes.clone(), subscribed.clone());
            let subscribe = rng.random_range(0..100u8) < cfg.notify_percent;
            // A key per order, unique across runs: a retry after a lost answer (the server
            // restarted mid-request) gets the first result instead of a second delivery.
            let key = format!("loadgen-{run_nonce:x}-{issued}");
            let give_up = start + stop_at + cfg.leg;
            let roll = rng.random_range(0..100u8);
            let change = if roll < cfg.cancel_percent {
                Some((Change::Cancelled, None))
            } else if roll < cfg.cancel_percent.saturating_add(cfg.reschedule_percent) {
                Some((Change::Rescheduled, Some(near(cfg.center, &mut rng, 0.04))))
            } else {
                None
            };
            let after = cfg.leg.mul_f64(rng.random_range(0.0..0.5));
            tokio::spawn(async move {
                let _permit = permit;
                let url = format!("{api}/v1/deliveries");
                let post = || http.post(&url).header("idempotency-key", &key).json(&body);
                let Some(delivery_id) = schedule_with_retries(post, give_up).await else {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                counters.scheduled.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut s) = scheduled.lock() {
                    s.push(delivery_id);
                }
                // The drone learns of it from drone-commands, over its own connection.
                if subscribe {
                    let url = format!("{api}/v1/deliveries/{delivery_id}/notifications");
                    let sms = serde_json::json!({ "sms": format!("+1555{:07}", delivery_id % 10_000_000) });
                    match send_with_retries(|| http.post(&url).json(&sms), give_up).await {
                        Some((reqwest::StatusCode::CREATED, _)) => {
                            if let Ok(mut s) = subscribed.lock() {
                                s.insert(delivery_id, now_us());
                            }
                        }
                        other => tracing::warn!(delivery_id, ?other, "a subscription was not taken"),
                    }
                }
                let Some((change, dropoff)) = change else { return };
                tokio::time::sleep(after).await;
                let url = format!("{api}/v1/deliveries/{delivery_id}");
                let (done, answer) = match dropoff {
                    None => (reqwest::StatusCode::ACCEPTED, send_with_retries(|| http.delete(&url), give_up).await),
                    Some(dropoff) => {
                        let moved = serde_json::json!({ "dropoff": dropoff });
                        (reqwest::StatusCode::OK, send_with_retries(|| http.patch(&url).json(&moved), give_up).await)
                    }
                };
                match answer {
                    Some((status, _)) if status == done => {
                        let counter =
                            if change == Change::Cancelled { &counters.cancelled } else { &counters.rescheduled };
                        counter.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut c) = changes.lock() {
                            c.insert(delivery_id, (change, now_us()));
                        }
                    }
                    // Too late (picked up, or finished): the delivery goes on as it was.
                    Some((reqwest::StatusCode::CONFLICT, _)) => {}
                    other => tracing::warn!(delivery_id, ?change, ?other, "a customer's change was not taken"),
                }
            });
        }
    }
    // Wait for the requests still in flight.
    let _ = inflight.acquire_many(CUSTOMER_REQUESTS as u32).await;
}

/// `POST`s one order as a real client does (`post` builds the request with its
/// `Idempotency-Key`), retried as [`send_with_retries`]. The delivery id of a `201`; `None`
/// when refused outright (another `4xx`) or out of time.
async fn schedule_with_retries(post: impl Fn() -> reqwest::RequestBuilder, give_up: Instant) -> Option<u64> {
    match send_with_retries(post, give_up).await? {
        (reqwest::StatusCode::CREATED, v) => v["delivery_id"].as_u64(),
        (status, body) => {
            tracing::warn!(%status, %body, "scheduling refused");
            None
        }
    }
}

/// Sends a request (built afresh by `request` for each attempt) again after a lost connection,
/// a `5xx`, a `429` or a `409 no_drone_available` (every drone busy for now), backing off 50 ms
/// doubling to 2 s with jitter, until `give_up`. The first other answer's status and JSON body;
/// `None` when out of time.
async fn send_with_retries(
    request: impl Fn() -> reqwest::RequestBuilder,
    give_up: Instant,
) -> Option<(reqwest::StatusCode, serde_json::Value)> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let why = match request().send().await {
            Ok(resp) => {
                let status = resp.status();
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                let busy = status == reqwest::StatusCode::CONFLICT && body["error"] == "no_drone_available";
                if !(status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS || busy) {
                    return Some((status, body));
                }
                format!("{status} {} {}", body["error"].as_str().unwrap_or(""), body["message"].as_str().unwrap_or(""))
            }
            Err(error) => error.to_string(),
        };
        if Instant::now() + backoff > give_up {
            tracing::warn!(why, "a request gave up: still failing at the end of the run");
            return None;
        }
        tracing::debug!(why, "a request will be retried");
        let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report whose only measured series is `delivery`.
    pub(crate) fn report_with(delivery: Vec<CurvePoint>) -> Report {
        Report {
            events_sent: 1,
            events_acked: 1,
            events_rejected: 0,
            events_unanswered: 0,
            deliveries_scheduled: 0,
            deliveries_refused: 0,
            deliveries_cancelled: 0,
            deliveries_rescheduled: 0,
            cancelled_then_completed: 0,
            cancelled_but_flown: 0,
            cancels_unheard: 0,
            notifications_subscribed: 0,
            notifications_expected: 0,
            notifications_missing: 0,
            notifications_repeated: 0,
            deliveries_completed: 0,
            deliveries_unfinished: 0,
            delivery_events_observed: 0,
            delivery_events_expected: 0,
            telemetry_events_observed: 1,
            lost: 0,
            lost_telemetry: 0,
            lost_delivery_events: 0,
            duplicates: 0,
            duration_s: 1.0,
            warmup_s: 0.0,
            throughput_eps: 1.0,
            target_eps: 1.0,
            latency_us: Percentiles::default(),
            telemetry_latency_us: Percentiles::default(),
            send_lag_us: Percentiles::default(),
            server_memory: None,
            curves: Curves { delivery_events: delivery, ..Curves::default() },
            rejections: BTreeMap::new(),
            mode: "full",
            transport: "quic",
            telemetry_check: TelemetryCheck::During,
            drones: 1,
            connections: 1,
            readers: Vec::new(),
            delivery_readers: None,
            server_rss_peak_bytes: None,
            timeline: Vec::new(),
        }
    }

    #[test]
    fn the_report_prints_what_a_reader_needs() {
        let text = report_with(Vec::new()).to_string();
        for needle in ["lost", "duplicates", "throughput", "send lag", "read during the run"] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }

    #[test]
    fn the_report_ends_with_ok_or_what_was_broken() {
        let clean = report_with(Vec::new());
        assert!(clean.to_string().ends_with("result      OK"), "{clean}");
        let broken = Report { lost: 3, deliveries_refused: 2, deliveries_unfinished: 1, ..report_with(Vec::new()) };
        let text = broken.to_string();
        let last = text.lines().last().unwrap_or_default();
        assert!(last.starts_with("result      FAILED"), "{text}");
        for needle in ["3 acknowledged events never received", "2 orders refused", "1 deliveries still in flight"] {
            assert!(last.contains(needle), "{needle}: {last}");
        }
        let raw = Report { mode: "raw", lost: 5, ..report_with(Vec::new()) };
        assert!(raw.verdict().is_ok(), "a raw run measures no loss");
    }

    #[test]
    fn a_raw_run_that_carried_its_offer_is_no_ceiling() {
        let raw =
            |target_eps, throughput_eps| Report { mode: "raw", target_eps, throughput_eps, ..report_with(Vec::new()) };
        assert!(raw(3_200_000.0, 3_110_000.0).capped().is_some_and(|c| c.starts_with("capped: not a ceiling")));
        assert_eq!(raw(8_000_000.0, 6_110_000.0).capped(), None, "it fell short of its offer: a ceiling");
        assert_eq!(raw(0.0, 6_110_000.0).capped(), None, "sent as fast as taken: a ceiling");
    }
}
