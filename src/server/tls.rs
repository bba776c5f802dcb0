//! TLS for the HTTP server (rustls with the ring provider: no system OpenSSL): a certificate
//! chain and a private key read from PEM files (`--tls-cert`, `--tls-key`).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A server certificate and key, ready to accept TLS connections.
#[derive(Clone)]
pub struct Tls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the certificate chain (`cert`, PEM, the server's certificate first) and its
    /// private key (`key`, PEM: PKCS#8, PKCS#1 or SEC1). Errors name the file and what is
    /// wrong with it.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Tls, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| format!("TLS certificate {}: {e}", cert.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("TLS certificate {}: {e}", cert.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "TLS certificate {}: no PEM \"CERTIFICATE\" block in it",
                cert.display()
            ));
        }
        let key_path = key;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
            format!(
                "TLS key {}: {e} (expected a PEM private key: PKCS#8, PKCS#1 or SEC1)",
                key_path.display()
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                format!(
                    "TLS: the key {} does not go with the certificate {}: {e}",
                    key_path.display(),
                    cert.display()
                )
            })?;
        let mut http = config.clone();
        // h2 for gRPC (Arrow Flight); browsers and HTTP/1 clients pick http/1.1.
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(http)),
            config: Arc::new(config),
        })
    }

    /// The same certificate for the Postgres port (libpq 17 asks for ALPN `postgresql`).
    pub(crate) fn postgres_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let mut config = self.config.as_ref().clone();
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}
