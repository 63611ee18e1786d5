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
