//! An offline move (`lungate move`): a VM's LUNs go from one pool to
//! another while no gateway serves them, through the same engine as a
//! live move between two pools of one gateway ([`super::source`] with
//! [`Destination::Local`] and an in-process [`super::target`]), and with
//! the same journal, so a crash at any step is finished or undone by the
//! next `lungate move` or `lungate serve` of both pools
//! ([`super::recover`]).
//!
//! This module opens only what moves (the VM's group, and with
//! `--with-dependents` the other LUNs of its pool) in a registry of its
//! own with no listener and no control API, runs the move to the end and
//! lets go of everything. It refuses when a gateway serves the LUN or
//! either pool: that gateway must run the move, or it would not know its
//! LUNs changed under it.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lun_manager::owner::{self, Probe};
use lungate_api::types::{Direction, MigrationInfo, MigrationPhase};
use lungate_block::engine::IoEngine;
use tokio_util::sync::CancellationToken;

use super::journal::Record;
use super::source::{self, Destination, Request};
use super::{MigrateError, Settings, Stall};
use crate::export::{ExportSet, Exports};
use crate::registry::Registry;
use crate::served::{ServeError, ServedLun};
use crate::switch::SwitchStats;

/// What `lungate move` was asked.
#[derive(Debug, Clone)]
pub struct Move {
    /// The VM's primary LUN, by name.
    pub name: String,
    pub pool: PathBuf,
    pub to_pool: PathBuf,
    pub downtime_ms: u64,
    pub max_rate: Option<u64>,
    pub keep_source: bool,
    pub with_dependents: bool,
}

/// Why an offline move did not happen, or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The request is wrong (a pool that is no directory, the same pool
    /// twice, no such LUN).
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{path} is served by lungate (PID {pid}, control API {}): a served LUN moves through \
         its gateway (`lunctl migrate {name} --pool POOL --to-pool POOL`)",
        control.display()
    )]
    Served {
        path: PathBuf,
        name: String,
        pid: u32,
        control: PathBuf,
    },
    #[error(
        "pool {} is served by a gateway (it answers on {}): move the LUN through that gateway \
         (`lunctl migrate`, with both pools served by it), or stop it first",
        pool.display(),
        socket.display()
    )]
    PoolServed { pool: PathBuf, socket: PathBuf },
    #[error(transparent)]
    Owner(#[from] owner::Error),
    #[error(transparent)]
    Open(#[from] ServeError),
    #[error("cannot start the I/O engine: {0}")]
    Engine(std::io::Error),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// The engine ran and ended without moving the LUNs; they stay in the
    /// source pool.
    #[error(
        "the move of {} to {} {}; the LUNs stay in the source pool: {}",
        .0.lun,
        .0.peer,
        if .0.phase == MigrationPhase::Aborted { "was aborted" } else { "failed" },
        .0.error.as_deref().unwrap_or("no reason given")
    )]
    Ended(Box<MigrationInfo>),
}

/// A pool directory, canonical (records and the target compare paths).
fn pool_dir(p: &Path, flag: &str) -> Result<PathBuf, MoveError> {
    if !p.is_dir() {
        return Err(MoveError::Invalid(format!(
            "{flag} {}: not a pool directory (with no gateway to ask, give the pool's path)",
            p.display()
        )));
    }
    std::fs::canonicalize(p).map_err(|e| MoveError::Invalid(format!("{flag} {}: {e}", p.display())))
}

/// Refuse a pool some gateway answers for (its default control socket
/// accepts a connection).
fn not_served(pool: &Path) -> Result<(), MoveError> {
    let socket = pool.join(".lungate.sock");
    if UnixStream::connect(&socket).is_ok() {
        return Err(MoveError::PoolServed {
            pool: pool.to_path_buf(),
            socket,
        });
    }
    Ok(())
}

/// Open `path` as a gateway would serve it (locked, its owner record
/// written), refusing a LUN a gateway serves.
fn open(
    path: &Path,
    stats: &Arc<SwitchStats>,
    engine: &IoEngine,
) -> Result<Arc<ServedLun>, MoveError> {
    if let Err(Probe::Gateway { pid, control }) = owner::try_lock(path)? {
        return Err(MoveError::Served {
            path: path.to_path_buf(),
            name: path
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
            pid,
            control,
        });
    }
    Ok(Arc::new(ServedLun::open(
        path,
        false,
        None,
        stats.clone(),
        engine,
    )?))
}

/// What was moved, for a move that a crash interrupted and recovery
/// finished: the LUN is in the target pool now.
fn recovered(m: &Move, rec: &Record) -> MigrationInfo {
    MigrationInfo {
        id: rec.id,
        lun: m.name.clone(),
        members: rec.members.iter().map(|r| r.name.clone()).collect(),
        direction: Direction::Local,
        peer: m.to_pool.display().to_string(),
        phase: MigrationPhase::Done,
        bytes: 0,
        bulk_bytes: 0,
        rounds: 0,
        rate: 0,
        dirty_bytes: 0,
        downtime_ms: m.downtime_ms,
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
        started: rec.created,
        elapsed_ms: 0,
    }
}

/// Run the move to its end. `stop` (SIGINT, SIGTERM) aborts it while it
/// may still be aborted; after the switch it runs to the end.
pub async fn run(
    mut m: Move,
    engine: IoEngine,
    stall: Stall,
    stop: CancellationToken,
) -> Result<MigrationInfo, MoveError> {
    m.pool = pool_dir(&m.pool, "--pool")?;
    m.to_pool = pool_dir(&m.to_pool, "--to-pool")?;
    if m.pool == m.to_pool {
        return Err(MoveError::Invalid(format!(
            "{} is already in pool {}",
            m.name,
            m.pool.display()
        )));
    }
    lun_manager::format::validate_name(&m.name).map_err(MoveError::Invalid)?;
    not_served(&m.pool)?;
    not_served(&m.to_pool)?;
    let path = lun_manager::pool::lun_path(&m.pool, &m.name);
    let mut settings = Settings::local(vec![m.pool.clone(), m.to_pool.clone()], engine.clone());
    settings.stall = stall;
    // A move a crash interrupted (this one, run again, or another) is
    // finished or undone first, exactly as a gateway of both pools would.
    let interrupted: Vec<Record> = Record::list(&m.pool)
        .into_iter()
        .filter(|r| r.outgoing && r.members.iter().any(|x| x.name == m.name))
        .collect();
    let held = super::recover::at_start(&settings).await;
    for h in &held {
        tracing::warn!(migration = %h.record.id, pool = %h.pool.display(), target = %h.record.peer,
            "a migration to another gateway is still in doubt; its LUNs stay held");
    }
    if !path.exists() {
        let there = lun_manager::pool::lun_path(&m.to_pool, &m.name);
        if let (Some(rec), true) = (interrupted.first(), there.exists()) {
            tracing::warn!(migration = %rec.id, "the interrupted move was finished by recovery");
            return Ok(recovered(&m, rec));
        }
        return Err(MoveError::Invalid(format!(
            "no LUN named {:?} in pool {}",
            m.name,
            m.pool.display()
        )));
    }
    let stats = Arc::new(SwitchStats::default());
    let primary = open(&path, &stats, &engine)?;
    let mut luns = vec![primary.clone()];
    let secondaries = {
        let mut h = primary.lun.share();
        h.reload_state()
            .and_then(|()| h.secondaries())
            .map_err(|e| MoveError::Invalid(format!("{}: {e}", path.display())))?
    };
    for r in &secondaries.disks {
        let p = lun_manager::group::locate_secondary(&path, r)
            .map_err(|e| MoveError::Invalid(format!("{}: secondary {}: {e}", m.name, r.name)))?;
        luns.push(open(&p, &stats, &engine)?);
    }
    if m.with_dependents {
        // The clones of its layers may be any LUN of the pool.
        for p in lun_manager::pool::list_luns(&m.pool).unwrap_or_default() {
            let key = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            if luns.iter().any(|l| l.key == key) {
                continue;
            }
            match open(&p, &stats, &engine) {
                Ok(l) => luns.push(l),
                Err(e) => tracing::warn!(lun = %p.display(), "not opened: {e}"),
            }
        }
    }
    let cfg = lungate_config::GatewayConfig::default();
    let reg = Arc::new(Registry::new(
        Arc::new(Exports::new(ExportSet::default())),
        Vec::new(),
        stats,
        false,
        crate::export::block_sizes(&cfg),
        Vec::new(),
        None,
    ));
    for l in luns {
        reg.add(l).map_err(|e| MoveError::Invalid(e.to_string()))?;
    }
    // Finish or undo a group operation a crash interrupted, as at a
    // gateway's start.
    crate::control::ops::recover(&reg);
    reg.migrate.configure(settings);
    let tracked = source::start(
        &reg,
        &primary,
        Request {
            to: Destination::Local(m.to_pool.clone()),
            target_pool: None,
            downtime_ms: m.downtime_ms,
            max_rate: m.max_rate,
            keep_source: m.keep_source,
            with_dependents: m.with_dependents,
            token: None,
            hold: None,
            // No gateway serves the VM: there are no writes to slow.
            auto_converge: false,
        },
    )
    .await?;
    drop(primary);
    let mut aborted = false;
    while !tracked.phase().is_final() {
        tokio::select! {
            _ = stop.cancelled(), if !aborted => {
                tracing::warn!(migration = %tracked.id(), "stopping: aborting the move");
                tracked.abort.cancel();
                aborted = true;
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    // The source is done only after the target acknowledged, which it
    // does once its record says done.
    let mut info = tracked.snapshot();
    if info.phase != MigrationPhase::Done {
        return Err(MoveError::Ended(Box::new(info)));
    }
    // Nothing listens, so no client had a request to park: the gates'
    // pause is the engine's, not a guest's.
    info.pause_us = None;
    info.parked = None;
    Ok(info)
}
