//! `lungate`: command line, logging and signals. Everything else lives in
//! the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use lungate::config::{build_server, Overrides};
use lungate_cli::Exit;
use lungate_config::{EngineKind, GatewayConfig, TlsMode};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "lungate",
    version,
    about = "NBD gateway serving the disk regions of LUN files",
    after_help = Exit::table(&EXITS)
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start; boxing the serve flags would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Serve every disk of every LUN in the pools (and [[export]] entries).
    Serve {
        /// TOML configuration file (see config/gateway.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Pool directory; repeatable; replaces `pools` of the config file.
        #[arg(long = "pool")]
        pools: Vec<PathBuf>,
        /// TCP address IP:PORT (port 0 = any free port); repeatable.
        /// --listen/--unix replace the file's `listen` and `unix`.
        #[arg(long)]
        listen: Vec<String>,
        /// Unix socket path.
        #[arg(long)]
        unix: Option<PathBuf>,
        /// Serve every export read-only.
        #[arg(long)]
        read_only: bool,
        /// TLS mode: off, on (client may upgrade) or require.
        #[arg(long, value_parser = parse_tls)]
        tls: Option<TlsMode>,
        /// Server certificate chain (PEM).
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        /// Server private key (PEM).
        #[arg(long)]
        tls_key: Option<PathBuf>,
        /// CA for client certificates (PEM): a certificate that does not
        /// verify against it ends the handshake; enables `cert:` rules.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// Require a client certificate that verifies against --tls-ca.
        #[arg(long)]
        tls_verify_peer: bool,
        /// I/O engine: auto, uring or sync.
        #[arg(long, value_parser = parse_engine)]
        engine: Option<EngineKind>,
        /// Control API unix socket (default: <first pool>/.lungate.sock).
        #[arg(long)]
        control: Option<PathBuf>,
        /// etcd endpoint etcd://HOST:PORT: share the RBD pools with other
        /// gateways, one owner per LUN (docs/scale-out.md); replaces
        /// `[coordinator] url`.
        #[arg(long)]
        coordinator: Option<String>,
        /// Admit migrations from other gateways on IP:PORT (replaces
        /// `[migration] listen`).
        #[arg(long)]
        migration_listen: Option<String>,
        /// Who may migrate LUNs here: IP, CIDR or cert:NAME; repeatable
        /// (replaces `[migration] allow`).
        #[arg(long = "migration-allow")]
        migration_allow: Vec<String>,
    },
    /// Move a VM (its LUNs, state region and snapshot tree) to another pool
    /// while no gateway serves it, through the migration engine and its
    /// journal (docs/migration.md); `lunctl migrate --to-pool` runs this
    /// when no gateway owns the LUN.
    Move {
        /// The VM's primary LUN, by name.
        name: String,
        /// The pool it is in (a directory).
        #[arg(long)]
        pool: PathBuf,
        /// The pool it goes to (a directory).
        #[arg(long)]
        to_pool: PathBuf,
        /// Keep the source copy as POOL/NAME.migrated-ID/.
        #[arg(long)]
        keep_source: bool,
        /// Also move the clones that depend on the VM's layers.
        #[arg(long)]
        with_dependents: bool,
        /// Copy bandwidth limit per second, e.g. 200M.
        #[arg(long, value_name = "RATE", value_parser = parse_rate)]
        max_rate: Option<u64>,
        /// I/O engine: auto, uring or sync.
        #[arg(long, value_parser = parse_engine)]
        engine: Option<EngineKind>,
        /// Print the final report as one JSON object (the control API's
        /// migration record).
        #[arg(long)]
        json: bool,
    },
    /// Create ./demo-pool with LUN `demo` (1 GiB disk) if needed and serve
    /// it on 127.0.0.1:10809.
    Demo {
        /// Pool directory for the demo LUN.
        #[arg(long, default_value = "demo-pool")]
        dir: PathBuf,
    },
    #[command(flatten)]
    Doc(lungate_cli::DocCmd),
}

/// The exit codes lungate uses (lungate_cli::Exit, the same as lunctl's).
const EXITS: [Exit; 3] = [Exit::Ok, Exit::Failed, Exit::Usage];

fn parse_tls(s: &str) -> Result<TlsMode, String> {
    s.parse()
}

fn parse_rate(s: &str) -> Result<u64, String> {
    lun_manager::size::parse_size(s).map_err(|e| e.to_string())
}

fn parse_engine(s: &str) -> Result<EngineKind, String> {
    s.parse()
        .map_err(|e: lungate_block::engine::BackendError| e.to_string())
}

/// The listening sockets systemd-style socket activation passed in:
/// `LISTEN_FDS` descriptors from 3 on, if `LISTEN_PID` names this process.
/// The variables are removed so that no child inherits them. Called before
/// any thread exists.
fn take_activated_sockets() -> Result<Vec<std::os::fd::OwnedFd>, String> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const FIRST: i32 = 3; // SD_LISTEN_FDS_START
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new()); // meant for another process
    }
    let n: i32 = fds
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={fds:?} is not a number"))?;
    if !(0..=64).contains(&n) {
        return Err(format!("LISTEN_FDS={n} is out of range"));
    }
    let mut out = Vec::new();
    for fd in FIRST..FIRST + n {
        // SAFETY: fcntl(F_GETFD/F_SETFD) only inspects and sets the
        // descriptor's flags; an invalid descriptor just fails with EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(format!(
                "LISTEN_FDS names descriptor {fd}, which is not open"
            ));
        }
        // SAFETY: as above; close-on-exec keeps it from children.
        unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        // SAFETY: the launcher passed this descriptor to this process (that
        // is what LISTEN_PID/LISTEN_FDS say) and nothing else owns it.
        out.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(out)
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    let cli = Cli::parse();
    if let Cmd::Doc(d) = &cli.cmd {
        return lungate_cli::docs::main(Cli::command(), d, &EXITS);
    }
    let activated = match take_activated_sockets() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lungate: socket activation: {e}");
            return Exit::Failed.into();
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only for people; log files and journald get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LUNGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lungate: cannot start the async runtime: {e}");
            return Exit::Failed.into();
        }
    };
    match runtime.block_on(run(cli.cmd, activated)) {
        Ok(()) => Exit::Ok.into(),
        Err(msg) => {
            tracing::error!("{msg}");
            eprintln!("lungate: {msg}");
            Exit::Failed.into()
        }
    }
}

async fn run(cmd: Cmd, activated: Vec<std::os::fd::OwnedFd>) -> Result<(), String> {
    // Installed first, so a signal during startup still ends cleanly.
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    // Test-only fault injection (docs/migration.md, tests/migration_crash.rs).
    let stall = lungate::migrate::Stall::parse(
        std::env::var("LUNGATE_TEST_MIGRATION_STALL")
            .ok()
            .as_deref(),
    );
    let (cfg, hint) = match cmd {
        Cmd::Move {
            name,
            pool,
            to_pool,
            keep_source,
            with_dependents,
            max_rate,
            engine,
            json,
        } => {
            let io = lungate_config::IoConfig::default();
            let engine =
                lungate_block::engine::IoEngine::new(engine.unwrap_or(io.engine), io.workers)
                    .map_err(|e| format!("cannot start the I/O engine: {e}"))?;
            let m = lungate::migrate::offline::Move {
                name,
                pool,
                to_pool,
                downtime_ms: lungate::migrate::DEFAULT_DOWNTIME_MS,
                max_rate,
                keep_source,
                with_dependents,
            };
            let info = lungate::migrate::offline::run(m, engine, stall, shutdown)
                .await
                .map_err(|e| e.to_string())?;
            let mut out = std::io::stdout().lock();
            let line = if json {
                serde_json::to_string(&info).map_err(|e| e.to_string())?
            } else {
                let mut s = format!(
                    "moved {} to {}: {} bytes in {} ms",
                    info.members.join(", "),
                    info.peer,
                    info.bytes,
                    info.elapsed_ms
                );
                if let Some(k) = &info.kept_source {
                    s.push_str(&format!(", source kept at {}", k.display()));
                }
                s
            };
            let _ = writeln!(out, "{line}");
            return Ok(());
        }

        Cmd::Serve {
            config,
            pools,
            listen,
            unix,
            read_only,
            tls,
            tls_cert,
            tls_key,
            tls_ca,
            tls_verify_peer,
            engine,
            control,
            coordinator,
            migration_listen,
            migration_allow,
        } => {
            let mut cfg = match &config {
                Some(p) => GatewayConfig::load(p).map_err(|e| e.to_string())?,
                None => GatewayConfig::default(),
            };
            Overrides {
                pools,
                listen,
                unix,
                read_only,
                tls,
                tls_cert,
                tls_key,
                tls_ca,
                tls_verify_peer,
                engine,
                control,
                coordinator,
                migration_listen,
                migration_allow,
            }
            .apply(&mut cfg)
            .map_err(|e| e.to_string())?;
            (cfg, None)
        }
        Cmd::Demo { dir } => {
            let (cfg, export) = lungate::demo::prepare(&dir).map_err(|e| e.to_string())?;
            (cfg, Some(export))
        }
        Cmd::Doc(_) => unreachable!("handled in main"),
    };

    let server = build_server(&cfg, activated, stall)
        .await
        .map_err(|e| e.to_string())?;

    let listening = server.listening();
    {
        let mut out = std::io::stdout().lock();
        for l in &listening {
            let _ = writeln!(out, "{l}");
        }
        for l in server.control_listening() {
            let _ = writeln!(out, "{l}");
        }
        if let Some(export) = &hint {
            let host = listening
                .iter()
                .find_map(|l| match l {
                    lungate::server::Listening::Tcp(a) => Some(a),
                    _ => None,
                })
                .map(|a| {
                    if a.port() == 10809 {
                        a.ip().to_string()
                    } else {
                        a.to_string()
                    }
                })
                .unwrap_or_else(|| "127.0.0.1".into());
            let _ = writeln!(out, "connect with: nbdinfo nbd://{host}/{export}");
        }
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }
    server.run(shutdown).await;
    lungate::coordinator::release().await;
    Ok(())
}

fn spawn_signal_handler(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = which, "stopping");
        shutdown.cancel();
    });
    Ok(())
}
