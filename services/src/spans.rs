//! A delivery's whole trace, kept: every part of the system that works on a delivery (the
//! scheduler and each call it makes, Drone Management's assignment, the mission's trip to the
//! drone and its answer, the engine's derivation of each delivery event, the history's store,
//! the notification) records a span under the delivery's id, and `GET /v1/deliveries/{id}/trace`
//! answers them in order.
//!
//! Recording never slows the work it describes: [`Spans::record`] puts a finished span on a
//! bounded queue (full: the span is dropped and counted), and one keeper task per process
//! takes the queue in batches to where spans are kept: the Delivery History's store in the
//! process that has it (redb on one machine, PostgreSQL with several), or, in a process of its
//! own, the history role over HTTP (`POST /internal/v1/history/spans`). Kept spans are bounded:
//! at most [`SpansConfig::max_per_delivery`] per delivery, removed after
//! [`SpansConfig::retention_hours`], and the oldest go first once the store holds
//! [`SpansConfig::max_spans`]. They are exported over OTLP too when a collector is configured.
//!
//! Parts that do not know a delivery's trace (the engine deriving from telemetry, which has the
//! drone's trace, not the customer's) record spans with no trace id; the store gives them the
//! delivery's trace, the one its first kept span carried (the scheduling request's).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use events::{DeliveryId, TraceContext};
use serde::{Deserialize, Serialize};

use crate::client::{Call, Dependency};
use crate::history::History;

/// A span's attributes: names to JSON values.
pub type Attributes = serde_json::Map<String, serde_json::Value>;

/// One finished span of a delivery's life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeptSpan {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// Its trace (32 hex digits); empty when the recorder did not know it.
    #[serde(default)]
    pub trace_id: String,
    /// The span (16 hex digits).
    pub span_id: String,
    /// The span it ran under (16 hex digits), empty for none.
    #[serde(default)]
    pub parent_id: String,
    /// What happened: `scheduler.create`, `drones.assign`, `engine.derive.in_transit`, ….
    pub name: String,
    /// The service that did it.
    pub service: String,
    /// When it started, µs since the epoch.
    pub start_us: u64,
    /// How long it took, µs.
    pub duration_us: u64,
    /// What else is known (ids, offsets, outcome).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub attributes: Attributes,
}

impl KeptSpan {
    /// A span as received from another process: ids in hex of the right length, names short.
    fn check(&self) -> Result<(), String> {
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !(self.trace_id.is_empty() || hex(&self.trace_id, 32)) {
            return Err(format!("trace_id {:?} is not 32 hex digits", self.trace_id));
        }
        if !hex(&self.span_id, 16) || !(self.parent_id.is_empty() || hex(&self.parent_id, 16)) {
            return Err("span_id and parent_id must be 16 hex digits".into());
        }
        if self.name.is_empty() || self.name.len() > 128 || self.service.len() > 64 {
            return Err("name (1-128 bytes) or service (at most 64) out of bounds".into());
        }
        Ok(())
    }
}

/// `[tracing]`'s settings for kept spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpansConfig {
    /// Whether spans are kept per delivery at all. Default true.
    pub keep: bool,
    /// How long kept spans stay, hours. Default 72.
    pub retention_hours: u64,
    /// Spans kept at most, all deliveries together; past it the oldest go. Default 2,000,000
    /// (a span takes about 300 bytes in the store: about 600 MB at most).
    pub max_spans: u64,
    /// Spans kept per delivery at most (later ones are dropped and counted). Default 256: a
    /// delivery's life takes about 20, more with reschedules and redelivered missions.
    pub max_per_delivery: u32,
}

impl Default for SpansConfig {
    fn default() -> Self {
        Self { keep: true, retention_hours: 72, max_spans: 2_000_000, max_per_delivery: 256 }
    }
}

/// Spans waiting for the keeper, at most.
const QUEUE: usize = 32_768;
/// Spans per store write, at most.
const BATCH: usize = 4096;
/// How long the keeper gathers spans before a write.
const LINGER: Duration = Duration::from_millis(200);
/// How often expired spans are removed.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Counters of the keeper.
#[derive(Debug, Default)]
pub struct SpanMetrics {
    /// Spans recorded.
    pub recorded: AtomicU64,
    /// Spans dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Spans the store refused or could not take (an error, or a delivery at its cap).
    pub not_kept: AtomicU64,
    /// Spans removed by retention.
    pub expired: AtomicU64,
}

/// Where a process records spans. Cheap to clone; [`Spans::off`] records nothing.
#[derive(Debug, Clone, Default)]
pub struct Spans {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    tx: flume::Sender<KeptSpan>,
    metrics: Arc<SpanMetrics>,
    /// Tells the keeper to write what is queued and stop.
    stop: tokio::sync::watch::Sender<bool>,
    keeper: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Where the keeper takes spans.
#[derive(Debug, Clone)]
pub enum SpanSink {
    /// The Delivery History in this process.
    Local(Arc<History>),
    /// The history role, over HTTP.
    Remote(Dependency),
}

impl Spans {
    /// Records nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// Starts the keeper task (inside a tokio runtime) taking spans to `sink`; off when
    /// `cfg.keep` is false.
    pub fn start(cfg: SpansConfig, sink: SpanSink) -> Self {
        if !cfg.keep {
            return Self::off();
        }
        if let SpanSink::Local(history) = &sink {
            history.span_cap.store(cfg.max_per_delivery, Ordering::Relaxed);
        }
        let (tx, rx) = flume::bounded(QUEUE);
        let metrics = Arc::new(SpanMetrics::default());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let keeper = tokio::spawn(keeper(cfg, sink, rx, metrics.clone(), stopped));
        Self { inner: Some(Arc::new(Inner { tx, metrics, stop, keeper: parking_lot::Mutex::new(Some(keeper)) })) }
    }

    /// Writes what is queued and stops the keeper (at shutdown; it lets go of the store it
    /// writes to). Spans recorded afterwards are dropped.
    pub async fn close(&self) {
        let Some(inner) = &self.inner else { return };
        let _ = inner.stop.send(true);
        let keeper = inner.keeper.lock().take();
        if let Some(keeper) = keeper {
            let _ = keeper.await;
        }
    }

    /// Whether spans go anywhere.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// The keeper's counters (`None` when off).
    pub fn metrics(&self) -> Option<&SpanMetrics> {
        self.inner.as_ref().map(|i| &*i.metrics)
    }

    /// Records a finished span that started at `start_us` and took `duration_us`.
    pub fn record(&self, of: SpanOf, start_us: u64, duration_us: u64) {
        let Some(inner) = &self.inner else { return };
        let kept = KeptSpan {
            delivery_id: of.delivery,
            trace_id: if of.span.is_some() { of.span.trace_hex() } else { String::new() },
            span_id: of.span.span_hex(),
            parent_id: of.parent.filter(|p| p.span_id != [0; 8]).map(|p| p.span_hex()).unwrap_or_default(),
            name: of.name,
            service: of.service.to_string(),
            start_us,
            duration_us,
            attributes: of.attributes,
        };
        inner.metrics.recorded.fetch_add(1, Ordering::Relaxed);
        if inner.tx.try_send(kept).is_err() {
            inner.metrics.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a finished span that started at `started` and ends now.
    pub fn record_since(&self, of: SpanOf, started: std::time::Instant) {
        if self.inner.is_none() {
            return;
        }
        let took = started.elapsed().as_micros() as u64;
        self.record(of, events::now_us().saturating_sub(took), took);
    }

    /// Prometheus lines for the keeper's counters.
    pub fn render_metrics(&self, out: &mut String) {
        let Some(m) = self.metrics() else { return };
        let c = |out: &mut String, name, v: &AtomicU64| events::prom::counter(out, name, v.load(Ordering::Relaxed));
        c(out, "fleetstream_trace_spans_recorded_total", &m.recorded);
        c(out, "fleetstream_trace_spans_dropped_total", &m.dropped);
        c(out, "fleetstream_trace_spans_not_kept_total", &m.not_kept);
        c(out, "fleetstream_trace_spans_expired_total", &m.expired);
    }
}

/// Records a `history.store` span for each delivery event of `group` (delivery-events log
/// offset, batch), stored in one write that started at `started`; logs (and exports) a span
/// per traced batch as before.
pub fn history_stored<B: std::borrow::Borrow<events::DeliveryBatch>>(
    spans: &Spans,
    group: &[(u64, B)],
    started: std::time::Instant,
) {
    let took = started.elapsed().as_micros() as u64;
    let start_us = events::now_us().saturating_sub(took);
    for (offset, batch) in group {
        let batch = batch.borrow();
        let trace = batch.header().meta.trace;
        if trace.is_some() && crate::trace::recording() {
            crate::trace::log_span(&trace.child(), Some(&trace), "history store", "consumer", 0, started);
        }
        if !spans.is_on() {
            continue;
        }
        for e in batch.events().iter() {
            let stage = e.stage.to_stage().name().into();
            let attributes = attrs([("offset", (*offset).into()), ("seq", e.seq.to_native().into()), ("stage", stage)]);
            let of = SpanOf::new(e.delivery_id.to_native(), "history.store", "history").with(attributes);
            spans.record(of, start_us, took);
        }
    }
}

/// The context a request ran under: the server span the trace middleware made, or, where the
/// request came from this process without it, the caller's `traceparent`.
pub fn request_trace(
    ext: Option<axum::Extension<TraceContext>>,
    headers: &axum::http::HeaderMap,
) -> Option<TraceContext> {
    ext.map(|axum::Extension(t)| t)
        .or_else(|| headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(TraceContext::parse))
}

/// What a span is of: which delivery, what happened and where, in which context.
#[derive(Debug, Clone)]
pub struct SpanOf {
    delivery: DeliveryId,
    name: String,
    service: &'static str,
    span: TraceContext,
    parent: Option<TraceContext>,
    attributes: Attributes,
}

impl SpanOf {
    /// `name` done by `service` for `delivery`, as a new span in no known trace (the store
    /// gives it the delivery's).
    pub fn new(delivery: DeliveryId, name: impl Into<String>, service: &'static str) -> Self {
        Self {
            delivery,
            name: name.into(),
            service,
            span: TraceContext::default().child(),
            parent: None,
            attributes: Attributes::new(),
        }
    }

    /// The span is `span`, run under `parent`.
    pub fn in_span(mut self, span: TraceContext, parent: Option<TraceContext>) -> Self {
        self.span = span;
        self.parent = parent;
        self
    }

    /// A new span under `parent`, in its trace.
    pub fn under(self, parent: TraceContext) -> Self {
        self.in_span(parent.child(), Some(parent))
    }

    /// With `attributes`.
    pub fn with(mut self, attributes: Attributes) -> Self {
        self.attributes = attributes;
        self
    }
}

/// Attributes from `(name, value)` pairs.
pub fn attrs<const N: usize>(pairs: [(&str, serde_json::Value); N]) -> Attributes {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

async fn keeper(
    cfg: SpansConfig,
    sink: SpanSink,
    rx: flume::Receiver<KeptSpan>,
    metrics: Arc<SpanMetrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_purge = tokio::time::Instant::now();
    loop {
        let first = tokio::select! {
            _ = stop.wait_for(|s| *s) => None,
            got = tokio::time::timeout(PURGE_EVERY, rx.recv_async()) => match got {
                Ok(Ok(span)) => Some(span),
                Ok(Err(_)) => break,
                Err(_) => None,
            },
        };
        let stopping = *stop.borrow();
        let mut batch: Vec<KeptSpan> = first.into_iter().collect();
        if !batch.is_empty() && !stopping && rx.len() < BATCH {
            // What else arrives within a moment goes in the same write. The keeper sleeps
            // meanwhile rather than waiting on the queue: a waiting receiver would be woken by
            // every span sent (tens of thousands a second when scheduling flat out). Behind,
            // or stopping, it writes at once.
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                () = tokio::time::sleep(LINGER) => {}
            }
        }
        loop {
            batch.extend(rx.try_iter().take(BATCH.saturating_sub(batch.len())));
            if batch.is_empty() {
                break;
            }
            let n = batch.len() as u64;
            let kept = put(&sink, cfg, std::mem::take(&mut batch)).await;
            metrics.not_kept.fetch_add(n - kept, Ordering::Relaxed);
            // At the stop, everything queued is written before the keeper ends.
            if !*stop.borrow() {
                break;
            }
        }
        if *stop.borrow() {
            return;
        }
        if last_purge.elapsed() >= PURGE_EVERY {
            last_purge = tokio::time::Instant::now();
            if let SpanSink::Local(history) = &sink {
                let before = events::now_us().saturating_sub(cfg.retention_hours.saturating_mul(3_600_000_000));
                let history = history.clone();
                match tokio::task::spawn_blocking(move || history.purge_spans(before, cfg.max_spans)).await {
                    Ok(Ok(n)) => drop(metrics.expired.fetch_add(n, Ordering::Relaxed)),
                    Ok(Err(error)) => tracing::warn!(%error, "could not remove expired spans"),
                    Err(error) => tracing::warn!(%error, "span purge panicked"),
                }
            }
        }
    }
}

/// Takes `batch` where spans are kept; how many were.
async fn put(sink: &SpanSink, cfg: SpansConfig, batch: Vec<KeptSpan>) -> u64 {
    match sink {
        SpanSink::Local(history) => {
            let history = history.clone();
            match tokio::task::spawn_blocking(move || history.keep_spans(batch, cfg.max_per_delivery)).await {
                Ok(Ok(kept)) => {
                    for span in &kept {
                        crate::trace::export_kept(span);
                    }
                    kept.len() as u64
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "could not keep spans");
                    0
                }
                Err(error) => {
                    tracing::warn!(%error, "keeping spans panicked");
                    0
                }
            }
        }
        SpanSink::Remote(history) => {
            let n = batch.len() as u64;
            let call = Call::json(axum::http::Method::POST, "/internal/v1/history/spans", &batch);
            match history.call(call).await {
                Ok(reply) if reply.status.is_success() => n,
                Ok(reply) => {
                    tracing::warn!(status = %reply.status, spans = n, "the history refused spans");
                    0
                }
                Err(error) => {
                    tracing::warn!(%error, spans = n, "could not send spans to the history");
                    0
                }
            }
        }
    }
}

/// `POST /internal/v1/history/spans`: spans from the other roles, kept here.
pub(crate) async fn post_spans(
    axum::extract::State(history): axum::extract::State<Arc<History>>,
    axum::Json(spans): axum::Json<Vec<KeptSpan>>,
) -> Result<axum::http::StatusCode, crate::Error> {
    if spans.len() > BATCH {
        return Err(crate::Error::BadRequest(format!("at most {BATCH} spans at once")));
    }
    for (i, span) in spans.iter().enumerate() {
        span.check().map_err(|e| crate::Error::BadRequest(format!("span {i}: {e}")))?;
    }
    let cap = history.span_cap.load(Ordering::Relaxed);
    let kept = tokio::task::spawn_blocking(move || history.keep_spans(spans, cap))
        .await
        .map_err(|e| crate::Error::BadRequest(format!("keeping spans: {e}")))??;
    for span in &kept {
        crate::trace::export_kept(span);
    }
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// `GET /v1/deliveries/{id}/trace`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryTrace {
    /// The delivery's trace: the scheduling request's.
    pub trace_id: String,
    /// Its spans, by start time.
    pub spans: Vec<TraceSpan>,
}

/// One span as `GET /v1/deliveries/{id}/trace` answers it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TraceSpan {
    /// What happened.
    pub name: String,
    /// The service that did it.
    pub service: String,
    /// When it started, µs since the epoch.
    pub start_us: u64,
    /// How long it took, µs.
    pub duration_us: u64,
    /// The span (16 hex digits).
    pub span_id: String,
    /// The span it ran under, empty for none.
    pub parent_id: String,
    /// What else is known.
    #[schema(value_type = Object)]
    pub attributes: Attributes,
}

impl DeliveryTrace {
    /// The answer for a delivery's kept spans by start time; of spans that started in the
    /// same microsecond a parent before its children (it started them), then in the order
    /// they were kept.
    pub fn of(trace_id: String, spans: Vec<KeptSpan>) -> Self {
        let depths: Vec<usize> = {
            let parents: std::collections::HashMap<&str, &str> =
                spans.iter().map(|s| (s.span_id.as_str(), s.parent_id.as_str())).collect();
            spans
                .iter()
                .map(|s| {
                    let (mut depth, mut at) = (0usize, s.parent_id.as_str());
                    // Bounded by the spans' count, should the ids ever form a cycle.
                    while let Some(parent) = parents.get(at).filter(|_| depth < parents.len()) {
                        depth += 1;
                        at = parent;
                    }
                    depth
                })
                .collect()
        };
        let mut keyed: Vec<((u64, usize), KeptSpan)> =
            depths.into_iter().zip(spans).map(|(depth, s)| ((s.start_us, depth), s)).collect();
        keyed.sort_by_key(|(key, _)| *key);
        let spans: Vec<KeptSpan> = keyed.into_iter().map(|(_, s)| s).collect();
        let spans = spans
            .into_iter()
            .map(|s| TraceSpan {
                name: s.name,
                service: s.service,
                start_us: s.start_us,
                duration_us: s.duration_us,
                span_id: s.span_id,
                parent_id: s.parent_id,
                attributes: s.attributes,
            })
            .collect();
        Self { trace_id, spans }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str, start_us: u64, duration_us: u64) -> KeptSpan {
        KeptSpan {
            delivery_id: 1,
            trace_id: String::new(),
            span_id: format!("{:016x}", start_us + duration_us),
            parent_id: String::new(),
            name: name.into(),
            service: "scheduler".into(),
            start_us,
            duration_us,
            attributes: Attributes::new(),
        }
    }

    #[test]
    fn a_trace_lists_a_parent_before_the_child_it_started_in_the_same_microsecond() {
        // Kept in the order they ended: the children first. "call" and "sibling" started
        // together under the same parent: they keep the order they were kept in.
        let create = span("create", 10, 1620);
        let call = KeptSpan { parent_id: create.span_id.clone(), ..span("call", 10, 62) };
        let sibling = KeptSpan { parent_id: create.span_id.clone(), ..span("sibling", 10, 900) };
        let kept = vec![call, sibling, create, span("later", 20, 5), span("first", 5, 1)];
        let names: Vec<String> = DeliveryTrace::of("t".into(), kept).spans.into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["first", "create", "call", "sibling", "later"]);
    }
}
