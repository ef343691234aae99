//! Offline moves (docs/migration.md, "Offline moves"): `lunctl migrate
//! NAME --pool P --to-pool Q` of a VM no gateway serves runs `lungate
//! move`, the migration engine with no listener. A VM with a snapshot and
//! a secondary disk is written through a real gateway, moved with no
//! gateway running, then served from the new pool and read back whole by
//! libnbd (nbdsh) and qemu-io. Refusals create nothing; a SIGKILL at each
//! step of the move leaves exactly one pool with the VM, whole, after
//! recovery, and running the command again finishes the move.

#[path = "migrate_common.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lungate_tests::*;
use serde_json::json;

/// What every disk of the test VM holds, read back through a gateway:
/// `(export, size, sha256)` of every byte, and the snapshot list.
#[derive(Debug, PartialEq)]
struct Contents {
    disks: Vec<(String, String)>,
    snapshots: serde_json::Value,
}

/// sha256 of every byte of `uri`, read by libnbd (nbdsh).
fn digest(uri: &str) -> String {
    let script = "import hashlib\n\
                  d = hashlib.sha256()\n\
                  size = h.get_size()\n\
                  off = 0\n\
                  while off < size:\n    \
                      n = min(4 << 20, size - off)\n    \
                      d.update(h.pread(n, off))\n    \
                      off += n\n\
                  print(size, d.hexdigest())\n";
    let out = run_timeout(
        nbdsh().args(["-u", uri, "-c", script]),
        Duration::from_secs(120),
    );
    assert_success(&format!("nbdsh digest of {uri}"), &out);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn contents(gw: &Gateway) -> Contents {
    Contents {
        disks: ["vm1/disk0", "vm1data/disk0"]
            .iter()
            .map(|e| (e.to_string(), digest(&gw.uri(e))))
            .collect(),
        snapshots: api(&gw.control(), "GET", "/v1/luns/vm1/snapshots", None, 200),
    }
}

/// A VM `vm1` in `pool`: a 32M disk and the secondary `vm1data` (16M);
/// 0x11 under snapshot `s1`, then 0x22 over part of it in the live layer,
/// 0x33 on the secondary. Returns what it holds.
fn make_vm(pool: &Path) -> Contents {
    create_lun(pool, "vm1", "offset", &["32M"], "16M");
    create_lun(pool, "vm1data", "offset", &["16M"], "16M");
    let p = pool.to_str().unwrap();
    lunctl(&["attach-secondary", "vm1", "vm1data", "--pool", p]);
    let gw = Gateway::start(&["--pool", p]);
    qemu_io_ok(&gw.uri("vm1/disk0"), &["write -P 0x11 4M 8M"]);
    qemu_io_ok(&gw.uri("vm1data/disk0"), &["write -P 0x33 1M 2M"]);
    api(
        &gw.control(),
        "POST",
        "/v1/luns/vm1/snapshots",
        Some(json!({"name": "s1", "description": "before the move"})),
        201,
    );
    qemu_io_ok(&gw.uri("vm1/disk0"), &["write -P 0x22 6M 1M"]);
    let c = contents(&gw);
    gw.stop_ok();
    c
}

/// The patterns [`make_vm`] wrote, and the snapshot's, read by qemu-io
/// from `gw` (which serves the VM).
fn check_patterns(gw: &Gateway) {
    qemu_io_ok(
        &gw.uri("vm1/disk0"),
        &[
            "read -P 0x11 4M 2M",
            "read -P 0x22 6M 1M",
            "read -P 0x11 7M 5M",
            "read -P 0 12M 1M",
        ],
    );
    qemu_io_ok(&gw.uri("vm1data/disk0"), &["read -P 0x33 1M 2M"]);
    // The snapshot reads as it was: a clone of it (made here, after the
    // move) has 0x11 where the live layer has 0x22.
    let c = api(
        &gw.control(),
        "POST",
        "/v1/luns/vm1/clone",
        Some(json!({"snapshot": "s1", "name": "vm1-s1"})),
        201,
    );
    let export = c["exports"][0].as_str().unwrap().to_string();
    qemu_io_ok(&gw.uri(&export), &["read -P 0x11 4M 8M"]);
}

fn has_vm(pool: &Path) -> bool {
    let lun = pool.join("vm1.lun").is_file();
    assert_eq!(
        lun,
        pool.join("vm1data.lun").is_file(),
        "a VM's disks must be in one pool: {:?}",
        tree(pool)
    );
    lun
}

/// `lungate move ARGS` to its end: (exit 0, stdout, stderr).
fn lungate_move(args: &[&str]) -> (bool, String, String) {
    let out = run_timeout(
        Command::new(bin("lungate")).arg("move").args(args),
        Duration::from_secs(120),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_vm_with_a_snapshot_and_a_secondary_moves_offline_and_serves_from_the_new_pool() {
    let (a, b) = (pool_dir(), pool_dir());
    let (a_s, b_s) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    let before = make_vm(a.path());

    let t = Instant::now();
    let (ok, res, all) = lunctl_migrate(&["vm1", "--pool", a_s, "--to-pool", b_s]);
    assert!(ok, "lunctl migrate --to-pool (offline) failed: {all}");
    eprintln!("offline move: {res} in {:?}", t.elapsed());
    assert_eq!(res["type"], "result", "{all}");
    assert_eq!(res["phase"], "done", "{res}");
    assert_eq!(res["direction"], "local", "{res}");
    assert_eq!(res["members"], json!(["vm1", "vm1data"]), "{res}");
    assert!(res["bytes"].as_u64().unwrap() >= 11 << 20, "{res}");

    // The source pool has nothing of the VM left, not even a record.
    assert!(!has_vm(a.path()));
    let left: Vec<_> = clean_tree(a.path())
        .into_iter()
        .filter(|p| p.starts_with(".lungate-migrations") || p.to_string_lossy().contains("vm1"))
        .collect();
    assert!(left.is_empty(), "left in the source pool: {left:?}");
    assert!(has_vm(b.path()));

    let gw = Gateway::start(&["--pool", b_s]);
    assert_eq!(contents(&gw), before);
    check_patterns(&gw);
    gw.stop_ok();
}

#[test]
fn an_offline_move_is_refused_with_its_reason_and_creates_nothing() {
    let (a, b) = (pool_dir(), pool_dir());
    let (a_s, b_s) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    make_vm(a.path());
    create_lun(b.path(), "vm1", "offset", &["16M"], "16M");
    let (tree_a, tree_b) = (tree(a.path()), tree(b.path()));

    // The target pool has a LUN of that name already.
    let (ok, _, all) = lunctl_migrate(&["vm1", "--pool", a_s, "--to-pool", b_s]);
    assert!(!ok, "the move succeeded over an existing LUN: {all}");
    assert!(
        all.contains("vm1.lun"),
        "the refusal names no reason: {all}"
    );
    assert_eq!(clean_tree(a.path()), tree_a);
    assert_eq!(clean_tree(b.path()), tree_b);

    // The same pool twice.
    let (ok, _, err) = lungate_move(&["vm1", "--pool", a_s, "--to-pool", a_s]);
    assert!(!ok && err.contains("already in pool"), "{err}");
    assert_eq!(clean_tree(a.path()), tree_a);

    // A gateway serves the VM: `lungate move` leaves it to that gateway.
    let gw = Gateway::start(&["--pool", a_s]);
    let (ok, _, err) = lungate_move(&["vm1", "--pool", a_s, "--to-pool", b_s]);
    assert!(!ok, "lungate move ran under a serving gateway");
    assert!(
        err.contains("served by a gateway") || err.contains("is served by lungate"),
        "{err}"
    );
    assert_eq!(clean_tree(a.path()), tree_a);
    assert_eq!(clean_tree(b.path()), tree_b);
    gw.stop_ok();

    // ... also when its control socket is elsewhere: the LUN's lock says so.
    let sock = tempfile::tempdir().unwrap();
    let sock_s = sock.path().join("control.sock");
    let gw = Gateway::start(&["--pool", a_s, "--control", sock_s.to_str().unwrap()]);
    let (ok, _, err) = lungate_move(&["vm1", "--pool", a_s, "--to-pool", b_s]);
    assert!(!ok, "lungate move ran under a serving gateway");
    assert!(err.contains("is served by lungate"), "{err}");
    assert_eq!(clean_tree(a.path()), tree_a);
    assert_eq!(clean_tree(b.path()), tree_b);
    check_patterns(&gw);
    gw.stop_ok();
}

/// Start `lungate move vm1` stalled at `step`, and SIGKILL it there.
fn kill_move_at(a_s: &str, b_s: &str, step: &str) {
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("move.log");
    let mut child = Command::new(bin("lungate"))
        .args(["move", "vm1", "--pool", a_s, "--to-pool", b_s])
        .env("LUNGATE_TEST_MIGRATION_STALL", format!("{step}:60000"))
        .env("LUNGATE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let want = format!("migration stalled at {step}");
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&want) {
            break;
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("lungate move exited ({s}) before {step}:\n{text}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never stalled at {step}:\n{text}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL, by PID
    child.wait().unwrap();
}

#[test]
fn a_move_killed_at_any_step_leaves_one_pool_with_the_vm_and_running_it_again_finishes() {
    // Where the VM is after a SIGKILL at each step, once a gateway of both
    // pools has recovered: before the target's commit record, in the
    // source pool; from it on, in the target pool.
    let steps = [
        ("prepared", false),
        ("copied", false),
        ("committing", false),
        ("committed", true),
        ("forwarding", true),
    ];
    for (step, moved) in steps {
        for by_gateway in [true, false] {
            let (a, b) = (pool_dir(), pool_dir());
            let (a_s, b_s) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
            let before = make_vm(a.path());
            kill_move_at(a_s, b_s, step);
            let how = if by_gateway {
                "a gateway"
            } else {
                "lunctl migrate again"
            };
            if by_gateway {
                let gw = Gateway::start(&["--pool", a_s, "--pool", b_s]);
                assert_eq!(
                    (has_vm(a.path()), has_vm(b.path())),
                    (!moved, moved),
                    "killed at {step}:\n{}",
                    gw.stderr_log()
                );
                assert_eq!(contents(&gw), before, "killed at {step}, recovered");
                gw.stop_ok();
            }
            if !by_gateway || !moved {
                // The same command again finishes the move (after the
                // commit, recovery alone does).
                let (ok, res, all) = lunctl_migrate(&["vm1", "--pool", a_s, "--to-pool", b_s]);
                assert!(ok, "killed at {step}, then {how}: {all}");
                assert_eq!(res["phase"], "done", "{res}");
            }
            assert!(
                !has_vm(a.path()) && has_vm(b.path()),
                "killed at {step}, then {how}: {:?} {:?}",
                tree(a.path()),
                tree(b.path())
            );
            let gw = Gateway::start(&["--pool", b_s]);
            assert_eq!(contents(&gw), before, "killed at {step}, then {how}");
            check_patterns(&gw);
            gw.stop_ok();
            eprintln!("killed at {step}, then {how}: one pool has the VM, whole");
        }
    }
}

/// Recovery by a gateway that serves only the source pool: the record of
/// a local move names the target pool, whose records decide. Killed after
/// the target's commit record, the source's copy is retired (never served
/// again, so the target pool is the one owner); killed before it, the VM
/// stays in the source pool and the target pool serves nothing of it.
#[test]
fn a_killed_move_recovered_by_a_gateway_of_the_source_pool_alone_leaves_one_owner() {
    for (step, moved) in [("committing", false), ("committed", true)] {
        let (a, b) = (pool_dir(), pool_dir());
        let (a_s, b_s) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
        let before = make_vm(a.path());
        kill_move_at(a_s, b_s, step);
        let gw = Gateway::start(&["--pool", a_s]);
        let served = contents_or_none(&gw);
        assert_eq!(
            served.is_some(),
            !moved,
            "killed at {step}: the source pool's gateway {} the VM:\n{}",
            if moved { "serves" } else { "does not serve" },
            gw.stderr_log()
        );
        if let Some(c) = served {
            assert_eq!(c, before, "killed at {step}");
        }
        gw.stop_ok();
        assert_eq!(
            has_vm(a.path()),
            !moved,
            "killed at {step}: {:?}",
            tree(a.path())
        );
        let gw = Gateway::start(&["--pool", b_s]);
        let there = contents_or_none(&gw);
        assert_eq!(
            there.is_some(),
            moved,
            "killed at {step}:\n{}",
            gw.stderr_log()
        );
        if let Some(c) = there {
            assert_eq!(c, before, "killed at {step}, on the target pool");
        }
        gw.stop_ok();
    }
}

/// [`contents`] when the gateway serves the VM's exports, else `None`.
fn contents_or_none(gw: &Gateway) -> Option<Contents> {
    let out = run_ok(Command::new(require_tool("nbdinfo")).args(["--list", &gw.unix_uri("")]));
    String::from_utf8_lossy(&out.stdout)
        .contains("vm1/disk0")
        .then(|| contents(gw))
}
