//! Snapshots, reverts and clones of served LUNs, seen through real NBD
//! clients (qemu-io, qemu-img, nbdinfo, nbdcopy), on every layout, and
//! while clients keep writing and verifying (the live switch).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use lungate_tests::*;
use serde_json::json;

/// `nbdinfo --map` as `(offset, length, is_hole)` runs.
fn map(uri: &str) -> Vec<(u64, u64, bool)> {
    let out = run_ok(std::process::Command::new(require_tool("nbdinfo")).args(["--map", uri]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 {
                return None;
            }
            Some((
                f[0].parse().ok()?,
                f[1].parse().ok()?,
                f[3].contains("hole"),
            ))
        })
        .collect()
}

/// Whether `[off, off+len)` is entirely data (`false`) or hole (`true`) in `m`.
fn all(m: &[(u64, u64, bool)], off: u64, len: u64, hole: bool) -> bool {
    m.iter()
        .filter(|(o, l, _)| *o < off + len && o + l > off)
        .all(|(_, _, h)| *h == hole)
}

#[test]
fn snapshot_revert_clone_through_nbd_clients_on_all_layouts() {
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let sock = gw.control();
    for lun in ["off", "trunc", "algn"] {
        let info = pool.lun(lun);
        for (i, &size) in info.disk_sizes.iter().enumerate() {
            let uri = gw.uri(&info.export(i));
            let a = 0xa0 + i as u8;
            qemu_io_ok(
                &uri,
                &[
                    &format!("write -z -u 0 {size}"),
                    &format!("write -P {a} 0 256k"),
                    &format!("write -P {a} 3145728 12288"),
                    &format!("write -P {a} {} 65536", size - 65536),
                ],
            );
        }
        api(
            &sock,
            "POST",
            &format!("/v1/luns/{lun}/snapshots"),
            Some(json!({"name": "base"})),
            201,
        );
        for (i, &size) in info.disk_sizes.iter().enumerate() {
            let uri = gw.uri(&info.export(i));
            let (a, b) = (0xa0 + i as u8, 0xb0 + i as u8);
            qemu_io_ok(
                &uri,
                &[
                    &format!("write -P {b} 0 64k"),
                    "write -z -u 3145728 12288",
                    &format!("write -P {b} 1048576 4096"),
                    &format!("read -P {b} 0 64k"),
                    &format!("read -P {a} 64k 192k"),
                    "read -P 0 3145728 12288",
                    &format!("read -P {a} {} 65536", size - 65536),
                ],
            );
            // the merged chain: data where any layer has data, holes where
            // the live layer zeroed or nothing was ever written
            let m = map(&uri);
            assert!(all(&m, 0, 256 << 10, false), "{lun} disk{i}: {m:?}");
            assert!(all(&m, 1 << 20, 4096, false), "{m:?}");
            assert!(all(&m, 2 << 20, 1 << 20, true), "{m:?}");
            assert!(all(&m, size - 65536, 65536, false), "{m:?}");
        }
        let c = api(
            &sock,
            "POST",
            &format!("/v1/luns/{lun}/clone"),
            Some(json!({"snapshot": "base", "name": format!("{lun}-c")})),
            201,
        );
        assert_eq!(
            c["exports"].as_array().unwrap().len(),
            info.disk_sizes.len()
        );
        api(
            &sock,
            "POST",
            &format!("/v1/luns/{lun}/revert"),
            Some(json!({"snapshot": "base"})),
            200,
        );
        for (i, &size) in info.disk_sizes.iter().enumerate() {
            let a = 0xa0 + i as u8;
            let want = [
                format!("read -P {a} 0 256k"),
                format!("read -P {a} 3145728 12288"),
                "read -P 0 1048576 4096".to_string(),
                format!("read -P {a} {} 65536", size - 65536),
            ];
            let want: Vec<&str> = want.iter().map(|s| s.as_str()).collect();
            let src = gw.uri(&info.export(i));
            let clone = gw.uri(&format!("{lun}-c/disk{i}"));
            qemu_io_ok(&src, &want);
            qemu_io_ok(&clone, &want);
            let m = map(&clone);
            assert!(all(&m, 0, 256 << 10, false), "clone {lun} disk{i}: {m:?}");
            assert!(all(&m, 1 << 20, 1 << 20, true), "{m:?}");
            let out = run_ok(
                std::process::Command::new(require_tool("qemu-img"))
                    .args(["compare", "-f", "raw", "-F", "raw", &src, &clone]),
            );
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("identical"),
                "{out:?}"
            );
            // the clone is its own volume
            qemu_io_ok(&clone, &["write -P 0xcc 0 4k"]);
            qemu_io_ok(&src, &[&format!("read -P {a} 0 4k")]);
        }
    }
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// `sfdisk --dump` of a file, without its `device:` line (the path).
fn sfdisk_dump(path: &std::path::Path) -> String {
    let out = run_ok(
        std::process::Command::new(require_tool("sfdisk"))
            .arg("--dump")
            .arg(path),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("device:"))
        .map(|l| {
            // Partition lines start with the device path too.
            l.split_once(" : ")
                .map_or(l.to_string(), |(_, rest)| rest.to_string())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A guest partition table of `len` bytes with one partition named `name`,
/// written by sfdisk into a scratch image.
fn guest_table(dir: &std::path::Path, name: &str, len: u64) -> std::path::PathBuf {
    use std::io::Write;
    let img = dir.join(format!("{name}.img"));
    std::fs::File::create(&img).unwrap().set_len(len).unwrap();
    let mut sf = std::process::Command::new(require_tool("sfdisk"))
        .args(["-q", "--no-reread"])
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run sfdisk");
    sf.stdin
        .take()
        .unwrap()
        .write_all(format!("label: gpt\nstart=2048, size=8192, name={name}\n").as_bytes())
        .unwrap();
    assert!(sf.wait().unwrap().success(), "sfdisk {name}");
    img
}

/// The guest's own partition table on an aligned LUN (in the shadowed
/// first MiB, kept in the state region) is part of the VM: a snapshot
/// keeps it, a revert brings it back, a clone starts with it, while the
/// LUN file's own GPT at LBA 0 never changes. Seen with sfdisk on what
/// qemu-img copies out of the exports, and on the LUN file.
#[test]
fn aligned_guest_partition_table_is_snapshotted_reverted_and_cloned_with_the_vm() {
    let pool = Pool::all_layouts();
    let info = pool.lun("algn");
    let size = info.disk_sizes[0];
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let sock = gw.control();
    let uri = gw.uri(&info.export(0));
    let dir = tempfile::tempdir().unwrap();
    let host = sfdisk_dump(&info.path);
    assert!(host.contains("lungate-disk0"), "{host}");
    let copy_out = |uri: &str, tag: &str| {
        let out = dir.path().join(format!("{tag}.raw"));
        run_ok(
            std::process::Command::new(require_tool("qemu-img"))
                .args(["convert", "-f", "raw", "-O", "raw", uri])
                .arg(&out),
        );
        let d = sfdisk_dump(&out);
        std::fs::remove_file(&out).ok();
        d
    };
    let nbdcopy = require_tool("nbdcopy");
    for name in ["first", "second"] {
        let img = guest_table(dir.path(), name, size);
        run_ok(std::process::Command::new(&nbdcopy).arg(&img).arg(&uri));
        std::fs::remove_file(&img).ok();
        if name == "first" {
            api(
                &sock,
                "POST",
                "/v1/luns/algn/snapshots",
                Some(json!({"name": "parted"})),
                201,
            );
        }
    }
    let now = copy_out(&uri, "second");
    assert!(
        now.contains("name=\"second\"") && !now.contains("name=\"first\""),
        "{now}"
    );
    api(
        &sock,
        "POST",
        "/v1/luns/algn/clone",
        Some(json!({"snapshot": "parted", "name": "algn-c"})),
        201,
    );
    api(
        &sock,
        "POST",
        "/v1/luns/algn/revert",
        Some(json!({"snapshot": "parted"})),
        200,
    );
    for (what, u) in [("reverted", uri.clone()), ("clone", gw.uri("algn-c/disk0"))] {
        let d = copy_out(&u, what);
        assert!(
            d.contains("name=\"first\"") && !d.contains("name=\"second\""),
            "{what}: {d}"
        );
        assert!(!d.contains("lungate"), "{what} shows the host's GPT: {d}");
    }
    // The host's view of both LUN files: lungate's GPT, never the guest's.
    assert_eq!(sfdisk_dump(&info.path), host, "the LUN's own GPT changed");
    let clone = sfdisk_dump(&pool.path().join("algn-c.lun"));
    assert!(
        clone.contains("lungate-disk0") && !clone.contains("name=\"first\""),
        "{clone}"
    );
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// One client: batches of write-then-verify on its own range until `stop`.
fn writer(uri: String, base: u64, fixed: Option<u8>, stop: Arc<AtomicBool>, ops: Arc<AtomicU64>) {
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let mut cmds = Vec::new();
        for k in 0..32u64 {
            let p = fixed.unwrap_or(((round * 31 + k * 7) % 250 + 1) as u8);
            let off = base + (k % 16) * 65536;
            cmds.push(format!("write -P {p} {off} 64k"));
            cmds.push(format!("read -P {p} {off} 64k"));
        }
        cmds.push("flush".into());
        let c: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
        qemu_io_ok(&uri, &c);
        ops.fetch_add(65, Ordering::Relaxed);
    }
}

#[test]
fn live_switches_under_continuous_io_lose_and_fail_nothing() {
    let mut pool = Pool::new();
    pool.add("la", "offset", &["64M"], "16M");
    pool.add("lb", "truncate", &["32M"], "16M");
    // Aligned: one writer's 64 KiB blocks straddle the end of the shadowed
    // first MiB, so split requests cross the gate during every switch.
    pool.add("lc", "aligned", &["32M"], "16M");
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let sock = gw.control();
    // B's writers always write the bytes B's snapshot holds, so a revert
    // under them must never make a verify fail.
    qemu_io_ok(&gw.uri("lb/disk0"), &["write -P 0x5b 0 4M"]);
    api(
        &sock,
        "POST",
        "/v1/luns/lb/snapshots",
        Some(json!({"name": "b0"})),
        201,
    );

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for (uri, base, fixed) in [
        (gw.uri("la/disk0"), 0u64, None),
        (gw.unix_uri("la/disk0"), 8 << 20, None),
        (gw.uri("la/disk0"), 16 << 20, None),
        (gw.uri("lb/disk0"), 0, Some(0x5b)),
        (gw.unix_uri("lb/disk0"), 2 << 20, Some(0x5b)),
        // [480K, 1504K): eight blocks in the shadow, one across its end.
        (gw.uri("lc/disk0"), (480 << 10), None),
        (gw.unix_uri("lc/disk0"), 2 << 20, None),
    ] {
        let (stop, ops) = (stop.clone(), ops.clone());
        workers.push(thread::spawn(move || writer(uri, base, fixed, stop, ops)));
    }

    let start = Instant::now();
    let mut switches = 1; // b0
    let mut clones = Vec::new();
    let mut k = 0;
    while start.elapsed() < Duration::from_secs(6) {
        thread::sleep(Duration::from_millis(250));
        k += 1;
        let s = api(
            &sock,
            "POST",
            "/v1/luns/la/snapshots",
            Some(json!({"name": format!("s{k}")})),
            201,
        );
        assert!(s["pause_us"].as_u64().is_some());
        api(
            &sock,
            "POST",
            "/v1/luns/lb/revert",
            Some(json!({"snapshot": "b0"})),
            200,
        );
        api(
            &sock,
            "POST",
            "/v1/luns/lc/snapshots",
            Some(json!({"name": format!("c{k}")})),
            201,
        );
        switches += 3;
        if k % 3 == 0 {
            let name = format!("la-c{k}");
            api(
                &sock,
                "POST",
                "/v1/luns/la/clone",
                Some(json!({"snapshot": format!("s{k}"), "name": name})),
                201,
            );
            // A clone reads a frozen snapshot: it pauses no one.
            clones.push(name);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("a client saw an I/O error or a wrong byte");
    }
    let st = api(&sock, "GET", "/v1/stats", None, 200);
    eprintln!(
        "{} client ops, {switches} switches: {}",
        ops.load(Ordering::Relaxed),
        st["switch"]
    );
    assert_eq!(st["switch"]["count"], switches, "{st}");
    assert!(
        st["switch"]["held_requests"].as_u64().unwrap() > 0,
        "no request was ever parked: the test did not exercise the holding queue: {st}"
    );
    for e in st["exports"].as_array().unwrap() {
        assert_eq!(e["errors"], 0, "{e}");
    }
    for c in &clones {
        qemu_io_ok(&gw.uri(&format!("{c}/disk0")), &["read 0 1M"]);
    }
    qemu_io_ok(&gw.uri("lb/disk0"), &["read -P 0x5b 0 4M"]);
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// A loop device over a sparse file of `len` bytes, made for one test and
/// detached (by the name `losetup` gave it) when dropped.
struct LoopDevice {
    dev: String,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn new(len: u64) -> LoopDevice {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("san-lun.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(len)
            .unwrap();
        let out = run_ok(
            std::process::Command::new(require_tool("losetup"))
                .args(["-f", "--show"])
                .arg(&backing),
        );
        LoopDevice {
            dev: String::from_utf8(out.stdout).unwrap().trim().to_string(),
            _dir: dir,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

/// A LUN on a block device (a SAN LUN; here a loop device) linked into a
/// pool with `lunctl create --device`: served, snapshotted while served,
/// written, cloned and reverted through NBD clients like a LUN file, its
/// layers kept in the pool directory beside the link. Reached by its /dev
/// name instead, a snapshot is refused with what to do.
#[test]
fn a_block_device_lun_linked_into_a_pool_is_snapshotted_cloned_and_reverted() {
    let dev = LoopDevice::new(96 << 20);
    let pool = Pool::new();
    let out = lunctl(&[
        "create",
        "san",
        "--pool",
        pool.arg(),
        "--device",
        &dev.dev,
        "--disk",
        "32M",
        "--memory",
        "4M",
    ]);
    assert_success("lunctl create --device", &out);
    let link = pool.path().join("san.lun");
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    // Reached under /dev it cannot keep layers: refused, nothing made.
    let out = run_timeout(
        std::process::Command::new(bin("lunctl")).args(["snapshot", &dev.dev, "nope"]),
        CMD_TIMEOUT,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device") && err.contains("pool"), "{err}");

    let gw = Gateway::start(&["--pool", pool.arg()]);
    let sock = gw.control();
    let uri = gw.uri("san/disk0");
    qemu_io_ok(&uri, &["write -P 0xa1 0 256k", "write -P 0xa2 16M 64k"]);
    api(
        &sock,
        "POST",
        "/v1/luns/san/snapshots",
        Some(json!({"name": "base"})),
        201,
    );
    assert!(
        pool.path().join("san.layers").is_dir(),
        "the layers live in the pool"
    );
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xb1 0 64k",
            "read -P 0xb1 0 64k",
            "read -P 0xa1 64k 192k",
        ],
    );
    api(
        &sock,
        "POST",
        "/v1/luns/san/clone",
        Some(json!({"snapshot": "base", "name": "san-c"})),
        201,
    );
    api(
        &sock,
        "POST",
        "/v1/luns/san/revert",
        Some(json!({"snapshot": "base"})),
        200,
    );
    let want = [
        "read -P 0xa1 0 256k",
        "read -P 0xa2 16M 64k",
        "read -P 0 1M 64k",
    ];
    qemu_io_ok(&uri, &want);
    qemu_io_ok(&gw.uri("san-c/disk0"), &want);
    // The scanner finds it in the pool with its tree and its clone.
    let out = lunctl(&["scan", "--json", pool.arg()]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vms = r["vms"].as_array().unwrap();
    assert!(
        vms.iter().any(|v| v["name"] == "san") && vms.iter().any(|v| v["name"] == "san-c"),
        "{r}"
    );
    gw.stop_ok();
    // Delete: the clone first (it reads the device's snapshot), then the
    // LUN: its label wiped, the link and the layers gone.
    for n in ["san-c", "san"] {
        let p = pool.path().join(format!("{n}.lun"));
        assert_success(
            "lunctl delete",
            &lunctl(&["delete", p.to_str().unwrap(), "--yes"]),
        );
    }
    assert!(link.symlink_metadata().is_err(), "the link is gone");
    assert!(!pool.path().join("san.layers").exists());
    let out = lunctl(&["scan", "--json", &dev.dev]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["vms"].as_array().unwrap().is_empty(), "{r}");
}
