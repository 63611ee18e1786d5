//! TLS to NATS (`[jetstream.tls]`): against a `nats-server` this test starts with a
//! certificate from `pipeline certs init`, a node's connection verifies the server against the
//! configured CA (and fails without it), presents its client certificate where the server
//! verifies clients (and fails without one), and refuses a server without TLS when TLS is
//! required.
//!
//! Needs the `nats-server` binary (`FLEETSTREAM_NATS_SERVER`, else on `PATH` or in
//! `/usr/sbin`); without it the test prints SKIP, unless `FLEETSTREAM_REQUIRE_SERVICES=1`,
//! when it fails.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pipeline::jetstream::{JetStreamConfig, NatsTls};

fn nats_server() -> Option<PathBuf> {
    let candidates = std::env::var("FLEETSTREAM_NATS_SERVER")
        .into_iter()
        .map(PathBuf::from)
        .chain(["nats-server", "/usr/sbin/nats-server", "/usr/local/bin/nats-server"].map(PathBuf::from));
    candidates.into_iter().find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(binary: &Path, port: u16, ca: &Path, verify_clients: bool) -> Server {
    let mut cmd = Command::new(binary);
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "--tls"])
        .arg("--tlscert")
        .arg(ca.join("ingest.pem"))
        .arg("--tlskey")
        .arg(ca.join("ingest-key.pem"));
    if verify_clients {
        cmd.arg("--tlsverify").arg("--tlscacert").arg(ca.join("ca.pem"));
    }
    let server = Server(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

fn config(url: String, tls: NatsTls) -> JetStreamConfig {
    JetStreamConfig { url, tls: Some(tls), ..JetStreamConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_nats_verify_the_server_and_present_a_client_certificate() {
    let Some(binary) = nats_server() else {
        let required = std::env::var("FLEETSTREAM_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
        assert!(!required, "nats-server is required (FLEETSTREAM_NATS_SERVER, PATH or /usr/sbin) but was not found");
        println!("SKIP connections_to_nats_verify_the_server: no nats-server binary");
        return;
    };
    let dir = std::env::temp_dir().join(format!("fleetstream-nats-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = dir.join("ca");
    services::tls::init_ca(&ca, &[], services::tls::Validity::default()).unwrap();
    let trusting = NatsTls { required: true, ca: Some(ca.join("ca.pem")), cert: None, key: None };

    // Server TLS: verified against the CA, refused without it.
    let port = common::free_tcp_port();
    let server = start(&binary, port, &ca, false);
    let url = format!("nats://127.0.0.1:{port}");
    let client = pipeline::jetstream::connect(&config(url.clone(), trusting.clone())).await.unwrap();
    client.publish("fleetstream.tls.check", "ok".into()).await.unwrap();
    client.flush().await.unwrap();
    let untrusting = NatsTls { required: true, ca: None, cert: None, key: None };
    assert!(pipeline::jetstream::connect(&config(url.clone(), untrusting)).await.is_err(), "an unknown CA");
    drop(server);

    // Mutual TLS: the node's certificate gets in, none does not.
    let port = common::free_tcp_port();
    let _server = start(&binary, port, &ca, true);
    let url = format!("nats://127.0.0.1:{port}");
    let with_cert =
        NatsTls { cert: Some(ca.join("ingest.pem")), key: Some(ca.join("ingest-key.pem")), ..trusting.clone() };
    let client = pipeline::jetstream::connect(&config(url.clone(), with_cert)).await.unwrap();
    client.flush().await.unwrap();
    assert!(pipeline::jetstream::connect(&config(url, trusting.clone())).await.is_err(), "no client certificate");

    // TLS required, a server without it: refused.
    if let Some((_, plain)) = common::nats("connections_to_nats_verify_the_server").await {
        assert!(pipeline::jetstream::connect(&config(plain, trusting)).await.is_err(), "a server without TLS");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
