//! The fuzz targets' seed inputs that only code can make (valid batch frames and missions),
//! checked against the committed ones under `fuzz/seeds/`: a change of the wire format that
//! leaves them stale fails here. `FLEETSTREAM_WRITE_SEEDS=1 cargo test -p fleetstream-events
//! --test fuzz_seeds` writes them afresh.

use std::path::PathBuf;

use events::wire::Buffer;
use events::{
    BatchMeta, DeliveryBatch, DeliveryEvent, DeliveryStage, DroneEvent, DroneEventKind, FlightStatus, GeoPoint,
    Mission, TelemetryBatch, TraceContext,
};

fn drone_events() -> Vec<DroneEvent> {
    let at = GeoPoint::new(47.6, -122.3);
    let ev = |seq: u64, kind: DroneEventKind| DroneEvent {
        drone_id: 7,
        seq,
        ts_us: 1_796_000_000_000_000 + seq,
        position: at,
        speed_mps: 12.5,
        heading_deg: 90.0,
        battery_pct: 80.0,
        status: FlightStatus::Flying,
        kind,
    };
    vec![
        ev(1, DroneEventKind::Position),
        ev(2, DroneEventKind::StatusChanged { from: FlightStatus::Idle }),
        ev(3, DroneEventKind::PickedUp { delivery: 42 }),
        ev(4, DroneEventKind::DroppedOff { delivery: 42 }),
    ]
}

fn delivery_events() -> Vec<DeliveryEvent> {
    let stages = [DeliveryStage::Created, DeliveryStage::HeadedToPickup, DeliveryStage::DeliveryComplete];
    stages
        .iter()
        .enumerate()
        .map(|(i, &stage)| DeliveryEvent {
            delivery_id: 42,
            seq: i as u32,
            drone_id: 7,
            ts_us: 1_796_000_000_000_000,
            location: GeoPoint::new(47.6, -122.3),
            stage,
        })
        .collect()
}

/// `(target, file, bytes)` of every seed made here.
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let trace = TraceContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap_or_default();
    let meta = BatchMeta { producer_id: 9, batch_seq: 3, trace };
    let telemetry = TelemetryBatch::encode(meta, &drone_events(), Buffer::new()).map(|b| b.as_bytes().to_vec());
    let deliveries = DeliveryBatch::encode(meta, &delivery_events(), Buffer::new()).map(|b| b.as_bytes().to_vec());
    let (telemetry, deliveries) = (telemetry.unwrap_or_default(), deliveries.unwrap_or_default());
    let header = events::wire::HEADER_LEN;
    // The sealed target: a control byte (kind in bit 0, event count above it), then the body.
    let sealed = |kind: u8, count: u8, frame: &[u8]| [vec![(count << 1) | kind], frame[header..].to_vec()].concat();
    let fly =
        Mission::fly(42, 7, GeoPoint::new(47.6, -122.3), GeoPoint::new(47.61, -122.31), 1_796_000_000_000_000, trace);
    let untraced = Mission { trace: TraceContext::default(), ..fly };
    let back = Mission { kind: events::MissionKind::ReturnToBase, ..fly };
    vec![
        ("batch_validate", "telemetry-4", telemetry.clone()),
        ("delivery_batch_validate", "deliveries-3", deliveries.clone()),
        ("batch_sealed", "telemetry-4", sealed(0, 4, &telemetry)),
        ("batch_sealed", "deliveries-3", sealed(1, 3, &deliveries)),
        ("mission_decode", "fly-traced", fly.to_bytes()),
        ("mission_decode", "fly", untraced.to_bytes()),
        ("mission_decode", "return-to-base", back.to_bytes()),
    ]
}

#[test]
fn committed_seeds_are_the_current_encoding() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let write = std::env::var("FLEETSTREAM_WRITE_SEEDS").is_ok();
    for (target, file, bytes) in seeds() {
        assert!(!bytes.is_empty(), "{target}/{file} encodes");
        let path = root.join(target).join(file);
        if write {
            std::fs::create_dir_all(path.parent().unwrap_or(&root)).unwrap_or_default();
            std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(committed, bytes, "{target}/{file} is stale: write it again (see the module docs)");
    }
}

/// The sealed target's seeds reach the end of validation: each is a batch the receiver takes.
#[test]
fn sealed_seeds_validate_as_the_target_builds_them() {
    use events::wire::{PayloadKind, buffer_from, seal};
    let limits = events::Limits::default();
    for (target, file, bytes) in seeds() {
        if target != "batch_sealed" {
            continue;
        }
        let (control, body) = bytes.split_first().unwrap_or((&0, &[]));
        let count = u32::from(control >> 1);
        let ok = if control & 1 == 0 {
            let frame = seal(PayloadKind::DroneEvents, count, BatchMeta::default(), body);
            TelemetryBatch::validate(buffer_from(&frame), &limits).map(|b| b.len())
        } else {
            let frame = seal(PayloadKind::DeliveryEvents, count, BatchMeta::default(), body);
            DeliveryBatch::validate(buffer_from(&frame), &limits).map(|b| b.len())
        };
        assert_eq!(ok.ok(), Some(count as usize), "{file}");
    }
}
