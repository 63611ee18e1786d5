//! Drone events as JSON, for the adapters in front of the QUIC batch format: HTTP telemetry
//! (`POST /v1/telemetry`) and the MQTT bridge read the very form the telemetry stream emits
//! (`GET /v1/streams/drone-telemetry/events`), so a captured stream can be replayed as is.
//!
//! A body is a JSON array of events, one event, or NDJSON (one event per line). Each event is
//! checked the way the domain bounds it (coordinates, speed, heading, battery, a time before
//! [`MAX_TS_US`]), each bound one the OpenAPI schema of [`DroneEvent`] states too, and the first
//! bad one is reported with its index and the field at fault, so a sender can find it without
//! guessing. Nothing here does I/O.

use crate::model::{DroneEvent, GeoPoint};
use crate::queue::{Mission, MissionKind};
use crate::wire::TraceContext;

/// The fastest ground speed taken as plausible, m/s (a delivery drone flies at 10-30).
pub const MAX_SPEED_MPS: f32 = 150.0;
/// The latest `ts_us` taken as plausible: 2100-01-01T00:00:00Z, in µs since the Unix epoch.
pub const MAX_TS_US: u64 = 4_102_444_800_000_000;
/// The largest integer an event carries in JSON (`seq`, ids): the schema's integers are `int64`.
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// Reads an integer as JSON Schema reads `integer` (`7` and `7.0` alike, never a fraction),
/// from 0 to [`MAX_SEQ`]: the schema's integers are `int64`.
pub(crate) fn integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    use serde::Deserialize;
    use serde::de::Error as _;
    let n = serde_json::Number::deserialize(d)?;
    integer_of(&n).ok_or_else(|| D::Error::custom(format!("{n} is not an integer from 0 to {MAX_SEQ}")))
}

/// `n` as JSON Schema's `int64` from 0 reads it: `7` and `7.0` alike, never a fraction, a
/// negative or anything past [`MAX_SEQ`] (2^63 - 1, what PostgreSQL's BIGINT holds too).
pub fn integer_of(n: &serde_json::Number) -> Option<u64> {
    let whole = n.as_f64().filter(|f| f.fract() == 0.0 && (0.0..=MAX_SEQ as f64).contains(f)).map(|f| f as u64);
    n.as_u64().or(whole).filter(|&v| v <= MAX_SEQ)
}

/// Why an event was refused: which one, which field, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventError {
    /// The event's position in the body, from 0 (the line for NDJSON, from 0 too).
    pub index: usize,
    /// The field at fault as a path (`position.lat`, `kind.type`), empty for the event as a whole.
    pub field: String,
    /// What was wrong with it.
    pub message: String,
}

impl std::fmt::Display for EventError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "event {}: {}", self.index, self.message)
        } else {
            write!(f, "event {}, field {}: {}", self.index, self.field, self.message)
        }
    }
}

impl std::error::Error for EventError {}

/// Reads the events of `body` (array, single object or NDJSON), at most `max_events`, each
/// checked by [`check`].
pub fn parse_events(body: &[u8], max_events: usize) -> Result<Vec<DroneEvent>, EventError> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace());
    let events = match start.map(|i| body[i]) {
        None => return Err(whole(0, "the body holds no event")),
        Some(b'[') => parse_array(body, max_events)?,
        Some(_) => parse_lines(body, max_events)?,
    };
    if events.is_empty() {
        return Err(whole(0, "the body holds no event"));
    }
    for (index, event) in events.iter().enumerate() {
        check(event).map_err(|(field, message)| EventError { index, field: field.into(), message })?;
    }
    Ok(events)
}

fn whole(index: usize, message: &str) -> EventError {
    EventError { index, field: String::new(), message: message.into() }
}

/// A JSON array: deserialized in one pass; an error's path starts with the element's index.
fn parse_array(body: &[u8], max_events: usize) -> Result<Vec<DroneEvent>, EventError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let events: Vec<DroneEvent> = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // The path of an element's field reads `[3].position.lat`.
        let (index, field) = match path.strip_prefix('[').and_then(|p| p.split_once(']')) {
            Some((i, rest)) => (i.parse().unwrap_or(0), rest.trim_start_matches('.').to_string()),
            None => (0, String::new()),
        };
        EventError { index, field, message: plain(&inner) }
    })?;
    de.end().map_err(|e| whole(events.len(), &plain(&e)))?;
    if events.len() > max_events {
        return Err(whole(max_events, &format!("more than {max_events} events in one body")));
    }
    Ok(events)
}

/// One object, or several separated by whitespace (NDJSON): read one at a time.
fn parse_lines(body: &[u8], max_events: usize) -> Result<Vec<DroneEvent>, EventError> {
    let mut events = Vec::new();
    let mut stream = serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>();
    loop {
        let index = events.len();
        let value = match stream.next() {
            None => break,
            Some(Ok(value)) => value,
            Some(Err(e)) => return Err(whole(index, &plain(&e))),
        };
        if index == max_events {
            return Err(whole(index, &format!("more than {max_events} events in one body")));
        }
        let event = serde_path_to_error::deserialize::<_, DroneEvent>(value).map_err(|e| EventError {
            index,
            field: e.path().to_string().trim_start_matches('.').to_string(),
            message: plain(e.inner()),
        })?;
        events.push(event);
    }
    Ok(events)
}

/// serde's message without its position suffix (` at line 1 column 20`), which points into a
/// body the sender did not lay out by hand.
fn plain(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Whether an event is plausible: `Err((field, why))` otherwise.
pub fn check(e: &DroneEvent) -> Result<(), (&'static str, String)> {
    let p = &e.position;
    if !(p.lat.is_finite() && (-90.0..=90.0).contains(&p.lat)) {
        return Err(("position.lat", format!("{} is not a latitude (-90..=90)", p.lat)));
    }
    if !(p.lon.is_finite() && (-180.0..=180.0).contains(&p.lon)) {
        return Err(("position.lon", format!("{} is not a longitude (-180..=180)", p.lon)));
    }
    // The schema's bounds, as the nearest `f32`s inside them.
    if !(p.alt_m.is_finite() && (-3.4e38..=3.4e38).contains(&p.alt_m)) {
        return Err(("position.alt_m", format!("{} is outside -3.4e38..=3.4e38", p.alt_m)));
    }
    if !(e.speed_mps.is_finite() && (0.0..=MAX_SPEED_MPS).contains(&e.speed_mps)) {
        return Err(("speed_mps", format!("{} is outside 0..={MAX_SPEED_MPS}", e.speed_mps)));
    }
    if !(e.heading_deg.is_finite() && (0.0..360.0).contains(&e.heading_deg)) {
        return Err(("heading_deg", format!("{} is outside 0..360", e.heading_deg)));
    }
    if !(e.battery_pct.is_finite() && (0.0..=100.0).contains(&e.battery_pct)) {
        return Err(("battery_pct", format!("{} is outside 0..=100", e.battery_pct)));
    }
    if e.ts_us > MAX_TS_US {
        return Err(("ts_us", format!("{} lies after 2100-01-01 ({MAX_TS_US})", e.ts_us)));
    }
    Ok(())
}

/// Where missions are published by default, `<topic>/{drone_id}`, and answered,
/// `<topic>/{drone_id}/ack` (the node's `[mqtt] missions_topic`).
pub const DEFAULT_MISSIONS_TOPIC: &str = "fleetstream/missions";

/// What a mission tells the drone, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissionKindName {
    /// [`MissionKind::Fly`].
    Fly,
    /// [`MissionKind::ReturnToBase`].
    ReturnToBase,
}

/// A mission as the MQTT bridge publishes it on `fleetstream/missions/{drone_id}`: the
/// `drone-commands` message's id and attempt beside the mission's fields.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissionMessage {
    /// The message's id in `drone-commands`: the drone acknowledges the mission with it.
    pub mission_id: u64,
    /// Which delivery attempt this is, from 1: above 1 the drone may have had it already (a
    /// mission is taken once per delivery, see [`MissionKind::Fly`]).
    pub attempt: u32,
    /// What to do.
    pub kind: MissionKindName,
    /// The delivery.
    pub delivery_id: u64,
    /// The drone.
    pub drone_id: u64,
    /// Where the package is collected.
    pub pickup: GeoPoint,
    /// Where it is dropped off.
    pub dropoff: GeoPoint,
    /// When the delivery was scheduled, µs since the epoch.
    pub ts_us: u64,
    /// The scheduling request's W3C `traceparent`, for the drone to carry on the telemetry that
    /// flies the mission; absent when untraced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl MissionMessage {
    /// `m`, leased as message `mission_id` on its `attempt`.
    pub fn new(mission_id: u64, attempt: u32, m: &Mission) -> Self {
        Self {
            mission_id,
            attempt,
            kind: match m.kind {
                MissionKind::Fly => MissionKindName::Fly,
                MissionKind::ReturnToBase => MissionKindName::ReturnToBase,
            },
            delivery_id: m.delivery_id,
            drone_id: m.drone_id,
            pickup: m.pickup,
            dropoff: m.dropoff,
            ts_us: m.ts_us,
            traceparent: m.trace.is_some().then(|| m.trace.to_header()),
        }
    }

    /// Reads a published mission; a place off the globe or a bad `traceparent` is refused.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let m: Self = serde_json::from_slice(body).map_err(|e| plain(&e))?;
        if !(m.pickup.is_valid() && m.dropoff.is_valid()) {
            return Err("a mission's places must be on the globe".into());
        }
        if m.traceparent.as_deref().is_some_and(|t| TraceContext::parse(t).is_none()) {
            return Err("traceparent is not a W3C trace context".into());
        }
        Ok(m)
    }

    /// The mission itself.
    pub fn mission(&self) -> Mission {
        let kind = match self.kind {
            MissionKindName::Fly => MissionKind::Fly,
            MissionKindName::ReturnToBase => MissionKind::ReturnToBase,
        };
        let trace = self.traceparent.as_deref().and_then(TraceContext::parse).unwrap_or_default();
        Mission {
            kind,
            delivery_id: self.delivery_id,
            drone_id: self.drone_id,
            pickup: self.pickup,
            dropoff: self.dropoff,
            ts_us: self.ts_us,
            trace,
        }
    }
}

/// A drone's answer to a mission, on `fleetstream/missions/{drone_id}/ack`: done with it, or
/// (with `error`) unable to fly it, which offers it again or dead-letters it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissionAck {
    /// The [`MissionMessage::mission_id`] answered.
    #[serde(deserialize_with = "integer")]
    pub mission_id: u64,
    /// Why the drone could not take it; absent when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MissionAck {
    /// Longest `error` kept: the queue records it as the reason.
    pub const MAX_ERROR: usize = 1024;

    /// Reads an answer.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let mut a: Self = serde_json::from_slice(body).map_err(|e| plain(&e))?;
        if let Some(e) = &mut a.error
            && e.len() > Self::MAX_ERROR
        {
            let mut cut = Self::MAX_ERROR;
            while !e.is_char_boundary(cut) {
                cut -= 1;
            }
            e.truncate(cut);
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DroneEventKind, FlightStatus};

    const NOW: u64 = 1_700_000_000_000_000;

    fn event(drone_id: u64, seq: u64) -> DroneEvent {
        DroneEvent {
            drone_id,
            seq,
            ts_us: NOW,
            position: GeoPoint { lat: 47.6, lon: -122.3, alt_m: 30.0 },
            speed_mps: 12.5,
            heading_deg: 90.0,
            battery_pct: 80.0,
            status: FlightStatus::Flying,
            kind: DroneEventKind::DroppedOff { delivery: 7 },
        }
    }

    /// `v` as JSON: our own values always serialize.
    fn json(v: &impl serde::Serialize) -> Vec<u8> {
        serde_json::to_vec(v).expect("serializes") // ok: test code, our own values
    }

    /// The events of `body`, which must be accepted.
    fn read(body: &[u8]) -> Vec<DroneEvent> {
        parse_events(body, 10).expect("accepted") // ok: test code, the test's failure
    }

    /// Why `values` is refused, which it must be.
    fn refused(values: &[serde_json::Value]) -> EventError {
        parse_events(&json(&values), 10).expect_err("refused") // ok: test code, the test's failure
    }

    #[test]
    fn the_streamed_form_reads_back_as_array_object_and_ndjson() {
        let events = vec![event(1, 1), event(2, 5)];
        assert_eq!(read(&json(&events)), events);
        assert_eq!(read(&json(&events[0])), events[..1]);
        let mut ndjson = Vec::new();
        for e in &events {
            ndjson.extend(json(e));
            ndjson.push(b'\n');
        }
        assert_eq!(read(&ndjson), events);
        // The documented example, typed by hand, with altitude left out.
        let typed = br#"{"drone_id": 3, "seq": 1, "ts_us": 1700000000000000, "position": {"lat": 1, "lon": 2},
            "speed_mps": 0, "heading_deg": 0, "battery_pct": 50, "status": "idle", "kind": {"type": "position"}}"#;
        assert_eq!(read(typed)[0].drone_id, 3);
    }

    #[test]
    fn a_bad_event_is_named_by_index_and_field() {
        let mut values: Vec<serde_json::Value> =
            (0..4).map(|i| serde_json::from_slice(&json(&event(1, i))).unwrap_or_default()).collect();
        values[2]["position"]["lat"] = serde_json::json!("north");
        let err = refused(&values);
        assert_eq!((err.index, err.field.as_str()), (2, "position.lat"), "{err}");
        assert!(!err.message.contains("line"), "{err}");

        values[2]["position"]["lat"] = serde_json::json!(91.0);
        let err = refused(&values);
        assert_eq!((err.index, err.field.as_str()), (2, "position.lat"), "{err}");

        values[2]["position"]["lat"] = serde_json::json!(1.0);
        values[3]["kind"] = serde_json::json!({"type": "teleported"});
        let err = refused(&values);
        assert_eq!(err.index, 3, "{err}");
        assert!(err.field.starts_with("kind"), "{err}");

        values[3]["kind"] = serde_json::json!({"type": "position", "delivery": 4});
        let err = refused(&values);
        assert_eq!((err.index, err.field.as_str()), (3, "kind"), "{err}");
        values[3]["kind"] = serde_json::json!({"type": "position"});
        values[1]["colour"] = serde_json::json!("red");
        let err = refused(&values);
        assert_eq!(err.index, 1, "{err}");
        assert!(err.message.contains("colour"), "{err}");

        // Integers as JSON Schema reads them: 3.0 is 3; 3.5, -1 and 2^63 are not ids.
        values[1].as_object_mut().map(|o| o.remove("colour"));
        values[1]["seq"] = serde_json::json!(3.0);
        assert_eq!(read(&json(&values))[1].seq, 3);
        for bad in [serde_json::json!(3.5), serde_json::json!(-1), serde_json::json!(9_223_372_036_854_775_808_u64)] {
            values[1]["seq"] = bad;
            let err = refused(&values);
            assert_eq!((err.index, err.field.as_str()), (1, "seq"), "{err}");
        }

        let ndjson = b"{\"drone_id\": 1}\n";
        let err = parse_events(ndjson, 10).expect_err("refused"); // ok: test code, the test's failure
        assert_eq!(err.index, 0);
        assert!(err.message.contains("missing field"), "{err}");
    }

    #[test]
    fn implausible_values_and_empty_or_oversize_bodies_are_refused() {
        type Spoil = fn(&mut DroneEvent);
        let cases: [(&str, Spoil); 6] = [
            ("speed_mps", |e| e.speed_mps = -1.0),
            ("heading_deg", |e| e.heading_deg = 360.0),
            ("battery_pct", |e| e.battery_pct = f32::NAN),
            ("position.lon", |e| e.position.lon = 200.0),
            ("ts_us", |e| e.ts_us = MAX_TS_US + 1),
            ("position.alt_m", |e| e.position.alt_m = f32::MIN),
        ];
        for (field, spoil) in cases {
            let mut e = event(1, 1);
            spoil(&mut e);
            assert_eq!(check(&e).map_err(|(f, _)| f), Err(field));
        }
        assert!(parse_events(b"  ", 10).is_err());
        assert!(parse_events(b"[]", 10).is_err());
        let three = json(&vec![event(1, 1); 3]);
        assert_eq!(parse_events(&three, 2).map_err(|e| e.index), Err(2));
        let lines = vec![json(&event(1, 1)); 3].join(&b'\n');
        assert_eq!(parse_events(&lines, 2).map_err(|e| e.index), Err(2));
        assert!(parse_events(b"[{\"drone_id\": 1", 10).is_err());
    }

    #[test]
    fn missions_and_their_answers_round_trip_and_bad_ones_are_refused() {
        let trace = TraceContext::new_root();
        let m = Mission::fly(7, 3, GeoPoint::new(47.6, -122.3), GeoPoint::new(47.7, -122.2), NOW, trace);
        let msg = MissionMessage::new(11, 2, &m);
        let back = MissionMessage::parse(&json(&msg)).expect("reads back"); // ok: test code, the test's failure
        assert_eq!(back, msg);
        assert_eq!(back.mission(), m);
        let rtb = Mission { kind: MissionKind::ReturnToBase, trace: TraceContext::default(), ..m };
        let text = json(&MissionMessage::new(12, 1, &rtb));
        assert!(!String::from_utf8_lossy(&text).contains("traceparent"));
        assert!(String::from_utf8_lossy(&text).contains("\"return_to_base\""));
        assert_eq!(MissionMessage::parse(&text).map(|r| r.mission()), Ok(rtb));
        let mut off = MissionMessage::new(13, 1, &m);
        off.pickup.lat = 95.0;
        assert!(MissionMessage::parse(&json(&off)).is_err());
        off.pickup.lat = 1.0;
        off.traceparent = Some("00-zz".into());
        assert!(MissionMessage::parse(&json(&off)).is_err());

        assert_eq!(MissionAck::parse(br#"{"mission_id": 11}"#), Ok(MissionAck { mission_id: 11, error: None }));
        let long = format!(r#"{{"mission_id": 11, "error": "{}"}}"#, "é".repeat(1000));
        let nack = MissionAck::parse(long.as_bytes()).expect("reads"); // ok: test code, the test's failure
        assert!(nack.error.is_some_and(|e| e.len() <= MissionAck::MAX_ERROR && e.starts_with('é')));
        for bad in [&br#"{}"#[..], br#"{"mission_id": -1}"#, br#"{"mission_id": 1, "ok": true}"#, b"ack"] {
            assert!(MissionAck::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
