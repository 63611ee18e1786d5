//! A queue's bookkeeping as a pure state machine: messages, leases, attempts, visibility
//! timeouts and the dead-letter queue, with time passed in. No I/O and no clock, so every
//! redelivery and dead-lettering is reproduced exactly by a test; the driver
//! ([`super::Queue`]) journals what this decides and wakes it when a lease runs out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use events::{Error, KeyRange, Leased};
use serde::{Deserialize, Serialize};

/// A queue's limits. Every field has a default; see each for why.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// How long a leased message may stay unacknowledged before it is offered again, ms.
    /// Default 30,000: far above a consumer's normal processing time, short enough that a
    /// crashed consumer's work resumes within the minute.
    pub visibility_timeout_ms: u64,
    /// Deliveries after which a message that still fails moves to the dead-letter queue.
    /// Default 5.
    pub max_attempts: u32,
    /// Messages the queue holds (ready, leased and dead) before enqueue answers "storage full".
    /// Default 1,000,000: memory stays bounded however slow the consumers are.
    pub max_messages: usize,
    /// Largest payload accepted, bytes. Default 65,536.
    pub max_payload_bytes: usize,
    /// Whether a consumer that attaches for keys another consumer holds takes them over (the
    /// other is superseded and what it held is offered again at once). Default false
    /// (competing consumers); true for `drone-commands`, where a key is one drone and a
    /// reconnecting drone replaces its old session.
    pub exclusive_keys: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            visibility_timeout_ms: events::queue::DEFAULT_VISIBILITY_TIMEOUT.as_millis() as u64,
            max_attempts: 5,
            max_messages: 1_000_000,
            max_payload_bytes: 64 << 10,
            exclusive_keys: false,
        }
    }
}

/// One message and where it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Id, increasing in enqueue order.
    pub id: u64,
    /// Routing key.
    pub key: u64,
    /// Payload.
    pub payload: Arc<[u8]>,
    /// When it was enqueued, µs.
    pub enqueued_us: u64,
    /// Deliveries so far.
    pub attempts: u32,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    /// Where it stands.
    pub status: Status,
}

/// Where a message stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Waiting for a consumer.
    Ready,
    /// Held by a consumer until `until_us`.
    Leased {
        /// The consumer.
        consumer: u64,
        /// The lease's token.
        token: u64,
        /// When the lease runs out.
        until_us: u64,
    },
    /// In the dead-letter queue since `at_us`.
    Dead {
        /// When it got there.
        at_us: u64,
    },
}

/// What happened to a message that came back to the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Returned {
    /// Offered again.
    Requeued {
        /// The message.
        id: u64,
    },
    /// Moved to the dead-letter queue.
    DeadLettered {
        /// The message.
        id: u64,
        /// Deliveries it had.
        attempts: u32,
        /// Why.
        reason: String,
    },
}

/// One queue's state.
#[derive(Debug)]
pub struct QueueState {
    cfg: QueueConfig,
    messages: BTreeMap<u64, Message>,
    /// Ready messages by (key, id): a key range is one range scan, and one key's messages come
    /// out in enqueue order.
    ready: BTreeSet<(u64, u64)>,
    /// Leases by (expiry, id).
    expiry: BTreeSet<(u64, u64)>,
    next_id: u64,
    next_token: u64,
    dead: usize,
}

impl QueueState {
    /// An empty queue.
    pub fn new(cfg: QueueConfig) -> Self {
        Self {
            cfg,
            messages: BTreeMap::new(),
            ready: BTreeSet::new(),
            expiry: BTreeSet::new(),
            next_id: 1,
            next_token: 1,
            dead: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    /// Adds a message and returns its id.
    pub fn enqueue(&mut self, key: u64, payload: Arc<[u8]>, now_us: u64) -> Result<u64, Error> {
        if payload.len() > self.cfg.max_payload_bytes {
            return Err(Error::TooLarge {
                len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                max: u32::try_from(self.cfg.max_payload_bytes).unwrap_or(u32::MAX),
            });
        }
        if self.messages.len() >= self.cfg.max_messages {
            return Err(Error::StorageFull);
        }
        let id = self.next_id;
        self.restore(Message {
            id,
            key,
            payload,
            enqueued_us: now_us,
            attempts: 0,
            last_error: None,
            status: Status::Ready,
        });
        Ok(id)
    }

    /// Puts back a message as it was journalled (recovery): a leased one comes back ready,
    /// since no lease outlives the process that granted it.
    pub fn restore(&mut self, mut m: Message) {
        self.next_id = self.next_id.max(m.id + 1);
        if matches!(m.status, Status::Leased { .. }) {
            m.status = Status::Ready;
        }
        self.forget(m.id);
        match m.status {
            Status::Ready => {
                self.ready.insert((m.key, m.id));
            }
            Status::Dead { .. } => self.dead += 1,
            Status::Leased { .. } => {}
        }
        self.messages.insert(m.id, m);
    }

    /// Drops a message whatever its status (the journal's record of an ack or purge).
    pub fn forget(&mut self, id: u64) {
        if let Some(m) = self.messages.remove(&id) {
            self.unindex(&m);
        }
    }

    /// Leases up to `max` ready messages with keys in `keys` to `consumer`; each counts as an
    /// attempt.
    pub fn lease(&mut self, consumer: u64, keys: KeyRange, max: usize, now_us: u64) -> Vec<Leased> {
        let picked: Vec<(u64, u64)> = if keys == KeyRange::ALL {
            self.ready.iter().take(max).copied().collect()
        } else {
            self.ready.range((keys.lo, 0)..(keys.hi, 0)).take(max).copied().collect()
        };
        let until_us = now_us.saturating_add(self.cfg.visibility_timeout_ms.saturating_mul(1000));
        let mut out = Vec::with_capacity(picked.len());
        for (key, id) in picked {
            self.ready.remove(&(key, id));
            let token = self.next_token;
            self.next_token += 1;
            let Some(m) = self.messages.get_mut(&id) else { continue };
            m.attempts += 1;
            m.status = Status::Leased { consumer, token, until_us };
            self.expiry.insert((until_us, id));
            out.push(Leased { id, key, attempt: m.attempts, token, payload: m.payload.clone() });
        }
        out
    }

    /// Removes the ready messages of `key` whose payload `matches`; returns their ids.
    pub fn withdraw(&mut self, key: u64, matches: &dyn Fn(&[u8]) -> bool) -> Vec<u64> {
        let ids: Vec<u64> = self
            .ready
            .range((key, 0)..=(key, u64::MAX))
            .map(|&(_, id)| id)
            .filter(|id| self.messages.get(id).is_some_and(|m| matches(&m.payload)))
            .collect();
        for id in &ids {
            self.forget(*id);
        }
        ids
    }

    /// Whether any message with a key in `keys` is ready.
    pub fn has_ready(&self, keys: KeyRange) -> bool {
        if keys == KeyRange::ALL {
            !self.ready.is_empty()
        } else {
            self.ready.range((keys.lo, 0)..(keys.hi, 0)).next().is_some()
        }
    }

    /// Acknowledges a leased message: it is done and removed.
    pub fn ack(&mut self, id: u64, token: u64) -> Result<Message, Error> {
        self.check_lease(id, token)?;
        let m = self.messages.remove(&id).ok_or(Error::UnknownMessage(id))?;
        self.unindex(&m);
        Ok(m)
    }

    /// A consumer failed a leased message: it is offered again, or dead-lettered when it has
    /// had its attempts.
    pub fn nack(&mut self, id: u64, token: u64, reason: &str, now_us: u64) -> Result<Returned, Error> {
        self.check_lease(id, token)?;
        Ok(self.give_back(id, reason.to_string(), now_us))
    }

    /// Every message `consumer` holds comes back now (the consumer disconnected).
    pub fn release(&mut self, consumer: u64, now_us: u64) -> Vec<Returned> {
        let held: Vec<u64> = self
            .expiry
            .iter()
            .filter(|(_, id)| {
                matches!(self.messages.get(id).map(|m| &m.status), Some(Status::Leased { consumer: c, .. }) if *c == consumer)
            })
            .map(|(_, id)| *id)
            .collect();
        held.into_iter()
            .map(|id| self.give_back(id, "the consumer disconnected before acking".into(), now_us))
            .collect()
    }

    /// Leases that ran out by `now_us` come back.
    pub fn expire(&mut self, now_us: u64) -> Vec<Returned> {
        let due: Vec<u64> = self.expiry.iter().take_while(|(until, _)| *until <= now_us).map(|(_, id)| *id).collect();
        due.into_iter()
            .map(|id| {
                let reason =
                    format!("not acknowledged within the visibility timeout of {} ms", self.cfg.visibility_timeout_ms);
                self.give_back(id, reason, now_us)
            })
            .collect()
    }

    /// When the next lease runs out, µs.
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiry.first().map(|(until, _)| *until)
    }

    /// Moves a dead-lettered message back to the queue with its attempts reset.
    pub fn replay(&mut self, id: u64) -> Result<(), Error> {
        match self.messages.get(&id).map(|m| &m.status) {
            Some(Status::Dead { .. }) => {}
            Some(_) => {
                return Err(Error::InvalidTransition { delivery: id, reason: "the message is not dead-lettered" });
            }
            None => return Err(Error::UnknownMessage(id)),
        }
        let Some(m) = self.messages.get_mut(&id) else { return Err(Error::UnknownMessage(id)) };
        m.status = Status::Ready;
        m.attempts = 0;
        self.dead -= 1;
        self.ready.insert((m.key, id));
        Ok(())
    }

    /// Deletes a dead-lettered message for good.
    pub fn purge(&mut self, id: u64) -> Result<Message, Error> {
        match self.messages.get(&id).map(|m| &m.status) {
            Some(Status::Dead { .. }) => {}
            Some(_) => {
                return Err(Error::InvalidTransition { delivery: id, reason: "the message is not dead-lettered" });
            }
            None => return Err(Error::UnknownMessage(id)),
        }
        let m = self.messages.remove(&id).ok_or(Error::UnknownMessage(id))?;
        self.unindex(&m);
        Ok(m)
    }

    /// Dead-lettered messages with ids above `after`, oldest first, at most `limit`.
    pub fn dead_letters(&self, after: u64, limit: usize) -> Vec<&Message> {
        self.messages
            .range(after.saturating_add(1)..)
            .map(|(_, m)| m)
            .filter(|m| matches!(m.status, Status::Dead { .. }))
            .take(limit)
            .collect()
    }

    /// A message by id.
    pub fn get(&self, id: u64) -> Option<&Message> {
        self.messages.get(&id)
    }

    /// Every message, by id (for snapshots).
    pub fn messages(&self) -> impl Iterator<Item = &Message> {
        self.messages.values()
    }

    /// Counts: (ready, leased, dead).
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.ready.len(), self.expiry.len(), self.dead)
    }

    fn check_lease(&self, id: u64, token: u64) -> Result<(), Error> {
        match self.messages.get(&id).map(|m| &m.status) {
            None => Err(Error::UnknownMessage(id)),
            Some(Status::Leased { token: t, .. }) if *t == token => Ok(()),
            Some(_) => Err(Error::LeaseLost(id)),
        }
    }

    fn give_back(&mut self, id: u64, reason: String, now_us: u64) -> Returned {
        let max = self.cfg.max_attempts.max(1);
        let Some(m) = self.messages.get_mut(&id) else { return Returned::Requeued { id } };
        if let Status::Leased { until_us, .. } = m.status {
            self.expiry.remove(&(until_us, id));
        }
        m.last_error = Some(reason.clone());
        if m.attempts >= max {
            m.status = Status::Dead { at_us: now_us };
            self.dead += 1;
            Returned::DeadLettered { id, attempts: m.attempts, reason }
        } else {
            m.status = Status::Ready;
            self.ready.insert((m.key, id));
            Returned::Requeued { id }
        }
    }

    fn unindex(&mut self, m: &Message) {
        match m.status {
            Status::Ready => {
                self.ready.remove(&(m.key, m.id));
            }
            Status::Leased { until_us, .. } => {
                self.expiry.remove(&(until_us, m.id));
            }
            Status::Dead { .. } => self.dead -= 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(timeout_ms: u64, attempts: u32) -> QueueState {
        QueueState::new(QueueConfig {
            visibility_timeout_ms: timeout_ms,
            max_attempts: attempts,
            ..QueueConfig::default()
        })
    }

    fn payload(s: &str) -> Arc<[u8]> {
        Arc::from(s.as_bytes())
    }

    #[test]
    fn competing_consumers_each_get_different_messages() {
        let mut q = queue(1_000, 3);
        for i in 0..6 {
            q.enqueue(0, payload(&format!("m{i}")), 0).unwrap();
        }
        let a = q.lease(1, KeyRange::ALL, 2, 10);
        let b = q.lease(2, KeyRange::ALL, 2, 10);
        let c = q.lease(3, KeyRange::ALL, 10, 10);
        let mut ids: Vec<u64> = a.iter().chain(&b).chain(&c).map(|m| m.id).collect();
        assert_eq!(ids.len(), 6);
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 6, "no message is leased twice");
        assert!(q.lease(4, KeyRange::ALL, 10, 10).is_empty());
        for m in a.iter().chain(&b).chain(&c) {
            q.ack(m.id, m.token).unwrap();
        }
        assert_eq!(q.counts(), (0, 0, 0));
    }

    #[test]
    fn an_unacked_message_comes_back_after_the_visibility_timeout_and_old_tokens_are_refused() {
        let mut q = queue(1_000, 3);
        let id = q.enqueue(0, payload("x"), 0).unwrap();
        let first = q.lease(1, KeyRange::ALL, 1, 0).remove(0);
        assert_eq!(first.attempt, 1);
        assert_eq!(q.next_expiry(), Some(1_000_000));
        assert!(q.expire(999_999).is_empty(), "not before the timeout");
        assert_eq!(q.expire(1_000_000), vec![Returned::Requeued { id }]);
        let second = q.lease(2, KeyRange::ALL, 1, 1_000_000).remove(0);
        assert_eq!((second.id, second.attempt), (id, 2));
        assert_eq!(q.ack(id, first.token), Err(Error::LeaseLost(id)), "the first consumer's lease is gone");
        q.ack(id, second.token).unwrap();
        assert_eq!(q.ack(id, second.token), Err(Error::UnknownMessage(id)));
    }

    #[test]
    fn a_message_that_always_fails_is_dead_lettered_with_its_reason_and_can_be_replayed() {
        let mut q = queue(1_000, 3);
        let id = q.enqueue(7, payload("poison"), 0).unwrap();
        for attempt in 1..=3 {
            let m = q.lease(1, KeyRange::ALL, 1, attempt * 10).remove(0);
            assert_eq!(m.attempt as u64, attempt);
            let out = q.nack(id, m.token, "cannot parse", attempt * 10).unwrap();
            if attempt < 3 {
                assert_eq!(out, Returned::Requeued { id });
            } else {
                assert_eq!(out, Returned::DeadLettered { id, attempts: 3, reason: "cannot parse".into() });
            }
        }
        assert!(q.lease(1, KeyRange::ALL, 1, 100).is_empty(), "dead letters are not offered");
        assert_eq!(q.counts(), (0, 0, 1));
        let dead = q.dead_letters(0, 10);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].last_error.as_deref(), Some("cannot parse"));
        assert_eq!(dead[0].attempts, 3);
        q.replay(id).unwrap();
        assert!(q.replay(id).is_err(), "only dead letters replay");
        let again = q.lease(1, KeyRange::ALL, 1, 200).remove(0);
        assert_eq!((again.id, again.attempt, &*again.payload), (id, 1, &b"poison"[..]));
    }

    #[test]
    fn expiry_counts_as_an_attempt_and_ends_in_the_dead_letter_queue() {
        let mut q = queue(10, 2);
        let id = q.enqueue(0, payload("slow"), 0).unwrap();
        q.lease(1, KeyRange::ALL, 1, 0);
        assert_eq!(q.expire(10_000), vec![Returned::Requeued { id }]);
        q.lease(1, KeyRange::ALL, 1, 10_000);
        let out = q.expire(20_000);
        assert!(
            matches!(&out[..], [Returned::DeadLettered { attempts: 2, reason, .. }] if reason.contains("visibility timeout"))
        );
    }

    #[test]
    fn key_ranges_route_messages_and_keep_each_keys_order() {
        let mut q = queue(1_000, 3);
        let a1 = q.enqueue(5, payload("a1"), 0).unwrap();
        let b1 = q.enqueue(50, payload("b1"), 0).unwrap();
        let a2 = q.enqueue(5, payload("a2"), 0).unwrap();
        let low = q.lease(1, KeyRange { lo: 0, hi: 10 }, 10, 0);
        assert_eq!(low.iter().map(|m| m.id).collect::<Vec<_>>(), vec![a1, a2]);
        assert!(!q.has_ready(KeyRange { lo: 0, hi: 10 }));
        assert!(q.has_ready(KeyRange { lo: 10, hi: 100 }));
        let high = q.lease(2, KeyRange { lo: 10, hi: 100 }, 10, 0);
        assert_eq!(high.iter().map(|m| m.id).collect::<Vec<_>>(), vec![b1]);
    }

    #[test]
    fn a_disconnected_consumers_messages_come_back_at_once() {
        let mut q = queue(60_000, 5);
        for _ in 0..3 {
            q.enqueue(0, payload("m"), 0).unwrap();
        }
        let held = q.lease(1, KeyRange::ALL, 2, 0);
        let other = q.lease(2, KeyRange::ALL, 1, 0);
        let back = q.release(1, 5);
        assert_eq!(back.len(), 2);
        let again = q.lease(3, KeyRange::ALL, 10, 5);
        assert_eq!(again.iter().map(|m| m.id).collect::<Vec<_>>(), held.iter().map(|m| m.id).collect::<Vec<_>>());
        q.ack(other[0].id, other[0].token).unwrap();
    }

    #[test]
    fn limits_are_enforced() {
        let mut q = QueueState::new(QueueConfig { max_messages: 2, max_payload_bytes: 4, ..QueueConfig::default() });
        q.enqueue(0, payload("1234"), 0).unwrap();
        assert!(matches!(q.enqueue(0, payload("12345"), 0), Err(Error::TooLarge { len: 5, max: 4 })));
        q.enqueue(0, payload("b"), 0).unwrap();
        assert_eq!(q.enqueue(0, payload("c"), 0), Err(Error::StorageFull));
    }

    #[test]
    fn restored_leases_come_back_ready_and_ids_continue() {
        let mut q = queue(1_000, 3);
        q.restore(Message {
            id: 41,
            key: 1,
            payload: payload("x"),
            enqueued_us: 0,
            attempts: 2,
            last_error: None,
            status: Status::Leased { consumer: 9, token: 3, until_us: 5 },
        });
        let m = q.lease(1, KeyRange::ALL, 1, 0).remove(0);
        assert_eq!((m.id, m.attempt), (41, 3));
        assert_eq!(q.enqueue(0, payload("y"), 0), Ok(42));
    }

    #[test]
    fn withdraw_takes_back_only_the_matching_ready_messages_of_one_key() {
        let mut q = QueueState::new(QueueConfig::default());
        let fly = q.enqueue(7, Arc::from(&b"fly-1"[..]), 0).unwrap();
        let other = q.enqueue(7, Arc::from(&b"fly-2"[..]), 0).unwrap();
        let elsewhere = q.enqueue(8, Arc::from(&b"fly-1"[..]), 0).unwrap();
        let is_one = |p: &[u8]| p == b"fly-1";
        assert_eq!(q.withdraw(7, &is_one), vec![fly]);
        assert!(q.get(fly).is_none());
        assert!(q.get(other).is_some() && q.get(elsewhere).is_some(), "other payloads and keys stay");
        // A leased message is with its consumer already: it stays.
        let leased = q.lease(1, KeyRange { lo: 8, hi: 9 }, 1, 0);
        assert_eq!(leased.len(), 1);
        assert!(q.withdraw(8, &is_one).is_empty());
        assert_eq!(q.counts(), (1, 1, 0));
    }
}
