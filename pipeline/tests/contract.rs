//! The public API against its own document: a property-based fuzzer (schemathesis, from
//! PyPI) generates requests from `GET /v1/openapi.json` and sends them to a real node, and the
//! test fails on any server error or contract violation (an undeclared status, a body that
//! does not match its schema, a schema-valid request refused, a schema-violating one accepted,
//! an undeclared method answered).
//!
//! Schemathesis is looked for at `FLEETSTREAM_SCHEMATHESIS`, then on `PATH`; `.ci/run`
//! installs it into a venv. Without it the test prints SKIP, or fails when
//! `FLEETSTREAM_REQUIRE_SERVICES=1`.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::process::Command;

use pipeline::Node;

fn schemathesis() -> Option<String> {
    let mut candidates = std::env::var("FLEETSTREAM_SCHEMATHESIS").into_iter().chain(["schemathesis".to_string()]);
    candidates.find(|program| Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_keeps_its_documented_contract_under_generated_requests() {
    let Some(program) = schemathesis() else {
        let required = std::env::var("FLEETSTREAM_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
        assert!(!required, "schemathesis is required (FLEETSTREAM_SCHEMATHESIS or PATH) but was not found");
        println!("SKIP the_api_keeps_its_documented_contract_under_generated_requests: schemathesis not found");
        return;
    };
    let (dir, cfg) = common::loopback_config("contract");
    let node = Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    // An account, so that some generated orders get past it.
    let http = services::tls::plain_client().unwrap();
    let opened = http.put(format!("{base}/v1/accounts/0")).json(&serde_json::json!({})).send().await.unwrap();
    assert!(opened.status().is_success());

    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/contract/schemathesis.toml");
    let run = tokio::task::spawn_blocking({
        let base = base.clone();
        move || {
            Command::new(program)
                .args(["--config-file", config, "run", &format!("{base}/v1/openapi.json"), "--url", &base])
                .args(["--checks", "all", "--max-examples", "60", "--seed", "20261201", "--no-color"])
                // A stream that never ends, which a request-response fuzzer cannot judge; the
                // stream tests (tests/streams.rs) check it.
                .args(["--exclude-path", "/v1/streams/{topic}/events"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(run.status.success(), "schemathesis found contract failures:\n{report}");
    // "N generated, ..." in its summary: the run must have been a real one.
    let generated = report
        .lines()
        .find_map(|l| l.trim().split_once(" generated").and_then(|(n, _)| n.trim().parse::<u64>().ok()))
        .unwrap_or(0);
    assert!(generated >= 1_000, "only {generated} requests were generated:\n{report}");
    println!("schemathesis: {generated} generated requests, no failure");
}
