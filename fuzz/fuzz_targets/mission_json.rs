//! Arbitrary bytes as a mission published over MQTT (what a drone decodes) and as a drone's
//! answer to one (what the node decodes): both must return, never panic, and an accepted
//! mission must describe the same mission after a round trip.
#![no_main]

use events::json::{MissionAck, MissionMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = MissionMessage::parse(data) {
        let again = MissionMessage::new(m.mission_id, m.attempt, &m.mission());
        assert_eq!(again.mission(), m.mission());
    }
    let _ = MissionAck::parse(data);
});
