//! TLS 1.3 for the QUIC endpoint: the server's certificate (from files, or self-signed at start)
//! and the client's trust (a CA file, or, for loopback testing only, no verification).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::{ALPN, Error};

/// A certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// The chain in PEM, to hand to clients that must trust a self-signed certificate.
    pub chain_pem: String,
}

impl Identity {
    /// Loads a PEM certificate chain and private key.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, Error> {
        let chain_pem =
            std::fs::read_to_string(cert).map_err(|e| Error::Tls(format!("reading {}: {e}", cert.display())))?;
        let chain = rustls_pemfile::certs(&mut chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Tls(format!("parsing {}: {e}", cert.display())))?;
        if chain.is_empty() {
            return Err(Error::Tls(format!("{} holds no certificate", cert.display())));
        }
        let key_pem = std::fs::read(key).map_err(|e| Error::Tls(format!("reading {}: {e}", key.display())))?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|e| Error::Tls(format!("parsing {}: {e}", key.display())))?
            .ok_or_else(|| Error::Tls(format!("{} holds no private key", key.display())))?;
        Ok(Self { chain, key, chain_pem })
    }

    /// A fresh self-signed certificate for `localhost` and `127.0.0.1`.
    pub fn self_signed() -> Result<Self, Error> {
        let certified = generate()?;
        let chain_pem = certified.cert.pem();
        let key = PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        Ok(Self { chain: vec![certified.cert.der().clone()], key, chain_pem })
    }
}

/// A new self-signed certificate and key for the loopback names.
fn generate() -> Result<rcgen::CertifiedKey<rcgen::KeyPair>, Error> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    rcgen::generate_simple_self_signed(names).map_err(|e| Error::Tls(e.to_string()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The identity a server keeps across restarts when it has no configured certificate: loaded
/// from `cert`/`key` if both exist, otherwise generated self-signed and written there (the key
/// readable by the owner only), so clients that trusted it once can reconnect after a restart.
pub fn persistent_self_signed(cert: &Path, key: &Path) -> Result<Identity, Error> {
    if cert.exists() && key.exists() {
        return Identity::from_files(cert, key);
    }
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::Tls(format!("creating {}: {e}", dir.display())))?;
    }
    // Two processes started together on one data dir (a server and a discard server, say)
    // must not each write half a pair: the first to take the lock writes both, the other then
    // finds them.
    let lock_path = cert.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::Tls(format!("opening {}: {e}", lock_path.display())))?;
    lock.lock().map_err(|e| Error::Tls(format!("locking {}: {e}", lock_path.display())))?;
    if !(cert.exists() && key.exists()) {
        let certified = generate()?;
        let tmp_key = key.with_extension("pem.tmp");
        write_private(&tmp_key, certified.signing_key.serialize_pem().as_bytes())?;
        let tmp_cert = cert.with_extension("pem.tmp");
        std::fs::write(&tmp_cert, certified.cert.pem())
            .map_err(|e| Error::Tls(format!("writing {}: {e}", tmp_cert.display())))?;
        std::fs::rename(&tmp_key, key).map_err(|e| Error::Tls(format!("writing {}: {e}", key.display())))?;
        std::fs::rename(&tmp_cert, cert).map_err(|e| Error::Tls(format!("writing {}: {e}", cert.display())))?;
    }
    drop(lock);
    Identity::from_files(cert, key)
}

/// A QUIC endpoint configuration whose connection ids and stateless-reset key are kept in the
/// file at `path` (made once, readable by the owner only), so that the server restarted on
/// it recognises the connection ids its previous run handed out and answers a client still
/// sending on one with a stateless reset the client can verify (RFC 9000, 10.3): the client
/// drops the dead connection at once and reconnects, instead of waiting for an idle timeout.
pub fn lasting_endpoint(path: &Path) -> Result<quinn::EndpointConfig, Error> {
    const RESET_KEY: usize = 64;
    const LEN: usize = RESET_KEY + 8;
    let bytes = match std::fs::read(path) {
        Ok(bytes) if bytes.len() == LEN => bytes,
        Ok(_) => return Err(Error::Tls(format!("{} is not a QUIC endpoint key ({LEN} bytes)", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::Tls(format!("creating {}: {e}", dir.display())))?;
            }
            let mut bytes = vec![0u8; LEN];
            rustls::crypto::ring::default_provider()
                .secure_random
                .fill(&mut bytes)
                .map_err(|_| Error::Tls("no randomness for the QUIC endpoint key".into()))?;
            let tmp = path.with_extension("key.tmp");
            write_private(&tmp, &bytes)?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::Tls(format!("writing {}: {e}", tmp.display())))?;
            std::fs::rename(&tmp, path).map_err(|e| Error::Tls(format!("writing {}: {e}", path.display())))?;
            bytes
        }
        Err(e) => return Err(Error::Tls(format!("reading {}: {e}", path.display()))),
    };
    let (reset, cid) = bytes.split_at(RESET_KEY);
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(cid);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset)));
    cfg.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    Ok(cfg)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| Error::Tls(format!("writing {}: {e}", path.display())))?;
    f.write_all(bytes).map_err(|e| Error::Tls(format!("writing {}: {e}", path.display())))
}

fn roots_of(pem: &str) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
        let cert = cert.map_err(|e| Error::Tls(format!("parsing trusted certificate: {e}")))?;
        roots.add(cert).map_err(|e| Error::Tls(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(Error::Tls("no certificate to trust in the given PEM".into()));
    }
    Ok(roots)
}

/// rustls server settings: TLS 1.3 only, fleetstream ALPN; with `client_ca` (PEM), clients
/// must present a certificate it signed.
pub fn server_crypto(
    identity: &Identity,
    client_ca: Option<&str>,
) -> Result<quinn::crypto::rustls::QuicServerConfig, Error> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots_of(pem)?), provider())
                    .build()
                    .map_err(|e| Error::Tls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| Error::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| Error::Tls(e.to_string()))
}

/// Whom a client trusts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Certificates in PEM (a CA, or the server's own self-signed certificate).
    Pem(String),
    /// No verification at all. Only for loopback tests and demos: anyone can impersonate the
    /// server.
    InsecureSkipVerify,
}

/// rustls client settings matching [`server_crypto`]; `identity` is the client certificate
/// to present to a server that asks for one.
pub fn client_crypto(
    trust: &Trust,
    identity: Option<&Identity>,
) -> Result<quinn::crypto::rustls::QuicClientConfig, Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?;
    let builder = match trust {
        Trust::Pem(pem) => builder.with_root_certificates(roots_of(pem)?),
        Trust::InsecureSkipVerify => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(SkipVerify(provider())))
        }
    };
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| Error::Tls(e.to_string()))?,
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| Error::Tls(e.to_string()))
}

/// Accepts any server certificate but still checks the handshake signature, so the session keys
/// belong to whoever holds the presented certificate's key.
#[derive(Debug)]
struct SkipVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_starting_together_share_one_certificate() {
        let dir = std::env::temp_dir().join(format!("fleetstream-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (cert, key) = (dir.join("ingest-cert.pem"), dir.join("ingest-key.pem"));
        let pems: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..8).map(|_| s.spawn(|| persistent_self_signed(&cert, &key).map(|id| id.chain_pem))).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread").expect("identity")) // ok: test code
                .collect()
        });
        assert!(pems.windows(2).all(|w| w[0] == w[1]), "every caller got the same certificate");
        assert_eq!(Identity::from_files(&cert, &key).expect("pair on disk").chain_pem, pems[0]); // ok: test code
        let _ = std::fs::remove_dir_all(&dir);
    }
}
