//! Growing a LUN that has snapshots (`lunctl resize` on a layered LUN):
//! every byte of the live disks and of every older snapshot stays where
//! its layout says, the new space reads zero, the snapshot tree shows the
//! sizes a snapshot keeps, and a crash at any step of the resize leaves
//! the LUN before or after it.

use std::path::{Path, PathBuf};
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use lun_manager::format::RegionKind;
use lun_manager::{Access, Lun};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn lunctl() -> Command {
    Command::cargo_bin("lunctl").expect("lunctl binary")
}

fn run(args: &[&str]) -> std::process::Output {
    lunctl().args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "lunctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_of(args: &[&str]) -> Value {
    serde_json::from_str(&ok(args)).unwrap()
}

fn pool() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("pool");
    ok(&["pool", "init", p.to_str().unwrap()]);
    (d, p)
}

fn create(pool: &Path, name: &str, layout: &str) -> PathBuf {
    ok(&[
        "create",
        name,
        "--pool",
        pool.to_str().unwrap(),
        "--disk",
        "8M",
        "--disk",
        "4M",
        "--memory",
        "2M",
        "--layout",
        layout,
    ]);
    pool.join(format!("{name}.lun"))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1)
        .collect()
}

fn disk_write(lun: &Path, disk: u32, offset: u64, data: &[u8]) {
    let l = Lun::open(lun, Access::ReadWrite).unwrap();
    l.write_region(RegionKind::Disk, disk, offset, data)
        .unwrap();
    l.sync().unwrap();
}

fn disk_read(lun: &Path, disk: u32, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    Lun::open(lun, Access::ReadOnly)
        .unwrap()
        .read_region(RegionKind::Disk, disk, offset, &mut b)
        .unwrap();
    b
}

fn disk_len(lun: &Path, disk: u32) -> u64 {
    Lun::open(lun, Access::ReadOnly).unwrap().disks()[disk as usize].length
}

/// What each stage of the VM wrote: disk0's head (past an aligned disk0's
/// shadowed first MiB it makes no difference: the region view maps it),
/// disk0's last 64 KiB and disk1's head.
struct Stage {
    head: Vec<u8>,
    d1: Vec<u8>,
}

const TAIL_AT: u64 = 8 * MIB - 65536;

/// A LUN with snapshots s1 and s2 and data written before and after each.
fn layered_lun(p: &Path, name: &str, layout: &str) -> (PathBuf, Vec<Stage>, Vec<u8>) {
    let lun = create(p, name, layout);
    let l = lun.to_str().unwrap();
    let tail = pattern(65536, 200);
    disk_write(&lun, 0, TAIL_AT, &tail);
    let mut stages = Vec::new();
    for (i, snap) in ["s1", "s2", ""].iter().enumerate() {
        let s = Stage {
            head: pattern(3 * 65536, 10 + i as u8),
            d1: pattern(4096, 20 + i as u8),
        };
        disk_write(&lun, 0, 0, &s.head);
        disk_write(&lun, 1, 0, &s.d1);
        stages.push(s);
        if !snap.is_empty() {
            ok(&["snapshot", l, snap]);
        }
    }
    (lun, stages, tail)
}

/// The live disks hold what the last stage wrote, disk0's old tail and
/// zeros past its old end.
fn check_live(lun: &Path, stages: &[Stage], tail: &[u8], what: &str) {
    let s = stages.last().unwrap();
    assert_eq!(
        disk_read(lun, 0, 0, s.head.len()),
        s.head,
        "{what}: disk0 head"
    );
    assert_eq!(
        disk_read(lun, 0, TAIL_AT, tail.len()),
        tail,
        "{what}: disk0 old tail"
    );
    assert_eq!(disk_read(lun, 1, 0, s.d1.len()), s.d1, "{what}: disk1");
    // [8 MiB, 16 MiB) of a grown disk0 (the test writes at 20 MiB).
    if disk_len(lun, 0) > 8 * MIB {
        let grown = disk_read(lun, 0, 8 * MIB, (8 * MIB) as usize);
        assert!(
            grown.iter().all(|&b| b == 0),
            "{what}: the grown part reads zero"
        );
    }
}

/// A clone of each older snapshot reads what was written before it, at
/// the snapshot's own sizes.
fn check_snapshots(p: &Path, lun: &Path, stages: &[Stage], tail: &[u8], what: &str) {
    for (i, snap) in ["s1", "s2"].iter().enumerate() {
        let name = format!("{}-{snap}", lun.file_stem().unwrap().to_str().unwrap());
        ok(&["clone", lun.to_str().unwrap(), snap, &name]);
        let c = p.join(format!("{name}.lun"));
        assert_eq!(
            disk_len(&c, 0),
            8 * MIB,
            "{what}: clone of {snap} has its size"
        );
        assert_eq!(
            disk_read(&c, 0, 0, stages[i].head.len()),
            stages[i].head,
            "{what}: {snap} disk0"
        );
        assert_eq!(
            disk_read(&c, 0, TAIL_AT, tail.len()),
            tail,
            "{what}: {snap} disk0 tail"
        );
        assert_eq!(
            disk_read(&c, 1, 0, stages[i].d1.len()),
            stages[i].d1,
            "{what}: {snap} disk1"
        );
        let v = json_of(&["inspect", "--json", c.to_str().unwrap()]);
        assert!(v["warnings"].as_array().unwrap().is_empty(), "{what}: {v}");
        ok(&["delete", c.to_str().unwrap(), "--yes"]);
    }
}

#[test]
fn a_lun_with_two_snapshots_grows_disk0_and_memory_and_each_snapshot_keeps_its_data_and_size() {
    let (_d, p) = pool();
    for layout in ["offset", "truncate", "aligned"] {
        let (lun, stages, tail) = layered_lun(&p, &format!("vm-{layout}"), layout);
        let l = lun.to_str().unwrap();
        let before = json_of(&["inspect", "--json", l]);
        let state_before = before["state"]["size"].as_u64().unwrap();

        assert!(ok(&["resize", l, "--disk", "0=24M"]).contains("disk0 is now 24 MiB"));
        ok(&["resize", l, "--memory", "16M"]);
        let v = json_of(&["inspect", "--json", l]);
        assert!(
            v["warnings"].as_array().unwrap().is_empty(),
            "{layout}: {v}"
        );
        assert_eq!(v["hardware"]["memory_bytes"], 16 * MIB);
        let state_now = v["state"]["size"].as_u64().unwrap();
        assert!(state_now > state_before);
        for r in v["state"]["records"].as_array().unwrap() {
            assert_eq!(r["checksum"], "ok", "{layout}: {r}");
        }
        check_live(&lun, &stages, &tail, layout);
        // The new space is writable.
        let fresh = pattern(65536, 99);
        disk_write(&lun, 0, 20 * MIB, &fresh);
        assert_eq!(disk_read(&lun, 0, 20 * MIB, fresh.len()), fresh);

        // The tree shows what each snapshot keeps.
        let list = json_of(&["snapshots", l, "--json"]);
        for s in list.as_array().unwrap() {
            let sizes = s["sizes"].as_array().unwrap_or_else(|| panic!("{s}"));
            let d0 = sizes.iter().find(|z| z["region"] == "disk0").unwrap();
            assert_eq!(
                (d0["bytes"].as_u64(), d0["now"].as_u64()),
                (Some(8 * MIB), Some(24 * MIB))
            );
            let st = sizes.iter().find(|z| z["region"] == "state").unwrap();
            assert_eq!(
                (st["bytes"].as_u64(), st["now"].as_u64()),
                (Some(state_before), Some(state_now))
            );
        }
        let tree = ok(&["snapshots", l]);
        assert!(tree.contains("disk0 8 MiB (now 24 MiB)"), "{tree}");
        let text = ok(&["inspect", l]);
        assert!(
            text.contains("s1 keeps its sizes from before a resize"),
            "{text}"
        );

        check_snapshots(&p, &lun, &stages, &tail, layout);

        // Revert to a snapshot of the old layout is refused and changes nothing.
        let out = run(&["revert", l, "s1"]);
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("taken before the LUN was resized") && e.contains("lunctl clone"),
            "{e}"
        );
        let out = run(&["diff", l, "s1", "--out", p.join("d").to_str().unwrap()]);
        assert!(
            !out.status.success(),
            "a diff file across a resize is refused"
        );
        check_live(&lun, &stages[..], &tail, layout);

        // A snapshot after the resize reverts as always; shrinking is refused.
        ok(&["snapshot", l, "s3"]);
        disk_write(&lun, 0, 0, &pattern(4096, 77));
        ok(&["revert", l, "s3"]);
        check_live(&lun, &stages, &tail, layout);
        let out = run(&["resize", l, "--disk", "0=16M"]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("shrinking"));
        // Deleting the older snapshots merges their layers; the rest stays.
        ok(&["delete-snapshot", l, "s1"]);
        ok(&["delete-snapshot", l, "s2"]);
        check_live(&lun, &stages, &tail, layout);
        let v = json_of(&["inspect", "--json", l]);
        assert!(
            v["warnings"].as_array().unwrap().is_empty(),
            "{layout}: {v}"
        );
        // Growing again, with snapshot s3 of the first grown layout.
        ok(&["resize", l, "--disk", "1=8M"]);
        assert_eq!(disk_read(&lun, 1, 0, stages[2].d1.len()), stages[2].d1);
        assert!(ok(&["snapshots", l]).contains("disk1 4 MiB (now 8 MiB)"));
    }
}

/// A resize killed at each of its steps leaves a LUN that opens clean,
/// with the old or the new size, every byte of the live disks and of both
/// snapshots; running the resize again completes it.
#[test]
fn a_layered_resize_killed_at_any_step_leaves_the_lun_before_or_after_it() {
    let (_d, p) = pool();
    for layout in ["truncate", "offset"] {
        for step in [
            "layouts",
            "volume",
            "copied",
            "label-moved",
            "zeroed",
            "label-grown",
        ] {
            let (lun, stages, tail) = layered_lun(&p, &format!("k-{layout}-{step}"), layout);
            let l = lun.to_str().unwrap();
            let grow = if layout == "offset" {
                ["--memory", "16M"]
            } else {
                ["--disk", "0=24M"]
            };
            let out = lunctl()
                .args(["resize", l])
                .args(grow)
                .env("LUNGATE_TEST_RESIZE_KILL", step)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(137), "{layout} {step}: {out:?}");
            let what = format!("{layout}, killed at {step}");
            let v = json_of(&["inspect", "--json", l]);
            let len = disk_len(&lun, 0);
            assert!(len == 8 * MIB || len == 24 * MIB, "{what}: disk0 {len}");
            for r in v["state"]["records"].as_array().unwrap() {
                assert_eq!(r["checksum"], "ok", "{what}: {r}");
            }
            check_live(&lun, &stages, &tail, &what);
            check_snapshots(&p, &lun, &stages, &tail, &what);
            ok(&["resize", l, grow[0], grow[1]]);
            check_live(&lun, &stages, &tail, &format!("{what}, resized again"));
            if layout == "offset" {
                let v = json_of(&["inspect", "--json", l]);
                assert_eq!(v["hardware"]["memory_bytes"], 16 * MIB, "{what}");
            } else {
                assert_eq!(disk_len(&lun, 0), 24 * MIB, "{what}");
            }
            check_snapshots(&p, &lun, &stages, &tail, &format!("{what}, resized again"));
            let v = json_of(&["inspect", "--json", l]);
            assert!(v["warnings"].as_array().unwrap().is_empty(), "{what}: {v}");
        }
    }
}

/// Each snapshot's sizes by its layer UUID (a rebuild may rename the base
/// snapshot `recovered-base`; the layer stays).
fn sizes_by_layer(lun: &str) -> std::collections::BTreeMap<String, (String, Value)> {
    json_of(&["snapshots", lun, "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["layer"].as_str().unwrap().to_string(),
                (s["name"].as_str().unwrap().to_string(), s["sizes"].clone()),
            )
        })
        .collect()
}

/// `lunctl repair` of a grown layered LUN whose manifest slots both fail
/// their checksum keeps every snapshot's layout from the old slots (the
/// snapshots keep their sizes, clones of them their data, a revert stays
/// refused); with both slots gone the layouts are reported lost, and
/// reading those snapshots is refused instead of served with today's
/// layout.
#[test]
fn repair_of_a_grown_lun_keeps_the_snapshot_layouts_or_says_they_are_lost() {
    let (_d, p) = pool();
    for lose in [false, true] {
        let (lun, stages, tail) = layered_lun(&p, &format!("r-{lose}"), "truncate");
        let l = lun.to_str().unwrap();
        ok(&["resize", l, "--disk", "0=24M"]);
        let before = sizes_by_layer(l);
        assert!(
            before.values().all(|(_, z)| z.as_array().is_some()),
            "{before:?}"
        );
        let layers = lungate_block::store::file::layers_dir(&lun);
        for slot in ["manifest.0", "manifest.1"] {
            let f = layers.join(slot);
            if lose {
                std::fs::remove_file(&f).unwrap();
            } else {
                // One flipped bit in the checksum: the slot is refused,
                // its body still reads.
                let mut b = std::fs::read(&f).unwrap();
                *b.last_mut().unwrap() ^= 1;
                std::fs::write(&f, b).unwrap();
            }
        }
        assert!(!run(&["snapshots", l]).status.success());
        let out = ok(&["repair", l]);
        let after = sizes_by_layer(l);
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>(),
            "{out}"
        );
        // s1 and s2, oldest first, by the layer each had before.
        let names: Vec<String> = ["s1", "s2"]
            .iter()
            .map(|n| {
                let layer = before.iter().find(|(_, (b, _))| b == n).unwrap().0;
                after[layer].0.clone()
            })
            .collect();
        if !lose {
            assert!(out.contains("kept the layouts of"), "{out}");
            assert!(out.contains("checksum failed"), "{out}");
            assert!(!out.contains("no old manifest slot"), "{out}");
            for (layer, (_, sizes)) in &before {
                assert_eq!(&after[layer].1, sizes, "{out}");
            }
            for (i, snap) in names.iter().enumerate() {
                let c = format!("r-clone-{i}");
                ok(&["clone", l, snap, &c]);
                let c = p.join(format!("{c}.lun"));
                assert_eq!(disk_len(&c, 0), 8 * MIB, "clone of {snap}");
                assert_eq!(disk_read(&c, 0, 0, stages[i].head.len()), stages[i].head);
                assert_eq!(disk_read(&c, 0, TAIL_AT, tail.len()), tail);
                assert_eq!(disk_read(&c, 1, 0, stages[i].d1.len()), stages[i].d1);
                ok(&["delete", c.to_str().unwrap(), "--yes"]);
            }
            let e = run(&["revert", l, &names[0]]);
            assert!(!e.status.success());
            assert!(String::from_utf8_lossy(&e.stderr).contains("taken before the LUN was resized"));
        } else {
            assert!(out.contains("were in no readable manifest"), "{out}");
            assert!(out.contains("no old manifest slot was readable"), "{out}");
            for n in &names {
                assert!(out.contains(n.as_str()), "{n}: {out}");
                for args in [vec!["revert", l, n], vec!["clone", l, n, "r-lost-clone"]] {
                    let e = run(&args);
                    assert!(!e.status.success(), "{args:?}");
                    let msg = String::from_utf8_lossy(&e.stderr);
                    assert!(msg.contains("could not recover"), "{args:?}: {msg}");
                }
            }
            // Deleting them works; the live disks are untouched.
            for n in names.iter().rev() {
                ok(&["delete-snapshot", l, n]);
            }
        }
        check_live(&lun, &stages, &tail, &format!("repaired, lose={lose}"));
    }
}
