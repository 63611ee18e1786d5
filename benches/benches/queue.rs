//! The queue path: one message's whole life (enqueue, lease, ack) through the pure state
//! machine, and through the driver with its journal (written, and with the enqueue's fsync),
//! beside a bare `Vec` push and pop of the same payload as the limit.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use events::{KeyRange, QueueName, Verdict};
use pipeline::queue::Queue;
use pipeline::queue::state::{QueueConfig, QueueState};

fn queue(c: &mut Criterion) {
    let payload: Arc<[u8]> = Arc::from(vec![7u8; 65]);
    let mut g = c.benchmark_group("queue");
    g.throughput(Throughput::Elements(1));

    g.bench_function("limit_vec_push_pop", |b| {
        let mut v: Vec<Arc<[u8]>> = Vec::with_capacity(1);
        b.iter(|| {
            v.push(payload.clone());
            black_box(v.pop());
        })
    });

    g.bench_function("state_enqueue_lease_ack", |b| {
        let mut q = QueueState::new(QueueConfig::default());
        let mut now = 0u64;
        b.iter(|| {
            now += 1;
            let id = q.enqueue(now % 1000, payload.clone(), now).unwrap_or(0);
            let leased = q.lease(1, KeyRange::ALL, 1, now);
            for m in &leased {
                black_box(q.ack(m.id, m.token).is_ok());
            }
            black_box(id);
        })
    });

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build();
    let Ok(rt) = rt else { return };
    let dir = std::env::temp_dir().join(format!("fleetstream-bench-queue-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let journal = dir.join("q.journal");
    for (name, path) in [("memory", None), ("journal_fsync", Some(journal.as_path()))] {
        let Ok(q) = Queue::open(QueueName::Notifications, QueueConfig::default(), path) else { continue };
        let q = Arc::new(q);
        g.bench_function(format!("driver_enqueue_lease_ack_{name}"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let _ = q.enqueue(3, payload.to_vec()).await;
                    for m in q.lease(1, KeyRange::ALL, 1, Duration::ZERO).await.unwrap_or_default() {
                        black_box(q.settle(m.id, m.token, Verdict::Ack).is_ok());
                    }
                })
            })
        });
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, queue);
criterion_main!(benches);
