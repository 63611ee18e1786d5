//! The HTTP API of the services in one process, versioned under `/v1`, and the helpers every
//! service's routes share.
//!
//! | method | path | service |
//! |---|---|---|
//! | POST | `/v1/deliveries` | Scheduler: schedule; `201 {delivery_id, drone_id, stage}`; `Idempotency-Key` makes a retry return the first result |
//! | PATCH | `/v1/deliveries/{id}` | Scheduler: reschedule `{pickup?, dropoff?}` before pickup; `409` after |
//! | DELETE | `/v1/deliveries/{id}` | Scheduler: cancel before completion (`202`); `409` after |
//! | GET | `/v1/deliveries/{id}` | Delivery: stage, drone, its last known position, ETA |
//! | POST | `/v1/deliveries/{id}/notifications` | Delivery: `{sms?, email?}` subscription |
//! | POST, PUT, GET | `/v1/drones`, `/v1/drones/{id}` | Drone Management: register, live state |
//! | PUT, GET | `/v1/accounts/{owner}` | Accounts: open or suspend `{may_order}` (admin keys) |
//! | * | `/internal/v1/...` | Accounts, Package, Delivery records, assignments (see each module); split mode only ([`internal_router`]) |
//! | GET | `/healthz` | liveness |
//!
//! Every error is JSON `{"error": code, "message": text}` with a fitting status; malformed JSON
//! and missing fields are `400`.
//!
//! **What may change within v1:** fields may be added to responses and optional fields to
//! requests; new routes and new error codes may appear. Removing or renaming a field, changing
//! a field's type or meaning, making an optional request field required, or changing a status
//! code for the same situation needs `/v2` (served beside `/v1` while clients move).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::routing::get;
use events::{FleetControl, WorkQueues};
use serde::de::DeserializeOwned;

use crate::Error;
use crate::state::Services;

/// The services' routes, with the default per-client limits.
pub fn router<F: FleetControl + WorkQueues + Clone>(svc: &Services<F>) -> Router {
    router_with(svc, crate::throttle::Throttle::new(crate::throttle::ThrottleConfig::default()))
}

/// Every service's routes; the public delivery routes are limited per client by `throttle`
/// (see [`crate::throttle`]).
pub fn router_with<F: FleetControl + WorkQueues + Clone>(
    svc: &Services<F>,
    throttle: Arc<crate::throttle::Throttle>,
) -> Router {
    let public = svc
        .scheduler
        .router()
        .merge(svc.deliveries.public_router())
        .route_layer(axum::middleware::from_fn_with_state(throttle, crate::throttle::limit));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(openapi_router())
        .merge(public)
        .merge(svc.drones.public_router())
        .merge(svc.accounts.public_router())
        .layer(axum::middleware::from_fn(crate::trace::propagate))
}

/// The services' internal routes (`/internal/v1/...`): what each service answers the others.
/// In one process the services call each other in-process and no listener serves these; tests
/// use them to look at a service's records.
pub fn internal_router<F: FleetControl + WorkQueues + Clone>(svc: &Services<F>) -> Router {
    Router::new()
        .merge(svc.drones.internal_router())
        .merge(svc.deliveries.internal_router())
        .merge(svc.accounts.router())
        .merge(svc.packages.router())
}

/// The public API's OpenAPI document, generated from the handlers' and types' annotations;
/// served at `GET /v1/openapi.json`.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    info(
        title = "fleetstream public API",
        version = "v1",
        description = "Schedule, follow and look back on drone deliveries. Within v1 fields and routes may be added; anything else needs /v2."
    ),
    paths(
        crate::scheduler::create_delivery,
        crate::scheduler::reschedule_delivery,
        crate::scheduler::cancel_delivery,
        crate::deliveries::get_delivery,
        crate::deliveries::subscribe_notifications,
        crate::drones::register_drones,
        crate::drones::get_drone,
        crate::history::delivery_history,
        crate::history::owner_history,
        crate::accounts::put_account,
        crate::accounts::get_account,
    ),
    components(schemas(
        crate::error::ErrorBody,
        crate::scheduler::Scheduled,
        events::GeoPoint,
        events::DeliveryStage
    ))
)]
pub struct ApiDoc;

/// `GET /v1/openapi.json`.
pub fn openapi_router() -> Router {
    Router::new().route("/v1/openapi.json", get(|| async { Json(<ApiDoc as utoipa::OpenApi>::openapi()) }))
}

/// `Json` whose rejections are our `400` with the reason.
pub(crate) struct ApiJson<T>(pub T);

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

pub(crate) fn parse_id(raw: &str) -> Result<u64, Error> {
    raw.parse().map_err(|_| Error::BadRequest(format!("{raw:?} is not a numeric id")))
}
