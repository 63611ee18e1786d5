//! The engine's own HTTP routes, beside the services': the queue path's dead-letter queues and
//! counts.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/v1/queues` | every queue's ready, leased and dead messages and its counters |
//! | GET | `/v1/queues/{queue}/dead-letters?after=&limit=` | dead letters, oldest first, paged by id |
//! | GET | `/v1/queues/{queue}/dead-letters/{id}` | one dead letter with its payload (hex; a mission decoded) |
//! | POST | `/v1/queues/{queue}/dead-letters/{id}/replay` | back into the queue with fresh attempts |
//! | DELETE | `/v1/queues/{queue}/dead-letters/{id}` | delete it for good |
//!
//! Errors are the services' JSON errors (`{"error": code, "message": text}`).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use events::{Mission, QueueName};
use serde::Deserialize;
use serde_json::{Value, json};
use services::Error;

use crate::engine::Engine;
use crate::queue::{DeadLetter, Queue};

/// The routes over `engine`.
pub fn router(engine: Engine) -> Router {
    Router::new()
        .route("/v1/queues", get(queues))
        .route("/v1/queues/{queue}/dead-letters", get(dead_letters))
        .route("/v1/queues/{queue}/dead-letters/{id}", get(dead_letter).delete(purge))
        .route("/v1/queues/{queue}/dead-letters/{id}/replay", post(replay))
        .with_state(engine)
}

fn queue<'a>(engine: &'a Engine, name: &str) -> Result<&'a std::sync::Arc<Queue>, Error> {
    QueueName::from_name(name)
        .map(|q| engine.queues().get(q))
        .ok_or_else(|| Error::BadRequest(format!("no queue {name:?}; queues are drone-commands and notifications")))
}

fn parse_id(raw: &str) -> Result<u64, Error> {
    raw.parse().map_err(|_| Error::BadRequest(format!("{raw:?} is not a numeric id")))
}

async fn queues(State(engine): State<Engine>) -> Json<Value> {
    let list: Vec<Value> = QueueName::ALL
        .into_iter()
        .map(|name| {
            let q = engine.queues().get(name);
            let (ready, leased, dead) = q.counts();
            let m = q.metrics();
            json!({
                "queue": name.name(),
                "ready": ready,
                "leased": leased,
                "dead": dead,
                "enqueued": m.enqueued.load(Ordering::Relaxed),
                "delivered": m.delivered.load(Ordering::Relaxed),
                "acked": m.acked.load(Ordering::Relaxed),
                "redelivered": m.redelivered.load(Ordering::Relaxed),
                "dead_lettered": m.dead_lettered.load(Ordering::Relaxed),
                "replayed": m.replayed.load(Ordering::Relaxed),
            })
        })
        .collect();
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
    let q = queue(&engine, &name)?;
    let items = q.dead_letters(page.after, page.limit.clamp(1, 1000));
    let next_after = items.last().map(|d| d.id);
    Ok(Json(json!({ "queue": name, "dead_letters": items, "next_after": next_after })))
}

async fn dead_letter(
    State(engine): State<Engine>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, Error> {
    let q = queue(&engine, &name)?;
    let id = parse_id(&id)?;
    let d = q.dead_letter(id).ok_or(Error::NotFound { what: "dead letter", id })?;
    Ok(Json(describe(q.name(), &d)))
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
    let q = queue(&engine, &name)?;
    let id = parse_id(&id)?;
    q.replay(id)?;
    tracing::info!(queue = %name, id, "dead letter replayed");
    Ok(Json(json!({ "replayed": id })))
}

async fn purge(State(engine): State<Engine>, Path((name, id)): Path<(String, String)>) -> Result<StatusCode, Error> {
    let q = queue(&engine, &name)?;
    let id = parse_id(&id)?;
    q.purge(id)?;
    tracing::info!(queue = %name, id, "dead letter deleted");
    Ok(StatusCode::NO_CONTENT)
}
