//! End-to-end tests of `lungate serve` with the NBD clients VMs and
//! operators really use: qemu-io, qemu-img, nbdinfo, nbdcopy and nbdsh
//! (libnbd), over TCP, unix sockets and TLS.
//!
//! Every test creates its own pool with LUNs of all three layouts (offset,
//! truncate and aligned), starts its own gateway, stops it with SIGTERM (exit 0
//! required) and finally proves that the bytes of every LUN outside its
//! disk regions (GPT, label, state, gaps) are exactly as `lunctl create`
//! left them: guest-visible I/O never touched them.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use lungate_tests::{
    assert_success, disk_file_bytes, disk_regions, nbdsh, pattern_bytes, qemu_io, qemu_io_ok,
    require_tool, run_ok, run_parallel, run_timeout, Gateway, Pool, TlsCerts, CMD_TIMEOUT,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(out: &Output, what: &str) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}):\n{}", text(out)))
}

fn qemu_img(args: &[&str]) -> Output {
    run_ok(Command::new(require_tool("qemu-img")).args(args))
}

fn nbdinfo(args: &[&str]) -> Output {
    run_ok(Command::new(require_tool("nbdinfo")).args(args))
}

/// `nbdinfo --map --json URI` as (offset, length, type) triples; type bit 0
/// is "hole", bit 1 "zero" (base:allocation).
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let out = nbdinfo(&["--map", "--json", uri]);
    let v = json(&out, "nbdinfo --map --json");
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

fn type_at(m: &[(u64, u64, u64)], offset: u64) -> (u64, u64, u64) {
    *m.iter()
        .find(|(o, l, _)| *o <= offset && offset < o + l)
        .unwrap_or_else(|| panic!("no map entry covers {offset}: {m:?}"))
}

fn assert_map_covers(m: &[(u64, u64, u64)], size: u64) {
    let mut pos = 0;
    for (o, l, _) in m {
        assert_eq!(*o, pos, "map entries are contiguous: {m:?}");
        pos += l;
    }
    assert_eq!(pos, size, "map covers the whole export: {m:?}");
}

/// Writes, at the start, middle and end of every disk export and at
/// misaligned places, read back through a fresh connection and found at
/// the right offset of the backing file.
#[test]
fn qemu_io_patterns_land_inside_each_disk_region() {
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    for l in &pool.luns {
        let regions = disk_regions(&l.path);
        assert_eq!(regions.len(), l.disk_sizes.len(), "{}: disk count", l.name);
        for (i, &size) in l.disk_sizes.iter().enumerate() {
            let uri = gw.uri(&l.export(i));
            let mid = size / 2 - 512 * KIB;
            let w = [
                "write -P 0xa1 0 1M".to_string(),
                format!("write -P 0xa2 {mid} 1M"),
                format!("write -P 0xa3 {} 4k", size - 4096),
                "write -P 0xa4 1000 333".to_string(),
                format!("write -P 0xa5 {} 1", size - 1),
                format!("write -P 0xa6 {} 777", size / 3 + 3),
            ];
            let w: Vec<&str> = w.iter().map(String::as_str).collect();
            qemu_io_ok(&uri, &w);
            let r = [
                "read -P 0xa1 0 1000".to_string(),
                "read -P 0xa4 1000 333".to_string(),
                format!("read -P 0xa1 1333 {}", MIB - 1333),
                format!("read -P 0xa2 {mid} 1M"),
                format!("read -P 0xa3 {} 4095", size - 4096),
                format!("read -P 0xa5 {} 1", size - 1),
                format!("read -P 0xa6 {} 777", size / 3 + 3),
            ];
            let r: Vec<&str> = r.iter().map(String::as_str).collect();
            qemu_io_ok(&uri, &r);
            // The same bytes, seen in the backing file where the disk's
            // view keeps them (at the region; an aligned disk0's first MiB
            // in the shadow area).
            let (_, len) = regions[i];
            assert_eq!(len, size, "{} disk{i}: region length", l.name);
            let d = i as u32;
            assert_eq!(disk_file_bytes(&l.path, d, 0, 1000), vec![0xa1; 1000]);
            assert_eq!(disk_file_bytes(&l.path, d, 1000, 333), vec![0xa4; 333]);
            assert_eq!(disk_file_bytes(&l.path, d, mid, 4096), vec![0xa2; 4096]);
            assert_eq!(disk_file_bytes(&l.path, d, size - 1, 1), vec![0xa5]);
            // A misplaced pattern check fails: the test can tell.
            let bad = qemu_io(&uri, &[&format!("read -P 0xa2 {} 512", size - 512)]);
            assert!(
                text(&bad).contains("Pattern verification failed"),
                "a wrong pattern was not detected: {}",
                text(&bad)
            );
        }
    }
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// qemu-img sees each export's exact size and copies data in and out
/// byte for byte; compare notices a single changed byte.
#[test]
fn qemu_img_info_compare_and_convert_both_ways() {
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let dir = tempfile::tempdir().expect("tempdir");
    for (n, (export, size)) in pool.exports().into_iter().enumerate() {
        let uri = gw.uri(&export);
        let info = json(
            &qemu_img(&["info", "--output=json", "-f", "raw", &uri]),
            "qemu-img info",
        );
        assert_eq!(
            info["virtual-size"].as_u64(),
            Some(size),
            "{export}: {info}"
        );

        let src = dir.path().join(format!("src{n}.raw"));
        let mut data = pattern_bytes(size as usize, 0xc0ffee + n as u64);
        // Leave a zero run so sparse detection is exercised too.
        data[(size / 4) as usize..(size / 2) as usize].fill(0);
        std::fs::write(&src, &data).expect("write source");
        let src_s = src.to_str().expect("utf-8");
        qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri]);
        qemu_img(&["compare", "-f", "raw", "-F", "raw", src_s, &uri]);

        let back = dir.path().join(format!("back{n}.raw"));
        let back_s = back.to_str().expect("utf-8");
        qemu_img(&["convert", "-f", "raw", "-O", "raw", &uri, back_s]);
        let got = std::fs::read(&back).expect("read back");
        assert_eq!(got.len(), data.len(), "{export}: converted size");
        assert!(got == data, "{export}: converted bytes differ");

        // One changed byte through NBD: compare must now fail.
        qemu_io_ok(&uri, &[&format!("write -P 0x01 {} 1", size / 3)]);
        let out = run_timeout(
            Command::new(require_tool("qemu-img"))
                .args(["compare", "-f", "raw", "-F", "raw", src_s, &uri]),
            CMD_TIMEOUT,
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "{export}: compare after a changed byte: {}",
            text(&out)
        );
    }
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// `nbdinfo --list` shows every NAME/diskN of every LUN of every pool,
/// with its size, and nothing else, over TCP and the unix socket.
#[test]
fn nbdinfo_lists_exactly_the_disk_exports() {
    let mut pool = Pool::all_layouts();
    pool.add("solo", "truncate", &["3M"], "8M");
    pool.add("odd", "offset", &["1500K", "4097", "2M"], "8M");
    let mut second = Pool::new();
    second.add("elsewhere", "offset", &["2M"], "8M");
    let gw = Gateway::start(&["--pool", pool.arg(), "--pool", second.arg()]);
    let mut want: BTreeMap<String, u64> = pool.exports().into_iter().collect();
    want.extend(second.exports());
    assert_eq!(want.len(), 11, "fixture exports");
    let unix_list = format!("nbd+unix://?socket={}", gw.unix_path().display());
    for uri in [format!("nbd://{}", gw.addr()), unix_list] {
        let v = json(
            &nbdinfo(&["--list", "--json", &uri]),
            "nbdinfo --list --json",
        );
        let got: BTreeMap<String, u64> = v["exports"]
            .as_array()
            .unwrap_or_else(|| panic!("no exports array: {v}"))
            .iter()
            .map(|e| {
                (
                    e["export-name"].as_str().expect("export-name").to_string(),
                    e["export-size"].as_u64().expect("export-size"),
                )
            })
            .collect();
        assert_eq!(got, want, "nbdinfo --list {uri}");
    }
    // One export's details.
    let v = json(
        &nbdinfo(&["--json", &gw.uri("odd/disk1")]),
        "nbdinfo --json",
    );
    let e = &v["exports"][0];
    assert_eq!(
        e["export-size"].as_u64(),
        Some(MIB),
        "4097 bytes rounds up to 1 MiB: {v}"
    );
    assert_eq!(e["is_read_only"].as_bool(), Some(false), "{v}");
    // A name that is not an export is refused.
    let out = run_timeout(
        Command::new(require_tool("nbdinfo")).arg(gw.uri("odd/disk3")),
        CMD_TIMEOUT,
    );
    assert!(
        !out.status.success(),
        "nbdinfo of odd/disk3 succeeded: {}",
        text(&out)
    );
    gw.stop_ok();
    pool.assert_hidden_unchanged();
    second.assert_hidden_unchanged();
}

/// `nbdinfo --map` tells holes from data: after a full trim everything is
/// a hole; a 1 MiB write shows as exactly that data extent; trimming it
/// makes it a hole again; zeroing reads back zeros.
#[test]
fn nbdinfo_map_reports_holes_and_data_truthfully() {
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let shadows: Vec<(String, u64)> = pool
        .luns
        .iter()
        .flat_map(|l| (0..l.disk_sizes.len()).map(move |i| (l.export(i), l.shadowed(i))))
        .collect();
    for (export, size) in pool.exports() {
        let uri = gw.uri(&export);
        qemu_io_ok(&uri, &[&format!("discard 0 {size}")]);
        let m = map(&uri);
        assert_map_covers(&m, size);
        // The aligned layout's shadowed first MiB is always data (only the
        // guest's own table, which may be anything); the rest is a hole.
        let shadow = shadows
            .iter()
            .find(|(e, _)| *e == export)
            .map_or(0, |s| s.1);
        if shadow > 0 {
            assert_eq!(type_at(&m, 0), (0, shadow, 0), "{export}: {m:?}");
            qemu_io_ok(&uri, &[&format!("read -P 0 0 {shadow}")]);
        }
        assert!(
            m.iter().all(|(o, _, t)| *o < shadow || t & 3 == 3),
            "{export}: after a full trim everything is hole+zero: {m:?}"
        );

        qemu_io_ok(&uri, &["write -P 0x11 4M 1M"]);
        let m = map(&uri);
        assert_map_covers(&m, size);
        assert_eq!(
            type_at(&m, 4 * MIB),
            (4 * MIB, MIB, 0),
            "{export}: data extent: {m:?}"
        );
        assert_eq!(
            type_at(&m, 4 * MIB - 1).2 & 1,
            1,
            "{export}: hole before: {m:?}"
        );
        assert_eq!(type_at(&m, 5 * MIB).2 & 1, 1, "{export}: hole after: {m:?}");

        qemu_io_ok(&uri, &["discard 4M 1M", "read -P 0 4M 1M"]);
        let m = map(&uri);
        assert!(
            m.iter().all(|(o, _, t)| *o < shadow || t & 1 == 1),
            "{export}: trimmed data is a hole again: {m:?}"
        );

        qemu_io_ok(
            &uri,
            &["write -P 0x22 4M 1M", "write -z 4M 1M", "read -P 0 4M 1M"],
        );
        qemu_io_ok(
            &uri,
            &[
                "write -P 0x33 4M 1M",
                "write -z -u 4M 1M",
                "read -P 0 4M 1M",
            ],
        );
        let m = map(&uri);
        assert_map_covers(&m, size);
        assert!(
            type_at(&m, 4 * MIB).2 & 2 == 2 || type_at(&m, 4 * MIB).2 == 0,
            "{export}: zeroed range: {m:?}"
        );
    }
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// nbdcopy copies random data into an export and back out, with one and
/// with four connections, over TCP and the unix socket, byte for byte.
#[test]
fn nbdcopy_round_trips_random_data_both_ways() {
    let nbdcopy = require_tool("nbdcopy");
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let dir = tempfile::tempdir().expect("tempdir");
    for (n, (export, size)) in pool.exports().into_iter().enumerate() {
        let uri = if n % 2 == 0 {
            gw.uri(&export)
        } else {
            gw.unix_uri(&export)
        };
        let conns = if n < 2 {
            "--connections=4"
        } else {
            "--connections=1"
        };
        let src = dir.path().join(format!("src{n}.raw"));
        let data = pattern_bytes(size as usize, 0xabc + n as u64);
        std::fs::write(&src, &data).expect("write source");
        run_ok(
            Command::new(&nbdcopy)
                .arg(conns)
                .arg("--flush")
                .arg(&src)
                .arg(&uri),
        );
        let out = dir.path().join(format!("out{n}.raw"));
        run_ok(Command::new(&nbdcopy).arg(conns).arg(&uri).arg(&out));
        let got = std::fs::read(&out).expect("read copy");
        assert_eq!(got.len(), data.len(), "{export}: copied size");
        assert!(
            blake3::hash(&got) == blake3::hash(&data),
            "{export} ({conns}): copied bytes differ"
        );
    }
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// Eight qemu-io processes write eight disjoint ranges of one export at
/// the same time (and nbdcopy four connections on another); after a FLUSH
/// on a fresh connection, a third connection reads every range back.
#[test]
fn concurrent_writers_on_disjoint_ranges_all_land() {
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let qemu_io_bin = require_tool("qemu-io");
    for l in &pool.luns {
        let export = l.export(0);
        let size = l.disk_sizes[0];
        let step = size / 8;
        let mut cmds = Vec::new();
        for i in 0..8u64 {
            let mut c = Command::new(&qemu_io_bin);
            let uri = if i % 2 == 0 {
                gw.uri(&export)
            } else {
                gw.unix_uri(&export)
            };
            c.args(["-f", "raw", "-c"])
                .arg(format!("write -P {} {} {step}", 0x10 + i, i * step))
                .arg(uri);
            cmds.push(c);
        }
        for (i, out) in run_parallel(cmds, CMD_TIMEOUT).iter().enumerate() {
            assert_success(&format!("concurrent qemu-io writer {i} on {export}"), out);
        }
        qemu_io_ok(&gw.uri(&export), &["flush"]);
        let reads: Vec<String> = (0..8u64)
            .map(|i| format!("read -P {} {} {step}", 0x10 + i, i * step))
            .collect();
        let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
        qemu_io_ok(&gw.unix_uri(&export), &reads);
    }
    // Several libnbd connections of one nbdcopy on the second disk.
    let nbdcopy = require_tool("nbdcopy");
    let dir = tempfile::tempdir().expect("tempdir");
    for l in &pool.luns {
        let export = l.export(1);
        let size = l.disk_sizes[1];
        let src = dir.path().join(format!("{}.raw", l.name));
        let data = pattern_bytes(size as usize, size);
        std::fs::write(&src, &data).expect("write");
        run_ok(
            Command::new(&nbdcopy)
                .args(["--connections=4", "--requests=16", "--request-size=65536"])
                .arg(&src)
                .arg(gw.uri(&export)),
        );
        qemu_io_ok(&gw.uri(&export), &["flush"]);
        assert!(
            disk_file_bytes(&l.path, 1, 0, size as usize) == data,
            "{export}: multi-connection copy not in the backing file after flush"
        );
    }
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// The unix socket serves the same disks: what one transport writes the
/// other reads, and nbdinfo works over both.
#[test]
fn unix_socket_uris_serve_the_same_disks() {
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    for (n, (export, size)) in pool.exports().into_iter().enumerate() {
        let p = 0x40 + n;
        qemu_io_ok(
            &gw.uri(&export),
            &[&format!("write -P {p} {} 64k", size - 64 * KIB)],
        );
        qemu_io_ok(
            &gw.unix_uri(&export),
            &[
                &format!("read -P {p} {} 64k", size - 64 * KIB),
                &format!("write -P {} 0 64k", p + 1),
            ],
        );
        qemu_io_ok(&gw.uri(&export), &[&format!("read -P {} 0 64k", p + 1)]);
        let v = json(
            &nbdinfo(&["--json", &gw.unix_uri(&export)]),
            "nbdinfo --json",
        );
        assert_eq!(v["exports"][0]["export-size"].as_u64(), Some(size), "{v}");
    }
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// `--read-only`: every export says so, reads work, qemu-io cannot write
/// (it reports permission denied), libnbd forced to send a write gets
/// EPERM (see nbdsh_all.py), and not one byte of any LUN changes.
#[test]
fn read_only_gateway_refuses_writes() {
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    for (export, _) in pool.exports() {
        qemu_io_ok(&gw.uri(&export), &["write -P 0x5e 0 64k"]);
    }
    gw.stop_ok();
    let before: Vec<_> = pool
        .luns
        .iter()
        .map(|l| blake3::hash(&std::fs::read(&l.path).expect("read LUN")))
        .collect();

    let gw = Gateway::start(&["--pool", pool.arg(), "--read-only"]);
    for (export, size) in pool.exports() {
        let uri = gw.uri(&export);
        let v = json(&nbdinfo(&["--json", &uri]), "nbdinfo --json");
        assert_eq!(v["exports"][0]["is_read_only"].as_bool(), Some(true), "{v}");
        let out = qemu_io(&uri, &["write -P 0x01 0 4k"]);
        assert!(
            !out.status.success(),
            "{export}: qemu-io write succeeded: {}",
            text(&out)
        );
        let t = text(&out);
        assert!(
            t.contains("Permission denied") || t.contains("Operation not permitted"),
            "{export}: qemu-io did not report a permission error: {t}"
        );
        let ro = run_ok(
            Command::new(require_tool("qemu-io"))
                .args(["-r", "-f", "raw", "-c", "read -P 0x5e 0 64k"])
                .arg(&uri),
        );
        assert!(!text(&ro).contains("failed"), "{}", text(&ro));
        run_nbdsh_all(&uri, size, true);
    }
    gw.stop_ok();
    for (i, l) in pool.luns.iter().enumerate() {
        let now = blake3::hash(&std::fs::read(&l.path).expect("read LUN"));
        assert!(
            now == before[i],
            "{}: changed under --read-only",
            l.path.display()
        );
    }
    pool.assert_hidden_unchanged();
}

/// Runs tests/scripts/nbdsh_all.py against `uri` and checks it finished.
fn run_nbdsh_all(uri: &str, size: u64, read_only: bool) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nbdsh_all.py");
    let out = run_timeout(
        nbdsh()
            .env("NBDSH_URI", uri)
            .env("NBDSH_SIZE", size.to_string())
            .env("NBDSH_READ_ONLY", if read_only { "1" } else { "0" })
            .env("NBDSH_SERVER", "lungate")
            .arg("-c")
            .arg(format!(
                "exec(open({:?}).read())",
                script.display().to_string()
            )),
        Duration::from_secs(120),
    );
    let t = text(&out);
    assert!(
        out.status.success() && t.lines().any(|l| l.trim() == "NBDSH_ALL OK"),
        "nbdsh_all.py against {uri} failed ({}):\n{t}",
        out.status
    );
}

/// Every command, flag and option libnbd can send, with and without
/// structured replies, in opt mode, and the error cases (see the script).
#[test]
fn nbdsh_exercises_every_command_and_flag() {
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    for (n, (export, size)) in pool.exports().into_iter().enumerate() {
        let uri = if n % 2 == 0 {
            gw.uri(&export)
        } else {
            gw.unix_uri(&export)
        };
        run_nbdsh_all(&uri, size, false);
    }
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// The script itself is checked against nbdkit's file plugin with only
/// the spec's requirements, so its expectations are not lungate's guesses.
#[test]
fn reference_nbdkit_passes_the_nbdsh_script() {
    let nbdkit = require_tool("nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let exp = dir.path().join("exp");
    std::fs::create_dir(&exp).expect("mkdir");
    std::fs::File::create(exp.join("disk.img"))
        .and_then(|f| f.set_len(64 * MIB))
        .expect("image");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nbdsh_all.py");
    for ro in [false, true] {
        // `nbdsh -c` under `nbdkit --run`: nbdkit picks the socket and
        // stops when the script ends.
        let mut cmd = Command::new(&nbdkit);
        cmd.args(["-U", "-", "--exit-with-parent"]);
        if ro {
            cmd.arg("-r");
        }
        let path = nbdsh()
            .get_envs()
            .find(|(k, _)| *k == "PATH")
            .and_then(|(_, v)| v.map(|v| v.to_os_string()))
            .expect("PATH");
        cmd.arg("file")
            .arg(format!("dir={}", exp.display()))
            .arg("--run")
            .arg(format!(
                "NBDSH_URI=\"nbd+unix:///disk.img?socket=$unixsocket\" nbdsh -c 'exec(open(\"{}\").read())'",
                script.display()
            ))
            .env("PATH", path)
            .env("NBDSH_SIZE", (64 * MIB).to_string())
            .env("NBDSH_READ_ONLY", if ro { "1" } else { "0" })
            .env("NBDSH_SERVER", "reference");
        let out = run_timeout(&mut cmd, Duration::from_secs(120));
        let t = text(&out);
        assert!(
            out.status.success() && t.lines().any(|l| l.trim() == "NBDSH_ALL OK"),
            "nbdsh_all.py against nbdkit (read-only {ro}) failed:\n{t}"
        );
    }
}

fn qemu_io_tls(gw: &Gateway, dir: &Path, export: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new(require_tool("qemu-io"));
    c.arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            dir.display()
        ))
        .arg("--image-opts");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(format!(
        "driver=nbd,host=127.0.0.1,port={},export={export},tls-creds=tls0",
        gw.port()
    ));
    run_timeout(&mut c, CMD_TIMEOUT)
}

fn nbds_uri(gw: &Gateway, export: &str, dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
        gw.port(),
        dir.display()
    )
}

/// `--tls require`: libnbd (nbds://) and qemu-io with x509 credentials
/// work; plaintext clients, and a client whose certificate another CA
/// signed, are refused. `--tls on`: both plaintext and TLS work.
#[test]
fn tls_require_serves_certified_clients_and_refuses_plaintext() {
    let certs = TlsCerts::generate();
    let pool = Pool::all_layouts();
    let mut args = vec!["--pool".to_string(), pool.arg().to_string()];
    args.extend(["--tls".into(), "require".into()]);
    args.extend(certs.server_args());
    args.extend(["--tls-ca".into(), certs.path_str("ca-cert.pem")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gw = Gateway::start(&args);
    let nbdinfo_bin = require_tool("nbdinfo");
    for (export, size) in pool.exports() {
        let v = json(
            &nbdinfo(&["--json", &nbds_uri(&gw, &export, certs.dir())]),
            "nbdinfo nbds://",
        );
        assert_eq!(v["exports"][0]["export-size"].as_u64(), Some(size), "{v}");
        assert_eq!(
            v["TLS"].as_bool(),
            Some(true),
            "nbdinfo over nbds:// used TLS: {v}"
        );
        let out = qemu_io_tls(
            &gw,
            certs.dir(),
            &export,
            &["write -P 0x7e 0 64k", "read -P 0x7e 0 64k"],
        );
        assert_success(&format!("qemu-io over TLS to {export}"), &out);
        assert!(!text(&out).contains("failed"), "{}", text(&out));

        let plain = run_timeout(Command::new(&nbdinfo_bin).arg(gw.uri(&export)), CMD_TIMEOUT);
        assert!(
            !plain.status.success(),
            "plain nbdinfo got in: {}",
            text(&plain)
        );
        let plain = qemu_io(&gw.uri(&export), &["read 0 4k"]);
        assert!(
            !plain.status.success(),
            "plain qemu-io got in: {}",
            text(&plain)
        );
    }
    let plain_list = run_timeout(
        Command::new(&nbdinfo_bin).args(["--list".to_string(), format!("nbd://{}", gw.addr())]),
        CMD_TIMEOUT,
    );
    assert!(
        !plain_list.status.success(),
        "plain --list got in: {}",
        text(&plain_list)
    );

    // A client certificate from a different CA is refused.
    let other = TlsCerts::generate();
    let mixed = tempfile::tempdir().expect("tempdir");
    std::fs::copy(certs.file("ca-cert.pem"), mixed.path().join("ca-cert.pem")).expect("copy");
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.file(f), mixed.path().join(f)).expect("copy");
    }
    let export = pool.exports()[0].0.clone();
    let out = run_timeout(
        Command::new(&nbdinfo_bin).arg(nbds_uri(&gw, &export, mixed.path())),
        CMD_TIMEOUT,
    );
    assert!(
        !out.status.success(),
        "a foreign client certificate got in: {}",
        text(&out)
    );
    gw.stop_ok();

    // --tls on: TLS optional.
    let mut args = vec!["--pool".to_string(), pool.arg().to_string()];
    args.extend(["--tls".into(), "on".into()]);
    args.extend(certs.server_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gw = Gateway::start(&args);
    for (export, _) in pool.exports() {
        qemu_io_ok(&gw.uri(&export), &["read -P 0x7e 0 64k"]);
        let out = qemu_io_tls(&gw, certs.dir(), &export, &["read -P 0x7e 0 64k"]);
        assert_success(&format!("qemu-io over optional TLS to {export}"), &out);
        let v = json(
            &nbdinfo(&["--json", &nbds_uri(&gw, &export, certs.dir())]),
            "nbdinfo nbds:// (TLS optional)",
        );
        assert_eq!(v["TLS"].as_bool(), Some(true), "{v}");
        let v = json(
            &nbdinfo(&["--json", &gw.uri(&export)]),
            "nbdinfo nbd:// (TLS optional)",
        );
        assert_eq!(v["TLS"].as_bool(), Some(false), "{v}");
    }
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// SIGTERM with a client connected and mid-session: the gateway exits 0
/// within the stop timeout and what the client wrote (and was answered)
/// is in the file.
#[test]
fn sigterm_with_a_connected_client_exits_cleanly_and_keeps_data() {
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let export = pool.luns[1].export(0);
    let mut child = nbdsh()
        .arg("-u")
        .arg(gw.uri(&export))
        .arg("-c")
        .arg(
            "import sys, time\n\
             h.pwrite(b'\\x6b' * 65536, 0)\n\
             print('written', flush=True)\n\
             time.sleep(60)\n",
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nbdsh");
    let mut line = String::new();
    {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        r.read_line(&mut line).expect("read nbdsh stdout");
    }
    assert_eq!(line.trim(), "written", "nbdsh did not write");
    let t0 = std::time::Instant::now();
    let status = gw.stop();
    assert!(
        status.success(),
        "gateway exit after SIGTERM with a client: {status}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
    let _ = child.kill();
    let _ = lungate_tests::wait_timeout(&mut child, Duration::from_secs(10));

    let gw = Gateway::start(&["--pool", pool.arg()]);
    qemu_io_ok(&gw.uri(&export), &["read -P 0x6b 0 64k"]);
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// The throwaway certificates and the client invocations above are
/// checked against nbdkit's TLS, so a TLS failure against lungate is
/// lungate's, not the test's.
#[test]
fn reference_nbdkit_accepts_the_generated_certificates() {
    let certs = TlsCerts::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(8 * MIB))
        .expect("image");
    let mut cmd = Command::new(require_tool("nbdkit"));
    cmd.args(["-U", "-", "--exit-with-parent", "--tls=require"])
        .arg(format!("--tls-certificates={}", certs.dir().display()))
        .arg("--tls-verify-peer")
        .arg("file")
        .arg(&img)
        .arg("--run")
        .arg(format!(
            "set -e\n\
             nbdinfo \"nbds+unix:///?socket=$unixsocket&tls-certificates={d}\"\n\
             if nbdinfo \"nbd+unix:///?socket=$unixsocket\"; then echo PLAINTEXT-ACCEPTED; exit 1; fi\n\
             qemu-io --object tls-creds-x509,id=tls0,endpoint=client,dir={d} --image-opts \
               -c 'write -P 0x7e 0 64k' -c 'read -P 0x7e 0 64k' \
               \"driver=nbd,server.type=unix,server.path=$unixsocket,tls-creds=tls0,tls-hostname=127.0.0.1\"\n\
             echo REFERENCE-TLS-OK\n",
            d = certs.dir().display()
        ));
    let out = run_timeout(&mut cmd, Duration::from_secs(60));
    let t = text(&out);
    assert!(
        out.status.success() && t.contains("REFERENCE-TLS-OK") && !t.contains("failed"),
        "nbdkit TLS reference failed:\n{t}"
    );
}

/// The exports nbdinfo lists over `uri`, by name.
fn listed(uri: &str) -> Vec<String> {
    let v = json(
        &nbdinfo(&["--list", "--json", uri]),
        "nbdinfo --list --json",
    );
    v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports array: {v}"))
        .iter()
        .map(|e| e["export-name"].as_str().expect("export-name").to_string())
        .collect()
}

fn nbdinfo_fails(args: &[&str]) -> bool {
    !run_timeout(
        Command::new(require_tool("nbdinfo")).args(args),
        CMD_TIMEOUT,
    )
    .status
    .success()
}

/// `lungate serve --config FILE` with `[[export]]` entries: a per-export
/// read-only disk, an alias of a pool disk, and allow-lists by CIDR, by
/// transport ("unix") and by TLS client certificate ("cert:NAME"). A
/// client that is not allowed neither sees the export in the list nor can
/// open it; an allowed one uses it normally.
#[test]
fn config_file_exports_allow_lists_and_read_only() {
    let certs = TlsCerts::generate();
    let pool = Pool::all_layouts();
    let off = pool.lun("off").path.display().to_string();
    let trunc = pool.lun("trunc").path.display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"# written by tests/nbd_clients.rs
pools = ["{pool}"]
[tls]
mode = "on"
cert = "{cert}"
key = "{key}"
ca = "{ca}"

[[export]]
name = "off/disk1"
lun = "{off}"
disk = 1
read_only = true
description = "read-only data disk"

[[export]]
name = "trunc/disk0"
lun = "{trunc}"
disk = 0
allow = ["10.99.0.0/16"]

[[export]]
name = "trunc/disk1"
lun = "{trunc}"
disk = 1
allow = ["unix"]

[[export]]
name = "extra/alias"
lun = "{off}"
disk = 0
allow = ["127.0.0.1"]

[[export]]
name = "extra/mine"
lun = "{trunc}"
disk = 1
allow = ["cert:lungate test client"]

[[export]]
name = "extra/theirs"
lun = "{trunc}"
disk = 1
allow = ["cert:someone else"]
"#,
            pool = pool.arg(),
            cert = certs.path_str("server-cert.pem"),
            key = certs.path_str("server-key.pem"),
            ca = certs.path_str("ca-cert.pem"),
        ),
    )
    .expect("write config");
    let gw = Gateway::start(&["--config", config.to_str().expect("utf-8")]);
    let tcp = format!("nbd://{}", gw.addr());
    let unix = format!("nbd+unix://?socket={}", gw.unix_path().display());
    let tls = format!(
        "nbds://127.0.0.1:{}?tls-certificates={}",
        gw.port(),
        certs.dir().display()
    );
    let mut got = listed(&tcp);
    got.sort();
    assert_eq!(
        got,
        [
            "algn/disk0",
            "algn/disk1",
            "extra/alias",
            "off/disk0",
            "off/disk1"
        ],
        "plaintext TCP from 127.0.0.1 sees only what it may use"
    );
    let mut got = listed(&unix);
    got.sort();
    assert_eq!(
        got,
        [
            "algn/disk0",
            "algn/disk1",
            "off/disk0",
            "off/disk1",
            "trunc/disk1"
        ],
        "the unix socket sees the unix-only export, not the 127.0.0.1 one"
    );
    let mut got = listed(&tls);
    got.sort();
    assert_eq!(
        got,
        [
            "algn/disk0",
            "algn/disk1",
            "extra/alias",
            "extra/mine",
            "off/disk0",
            "off/disk1"
        ],
        "a TLS client with the right certificate sees its export"
    );
    // Denied exports cannot be opened either, whatever the transport.
    assert!(
        nbdinfo_fails(&[&gw.uri("trunc/disk0")]),
        "trunc/disk0 over TCP"
    );
    assert!(
        nbdinfo_fails(&[&gw.unix_uri("trunc/disk0")]),
        "trunc/disk0 over unix"
    );
    assert!(
        nbdinfo_fails(&[&gw.uri("trunc/disk1")]),
        "unix-only export over TCP"
    );
    assert!(
        nbdinfo_fails(&[&gw.uri("extra/mine")]),
        "cert export without TLS"
    );
    assert!(
        nbdinfo_fails(&[&nbds_uri(&gw, "extra/theirs", certs.dir())]),
        "someone else's export"
    );
    assert!(
        nbdinfo_fails(&[&gw.unix_uri("extra/alias")]),
        "127.0.0.1-only export over unix"
    );
    // Allowed ones work.
    let out = qemu_io_tls(&gw, certs.dir(), "extra/mine", &["write -P 0x6d 0 64k"]);
    assert_success("qemu-io over TLS to extra/mine", &out);
    qemu_io_ok(&gw.unix_uri("trunc/disk1"), &["read -P 0x6d 0 64k"]);
    // The alias is the same region as off/disk0.
    qemu_io_ok(&gw.uri("extra/alias"), &["write -P 0xa7 1M 64k"]);
    qemu_io_ok(&gw.unix_uri("off/disk0"), &["read -P 0xa7 1M 64k"]);
    // The per-export read-only disk.
    let v = json(
        &nbdinfo(&["--json", &gw.uri("off/disk1")]),
        "nbdinfo --json off/disk1",
    );
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"].as_bool(), Some(true), "{v}");
    assert_eq!(
        e["description"].as_str(),
        Some("read-only data disk"),
        "{v}"
    );
    let out = qemu_io(&gw.uri("off/disk1"), &["write -P 1 0 4k"]);
    assert!(
        !out.status.success(),
        "wrote to a read-only export: {}",
        text(&out)
    );
    let v = json(
        &nbdinfo(&["--json", &gw.uri("off/disk0")]),
        "nbdinfo --json off/disk0",
    );
    assert_eq!(
        v["exports"][0]["is_read_only"].as_bool(),
        Some(false),
        "{v}"
    );
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// fio's libnbd engine: random writes of mixed sizes with 32 requests in
/// flight, two jobs on disjoint halves at once, then every block read back
/// and checked against its crc32c header. Exercises pipelining and
/// out-of-order replies under load with data integrity checked end to end.
#[test]
fn fio_random_writes_verify_with_deep_queues() {
    let fio = require_tool("fio");
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    for (n, l) in pool.luns.iter().enumerate() {
        let size = l.disk_sizes[0];
        let uri = if n % 2 == 0 {
            gw.uri(&l.export(0))
        } else {
            gw.unix_uri(&l.export(0))
        };
        let half = size / 2;
        let out = run_timeout(
            Command::new(&fio)
                .args([
                    "--name=lungate-verify",
                    "--ioengine=nbd",
                    "--rw=randwrite",
                    "--bsrange=4k-64k",
                    "--iodepth=32",
                    "--numjobs=2",
                    "--verify=crc32c",
                    "--verify_fatal=1",
                    "--do_verify=1",
                    "--randrepeat=0",
                    "--output-format=json",
                ])
                .arg(format!("--uri={uri}"))
                .arg(format!("--size={half}"))
                .arg(format!("--offset_increment={half}"))
                // fio drops verify-state files in its working directory.
                .current_dir(pool.path()),
            Duration::from_secs(120),
        );
        assert_success(&format!("fio verify on {}", l.export(0)), &out);
        // The nbd engine prints "fio: connected to NBD server" first.
        let stdout = String::from_utf8_lossy(&out.stdout);
        let at = stdout.find("\n{").map_or(0, |i| i + 1);
        let v: serde_json::Value = serde_json::from_str(&stdout[at..])
            .unwrap_or_else(|e| panic!("fio JSON ({e}):\n{}", text(&out)));
        let jobs = v["jobs"].as_array().expect("fio jobs");
        assert_eq!(jobs.len(), 2, "two fio jobs: {v}");
        for j in jobs {
            assert_eq!(j["error"].as_u64(), Some(0), "fio job error: {j}");
            let written = j["write"]["io_bytes"].as_u64().expect("io_bytes");
            let read = j["read"]["io_bytes"].as_u64().expect("io_bytes");
            assert!(written >= half, "fio wrote {written} of {half}");
            assert!(read >= half, "fio verified {read} of {half}");
        }
    }
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// Disks larger than 4 GiB (sparse): offsets above 2^32 are served and
/// land at region offset + export offset in the backing file, for both
/// layouts and for a second disk that starts beyond 4 GiB in the file.
#[test]
fn disks_larger_than_4gib_address_every_byte() {
    let mut pool = Pool::new();
    pool.add("bigo", "offset", &["5G", "5G"], "16M");
    pool.add("bigt", "truncate", &["5G", "5G"], "16M");
    pool.add("biga", "aligned", &["5G", "5G"], "16M");
    let gw = Gateway::start(&["--pool", pool.arg()]);
    for l in &pool.luns {
        let regions = disk_regions(&l.path);
        for (i, &size) in l.disk_sizes.iter().enumerate() {
            assert_eq!(size, 5 << 30);
            let uri = gw.uri(&l.export(i));
            let v = json(&nbdinfo(&["--json", &uri]), "nbdinfo --json");
            assert_eq!(v["exports"][0]["export-size"].as_u64(), Some(size), "{v}");
            let above = (4u64 << 30) + 12345;
            let last = size - 4096;
            qemu_io_ok(
                &uri,
                &[
                    &format!("write -P 0xb1 {above} 4k"),
                    &format!("write -P 0xb2 {last} 4k"),
                    "write -P 0xb3 0 4k",
                ],
            );
            qemu_io_ok(
                &gw.unix_uri(&l.export(i)),
                &[
                    &format!("read -P 0xb1 {above} 4k"),
                    &format!("read -P 0xb2 {last} 4k"),
                    "read -P 0xb3 0 4k",
                    // 2^32 bytes below the write: not aliased onto it.
                    &format!("read -P 0 {} 4k", above - (4 << 30)),
                ],
            );
            let (_, len) = regions[i];
            assert_eq!(len, size);
            let d = i as u32;
            assert_eq!(disk_file_bytes(&l.path, d, above, 4096), vec![0xb1; 4096]);
            assert_eq!(disk_file_bytes(&l.path, d, last, 4096), vec![0xb2; 4096]);
            assert_eq!(disk_file_bytes(&l.path, d, 0, 4096), vec![0xb3; 4096]);
        }
    }
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// `sfdisk --dump` of a LUN file with its path replaced by `LUN`; sfdisk
/// must not complain (it checks the primary GPT at LBA 1 and the backup
/// GPT at the end of the file, and that the backup covers the whole file).
fn sfdisk_dump(path: &Path) -> String {
    let out = run_ok(Command::new(require_tool("sfdisk")).arg("--dump").arg(path));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.trim().is_empty(),
        "sfdisk complains about {}: {err}",
        path.display()
    );
    String::from_utf8_lossy(&out.stdout).replace(path.to_str().unwrap(), "LUN")
}

/// `start=` and `size=` (sectors) of the partition named `name` in an
/// `sfdisk --dump`.
fn sfdisk_part(dump: &str, name: &str) -> (u64, u64) {
    let line = dump
        .lines()
        .find(|l| l.contains(&format!("name=\"{name}\"")))
        .unwrap_or_else(|| panic!("no {name} in\n{dump}"));
    let field = |k: &str| -> u64 {
        let at = line.find(k).unwrap_or_else(|| panic!("no {k} in {line}")) + k.len();
        line[at..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bad {k} in {line}"))
    };
    (field("start="), field("size="))
}

/// Growing an aligned LUN (disk0, which moves the state region and its
/// shadow area; then the memory, which grows the state region; then a
/// new disk) keeps every guest byte: the shadowed first MiB, a write
/// straddling its end, the rest of disk0 at its own offsets and disk1.
/// lungate's GPT at LBA 0 stays valid and describes the new regions, the
/// backup GPT moves to the new end of the file, the grown part reads as
/// zeros, and shrinking is refused without touching the file.
#[test]
fn resizing_an_aligned_lun_keeps_its_shadowed_range_and_gpt() {
    use lungate_tests::{file_bytes, lunctl};
    let mut pool = Pool::new();
    pool.add("grow", "aligned", &["40M", "16M"], "16M");
    let lun = pool.lun("grow").path.clone();
    let ls = lun.to_str().unwrap();
    let writes = [
        ("grow/disk0", "write -P 0x5a 0 960k"),
        ("grow/disk0", "write -P 0x5e 960k 128k"),
        ("grow/disk0", "write -P 0x5b 1088k 960k"),
        ("grow/disk0", "write -P 0x5c 40896k 64k"),
        ("grow/disk1", "write -P 0x5d 0 1M"),
    ];
    let reads = [
        ("grow/disk0", "read -P 0x5a 0 960k"),
        ("grow/disk0", "read -P 0x5e 960k 128k"),
        ("grow/disk0", "read -P 0x5b 1088k 960k"),
        ("grow/disk0", "read -P 0x5c 40896k 64k"),
        ("grow/disk1", "read -P 0x5d 0 1M"),
    ];
    let gw = Gateway::start(&["--pool", pool.arg()]);
    for (e, w) in writes {
        qemu_io_ok(&gw.uri(e), &[w]);
    }
    gw.stop_ok();
    let before = sfdisk_dump(&lun);
    let file_before = std::fs::read(&lun).unwrap();

    // Shrinking is refused, and the file is left as it was.
    let out = run_timeout(
        Command::new(lungate_tests::bin("lunctl")).args(["resize", ls, "--disk", "0=32M"]),
        CMD_TIMEOUT,
    );
    assert!(!out.status.success(), "a shrink succeeded: {}", text(&out));
    assert!(text(&out).contains("shrinking"), "{}", text(&out));
    assert!(
        std::fs::read(&lun).unwrap() == file_before,
        "a refused shrink changed the LUN"
    );

    lunctl(&["resize", ls, "--disk", "0=64M"]);
    lunctl(&["resize", ls, "--memory", "48M"]);
    lunctl(&["resize", ls, "--disk", "2=8M"]);

    // lungate's GPT: a protective MBR at LBA 0, the header at LBA 1, the
    // backup header in the file's last sector, and the new regions.
    let size = std::fs::metadata(&lun).unwrap().len();
    let after = sfdisk_dump(&lun);
    assert_ne!(after, before, "the GPT does not describe the grown LUN");
    let s0 = file_bytes(&lun, 0, 512);
    assert_eq!(&s0[510..512], &[0x55, 0xAA], "protective MBR signature");
    assert_eq!(s0[446 + 4], 0xEE, "LBA 0 holds a protective MBR");
    assert_eq!(
        &file_bytes(&lun, 512, 8)[..],
        b"EFI PART",
        "GPT header at LBA 1"
    );
    assert_eq!(
        &file_bytes(&lun, size - 512, 8)[..],
        b"EFI PART",
        "backup GPT header in the last sector"
    );
    assert!(
        after.contains(&format!("last-lba: {}\n", size / 512 - 34)),
        "the GPT does not reach the new end ({size} bytes):\n{after}"
    );
    // The GPT's disk0 partition is the part past the shadowed first MiB.
    assert_eq!(
        sfdisk_part(&after, "lungate-disk0"),
        (2048, (63 * MIB) / 512)
    );
    assert_eq!(sfdisk_part(&after, "lungate-disk2").1, (8 * MIB) / 512);
    let regions = disk_regions(&lun);
    assert_eq!(regions[0], (0, 64 * MIB), "disk0 stays at byte 0");
    let (state, _) = sfdisk_part(&after, "lungate-state");
    assert!(state * 512 >= 64 * MIB, "the state region moved past disk0");
    let l = lun_manager::Lun::open(&lun, lun_manager::Access::ReadOnly).unwrap();
    assert!(l.warnings().is_empty(), "{:?}", l.warnings());
    drop(l);

    // Every byte where it was, through the file and through NBD.
    assert_eq!(
        file_bytes(&lun, 1088 * KIB, 960 * 1024),
        vec![0x5b; 960 * 1024]
    );
    assert_eq!(file_bytes(&lun, MIB, 64 * 1024), vec![0x5e; 64 * 1024]);
    assert_eq!(disk_file_bytes(&lun, 0, 0, 4096), vec![0x5a; 4096]);
    assert_eq!(
        disk_file_bytes(&lun, 0, 960 * KIB, 65536),
        vec![0x5e; 65536]
    );
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let info = nbdinfo(&["--size", &gw.uri("grow/disk0")]);
    assert_eq!(
        String::from_utf8_lossy(&info.stdout).trim(),
        (64 * MIB).to_string()
    );
    for (e, r) in reads {
        qemu_io_ok(&gw.uri(e), &[r]);
    }
    qemu_io_ok(&gw.uri("grow/disk0"), &["read -P 0 40M 24M"]);
    qemu_io_ok(&gw.uri("grow/disk2"), &["read -P 0 0 8M"]);
    // The shadowed range is still the guest's, after the move.
    qemu_io_ok(
        &gw.uri("grow/disk0"),
        &["write -P 0x5f 0 4k", "read -P 0x5f 0 4k"],
    );
    gw.stop_ok();
    assert_eq!(disk_file_bytes(&lun, 0, 0, 4096), vec![0x5f; 4096]);
    assert_eq!(
        sfdisk_dump(&lun),
        after,
        "a guest write reached lungate's GPT"
    );
}

/// A LUN with two snapshots (data written through NBD before and after
/// each) grown offline: while a gateway serves it the resize is refused and
/// says why; after it, a gateway serves disk0 at its new size to nbdinfo
/// and qemu-img, every byte written before is there, the grown part reads
/// zero and takes writes, a clone of the first snapshot is served at the
/// size that snapshot had, with its data, and `lunctl snapshots` shows the
/// snapshots' old sizes offline and through the gateway alike.
#[test]
fn a_lun_with_snapshots_grown_offline_is_served_at_its_new_size_with_every_byte() {
    use lungate_tests::lunctl;
    let mut pool = Pool::new();
    pool.add("snapg", "truncate", &["16M", "8M"], "4M");
    let lun = pool.lun("snapg").path.clone();
    let ls = lun.to_str().unwrap();
    for (i, snap) in ["s1", "s2", ""].iter().enumerate() {
        let gw = Gateway::start(&["--pool", pool.arg()]);
        qemu_io_ok(
            &gw.uri("snapg/disk0"),
            &[&format!("write -P 0x{:x} 0 1M", 0x11 + i)],
        );
        qemu_io_ok(
            &gw.uri("snapg/disk1"),
            &[&format!("write -P 0x{:x} 0 1M", 0x21 + i)],
        );
        qemu_io_ok(&gw.uri("snapg/disk0"), &["write -P 0x5c 15M 1M"]);
        if snap.is_empty() {
            // Served: the resize is refused, naming the way out.
            let out = run_timeout(
                Command::new(lungate_tests::bin("lunctl")).args(["resize", ls, "--disk", "0=48M"]),
                CMD_TIMEOUT,
            );
            assert!(!out.status.success(), "a served LUN was resized");
            assert!(text(&out).contains("resize is offline"), "{}", text(&out));
        }
        gw.stop_ok();
        if !snap.is_empty() {
            lunctl(&["snapshot", ls, snap]);
        }
    }
    lunctl(&["resize", ls, "--disk", "0=48M"]);
    lunctl(&["resize", ls, "--memory", "32M"]);
    lunctl(&["clone", ls, "s1", "snapc"]);
    let offline = json(&lunctl(&["snapshots", ls, "--json"]), "lunctl snapshots");
    let s1 = offline
        .as_array()
        .and_then(|v| v.iter().find(|s| s["name"] == "s1"))
        .unwrap_or_else(|| panic!("no s1 in {offline}"));
    assert!(
        s1["sizes"].as_array().is_some_and(|v| v
            .iter()
            .any(|z| z["region"] == "disk0" && z["bytes"] == 16 * MIB && z["now"] == 48 * MIB)),
        "s1 shows disk0's old size: {offline}"
    );

    let gw = Gateway::start(&["--pool", pool.arg()]);
    // Through the gateway's control API the list is the same, sizes and all.
    let served = json(&lunctl(&["snapshots", ls, "--json"]), "lunctl snapshots");
    assert_eq!(served, offline, "routed through the gateway");
    let uri = gw.uri("snapg/disk0");
    let info = nbdinfo(&["--size", &uri]);
    assert_eq!(
        String::from_utf8_lossy(&info.stdout).trim(),
        (48 * MIB).to_string()
    );
    let info = json(
        &qemu_img(&["info", "--output=json", "-f", "raw", &uri]),
        "qemu-img info",
    );
    assert_eq!(info["virtual-size"].as_u64(), Some(48 * MIB), "{info}");
    qemu_io_ok(
        &uri,
        &[
            "read -P 0x13 0 1M",
            "read -P 0x5c 15M 1M",
            "read -P 0 16M 32M",
            "write -P 0x44 40M 1M",
            "read -P 0x44 40M 1M",
        ],
    );
    qemu_io_ok(&gw.uri("snapg/disk1"), &["read -P 0x23 0 1M"]);
    let clone = gw.uri("snapc/disk0");
    let size = nbdinfo(&["--size", &clone]);
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        (16 * MIB).to_string(),
        "the clone of s1 has s1's size"
    );
    qemu_io_ok(&clone, &["read -P 0x11 0 1M", "read -P 0x5c 15M 1M"]);
    qemu_io_ok(&gw.uri("snapc/disk1"), &["read -P 0x21 0 1M"]);
    gw.stop_ok();
}
