//! A fleet connection's telemetry as JSON instead of QUIC batches, as gateways in front of the
//! node's adapters would send it. Over MQTT (`loadgen --mqtt URL`): each batch one QoS 1
//! message, a JSON array of events in the form of `POST /v1/telemetry`, on the connection's own
//! topic (`<prefix>/gw-<n>`, so its drones' events stay in order); an answer is the broker's
//! `PUBACK` (the broker holds the message, not yet the node). With `--mqtt-missions` the
//! drones also take their missions over MQTT and answer them there. Over HTTP (`loadgen
//! --http-telemetry`): each batch one `POST /v1/telemetry`, answered once durable. Whether the
//! node kept everything is what the subscriber checks, as for QUIC.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use events::DroneEvent;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS, SubscribeFilter};
use tokio::sync::mpsc;

/// Where the fleet publishes: `mqtt://host[:port]`, and the topic prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttTarget {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Topics are `<prefix>/gw-<connection>`; default `fleetstream/telemetry`, which the node's
    /// default `[mqtt] topics` subscribe to.
    pub prefix: String,
    /// Missions over MQTT too (`loadgen --mqtt-missions`; the node's `[mqtt] missions` must
    /// name the fleet's drones): each connection subscribes to its drones'
    /// `<missions_prefix>/{drone_id}` and answers on `.../ack`.
    pub missions: bool,
    /// The node's `[mqtt] missions_topic`; default `fleetstream/missions`.
    pub missions_prefix: String,
}

impl MqttTarget {
    /// Reads `mqtt://host[:port]` (plain MQTT; port 1883 by default).
    pub fn parse(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("mqtt://").with_context(|| format!("{url:?}: expected mqtt://host[:port]"))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().with_context(|| format!("{url:?}: the port is not a number"))?),
            None => (rest, 1883),
        };
        anyhow::ensure!(!host.is_empty(), "{url:?}: no host");
        Ok(Self {
            host: host.to_string(),
            port,
            prefix: prefix.trim_end_matches('/').to_string(),
            missions: false,
            missions_prefix: events::json::DEFAULT_MISSIONS_TOPIC.into(),
        })
    }
}

/// Messages a connection may have unacknowledged by the broker: the window, as for QUIC.
const INFLIGHT: u16 = 64;

/// One fleet connection's MQTT publisher.
#[derive(Debug)]
pub struct MqttSender {
    client: AsyncClient,
    topic: String,
    /// Batches handed to the client, not yet written (their packet ids are not known yet).
    queued: Arc<Mutex<VecDeque<(u64, u32)>>>,
    /// Missions for this connection's drones, as they arrive (with `missions`).
    missions: Option<mpsc::Receiver<events::Leased>>,
    /// Where missions are answered.
    prefix: Arc<str>,
    task: tokio::task::JoinHandle<()>,
}

/// Answers missions that came over MQTT, on their drone's answer topic.
#[derive(Debug, Clone)]
pub struct MissionAnswers {
    client: AsyncClient,
    prefix: Arc<str>,
}

impl MissionAnswers {
    /// Acknowledges `m` (taken and done) or refuses it with the reason.
    pub async fn settle(&self, m: &events::Leased, verdict: events::Verdict) -> anyhow::Result<()> {
        let error = match verdict {
            events::Verdict::Ack => None,
            events::Verdict::Nack(why) => Some(why),
        };
        let body = serde_json::to_vec(&events::json::MissionAck { mission_id: m.id, error })?;
        let topic = format!("{}/{}/ack", self.prefix, m.key);
        self.client.publish(topic, QoS::AtLeastOnce, false, body).await.context("answering a mission")
    }
}

/// A mission as the driver takes it: its message id, drone and attempt, and the mission in the
/// queue's encoding (the token is unused: the bridge holds the lease).
fn leased_of(body: &[u8]) -> Option<events::Leased> {
    let m = events::json::MissionMessage::parse(body)
        .map_err(|e| tracing::warn!(error = %e, "a mission over MQTT is unreadable"))
        .ok()?;
    Some(events::Leased {
        id: m.mission_id,
        key: m.drone_id,
        attempt: m.attempt,
        token: 0,
        payload: m.mission().to_bytes().into(),
    })
}

impl MqttSender {
    /// Connects as `client_id` and publishes on `<prefix>/gw-<index>`; the broker's
    /// acknowledgements come out of the receiver as answers.
    ///
    /// With `target.missions`, it also subscribes to the missions of `drones` (again after
    /// each reconnect: the session is clean) and hands them out through [`Self::take_missions`].
    pub async fn connect(
        target: &MqttTarget,
        client_id: String,
        index: usize,
        drones: &[u64],
    ) -> anyhow::Result<(Self, mpsc::Receiver<ingest::Answer>)> {
        let mut options = MqttOptions::new(client_id, target.host.clone(), target.port);
        options
            .set_clean_session(true)
            .set_inflight(INFLIGHT)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 8 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, usize::from(INFLIGHT));
        // Connected before the fleet's clock starts.
        loop {
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => anyhow::bail!("connecting to the MQTT broker {}:{}: {e}", target.host, target.port),
                Err(_) => anyhow::bail!("the MQTT broker {}:{} did not answer", target.host, target.port),
            }
        }
        let (answers_tx, answers) = mpsc::channel(usize::from(INFLIGHT) * 2);
        let queued: Arc<Mutex<VecDeque<(u64, u32)>>> = Arc::default();
        let written = queued.clone();
        let filters: Vec<_> = if target.missions {
            drones
                .iter()
                .map(|d| SubscribeFilter::new(format!("{}/{d}", target.missions_prefix), QoS::AtLeastOnce))
                .collect()
        } else {
            Vec::new()
        };
        let (missions_tx, missions) = mpsc::channel(drones.len().clamp(16, 1024));
        let subscribe = {
            let (client, filters) = (client.clone(), filters.clone());
            move || {
                // Up to 500 filters a packet: well inside any broker's packet size.
                for chunk in filters.chunks(500) {
                    if let Err(error) = client.try_subscribe_many(chunk.to_vec()) {
                        tracing::warn!(%error, "could not subscribe to the drones' missions");
                    }
                }
            }
        };
        subscribe();
        let task = tokio::spawn(async move {
            let mut inflight: HashMap<u16, (u64, u32)> = HashMap::new();
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => subscribe(),
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if let Some(m) = leased_of(&p.payload)
                            && missions_tx.send(m).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        let next = written.lock().ok().and_then(|mut q| q.pop_front());
                        if let Some(batch) = next {
                            inflight.insert(pkid, batch);
                        }
                    }
                    Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                        if let Some((batch_seq, events)) = inflight.remove(&ack.pkid) {
                            let answer = ingest::Answer { batch_seq, events, result: Ok(()) };
                            if answers_tx.send(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                    // `finish` asked to disconnect: the connection's end is no loss.
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "MQTT connection lost; connecting again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        let missions = target.missions.then_some(missions);
        let prefix = target.missions_prefix.as_str().into();
        let topic = format!("{}/gw-{index}", target.prefix);
        Ok((Self { client, topic, queued, missions, prefix, task }, answers))
    }

    /// The missions arriving for this connection's drones, and how to answer them (once; `None`
    /// without `missions`).
    pub fn take_missions(&mut self) -> Option<(mpsc::Receiver<events::Leased>, MissionAnswers)> {
        Some((self.missions.take()?, MissionAnswers { client: self.client.clone(), prefix: self.prefix.clone() }))
    }

    /// Publishes `events` as batch `batch_seq`; waits while the client's window is full.
    pub async fn send(&self, batch_seq: u64, events: &[DroneEvent]) -> anyhow::Result<()> {
        let payload = serde_json::to_vec(events)?;
        if let Ok(mut q) = self.queued.lock() {
            q.push_back((batch_seq, u32::try_from(events.len()).unwrap_or(u32::MAX)));
        }
        self.client.publish(self.topic.clone(), QoS::AtLeastOnce, false, payload).await.context("publishing a batch")
    }

    /// Disconnects once the broker has had time to acknowledge what was sent.
    pub async fn finish(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_read_with_the_default_port() {
        let t = MqttTarget::parse("mqtt://127.0.0.1", "fleetstream/telemetry/").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.prefix.as_str()), ("127.0.0.1", 1883, "fleetstream/telemetry"));
        assert_eq!(MqttTarget::parse("mqtt://broker:1884", "x").unwrap().port, 1884);
        assert!(MqttTarget::parse("tcp://broker", "x").is_err());
        assert!(MqttTarget::parse("mqtt://broker:http", "x").is_err());
    }
}

/// One fleet connection's telemetry over HTTP (`loadgen --http-telemetry`): each batch one
/// `POST /v1/telemetry` of a JSON array, sent one after another so a connection's drones stay
/// in order, each answered when the node holds it durably.
#[derive(Debug)]
pub struct HttpSender {
    http: reqwest::Client,
    url: String,
    answers: mpsc::Sender<ingest::Answer>,
}

impl HttpSender {
    /// Posts to `<api>/v1/telemetry` with `http`; answers come out of the receiver.
    pub fn new(http: reqwest::Client, api: &str) -> (Self, mpsc::Receiver<ingest::Answer>) {
        let (answers, rx) = mpsc::channel(16);
        (Self { http, url: format!("{}/v1/telemetry", api.trim_end_matches('/')), answers }, rx)
    }

    /// Posts `events` as batch `batch_seq` and waits for the answer.
    pub async fn send(&self, batch_seq: u64, events: &[DroneEvent]) -> anyhow::Result<()> {
        let body = serde_json::to_vec(events)?;
        let resp = self.http.post(&self.url).header("content-type", "application/json").body(body).send().await;
        let result = match resp {
            Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => Ok(()),
            Ok(r) => {
                let status = r.status();
                Err(events::Error::Storage(format!("{status}: {}", r.text().await.unwrap_or_default())))
            }
            Err(e) => Err(events::Error::Storage(format!("POST /v1/telemetry: {e}"))),
        };
        let events = u32::try_from(events.len()).unwrap_or(u32::MAX);
        let _ = self.answers.send(ingest::Answer { batch_seq, events, result }).await;
        Ok(())
    }
}
