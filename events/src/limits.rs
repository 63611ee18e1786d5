//! Counters of the caps on state that input can grow: every table keyed by something a client
//! chooses (drone ids, producer ids, cursor names, idempotency keys, subscriptions) is bounded,
//! and each either refuses past its cap (a typed [`crate::Error::LimitReached`]) or lets its
//! least recently used entries go. Both are counted here, per table, so an operator sees a cap
//! being hit (`fleetstream_limit_refused_total`, `fleetstream_limit_evicted_total`) before a
//! customer does.
//!
//! The counters are process-wide: each table lives once in a process (per shard for drones,
//! summed here).

use std::sync::atomic::{AtomicU64, Ordering};

/// A bounded table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Drones a shard tracks for the derive rules (`[engine] max_drones_per_shard`).
    TrackedDrones,
    /// Producers whose recent batch numbers are remembered (`[engine] max_producers`).
    Producers,
    /// Named cursors of a topic (`[engine] max_cursors`).
    Cursors,
    /// Remembered `Idempotency-Key`s (`[services] idempotency_keys`).
    IdempotencyKeys,
    /// Notification subscriptions of a delivery (`[services] max_subscriptions_per_delivery`).
    Subscriptions,
    /// Finished deliveries whose records stay in memory (`[services]
    /// finished_deliveries_held`); those let go are read from the store when asked for.
    FinishedDeliveries,
}

const TABLES: [Table; 6] = [
    Table::TrackedDrones,
    Table::Producers,
    Table::Cursors,
    Table::IdempotencyKeys,
    Table::Subscriptions,
    Table::FinishedDeliveries,
];

impl Table {
    /// The label value in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Table::TrackedDrones => "tracked_drones",
            Table::Producers => "producers",
            Table::Cursors => "cursors",
            Table::IdempotencyKeys => "idempotency_keys",
            Table::Subscriptions => "subscriptions",
            Table::FinishedDeliveries => "finished_deliveries",
        }
    }
}

static REFUSED: [AtomicU64; TABLES.len()] = [const { AtomicU64::new(0) }; TABLES.len()];
static EVICTED: [AtomicU64; TABLES.len()] = [const { AtomicU64::new(0) }; TABLES.len()];

/// Counts `n` entries refused because `table` was full.
pub fn refused(table: Table, n: u64) {
    REFUSED[table as usize].fetch_add(n, Ordering::Relaxed);
}

/// Counts `n` entries `table` let go to make room.
pub fn evicted(table: Table, n: u64) {
    EVICTED[table as usize].fetch_add(n, Ordering::Relaxed);
}

/// Entries of `table` refused and let go since the process started.
pub fn counts(table: Table) -> (u64, u64) {
    (REFUSED[table as usize].load(Ordering::Relaxed), EVICTED[table as usize].load(Ordering::Relaxed))
}

/// Appends both counters, one sample per table, in Prometheus text.
pub fn render(out: &mut String) {
    for (name, counters) in
        [("fleetstream_limit_refused_total", &REFUSED), ("fleetstream_limit_evicted_total", &EVICTED)]
    {
        crate::prom::declare(out, name, "counter");
        for table in TABLES {
            crate::prom::sample(out, name, "table", table.name(), counters[table as usize].load(Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_table_counts_apart_and_renders() {
        let (r0, e0) = counts(Table::Cursors);
        refused(Table::Cursors, 1);
        evicted(Table::Cursors, 3);
        assert_eq!(counts(Table::Cursors), (r0 + 1, e0 + 3));
        let mut out = String::new();
        render(&mut out);
        assert!(out.contains(&format!("fleetstream_limit_evicted_total{{table=\"cursors\"}} {}", e0 + 3)), "{out}");
        assert_eq!(out.matches("fleetstream_limit_refused_total{").count(), TABLES.len());
    }
}
