//! Delivery History on PostgreSQL, for when one machine is not enough: the same operations as
//! the embedded store, the same guarantee (each stored group of batches and the log offset
//! after it commit in one transaction), the same query results and pagination.
//!
//! The schema is created and migrated at open (`history_schema` records the version; an
//! advisory lock keeps two nodes from migrating at once). A dedicated thread owns the
//! connection, so callers on async runtimes never run the driver's own runtime inside theirs.
//! Events are inserted in multi-row statements with `ON CONFLICT DO NOTHING`, keyed by
//! `(delivery_id, seq)` as the engine derives them, so a replayed batch changes nothing.

use std::sync::mpsc;

use events::{DeliveryId, GeoPoint};

use crate::Error;
use crate::history::{HistoryEvent, OwnedDelivery};
use crate::spans::KeptSpan;

/// A delivery's trace and kept spans.
type KeptTrace = Option<(String, Vec<KeptSpan>)>;

fn pg_error(e: impl std::fmt::Display) -> Error {
    Error::Engine(events::Error::Storage(format!("history (postgres): {e}")))
}

/// The schema, one migration per entry; the index is the version it brings the schema to,
/// minus one.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE history_events (
        delivery_id BIGINT NOT NULL,
        seq INTEGER NOT NULL,
        stage SMALLINT NOT NULL,
        drone_id BIGINT NOT NULL,
        ts_us BIGINT NOT NULL,
        lat DOUBLE PRECISION NOT NULL,
        lon DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (delivery_id, seq)
    );
    CREATE TABLE history_deliveries (
        delivery_id BIGINT PRIMARY KEY,
        owner TEXT NOT NULL,
        created_us BIGINT NOT NULL
    );
    CREATE INDEX history_deliveries_by_owner ON history_deliveries (owner, created_us, delivery_id);
    CREATE TABLE history_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
",
    "
    CREATE TABLE history_spans (
        delivery_id BIGINT NOT NULL,
        start_us BIGINT NOT NULL,
        n BIGSERIAL NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (delivery_id, start_us, n)
    );
    CREATE INDEX history_spans_by_time ON history_spans (start_us);
    CREATE TABLE history_traces (delivery_id BIGINT PRIMARY KEY, trace_id TEXT NOT NULL);
",
];

/// One event row: delivery, seq, stage code, drone, time, lat, lon.
pub(crate) type EventRow = (i64, i32, i16, i64, i64, f64, f64);
/// One owner note: delivery, owner, created.
pub(crate) type OwnerRow = (i64, String, i64);

enum Req {
    NextOffset(mpsc::Sender<Result<Option<u64>, String>>),
    Apply {
        owners: Vec<OwnerRow>,
        events: Vec<EventRow>,
        next: Option<u64>,
        done: mpsc::Sender<Result<(), String>>,
    },
    EventsOf(DeliveryId, mpsc::Sender<Result<Option<Vec<HistoryEvent>>, String>>),
    OwnerOf(DeliveryId, mpsc::Sender<Result<Option<String>, String>>),
    ByOwner {
        owner: String,
        from_us: u64,
        to_us: u64,
        after: Option<(u64, u64)>,
        limit: usize,
        done: mpsc::Sender<Result<Vec<OwnedDelivery>, String>>,
    },
    KeepSpans {
        spans: Vec<KeptSpan>,
        cap: u32,
        done: mpsc::Sender<Result<Vec<KeptSpan>, String>>,
    },
    SpansOf(DeliveryId, mpsc::Sender<Result<KeptTrace, String>>),
    PurgeSpans {
        before_us: u64,
        max_spans: u64,
        done: mpsc::Sender<Result<u64, String>>,
    },
}

impl Req {
    /// Answers the request with `error`.
    fn fail(self, error: String) {
        match self {
            Req::NextOffset(done) => drop(done.send(Err(error))),
            Req::Apply { done, .. } => drop(done.send(Err(error))),
            Req::EventsOf(_, done) => drop(done.send(Err(error))),
            Req::OwnerOf(_, done) => drop(done.send(Err(error))),
            Req::ByOwner { done, .. } => drop(done.send(Err(error))),
            Req::KeepSpans { done, .. } => drop(done.send(Err(error))),
            Req::SpansOf(_, done) => drop(done.send(Err(error))),
            Req::PurgeSpans { done, .. } => drop(done.send(Err(error))),
        }
    }
}

/// The PostgreSQL history store.
pub(crate) struct PgHistory {
    tx: parking_lot::Mutex<mpsc::Sender<Req>>,
}

impl std::fmt::Debug for PgHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgHistory").finish_non_exhaustive()
    }
}

/// u64 ids and offsets are stored in BIGINT: values below 2^63, which ids (µs timestamps)
/// and offsets are.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl PgHistory {
    /// Connects to `url`, uses `schema` (created if missing) and applies migrations.
    pub(crate) fn open(url: &str, schema: &str) -> Result<Self, Error> {
        if !valid_schema(schema) {
            return Err(Error::BadRequest(format!("history schema {schema:?} must be letters, digits and _")));
        }
        let (tx, rx) = mpsc::channel::<Req>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (url, schema) = (url.to_string(), schema.to_string());
        std::thread::Builder::new()
            .name("history-postgres".into())
            .spawn(move || {
                let mut client = match connect(&url, &schema) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                while let Ok(req) = rx.recv() {
                    // A connection PostgreSQL dropped is made again for the next request;
                    // until it can be, requests fail (the history's consumer retries from its
                    // stored offset).
                    if client.is_closed() {
                        match connect(&url, &schema) {
                            Ok(fresh) => client = fresh,
                            Err(error) => {
                                req.fail(error);
                                continue;
                            }
                        }
                    }
                    serve(&mut client, req);
                }
            })
            .map_err(pg_error)?;
        ready_rx.recv().map_err(pg_error)?.map_err(pg_error)?;
        Ok(Self { tx: parking_lot::Mutex::new(tx) })
    }

    fn ask<T>(&self, make: impl FnOnce(mpsc::Sender<Result<T, String>>) -> Req) -> Result<T, Error> {
        let (done, rx) = mpsc::channel();
        self.tx.lock().send(make(done)).map_err(|_| pg_error("the connection thread stopped"))?;
        rx.recv().map_err(|_| pg_error("the connection thread stopped"))?.map_err(pg_error)
    }

    pub(crate) fn next_offset(&self) -> Result<Option<u64>, Error> {
        self.ask(Req::NextOffset)
    }

    /// Stores owners and events and, when given, the resume offset, in one transaction.
    pub(crate) fn apply(&self, owners: Vec<OwnerRow>, events: Vec<EventRow>, next: Option<u64>) -> Result<(), Error> {
        self.ask(|done| Req::Apply { owners, events, next, done })
    }

    pub(crate) fn events_of(&self, id: DeliveryId) -> Result<Option<Vec<HistoryEvent>>, Error> {
        self.ask(|done| Req::EventsOf(id, done))
    }

    pub(crate) fn owner_of(&self, id: DeliveryId) -> Result<Option<String>, Error> {
        self.ask(|done| Req::OwnerOf(id, done))
    }

    pub(crate) fn by_owner(
        &self,
        owner: &str,
        from_us: u64,
        to_us: u64,
        after: Option<(u64, u64)>,
        limit: usize,
    ) -> Result<Vec<OwnedDelivery>, Error> {
        let owner = owner.to_string();
        self.ask(|done| Req::ByOwner { owner, from_us, to_us, after, limit, done })
    }
}

impl PgHistory {
    pub(crate) fn keep_spans(&self, spans: Vec<KeptSpan>, cap: u32) -> Result<Vec<KeptSpan>, Error> {
        self.ask(|done| Req::KeepSpans { spans, cap, done })
    }

    pub(crate) fn spans_of(&self, id: DeliveryId) -> Result<KeptTrace, Error> {
        self.ask(|done| Req::SpansOf(id, done))
    }

    pub(crate) fn purge_spans(&self, before_us: u64, max_spans: u64) -> Result<u64, Error> {
        self.ask(|done| Req::PurgeSpans { before_us, max_spans, done })
    }
}

fn connect(url: &str, schema: &str) -> Result<postgres::Client, String> {
    connect_migrated(url, schema, "history_schema", MIGRATIONS)
}

/// How long a connection attempt may take (unless the URL sets `connect_timeout`).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Connects to PostgreSQL at `url` (a URL or `key=value` string, as libpq reads them).
///
/// TLS as libpq's `sslmode` says: `disable` (plain), `prefer` (TLS when `sslrootcert` is
/// given, else plain) or `require` (TLS, refused without `sslrootcert`). The server's
/// certificate is always verified, against the CA in `sslrootcert=FILE` and for the host
/// name connected to (stricter than libpq's `require`, like its `verify-full`). Without
/// `connect_timeout` an attempt gives up after 2 s.
pub(crate) fn pg_connect(url: &str) -> Result<postgres::Client, String> {
    let (url, root) = take_param(url, "sslrootcert");
    let mut config: postgres::Config = url.parse().map_err(|e| format!("PostgreSQL URL: {e}"))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let described = |e: postgres::Error| match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => crate::client::error_chain(&e),
    };
    match (config.get_ssl_mode(), root) {
        (postgres::config::SslMode::Disable, _) | (postgres::config::SslMode::Prefer, None) => {
            config.connect(postgres::NoTls).map_err(described)
        }
        (_, None) => {
            Err("PostgreSQL URL: sslmode=require needs sslrootcert=FILE (the CA of the server's certificate)"
                .to_string())
        }
        (_, Some(root)) => {
            let tls = crate::tls::client_tls_config(std::path::Path::new(&root)).map_err(|e| e.to_string())?;
            config.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls)).map_err(described)
        }
    }
}

/// `url` without its `name` parameter, and that parameter's value: in a URL's query
/// (`?a=1&name=v`) or among `key=value` words.
fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    let prefix = format!("{name}=");
    if let Some((base, query)) = url.split_once('?') {
        let mut value = None;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|p| match p.strip_prefix(&prefix) {
                Some(v) => {
                    value = Some(v.to_string());
                    false
                }
                None => true,
            })
            .collect();
        let url = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
        return (url, value);
    }
    if url.contains("://") {
        return (url.to_string(), None);
    }
    let mut value = None;
    let kept: Vec<&str> = url
        .split_whitespace()
        .filter(|w| match w.strip_prefix(&prefix) {
            Some(v) => {
                value = Some(v.to_string());
                false
            }
            None => true,
        })
        .collect();
    (kept.join(" "), value)
}

/// Connects to `url`, creates `schema` if missing, makes it the search path, and applies the
/// `migrations` not yet recorded in the table `version_table` (one per entry, in order). An
/// advisory lock keeps two nodes from migrating the same tables at once.
pub(crate) fn connect_migrated(
    url: &str,
    schema: &str,
    version_table: &str,
    migrations: &[&str],
) -> Result<postgres::Client, String> {
    let mut client = pg_connect(url)?;
    migrate(&mut client, schema, version_table, migrations).map_err(|e| match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    })?;
    Ok(client)
}

fn migrate(
    client: &mut postgres::Client,
    schema: &str,
    version_table: &str,
    migrations: &[&str],
) -> Result<(), postgres::Error> {
    client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}"))?;
    let mut txn = client.transaction()?;
    txn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&format!("fleetstream_{version_table}")])?;
    txn.batch_execute(&format!("CREATE TABLE IF NOT EXISTS {version_table} (version INTEGER NOT NULL)"))?;
    let version: i32 = match txn.query_opt(&format!("SELECT version FROM {version_table}"), &[])? {
        Some(row) => row.get(0),
        None => {
            txn.execute(&format!("INSERT INTO {version_table} (version) VALUES (0)"), &[])?;
            0
        }
    };
    for (i, migration) in migrations.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
        txn.batch_execute(migration)?;
        let to = i32::try_from(i + 1).unwrap_or(i32::MAX);
        txn.execute(&format!("UPDATE {version_table} SET version = $1"), &[&to])?;
        tracing::info!(schema, table = version_table, version = to, "schema migrated");
    }
    txn.commit()
}

/// Whether `schema` is a plain identifier (letters, digits and `_`), safe to put in SQL.
pub(crate) fn valid_schema(schema: &str) -> bool {
    !schema.is_empty() && schema.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Rows per multi-row INSERT (7 parameters each, well under the protocol's 65,535).
const ROWS_PER_INSERT: usize = 1000;

fn serve(client: &mut postgres::Client, req: Req) {
    match req {
        Req::NextOffset(done) => {
            let r = client
                .query_opt("SELECT value FROM history_meta WHERE key = 'next_offset'", &[])
                .map(|row| row.map(|r| to_u64(r.get(0))));
            let _ = done.send(r.map_err(|e| e.to_string()));
        }
        Req::Apply { owners, events, next, done } => {
            let _ = done.send(apply(client, &owners, &events, next).map_err(|e| e.to_string()));
        }
        Req::EventsOf(id, done) => {
            let _ = done.send(events_of(client, id).map_err(|e| e.to_string()));
        }
        Req::OwnerOf(id, done) => {
            let row = client.query_opt("SELECT owner FROM history_deliveries WHERE delivery_id = $1", &[&to_i64(id)]);
            let _ = done.send(row.map(|r| r.map(|r| r.get(0))).map_err(|e| e.to_string()));
        }
        Req::ByOwner { owner, from_us, to_us, after, limit, done } => {
            let _ = done.send(by_owner(client, &owner, from_us, to_us, after, limit).map_err(|e| e.to_string()));
        }
        Req::KeepSpans { spans, cap, done } => {
            let _ = done.send(keep_spans(client, spans, cap));
        }
        Req::SpansOf(id, done) => {
            let _ = done.send(spans_of(client, id));
        }
        Req::PurgeSpans { before_us, max_spans, done } => {
            let _ = done.send(purge_spans(client, before_us, max_spans).map_err(|e| e.to_string()));
        }
    }
}

fn keep_spans(client: &mut postgres::Client, spans: Vec<KeptSpan>, cap: u32) -> Result<Vec<KeptSpan>, String> {
    let s = |e: postgres::Error| e.to_string();
    let mut txn = client.transaction().map_err(s)?;
    let mut kept = Vec::with_capacity(spans.len());
    for mut span in spans {
        let id = to_i64(span.delivery_id);
        if span.trace_id.is_empty() {
            let known =
                txn.query_opt("SELECT trace_id FROM history_traces WHERE delivery_id = $1", &[&id]).map_err(s)?;
            if let Some(row) = known {
                span.trace_id = row.get(0);
            }
        } else {
            txn.execute(
                "INSERT INTO history_traces (delivery_id, trace_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&id, &span.trace_id],
            )
            .map_err(s)?;
        }
        let body = serde_json::to_string(&span).map_err(|e| e.to_string())?;
        let inserted = txn
            .execute(
                "INSERT INTO history_spans (delivery_id, start_us, body)
                 SELECT $1, $2, $3
                 WHERE (SELECT count(*) FROM history_spans WHERE delivery_id = $1) < $4",
                &[&id, &to_i64(span.start_us), &body, &i64::from(cap)],
            )
            .map_err(s)?;
        if inserted == 1 {
            kept.push(span);
        }
    }
    txn.commit().map_err(s)?;
    Ok(kept)
}

fn spans_of(client: &mut postgres::Client, id: DeliveryId) -> Result<KeptTrace, String> {
    let s = |e: postgres::Error| e.to_string();
    let rows = client
        .query("SELECT body FROM history_spans WHERE delivery_id = $1 ORDER BY start_us, n", &[&to_i64(id)])
        .map_err(s)?;
    if rows.is_empty() {
        return Ok(None);
    }
    let trace: String = client
        .query_opt("SELECT trace_id FROM history_traces WHERE delivery_id = $1", &[&to_i64(id)])
        .map_err(s)?
        .map(|r| r.get(0))
        .unwrap_or_default();
    let mut spans = Vec::with_capacity(rows.len());
    for row in rows {
        let mut span: KeptSpan = serde_json::from_str(row.get(0)).map_err(|e| e.to_string())?;
        if span.trace_id.is_empty() {
            span.trace_id.clone_from(&trace);
        }
        spans.push(span);
    }
    Ok(Some((trace, spans)))
}

fn purge_spans(client: &mut postgres::Client, before_us: u64, max_spans: u64) -> Result<u64, postgres::Error> {
    let mut txn = client.transaction()?;
    let mut removed = txn.execute("DELETE FROM history_spans WHERE start_us < $1", &[&to_i64(before_us)])?;
    removed += txn.execute(
        "DELETE FROM history_spans WHERE start_us <
            (SELECT start_us FROM history_spans ORDER BY start_us DESC OFFSET $1 LIMIT 1)",
        &[&to_i64(max_spans)],
    )?;
    if removed > 0 {
        txn.execute(
            "DELETE FROM history_traces t WHERE NOT EXISTS
                (SELECT 1 FROM history_spans s WHERE s.delivery_id = t.delivery_id)",
            &[],
        )?;
    }
    txn.commit()?;
    Ok(removed)
}

fn apply(
    client: &mut postgres::Client,
    owners: &[OwnerRow],
    events: &[EventRow],
    next: Option<u64>,
) -> Result<(), postgres::Error> {
    let mut txn = client.transaction()?;
    for chunk in owners.chunks(ROWS_PER_INSERT) {
        let mut sql = String::from("INSERT INTO history_deliveries (delivery_id, owner, created_us) VALUES ");
        let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = Vec::with_capacity(chunk.len() * 3);
        for (i, (id, owner, created)) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("(${},${},${})", i * 3 + 1, i * 3 + 2, i * 3 + 3));
            params.extend([id as &(dyn postgres::types::ToSql + Sync), owner, created]);
        }
        sql.push_str(" ON CONFLICT (delivery_id) DO NOTHING");
        txn.execute(sql.as_str(), &params)?;
    }
    for chunk in events.chunks(ROWS_PER_INSERT) {
        let mut sql =
            String::from("INSERT INTO history_events (delivery_id, seq, stage, drone_id, ts_us, lat, lon) VALUES ");
        let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = Vec::with_capacity(chunk.len() * 7);
        for (i, (id, seq, stage, drone, ts, lat, lon)) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            let b = i * 7;
            sql.push_str(&format!("(${},${},${},${},${},${},${})", b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7));
            params.extend([id as &(dyn postgres::types::ToSql + Sync), seq, stage, drone, ts, lat, lon]);
        }
        sql.push_str(" ON CONFLICT (delivery_id, seq) DO NOTHING");
        txn.execute(sql.as_str(), &params)?;
    }
    if let Some(next) = next {
        txn.execute(
            "INSERT INTO history_meta (key, value) VALUES ('next_offset', $1)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&to_i64(next)],
        )?;
    }
    txn.commit()
}

fn events_of(client: &mut postgres::Client, id: DeliveryId) -> Result<Option<Vec<HistoryEvent>>, postgres::Error> {
    let rows = client.query(
        "SELECT seq, stage, drone_id, ts_us, lat, lon FROM history_events WHERE delivery_id = $1 ORDER BY seq",
        &[&to_i64(id)],
    )?;
    let out: Vec<HistoryEvent> = rows
        .iter()
        .map(|r| HistoryEvent {
            seq: u32::try_from(r.get::<_, i32>(0)).unwrap_or(0),
            stage: crate::history::stage_of(u8::try_from(r.get::<_, i16>(1)).unwrap_or(0)),
            drone_id: to_u64(r.get(2)),
            ts_us: to_u64(r.get(3)),
            location: GeoPoint::new(r.get(4), r.get(5)),
        })
        .collect();
    if !out.is_empty() {
        return Ok(Some(out));
    }
    let known = client.query_opt("SELECT 1 FROM history_deliveries WHERE delivery_id = $1", &[&to_i64(id)])?;
    Ok(known.map(|_| out))
}

fn by_owner(
    client: &mut postgres::Client,
    owner: &str,
    from_us: u64,
    to_us: u64,
    after: Option<(u64, u64)>,
    limit: usize,
) -> Result<Vec<OwnedDelivery>, postgres::Error> {
    // The page starts after (created, id) when given, else at from_us, and ends before to_us,
    // as the embedded store's range does.
    let (start_created, start_id) = match after {
        Some((created, id)) => (to_i64(created), to_i64(id.saturating_add(1))),
        None => (to_i64(from_us), 0),
    };
    let rows = client.query(
        "SELECT d.delivery_id, d.created_us,
                (SELECT e.stage FROM history_events e WHERE e.delivery_id = d.delivery_id ORDER BY e.seq DESC LIMIT 1)
         FROM history_deliveries d
         WHERE d.owner = $1 AND (d.created_us, d.delivery_id) >= ($2, $3) AND d.created_us < $4
         ORDER BY d.created_us, d.delivery_id
         LIMIT $5",
        &[&owner, &start_created, &start_id, &to_i64(to_us), &i64::try_from(limit).unwrap_or(i64::MAX)],
    )?;
    Ok(rows
        .iter()
        .map(|r| OwnedDelivery {
            delivery_id: to_u64(r.get(0)),
            created_us: to_u64(r.get(1)),
            stage: r.get::<_, Option<i16>>(2).map(|s| crate::history::stage_of(u8::try_from(s).unwrap_or(0))),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_certificate_parameter_is_taken_out_of_either_form() {
        assert_eq!(
            take_param("postgresql://u@h:5432/db?sslmode=require&sslrootcert=/ca.pem&connect_timeout=3", "sslrootcert"),
            ("postgresql://u@h:5432/db?sslmode=require&connect_timeout=3".to_string(), Some("/ca.pem".to_string()))
        );
        assert_eq!(
            take_param("postgresql://u@h/db?sslrootcert=/ca.pem", "sslrootcert"),
            ("postgresql://u@h/db".to_string(), Some("/ca.pem".to_string()))
        );
        assert_eq!(
            take_param("host=h sslmode=require sslrootcert=/ca.pem user=u", "sslrootcert"),
            ("host=h sslmode=require user=u".to_string(), Some("/ca.pem".to_string()))
        );
        assert_eq!(take_param("postgresql://u@h/db", "sslrootcert"), ("postgresql://u@h/db".to_string(), None));
    }

    /// Against the local server: `sslmode=require` with its CA is a TLS session (as
    /// `pg_stat_ssl` sees it), without `sslrootcert` it is refused before connecting, and with
    /// a CA that did not sign the server's certificate the handshake fails. The server's CA is
    /// `FLEETSTREAM_PG_TLS_CA` (default: Debian's snakeoil certificate, which a stock
    /// PostgreSQL package serves); a server without TLS prints SKIP.
    #[test]
    fn postgres_over_tls_verifies_the_server() {
        let base =
            std::env::var("FLEETSTREAM_PG_URL").unwrap_or_else(|_| "postgresql://postgres@localhost:5432/test".into());
        let ca =
            std::env::var("FLEETSTREAM_PG_TLS_CA").unwrap_or_else(|_| "/etc/ssl/certs/ssl-cert-snakeoil.pem".into());
        let on = pg_connect(&base)
            .and_then(|mut c| c.query_one("SHOW ssl", &[]).map_err(|e| e.to_string()))
            .map(|row| row.get::<_, String>(0) == "on");
        if on != Ok(true) || !std::path::Path::new(&ca).exists() {
            println!("SKIP postgres_over_tls_verifies_the_server: no TLS on {base} ({on:?}) or no CA at {ca}");
            return;
        }
        let sep = if base.contains('?') { '&' } else { '?' };
        let mut client = pg_connect(&format!("{base}{sep}sslmode=require&sslrootcert={ca}")).expect("a TLS session"); // ok: the server says it serves TLS
        let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).expect("its state"); // ok: test code, a live session's own row
        assert!(row.get::<_, bool>(0), "the session is encrypted");
        let refused = pg_connect(&format!("{base}{sep}sslmode=require")).err().unwrap_or_default();
        assert!(refused.contains("sslrootcert"), "{refused}");
        let dir = std::env::temp_dir().join(format!("fleetstream-pgtls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::tls::init_ca(&dir, &[], crate::tls::Validity::default()).expect("a CA"); // ok: a temp dir of this test
        let other = dir.join("ca.pem").display().to_string();
        assert!(pg_connect(&format!("{base}{sep}sslmode=require&sslrootcert={other}")).is_err(), "an unknown CA");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
