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
//! durable. After a crash the broker sends again what was not acknowledged; the intake leaves
//! out each drone's events it has already taken (by sequence number), so they are not logged
//! twice.
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

use events::{KeyRange, QueueName, Verdict, WorkQueues};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, MqttOptions, Publish, QoS, SubscribeFilter, SubscribeReasonCode, Transport,
};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::engine::Engine;
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
    /// The drones whose missions go out over MQTT: `"all"`, `"LO..HI"` (ids `LO` up to but not
    /// including `HI`), or empty (default): none, missions stay on QUIC. The bridge holds
    /// these drones' keys of `drone-commands` as a QUIC session would, so no QUIC session may
    /// take missions for the same drones (the later one takes them over).
    pub missions: String,
    /// Missions published and not yet acknowledged by their drones, at most. Default 1024.
    pub missions_in_flight: usize,
    /// Where missions go: `<missions_topic>/{drone_id}`, answered on
    /// `<missions_topic>/{drone_id}/ack`. Default `fleetstream/missions`.
    pub missions_topic: String,
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
            missions: String::new(),
            missions_in_flight: 1024,
            missions_topic: events::json::DEFAULT_MISSIONS_TOPIC.into(),
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
        if self.mission_keys()?.is_some() && self.missions_in_flight == 0 {
            return Err(crate::Error::Config("[mqtt] missions_in_flight must be above 0".into()));
        }
        let topic = &self.missions_topic;
        if topic.is_empty() || topic.ends_with('/') || topic.contains(['+', '#']) || topic.starts_with('$') {
            return Err(crate::Error::Config(format!(
                "[mqtt] missions_topic {topic:?}: a topic name without wildcards, $ or a trailing /"
            )));
        }
        Ok(Some(broker))
    }

    /// The drones whose missions the bridge publishes, from `missions`.
    pub fn mission_keys(&self) -> Result<Option<KeyRange>, crate::Error> {
        let bad = || {
            crate::Error::Config(format!(
                "[mqtt] missions {:?}: give \"all\", \"LO..HI\" (drone ids, LO below HI) or nothing",
                self.missions
            ))
        };
        match self.missions.trim() {
            "" => Ok(None),
            "all" => Ok(Some(KeyRange::ALL)),
            range => {
                let (lo, hi) = range.split_once("..").ok_or_else(bad)?;
                let (lo, hi) =
                    (lo.trim().parse::<u64>().map_err(|_| bad())?, hi.trim().parse::<u64>().map_err(|_| bad())?);
                if lo >= hi {
                    return Err(bad());
                }
                Ok(Some(KeyRange { lo, hi }))
            }
        }
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
    /// Events left out as repeats of ones already taken (offered again after a crash).
    pub repeats: AtomicU64,
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
    /// Missions published to drones (each attempt).
    pub missions_sent: AtomicU64,
    /// Missions their drones acknowledged as taken.
    pub missions_acked: AtomicU64,
    /// Missions their drones answered with an error (offered again or dead-lettered).
    pub missions_refused: AtomicU64,
    /// Answers to missions the bridge no longer holds (answered before, or their lease ran
    /// out), or not readable as answers.
    pub missions_stale_answers: AtomicU64,
    /// Missions published and not yet answered.
    pub missions_in_flight: AtomicU64,
}

impl MqttMetrics {
    /// `fleetstream_mqtt_*`.
    pub fn render(&self, out: &mut String) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        events::prom::counter(out, "fleetstream_mqtt_messages_total", load(&self.messages));
        events::prom::counter(out, "fleetstream_mqtt_events_total", load(&self.events));
        events::prom::counter(out, "fleetstream_mqtt_repeats_total", load(&self.repeats));
        events::prom::counter(out, "fleetstream_mqtt_acked_total", load(&self.acked));
        events::prom::counter(out, "fleetstream_mqtt_rejected_total", load(&self.rejected));
        events::prom::counter(out, "fleetstream_mqtt_disconnects_total", load(&self.disconnects));
        events::prom::counter(out, "fleetstream_mqtt_failed_batches_total", load(&self.failed_batches));
        events::prom::gauge(out, "fleetstream_mqtt_connected", load(&self.connected));
        events::prom::counter(out, "fleetstream_mqtt_missions_sent_total", load(&self.missions_sent));
        events::prom::counter(out, "fleetstream_mqtt_missions_acked_total", load(&self.missions_acked));
        events::prom::counter(out, "fleetstream_mqtt_missions_refused_total", load(&self.missions_refused));
        events::prom::counter(out, "fleetstream_mqtt_missions_stale_answers_total", load(&self.missions_stale_answers));
        events::prom::gauge(out, "fleetstream_mqtt_missions_in_flight", load(&self.missions_in_flight));
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
    ///
    /// With `missions` set, it also publishes those drones' missions from `drone-commands`;
    /// `lease_for` is the queue's visibility timeout, after which an unanswered mission is
    /// offered again.
    pub fn start(cfg: &MqttConfig, intake: Intake, lease_for: Duration) -> Result<Self, crate::Error> {
        let Some(broker) = cfg.validate()? else {
            return Err(crate::Error::Config("[mqtt] url is not set".into()));
        };
        let missions = cfg.mission_keys()?;
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
        info!(broker = %format!("{}:{}", broker.host, broker.port), client_id, topics = ?cfg.filters(), missions = ?missions, "MQTT bridge starting");
        let missions = missions.map(|keys| MissionsOut {
            engine: intake.engine().clone(),
            keys,
            max: cfg.missions_in_flight,
            lease_for,
            topic: cfg.missions_topic.clone(),
        });
        let task = tokio::spawn(run(cfg.clone(), options, intake, missions, metrics.clone(), stop_rx));
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
    missions: Option<MissionsOut>,
    metrics: Arc<MqttMetrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut complaints = Complaints::default();
    loop {
        let (client, eventloop) = AsyncClient::new(options.clone(), 4096);
        let link = Link { client: &client, intake: &intake, missions: missions.as_ref(), metrics: &metrics };
        let ended = connection(&cfg, link, eventloop, &mut stop, &mut complaints).await;
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

/// A batch handed to the engine: how many of its events were repeats (or why it failed), its
/// messages, and its events.
type Submitted = futures_util::future::BoxFuture<'static, (Result<usize, events::Error>, Vec<Publish>, usize)>;

/// What the event-loop task hands the bridge.
enum FromBroker {
    /// Subscribed: missions may go out (their answers will be heard).
    Subscribed,
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
    answers: bool,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                info!(session_present = ack.session_present, "MQTT bridge connected");
                let mut filters: Vec<_> =
                    cfg.filters().into_iter().map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce)).collect();
                if answers {
                    // Not shared: a drone's answers come to the node that sent its missions.
                    filters.push(SubscribeFilter::new(format!("{}/+/ack", cfg.missions_topic), QoS::AtLeastOnce));
                }
                if let Err(error) = client.subscribe_many(filters).await {
                    error!(%error, "could not subscribe");
                    let _ = to_bridge.send(FromBroker::Lost).await;
                    return;
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                    error!(topics = ?cfg.filters(), "the broker refused a subscription (a shared one needs a broker that offers $share)");
                } else {
                    metrics.connected.store(1, Ordering::Relaxed);
                    if to_bridge.send(FromBroker::Subscribed).await.is_err() {
                        return;
                    }
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

/// Messages waiting between the event loop and the bridge, at most: a hand-off, not a buffer
/// (the broker's in-flight window waits in the socket meanwhile), so with messages of up to
/// `max_message_bytes` the bridge holds a bounded amount.
const FORWARD_QUEUE: usize = 64;

/// What is kept of a message until it is acknowledged: its packet id, QoS and topic, not its
/// payload (taken to be parsed).
fn receipt(mut p: Publish) -> Publish {
    drop(std::mem::take(&mut p.payload));
    p
}

/// One connection's life: read messages into batches, submit them, and acknowledge each
/// message once its batch is durable. A batch is submitted when it is full, or when no more
/// messages are waiting and `linger_ms` has passed since its first (with the default 0: at
/// once, so the batch holds what arrived while the previous ones were being made durable).
async fn connection(
    cfg: &MqttConfig,
    link: Link<'_>,
    eventloop: EventLoop,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    complaints: &mut Complaints,
) -> Ended {
    let Link { client, intake, missions, metrics } = link;
    let (to_bridge, mut from_broker) = tokio::sync::mpsc::channel(FORWARD_QUEUE);
    let answers = missions.is_some();
    let mut driver = tokio::spawn(drive(cfg.clone(), client.clone(), eventloop, to_bridge, metrics.clone(), answers));
    // The missions this connection sends, once subscribed; ended (and what they hold offered
    // again) with it.
    let mut desk: Option<(Arc<Desk>, tokio::task::JoinHandle<()>)> = None;
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
    let mut parsing: FuturesOrdered<Parsing> = FuturesOrdered::new();
    let ended = loop {
        ack_all(&mut acks);
        let deadline = filling.since.map(|s| s + linger);
        let room = submitted.len() < cfg.max_batches;
        tokio::select! {
            biased;
            _ = stop.changed() => {
                // Take in what is being read, submit what is held and acknowledge what becomes
                // durable, then leave.
                while let Some(read) = parsing.next().await {
                    take_in(read, &mut filling, &mut submitted, intake, desk.as_ref().map(|d| &d.0), metrics, complaints, batch_max);
                }
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
                    Ok(repeats) => {
                        metrics.events.fetch_add((events - repeats) as u64, Ordering::Relaxed);
                        metrics.repeats.fetch_add(repeats as u64, Ordering::Relaxed);
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
            read = parsing.next(), if room && !parsing.is_empty() => {
                if let Some(read) = read {
                    take_in(read, &mut filling, &mut submitted, intake, desk.as_ref().map(|d| &d.0), metrics, complaints, batch_max);
                }
            }
            got = from_broker.recv(), if parsing.len() < PARSE_AHEAD => match got {
                Some(FromBroker::Subscribed) => {
                    if let (Some(out), None) = (missions, &desk) {
                        desk = Desk::open(out, client, metrics);
                    }
                }
                Some(FromBroker::Message(p)) => {
                    let answer = missions.and_then(|m| answer_drone(&m.topic, &p.topic));
                    parsing.push_back(read(p, answer, intake.max_events()));
                }
                Some(FromBroker::Lost) | None => break Ended::Again,
            },
            () = sleep_until(deadline), if deadline.is_some() && room => {
                submitted.push_back(submit(intake, std::mem::take(&mut filling)));
            }
        }
    };
    if let Some((desk, publisher)) = desk {
        publisher.abort();
        let _ = publisher.await;
        desk.close();
    }
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

/// The drone whose answer a topic carries: `<missions_topic>/{drone_id}/ack`.
fn answer_drone(missions_topic: &str, topic: &str) -> Option<u64> {
    topic.strip_prefix(missions_topic)?.strip_prefix('/')?.strip_suffix("/ack")?.parse().ok()
}

/// What one connection works with.
#[derive(Clone, Copy)]
struct Link<'a> {
    client: &'a AsyncClient,
    intake: &'a Intake,
    missions: Option<&'a MissionsOut>,
    metrics: &'a Arc<MqttMetrics>,
}

/// Where missions come from and how many may be out.
#[derive(Debug, Clone)]
struct MissionsOut {
    engine: Engine,
    keys: KeyRange,
    max: usize,
    lease_for: Duration,
    topic: String,
}

/// A mission published and not yet answered.
struct Out {
    key: u64,
    token: u64,
    until: std::time::Instant,
}

/// The missions of one connection: a consumer of `drone-commands` for the configured drones,
/// the missions it published and not yet had answered (at most `max`), and the task that
/// publishes them. When the connection ends, everything it holds is offered again at once.
struct Desk {
    out: MissionsOut,
    consumer: u64,
    held: parking_lot::Mutex<std::collections::HashMap<u64, Out>>,
    room: tokio::sync::Notify,
    metrics: Arc<MqttMetrics>,
}

impl Desk {
    /// Takes the drones' keys and starts publishing; `None` (said in the log) when the queue
    /// refuses the consumer.
    fn open(
        out: &MissionsOut,
        client: &AsyncClient,
        metrics: &Arc<MqttMetrics>,
    ) -> Option<(Arc<Self>, tokio::task::JoinHandle<()>)> {
        let consumer = match out.engine.attach(QueueName::DroneCommands, out.keys) {
            Ok(c) => c,
            Err(error) => {
                error!(%error, "could not take the drones' missions; none go out over MQTT on this connection");
                return None;
            }
        };
        let desk = Arc::new(Self {
            out: out.clone(),
            consumer,
            held: parking_lot::Mutex::default(),
            room: tokio::sync::Notify::new(),
            metrics: metrics.clone(),
        });
        let task = tokio::spawn(desk.clone().publish(client.clone()));
        Some((desk, task))
    }

    /// Room for more missions, once those whose lease ran out are forgotten (the queue offers
    /// them again).
    fn room(&self) -> usize {
        let now = std::time::Instant::now();
        let mut held = self.held.lock();
        held.retain(|_, o| o.until > now);
        self.metrics.missions_in_flight.store(held.len() as u64, Ordering::Relaxed);
        self.out.max.saturating_sub(held.len())
    }

    /// Leases missions while there is room and publishes each, until the task is ended.
    async fn publish(self: Arc<Self>, client: AsyncClient) {
        let mut complaints = Complaints::default();
        loop {
            let room = self.room();
            if room == 0 {
                tokio::select! {
                    () = self.room.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let wait = Duration::from_secs(5);
            match self.out.engine.lease(QueueName::DroneCommands, self.consumer, self.out.keys, room, wait).await {
                Ok(leased) => {
                    for m in leased {
                        if !self.send(&client, m).await {
                            return;
                        }
                    }
                }
                Err(events::Error::Superseded) => {
                    error!(keys = ?self.out.keys, "a QUIC session took over these drones' missions: none go out over MQTT until the bridge reconnects; give [mqtt] missions drones no QUIC session takes");
                    return;
                }
                Err(error) => {
                    complaints.say("lease", || warn!(%error, "could not take missions from drone-commands"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Publishes one mission at QoS 1; false once the connection is gone.
    async fn send(&self, client: &AsyncClient, m: events::Leased) -> bool {
        let mission = match events::Mission::from_bytes(&m.payload) {
            Ok(mission) => mission,
            Err(error) => {
                let _ = self.out.engine.settle(
                    QueueName::DroneCommands,
                    m.id,
                    m.token,
                    Verdict::Nack(format!("not a mission: {error}")),
                );
                return true;
            }
        };
        let body = match serde_json::to_vec(&events::json::MissionMessage::new(m.id, m.attempt, &mission)) {
            Ok(body) => body,
            Err(error) => {
                let _ =
                    self.out.engine.settle(QueueName::DroneCommands, m.id, m.token, Verdict::Nack(error.to_string()));
                return true;
            }
        };
        // Held before it is published, so an answer cannot overtake it.
        let until = std::time::Instant::now() + self.out.lease_for;
        {
            let mut held = self.held.lock();
            held.insert(m.id, Out { key: m.key, token: m.token, until });
            self.metrics.missions_in_flight.store(held.len() as u64, Ordering::Relaxed);
        }
        if client.publish(format!("{}/{}", self.out.topic, m.key), QoS::AtLeastOnce, false, body).await.is_err() {
            return false;
        }
        self.metrics.missions_sent.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Settles the mission `drone` answered: acked, or nacked with the drone's error. An answer
    /// for another node's drone is left to that node; one for a mission not held is counted.
    fn answer(&self, drone: u64, body: &[u8], complaints: &mut Complaints) {
        if !self.out.keys.contains(drone) {
            return;
        }
        let stale = || self.metrics.missions_stale_answers.fetch_add(1, Ordering::Relaxed);
        let answer = match events::json::MissionAck::parse(body) {
            Ok(a) => a,
            Err(e) => {
                stale();
                complaints.say("answer", || warn!(drone, error = %e, "a drone's answer to a mission is unreadable"));
                return;
            }
        };
        let held = {
            let mut held = self.held.lock();
            let taken = match held.get(&answer.mission_id) {
                Some(o) if o.key == drone => held.remove(&answer.mission_id),
                _ => None,
            };
            self.metrics.missions_in_flight.store(held.len() as u64, Ordering::Relaxed);
            taken
        };
        let Some(held) = held else {
            stale();
            return;
        };
        self.room.notify_one();
        let refused = answer.error.is_some();
        let verdict = answer.error.map_or(Verdict::Ack, Verdict::Nack);
        match self.out.engine.settle(QueueName::DroneCommands, answer.mission_id, held.token, verdict) {
            Ok(()) if refused => {
                self.metrics.missions_refused.fetch_add(1, Ordering::Relaxed);
            }
            Ok(()) => {
                self.metrics.missions_acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(events::Error::LeaseLost(_)) => {
                stale();
            }
            Err(error) => complaints.say("settle", || warn!(%error, drone, "could not settle a mission")),
        }
    }

    /// The connection ended: what it holds is offered again now.
    fn close(&self) {
        self.out.engine.release(QueueName::DroneCommands, self.consumer);
        self.held.lock().clear();
        self.metrics.missions_in_flight.store(0, Ordering::Relaxed);
    }
}

/// Messages read ahead of the batching, at most (parsed in parallel, taken in order).
const PARSE_AHEAD: usize = 16;
/// Payloads at least this large are parsed on another worker, so JSON decoding uses every core;
/// smaller ones are parsed at once (a task would cost more than the parse).
const PARALLEL_PARSE_BYTES: usize = 16 * 1024;

/// A message read: its receipt, and its events (or why they were refused), or the drone whose
/// answer to a mission it carries with the answer's body.
enum Read {
    Telemetry(Publish, Result<Vec<events::DroneEvent>, events::json::EventError>),
    Answer(Publish, u64, bytes::Bytes),
}

type Parsing = futures_util::future::BoxFuture<'static, Read>;

/// Reads a message: answers as they are, small telemetry at once, large telemetry on another
/// worker. Results are taken in the order the messages came.
fn read(mut p: Publish, answer: Option<u64>, max_events: usize) -> Parsing {
    if let Some(drone) = answer {
        let body = std::mem::take(&mut p.payload);
        return Box::pin(std::future::ready(Read::Answer(receipt(p), drone, body)));
    }
    let payload = std::mem::take(&mut p.payload);
    let p = receipt(p);
    if payload.len() < PARALLEL_PARSE_BYTES {
        let events = events::json::parse_events(&payload, max_events);
        return Box::pin(std::future::ready(Read::Telemetry(p, events)));
    }
    let parsed = tokio::spawn(async move { events::json::parse_events(&payload, max_events) });
    Box::pin(async move {
        let events = parsed.await.unwrap_or_else(|e| {
            Err(events::json::EventError { index: 0, field: String::new(), message: format!("not read: {e}") })
        });
        Read::Telemetry(p, events)
    })
}

/// Puts a read message into the batch being filled (submitting it when full), or settles the
/// mission an answer names.
#[allow(clippy::too_many_arguments)]
fn take_in(
    read: Read,
    filling: &mut Filling,
    submitted: &mut FuturesOrdered<Submitted>,
    intake: &Intake,
    desk: Option<&Arc<Desk>>,
    metrics: &MqttMetrics,
    complaints: &mut Complaints,
    batch_max: usize,
) {
    let p = match read {
        Read::Answer(p, drone, body) => {
            // Settled now, acknowledged to the broker in turn with the messages before it.
            match desk {
                Some(desk) => desk.answer(drone, &body, complaints),
                None => {
                    metrics.missions_stale_answers.fetch_add(1, Ordering::Relaxed);
                }
            }
            p
        }
        Read::Telemetry(p, parsed) => {
            metrics.messages.fetch_add(1, Ordering::Relaxed);
            match parsed {
                Ok(events) => {
                    // A message that would overflow the batch starts the next one.
                    if !filling.messages.is_empty() && filling.events.len() + events.len() > batch_max {
                        submitted.push_back(submit(intake, std::mem::take(filling)));
                    }
                    filling.events.extend(events);
                }
                Err(e) => reject(metrics, complaints, &p.topic, &e),
            }
            p
        }
    };
    filling.messages.push(p);
    filling.since.get_or_insert_with(tokio::time::Instant::now);
    if filling.events.len() >= batch_max {
        submitted.push_back(submit(intake, std::mem::take(filling)));
    }
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
            return (Ok(0), batch.messages, 0);
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
    fn mission_ranges_and_answer_topics_read() {
        let with = |m: &str| MqttConfig { url: Some("mqtt://h".into()), missions: m.into(), ..Default::default() };
        assert_eq!(with("").mission_keys().unwrap(), None);
        assert_eq!(with("all").mission_keys().unwrap(), Some(KeyRange::ALL));
        assert_eq!(with(" 10..20 ").mission_keys().unwrap(), Some(KeyRange { lo: 10, hi: 20 }));
        for bad in ["20..10", "5..5", "1-9", "..9", "some"] {
            let err = with(bad).validate().unwrap_err().to_string();
            assert!(err.contains("[mqtt] missions"), "{bad}: {err}");
        }
        assert!(MqttConfig { missions_in_flight: 0, ..with("all") }.validate().is_err());
        for bad in ["", "a/", "a/+", "a/#", "$SYS/x"] {
            let err = MqttConfig { missions_topic: bad.into(), ..with("all") }.validate().unwrap_err().to_string();
            assert!(err.contains("missions_topic"), "{bad}: {err}");
        }
        let m = "fleetstream/missions";
        assert_eq!(answer_drone(m, "fleetstream/missions/42/ack"), Some(42));
        for not in ["fleetstream/missions/42", "fleetstream/missions/x/ack", "fleetstream/missionsx/1/ack", "a/1/ack"] {
            assert_eq!(answer_drone(m, not), None, "{not}");
        }
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
