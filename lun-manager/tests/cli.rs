//! `lunctl` end to end: every subcommand and every error path, on real
//! sparse files, checked with real host tools (sfdisk, blkid) where the
//! issue names them.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use assert_cmd::prelude::*;
use predicates::prelude::*;
use serde_json::Value;

fn lunctl() -> Command {
    Command::cargo_bin("lunctl").expect("lunctl binary")
}

fn pool() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("pool");
    lunctl().args(["pool", "init"]).arg(&p).assert().success();
    (d, p)
}

fn create(pool: &Path, name: &str, extra: &[&str]) -> PathBuf {
    lunctl()
        .args(["create", name, "--pool"])
        .arg(pool)
        .args(extra)
        .assert()
        .success();
    pool.join(format!("{name}.lun"))
}

fn inspect(lun: &Path) -> Value {
    let out = lunctl()
        .args(["inspect", "--json"])
        .arg(lun)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn region(v: &Value, kind: &str, index: u64) -> (u64, u64) {
    let r = v["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == kind && r["index"] == index)
        .unwrap_or_else(|| panic!("no region {kind}{index} in {v}"));
    (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap())
}

fn require_tool(name: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "{name} not found: run scripts/setup");
}

#[test]
fn create_inspect_list_in_both_layouts() {
    let (_d, p) = pool();
    let web = create(
        &p,
        "web",
        &[
            "--disk", "20G", "--disk", "100G", "--memory", "2G", "--vcpus", "4",
        ],
    );
    let db = create(
        &p,
        "db",
        &["--disk", "8G", "--memory", "512M", "--layout", "truncate"],
    );
    let v = inspect(&web);
    assert_eq!(v["name"], "web");
    assert_eq!(v["layout"], "offset");
    assert_eq!(v["hardware"]["vcpus"], 4);
    assert_eq!(v["hardware"]["memory_bytes"], 2u64 << 30);
    assert_eq!(region(&v, "disk", 0).1, 20 << 30);
    assert_eq!(region(&v, "disk", 1).1, 100 << 30);
    // State holds two memory images plus device room.
    assert!(region(&v, "state", 0).1 >= 4u64 << 30);
    assert_eq!(v["identity"]["disks"].as_array().unwrap().len(), 2);
    assert!(v["state"]["records"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["checksum"] == "ok"));
    let v = inspect(&db);
    assert_eq!(v["layout"], "truncate");
    assert_eq!(region(&v, "disk", 0), (0, 8 << 30));
    let (lo, ll) = region(&v, "label", 0);
    assert_eq!(lo + ll, v["lun_size"].as_u64().unwrap(), "footer is last");
    // Files are sparse: far smaller on disk than their size.
    let used = std::fs::metadata(&web).unwrap();
    assert!(std::os::unix::fs::MetadataExt::blocks(&used) * 512 < 8 << 20);

    lunctl()
        .args(["list", "--pool"])
        .arg(&p)
        .assert()
        .success()
        .stdout(predicate::str::contains("web").and(predicate::str::contains("truncate")));
    let out = lunctl()
        .args(["list", "--json", "--pool"])
        .arg(&p)
        .output()
        .unwrap();
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    // By name with --pool as well as by path.
    lunctl()
        .args(["inspect", "web", "--pool"])
        .arg(&p)
        .assert()
        .success()
        .stdout(predicate::str::contains("disk1"));
}

#[test]
fn offset_layout_gpt_is_recognised_by_sfdisk_and_blkid() {
    require_tool("sfdisk");
    require_tool("blkid");
    let (_d, p) = pool();
    let web = create(
        &p,
        "web",
        &["--disk", "1G", "--disk", "2G", "--memory", "64M"],
    );
    let out = Command::new("sfdisk")
        .arg("--dump")
        .arg(&web)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = String::from_utf8(out.stdout).unwrap();
    assert!(dump.contains("label: gpt"), "{dump}");
    let uuid = inspect(&web)["uuid"].as_str().unwrap().to_uppercase();
    assert!(dump.contains(&format!("label-id: {uuid}")), "{dump}");
    for (ty, name) in [
        ("EDD3D04B-536B-4C9D-8DE4-58105880C2A4", "lungate-label"),
        ("8F5837B6-6C9E-4606-B7C3-16B56F2FA3A1", "lungate-state"),
        ("BDE3A7F4-A2FF-4516-BF62-06CD8FB7FF86", "lungate-disk0"),
        ("BDE3A7F4-A2FF-4516-BF62-06CD8FB7FF86", "lungate-disk1"),
    ] {
        assert!(
            dump.lines().any(|l| l.contains(ty) && l.contains(name)),
            "{name} with type {ty} missing from:\n{dump}"
        );
    }
    // The disk partition's start in sectors equals the region's offset.
    let (off, len) = region(&inspect(&web), "disk", 1);
    assert!(
        dump.contains(&format!(
            "start= {:>11}, size= {:>11}",
            off / 512,
            len / 512
        )) || dump.contains(&format!("start={:>12}, size={:>12}", off / 512, len / 512)),
        "{dump}"
    );
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(&web)
        .output()
        .unwrap();
    let b = String::from_utf8_lossy(&out.stdout);
    assert!(b.contains("PTTYPE=gpt"), "{b}");
    assert!(
        b.to_lowercase()
            .contains(&format!("ptuuid={}", uuid.to_lowercase())),
        "{b}"
    );
}

fn write_pattern(lun: &Path, offset: u64, len: usize, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let f = OpenOptions::new().write(true).open(lun).unwrap();
    f.write_all_at(&data, offset).unwrap();
    f.sync_all().unwrap();
    data
}

fn read_at(lun: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(lun).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

#[test]
fn aligned_layout_shows_lungate_gpt_at_lba0_to_sfdisk_and_blkid() {
    require_tool("sfdisk");
    require_tool("blkid");
    let (_d, p) = pool();
    let lun = create(
        &p,
        "al",
        &[
            "--disk", "64M", "--disk", "8M", "--memory", "16M", "--layout", "aligned",
        ],
    );
    let v = inspect(&lun);
    assert_eq!(v["layout"], "aligned");
    assert_eq!(region(&v, "label", 0), (0, 1 << 20));
    assert_eq!(region(&v, "disk", 0), (0, 64 << 20));
    let (st, _) = region(&v, "state", 0);
    assert_eq!(v["shadow"]["length"], 1 << 20);
    assert_eq!(v["shadow"]["lun_offset"], st + (128 << 10));
    let out = Command::new("sfdisk")
        .arg("--dump")
        .arg(&lun)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
    let dump = String::from_utf8(out.stdout).unwrap();
    let uuid = v["uuid"].as_str().unwrap().to_uppercase();
    assert!(dump.contains(&format!("label-id: {uuid}")), "{dump}");
    // The label partition covers the two slots; disk0's partition the part
    // of disk0 at its own offset, from 1 MiB.
    for (name, start, size) in [
        ("lungate-label", 512, 1536),
        ("lungate-disk0", 2048, (64 << 11) - 2048),
    ] {
        assert!(
            dump.lines().any(|l| l.contains(name)
                && l.contains(&format!("start= {start:>11}, size= {size:>11}"))),
            "{name} at {start}+{size} missing from:\n{dump}"
        );
    }
    let out = Command::new("sfdisk")
        .arg("--verify")
        .arg(&lun)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("No errors detected"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(&lun)
        .output()
        .unwrap();
    let b = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(b.contains("pttype=gpt"), "{b}");
    assert!(
        b.contains(&format!("ptuuid={}", uuid.to_lowercase())),
        "{b}"
    );
    lunctl()
        .args(["inspect"])
        .arg(&lun)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "shadow   disk0 bytes [0, 1048576)",
        ));
}

#[test]
fn import_of_a_partitioned_raw_image_keeps_its_blocks_at_their_offsets() {
    require_tool("sfdisk");
    let (d, p) = pool();
    // A raw image with the guest's own GPT (sfdisk writes it) and data at
    // 1 MiB and near its end.
    let img = d.path().join("guest.raw");
    let len = 40u64 << 20;
    std::fs::File::create(&img).unwrap().set_len(len).unwrap();
    let mut sf = Command::new("sfdisk")
        .arg("--no-reread")
        .arg("-q")
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sf.stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nstart=2048, size=16384, name=guestroot\n")
        .unwrap();
    assert!(sf.wait().unwrap().success());
    let a = write_pattern(&img, 1 << 20, 8192, 9);
    let b = write_pattern(&img, len - 65536, 4096, 10);
    let guest_head = read_at(&img, 0, 1 << 20);
    let before = std::fs::read(&img).unwrap();

    let out = lunctl()
        .args(["import"])
        .arg(&img)
        .args(["imp", "--memory", "16M", "--layout", "aligned", "--json"])
        .arg("--pool")
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // NDJSON: progress events of the `import` phase, then the result.
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let v = lines.last().unwrap();
    assert_eq!((&v["type"], &v["op"]), (&"result".into(), &"import".into()));
    assert_eq!(v["image_bytes"], len, "{v}");
    assert_eq!(v["layout"], "aligned");
    assert!(lines[..lines.len() - 1]
        .iter()
        .all(|e| e["type"] == "progress" && e["phase"] == "import"));
    let lun = p.join("imp.lun");
    let v = inspect(&lun);
    assert_eq!(region(&v, "disk", 0), (0, len));
    // Every block past the first MiB at its own offset in the LUN file,
    // the guest's first MiB (its GPT) in the shadow area.
    assert_eq!(read_at(&lun, 1 << 20, 8192), a);
    assert_eq!(read_at(&lun, len - 65536, 4096), b);
    assert_eq!(
        read_at(&lun, len - 33 * 512, 33 * 512),
        &before[(len - 33 * 512) as usize..]
    );
    let at = v["shadow"]["lun_offset"].as_u64().unwrap();
    assert_eq!(read_at(&lun, at, 1 << 20), guest_head);
    // The host sees lungate's GPT, not the guest's.
    let dump = Command::new("sfdisk")
        .arg("--dump")
        .arg(&lun)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("lungate-disk0") && !dump.contains("guestroot"),
        "{dump}"
    );
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "the image is untouched"
    );
    // A qcow2 image is refused with the conversion to run.
    let q = d.path().join("x.qcow2");
    std::fs::write(&q, b"QFI\xfb\0\0\0\x03").unwrap();
    lunctl()
        .args(["import"])
        .arg(&q)
        .args(["q", "--memory", "16M", "--pool"])
        .arg(&p)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("qemu-img convert -O raw"));
    assert!(!p.join("q.lun").exists());
}

#[test]
fn resize_preserves_disk_and_state_data_in_every_layout() {
    let (_d, p) = pool();
    for layout in ["offset", "truncate", "aligned"] {
        let name = format!("vm-{layout}");
        let lun = create(
            &p,
            &name,
            &[
                "--disk", "8M", "--disk", "4M", "--memory", "2M", "--layout", layout,
            ],
        );
        let v = inspect(&lun);
        let (d0, d0len) = region(&v, "disk", 0);
        let (d1, _) = region(&v, "disk", 1);
        // A pattern at the start and end of each disk (past the shadowed
        // first MiB of an aligned disk0: there the LUN file holds the GPT).
        let start = if layout == "aligned" { 1 << 20 } else { 0 };
        let a = write_pattern(&lun, d0 + start, 65536, 1);
        let b = write_pattern(&lun, d0 + d0len - 4096, 4096, 2);
        let c = write_pattern(&lun, d1, 4 << 20, 3);
        let records_before = v["state"]["records"].clone();

        lunctl()
            .args(["resize"])
            .arg(&lun)
            .args(["--disk", "0=40M"])
            .assert()
            .success()
            .stdout(predicate::str::contains("disk0 is now 40 MiB"));
        lunctl()
            .args(["resize"])
            .arg(&lun)
            .args(["--memory", "64M"])
            .assert()
            .success();
        lunctl()
            .args(["resize"])
            .arg(&lun)
            .args(["--disk", "2=16M"])
            .assert()
            .success();

        let v = inspect(&lun);
        let (n0, n0len) = region(&v, "disk", 0);
        let (n1, _) = region(&v, "disk", 1);
        assert_eq!(n0len, 40 << 20);
        assert_eq!(region(&v, "disk", 2).1, 16 << 20);
        assert_eq!(v["hardware"]["memory_bytes"], 64u64 << 20);
        if layout != "offset" {
            assert_eq!(n0, 0);
        }
        assert_eq!(read_at(&lun, n0 + start, 65536), a, "{layout}: disk0 start");
        assert_eq!(
            read_at(&lun, n0 + d0len - 4096, 4096),
            b,
            "{layout}: disk0 old end"
        );
        assert!(
            read_at(&lun, n0 + d0len, 1 << 20).iter().all(|&x| x == 0),
            "grown part is zero"
        );
        assert_eq!(
            read_at(&lun, n1, 4 << 20),
            c,
            "{layout}: disk1 moved intact"
        );
        assert!(
            v["warnings"].as_array().unwrap().is_empty(),
            "{}",
            v["warnings"]
        );
        for r in records_before.as_array().unwrap() {
            let t = r["type"].as_str().unwrap();
            assert!(
                v["state"]["records"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["type"] == t && x["checksum"] == "ok"),
                "record {t} lost"
            );
        }
    }
}

#[test]
fn error_paths_exit_non_zero_with_clear_messages() {
    let (d, p) = pool();
    let lun = create(&p, "a", &["--disk", "4M", "--memory", "1M"]);
    let fail = |args: &[&str], msg: &str| {
        lunctl()
            .args(args)
            .assert()
            .failure()
            .stderr(predicate::str::contains(msg));
    };
    let ps = p.to_str().unwrap();
    let ls = lun.to_str().unwrap();
    // create
    fail(
        &[
            "create", "a", "--pool", ps, "--disk", "4M", "--memory", "1M",
        ],
        "already has a VM named",
    );
    fail(
        &[
            "create", "b", "--pool", ps, "--disk", "4X", "--memory", "1M",
        ],
        "unknown unit",
    );
    fail(
        &["create", "b", "--pool", ps, "--disk", "0", "--memory", "1M"],
        "size 0",
    );
    fail(
        &[
            "create", "b/c", "--pool", ps, "--disk", "4M", "--memory", "1M",
        ],
        "only ASCII letters",
    );
    fail(
        &[
            "create",
            "b",
            "--pool",
            ps,
            "--disk",
            "99999999P",
            "--memory",
            "1M",
        ],
        "too large",
    );
    fail(
        &[
            "create", "b", "--pool", ps, "--disk", "4M", "--memory", "1M", "--layout", "weird",
        ],
        "[possible values: offset, truncate, aligned]",
    );
    let nopool = d.path().join("nopool");
    fail(
        &[
            "create",
            "b",
            "--pool",
            nopool.to_str().unwrap(),
            "--disk",
            "4M",
            "--memory",
            "1M",
        ],
        "does not exist",
    );
    std::fs::create_dir(d.path().join("plain")).unwrap();
    fail(
        &[
            "create",
            "b",
            "--pool",
            d.path().join("plain").to_str().unwrap(),
            "--disk",
            "4M",
            "--memory",
            "1M",
        ],
        "not a lungate pool",
    );
    fail(
        &[
            "create", "b", "--path", ls, "--disk", "4M", "--memory", "1M",
        ],
        "already exists",
    );
    lunctl()
        .args(["create", "b", "--pool", ps, "--memory", "1M"])
        .assert()
        .code(2);
    // inspect / list
    fail(&["inspect", "nosuch", "--pool", ps], "no LUN named");
    let garbage = d.path().join("garbage.img");
    std::fs::write(&garbage, vec![0x5au8; 3 << 20]).unwrap();
    fail(&["inspect", garbage.to_str().unwrap()], "not a lungate LUN");
    fail(
        &["list", "--pool", nopool.to_str().unwrap()],
        "does not exist",
    );
    // resize
    fail(&["resize", ls, "--disk", "0=1M"], "shrinking");
    fail(&["resize", ls, "--disk", "5=1M"], "no disk5");
    fail(&["resize", ls, "--disk", "x=1M"], "not a disk number");
    fail(&["resize", ls, "--disk", "01M"], "expected N=SIZE");
    fail(&["resize", ls], "needs --disk");
    // attach-secondary
    fail(&["attach-secondary", ls, ls], "secondary disk of itself");
    let b = create(&p, "b", &["--disk", "4M", "--memory", "0"]);
    lunctl()
        .args(["attach-secondary", ls, b.to_str().unwrap()])
        .assert()
        .success();
    fail(
        &["attach-secondary", ls, b.to_str().unwrap()],
        "already attached",
    );
    fail(
        &["attach-secondary", ls, garbage.to_str().unwrap()],
        "not a lungate LUN",
    );
    // delete
    fail(&["delete", ls], "without --yes");
    assert!(lun.exists());
    fail(
        &["delete", garbage.to_str().unwrap(), "--yes"],
        "not a lungate LUN",
    );
    assert!(
        garbage.exists(),
        "a file that is not a LUN is never deleted"
    );
    lunctl().args(["delete", ls, "--yes"]).assert().success();
    assert!(!lun.exists());
    // scan of a missing path is reported, not fatal
    lunctl()
        .args(["scan", nopool.to_str().unwrap()])
        .assert()
        .success();
}

#[test]
fn damaged_label_is_reported_by_inspect() {
    let (_d, p) = pool();
    let lun = create(
        &p,
        "x",
        &["--disk", "4M", "--memory", "1M", "--layout", "truncate"],
    );
    let v = inspect(&lun);
    let (lo, _) = region(&v, "label", 0);
    let f = OpenOptions::new().write(true).open(&lun).unwrap();
    f.write_all_at(&[0xee; 16], lo + 100).unwrap();
    drop(f);
    lunctl()
        .arg("inspect")
        .arg(&lun)
        .assert()
        .failure()
        .stderr(predicate::str::contains("damaged LUN").and(predicate::str::contains("checksum")));
}

/// Three VMs (one with a secondary disk), garbage files and damaged LUNs.
#[test]
fn scan_reports_vms_secondaries_and_damage_on_a_mixed_directory() {
    let (d, p) = pool();
    let web = create(
        &p,
        "web",
        &[
            "--disk", "2G", "--disk", "1G", "--memory", "256M", "--vcpus", "2",
        ],
    );
    create(
        &p,
        "db",
        &["--disk", "4G", "--memory", "512M", "--layout", "truncate"],
    );
    create(&p, "cache", &["--disk", "1G", "--memory", "128M"]);
    let data = create(
        &p,
        "web-data",
        &["--disk", "10G", "--memory", "0", "--layout", "truncate"],
    );
    lunctl()
        .arg("attach-secondary")
        .arg(&web)
        .arg(&data)
        .assert()
        .success();
    // Garbage: empty, tiny, random, a GPT disk that is not ours, a text file.
    std::fs::write(p.join("empty.lun"), b"").unwrap();
    std::fs::write(p.join("tiny.bin"), b"LUNGATE\0").unwrap();
    let noise: Vec<u8> = (0..(3u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(p.join("noise.img"), &noise).unwrap();
    std::fs::write(p.join("notes.txt"), b"not a disk\n").unwrap();
    // Damaged 1: bad label checksum (offset layout).
    let bad = create(&p, "badsum", &["--disk", "8M", "--memory", "1M"]);
    let f = OpenOptions::new().write(true).open(&bad).unwrap();
    f.write_all_at(b"XX", (1 << 20) + 130).unwrap();
    drop(f);
    // Damaged 2: truncated file.
    let cut = create(&p, "cut", &["--disk", "64M", "--memory", "1M"]);
    let f = OpenOptions::new().write(true).open(&cut).unwrap();
    f.set_len(20 << 20).unwrap();
    drop(f);
    // Damaged 3: overlapping regions behind a valid checksum.
    let ov = create(
        &p,
        "overlap",
        &["--disk", "8M", "--disk", "8M", "--memory", "1M"],
    );
    overlap_regions(&ov);

    let out = lunctl()
        .arg("scan")
        .arg(&p)
        .arg("--json")
        .arg("--html")
        .arg(d.path().join("r.html"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let vms = r["vms"].as_array().unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["cache", "db", "web"],
        "secondary is not a VM of its own"
    );
    let w = vms.iter().find(|v| v["name"] == "web").unwrap();
    assert_eq!(w["vcpus"], 2);
    assert_eq!(w["memory"], 256u64 << 20);
    assert_eq!(w["layout"], "offset");
    assert_eq!(w["disks"].as_array().unwrap().len(), 2);
    assert_eq!(w["disks"][1]["size"], 1u64 << 30);
    assert_eq!(w["disks"][0]["id"].as_str().unwrap().len(), 32);
    assert_eq!(w["secondaries"][0]["name"], "web-data");
    assert_eq!(w["secondaries"][0]["disks"][0]["size"], 10u64 << 30);
    let db = vms.iter().find(|v| v["name"] == "db").unwrap();
    assert_eq!(db["layout"], "truncate");
    let damaged = r["damaged"].as_array().unwrap();
    let reason = |n: &str| {
        damaged
            .iter()
            .find(|x| x["path"].as_str().unwrap().ends_with(n))
            .unwrap_or_else(|| panic!("{n} not reported damaged: {damaged:?}"))["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        reason("badsum.lun").contains("checksum"),
        "{}",
        reason("badsum.lun")
    );
    assert!(
        reason("cut.lun").contains("truncated"),
        "{}",
        reason("cut.lun")
    );
    assert!(
        reason("overlap.lun").contains("overlaps"),
        "{}",
        reason("overlap.lun")
    );
    assert_eq!(damaged.len(), 3, "{damaged:?}");
    let skipped: Vec<&str> = r["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap())
        .collect();
    assert_eq!(skipped.len(), 4, "{skipped:?}");

    let html = std::fs::read_to_string(d.path().join("r.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains(r#"data-secondary="web-data""#) && html.contains("overlap.lun"));
    // Self-contained: no scripts, and no URL at all.
    assert!(!html.contains("<script"));
    assert!(
        !html.contains("http"),
        "external reference in the HTML report"
    );

    // The table for people says the same.
    lunctl().arg("scan").arg(&p).assert().success().stdout(
        predicate::str::contains("3 VM(s) (0 of them clones), 3 damaged")
            .and(predicate::str::contains("secondary: web-data")),
    );
}

/// Rewrite the label of an offset-layout LUN so disk1 overlaps disk0, with
/// a valid checksum, in both slots.
fn overlap_regions(lun: &Path) {
    let f = OpenOptions::new().read(true).write(true).open(lun).unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, 1 << 20).unwrap();
    // Find disk1's entry (kind 3, index 1) in the table at 192, 48 bytes each.
    let (mut d0, mut d1) = (None, None);
    for i in 0..64 {
        let e = 192 + i * 48;
        if b[e..e + 2] == [3, 0] && b[e + 2..e + 4] == [0, 0] {
            d0 = Some(e);
        }
        if b[e..e + 2] == [3, 0] && b[e + 2..e + 4] == [1, 0] {
            d1 = Some(e);
        }
    }
    let (d0, d1) = (d0.unwrap(), d1.unwrap());
    let d0_off = u64::from_le_bytes(b[d0 + 8..d0 + 16].try_into().unwrap());
    b[d1 + 8..d1 + 16].copy_from_slice(&(d0_off + (1 << 20)).to_le_bytes());
    let sum = blake3::hash(&b[..4064]);
    b[4064..].copy_from_slice(sum.as_bytes());
    f.write_all_at(&b, 1 << 20).unwrap();
}

#[test]
fn a_lun_can_live_at_any_file_path_and_be_scanned_directly() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("vm.img");
    lunctl()
        .args(["create", "loose", "--path"])
        .arg(&f)
        .args(["--disk", "8M", "--memory", "1M", "--layout", "truncate"])
        .assert()
        .success();
    assert_eq!(inspect(&f)["name"], "loose");
    let out = lunctl().arg("scan").arg(&f).arg("--json").output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["vms"][0]["name"], "loose");
}

/// A loop device attached for the test and detached (by its own name) after.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux) not found: run scripts/setup");
        assert!(
            out.status.success(),
            "this test needs a loop device (root and /dev/loop-control): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_device_lun_is_created_scanned_resized_within_the_device_and_wiped() {
    require_tool("losetup");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("dev.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    let dev = Loop::attach(&img);
    lunctl()
        .args([
            "create", "blk", "--path", &dev.0, "--disk", "16M", "--memory", "4M",
        ])
        .assert()
        .success();
    let v = inspect(Path::new(&dev.0));
    assert_eq!(v["block_device"], true);
    assert_eq!(v["lun_size"], 96u64 << 20, "a device LUN spans the device");
    let (off, _) = region(&v, "disk", 0);
    let data = write_pattern(Path::new(&dev.0), off, 8192, 9);
    let out = lunctl().args(["scan", "--json", &dev.0]).output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["vms"][0]["name"], "blk");
    lunctl()
        .args(["resize", &dev.0, "--disk", "0=24M"])
        .assert()
        .success();
    let v = inspect(Path::new(&dev.0));
    let (off, len) = region(&v, "disk", 0);
    assert_eq!(len, 24 << 20);
    assert_eq!(read_at(Path::new(&dev.0), off, 8192), data);
    lunctl()
        .args(["resize", &dev.0, "--disk", "0=1G"])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "more bytes than the block device has",
        ));
    lunctl()
        .args(["delete", &dev.0, "--yes"])
        .assert()
        .success();
    let out = lunctl().args(["scan", "--json", &dev.0]).output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        r["vms"].as_array().unwrap().is_empty(),
        "wiped device is no LUN: {r}"
    );
}

// ----- snapshots, clones, diffs (issue 4) ------------------------------------

use lun_manager::format::RegionKind;
use lun_manager::owner;
use lun_manager::{Access, Lun};
use lungate_block::volume::Volume;
use std::sync::Arc;

/// The LUN's volume opened by the test itself (never while lunctl runs).
/// The LUN's own volume (the `Lun` handle is dropped, the volume lives on).
fn volume(lun: &Path) -> Arc<Volume> {
    Lun::open(lun, Access::ReadWrite).unwrap().volume().clone()
}

fn vol_write(lun: &Path, offset: u64, data: &[u8]) {
    let v = volume(lun);
    v.write(offset, data).unwrap();
    v.flush().unwrap();
}

fn vol_read(lun: &Path, offset: u64, len: usize) -> Vec<u8> {
    let v = volume(lun);
    let mut b = vec![0u8; len];
    v.read(offset, &mut b).unwrap();
    b
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1)
        .collect()
}

fn ok(args: &[&str]) -> String {
    let out = lunctl().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "lunctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// lunctl exits 1 (the operation failed) saying `msg`.
fn fails(args: &[&str], msg: &str) {
    fails_with(1, args, msg);
}

/// lunctl exits `code` saying `msg` (docs/lunctl.md, "Exit codes").
fn fails_with(code: i32, args: &[&str], msg: &str) {
    lunctl()
        .args(args)
        .assert()
        .code(code)
        .stderr(predicate::str::contains(msg));
}

/// Exit codes of docs/lunctl.md.
const BUSY: i32 = 3;
const NOT_FOUND: i32 = 4;

fn json_of(args: &[&str]) -> Value {
    serde_json::from_str(&ok(args)).unwrap()
}

#[test]
fn snapshot_and_revert_round_trip_keeps_data_written_between_in_every_layout() {
    let (_d, p) = pool();
    for layout in ["offset", "truncate", "aligned"] {
        let lun = create(
            &p,
            &format!("rt-{layout}"),
            &["--disk", "8M", "--memory", "1M", "--layout", layout],
        );
        let l = lun.to_str().unwrap();
        // An aligned disk0's first MiB is not at its own offset (the
        // volume refuses writes there: it is the LUN's GPT and label).
        let skip = if layout == "aligned" { 1 << 20 } else { 0 };
        let d0 = region(&inspect(&lun), "disk", 0).0 + skip;
        let a = pattern(65536, 1);
        let b = pattern(65536, 2);
        let c = pattern(4096, 3);
        vol_write(&lun, d0, &a);
        assert!(ok(&["snapshot", l, "s1", "--description", "clean install"]).contains("s1"));
        vol_write(&lun, d0, &b);
        vol_write(&lun, d0 + (3 << 20), &c);
        ok(&["snapshot", l, "s2"]);
        vol_write(&lun, d0, &pattern(65536, 9));

        ok(&["revert", l, "s1"]);
        assert_eq!(vol_read(&lun, d0, a.len()), a, "{layout}: s1 data");
        assert!(vol_read(&lun, d0 + (3 << 20), 4096).iter().all(|&x| x == 0));
        ok(&["revert", l, "s2"]);
        assert_eq!(vol_read(&lun, d0, b.len()), b, "{layout}: written between");
        assert_eq!(vol_read(&lun, d0 + (3 << 20), c.len()), c);

        let list = json_of(&["snapshots", l, "--json"]);
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["s1", "s2"]);
        assert_eq!(list[0]["description"], "clean install");
        assert_eq!(list[1]["parent"], "s1");
        assert_eq!(list[1]["current"], true);
        let tree = ok(&["snapshots", l]);
        assert!(
            tree.contains("s1") && tree.contains("└─ s2") && tree.contains("now (live)"),
            "{tree}"
        );

        // Error paths: a taken name, an unknown snapshot, nothing changed.
        fails(
            &["snapshot", l, "s1"],
            "a snapshot named \"s1\" already exists",
        );
        fails_with(
            NOT_FOUND,
            &["revert", l, "nope"],
            "no snapshot named \"nope\"",
        );
        fails_with(
            NOT_FOUND,
            &["delete-snapshot", l, "nope"],
            "no snapshot named \"nope\"",
        );
        fails_with(
            NOT_FOUND,
            &["diff", l, "nope"],
            "no snapshot named \"nope\"",
        );
        assert_eq!(vol_read(&lun, d0, b.len()), b);

        let usage = json_of(&["usage", l, "--json"]);
        let live = usage
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["live"] == true)
            .unwrap();
        assert_eq!(live["in_chain"], true);
        assert!(ok(&["usage", l]).contains("live"));
    }
}

#[test]
fn delete_snapshot_keeps_the_other_snapshots_data() {
    let (_d, p) = pool();
    let lun = create(&p, "del", &["--disk", "8M", "--memory", "1M"]);
    let l = lun.to_str().unwrap();
    let (d0, _) = region(&inspect(&lun), "disk", 0);
    let data: Vec<Vec<u8>> = (1..=3).map(|i| pattern(131072, i)).collect();
    for (i, x) in data.iter().enumerate() {
        vol_write(&lun, d0 + (i as u64) * 4096, x);
        ok(&["snapshot", l, &format!("s{}", i + 1)]);
    }
    ok(&["delete-snapshot", l, "s2"]);
    let names: Vec<String> = json_of(&["snapshots", l, "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["s1", "s3"]);
    let expect = |upto: usize| {
        let mut img = vec![0u8; 131072 + 2 * 4096];
        for (i, x) in data.iter().enumerate().take(upto) {
            img[i * 4096..i * 4096 + x.len()].copy_from_slice(x);
        }
        img
    };
    ok(&["revert", l, "s3"]);
    assert_eq!(vol_read(&lun, d0, 131072 + 8192), expect(3));
    ok(&["revert", l, "s1"]);
    assert_eq!(vol_read(&lun, d0, 131072 + 8192), expect(1));
}

#[test]
fn clone_is_listed_under_its_parent_and_flatten_makes_it_independent() {
    let (d, p) = pool();
    let web = create(&p, "web", &["--disk", "8M", "--memory", "1M"]);
    let w = web.to_str().unwrap();
    let (d0, _) = region(&inspect(&web), "disk", 0);
    let a = pattern(262144, 4);
    vol_write(&web, d0, &a);
    ok(&["snapshot", w, "gold"]);
    vol_write(&web, d0, &pattern(65536, 5));

    // Error paths leave no file behind.
    fails_with(
        NOT_FOUND,
        &["clone", w, "nope", "x"],
        "no snapshot named \"nope\"",
    );
    assert!(!p.join("x.lun").exists() && !p.join("x.layers").exists());
    fails(&["clone", w, "gold", "web"], "already exists");
    fails(&["clone", w, "gold", "bad/name"], "only ASCII letters");
    // A VM of that name in a file of another name is found by its label.
    lunctl()
        .args(["create", "taken", "--path"])
        .arg(p.join("other-file.lun"))
        .args(["--disk", "8M", "--memory", "1M"])
        .assert()
        .success();
    fails(
        &["clone", w, "gold", "taken"],
        "already has a VM named \"taken\"",
    );
    assert!(!p.join("taken.lun").exists() && !p.join("taken.layers").exists());
    ok(&[
        "delete",
        p.join("other-file.lun").to_str().unwrap(),
        "--yes",
    ]);

    let out = ok(&[
        "clone",
        "web",
        "gold",
        "web2",
        "--pool",
        p.to_str().unwrap(),
    ]);
    assert!(out.contains("web2"), "{out}");
    let web2 = p.join("web2.lun");
    let v2 = inspect(&web2);
    assert_ne!(
        v2["uuid"],
        inspect(&web)["uuid"],
        "a clone has its own identity"
    );
    assert_eq!(vol_read(&web2, d0, a.len()), a, "clone reads the snapshot");
    assert_ne!(vol_read(&web, d0, 65536), a[..65536], "parent went on");

    // The scanner lists the clone as a VM of its own after web, with its
    // parent web@gold, web lists it among its clones, and no file of a
    // layers directory is taken for a VM or for garbage.
    let r = json_of(&["scan", p.to_str().unwrap(), "--json"]);
    let vms = r["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2, "{r}");
    assert_eq!(vms[0]["name"], "web");
    assert_eq!(vms[0]["parent"], Value::Null);
    assert_eq!(vms[0]["snapshots"][0]["name"], "gold");
    assert!(vms[0]["snapshots"][0]["disk_bytes"].as_u64().unwrap() > 0);
    assert_eq!(vms[0]["live_from"], "gold");
    assert_eq!(vms[0]["clones"][0]["name"], "web2");
    assert_eq!(vms[0]["clones"][0]["snapshot"], "gold");
    assert_eq!(vms[0]["clones"][0]["uuid"], v2["uuid"]);
    assert_eq!(vms[1]["name"], "web2");
    assert_eq!(vms[1]["parent"], "web@gold");
    assert_eq!(vms[1]["parent_uuid"], vms[0]["uuid"]);
    assert!(r["skipped"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["damaged"].as_array().unwrap().is_empty(), "{r}");
    let table = ok(&["scan", p.to_str().unwrap()]);
    assert!(
        table.contains("snapshot web@gold")
            && table.contains("clone web2  from web@gold")
            && table.contains("parent: web@gold")
            && table.contains("* web now (live)")
            && table.contains("2 VM(s) (1 of them clones)"),
        "{table}"
    );
    let html_path = d.path().join("scan.html");
    ok(&[
        "scan",
        p.to_str().unwrap(),
        "--html",
        html_path.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(
        html.contains(r#"data-kind="clone" data-owner="web" data-name="web2""#)
            && html.contains(r#"data-vm="web2""#)
            && html.contains(r#"data-parent="web@gold""#),
        "{html}"
    );
    assert!(
        !html.contains("http"),
        "external reference in the HTML report"
    );
    // Scanning a layers directory itself finds nothing and skips nothing.
    let r = json_of(&["scan", "--json", p.join("web.layers").to_str().unwrap()]);
    assert!(r["vms"].as_array().unwrap().is_empty() && r["skipped"].as_array().unwrap().is_empty());

    // The parent cannot go while the clone reads it; after a flatten it can.
    fails(&["delete", w, "--yes"], "clones depend on its layers");
    let w2 = web2.to_str().unwrap();
    ok(&["flatten", w2]);
    ok(&["flatten", w2]); // nothing left to do: still fine
    ok(&["delete", w, "--yes"]);
    assert!(!web.exists() && !p.join("web.layers").exists());
    assert_eq!(
        vol_read(&web2, d0, a.len()),
        a,
        "flattened clone still reads"
    );
    let r = json_of(&["scan", p.to_str().unwrap(), "--json"]);
    assert_eq!(r["vms"][0]["name"], "web2");
    assert_eq!(r["vms"][0]["parent"], Value::Null, "flattened: no parent");
}

/// disk0's bytes `[offset, offset + len)` as its guest sees them (through
/// the disk's view: an aligned disk0's first MiB is in the shadow area).
fn disk_read(lun: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    Lun::open(lun, Access::ReadOnly)
        .unwrap()
        .read_region(RegionKind::Disk, 0, offset, &mut b)
        .unwrap();
    b
}

fn disk_write(lun: &Path, offset: u64, data: &[u8]) {
    let l = Lun::open(lun, Access::ReadWrite).unwrap();
    l.write_region(RegionKind::Disk, 0, offset, data).unwrap();
    l.sync().unwrap();
}

/// The volume offset that holds disk0's byte `offset`.
fn disk_at(lun: &Path, offset: u64) -> u64 {
    let l = Lun::open(lun, Access::ReadOnly).unwrap();
    let pieces = l.disk_view(0).unwrap().pieces(offset, 1).unwrap();
    pieces.iter().next().unwrap().at
}

/// In every layout a diff lists what changed since a snapshot, both the
/// start of disk0 (the guest's partition table: in the aligned layout it
/// lives in the state region's shadow area) and a block past the first
/// MiB, and a diff file makes a copy read the same as its source.
#[test]
fn diff_lists_the_changed_extent_and_a_diff_file_makes_a_copy_equal() {
    let (d, p) = pool();
    for layout in ["offset", "truncate", "aligned"] {
        let name = format!("src-{layout}");
        let lun = create(
            &p,
            &name,
            &["--disk", "8M", "--memory", "1M", "--layout", layout],
        );
        let l = lun.to_str().unwrap();
        let (_, d0len) = region(&inspect(&lun), "disk", 0);
        disk_write(&lun, 0, &pattern(65536, 6));
        // The copy starts equal to the source at snapshot base.
        let copy = d.path().join(format!("copy-{layout}.lun"));
        std::fs::copy(&lun, &copy).unwrap();
        ok(&["snapshot", l, "base"]);
        let x = pattern(131072, 7);
        disk_write(&lun, 1 << 20, &x);
        let table = pattern(65536, 8);
        disk_write(&lun, 0, &table);

        let v = json_of(&["diff", l, "base", "--json"]);
        let mut got: Vec<(u64, u64, &str)> = v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["offset"].as_u64().unwrap(),
                    c["length"].as_u64().unwrap(),
                    c["kind"].as_str().unwrap(),
                )
            })
            .collect();
        got.sort();
        let mut want = vec![
            (disk_at(&lun, 0), 65536, "data"),
            (disk_at(&lun, 1 << 20), 131072, "data"),
        ];
        want.sort();
        assert_eq!(got, want, "{layout}: {v}");
        if layout == "aligned" {
            // Past the first MiB disk0 is at its own offset; its start is
            // not (the LUN's GPT is there).
            assert_eq!(disk_at(&lun, 1 << 20), 1 << 20);
            assert_ne!(disk_at(&lun, 0), 0);
        }
        assert!(ok(&["diff", l, "base"]).contains("disk0 +1048576"));
        ok(&["snapshot", l, "after"]);
        assert_eq!(json_of(&["diff", l, "base", "after", "--json"]), v);
        assert!(ok(&["diff", l, "after"]).contains("no changes"));

        let f = d.path().join(format!("{layout}.lgdiff"));
        ok(&["diff", l, "base", "after", "--out", f.to_str().unwrap()]);
        // A damaged diff file is refused before a byte is written.
        let bad = d.path().join("bad.lgdiff");
        let mut b = std::fs::read(&f).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        std::fs::write(&bad, &b).unwrap();
        let c = copy.to_str().unwrap();
        fails(
            &["apply-diff", c, bad.to_str().unwrap()],
            "checksum mismatch",
        );
        assert!(disk_read(&copy, 1 << 20, 131072).iter().all(|&z| z == 0));
        assert_eq!(disk_read(&copy, 0, 65536), pattern(65536, 6));
        fails(
            &["apply-diff", c, copy.to_str().unwrap()],
            "not a lungate diff file",
        );

        ok(&["apply-diff", c, f.to_str().unwrap()]);
        assert_eq!(disk_read(&copy, 0, 65536), table, "{layout}: the new table");
        assert_eq!(
            disk_read(&copy, 0, d0len as usize),
            disk_read(&lun, 0, d0len as usize),
            "{layout}: copy equals the source after apply-diff"
        );
    }
    // A diff made on another LUN is refused.
    let other = create(&p, "other", &["--disk", "16M", "--memory", "1M"]);
    fails(
        &[
            "apply-diff",
            other.to_str().unwrap(),
            d.path().join("offset.lgdiff").to_str().unwrap(),
        ],
        "diff file refused: section 0 is for LUN",
    );
}

#[test]
fn a_diff_restores_onto_a_clone_of_its_base_and_refuses_other_disks() {
    let (d, p) = pool();
    let lun = create(&p, "web", &["--disk", "8M", "--memory", "1M"]);
    let l = lun.to_str().unwrap();
    let (d0, d0len) = region(&inspect(&lun), "disk", 0);
    vol_write(&lun, d0 + 4096, &pattern(65536, 3));
    ok(&["snapshot", l, "clean"]);
    ok(&["clone", l, "clean", "web-restore"]);
    let restore = p.join("web-restore.lun");
    let x = pattern(131072, 8);
    vol_write(&lun, d0 + (2 << 20), &x);
    ok(&["snapshot", l, "updated"]);
    let f = d.path().join("chain.lgdiff");
    ok(&["diff", l, "clean", "updated", "--out", f.to_str().unwrap()]);

    // A fresh LUN of the same shape but other disk bytes: refused, unchanged.
    let other = create(&p, "other", &["--disk", "8M", "--memory", "1M"]);
    vol_write(&other, d0 + 4096, &pattern(65536, 4));
    let before = vol_read(&other, d0, d0len as usize);
    fails(
        &["apply-diff", other.to_str().unwrap(), f.to_str().unwrap()],
        "does not hold its base \"clean\"",
    );
    assert!(vol_read(&other, d0, d0len as usize) == before);

    // The clone of clean: applied (disks only), now equal to web@updated.
    let out = ok(&[
        "apply-diff",
        restore.to_str().unwrap(),
        f.to_str().unwrap(),
        "--json",
    ]);
    // progress events first, then the result object
    let v = serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .filter_map(Result::ok)
        .last()
        .unwrap();
    assert_eq!(v["base_matched"], 1, "{v}");
    assert_eq!(
        vol_read(&restore, d0, d0len as usize),
        vol_read(&lun, d0, d0len as usize),
        "the restored clone's disk equals the source's"
    );
}

/// A tiny control API: answers one request with `body` and returns the
/// request line it saw.
fn fake_gateway(
    sock: &Path,
    status: &'static str,
    body: &'static str,
) -> std::thread::JoinHandle<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    let _ = std::fs::remove_file(sock);
    let l = std::os::unix::net::UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut b = vec![0u8; len];
        r.read_exact(&mut b).unwrap();
        let mut s = s;
        write!(
            s,
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        format!("{} {}", first.trim(), String::from_utf8_lossy(&b))
    })
}

#[test]
fn a_lun_held_by_another_process_is_refused_or_sent_to_its_gateway() {
    let (d, p) = pool();
    for layout in ["offset", "truncate"] {
        let lun = create(
            &p,
            &format!("held-{layout}"),
            &["--disk", "4M", "--memory", "1M", "--layout", layout],
        );
        let l = lun.to_str().unwrap();
        // A bare flock (no record), held by this test process.
        let lock = owner::lock(&lun).unwrap();
        for args in [
            vec!["snapshot", l, "s"],
            vec!["snapshots", l],
            vec!["revert", l, "s"],
            vec!["flatten", l],
            vec!["usage", l],
            vec!["resize", l, "--disk", "0=8M"],
            vec!["delete", l, "--yes"],
        ] {
            fails_with(BUSY, &args, "locked by another process");
        }
        drop(lock);
        // With an owner record: the contract's message.
        let mut handle = Lun::open(&lun, Access::ReadWrite).unwrap();
        let g = owner::acquire(&mut handle, "lungate", None).unwrap();
        let msg = format!(
            "LUN {l} is owned by PID {} (lungate) on {}; stop it or use its control API",
            std::process::id(),
            owner::hostname()
        );
        fails_with(BUSY, &["snapshot", l, "s"], &msg);
        fails_with(BUSY, &["clone", l, "s", "n"], &msg);
        drop(g);
        drop(handle);
        assert!(lun.exists());
        ok(&["snapshot", l, "s"]);
        // lunctl changed the volume: a fresh handle sees the new chain.
        let mut handle = Lun::open(&lun, Access::ReadWrite).unwrap();

        // A gateway with a control socket gets the operation instead.
        let sock = d.path().join(format!("{layout}.sock"));
        let g = owner::acquire(&mut handle, "lungate", Some(&sock)).unwrap();
        let t = fake_gateway(
            &sock,
            "201 Created",
            r#"{"snapshot":{"name":"s2","description":"","created":1,"parent":"s","layer":"00000000-0000-0000-0000-000000000000","current":true},"pause_us":12}"#,
        );
        let out = lunctl().args(["snapshot", l, "s2"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen = t.join().unwrap();
        let uuid = handle.uuid();
        assert!(
            seen.starts_with(&format!("POST /v1/luns/{uuid}/snapshots HTTP/1.1"))
                && seen.contains(r#""name":"s2""#),
            "{seen}"
        );
        let t = fake_gateway(
            &sock,
            "409 Conflict",
            r#"{"error":"a snapshot named \"s\" already exists"}"#,
        );
        fails(
            &["snapshot", l, "s"],
            "a snapshot named \"s\" already exists",
        );
        t.join().unwrap();
        drop(g);
    }
}

#[test]
fn a_lun_at_any_path_keeps_its_layers_beside_it_and_delete_removes_them() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("vm.img");
    lunctl()
        .args(["create", "loose", "--path"])
        .arg(&f)
        .args(["--disk", "4M", "--memory", "1M", "--layout", "truncate"])
        .assert()
        .success();
    let l = f.to_str().unwrap();
    ok(&["snapshot", l, "s"]);
    let layers = d.path().join("vm.img.layers");
    assert!(layers.is_dir());
    let r = json_of(&["scan", "--json", d.path().to_str().unwrap()]);
    assert_eq!(r["vms"][0]["snapshots"][0]["name"], "s");
    assert!(r["skipped"].as_array().unwrap().is_empty(), "{r}");
    ok(&["delete", l, "--yes"]);
    assert!(!f.exists() && !layers.exists());
}

/// A flatten killed midway resumes from its saved progress when run again.
#[test]
fn flatten_killed_midway_resumes_and_completes() {
    use lungate_block::volume::manifest;
    let (_d, p) = pool();
    let big = create(&p, "big", &["--disk", "1G", "--memory", "1M"]);
    let (d0, d0len) = region(&inspect(&big), "disk", 0);
    let head = pattern(65536, 8);
    let tail = pattern(65536, 9);
    vol_write(&big, d0, &head);
    vol_write(&big, d0 + d0len - 65536, &tail);
    ok(&["snapshot", big.to_str().unwrap(), "s"]);
    ok(&["clone", big.to_str().unwrap(), "s", "c"]);
    let c = p.join("c.lun");
    let layers = p.join("c.layers");
    let mut child = lunctl()
        .args(["flatten", c.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut interrupted = false;
    for _ in 0..6000 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if let Ok(Some(l)) = manifest::load(&layers) {
            if l.manifest.flatten.as_ref().is_some_and(|f| f.next > 0) {
                child.kill().unwrap();
                interrupted = true;
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.wait().unwrap();
    assert!(interrupted, "flatten finished before it saved any progress");
    let saved = manifest::load(&layers).unwrap().unwrap().manifest;
    assert!(saved.flatten.is_some(), "progress survives the kill");
    ok(&["flatten", c.to_str().unwrap()]);
    let m = manifest::load(&layers).unwrap().unwrap().manifest;
    assert!(m.flatten.is_none());
    assert!(m
        .layers
        .iter()
        .all(|l| !matches!(l.parent, manifest::Parent::External { .. })));
    ok(&["delete", big.to_str().unwrap(), "--yes"]);
    assert_eq!(vol_read(&c, d0, 65536), head);
    assert_eq!(vol_read(&c, d0 + d0len - 65536, 65536), tail);
}

#[test]
fn cluster_size_is_chosen_at_creation_and_used_by_the_volume() {
    let (_d, p) = pool();
    let p_s = p.to_str().unwrap();
    let small = create(
        &p,
        "small",
        &["--disk", "8M", "--memory", "1M", "--cluster-size", "16K"],
    );
    let dflt = create(&p, "dflt", &["--disk", "8M", "--memory", "1M"]);
    assert_eq!(inspect(&small)["cluster_size"], 16 << 10);
    assert_eq!(inspect(&dflt)["cluster_size"], 64 << 10);
    for bad in ["3K", "2K", "4M", "0"] {
        fails(
            &[
                "create",
                "bad",
                "--pool",
                p_s,
                "--disk",
                "8M",
                "--memory",
                "1M",
                "--cluster-size",
                bad,
            ],
            "must be a power of two from 4K to 2M",
        );
    }
    assert!(!p.join("bad.lun").exists());
    // The layers of the first snapshot use it: a 4 KiB write after the
    // snapshot allocates one 16 KiB cluster in the live layer.
    for (lun, cs) in [(&small, 16u64 << 10), (&dflt, 64 << 10)] {
        ok(&["snapshot", lun.to_str().unwrap(), "s"]);
        assert_eq!(volume(lun).cluster_size(), cs);
        let d0 = region(&inspect(lun), "disk", 0).0;
        vol_write(lun, d0 + 4096, &pattern(4096, 7));
        let u = json_of(&["usage", lun.to_str().unwrap(), "--json"]);
        let live = u
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["live"] == true)
            .unwrap_or_else(|| panic!("no live layer: {u}"));
        assert_eq!(live["allocated_bytes"], cs, "{u}");
        assert_eq!(vol_read(lun, d0 + 4096, 4096), pattern(4096, 7));
    }
}

// ----- machine output and progress (issue 14) --------------------------------

/// Run lunctl; its stdout as NDJSON lines, and its exit code.
fn ndjson(args: &[&str]) -> (Vec<Value>, i32) {
    let out = lunctl().args(args).output().unwrap();
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{args:?}: {l:?}: {e}")))
        .collect();
    (lines, out.status.code().unwrap_or(-1))
}

/// The progress events of `phase`, checked: they start at 0, never fall,
/// and end at their total.
fn phase_of(events: &[Value], op: &str, phase: &str) -> Vec<(u64, u64)> {
    let got: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e["type"] == "progress" && e["phase"] == phase)
        .map(|e| {
            assert_eq!(e["op"], op, "{e}");
            assert_eq!(e["unit"], "bytes", "{e}");
            (e["done"].as_u64().unwrap(), e["total"].as_u64().unwrap())
        })
        .collect();
    assert!(!got.is_empty(), "no {phase} events in {events:?}");
    assert_eq!(got[0].0, 0, "{phase} starts at 0: {got:?}");
    assert!(got.windows(2).all(|w| w[0].0 <= w[1].0), "{phase}: {got:?}");
    let (done, total) = *got.last().unwrap();
    assert_eq!(done, total, "{phase} ends done: {got:?}");
    got
}

/// The last line: the result of `op`.
fn result_of<'a>(events: &'a [Value], op: &str) -> &'a Value {
    let r = events.last().expect("some output");
    assert_eq!(r["type"], "result", "{events:?}");
    assert_eq!(r["op"], op);
    assert_eq!(r["exit_code"], 0);
    r
}

#[test]
fn long_operations_with_json_print_ndjson_progress_and_end_in_a_result() {
    let (d, p) = pool();
    let ps = p.to_str().unwrap();
    // create --prefill: every disk byte allocated before the LUN exists.
    let (ev, code) = ndjson(&[
        "create",
        "pre",
        "--pool",
        ps,
        "--disk",
        "64M",
        "--disk",
        "32M",
        "--memory",
        "1M",
        "--prefill",
        "--json",
    ]);
    assert_eq!(code, 0, "{ev:?}");
    let fill = phase_of(&ev, "create", "prefill");
    assert_eq!(fill.last().unwrap().1, 96 << 20);
    let r = result_of(&ev, "create");
    assert_eq!(r["prefilled"], true);
    assert_eq!(r["disks"][1]["size"], 32u64 << 20);
    let pre = p.join("pre.lun");
    let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&pre).unwrap()) * 512;
    assert!(used >= 96 << 20, "prefilled LUN uses only {used} bytes");
    assert!(vol_read(&pre, region(&inspect(&pre), "disk", 1).0, 65536)
        .iter()
        .all(|&b| b == 0));
    // Without --prefill the disks stay holes.
    ok(&[
        "create", "thin", "--pool", ps, "--disk", "64M", "--memory", "1M",
    ]);
    let thin =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p.join("thin.lun")).unwrap());
    assert!(thin * 512 < 8 << 20, "{thin} blocks");

    // resize: disk1 moves out of disk0's way, the new space is zeroed.
    let (ev, code) = ndjson(&["resize", "pre", "--pool", ps, "--disk", "0=80M", "--json"]);
    assert_eq!(code, 0, "{ev:?}");
    assert_eq!(phase_of(&ev, "resize", "move").last().unwrap().1, 32 << 20);
    phase_of(&ev, "resize", "zero");
    assert_eq!(result_of(&ev, "resize")["disks"][0], 80u64 << 20);

    // delete-snapshot that merges a layer into the next.
    let m = create(&p, "m", &["--disk", "8M", "--memory", "1M"]);
    let ms = m.to_str().unwrap();
    let d0 = region(&inspect(&m), "disk", 0).0;
    for (i, s) in ["s1", "s2", "s3"].iter().enumerate() {
        vol_write(&m, d0 + i as u64 * (1 << 20), &pattern(1 << 20, i as u8));
        ok(&["snapshot", ms, s]);
    }
    let (ev, code) = ndjson(&["delete-snapshot", ms, "s2", "--json"]);
    assert_eq!(code, 0, "{ev:?}");
    let merged = phase_of(&ev, "delete-snapshot", "merge");
    assert!(merged.last().unwrap().1 >= 1 << 20, "{merged:?}");
    assert_eq!(result_of(&ev, "delete-snapshot")["snapshot"], "s2");
    ok(&["revert", ms, "s3"]);
    assert_eq!(vol_read(&m, d0 + (1 << 20), 1 << 20), pattern(1 << 20, 1));

    // flatten of a clone.
    ok(&["clone", ms, "s3", "mc"]);
    let (ev, code) = ndjson(&["flatten", p.join("mc.lun").to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{ev:?}");
    let copied = phase_of(&ev, "flatten", "copy");
    assert_eq!(copied.last().unwrap().1, volume(&p.join("mc.lun")).size());
    assert_eq!(result_of(&ev, "flatten")["lun"], "mc");

    // diff --out and apply-diff: verify the whole file, then apply.
    let copy = d.path().join("copy.lun");
    std::fs::copy(&m, &copy).unwrap();
    ok(&["snapshot", ms, "base"]);
    vol_write(&m, d0, &pattern(3 << 20, 9));
    let f = d.path().join("m.lgdiff");
    let (ev, _) = ndjson(&["diff", ms, "base", "--out", f.to_str().unwrap(), "--json"]);
    let size = result_of(&ev, "diff")["bytes"].as_u64().unwrap();
    assert_eq!(size, std::fs::metadata(&f).unwrap().len());
    let (ev, code) = ndjson(&[
        "apply-diff",
        copy.to_str().unwrap(),
        f.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{ev:?}");
    assert_eq!(
        phase_of(&ev, "apply-diff", "verify").last().unwrap().1,
        size
    );
    let applied = phase_of(&ev, "apply-diff", "apply");
    let first_apply = ev.iter().position(|e| e["phase"] == "apply").unwrap();
    let last_verify = ev.iter().rposition(|e| e["phase"] == "verify").unwrap();
    assert!(
        last_verify < first_apply,
        "verified before a byte is applied"
    );
    let r = result_of(&ev, "apply-diff");
    assert_eq!(r["bytes"], applied.last().unwrap().1);
    assert!(r["bytes"].as_u64().unwrap() >= 3 << 20, "{r}");
    assert_eq!(r["from"], "base");
}

#[test]
fn failures_with_json_end_in_an_error_object_carrying_the_exit_code() {
    let (d, p) = pool();
    let ps = p.to_str().unwrap();
    let m = create(&p, "m", &["--disk", "8M", "--memory", "1M"]);
    let ms = m.to_str().unwrap();
    let garbage = d.path().join("garbage.img");
    std::fs::write(&garbage, vec![0x5au8; 3 << 20]).unwrap();
    let lock = owner::lock(&m).unwrap();
    let busy = ndjson(&["snapshot", ms, "s", "--json"]);
    drop(lock);
    for ((ev, code), want, name, says) in [
        (
            ndjson(&["revert", ms, "nope", "--json"]),
            4,
            "not-found",
            "no snapshot named",
        ),
        (
            ndjson(&["inspect", "nosuch", "--pool", ps, "--json"]),
            4,
            "not-found",
            "no LUN named",
        ),
        (busy, 3, "busy", "locked by another process"),
        (
            ndjson(&["inspect", garbage.to_str().unwrap(), "--json"]),
            5,
            "damaged",
            "not a lungate LUN",
        ),
        (
            ndjson(&[
                "create", "x", "--pool", ps, "--disk", "4X", "--memory", "1M", "--json",
            ]),
            1,
            "failed",
            "unknown unit",
        ),
        (
            ndjson(&["create", "x", "--pool", ps, "--json"]),
            2,
            "usage",
            "--disk <SIZE>",
        ),
    ] {
        assert_eq!(code, want, "{ev:?}");
        let e = ev.last().unwrap();
        assert_eq!(e["type"], "error", "{ev:?}");
        assert_eq!(e["exit_code"], want);
        assert_eq!(e["exit"], name);
        assert!(e["error"].as_str().unwrap().contains(says), "{e}");
    }
    // The message goes to stderr too, with or without --json.
    lunctl()
        .args(["revert", ms, "nope"])
        .assert()
        .code(4)
        .stdout("")
        .stderr(predicate::str::starts_with("lunctl: error: "));
}

#[test]
fn every_command_takes_json_and_a_read_command_prints_one_document() {
    let (d, p) = pool();
    let ps = p.to_str().unwrap();
    let (ev, _) = ndjson(&["pool", "init", ps, "--json"]);
    assert_eq!(result_of(&ev, "pool-init")["pool"], ps);
    let a = create(&p, "a", &["--disk", "8M", "--memory", "1M"]);
    create(&p, "b", &["--disk", "8M", "--memory", "0"]);
    let (ev, _) = ndjson(&["attach-secondary", "a", "b", "--pool", ps, "--json"]);
    assert_eq!(result_of(&ev, "attach-secondary")["secondary"], "b");
    let (ev, _) = ndjson(&["--json", "snapshot", "a", "s", "--pool", ps]);
    let r = result_of(&ev, "snapshot");
    assert_eq!(r["lun"], "a");
    assert_eq!(r["snapshot"]["name"], "s");
    let (ev, _) = ndjson(&["clone", "a", "s", "c", "--pool", ps, "--json"]);
    let r = result_of(&ev, "clone");
    assert_eq!(r["exports"], serde_json::json!(["c/disk0", "c-b/disk0"]));
    let (ev, _) = ndjson(&["revert", "a", "s", "--pool", ps, "--json"]);
    assert_eq!(result_of(&ev, "revert")["snapshot"], "s");
    let (ev, _) = ndjson(&["delete", "c", "--pool", ps, "--yes", "--json"]);
    assert_eq!(result_of(&ev, "delete")["lun"], "c");
    // Read commands: one (pretty-printed) document each.
    for args in [
        vec!["inspect", a.to_str().unwrap()],
        vec!["list", "--pool", ps],
        vec!["snapshots", a.to_str().unwrap()],
        vec!["usage", a.to_str().unwrap()],
        vec!["diff", a.to_str().unwrap(), "s"],
        vec!["scan", ps],
    ] {
        let mut args = args.clone();
        args.push("--json");
        let v = json_of(&args);
        assert!(v.is_object() || v.is_array(), "{args:?}: {v}");
    }
    let _ = d;
}

#[test]
fn a_long_operation_draws_a_progress_bar_on_a_terminal_and_nothing_elsewhere() {
    require_tool("script");
    let (_d, p) = pool();
    let big = create(&p, "big", &["--disk", "256M", "--memory", "1M"]);
    ok(&["snapshot", big.to_str().unwrap(), "s"]);
    ok(&["clone", big.to_str().unwrap(), "s", "c1"]);
    ok(&["clone", big.to_str().unwrap(), "s", "c2"]);
    let bin = assert_cmd::cargo::cargo_bin("lunctl");
    // script(1) gives lunctl a terminal; what it drew comes out on stdout.
    let out = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{} flatten {}",
            bin.display(),
            p.join("c1.lun").display()
        ))
        .arg("/dev/null")
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("flatten copy [=") && screen.contains(" MiB/"),
        "no progress bar on the terminal: {screen:?}"
    );
    assert!(screen.contains("c1 flattened"), "{screen:?}");
    // No terminal: the message only, nothing on stderr.
    let out = lunctl()
        .args(["flatten", p.join("c2.lun").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "c2 flattened: it reads no shared layer any more\n"
    );
    assert!(
        out.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prefill_on_a_block_device_wipes_what_a_previous_user_left_in_the_disks() {
    require_tool("losetup");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("used.img");
    // A device full of a previous tenant's bytes.
    std::fs::write(&img, vec![0xabu8; 48 << 20]).unwrap();
    let dev = Loop::attach(&img);
    let disk0 = |dev: &str| {
        let (off, len) = region(&inspect(Path::new(dev)), "disk", 0);
        read_at(Path::new(dev), off, len as usize)
    };
    // Without --prefill the old bytes show through the new LUN's disk.
    ok(&[
        "create", "thin", "--path", &dev.0, "--disk", "16M", "--memory", "1M",
    ]);
    assert!(disk0(&dev.0).contains(&0xab), "expected the old bytes");
    ok(&["delete", &dev.0, "--yes"]);
    let (ev, code) = ndjson(&[
        "create",
        "clean",
        "--path",
        &dev.0,
        "--disk",
        "16M",
        "--memory",
        "1M",
        "--prefill",
        "--json",
    ]);
    assert_eq!(code, 0, "{ev:?}");
    assert_eq!(
        phase_of(&ev, "create", "prefill").last().unwrap().1,
        16 << 20
    );
    assert!(
        disk0(&dev.0).iter().all(|&b| b == 0),
        "a prefilled disk reads zeros"
    );
    assert_eq!(inspect(Path::new(&dev.0))["name"], "clean");
    ok(&["delete", &dev.0, "--yes"]);
}
