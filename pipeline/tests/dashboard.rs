//! The dashboard in a real browser: Debian's headless Chromium, driven over WebDriver by
//! chromedriver (`.ci/run` installs both where absent), watches a node while loadgen flies a
//! fleet against it, and sees the numbers behind the page's `data-metric` hooks appear and
//! change; clicking a delivery shows its events. With `FLEETSTREAM_SCREENSHOT=path` the test
//! also saves what the browser showed mid-flight (`docs/dashboard.png` was made so).

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

/// `chromedriver` and the browser it drives, when both are installed.
fn browser(test: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let purpose = "drive a headless browser";
    common::program(test, &["chromedriver"], purpose).zip(common::program(
        test,
        &["chromium", "chromium-browser"],
        purpose,
    ))
}

/// A headless browser session over the W3C WebDriver protocol.
struct Browser {
    driver: std::process::Child,
    http: reqwest::Client,
    session: String,
}

impl Browser {
    async fn start(chromedriver: &std::path::Path, chromium: &std::path::Path) -> Self {
        let port = common::free_tcp_port();
        let driver = std::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let http = services::tls::plain_client().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{base}/status")).send().await
                && r.json::<Value>().await.is_ok_and(|v| v["value"]["ready"] == true)
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1250"],
            },
        }}});
        let v: Value = http.post(format!("{base}/session")).json(&caps).send().await.unwrap().json().await.unwrap();
        let session = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no browser session: {v}")).to_string();
        Self { driver, http, session: format!("{base}/session/{session}") }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url}))).await;
    }

    /// The element `css` selects, if any.
    async fn element(&self, css: &str) -> Option<String> {
        let v =
            self.call(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": css}))).await;
        // A found element is `{"element-6066-…": id}`; a missing one is an error object.
        v.get("element-6066-11e4-a52e-4f735466cecf")?.as_str().map(str::to_string)
    }

    async fn text(&self, css: &str) -> String {
        let id = self.element(css).await.unwrap_or_else(|| panic!("no element {css}"));
        self.call(reqwest::Method::GET, &format!("/element/{id}/text"), None).await.as_str().unwrap_or_default().into()
    }

    /// The number an element holds, which must be all it holds.
    async fn number(&self, metric: &str) -> Option<u64> {
        let text = self.text(&format!("[data-metric=\"{metric}\"]")).await;
        text.trim().parse().ok()
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default()).unwrap()
    }

    async fn quit(mut self) {
        let _ = self.http.delete(&self.session).send().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_flying_fleet_live_in_a_browser() {
    let test = "the_dashboard_shows_a_flying_fleet_live_in_a_browser";
    let Some((chromedriver, chromium)) = browser(test) else { return };
    let (dir, cfg) = common::loopback_config("dashboard");
    let node = pipeline::Node::start(&cfg).await.unwrap();
    let base = format!("http://{}", node.http_addr);
    let browser = Browser::start(&chromedriver, &chromium).await;
    browser.goto(&format!("{base}/")).await;
    assert_eq!(browser.number("drones_online").await, Some(0), "an idle node shows 0");

    // A fleet of 40 drones flies for 12 s, deliveries scheduled throughout.
    let mut load =
        loadgen::LoadConfig::new(node.quic_addr, base.clone(), ingest::Trust::Pem(node.certificate_pem.clone()));
    load.drones = 40;
    load.connections = 2;
    load.rate = 2_000.0;
    load.duration = Duration::from_secs(12);
    load.leg = Duration::from_millis(1500);
    load.deliveries_per_s = 5.0;
    let fleet = tokio::spawn(loadgen::run(load, Arc::new(|_: &loadgen::Progress| {})));

    let (mut online, mut rates, mut in_flight, mut shot) = (0, std::collections::BTreeSet::new(), 0, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(700)).await;
        online = online.max(browser.number("drones_online").await.expect("drones_online is a number"));
        rates.insert(browser.number("events_per_s").await.expect("events_per_s is a number"));
        let now_in_flight = browser.number("deliveries_in_flight").await.expect("a number");
        if let (Ok(path), false) = (std::env::var("FLEETSTREAM_SCREENSHOT"), shot)
            && now_in_flight > 0
            && deadline.saturating_duration_since(std::time::Instant::now()) < Duration::from_secs(4)
        {
            // Late in the flight: charts drawn, deliveries under way.
            std::fs::write(&path, browser.screenshot().await).unwrap();
            shot = true;
        }
        in_flight = in_flight.max(now_in_flight);
    }
    println!("{test}: drones online up to {online}, events/s seen {rates:?}, deliveries in flight up to {in_flight}");
    assert_eq!(online, 40, "every flying drone shows as online");
    let moving: Vec<_> = rates.iter().filter(|r| **r > 0).collect();
    assert!(moving.len() >= 2, "events/s appears and changes: {rates:?}");
    assert!(moving.iter().all(|r| **r <= 4_000), "events/s near the fleet's 2,000: {rates:?}");
    assert!(in_flight > 0, "deliveries in flight are shown");

    // Clicking a delivery shows its record and events.
    // The list is redrawn as deliveries move, so a row found may be gone by the time it is
    // clicked: until the detail shows, a row is found and clicked again each second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut clicked: Option<std::time::Instant> = None;
    loop {
        if clicked.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            let row = browser.element("#recent tr[data-id]").await.expect("a delivery is listed");
            browser.call(reqwest::Method::POST, &format!("/element/{row}/click"), Some(json!({}))).await;
            clicked = Some(std::time::Instant::now());
        }
        let detail = browser.text("#detail").await;
        if detail.contains("\"history\"") && detail.contains("\"stage\"") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the delivery's detail never showed: {detail}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ... and its trace as a waterfall, the schedule first.
    loop {
        let first = match browser.element("#waterfall .span-row .name").await {
            Some(_) => browser.text("#waterfall .span-row .name").await,
            None => String::new(),
        };
        if first.starts_with("scheduler.create") && browser.element("[data-span=\"drones.assign\"]").await.is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the delivery's trace never showed: {first:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Ok(path) = std::env::var("FLEETSTREAM_SCREENSHOT") {
        let script = json!({"script": "document.querySelector('section.wide').scrollIntoView()", "args": []});
        browser.call(reqwest::Method::POST, "/execute/sync", Some(script)).await;
        std::fs::write(path.replace(".png", "-trace.png"), browser.screenshot().await).unwrap();
    }

    let report = fleet.await.unwrap().unwrap();
    assert_eq!((report.lost, report.duplicates), (0, 0), "{report}");
    browser.quit().await;
    node.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
