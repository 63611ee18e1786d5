//! `pipeline serve` as a real child process: it reports where it listens, serves, and on
//! SIGTERM answers every batch it took before exiting cleanly.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use events::wire::Buffer;
use events::{BatchMeta, DroneEvent, DroneEventKind, FlightStatus, GeoPoint, TelemetryBatch};
use ingest::{ClientConfig, IngestClient, Trust};

struct Server {
    child: Child,
    quic: SocketAddr,
    dir: std::path::PathBuf,
    lines: std::sync::mpsc::Receiver<String>,
}

fn spawn_server(tag: &str) -> Server {
    let dir = std::env::temp_dir().join(format!("fleetstream-serve-{tag}-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["serve", "--quic", "127.0.0.1:0", "--http", "127.0.0.1:0", "--shards", "2", "--data-dir"])
        .arg(&dir)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let banner = loop {
        let line = lines.recv_timeout(Duration::from_secs(30)).expect("the server prints its addresses");
        if line.starts_with("fleetstream serving:") {
            break line;
        }
    };
    let quic = banner.split("QUIC ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    Server { child, quic, dir, lines }
}

fn frame(seq: u64) -> Vec<u8> {
    let events: Vec<_> = (0..50)
        .map(|i| DroneEvent {
            drone_id: i,
            seq: seq + 1,
            ts_us: 1,
            position: GeoPoint::new(47.0, -122.0),
            speed_mps: 0.0,
            heading_deg: 0.0,
            battery_pct: 50.0,
            status: FlightStatus::Idle,
            kind: DroneEventKind::Position,
        })
        .collect();
    let meta = BatchMeta { producer_id: 1, batch_seq: seq, ..BatchMeta::default() };
    TelemetryBatch::encode(meta, &events, Buffer::new()).unwrap().as_bytes().to_vec()
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let mut server = spawn_server("drain");
    let pem = std::fs::read_to_string(server.dir.join("tls/ingest-cert.pem")).unwrap();
    let client = IngestClient::connect(server.quic, &ClientConfig::new(Trust::Pem(pem))).await.unwrap();
    let (mut lane, mut answers) = client.open_lane().await.unwrap();
    for seq in 0..100 {
        lane.send(&frame(seq)).await.unwrap();
    }
    for seq in 0..100 {
        assert_eq!(answers.recv().await.unwrap().batch_seq, seq);
    }
    // More batches, and SIGTERM while they are in flight.
    for seq in 100..200 {
        lane.send(&frame(seq)).await.unwrap();
    }
    let status = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut next = 100;
    while let Ok(Some(a)) = tokio::time::timeout(Duration::from_secs(15), answers.recv()).await {
        assert_eq!(a.batch_seq, next, "answers stay in order through the drain");
        if let Err(e) = a.result {
            assert_eq!(e.name(), "shutting_down", "only a typed shutdown refusal is allowed");
        }
        next += 1;
    }
    let exit = tokio::task::spawn_blocking(move || server.child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "clean exit after draining: {exit:?}");
    let log: Vec<String> = server.lines.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("stopped")), "{log:?}");
    let _ = std::fs::remove_dir_all(&server.dir);
}

#[test]
fn a_bad_config_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["serve", "--config", "/nonexistent/fleetstream.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/fleetstream.toml") && err.contains("does not exist"), "{err}");
}

#[tokio::test]
async fn inspect_verifies_the_log_and_finds_corruption() {
    let mut server = spawn_server("inspect");
    let pem = std::fs::read_to_string(server.dir.join("tls/ingest-cert.pem")).unwrap();
    let client = IngestClient::connect(server.quic, &ClientConfig::new(Trust::Pem(pem))).await.unwrap();
    let (mut lane, mut answers) = client.open_lane().await.unwrap();
    for seq in 0..30 {
        lane.send(&frame(seq)).await.unwrap();
    }
    for _ in 0..30 {
        assert!(answers.recv().await.unwrap().result.is_ok());
    }
    client.close().await;
    Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(server.child.wait().unwrap().success());

    let run = |dir: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_pipeline")).arg("inspect").arg("--data-dir").arg(dir).output().unwrap()
    };
    let out = run(&server.dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("telemetry log") && text.contains("offsets 0..30") && text.contains("verified: 30 records"),
        "{text}"
    );
    assert!(text.contains("delivery-events log"), "{text}");
    assert!(text.contains("shard 0/2: covers offsets ..=29"), "{text}");

    // Flip one byte inside the tenth record's payload.
    let seg = server.dir.join("log/00000000000000000000.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    let record = bytes.len() / 30;
    bytes[record * 9 + record / 2] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    let out = run(&server.dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("CORRUPT record") && text.contains("(offset 9)") && text.contains("checksum mismatch"),
        "{text}"
    );
    assert!(text.contains("9 records before it are intact"), "{text}");
    let _ = std::fs::remove_dir_all(&server.dir);
}
