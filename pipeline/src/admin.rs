//! The engine's own HTTP routes, beside the services': the stream path for dashboards and
//! simple clients (topics as Server-Sent Events, cursors and their lag) and the queue path's
//! dead-letter queues and counts.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/v1/queues` | every queue's ready, leased and dead messages and its counters |
//! | GET | `/v1/queues/{queue}/dead-letters?after=&limit=` | dead letters, oldest first, paged by id |
//! | GET | `/v1/queues/{queue}/dead-letters/{id}` | one dead letter with its payload (hex; a mission decoded) |
//! | POST | `/v1/queues/{queue}/dead-letters/{id}/replay` | back into the queue with fresh attempts |
//! | DELETE | `/v1/queues/{queue}/dead-letters/{id}` | delete it for good |
//! | GET | `/v1/streams` | each topic's first and next offsets, its named cursors and their lag |
//! | GET | `/v1/streams/{topic}/events?from=&cursor=` | the topic as Server-Sent Events (JSON) |
//!
//! Errors are the services' JSON errors (`{"error": code, "message": text}`). Every route is
//! in the OpenAPI document ([`api_document`]: the services' routes and these), admin keys only.

use std::fmt::Write;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use events::{Mission, QueueName, StartAt, StreamSource, Topic};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use services::Error;

use crate::engine::Engine;
use crate::queue::DeadLetter;
use crate::queue::backend::QueueBackend;

/// The routes over `engine`.
pub fn router(engine: Engine) -> Router {
    Router::new()
        .route("/v1/queues", get(queues))
        .route("/v1/queues/{queue}/dead-letters", get(dead_letters))
        .route("/v1/queues/{queue}/dead-letters/{id}", get(dead_letter).delete(purge))
        .route("/v1/queues/{queue}/dead-letters/{id}/replay", post(replay))
        .route("/v1/streams", get(streams))
        .route("/v1/streams/{topic}/events", get(stream_events))
        .with_state(engine)
}

/// The OpenAPI document of the whole public API: the services' routes and the engine's, with
/// the answers every operation may give.
pub fn api_document() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    let mut doc = services::ApiDoc::openapi();
    doc.merge(AdminDoc::openapi());
    doc.merge(crate::intake::TelemetryDoc::openapi());
    utoipa::Modify::modify(&services::CommonAnswers, &mut doc);
    doc
}

/// `GET /v1/openapi.json`, serving [`api_document`].
pub fn openapi_router() -> Router {
    let doc = std::sync::Arc::new(api_document());
    Router::new().route("/v1/openapi.json", get(move || std::future::ready(Json(doc.as_ref().clone()))))
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(queues, dead_letters, dead_letter, replay, purge, streams, stream_events))]
struct AdminDoc;

/// A queue's counts; the counters beside them depend on its backend.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct QueueSummary {
    /// `drone-commands` or `notifications`.
    queue: String,
    /// `embedded` or `jetstream`.
    backend: String,
    /// Messages waiting for a consumer.
    ready: Option<u64>,
    /// Messages a consumer holds.
    leased: Option<u64>,
    /// Dead letters.
    dead: Option<u64>,
}

/// `GET /v1/queues`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct QueueList {
    #[schema(value_type = Vec<QueueSummary>)]
    queues: Vec<Value>,
}

/// One dead letter.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct DeadLetterView {
    /// Message id.
    id: u64,
    /// Routing key (a drone id on drone-commands).
    key: u64,
    /// Deliveries it had.
    attempts: u32,
    /// Why the last one failed.
    reason: String,
    /// When it was enqueued, µs since the epoch.
    enqueued_us: u64,
    /// When it was dead-lettered, µs since the epoch.
    dead_at_us: u64,
    /// The payload, hex.
    payload_hex: String,
    /// On drone-commands: the mission the payload holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    mission: Option<Value>,
}

/// A page of dead letters.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct DeadLetterPage {
    queue: String,
    /// Without payloads: ask for one dead letter to see it.
    #[schema(value_type = Vec<Object>)]
    dead_letters: Vec<DeadLetter>,
    /// `after` for the next page; `null` on the last.
    next_after: Option<u64>,
}

/// A dead letter put back on its queue.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Replayed {
    replayed: u64,
}

/// A named cursor of a topic.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct CursorView {
    name: String,
    /// The offset it reads next.
    next: u64,
    /// Batches between it and the topic's end.
    lag: u64,
    /// When it last moved, µs since the epoch.
    updated_us: u64,
}

/// A topic's log bounds and cursors.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct StreamView {
    /// `drone-telemetry` or `delivery-events`.
    topic: String,
    /// The first offset held.
    first: u64,
    /// The offset the next batch gets.
    next: u64,
    cursors: Vec<CursorView>,
}

/// `GET /v1/streams`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct StreamList {
    streams: Vec<StreamView>,
}

/// What keeps queue `name`.
fn queue(engine: &Engine, name: &str) -> Result<std::sync::Arc<dyn QueueBackend>, Error> {
    QueueName::from_name(name)
        .map(|q| engine.queue_backend(q))
        .ok_or_else(|| Error::BadRequest(format!("no queue {name:?}; queues are drone-commands and notifications")))
}

/// The largest id the API takes: JSON Schema's `int64`.
const MAX_ID: u64 = i64::MAX as u64;

fn parse_id(raw: &str) -> Result<u64, Error> {
    raw.parse()
        .ok()
        .filter(|id| *id <= MAX_ID)
        .ok_or_else(|| Error::BadRequest(format!("{raw:?} is not an id (0 to {MAX_ID})")))
}

/// Every queue's ready, leased and dead messages and its counters.
#[utoipa::path(
    get, path = "/v1/queues", tag = "queues",
    responses((status = 200, description = "every queue", body = QueueList))
)]
async fn queues(State(engine): State<Engine>) -> Json<QueueList> {
    let mut list: Vec<Value> = Vec::new();
    for name in QueueName::ALL {
        list.push(engine.queue_backend(name).summary().await);
    }
    Json(QueueList { queues: list })
}

/// A queue's name, as a path parameter.
const QUEUE_PARAM: &str = "drone-commands or notifications";

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct Page {
    /// Dead letters after this id (default: from the first).
    #[serde(default)]
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    after: u64,
    /// Page size.
    #[serde(default = "default_limit")]
    #[param(minimum = 1, maximum = 1000)]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

/// Dead letters, oldest first, paged by id.
#[utoipa::path(
    get, path = "/v1/queues/{queue}/dead-letters", tag = "queues",
    params(("queue" = String, Path, description = QUEUE_PARAM, pattern = "^(drone-commands|notifications)$"), Page),
    responses((status = 200, description = "one page", body = DeadLetterPage))
)]
async fn dead_letters(
    State(engine): State<Engine>,
    Path(name): Path<String>,
    Query(page): Query<Page>,
) -> Result<Json<DeadLetterPage>, Error> {
    if !(1..=1000).contains(&page.limit) {
        return Err(Error::BadRequest("limit must be 1 to 1000".into()));
    }
    if page.after > MAX_ID {
        return Err(Error::BadRequest(format!("after must be at most {MAX_ID}")));
    }
    let items = queue(&engine, &name)?.dead_letters(page.after, page.limit).await?;
    let next_after = items.last().map(|d| d.id);
    Ok(Json(DeadLetterPage { queue: name, dead_letters: items, next_after }))
}

/// One dead letter with its payload (hex; a mission decoded).
#[utoipa::path(
    get, path = "/v1/queues/{queue}/dead-letters/{id}", tag = "queues",
    params(
        ("queue" = String, Path, description = QUEUE_PARAM, pattern = "^(drone-commands|notifications)$"),
        ("id" = u64, Path, description = "dead letter id", minimum = 0, maximum = 9_223_372_036_854_775_807_i64),
    ),
    responses(
        (status = 200, description = "the dead letter", body = DeadLetterView),
        (status = 404, description = "no such dead letter", body = services::error::ErrorBody),
    )
)]
async fn dead_letter(
    State(engine): State<Engine>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<DeadLetterView>, Error> {
    let id = parse_id(&id)?;
    let q = queue(&engine, &name)?;
    let d = q.dead_letter(id).await.ok_or(Error::NotFound { what: "dead letter", id })?;
    let name = QueueName::from_name(&name).unwrap_or(QueueName::Notifications);
    Ok(Json(describe(name, &d)))
}

fn describe(queue: QueueName, d: &DeadLetter) -> DeadLetterView {
    let mut hex = String::with_capacity(d.payload.len() * 2);
    for b in d.payload.iter() {
        let _ = write!(hex, "{b:02x}");
    }
    let mission =
        (queue == QueueName::DroneCommands).then(|| Mission::from_bytes(&d.payload).ok()).flatten().map(|m| {
            json!({
                "delivery_id": m.delivery_id,
                "drone_id": m.drone_id,
                "pickup": m.pickup,
                "dropoff": m.dropoff,
                "ts_us": m.ts_us,
            })
        });
    DeadLetterView {
        id: d.id,
        key: d.key,
        attempts: d.attempts,
        reason: d.reason.clone(),
        enqueued_us: d.enqueued_us,
        dead_at_us: d.dead_at_us,
        payload_hex: hex,
        mission,
    }
}

/// Puts a dead letter back into its queue with fresh attempts.
#[utoipa::path(
    post, path = "/v1/queues/{queue}/dead-letters/{id}/replay", tag = "queues",
    params(
        ("queue" = String, Path, description = QUEUE_PARAM, pattern = "^(drone-commands|notifications)$"),
        ("id" = u64, Path, description = "dead letter id", minimum = 0, maximum = 9_223_372_036_854_775_807_i64),
    ),
    responses(
        (status = 200, description = "back in the queue", body = Replayed),
        (status = 404, description = "no such dead letter", body = services::error::ErrorBody),
    )
)]
async fn replay(
    State(engine): State<Engine>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Replayed>, Error> {
    let id = parse_id(&id)?;
    if !queue(&engine, &name)?.replay(id).await? {
        return Err(Error::NotFound { what: "dead letter", id });
    }
    tracing::info!(queue = %name, id, "dead letter replayed");
    Ok(Json(Replayed { replayed: id }))
}

/// Deletes a dead letter for good.
#[utoipa::path(
    delete, path = "/v1/queues/{queue}/dead-letters/{id}", tag = "queues",
    params(
        ("queue" = String, Path, description = QUEUE_PARAM, pattern = "^(drone-commands|notifications)$"),
        ("id" = u64, Path, description = "dead letter id", minimum = 0, maximum = 9_223_372_036_854_775_807_i64),
    ),
    responses(
        (status = 204, description = "deleted"),
        (status = 404, description = "no such dead letter", body = services::error::ErrorBody),
    )
)]
async fn purge(State(engine): State<Engine>, Path((name, id)): Path<(String, String)>) -> Result<StatusCode, Error> {
    let id = parse_id(&id)?;
    if !queue(&engine, &name)?.purge(id).await? {
        return Err(Error::NotFound { what: "dead letter", id });
    }
    tracing::info!(queue = %name, id, "dead letter deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Each topic's first and next offsets, its named cursors and their lag.
#[utoipa::path(
    get, path = "/v1/streams", tag = "streams",
    responses((status = 200, description = "every topic", body = StreamList))
)]
async fn streams(State(engine): State<Engine>) -> Json<StreamList> {
    let streams = [Topic::DroneTelemetry, Topic::DeliveryEvents]
        .into_iter()
        .map(|topic| {
            let (first, next) = engine.topic_bounds(topic);
            let cursors = engine
                .cursors()
                .list(topic)
                .into_iter()
                .map(|(name, c)| CursorView {
                    name,
                    next: c.next,
                    lag: next.saturating_sub(c.next),
                    updated_us: c.updated_us,
                })
                .collect();
            StreamView { topic: topic.name().to_string(), first, next, cursors }
        })
        .collect();
    Json(StreamList { streams })
}

/// Appends `fleetstream_stream_cursor_lag{topic,cursor}`: batches between each named cursor
/// and the end of its topic.
pub fn render_cursor_metrics(engine: &Engine, out: &mut String) {
    let _ = writeln!(out, "# TYPE fleetstream_stream_cursor_lag gauge");
    for topic in [Topic::DroneTelemetry, Topic::DeliveryEvents] {
        let (_, next) = engine.topic_bounds(topic);
        for (name, c) in engine.cursors().list(topic) {
            let lag = next.saturating_sub(c.next);
            let _ =
                writeln!(out, "fleetstream_stream_cursor_lag{{topic=\"{}\",cursor=\"{name}\"}} {lag}", topic.name());
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StreamQuery {
    /// `earliest`, `latest` (default), an offset, or `time:<µs since the epoch>`.
    #[serde(default)]
    #[param(pattern = "^(earliest|latest|[0-9]{1,19}|time:[0-9]{1,19})$")]
    from: Option<String>,
    /// A named cursor: start where it stands and commit as batches are sent.
    #[serde(default)]
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    cursor: Option<String>,
}

fn parse_start(raw: Option<&str>) -> Result<StartAt, Error> {
    match raw {
        None | Some("latest") => Ok(StartAt::Latest),
        Some("earliest") => Ok(StartAt::Earliest),
        Some(t) if t.starts_with("time:") => t[5..]
            .parse()
            .map(StartAt::Time)
            .map_err(|_| Error::BadRequest(format!("{t:?}: time: takes µs since the epoch"))),
        Some(o) => o
            .parse()
            .map(StartAt::Offset)
            .map_err(|_| Error::BadRequest(format!("from={o:?}: use earliest, latest, an offset or time:<µs>"))),
    }
}

/// `GET /v1/streams/{topic}/events`: the topic as Server-Sent Events, one `batch` event per log
/// batch with the offset as its id and the events as JSON. A reconnecting client sends
/// `Last-Event-ID` and resumes after it; with `cursor=NAME` the server keeps the cursor and
/// commits each batch once the next one is handed to the connection.
#[utoipa::path(
    get, path = "/v1/streams/{topic}/events", tag = "streams",
    params(
        ("topic" = String, Path, description = "drone-telemetry or delivery-events", pattern = "^(drone-telemetry|delivery-events)$"),
        ("last-event-id" = Option<u64>, Header, description = "resume after this offset"),
        StreamQuery,
    ),
    responses((status = 200, description = "`batch` events, each `{\"offset\", \"events\"}` with the offset as its id", content_type = "text/event-stream", body = String))
)]
async fn stream_events(
    State(engine): State<Engine>,
    Path(topic): Path<String>,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>>, Error> {
    let topic = Topic::from_name(&topic).ok_or_else(|| {
        Error::BadRequest(format!("no topic {topic:?}; topics are drone-telemetry and delivery-events"))
    })?;
    let mut from = parse_start(q.from.as_deref())?;
    if let Some(name) = &q.cursor
        && let Some(next) = engine.cursor(topic, name)?
    {
        from = StartAt::Offset(next);
    }
    let last_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(id) = last_id {
        from = StartAt::Offset(id + 1);
    }
    let batches = match topic {
        Topic::DroneTelemetry => {
            let sub = engine.subscribe_telemetry_from(from)?;
            sub.rx.into_stream().map(|item| item.map(|(offset, b)| (offset, batch_json(&b)))).left_stream()
        }
        Topic::DeliveryEvents => {
            let sub = engine.subscribe_deliveries_from(from)?;
            sub.rx.into_stream().map(|item| item.map(|(offset, b)| (offset, batch_json(&b)))).right_stream()
        }
    };
    let cursor = q.cursor.clone();
    let mut handed: Option<u64> = None;
    // The stream ends when the node drains, so the HTTP server is not held open by it.
    let batches = batches.take_until(engine.drained());
    let events = batches.map(move |item| {
        // The previous batch has been handed to the connection: commit past it.
        if let (Some(name), Some(next)) = (&cursor, handed)
            && let Err(error) = engine.commit_cursor(topic, name, next)
        {
            tracing::warn!(%error, cursor = %name, "SSE cursor commit refused");
        }
        Ok(match item {
            Ok((offset, events)) => {
                handed = Some(offset + 1);
                SseEvent::default()
                    .event("batch")
                    .id(offset.to_string())
                    .data(json!({ "offset": offset, "events": events }).to_string())
            }
            Err(error) => SseEvent::default()
                .event("error")
                .data(json!({ "error": error.name(), "message": error.to_string() }).to_string()),
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// A batch's events as JSON values (owned copies: this is the dashboard path, not the hot one).
fn batch_json<T>(b: &events::Batch<T>) -> Vec<Value>
where
    T: events::wire::Payload + serde::Serialize,
    T::Archived: rkyv::Deserialize<T, rkyv::rancor::Strategy<rkyv::de::Pool, rkyv::rancor::Error>>,
{
    b.events()
        .iter()
        .filter_map(|e| rkyv::deserialize::<T, rkyv::rancor::Error>(e).ok())
        .map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
        .collect()
}
