//! The HTTP routes, versioned under `/v1`.
//!
//! | method | path | what |
//! |---|---|---|
//! | POST | `/v1/deliveries` | schedule a delivery; `201 {delivery_id, drone_id, stage}`; with an `Idempotency-Key` header a retry gets the first result (`Idempotent-Replayed: true`) |
//! | GET | `/v1/deliveries/{id}` | stage, drone and the drone's last known position |
//! | PATCH | `/v1/deliveries/{id}` | reschedule `{pickup?, dropoff?}` before pickup; `409` after |
//! | POST | `/v1/deliveries/{id}/notifications` | `{sms?, email?}`: be told of each stage change (through the notifications queue) |
//! | DELETE | `/v1/deliveries/{id}` | cancel before completion (`202`: the stage follows); `409` after |
//! | POST | `/v1/drones` | register drones `{"drones": [ids]}` as available |
//! | PUT | `/v1/drones/{id}` | register one drone |
//! | GET | `/v1/drones/{id}` | the engine's live state of a drone |
//! | GET | `/healthz` | liveness |
//!
//! Every error is JSON `{"error": code, "message": text}` with a fitting status; malformed JSON
//! and missing fields are `400`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use events::{FleetControl, WorkQueues};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::state::{CreateDelivery, Reschedule, Services};

/// The services' routes over `svc`, with the default per-client limits.
pub fn router<F: FleetControl + WorkQueues>(svc: Arc<Services<F>>) -> Router {
    router_with(svc, crate::throttle::Throttle::new(crate::throttle::ThrottleConfig::default()))
}

/// The services' routes over `svc`; the public delivery routes are limited per client by
/// `throttle` (see [`crate::throttle`]).
pub fn router_with<F: FleetControl + WorkQueues>(
    svc: Arc<Services<F>>,
    throttle: Arc<crate::throttle::Throttle>,
) -> Router {
    let public = Router::new()
        .route("/v1/deliveries", post(create_delivery::<F>))
        .route(
            "/v1/deliveries/{id}",
            get(get_delivery::<F>).patch(reschedule_delivery::<F>).delete(cancel_delivery::<F>),
        )
        .route("/v1/deliveries/{id}/notifications", post(subscribe_notifications::<F>))
        .route_layer(axum::middleware::from_fn_with_state(throttle, crate::throttle::limit))
        .with_state(svc.clone());
    Router::new()
        .route("/v1/drones", post(register_drones::<F>))
        .route("/v1/drones/{id}", get(get_drone::<F>).put(register_drone::<F>))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(svc)
        .merge(public)
}

impl<F: FleetControl + WorkQueues> Services<F> {
    /// Appends the services' counters in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use events::prom::{counter, gauge};
        let (drones, free) = self.fleet_size();
        counter(out, "fleetstream_deliveries_scheduled_total", self.scheduled.load(Ordering::Relaxed));
        counter(out, "fleetstream_deliveries_refused_total", self.refused.load(Ordering::Relaxed));
        gauge(out, "fleetstream_drones_registered", drones);
        gauge(out, "fleetstream_drones_free", free);
    }
}

/// `Json` whose rejections are our `400` with the reason.
struct ApiJson<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(Error::BadRequest(json_reason(&rejection))),
        }
    }
}

fn json_reason(rejection: &JsonRejection) -> String {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => "expected Content-Type: application/json".into(),
        other => other.body_text(),
    }
}

fn parse_id(raw: &str) -> Result<u64, Error> {
    raw.parse().map_err(|_| Error::BadRequest(format!("{raw:?} is not a numeric id")))
}

async fn create_delivery<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<Services<F>>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateDelivery>,
) -> Result<impl IntoResponse, Error> {
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(v.to_str().map_err(|_| Error::BadRequest("Idempotency-Key must be visible ASCII".into()))?),
        None => None,
    };
    let outcome = match key {
        Some(key) => svc.schedule_once(key, req).await,
        None => svc.schedule(req).await.map(|r| (r, false)),
    };
    match outcome {
        Ok((record, replayed)) => Ok((
            StatusCode::CREATED,
            [("idempotent-replayed", if replayed { "true" } else { "false" })],
            Json(serde_json::json!({
                "delivery_id": record.delivery_id,
                "drone_id": record.drone_id,
                "stage": record.stage,
            })),
        )),
        Err(e) => {
            svc.refused.fetch_add(1, Ordering::Relaxed);
            Err(e)
        }
    }
}

async fn reschedule_delivery<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<Services<F>>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<Reschedule>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let record = svc.reschedule(id, req).await?;
    Ok(Json(serde_json::json!({
        "delivery_id": record.delivery_id,
        "pickup": record.pickup,
        "dropoff": record.dropoff,
    })))
}

async fn subscribe_notifications<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<Services<F>>>,
    Path(id): Path<String>,
    ApiJson(sub): ApiJson<crate::notify::Subscription>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    svc.subscribe_notifications(id, sub.clone())?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "delivery_id": id, "sms": sub.sms, "email": sub.email }))))
}

async fn cancel_delivery<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<Services<F>>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let record = svc.cancel(id).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "delivery_id": record.delivery_id, "cancelling": true }))))
}

async fn get_delivery<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<Services<F>>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let record = svc.delivery(id).ok_or(Error::NotFound { what: "delivery", id })?;
    let drone = svc.fleet.drone(record.drone_id).await?;
    Ok(Json(serde_json::json!({
        "delivery_id": record.delivery_id,
        "owner": record.owner,
        "stage": record.stage,
        "drone_id": record.drone_id,
        "pickup": record.pickup,
        "dropoff": record.dropoff,
        "package": record.package,
        "created_us": record.created_us,
        "updated_us": record.updated_us,
        "drone": drone,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterDrones {
    drones: Vec<u64>,
}

async fn register_drones<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<Services<F>>>,
    ApiJson(req): ApiJson<RegisterDrones>,
) -> impl IntoResponse {
    let added = svc.register_drones(&req.drones);
    Json(serde_json::json!({ "registered": req.drones.len(), "new": added }))
}

async fn register_drone<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<Services<F>>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let added = svc.register_drones(&[id]);
    let status = if added == 1 { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(serde_json::json!({ "drone_id": id }))))
}

async fn get_drone<F: FleetControl + WorkQueues>(
    State(svc): State<Arc<Services<F>>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    let snapshot = svc.fleet.drone(id).await?.ok_or(Error::NotFound { what: "drone", id })?;
    Ok(Json(snapshot))
}
