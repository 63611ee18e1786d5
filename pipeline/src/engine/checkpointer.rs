//! The checkpointer thread: writes shard checkpoints once what they derived is durable.
//!
//! Owns the backend's [`CheckpointStore`] (a directory, or JetStream's bucket). Reads the checkpoint
//! queue the shards fill, waits for each job's barrier (the publisher's word that the shard's
//! derived events are durable), writes the checkpoint, and then lets retention move past it. It
//! blocks on the barrier and on the file's fsyncs, which is why this is not the shard's work.

use super::backend::CheckpointStore;
use super::*;

/// A shard's checkpoint waiting to be written.
pub(super) struct CkptJob {
    pub(super) ckpt: Checkpoint,
    /// Answers once the publisher has synced everything the shard derived before the snapshot.
    pub(super) durable: flume::Receiver<()>,
    /// Told once the checkpoint is written (or has failed).
    pub(super) done: Option<oneshot::Sender<()>>,
}

/// Writes shard checkpoints off the shard threads: waiting for the delivery-events log, the
/// file write with its fsyncs (or the JetStream round trip) would otherwise stall a shard's queue
/// for milliseconds every interval, and every batch queued behind it would wait that long.
pub(super) struct Checkpointer {
    /// Where they go; `None` when checkpoints are not kept.
    pub(super) store: Option<Box<dyn CheckpointStore>>,
    /// Per shard, the first offset the log must keep for a replay from its checkpoint.
    pub(super) needed: Arc<[AtomicU64]>,
    pub(super) metrics: Arc<EngineMetrics>,
}

impl Checkpointer {
    pub(super) fn run(self, rx: flume::Receiver<CkptJob>) {
        while let Ok(CkptJob { ckpt, durable, done }) = rx.recv() {
            if durable.recv().is_ok() {
                let written = self.store.as_ref().map_or(Ok(false), |store| store.put(&ckpt));
                match written {
                    Ok(false) => {}
                    Ok(true) => {
                        self.needed[ckpt.shard as usize].store(ckpt.offset + 1, Ordering::Relaxed);
                        self.metrics.checkpoints.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => warn!(error = %e, shard = ckpt.shard, "checkpoint failed; will retry"),
                }
            }
            tell(done);
        }
    }
}

/// Checkpoints as files in a directory ([`checkpoint::write`]).
pub(super) struct DirCheckpoints(pub(super) PathBuf);

impl CheckpointStore for DirCheckpoints {
    fn put(&self, ckpt: &Checkpoint) -> Result<bool, crate::Error> {
        checkpoint::write(&self.0, ckpt).map(|()| true)
    }
}
