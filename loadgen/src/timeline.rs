//! A long run over time (`--timeline-s`): for each stretch of the run, the acknowledged rate,
//! the end-to-end latency percentiles and the memory of the server and of loadgen, so a soak
//! shows whether anything drifts where the run's overall percentiles would hide it.
//!
//! Stretches are aligned to multiples of their length on the wall clock, so the subscriber's
//! observers (which time arrivals) and the sampler (which reads rates and memory) agree on
//! which stretch a moment belongs to without sharing state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use crate::Percentiles;
use crate::observe::small_histogram;

/// Latencies of one kind of event, per stretch of the run.
#[derive(Debug)]
pub struct Slicer {
    slice_us: u64,
    current: u64,
    hist: Histogram<u64>,
    done: BTreeMap<u64, Percentiles>,
}

impl Slicer {
    /// Stretches of `slice` each.
    pub fn new(slice: Duration) -> Self {
        let slice_us = u64::try_from(slice.as_micros()).unwrap_or(u64::MAX).max(1);
        Self { slice_us, current: 0, hist: small_histogram(), done: BTreeMap::new() }
    }

    /// Accounts an event that arrived at `now_us` (µs since the epoch) after `latency_us`.
    pub fn record(&mut self, now_us: u64, latency_us: u64) {
        let slice = now_us / self.slice_us;
        if slice != self.current {
            self.close();
            self.current = slice;
        }
        let _ = self.hist.record(latency_us.max(1));
    }

    fn close(&mut self) {
        if !self.hist.is_empty() {
            self.done.insert(self.current, Percentiles::of(&self.hist));
            self.hist.reset();
        }
    }

    /// Each stretch's percentiles, by stretch number (`µs since the epoch / slice`).
    pub fn finish(mut self) -> BTreeMap<u64, Percentiles> {
        self.close();
        self.done
    }
}

/// What the sampler read at the end of one stretch.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// When it was read, µs since the epoch.
    at_us: u64,
    acked_eps: f64,
    server_rss_bytes: Option<u64>,
    loadgen_rss_bytes: Option<u64>,
}

/// One stretch of the run.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Slice {
    /// Seconds from the start of sending to the end of this stretch.
    pub end_s: f64,
    /// Events acknowledged per second in it.
    pub acked_eps: f64,
    /// Latency of the telemetry events that arrived at the subscriber in it, µs.
    pub telemetry_us: Percentiles,
    /// Latency of the drone-derived delivery events that arrived in it, µs.
    pub delivery_us: Percentiles,
    /// The server's resident memory at its end (`/metrics`), when it could be read.
    pub server_rss_bytes: Option<u64>,
    /// loadgen's own resident memory at its end.
    pub loadgen_rss_bytes: Option<u64>,
}

/// Samples the acknowledged count and both processes' memory at the end of every stretch,
/// and once more (for the stretch under way) when `stop` changes: the end of sending, after
/// which the run only drains and its stretches are left out.
pub(crate) struct Sampler {
    slice_us: u64,
    task: tokio::task::JoinHandle<BTreeMap<u64, Sample>>,
}

impl Sampler {
    pub(crate) fn start(
        slice: Duration,
        acked: impl Fn() -> u64 + Send + 'static,
        http: reqwest::Client,
        api: Option<String>,
        mut stop: watch::Receiver<bool>,
    ) -> Self {
        let slice_us = u64::try_from(slice.as_micros()).unwrap_or(u64::MAX).max(1);
        let task = tokio::spawn(async move {
            let mut samples = BTreeMap::new();
            let mut last = acked();
            let mut last_at = events::now_us();
            loop {
                let now = events::now_us();
                let boundary = (now / slice_us + 1) * slice_us;
                let stopped = tokio::select! {
                    _ = stop.changed() => true,
                    () = tokio::time::sleep(Duration::from_micros(boundary - now)) => false,
                };
                let count = acked();
                let at = events::now_us();
                let acked_eps =
                    count.saturating_sub(last) as f64 / ((at.saturating_sub(last_at)) as f64 / 1e6).max(1e-3);
                (last, last_at) = (count, at);
                let server_rss_bytes = match &api {
                    Some(api) => tokio::time::timeout(Duration::from_secs(2), crate::server_gauges(&http, api))
                        .await
                        .ok()
                        .flatten()
                        .map(|(rss, _)| rss),
                    None => None,
                };
                let sample = Sample { at_us: at, acked_eps, server_rss_bytes, loadgen_rss_bytes: own_rss_bytes() };
                if stopped {
                    samples.insert(at / slice_us, sample);
                    return samples;
                }
                samples.insert(boundary / slice_us - 1, sample);
            }
        });
        Self { slice_us, task }
    }

    /// Marks the end of sending: the sampler reads the stretch under way and stops.
    pub(crate) fn stop(stop: &watch::Sender<bool>) {
        let _ = stop.send(true);
    }

    /// The run's stretches from `start_us` to the end of sending: the sampler's readings
    /// beside the latencies.
    pub(crate) async fn finish(
        self,
        stop: &watch::Sender<bool>,
        start_us: u64,
        telemetry: BTreeMap<u64, Percentiles>,
        delivery: BTreeMap<u64, Percentiles>,
    ) -> Vec<Slice> {
        let _ = stop.send(true);
        let samples = self.task.await.unwrap_or_default();
        merge(self.slice_us, start_us, &samples, &telemetry, &delivery)
    }
}

fn merge(
    slice_us: u64,
    start_us: u64,
    samples: &BTreeMap<u64, Sample>,
    telemetry: &BTreeMap<u64, Percentiles>,
    delivery: &BTreeMap<u64, Percentiles>,
) -> Vec<Slice> {
    let last = samples.keys().next_back().copied().unwrap_or(u64::MAX);
    let slices: std::collections::BTreeSet<u64> =
        samples.keys().chain(telemetry.keys()).chain(delivery.keys()).copied().filter(|k| *k <= last).collect();
    slices
        .into_iter()
        .map(|k| {
            let sample = samples.get(&k);
            let end_us = sample.map_or((k + 1) * slice_us, |s| s.at_us);
            Slice {
                end_s: end_us.saturating_sub(start_us) as f64 / 1e6,
                acked_eps: sample.map_or(0.0, |s| s.acked_eps),
                telemetry_us: telemetry.get(&k).copied().unwrap_or_default(),
                delivery_us: delivery.get(&k).copied().unwrap_or_default(),
                server_rss_bytes: sample.and_then(|s| s.server_rss_bytes),
                loadgen_rss_bytes: sample.and_then(|s| s.loadgen_rss_bytes),
            }
        })
        .collect()
}

/// The timeline as the report prints it: a line per stretch.
#[derive(Debug)]
pub struct Table<'a>(pub &'a [Slice]);

impl std::fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: Option<u64>| b.map_or_else(|| "-".to_string(), |b| format!("{:.1}", b as f64 / 1048576.0));
        write!(
            f,
            "{:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11}",
            "end s",
            "acked ev/s",
            "tel p50 µs",
            "tel p99 µs",
            "tel max µs",
            "del p50 µs",
            "del p99 µs",
            "server MiB",
            "loadgen MiB"
        )?;
        for s in self.0 {
            write!(
                f,
                "\n            {:>8.0} {:>10.0} {:>10} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11}",
                s.end_s,
                s.acked_eps,
                s.telemetry_us.p50,
                s.telemetry_us.p99,
                s.telemetry_us.max,
                s.delivery_us.p50,
                s.delivery_us.p99,
                mib(s.server_rss_bytes),
                mib(s.loadgen_rss_bytes)
            )?;
        }
        Ok(())
    }
}

/// This process's resident memory, from `/proc/self/statm`.
fn own_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The run's acknowledged count, as the sampler reads it.
pub(crate) fn acked(counters: &Arc<crate::Counters>) -> impl Fn() -> u64 + Send + 'static {
    let counters = counters.clone();
    move || counters.acked.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slicer_closes_a_stretch_when_an_event_arrives_in_the_next() {
        let mut s = Slicer::new(Duration::from_secs(10));
        s.record(10_000_000, 100);
        s.record(19_999_999, 300);
        s.record(20_000_000, 5_000);
        s.record(45_000_000, 7);
        let done = s.finish();
        assert_eq!(done.keys().copied().collect::<Vec<_>>(), vec![1, 2, 4]);
        assert_eq!(done[&1].count, 2);
        // Two significant digits: values come back within 1 %.
        assert!((300..=303).contains(&done[&1].max), "{:?}", done[&1]);
        assert!((5_000..=5_050).contains(&done[&2].p50), "{:?}", done[&2]);
        assert_eq!(done[&4].count, 1);
    }

    #[test]
    fn merged_stretches_are_timed_from_the_start_and_keep_gaps_empty() {
        let sample =
            |at_us| Sample { at_us, acked_eps: 50.0, server_rss_bytes: Some(1 << 20), loadgen_rss_bytes: None };
        // Stretches 1 and 2 sampled at their ends, stretch 4 when sending stopped mid-way.
        let samples = BTreeMap::from([(1, sample(20_000_000)), (2, sample(30_000_000)), (4, sample(42_000_000))]);
        let p = Percentiles { count: 3, p50: 10, p90: 20, p99: 30, p999: 40, max: 50 };
        let telemetry = BTreeMap::from([(1, p), (3, p), (5, p)]);
        let slices = merge(10_000_000, 5_000_000, &samples, &telemetry, &BTreeMap::new());
        let ends: Vec<f64> = slices.iter().map(|s| s.end_s).collect();
        assert_eq!(ends, vec![15.0, 25.0, 35.0, 37.0], "the drain after sending (stretch 5) is left out");
        assert_eq!(slices[1].telemetry_us.count, 0, "nothing arrived in the second stretch");
        assert_eq!(slices[2].acked_eps, 0.0, "stretch 3 was not sampled");
        assert_eq!(slices[0].server_rss_bytes, Some(1 << 20));
    }
}
