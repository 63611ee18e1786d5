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
use axum::extract::{FromRequest, Request};
use axum::routing::get;
use events::{FleetControl, WorkQueues};
use serde::de::DeserializeOwned;

use crate::Error;
use crate::state::Services;

/// The services' routes and their OpenAPI document, with the default per-client limits.
pub fn router<F: FleetControl + WorkQueues + Clone>(svc: &Services<F>) -> Router {
    router_with(svc, crate::throttle::Throttle::new(crate::throttle::ThrottleConfig::default())).merge(openapi_router())
}

/// Every service's routes (the OpenAPI document is left to the caller, which may serve a
/// larger one); the public delivery routes are limited per client by `throttle`
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
        crate::history::delivery_trace,
        crate::history::owner_history,
        crate::accounts::put_account,
        crate::accounts::get_account,
        crate::drones::register_drone,
    ),
    modifiers(&CommonAnswers),
    components(schemas(
        crate::error::ErrorBody,
        crate::scheduler::Scheduled,
        events::GeoPoint,
        events::DeliveryStage
    ))
)]
pub struct ApiDoc;

/// Adds to every operation the answers any of them may give, where it does not say more:
/// `400` (a path, query or body that does not parse or validate), `401` and `403` (API keys),
/// `408`, `413` and `415` for operations with a body, `429` (the throttle) and `503` (a
/// stopped store or a failed dependency), each with the error body.
#[derive(Debug)]
pub struct CommonAnswers;

impl utoipa::Modify for CommonAnswers {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let answer = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                )
                .build()
        };
        for item in doc.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for op in operations.into_iter().flatten() {
                let with_body = op.request_body.is_some();
                let mut common = vec![
                    ("400", "malformed or invalid path, query or body (`bad_request`)"),
                    ("401", "no API key (`unauthenticated`)"),
                    ("403", "the API key is unknown or may not do this (`forbidden`)"),
                    ("429", "over the caller's rate (`throttled`, with `Retry-After`)"),
                    ("503", "a store stopped or a dependency failed; retry (`Retry-After`)"),
                ];
                if with_body {
                    common.extend([
                        ("408", "the body was not sent in time (`request_timeout`)"),
                        ("413", "the body is over the limit (`payload_too_large`)"),
                        ("415", "the body is not JSON (`unsupported_media_type`)"),
                    ]);
                }
                for (status, description) in common {
                    op.responses.responses.entry(status.to_string()).or_insert_with(|| answer(description).into());
                }
            }
        }
    }
}

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
        let bytes = read_body(req, state, |mime| {
            mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .await?;
        // Every body of the API is an object: serde would also read a struct from an array.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(Error::BadRequest("the body must be a JSON object".into()));
        }
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(Error::BadRequest(plain_reason(&rejection.body_text()))),
        }
    }
}

/// A body of JSON values left for the handler to read: `application/json` (a value or an
/// array) or NDJSON (`application/x-ndjson`), with the limits and answers of [`ApiJson`].
#[derive(Debug)]
pub struct JsonLines(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonLines {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        read_body(req, state, |mime| matches!(mime, "application/json" | "application/x-ndjson" | "application/jsonl"))
            .await
            .map(Self)
    }
}

/// The body of `req` once its content type passes `accepted` (lower-cased, without parameters):
/// `415` otherwise, `413` naming the limit, `408` past the read timeout.
async fn read_body<S: Send + Sync>(
    req: Request,
    state: &S,
    accepted: impl Fn(&str) -> bool,
) -> Result<axum::body::Bytes, Error> {
    let rules = req.extensions().get::<RequestRules>().copied();
    let timeout = rules.unwrap_or_default().read_timeout;
    let limit = rules.map(|r| r.max_body_bytes);
    let ok = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| mime.trim().to_ascii_lowercase())
        .is_some_and(|mime| accepted(&mime));
    if !ok {
        return Err(Error::UnsupportedMediaType);
    }
    match tokio::time::timeout(timeout, axum::body::Bytes::from_request(req, state)).await {
        Err(_) => Err(Error::RequestTimeout),
        Ok(Err(rejection)) if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
            Err(Error::PayloadTooLarge(limit))
        }
        Ok(Err(rejection)) => Err(Error::BadRequest(plain_reason(&rejection.body_text()))),
        Ok(Ok(bytes)) => Ok(bytes),
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
    // Kept for an error's message; a clone of the parsed URI shares its bytes.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let path = uri.path();
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

/// `s` as one URI path segment: every byte but the unreserved ones percent-encoded (owners may
/// hold `|`, `#`, `%` or `?`).
pub(crate) fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Deserializes a list of ids as JSON Schema reads `integer`: `7` and `7.0` alike (a number
/// without a fraction), never a fraction, a negative or anything past [`MAX_ID`].
pub(crate) fn integer_ids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    use serde::Deserialize;
    use serde::de::Error as _;
    let raw: Vec<serde_json::Number> = Vec::deserialize(d)?;
    raw.iter()
        .enumerate()
        .map(|(i, n)| {
            events::json::integer_of(n)
                .ok_or_else(|| D::Error::custom(format!("[{i}]: {n} is not an id (an integer 0 to {MAX_ID})")))
        })
        .collect()
}

/// The largest id the API takes: ids are stored as signed 64-bit integers (PostgreSQL's
/// BIGINT), and the document declares them `int64`, minimum 0.
pub(crate) const MAX_ID: u64 = events::json::MAX_SEQ;

pub(crate) fn parse_id(raw: &str) -> Result<u64, Error> {
    raw.parse()
        .ok()
        .filter(|&id| id <= MAX_ID)
        .ok_or_else(|| Error::BadRequest(format!("{raw:?} is not a numeric id (0 to {MAX_ID})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document's limits are the handlers' own: one changed without the other fails here.
    #[test]
    fn the_documents_limits_are_the_ones_the_handlers_enforce() {
        let doc = serde_json::to_value(<ApiDoc as utoipa::OpenApi>::openapi()).unwrap_or_default();
        let schemas = &doc["components"]["schemas"];
        let weight = &schemas["Package"]["properties"]["weight_kg"];
        assert_eq!(weight["maximum"].as_f64(), Some(crate::state::MAX_PACKAGE_KG), "{weight}");
        let owner = &schemas["CreateDelivery"]["properties"]["owner"];
        assert_eq!(owner["maxLength"], 128, "{owner}");
        assert!(
            crate::accounts::valid_owner(&"a".repeat(128)).is_ok()
                && crate::accounts::valid_owner(&"a".repeat(129)).is_err()
        );
        let post = &doc["paths"]["/v1/deliveries"]["post"];
        let key = post["parameters"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "Idempotency-Key"));
        assert_eq!(key.map(|k| &k["schema"]["maxLength"]), Some(&serde_json::json!(crate::idempotency::MAX_KEY_LEN)));
        for status in ["400", "401", "403", "413", "415", "429", "503"] {
            assert!(post["responses"][status].is_object(), "POST /v1/deliveries declares {status}");
        }
        assert!(parse_id(&MAX_ID.to_string()).is_ok() && parse_id(&(MAX_ID + 1).to_string()).is_err());
        assert_eq!(path_segment("a|b c/%"), "a%7Cb%20c%2F%25");
    }

    /// Ids read as JSON Schema's `integer`: exactly, with or without a zero fraction.
    #[test]
    fn ids_are_integers_with_or_without_a_zero_fraction() {
        #[derive(serde::Deserialize)]
        struct Ids(#[serde(deserialize_with = "integer_ids")] Vec<u64>);
        let ids: Ids = serde_json::from_str("[4029481617141862.0, 7.0, 7, 9223372036854775807]").unwrap_or(Ids(vec![]));
        assert_eq!(ids.0, [4_029_481_617_141_862, 7, 7, MAX_ID]);
        for bad in ["[1.5]", "[-1]", "[9223372036854775808]", "[1e300]", "[\"7\"]"] {
            assert!(serde_json::from_str::<Ids>(bad).is_err(), "{bad}");
        }
    }
}
