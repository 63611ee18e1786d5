//! Warnings caused by what peers send, rate-limited: one bad client (or a storm of them) could
//! otherwise write a line per rejected batch, per refused connection, per failed handshake,
//! and fill the disk or drown everything else in the log. Each reason gets at most one line
//! per [`INTERVAL`]; the next line it gets says how many were left out meanwhile (the metrics
//! count every one). Sans-IO: the caller passes `now`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Lines per reason, at most one per this interval.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Which warnings may be written now.
#[derive(Debug, Default)]
pub struct LogGate {
    reasons: std::sync::Mutex<HashMap<&'static str, Reason>>,
}

#[derive(Debug, Clone, Copy)]
struct Reason {
    last: Instant,
    suppressed: u64,
}

impl LogGate {
    /// Whether a warning for `reason` may be written at `now`: `Some(n)` with the number of its
    /// warnings left out since the last one written, or `None` (counted as left out).
    pub fn allow(&self, reason: &'static str, now: Instant) -> Option<u64> {
        let mut reasons = self.reasons.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match reasons.get_mut(reason) {
            Some(r) if now.saturating_duration_since(r.last) < INTERVAL => {
                r.suppressed += 1;
                None
            }
            Some(r) => {
                let left_out = r.suppressed;
                *r = Reason { last: now, suppressed: 0 };
                Some(left_out)
            }
            None => {
                reasons.insert(reason, Reason { last: now, suppressed: 0 });
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_reason_per_interval_then_the_count_left_out() {
        let gate = LogGate::default();
        let t0 = Instant::now();
        assert_eq!(gate.allow("checksum_mismatch", t0), Some(0), "the first is written");
        for i in 1..=1000 {
            assert_eq!(gate.allow("checksum_mismatch", t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(gate.allow("too_large", t0 + Duration::from_millis(5)), Some(0), "another reason has its own");
        assert_eq!(gate.allow("checksum_mismatch", t0 + INTERVAL), Some(1000), "then one line saying how many");
        assert_eq!(gate.allow("checksum_mismatch", t0 + INTERVAL + Duration::from_millis(1)), None);
        assert_eq!(gate.allow("checksum_mismatch", t0 + INTERVAL * 3), Some(1));
    }
}
