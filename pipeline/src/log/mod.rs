//! The local durable log: the embedded default for keeping every accepted batch.
//!
//! An append-only sequence of records, each one accepted batch stored as the bytes it arrived in
//! (or one delivery command), numbered by a dense offset. The log is split into segment files
//! named by the first offset they hold (`00000000000000000000.log`); a segment is closed when it
//! passes `segment_bytes` and a new one begins. Each segment keeps a sparse in-memory index
//! (offset → file position, one entry per `index_interval_bytes`) so a reader can start at any
//! offset without scanning from the start.
//!
//! Record layout (little-endian):
//!
//! | bytes | field |
//! |---:|---|
//! | 0..4 | payload length |
//! | 4..8 | CRC-32C of bytes 8..20 and the payload |
//! | 8..16 | offset |
//! | 16 | kind: 1 telemetry batch, 2 delivery command, 3 derived delivery events |
//! | 17..20 | reserved, zero |
//! | 20.. | payload |
//!
//! Durability is the caller's choice of when to call [`Log::sync`]; the appender stage calls it
//! once per group of appends (group commit). On open, every record is read back and checked: a
//! torn record at the very end of the last segment is what a crash mid-append leaves (it was
//! never acknowledged), and is truncated away and reported; damage with intact data after it,
//! in any segment, is refused with an error naming the segment and offset, never cut away, and
//! everything before it stays readable ([`inspect`]).

mod segment;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use events::wire::Buffer;
use serde::{Deserialize, Serialize};

pub use segment::{RECORD_HEADER, RecordKind};
use segment::{Scan, Segment};

/// When appended records are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// After every group of appends, before any of them is acknowledged (group commit): an
    /// acknowledged batch survives a power cut. The default.
    EveryBatch,
    /// At most every `fsync_interval_ms`; acknowledgements do not wait. A crash of the machine
    /// (not just the process) can lose that much acknowledged data.
    Interval,
    /// Never; the operating system writes back when it likes. For benchmarks and throwaway data.
    None,
}

/// Settings of the durable log.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Where the log lives. Default `embedded`: segment files under `data_dir/log`, one node.
    /// `jetstream`: NATS JetStream holds the topics, shard leases and checkpoints, so several
    /// nodes share the shards (see [`crate::cluster`] and `[jetstream]`); the fsync and segment
    /// settings below then do not apply.
    pub backend: LogBackend,
    /// Close a segment once it holds this many bytes. Default 128 MiB: few enough files for a
    /// day of traffic at full rate, small enough that retention frees space in useful steps.
    pub segment_bytes: u64,
    /// When to fsync. Default `every_batch`, the only policy under which an acknowledgement
    /// means the data survives a power cut.
    pub fsync: FsyncPolicy,
    /// Interval for `fsync = "interval"`, ms. Default 50.
    pub fsync_interval_ms: u64,
    /// Refuse appends (typed "storage full") once the log would exceed this many bytes; 0 means
    /// no cap beyond the disk itself. Default 0.
    pub max_bytes: u64,
    /// Delete closed segments older than this once every consumer is past them, seconds.
    /// Default 86,400 (one day of history for replay).
    pub retention_secs: u64,
    /// ... or once the log is larger than this, bytes. Default 0: sized at start from the disk
    /// the data directory is on, so a node left running at full rate cannot fill it: half of
    /// what the logs could use (the free space plus what they hold already), three quarters of
    /// that for telemetry and a quarter for delivery events ([`RetentionBudget`]). A value set
    /// here is used as it is, with a warning at start when both logs at that size would not
    /// fit on the disk.
    pub retention_bytes: u64,
    /// One index entry per this many bytes of records. Default 64 KiB: a seek reads at most
    /// that much before it reaches the wanted offset.
    pub index_interval_bytes: u64,
    /// Largest record accepted when reading back, bytes (guards recovery against a corrupt
    /// length). Default 64 MiB.
    pub max_record_bytes: u32,
}

/// Where the engine's log lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogBackend {
    /// Segment files in the data directory.
    #[default]
    Embedded,
    /// NATS JetStream.
    Jetstream,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            backend: LogBackend::Embedded,
            segment_bytes: 128 << 20,
            fsync: FsyncPolicy::EveryBatch,
            fsync_interval_ms: 50,
            max_bytes: 0,
            retention_secs: 86_400,
            retention_bytes: 0,
            index_interval_bytes: 64 << 10,
            max_record_bytes: 64 << 20,
        }
    }
}

use crate::Error;

/// The two embedded logs' size limits, from `[log] retention_bytes` and the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionBudget {
    /// The telemetry (input) log's `retention_bytes`.
    pub telemetry: u64,
    /// The delivery-events log's.
    pub deliveries: u64,
    /// The configured retention would not fit: both logs at that size exceed the disk.
    pub too_big: bool,
}

/// Smallest automatic retention per log: below it a log keeps too little to replay from.
pub const MIN_AUTO_RETENTION: u64 = 256 << 20;

impl RetentionBudget {
    /// The limits for `configured` (0: automatic) with `usable` bytes the logs could use: the
    /// filesystem's free space plus what the logs hold already.
    pub fn new(configured: u64, usable: u64) -> Self {
        if configured == 0 {
            let half = usable / 2;
            return Self {
                telemetry: (half / 4 * 3).max(MIN_AUTO_RETENTION),
                deliveries: (half / 4).max(MIN_AUTO_RETENTION),
                too_big: false,
            };
        }
        Self { telemetry: configured, deliveries: configured, too_big: configured.saturating_mul(2) > usable }
    }

    /// The budget for the logs under `data_dir` (whose current size is `held`), from its
    /// filesystem's free space.
    pub fn for_dir(configured: u64, data_dir: &Path, held: u64) -> Result<Self, Error> {
        let fs = rustix::fs::statvfs(data_dir)
            .map_err(|e| Error::Io { context: format!("free space of {}", data_dir.display()), source: e.into() })?;
        let free = fs.f_bavail.saturating_mul(fs.f_frsize);
        Ok(Self::new(configured, free.saturating_add(held)))
    }
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// What opening the log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segments found.
    pub segments: usize,
    /// Records found intact.
    pub records: u64,
    /// Bytes cut from the end of the last segment (a torn final append).
    pub truncated_bytes: u64,
    /// Why they were cut.
    pub truncated_reason: Option<String>,
}

/// One record read back.
#[derive(Debug)]
pub struct Record {
    /// Its offset.
    pub offset: u64,
    /// What it holds.
    pub kind: RecordKind,
    /// The payload, aligned so a batch can be validated and read in place.
    pub payload: Buffer,
}

/// Summary of one segment, for `pipeline inspect` and retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The file.
    pub path: PathBuf,
    /// First offset.
    pub base: u64,
    /// One past the last offset.
    pub end: u64,
    /// Bytes.
    pub bytes: u64,
    /// Index entries.
    pub index_entries: usize,
}

/// The log. One writer; readers open their own file handles.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    cfg: LogConfig,
    closed: Vec<Segment>,
    active: Segment,
    total_bytes: u64,
    /// Fault injection: what becomes of every sync from the moment it is set.
    fault: Option<DiskFault>,
}

/// A broken or slow disk, injected so the failure paths and the backpressure behind the log
/// can be exercised on a healthy one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFault {
    /// Every sync fails, as a dying disk's would.
    FailingSyncs,
    /// Every sync takes this much longer, as an overloaded or throttled disk's does.
    SlowSyncs(std::time::Duration),
}

impl Log {
    /// Opens (or creates) the log in `dir`, checking every record. See the module docs for what
    /// happens to damaged records.
    pub fn open(dir: &Path, cfg: LogConfig) -> Result<(Self, Recovery), Error> {
        fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut bases = Vec::new();
        for entry in fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))? {
            let entry = entry.map_err(io(format!("listing {}", dir.display())))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(base) = name.strip_suffix(".log").and_then(|b| b.parse::<u64>().ok()) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let mut recovery = Recovery { segments: bases.len(), ..Recovery::default() };
        let mut closed = Vec::new();
        let mut expected = bases.first().copied().unwrap_or(0);
        for (i, &base) in bases.iter().enumerate() {
            let last = i + 1 == bases.len();
            let path = segment_path(dir, base);
            if base != expected {
                return Err(Error::Corrupt {
                    segment: path,
                    position: 0,
                    offset: expected,
                    reason: format!("segment starts at offset {base}, expected {expected}: a segment is missing"),
                });
            }
            let (mut seg, scan) = Segment::open_and_scan(&path, base, &cfg)?;
            recovery.records += seg.end - seg.base;
            if let Scan::Damaged { position, reason, tail } = scan {
                if last && tail {
                    let cut = seg.truncate_to(position)?;
                    recovery.truncated_bytes = cut;
                    recovery.truncated_reason = Some(reason);
                } else {
                    return Err(Error::Corrupt { segment: path, position, offset: seg.end, reason });
                }
            }
            expected = seg.end;
            closed.push(seg);
        }
        let active = match closed.pop() {
            Some(seg) => seg,
            None => Segment::create(&segment_path(dir, 0), 0)?,
        };
        let total_bytes = closed.iter().map(|s| s.size).sum::<u64>() + active.size;
        Ok((Self { dir: dir.to_path_buf(), cfg, closed, active, total_bytes, fault: None }, recovery))
    }

    /// Appends one record (not yet durable: see [`Log::sync`]) and returns its offset.
    pub fn append(&mut self, kind: RecordKind, payload: &[u8]) -> Result<u64, Error> {
        let len = (RECORD_HEADER + payload.len()) as u64;
        if self.cfg.max_bytes > 0 && self.total_bytes + len > self.cfg.max_bytes {
            return Err(Error::Full(format!("the log would exceed its cap of {} bytes", self.cfg.max_bytes)));
        }
        if self.active.size >= self.cfg.segment_bytes && self.active.end > self.active.base {
            self.roll()?;
        }
        let offset = self.active.append(kind, payload, self.cfg.index_interval_bytes)?;
        self.total_bytes += len;
        Ok(offset)
    }

    /// Forces everything appended so far to disk.
    pub fn sync(&mut self) -> Result<(), Error> {
        match self.fault {
            Some(DiskFault::FailingSyncs) => {
                return Err(Error::Io {
                    context: format!("syncing {}", self.dir.display()),
                    source: std::io::Error::other("injected failure"),
                });
            }
            Some(DiskFault::SlowSyncs(delay)) => std::thread::sleep(delay),
            None => {}
        }
        self.active.sync()
    }

    /// A handle that makes everything appended so far durable without holding the log, so the
    /// writer can go on appending during the fsync. Records appended later may or may not be
    /// covered; earlier segments were synced when they were closed.
    pub fn sync_handle(&self) -> Result<SyncHandle, Error> {
        let delay = match self.fault {
            Some(DiskFault::FailingSyncs) => {
                return Ok(SyncHandle { file: None, path: self.dir.clone(), delay: std::time::Duration::ZERO });
            }
            Some(DiskFault::SlowSyncs(delay)) => delay,
            None => std::time::Duration::ZERO,
        };
        Ok(SyncHandle { file: Some(self.active.clone_file()?), path: self.active.path().to_path_buf(), delay })
    }

    /// Fault injection: from now on every [`Log::sync`] fails as a broken disk's would, so the
    /// failure paths of the log's writers can be exercised.
    #[doc(hidden)]
    pub fn fail_syncs(&mut self) {
        self.inject(DiskFault::FailingSyncs);
    }

    /// Fault injection: from now on every sync behaves as `fault` says.
    #[doc(hidden)]
    pub fn inject(&mut self, fault: DiskFault) {
        self.fault = Some(fault);
    }

    /// Offset the next append gets.
    pub fn next_offset(&self) -> u64 {
        self.active.end
    }

    /// First offset still held.
    pub fn first_offset(&self) -> u64 {
        self.closed.first().map_or(self.active.base, |s| s.base)
    }

    /// Total bytes on disk.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Sets how large the log may grow before retention deletes its oldest closed segments
    /// (see [`LogConfig::retention_bytes`] and [`RetentionBudget`]).
    pub fn set_retention_bytes(&mut self, bytes: u64) {
        self.cfg.retention_bytes = bytes;
    }

    /// Segment summaries, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.closed.iter().chain(std::iter::once(&self.active)).map(Segment::info).collect()
    }

    /// A reader from `from` to the end as it is now (records appended later are not seen).
    pub fn reader(&mut self, from: u64) -> Result<LogReader, Error> {
        self.reader_at(from, None)
    }

    /// A reader from `from` that starts at `hint`'s exact file position when the hint is where an
    /// earlier reader stopped at `from` ([`LogReader::resume_point`]), instead of at the nearest
    /// index entry before it: a follower that wakes for every few new records reads only those.
    pub fn reader_near(&mut self, from: u64, hint: Option<&ResumePoint>) -> Result<LogReader, Error> {
        self.reader_at(from, hint.filter(|p| p.offset == from))
    }

    fn reader_at(&mut self, from: u64, point: Option<&ResumePoint>) -> Result<LogReader, Error> {
        let (first, next) = (self.first_offset(), self.next_offset());
        if from < first || from > next {
            return Err(Error::OutOfRange { requested: from, first, next });
        }
        self.active.flush()?;
        let plan = self
            .closed
            .iter()
            .chain(std::iter::once(&self.active))
            .filter(|s| s.end > from)
            .map(|s| {
                let (start, position) = match point {
                    Some(p) if p.path == s.path && p.offset >= s.base => (p.offset, p.position),
                    _ => s.position_of(from),
                };
                (s.path.clone(), start, s.end, position)
            })
            .collect();
        Ok(LogReader {
            plan,
            current: None,
            next: from,
            end: next,
            max_record: self.cfg.max_record_bytes,
            resume: point.cloned(),
        })
    }

    /// Deletes closed segments that every consumer has passed (`keep_from`: the lowest offset
    /// still needed) and that retention no longer requires. Returns how many were deleted.
    pub fn enforce_retention(&mut self, keep_from: u64, now: SystemTime) -> Result<usize, Error> {
        let mut removed = 0;
        while let Some(oldest) = self.closed.first() {
            let passed = oldest.end <= keep_from;
            let too_old = now.duration_since(oldest.modified).is_ok_and(|age| age.as_secs() >= self.cfg.retention_secs);
            // 0 on a log opened on its own (not through the engine, which sizes it): no limit.
            let too_big = self.cfg.retention_bytes > 0 && self.total_bytes > self.cfg.retention_bytes;
            if !(passed && (too_old || too_big)) {
                break;
            }
            let seg = self.closed.remove(0);
            fs::remove_file(&seg.path).map_err(io(format!("deleting {}", seg.path.display())))?;
            self.total_bytes -= seg.size;
            removed += 1;
        }
        Ok(removed)
    }

    fn roll(&mut self) -> Result<(), Error> {
        self.active.sync()?;
        let base = self.active.end;
        let next = Segment::create(&segment_path(&self.dir, base), base)?;
        let done = std::mem::replace(&mut self.active, next);
        self.closed.push(done);
        sync_dir(&self.dir)
    }
}

/// Syncs a log's records appended before the handle was taken; see [`Log::sync_handle`].
#[derive(Debug)]
pub struct SyncHandle {
    /// The active segment's file (`None`: syncs fail, by fault injection).
    file: Option<fs::File>,
    path: PathBuf,
    /// Added before the sync (fault injection: a slow disk).
    delay: std::time::Duration,
}

impl SyncHandle {
    /// Forces the records to disk.
    pub fn sync(&self) -> Result<(), Error> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        match &self.file {
            Some(file) => file.sync_data().map_err(io(format!("syncing {}", self.path.display()))),
            None => Err(Error::Io {
                context: format!("syncing {}", self.path.display()),
                source: std::io::Error::other("injected failure"),
            }),
        }
    }
}

/// Reads records in order; see [`Log::reader`].
#[derive(Debug)]
pub struct LogReader {
    plan: std::collections::VecDeque<(PathBuf, u64, u64, u64)>,
    current: Option<segment::SegmentReader>,
    next: u64,
    end: u64,
    max_record: u32,
    resume: Option<ResumePoint>,
}

/// Where a reader stopped: the next offset and its place in a segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    path: PathBuf,
    offset: u64,
    position: u64,
}

impl ResumePoint {
    fn of(reader: &segment::SegmentReader) -> Self {
        let (path, offset, position) = reader.resume();
        Self { path: path.to_path_buf(), offset, position }
    }

    /// The offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl LogReader {
    /// Stops the reader before offset `end`.
    pub fn until(mut self, end: u64) -> Self {
        self.end = self.end.min(end);
        self
    }

    /// Where the next record is, once at least one record has been read (or the reader was
    /// made from a matching hint by [`Log::reader_near`]). Built on demand, so reading costs nothing extra.
    pub fn resume_point(&self) -> Option<ResumePoint> {
        match &self.current {
            Some(reader) => Some(ResumePoint::of(reader)),
            None => self.resume.clone(),
        }
    }
}

impl Iterator for LogReader {
    type Item = Result<Record, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.next >= self.end {
                return None;
            }
            if self.current.is_none() {
                let (path, base, end, position) = self.plan.pop_front()?;
                match segment::SegmentReader::open(&path, base, end, position, self.max_record) {
                    Ok(r) => self.current = Some(r),
                    Err(e) => return Some(Err(e)),
                }
            }
            let reader = self.current.as_mut()?;
            match reader.next_record() {
                Ok(Some(record)) if record.offset < self.next => continue,
                Ok(Some(record)) => {
                    self.next = record.offset + 1;
                    return Some(Ok(record));
                }
                Ok(None) => {
                    self.resume = Some(ResumePoint::of(reader));
                    self.current = None;
                }
                Err(e) => {
                    self.end = 0;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Where `inspect` found the first damage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub segment: PathBuf,
    /// Byte position of the damaged record.
    pub position: u64,
    /// Its offset.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
    /// Whether it is the torn end of the last segment (which recovery truncates) rather than
    /// damage to data that was once complete.
    pub torn_tail: bool,
}

/// What `pipeline inspect` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectReport {
    /// Every segment, oldest first, as far as it could be read.
    pub segments: Vec<SegmentInfo>,
    /// Records readable before the first damage.
    pub readable_records: u64,
    /// The first damage, if any.
    pub damage: Option<Damage>,
}

/// Reads every segment in `dir` and checks every record, changing nothing.
pub fn inspect(dir: &Path, cfg: &LogConfig) -> Result<InspectReport, Error> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))? {
        let name = entry.map_err(io(format!("listing {}", dir.display())))?.file_name();
        if let Some(base) = name.to_string_lossy().strip_suffix(".log").and_then(|b| b.parse::<u64>().ok()) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    let mut report = InspectReport { segments: Vec::new(), readable_records: 0, damage: None };
    for (i, &base) in bases.iter().enumerate() {
        let path = segment_path(dir, base);
        let (seg, scan) = Segment::open_and_scan(&path, base, cfg)?;
        if report.damage.is_none() {
            report.readable_records += seg.end - seg.base;
            if let Scan::Damaged { position, reason, tail } = scan {
                report.damage = Some(Damage {
                    segment: path,
                    position,
                    offset: seg.end,
                    reason,
                    torn_tail: tail && i + 1 == bases.len(),
                });
            }
        }
        report.segments.push(seg.info());
    }
    Ok(report)
}

/// What [`repair`] cut away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// The first offset no longer in the log: the damaged record's.
    pub from_offset: u64,
    /// The offset the log had reached before the cut (records of later segments included).
    pub to_offset: u64,
    /// Intact records after the damage that went with the cut (they followed a hole).
    pub intact_records_cut: u64,
    /// Files holding every byte cut away, for whoever wants to dig.
    pub side_files: Vec<PathBuf>,
    /// What was wrong with the damaged record.
    pub reason: String,
}

/// Cuts the log in `dir` at its first damaged record, when asked explicitly (`pipeline
/// inspect --repair`): the damaged segment is truncated there and later segments are moved
/// aside, every cut byte kept in a side file (`<segment>.cut-<unix seconds>`) next to it.
/// `None` when nothing is damaged. Offsets from the damaged record on are lost to the log:
/// producers that still hold those batches re-send them, the rest is gone, and the report
/// says how much.
pub fn repair(dir: &Path, cfg: &LogConfig) -> Result<Option<Repair>, Error> {
    let report = inspect(dir, cfg)?;
    let Some(damage) = report.damage else { return Ok(None) };
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let side = |path: &Path| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".cut-{stamp}"));
        PathBuf::from(name)
    };
    let mut side_files = Vec::new();
    // The damaged segment's bytes from the damage on go to a side file, then it is cut.
    let bytes = fs::read(&damage.segment).map_err(io(format!("reading {}", damage.segment.display())))?;
    let cut_at = usize::try_from(damage.position).unwrap_or(bytes.len()).min(bytes.len());
    let kept = side(&damage.segment);
    fs::write(&kept, &bytes[cut_at..]).map_err(io(format!("writing {}", kept.display())))?;
    fs::File::open(&kept).and_then(|f| f.sync_all()).map_err(io(format!("syncing {}", kept.display())))?;
    side_files.push(kept);
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&damage.segment)
        .map_err(io(format!("opening {}", damage.segment.display())))?;
    file.set_len(damage.position).map_err(io(format!("truncating {}", damage.segment.display())))?;
    file.sync_all().map_err(io(format!("syncing {}", damage.segment.display())))?;
    // Later segments follow a hole: they are moved aside whole.
    let mut intact_records_cut = 0;
    let mut to_offset = damage.offset;
    for seg in report.segments.iter().filter(|s| s.path != damage.segment && s.base > damage.offset) {
        intact_records_cut += seg.end - seg.base;
        to_offset = to_offset.max(seg.end);
        let aside = side(&seg.path);
        fs::rename(&seg.path, &aside).map_err(io(format!("moving {} aside", seg.path.display())))?;
        side_files.push(aside);
    }
    sync_dir(dir)?;
    Ok(Some(Repair { from_offset: damage.offset, to_offset, intact_records_cut, side_files, reason: damage.reason }))
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// Makes a file creation or rename in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("syncing directory {}", dir.display())))
}

#[cfg(test)]
mod tests;
