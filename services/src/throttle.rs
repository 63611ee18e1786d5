//! Per-client rate limits on the public API: each client (its authenticated principal, see
//! [`crate::auth`], otherwise its IP address) gets `rate_per_s` requests per second with bursts of up to
//! `burst`; past that it gets `429` with `Retry-After` (whole seconds, at least 1) and the
//! request is not run. The limiter keeps one small state per recently seen client and forgets
//! idle ones, so memory stays bounded by the clients active in the last few seconds.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use serde::{Deserialize, Serialize};

/// Limits per client. Defaults: 20,000 requests/s with bursts of 40,000 — a ceiling for a
/// runaway or abusive client well above what one legitimate client (a partner's integration,
/// the load generator scheduling 10,000 deliveries/s) needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleConfig {
    /// Sustained requests per second per client.
    pub rate_per_s: u32,
    /// Requests a client may make at once after being idle.
    pub burst: u32,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self { rate_per_s: 20_000, burst: 40_000 }
    }
}

/// The limiter shared by the public routes.
pub struct Throttle {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    checks: AtomicU64,
    /// Requests refused with 429.
    pub throttled: AtomicU64,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle").field("clients", &self.limiter.len()).finish()
    }
}

impl Throttle {
    /// A limiter with `cfg`'s limits (zero is taken as one).
    pub fn new(cfg: ThrottleConfig) -> Arc<Self> {
        let rate = NonZeroU32::new(cfg.rate_per_s).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(cfg.burst).unwrap_or(rate);
        Arc::new(Self {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
        })
    }

    /// `Ok` if `client` may make a request now; otherwise how many seconds to wait.
    pub fn check(&self, client: &str) -> Result<(), u64> {
        if self.checks.fetch_add(1, Ordering::Relaxed).is_multiple_of(4096) {
            // Forget clients whose allowance has fully recovered: they are indistinguishable
            // from new ones, so nothing is lost.
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&client.to_string()).map_err(|not_until| {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            not_until.wait_time_from(self.clock.now()).as_secs_f64().ceil().max(1.0) as u64
        })
    }
}

/// The client a request counts against: its authenticated principal, else its peer address.
/// Never a header the client picks: with no keys configured, a made-up `x-api-key` per request
/// would otherwise be a fresh allowance per request.
fn client_of(req: &Request) -> String {
    if let Some(key) = req.extensions().get::<crate::auth::Principal>().and_then(crate::auth::Principal::throttle_key) {
        return key;
    }
    match req.extensions().get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(addr)) => format!("ip:{}", addr.ip()),
        None => "unknown".to_string(),
    }
}

/// The middleware: a client past its allowance gets `429` with `Retry-After`. A request the
/// gateway forwarded ([`crate::auth::Forwarded`]) was throttled there.
pub async fn limit(State(throttle): State<Arc<Throttle>>, req: Request, next: Next) -> Response {
    if req.extensions().get::<crate::auth::Forwarded>().is_some() {
        return next.run(req).await;
    }
    let client = client_of(&req);
    match throttle.check(&client) {
        Ok(()) => next.run(req).await,
        Err(wait_s) => {
            tracing::info!(client, wait_s, "request throttled");
            let body = serde_json::json!({
                "error": "throttled",
                "message": format!("too many requests; retry in {wait_s} s"),
            });
            let mut resp = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
            if let Ok(v) = HeaderValue::from_str(&wait_s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_past_its_burst_is_told_when_to_come_back_and_others_are_not_affected() {
        let t = Throttle::new(ThrottleConfig { rate_per_s: 1, burst: 3 });
        for _ in 0..3 {
            assert_eq!(t.check("a"), Ok(()));
        }
        assert_eq!(t.check("a"), Err(1), "the fourth within a second waits about a second");
        assert_eq!(t.check("b"), Ok(()), "limits are per client");
        assert_eq!(t.throttled.load(Ordering::Relaxed), 1);
    }
}
