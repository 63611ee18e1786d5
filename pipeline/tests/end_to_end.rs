//! The whole path on real sockets: a node (QUIC ingest, engine, HTTP API) and a simulated fleet
//! in this process, talking over loopback.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pipeline::{Config, Node};

mod common;

fn config(dir: &std::path::Path) -> Config {
    let mut cfg = Config { data_dir: dir.to_path_buf(), ..Config::default() };
    cfg.ingest.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.engine.shards = 2;
    cfg
}

/// A load configuration aimed at `node`, trusting its certificate.
fn load_for(node: &Node) -> loadgen::LoadConfig {
    loadgen::LoadConfig::new(
        node.quic_addr,
        format!("http://{}", node.http_addr),
        ingest::Trust::Pem(node.certificate_pem.clone()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_completes_its_deliveries_without_loss() {
    let dir = std::env::temp_dir().join(format!("fleetstream-e2e-{}", std::process::id()));
    let node = Node::start(&config(&dir)).await.unwrap();
    assert!(dir.join("tls/ingest-cert.pem").exists(), "the certificate is written for local clients");
    let mut load = load_for(&node);
    load.drones = 60;
    load.connections = 3;
    load.rate = 3_000.0;
    load.duration = Duration::from_secs(5);
    load.leg = Duration::from_millis(400);
    load.deliveries_per_s = 20.0;
    // Two extra readers, the first stalled for a second mid-run: both still get everything.
    load.readers = 2;
    load.stall_reader = Duration::from_secs(1);
    load.stall_reader_after = Duration::from_secs(1);
    let report = loadgen::run(load, Arc::new(|_: &loadgen::Progress| {})).await.unwrap();
    assert_eq!(report.events_sent, 15_000, "{report}");
    assert_eq!(report.readers.len(), 2, "{report}");
    assert_eq!(report.readers[0].stalled_s, 1.0);
    assert!(report.readers.iter().all(|r| r.events == report.events_acked), "{report}");
    assert!(report.server_rss_peak_bytes.is_some_and(|b| b > 0), "{report}");
    assert!(report.deliveries_scheduled >= 40, "{report}");
    common::assert_clean_run(&report);
    assert!(report.latency_us.count > 0 && report.latency_us.p50 > 0, "{report}");
    // Every mission reached its drone through drone-commands over QUIC and was acked by it.
    let commands = node.engine.queues().get(events::QueueName::DroneCommands);
    let acked = commands.metrics().acked.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(acked, report.deliveries_scheduled, "{report}");
    assert_eq!(commands.counts(), (0, 0, 0), "no mission left behind");

    // The API agrees with the stream: a completed delivery reads as complete, with its drone's
    // last position from the engine.
    let http = services::tls::plain_client().unwrap();
    let account = http.put(format!("http://{}/v1/accounts/e2e", node.http_addr)).json(&serde_json::json!({}));
    assert!(account.send().await.unwrap().status().is_success());
    let body: serde_json::Value = http
        .post(format!("http://{}/v1/deliveries", node.http_addr))
        .json(&serde_json::json!({
            "owner": "e2e", "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": {"lat": 47.61, "lon": -122.31},
            "package": {"size": "medium", "weight_kg": 2.0}
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = body["delivery_id"].as_u64().expect("scheduled");
    let status: serde_json::Value =
        http.get(format!("http://{}/v1/deliveries/{id}", node.http_addr)).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["stage"], "created");
    assert!(status["drone"]["position"]["lat"].as_f64().is_some(), "{status}");
    let metrics = http.get(format!("http://{}/metrics", node.http_addr)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fleetstream_ingest_events_total 15000"), "{metrics}");
    assert!(metrics.contains("fleetstream_engine_events_applied_total 15000"), "{metrics}");
    // Every appended batch is timed from the appender's queue to its acknowledgement.
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name}"))
    };
    let batches = value("fleetstream_engine_batches_total ");
    assert!(batches > 0);
    assert_eq!(value("fleetstream_engine_append_seconds_count{log=\"input\"} "), batches, "{metrics}");
    assert_eq!(value("fleetstream_engine_append_seconds_bucket{log=\"input\",le=\"+Inf\"} "), batches);
    assert!(value("fleetstream_log_fsync_seconds_count{log=\"input\"} ") > 0, "{metrics}");
    // ... and by its first event's age on the way in; the Created event by its age at publish.
    assert_eq!(value("fleetstream_engine_event_age_at_submit_seconds_count{log=\"input\"} "), batches);
    assert!(value("fleetstream_engine_delivery_event_age_at_publish_seconds_count{log=\"delivery-events\"} ") > 0);
    #[cfg(target_os = "linux")]
    assert!(metrics.contains("\nprocess_resident_memory_bytes "), "{metrics}");

    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A load generator killed mid-run leaves missions leased and unacked; the next one's drones
/// take them over at once (the old sessions are superseded, no timeout is waited for), fly them
/// and ack them, so every mission ends acked and none is dead-lettered.
/// Customers cancel and reschedule some of their deliveries soon after ordering: every
/// cancelled one ends cancelled and its drone drops nothing off after the cancel is answered
/// (a drone flying it turns back, a mission not yet handed over is taken back); every
/// rescheduled one is completed at its new drop-off; every stage change after an SMS
/// subscription is notified; no event is lost or doubled, and no command is left in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_deliveries_are_never_flown_to_their_drop_off_and_rescheduled_ones_land_at_the_new_one() {
    let dir = std::env::temp_dir().join(format!("fleetstream-e2e-changes-{}", std::process::id()));
    // Half the orders are subscribed to by SMS: the node posts to loadgen's receiver.
    let sms = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut cfg = config(&dir);
    cfg.notify.sms_webhook = Some(format!("http://{sms}/send"));
    let node = Node::start(&cfg).await.unwrap();
    let mut load = load_for(&node);
    load.notify_percent = 50;
    load.sms_listen = Some(sms);
    load.drones = 60;
    load.connections = 3;
    load.rate = 3_000.0;
    load.duration = Duration::from_secs(8);
    load.leg = Duration::from_millis(600);
    load.deliveries_per_s = 20.0;
    load.cancel_percent = 30;
    load.reschedule_percent = 30;
    let report = loadgen::run(load, Arc::new(|_: &loadgen::Progress| {})).await.unwrap();
    assert!(report.deliveries_cancelled >= 10 && report.deliveries_rescheduled >= 10, "{report}");
    let cancels = (report.cancelled_then_completed, report.cancelled_but_flown, report.cancels_unheard);
    assert_eq!(cancels, (0, 0, 0), "{report}");
    // Every stage change after a subscription was notified, cancels and reschedules included.
    assert!(report.notifications_subscribed >= 30 && report.notifications_expected >= 60, "{report}");
    assert_eq!(report.notifications_missing, 0, "{report}");
    assert_eq!((report.lost, report.duplicates, report.deliveries_unfinished), (0, 0, 0), "{report}");
    assert_eq!(report.verdict(), Ok(()), "{report}");
    // Everything scheduled ended: completed, or cancelled (a cancel answered 409 came too late).
    assert!(report.deliveries_completed + report.deliveries_cancelled >= report.deliveries_scheduled, "{report}");
    let commands = node.engine.queues().get(events::QueueName::DroneCommands);
    assert_eq!(commands.counts(), (0, 0, 0), "no command left behind");
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missions_of_a_killed_fleet_are_flown_by_the_next_one() {
    let dir = std::env::temp_dir().join(format!("fleetstream-e2e-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = config(&dir);
    // Long enough that only a takeover, not a timeout, can explain a quick redelivery.
    cfg.queues.drone_commands.visibility_timeout_ms = 120_000;
    let node = Node::start(&cfg).await.unwrap();
    let load = |duration_s: u64, deliveries: f64| {
        let mut load = load_for(&node);
        load.drones = 40;
        load.connections = 2;
        load.rate = 2_000.0;
        load.duration = Duration::from_secs(duration_s);
        load.leg = Duration::from_millis(800);
        load.deliveries_per_s = deliveries;
        load
    };
    // The first fleet runs on its own runtime, which is then dropped mid-run: its sockets close
    // without a word to the server, as when the process is killed.
    let first = load(20, 20.0);
    let killed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.spawn(async move {
            let _ = loadgen::run(first, Arc::new(|_: &loadgen::Progress| {})).await;
        });
        std::thread::sleep(Duration::from_millis(3_500));
        rt.shutdown_background();
    });
    killed.join().unwrap();
    let commands = node.engine.queues().get(events::QueueName::DroneCommands);
    let (_, held, _) = commands.counts();
    assert!(held > 0, "missions were in flight when the fleet died");

    let report = loadgen::run(load(6, 2.0), Arc::new(|_: &loadgen::Progress| {})).await.unwrap();
    assert_eq!((report.lost, report.duplicates), (0, 0), "{report}");
    let m = commands.metrics();
    let (enqueued, acked, redelivered) = (
        m.enqueued.load(std::sync::atomic::Ordering::Relaxed),
        m.acked.load(std::sync::atomic::Ordering::Relaxed),
        m.redelivered.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert!(redelivered >= held as u64, "the dead fleet's missions were redelivered: {redelivered} < {held}");
    assert_eq!(acked, enqueued, "every mission was flown and acked");
    assert_eq!(commands.counts(), (0, 0, 0), "none left, none dead");
    // (A mission whose drop-off the server took just before the kill, but whose ack never left,
    // is flown again without a second completion; so only "more than its own" is certain.)
    assert!(
        report.deliveries_completed > report.deliveries_scheduled,
        "the second fleet completed the first fleet's deliveries too: {report}"
    );
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The transport ceiling: `loadgen --raw` against a discard server gets every batch answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_mode_against_a_discard_server() {
    let server = ingest::IngestServer::bind(&ingest::ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..ingest::ServerConfig::default()
    })
    .unwrap();
    let addr = server.local_addr().unwrap();
    let trust = ingest::Trust::Pem(server.certificate_pem().to_string());
    let sink = Arc::new(pipeline::discard::Discard::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(sink.clone(), async {
        let _ = stopped.await;
    }));
    let mut load = loadgen::LoadConfig::new(addr, "http://127.0.0.1:9".into(), trust);
    load.raw = true;
    load.drones = 50;
    load.connections = 2;
    load.rate = 5_000.0;
    load.duration = Duration::from_secs(2);
    let report = loadgen::run(load, Arc::new(|_: &loadgen::Progress| {})).await.unwrap();
    assert_eq!(report.mode, "raw");
    assert_eq!(report.events_acked, 10_000, "{report}");
    assert_eq!(sink.events.load(std::sync::atomic::Ordering::Relaxed), 10_000);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
