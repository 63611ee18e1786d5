//! Arbitrary bytes through telemetry batch validation: it must return, never panic, and a batch
//! it accepts must be readable end to end.
#![no_main]

use events::wire::{BatchHeader, buffer_from};
use events::{Limits, TelemetryBatch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let _ = BatchHeader::parse(data, &limits);
    if let Ok(batch) = TelemetryBatch::validate(buffer_from(data), &limits) {
        let mut sum = 0u64;
        for ev in batch.events().iter() {
            sum = sum.wrapping_add(ev.drone_id.to_native()).wrapping_add(ev.seq.to_native());
        }
        std::hint::black_box(sum);
    }
});
