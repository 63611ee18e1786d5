//! The MQTT bridge against a real broker (`FLEETSTREAM_MQTT_URL`, default the local mosquitto):
//! a drone that reports only over MQTT flies a delivery to completion, bad messages are counted
//! and do not block the topic, a node SIGKILLed mid-stream loses nothing the bridge
//! acknowledged (the broker offers the rest again to the restarted node's session), and
//! missions go out over MQTT, offered again until their drone answers.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use events::{DroneEvent, GeoPoint, StreamSource};
use futures_util::StreamExt;
use pipeline::Node;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::{Value, json};

/// A publishing drone gateway: QoS 1, counting the broker's acknowledgements.
struct Publisher {
    client: AsyncClient,
    acked: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn connect(host: &str, port: u16, id: &str) -> Self {
        let mut options = MqttOptions::new(id, host, port);
        options.set_clean_session(true).set_inflight(100).set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let acked = Arc::new(AtomicU64::new(0));
        let count = acked.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self { client, acked, task }
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.into()).await.unwrap();
    }

    /// Waits until the broker has acknowledged `n` messages.
    async fn acked(&self, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.acked.load(Ordering::Relaxed) < n {
            assert!(std::time::Instant::now() < deadline, "the broker acknowledged {:?} of {n}", self.acked);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn close(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.task.abort();
    }
}

/// Ends the broker's persistent session of `client_id`, so tests leave nothing queued behind.
async fn forget_session(host: &str, port: u16, client_id: &str) {
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(e) = eventloop.poll().await {
            if matches!(e, Event::Incoming(Incoming::ConnAck(_))) {
                break;
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(300), eventloop.poll()).await;
}

async fn metric(http: &reqwest::Client, base: &str, name: &str) -> u64 {
    let text = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the bridge at `base` is connected and subscribed.
async fn bridge_connected(http: &reqwest::Client, base: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(http, base, "fleetstream_mqtt_connected").await != 1 {
        assert!(std::time::Instant::now() < deadline, "the MQTT bridge never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node in this process bridging the broker at `url` on topics of its own (`<tag>/telemetry/+`,
/// missions on `<tag>/missions`, client id `<tag>-node`), set up further by `tune`, its bridge
/// subscribed: the tag, data dir, node, API URL and a client.
async fn bridged_node(
    url: String,
    name: &str,
    tune: impl FnOnce(&mut pipeline::Config),
) -> (String, std::path::PathBuf, Node, String, reqwest::Client) {
    let tag = format!("fstest-{}-{name}", std::process::id());
    let (dir, mut cfg) = common::loopback_config(&format!("mqtt-{name}"));
    cfg.mqtt.url = Some(url);
    cfg.mqtt.topics = vec![format!("{tag}/telemetry/+")];
    cfg.mqtt.client_id = format!("{tag}-node");
    cfg.mqtt.missions_topic = format!("{tag}/missions");
    tune(&mut cfg);
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    let http = services::tls::plain_client().unwrap();
    bridge_connected(&http, &base).await;
    (tag, dir, node, base, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drone_reporting_over_mqtt_completes_a_delivery() {
    let Some((url, host, port)) = common::mqtt("a_drone_reporting_over_mqtt_completes_a_delivery").await else {
        return;
    };
    let (tag, dir, node, base, http) = bridged_node(url, "flight", |_| {}).await;
    let gateway = Publisher::connect(&host, port, &format!("{tag}-gateway"));
    let topic = format!("{tag}/telemetry/9");

    // Reports in (one event, not an array) and is seen where it said.
    let mut hello = common::drone_event(9, 0, 0, GeoPoint::default());
    hello.ts_us = events::now_us();
    gateway.publish(&topic, serde_json::to_vec(&hello).unwrap()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = http.get(format!("{base}/v1/drones/9")).send().await.unwrap();
        if resp.status() == 200 {
            let drone: Value = resp.json().await.unwrap();
            assert_eq!(drone["position"]["lat"], json!(47.6), "{drone}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the drone was never seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        http.post(format!("{base}/v1/drones"))
            .json(&json!({"drones": [9]}))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    http.put(format!("{base}/v1/accounts/acme")).json(&json!({})).send().await.unwrap();
    let dropoff = GeoPoint::new(47.61, -122.31);
    let order = json!({
        "owner": "acme", "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": dropoff,
        "package": {"size": "small", "weight_kg": 1.0}
    });
    let v: Value = http.post(format!("{base}/v1/deliveries")).json(&order).send().await.unwrap().json().await.unwrap();
    let id = v["delivery_id"].as_u64().unwrap();

    // Two bad messages among the flight: refused, counted, and the topic flows on.
    let flight: Vec<DroneEvent> =
        (1..=common::DROPOFF_AT).map(|seq| common::drone_event(9, seq, id, dropoff)).collect();
    gateway.publish(&topic, "not json").await;
    let mut spoiled = serde_json::to_value(flight[0]).unwrap();
    spoiled["battery_pct"] = json!(140);
    gateway.publish(&topic, serde_json::to_vec(&json!([spoiled])).unwrap()).await;
    // The first 100 events (with the pickup) in one large message, which the bridge parses on
    // another worker; the rest in small ones parsed at once: taken in the order sent, or the
    // pickup would arrive after later events and be dropped.
    let large = serde_json::to_vec(&flight[..100]).unwrap();
    assert!(large.len() > 16 * 1024, "{} bytes", large.len());
    gateway.publish(&topic, large).await;
    let mut messages = 4;
    for chunk in flight[100..].chunks(10) {
        gateway.publish(&topic, serde_json::to_vec(chunk).unwrap()).await;
        messages += 1;
    }
    // A gateway that sends part of the flight again (its own retry): derived once.
    gateway.publish(&topic, serde_json::to_vec(&flight[150..]).unwrap()).await;
    messages += 1;
    gateway.acked(messages).await;
    common::stage_becomes(&http, &base, id, "delivery_complete").await;

    let sub = node.engine.subscribe_deliveries_from(events::StartAt::Earliest).unwrap();
    let mut stages = Vec::new();
    while let Ok(Ok(item)) = tokio::time::timeout(Duration::from_millis(500), sub.rx.recv_async()).await {
        let (_, batch) = item.unwrap();
        stages.extend(batch.events().iter().filter(|e| e.delivery_id == id).map(|e| e.stage.to_stage()));
    }
    use events::DeliveryStage::*;
    assert_eq!(stages, [Created, HeadedToPickup, InTransit, DeliveryComplete]);
    assert_eq!(metric(&http, &base, "fleetstream_mqtt_rejected_total").await, 2);
    assert_eq!(metric(&http, &base, "fleetstream_mqtt_messages_total").await, messages);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while metric(&http, &base, "fleetstream_mqtt_acked_total").await != messages {
        assert!(std::time::Instant::now() < deadline, "every message is acknowledged to the broker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    gateway.close().await;
    node.shutdown().await.unwrap();
    forget_session(&host, port, &format!("{tag}-node")).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every telemetry event in the log of the node at `base`: (drone, seq) → times seen.
async fn telemetry_seen(http: &reqwest::Client, base: &str, want: usize) -> std::collections::HashMap<(u64, u64), u32> {
    let mut seen = std::collections::HashMap::new();
    let resp = http.get(format!("{base}/v1/streams/drone-telemetry/events?from=earliest")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < want {
        let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, body.next()).await else { break };
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            for data in frame.lines().filter_map(|l| l.strip_prefix("data:")) {
                let v: Value = serde_json::from_str(data.trim()).unwrap();
                for e in v["events"].as_array().unwrap() {
                    *seen.entry((e["drone_id"].as_u64().unwrap(), e["seq"].as_u64().unwrap())).or_insert(0) += 1;
                }
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_loses_nothing_the_bridge_acknowledged() {
    let test = "a_node_killed_mid_stream_loses_nothing_the_bridge_acknowledged";
    let Some((url, host, port)) = common::mqtt(test).await else { return };
    let tag = format!("fstest-{}-crash", std::process::id());
    let dir = std::env::temp_dir().join(format!("fleetstream-mqtt-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let topics = format!("[\"{tag}/telemetry/+\"]");
    let client_id = format!("{tag}-node");
    let env = [
        ("FLEETSTREAM_MQTT__URL", url.as_str()),
        ("FLEETSTREAM_MQTT__TOPICS", topics.as_str()),
        ("FLEETSTREAM_MQTT__CLIENT_ID", client_id.as_str()),
        // Batches that wait long to fill: the node is killed holding messages it has received
        // but not yet made durable, which the broker must offer again.
        ("FLEETSTREAM_MQTT__LINGER_MS", "300"),
        ("FLEETSTREAM_MQTT__BATCH_MAX", "50000"),
    ];
    let (quic, http_port) = (common::free_udp_port(), common::free_tcp_port());
    let base = format!("http://127.0.0.1:{http_port}");
    let http = services::tls::plain_client().unwrap();
    let mut child = common::spawn_serve(&dir, quic, http_port, &env);
    bridge_connected(&http, &base).await;

    // 20 drones, 300 events each, five per message, round robin; the node is killed after
    // 40% of the messages and started again at once, while the gateway goes on publishing.
    let (drones, per_drone, per_message) = (20u64, 300u64, 5u64);
    let gateway = Publisher::connect(&host, port, &format!("{tag}-gateway"));
    let messages = drones * per_drone / per_message;
    let mut sent = 0u64;
    for round in 0..per_drone / per_message {
        for drone in 1..=drones {
            let chunk: Vec<DroneEvent> = (1..=per_message)
                .map(|i| common::drone_event(drone, round * per_message + i, 0, GeoPoint::default()))
                .collect();
            gateway.publish(&format!("{tag}/telemetry/{drone}"), serde_json::to_vec(&chunk).unwrap()).await;
            sent += 1;
            if sent == messages * 2 / 5 {
                common::kill9(&mut child);
                child = common::spawn_serve(&dir, quic, http_port, &env);
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    gateway.acked(messages).await;

    let want = (drones * per_drone) as usize;
    let seen = telemetry_seen(&http, &base, want).await;
    let missing: Vec<_> =
        (1..=drones).flat_map(|d| (1..=per_drone).map(move |s| (d, s))).filter(|k| !seen.contains_key(k)).collect();
    let repeated = seen.values().filter(|n| **n > 1).count();
    let again = metric(&http, &base, "fleetstream_mqtt_messages_total").await;
    println!(
        "{test}: {} of {want} events in the log, {repeated} in it twice; the restarted node took {again} messages",
        seen.len()
    );
    assert!(missing.is_empty(), "{} events lost, first {:?}", missing.len(), &missing[..missing.len().min(5)]);
    // What the broker offered again that was already kept is left out, not logged twice.
    assert_eq!(repeated, 0, "events in the log twice");
    for drone in [1, drones] {
        let v: Value = http.get(format!("{base}/v1/drones/{drone}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["last_seq"], per_drone, "{v}");
    }

    gateway.close().await;
    common::kill9(&mut child);
    forget_session(&host, port, &client_id).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_over_mqtt_completes_its_deliveries_without_loss() {
    let Some((url, host, port)) = common::mqtt("a_fleet_over_mqtt_completes_its_deliveries_without_loss").await else {
        return;
    };
    // Telemetry and missions over MQTT: the bridge holds every drone's missions.
    let (tag, dir, node, base, http) = bridged_node(url, "fleet", |c| c.mqtt.missions = "all".into()).await;

    let mut load =
        loadgen::LoadConfig::new(node.quic_addr, base.clone(), ingest::Trust::Pem(node.certificate_pem.clone()));
    load.mqtt = Some(loadgen::adapters::MqttTarget {
        host: host.clone(),
        port,
        prefix: format!("{tag}/telemetry"),
        missions: true,
        missions_prefix: format!("{tag}/missions"),
    });
    load.drones = 60;
    load.connections = 3;
    load.rate = 3_000.0;
    load.duration = Duration::from_secs(5);
    load.leg = Duration::from_millis(400);
    load.deliveries_per_s = 20.0;
    let report = loadgen::run(load, Arc::new(|_: &loadgen::Progress| {})).await.unwrap();
    assert_eq!(report.transport, "mqtt+missions");
    assert_eq!(report.events_sent, 15_000, "{report}");
    assert!(report.deliveries_scheduled >= 40, "{report}");
    common::assert_clean_run(&report);
    assert_eq!(metric(&http, &base, "fleetstream_mqtt_events_total").await, 15_000);
    let acked = metric(&http, &base, "fleetstream_mqtt_missions_acked_total").await;
    assert!(acked >= report.deliveries_completed, "{acked} missions acknowledged over MQTT\n{report}");

    node.shutdown().await.unwrap();
    forget_session(&host, port, &format!("{tag}-node")).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A drone on the broker: subscribed to its missions, answering on their answer topic.
struct MissionDrone {
    client: AsyncClient,
    missions: tokio::sync::mpsc::Receiver<events::json::MissionMessage>,
    task: tokio::task::JoinHandle<()>,
}

impl MissionDrone {
    async fn connect(host: &str, port: u16, id: &str, topic: String) -> Self {
        let mut options = MqttOptions::new(id, host, port);
        options.set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
        let (tx, missions) = tokio::sync::mpsc::channel(64);
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        subscribed_tx.take().map(|t| t.send(()));
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let m = events::json::MissionMessage::parse(&p.payload).unwrap();
                        let _ = tx.send(m).await;
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed).await.unwrap().unwrap();
        Self { client, missions, task }
    }

    /// The next mission, within `within`.
    async fn next(&mut self, within: Duration) -> Option<events::json::MissionMessage> {
        tokio::time::timeout(within, self.missions.recv()).await.ok().flatten()
    }

    async fn answer(&self, topic: String, body: Value) {
        self.client.publish(topic, QoS::AtLeastOnce, false, serde_json::to_vec(&body).unwrap()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mission_goes_out_over_mqtt_and_is_offered_again_until_its_drone_acknowledges_it() {
    let test = "a_mission_goes_out_over_mqtt_and_is_offered_again_until_its_drone_acknowledges_it";
    let Some((url, host, port)) = common::mqtt(test).await else { return };
    // Drones 1..100 take missions over MQTT; an unanswered mission is offered again after 1.5 s.
    let (tag, dir, node, base, http) = bridged_node(url, "missions", |c| {
        c.mqtt.missions = "1..100".into();
        c.queues.drone_commands.visibility_timeout_ms = 1_500;
    })
    .await;
    let topic = format!("{tag}/missions/7");
    let mut drone = MissionDrone::connect(&host, port, &format!("{tag}-drone"), topic.clone()).await;
    let gateway = Publisher::connect(&host, port, &format!("{tag}-gateway"));
    let mut hello = common::drone_event(7, 0, 0, GeoPoint::default());
    hello.ts_us = events::now_us();
    gateway.publish(&format!("{tag}/telemetry/7"), serde_json::to_vec(&hello).unwrap()).await;
    gateway.acked(1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http.get(format!("{base}/v1/drones/7")).send().await.unwrap().status() != 200 {
        assert!(std::time::Instant::now() < deadline, "the drone was never seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let registered = http.post(format!("{base}/v1/drones")).json(&json!({"drones": [7]})).send().await.unwrap();
    assert!(registered.status().is_success());
    http.put(format!("{base}/v1/accounts/acme")).json(&json!({})).send().await.unwrap();
    let order = json!({
        "owner": "acme", "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": {"lat": 47.61, "lon": -122.31},
        "package": {"size": "small", "weight_kg": 1.0}
    });
    let v: Value = http.post(format!("{base}/v1/deliveries")).json(&order).send().await.unwrap().json().await.unwrap();
    let delivery = v["delivery_id"].as_u64().unwrap();

    // The mission arrives as JSON; left unanswered, it comes again; refused, it comes again.
    let first = drone.next(Duration::from_secs(10)).await.expect("the mission went out");
    assert_eq!((first.delivery_id, first.drone_id, first.attempt), (delivery, 7, 1), "{first:?}");
    assert_eq!(first.kind, events::json::MissionKindName::Fly);
    assert_eq!((first.dropoff.lat, first.dropoff.lon), (47.61, -122.31));
    let again = drone.next(Duration::from_secs(10)).await.expect("offered again once its lease ran out");
    assert_eq!((again.mission_id, again.attempt), (first.mission_id, 2));
    let ack = format!("{topic}/ack");
    drone.answer(ack.clone(), json!({"mission_id": again.mission_id, "error": "battery too low"})).await;
    let third = drone.next(Duration::from_secs(10)).await.expect("offered again after the drone refused it");
    assert_eq!((third.mission_id, third.attempt), (first.mission_id, 3));
    // An answer naming no mission it holds is counted, not taken; then the real one.
    drone.answer(ack.clone(), json!({"mission_id": 999_999})).await;
    drone.answer(ack.clone(), json!({"mission_id": third.mission_id})).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(&http, &base, "fleetstream_mqtt_missions_acked_total").await != 1 {
        assert!(std::time::Instant::now() < deadline, "the acknowledgement never settled the mission");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&http, &base, "fleetstream_mqtt_missions_refused_total").await, 1);
    assert_eq!(metric(&http, &base, "fleetstream_mqtt_missions_stale_answers_total").await, 1);
    assert_eq!(metric(&http, &base, "fleetstream_mqtt_missions_in_flight").await, 0);
    // Acknowledged: not offered again, and nothing is dead-lettered.
    assert!(drone.next(Duration::from_secs(3)).await.is_none(), "an acknowledged mission came again");
    let dead: Value =
        http.get(format!("{base}/v1/queues/drone-commands/dead-letters")).send().await.unwrap().json().await.unwrap();
    assert_eq!(dead["dead_letters"], json!([]), "{dead}");

    drone.task.abort();
    gateway.close().await;
    node.shutdown().await.unwrap();
    forget_session(&host, port, &format!("{tag}-node")).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_reaches_a_broker_over_tls_and_refuses_one_it_does_not_trust() {
    let test = "the_bridge_reaches_a_broker_over_tls_and_refuses_one_it_does_not_trust";
    let Some(program) = common::program(test, &["mosquitto"], "start a TLS broker") else { return };
    // A broker on a spare port with a certificate from a CA of the test's own.
    let certs = std::env::temp_dir().join(format!("fleetstream-mqtts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&certs);
    services::tls::init_ca(&certs, &[], services::tls::Validity::default()).unwrap();
    let other = certs.join("other");
    services::tls::init_ca(&other, &[], services::tls::Validity::default()).unwrap();
    let port = common::free_tcp_port();
    let conf = certs.join("mosquitto.conf");
    let files = services::tls::TlsFiles::in_dir(&certs, "gateway");
    std::fs::write(
        &conf,
        format!(
            "user root\nper_listener_settings false\nallow_anonymous true\npersistence false\n\
             listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            files.ca.display(),
            files.cert.display(),
            files.key.display()
        ),
    )
    .unwrap();
    let mut broker = std::process::Command::new(&program)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "mosquitto did not start on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Trusting the broker's CA: connected and subscribed, and telemetry arrives.
    let url = format!("mqtts://127.0.0.1:{port}");
    let (tag, dir, node, base, http) = bridged_node(url.clone(), "tls", |c| c.mqtt.ca = Some(files.ca.clone())).await;
    let mut options = MqttOptions::new(format!("{tag}-gateway"), "127.0.0.1", port);
    let tls = services::tls::client_tls_config(&files.ca).unwrap();
    options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(tls))));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let mut hello = common::drone_event(5, 1, 0, GeoPoint::default());
    hello.ts_us = events::now_us();
    client
        .publish(format!("{tag}/telemetry/5"), QoS::AtLeastOnce, false, serde_json::to_vec(&hello).unwrap())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http.get(format!("{base}/v1/drones/5")).send().await.unwrap().status() != 200 {
        assert!(std::time::Instant::now() < deadline, "the drone reported over TLS was never seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&http, &base, "fleetstream_mqtt_events_total").await, 1);
    pump.abort();
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    // Trusting another CA: the handshake fails, the bridge never subscribes and says why.
    let (_, mut cfg) = common::loopback_config("mqtt-tls-untrusted");
    cfg.mqtt.url = Some(url);
    cfg.mqtt.ca = Some(other.join("ca.pem"));
    cfg.mqtt.client_id = format!("{tag}-untrusting");
    cfg.mqtt.reconnect_ms = 100;
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(metric(&http, &base, "fleetstream_mqtt_connected").await, 0);
    assert!(metric(&http, &base, "fleetstream_mqtt_disconnects_total").await >= 1);
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&cfg.data_dir);

    let _ = broker.kill();
    let _ = broker.wait();
    let _ = std::fs::remove_dir_all(&certs);
}
