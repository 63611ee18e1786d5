//! No allocation per event on the hot path: a counting allocator watches the engine take
//! batches of 16 and of 1,024 events (validate, log, route to shards, derive, fan out to a
//! subscriber). Allocations per batch must not grow with the events in it.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use events::wire::Buffer;
use events::{
    BatchMeta, BatchSink, DroneEvent, DroneEventKind, FlightStatus, GeoPoint, Limits, Overflow, StreamSource,
    TelemetryBatch,
};
use pipeline::engine::Storage;
use pipeline::log::LogConfig;
use pipeline::{Engine, EngineConfig};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's allocations, for a check that other threads (the runtime's idle workers)
    /// must not disturb.
    static MINE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn count_one() {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    let _ = MINE.try_with(|c| c.set(c.get() + 1));
}

fn mine() -> u64 {
    MINE.with(std::cell::Cell::get)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const DRONES: u64 = 256;

/// `count` batches of `per_batch` events over `DRONES` drones, sequence numbers after `seq`.
fn batches(producer: u64, count: u64, per_batch: u64, seq: &mut u64) -> Vec<TelemetryBatch> {
    (0..count)
        .map(|b| {
            let evs: Vec<DroneEvent> = (0..per_batch)
                .map(|i| {
                    let n = *seq + i;
                    DroneEvent {
                        drone_id: n % DRONES,
                        seq: 1 + n / DRONES,
                        ts_us: n,
                        position: GeoPoint::new(47.6, -122.3),
                        speed_mps: 10.0,
                        heading_deg: 90.0,
                        battery_pct: 80.0,
                        status: FlightStatus::Flying,
                        kind: DroneEventKind::Position,
                    }
                })
                .collect();
            *seq += per_batch;
            let meta = BatchMeta { producer_id: producer, batch_seq: b, ..BatchMeta::default() };
            TelemetryBatch::encode(meta, &evs, Buffer::new()).unwrap()
        })
        .collect()
}

/// Allocations per batch while the engine takes `batches` and a subscriber reads them.
async fn allocations_per_batch(engine: &Engine, batches: Vec<TelemetryBatch>) -> f64 {
    let n = batches.len() as u64;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for batch in batches {
        engine.submit(batch).await.unwrap().await.unwrap();
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / n as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_per_batch_do_not_grow_with_events_per_batch() {
    // Validation reads in place: no allocation at all.
    let mut seq = 0;
    let sample = batches(1, 1, 1024, &mut seq).pop().unwrap();
    let bytes = sample.into_buffer();
    let before = mine();
    let validated = TelemetryBatch::validate(bytes, &Limits::default()).unwrap();
    let sum: u64 = validated.events().iter().map(|e| e.seq.to_native()).sum();
    assert_eq!(mine() - before, 0, "validate and read in place allocate nothing");
    assert!(sum > 0);

    let dir = std::env::temp_dir().join(format!("fleetstream-alloc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let storage = Storage::Durable { dir: dir.clone(), log: LogConfig::default() };
    let (engine, threads, _) = Engine::start(EngineConfig { shards: 2, ..EngineConfig::default() }, storage).unwrap();
    let sub = engine.subscribe_telemetry(Overflow::Block).unwrap();
    let reader = std::thread::spawn(move || {
        let mut events = 0u64;
        while let Ok(batch) = sub.rx.recv_timeout(Duration::from_secs(5)) {
            events += batch.len() as u64;
        }
        events
    });

    // Warm up: every drone known to its shard, buffers and queues at their working sizes.
    let mut seq = 0;
    let warm = batches(1, 100, 1024, &mut seq);
    let small = batches(2, 1_000, 16, &mut seq);
    let large = batches(3, 500, 1024, &mut seq);
    allocations_per_batch(&engine, warm).await;

    let per_small = allocations_per_batch(&engine, small).await;
    let per_large = allocations_per_batch(&engine, large).await;
    println!("allocations per batch: {per_small:.2} with 16 events, {per_large:.2} with 1,024 events");
    println!("allocations per event with 1,024-event batches: {:.4}", per_large / 1024.0);
    // 64 times the events per batch, and at most a handful more allocations per batch (the log
    // and queues growing to a new high-water mark): nothing is allocated per event.
    assert!(per_large <= per_small + 4.0, "{per_small} → {per_large}");
    assert!(per_large / 1024.0 < 0.05, "{per_large} allocations per 1,024-event batch");

    engine.shutdown(threads).await;
    let events = reader.join().unwrap();
    assert_eq!(events, (100 + 500) * 1024 + 1_000 * 16, "the subscriber saw every event");
    let _ = std::fs::remove_dir_all(&dir);
}
