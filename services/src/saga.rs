//! The scheduler's journal of operations in progress, so that a crash between two steps of a
//! schedule, reschedule or cancel leaves nothing half done for good.
//!
//! Each operation writes an entry before its first step that changes anything, updates it once
//! the schedule has a drone (the entry then names everything an undo needs), and removes it in
//! the same commit as its outcome (the `Idempotency-Key`'s stored answer). At start the
//! scheduler takes every entry left behind and carries it to an end
//! ([`crate::scheduler::Scheduler::start_recovery`]). An operation that fails part-way while
//! the node runs (an undo the engine refused, a step after which a dependency went down) keeps
//! its entry and is tried again every few seconds
//! ([`crate::scheduler::Scheduler::retry_left`]: a schedule undone, the others carried forward),
//! and at the next start if the node stops first:
//!
//! | entry left | what happened | recovery |
//! |---|---|---|
//! | schedule, `started` (only where assignments are stored) | nothing, or an assignment | undone (deleted) |
//! | schedule, `assigned` with the record and the engine's delivery | all but the answer | completed: the mission is queued (again) and the key answers with the delivery |
//! | schedule, `assigned`, anything less | some steps | undone: the engine's delivery cancelled, record, assignment and package deleted |
//! | reschedule | some of engine, mission, record | carried forward (each step is idempotent) |
//! | cancel | the engine's cancel, perhaps | carried forward: cancel (again) and the drone told |
//!
//! An undone schedule's key answers as a failed request does: a retry runs afresh. A crash
//! hook for tests (`crash_point`) stops the process at a named step, as `kill -9` would.

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::state::CreateDelivery;
use crate::store::{Batch, Store, id_key};
use events::{DeliveryId, DroneId, GeoPoint};

/// How far a schedule got, as its entry says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ScheduleStep {
    /// Nothing is known to be done; a package or an assignment may exist.
    Started,
    /// A drone is assigned; the record, the engine's delivery and the mission may exist.
    Assigned {
        /// The drone.
        drone_id: DroneId,
    },
}

/// An operation in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub(crate) enum Saga {
    /// `POST /v1/deliveries`.
    Schedule {
        /// The new delivery.
        delivery_id: DeliveryId,
        /// Its `Idempotency-Key`, if it came with one.
        key: Option<String>,
        /// The request.
        request: CreateDelivery,
        /// How far it got.
        step: ScheduleStep,
        /// When it started, µs.
        at_us: u64,
    },
    /// `PATCH /v1/deliveries/{id}`.
    Reschedule {
        /// The delivery.
        delivery_id: DeliveryId,
        /// Its drone.
        drone_id: DroneId,
        /// The new pickup.
        pickup: GeoPoint,
        /// The new drop-off.
        dropoff: GeoPoint,
        /// When it started, µs.
        at_us: u64,
    },
    /// `DELETE /v1/deliveries/{id}`.
    Cancel {
        /// The delivery.
        delivery_id: DeliveryId,
        /// Its drone.
        drone_id: DroneId,
        /// When it started, µs.
        at_us: u64,
    },
}

impl Saga {
    fn key(&self) -> String {
        match self {
            Saga::Schedule { delivery_id, .. } => format!("schedule/{}", id_key(*delivery_id)),
            Saga::Reschedule { delivery_id, .. } => format!("reschedule/{}", id_key(*delivery_id)),
            Saga::Cancel { delivery_id, .. } => format!("cancel/{}", id_key(*delivery_id)),
        }
    }

    /// When it started.
    pub(crate) fn at_us(&self) -> u64 {
        match self {
            Saga::Schedule { at_us, .. } | Saga::Reschedule { at_us, .. } | Saga::Cancel { at_us, .. } => *at_us,
        }
    }
}

/// The journal: entries in a store, or nowhere (tests and throwaway runs, where a crash loses
/// everything anyway).
#[derive(Debug, Clone, Default)]
pub(crate) struct Journal {
    store: Option<Store>,
}

impl Journal {
    /// Entries kept in `store`.
    pub(crate) fn in_store(store: Store) -> Self {
        Self { store: Some(store) }
    }

    /// The store the entries are in (the outcome of an operation commits with its entry's
    /// removal, so it must be in the same file).
    pub(crate) fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// Writes `saga`'s entry (replacing its earlier one), durably.
    pub(crate) async fn write(&self, saga: &Saga) -> Result<(), Error> {
        if let Some(store) = &self.store {
            store.put(&saga.key(), saga).await?;
        }
        Ok(())
    }

    /// Adds the removal of `saga`'s entry to `batch`.
    pub(crate) fn remove_in(&self, saga: &Saga, batch: &mut Batch) {
        if let Some(store) = &self.store {
            batch.delete(store, &saga.key());
        }
    }

    /// Removes `saga`'s entry, durably.
    pub(crate) async fn remove(&self, saga: &Saga) -> Result<(), Error> {
        if let Some(store) = &self.store {
            store.delete(&saga.key()).await?;
        }
        Ok(())
    }

    /// Every entry left, oldest first.
    pub(crate) fn pending(&self) -> Result<Vec<Saga>, Error> {
        let Some(store) = &self.store else { return Ok(Vec::new()) };
        let mut all: Vec<Saga> = store.all::<Saga>()?.into_iter().map(|(_, s)| s).collect();
        all.sort_by_key(Saga::at_us);
        Ok(all)
    }
}

/// The environment variable naming the step at which `crash_point` stops the process.
pub const CRASH_AT_ENV: &str = "FLEETSTREAM_TEST_CRASH_AT";

/// The steps `crash_point` knows, in the order an operation passes them.
pub const CRASH_POINTS: &[&str] = &[
    "schedule-started",
    "schedule-assigned",
    "schedule-created",
    "schedule-mission",
    "reschedule-started",
    "reschedule-engine",
    "cancel-started",
    "cancel-engine",
];

/// A test hook: when [`CRASH_AT_ENV`] names `step`, the process ends here at once, with no
/// cleanup, as `kill -9` would end it between two steps.
pub(crate) fn crash_point(step: &'static str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    debug_assert!(CRASH_POINTS.contains(&step), "{step} is not a listed crash point");
    if AT.get_or_init(|| std::env::var(CRASH_AT_ENV).ok()).as_deref() == Some(step) {
        eprintln!("{CRASH_AT_ENV}={step}: stopping the process here");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CreateDelivery {
        CreateDelivery {
            owner: "customer-1".into(),
            pickup: GeoPoint::new(47.6, -122.3),
            dropoff: GeoPoint::new(47.7, -122.2),
            package: crate::state::Package { size: crate::state::PackageSize::Small, weight_kg: 1.0, tag: None },
        }
    }

    #[tokio::test]
    async fn entries_are_replaced_by_step_listed_oldest_first_and_removed() -> Result<(), Error> {
        let journal = Journal::in_store(Store::in_memory()?);
        let mut first = Saga::Schedule {
            delivery_id: 7,
            key: Some("k".into()),
            request: request(),
            step: ScheduleStep::Started,
            at_us: 20,
        };
        let second = Saga::Cancel { delivery_id: 7, drone_id: 3, at_us: 10 };
        journal.write(&first).await?;
        journal.write(&second).await?;
        if let Saga::Schedule { step, .. } = &mut first {
            *step = ScheduleStep::Assigned { drone_id: 3 };
        }
        journal.write(&first).await?;
        assert_eq!(journal.pending()?, vec![second.clone(), first.clone()]);
        let mut batch = Batch::new();
        journal.remove_in(&first, &mut batch);
        let store = journal.store().ok_or_else(|| Error::BadRequest("the journal has a store".into()))?;
        store.enqueue(batch).await?;
        journal.remove(&second).await?;
        assert!(journal.pending()?.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn without_a_store_nothing_is_kept() -> Result<(), Error> {
        let journal = Journal::default();
        journal.write(&Saga::Cancel { delivery_id: 1, drone_id: 1, at_us: 1 }).await?;
        assert!(journal.pending()?.is_empty());
        Ok(())
    }
}
