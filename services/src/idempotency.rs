//! `Idempotency-Key` for `POST /v1/deliveries`: a client that retries a request (a timeout, a
//! dropped connection) with the same key gets the first result instead of a second delivery.
//!
//! Keys are scoped to the ordering account, remembered for the last [`CAPACITY`] successful
//! requests (oldest forgotten first, so memory is bounded), and tied to the request they came
//! with: the same key with a different body is refused (`422`). A retry that arrives while the
//! first request is still running waits for it. A failed request is not remembered, so it can
//! be retried under the same key.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::state::{CreateDelivery, DeliveryRecord};

/// Successful keyed requests remembered.
pub const CAPACITY: usize = 100_000;
/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

enum Slot {
    Running(Arc<Notify>, CreateDelivery),
    Done(DeliveryRecord, CreateDelivery),
}

/// What a keyed request should do.
pub enum Begin {
    /// Run it; call [`Keys::finish`] afterwards.
    Run,
    /// It already ran: here is its result.
    Replay(DeliveryRecord),
    /// The key was used for a different request.
    Mismatch,
}

/// The remembered keys.
#[derive(Default)]
pub struct Keys {
    inner: Mutex<(HashMap<String, Slot>, VecDeque<String>)>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("remembered", &self.inner.lock().1.len()).finish()
    }
}

fn scoped(req: &CreateDelivery, key: &str) -> String {
    format!("{}\u{0}{key}", req.owner)
}

impl Keys {
    /// Claims `key` for `req`, waiting while an identical request with the key is running.
    pub async fn begin(&self, key: &str, req: &CreateDelivery) -> Begin {
        let scoped = scoped(req, key);
        loop {
            let wait = {
                let mut inner = self.inner.lock();
                match inner.0.get(&scoped) {
                    None => {
                        inner.0.insert(scoped, Slot::Running(Arc::new(Notify::new()), req.clone()));
                        return Begin::Run;
                    }
                    Some(Slot::Done(_, first) | Slot::Running(_, first)) if first != req => return Begin::Mismatch,
                    Some(Slot::Done(record, _)) => return Begin::Replay(record.clone()),
                    Some(Slot::Running(done, _)) => done.clone(),
                }
            };
            let notified = wait.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // The first request may have finished between the check and `enable`.
            let still_running = matches!(self.inner.lock().0.get(&scoped), Some(Slot::Running(..)));
            if still_running {
                notified.await;
            }
        }
    }

    /// Records how the claimed request ended: a success is remembered, a failure forgotten.
    pub fn finish(&self, key: &str, req: &CreateDelivery, outcome: Option<DeliveryRecord>) {
        let scoped = scoped(req, key);
        let mut inner = self.inner.lock();
        let (map, order) = &mut *inner;
        let waiting = match map.remove(&scoped) {
            Some(Slot::Running(done, _)) => Some(done),
            _ => None,
        };
        if let Some(record) = outcome {
            map.insert(scoped.clone(), Slot::Done(record, req.clone()));
            order.push_back(scoped);
            while order.len() > CAPACITY {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
        drop(inner);
        if let Some(done) = waiting {
            done.notify_waiters();
        }
    }
}
