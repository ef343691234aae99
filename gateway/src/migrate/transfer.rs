//! Moving bytes: the source's readers (a file's data, or ranges of a live
//! volume as data and zeros) that cut them into checksummed frames, the
//! sender that paces them (`--max-rate`) and keeps the manifest tally, and
//! the target's applier that verifies every piece, writes it to the
//! staging files or the staged volume, and keeps its own tally.
//!
//! Reading and applying are blocking I/O on the volume's synchronous API
//! (below the gate: a migration reads what guests wrote without taking
//! their places in the holding queue), so they run on threads of their
//! own and hand frames to the async connection through bounded channels.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lungate_api::migrate::{
    Data, Frame, Member, ObjectKind, ObjectRef, Tally, FILE_GRAIN, MAX_DATA,
};
use lungate_block::volume::header::Geometry;
use lungate_block::volume::layer::Delta;
use lungate_block::volume::manifest::{self, Manifest, Parent};
use lungate_block::volume::{Volume, VolumeConfig, VolumeOptions};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::protocol::{Link, LinkError};
use super::MigrateError;

// ----- source: what to read ----------------------------------------------

/// One piece of work for a reader thread.
pub enum Work {
    /// Every grid cell of a file that holds data (a frozen layer, the base
    /// of a layered LUN).
    File {
        object: ObjectRef,
        file: Arc<File>,
        len: u64,
    },
    /// The bytes of `ranges` of a file (the label region and GPT of a
    /// plain LUN).
    FileRanges {
        object: ObjectRef,
        file: Arc<File>,
        ranges: Vec<(u64, u64)>,
    },
    /// `ranges` (whole clusters) of a live volume, as data where it reads
    /// data and as zeros where it reads a hole; protected ranges are
    /// skipped (they are not the volume's to write).
    View {
        object: ObjectRef,
        volume: Arc<Volume>,
        ranges: Vec<(u64, u64)>,
    },
}

/// Bytes the work will send at most (for progress).
pub fn work_bytes(w: &[Work]) -> u64 {
    w.iter()
        .map(|w| match w {
            Work::File { file, len, .. } => lungate_block::sys::data_extents(file, 0, *len)
                .map(|v| v.iter().map(|e| e.1).sum())
                .unwrap_or(*len),
            Work::FileRanges { ranges, .. } | Work::View { ranges, .. } => {
                ranges.iter().map(|r| r.1).sum()
            }
        })
        .sum()
}

/// Merge sorted `(offset, len)` ranges that touch.
fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (o, l) in v {
        match out.last_mut() {
            Some((po, pl)) if *po + *pl >= o => *pl = (*pl).max(o + l - *po),
            _ => out.push((o, l)),
        }
    }
    out
}

/// The cells of `grain` holding data in `[0, len)` of `file`.
fn data_cells(file: &File, len: u64, grain: u64) -> io::Result<Vec<(u64, u64)>> {
    let cells = lungate_block::sys::data_extents(file, 0, len)?
        .into_iter()
        .map(|(o, l)| {
            let a = o / grain * grain;
            let b = (o + l).div_ceil(grain).saturating_mul(grain).min(len);
            (a, b - a)
        })
        .collect();
    Ok(merge(cells))
}

/// The clusters of a layered volume its live (top) layer holds, data or
/// zero entries: what the live layer's first pass copies. For a plain
/// volume, the clusters holding data.
pub fn live_clusters(v: &Volume) -> io::Result<Vec<(u64, u64)>> {
    let cs = v.cluster_size();
    let size = v.size();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |o: u64, l: u64| match out.last_mut() {
        Some((po, pl)) if *po + *pl == o => *pl += l,
        _ => out.push((o, l)),
    };
    if v.is_layered() {
        let top = v.chain()[0];
        let mut at = 0;
        while at < size {
            let l = cs.min(size - at);
            if v.locate(at).is_some_and(|(id, _)| id == top) {
                push(at, l);
            }
            at += l;
        }
    } else {
        let ext = v.extents(0, size).map_err(io::Error::other)?;
        for e in ext.into_iter().filter(|e| e.data) {
            let a = e.offset / cs * cs;
            let b = (e.offset + e.length)
                .div_ceil(cs)
                .saturating_mul(cs)
                .min(size);
            push(a, b - a);
        }
        out = merge(out);
    }
    Ok(out)
}

/// `[a, b)` minus the protected ranges, as consecutive pieces.
fn unprotected(a: u64, b: u64, protected: &[Range<u64>]) -> Vec<(u64, u64)> {
    let mut out = vec![(a, b)];
    for p in protected {
        out = out
            .into_iter()
            .flat_map(|(s, e)| {
                if p.end <= s || e <= p.start {
                    vec![(s, e)]
                } else {
                    let mut v = Vec::new();
                    if s < p.start {
                        v.push((s, p.start));
                    }
                    if p.end < e {
                        v.push((p.end, e));
                    }
                    v
                }
            })
            .collect();
    }
    out
}

type FrameTx = mpsc::Sender<io::Result<Frame>>;

fn read_file_range(
    tx: &FrameTx,
    object: ObjectRef,
    file: &File,
    o: u64,
    l: u64,
    grain: u32,
) -> io::Result<bool> {
    let mut at = o;
    while at < o + l {
        let n = (o + l - at).min(MAX_DATA as u64) as usize;
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, at)?;
        let f = Frame::Data(Data::new(object, at, grain, Bytes::from(buf)));
        if tx.blocking_send(Ok(f)).is_err() {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

fn read_view_range(
    tx: &FrameTx,
    object: ObjectRef,
    v: &Volume,
    o: u64,
    l: u64,
) -> io::Result<bool> {
    let cs = v.cluster_size();
    let grain = cs as u32;
    let window = (MAX_DATA as u64).max(cs) / cs * cs;
    let protected = v.protected().to_vec();
    let mut at = o;
    let end = o + l;
    while at < end {
        let w_end = (at + window).min(end);
        let ext = v.extents(at, w_end - at).map_err(io::Error::other)?;
        // Per cluster: data if any part of it reads data.
        let mut segs: Vec<(u64, u64, bool)> = Vec::new();
        let mut c = at;
        let mut ei = 0;
        while c < w_end {
            let ce = (c + cs).min(w_end);
            while ei < ext.len() && ext[ei].offset + ext[ei].length <= c {
                ei += 1;
            }
            let data = ext[ei..]
                .iter()
                .take_while(|e| e.offset < ce)
                .any(|e| e.data);
            for (s, e) in unprotected(c, ce, &protected) {
                match segs.last_mut() {
                    Some((_, pe, pd)) if *pe == s && *pd == data => *pe = e,
                    _ => segs.push((s, e, data)),
                }
            }
            c = ce;
        }
        for (s, e, data) in segs {
            let f = if data {
                let mut buf = vec![0u8; (e - s) as usize];
                v.read(s, &mut buf).map_err(io::Error::other)?;
                Frame::Data(Data::new(object, s, grain, Bytes::from(buf)))
            } else {
                Frame::Zero {
                    object,
                    offset: s,
                    grain,
                    length: e - s,
                }
            };
            if tx.blocking_send(Ok(f)).is_err() {
                return Ok(false);
            }
        }
        at = w_end;
    }
    Ok(true)
}

fn produce(work: Vec<Work>, tx: &FrameTx) -> io::Result<()> {
    for w in work {
        match w {
            Work::File { object, file, len } => {
                let g = u64::from(FILE_GRAIN);
                for (o, l) in data_cells(&file, len, g)? {
                    if !read_file_range(tx, object, &file, o, l, FILE_GRAIN)? {
                        return Ok(());
                    }
                }
            }
            Work::FileRanges {
                object,
                file,
                ranges,
            } => {
                for (o, l) in ranges {
                    if !read_file_range(tx, object, &file, o, l, FILE_GRAIN)? {
                        return Ok(());
                    }
                }
            }
            Work::View {
                object,
                volume,
                ranges,
            } => {
                for (o, l) in ranges {
                    if !read_view_range(tx, object, &volume, o, l)? {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}

/// Read `work` on a blocking thread; frames come out of the receiver in
/// order (an I/O error ends the stream).
pub fn read(work: Vec<Work>) -> mpsc::Receiver<io::Result<Frame>> {
    let (tx, rx) = mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = produce(work, &tx) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

// ----- source: sending ---------------------------------------------------

/// A token bucket: at most `rate` bytes per second, in bursts of 1/10 s.
pub struct RateLimit {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(rate: u64) -> RateLimit {
        RateLimit {
            rate: rate.max(1),
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    async fn take(&mut self, n: u64) {
        let rate = self.rate as f64;
        let burst = (rate / 10.0).max(MAX_DATA as f64);
        loop {
            let now = Instant::now();
            self.tokens =
                (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
            self.last = now;
            if self.tokens >= n as f64 {
                self.tokens -= n as f64;
                return;
            }
            let wait = (n as f64 - self.tokens) / rate;
            tokio::time::sleep(Duration::from_secs_f64(wait.min(0.1))).await;
        }
    }
}

/// The source's side of the byte stream: pacing, counts and the tally.
pub struct Sender {
    pub tally: Tally,
    pub frames: u64,
    pub bytes: u64,
    limit: Option<RateLimit>,
}

impl Sender {
    pub fn new(max_rate: Option<u64>) -> Sender {
        Sender {
            tally: Tally::default(),
            frames: 0,
            bytes: 0,
            limit: max_rate.map(RateLimit::new),
        }
    }

    /// Send every frame `rx` yields; `on_bytes` sees the running total.
    /// Returns the payload bytes sent.
    pub async fn pump(
        &mut self,
        link: &mut Link,
        mut rx: mpsc::Receiver<io::Result<Frame>>,
        abort: &CancellationToken,
        mut on_bytes: impl FnMut(u64),
    ) -> Result<u64, MigrateError> {
        let mut sent = 0u64;
        loop {
            let next = tokio::select! {
                _ = abort.cancelled() => return Err(MigrateError::Aborted("aborted by request".into())),
                f = rx.recv() => f,
            };
            let Some(f) = next else { break };
            let f = f.map_err(|e| MigrateError::Failed(format!("reading the source: {e}")))?;
            let n = self.tally.frame(&f);
            if let Some(l) = &mut self.limit {
                l.take(n).await;
            }
            link.feed(f).await.map_err(link_err)?;
            self.frames += 1;
            self.bytes += n;
            sent += n;
            on_bytes(self.bytes);
        }
        Ok(sent)
    }
}

pub fn link_err(e: LinkError) -> MigrateError {
    MigrateError::Failed(format!("migration connection: {e}"))
}

// ----- target: applying ---------------------------------------------------

/// One LUN being received, in the staging directory.
pub struct StageMember {
    pub info: Member,
    /// `STAGING/NAME.lun`.
    pub lun_path: PathBuf,
    file: Arc<File>,
    layers: HashMap<Uuid, (File, u64)>,
    volume: Option<Volume>,
}

impl StageMember {
    pub fn layers_dir(&self) -> PathBuf {
        lungate_block::store::file::layers_dir(&self.lun_path)
    }
}

/// The target's staging area of one migration: `POOL/.lungate-migrations/ID/`
/// holding `NAME.lun` and `NAME.layers/` of every member, as they will be
/// in the pool.
pub struct Stage {
    pub dir: PathBuf,
    pub members: Vec<StageMember>,
}

fn create_new(path: &Path, len: u64) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    f.set_len(len)?;
    Ok(f)
}

fn ctx(path: &Path, what: &str, e: impl std::fmt::Display) -> String {
    format!("{}: {what}: {e}", path.display())
}

impl Stage {
    /// Make the staging directory and every file the members need, empty
    /// and sparse at their final sizes.
    pub fn create(dir: PathBuf, members: &[Member]) -> Result<Stage, String> {
        std::fs::create_dir_all(&dir).map_err(|e| ctx(&dir, "create", e))?;
        let mut out = Vec::new();
        for m in members {
            let lun_path = dir.join(format!("{}.lun", m.name));
            let file =
                create_new(&lun_path, m.file_len).map_err(|e| ctx(&lun_path, "create", e))?;
            let mut layers = HashMap::new();
            if let Some(l) = &m.layers {
                let ldir = lungate_block::store::file::layers_dir(&lun_path);
                std::fs::create_dir(&ldir).map_err(|e| ctx(&ldir, "create", e))?;
                for f in &l.frozen {
                    let p = lungate_block::store::file::delta_path(&ldir, f.id);
                    let lf = create_new(&p, f.len).map_err(|e| ctx(&p, "create", e))?;
                    layers.insert(f.id, (lf, f.len));
                }
            }
            out.push(StageMember {
                info: m.clone(),
                lun_path,
                file: Arc::new(file),
                layers,
                volume: None,
            });
        }
        super::journal::sync_dir(&dir).map_err(|e| ctx(&dir, "fsync", e))?;
        Ok(Stage { dir, members: out })
    }

    fn member(&mut self, i: u16) -> Result<&mut StageMember, String> {
        let n = self.members.len();
        self.members
            .get_mut(usize::from(i))
            .ok_or_else(|| format!("member {i} does not exist (the migration has {n})"))
    }

    /// Every frozen file of member `i` is complete: make it durable,
    /// build the live layer and open the member's volume.
    pub fn files_done(&mut self, i: u16) -> Result<(), String> {
        let m = self.member(i)?;
        if m.volume.is_some() {
            return Err(format!("member {i}: files already complete"));
        }
        m.file
            .sync_all()
            .map_err(|e| ctx(&m.lun_path, "fsync", e))?;
        for (f, _) in m.layers.values() {
            f.sync_all()
                .map_err(|e| ctx(&m.lun_path, "fsync layer", e))?;
        }
        let info = m.info.clone();
        if let Some(l) = &info.layers {
            let dir = m.layers_dir();
            let got = blake3::hash(l.manifest.as_bytes()).to_hex().to_string();
            if got != l.manifest_blake3 {
                return Err(format!(
                    "member {}: the volume manifest's blake3 is {got}, the source sent {}",
                    info.name, l.manifest_blake3
                ));
            }
            let mut man: Manifest = serde_json::from_str(&l.manifest)
                .map_err(|e| format!("member {}: volume manifest: {e}", info.name))?;
            check_manifest(&man, &info)?;
            man.retired.clear();
            man.validate()
                .map_err(|e| format!("member {}: volume manifest: {e}", info.name))?;
            let geo = Geometry::new(u64::from(info.cluster_size), info.size).ok_or_else(|| {
                format!(
                    "member {}: cluster size {} and size {} make no geometry",
                    info.name, info.cluster_size, info.size
                )
            })?;
            let store =
                lungate_block::store::file::FileStore::new(&m.lun_path, m.file.clone(), None, true);
            let created = man
                .layers
                .iter()
                .find(|r| r.id == l.live)
                .map_or(0, |r| r.created);
            Delta::create(
                &store,
                l.live,
                l.live_parent,
                info.uuid,
                geo,
                created,
                man.checksums,
            )
            .map_err(|e| format!("member {}: live layer: {e}", info.name))?;
            manifest::store(&dir, &man, 1)
                .map_err(|e| format!("member {}: write manifest: {e}", info.name))?;
        }
        let cfg = VolumeConfig {
            lun_path: m.lun_path.clone(),
            file: m.file.clone(),
            lun_uuid: info.uuid,
            size: info.size,
            protected: info.protected.iter().map(|[a, b]| *a..*b).collect(),
            options: VolumeOptions {
                cluster_size: info.cluster_size,
                read_only: false,
            },
            engine: None,
        };
        let v = Volume::open(cfg).map_err(|e| format!("member {}: open volume: {e}", info.name))?;
        if v.cluster_size() != u64::from(info.cluster_size) {
            return Err(format!(
                "member {}: the staged volume has clusters of {} bytes, the source {}",
                info.name,
                v.cluster_size(),
                info.cluster_size
            ));
        }
        m.volume = Some(v);
        Ok(())
    }

    /// Verify a frame and write it where it belongs.
    pub fn apply(&mut self, f: &Frame) -> Result<(), String> {
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
        let m = self.member(object.member)?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| format!("{object}: offset {offset} + length {len} overflows"))?;
        let bounds = |limit: u64| {
            if end > limit {
                Err(format!(
                    "{object}: offset {offset} + length {len} exceeds its size {limit}"
                ))
            } else {
                Ok(())
            }
        };
        match object.kind {
            ObjectKind::Base | ObjectKind::Layer => {
                let (file, limit, name) = if object.kind == ObjectKind::Base {
                    (&*m.file, m.info.file_len, m.lun_path.clone())
                } else {
                    let (f, l) = m.layers.get(&object.layer).ok_or_else(|| {
                        format!("{object}: not a frozen layer of member {}", m.info.name)
                    })?;
                    (f, *l, m.layers_dir())
                };
                bounds(limit)?;
                match f {
                    Frame::Data(d) => file
                        .write_all_at(&d.payload, offset)
                        .map_err(|e| ctx(&name, "write", e)),
                    _ => lungate_block::sys::zero_range(file, offset, len)
                        .map_err(|e| ctx(&name, "zero", e)),
                }
            }
            ObjectKind::View => {
                bounds(m.info.size)?;
                let v = m.volume.as_ref().ok_or_else(|| {
                    format!(
                        "{object}: live data before the member's files were complete (no files-done)"
                    )
                })?;
                match f {
                    Frame::Data(d) => v.write(offset, &d.payload),
                    _ => v.write_zeroes(offset, len, true),
                }
                .map_err(|e| format!("{object}: {e}"))
            }
        }
    }

    /// Make what arrived so far durable (at the end of each round, so the
    /// commit, inside the guests' pause, has only the last round to flush).
    pub fn sync(&mut self) -> Result<(), String> {
        for m in &mut self.members {
            if let Some(v) = &m.volume {
                v.flush()
                    .map_err(|e| format!("member {}: flush: {e}", m.info.name))?;
            }
            m.file
                .sync_all()
                .map_err(|e| ctx(&m.lun_path, "fsync", e))?;
        }
        Ok(())
    }

    /// Make everything durable and close the staged volumes (they are
    /// opened again, in the pool, by the commit).
    pub fn close(&mut self) -> Result<(), String> {
        for m in &mut self.members {
            let Some(v) = m.volume.take() else {
                return Err(format!(
                    "member {}: never got its files-done: nothing to commit",
                    m.info.name
                ));
            };
            v.close()
                .map_err(|e| format!("member {}: flush: {e}", m.info.name))?;
            m.file
                .sync_all()
                .map_err(|e| ctx(&m.lun_path, "fsync", e))?;
        }
        Ok(())
    }
}

/// The manifest must be the member's: same LUN, size, cluster size, live
/// layer, and no layer of another volume unless that volume moves too.
fn check_manifest(man: &Manifest, m: &Member) -> Result<(), String> {
    let l = m.layers.as_ref().expect("a layered member");
    if man.lun != m.uuid || man.size != m.size || man.cluster_size != m.cluster_size {
        return Err(format!(
            "member {}: the volume manifest is for LUN {} of {} bytes in clusters of {}, not LUN {} of {} in {}",
            m.name, man.lun, man.size, man.cluster_size, m.uuid, m.size, m.cluster_size
        ));
    }
    if man.top != l.live {
        return Err(format!(
            "member {}: the manifest's live layer is {}, the source said {}",
            m.name, man.top, l.live
        ));
    }
    for rec in &man.layers {
        if rec.id != l.live && !l.frozen.iter().any(|f| f.id == rec.id) {
            return Err(format!(
                "member {}: the manifest names layer {} that the source does not send",
                m.name, rec.id
            ));
        }
        if let Parent::External { dir, .. } = &rec.parent {
            if dir.components().count() != 1 {
                return Err(format!(
                    "member {}: layer {} has its parent in {} outside the pool",
                    m.name,
                    rec.id,
                    dir.display()
                ));
            }
        }
    }
    Ok(())
}

/// Work for the applier thread.
pub enum Job {
    Frame(Frame),
    FilesDone(u16),
    /// Answer once everything before is applied (or the first error).
    Barrier(oneshot::Sender<Result<(), String>>),
    /// Apply the rest, then close the stage and hand back the tally.
    Close(oneshot::Sender<Result<(Tally, u64, u64), String>>),
}

/// The applier: a thread that owns the [`Stage`] and applies jobs in
/// order. The first error stops it applying; barriers report it.
pub struct Applier {
    tx: std::sync::mpsc::SyncSender<Job>,
    thread: Option<std::thread::JoinHandle<Stage>>,
}

impl Applier {
    pub fn start(mut stage: Stage) -> Applier {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(32);
        let thread = std::thread::Builder::new()
            .name("lungate-migrate-apply".into())
            .spawn(move || {
                let mut tally = Tally::default();
                let (mut frames, mut bytes) = (0u64, 0u64);
                let mut failed: Option<String> = None;
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Frame(f) if failed.is_none() => match stage.apply(&f) {
                            Ok(()) => {
                                frames += 1;
                                bytes += tally.frame(&f);
                            }
                            Err(e) => failed = Some(e),
                        },
                        Job::FilesDone(m) if failed.is_none() => {
                            if let Err(e) = stage.files_done(m) {
                                failed = Some(e);
                            }
                        }
                        Job::Frame(_) | Job::FilesDone(_) => {}
                        Job::Barrier(r) => {
                            if failed.is_none() {
                                if let Err(e) = stage.sync() {
                                    failed = Some(e);
                                }
                            }
                            let _ = r.send(failed.clone().map_or(Ok(()), Err));
                        }
                        Job::Close(r) => {
                            let res = match failed.clone() {
                                Some(e) => Err(e),
                                None => stage
                                    .close()
                                    .map(|()| (std::mem::take(&mut tally), frames, bytes)),
                            };
                            let _ = r.send(res);
                            break;
                        }
                    }
                }
                stage
            })
            .expect("spawn the applier thread");
        Applier {
            tx,
            thread: Some(thread),
        }
    }

    /// Queue a job (waits while the applier is 32 jobs behind).
    pub async fn send(&self, job: Job) -> Result<(), String> {
        let tx = self.tx.clone();
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Full(job)) => {
                tokio::task::spawn_blocking(move || tx.send(job))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|_| "the applier stopped".to_string())
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                Err("the applier stopped".into())
            }
        }
    }

    /// Wait until every job queued so far is applied.
    pub async fn barrier(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Barrier(tx)).await?;
        rx.await.map_err(|_| "the applier stopped".to_string())?
    }

    /// Apply the rest and close the stage: the target's tally, frames and
    /// bytes.
    pub async fn close(&self) -> Result<(Tally, u64, u64), String> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Close(tx)).await?;
        rx.await.map_err(|_| "the applier stopped".to_string())?
    }

    /// Stop the thread and get the stage back (its files stay where they
    /// are until the caller moves or removes them).
    pub async fn stop(mut self) -> Option<Stage> {
        let (tx, rx) = oneshot::channel();
        let _ = self.send(Job::Close(tx)).await;
        drop(rx);
        let t = self.thread.take()?;
        tokio::task::spawn_blocking(move || t.join().ok())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        // The thread ends when the channel closes; it is not joined here
        // (it may be applying a last frame).
        let _ = self.thread.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_ranges_are_cut_out_of_a_piece() {
        let p = vec![0..10, 20..30];
        assert_eq!(unprotected(0, 40, &p), vec![(10, 20), (30, 40)]);
        assert_eq!(unprotected(12, 18, &p), vec![(12, 18)]);
        assert!(unprotected(22, 28, &p).is_empty());
    }

    #[test]
    fn ranges_merge_when_they_touch_or_overlap() {
        assert_eq!(
            merge(vec![(10, 5), (0, 10), (30, 1), (14, 4)]),
            vec![(0, 18), (30, 1)]
        );
    }
}
