//! Shard checkpoints: a shard's derive state together with the log offset it covers.
//!
//! A shard writes one periodically; on restart it restores the state and the engine replays
//! the log after the offset, so the shard ends where it would have been without the restart
//! and derives the same events. Files are written whole or not at all (temporary file, fsync,
//! rename, directory fsync) and carry a CRC, so a crash mid-write leaves the previous one.
//!
//! File layout: magic `FSCP`, version u8 (2; 1 is still read), 3 reserved, shard u32, shards u32, offset u64,
//! body length u32, CRC-32C u32 of the body, then an rkyv archive of [`DeriverState`].

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use events::wire::Buffer;
use rkyv::rancor;

use crate::Error;
use crate::derive::DeriverState;
use crate::log::{io, sync_dir};

const MAGIC: [u8; 4] = *b"FSCP";
/// Version 2 added earlier drop-offs to the state; version 1 files are still read.
const VERSION: u8 = 2;
const HEADER: usize = 32;

/// A shard's state as of a log offset.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The shard.
    pub shard: u32,
    /// How many shards the engine had (a checkpoint is only valid for the same count).
    pub shards: u32,
    /// Every log record up to and including this offset is reflected in `state`.
    pub offset: u64,
    /// The derive state.
    pub state: DeriverState,
}

/// Path of a shard's checkpoint in `dir`.
pub fn path(dir: &Path, shard: u32) -> PathBuf {
    dir.join(format!("shard-{shard:04}.ckpt"))
}

/// A checkpoint's bytes: the file layout above, also what a JetStream KV entry holds.
pub fn encode(ckpt: &Checkpoint) -> Result<Vec<u8>, Error> {
    let body = rkyv::to_bytes::<rancor::Error>(&ckpt.state).map_err(|e| Error::Io {
        context: "encoding a checkpoint".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    out.extend_from_slice(&ckpt.shard.to_le_bytes());
    out.extend_from_slice(&ckpt.shards.to_le_bytes());
    out.extend_from_slice(&ckpt.offset.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads checkpoint bytes back; `origin` names where they came from in errors.
pub fn decode(bytes: &[u8], origin: &Path) -> Result<Checkpoint, Error> {
    let bad = |reason: &str| Error::Corrupt {
        segment: origin.to_path_buf(),
        position: 0,
        offset: 0,
        reason: reason.to_string(),
    };
    if bytes.len() < HEADER || bytes[0..4] != MAGIC {
        return Err(bad("not a checkpoint"));
    }
    let version = bytes[4];
    if version != VERSION && version != 1 {
        return Err(bad("unknown checkpoint version"));
    }
    let u32_at = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&bytes[16..24]);
    let len = u32_at(24) as usize;
    if bytes.len() != HEADER + len {
        return Err(bad("checkpoint length does not match its header"));
    }
    if crc32c::crc32c(&bytes[HEADER..]) != u32_at(28) {
        return Err(bad("checkpoint checksum mismatch"));
    }
    let mut body = Buffer::with_capacity(len);
    body.extend_from_slice(&bytes[HEADER..]);
    let invalid = |e: rancor::Error| bad(&format!("invalid checkpoint: {e}"));
    let state = if version == 1 {
        rkyv::from_bytes::<crate::derive::DeriverStateV1, rancor::Error>(&body).map_err(invalid)?.into()
    } else {
        rkyv::from_bytes::<DeriverState, rancor::Error>(&body).map_err(invalid)?
    };
    Ok(Checkpoint { shard: u32_at(8), shards: u32_at(12), offset: u64::from_le_bytes(o), state })
}

/// Writes a checkpoint atomically.
pub fn write(dir: &Path, ckpt: &Checkpoint) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let out = encode(ckpt)?;
    let final_path = path(dir, ckpt.shard);
    let tmp = final_path.with_extension("ckpt.tmp");
    let mut f = fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    f.write_all(&out).and_then(|()| f.sync_all()).map_err(io(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, &final_path).map_err(io(format!("renaming {}", tmp.display())))?;
    sync_dir(dir)
}

/// Reads a shard's checkpoint; `Ok(None)` when there is none.
pub fn read(dir: &Path, shard: u32) -> Result<Option<Checkpoint>, Error> {
    let p = path(dir, shard);
    match fs::read(&p) {
        Ok(bytes) => decode(&bytes, &p).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(format!("reading {}", p.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derive::{DeriveConfig, Deriver};

    #[test]
    fn write_read_and_detect_damage() {
        let dir = std::env::temp_dir().join(format!("fleetstream-ckpt-{}", std::process::id()));
        assert_eq!(read(&dir, 0).unwrap(), None);
        let mut d = Deriver::new(DeriveConfig::default());
        let mut out = Vec::new();
        d.on_command(
            &events::DeliveryCommand::Create {
                delivery_id: 5,
                drone_id: 9,
                pickup: events::GeoPoint::new(1.0, 2.0),
                dropoff: events::GeoPoint::new(1.0, 2.1),
                ts_us: 3,
            },
            3,
            &mut out,
        )
        .unwrap();
        let ckpt = Checkpoint { shard: 0, shards: 2, offset: 41, state: d.snapshot() };
        write(&dir, &ckpt).unwrap();
        assert_eq!(read(&dir, 0).unwrap(), Some(ckpt));
        let p = path(&dir, 0);
        let mut bytes = fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&p, bytes).unwrap();
        assert!(matches!(read(&dir, 0), Err(Error::Corrupt { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_version_1_checkpoint_is_still_read() {
        let v1 = crate::derive::DeriverStateV1::default();
        let body = rkyv::to_bytes::<rancor::Error>(&v1).unwrap();
        let mut bytes = encode(&Checkpoint { shard: 1, shards: 2, offset: 7, state: DeriverState::default() }).unwrap();
        bytes.truncate(HEADER);
        bytes[4] = 1;
        bytes[24..28].copy_from_slice(&(body.len() as u32).to_le_bytes());
        bytes[28..32].copy_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let read = decode(&bytes, Path::new("v1")).unwrap();
        assert_eq!((read.shard, read.offset, read.state), (1, 7, DeriverState::from(v1)));
        bytes[4] = 3;
        assert!(decode(&bytes, Path::new("v3")).is_err(), "a later version is refused");
    }
}
