//! The engine's stages: routing a batch to shards, deriving per event, and the whole
//! in-process path from `submit` to the telemetry subscriber.

use std::hint::black_box;
use std::time::Instant;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::time::Duration;

use events::wire::Buffer;
use events::{
    BatchMeta, BatchSink, DeliveryCommand, DroneEvent, DroneEventKind, FleetControl, FlightStatus, GeoPoint, Overflow,
    StreamSource, TelemetryBatch,
};
use fleetstream_benches::batch;
use pipeline::derive::{DeriveConfig, Deriver};
use pipeline::engine::Storage;
use pipeline::engine::split_by_shard;
use pipeline::{Engine, EngineConfig};

fn stages(c: &mut Criterion) {
    let n = 1024;
    let b1024 = batch(n, 256);
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(n as u64));
    // The router's own split (index lists per shard).
    g.bench_function("route_1024_to_4_shards", |b| b.iter(|| black_box(split_by_shard(&b1024, 4))));
    let mut deriver = Deriver::new(DeriveConfig::default());
    let mut out = Vec::new();
    // A fresh batch each iteration, made outside the timing, with sequence numbers above every
    // earlier one: every event is applied, none is a repeat.
    let mut round = 0u64;
    g.bench_function("derive_1024", |b| {
        b.iter_batched(
            || {
                round += 1;
                batch_with_offset(n, 256, round * 1000)
            },
            |batch| {
                for ev in batch.events().iter() {
                    black_box(deriver.on_drone_event(ev, &mut out));
                }
                out.clear();
            },
            BatchSize::SmallInput,
        )
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
    // Batch in → derived event out: each round a delivery is created (untimed), then a batch
    // whose last event is its drone picking the package up is submitted, and the clock stops
    // when the derived delivery events reach a subscriber.
    let deliveries = engine.subscribe_deliveries(Overflow::Block).unwrap_or_else(|e| panic!("{e}"));
    let mut delivery = 0u64;
    g.bench_function("batch_to_derived_event_1024", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            rt.block_on(async {
                for _ in 0..iters {
                    delivery += 1;
                    seq += 1;
                    let drone = 1_000_000 + delivery;
                    let here = GeoPoint::new(47.6, -122.3);
                    let create = DeliveryCommand::Create {
                        delivery_id: delivery,
                        drone_id: drone,
                        pickup: here,
                        dropoff: GeoPoint::new(47.7, -122.2),
                        ts_us: 1,
                    };
                    engine.command(create).await.unwrap_or_else(|e| panic!("{e}"));
                    black_box(deliveries.rx.recv_async().await.unwrap_or_else(|e| panic!("{e}")));
                    let mut evs = fleetstream_benches::drone_events(n - 1, 256);
                    for e in &mut evs {
                        e.seq += seq * 1000;
                    }
                    evs.push(DroneEvent {
                        drone_id: drone,
                        seq: 1,
                        ts_us: 2,
                        position: here,
                        speed_mps: 0.0,
                        heading_deg: 0.0,
                        battery_pct: 90.0,
                        status: FlightStatus::Flying,
                        kind: DroneEventKind::PickedUp { delivery },
                    });
                    let meta = BatchMeta { producer_id: 2, batch_seq: delivery, ..BatchMeta::default() };
                    let batch = TelemetryBatch::encode(meta, &evs, Buffer::new()).unwrap_or_else(|e| panic!("{e}"));
                    let start = Instant::now();
                    let ack = engine.submit(batch).await.unwrap_or_else(|e| panic!("{e}"));
                    ack.await.unwrap_or_else(|e| panic!("{e}"));
                    black_box(deliveries.rx.recv_async().await.unwrap_or_else(|e| panic!("{e}")));
                    timed += start.elapsed();
                    black_box(sub.rx.recv_async().await.unwrap_or_else(|e| panic!("{e}")));
                }
            });
            timed
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
