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
//! Errors are the services' JSON errors (`{"error": code, "message": text}`).

use std::fmt::Write;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use events::{Mission, QueueName, StartAt, StreamSource, Topic};
use futures_util::StreamExt;
use serde::Deserialize;
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

/// What keeps queue `name`.
fn queue(engine: &Engine, name: &str) -> Result<std::sync::Arc<dyn QueueBackend>, Error> {
    QueueName::from_name(name)
        .map(|q| engine.queue_backend(q))
        .ok_or_else(|| Error::BadRequest(format!("no queue {name:?}; queues are drone-commands and notifications")))
}

fn parse_id(raw: &str) -> Result<u64, Error> {
    raw.parse().map_err(|_| Error::BadRequest(format!("{raw:?} is not a numeric id")))
}

async fn queues(State(engine): State<Engine>) -> Json<Value> {
    let mut list: Vec<Value> = Vec::new();
    for name in QueueName::ALL {
        list.push(engine.queue_backend(name).summary().await);
    }
    Json(json!({ "queues": list }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

async fn dead_letters(
    State(engine): State<Engine>,
    Path(name): Path<String>,
    Query(page): Query<Page>,
) -> Result<Json<Value>, Error> {
    let limit = page.limit.clamp(1, 1000);
    let items = queue(&engine, &name)?.dead_letters(page.after, limit).await?;
    let next_after = items.last().map(|d| d.id);
    Ok(Json(json!({ "queue": name, "dead_letters": items, "next_after": next_after })))
}

async fn dead_letter(
    State(engine): State<Engine>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, Error> {
    let id = parse_id(&id)?;
    let q = queue(&engine, &name)?;
    let d = q.dead_letter(id).await.ok_or(Error::NotFound { what: "dead letter", id })?;
    let name = QueueName::from_name(&name).unwrap_or(QueueName::Notifications);
    Ok(Json(describe(name, &d)))
}

fn describe(queue: QueueName, d: &DeadLetter) -> Value {
    let mut hex = String::with_capacity(d.payload.len() * 2);
    for b in d.payload.iter() {
        let _ = write!(hex, "{b:02x}");
    }
    let mut v = json!(d);
    v["payload_hex"] = json!(hex);
    if queue == QueueName::DroneCommands
        && let Ok(m) = Mission::from_bytes(&d.payload)
    {
        v["mission"] = json!({
            "delivery_id": m.delivery_id,
            "drone_id": m.drone_id,
            "pickup": m.pickup,
            "dropoff": m.dropoff,
            "ts_us": m.ts_us,
        });
    }
    v
}

async fn replay(State(engine): State<Engine>, Path((name, id)): Path<(String, String)>) -> Result<Json<Value>, Error> {
    let id = parse_id(&id)?;
    if !queue(&engine, &name)?.replay(id).await? {
        return Err(Error::NotFound { what: "dead letter", id });
    }
    tracing::info!(queue = %name, id, "dead letter replayed");
    Ok(Json(json!({ "replayed": id })))
}

async fn purge(State(engine): State<Engine>, Path((name, id)): Path<(String, String)>) -> Result<StatusCode, Error> {
    let id = parse_id(&id)?;
    if !queue(&engine, &name)?.purge(id).await? {
        return Err(Error::NotFound { what: "dead letter", id });
    }
    tracing::info!(queue = %name, id, "dead letter deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/streams`: each topic's log bounds and its named cursors with their lag.
async fn streams(State(engine): State<Engine>) -> Json<Value> {
    let topics: Vec<Value> = [Topic::DroneTelemetry, Topic::DeliveryEvents]
        .into_iter()
        .map(|topic| {
            let (first, next) = engine.topic_bounds(topic);
            let cursors: Vec<Value> = engine
                .cursors()
                .list(topic)
                .into_iter()
                .map(|(name, c)| json!({ "name": name, "next": c.next, "lag": next.saturating_sub(c.next), "updated_us": c.updated_us }))
                .collect();
            json!({ "topic": topic.name(), "first": first, "next": next, "cursors": cursors })
        })
        .collect();
    Json(json!({ "streams": topics }))
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    /// `earliest`, `latest` (default), an offset, or `time:<µs since the epoch>`.
    #[serde(default)]
    from: Option<String>,
    /// A named cursor: start where it stands and commit as batches are sent.
    #[serde(default)]
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
