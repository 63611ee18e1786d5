//! The MQTT bridge: drones (or their gateways) that publish telemetry to an MQTT broker reach
//! the engine through it, in the JSON form of `POST /v1/telemetry` (one event or an array per
//! message, see [`events::json`]).
//!
//! The node subscribes at QoS 1 to `[mqtt] topics` (as a shared subscription
//! `$share/<group>/<topic>` when `share_group` is set, so several nodes split a fleet), in a
//! persistent session (`clean_session = false`) under a client id kept across restarts.
//! Messages are gathered into batches (up to `batch_max` events; what arrived while the earlier
//! batches were being made durable, or `linger_ms` more) and submitted through
//! the node's [`Intake`]: the same log, dedup and derivation as QUIC batches. Each message is
//! acknowledged to the broker (manual `PUBACK`, in the order received) only once its batch is
//! durable. After a crash the broker sends again what was not acknowledged; each drone's
//! sequence numbers drop the repeats when delivery events are derived.
//!
//! A message that is not valid telemetry is counted, logged (one line per interval) and
//! acknowledged, so it cannot block the topic. When the engine cannot make a batch durable the
//! bridge acknowledges nothing more: it drops the connection without acknowledging, waits, and
//! connects again, and the broker offers the messages again.
//!
//! How much the bridge holds is bounded: at most `max_batches` batches wait for the engine, and
//! the broker's connection is not read while they do.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Publish, QoS, SubscribeReasonCode, Transport};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::intake::Intake;

/// `[mqtt]`: the bridge, off unless `url` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// The broker, `mqtt://host[:1883]` or `mqtts://host[:8883]`. Unset: no bridge.
    pub url: Option<String>,
    /// User name, if the broker asks for one.
    pub username: Option<String>,
    /// Password, with `username`.
    pub password: Option<String>,
    /// PEM file of the CA that signed the broker's certificate (`mqtts://`, required there).
    pub ca: Option<PathBuf>,
    /// The client id. Empty (default): `fleetstream-<node name>`, the name kept in the data
    /// directory, so a restarted node resumes its session and gets what it had not acknowledged.
    pub client_id: String,
    /// Topic filters to subscribe to. Default `["fleetstream/telemetry/+"]`.
    pub topics: Vec<String>,
    /// Shared-subscription group (`$share/<group>/<topic>`), so several nodes split the
    /// messages; empty: plain subscriptions. Default `fleetstream`. With several nodes, publish
    /// each drone on its own topic and keep a drone's messages on one node (the broker splits by
    /// message, and a drone's events must stay in order).
    pub share_group: String,
    /// Most events per batch. Default 1024.
    pub batch_max: usize,
    /// How long a batch may wait for more messages once none are waiting, ms. Default 0: it is
    /// submitted at once, holding what arrived while earlier batches were made durable.
    pub linger_ms: u64,
    /// Batches waiting for the engine at most; the broker is not read meanwhile. Default 8.
    pub max_batches: usize,
    /// Largest message taken, bytes; a larger one ends the connection (the broker's limit
    /// should be set to match). Default 1 MiB.
    pub max_message_bytes: usize,
    /// MQTT keep-alive, seconds. Default 30.
    pub keep_alive_s: u64,
    /// Wait before connecting again after the connection was lost, ms. Default 1000.
    pub reconnect_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            url: None,
            username: None,
            password: None,
            ca: None,
            client_id: String::new(),
            topics: vec!["fleetstream/telemetry/+".into()],
            share_group: "fleetstream".into(),
            batch_max: 1024,
            linger_ms: 0,
            max_batches: 8,
            max_message_bytes: 1 << 20,
            keep_alive_s: 30,
            reconnect_ms: 1000,
        }
    }
}

/// Where the broker is, from `[mqtt] url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
}

impl Broker {
    /// Reads `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub fn parse(url: &str) -> Result<Self, crate::Error> {
        let bad = |why: &str| crate::Error::Config(format!("[mqtt] url {url:?}: {why}"));
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(bad("must start with mqtt:// or mqtts://"));
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '@', '?']) {
            return Err(bad("must be mqtt[s]://host[:port], credentials in username and password"));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(':') && !port.contains(']') => {
                (host, port.parse().map_err(|_| bad("the port is not a number from 1 to 65535"))?)
            }
            _ => (authority, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(bad("names no host or port"));
        }
        Ok(Self { host: host.to_string(), port, tls })
    }
}

impl MqttConfig {
    /// Checks the settings without connecting: the URL, the topics and the limits.
    pub fn validate(&self) -> Result<Option<Broker>, crate::Error> {
        let Some(url) = &self.url else { return Ok(None) };
        let broker = Broker::parse(url)?;
        if broker.tls && self.ca.is_none() {
            return Err(crate::Error::Config("[mqtt] ca: mqtts:// needs the PEM file of the broker's CA".into()));
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.is_empty() || t.starts_with("$share/")) {
            return Err(crate::Error::Config(
                "[mqtt] topics: give at least one topic filter, without $share/ (see share_group)".into(),
            ));
        }
        if self.batch_max == 0 || self.max_batches == 0 || self.max_message_bytes == 0 {
            return Err(crate::Error::Config(
                "[mqtt] batch_max, max_batches and max_message_bytes must be above 0".into(),
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(crate::Error::Config("[mqtt] password is set without a username".into()));
        }
        Ok(Some(broker))
    }

    /// The filters subscribed to: shared when there is a group.
    pub fn filters(&self) -> Vec<String> {
        self.topics
            .iter()
            .map(|t| if self.share_group.is_empty() { t.clone() } else { format!("$share/{}/{t}", self.share_group) })
            .collect()
    }
}

/// What the bridge has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct MqttMetrics {
    /// Messages received.
    pub messages: AtomicU64,
    /// Events made durable.
    pub events: AtomicU64,
    /// Messages acknowledged to the broker.
    pub acked: AtomicU64,
    /// Messages refused as not telemetry (acknowledged, not kept).
    pub rejected: AtomicU64,
    /// Connections lost or dropped.
    pub disconnects: AtomicU64,
    /// Batches the engine could not make durable (their messages were not acknowledged).
    pub failed_batches: AtomicU64,
    /// 1 while connected and subscribed.
    pub connected: AtomicU64,
}

impl MqttMetrics {
    /// `fleetstream_mqtt_*`.
    pub fn render(&self, out: &mut String) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        events::prom::counter(out, "fleetstream_mqtt_messages_total", load(&self.messages));
        events::prom::counter(out, "fleetstream_mqtt_events_total", load(&self.events));
        events::prom::counter(out, "fleetstream_mqtt_acked_total", load(&self.acked));
        events::prom::counter(out, "fleetstream_mqtt_rejected_total", load(&self.rejected));
        events::prom::counter(out, "fleetstream_mqtt_disconnects_total", load(&self.disconnects));
        events::prom::counter(out, "fleetstream_mqtt_failed_batches_total", load(&self.failed_batches));
        events::prom::gauge(out, "fleetstream_mqtt_connected", load(&self.connected));
    }
}

/// A running bridge.
#[derive(Debug)]
pub struct Bridge {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Its counters.
    pub metrics: Arc<MqttMetrics>,
}

impl Bridge {
    /// Starts the bridge of `cfg` (which must have a `url`) feeding `intake`, whose node's
    /// lasting name makes the default client id.
    pub fn start(cfg: &MqttConfig, intake: Intake) -> Result<Self, crate::Error> {
        let Some(broker) = cfg.validate()? else {
            return Err(crate::Error::Config("[mqtt] url is not set".into()));
        };
        let client_id =
            if cfg.client_id.is_empty() { format!("fleetstream-{}", intake.node()) } else { cfg.client_id.clone() };
        let mut options = MqttOptions::new(client_id.clone(), broker.host.clone(), broker.port);
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(cfg.keep_alive_s.max(5)))
            .set_max_packet_size(cfg.max_message_bytes.saturating_add(1024), 64 * 1024)
            .set_request_channel_capacity(4096);
        if let Some(user) = &cfg.username {
            options.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
        }
        if broker.tls {
            let ca = cfg.ca.as_deref().unwrap_or(std::path::Path::new(""));
            let tls =
                services::tls::client_tls_config(ca).map_err(|e| crate::Error::Config(format!("[mqtt] ca: {e}")))?;
            options.set_transport(Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(tls))));
        }
        let metrics = Arc::new(MqttMetrics::default());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        info!(broker = %format!("{}:{}", broker.host, broker.port), client_id, topics = ?cfg.filters(), "MQTT bridge starting");
        let task = tokio::spawn(run(cfg.clone(), options, intake, metrics.clone(), stop_rx));
        Ok(Self { stop, task, metrics })
    }

    /// Submits what it holds, acknowledges what became durable, and disconnects.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Why a connection ended.
enum Ended {
    /// Asked to stop.
    Stopped,
    /// Lost, or dropped by the bridge; connect again.
    Again,
}

/// Connects, bridges until the connection ends, and connects again, until `stop`.
async fn run(
    cfg: MqttConfig,
    options: MqttOptions,
    intake: Intake,
    metrics: Arc<MqttMetrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut complaints = Complaints::default();
    loop {
        let (client, eventloop) = AsyncClient::new(options.clone(), 4096);
        let ended = connection(&cfg, &client, eventloop, &intake, &metrics, &mut stop, &mut complaints).await;
        drop(client);
        metrics.connected.store(0, Ordering::Relaxed);
        if matches!(ended, Ended::Stopped) {
            return;
        }
        metrics.disconnects.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(Duration::from_millis(cfg.reconnect_ms)) => {}
        }
    }
}

/// A batch being filled: the events of its messages, and the messages in the order received.
#[derive(Default)]
struct Filling {
    events: Vec<events::DroneEvent>,
    messages: Vec<Publish>,
    since: Option<tokio::time::Instant>,
}

type Submitted = futures_util::future::BoxFuture<'static, (Result<(), events::Error>, Vec<Publish>, usize)>;

/// What the event-loop task hands the bridge.
enum FromBroker {
    /// A message, in the order received.
    Message(Publish),
    /// The connection ended (the error, said once per interval).
    Lost,
}

/// Drives the client's event loop, never cancelled part-way (an acknowledgement taken from the
/// request channel is always written): subscribes on each `CONNACK`, and forwards messages to
/// the bridge through a bounded channel, so the broker is not read while the bridge is full.
/// Ends after the connection is lost or the client disconnects.
async fn drive(
    cfg: MqttConfig,
    client: AsyncClient,
    mut eventloop: EventLoop,
    to_bridge: tokio::sync::mpsc::Sender<FromBroker>,
    metrics: Arc<MqttMetrics>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                info!(session_present = ack.session_present, "MQTT bridge connected");
                for filter in cfg.filters() {
                    if let Err(error) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                        error!(%error, filter, "could not subscribe");
                        let _ = to_bridge.send(FromBroker::Lost).await;
                        return;
                    }
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                    error!(topics = ?cfg.filters(), "the broker refused a subscription (a shared one needs a broker that offers $share)");
                } else {
                    metrics.connected.store(1, Ordering::Relaxed);
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                if to_bridge.send(FromBroker::Message(p)).await.is_err() {
                    return;
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(error) => {
                warn!(%error, "MQTT connection lost");
                let _ = to_bridge.send(FromBroker::Lost).await;
                return;
            }
        }
    }
}

/// Messages waiting between the event loop and the bridge, at most.
const FORWARD_QUEUE: usize = 1024;

/// One connection's life: read messages into batches, submit them, and acknowledge each
/// message once its batch is durable. A batch is submitted when it is full, or when no more
/// messages are waiting and `linger_ms` has passed since its first (with the default 0: at
/// once, so the batch holds what arrived while the previous ones were being made durable).
async fn connection(
    cfg: &MqttConfig,
    client: &AsyncClient,
    eventloop: EventLoop,
    intake: &Intake,
    metrics: &Arc<MqttMetrics>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    complaints: &mut Complaints,
) -> Ended {
    let (to_bridge, mut from_broker) = tokio::sync::mpsc::channel(FORWARD_QUEUE);
    let mut driver = tokio::spawn(drive(cfg.clone(), client.clone(), eventloop, to_bridge, metrics.clone()));
    let linger = Duration::from_millis(cfg.linger_ms);
    let batch_max = cfg.batch_max.min(intake.max_events());
    let mut filling = Filling::default();
    let mut submitted: FuturesOrdered<Submitted> = FuturesOrdered::new();
    let mut acks: VecDeque<Publish> = VecDeque::new();
    let ack_all = |acks: &mut VecDeque<Publish>| {
        // Acknowledgements wait for room in the client's request channel, which the event
        // loop empties.
        while let Some(p) = acks.front() {
            if client.try_ack(p).is_err() {
                break;
            }
            acks.pop_front();
            metrics.acked.fetch_add(1, Ordering::Relaxed);
        }
    };
    let ended = loop {
        ack_all(&mut acks);
        let deadline = filling.since.map(|s| s + linger);
        let room = submitted.len() < cfg.max_batches;
        tokio::select! {
            biased;
            _ = stop.changed() => {
                // Submit what is held and acknowledge what becomes durable, then leave.
                if !filling.messages.is_empty() {
                    submitted.push_back(submit(intake, std::mem::take(&mut filling)));
                }
                while let Some((result, messages, _)) = submitted.next().await {
                    if result.is_err() {
                        break;
                    }
                    acks.extend(messages);
                }
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while !acks.is_empty() && tokio::time::Instant::now() < deadline {
                    ack_all(&mut acks);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // The disconnect follows the acknowledgements in the request channel.
                let _ = client.try_disconnect();
                break Ended::Stopped;
            }
            done = submitted.next(), if !submitted.is_empty() => {
                let Some((result, messages, events)) = done else { continue };
                match result {
                    Ok(()) => {
                        metrics.events.fetch_add(events as u64, Ordering::Relaxed);
                        acks.extend(messages);
                    }
                    Err(error) => {
                        // Nothing more is acknowledged on this connection: the broker offers
                        // these messages, and those after them, again on the next one.
                        metrics.failed_batches.fetch_add(1, Ordering::Relaxed);
                        error!(%error, "the engine did not take an MQTT batch: acknowledging nothing, reconnecting");
                        break Ended::Again;
                    }
                }
            }
            got = from_broker.recv(), if room => match got {
                Some(FromBroker::Message(p)) => {
                    metrics.messages.fetch_add(1, Ordering::Relaxed);
                    match events::json::parse_events(&p.payload, intake.max_events()) {
                        Ok(events) => {
                            // A message that would overflow the batch starts the next one.
                            if !filling.messages.is_empty() && filling.events.len() + events.len() > batch_max {
                                submitted.push_back(submit(intake, std::mem::take(&mut filling)));
                            }
                            filling.events.extend(events);
                        }
                        Err(e) => reject(metrics, complaints, &p.topic, &e),
                    }
                    filling.messages.push(p);
                    filling.since.get_or_insert_with(tokio::time::Instant::now);
                    if filling.events.len() >= batch_max {
                        submitted.push_back(submit(intake, std::mem::take(&mut filling)));
                    }
                }
                Some(FromBroker::Lost) | None => break Ended::Again,
            },
            () = sleep_until(deadline), if deadline.is_some() && room => {
                submitted.push_back(submit(intake, std::mem::take(&mut filling)));
            }
        }
    };
    // Stopped: the event loop writes the acknowledgements and the disconnect, then ends. Lost
    // or dropped: it ends without acknowledging more.
    if matches!(ended, Ended::Again) {
        driver.abort();
    }
    if tokio::time::timeout(Duration::from_secs(2), &mut driver).await.is_err() {
        driver.abort();
    }
    ended
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Hands a batch to the engine; resolves once it is durable, with its messages and events.
fn submit(intake: &Intake, batch: Filling) -> Submitted {
    let intake = intake.clone();
    Box::pin(async move {
        let n = batch.events.len();
        if n == 0 {
            // Only refused messages: nothing to keep, acknowledge them.
            return (Ok(()), batch.messages, 0);
        }
        let result = intake.submit(&batch.events, events::TraceContext::default()).await;
        (result, batch.messages, n)
    })
}

fn reject(metrics: &MqttMetrics, complaints: &mut Complaints, topic: &str, e: &events::json::EventError) {
    metrics.rejected.fetch_add(1, Ordering::Relaxed);
    complaints.say("rejected", || warn!(topic, error = %e, "MQTT message refused: not drone events"));
}

/// One log line per reason per interval, with how many were not logged.
#[derive(Default)]
struct Complaints {
    last: std::collections::HashMap<&'static str, (std::time::Instant, u64)>,
}

impl Complaints {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn say(&mut self, reason: &'static str, log: impl FnOnce()) {
        let now = std::time::Instant::now();
        match self.last.get_mut(reason) {
            Some((at, quiet)) if now.duration_since(*at) < Self::INTERVAL => *quiet += 1,
            Some((at, quiet)) => {
                if *quiet > 0 {
                    warn!(reason, suppressed = *quiet, "more like the next line were not logged");
                }
                *at = now;
                *quiet = 0;
                log();
            }
            None => {
                self.last.insert(reason, (now, 0));
                log();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_read_with_default_ports_and_clear_errors() {
        let b = Broker::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((b.host.as_str(), b.port, b.tls), ("127.0.0.1", 1884, false));
        let b = Broker::parse("mqtts://broker.example").unwrap();
        assert_eq!((b.host.as_str(), b.port, b.tls), ("broker.example", 8883, true));
        let b = Broker::parse("mqtt://[::1]:1883/").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 1883));
        for bad in ["tcp://host:1883", "mqtt://", "mqtt://host:port", "mqtt://user:pw@host", "mqtt://host:0"] {
            let err = Broker::parse(bad).unwrap_err().to_string();
            assert!(err.contains("[mqtt] url"), "{bad}: {err}");
        }
    }

    #[test]
    fn config_checks_tls_topics_and_limits() {
        let on = |f: fn(&mut MqttConfig)| {
            let mut c = MqttConfig { url: Some("mqtt://127.0.0.1".into()), ..Default::default() };
            f(&mut c);
            c.validate()
        };
        assert!(MqttConfig::default().validate().unwrap().is_none(), "off by default");
        assert!(on(|_| {}).unwrap().is_some());
        assert!(on(|c| c.url = Some("mqtts://h".into())).is_err(), "mqtts without a CA");
        assert!(on(|c| c.topics.clear()).is_err());
        assert!(on(|c| c.topics = vec!["$share/g/t".into()]).is_err());
        assert!(on(|c| c.batch_max = 0).is_err());
        assert!(on(|c| c.password = Some("pw".into())).is_err());
        let shared = MqttConfig::default().filters();
        assert_eq!(shared, ["$share/fleetstream/fleetstream/telemetry/+"]);
        let plain = MqttConfig { share_group: String::new(), ..Default::default() }.filters();
        assert_eq!(plain, ["fleetstream/telemetry/+"]);
    }

    #[test]
    fn complaints_are_one_line_per_reason_per_interval() {
        let mut c = Complaints::default();
        let mut said = 0;
        for _ in 0..100 {
            c.say("rejected", || said += 1);
        }
        c.say("connection", || said += 1);
        assert_eq!(said, 2);
        assert_eq!(c.last["rejected"].1, 99);
    }
}
