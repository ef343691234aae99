//! lungate configuration: the serde types behind `gateway.toml` and
//! `demo.toml`, their defaults, and their validation.
//!
//! This crate owns parsing and checking values only; it never opens LUNs,
//! binds sockets or reads certificates. Every validation error names the
//! field it is about, so an operator can fix the file without reading code.

mod allow;
pub mod size;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use allow::{AllowRule, Peer};
pub use size::ByteSize;

/// The fully commented example configuration shipped as `config/gateway.toml`.
pub const GATEWAY_EXAMPLE_TOML: &str = include_str!("../gateway.toml");

/// The embedded configuration of `lungate demo` (`config/demo.toml`).
pub const DEMO_TOML: &str = include_str!("../demo.toml");

/// Largest `block_size.maximum` lungate accepts. Requests are streamed
/// through a bounded window (a READ reply is produced in pieces, a WRITE
/// payload is written as it arrives), so the maximum does not set how much
/// memory a request takes; it only bounds how long one request may run.
pub const MAX_BLOCK_SIZE_LIMIT: u64 = 256 * 1024 * 1024;

/// Default `block_size.maximum`: 64 MiB, like nbdkit. The nbd project's
/// conformance client sends requests of up to 49,865,728 bytes.
pub const DEFAULT_MAX_BLOCK_SIZE: u64 = 64 * 1024 * 1024;

/// Smallest `max_in_flight`: room for a request's 1 MiB streaming window
/// and its bookkeeping, with some to spare.
pub const MIN_IN_FLIGHT: u64 = 4 * 1024 * 1024;

/// Smallest `max_memory`.
pub const MIN_MEMORY: u64 = 32 * 1024 * 1024;

/// One error enum for the whole crate; each variant says what and where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse config {origin}: {source}")]
    Parse {
        origin: String,
        source: toml::de::Error,
    },
    #[error("invalid `{field}` = {value:?}: {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, value: impl ToString, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// How the gateway uses TLS (the NBD spec's NOTLS, SELECTIVETLS and
/// FORCEDTLS modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// NOTLS: STARTTLS is refused with NBD_REP_ERR_POLICY.
    #[default]
    Off,
    /// SELECTIVETLS: clients may upgrade; exports whose allow-list names a
    /// certificate identity are reachable only after the upgrade.
    On,
    /// FORCEDTLS: every option except STARTTLS and ABORT gets
    /// NBD_REP_ERR_TLS_REQD until the client upgrades.
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            other => Err(format!(
                "unknown TLS mode {other:?}, expected off, on or require"
            )),
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub mode: TlsMode,
    /// Server certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Server private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// CA bundle (PEM) that signs client certificates. When set, a client
    /// certificate that does not verify against it ends the TLS handshake,
    /// and `cert:` allow rules can match a verified one.
    pub ca: Option<PathBuf>,
    /// Require every TLS client to present a certificate that verifies
    /// against `ca` (qemu-nbd's `verify-peer=on`).
    #[serde(default)]
    pub verify_peer: bool,
}

/// Block size constraints advertised with NBD_INFO_BLOCK_SIZE and enforced
/// on every request.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockSizes {
    #[serde(default = "default_min_block")]
    pub minimum: ByteSize,
    #[serde(default = "default_pref_block")]
    pub preferred: ByteSize,
    #[serde(default = "default_max_block")]
    pub maximum: ByteSize,
}

fn default_min_block() -> ByteSize {
    ByteSize(1)
}
fn default_pref_block() -> ByteSize {
    ByteSize(4096)
}
fn default_max_block() -> ByteSize {
    ByteSize(DEFAULT_MAX_BLOCK_SIZE)
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            minimum: default_min_block(),
            preferred: default_pref_block(),
            maximum: default_max_block(),
        }
    }
}

/// Which I/O engine serves the exports: the engine's own enum.
pub use lungate_block::engine::EngineKind;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IoConfig {
    #[serde(default)]
    pub engine: EngineKind,
    /// Worker threads of the engine (io_uring rings or sync threads);
    /// 0 lets the engine pick from the CPU count.
    #[serde(default = "default_workers")]
    pub workers: usize,
}

fn default_workers() -> usize {
    0
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig {
            engine: EngineKind::Auto,
            workers: default_workers(),
        }
    }
}

/// One explicitly configured export (`[[export]]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Name clients ask for; replaces a pool export of the same name.
    pub name: String,
    /// Path of the LUN file (or block device) holding the disk.
    pub lun: PathBuf,
    /// Disk index inside the LUN (0 = first disk region).
    #[serde(default)]
    pub disk: u32,
    #[serde(default)]
    pub read_only: bool,
    pub description: Option<String>,
    /// Who may see and use this export; empty = everyone.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// The whole `gateway.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// TCP listen addresses.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Optional unix socket path.
    pub unix: Option<PathBuf>,
    /// Pool directories: every disk of every LUN becomes `NAME/diskN`.
    #[serde(default)]
    pub pools: Vec<PathBuf>,
    /// Serve every export read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Allow rules for pool exports; empty = everyone.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Per-connection bound on bytes of requests being served.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: ByteSize,
    /// Gateway-wide bound on the memory all connections may hold for
    /// requests and replies; unset: an eighth of the machine's memory (or
    /// of the cgroup's limit, if lower).
    pub max_memory: Option<ByteSize>,
    /// Connections one client (one IP address; one user on the unix
    /// socket) may have open at once.
    #[serde(default = "default_connections_per_client")]
    pub max_connections_per_client: u32,
    /// Seconds a client has to finish option haggling.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: u64,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub block_size: BlockSizes,
    #[serde(default)]
    pub io: IoConfig,
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportConfig>,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub migration: MigrationConfig,
    #[serde(default)]
    pub coordinator: CoordinatorConfig,
}

/// Live migration between gateways (docs/migration.md): where this gateway
/// takes incoming migrations, who may send them, and the defaults of the
/// ones it sends.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// `IP:PORT` of the listener incoming migrations connect to; none: this
    /// gateway admits no migration from another gateway.
    pub listen: Option<String>,
    /// Who may migrate LUNs here (rules as for exports: address, CIDR,
    /// `cert:NAME`); empty = every source that passes the token check.
    #[serde(default)]
    pub allow: Vec<String>,
    /// First line: the bearer token a source must send (incoming), and the
    /// one this gateway sends (outgoing) unless a request names another.
    pub token_file: Option<PathBuf>,
    /// Speak TLS on the listener (and to targets) with `tls.cert`, `tls.key`
    /// and `tls.ca`.
    #[serde(default)]
    pub tls: bool,
    /// Client certificate and key this gateway presents to targets over TLS
    /// (for their `cert:NAME` rules).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// This gateway's name in migrations and policies (default: the host
    /// name).
    pub name: Option<String>,
    /// Space a target pool must keep free after admitting a migration.
    pub reserve: Option<ByteSize>,
    /// Default guest-visible pause budget of outgoing migrations, ms.
    pub downtime_ms: Option<u64>,
    /// Copy rounds after the first before a migration that does not fit
    /// its budget gives up.
    pub max_rounds: Option<u32>,
    /// Seconds a step may wait for the other side before the migration is
    /// aborted.
    pub timeout: Option<u64>,
}

impl MigrationConfig {
    pub fn allow_rules(&self) -> Result<Vec<AllowRule>, ConfigError> {
        parse_rules("migration.allow", &self.allow)
    }

    fn validate(&self, tls: &TlsConfig) -> Result<(), ConfigError> {
        if let Some(l) = &self.listen {
            l.parse::<SocketAddr>().map_err(|e| {
                ConfigError::invalid("migration.listen", l, format!("expected IP:PORT: {e}"))
            })?;
        }
        self.allow_rules()?;
        if self.tls && self.listen.is_some() && (tls.cert.is_none() || tls.key.is_none()) {
            return Err(ConfigError::invalid(
                "migration.tls",
                true,
                "needs `tls.cert` and `tls.key` (the migration listener uses the gateway's certificate)",
            ));
        }
        if self.tls && tls.ca.is_none() {
            // Without it an outgoing migration could not verify its target
            // (and would have to go in clear text).
            return Err(ConfigError::invalid(
                "migration.tls",
                true,
                "needs `tls.ca`, the CA that signs the targets' certificates (and the sources' client certificates for `cert:` rules)",
            ));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(ConfigError::invalid(
                "migration.client_cert",
                self.client_cert
                    .as_deref()
                    .map_or("(unset)".into(), |p| p.display().to_string()),
                "`client_cert` and `client_key` go together",
            ));
        }
        if let Some(n) = &self.name {
            if n.is_empty() || n.len() > 255 || n.chars().any(|c| c.is_control() || c == ' ') {
                return Err(ConfigError::invalid(
                    "migration.name",
                    n,
                    "1 to 255 characters without spaces or control characters",
                ));
            }
        }
        if self.timeout == Some(0) {
            return Err(ConfigError::invalid(
                "migration.timeout",
                0,
                "must be at least 1 second",
            ));
        }
        if self.downtime_ms == Some(0) {
            return Err(ConfigError::invalid(
                "migration.downtime_ms",
                0,
                "must be at least 1 ms",
            ));
        }
        Ok(())
    }
}

/// Several gateways sharing RBD pools, coordinated through etcd
/// (docs/scale-out.md). Off (`url` unset): the single-host lock rules.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// `etcd://HOST:PORT` of an etcd (v3) client endpoint.
    pub url: Option<String>,
    /// This gateway's name in etcd; default `HOSTNAME-PID`.
    pub name: Option<String>,
    /// Seconds the gateway's lease outlives its last keepalive: how long
    /// its LUNs stay unserved after it dies, before another gateway takes
    /// them (default 10).
    pub lease_ttl: Option<u64>,
}

impl CoordinatorConfig {
    /// `HOST:PORT` of the etcd endpoint, if coordination is on.
    pub fn endpoint(&self) -> Result<Option<String>, ConfigError> {
        let Some(u) = &self.url else { return Ok(None) };
        match u.strip_prefix("etcd://") {
            Some(hp) if hp.contains(':') && !hp.contains('/') => Ok(Some(hp.to_string())),
            _ => Err(ConfigError::invalid(
                "coordinator.url",
                u,
                "expected etcd://HOST:PORT",
            )),
        }
    }

    pub fn ttl(&self) -> u64 {
        self.lease_ttl.unwrap_or(10)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.endpoint()?;
        if self.lease_ttl.is_some_and(|t| !(2..=3600).contains(&t)) {
            return Err(ConfigError::invalid(
                "coordinator.lease_ttl",
                self.ttl(),
                "must be 2 to 3600 seconds",
            ));
        }
        Ok(())
    }
}

/// The control API (HTTP/1.1 + JSON): always on a unix socket (mode 0600),
/// optionally also on TCP with a bearer token.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Unix socket path; default `<first pool>/.lungate.sock` (none when
    /// there is no pool and no path).
    pub unix: Option<PathBuf>,
    /// `IP:PORT` for the TCP listener; requires `token_file`.
    pub tcp: Option<String>,
    /// File whose first line is the bearer token TCP clients must send.
    pub token_file: Option<PathBuf>,
    /// Serve the TCP listener over TLS (HTTPS) with `tls.cert` and
    /// `tls.key`; `tls.ca` and `tls.verify_peer` apply to its clients too.
    #[serde(default)]
    pub tls: bool,
}

impl ControlConfig {
    /// The unix socket path in force for `pools`.
    pub fn unix_path(&self, pools: &[PathBuf]) -> Option<PathBuf> {
        // An RBD pool (`rbd:…`) has no directory to hold a socket.
        self.unix.clone().or_else(|| {
            pools
                .iter()
                .find(|p| !p.to_string_lossy().starts_with("rbd:"))
                .map(|p| p.join(".lungate.sock"))
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(u) = &self.unix {
            if u.as_os_str().is_empty() {
                return Err(ConfigError::invalid(
                    "control.unix",
                    "",
                    "empty socket path",
                ));
            }
        }
        if let Some(t) = &self.tcp {
            t.parse::<SocketAddr>().map_err(|e| {
                ConfigError::invalid("control.tcp", t, format!("expected IP:PORT: {e}"))
            })?;
            if self.token_file.is_none() {
                return Err(ConfigError::invalid(
                    "control.tcp",
                    t,
                    "the TCP control listener requires `control.token_file` (bearer token)",
                ));
            }
        } else if self.tls {
            return Err(ConfigError::invalid(
                "control.tls",
                true,
                "there is no TCP control listener (`control.tcp`) to secure",
            ));
        }
        Ok(())
    }
}

fn default_listen() -> Vec<String> {
    vec!["127.0.0.1:10809".to_string()]
}
fn default_in_flight() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}
fn default_handshake_timeout() -> u64 {
    30
}
fn default_connections_per_client() -> u32 {
    256
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: default_listen(),
            unix: None,
            pools: Vec::new(),
            read_only: false,
            allow: Vec::new(),
            max_in_flight: default_in_flight(),
            max_memory: None,
            max_connections_per_client: default_connections_per_client(),
            handshake_timeout: default_handshake_timeout(),
            tls: TlsConfig::default(),
            block_size: BlockSizes::default(),
            io: IoConfig::default(),
            exports: Vec::new(),
            control: ControlConfig::default(),
            migration: MigrationConfig::default(),
            coordinator: CoordinatorConfig::default(),
        }
    }
}

impl GatewayConfig {
    /// Parse and validate TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: GatewayConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_string(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The TCP listen addresses, parsed.
    pub fn listen_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        self.listen
            .iter()
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|e| {
                    ConfigError::invalid("listen", a, format!("not an IP:port address: {e}"))
                })
            })
            .collect()
    }

    /// Global allow rules (for pool exports), parsed.
    pub fn allow_rules(&self) -> Result<Vec<AllowRule>, ConfigError> {
        parse_rules("allow", &self.allow)
    }

    /// Check every value; called by `from_toml` and again by the gateway
    /// after command-line overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let addrs = self.listen_addrs()?;
        if addrs.is_empty() && self.unix.is_none() {
            return Err(ConfigError::invalid(
                "listen",
                "[]",
                "no TCP address and no `unix` socket: nothing to listen on",
            ));
        }
        if let Some(u) = &self.unix {
            if u.as_os_str().is_empty() {
                return Err(ConfigError::invalid("unix", "", "empty socket path"));
            }
        }
        self.allow_rules()?;
        self.control.validate()?;
        self.migration.validate(&self.tls)?;
        self.coordinator.validate()?;
        self.validate_block_sizes()?;
        if self.max_in_flight.0 < MIN_IN_FLIGHT {
            return Err(ConfigError::invalid(
                "max_in_flight",
                self.max_in_flight.0,
                format!("must be at least {MIN_IN_FLIGHT}"),
            ));
        }
        if let Some(m) = self.max_memory {
            if m.0 < MIN_MEMORY {
                return Err(ConfigError::invalid(
                    "max_memory",
                    m.0,
                    format!("must be at least {MIN_MEMORY}"),
                ));
            }
        }
        if self.max_connections_per_client == 0 {
            return Err(ConfigError::invalid(
                "max_connections_per_client",
                0,
                "must be at least 1",
            ));
        }
        if self.handshake_timeout == 0 {
            return Err(ConfigError::invalid(
                "handshake_timeout",
                0,
                "must be at least 1 second",
            ));
        }
        if self.io.workers > 256 {
            return Err(ConfigError::invalid(
                "io.workers",
                self.io.workers,
                "must be between 0 (engine default) and 256",
            ));
        }
        if self.tls.verify_peer && self.tls.ca.is_none() {
            return Err(ConfigError::invalid(
                "tls.verify_peer",
                true,
                "needs `tls.ca` to verify client certificates against",
            ));
        }
        if self.control.tls && (self.tls.cert.is_none() || self.tls.key.is_none()) {
            return Err(ConfigError::invalid(
                "control.tls",
                true,
                "needs `tls.cert` and `tls.key` (the control listener uses the gateway's certificate)",
            ));
        }
        match self.tls.mode {
            TlsMode::Off => {}
            TlsMode::On | TlsMode::Require => {
                if self.tls.cert.is_none() {
                    return Err(ConfigError::invalid(
                        "tls.cert",
                        "(unset)",
                        format!("required when tls.mode = \"{}\"", self.tls.mode),
                    ));
                }
                if self.tls.key.is_none() {
                    return Err(ConfigError::invalid(
                        "tls.key",
                        "(unset)",
                        format!("required when tls.mode = \"{}\"", self.tls.mode),
                    ));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, e) in self.exports.iter().enumerate() {
            let field = format!("export[{i}].name");
            validate_export_name(&field, &e.name)?;
            if !seen.insert(e.name.as_str()) {
                return Err(ConfigError::invalid(
                    field,
                    &e.name,
                    "two [[export]] entries have this name",
                ));
            }
            if e.lun.as_os_str().is_empty() {
                return Err(ConfigError::invalid(
                    format!("export[{i}].lun"),
                    "",
                    "empty LUN path",
                ));
            }
            if let Some(d) = &e.description {
                validate_nbd_string(&format!("export[{i}].description"), d)?;
            }
            parse_rules(&format!("export[{i}].allow"), &e.allow)?;
        }
        Ok(())
    }

    fn validate_block_sizes(&self) -> Result<(), ConfigError> {
        let BlockSizes {
            minimum,
            preferred,
            maximum,
        } = self.block_size;
        let (min, pref, max) = (minimum.0, preferred.0, maximum.0);
        if !min.is_power_of_two() || min > 65536 {
            return Err(ConfigError::invalid(
                "block_size.minimum",
                min,
                "must be a power of two no larger than 65536",
            ));
        }
        if !pref.is_power_of_two() || pref < min.max(512) {
            return Err(ConfigError::invalid(
                "block_size.preferred",
                pref,
                format!(
                    "must be a power of two at least {} (max of minimum and 512)",
                    min.max(512)
                ),
            ));
        }
        if max < pref || max % min != 0 || max > MAX_BLOCK_SIZE_LIMIT {
            return Err(ConfigError::invalid(
                "block_size.maximum",
                max,
                format!(
                    "must be a multiple of minimum ({min}), at least preferred ({pref}) \
                     and at most {MAX_BLOCK_SIZE_LIMIT}"
                ),
            ));
        }
        Ok(())
    }
}

/// Export names and descriptions are NBD strings: no NUL, at most 4096 bytes.
fn validate_nbd_string(field: &str, s: &str) -> Result<(), ConfigError> {
    if s.len() > 4096 {
        return Err(ConfigError::invalid(
            field,
            format!("{}...", &s[..s.floor_char_boundary_compat(32)]),
            format!("{} bytes is longer than the NBD limit of 4096", s.len()),
        ));
    }
    if s.contains('\0') {
        return Err(ConfigError::invalid(field, s, "contains a NUL character"));
    }
    Ok(())
}

fn validate_export_name(field: &str, s: &str) -> Result<(), ConfigError> {
    if s.is_empty() {
        return Err(ConfigError::invalid(
            field,
            s,
            "empty (the NBD default-export name is not served)",
        ));
    }
    validate_nbd_string(field, s)
}

/// `str::floor_char_boundary` is unstable; this is the tiny part we need.
trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}
impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        i = i.min(self.len());
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

fn parse_rules(field: &str, rules: &[String]) -> Result<Vec<AllowRule>, ConfigError> {
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r.parse::<AllowRule>()
                .map_err(|reason| ConfigError::invalid(format!("{field}[{i}]"), r, reason))
        })
        .collect()
}

impl ExportConfig {
    pub fn allow_rules(&self) -> Result<Vec<AllowRule>, ConfigError> {
        parse_rules(&format!("export {:?} allow", self.name), &self.allow)
    }
}

/// The LUN `lungate demo` creates when its pool lacks one.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DemoLun {
    pub name: String,
    pub disks: Vec<ByteSize>,
    pub memory: ByteSize,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// "offset", "truncate" or "aligned"
    pub layout: String,
}

fn default_vcpus() -> u32 {
    1
}

/// `config/demo.toml`: the LUN to create plus the gateway settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    pub lun: DemoLun,
    pub gateway: GatewayConfig,
}

impl DemoConfig {
    /// The embedded demo configuration, parsed and validated.
    pub fn embedded() -> Result<Self, ConfigError> {
        let cfg: DemoConfig = toml::from_str(DEMO_TOML).map_err(|source| ConfigError::Parse {
            origin: "embedded demo.toml".to_string(),
            source,
        })?;
        if cfg.lun.disks.is_empty() {
            return Err(ConfigError::invalid("lun.disks", "[]", "needs one disk"));
        }
        validate_export_name("lun.name", &cfg.lun.name)?;
        cfg.gateway.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_gateway_toml_parses_and_validates() {
        let cfg = GatewayConfig::from_toml(GATEWAY_EXAMPLE_TOML, "gateway.toml").unwrap();
        assert_eq!(cfg.listen, vec!["127.0.0.1:10809".to_string()]);
        assert_eq!(cfg.block_size, BlockSizes::default());
        assert_eq!(cfg.tls.mode, TlsMode::Off);
        assert_eq!(cfg.pools, vec![PathBuf::from("demo-pool")]);
        assert!(
            cfg.exports.is_empty(),
            "the [[export]] example is commented out"
        );
    }

    /// The commented `[[export]]` example must parse too once uncommented
    /// (its key lines start with "# ", its explanations with "## ").
    #[test]
    fn commented_export_example_parses_when_uncommented() {
        let (head, tail) = GATEWAY_EXAMPLE_TOML.split_once("# [[export]]\n").unwrap();
        let mut text = format!("{head}[[export]]\n");
        for line in tail.lines() {
            match line.strip_prefix("# ") {
                Some(key_line) => text.push_str(key_line),
                None => text.push_str(line),
            }
            text.push('\n');
        }
        let cfg = GatewayConfig::from_toml(&text, "uncommented example").unwrap();
        assert_eq!(cfg.exports.len(), 1);
        let e = &cfg.exports[0];
        assert_eq!(e.name, "web1/disk0");
        assert_eq!(e.description.as_deref(), Some("web1 system disk"));
        assert_eq!(e.allow_rules().unwrap().len(), 4);
    }

    #[test]
    fn embedded_demo_toml_parses() {
        let demo = DemoConfig::embedded().unwrap();
        assert_eq!(demo.lun.name, "demo");
        assert_eq!(demo.lun.disks, vec![ByteSize(1 << 30)]);
        assert_eq!(demo.lun.memory, ByteSize(256 << 20));
        assert_eq!(demo.lun.layout, "offset");
        assert_eq!(demo.gateway.listen, vec!["127.0.0.1:10809".to_string()]);
    }

    #[test]
    fn empty_file_gets_defaults() {
        let cfg = GatewayConfig::from_toml("", "empty").unwrap();
        assert_eq!(cfg, GatewayConfig::default());
        assert_eq!(cfg.max_in_flight, ByteSize(64 << 20));
    }

    fn invalid_field(text: &str) -> String {
        match GatewayConfig::from_toml(text, "t") {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(invalid_field("listen = [\"nope\"]"), "listen");
        assert_eq!(invalid_field("listen = []"), "listen");
        assert_eq!(
            invalid_field("[block_size]\nminimum = 3"),
            "block_size.minimum"
        );
        assert_eq!(
            invalid_field("[block_size]\nminimum = 131072"),
            "block_size.minimum"
        );
        assert_eq!(
            invalid_field("[block_size]\npreferred = 256"),
            "block_size.preferred"
        );
        assert_eq!(
            invalid_field("[block_size]\nmaximum = \"512M\""),
            "block_size.maximum"
        );
        assert_eq!(
            invalid_field("[block_size]\nminimum = 512\nmaximum = 4097"),
            "block_size.maximum"
        );
        assert_eq!(invalid_field("max_in_flight = \"1M\""), "max_in_flight");
        assert_eq!(invalid_field("max_memory = \"1M\""), "max_memory");
        assert_eq!(
            invalid_field("max_connections_per_client = 0"),
            "max_connections_per_client"
        );
        assert_eq!(
            invalid_field("[tls]\nverify_peer = true"),
            "tls.verify_peer"
        );
        assert_eq!(
            invalid_field("[control]\ntcp = \"127.0.0.1:1\"\ntoken_file = \"t\"\ntls = true"),
            "control.tls"
        );
        // Migration over TLS: a CA always (targets are verified), the
        // gateway's certificate only for a listener.
        assert_eq!(invalid_field("[migration]\ntls = true"), "migration.tls");
        assert_eq!(
            invalid_field("[tls]\nca = \"c\"\n[migration]\ntls = true\nlisten = \"127.0.0.1:1\""),
            "migration.tls"
        );
        assert!(
            GatewayConfig::from_toml("[tls]\nca = \"c\"\n[migration]\ntls = true", "t").is_ok()
        );
        assert_eq!(invalid_field("[control]\ntls = true"), "control.tls");
        assert_eq!(invalid_field("[tls]\nmode = \"require\""), "tls.cert");
        assert_eq!(
            invalid_field("[tls]\nmode = \"on\"\ncert = \"c.pem\""),
            "tls.key"
        );
        assert_eq!(invalid_field("allow = [\"10.0.0.0/33\"]"), "allow[0]");
        assert_eq!(
            invalid_field("[[export]]\nname = \"\"\nlun = \"a.lun\""),
            "export[0].name"
        );
        assert_eq!(
            invalid_field(
                "[[export]]\nname = \"a\"\nlun = \"a.lun\"\n[[export]]\nname = \"a\"\nlun = \"b.lun\""
            ),
            "export[1].name"
        );
        assert_eq!(
            invalid_field("[[export]]\nname = \"a\"\nlun = \"a.lun\"\nallow = [\"cert:\"]"),
            "export[0].allow[0]"
        );
    }

    #[test]
    fn unknown_keys_are_parse_errors() {
        let err = GatewayConfig::from_toml("listne = []", "t").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn tls_mode_from_str() {
        assert_eq!("require".parse::<TlsMode>().unwrap(), TlsMode::Require);
        assert!("maybe".parse::<TlsMode>().is_err());
    }

    #[test]
    fn overlong_description_is_rejected_without_panicking_on_utf8() {
        let long = "é".repeat(3000);
        let text = format!("[[export]]\nname = \"a\"\nlun = \"a.lun\"\ndescription = \"{long}\"");
        match GatewayConfig::from_toml(&text, "t") {
            Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "export[0].description"),
            other => panic!("{other:?}"),
        }
    }
}
