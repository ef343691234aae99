//! LUNs on Ceph RBD (the `rbd` feature), on a throwaway cluster the test
//! starts itself (tests/ceph.rs): `lunctl pool init rbd:…`, `lunctl
//! create` on it, `lungate serve --pool rbd:…`, real NBD clients (qemu-io,
//! nbdinfo, nbdcopy, qemu-img) writing and reading back, and every volume
//! operation (snapshot, revert, clone, flatten, diff, usage) mapped to
//! RBD's own, then the scanner and `lunctl inspect` on the pool.
//!
//! Needs the binaries built with `--features rbd` (scripts/test does).

use std::process::Command;

use lungate_tests::ceph::Cluster;
use lungate_tests::*;
use serde_json::json;

/// `rbd export` of image `image` (namespace `ns`) into a file: the same
/// bytes a file LUN holds, for the file tools of the harness.
fn export_image(c: &Cluster, ns: &str, image: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join(image);
    let _ = std::fs::remove_file(&out);
    c.rbd(&[
        "export",
        "--no-progress",
        &format!("rbd/{ns}/{image}"),
        out.to_str().expect("utf-8"),
    ]);
    out
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn rbd_lun_served_with_every_volume_operation() {
    let c = Cluster::shared();
    let ns = "ops";
    let pool = c.pool(ns);
    let work = tempfile::tempdir().expect("tempdir");

    // lunctl create on the RBD pool: one image holding the file format.
    let out = lunctl(&[
        "create", "--pool", &pool, "--disk", "32M", "--disk", "16M", "--memory", "8M", "vm",
    ]);
    assert_success("lunctl create", &out);
    let lun = format!("rbd:rbd/{ns}/vm.lun:conf={}", c.conf().display());
    assert!(c.rbd(&["ls", &format!("rbd/{ns}")]).contains("vm.lun"));
    let out = lunctl(&["--json", "inspect", &lun]);
    assert_success("lunctl inspect", &out);
    let inspect = json_of(&out);
    assert_eq!(inspect["name"], "vm", "{inspect}");
    // The image's bytes are a LUN to the file tools too.
    let copy = export_image(c, ns, "vm.lun", work.path());
    let regions = disk_regions(&copy);
    assert_eq!(regions.len(), 2);
    assert_eq!(regions[0].1, 32 << 20);

    let ctl = work.path().join("ctl.sock");
    let gw = Gateway::start(&["--pool", &pool, "--control", ctl.to_str().expect("utf-8")]);
    let d0 = gw.uri("vm/disk0");
    let d1 = gw.unix_uri("vm/disk1");

    // nbdinfo sees the disk regions only.
    let out = run_ok(Command::new(require_tool("nbdinfo")).args(["--size", &d0]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "33554432");
    let out = run_ok(Command::new(require_tool("nbdinfo")).args(["--size", &d1]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "16777216");

    // qemu-io writes and reads back, including the last block of a disk.
    qemu_io_ok(
        &d0,
        &[
            "write -P 0xa1 16M 256k",
            "write -P 0xa2 20M 64k",
            "write -P 0xa3 33488896 64k",
            "read -P 0xa1 16M 256k",
            "read -P 0xa2 20M 64k",
            "read -P 0xa3 33488896 64k",
            "read -P 0 12M 64k",
        ],
    );
    qemu_io_ok(&d1, &["write -P 0xb1 0 64k", "read -P 0xb1 0 64k"]);
    // A write past the end is refused and changes nothing.
    let out = qemu_io(&d0, &["write -P 0xee 33554432 4k"]);
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("wrote 4096"), "{text}");

    // nbdcopy in and out: 4 MiB of pseudo-random bytes at 0.
    let src = work.path().join("src.bin");
    let data = pattern_bytes(4 << 20, 0x5eed);
    std::fs::write(&src, &data).expect("write src");
    run_ok(Command::new(require_tool("nbdcopy")).args([
        "--destination-is-zero",
        src.to_str().unwrap(),
        &d0,
    ]));
    let back = work.path().join("back.bin");
    run_ok(Command::new(require_tool("nbdcopy")).args([&d0, back.to_str().unwrap()]));
    let got = std::fs::read(&back).expect("read back");
    assert_eq!(got.len(), 32 << 20);
    assert!(got[..4 << 20] == data[..], "nbdcopy round trip differs");

    // snapshot: an RBD snapshot of the image.
    let sock = gw.control();
    let s = api(
        &sock,
        "POST",
        "/v1/luns/vm/snapshots",
        Some(json!({"name": "base", "description": "before"})),
        201,
    );
    assert_eq!(s["snapshot"]["name"], "base");
    let snaps = c.rbd(&["snap", "ls", &format!("rbd/{ns}/vm.lun")]);
    assert!(snaps.contains("lungate-"), "no RBD snapshot: {snaps}");

    // writes after it, then diff and usage
    qemu_io_ok(&d0, &["write -P 0xc1 8M 128k", "write -P 0xc2 0 4k"]);
    let diff = api(&sock, "GET", "/v1/luns/vm/diff?from=base", None, 200);
    let changes = diff["changes"].as_array().expect("changes");
    let d0_off = regions[0].0;
    let covers = |off: u64, len: u64| {
        changes.iter().any(|ch| {
            let o = ch["offset"].as_u64().unwrap();
            let l = ch["length"].as_u64().unwrap();
            o <= off && off + len <= o + l
        })
    };
    assert!(covers(d0_off + (8 << 20), 128 << 10), "{diff}");
    assert!(covers(d0_off, 4096), "{diff}");
    // nothing outside what was written (rounded to RBD objects) changed
    let total: u64 = changes
        .iter()
        .map(|ch| ch["length"].as_u64().unwrap())
        .sum();
    assert!(total <= 3 * (4 << 20), "diff too large: {diff}");
    let usage = api(&sock, "GET", "/v1/luns/vm/usage", None, 200);
    assert!(usage.as_array().is_some_and(|u| u.len() == 2), "{usage}");

    // clone from the snapshot: an RBD clone, served at once
    let cl = api(
        &sock,
        "POST",
        "/v1/luns/vm/clone",
        Some(json!({"snapshot": "base", "name": "vmc"})),
        201,
    );
    assert_eq!(cl["exports"].as_array().unwrap().len(), 2, "{cl}");
    let info = c.rbd(&["info", &format!("rbd/{ns}/vmc.lun")]);
    assert!(info.contains("parent:"), "clone has no RBD parent: {info}");
    let c0 = gw.uri("vmc/disk0");
    qemu_io_ok(
        &c0,
        &[
            "read -P 0xa1 16M 256k",
            "read -P 0xa2 20M 64k",
            "read -P 0 8M 128k",
        ],
    );
    run_ok(Command::new(require_tool("nbdcopy")).args([&c0, back.to_str().unwrap()]));
    assert!(
        std::fs::read(&back).unwrap()[..4 << 20] == data[..],
        "clone differs"
    );
    qemu_io_ok(&c0, &["write -P 0xd1 0 64k"]);
    qemu_io_ok(&d0, &["read -P 0xc2 0 4k"]);

    // revert the source: back to the snapshot
    api(
        &sock,
        "POST",
        "/v1/luns/vm/revert",
        Some(json!({"snapshot": "base"})),
        200,
    );
    qemu_io_ok(
        &d0,
        &[
            "read -P 0xa1 16M 256k",
            "read -P 0 8M 128k",
            "read -P 0xa3 33488896 64k",
        ],
    );
    qemu_io_ok(&d1, &["read -P 0xb1 0 64k"]);
    run_ok(Command::new(require_tool("nbdcopy")).args([&d0, back.to_str().unwrap()]));
    assert!(
        std::fs::read(&back).unwrap()[..4 << 20] == data[..],
        "revert differs"
    );
    // The reads above show the disks as at the snapshot. RBD's diff after
    // a rollback may still list an object the rollback rewrote (a superset
    // is safe for changed-block tracking), but never more than what was
    // written since the snapshot; the state region may show the owner
    // record the gateway rewrites after a revert.
    let diff = api(&sock, "GET", "/v1/luns/vm/diff?from=base", None, 200);
    let written = [(d0_off, 4096), (d0_off + (8 << 20), 128 << 10)];
    for ch in diff["changes"].as_array().unwrap() {
        let o = ch["offset"].as_u64().unwrap();
        let l = ch["length"].as_u64().unwrap();
        let on_disk = regions.iter().any(|&(ro, rl)| o < ro + rl && ro < o + l);
        let was_written = written.iter().any(|&(wo, wl)| wo <= o && o + l <= wo + wl);
        assert!(
            !on_disk || was_written,
            "disk change after revert: {diff} regions {regions:?}"
        );
    }
    let out = run_ok(Command::new(require_tool("qemu-img")).args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &d1,
        &gw.uri("vmc/disk1"),
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));

    // flatten the clone: it no longer depends on the source's snapshot
    api(&sock, "POST", "/v1/luns/vmc/flatten", None, 200);
    let info = c.rbd(&["info", &format!("rbd/{ns}/vmc.lun")]);
    assert!(
        !info.contains("parent:"),
        "flattened clone keeps a parent: {info}"
    );
    qemu_io_ok(&c0, &["read -P 0xd1 0 64k", "read -P 0xa2 20M 64k"]);

    // the tree, as both the control API and lunctl report it
    let tree = api(&sock, "GET", "/v1/luns/vm/snapshots", None, 200);
    assert_eq!(tree[0]["name"], "base");
    assert_eq!(tree[0]["description"], "before");
    gw.stop_ok();

    // the scanner on the pool: both VMs, the snapshot, the clone's parent
    let out = lunctl(&["--json", "scan", &pool]);
    assert_success("lunctl scan", &out);
    let scan = json_of(&out);
    let vms = scan["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 2, "{scan}");
    let vm = vms.iter().find(|v| v["name"] == "vm").expect("vm scanned");
    assert_eq!(vm["snapshots"][0]["name"], "base", "{vm}");
    let vmc = vms
        .iter()
        .find(|v| v["name"] == "vmc")
        .expect("clone scanned");
    assert_eq!(
        vmc["parent"].as_str().map(|p| p.starts_with("vm")),
        Some(true),
        "{vmc}"
    );
    assert!(scan["damaged"].as_array().unwrap().is_empty(), "{scan}");
    let out = lunctl(&["--json", "snapshots", &lun]);
    assert_success("lunctl snapshots", &out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"base\""));

    // The image still holds the LUN format the file tools read.
    let copy = export_image(c, ns, "vm.lun", work.path());
    assert_eq!(disk_regions(&copy), regions);

    // the data survives a restart of the gateway
    let gw = Gateway::start(&["--pool", &pool, "--control", ctl.to_str().expect("utf-8")]);
    qemu_io_ok(&gw.uri("vm/disk0"), &["read -P 0xa1 16M 256k"]);
    qemu_io_ok(&gw.uri("vmc/disk0"), &["read -P 0xd1 0 64k"]);
    gw.stop_ok();

    // delete: the images and their snapshots go
    for n in ["vmc", "vm"] {
        let out = lunctl(&[
            "delete",
            "--yes",
            &format!("rbd:rbd/{ns}/{n}.lun:conf={}", c.conf().display()),
        ]);
        assert_success("lunctl delete", &out);
    }
    assert!(!c.rbd(&["ls", &format!("rbd/{ns}")]).contains(".lun"));
}
