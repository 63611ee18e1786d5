use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, SystemTime};

use super::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "fleetstream-log-{tag}-{}-{}",
            std::process::id(),
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos()
        ));
        fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn small() -> LogConfig {
    LogConfig { segment_bytes: 1_000, index_interval_bytes: 200, ..LogConfig::default() }
}

fn payload(i: u64) -> Vec<u8> {
    (0..(50 + i % 70)).map(|b| (b as u8) ^ (i as u8)).collect()
}

fn read_all(log: &mut Log, from: u64) -> Vec<(u64, Vec<u8>)> {
    log.reader(from).unwrap().map(|r| r.map(|r| (r.offset, r.payload.to_vec())).unwrap()).collect()
}

#[test]
fn append_roll_reopen_and_seek() {
    let dir = TempDir::new("roll");
    let (mut log, rec) = Log::open(&dir.0, small()).unwrap();
    assert_eq!(rec, Recovery::default());
    for i in 0..100 {
        assert_eq!(log.append(RecordKind::Telemetry, &payload(i)).unwrap(), i);
    }
    log.sync().unwrap();
    assert!(log.segments().len() > 5, "small segments roll: {:?}", log.segments().len());
    let all = read_all(&mut log, 0);
    assert_eq!(all.len(), 100);
    assert!(all.iter().all(|(o, p)| *p == payload(*o)));
    // Seeking into the middle of a segment uses the index and lands on the exact offset.
    let tail = read_all(&mut log, 57);
    assert_eq!(tail.first().unwrap().0, 57);
    assert_eq!(tail.len(), 43);
    assert!(read_all(&mut log, 100).is_empty());
    assert!(matches!(log.reader(101), Err(Error::OutOfRange { requested: 101, first: 0, next: 100 })));
    drop(log);

    let (mut log, rec) = Log::open(&dir.0, small()).unwrap();
    assert_eq!(rec.records, 100);
    assert_eq!(rec.truncated_bytes, 0);
    assert_eq!(log.append(RecordKind::Command, b"next").unwrap(), 100);
    let last = log.reader(100).unwrap().next().unwrap().unwrap();
    assert_eq!((last.offset, last.kind, &last.payload[..]), (100, RecordKind::Command, &b"next"[..]));
}

#[test]
fn a_torn_final_append_is_truncated_and_reported() {
    let dir = TempDir::new("torn");
    let (mut log, _) = Log::open(&dir.0, LogConfig::default()).unwrap();
    for i in 0..10 {
        log.append(RecordKind::Telemetry, &payload(i)).unwrap();
    }
    log.sync().unwrap();
    let seg = log.segments().last().unwrap().path.clone();
    drop(log);
    // Half of an eleventh record, as a crash mid-write leaves it.
    let mut f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
    let h = segment::header(RecordKind::Telemetry, 10, &payload(10));
    f.write_all(&h).unwrap();
    f.write_all(&payload(10)[..20]).unwrap();
    drop(f);

    let (mut log, rec) = Log::open(&dir.0, LogConfig::default()).unwrap();
    assert_eq!(rec.records, 10);
    assert_eq!(rec.truncated_bytes, (RECORD_HEADER + 20) as u64);
    assert!(rec.truncated_reason.unwrap().contains("torn"));
    assert_eq!(log.append(RecordKind::Telemetry, &payload(10)).unwrap(), 10);
    assert_eq!(read_all(&mut log, 0).len(), 11);
}

#[test]
fn corruption_in_a_closed_segment_is_refused_with_its_place() {
    let dir = TempDir::new("corrupt");
    let (mut log, _) = Log::open(&dir.0, small()).unwrap();
    for i in 0..60 {
        log.append(RecordKind::Telemetry, &payload(i)).unwrap();
    }
    log.sync().unwrap();
    let segs = log.segments();
    let victim = segs[1].clone();
    drop(log);
    let mut f = fs::OpenOptions::new().write(true).open(&victim.path).unwrap();
    f.seek(SeekFrom::Start(RECORD_HEADER as u64 + 5)).unwrap();
    f.write_all(&[0xFF]).unwrap();
    drop(f);

    let err = Log::open(&dir.0, small()).unwrap_err();
    match &err {
        Error::Corrupt { segment, offset, reason, .. } => {
            assert_eq!(segment, &victim.path);
            assert_eq!(*offset, victim.base);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected corruption, got {other}"),
    }
    assert!(err.to_string().contains("pipeline inspect"));
    // Everything before the damage is still readable.
    let report = inspect(&dir.0, &small()).unwrap();
    assert_eq!(report.damage.as_ref().unwrap().offset, victim.base);
    assert_eq!(report.readable_records, victim.base);
}

#[test]
fn the_size_cap_refuses_appends_without_writing() {
    let dir = TempDir::new("cap");
    let cfg = LogConfig { max_bytes: 500, ..LogConfig::default() };
    let (mut log, _) = Log::open(&dir.0, cfg).unwrap();
    let mut n = 0;
    let err = loop {
        match log.append(RecordKind::Telemetry, &[7u8; 100]) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::Full(_)), "{err}");
    assert_eq!(n, 4);
    assert_eq!(log.next_offset(), 4);
    assert!(log.total_bytes() <= 500);
    drop(log);
    assert_eq!(Log::open(&dir.0, cfg).unwrap().1.records, 4, "nothing partial was left behind");
}

#[test]
fn retention_waits_for_consumers_and_age() {
    let dir = TempDir::new("retention");
    let cfg = LogConfig { retention_secs: 60, ..small() };
    let (mut log, _) = Log::open(&dir.0, cfg).unwrap();
    for i in 0..60 {
        log.append(RecordKind::Telemetry, &payload(i)).unwrap();
    }
    let before = log.segments().len();
    let now = SystemTime::now();
    assert_eq!(log.enforce_retention(60, now).unwrap(), 0, "too young");
    assert_eq!(log.enforce_retention(0, now + Duration::from_secs(120)).unwrap(), 0, "a consumer still needs them");
    let second_base = log.segments()[1].base;
    assert_eq!(log.enforce_retention(second_base, now + Duration::from_secs(120)).unwrap(), 1);
    assert_eq!(log.segments().len(), before - 1);
    assert_eq!(log.first_offset(), second_base);
    assert!(matches!(log.reader(0), Err(Error::OutOfRange { first, .. }) if first == second_base));
}

#[test]
fn damage_in_the_middle_of_the_last_segment_is_never_truncated() {
    let dir = TempDir::new("mid");
    let (mut log, _) = Log::open(&dir.0, LogConfig::default()).unwrap();
    for i in 0..10 {
        log.append(RecordKind::Telemetry, &payload(i)).unwrap();
    }
    log.sync().unwrap();
    let seg = log.segments()[0].path.clone();
    drop(log);
    let mut bytes = fs::read(&seg).unwrap();
    bytes[RECORD_HEADER + 3] ^= 0x10; // inside the first record's payload; nine intact records follow
    fs::write(&seg, &bytes).unwrap();
    assert!(matches!(Log::open(&dir.0, LogConfig::default()), Err(Error::Corrupt { offset: 0, .. })));
    assert_eq!(fs::read(&seg).unwrap().len(), bytes.len(), "nothing was cut");
    let report = inspect(&dir.0, &LogConfig::default()).unwrap();
    assert!(!report.damage.unwrap().torn_tail);
}

#[test]
fn a_follower_resumes_at_the_exact_position_across_rolls() {
    let dir = TempDir::new("resume");
    let (mut log, _) = Log::open(&dir.0, small()).unwrap();
    let mut seen = Vec::new();
    let mut point: Option<ResumePoint> = None;
    let mut next = 0;
    // Append a few records at a time and read just those, as the engine's followers do.
    for round in 0..40u64 {
        for i in 0..3 {
            log.append(RecordKind::Telemetry, &payload(round * 3 + i)).unwrap();
        }
        let end = log.next_offset();
        let mut reader = log.reader_near(next, point.as_ref()).unwrap().until(end - 1);
        for r in reader.by_ref() {
            let r = r.unwrap();
            seen.push((r.offset, r.payload.to_vec()));
            next = r.offset + 1;
        }
        point = reader.resume_point();
        assert_eq!(point.as_ref().map(ResumePoint::offset), Some(next), "round {round}");
    }
    assert!(log.segments().len() > 5, "the follower crossed segment rolls");
    assert_eq!(seen.len(), 119, "every record but the last, held back by `until`");
    assert!(seen.iter().enumerate().all(|(i, (o, p))| *o == i as u64 && *p == payload(*o)));
    // A hint for another offset is ignored: the reader seeks by the index instead.
    let first = log.reader_near(5, point.as_ref()).unwrap().next().unwrap().unwrap();
    assert_eq!((first.offset, first.payload.to_vec()), (5, payload(5)));
}

#[test]
fn retention_is_sized_from_the_disk_unless_set() {
    const GIB: u64 = 1 << 30;
    // Automatic: half of what the logs could use, three quarters of it for telemetry.
    let auto = RetentionBudget::new(0, 100 * GIB);
    assert_eq!((auto.telemetry, auto.deliveries, auto.too_big), (75 * GIB / 2, 25 * GIB / 2, false));
    // Never below the floor, even on a nearly full disk.
    let tight = RetentionBudget::new(0, GIB / 10);
    assert_eq!((tight.telemetry, tight.deliveries), (MIN_AUTO_RETENTION, MIN_AUTO_RETENTION));
    // Set: used as it is, and flagged when both logs at that size would not fit.
    assert_eq!(
        RetentionBudget::new(10 * GIB, 100 * GIB),
        RetentionBudget { telemetry: 10 * GIB, deliveries: 10 * GIB, too_big: false }
    );
    assert!(RetentionBudget::new(60 * GIB, 100 * GIB).too_big);
    // From a real directory: its filesystem has some free space.
    let dir = TempDir::new("budget");
    let budget = RetentionBudget::for_dir(0, &dir.0, 0).unwrap();
    assert!(budget.telemetry >= MIN_AUTO_RETENTION && budget.telemetry >= budget.deliveries, "{budget:?}");
}
