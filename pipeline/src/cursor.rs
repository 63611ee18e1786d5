//! Named subscriber cursors of the stream path: for each topic and name, the next offset that
//! subscriber reads. A subscriber that reconnects under its name resumes where it committed,
//! and the distance from its cursor to the end of the log is its lag (`/v1/streams`,
//! `fleetstream_stream_cursor_lag`).
//!
//! Cursors live in memory and in `DATA_DIR/cursors.json`, rewritten (temp file, rename)
//! within [`FLUSH_EVERY`] of a change (by the engine's `cursor-flush` thread, or by the commit
//! itself when commits come fast) and fsynced at shutdown. A subscriber
//! commits often; losing the last fraction of a second of commits in a crash only means its
//! subscriber sees those batches again, which at-least-once subscribers handle anyway.
//!
//! Names are the subscribers' choice, so the table is bounded: a topic holds at most
//! `[engine] max_cursors` (about 100 bytes each). A new name past it takes the place of the
//! cursor committed longest ago if that one has been idle for `[engine] cursor_idle_h` (the
//! way a broker expires the offsets of a consumer group gone for days), and is otherwise
//! refused with `limit_reached`: a live subscriber never loses its place to a new one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use events::Topic;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Least time between two rewrites of the cursor file.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// One cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The next offset its subscriber reads.
    pub next: u64,
    /// When it was last committed, µs since the epoch.
    pub updated_us: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    /// Topic name → cursor name → cursor.
    topics: BTreeMap<String, BTreeMap<String, Cursor>>,
}

#[derive(Debug)]
struct State {
    file: File,
    dirty: bool,
    last_flush: Instant,
}

/// How many cursors a topic holds, and when an idle one may make room for a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorLimits {
    /// Cursors per topic at most.
    pub per_topic: usize,
    /// A cursor not committed for this long may be let go for a new one, µs.
    pub idle_us: u64,
}

/// Every named cursor.
#[derive(Debug)]
pub struct CursorStore {
    path: Option<PathBuf>,
    state: Mutex<State>,
    limits: CursorLimits,
}

impl CursorStore {
    /// Cursors kept at `path` (loaded if it exists), or in memory only.
    pub fn open(path: Option<&Path>, limits: CursorLimits) -> Result<Self, Error> {
        let file = match path {
            Some(p) if p.exists() => {
                let bytes = std::fs::read(p)
                    .map_err(|e| Error::Io { context: format!("reading {}", p.display()), source: e })?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Config(format!("{} is not a cursor file: {e}", p.display())))?
            }
            _ => File::default(),
        };
        Ok(Self {
            path: path.map(Path::to_path_buf),
            state: Mutex::new(State { file, dirty: false, last_flush: Instant::now() }),
            limits,
        })
    }

    /// A cursor.
    pub fn get(&self, topic: Topic, name: &str) -> Option<Cursor> {
        self.state.lock().file.topics.get(topic.name()).and_then(|t| t.get(name)).copied()
    }

    /// Every cursor of `topic`, by name.
    pub fn list(&self, topic: Topic) -> Vec<(String, Cursor)> {
        let state = self.state.lock();
        state.file.topics.get(topic.name()).map_or_else(Vec::new, |t| t.iter().map(|(n, c)| (n.clone(), *c)).collect())
    }

    /// Sets a cursor; the file follows within [`FLUSH_EVERY`]. A new name when the topic is
    /// full takes the place of the cursor idle longest if that one is idle past the limit's
    /// `idle_us`, and is otherwise refused with [`events::Error::LimitReached`].
    pub fn commit(&self, topic: Topic, name: &str, next: u64, now_us: u64) -> Result<(), events::Error> {
        let mut state = self.state.lock();
        let cursor = Cursor { next, updated_us: now_us };
        let cursors = state.file.topics.entry(topic.name().to_string()).or_default();
        if let Some(held) = cursors.get_mut(name) {
            *held = cursor;
        } else {
            if cursors.len() >= self.limits.per_topic {
                let idle = cursors
                    .iter()
                    .min_by_key(|(_, c)| c.updated_us)
                    .filter(|(_, c)| now_us.saturating_sub(c.updated_us) >= self.limits.idle_us)
                    .map(|(n, _)| n.clone());
                let Some(idle) = idle else {
                    events::limits::refused(events::limits::Table::Cursors, 1);
                    return Err(events::Error::LimitReached {
                        what: "named cursors of a topic ([engine] max_cursors)",
                        limit: self.limits.per_topic as u64,
                    });
                };
                cursors.remove(&idle);
                events::limits::evicted(events::limits::Table::Cursors, 1);
                tracing::info!(topic = topic.name(), cursor = %idle, "let an idle cursor go to make room for a new one");
            }
            cursors.insert(name.to_string(), cursor);
        }
        state.dirty = true;
        if state.last_flush.elapsed() >= FLUSH_EVERY {
            self.write(&mut state, false);
        }
        Ok(())
    }

    /// Takes a cursor committed elsewhere (another node of a cluster) unless this store has a
    /// newer commit of it.
    pub fn merge(&self, topic: Topic, name: &str, cursor: Cursor) {
        let mut state = self.state.lock();
        let cursors = state.file.topics.entry(topic.name().to_string()).or_default();
        if cursors.get(name).is_some_and(|c| c.updated_us >= cursor.updated_us) {
            return;
        }
        cursors.insert(name.to_string(), cursor);
        state.dirty = true;
    }

    /// Writes the file if anything changed; `sync` also fsyncs it (at shutdown).
    pub fn flush(&self, sync: bool) {
        let mut state = self.state.lock();
        if state.dirty {
            self.write(&mut state, sync);
        }
    }

    fn write(&self, state: &mut State, sync: bool) {
        state.last_flush = Instant::now();
        let Some(path) = &self.path else {
            state.dirty = false;
            return;
        };
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&state.file).map_err(std::io::Error::other).and_then(|bytes| {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            if sync {
                f.sync_all()?;
            }
            std::fs::rename(&tmp, path)
        });
        match written {
            Ok(()) => state.dirty = false,
            Err(error) => tracing::warn!(path = %path.display(), %error, "could not write the cursor file; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_survive_a_reopen_after_a_flush() {
        let dir = std::env::temp_dir().join(format!("fleetstream-cursors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cursors.json");
        let store = CursorStore::open(Some(&path), crate::engine::EngineConfig::default().cursor_limits()).unwrap();
        store.commit(Topic::DeliveryEvents, "history", 42, 7).unwrap();
        store.commit(Topic::DroneTelemetry, "dash", 5, 8).unwrap();
        store.flush(true);
        let again = CursorStore::open(Some(&path), crate::engine::EngineConfig::default().cursor_limits()).unwrap();
        assert_eq!(again.get(Topic::DeliveryEvents, "history"), Some(Cursor { next: 42, updated_us: 7 }));
        assert_eq!(again.get(Topic::DeliveryEvents, "dash"), None, "cursors are per topic");
        assert_eq!(again.list(Topic::DroneTelemetry), vec![("dash".to_string(), Cursor { next: 5, updated_us: 8 })]);
        std::fs::write(&path, b"{ not json").unwrap();
        assert!(
            CursorStore::open(Some(&path), crate::engine::EngineConfig::default().cursor_limits()).is_err(),
            "a damaged file is reported, not ignored"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_topic_refuses_new_names_unless_one_is_idle() {
        let store = CursorStore::open(None, CursorLimits { per_topic: 2, idle_us: 100 }).unwrap();
        store.commit(Topic::DroneTelemetry, "a", 1, 10).unwrap();
        store.commit(Topic::DroneTelemetry, "b", 1, 20).unwrap();
        store.commit(Topic::DeliveryEvents, "c", 1, 20).unwrap();
        let err = store.commit(Topic::DroneTelemetry, "new", 1, 50).unwrap_err();
        assert_eq!(err.name(), "limit_reached", "{err}");
        store.commit(Topic::DroneTelemetry, "a", 2, 60).unwrap();
        assert_eq!(
            store.get(Topic::DroneTelemetry, "a"),
            Some(Cursor { next: 2, updated_us: 60 }),
            "held names commit"
        );
        // "b" was last committed at 20: idle for 100 at 120, so it makes room.
        store.commit(Topic::DroneTelemetry, "new", 3, 120).unwrap();
        let names: Vec<_> = store.list(Topic::DroneTelemetry).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "new"]);
        assert_eq!(store.list(Topic::DeliveryEvents).len(), 1, "topics are bounded apart");
    }
}
