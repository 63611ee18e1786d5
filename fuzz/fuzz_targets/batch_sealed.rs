//! Batch bodies behind a correct header: the first byte picks the payload kind and the event
//! count the header claims, the rest is the body, and the header's lengths and checksum are
//! made right, so every input reaches the archive validation that the checksum otherwise
//! guards (a raw mutation almost never passes it). Validation must return, never panic, and a
//! batch it accepts must be readable end to end.
#![no_main]

use events::wire::{PayloadKind, buffer_from, seal};
use events::{BatchMeta, DeliveryBatch, Limits, TelemetryBatch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&control, body)) = data.split_first() else { return };
    let limits = Limits::default();
    let count = u32::from(control >> 1);
    if control & 1 == 0 {
        let frame = seal(PayloadKind::DroneEvents, count, BatchMeta::default(), body);
        if let Ok(batch) = TelemetryBatch::validate(buffer_from(&frame), &limits) {
            let mut sum = 0u64;
            for ev in batch.events().iter() {
                sum = sum.wrapping_add(ev.drone_id.to_native()).wrapping_add(ev.seq.to_native());
                sum = sum.wrapping_add(ev.position.lat.to_native().to_bits());
                let _ = ev.status.to_status();
            }
            std::hint::black_box(sum);
        }
    } else {
        let frame = seal(PayloadKind::DeliveryEvents, count, BatchMeta::default(), body);
        if let Ok(batch) = DeliveryBatch::validate(buffer_from(&frame), &limits) {
            let mut sum = 0u64;
            for ev in batch.events().iter() {
                sum = sum.wrapping_add(ev.delivery_id.to_native()).wrapping_add(u64::from(ev.seq.to_native()));
                let _ = ev.stage.to_stage();
            }
            std::hint::black_box(sum);
        }
    }
});
