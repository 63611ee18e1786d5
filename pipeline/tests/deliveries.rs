//! Reschedule and cancel through the public API of a real node: the engine applies them on the
//! drone's shard, the delivery's events change, and the read model follows.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use events::StreamSource;
use pipeline::Node;
use serde_json::{Value, json};

use common::loopback_config;

/// The drones report in and are registered, the owner's account is opened, and the order a
/// test schedules is returned (a pickup beside the drones, a drop-off 1.4 km away).
async fn ready_to_order(node: &Node, http: &reqwest::Client, base: &str, owner: &str, drones: &[u64]) -> Value {
    common::report_in(node.quic_addr, &node.certificate_pem, base, drones).await;
    let registered = http.post(format!("{base}/v1/drones")).json(&json!({ "drones": drones })).send().await.unwrap();
    assert!(registered.status().is_success());
    let account = http.put(format!("{base}/v1/accounts/{owner}")).json(&json!({})).send().await.unwrap();
    assert!(account.status().is_success());
    json!({
        "owner": owner, "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": {"lat": 47.61, "lon": -122.31},
        "package": {"size": "small", "weight_kg": 1.0}
    })
}

async fn stage_becomes(http: &reqwest::Client, base: &str, id: u64, stage: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v: Value = http.get(format!("{base}/v1/deliveries/{id}")).send().await.unwrap().json().await.unwrap();
        if v["stage"] == stage || std::time::Instant::now() > deadline {
            assert_eq!(v["stage"], stage, "{v}");
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reschedule_and_cancel_change_the_delivery_and_its_events() {
    let (dir, cfg) = loopback_config("deliveries");
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    let http = services::tls::plain_client().unwrap();
    let order = ready_to_order(&node, &http, &base, "acme", &[1, 2]).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let v: Value =
            http.post(format!("{base}/v1/deliveries")).json(&order).send().await.unwrap().json().await.unwrap();
        ids.push(v["delivery_id"].as_u64().unwrap());
    }
    let events = node.engine.subscribe_deliveries_from(events::StartAt::Earliest).unwrap();

    // Reschedule the first: new drop-off, stage Rescheduled, and the drone gets the new mission.
    let resp = http
        .patch(format!("{base}/v1/deliveries/{}", ids[0]))
        .json(&json!({"dropoff": {"lat": 47.7, "lon": -122.2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v = stage_becomes(&http, &base, ids[0], "rescheduled").await;
    assert_eq!(v["dropoff"]["lat"], 47.7);
    assert_eq!(v["pickup"]["lat"], 47.6, "what was left out stays");
    let missions = node.engine.queues().get(events::QueueName::DroneCommands);
    assert_eq!(missions.counts().0, 3, "two missions and the rescheduled one wait for their drones");

    // Cancel the second: stage Cancelled and its drone is free again.
    let resp = http.delete(format!("{base}/v1/deliveries/{}", ids[1])).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    stage_becomes(&http, &base, ids[1], "cancelled").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while node.services.fleet_size().1 != 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(node.services.fleet_size(), (2, 1), "the cancelled delivery's drone is free");

    // A cancelled delivery cannot be rescheduled; an unknown one is 404; bad input is 400.
    let resp = http
        .patch(format!("{base}/v1/deliveries/{}", ids[1]))
        .json(&json!({"pickup": {"lat": 1.0, "lon": 1.0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    assert_eq!(http.delete(format!("{base}/v1/deliveries/999")).send().await.unwrap().status(), 404);
    let resp = http
        .patch(format!("{base}/v1/deliveries/{}", ids[0]))
        .json(&json!({"pickup": {"lat": 100.0, "lon": 1.0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // The delivery-events stream carries the changes, in order per delivery.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let (_, batch) =
            tokio::time::timeout(Duration::from_secs(5), events.rx.recv_async()).await.unwrap().unwrap().unwrap();
        for e in batch.events().iter() {
            seen.push((e.delivery_id.to_native(), e.seq.to_native(), e.stage.to_stage()));
        }
    }
    seen.sort_unstable();
    use events::DeliveryStage::*;
    assert_eq!(
        seen,
        vec![(ids[0], 0, Created), (ids[0], 1, Rescheduled), (ids[1], 0, Created), (ids[1], 1, Cancelled)]
    );
    drop(events);

    // Delivery History has every event, queryable by delivery and by owner, across a restart.
    let history = |base: String, id: u64| {
        let http = http.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let v: Value =
                    http.get(format!("{base}/v1/deliveries/{id}/history")).send().await.unwrap().json().await.unwrap();
                // Not stored yet is a 404 without events: ask again.
                let stages: Vec<String> = v["events"].as_array().map_or_else(Vec::new, |evs| {
                    evs.iter().map(|e| e["stage"].as_str().unwrap().to_string()).collect()
                });
                if stages.len() >= 2 || std::time::Instant::now() > deadline {
                    return stages;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(history(base.clone(), ids[0]).await, ["created", "rescheduled"]);
    assert_eq!(history(base.clone(), ids[1]).await, ["created", "cancelled"]);
    let page: Value =
        http.get(format!("{base}/v1/history?owner=acme&limit=1")).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["deliveries"][0]["delivery_id"], ids[0], "{page}");
    let next = page["next"].as_str().unwrap().to_string();
    let page2: Value = http
        .get(format!("{base}/v1/history?owner=acme&limit=1&after={next}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page2["deliveries"][0]["delivery_id"], ids[1], "{page2}");
    assert_eq!(page2["deliveries"][0]["stage"], "cancelled");
    assert_eq!(http.get(format!("{base}/v1/deliveries/424242/history")).send().await.unwrap().status(), 404);

    node.shutdown().await.unwrap();
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(history(base.clone(), ids[0]).await, ["created", "rescheduled"], "no gap, no duplicate after a restart");
    assert_eq!(history(base.clone(), ids[1]).await, ["created", "cancelled"]);

    // Each delivery's trace outlived the restart, reschedule and cancel included: the
    // engine's event is a child of the operation that caused it. The refused cancel of an
    // unknown delivery kept nothing.
    let spans = |id: u64| {
        let req = http.get(format!("{base}/v1/deliveries/{id}/trace"));
        async move {
            let trace: Value = req.send().await.unwrap().json().await.unwrap();
            trace["spans"].as_array().cloned().unwrap_or_default()
        }
    };
    let parent_of = |spans: &[Value], child: &str, parent: &str| {
        let find =
            |name: &str| spans.iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("no {name}: {spans:?}"));
        assert_eq!(find(child)["parent_id"], find(parent)["span_id"], "{child} under {parent}");
    };
    let first = spans(ids[0]).await;
    parent_of(&first, "engine.derive.rescheduled", "scheduler.reschedule");
    parent_of(&spans(ids[1]).await, "engine.derive.cancelled", "scheduler.cancel");
    assert_eq!(http.get(format!("{base}/v1/deliveries/999/trace")).send().await.unwrap().status(), 404);
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let (dir, mut cfg) = loopback_config("throttle");
    cfg.http.throttle = services::throttle::ThrottleConfig { rate_per_s: 1, burst: 2 };
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    let http = services::tls::plain_client().unwrap();
    let statuses = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(http.get(format!("{base}/v1/deliveries/1")).send().await.unwrap());
        }
        v
    };
    assert_eq!(statuses.iter().map(|r| r.status().as_u16()).collect::<Vec<_>>(), vec![404, 404, 429]);
    let retry: u64 = statuses[2].headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    // A made-up x-api-key is no new client: without keys the throttle counts the address
    // (per-principal allowances: tests/access.rs).
    let escape = http.get(format!("{base}/v1/deliveries/1")).header("x-api-key", "made-up-7").send().await.unwrap();
    assert_eq!(escape.status(), 429);
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fleetstream_http_throttled_total 2"), "{metrics}");
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_keys_configured_callers_without_one_get_401_and_with_a_wrong_one_403() {
    let (dir, mut cfg) = loopback_config("auth");
    cfg.http.api_keys = vec!["k-partner-1".into()];
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    let http = services::tls::plain_client().unwrap();
    let none = http.get(format!("{base}/v1/deliveries/1")).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    let wrong = http.get(format!("{base}/v1/queues")).bearer_auth("nope").send().await.unwrap();
    assert_eq!(wrong.status(), 403);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
    let ok = http.get(format!("{base}/v1/deliveries/1")).bearer_auth("k-partner-1").send().await.unwrap();
    assert_eq!(ok.status(), 404, "authenticated: the delivery just does not exist");
    let ok = http.get(format!("{base}/v1/queues")).header("x-api-key", "k-partner-1").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200, "health stays open");
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fleetstream_http_unauthenticated_total{reason=\"missing\"} 1"), "{metrics}");
    assert!(metrics.contains("fleetstream_http_unauthenticated_total{reason=\"unknown\"} 1"), "{metrics}");
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_can_live_on_jetstream() {
    let Some((_, url)) = common::nats("notifications_can_live_on_jetstream").await else { return };
    let (mut got, gateway_addr) = common::sms_gateway().await;
    let (dir, mut cfg) = loopback_config("js-notify");
    cfg.notify.sms_webhook = Some(format!("http://{gateway_addr}/send"));
    cfg.jetstream.url = url.clone();
    cfg.jetstream.stream_prefix = format!("FSNODE{}", std::process::id());
    cfg.jetstream.subject_prefix = format!("fsnode{}", std::process::id());
    cfg.jetstream.queues = vec!["notifications".into()];
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    let http = services::tls::plain_client().unwrap();
    let order = ready_to_order(&node, &http, &base, "acme", &[1]).await;
    let v: Value = http.post(format!("{base}/v1/deliveries")).json(&order).send().await.unwrap().json().await.unwrap();
    let id = v["delivery_id"].as_u64().unwrap();
    let sub = json!({"sms": "+15551234567"});
    let ok = http.post(format!("{base}/v1/deliveries/{id}/notifications")).json(&sub).send().await.unwrap();
    assert_eq!(ok.status(), 201);
    http.delete(format!("{base}/v1/deliveries/{id}")).send().await.unwrap();
    let sms = tokio::time::timeout(Duration::from_secs(10), got.recv()).await.unwrap().unwrap();
    assert_eq!(sms["text"], format!("Delivery {id} was cancelled."));

    // It went through JetStream, and was acknowledged there: the work queue is empty.
    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream_name = format!("{}_QUEUE_NOTIFICATIONS", cfg.jetstream.stream_prefix);
    let mut stream = js.get_stream(&stream_name).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let info = stream.info().await.unwrap();
        if info.state.messages == 0 || std::time::Instant::now() > deadline {
            assert_eq!((info.state.messages, info.state.last_sequence), (0, 1), "one message, acknowledged");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The API says where it lives; the local journal never saw it.
    let listed: Value = http.get(format!("{base}/v1/queues")).send().await.unwrap().json().await.unwrap();
    let notifications = listed["queues"].as_array().unwrap().iter().find(|q| q["queue"] == "notifications").unwrap();
    assert_eq!(
        (notifications["backend"].as_str(), notifications["waiting_or_leased"].as_u64()),
        (Some("jetstream"), Some(0))
    );
    let local = node.engine.queues().get(events::QueueName::Notifications);
    assert_eq!(local.metrics().enqueued.load(std::sync::atomic::Ordering::Relaxed), 0);
    node.shutdown().await.unwrap();
    for name in [stream_name, format!("{}_DEAD_LETTERS", cfg.jetstream.stream_prefix)] {
        js.delete_stream(name).await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_are_notified_of_stage_changes_through_the_notifications_queue() {
    let (mut got, gateway_addr) = common::sms_gateway().await;

    let (dir, mut cfg) = loopback_config("notify");
    cfg.notify.sms_webhook = Some(format!("http://{gateway_addr}/send"));
    let (mail_tx, mut mail) = tokio::sync::mpsc::channel::<String>(16);
    cfg.notify.smtp_relay = Some(smtp_sink(mail_tx).await.to_string());
    cfg.queues.notifications.max_attempts = 2;
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    let http = services::tls::plain_client().unwrap();
    let order = ready_to_order(&node, &http, &base, "acme", &[1]).await;
    let v: Value = http.post(format!("{base}/v1/deliveries")).json(&order).send().await.unwrap().json().await.unwrap();
    let id = v["delivery_id"].as_u64().unwrap();
    let bad = http
        .post(format!("{base}/v1/deliveries/{id}/notifications"))
        .json(&json!({"sms": "call me"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let ok = http
        .post(format!("{base}/v1/deliveries/{id}/notifications"))
        .json(&json!({"sms": "+15551234567"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
    let email = http
        .post(format!("{base}/v1/deliveries/{id}/notifications"))
        .json(&json!({"email": "ops@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(email.status(), 201);

    // Cancelling changes the stage; the SMS subscriber hears of it through the gateway.
    http.delete(format!("{base}/v1/deliveries/{id}")).send().await.unwrap();
    let sms = tokio::time::timeout(Duration::from_secs(5), got.recv()).await.unwrap().unwrap();
    assert_eq!(sms["to"], "+15551234567");
    assert_eq!(sms["text"], format!("Delivery {id} was cancelled."));

    // And the email subscriber gets a mail through the SMTP relay.
    let message = tokio::time::timeout(Duration::from_secs(5), mail.recv()).await.unwrap().unwrap();
    assert!(message.contains("To: ops@example.com"), "{message}");
    assert!(message.contains(&format!("Delivery {id} was cancelled.")), "{message}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let queues = loop {
        let v: Value = http.get(format!("{base}/v1/queues")).send().await.unwrap().json().await.unwrap();
        if v["queues"][1]["acked"] == 2 || std::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let notifications = &queues["queues"][1];
    assert_eq!((notifications["acked"].as_u64(), notifications["dead"].as_u64()), (Some(2), Some(0)), "{queues}");
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A minimal SMTP server that accepts every message and hands its text to `tx`.
async fn smtp_sink(tx: tokio::sync::mpsc::Sender<String>) -> SocketAddr {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 sink\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 sink\r\n",
                        "DATA" => {
                            let _ = write.write_all(b"354 go on\r\n").await;
                            let mut message = String::new();
                            while let Ok(Some(l)) = lines.next_line().await {
                                if l == "." {
                                    break;
                                }
                                message.push_str(&l);
                                message.push('\n');
                            }
                            let _ = tx.send(message).await;
                            b"250 queued\r\n"
                        }
                        "QUIT" => {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => b"250 ok\r\n",
                    };
                    let _ = write.write_all(reply).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_delivery_from_the_request_through_the_drone_to_its_events() {
    use events::wire::Buffer;
    use events::{BatchMeta, DroneEvent, DroneEventKind, FlightStatus, GeoPoint, TelemetryBatch, TraceContext};

    let (mut sms, gateway_addr) = common::sms_gateway().await;
    let (dir, mut cfg) = loopback_config("trace");
    cfg.notify.sms_webhook = Some(format!("http://{gateway_addr}/send"));
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    let http = services::tls::plain_client().unwrap();
    common::report_in(node.quic_addr, &node.certificate_pem, &base, &[5]).await;
    http.put(format!("{base}/v1/drones/5")).send().await.unwrap();
    http.put(format!("{base}/v1/accounts/acme")).json(&json!({})).send().await.unwrap();
    let events = node.engine.subscribe_deliveries_from(events::StartAt::Earliest).unwrap();

    // The customer's request carries a trace; the answer continues it.
    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let resp = http
        .post(format!("{base}/v1/deliveries"))
        .header("traceparent", caller)
        .json(&json!({
            "owner": "acme", "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": {"lat": 47.61, "lon": -122.31},
            "package": {"size": "small", "weight_kg": 1.0}
        }))
        .send()
        .await
        .unwrap();
    let answered = TraceContext::parse(resp.headers()["traceparent"].to_str().unwrap()).unwrap();
    assert_eq!(answered.trace_hex(), "0af7651916cd43dd8448eb211c80319c");
    let id = resp.json::<Value>().await.unwrap()["delivery_id"].as_u64().unwrap();
    let subscribed =
        http.post(format!("{base}/v1/deliveries/{id}/notifications")).json(&json!({"sms": "+15551234567"})).send();
    assert_eq!(subscribed.await.unwrap().status(), 201);

    // The drone's mission carries the trace ...
    let consumer = events::WorkQueues::attach(&node.engine, events::QueueName::DroneCommands, events::KeyRange::ALL);
    let leased = events::WorkQueues::lease(
        &node.engine,
        events::QueueName::DroneCommands,
        consumer.unwrap(),
        events::KeyRange::ALL,
        1,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let mission = events::Mission::from_bytes(&leased[0].payload).unwrap();
    assert_eq!((mission.delivery_id, mission.trace.trace_hex()), (id, answered.trace_hex()));
    let (queue, mission_id) = (events::QueueName::DroneCommands, leased[0].id);
    events::WorkQueues::settle(&node.engine, queue, mission_id, leased[0].token, events::Verdict::Ack).unwrap();

    // ... and the drone puts it on the batch that flies it.
    let drone = |seq: u64, kind: DroneEventKind, at: GeoPoint| DroneEvent {
        drone_id: 5,
        seq,
        ts_us: events::now_us(),
        position: at,
        speed_mps: 10.0,
        heading_deg: 0.0,
        battery_pct: 80.0,
        status: FlightStatus::Flying,
        kind,
    };
    let flight = [
        drone(1, DroneEventKind::StatusChanged { from: FlightStatus::Idle }, GeoPoint::new(47.59, -122.29)),
        drone(2, DroneEventKind::PickedUp { delivery: id }, mission.pickup),
        drone(3, DroneEventKind::DroppedOff { delivery: id }, mission.dropoff),
    ];
    let meta = BatchMeta { producer_id: 77, batch_seq: 0, trace: mission.trace.child() };
    let batch = TelemetryBatch::encode(meta, &flight, Buffer::new()).unwrap();
    let client = common::quic_client(&node).await;
    let (mut lane, mut answers) = client.open_lane().await.unwrap();
    lane.send(batch.as_bytes()).await.unwrap();
    assert_eq!(answers.recv().await.unwrap().batch_seq, 0);

    // Every delivery-event batch of this delivery, Created through DeliveryComplete, is in
    // the caller's trace.
    let mut stages = Vec::new();
    while stages.last() != Some(&events::DeliveryStage::DeliveryComplete) {
        let (_, batch) =
            tokio::time::timeout(Duration::from_secs(5), events.rx.recv_async()).await.unwrap().unwrap().unwrap();
        let ours: Vec<_> =
            batch.events().iter().filter(|e| e.delivery_id.to_native() == id).map(|e| e.stage.to_stage()).collect();
        if !ours.is_empty() {
            assert_eq!(batch.header().meta.trace.trace_hex(), answered.trace_hex(), "{ours:?}");
            stages.extend(ours);
        }
    }
    use events::DeliveryStage::*;
    assert_eq!(stages, [Created, HeadedToPickup, InTransit, DeliveryComplete]);

    // The delivery's whole trace is kept: every span of its life, in order, in the caller's
    // trace, once the history has stored the last event and the last text is sent.
    let delivered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if sms.recv().await.unwrap()["text"] == format!("Delivery {id} was delivered.") {
                break;
            }
        }
    });
    delivered.await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let trace = loop {
        let resp = http.get(format!("{base}/v1/deliveries/{id}/trace")).send().await.unwrap();
        let trace: Value = resp.json().await.unwrap();
        let names: Vec<&str> = trace["spans"]
            .as_array()
            .map_or_else(Vec::new, |s| s.iter().map(|s| s["name"].as_str().unwrap_or("")).collect());
        let stored = names.iter().filter(|n| **n == "history.store").count();
        let notified = names.iter().filter(|n| **n == "notify.send").count();
        if (stored == 4 && notified == 3) || std::time::Instant::now() > deadline {
            break trace;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(trace["trace_id"], answered.trace_hex(), "{trace:#}");
    let spans = trace["spans"].as_array().unwrap();
    let names: Vec<&str> = spans.iter().map(|s| s["name"].as_str().unwrap()).collect();
    let starts: Vec<u64> = spans.iter().map(|s| s["start_us"].as_u64().unwrap()).collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "by start time: {names:?}");
    assert_eq!(names[0], "scheduler.create", "{names:?}");
    let at = |name: &str| names.iter().position(|n| *n == name).unwrap_or_else(|| panic!("no {name}: {names:?}"));
    for call in ["accounts", "drones", "packages", "deliveries", "engine"] {
        let i = at(&format!("scheduler.call.{call}"));
        assert_eq!(spans[i]["service"], "scheduler");
        assert_eq!(spans[i]["parent_id"], spans[0]["span_id"], "a call of scheduler.create");
    }
    assert_eq!(spans[at("drones.assign")]["attributes"]["drone_id"], 5);
    let order = [
        "scheduler.create",
        "scheduler.call.drones",
        "drones.assign",
        "engine.derive.created",
        "scheduler.enqueue.mission",
        "mission.send",
        "mission.ack",
        "engine.derive.headed_to_pickup",
        "engine.derive.in_transit",
        "engine.derive.delivery_complete",
    ];
    let positions: Vec<usize> = order.iter().map(|n| at(n)).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{order:?} in order: {names:?}");
    let ack = &spans[at("mission.ack")];
    assert_eq!(
        (ack["attributes"]["mission_id"].as_u64(), ack["attributes"]["answer"].as_str()),
        (Some(mission_id), Some("ack"))
    );
    assert_eq!(ack["parent_id"], spans[at("mission.send")]["span_id"]);
    // Each stage the drone's batch derived names the batch's offset in the telemetry log.
    let telemetry_offsets: Vec<&Value> = ["headed_to_pickup", "in_transit", "delivery_complete"]
        .iter()
        .map(|stage| &spans[at(&format!("engine.derive.{stage}"))]["attributes"]["telemetry_offset"])
        .collect();
    assert!(telemetry_offsets[0].is_u64(), "{trace:#}");
    assert!(
        telemetry_offsets.iter().all(|o| *o == telemetry_offsets[0]),
        "one batch derived them all: {telemetry_offsets:?}"
    );
    let stored: Vec<&str> = spans
        .iter()
        .filter(|s| s["name"] == "history.store")
        .map(|s| s["attributes"]["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stored, ["created", "headed_to_pickup", "in_transit", "delivery_complete"]);
    let sent: Vec<&str> = spans
        .iter()
        .filter(|s| s["name"] == "notify.send")
        .map(|s| s["attributes"]["stage"].as_str().unwrap())
        .collect();
    assert_eq!(sent, ["headed_to_pickup", "in_transit", "delivery_complete"]);
    assert!(at("engine.derive.delivery_complete") < names.iter().rposition(|n| *n == "notify.send").unwrap());
    // Another owner's key sees nothing of it; an unknown delivery has no trace.
    let unknown = http.get(format!("{base}/v1/deliveries/{}/trace", id + 1_000_000)).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fleetstream_trace_spans_dropped_total 0"), "{metrics}");
    client.close().await;
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_history_on_postgres_follows_the_delivery_through_the_same_api() {
    let url =
        std::env::var("FLEETSTREAM_PG_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into());
    let schema = format!("fleetstream_node_{}", std::process::id());
    let (dir, mut cfg) = loopback_config("pg-history");
    cfg.history = services::history::HistoryConfig {
        store: services::history::HistoryStore::Postgres,
        url: url.clone(),
        schema: schema.clone(),
    };
    let node = match Node::start(&cfg).await {
        Ok(node) => node,
        Err(error) if std::env::var("FLEETSTREAM_REQUIRE_SERVICES").as_deref() != Ok("1") => {
            println!("SKIP delivery_history_on_postgres: no PostgreSQL at {url}: {error}");
            return;
        }
        Err(error) => panic!("PostgreSQL at {url} is required (FLEETSTREAM_REQUIRE_SERVICES=1): {error}"),
    };
    let base = format!("http://{}", node.http_addr);
    let http = services::tls::plain_client().unwrap();
    let order = ready_to_order(&node, &http, &base, "pg-owner", &[3]).await;
    let v: Value = http.post(format!("{base}/v1/deliveries")).json(&order).send().await.unwrap().json().await.unwrap();
    let id = v["delivery_id"].as_u64().unwrap();
    assert_eq!(http.delete(format!("{base}/v1/deliveries/{id}")).send().await.unwrap().status(), 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stages = loop {
        let v: Value =
            http.get(format!("{base}/v1/deliveries/{id}/history")).send().await.unwrap().json().await.unwrap();
        let stages: Vec<String> = v["events"]
            .as_array()
            .map_or_else(Vec::new, |evs| evs.iter().map(|e| e["stage"].as_str().unwrap().to_string()).collect());
        if stages.len() >= 2 || std::time::Instant::now() > deadline {
            break stages;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stages, ["created", "cancelled"]);
    let page: Value = http.get(format!("{base}/v1/history?owner=pg-owner")).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["deliveries"][0]["delivery_id"], id, "{page}");
    assert_eq!(page["deliveries"][0]["stage"], "cancelled");
    // Its spans are kept in PostgreSQL too.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let names = loop {
        let trace: Value =
            http.get(format!("{base}/v1/deliveries/{id}/trace")).send().await.unwrap().json().await.unwrap();
        let names: Vec<String> = trace["spans"]
            .as_array()
            .map_or_else(Vec::new, |s| s.iter().map(|s| s["name"].as_str().unwrap_or("").to_string()).collect());
        if names.iter().filter(|n| *n == "history.store").count() == 2 || std::time::Instant::now() > deadline {
            break names;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(names.first().map(String::as_str), Some("scheduler.create"), "{names:?}");
    assert!(names.iter().any(|n| n == "engine.derive.cancelled"), "{names:?}");
    node.shutdown().await.unwrap();
    let mut admin =
        tokio::task::spawn_blocking(move || postgres::Client::connect(&url, postgres::NoTls)).await.unwrap().unwrap();
    tokio::task::spawn_blocking(move || admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")))
        .await
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A failed commit of the services' store stops it: scheduling is refused (nothing half-made
/// is answered as done), and readiness and `/metrics` name the stopped part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_commit_stops_scheduling_and_shows_in_readiness() {
    let (dir, cfg) = loopback_config("store-fails");
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    let http = services::tls::plain_client().unwrap();
    let order = ready_to_order(&node, &http, &base, "acme", &[1, 2]).await;
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(http.post(format!("{base}/v1/deliveries")).json(&order).send().await.unwrap().status(), 201);

    node.services.fail_store_commits();
    let refused = http.post(format!("{base}/v1/deliveries")).json(&order).send().await.unwrap();
    assert_eq!(refused.status(), 503, "{}", refused.text().await.unwrap());
    let again = http.post(format!("{base}/v1/deliveries")).json(&order).send().await.unwrap();
    assert_eq!(again.status(), 503, "the store stays stopped");
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["stopped"][0]["part"], "services store", "{body}");
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fleetstream_stopped{part=\"services store\"} 1"), "{metrics}");
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `[jetstream] require_sync`, a node refuses to start unless the server is known to sync
/// every write before acknowledging it: without a monitoring endpoint it cannot know; with one
/// that says `sync_always` (a stand-in for the server's `/varz` here) it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_sync_refuses_a_jetstream_whose_acknowledgements_may_not_be_on_disk() {
    let Some((client, url)) = common::nats("require_sync_refuses").await else { return };
    let (dir, mut cfg) = loopback_config("js-sync");
    cfg.jetstream.url = url;
    cfg.jetstream.stream_prefix = format!("FSSYNC{}", std::process::id());
    cfg.jetstream.subject_prefix = format!("fssync{}", std::process::id());
    cfg.jetstream.queues = vec!["notifications".into()];
    cfg.jetstream.require_sync = true;
    let refused = Node::start(&cfg).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(refused.contains("require_sync") && refused.contains("monitor_url"), "{refused}");

    let sync_always = |always: bool| {
        axum::Router::new().route(
            "/varz",
            axum::routing::get(move || async move {
                axum::Json(
                    json!({"jetstream": {"config": {"sync_always": always, "sync_interval": 120_000_000_000u64}}}),
                )
            }),
        )
    };
    for (always, starts) in [(false, false), (true, true)] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let monitor = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, sync_always(always)).await });
        cfg.jetstream.monitor_url = Some(format!("http://{monitor}"));
        match Node::start(&cfg).await {
            Ok(node) => {
                assert!(starts, "started although the server syncs every 120 s");
                node.shutdown().await.unwrap();
            }
            Err(e) => assert!(!starts && e.to_string().contains("120s"), "{e}"),
        }
    }
    // The node that started made its queue's streams.
    let js = async_nats::jetstream::new(client);
    for stream in ["QUEUE_NOTIFICATIONS", "DEAD_LETTERS"] {
        let _ = js.delete_stream(format!("{}_{stream}", cfg.jetstream.stream_prefix)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A drain turns readiness off while the listeners still serve (`[http] drain_delay_ms`), so
/// a load balancer stops sending new clients before connections are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_turns_readiness_off_before_the_listeners_close() {
    let (dir, mut cfg) = loopback_config("drain-ready");
    cfg.http.drain_delay_ms = 1_500;
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    let http = services::tls::plain_client().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http.get(format!("{base}/readyz")).send().await.unwrap().status() != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopping = tokio::spawn(node.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["stopped"][0]["part"], "node", "{body}");
    assert!(body["stopped"][0]["reason"].as_str().unwrap().starts_with("draining"), "{body}");
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200, "alive while draining");
    stopping.await.unwrap().unwrap();
    assert!(http.get(format!("{base}/readyz")).send().await.is_err(), "the listener is closed after the drain");
    let _ = std::fs::remove_dir_all(&dir);
}
