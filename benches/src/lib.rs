//! Shared fixtures for the criterion benches: realistic batches of drone events.

use events::wire::Buffer;
use events::{BatchMeta, DroneEvent, DroneEventKind, FlightStatus, GeoPoint, TelemetryBatch};

/// `n` position events spread over `drones` drones, as a gateway would batch them.
pub fn drone_events(n: usize, drones: u64) -> Vec<DroneEvent> {
    (0..n as u64)
        .map(|i| DroneEvent {
            drone_id: i % drones,
            seq: i / drones + 1,
            ts_us: 1_700_000_000_000_000 + i,
            position: GeoPoint { lat: 47.6 + (i % 100) as f64 * 1e-4, lon: -122.3, alt_m: 60.0 },
            speed_mps: 14.0,
            heading_deg: 90.0,
            battery_pct: 80.0,
            status: FlightStatus::Flying,
            kind: DroneEventKind::Position,
        })
        .collect()
}

/// The same events encoded as one batch.
pub fn batch(n: usize, drones: u64) -> TelemetryBatch {
    TelemetryBatch::encode(BatchMeta::default(), &drone_events(n, drones), Buffer::new())
        .unwrap_or_else(|e| panic!("encoding a fixture batch: {e}"))
}
