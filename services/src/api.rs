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

/// What a request may be: at most `max_body_bytes` of body (`[http] max_body_bytes`), sent
/// within `read_timeout` once its headers are in (`[http] read_timeout_ms`), so a client that
/// sends half a body holds neither a connection nor a handler. A request extension set by
/// [`uniform`]; [`ApiJson`] names the limit when a body is larger.
#[derive(Debug, Clone, Copy)]
pub struct RequestRules {
    /// Largest body, bytes.
    pub max_body_bytes: usize,
    /// Longest a body may take to arrive.
    pub read_timeout: std::time::Duration,
}

impl Default for RequestRules {
    fn default() -> Self {
        Self { max_body_bytes: 1 << 20, read_timeout: std::time::Duration::from_secs(10) }
    }
}

/// `Json` whose rejections are our errors: `400` with the reason for malformed JSON, a wrong
/// field or a missing one; `415` for another content type; `413` naming the limit for a body
/// over it; `408` for a body not sent within the read timeout ([`RequestRules`]).
pub(crate) struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let rules = req.extensions().get::<RequestRules>().copied();
        let timeout = rules.unwrap_or_default().read_timeout;
        let limit = rules.map(|r| r.max_body_bytes);
        match tokio::time::timeout(timeout, Json::<T>::from_request(req, state)).await {
            Err(_) => Err(Error::RequestTimeout),
            Ok(Ok(Json(v))) => Ok(Self(v)),
            Ok(Err(JsonRejection::MissingJsonContentType(_))) => Err(Error::UnsupportedMediaType),
            Ok(Err(rejection)) if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(Error::PayloadTooLarge(limit))
            }
            Ok(Err(rejection)) => Err(Error::BadRequest(plain_reason(&rejection.body_text()))),
        }
    }
}

/// A rejection's text without the framework's wording: "Failed to deserialize the JSON body
/// into the target type: owner: missing field `owner` at line 1 column 2" becomes "owner:
/// missing field owner at line 1 column 2".
pub(crate) fn plain_reason(text: &str) -> String {
    if let Some(reason) = text.strip_prefix("Failed to parse the request body as JSON: ") {
        return format!("the body is not valid JSON: {}", reason.replace('`', ""));
    }
    let mut reason = text;
    for prefix in [
        "Failed to deserialize the JSON body into the target type: ",
        "Failed to deserialize query string: ",
        "Failed to buffer the request body: ",
        "Invalid URL: ",
    ] {
        reason = reason.strip_prefix(prefix).unwrap_or(reason);
    }
    reason.replace('`', "")
}

/// The middleware that gives every answer of the public listener the documented form: it
/// tells [`ApiJson`] the [`RequestRules`], and turns the framework's own answers (no route `404`,
/// wrong method `405` with `Allow`, a query string that does not parse `400`, a body over the
/// limit `413`) into `{"error", "message"}` JSON.
pub async fn uniform(
    axum::extract::State(rules): axum::extract::State<RequestRules>,
    mut req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    req.extensions_mut().insert(rules);
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/event-stream"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    };
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", format!("no route for {method} {path}")),
        StatusCode::METHOD_NOT_ALLOWED => {
            // The router adds `Allow` past this layer when it has not yet.
            let allowed = match parts.headers.get(header::ALLOW).and_then(|v| v.to_str().ok()) {
                Some(allowed) => format!("allowed: {allowed}"),
                None => "see the Allow header".to_string(),
            };
            ("method_not_allowed", format!("{method} is not allowed on {path}; {allowed}"))
        }
        StatusCode::PAYLOAD_TOO_LARGE => {
            ("payload_too_large", format!("the request body exceeds {} bytes", rules.max_body_bytes))
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ("unsupported_media_type", "expected Content-Type: application/json".into())
        }
        StatusCode::REQUEST_TIMEOUT => ("request_timeout", "the request was not sent in time".into()),
        s if s.is_server_error() => ("internal", "internal error".into()),
        _ => ("bad_request", plain_reason(text.trim())),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    let body = axum::Json(serde_json::json!({ "error": code, "message": message }));
    (parts, body).into_response()
}

pub(crate) fn parse_id(raw: &str) -> Result<u64, Error> {
    raw.parse().map_err(|_| Error::BadRequest(format!("{raw:?} is not a numeric id")))
}
