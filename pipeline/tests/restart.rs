//! What a customer and an operator see survives kill -9: `pipeline serve` as a child process is
//! killed while delivery events are derived but not yet applied by the services (a test hook
//! holds them), then restarted on the same data directory. Afterwards the services have
//! applied what they had not (their read models resume from the position stored with their
//! records, not from the latest offset), the drone registry, notification subscriptions and
//! idempotency keys are still there, and a second process on the same data directory is
//! refused without touching it.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

async fn get(web: &reqwest::Client, url: String) -> Value {
    web.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_comes_back_with_everything_a_customer_and_an_operator_saw() {
    let dir = std::env::temp_dir().join(format!("fleetstream-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (quic_port, http_port) = (common::free_udp_port(), common::free_tcp_port());
    let (mut sms, gateway) = common::sms_gateway().await;
    let webhook_url = format!("http://{gateway}/send");
    let webhook = ("FLEETSTREAM_NOTIFY__SMS_WEBHOOK", webhook_url.as_str());
    // The services hold every round of delivery events for 10 s before applying it.
    let held = [webhook, ("FLEETSTREAM_TEST_SERVICES_DELAY_MS", "10000")];
    let mut server = common::spawn_serve(&dir, quic_port, http_port, &held);
    let api = format!("http://127.0.0.1:{http_port}");
    let quic: SocketAddr = format!("127.0.0.1:{quic_port}").parse().unwrap();
    let pem = std::fs::read_to_string(dir.join("tls/ingest-cert.pem")).unwrap();
    let web = services::tls::plain_client().unwrap();

    common::report_in(quic, &pem, &api, &[1, 2]).await;
    let registered = web.post(format!("{api}/v1/drones")).json(&json!({"drones": [1, 2]})).send().await.unwrap();
    assert!(registered.status().is_success());
    let account = web.put(format!("{api}/v1/accounts/acme")).json(&json!({})).send().await.unwrap();
    assert!(account.status().is_success());
    let order = json!({
        "owner": "acme", "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": {"lat": 47.61, "lon": -122.31},
        "package": {"size": "small", "weight_kg": 1.0}
    });
    let schedule = || web.post(format!("{api}/v1/deliveries")).header("idempotency-key", "order-1").json(&order);
    let first: Value = schedule().send().await.unwrap().json().await.unwrap();
    let (delivery, drone) = (first["delivery_id"].as_u64().unwrap(), first["drone_id"].as_u64().unwrap());
    let subscribed = web
        .post(format!("{api}/v1/deliveries/{delivery}/notifications"))
        .json(&json!({"sms": "+15550001111"}))
        .send()
        .await
        .unwrap();
    assert_eq!(subscribed.status(), 201);
    // Cancelled: the engine derives Cancelled at once, the services are still holding it.
    let cancelled = web.delete(format!("{api}/v1/deliveries/{delivery}")).send().await.unwrap();
    assert_eq!(cancelled.status(), 202);
    let record = get(&web, format!("{api}/v1/deliveries/{delivery}")).await;
    assert_eq!(record["stage"], "created", "the services have not applied the cancel yet: {record}");
    common::kill9(&mut server);

    // Back without the hold: the services apply what they had not.
    let mut server = common::spawn_serve(&dir, quic_port, http_port, &[webhook]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let record = get(&web, format!("{api}/v1/deliveries/{delivery}")).await;
        let history = get(&web, format!("{api}/v1/deliveries/{delivery}/history")).await;
        let last = history["events"].as_array().and_then(|e| e.last()).map(|e| e["stage"].clone());
        let state = get(&web, format!("{api}/v1/drones/{drone}")).await;
        if record["stage"] == "cancelled"
            && last.as_ref() == Some(&record["stage"])
            && state["assigned_delivery"].is_null()
        {
            assert_eq!(state["registered"], true, "the registry came back: {state}");
            break;
        }
        assert!(Instant::now() < deadline, "record {record}, history ends {last:?}, drone {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The subscription came back with it: the cancel is notified, under its stable id.
    let note = tokio::time::timeout(Duration::from_secs(20), sms.recv()).await.unwrap().unwrap();
    assert_eq!(note["to"], "+15550001111");
    assert!(note["text"].as_str().unwrap().contains("was cancelled"), "{note}");
    assert!(note["id"].as_str().unwrap().starts_with(&format!("{delivery}-")), "{note}");
    // Delivery History lists it under its owner.
    let owned = get(&web, format!("{api}/v1/history?owner=acme")).await;
    assert_eq!(owned["deliveries"][0]["delivery_id"], delivery, "{owned}");
    // The idempotency key answers its first result.
    let again = schedule().send().await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap()["delivery_id"], delivery);

    // A second process on the same data dir is refused at once, naming the holder, and the
    // first one serves on.
    let second = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["serve", "--quic", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err}");
    assert!(err.contains("in use") && err.contains(&format!("pid {}", server.id())), "{err}");
    let ready = web.get(format!("{api}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
    Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(server.wait().unwrap().success());
    let inspect =
        Command::new(env!("CARGO_BIN_EXE_pipeline")).arg("inspect").arg("--data-dir").arg(&dir).output().unwrap();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stdout));
    let _ = std::fs::remove_dir_all(&dir);
}
