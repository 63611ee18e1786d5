//! Duplicate batch detection: per producer, which batch sequence numbers are already in the
//! log, over a bounded window.
//!
//! A producer numbers its batches; after a reconnect it re-sends every batch it has no answer
//! for, some of which the log already holds. Each producer gets a window of the last
//! [`WINDOW`] sequence numbers below its highest: a sequence number in the window is a repeat
//! if its bit is set. One below the window is no re-send (a producer only re-sends what it sent
//! recently, in order): it is a producer that started numbering again (restarted without
//! keeping its sequence), [`Seen::Regressed`], refused with a typed error rather than
//! acknowledged and dropped as a repeat. The windows are rebuilt from the log on start, so they
//! survive restarts. At most `max_producers` windows are kept; the least recently active is
//! forgotten first.

use rustc_hash::FxHashMap;

/// Sequence numbers remembered per producer.
pub const WINDOW: u64 = 4096;
const WORDS: usize = (WINDOW / 64) as usize;

#[derive(Debug, Clone)]
struct Window {
    /// Highest sequence number seen.
    max: u64,
    /// Bit `max - seq` (mod WINDOW) set when `seq` was seen.
    bits: Box<[u64; WORDS]>,
    /// Log offset of the last batch, for least-recently-active eviction.
    last_offset: u64,
}

impl Window {
    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }
}

/// What the windows say of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not in the log yet.
    New,
    /// In the log already (a re-send).
    Repeat,
    /// Below its producer's window: the producer numbers again from lower down.
    Regressed {
        /// The producer's highest sequence number.
        highest: u64,
    },
}

/// The windows of every producer.
#[derive(Debug)]
pub struct ProducerWindows {
    windows: FxHashMap<u64, Window>,
    max_producers: usize,
    /// Producers in the order of their activity, oldest first, each with the log offset of
    /// that activity: an entry whose offset is no longer its producer's last is stale and
    /// skipped. Eviction takes the front (amortised O(1), not a scan of every window, which
    /// made each new producer past the cap cost a pass over all of them); the queue is rebuilt
    /// from the windows when stale entries make up most of it.
    recency: std::collections::VecDeque<(u64, u64)>,
}

impl ProducerWindows {
    /// Windows for up to `max_producers` producers.
    pub fn new(max_producers: usize) -> Self {
        Self {
            windows: FxHashMap::default(),
            max_producers: max_producers.max(1),
            recency: std::collections::VecDeque::new(),
        }
    }

    /// What the log holds of `(producer, seq)`.
    pub fn check(&self, producer: u64, seq: u64) -> Seen {
        let Some(w) = self.windows.get(&producer) else { return Seen::New };
        if seq > w.max {
            return Seen::New;
        }
        if w.max - seq >= WINDOW {
            return Seen::Regressed { highest: w.max };
        }
        let (word, mask) = Window::bit(seq);
        if w.bits[word] & mask != 0 { Seen::Repeat } else { Seen::New }
    }

    /// Whether `(producer, seq)` is already in the log (a regressed one counts as not).
    pub fn contains(&self, producer: u64, seq: u64) -> bool {
        self.check(producer, seq) == Seen::Repeat
    }

    /// Records that `(producer, seq)` went into the log at `offset`.
    pub fn insert(&mut self, producer: u64, seq: u64, offset: u64) {
        if !self.windows.contains_key(&producer) && self.windows.len() >= self.max_producers {
            self.evict_one();
        }
        let w = self.windows.entry(producer).or_insert_with(|| Window {
            max: seq,
            bits: Box::new([0; WORDS]),
            last_offset: offset,
        });
        if seq > w.max {
            // Clear the bits of the sequence numbers the window slides past.
            let slide = (seq - w.max).min(WINDOW);
            for s in (w.max + 1)..=(w.max + slide) {
                let (word, mask) = Window::bit(s);
                w.bits[word] &= !mask;
            }
            w.max = seq;
        }
        if w.max - seq < WINDOW {
            let (word, mask) = Window::bit(seq);
            w.bits[word] |= mask;
        }
        w.last_offset = offset;
        self.recency.push_back((producer, offset));
        if self.recency.len() > 2 * self.windows.len() + 1024 {
            let mut live: Vec<(u64, u64)> = self.windows.iter().map(|(&p, w)| (w.last_offset, p)).collect();
            live.sort_unstable();
            self.recency = live.into_iter().map(|(offset, p)| (p, offset)).collect();
        }
    }

    /// Producers tracked.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no producer is tracked.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    fn evict_one(&mut self) {
        while let Some((producer, offset)) = self.recency.pop_front() {
            if self.windows.get(&producer).is_some_and(|w| w.last_offset == offset) {
                self.windows.remove(&producer);
                events::limits::evicted(events::limits::Table::Producers, 1);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn repeats_are_found_and_new_ones_are_not() {
        let mut w = ProducerWindows::new(10);
        assert!(!w.contains(1, 0));
        for seq in 0..100 {
            w.insert(1, seq, seq);
        }
        assert!((0..100).all(|s| w.contains(1, s)));
        assert!(!w.contains(1, 100));
        assert!(!w.contains(2, 5), "producers are independent");
        w.insert(1, 150, 200); // a gap: 100..150 never arrived
        assert!(!w.contains(1, 120));
        assert!(w.contains(1, 150));
        w.insert(1, 120, 201); // late arrival inside the window
        assert!(w.contains(1, 120));
        w.insert(1, 150 + WINDOW + 10, 202);
        assert_eq!(
            w.check(1, 150),
            Seen::Regressed { highest: 150 + WINDOW + 10 },
            "far below the window: a producer numbering again, not a re-send"
        );
        assert_eq!(w.check(1, 0), Seen::Regressed { highest: 150 + WINDOW + 10 }, "a restart at 0");
        assert_eq!(w.check(1, 150 + WINDOW + 10), Seen::Repeat);
        assert_eq!(w.check(1, 150 + WINDOW + 5), Seen::New);
    }

    #[test]
    fn the_least_recently_active_producer_is_forgotten() {
        let mut w = ProducerWindows::new(2);
        w.insert(1, 0, 10);
        w.insert(2, 0, 11);
        w.insert(1, 1, 12);
        w.insert(3, 0, 13);
        assert_eq!(w.len(), 2);
        assert!(!w.contains(2, 0), "producer 2 was the least recently active");
        assert!(w.contains(1, 1) && w.contains(3, 0));
    }

    proptest! {
        /// The evicted producer is always the least recently active one, as a scan of every
        /// window would pick, however the producers interleave.
        #[test]
        fn eviction_takes_the_least_recently_active(producers in proptest::collection::vec(0u64..12, 1..3000)) {
            let mut w = ProducerWindows::new(5);
            let mut last: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
            for (offset, &p) in producers.iter().enumerate() {
                let offset = offset as u64;
                if !last.contains_key(&p) && last.len() >= 5 {
                    let oldest = *last.iter().min_by_key(|(_, o)| **o).map(|(p, _)| p).unwrap_or(&0);
                    last.remove(&oldest);
                }
                last.insert(p, offset);
                w.insert(p, offset, offset);
                let mut tracked: Vec<u64> = w.windows.keys().copied().collect();
                let mut expected: Vec<u64> = last.keys().copied().collect();
                tracked.sort_unstable();
                expected.sort_unstable();
                prop_assert_eq!(tracked, expected);
            }
            prop_assert!(w.recency.len() <= 2 * w.len() + 1024 + 1);
        }

        /// Against a plain set: inside the window the answer is exact.
        #[test]
        fn agrees_with_a_set_inside_the_window(seqs in proptest::collection::vec(0u64..3000, 1..400)) {
            let mut w = ProducerWindows::new(4);
            let mut seen = std::collections::BTreeSet::new();
            for (i, &s) in seqs.iter().enumerate() {
                prop_assert_eq!(w.contains(9, s), seen.contains(&s), "seq {} after {:?}", s, &seqs[..i]);
                w.insert(9, s, i as u64);
                seen.insert(s);
            }
        }
    }
}
