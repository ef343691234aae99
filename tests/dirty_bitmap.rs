//! The changed-blocks meta context: `qemu:dirty-bitmap:SNAP` on every
//! export, for every snapshot of its LUN, read by the clients incremental
//! backups use (nbdinfo `--map=`, `qemu-img map` with `x-dirty-bitmap`,
//! libnbd through nbdsh), on all three layouts (offset, truncate and the
//! aligned layout's shadowed first MiB).
//!
//! The oracle is independent of the gateway: each write's export range is
//! mapped to LUN offsets through the LUN's own disk view (what
//! `lun_manager` says), rounded out to the volume's clusters, and every
//! export sector whose LUN cluster was touched must be reported dirty and
//! every other one clean.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use lungate_tests::*;
use serde_json::json;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// The oracle's resolution: every write below is sector aligned.
const SECTOR: u64 = 512;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The disk's view and the volume's cluster size, from the LUN itself.
struct Geometry {
    view: lungate_block::region::View,
    cluster: u64,
}

fn geometry(lun: &Path, disk: u32) -> Geometry {
    let l = lun_manager::Lun::open(lun, lun_manager::Access::ReadOnly)
        .unwrap_or_else(|e| panic!("open {}: {e}", lun.display()));
    Geometry {
        view: l.disk_view(disk).expect("disk view"),
        cluster: l.volume().cluster_size(),
    }
}

impl Geometry {
    /// The LUN clusters `[offset, offset + len)` of the disk lands in.
    fn clusters(&self, offset: u64, len: u64) -> Vec<u64> {
        let mut v = Vec::new();
        for p in self
            .view
            .pieces(offset, len)
            .expect("write inside the disk")
            .iter()
        {
            v.extend(p.at / self.cluster..(p.at + p.len).div_ceil(self.cluster));
        }
        v
    }

    /// Which sectors of the disk lie in `touched` clusters, as merged
    /// `(offset, length)` ranges.
    fn expected(&self, touched: &BTreeSet<u64>) -> Vec<(u64, u64)> {
        let size = self.view.size();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut s = 0;
        while s < size {
            let at = self.view.pieces(s, SECTOR).expect("sector")[0].at;
            if touched.contains(&(at / self.cluster)) {
                match out.last_mut() {
                    Some((o, l)) if *o + *l == s => *l += SECTOR,
                    _ => out.push((s, SECTOR)),
                }
            }
            s += SECTOR;
        }
        out
    }
}

/// `nbdinfo --map=CONTEXT --json URI` as `(offset, length, type)`.
fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let out = run_ok(Command::new(require_tool("nbdinfo")).args([
        &format!("--map={context}"),
        "--json",
        uri,
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --map --json: not JSON ({e}):\n{}", text(&out)));
    v.as_array()
        .unwrap_or_else(|| panic!("nbdinfo --map --json is not an array: {v}"))
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
                e["type"].as_u64().expect("type"),
            )
        })
        .collect()
}

/// The dirty `(offset, length)` ranges of a map whose entries cover
/// `[0, size)` exactly, with flag 1 = dirty and no other flag.
fn dirty_of(m: &[(u64, u64, u64)], size: u64, what: &str) -> Vec<(u64, u64)> {
    let mut pos = 0;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(o, l, t) in m {
        assert_eq!(o, pos, "{what}: entries are contiguous: {m:?}");
        assert!(t <= 1, "{what}: only the dirty flag is defined: {m:?}");
        if t == 1 {
            match out.last_mut() {
                Some((lo, ll)) if *lo + *ll == o => *ll += l,
                _ => out.push((o, l)),
            }
        }
        pos += l;
    }
    assert_eq!(pos, size, "{what}: the map covers the export: {m:?}");
    out
}

/// `qemu-img map --output=json` of the export through qemu's NBD client
/// reading `context` in place of base:allocation (`x-dirty-bitmap`), as
/// `(start, length, data, zero)`.
fn qemu_img_dirty_map(gw: &Gateway, export: &str, context: &str) -> Vec<(u64, u64, bool, bool)> {
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={export},x-dirty-bitmap={context}",
        gw.port()
    );
    let out = run_ok(Command::new(require_tool("qemu-img")).args([
        "map",
        "--output=json",
        "--image-opts",
        &opts,
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("qemu-img map: not JSON ({e}):\n{}", text(&out)));
    v.as_array()
        .unwrap_or_else(|| panic!("qemu-img map is not an array: {v}"))
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
                e["data"].as_bool().expect("data"),
                e["zero"].as_bool().expect("zero"),
            )
        })
        .collect()
}

/// One disk of the test: its export, size and geometry.
struct Disk {
    export: String,
    size: u64,
    geo: Geometry,
}

fn snapshot(gw: &Gateway, lun: &str, name: &str) {
    api(
        &gw.control(),
        "POST",
        &format!("/v1/luns/{lun}/snapshots"),
        Some(json!({ "name": name })),
        201,
    );
}

/// What the snapshot-to-now writes of disk `i` are: a sector inside the
/// first cluster (in the aligned layout: inside the shadowed MiB), a trim
/// of data the snapshot holds, a two-cluster write, an unaligned sector
/// and the disk's last 4 KiB; placed differently per disk so that one
/// disk's changes showing on the other would be seen.
fn writes_after_s1(i: u64, size: u64) -> Vec<(String, u64, u64)> {
    let two = (6 + i) * MIB;
    vec![
        ("write -P 0xb1 4096 512".into(), 4096, 512),
        ("discard 512k 64k".into(), 512 * KIB, 64 * KIB),
        (format!("write -P 0xb2 {two} 128k"), two, 128 * KIB),
        ("write -P 0xb3 3149824 512".into(), 3 * MIB + 4096, 512),
        (
            format!("write -P 0xb4 {} 4096", size - 4096),
            size - 4096,
            4096,
        ),
    ]
}

#[test]
fn dirty_bitmaps_report_exactly_what_changed_since_each_snapshot_on_every_layout() {
    let pool = Pool::all_layouts();
    let mut disks = Vec::new();
    for l in &pool.luns {
        for (i, &size) in l.disk_sizes.iter().enumerate() {
            disks.push(Disk {
                export: l.export(i),
                size,
                geo: geometry(&l.path, i as u32),
            });
        }
    }
    let gw = Gateway::start(&["--pool", pool.arg()]);

    // Before any snapshot: base data everywhere a later write goes.
    for d in &disks {
        let uri = gw.uri(&d.export);
        qemu_io_ok(&uri, &["write -P 0xa0 0 1M", "write -P 0xa1 2M 8M"]);
        let info = run_ok(Command::new(require_tool("nbdinfo")).args(["--json", &uri]));
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("nbdinfo --json");
        let contexts = &v["exports"][0]["contexts"];
        assert_eq!(
            contexts,
            &json!(["base:allocation"]),
            "{}: no snapshot, no dirty bitmap: {v}",
            d.export
        );
    }
    for lun in ["off", "trunc", "algn"] {
        snapshot(&gw, lun, "s1");
    }
    let mut since_s1: Vec<BTreeSet<u64>> = Vec::new();
    for d in &disks {
        let i: u64 = d.export.ends_with("disk1").into();
        let uri = gw.uri(&d.export);
        let mut touched = BTreeSet::new();
        let mut cmds = Vec::new();
        for (cmd, o, l) in writes_after_s1(i, d.size) {
            touched.extend(d.geo.clusters(o, l));
            cmds.push(cmd);
        }
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io_ok(&uri, &refs);
        let got = dirty_of(
            &nbdinfo_map(&uri, "qemu:dirty-bitmap:s1"),
            d.size,
            &d.export,
        );
        assert_eq!(
            got,
            d.geo.expected(&touched),
            "{}: changes since s1",
            d.export
        );
        since_s1.push(touched);
    }

    // A second snapshot, then one more write: s2 shows only that, s1
    // everything since s1, on the next query (nothing is cached).
    for lun in ["off", "trunc", "algn"] {
        snapshot(&gw, lun, "s2");
    }
    for (d, touched) in disks.iter().zip(&mut since_s1) {
        let uri = gw.uri(&d.export);
        let clean = dirty_of(
            &nbdinfo_map(&uri, "qemu:dirty-bitmap:s2"),
            d.size,
            &d.export,
        );
        assert!(
            clean.is_empty(),
            "{}: nothing changed since s2: {clean:?}",
            d.export
        );
        qemu_io_ok(&uri, &["write -P 0xc0 12M 64k"]);
        let since_s2: BTreeSet<u64> = d.geo.clusters(12 * MIB, 64 * KIB).into_iter().collect();
        touched.extend(since_s2.iter().copied());
        let got2 = dirty_of(
            &nbdinfo_map(&uri, "qemu:dirty-bitmap:s2"),
            d.size,
            &d.export,
        );
        assert_eq!(got2, d.geo.expected(&since_s2), "{}: since s2", d.export);
        let got1 = dirty_of(
            &nbdinfo_map(&uri, "qemu:dirty-bitmap:s1"),
            d.size,
            &d.export,
        );
        assert_eq!(got1, d.geo.expected(touched), "{}: since s1", d.export);

        // base:allocation is still served, unchanged by the new contexts.
        let alloc = nbdinfo_map(&uri, "base:allocation");
        assert!(
            alloc
                .iter()
                .any(|&(o, l, t)| o <= 12 * MIB && 12 * MIB < o + l && t == 0),
            "{}: base:allocation reports the new write as data: {alloc:?}",
            d.export
        );

        // Every snapshot is offered, in the order taken.
        let info = run_ok(Command::new(require_tool("nbdinfo")).args(["--json", &uri]));
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("nbdinfo --json");
        assert_eq!(
            v["exports"][0]["contexts"],
            json!([
                "base:allocation",
                "qemu:dirty-bitmap:s1",
                "qemu:dirty-bitmap:s2"
            ]),
            "{}: {v}",
            d.export
        );

        // A snapshot that does not exist is not selected: nbdinfo cannot
        // map it.
        let nope = run_timeout(
            Command::new(require_tool("nbdinfo")).args(["--map=qemu:dirty-bitmap:nope", &uri]),
            CMD_TIMEOUT,
        );
        assert!(
            !nope.status.success(),
            "{}: mapped a missing snapshot:\n{}",
            d.export,
            text(&nope)
        );
    }

    // qemu's own client, reading the bitmap as backup tools do: it takes
    // the dirty flag for its "hole" bit, so dirty ranges come out as
    // "data": false and clean ones as "data": true (never "zero").
    for name in ["off/disk1", "algn/disk0", "trunc/disk0"] {
        let (i, d) = disks
            .iter()
            .enumerate()
            .find(|(_, d)| d.export == name)
            .expect("disk");
        let m = qemu_img_dirty_map(&gw, &d.export, "qemu:dirty-bitmap:s1");
        let mut pos = 0;
        let mut dirty: Vec<(u64, u64)> = Vec::new();
        for &(o, l, data, zero) in &m {
            assert_eq!(o, pos, "{name}: qemu-img map is contiguous: {m:?}");
            assert!(
                !zero,
                "{name}: a dirty bitmap says nothing about zeros: {m:?}"
            );
            if !data {
                match dirty.last_mut() {
                    Some((lo, ll)) if *lo + *ll == o => *ll += l,
                    _ => dirty.push((o, l)),
                }
            }
            pos += l;
        }
        assert_eq!(pos, d.size, "{name}: qemu-img map covers the disk: {m:?}");
        assert_eq!(
            dirty,
            d.geo.expected(&since_s1[i]),
            "{name}: qemu-img map with x-dirty-bitmap"
        );
    }
    // qemu refuses to open a bitmap the export does not offer.
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=off/disk0,x-dirty-bitmap=qemu:dirty-bitmap:nope",
        gw.port()
    );
    let nope = run_timeout(
        Command::new(require_tool("qemu-img")).args([
            "map",
            "--output=json",
            "--image-opts",
            &opts,
        ]),
        CMD_TIMEOUT,
    );
    assert!(
        !nope.status.success(),
        "qemu-img mapped a missing bitmap:\n{}",
        text(&nope)
    );

    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// Listing and selection with libnbd: `qemu:` and `qemu:dirty-bitmap:`
/// list every bitmap, an unknown bitmap is not selected, and a client that
/// selects two contexts gets one block-status chunk for each, with its own
/// id, one descriptor each under NBD_CMD_FLAG_REQ_ONE; a bitmap whose
/// snapshot is deleted meanwhile fails with EINVAL.
#[test]
fn libnbd_lists_selects_and_reads_both_contexts_in_one_request() {
    let mut pool = Pool::new();
    pool.add("vm", "offset", &["32M"], "16M");
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let uri = gw.uri("vm/disk0");
    qemu_io_ok(&uri, &["write -P 0xa0 0 4M"]);
    snapshot(&gw, "vm", "monday");
    snapshot(&gw, "vm", "tuesday");
    // After tuesday: 1 MiB at 8 MiB (a hole before) and 64 KiB at 1 MiB.
    qemu_io_ok(&uri, &["write -P 0xb0 8M 1M", "write -P 0xb1 1M 64k"]);

    let program = r#"
import os
uri = os.environ["URI"]

def listed(queries):
    h = nbd.NBD()
    h.set_opt_mode(True)
    for q in queries:
        h.add_meta_context(q)
    h.connect_uri(uri)
    names = []
    h.opt_list_meta_context(lambda name: names.append(name) or 0)
    h.opt_abort()
    return sorted(names)

bitmaps = ["qemu:dirty-bitmap:monday", "qemu:dirty-bitmap:tuesday"]
assert listed([]) == sorted(["base:allocation"] + bitmaps), listed([])
assert listed(["qemu:"]) == bitmaps, listed(["qemu:"])
assert listed(["qemu:dirty-bitmap:"]) == bitmaps
assert listed(["qemu:dirty-bitmap:tuesday", "qemu:dirty-bitmap:nope"]) == bitmaps[1:]
assert listed(["base:"]) == ["base:allocation"]

h = nbd.NBD()
for c in ["qemu:dirty-bitmap:nope", "qemu:dirty-bitmap:tuesday", "base:allocation"]:
    h.add_meta_context(c)
h.connect_uri(uri)
assert not h.can_meta_context("qemu:dirty-bitmap:nope")
assert h.can_meta_context("qemu:dirty-bitmap:tuesday")
assert h.can_meta_context("base:allocation")

def status(offset, length, flags):
    got = {}
    def cb(meta, off, entries, err):
        assert off == offset, (off, offset)
        assert meta not in got, "one chunk per context"
        got[meta] = list(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(length, offset, cb, flags=flags)
    return got

M = 1 << 20
# The whole disk: dirty exactly at [1M, 1M+64K) and [8M, 9M).
full = status(0, 32 * M, 0)
assert sorted(full) == ["base:allocation", "qemu:dirty-bitmap:tuesday"], full
d = full["qemu:dirty-bitmap:tuesday"]
assert d == [(M, 0), (64 << 10, 1), (7 * M - (64 << 10), 0), (M, 1), (23 * M, 0)], d
a = full["base:allocation"]
assert a[0][1] == 0 and a[0][0] >= 4 * M, a
# REQ_ONE: one descriptor per context, none longer than asked.
one = status(7 * M, 4 * M, nbd.CMD_FLAG_REQ_ONE)
assert one["qemu:dirty-bitmap:tuesday"] == [(M, 0)], one
assert len(one["base:allocation"]) == 1, one
assert one["base:allocation"][0][0] <= 4 * M, one
one = status(8 * M, 4 * M, nbd.CMD_FLAG_REQ_ONE)
assert one["qemu:dirty-bitmap:tuesday"] == [(M, 1)], one
# The snapshot is deleted while the connection has its bitmap selected:
# block status fails with EINVAL (naming it), the connection stays usable.
import subprocess
subprocess.run([os.environ["LUNCTL"], "delete-snapshot", "vm", "tuesday",
                "--pool", os.environ["POOL"]], check=True, capture_output=True)
try:
    status(0, M, 0)
    raise AssertionError("block status of a deleted snapshot's bitmap succeeded")
except nbd.Error as e:
    assert "EINVAL" in str(e) or "Invalid argument" in str(e), e
assert h.pread(512, M) == b"\xb1" * 512
h.shutdown()
print("CONTEXTS OK")
"#;
    let out = run_timeout(
        nbdsh()
            .env("URI", &uri)
            .env("LUNCTL", bin("lunctl"))
            .env("POOL", pool.arg())
            .args(["-c", program]),
        CMD_TIMEOUT,
    );
    assert_success("nbdsh meta contexts", &out);
    assert!(text(&out).contains("CONTEXTS OK"), "{}", text(&out));
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}
