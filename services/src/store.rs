//! A small durable key-value store for an internal service's own records (accounts, packages,
//! delivery records): one redb file per service, JSON values under string keys.
//!
//! Writes are group-committed: a writer thread takes every write waiting at the moment, applies
//! them in one transaction and commits once (redb fsyncs each commit), then answers each caller.
//! Under load a commit carries many writes, so one fsync serves many requests; alone, a write
//! waits for just its own commit. Reads go straight to a read transaction. The write queue is
//! bounded, so callers wait instead of piling up memory.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;

const RECORDS: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("records");

/// Writes waiting for a commit, at most.
const QUEUE: usize = 4096;
/// Writes in one commit, at most.
const MAX_GROUP: usize = 1024;

fn store_error(e: impl std::fmt::Display) -> Error {
    Error::Engine(events::Error::Storage(format!("service store: {e}")))
}

enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

struct Op {
    write: Write,
    done: tokio::sync::oneshot::Sender<Result<bool, String>>,
}

/// The key of a numeric id: fixed width, so the store keeps ids in order.
pub fn id_key(id: u64) -> String {
    format!("{id:020}")
}

/// One service's store: a namespace of keys in a database file. Services in one process may
/// share a file ([`Store::namespace`]), so one commit (one fsync) carries all their writes.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    tx: flume::Sender<Op>,
    prefix: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store at `path` and starts its writer thread, which ends when
    /// the last handle is dropped.
    pub fn open(path: &Path) -> Result<Self, Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(store_error)?;
        }
        let db = Database::create(path).map_err(store_error)?;
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("service").to_string();
        Self::start(db, name)
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
        let (tx, rx) = flume::bounded::<Op>(QUEUE);
        // The writer holds the database weakly, so it closes (and its file lock goes) as soon as
        // the last handle is dropped, not when the writer thread next wakes up.
        let writer_db = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name(format!("store-{name}"))
            .spawn(move || writer(&writer_db, &rx))
            .map_err(store_error)?;
        Ok(Self { db, tx, prefix: String::new() })
    }

    /// The same database under the namespace `name`: its keys cannot meet another
    /// namespace's, and [`Store::all`] sees only its own.
    pub fn namespace(&self, name: &str) -> Self {
        Self { db: self.db.clone(), tx: self.tx.clone(), prefix: format!("{}{name}/", self.prefix) }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Stores `value` under `key`, durably, once committed. `true`: the key is new.
    pub async fn put(&self, key: &str, value: &impl Serialize) -> Result<bool, Error> {
        let bytes = serde_json::to_vec(value).map_err(store_error)?;
        self.submit(Write::Put(self.key(key), bytes)).await
    }

    /// Deletes `key`, durably. `true`: it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, Error> {
        self.submit(Write::Delete(self.key(key))).await
    }

    async fn submit(&self, write: Write) -> Result<bool, Error> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.tx.send_async(Op { write, done }).await.map_err(|_| store_error("the writer stopped"))?;
        rx.await.map_err(|_| store_error("the writer stopped"))?.map_err(store_error)
    }

    /// The value under `key`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        let txn = self.db.begin_read().map_err(store_error)?;
        let table = txn.open_table(RECORDS).map_err(store_error)?;
        match table.get(self.key(key).as_str()).map_err(store_error)? {
            Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(store_error),
            None => Ok(None),
        }
    }

    /// Every record, in key order (for loading a read model at start).
    pub fn all<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, Error> {
        let txn = self.db.begin_read().map_err(store_error)?;
        let table = txn.open_table(RECORDS).map_err(store_error)?;
        let mut out = Vec::new();
        for entry in table.range(self.prefix.as_str()..).map_err(store_error)? {
            let (k, v) = entry.map_err(store_error)?;
            let Some(key) = k.value().strip_prefix(self.prefix.as_str()) else { break };
            out.push((key.to_string(), serde_json::from_slice(v.value()).map_err(store_error)?));
        }
        Ok(out)
    }
}

fn writer(db: &std::sync::Weak<Database>, rx: &flume::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        let outcome = match db.upgrade() {
            Some(db) => commit(&db, &group),
            None => Err("the store is closed".to_string()),
        };
        match outcome {
            Ok(results) => {
                for (op, fresh) in group.into_iter().zip(results) {
                    let _ = op.done.send(Ok(fresh));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "service store commit failed");
                for op in group {
                    let _ = op.done.send(Err(e.clone()));
                }
            }
        }
    }
}

fn commit(db: &Database, group: &[Op]) -> Result<Vec<bool>, String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    let mut results = Vec::with_capacity(group.len());
    {
        let mut table = txn.open_table(RECORDS).map_err(|e| e.to_string())?;
        for op in group {
            let fresh = match &op.write {
                Write::Put(k, v) => table.insert(k.as_str(), v.as_slice()).map_err(|e| e.to_string())?.is_none(),
                Write::Delete(k) => table.remove(k.as_str()).map_err(|e| e.to_string())?.is_some(),
            };
            results.push(fresh);
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
}
