//! The stage queues side by side: one producer thread hands 100,000 messages (an offset and a
//! shared batch, as the router hands the shards) to one consumer thread through each bounded
//! queue the engine could use, 256 slots each: flume (what the engine uses), crossbeam's
//! channel, crossbeam's `ArrayQueue` (lock-free, spinning then yielding when full or empty), and
//! the standard library's `sync_channel`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const MESSAGES: u64 = 100_000;
const SLOTS: usize = 256;

type Msg = (u64, Arc<[u8]>);

/// Runs `consume` on a thread while `produce` runs here; the time until both are done.
fn timed(produce: impl FnOnce() + Send, consume: impl FnOnce() + Send + 'static) -> Duration {
    let started = Instant::now();
    let consumer = std::thread::spawn(consume);
    produce();
    let _ = consumer.join();
    started.elapsed()
}

fn handoff(c: &mut Criterion) {
    let batch: Arc<[u8]> = Arc::from(vec![7u8; 64]);
    let mut g = c.benchmark_group("handoff");
    g.throughput(Throughput::Elements(MESSAGES));
    g.sample_size(20);

    g.bench_function("flume_bounded", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (tx, rx) = flume::bounded::<Msg>(SLOTS);
                    let batch = batch.clone();
                    timed(
                        move || (0..MESSAGES).for_each(|i| tx.send((i, batch.clone())).unwrap_or(())),
                        move || rx.iter().for_each(|m| drop(black_box(m))),
                    )
                })
                .sum()
        })
    });

    g.bench_function("crossbeam_channel_bounded", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (tx, rx) = crossbeam_channel::bounded::<Msg>(SLOTS);
                    let batch = batch.clone();
                    timed(
                        move || (0..MESSAGES).for_each(|i| tx.send((i, batch.clone())).unwrap_or(())),
                        move || rx.iter().for_each(|m| drop(black_box(m))),
                    )
                })
                .sum()
        })
    });

    g.bench_function("crossbeam_array_queue_spin", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let q = Arc::new(crossbeam_queue::ArrayQueue::<Msg>::new(SLOTS));
                    let (producer, batch) = (q.clone(), batch.clone());
                    timed(
                        move || {
                            for i in 0..MESSAGES {
                                let mut m = (i, batch.clone());
                                let backoff = crossbeam_utils::Backoff::new();
                                while let Err(back) = producer.push(m) {
                                    m = back;
                                    backoff.snooze();
                                }
                            }
                        },
                        move || {
                            let mut got = 0;
                            let backoff = crossbeam_utils::Backoff::new();
                            while got < MESSAGES {
                                match q.pop() {
                                    Some(m) => {
                                        drop(black_box(m));
                                        got += 1;
                                        backoff.reset();
                                    }
                                    None => backoff.snooze(),
                                }
                            }
                        },
                    )
                })
                .sum()
        })
    });

    g.bench_function("std_sync_channel", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(SLOTS);
                    let batch = batch.clone();
                    timed(
                        move || (0..MESSAGES).for_each(|i| tx.send((i, batch.clone())).unwrap_or(())),
                        move || rx.iter().for_each(|m| drop(black_box(m))),
                    )
                })
                .sum()
        })
    });
    g.finish();
}

criterion_group!(benches, handoff);
criterion_main!(benches);
