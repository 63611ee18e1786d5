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
    http: SocketAddr,
    dir: std::path::PathBuf,
    lines: std::sync::mpsc::Receiver<String>,
}

fn spawn_server(tag: &str) -> Server {
    spawn_server_with(tag, &[])
}

fn spawn_server_with(tag: &str, env: &[(&str, &str)]) -> Server {
    let dir = std::env::temp_dir().join(format!("fleetstream-serve-{tag}-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["serve", "--quic", "127.0.0.1:0", "--http", "127.0.0.1:0", "--shards", "2", "--data-dir"])
        .arg(&dir)
        .envs(env.iter().copied())
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
    let http = banner.split("HTTP http://").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    Server { child, quic, http, dir, lines }
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

    // Repair, asked for explicitly: the log is cut at the damage, the cut bytes kept aside.
    let repaired = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["inspect", "--repair", "--data-dir"])
        .arg(&server.dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&repaired.stdout);
    assert!(repaired.status.success(), "{text}");
    assert!(
        text.contains("telemetry log cut at offset 9")
            && text.contains("offsets 9..")
            && text.contains("cut bytes kept in"),
        "{text}"
    );
    assert!(text.contains("verified: 9 records, every CRC matches"), "{text}");
    let side = std::fs::read_dir(server.dir.join("log"))
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().contains(".cut-"))
        .expect("a side file beside the segment");
    assert!(side.metadata().unwrap().len() > 0, "the cut bytes are kept");
    let out = run(&server.dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    // And a node starts on what is left.
    let mut again = spawn_server("inspect");
    Command::new("kill").args(["-TERM", &again.child.id().to_string()]).status().unwrap();
    assert!(again.child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&server.dir);
}

/// Opens an SSE stream and a request whose body never arrives, then signals the server.
async fn lingering_clients(server: &Server) -> (reqwest::Response, tokio::net::TcpStream) {
    let url = format!("http://{}/v1/streams/delivery-events/events?from=earliest", server.http);
    let sse = services::tls::plain_client().unwrap().get(url).send().await.unwrap();
    assert_eq!(sse.status(), 200);
    let mut half = tokio::net::TcpStream::connect(server.http).await.unwrap();
    use tokio::io::AsyncWriteExt;
    half.write_all(b"POST /v1/deliveries HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"owner\"")
        .await
        .unwrap();
    // The server must have begun reading that request before the drain starts (an accepted
    // connection with no request under way is simply closed): give it a moment on a busy machine.
    tokio::time::sleep(Duration::from_millis(300)).await;
    (sse, half)
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn drain_ends_sse_streams_and_gives_up_on_lingering_requests_after_its_timeout() {
    let mut server = spawn_server_with("linger", &[("FLEETSTREAM_HTTP__DRAIN_TIMEOUT_MS", "6000")]);
    let (mut sse, _half) = lingering_clients(&server).await;
    let started = std::time::Instant::now();
    Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    // The SSE stream ends at the start of the drain, long before the drain timeout.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(10), sse.chunk()).await.unwrap() {}
    assert!(started.elapsed() < Duration::from_secs(4), "the SSE stream ended only after {:?}", started.elapsed());
    let status = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut server.child, Duration::from_secs(15));
        (status, server)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{:?}", status.0);
    assert!(started.elapsed() < Duration::from_secs(14), "drain took {:?}", started.elapsed());
    let log: Vec<String> = status.1.lines.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("drain timeout")), "{log:?}");
    assert!(log.iter().any(|l| l.contains("stopped")), "the engine drained: {log:?}");
    let _ = std::fs::remove_dir_all(&status.1.dir);
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut server = spawn_server_with("twice", &[("FLEETSTREAM_HTTP__DRAIN_TIMEOUT_MS", "600000")]);
    let (_sse, _half) = lingering_clients(&server).await;
    let pid = server.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let dir = server.dir.clone();
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut server.child, Duration::from_secs(10))).await.unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A signal the moment the node says it serves (or earlier, while it starts) drains it like
/// any other: an exit status of 0, never death by the signal's default action.
#[tokio::test]
async fn sigterm_right_after_start_drains_instead_of_killing() {
    let mut server = spawn_server("early");
    Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    let dir = server.dir.clone();
    let (status, server) = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut server.child, Duration::from_secs(30));
        (status, server)
    })
    .await
    .unwrap();
    assert!(status.success(), "SIGTERM right after the banner: {status:?}");
    let log: Vec<String> = server.lines.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("stopped")), "the engine drained: {log:?}");
    let _ = std::fs::remove_dir_all(&dir);

    // And while it starts: at its first line of output, before it serves.
    let dir = std::env::temp_dir().join(format!("fleetstream-serve-starting-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["serve", "--quic", "127.0.0.1:0", "--http", "127.0.0.1:0", "--shards", "2", "--data-dir"])
        .arg(&dir)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().expect("the node logs as it starts").unwrap();
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(30))).await.unwrap();
    let log = rest.join().unwrap();
    assert!(status.success(), "SIGTERM after {first:?}: {status:?}\n{log:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
