//! What several integration tests share: a loopback node's config, finding the NATS server
//! they need, a scripted drone flight, drones reporting in, `pipeline serve` as a child
//! process, and a stand-in SMS gateway.

#![allow(dead_code)] // each test crate uses part of it

/// A fresh data directory for `tag` and a loopback config over it (any free ports, 2 shards).
pub fn loopback_config(tag: &str) -> (std::path::PathBuf, pipeline::Config) {
    let dir = std::env::temp_dir().join(format!("fleetstream-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = pipeline::Config { data_dir: dir.clone(), ..pipeline::Config::default() };
    cfg.ingest.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.engine.shards = 2;
    (dir, cfg)
}

/// The NATS server at `FLEETSTREAM_NATS_URL` (default `nats://127.0.0.1:4222`) and its URL.
/// Without one: prints a SKIP line naming `test` and returns `None`, unless
/// `FLEETSTREAM_REQUIRE_SERVICES=1`, when it fails the test.
pub async fn nats(test: &str) -> Option<(async_nats::Client, String)> {
    let url = std::env::var("FLEETSTREAM_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    match async_nats::connect(&url).await {
        Ok(client) => Some((client, url)),
        Err(error) => {
            assert!(
                std::env::var("FLEETSTREAM_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "NATS at {url} is required (FLEETSTREAM_REQUIRE_SERVICES=1): {error}"
            );
            println!("SKIP {test}: no NATS at {url}: {error}");
            None
        }
    }
}

/// The PostgreSQL URL tests use (`FLEETSTREAM_PG_URL`, default the local standard port,
/// database `test`) when a server answers there; else `None` after printing SKIP for `test`,
/// or a failure when `FLEETSTREAM_REQUIRE_SERVICES=1`.
pub async fn postgres(test: &str) -> Option<String> {
    let pg = std::env::var("FLEETSTREAM_PG_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into());
    let probe = pg.clone();
    let reachable =
        tokio::task::spawn_blocking(move || postgres::Client::connect(&probe, postgres::NoTls).map(drop)).await;
    match reachable {
        Ok(Ok(())) => Some(pg),
        Ok(Err(error)) => {
            assert!(
                std::env::var("FLEETSTREAM_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "PostgreSQL at {pg} is required (FLEETSTREAM_REQUIRE_SERVICES=1): {error}"
            );
            println!("SKIP {test}: no PostgreSQL at {pg}: {error}");
            None
        }
        Err(error) => panic!("probing PostgreSQL: {error}"),
    }
}

use events::{DroneEvent, DroneEventKind, FlightStatus, GeoPoint};

/// The sequence number at which a scripted drone picks its package up.
pub const PICKUP_AT: u64 = 100;
/// ... and drops it off.
pub const DROPOFF_AT: u64 = 200;

/// Event `seq` of a scripted flight of `drone` for `delivery`: idle until 50, flying from 50,
/// pickup at [`PICKUP_AT`], drop-off at `dropoff` at [`DROPOFF_AT`]. Its time is derived from
/// the drone and the sequence, so runs can compare derived events exactly.
pub fn drone_event(drone: u64, seq: u64, delivery: u64, dropoff: GeoPoint) -> DroneEvent {
    let (status, kind, at) = match seq {
        s if s < 50 => (FlightStatus::Idle, DroneEventKind::Position, GeoPoint::new(47.6, -122.3)),
        50 => (
            FlightStatus::Flying,
            DroneEventKind::StatusChanged { from: FlightStatus::Idle },
            GeoPoint::new(47.6, -122.3),
        ),
        PICKUP_AT => (FlightStatus::Flying, DroneEventKind::PickedUp { delivery }, GeoPoint::new(47.6, -122.3)),
        DROPOFF_AT => (FlightStatus::Flying, DroneEventKind::DroppedOff { delivery }, dropoff),
        _ => (FlightStatus::Flying, DroneEventKind::Position, GeoPoint::new(47.61, -122.31)),
    };
    DroneEvent {
        drone_id: drone,
        seq,
        ts_us: 1_000_000 * drone + seq,
        position: at,
        speed_mps: 10.0,
        heading_deg: 0.0,
        battery_pct: 80.0,
        status,
        kind,
    }
}

/// A QUIC client of `node`, trusting its certificate.
pub async fn quic_client(node: &pipeline::Node) -> ingest::IngestClient {
    let trust = ingest::Trust::Pem(node.certificate_pem.clone());
    ingest::IngestClient::connect(node.quic_addr, &ingest::ClientConfig::new(trust)).await.unwrap()
}

/// Drones report in before they are registered: one position event each (seq 0, created now,
/// idle at the scripted pickup, fully charged) over QUIC to `quic`, acknowledged, then waits
/// until the node at `api` shows each one's live state. Drone Management assigns only drones
/// it has heard from recently, so tests that schedule deliveries start with this.
pub async fn report_in(quic: std::net::SocketAddr, pem: &str, api: &str, drones: &[u64]) {
    report_in_at(quic, pem, api, drones, 0).await;
}

/// [`report_in`] with event sequence number `seq` (above what the drones sent so far, for a
/// drone that already flew).
pub async fn report_in_at(quic: std::net::SocketAddr, pem: &str, api: &str, drones: &[u64], seq: u64) {
    report_in_as(quic, pem, api, drones, seq, None).await;
}

/// [`report_in_at`], looking at the drones with API key `key` (an admin's).
pub async fn report_in_as(
    quic: std::net::SocketAddr,
    pem: &str,
    api: &str,
    drones: &[u64],
    seq: u64,
    key: Option<&str>,
) {
    use events::wire::Buffer;
    use events::{BatchMeta, TelemetryBatch};
    let client = ingest::IngestClient::connect(quic, &ingest::ClientConfig::new(ingest::Trust::Pem(pem.to_string())))
        .await
        .expect("connecting to report in");
    let (mut lane, mut answers) = client.open_lane().await.expect("a lane to report in on");
    let events: Vec<DroneEvent> = drones
        .iter()
        .map(|&drone_id| DroneEvent {
            drone_id,
            seq,
            ts_us: events::now_us(),
            position: GeoPoint::new(47.6, -122.3),
            speed_mps: 0.0,
            heading_deg: 0.0,
            battery_pct: 100.0,
            status: FlightStatus::Idle,
            kind: DroneEventKind::Position,
        })
        .collect();
    // A producer id of its own, so its batch never meets a test producer's in dedup.
    let meta = BatchMeta { producer_id: u64::MAX - 7, batch_seq: events::now_us(), ..BatchMeta::default() };
    let batch = TelemetryBatch::encode(meta, &events, Buffer::new()).expect("encoding the report-in batch");
    lane.send(batch.as_bytes()).await.expect("sending the report-in batch");
    let answer = answers.recv().await.expect("an answer to the report-in batch");
    assert!(answer.result.is_ok(), "report-in refused: {:?}", answer.result);
    client.close().await;
    let web = services::tls::plain_client().expect("an HTTP client");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for &drone in drones {
        loop {
            let mut req = web.get(format!("{api}/v1/drones/{drone}"));
            if let Some(key) = key {
                req = req.bearer_auth(key);
            }
            let state: serde_json::Value = req.send().await.unwrap().json().await.unwrap_or_default();
            if state["last_seq"].as_u64().is_some_and(|s| s >= seq) && state["updated_us"].is_u64() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "drone {drone} never showed its report-in: {state}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// A UDP port free right now on loopback.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A TCP port free right now on loopback.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `pipeline serve` (2 shards) on `dir` at the given ports with `env` set, and waits
/// until it serves.
pub fn spawn_serve(dir: &std::path::Path, quic: u16, http: u16, env: &[(&str, &str)]) -> std::process::Child {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["serve", "--shards", "2"])
        .args(["--quic", &format!("127.0.0.1:{quic}"), "--http", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_serving(&mut child, None);
    child
}

/// Waits until `child` says it serves, reading its log; each line is echoed tagged with `tag`
/// when given.
fn wait_serving(child: &mut std::process::Child, tag: Option<String>) {
    use std::io::BufRead;
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("fleetstream serving:") {
                let _ = tx.send(());
            }
            if let Some(tag) = &tag {
                eprintln!("[{tag}] {line}");
            }
        }
    });
    rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the server starts");
}

/// A `pipeline serve` node on JetStream, started by [`spawn_cluster_node`].
pub struct ClusterNode {
    pub child: std::process::Child,
    pub quic: std::net::SocketAddr,
    pub api: String,
    pub pem: String,
}

/// Starts `pipeline serve` on `dir` with `[log] backend = "jetstream"` at `url` (streams and
/// subjects under `prefix`, lease name `name`, `shards` shards, leases of 1.5 s), `env` set
/// besides; its log lines are echoed tagged with `name`. Waits until it serves.
pub fn spawn_cluster_node(
    dir: &std::path::Path,
    url: &str,
    prefix: &str,
    name: &str,
    shards: u32,
    env: &[(&str, &str)],
) -> ClusterNode {
    let (quic, http) = (free_udp_port(), free_tcp_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["serve", "--shards", &shards.to_string()])
        .args(["--quic", &format!("127.0.0.1:{quic}"), "--http", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(dir)
        .env("FLEETSTREAM_LOG__BACKEND", "jetstream")
        .env("FLEETSTREAM_JETSTREAM__URL", url)
        .env("FLEETSTREAM_JETSTREAM__STREAM_PREFIX", prefix.to_uppercase())
        .env("FLEETSTREAM_JETSTREAM__SUBJECT_PREFIX", prefix.to_lowercase())
        .env("FLEETSTREAM_JETSTREAM__NODE_ID", name)
        .env("FLEETSTREAM_JETSTREAM__LEASE_MS", "1500")
        .env("FLEETSTREAM_ENGINE__CHECKPOINT_INTERVAL_MS", "50")
        .env("RUST_LOG", "warn,pipeline::cluster=info")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_serving(&mut child, Some(name.to_string()));
    let pem = std::fs::read_to_string(dir.join("tls/ingest-cert.pem")).unwrap();
    ClusterNode {
        child,
        quic: format!("127.0.0.1:{quic}").parse().unwrap(),
        api: format!("http://127.0.0.1:{http}"),
        pem,
    }
}

/// SIGKILL, and reap.
pub fn kill9(child: &mut std::process::Child) {
    std::process::Command::new("kill").args(["-KILL", &child.id().to_string()]).status().unwrap();
    child.wait().unwrap();
}

/// A local HTTP server standing in for the SMS gateway: what it is sent, and its address.
pub async fn sms_gateway() -> (tokio::sync::mpsc::Receiver<serde_json::Value>, std::net::SocketAddr) {
    let (got_tx, got) = tokio::sync::mpsc::channel::<serde_json::Value>(64);
    let gateway = axum::Router::new().route(
        "/send",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let got_tx = got_tx.clone();
            async move {
                let _ = got_tx.send(body).await;
                "sent"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, gateway).await });
    (got, addr)
}

/// Deletes every JetStream stream (key-value buckets included) a test made under `prefix`.
pub async fn delete_streams(nats: &async_nats::Client, prefix: &str) {
    use futures_util::StreamExt;
    let js = async_nats::jetstream::new(nats.clone());
    let upper = prefix.to_uppercase();
    let names: Vec<String> = js.stream_names().filter_map(|n| async move { n.ok() }).collect().await;
    for name in names.into_iter().filter(|n| n.starts_with(&upper) || n.starts_with(&format!("KV_{upper}"))) {
        let _ = js.delete_stream(&name).await;
    }
}

/// The MQTT broker at `FLEETSTREAM_MQTT_URL` (default `mqtt://127.0.0.1:1883`) as its URL and
/// `host:port`, when one accepts connections there; else `None` after printing SKIP for `test`,
/// or a failure when `FLEETSTREAM_REQUIRE_SERVICES=1`.
pub async fn mqtt(test: &str) -> Option<(String, String, u16)> {
    let url = std::env::var("FLEETSTREAM_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into());
    let broker = pipeline::mqtt::Broker::parse(&url).unwrap();
    let probe = tokio::net::TcpStream::connect((broker.host.as_str(), broker.port));
    match tokio::time::timeout(std::time::Duration::from_secs(3), probe).await {
        Ok(Ok(_)) => Some((url, broker.host, broker.port)),
        outcome => {
            let error = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_string(),
            };
            assert!(
                std::env::var("FLEETSTREAM_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "an MQTT broker at {url} is required (FLEETSTREAM_REQUIRE_SERVICES=1): {error}"
            );
            println!("SKIP {test}: no MQTT broker at {url}: {error}");
            None
        }
    }
}

/// Waits (up to 15 s) until `GET /v1/deliveries/{id}` at `base` reads `stage`.
pub async fn stage_becomes(http: &reqwest::Client, base: &str, id: u64, stage: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let v: serde_json::Value =
            http.get(format!("{base}/v1/deliveries/{id}")).send().await.unwrap().json().await.unwrap();
        if v["stage"] == stage {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "stage never became {stage}: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The first of `names` installed (on `PATH` or in `/usr/sbin`), for `test`, which needs it to
/// `purpose`; else `None` after printing SKIP, or a failure when
/// `FLEETSTREAM_REQUIRE_SERVICES=1` (`.ci/run` installs the programs its tests need).
pub fn program(test: &str, names: &[&str], purpose: &str) -> Option<std::path::PathBuf> {
    let dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .collect();
    let found = names.iter().flat_map(|n| dirs.iter().map(move |d| d.join(n))).find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("FLEETSTREAM_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "{} is required (FLEETSTREAM_REQUIRE_SERVICES=1) to {purpose}",
            names.join(" or ")
        );
        println!("SKIP {test}: {} is not installed (needed to {purpose})", names.join(" or "));
    }
    found
}

/// What every clean loadgen run shows: each event sent acknowledged and seen once by the
/// subscriber, nothing rejected, lost or duplicated, and every delivery scheduled completed
/// with all its events seen.
pub fn assert_clean_run(report: &loadgen::Report) {
    assert_eq!(report.events_acked, report.events_sent, "{report}");
    assert_eq!(report.events_rejected, 0, "{report}");
    assert_eq!(report.telemetry_events_observed, report.events_acked, "{report}");
    assert_eq!((report.lost, report.duplicates), (0, 0), "{report}");
    assert_eq!(report.deliveries_completed, report.deliveries_scheduled, "{report}");
    assert_eq!(report.delivery_events_observed, report.delivery_events_expected, "{report}");
}

/// Deletes every JetStream stream whose name holds `prefix` (a test's streams and KV buckets).
pub async fn delete_streams_with(nats: &async_nats::Client, prefix: &str) {
    let js = async_nats::jetstream::new(nats.clone());
    let mut names = js.stream_names();
    let mut ours = Vec::new();
    while let Some(Ok(name)) = futures_util::StreamExt::next(&mut names).await {
        if name.contains(prefix) {
            ours.push(name);
        }
    }
    for name in ours {
        let _ = js.delete_stream(&name).await;
    }
}
