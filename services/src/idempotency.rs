//! `Idempotency-Key` for `POST /v1/deliveries`: a client that retries a request (a timeout, a
//! dropped connection) with the same key gets the first result instead of a second delivery.
//!
//! Keys are scoped to the ordering account, remembered for the last `capacity` successful
//! requests (`[services] idempotency_keys`, default [`CAPACITY`]) and at most the retention
//! period (oldest forgotten first, in memory and in the store, so both are bounded: about
//! 1 KiB per key with its stored answer),
//! and tied to the request they came with: the same key with a different body is refused
//! (`422`). A retry that arrives while the first request is still running waits for it. A
//! failed request is not remembered, so it can be retried under the same key.
//!
//! With a store, a success is written before it is answered, so a retry after a crash (the
//! answer was lost with the connection) still gets the first result; keys past their retention
//! are dropped when loaded at start.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::Error;
use crate::state::{CreateDelivery, DeliveryRecord};
use crate::store::{Batch, Store};

/// Successful keyed requests remembered by default.
pub const CAPACITY: usize = 100_000;
/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

enum Slot {
    Running(Arc<Notify>, CreateDelivery),
    Done(DeliveryRecord, CreateDelivery),
}

/// A remembered success as stored.
#[derive(Serialize, Deserialize)]
struct StoredKey {
    record: DeliveryRecord,
    request: CreateDelivery,
    at_us: u64,
}

/// What a keyed request should do.
#[derive(Debug)]
pub enum Begin {
    /// Run it; call [`Keys::finish`] afterwards.
    Run,
    /// It already ran: here is its result.
    Replay(DeliveryRecord),
    /// The key was used for a different request.
    Mismatch,
}

/// The remembered keys.
pub struct Keys {
    inner: Mutex<(HashMap<String, Slot>, VecDeque<String>)>,
    store: Option<Store>,
    capacity: usize,
}

impl Default for Keys {
    fn default() -> Self {
        Self { inner: Mutex::default(), store: None, capacity: CAPACITY }
    }
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
    /// Keys kept in `store`: the newest `capacity` written within `retention_s` are loaded,
    /// the others deleted.
    pub async fn open(store: Store, retention_s: u64, capacity: usize) -> Result<Self, Error> {
        let capacity = capacity.max(1);
        let now = events::now_us();
        let mut kept: Vec<(String, StoredKey)> = Vec::new();
        let mut expired = Batch::new();
        for (key, stored) in store.all::<StoredKey>()? {
            if now.saturating_sub(stored.at_us) > retention_s.saturating_mul(1_000_000) {
                expired.delete(&store, &key);
            } else {
                kept.push((key, stored));
            }
        }
        kept.sort_by_key(|(_, s)| s.at_us);
        let excess = kept.len().saturating_sub(capacity);
        for (key, _) in kept.drain(..excess) {
            expired.delete(&store, &key);
        }
        if !expired.is_empty() {
            store.enqueue(expired).await?;
        }
        let mut map = HashMap::with_capacity(kept.len());
        let mut order = VecDeque::with_capacity(kept.len());
        for (key, stored) in kept {
            map.insert(key.clone(), Slot::Done(stored.record, stored.request));
            order.push_back(key);
        }
        Ok(Self { inner: Mutex::new((map, order)), store: Some(store), capacity })
    }

    /// Claims `key` for `req`, waiting while an identical request with the key is running.
    pub async fn begin(&self, key: &str, req: &CreateDelivery) -> Result<Begin, Error> {
        let scoped = scoped(req, key);
        // On a shared store another node may have answered the key (a client that retried
        // through it): its stored answer is looked up once, before the key is claimed here.
        let mut looked = !self.store.as_ref().is_some_and(Store::is_shared);
        loop {
            if !looked && !self.inner.lock().0.contains_key(&scoped) {
                looked = true;
                if let Some(store) = &self.store
                    && let Some(stored) = store.get::<StoredKey>(&scoped)?
                {
                    let mut inner = self.inner.lock();
                    if !inner.0.contains_key(&scoped) {
                        inner.0.insert(scoped.clone(), Slot::Done(stored.record, stored.request));
                        inner.1.push_back(scoped.clone());
                    }
                }
                continue;
            }
            let wait = {
                let mut inner = self.inner.lock();
                match inner.0.get(&scoped) {
                    None => {
                        inner.0.insert(scoped, Slot::Running(Arc::new(Notify::new()), req.clone()));
                        return Ok(Begin::Run);
                    }
                    Some(Slot::Done(_, first) | Slot::Running(_, first)) if first != req => return Ok(Begin::Mismatch),
                    Some(Slot::Done(record, _)) => return Ok(Begin::Replay(record.clone())),
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

    /// Adds `record` as the stored answer of `key` to `batch`, for a caller that commits it
    /// together with other writes (the scheduler, with the removal of its saga's entry) and
    /// then calls [`Keys::finish`] with `stored`. The batch must be for the keys' own file.
    pub fn stage(
        &self,
        key: &str,
        req: &CreateDelivery,
        record: &DeliveryRecord,
        batch: &mut Batch,
    ) -> Result<(), Error> {
        if let Some(store) = &self.store {
            let entry = StoredKey { record: record.clone(), request: req.clone(), at_us: events::now_us() };
            batch.put(store, &scoped(req, key), &entry)?;
        }
        Ok(())
    }

    /// Records how the claimed request ended: a success is remembered (durably, with a store,
    /// before this returns, unless `stored`: the caller committed it with [`Keys::stage`]), a
    /// failure forgotten. A success that cannot be stored is an error: the caller must not
    /// answer as if a retry would replay it.
    pub async fn finish(
        &self,
        key: &str,
        req: &CreateDelivery,
        outcome: Option<DeliveryRecord>,
        stored: bool,
    ) -> Result<(), Error> {
        let scoped = scoped(req, key);
        // Serialised before the lock is taken: nothing below can fail while a waiter waits.
        let mut batch = Batch::new();
        if let (false, Some(record)) = (stored, &outcome) {
            self.stage(key, req, record, &mut batch)?;
        }
        let (waiting, stored) = {
            let mut inner = self.inner.lock();
            let (map, order) = &mut *inner;
            let waiting = match map.remove(&scoped) {
                Some(Slot::Running(done, _)) => Some(done),
                _ => None,
            };
            let mut stored = None;
            if let Some(record) = outcome {
                map.insert(scoped.clone(), Slot::Done(record, req.clone()));
                order.push_back(scoped);
                while order.len() > self.capacity {
                    if let Some(old) = order.pop_front() {
                        events::limits::evicted(events::limits::Table::IdempotencyKeys, 1);
                        map.remove(&old);
                        if let Some(store) = &self.store {
                            batch.delete(store, &old);
                        }
                    }
                }
                stored = self.store.as_ref().filter(|_| !batch.is_empty()).map(|store| store.enqueue(batch));
            }
            (waiting, stored)
        };
        if let Some(done) = waiting {
            done.notify_waiters();
        }
        if let Some(stored) = stored {
            stored.await?;
        }
        Ok(())
    }
}
