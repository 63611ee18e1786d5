//! What a JetStream acknowledgement means, checked at start.
//!
//! fleetstream acknowledges a batch on the JetStream backend once JetStream has acknowledged
//! it. Whether that means "on disk" is the server's setting, not the stream's: NATS's file store
//! syncs every two minutes by default (`jetstream { sync_interval: ... }`), so a power failure
//! can lose writes JetStream had acknowledged; only `sync_interval: always` syncs each one
//! first. A memory-storage stream loses everything with its server. Clients cannot read the
//! sync setting over the NATS protocol, so a node reads it from the server's monitoring
//! endpoint (`[jetstream] monitor_url`, `GET /varz`) when given one.
//!
//! At start the node logs what an acknowledgement means; when it does not mean "on disk" (or
//! cannot be known) it warns, and with `[jetstream] require_sync = true` it refuses to start.

use async_nats::jetstream::{self, stream::StorageType};

use super::JetStreamConfig;
use crate::Error;

/// What JetStream's acknowledgement of a write guarantees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckMeans {
    /// Synced to disk before the acknowledgement (`sync_interval: always`, file storage).
    OnDisk,
    /// Written to the file store, synced later: lost on power failure until then.
    Lazy {
        /// How often the server syncs, as its monitoring endpoint says.
        interval: String,
    },
    /// A stream is kept in memory: lost with its server.
    Memory {
        /// The stream.
        stream: String,
    },
    /// The server's sync setting could not be read.
    Unknown {
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for AckMeans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AckMeans::OnDisk => write!(f, "on disk: the server syncs every write before acknowledging it"),
            AckMeans::Lazy { interval } => write!(
                f,
                "not on disk: the server syncs every {interval}, so a power failure can lose acknowledged writes (set `jetstream {{ sync_interval: always }}` on the server)"
            ),
            AckMeans::Memory { stream } => {
                write!(f, "not durable: stream {stream} is kept in memory and is lost with its server")
            }
            AckMeans::Unknown { reason } => write!(
                f,
                "unknown: {reason}; NATS's default file store syncs every 2 minutes (give [jetstream] monitor_url to check)"
            ),
        }
    }
}

/// Reads what an acknowledgement means: the storage of this node's streams (those that exist),
/// then the server's sync setting from `cfg.monitor_url`.
pub async fn assess(cfg: &JetStreamConfig, js: &jetstream::Context) -> AckMeans {
    for name in ["TELEMETRY", "DELIVERIES"] {
        let stream = format!("{}_{name}", cfg.stream_prefix);
        if let Ok(mut s) = js.get_stream(&stream).await
            && let Ok(info) = s.info().await
            && info.config.storage == StorageType::Memory
        {
            return AckMeans::Memory { stream };
        }
    }
    let Some(url) = &cfg.monitor_url else {
        return AckMeans::Unknown { reason: "no [jetstream] monitor_url is set".into() };
    };
    let varz = format!("{}/varz", url.trim_end_matches('/'));
    let fetched = async {
        let client = services::tls::plain_client().map_err(|e| e.to_string())?;
        let resp = client.get(&varz).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("{varz} answered {}", resp.status()));
        }
        resp.json::<serde_json::Value>().await.map_err(|e| e.to_string())
    };
    match fetched.await {
        Ok(v) => of_varz(&v),
        Err(reason) => AckMeans::Unknown { reason: format!("reading {varz}: {reason}") },
    }
}

/// What the monitoring endpoint's `/varz` says of the sync setting.
pub fn of_varz(varz: &serde_json::Value) -> AckMeans {
    let config = &varz["jetstream"]["config"];
    if config.is_null() {
        return AckMeans::Unknown { reason: "the server's /varz has no jetstream section".into() };
    }
    if config["sync_always"].as_bool() == Some(true) {
        return AckMeans::OnDisk;
    }
    let interval = match &config["sync_interval"] {
        // Go durations are nanoseconds in JSON.
        serde_json::Value::Number(ns) => ns.as_f64().map_or("2m (the default)".into(), |ns| format!("{}s", ns / 1e9)),
        serde_json::Value::String(s) => s.clone(),
        _ => "2m (the default)".into(),
    };
    AckMeans::Lazy { interval }
}

/// Logs what an acknowledgement means, and refuses (with `require_sync`) unless it means "on
/// disk".
pub fn enforce(cfg: &JetStreamConfig, means: &AckMeans) -> Result<(), Error> {
    if *means == AckMeans::OnDisk {
        tracing::info!(url = %cfg.url, "JetStream acknowledgements mean {means}");
        return Ok(());
    }
    if cfg.require_sync {
        return Err(Error::Config(format!(
            "[jetstream] require_sync is set, but a JetStream acknowledgement at {} means {means}",
            cfg.url
        )));
    }
    tracing::warn!(url = %cfg.url, "JetStream acknowledgements mean {means}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varz_tells_whether_writes_are_synced_before_they_are_acknowledged() {
        let always =
            serde_json::json!({"jetstream": {"config": {"sync_always": true, "sync_interval": 120_000_000_000u64}}});
        assert_eq!(of_varz(&always), AckMeans::OnDisk);
        let lazy = serde_json::json!({"jetstream": {"config": {"sync_interval": 120_000_000_000u64}}});
        assert_eq!(of_varz(&lazy), AckMeans::Lazy { interval: "120s".into() });
        let none = serde_json::json!({"version": "2.12.1"});
        assert!(matches!(of_varz(&none), AckMeans::Unknown { .. }));
        let cfg = JetStreamConfig { require_sync: true, ..JetStreamConfig::default() };
        assert!(enforce(&cfg, &AckMeans::OnDisk).is_ok());
        let refused = enforce(&cfg, &of_varz(&lazy)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("require_sync") && refused.contains("120s"), "{refused}");
        let relaxed = JetStreamConfig::default();
        assert!(enforce(&relaxed, &of_varz(&lazy)).is_ok(), "without require_sync it only warns");
    }
}
