//! A drone (or gateway) connected to a `pipeline serve` that is SIGKILLed and restarted on its
//! data directory learns at its next packet that its connection is gone: the restarted server
//! recognises the connection ids its previous run handed out (their keys are kept in
//! `DATA_DIR/tls/quic-endpoint.key`) and answers with a stateless reset the client can verify.
//! Without it the client would keep sending into a connection nobody holds until its idle
//! timeout (30 s), its telemetry and missions stalled all that time.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use events::wire::Buffer;
use events::{BatchMeta, GeoPoint, TelemetryBatch};

fn batch(seq: u64) -> Buffer {
    let events = [common::drone_event(7, seq, 1, GeoPoint::new(47.6, -122.3))];
    let meta = BatchMeta { producer_id: 4242, batch_seq: seq, ..BatchMeta::default() };
    TelemetryBatch::encode(meta, &events, Buffer::new()).unwrap().into_buffer()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_killed_server_is_reset_by_the_restarted_one() {
    let dir = std::env::temp_dir().join(format!("fleetstream-quic-reset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (quic_port, http_port) = (common::free_udp_port(), common::free_tcp_port());
    let mut server = common::spawn_serve(&dir, quic_port, http_port, &[]);
    let addr: SocketAddr = format!("127.0.0.1:{quic_port}").parse().unwrap();
    let pem = std::fs::read_to_string(dir.join("tls/ingest-cert.pem")).unwrap();
    let client =
        ingest::IngestClient::connect(addr, &ingest::ClientConfig::new(ingest::Trust::Pem(pem))).await.unwrap();
    let (mut lane, mut answers) = client.open_lane().await.unwrap();
    lane.send(batch(1).as_slice()).await.unwrap();
    assert!(answers.recv().await.unwrap().result.is_ok());

    common::kill9(&mut server);
    let mut server = common::spawn_serve(&dir, quic_port, http_port, &[]);
    // The client carries on on its old connection; the new server resets it.
    let _ = lane.send(batch(2).as_slice()).await;
    let reason = tokio::time::timeout(Duration::from_secs(20), client.connection().closed())
        .await
        .expect("the connection ends long before its 30 s idle timeout");
    assert!(format!("{reason:?}").contains("Reset"), "ended by a stateless reset, not {reason:?}");

    common::kill9(&mut server);
    let _ = std::fs::remove_dir_all(&dir);
}
