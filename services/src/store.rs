//! A small durable key-value store for an internal service's own records (accounts, packages,
//! delivery records, the drone registry, read-model positions): one redb file, JSON values
//! under string keys, a namespace per service.
//!
//! Writes are group-committed: a writer thread takes every write waiting at the moment, applies
//! them in one transaction and commits once (redb fsyncs each commit), then answers each caller.
//! Under load a commit carries many writes, so one fsync serves many requests; alone, a write
//! waits for just its own commit. Reads go straight to a read transaction. The write queue is
//! bounded, so callers wait instead of piling up memory.
//!
//! A [`Batch`] is several writes, across the namespaces of one file, that land in one commit or
//! not at all: a read model stores what it changed together with the log position it reached,
//! so a restart resumes exactly where its records stand. Writes are queued in the order they
//! are enqueued ([`Store::enqueue`] queues before it awaits), so a caller that orders its
//! changes under a lock gets them stored in that order.
//!
//! The same store runs on PostgreSQL for several nodes ([`Store::open_postgres`], see
//! [`crate::store_pg`]): one table instead of the file, one transaction per group, and
//! [`Store::local`] namespaces that are the node's own (its saga journal, its read models'
//! positions) beside the shared ones.
//!
//! A failed commit stops the store: every later write is refused with the first failure's
//! reason, and [`Store::failure`] says so for readiness and metrics. What a failed commit would
//! have written is unknown to the callers that were answered before it, so carrying on would
//! acknowledge writes on top of a hole; a restart recovers from what redb holds. One failure
//! is not of that kind: PostgreSQL lost (a restart, a network cut). The group is then held,
//! unacknowledged, while the writer connects again (up to a minute, [`Store::unavailable`]
//! saying so for readiness), and committed once it has: its puts and deletes land the same
//! whether or not the commit whose answer was lost took effect (only the "key was new" flags
//! of that one group may then say "existed").

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use redb::{Database, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;

const RECORDS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("records");

/// Writes waiting for a commit, at most.
const QUEUE: usize = 4096;
/// Memory redb may use to cache the file's pages (redb's own default is 1 GiB per file, which
/// an hour of orders filled: resident memory grew with the file until then).
pub const CACHE_BYTES: usize = 64 << 20;
/// Writes in one commit, at most (a batch is never split, so one may carry more).
const MAX_GROUP: usize = 1024;

fn store_error(e: impl std::fmt::Display) -> Error {
    Error::Engine(events::Error::Storage(format!("service store: {e}")))
}

enum Write {
    /// Key, value, and a version the value replaces only values not newer than (PostgreSQL).
    Put(String, Vec<u8>, Option<i64>),
    Delete(String),
}

/// Where the records are: a redb file of this node, or PostgreSQL shared by the nodes.
#[derive(Clone)]
enum Backend {
    Redb(Arc<Database>),
    Pg(Arc<crate::store_pg::PgKv>),
}

impl Backend {
    fn same(&self, other: &Backend) -> bool {
        match (self, other) {
            (Backend::Redb(a), Backend::Redb(b)) => Arc::ptr_eq(a, b),
            (Backend::Pg(a), Backend::Pg(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

struct Op {
    writes: Vec<Write>,
    done: tokio::sync::oneshot::Sender<Result<Vec<bool>, String>>,
}

/// The key of a numeric id: fixed width, so the store keeps ids in order.
pub fn id_key(id: u64) -> String {
    format!("{id:020}")
}

/// What a store's writer has done, for `/metrics`: commits, the writes they carried, their
/// bytes and the time spent committing (fsync included).
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Commits (transactions), failed ones included.
    pub commits: std::sync::atomic::AtomicU64,
    /// Puts and deletes committed.
    pub writes: std::sync::atomic::AtomicU64,
    /// Keys and values written, in bytes.
    pub bytes: std::sync::atomic::AtomicU64,
    /// Microseconds spent in commits.
    pub commit_us: std::sync::atomic::AtomicU64,
}

impl StoreStats {
    /// Prometheus text for this store, labelled `store="{name}"`.
    pub fn render(&self, name: &str, out: &mut String) {
        use std::sync::atomic::Ordering::Relaxed;
        for (metric, help, value) in [
            ("commits_total", "Commits of the service store (one fsync each).", self.commits.load(Relaxed)),
            ("writes_total", "Puts and deletes the service store committed.", self.writes.load(Relaxed)),
            ("written_bytes_total", "Keys and values the service store wrote.", self.bytes.load(Relaxed)),
        ] {
            out.push_str(&format!(
                "# HELP fleetstream_store_{metric} {help}\n# TYPE fleetstream_store_{metric} counter\nfleetstream_store_{metric}{{store=\"{name}\"}} {value}\n"
            ));
        }
        let seconds = self.commit_us.load(Relaxed) as f64 / 1e6;
        out.push_str(&format!(
            "# HELP fleetstream_store_commit_seconds_total Time the service store spent committing.\n# TYPE fleetstream_store_commit_seconds_total counter\nfleetstream_store_commit_seconds_total{{store=\"{name}\"}} {seconds}\n"
        ));
    }
}

/// One service's store: a namespace of keys in a database file. Services in one process may
/// share a file ([`Store::namespace`]), so one commit (one fsync) carries all their writes.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    tx: flume::Sender<Op>,
    prefix: String,
    failed: Arc<Mutex<Option<String>>>,
    inject: Arc<std::sync::atomic::AtomicBool>,
    stats: Arc<StoreStats>,
    /// On a shared store: this node's name, which its [`Store::local`] namespaces carry.
    node: Option<Arc<str>>,
    /// While the writer cannot reach PostgreSQL: why (it is reconnecting).
    unavailable: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// Writes that commit together, across namespaces of one file.
#[derive(Default)]
pub struct Batch {
    writes: Vec<Write>,
    db: Option<Backend>,
    mixed: bool,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("writes", &self.writes.len()).finish()
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    fn note(&mut self, store: &Store) {
        match &self.db {
            None => self.db = Some(store.backend.clone()),
            Some(db) if !db.same(&store.backend) => self.mixed = true,
            Some(_) => {}
        }
    }

    /// Adds a put of `value` under `key` in `store`'s namespace.
    pub fn put(&mut self, store: &Store, key: &str, value: &impl Serialize) -> Result<(), Error> {
        self.note(store);
        let bytes = serde_json::to_vec(value).map_err(store_error)?;
        self.writes.push(Write::Put(store.key(key), bytes, None));
        Ok(())
    }

    /// Adds a put of `value` under `key` that lands only over a value whose version is not
    /// newer than `version` (on a shared store, where several nodes' read models write the
    /// same records; the embedded store has one writer, which writes in order, and ignores it).
    pub fn put_versioned(
        &mut self,
        store: &Store,
        key: &str,
        value: &impl Serialize,
        version: u64,
    ) -> Result<(), Error> {
        self.note(store);
        let bytes = serde_json::to_vec(value).map_err(store_error)?;
        let version = i64::try_from(version).unwrap_or(i64::MAX);
        self.writes.push(Write::Put(store.key(key), bytes, Some(version)));
        Ok(())
    }

    /// Adds a delete of `key` in `store`'s namespace.
    pub fn delete(&mut self, store: &Store, key: &str) {
        self.note(store);
        self.writes.push(Write::Delete(store.key(key)));
    }

    /// How many writes it holds.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

impl Store {
    /// Opens (or creates) the store at `path` and starts its writer thread, which ends when
    /// the last handle is dropped.
    pub fn open(path: &Path) -> Result<Self, Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(store_error)?;
        }
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(store_error)?;
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("service").to_string();
        Self::start(db, name)
    }

    /// The store in PostgreSQL at `url`, tables in `schema` (created and migrated here), shared
    /// with the other nodes; `node` names this node's own namespaces ([`Store::local`]) and
    /// must stay the same across its restarts.
    pub fn open_postgres(url: &str, schema: &str, node: &str) -> Result<Self, Error> {
        let kv = Arc::new(crate::store_pg::PgKv::open(url, schema)?);
        let writer_kv = kv.clone();
        let unavailable = Arc::new(Mutex::new(None));
        let writer_unavailable = unavailable.clone();
        Self::spawn("postgres", Backend::Pg(kv), Some(node.into()), unavailable, move || {
            let mut pg = writer_kv.writer(writer_unavailable)?;
            Ok(move |group: &[Op]| {
                let ops: Vec<Vec<crate::store_pg::PgWrite<'_>>> = group
                    .iter()
                    .map(|op| {
                        op.writes
                            .iter()
                            .map(|w| match w {
                                Write::Put(k, v, version) => crate::store_pg::PgWrite::Put(k, v, *version),
                                Write::Delete(k) => crate::store_pg::PgWrite::Delete(k),
                            })
                            .collect()
                    })
                    .collect();
                pg.commit(&ops)
            })
        })
    }

    /// A store in memory, for tests and throwaway runs.
    pub fn in_memory() -> Result<Self, Error> {
        let db =
            Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).map_err(store_error)?;
        Self::start(db, "memory".into())
    }

    fn start(db: Database, name: String) -> Result<Self, Error> {
        let db = Arc::new(db);
        let txn = db.begin_write().map_err(store_error)?;
        txn.open_table(RECORDS).map_err(store_error)?;
        txn.commit().map_err(store_error)?;
        // The writer holds the database weakly, so it closes (and its file lock goes) as soon as
        // the last handle is dropped, not when the writer thread next wakes up.
        let writer_db = Arc::downgrade(&db);
        Self::spawn(&name, Backend::Redb(db), None, Arc::default(), move || {
            Ok(move |group: &[Op]| match writer_db.upgrade() {
                Some(db) => commit(&db, group),
                None => Err("the store is closed".to_string()),
            })
        })
    }

    /// Starts the writer thread: `open` runs on it and makes the function that commits a group
    /// (a connection of its own, for PostgreSQL); the store is returned once it has.
    fn spawn<C>(
        name: &str,
        backend: Backend,
        node: Option<Arc<str>>,
        unavailable: Arc<Mutex<Option<String>>>,
        open: impl FnOnce() -> Result<C, Error> + Send + 'static,
    ) -> Result<Self, Error>
    where
        C: FnMut(&[Op]) -> Result<Vec<Vec<bool>>, String>,
    {
        let (tx, rx) = flume::bounded::<Op>(QUEUE);
        let failed = Arc::new(Mutex::new(None));
        let inject = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stats = Arc::new(StoreStats::default());
        let (writer_failed, writer_inject, writer_stats) = (failed.clone(), inject.clone(), stats.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), Error>>();
        std::thread::Builder::new()
            .name(format!("store-{name}"))
            .spawn(move || match open() {
                Ok(commit) => {
                    let _ = ready_tx.send(Ok(()));
                    writer(&rx, &writer_failed, &writer_inject, &writer_stats, commit);
                }
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                }
            })
            .map_err(store_error)?;
        ready.recv().map_err(|_| store_error("the writer stopped"))??;
        Ok(Self { backend, tx, prefix: String::new(), failed, inject, stats, node, unavailable })
    }

    /// The same database under the namespace `name`: its keys cannot meet another
    /// namespace's, and [`Store::all`] sees only its own.
    pub fn namespace(&self, name: &str) -> Self {
        Self {
            backend: self.backend.clone(),
            tx: self.tx.clone(),
            prefix: format!("{}{name}/", self.prefix),
            failed: self.failed.clone(),
            inject: self.inject.clone(),
            stats: self.stats.clone(),
            node: self.node.clone(),
            unavailable: self.unavailable.clone(),
        }
    }

    /// The namespace `name` of this node alone: on a shared store it carries the node's name
    /// (`name@node`), so each node keeps its own (a saga journal, a read model's position);
    /// in a node's own file it is [`Store::namespace`].
    pub fn local(&self, name: &str) -> Self {
        match &self.node {
            Some(node) => self.namespace(&format!("{name}@{node}")),
            None => self.namespace(name),
        }
    }

    /// Whether other nodes write this store too (PostgreSQL): what a node holds in memory may
    /// then be behind the store.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Pg(_))
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Fault injection: from now on every commit of this file fails as a broken disk's would,
    /// so the failure path can be exercised.
    #[doc(hidden)]
    pub fn fail_commits(&self) {
        self.inject.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// What the store's writer has done (shared by every namespace of the file).
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// Why the store stopped taking writes, if it did (a failed commit).
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    /// Why the store cannot write right now while it may again: PostgreSQL lost, the writer
    /// reconnecting (writes wait meanwhile). For readiness.
    pub fn unavailable(&self) -> Option<String> {
        self.unavailable.lock().clone()
    }

    /// Whether the database answers now (PostgreSQL: `SELECT 1` on a reader's connection,
    /// made again when it was lost; a file: always). For readiness.
    pub fn ping(&self) -> Result<(), Error> {
        match &self.backend {
            Backend::Redb(_) => Ok(()),
            Backend::Pg(kv) => kv.ping(),
        }
    }

    /// Stores `value` under `key`, durably, once committed. `true`: the key is new.
    pub async fn put(&self, key: &str, value: &impl Serialize) -> Result<bool, Error> {
        let mut batch = Batch::new();
        batch.put(self, key, value)?;
        Ok(self.enqueue(batch).await?.first().copied().unwrap_or(false))
    }

    /// Deletes `key`, durably. `true`: it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, Error> {
        let mut batch = Batch::new();
        batch.delete(self, key);
        Ok(self.enqueue(batch).await?.first().copied().unwrap_or(false))
    }

    /// Queues `batch` now (waiting only while the queue is full) and returns a future that
    /// resolves once it is committed, with one flag per write (put: the key was new; delete:
    /// it existed). Batches are committed in the order they were queued.
    pub fn enqueue(&self, batch: Batch) -> impl Future<Output = Result<Vec<bool>, Error>> + Send + 'static + use<> {
        let queued = self.queue(batch);
        async move {
            let rx = queued?;
            rx.await.map_err(|_| store_error("the writer stopped"))?.map_err(store_error)
        }
    }

    fn queue(&self, batch: Batch) -> Result<tokio::sync::oneshot::Receiver<Result<Vec<bool>, String>>, Error> {
        if batch.mixed || batch.db.as_ref().is_some_and(|db| !db.same(&self.backend)) {
            return Err(store_error("a batch spans several database files"));
        }
        if let Some(reason) = self.failure() {
            return Err(store_error(format!("stopped after a failed commit: {reason}")));
        }
        let (done, rx) = tokio::sync::oneshot::channel();
        let op = Op { writes: batch.writes, done };
        // Queued synchronously so that the order of calls is the order of commits.
        match self.tx.try_send(op) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(op)) => {
                self.tx.send(op).map_err(|_| store_error("the writer stopped"))?;
            }
            Err(flume::TrySendError::Disconnected(_)) => return Err(store_error("the writer stopped")),
        }
        Ok(rx)
    }

    /// The value under `key`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        let db = match &self.backend {
            Backend::Redb(db) => db,
            Backend::Pg(kv) => {
                return kv.get(&self.key(key))?.map(|v| serde_json::from_slice(&v).map_err(store_error)).transpose();
            }
        };
        let txn = db.begin_read().map_err(store_error)?;
        let table = txn.open_table(RECORDS).map_err(store_error)?;
        match table.get(self.key(key).as_str()).map_err(store_error)? {
            Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(store_error),
            None => Ok(None),
        }
    }

    /// Every record, in key order (for loading a read model at start).
    pub fn all<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, Error> {
        let mut out = Vec::new();
        self.scan(|key, value| out.push((key, value)))?;
        Ok(out)
    }

    /// Hands every record to `each`, in key order, one at a time: for loading a read model
    /// that keeps only part of what is stored.
    pub fn scan<T: DeserializeOwned>(&self, mut each: impl FnMut(String, T)) -> Result<(), Error> {
        let db = match &self.backend {
            Backend::Redb(db) => db,
            Backend::Pg(kv) => {
                for (k, v) in kv.range(&self.prefix)? {
                    let Some(key) = k.strip_prefix(self.prefix.as_str()) else { continue };
                    each(key.to_string(), serde_json::from_slice(&v).map_err(store_error)?);
                }
                return Ok(());
            }
        };
        let txn = db.begin_read().map_err(store_error)?;
        let table = txn.open_table(RECORDS).map_err(store_error)?;
        for entry in table.range(self.prefix.as_str()..).map_err(store_error)? {
            let (k, v) = entry.map_err(store_error)?;
            let Some(key) = k.value().strip_prefix(self.prefix.as_str()) else { break };
            each(key.to_string(), serde_json::from_slice(v.value()).map_err(store_error)?);
        }
        Ok(())
    }

    /// The values under `keys`, in their order (one round trip on a shared store).
    pub fn get_many<T: DeserializeOwned>(&self, keys: &[String]) -> Result<Vec<Option<T>>, Error> {
        let values = match &self.backend {
            Backend::Pg(kv) => kv.get_many(keys.iter().map(|k| self.key(k)).collect())?,
            Backend::Redb(db) => {
                let txn = db.begin_read().map_err(store_error)?;
                let table = txn.open_table(RECORDS).map_err(store_error)?;
                let mut out = Vec::with_capacity(keys.len());
                for key in keys {
                    out.push(table.get(self.key(key).as_str()).map_err(store_error)?.map(|v| v.value().to_vec()));
                }
                out
            }
        };
        values.into_iter().map(|v| v.map(|v| serde_json::from_slice(&v).map_err(store_error)).transpose()).collect()
    }
}

/// The writer thread: takes every write waiting, commits them with `commit`, answers each.
fn writer(
    rx: &flume::Receiver<Op>,
    failed: &Mutex<Option<String>>,
    inject: &std::sync::atomic::AtomicBool,
    stats: &StoreStats,
    mut commit: impl FnMut(&[Op]) -> Result<Vec<Vec<bool>>, String>,
) {
    while let Ok(first) = rx.recv() {
        let mut writes = first.writes.len();
        let mut group = vec![first];
        while writes < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => {
                    writes += op.writes.len();
                    group.push(op);
                }
                Err(_) => break,
            }
        }
        let stopped = failed.lock().clone();
        let started = std::time::Instant::now();
        let outcome = match stopped {
            Some(reason) => Err(format!("stopped after a failed commit: {reason}")),
            None => if inject.load(std::sync::atomic::Ordering::Relaxed) {
                Err("injected failure".to_string())
            } else {
                commit(&group)
            }
            .inspect_err(|e| {
                tracing::error!(error = %e, "service store commit failed; the store takes no more writes until a restart");
                *failed.lock() = Some(e.clone());
            }),
        };
        {
            use std::sync::atomic::Ordering::Relaxed;
            let bytes: usize = group
                .iter()
                .flat_map(|op| &op.writes)
                .map(|w| match w {
                    Write::Put(k, v, _) => k.len() + v.len(),
                    Write::Delete(k) => k.len(),
                })
                .sum();
            stats.commits.fetch_add(1, Relaxed);
            stats.writes.fetch_add(writes as u64, Relaxed);
            stats.bytes.fetch_add(bytes as u64, Relaxed);
            stats.commit_us.fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        }
        match outcome {
            Ok(results) => {
                for (op, fresh) in group.into_iter().zip(results) {
                    let _ = op.done.send(Ok(fresh));
                }
            }
            Err(e) => {
                for op in group {
                    let _ = op.done.send(Err(e.clone()));
                }
            }
        }
    }
}

fn commit(db: &Database, group: &[Op]) -> Result<Vec<Vec<bool>>, String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    let mut results = Vec::with_capacity(group.len());
    {
        let mut table = txn.open_table(RECORDS).map_err(|e| e.to_string())?;
        for op in group {
            let mut flags = Vec::with_capacity(op.writes.len());
            for write in &op.writes {
                flags.push(match write {
                    Write::Put(k, v, _) => table.insert(k.as_str(), v.as_slice()).map_err(|e| e.to_string())?.is_none(),
                    Write::Delete(k) => table.remove(k.as_str()).map_err(|e| e.to_string())?.is_some(),
                });
            }
            results.push(flags);
        }
    }
    txn.commit().map_err(|e| e.to_string())?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_survive_reopening_and_concurrent_writes_share_commits() -> Result<(), Error> {
        let dir = std::env::temp_dir().join(format!("fleetstream-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("things.redb");
        {
            let store = Store::open(&path)?;
            assert!(store.put("a", &1u32).await?);
            assert!(!store.put("a", &2u32).await?, "a second put of a key replaces it");
            let writes: Vec<_> = (0..200)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move { store.put(&format!("k{i:03}"), &i).await })
                })
                .collect();
            for w in writes {
                assert!(w.await.map_err(store_error)??);
            }
            assert!(store.delete("k000").await?);
            assert!(!store.delete("k000").await?);
        }
        // The file is released with the last handle: it opens again at once.
        let store = Store::open(&path)?;
        assert_eq!(store.get::<u32>("a")?, Some(2));
        assert_eq!(store.get::<u32>("k000")?, None);
        let all = store.all::<u32>()?;
        assert_eq!(all.len(), 200, "a plus k001..k199");
        assert_eq!(all.first(), Some(&("a".to_string(), 2)));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[tokio::test]
    async fn namespaces_share_a_file_but_not_keys() -> Result<(), Error> {
        let store = Store::in_memory()?;
        let (a, b) = (store.namespace("a"), store.namespace("b"));
        a.put("k", &1u32).await?;
        b.put("k", &2u32).await?;
        b.put("l", &3u32).await?;
        assert_eq!((a.get::<u32>("k")?, b.get::<u32>("k")?), (Some(1), Some(2)));
        assert_eq!(a.all::<u32>()?, vec![("k".to_string(), 1)]);
        assert_eq!(b.all::<u32>()?, vec![("k".to_string(), 2), ("l".to_string(), 3)]);
        assert!(a.delete("k").await?);
        assert_eq!(b.get::<u32>("k")?, Some(2));
        Ok(())
    }

    #[tokio::test]
    async fn a_batch_commits_across_namespaces_in_queue_order() -> Result<(), Error> {
        let store = Store::in_memory()?;
        let (a, b) = (store.namespace("a"), store.namespace("b"));
        let mut first = Batch::new();
        first.put(&a, "k", &1u32)?;
        first.put(&b, "pos", &10u64)?;
        let mut second = Batch::new();
        second.put(&a, "k", &2u32)?;
        second.delete(&b, "pos");
        // Both queued before either is awaited: the second lands last.
        let (f1, f2) = (store.enqueue(first), store.enqueue(second));
        assert_eq!(f2.await?, vec![false, true]);
        assert_eq!(f1.await?, vec![true, true]);
        assert_eq!((a.get::<u32>("k")?, b.get::<u64>("pos")?), (Some(2), None));
        let other = Store::in_memory()?;
        let mut mixed = Batch::new();
        mixed.put(&a, "x", &1u32)?;
        mixed.put(&other, "x", &1u32)?;
        assert!(store.enqueue(mixed).await.is_err(), "one batch, one file");
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_commit_stops_every_later_write() -> Result<(), Error> {
        let store = Store::in_memory()?;
        store.put("a", &1u32).await?;
        assert_eq!(store.failure(), None);
        store.fail_commits();
        assert!(store.put("b", &2u32).await.is_err());
        let reason = store.failure().ok_or_else(|| store_error("no failure recorded"))?;
        assert!(reason.contains("injected"), "{reason}");
        // Refused before it reaches the disk, namespaces included.
        let err = store.namespace("x").put("c", &3u32).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("stopped after a failed commit"), "{err}");
        assert_eq!(store.get::<u32>("a")?, Some(1), "what was committed stays readable");
        Ok(())
    }
}
