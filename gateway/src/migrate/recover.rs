//! After a crash: finish or undo every migration a pool's records say was
//! under way, before the pools are served, so exactly one gateway owns
//! every LUN (see the table in [`super::journal`]).
//!
//! Incoming records first (a move between two pools of this gateway has
//! both): `staged` is undone, `committed` has its LUNs moved into the
//! pool. Then outgoing ones: `copying` is dropped (no commit was ever
//! sent), `switching` asks the target: committed means the copy here is
//! retired, not committed means it is served again. A target that cannot
//! be reached leaves the LUN *held*: its files wait in the migration's
//! directory, unserved, and [`resolve_held`] keeps asking in the
//! background, then retires them or serves them again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lungate_api::migrate::MigrationState;

use super::journal::{self, Record, State};
use super::Settings;
use crate::registry::Registry;
use crate::served::ServedLun;

/// A migration whose target could not be asked at start.
#[derive(Debug, Clone)]
pub struct Held {
    pub pool: PathBuf,
    pub record: Record,
}

/// What this gateway's own pools say about migration `id` (a move
/// between two of them).
pub fn local_state(settings: &Settings, id: uuid::Uuid) -> MigrationState {
    local_state_in(settings.pools.iter().map(PathBuf::as_path), id)
}

/// What the pools `pools` say about migration `id`.
fn local_state_in<'a>(pools: impl Iterator<Item = &'a Path>, id: uuid::Uuid) -> MigrationState {
    let mut pools = pools;
    let committed = pools.any(|p| {
        Record::list(p)
            .iter()
            .any(|r| r.id == id && !r.outgoing && matches!(r.state, State::Committed | State::Done))
    });
    if committed {
        MigrationState::Committed
    } else {
        MigrationState::Unknown
    }
}

fn names(r: &Record) -> Vec<String> {
    r.members.iter().map(|m| m.name.clone()).collect()
}

fn held_dir(pool: &Path, r: &Record) -> PathBuf {
    Record::dir(pool, r.id).join("held")
}

/// Move the LUN files of `r` from the pool into its held directory.
fn hold(pool: &Path, r: &Record) -> std::io::Result<()> {
    let dir = held_dir(pool, r);
    std::fs::create_dir_all(&dir)?;
    for n in names(r) {
        journal::move_if_present(
            &pool.join(format!("{n}.lun")),
            &dir.join(format!("{n}.lun")),
        )?;
        journal::move_if_present(
            &pool.join(format!("{n}.layers")),
            &dir.join(format!("{n}.layers")),
        )?;
    }
    journal::sync_dir(pool)
}

/// Put held LUN files back into the pool (the migration's directory stays).
fn move_back(pool: &Path, r: &Record) -> std::io::Result<()> {
    let dir = held_dir(pool, r);
    for n in names(r) {
        journal::move_if_present(
            &dir.join(format!("{n}.layers")),
            &pool.join(format!("{n}.layers")),
        )?;
        journal::move_if_present(
            &dir.join(format!("{n}.lun")),
            &pool.join(format!("{n}.lun")),
        )?;
    }
    journal::sync_dir(pool)
}

fn unhold(pool: &Path, r: &Record) -> std::io::Result<()> {
    move_back(pool, r)?;
    journal::remove_own_dir(&Record::dir(pool, r.id))
}

/// Retire the LUN files (held or still in the pool) of a migration that
/// committed. Nothing serves them meanwhile: this runs before the pools
/// are served, or on files the registry does not know.
fn retire(pool: &Path, r: &Record) -> std::io::Result<Option<PathBuf>> {
    move_back(pool, r)?;
    let kept = super::source::retire(pool, r.id, &names(r), r.keep_source)?;
    journal::remove_own_dir(&Record::dir(pool, r.id))?;
    Ok(kept)
}

async fn ask(settings: &Settings, r: &Record) -> Option<MigrationState> {
    if r.peer == "local" {
        return Some(local_state(settings, r.id));
    }
    if let Some(target) = r.peer.strip_prefix("local:") {
        // A move between two pools of this host: the target pool's records
        // decide, whether or not this gateway serves that pool now.
        let target = Path::new(target);
        let pools = settings
            .pools
            .iter()
            .map(PathBuf::as_path)
            .chain(std::iter::once(target));
        return Some(local_state_in(pools, r.id));
    }
    match super::source::query(settings, &r.peer, r.id).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(migration = %r.id, target = %r.peer, "cannot ask the target whether it committed: {e}");
            None
        }
    }
}

/// Apply `state` to an outgoing record in doubt; `true` when resolved.
fn settle(pool: &Path, r: &Record, state: MigrationState) -> bool {
    let res = match state {
        MigrationState::Committed => retire(pool, r).map(|kept| {
            tracing::warn!(migration = %r.id, target = %r.peer, kept = ?kept,
                "the target committed before the crash: the LUNs are its now; the copy here is retired");
        }),
        MigrationState::Unknown => unhold(pool, r).map(|()| {
            tracing::warn!(migration = %r.id, target = %r.peer,
                "the target did not commit: the LUNs stay here");
        }),
    };
    match res.and_then(|()| r.remove(pool)) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(migration = %r.id, "cannot settle the migration ({e}); the LUNs stay unserved");
            false
        }
    }
}

/// Recover every pool's migrations; returns the ones still in doubt (their
/// LUNs are held out of the pool).
pub async fn at_start(settings: &Settings) -> Vec<Held> {
    for pool in &settings.pools {
        for r in Record::list(pool).into_iter().filter(|r| !r.outgoing) {
            match r.state {
                State::Staged => {
                    tracing::warn!(migration = %r.id, pool = %pool.display(), "an incoming migration never committed: removing its staging area");
                    let _ = journal::remove_own_dir(&Record::dir(pool, r.id));
                    let _ = r.remove(pool);
                }
                State::Committed => {
                    let stage = Record::dir(pool, r.id);
                    if stage.exists() {
                        tracing::warn!(migration = %r.id, pool = %pool.display(), "an incoming migration committed: moving its LUNs into the pool");
                        if let Err(e) = super::target::move_into_pool(pool, &stage, &names(&r)) {
                            tracing::error!(migration = %r.id, "cannot move the committed LUNs into the pool: {e}");
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut held = Vec::new();
    for pool in &settings.pools {
        for r in Record::list(pool).into_iter().filter(|r| r.outgoing) {
            match r.state {
                State::Copying => {
                    tracing::warn!(migration = %r.id, pool = %pool.display(), "an outgoing migration was interrupted before its commit: the LUNs stay here");
                    let _ = journal::remove_own_dir(&Record::dir(pool, r.id));
                    let _ = r.remove(pool);
                }
                State::Switching | State::Held => {
                    let mut state = None;
                    for _ in 0..3 {
                        state = ask(settings, &r).await;
                        if state.is_some() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    match state {
                        Some(s) => {
                            settle(pool, &r, s);
                        }
                        None => {
                            let mut r = r;
                            match hold(pool, &r).and_then(|()| r.set(pool, State::Held)) {
                                Ok(()) => tracing::error!(migration = %r.id, target = %r.peer,
                                    "in doubt: the target cannot say whether it committed; the LUNs are held unserved until it does"),
                                Err(e) => {
                                    tracing::error!(migration = %r.id, "cannot hold the LUNs: {e}")
                                }
                            }
                            held.push(Held {
                                pool: pool.clone(),
                                record: r,
                            });
                        }
                    }
                }
                _ => {}
            }
        }
    }
    held
}

/// Keep asking about held migrations until each is settled; LUNs that
/// stay here are served again.
pub async fn resolve_held(reg: Arc<Registry>, mut held: Vec<Held>) {
    let Some(settings) = reg.migrate.settings().cloned() else {
        return;
    };
    while !held.is_empty() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut left = Vec::new();
        for h in held {
            match ask(&settings, &h.record).await {
                Some(s) if settle(&h.pool, &h.record, s) => {
                    if s == MigrationState::Unknown {
                        for n in names(&h.record) {
                            let path = h.pool.join(format!("{n}.lun"));
                            match ServedLun::open(
                                &path,
                                reg.read_only,
                                reg.control.as_deref(),
                                reg.switch_stats.clone(),
                                &settings.engine,
                            ) {
                                Ok(l) => match reg.adopt(Arc::new(l)) {
                                    Ok(e) => tracing::info!(lun = %n, exports = ?e, "served again"),
                                    Err(e) => tracing::error!(lun = %n, "not served: {e}"),
                                },
                                Err(e) => tracing::error!(lun = %n, "not served: {e}"),
                            }
                        }
                    }
                }
                _ => left.push(h),
            }
        }
        held = left;
    }
}
