//! Who may do what on the public API. Each API key is bound to a principal: a customer (an
//! owner) or an admin. With keys configured, every route but `/healthz`, `/readyz` and
//! `/metrics` needs one, as `Authorization: Bearer <key>` or `x-api-key: <key>`: none is `401`
//! (with `WWW-Authenticate: Bearer`), an unknown one `403`.
//!
//! | principal | may |
//! |---|---|
//! | customer (`owner`) | schedule for its owner; read, change, cancel, subscribe to and list its owner's deliveries. Another owner's delivery is `404` (its existence is not disclosed); ordering or listing for another owner is `403` |
//! | admin | everything a customer may, for any owner; open accounts (`/v1/accounts`), register and read drones (`/v1/drones`), read streams (`/v1/streams`) and queues and dead letters (`/v1/queues`) |
//!
//! A customer key on an admin route is `403`. Every refusal is logged and counted
//! (`fleetstream_http_unauthenticated_total`, `fleetstream_http_forbidden_total`). With no keys
//! configured the API is open (a loopback listener, the demo): every caller is
//! [`Principal::Open`], which may do what an admin may, and the node warns at start.
//!
//! Keys are held as SHA-256 digests only: a key may be configured as its digest
//! (`sha256 = "hex"`), so the configuration need not hold the secret. A bare string in the list
//! is an admin key (what every key was before keys had principals).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Who is calling, as the API-key check found it; in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No keys are configured: the open API of a loopback listener. May do what an admin may.
    Open,
    /// An operator.
    Admin {
        /// A name for logs and the per-client throttle: the key digest's first 8 hex digits.
        label: Arc<str>,
    },
    /// A customer, acting for its owner only.
    Customer {
        /// The owner whose deliveries it may see and order.
        owner: Arc<str>,
    },
}

impl Principal {
    /// Whether it may order, see and change `owner`'s deliveries.
    pub fn may_act_for(&self, owner: &str) -> bool {
        match self {
            Principal::Open | Principal::Admin { .. } => true,
            Principal::Customer { owner: own } => **own == *owner,
        }
    }

    /// Whether it may use the admin routes.
    pub fn is_admin(&self) -> bool {
        matches!(self, Principal::Open | Principal::Admin { .. })
    }

    /// The throttle's key for it; `None` for the open API (the peer's address is used).
    pub fn throttle_key(&self) -> Option<String> {
        match self {
            Principal::Open => None,
            Principal::Admin { label } => Some(format!("admin:{label}")),
            Principal::Customer { owner } => Some(format!("owner:{owner}")),
        }
    }

    /// `NotFound` for a delivery `owner` ordered that this caller may not see: a customer
    /// learns nothing of other owners' deliveries, not even that they exist.
    pub fn check_delivery(&self, owner: &str, id: u64) -> Result<(), Error> {
        if self.may_act_for(owner) {
            return Ok(());
        }
        refused("owner", "a delivery of another owner was asked for");
        Err(Error::NotFound { what: "delivery", id })
    }

    /// `Forbidden` when this caller may not order or list for `owner`.
    pub fn check_owner(&self, owner: &str) -> Result<(), Error> {
        if self.may_act_for(owner) {
            return Ok(());
        }
        refused("owner", "an order or listing for another owner was refused");
        Err(Error::Forbidden(format!("this API key may not act for owner {owner:?}")))
    }
}

/// The header in which the gateway passes the principal it authenticated to the role that
/// serves the route. A role believes it only from a caller with a service certificate (or, with
/// `transport = "plain"`, from the mesh it trusts); the gateway never forwards a client's own.
pub const PRINCIPAL_HEADER: &str = "x-fleetstream-principal";

/// Marks a request a service forwarded for a client it authenticated (and throttled) itself.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded;

impl Principal {
    /// The principal as [`PRINCIPAL_HEADER`] carries it: `open`, `admin <label>` or
    /// `customer <owner, percent-encoded>`.
    pub fn to_header(&self) -> HeaderValue {
        let text = match self {
            Principal::Open => "open".to_string(),
            Principal::Admin { label } => format!("admin {}", crate::api::path_segment(label)),
            Principal::Customer { owner } => format!("customer {}", crate::api::path_segment(owner)),
        };
        // Percent-encoding leaves only visible ASCII, which is always a valid header value.
        HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("customer %00"))
    }

    /// The principal [`Principal::to_header`] wrote, or `None` for anything else.
    pub fn from_header(value: &str) -> Option<Principal> {
        let (kind, rest) = value.split_once(' ').unwrap_or((value, ""));
        match kind {
            "open" if rest.is_empty() => Some(Principal::Open),
            "admin" => Some(Principal::Admin { label: percent_decode(rest)?.into() }),
            "customer" => {
                let owner = percent_decode(rest)?;
                (!owner.is_empty() && !owner.contains('\0')).then(|| Principal::Customer { owner: owner.into() })
            }
            _ => None,
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// The caller of a handler: the [`Principal`] the key check put in the request, or
/// [`Principal::Open`] when no check ran (a router used without the middleware, in tests or
/// in-process).
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Caller(parts.extensions.get::<Principal>().cloned().unwrap_or(Principal::Open)))
    }
}

/// What a configured key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The admin routes and every owner's deliveries.
    Admin,
    /// One owner's deliveries (give `owner`).
    Customer,
}

/// One entry of `[http] api_keys`: `{ key = "…", owner = "customer-1" }`, `{ key = "…", role =
/// "admin" }`, `{ sha256 = "<64 hex digits>", owner = "…" }`, or a bare string (an admin key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ApiKeySpec {
    /// A bare key: an admin key.
    Plain(String),
    /// A key bound to a principal.
    Bound(BoundKey),
}

impl From<&str> for ApiKeySpec {
    fn from(key: &str) -> Self {
        ApiKeySpec::Plain(key.to_string())
    }
}

impl ApiKeySpec {
    /// A customer key for `owner`.
    pub fn customer(key: &str, owner: &str) -> Self {
        ApiKeySpec::Bound(BoundKey { key: Some(key.into()), sha256: None, owner: Some(owner.into()), role: None })
    }

    /// An admin key.
    pub fn admin(key: &str) -> Self {
        ApiKeySpec::Bound(BoundKey { key: Some(key.into()), sha256: None, owner: None, role: Some(Role::Admin) })
    }
}

/// A key bound to a principal: exactly one of `key` and `sha256`; `owner` for a customer,
/// `role = "admin"` for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundKey {
    /// The key itself.
    #[serde(default)]
    pub key: Option<String>,
    /// The key's SHA-256 digest, hex (`printf %s KEY | sha256sum`).
    #[serde(default)]
    pub sha256: Option<String>,
    /// The owner a customer key acts for.
    #[serde(default)]
    pub owner: Option<String>,
    /// `admin`, or `customer` (the default when `owner` is given).
    #[serde(default)]
    pub role: Option<Role>,
}

fn digest(key: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn label_of(d: &[u8; 32]) -> Arc<str> {
    d[..4].iter().map(|b| format!("{b:02x}")).collect::<String>().into()
}

/// The accepted keys (as digests) with their principals, and the refusal counters.
#[derive(Debug, Default)]
pub struct ApiKeys {
    keys: HashMap<[u8; 32], Principal>,
    /// Requests refused for a missing key.
    pub missing: AtomicU64,
    /// Requests refused for an unknown key.
    pub unknown: AtomicU64,
}

impl ApiKeys {
    /// The keys of `[http] api_keys` (and `api_keys_file`); a malformed entry is an error
    /// naming it (by position, never by its secret).
    pub fn from_specs(specs: &[ApiKeySpec]) -> Result<Arc<Self>, Error> {
        let mut keys = HashMap::new();
        for (i, spec) in specs.iter().enumerate() {
            let bad = |why: &str| Error::Config(format!("api_keys[{i}]: {why}"));
            let (d, principal) = match spec {
                ApiKeySpec::Plain(key) if key.trim().is_empty() => continue,
                ApiKeySpec::Plain(key) => {
                    let d = digest(key.trim());
                    (d, Principal::Admin { label: label_of(&d) })
                }
                ApiKeySpec::Bound(b) => {
                    let d = match (&b.key, &b.sha256) {
                        (Some(key), None) if !key.trim().is_empty() => digest(key.trim()),
                        (None, Some(hex)) => {
                            parse_digest(hex).ok_or_else(|| bad("sha256 must be 64 hexadecimal digits"))?
                        }
                        _ => return Err(bad("give exactly one of `key` and `sha256`")),
                    };
                    let principal = match (b.role, &b.owner) {
                        (Some(Role::Admin), None) => Principal::Admin { label: label_of(&d) },
                        (Some(Role::Admin), Some(_)) => return Err(bad("an admin key has no `owner`")),
                        (Some(Role::Customer) | None, Some(owner)) if !owner.trim().is_empty() => {
                            Principal::Customer { owner: owner.trim().into() }
                        }
                        _ => return Err(bad("give `owner` (a customer key) or `role = \"admin\"`")),
                    };
                    (d, principal)
                }
            };
            if keys.insert(d, principal).is_some() {
                return Err(bad("the same key is listed twice"));
            }
        }
        Ok(Arc::new(Self { keys, ..Self::default() }))
    }

    /// Whether any key is required.
    pub fn enforced(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The principal of `key`, if it is accepted.
    pub fn principal(&self, key: &str) -> Option<&Principal> {
        self.keys.get(&digest(key.trim()))
    }
}

static FORBIDDEN_ROLE: AtomicU64 = AtomicU64::new(0);
static FORBIDDEN_OWNER: AtomicU64 = AtomicU64::new(0);

fn refused(reason: &'static str, what: &str) {
    let counter = if reason == "role" { &FORBIDDEN_ROLE } else { &FORBIDDEN_OWNER };
    counter.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(reason, "{what}");
}

/// Requests refused for what their key may do, by reason (`role`: an admin route with a
/// customer key; `owner`: another owner's delivery or orders), since the process started.
pub fn forbidden_counts() -> [(&'static str, u64); 2] {
    [("role", FORBIDDEN_ROLE.load(Ordering::Relaxed)), ("owner", FORBIDDEN_OWNER.load(Ordering::Relaxed))]
}

/// Prometheus text for the refusals: missing and unknown keys (of `keys`), and forbidden ones.
pub fn render_metrics(keys: &ApiKeys, out: &mut String) {
    events::prom::declare(out, "fleetstream_http_unauthenticated_total", "counter");
    for (reason, counter) in [("missing", &keys.missing), ("unknown", &keys.unknown)] {
        let n = counter.load(Ordering::Relaxed);
        out.push_str(&format!("fleetstream_http_unauthenticated_total{{reason=\"{reason}\"}} {n}\n"));
    }
    events::prom::declare(out, "fleetstream_http_forbidden_total", "counter");
    for (reason, n) in forbidden_counts() {
        out.push_str(&format!("fleetstream_http_forbidden_total{{reason=\"{reason}\"}} {n}\n"));
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

/// Routes only an admin (or the open API) may use.
pub fn is_admin_route(path: &str) -> bool {
    ["/v1/accounts", "/v1/drones", "/v1/streams", "/v1/queues", "/v1/telemetry", "/v1/dashboard"]
        .iter()
        .any(|p| path == *p || path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/')))
}

/// Open to all: probes, metrics, and the dashboard's page (which holds no data: its stream is
/// an admin route).
fn is_unauthenticated_route(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics" | "/")
}

/// The middleware: finds the caller's principal, refuses missing and unknown keys and customer
/// keys on admin routes, and puts the principal in the request for the handlers.
pub async fn require(State(keys): State<Arc<ApiKeys>>, req: Request, next: Next) -> Response {
    check(&keys, req, next).await
}

/// The middleware for a split-mode service: as [`require`], but `/internal/` routes are left
/// to the client certificate check ([`crate::tls::internal_only`]), since services present
/// certificates, not API keys.
///
/// A request from a service (a verified client certificate) that carries
/// [`PRINCIPAL_HEADER`] was authenticated by the gateway: its principal is taken from the
/// header, and it is marked [`Forwarded`] so it is not throttled a second time.
pub async fn require_public(State(keys): State<Arc<ApiKeys>>, mut req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/internal/") {
        return next.run(req).await;
    }
    let from_service = req.extensions().get::<crate::tls::PeerCertificate>().is_some_and(|p| p.0);
    let forwarded = req.headers().get(PRINCIPAL_HEADER).map(|v| v.to_str().ok().and_then(Principal::from_header));
    match forwarded {
        Some(Some(principal)) if from_service => {
            if is_admin_route(req.uri().path()) && !principal.is_admin() {
                refused("role", "a customer key on an admin route was refused");
                return refuse(StatusCode::FORBIDDEN, "forbidden", "this route needs an admin API key");
            }
            req.extensions_mut().insert(principal);
            req.extensions_mut().insert(Forwarded);
            next.run(req).await
        }
        Some(_) => {
            tracing::warn!(path = %req.uri().path(), from_service, "a forwarded principal refused");
            refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a principal is taken only from a service, in the form the gateway writes",
            )
        }
        None => check(&keys, req, next).await,
    }
}

async fn check(keys: &ApiKeys, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !keys.enforced() || is_unauthenticated_route(path) {
        req.extensions_mut().insert(Principal::Open);
        return next.run(req).await;
    }
    let principal = match key_of(&req) {
        None => {
            keys.missing.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path, "request without an API key refused");
            return refuse(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "an API key is required (Authorization: Bearer <key>)",
            );
        }
        Some(k) => match keys.principal(k) {
            Some(p) => p.clone(),
            None => {
                keys.unknown.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path, "request with an unknown API key refused");
                return refuse(StatusCode::FORBIDDEN, "forbidden", "this API key is not accepted");
            }
        },
    };
    if is_admin_route(path) && !principal.is_admin() {
        refused("role", "a customer key on an admin route was refused");
        return refuse(StatusCode::FORBIDDEN, "forbidden", "this route needs an admin API key");
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(key: Option<&str>, sha256: Option<&str>, owner: Option<&str>, role: Option<Role>) -> ApiKeySpec {
        ApiKeySpec::Bound(BoundKey {
            key: key.map(Into::into),
            sha256: sha256.map(Into::into),
            owner: owner.map(Into::into),
            role,
        })
    }

    #[test]
    fn keys_are_bound_to_their_principals_and_digests_match_their_keys() {
        let hex: String = digest("secret-b").iter().map(|b| format!("{b:02x}")).collect();
        let keys = ApiKeys::from_specs(&[
            bound(Some("secret-a"), None, Some("customer-1"), None),
            bound(None, Some(&hex), Some("customer-2"), Some(Role::Customer)),
            bound(Some("ops"), None, None, Some(Role::Admin)),
            ApiKeySpec::Plain("legacy".into()),
            ApiKeySpec::Plain("  ".into()),
        ])
        .expect("valid keys"); // ok: a test's own fixed keys
        assert!(keys.enforced());
        assert_eq!(keys.principal("secret-a"), Some(&Principal::Customer { owner: "customer-1".into() }));
        assert_eq!(keys.principal("secret-b"), Some(&Principal::Customer { owner: "customer-2".into() }));
        assert!(keys.principal("ops").is_some_and(Principal::is_admin));
        assert!(keys.principal("legacy").is_some_and(Principal::is_admin));
        assert_eq!(keys.principal("secret-c"), None);
        let customer = Principal::Customer { owner: "customer-1".into() };
        assert!(customer.may_act_for("customer-1") && !customer.may_act_for("customer-2") && !customer.is_admin());
        assert!(customer.check_delivery("customer-2", 7).is_err_and(|e| matches!(e, Error::NotFound { .. })));
        assert!(customer.check_owner("customer-2").is_err_and(|e| matches!(e, Error::Forbidden(_))));
    }

    #[test]
    fn malformed_entries_are_refused_by_position() {
        for (spec, why) in [
            (bound(Some("k"), Some(&"0".repeat(64)), Some("o"), None), "exactly one"),
            (bound(None, Some("abc"), Some("o"), None), "64 hexadecimal"),
            (bound(Some("k"), None, None, None), "owner"),
            (bound(Some("k"), None, Some("o"), Some(Role::Admin)), "no `owner`"),
            (bound(Some("k"), None, Some(" "), None), "owner"),
        ] {
            let err = ApiKeys::from_specs(&[ApiKeySpec::Plain("x".into()), spec]).expect_err(why);
            let text = err.to_string();
            assert!(text.contains("api_keys[1]") && text.contains(why), "{text}");
        }
        let twice = ApiKeys::from_specs(&[ApiKeySpec::Plain("x".into()), ApiKeySpec::Plain("x".into())]);
        assert!(twice.is_err_and(|e| e.to_string().contains("twice")));
    }

    #[test]
    fn admin_routes_are_recognised_by_path_segment() {
        for path in ["/v1/accounts/a", "/v1/drones", "/v1/drones/7", "/v1/streams/x/events", "/v1/queues"] {
            assert!(is_admin_route(path), "{path}");
        }
        for path in ["/v1/deliveries", "/v1/dronesx", "/v1/history", "/healthz"] {
            assert!(!is_admin_route(path), "{path}");
        }
    }

    #[test]
    fn principals_cross_the_gateway_unchanged_and_nothing_else_passes_for_one() {
        for p in [
            Principal::Open,
            Principal::Admin { label: "0a1b2c3d".into() },
            Principal::Customer { owner: "customer-1".into() },
            Principal::Customer { owner: "Zoë & co/Δ 100%".into() },
        ] {
            let header = p.to_header();
            let text = header.to_str().expect("visible ASCII"); // ok: to_header writes only that
            assert_eq!(Principal::from_header(text), Some(p), "{text}");
        }
        for bad in ["", "opens", "open x", "customer", "customer %zz", "customer %00", "root admin", "customer %f0"] {
            assert_eq!(Principal::from_header(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_config_forms_parse() {
        let specs: Vec<ApiKeySpec> =
            serde_json::from_str(r#"[{ "key": "a", "owner": "customer-1" }, { "key": "b", "role": "admin" }, "c"]"#)
                .expect("parses"); // ok: a test's own fixed JSON
        assert_eq!(specs.len(), 3);
        assert!(matches!(specs[2], ApiKeySpec::Plain(_)));
        assert!(serde_json::from_str::<Vec<ApiKeySpec>>(r#"[{ "key": "a", "owners": "x" }]"#).is_err());
    }
}
