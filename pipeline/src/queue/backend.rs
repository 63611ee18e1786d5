//! The seam of the queue path: one work queue wherever it is kept. The engine (for
//! [`events::WorkQueues`]) and the admin API hold an `Arc<dyn QueueBackend>` per queue and never
//! ask which it is: the embedded journal ([`Embedded`]) or JetStream (`crate::jetstream`).

use std::sync::Arc;
use std::time::Duration;

use events::{Error, KeyRange, Leased, QueueName, Verdict, WorkQueues};

use super::{DeadLetter, Queues};
use crate::BoxFuture;

/// One work queue of the queue path.
pub trait QueueBackend: Send + Sync + 'static {
    /// What keeps it (`embedded`, `jetstream`), for operators.
    fn kind(&self) -> &'static str;

    /// Adds a message for `key`; with an `id`, a second enqueue of the same id is dropped where
    /// the backend can tell (JetStream's duplicate window). Resolves once it is durable.
    fn enqueue(&self, key: u64, id: Option<String>, payload: Vec<u8>) -> BoxFuture<'_, Result<u64, Error>>;

    /// Leases up to `max` messages with keys in `keys`, waiting up to `wait` for the first.
    fn lease(
        &self,
        consumer: u64,
        keys: KeyRange,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Leased>, Error>>;

    /// Acks, retries or dead-letters a leased message.
    fn settle(&self, id: u64, token: u64, verdict: Verdict) -> Result<(), Error>;

    /// Gives back everything `consumer` holds.
    fn release(&self, consumer: u64);

    /// Takes back the ready messages of `key` whose payload `matches`; how many.
    fn withdraw<'a>(
        &'a self,
        key: u64,
        matches: &'a (dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<usize, Error>>;

    /// Attaches a consumer for `keys`; its id.
    fn attach(&self, keys: KeyRange) -> Result<u64, Error>;

    /// Messages waiting or leased.
    fn pending(&self) -> BoxFuture<'_, Result<u64, Error>>;

    /// What the admin API lists for this queue (counts, counters).
    fn summary(&self) -> BoxFuture<'_, serde_json::Value>;

    /// Dead letters after id `after`, at most `limit`.
    fn dead_letters(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, Error>>;

    /// One dead letter.
    fn dead_letter(&self, id: u64) -> BoxFuture<'_, Option<DeadLetter>>;

    /// Puts a dead letter back on the queue; false when there is no such dead letter.
    fn replay(&self, id: u64) -> BoxFuture<'_, Result<bool, Error>>;

    /// Deletes a dead letter; false when there is no such dead letter.
    fn purge(&self, id: u64) -> BoxFuture<'_, Result<bool, Error>>;
}

/// A queue of the embedded journal ([`Queues`]).
#[derive(Debug)]
pub struct Embedded {
    queues: Arc<Queues>,
    name: QueueName,
}

impl Embedded {
    /// Queue `name` of `queues`.
    pub fn new(queues: Arc<Queues>, name: QueueName) -> Self {
        Self { queues, name }
    }
}

/// A missing dead letter is `false`; other errors stay errors.
fn found(result: Result<(), Error>) -> Result<bool, Error> {
    match result {
        Ok(()) => Ok(true),
        Err(Error::UnknownMessage(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

impl QueueBackend for Embedded {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn enqueue(&self, key: u64, _id: Option<String>, payload: Vec<u8>) -> BoxFuture<'_, Result<u64, Error>> {
        Box::pin(self.queues.enqueue(self.name, key, payload))
    }

    fn lease(
        &self,
        consumer: u64,
        keys: KeyRange,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<Leased>, Error>> {
        Box::pin(self.queues.lease(self.name, consumer, keys, max, wait))
    }

    fn settle(&self, id: u64, token: u64, verdict: Verdict) -> Result<(), Error> {
        self.queues.settle(self.name, id, token, verdict)
    }

    fn release(&self, consumer: u64) {
        self.queues.release(self.name, consumer);
    }

    fn withdraw<'a>(
        &'a self,
        key: u64,
        matches: &'a (dyn Fn(&[u8]) -> bool + Send + Sync),
    ) -> BoxFuture<'a, Result<usize, Error>> {
        Box::pin(self.queues.withdraw(self.name, key, matches))
    }

    fn attach(&self, keys: KeyRange) -> Result<u64, Error> {
        self.queues.attach(self.name, keys)
    }

    fn pending(&self) -> BoxFuture<'_, Result<u64, Error>> {
        let (ready, leased, _) = self.queues.get(self.name).counts();
        Box::pin(std::future::ready(Ok((ready + leased) as u64)))
    }

    fn summary(&self) -> BoxFuture<'_, serde_json::Value> {
        use std::sync::atomic::Ordering::Relaxed;
        let q = self.queues.get(self.name);
        let (ready, leased, dead) = q.counts();
        let m = q.metrics();
        Box::pin(std::future::ready(serde_json::json!({
            "queue": self.name.name(),
            "ready": ready,
            "leased": leased,
            "dead": dead,
            "enqueued": m.enqueued.load(Relaxed),
            "delivered": m.delivered.load(Relaxed),
            "acked": m.acked.load(Relaxed),
            "redelivered": m.redelivered.load(Relaxed),
            "dead_lettered": m.dead_lettered.load(Relaxed),
            "replayed": m.replayed.load(Relaxed),
            "backend": self.kind(),
        })))
    }

    fn dead_letters(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, Error>> {
        Box::pin(std::future::ready(Ok(self.queues.get(self.name).dead_letters(after, limit))))
    }

    fn dead_letter(&self, id: u64) -> BoxFuture<'_, Option<DeadLetter>> {
        Box::pin(std::future::ready(self.queues.get(self.name).dead_letter(id)))
    }

    fn replay(&self, id: u64) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(std::future::ready(found(self.queues.get(self.name).replay(id))))
    }

    fn purge(&self, id: u64) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(std::future::ready(found(self.queues.get(self.name).purge(id))))
    }
}
