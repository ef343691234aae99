//! Data checksums: a volume made with checksums catches a byte changed
//! under it (on the synchronous and the asynchronous path, in the live
//! layer and in snapshots, after a reopen), never copies a corrupted
//! cluster up into a new one, keeps every checksum right under concurrent
//! writers and flushes, across journal compactions, reverts and clones,
//! and `scrub` names the damaged cluster.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use lungate_block::engine::{EngineKind, IoEngine};
use lungate_block::progress;
use lungate_block::store::file::layers_dir;
use lungate_block::volume::header::Geometry;
use lungate_block::volume::{Error, Volume, VolumeConfig, VolumeDevice};
use lungate_block::BlockDevice;
use uuid::Uuid;

const CS: u64 = 4096;
const SIZE: u64 = 256 * CS;

fn lun(dir: &Path, name: &str, engine: bool) -> VolumeConfig {
    let engine = engine.then(|| IoEngine::new(EngineKind::Auto, 2).unwrap());
    common::lun_config(dir, name, SIZE, CS, engine)
}

fn pattern(vc: u64, gen: u8) -> Vec<u8> {
    let mut b = vec![gen; CS as usize];
    b[..8].copy_from_slice(&vc.to_le_bytes());
    b
}

fn delta_of(cfg: &VolumeConfig, id: Uuid) -> PathBuf {
    layers_dir(&cfg.lun_path).join(format!("{id}.delta"))
}

/// Flip one byte of physical cluster `phys` of the delta at `path` through
/// another file descriptor (the page cache the volume reads from).
fn flip(path: &Path, phys: u64, at: u64) {
    let geo = Geometry::new(CS, SIZE).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let off = geo.phys_offset(phys) + at;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, off).unwrap();
}

fn scrub(v: &Volume) -> lungate_block::volume::ScrubReport {
    v.scrub(&mut progress::silent()).unwrap()
}

#[test]
fn a_changed_byte_fails_the_read_and_scrub_names_the_cluster() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "v", false);
    let v = Volume::open(cfg.clone()).unwrap();
    v.enable_checksums().unwrap();
    assert!(v.checksums());
    for vc in 0..8 {
        v.write(vc * CS, &pattern(vc, 1)).unwrap();
    }
    v.flush().unwrap();
    let clean = scrub(&v);
    assert_eq!(clean.errors, vec![]);
    assert_eq!(clean.clusters_checked, 8);
    assert_eq!(clean.clusters_unsummed, 0);

    // The first write allocated physical cluster 0 for virtual cluster 0.
    let top = v.chain()[0];
    flip(&delta_of(&cfg, top), 0, 100);
    let mut b = vec![0u8; 16];
    match v.read(10, &mut b) {
        Err(Error::DataChecksum { cluster: 0, .. }) => {}
        other => panic!("corrupted cluster read as {other:?}"),
    }
    // Its neighbours read fine.
    let mut b = vec![0u8; CS as usize];
    v.read(CS, &mut b).unwrap();
    assert_eq!(b, pattern(1, 1));
    let r = scrub(&v);
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert_eq!(r.errors[0].cluster, 0);
    assert_eq!(r.errors[0].offset, 0);
    assert!(r.errors[0].live);
    assert_eq!(r.clusters_checked, 8);

    // A partial write must not copy the bad cluster up (that would bless
    // the damage with a fresh checksum).
    match v.write(20, &[9; 10]) {
        Err(Error::DataChecksum { cluster: 0, .. }) => {}
        other => panic!("partial write over a corrupted cluster gave {other:?}"),
    }
    // A whole-cluster write replaces it and is summed anew.
    v.write(0, &pattern(0, 2)).unwrap();
    v.flush().unwrap();
    let mut b = vec![0u8; CS as usize];
    v.read(0, &mut b).unwrap();
    assert_eq!(b, pattern(0, 2));
    assert_eq!(scrub(&v).errors, vec![]);
    v.close().unwrap();

    // After a reopen the checksums come back from the journal.
    let v = Volume::open(cfg.clone()).unwrap();
    assert!(v.checksums());
    let r = scrub(&v);
    assert_eq!((r.clusters_checked, r.clusters_unsummed), (8, 0), "{r:?}");
    let mut b = vec![0u8; CS as usize];
    v.read(3 * CS, &mut b).unwrap();
    // Cluster 3 is physical 3 (written in order, nothing freed before).
    flip(&delta_of(&cfg, v.chain()[0]), 3, CS - 1);
    assert!(matches!(
        v.read(3 * CS + 5, &mut b[..4]),
        Err(Error::DataChecksum { cluster: 3, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_asynchronous_path_checks_snapshots_too() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "a", true);
    let v = Arc::new(Volume::open(cfg.clone()).unwrap());
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || v2.enable_checksums().unwrap())
        .await
        .unwrap();
    let dev = VolumeDevice::new(v.clone());
    for vc in 0..4 {
        dev.write(vc * CS, Bytes::from(pattern(vc, 1)), false)
            .await
            .unwrap();
    }
    dev.flush().await.unwrap();
    let snap_layer = v.chain()[0];
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || v2.snapshot("s", "").unwrap())
        .await
        .unwrap();
    // The live layer reads cluster 2 through the snapshot's layer.
    flip(&delta_of(&cfg, snap_layer), 2, 7);
    let err = dev.read(2 * CS + 100, 200).await.unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    // read_chunks (the NBD read path) checks as well.
    assert!(dev.read_chunks(0, 4 * CS as usize).await.is_err());
    // Other clusters, and a read spanning only them, are fine.
    let ok = dev.read(0, 2 * CS as usize).await.unwrap();
    assert_eq!(&ok[..CS as usize], &pattern(0, 1)[..]);
    // A partial write over it is refused, not laundered into the live layer.
    assert!(dev
        .write(2 * CS + 1, Bytes::from_static(b"x"), false)
        .await
        .is_err());
    let v2 = v.clone();
    let r = tokio::task::spawn_blocking(move || v2.scrub(&mut progress::silent()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert_eq!(r.errors[0].snapshot.as_deref(), Some("s"));
    assert_eq!(r.errors[0].cluster, 2);
    assert!(!r.errors[0].live);
}

#[test]
fn checksums_stay_right_across_overwrites_compaction_revert_and_clone() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "c", false);
    let v = Volume::open(cfg.clone()).unwrap();
    v.enable_checksums().unwrap();
    let mut model = vec![0u8; SIZE as usize];
    // Every cluster rewritten, flushed, 140 times: each commit journals
    // 512 entries, so the 1 MiB journal area compacts more than once, and
    // each rewrite of a summed cluster is a copy (never in place).
    for round in 0..140u64 {
        for vc in 0..256u64 {
            let gen = (round % 250) as u8 + 1;
            let mut p = pattern(vc, gen);
            // Partial writes too: the rest of the cluster is copied up.
            if round % 3 == 1 {
                p.truncate(100);
            }
            v.write(vc * CS + 16, &p[16..]).unwrap();
            model[(vc * CS + 16) as usize..(vc * CS) as usize + p.len()].copy_from_slice(&p[16..]);
        }
        v.flush().unwrap();
        if round == 70 {
            v.snapshot("mid", "").unwrap();
        }
    }
    let r = scrub(&v);
    assert_eq!(r.errors, vec![]);
    assert_eq!(r.clusters_unsummed, 0);
    let mut all = vec![0u8; SIZE as usize];
    v.read(0, &mut all).unwrap();
    assert!(all == model, "contents differ from the model");
    v.close().unwrap();
    let v = Volume::open(cfg.clone()).unwrap();
    let r = scrub(&v);
    assert_eq!(r.errors, vec![]);
    assert_eq!(r.clusters_unsummed, 0);
    // The live layer and "mid" both hold every cluster.
    assert_eq!(r.clusters_checked, 512, "{r:?}");
    v.read(0, &mut all).unwrap();
    assert!(all == model, "contents differ after reopen");

    // A revert and a clone keep checksums in their new layers.
    v.revert("mid").unwrap();
    assert!(v.checksums());
    v.write(0, &pattern(0, 0xee)).unwrap();
    v.flush().unwrap();
    let tcfg = lun(d.path(), "clone", false);
    let c = v.clone_to("mid", tcfg.clone()).unwrap();
    assert!(c.checksums());
    c.write(CS, &pattern(1, 0xdd)).unwrap();
    c.flush().unwrap();
    let r = scrub(&c);
    assert_eq!(r.errors, vec![]);
    assert!(r.clusters_checked >= 257, "{r:?}");
    flip(&delta_of(&tcfg, c.chain()[0]), 0, 9);
    let mut b = vec![0u8; 8];
    assert!(matches!(
        c.read(CS, &mut b),
        Err(Error::DataChecksum { cluster: 1, .. })
    ));
}

#[test]
fn concurrent_writers_and_flushes_never_leave_a_stale_checksum() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "w", false);
    let v = Arc::new(Volume::open(cfg.clone()).unwrap());
    v.enable_checksums().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut threads = Vec::new();
    for w in 0..3u64 {
        let (v, stop) = (v.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Small writes into a few hot clusters: most land in place
                // in a cluster a commit is hashing.
                let vc = (i + w) % 8;
                v.write(vc * CS + (i % 64) * 64, &[(i % 251) as u8; 64])
                    .unwrap();
                i += 1;
            }
        }));
    }
    {
        let (v, stop) = (v.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            for _ in 0..300 {
                v.flush().unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    v.flush().unwrap();
    let r = scrub(&v);
    assert_eq!(r.errors, vec![], "a checksum describes bytes that changed");
    let mut b = vec![0u8; SIZE as usize];
    v.read(0, &mut b).unwrap();
    drop(v);
    let v = Volume::open(cfg).unwrap();
    let r = scrub(&v);
    assert_eq!(r.errors, vec![]);
    let mut after = vec![0u8; SIZE as usize];
    v.read(0, &mut after).unwrap();
    assert!(b == after, "flushed contents changed across a reopen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_asynchronous_writers_and_flushes_keep_checksums_right() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "aw", true);
    let v = Arc::new(Volume::open(cfg.clone()).unwrap());
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || v2.enable_checksums().unwrap())
        .await
        .unwrap();
    let dev = VolumeDevice::new(v.clone());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let (dev, stop, written) = (dev.clone(), stop.clone(), written.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let vc = (i + w) % 8;
                let data = Bytes::from(vec![(i % 251) as u8; 64]);
                dev.write(vc * CS + (i % 64) * 64, data, false)
                    .await
                    .unwrap();
                if i % 7 == 0 {
                    // Reads check every summed cluster they touch.
                    dev.read(vc * CS, CS as usize).await.unwrap();
                }
                i += 1;
                written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    // Flushes among the writes, for as long as the writers need to cover
    // every cluster many times over (a flush with nothing new to commit
    // returns at once, so a fixed count could end before they start).
    let mut flushes = 0;
    while flushes < 300 || written.load(std::sync::atomic::Ordering::Relaxed) < 400 {
        dev.flush().await.unwrap();
        tokio::task::yield_now().await;
        flushes += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    dev.flush().await.unwrap();
    let v2 = v.clone();
    let r = tokio::task::spawn_blocking(move || v2.scrub(&mut progress::silent()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.errors, vec![], "a checksum describes bytes that changed");
    assert!(r.clusters_checked >= 8, "{r:?}");
}
