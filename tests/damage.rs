//! Damaged volume metadata end to end: a LUN whose layers lost their
//! manifest, or whose live layer was truncated, is not served (the gateway
//! says why and serves the pool's other LUNs), keeps every file, is listed
//! as damaged by the scanner with the reason, and `lunctl repair` brings
//! it back with every flushed byte, checked by qemu-io through the gateway.

use std::path::{Path, PathBuf};
use std::process::Command;

use lungate_tests::*;

fn deltas(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "delta"))
        .collect();
    v.sort();
    v
}

fn exports(gw: &Gateway) -> Vec<String> {
    let ex = api(&gw.control(), "GET", "/v1/exports", None, 200);
    ex.as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

fn damaged_reason(pool: &Path, lun: &Path) -> String {
    let out = lunctl(&["scan", pool.to_str().unwrap(), "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = r["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| {
            d["path"]
                .as_str()
                .unwrap()
                .ends_with(lun.file_name().unwrap().to_str().unwrap())
        })
        .unwrap_or_else(|| panic!("{} not listed as damaged: {r}", lun.display()));
    d["reason"].as_str().unwrap().to_string()
}

#[test]
fn a_lun_whose_layers_lost_their_manifest_is_refused_kept_and_repaired() {
    let mut pool = Pool::new();
    pool.add("vm", "offset", &["64M"], "16M");
    pool.add("ok", "offset", &["16M"], "16M");
    let lun = pool.lun("vm").path.clone();
    let dir = lun.with_extension("layers");

    let gw = Gateway::start(&["--pool", pool.arg()]);
    let uri = gw.uri("vm/disk0");
    qemu_io_ok(&uri, &["write -P 0x41 0 1M"]);
    lunctl(&["snapshot", "vm", "s1", "--pool", pool.arg()]);
    qemu_io_ok(&uri, &["write -P 0x42 1M 1M", "flush"]);
    lunctl(&["snapshot", "vm", "s2", "--pool", pool.arg()]);
    qemu_io_ok(&uri, &["write -P 0x43 2M 64k", "flush"]);
    gw.stop_ok();
    let before = deltas(&dir);
    assert_eq!(before.len(), 2, "{before:?}");

    std::fs::remove_file(dir.join("manifest.0")).unwrap();
    std::fs::remove_file(dir.join("manifest.1")).unwrap();

    let gw = Gateway::start(&["--pool", pool.arg()]);
    let uri = gw.uri("vm/disk0");
    let log = gw.stderr_log();
    assert!(log.contains("skipping LUN"), "{log}");
    assert!(log.contains("no manifest"), "{log}");
    let names = exports(&gw);
    assert_eq!(
        names,
        vec!["ok/disk0".to_string()],
        "only the sound LUN is served"
    );
    let out = run_timeout(
        Command::new(require_tool("qemu-io"))
            .args(["-f", "raw", "-c", "read 0 4k"])
            .arg(&uri),
        std::time::Duration::from_secs(60),
    );
    assert!(!out.status.success(), "the damaged LUN's export answered");
    gw.stop_ok();
    assert_eq!(deltas(&dir), before, "a layer file was removed");

    let reason = damaged_reason(pool.path(), &lun);
    assert!(reason.contains("no manifest"), "{reason}");
    assert!(reason.contains("lunctl repair"), "{reason}");

    let out = lunctl(&["repair", "vm", "--pool", pool.arg()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rebuilt"), "{text}");
    assert!(text.contains("s2"), "{text}");

    let gw = Gateway::start(&["--pool", pool.arg()]);
    let uri = gw.uri("vm/disk0");
    qemu_io_ok(
        &uri,
        &[
            "read -P 0x41 0 1M",
            "read -P 0x42 1M 1M",
            "read -P 0x43 2M 64k",
        ],
    );
    let snaps = lunctl(&["snapshots", "vm", "--pool", pool.arg(), "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&snaps.stdout).unwrap();
    let names: Vec<&str> = s
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"s2") && names.contains(&"recovered-base"),
        "{s}"
    );
    // Reverting to the rebuilt snapshot gives its data back.
    lunctl(&["revert", "vm", "s2", "--pool", pool.arg()]);
    qemu_io_ok(&uri, &["read -P 0x42 1M 1M", "read -P 0 2M 64k"]);
    gw.stop_ok();
}

#[test]
fn a_truncated_live_layer_is_refused_not_served_as_older_data() {
    let mut pool = Pool::new();
    pool.add("vm", "truncate", &["32M"], "16M");
    let lun = pool.lun("vm").path.clone();
    let dir = lun.with_extension("layers");
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let uri = gw.uri("vm/disk0");
    qemu_io_ok(&uri, &["write -P 0x51 0 1M"]);
    lunctl(&["snapshot", "vm", "s1", "--pool", pool.arg()]);
    qemu_io_ok(&uri, &["write -P 0x52 0 1M", "flush"]);
    gw.stop_ok();
    let live = deltas(&dir)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&live).unwrap();
    f.set_len(4096).unwrap();
    drop(f);

    let gw = Gateway::start(&["--pool", pool.arg()]);
    let log = gw.stderr_log();
    assert!(log.contains("truncated"), "{log}");
    assert!(exports(&gw).is_empty(), "the truncated LUN is served");
    gw.stop_ok();
    let reason = damaged_reason(pool.path(), &lun);
    assert!(reason.contains("truncated"), "{reason}");
    assert_eq!(
        std::fs::metadata(&live).unwrap().len(),
        4096,
        "the layer was changed"
    );
}
