//! Serving HTTPS: browsers speak HTTP/2 only over TLS, so with a certificate the service
//! offers both by ALPN.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS: reading certificates from {path}")]
    ReadCertificates {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS: no certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("TLS: reading the private key from {path}")]
    ReadKey {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS: the certificate and key do not make a server configuration")]
    Config(#[source] rustls::Error),
}

/// An acceptor for `cert` (PEM chain) and `key` (PEM), offering HTTP/2 and HTTP/1.1.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCertificates {
            path: cert.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::ReadKey {
        path: key.to_owned(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    // Browsers speak HTTP/2 only over TLS, and only if we offer it here.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
