//! One process per data directory.
//!
//! Two nodes on one data dir would each "recover" the other's logs: the second one's recovery
//! cuts off the record the first is writing, and both logs end up damaged. So a node takes an
//! exclusive advisory lock on `DATA_DIR/LOCK` before it opens anything else there, and holds it
//! for as long as it runs. The kernel drops the lock when the process dies (kill -9 included),
//! so a restart after a crash is never refused by a stale lock; the file keeps the holder's pid
//! only to name it in the refusal.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::Error;

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// The held lock on a data directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock on `dir` (created if missing), or refuses at once with
    /// [`Error::DataDirInUse`] naming the process that holds it. Nothing else in `dir` is
    /// touched either way.
    pub fn acquire(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Io { context: format!("creating data directory {}", dir.display()), source: e })?;
        let path = dir.join(LOCK_FILE);
        let io = |what: &str, e| Error::Io { context: format!("{what} {}", path.display()), source: e };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io("opening", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(Error::DataDirInUse { dir: dir.to_path_buf(), holder: holder.trim().to_string() });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("locking", e)),
        }
        file.set_len(0).map_err(|e| io("writing", e))?;
        file.rewind().map_err(|e| io("writing", e))?;
        writeln!(file, "pid {}", std::process::id()).map_err(|e| io("writing", e))?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_named_until_the_first_lets_go() -> Result<(), Error> {
        let dir = std::env::temp_dir().join(format!("fleetstream-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = DataDirLock::acquire(&dir)?;
        // A second open file description is a second holder, as another process would be.
        match DataDirLock::acquire(&dir) {
            Err(Error::DataDirInUse { holder, .. }) => {
                assert_eq!(holder, format!("pid {}", std::process::id()));
            }
            other => panic!("expected DataDirInUse, got {other:?}"),
        }
        drop(first);
        let again = DataDirLock::acquire(&dir)?;
        assert!(again.path().ends_with(LOCK_FILE));
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
