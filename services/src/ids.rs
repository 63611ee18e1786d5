//! Delivery ids: unique across restarts and across scheduler nodes.
//!
//! A scheduler takes ids from blocks it reserves in a shared counter ([`IdBlocks`]): one node's
//! store for a single node ([`StoreIdBlocks`]), a JetStream key-value entry updated by
//! compare-and-swap when several nodes share the work (in the pipeline crate). A reservation is
//! durable before any id of the block is handed out, so a restart never hands out an id again;
//! the unused rest of a block is skipped. The counter starts at the current time in
//! microseconds (above every id an earlier version minted from the clock) and stays below
//! 2^53, so ids survive a trip through a JavaScript number. Ids grow with time on each node,
//! and blocks of different nodes interleave.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use events::DeliveryId;

use crate::Error;
use crate::store::{Batch, Store};

/// Ids a scheduler reserves at a time: one durable write serves this many schedules.
pub const BLOCK: u64 = 1024;

/// A shared counter of delivery ids.
pub trait IdBlocks: Send + Sync + std::fmt::Debug + 'static {
    /// Reserves `n` ids no one else gets, durably; returns the first.
    fn reserve(&self, n: u64) -> Pin<Box<dyn Future<Output = Result<DeliveryId, Error>> + Send + '_>>;
}

/// Where a fresh counter starts: the clock in µs, so ids stay above those minted from it before.
pub fn counter_start() -> u64 {
    events::now_us()
}

/// The counter in a node's own store (one node, or tests).
#[derive(Debug)]
pub struct StoreIdBlocks {
    store: Store,
    lock: tokio::sync::Mutex<()>,
}

const NEXT_KEY: &str = "next";

impl StoreIdBlocks {
    /// The counter under `store`'s namespace.
    pub fn new(store: Store) -> Arc<Self> {
        Arc::new(Self { store, lock: tokio::sync::Mutex::new(()) })
    }
}

impl IdBlocks for StoreIdBlocks {
    fn reserve(&self, n: u64) -> Pin<Box<dyn Future<Output = Result<DeliveryId, Error>> + Send + '_>> {
        Box::pin(async move {
            let _one_at_a_time = self.lock.lock().await;
            let first = self.store.get::<u64>(NEXT_KEY)?.unwrap_or_else(counter_start);
            let mut batch = Batch::new();
            batch.put(&self.store, NEXT_KEY, &(first + n))?;
            self.store.enqueue(batch).await?;
            Ok(first)
        })
    }
}

/// A scheduler's current block.
#[derive(Debug)]
pub struct Allocator {
    blocks: Arc<dyn IdBlocks>,
    current: tokio::sync::Mutex<(u64, u64)>,
}

impl Allocator {
    /// Hands out ids from blocks of `blocks`.
    pub fn new(blocks: Arc<dyn IdBlocks>) -> Self {
        Self { blocks, current: tokio::sync::Mutex::new((0, 0)) }
    }

    /// The next id (reserving a block when the current one is used up).
    pub async fn next(&self) -> Result<DeliveryId, Error> {
        let mut current = self.current.lock().await;
        if current.0 == current.1 {
            let first = self.blocks.reserve(BLOCK).await?;
            *current = (first, first + BLOCK);
        }
        let id = current.0;
        current.0 += 1;
        Ok(id)
    }
}

/// An in-memory counter from the clock (tests and throwaway services).
#[derive(Debug)]
pub struct ClockIdBlocks(std::sync::atomic::AtomicU64);

impl ClockIdBlocks {
    /// A counter starting now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self(std::sync::atomic::AtomicU64::new(counter_start())))
    }
}

impl IdBlocks for ClockIdBlocks {
    fn reserve(&self, n: u64) -> Pin<Box<dyn Future<Output = Result<DeliveryId, Error>> + Send + '_>> {
        Box::pin(std::future::ready(Ok(self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_schedulers_on_one_counter_and_a_restart_never_share_an_id() -> Result<(), Error> {
        let dir = std::env::temp_dir().join(format!("fleetstream-ids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("ids.redb");
        let mut seen = std::collections::HashSet::new();
        {
            let store = Store::open(&path)?;
            let blocks: Arc<dyn IdBlocks> = StoreIdBlocks::new(store.namespace("ids"));
            let (a, b) = (Arc::new(Allocator::new(blocks.clone())), Arc::new(Allocator::new(blocks)));
            let tasks: Vec<_> = (0..4000)
                .map(|i| {
                    let alloc = if i % 2 == 0 { a.clone() } else { b.clone() };
                    tokio::spawn(async move { alloc.next().await })
                })
                .collect();
            for t in tasks {
                let id = t.await.map_err(|e| Error::BadRequest(e.to_string()))??;
                assert!(seen.insert(id), "id {id} handed out twice");
                assert!(id < 1 << 53, "ids fit a JavaScript number");
            }
        }
        // Reopened, as after a crash: the counter goes on past every block handed out.
        let store = Store::open(&path)?;
        let again = Allocator::new(StoreIdBlocks::new(store.namespace("ids")));
        let next = again.next().await?;
        assert!(seen.iter().all(|&id| id < next), "a restart starts past every earlier block");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
