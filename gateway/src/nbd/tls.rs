//! TLS for NBD_OPT_STARTTLS and the control API's TCP listener: building
//! the rustls server configuration from PEM files, and reading the client's
//! certificate identity for `cert:` allow rules. Certificate validation
//! itself is rustls' job.

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

/// How the server treats client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAuth<'a> {
    /// CA bundle that signs client certificates; `None`: certificates are
    /// not requested.
    pub ca: Option<&'a Path>,
    /// A client must present a certificate that verifies against `ca`
    /// (qemu-nbd's `verify-peer=on`). Without it a client may present none,
    /// but one it presents must still verify.
    pub verify_peer: bool,
}

/// The crypto provider every TLS listener of the gateway uses. aws-lc-rs
/// rather than ring: ring refuses RSA private keys whose primes are not a
/// multiple of 512 bits (so every size but 2048, 3072 and 4096), while
/// GnuTLS, and with it qemu-nbd, nbdkit and nbd-server, load any size; the
/// nbd test suite's keys are 2432 bits.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The rustls server configuration: certificate chain, key, client
/// certificate policy, and the ALPN protocols offered (none for NBD).
pub fn server_config(
    cert: &Path,
    key: &Path,
    auth: ClientAuth<'_>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let chain = read_certs("TLS certificate", cert)?;
    let key = read_key(key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let mut config = match auth.ca {
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
        Some(ca_path) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs("TLS client CA", ca_path)? {
                roots.add(c).map_err(|e| TlsError::ClientCa {
                    path: ca_path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            }
            // No CA names in the CertificateRequest: a GnuTLS client whose
            // certificate another CA signed would otherwise quietly send
            // none and be let in as anonymous; this way it sends it, and the
            // verifier refuses it, which ends the handshake.
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .clear_root_hint_subjects();
            if !auth.verify_peer {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().map_err(|e| TlsError::ClientCa {
                path: ca_path.to_path_buf(),
                reason: e.to_string(),
            })?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The rustls client configuration of a gateway talking to another
/// gateway (migration, forwarding): `ca` verifies the server, and the
/// optional certificate and key are presented to it.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs("TLS CA", ca)? {
        roots.add(c).map_err(|e| TlsError::ClientCa {
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs("TLS client certificate", cert)?, read_key(key)?)?,
    };
    Ok(Arc::new(config))
}

/// The acceptor for NBD_OPT_STARTTLS.
pub fn acceptor(cert: &Path, key: &Path, auth: ClientAuth<'_>) -> Result<TlsAcceptor, TlsError> {
    Ok(TlsAcceptor::from(server_config(cert, key, auth, &[])?))
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
