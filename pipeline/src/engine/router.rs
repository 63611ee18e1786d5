//! Which shard a drone belongs to, and how a batch is split over the shards without copying it:
//! one index list per shard, the batch itself shared.

use super::*;

/// Maps a drone to a shard: a multiplicative hash spread over `n` without a division.
pub fn shard_of(drone: DroneId, n: usize) -> usize {
    let h = drone.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(h) * n as u128) >> 64) as usize
}

/// The indices of `batch`'s events for each of `n` shards, in batch order: how the router
/// splits a batch (index lists; the batch itself is shared, never copied).
pub fn split_by_shard(batch: &TelemetryBatch, n: usize) -> Vec<Vec<u32>> {
    // Sized for an even spread plus slack, so a batch costs one allocation per shard.
    let expected = batch.len() / n + batch.len() / (4 * n) + 8;
    let mut per_shard: Vec<Vec<u32>> = (0..n).map(|_| Vec::with_capacity(expected)).collect();
    for (i, ev) in batch.events().iter().enumerate() {
        per_shard[shard_of(ev.drone_id.to_native(), n)].push(i as u32);
    }
    per_shard
}

/// Hands what the log made durable to the shard queues (in log order), the telemetry fan-out
/// and the callers, and moves the delivered end. The syncer's, after the replay's.
pub(super) struct Router {
    pub(super) shards: Vec<flume::Sender<ShardMsg>>,
    pub(super) fanout: flume::Sender<Option<Arc<TelemetryBatch>>>,
    pub(super) tail: Arc<Tail<DroneEvent>>,
    pub(super) metrics: Arc<EngineMetrics>,
}

impl Router {
    /// Splits a batch over the shards by drone: index lists, never copies.
    pub(super) fn route(&self, offset: u64, batch: Arc<TelemetryBatch>, received: Option<Instant>) {
        let n = self.shards.len();
        if n == 1 {
            let _ = self.shards[0].send(ShardMsg::Events { offset, batch, indices: None, received });
            return;
        }
        let per_shard = split_by_shard(&batch, n);
        let whole = per_shard.iter().filter(|v| !v.is_empty()).count() == 1;
        for (shard, indices) in per_shard.into_iter().enumerate() {
            if !indices.is_empty() {
                let msg =
                    ShardMsg::Events { offset, batch: batch.clone(), indices: (!whole).then_some(indices), received };
                let _ = self.shards[shard].send(msg);
            }
        }
    }

    /// Hands a command to its drone's shard.
    pub(super) fn command(
        &self,
        offset: u64,
        cmd: DeliveryCommand,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
        trace: TraceContext,
    ) {
        let shard = shard_of(cmd.drone_id(), self.shards.len());
        let _ = self.shards[shard].send(ShardMsg::Command { offset, cmd, reply, trace });
    }

    /// Tells every shard that everything up to `offset` has been routed.
    pub(super) fn watermark(&self, offset: u64) {
        for shard in &self.shards {
            let _ = shard.send(ShardMsg::Watermark(offset));
        }
    }

    /// Routes and answers a durable group, in log order.
    pub(super) fn deliver(&self, appended: Vec<Appended>) {
        let mut last = None;
        for a in appended {
            match a {
                Appended::Batch { offset, batch, ack, queued } => {
                    let created = batch.events().first().map(|e| e.ts_us.to_native());
                    let batch = Arc::new(batch);
                    self.tail.push(offset, batch.clone());
                    self.route(offset, batch.clone(), Some(queued));
                    let _ = self.fanout.send(Some(batch));
                    let _ = ack.send(Ok(()));
                    self.metrics.append_time.record(queued.elapsed());
                    if let Some(created) = created {
                        self.metrics.event_age_at_ack.record(age(events::now_us(), created));
                    }
                    last = Some(offset);
                }
                Appended::Duplicate { ack } => {
                    let _ = ack.send(Ok(()));
                }
                Appended::Command { offset, cmd, reply, trace } => {
                    self.command(offset, cmd, Some(reply), trace);
                    last = Some(offset);
                }
            }
        }
        if let Some(last) = last {
            self.watermark(last);
            self.tail.advance(last + 1);
        }
    }

    /// Tells the shards and the fan-out to stop after what they hold.
    pub(super) fn stop(&self) {
        for shard in &self.shards {
            let _ = shard.send(ShardMsg::Stop);
        }
        let _ = self.fanout.send(None);
        self.tail.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_of_spreads_and_stays_in_range() {
        let mut counts = [0usize; 4];
        for d in 0..10_000 {
            counts[shard_of(d, 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 2_000), "{counts:?}");
        assert_eq!(shard_of(u64::MAX, 3), shard_of(u64::MAX, 3));
        assert!(shard_of(u64::MAX, 3) < 3);
    }
}
