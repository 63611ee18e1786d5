//! Calls from one service to another, with the resilience every internal call needs.
//!
//! A [`Dependency`] is one internal service (Accounts, Package, Delivery, Drone Management)
//! as seen by its caller. A call is HTTP-shaped ([`Call`]: method, path, JSON body) whether the
//! dependency runs in this process (its router is called directly: the one-process mode, no
//! socket) or elsewhere (HTTPS with a client certificate to one of several instances). Either
//! way it goes through the same tower stack, outermost first:
//!
//! ```text
//! Retry ─► Breaker ─► LoadShed ─► ConcurrencyLimit ─► Timeout ─► Local router | Remote pool
//! ```
//!
//! - **Retry** (tower `Retry` with exponential backoff and jitter): only idempotent calls
//!   (PUT, GET, DELETE; every internal write is a PUT or DELETE of a named resource), only on a
//!   timeout, a transport failure or a `5xx`, at most `retries` times.
//! - **Breaker** (the pure [`crate::breaker::Breaker`] with the clock read here): an open
//!   circuit fails the call at once; each attempt's outcome is recorded.
//! - **LoadShed + ConcurrencyLimit**: at most `concurrency` calls in flight per dependency; one
//!   more is refused at once instead of queueing without bound.
//! - **Timeout** per attempt.
//! - **Remote pool**: round robin over the instances a background task finds healthy
//!   (`GET /healthz` every `health_interval_ms`); an instance that fails a call is skipped until
//!   its next good health check.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, Method, Request, StatusCode, header};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::util::BoxCloneSyncService;
use tower::util::rng::HasherRng;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::breaker::{Breaker, BreakerConfig};

/// Largest reply body read from a dependency.
const MAX_REPLY_BYTES: usize = 1 << 20;

/// How calls to one dependency behave. Defaults: 2 s per attempt, 2 retries backing off from
/// 20 ms to 500 ms with full jitter, 1,024 calls in flight, the breaker's defaults, a health
/// check every second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallPolicy {
    /// Per-attempt timeout, ms.
    pub timeout_ms: u64,
    /// Retries after the first attempt (idempotent calls only).
    pub retries: u32,
    /// First backoff, ms.
    pub backoff_min_ms: u64,
    /// Longest backoff, ms.
    pub backoff_max_ms: u64,
    /// Calls in flight at once; more are refused at once.
    pub concurrency: usize,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
    /// Health check period for remote instances, ms.
    pub health_interval_ms: u64,
}

impl Default for CallPolicy {
    fn default() -> Self {
        Self {
            timeout_ms: 2_000,
            retries: 2,
            backoff_min_ms: 20,
            backoff_max_ms: 500,
            concurrency: 1024,
            breaker: BreakerConfig::default(),
            health_interval_ms: 1_000,
        }
    }
}

/// One call to a dependency.
#[derive(Debug, Clone)]
pub struct Call {
    /// HTTP method; anything but POST and PATCH is idempotent and may be retried.
    pub method: Method,
    /// Path and query, starting with `/`.
    pub path: String,
    /// JSON body (empty for none).
    pub body: Bytes,
    /// W3C trace context to pass on.
    pub traceparent: Option<String>,
    /// Further request headers (a `content-type` here replaces the default JSON one).
    pub headers: HeaderMap,
}

impl Call {
    /// A call without a body.
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Self { method, path: path.into(), body: Bytes::new(), traceparent: None, headers: HeaderMap::new() }
    }

    /// A call with `value` as its JSON body.
    pub fn json(method: Method, path: impl Into<String>, value: &impl Serialize) -> Self {
        let body = serde_json::to_vec(value).map(Bytes::from).unwrap_or_default();
        Self { method, path: path.into(), body, traceparent: None, headers: HeaderMap::new() }
    }

    /// A call with `body` as it is (its `content-type` given in [`Call::headers`]).
    pub fn raw(method: Method, path: impl Into<String>, body: Bytes) -> Self {
        Self { method, path: path.into(), body, traceparent: None, headers: HeaderMap::new() }
    }

    /// The call as part of `trace` (it carries its `traceparent`).
    pub fn traced(mut self, trace: &events::TraceContext) -> Self {
        if trace.is_some() {
            self.traceparent = Some(trace.to_header());
        }
        self
    }

    fn idempotent(&self) -> bool {
        !matches!(self.method, Method::POST | Method::PATCH)
    }
}

/// A dependency's answer (any status: `4xx` answers are the caller's to interpret).
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Body.
    pub body: Bytes,
    /// The answer's headers that describe it to a client ([`REPLY_HEADERS`]).
    pub headers: HeaderMap,
}

/// The headers of an answer kept in a [`Reply`]: those that tell a client what the body is
/// and what to do next.
pub const REPLY_HEADERS: [HeaderName; 6] = [
    header::CONTENT_TYPE,
    header::RETRY_AFTER,
    header::LOCATION,
    header::ALLOW,
    header::WWW_AUTHENTICATE,
    header::CACHE_CONTROL,
];

fn reply_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in REPLY_HEADERS {
        for v in from.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

impl Reply {
    /// The body as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, CallError> {
        serde_json::from_slice(&self.body).map_err(|e| CallError::Unavailable(format!("unreadable reply: {e}")))
    }
}

/// Why a call got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// An attempt took longer than the timeout.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// Transport failure, no healthy instance, or a `5xx`.
    #[error("{0}")]
    Unavailable(String),
    /// The circuit is open: failing fast.
    #[error("circuit open after repeated failures; retry in {retry_in_ms} ms")]
    CircuitOpen {
        /// When the breaker will let a probe through.
        retry_in_ms: u64,
    },
    /// Too many calls in flight.
    #[error("too many calls in flight")]
    Overloaded,
}

impl CallError {
    fn retryable(&self) -> bool {
        matches!(self, CallError::Timeout(_) | CallError::Unavailable(_))
    }
}

/// Counters of one dependency, for `/metrics`.
#[derive(Debug, Default)]
pub struct CallMetrics {
    /// Attempts made (retries included).
    pub attempts: AtomicU64,
    /// Attempts that failed (timeout, transport, `5xx`).
    pub failures: AtomicU64,
    /// Retries.
    pub retries: AtomicU64,
    /// Calls refused by the open breaker.
    pub short_circuited: AtomicU64,
}

/// One internal service as its callers see it. Cheap to clone.
#[derive(Clone)]
pub struct Dependency {
    name: &'static str,
    svc: BoxCloneSyncService<Call, Reply, CallError>,
    breaker: Arc<Mutex<Breaker>>,
    metrics: Arc<CallMetrics>,
    /// The instances of a remote dependency (streamed calls and health go to it directly).
    pool: Option<Arc<Pool>>,
}

impl std::fmt::Debug for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dependency").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Dependency {
    /// `name` served by `router` in this process.
    pub fn local(name: &'static str, router: Router, policy: CallPolicy) -> Self {
        Self::build(name, Backend::Local(router), policy)
    }

    /// `name` served by the instances at `base_urls` (`https://host:port`), called with
    /// `client` (which carries this service's client certificate). Must be called inside a
    /// tokio runtime: it starts the health checks.
    pub fn remote(name: &'static str, base_urls: &[String], client: reqwest::Client, policy: CallPolicy) -> Self {
        let pool = Arc::new(Pool {
            instances: base_urls
                .iter()
                .map(|u| Instance { base: u.trim_end_matches('/').to_string(), healthy: AtomicBool::new(true) })
                .collect(),
            next: AtomicUsize::new(0),
            client,
        });
        tokio::spawn(health_checks(
            name,
            Arc::downgrade(&pool),
            Duration::from_millis(policy.health_interval_ms.max(10)),
        ));
        Self::build(name, Backend::Remote(pool), policy)
    }

    fn build(name: &'static str, backend: Backend, policy: CallPolicy) -> Self {
        let pool = match &backend {
            Backend::Remote(pool) => Some(pool.clone()),
            Backend::Local(_) => None,
        };
        let breaker = Arc::new(Mutex::new(Breaker::new(policy.breaker)));
        let metrics = Arc::new(CallMetrics::default());
        let backoff = ExponentialBackoffMaker::new(
            Duration::from_millis(policy.backoff_min_ms.max(1)),
            Duration::from_millis(policy.backoff_max_ms.max(policy.backoff_min_ms).max(1)),
            1.0,
            HasherRng::default(),
        )
        .map(|mut maker| maker.make_backoff())
        .ok();
        let timeout_ms = policy.timeout_ms.max(1);
        let svc = ServiceBuilder::new()
            .retry(RetryPolicy { left: policy.retries, backoff, metrics: metrics.clone() })
            .layer_fn(|inner| BreakerService { inner, breaker: breaker.clone(), metrics: metrics.clone() })
            .map_err(move |e: tower::BoxError| {
                if e.is::<tower::load_shed::error::Overloaded>() {
                    CallError::Overloaded
                } else if e.is::<tower::timeout::error::Elapsed>() {
                    CallError::Timeout(timeout_ms)
                } else {
                    match e.downcast::<CallError>() {
                        Ok(e) => *e,
                        Err(e) => CallError::Unavailable(e.to_string()),
                    }
                }
            })
            .load_shed()
            .concurrency_limit(policy.concurrency.max(1))
            .timeout(Duration::from_millis(timeout_ms))
            .service(backend);
        Self { name, svc: BoxCloneSyncService::new(svc), breaker, metrics, pool }
    }

    /// The dependency's name, as errors report it.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its counters.
    pub fn metrics(&self) -> &CallMetrics {
        &self.metrics
    }

    /// Its breaker's current state.
    pub fn breaker_state(&self) -> crate::breaker::State {
        self.breaker.lock().state()
    }

    /// Makes a call through the whole stack.
    pub async fn call(&self, call: Call) -> Result<Reply, CallError> {
        self.svc.clone().oneshot(call).await
    }

    /// How many of its instances passed their last health check, of how many (one of one for
    /// a dependency in this process).
    pub fn instances_healthy(&self) -> (usize, usize) {
        match &self.pool {
            None => (1, 1),
            Some(pool) => {
                (pool.instances.iter().filter(|i| i.healthy.load(Ordering::Relaxed)).count(), pool.instances.len())
            }
        }
    }

    /// Opens a call whose answer is a stream (Server-Sent Events) and hands back the response
    /// with its body unread: the breaker is asked and told, the answer's headers must come
    /// within the timeout, but there is no retry (a stream is not repeated) and no limit on how
    /// long the body lasts. Only for a remote dependency.
    pub async fn open(&self, call: Call, timeout: Duration) -> Result<reqwest::Response, CallError> {
        let pool = self.pool.as_ref().ok_or_else(|| CallError::Unavailable("not a remote dependency".into()))?;
        let now = events::now_us();
        if let Err(refused) = self.breaker.lock().allow(now) {
            self.metrics.short_circuited.fetch_add(1, Ordering::Relaxed);
            return Err(CallError::CircuitOpen { retry_in_ms: refused.retry_at_us.saturating_sub(now) / 1000 });
        }
        self.metrics.attempts.fetch_add(1, Ordering::Relaxed);
        let (inst, req) = pool.request(call)?;
        let outcome = match tokio::time::timeout(timeout, req.send()).await {
            Err(_) => Err(CallError::Timeout(timeout.as_millis() as u64)),
            Ok(Err(e)) => {
                inst.healthy.store(false, Ordering::Relaxed);
                Err(CallError::Unavailable(format!("{}: {}", inst.base, error_chain(&e))))
            }
            Ok(Ok(resp)) => Ok(resp),
        };
        let ok = matches!(&outcome, Ok(r) if !r.status().is_server_error());
        if !ok {
            self.metrics.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.breaker.lock().record(events::now_us(), ok);
        outcome
    }
}

/// Appends the counters and breaker state of `deps` in Prometheus text format.
pub fn render_metrics<'a>(deps: impl IntoIterator<Item = &'a Dependency>, out: &mut String) {
    use std::fmt::Write;
    for d in deps {
        let m = d.metrics();
        for (name, v) in [
            ("fleetstream_dependency_attempts_total", &m.attempts),
            ("fleetstream_dependency_failures_total", &m.failures),
            ("fleetstream_dependency_retries_total", &m.retries),
            ("fleetstream_dependency_short_circuited_total", &m.short_circuited),
        ] {
            let _ = writeln!(out, "{name}{{dependency=\"{}\"}} {}", d.name(), v.load(Ordering::Relaxed));
        }
        let open = u8::from(!matches!(d.breaker_state(), crate::breaker::State::Closed));
        let _ = writeln!(out, "fleetstream_dependency_circuit_open{{dependency=\"{}\"}} {open}", d.name());
    }
}

#[derive(Clone)]
enum Backend {
    Local(Router),
    Remote(Arc<Pool>),
}

struct Pool {
    instances: Vec<Instance>,
    next: AtomicUsize,
    client: reqwest::Client,
}

struct Instance {
    base: String,
    healthy: AtomicBool,
}

impl Pool {
    /// The next healthy instance, round robin. When none is marked healthy the marks may be
    /// stale (every instance restarted since the last check), so any instance is tried rather
    /// than failing every call until the next health check.
    fn pick(&self) -> Option<&Instance> {
        let n = self.instances.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut ring = (0..n).map(|i| &self.instances[(start + i) % n]);
        ring.clone().find(|inst| inst.healthy.load(Ordering::Relaxed)).or_else(|| ring.next())
    }

    /// `call` as a request to the next instance, and that instance.
    fn request(&self, call: Call) -> Result<(&Instance, reqwest::RequestBuilder), CallError> {
        let inst = self.pick().ok_or_else(|| CallError::Unavailable("no instance configured".into()))?;
        let method = reqwest::Method::from_bytes(call.method.as_str().as_bytes())
            .map_err(|e| CallError::Unavailable(e.to_string()))?;
        let req = self
            .client
            .request(method, format!("{}{}", inst.base, call.path))
            .headers(request_headers(call.headers, call.traceparent.as_deref()))
            .body(call.body);
        Ok((inst, req))
    }
}

async fn health_checks(name: &'static str, pool: std::sync::Weak<Pool>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        for inst in &pool.instances {
            let ok = pool
                .client
                .get(format!("{}/healthz", inst.base))
                .timeout(every)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if inst.healthy.swap(ok, Ordering::Relaxed) != ok {
                if ok {
                    tracing::info!(dependency = name, instance = %inst.base, "instance healthy again");
                } else {
                    tracing::warn!(dependency = name, instance = %inst.base, "instance failed its health check");
                }
            }
        }
    }
}

impl Service<Call> for Backend {
    type Response = Reply;
    type Error = CallError;
    type Future = BoxFuture<'static, Result<Reply, CallError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        match self {
            Backend::Local(router) => {
                let router = router.clone();
                Box::pin(async move {
                    let mut req = Request::builder().method(call.method).uri(call.path);
                    if let Some(headers) = req.headers_mut() {
                        *headers = request_headers(call.headers, call.traceparent.as_deref());
                    }
                    let req = req.body(Body::from(call.body)).map_err(|e| CallError::Unavailable(e.to_string()))?;
                    let resp = router.oneshot(req).await.map_err(|e| CallError::Unavailable(e.to_string()))?;
                    let (status, headers) = (resp.status(), reply_headers(resp.headers()));
                    let body = axum::body::to_bytes(resp.into_body(), MAX_REPLY_BYTES)
                        .await
                        .map_err(|e| CallError::Unavailable(e.to_string()))?;
                    Ok(Reply { status, body, headers })
                })
            }
            Backend::Remote(pool) => {
                let pool = pool.clone();
                Box::pin(async move {
                    let (inst, req) = pool.request(call)?;
                    let resp = match req.send().await {
                        Ok(resp) => resp,
                        Err(e) => {
                            inst.healthy.store(false, Ordering::Relaxed);
                            return Err(CallError::Unavailable(format!("{}: {}", inst.base, error_chain(&e))));
                        }
                    };
                    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                    let headers = reply_headers(resp.headers());
                    let body = resp.bytes().await.map_err(|e| CallError::Unavailable(error_chain(&e)))?;
                    if body.len() > MAX_REPLY_BYTES {
                        return Err(CallError::Unavailable("reply too large".into()));
                    }
                    Ok(Reply { status, body, headers })
                })
            }
        }
    }
}

/// A call's request headers: JSON unless the call names its own content type, and its trace.
fn request_headers(mut headers: HeaderMap, traceparent: Option<&str>) -> HeaderMap {
    if !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
    }
    if let Some(v) = traceparent.and_then(|tp| axum::http::HeaderValue::from_str(tp).ok()) {
        headers.insert("traceparent", v);
    }
    headers
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Records each attempt's outcome in the breaker and refuses attempts while it is open.
#[derive(Clone)]
struct BreakerService<S> {
    inner: S,
    breaker: Arc<Mutex<Breaker>>,
    metrics: Arc<CallMetrics>,
}

impl<S> Service<Call> for BreakerService<S>
where
    S: Service<Call, Response = Reply, Error = CallError> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = CallError;
    type Future = BoxFuture<'static, Result<Reply, CallError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let now = events::now_us();
        if let Err(refused) = self.breaker.lock().allow(now) {
            self.metrics.short_circuited.fetch_add(1, Ordering::Relaxed);
            let retry_in_ms = refused.retry_at_us.saturating_sub(now) / 1000;
            return Box::pin(async move { Err(CallError::CircuitOpen { retry_in_ms }) });
        }
        self.metrics.attempts.fetch_add(1, Ordering::Relaxed);
        let fut = self.inner.call(call);
        let (breaker, metrics) = (self.breaker.clone(), self.metrics.clone());
        Box::pin(async move {
            let outcome = fut.await;
            let ok = matches!(&outcome, Ok(r) if !r.status.is_server_error());
            if !ok {
                metrics.failures.fetch_add(1, Ordering::Relaxed);
            }
            breaker.lock().record(events::now_us(), ok);
            outcome
        })
    }
}

/// Retries idempotent calls that failed for a reason a retry may cure.
#[derive(Clone)]
struct RetryPolicy {
    left: u32,
    backoff: Option<ExponentialBackoff<HasherRng>>,
    metrics: Arc<CallMetrics>,
}

impl tower::retry::Policy<Call, Reply, CallError> for RetryPolicy {
    type Future = BoxFuture<'static, ()>;

    fn retry(&mut self, call: &mut Call, result: &mut Result<Reply, CallError>) -> Option<Self::Future> {
        let again = match result {
            Ok(reply) => reply.status.is_server_error(),
            Err(e) => e.retryable(),
        };
        if !again || !call.idempotent() || self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.metrics.retries.fetch_add(1, Ordering::Relaxed);
        let sleep = self.backoff.as_mut().map(|b| b.next_backoff());
        Some(Box::pin(async move {
            if let Some(sleep) = sleep {
                sleep.await;
            }
        }))
    }

    fn clone_request(&mut self, call: &Call) -> Option<Call> {
        Some(call.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use axum::routing::put;

    use super::*;

    fn flaky_router(fail_first: u32, hits: Arc<AtomicU32>) -> Router {
        Router::new().route(
            "/thing",
            put(move || {
                let hits = hits.clone();
                async move {
                    let n = hits.fetch_add(1, Ordering::SeqCst);
                    if n < fail_first { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }
                }
            })
            .post(|| async { StatusCode::SERVICE_UNAVAILABLE }),
        )
    }

    fn quick() -> CallPolicy {
        CallPolicy { backoff_min_ms: 1, backoff_max_ms: 2, ..CallPolicy::default() }
    }

    #[tokio::test]
    async fn idempotent_calls_are_retried_until_they_succeed() {
        let hits = Arc::new(AtomicU32::new(0));
        let dep = Dependency::local("thing", flaky_router(2, hits.clone()), quick());
        let reply = dep.call(Call::new(Method::PUT, "/thing")).await;
        assert_eq!(reply.map(|r| r.status), Ok(StatusCode::OK));
        assert_eq!(hits.load(Ordering::SeqCst), 3);
        assert_eq!(dep.metrics().retries.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn retries_stop_at_the_limit_and_posts_are_not_retried() {
        let hits = Arc::new(AtomicU32::new(0));
        let dep = Dependency::local("thing", flaky_router(10, hits.clone()), quick());
        let reply = dep.call(Call::new(Method::PUT, "/thing")).await;
        assert_eq!(reply.map(|r| r.status), Ok(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(hits.load(Ordering::SeqCst), 3, "one attempt and two retries");
        let before = dep.metrics().attempts.load(Ordering::Relaxed);
        let reply = dep.call(Call::new(Method::POST, "/thing")).await;
        assert_eq!(reply.map(|r| r.status), Ok(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(dep.metrics().attempts.load(Ordering::Relaxed), before + 1, "a POST is tried once");
    }

    #[tokio::test]
    async fn a_failing_dependency_opens_the_circuit_and_calls_fail_fast() {
        let hits = Arc::new(AtomicU32::new(0));
        let policy = CallPolicy {
            retries: 0,
            breaker: BreakerConfig { min_calls: 4, open_ms: 60_000, ..BreakerConfig::default() },
            ..quick()
        };
        let dep = Dependency::local("thing", flaky_router(u32::MAX, hits.clone()), policy);
        for _ in 0..4 {
            let reply = dep.call(Call::new(Method::PUT, "/thing")).await;
            assert_eq!(reply.map(|r| r.status), Ok(StatusCode::SERVICE_UNAVAILABLE));
        }
        let refused = dep.call(Call::new(Method::PUT, "/thing")).await;
        assert!(matches!(refused, Err(CallError::CircuitOpen { .. })), "{refused:?}");
        assert_eq!(hits.load(Ordering::SeqCst), 4, "the open circuit kept the call away");
        assert_eq!(dep.metrics().short_circuited.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_slow_dependency_times_out() {
        let router = Router::new().route(
            "/slow",
            put(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                StatusCode::OK
            }),
        );
        let dep = Dependency::local("slow", router, CallPolicy { timeout_ms: 20, retries: 1, ..quick() });
        let started = std::time::Instant::now();
        let reply = dep.call(Call::new(Method::PUT, "/slow")).await;
        assert_eq!(reply.map(|r| r.status), Err(CallError::Timeout(20)));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(dep.metrics().attempts.load(Ordering::Relaxed), 2, "the timeout was retried once");
    }

    #[tokio::test]
    async fn remote_calls_skip_an_instance_that_is_down() -> anyhow::Result<()> {
        let hits = Arc::new(AtomicU32::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let up = listener.local_addr()?;
        let router = flaky_router(0, hits.clone()).route("/healthz", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(listener, router).await });
        // A port nothing listens on.
        let down = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let urls = vec![format!("http://{down}"), format!("http://{up}")];
        let dep = Dependency::remote("thing", &urls, crate::tls::plain_client()?, quick());
        for _ in 0..6 {
            let reply = dep.call(Call::new(Method::PUT, "/thing")).await;
            assert_eq!(reply.map(|r| r.status), Ok(StatusCode::OK));
        }
        assert_eq!(hits.load(Ordering::SeqCst), 6);
        Ok(())
    }
}
