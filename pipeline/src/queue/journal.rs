//! A queue's journal: every change of the pure state as a checksummed record appended to one
//! file, so the queue's contents survive a restart. Recovery replays the file; a torn record at
//! the end (a crash mid-write) is cut off. When the file has grown well past what the queue
//! holds, it is rewritten as one record per live message (temp file, fsync, rename), so its
//! size stays proportional to the queue, not to its history.
//!
//! Record: `len u32 | crc32c u32 | body`, little-endian; body starts with a type byte:
//! - 1 put: id, key, enqueued_us, attempts u32, dead u8, dead_at_us, error (u16 len + UTF-8),
//!   payload (the rest);
//! - 2 update: id, attempts u32, dead u8, dead_at_us, error;
//! - 3 remove: id.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::state::{Message, QueueState, Status};
use crate::Error;

const PUT: u8 = 1;
const UPDATE: u8 = 2;
const REMOVE: u8 = 3;
/// Largest record accepted on replay: a payload limit far above any configured one.
const MAX_RECORD: u32 = 16 << 20;

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// The journal file of one queue.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Arc<File>,
    bytes: u64,
    /// Bytes right after opening or the last compaction: about what the queue holds.
    base_bytes: u64,
    seq: u64,
    buf: Vec<u8>,
    /// Set by a failed write or sync: the file may hold a partial record or unsynced ones the
    /// kernel has dropped, so nothing more is written to it until a restart replays it.
    failed: Option<String>,
}

impl Journal {
    /// Opens (or creates) the journal at `path` and replays it into `state`.
    pub fn open(path: &Path, state: &mut QueueState) -> Result<Self, Error> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io(format!("opening {}", path.display())))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io(format!("reading {}", path.display())))?;
        let valid = replay(&data, state);
        if valid < data.len() {
            tracing::warn!(path = %path.display(), cut = data.len() - valid, "queue journal had a torn tail; cut off");
            file.set_len(valid as u64).map_err(io(format!("truncating {}", path.display())))?;
            file.sync_all().map_err(io(format!("syncing {}", path.display())))?;
        }
        let bytes = valid as u64;
        Ok(Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
            bytes,
            base_bytes: bytes,
            seq: 0,
            buf: Vec::new(),
            failed: None,
        })
    }

    /// Journals a message in full (enqueue, or a snapshot line).
    pub fn put(&mut self, m: &Message) -> Result<u64, Error> {
        self.buf.clear();
        encode_put(&mut self.buf, m);
        self.write()
    }

    /// Journals a change of attempts, status or error.
    pub fn update(&mut self, m: &Message) -> Result<u64, Error> {
        self.buf.clear();
        self.buf.push(UPDATE);
        self.buf.extend_from_slice(&m.id.to_le_bytes());
        encode_status(&mut self.buf, m);
        self.write()
    }

    /// Journals a message's removal (acked or purged).
    pub fn remove(&mut self, id: u64) -> Result<u64, Error> {
        self.buf.clear();
        self.buf.push(REMOVE);
        self.buf.extend_from_slice(&id.to_le_bytes());
        self.write()
    }

    /// Bytes in the file.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes right after opening or the last compaction.
    pub fn base_bytes(&self) -> u64 {
        self.base_bytes
    }

    /// The number of the last record written; [`Journal::sync_handle`] makes it durable.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The file, to fsync outside the queue's lock.
    pub fn sync_handle(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Rewrites the file as one record per message of `state`, durably; afterwards everything
    /// journalled so far is on disk.
    pub fn compact(&mut self, state: &QueueState) -> Result<(), Error> {
        let tmp = self.path.with_extension("journal.tmp");
        let mut out = Vec::new();
        for m in state.messages() {
            self.buf.clear();
            encode_put(&mut self.buf, m);
            frame(&mut out, &self.buf);
        }
        {
            let mut f = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
            f.write_all(&out).map_err(io(format!("writing {}", tmp.display())))?;
            f.sync_all().map_err(io(format!("syncing {}", tmp.display())))?;
        }
        fs::rename(&tmp, &self.path).map_err(io(format!("replacing {}", self.path.display())))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("syncing {}", dir.display())))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .read(true)
            .open(&self.path)
            .map_err(io(format!("opening {}", self.path.display())))?;
        self.file = Arc::new(file);
        self.bytes = out.len() as u64;
        self.base_bytes = self.bytes;
        Ok(())
    }

    /// Why the journal stopped taking writes, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Swaps the file for a read-only handle, so the next write fails (fault injection).
    #[cfg(test)]
    pub fn break_file_for_tests(&mut self, path: &Path) {
        if let Ok(file) = File::open(path) {
            self.file = Arc::new(file);
        }
    }

    /// Stops the journal: every later write is refused with `reason`.
    pub fn fail(&mut self, reason: String) {
        self.failed.get_or_insert(reason);
    }

    fn write(&mut self) -> Result<u64, Error> {
        if let Some(reason) = &self.failed {
            return Err(Error::Task(format!("the journal {} stopped after an error: {reason}", self.path.display())));
        }
        let mut rec = Vec::with_capacity(8 + self.buf.len());
        frame(&mut rec, &self.buf);
        if let Err(e) = (&*self.file).write_all(&rec) {
            // A partial record may be on disk: appending after it would bury it mid-file.
            self.fail(e.to_string());
            if e.kind() == ErrorKind::StorageFull {
                return Err(Error::Full(format!("the disk is full ({})", self.path.display())));
            }
            return Err(io(format!("appending to {}", self.path.display()))(e));
        }
        self.bytes += rec.len() as u64;
        self.seq += 1;
        Ok(self.seq)
    }
}

fn frame(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.extend_from_slice(body);
}

fn encode_put(buf: &mut Vec<u8>, m: &Message) {
    buf.push(PUT);
    buf.extend_from_slice(&m.id.to_le_bytes());
    buf.extend_from_slice(&m.key.to_le_bytes());
    buf.extend_from_slice(&m.enqueued_us.to_le_bytes());
    encode_status(buf, m);
    buf.extend_from_slice(&m.payload);
}

fn encode_status(buf: &mut Vec<u8>, m: &Message) {
    buf.extend_from_slice(&m.attempts.to_le_bytes());
    let dead_at = match m.status {
        Status::Dead { at_us } => Some(at_us),
        _ => None,
    };
    buf.push(u8::from(dead_at.is_some()));
    buf.extend_from_slice(&dead_at.unwrap_or(0).to_le_bytes());
    let err = m.last_error.as_deref().unwrap_or("").as_bytes();
    let len = err.len().min(u16::MAX as usize);
    buf.extend_from_slice(&(len as u16).to_le_bytes());
    buf.extend_from_slice(&err[..len]);
}

/// Reads fields off a record body; `None` when it is too short.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).and_then(|b| b.try_into().ok()).map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }
    /// attempts, status, error.
    fn status(&mut self) -> Option<(u32, Status, Option<String>)> {
        let attempts = self.u32()?;
        let dead = self.u8()? != 0;
        let at_us = self.u64()?;
        let len = self.u16()? as usize;
        let err = String::from_utf8_lossy(self.take(len)?).into_owned();
        let status = if dead { Status::Dead { at_us } } else { Status::Ready };
        Some((attempts, status, (!err.is_empty()).then_some(err)))
    }
}

/// Applies every intact record of `data` to `state`; returns the bytes that were intact.
fn replay(data: &[u8], state: &mut QueueState) -> usize {
    let mut at = 0;
    while data.len() - at >= 8 {
        let len = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
        let crc = u32::from_le_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
        if len > MAX_RECORD || data.len() - at - 8 < len as usize {
            break;
        }
        let body = &data[at + 8..at + 8 + len as usize];
        if crc32c::crc32c(body) != crc || apply(body, state).is_none() {
            break;
        }
        at += 8 + len as usize;
    }
    at
}

fn apply(body: &[u8], state: &mut QueueState) -> Option<()> {
    let mut f = Fields(body);
    match f.u8()? {
        PUT => {
            let id = f.u64()?;
            let key = f.u64()?;
            let enqueued_us = f.u64()?;
            let (attempts, status, last_error) = f.status()?;
            let payload: Arc<[u8]> = Arc::from(f.0);
            state.restore(Message { id, key, payload, enqueued_us, attempts, last_error, status });
        }
        UPDATE => {
            let id = f.u64()?;
            let (attempts, status, last_error) = f.status()?;
            if let Some(old) = state.get(id) {
                let m = Message { attempts, status, last_error, ..old.clone() };
                state.restore(m);
            }
        }
        REMOVE => {
            let id = f.u64()?;
            state.forget(id);
        }
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use events::KeyRange;

    use super::*;
    use crate::queue::state::QueueConfig;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fleetstream-journal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn replay_rebuilds_the_state_and_a_torn_tail_is_cut() {
        let d = dir("replay");
        let path = d.join("q.journal");
        let cfg = QueueConfig { max_attempts: 2, ..QueueConfig::default() };
        let (acked, dead, waiting);
        {
            let mut s = QueueState::new(cfg);
            let mut j = Journal::open(&path, &mut s).unwrap();
            let mut ids = Vec::new();
            for i in 0..3u8 {
                let id = s.enqueue(u64::from(i), Arc::from(&[i][..]), 10).unwrap();
                j.put(s.get(id).unwrap()).unwrap();
                ids.push(id);
            }
            let leased = s.lease(1, KeyRange::ALL, 3, 20);
            for m in &leased {
                j.update(s.get(m.id).unwrap()).unwrap();
            }
            s.ack(leased[0].id, leased[0].token).unwrap();
            j.remove(leased[0].id).unwrap();
            s.nack(leased[1].id, leased[1].token, "bad", 30).unwrap();
            j.update(s.get(leased[1].id).unwrap()).unwrap();
            let again = s.lease(1, KeyRange { lo: 1, hi: 2 }, 1, 40).remove(0);
            j.update(s.get(again.id).unwrap()).unwrap();
            s.nack(again.id, again.token, "still bad", 50).unwrap();
            j.update(s.get(again.id).unwrap()).unwrap();
            (acked, dead, waiting) = (ids[0], ids[1], ids[2]);
        }
        // A torn record at the end: half a header.
        OpenOptions::new().append(true).open(&path).unwrap().write_all(&[9, 0, 0]).unwrap();
        let mut s = QueueState::new(cfg);
        let j = Journal::open(&path, &mut s).unwrap();
        assert!(s.get(acked).is_none());
        let d1 = s.get(dead).unwrap();
        assert_eq!((d1.attempts, d1.last_error.as_deref()), (2, Some("still bad")));
        assert!(matches!(d1.status, Status::Dead { at_us: 50 }));
        let w = s.get(waiting).unwrap();
        assert_eq!((w.attempts, &w.status), (1, &Status::Ready), "a lease does not survive the restart");
        assert_eq!(fs::metadata(&path).unwrap().len(), j.bytes(), "the torn tail was cut");

        // Compaction keeps the same state in fewer bytes.
        let before = j.bytes();
        let mut j = j;
        j.compact(&s).unwrap();
        assert!(j.bytes() < before);
        let mut again = QueueState::new(cfg);
        Journal::open(&path, &mut again).unwrap();
        assert_eq!(again.messages().cloned().collect::<Vec<_>>(), s.messages().cloned().collect::<Vec<_>>());
        fs::remove_dir_all(&d).unwrap();
    }
}
