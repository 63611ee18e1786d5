//! Split mode with every service as its own `pipeline serve --role ...` process, calling each
//! other over HTTPS with mutual TLS from a CA made by `pipeline certs init`, behind the gateway:
//! clients (loadgen, and this test as a customer and as an operator) know only the gateway's
//! URL. Loadgen drones fly scheduled deliveries to completion, their history is queryable, a
//! reschedule and a cancel change the delivery and its events, the access rules hold through
//! the gateway, a principal a client names itself is never believed, and callers without a
//! service certificate are refused.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A child process killed when the test ends, however it ends.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` distinct free TCP ports (all held while choosing, so none is handed out twice).
fn free_tcp_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

const ROLES: [&str; 8] = ["ingest", "accounts", "packages", "delivery", "drones", "history", "scheduler", "gateway"];

const ADMIN_KEY: &str = "split-admin-key";
const CUSTOMER_KEY: &str = "split-customer-key";

fn spawn_role(role: &str, config: &Path, dir: &Path) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["serve", "--role", role, "--shards", "2", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(dir.join(format!("data-{role}")))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let tag = role.to_string();
    std::thread::spawn(move || {
        let mut started = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !started && line.starts_with("fleetstream serving (") {
                started = true;
                let _ = tx.send(());
            } else {
                eprintln!("[{tag}] {line}");
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("the {role} role did not start"));
    Proc { child }
}

/// A split deployment's directory (with a CA from `pipeline certs init` in `ca/`) and free
/// ports: QUIC, the ingest node's own HTTP, and one per role.
struct Layout {
    dir: PathBuf,
    ca: PathBuf,
    quic: u16,
    http_port: u16,
    port: std::collections::BTreeMap<&'static str, u16>,
}

impl Layout {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fleetstream-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca");
        let status = Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(["certs", "init", "--dir"])
            .arg(&ca)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let mut ports = free_tcp_ports(ROLES.len() + 1);
        let http_port = ports.pop().unwrap();
        let port = ROLES.iter().copied().zip(ports).collect();
        Self { dir, ca, quic: free_udp(), http_port, port }
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stages(history: &Value) -> Vec<String> {
    history["events"]
        .as_array()
        .map_or_else(Vec::new, |evs| evs.iter().map(|e| e["stage"].as_str().unwrap_or("").to_string()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_as_separate_processes_schedule_fly_complete_and_keep_history() {
    let Layout { dir, ca, quic, http_port, port } = Layout::new("split");
    let url = |role: &str| format!("https://127.0.0.1:{}", port[role]);
    let mut config = format!(
        "[ingest]\nlisten = \"127.0.0.1:{quic}\"\n[http]\nlisten = \"127.0.0.1:{}\"\ndrain_delay_ms = 2000\napi_keys = [{{ key = \"{ADMIN_KEY}\", role = \"admin\" }}, {{ key = \"{CUSTOMER_KEY}\", owner = \"split-test\" }}]\n[split]\ntls_dir = {:?}\nengine_quic = \"127.0.0.1:{quic}\"\n[split.endpoints]\n",
        http_port,
        ca.display().to_string(),
    );
    for role in ROLES {
        config.push_str(&format!("{role} = [\"{}\"]\n", url(role)));
    }
    let config_path = dir.join("split.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut procs: Vec<Proc> = ROLES.iter().map(|role| spawn_role(role, &config_path, &dir)).collect();

    let internal = services::tls::client(&services::tls::TlsFiles::in_dir(&ca, "client")).unwrap();
    let public = services::tls::trusting_client(&ca.join("ca.pem")).unwrap();
    // Every role answers its health check over TLS.
    for role in ROLES {
        eventually(&format!("{role} healthy"), || {
            let req = internal.get(format!("{}/healthz", url(role)));
            async move { req.send().await.ok().filter(|r| r.status().is_success()).map(|_| Value::Null) }
        })
        .await;
    }

    let gateway = url("gateway");
    eventually("the gateway ready", || {
        let req = public.get(format!("{gateway}/readyz"));
        async move { req.send().await.ok().filter(|r| r.status().is_success()).map(|_| Value::Null) }
    })
    .await;

    // A fleet of loadgen drones, driven through the gateway alone: it opens the customers'
    // accounts and registers the drones with an admin key, the customers schedule, the drones
    // get their missions over QUIC from the ingest process and fly them.
    let pem = std::fs::read_to_string(ca.join("ca.pem")).unwrap();
    let mut cfg = loadgen::LoadConfig::new(
        format!("127.0.0.1:{quic}").parse().unwrap(),
        gateway.clone(),
        ingest::Trust::Pem(pem),
    );
    cfg.split = loadgen::SplitTargets { drones_api: None, accounts_api: None, tls_dir: Some(ca.clone()) };
    cfg.api_key = Some(ADMIN_KEY.into());
    cfg.drones = 20;
    cfg.drone_id_base = 1;
    cfg.rate = 2_000.0;
    cfg.connections = 2;
    cfg.duration = Duration::from_secs(6);
    cfg.deliveries_per_s = 3.0;
    cfg.leg = Duration::from_millis(400);
    cfg.settle = Duration::from_secs(10);
    let report = loadgen::run(cfg, Arc::new(|_| {})).await.unwrap();
    assert!(report.deliveries_scheduled > 0, "{report}");
    assert_eq!(report.deliveries_completed, report.deliveries_scheduled, "{report}");
    assert_eq!((report.lost, report.duplicates), (0, 0), "{report}");

    // The Delivery role killed with SIGKILL and started again on its data dir: its records come
    // back, and it follows delivery-events on from the position stored with them.
    let delivery = ROLES.iter().position(|r| *r == "delivery").unwrap();
    procs[delivery].child.kill().unwrap();
    procs[delivery].child.wait().unwrap();
    procs[delivery] = spawn_role("delivery", &config_path, &dir);
    eventually("delivery healthy again", || {
        let req = internal.get(format!("{}/healthz", url("delivery")));
        async move { req.send().await.ok().filter(|r| r.status().is_success()).map(|_| Value::Null) }
    })
    .await;

    // The history process stored every completed delivery's events; find one by its owner,
    // through the gateway.
    let complete = eventually("a completed delivery in the history", || {
        let (public, base) = (public.clone(), gateway.clone());
        async move {
            for customer in 0..report.deliveries_scheduled {
                let page: Value = public
                    .get(format!("{base}/v1/history?owner=customer-{customer}"))
                    .bearer_auth(ADMIN_KEY)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let done = page["deliveries"].as_array()?.iter().find(|d| d["stage"] == "delivery_complete").cloned();
                if done.is_some() {
                    return done;
                }
            }
            None
        }
    })
    .await;
    let id = complete["delivery_id"].as_u64().unwrap();
    let admin_get = |path: String| {
        let req = public.get(format!("{gateway}{path}")).bearer_auth(ADMIN_KEY);
        async move { req.send().await.unwrap() }
    };
    let history: Value = admin_get(format!("/v1/deliveries/{id}/history")).await.json().await.unwrap();
    let seen = stages(&history);
    assert_eq!(seen.first().map(String::as_str), Some("created"), "{history}");
    assert_eq!(seen.last().map(String::as_str), Some("delivery_complete"), "{history}");
    assert!(seen.iter().any(|s| s == "in_transit"), "{history}");
    let record: Value = admin_get(format!("/v1/deliveries/{id}")).await.json().await.unwrap();
    assert_eq!(record["stage"], "delivery_complete", "{record}");

    // Its trace crosses the processes: the scheduler's, Drone Management's, the ingest's (the
    // engine and the mission) and the history's own spans, kept by the history role.
    let trace: Value = admin_get(format!("/v1/deliveries/{id}/trace")).await.json().await.unwrap();
    let spans = trace["spans"].as_array().unwrap_or_else(|| panic!("{trace}"));
    let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names.first(), Some(&"scheduler.create"), "{names:?}");
    for name in ["drones.assign", "mission.send", "mission.ack", "engine.derive.delivery_complete", "history.store"] {
        assert!(names.contains(&name), "no {name}: {names:?}");
    }
    assert_eq!(trace["trace_id"].as_str().map(str::len), Some(32), "{trace}");

    // The access rules hold through the gateway: a customer key sees another owner's delivery
    // as missing, may not order for another owner, and may not use the admin routes, even when
    // it names itself an admin in the header the gateway uses to pass principals on.
    let customer = |req: reqwest::RequestBuilder| req.bearer_auth(CUSTOMER_KEY);
    let resp = customer(public.get(format!("{gateway}/v1/deliveries/{id}"))).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let order_for = |owner: &str| {
        json!({
            "owner": owner, "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": {"lat": 47.61, "lon": -122.31},
            "package": {"size": "large", "weight_kg": 4.0}
        })
    };
    let resp =
        customer(public.post(format!("{gateway}/v1/deliveries"))).json(&order_for("customer-0")).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let resp = customer(public.get(format!("{gateway}/v1/queues")))
        .header("x-fleetstream-principal", "admin forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = public.get(format!("{gateway}/v1/queues")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    // Straight to a role, without a service certificate, the header is refused outright.
    let resp = public
        .post(format!("{}/v1/deliveries", url("scheduler")))
        .header("x-fleetstream-principal", "open")
        .json(&order_for("split-test"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // The engine's admin routes are forwarded to the ingest role, the stream as a stream.
    let queues: Value = admin_get("/v1/queues".into()).await.json().await.unwrap();
    assert_eq!(queues["queues"].as_array().map(Vec::len), Some(2), "{queues}");
    let streams: Value = admin_get("/v1/streams".into()).await.json().await.unwrap();
    assert!(streams["streams"][1]["next"].as_u64() > Some(0), "{streams}");
    let mut sse = admin_get("/v1/streams/delivery-events/events?from=earliest".into()).await;
    assert_eq!(sse.status(), 200);
    let mut text = String::new();
    while !text.contains("event: batch") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), sse.chunk()).await.unwrap().unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(sse);
    // Unknown routes and methods answer in the API's JSON form.
    let resp = admin_get("/v1/nothing-here".into()).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "not_found");
    let resp = public.put(format!("{gateway}/v1/history")).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(resp.status(), 405);

    // Reschedule and cancel through the gateway change the delivery and its events.
    let resp = public
        .put(format!("{gateway}/v1/accounts/split-test"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"may_order": true}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap_or_default());
    let resp =
        customer(public.post(format!("{gateway}/v1/deliveries"))).json(&order_for("split-test")).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    let id = created["delivery_id"].as_u64().unwrap();
    let resp = customer(public.patch(format!("{gateway}/v1/deliveries/{id}")))
        .json(&json!({"dropoff": {"lat": 47.65, "lon": -122.4}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap_or_default());
    let record: Value =
        customer(public.get(format!("{gateway}/v1/deliveries/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(record["dropoff"]["lat"], 47.65, "{record}");
    let resp = customer(public.delete(format!("{gateway}/v1/deliveries/{id}"))).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    eventually("the cancellation in the delivery record", || {
        let req = customer(public.get(format!("{gateway}/v1/deliveries/{id}")));
        async move {
            let v: Value = req.send().await.ok()?.json().await.ok()?;
            (v["stage"] == "cancelled").then_some(v)
        }
    })
    .await;
    let history = eventually("the cancellation in the history", || {
        let req = customer(public.get(format!("{gateway}/v1/deliveries/{id}/history")));
        async move {
            let v: Value = req.send().await.ok()?.json().await.ok()?;
            (stages(&v).last().map(String::as_str) == Some("cancelled")).then_some(v)
        }
    })
    .await;
    assert_eq!(stages(&history), ["created", "rescheduled", "cancelled"], "{history}");
    let package: Value = internal
        .get(format!("{}/internal/v1/packages/{id}", url("packages")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(package["size"], "large");

    // Without a service certificate: the internal-only accounts process refuses the TLS
    // handshake, and the drones process refuses its internal routes.
    assert!(public.get(format!("{}/internal/v1/accounts/split-test", url("accounts"))).send().await.is_err());
    let resp = public
        .put(format!("{}/internal/v1/assignments/1", url("drones")))
        .json(&json!({"pickup": {"lat": 1.0, "lon": 1.0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "client_certificate_required");
    // A drain turns the gateway's readiness off before its listener closes.
    let gw = ROLES.iter().position(|r| *r == "gateway").unwrap();
    let pid = procs[gw].child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    eventually("the draining gateway not ready", || {
        let req = public.get(format!("{gateway}/readyz"));
        async move { req.send().await.ok().filter(|r| r.status() == 503).map(|_| Value::Null) }
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `transport = "plain"`: the roles speak plain HTTP and leave identity to a mesh. Each binds
/// the address `[split.listen]` gives and is called by the name its endpoint gives (as a pod
/// binds `0.0.0.0:8080` and is called as `drones.fleet.svc:8080`); a fleet flies through the
/// gateway with lost 0. Without `mesh = true` a role refuses to listen beyond loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_transport_behind_a_mesh_with_separate_listen_and_advertised_addresses() {
    let Layout { dir, ca, quic, http_port, port } = Layout::new("split-plain");
    let head = format!(
        "[ingest]\nlisten = \"127.0.0.1:{quic}\"\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n[split]\ntls_dir = {:?}\nengine_quic = \"127.0.0.1:{quic}\"\ntransport = \"plain\"\n",
        ca.display().to_string(),
    );
    let mut endpoints = String::from("[split.endpoints]\n");
    let mut listen = String::from("[split.listen]\n");
    for role in ROLES {
        endpoints.push_str(&format!("{role} = [\"http://localhost:{}\"]\n", port[role]));
        listen.push_str(&format!("{role} = \"127.0.0.1:{}\"\n", port[role]));
    }
    // Beyond loopback without a mesh: refused, saying why.
    let exposed = dir.join("exposed.toml");
    std::fs::write(&exposed, format!("{head}{endpoints}[split.listen]\naccounts = \"0.0.0.0:{}\"\n", port["accounts"]))
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["serve", "--role", "accounts", "--config"])
        .arg(&exposed)
        .arg("--data-dir")
        .arg(dir.join("data-exposed"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("mesh = true"), "{stderr}");

    let config_path = dir.join("plain.toml");
    std::fs::write(&config_path, format!("{head}{endpoints}{listen}")).unwrap();
    let _procs: Vec<Proc> = ROLES.iter().map(|role| spawn_role(role, &config_path, &dir)).collect();
    let gateway = format!("http://localhost:{}", port["gateway"]);
    let http = services::tls::plain_client().unwrap();
    eventually("the gateway ready", || {
        let req = http.get(format!("{gateway}/readyz"));
        async move { req.send().await.ok().filter(|r| r.status().is_success()).map(|_| Value::Null) }
    })
    .await;
    let pem = std::fs::read_to_string(ca.join("ca.pem")).unwrap();
    let mut cfg = loadgen::LoadConfig::new(
        format!("127.0.0.1:{quic}").parse().unwrap(),
        gateway.clone(),
        ingest::Trust::Pem(pem),
    );
    cfg.drones = 10;
    cfg.drone_id_base = 1;
    cfg.rate = 1_000.0;
    cfg.connections = 1;
    cfg.duration = Duration::from_secs(4);
    cfg.deliveries_per_s = 2.0;
    cfg.leg = Duration::from_millis(400);
    cfg.settle = Duration::from_secs(10);
    let report = loadgen::run(cfg, Arc::new(|_| {})).await.unwrap();
    assert!(report.deliveries_scheduled > 0, "{report}");
    assert_eq!(report.deliveries_completed, report.deliveries_scheduled, "{report}");
    assert_eq!((report.lost, report.duplicates), (0, 0), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}
