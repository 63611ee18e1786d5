//! API keys for HTTP clients. With keys configured, every route but `/healthz`, `/readyz` and `/metrics`
//! needs one, as `Authorization: Bearer <key>` or `x-api-key: <key>`: none is `401` (with
//! `WWW-Authenticate: Bearer`), an unknown one `403`; both are logged and counted. With no keys
//! configured the API is open (loopback development, the demo), and the node says so at start.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The accepted keys and the refusal counters.
#[derive(Debug, Default)]
pub struct ApiKeys {
    keys: HashSet<String>,
    /// Requests refused for a missing key.
    pub missing: AtomicU64,
    /// Requests refused for an unknown key.
    pub unknown: AtomicU64,
}

impl ApiKeys {
    /// Accepts `keys` (blank ones are ignored); none means the API is open.
    pub fn new(keys: impl IntoIterator<Item = String>) -> Arc<Self> {
        let keys = keys.into_iter().map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect();
        Arc::new(Self { keys, ..Self::default() })
    }

    /// Whether any key is required.
    pub fn enforced(&self) -> bool {
        !self.keys.is_empty()
    }
}

fn key_of(req: &Request) -> Option<&str> {
    let h = req.headers();
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(str::trim);
    }
    h.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": code, "message": message });
    let mut resp = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// The middleware.
pub async fn require(State(keys): State<Arc<ApiKeys>>, req: Request, next: Next) -> Response {
    if !keys.enforced() || matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics") {
        return next.run(req).await;
    }
    check(&keys, req, next).await
}

/// The middleware for a split-mode service: as [`require`], but `/internal/` routes are left
/// to the client certificate check ([`crate::tls::internal_only`]), since services present
/// certificates, not API keys.
pub async fn require_public(State(keys): State<Arc<ApiKeys>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !keys.enforced() || matches!(path, "/healthz" | "/readyz" | "/metrics") || path.starts_with("/internal/") {
        return next.run(req).await;
    }
    check(&keys, req, next).await
}

async fn check(keys: &ApiKeys, req: Request, next: Next) -> Response {
    match key_of(&req) {
        None => {
            keys.missing.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path = req.uri().path(), "request without an API key refused");
            refuse(StatusCode::UNAUTHORIZED, "unauthenticated", "an API key is required (Authorization: Bearer <key>)")
        }
        Some(k) if keys.keys.contains(k) => next.run(req).await,
        Some(_) => {
            keys.unknown.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path = req.uri().path(), "request with an unknown API key refused");
            refuse(StatusCode::FORBIDDEN, "forbidden", "this API key is not accepted")
        }
    }
}
