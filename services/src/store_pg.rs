//! The services' store on PostgreSQL, shared by every node of a deployment on JetStream
//! (`[services] store = "postgres"`): the same keys, values and guarantees as the embedded
//! file, in one table, so every node sees the same accounts, packages, delivery records,
//! registry, idempotency keys and subscriptions.
//!
//! One thread owns the writing connection and commits each group of writes in one
//! transaction (group commit, as the embedded writer does); a few threads with connections of
//! their own answer reads, so a read never waits behind a commit. Keys are stored as bytes
//! (they may hold any character, NUL included, which PostgreSQL's text refuses) and so sort
//! bytewise, and a namespace is a key range as in redb.
//!
//! A write may carry a version ([`crate::store::Batch::put_versioned`]): it lands only over a
//! row whose version is not newer. Read models on several nodes apply the same log, each at
//! its own pace; with versions a node that is behind never overwrites what a node ahead of it
//! stored.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::Error;

/// The schema of the services' table, one migration per entry.
const MIGRATIONS: &[&str] = &["
    CREATE TABLE service_kv (
        key BYTEA PRIMARY KEY,
        value BYTEA NOT NULL,
        version BIGINT
    );
"];

/// Connections answering reads.
const READERS: usize = 3;

fn pg_error(e: impl std::fmt::Display) -> Error {
    Error::Engine(events::Error::Storage(format!("service store (postgres): {e}")))
}

/// A driver error with the server's own words when it has them ("db error" alone says nothing).
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// One write of a group, as the store queues it.
pub(crate) enum PgWrite<'a> {
    Put(&'a str, &'a [u8], Option<i64>),
    Delete(&'a str),
}

type Reply<T> = std::sync::mpsc::Sender<Result<T, String>>;

enum Read {
    Ping(Reply<()>),
    Get(String, Reply<Option<Vec<u8>>>),
    Many(Vec<String>, Reply<Vec<Option<Vec<u8>>>>),
    Range(String, Reply<Vec<(String, Vec<u8>)>>),
}

/// The connections of one shared store.
pub(crate) struct PgKv {
    reads: flume::Sender<Read>,
    /// Where the writer connects (it is opened by the store's writer thread).
    url: String,
    schema: String,
}

impl std::fmt::Debug for PgKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgKv").field("schema", &self.schema).finish_non_exhaustive()
    }
}

impl PgKv {
    /// Connects, migrates the schema and starts the readers.
    pub(crate) fn open(url: &str, schema: &str) -> Result<Self, Error> {
        if !crate::history_pg::valid_schema(schema) {
            return Err(Error::BadRequest(format!("services schema {schema:?} must be letters, digits and _")));
        }
        let (url, schema) = (url.to_string(), schema.to_string());
        {
            // The driver runs a runtime of its own: connections are made on threads of ours.
            let (url, schema) = (url.clone(), schema.clone());
            std::thread::spawn(move || {
                crate::history_pg::connect_migrated(&url, &schema, "services_schema", MIGRATIONS).map(drop)
            })
            .join()
            .map_err(|_| pg_error("the migration thread panicked"))?
            .map_err(pg_error)?;
        }
        let (reads, rx) = flume::bounded::<Read>(1024);
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), Error>>();
        for i in 0..READERS {
            let (rx, ready_tx, url, schema) = (rx.clone(), ready_tx.clone(), url.clone(), schema.clone());
            std::thread::Builder::new()
                .name(format!("store-pg-read-{i}"))
                .spawn(move || {
                    let mut client = match Self::connect(&url, &schema) {
                        Ok(client) => client,
                        Err(error) => {
                            let _ = ready_tx.send(Err(error));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    while let Ok(read) = rx.recv() {
                        // A connection PostgreSQL dropped (a restart, a network cut) is made
                        // again for the next read; until it can be, reads fail with the reason.
                        if client.is_closed() {
                            match Self::connect(&url, &schema) {
                                Ok(fresh) => client = fresh,
                                Err(error) => {
                                    read.fail(error.to_string());
                                    continue;
                                }
                            }
                        }
                        serve_read(&mut client, read);
                    }
                })
                .map_err(pg_error)?;
        }
        for _ in 0..READERS {
            ready.recv().map_err(|_| pg_error("a reader thread stopped"))??;
        }
        Ok(Self { reads, url, schema })
    }

    fn connect(url: &str, schema: &str) -> Result<postgres::Client, Error> {
        let mut client = crate::history_pg::pg_connect(url).map_err(pg_error)?;
        client.batch_execute(&format!("SET search_path TO {schema}")).map_err(pg_error)?;
        Ok(client)
    }

    /// Whether PostgreSQL answers a reader now (`SELECT 1`), for readiness.
    pub(crate) fn ping(&self) -> Result<(), Error> {
        self.block(|| self.ask(Read::Ping))
    }

    /// A connection for the store's writer thread (to be called on that thread); while it
    /// cannot reach PostgreSQL it says why in `unavailable`.
    pub(crate) fn writer(&self, unavailable: Arc<Mutex<Option<String>>>) -> Result<PgWriter, Error> {
        let (client, put, delete) = Self::prepared(&self.url, &self.schema)?;
        Ok(PgWriter { client, put, delete, url: self.url.clone(), schema: self.schema.clone(), unavailable })
    }

    fn prepared(
        url: &str,
        schema: &str,
    ) -> Result<(postgres::Client, postgres::Statement, postgres::Statement), Error> {
        let mut client = Self::connect(url, schema)?;
        let put = client
            .prepare(
                "INSERT INTO service_kv (key, value, version) VALUES ($1, $2, $3)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version
                 WHERE service_kv.version IS NULL OR EXCLUDED.version IS NULL
                    OR service_kv.version <= EXCLUDED.version
                 RETURNING (xmax = 0)",
            )
            .map_err(pg_error)?;
        let delete = client.prepare("DELETE FROM service_kv WHERE key = $1").map_err(pg_error)?;
        Ok((client, put, delete))
    }

    fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Read) -> Result<T, Error> {
        let (done, rx) = std::sync::mpsc::channel();
        self.reads.send(make(done)).map_err(|_| pg_error("the readers stopped"))?;
        rx.recv().map_err(|_| pg_error("the readers stopped"))?.map_err(pg_error)
    }

    /// The value under `key`.
    pub(crate) fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let key = key.to_string();
        self.block(|| self.ask(|done| Read::Get(key, done)))
    }

    /// The values under `keys`, in their order.
    pub(crate) fn get_many(&self, keys: Vec<String>) -> Result<Vec<Option<Vec<u8>>>, Error> {
        self.block(|| self.ask(|done| Read::Many(keys, done)))
    }

    /// Every key starting with `prefix`, in key order.
    pub(crate) fn range(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let prefix = prefix.to_string();
        self.block(|| self.ask(|done| Read::Range(prefix, done)))
    }

    /// Runs a blocking read, telling a multi-threaded runtime first so its other tasks move on.
    fn block<T>(&self, read: impl FnOnce() -> T) -> T {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(read)
            }
            _ => read(),
        }
    }
}

/// The writer thread's connection and its prepared statements.
pub(crate) struct PgWriter {
    client: postgres::Client,
    put: postgres::Statement,
    delete: postgres::Statement,
    /// Where to connect again.
    url: String,
    schema: String,
    /// Why PostgreSQL cannot be reached while the writer is reconnecting.
    unavailable: Arc<Mutex<Option<String>>>,
}

impl PgWriter {
    /// Applies every op's writes in one transaction; one flag per write (put: the key was new
    /// (a versioned put over a newer row: `false`, and nothing written); delete: it existed).
    ///
    /// Rows are written in key order (a key's writes in the order given), so two nodes whose
    /// groups share rows lock them in the same order. A transaction PostgreSQL rolls back as a
    /// deadlock victim or serialization failure left nothing behind and is run again.
    pub(crate) fn commit(&mut self, ops: &[Vec<PgWrite<'_>>]) -> Result<Vec<Vec<bool>>, String> {
        let mut order: Vec<(usize, usize)> =
            ops.iter().enumerate().flat_map(|(o, writes)| (0..writes.len()).map(move |w| (o, w))).collect();
        order.sort_by_key(|&(o, w)| ops[o][w].key().as_bytes());
        let mut tries = 0;
        loop {
            tries += 1;
            match self.try_commit(ops, &order) {
                Err(e) if tries < COMMIT_TRIES && transient(&e) => {
                    tracing::debug!(error = %describe(&e), tries, "service store commit rolled back; running it again");
                    std::thread::sleep(std::time::Duration::from_millis(tries * 5));
                }
                Err(e) if self.client.is_closed() => {
                    // The connection is gone: the group was not acknowledged to anyone, so it
                    // is committed again once PostgreSQL is back (its puts and deletes land the
                    // same whether or not the lost commit did). The callers wait meanwhile, and
                    // the bounded queue holds the rest back.
                    self.reconnect(&describe(&e))?;
                    tries = 0;
                }
                other => return other.map_err(|e| describe(&e)),
            }
        }
    }

    /// Connects again, trying for up to [`RECONNECT_FOR`], with `unavailable` saying why
    /// meanwhile; past that the commit fails and the store stops.
    fn reconnect(&mut self, why: &str) -> Result<(), String> {
        let deadline = std::time::Instant::now() + RECONNECT_FOR;
        let mut wait = std::time::Duration::from_millis(50);
        tracing::warn!(error = why, "the service store lost PostgreSQL; reconnecting");
        *self.unavailable.lock() = Some(format!("PostgreSQL unreachable ({why}); reconnecting"));
        loop {
            match PgKv::prepared(&self.url, &self.schema) {
                Ok((client, put, delete)) => {
                    (self.client, self.put, self.delete) = (client, put, delete);
                    *self.unavailable.lock() = None;
                    tracing::info!("the service store reached PostgreSQL again");
                    return Ok(());
                }
                Err(error) if std::time::Instant::now() < deadline => {
                    *self.unavailable.lock() = Some(format!("PostgreSQL unreachable ({error}); reconnecting"));
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(std::time::Duration::from_secs(1));
                }
                Err(error) => {
                    *self.unavailable.lock() = None;
                    return Err(format!("PostgreSQL unreachable for {} s: {error}", RECONNECT_FOR.as_secs()));
                }
            }
        }
    }

    fn try_commit(
        &mut self,
        ops: &[Vec<PgWrite<'_>>],
        order: &[(usize, usize)],
    ) -> Result<Vec<Vec<bool>>, postgres::Error> {
        let mut results: Vec<Vec<bool>> = ops.iter().map(|writes| vec![false; writes.len()]).collect();
        let mut txn = self.client.transaction()?;
        for &(o, w) in order {
            results[o][w] = match &ops[o][w] {
                PgWrite::Put(key, value, version) => txn
                    .query_opt(&self.put, &[&key.as_bytes(), value, version])?
                    .is_some_and(|row| row.get::<_, bool>(0)),
                PgWrite::Delete(key) => txn.execute(&self.delete, &[&key.as_bytes()])? > 0,
            };
        }
        txn.commit()?;
        Ok(results)
    }
}

/// Times a commit is tried when PostgreSQL rolls it back for a reason that passes.
const COMMIT_TRIES: u64 = 8;

/// How long the writer tries to reach PostgreSQL again after losing it, before its store stops.
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// A rollback that running the transaction again may not meet: a deadlock or a serialization
/// failure.
fn transient(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == postgres::error::SqlState::T_R_DEADLOCK_DETECTED
            || *c == postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
    })
}

impl PgWrite<'_> {
    fn key(&self) -> &str {
        match self {
            PgWrite::Put(key, ..) | PgWrite::Delete(key) => key,
        }
    }
}

impl Read {
    /// Answers the read with `error`.
    fn fail(self, error: String) {
        match self {
            Read::Ping(done) => drop(done.send(Err(error))),
            Read::Get(_, done) => drop(done.send(Err(error))),
            Read::Many(_, done) => drop(done.send(Err(error))),
            Read::Range(_, done) => drop(done.send(Err(error))),
        }
    }
}

fn serve_read(client: &mut postgres::Client, read: Read) {
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).map_err(|e| e.to_string());
    match read {
        Read::Ping(done) => {
            let _ = done.send(client.simple_query("SELECT 1").map(drop).map_err(|e| describe(&e)));
        }
        Read::Get(key, done) => {
            let r = client.query_opt("SELECT value FROM service_kv WHERE key = $1", &[&key.as_bytes()]);
            let _ = done.send(r.map(|row| row.map(|r| r.get(0))).map_err(|e| describe(&e)));
        }
        Read::Many(keys, done) => {
            let raw: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
            let r = client.query("SELECT key, value FROM service_kv WHERE key = ANY($1)", &[&raw]).map(|rows| {
                let found: std::collections::HashMap<Vec<u8>, Vec<u8>> =
                    rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
                keys.iter().map(|k| found.get(k.as_bytes()).cloned()).collect()
            });
            let _ = done.send(r.map_err(|e| describe(&e)));
        }
        Read::Range(prefix, done) => {
            let r = match upper_bound(prefix.as_bytes()) {
                Some(upper) => client.query(
                    "SELECT key, value FROM service_kv WHERE key >= $1 AND key < $2 ORDER BY key",
                    &[&prefix.as_bytes(), &upper],
                ),
                None => client
                    .query("SELECT key, value FROM service_kv WHERE key >= $1 ORDER BY key", &[&prefix.as_bytes()]),
            };
            let rows = r.map_err(|e| describe(&e)).and_then(|rows| {
                rows.into_iter().map(|r| Ok((text(r.get(0))?, r.get(1)))).collect::<Result<Vec<_>, String>>()
            });
            let _ = done.send(rows);
        }
    }
}

/// The least byte string above every one that starts with `prefix` (`None`: there is none,
/// the range is open). Namespaces end with `/`, whose successor is `0`.
fn upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut bytes = prefix.to_vec();
    while let Some(last) = bytes.pop() {
        if last < u8::MAX {
            bytes.push(last + 1);
            return Some(bytes);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::upper_bound;

    #[test]
    fn a_namespace_is_a_key_range() {
        assert_eq!(upper_bound(b"deliveries/").as_deref(), Some(&b"deliveries0"[..]));
        assert_eq!(upper_bound(b""), None);
        assert_eq!(upper_bound(b"a\xff").as_deref(), Some(&b"b"[..]));
        let (lo, hi) = (b"a/".to_vec(), upper_bound(b"a/").unwrap_or_default());
        let inside = |key: &[u8]| key >= lo.as_slice() && key < hi.as_slice();
        for key in [&b"a/"[..], b"a/x", b"a/\0", "a/\u{10FFFF}".as_bytes()] {
            assert!(inside(key), "{key:?}");
        }
        for key in [&b"a"[..], b"a0", b"b/", b"a.x"] {
            assert!(!inside(key), "{key:?}");
        }
    }
}
