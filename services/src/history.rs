//! Delivery History: every event of every delivery, kept for good in an embedded store, with
//! a query API (`GET /v1/deliveries/{id}/history`, `GET /v1/history?owner=&from_us=&to_us=`).
//!
//! The store is [redb](https://docs.rs/redb): pure Rust (nothing to build or install beside
//! the toolchain), one file, ACID transactions with an fsync per commit, and ordered keys so a
//! delivery's events and an owner's deliveries by time are range scans. The history consumes
//! the `delivery-events` log and writes each batch's events **and the log offset after it in
//! the same transaction**, so after a restart it resumes exactly where its last commit ended:
//! no gap, no duplicate. Event keys are `(delivery, seq)`, which the engine derives
//! deterministically, so even a replayed batch changes nothing.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use events::{DeliveryBatch, DeliveryId, DeliveryStage, GeoPoint};
use redb::{Database, ReadableTable, TableDefinition};
use serde::Serialize;

use crate::Error;
use crate::auth::Caller;
use crate::spans::KeptSpan;

/// `(delivery, seq)` → stage, drone, time, position.
/// A stored event: stage code, drone, time (µs), latitude, longitude.
type EventRow = (u8, u64, u64, f64, f64);
const EVENTS: TableDefinition<'static, (u64, u32), EventRow> = TableDefinition::new("events");
/// `(owner, created_us, delivery)` → ().
const BY_OWNER: TableDefinition<'static, (&str, u64, u64), ()> = TableDefinition::new("by_owner");
/// delivery → (owner, created_us).
const DELIVERIES: TableDefinition<'static, u64, (&str, u64)> = TableDefinition::new("deliveries");
/// `"next_offset"` → the delivery-events offset after the last batch stored.
const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
const NEXT_OFFSET: &str = "next_offset";
/// delivery → its trace id (hex, from the first kept span that carried one; empty until one
/// did), how many of its spans are kept, when the first kept one started (µs), and the spans,
/// one JSON object per line in the order they were kept (see [`crate::spans`]). One entry per
/// delivery: the spans of a batch for that delivery (a schedule's arrive together) are one
/// write, and a delivery's trace expires as a whole.
type SpanEntry<'a> = (&'a str, u32, u64, &'a [u8]);
const SPANS: TableDefinition<'static, u64, SpanEntry<'static>> = TableDefinition::new("delivery_spans");
/// `(first span's start_us, delivery)` → (): deliveries by the age of their trace, for retention.
const SPANS_BY_TIME: TableDefinition<'static, (u64, u64), ()> = TableDefinition::new("delivery_spans_by_time");
/// `META` key: spans kept.
const SPAN_COUNT: &str = "spans";
/// Deliveries' traces removed per purge transaction, at most.
const PURGE_BATCH: usize = 10_000;

fn store(e: impl std::fmt::Display) -> Error {
    Error::Engine(events::Error::Storage(format!("history store: {e}")))
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct HistoryEvent {
    /// Per-delivery sequence number.
    pub seq: u32,
    /// The stage reached.
    pub stage: DeliveryStage,
    /// The drone.
    pub drone_id: u64,
    /// When, µs since the epoch.
    pub ts_us: u64,
    /// Where.
    pub location: GeoPoint,
}

/// One delivery in an owner query.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct OwnedDelivery {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// When it was scheduled, µs since the epoch.
    pub created_us: u64,
    /// Its latest stage, if any event is stored yet.
    pub stage: Option<DeliveryStage>,
}

/// Owner notes waiting for the next write transaction.
type PendingOwners = Vec<(DeliveryId, String, u64)>;

/// Owner notes kept before they are written on their own (normally the next batch of events,
/// milliseconds later, takes them along).
const MAX_PENDING_OWNERS: usize = 10_000;

/// Where the history is kept.
enum Backend {
    /// redb, one file (the default).
    Embedded(Database),
    /// PostgreSQL (see [`crate::history_pg`]).
    Postgres(crate::history_pg::PgHistory),
}

/// Where Delivery History is kept: `[history]` in the pipeline's config.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryStore {
    /// redb under the data directory (the default).
    #[default]
    Embedded,
    /// PostgreSQL at `url`.
    Postgres,
}

/// `[history]`: which store, and PostgreSQL's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// `embedded` (default) or `postgres`.
    pub store: HistoryStore,
    /// PostgreSQL connection URL (`store = "postgres"`); TLS with `sslmode=require` and
    /// `sslrootcert=FILE`, as libpq reads them. Default
    /// `postgresql://postgres@127.0.0.1:5432/fleetstream`.
    pub url: String,
    /// Schema the tables live in (created if missing). Default `fleetstream`.
    pub schema: String,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            store: HistoryStore::Embedded,
            url: "postgresql://postgres@127.0.0.1:5432/fleetstream".into(),
            schema: "fleetstream".into(),
        }
    }
}

/// The history store.
pub struct History {
    backend: Backend,
    /// Who ordered the deliveries scheduled since the last write: written with the next batch,
    /// so scheduling never waits for the store's single writer.
    pending: parking_lot::Mutex<PendingOwners>,
    /// Spans kept per delivery at most, for spans other processes send.
    pub(crate) span_cap: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").finish_non_exhaustive()
    }
}

const STAGES: [DeliveryStage; 6] = [
    DeliveryStage::Created,
    DeliveryStage::Rescheduled,
    DeliveryStage::HeadedToPickup,
    DeliveryStage::InTransit,
    DeliveryStage::DeliveryComplete,
    DeliveryStage::Cancelled,
];

fn stage_code(s: DeliveryStage) -> u8 {
    STAGES.iter().position(|x| *x == s).unwrap_or(0) as u8
}

pub(crate) fn stage_of(code: u8) -> DeliveryStage {
    STAGES.get(usize::from(code)).copied().unwrap_or(DeliveryStage::Created)
}

impl History {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(store)?;
        }
        let db = Database::builder().set_cache_size(crate::store::CACHE_BYTES).create(path).map_err(store)?;
        let txn = db.begin_write().map_err(store)?;
        {
            txn.open_table(EVENTS).map_err(store)?;
            txn.open_table(BY_OWNER).map_err(store)?;
            txn.open_table(DELIVERIES).map_err(store)?;
            txn.open_table(META).map_err(store)?;
            txn.open_table(SPANS).map_err(store)?;
            txn.open_table(SPANS_BY_TIME).map_err(store)?;
        }
        txn.commit().map_err(store)?;
        Ok(Self {
            backend: Backend::Embedded(db),
            pending: parking_lot::Mutex::new(Vec::new()),
            span_cap: std::sync::atomic::AtomicU32::new(crate::spans::SpansConfig::default().max_per_delivery),
        })
    }

    /// Connects to PostgreSQL at `url` and keeps the history in `schema` (tables created and
    /// migrated as needed).
    pub fn open_postgres(url: &str, schema: &str) -> Result<Self, Error> {
        let pg = crate::history_pg::PgHistory::open(url, schema)?;
        Ok(Self {
            backend: Backend::Postgres(pg),
            pending: parking_lot::Mutex::new(Vec::new()),
            span_cap: std::sync::atomic::AtomicU32::new(crate::spans::SpansConfig::default().max_per_delivery),
        })
    }

    /// The store `cfg` names; the embedded one at `embedded_path`.
    pub fn open_configured(cfg: &HistoryConfig, embedded_path: &Path) -> Result<Self, Error> {
        match cfg.store {
            HistoryStore::Embedded => Self::open(embedded_path),
            HistoryStore::Postgres => Self::open_postgres(&cfg.url, &cfg.schema),
        }
    }

    fn take_owner_rows(&self) -> Vec<crate::history_pg::OwnerRow> {
        std::mem::take(&mut *self.pending.lock())
            .into_iter()
            .map(|(id, owner, created)| (crate::history_pg::to_i64(id), owner, crate::history_pg::to_i64(created)))
            .collect()
    }

    /// The delivery-events offset to resume from: the one after the last batch stored.
    pub fn next_offset(&self) -> Result<Option<u64>, Error> {
        let db = match &self.backend {
            Backend::Embedded(db) => db,
            Backend::Postgres(pg) => return pg.next_offset(),
        };
        let txn = db.begin_read().map_err(store)?;
        let meta = txn.open_table(META).map_err(store)?;
        Ok(meta.get(NEXT_OFFSET).map_err(store)?.map(|v| v.value()))
    }

    /// Records who ordered a delivery and when (from the scheduler). It is written with the
    /// next stored batch (the delivery's `Created` event, milliseconds later), in the same
    /// transaction, so the scheduler never waits for the store; after [`MAX_PENDING_OWNERS`]
    /// notes without a batch they are written on their own.
    pub fn note_delivery(&self, id: DeliveryId, owner: &str, created_us: u64) -> Result<(), Error> {
        let full = {
            let mut pending = self.pending.lock();
            pending.push((id, owner.to_string(), created_us));
            pending.len() >= MAX_PENDING_OWNERS
        };
        if full { self.flush() } else { Ok(()) }
    }

    /// Writes (and fsyncs) the owner notes not yet stored: at shutdown, and when the log is quiet.
    pub fn flush(&self) -> Result<(), Error> {
        if self.pending.lock().is_empty() {
            return Ok(());
        }
        let db = match &self.backend {
            Backend::Embedded(db) => db,
            Backend::Postgres(pg) => return pg.apply(self.take_owner_rows(), Vec::new(), None),
        };
        let txn = db.begin_write().map_err(store)?;
        self.write_pending(&txn)?;
        txn.commit().map_err(store)
    }

    fn write_pending(&self, txn: &redb::WriteTransaction) -> Result<(), Error> {
        let pending = std::mem::take(&mut *self.pending.lock());
        if pending.is_empty() {
            return Ok(());
        }
        let mut deliveries = txn.open_table(DELIVERIES).map_err(store)?;
        let mut by_owner = txn.open_table(BY_OWNER).map_err(store)?;
        for (id, owner, created_us) in &pending {
            deliveries.insert(*id, (owner.as_str(), *created_us)).map_err(store)?;
            by_owner.insert((owner.as_str(), *created_us, *id), ()).map_err(store)?;
        }
        Ok(())
    }

    /// Stores the batch at `offset` of the delivery-events log and moves the resume point past
    /// it, in one transaction.
    pub fn apply(&self, offset: u64, batch: &DeliveryBatch) -> Result<(), Error> {
        self.apply_many(std::slice::from_ref(&(offset, batch)))
    }

    /// Stores consecutive batches of the delivery-events log (offset, batch) and moves the
    /// resume point past the last, in one transaction: a consumer that fell behind catches up
    /// with one commit (one fsync) for everything it has, not one per batch.
    pub fn apply_many<B: std::borrow::Borrow<DeliveryBatch>>(&self, batches: &[(u64, B)]) -> Result<(), Error> {
        let Some(last) = batches.last().map(|(offset, _)| *offset) else { return Ok(()) };
        let db = match &self.backend {
            Backend::Embedded(db) => db,
            Backend::Postgres(pg) => {
                let mut rows = Vec::new();
                for (_, batch) in batches {
                    for e in batch.borrow().events().iter() {
                        rows.push((
                            crate::history_pg::to_i64(e.delivery_id.to_native()),
                            i32::try_from(e.seq.to_native()).unwrap_or(i32::MAX),
                            i16::from(stage_code(e.stage.to_stage())),
                            crate::history_pg::to_i64(e.drone_id.to_native()),
                            crate::history_pg::to_i64(e.ts_us.to_native()),
                            e.location.lat.to_native(),
                            e.location.lon.to_native(),
                        ));
                    }
                }
                return pg.apply(self.take_owner_rows(), rows, Some(last + 1));
            }
        };
        let txn = db.begin_write().map_err(store)?;
        self.write_pending(&txn)?;
        {
            let mut events = txn.open_table(EVENTS).map_err(store)?;
            for (_, batch) in batches {
                for e in batch.borrow().events().iter() {
                    let value = (
                        stage_code(e.stage.to_stage()),
                        e.drone_id.to_native(),
                        e.ts_us.to_native(),
                        e.location.lat.to_native(),
                        e.location.lon.to_native(),
                    );
                    events.insert((e.delivery_id.to_native(), e.seq.to_native()), value).map_err(store)?;
                }
            }
            txn.open_table(META).map_err(store)?.insert(NEXT_OFFSET, last + 1).map_err(store)?;
        }
        txn.commit().map_err(store)
    }

    /// Every stored event of a delivery, in order; `None` if the history knows nothing of it.
    pub fn events_of(&self, id: DeliveryId) -> Result<Option<Vec<HistoryEvent>>, Error> {
        let db = match &self.backend {
            Backend::Embedded(db) => db,
            Backend::Postgres(pg) => return pg.events_of(id),
        };
        let txn = db.begin_read().map_err(store)?;
        let table = txn.open_table(EVENTS).map_err(store)?;
        let mut out = Vec::new();
        for row in table.range((id, 0)..=(id, u32::MAX)).map_err(store)? {
            let (k, v) = row.map_err(store)?;
            let (seq, (stage, drone_id, ts_us, lat, lon)) = (k.value().1, v.value());
            out.push(HistoryEvent { seq, stage: stage_of(stage), drone_id, ts_us, location: GeoPoint::new(lat, lon) });
        }
        let known = !out.is_empty() || txn.open_table(DELIVERIES).map_err(store)?.get(id).map_err(store)?.is_some();
        Ok(known.then_some(out))
    }

    /// Who ordered `id`, if the history knows (its note may still be waiting to be written).
    pub fn owner_of(&self, id: DeliveryId) -> Result<Option<String>, Error> {
        if let Some((_, owner, _)) = self.pending.lock().iter().find(|(d, _, _)| *d == id) {
            return Ok(Some(owner.clone()));
        }
        let db = match &self.backend {
            Backend::Embedded(db) => db,
            Backend::Postgres(pg) => return pg.owner_of(id),
        };
        let txn = db.begin_read().map_err(store)?;
        let table = txn.open_table(DELIVERIES).map_err(store)?;
        Ok(table.get(id).map_err(store)?.map(|v| v.value().0.to_string()))
    }

    /// An owner's deliveries created in `from_us..to_us`, oldest first, at most `limit`,
    /// starting after `after` (the `(created_us, delivery)` of the previous page's last one).
    pub fn by_owner(
        &self,
        owner: &str,
        from_us: u64,
        to_us: u64,
        after: Option<(u64, u64)>,
        limit: usize,
    ) -> Result<Vec<OwnedDelivery>, Error> {
        let db = match &self.backend {
            Backend::Embedded(db) => db,
            Backend::Postgres(pg) => return pg.by_owner(owner, from_us, to_us, after, limit),
        };
        let txn = db.begin_read().map_err(store)?;
        let index = txn.open_table(BY_OWNER).map_err(store)?;
        let events = txn.open_table(EVENTS).map_err(store)?;
        let start = match after {
            Some((created, id)) => (owner, created, id.saturating_add(1)),
            None => (owner, from_us, 0),
        };
        let mut out = Vec::new();
        for row in index.range(start..(owner, to_us, 0)).map_err(store)? {
            let (k, _) = row.map_err(store)?;
            let (_, created_us, delivery_id) = k.value();
            let last = events.range((delivery_id, 0)..=(delivery_id, u32::MAX)).map_err(store)?.next_back();
            let stage = match last {
                Some(row) => Some(stage_of(row.map_err(store)?.1.value().0)),
                None => None,
            };
            out.push(OwnedDelivery { delivery_id, created_us, stage });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

impl History {
    /// Keeps `spans` (see [`crate::spans`]): a span without a trace gets its delivery's, one
    /// past `max_per_delivery` is left out. Answers the spans kept, with
    /// their traces. One transaction.
    pub fn keep_spans(&self, spans: Vec<KeptSpan>, max_per_delivery: u32) -> Result<Vec<KeptSpan>, Error> {
        let db = match &self.backend {
            Backend::Embedded(db) => db,
            Backend::Postgres(pg) => return pg.keep_spans(spans, max_per_delivery),
        };
        // Spans of one delivery together: one look at (and one update of) its trace and count.
        let mut by_delivery: Vec<(DeliveryId, Vec<KeptSpan>)> = Vec::new();
        let mut group_of = std::collections::HashMap::<DeliveryId, usize>::new();
        for span in spans {
            let i = *group_of.entry(span.delivery_id).or_insert_with(|| {
                by_delivery.push((span.delivery_id, Vec::new()));
                by_delivery.len() - 1
            });
            by_delivery[i].1.push(span);
        }
        let mut txn = db.begin_write().map_err(store)?;
        // A trace is a record of what happened, not part of it: spans ride on the history's
        // next durable commit (milliseconds later) rather than each batch waiting for an fsync.
        txn.set_durability(redb::Durability::Eventual);
        let mut kept = Vec::new();
        {
            let mut table = txn.open_table(SPANS).map_err(store)?;
            let mut by_time = txn.open_table(SPANS_BY_TIME).map_err(store)?;
            let mut meta = txn.open_table(META).map_err(store)?;
            let mut count = meta.get(SPAN_COUNT).map_err(store)?.map_or(0, |v| v.value());
            for (id, group) in by_delivery {
                let known = table.get(id).map_err(store)?.map(|e| {
                    let (trace, held, first, lines) = e.value();
                    (trace.to_string(), held, first, lines.to_vec())
                });
                let fresh = known.is_none();
                let (mut trace, mut held, mut first, mut lines) = known.unwrap_or_default();
                for mut span in group {
                    if held >= max_per_delivery {
                        break;
                    }
                    if trace.is_empty() {
                        trace.clone_from(&span.trace_id);
                    } else if span.trace_id.is_empty() {
                        span.trace_id.clone_from(&trace);
                    }
                    if held == 0 {
                        first = span.start_us;
                    }
                    serde_json::to_writer(&mut lines, &span).map_err(store)?;
                    lines.push(b'\n');
                    (held, count) = (held + 1, count + 1);
                    kept.push(span);
                }
                if held == 0 {
                    continue;
                }
                if fresh {
                    by_time.insert((first, id), ()).map_err(store)?;
                }
                table.insert(id, (trace.as_str(), held, first, lines.as_slice())).map_err(store)?;
            }
            meta.insert(SPAN_COUNT, count).map_err(store)?;
        }
        txn.commit().map_err(store)?;
        Ok(kept)
    }

    /// A delivery's trace id and kept spans (by start time, then arrival); `None` if none is kept.
    pub fn spans_of(&self, id: DeliveryId) -> Result<Option<(String, Vec<KeptSpan>)>, Error> {
        let db = match &self.backend {
            Backend::Embedded(db) => db,
            Backend::Postgres(pg) => return pg.spans_of(id),
        };
        let txn = db.begin_read().map_err(store)?;
        let table = txn.open_table(SPANS).map_err(store)?;
        let Some(entry) = table.get(id).map_err(store)? else { return Ok(None) };
        let (trace, _, _, lines) = entry.value();
        let mut spans = Vec::new();
        for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let mut span: KeptSpan = serde_json::from_slice(line).map_err(store)?;
            if span.trace_id.is_empty() {
                span.trace_id = trace.to_string();
            }
            spans.push(span);
        }
        spans.sort_by_key(|s| s.start_us);
        Ok(Some((trace.to_string(), spans)))
    }

    /// Removes the traces of deliveries whose first span started before `before_us`, then the
    /// oldest while more than `max_spans` spans are kept; how many spans went.
    pub fn purge_spans(&self, before_us: u64, max_spans: u64) -> Result<u64, Error> {
        let db = match &self.backend {
            Backend::Embedded(db) => db,
            Backend::Postgres(pg) => return pg.purge_spans(before_us, max_spans),
        };
        let mut removed = 0;
        loop {
            let mut txn = db.begin_write().map_err(store)?;
            txn.set_durability(redb::Durability::Eventual);
            let done = {
                let mut table = txn.open_table(SPANS).map_err(store)?;
                let mut by_time = txn.open_table(SPANS_BY_TIME).map_err(store)?;
                let mut meta = txn.open_table(META).map_err(store)?;
                let mut count = meta.get(SPAN_COUNT).map_err(store)?.map_or(0, |v| v.value());
                let mut gone = Vec::new();
                for row in by_time.iter().map_err(store)? {
                    let (first, delivery) = row.map_err(store)?.0.value();
                    if gone.len() >= PURGE_BATCH {
                        break;
                    }
                    gone.push((first, delivery));
                }
                let mut ended = true;
                let mut n = 0;
                for (first, delivery) in gone {
                    if first >= before_us && count <= max_spans {
                        break;
                    }
                    n += 1;
                    by_time.remove((first, delivery)).map_err(store)?;
                    let held = table.remove(delivery).map_err(store)?.map_or(0, |e| e.value().1);
                    count = count.saturating_sub(u64::from(held));
                    removed += u64::from(held);
                    ended = n < PURGE_BATCH;
                }
                meta.insert(SPAN_COUNT, count).map_err(store)?;
                ended
            };
            txn.commit().map_err(store)?;
            if done {
                return Ok(removed);
            }
        }
    }
}

/// `GET /v1/deliveries/{id}/history` and `GET /v1/history?owner=&from_us=&to_us=&after=&limit=`.
pub fn router(history: Arc<History>) -> Router {
    Router::new()
        .route("/v1/deliveries/{id}/history", get(delivery_history))
        .route("/v1/history", get(owner_history))
        .route("/v1/deliveries/{id}/trace", get(delivery_trace))
        .with_state(history)
}

/// The routes other processes use in split mode: `PUT /internal/v1/history/owners/{id}` (the
/// scheduler's owner notes) and `POST /internal/v1/history/spans` (every role's spans). On one
/// node nothing calls them, and the public listener does not serve them.
pub fn internal_router(history: Arc<History>) -> Router {
    Router::new()
        .route("/internal/v1/history/owners/{id}", axum::routing::put(put_owner))
        .route("/internal/v1/history/spans", axum::routing::post(crate::spans::post_spans))
        .with_state(history)
}

/// Who ordered a delivery, as the scheduler tells a history in another process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerNote {
    /// The ordering account.
    pub owner: String,
    /// When the delivery was scheduled, µs since the epoch.
    pub created_us: u64,
}

async fn put_owner(
    State(h): State<Arc<History>>,
    UrlPath(id): UrlPath<String>,
    Json(note): Json<OwnerNote>,
) -> Result<axum::http::StatusCode, Error> {
    let id: u64 = id.parse().map_err(|_| Error::BadRequest(format!("{id:?} is not a numeric id")))?;
    crate::accounts::valid_owner(&note.owner)?;
    h.note_delivery(id, &note.owner, note.created_us)?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// A delivery's whole trace: every kept span of its life, by start time (see [`crate::spans`]).
#[utoipa::path(
    get, path = "/v1/deliveries/{id}/trace", tag = "history",
    params(("id" = u64, Path, description = "delivery id")),
    responses(
        (status = 200, description = "the delivery's spans, by start time", body = crate::spans::DeliveryTrace),
        (status = 404, description = "no span of it is kept", body = crate::error::ErrorBody),
    )
)]
async fn delivery_trace(
    State(h): State<Arc<History>>,
    Caller(caller): Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<crate::spans::DeliveryTrace>, Error> {
    let id: u64 = id.parse().map_err(|_| Error::BadRequest(format!("{id:?} is not a numeric id")))?;
    let kept = tokio::task::spawn_blocking(move || {
        if !caller.is_admin() {
            match h.owner_of(id)? {
                Some(owner) => caller.check_delivery(&owner, id)?,
                None => return Ok(None),
            }
        }
        h.spans_of(id)
    })
    .await
    .map_err(store)??
    .ok_or(Error::NotFound { what: "delivery trace", id })?;
    Ok(Json(crate::spans::DeliveryTrace::of(kept.0, kept.1)))
}

/// Every event of a delivery, in order.
#[utoipa::path(
    get, path = "/v1/deliveries/{id}/history", tag = "history",
    params(("id" = u64, Path, description = "delivery id")),
    responses(
        (status = 200, description = "every event of the delivery", body = DeliveryHistory),
        (status = 404, description = "the history knows nothing of it", body = crate::error::ErrorBody),
    )
)]
async fn delivery_history(
    State(h): State<Arc<History>>,
    Caller(caller): Caller,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<DeliveryHistory>, Error> {
    let id: u64 = id.parse().map_err(|_| Error::BadRequest(format!("{id:?} is not a numeric id")))?;
    let events = tokio::task::spawn_blocking(move || {
        // A customer sees only its own owner's deliveries; one whose owner is not known yet
        // is not known to it either.
        if !caller.is_admin() {
            match h.owner_of(id)? {
                Some(owner) => caller.check_delivery(&owner, id)?,
                None => return Ok(None),
            }
        }
        h.events_of(id)
    })
    .await
    .map_err(store)??
    .ok_or(Error::NotFound { what: "delivery", id })?;
    Ok(Json(DeliveryHistory { delivery_id: id, events }))
}

/// The query of `GET /v1/history`: the parameters the document declares are these fields.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct OwnerQuery {
    /// The ordering account.
    #[param(min_length = 1, max_length = 128, pattern = r"^[!-.0-~]+$")]
    owner: String,
    /// Created at or after, µs since the epoch.
    #[serde(default)]
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    from_us: u64,
    /// Created at or before, µs since the epoch (default: no bound).
    #[serde(default = "max_time")]
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    to_us: u64,
    /// The previous page's `next` token: `created_us:delivery_id`.
    #[serde(default)]
    #[param(pattern = r"^[0-9]{1,18}:[0-9]{1,18}$")]
    after: Option<String>,
    /// Page size.
    #[serde(default = "default_limit")]
    #[param(minimum = 1, maximum = 1000)]
    limit: usize,
}

/// Times are µs since the epoch, stored as signed 64-bit integers (PostgreSQL's BIGINT).
const MAX_TIME: u64 = i64::MAX as u64;

fn max_time() -> u64 {
    MAX_TIME
}

fn default_limit() -> usize {
    100
}

/// `GET /v1/deliveries/{id}/history`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct DeliveryHistory {
    /// The delivery.
    delivery_id: DeliveryId,
    /// Its events, in order.
    events: Vec<HistoryEvent>,
}

/// `GET /v1/history`'s answer: one page.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct OwnerPage {
    /// The owner asked about.
    owner: String,
    /// Its deliveries, oldest first.
    deliveries: Vec<OwnedDelivery>,
    /// The next page's `after`, when there may be one.
    next: Option<String>,
}

/// An owner's deliveries by creation time, a page at a time.
#[utoipa::path(
    get, path = "/v1/history", tag = "history",
    params(OwnerQuery),
    responses(
        (status = 200, description = "one page", body = OwnerPage),
        (status = 403, description = "a customer key asked about another owner", body = crate::error::ErrorBody),
    )
)]
async fn owner_history(
    State(h): State<Arc<History>>,
    Caller(caller): Caller,
    Query(q): Query<OwnerQuery>,
) -> Result<Json<OwnerPage>, Error> {
    crate::accounts::valid_owner(&q.owner)?;
    caller.check_owner(&q.owner)?;
    if q.from_us > MAX_TIME || q.to_us > MAX_TIME {
        return Err(Error::BadRequest(format!("from_us and to_us must be at most {MAX_TIME}")));
    }
    if !(1..=1000).contains(&q.limit) {
        return Err(Error::BadRequest("limit must be 1 to 1000".into()));
    }
    let after = match &q.after {
        None => None,
        Some(token) => {
            let parsed = token
                .split_once(':')
                .filter(|(a, b)| [a, b].iter().all(|p| (1..=18).contains(&p.len())))
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
            Some(parsed.ok_or_else(|| Error::BadRequest(format!("after={token:?} is not a page token")))?)
        }
    };
    let limit = q.limit;
    let owner = q.owner.clone();
    let page = tokio::task::spawn_blocking(move || h.by_owner(&owner, q.from_us, q.to_us, after, limit))
        .await
        .map_err(store)??;
    let next =
        (page.len() == limit).then(|| page.last().map(|d| format!("{}:{}", d.created_us, d.delivery_id))).flatten();
    Ok(Json(OwnerPage { owner: q.owner, deliveries: page, next }))
}

#[cfg(test)]
mod tests {
    use events::wire::Buffer;
    use events::{BatchMeta, DeliveryEvent};

    use super::*;

    fn batch(events: &[(u64, u32, DeliveryStage)]) -> Result<DeliveryBatch, events::Error> {
        let evs: Vec<DeliveryEvent> = events
            .iter()
            .map(|&(delivery_id, seq, stage)| DeliveryEvent {
                delivery_id,
                seq,
                drone_id: 9,
                ts_us: 1_000 + u64::from(seq),
                location: GeoPoint::new(1.0, 2.0),
                stage,
            })
            .collect();
        DeliveryBatch::encode(BatchMeta::default(), &evs, Buffer::new())
    }

    fn span(delivery: u64, trace: &str, name: &str, start_us: u64) -> KeptSpan {
        KeptSpan {
            delivery_id: delivery,
            trace_id: trace.into(),
            span_id: format!("{start_us:016x}"),
            parent_id: String::new(),
            name: name.into(),
            service: "test".into(),
            start_us,
            duration_us: 1,
            attributes: crate::spans::Attributes::new(),
        }
    }

    /// Spans without a trace take their delivery's; ties of start time keep their arrival
    /// order; a delivery at its cap keeps no more; traces go whole, by age and by the store's
    /// cap, and a delivery whose trace went is forgotten.
    #[test]
    fn kept_spans_are_bounded_ordered_and_expire() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("fleetstream-history-spans-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let h = History::open(&dir.join("history.redb"))?;
        let trace = "0af7651916cd43dd8448eb211c80319c";
        assert_eq!(h.spans_of(1)?, None);
        let kept =
            h.keep_spans(vec![span(1, "", "early", 5), span(1, trace, "create", 10), span(1, "", "b", 20)], 3)?;
        assert_eq!(kept[1].trace_id, trace, "the first traced span names the delivery's trace");
        assert_eq!(kept[2].trace_id, trace, "later untraced spans get it");
        let kept = h.keep_spans(vec![span(1, "", "a", 20), span(2, "", "other", 30)], 3)?;
        assert_eq!(kept.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["other"], "delivery 1 is at its cap");
        let (t, spans) = h.spans_of(1)?.ok_or("no spans")?;
        assert_eq!(t, trace);
        assert!(spans.iter().all(|s| s.trace_id == trace), "filled in on reading too");
        assert_eq!(spans.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["early", "create", "b"]);
        let (_, other) = h.spans_of(2)?.ok_or("no spans of 2")?;
        assert_eq!(other[0].trace_id, "", "no trace known for it");

        // A trace expires as a whole, by its first span's start.
        assert_eq!(h.purge_spans(5, u64::MAX)?, 0, "nothing started before 5");
        assert_eq!(h.purge_spans(6, u64::MAX)?, 3, "delivery 1's trace started at 5");
        assert_eq!(h.spans_of(1)?, None);
        h.keep_spans(vec![span(3, trace, "c", 40), span(3, "", "d", 50)], 3)?;
        assert_eq!(h.purge_spans(0, 2)?, 1, "past the cap of 2 spans the oldest trace goes (delivery 2's)");
        assert_eq!(h.spans_of(2)?, None);
        assert_eq!(h.spans_of(3)?.map(|(_, s)| s.len()), Some(2));
        // A delivery with none left forgets its trace: a new span of it starts afresh.
        let kept = h.keep_spans(vec![span(1, "", "late", 60)], 3)?;
        assert_eq!(kept[0].trace_id, "");
        drop(h);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn events_and_the_resume_point_are_stored_together_and_replays_change_nothing()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("fleetstream-history-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("history.redb");
        {
            let h = History::open(&path)?;
            assert_eq!(h.next_offset()?, None);
            h.note_delivery(1, "acme", 100)?;
            h.note_delivery(2, "acme", 200)?;
            h.note_delivery(3, "other", 150)?;
            h.apply(0, &batch(&[(1, 0, DeliveryStage::Created), (2, 0, DeliveryStage::Created)])?)?;
            h.apply(1, &batch(&[(1, 1, DeliveryStage::HeadedToPickup)])?)?;
            h.apply(1, &batch(&[(1, 1, DeliveryStage::HeadedToPickup)])?)?;
        }
        let h = History::open(&path)?;
        assert_eq!(h.next_offset()?, Some(2), "resume after the last stored batch");
        let one = h.events_of(1)?.ok_or("delivery 1 unknown")?;
        assert_eq!(
            one.iter().map(|e| (e.seq, e.stage)).collect::<Vec<_>>(),
            vec![(0, DeliveryStage::Created), (1, DeliveryStage::HeadedToPickup)]
        );
        assert_eq!(h.events_of(3)?, Some(Vec::new()), "known, no events yet");
        assert_eq!(h.events_of(99)?, None);
        let page = h.by_owner("acme", 0, u64::MAX, None, 1)?;
        assert_eq!(
            page,
            vec![OwnedDelivery { delivery_id: 1, created_us: 100, stage: Some(DeliveryStage::HeadedToPickup) }]
        );
        let next = h.by_owner("acme", 0, u64::MAX, Some((100, 1)), 10)?;
        assert_eq!(next, vec![OwnedDelivery { delivery_id: 2, created_us: 200, stage: Some(DeliveryStage::Created) }]);
        assert!(h.by_owner("acme", 150, 199, None, 10)?.is_empty(), "time range");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
