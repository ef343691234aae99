//! Connections between gateways: the target's listener (`--migration-listen`,
//! TLS from the first byte with `[migration] tls`) and the source's
//! connect, plus the checks a target makes before it reads a `Prepare`:
//! the bearer token (compared in constant time) and the allow rules
//! (address, CIDR, `cert:NAME` of a client certificate verified against
//! `tls.ca`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lungate_config::Peer;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::protocol::Link;
use super::{MigrateError, Settings};
use crate::registry::Registry;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accept incoming migrations on `l` until `stop`; each runs
/// [`super::target::serve`]. Running migrations are left to finish or
/// time out on their own (their staging is undone at the next start if
/// the gateway exits first).
pub async fn run(l: TcpListener, reg: Arc<Registry>, stop: CancellationToken) {
    let Some(settings) = reg.migrate.settings().cloned() else {
        return;
    };
    let tracker = TaskTracker::new();
    let acceptor = settings
        .tls_server
        .clone()
        .map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (sock, addr) = tokio::select! {
            _ = stop.cancelled() => break,
            a = l.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "migration listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let (reg, acceptor, stop) = (reg.clone(), acceptor.clone(), stop.clone());
        tracker.spawn(async move {
            let (link, peer) = match acceptor {
                None => (
                    Link::new(sock, addr.to_string()),
                    Peer {
                        ip: Some(addr.ip()),
                        cert_names: vec![],
                    },
                ),
                Some(a) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, a.accept(sock)).await {
                    Ok(Ok(tls)) => {
                        let names = crate::nbd::tls::peer_identities(tls.get_ref().1);
                        (
                            Link::new(tls, addr.to_string()),
                            Peer {
                                ip: Some(addr.ip()),
                                cert_names: names,
                            },
                        )
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(source = %addr, error = %e, "migration TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(source = %addr, "migration TLS handshake timed out");
                        return;
                    }
                },
            };
            super::target::serve(link, peer, reg, super::target::Mode::Remote, stop).await;
        });
    }
    tracker.close();
}

/// Equal-length comparison whose time does not depend on where the bytes
/// differ.
pub fn same_token(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// Split `HOST:PORT`.
pub fn host_port(to: &str) -> Result<(String, u16), MigrateError> {
    let (h, p) = to
        .rsplit_once(':')
        .ok_or_else(|| MigrateError::Invalid(format!("--to {to:?} is not HOST:PORT")))?;
    let port = p
        .parse()
        .map_err(|_| MigrateError::Invalid(format!("--to {to:?}: {p:?} is not a port")))?;
    let host = h.trim_start_matches('[').trim_end_matches(']').to_string();
    if host.is_empty() {
        return Err(MigrateError::Invalid(format!("--to {to:?} has no host")));
    }
    Ok((host, port))
}

/// The addresses `HOST:PORT` resolves to (the first is used).
pub async fn resolve(to: &str) -> Result<SocketAddr, MigrateError> {
    let (host, port) = host_port(to)?;
    let mut addrs = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| MigrateError::Failed(format!("cannot resolve {to}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| MigrateError::Failed(format!("{to} resolves to no address")))
}

/// The name a TLS server at `host` must prove.
pub fn server_name(host: &str) -> Result<ServerName<'static>, MigrateError> {
    ServerName::try_from(host.to_string())
        .map_err(|e| MigrateError::Invalid(format!("{host:?} is not a TLS server name: {e}")))
}

/// Connect to the target's migration listener at `to`.
pub async fn connect(settings: &Settings, to: &str) -> Result<Link, MigrateError> {
    let addr = resolve(to).await?;
    let sock = tokio::time::timeout(settings.timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| MigrateError::Failed(format!("connect to {to}: no answer")))?
        .map_err(|e| MigrateError::Failed(format!("connect to {to}: {e}")))?;
    let _ = sock.set_nodelay(true);
    match &settings.tls_client {
        None => Ok(Link::new(sock, to.to_string())),
        Some(cfg) => {
            let (host, _) = host_port(to)?;
            let tls = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsConnector::from(cfg.clone()).connect(server_name(&host)?, sock),
            )
            .await
            .map_err(|_| MigrateError::Failed(format!("TLS to {to}: no answer")))?
            .map_err(|e| MigrateError::Failed(format!("TLS to {to}: {e}")))?;
            Ok(Link::new(tls, to.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"abcd"));
        assert!(!same_token(b"", b"a"));
    }

    #[test]
    fn destinations_parse_as_host_and_port() {
        assert_eq!(
            host_port("127.0.0.1:7000").unwrap(),
            ("127.0.0.1".into(), 7000)
        );
        assert_eq!(host_port("[::1]:7").unwrap(), ("::1".into(), 7));
        assert!(host_port("nohost").is_err());
        assert!(host_port(":7").is_err());
        assert!(host_port("h:x").is_err());
    }
}
