//! `js-publish`: NATS JetStream's own rate for the batches fleetstream ingests, so the embedded
//! log and the JetStream backend can be put beside the broker a user would otherwise pick, in
//! one session on one machine.
//!
//! It publishes one encoded telemetry batch (`--batch` events, the wire format `loadgen` sends)
//! over and over to a file-backed stream, `--inflight` unacknowledged publishes per connection,
//! for `--duration` seconds, and reports acknowledged events per second and the publish-to-ack
//! latency. How durable an acknowledgement is depends on the server: run it against one with
//! `jetstream { sync_interval: always }` (every message on disk before its ack, as fleetstream's
//! `log.fsync = "every_batch"`) and one with the default (lazy sync).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use clap::Parser;
use events::wire::Buffer;
use events::{BatchMeta, DroneEvent, DroneEventKind, FlightStatus, GeoPoint, TelemetryBatch};

#[derive(Debug, Parser)]
#[command(about = "NATS JetStream's publish rate for fleetstream's telemetry batches")]
struct Args {
    /// The NATS server.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Stream to create (and delete afterwards).
    #[arg(long, default_value = "JSPUBLISH")]
    stream: String,
    /// Events per message.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Seconds to publish.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Connections publishing at once.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Unacknowledged publishes per connection.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
}

/// What one connection did: acknowledged messages and each one's publish-to-ack time, µs.
struct Outcome {
    acked: u64,
    latencies_us: Vec<u32>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.batch > 0 && args.connections > 0 && args.inflight > 0,
        "batch, connections and inflight must be positive"
    );
    let client = async_nats::connect(&args.url).await.with_context(|| format!("connecting to {}", args.url))?;
    let js = jetstream::new(client);
    let _ = js.delete_stream(&args.stream).await;
    js.create_stream(stream::Config {
        name: args.stream.clone(),
        subjects: vec![format!("{}.>", args.stream.to_lowercase())],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("creating the stream")?;
    let events: Vec<DroneEvent> = (0..args.batch as u64)
        .map(|i| DroneEvent {
            drone_id: i % 10_000 + 1,
            seq: i + 1,
            ts_us: events::now_us(),
            position: GeoPoint::new(47.6 + i as f64 * 1e-6, -122.3),
            speed_mps: 12.0,
            heading_deg: 90.0,
            battery_pct: 80.0,
            status: FlightStatus::Flying,
            kind: DroneEventKind::Position,
        })
        .collect();
    let batch = TelemetryBatch::encode(BatchMeta::default(), &events, Buffer::new())?;
    let payload = bytes::Bytes::copy_from_slice(batch.as_bytes());
    eprintln!(
        "js-publish: {} events ({} bytes) per message, {} connections x {} in flight, {:.0} s against {}",
        args.batch,
        payload.len(),
        args.connections,
        args.inflight,
        args.duration,
        args.url
    );
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let (url, payload, subject, inflight) =
            (args.url.clone(), payload.clone(), format!("{}.{c}", args.stream.to_lowercase()), args.inflight);
        tasks.push(tokio::spawn(async move {
            let js = jetstream::new(async_nats::connect(&url).await?);
            let mut pending = VecDeque::with_capacity(inflight);
            let mut out = Outcome { acked: 0, latencies_us: Vec::new() };
            while Instant::now() < deadline {
                if pending.len() == inflight {
                    let (sent, ack): (Instant, jetstream::context::PublishAckFuture) =
                        pending.pop_front().context("a publish is in flight")?;
                    ack.await?;
                    out.acked += 1;
                    out.latencies_us.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
                let ack = js.publish(subject.clone(), payload.clone()).await?;
                pending.push_back((Instant::now(), ack));
            }
            for (sent, ack) in pending {
                ack.await?;
                out.acked += 1;
                out.latencies_us.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            anyhow::Ok(out)
        }));
    }
    let mut acked = 0u64;
    let mut latencies = Vec::new();
    for task in tasks {
        let out = task.await??;
        acked += out.acked;
        latencies.extend(out.latencies_us);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = js.delete_stream(&args.stream).await;
    latencies.sort_unstable();
    let at = |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)));
    println!(
        "js-publish  {} messages acked in {elapsed:.1} s: {:.0} events/s, {:.0} MB/s",
        acked,
        (acked * args.batch as u64) as f64 / elapsed,
        (acked * payload.len() as u64) as f64 / elapsed / 1e6
    );
    println!(
        "ack µs      p50 {} p99 {} p999 {} max {}",
        at(0.5).copied().unwrap_or(0),
        at(0.99).copied().unwrap_or(0),
        at(0.999).copied().unwrap_or(0),
        latencies.last().copied().unwrap_or(0)
    );
    Ok(())
}
