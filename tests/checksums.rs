//! Data checksums end to end: a VM LUN made with `lunctl create
//! --checksums`, written through the gateway by qemu-io, gets one byte of
//! a data cluster changed behind the gateway's back. The NBD read of it
//! fails with EIO (the guest never sees the changed bytes), and `lunctl
//! scrub` (through the gateway's control API while it serves the LUN, and
//! on the files after it stopped) names the cluster, the views that read
//! it and the snapshot that still holds an intact version, exiting 5.

use std::path::{Path, PathBuf};
use std::process::Command;

use lungate_tests::*;

const CLUSTER: usize = 64 << 10;

/// The one cluster-aligned cluster of the layers of `lun` filled with
/// `byte`: (file, offset).
fn find_cluster(lun: &Path, byte: u8) -> (PathBuf, u64) {
    let dir = lun.with_extension("layers");
    let mut hits = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "delta") {
            continue;
        }
        let b = std::fs::read(&p).unwrap();
        for (i, c) in b.chunks(CLUSTER).enumerate() {
            if c.len() == CLUSTER && c.iter().all(|&x| x == byte) {
                hits.push((p.clone(), (i * CLUSTER) as u64));
            }
        }
    }
    assert_eq!(
        hits.len(),
        1,
        "clusters of {byte:#x} in {}: {hits:?}",
        dir.display()
    );
    hits.pop().unwrap()
}

fn flip(file: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, at).unwrap();
}

/// `lunctl scrub --json`: (exit code, the report document).
fn scrub(pool: &Pool, name: &str) -> (i32, serde_json::Value) {
    let out = Command::new(bin("lunctl"))
        .args(["scrub", name, "--pool", pool.arg(), "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // Progress events (one JSON object per line) come first, then the
    // report: read the output as a stream of JSON documents.
    let doc = serde_json::Deserializer::from_str(&text)
        .into_iter::<serde_json::Value>()
        .filter_map(Result::ok)
        .find(|v| v.get("luns").is_some())
        .unwrap_or_else(|| {
            panic!(
                "no scrub report in {text:?} (stderr {:?})",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (out.status.code().unwrap_or(-1), doc)
}

#[test]
fn a_flipped_byte_fails_the_nbd_read_and_scrub_names_it() {
    let pool = Pool::new();
    lunctl(&[
        "create",
        "vm",
        "--pool",
        pool.arg(),
        "--disk",
        "16M",
        "--memory",
        "16M",
        "--checksums",
    ]);
    let lun = pool.path().join("vm.lun");
    let disk0 = disk_regions(&lun)[0].0;

    let gw = Gateway::start(&["--pool", pool.arg()]);
    let uri = gw.uri("vm/disk0");
    // Version A of the cluster at disk offset 1 MiB, snapshot s1; version
    // B, snapshot s2 (the live layer reads B through s2's layer).
    qemu_io_ok(
        &uri,
        &["write -P 0x5a 1M 64k", "write -P 0x33 4M 64k", "flush"],
    );
    lunctl(&["snapshot", "vm", "s1", "--pool", pool.arg()]);
    qemu_io_ok(&uri, &["write -P 0xc4 1M 64k", "flush"]);
    lunctl(&["snapshot", "vm", "s2", "--pool", pool.arg()]);

    let (code, clean) = scrub(&pool, "vm");
    assert_eq!(code, 0, "{clean}");
    let l = &clean["luns"][0];
    assert_eq!(l["errors"].as_array().unwrap().len(), 0, "{clean}");
    assert!(l["clusters_checked"].as_u64().unwrap() >= 3, "{clean}");
    assert_eq!(l["clusters_unsummed"], 0, "{clean}");

    let (file, at) = find_cluster(&lun, 0xc4);
    flip(&file, at + 4000);

    // The guest's read fails; the neighbouring cluster still reads.
    let out = qemu_io(&uri, &["read -P 0xc4 1M 4k"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Input/output error"),
        "read of a corrupted cluster: {text}"
    );
    assert!(!text.contains("read 4096/4096"), "{text}");
    qemu_io_ok(&uri, &["read -P 0x33 4M 64k", "read -P 0 2M 64k"]);

    let check = |doc: &serde_json::Value| {
        let errs = doc["luns"][0]["errors"].as_array().unwrap();
        assert_eq!(errs.len(), 1, "{doc}");
        let e = &errs[0];
        assert_eq!(e["offset"].as_u64().unwrap(), disk0 + (1 << 20), "{doc}");
        assert_eq!(e["snapshot"], "s2", "{doc}");
        let mut affected: Vec<&str> = e["affected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        affected.sort();
        assert_eq!(affected, ["live", "s2"], "{doc}");
        assert_eq!(e["intact_in"], serde_json::json!(["s1"]), "{doc}");
    };
    // Through the gateway (it holds the LUN) ...
    let (code, doc) = scrub(&pool, "vm");
    assert_eq!(code, 5, "scrub found damage but exited {code}: {doc}");
    check(&doc);
    gw.stop_ok();
    // ... and on the files.
    let (code, doc) = scrub(&pool, "vm");
    assert_eq!(code, 5, "{doc}");
    check(&doc);
}
