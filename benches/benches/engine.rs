//! The engine's stages: routing a batch to shards, deriving per event, and the whole
//! in-process path from `submit` to the telemetry subscriber.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use events::{BatchSink, Overflow, StreamSource};
use fleetstream_benches::batch;
use pipeline::derive::{DeriveConfig, Deriver};
use pipeline::engine::Storage;
use pipeline::engine::shard_of;
use pipeline::{Engine, EngineConfig};

fn stages(c: &mut Criterion) {
    let n = 1024;
    let b1024 = batch(n, 256);
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("route_1024_to_4_shards", |b| {
        b.iter(|| {
            let mut per: Vec<Vec<u32>> = vec![Vec::new(); 4];
            for (i, ev) in b1024.events().iter().enumerate() {
                per[shard_of(ev.drone_id.to_native(), 4)].push(i as u32);
            }
            black_box(per);
        })
    });
    let mut deriver = Deriver::new(DeriveConfig::default());
    let mut out = Vec::new();
    // Fresh sequence numbers each round, so the bench measures applied events, not repeats.
    let rounds: Vec<_> = (0..64u64).map(|r| batch_with_offset(n, 256, r * 1000)).collect();
    let mut round = 0;
    g.bench_function("derive_1024", |b| {
        b.iter(|| {
            let batch = &rounds[round % rounds.len()];
            round += 1;
            for ev in batch.events().iter() {
                black_box(deriver.on_drone_event(ev, &mut out));
            }
            out.clear();
        })
    });
    g.finish();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let (engine, threads, _) = Engine::start(EngineConfig { shards: 2, ..EngineConfig::default() }, Storage::Memory)
        .unwrap_or_else(|e| panic!("{e}"));
    let sub = engine.subscribe_telemetry(Overflow::Block).unwrap_or_else(|e| panic!("{e}"));
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(n as u64));
    let mut seq = 0u64;
    g.bench_function("submit_to_subscriber_1024", |b| {
        b.iter_custom(|iters| {
            let batches: Vec<_> = (0..iters)
                .map(|_| {
                    seq += 1;
                    batch_with_offset(n, 256, seq * 1000)
                })
                .collect();
            let start = Instant::now();
            rt.block_on(async {
                for b in batches {
                    let ack = engine.submit(b).await.unwrap_or_else(|e| panic!("{e}"));
                    ack.await.unwrap_or_else(|e| panic!("{e}"));
                    black_box(sub.rx.recv_async().await.unwrap_or_else(|e| panic!("{e}")));
                }
            });
            start.elapsed()
        })
    });
    g.finish();
    rt.block_on(engine.shutdown(threads));
}

fn batch_with_offset(n: usize, drones: u64, offset: u64) -> events::TelemetryBatch {
    let mut evs = fleetstream_benches::drone_events(n, drones);
    for e in &mut evs {
        e.seq += offset;
    }
    let meta = events::BatchMeta { producer_id: 1, batch_seq: offset, ..events::BatchMeta::default() };
    events::TelemetryBatch::encode(meta, &evs, events::wire::Buffer::new()).unwrap_or_else(|e| panic!("{e}"))
}

criterion_group!(benches, stages);
criterion_main!(benches);
