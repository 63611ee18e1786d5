//! Who may do what, over a real node's HTTP listener: API keys bound to customers and admins
//! (`services::auth`), the per-principal throttle, and the internal routes kept off the
//! public listener.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::time::Duration;

use pipeline::Node;
use reqwest::StatusCode;
use serde_json::{Value, json};
use services::auth::ApiKeySpec;

const ALICE: &str = "key-alice";
const BOB: &str = "key-bob";
const OPS: &str = "key-ops";

fn config(tag: &str) -> (std::path::PathBuf, pipeline::Config) {
    common::loopback_config(&format!("access-{tag}"))
}

fn order(owner: &str) -> Value {
    json!({
        "owner": owner, "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": {"lat": 47.61, "lon": -122.31},
        "package": {"size": "small", "weight_kg": 1.0}
    })
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(&self, key: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(key);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn metric(&self, line: &str) -> bool {
        let text = self.http.get(format!("{}/metrics", self.base)).send().await.unwrap().text().await.unwrap();
        text.lines().any(|l| l == line)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_keys_reach_only_their_owners_deliveries_and_admin_keys_the_rest() {
    use reqwest::Method;
    let (dir, mut cfg) = config("rules");
    // Bob's key is given as its digest, from a keys file beside the config.
    let digest: String = ring::digest::digest(&ring::digest::SHA256, BOB.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::create_dir_all(&dir).unwrap();
    let keys_file = dir.join("keys.toml");
    std::fs::write(&keys_file, format!("api_keys = [{{ sha256 = \"{digest}\", owner = \"bob\" }}]\n")).unwrap();
    cfg.http.api_keys = vec![ApiKeySpec::customer(ALICE, "alice"), ApiKeySpec::admin(OPS)];
    cfg.http.api_keys_file = Some(keys_file);
    let node = Node::start(&cfg).await.unwrap();
    let api = Api { http: services::tls::plain_client().unwrap(), base: format!("http://{}", node.http_addr) };

    // Admin routes: the admin opens accounts and registers drones; customers may not.
    common::report_in_as(node.quic_addr, &node.certificate_pem, &api.base, &[1, 2, 3], 0, Some(OPS)).await;
    for (key, expected) in [(ALICE, StatusCode::FORBIDDEN), (OPS, StatusCode::CREATED)] {
        let (status, _) = api.call(key, Method::POST, "/v1/drones", Some(json!({"drones": [1, 2, 3]}))).await;
        assert_eq!(status, expected, "registering drones with {key}");
    }
    // Registering answers alike on both routes: 201 when it registered something, else 200.
    for (method, path, body) in
        [(Method::POST, "/v1/drones", Some(json!({"drones": [7, 1]}))), (Method::PUT, "/v1/drones/8", None)]
    {
        let (first, _) = api.call(OPS, method.clone(), path, body.clone()).await;
        let (again, _) = api.call(OPS, method, path, body).await;
        assert_eq!((first, again), (StatusCode::CREATED, StatusCode::OK), "{path}");
    }
    for owner in ["alice", "bob"] {
        let (status, body) = api.call(ALICE, Method::PUT, &format!("/v1/accounts/{owner}"), Some(json!({}))).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")));
        let (status, _) = api.call(OPS, Method::PUT, &format!("/v1/accounts/{owner}"), Some(json!({}))).await;
        assert_eq!(status, StatusCode::CREATED, "the admin opens {owner}'s account");
    }
    for path in ["/v1/queues", "/v1/queues/drone-commands/dead-letters", "/v1/streams", "/v1/drones/1"] {
        assert_eq!(api.call(BOB, Method::GET, path, None).await.0, StatusCode::FORBIDDEN, "{path} with a customer key");
        assert_eq!(api.call(OPS, Method::GET, path, None).await.0, StatusCode::OK, "{path} with the admin key");
    }

    // Ordering: for its own owner only.
    let (status, body) = api.call(ALICE, Method::POST, "/v1/deliveries", Some(order("bob"))).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{body}");
    let (status, body) = api.call(ALICE, Method::POST, "/v1/deliveries", Some(order("alice"))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let alices = body["delivery_id"].as_u64().unwrap();
    let (status, body) = api.call(BOB, Method::POST, "/v1/deliveries", Some(order("bob"))).await;
    assert_eq!(status, StatusCode::CREATED, "a key given by its digest: {body}");
    let bobs = body["delivery_id"].as_u64().unwrap();
    let (status, _) = api.call(OPS, Method::POST, "/v1/deliveries", Some(order("alice"))).await;
    assert_eq!(status, StatusCode::CREATED, "an admin orders for anyone");

    // Another owner's delivery does not exist for a customer, whatever it asks of it.
    let others = [
        (Method::GET, format!("/v1/deliveries/{bobs}"), None),
        (Method::GET, format!("/v1/deliveries/{bobs}/history"), None),
        (Method::GET, format!("/v1/deliveries/{bobs}/trace"), None),
        (Method::PATCH, format!("/v1/deliveries/{bobs}"), Some(json!({"dropoff": {"lat": 47.62, "lon": -122.3}}))),
        (Method::POST, format!("/v1/deliveries/{bobs}/notifications"), Some(json!({"sms": "+15551234567"}))),
        (Method::DELETE, format!("/v1/deliveries/{bobs}"), None),
    ];
    for (method, path, body) in others {
        let (status, answer) = api.call(ALICE, method.clone(), &path, body).await;
        assert_eq!((status, answer["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{method} {path}");
    }
    let (status, body) = api.call(BOB, Method::GET, &format!("/v1/deliveries/{bobs}"), None).await;
    assert_eq!((status, body["stage"].is_string()), (StatusCode::OK, true), "{body}");
    let (status, _) = api.call(ALICE, Method::GET, &format!("/v1/deliveries/{alices}"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api.call(OPS, Method::GET, &format!("/v1/deliveries/{bobs}"), None).await;
    assert_eq!(status, StatusCode::OK, "the admin reads any delivery");
    // Its history too, once Delivery History has it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = api.call(ALICE, Method::GET, &format!("/v1/deliveries/{alices}/history"), None).await;
        if status == StatusCode::OK {
            assert!(body["events"].as_array().is_some_and(|e| !e.is_empty()), "{body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "alice's own history: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Listing: its own owner only.
    let (status, _) = api.call(ALICE, Method::GET, "/v1/history?owner=bob", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api.call(ALICE, Method::GET, "/v1/history?owner=alice", None).await;
    assert_eq!(status, StatusCode::OK);
    // Bob's delivery is untouched by Alice's attempts: Bob cancels it himself.
    let (status, _) = api.call(BOB, Method::DELETE, &format!("/v1/deliveries/{bobs}"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    // No internal route on the public listener, whatever the key.
    for key in [ALICE, OPS] {
        let (status, _) = api.call(key, Method::PUT, "/internal/v1/accounts/mallory", Some(json!({}))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "/internal with {key}");
        let note = json!({"owner": "alice", "created_us": 1});
        let (status, _) = api.call(key, Method::PUT, &format!("/internal/v1/history/owners/{bobs}"), Some(note)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "history's owner notes with {key}");
        let (status, _) = api.call(key, Method::POST, "/internal/v1/history/spans", Some(json!([]))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "history's spans with {key}");
    }
    // Bob reads his own delivery's trace, once its spans are kept.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = api.call(BOB, Method::GET, &format!("/v1/deliveries/{bobs}/trace"), None).await;
        if status == StatusCode::OK {
            assert_eq!(body["spans"][0]["name"], "scheduler.create", "{body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "bob's own trace: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Missing and unknown keys are refused; every refusal is counted by reason.
    let none = api.http.get(format!("{}/v1/deliveries/{alices}", api.base)).send().await.unwrap();
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(api.call("key-mallory", Method::GET, "/v1/queues", None).await.0, StatusCode::FORBIDDEN);
    assert!(api.metric("fleetstream_http_unauthenticated_total{reason=\"missing\"} 1").await);
    assert!(api.metric("fleetstream_http_unauthenticated_total{reason=\"unknown\"} 1").await);
    assert!(!api.metric("fleetstream_http_forbidden_total{reason=\"role\"} 0").await);
    assert!(!api.metric("fleetstream_http_forbidden_total{reason=\"owner\"} 0").await);

    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_throttle_gives_each_principal_its_own_allowance() {
    // (Without keys, a made-up header per request is still the one address: tests/deliveries.rs.)
    // With keys: each principal has its allowance, whatever address it calls from.
    let (dir, mut cfg) = config("throttle-keys");
    cfg.http.throttle = services::throttle::ThrottleConfig { rate_per_s: 1, burst: 2 };
    cfg.http.api_keys = vec![ApiKeySpec::customer(ALICE, "alice"), ApiKeySpec::customer(BOB, "bob")];
    let node = Node::start(&cfg).await.unwrap();
    let (http, base) = (services::tls::plain_client().unwrap(), format!("http://{}", node.http_addr));
    let mut statuses = Vec::new();
    for key in [ALICE, ALICE, ALICE, BOB] {
        let resp = http.get(format!("{base}/v1/deliveries/1")).bearer_auth(key).send().await.unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [404, 404, 429, 404], "alice's third is throttled, bob is not");
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_key_entry_stops_the_node_at_start_naming_it() {
    let (dir, mut cfg) = config("bad-key");
    cfg.http.api_keys = vec![ApiKeySpec::admin(OPS), ApiKeySpec::customer("k", " ")];
    let Err(err) = Node::start(&cfg).await else { panic!("a key without an owner is refused") };
    assert!(err.to_string().contains("api_keys[1]"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
