//! Arbitrary bytes as a queued mission: decoding must return, never panic, and a mission it
//! accepts must encode back to the same bytes.
#![no_main]

use events::Mission;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Mission::from_bytes(data) {
        assert_eq!(m.to_bytes(), data);
    }
});
