//! `flagsmith-sse healthcheck`: asks the service that the same settings describe whether it
//! is ready (or, with `--live`, alive), so that a container image can check itself without
//! curl and without repeating the port or the scheme: LISTEN_ADDR gives the port (every
//! interface becomes loopback), TLS_CERT_FILE means HTTPS. It needs no token and never
//! touches a broker: the service it asks does that.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use thiserror::Error;

use crate::config::{Config, ConfigError};

/// Below Flagsmith's chart's probe timeout (2 s) and Docker's default (30 s) alike.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// A response head larger than this is not one of ours.
const MAX_HEAD: usize = 8 * 1024;

#[derive(Debug, Error)]
pub enum HealthError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("reading TLS_CERT_FILE {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("GET {path} on {addr}: {source}")]
    Exchange {
        path: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("GET {path} on {addr}: the answer is not an HTTP response")]
    NotHttp {
        path: &'static str,
        addr: SocketAddr,
    },
    #[error("GET {path} on {addr} answered {status}")]
    Status {
        path: &'static str,
        addr: SocketAddr,
        status: u16,
    },
}

/// What to ask and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub addr: SocketAddr,
    pub path: &'static str,
    /// The service's certificate (TLS_CERT_FILE): speak TLS and expect exactly it.
    pub certificate: Option<PathBuf>,
}

impl Probe {
    pub fn from_config(config: &Config) -> Result<Probe, HealthError> {
        Ok(Probe {
            addr: reachable(config.listen_addr()?),
            path: if config.live { "/livez" } else { "/readyz" },
            certificate: config.tls_cert_file.clone(),
        })
    }

    /// The status line's code when it is 200, else why not.
    pub fn run(&self, timeout: Duration) -> Result<u16, HealthError> {
        let deadline = Instant::now() + timeout;
        let exchange = |source| HealthError::Exchange {
            path: self.path,
            addr: self.addr,
            source,
        };
        let tls = match &self.certificate {
            Some(path) => Some(client_config(path)?),
            None => None,
        };
        let tcp = TcpStream::connect_timeout(&self.addr, timeout).map_err(|source| {
            HealthError::Connect {
                addr: self.addr,
                source,
            }
        })?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        tcp.set_read_timeout(Some(left)).map_err(exchange)?;
        tcp.set_write_timeout(Some(left)).map_err(exchange)?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: flagsmith-sse-healthcheck\r\n\
             Connection: close\r\n\r\n",
            self.path, self.addr
        );
        let head = match tls {
            None => exchange_on(tcp, request.as_bytes()),
            Some(config) => {
                let connection =
                    rustls::ClientConnection::new(config, ServerName::from(self.addr.ip()))
                        .map_err(|e| exchange(std::io::Error::other(e)))?;
                exchange_on(
                    rustls::StreamOwned::new(connection, tcp),
                    request.as_bytes(),
                )
            }
        }
        .map_err(exchange)?;
        let status = status_of(&head).ok_or(HealthError::NotHttp {
            path: self.path,
            addr: self.addr,
        })?;
        if status == 200 {
            Ok(status)
        } else {
            Err(HealthError::Status {
                path: self.path,
                addr: self.addr,
                status,
            })
        }
    }
}

/// Where a client on this host reaches a listener bound to `listen`: the unspecified
/// address (`:8000`, `0.0.0.0`, `[::]`) is reachable on loopback of the same family.
pub fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Writes the request and reads until the response head is complete (or the peer closes).
fn exchange_on(mut stream: impl Read + Write, request: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(request)?;
    stream.flush()?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while head.len() < MAX_HEAD && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            // A TLS peer that closes without close_notify after a whole head is still an
            // answer; without a head, the error stands.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !head.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    Ok(head)
}

fn status_of(head: &[u8]) -> Option<u16> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => response.code,
        Ok(httparse::Status::Partial) | Err(_) => None,
    }
}

fn client_config(path: &Path) -> Result<Arc<rustls::ClientConfig>, HealthError> {
    let bad = |reason: String| HealthError::Certificate {
        path: path.to_owned(),
        reason,
    };
    let certificate = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("no certificate in it".into()))?
        .map_err(|e| bad(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = ThisCertificate {
        certificate,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts the service's own certificate and nothing else. Verifying its chain and name
/// would not work here: the certificate names the public host (not 127.0.0.1), and its CA
/// may be unknown inside the container. Pinning it proves more: the listener holds the key
/// of TLS_CERT_FILE. The handshake signature is still checked.
#[derive(Debug)]
struct ThisCertificate {
    certificate: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ThisCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.certificate.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the service presents another certificate than TLS_CERT_FILE's".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn every_interface_is_reached_on_loopback() {
        let probe = |args: &[&str]| {
            let mut argv = vec!["flagsmith-sse", "healthcheck"];
            argv.extend_from_slice(args);
            Probe::from_config(&Config::try_parse_from(argv).expect("parses")).expect("probe")
        };
        let p = probe(&["--listen-addr", ":8000"]);
        assert_eq!(p.addr, "127.0.0.1:8000".parse().expect("addr"));
        assert_eq!(p.path, "/readyz");
        assert_eq!(p.certificate, None);
        let p = probe(&["--listen-addr", "[::]:9000", "--live"]);
        assert_eq!(p.addr, "[::1]:9000".parse().expect("addr"));
        assert_eq!(p.path, "/livez");
        let p = probe(&["--listen-addr", "10.1.2.3:80"]);
        assert_eq!(p.addr, "10.1.2.3:80".parse().expect("addr"));
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n\r\n"), Some(200));
        assert_eq!(
            status_of(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\n"),
            Some(503)
        );
        assert_eq!(status_of(b"HTTP/1.1 200"), None);
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b""), None);
    }
}
