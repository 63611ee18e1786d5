//! `loadgen`: simulate a fleet against a running `pipeline serve` and report what arrived.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ingest::Trust;
use loadgen::{LoadConfig, Progress};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Simulates a drone fleet and its customers against a fleetstream pipeline, and measures
/// throughput, loss, duplicates and end-to-end latency from what a subscriber receives.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The pipeline's QUIC ingest address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: SocketAddr,
    /// Base URL of the pipeline's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// PEM certificate to trust for QUIC (`pipeline serve` writes its self-signed one to
    /// DATA_DIR/tls/ingest-cert.pem).
    #[arg(long, default_value = "data/tls/ingest-cert.pem", conflicts_with = "insecure")]
    ca: PathBuf,
    /// Skip certificate verification (loopback testing only).
    #[arg(long)]
    insecure: bool,
    /// Simulated drones.
    #[arg(long, default_value_t = 1_000)]
    drones: usize,
    /// Telemetry events per second for the whole fleet [default: 10 per drone]; 0 sends as fast
    /// as the server takes them (to measure a ceiling).
    #[arg(long)]
    rate: Option<f64>,
    /// Send telemetry over MQTT to this broker (`mqtt://host[:port]`) instead of QUIC, as
    /// gateways in front of the node's MQTT bridge (`[mqtt] url`) would: each batch one QoS 1
    /// message, a JSON array, on `<--mqtt-prefix>/gw-<connection>`. Missions come over each
    /// connection's QUIC session unless --mqtt-missions.
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,
    /// Send telemetry as `POST /v1/telemetry` (JSON arrays, one request per batch, in order per
    /// connection) to --api instead of QUIC. Missions still come over QUIC.
    #[arg(long, conflicts_with = "mqtt")]
    http_telemetry: bool,
    /// With --mqtt: take missions over MQTT too, on `fleetstream/missions/{drone_id}`, answered
    /// on `.../ack` (the node's `[mqtt] missions` must name the fleet's drones, e.g. "all").
    #[arg(long, requires = "mqtt")]
    mqtt_missions: bool,
    /// Topic prefix for --mqtt (the node subscribes to `fleetstream/telemetry/+` by default).
    #[arg(long, default_value = "fleetstream/telemetry", requires = "mqtt")]
    mqtt_prefix: String,
    /// QUIC connections to spread the fleet over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds of telemetry.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Most events per batch.
    #[arg(long, default_value_t = 1_024)]
    batch: usize,
    /// Seconds at the start of the run whose events are sent and checked for loss but not
    /// timed, so the latency figures describe the steady state (part of --duration).
    #[arg(long, default_value_t = 0.0)]
    warmup_s: f64,
    /// Record the run over time: for each stretch of this many seconds, the acknowledged rate,
    /// latency percentiles and the server's and loadgen's memory (printed, and `timeline` in
    /// the JSON report), to see whether a long run drifts.
    #[arg(long, value_name = "SECONDS")]
    timeline_s: Option<f64>,
    /// Milliseconds an event may wait for its batch to fill.
    #[arg(long, default_value_t = 5.0)]
    linger_ms: f64,
    /// Deliveries scheduled per second [default: one per 10 drones].
    #[arg(long)]
    deliveries_per_s: Option<f64>,
    /// Percent of scheduled deliveries a customer cancels within half a leg of ordering.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    cancel_percent: u8,
    /// Percent of scheduled deliveries a customer reschedules (a new drop-off) within half a
    /// leg of ordering.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    reschedule_percent: u8,
    /// Percent of scheduled deliveries a customer subscribes to by SMS right after ordering;
    /// needs --sms-listen, and the node's `[notify] sms_webhook` pointing at it.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100), requires = "sms_listen")]
    notify_percent: u8,
    /// Where to receive the node's SMS posts (`[notify] sms_webhook = "http://ADDR/send"`);
    /// every stage change after a subscription must arrive, repeats are counted.
    #[arg(long, value_name = "ADDR")]
    sms_listen: Option<SocketAddr>,
    /// Seconds per mission leg (to pickup, to drop-off, home).
    #[arg(long, default_value_t = 1.0)]
    leg_s: f64,
    /// First drone id.
    #[arg(long, default_value_t = 1)]
    drone_id_base: u64,
    /// Where the fleet and its orders are, `LAT,LON` [default: Seattle, 47.6062,-122.3321].
    /// Two runs against one deployment farther apart than the node's max_distance_km each fly
    /// only their own deliveries.
    #[arg(long, value_parser = parse_point)]
    center: Option<events::GeoPoint>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// When the subscriber reads telemetry: `during` the run (a live firehose reader beside the
    /// pipeline) or `after` it (held at the run's start offset, read to the end afterwards).
    #[arg(long, value_enum, default_value = "during")]
    telemetry_check: loadgen::TelemetryCheck,
    /// Draw the latency percentile distributions (HDR style) to this SVG file.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Transport only (against `pipeline serve --discard`): no customers, no API, no
    /// subscriber; loss and latency are not measured.
    #[arg(long)]
    raw: bool,
    /// First run raw against this `pipeline serve --discard` address, then the full run
    /// against --server, and report the full throughput as a fraction of the raw one.
    #[arg(long, value_name = "DISCARD_ADDR")]
    compare_raw: Option<SocketAddr>,
    /// Extra telemetry subscribers (each its own connection) that measure what they receive.
    #[arg(long, default_value_t = 0)]
    readers: usize,
    /// Light delivery-event subscribers (60 to a connection) that only count what they receive:
    /// what many concurrent subscribers cost the ingest.
    #[arg(long, default_value_t = 0)]
    delivery_readers: usize,
    /// Seconds the first extra reader stops reading (then it catches up from the log).
    #[arg(long, default_value_t = 0.0)]
    stall_reader_s: f64,
    /// Seconds after the start of sending at which that reader stops.
    #[arg(long, default_value_t = 2.0)]
    stall_reader_after_s: f64,
    /// Scheduling benchmark instead of a fleet: only customers, this many requests in flight,
    /// for --duration seconds; --drones drones are registered so every delivery finds one.
    #[arg(long, value_name = "REQUESTS_IN_FLIGHT")]
    schedule_bench: Option<usize>,
    /// API key for the HTTP API, when the server requires one ([http] api_keys).
    #[arg(long, env = "FLEETSTREAM_API_KEY")]
    api_key: Option<String>,
    /// Split mode: Drone Management's base URL (drones are registered there) [default: --api].
    #[arg(long)]
    drones_api: Option<String>,
    /// Split mode: the Accounts service's base URL (customer accounts are opened there)
    /// [default: --api].
    #[arg(long)]
    accounts_api: Option<String>,
    /// Split mode: a `pipeline certs init` directory; HTTPS trusts its CA and presents its
    /// `client` certificate.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Client certificate (PEM) to present to a QUIC ingest that requires one
    /// (`ingest.client_ca`); needs --client-key.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let trust = if args.insecure {
        Trust::InsecureSkipVerify
    } else {
        let pem = std::fs::read_to_string(&args.ca).with_context(|| {
            format!("reading the server certificate {} (pass --ca FILE, or --insecure on loopback)", args.ca.display())
        })?;
        Trust::Pem(pem)
    };
    let split = loadgen::SplitTargets {
        drones_api: args.drones_api.clone(),
        accounts_api: args.accounts_api.clone(),
        tls_dir: args.tls_dir.clone(),
    };
    if let Some(concurrency) = args.schedule_bench {
        let client = ingest::ClientConfig::new(trust.clone());
        let report = loadgen::schedule::bench(
            &args.api,
            args.server,
            &client,
            args.drones,
            args.drone_id_base,
            Duration::from_secs_f64(args.duration),
            concurrency.max(1),
            args.api_key.as_deref(),
            &split,
        )
        .await?;
        println!("{report}");
        if let Some(path) = &args.report {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(());
    }
    let mut cfg = LoadConfig::new(args.server, args.api.clone(), trust);
    cfg.drones = args.drones;
    cfg.drone_id_base = args.drone_id_base;
    if let Some(center) = args.center {
        cfg.center = center;
    }
    cfg.rate = args.rate.unwrap_or(args.drones as f64 * 10.0);
    cfg.connections = args.connections;
    cfg.duration = Duration::from_secs_f64(args.duration);
    cfg.warmup = Duration::from_secs_f64(args.warmup_s.max(0.0));
    cfg.timeline = args.timeline_s.map(Duration::try_from_secs_f64).transpose().context("--timeline-s")?;
    cfg.batch_max_events = args.batch;
    cfg.linger = Duration::from_secs_f64(args.linger_ms / 1000.0);
    cfg.deliveries_per_s = args.deliveries_per_s.unwrap_or(args.drones as f64 / 10.0);
    cfg.leg = Duration::from_secs_f64(args.leg_s);
    cfg.cancel_percent = args.cancel_percent;
    cfg.notify_percent = args.notify_percent;
    cfg.sms_listen = args.sms_listen;
    cfg.reschedule_percent = args.reschedule_percent.min(100 - args.cancel_percent);
    let offered = if cfg.rate > 0.0 { format!("{:.0} events/s", cfg.rate) } else { "events as fast as taken".into() };
    eprintln!(
        "loadgen: {} drones, {offered} over {} connections for {:.0} s against {} / {}",
        cfg.drones, cfg.connections, args.duration, args.server, args.api
    );
    cfg.raw = args.raw;
    cfg.telemetry_check = args.telemetry_check;
    cfg.readers = args.readers;
    cfg.delivery_readers = args.delivery_readers;
    cfg.api_key = args.api_key.clone();
    cfg.split = split;
    cfg.quic_identity = args.client_cert.clone().zip(args.client_key.clone());
    cfg.http_telemetry = args.http_telemetry;
    cfg.mqtt = args
        .mqtt
        .as_deref()
        .map(|url| loadgen::adapters::MqttTarget::parse(url, &args.mqtt_prefix))
        .transpose()?
        .map(|t| loadgen::adapters::MqttTarget { missions: args.mqtt_missions, ..t });
    cfg.stall_reader = Duration::from_secs_f64(args.stall_reader_s.max(0.0));
    cfg.stall_reader_after = Duration::from_secs_f64(args.stall_reader_after_s.max(0.0));
    let ceiling = match args.compare_raw {
        Some(discard) => {
            let raw = loadgen::LoadConfig { server: discard, raw: true, ..cfg.clone() };
            eprintln!("raw run against the discard server at {discard} (the transport ceiling)");
            let report = loadgen::run(raw, Arc::new(print_progress)).await?;
            eprintln!();
            println!("{report}");
            eprintln!("full run against {}", args.server);
            Some(report)
        }
        None => None,
    };
    let report = loadgen::run(cfg, Arc::new(print_progress)).await?;
    eprintln!();
    println!("{report}");
    if let Some(raw) = &ceiling {
        println!(
            "ceiling     full {:.0} ev/s / raw {:.0} ev/s = {:.1}% of the transport ceiling",
            report.throughput_eps,
            raw.throughput_eps,
            100.0 * report.throughput_eps / raw.throughput_eps.max(1e-9)
        );
        if let Some(capped) = raw.capped() {
            println!("            raw run {capped}");
        }
    }
    if let Some(path) = &args.report {
        let json = match &ceiling {
            Some(raw) => serde_json::to_vec_pretty(&serde_json::json!({
                "full": report,
                "raw": raw,
                "fraction_of_ceiling": report.throughput_eps / raw.throughput_eps.max(1e-9),
                "raw_capped": raw.capped(),
            }))?,
            None => serde_json::to_vec_pretty(&report)?,
        };
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, loadgen::plot::svg(&report)).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("latency plot written to {}", path.display());
    }
    if report.verdict().is_err() {
        std::process::exit(2);
    }
    Ok(())
}

/// One progress line, rewritten in place.
pub fn print_progress(p: &Progress) {
    let mut err = std::io::stderr().lock();
    if p.sent == 0 && p.elapsed_s == 0.0 {
        let _ = write!(err, "\rconnected {} fleet connections   ", p.connected);
        let _ = err.flush();
        return;
    }
    let _ = write!(
        err,
        "\r{:>5.1}s  sent {:>11}  acked {:>11}  {:>9.0} ev/s  rejected {}  deliveries {}/{} done  subscriber {}   ",
        p.elapsed_s, p.sent, p.acked, p.recent_eps, p.rejected, p.completed, p.scheduled, p.observed
    );
    let _ = err.flush();
}

/// `LAT,LON` in degrees.
fn parse_point(text: &str) -> Result<events::GeoPoint, String> {
    let (lat, lon) = text.split_once(',').ok_or("expected LAT,LON")?;
    let lat: f64 = lat.trim().parse().map_err(|e| format!("latitude: {e}"))?;
    let lon: f64 = lon.trim().parse().map_err(|e| format!("longitude: {e}"))?;
    let point = events::GeoPoint::new(lat, lon);
    if !point.is_valid() {
        return Err("latitude must be within -90..90 and longitude within -180..180".into());
    }
    Ok(point)
}
