//! The source's side of a migration (see [`super::protocol`] for the
//! sequence): find what moves (the VM's consistency group, and with
//! `--with-dependents` the clones of its layers), queue tree operations
//! from then on, ask the target, copy (frozen files in bulk, the live
//! layer in rounds driven by each volume's dirty tracking until what is
//! left fits the downtime budget), switch inside a pause of every member's
//! gate, forward the connections it had, run the queued operations there
//! and retire its copy.
//!
//! Until the `switching` record is written, any failure, refusal, timeout
//! or `--abort` resumes the gates here (parked requests run on the local
//! volumes as if nothing had happened) and runs the queued operations
//! locally. After it, the source never serves the LUNs again unless the
//! target says it did not commit.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lungate_api::migrate::{
    Frame, LayerFile, Layers, Member, Message, MigrationState, ObjectRef, Prepare, QueuedOp, Role,
};
use lungate_api::records::{Policy, RecordType};
use lungate_api::types::{Direction, MigrationPhase};
use lungate_block::device::BlockDevice;
use lungate_block::volume::dirty::DirtyTracker;
use lungate_block::volume::manifest::{self, Parent};
use lungate_config::Peer;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::converge::Converge;
use super::forward::{NbdConn, RemoteDisk, RemoteLun};
use super::journal::{self, MemberRec, Record, State};
use super::protocol::{describe, Link, VERSION};
use super::transfer::{self, link_err, Sender, Work};
use super::{MigrateError, OpQueue, Settings, Tracked, Waiting};
use crate::registry::Registry;
use crate::served::ServedLun;
use crate::switch::Paused;

/// Where the LUNs go.
#[derive(Debug, Clone)]
pub enum Destination {
    /// Another gateway's migration listener, `HOST:PORT`.
    Remote(String),
    /// Another pool of this gateway.
    Local(PathBuf),
}

/// What `lunctl migrate` asked for.
#[derive(Debug, Clone)]
pub struct Request {
    pub to: Destination,
    pub target_pool: Option<String>,
    pub downtime_ms: u64,
    pub max_rate: Option<u64>,
    pub keep_source: bool,
    pub with_dependents: bool,
    pub token: Option<String>,
    /// Wait before the switch until released, at most this long (see
    /// `MigrateRequest::hold`).
    pub hold: Option<Duration>,
    /// Throttle the guests' writes when the rounds stop shrinking.
    pub auto_converge: bool,
}

/// One LUN that moves, as the source holds it.
pub(super) struct Src {
    lun: Arc<ServedLun>,
    /// Frozen layer files: id, path, length.
    frozen: Vec<(Uuid, PathBuf, u64)>,
    /// The manifest generation when the migration started (tree operations
    /// are queued, so it must not change).
    generation: Option<u64>,
}

fn stored(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.blocks() * 512)
}

/// The served LUNs that move with `l`: its group, and with
/// `with_dependents` every clone of their layers (with their groups).
pub(super) fn collect(
    reg: &Registry,
    l: &Arc<ServedLun>,
    with_dependents: bool,
) -> Result<Vec<(Arc<ServedLun>, Role)>, MigrateError> {
    let group =
        crate::control::ops::members(reg, l).map_err(|e| MigrateError::Refused(e.to_string()))?;
    let mut out: Vec<(Arc<ServedLun>, Role)> = group
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            (
                m,
                if i == 0 {
                    Role::Primary
                } else {
                    Role::Secondary
                },
            )
        })
        .collect();
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mut i = 0;
    while i < out.len() {
        if out[i].0.lun.file().is_none() {
            // The copy streams the LUN file; an RBD image is already shared
            // by every gateway of its cluster (docs/scale-out.md).
            return Err(MigrateError::Refused(format!(
                "{} is an RBD LUN: it moves between gateways by a coordinated handover, not a copying migration",
                out[i].0.lun.name()
            )));
        }
        let deps = out[i].0.volume().dependents();
        let mut names = Vec::new();
        for d in deps {
            let d = canon(&d);
            let found = reg
                .luns()
                .into_iter()
                .find(|x| x.volume().is_layered() && canon(x.volume().layers_dir()) == d);
            match found {
                Some(x) if with_dependents => {
                    if !out.iter().any(|(m, _)| Arc::ptr_eq(m, &x)) {
                        let group = crate::control::ops::members(reg, &x)
                            .map_err(|e| MigrateError::Refused(e.to_string()))?;
                        for g in group {
                            if !out.iter().any(|(m, _)| Arc::ptr_eq(m, &g)) {
                                out.push((g, Role::Dependent));
                            }
                        }
                    }
                }
                Some(x) => names.push(x.lun.name().to_string()),
                None if with_dependents => {
                    return Err(MigrateError::Refused(format!(
                        "{}: the clone whose layers are {} is not served by this gateway, so it cannot move along",
                        out[i].0.lun.name(),
                        d.display()
                    )))
                }
                None => names.push(d.display().to_string()),
            }
        }
        if !names.is_empty() {
            return Err(MigrateError::Refused(format!(
                "{} has clones that depend on its layers: {}; migrate them along with --with-dependents, or flatten or delete them first",
                out[i].0.lun.name(),
                names.join(", ")
            )));
        }
        i += 1;
    }
    Ok(out)
}

/// Describe one member for the target, and what the source needs to send it.
pub(super) fn describe_member(
    l: &Arc<ServedLun>,
    role: Role,
    uuids: &[Uuid],
) -> Result<(Member, Src), MigrateError> {
    let lun = &l.lun;
    let v = l.volume();
    let fail = |what: String| MigrateError::Failed(format!("{}: {what}", lun.name()));
    let mut allocated = stored(lun.path());
    let mut frozen = Vec::new();
    let mut generation = None;
    let layers = if v.is_layered() {
        let dir = v.layers_dir().to_path_buf();
        let loaded = manifest::load(&dir)
            .map_err(|e| fail(format!("read its manifest: {e}")))?
            .ok_or_else(|| fail("its layers directory has no manifest".into()))?;
        let m = loaded.manifest;
        generation = Some(loaded.generation);
        let chain = v.chain();
        if chain.first() != Some(&m.top) {
            return Err(fail(
                "its manifest and its volume disagree on the live layer".into(),
            ));
        }
        for rec in &m.layers {
            if let Parent::External { lun: parent, .. } = &rec.parent {
                if !parent.is_some_and(|p| uuids.contains(&p)) {
                    return Err(MigrateError::Refused(format!(
                        "{} is a clone: its layers read through another LUN's ({}), which does not move; \
                         flatten it first, or migrate the LUN it was cloned from with --with-dependents",
                        lun.name(),
                        parent.map_or("unknown".into(), |p| p.to_string())
                    )));
                }
            }
            let path = lungate_block::store::file::delta_path(&dir, rec.id);
            allocated += stored(&path);
            if rec.id != m.top {
                let len = std::fs::metadata(&path)
                    .map_err(|e| fail(format!("{}: {e}", path.display())))?
                    .len();
                frozen.push((rec.id, path, len));
            }
        }
        let json = serde_json::to_string(&m).map_err(|e| fail(e.to_string()))?;
        Some(Layers {
            manifest_blake3: blake3::hash(json.as_bytes()).to_hex().to_string(),
            manifest: json,
            live: m.top,
            live_parent: chain.get(1).copied().unwrap_or(Uuid::nil()),
            frozen: frozen
                .iter()
                .map(|(id, _, len)| LayerFile { id: *id, len: *len })
                .collect(),
        })
    } else {
        None
    };
    let member = Member {
        allocated,
        layers,
        ..shape(l, role)
    };
    Ok((
        member,
        Src {
            lun: l.clone(),
            frozen,
            generation,
        },
    ))
}

/// Member `l` as the target sees it, before its layers and the bytes the
/// copy will write there.
pub(super) fn shape(l: &ServedLun, role: Role) -> Member {
    let (lun, v) = (&l.lun, l.volume());
    Member {
        name: lun.name().to_string(),
        uuid: lun.uuid(),
        role,
        file_len: lun.backing_size(),
        size: v.size(),
        cluster_size: v.cluster_size() as u32,
        protected: v.protected().iter().map(|r| [r.start, r.end]).collect(),
        allocated: 0,
        disks: lun
            .disks()
            .iter()
            .map(|d| [u64::from(d.index), d.offset, d.length])
            .collect(),
        layers: None,
    }
}

pub(super) fn policy_of(l: &ServedLun) -> Option<Policy> {
    let mut h = l.lun.share();
    h.reload_state().ok()?;
    h.record_json::<Policy>(RecordType::Policy, 0)
        .ok()
        .flatten()
}

/// Start migrating `l`'s VM as `req` says; the copy runs in the
/// background. Refusals that need no target (clones depend on it, it
/// moves already, its policy forbids the destination) come back at once.
pub async fn start(
    reg: &Arc<Registry>,
    l: &Arc<ServedLun>,
    req: Request,
) -> Result<Arc<Tracked>, MigrateError> {
    let settings = reg
        .migrate
        .settings()
        .cloned()
        .ok_or_else(|| MigrateError::Invalid("migration is not configured".into()))?;
    if l.read_only {
        return Err(MigrateError::Refused(format!(
            "{} is served read-only",
            l.lun.name()
        )));
    }
    if let Some(to) = l.migration.busy() {
        return Err(MigrateError::Refused(format!("{}: {to}", l.lun.name())));
    }
    let peer = match &req.to {
        Destination::Remote(to) => {
            super::listen::host_port(to)?;
            to.clone()
        }
        Destination::Local(p) => {
            let here = std::fs::canonicalize(lungate_block::store::file::parent_dir(l.lun.path()))
                .unwrap_or_default();
            if std::fs::canonicalize(p).ok() == Some(here) {
                return Err(MigrateError::Invalid(format!(
                    "{} is already in pool {}",
                    l.lun.name(),
                    p.display()
                )));
            }
            p.display().to_string()
        }
    };
    if let (Destination::Remote(to), Some(pol)) = (&req.to, policy_of(l)) {
        if !pol.allows_destination(to) {
            return Err(MigrateError::Refused(format!(
                "{}'s policy does not allow migrating it to {to} (migrate_to: {})",
                l.lun.name(),
                pol.migrate_to.join(", ")
            )));
        }
    }
    if l.lun.file().is_none() {
        // An RBD image is shared by every gateway of its cluster: it
        // changes owner without a copy.
        return super::handover::start(reg, l, req, settings).await;
    }
    let members = collect(reg, l, req.with_dependents)?;
    let uuids: Vec<Uuid> = members.iter().map(|(m, _)| m.lun.uuid()).collect();
    let mut described = Vec::new();
    for (m, role) in &members {
        described.push(describe_member(m, *role, &uuids)?);
    }
    // Tree operations queue from here on; the maintenance locks make sure
    // none is running (or starts) while the state changes.
    let order = in_key_order(members.iter().map(|(m, _)| m));
    let id = Uuid::new_v4();
    let queue: OpQueue = Arc::new(Mutex::new(Vec::new()));
    mark_moving(&order, id, &queue).await?;
    // A tree operation that ran just before the locks were taken may have
    // changed a manifest: describe the members again under the new state.
    let mut described2 = Vec::new();
    for (m, role) in &members {
        match describe_member(m, *role, &uuids) {
            Ok(d) => described2.push(d),
            Err(e) => {
                for m in &order {
                    m.migration.cancel();
                }
                return Err(e);
            }
        }
    }
    drop(described);
    let source_pool = lungate_block::store::file::parent_dir(l.lun.path());
    let rec = Record {
        id,
        outgoing: true,
        state: State::Copying,
        peer: match &req.to {
            Destination::Remote(to) => to.clone(),
            // The target pool is named, so that recovery can read its
            // records even when this gateway no longer serves it.
            Destination::Local(p) => format!("local:{}", p.display()),
        },
        members: members
            .iter()
            .map(|(m, _)| MemberRec {
                name: m.lun.name().to_string(),
                uuid: m.lun.uuid(),
            })
            .collect(),
        keep_source: req.keep_source,
        created: super::now_secs(),
    };
    if let Err(e) = rec.store(&source_pool) {
        for m in &order {
            m.migration.cancel();
        }
        return Err(MigrateError::Failed(format!(
            "write the migration record in {}: {e}",
            source_pool.display()
        )));
    }
    let tracked = reg.migrate.track(
        id,
        l.lun.name(),
        match req.to {
            Destination::Remote(_) => Direction::Outgoing,
            Destination::Local(_) => Direction::Local,
        },
        &peer,
        req.downtime_ms,
    );
    tracked.update(|i| i.auto_converge = req.auto_converge);
    let (members_wire, srcs): (Vec<Member>, Vec<Src>) = described2.into_iter().unzip();
    tracked.update(|i| {
        i.members = members_wire.iter().map(|m| m.name.clone()).collect();
        i.bulk_bytes = members_wire.iter().map(|m| m.allocated).sum();
    });
    let prepare = Prepare {
        migration: id,
        pool: match &req.to {
            Destination::Remote(_) => req.target_pool.clone(),
            Destination::Local(p) => Some(p.display().to_string()),
        },
        policy: policy_of(l),
        members: members_wire,
        replica: false,
        handover: None,
    };
    let job = Job {
        reg: reg.clone(),
        settings,
        tracked: tracked.clone(),
        srcs,
        prepare,
        req,
        queue,
        rec,
        pool: source_pool,
    };
    tokio::spawn(job.run());
    Ok(tracked)
}

/// `luns` sorted by their keys: the order every migration locks and
/// pauses them in.
pub(super) fn in_key_order<'a>(
    luns: impl Iterator<Item = &'a Arc<ServedLun>>,
) -> Vec<&'a Arc<ServedLun>> {
    let mut order: Vec<&Arc<ServedLun>> = luns.collect();
    order.sort_by(|a, b| a.key.cmp(&b.key));
    order
}

/// Mark every LUN of `order` moving (tree operations queue on `queue`
/// from then on), under their maintenance locks so that none is running.
pub(super) async fn mark_moving(
    order: &[&Arc<ServedLun>],
    id: Uuid,
    queue: &OpQueue,
) -> Result<(), MigrateError> {
    let mut held = Vec::new();
    for m in order {
        held.push(m.maintenance.lock().await);
    }
    for (i, m) in order.iter().enumerate() {
        if !m.migration.begin(id, queue.clone()) {
            for n in &order[..i] {
                n.migration.cancel();
            }
            return Err(MigrateError::Refused(format!(
                "{} is being migrated already",
                m.lun.name()
            )));
        }
    }
    Ok(())
}

/// Send the operations queued during a migration to the target, which
/// owns the LUNs now, and answer each waiting caller with its outcome.
/// Returns how many there were.
pub(super) async fn run_queued_on_target(
    link: &mut Link,
    queue: &OpQueue,
    t: Duration,
    id: Uuid,
) -> u64 {
    let waiting: Vec<Waiting> = std::mem::take(&mut *super::lock(queue));
    let n = waiting.len() as u64;
    if n == 0 {
        return 0;
    }
    let ops: Vec<QueuedOp> = waiting.iter().map(|w| w.op.clone()).collect();
    let results = match link.send_msg(Message::Ops { ops }).await {
        Ok(()) => match link.recv_msg(t * 4, "ops-done").await {
            Ok(Message::OpsDone { results }) => results,
            other => {
                tracing::error!(migration = %id, "queued operations not run on the target: {other:?}");
                Vec::new()
            }
        },
        Err(e) => {
            tracing::error!(migration = %id, "queued operations not sent: {e}");
            Vec::new()
        }
    };
    let mut results = results.into_iter();
    for w in waiting {
        let out = results.next().unwrap_or(lungate_api::migrate::OpOutcome {
            status: 502,
            body: serde_json::json!({"error": "the LUN migrated; the operation could not be run on the new owner"}),
        });
        let _ = w.reply.send(out);
    }
    n
}

/// A migration that did not move `luns`: they are no longer moving, and
/// the operations queued meanwhile run here, in order.
pub(super) async fn resume_here<'a>(
    reg: &Arc<Registry>,
    luns: impl Iterator<Item = &'a Arc<ServedLun>>,
    queue: &OpQueue,
) {
    for l in luns {
        l.migration.cancel();
    }
    let waiting: Vec<Waiting> = std::mem::take(&mut *super::lock(queue));
    for w in waiting {
        let out = crate::control::run_queued(reg, w.op).await;
        let _ = w.reply.send(out);
    }
}

/// An outgoing migration, running.
struct Job {
    reg: Arc<Registry>,
    settings: Arc<Settings>,
    tracked: Arc<Tracked>,
    srcs: Vec<Src>,
    prepare: Prepare,
    req: Request,
    queue: OpQueue,
    rec: Record,
    /// The source pool (where the record is).
    pool: PathBuf,
}

/// How far a failed migration got: whether the source may take the LUNs
/// back.
enum Failure {
    /// Before the commit was sent: resume here.
    Resume(MigrateError),
}

/// Estimated cost of the switch beyond the last round's bytes and the
/// target's flush of them (which the last round's round trip measures):
/// the target's commit record and opening and serving the LUNs (7 and
/// 11 ms in a release build under an uncapped writer, docs/migration.md),
/// connecting the forwarding. Part of the downtime budget.
const SWITCH_OVERHEAD: Duration = Duration::from_millis(15);

impl Job {
    async fn run(mut self) {
        let id = self.prepare.migration;
        let name = self.prepare.members[0].name.clone();
        tracing::info!(migration = %id, lun = %name, to = %self.tracked.snapshot().peer, "migration started");
        let mut paused: Vec<Paused> = Vec::new();
        let r = self.copy_and_switch(&mut paused).await;
        match r {
            Ok(()) => {}
            Err(Failure::Resume(e)) => {
                let us = paused.into_iter().map(|p| p.resume()).max();
                self.abort_cleanup(&e).await;
                let phase = match e {
                    MigrateError::Aborted(_) | MigrateError::Denied(_) => MigrationPhase::Aborted,
                    _ => MigrationPhase::Failed,
                };
                tracing::warn!(migration = %id, lun = %name, pause_us = ?us, "migration ended, the source keeps serving: {e}");
                self.tracked.finish(phase, Some(e.to_string()));
            }
        }
    }

    /// Give the LUNs back to the local volumes and run the queued
    /// operations here.
    async fn abort_cleanup(&mut self, _why: &MigrateError) {
        resume_here(&self.reg, self.srcs.iter().map(|s| &s.lun), &self.queue).await;
        if let Err(e) = self.rec.remove(&self.pool) {
            tracing::error!(migration = %self.rec.id, "cannot remove the migration record: {e}");
        }
    }

    fn abort_token(&self) -> CancellationToken {
        self.tracked.abort.clone()
    }

    async fn connect(&self) -> Result<Link, MigrateError> {
        match &self.req.to {
            Destination::Remote(to) => super::listen::connect(&self.settings, to).await,
            Destination::Local(_) => {
                let (a, b) = tokio::io::duplex(4 << 20);
                let reg = self.reg.clone();
                tokio::spawn(async move {
                    super::target::serve(
                        Link::new(b, "this gateway".into()),
                        Peer::default(),
                        reg,
                        super::target::Mode::Local,
                        CancellationToken::new(),
                    )
                    .await
                });
                Ok(Link::new(a, "this gateway".into()))
            }
        }
    }

    async fn copy_and_switch(&mut self, paused: &mut Vec<Paused>) -> Result<(), Failure> {
        let t = self.settings.timeout;
        let abort = self.abort_token();
        let resume = Failure::Resume;
        let mut link = self.connect().await.map_err(resume)?;
        let token = self
            .req
            .token
            .clone()
            .or_else(|| self.settings.token.clone());
        hello(&mut link, &self.settings, token, t)
            .await
            .map_err(resume)?;
        link.send_msg(Message::Prepare(Box::new(self.prepare.clone())))
            .await
            .map_err(|e| resume(link_err(e)))?;
        let nbd = match link.recv_msg(t, "permitted").await {
            Ok(Message::Permitted {
                nbd_port, nbd_tls, ..
            }) => (nbd_port, nbd_tls),
            Ok(Message::Denied { denial }) => return Err(resume(MigrateError::Denied(denial))),
            Ok(Message::Failed { error }) => {
                return Err(resume(MigrateError::Failed(format!("the target: {error}"))))
            }
            Ok(m) => {
                return Err(resume(MigrateError::Failed(format!(
                    "the target answered {}",
                    describe(&Frame::Message(m))
                ))))
            }
            Err(e) => return Err(resume(link_err(e))),
        };
        self.settings.stall.at("prepared").await;
        // Tracking starts before anything of a live volume is read, so
        // every write from now on is in some round.
        let trackers: Vec<DirtyTracker> = self
            .srcs
            .iter()
            .map(|s| s.lun.volume().track_dirty())
            .collect();
        self.tracked.update(|i| i.phase = MigrationPhase::Copying);
        let mut sender = Sender::new(self.req.max_rate);
        let tracked = self.tracked.clone();
        let on_bytes = move |b: u64| tracked.update(|i| i.bytes = b);
        let started = Instant::now();
        // Frozen files, member by member.
        for (i, s) in self.srcs.iter().enumerate() {
            let i = i as u16;
            let m = &self.prepare.members[usize::from(i)];
            // `collect` refused LUNs without a file (RBD).
            let base = s.lun.lun.file().cloned().ok_or_else(|| {
                resume(MigrateError::Failed(format!(
                    "{} has no LUN file to copy",
                    s.lun.lun.name()
                )))
            })?;
            let mut work = Vec::new();
            if m.layers.is_some() {
                work.push(Work::File {
                    object: ObjectRef::base(i),
                    file: base,
                    len: m.file_len,
                });
                for (id, path, len) in &s.frozen {
                    let f = std::fs::File::open(path).map_err(|e| {
                        resume(MigrateError::Failed(format!("{}: {e}", path.display())))
                    })?;
                    work.push(Work::File {
                        object: ObjectRef::layer(i, *id),
                        file: Arc::new(f),
                        len: *len,
                    });
                }
            } else {
                work.push(Work::FileRanges {
                    object: ObjectRef::base(i),
                    file: base,
                    ranges: m.protected.iter().map(|[a, b]| (*a, b - a)).collect(),
                });
            }
            sender
                .pump(&mut link, transfer::read(work), &abort, on_bytes.clone())
                .await
                .map_err(resume)?;
            link.send_msg(Message::FilesDone { member: i })
                .await
                .map_err(|e| resume(link_err(e)))?;
        }
        // Round 0: the live layers' first pass.
        let mut work = Vec::new();
        for (i, s) in self.srcs.iter().enumerate() {
            let v = s.lun.volume().clone();
            let ranges = tokio::task::spawn_blocking({
                let v = v.clone();
                move || transfer::live_clusters(&v)
            })
            .await
            .map_err(|e| resume(MigrateError::Failed(e.to_string())))?
            .map_err(|e| resume(MigrateError::Failed(format!("{}: {e}", s.lun.lun.name()))))?;
            work.push(Work::View {
                object: ObjectRef::view(i as u16),
                volume: v,
                ranges,
            });
        }
        self.tracked
            .update(|i| i.bulk_bytes = sender.bytes + transfer::work_bytes(&work));
        let (live_from, live_t0) = (sender.bytes, Instant::now());
        sender
            .pump(&mut link, transfer::read(work), &abort, on_bytes.clone())
            .await
            .map_err(resume)?;
        let rt0 = Instant::now();
        round_trip(&mut link, 0, t).await.map_err(resume)?;
        // How long the target takes to apply the tail of a round and make
        // it durable: what its commit does first, inside the pause.
        let mut settle = rt0.elapsed();
        let bulk_time = started.elapsed();
        let mut rate = (sender.bytes as f64 / bulk_time.as_secs_f64().max(1e-3)).max(1.0);
        if let Some(m) = self.req.max_rate {
            rate = rate.min(m as f64);
        }
        self.tracked.update(|i| i.rate = rate as u64);
        // The throttle, if the rounds need one, lives as long as `conv`:
        // any failure from here on lifts it on the way out.
        let mut conv = Converge::new(
            self.req.auto_converge,
            self.srcs
                .iter()
                .map(|s| (s.lun.gate.clone(), s.lun.volume().cluster_size()))
                .collect(),
        );
        let dirty = dirty_bytes(&trackers);
        conv.after_round(sender.bytes - live_from, dirty, live_t0.elapsed(), rate);
        self.report_throttle(&conv);
        self.settings.stall.at("copied").await;
        self.tracked.update(|i| i.phase = MigrationPhase::Rounds);
        // Rounds, until what is dirty fits the budget.
        let budget = Duration::from_millis(self.req.downtime_ms);
        let mut round = 0u32;
        // Rounds while held count against the hold's time, not max_rounds.
        let mut held_rounds = 0u32;
        let mut held_since: Option<Instant> = None;
        loop {
            let dirty = dirty_bytes(&trackers);
            let estimate = Duration::from_secs_f64(dirty as f64 / rate) + settle + SWITCH_OVERHEAD;
            self.tracked.update(|i| i.dirty_bytes = dirty);
            if estimate <= budget {
                let Some(limit) = self.req.hold else { break };
                if self.tracked.release.is_cancelled() {
                    self.tracked.update(|i| i.held = false);
                    break;
                }
                let since = *held_since.get_or_insert_with(|| {
                    tracing::info!(migration = %self.rec.id, "migration converged; held until released");
                    Instant::now()
                });
                if since.elapsed() >= limit {
                    return Err(resume(MigrateError::Failed(format!(
                        "held for {} ms and not released (POST /v1/migrations/{}/release)",
                        limit.as_millis(),
                        self.rec.id
                    ))));
                }
                self.tracked.update(|i| i.held = true);
                tokio::select! {
                    _ = self.tracked.release.cancelled() => continue,
                    _ = abort.cancelled() => {
                        return Err(resume(MigrateError::Aborted("aborted by request".into())));
                    }
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                if trackers.iter().all(|t| t.count() == 0) {
                    continue;
                }
                held_rounds += 1;
            } else if round >= self.settings.max_rounds + held_rounds {
                let throttle = match (self.req.auto_converge, conv.min_rate) {
                    (false, _) => "auto-converge is off".to_string(),
                    (true, Some(r)) => format!(
                        "the guests' writes were throttled down to {:.2} MiB/s",
                        r as f64 / (1 << 20) as f64
                    ),
                    (true, None) => {
                        "the rounds kept shrinking, so the writes were not throttled".into()
                    }
                };
                return Err(resume(MigrateError::Failed(format!(
                    "did not converge: after {round} rounds {dirty} bytes are dirty, which at {:.1} MiB/s \
                     would pause the guests for {} ms, over the budget of {} ms ({throttle}); raise \
                     --downtime-ms or --max-rate, or migrate when the guests write less",
                    rate / (1 << 20) as f64,
                    estimate.as_millis(),
                    budget.as_millis()
                ))));
            }
            round += 1;
            conv.round_started();
            let before = sender.bytes;
            let t0 = Instant::now();
            let work = self
                .srcs
                .iter()
                .zip(&trackers)
                .enumerate()
                .map(|(i, (s, tr))| Work::View {
                    object: ObjectRef::view(i as u16),
                    volume: s.lun.volume().clone(),
                    ranges: tr.take(),
                })
                .collect();
            sender
                .pump(&mut link, transfer::read(work), &abort, on_bytes.clone())
                .await
                .map_err(resume)?;
            let rt0 = Instant::now();
            round_trip(&mut link, round, t).await.map_err(resume)?;
            settle = rt0.elapsed();
            let moved = sender.bytes - before;
            if moved >= 4 << 20 {
                rate = moved as f64 / t0.elapsed().as_secs_f64().max(1e-3);
                if let Some(m) = self.req.max_rate {
                    rate = rate.min(m as f64);
                }
            }
            let dirty = dirty_bytes(&trackers);
            if let Some(r) = conv.after_round(moved, dirty, t0.elapsed(), rate) {
                tracing::info!(migration = %self.rec.id, round, sent = moved, dirty,
                    copy_rate = rate as u64, write_rate = r, "rounds not converging: guest writes throttled");
            }
            self.tracked.update(|i| {
                i.rounds = round;
                i.rate = rate as u64;
            });
            self.report_throttle(&conv);
            if round == 1 {
                self.settings.stall.at("rounds").await;
            }
        }
        if abort.is_cancelled() {
            return Err(resume(MigrateError::Aborted("aborted by request".into())));
        }
        self.switch(link, sender, trackers, paused, nbd, conv).await
    }

    /// The throttle's figures, for the progress and the final report.
    fn report_throttle(&self, conv: &Converge) {
        let delayed = conv.delayed();
        self.tracked.update(|i| {
            i.throttle_rate = conv.rate();
            i.throttle_rounds = conv.rounds;
            i.throttle_min_rate = conv.min_rate;
            i.throttled_writes = delayed;
        });
    }

    /// Pause, send the rest, commit, and hand over.
    async fn switch(
        &mut self,
        mut link: Link,
        mut sender: Sender,
        trackers: Vec<DirtyTracker>,
        paused: &mut Vec<Paused>,
        nbd: (Option<u16>, bool),
        mut conv: Converge,
    ) -> Result<(), Failure> {
        let t = self.settings.timeout;
        let resume = Failure::Resume;
        self.tracked.update(|i| i.phase = MigrationPhase::Switching);
        let mut order: Vec<usize> = (0..self.srcs.len()).collect();
        order.sort_by(|a, b| self.srcs[*a].lun.key.cmp(&self.srcs[*b].lun.key));
        // Record writers finish first (they take the maintenance lock);
        // tree operations are queued already.
        let srcs: Vec<Arc<ServedLun>> = self.srcs.iter().map(|s| s.lun.clone()).collect();
        let mut held = Vec::new();
        for &i in &order {
            held.push(srcs[i].maintenance.lock().await);
        }
        // `paused` is in `order`; `slot[i]` finds member i's pause in it.
        let mut slot = vec![0usize; srcs.len()];
        for (k, &i) in order.iter().enumerate() {
            paused.push(srcs[i].pause().await);
            slot[i] = k;
        }
        let paused_at = Instant::now();
        // Writes the throttle still delays now park in the holding queue,
        // behind the ones parked already.
        conv.lift();
        self.report_throttle(&conv);
        self.settings.stall.at("paused").await;
        for (s, _) in self.srcs.iter().zip(&self.prepare.members) {
            if let Some(g) = s.generation {
                let now = manifest::load(s.lun.volume().layers_dir())
                    .ok()
                    .flatten()
                    .map(|l| l.generation);
                if now != Some(g) {
                    return Err(resume(MigrateError::Failed(format!(
                        "{}: its snapshot tree changed during the migration",
                        s.lun.lun.name()
                    ))));
                }
            }
        }
        // The switching record is written while the last round goes out
        // (both inside the pause, before the commit): from it on the
        // source does not serve the LUNs without asking the target first.
        let record = tokio::task::spawn_blocking({
            let (mut rec, pool) = (self.rec.clone(), self.pool.clone());
            move || rec.set(&pool, State::Switching)
        });
        let abort = CancellationToken::new();
        let work = self
            .srcs
            .iter()
            .zip(&trackers)
            .enumerate()
            .map(|(i, (s, tr))| Work::View {
                object: ObjectRef::view(i as u16),
                volume: s.lun.volume().clone(),
                ranges: tr.take(),
            })
            .collect();
        let tracked = self.tracked.clone();
        let pumped = sender
            .pump(&mut link, transfer::read(work), &abort, move |b| {
                tracked.update(|i| i.bytes = b)
            })
            .await;
        drop(trackers);
        let recorded = match record.await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let failed = match (pumped, recorded) {
            (Err(e), _) => Some(e),
            (Ok(_), Err(e)) => Some(MigrateError::Failed(format!(
                "write the switching record: {e}"
            ))),
            (Ok(_), Ok(())) if self.tracked.abort.is_cancelled() => {
                Some(MigrateError::Aborted("aborted by request".into()))
            }
            (Ok(_), Ok(())) => None,
        };
        if let Some(e) = failed {
            // No commit was sent: the LUNs stay here.
            let _ = self.rec.set(&self.pool, State::Copying);
            return Err(resume(e));
        }
        self.rec.state = State::Switching;
        self.settings.stall.at("committing").await;
        let sent_us = paused_at.elapsed().as_micros() as u64;
        let commit = Message::Commit {
            tally: sender.tally.digest(),
            frames: sender.frames,
            bytes: sender.bytes,
        };
        let answer = match link.send_msg(commit).await {
            Ok(()) => link.recv_msg(t, "complete").await,
            Err(e) => Err(e),
        };
        let exports = match answer {
            Ok(Message::Complete { exports, .. }) => Some(exports),
            // The target answers `failed` only before its commit record.
            Ok(Message::Failed { error }) => {
                let _ = self.rec.set(&self.pool, State::Copying);
                return Err(resume(MigrateError::Failed(format!(
                    "the target did not commit: {error}"
                ))));
            }
            Ok(m) => {
                tracing::error!(migration = %self.rec.id, "the target answered the commit with {}", describe(&Frame::Message(m)));
                None
            }
            Err(e) => {
                tracing::error!(migration = %self.rec.id, "no answer to the commit: {e}; asking the target");
                None
            }
        };
        let committed = match exports {
            Some(_) => true,
            None => {
                self.tracked.update(|i| i.phase = MigrationPhase::InDoubt);
                self.resolve().await
            }
        };
        if !committed {
            let _ = self.rec.set(&self.pool, State::Copying);
            return Err(resume(MigrateError::Failed(
                "the target did not commit (it says so after the connection was lost)".into(),
            )));
        }
        // Committed: the target owns the LUNs.
        let committed_us = paused_at.elapsed().as_micros() as u64;
        let devices = self.forwarders(nbd).await;
        let forwarding_us = paused_at.elapsed().as_micros() as u64;
        let to = self.tracked.snapshot().peer;
        let mut parked = 0;
        for (i, s) in self.srcs.iter().enumerate() {
            let p = &paused[slot[i]];
            parked += p.held();
            s.lun.swap_below(p, devices[i].clone());
            self.reg.retire(&s.lun);
            s.lun.migration.moved(to.clone());
        }
        let pause_us = std::mem::take(paused)
            .into_iter()
            .map(|p| p.resume())
            .max()
            .unwrap_or(0);
        drop(held);
        self.tracked.update(|i| {
            i.phase = MigrationPhase::Forwarding;
            i.pause_us = Some(pause_us);
            i.parked = Some(parked);
        });
        tracing::info!(migration = %self.rec.id, pause_us, parked, bytes = sender.bytes,
            rounds = self.tracked.snapshot().rounds, sent_us, committed_us, forwarding_us, "migration committed; forwarding to the new owner");
        self.finish(link).await;
        Ok(())
    }

    /// In doubt after the commit: ask the target until it answers.
    async fn resolve(&self) -> bool {
        let to = match &self.req.to {
            Destination::Remote(to) => to.clone(),
            // In-process: the target's record is in one of our pools.
            Destination::Local(_) => {
                return super::recover::local_state(&self.settings, self.rec.id)
                    == MigrationState::Committed
            }
        };
        let mut wait = Duration::from_millis(200);
        loop {
            match query(&self.settings, &to, self.rec.id).await {
                Ok(s) => {
                    tracing::warn!(migration = %self.rec.id, state = ?s, "the target answered the status query");
                    return s == MigrationState::Committed;
                }
                Err(e) => {
                    tracing::error!(migration = %self.rec.id, "status query to {to} failed ({e}); guests stay paused until it answers");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// The devices that take each member's requests from now on.
    async fn forwarders(&self, nbd: (Option<u16>, bool)) -> Vec<Arc<dyn BlockDevice>> {
        let mut out: Vec<Arc<dyn BlockDevice>> = Vec::new();
        for (m, s) in self.prepare.members.iter().zip(&self.srcs) {
            let dev: Arc<dyn BlockDevice> = match &self.req.to {
                Destination::Local(pool) => {
                    let path = pool.join(format!("{}.lun", m.name));
                    match self.reg.find_path(&path) {
                        Some(n) => n.device().clone(),
                        None => Arc::new(Gone(format!(
                            "{} was moved to {} but is not served there",
                            m.name,
                            path.display()
                        ))),
                    }
                }
                Destination::Remote(to) => {
                    forwarder_to(&self.settings, to, nbd, m, &s.lun.lun, "moved to").await
                }
            };
            out.push(dev);
        }
        out
    }

    /// After the switch: queued operations, retirement, the last messages.
    async fn finish(&mut self, mut link: Link) {
        let t = self.settings.timeout;
        let n = run_queued_on_target(&mut link, &self.queue, t, self.rec.id).await;
        self.tracked.update(|i| i.queued_ops = n);
        self.settings.stall.at("forwarding").await;
        let names: Vec<String> = self
            .prepare
            .members
            .iter()
            .map(|m| m.name.clone())
            .collect();
        match retire(&self.pool, self.rec.id, &names, self.req.keep_source) {
            Ok(kept) => self.tracked.update(|i| i.kept_source = kept),
            Err(e) => {
                tracing::error!(migration = %self.rec.id, "the source copy was not retired: {e}")
            }
        }
        if let Err(e) = self.rec.remove(&self.pool) {
            tracing::error!(migration = %self.rec.id, "cannot remove the migration record: {e}");
        }
        let acked = match link.send_msg(Message::Finish).await {
            Ok(()) => matches!(link.recv_msg(t, "ack").await, Ok(Message::Ack)),
            Err(_) => false,
        };
        if !acked {
            tracing::warn!(migration = %self.rec.id, "the target did not acknowledge the end (it owns the LUNs anyway)");
        }
        let info = self.tracked.snapshot();
        tracing::info!(migration = %self.rec.id, bytes = info.bytes, rounds = info.rounds,
            pause_us = ?info.pause_us, parked = ?info.parked, "migration done");
        self.tracked.finish(MigrationPhase::Done, None);
    }
}

/// Retire the source's copy of migrated LUNs: keep it under
/// `POOL/PRIMARY.migrated-ID/` (not a `*.lun` of the pool, so it is never
/// served again), or remove it. Safe to repeat after a crash.
pub fn retire(
    pool: &Path,
    id: Uuid,
    names: &[String],
    keep: bool,
) -> std::io::Result<Option<PathBuf>> {
    let short = &id.simple().to_string()[..8];
    let dest = if keep {
        pool.join(format!("{}.migrated-{short}", names[0]))
    } else {
        Record::dir(pool, id).join("retired")
    };
    std::fs::create_dir_all(&dest)?;
    // LUN files first: once they are gone from the pool nothing serves them.
    for n in names {
        journal::move_if_present(
            &pool.join(format!("{n}.lun")),
            &dest.join(format!("{n}.lun")),
        )?;
    }
    for n in names {
        journal::move_if_present(
            &pool.join(format!("{n}.layers")),
            &dest.join(format!("{n}.layers")),
        )?;
    }
    journal::sync_dir(pool)?;
    if keep {
        Ok(Some(dest))
    } else {
        journal::remove_own_dir(&Record::dir(pool, id))?;
        Ok(None)
    }
}

pub(super) async fn hello(
    link: &mut Link,
    settings: &Settings,
    token: Option<String>,
    t: Duration,
) -> Result<(), MigrateError> {
    link.send_msg(Message::Hello {
        version: VERSION,
        gateway: settings.name.clone(),
        token,
    })
    .await
    .map_err(link_err)?;
    match link.recv_msg(t, "welcome").await.map_err(link_err)? {
        Message::Welcome { version, .. } if version == VERSION => Ok(()),
        Message::Welcome { version, .. } => Err(MigrateError::Denied(
            lungate_api::migrate::Denial::Version {
                target: version,
                sender: VERSION,
            },
        )),
        Message::Denied { denial } => Err(MigrateError::Denied(denial)),
        m => Err(MigrateError::Failed(format!(
            "the target answered {}",
            describe(&Frame::Message(m))
        ))),
    }
}

/// Bytes dirty in the members' live layers now.
fn dirty_bytes(trackers: &[DirtyTracker]) -> u64 {
    trackers.iter().map(|t| t.count() * t.cluster_size()).sum()
}

/// End a round and wait until the target has applied it.
async fn round_trip(link: &mut Link, round: u32, t: Duration) -> Result<(), MigrateError> {
    link.send_msg(Message::RoundEnd { round })
        .await
        .map_err(link_err)?;
    match link.recv_msg(t, "round-done").await.map_err(link_err)? {
        Message::RoundDone { round: r } if r == round => Ok(()),
        Message::Failed { error } => Err(MigrateError::Failed(format!("the target: {error}"))),
        Message::Abort { reason } => Err(MigrateError::Aborted(format!("the target: {reason}"))),
        m => Err(MigrateError::Failed(format!(
            "the target answered round {round} with {}",
            describe(&Frame::Message(m))
        ))),
    }
}

/// Ask the target at `to` whether migration `id` committed.
pub async fn query(
    settings: &Settings,
    to: &str,
    id: Uuid,
) -> Result<MigrationState, MigrateError> {
    let mut link = super::listen::connect(settings, to).await?;
    hello(
        &mut link,
        settings,
        settings.token.clone(),
        settings.timeout,
    )
    .await?;
    link.send_msg(Message::Query { migration: id })
        .await
        .map_err(link_err)?;
    match link
        .recv_msg(settings.timeout, "status")
        .await
        .map_err(link_err)?
    {
        Message::Status { migration, state } if migration == id => Ok(state),
        m => Err(MigrateError::Failed(format!(
            "the target answered the query with {}",
            describe(&Frame::Message(m))
        ))),
    }
}

/// What takes member `m`'s requests once `to` serves it: [`remote`],
/// tried five times 200 ms apart, or else a device that fails every
/// request saying that `m` `went` (e.g. "moved to") `to` and why it cannot
/// be reached.
pub(super) async fn forwarder_to(
    settings: &Settings,
    to: &str,
    nbd: (Option<u16>, bool),
    m: &Member,
    lun: &lun_manager::Lun,
    went: &str,
) -> Arc<dyn BlockDevice> {
    let mut last = String::new();
    for attempt in 0..5 {
        match remote(settings, to, nbd, m, lun).await {
            Ok(d) => return Arc::new(d),
            Err(e) => {
                tracing::warn!(lun = %m.name, attempt, "forwarding connection: {e}");
                last = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Arc::new(Gone(format!(
        "{} {went} {to}, and its exports there cannot be reached: {last}",
        m.name
    )))
}

/// NBD connections to the target's exports of member `m`'s disks, each
/// reached through the pieces of the LUN its region view on `lun` maps it
/// to (an aligned disk0's first MiB lives in the state region).
pub(super) async fn remote(
    settings: &Settings,
    to: &str,
    (nbd_port, nbd_tls): (Option<u16>, bool),
    m: &Member,
    lun: &lun_manager::Lun,
) -> Result<RemoteLun, String> {
    let port = nbd_port.ok_or("the target has no TCP NBD listener")?;
    let addr = super::listen::resolve(to)
        .await
        .map_err(|e| e.to_string())?;
    let addr = std::net::SocketAddr::new(addr.ip(), port);
    let tls = match &settings.tls_client {
        Some(cfg) if nbd_tls => {
            let (host, _) = super::listen::host_port(to).map_err(|e| e.to_string())?;
            Some((
                cfg.clone(),
                super::listen::server_name(&host).map_err(|e| e.to_string())?,
            ))
        }
        None if nbd_tls => {
            return Err("the target's NBD listener speaks TLS and this gateway has no TLS client settings ([migration] tls)".into())
        }
        _ => None,
    };
    let mut disks = Vec::new();
    for [index, _, length] in &m.disks {
        let export = format!("{}/disk{index}", m.name);
        let view = u32::try_from(*index)
            .ok()
            .and_then(|i| lun.disk_view(i))
            .ok_or_else(|| format!("{}: no disk{index}", m.name))?;
        let pieces = view
            .pieces(0, *length)
            .map_err(|e| format!("{export}: {e}"))?
            .as_slice()
            .iter()
            .map(|p| (p.at, p.len, p.disk))
            .collect();
        let conn = NbdConn::connect(addr, &export, tls.clone())
            .await
            .map_err(|e| format!("{addr} export {export}: {e}"))?;
        disks.push(RemoteDisk {
            pieces,
            length: *length,
            conn,
        });
    }
    RemoteLun::new(m.size, disks).map_err(|e| e.to_string())
}

/// A LUN that moved and cannot be reached: every request fails with EIO
/// (the target owns the LUN; the source must not serve it).
pub(super) struct Gone(pub(super) String);

impl BlockDevice for Gone {
    fn size(&self) -> u64 {
        0
    }
    fn caps(&self) -> lungate_block::device::Caps {
        lungate_block::device::Caps::default()
    }
    fn read(&self, _: u64, _: usize) -> lungate_block::device::IoFuture<bytes::Bytes> {
        lungate_block::device::done(Err(std::io::Error::other(self.0.clone())))
    }
    fn write(&self, _: u64, _: bytes::Bytes, _: bool) -> lungate_block::device::IoFuture<()> {
        lungate_block::device::done(Err(std::io::Error::other(self.0.clone())))
    }
    fn flush(&self) -> lungate_block::device::IoFuture<()> {
        lungate_block::device::done(Err(std::io::Error::other(self.0.clone())))
    }
    fn trim(&self, _: u64, _: u64) -> lungate_block::device::IoFuture<()> {
        lungate_block::device::done(Err(std::io::Error::other(self.0.clone())))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> lungate_block::device::IoFuture<()> {
        lungate_block::device::done(Err(std::io::Error::other(self.0.clone())))
    }
    fn extents(
        &self,
        _: u64,
        _: u64,
    ) -> lungate_block::device::IoFuture<Vec<lungate_block::device::Extent>> {
        lungate_block::device::done(Err(std::io::Error::other(self.0.clone())))
    }
    fn cache(&self, _: u64, _: u64) -> lungate_block::device::IoFuture<()> {
        lungate_block::device::done(Err(std::io::Error::other(self.0.clone())))
    }
}
