//! Arbitrary bytes as an HTTP or MQTT telemetry body (a JSON array, one event, or NDJSON):
//! parsing must return, never panic, hold at most the limit it was given, and every event it
//! accepts must pass the checks and survive a round trip through JSON.
#![no_main]

use events::json::{check, parse_events};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = parse_events(data, 64) {
        assert!(events.len() <= 64);
        for e in &events {
            assert!(check(e).is_ok(), "an accepted event fails the checks: {e:?}");
            let again = serde_json::to_vec(e).expect("an event encodes");
            let back = parse_events(&again, 1).expect("an accepted event parses again");
            assert_eq!(back.len(), 1);
        }
    }
});
