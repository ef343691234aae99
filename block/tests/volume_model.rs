//! Model-based test of the copy-on-write volume engine: random sequences of
//! writes, trims, write-zeroes, flushes, snapshots, reverts, snapshot
//! deletes, clones, flattens and reopens run against real volumes (real
//! files in a temporary pool) and against a trivial in-memory model (a
//! `Vec<u8>` per volume and per snapshot). After every step every volume
//! and every snapshot must read back exactly as the model says, `extents()`
//! must never call data a hole, and `diff()` must cover every changed byte.
//! Reopens also open the volume read-only first (same bytes, no file
//! changed); a crash without a flush must leave every byte untouched since
//! the last flush as it was; a diff file from a snapshot to the live volume,
//! applied to a fresh copy of the snapshot, must reproduce the live volume.
//!
//! `cargo test -p lun-manager --test volume_model` runs 32 cases (a few
//! seconds); `PROPTEST_CASES=1000` for a soak.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use lungate_block::engine::{EngineKind, IoEngine};
use lungate_block::volume::{ChangeKind, Error, Volume, VolumeConfig, VolumeDevice, VolumeOptions};
use lungate_block::BlockDevice;
use proptest::prelude::*;

const CS: u64 = 4096;
const MAX_VOLUMES: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// Data operations run through the synchronous API or, with `asy`,
    /// through the asynchronous data path (`VolumeDevice` on io_uring),
    /// the one the gateway serves.
    Write {
        v: usize,
        off: u64,
        len: u64,
        seed: u8,
        asy: bool,
    },
    Trim {
        v: usize,
        off: u64,
        len: u64,
        asy: bool,
    },
    Zero {
        v: usize,
        off: u64,
        len: u64,
        may_trim: bool,
        asy: bool,
    },
    Flush {
        v: usize,
        asy: bool,
    },
    Snapshot {
        v: usize,
    },
    Revert {
        v: usize,
        which: usize,
    },
    Delete {
        v: usize,
        which: usize,
    },
    Clone {
        v: usize,
        which: usize,
    },
    Flatten {
        v: usize,
    },
    Reopen {
        v: usize,
    },
    /// Flush, then drop without the close-time flush: what is on disk must
    /// be everything.
    FlushCrashReopen {
        v: usize,
    },
    /// Drop without any flush: bytes untouched since the last flush must
    /// read as they were then; touched bytes may read either way.
    CrashReopen {
        v: usize,
    },
    /// Diff file from a snapshot to the live volume, applied to a fresh
    /// copy of that snapshot: the copy must then read as the live volume.
    DiffApply {
        v: usize,
        which: usize,
    },
}

/// Offsets biased towards cluster boundaries and lengths from one byte to
/// a few clusters, so partial and cluster-crossing I/O is common.
fn range() -> impl Strategy<Value = (u64, u64)> {
    (
        any::<u64>(),
        prop_oneof![Just(0u64), Just(CS), 1u64..CS, 0u64..4 * CS],
        any::<bool>(),
    )
        .prop_map(|(a, len, aligned)| {
            let off = if aligned { a % 320 * CS } else { a };
            (off, len.max(1))
        })
}

fn op() -> impl Strategy<Value = Op> {
    let v = 0usize..MAX_VOLUMES;
    prop_oneof![
        8 => (v.clone(), range(), any::<u8>(), any::<bool>()).prop_map(|(v, (off, len), seed, asy)| Op::Write { v, off, len, seed, asy }),
        2 => (v.clone(), range(), any::<bool>()).prop_map(|(v, (off, len), asy)| Op::Trim { v, off, len, asy }),
        2 => (v.clone(), range(), any::<bool>(), any::<bool>()).prop_map(|(v, (off, len), may_trim, asy)| Op::Zero { v, off, len, may_trim, asy }),
        2 => (v.clone(), any::<bool>()).prop_map(|(v, asy)| Op::Flush { v, asy }),
        3 => v.clone().prop_map(|v| Op::Snapshot { v }),
        2 => (v.clone(), any::<usize>()).prop_map(|(v, which)| Op::Revert { v, which }),
        2 => (v.clone(), any::<usize>()).prop_map(|(v, which)| Op::Delete { v, which }),
        1 => (v.clone(), any::<usize>()).prop_map(|(v, which)| Op::Clone { v, which }),
        1 => v.clone().prop_map(|v| Op::Flatten { v }),
        1 => v.clone().prop_map(|v| Op::Reopen { v }),
        1 => v.clone().prop_map(|v| Op::FlushCrashReopen { v }),
        1 => v.clone().prop_map(|v| Op::CrashReopen { v }),
        1 => (v, any::<usize>()).prop_map(|(v, which)| Op::DiffApply { v, which }),
    ]
}

struct Vol {
    vol: Option<Arc<Volume>>,
    cfg: VolumeConfig,
    live: Vec<u8>,
    snaps: BTreeMap<String, Vec<u8>>,
    /// The contents as of the last flush (or operation that flushes).
    durable: Vec<u8>,
    /// Bytes written, trimmed or zeroed since then.
    dirty: Vec<bool>,
}

impl Vol {
    fn new(vol: Volume, cfg: VolumeConfig, live: Vec<u8>) -> Vol {
        Vol {
            vol: Some(Arc::new(vol)),
            cfg,
            durable: live.clone(),
            dirty: vec![false; live.len()],
            live,
            snaps: BTreeMap::new(),
        }
    }
    fn touched(&mut self, off: u64, len: u64) {
        self.dirty[off as usize..(off + len) as usize].fill(true);
    }
    fn durable_now(&mut self) {
        self.durable.clone_from(&self.live);
        self.dirty.fill(false);
    }
}

struct World {
    dir: tempfile::TempDir,
    size: u64,
    vols: Vec<Vol>,
    next_name: usize,
}

/// The engine the asynchronous data path runs on: io_uring where it
/// works, else the thread pool (both are the gateway's).
fn engine() -> IoEngine {
    static E: std::sync::OnceLock<IoEngine> = std::sync::OnceLock::new();
    E.get_or_init(|| IoEngine::new(EngineKind::Auto, 2).unwrap())
        .clone()
}

fn rt() -> &'static tokio::runtime::Runtime {
    static R: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn sole(v: Arc<Volume>) -> Volume {
    Arc::try_unwrap(v).unwrap_or_else(|_| panic!("the model holds the only reference"))
}

fn pattern(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = (off + i).wrapping_mul(2654435761) >> 7;
            (x as u8) ^ seed | 1
        })
        .collect()
}

fn new_lun(dir: &Path, name: &str, size: u64, fill: bool) -> VolumeConfig {
    let cfg = common::lun_config(dir, name, size, CS, Some(engine()));
    if fill {
        // A base with data in most places and a hole in the middle.
        let f = &cfg.file;
        f.write_all_at(&pattern(0xa5, 0, size / 3), 0).unwrap();
        f.write_all_at(&pattern(0x5a, 2 * size / 3, size / 3), 2 * size / 3)
            .unwrap();
    }
    cfg
}

/// Names, sizes and blake3 of the LUN file and every file in its layers
/// directory.
fn dir_fingerprint(lun: &Path) -> Vec<(String, u64, [u8; 32])> {
    let mut out = Vec::new();
    let layers = lun.with_extension("layers");
    let mut paths = vec![lun.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(&layers) {
        paths.extend(rd.map(|e| e.unwrap().path()));
    }
    paths.sort();
    for p in paths {
        let b = std::fs::read(&p).unwrap();
        out.push((
            p.display().to_string(),
            b.len() as u64,
            *blake3::hash(&b).as_bytes(),
        ));
    }
    out
}

fn base_contents(cfg: &VolumeConfig) -> Vec<u8> {
    let mut b = vec![0u8; cfg.size as usize];
    cfg.file.read_exact_at(&mut b, 0).unwrap();
    b
}

impl World {
    fn new(size: u64) -> World {
        let dir = tempfile::tempdir().unwrap();
        let cfg = new_lun(dir.path(), "vol0", size, true);
        let live = base_contents(&cfg);
        let vol = Volume::open(cfg.clone()).unwrap();
        World {
            dir,
            size,
            vols: vec![Vol::new(vol, cfg, live)],
            next_name: 0,
        }
    }

    fn clip(&self, off: u64, len: u64) -> (u64, u64) {
        let off = off % self.size;
        (off, len.min(self.size - off))
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let n = self.vols.len();
        let vi = |v: usize| v % n;
        match *op {
            Op::Write {
                v,
                off,
                len,
                seed,
                asy,
            } => {
                let (off, len) = self.clip(off, len);
                let w = &mut self.vols[vi(v)];
                let data = pattern(seed, off, len);
                if asy {
                    let dev = VolumeDevice::new(w.vol.clone().unwrap());
                    rt().block_on(dev.write(off, data.clone().into(), false))
                        .unwrap();
                } else {
                    w.vol.as_ref().unwrap().write(off, &data).unwrap();
                }
                w.live[off as usize..(off + len) as usize].copy_from_slice(&data);
                w.touched(off, len);
            }
            Op::Trim { v, off, len, asy } => {
                let (off, len) = self.clip(off, len);
                let w = &mut self.vols[vi(v)];
                if asy {
                    let dev = VolumeDevice::new(w.vol.clone().unwrap());
                    rt().block_on(dev.trim(off, len)).unwrap();
                } else {
                    w.vol.as_ref().unwrap().trim(off, len).unwrap();
                }
                w.live[off as usize..(off + len) as usize].fill(0);
                w.touched(off, len);
            }
            Op::Zero {
                v,
                off,
                len,
                may_trim,
                asy,
            } => {
                let (off, len) = self.clip(off, len);
                let w = &mut self.vols[vi(v)];
                if asy {
                    let dev = VolumeDevice::new(w.vol.clone().unwrap());
                    rt().block_on(dev.write_zeroes(off, len, may_trim)).unwrap();
                } else {
                    w.vol
                        .as_ref()
                        .unwrap()
                        .write_zeroes(off, len, may_trim)
                        .unwrap();
                }
                w.live[off as usize..(off + len) as usize].fill(0);
                w.touched(off, len);
            }
            Op::Flush { v, asy } => {
                let w = &mut self.vols[vi(v)];
                if asy {
                    let dev = VolumeDevice::new(w.vol.clone().unwrap());
                    rt().block_on(dev.flush()).unwrap();
                } else {
                    w.vol.as_ref().unwrap().flush().unwrap();
                }
                w.durable_now();
            }
            Op::Snapshot { v } => {
                let name = format!("s{}", self.next_name);
                self.next_name += 1;
                let w = &mut self.vols[vi(v)];
                let info = w
                    .vol
                    .as_ref()
                    .unwrap()
                    .snapshot(&name, &format!("snapshot {name}"))
                    .unwrap();
                prop_assert_eq!(&info.name, &name);
                prop_assert!(info.current);
                w.snaps.insert(name, w.live.clone());
                w.durable_now();
            }
            Op::Revert { v, which } => {
                let w = &mut self.vols[vi(v)];
                match pick(&w.snaps, which) {
                    Some(name) => {
                        w.vol.as_ref().unwrap().revert(&name).unwrap();
                        w.live = w.snaps[&name].clone();
                        w.durable_now();
                        let cur: Vec<_> = w
                            .vol
                            .as_ref()
                            .unwrap()
                            .snapshots()
                            .into_iter()
                            .filter(|s| s.current)
                            .map(|s| s.name)
                            .collect();
                        prop_assert_eq!(cur, vec![name]);
                    }
                    None => {
                        let e = w.vol.as_ref().unwrap().revert("nope").unwrap_err();
                        prop_assert!(matches!(e, Error::NoSnapshot(_)), "{e}");
                    }
                }
            }
            Op::Delete { v, which } => {
                let w = &mut self.vols[vi(v)];
                if let Some(name) = pick(&w.snaps, which) {
                    w.vol.as_ref().unwrap().delete_snapshot(&name).unwrap();
                    w.snaps.remove(&name);
                }
            }
            Op::DiffApply { v, which } => {
                let w = &self.vols[vi(v)];
                let Some(name) = pick(&w.snaps, which) else {
                    return Ok(());
                };
                let vol = w.vol.as_ref().unwrap();
                let changes = lungate_block::volume::diff::clip(
                    &vol.diff(&name, None).unwrap(),
                    vol.protected(),
                );
                let mut file = Vec::new();
                lungate_block::volume::diff::write(&[(vol, changes)], &name, None, &mut file)
                    .unwrap();
                // The copy: a plain LUN with the snapshot's bytes and the
                // source's identity.
                let n = self.next_name;
                self.next_name += 1;
                let mut cfg = new_lun(self.dir.path(), &format!("copy{n}"), self.size, false);
                cfg.lun_uuid = w.cfg.lun_uuid;
                cfg.file.write_all_at(&w.snaps[&name], 0).unwrap();
                let copy = Volume::open(cfg.clone()).unwrap();
                lungate_block::volume::diff::apply(&mut &file[..], self.dir.path(), &[&copy])
                    .unwrap();
                let mut b = vec![0u8; self.size as usize];
                copy.read(0, &mut b).unwrap();
                if b != w.live {
                    let at = b.iter().zip(&w.live).position(|(a, m)| a != m).unwrap();
                    return Err(TestCaseError::fail(format!(
                        "diff({name}, live) applied to a copy differs from live at byte {at}"
                    )));
                }
                drop(copy);
                std::fs::remove_file(&cfg.lun_path).unwrap();
            }
            Op::Clone { v, which } => {
                if n >= MAX_VOLUMES {
                    return Ok(());
                }
                let src = vi(v);
                let Some(name) = pick(&self.vols[src].snaps, which) else {
                    return Ok(());
                };
                let cfg = new_lun(self.dir.path(), &format!("vol{n}"), self.size, false);
                let vol = self.vols[src]
                    .vol
                    .as_ref()
                    .unwrap()
                    .clone_to(&name, cfg.clone())
                    .unwrap();
                let live = self.vols[src].snaps[&name].clone();
                self.vols.push(Vol::new(vol, cfg, live));
            }
            Op::Flatten { v } => {
                let w = &mut self.vols[vi(v)];
                let mut last = (0, 0);
                w.vol
                    .as_ref()
                    .unwrap()
                    .flatten(|d, t| last = (d, t))
                    .unwrap();
                prop_assert_eq!(last.0, last.1);
                prop_assert_eq!(w.vol.as_ref().unwrap().chain().len(), 1);
            }
            Op::Reopen { v } => {
                let w = &mut self.vols[vi(v)];
                sole(w.vol.take().unwrap()).close().unwrap();
                // A read-only open sees the same bytes and writes nothing.
                let before = dir_fingerprint(&w.cfg.lun_path);
                let ro_cfg = VolumeConfig {
                    options: VolumeOptions {
                        read_only: true,
                        ..w.cfg.options
                    },
                    ..w.cfg.clone()
                };
                let ro = Volume::open(ro_cfg).unwrap();
                let mut b = vec![0u8; self.size as usize];
                ro.read(0, &mut b).unwrap();
                prop_assert!(b == w.live, "read-only view differs from the model");
                let e = ro.write(0, &[1]).unwrap_err();
                prop_assert!(matches!(e, Error::ReadOnly(_)), "{e}");
                drop(ro);
                prop_assert_eq!(before, dir_fingerprint(&w.cfg.lun_path));
                let vol = Volume::open(w.cfg.clone()).unwrap();
                prop_assert!(vol.warnings().is_empty(), "{:?}", vol.warnings());
                w.vol = Some(Arc::new(vol));
                w.durable_now();
            }
            Op::FlushCrashReopen { v } => {
                let w = &mut self.vols[vi(v)];
                let vol = sole(w.vol.take().unwrap());
                vol.flush().unwrap();
                vol.crash();
                let vol = Volume::open(w.cfg.clone()).unwrap();
                prop_assert!(vol.warnings().is_empty(), "{:?}", vol.warnings());
                w.vol = Some(Arc::new(vol));
                w.durable_now();
            }
            Op::CrashReopen { v } => {
                let w = &mut self.vols[vi(v)];
                sole(w.vol.take().unwrap()).crash();
                let vol = Volume::open(w.cfg.clone()).unwrap();
                prop_assert!(vol.warnings().is_empty(), "{:?}", vol.warnings());
                let mut got = vec![0u8; self.size as usize];
                vol.read(0, &mut got).unwrap();
                if let Some(at) = (0..got.len()).find(|&i| got[i] != w.durable[i] && !w.dirty[i]) {
                    return Err(TestCaseError::fail(format!(
                        "after a crash byte {at} (cluster {}) reads {}, but it was {} at the last flush and never touched since",
                        at as u64 / CS,
                        got[at],
                        w.durable[at]
                    )));
                }
                w.vol = Some(Arc::new(vol));
                w.live = got;
                w.durable_now();
            }
        }
        Ok(())
    }

    fn check(&self, step: usize, op: &Op) -> Result<(), TestCaseError> {
        for (i, w) in self.vols.iter().enumerate() {
            let vol = w.vol.as_ref().unwrap();
            let mut b = vec![0u8; self.size as usize];
            vol.read(0, &mut b).unwrap();
            if b != w.live {
                let at = b.iter().zip(&w.live).position(|(a, m)| a != m).unwrap();
                return Err(TestCaseError::fail(format!(
                    "step {step} ({op:?}): volume {i} differs from the model at byte {at} (cluster {}): got {} want {}",
                    at as u64 / CS,
                    b[at],
                    w.live[at]
                )));
            }
            let infos = vol.snapshots();
            let names: Vec<_> = infos.iter().map(|s| s.name.clone()).collect();
            let want: Vec<_> = w.snaps.keys().cloned().collect();
            let mut sorted = names.clone();
            sorted.sort();
            prop_assert_eq!(sorted, want, "step {} volume {} snapshot list", step, i);
            for (name, m) in &w.snaps {
                vol.read_snapshot(name, 0, &mut b).unwrap();
                if &b != m {
                    let at = b.iter().zip(m).position(|(a, m)| a != m).unwrap();
                    return Err(TestCaseError::fail(format!(
                        "step {step} ({op:?}): volume {i} snapshot {name} differs at byte {at}"
                    )));
                }
            }
            // Extents tile the volume; a hole must read as zeros.
            let ext = vol.extents(0, self.size).unwrap();
            let mut at = 0;
            for e in &ext {
                prop_assert_eq!(e.offset, at, "extents must be contiguous");
                prop_assert!(e.length > 0);
                if !e.data {
                    let r = &w.live[e.offset as usize..(e.offset + e.length) as usize];
                    prop_assert!(
                        is_zero(r),
                        "step {} volume {}: hole {:?} holds data",
                        step,
                        i,
                        e
                    );
                }
                at += e.length;
            }
            prop_assert_eq!(at, self.size);
            // Diff from each snapshot to the live volume covers every change.
            // Changes are whole clusters, so coverage is checked per cluster.
            for (name, m) in &w.snaps {
                let changes = vol.diff(name, None).unwrap();
                let mut covered = vec![false; self.size.div_ceil(CS) as usize];
                for c in &changes {
                    prop_assert!(c.offset % CS == 0, "change {:?} not cluster aligned", c);
                    prop_assert!(c.offset + c.length <= self.size);
                    for vc in c.offset / CS..(c.offset + c.length).div_ceil(CS) {
                        covered[vc as usize] = true;
                    }
                    if c.kind == ChangeKind::Zero {
                        let r = &w.live[c.offset as usize..(c.offset + c.length) as usize];
                        prop_assert!(is_zero(r), "zero change {:?} holds data", c);
                    }
                }
                for (vc, cov) in covered.iter().enumerate() {
                    let a = vc * CS as usize;
                    let b = (a + CS as usize).min(self.size as usize);
                    if !cov && m[a..b] != w.live[a..b] {
                        return Err(TestCaseError::fail(format!(
                            "step {step}: volume {i} diff({name}, live) misses cluster {vc}"
                        )));
                    }
                }
                // The range-bounded query (a block-status context) says
                // what the whole diff says about its range, for the whole
                // volume and for a window that cuts clusters.
                let windows = [
                    (0, self.size),
                    (
                        (step as u64 * 1237) % self.size,
                        (self.size - (step as u64 * 1237) % self.size).min(5 * CS + 77),
                    ),
                ];
                for (o, l) in windows {
                    let want: Vec<(u64, u64)> = merge_clipped(&changes, o, o + l);
                    let got: Vec<(u64, u64)> = vol
                        .changed_since(name, o, l)
                        .unwrap()
                        .into_iter()
                        .map(|r| (r.start, r.end))
                        .collect();
                    prop_assert_eq!(
                        got,
                        want,
                        "step {} volume {} changed_since({}, {}, {})",
                        step,
                        i,
                        name,
                        o,
                        l
                    );
                }
            }
        }
        Ok(())
    }
}

/// `changes` clipped to `[start, end)`, adjacent ones merged whatever
/// their kind.
fn merge_clipped(
    changes: &[lungate_block::volume::Change],
    start: u64,
    end: u64,
) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for c in changes {
        let (s, e) = (c.offset.max(start), (c.offset + c.length).min(end));
        if s >= e {
            continue;
        }
        match out.last_mut() {
            Some(l) if l.1 == s => l.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

fn is_zero(b: &[u8]) -> bool {
    // memcmp against a zero block: fast even without optimisation.
    const Z: [u8; 4096] = [0; 4096];
    b.chunks(Z.len()).all(|c| c == &Z[..c.len()])
}

fn pick(snaps: &BTreeMap<String, Vec<u8>>, which: usize) -> Option<String> {
    if snaps.is_empty() {
        return None;
    }
    snaps.keys().nth(which % snaps.len()).cloned()
}

proptest! {
    // A handful of cases by default keeps the dev-profile run short;
    // PROPTEST_CASES=500 (or more) for a long soak.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(32),
        max_shrink_iters: 2000,
        .. ProptestConfig::default()
    })]

    #[test]
    fn volume_matches_the_model_after_every_step(
        extra in prop_oneof![Just(0u64), 1u64..CS],
        clusters in 64u64..320,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let size = clusters * CS + extra;
        let mut w = World::new(size);
        w.check(0, &Op::Flush { v: 0, asy: false })?;
        for (i, op) in ops.iter().enumerate() {
            w.apply(op)?;
            w.check(i + 1, op)?;
        }
        // Finally every volume survives a clean close and reopen.
        for v in &mut w.vols {
            sole(v.vol.take().unwrap()).close().unwrap();
            v.vol = Some(Arc::new(Volume::open(v.cfg.clone()).unwrap()));
        }
        w.check(ops.len() + 1, &Op::Flush { v: 0, asy: false })?;
    }
}

#[test]
fn chain_of_64_snapshots_reads_correctly_with_one_lookup_per_cluster() {
    let d = tempfile::tempdir().unwrap();
    let size = 64 * 16 * CS;
    let cfg = new_lun(d.path(), "deep", size, false);
    let vol = Volume::open(cfg.clone()).unwrap();
    let mut model = vec![0u8; size as usize];
    for i in 0..64u64 {
        // Layer i holds clusters 16i..16i+16 (the last one written partially).
        let off = i * 16 * CS;
        let data = pattern(i as u8, off, 15 * CS + 100);
        vol.write(off, &data).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        vol.snapshot(&format!("s{i}"), "").unwrap();
    }
    // s0 freezes the LUN file itself (the volume was plain until then, so
    // layer 0's data sits in the base), s1..s63 freeze 63 deltas.
    assert_eq!(
        vol.chain().len(),
        65,
        "the base, 63 frozen deltas, the live one"
    );
    let chain = vol.chain();
    let mut b = vec![0u8; size as usize];
    vol.read(0, &mut b).unwrap();
    assert_eq!(b, model);
    // Structural O(1): the live index holds one entry per cluster allocated
    // in a delta of the chain (the base needs none: an empty entry means
    // "the root"), and a lookup names the holding layer directly —
    // chain[64 - i] for layer i, the base for layer 0 — with no walk.
    let (entries, _pages) = vol.index_stats();
    assert_eq!(entries, 63 * 16);
    for i in 0..64u64 {
        let (layer, data) = vol.locate(i * 16 * CS + 5).unwrap();
        assert_eq!(layer, chain[64 - i as usize], "cluster of layer {i}");
        assert!(data);
    }
    // Snapshot views still read their own past.
    let mut s = vec![0u8; CS as usize];
    vol.read_snapshot("s10", 40 * 16 * CS, &mut s).unwrap();
    assert!(s.iter().all(|&x| x == 0), "s10 predates layer 40's data");
    drop(vol);
    let vol = Volume::open(cfg).unwrap();
    vol.read(0, &mut b).unwrap();
    assert_eq!(b, model);
    assert_eq!(vol.index_stats().0, 63 * 16);
}

#[test]
fn sparse_terabyte_volume_index_stays_small() {
    let d = tempfile::tempdir().unwrap();
    let cfg = common::lun_config(
        d.path(),
        "big",
        1 << 40,
        VolumeOptions::default().cluster_size.into(),
        None,
    );
    let vol = Volume::open(cfg).unwrap();
    vol.snapshot("empty", "").unwrap();
    vol.write((1 << 40) - 4096, &[3u8; 4096]).unwrap();
    vol.write(1 << 39, &[4u8; 100]).unwrap();
    let (entries, pages) = vol.index_stats();
    assert_eq!((entries, pages), (2, 2));
    let mut b = [0u8; 4096];
    vol.read((1 << 40) - 4096, &mut b).unwrap();
    assert_eq!(b, [3u8; 4096]);
    let u = vol.usage();
    let live = u.iter().find(|l| l.live).unwrap();
    assert_eq!(live.allocated_bytes, 2 * 65536);
    assert!(live.disk_bytes < 16 << 20, "{live:?}");
}
