//! Revert of an RBD LUN by clone-and-swap (block/src/store/rbd/tree.rs):
//! the snapshot is cloned into `NAME.lun~<uuid>`, the manifest in the LUN
//! image's metadata names the clone live, and the gateway's bytes swap to
//! it. Proven through the gateway and real NBD clients on the throwaway
//! cluster of tests/ceph.rs: the LUN image's own bytes stay as they were,
//! the LUN reads as the snapshot (sha256), writes land on the clone and
//! survive a restart, snapshots and reverts chain across images, delete,
//! clone, diff, usage and the scanner see one VM with one tree, and a
//! gateway killed inside a revert (before or after the commit point)
//! leaves a LUN that opens with the snapshot's bytes (the VM's revert
//! intent is finished) and no stray image.
//!
//! Needs the binaries built with `--features rbd` (scripts/test does).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lungate_tests::ceph::Cluster;
use lungate_tests::*;
use serde_json::json;

fn sha256(path: &Path) -> String {
    let out = run_ok(Command::new(require_tool("sha256sum")).arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_string()
}

/// The export's bytes, copied out with nbdcopy, and their sha256.
fn copy_out(uri: &str, to: &Path) -> String {
    let _ = std::fs::remove_file(to);
    run_ok(Command::new(require_tool("nbdcopy")).args([uri, to.to_str().expect("utf-8")]));
    sha256(to)
}

/// The revert clones of `vm.lun` in namespace `ns`.
fn clones(c: &Cluster, ns: &str) -> Vec<String> {
    c.rbd(&["ls", &format!("rbd/{ns}")])
        .lines()
        .filter(|l| l.starts_with("vm.lun~"))
        .map(str::to_string)
        .collect()
}

/// Each disk region's bytes of an exported image.
fn region_bytes(image: &Path, regions: &[(u64, u64)]) -> Vec<Vec<u8>> {
    regions
        .iter()
        .map(|&(o, l)| file_bytes(image, o, l as usize))
        .collect()
}

fn changes(v: &serde_json::Value) -> Vec<(u64, u64)> {
    v["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| (c["offset"].as_u64().unwrap(), c["length"].as_u64().unwrap()))
        .collect()
}

fn covers(ch: &[(u64, u64)], off: u64, len: u64) -> bool {
    ch.iter().any(|&(o, l)| o <= off && off + len <= o + l)
}

fn snap(sock: &Path, name: &str) {
    api(
        sock,
        "POST",
        "/v1/luns/vm/snapshots",
        Some(json!({ "name": name })),
        201,
    );
}

fn revert(sock: &Path, name: &str) {
    api(
        sock,
        "POST",
        "/v1/luns/vm/revert",
        Some(json!({ "snapshot": name })),
        200,
    );
}

#[test]
fn rbd_revert_swaps_the_lun_to_a_clone_of_the_snapshot() {
    let c = Cluster::shared();
    let ns = "swap";
    let pool = c.pool(ns);
    let work = tempfile::tempdir().expect("tempdir");
    let w = |n: &str| work.path().join(n);
    let out = lunctl(&[
        "create", "--pool", &pool, "--disk", "32M", "--memory", "4M", "vm",
    ]);
    assert_success("lunctl create", &out);
    let lun = format!("rbd:rbd/{ns}/vm.lun:conf={}", c.conf().display());
    let regions = disk_regions(&c.export(ns, "vm.lun", work.path()));
    let d0_off = regions[0].0;

    let ctl = w("ctl.sock");
    let args = ["--pool", &pool, "--control", ctl.to_str().expect("utf-8")];
    let gw = Gateway::start(&args);
    let sock = gw.control();
    let d0 = gw.uri("vm/disk0");

    // s1: 4 MiB of pseudo-random bytes and a pattern
    std::fs::write(w("a.bin"), pattern_bytes(4 << 20, 0xa11)).expect("write a.bin");
    run_ok(Command::new(require_tool("nbdcopy")).args([w("a.bin").to_str().unwrap(), &d0]));
    qemu_io_ok(&d0, &["write -P 0xa1 16M 256k"]);
    snap(&sock, "s1");
    let s1 = copy_out(&d0, &w("s1.bin"));
    // s2: more writes
    qemu_io_ok(&d0, &["write -P 0xb1 0 64k", "write -P 0xb2 20M 64k"]);
    snap(&sock, "s2");
    let s2 = copy_out(&d0, &w("s2.bin"));
    assert_ne!(s1, s2);
    // live writes after s2, which the revert discards
    qemu_io_ok(&d0, &["write -P 0xc1 8M 128k"]);
    let anchor_before = region_bytes(&c.export(ns, "vm.lun", work.path()), &regions);

    // revert to s1: a clone of vm.lun@s1 is the LUN now
    assert!(clones(c, ns).is_empty());
    revert(&sock, "s1");
    let after = clones(c, ns);
    assert_eq!(after.len(), 1, "{after:?}");
    let info = c.rbd(&["info", &format!("rbd/{ns}/{}", after[0])]);
    assert!(
        info.contains("parent:") && info.contains("vm.lun@lungate-"),
        "{info}"
    );
    assert_eq!(
        copy_out(&d0, &w("r1.bin")),
        s1,
        "the LUN after the revert is not s1"
    );
    // The LUN image's own bytes are untouched: the revert copied nothing.
    let anchor_after = region_bytes(&c.export(ns, "vm.lun", work.path()), &regions);
    assert!(
        anchor_after == anchor_before,
        "the LUN image's disk bytes changed"
    );
    // The exported clone holds the LUN format too (the label kept).
    assert_eq!(disk_regions(&c.export(ns, &after[0], work.path())), regions);

    // writes after the revert land on the clone; a snapshot of them
    qemu_io_ok(&d0, &["write -P 0xd1 4M 64k", "read -P 0xd1 4M 64k"]);
    snap(&sock, "s3");
    let s3 = copy_out(&d0, &w("s3.bin"));
    let snaps = c.rbd(&["snap", "ls", &format!("rbd/{ns}/{}", after[0])]);
    assert!(
        snaps.contains("lungate-"),
        "s3 is not on the clone: {snaps}"
    );

    // revert to the older s2 (on vm.lun), then to the newer s3 (on the
    // first clone): the clone made for s2 goes, the one holding s3 stays.
    revert(&sock, "s2");
    assert_eq!(
        copy_out(&d0, &w("r2.bin")),
        s2,
        "the LUN after a revert to s2"
    );
    assert_eq!(clones(c, ns).len(), 2);
    revert(&sock, "s3");
    assert_eq!(
        copy_out(&d0, &w("r3.bin")),
        s3,
        "the LUN after a revert to s3"
    );
    let now = clones(c, ns);
    assert_eq!(now.len(), 2, "the clone made for s2 is left: {now:?}");
    assert!(now.contains(&after[0]), "{now:?}");

    // diff across images: s1 (vm.lun) to s3 (the first clone) is the
    // write made after the first revert; s2 to s3 adds what s2 wrote.
    let ch = changes(&api(
        &sock,
        "GET",
        "/v1/luns/vm/diff?from=s1&to=s3",
        None,
        200,
    ));
    assert!(covers(&ch, d0_off + (4 << 20), 64 << 10), "{ch:?}");
    let on_disk = |ch: &[(u64, u64)]| -> u64 {
        ch.iter()
            .filter(|&&(o, l)| o < d0_off + (32 << 20) && d0_off < o + l)
            .map(|&(_, l)| l)
            .sum()
    };
    assert!(on_disk(&ch) <= 64 << 10, "diff s1..s3 too large: {ch:?}");
    let ch = changes(&api(
        &sock,
        "GET",
        "/v1/luns/vm/diff?from=s2&to=s3",
        None,
        200,
    ));
    for (o, l) in [(0, 64 << 10), (20 << 20, 64 << 10), (4 << 20, 64 << 10)] {
        assert!(covers(&ch, d0_off + o, l), "s2..s3 misses {o}: {ch:?}");
    }
    // s3 to the live bytes: nothing on the disk (only the label kept)
    let ch = changes(&api(&sock, "GET", "/v1/luns/vm/diff?from=s3", None, 200));
    assert_eq!(on_disk(&ch), 0, "{ch:?}");
    let usage = api(&sock, "GET", "/v1/luns/vm/usage", None, 200);
    assert_eq!(usage.as_array().map(Vec::len), Some(4), "{usage}");

    // clone s3 (held by the first clone) into a new LUN
    api(
        &sock,
        "POST",
        "/v1/luns/vm/clone",
        Some(json!({"snapshot": "s3", "name": "vmc"})),
        201,
    );
    assert_eq!(copy_out(&gw.uri("vmc/disk0"), &w("c.bin")), s3);
    // delete s1, the parent of the first clone: gone from the tree, kept
    // as the clone's RBD parent
    api(&sock, "DELETE", "/v1/luns/vm/snapshots/s1", None, 200);
    let tree = api(&sock, "GET", "/v1/luns/vm/snapshots", None, 200);
    let names: Vec<&str> = tree
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["s2", "s3"], "{tree}");
    assert_eq!(copy_out(&d0, &w("r4.bin")), s3);
    // a write after the reverts survives a restart
    qemu_io_ok(&d0, &["write -P 0xe1 24M 64k"]);
    gw.stop_ok();

    let gw = Gateway::start(&args);
    let d0 = gw.uri("vm/disk0");
    qemu_io_ok(
        &d0,
        &[
            "read -P 0xe1 24M 64k",
            "read -P 0xd1 4M 64k",
            "read -P 0xa1 16M 256k",
            "read -P 0 8M 128k",
        ],
    );
    let now = clones(c, ns);
    assert_eq!(now.len(), 2, "the restart removed a needed image");
    // flatten: the live clone no longer reads from the first clone's s3
    // (which stays: s3 is a snapshot of the tree, and vmc's parent)
    let live: Vec<&String> = now.iter().filter(|n| **n != after[0]).collect();
    let spec = format!("rbd/{ns}/{}", live[0]);
    assert!(c.rbd(&["info", &spec]).contains("parent:"));
    api(&gw.control(), "POST", "/v1/luns/vm/flatten", None, 200);
    let info = c.rbd(&["info", &spec]);
    assert!(!info.contains("parent:"), "flattened: {info}");
    qemu_io_ok(&d0, &["read -P 0xe1 24M 64k", "read -P 0xd1 4M 64k"]);
    assert_eq!(clones(c, ns), now);
    gw.stop_ok();

    // The scanner and inspect: one VM with the same tree, and its clone.
    let scan: serde_json::Value =
        serde_json::from_slice(&lunctl(&["--json", "scan", &pool]).stdout).expect("scan JSON");
    let vms = scan["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 2, "{scan}");
    let vm = vms.iter().find(|v| v["name"] == "vm").expect("vm scanned");
    let sn: Vec<&str> = vm["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(sn, ["s2", "s3"], "{vm}");
    assert!(scan["damaged"].as_array().unwrap().is_empty(), "{scan}");
    let out = lunctl(&["--json", "inspect", &lun]);
    assert_success("lunctl inspect", &out);

    // delete: every image of both LUNs goes
    for n in ["vmc", "vm"] {
        let out = lunctl(&[
            "delete",
            "--yes",
            &format!("rbd:rbd/{ns}/{n}.lun:conf={}", c.conf().display()),
        ]);
        assert_success("lunctl delete", &out);
    }
    let left = c.rbd(&["ls", &format!("rbd/{ns}")]);
    assert!(!left.contains(".lun"), "{left}");
}

/// Break the RBD locks a killed gateway left on every image of `ns` (what
/// an operator or the coordinator's takeover does for a dead owner).
fn break_locks(c: &Cluster, ns: &str) {
    for img in c.rbd(&["ls", &format!("rbd/{ns}")]).lines() {
        let spec = format!("rbd/{ns}/{img}");
        let locks: serde_json::Value =
            serde_json::from_str(&c.rbd(&["lock", "ls", "--format", "json", &spec]))
                .expect("rbd lock ls JSON");
        for l in locks.as_array().cloned().unwrap_or_default() {
            let (id, locker) = (l["id"].as_str().unwrap(), l["locker"].as_str().unwrap());
            c.rbd(&["lock", "rm", &spec, id, locker]);
        }
    }
}

#[test]
fn a_gateway_killed_inside_a_revert_leaves_a_whole_lun_and_no_stray_image() {
    let c = Cluster::shared();
    for step in ["cloned", "committed"] {
        let ns = format!("kill-{step}");
        let pool = c.pool(&ns);
        let work = tempfile::tempdir().expect("tempdir");
        let w = |n: &str| work.path().join(n);
        let out = lunctl(&[
            "create", "--pool", &pool, "--disk", "16M", "--memory", "4M", "vm",
        ]);
        assert_success("lunctl create", &out);
        let ctl = w("ctl.sock");
        let args = ["--pool", &pool, "--control", ctl.to_str().expect("utf-8")];

        let gw = Gateway::start(&args);
        let d0 = gw.uri("vm/disk0");
        qemu_io_ok(&d0, &["write -P 0x11 0 1M"]);
        snap(&gw.control(), "s");
        let snapped = copy_out(&d0, &w("s.bin"));
        qemu_io_ok(&d0, &["write -P 0x22 0 1M"]);
        let old = copy_out(&d0, &w("old.bin"));
        gw.stop_ok();

        // The revert ends the gateway at `step`, as a SIGKILL would.
        let mut gw = Gateway::start_env(&args, &[("LUNGATE_TEST_RBD_REVERT_KILL", step)]);
        let _ = run_timeout(
            Command::new(require_tool("curl")).args([
                "-s",
                "--unix-socket",
                gw.control().to_str().unwrap(),
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                r#"{"snapshot":"s"}"#,
                "http://lungate/v1/luns/vm/revert",
            ]),
            Duration::from_secs(60),
        );
        let st = gw
            .wait_exit(Duration::from_secs(30))
            .expect("the gateway exited");
        assert_eq!(st.code(), Some(137), "{step}: {}", gw.stderr_log());
        let made = clones(c, &ns);
        assert_eq!(made.len(), 1, "{step}: the clone was made");
        break_locks(c, &ns);

        // The next open: the LUN reads whole, as the old bytes or the
        // snapshot's, on no image the manifest does not name. A VM's
        // revert is a group operation whose intent (in the LUN image's
        // metadata) the open finishes: the revert is made again.
        let gw = Gateway::start(&args);
        let d0 = gw.uri("vm/disk0");
        let now = copy_out(&d0, &w("now.bin"));
        assert!(
            now == snapped || now == old,
            "{step}: neither the old nor the snapshot's bytes"
        );
        assert_eq!(
            now, snapped,
            "{step}: the group's intent finishes the revert"
        );
        let live = clones(c, &ns);
        assert_eq!(live.len(), 1, "{step}: {live:?}");
        match step {
            // before the commit: the orphan clone removed, a new one made
            "cloned" => assert_ne!(live, made, "{step}: the orphan is left"),
            // after it: the committed clone is the live image
            _ => assert_eq!(live, made, "{step}"),
        }
        let info = c.rbd(&["info", &format!("rbd/{ns}/{}", live[0])]);
        assert!(info.contains("parent:"), "{info}");
        assert!(old != snapped);
        qemu_io_ok(&d0, &["write -P 0x33 2M 64k"]);
        gw.stop_ok();
        let gw = Gateway::start(&args);
        qemu_io_ok(&gw.uri("vm/disk0"), &["read -P 0x33 2M 64k"]);
        gw.stop_ok();
        let lun = format!("rbd:rbd/{ns}/vm.lun:conf={}", c.conf().display());
        let out = lunctl(&["--json", "inspect", &lun]);
        assert_success("lunctl inspect", &out);
    }
}
