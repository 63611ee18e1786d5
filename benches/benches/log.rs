//! Log append of a 1,024-event batch under each fsync policy, beside a memcpy of the same bytes
//! (the floor for any store that keeps the batch as it arrived).

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fleetstream_benches::batch;
use pipeline::log::{FsyncPolicy, Log, LogConfig, RecordKind};

fn append(c: &mut Criterion) {
    let b = batch(1024, 256);
    let bytes = b.as_bytes().to_vec();
    let mut g = c.benchmark_group("log");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    let dir = std::env::temp_dir().join(format!("fleetstream-bench-log-{}", std::process::id()));
    for policy in [FsyncPolicy::None, FsyncPolicy::EveryBatch] {
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = LogConfig { segment_bytes: 32 << 20, retention_secs: 0, fsync: policy, ..LogConfig::default() };
        let (mut log, _) = Log::open(&dir, cfg).unwrap_or_else(|e| panic!("{e}"));
        let mut appended = 0u64;
        g.bench_function(format!("append_1024_{policy:?}"), |bench| {
            bench.iter(|| {
                log.append(RecordKind::Telemetry, black_box(&bytes)).unwrap_or_else(|e| panic!("{e}"));
                if policy == FsyncPolicy::EveryBatch {
                    log.sync().unwrap_or_else(|e| panic!("{e}"));
                }
                appended += 1;
                // Keep the bench's disk use bounded: drop closed segments as it goes.
                if appended.is_multiple_of(256) {
                    let later = SystemTime::now() + Duration::from_secs(1);
                    log.enforce_retention(u64::MAX, later).unwrap_or_else(|e| panic!("{e}"));
                }
            })
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut dst = vec![0u8; bytes.len()];
    g.bench_function("limit_memcpy_1024", |bench| {
        bench.iter(|| {
            dst.copy_from_slice(black_box(&bytes));
            black_box(&dst);
        })
    });
    g.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
