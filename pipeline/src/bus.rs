//! In-process fan-out: every subscriber of a topic sees every published batch.
//!
//! A publisher hands over an `Arc` of a validated batch; each subscriber gets a clone of the
//! `Arc` in its own bounded queue, so fan-out costs one reference count per subscriber and never
//! copies events. What happens when a subscriber's queue is full is that subscriber's choice
//! ([`Overflow`]): a blocking subscriber slows the publisher (nothing is lost), a disconnecting
//! one is cut off and told it lagged (the publisher never waits for it). Memory stays bounded by
//! the queue capacity either way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use events::wire::{Batch, Payload};
use events::{Overflow, Subscription};
use parking_lot::RwLock;

/// One topic's subscribers.
pub struct Topic<T: Payload> {
    name: &'static str,
    capacity: usize,
    subs: RwLock<Arc<[Subscriber<T>]>>,
    next_id: AtomicU64,
    cut_off: AtomicU64,
}

struct Subscriber<T: Payload> {
    id: u64,
    tx: flume::Sender<Arc<Batch<T>>>,
    overflow: Overflow,
    lagged: Arc<AtomicBool>,
}

impl<T: Payload> Clone for Subscriber<T> {
    fn clone(&self) -> Self {
        Self { id: self.id, tx: self.tx.clone(), overflow: self.overflow, lagged: self.lagged.clone() }
    }
}

impl<T: Payload> Topic<T> {
    /// A topic whose subscribers each queue up to `capacity` batches.
    pub fn new(name: &'static str, capacity: usize) -> Self {
        Self {
            name,
            capacity: capacity.max(1),
            subs: RwLock::new(Arc::from(Vec::new())),
            next_id: AtomicU64::new(0),
            cut_off: AtomicU64::new(0),
        }
    }

    /// Adds a subscriber that sees every batch published from now on.
    pub fn subscribe(&self, overflow: Overflow) -> Subscription<T> {
        let (tx, rx) = flume::bounded(self.capacity);
        let lagged = Arc::new(AtomicBool::new(false));
        let sub = Subscriber { id: self.next_id.fetch_add(1, Ordering::Relaxed), tx, overflow, lagged: lagged.clone() };
        let mut subs = self.subs.write();
        let mut next: Vec<_> = subs.iter().cloned().collect();
        next.push(sub);
        *subs = Arc::from(next);
        Subscription::new(rx, lagged)
    }

    /// Hands `batch` to every subscriber. Blocks while a [`Overflow::Block`] subscriber is full;
    /// call it from a thread, not from an async task.
    pub fn publish(&self, batch: Arc<Batch<T>>) {
        let subs = self.subs.read().clone();
        let mut gone = Vec::new();
        for sub in subs.iter() {
            let delivered = match sub.overflow {
                Overflow::Block => sub.tx.send(batch.clone()).is_ok(),
                Overflow::Disconnect => match sub.tx.try_send(batch.clone()) {
                    Ok(()) => true,
                    Err(flume::TrySendError::Full(_)) => {
                        sub.lagged.store(true, Ordering::Release);
                        self.cut_off.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            topic = self.name,
                            subscriber = sub.id,
                            "subscriber lagged and was disconnected"
                        );
                        false
                    }
                    Err(flume::TrySendError::Disconnected(_)) => false,
                },
            };
            if !delivered {
                gone.push(sub.id);
            }
        }
        if !gone.is_empty() {
            let mut subs = self.subs.write();
            let kept: Vec<_> = subs.iter().filter(|s| !gone.contains(&s.id)).cloned().collect();
            *subs = Arc::from(kept);
        }
    }

    /// Current number of subscribers.
    pub fn subscribers(&self) -> usize {
        self.subs.read().len()
    }

    /// Subscribers cut off for lagging so far.
    pub fn cut_off(&self) -> u64 {
        self.cut_off.load(Ordering::Relaxed)
    }
}

impl<T: Payload> std::fmt::Debug for Topic<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic").field("name", &self.name).field("subscribers", &self.subscribers()).finish()
    }
}

#[cfg(test)]
mod tests {
    use events::wire::{Buffer, TelemetryBatch};
    use events::{BatchMeta, DroneEvent};

    use super::*;

    fn batch(seq: u64) -> Arc<TelemetryBatch> {
        Arc::new(
            TelemetryBatch::encode(BatchMeta { batch_seq: seq, ..BatchMeta::default() }, &[], Buffer::new()).unwrap(),
        )
    }

    #[test]
    fn every_subscriber_sees_every_batch_in_order() {
        let topic = Topic::<DroneEvent>::new("t", 16);
        let a = topic.subscribe(Overflow::Block);
        let b = topic.subscribe(Overflow::Disconnect);
        for seq in 0..10 {
            topic.publish(batch(seq));
        }
        for sub in [a, b] {
            let seqs: Vec<_> = sub.rx.try_iter().map(|b| b.header().meta.batch_seq).collect();
            assert_eq!(seqs, (0..10).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_lagging_subscriber_is_cut_off_and_others_continue() {
        let topic = Topic::<DroneEvent>::new("t", 2);
        let slow = topic.subscribe(Overflow::Disconnect);
        let fast = topic.subscribe(Overflow::Block);
        for seq in 0..5 {
            topic.publish(batch(seq));
            assert_eq!(fast.rx.recv().unwrap().header().meta.batch_seq, seq);
        }
        assert_eq!(topic.subscribers(), 1);
        assert_eq!(topic.cut_off(), 1);
        assert_eq!(slow.rx.try_iter().count(), 2, "what was queued before the cut is still readable");
        assert!(slow.rx.recv().is_err());
        assert_eq!(slow.end_reason(), events::Error::Lagged);
    }

    #[test]
    fn dropped_subscribers_are_removed() {
        let topic = Topic::<DroneEvent>::new("t", 2);
        drop(topic.subscribe(Overflow::Block));
        topic.publish(batch(0));
        assert_eq!(topic.subscribers(), 0);
    }
}
