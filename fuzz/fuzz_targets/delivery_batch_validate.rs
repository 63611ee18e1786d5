//! Arbitrary bytes through delivery batch validation (what a remote subscriber decodes).
#![no_main]

use events::wire::buffer_from;
use events::{DeliveryBatch, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = DeliveryBatch::validate(buffer_from(data), &Limits::default()) {
        for ev in batch.events().iter() {
            std::hint::black_box(ev.stage.to_stage());
        }
    }
});
