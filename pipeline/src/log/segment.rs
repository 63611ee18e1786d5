//! One segment file: appending, scanning on open, and reading back.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use events::wire::Buffer;

use super::{LogConfig, Record, SegmentInfo, io};
use crate::Error;

/// Bytes before each record's payload.
pub const RECORD_HEADER: usize = 20;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A telemetry batch, as received.
    Telemetry = 1,
    /// A delivery command from the scheduling edge.
    Command = 2,
    /// A batch of derived delivery events (in the delivery-events log).
    Deliveries = 3,
}

impl RecordKind {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Telemetry),
            2 => Some(Self::Command),
            3 => Some(Self::Deliveries),
            _ => None,
        }
    }
}

/// Outcome of scanning a segment on open.
#[derive(Debug)]
pub(super) enum Scan {
    /// Every record checked out.
    Clean,
    /// The record at `position` is damaged; everything before it is good. `tail` when the
    /// damage reaches the end of the file (what a crash mid-append leaves); otherwise intact
    /// data follows it and it must not be cut away.
    Damaged { position: u64, reason: String, tail: bool },
}

#[derive(Debug)]
pub(super) struct Segment {
    pub(super) path: PathBuf,
    pub(super) base: u64,
    /// One past the last offset.
    pub(super) end: u64,
    pub(super) size: u64,
    pub(super) modified: SystemTime,
    file: File,
    index: Vec<(u64, u64)>,
    last_indexed: u64,
}

pub(super) fn header(kind: RecordKind, offset: u64, payload: &[u8]) -> [u8; RECORD_HEADER] {
    let mut h = [0u8; RECORD_HEADER];
    h[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h[16] = kind as u8;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[8..RECORD_HEADER]), payload);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes a record's header and payload with one `write(2)` (a vectored write), however many
/// more a short write needs.
fn write_both(file: &mut File, header: &[u8], payload: &[u8]) -> std::io::Result<()> {
    let mut parts = [std::io::IoSlice::new(header), std::io::IoSlice::new(payload)];
    let mut parts = &mut parts[..];
    while !parts.is_empty() {
        match file.write_vectored(parts) {
            Ok(0) => return Err(std::io::Error::from(ErrorKind::WriteZero)),
            Ok(n) => std::io::IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Checks a record header; returns (payload length, kind, stored crc).
fn parse_header(h: &[u8; RECORD_HEADER], expected_offset: u64, max: u32) -> Result<(usize, RecordKind, u32), String> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&h[8..16]);
    let offset = u64::from_le_bytes(o);
    if len > max {
        return Err(format!("record length {len} is over the limit of {max}"));
    }
    if offset != expected_offset {
        return Err(format!("record says offset {offset}, expected {expected_offset}"));
    }
    let kind = RecordKind::from_byte(h[16]).ok_or_else(|| format!("unknown record kind {}", h[16]))?;
    if h[17..20] != [0, 0, 0] {
        return Err("reserved record bytes are not zero".into());
    }
    Ok((len as usize, kind, crc))
}

fn check_crc(h: &[u8; RECORD_HEADER], payload: &[u8], stored: u32) -> Result<(), String> {
    let computed = crc32c::crc32c_append(crc32c::crc32c(&h[8..RECORD_HEADER]), payload);
    if computed == stored {
        Ok(())
    } else {
        Err(format!("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"))
    }
}

/// Reads exactly `buf.len()` bytes; Ok(false) on a clean end before the first byte, an error
/// string when the data ends part way.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, std::io::Error> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("torn: {got} of {} bytes", buf.len()),
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl Segment {
    pub(super) fn create(path: &Path, base: u64) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io(format!("creating {}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            base,
            end: base,
            size: 0,
            modified: SystemTime::now(),
            file,
            index: Vec::new(),
            last_indexed: 0,
        })
    }

    /// Opens a segment and checks every record in it.
    pub(super) fn open_and_scan(path: &Path, base: u64, cfg: &LogConfig) -> Result<(Self, Scan), Error> {
        let mut seg = Self::create(path, base)?;
        let meta = seg.file.metadata().map_err(io(format!("reading {}", path.display())))?;
        seg.modified = meta.modified().unwrap_or_else(|_| SystemTime::now());
        let file_len = meta.len();
        let mut reader =
            BufReader::with_capacity(1 << 20, File::open(path).map_err(io(format!("opening {}", path.display())))?);
        let mut payload = Vec::new();
        let mut position = 0u64;
        let scan = loop {
            let mut h = [0u8; RECORD_HEADER];
            match read_full(&mut reader, &mut h) {
                Ok(false) => break Scan::Clean,
                Ok(true) => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    break Scan::Damaged { position, reason: format!("torn record header ({e})"), tail: true };
                }
                Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
            }
            let (len, _kind, crc) = match parse_header(&h, seg.end, cfg.max_record_bytes) {
                Ok(parsed) => parsed,
                Err(reason) => break Scan::Damaged { position, reason, tail: false },
            };
            let record_end = position + (RECORD_HEADER + len) as u64;
            if record_end > file_len {
                let reason = format!("torn record: {len} payload bytes announced, file ends first");
                break Scan::Damaged { position, reason, tail: true };
            }
            payload.resize(len, 0);
            if let Err(e) = reader.read_exact(&mut payload) {
                break Scan::Damaged { position, reason: format!("torn record payload ({e})"), tail: true };
            }
            if let Err(reason) = check_crc(&h, &payload, crc) {
                break Scan::Damaged { position, reason, tail: record_end == file_len };
            }
            seg.note_record(position, cfg.index_interval_bytes);
            position += (RECORD_HEADER + len) as u64;
            seg.end += 1;
        };
        seg.size = position;
        if matches!(scan, Scan::Clean) && position != file_len {
            seg.size = file_len;
        }
        Ok((seg, scan))
    }

    fn note_record(&mut self, position: u64, interval: u64) {
        if self.index.is_empty() || position - self.last_indexed >= interval {
            self.index.push((self.end, position));
            self.last_indexed = position;
        }
    }

    pub(super) fn append(&mut self, kind: RecordKind, payload: &[u8], interval: u64) -> Result<u64, Error> {
        let offset = self.end;
        let h = header(kind, offset, payload);
        let before = self.size;
        let written = write_both(&mut self.file, &h, payload);
        if let Err(e) = written {
            // Leave no partial record behind: the next append must start on a boundary.
            let _ = self.file.set_len(before);
            return Err(if e.kind() == ErrorKind::StorageFull {
                Error::Full(format!("the disk is full ({})", self.path.display()))
            } else {
                io(format!("appending to {}", self.path.display()))(e)
            });
        }
        self.note_record(before, interval);
        self.size += (RECORD_HEADER + payload.len()) as u64;
        self.end += 1;
        Ok(offset)
    }

    /// The file again (a second descriptor), to sync it without holding the segment.
    pub(super) fn clone_file(&self) -> Result<File, Error> {
        self.file.try_clone().map_err(io(format!("opening {} again", self.path.display())))
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn sync(&mut self) -> Result<(), Error> {
        self.file.sync_data().map_err(io(format!("syncing {}", self.path.display())))
    }

    pub(super) fn flush(&mut self) -> Result<(), Error> {
        self.file.flush().map_err(io(format!("flushing {}", self.path.display())))
    }

    /// Cuts the file at `position`; returns the bytes removed.
    pub(super) fn truncate_to(&mut self, position: u64) -> Result<u64, Error> {
        let len = self.file.metadata().map_err(io(format!("reading {}", self.path.display())))?.len();
        self.file.set_len(position).map_err(io(format!("truncating {}", self.path.display())))?;
        self.file.sync_all().map_err(io(format!("syncing {}", self.path.display())))?;
        self.size = position;
        Ok(len.saturating_sub(position))
    }

    /// The indexed record at or before `offset`: its offset and file position.
    pub(super) fn position_of(&self, offset: u64) -> (u64, u64) {
        match self.index.binary_search_by_key(&offset, |&(o, _)| o) {
            Ok(i) => self.index[i],
            Err(0) => (self.base, 0),
            Err(i) => self.index[i - 1],
        }
    }

    pub(super) fn info(&self) -> SegmentInfo {
        SegmentInfo {
            path: self.path.clone(),
            base: self.base,
            end: self.end,
            bytes: self.size,
            index_entries: self.index.len(),
        }
    }
}

/// Read buffer of a segment reader: large enough for sequential reads to cost few syscalls,
/// small enough that a follower opening a reader per wake-up does not map fresh memory each time.
const READ_BUFFER: usize = 128 << 10;

/// Sequential reader over one segment, checking every record.
#[derive(Debug)]
pub(crate) struct SegmentReader {
    path: PathBuf,
    reader: BufReader<File>,
    next: u64,
    end: u64,
    position: u64,
    max_record: u32,
}

impl SegmentReader {
    /// Reads from the record with offset `start` at file `position` up to (not including) `end`.
    pub(super) fn open(path: &Path, start: u64, end: u64, position: u64, max_record: u32) -> Result<Self, Error> {
        let mut file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
        file.seek(SeekFrom::Start(position)).map_err(io(format!("seeking in {}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(READ_BUFFER, file),
            next: start,
            end,
            position,
            max_record,
        })
    }

    /// The file, the next offset and its byte position.
    pub(super) fn resume(&self) -> (&Path, u64, u64) {
        (&self.path, self.next, self.position)
    }

    pub(super) fn next_record(&mut self) -> Result<Option<Record>, Error> {
        if self.next >= self.end {
            return Ok(None);
        }
        let corrupt = |s: &Self, reason: String| Error::Corrupt {
            segment: s.path.clone(),
            position: s.position,
            offset: s.next,
            reason,
        };
        let mut h = [0u8; RECORD_HEADER];
        match read_full(&mut self.reader, &mut h) {
            Ok(true) => {}
            Ok(false) => return Err(corrupt(self, "the segment ends before its last record".into())),
            Err(e) => return Err(corrupt(self, e.to_string())),
        }
        let (len, kind, crc) = parse_header(&h, self.next, self.max_record).map_err(|r| corrupt(self, r))?;
        let mut payload = Buffer::with_capacity(len);
        payload.resize(len, 0);
        self.reader.read_exact(&mut payload).map_err(|e| corrupt(self, format!("torn record payload ({e})")))?;
        check_crc(&h, &payload, crc).map_err(|r| corrupt(self, r))?;
        let record = Record { offset: self.next, kind, payload };
        self.next += 1;
        self.position += (RECORD_HEADER + len) as u64;
        Ok(Some(record))
    }
}
