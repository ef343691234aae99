//! A planned handover: RBD LUNs change owner between two gateways of one
//! Ceph cluster, coordinated through etcd, with no data copy and no failed
//! request (docs/scale-out.md). It is the migration protocol without the
//! copy: the same connection, authentication and admission, the same pause
//! of every member's gate, the same forwarding of the source's connections
//! to the new owner.
//!
//! ```text
//!  source (owner in etcd)                                  target
//!  Hello / Welcome, Prepare{handover: images} ───────────▶ admission: the
//!                                 ◀─────────────────────── pool, no such LUN
//!                     Permitted{owner: its etcd value, lease}   here, policy
//!  pause every member's gate (drain, park new requests),
//!  flush, release each image's RBD exclusive lock
//!  Release                        ───────────────────────▶ open the images
//!                                 ◀─────────────────────── (locks taken),
//!                                  Locked{fences}           not served yet
//!  etcd txn: if every LUN key is still ours, give them to the
//!  target's lease and record its lock owners as the fence keys
//!  (the commit point)
//!  HandedOver                     ───────────────────────▶ serve them
//!                                 ◀─────────────────────── Complete{exports}
//!  swap each gate's layer to an NBD client of the target's exports,
//!  drop our exports, resume: parked requests go to the target in order
//!  Ops / OpsDone, Finish / Ack (as a migration)
//! ```
//!
//! Ownership is the etcd transaction. Before it the source owns the LUNs:
//! on a refusal, an error or a timeout it takes its locks back (the target
//! closes its images on `Abort` or when the connection drops; a lock still
//! held after the step timeout is broken, since etcd names the source) and
//! resumes its gates. After it the target does: a target that loses the
//! source after `Locked` asks etcd, and serves the LUNs if their keys are
//! its own; if it dies instead, its lease expires and the LUNs fail over
//! like any other (its recorded lock owner is fenced).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lun_manager::backing::LockOp;
use lungate_api::etcd::image_id;
use lungate_api::migrate::{Denial, EtcdOwner, Frame, Member, Message, Prepare, Role};
use lungate_api::types::{Direction, MigrationPhase};
use lungate_block::device::BlockDevice;
use lungate_block::volume::VolumeDevice;
use uuid::Uuid;

use super::protocol::{describe, Link};
use super::source::{self, Destination, Request};
use super::transfer::link_err;
use super::{MigrateError, OpQueue, Settings, Tracked};
use crate::coordinator::Coordinator;
use crate::registry::Registry;
use crate::served::ServedLun;
use crate::switch::Paused;

// ----- the source ----------------------------------------------------------

/// Start handing `l`'s VM (its consistency group, every member an RBD LUN)
/// over to the gateway at `req.to`; it runs in the background.
pub(super) async fn start(
    reg: &Arc<Registry>,
    l: &Arc<ServedLun>,
    req: Request,
    settings: Arc<Settings>,
) -> Result<Arc<Tracked>, MigrateError> {
    let Destination::Remote(to) = &req.to else {
        return Err(MigrateError::Refused(format!(
            "{} is an RBD LUN: its pool is the cluster's, so there is no other pool of this gateway to move it to",
            l.lun.name()
        )));
    };
    let coord = Coordinator::current().ok_or_else(|| {
        MigrateError::Refused(format!(
            "{} is an RBD LUN: it moves to another gateway by a handover, which needs both gateways \
             on one etcd (lungate serve --coordinator etcd://HOST:PORT)",
            l.lun.name()
        ))
    })?;
    let group =
        crate::control::ops::members(reg, l).map_err(|e| MigrateError::Refused(e.to_string()))?;
    if let Some(f) = group.iter().find(|m| m.lun.file().is_some()) {
        return Err(MigrateError::Refused(format!(
            "{}: its secondary disk {} is a file LUN, which cannot be handed over with RBD disks; \
             move the group to one kind of store first",
            l.lun.name(),
            f.lun.name()
        )));
    }
    // The tree lives in the images: nothing but the shape travels.
    let members: Vec<Member> = group
        .iter()
        .enumerate()
        .map(|(i, m)| {
            source::shape(
                m,
                if i == 0 {
                    Role::Primary
                } else {
                    Role::Secondary
                },
            )
        })
        .collect();
    let id = Uuid::new_v4();
    let queue: OpQueue = Arc::new(Mutex::new(Vec::new()));
    let order = source::in_key_order(group.iter());
    source::mark_moving(&order, id, &queue).await?;
    let tracked = reg
        .migrate
        .track(id, l.lun.name(), Direction::Outgoing, to, req.downtime_ms);
    tracked.update(|i| i.members = members.iter().map(|m| m.name.clone()).collect());
    let pool = lungate_block::store::file::parent_dir(l.lun.path());
    let prepare = Prepare {
        migration: id,
        pool: Some(pool.display().to_string()),
        policy: source::policy_of(l),
        members,
        replica: false,
        handover: Some(
            group
                .iter()
                .map(|m| m.lun.path().display().to_string())
                .collect(),
        ),
    };
    let job = Handover {
        reg: reg.clone(),
        settings,
        coord,
        tracked: tracked.clone(),
        to: to.clone(),
        token: req.token.clone(),
        hold: req.hold,
        luns: group,
        prepare,
        queue,
    };
    tokio::spawn(job.run());
    Ok(tracked)
}

struct Handover {
    reg: Arc<Registry>,
    settings: Arc<Settings>,
    coord: Arc<Coordinator>,
    tracked: Arc<Tracked>,
    to: String,
    token: Option<String>,
    /// Wait for the release before the pause, at most this long.
    hold: Option<Duration>,
    /// The group, primary first (the order of `prepare.members`).
    luns: Vec<Arc<ServedLun>>,
    prepare: Prepare,
    queue: OpQueue,
}

/// How far a failed handover got.
struct Undo {
    error: MigrateError,
    /// The members whose locks were released (indices into `luns`).
    released: Vec<usize>,
    /// The target's lock owners, once it said it holds the locks.
    fences: Vec<String>,
}

impl Handover {
    fn paths(&self) -> Vec<PathBuf> {
        self.luns
            .iter()
            .map(|l| l.lun.path().to_path_buf())
            .collect()
    }

    async fn run(self) {
        let id = self.prepare.migration;
        let name = self.prepare.members[0].name.clone();
        tracing::info!(migration = %id, lun = %name, to = %self.to, "handover started");
        let mut paused: Vec<(usize, Paused)> = Vec::new();
        let mut link = None;
        let r = self.hand_over(&mut paused, &mut link).await;
        let undo = match r {
            Ok(()) => return,
            Err(u) => u,
        };
        if let Some(l) = link.as_mut() {
            let _ = l
                .send_msg(Message::Abort {
                    reason: undo.error.to_string(),
                })
                .await;
        }
        drop(link);
        self.take_locks_back(&undo).await;
        let us = paused.into_iter().map(|(_, p)| p.resume()).max();
        source::resume_here(&self.reg, self.luns.iter(), &self.queue).await;
        let phase = match undo.error {
            MigrateError::Aborted(_) | MigrateError::Denied(_) => MigrationPhase::Aborted,
            _ => MigrationPhase::Failed,
        };
        tracing::warn!(migration = %id, lun = %name, pause_us = ?us, "handover ended, the source keeps serving: {}", undo.error);
        self.tracked.finish(phase, Some(undo.error.to_string()));
    }

    /// Take the released locks back (the LUNs' keys are still ours). The
    /// target closes its images when it gets `Abort` or loses the
    /// connection; a lock it still holds after the step timeout is
    /// broken, which blocklists its client (etcd names this gateway).
    async fn take_locks_back(&self, undo: &Undo) {
        let deadline = Instant::now() + self.settings.timeout;
        for &i in &undo.released {
            let l = self.luns[i].clone();
            loop {
                let l2 = l.clone();
                let r = tokio::task::spawn_blocking(move || {
                    l2.lun.backing().rbd_lock(&LockOp::Acquire)
                })
                .await;
                match r {
                    Ok(Some(Ok(()))) | Ok(None) => break,
                    Ok(Some(Err(e))) if Instant::now() < deadline => {
                        tracing::warn!(lun = %l.lun.name(), "taking the RBD lock back: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    other => {
                        tracing::error!(lun = %l.lun.name(), result = ?other.map(|o| o.map(|r| r.map_err(|e| e.to_string()))),
                            "the RBD lock is still held elsewhere after the handover was aborted; breaking it (this gateway owns the LUN in etcd)");
                        let l2 = l.clone();
                        let fences = undo.fences.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            let owners = l2.lun.backing().rbd_lock_owners();
                            // Only actual holders: normally the target,
                            // whose lock owner it reported in `Locked`.
                            for o in owners.and_then(Result::ok).unwrap_or_default() {
                                if !fences.contains(&o) {
                                    tracing::warn!(lun = %l2.lun.name(), owner = %o, "the RBD lock is held by a client the target did not report");
                                }
                                let _ = l2.lun.backing().rbd_lock(&LockOp::Break(o));
                            }
                            l2.lun.backing().rbd_lock(&LockOp::Acquire)
                        })
                        .await;
                        break;
                    }
                }
            }
        }
    }

    async fn hand_over(
        &self,
        paused: &mut Vec<(usize, Paused)>,
        link_out: &mut Option<Link>,
    ) -> Result<(), Undo> {
        let t = self.settings.timeout;
        let mut released: Vec<usize> = Vec::new();
        let mut fences: Vec<String> = Vec::new();
        macro_rules! fail {
            ($e:expr) => {
                return Err(Undo {
                    error: $e,
                    released,
                    fences,
                })
            };
        }
        let mut link = match super::listen::connect(&self.settings, &self.to).await {
            Ok(l) => l,
            Err(e) => fail!(e),
        };
        let token = self.token.clone().or_else(|| self.settings.token.clone());
        if let Err(e) = source::hello(&mut link, &self.settings, token, t).await {
            fail!(e)
        }
        if let Err(e) = link
            .send_msg(Message::Prepare(Box::new(self.prepare.clone())))
            .await
        {
            fail!(link_err(e))
        }
        let answer = link.recv_msg(t, "permitted").await;
        *link_out = Some(link);
        let link = link_out.as_mut().expect("just set");
        let (nbd, owner) = match answer {
            Ok(Message::Permitted {
                nbd_port,
                nbd_tls,
                owner: Some(o),
            }) => ((nbd_port, nbd_tls), o),
            Ok(Message::Permitted { owner: None, .. }) => fail!(MigrateError::Failed(
                "the target answered without its etcd identity (it does not do handovers)".into()
            )),
            Ok(Message::Denied { denial }) => fail!(MigrateError::Denied(denial)),
            Ok(Message::Failed { error }) => {
                fail!(MigrateError::Failed(format!("the target: {error}")))
            }
            Ok(m) => fail!(MigrateError::Failed(format!(
                "the target answered {}",
                describe(&Frame::Message(m))
            ))),
            Err(e) => fail!(link_err(e)),
        };
        self.settings.stall.at("prepared").await;
        // Nothing to copy, so a hold only waits (vmm-shim writes the
        // guest's last state meanwhile).
        if let Some(limit) = self.hold {
            self.tracked.update(|i| i.held = true);
            let released = tokio::select! {
                _ = self.tracked.release.cancelled() => true,
                _ = self.tracked.abort.cancelled() => false,
                _ = tokio::time::sleep(limit) => false,
            };
            self.tracked.update(|i| i.held = false);
            if !released {
                let why = if self.tracked.abort.is_cancelled() {
                    MigrateError::Aborted("aborted by request".into())
                } else {
                    MigrateError::Failed(format!(
                        "held for {} ms and not released (POST /v1/migrations/{}/release)",
                        limit.as_millis(),
                        self.prepare.migration
                    ))
                };
                fail!(why);
            }
        }
        // The switch: record writers finish first, then every gate parks.
        self.tracked.update(|i| i.phase = MigrationPhase::Switching);
        let order: Vec<usize> = {
            let mut o: Vec<usize> = (0..self.luns.len()).collect();
            o.sort_by(|a, b| self.luns[*a].key.cmp(&self.luns[*b].key));
            o
        };
        let mut held = Vec::new();
        for &i in &order {
            held.push(self.luns[i].maintenance.lock().await);
        }
        for &i in &order {
            paused.push((i, self.luns[i].pause().await));
        }
        let paused_at = Instant::now();
        self.settings.stall.at("paused").await;
        // Every write answered so far is durable in the cluster before
        // another client may write the image.
        for l in &self.luns {
            if let Err(e) = VolumeDevice::new(l.volume().clone()).flush().await {
                fail!(MigrateError::Failed(format!(
                    "{}: flush before the handover: {e}",
                    l.lun.name()
                )))
            }
        }
        let flushed_us = paused_at.elapsed().as_micros() as u64;
        for (i, l) in self.luns.iter().enumerate() {
            let l2 = l.clone();
            let r =
                tokio::task::spawn_blocking(move || l2.lun.backing().rbd_lock(&LockOp::Release))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()));
            match r {
                Ok(Some(Ok(()))) => released.push(i),
                Ok(Some(Err(e))) | Err(e) => fail!(MigrateError::Failed(format!(
                    "{}: release the RBD lock: {e}",
                    l.lun.name()
                ))),
                Ok(None) => fail!(MigrateError::Failed(format!(
                    "{} has no RBD image",
                    l.lun.name()
                ))),
            }
        }
        let released_us = paused_at.elapsed().as_micros() as u64;
        if let Err(e) = link.send_msg(Message::Release).await {
            fail!(link_err(e))
        }
        match link.recv_msg(t, "locked").await {
            Ok(Message::Locked { fences: f }) if f.len() == self.luns.len() => fences = f,
            Ok(Message::Failed { error }) => fail!(MigrateError::Failed(format!(
                "the target could not take the images: {error}"
            ))),
            Ok(m) => fail!(MigrateError::Failed(format!(
                "the target answered the release with {}",
                describe(&Frame::Message(m))
            ))),
            Err(e) => fail!(link_err(e)),
        }
        let locked_us = paused_at.elapsed().as_micros() as u64;
        self.settings.stall.at("committing").await;
        if self.tracked.abort.is_cancelled() {
            fail!(MigrateError::Aborted("aborted by request".into()))
        }
        // The commit point.
        let paths = self.paths();
        match self.commit(&paths, &owner, &fences).await {
            Ok(true) => {}
            Ok(false) => fail!(MigrateError::Failed(
                "the commit transaction found a LUN key that is not this gateway's".into()
            )),
            Err(e) => fail!(e),
        }
        let committed_us = paused_at.elapsed().as_micros() as u64;
        tracing::info!(migration = %self.prepare.migration, flushed_us, released_us, locked_us, committed_us, "handover committed in etcd; the target owns the LUNs");
        // From here on the target owns the LUNs, whatever it answers.
        for l in &self.luns {
            l.volume().disown();
        }
        let served = match link.send_msg(Message::HandedOver).await {
            Ok(()) => link.recv_msg(t, "complete").await,
            Err(e) => Err(e),
        };
        match served {
            Ok(Message::Complete { .. }) => {}
            other => {
                tracing::error!(migration = %self.prepare.migration, answer = ?other.map(|m| describe(&Frame::Message(m))),
                    "the target did not confirm it serves the LUNs; it owns them in etcd, forwarding there anyway")
            }
        }
        let mut devices: Vec<Arc<dyn BlockDevice>> = Vec::new();
        for (m, l) in self.prepare.members.iter().zip(&self.luns) {
            devices.push(self.forwarder(m, l, nbd).await);
        }
        let forwarding_us = paused_at.elapsed().as_micros() as u64;
        let mut parked = 0;
        for (i, p) in paused.iter() {
            let l = &self.luns[*i];
            parked += p.held();
            l.swap_below(p, devices[*i].clone());
            self.reg.retire(l);
            l.migration.moved(self.to.clone());
        }
        let pause_us = std::mem::take(paused)
            .into_iter()
            .map(|(_, p)| p.resume())
            .max()
            .unwrap_or(0);
        drop(held);
        self.tracked.update(|i| {
            i.phase = MigrationPhase::Forwarding;
            i.pause_us = Some(pause_us);
            i.parked = Some(parked);
        });
        tracing::info!(migration = %self.prepare.migration, pause_us, parked, committed_us, forwarding_us,
            "handover done; forwarding this gateway's connections to the new owner");
        let n = source::run_queued_on_target(link, &self.queue, t, self.prepare.migration).await;
        self.tracked.update(|i| i.queued_ops = n);
        let acked = match link.send_msg(Message::Finish).await {
            Ok(()) => matches!(link.recv_msg(t, "ack").await, Ok(Message::Ack)),
            Err(_) => false,
        };
        if !acked {
            tracing::warn!(migration = %self.prepare.migration, "the target did not acknowledge the end (it owns the LUNs anyway)");
        }
        self.tracked.finish(MigrationPhase::Done, None);
        Ok(())
    }

    /// The etcd transaction; when etcd does not answer, ask it until it
    /// says who owns the keys (the guests stay paused meanwhile).
    async fn commit(
        &self,
        paths: &[PathBuf],
        to: &EtcdOwner,
        fences: &[String],
    ) -> Result<bool, MigrateError> {
        match self.coord.hand_over(paths, to, fences).await {
            Ok(done) => return Ok(done),
            Err(e) => {
                tracing::error!(migration = %self.prepare.migration, "the commit transaction: {e}; asking etcd who owns the LUNs")
            }
        }
        self.tracked.update(|i| i.phase = MigrationPhase::InDoubt);
        let mut wait = Duration::from_millis(200);
        loop {
            tokio::time::sleep(wait).await;
            match self.coord.holders(paths).await {
                Ok(h) if h.iter().all(|v| v.as_deref() == Some(to.value.as_str())) => {
                    self.coord.hand_over_done(paths);
                    return Ok(true);
                }
                Ok(h) if h.iter().all(|v| self.coord.is_mine(v.as_deref())) => {
                    return Err(MigrateError::Failed(
                        "the commit transaction did not happen (etcd still names this gateway)"
                            .into(),
                    ))
                }
                Ok(h) => {
                    return Err(MigrateError::Failed(format!(
                        "after the commit transaction etcd names other owners: {h:?}"
                    )))
                }
                Err(e) => {
                    tracing::error!(migration = %self.prepare.migration, "etcd: {e}; the guests stay paused until it answers")
                }
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// What takes member `m`'s requests from now on: NBD connections to
    /// the new owner's exports.
    async fn forwarder(
        &self,
        m: &Member,
        l: &Arc<ServedLun>,
        nbd: (Option<u16>, bool),
    ) -> Arc<dyn BlockDevice> {
        source::forwarder_to(
            &self.settings,
            &self.to,
            nbd,
            m,
            &l.lun,
            "was handed over to",
        )
        .await
    }
}

// ----- the target ----------------------------------------------------------

/// Answer a handover (`p.handover` is set) after the source's hello.
pub(super) async fn serve(
    link: &mut Link,
    p: &Prepare,
    reg: &Arc<Registry>,
    settings: &Arc<Settings>,
) -> Result<(), String> {
    let images = p.handover.clone().unwrap_or_default();
    let (coord, paths) = match admit(p, &images, reg, settings) {
        Ok(a) => a,
        Err(d) => {
            tracing::warn!(source = %link.peer, migration = %p.migration, "handover refused: {d}");
            let _ = link.send_msg(Message::Denied { denial: d }).await;
            return Ok(());
        }
    };
    let t = settings.timeout;
    let tracked = reg.migrate.track(
        p.migration,
        &p.members[0].name,
        Direction::Incoming,
        &link.peer,
        0,
    );
    tracked.update(|i| {
        i.members = p.members.iter().map(|m| m.name.clone()).collect();
        i.phase = MigrationPhase::Switching;
    });
    coord.expect(&paths, true);
    let r = take(link, p, reg, settings, &coord, &paths, &tracked).await;
    coord.expect(&paths, false);
    if let Err(e) = &r {
        tracked.finish(MigrationPhase::Aborted, Some(e.clone()));
        return r;
    }
    // Served here: the queued operations, then the end.
    super::target::run_ops_until_finish(link, reg, t * 4, p.migration, &tracked, || {}).await;
    tracing::info!(migration = %p.migration, "handover done");
    tracked.finish(MigrationPhase::Done, None);
    Ok(())
}

/// Everything a handover needs here, or why it cannot come: the local
/// path of every image.
fn admit(
    p: &Prepare,
    images: &[String],
    reg: &Registry,
    settings: &Settings,
) -> Result<(Arc<Coordinator>, Vec<PathBuf>), Denial> {
    let unsupported = |why: &str| Denial::Unsupported { why: why.into() };
    let coord = Coordinator::current()
        .ok_or_else(|| unsupported("this gateway runs without a coordinator (etcd)"))?;
    if reg.read_only {
        return Err(unsupported("this gateway serves read-only"));
    }
    if settings.nbd.get().is_none() {
        return Err(unsupported(
            "this gateway has no TCP NBD listener to take the source's connections",
        ));
    }
    if images.is_empty() || images.len() != p.members.len() {
        return Err(unsupported("the handover lists no image for some LUN"));
    }
    if let Some(pol) = &p.policy {
        if !pol.admits(&settings.name) {
            return Err(Denial::Policy {
                gateway: settings.name.clone(),
            });
        }
    }
    let mut paths = Vec::new();
    for (image, m) in images.iter().zip(&p.members) {
        lun_manager::format::validate_name(&m.name).map_err(|e| unsupported(&e))?;
        let id = image_id(std::path::Path::new(image));
        let (pool_id, _) = id
            .rsplit_once('/')
            .ok_or_else(|| unsupported("an image name without a pool"))?;
        let pool = settings
            .pools
            .iter()
            .find(|pl| lun_manager::backing::is_rbd(pl) && image_id(pl) == pool_id)
            .ok_or_else(|| Denial::NoPool {
                pool: format!("rbd:{pool_id}"),
            })?;
        // The same image, named with this gateway's options (conf, id).
        let path = lun_manager::pool::lun_path(pool, &m.name);
        if image_id(&path) != id {
            return Err(unsupported(&format!(
                "image {id} is not LUN {} of a pool here",
                m.name
            )));
        }
        if reg.find_path(&path).is_some() {
            return Err(Denial::Exists {
                pool: pool.display().to_string(),
                what: "a served LUN".into(),
                value: path.display().to_string(),
            });
        }
        paths.push(path);
    }
    Ok((coord, paths))
}

/// Close images this gateway opened for a handover that did not happen,
/// off the runtime: closing releases the RBD lock, and librbd tells the
/// image's other watchers, waiting out a dead one (seconds).
async fn close(opened: Vec<Arc<ServedLun>>) {
    let _ = tokio::task::spawn_blocking(move || drop(opened)).await;
}

/// From `Permitted` to serving: open and lock the images once the source
/// released them, serve them once etcd names this gateway.
async fn take(
    link: &mut Link,
    p: &Prepare,
    reg: &Arc<Registry>,
    settings: &Arc<Settings>,
    coord: &Arc<Coordinator>,
    paths: &[PathBuf],
    tracked: &Tracked,
) -> Result<(), String> {
    let t = settings.timeout;
    let nbd = settings.nbd.get().copied();
    link.send_msg(Message::Permitted {
        nbd_port: nbd.map(|n| n.0),
        nbd_tls: nbd.is_some_and(|n| n.1),
        owner: Some(coord.owner()),
    })
    .await
    .map_err(|e| e.to_string())?;
    // The source pauses its guests' I/O and flushes first: its maintenance
    // locks may wait for a running tree operation.
    match link.recv_msg(t * 4, "release").await {
        Ok(Message::Release) => {}
        Ok(Message::Abort { reason }) => return Err(format!("aborted by the source: {reason}")),
        Ok(m) => {
            return Err(format!(
                "expected release, got {}",
                describe(&Frame::Message(m))
            ))
        }
        Err(e) => return Err(e.to_string()),
    }
    let t0 = std::time::Instant::now();
    let mut opened: Vec<Arc<ServedLun>> = Vec::new();
    let mut fences = Vec::new();
    for path in paths {
        let (p2, control, stats, engine) = (
            path.clone(),
            reg.control.clone(),
            reg.switch_stats.clone(),
            settings.engine.clone(),
        );
        let r = tokio::task::spawn_blocking(move || {
            ServedLun::open(&p2, false, control.as_deref(), stats, &engine)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        let served = match r {
            Ok(s) => Arc::new(s),
            Err(e) => {
                close(opened).await;
                let e = format!("open {}: {e}", path.display());
                let _ = link.send_msg(Message::Failed { error: e.clone() }).await;
                return Err(e);
            }
        };
        match served.lun.backing().rbd_lock_owners() {
            Some(Ok(o)) if o.len() == 1 => fences.push(o[0].clone()),
            other => {
                opened.push(served);
                close(opened).await;
                let e = format!(
                    "{}: cannot tell this gateway's RBD lock owner: {:?}",
                    path.display(),
                    other.map(|r| r.map_err(|e| e.to_string()))
                );
                let _ = link.send_msg(Message::Failed { error: e.clone() }).await;
                return Err(e);
            }
        }
        opened.push(served);
    }
    tracing::info!(migration = %p.migration, open_us = t0.elapsed().as_micros() as u64, "handover: the images are open and locked here");
    link.send_msg(Message::Locked { fences })
        .await
        .map_err(|e| e.to_string())?;
    let ours = match link.recv_msg(t, "handed-over").await {
        Ok(Message::HandedOver) => true,
        Ok(Message::Abort { reason }) => {
            close(opened).await;
            return Err(format!("aborted by the source: {reason}"));
        }
        other => {
            // The source may have committed and died: etcd knows.
            let why = match other {
                Ok(m) => describe(&Frame::Message(m)),
                Err(e) => e.to_string(),
            };
            let mut answer = None;
            for _ in 0..10 {
                match coord.holders(paths).await {
                    Ok(h) => {
                        answer = Some(h.iter().all(|v| coord.is_mine(v.as_deref())));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(migration = %p.migration, "etcd: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            tracing::warn!(migration = %p.migration, owned_here = ?answer, "the source went away after the release ({why}); etcd decides");
            // Unanswered: close the images; if the keys are ours after
            // all, the claim loop serves the LUNs.
            answer == Some(true)
        }
    };
    if !ours {
        close(opened).await;
        return Err("the source did not hand the LUNs over".into());
    }
    settings.stall.at("committed").await;
    let mut exports = Vec::new();
    for s in &opened {
        coord.adopt(s).await;
        match reg.add(s.clone()) {
            Ok(names) => exports.extend(names),
            Err(e) => {
                tracing::error!(lun = %s.lun.path().display(), "handed over but cannot export: {e}")
            }
        }
    }
    tracing::info!(migration = %p.migration, ?exports, "handover: serving the LUNs (owner in etcd)");
    tracked.update(|i| i.phase = MigrationPhase::Forwarding);
    let _ = link
        .send_msg(Message::Complete {
            exports,
            nbd_port: nbd.map(|n| n.0),
        })
        .await;
    Ok(())
}
