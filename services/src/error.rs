//! The services' error type, which is also their HTTP error response: a status, a stable
//! machine-readable code and a message fit for a client (internal details stay in the log).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The body of every error response.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `bad_request`, `no_drone_available`.
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
    /// For `dependency_failed`: which internal service failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency: Option<String>,
}

/// Errors of the HTTP services.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed: bad JSON, a missing field, an invalid value.
    #[error("{0}")]
    BadRequest(String),
    /// No such resource.
    #[error("{what} {id} not found")]
    NotFound {
        /// Kind of resource.
        what: &'static str,
        /// Its id.
        id: u64,
    },
    /// An `Idempotency-Key` came back with a different request than the one it was first used
    /// for.
    #[error("this Idempotency-Key was used for a different request")]
    KeyReused,
    /// No such resource (named by a string).
    #[error("{what} {name:?} not found")]
    NotFoundNamed {
        /// Kind of resource.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// The ordering account does not exist.
    #[error("account {0:?} does not exist")]
    UnknownAccount(String),
    /// The ordering account may not order.
    #[error("account {0:?} may not order deliveries")]
    AccountNotAllowed(String),
    /// An internal service the operation needs failed; nothing of the operation remains.
    #[error("the {service} service failed: {reason}")]
    Dependency {
        /// Which one.
        service: &'static str,
        /// What happened.
        reason: String,
    },
    /// A certificate or key could not be read or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// Every registered drone is busy; the client may retry.
    /// The caller's key may not do this (another owner's orders).
    #[error("{0}")]
    Forbidden(String),
    /// A request body over the listener's limit (bytes, when known).
    #[error("{}", too_large(*.0))]
    PayloadTooLarge(Option<usize>),
    /// A body in another format than JSON.
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    /// A body not sent in time.
    #[error("the request body was not sent in time")]
    RequestTimeout,
    /// A configuration the services cannot start with (never an HTTP answer).
    #[error("configuration: {0}")]
    Config(String),
    #[error("no drone is available; retry later")]
    NoDroneAvailable,
    /// The engine refused or failed the operation.
    #[error(transparent)]
    Engine(#[from] events::Error),
}

fn too_large(limit: Option<usize>) -> String {
    match limit {
        Some(n) => format!("the request body exceeds {n} bytes"),
        None => "the request body is too large".into(),
    }
}

impl Error {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::NotFound { .. } | Error::NotFoundNamed { .. } => (StatusCode::NOT_FOUND, "not_found"),
            Error::UnknownAccount(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_account"),
            Error::AccountNotAllowed(_) => (StatusCode::FORBIDDEN, "account_not_allowed"),
            Error::Dependency { .. } => (StatusCode::SERVICE_UNAVAILABLE, "dependency_failed"),
            Error::Tls(_) | Error::Config(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Error::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Error::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            // The fleet's state, not the service's: every drone in reach is busy (or none is in
            // reach); retry later.
            Error::NoDroneAvailable => (StatusCode::CONFLICT, "no_drone_available"),
            Error::KeyReused => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            // By name, so an engine error relayed from another process maps the same way.
            Error::Engine(e) => match e.name() {
                // A store or log that failed stops taking writes until a restart (readiness says
                // so): the request may be retried, on this node later or on another.
                name @ ("shutting_down" | "storage_full" | "storage_failed") => (StatusCode::SERVICE_UNAVAILABLE, name),
                // The node's own intake numbered a batch below its window (its clock stepped
                // back); it numbers on from above it, so the request may be sent again.
                name @ "sequence_regressed" => (StatusCode::SERVICE_UNAVAILABLE, name),
                name @ ("drone_busy" | "invalid_transition" | "lease_lost") => (StatusCode::CONFLICT, name),
                name @ ("unknown_delivery" | "unknown_message") => (StatusCode::NOT_FOUND, name),
                name @ "offset_unavailable" => (StatusCode::GONE, name),
                name @ "malformed_frame" => (StatusCode::BAD_REQUEST, name),
                // A bounded table is full (subscriptions of a delivery, say): the request is
                // refused, not the service broken.
                name @ "limit_reached" => (StatusCode::CONFLICT, name),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "request failed");
            "internal error".to_string()
        } else {
            tracing::debug!(error = %self, code, "request refused");
            self.to_string()
        };
        let mut body = serde_json::json!({ "error": code, "message": message });
        if let Error::Dependency { service, .. } = &self {
            body["dependency"] = (*service).into();
            tracing::warn!(error = %self, "operation failed in a dependency");
        }
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE || matches!(self, Error::NoDroneAvailable) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
