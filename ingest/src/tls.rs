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
    let certified = generate()?;
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::Tls(format!("creating {}: {e}", dir.display())))?;
    }
    write_private(key, certified.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(cert, certified.cert.pem()).map_err(|e| Error::Tls(format!("writing {}: {e}", cert.display())))?;
    Identity::from_files(cert, key)
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

/// rustls server settings: TLS 1.3 only, fleetstream ALPN.
pub fn server_crypto(identity: &Identity) -> Result<quinn::crypto::rustls::QuicServerConfig, Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
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

/// rustls client settings matching [`server_crypto`].
pub fn client_crypto(trust: &Trust) -> Result<quinn::crypto::rustls::QuicClientConfig, Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut tls = match trust {
        Trust::Pem(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
                let cert = cert.map_err(|e| Error::Tls(format!("parsing trusted certificate: {e}")))?;
                roots.add(cert).map_err(|e| Error::Tls(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(Error::Tls("no certificate to trust in the given PEM".into()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::InsecureSkipVerify => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(SkipVerify(provider()))).with_no_client_auth()
        }
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
