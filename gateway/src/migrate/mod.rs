//! Live migration: a VM's LUNs (its consistency group, with its state
//! region and whole snapshot tree) move to another gateway, or to another
//! pool of this one, while its guests keep doing I/O, with no failed or
//! reordered request. docs/migration.md explains it for users;
//! [`protocol`] draws the sequence.
//!
//! * [`source`] runs an outgoing migration: admission, the bulk copy of
//!   frozen layers, copy rounds of the live layer driven by the volume's
//!   dirty tracking, the switch inside a pause of every member's gate, and
//!   forwarding of the connections it had to the new owner ([`forward`]).
//! * [`target`] answers one: admission policy, staging, verification,
//!   the commit, serving the LUNs.
//! * [`converge`] slows the guests' writes when the rounds stop shrinking
//!   (auto-converge), through the members' gates.
//! * [`transfer`] moves bytes: it reads files and live volumes, cuts them
//!   into checksummed frames, and applies them on the other side.
//! * [`journal`] keeps each side's durable record of a migration, and
//!   [`recover`] finishes or undoes what a crash interrupted, so exactly one
//!   gateway owns every LUN whatever happens.
//! * [`replicate`] ships a VM's checkpoints to another gateway on the
//!   same connection and frames, holds replicas, and fails them over.
//! * [`offline`] runs a move between two pools that no gateway serves.
//! * [`listen`] is the target's listener (TCP, optionally TLS) and its
//!   authentication (bearer token, client certificate, allow rules).
//!
//! A move between two pools of one gateway runs the same source and target
//! over an in-process pipe; forwarding is then a swap to the new LUN's
//! stack, with no network in between.
//!
//! This module owns the per-LUN migration state ([`LunMigration`]: tree
//! operations are queued while a LUN moves) and the gateway's table of
//! migrations ([`Hub`]). It changes a served LUN only through its gate
//! (pause, swap) and the registry (retire, adopt), never the NBD sessions.

pub mod converge;
pub mod forward;
pub mod handover;
pub mod journal;
pub mod listen;
pub mod offline;
pub mod protocol;
pub mod recover;
pub mod replicate;
pub mod source;
pub mod target;
pub mod transfer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lungate_api::migrate::{OpOutcome, QueuedOp};
use lungate_api::types::{Direction, MigrationInfo, MigrationPhase};
use lungate_block::engine::IoEngine;
use lungate_config::AllowRule;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Default guest-visible pause budget, ms.
pub const DEFAULT_DOWNTIME_MS: u64 = 50;
/// Default copy rounds after the bulk pass before giving up.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// Default time a step waits for the other side.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the migration code needs from the gateway's configuration.
pub struct Settings {
    /// This gateway's name (policies, logs): `[migration] name` or the
    /// host name.
    pub name: String,
    /// Where incoming migrations connect.
    pub listen: Option<SocketAddr>,
    pub allow: Vec<AllowRule>,
    /// Required of incoming migrations, and sent by outgoing ones.
    pub token: Option<String>,
    /// TLS of the listener.
    pub tls_server: Option<Arc<rustls::ServerConfig>>,
    /// TLS to targets (the listener's CA as roots, the client certificate).
    pub tls_client: Option<Arc<rustls::ClientConfig>>,
    /// Space a pool keeps free after an admission.
    pub reserve: u64,
    pub downtime_ms: u64,
    pub max_rounds: u32,
    pub timeout: Duration,
    /// The pools LUNs can arrive in.
    pub pools: Vec<PathBuf>,
    /// The engine served LUNs do their I/O on.
    pub engine: IoEngine,
    /// This gateway's NBD TCP port (for sources forwarding to it), once
    /// bound, and whether its NBD listener speaks TLS.
    pub nbd: OnceLock<(u16, bool)>,
    /// A test hook: stall at a named step (see [`Stall`]).
    pub stall: Stall,
}

impl Settings {
    /// Settings with no listener, no TLS and defaults for the rest (a
    /// gateway without `[migration]`, an offline move).
    pub fn local(pools: Vec<PathBuf>, engine: IoEngine) -> Settings {
        Settings {
            name: lungate_block::sys::hostname(),
            listen: None,
            allow: Vec::new(),
            token: None,
            tls_server: None,
            tls_client: None,
            reserve: 0,
            downtime_ms: DEFAULT_DOWNTIME_MS,
            max_rounds: DEFAULT_MAX_ROUNDS,
            timeout: DEFAULT_TIMEOUT,
            pools,
            engine,
            nbd: OnceLock::new(),
            stall: Stall::default(),
        }
    }

    /// The pool called `name` (a path, or a pool directory's name).
    pub fn pool(&self, name: Option<&str>) -> Option<PathBuf> {
        let Some(name) = name else {
            return self.pools.first().cloned();
        };
        let want = std::fs::canonicalize(name).ok();
        self.pools
            .iter()
            .find(|p| {
                p.as_os_str() == name
                    || p.file_name().is_some_and(|f| f == name)
                    || (want.is_some() && std::fs::canonicalize(p).ok() == want)
            })
            .cloned()
    }
}

/// Fault injection for the crash and abort tests: with `STEP:MS` (the
/// binary reads it from `LUNGATE_TEST_MIGRATION_STALL`), a migration
/// that reaches step `STEP` sleeps `MS` milliseconds there (and logs
/// `migration stalled at STEP`), so a test can kill or abort it at that
/// exact step. Steps: `prepared`, `copied`, `rounds`, `paused`,
/// `committing` (source, after its switching record, before the commit),
/// `committed` (target, after its commit record, before serving),
/// `forwarding` (source, after the target completed, before it retires
/// its copy). A handover (`handover`) stalls at `prepared`, `paused` and
/// `committing` (source, with the target holding the locks, before the
/// etcd transaction) and `committed` (target, after it, before serving).
/// A replica cycle stalls at `replica-commit` (target, everything received
/// and verified, before the commit).
#[derive(Debug, Clone, Default)]
pub struct Stall {
    at: Option<(String, Duration)>,
}

impl Stall {
    /// `STEP:MS`; anything else (or nothing) stalls nowhere.
    pub fn parse(spec: Option<&str>) -> Stall {
        let at = spec.and_then(|v| {
            let (step, ms) = v.split_once(':')?;
            Some((step.to_string(), Duration::from_millis(ms.parse().ok()?)))
        });
        Stall { at }
    }

    pub async fn at(&self, step: &str) {
        if let Some((s, d)) = &self.at {
            if s == step {
                tracing::warn!(
                    step,
                    ms = d.as_millis() as u64,
                    "migration stalled at {step}"
                );
                tokio::time::sleep(*d).await;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain state: a panic elsewhere leaves nothing half-updated.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ----- per-LUN state -----------------------------------------------------

/// A control operation waiting for a migration to finish.
pub(crate) struct Waiting {
    pub op: QueuedOp,
    pub reply: oneshot::Sender<OpOutcome>,
}

/// The queue every member of a moving group shares.
pub(crate) type OpQueue = Arc<Mutex<Vec<Waiting>>>;

#[derive(Default)]
enum Slot {
    #[default]
    Idle,
    Moving {
        id: Uuid,
        queue: OpQueue,
    },
    Moved {
        to: String,
    },
}

/// Whether a served LUN is being migrated, or has been: tree operations
/// (snapshot, revert, delete, clone, flatten) that arrive while it moves
/// are queued and run, in order, where it ends up.
#[derive(Default)]
pub struct LunMigration {
    slot: Mutex<Slot>,
}

/// What [`LunMigration::enqueue`] did.
pub enum Queued {
    /// The LUN does not move: run the operation here.
    NotMoving,
    /// Queued: the outcome comes when the migration ends.
    Waiting(oneshot::Receiver<OpOutcome>),
    /// The LUN is served elsewhere now.
    Moved(String),
}

impl LunMigration {
    /// Queue `op` if the LUN is moving.
    pub fn enqueue(&self, op: QueuedOp) -> Queued {
        match &*lock(&self.slot) {
            Slot::Idle => Queued::NotMoving,
            Slot::Moving { queue, .. } => {
                let (tx, rx) = oneshot::channel();
                lock(queue).push(Waiting { op, reply: tx });
                Queued::Waiting(rx)
            }
            Slot::Moved { to } => Queued::Moved(to.clone()),
        }
    }

    /// `None` when the LUN is here and not moving; otherwise why an
    /// operation that changes it cannot run here now.
    pub fn busy(&self) -> Option<String> {
        match &*lock(&self.slot) {
            Slot::Idle => None,
            Slot::Moving { id, .. } => Some(format!(
                "the LUN is being migrated (migration {id}); the operation is queued"
            )),
            Slot::Moved { to } => Some(format!("the LUN has migrated to {to}")),
        }
    }

    /// Where the LUN went, if it did.
    pub fn moved_to(&self) -> Option<String> {
        match &*lock(&self.slot) {
            Slot::Moved { to } => Some(to.clone()),
            _ => None,
        }
    }

    pub fn is_moving(&self) -> bool {
        matches!(&*lock(&self.slot), Slot::Moving { .. })
    }

    /// Mark the LUN moving, sharing `queue`; `false` if it already is.
    pub(crate) fn begin(&self, id: Uuid, queue: OpQueue) -> bool {
        let mut s = lock(&self.slot);
        if !matches!(&*s, Slot::Idle) {
            return false;
        }
        *s = Slot::Moving { id, queue };
        true
    }

    /// The migration ended without moving it.
    pub(crate) fn cancel(&self) {
        *lock(&self.slot) = Slot::Idle;
    }

    pub(crate) fn moved(&self, to: String) {
        *lock(&self.slot) = Slot::Moved { to };
    }
}

// ----- the gateway's table of migrations ----------------------------------

/// One migration this gateway runs or answers, as `lunctl migrations`
/// shows it.
pub struct Tracked {
    info: Mutex<MigrationInfo>,
    started: Instant,
    /// Fired by `lunctl migrate --abort`.
    pub abort: CancellationToken,
    /// Fired by `POST /v1/migrations/{id}/release` (a held migration may
    /// switch).
    pub release: CancellationToken,
}

impl Tracked {
    fn new(id: Uuid, lun: &str, direction: Direction, peer: &str, downtime_ms: u64) -> Tracked {
        Tracked {
            info: Mutex::new(MigrationInfo {
                id,
                lun: lun.to_string(),
                members: vec![lun.to_string()],
                direction,
                peer: peer.to_string(),
                phase: MigrationPhase::Preparing,
                bytes: 0,
                bulk_bytes: 0,
                rounds: 0,
                rate: 0,
                dirty_bytes: 0,
                downtime_ms,
                pause_us: None,
                parked: None,
                queued_ops: 0,
                held: false,
                auto_converge: false,
                throttle_rate: None,
                throttle_rounds: 0,
                throttle_min_rate: None,
                throttled_writes: 0,
                kept_source: None,
                error: None,
                started: now_secs(),
                elapsed_ms: 0,
            }),
            started: Instant::now(),
            abort: CancellationToken::new(),
            release: CancellationToken::new(),
        }
    }

    pub fn id(&self) -> Uuid {
        lock(&self.info).id
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut lock(&self.info));
    }

    pub fn phase(&self) -> MigrationPhase {
        lock(&self.info).phase
    }

    pub fn snapshot(&self) -> MigrationInfo {
        let mut i = lock(&self.info).clone();
        if !i.phase.is_final() {
            i.elapsed_ms = self.started.elapsed().as_millis() as u64;
        }
        i
    }

    /// Freeze the elapsed time at the end.
    pub fn finish(&self, phase: MigrationPhase, error: Option<String>) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.update(|i| {
            i.phase = phase;
            i.error = error;
            i.elapsed_ms = ms;
        });
    }
}

/// The gateway's migrations: running ones and the last finished ones.
#[derive(Default)]
pub struct Hub {
    settings: OnceLock<Arc<Settings>>,
    table: Mutex<Vec<Arc<Tracked>>>,
    /// Replications run from here and replicas held here.
    pub replication: replicate::Table,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("configured", &self.settings.get().is_some())
            .field("migrations", &lock(&self.table).len())
            .finish()
    }
}

/// Finished migrations kept for `lunctl migrations`.
const KEEP_FINISHED: usize = 64;

impl Hub {
    /// Called once, when the gateway is built.
    pub fn configure(&self, s: Settings) -> Arc<Settings> {
        let s = Arc::new(s);
        let _ = self.settings.set(s.clone());
        s
    }

    /// The settings, or local defaults when the gateway was built without
    /// (unit tests).
    pub fn settings(&self) -> Option<&Arc<Settings>> {
        self.settings.get()
    }

    pub(crate) fn track(
        &self,
        id: Uuid,
        lun: &str,
        direction: Direction,
        peer: &str,
        downtime_ms: u64,
    ) -> Arc<Tracked> {
        let t = Arc::new(Tracked::new(id, lun, direction, peer, downtime_ms));
        let mut table = lock(&self.table);
        let finished = table.iter().filter(|t| t.phase().is_final()).count();
        if finished >= KEEP_FINISHED {
            if let Some(i) = table.iter().position(|t| t.phase().is_final()) {
                table.remove(i);
            }
        }
        table.push(t.clone());
        t
    }

    pub fn list(&self) -> Vec<MigrationInfo> {
        lock(&self.table).iter().map(|t| t.snapshot()).collect()
    }

    pub fn get(&self, id: Uuid) -> Option<Arc<Tracked>> {
        lock(&self.table).iter().find(|t| t.id() == id).cloned()
    }

    /// The running migrations of the VM `lun` (by name).
    pub fn running_of(&self, lun: &str) -> Vec<Arc<Tracked>> {
        lock(&self.table)
            .iter()
            .filter(|t| {
                let i = t.snapshot();
                !i.phase.is_final() && (i.lun == lun || i.members.iter().any(|m| m == lun))
            })
            .cloned()
            .collect()
    }
}

/// Why a migration could not start or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The request itself is wrong (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The VM cannot move as asked (HTTP 409): clones depend on it, it is
    /// moving already, its policy forbids the destination.
    #[error("{0}")]
    Refused(String),
    /// The target refused it, with its reason.
    #[error("the target refused the migration: {0}")]
    Denied(lungate_api::migrate::Denial),
    #[error("aborted: {0}")]
    Aborted(String),
    #[error("{0}")]
    Failed(String),
}

impl From<std::io::Error> for MigrateError {
    fn from(e: std::io::Error) -> Self {
        MigrateError::Failed(e.to_string())
    }
}

/// `POOL/.lungate-migrations`: where a pool keeps its migration records
/// and staging directories.
pub fn state_dir(pool: &Path) -> PathBuf {
    pool.join(".lungate-migrations")
}
