//! A circuit breaker for calls to one dependency, as a pure state machine with time passed in
//! (µs): the caller asks [`Breaker::allow`] before a call and reports the outcome with
//! [`Breaker::record`]. No clock, no I/O, so every transition is tested exactly.
//!
//! - **Closed**: calls pass. Outcomes are counted in a sliding window of one-second buckets;
//!   when the window holds at least `min_calls` and the failure ratio reaches `failure_ratio`,
//!   the breaker opens.
//! - **Open** for `open_for`: calls are refused at once (fail fast, with when to retry), so a
//!   failing dependency is not hammered and callers do not queue behind its timeouts.
//! - **Half-open** after that: up to `probes` calls pass as probes; if all succeed the breaker
//!   closes (with a fresh window), and the first failure opens it again.

use serde::{Deserialize, Serialize};

/// Breaker settings. Defaults: a 10 s window, at least 20 calls, open at 50 % failures, stay
/// open 5 s, then 3 probes: quick to notice a dependency that is down, slow enough not to trip
/// on a handful of unlucky calls.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Seconds of outcomes the failure ratio is computed over.
    pub window_s: u32,
    /// Calls the window must hold before the breaker may open.
    pub min_calls: u32,
    /// Failure ratio (0..=1) that opens the breaker.
    pub failure_ratio: f64,
    /// How long the breaker stays open, ms.
    pub open_ms: u64,
    /// Calls let through while half-open.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { window_s: 10, min_calls: 20, failure_ratio: 0.5, open_ms: 5_000, probes: 3 }
    }
}

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls pass.
    Closed,
    /// Calls are refused until the time, µs.
    Open {
        /// When probing may start.
        until_us: u64,
    },
    /// Probing.
    HalfOpen {
        /// Probes let through so far.
        started: u32,
        /// Probes that succeeded.
        succeeded: u32,
    },
}

/// Why a call was refused: the breaker is open (or its probes are all out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// When to try again, µs.
    pub retry_at_us: u64,
}

/// One dependency's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: State,
    /// (second, calls, failures), oldest first.
    buckets: std::collections::VecDeque<(u64, u32, u32)>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self { cfg, state: State::Closed, buckets: std::collections::VecDeque::new() }
    }

    /// The current state (as of the last call to `allow` or `record`).
    pub fn state(&self) -> State {
        self.state
    }

    /// May a call start at `now_us`?
    pub fn allow(&mut self, now_us: u64) -> Result<(), Refused> {
        match self.state {
            State::Closed => Ok(()),
            State::Open { until_us } if now_us < until_us => Err(Refused { retry_at_us: until_us }),
            State::Open { .. } => {
                self.state = State::HalfOpen { started: 1, succeeded: 0 };
                Ok(())
            }
            State::HalfOpen { started, succeeded } if started < self.cfg.probes.max(1) => {
                self.state = State::HalfOpen { started: started + 1, succeeded };
                Ok(())
            }
            // Every probe is out: refuse until they report (ask again after a tenth of open_ms).
            State::HalfOpen { .. } => Err(Refused { retry_at_us: now_us + self.cfg.open_ms * 1000 / 10 }),
        }
    }

    /// Reports how an allowed call ended.
    pub fn record(&mut self, now_us: u64, success: bool) {
        match self.state {
            State::HalfOpen { started, succeeded } => {
                if !success {
                    self.trip(now_us);
                } else if succeeded + 1 >= self.cfg.probes.max(1) {
                    self.state = State::Closed;
                    self.buckets.clear();
                } else {
                    self.state = State::HalfOpen { started, succeeded: succeeded + 1 };
                }
            }
            // A call allowed before the breaker opened: its outcome no longer matters.
            State::Open { .. } => {}
            State::Closed => {
                let second = now_us / 1_000_000;
                match self.buckets.back_mut() {
                    Some((s, calls, failures)) if *s == second => {
                        *calls += 1;
                        *failures += u32::from(!success);
                    }
                    _ => self.buckets.push_back((second, 1, u32::from(!success))),
                }
                let oldest = second.saturating_sub(u64::from(self.cfg.window_s.max(1)) - 1);
                while self.buckets.front().is_some_and(|(s, _, _)| *s < oldest) {
                    self.buckets.pop_front();
                }
                let (calls, failures) = self.buckets.iter().fold((0, 0), |(c, f), (_, bc, bf)| (c + bc, f + bf));
                if calls >= self.cfg.min_calls && f64::from(failures) >= self.cfg.failure_ratio * f64::from(calls) {
                    self.trip(now_us);
                }
            }
        }
    }

    fn trip(&mut self, now_us: u64) {
        self.state = State::Open { until_us: now_us + self.cfg.open_ms * 1000 };
        self.buckets.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig { window_s: 10, min_calls: 4, failure_ratio: 0.5, open_ms: 5_000, probes: 2 })
    }

    #[test]
    fn it_opens_on_the_failure_ratio_only_once_the_window_has_enough_calls() {
        let mut b = breaker();
        for _ in 0..3 {
            assert_eq!(b.allow(0), Ok(()));
            b.record(0, false);
        }
        assert_eq!(b.state(), State::Closed, "three calls are fewer than min_calls");
        assert_eq!(b.allow(S), Ok(()));
        b.record(S, true);
        assert_eq!(b.state(), State::Open { until_us: S + 5 * S }, "3 of 4 failed");
        assert_eq!(b.allow(2 * S), Err(Refused { retry_at_us: 6 * S }), "open: refused at once");
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut b = breaker();
        for _ in 0..3 {
            assert_eq!(b.allow(0), Ok(()));
            b.record(0, false);
        }
        // Eleven seconds later those failures are out of the 10 s window.
        for _ in 0..4 {
            assert_eq!(b.allow(11 * S), Ok(()));
            b.record(11 * S, true);
        }
        assert_eq!(b.allow(11 * S), Ok(()));
        b.record(11 * S, false);
        assert_eq!(b.state(), State::Closed, "1 failure in 5 calls");
    }

    #[test]
    fn half_open_probes_close_it_or_open_it_again() {
        let mut b = breaker();
        for _ in 0..4 {
            assert_eq!(b.allow(0), Ok(()));
            b.record(0, false);
        }
        assert!(matches!(b.state(), State::Open { .. }));
        // After open_ms: two probes pass, a third waits for them.
        assert_eq!(b.allow(5 * S), Ok(()));
        assert_eq!(b.allow(5 * S), Ok(()));
        assert!(b.allow(5 * S).is_err(), "only the probes pass");
        b.record(5 * S, true);
        assert!(matches!(b.state(), State::HalfOpen { .. }));
        b.record(5 * S, true);
        assert_eq!(b.state(), State::Closed, "the dependency is back");

        // Trip again; this time a probe fails and it reopens for another open_ms.
        for _ in 0..4 {
            assert_eq!(b.allow(6 * S), Ok(()));
            b.record(6 * S, false);
        }
        assert_eq!(b.allow(11 * S), Ok(()));
        b.record(11 * S, false);
        assert_eq!(b.state(), State::Open { until_us: 16 * S });
    }
}
