//! Crash consistency of the real gateway at scale: a client writes,
//! flushes, snapshots, reverts, deletes snapshots, clones and flattens
//! (NBD over the unix socket, the control API over its socket) while the
//! gateway is SIGKILLed at chosen points, over and over: by default 1000
//! kills in one run; `CRASH_LONG=1` is the soak mode (10000 kills),
//! `CRASH_POINTS=N` sets the count, `CRASH_SEED=S` replays a run.
//!
//! Each gateway life ends in one kill aimed at one operation: the client
//! picks the kind (write, flush, snapshot, revert, a revert with a write
//! and a flush sent while it runs, delete, clone, flatten),
//! runs a few random operations first, then starts that one and a killer
//! thread sends SIGKILL after a delay drawn from 0 to 1.5 times what that
//! kind of operation took in earlier lives, so kills land all along each
//! operation (before it reaches the gateway, in its journal commits, its
//! manifest commit, its file removals, after it completed). After each
//! kill, before the restart, the LUN is opened read-only in this process:
//! the label and state directory verify, every byte of the disk holds its
//! value at the last completed FLUSH (or operation that flushes) or a value
//! written after it, every snapshot the client saw created (and any it
//! asked for that exists) reads back exactly as the data was when it was
//! taken, and no unknown snapshot exists; a revert that may have committed
//! is either not seen at all or seen whole (with, for a revert raced by a
//! write and a flush, that write if it came after the switch: a flush
//! acknowledged after the switch must find the revert durable, so the
//! disk is never as before the revert without that write). After the restart the gateway
//! serves exactly the bytes the read-only open found and lists the same
//! snapshots (recovery changes nothing a client can see), except that it
//! may finish the one snapshot, delete or revert the kill interrupted (an
//! interrupted group operation is rolled forward by the next writer, never
//! by a read-only open), and every clone it serves reads exactly its
//! snapshot. Every 50 lives, and at the end,
//! `lunctl inspect --json` reports every checksum ok.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lun_manager::{Access, Lun};
use lungate_api::nbd::client::{Address, NbdClient};
use lungate_api::Client;
use lungate_tests::*;

const NBLOCKS: usize = 32;
const BS: usize = 64 << 10;
const DISK: usize = NBLOCKS * BS;
/// Snapshots and clones kept alive at once (older ones are deleted).
const MAX_SNAPS: usize = 6;
const MAX_CLONES: usize = 2;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Write,
    Flush,
    Snapshot,
    Revert,
    /// A revert while the client writes a block and flushes (the write may
    /// land before the switch, and be discarded, or after it).
    RevertRaced,
    Delete,
    Clone,
    Flatten,
}

const KINDS: [Kind; 8] = [
    Kind::Write,
    Kind::Flush,
    Kind::Snapshot,
    Kind::Revert,
    Kind::RevertRaced,
    Kind::Delete,
    Kind::Clone,
    Kind::Flatten,
];

/// What the client knows about the disk and the snapshots.
struct Model {
    /// Exactly what the disk holds for a reader now.
    cur: Vec<u8>,
    /// What it held at the last completed flush (or flushing operation).
    durable: Vec<u8>,
    /// Values sent to each block since then.
    pending: Vec<BTreeSet<u8>>,
    /// Snapshots the client saw created, with their contents.
    snaps: BTreeMap<String, Vec<u8>>,
    /// Snapshots asked for (or being deleted) whose outcome the kill hid.
    maybe_snaps: BTreeMap<String, Vec<u8>>,
    /// A revert the kill interrupted: the live disk is either as before or
    /// exactly this snapshot; with a raced write (block, value), each byte
    /// of that block may also hold the value (written after the switch).
    maybe_revert: Option<Reverted>,
    /// Clones the client saw created, with the contents of their snapshot.
    clones: BTreeMap<String, Vec<u8>>,
    maybe_clones: BTreeMap<String, Vec<u8>>,
    /// What the kill left in doubt that the restarted gateway may still
    /// finish (an interrupted group operation is rolled forward by the
    /// next writer, not by a read-only open): snapshots being created or
    /// deleted, with their contents, and the snapshot a revert was going to.
    doubt_snaps: BTreeMap<String, Vec<u8>>,
    doubt_revert: Option<Reverted>,
}

/// What a revert may have left: the snapshot, and a write that may have
/// landed after the switch (block, value).
struct Reverted(Vec<u8>, Option<(usize, u8)>);

impl Reverted {
    fn matches(&self, got: &[u8]) -> bool {
        got.len() == self.0.len()
            && got
                .iter()
                .zip(&self.0)
                .enumerate()
                .all(|(i, (g, s))| g == s || self.1.is_some_and(|(b, v)| i / BS == b && *g == v))
    }
}

impl Model {
    fn new() -> Model {
        Model {
            cur: vec![0; DISK],
            durable: vec![0; DISK],
            pending: vec![BTreeSet::new(); NBLOCKS],
            snaps: BTreeMap::new(),
            maybe_snaps: BTreeMap::new(),
            maybe_revert: None,
            clones: BTreeMap::new(),
            maybe_clones: BTreeMap::new(),
            doubt_snaps: BTreeMap::new(),
            doubt_revert: None,
        }
    }

    fn settle(&mut self) {
        self.durable.clone_from(&self.cur);
        self.pending.iter_mut().for_each(BTreeSet::clear);
    }

    /// Why `got` (the live disk after a crash) is impossible, if it is.
    fn live_problem(&self, got: &[u8]) -> Option<String> {
        let bad = (0..NBLOCKS).find_map(|b| {
            let r = b * BS..(b + 1) * BS;
            let i = got[r.clone()]
                .iter()
                .zip(&self.durable[r.clone()])
                .position(|(g, d)| g != d && !self.pending[b].contains(g))?;
            Some(format!(
                "block {b} byte {i} reads {}; flushed {}, sent since {:?}",
                got[r.start + i],
                self.durable[r.start + i],
                self.pending[b]
            ))
        });
        match bad {
            Some(_) if self.maybe_revert.as_ref().is_some_and(|r| r.matches(got)) => None,
            bad => bad,
        }
    }
}

/// A control API error that means "the gateway is gone" rather than a
/// refusal.
fn gone(e: &lungate_api::client::Error) -> bool {
    e.status().is_none()
}

struct Life<'a> {
    m: &'a mut Model,
    nbd: NbdClient,
    ctl: Client,
    rng: &'a mut Rng,
    tag: String,
    seq: usize,
}

impl Life<'_> {
    /// Run one operation of `kind`; `Err` when the gateway went away.
    fn op(&mut self, kind: Kind) -> Result<(), String> {
        self.seq += 1;
        let (tag, seq) = (self.tag.clone(), self.seq);
        let m = &mut *self.m;
        match kind {
            Kind::Write => {
                let b = self.rng.below(NBLOCKS as u64) as usize;
                let v = 1 + self.rng.below(255) as u8;
                m.pending[b].insert(v);
                self.nbd
                    .write_at((b * BS) as u64, &[v; BS])
                    .map_err(|e| e.to_string())?;
                m.cur[b * BS..(b + 1) * BS].fill(v);
            }
            Kind::Flush => {
                self.nbd.flush().map_err(|e| e.to_string())?;
                m.settle();
            }
            Kind::Snapshot => {
                let name = format!("s{tag}-{seq}");
                m.maybe_snaps.insert(name.clone(), m.cur.clone());
                match self.ctl.snapshot("c", &name, "") {
                    Ok(_) => {
                        let c = m.maybe_snaps.remove(&name).expect("just added");
                        m.snaps.insert(name, c);
                        m.settle();
                    }
                    Err(e) if gone(&e) => return Err(e.to_string()),
                    Err(e) => panic!("snapshot {name} refused: {e}"),
                }
            }
            Kind::Revert => {
                let names: Vec<&String> = m.snaps.keys().collect();
                let name = names[self.rng.below(names.len() as u64) as usize].clone();
                m.maybe_revert = Some(Reverted(m.snaps[&name].clone(), None));
                match self.ctl.revert("c", &name) {
                    Ok(_) => {
                        m.cur = m.maybe_revert.take().expect("set above").0;
                        m.settle();
                    }
                    Err(e) if gone(&e) => return Err(e.to_string()),
                    Err(e) => panic!("revert to {name} refused: {e}"),
                }
            }
            Kind::RevertRaced => {
                let names: Vec<&String> = m.snaps.keys().collect();
                let name = names[self.rng.below(names.len() as u64) as usize].clone();
                let b = self.rng.below(NBLOCKS as u64) as usize;
                let v = 1 + self.rng.below(255) as u8;
                let snap = m.snaps[&name].clone();
                let mut with_v = snap.clone();
                with_v[b * BS..(b + 1) * BS].fill(v);
                m.maybe_revert = Some(Reverted(snap.clone(), Some((b, v))));
                let (ctl, nbd) = (&self.ctl, &mut self.nbd);
                let (reverted, sent) = std::thread::scope(|sc| {
                    let r = sc.spawn(|| ctl.revert("c", &name));
                    m.pending[b].insert(v);
                    let sent = nbd.write_at((b * BS) as u64, &[v; BS]).and_then(|()| {
                        // As if no revert: the write is in the live disk
                        // and the flush made it durable, unless the revert
                        // switched before it (then one of maybe_revert).
                        m.cur[b * BS..(b + 1) * BS].fill(v);
                        nbd.flush()
                    });
                    if sent.is_ok() {
                        m.settle();
                    }
                    (r.join().expect("revert thread"), sent)
                });
                sent.map_err(|e| e.to_string())?;
                match reverted {
                    Ok(_) => {
                        // Done and durable: the snapshot, with the write
                        // if it came after the switch.
                        let mut got = vec![0u8; DISK];
                        self.nbd.read_at(0, &mut got).map_err(|e| e.to_string())?;
                        assert!(
                            got == snap || got == with_v,
                            "revert to {name} raced by a write of {v} to block {b}: the disk is neither the snapshot nor the snapshot with the write (first difference at byte {:?})",
                            got.iter().zip(&snap).position(|(a, b)| a != b)
                        );
                        m.cur = got;
                        m.maybe_revert = None;
                        m.settle();
                    }
                    Err(e) if gone(&e) => return Err(e.to_string()),
                    Err(e) => panic!("revert to {name} refused: {e}"),
                }
            }
            Kind::Delete => {
                let names: Vec<&String> = m.snaps.keys().collect();
                let name = names[self.rng.below(names.len() as u64) as usize].clone();
                let c = m.snaps.remove(&name).expect("listed");
                m.maybe_snaps.insert(name.clone(), c);
                match self.ctl.delete_snapshot("c", &name) {
                    Ok(_) => drop(m.maybe_snaps.remove(&name)),
                    Err(e) if gone(&e) => return Err(e.to_string()),
                    Err(e) => panic!("delete of {name} refused: {e}"),
                }
            }
            Kind::Clone => {
                let names: Vec<&String> = m.snaps.keys().collect();
                let snap = names[self.rng.below(names.len() as u64) as usize].clone();
                let name = format!("k{tag}-{seq}");
                m.maybe_clones.insert(name.clone(), m.snaps[&snap].clone());
                match self.ctl.clone_lun("c", &snap, &name) {
                    Ok(_) => {
                        let c = m.maybe_clones.remove(&name).expect("just added");
                        m.clones.insert(name, c);
                    }
                    Err(e) if gone(&e) => return Err(e.to_string()),
                    Err(e) => panic!("clone of {snap} refused: {e}"),
                }
            }
            Kind::Flatten => {
                // A clone if there is one (it copies its snapshot's data
                // and cuts itself loose), else the LUN itself.
                let target = m
                    .clones
                    .keys()
                    .nth(self.rng.below(m.clones.len() as u64 + 1) as usize)
                    .cloned()
                    .unwrap_or_else(|| "c".into());
                match self.ctl.flatten(&target) {
                    Ok(_) => {}
                    Err(e) if gone(&e) => return Err(e.to_string()),
                    Err(e) => panic!("flatten of {target} refused: {e}"),
                }
            }
        }
        Ok(())
    }

    /// Whether `kind` can run now (it needs a snapshot, or room for one).
    fn can(&self, kind: Kind) -> bool {
        match kind {
            Kind::Revert | Kind::RevertRaced | Kind::Delete => !self.m.snaps.is_empty(),
            Kind::Clone => !self.m.snaps.is_empty() && self.m.clones.len() < MAX_CLONES,
            Kind::Snapshot => self.m.snaps.len() < MAX_SNAPS,
            _ => true,
        }
    }
}

fn kill(pid: u32) {
    // SAFETY: kill(2) with our own child's PID and a signal number.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// The LUN's disk and every snapshot's disk bytes, read with the volume in
/// this process (read-only: it writes nothing, recovers nothing).
fn read_offline(lun: &Path) -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
    let l = Lun::open(lun, Access::ReadOnly)
        .unwrap_or_else(|e| panic!("the LUN does not open read-only after the kill: {e}"));
    let base = l.disks()[0].offset;
    let v = l.volume();
    let mut live = vec![0u8; DISK];
    v.read(base, &mut live).unwrap();
    let mut snaps = BTreeMap::new();
    for s in v.snapshots() {
        let mut b = vec![0u8; DISK];
        v.read_snapshot(&s.name, base, &mut b)
            .unwrap_or_else(|e| panic!("snapshot {} does not read: {e}", s.name));
        snaps.insert(s.name, b);
    }
    (live, snaps)
}

fn nbd_read(addr: &Address, export: &str) -> Vec<u8> {
    let mut c = NbdClient::connect(addr, export)
        .unwrap_or_else(|e| panic!("export {export} does not open: {e}"));
    let mut b = vec![0u8; DISK];
    c.read_at(0, &mut b).unwrap();
    let _ = c.disconnect();
    b
}

fn inspect_ok(lun: &Path, life: u64) {
    let out = lunctl(&["inspect", "--json", lun.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["label_checksum"], "ok", "life {life}: {v}");
    let recs = v["state"]["records"].as_array().expect("state records");
    assert!(!recs.is_empty());
    for r in recs {
        assert_eq!(r["checksum"], "ok", "life {life}: {r}");
    }
}

/// Check everything after a kill (before the restart), and settle the
/// model on what survived.
fn check_offline(m: &mut Model, lun: &Path, life: u64) -> Vec<u8> {
    let (live, snaps) = read_offline(lun);
    if let Some(e) = m.live_problem(&live) {
        panic!("life {life}: after the kill, {e}");
    }
    for name in m.snaps.keys() {
        assert!(
            snaps.contains_key(name),
            "life {life}: snapshot {name} was created but is gone"
        );
    }
    for (name, got) in &snaps {
        let want = m
            .snaps
            .get(name)
            .or_else(|| m.maybe_snaps.get(name))
            .unwrap_or_else(|| panic!("life {life}: unknown snapshot {name}"));
        assert!(
            got == want,
            "life {life}: snapshot {name} does not hold what the disk held when it was taken (first difference at byte {:?})",
            got.iter().zip(want).position(|(a, b)| a != b)
        );
    }
    // What survived is now known, but for what the restart may finish.
    m.snaps = snaps;
    m.doubt_snaps = std::mem::take(&mut m.maybe_snaps);
    m.doubt_revert = m.maybe_revert.take();
    m.cur.clone_from(&live);
    m.settle();
    live
}

/// After the restart: the gateway shows what the offline read found, and
/// every clone it serves reads exactly its snapshot.
fn check_online(m: &mut Model, gw: &Gateway, ctl: &Client, offline: &[u8], life: u64) {
    let addr = Address::Unix(gw.unix_path().to_path_buf());
    let served = nbd_read(&addr, "c/disk0");
    let doubt_revert = m.doubt_revert.take();
    if served != offline {
        // Only an interrupted revert the restart finished may change it,
        // and then to exactly its snapshot.
        assert!(
            doubt_revert.as_ref().is_some_and(|r| r.matches(&served)),
            "life {life}: recovery changed what the disk reads (first difference at byte {:?})",
            served.iter().zip(offline).position(|(a, b)| a != b)
        );
        m.cur.clone_from(&served);
        m.settle();
    }
    let listed: BTreeSet<String> = ctl
        .snapshots("c")
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    let doubt = std::mem::take(&mut m.doubt_snaps);
    let known: BTreeSet<String> = m.snaps.keys().cloned().collect();
    for name in listed.symmetric_difference(&known) {
        assert!(
            doubt.contains_key(name),
            "life {life}: the gateway lists {listed:?}, the read-only open found {known:?}"
        );
    }
    // Creations and deletes the restart finished (the contents of a new
    // one are checked by the next offline read).
    m.snaps.retain(|name, _| listed.contains(name));
    for (name, c) in doubt {
        if listed.contains(&name) && !m.snaps.contains_key(&name) {
            m.snaps.insert(name, c);
        }
    }
    let luns: BTreeSet<String> = ctl.luns().unwrap().into_iter().map(|l| l.name).collect();
    for name in m.clones.keys() {
        assert!(
            luns.contains(name),
            "life {life}: clone {name} was created but is not served"
        );
    }
    let maybe = std::mem::take(&mut m.maybe_clones);
    for (name, want) in m.clones.iter().chain(&maybe) {
        if !luns.contains(name) {
            continue;
        }
        let got = nbd_read(&addr, &format!("{name}/disk0"));
        assert!(
            &got == want,
            "life {life}: clone {name} does not read as its snapshot (first difference at byte {:?})",
            got.iter().zip(want).position(|(a, b)| a != b)
        );
    }
    for (name, c) in maybe {
        if luns.contains(&name) {
            m.clones.insert(name, c);
        }
    }
}

/// Remove the oldest clones until there is room for one more (the gateway
/// is down), so every life may aim a kill at a clone.
fn prune_clones(m: &mut Model, pool: &Path) {
    while m.clones.len() >= MAX_CLONES {
        let name = m.clones.keys().next().cloned().expect("non-empty");
        m.clones.remove(&name);
        let l = Lun::open(&pool.join(format!("{name}.lun")), Access::ReadWrite).unwrap();
        l.delete().unwrap();
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn sigkill_at_a_thousand_points_loses_no_flushed_write_snapshot_or_clone() {
    let mut pool = Pool::new();
    let lun: PathBuf = pool.add("c", "offset", &["2M"], "1M").path.clone();
    let seed = env(
        "CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let long = env("CRASH_LONG", 0) != 0;
    let points = env("CRASH_POINTS", if long { 10_000 } else { 1000 });
    eprintln!("CRASH_SEED={seed} CRASH_POINTS={points}");
    let mut rng = Rng(seed);
    let mut m = Model::new();
    // How long each kind took when it completed (µs, a moving average),
    // and where the kills landed.
    let mut took: HashMap<Kind, f64> = KINDS.iter().map(|k| (*k, 2000.0)).collect();
    let mut aimed: BTreeMap<Kind, (u64, u64)> = BTreeMap::new();
    let started = Instant::now();
    let mut offline = vec![0u8; DISK];
    for life in 0..points {
        let gw = Gateway::start(&["--pool", pool.arg()]);
        let ctl = Client::new(&gw.control()).unwrap();
        check_online(&mut m, &gw, &ctl, &offline, life);
        let nbd =
            NbdClient::connect(&Address::Unix(gw.unix_path().to_path_buf()), "c/disk0").unwrap();
        let mut l = Life {
            m: &mut m,
            nbd,
            ctl,
            rng: &mut rng,
            tag: life.to_string(),
            seq: 0,
        };
        let target = KINDS[l.rng.below(KINDS.len() as u64) as usize];
        let warmup = l.rng.below(4);
        let mut alive = true;
        for _ in 0..warmup {
            let k = KINDS[l.rng.below(KINDS.len() as u64) as usize];
            if l.can(k) && l.op(k).is_err() {
                alive = false;
                break;
            }
        }
        // Make room or make a snapshot so the aimed operation can run.
        if alive && !l.can(target) {
            let fix = if l.m.snaps.len() >= MAX_SNAPS {
                Kind::Delete
            } else {
                Kind::Snapshot
            };
            alive = l.op(fix).is_ok();
        }
        assert!(alive, "life {life}: the gateway died before the kill");
        let kind = if l.can(target) { target } else { Kind::Write };
        let delay = Duration::from_micros(l.rng.below((took[&kind] * 1.5) as u64 + 1));
        let pid = gw.pid();
        let fired = Arc::new(AtomicBool::new(false));
        let killer = {
            let fired = fired.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                kill(pid);
                fired.store(true, Ordering::SeqCst);
            })
        };
        let t = Instant::now();
        let landed_inside = l.op(kind).is_err();
        if !landed_inside {
            let us = t.elapsed().as_micros() as f64;
            let e = took.get_mut(&kind).unwrap();
            *e = 0.8 * *e + 0.2 * us;
            // Keep going until the kill lands.
            while l.op(Kind::Write).is_ok() {
                if fired.load(Ordering::SeqCst) && t.elapsed() > Duration::from_secs(5) {
                    panic!("life {life}: the gateway survived SIGKILL");
                }
            }
        }
        killer.join().unwrap();
        let a = aimed.entry(kind).or_default();
        a.0 += 1;
        a.1 += u64::from(landed_inside);
        drop(l);
        drop(gw);
        offline = check_offline(&mut m, &lun, life);
        prune_clones(&mut m, pool.path());
        if life % 50 == 49 {
            inspect_ok(&lun, life);
        }
        if life % 100 == 99 {
            eprintln!("{} kills in {:?}", life + 1, started.elapsed());
        }
    }

    // A last restart, then a clean stop: everything still there.
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let ctl = Client::new(&gw.control()).unwrap();
    check_online(&mut m, &gw, &ctl, &offline, points);
    // Nothing the last life's reads did, nor the clean stop, changes a
    // hidden byte (checked on both sides of the stop, to tell them apart).
    pool.assert_hidden_unchanged();
    gw.stop_ok();
    inspect_ok(&lun, points);
    eprintln!(
        "{points} kills in {:?}; by operation (kills, of which inside it): {aimed:?}; {} snapshots and {} clones alive at the end",
        started.elapsed(),
        m.snaps.len(),
        m.clones.len()
    );
    for k in KINDS {
        assert!(
            points < 200 || aimed.get(&k).is_some_and(|a| a.1 > 0),
            "no kill landed inside a {k:?}: {aimed:?}"
        );
    }
    pool.assert_hidden_unchanged();
}
