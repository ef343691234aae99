//! Crash and damage cases of the volume engine on real files: a flatten
//! interrupted midway resumes where its last persisted record says, torn
//! manifest and header slots fall back to the other slot, uncommitted
//! layers are removed on open, a live layer a crash left flagged spare is
//! cleared, and a read-only open writes nothing even when it finds
//! something to repair.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use lungate_block::store::file::{layers_dir, FileStore};
use lungate_block::store::Store;
use lungate_block::volume::header::Geometry;
use lungate_block::volume::layer::{read_header, Delta};
use lungate_block::volume::{repair, Volume, VolumeConfig, VolumeOptions};
use uuid::Uuid;

const CS: u64 = 4096;

fn lun(dir: &Path, name: &str, size: u64) -> VolumeConfig {
    common::lun_config(dir, name, size, CS, None)
}

fn ro(cfg: &VolumeConfig) -> VolumeConfig {
    VolumeConfig {
        options: VolumeOptions {
            read_only: true,
            ..cfg.options
        },
        ..cfg.clone()
    }
}

fn all(v: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    v.read(0, &mut b).unwrap();
    b
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn an_interrupted_flatten_resumes_from_its_last_persisted_cluster() {
    let d = tempfile::tempdir().unwrap();
    // 20000 clusters: progress is persisted every 4096.
    let size = 20_000 * CS;
    let cfg = lun(d.path(), "f", size);
    let v = Volume::open(cfg.clone()).unwrap();
    for i in 0..200u64 {
        v.write(i * 97 * CS + 11, &[i as u8 | 1; 5000]).unwrap();
    }
    v.snapshot("a", "").unwrap();
    for i in 0..100u64 {
        v.write(i * 191 * CS, &[0xee; 100]).unwrap();
    }
    v.trim(5 * CS, 3 * CS).unwrap();
    let want = all(&v);
    let r = catch_unwind(AssertUnwindSafe(|| {
        v.flatten(|done, _| {
            if done >= 9000 {
                panic!("simulated crash at cluster {done}");
            }
        })
    }));
    assert!(r.is_err());
    v.crash();
    let v = Volume::open(cfg.clone()).unwrap();
    assert_eq!(
        all(&v),
        want,
        "the interrupted flatten changed what the volume reads"
    );
    let mut first = None;
    v.flatten(|done, total| {
        first.get_or_insert(done);
        assert_eq!(total, 20_000);
    })
    .unwrap();
    assert_eq!(first, Some(8192), "resumed from the persisted record");
    assert_eq!(v.chain().len(), 1);
    assert_eq!(all(&v), want);
    drop(v);
    let v = Volume::open(cfg).unwrap();
    assert_eq!(all(&v), want);
    let mut b = vec![0u8; 2 * CS as usize];
    v.read_snapshot("a", 0, &mut b).unwrap();
    assert_eq!(&b[11..5011], &[1u8; 5000][..]);
}

#[test]
fn torn_slots_fall_back_and_orphans_go_and_read_only_repairs_nothing() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "t", 256 * CS);
    let v = Volume::open(cfg.clone()).unwrap();
    v.write(0, &[1; 10_000]).unwrap();
    v.snapshot("a", "").unwrap();
    v.write(CS, &[2; 10_000]).unwrap();
    v.snapshot("b", "").unwrap();
    v.write(3 * CS, &[3; 100]).unwrap();
    v.flush().unwrap();
    let want = all(&v);
    let live = v.chain()[0];
    drop(v);
    let dir = layers_dir(&cfg.lun_path);

    // A torn manifest slot, a torn header slot of the live delta, garbage
    // past its committed journal, and an uncommitted layer file.
    let m0 = dir.join("manifest.0");
    let mut b = std::fs::read(&m0).unwrap();
    let n = b.len();
    b[n / 2] ^= 0xff;
    std::fs::write(&m0, &b).unwrap();
    let delta = dir.join(format!("{live}.delta"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&delta)
        .unwrap();
    // Tear the older header slot (generation at byte 16 of each 4 KiB
    // slot): what a crash during the next header commit leaves.
    let generation = |slot: u64| {
        let mut g = [0u8; 8];
        f.read_exact_at(&mut g, slot * 4096 + 16).unwrap();
        u64::from_le_bytes(g)
    };
    let older = if generation(0) < generation(1) { 0 } else { 1 };
    f.write_all_at(&[0xab; 1000], older * 4096 + 2000).unwrap();
    // Garbage past the committed journal: a torn, uncommitted append.
    f.write_all_at(&[0x5a; 3000], 3 * 4096 + 200_000).unwrap();
    drop(f);
    let orphan = dir.join(format!("{}.delta", Uuid::new_v4()));
    std::fs::write(&orphan, b"half-made layer").unwrap();

    // Read-only: same bytes, warnings, nothing written.
    let before = files(&dir);
    let v = Volume::open(ro(&cfg)).unwrap();
    assert_eq!(all(&v), want);
    assert!(!v.warnings().is_empty());
    drop(v);
    assert!(files(&dir) == before, "a read-only open wrote");

    // Read-write: repaired, orphan gone, data intact.
    let v = Volume::open(cfg.clone()).unwrap();
    assert_eq!(all(&v), want);
    assert!(!orphan.exists());
    assert_eq!(
        std::fs::read(dir.join("manifest.0")).unwrap(),
        std::fs::read(dir.join("manifest.1")).unwrap(),
        "the damaged manifest slot was rewritten"
    );
    // The delta keeps working: more writes, a flush, a clean reopen.
    v.write(4 * CS, &[4; 10]).unwrap();
    v.flush().unwrap();
    let want = all(&v);
    drop(v);
    let v = Volume::open(cfg).unwrap();
    assert_eq!(all(&v), want);
    assert!(v.warnings().iter().all(|w| !w.contains("manifest")));
}

#[test]
fn writes_after_the_last_flush_may_go_but_flushed_ones_stay() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "c", 512 * CS);
    let v = Volume::open(cfg.clone()).unwrap();
    v.snapshot("a", "").unwrap();
    for i in 0..300u64 {
        v.write(i * CS + 7, &[(i % 250) as u8 + 1; 3000]).unwrap();
    }
    v.trim(10 * CS, 20 * CS).unwrap();
    v.flush().unwrap();
    let flushed = all(&v);
    // Unflushed: overwrite in place, new clusters, trims.
    for i in 0..50u64 {
        v.write(i * 2 * CS, &[0xcc; 4096]).unwrap();
    }
    v.trim(0, 100 * CS).unwrap();
    v.crash();
    let v = Volume::open(cfg).unwrap();
    let got = all(&v);
    // Every cluster reads either its flushed contents or what the lost
    // writes put there; never anything else (no stale or foreign data).
    for c in 0..512usize {
        let r = c * CS as usize..(c + 1) * CS as usize;
        let ok = got[r.clone()] == flushed[r.clone()]
            || got[r.clone()].iter().all(|&x| x == 0)
            || got[r.clone()].iter().all(|&x| x == 0xcc);
        assert!(ok, "cluster {c} reads something never written there");
    }
    // Clusters the lost writes never touched are exactly as flushed.
    assert_eq!(got[100 * CS as usize..], flushed[100 * CS as usize..]);
}

/// The `*.delta` files of a layers directory, by name.
fn deltas(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".delta"))
        .collect();
    v.sort();
    v
}

fn cluster(v: &Volume, c: u64) -> Vec<u8> {
    let mut b = vec![0u8; CS as usize];
    v.read(c * CS, &mut b).unwrap();
    b
}

/// A new volume `NAME` of `clusters` clusters in `dir` whose cluster 0
/// holds `fill` under snapshot `snap` (the first snapshot publishes the
/// store: made whole, durably), with its config and layers directory.
fn snapshotted(
    dir: &Path,
    name: &str,
    clusters: u64,
    fill: u8,
    snap: &str,
) -> (VolumeConfig, PathBuf, Volume) {
    let cfg = lun(dir, name, clusters * CS);
    let layers = layers_dir(&cfg.lun_path);
    let v = Volume::open(cfg.clone()).unwrap();
    v.write(0, &[fill; CS as usize]).unwrap();
    v.snapshot(snap, "").unwrap();
    (cfg, layers, v)
}

/// After a crash forgot a switch nothing made durable: the write into its
/// spare delta (cluster 3) went with the spare's file.
fn assert_spare_removed(v: &Volume, dir: &Path, committed: &[String]) {
    assert_eq!(
        cluster(v, 3),
        vec![0; CS as usize],
        "an unflushed write into the spare delta survived its removal"
    );
    assert_eq!(deltas(dir), committed, "the spare delta outlived the crash");
}

/// A live snapshot in its three phases (prepare before the pause, switch
/// inside it, finish after): a crash after the switch and before anything
/// made it durable forgets the snapshot and removes the spare delta, with
/// every flushed write intact; a flush after the switch is what makes it
/// durable, so a crash after that flush keeps the snapshot exactly as the
/// disk was at the switch and the live disk with the write after it.
#[test]
fn a_switched_snapshot_is_durable_after_the_next_flush_and_forgotten_before() {
    for flush_after in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let (cfg, dir, v) = snapshotted(d.path(), "s", 64, 1, "first");
        v.write(CS, &[2; CS as usize]).unwrap();
        v.flush().unwrap();
        let committed = deltas(&dir);
        v.prepare_snapshot().unwrap();
        assert_eq!(deltas(&dir).len(), committed.len() + 1, "no spare made");
        // Written after the prepare, before the switch: in the snapshot.
        v.write(2 * CS, &[3; CS as usize]).unwrap();
        let info = v.switch_snapshot("s", "live").unwrap();
        assert_eq!(info.name, "s");
        assert!(v.snapshots().iter().any(|s| s.name == "s"));
        v.write(3 * CS, &[4; CS as usize]).unwrap();
        if flush_after {
            v.flush().unwrap();
        }
        v.crash();

        let v = Volume::open(cfg.clone()).unwrap();
        let names: Vec<String> = v.snapshots().into_iter().map(|s| s.name).collect();
        assert_eq!(cluster(&v, 0), vec![1; CS as usize]);
        assert_eq!(cluster(&v, 1), vec![2; CS as usize]);
        if flush_after {
            assert_eq!(names, ["first", "s"]);
            assert_eq!(cluster(&v, 2), vec![3; CS as usize]);
            assert_eq!(cluster(&v, 3), vec![4; CS as usize]);
            let mut b = vec![0u8; 4 * CS as usize];
            v.read_snapshot("s", 0, &mut b).unwrap();
            assert_eq!(
                &b[..3 * CS as usize],
                &[[1u8; 4096], [2; 4096], [3; 4096]].concat()[..]
            );
            assert_eq!(
                &b[3 * CS as usize..],
                &[0u8; 4096][..],
                "a write after the switch is in the snapshot"
            );
            assert_eq!(deltas(&dir).len(), committed.len() + 1);
        } else {
            assert_eq!(
                names,
                ["first"],
                "a snapshot nothing made durable survived a crash"
            );
            assert_spare_removed(&v, &dir, &committed);
        }
        // Tree operations go on from a committed manifest.
        v.snapshot("after", "").unwrap();
        v.close().unwrap();
        let v = Volume::open(cfg).unwrap();
        assert!(v.snapshots().iter().any(|s| s.name == "after"));
    }
}

/// A crash after a snapshot's manifest commit and before the new live
/// layer's spare flag is cleared leaves that flag on a layer the manifest
/// names. A read-write open clears it (and says so), so a later `lunctl
/// repair` keeps the live layer and its data instead of leaving it out as
/// a spare that never held anything.
#[test]
fn a_live_layer_left_flagged_spare_is_cleared_on_open_and_kept_by_repair() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, dir, v) = snapshotted(d.path(), "l", 64, 1, "a");
    v.write(CS, &[2; CS as usize]).unwrap();
    v.flush().unwrap();
    let live = v.chain()[0];
    let geo = Geometry::new(CS, v.size()).unwrap();
    drop(v);
    let store = FileStore::new(&cfg.lun_path, cfg.file.clone(), None, true);
    let spare = |id| {
        let obj = store.open_layer(id, false).unwrap();
        read_header(&*obj).unwrap().0.spare()
    };
    // The state the crash leaves, made with the engine's own header commit.
    let obj = store.open_layer(live, true).unwrap();
    let (delta, _) = Delta::open(obj, live, cfg.lun_uuid, geo).unwrap();
    delta.set_spare(true).unwrap();
    drop(delta);
    assert!(spare(live));

    // Read-only: served as it is, nothing written.
    let v = Volume::open(ro(&cfg)).unwrap();
    assert_eq!(cluster(&v, 1), vec![2; CS as usize]);
    drop(v);
    assert!(spare(live), "a read-only open wrote the header");

    let v = Volume::open(cfg.clone()).unwrap();
    assert!(
        v.warnings().iter().any(|w| w.contains("flagged spare")),
        "{:?}",
        v.warnings()
    );
    assert!(!spare(live), "the live layer is still flagged spare");
    v.write(2 * CS, &[3; CS as usize]).unwrap();
    v.flush().unwrap();
    let want = all(&v);
    drop(v);

    // The manifest lost: repair rebuilds the tree with the live layer.
    std::fs::remove_file(dir.join("manifest.0")).unwrap();
    std::fs::remove_file(dir.join("manifest.1")).unwrap();
    let r = repair::rebuild_manifest(&cfg, &|_| None).unwrap();
    assert_eq!(r.top, live);
    assert!(r.left_out.is_empty(), "left out: {:?}", r.left_out);
    let v = Volume::open(cfg).unwrap();
    assert_eq!(all(&v), want);
    assert!(v.warnings().iter().all(|w| !w.contains("flagged spare")));
}

/// A spare delta made on a live layer that a revert then replaced is not
/// used: the switch makes the snapshot whole on the new live layer and the
/// stale spare is removed.
#[test]
fn a_spare_from_before_a_revert_is_removed_not_used() {
    let d = tempfile::tempdir().unwrap();
    let (_, dir, v) = snapshotted(d.path(), "r", 16, 7, "a");
    v.write(0, &[8; CS as usize]).unwrap();
    v.prepare_snapshot().unwrap();
    v.revert("a").unwrap();
    v.write(CS, &[9; CS as usize]).unwrap();
    v.switch_snapshot("b", "").unwrap();
    v.finish_switch().unwrap();
    let mut b = vec![0u8; 2 * CS as usize];
    v.read_snapshot("b", 0, &mut b).unwrap();
    assert_eq!(b, [[7u8; 4096], [9; 4096]].concat());
    // Every delta file left (before any reopen could clean up) is a layer
    // of the volume.
    let named: Vec<String> = v
        .usage()
        .into_iter()
        .map(|u| u.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for f in deltas(&dir) {
        assert!(
            named.contains(&f),
            "{f} is no layer of the volume: {named:?}"
        );
    }
    v.close().unwrap();
}

/// A live revert in its three phases (prepare before the pause, switch
/// inside it, finish after): a crash after the switch and before anything
/// made it durable finds the LUN as it was before the revert (every
/// flushed write intact, the spare delta removed); a flush after the
/// switch is what makes it durable, so a crash after that flush finds the
/// snapshot's data with the write after the switch, and the discarded
/// layer gone.
#[test]
fn a_switched_revert_is_durable_after_the_next_flush_and_forgotten_before() {
    for flush_after in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let (cfg, dir, v) = snapshotted(d.path(), "r", 64, 1, "a");
        v.write(0, &[2; CS as usize]).unwrap();
        v.write(CS, &[5; CS as usize]).unwrap();
        v.flush().unwrap();
        let committed = deltas(&dir);
        let discarded = v.chain()[0];
        let spare = v.prepare_revert("a").unwrap().expect("a file store");
        assert_eq!(deltas(&dir).len(), committed.len() + 1, "no spare made");
        assert_ne!(spare, discarded);
        // Written after the prepare, before the switch: discarded.
        v.write(2 * CS, &[3; CS as usize]).unwrap();
        v.switch_revert("a").unwrap();
        assert_eq!(v.chain()[0], spare, "the spare is not the live layer");
        assert_eq!(cluster(&v, 0), vec![1; CS as usize]);
        assert_eq!(cluster(&v, 1), vec![0; CS as usize]);
        assert_eq!(cluster(&v, 2), vec![0; CS as usize]);
        v.write(3 * CS, &[4; CS as usize]).unwrap();
        if flush_after {
            v.flush().unwrap();
        }
        v.crash();

        let v = Volume::open(cfg.clone()).unwrap();
        let names: Vec<String> = v.snapshots().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["a"]);
        if flush_after {
            assert_eq!(v.chain()[0], spare);
            assert_eq!(cluster(&v, 0), vec![1; CS as usize]);
            assert_eq!(cluster(&v, 1), vec![0; CS as usize]);
            assert_eq!(cluster(&v, 2), vec![0; CS as usize]);
            assert_eq!(cluster(&v, 3), vec![4; CS as usize]);
            let now = deltas(&dir);
            assert_eq!(now.len(), committed.len(), "{now:?}");
            assert!(
                !now.iter().any(|f| f.contains(&discarded.to_string())),
                "the discarded layer outlived the committed revert: {now:?}"
            );
        } else {
            assert_eq!(v.chain()[0], discarded, "an uncommitted revert survived");
            assert_eq!(cluster(&v, 0), vec![2; CS as usize]);
            assert_eq!(cluster(&v, 1), vec![5; CS as usize]);
            assert_spare_removed(&v, &dir, &committed);
        }
        // Tree operations go on from a committed manifest.
        v.revert("a").unwrap();
        v.snapshot("after", "").unwrap();
        v.close().unwrap();
        let v = Volume::open(cfg).unwrap();
        assert_eq!(cluster(&v, 0), vec![1; CS as usize]);
        assert!(v.snapshots().iter().any(|s| s.name == "after"));
    }
}

/// A revert prepared ahead and then overtaken by writes, a snapshot's
/// deletion and a second prepare still switches to the snapshot's data exactly, whether
/// its index was built ahead or (the tree changed since) in the switch;
/// and a revert that nobody prepared makes its spare in the switch.
#[test]
fn a_revert_switches_to_the_snapshot_whether_prepared_fresh_stale_or_not_at_all() {
    let d = tempfile::tempdir().unwrap();
    let cfg = lun(d.path(), "p", 64 * CS);
    let v = Volume::open(cfg.clone()).unwrap();
    for c in 0..8u64 {
        v.write(c * CS, &[c as u8 + 1; CS as usize]).unwrap();
    }
    v.snapshot("a", "").unwrap();
    for c in 4..12u64 {
        v.write(c * CS, &[c as u8 + 50; CS as usize]).unwrap();
    }
    v.snapshot("b", "").unwrap();
    let want_a: Vec<u8> = (0..64u64)
        .flat_map(|c| [if c < 8 { c as u8 + 1 } else { 0 }; CS as usize])
        .collect();
    let mut want_b = vec![0u8; 64 * CS as usize];
    v.read_snapshot("b", 0, &mut want_b).unwrap();
    v.write(20 * CS, &[9; CS as usize]).unwrap();
    v.snapshot("c", "").unwrap();
    // Prepared for "a", then the tree changes (a delete, which merges the
    // deleted snapshot's layer into the live one): the prepared index is
    // stale, the spare still fits.
    let spare = v.prepare_revert("a").unwrap().unwrap();
    v.write(21 * CS, &[8; CS as usize]).unwrap();
    v.delete_snapshot("c").unwrap();
    v.switch_revert("a").unwrap();
    v.finish_switch().unwrap();
    assert_eq!(v.chain()[0], spare);
    assert_eq!(all(&v), want_a);
    // Prepared twice (the second reuses the first's spare).
    let s1 = v.prepare_revert("b").unwrap().unwrap();
    let s2 = v.prepare_revert("b").unwrap().unwrap();
    assert_eq!(s1, s2, "a second prepare made another spare");
    v.switch_revert("b").unwrap();
    v.finish_switch().unwrap();
    assert_eq!(all(&v), want_b);
    // Prepared for "b", switched to "a": the spare does not fit, another
    // is made in the switch and the unfit one removed.
    v.prepare_revert("b").unwrap();
    v.switch_revert("a").unwrap();
    v.flush().unwrap();
    assert_eq!(all(&v), want_a);
    let named: Vec<String> = v
        .usage()
        .into_iter()
        .map(|u| u.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for f in deltas(&layers_dir(&cfg.lun_path)) {
        assert!(
            named.contains(&f),
            "{f} is no layer of the volume: {named:?}"
        );
    }
    v.close().unwrap();
    let v = Volume::open(cfg).unwrap();
    assert_eq!(all(&v), want_a);
    assert!(v.warnings().is_empty(), "{:?}", v.warnings());
}
