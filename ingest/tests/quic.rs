//! The ingest server over real QUIC on loopback, with a recording sink standing in for the
//! engine.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use events::wire::{Buffer, HEADER_LEN};
use events::{
    BatchMeta, BatchSink, DeliveryEvent, DroneEvent, DroneEventKind, Error as WireError, FlightStatus, GeoPoint,
    Overflow, StreamSource, Subscription, TelemetryBatch, Topic,
};
use ingest::proto::STREAM_INGEST;
use ingest::{Answer, ClientConfig, IngestClient, IngestServer, ServerConfig, Trust};
use parking_lot_free::Recorder;
use tokio::sync::{mpsc, oneshot};

mod parking_lot_free {
    use super::*;
    use std::sync::Mutex;

    /// Records every submitted batch and republishes it to telemetry subscribers.
    #[derive(Default)]
    pub struct Recorder {
        pub batches: Mutex<Vec<Arc<TelemetryBatch>>>,
        pub subs: Mutex<Vec<flume::Sender<Arc<TelemetryBatch>>>>,
    }

    impl BatchSink for Recorder {
        type Ack = Ready<Result<(), WireError>>;

        async fn submit(&self, batch: TelemetryBatch) -> Result<Self::Ack, WireError> {
            let batch = Arc::new(batch);
            for s in self.subs.lock().unwrap().iter() {
                let _ = s.try_send(batch.clone());
            }
            self.batches.lock().unwrap().push(batch);
            Ok(ready(Ok(())))
        }
    }

    impl StreamSource for Recorder {
        fn subscribe_telemetry_from(
            &self,
            _: events::StartAt,
        ) -> Result<events::OffsetSubscription<DroneEvent>, WireError> {
            Err(WireError::OffsetUnavailable { requested: 0, first: 0, next: 0 })
        }

        fn subscribe_deliveries_from(
            &self,
            _: events::StartAt,
        ) -> Result<events::OffsetSubscription<DeliveryEvent>, WireError> {
            Err(WireError::OffsetUnavailable { requested: 0, first: 0, next: 0 })
        }

        fn subscribe_telemetry(&self, _: Overflow) -> Result<Subscription<DroneEvent>, WireError> {
            let (tx, rx) = flume::bounded(100);
            self.subs.lock().unwrap().push(tx);
            Ok(Subscription::new(rx, Arc::default()))
        }

        fn subscribe_deliveries(&self, _: Overflow) -> Result<Subscription<DeliveryEvent>, WireError> {
            Err(WireError::ShuttingDown)
        }
    }

    /// No queues here: the queue path is tested against the real engine in the pipeline crate.
    impl events::WorkQueues for Recorder {
        async fn enqueue(&self, _: events::QueueName, _: u64, _: Vec<u8>) -> Result<u64, WireError> {
            Err(WireError::ShuttingDown)
        }

        async fn lease(
            &self,
            _: events::QueueName,
            _: u64,
            _: events::KeyRange,
            _: usize,
            _: std::time::Duration,
        ) -> Result<Vec<events::Leased>, WireError> {
            Err(WireError::ShuttingDown)
        }

        fn settle(&self, _: events::QueueName, id: u64, _: u64, _: events::Verdict) -> Result<(), WireError> {
            Err(WireError::UnknownMessage(id))
        }

        fn release(&self, _: events::QueueName, _: u64) {}

        fn attach(&self, _: events::QueueName, _: events::KeyRange) -> Result<u64, WireError> {
            Ok(1)
        }
    }
}

struct Harness {
    sink: Arc<Recorder>,
    addr: std::net::SocketAddr,
    cfg: ClientConfig,
    metrics: Arc<ingest::IngestMetrics>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(cfg: ServerConfig) -> Harness {
    let server = IngestServer::bind(&ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..cfg }).unwrap();
    let addr = server.local_addr().unwrap();
    let client_cfg = ClientConfig::new(Trust::Pem(server.certificate_pem().to_string()));
    let metrics = server.metrics();
    let sink = Arc::new(Recorder::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let s = sink.clone();
    let task = tokio::spawn(async move {
        server
            .serve(s, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Harness { sink, addr, cfg: client_cfg, metrics, stop: Some(stop), task }
}

impl Harness {
    async fn client(&self) -> IngestClient {
        IngestClient::connect(self.addr, &self.cfg).await.unwrap()
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task).await.unwrap().unwrap();
    }
}

fn event(drone_id: u64, seq: u64) -> DroneEvent {
    DroneEvent {
        drone_id,
        seq,
        ts_us: seq,
        position: GeoPoint::new(47.0, -122.0),
        speed_mps: 1.0,
        heading_deg: 0.0,
        battery_pct: 99.0,
        status: FlightStatus::Idle,
        kind: DroneEventKind::Position,
    }
}

fn frame(batch_seq: u64, n: u64) -> Vec<u8> {
    let events: Vec<_> = (0..n).map(|i| event(1, batch_seq * 1000 + i)).collect();
    let meta = BatchMeta { producer_id: 5, batch_seq, ..BatchMeta::default() };
    TelemetryBatch::encode(meta, &events, Buffer::new()).unwrap().as_bytes().to_vec()
}

async fn answer(rx: &mut mpsc::Receiver<Answer>) -> Answer {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("answer in time").expect("lane open")
}

#[tokio::test]
async fn batches_are_acknowledged_in_order() {
    let h = start(ServerConfig::default()).await;
    let client = h.client().await;
    let (mut lane, mut answers) = client.open_lane().await.unwrap();
    for seq in 0..20 {
        lane.send(&frame(seq, 10)).await.unwrap();
    }
    for seq in 0..20 {
        assert_eq!(answer(&mut answers).await, Answer { batch_seq: seq, events: 10, result: Ok(()) });
    }
    let got: Vec<_> = h.sink.batches.lock().unwrap().iter().map(|b| b.header().meta.batch_seq).collect();
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    assert_eq!(h.metrics.events_accepted.load(Ordering::Relaxed), 200);
    client.close().await;
    h.shutdown().await;
}

/// Connections made with a shared endpoint use one UDP socket, each with its own QUIC
/// connection; closing one leaves the others working.
#[tokio::test]
async fn connections_sharing_an_endpoint_are_answered_separately() {
    let h = start(ServerConfig::default()).await;
    let endpoint = IngestClient::endpoint(h.addr, &h.cfg).unwrap();
    let cfg = ClientConfig { endpoint: Some(endpoint.clone()), ..h.cfg.clone() };
    let a = IngestClient::connect(h.addr, &cfg).await.unwrap();
    let b = IngestClient::connect(h.addr, &cfg).await.unwrap();
    assert_eq!(a.connection().local_ip(), b.connection().local_ip());
    assert_ne!(a.connection().stable_id(), b.connection().stable_id());
    assert_eq!(endpoint.open_connections(), 2);
    let (mut lane_a, mut answers_a) = a.open_lane().await.unwrap();
    lane_a.send(&frame(0, 3)).await.unwrap();
    assert_eq!(answer(&mut answers_a).await, Answer { batch_seq: 0, events: 3, result: Ok(()) });
    a.close().await;
    let (mut lane_b, mut answers_b) = b.open_lane().await.unwrap();
    lane_b.send(&frame(1, 4)).await.unwrap();
    assert_eq!(answer(&mut answers_b).await, Answer { batch_seq: 1, events: 4, result: Ok(()) });
    // The closed connection leaves the endpoint once it has drained; the other stays.
    let waited = std::time::Instant::now();
    while endpoint.open_connections() > 1 && waited.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(endpoint.open_connections(), 1, "only the closed connection went away");
    b.close().await;
    h.shutdown().await;
}

/// With several sockets on one address the kernel spreads clients over them; each client's
/// connection stays on its socket's endpoint and is answered there.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_spread_over_several_sockets_on_one_address() {
    let server =
        IngestServer::bind(&ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), sockets: 2, ..Default::default() })
            .unwrap();
    let endpoints: Vec<_> = server.endpoints().to_vec();
    assert_eq!(endpoints.len(), 2);
    let addr = server.local_addr().unwrap();
    assert_eq!(endpoints[1].local_addr().unwrap(), addr, "both sockets listen on the one address");
    let cfg = ClientConfig::new(Trust::Pem(server.certificate_pem().to_string()));
    let sink = Arc::new(Recorder::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(sink.clone(), async {
        let _ = stopped.await;
    }));
    // 16 clients, each from a socket of its own: all land on one of two sockets only with
    // probability 2^-15.
    let mut clients = Vec::new();
    for seq in 0..16u64 {
        let client = IngestClient::connect(addr, &cfg).await.unwrap();
        let (mut lane, mut answers) = client.open_lane().await.unwrap();
        lane.send(&frame(seq, 2)).await.unwrap();
        assert_eq!(answer(&mut answers).await, Answer { batch_seq: seq, events: 2, result: Ok(()) });
        clients.push(client);
    }
    let per_socket: Vec<_> = endpoints.iter().map(quinn::Endpoint::open_connections).collect();
    assert_eq!(per_socket.iter().sum::<usize>(), 16, "{per_socket:?}");
    assert!(per_socket.iter().all(|&n| n > 0), "every socket took clients: {per_socket:?}");
    assert_eq!(sink.batches.lock().unwrap().len(), 16);
    for client in clients {
        client.close().await;
    }
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn a_corrupt_batch_is_rejected_and_the_stream_goes_on() {
    let h = start(ServerConfig::default()).await;
    let client = h.client().await;
    let (mut lane, mut answers) = client.open_lane().await.unwrap();
    let mut bad = frame(1, 5);
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    lane.send(&frame(0, 5)).await.unwrap();
    lane.send(&bad).await.unwrap();
    lane.send(&frame(2, 5)).await.unwrap();
    assert!(answer(&mut answers).await.result.is_ok());
    let rejected = answer(&mut answers).await;
    assert_eq!(rejected.batch_seq, 1);
    let err = rejected.result.unwrap_err();
    assert_eq!(err.name(), "checksum_mismatch", "{err}");
    assert!(err.to_string().contains("checksum mismatch"), "the reason travels: {err}");
    assert_eq!(answer(&mut answers).await, Answer { batch_seq: 2, events: 5, result: Ok(()) });
    assert_eq!(h.metrics.rejected_with(10), 1);
    client.close().await;
    h.shutdown().await;
}

/// Garbage, an unknown version, half a batch and an oversize batch each get a typed rejection,
/// are counted, and never disturb a healthy stream on the same connection or on another one.
#[tokio::test]
async fn bad_input_is_rejected_while_others_keep_working() {
    let h = start(ServerConfig { max_body_bytes: 4096, ..ServerConfig::default() }).await;
    let healthy = h.client().await;
    let (mut good_lane, mut good_answers) = healthy.open_lane().await.unwrap();
    let attacker = h.client().await;

    let mut garbage = vec![0xA5u8; 200];
    garbage[..4].copy_from_slice(b"JUNK");
    let mut future_version = frame(3, 2);
    future_version[4] = 42;
    let half = frame(4, 20);
    let half = half[..half.len() / 2].to_vec();
    let oversize = frame(5, 200);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (garbage, "bad_magic"),
        (future_version, "unsupported_version"),
        (half, "truncated"),
        (oversize, "too_large"),
    ];
    for (seq, (bytes, expected)) in (100..).zip(cases) {
        let (mut lane, mut answers) = attacker.open_lane().await.unwrap();
        lane.send(&bytes).await.unwrap();
        lane.finish();
        let a = answer(&mut answers).await;
        let err = a.result.expect_err("must be rejected");
        assert_eq!(err.name(), expected, "{err}");
        // The healthy stream is unaffected.
        good_lane.send(&frame(seq, 3)).await.unwrap();
        assert_eq!(answer(&mut good_answers).await, Answer { batch_seq: seq, events: 3, result: Ok(()) });
    }
    assert_eq!(h.metrics.rejected_total(), 4);
    assert_eq!(h.metrics.batches_accepted.load(Ordering::Relaxed), 4);

    // A stream of an unknown kind is refused without harming the connection.
    let (mut send, _recv) = attacker.connection().open_bi().await.unwrap();
    send.write_all(&[99]).await.unwrap();
    let (mut lane, mut answers) = attacker.open_lane().await.unwrap();
    lane.send(&frame(7, 1)).await.unwrap();
    assert!(answer(&mut answers).await.result.is_ok());

    // The raw protocol: after a header the server cannot trust, it stops reading the stream.
    let (mut send, mut recv) = attacker.connection().open_bi().await.unwrap();
    send.write_all(&[STREAM_INGEST]).await.unwrap();
    send.write_all(&[0u8; HEADER_LEN]).await.unwrap();
    let mut fixed = [0u8; ingest::proto::RESPONSE_LEN];
    recv.read_exact(&mut fixed).await.unwrap();
    let (_, code, _, _) = ingest::proto::Response::decode_fixed(&fixed);
    assert_eq!(code, WireError::BadMagic { found: [0; 4] }.code());

    healthy.close().await;
    attacker.close().await;
    h.shutdown().await;
}

#[tokio::test]
async fn subscribers_receive_accepted_batches() {
    let h = start(ServerConfig::default()).await;
    let client = h.client().await;
    let mut sub = client.subscribe::<DroneEvent>(Topic::DroneTelemetry).await.unwrap();
    assert_eq!(h.sink.subs.lock().unwrap().len(), 1, "subscribe returns once the server registered it");
    let (mut lane, mut answers) = client.open_lane().await.unwrap();
    lane.send(&frame(9, 4)).await.unwrap();
    answer(&mut answers).await.result.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(batch.header().meta.batch_seq, 9);
    assert_eq!(batch.events()[3].seq.to_native(), 9003);
    // The deliveries topic is refused by this sink: the client sees the typed reason.
    let err = tokio::time::timeout(Duration::from_secs(10), client.subscribe::<DeliveryEvent>(Topic::DeliveryEvents))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ingest::Error::Wire(ref e) if e.name() == "shutting_down"), "{err}");
    client.close().await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_certificate_cannot_connect() {
    let h = start(ServerConfig::default()).await;
    let other = ingest::tls::Identity::self_signed().unwrap();
    let cfg = ClientConfig::new(Trust::Pem(other.chain_pem));
    assert!(IngestClient::connect(h.addr, &cfg).await.is_err());
    h.shutdown().await;
}

/// A CA and one certificate it signed, written as PEM files under `dir`.
fn ca_and_client(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut leaf = CertificateParams::new(vec![name.to_string()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &Issuer::new(ca, ca_key)).unwrap();
    let paths = (dir.join("ca.pem"), dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// Whether a batch sent over `cfg` is answered.
async fn accepted(addr: std::net::SocketAddr, cfg: &ClientConfig) -> bool {
    let Ok(client) = IngestClient::connect(addr, cfg).await else { return false };
    let Ok((mut lane, mut answers)) = client.open_lane().await else { return false };
    if lane.send(&frame(0, 3)).await.is_err() {
        return false;
    }
    matches!(tokio::time::timeout(Duration::from_secs(5), answers.recv()).await, Ok(Some(a)) if a.result.is_ok())
}

#[tokio::test]
async fn with_client_ca_set_only_clients_with_a_certificate_it_signed_get_in() {
    let dir = std::env::temp_dir().join(format!("fleetstream-quic-mtls-{}", std::process::id()));
    let (ca, _, _) = ca_and_client(&dir.join("ours"), "drone-gateway");
    let (_, foreign_cert, foreign_key) = ca_and_client(&dir.join("theirs"), "drone-gateway");
    let h = start(ServerConfig { client_ca: Some(ca), ..ServerConfig::default() }).await;

    let ours = dir.join("ours");
    let with_cert = ClientConfig {
        identity: Some((ours.join("drone-gateway.pem"), ours.join("drone-gateway-key.pem"))),
        ..h.cfg.clone()
    };
    assert!(accepted(h.addr, &with_cert).await, "a certificate from the CA is let in");
    assert!(!accepted(h.addr, &h.cfg).await, "no certificate: refused");
    let foreign = ClientConfig { identity: Some((foreign_cert, foreign_key)), ..h.cfg.clone() };
    assert!(!accepted(h.addr, &foreign).await, "a certificate from another CA: refused");
    assert_eq!(h.sink.batches.lock().unwrap().len(), 1, "only the authenticated client's batch arrived");
    assert_eq!(h.metrics.handshakes_failed.load(Ordering::Relaxed), 2, "both refusals are counted");
    h.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
