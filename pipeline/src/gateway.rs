//! The gateway (`pipeline serve --role gateway`): the one public HTTPS entry of a split
//! deployment, so a client knows one URL and never which role serves which route.
//!
//! It authenticates every request once (API keys, [`services::auth`]) and throttles it once, on
//! the principal it found (else the peer address). Then it forwards the request to a role that
//! owns the route ([`ROUTES`]), through the internal resilient client ([`Dependency`]:
//! timeouts, retries of idempotent calls, a circuit breaker, balancing over healthy instances,
//! the gateway's service certificate), with the principal in [`PRINCIPAL_HEADER`]. The role
//! believes that header only from a caller with a service certificate, so a client cannot name
//! its own principal, and does not throttle forwarded requests again. Server-Sent Events
//! (`/v1/streams/{topic}/events`) are forwarded as a stream. The gateway answers
//! `/v1/openapi.json`, `/healthz`, `/readyz` (not draining, and every role it forwards to has
//! a healthy instance) and `/metrics` itself.
//!
//! An unknown route is `404` and a method a route does not have `405`, in the same JSON form
//! as every answer; a role that cannot be reached is `503` with `Retry-After`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, get};
use services::auth::{Caller, PRINCIPAL_HEADER};
use services::client::{Call, CallError, Dependency};
use services::trace::TraceContext;

use crate::roles::Role;

/// One public route and, per method, the role that serves it.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// The path, as axum writes it.
    pub path: &'static str,
    /// Each method and its role.
    pub methods: &'static [(&'static str, Role)],
    /// Whether the answer is a stream of Server-Sent Events.
    pub stream: bool,
}

const fn route(path: &'static str, methods: &'static [(&'static str, Role)]) -> Route {
    Route { path, methods, stream: false }
}

/// Every public route of a split deployment and the role that owns it. A test checks this
/// table against the OpenAPI document, so a route added to a service and not here fails it.
pub const ROUTES: &[Route] = &[
    route("/v1/deliveries", &[("POST", Role::Scheduler)]),
    route("/v1/deliveries/{id}", &[("GET", Role::Delivery), ("PATCH", Role::Scheduler), ("DELETE", Role::Scheduler)]),
    route("/v1/deliveries/{id}/notifications", &[("POST", Role::Delivery)]),
    route("/v1/deliveries/{id}/history", &[("GET", Role::History)]),
    route("/v1/deliveries/{id}/trace", &[("GET", Role::History)]),
    route("/v1/history", &[("GET", Role::History)]),
    route("/v1/drones", &[("POST", Role::Drones)]),
    route("/v1/drones/{id}", &[("GET", Role::Drones), ("PUT", Role::Drones)]),
    route("/v1/accounts/{owner}", &[("GET", Role::Accounts), ("PUT", Role::Accounts)]),
    route("/v1/queues", &[("GET", Role::Ingest)]),
    route("/v1/queues/{queue}/dead-letters", &[("GET", Role::Ingest)]),
    route("/v1/queues/{queue}/dead-letters/{id}", &[("GET", Role::Ingest), ("DELETE", Role::Ingest)]),
    route("/v1/queues/{queue}/dead-letters/{id}/replay", &[("POST", Role::Ingest)]),
    route("/v1/streams", &[("GET", Role::Ingest)]),
    route("/v1/telemetry", &[("POST", Role::Ingest)]),
    Route { path: "/v1/streams/{topic}/events", methods: &[("GET", Role::Ingest)], stream: true },
];

/// The request headers a role needs from a client's request (beside the body and the trace).
const PASSED_ON: [&str; 4] = ["content-type", "idempotency-key", "last-event-id", "accept"];

/// The roles the gateway forwards to, each reached through one [`Dependency`].
#[derive(Debug)]
pub struct Gateway {
    targets: Vec<(Role, Dependency, AtomicU64)>,
    /// The longest wait for a streamed answer's headers.
    stream_timeout: Duration,
    stopping: Arc<AtomicBool>,
}

impl Gateway {
    /// A gateway over `targets` (the roles whose routes it serves; a route of a role not given
    /// is not mounted), not ready once `stopping` is on.
    pub fn new(targets: Vec<(Role, Dependency)>, stream_timeout: Duration, stopping: Arc<AtomicBool>) -> Arc<Self> {
        Arc::new(Self {
            targets: targets.into_iter().map(|(r, d)| (r, d, AtomicU64::new(0))).collect(),
            stream_timeout,
            stopping,
        })
    }

    fn target(&self, role: Role) -> Option<&(Role, Dependency, AtomicU64)> {
        self.targets.iter().find(|(r, _, _)| *r == role)
    }

    /// What keeps the gateway from being ready: a drain, or a role without a healthy
    /// instance.
    pub fn not_ready(&self) -> Vec<(String, String)> {
        let mut parts = Vec::new();
        if self.stopping.load(Ordering::SeqCst) {
            parts.push(("node".to_string(), "draining: shutting down".to_string()));
        }
        for (role, dep, _) in &self.targets {
            let (healthy, of) = dep.instances_healthy();
            if healthy == 0 {
                parts.push((role.name().to_string(), format!("none of its {of} instances passed its health check")));
            }
        }
        parts
    }

    /// Requests forwarded per role, and each role's calls and breaker, for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        events::prom::declare(out, "fleetstream_gateway_forwarded_total", "counter");
        for (role, _, n) in &self.targets {
            let _ = writeln!(
                out,
                "fleetstream_gateway_forwarded_total{{role=\"{}\"}} {}",
                role.name(),
                n.load(Ordering::Relaxed)
            );
        }
        services::client::render_metrics(self.targets.iter().map(|(_, d, _)| d), out);
        events::prom::declare(out, "fleetstream_stopped", "gauge");
        for (part, _) in self.not_ready() {
            let _ = writeln!(out, "fleetstream_stopped{{part=\"{part}\"}} 1");
        }
    }

    /// The public routes of every role it has, each forwarding to its role.
    pub fn router(self: &Arc<Self>) -> Router {
        let mut router = Router::new();
        for r in ROUTES {
            let mut methods = MethodRouter::new();
            let mut any = false;
            for &(method, role) in r.methods {
                if self.target(role).is_none() {
                    continue;
                }
                let Ok(filter) = MethodFilter::try_from(Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET))
                else {
                    continue;
                };
                let (gw, stream) = (self.clone(), r.stream);
                methods = methods.on(
                    filter,
                    move |Caller(principal): Caller,
                          trace: Option<axum::Extension<TraceContext>>,
                          method: Method,
                          uri: Uri,
                          headers: HeaderMap,
                          body: Bytes| async move {
                        let trace = trace.map(|axum::Extension(t)| t).unwrap_or_default();
                        let mut call = Call::raw(method, path_and_query(&uri), body).traced(&trace);
                        for name in PASSED_ON {
                            if let Some(v) = headers.get(name) {
                                call.headers.insert(name, v.clone());
                            }
                        }
                        call.headers.insert(PRINCIPAL_HEADER, principal.to_header());
                        gw.forward(role, stream, call).await
                    },
                );
                any = true;
            }
            if any {
                router = router.route(r.path, methods);
            }
        }
        let health = self.clone();
        router
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(move || std::future::ready(crate::node::readiness(health.not_ready()))))
    }

    async fn forward(&self, role: Role, stream: bool, call: Call) -> Response {
        let Some((_, dep, forwarded)) = self.target(role) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        forwarded.fetch_add(1, Ordering::Relaxed);
        let unavailable =
            |e: CallError| services::Error::Dependency { service: role.name(), reason: e.to_string() }.into_response();
        if stream {
            return match dep.open(call, self.stream_timeout).await {
                Err(e) => unavailable(e),
                Ok(resp) => {
                    let mut answer = Response::builder().status(resp.status().as_u16());
                    for name in services::client::REPLY_HEADERS {
                        for v in resp.headers().get_all(name.as_str()) {
                            answer = answer.header(name.clone(), v.as_bytes());
                        }
                    }
                    answer
                        .body(Body::from_stream(resp.bytes_stream()))
                        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
                }
            };
        }
        match dep.call(call).await {
            Err(e) => unavailable(e),
            Ok(reply) => {
                let mut answer = (reply.status, reply.body).into_response();
                let headers = answer.headers_mut();
                headers.remove(header::CONTENT_TYPE);
                headers.extend(reply.headers);
                answer
            }
        }
    }
}

fn path_and_query(uri: &Uri) -> String {
    uri.path_and_query().map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation of the OpenAPI document is routed by the gateway, and every route of
    /// the gateway is in the document.
    #[test]
    fn the_route_table_matches_the_api_document() {
        let doc = serde_json::to_value(crate::admin::api_document()).expect("the document serialises"); // ok: a fixed document
        let mut documented = std::collections::BTreeSet::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in item.as_object().into_iter().flatten().map(|(m, _)| m.to_uppercase()) {
                if path != "/v1/openapi.json" && method != "PARAMETERS" {
                    documented.insert((path.clone(), method));
                }
            }
        }
        let routed: std::collections::BTreeSet<_> =
            ROUTES.iter().flat_map(|r| r.methods.iter().map(|(m, _)| (r.path.to_string(), m.to_string()))).collect();
        assert_eq!(documented, routed);
    }
}
