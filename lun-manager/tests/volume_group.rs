//! The consistency group and the LUN's volume end to end, on real LUN files
//! in a temporary pool: snapshot, revert, delete, clone (new identity),
//! flatten, diff / apply-diff, usage, crash recovery of a half-made group
//! snapshot, deep chains.

use std::path::{Path, PathBuf};

use lun_manager::format::state::{HardwareConfig, Identity, RecordType, SecondaryDisks};
use lun_manager::group::Group;
use lun_manager::{Access, CreateSpec, Layout, Lun, RegionKind};

const MIB: u64 = 1 << 20;

fn create(pool: &Path, name: &str, layout: Layout) -> PathBuf {
    let p = pool.join(format!("{name}.lun"));
    Lun::create(
        &p,
        &CreateSpec {
            name: name.into(),
            disks: vec![4 * MIB, 2 * MIB],
            memory: MIB,
            vcpus: 2,
            layout,
            cluster_size: 0,
            checksums: false,
        },
    )
    .unwrap();
    p
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2654435761) >> 9) as u8 ^ seed | 1)
        .collect()
}

fn disk(l: &Lun, idx: u32, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    l.read_region(RegionKind::Disk, idx, off, &mut b).unwrap();
    b
}

fn put_vcpus(l: &mut Lun, vcpus: u32) {
    let mut hw: HardwareConfig = l.hardware().unwrap();
    hw.vcpus = vcpus;
    l.put_records(&[(
        RecordType::HardwareConfig,
        0,
        serde_json::to_vec(&hw).unwrap(),
    )])
    .unwrap();
}

fn whole(l: &Lun) -> Vec<u8> {
    let v = l.volume();
    let mut b = vec![0u8; v.size() as usize];
    v.read(0, &mut b).unwrap();
    b
}

/// `POOL/vm.lun` (offset layout) with `POOL/data.lun` (`layout`)
/// attached as its secondary disk; their paths.
fn with_secondary(pool: &Path, layout: Layout) -> (PathBuf, PathBuf) {
    let p = create(pool, "vm", Layout::Offset);
    let s = create(pool, "data", layout);
    let mut pl = Lun::open(&p, Access::ReadWrite).unwrap();
    let sl = Lun::open(&s, Access::ReadOnly).unwrap();
    pl.attach_secondary(&sl).unwrap();
    (p, s)
}

fn reopen(p: &Path) -> Group {
    Group::open(p, Access::ReadWrite).unwrap()
}

#[test]
fn clone_has_a_new_identity_while_snapshot_and_revert_keep_the_original() {
    let d = tempfile::tempdir().unwrap();
    for layout in [Layout::Offset, Layout::Truncate] {
        let p = create(d.path(), &format!("vm-{layout}"), layout);
        let mut g = reopen(&p);
        let id0: Identity = g
            .primary()
            .record_json(RecordType::Identity, 0)
            .unwrap()
            .unwrap();
        let uuid0 = g.primary().uuid();
        let ids0: Vec<_> = (0..2).map(|i| g.primary().disk_id(i).unwrap()).collect();
        g.primary()
            .write_region(RegionKind::Disk, 0, 0, b"gold")
            .unwrap();
        let info = g.snapshot("gold", "golden image").unwrap();
        assert_eq!(info.name, "gold");
        assert_eq!(info.description, "golden image");
        assert!(info.current);
        g.primary()
            .write_region(RegionKind::Disk, 0, 0, b"dirt")
            .unwrap();
        g.revert("gold").unwrap();
        assert_eq!(disk(g.primary(), 0, 0, 4), b"gold");
        // Snapshot and revert keep the identity.
        assert_eq!(g.primary().uuid(), uuid0);
        let id1: Identity = g
            .primary()
            .record_json(RecordType::Identity, 0)
            .unwrap()
            .unwrap();
        assert_eq!(id1, id0);

        let t = std::time::Instant::now();
        let c = g.clone("gold", &format!("copy-{layout}")).unwrap();
        let took = t.elapsed();
        let cl = c.primary();
        assert_ne!(cl.uuid(), uuid0);
        assert_eq!(cl.name(), format!("copy-{layout}"));
        assert_eq!(cl.layout(), layout);
        assert_eq!(cl.label().lun_size, g.primary().label().lun_size);
        for i in 0..2 {
            let id = cl.disk_id(i).unwrap();
            assert_ne!(id, ids0[i as usize], "disk{i} keeps its parent's ID");
        }
        let cid: Identity = cl.record_json(RecordType::Identity, 0).unwrap().unwrap();
        assert_eq!(cid.disks[0].export_name, format!("copy-{layout}/disk0"));
        // The clone holds the snapshot's data, its own label, a sparse file.
        assert_eq!(disk(cl, 0, 0, 4), b"gold");
        let meta = std::fs::metadata(cl.path()).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 4 * MIB, "clone file is not sparse");
        assert!(took.as_secs() < 5, "clone took {took:?}");
        drop(c);
        // It reopens on its own as a valid LUN with its own identity.
        let c = Lun::open(
            &d.path().join(format!("copy-{layout}.lun")),
            Access::ReadWrite,
        )
        .unwrap();
        assert!(c.verify_records().iter().all(|(_, e)| e.is_none()));
        assert_ne!(c.uuid(), uuid0);
        // The parent refuses deletion while the clone depends on it.
        drop(g);
        let e = Lun::open(&p, Access::ReadWrite)
            .unwrap()
            .delete()
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("copy-{layout}")), "{e}");
        // Once the clone is flattened the parent may go.
        c.volume().flatten(|_, _| {}).unwrap();
        let mut b = [0u8; 4];
        c.read_region(RegionKind::Disk, 0, 0, &mut b).unwrap();
        assert_eq!(&b, b"gold");
        Lun::open(&p, Access::ReadWrite).unwrap().delete().unwrap();
        c.read_region(RegionKind::Disk, 0, 0, &mut b).unwrap();
        assert_eq!(&b, b"gold");
    }
}

#[test]
fn state_records_revert_with_the_disks() {
    let d = tempfile::tempdir().unwrap();
    let p = create(d.path(), "vm", Layout::Offset);
    let g = reopen(&p);
    g.snapshot("two-cpus", "").unwrap();
    drop(g);
    let mut l = Lun::open(&p, Access::ReadWrite).unwrap();
    put_vcpus(&mut l, 8);
    l.write_region(RegionKind::Disk, 1, MIB, b"later").unwrap();
    l.sync().unwrap();
    drop(l);
    let mut g = reopen(&p);
    assert_eq!(g.primary().hardware().unwrap().vcpus, 8);
    g.snapshot("eight-cpus", "").unwrap();
    g.revert("two-cpus").unwrap();
    assert_eq!(g.primary().hardware().unwrap().vcpus, 2);
    assert_eq!(disk(g.primary(), 1, MIB, 5), vec![0u8; 5]);
    g.revert("eight-cpus").unwrap();
    assert_eq!(g.primary().hardware().unwrap().vcpus, 8);
    assert_eq!(disk(g.primary(), 1, MIB, 5), b"later");
    // Deleting a snapshot in the middle loses nothing of the others.
    g.delete_snapshot("two-cpus").unwrap();
    assert_eq!(g.snapshots().len(), 1);
    g.revert("eight-cpus").unwrap();
    assert_eq!(g.primary().hardware().unwrap().vcpus, 8);
    let u = g.usage();
    assert!(u.iter().any(|l| l.live));
    assert!(u
        .iter()
        .any(|l| l.snapshot.as_deref() == Some("eight-cpus")));
}

#[test]
fn a_secondary_disk_is_snapshotted_reverted_and_cloned_with_its_primary() {
    let d = tempfile::tempdir().unwrap();
    let (p, _) = with_secondary(d.path(), Layout::Truncate);
    let mut g = reopen(&p);
    assert_eq!(g.members().len(), 2);
    let suuid = g.members()[1].uuid();
    g.members()[1]
        .write_region(RegionKind::Disk, 0, 0, b"v1")
        .unwrap();
    g.snapshot("one", "").unwrap();
    assert!(g.members()[1]
        .volume()
        .snapshots()
        .iter()
        .any(|x| x.name == "one"));
    g.members()[1]
        .write_region(RegionKind::Disk, 0, 0, b"v2")
        .unwrap();
    g.primary()
        .write_region(RegionKind::Disk, 0, 0, b"p2")
        .unwrap();
    g.revert("one").unwrap();
    assert_eq!(disk(&g.members()[1], 0, 0, 2), b"v1");
    assert_eq!(disk(g.primary(), 0, 0, 2), vec![0, 0]);
    // Clone: both LUNs cloned, the clone's primary points at the cloned
    // secondary.
    let c = g.clone("one", "vm2").unwrap();
    assert_eq!(c.members().len(), 2);
    let cs = &c.members()[1];
    assert_eq!(cs.name(), "vm2-data");
    assert_ne!(cs.uuid(), suuid);
    assert_eq!(disk(cs, 0, 0, 2), b"v1");
    let refs: SecondaryDisks = c.primary().secondaries().unwrap();
    assert_eq!(refs.disks.len(), 1);
    assert_eq!(refs.disks[0].lun_uuid, cs.uuid());
    drop(c);
    let c = reopen(&d.path().join("vm2.lun"));
    assert_eq!(c.members()[1].path(), d.path().join("vm2-data.lun"));
    // Group delete removes it from both.
    g.delete_snapshot("one").unwrap();
    assert!(g
        .members()
        .iter()
        .all(|m| m.volume().snapshots().is_empty()));
    // Flatten reports progress over the whole group and ends at the total.
    let mut last = (0, 1);
    g.flatten(|a, b| last = (a, b)).unwrap();
    assert_eq!(last.0, last.1);
}

#[test]
fn a_half_made_group_snapshot_is_removed_on_open() {
    let d = tempfile::tempdir().unwrap();
    let (p, _) = with_secondary(d.path(), Layout::Offset);
    let g = reopen(&p);
    g.snapshot("whole", "").unwrap();
    // A crash after the secondary's snapshot and before the primary's: the
    // intent file is there, the primary lacks the snapshot.
    g.members()[1].volume().snapshot("half", "").unwrap();
    std::fs::write(
        d.path().join(".vm.group-op"),
        br#"{"op":"snapshot","name":"half"}"#,
    )
    .unwrap();
    drop(g);
    // A read-only open changes nothing and refuses changes.
    let ro = Group::open(&p, Access::ReadOnly).unwrap();
    assert_eq!(ro.members()[1].volume().snapshots().len(), 2);
    let e = ro.snapshot("nope", "").unwrap_err().to_string();
    assert!(e.contains("read-only"), "{e}");
    drop(ro);
    let g = reopen(&p);
    let names: Vec<_> = g.members()[1]
        .volume()
        .snapshots()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["whole".to_string()]);
    assert!(!d.path().join(".vm.group-op").exists());
}

/// A byte copy of a LUN in another pool, then diffs replayed onto it.
#[test]
fn diff_then_apply_diff_onto_a_copy_reproduces_the_target_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let p = create(d.path(), "vm", Layout::Offset);
    {
        let l = Lun::open(&p, Access::ReadWrite).unwrap();
        l.write_region(RegionKind::Disk, 0, 0, &pattern(1, 3 * MIB as usize))
            .unwrap();
        l.sync().unwrap();
    }
    let copy = other.path().join("vm.lun");
    std::fs::copy(&p, &copy).unwrap();
    let g = reopen(&p);
    g.snapshot("base", "").unwrap();
    drop(g);
    {
        let mut l = Lun::open(&p, Access::ReadWrite).unwrap();
        l.write_region(RegionKind::Disk, 0, 100_000, &pattern(2, 700_000))
            .unwrap();
        l.volume().trim(l.disks()[0].offset + 2 * MIB, MIB).unwrap();
        l.write_region(RegionKind::Disk, 1, 12345, &pattern(3, 5000))
            .unwrap();
        put_vcpus(&mut l, 5);
        l.sync().unwrap();
    }
    let g = reopen(&p);
    g.snapshot("next", "").unwrap();
    let changes = g.diff("base", Some("next")).unwrap();
    assert!(!changes.is_empty());
    let json = serde_json::to_string(&changes).unwrap();
    assert!(
        json.contains("\"kind\":\"zero\"") && json.contains("\"kind\":\"data\""),
        "{json}"
    );
    let mut file = Vec::new();
    let n = g.write_diff("base", Some("next"), &mut file).unwrap();
    assert_eq!(n, file.len() as u64);
    assert_eq!(&file[..8], b"LGDIFF02");

    // Corrupted, truncated or mismatched files are refused and change
    // nothing on the copy.
    let before = std::fs::read(&copy).unwrap();
    let mut target = reopen(&copy);
    for bad in [
        {
            let mut b = file.clone();
            let mid = b.len() / 2;
            b[mid] ^= 0x40;
            b
        },
        file[..file.len() - 1].to_vec(),
        {
            let mut b = file.clone();
            b.push(0);
            b
        },
        b"LGDIFF01 and then nonsense".to_vec(),
    ] {
        let e = target.apply_diff(&mut &bad[..]).unwrap_err().to_string();
        assert!(e.contains("diff file refused"), "{e}");
        assert!(
            std::fs::read(&copy).unwrap() == before,
            "a refused diff changed the copy"
        );
    }
    let stranger = create(other.path(), "stranger", Layout::Offset);
    let e = reopen(&stranger)
        .apply_diff(&mut &file[..])
        .unwrap_err()
        .to_string();
    // Another LUN, and its disks do not hold the diff's base.
    assert!(e.contains("does not hold its base \"base\""), "{e}");

    // The real thing.
    target.apply_diff(&mut &file[..]).unwrap();
    let mut want = vec![0u8; g.primary().volume().size() as usize];
    g.primary()
        .volume()
        .read_snapshot("next", 0, &mut want)
        .unwrap();
    assert!(
        whole(target.primary()) == want,
        "the copy differs from snapshot next"
    );
    assert_eq!(target.primary().hardware().unwrap().vcpus, 5);
    // Applying again is harmless (absolute contents).
    target.apply_diff(&mut &file[..]).unwrap();
    assert!(whole(target.primary()) == want);
    drop(target);
    let t = Lun::open(&copy, Access::ReadWrite).unwrap();
    assert!(t.verify_records().iter().all(|(_, e)| e.is_none()));
    assert_eq!(t.hardware().unwrap().vcpus, 5);

    // Snapshot → live works the same way.
    g.primary()
        .write_region(RegionKind::Disk, 1, 0, &pattern(4, 10_000))
        .unwrap();
    let mut live = Vec::new();
    g.write_diff("next", None, &mut live).unwrap();
    drop(t);
    let mut target = reopen(&copy);
    target.apply_diff(&mut &live[..]).unwrap();
    assert!(whole(target.primary()) == whole(g.primary()));
}

#[test]
fn a_chain_of_depth_64_reads_correctly() {
    let d = tempfile::tempdir().unwrap();
    let p = create(d.path(), "deep", Layout::Truncate);
    let g = reopen(&p);
    let l = g.primary();
    let mut model = disk(l, 0, 0, 4 * MIB as usize);
    for i in 0..64u64 {
        let off = i * 60_000 + 777;
        let data = pattern(i as u8, 70_000);
        l.write_region(RegionKind::Disk, 0, off, &data).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        g.snapshot(&format!("s{i}"), "").unwrap();
    }
    assert_eq!(l.volume().chain().len(), 65);
    assert!(disk(l, 0, 0, 4 * MIB as usize) == model);
    drop(g);
    let g = reopen(&p);
    assert!(disk(g.primary(), 0, 0, 4 * MIB as usize) == model);
    assert_eq!(g.snapshots().len(), 64);
}

#[test]
fn interrupted_revert_and_clone_are_finished_or_undone_on_open() {
    let d = tempfile::tempdir().unwrap();
    let (p, s) = with_secondary(d.path(), Layout::Offset);
    let g = reopen(&p);
    g.snapshot("a", "").unwrap();
    for m in g.members() {
        m.write_region(RegionKind::Disk, 0, 0, b"new").unwrap();
    }
    // A crash after the secondary reverted and before the primary did.
    g.members()[1].volume().revert("a").unwrap();
    std::fs::write(
        d.path().join(".vm.group-op"),
        br#"{"op":"revert","name":"a"}"#,
    )
    .unwrap();
    drop(g);
    let g = reopen(&p);
    for m in g.members() {
        assert_eq!(disk(m, 0, 0, 3), vec![0, 0, 0], "{} not reverted", m.name());
    }
    // A crash in the middle of a clone: the secondary's clone is complete,
    // the primary's has no label yet.
    let half = g.clone("a", "half").unwrap();
    let (hp, hs) = (
        half.primary().path().to_path_buf(),
        half.members()[1].path().to_path_buf(),
    );
    let (hu, hsu) = (half.primary().uuid(), half.members()[1].uuid());
    drop(half);
    std::fs::write(&hp, vec![0u8; 4096]).unwrap();
    std::fs::write(
        d.path().join(".vm.group-op"),
        serde_json::to_vec(&serde_json::json!({"op": "clone", "members": [
            {"name": "half", "uuid": hu},
            {"name": "half-data", "uuid": hsu},
        ]}))
        .unwrap(),
    )
    .unwrap();
    drop(g);
    let g = reopen(&p);
    assert!(!hp.exists() && !hs.exists(), "half-made clone left behind");
    assert!(!d.path().join("half.layers").exists());
    assert!(!d.path().join("half-data.layers").exists());
    // The parent no longer counts the removed clones as dependents.
    drop(g);
    Lun::open(&s, Access::ReadWrite).unwrap();
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.starts_with("half")), "{names:?}");
}

#[test]
fn a_group_can_be_made_of_luns_already_open() {
    let d = tempfile::tempdir().unwrap();
    let (p, s) = with_secondary(d.path(), Layout::Offset);
    let pl = Lun::open(&p, Access::ReadWrite).unwrap();
    let sl = Lun::open(&s, Access::ReadWrite).unwrap();
    let e = Group::from_members(vec![pl]).unwrap_err().to_string();
    assert!(e.contains("lists secondaries"), "{e}");
    let pl = Lun::open(&p, Access::ReadWrite).unwrap();
    let g = Group::from_members(vec![pl, sl]).unwrap();
    g.snapshot("x", "").unwrap();
    let m = g.into_members();
    assert!(m.iter().all(|l| l.volume().snapshots().len() == 1));
}

/// An intent file is a file of the pool: whatever it names, recovery only
/// removes what the interrupted clone provably made, inside the pool.
#[test]
fn a_hostile_clone_intent_removes_nothing_the_clone_did_not_make() {
    let top = tempfile::tempdir().unwrap();
    let pool = top.path().join("pool");
    let outside = top.path().join("outside");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(outside.join("victim.layers")).unwrap();
    let victim = outside.join("victim.lun");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::write(outside.join("victim.layers/keep"), b"precious too").unwrap();
    let p = create(&pool, "vm", Layout::Offset);
    let other = create(&pool, "other", Layout::Offset);
    std::os::unix::fs::symlink(&victim, pool.join("link.lun")).unwrap();
    let intent = pool.join(".vm.group-op");
    let bodies = [
        // The format before names: absolute paths.
        serde_json::json!({"op": "clone", "paths": [victim, other]}),
        // Names that leave the pool, a LUN that is not the clone's, a
        // symlink, and a name with nothing behind it.
        serde_json::json!({"op": "clone", "members": [
            {"name": "../outside/victim", "uuid": uuid::Uuid::new_v4()},
            {"name": "/etc/passwd", "uuid": uuid::Uuid::new_v4()},
            {"name": "other", "uuid": uuid::Uuid::new_v4()},
            {"name": "link", "uuid": uuid::Uuid::new_v4()},
            {"name": "never-made", "uuid": uuid::Uuid::new_v4()},
        ]}),
    ];
    for body in bodies {
        std::fs::write(&intent, serde_json::to_vec(&body).unwrap()).unwrap();
        let g = Group::open(&p, Access::ReadWrite).unwrap();
        drop(g);
        assert!(!intent.exists(), "intent left behind");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(outside.join("victim.layers/keep").exists());
        assert!(pool.join("link.lun").symlink_metadata().is_ok());
        Lun::open(&other, Access::ReadOnly).expect("the other LUN is intact");
    }
    // An intent that is a symlink is never followed, for reading or for
    // writing the next intent.
    std::os::unix::fs::symlink(&victim, &intent).unwrap();
    let g = Group::open(&p, Access::ReadWrite).unwrap();
    g.snapshot("s", "").unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!intent.exists());
}

/// A secondary disk's path hint is only followed inside the pool.
#[test]
fn a_secondary_path_hint_outside_the_pool_is_not_followed() {
    let top = tempfile::tempdir().unwrap();
    let pool = top.path().join("pool");
    let elsewhere = top.path().join("elsewhere");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let p = create(&pool, "vm", Layout::Offset);
    let s = create(&elsewhere, "data", Layout::Offset);
    {
        let mut pl = Lun::open(&p, Access::ReadWrite).unwrap();
        let sl = Lun::open(&s, Access::ReadOnly).unwrap();
        let e = pl.attach_secondary(&sl).unwrap_err().to_string();
        assert!(e.contains("not in the pool"), "{e}");
        // A state region that names it anyway (written by hand, or an
        // older version).
        let mut refs = pl.secondaries().unwrap();
        refs.disks.push(lun_manager::format::state::SecondaryRef {
            lun_uuid: sl.uuid(),
            name: "data".into(),
            path_hint: s.canonicalize().unwrap().display().to_string(),
            attached: 0,
        });
        pl.put_records(&[(
            RecordType::SecondaryDisks,
            0,
            serde_json::to_vec(&refs).unwrap(),
        )])
        .unwrap();
    }
    let e = Group::open(&p, Access::ReadWrite).unwrap_err().to_string();
    assert!(e.contains("not found in"), "{e}");
    // Moved into the pool, it is found by UUID.
    std::fs::rename(&s, pool.join("data.lun")).unwrap();
    let g = Group::open(&p, Access::ReadWrite).unwrap();
    assert_eq!(g.members().len(), 2);
}

/// Clones name their parent by pool-relative name and LUN UUID: the pool
/// can move and the parent can be renamed; a missing parent is a clear
/// error, not a broken read.
#[test]
fn clones_survive_a_moved_pool_and_a_renamed_parent() {
    let top = tempfile::tempdir().unwrap();
    let pool = top.path().join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let p = create(&pool, "gold", Layout::Offset);
    {
        let l = Lun::open(&p, Access::ReadWrite).unwrap();
        l.write_region(RegionKind::Disk, 0, 0, &pattern(9, 4096))
            .unwrap();
        l.sync().unwrap();
    }
    let g = Group::open(&p, Access::ReadWrite).unwrap();
    g.snapshot("s", "").unwrap();
    g.clone("s", "copy").unwrap();
    drop(g);
    // Move the whole pool.
    let moved = top.path().join("elsewhere");
    std::fs::rename(&pool, &moved).unwrap();
    let c = Lun::open(&moved.join("copy.lun"), Access::ReadWrite).unwrap();
    assert_eq!(disk(&c, 0, 0, 4096), pattern(9, 4096));
    drop(c);
    // Rename the parent inside the pool: found by its LUN UUID.
    std::fs::rename(moved.join("gold.lun"), moved.join("gold-renamed.lun")).unwrap();
    std::fs::rename(moved.join("gold.layers"), moved.join("gold-renamed.layers")).unwrap();
    let c = Lun::open(&moved.join("copy.lun"), Access::ReadWrite).unwrap();
    assert_eq!(disk(&c, 0, 0, 4096), pattern(9, 4096));
    drop(c);
    // The parent keeps its layers pinned for the clone after the moves.
    let g = Group::open(&moved.join("gold-renamed.lun"), Access::ReadWrite).unwrap();
    assert_eq!(g.primary().volume().dependents().len(), 1);
    drop(g);
    // Parent gone from the pool: refused with the reason.
    let away = top.path().join("away");
    std::fs::create_dir_all(&away).unwrap();
    std::fs::rename(moved.join("gold-renamed.layers"), away.join("gold.layers")).unwrap();
    let e = Lun::open(&moved.join("copy.lun"), Access::ReadOnly)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not in pool"), "{e}");
}

/// A backup chain restores onto a fresh copy: a diff applies to another
/// LUN (another UUID) whose disks hold the diff's base, writing the disks
/// only; a LUN whose disks differ is refused and left unchanged.
#[test]
fn a_diff_applies_to_another_lun_whose_disks_hold_its_base() {
    for layout in [Layout::Offset, Layout::Truncate, Layout::Aligned] {
        diff_onto_another_lun(layout);
    }
}

fn diff_onto_another_lun(layout: Layout) {
    let d = tempfile::tempdir().unwrap();
    let p = create(d.path(), "vm", layout);
    let g = reopen(&p);
    let l = g.primary();
    l.write_region(RegionKind::Disk, 0, 0, &pattern(1, 3 * MIB as usize))
        .unwrap();
    l.write_region(RegionKind::Disk, 1, 4096, &pattern(2, 50_000))
        .unwrap();
    l.sync().unwrap();
    g.snapshot("base", "").unwrap();
    // The fresh copy: a clone of base (its own UUID and identity).
    let copy = g.clone("base", "restored").unwrap();
    let copy_path = copy.primary().path().to_path_buf();
    let copy_identity: Identity = copy
        .primary()
        .record_json(RecordType::Identity, 0)
        .unwrap()
        .unwrap();
    drop(copy);
    drop(g);
    {
        let mut l = Lun::open(&p, Access::ReadWrite).unwrap();
        l.write_region(RegionKind::Disk, 0, 100_000, &pattern(3, 700_000))
            .unwrap();
        l.volume().trim(l.disks()[0].offset + 2 * MIB, MIB).unwrap();
        l.write_region(RegionKind::Disk, 1, 12345, &pattern(4, 5000))
            .unwrap();
        // The guest's own partition table, in its first MiB.
        l.write_region(RegionKind::Disk, 0, 0, &pattern(5, 4096))
            .unwrap();
        put_vcpus(&mut l, 7);
        l.sync().unwrap();
    }
    let g = reopen(&p);
    g.snapshot("next", "").unwrap();
    let mut file = Vec::new();
    g.write_diff("base", Some("next"), &mut file).unwrap();

    // A LUN whose disks differ from base: refused, nothing written.
    let stranger = create(d.path(), "stranger", layout);
    {
        let s = Lun::open(&stranger, Access::ReadWrite).unwrap();
        s.write_region(RegionKind::Disk, 0, 0, &pattern(1, 3 * MIB as usize))
            .unwrap();
        s.write_region(RegionKind::Disk, 1, 4096, &pattern(9, 10))
            .unwrap();
        s.sync().unwrap();
    }
    let before = std::fs::read(&stranger).unwrap();
    let e = reopen(&stranger)
        .apply_diff(&mut &file[..])
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not hold its base"), "{e}");
    assert!(
        std::fs::read(&stranger).unwrap() == before,
        "a refused diff wrote"
    );

    // The clone holds base on its disks: the diff applies, disks only.
    let mut t = reopen(&copy_path);
    let info = t.apply_diff(&mut &file[..]).unwrap();
    assert!(info.sections[0].base_only, "{info:?}");
    for (idx, len) in [(0u32, 4 * MIB as usize), (1, 2 * MIB as usize)] {
        // The source's live disks are what it holds at next.
        let want = disk(g.primary(), idx, 0, len);
        assert!(
            disk(t.primary(), idx, 0, len) == want,
            "disk{idx} differs from vm@next"
        );
    }
    drop(t);
    let t = Lun::open(&copy_path, Access::ReadWrite).unwrap();
    assert!(t.verify_records().iter().all(|(_, e)| e.is_none()));
    let id: Identity = t.record_json(RecordType::Identity, 0).unwrap().unwrap();
    assert_eq!(id, copy_identity, "the copy kept its own identity");
    assert_eq!(
        t.hardware().unwrap().vcpus,
        2,
        "the state region is not the source's"
    );
}

/// A group revert in its three phases writes its intent before the pause,
/// naming each member's live layer after the revert; after a crash that
/// left one member's revert committed (and a write flushed on it since)
/// and the other's not, the next open reverts only the other, keeps the
/// flushed write, and says it finished a revert (the state records came
/// back, so whoever serves the LUNs claims them again).
#[test]
fn recovery_reverts_only_the_members_whose_revert_was_never_committed() {
    let d = tempfile::tempdir().unwrap();
    let (p, _) = with_secondary(d.path(), Layout::Offset);
    let intent = d.path().join(".vm.group-op");
    let mut g = reopen(&p);
    assert!(!g.recovered_revert());
    g.snapshot("a", "").unwrap();
    for m in g.members() {
        m.write_region(RegionKind::Disk, 0, 0, b"new").unwrap();
        m.volume().flush().unwrap();
    }
    // The live phases: the intent names the spares before the pause.
    let prepared = g.prepare_revert("a").unwrap();
    let body: serde_json::Value = serde_json::from_slice(&std::fs::read(&intent).unwrap()).unwrap();
    assert_eq!(body["op"], "revert");
    assert_eq!(body["tops"].as_array().map(Vec::len), Some(2), "{body}");
    let switched = g.switch_revert(prepared);
    for (i, m) in g.members().iter().enumerate() {
        assert_eq!(disk(m, 0, 0, 3), vec![0, 0, 0], "{} not switched", m.name());
        assert_eq!(
            m.volume().chain()[0].to_string(),
            body["tops"][i].as_str().unwrap()
        );
    }
    g.finish_revert(switched).unwrap();
    assert!(!intent.exists(), "the intent outlived a finished revert");
    for m in g.members() {
        m.write_region(RegionKind::Disk, 0, 0, b"new").unwrap();
        m.volume().flush().unwrap();
    }
    // A crash after the secondary's revert was committed and a write on
    // it flushed, before the primary's commit (which a crash forgets).
    let sec = &g.members()[1];
    sec.volume().revert("a").unwrap();
    sec.write_region(RegionKind::Disk, 0, 0, b"aft").unwrap();
    sec.volume().flush().unwrap();
    let tops = serde_json::json!([uuid::Uuid::new_v4(), sec.volume().chain()[0]]);
    std::fs::write(
        &intent,
        serde_json::to_vec(&serde_json::json!({"op": "revert", "name": "a", "tops": tops}))
            .unwrap(),
    )
    .unwrap();
    drop(g);
    let g = reopen(&p);
    assert!(g.recovered_revert());
    assert!(!intent.exists());
    assert_eq!(
        disk(&g.members()[0], 0, 0, 3),
        vec![0, 0, 0],
        "primary not reverted"
    );
    assert_eq!(
        disk(&g.members()[1], 0, 0, 3),
        b"aft",
        "recovery reverted a member whose revert was committed, over a flushed write"
    );
    drop(g);
    assert!(!reopen(&p).recovered_revert());
}
