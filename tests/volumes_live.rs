//! Snapshots, reverts and clones of served LUNs, seen through real NBD
//! clients (qemu-io, qemu-img, nbdinfo), on both layouts, and while clients
//! keep writing and verifying (the live switch).

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
fn snapshot_revert_clone_through_nbd_clients_on_both_layouts() {
    let pool = Pool::both_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let sock = gw.control();
    for lun in ["off", "trunc"] {
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
        switches += 2;
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
