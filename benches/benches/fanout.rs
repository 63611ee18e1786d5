//! Fan-out: publishing one batch to 1, 4 and 16 subscribers (an `Arc` clone and a queue push
//! per subscriber, never a copy of the events).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use events::Overflow;
use fleetstream_benches::batch;
use pipeline::bus::Topic;

fn fanout(c: &mut Criterion) {
    let n = 1024;
    let b = Arc::new(batch(n, 256));
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(n as u64));
    for subscribers in [1usize, 4, 16] {
        let topic = Topic::<events::DroneEvent>::new("bench", 1024);
        let subs: Vec<_> = (0..subscribers).map(|_| topic.subscribe(Overflow::Block)).collect();
        g.bench_function(format!("publish_1024_to_{subscribers}"), |bench| {
            bench.iter(|| {
                topic.publish(b.clone());
                for s in &subs {
                    black_box(s.rx.try_recv().ok());
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
