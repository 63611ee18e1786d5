//! Telemetry that arrives as JSON rather than QUIC batches: `POST /v1/telemetry` here, the
//! MQTT bridge beside it. Both turn events into a batch of the wire format and submit it to the
//! engine like any QUIC batch (the same log, producer dedup and derivation), and answer only
//! once the engine says the batch is durable.
//!
//! Each adapter of a node is one producer to the engine: its id is fixed per data directory
//! and adapter ([`Intake::open`]), and its batch numbers start from the clock at each start
//! (µs), so they keep rising across restarts without being stored. Numbers are taken and
//! batches submitted under one lock, so they reach the appender in order and none falls below
//! the dedup window. A sender that retries a request makes a new batch, so batches cannot tell
//! repeats: each drone's sequence numbers do ([`Intake::submit`] leaves out the events already
//! taken).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Json, Router};
use events::{BatchMeta, BatchSink, DroneEvent, TelemetryBatch, TraceContext};
use serde::Serialize;
use services::Error;
use services::JsonLines;

use crate::engine::Engine;

/// Where an adapter's events go in.
#[derive(Debug, Clone)]
pub struct Intake {
    engine: Engine,
    node: std::sync::Arc<str>,
    producer: u64,
    max_events: usize,
    numbering: std::sync::Arc<tokio::sync::Mutex<Numbering>>,
}

/// Drones tracked by an intake's repeat filter at most (about 40 bytes each with the map's
/// overhead); past it the filter starts over, asking the engine again as drones come.
const MAX_TRACKED_DRONES: usize = 1 << 20;

/// An intake's batch numbers and, per drone, the lowest sequence number not yet taken.
#[derive(Debug)]
struct Numbering {
    next: u64,
    floor: std::collections::HashMap<u64, u64>,
}

/// The adapters, each its own producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adapter {
    /// `POST /v1/telemetry`.
    Http,
    /// The MQTT bridge.
    Mqtt,
}

impl Intake {
    /// The intake of `adapter` on the node whose lasting name is `node` (see
    /// [`services::node_name`]). Producer ids of adapters have the top bit set, which no QUIC
    /// producer of loadgen uses.
    pub fn open(engine: Engine, node: &str, adapter: Adapter, max_events: usize) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in node.bytes().chain([adapter as u8]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Self {
            engine,
            node: node.into(),
            producer: h | 1 << 63,
            max_events: max_events.max(1),
            numbering: std::sync::Arc::new(tokio::sync::Mutex::new(Numbering {
                next: events::now_us(),
                floor: std::collections::HashMap::new(),
            })),
        }
    }

    /// The intake of `adapter` on the node of `cfg`, named by its data directory.
    pub fn for_node(engine: Engine, cfg: &crate::config::Config, adapter: Adapter) -> Result<Self, crate::Error> {
        let node = services::node_name(&cfg.data_dir.join("services"))
            .map_err(|e| crate::Error::Task(format!("the node's name: {e}")))?;
        Ok(Self::open(engine, &node, adapter, events::wire::DEFAULT_MAX_EVENTS as usize))
    }

    /// The lasting name of the node it feeds.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// This adapter's producer id.
    pub fn producer(&self) -> u64 {
        self.producer
    }

    /// The engine it submits to.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Most events one call takes.
    pub fn max_events(&self) -> usize {
        self.max_events
    }

    /// Submits `events` as one batch and waits until the engine holds it durably; returns how
    /// many were repeats, left out.
    ///
    /// A drone's event whose sequence number is not above every one this intake (or, for a drone
    /// it has not seen since it started, the engine) has taken is a repeat: a message the broker
    /// offers again after a crash, or a request a client sends again. It is left out of the
    /// batch, so it is not in the log twice; a batch of nothing but repeats is not submitted.
    /// When a batch fails, its drones are forgotten and asked of the engine again next time, so
    /// what is offered again is taken.
    pub async fn submit(&self, events: &[DroneEvent], trace: TraceContext) -> Result<usize, events::Error> {
        let mut n = self.numbering.lock().await;
        // Drones met for the first time are asked of the engine first: the only wait before the
        // batch is built, so a failed question leaves no floor moved.
        if n.floor.len().saturating_add(events.len()) > MAX_TRACKED_DRONES {
            n.floor.clear();
        }
        for e in events {
            if let std::collections::hash_map::Entry::Vacant(slot) = n.floor.entry(e.drone_id) {
                let known = events::FleetControl::drone(&self.engine, e.drone_id).await?;
                slot.insert(known.map_or(0, |d| d.last_seq.saturating_add(1)));
            }
        }
        // The events above each drone's floor, copied only when some are repeats.
        let mut kept: Option<Vec<DroneEvent>> = None;
        for (i, e) in events.iter().enumerate() {
            let floor = n.floor.entry(e.drone_id).or_insert(0);
            if e.seq < *floor {
                kept.get_or_insert_with(|| events[..i].to_vec());
                continue;
            }
            *floor = e.seq.saturating_add(1);
            if let Some(k) = &mut kept {
                k.push(*e);
            }
        }
        let batch_events = kept.as_deref().unwrap_or(events);
        let repeats = events.len() - batch_events.len();
        if batch_events.is_empty() {
            return Ok(repeats);
        }
        // What a failed batch moved is forgotten, so its events are taken when they come again.
        let forget = |n: &mut Numbering| {
            for e in batch_events {
                n.floor.remove(&e.drone_id);
            }
        };
        let meta = BatchMeta { producer_id: self.producer, batch_seq: n.next, trace };
        let submitted = match TelemetryBatch::encode(meta, batch_events, events::wire::buffer_from(&[])) {
            Ok(batch) => self.engine.submit(batch).await,
            Err(e) => Err(e),
        };
        let ack = match submitted {
            Ok(ack) => ack,
            Err(e) => {
                forget(&mut n);
                return Err(e);
            }
        };
        n.next += 1;
        drop(n);
        match ack.await {
            Ok(()) => Ok(repeats),
            Err(e) => {
                let mut n = self.numbering.lock().await;
                forget(&mut n);
                // Numbered below the window (the clock stepped back past it): number on from
                // above it, so the sender's next try is taken.
                if let events::Error::SequenceRegressed { highest, .. } = e {
                    n.next = n.next.max(highest.saturating_add(1));
                }
                Err(e)
            }
        }
    }
}

/// `POST /v1/telemetry`.
pub fn router(intake: Intake) -> Router {
    Router::new().route("/v1/telemetry", post(telemetry)).with_state(intake)
}

/// Events taken.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    /// How many events the batch held; all of them are durable.
    pub accepted: usize,
}

/// The request body as documented: one to [`events::wire::DEFAULT_MAX_EVENTS`] events.
/// (A schema only: the handler reads the body with [`events::json`].)
struct TelemetryEvents;

impl utoipa::PartialSchema for TelemetryEvents {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ArrayBuilder::new()
            .items(utoipa::openapi::Ref::from_schema_name("DroneEvent"))
            .min_items(Some(1))
            .max_items(Some(events::wire::DEFAULT_MAX_EVENTS as usize))
            .into()
    }
}

impl utoipa::ToSchema for TelemetryEvents {}

/// Takes drone events in the form the telemetry stream emits: a JSON array, one event, or
/// NDJSON (`application/x-ndjson`). `202` once they are durable, through the same log, dedup
/// and derivation as QUIC batches; `400` naming the first bad event's index and field.
#[utoipa::path(
    post, path = "/v1/telemetry", tag = "telemetry",
    request_body(content = TelemetryEvents, description = "an array of drone events (or one, or NDJSON)",
        content_type = "application/json"),
    responses(
        (status = 202, description = "every event is durable", body = Accepted),
        (status = 400, description = "a malformed or implausible event, named by its index and field",
            body = services::error::ErrorBody),
    )
)]
async fn telemetry(
    State(intake): State<Intake>,
    trace: Option<Extension<TraceContext>>,
    JsonLines(body): JsonLines,
) -> Result<(StatusCode, Json<Accepted>), Error> {
    let events = events::json::parse_events(&body, intake.max_events).map_err(|e| Error::BadRequest(e.to_string()))?;
    intake.submit(&events, trace.map(|Extension(t)| t).unwrap_or_default()).await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted: events.len() })))
}

/// The route's part of the OpenAPI document.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    paths(telemetry),
    components(schemas(TelemetryEvents, DroneEvent, events::DroneEventKind, Accepted)),
    modifiers(&ClosedKinds)
)]
pub struct TelemetryDoc;

/// Each form of `kind` takes no field but its own, as the handler reads it (serde's
/// `deny_unknown_fields`, which the schema of a tagged enum's variants does not carry).
struct ClosedKinds;

impl utoipa::Modify for ClosedKinds {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::schema::{AdditionalProperties, Schema};
        let Some(components) = doc.components.as_mut() else { return };
        let Some(RefOr::T(Schema::OneOf(kinds))) = components.schemas.get_mut("DroneEventKind") else { return };
        for item in &mut kinds.items {
            if let RefOr::T(Schema::Object(object)) = item {
                object.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_closes_every_form_of_kind() {
        let doc = serde_json::to_value(crate::admin::api_document()).unwrap_or_default();
        let kinds = doc["components"]["schemas"]["DroneEventKind"]["oneOf"].as_array().cloned().unwrap_or_default();
        assert_eq!(kinds.len(), 4, "{doc}");
        assert!(kinds.iter().all(|k| k["additionalProperties"] == false), "{kinds:?}");
        let body = &doc["paths"]["/v1/telemetry"]["post"]["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(body["$ref"], "#/components/schemas/TelemetryEvents", "{body}");
        assert_eq!(doc["components"]["schemas"]["TelemetryEvents"]["minItems"], 1);
    }
}
