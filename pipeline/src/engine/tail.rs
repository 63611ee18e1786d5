//! The delivered end of a log, and the batches just before it.
//!
//! A [`Tail`] is written by the log's router (telemetry) or publisher (delivery events): each
//! batch made visible is pushed with its offset, then the delivered end moves past it. Offset
//! subscribers read the recent batches from here, shared (the same `Arc` the shards and the
//! in-process subscribers got: no copy, no second checksum), and read the segment files only for
//! what fell out of it. Memory is bounded: the tail keeps [`RECENT_BATCHES`] batches.

use std::collections::VecDeque;

use events::wire::{Batch, Payload};

use super::*;

/// Batches a tail keeps for its subscribers: about 16 MiB of telemetry at 1,000 events per
/// batch, a few hundred milliseconds at full rate.
pub(super) const RECENT_BATCHES: usize = 256;

/// How far a log has been delivered (appended, synced under the policy, routed), and the
/// batches just before that.
pub(super) struct Tail<T: Payload> {
    end: tokio::sync::watch::Sender<u64>,
    recent: parking_lot::Mutex<Recent<T>>,
}

struct Recent<T: Payload> {
    /// Every batch at or after this offset (up to the end) is in `batches`.
    from: u64,
    batches: VecDeque<(u64, Arc<Batch<T>>)>,
}

impl<T: Payload> Tail<T> {
    /// A tail whose delivered end is `end`, with nothing recent.
    pub(super) fn at(end: u64) -> Arc<Self> {
        Arc::new(Self {
            end: tokio::sync::watch::Sender::new(end),
            recent: parking_lot::Mutex::new(Recent { from: end, batches: VecDeque::new() }),
        })
    }

    /// The delivered end: the offset the next delivered record will have.
    pub(super) fn end(&self) -> u64 {
        *self.end.borrow()
    }

    /// Keeps a batch about to be delivered (before [`Tail::advance`] passes it).
    pub(super) fn push(&self, offset: u64, batch: Arc<Batch<T>>) {
        let mut recent = self.recent.lock();
        if recent.batches.len() == RECENT_BATCHES
            && let Some((evicted, _)) = recent.batches.pop_front()
        {
            recent.from = evicted + 1;
        }
        recent.batches.push_back((offset, batch));
    }

    /// Moves the delivered end to `end` and wakes the subscribers waiting for it.
    pub(super) fn advance(&self, end: u64) {
        self.end.send_replace(end);
    }

    /// Wakes the subscribers (the log is stopping).
    pub(super) fn wake(&self) {
        self.end.send_modify(|_| {});
    }

    /// A receiver that sees the end move.
    pub(super) fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.end.subscribe()
    }

    /// The recent batches in `[next, end)`, at most `max`, into `out`, and the offset to go on
    /// from; `None` when `next` fell out of the recent ones (read the log up to the returned
    /// `from` instead).
    pub(super) fn recent(
        &self,
        next: u64,
        end: u64,
        max: usize,
        out: &mut Vec<(u64, Arc<Batch<T>>)>,
    ) -> Result<u64, u64> {
        let recent = self.recent.lock();
        if next < recent.from {
            return Err(recent.from);
        }
        let start = recent.batches.partition_point(|(o, _)| *o < next);
        for (offset, batch) in recent.batches.range(start..) {
            if *offset >= end {
                break;
            }
            if out.len() == max {
                return Ok(*offset);
            }
            out.push((*offset, batch.clone()));
        }
        Ok(end)
    }
}

#[cfg(test)]
mod tests {
    use events::wire::{Buffer, TelemetryBatch};

    use super::*;

    fn batch(seq: u64) -> Arc<TelemetryBatch> {
        let meta = BatchMeta { producer_id: 1, batch_seq: seq, ..BatchMeta::default() };
        Arc::new(TelemetryBatch::encode(meta, &[], Buffer::new()).unwrap())
    }

    /// Recent batches are served from memory in offset order, a page at a time; an offset that
    /// fell out of the kept ones sends the reader to the log up to where memory starts.
    #[test]
    fn recent_batches_are_served_until_they_fall_out() {
        let tail = Tail::<DroneEvent>::at(10);
        let mut out = Vec::new();
        assert_eq!(tail.recent(10, 10, 8, &mut out), Ok(10), "nothing yet");
        for offset in [10, 12, 13] {
            tail.push(offset, batch(offset));
        }
        tail.advance(14);
        assert_eq!(tail.recent(10, tail.end(), 2, &mut out), Ok(13), "a page of two, then go on at 13");
        assert_eq!(out.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [10, 12]);
        out.clear();
        assert_eq!(tail.recent(11, 14, 8, &mut out), Ok(14));
        assert_eq!(out.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [12, 13]);
        assert_eq!(tail.recent(9, 14, 8, &mut Vec::new()), Err(10), "before the tail: read the log up to 10");
        for offset in 14..14 + RECENT_BATCHES as u64 {
            tail.push(offset, batch(offset));
        }
        assert_eq!(tail.recent(12, 14, 8, &mut Vec::new()), Err(14), "12 and 13 fell out");
    }
}
