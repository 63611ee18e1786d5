//! The live dashboard: `GET /` serves one page (embedded in the binary, no build step, nothing
//! loaded from other hosts) and `GET /v1/dashboard/stream` feeds it one snapshot a second over
//! SSE: drones on a map, deliveries by stage, events/s and event age, queue depths and dead
//! letters, each named cursor's lag.
//!
//! One task per node keeps the [`board::Board`] and, while anyone watches, publishes each
//! snapshot once, as JSON text every viewer shares. It follows the delivery events through the log from the start (so the
//! counts are right after a restart) and reads live telemetry only while someone is watching,
//! through a subscription the pipeline never waits for (it is cut off when behind, and opens
//! again at the next tick). The page is open; the stream is an admin route, like the other
//! fleet-wide views.

pub mod board;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use events::{QueueName, StartAt, StreamSource, Topic};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;

use self::board::{Board, Change, Limits};
use crate::engine::Engine;

/// `[dashboard]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardConfig {
    /// Serve the page and its stream. Default true.
    pub enabled: bool,
    /// Drones tracked at most (about 48 bytes each). Default 100,000.
    pub max_drones: usize,
    /// Deliveries in flight tracked at most (about 24 bytes each). Default 100,000.
    pub max_deliveries: usize,
    /// Drones drawn on the map at most (the most recently heard). Default 2,000.
    pub map_drones: usize,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self { enabled: true, max_drones: 100_000, max_deliveries: 100_000, map_drones: 2_000 }
    }
}

/// The page.
const PAGE: &str = include_str!("index.html");

/// A running dashboard.
#[derive(Debug)]
pub struct Dashboard {
    snapshots: watch::Receiver<Arc<str>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Dashboard {
    /// Starts following `engine`.
    pub fn start(engine: Engine, cfg: DashboardConfig) -> Arc<Self> {
        // Empty until the first snapshot, which is made once someone watches.
        let (tx, snapshots) = watch::channel::<Arc<str>>(Arc::from(""));
        let limits =
            Limits { max_drones: cfg.max_drones, max_deliveries: cfg.max_deliveries, map_drones: cfg.map_drones };
        let task = tokio::spawn(run(engine, Board::new(limits), tx));
        Arc::new(Self { snapshots, task })
    }

    /// `GET /` and `GET /v1/dashboard/stream`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new().route("/", get(page)).route("/v1/dashboard/stream", get(stream)).with_state(self.clone())
    }
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing from other hosts: scripts and styles are the page's own.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

async fn stream(
    State(d): State<Arc<Dashboard>>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let rx = d.snapshots.clone();
    // The latest snapshot at once (when there is one), then each new one.
    let events = futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        loop {
            let have_one = first && !rx.borrow().is_empty();
            if !have_one && rx.changed().await.is_err() {
                return None;
            }
            let data = rx.borrow_and_update().clone();
            if !data.is_empty() {
                return Some((Ok(SseEvent::default().event("snapshot").data(&*data)), (rx, false)));
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// Follows the engine, publishing a snapshot every second, until the dashboard is dropped.
async fn run(engine: Engine, mut board: Board, tx: watch::Sender<Arc<str>>) {
    let mut deliveries = match engine.subscribe_deliveries_from(StartAt::Earliest) {
        Ok(sub) => Some(sub),
        Err(error) => {
            tracing::warn!(%error, "the dashboard cannot follow delivery events");
            None
        }
    };
    let mut telemetry: Option<events::Subscription<events::DroneEvent>> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next_delivery = async {
            match &deliveries {
                Some(sub) => sub.rx.recv_async().await.ok(),
                None => std::future::pending().await,
            }
        };
        let next_telemetry = async {
            match &telemetry {
                Some(sub) => sub.rx.recv_async().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = tick.tick() => {
                // The dashboard's own receiver is one; more are viewers.
                let watching = tx.receiver_count() > 1;
                if !watching {
                    // Nobody to draw for: no telemetry read, no snapshot made.
                    telemetry = None;
                    continue;
                }
                if telemetry.is_none() {
                    telemetry = engine.subscribe_telemetry(events::Overflow::Disconnect).ok();
                }
                let snapshot = snapshot(&engine, &mut board).await;
                tx.send_replace(Arc::from(snapshot.to_string()));
            }
            item = next_delivery => match item {
                Some(Ok((_, batch))) => {
                    for e in batch.events().iter() {
                        board.delivery(Change {
                            delivery_id: e.delivery_id.to_native(),
                            stage: e.stage.to_stage(),
                            drone_id: e.drone_id.to_native(),
                            ts_us: e.ts_us.to_native(),
                        });
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "the dashboard stopped following delivery events");
                    deliveries = None;
                }
                None => deliveries = None,
            },
            batch = next_telemetry => match batch {
                Some(batch) => {
                    let now = events::now_us();
                    for e in batch.events().iter() {
                        let p = &e.position;
                        board.drone(
                            e.drone_id.to_native(),
                            p.lat.to_native(),
                            p.lon.to_native(),
                            e.ts_us.to_native(),
                            e.battery_pct.to_native(),
                            e.status.to_status(),
                            now,
                        );
                    }
                }
                // Cut off (behind) or closed: opened again at the next tick.
                None => telemetry = None,
            },
        }
    }
}

/// The board's snapshot with the queues and cursors beside it.
async fn snapshot(engine: &Engine, board: &mut Board) -> Value {
    let mut v = serde_json::to_value(board.snapshot(events::now_us())).unwrap_or_else(|_| json!({}));
    let mut queues = Vec::new();
    for name in QueueName::ALL {
        queues.push(engine.queue_backend(name).summary().await);
    }
    let mut cursors = Vec::new();
    for topic in [Topic::DroneTelemetry, Topic::DeliveryEvents] {
        let (_, next) = engine.topic_bounds(topic);
        for (name, c) in engine.cursors().list(topic) {
            cursors.push(json!({"topic": topic.name(), "cursor": name, "lag": next.saturating_sub(c.next)}));
        }
    }
    if let Some(o) = v.as_object_mut() {
        o.insert("queues".into(), Value::Array(queues));
        o.insert("cursors".into(), Value::Array(cursors));
    }
    v
}
