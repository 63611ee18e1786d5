//! The wire format: encoding a batch and validating one, each beside a memcpy of the same
//! bytes, the limit any format that touches every byte once must pay.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use events::wire::{Buffer, buffer_from};
use events::{BatchMeta, Limits, TelemetryBatch};
use fleetstream_benches::{batch, drone_events};

fn wire(c: &mut Criterion) {
    let n = 1024;
    let events = drone_events(n, 256);
    let encoded = batch(n, 256);
    let bytes = encoded.as_bytes().to_vec();
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(n as u64));
    let mut buf = Some(Buffer::with_capacity(bytes.len()));
    g.bench_function("encode_1024", |b| {
        b.iter(|| {
            let batch =
                TelemetryBatch::encode(BatchMeta::default(), black_box(&events), buf.take().unwrap_or_default())
                    .unwrap_or_else(|e| panic!("{e}"));
            buf = Some(batch.into_buffer());
        })
    });
    let limits = Limits::default();
    let mut spare = Some(buffer_from(&bytes));
    g.bench_function("validate_1024", |b| {
        b.iter(|| {
            let mut input = spare.take().unwrap_or_default();
            input.clear();
            input.extend_from_slice(black_box(&bytes));
            let batch = TelemetryBatch::validate(input, &limits).unwrap_or_else(|e| panic!("{e}"));
            black_box(batch.events().len());
            spare = Some(batch.into_buffer());
        })
    });
    let mut dst = vec![0u8; bytes.len()];
    g.bench_function("limit_memcpy_1024", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&bytes));
            black_box(&dst);
        })
    });
    g.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
