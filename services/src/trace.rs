//! Trace propagation on every HTTP hop: a request's `traceparent` header (or a new trace when
//! it has none or a malformed one) becomes the parent of a span for the request, which
//! handlers read as an extension ([`TraceContext`]) and pass on to the calls they make, and
//! which the response carries back in its own `traceparent`. Each finished span is logged at
//! debug level under the `fleetstream::span` target (`RUST_LOG=fleetstream::span=debug`) with
//! its trace, span and parent ids, name, status and duration, and, when a collector is
//! configured ([`TracingConfig`]), exported over OTLP/HTTP as JSON.

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
    // The span's name is built only when the span goes somewhere: not per request otherwise.
    let name = recording().then(|| {
        let route = req.extensions().get::<MatchedPath>().map_or_else(|| req.uri().path(), |p| p.as_str());
        format!("{} {route}", req.method())
    });
    let started = Instant::now();
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&span.to_header()) {
        resp.headers_mut().insert("traceparent", v);
    }
    if let Some(name) = name {
        log_span(&span, parent.as_ref(), &name, "server", resp.status().as_u16(), started);
    }
    resp
}

/// Whether finished spans are logged or exported at all.
pub fn recording() -> bool {
    EXPORTER.get().is_some() || tracing::enabled!(target: "fleetstream::span", tracing::Level::DEBUG)
}

/// Where spans are exported over OTLP (`[tracing]` in the pipeline's config).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// OTLP/HTTP collector base URL, e.g. `http://127.0.0.1:4318`; spans are POSTed as JSON to
    /// `<endpoint>/v1/traces`. Unset (the default): spans are only logged.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans. Default `fleetstream`.
    pub service_name: Option<String>,
    /// Spans kept per delivery for `GET /v1/deliveries/{id}/trace` (`[tracing.spans]`).
    pub spans: crate::spans::SpansConfig,
}

/// One finished span waiting for export.
struct Finished {
    span: TraceContext,
    parent: Option<TraceContext>,
    name: String,
    kind: u8,
    /// OTLP/JSON attributes.
    attributes: serde_json::Value,
    start_ns: u64,
    end_ns: u64,
}

/// The OTLP exporter: spans go through a bounded queue to a task that posts them in batches;
/// when the collector is slow or gone, spans beyond the queue are dropped and counted rather
/// than held in memory or slowing requests.
struct Exporter {
    tx: flume::Sender<Finished>,
    dropped: std::sync::atomic::AtomicU64,
}

static EXPORTER: std::sync::OnceLock<Exporter> = std::sync::OnceLock::new();

/// Spans queued for export, at most.
const EXPORT_QUEUE: usize = 8192;
/// Spans per export request, at most.
const EXPORT_BATCH: usize = 512;

/// Starts exporting spans over OTLP as `cfg` says (nothing when no endpoint is set). Must run
/// inside a tokio runtime; the first call wins for the life of the process.
pub fn install_exporter(cfg: &TracingConfig) {
    let Some(endpoint) = cfg.otlp_endpoint.clone() else { return };
    let service = cfg.service_name.clone().unwrap_or_else(|| "fleetstream".into());
    let (tx, rx) = flume::bounded(EXPORT_QUEUE);
    if EXPORTER.set(Exporter { tx, dropped: std::sync::atomic::AtomicU64::new(0) }).is_ok() {
        tracing::info!(%endpoint, service, "exporting spans over OTLP/HTTP");
        tokio::spawn(export(endpoint, service, rx));
    }
}

/// Spans dropped because the export queue was full.
pub fn spans_dropped() -> u64 {
    EXPORTER.get().map_or(0, |e| e.dropped.load(std::sync::atomic::Ordering::Relaxed))
}

async fn export(endpoint: String, service: String, rx: flume::Receiver<Finished>) {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let http = match crate::tls::plain_client_builder().timeout(std::time::Duration::from_secs(5)).build() {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "no HTTP client for span export");
            return;
        }
    };
    while let Ok(first) = rx.recv_async().await {
        let mut batch = vec![first];
        // Gather what else arrives within a second, up to a batch.
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while batch.len() < EXPORT_BATCH {
            match tokio::time::timeout_at(until, rx.recv_async()).await {
                Ok(Ok(span)) => batch.push(span),
                _ => break,
            }
        }
        let body = otlp_json(&service, &batch);
        match http.post(&url).json(&body).send().await {
            Ok(resp) if resp.status().is_success() => {}
            Ok(resp) => {
                tracing::warn!(status = %resp.status(), spans = batch.len(), "the OTLP collector refused spans")
            }
            Err(error) => tracing::warn!(%error, spans = batch.len(), "could not export spans"),
        }
    }
}

/// The OTLP/JSON body for `spans` (ids in hex, times as decimal strings, as OTLP/JSON has them).
fn otlp_json(service: &str, spans: &[Finished]) -> serde_json::Value {
    let spans: Vec<_> = spans
        .iter()
        .map(|f| {
            serde_json::json!({
                "traceId": f.span.trace_hex(),
                "spanId": f.span.span_hex(),
                "parentSpanId": f.parent.map(|p| p.span_hex()).unwrap_or_default(),
                "name": f.name,
                "kind": f.kind,
                "startTimeUnixNano": f.start_ns.to_string(),
                "endTimeUnixNano": f.end_ns.to_string(),
                "attributes": f.attributes,
            })
        })
        .collect();
    serde_json::json!({
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
            "scopeSpans": [{"scope": {"name": "fleetstream"}, "spans": spans}],
        }]
    })
}

/// Logs a finished span (debug level, target `fleetstream::span`) and queues it for OTLP
/// export when an exporter is installed.
pub fn log_span(
    span: &TraceContext,
    parent: Option<&TraceContext>,
    name: &str,
    kind: &str,
    status: u16,
    started: Instant,
) {
    if let Some(exporter) = EXPORTER.get() {
        let elapsed = started.elapsed();
        let end_ns = events::now_us().saturating_mul(1000);
        let finished = Finished {
            span: *span,
            parent: parent.copied(),
            name: name.to_string(),
            // OTLP span kinds: 2 server, 3 client, 5 consumer, 1 internal.
            kind: match kind {
                "server" => 2,
                "client" => 3,
                "consumer" => 5,
                _ => 1,
            },
            attributes: serde_json::json!([
                {"key": "http.response.status_code", "value": {"intValue": status.to_string()}}
            ]),
            start_ns: end_ns.saturating_sub(elapsed.as_nanos() as u64),
            end_ns,
        };
        if exporter.tx.try_send(finished).is_err() {
            exporter.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
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

/// Queues a kept span of a delivery (see [`crate::spans`]) for OTLP export, when an exporter
/// is installed and the span's trace is known.
pub(crate) fn export_kept(span: &crate::spans::KeptSpan) {
    let Some(exporter) = EXPORTER.get() else { return };
    let parent = if span.parent_id.is_empty() { "0000000000000000" } else { &span.parent_id };
    let (Some(ctx), parent) = (
        TraceContext::parse(&format!("00-{}-{}-01", span.trace_id, span.span_id)),
        TraceContext::parse(&format!("00-{}-{parent}-01", span.trace_id)),
    ) else {
        return;
    };
    let value = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => serde_json::json!({"stringValue": s}),
        serde_json::Value::Bool(b) => serde_json::json!({"boolValue": b}),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => serde_json::json!({"intValue": n.to_string()}),
        serde_json::Value::Number(n) => serde_json::json!({"doubleValue": n}),
        other => serde_json::json!({"stringValue": other.to_string()}),
    };
    let mut attributes = vec![
        serde_json::json!({"key": "fleetstream.service", "value": {"stringValue": span.service}}),
        serde_json::json!({"key": "fleetstream.delivery_id", "value": {"intValue": span.delivery_id.to_string()}}),
    ];
    attributes.extend(span.attributes.iter().map(|(k, v)| serde_json::json!({"key": k, "value": value(v)})));
    let finished = Finished {
        span: ctx,
        parent,
        name: span.name.clone(),
        kind: 1,
        attributes: serde_json::Value::Array(attributes),
        start_ns: span.start_us.saturating_mul(1000),
        end_ns: span.start_us.saturating_add(span.duration_us).saturating_mul(1000),
    };
    if exporter.tx.try_send(finished).is_err() {
        exporter.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
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

    #[tokio::test]
    async fn spans_are_exported_to_an_otlp_collector() -> anyhow::Result<()> {
        // A collector that hands over what it receives.
        let (got_tx, got_rx) = flume::unbounded::<serde_json::Value>();
        let collector = Router::new().route(
            "/v1/traces",
            axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let got_tx = got_tx.clone();
                async move {
                    let _ = got_tx.send(body);
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, collector).await });
        install_exporter(&TracingConfig {
            otlp_endpoint: Some(endpoint),
            service_name: Some("scheduler".into()),
            ..TracingConfig::default()
        });

        let app = Router::new().route("/v1/x", get(|| async { "ok" })).layer(axum::middleware::from_fn(propagate));
        let parent = "00-11111111111111112222222222222222-3333333333333333-01";
        let req = Request::builder().uri("/v1/x").header("traceparent", parent).body(axum::body::Body::empty())?;
        app.oneshot(req).await?;
        // The exporter is the process's: other tests' spans may come along; find ours.
        let span = loop {
            let body = tokio::time::timeout(std::time::Duration::from_secs(5), got_rx.recv_async()).await??;
            let resource = &body["resourceSpans"][0];
            assert_eq!(resource["resource"]["attributes"][0]["value"]["stringValue"], "scheduler");
            let spans = resource["scopeSpans"][0]["spans"].as_array().cloned().unwrap_or_default();
            if let Some(ours) = spans.into_iter().find(|s| s["traceId"] == "11111111111111112222222222222222") {
                break ours;
            }
        };
        assert_eq!(span["parentSpanId"], "3333333333333333");
        assert_eq!((span["name"].as_str(), span["kind"].as_u64()), (Some("GET /v1/x"), Some(2)));
        assert_eq!(spans_dropped(), 0);

        // A delivery's kept span goes out too, with its service, delivery and attributes.
        let kept = crate::spans::KeptSpan {
            delivery_id: 42,
            trace_id: "11111111111111112222222222222222".into(),
            span_id: "4444444444444444".into(),
            parent_id: "3333333333333333".into(),
            name: "drones.assign".into(),
            service: "drones".into(),
            start_us: 1_000,
            duration_us: 5,
            attributes: crate::spans::attrs([("drone_id", 7.into())]),
        };
        export_kept(&kept);
        let span = loop {
            let body = tokio::time::timeout(std::time::Duration::from_secs(5), got_rx.recv_async()).await??;
            let spans = body["resourceSpans"][0]["scopeSpans"][0]["spans"].as_array().cloned().unwrap_or_default();
            if let Some(ours) = spans.into_iter().find(|s| s["spanId"] == "4444444444444444") {
                break ours;
            }
        };
        assert_eq!(
            (span["name"].as_str(), span["parentSpanId"].as_str()),
            (Some("drones.assign"), Some("3333333333333333"))
        );
        assert_eq!(
            (span["startTimeUnixNano"].as_str(), span["endTimeUnixNano"].as_str()),
            (Some("1000000"), Some("1005000"))
        );
        let attributes = span["attributes"].to_string();
        for part in ["fleetstream.service", "drones", "fleetstream.delivery_id", "\"42\"", "drone_id", "\"7\""] {
            assert!(attributes.contains(part), "{part} in {attributes}");
        }
        Ok(())
    }
}
