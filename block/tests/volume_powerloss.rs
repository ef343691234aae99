//! Crash points at scale on the volume engine, with a power-loss model (as
//! CrashMonkey does it): a random workload of writes, trims, flushes,
//! snapshots, reverts, snapshot deletes, clones and flattens runs on real
//! volumes in a real pool directory, through a store that passes every call
//! to the real file store and records, in order, every write, hole punch,
//! length change and barrier (`fdatasync`) that reaches a file, and every
//! layer creation, removal and manifest commit. Then, for each crash point
//! (a prefix of that record), a fresh pool is built from the record on a
//! real file system and every volume is opened on it as a restarted
//! gateway would:
//!
//! * **kill** images apply the whole prefix: what a SIGKILL leaves (every
//!   write the process issued reached the page cache);
//! * **power-loss** images apply what was durable at that point (every
//!   write to a file before its last barrier, every created layer and
//!   committed manifest) and, of the writes still unflushed, keep some,
//!   drop some and tear others at a sector or cluster boundary; removals
//!   not yet made durable by a directory sync may be undone.
//!
//! After each point every volume must open, every sector must read its
//! value at the last completed flush or a value written after it (never
//! anything else), every snapshot the workload completed must be listed
//! and read back exactly as the data was when it was taken, no snapshot may
//! be listed that the workload never asked for, a completed revert must
//! show the snapshot's contents exactly, and a clone (once its store is
//! published) must read exactly its snapshot.
//!
//! `cargo test -p lungate-block --test volume_powerloss` runs the default
//! (one workload of 300 steps, 1000 kill and 1000 power-loss points);
//! `CRASH_LONG=1` is the soak mode (3000 steps, 10000 points of each),
//! `POWERLOSS_STEPS=N POWERLOSS_POINTS=M` set the counts,
//! `POWERLOSS_SEED=S` replays a run.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lungate_block::device::{BlockDevice, Caps, Extent, IoFuture};
use lungate_block::store::file::{layers_dir, FileStore};
use lungate_block::store::{hook, Object, Store};
use lungate_block::volume::manifest::{Loaded, Manifest};
use lungate_block::volume::{Result, Volume, VolumeConfig, VolumeOptions};
use uuid::Uuid;

const CS: u64 = 4096;
const SECTOR: u64 = 512;
/// Sectors per volume (512 KiB: 128 clusters).
const SECTORS: u64 = 1024;
const SIZE: u64 = SECTORS * SECTOR;
const MAX_VOLUMES: usize = 4;

// ----- what reached the files ----------------------------------------------

/// A file of the pool: a volume's base (its LUN file) or one of its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Base(usize),
    Layer(usize, Uuid),
}

#[derive(Debug, Clone)]
enum Rec {
    /// Workload step `k` begins.
    Step(usize),
    /// The test made volume `v`'s LUN file (empty, sparse).
    NewLun(usize),
    Write(Key, u64, Arc<[u8]>),
    Zero(Key, u64, u64),
    SetLen(Key, u64),
    /// `fdatasync`: every earlier write to this file is durable.
    Sync(Key),
    /// Durable with its name when the store returned it.
    Create(usize, Uuid, Arc<[u8]>, u64),
    Remove(usize, Uuid),
    /// Atomic and durable when the store returned.
    Commit(usize, Box<Manifest>, u64),
}

#[derive(Default)]
struct Log(Mutex<Vec<Rec>>);

impl Log {
    fn push(&self, r: Rec) {
        self.0.lock().unwrap().push(r);
    }
}

/// An object that records what is written to it before passing it on.
struct RecObject {
    key: Key,
    inner: Arc<dyn Object>,
    log: Arc<Log>,
}

impl BlockDevice for RecObject {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> Caps {
        self.inner.caps()
    }
    fn read(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
        self.inner.read(offset, len)
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        self.log
            .push(Rec::Write(self.key, offset, data.to_vec().into()));
        if fua {
            self.log.push(Rec::Sync(self.key));
        }
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> IoFuture<()> {
        self.log.push(Rec::Sync(self.key));
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> IoFuture<()> {
        self.log.push(Rec::Zero(self.key, offset, len));
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<()> {
        self.log.push(Rec::Zero(self.key, offset, len));
        self.inner.write_zeroes(offset, len, may_trim)
    }
    fn extents(&self, offset: u64, len: u64) -> IoFuture<Vec<Extent>> {
        self.inner.extents(offset, len)
    }
    fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
        self.inner.cache(offset, len)
    }
}

impl Object for RecObject {
    fn name(&self) -> &Path {
        self.inner.name()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.log.push(Rec::Write(self.key, offset, buf.into()));
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        // Logged after it returns: a crash before that may lose the writes.
        let r = self.inner.sync();
        self.log.push(Rec::Sync(self.key));
        r
    }
    fn byte_len(&self) -> io::Result<u64> {
        self.inner.byte_len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.log.push(Rec::SetLen(self.key, len));
        self.inner.set_len(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.log.push(Rec::Zero(self.key, offset, len));
        self.inner.zero_range(offset, len)
    }
    fn data_extents(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        self.inner.data_extents(start, end)
    }
    fn stored_bytes(&self) -> u64 {
        self.inner.stored_bytes()
    }
    fn will_need(&self, offset: u64, len: u64) {
        self.inner.will_need(offset, len)
    }
    fn is_block_device(&self) -> bool {
        false
    }
}

/// The file store of volume `vol`, recording into `log`.
struct RecStore {
    vol: usize,
    inner: Arc<dyn Store>,
    base: Arc<dyn Object>,
    log: Arc<Log>,
}

impl RecStore {
    fn new(vol: usize, inner: Arc<dyn Store>, log: Arc<Log>) -> RecStore {
        let base: Arc<dyn Object> = Arc::new(RecObject {
            key: Key::Base(vol),
            inner: inner.base().clone(),
            log: log.clone(),
        });
        RecStore {
            vol,
            inner,
            base,
            log,
        }
    }
    fn wrap(&self, id: Uuid, o: Arc<dyn Object>) -> Arc<dyn Object> {
        Arc::new(RecObject {
            key: Key::Layer(self.vol, id),
            inner: o,
            log: self.log.clone(),
        })
    }
}

/// Make every store the engine builds on this thread for a LUN in `luns`
/// (its path, the volume's index) a recording one (block/src/store/hook.rs).
fn record_stores(luns: Rc<RefCell<HashMap<PathBuf, usize>>>, log: Arc<Log>) {
    hook::set_wrapper(Some(Rc::new(move |s: Arc<dyn Store>| {
        let vol = luns.borrow().get(s.base().name()).copied();
        match vol {
            Some(v) => Arc::new(RecStore::new(v, s, log.clone())) as Arc<dyn Store>,
            None => s,
        }
    })));
}

impl Store for RecStore {
    fn base(&self) -> &Arc<dyn Object> {
        &self.base
    }
    fn location(&self) -> &Path {
        self.inner.location()
    }
    fn exists(&self) -> bool {
        self.inner.exists()
    }
    fn create_layer(&self, id: Uuid, initial: &[u8], len: u64) -> Result<Arc<dyn Object>> {
        let o = self.inner.create_layer(id, initial, len)?;
        self.log
            .push(Rec::Create(self.vol, id, initial.into(), len));
        Ok(self.wrap(id, o))
    }
    fn open_layer(&self, id: Uuid, writable: bool) -> Result<Arc<dyn Object>> {
        let o = self.inner.open_layer(id, writable)?;
        Ok(self.wrap(id, o))
    }
    fn list_layers(&self) -> Result<Vec<Uuid>> {
        self.inner.list_layers()
    }
    fn has_layer(&self, id: Uuid) -> bool {
        self.inner.has_layer(id)
    }
    fn remove_layer(&self, id: Uuid) -> Result<()> {
        self.log.push(Rec::Remove(self.vol, id));
        self.inner.remove_layer(id)
    }
    fn load_manifest(&self) -> Result<Option<Loaded>> {
        self.inner.load_manifest()
    }
    fn commit_manifest(&self, m: &Manifest, generation: u64) -> Result<()> {
        self.inner.commit_manifest(m, generation)?;
        self.log
            .push(Rec::Commit(self.vol, Box::new(m.clone()), generation));
        Ok(())
    }
    fn reference(&self) -> PathBuf {
        self.inner.reference()
    }
    fn recover(&self, lun: Uuid) -> Result<Vec<String>> {
        self.inner.recover(lun)
    }
}

// ----- the workload and its model ------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, Clone)]
enum Step {
    Write {
        v: usize,
        sector: u64,
        n: u64,
        id: u64,
    },
    Trim {
        v: usize,
        sector: u64,
        n: u64,
    },
    Flush {
        v: usize,
    },
    Snapshot {
        v: usize,
        name: String,
    },
    Revert {
        v: usize,
        name: String,
    },
    Delete {
        v: usize,
        name: String,
    },
    Clone {
        v: usize,
        name: String,
        new: usize,
    },
    Flatten {
        v: usize,
    },
}

/// The value a write stamps into each of its sectors: nonzero, and naming
/// the write and the sector, so a read tells exactly where bytes came from.
fn stamp(id: u64, sector: u64) -> u64 {
    (1 << 63) | (id << 20) | sector
}

fn fill(buf: &mut [u8], id: u64, first: u64) {
    for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
        let v = stamp(id, first + i as u64).to_le_bytes();
        for w in s.chunks_mut(8) {
            w.copy_from_slice(&v);
        }
    }
}

/// Sector values of a whole volume image (`None`: a sector mixing values,
/// which no write ever produced).
fn sectors(buf: &[u8]) -> Vec<Option<u64>> {
    buf.chunks(SECTOR as usize)
        .map(|s| {
            // Made of one 8-byte value iff it equals itself shifted by 8
            // (one memcmp: this runs over every sector of every image).
            (s[8..] == s[..s.len() - 8]).then(|| u64::from_le_bytes(s[..8].try_into().unwrap()))
        })
        .collect()
}

/// What the client knows about one volume.
#[derive(Clone)]
struct VolModel {
    cur: Vec<u64>,
    /// At the last completed flush (or operation that flushes).
    durable: Vec<u64>,
    /// Values written since then, per sector.
    pending: Vec<Vec<u64>>,
    snaps: BTreeMap<String, Vec<u64>>,
}

impl VolModel {
    fn new(content: Vec<u64>) -> VolModel {
        VolModel {
            durable: content.clone(),
            pending: vec![Vec::new(); content.len()],
            cur: content,
            snaps: BTreeMap::new(),
        }
    }
    fn settle(&mut self) {
        self.durable.clone_from(&self.cur);
        self.pending.iter_mut().for_each(Vec::clear);
    }
    fn set(&mut self, s: u64, v: u64) {
        self.cur[s as usize] = v;
        self.pending[s as usize].push(v);
    }
}

#[derive(Clone, Default)]
struct Model {
    vols: Vec<Option<VolModel>>,
}

impl Model {
    /// The effect of a completed step.
    fn apply(&mut self, step: &Step) {
        match step {
            Step::Write { v, sector, n, id } => {
                let m = self.vols[*v].as_mut().unwrap();
                for s in *sector..sector + n {
                    m.set(s, stamp(*id, s));
                }
            }
            Step::Trim { v, sector, n } => {
                let m = self.vols[*v].as_mut().unwrap();
                for s in *sector..sector + n {
                    m.set(s, 0);
                }
            }
            Step::Flush { v } => self.vols[*v].as_mut().unwrap().settle(),
            Step::Snapshot { v, name } => {
                let m = self.vols[*v].as_mut().unwrap();
                m.snaps.insert(name.clone(), m.cur.clone());
                m.settle();
            }
            Step::Revert { v, name } => {
                let m = self.vols[*v].as_mut().unwrap();
                m.cur = m.snaps[name].clone();
                m.settle();
            }
            Step::Delete { v, name } => {
                self.vols[*v].as_mut().unwrap().snaps.remove(name);
            }
            Step::Clone { v, name, new } => {
                let c = self.vols[*v].as_ref().unwrap().snaps[name].clone();
                if self.vols.len() <= *new {
                    self.vols.resize(new + 1, None);
                }
                self.vols[*new] = Some(VolModel::new(c));
            }
            Step::Flatten { .. } => {}
        }
    }
}

struct World {
    dir: tempfile::TempDir,
    log: Arc<Log>,
    vols: Vec<Volume>,
    uuids: Vec<Uuid>,
    steps: Vec<Step>,
    model: Model,
    next: u64,
    /// LUN paths whose stores record, and their volume's index.
    luns: Rc<RefCell<HashMap<PathBuf, usize>>>,
}

fn name_of(v: usize) -> String {
    format!("v{v}")
}

fn new_lun(dir: &Path, v: usize) -> (PathBuf, Arc<File>) {
    let path = dir.join(format!("{}.lun", name_of(v)));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    f.set_len(SIZE).unwrap();
    (path, Arc::new(f))
}

fn cfg(path: PathBuf, file: Arc<File>, uuid: Uuid) -> VolumeConfig {
    VolumeConfig {
        lun_path: path,
        file,
        lun_uuid: uuid,
        size: SIZE,
        protected: vec![],
        options: VolumeOptions {
            cluster_size: CS as u32,
            read_only: false,
        },
        engine: None,
    }
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Log::default());
        log.push(Rec::NewLun(0));
        let (path, file) = new_lun(dir.path(), 0);
        let uuid = Uuid::new_v4();
        let luns = Rc::new(RefCell::new(HashMap::from([(path.clone(), 0)])));
        record_stores(luns.clone(), log.clone());
        let vol = Volume::open(cfg(path, file, uuid)).unwrap();
        World {
            dir,
            log,
            vols: vec![vol],
            uuids: vec![uuid],
            steps: Vec::new(),
            model: Model {
                vols: vec![Some(VolModel::new(vec![0; SECTORS as usize]))],
            },
            next: 1,
            luns,
        }
    }

    /// Choose a valid step for the current model.
    fn choose(&mut self, rng: &mut Rng) -> Step {
        let v = rng.below(self.vols.len() as u64) as usize;
        let m = self.model.vols[v].as_ref().unwrap();
        let snaps: Vec<&String> = m.snaps.keys().collect();
        let pick = |rng: &mut Rng| snaps[rng.below(snaps.len() as u64) as usize].clone();
        let r = rng.below(100);
        let sector = rng.below(SECTORS);
        let n = (1 + rng.below(24)).min(SECTORS - sector);
        self.next += 1;
        match r {
            0..=54 => Step::Write {
                v,
                sector,
                n,
                id: self.next,
            },
            55..=61 => Step::Trim { v, sector, n },
            62..=74 => Step::Flush { v },
            75..=81 => Step::Snapshot {
                v,
                name: format!("s{}", self.next),
            },
            82..=86 if !snaps.is_empty() => Step::Revert { v, name: pick(rng) },
            87..=92 if !snaps.is_empty() => Step::Delete { v, name: pick(rng) },
            93..=95 if !snaps.is_empty() && self.vols.len() < MAX_VOLUMES => Step::Clone {
                v,
                name: pick(rng),
                new: self.vols.len(),
            },
            96..=99 => Step::Flatten { v },
            _ => Step::Flush { v },
        }
    }

    fn run(&mut self, step: Step) {
        self.log.push(Rec::Step(self.steps.len()));
        match &step {
            Step::Write { v, sector, n, id } => {
                let mut b = vec![0u8; (n * SECTOR) as usize];
                fill(&mut b, *id, *sector);
                self.vols[*v].write(sector * SECTOR, &b).unwrap();
            }
            Step::Trim { v, sector, n } => self.vols[*v].trim(sector * SECTOR, n * SECTOR).unwrap(),
            Step::Flush { v } => self.vols[*v].flush().unwrap(),
            Step::Snapshot { v, name } => drop(self.vols[*v].snapshot(name, "").unwrap()),
            Step::Revert { v, name } => self.vols[*v].revert(name).unwrap(),
            Step::Delete { v, name } => self.vols[*v].delete_snapshot(name).unwrap(),
            Step::Clone { v, name, new } => {
                self.log.push(Rec::NewLun(*new));
                let (path, file) = new_lun(self.dir.path(), *new);
                let uuid = Uuid::new_v4();
                self.luns.borrow_mut().insert(path.clone(), *new);
                let c = self.vols[*v].clone_to(name, cfg(path, file, uuid)).unwrap();
                self.vols.push(c);
                self.uuids.push(uuid);
            }
            Step::Flatten { v } => self.vols[*v].flatten(|_, _| {}).unwrap(),
        }
        self.model.apply(&step);
        self.steps.push(step);
    }
}

// ----- building a crash image ------------------------------------------------

/// How a crash treats what was not yet durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// SIGKILL: everything the process issued survives.
    Kill,
    /// Power loss: unflushed writes kept, dropped or torn (seeded).
    Power(u64),
}

struct Image {
    dir: tempfile::TempDir,
    luns: Vec<Option<(PathBuf, Arc<File>)>>,
}

/// Where crash images are built: memory-backed if the machine has it (the
/// images are many and short-lived), else the temporary directory.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

fn build(log: &[Rec], crash: Crash) -> Image {
    let img = Image {
        dir: scratch(),
        luns: Vec::new(),
    };
    let mut img = img;
    // Which records were durable: a write before its file's last barrier,
    // a removal before its store's next directory sync.
    let mut last_sync: HashMap<Key, usize> = HashMap::new();
    let mut last_dirsync: HashMap<usize, usize> = HashMap::new();
    let mut published: BTreeSet<usize> = BTreeSet::new();
    for (i, r) in log.iter().enumerate() {
        match r {
            Rec::Sync(k) => {
                last_sync.insert(*k, i);
            }
            Rec::Create(v, ..) => {
                last_dirsync.insert(*v, i);
            }
            Rec::Commit(v, ..) if published.insert(*v) => {
                last_dirsync.insert(*v, i);
            }
            _ => {}
        }
    }
    let mut rng = Rng(match crash {
        Crash::Kill => 0,
        Crash::Power(s) => s,
    });
    let mut stores: HashMap<usize, FileStore> = HashMap::new();
    let mut objects: HashMap<Key, Arc<dyn Object>> = HashMap::new();
    for (i, r) in log.iter().enumerate() {
        let key = match r {
            Rec::Write(k, ..) | Rec::Zero(k, ..) | Rec::SetLen(k, ..) => Some(*k),
            _ => None,
        };
        let durable = match (crash, key) {
            (Crash::Kill, _) => true,
            (_, Some(k)) => last_sync.get(&k).is_some_and(|s| i < *s),
            _ => true,
        };
        let obj = |objects: &mut HashMap<Key, Arc<dyn Object>>,
                   stores: &HashMap<usize, FileStore>,
                   k: Key|
         -> Option<Arc<dyn Object>> {
            if let Some(o) = objects.get(&k) {
                return Some(o.clone());
            }
            let o = match k {
                Key::Base(v) => stores.get(&v)?.base().clone(),
                Key::Layer(v, id) => stores.get(&v)?.open_layer(id, true).ok()?,
            };
            objects.insert(k, o.clone());
            Some(o)
        };
        match r {
            Rec::Step(_) => {}
            Rec::NewLun(v) => {
                let (path, file) = new_lun(img.dir.path(), *v);
                if img.luns.len() <= *v {
                    img.luns.resize(v + 1, None);
                }
                stores.insert(*v, FileStore::new(&path, file.clone(), None, true));
                img.luns[*v] = Some((path, file));
            }
            Rec::Write(k, off, data) => {
                let Some(o) = obj(&mut objects, &stores, *k) else {
                    continue;
                };
                if durable || rng.chance(40) {
                    o.write_at(data, *off).unwrap();
                } else if rng.chance(50) {
                    // Torn: some sectors or clusters of it landed.
                    let g = if rng.chance(50) { SECTOR } else { CS };
                    let end = off + data.len() as u64;
                    let mut at = *off;
                    while at < end {
                        let piece_end = ((at / g + 1) * g).min(end);
                        if rng.chance(50) {
                            let a = (at - off) as usize;
                            let b = (piece_end - off) as usize;
                            o.write_at(&data[a..b], at).unwrap();
                        }
                        at = piece_end;
                    }
                }
            }
            Rec::Zero(k, off, len) => {
                let Some(o) = obj(&mut objects, &stores, *k) else {
                    continue;
                };
                if durable || rng.chance(50) {
                    o.zero_range(*off, *len).unwrap();
                }
            }
            Rec::SetLen(k, len) => {
                let Some(o) = obj(&mut objects, &stores, *k) else {
                    continue;
                };
                if durable || rng.chance(50) {
                    o.set_len(*len).unwrap();
                }
            }
            Rec::Sync(_) => {}
            Rec::Create(v, id, initial, len) => {
                stores[v].create_layer(*id, initial, *len).unwrap();
            }
            Rec::Remove(v, id) => {
                let durable =
                    matches!(crash, Crash::Kill) || last_dirsync.get(v).is_some_and(|s| i < *s);
                if durable || rng.chance(50) {
                    objects.remove(&Key::Layer(*v, *id));
                    stores[v].remove_layer(*id).unwrap();
                }
            }
            Rec::Commit(v, m, g) => stores[v].commit_manifest(m, *g).unwrap(),
        }
    }
    img
}

// ----- checking an image against the model -----------------------------------

fn read_all(v: &Volume) -> Vec<Option<u64>> {
    let mut b = vec![0u8; SIZE as usize];
    v.read(0, &mut b).unwrap();
    sectors(&b)
}

fn exact(got: &[Option<u64>], want: &[u64]) -> Option<String> {
    got.iter()
        .zip(want)
        .enumerate()
        .find(|(_, (g, w))| **g != Some(**w))
        .map(|(s, (g, w))| format!("sector {s} reads {g:x?}, want {w:x}"))
}

/// Live contents allowed while `inflight` (if any) had not completed.
fn allowed(m: &VolModel, v: usize, inflight: Option<&Step>, got: &[Option<u64>]) -> Option<String> {
    let mut extra: HashMap<u64, u64> = HashMap::new();
    match inflight {
        Some(Step::Write {
            v: w,
            sector,
            n,
            id,
        }) if *w == v => {
            for s in *sector..sector + n {
                extra.insert(s, stamp(*id, s));
            }
        }
        Some(Step::Trim { v: w, sector, n }) if *w == v => {
            for s in *sector..sector + n {
                extra.insert(s, 0);
            }
        }
        _ => {}
    }
    let per_sector = got.iter().enumerate().find_map(|(s, g)| {
        let ok = g.is_some_and(|g| {
            g == m.durable[s] || m.pending[s].contains(&g) || extra.get(&(s as u64)) == Some(&g)
        });
        (!ok).then(|| {
            format!(
                "sector {s} reads {g:x?}; flushed {:x}, written since {:x?}",
                m.durable[s], m.pending[s]
            )
        })
    });
    match (per_sector, inflight) {
        (None, _) => None,
        (Some(e), Some(Step::Revert { v: w, name })) if *w == v => {
            // The revert may have committed: then exactly the snapshot.
            exact(got, &m.snaps[name]).map(|e2| format!("{e} (not reverted); {e2} (reverted)"))
        }
        (Some(e), _) => Some(e),
    }
}

/// Open every volume of `img` and check it; `Err` says what is wrong.
fn check(
    w: &World,
    img: &Image,
    model: &Model,
    inflight: Option<&Step>,
) -> std::result::Result<(), String> {
    let clone_target = match inflight {
        Some(Step::Clone { new, .. }) => Some(*new),
        _ => None,
    };
    for (v, lun) in img.luns.iter().enumerate() {
        let Some((path, file)) = lun else { continue };
        let m = model.vols.get(v).and_then(Option::as_ref);
        if m.is_none() && clone_target != Some(v) {
            continue;
        }
        if m.is_none() && !layers_dir(path).is_dir() {
            // A clone whose store was never published: not a clone yet.
            continue;
        }
        let vol = Volume::open(cfg(path.clone(), file.clone(), w.uuids[v]))
            .map_err(|e| format!("volume {v} does not open: {e}"))?;
        let got = read_all(&vol);
        let listed: BTreeSet<String> = vol.snapshots().into_iter().map(|s| s.name).collect();
        let Some(m) = m else {
            // The clone in flight, published: exactly its snapshot.
            let Some(Step::Clone { v: p, name, .. }) = inflight else {
                unreachable!()
            };
            let want = &model.vols[*p].as_ref().unwrap().snaps[name];
            if let Some(e) = exact(&got, want) {
                return Err(format!("clone {v} of {name}, published: {e}"));
            }
            vol.crash();
            continue;
        };
        if let Some(e) = allowed(m, v, inflight, &got) {
            return Err(format!("volume {v}: {e}"));
        }
        let optional = match inflight {
            Some(Step::Snapshot { v: x, name }) | Some(Step::Delete { v: x, name }) if *x == v => {
                Some(name.clone())
            }
            _ => None,
        };
        for name in m.snaps.keys() {
            if !listed.contains(name) && optional.as_ref() != Some(name) {
                return Err(format!("volume {v}: snapshot {name} is gone"));
            }
        }
        for name in &listed {
            let want = match m.snaps.get(name) {
                Some(s) => s.clone(),
                // A snapshot in flight that committed holds the live data
                // as it was (the snapshot flushed it first).
                None if optional.as_ref() == Some(name) => m.cur.clone(),
                None => return Err(format!("volume {v}: unknown snapshot {name}")),
            };
            let mut b = vec![0u8; SIZE as usize];
            vol.read_snapshot(name, 0, &mut b)
                .map_err(|e| format!("volume {v}: snapshot {name} does not read: {e}"))?;
            if let Some(e) = exact(&sectors(&b), &want) {
                return Err(format!("volume {v}: snapshot {name}: {e}"));
            }
        }
        vol.crash();
    }
    Ok(())
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn every_kill_and_power_loss_point_keeps_flushed_writes_and_snapshots() {
    let seed = env(
        "POWERLOSS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let long = env("CRASH_LONG", 0) != 0;
    let steps = env("POWERLOSS_STEPS", if long { 3000 } else { 300 });
    let points = env("POWERLOSS_POINTS", if long { 10_000 } else { 1000 });
    eprintln!("POWERLOSS_SEED={seed} POWERLOSS_STEPS={steps} POWERLOSS_POINTS={points}");
    let started = std::time::Instant::now();
    let mut rng = Rng(seed);
    let mut w = World::new();
    for _ in 0..steps {
        let s = w.choose(&mut rng);
        w.run(s);
    }
    for v in std::mem::take(&mut w.vols) {
        v.crash();
    }
    hook::set_wrapper(None);
    let log = w.log.0.lock().unwrap().clone();
    let kinds = |f: &dyn Fn(&Step) -> bool| w.steps.iter().filter(|s| f(s)).count();
    eprintln!(
        "{} steps ({} writes, {} trims, {} flushes, {} snapshots, {} reverts, {} deletes, {} clones, {} flattens), {} records, in {:?}",
        w.steps.len(),
        kinds(&|s| matches!(s, Step::Write { .. })),
        kinds(&|s| matches!(s, Step::Trim { .. })),
        kinds(&|s| matches!(s, Step::Flush { .. })),
        kinds(&|s| matches!(s, Step::Snapshot { .. })),
        kinds(&|s| matches!(s, Step::Revert { .. })),
        kinds(&|s| matches!(s, Step::Delete { .. })),
        kinds(&|s| matches!(s, Step::Clone { .. })),
        kinds(&|s| matches!(s, Step::Flatten { .. })),
        log.len(),
        started.elapsed()
    );

    // Crash points: `points` of each kind, spread over the record (every
    // record boundary when there are fewer), ascending.
    let n = log.len() as u64;
    let pick = |count: u64, salt: u64| -> Vec<usize> {
        if count > n {
            return (0..=log.len()).collect();
        }
        let mut r = Rng(seed ^ salt);
        let mut v: BTreeSet<usize> = BTreeSet::new();
        while (v.len() as u64) < count {
            v.insert(r.below(n + 1) as usize);
        }
        v.into_iter().collect()
    };
    let mut plan: Vec<(usize, Crash)> = pick(points, 1)
        .into_iter()
        .map(|p| (p, Crash::Kill))
        .chain(
            pick(points, 2)
                .into_iter()
                .enumerate()
                .map(|(i, p)| (p, Crash::Power(seed.wrapping_add(i as u64 * 7919)))),
        )
        .collect();
    plan.sort_by_key(|(p, _)| *p);

    // Walk the record once, advancing the model at each step boundary.
    let mut model = Model {
        vols: vec![Some(VolModel::new(vec![0; SECTORS as usize]))],
    };
    let mut at = 0usize;
    let mut inflight: Option<usize> = None;
    let (mut kills, mut powers) = (0u64, 0u64);
    for (p, crash) in plan {
        while at < p {
            if let Rec::Step(k) = log[at] {
                if let Some(prev) = inflight {
                    model.apply(&w.steps[prev]);
                }
                inflight = Some(k);
            }
            at += 1;
        }
        let img = build(&log[..p], crash);
        let step = inflight.map(|k| &w.steps[k]);
        if let Err(e) = check(&w, &img, &model, step) {
            panic!(
                "crash point {p} of {n} ({crash:?}) during step {inflight:?} {step:?}: {e}\nreplay with POWERLOSS_SEED={seed} POWERLOSS_STEPS={steps} POWERLOSS_POINTS={points}"
            );
        }
        match crash {
            Crash::Kill => kills += 1,
            Crash::Power(_) => powers += 1,
        }
    }
    eprintln!(
        "{kills} kill points and {powers} power-loss points checked in {:?}",
        started.elapsed()
    );
    assert!(kills >= points.min(n + 1) && powers >= points.min(n + 1));
}
