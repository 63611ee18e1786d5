//! Every answer of a node's public listener has the documented form `{"error", "message"}`,
//! including the framework's own (no route, wrong method, a query string or body it cannot
//! read), and a client that sends half a request does not keep its connection.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::time::{Duration, Instant};

use pipeline::Node;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn node(tag: &str) -> (std::path::PathBuf, Node) {
    let (dir, mut cfg) = common::loopback_config(&format!("answers-{tag}"));
    cfg.http.max_body_bytes = 1024;
    cfg.http.read_timeout_ms = 500;
    (dir, Node::start(&cfg).await.unwrap())
}

/// The status, the error code and the message; fails unless the body is the documented JSON.
async fn answer(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let kind = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    assert!(kind.starts_with("application/json"), "{status}: content type {kind:?}");
    let body: Value = resp.json().await.unwrap();
    let (code, message) = (body["error"].as_str(), body["message"].as_str());
    assert!(code.is_some() && message.is_some(), "{status}: {body}");
    (status, code.unwrap().to_string(), message.unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_frameworks_own_answers_are_documented_json() {
    let (dir, node) = node("json").await;
    let base = format!("http://{}", node.http_addr);
    let http = services::tls::plain_client().unwrap();

    let (status, code, message) = answer(http.get(format!("{base}/v1/nothing-here")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (404, "not_found"), "{message}");
    assert!(message.contains("GET /v1/nothing-here"), "{message}");

    let resp = http.put(format!("{base}/v1/history")).send().await.unwrap();
    let allow = resp.headers().get("allow").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let (status, code, message) = answer(resp).await;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"), "{message}");
    assert!(allow.contains("GET") && message.contains("PUT is not allowed"), "Allow {allow:?}: {message}");

    let big = format!(r#"{{"owner": "{}"}}"#, "x".repeat(2000));
    let resp = http.post(format!("{base}/v1/deliveries")).header("content-type", "application/json").body(big);
    let (status, code, message) = answer(resp.send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"), "{message}");
    assert!(message.contains("1024"), "names the limit: {message}");

    let resp = http.post(format!("{base}/v1/deliveries")).header("content-type", "text/plain").body("{}");
    let (status, code, _) = answer(resp.send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (415, "unsupported_media_type"));

    for query in ["owner=a&limit=many", "limit=5", "owner=a&colour=blue"] {
        let (status, code, message) =
            answer(http.get(format!("{base}/v1/history?{query}")).send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (400, "bad_request"), "{query}: {message}");
        assert!(!message.contains("Failed to") && !message.contains('`'), "{query}: {message}");
    }
    let resp = http.post(format!("{base}/v1/deliveries")).json(&serde_json::json!({"owner": "a", "x": 1}));
    let (status, code, message) = answer(resp.send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (400, "bad_request"), "{message}");
    assert!(!message.contains("Failed to") && !message.contains('`'), "{message}");

    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_request_does_not_hold_its_connection() {
    let (dir, node) = node("slow").await;
    // Headers never finished: the connection is closed after the read timeout (500 ms here).
    let mut tcp = tokio::net::TcpStream::connect(node.http_addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: fleet\r\n").await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(400), "closed too early: {:?}", started.elapsed());

    // A body never finished: 408 in the documented form, then the connection is closed.
    let mut tcp = tokio::net::TcpStream::connect(node.http_addr).await.unwrap();
    let head =
        "POST /v1/deliveries HTTP/1.1\r\nHost: fleet\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(br#"{"owner":"#).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after 5 s");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#""error":"request_timeout""#), "{text}");

    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/metrics` says what each family means: one `# HELP` line with its own text and one
/// `# TYPE` line per family, before its samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_has_its_help_and_type() {
    let (dir, node) = node("metrics").await;
    let http = services::tls::plain_client().unwrap();
    let text = http.get(format!("http://{}/metrics", node.http_addr)).send().await.unwrap().text().await.unwrap();
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let mut helped = std::collections::BTreeSet::new();
    let mut missing = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let family = rest.split(' ').next().unwrap();
            assert!(helped.insert(family.to_string()), "{family} has two HELP lines");
            if events::prom::help(family).is_none() {
                missing.push(family.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let family = rest.split(' ').next().unwrap();
            assert!(helped.contains(family), "{family}: TYPE before HELP");
        } else {
            let name = line.split(['{', ' ']).next().unwrap();
            let known = helped.iter().any(|f| {
                name == f || ["_bucket", "_sum", "_count"].iter().any(|s| name.strip_suffix(s) == Some(f.as_str()))
            });
            assert!(known, "{name}: a sample before its family's HELP");
        }
    }
    assert!(helped.len() > 40, "{text}");
    assert!(missing.is_empty(), "families without their own help text: {missing:#?}");
}

/// The one-process node on HTTPS (`[http] tls`): a client that trusts the certificate's CA is
/// served, including the API's JSON errors; plain HTTP on the same port gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_api_is_served_over_https() {
    let (dir, mut cfg) = common::loopback_config("answers-https");
    let ca = dir.join("ca");
    services::tls::init_ca(&ca, &[], services::tls::Validity::default()).unwrap();
    cfg.http.tls = Some(pipeline::config::HttpTls { cert: ca.join("gateway.pem"), key: ca.join("gateway-key.pem") });
    let node = Node::start(&cfg).await.unwrap();
    let base = node.http_url();
    assert!(base.starts_with("https://"), "{base}");
    let https = services::tls::trusting_client(&ca.join("ca.pem")).unwrap();
    let opened = https.put(format!("{base}/v1/accounts/tls-owner")).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(opened.status(), 201);
    let account: Value = https.get(format!("{base}/v1/accounts/tls-owner")).send().await.unwrap().json().await.unwrap();
    assert_eq!(account["may_order"], true, "{account}");
    let (status, code, _) = answer(https.get(format!("{base}/v1/nothing-here")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    let plain = services::tls::plain_client().unwrap();
    let downgraded = format!("http://{}/healthz", node.http_addr);
    assert!(plain.get(downgraded).timeout(Duration::from_secs(5)).send().await.is_err(), "plain HTTP answered");
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
