//! Customer notifications: a customer subscribes to a delivery (`POST
//! /v1/deliveries/{id}/notifications` with an SMS number and/or an email address); each stage
//! change of that delivery puts a notification into the `notifications` queue, and the notifier
//! consumes the queue and sends it. Going through the queue means a notification survives a
//! restart, a failing channel is retried with the queue's attempts and ends in its dead-letter
//! queue with the reason, and a slow channel never holds up the delivery-events consumer.
//!
//! Channels: SMS is a JSON `POST {to, text}` to a configured webhook (the SMS gateway's);
//! email is sent over SMTP (lettre) to a configured relay. A channel without a destination
//! configured nacks its notifications with that reason.

use std::time::Duration;

use events::{DeliveryBatch, DeliveryId, DeliveryStage, KeyRange, QueueName, Verdict, WorkQueues};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::Error;

/// Where notifications go. Every field is optional: a channel without a destination is
/// refused per notification (and so dead-lettered with the reason), not at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Whether this node runs a notifier (consumes `notifications`). Default true; notifiers
    /// on several nodes compete for the queue.
    pub notifier: bool,
    /// URL the SMS notifications are posted to as JSON `{to, text}`.
    pub sms_webhook: Option<String>,
    /// SMTP relay for email, `host:port` (plain SMTP, as to a local relay or sink).
    pub smtp_relay: Option<String>,
    /// Sender address of the emails. Default `fleetstream@localhost`.
    pub email_from: String,
    /// Per-send timeout, ms. Default 5,000.
    pub timeout_ms: Option<u64>,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            notifier: true,
            sms_webhook: None,
            smtp_relay: None,
            email_from: "fleetstream@localhost".into(),
            timeout_ms: None,
        }
    }
}

/// A customer's subscription to one delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct Subscription {
    /// Phone number for SMS: `+` (optional) and 5 to 15 digits.
    #[serde(default)]
    #[schema(nullable = false, pattern = r"^\+?[0-9]{5,15}$")]
    pub sms: Option<String>,
    /// Email address: a local part, `@`, and a domain with a dot inside; at most 254
    /// characters.
    #[serde(default)]
    #[schema(nullable = false, max_length = 254, pattern = r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
    pub email: Option<String>,
}

impl Subscription {
    /// Checks the destinations.
    pub fn validate(&self) -> Result<(), Error> {
        if self.sms.is_none() && self.email.is_none() {
            return Err(Error::BadRequest("give sms and/or email".into()));
        }
        if let Some(n) = &self.sms {
            let digits = n.strip_prefix('+').unwrap_or(n);
            if digits.len() < 5 || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Error::BadRequest(format!("sms {n:?} is not a phone number (+ and 5 to 15 digits)")));
            }
        }
        if let Some(e) = &self.email
            && !valid_email(e)
        {
            return Err(Error::BadRequest(format!("email {e:?} is not an address")));
        }
        Ok(())
    }
}

/// What the schema's pattern says: one `@`, no whitespace, a dot inside the domain (text on
/// both sides of it), at most 254 characters.
fn valid_email(e: &str) -> bool {
    let Some((user, host)) = e.split_once('@') else { return false };
    e.chars().count() <= 254
        && !user.is_empty()
        && !host.contains('@')
        && !e.chars().any(char::is_whitespace)
        && host.char_indices().any(|(i, c)| c == '.' && i > 0 && i + 1 < host.len())
}

/// One notification, as queued.
///
/// Notifications are sent at least once: after a crash the services re-apply delivery events
/// from their last stored position and may queue a notification again. [`Notification::id`]
/// (`<delivery_id>-<seq>`, the delivery event's identity) is the same every time, so a receiver
/// drops repeats by it: SMS posts carry it as `id`, emails as their `Message-ID`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// The delivery event's sequence number within its delivery.
    #[serde(default)]
    pub seq: u32,
    /// The stage it reached.
    pub stage: DeliveryStage,
    /// When, µs since the epoch.
    pub ts_us: u64,
    /// Where to send it.
    pub to: Subscription,
}

impl Notification {
    /// The stable id receivers deduplicate on: `<delivery_id>-<seq>`.
    pub fn id(&self) -> String {
        format!("{}-{}", self.delivery_id, self.seq)
    }

    /// The text a customer reads.
    pub fn text(&self) -> String {
        let what = match self.stage {
            DeliveryStage::Created => "is scheduled",
            DeliveryStage::Rescheduled => "was rescheduled",
            DeliveryStage::HeadedToPickup => "has a drone on its way to the pickup",
            DeliveryStage::InTransit => "is in the air",
            DeliveryStage::DeliveryComplete => "was delivered",
            DeliveryStage::Cancelled => "was cancelled",
        };
        format!("Delivery {} {what}.", self.delivery_id)
    }
}

/// The notifications a batch of delivery events causes, given the subscriptions.
pub fn notifications_for(
    batch: &DeliveryBatch,
    subscribed: impl Fn(DeliveryId) -> Vec<Subscription>,
) -> Vec<Notification> {
    let mut out = Vec::new();
    for e in batch.events().iter() {
        // One subscribes to a delivery that exists: its Created event, however late it is
        // processed, is never a change that came after the subscription.
        if e.stage.to_stage() == DeliveryStage::Created {
            continue;
        }
        let delivery_id = e.delivery_id.to_native();
        for to in subscribed(delivery_id) {
            out.push(Notification {
                delivery_id,
                seq: e.seq.to_native(),
                stage: e.stage.to_stage(),
                ts_us: e.ts_us.to_native(),
                to,
            });
        }
    }
    out
}

/// The channels' clients.
struct Channels {
    http: reqwest::Client,
    smtp: Option<lettre::AsyncSmtpTransport<lettre::Tokio1Executor>>,
}

/// Sends one notification on every channel it asks for.
async fn send(ch: &Channels, cfg: &NotifyConfig, n: &Notification) -> Result<(), String> {
    use lettre::AsyncTransport;
    let http = &ch.http;
    if let Some(to) = &n.to.sms {
        let url = cfg.sms_webhook.as_deref().ok_or("no SMS webhook is configured ([notify] sms_webhook)")?;
        let resp = http
            .post(url)
            .json(&serde_json::json!({ "id": n.id(), "to": to, "text": n.text() }))
            .send()
            .await
            .map_err(|e| format!("SMS webhook: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("SMS webhook answered {}", resp.status()));
        }
    }
    if let Some(to) = &n.to.email {
        let smtp = ch.smtp.as_ref().ok_or("no SMTP relay is configured ([notify] smtp_relay)")?;
        let from = cfg.email_from.parse().map_err(|e| format!("email_from: {e}"))?;
        let to = to.parse().map_err(|e| format!("email address: {e}"))?;
        let message = lettre::Message::builder()
            .from(from)
            .to(to)
            .message_id(Some(format!("<{}@fleetstream>", n.id())))
            .subject(format!("Delivery {}", n.delivery_id))
            .body(n.text())
            .map_err(|e| format!("building the email: {e}"))?;
        smtp.send(message).await.map_err(|e| format!("SMTP: {e}"))?;
    }
    Ok(())
}

/// The notifier: consumes `notifications` until `stop`, sending each and acking it, or nacking
/// it with the reason (the queue retries it, then dead-letters it).
/// Each notification sent (or not) is a `notify.send` span of its delivery in `spans`.
pub async fn run<Q: WorkQueues>(
    queues: std::sync::Arc<Q>,
    cfg: NotifyConfig,
    spans: crate::spans::Spans,
    mut stop: watch::Receiver<bool>,
) {
    let timeout = Duration::from_millis(cfg.timeout_ms.unwrap_or(5_000));
    let http = match crate::tls::plain_client_builder().timeout(timeout).build() {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "the notifier could not start");
            return;
        }
    };
    let smtp = cfg.smtp_relay.as_deref().map(|relay| {
        let (host, port) = relay.rsplit_once(':').map_or((relay, 25), |(h, p)| (h, p.parse().unwrap_or(25)));
        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(timeout))
            .build()
    });
    let channels = Channels { http, smtp };
    let consumer = match queues.attach(QueueName::Notifications, KeyRange::ALL) {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "the notifier could not attach to the notifications queue");
            return;
        }
    };
    loop {
        let leased = tokio::select! {
            _ = stop.changed() => break,
            l = queues.lease(QueueName::Notifications, consumer, KeyRange::ALL, 16, Duration::from_secs(1)) => l,
        };
        let leased = match leased {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(%error, "the notifier stops");
                break;
            }
        };
        for m in leased {
            let verdict = match serde_json::from_slice::<Notification>(&m.payload) {
                Ok(n) => {
                    let started = std::time::Instant::now();
                    let sent = send(&channels, &cfg, &n).await;
                    let channel = match (&n.to.sms, &n.to.email) {
                        (Some(_), Some(_)) => "sms+email",
                        (Some(_), None) => "sms",
                        _ => "email",
                    };
                    let attributes = crate::spans::attrs([
                        ("stage", serde_json::json!(n.stage)),
                        ("seq", n.seq.into()),
                        ("channel", channel.into()),
                        ("attempt", m.attempt.into()),
                        ("error", sent.as_ref().err().map_or(serde_json::Value::Null, |e| e.as_str().into())),
                    ]);
                    let of = crate::spans::SpanOf::new(n.delivery_id, "notify.send", "delivery");
                    spans.record_since(of.with(attributes), started);
                    match sent {
                        Ok(()) => Verdict::Ack,
                        Err(reason) => Verdict::Nack(reason),
                    }
                }
                Err(e) => Verdict::Nack(format!("not a notification: {e}")),
            };
            if let Err(error) = queues.settle(QueueName::Notifications, m.id, m.token, verdict) {
                tracing::debug!(%error, id = m.id, "could not settle a notification");
            }
        }
    }
    queues.release(QueueName::Notifications, consumer);
}

#[cfg(test)]
mod tests {
    use events::wire::Buffer;
    use events::{BatchMeta, DeliveryEvent, GeoPoint};

    use super::*;

    #[test]
    fn subscribers_hear_of_later_changes_only_and_unsubscribed_deliveries_of_none() -> Result<(), events::Error> {
        let ev = |delivery_id, seq, stage| DeliveryEvent {
            delivery_id,
            seq,
            drone_id: 1,
            ts_us: 5,
            location: GeoPoint::new(0.0, 0.0),
            stage,
        };
        let batch = DeliveryBatch::encode(
            BatchMeta::default(),
            &[ev(1, 0, DeliveryStage::Created), ev(1, 1, DeliveryStage::Cancelled), ev(2, 1, DeliveryStage::InTransit)],
            Buffer::new(),
        )?;
        let sub = Subscription { sms: Some("+15550000000".into()), email: None };
        let due = notifications_for(&batch, |id| if id == 1 { vec![sub.clone()] } else { Vec::new() });
        let stages: Vec<_> = due.iter().map(|n| (n.delivery_id, n.stage)).collect();
        assert_eq!(stages, [(1, DeliveryStage::Cancelled)], "Created is never news to a subscriber");
        assert_eq!(due[0].id(), "1-1", "the id is the delivery event's, the same on every re-send");
        Ok(())
    }
}
