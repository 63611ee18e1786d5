//! The engine on the durable log: acknowledgement after append, dedup, restart from
//! checkpoints, replay after a crash, and a full disk.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

use std::path::{Path, PathBuf};
use std::time::Duration;

use events::wire::Buffer;
use events::{
    BatchMeta, BatchSink, DeliveryCommand, DeliveryStage, DroneEvent, DroneEventKind, Error, FleetControl,
    FlightStatus, GeoPoint, Overflow, StartAt, StreamSource, TelemetryBatch,
};
use pipeline::engine::{StartReport, Storage};
use pipeline::log::{FsyncPolicy, LogConfig};
use pipeline::{Engine, EngineConfig};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("fleetstream-durable-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const PICKUP: GeoPoint = GeoPoint::new(47.60, -122.33);
const DROPOFF: GeoPoint = GeoPoint::new(47.62, -122.35);

fn cfg() -> EngineConfig {
    EngineConfig { shards: 2, checkpoint_interval_ms: 20, ..EngineConfig::default() }
}

fn durable(dir: &Path, log: LogConfig) -> Storage {
    Storage::Durable { dir: dir.to_path_buf(), log }
}

fn start(dir: &Path, log: LogConfig) -> (Engine, pipeline::engine::EngineThreads, StartReport) {
    Engine::start(cfg(), durable(dir, log)).unwrap()
}

fn ev(drone_id: u64, seq: u64, at: GeoPoint, kind: DroneEventKind) -> DroneEvent {
    DroneEvent {
        drone_id,
        seq,
        ts_us: 1_000 + seq,
        position: at,
        speed_mps: 10.0,
        heading_deg: 0.0,
        battery_pct: 90.0,
        status: FlightStatus::Flying,
        kind,
    }
}

fn batch(producer: u64, seq: u64, events: &[DroneEvent]) -> TelemetryBatch {
    TelemetryBatch::encode(
        BatchMeta { producer_id: producer, batch_seq: seq, ..BatchMeta::default() },
        events,
        Buffer::new(),
    )
    .unwrap()
}

async fn submit(engine: &Engine, b: TelemetryBatch) -> Result<(), Error> {
    engine.submit(b).await?.await
}

fn create(delivery_id: u64, drone_id: u64) -> DeliveryCommand {
    DeliveryCommand::Create { delivery_id, drone_id, pickup: PICKUP, dropoff: DROPOFF, ts_us: 500 }
}

/// Collects delivery events until `n` have arrived.
async fn collect(sub: &events::Subscription<events::DeliveryEvent>, n: usize) -> Vec<(u64, u32, DeliveryStage)> {
    let mut got = Vec::new();
    while got.len() < n {
        let b = tokio::time::timeout(Duration::from_secs(10), sub.rx.recv_async()).await.unwrap().unwrap();
        got.extend(b.events().iter().map(|e| (e.delivery_id.to_native(), e.seq.to_native(), e.stage.to_stage())));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_checkpoints_and_derives_the_rest() {
    let dir = TempDir::new("restart");
    let (engine, threads, report) = start(&dir.0, LogConfig::default());
    assert_eq!(report.next_offset, 0);
    let sub = engine.subscribe_deliveries(Overflow::Block).unwrap();
    engine.command(create(10, 1)).await.unwrap();
    submit(&engine, batch(7, 0, &[ev(1, 1, PICKUP, DroneEventKind::PickedUp { delivery: 10 })])).await.unwrap();
    let first = collect(&sub, 3).await;
    assert_eq!(
        first.iter().map(|e| e.2).collect::<Vec<_>>(),
        [DeliveryStage::Created, DeliveryStage::HeadedToPickup, DeliveryStage::InTransit]
    );
    engine.shutdown(threads).await;

    let (engine, threads, report) = start(&dir.0, LogConfig::default());
    assert_eq!(report.next_offset, 2, "a command and a batch were logged");
    assert_eq!(report.restored_shards, 2);
    assert_eq!(report.replayed, 0, "clean shutdown checkpointed everything");
    let sub = engine.subscribe_deliveries(Overflow::Block).unwrap();
    // The same batch again (a producer re-sending after a reconnect) is acknowledged, not applied.
    submit(&engine, batch(7, 0, &[ev(1, 1, PICKUP, DroneEventKind::PickedUp { delivery: 10 })])).await.unwrap();
    assert_eq!(engine.metrics().duplicate_batches.load(std::sync::atomic::Ordering::Relaxed), 1);
    submit(&engine, batch(7, 1, &[ev(1, 2, DROPOFF, DroneEventKind::DroppedOff { delivery: 10 })])).await.unwrap();
    assert_eq!(collect(&sub, 1).await, vec![(10, 3, DeliveryStage::DeliveryComplete)]);
    let drone = engine.drone(1).await.unwrap().unwrap();
    assert_eq!((drone.last_seq, drone.delivery), (2, None));
    engine.shutdown(threads).await;
}

/// A copy of the data directory taken while the engine runs is what a crash leaves behind.
/// Starting from it replays the log after the checkpoints and ends in the same state, deriving
/// the same events (same ids) for everything after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_a_crash_derives_the_same_events() {
    let dir = TempDir::new("crash");
    let (engine, threads, _) = start(&dir.0, LogConfig::default());
    let sub = engine.subscribe_deliveries(Overflow::Block).unwrap();
    let drones = 20u64;
    for d in 0..drones {
        engine.command(create(100 + d, d)).await.unwrap();
    }
    let mut seq = 0;
    let round = |engine: Engine, r: u64| async move {
        let events: Vec<_> = (0..drones)
            .map(|d| {
                let kind = match r {
                    3 => DroneEventKind::PickedUp { delivery: 100 + d },
                    8 => DroneEventKind::DroppedOff { delivery: 100 + d },
                    _ => DroneEventKind::Position,
                };
                ev(d, r + 1, if r >= 8 { DROPOFF } else { PICKUP }, kind)
            })
            .collect();
        submit(&engine, batch(1, r, &events)).await.unwrap();
    };
    for r in 0..5 {
        round(engine.clone(), r).await;
        seq += 1;
    }
    tokio::time::sleep(Duration::from_millis(60)).await; // let the shards checkpoint
    for r in 5..7 {
        round(engine.clone(), r).await;
    }
    let crashed = TempDir::new("crash-copy");
    copy_dir(&dir.0, &crashed.0);
    for r in 7..10 {
        round(engine.clone(), r).await;
    }
    let all = collect(&sub, (drones * 4) as usize).await;
    engine.shutdown(threads).await;
    assert_eq!(seq, 5);

    // Recover from the copy, then send what came after it again, as producers would.
    let (engine, threads, report) = start(&crashed.0, LogConfig::default());
    assert_eq!(report.next_offset, drones + 7);
    assert!(report.replayed >= 1, "the batches after the checkpoint were replayed: {report:?}");
    assert_eq!(engine.drone(0).await.unwrap().unwrap().last_seq, 7, "replay applied everything up to round 6");
    let sub = engine.subscribe_deliveries(Overflow::Block).unwrap();
    for r in 5..10 {
        round(engine.clone(), r).await; // 5 and 6 are duplicates of logged batches
    }
    // Replay is applied by the shards after start returns, so the subscription may also see
    // events re-derived from records after the checkpoint: wait for the completions.
    let mut after = Vec::new();
    while after.len() < drones as usize {
        after.extend(collect(&sub, 1).await.into_iter().filter(|e| e.2 == DeliveryStage::DeliveryComplete));
    }
    let expected: Vec<_> = all.iter().filter(|e| e.2 == DeliveryStage::DeliveryComplete).cloned().collect();
    let mut after_sorted = after.clone();
    after_sorted.sort();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(after_sorted, expected_sorted, "the same completions with the same ids");
    assert_eq!(engine.metrics().duplicate_batches.load(std::sync::atomic::Ordering::Relaxed), 2);
    engine.shutdown(threads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_with_a_typed_error_and_keeps_running() {
    let dir = TempDir::new("full");
    let log = LogConfig { max_bytes: 6_000, ..LogConfig::default() };
    let (engine, threads, _) = start(&dir.0, log);
    let events: Vec<_> = (0..20).map(|i| ev(1, i + 1, PICKUP, DroneEventKind::Position)).collect();
    let mut accepted = 0;
    let mut refused = 0;
    for seq in 0..10 {
        match submit(&engine, batch(3, seq, &events)).await {
            Ok(()) => accepted += 1,
            Err(Error::StorageFull) => refused += 1,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(accepted >= 1 && refused >= 1, "accepted {accepted}, refused {refused}");
    // Still serving: queries and shutdown work, and only accepted batches were applied.
    assert!(engine.drone(1).await.unwrap().is_some());
    engine.shutdown(threads).await;
    let (_engine, threads2, report) = start(&dir.0, log);
    assert_eq!(report.next_offset, accepted, "nothing refused reached the log");
    _engine.shutdown(threads2).await;
}

/// A small tmpfs mounted for one test (unmounted when dropped), so the disk really fills up.
struct SmallDisk(PathBuf);

impl SmallDisk {
    /// Mounts `size` of tmpfs; `None` (after a SKIP line) where this process may not mount,
    /// unless `FLEETSTREAM_REQUIRE_SERVICES=1`, where that fails the test.
    fn mount(tag: &str, size: &str) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!("fleetstream-small-disk-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self(dir)),
            other => {
                let _ = std::fs::remove_dir(&dir);
                let why = format!("{other:?}");
                assert!(
                    std::env::var("FLEETSTREAM_REQUIRE_SERVICES").as_deref() != Ok("1"),
                    "a size-limited tmpfs is required (FLEETSTREAM_REQUIRE_SERVICES=1; run as root): {why}"
                );
                println!("SKIP {tag}: cannot mount a tmpfs here: {why}");
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: a thread of the stopped engine may still hold a file there for a moment.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The same on a disk that really fills up (ENOSPC, no configured cap): appends that do not fit
/// are refused with the typed `storage_full`, nothing refused reaches the log, the engine keeps
/// answering, and a restart on the full disk finds every acknowledged batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_really_full_disk_refuses_with_a_typed_error_and_loses_nothing_acknowledged() {
    let Some(disk) = SmallDisk::mount("enospc", "3m") else { return };
    let dir = disk.0.join("data");
    let log = LogConfig::default();
    let (engine, threads, _) = start(&dir, log);
    let events: Vec<_> = (0..400).map(|i| ev(1, i + 1, PICKUP, DroneEventKind::Position)).collect();
    let (mut accepted, mut refused) = (0u64, 0u64);
    for seq in 0..400 {
        match submit(&engine, batch(5, seq, &events)).await {
            Ok(()) => accepted += 1,
            Err(Error::StorageFull) => refused += 1,
            Err(other) => panic!("unexpected {other}"),
        }
        if refused >= 3 {
            break;
        }
    }
    assert!(accepted >= 1 && refused >= 1, "accepted {accepted}, refused {refused}");
    assert!(engine.metrics().storage_full.load(std::sync::atomic::Ordering::Relaxed) >= refused);
    assert!(engine.drone(1).await.unwrap().is_some(), "still answering");
    engine.shutdown(threads).await;
    let (engine, threads, report) = start(&dir, log);
    assert_eq!(report.next_offset, accepted, "every acknowledged batch, and nothing refused, is in the log");
    engine.shutdown(threads).await;
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fsync_policy_acknowledges_and_recovers() {
    for policy in [FsyncPolicy::EveryBatch, FsyncPolicy::Interval, FsyncPolicy::None] {
        let dir = TempDir::new("policy");
        let log = LogConfig { fsync: policy, fsync_interval_ms: 5, ..LogConfig::default() };
        let (engine, threads, _) = start(&dir.0, log);
        for seq in 0..20 {
            submit(&engine, batch(4, seq, &[ev(2, seq + 1, PICKUP, DroneEventKind::Position)])).await.unwrap();
        }
        let fsyncs = engine.metrics().fsync_time.count();
        match policy {
            FsyncPolicy::EveryBatch => assert!(fsyncs >= 1),
            FsyncPolicy::None => assert_eq!(fsyncs, 0),
            FsyncPolicy::Interval => {}
        }
        engine.shutdown(threads).await;
        let (engine, threads, report) = start(&dir.0, log);
        assert_eq!(report.next_offset, 20, "{policy:?}");
        assert_eq!(engine.drone(2).await.unwrap().unwrap().last_seq, 20);
        engine.shutdown(threads).await;
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            // A checkpoint's temporary file may be renamed away mid-copy; a crash would leave
            // either name, and both are handled on start.
            match std::fs::copy(entry.path(), target) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("copying {}: {e}", entry.path().display()),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_subscription_reads_history_then_follows_live() {
    let dir = TempDir::new("follow");
    let (engine, threads, _) = start(&dir.0, LogConfig::default());
    engine.command(create(10, 1)).await.unwrap();
    for seq in 0..5 {
        submit(&engine, batch(9, seq, &[ev(1, seq + 1, PICKUP, DroneEventKind::Position)])).await.unwrap();
    }
    let sub = engine.subscribe_telemetry_from(StartAt::Offset(3)).unwrap();
    let next = || async {
        let (offset, b) =
            tokio::time::timeout(Duration::from_secs(10), sub.rx.recv_async()).await.unwrap().unwrap().unwrap();
        (offset, b.header().meta.batch_seq)
    };
    // Offset 0 is the command; batches 0..5 are offsets 1..6.
    assert_eq!(next().await, (3, 2));
    assert_eq!(next().await, (4, 3));
    assert_eq!(next().await, (5, 4));
    submit(&engine, batch(9, 5, &[ev(1, 6, PICKUP, DroneEventKind::Position)])).await.unwrap();
    assert_eq!(next().await, (6, 5), "then live");
    assert!(matches!(
        engine.subscribe_telemetry_from(StartAt::Offset(99)),
        Err(Error::OffsetUnavailable { requested: 99, first: 0, next: 7 })
    ));
    assert_eq!(engine.subscribe_telemetry_from(StartAt::Earliest).unwrap().start, 0);
    let latest = engine.subscribe_telemetry_from(StartAt::Latest).unwrap();
    assert_eq!(latest.start, 7, "latest starts after everything delivered");
    submit(&engine, batch(9, 6, &[ev(1, 7, PICKUP, DroneEventKind::Position)])).await.unwrap();
    let (offset, b) =
        tokio::time::timeout(Duration::from_secs(10), latest.rx.recv_async()).await.unwrap().unwrap().unwrap();
    assert_eq!((offset, b.header().meta.batch_seq), (7, 6), "nothing older, nothing missed");
    engine.shutdown(threads).await;
}

/// A consumer following delivery events through the log that stops reading, while the shards
/// checkpoint and answer drone queries (what the services do for every terminal event), never
/// stalls the engine: the publisher does not wait for log followers. The services once used a
/// blocking live subscription here, which closed a cycle under load (publisher waiting for the
/// consumer, the consumer for a shard's answer, the checkpointing shard for the publisher).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_follower_that_stops_reading_never_stalls_the_engine() {
    let dir = TempDir::new("stalled-follower");
    let config = EngineConfig { subscriber_queue: 16, ..cfg() };
    let (engine, threads, _) = Engine::start(config, durable(&dir.0, LogConfig::default())).unwrap();
    let stalled = engine.subscribe_deliveries_from(StartAt::Latest).unwrap();
    const DELIVERIES: u64 = 600;
    let work = async {
        for d in 0..DELIVERIES {
            engine.command(create(d, d)).await.unwrap();
            if d % 50 == 0 {
                // Long enough for every shard to checkpoint between commands.
                tokio::time::sleep(Duration::from_millis(30)).await;
                assert!(engine.drone(d).await.is_ok());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), work).await.expect("the engine stalled behind a stopped reader");
    // Reading again, the follower gets every event, in order.
    let mut created = Vec::new();
    while created.len() < DELIVERIES as usize {
        let (_, b) =
            tokio::time::timeout(Duration::from_secs(10), stalled.rx.recv_async()).await.unwrap().unwrap().unwrap();
        created.extend(b.events().iter().map(|e| (e.delivery_id.to_native(), e.stage.to_stage())));
    }
    created.sort_unstable();
    assert_eq!(created, (0..DELIVERIES).map(|d| (d, DeliveryStage::Created)).collect::<Vec<_>>());
    engine.shutdown(threads).await;
}
