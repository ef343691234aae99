//! Glue between `lungate_config` and the running gateway: command-line
//! overrides, and turning a validated [`GatewayConfig`] into the parts the
//! server needs (exports, engine, TLS acceptor, listeners).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lungate_block::engine::{EngineKind, IoEngine};
use lungate_config::{ConfigError, GatewayConfig, TlsMode};

use crate::export::{block_sizes, ExportError, ExportSet, Exports};
use crate::memory::MemoryBudget;
use crate::nbd::tls::{self, TlsError};
use crate::registry::Registry;
use crate::server::{Server, ServerError, ServerSettings};
use crate::switch::SwitchStats;

/// Command-line values that override the config file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub pools: Vec<PathBuf>,
    pub listen: Vec<String>,
    pub unix: Option<PathBuf>,
    pub read_only: bool,
    pub tls: Option<TlsMode>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_verify_peer: bool,
    pub engine: Option<EngineKind>,
    pub control: Option<PathBuf>,
    pub coordinator: Option<String>,
    /// `--migration-listen`: replaces `[migration] listen`.
    pub migration_listen: Option<String>,
    /// `--migration-allow`: replace `[migration] allow` when given.
    pub migration_allow: Vec<String>,
}

impl Overrides {
    /// Apply to `cfg` and re-validate. `--listen`/`--unix` replace both
    /// listener settings, so `--unix PATH` alone listens only there.
    pub fn apply(&self, cfg: &mut GatewayConfig) -> Result<(), ConfigError> {
        if !self.pools.is_empty() {
            cfg.pools = self.pools.clone();
        }
        if !self.listen.is_empty() || self.unix.is_some() {
            cfg.listen = self.listen.clone();
            cfg.unix = self.unix.clone();
        }
        if self.read_only {
            cfg.read_only = true;
        }
        if let Some(m) = self.tls {
            cfg.tls.mode = m;
        }
        if self.tls_cert.is_some() {
            cfg.tls.cert = self.tls_cert.clone();
        }
        if self.tls_key.is_some() {
            cfg.tls.key = self.tls_key.clone();
        }
        if self.tls_ca.is_some() {
            cfg.tls.ca = self.tls_ca.clone();
        }
        if self.tls_verify_peer {
            cfg.tls.verify_peer = true;
        }
        if let Some(e) = self.engine {
            cfg.io.engine = e;
        }
        if self.control.is_some() {
            cfg.control.unix = self.control.clone();
        }
        if self.coordinator.is_some() {
            cfg.coordinator.url = self.coordinator.clone();
        }
        if self.migration_listen.is_some() {
            cfg.migration.listen = self.migration_listen.clone();
        }
        if !self.migration_allow.is_empty() {
            cfg.migration.allow = self.migration_allow.clone();
        }
        cfg.validate()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot start the I/O engine: {0}")]
    Engine(std::io::Error),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Coordinator(#[from] crate::coordinator::EtcdError),
    #[error("cannot read migration token file {path}: {source}")]
    MigrationToken {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The migration settings of `cfg` (`[migration]`, TLS from `[tls]`).
pub fn migration_settings(
    cfg: &GatewayConfig,
    engine: &IoEngine,
) -> Result<crate::migrate::Settings, StartError> {
    let m = &cfg.migration;
    let mut s = crate::migrate::Settings::local(cfg.pools.clone(), engine.clone());
    if let Some(n) = &m.name {
        s.name = n.clone();
    }
    s.listen = m.listen.as_deref().and_then(|l| l.parse().ok());
    s.allow = m.allow_rules()?;
    if let Some(path) = &m.token_file {
        let t = std::fs::read_to_string(path).map_err(|source| StartError::MigrationToken {
            path: path.clone(),
            source,
        })?;
        let t = t.lines().next().unwrap_or("").trim().to_string();
        if t.is_empty() {
            return Err(StartError::MigrationToken {
                path: path.clone(),
                source: std::io::Error::other("the file is empty"),
            });
        }
        s.token = Some(t);
    }
    if m.tls {
        let auth = tls::ClientAuth {
            ca: cfg.tls.ca.as_deref(),
            verify_peer: false,
        };
        if let (Some(cert), Some(key)) = (&cfg.tls.cert, &cfg.tls.key) {
            s.tls_server = Some(tls::server_config(cert, key, auth, &[])?);
        }
        if let Some(ca) = &cfg.tls.ca {
            let id = match (&m.client_cert, &m.client_key) {
                (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                _ => None,
            };
            s.tls_client = Some(tls::client_config(ca, id)?);
        }
    }
    s.reserve = m.reserve.map_or(0, |r| r.0);
    s.downtime_ms = m.downtime_ms.unwrap_or(crate::migrate::DEFAULT_DOWNTIME_MS);
    s.max_rounds = m.max_rounds.unwrap_or(crate::migrate::DEFAULT_MAX_ROUNDS);
    s.timeout = m
        .timeout
        .map_or(crate::migrate::DEFAULT_TIMEOUT, Duration::from_secs);
    Ok(s)
}

/// Open (and lock) every LUN and build its exports.
pub fn build_registry(cfg: &GatewayConfig, engine: &IoEngine) -> Result<Arc<Registry>, StartError> {
    let stats = Arc::new(SwitchStats::default());
    let (exports, luns) = ExportSet::from_config(cfg, stats.clone(), engine)?;
    if exports.is_empty() {
        tracing::warn!("no exports: check `pools` and [[export]] in the configuration");
    }
    for e in exports.iter() {
        tracing::info!(export = %e.name, size = e.size(), read_only = e.read_only, lun = %e.lun_path.display(),
            layers = e.lun.as_ref().map_or(0, |l| l.volume().chain().len()), "export");
    }
    let registry = Arc::new(Registry::new(
        Arc::new(Exports::new(exports)),
        luns,
        stats,
        cfg.read_only,
        block_sizes(cfg),
        cfg.allow_rules()?,
        cfg.control.unix_path(&cfg.pools),
    ));
    crate::control::ops::recover(&registry);
    Ok(registry)
}

/// Open the exports, start the engine, load TLS and bind the listeners
/// (or take `activated`, the sockets socket activation passed in).
pub async fn build_server(
    cfg: &GatewayConfig,
    activated: Vec<std::os::fd::OwnedFd>,
    stall: crate::migrate::Stall,
) -> Result<Server, StartError> {
    let listen = cfg.listen_addrs()?;
    let engine = IoEngine::new(cfg.io.engine, cfg.io.workers).map_err(StartError::Engine)?;
    tracing::info!(
        engine = engine.name(),
        workers = engine.workers(),
        "I/O engine"
    );
    // Migrations a crash interrupted are finished or undone before any
    // LUN of the pools is opened, so exactly one gateway serves each.
    let mut msettings = migration_settings(cfg, &engine)?;
    msettings.stall = stall;
    let held = crate::migrate::recover::at_start(&msettings).await;
    let registry = build_registry(cfg, &engine)?;
    let msettings = registry.migrate.configure(msettings);
    if !held.is_empty() {
        tokio::spawn(crate::migrate::recover::resolve_held(
            registry.clone(),
            held,
        ));
    }
    let auth = tls::ClientAuth {
        ca: cfg.tls.ca.as_deref(),
        verify_peer: cfg.tls.verify_peer,
    };
    let tls = match (cfg.tls.mode, &cfg.tls.cert, &cfg.tls.key) {
        (TlsMode::Off, _, _) => None,
        (_, Some(cert), Some(key)) => Some(tls::acceptor(cert, key, auth)?),
        // validate() rejects TLS without cert and key
        _ => None,
    };
    let control_tls = match (cfg.control.tls, &cfg.tls.cert, &cfg.tls.key) {
        (true, Some(cert), Some(key)) => Some(tls::server_config(cert, key, auth, &[b"http/1.1"])?),
        // validate() rejects control.tls without cert and key
        _ => None,
    };
    let memory = MemoryBudget::new(match cfg.max_memory {
        Some(m) => m.0,
        None => crate::memory::default_limit(),
    });
    tracing::info!(
        max_memory = memory.limit(),
        max_in_flight = cfg.max_in_flight.0,
        max_connections_per_client = cfg.max_connections_per_client,
        max_connections = memory.max_connections(),
        "memory bounds"
    );
    let settings = ServerSettings {
        listen,
        unix: cfg.unix.clone(),
        tls_mode: cfg.tls.mode,
        tls,
        max_in_flight: cfg.max_in_flight.0,
        memory,
        max_connections_per_client: cfg.max_connections_per_client,
        handshake_timeout: Duration::from_secs(cfg.handshake_timeout),
        control_unix: cfg.control.unix_path(&cfg.pools),
        control_tcp: match (&cfg.control.tcp, &cfg.control.token_file) {
            (Some(a), Some(t)) => Some((
                a.parse().map_err(|e| ConfigError::Invalid {
                    field: "control.tcp".into(),
                    value: a.clone(),
                    reason: format!("{e}"),
                })?,
                t.clone(),
            )),
            _ => None,
        },
        control_tls,
        activated,
        migration_listen: msettings.listen,
    };
    let server = Server::bind(settings, registry.clone()).await?;
    if let Some(port) = server.listening().iter().find_map(|l| match l {
        crate::server::Listening::Tcp(a) => Some(a.port()),
        _ => None,
    }) {
        let _ = msettings.nbd.set((port, cfg.tls.mode != TlsMode::Off));
    }
    if let Some(endpoint) = cfg.coordinator.endpoint()? {
        let mut addrs: Vec<String> = server.listening().iter().map(|l| l.to_string()).collect();
        addrs.extend(server.control_listening());
        let c = crate::coordinator::Coordinator::start(
            &endpoint,
            cfg.coordinator.name.as_deref(),
            cfg.coordinator.ttl(),
            &cfg.pools,
            addrs,
            engine.clone(),
        )
        .await?;
        // The LUNs nobody owns are served before `ready`.
        c.claim_pass(&registry).await;
        c.spawn(registry);
    }
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_flag_alone_drops_the_default_tcp_listener() {
        let mut cfg = GatewayConfig::default();
        Overrides {
            unix: Some("/tmp/x.sock".into()),
            ..Default::default()
        }
        .apply(&mut cfg)
        .unwrap();
        assert!(cfg.listen.is_empty());
        assert_eq!(cfg.unix, Some(PathBuf::from("/tmp/x.sock")));
    }

    #[test]
    fn flags_override_file_values() {
        let mut cfg = GatewayConfig::from_toml(
            "pools = [\"a\"]\nlisten = [\"127.0.0.1:1\"]\n[tls]\nmode = \"off\"",
            "t",
        )
        .unwrap();
        Overrides {
            pools: vec!["b".into()],
            listen: vec!["127.0.0.1:0".into()],
            read_only: true,
            ..Default::default()
        }
        .apply(&mut cfg)
        .unwrap();
        assert_eq!(cfg.pools, vec![PathBuf::from("b")]);
        assert_eq!(cfg.listen, vec!["127.0.0.1:0".to_string()]);
        assert!(cfg.read_only);
    }

    #[test]
    fn tls_flag_without_cert_fails_validation() {
        let mut cfg = GatewayConfig::default();
        let err = Overrides {
            tls: Some(TlsMode::Require),
            ..Default::default()
        }
        .apply(&mut cfg)
        .unwrap_err();
        assert!(err.to_string().contains("tls.cert"), "{err}");
    }
}
