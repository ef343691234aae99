//! Replication with checkpoints, and failover (docs/migration.md,
//! "Replication and failover"), on the migration protocol's connection,
//! frames and verification.
//!
//! * The **source** ([`start`]) runs a background job per VM: every
//!   interval it takes the group snapshot `replica-SEQ` (the O(1) live
//!   switch), then ships, over one migration connection with
//!   `Prepare::replica`, what the target lacks of the frozen tree: the
//!   target answers `ReplicaHolds` (its LUN files and the frozen layers
//!   it has with the same parent), the source sends the other frozen
//!   files whole (they never change) and the label ranges, then
//!   `ReplicaCommit`. After `Checkpointed` it deletes its replication
//!   snapshots beyond `keep` (never the newest: the next increment is
//!   based on it).
//! * The **target** ([`receive`], called by `target.rs` after admission)
//!   holds each replica under `POOL/.lungate-replicas/UUID/` (not in the
//!   pool, so never served): `NAME.lun`, `NAME.layers/` of every member
//!   and `replica.json` with its newest complete checkpoint. A cycle first
//!   mirrors the source's snapshot deletions on its own volume (the same
//!   merge, so a kept layer has the same parent as on the source), writes
//!   what arrives under `incoming/`, and commits per member: the files
//!   into the tree, a fresh empty live layer over the checkpoint, the
//!   manifest (the volume's atomic two-slot store), then `replica.json`.
//!   A crash before `replica.json` leaves the previous checkpoint named
//!   there intact (its layers are still in the manifest).
//! * [`failover`] promotes a replica: reverts every member to the newest
//!   complete checkpoint, moves the files into the pool and serves them.
//!
//! It must not touch the live migration's rounds or switch: it reuses
//! only admission, the frames and [`transfer::Sender`]'s tally.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lungate_api::migrate::{
    Denial, Frame, Member, Message, ObjectKind, ObjectRef, Prepare, ReplicaHold, Tally,
};
use lungate_api::types::{
    Checkpoint, CycleInfo, FailedOver, FailoverRequest, ReplicaSide, ReplicateRequest,
    ReplicationInfo,
};
use lungate_block::volume::header::Geometry;
use lungate_block::volume::layer::Delta;
use lungate_block::volume::manifest::{self, Manifest};
use lungate_block::volume::{Volume, VolumeConfig, VolumeOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::protocol::{describe, Link};
use super::transfer::{self, link_err, Sender, Work};
use super::{journal, lock, MigrateError, Settings};
use crate::registry::Registry;
use crate::served::ServedLun;

/// Replication snapshots a source keeps by default.
pub const DEFAULT_KEEP: u32 = 2;
/// Cycles a source job remembers for `lunctl replications`.
const KEEP_CYCLES: usize = 32;
/// Prefix of the checkpoint snapshots.
pub const PREFIX: &str = "replica-";

/// The gateway's replications: source jobs, and the replicas receiving a
/// cycle (or being promoted) now.
#[derive(Default)]
pub struct Table {
    sources: Mutex<HashMap<Uuid, Arc<SourceJob>>>,
    busy: Mutex<HashMap<Uuid, CancellationToken>>,
}

struct SourceJob {
    info: Mutex<ReplicationInfo>,
    stop: CancellationToken,
}

fn fail(e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Failed(e.to_string())
}

/// The sequence number of a checkpoint snapshot's name.
pub fn seq_of(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?.parse().ok()
}

// ----- the source -----------------------------------------------------------

/// Start replicating `l`'s VM; the cycles run in the background.
pub async fn start(
    reg: &Arc<Registry>,
    l: &Arc<ServedLun>,
    req: ReplicateRequest,
) -> Result<ReplicationInfo, MigrateError> {
    let settings = reg
        .migrate
        .settings()
        .cloned()
        .ok_or_else(|| MigrateError::Invalid("migration is not configured".into()))?;
    super::listen::host_port(&req.to)?;
    if req.every_ms < 100 {
        return Err(MigrateError::Invalid(format!(
            "every_ms {} is below the minimum of 100",
            req.every_ms
        )));
    }
    if req.keep == Some(0) {
        return Err(MigrateError::Invalid("keep must be at least 1".into()));
    }
    if l.read_only {
        return Err(MigrateError::Refused(format!(
            "{} is served read-only",
            l.lun.name()
        )));
    }
    if l.lun.file().is_none() {
        return Err(MigrateError::Refused(format!(
            "{} is an RBD LUN: replicate the Ceph pool instead",
            l.lun.name()
        )));
    }
    // Refusals that need no target (clones depend on it) come back now.
    super::source::collect(reg, l, false)?;
    let uuid = l.lun.uuid();
    let info = ReplicationInfo {
        lun: l.lun.name().to_string(),
        uuid,
        side: ReplicaSide::Source,
        peer: req.to.clone(),
        state: "running".into(),
        every_ms: req.every_ms,
        checkpoint: None,
        cycles: Vec::new(),
        error: None,
    };
    let job = Arc::new(SourceJob {
        info: Mutex::new(info.clone()),
        stop: CancellationToken::new(),
    });
    {
        let mut t = lock(&reg.migrate.replication.sources);
        if let Some(j) = t.get(&uuid) {
            if !j.stop.is_cancelled() {
                return Err(MigrateError::Refused(format!(
                    "{} is being replicated already (to {})",
                    l.lun.name(),
                    lock(&j.info).peer
                )));
            }
        }
        t.insert(uuid, job.clone());
    }
    tracing::info!(lun = %l.lun.name(), to = %req.to, every_ms = req.every_ms, "replication started");
    tokio::spawn(run(reg.clone(), settings, job, uuid, req));
    Ok(info)
}

/// Stop the replication of `lun` (name or UUID).
pub fn stop(reg: &Registry, lun: &str) -> Option<ReplicationInfo> {
    let t = lock(&reg.migrate.replication.sources);
    let j = t
        .values()
        .find(|j| {
            let i = lock(&j.info);
            (i.lun == lun || i.uuid.to_string() == lun) && !j.stop.is_cancelled()
        })?
        .clone();
    j.stop.cancel();
    let mut i = lock(&j.info);
    i.state = "stopped".into();
    Some(i.clone())
}

async fn run(
    reg: Arc<Registry>,
    settings: Arc<Settings>,
    job: Arc<SourceJob>,
    uuid: Uuid,
    req: ReplicateRequest,
) {
    let every = Duration::from_millis(req.every_ms);
    loop {
        let t0 = Instant::now();
        let Some(l) = reg.find(&uuid.to_string()) else {
            let mut i = lock(&job.info);
            i.state = "failed".into();
            i.error = Some("the LUN is no longer served here".into());
            job.stop.cancel();
            return;
        };
        let r = cycle(&reg, &settings, &l, &req, &job.stop).await;
        {
            let mut i = lock(&job.info);
            match r {
                Ok((c, cp)) => {
                    tracing::info!(lun = %i.lun, checkpoint = %cp.name, bytes = c.bytes,
                        sent = c.layers_sent, reused = c.layers_reused, ms = c.elapsed_ms, "replication checkpoint complete");
                    i.checkpoint = Some(cp);
                    i.error = None;
                    i.cycles.push(c);
                }
                Err((seq, e)) => {
                    tracing::warn!(lun = %i.lun, seq, "replication cycle failed: {e}");
                    i.error = Some(e.to_string());
                    i.cycles.push(CycleInfo {
                        seq,
                        bytes: 0,
                        layers_sent: 0,
                        layers_reused: 0,
                        elapsed_ms: t0.elapsed().as_millis() as u64,
                        error: Some(e.to_string()),
                    });
                }
            }
            let n = i.cycles.len();
            if n > KEEP_CYCLES {
                i.cycles.drain(..n - KEEP_CYCLES);
            }
        }
        tokio::select! {
            _ = job.stop.cancelled() => break,
            _ = tokio::time::sleep(every.saturating_sub(t0.elapsed())) => {}
        }
    }
    tracing::info!(%uuid, "replication stopped");
}

/// Checkpoint snapshots of `l`, oldest first.
fn checkpoints(l: &ServedLun) -> Vec<(u64, String, u64)> {
    let mut v: Vec<(u64, String, u64)> = l
        .volume()
        .snapshots()
        .into_iter()
        .filter_map(|s| seq_of(&s.name).map(|n| (n, s.name, s.created)))
        .collect();
    v.sort();
    v
}

/// One cycle: snapshot, ship, retention. The error carries the sequence
/// number it tried.
async fn cycle(
    reg: &Arc<Registry>,
    settings: &Arc<Settings>,
    l: &Arc<ServedLun>,
    req: &ReplicateRequest,
    stop: &CancellationToken,
) -> Result<(CycleInfo, Checkpoint), (u64, MigrateError)> {
    let seq = checkpoints(l).last().map_or(1, |c| c.0 + 1);
    if let Some(why) = l.migration.busy() {
        return Err((
            seq,
            MigrateError::Refused(format!("{}: {why}", l.lun.name())),
        ));
    }
    let t0 = Instant::now();
    let name = format!("{PREFIX}{seq}");
    let (snap, _pause) =
        crate::control::ops::snapshot(reg, l, name.clone(), "replication checkpoint".into())
            .await
            .map_err(|e| (seq, fail(e)))?;
    let cp = Checkpoint {
        name: name.clone(),
        seq,
        created: snap.created,
    };
    match ship(reg, settings, l, req, &cp, stop).await {
        Ok((bytes, sent, reused)) => {
            retain(reg, l, req.keep.unwrap_or(DEFAULT_KEEP)).await;
            Ok((
                CycleInfo {
                    seq,
                    bytes,
                    layers_sent: sent,
                    layers_reused: reused,
                    elapsed_ms: t0.elapsed().as_millis() as u64,
                    error: None,
                },
                cp,
            ))
        }
        Err(e) => {
            // The target does not have it: it is no checkpoint.
            if let Err(d) = crate::control::ops::delete_snapshot(reg, l, name.clone()).await {
                tracing::warn!(lun = %l.lun.name(), snapshot = %name, "cannot delete the failed cycle's snapshot: {d}");
            }
            Err((seq, e))
        }
    }
}

/// Delete checkpoint snapshots beyond the newest `keep`.
async fn retain(reg: &Arc<Registry>, l: &Arc<ServedLun>, keep: u32) {
    let cps = checkpoints(l);
    let extra = cps.len().saturating_sub(keep.max(1) as usize);
    for (_, name, _) in cps.into_iter().take(extra) {
        if let Err(e) = crate::control::ops::delete_snapshot(reg, l, name.clone()).await {
            tracing::warn!(lun = %l.lun.name(), snapshot = %name, "replication retention: cannot delete: {e}");
        }
    }
}

/// Send checkpoint `cp` to the target: what it lacks of the frozen tree.
/// Returns payload bytes, frozen files sent and reused.
async fn ship(
    reg: &Arc<Registry>,
    settings: &Arc<Settings>,
    l: &Arc<ServedLun>,
    req: &ReplicateRequest,
    cp: &Checkpoint,
    stop: &CancellationToken,
) -> Result<(u64, u32, u32), MigrateError> {
    let t = settings.timeout;
    // Connect before taking the locks: a target that does not answer
    // holds no tree operation up.
    let mut link = super::listen::connect(settings, &req.to).await?;
    let token = req.token.clone().or_else(|| settings.token.clone());
    super::source::hello(&mut link, settings, token, t).await?;
    let members = super::source::collect(reg, l, false)?;
    let order = super::source::in_key_order(members.iter().map(|(m, _)| m));
    // No tree operation (a snapshot deletion merges layers) runs while the
    // frozen files are read.
    let mut held = Vec::new();
    for m in &order {
        held.push(m.maintenance.lock().await);
    }
    let uuids: Vec<Uuid> = members.iter().map(|(m, _)| m.lun.uuid()).collect();
    let mut wire = Vec::new();
    for (m, role) in &members {
        let (member, _) = super::source::describe_member(m, *role, &uuids)?;
        if member.layers.is_none() {
            return Err(fail(format!(
                "{} has no layers after its snapshot",
                m.lun.name()
            )));
        }
        wire.push(member);
    }
    let prepare = Prepare {
        migration: Uuid::new_v4(),
        pool: req.target_pool.clone(),
        members: wire.clone(),
        policy: super::source::policy_of(l),
        replica: true,
        handover: None,
    };
    link.send_msg(Message::Prepare(Box::new(prepare)))
        .await
        .map_err(link_err)?;
    match link.recv_msg(t, "permitted").await.map_err(link_err)? {
        Message::Permitted { .. } => {}
        Message::Denied { denial } => return Err(MigrateError::Denied(denial)),
        Message::Failed { error } => return Err(fail(format!("the target: {error}"))),
        m => {
            return Err(fail(format!(
                "the target answered {}",
                describe(&Frame::Message(m))
            )))
        }
    }
    let holds = match link
        .recv_msg(t * 4, "replica-holds")
        .await
        .map_err(link_err)?
    {
        Message::ReplicaHolds { members } if members.len() == wire.len() => members,
        Message::Failed { error } => return Err(fail(format!("the target: {error}"))),
        m => {
            return Err(fail(format!(
                "the target answered {}",
                describe(&Frame::Message(m))
            )))
        }
    };
    let mut sender = Sender::new(req.max_rate);
    let (mut sent, mut reused) = (0u32, 0u32);
    for (i, ((m, _), (w, h))) in members.iter().zip(wire.iter().zip(&holds)).enumerate() {
        let i = i as u16;
        let base = m
            .lun
            .file()
            .cloned()
            .ok_or_else(|| fail(format!("{} has no LUN file", m.lun.name())))?;
        let mut work = Vec::new();
        if !h.base {
            sent += 1;
            work.push(Work::File {
                object: ObjectRef::base(i),
                file: base,
                len: w.file_len,
            });
        } else {
            reused += 1;
            let (f, ranges) = (base.clone(), w.protected.clone());
            let mine = tokio::task::spawn_blocking(move || label_hash(&f, &ranges))
                .await
                .map_err(fail)?
                .map_err(fail)?;
            if h.label_blake3.as_deref() != Some(mine.as_str()) {
                work.push(Work::FileRanges {
                    object: ObjectRef::base(i),
                    file: base,
                    ranges: w.protected.iter().map(|[a, b]| (*a, b - a)).collect(),
                });
            }
        }
        let dir = m.volume().layers_dir().to_path_buf();
        for f in &w.layers.as_ref().expect("checked").frozen {
            if h.layers.contains(&f.id) {
                reused += 1;
                continue;
            }
            let path = lungate_block::store::file::delta_path(&dir, f.id);
            let file = File::open(&path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
            sent += 1;
            work.push(Work::File {
                object: ObjectRef::layer(i, f.id),
                file: Arc::new(file),
                len: f.len,
            });
        }
        sender
            .pump(&mut link, transfer::read(work), stop, |_| {})
            .await?;
        link.send_msg(Message::FilesDone { member: i })
            .await
            .map_err(link_err)?;
    }
    drop(held);
    link.send_msg(Message::ReplicaCommit {
        name: cp.name.clone(),
        seq: cp.seq,
        created: cp.created,
        tally: sender.tally.digest(),
        frames: sender.frames,
        bytes: sender.bytes,
    })
    .await
    .map_err(link_err)?;
    match link
        .recv_msg(t * 4, "checkpointed")
        .await
        .map_err(link_err)?
    {
        Message::Checkpointed { name } if name == cp.name => Ok((sender.bytes, sent, reused)),
        Message::Failed { error } => Err(fail(format!("the target: {error}"))),
        m => Err(fail(format!(
            "the target answered {}",
            describe(&Frame::Message(m))
        ))),
    }
}

/// blake3 of `ranges` of a LUN file, in order.
fn label_hash(f: &File, ranges: &[[u64; 2]]) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for [a, b] in ranges {
        let mut at = *a;
        while at < *b {
            let n = (*b - at).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], at)?;
            h.update(&buf[..n]);
            at += n as u64;
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

// ----- the target: the replica on disk --------------------------------------

/// `POOL/.lungate-replicas`.
pub fn replicas_dir(pool: &Path) -> PathBuf {
    pool.join(".lungate-replicas")
}

/// `replica.json`: what a replica is and its newest complete checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReplicaRecord {
    pub lun: String,
    pub uuid: Uuid,
    pub members: Vec<String>,
    /// The source's address as this gateway saw it.
    pub peer: String,
    #[serde(default)]
    pub checkpoint: Option<Checkpoint>,
    /// A failover started: the files are moving into the pool.
    #[serde(default)]
    pub promoted: bool,
    /// Each member's shape (geometry, label ranges) from the last cycle.
    #[serde(default)]
    pub shapes: Vec<Member>,
}

impl ReplicaRecord {
    fn path(dir: &Path) -> PathBuf {
        dir.join("replica.json")
    }

    fn load(dir: &Path) -> Option<ReplicaRecord> {
        let b = std::fs::read(Self::path(dir)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Replace the record whole (temporary file, fsync, rename, fsync).
    fn store(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join("replica.json.tmp");
        let f = File::create(&tmp)?;
        f.write_all_at(&serde_json::to_vec_pretty(self).expect("serialises"), 0)?;
        f.sync_all()?;
        std::fs::rename(&tmp, Self::path(dir))?;
        journal::sync_dir(dir)
    }
}

/// The replicas of `pool`: their directories and records.
fn replicas_in(pool: &Path) -> Vec<(PathBuf, ReplicaRecord)> {
    let Ok(rd) = std::fs::read_dir(replicas_dir(pool)) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| ReplicaRecord::load(&e.path()).map(|r| (e.path(), r)))
        .collect()
}

fn volume_config(lun_path: &Path, m: &Member) -> Result<VolumeConfig, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(lun_path)
        .map_err(|e| format!("{}: {e}", lun_path.display()))?;
    Ok(VolumeConfig {
        lun_path: lun_path.to_path_buf(),
        file: Arc::new(file),
        lun_uuid: m.uuid,
        size: m.size,
        protected: m.protected.iter().map(|[a, b]| *a..*b).collect(),
        options: VolumeOptions {
            cluster_size: m.cluster_size,
            read_only: false,
        },
        engine: None,
    })
}

fn source_manifest(m: &Member) -> Result<Manifest, String> {
    let l = m.layers.as_ref().ok_or_else(|| {
        format!(
            "{}: a replica needs a layered LUN (the source snapshots it first)",
            m.name
        )
    })?;
    if blake3::hash(l.manifest.as_bytes()).to_hex().as_str() != l.manifest_blake3 {
        return Err(format!("{}: the manifest fails its blake3", m.name));
    }
    let man: Manifest =
        serde_json::from_str(&l.manifest).map_err(|e| format!("{}: manifest: {e}", m.name))?;
    if man.lun != m.uuid || man.size != m.size || man.cluster_size != m.cluster_size {
        return Err(format!(
            "{}: the manifest is not the member's (LUN, size or cluster size)",
            m.name
        ));
    }
    Ok(man)
}

/// Mirror the source's snapshot deletions on the replica's member (the
/// same merges), then say what it holds of `new`.
/// The replica's newest complete checkpoint `keep` is never deleted here,
/// even when the source has (it deletes the snapshot of a cycle it thinks
/// failed): it stays the failover point until this cycle commits, and the
/// commit drops its layers if the new manifest does not name them.
fn prepare_member(
    dir: &Path,
    m: &Member,
    new: &Manifest,
    keep: Option<&str>,
) -> Result<ReplicaHold, String> {
    let lun_path = dir.join(format!("{}.lun", m.name));
    let ldir = lungate_block::store::file::layers_dir(&lun_path);
    let Ok(Some(loaded)) = manifest::load(&ldir) else {
        return Ok(ReplicaHold::default());
    };
    if !lun_path.is_file() {
        return Ok(ReplicaHold::default());
    }
    let mut have = loaded.manifest;
    if have.lun != new.lun || have.size != new.size || have.cluster_size != new.cluster_size {
        return Err(format!(
            "{}: the source's LUN changed size or identity since the last checkpoint; \
             fail over or remove the replica and replicate again",
            m.name
        ));
    }
    let gone: Vec<String> = have
        .snapshots
        .iter()
        .filter(|s| new.snapshot(&s.name).is_none() && Some(s.name.as_str()) != keep)
        .map(|s| s.name.clone())
        .collect();
    if !gone.is_empty() {
        let v = Volume::open(volume_config(&lun_path, m)?)
            .map_err(|e| format!("{}: open the replica: {e}", m.name))?;
        for s in &gone {
            v.delete_snapshot(s)
                .map_err(|e| format!("{}: delete snapshot {s} as the source did: {e}", m.name))?;
        }
        v.close().map_err(|e| format!("{}: close: {e}", m.name))?;
        have = manifest::load(&ldir)
            .map_err(|e| format!("{}: {e}", m.name))?
            .ok_or_else(|| format!("{}: the replica lost its manifest", m.name))?
            .manifest;
    }
    let layers = new
        .layers
        .iter()
        .filter(|r| r.id != new.top && r.id != have.top)
        .filter(|r| have.layer(r.id).is_some_and(|h| h.parent == r.parent))
        .filter(|r| lungate_block::store::file::delta_path(&ldir, r.id).is_file())
        .map(|r| r.id)
        .collect();
    let f = File::open(&lun_path).map_err(|e| format!("{}: {e}", lun_path.display()))?;
    let label = label_hash(&f, &m.protected).map_err(|e| format!("{}: {e}", lun_path.display()))?;
    Ok(ReplicaHold {
        base: true,
        layers,
        label_blake3: Some(label),
    })
}

/// One member of a cycle being received.
struct Incoming {
    info: Member,
    manifest: Manifest,
    hold: ReplicaHold,
    /// `incoming/NAME.lun` when the LUN file is sent whole.
    base: Option<(PathBuf, File)>,
    /// Label ranges of a LUN file the replica has: written after the commit.
    label: Vec<(u64, Option<Bytes>, u64)>,
    layers: HashMap<Uuid, (PathBuf, File, u64)>,
}

fn create_sparse(path: &Path, len: u64) -> Result<File, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("{}: create: {e}", path.display()))?;
    f.set_len(len)
        .map_err(|e| format!("{}: size: {e}", path.display()))?;
    Ok(f)
}

impl Incoming {
    fn new(
        incoming: &Path,
        info: &Member,
        manifest: Manifest,
        hold: ReplicaHold,
    ) -> Result<Incoming, String> {
        let lun = incoming.join(format!("{}.lun", info.name));
        let base = if hold.base {
            None
        } else {
            Some((lun.clone(), create_sparse(&lun, info.file_len)?))
        };
        let ldir = lungate_block::store::file::layers_dir(&lun);
        std::fs::create_dir_all(&ldir).map_err(|e| format!("{}: {e}", ldir.display()))?;
        let mut layers = HashMap::new();
        for f in &info.layers.as_ref().expect("checked").frozen {
            if hold.layers.contains(&f.id) {
                continue;
            }
            let p = lungate_block::store::file::delta_path(&ldir, f.id);
            let file = create_sparse(&p, f.len)?;
            layers.insert(f.id, (p, file, f.len));
        }
        Ok(Incoming {
            info: info.clone(),
            manifest,
            hold,
            base,
            label: Vec::new(),
            layers,
        })
    }

    fn apply(&mut self, f: &Frame) -> Result<(), String> {
        let (object, offset, len) = match f {
            Frame::Data(d) => {
                d.verify().map_err(|e| e.to_string())?;
                (d.object, d.offset, d.payload.len() as u64)
            }
            Frame::Zero {
                object,
                offset,
                length,
                ..
            } => (*object, *offset, *length),
            Frame::Message(_) => return Err("a message is not data".into()),
        };
        let end = offset
            .checked_add(len)
            .ok_or_else(|| format!("{object}: offset {offset} + length {len} overflows"))?;
        let (file, limit) = match object.kind {
            ObjectKind::View => return Err(format!("{object}: a replica takes no live data")),
            ObjectKind::Base => match &self.base {
                Some((_, f)) => (f, self.info.file_len),
                None => {
                    let inside = self
                        .info
                        .protected
                        .iter()
                        .any(|[a, b]| offset >= *a && end <= *b);
                    if !inside {
                        return Err(format!(
                            "{object}: {offset} + {len} is outside the label ranges of a LUN file the replica has"
                        ));
                    }
                    let bytes = match f {
                        Frame::Data(d) => Some(d.payload.clone()),
                        _ => None,
                    };
                    self.label.push((offset, bytes, len));
                    return Ok(());
                }
            },
            ObjectKind::Layer => match self.layers.get(&object.layer) {
                Some((_, f, l)) => (f, *l),
                None => return Err(format!("{object}: not a layer this cycle sends")),
            },
        };
        if end > limit {
            return Err(format!(
                "{object}: offset {offset} + length {len} exceeds its size {limit}"
            ));
        }
        match f {
            Frame::Data(d) => file.write_all_at(&d.payload, offset),
            _ => lungate_block::sys::zero_range(file, offset, len),
        }
        .map_err(|e| format!("{object}: write: {e}"))
    }

    fn files_done(&self) -> Result<(), String> {
        if let Some((p, f)) = &self.base {
            f.sync_all()
                .map_err(|e| format!("{}: fsync: {e}", p.display()))?;
        }
        for (p, f, _) in self.layers.values() {
            f.sync_all()
                .map_err(|e| format!("{}: fsync: {e}", p.display()))?;
        }
        Ok(())
    }

    /// Put the received files into the replica's tree and make the
    /// checkpoint its manifest (the member's commit point).
    fn commit(self, dir: &Path) -> Result<(), String> {
        let name = &self.info.name;
        let lun_path = dir.join(format!("{name}.lun"));
        let ldir = lungate_block::store::file::layers_dir(&lun_path);
        std::fs::create_dir_all(&ldir).map_err(|e| format!("{}: {e}", ldir.display()))?;
        for (id, (p, _, _)) in &self.layers {
            std::fs::rename(p, lungate_block::store::file::delta_path(&ldir, *id))
                .map_err(|e| format!("{}: move: {e}", p.display()))?;
        }
        journal::sync_dir(&ldir).map_err(|e| e.to_string())?;
        if let Some((p, _)) = &self.base {
            std::fs::rename(p, &lun_path).map_err(|e| format!("{}: move: {e}", p.display()))?;
            journal::sync_dir(dir).map_err(|e| e.to_string())?;
        }
        let old = manifest::load(&ldir).ok().flatten();
        let mut man = self.manifest;
        let src_top = man.top;
        let live = Uuid::new_v4();
        let live_parent = self.info.layers.as_ref().expect("checked").live_parent;
        let mut created = 0;
        for r in &mut man.layers {
            if r.id == src_top {
                r.id = live;
                created = r.created;
            }
        }
        man.top = live;
        man.retired.clear();
        man.dependents.clear();
        man.validate()
            .map_err(|e| format!("{name}: manifest: {e}"))?;
        let geo = Geometry::new(u64::from(self.info.cluster_size), self.info.size)
            .ok_or_else(|| format!("{name}: no geometry"))?;
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&lun_path)
                .map_err(|e| format!("{}: {e}", lun_path.display()))?,
        );
        let store = lungate_block::store::file::FileStore::new(&lun_path, file.clone(), None, true);
        Delta::create(
            &store,
            live,
            live_parent,
            self.info.uuid,
            geo,
            created,
            man.checksums,
        )
        .map_err(|e| format!("{name}: live layer: {e}"))?;
        let generation = old.as_ref().map_or(0, |o| o.generation) + 1;
        manifest::store(&ldir, &man, generation).map_err(|e| format!("{name}: manifest: {e}"))?;
        // Layers of the previous checkpoint the new one does not name
        // (its live layer, a layer the source merged away).
        if let Some(o) = old {
            for r in &o.manifest.layers {
                if man.layer(r.id).is_none() {
                    let p = lungate_block::store::file::delta_path(&ldir, r.id);
                    if let Err(e) = std::fs::remove_file(&p) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!("replica {name}: cannot remove {}: {e}", p.display());
                        }
                    }
                }
            }
        }
        for (off, bytes, len) in &self.label {
            match bytes {
                Some(b) => file.write_all_at(b, *off),
                None => lungate_block::sys::zero_range(&file, *off, *len),
            }
            .map_err(|e| format!("{}: label: {e}", lun_path.display()))?;
        }
        file.sync_all()
            .map_err(|e| format!("{}: fsync: {e}", lun_path.display()))?;
        Ok(())
    }
}

/// Frees a replica's busy mark when the cycle or failover ends.
struct BusyGuard<'a> {
    table: &'a Table,
    uuid: Uuid,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(&self.table.busy).remove(&self.uuid);
    }
}

fn busy<'a>(table: &'a Table, uuid: Uuid) -> Option<(BusyGuard<'a>, CancellationToken)> {
    let mut b = lock(&table.busy);
    if b.contains_key(&uuid) {
        return None;
    }
    let t = CancellationToken::new();
    b.insert(uuid, t.clone());
    Some((BusyGuard { table, uuid }, t))
}

/// The target's side of one replica cycle, after the admission policy
/// accepted `p` for `pool`. Denials are answered here; `Err` is a failure
/// after `Permitted` (the caller sends it as `Failed`).
pub async fn receive(
    link: &mut Link,
    p: &Prepare,
    reg: &Arc<Registry>,
    settings: &Settings,
    pool: &Path,
) -> Result<(), String> {
    let deny = |why: String| Message::Denied {
        denial: Denial::Unsupported { why },
    };
    let uuid = p.members[0].uuid;
    let lun = p.members[0].name.clone();
    let mut manifests = Vec::new();
    for m in &p.members {
        match source_manifest(m) {
            Ok(man) => manifests.push(man),
            Err(e) => return link.send_msg(deny(e)).await.map_err(|e| e.to_string()),
        }
    }
    let dir = replicas_dir(pool).join(uuid.to_string());
    let rec = ReplicaRecord::load(&dir);
    if let Some((other, _)) = replicas_in(pool)
        .into_iter()
        .find(|(_, r)| r.lun == lun && r.uuid != uuid)
    {
        let d = Denial::Exists {
            pool: pool.display().to_string(),
            what: "a replica of another LUN named".into(),
            value: format!("{lun} ({})", other.display()),
        };
        return link
            .send_msg(Message::Denied { denial: d })
            .await
            .map_err(|e| e.to_string());
    }
    if rec.as_ref().is_some_and(|r| r.promoted) {
        return link
            .send_msg(deny(format!(
                "the replica of {lun} has been failed over here"
            )))
            .await
            .map_err(|e| e.to_string());
    }
    let table = &reg.migrate.replication;
    let Some((_guard, cancel)) = busy(table, uuid) else {
        return link
            .send_msg(deny(format!(
                "the replica of {lun} is receiving a cycle or failing over"
            )))
            .await
            .map_err(|e| e.to_string());
    };
    link.send_msg(Message::Permitted {
        nbd_port: None,
        nbd_tls: false,
        owner: None,
    })
    .await
    .map_err(|e| e.to_string())?;
    // The replica exists from its first cycle on, with no checkpoint
    // until that cycle commits.
    let first = rec.as_ref().is_none_or(|r| r.checkpoint.is_none());
    let mut rec = rec.unwrap_or(ReplicaRecord {
        lun: lun.clone(),
        uuid,
        members: p.members.iter().map(|m| m.name.clone()).collect(),
        peer: link.peer.clone(),
        checkpoint: None,
        promoted: false,
        shapes: Vec::new(),
    });
    let made = std::fs::create_dir_all(&dir)
        .and_then(|()| rec.store(&dir))
        .map_err(|e| format!("{}: {e}", dir.display()));
    let incoming = dir.join("incoming");
    let r = match made {
        Ok(()) => {
            let keep = rec.checkpoint.as_ref().map(|c| c.name.clone());
            receive_cycle(link, p, &dir, manifests, keep, settings, &cancel).await
        }
        Err(e) => Err(e),
    };
    let clean = if first && r.is_err() { &dir } else { &incoming };
    if let Err(e) = journal::remove_own_dir(clean) {
        tracing::warn!(lun = %lun, "cannot clean up {}: {e}", clean.display());
    }
    let cp = r?;
    rec.shapes = p
        .members
        .iter()
        .map(|m| Member {
            layers: None,
            ..m.clone()
        })
        .collect();
    rec.members = p.members.iter().map(|m| m.name.clone()).collect();
    rec.peer = link.peer.clone();
    rec.checkpoint = Some(cp.clone());
    rec.store(&dir)
        .map_err(|e| format!("write {}: {e}", ReplicaRecord::path(&dir).display()))?;
    tracing::info!(lun = %lun, checkpoint = %cp.name, "replica checkpoint complete");
    link.send_msg(Message::Checkpointed { name: cp.name })
        .await
        .map_err(|e| e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

async fn receive_cycle(
    link: &mut Link,
    p: &Prepare,
    dir: &Path,
    manifests: Vec<Manifest>,
    keep: Option<String>,
    settings: &Settings,
    cancel: &CancellationToken,
) -> Result<Checkpoint, String> {
    let incoming = &dir.join("incoming");
    journal::remove_own_dir(incoming).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(incoming).map_err(|e| format!("{}: {e}", incoming.display()))?;
    let mut members = Vec::new();
    for (m, man) in p.members.iter().zip(manifests) {
        let (d, m2, man2) = (dir.to_path_buf(), m.clone(), man.clone());
        let keep = keep.clone();
        let hold = blocking(move || prepare_member(&d, &m2, &man2, keep.as_deref())).await?;
        members.push(Incoming::new(incoming, m, man, hold)?);
    }
    link.send_msg(Message::ReplicaHolds {
        members: members.iter().map(|m| m.hold.clone()).collect(),
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut tally = Tally::default();
    let (mut frames, mut bytes) = (0u64, 0u64);
    let idle = settings.timeout * 2;
    loop {
        let f = link
            .recv_from_source(idle, cancel, "aborted by a failover")
            .await?;
        match f {
            Frame::Data(_) | Frame::Zero { .. } => {
                let member = match &f {
                    Frame::Data(d) => d.object.member,
                    Frame::Zero { object, .. } => object.member,
                    Frame::Message(_) => unreachable!(),
                };
                let n = members.len();
                let m = members
                    .get_mut(usize::from(member))
                    .ok_or_else(|| format!("member {member} does not exist (the cycle has {n})"))?;
                m.apply(&f)?;
                frames += 1;
                bytes += tally.frame(&f);
            }
            Frame::Message(Message::FilesDone { member }) => {
                members
                    .get(usize::from(member))
                    .ok_or_else(|| format!("member {member} does not exist"))?
                    .files_done()?;
            }
            Frame::Message(Message::ReplicaCommit {
                name,
                seq,
                created,
                tally: theirs,
                frames: f,
                bytes: b,
            }) => {
                let mine = tally.digest();
                if mine != theirs || f != frames || b != bytes {
                    return Err(format!(
                        "verification failed: the source sent {f} frames, {b} bytes, tally {theirs}; \
                         applied here: {frames} frames, {bytes} bytes, tally {mine}"
                    ));
                }
                for m in &members {
                    if m.manifest.snapshot(&name).is_none() {
                        return Err(format!(
                            "{}: checkpoint {name} is not a snapshot of the manifest sent",
                            m.info.name
                        ));
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Err("aborted by a failover".into()),
                    _ = settings.stall.at("replica-commit") => {}
                }
                let d = dir.to_path_buf();
                blocking(move || {
                    for m in members {
                        m.commit(&d)?;
                    }
                    Ok(())
                })
                .await?;
                return Ok(Checkpoint { name, seq, created });
            }
            Frame::Message(Message::Abort { reason }) => {
                return Err(format!("the source aborted: {reason}"))
            }
            Frame::Message(Message::Failed { error }) => {
                return Err(format!("the source failed: {error}"))
            }
            Frame::Message(m) => {
                return Err(format!(
                    "unexpected {} during a replica cycle",
                    describe(&Frame::Message(m))
                ))
            }
        }
    }
}

// ----- listing and failover ---------------------------------------------------

/// Every replication this gateway runs, and every replica its pools hold.
pub fn list(reg: &Registry) -> Vec<ReplicationInfo> {
    let mut out: Vec<ReplicationInfo> = lock(&reg.migrate.replication.sources)
        .values()
        .map(|j| lock(&j.info).clone())
        .collect();
    let Some(settings) = reg.migrate.settings() else {
        return out;
    };
    let busy = lock(&reg.migrate.replication.busy).clone();
    for pool in &settings.pools {
        for (_, r) in replicas_in(pool) {
            out.push(ReplicationInfo {
                lun: r.lun,
                uuid: r.uuid,
                side: ReplicaSide::Replica,
                peer: r.peer,
                state: if r.promoted {
                    "promoted"
                } else if busy.contains_key(&r.uuid) {
                    "receiving"
                } else {
                    "idle"
                }
                .into(),
                every_ms: 0,
                checkpoint: r.checkpoint,
                cycles: Vec::new(),
                error: None,
            });
        }
    }
    out
}

/// Promote the replica `lun` (name or UUID) and serve it.
pub async fn failover(
    reg: &Arc<Registry>,
    lun: &str,
    req: FailoverRequest,
) -> Result<FailedOver, MigrateError> {
    let settings = reg
        .migrate
        .settings()
        .cloned()
        .ok_or_else(|| MigrateError::Invalid("migration is not configured".into()))?;
    let pools: Vec<PathBuf> = match &req.pool {
        Some(p) => vec![settings
            .pool(Some(p))
            .ok_or_else(|| MigrateError::Invalid(format!("this gateway serves no pool {p:?}")))?],
        None => settings.pools.clone(),
    };
    let (pool, dir, mut rec) = pools
        .iter()
        .find_map(|pool| {
            replicas_in(pool)
                .into_iter()
                .find(|(_, r)| r.lun == lun || r.uuid.to_string() == lun)
                .map(|(d, r)| (pool.clone(), d, r))
        })
        .ok_or_else(|| {
            MigrateError::Invalid(format!(
                "no replica of {lun:?} is held in this gateway's pools"
            ))
        })?;
    let Some(cp) = rec.checkpoint.clone() else {
        return Err(MigrateError::Refused(format!(
            "the replica of {lun} has no complete checkpoint yet"
        )));
    };
    let table = &reg.migrate.replication;
    let mut aborted_cycle = false;
    let t0 = Instant::now();
    let _guard = loop {
        if let Some((g, _)) = busy(table, rec.uuid) {
            break g;
        }
        if !req.force {
            return Err(MigrateError::Refused(format!(
                "the replica of {lun} is receiving a cycle; retry, or fail over with --force \
                 to abort it and promote {}",
                cp.name
            )));
        }
        if !aborted_cycle {
            if let Some(t) = lock(&table.busy).get(&rec.uuid) {
                t.cancel();
            }
            aborted_cycle = true;
        }
        if t0.elapsed() > settings.timeout {
            return Err(fail("the cycle being received did not stop"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The record may have moved on while the cycle finished.
    if let Some(r) = ReplicaRecord::load(&dir) {
        rec = r;
    }
    let cp = rec.checkpoint.clone().unwrap_or(cp);
    for n in &rec.members {
        if !rec.promoted && pool.join(format!("{n}.lun")).symlink_metadata().is_ok() {
            return Err(MigrateError::Refused(format!(
                "pool {} already has a LUN named {n}",
                pool.display()
            )));
        }
        if reg.find(n).is_some() && !rec.promoted {
            return Err(MigrateError::Refused(format!(
                "this gateway serves a LUN named {n} already"
            )));
        }
    }
    let (d, p, r, name) = (dir.clone(), pool.clone(), rec.clone(), cp.name.clone());
    tokio::task::spawn_blocking(move || promote(&d, &p, r, &name))
        .await
        .map_err(fail)?
        .map_err(fail)?;
    let mut exports = Vec::new();
    for n in &rec.members {
        if reg.find(n).is_some() {
            continue;
        }
        let path = pool.join(format!("{n}.lun"));
        let l = ServedLun::open(
            &path,
            false,
            reg.control.as_deref(),
            reg.switch_stats.clone(),
            &settings.engine,
        )
        .map_err(fail)?;
        exports.extend(reg.adopt(Arc::new(l)).map_err(fail)?);
    }
    tracing::info!(lun = %rec.lun, checkpoint = %cp.name, ?exports, "replica failed over and served");
    Ok(FailedOver {
        lun: rec.lun,
        members: rec.members,
        checkpoint: cp,
        exports,
        aborted_cycle,
    })
}

/// Revert every member to checkpoint `name`, then move the files into the
/// pool (layers first; safe to repeat after a crash: `promoted` says the
/// revert is done).
fn promote(dir: &Path, pool: &Path, mut rec: ReplicaRecord, name: &str) -> Result<(), String> {
    if !rec.promoted {
        for m in &rec.shapes {
            let n = &m.name;
            let lun_path = dir.join(format!("{n}.lun"));
            let cfg = volume_config(&lun_path, m)?;
            let v = Volume::open(cfg).map_err(|e| format!("{n}: open the replica: {e}"))?;
            v.revert(name)
                .map_err(|e| format!("{n}: revert to {name}: {e}"))?;
            v.close().map_err(|e| format!("{n}: close: {e}"))?;
        }
        rec.promoted = true;
        rec.store(dir).map_err(|e| e.to_string())?;
    }
    for n in &rec.members {
        journal::move_if_present(
            &dir.join(format!("{n}.layers")),
            &pool.join(format!("{n}.layers")),
        )
        .map_err(|e| e.to_string())?;
    }
    for n in &rec.members {
        journal::move_if_present(
            &dir.join(format!("{n}.lun")),
            &pool.join(format!("{n}.lun")),
        )
        .map_err(|e| e.to_string())?;
    }
    journal::sync_dir(pool).map_err(|e| e.to_string())?;
    journal::remove_own_dir(dir).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_carry_their_sequence_number() {
        assert_eq!(seq_of("replica-12"), Some(12));
        assert_eq!(seq_of("replica-"), None);
        assert_eq!(seq_of("s1"), None);
        assert_eq!(seq_of("replica-x"), None);
    }
}
