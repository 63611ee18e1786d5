//! The `pipeline` binary: `serve` runs a node, `demo` runs a node and a simulated fleet in one
//! process and prints what happened.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pipeline::{Config, Node};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// fleetstream: drone telemetry in over QUIC, delivery events out.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: QUIC ingest, engine and HTTP services.
    Serve {
        /// TOML config file (see the `pipeline::config` docs); defaults apply to what it leaves out.
        #[arg(long)]
        config: Option<PathBuf>,
        /// QUIC listen address [config: ingest.listen, default 127.0.0.1:4433].
        #[arg(long)]
        quic: Option<SocketAddr>,
        /// HTTP listen address [config: http.listen, default 127.0.0.1:8080].
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Shard threads, 0 = one per core [config: engine.shards, default 0].
        #[arg(long)]
        shards: Option<usize>,
        /// Data directory [config: data_dir, default ./data].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Transport ceiling: serve QUIC, TLS and validation, then drop every batch (no engine,
        /// no HTTP). Measure it with `loadgen --raw`.
        #[arg(long)]
        discard: bool,
        /// Which part to run: `all` (one process, the default) or one role of a split
        /// deployment: ingest, scheduler, delivery, history, drones, accounts, packages (see
        /// the `[split]` config section).
        #[arg(long, default_value = "all")]
        role: pipeline::roles::Role,
    },
    /// Certificates for split mode.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Print the durable log's segments, offsets, record counts and the shard checkpoints, and
    /// verify every record's CRC. Exits 1 if anything is damaged.
    Inspect {
        /// Data directory [default ./data].
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// Repair damage (with the node stopped): cut each damaged log at its last intact
        /// record, keep every cut byte in a side file beside it, move aside shard checkpoints
        /// that cover cut offsets, and say what was lost. Then inspect again.
        #[arg(long)]
        repair: bool,
    },
    /// Run a node and a simulated fleet in one process on loopback, with a live progress line
    /// and a final summary.
    Demo {
        /// Simulated drones.
        #[arg(long, default_value_t = 1_000)]
        drones: usize,
        /// Seconds of telemetry.
        #[arg(long, default_value_t = 15.0)]
        duration: f64,
        /// Telemetry events per second per drone.
        #[arg(long, default_value_t = 20.0)]
        rate_per_drone: f64,
        /// Write the JSON report here.
        #[arg(long)]
        report: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a private CA and a certificate for every role (server and client), for mutual
    /// TLS between the services.
    Init {
        /// Where to write them [default ./ca, the `[split] tls_dir` default].
        #[arg(long, default_value = "ca")]
        dir: PathBuf,
        /// Extra host names or IP addresses the certificates are valid for (localhost and
        /// 127.0.0.1 always are).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// How long each role's certificate is valid, days (renew with `certs renew`).
        #[arg(long, default_value_t = services::tls::Validity::default().cert_days)]
        days: u32,
        /// How long the CA is valid, days.
        #[arg(long, default_value_t = services::tls::Validity::default().ca_days)]
        ca_days: u32,
    },
    /// Issue every role a new certificate from the existing CA (its ca-key.pem must be in
    /// the directory); restart the roles one at a time to take them up.
    Renew {
        /// The CA's directory.
        #[arg(long, default_value = "ca")]
        dir: PathBuf,
        /// Extra host names or IP addresses, as given to `certs init`.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// How long each new certificate is valid, days.
        #[arg(long, default_value_t = services::tls::Validity::default().cert_days)]
        days: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Demo { .. }) { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        watch_signals();
        match cli.command {
            Command::Certs { command: CertsCommand::Renew { dir, hosts, days } } => {
                let written = services::tls::renew_certs(&dir, &hosts, days)?;
                println!("renewed the certificates of {} roles for {days} days:", services::tls::ROLES.len());
                for path in written {
                    println!("  {}", path.display());
                }
                println!("restart the roles one at a time to take them up");
                Ok(ExitCode::SUCCESS)
            }
            Command::Certs { command: CertsCommand::Init { dir, hosts, days, ca_days } } => {
                let validity = services::tls::Validity { ca_days, cert_days: days };
                let written = services::tls::init_ca(&dir, &hosts, validity)?;
                println!(
                    "wrote a private CA (valid {ca_days} days) and certificates for {} roles (valid {days} days):",
                    services::tls::ROLES.len()
                );
                for path in written {
                    println!("  {}", path.display());
                }
                println!("keep ca-key.pem offline once the certificates are issued");
                Ok(ExitCode::SUCCESS)
            }
            Command::Serve { config, quic, http, shards, data_dir, discard, role } => {
                let mut cfg = match Config::load(config.as_deref()) {
                    Ok(cfg) => cfg,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return Ok(ExitCode::from(2));
                    }
                };
                if let Some(a) = quic {
                    cfg.ingest.listen = a;
                }
                if let Some(a) = http {
                    cfg.http.listen = a;
                }
                if let Some(n) = shards {
                    cfg.engine.shards = n;
                }
                if let Some(d) = data_dir {
                    cfg.data_dir = d;
                }
                if discard {
                    return serve_discard(cfg).await.map(|()| ExitCode::SUCCESS);
                }
                serve(cfg, role).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Inspect { data_dir, repair: true } => {
                repair(&data_dir)?;
                inspect(&data_dir)
            }
            Command::Inspect { data_dir, repair: false } => inspect(&data_dir),
            Command::Demo { drones, duration, rate_per_drone, report } => {
                demo(drones, duration, rate_per_drone, report).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `inspect --repair`: cuts both logs at their first damage (see `pipeline::log::repair`) and
/// moves aside the checkpoints of the telemetry log that cover cut offsets, so the engine
/// replays from what is left. Refuses while a node holds the data dir.
fn repair(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let _held = pipeline::datadir::DataDirLock::acquire(data_dir)?;
    let cfg = Config::load(None).map(|c| c.log).unwrap_or_default();
    let mut telemetry_cut = None;
    for (what, dir) in [("telemetry log", data_dir.join("log")), ("delivery-events log", data_dir.join("deliveries"))] {
        if !dir.is_dir() {
            continue;
        }
        match pipeline::log::repair(&dir, &cfg)? {
            None => println!("repair: {what} has no damage; nothing cut"),
            Some(r) => {
                println!(
                    "repair: {what} cut at offset {} ({}): offsets {}..{} are gone from the log, {} intact records after the damage among them",
                    r.from_offset, r.reason, r.from_offset, r.to_offset, r.intact_records_cut
                );
                for f in &r.side_files {
                    println!("  cut bytes kept in {}", f.display());
                }
                if what == "telemetry log" {
                    telemetry_cut = Some(r.from_offset);
                }
            }
        }
    }
    if let Some(cut) = telemetry_cut {
        let ckpt_dir = data_dir.join("checkpoints");
        for shard in 0u32.. {
            let path = pipeline::checkpoint::path(&ckpt_dir, shard);
            if !path.exists() {
                break;
            }
            let covers_cut = match pipeline::checkpoint::read(&ckpt_dir, shard) {
                Ok(Some(c)) => c.offset >= cut,
                _ => true,
            };
            if covers_cut {
                let aside = path.with_extension(format!("cut-{cut}"));
                std::fs::rename(&path, &aside).with_context(|| format!("moving {} aside", path.display()))?;
                println!("  checkpoint of shard {shard} covered cut offsets: moved to {}", aside.display());
            }
        }
    }
    Ok(())
}

fn inspect(data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let log_dir = data_dir.join("log");
    if !log_dir.is_dir() {
        anyhow::bail!("{} holds no log (expected {})", data_dir.display(), log_dir.display());
    }
    let cfg = Config::load(None).map(|c| c.log).unwrap_or_default();
    let mut damaged = !inspect_log("telemetry log", &log_dir, &cfg)?;
    let deliveries = data_dir.join("deliveries");
    if deliveries.is_dir() {
        damaged |= !inspect_log("delivery-events log", &deliveries, &cfg)?;
    }
    let ckpt_dir = data_dir.join("checkpoints");
    println!("checkpoints {}:", ckpt_dir.display());
    for shard in 0u32.. {
        match pipeline::checkpoint::read(&ckpt_dir, shard) {
            Ok(Some(c)) => {
                let (drones, deliveries) = c.state.sizes();
                println!(
                    "  shard {shard}/{}: covers offsets ..={}  drones {drones}  deliveries in flight {deliveries}",
                    c.shards, c.offset
                );
            }
            Ok(None) => {
                if shard == 0 {
                    println!("  none");
                }
                break;
            }
            Err(e) => {
                println!("  shard {shard}: DAMAGED: {e}");
                damaged = true;
            }
        }
    }
    Ok(if damaged { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Prints one log's segments and verification; false if it is damaged.
fn inspect_log(what: &str, dir: &std::path::Path, cfg: &pipeline::log::LogConfig) -> anyhow::Result<bool> {
    let report = pipeline::log::inspect(dir, cfg)?;
    let total: u64 = report.segments.iter().map(|s| s.bytes).sum();
    let (first, next) = (report.segments.first().map_or(0, |s| s.base), report.segments.last().map_or(0, |s| s.end));
    println!("{what} {}: {} segments, offsets {first}..{next}, {total} bytes", dir.display(), report.segments.len());
    for s in &report.segments {
        let name = s.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        println!(
            "  {name}  offsets {}..{}  records {}  bytes {}  index entries {}",
            s.base,
            s.end,
            s.end - s.base,
            s.bytes,
            s.index_entries
        );
    }
    match &report.damage {
        None => {
            println!("  verified: {} records, every CRC matches", report.readable_records);
            Ok(true)
        }
        Some(d) => {
            let kind = if d.torn_tail {
                "torn final record (a crash mid-append; recovery truncates it, it was never acknowledged)"
            } else {
                "CORRUPT record"
            };
            println!(
                "  DAMAGE: {kind} in {} at byte {} (offset {}): {}",
                d.segment.display(),
                d.position,
                d.offset,
                d.reason
            );
            println!("  {} records before it are intact and readable", report.readable_records);
            Ok(false)
        }
    }
}

async fn serve(mut cfg: Config, role: pipeline::roles::Role) -> anyhow::Result<()> {
    use pipeline::roles::{self, Role};
    match role {
        Role::All | Role::Ingest => {
            if role == Role::Ingest {
                roles::use_ca_certificate_for_quic(&mut cfg);
            }
            let node = Node::start_as(&cfg, role).await.context("starting the node")?;
            let engine_api = match role {
                Role::Ingest => Some(
                    roles::start_engine_api(node.engine.clone(), &node.health, &cfg)
                        .await
                        .context("starting the engine API")?,
                ),
                _ => None,
            };
            let which = if role == Role::All { String::new() } else { format!(" ({})", role.name()) };
            eprintln!(
                "fleetstream serving{which}: QUIC {} (ALPN fleetstream/1), HTTP {}{}  (Ctrl-C to stop)",
                node.quic_addr,
                node.http_url(),
                engine_api.as_ref().map(|a| format!(", engine API {}", a.url)).unwrap_or_default(),
            );
            if cfg.dashboard.enabled {
                eprintln!("live dashboard: {}/", node.http_url());
            }
            shutdown_signal().await;
            eprintln!("draining… (a second signal exits at once)");
            exit_on_second_signal();
            if let Some(api) = engine_api {
                api.shutdown().await.context("stopping the engine API")?;
            }
            node.shutdown().await.context("shutting down")?;
        }
        _ => {
            let process =
                roles::start(role, &cfg).await.with_context(|| format!("starting the {} role", role.name()))?;
            eprintln!("fleetstream serving ({}): HTTP {}  (Ctrl-C to stop)", role.name(), process.url);
            shutdown_signal().await;
            eprintln!("draining… (a second signal exits at once)");
            exit_on_second_signal();
            process.shutdown().await.context("shutting down")?;
        }
    }
    Ok(())
}

async fn serve_discard(cfg: Config) -> anyhow::Result<()> {
    let mut ingest_cfg = cfg.ingest.clone();
    ingest_cfg.self_signed_dir = Some(cfg.data_dir.join("tls"));
    let server = ingest::IngestServer::bind(&ingest_cfg).context("binding the ingest endpoint")?;
    eprintln!(
        "fleetstream serving: QUIC {} (ALPN fleetstream/1) in discard mode: batches are validated and dropped  (Ctrl-C to stop)",
        server.local_addr()?
    );
    let sink = Arc::new(pipeline::discard::Discard::default());
    server.serve(sink.clone(), shutdown_signal()).await?;
    eprintln!(
        "discarded {} batches, {} events",
        sink.batches.load(Ordering::Relaxed),
        sink.events.load(Ordering::Relaxed)
    );
    Ok(())
}

/// After the first signal started a drain, a second one ends the process at once (what was
/// acknowledged is on disk; the next start recovers the rest).
fn exit_on_second_signal() {
    tokio::spawn(async {
        signals_reach(2).await;
        eprintln!("second signal: exiting without finishing the drain");
        std::process::exit(130);
    });
}

/// SIGINT and SIGTERM received so far. The handlers are installed by [`watch_signals`] before
/// anything else starts, so a signal that arrives while the node is still starting (or just
/// after it said it serves) drains it instead of ending the process by the default action.
static SIGNALS: std::sync::OnceLock<tokio::sync::watch::Receiver<u32>> = std::sync::OnceLock::new();

/// Installs the signal handlers and starts counting; call first, inside the runtime.
fn watch_signals() {
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // Registered here, before the node starts: from now on these signals are counted.
        let (term, int) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
        if let (Ok(mut term), Ok(mut int)) = (term, int) {
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                    tx.send_modify(|n| *n += 1);
                }
            });
        }
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            tx.send_modify(|n| *n += 1);
        }
    });
    let _ = SIGNALS.set(rx);
}

/// Resolves once `n` signals have been received since the process started.
async fn signals_reach(n: u32) {
    let Some(rx) = SIGNALS.get() else { return std::future::pending().await };
    let mut rx = rx.clone();
    if rx.wait_for(|count| *count >= n).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn shutdown_signal() {
    signals_reach(1).await;
}

async fn demo(
    drones: usize,
    duration: f64,
    rate_per_drone: f64,
    report_path: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let data_dir = std::env::temp_dir().join(format!("fleetstream-demo-{}", std::process::id()));
    let mut cfg = Config { data_dir: data_dir.clone(), ..Config::default() };
    cfg.ingest.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let node = Node::start(&cfg).await.context("starting the node")?;
    eprintln!(
        "fleetstream demo: {} shards, ingest on {} (QUIC), API on http://{}, live dashboard at http://{}/",
        node.engine.shard_count(),
        node.quic_addr,
        node.http_addr,
        node.http_addr
    );
    let mut load = loadgen::LoadConfig::new(
        node.quic_addr,
        format!("http://{}", node.http_addr),
        ingest::Trust::Pem(node.certificate_pem.clone()),
    );
    load.drones = drones.max(1);
    load.rate = (rate_per_drone * load.drones as f64).max(1.0);
    load.duration = Duration::from_secs_f64(duration.max(1.0));
    load.deliveries_per_s = (load.drones as f64 / 10.0).max(1.0);
    eprintln!(
        "simulating {} drones at {:.0} events/s for {:.0} s, customers scheduling {:.0} deliveries/s",
        load.drones,
        load.rate,
        load.duration.as_secs_f64(),
        load.deliveries_per_s
    );
    let outcome = tokio::select! {
        r = loadgen::run(load, Arc::new(print_progress)) => Some(r),
        () = shutdown_signal() => None,
    };
    eprintln!();
    let m = node.engine.metrics();
    let (applied, derived) = (m.applied.load(Ordering::Relaxed), m.derived.load(Ordering::Relaxed));
    let rejected = node.ingest_metrics.rejected_total();
    let commands = node.engine.queues().get(events::QueueName::DroneCommands);
    let (missions_acked, missions_redelivered, (_, _, missions_dead)) = (
        commands.metrics().acked.load(Ordering::Relaxed),
        commands.metrics().redelivered.load(Ordering::Relaxed),
        commands.counts(),
    );
    node.shutdown().await.context("shutting down")?;
    let _ = std::fs::remove_dir_all(&data_dir);
    let Some(report) = outcome else {
        eprintln!("interrupted; node drained and stopped");
        return Ok(ExitCode::from(130));
    };
    let report = report?;
    println!("{report}");
    println!(
        "engine      applied {applied} drone events, derived {derived} delivery events, rejected {rejected} batches"
    );
    println!(
        "missions    {missions_acked} acked by their drones over QUIC (drone-commands), {missions_redelivered} redelivered, {missions_dead} dead-lettered"
    );
    if let Some(path) = report_path {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report      {}", path.display());
    }
    let ok = report.verdict().is_ok() && report.deliveries_completed > 0;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

fn print_progress(p: &loadgen::Progress) {
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r{:>5.1}s  acked {:>10}  {:>8.0} ev/s  deliveries {:>5}/{:<5} done  subscriber saw {:>10}   ",
        p.elapsed_s, p.acked, p.recent_eps, p.completed, p.scheduled, p.observed
    );
    let _ = err.flush();
}
