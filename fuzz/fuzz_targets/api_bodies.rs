//! Arbitrary bytes as the JSON body of each HTTP route that takes one (orders, reschedules,
//! drone registrations, notification subscriptions, and the internal calls between services:
//! assignments, owner notes, spans): the first byte picks the route. Decoding must return,
//! never panic, and what it accepts must encode and decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn round_trip<T: DeserializeOwned + Serialize>(body: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(body) {
        let again = serde_json::to_vec(&value).expect("an accepted body encodes");
        let back: T = serde_json::from_slice(&again).expect("an encoded body decodes");
        assert_eq!(serde_json::to_vec(&back).ok(), Some(again));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    match which % 7 {
        0 => round_trip::<services::CreateDelivery>(body),
        1 => round_trip::<services::Reschedule>(body),
        2 => {
            if let Ok(r) = serde_json::from_slice::<services::drones::RegisterDrones>(body) {
                std::hint::black_box(r.drones.len());
            }
        }
        3 => round_trip::<services::drones::AssignRequest>(body),
        4 => round_trip::<services::notify::Subscription>(body),
        5 => round_trip::<services::history::OwnerNote>(body),
        _ => round_trip::<Vec<services::spans::KeptSpan>>(body),
    }
});
