//! TLS for NBD_OPT_STARTTLS: building the rustls server configuration from
//! PEM files, and reading the client's certificate identity for `cert:`
//! allow rules. Certificate validation itself is rustls' job.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} contains no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA {path} rejected: {reason}")]
    ClientCa { path: PathBuf, reason: String },
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut &data[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "PEM CERTIFICATE block",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "TLS key";
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    rustls_pemfile::private_key(&mut &data[..])
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "PEM private key",
        })
}

/// Build the acceptor. With `ca`, clients may present a certificate signed
/// by it (verified by rustls); clients without one are still accepted and
/// simply match no `cert:` rule.
pub fn acceptor(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs("TLS certificate", cert)?;
    let key = read_key(key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let config = match ca {
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
        Some(ca_path) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs("TLS client CA", ca_path)? {
                roots.add(c).map_err(|e| TlsError::ClientCa {
                    path: ca_path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::ClientCa {
                path: ca_path.to_path_buf(),
                reason: e.to_string(),
            })?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Identities of the verified client certificate: subject CNs, DNS and
/// email SANs. Empty when the client sent no certificate.
pub fn peer_identities(conn: &rustls::ServerConnection) -> Vec<String> {
    let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
        return Vec::new();
    };
    identities_of(cert.as_ref())
}

fn identities_of(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) => names.push(s.to_string()),
                _ => {}
            }
        }
    }
    names
}
