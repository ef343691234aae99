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
    let copy = c.export(ns, "vm.lun", work.path());
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
    // The reads above show the disks as at the snapshot. The diff after
    // the revert (clone-and-swap: the snapshot to the clone's own writes)
    // lists no more than what was written since the snapshot; the state
    // region may show the owner record the gateway rewrites after a revert.
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
    let copy = c.export(ns, "vm.lun", work.path());
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

/// The aligned layout on an RBD image: lungate's GPT at LBA 0 written
/// and checked through the image, the guest's first MiB in the state
/// region's shadow area, and the image's bytes the same LUN to the file
/// tools. Data checksums (file-store layers) and copying migrations are
/// refused with a reason.
#[test]
fn aligned_layout_lun_on_rbd_keeps_its_gpt_and_the_guests_first_mib() {
    let c = Cluster::shared();
    let ns = "aligned";
    let pool = c.pool(ns);
    let work = tempfile::tempdir().expect("tempdir");
    let out = lunctl(&[
        "create", "--pool", &pool, "--layout", "aligned", "--disk", "16M", "--memory", "4M", "al",
    ]);
    assert_success("lunctl create --layout aligned", &out);
    let lun = format!("rbd:rbd/{ns}/al.lun:conf={}", c.conf().display());
    let inspect = json_of(&lunctl(&["--json", "inspect", &lun]));
    assert_eq!(inspect["layout"], "aligned", "{inspect}");
    assert_eq!(inspect["warnings"], json!([]), "{inspect}");

    let ctl = work.path().join("ctl.sock");
    let files = tempfile::tempdir().expect("tempdir");
    let files_s = files.path().to_str().expect("utf-8");
    let gw = Gateway::start(&[
        "--pool",
        &pool,
        "--pool",
        files_s,
        "--control",
        ctl.to_str().expect("utf-8"),
    ]);
    let d0 = gw.uri("al/disk0");
    // Byte 0 (the shadowed first MiB) and past it, read back.
    qemu_io_ok(
        &d0,
        &[
            "write -P 0x5a 0 64k",
            "write -P 0x5b 1M 64k",
            "read -P 0x5a 0 64k",
            "read -P 0x5b 1M 64k",
        ],
    );
    // A copying migration to a file pool is refused: the image is shared
    // by the cluster's gateways already (they hand it over instead).
    let r = api(
        &gw.control(),
        "POST",
        "/v1/luns/al/migrate",
        Some(json!({ "to_pool": files_s })),
        409,
    );
    assert!(r.to_string().contains("RBD LUN"), "{r}");
    assert!(!files.path().join("al.lun").exists());
    gw.stop_ok();

    // The guest's bytes did not land on lungate's GPT: inspect still
    // finds it intact, and the exported image reads as the same disk.
    let inspect = json_of(&lunctl(&["--json", "inspect", &lun]));
    assert_eq!(inspect["warnings"], json!([]), "{inspect}");
    let copy = c.export(ns, "al.lun", work.path());
    assert_eq!(disk_file_bytes(&copy, 0, 0, 65536), vec![0x5a; 65536]);
    assert_eq!(disk_file_bytes(&copy, 0, 1 << 20, 65536), vec![0x5b; 65536]);
    let mut mbr = [0u8; 2];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&copy)
            .expect("open export")
            .read_exact_at(&mut mbr, 510)
            .expect("read MBR");
    }
    assert_eq!(mbr, [0x55, 0xaa], "no protective MBR at LBA 0");

    // Checksums are a file-store feature: refused, and no image is left.
    let out = Command::new(bin("lunctl"))
        .args([
            "create",
            "--pool",
            &pool,
            "--checksums",
            "--disk",
            "8M",
            "--memory",
            "4M",
            "sums",
        ])
        .output()
        .expect("run lunctl");
    assert!(!out.status.success(), "--checksums on RBD was accepted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksums"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!c.rbd(&["ls", &format!("rbd/{ns}")]).contains("sums.lun"));

    let out = lunctl(&["delete", "--yes", &lun]);
    assert_success("lunctl delete", &out);
}

/// The value of etcd key `key` (`None`: no such key), read with etcdctl.
/// The value of an etcd key, if it exists.
fn etcd_text(endpoint: &str, key: &str) -> Option<String> {
    let out = run_ok(
        Command::new(require_tool("etcdctl"))
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", endpoint, "get", "--print-value-only", key]),
    );
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!v.is_empty()).then_some(v)
}

fn etcd_get(endpoint: &str, key: &str) -> Option<serde_json::Value> {
    etcd_text(endpoint, key).map(|v| serde_json::from_str(&v).expect("owner value is JSON"))
}

/// The exports a gateway lists.
fn listed(gw: &Gateway) -> Vec<String> {
    let out = run_ok(Command::new(require_tool("nbdinfo")).args(["--list", &gw.unix_uri("")]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export=\"")?.strip_suffix("\":"))
        .map(str::to_string)
        .collect()
}

/// Two gateways on one cluster coordinated through etcd: every LUN has
/// exactly one owner; a gateway frozen mid-write (SIGSTOP, as a
/// partitioned host) loses its LUNs once its lease expires, the other takes
/// them over (breaking its RBD lock, which blocklists it), and the frozen
/// one's queued write is refused once it runs again.
#[test]
fn two_gateways_one_owner_failover_and_fencing() {
    let c = Cluster::shared();
    let etcd = lungate_tests::ceph::Etcd::start();
    let ep = etcd.endpoint.trim_start_matches("http://").to_string();
    let pool = c.pool("co");
    for n in ["v1", "v2", "v3"] {
        let out = lunctl(&[
            "create", "--pool", &pool, "--disk", "8M", "--memory", "4M", n,
        ]);
        assert_success("lunctl create", &out);
    }
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = work.path().join("gw.toml");
    std::fs::write(&cfg, "[coordinator]\nlease_ttl = 3\n").expect("config");
    let coord = format!("etcd://{ep}");
    let start = |n: &str| {
        Gateway::start(&[
            "--config",
            cfg.to_str().unwrap(),
            "--pool",
            &pool,
            "--coordinator",
            &coord,
            "--control",
            work.path().join(format!("{n}.sock")).to_str().unwrap(),
        ])
    };
    let (ga, gb) = std::thread::scope(|s| {
        let a = s.spawn(|| start("a"));
        let b = s.spawn(|| start("b"));
        (a.join().unwrap(), b.join().unwrap())
    });
    let all: Vec<String> = ["v1", "v2", "v3"]
        .iter()
        .map(|n| format!("{n}/disk0"))
        .collect();
    let owner_pid = |n: &str| {
        etcd_get(&ep, &format!("/lungate/luns/rbd/co/{n}.lun"))
            .and_then(|v| v["pid"].as_u64())
            .map(|p| p as u32)
    };
    // A moment for a claim loop to pick up what the first pass left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (la, lb) = (listed(&ga), listed(&gb));
        for e in &la {
            assert!(
                !lb.contains(e),
                "{e} served by both gateways: {la:?} {lb:?}"
            );
        }
        let mut both: Vec<String> = la.iter().chain(&lb).cloned().collect();
        both.sort();
        if both == all {
            for n in ["v1", "v2", "v3"] {
                let e = format!("{n}/disk0");
                let want = if la.contains(&e) { ga.pid() } else { gb.pid() };
                assert_eq!(owner_pid(n), Some(want), "etcd owner of {n}");
                let locks = c.rbd(&["lock", "ls", &format!("rbd/co/{n}.lun")]);
                assert_eq!(locks.matches("client.").count(), 1, "{locks}");
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every LUN served once: {la:?} {lb:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // lunctl finds each owner through etcd: the gateway, its PID and host,
    // and the control socket a command goes to.
    let etcd_url = format!("etcd://{ep}");
    let owner_of = |n: &str| {
        let out = lunctl(&[
            "--json",
            "--coordinator",
            &etcd_url,
            "owner",
            "--pool",
            &pool,
            n,
        ]);
        assert_success("lunctl owner", &out);
        let v = json_of(&out);
        assert_eq!(v["source"], "etcd", "{v}");
        v["owner"].clone()
    };
    for n in ["v1", "v2", "v3"] {
        let o = owner_of(n);
        let pid = o["pid"].as_u64().map(|p| p as u32);
        assert_eq!(pid, owner_pid(n), "{o}");
        let gw = if pid == Some(ga.pid()) { &ga } else { &gb };
        let control = format!("control unix {}", gw.control().display());
        let listen = o["listen"].as_array().expect("listeners");
        assert!(listen.iter().any(|l| l.as_str() == Some(&control)), "{o}");
        assert_eq!(o["host"], lungate_block::sys::hostname(), "{o}");
    }
    // A clone made on its owner's control API stays with that owner: the
    // other gateway may see the new image first, but never breaks a lock
    // that no former owner of the LUN holds.
    let (mut ga, mut gb) = (ga, gb);
    let a_owns_v2 = owner_pid("v2") == Some(ga.pid());
    let (o, other) = if a_owns_v2 { (&ga, &gb) } else { (&gb, &ga) };
    let sock = o.control();
    api(
        &sock,
        "POST",
        "/v1/luns/v2/snapshots",
        Some(json!({"name": "s"})),
        201,
    );
    api(
        &sock,
        "POST",
        "/v1/luns/v2/clone",
        Some(json!({"snapshot": "s", "name": "v2c"})),
        201,
    );
    // The maker claims the clone's key at one of its next passes (the
    // other gateway may hold it for a moment, fail to open and give it
    // back); meanwhile the clone never moves.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        assert!(listed(o).contains(&"v2c/disk0".to_string()));
        assert!(!listed(other).contains(&"v2c/disk0".to_string()));
        if owner_pid("v2c") == Some(o.pid()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the clone's etcd owner is {:?}, not {}",
            owner_pid("v2c"),
            o.pid()
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    // The clone is fenced like any LUN: its maker holds the image's lock
    // on the handle that serves it and recorded that client to fence.
    let locks = c.rbd(&["lock", "ls", "rbd/co/v2c.lun"]);
    assert_eq!(locks.matches("client.").count(), 1, "{locks}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while etcd_text(&ep, "/lungate/fence/rbd/co/v2c.lun").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no fence key for the clone: {}",
            o.stderr_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert!(
        !o.stderr_log()
            .contains("cannot tell this gateway's RBD lock owner"),
        "{}",
        o.stderr_log()
    );
    qemu_io_ok(
        &o.uri("v2c/disk0"),
        &["write -P 0x44 0 4k", "read -P 0x44 0 4k"],
    );
    ga.assert_running();
    gb.assert_running();
    let mut all = all;
    all.push("v2c/disk0".into());
    all.sort();

    // The gateway owning v1 is the one frozen.
    let (mut x, y) = if owner_pid("v1") == Some(ga.pid()) {
        (ga, gb)
    } else {
        (gb, ga)
    };

    // A client of x: one flushed write, then (x frozen) a second write.
    let script = work.path().join("writer.py");
    std::fs::write(
        &script,
        r#"
import sys
h.pwrite(b'\x11' * 65536, 0)
h.flush()
print("first", flush=True)
sys.stdin.readline()
try:
    h.pwrite(b'\x22' * 65536, 0)
    h.flush()
    print("second ok", flush=True)
except Exception as e:
    print("second failed:", e, flush=True)
"#,
    )
    .unwrap();
    let mut writer = nbdsh()
        .args([
            "-u",
            &x.unix_uri("v1/disk0"),
            &format!("--command=exec(open('{}').read())", script.display()),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("nbdsh");
    let mut out = std::io::BufReader::new(writer.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "first");
    x.freeze();
    std::io::Write::write_all(writer.stdin.as_mut().unwrap(), b"go\n").unwrap();

    // y takes v1 over once x's lease expires, fencing x first.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !listed(&y).contains(&"v1/disk0".to_string()) {
        assert!(
            std::time::Instant::now() < deadline,
            "no takeover: {}",
            y.stderr_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(owner_pid("v1"), Some(y.pid()));
    // etcd, not the frozen gateway's lock or record, tells lunctl where
    // v1 lives now; a snapshot command goes to the new owner's control API.
    assert_eq!(owner_of("v1")["pid"].as_u64(), Some(u64::from(y.pid())));
    let snap = lunctl(&[
        "--coordinator",
        &etcd_url,
        "snapshot",
        "--pool",
        &pool,
        "v1",
        "after-takeover",
    ]);
    assert_success("lunctl snapshot through etcd's owner", &snap);
    let said = String::from_utf8_lossy(&snap.stderr);
    assert!(said.contains("the owner in etcd"), "{said}");
    let snaps = api(&y.control(), "GET", "/v1/luns/v1/snapshots", None, 200);
    assert!(snaps.to_string().contains("after-takeover"), "{snaps}");
    assert!(y
        .stderr_log()
        .contains("breaking a former owner's RBD lock"));
    let v1 = y.uri("v1/disk0");
    let first = qemu_io(&v1, &["read -P 0x11 0 64k"]);
    if !first.status.success() || String::from_utf8_lossy(&first.stdout).contains("fail") {
        // What the new owner reads instead: the old owner's second write
        // (0x22, sent while it was frozen) or older bytes.
        let seen = qemu_io(&v1, &["read -v 0 16", "read -v 65520 16"]);
        panic!(
            "the new owner does not read the flushed 0x11: {}\n{}\n--- fenced gateway ---\n{}\n--- new owner ---\n{}",
            String::from_utf8_lossy(&first.stdout),
            String::from_utf8_lossy(&seen.stdout),
            x.stderr_log(),
            y.stderr_log()
        );
    }
    qemu_io_ok(&v1, &["write -P 0x33 0 64k"]);

    // x runs again: its queued write must not land, and it stops serving.
    x.send_signal(libc::SIGCONT);
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    if !line.starts_with("second failed") {
        // What the new owner reads at the block both wrote, and what each
        // gateway logged, to tell a write that landed from one only
        // answered.
        let now = qemu_io(&v1, &["read -P 0x33 0 64k"]);
        panic!(
            "the fenced gateway's write: {line:?}; the new owner's read of 0x33: {}\n--- fenced gateway ---\n{}\n--- new owner ---\n{}",
            String::from_utf8_lossy(&now.stdout),
            x.stderr_log(),
            y.stderr_log()
        );
    }
    let _ = writer.wait();
    let status = x
        .wait_exit(std::time::Duration::from_secs(30))
        .expect("the fenced gateway exits");
    assert_eq!(status.code(), Some(75), "{}", x.stderr_log());
    qemu_io_ok(&v1, &["read -P 0x33 0 64k"]);
    // every LUN is y's now
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut l = listed(&y);
        l.sort();
        if l == all {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "y serves only {l:?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // a clean stop gives the lease (and every LUN key) back at once
    let ypid = y.pid();
    y.stop_ok();
    for n in ["v1", "v2", "v3", "v2c"] {
        assert_ne!(owner_pid(n), Some(ypid));
        assert_eq!(owner_pid(n), None, "{n} still owned after a clean stop");
    }
    assert!(owner_of("v1").is_null(), "v1 owned after a clean stop");
    drop(etcd);
}
