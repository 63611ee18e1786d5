//! The typed configuration of `pipeline serve`, layered: built-in defaults, then a TOML file,
//! then `FLEETSTREAM_<SECTION>__<KEY>` environment variables (for example
//! `FLEETSTREAM_ENGINE__SHARDS=4`), then command-line flags. Unknown keys are errors, so a typo
//! is reported instead of silently ignored.
//!
//! ```toml
//! data_dir = "data"            # log/, checkpoints/ and tls/ live here
//!
//! [ingest]                     # QUIC ingest; see ingest::ServerConfig for every field
//! listen = "127.0.0.1:4433"
//! # cert = "tls/cert.pem"      # unset: self-signed at start, written to DATA_DIR/tls/
//! # key = "tls/key.pem"
//! max_body_bytes = 4194304
//!
//! [http]
//! listen = "127.0.0.1:8080"
//! api_keys = []                # none: open; otherwise required on all but /healthz, /readyz, /metrics
//! # api_keys = [{ key = "…", owner = "customer-1" }, { sha256 = "<hex>", role = "admin" }]
//! # api_keys_file = "keys.toml"   # more keys, `api_keys = [...]` in the same form
//! # tls = { cert = "ca/scheduler.pem", key = "ca/scheduler-key.pem" }   # HTTPS instead of HTTP
//! max_body_bytes = 1048576    # a larger request body is 413 naming this limit
//! read_timeout_ms = 10000      # to send a request's headers, then its body (408)
//! drain_delay_ms = 0           # on shutdown, not ready but still serving this long first
//! drain_timeout_ms = 5000      # on shutdown, then lingering connections are dropped
//! [http.throttle]              # per principal (else peer IP) on /v1/deliveries
//! rate_per_s = 20000
//! burst = 40000
//!
//! [engine]
//! shards = 0                   # 0: one per core
//! shard_queue = 256
//! subscriber_queue = 1024
//! checkpoint_interval_ms = 1000
//! max_producers = 100000       # batch-number windows kept (about 500 bytes each); oldest let go
//! max_drones_per_shard = 250000  # drones tracked (up to about 400 bytes each); idle ones let go
//! max_cursors = 10000          # named cursors per topic; past it a new name needs an idle one
//! cursor_idle_h = 168          # ...idle this long, or it is refused (limit_reached)
//! [engine.derive]
//! dropoff_radius_m = 30.0
//!
//! [log]
//! backend = "embedded"         # or "jetstream": several nodes share the shards ([jetstream])
//! fsync = "every_batch"        # or "interval" (fsync_interval_ms) or "none"
//! segment_bytes = 134217728
//! max_bytes = 0                # 0: no cap; otherwise appends past it get "storage full"
//! retention_secs = 86400
//!
//! [queues.drone_commands]      # and [queues.notifications]; see queue::state::QueueConfig
//! visibility_timeout_ms = 30000
//! max_attempts = 5
//! max_messages = 1000000
//! max_payload_bytes = 65536
//! exclusive_keys = true        # false for notifications: competing consumers
//!
//! [notify]
//! notifier = true              # this node consumes `notifications`
//! # sms_webhook = "https://sms-gateway.example/send"   # JSON {to, text}; unset: SMS refused
//! # smtp_relay = "127.0.0.1:25"                        # plain SMTP; unset: email refused
//! email_from = "fleetstream@localhost"
//! timeout_ms = 5000
//!
//! [services.calls]             # every internal call (scheduler → accounts, package, ...)
//! timeout_ms = 2000            # per attempt
//! retries = 2                  # idempotent calls only, backoff with full jitter:
//! backoff_min_ms = 20
//! backoff_max_ms = 500
//! concurrency = 1024           # in flight per dependency; more are refused at once
//! health_interval_ms = 1000    # remote instances' health checks
//! [services.calls.breaker]
//! window_s = 10
//! min_calls = 20
//! failure_ratio = 0.5
//! open_ms = 5000
//! probes = 3
//! [services]
//! idempotency_retention_s = 86400
//! idempotency_keys = 100000    # remembered at most (about 1 KiB each); oldest forgotten first
//! max_subscriptions_per_delivery = 16   # more are refused (409 limit_reached)
//! finished_deliveries_held = 100000     # finished deliveries kept in memory (about 300 B each);
//!                                       # older ones are read from the store when asked for
//! store = "embedded"           # or "postgres": the services' state in one store all nodes share
//! # url = "postgresql://postgres@127.0.0.1:5432/fleetstream"
//! # schema = "fleetstream"     # created and migrated at start
//!
//! [history]
//! store = "embedded"           # or "postgres": Delivery History in PostgreSQL
//! # url = "postgresql://postgres@127.0.0.1:5432/fleetstream"
//! # schema = "fleetstream"     # created and migrated at start
//!
//! [jetstream]
//! url = "nats://127.0.0.1:4222"
//! queues = []                  # "notifications", "drone-commands": those queues on JetStream
//!                              # (work-queue streams, ack wait = visibility timeout, max
//!                              # deliver = attempts, DLQ; drone sessions hold their keys)
//! node_id = ""                 # backend = "jetstream": this node's lease name (default host + a name kept in data_dir)
//! lease_ms = 3000              # a dead node's shards move to the others after this long
//!
//! [tracing]
//! # otlp_endpoint = "http://127.0.0.1:4318"   # OTLP/HTTP collector; unset: spans only logged
//! # service_name = "fleetstream"              # split roles default to fleetstream-<role>
//!
//! [mqtt]                       # the MQTT bridge (see crate::mqtt); off unless url is set
//! # url = "mqtt://127.0.0.1:1883"             # or mqtts://host:8883 with ca
//! # username = "fleetstream"                  # and password
//! # ca = "broker-ca.pem"                      # mqtts: the broker's CA
//! client_id = ""               # "": fleetstream-<node name>, kept in data_dir (persistent session)
//! topics = ["fleetstream/telemetry/+"]        # QoS 1; each message one event or a JSON array
//! share_group = "fleetstream"  # $share/<group>/<topic>; "": plain subscriptions
//! batch_max = 1024             # events per batch
//! linger_ms = 0                # 0: a batch goes as soon as no more messages wait
//! max_batches = 8              # batches waiting for the engine; the broker is not read meanwhile
//! max_message_bytes = 1048576
//! keep_alive_s = 30
//! reconnect_ms = 1000
//! missions = ""                # drones whose missions go over MQTT: "all", "LO..HI"; "": QUIC
//! missions_topic = "fleetstream/missions"     # <topic>/{drone_id}, answered on .../ack
//! missions_in_flight = 1024    # published and not yet answered, at most
//!
//! [dashboard]                  # GET / : the live page; GET /v1/dashboard/stream : its SSE feed
//! enabled = true
//! max_drones = 100000          # drones tracked (about 48 bytes each); more are counted, not kept
//! max_deliveries = 100000      # deliveries in flight tracked (about 24 bytes each)
//! map_drones = 2000            # drones drawn on the map, the most recently heard
//!
//! [services.drones]
//! min_battery_pct = 30.0       # a drone needs this much to be assigned
//! max_distance_km = 200.0      # from the pickup
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;
use crate::log::LogConfig;
use crate::queue::QueuesConfig;

/// Everything `pipeline serve` needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the server's files. Default `data`, relative to the working directory.
    pub data_dir: PathBuf,
    /// The QUIC ingest server.
    pub ingest: ingest::ServerConfig,
    /// The HTTP API.
    pub http: HttpConfig,
    /// The engine.
    pub engine: EngineConfig,
    /// The durable log under `data_dir/log`.
    pub log: LogConfig,
    /// The queue path, journalled under `data_dir/queues`.
    pub queues: QueuesConfig,
    /// Where customer notifications are sent.
    pub notify: services::notify::NotifyConfig,
    /// The edge services: internal call policy, drone assignment.
    pub services: services::ServicesConfig,
    /// Split mode: where each role is (see [`crate::roles`]).
    pub split: crate::roles::SplitConfig,
    /// Span export over OTLP (spans are always logged under `fleetstream::span` at debug).
    pub tracing: services::trace::TracingConfig,
    /// Where Delivery History is kept: embedded (default) or PostgreSQL.
    pub history: services::history::HistoryConfig,
    /// NATS JetStream: the broker, and which queues live there.
    pub jetstream: crate::jetstream::JetStreamConfig,
    /// The MQTT bridge: telemetry from an MQTT broker (off unless `url` is set).
    pub mqtt: crate::mqtt::MqttConfig,
    /// The live dashboard at `GET /`.
    pub dashboard: crate::dashboard::DashboardConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            ingest: ingest::ServerConfig::default(),
            http: HttpConfig::default(),
            engine: EngineConfig::default(),
            log: LogConfig::default(),
            queues: QueuesConfig::default(),
            notify: services::notify::NotifyConfig::default(),
            services: services::ServicesConfig::default(),
            split: crate::roles::SplitConfig::default(),
            tracing: services::trace::TracingConfig::default(),
            history: services::history::HistoryConfig::default(),
            jetstream: crate::jetstream::JetStreamConfig::default(),
            mqtt: crate::mqtt::MqttConfig::default(),
            dashboard: crate::dashboard::DashboardConfig::default(),
        }
    }
}

/// The HTTP API's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// TCP address. Default `127.0.0.1:8080`: loopback until an operator exposes it.
    pub listen: SocketAddr,
    /// Per-client limits on the public delivery API (see `services::throttle`).
    pub throttle: services::throttle::ThrottleConfig,
    /// API keys clients must present (`Authorization: Bearer <key>` or `x-api-key`) on every
    /// route but `/healthz`, `/readyz` and `/metrics`, each bound to a principal: `{ key,
    /// owner }` a customer, `{ key, role = "admin" }` an operator, `sha256` instead of `key` to
    /// keep only the digest here, a bare string an admin key (see `services::auth`). Default
    /// none: the API is open, which suits a loopback listener; set keys before exposing it.
    pub api_keys: Vec<services::auth::ApiKeySpec>,
    /// A TOML file with more keys (`api_keys = [...]`, same form), read at start. Default none.
    pub api_keys_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate and key (PEM) instead of plain HTTP. Default none:
    /// plain HTTP, for a loopback listener; set it before exposing the API.
    pub tls: Option<HttpTls>,
    /// On shutdown, how long requests in flight may take to finish, ms; connections still
    /// open then (a client that never finishes sending, a lingering keep-alive) are dropped,
    /// so the engine can drain. Default 5,000: a scheduling saga takes milliseconds, and SSE
    /// streams end as soon as the drain starts.
    pub drain_timeout_ms: u64,
    /// The largest request body accepted, bytes; a larger one is `413 payload_too_large` naming
    /// the limit. Default 1 MiB: an order is a few hundred bytes, a drone registration of
    /// 5,000 ids about 50 KiB.
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's headers, and then its body, ms: one that
    /// sends half a request is cut off (headers) or answered `408` (body) instead of holding a
    /// connection. Default 10,000.
    pub read_timeout_ms: u64,
    /// On shutdown, how long the node stays up with `/readyz` answering `503 draining` before
    /// its listeners close, ms: the time a load balancer (a Kubernetes Service) needs to stop
    /// sending it new clients. Default 0: one process on its own has nobody to tell.
    pub drain_delay_ms: u64,
}

/// The public listener's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTls {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
}

impl HttpConfig {
    /// What a request may be, for [`services::uniform`].
    pub fn request_rules(&self) -> services::RequestRules {
        services::RequestRules {
            max_body_bytes: self.max_body_bytes,
            read_timeout: std::time::Duration::from_millis(self.read_timeout_ms),
        }
    }

    /// How long a client may take to send a request's headers.
    pub fn header_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.read_timeout_ms)
    }

    /// The accepted keys: `api_keys` and those of `api_keys_file`.
    pub fn keys(&self) -> Result<std::sync::Arc<services::auth::ApiKeys>, crate::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct KeysFile {
            api_keys: Vec<services::auth::ApiKeySpec>,
        }
        let mut specs = self.api_keys.clone();
        if let Some(path) = &self.api_keys_file {
            let file: KeysFile = Figment::from(Toml::file_exact(path))
                .extract()
                .map_err(|e| crate::Error::Config(format!("API keys in {}: {e}", path.display())))?;
            specs.extend(file.api_keys);
        }
        services::auth::ApiKeys::from_specs(&specs).map_err(|e| crate::Error::Config(e.to_string()))
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            throttle: services::throttle::ThrottleConfig::default(),
            api_keys: Vec::new(),
            api_keys_file: None,
            tls: None,
            drain_timeout_ms: 5_000,
            drain_delay_ms: 0,
            max_body_bytes: 1 << 20,
            read_timeout_ms: 10_000,
        }
    }
}

impl Config {
    /// Defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, crate::Error> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(crate::Error::Config(format!("config file {} does not exist", file.display())));
            }
            figment = figment.merge(Toml::file(file));
        }
        // Only sectioned keys: FLEETSTREAM_NATS_URL and friends belong to the test harness.
        figment = figment.merge(Env::prefixed("FLEETSTREAM_").filter(|k| k.as_str().contains("__")).split("__"));
        figment.extract().map_err(|e| crate::Error::Config(e.to_string()))
    }

    /// Defaults, then the TOML `text` (no environment): a config file's contents as
    /// [`Config::load`] reads them.
    pub fn from_toml(text: &str) -> Result<Self, crate::Error> {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| crate::Error::Config(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_file_and_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("fleetstream-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "data_dir = \"/tmp/x\"\n[engine]\nshards = 3\n[engine.derive]\ndropoff_radius_m = 12.5\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&good)).unwrap();
        assert_eq!(cfg.engine.shards, 3);
        assert_eq!(cfg.engine.derive.dropoff_radius_m, 12.5);
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(cfg.http, HttpConfig::default(), "unset sections keep their defaults");

        let typo = dir.join("typo.toml");
        std::fs::write(&typo, "[engine]\nshard = 3\n").unwrap();
        let err = Config::load(Some(&typo)).unwrap_err().to_string();
        assert!(err.contains("shard"), "{err}");
        assert!(Config::load(Some(&dir.join("missing.toml"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
