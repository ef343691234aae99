//! The target's side of a migration (see [`super::protocol`] for the
//! sequence): check the source (version, token, allow rules), decide
//! admission (pool, free space, name and UUID clashes, the VM's policy)
//! before anything is created, stage the LUNs under
//! `POOL/.lungate-migrations/ID/`, apply and verify what arrives, and on
//! `Commit` make the LUNs this gateway's: the `committed` record first
//! (the commit point), then the files into the pool, then lock and serve
//! them. Any failure before the commit point removes every file the
//! migration made.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lungate_api::migrate::{Denial, Frame, Member, Message, MigrationState, OpOutcome, Prepare};
use lungate_api::types::{Direction, MigrationPhase};
use lungate_config::Peer;
use tokio_util::sync::CancellationToken;

use super::journal::{self, MemberRec, Record, State};
use super::protocol::{describe, Link, VERSION};
use super::transfer::{Applier, Job, Stage};
use super::{Settings, Tracked};
use crate::registry::Registry;
use crate::served::ServedLun;

/// Who the source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Another gateway, over the network: authenticated, and the LUNs must
    /// not be served here yet.
    Remote,
    /// This gateway, moving LUNs between its own pools: the LUNs are
    /// served here (from the source pool) until the commit.
    Local,
}

/// Answer one migration connection.
pub async fn serve(
    mut link: Link,
    peer: Peer,
    reg: Arc<Registry>,
    mode: Mode,
    stop: CancellationToken,
) {
    let Some(settings) = reg.migrate.settings().cloned() else {
        return;
    };
    let who = link.peer.clone();
    match run(&mut link, &peer, &reg, &settings, mode, &stop).await {
        Ok(()) => {}
        Err(e) => {
            tracing::warn!(source = %who, "incoming migration: {e}");
            let _ = link.send_msg(Message::Failed { error: e }).await;
        }
    }
}

async fn run(
    link: &mut Link,
    peer: &Peer,
    reg: &Arc<Registry>,
    settings: &Arc<Settings>,
    mode: Mode,
    stop: &CancellationToken,
) -> Result<(), String> {
    let t = settings.timeout;
    let hello = link.recv_msg(t, "hello").await.map_err(|e| e.to_string())?;
    let Message::Hello {
        version,
        gateway,
        token,
    } = hello
    else {
        return Err(format!(
            "expected hello, got {}",
            describe(&Frame::Message(hello))
        ));
    };
    let deny = |d: Denial| Message::Denied { denial: d };
    if version != VERSION {
        let _ = link
            .send_msg(deny(Denial::Version {
                target: VERSION,
                sender: version,
            }))
            .await;
        return Ok(());
    }
    if mode == Mode::Remote {
        if let Some(want) = &settings.token {
            let ok = token
                .as_deref()
                .is_some_and(|t| super::listen::same_token(t.as_bytes(), want.as_bytes()));
            if !ok {
                tracing::warn!(source = %link.peer, gateway, "migration refused: missing or wrong token");
                let _ = link.send_msg(deny(Denial::Unauthorized)).await;
                return Ok(());
            }
        }
        if !peer.allowed_by(&settings.allow) {
            tracing::warn!(source = %link.peer, gateway, "migration refused: not in the allow list");
            let _ = link
                .send_msg(deny(Denial::NotAllowed {
                    peer: describe_peer(peer, &link.peer),
                }))
                .await;
            return Ok(());
        }
    }
    link.send_msg(Message::Welcome {
        version: VERSION,
        gateway: settings.name.clone(),
    })
    .await
    .map_err(|e| e.to_string())?;
    let p = match link
        .recv_msg(t, "prepare")
        .await
        .map_err(|e| e.to_string())?
    {
        Message::Query { migration } => {
            let state = query_state(settings, migration);
            tracing::info!(%migration, source = %link.peer, ?state, "migration status asked");
            return link
                .send_msg(Message::Status { migration, state })
                .await
                .map_err(|e| e.to_string());
        }
        Message::Prepare(p) => p,
        m => {
            return Err(format!(
                "expected prepare, got {}",
                describe(&Frame::Message(m))
            ))
        }
    };
    if p.handover.is_some() && mode == Mode::Remote {
        return super::handover::serve(link, &p, reg, settings).await;
    }
    let pool = match admit(&p, reg, settings, mode) {
        Ok(pool) => pool,
        Err(d) => {
            tracing::warn!(source = %link.peer, migration = %p.migration, "migration refused: {d}");
            let _ = link.send_msg(deny(d)).await;
            return Ok(());
        }
    };
    if p.replica && mode == Mode::Remote {
        return super::replicate::receive(link, &p, reg, settings, &pool).await;
    }
    let primary = p.members[0].name.clone();
    let tracked = reg.migrate.track(
        p.migration,
        &primary,
        if mode == Mode::Local {
            Direction::Local
        } else {
            Direction::Incoming
        },
        &link.peer,
        0,
    );
    tracked.update(|i| {
        i.members = p.members.iter().map(|m| m.name.clone()).collect();
        i.bulk_bytes = p.members.iter().map(|m| m.allocated).sum();
        i.phase = MigrationPhase::Copying;
    });
    let mut rec = Record {
        id: p.migration,
        outgoing: false,
        state: State::Staged,
        peer: link.peer.clone(),
        members: p
            .members
            .iter()
            .map(|m| MemberRec {
                name: m.name.clone(),
                uuid: m.uuid,
            })
            .collect(),
        keep_source: false,
        created: super::now_secs(),
    };
    let staged = rec
        .store(&pool)
        .map_err(|e| format!("write the migration record in {}: {e}", pool.display()))
        .and_then(|()| Stage::create(Record::dir(&pool, p.migration), &p.members));
    let stage = match staged {
        Ok(s) => s,
        Err(e) => {
            undo(&pool, &rec);
            tracked.finish(MigrationPhase::Failed, Some(e.clone()));
            return Err(e);
        }
    };
    tracing::info!(migration = %p.migration, source = %link.peer, pool = %pool.display(),
        members = ?rec.members.iter().map(|m| &m.name).collect::<Vec<_>>(), "migration admitted");
    let applier = Applier::start(stage);
    let nbd = settings.nbd.get().copied();
    let permitted = Message::Permitted {
        nbd_port: nbd.map(|n| n.0),
        nbd_tls: nbd.is_some_and(|n| n.1),
        owner: None,
    };
    let r = match link.send_msg(permitted).await {
        Ok(()) => receive(link, &applier, &tracked, settings, stop).await,
        Err(e) => Err(e.to_string()),
    };
    let stage = applier.stop().await;
    let committed = match r {
        Ok(c) => c,
        Err(e) => {
            drop(stage);
            undo(&pool, &rec);
            tracing::warn!(migration = %p.migration, "incoming migration aborted, staging removed: {e}");
            tracked.finish(MigrationPhase::Aborted, Some(e.clone()));
            return Err(e);
        }
    };
    let Some(stage) = stage else {
        undo(&pool, &rec);
        return Err("the applier lost its staging area".into());
    };
    // The commit point: from this record on, the LUNs are ours.
    tracked.update(|i| i.phase = MigrationPhase::Switching);
    let t0 = std::time::Instant::now();
    if let Err(e) = rec.set(&pool, State::Committed) {
        drop(stage);
        undo(&pool, &rec);
        tracked.finish(MigrationPhase::Aborted, Some(e.to_string()));
        return Err(format!("write the commit record: {e}"));
    }
    tracing::info!(migration = %p.migration, tally = %committed, record_us = t0.elapsed().as_micros() as u64, "migration committed");
    settings.stall.at("committed").await;
    let t0 = std::time::Instant::now();
    let exports = match install(&pool, &stage, reg, settings) {
        Ok(e) => e,
        Err(e) => {
            tracked.finish(MigrationPhase::Failed, Some(e.clone()));
            tracing::error!(migration = %p.migration, "committed but cannot serve the LUNs (they are in the pool; a restart serves them): {e}");
            return Err(e);
        }
    };
    tracing::info!(migration = %p.migration, install_us = t0.elapsed().as_micros() as u64, "committed LUNs served");
    link.send_msg(Message::Complete {
        exports,
        nbd_port: nbd.map(|n| n.0),
    })
    .await
    .map_err(|e| e.to_string())?;
    // Out of the guests' pause: the renames into the pool made durable.
    let t0 = std::time::Instant::now();
    match settle_pool(&pool, &stage.dir) {
        Ok(()) => {
            tracing::info!(migration = %p.migration, settle_us = t0.elapsed().as_micros() as u64, "staging directory removed")
        }
        Err(e) => {
            tracing::warn!(migration = %p.migration, "the staging directory stays (recovery removes it): {e}")
        }
    }
    tracked.update(|i| i.phase = MigrationPhase::Forwarding);
    finish(link, reg, settings, &pool, &mut rec, &tracked).await;
    Ok(())
}

fn describe_peer(p: &Peer, addr: &str) -> String {
    if p.cert_names.is_empty() {
        addr.to_string()
    } else {
        format!("{addr} (certificate {})", p.cert_names.join(", "))
    }
}

/// What this gateway knows about migration `id`.
fn query_state(settings: &Settings, id: uuid::Uuid) -> MigrationState {
    let committed = settings.pools.iter().any(|pool| {
        Record::list(pool)
            .iter()
            .any(|r| r.id == id && !r.outgoing && matches!(r.state, State::Committed | State::Done))
    });
    if committed {
        MigrationState::Committed
    } else {
        MigrationState::Unknown
    }
}

/// The admission policy: every reason to refuse, checked before anything
/// is created. Returns the pool the LUNs go to.
fn admit(p: &Prepare, reg: &Registry, settings: &Settings, mode: Mode) -> Result<PathBuf, Denial> {
    let pool = settings
        .pool(p.pool.as_deref())
        .ok_or_else(|| Denial::NoPool {
            pool: p.pool.clone().unwrap_or_else(|| "(the first)".into()),
        })?;
    let pool_name = pool.display().to_string();
    let unsupported = |why: String| Denial::Unsupported { why };
    if reg.read_only {
        return Err(unsupported("this gateway serves read-only".into()));
    }
    if p.members.is_empty() {
        return Err(unsupported("no LUN to migrate".into()));
    }
    if mode == Mode::Remote && settings.nbd.get().is_none() {
        return Err(unsupported(
            "this gateway has no TCP NBD listener to take the source's connections".into(),
        ));
    }
    if let Some(pol) = &p.policy {
        if !pol.admits(&settings.name) {
            return Err(Denial::Policy {
                gateway: settings.name.clone(),
            });
        }
    }
    if settings
        .pools
        .iter()
        .any(|pl| Record::path(pl, p.migration, false).exists())
    {
        return Err(unsupported(format!(
            "migration {} is known here already",
            p.migration
        )));
    }
    let exists = |what: &str, value: String| Denial::Exists {
        pool: pool_name.clone(),
        what: what.into(),
        value,
    };
    let in_pool: Vec<(PathBuf, Option<uuid::Uuid>)> = lun_manager::pool::list_luns(&pool)
        .unwrap_or_default()
        .into_iter()
        .map(|path| {
            let u = lun_manager::Lun::probe_uuid(&path).ok();
            (path, u)
        })
        .collect();
    let mut names = std::collections::HashSet::new();
    for m in &p.members {
        lun_manager::format::validate_name(&m.name).map_err(unsupported)?;
        if !names.insert(m.name.as_str()) {
            return Err(unsupported(format!("LUN {} is listed twice", m.name)));
        }
        check_geometry(m).map_err(unsupported)?;
        let lun = pool.join(format!("{}.lun", m.name));
        let layers = pool.join(format!("{}.layers", m.name));
        if lun.symlink_metadata().is_ok() {
            return Err(exists("a LUN file", lun.display().to_string()));
        }
        if layers.symlink_metadata().is_ok() {
            return Err(exists("a layers directory", layers.display().to_string()));
        }
        if let Some((path, _)) = in_pool.iter().find(|(_, u)| *u == Some(m.uuid)) {
            return Err(exists(
                "LUN UUID",
                format!("{} (in {})", m.uuid, path.display()),
            ));
        }
        // A move between our own pools: the LUN it moves is served here.
        let ours = |l: &Arc<ServedLun>| mode == Mode::Local && l.lun.uuid() == m.uuid;
        if let Some(l) = reg.find(&m.name).filter(|l| !ours(l)) {
            return Err(exists(
                "a served LUN named",
                format!("{} ({})", m.name, l.lun.path().display()),
            ));
        }
        if let Some(l) = reg.find(&m.uuid.to_string()).filter(|l| !ours(l)) {
            return Err(exists(
                "a served LUN with UUID",
                format!("{} ({})", m.uuid, l.lun.path().display()),
            ));
        }
    }
    let needed = p
        .members
        .iter()
        .map(|m| m.allocated)
        .fold(settings.reserve, u64::saturating_add);
    let available = lungate_block::sys::free_space(&pool).unwrap_or(0);
    if needed > available {
        return Err(Denial::NoSpace {
            pool: pool_name,
            needed,
            available,
        });
    }
    Ok(pool)
}

fn check_geometry(m: &Member) -> Result<(), String> {
    let cs = u64::from(m.cluster_size);
    if !cs.is_power_of_two() || !(4096..=2 << 20).contains(&cs) {
        return Err(format!("{}: cluster size {cs}", m.name));
    }
    if m.size == 0 || m.size > m.file_len {
        return Err(format!(
            "{}: a volume of {} bytes in a file of {}",
            m.name, m.size, m.file_len
        ));
    }
    for [a, b] in &m.protected {
        if a >= b || *b > m.size {
            return Err(format!("{}: protected range {a}..{b}", m.name));
        }
    }
    for [i, o, l] in &m.disks {
        if o.checked_add(*l).is_none_or(|e| e > m.size) {
            return Err(format!("{}: disk {i} at {o} + {l}", m.name));
        }
    }
    Ok(())
}

/// Apply what arrives until `Commit`; returns the verified tally.
async fn receive(
    link: &mut Link,
    applier: &Applier,
    tracked: &Tracked,
    settings: &Settings,
    stop: &CancellationToken,
) -> Result<String, String> {
    // A source that goes quiet (it died, the network broke) ends the
    // migration after twice the step timeout.
    let idle = settings.timeout * 2;
    let mut received = 0u64;
    loop {
        let f = link
            .recv_from_source(idle, stop, "the gateway is shutting down")
            .await?;
        match f {
            Frame::Data(ref d) => {
                received += d.payload.len() as u64;
                tracked.update(|i| i.bytes = received);
                applier.send(Job::Frame(f)).await?;
            }
            Frame::Zero { .. } => applier.send(Job::Frame(f)).await?,
            Frame::Message(m) => match m {
                Message::FilesDone { member } => applier.send(Job::FilesDone(member)).await?,
                Message::RoundEnd { round } => {
                    applier.barrier().await?;
                    tracked.update(|i| {
                        i.rounds = round;
                        if round > 0 {
                            i.phase = MigrationPhase::Rounds;
                        }
                    });
                    link.send_msg(Message::RoundDone { round })
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Message::Commit {
                    tally,
                    frames,
                    bytes,
                } => {
                    let t0 = std::time::Instant::now();
                    let (mine, f, b) = applier.close().await?;
                    tracing::info!(
                        close_us = t0.elapsed().as_micros() as u64,
                        "staged volumes flushed and closed"
                    );
                    let mine = mine.digest();
                    if mine != tally || f != frames || b != bytes {
                        return Err(format!(
                            "verification failed: the source sent {frames} frames, {bytes} bytes, tally {tally}; \
                             applied here: {f} frames, {b} bytes, tally {mine}"
                        ));
                    }
                    return Ok(mine);
                }
                Message::Abort { reason } => return Err(format!("the source aborted: {reason}")),
                Message::Failed { error } => return Err(format!("the source failed: {error}")),
                m => {
                    return Err(format!(
                        "unexpected {} during the copy",
                        describe(&Frame::Message(m))
                    ))
                }
            },
        }
    }
}

/// Remove what a migration made (its staging directory) and its record.
fn undo(pool: &Path, rec: &Record) {
    if let Err(e) = journal::remove_own_dir(&Record::dir(pool, rec.id)) {
        tracing::error!(migration = %rec.id, "cannot remove the staging directory: {e}");
    }
    if let Err(e) = rec.remove(pool) {
        tracing::error!(migration = %rec.id, "cannot remove the migration record: {e}");
    }
}

/// Move the committed LUNs from the staging directory into `pool` (safe
/// to repeat after a crash: what is moved already is skipped).
pub fn move_into_pool(pool: &Path, stage_dir: &Path, names: &[String]) -> std::io::Result<()> {
    rename_into_pool(pool, stage_dir, names)?;
    settle_pool(pool, stage_dir)
}

/// The renames of [`move_into_pool`] alone: what the LUNs need to be
/// opened in the pool. Inside the guests' pause the rest
/// ([`settle_pool`]) waits until after `complete`: the `committed`
/// record is durable already, so a crash before the renames are durable
/// is finished by recovery, which moves what is still staged.
fn rename_into_pool(pool: &Path, stage_dir: &Path, names: &[String]) -> std::io::Result<()> {
    // Layers first: a LUN file in the pool is served at the next start,
    // and needs its layers beside it.
    for n in names {
        journal::move_if_present(
            &stage_dir.join(format!("{n}.layers")),
            &pool.join(format!("{n}.layers")),
        )?;
    }
    for n in names {
        journal::move_if_present(
            &stage_dir.join(format!("{n}.lun")),
            &pool.join(format!("{n}.lun")),
        )?;
    }
    Ok(())
}

/// Make the moves into the pool durable and remove the staging directory.
fn settle_pool(pool: &Path, stage_dir: &Path) -> std::io::Result<()> {
    journal::sync_dir(pool)?;
    journal::remove_own_dir(stage_dir)
}

/// Move the committed LUNs into the pool, lock and serve them. Returns
/// the exports added.
fn install(
    pool: &Path,
    stage: &Stage,
    reg: &Arc<Registry>,
    settings: &Settings,
) -> Result<Vec<String>, String> {
    let names: Vec<String> = stage.members.iter().map(|m| m.info.name.clone()).collect();
    let t0 = std::time::Instant::now();
    rename_into_pool(pool, &stage.dir, &names)
        .map_err(|e| format!("move the LUNs into {}: {e}", pool.display()))?;
    let move_us = t0.elapsed().as_micros() as u64;
    let mut exports = Vec::new();
    let (mut open_us, mut adopt_us) = (0, 0);
    for n in &names {
        let path = pool.join(format!("{n}.lun"));
        let t0 = std::time::Instant::now();
        let lun = ServedLun::open(
            &path,
            false,
            reg.control.as_deref(),
            reg.switch_stats.clone(),
            &settings.engine,
        )
        .map_err(|e| e.to_string())?;
        open_us += t0.elapsed().as_micros() as u64;
        let t0 = std::time::Instant::now();
        exports.extend(reg.adopt(Arc::new(lun)).map_err(|e| e.to_string())?);
        adopt_us += t0.elapsed().as_micros() as u64;
    }
    tracing::info!(pool = %pool.display(), ?exports, move_us, open_us, adopt_us, "migrated LUNs served");
    Ok(exports)
}

/// After `Complete`: run the queued operations, wait for the source to
/// retire its copy, acknowledge.
async fn finish(
    link: &mut Link,
    reg: &Arc<Registry>,
    settings: &Settings,
    pool: &Path,
    rec: &mut Record,
    tracked: &Tracked,
) {
    let id = rec.id;
    let done = run_ops_until_finish(link, reg, settings.timeout * 4, id, tracked, || {
        if let Err(e) = rec.set(pool, State::Done) {
            tracing::warn!(migration = %id, "record not marked done: {e}");
        }
    })
    .await;
    if done {
        tracing::info!(migration = %id, "migration done");
    }
    tracked.finish(MigrationPhase::Done, None);
}

/// After the switch, with the LUNs served here: run the control operations
/// the source queued meanwhile, in order, until it says `Finish`, which is
/// answered with `Ack` after `on_finish`. Whether `Finish` came (`false`:
/// the source went away or said something else; the LUNs stay served here
/// either way).
pub(super) async fn run_ops_until_finish(
    link: &mut Link,
    reg: &Arc<Registry>,
    t: std::time::Duration,
    migration: uuid::Uuid,
    tracked: &Tracked,
    on_finish: impl FnOnce(),
) -> bool {
    loop {
        match link.recv_msg(t, "ops or finish").await {
            Ok(Message::Ops { ops }) => {
                let mut results: Vec<OpOutcome> = Vec::new();
                let n = ops.len() as u64;
                for op in ops {
                    results.push(crate::control::run_queued(reg, op).await);
                }
                tracked.update(|i| i.queued_ops = n);
                if link.send_msg(Message::OpsDone { results }).await.is_err() {
                    return false;
                }
            }
            Ok(Message::Finish) => {
                on_finish();
                let _ = link.send_msg(Message::Ack).await;
                return true;
            }
            Ok(m) => {
                tracing::warn!(%migration, "unexpected {} after the switch", describe(&Frame::Message(m)));
                return false;
            }
            Err(e) => {
                tracing::warn!(%migration, "source gone after the switch ({e}); the LUNs are served here");
                return false;
            }
        }
    }
}
