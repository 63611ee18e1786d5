//! Trace propagation on every HTTP hop: a request's `traceparent` header (or a new trace when
//! it has none or a malformed one) becomes the parent of a span for the request, which
//! handlers read as an extension ([`TraceContext`]) and pass on to the calls they make, and
//! which the response carries back in its own `traceparent`. Each finished span is logged at
//! debug level under the `fleetstream::span` target (`RUST_LOG=fleetstream::span=debug`) with
//! its trace, span and parent ids, name, status and duration.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
pub use events::TraceContext;

/// The middleware.
pub async fn propagate(mut req: Request, next: Next) -> Response {
    let parent = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).and_then(TraceContext::parse);
    let span = parent.map_or_else(TraceContext::new_root, |p| p.child());
    req.extensions_mut().insert(span);
    let name = format!(
        "{} {}",
        req.method(),
        req.extensions().get::<MatchedPath>().map_or_else(|| req.uri().path(), |p| p.as_str())
    );
    let started = Instant::now();
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&span.to_header()) {
        resp.headers_mut().insert("traceparent", v);
    }
    log_span(&span, parent.as_ref(), &name, "server", resp.status().as_u16(), started);
    resp
}

/// Logs a finished span (debug level, target `fleetstream::span`).
pub fn log_span(
    span: &TraceContext,
    parent: Option<&TraceContext>,
    name: &str,
    kind: &str,
    status: u16,
    started: Instant,
) {
    tracing::debug!(
        target: "fleetstream::span",
        trace_id = %span.trace_hex(),
        span_id = %span.span_hex(),
        parent_id = %parent.map(TraceContext::span_hex).unwrap_or_default(),
        name,
        kind,
        status,
        duration_us = started.elapsed().as_micros() as u64,
        "span"
    );
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn a_request_continues_the_callers_trace_and_answers_with_its_span() -> anyhow::Result<()> {
        let app = Router::new()
            .route(
                "/x/{id}",
                get(|axum::Extension(span): axum::Extension<TraceContext>| async move { span.trace_hex() }),
            )
            .layer(axum::middleware::from_fn(propagate));
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let req = Request::builder().uri("/x/1").header("traceparent", parent).body(axum::body::Body::empty())?;
        let resp = app.clone().oneshot(req).await?;
        let answered = resp.headers().get("traceparent").and_then(|v| v.to_str().ok()).and_then(TraceContext::parse);
        let body = axum::body::to_bytes(resp.into_body(), 1024).await?;
        assert_eq!(&body[..], b"4bf92f3577b34da6a3ce929d0e0e4736", "the handler sees the caller's trace");
        let answered = answered.ok_or_else(|| anyhow::anyhow!("no traceparent in the answer"))?;
        assert_eq!(answered.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(answered.span_hex(), "00f067aa0ba902b7", "a span of its own");

        // No header (or a bad one): a new trace.
        let req = Request::builder().uri("/x/1").header("traceparent", "garbage").body(axum::body::Body::empty())?;
        let body = axum::body::to_bytes(app.oneshot(req).await?.into_body(), 1024).await?;
        assert_eq!(body.len(), 32);
        assert_ne!(&body[..], b"4bf92f3577b34da6a3ce929d0e0e4736");
        Ok(())
    }
}
