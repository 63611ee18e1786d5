//! TLS for the services: HTTPS on the public API, and mutual TLS between services with a
//! private certificate authority.
//!
//! [`init_ca`] (what `pipeline certs init` runs) creates the CA and one certificate per service
//! role, each good as a server and as a client, all signed by the CA. A service then serves
//! HTTPS with its own certificate and, for internal traffic, **requires** a client certificate
//! signed by the same CA ([`server_config`] with `client_ca`): a caller without one, or with
//! one from another CA, fails the handshake and never reaches a route. Its calls to other
//! services present its own certificate ([`client`]). Handshake failures are logged and
//! counted ([`TlsMetrics`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::ConnectInfo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::Error;

fn tls_error(e: impl std::fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where a service finds its certificate, key and the CA it trusts (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// The CA whose certificates are trusted (for peers and, when required, clients).
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The files `pipeline certs init` wrote for `role` under `dir`.
    pub fn in_dir(dir: &Path, role: &str) -> Self {
        Self { cert: dir.join(format!("{role}.pem")), key: dir.join(format!("{role}-key.pem")), ca: dir.join("ca.pem") }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Tls(format!("reading {}: {e}", path.display())))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?
        .ok_or_else(|| Error::Tls(format!("{} holds no private key", path.display())))
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca)? {
        roots.add(cert).map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
    }
    Ok(roots)
}

/// Whom a TLS listener lets through the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Anyone (public HTTPS).
    None,
    /// Anyone, but a client certificate, if presented, must be signed by the CA; routes under
    /// `/internal/` then require one ([`internal_only`]). For a service with public and
    /// internal routes on one listener.
    Optional,
    /// Only clients with a certificate signed by the CA.
    Required,
}

/// Server settings: this service's certificate, and client certificates checked against the
/// CA as `auth` says (the CA file is read only when `auth` is not [`ClientAuth::None`]).
pub fn server_config(files: &TlsFiles, auth: ClientAuth) -> Result<Arc<rustls::ServerConfig>, Error> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    let verifier = || -> Result<_, Error> {
        Ok(rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&files.ca)?), provider()))
    };
    let builder = match auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Optional => {
            builder.with_client_cert_verifier(verifier()?.allow_unauthenticated().build().map_err(tls_error)?)
        }
        ClientAuth::Required => builder.with_client_cert_verifier(verifier()?.build().map_err(tls_error)?),
    };
    let mut cfg = builder.with_single_cert(certs(&files.cert)?, key(&files.key)?).map_err(tls_error)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A TLS client configuration (ring, TLS 1.2 and 1.3) trusting the CAs in the PEM file `ca`:
/// for PostgreSQL and the like, whose servers are checked against a CA of their own.
pub fn client_tls_config(ca: &Path) -> Result<rustls::ClientConfig, Error> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth())
}

/// Makes ring the process's rustls provider if none is installed yet. reqwest needs one to
/// build a client that is not handed a TLS configuration ([`plain_client`]); the ring
/// provider is the one everything else here uses.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another thread's install is fine: a provider is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A client builder for plain HTTP and HTTPS with the system's roots (webhooks, tests).
pub fn plain_client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
}

/// [`plain_client_builder`] with defaults.
pub fn plain_client() -> Result<reqwest::Client, Error> {
    plain_client_builder().build().map_err(tls_error)
}

/// An HTTP client that trusts the CA and presents this service's certificate.
pub fn client(files: &TlsFiles) -> Result<reqwest::Client, Error> {
    client_builder(files)?.pool_max_idle_per_host(256).build().map_err(tls_error)
}

/// [`client`]'s builder, for callers that add their own settings.
pub fn client_builder(files: &TlsFiles) -> Result<reqwest::ClientBuilder, Error> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(tls_error)?;
    Ok(reqwest::Client::builder().tls_backend_preconfigured(cfg))
}

/// An HTTP client that trusts the CA in `ca` and presents no certificate (a public API client).
pub fn trusting_client(ca: &Path) -> Result<reqwest::Client, Error> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    reqwest::Client::builder().tls_backend_preconfigured(cfg).build().map_err(tls_error)
}

/// Handshake counters of one TLS listener.
#[derive(Debug, Default)]
pub struct TlsMetrics {
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Handshakes refused or failed (no client certificate, an untrusted one, not TLS).
    pub refused: AtomicU64,
}

impl TlsMetrics {
    /// `fleetstream_tls_handshakes_total` and `fleetstream_tls_handshakes_refused_total`.
    pub fn render(&self, out: &mut String) {
        events::prom::counter(out, "fleetstream_tls_handshakes_total", self.handshakes.load(Ordering::Relaxed));
        events::prom::counter(out, "fleetstream_tls_handshakes_refused_total", self.refused.load(Ordering::Relaxed));
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves; open connections are
/// then given the rest of their current request. Each request carries the peer address as
/// `ConnectInfo<SocketAddr>`. A client gets `header_timeout` to send a request's headers: one
/// that sends half a request does not hold its connection.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Arc<rustls::ServerConfig>,
    metrics: Arc<TlsMetrics>,
    header_timeout: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    accept_loop(listener, "TLS", shutdown, move |tcp, peer, mut stop_rx| {
        let (acceptor, router, metrics) = (acceptor.clone(), router.clone(), metrics.clone());
        async move {
            let stream = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    metrics.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, %error, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    metrics.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            metrics.handshakes.fetch_add(1, Ordering::Relaxed);
            let verified = PeerCertificate(stream.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty()));
            serve_connection(stream, router, peer, verified, header_timeout, &mut stop_rx).await;
        }
    })
    .await
}

/// Accepts connections on `listener` until `shutdown` resolves, each handled by `handle` in a
/// task of its own with a receiver that turns true at shutdown; then waits for them to end.
async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    shutdown: impl std::future::Future<Output = ()> + Send,
    handle: F,
) -> std::io::Result<()>
where
    F: Fn(tokio::net::TcpStream, SocketAddr, tokio::sync::watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "accepting an {what} connection");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        connections.spawn(handle(tcp, peer, stop_rx.clone()));
        // Reap finished connections so the set stays small.
        while connections.try_join_next().is_some() {}
    }
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Serves `router` over plain HTTP on `listener` until `shutdown` resolves, as [`serve`] does
/// over TLS: the same header timeout, the peer address as `ConnectInfo<SocketAddr>`, and
/// open connections given the rest of their current request at shutdown.
pub async fn serve_plain(
    listener: tokio::net::TcpListener,
    router: Router,
    header_timeout: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve_plain_as(listener, router, PeerCertificate(false), header_timeout, shutdown).await
}

/// As [`serve_plain`], with every caller taken as `identity` says: `PeerCertificate(true)`
/// for a service behind a mesh that authenticates its callers itself (split mode's
/// `transport = "plain"`).
pub async fn serve_plain_as(
    listener: tokio::net::TcpListener,
    router: Router,
    identity: PeerCertificate,
    header_timeout: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    accept_loop(listener, "HTTP", shutdown, move |tcp, peer, mut stop_rx| {
        let router = router.clone();
        async move { serve_connection(tcp, router, peer, identity, header_timeout, &mut stop_rx).await }
    })
    .await
}

/// One HTTP/1.1 connection until it ends or `stop` turns true (then its request in flight
/// finishes).
async fn serve_connection<S>(
    stream: S,
    router: Router,
    peer: SocketAddr,
    verified: PeerCertificate,
    header_timeout: std::time::Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = tower::ServiceExt::map_request(router, move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
        req.extensions_mut().insert(verified);
        req
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), hyper_util::service::TowerToHyperService::new(svc));
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "HTTP connection ended with an error");
            }
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Whether the caller presented a client certificate the CA signed (the handshake verified
/// it), as a request extension set by [`serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCertificate(pub bool);

/// Refuses requests under `/internal/` from callers without a verified client certificate
/// (`401`, logged): on a listener with [`ClientAuth::Optional`], public routes stay open to
/// API clients while internal ones are for services only.
pub async fn internal_only(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::response::IntoResponse;
    let verified = req.extensions().get::<PeerCertificate>().is_some_and(|p| p.0);
    if req.uri().path().starts_with("/internal/") && !verified {
        let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.to_string()).unwrap_or_default();
        tracing::warn!(%peer, path = %req.uri().path(), "internal route called without a service certificate");
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({
                "error": "client_certificate_required",
                "message": "internal routes need a client certificate from the services' CA",
            })),
        )
            .into_response();
    }
    next.run(req).await
}

/// The roles `pipeline certs init` issues certificates for.
pub const ROLES: [&str; 9] =
    ["scheduler", "delivery", "history", "drones", "accounts", "packages", "ingest", "gateway", "client"];

/// How long `pipeline certs` makes certificates valid, from the day before they are made (a
/// day's slack for clocks behind). Defaults: the CA ten years, each role's certificate 397
/// days (the longest public CAs may issue), so a role's certificate is renewed yearly with
/// [`renew_certs`] while the CA stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// The CA's, days.
    pub ca_days: u32,
    /// Each role's, days.
    pub cert_days: u32,
}

impl Default for Validity {
    fn default() -> Self {
        Self { ca_days: 3650, cert_days: 397 }
    }
}

/// The civil date (year, month, day) `days` after 1970-01-01 (proleptic Gregorian).
fn civil_date(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

/// Sets `params` valid from yesterday for `days` days.
fn valid_for(params: &mut rcgen::CertificateParams, days: u32) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (y, m, d) = civil_date((now.as_secs() / 86_400) as i64 - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    params.not_after = params.not_before + std::time::Duration::from_secs(u64::from(days.max(1)) * 86_400);
}

/// The CA's parameters; [`renew_certs`] rebuilds the issuer from them and the CA's key, so
/// renewed certificates chain to the same `ca.pem`.
fn ca_params(days: u32) -> Result<rcgen::CertificateParams, Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(tls_error)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "fleetstream private CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    valid_for(&mut ca, days);
    Ok(ca)
}

/// Writes files into one directory, keys readable by their owner only.
struct Writer<'a> {
    dir: &'a Path,
    written: Vec<PathBuf>,
}

impl Writer<'_> {
    fn write(&mut self, name: String, contents: String, secret: bool) -> Result<(), Error> {
        let path = self.dir.join(name);
        // Written beside and renamed over: a role restarting meanwhile reads the old pair or the
        // new one, never half of one.
        let tmp = path.with_extension("pem.tmp");
        std::fs::write(&tmp, contents).map_err(|e| Error::Tls(format!("writing {}: {e}", tmp.display())))?;
        if secret {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::Tls(format!("restricting {}: {e}", tmp.display())))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| Error::Tls(format!("writing {}: {e}", path.display())))?;
        self.written.push(path);
        Ok(())
    }
}

/// Issues a certificate and key per role, for `hosts` and loopback, signed by `issuer`.
fn issue_roles(
    out: &mut Writer<'_>,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    hosts: &[String],
    days: u32,
) -> Result<(), Error> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    names.extend(hosts.iter().cloned());
    for role in ROLES {
        let mut params = CertificateParams::new(names.clone()).map_err(tls_error)?;
        params.distinguished_name.push(DnType::CommonName, format!("fleetstream {role}"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        valid_for(&mut params, days);
        let key = KeyPair::generate().map_err(tls_error)?;
        let cert = params.signed_by(&key, issuer).map_err(tls_error)?;
        out.write(format!("{role}-key.pem"), key.serialize_pem(), true)?;
        out.write(format!("{role}.pem"), cert.pem(), false)?;
    }
    Ok(())
}

/// Creates a private CA in `dir` (`ca.pem`, `ca-key.pem`) and, for each role, a certificate
/// and key (`<role>.pem`, `<role>-key.pem`) for the names `hosts` (plus `localhost` and
/// `127.0.0.1`), usable as server and as client, valid as `validity` says. Refuses to
/// overwrite an existing CA.
pub fn init_ca(dir: &Path, hosts: &[String], validity: Validity) -> Result<Vec<PathBuf>, Error> {
    let ca_path = dir.join("ca.pem");
    if ca_path.exists() {
        return Err(Error::Tls(format!("{} exists; remove it to make a new CA", ca_path.display())));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::Tls(format!("creating {}: {e}", dir.display())))?;
    let ca = ca_params(validity.ca_days)?;
    let ca_key = rcgen::KeyPair::generate().map_err(tls_error)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(tls_error)?;
    let mut out = Writer { dir, written: Vec::new() };
    out.write("ca-key.pem".into(), ca_key.serialize_pem(), true)?;
    out.write("ca.pem".into(), ca_cert.pem(), false)?;
    issue_roles(&mut out, &rcgen::Issuer::new(ca, ca_key), hosts, validity.cert_days)?;
    Ok(out.written)
}

/// Issues every role a new certificate and key from the CA in `dir` (its `ca-key.pem`
/// must be there), valid `cert_days` from yesterday: the CA and `ca.pem` stay, so roles
/// restarted one at a time on the new files keep trusting the others.
pub fn renew_certs(dir: &Path, hosts: &[String], cert_days: u32) -> Result<Vec<PathBuf>, Error> {
    let key_path = dir.join("ca-key.pem");
    let pem = std::fs::read_to_string(&key_path)
        .map_err(|e| Error::Tls(format!("reading {} (the CA's key is needed to renew): {e}", key_path.display())))?;
    let ca_key = rcgen::KeyPair::from_pem(&pem).map_err(|e| Error::Tls(format!("{}: {e}", key_path.display())))?;
    let mut out = Writer { dir, written: Vec::new() };
    issue_roles(&mut out, &rcgen::Issuer::new(ca_params(Validity::default().ca_days)?, ca_key), hosts, cert_days)?;
    Ok(out.written)
}

#[cfg(test)]
mod tests {
    use axum::routing::get;

    use super::*;

    #[test]
    fn civil_dates_are_right_across_leap_years_and_centuries() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(-1), (1969, 12, 31));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(11_017), (2000, 3, 1));
        assert_eq!(civil_date(20_788), (2026, 12, 1));
        assert_eq!(civil_date(47_540), (2100, 2, 28));
        assert_eq!(civil_date(47_541), (2100, 3, 1));
    }

    /// Renewed certificates chain to the same CA: a role on a renewed certificate and one still
    /// on its old one trust each other, so roles are restarted onto new certificates one at a
    /// time.
    #[tokio::test]
    async fn renewed_certificates_are_trusted_beside_the_old_ones() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("fleetstream-renew-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init_ca(&dir, &[], Validity { ca_days: 30, cert_days: 7 })?;
        let old_client = client(&TlsFiles::in_dir(&dir, "scheduler"))?;
        let old_cert = std::fs::read(dir.join("packages.pem"))?;
        let written = renew_certs(&dir, &[], 7)?;
        assert_eq!(written.len(), 2 * ROLES.len());
        assert_ne!(std::fs::read(dir.join("packages.pem"))?, old_cert, "a new certificate");
        assert!(renew_certs(&dir.join("nowhere"), &[], 7).is_err_and(|e| e.to_string().contains("ca-key.pem")));
        let server = server_config(&TlsFiles::in_dir(&dir, "packages"), ClientAuth::Required)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = Router::new().route("/healthz", get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics = Arc::new(TlsMetrics::default());
        let task = tokio::spawn(serve(listener, router, server, metrics, std::time::Duration::from_secs(10), async {
            let _ = stopped.await;
        }));
        let url = format!("https://localhost:{}/healthz", addr.port());
        assert_eq!(old_client.get(&url).send().await?.text().await?, "ok");
        let new_client = client(&TlsFiles::in_dir(&dir, "scheduler"))?;
        assert_eq!(new_client.get(&url).send().await?.text().await?, "ok");
        let _ = stop.send(());
        task.await??;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[tokio::test]
    async fn only_clients_with_a_certificate_from_the_ca_get_through() -> anyhow::Result<()> {
        let base = std::env::temp_dir().join(format!("fleetstream-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (ours, theirs) = (base.join("ours"), base.join("theirs"));
        init_ca(&ours, &[], Validity::default())?;
        init_ca(&theirs, &[], Validity::default())?;
        assert!(init_ca(&ours, &[], Validity::default()).is_err(), "an existing CA is not overwritten");

        let server = server_config(&TlsFiles::in_dir(&ours, "packages"), ClientAuth::Required)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let metrics = Arc::new(TlsMetrics::default());
        let router = Router::new().route("/healthz", get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task =
            tokio::spawn(serve(listener, router, server, metrics.clone(), std::time::Duration::from_secs(10), async {
                let _ = stopped.await;
            }));
        let url = format!("https://localhost:{}/healthz", addr.port());

        let good = client(&TlsFiles::in_dir(&ours, "scheduler"))?;
        assert_eq!(good.get(&url).send().await?.text().await?, "ok");

        // A certificate from another CA: the server refuses the handshake.
        let mut foreign = TlsFiles::in_dir(&theirs, "scheduler");
        foreign.ca = ours.join("ca.pem");
        assert!(client(&foreign)?.get(&url).send().await.is_err());

        // No client certificate at all.
        let anonymous = trusting_client(&ours.join("ca.pem"))?;
        assert!(anonymous.get(&url).send().await.is_err());

        // The server counts a refusal once its side of the handshake has ended.
        for _ in 0..100 {
            if metrics.refused.load(Ordering::Relaxed) == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.handshakes.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.refused.load(Ordering::Relaxed), 2);
        let _ = stop.send(());
        task.await??;
        let _ = std::fs::remove_dir_all(&base);
        Ok(())
    }
}
