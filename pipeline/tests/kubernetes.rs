//! The example Kubernetes manifest (`docs/kubernetes.yaml`) against the config it carries: the
//! config parses as `pipeline serve` reads it, and for every role a Deployment runs that role
//! with its liveness and readiness probes on the port the role binds, and a Service of the
//! role's name is where the other roles' endpoints say it is.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

use pipeline::roles::{Role, Transport};
use serde::Deserialize;
use serde_json::Value;

fn manifest() -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/kubernetes.yaml")).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde_json::to_value(serde_yaml_ng::Value::deserialize(doc).unwrap()).unwrap())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifest"))
}

fn port_of(url: &str) -> (String, u16) {
    let parsed = reqwest::Url::parse(url).unwrap();
    (parsed.host_str().unwrap().to_string(), parsed.port_or_known_default().unwrap())
}

#[test]
fn every_role_has_a_deployment_and_service_whose_probes_and_ports_match_the_config() {
    let docs = manifest();
    let config_map = find(&docs, "ConfigMap", "fleetstream-config");
    let toml = config_map["data"]["fleetstream.toml"].as_str().unwrap();
    let dir = std::env::temp_dir().join(format!("fleetstream-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fleetstream.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = pipeline::Config::load(Some(&path)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(cfg.split.transport, Transport::Plain);
    assert!(cfg.split.mesh, "plain transport beyond loopback needs mesh = true");

    for role in Role::SPLIT {
        let name = role.name();
        let bind = cfg.split.listen.of(role).unwrap_or_else(|| panic!("[split.listen] {name}"));
        cfg.split.check(role, bind).unwrap();
        let endpoints = cfg.split.endpoints.of(role);
        assert_eq!(endpoints.len(), 1, "{name}: {endpoints:?}");
        let (host, port) = port_of(&endpoints[0]);
        // Called by its Service's name in the namespace, on the Service's port.
        let service = find(&docs, "Service", name);
        let namespace = service["metadata"]["namespace"].as_str().unwrap();
        assert_eq!(host, format!("{name}.{namespace}.svc"), "{name}");
        let ports = service["spec"]["ports"].as_array().unwrap();
        let http = ports.iter().find(|p| p["name"] == "http").unwrap();
        assert_eq!(http["port"].as_u64(), Some(u64::from(port)), "{name}");
        assert_eq!(http["targetPort"].as_u64(), Some(u64::from(bind.port())), "{name}");
        let deployment = find(&docs, "Deployment", name);
        let selector = &service["spec"]["selector"];
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        for (k, v) in selector.as_object().unwrap() {
            assert_eq!(&labels[k], v, "{name}: the Service selects its Deployment's pods");
        }
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        let at = args.iter().position(|a| *a == "--role").unwrap();
        assert_eq!(args[at + 1], name);
        let container_ports = container["ports"].as_array().unwrap();
        assert!(container_ports.iter().any(|p| p["containerPort"].as_u64() == Some(u64::from(bind.port()))), "{name}");
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{name} {probe}");
            assert_eq!(get["port"].as_u64(), Some(u64::from(bind.port())), "{name} {probe}");
        }
        // The config the pod reads is the ConfigMap checked here.
        let mounts = container["volumeMounts"].as_array().unwrap();
        let config_mount = mounts.iter().find(|m| m["name"] == "config").unwrap();
        let config_arg = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
        assert!(config_arg.starts_with(config_mount["mountPath"].as_str().unwrap()), "{name}: {config_arg}");
    }

    // Drones and the roles' subscriptions reach the ingest's QUIC port through its Service.
    let (quic_host, quic_port) = cfg.split.engine_quic.rsplit_once(':').unwrap();
    assert_eq!(quic_host, "ingest.fleet.svc");
    let quic = find(&docs, "Service", "ingest")["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["protocol"] == "UDP")
        .cloned()
        .unwrap();
    assert_eq!(quic["port"].as_u64(), quic_port.parse::<u64>().ok());
    assert_eq!(quic["targetPort"].as_u64(), Some(u64::from(cfg.ingest.listen.port())));
}
