//! Replication with checkpoints and failover end to end (docs/migration.md,
//! "Replication and failover"): two real gateways on 127.0.0.1 with a pool
//! each, `lunctl replicate --every 1s` while the sequence-numbered writer
//! runs on the source, then a SIGKILL of the source and `lunctl failover`
//! on the target. Checkpoints are compared with the source's snapshots of
//! the same name byte for byte, through NBD exports of clones on both
//! sides.

#[path = "migrate_common.rs"]
mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

use lungate_api::nbd::client::{Address, NbdClient};
use lungate_tests::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// blake3 of a whole export, read through NBD.
fn export_hash(addr: &Address, export: &str) -> String {
    let mut c = NbdClient::connect(addr, export).unwrap_or_else(|e| panic!("{export}: {e}"));
    let size = c.size();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(MIB) as usize;
        c.read_at(at, &mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        at += n as u64;
    }
    c.disconnect().unwrap();
    h.finalize().to_hex().to_string()
}

fn lunctl_json(args: &[&str]) -> (bool, Value, String) {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = run_timeout(
        std::process::Command::new(bin("lunctl")).args(&full),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str::<Value>(&stdout)
        .ok()
        .or_else(|| {
            stdout
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Value>(l).ok())
        })
        .unwrap_or(Value::Null);
    let all = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), v, all)
}

/// The replication of `lun` as the gateway serving `pool` lists it.
fn replication(pool: &Path, lun: &str, side: &str) -> Option<Value> {
    let (ok, v, all) = lunctl_json(&["replications", "--pool", pool.to_str().unwrap()]);
    assert!(ok, "{all}");
    v.as_array()
        .unwrap()
        .iter()
        .find(|r| r["lun"] == lun && r["side"] == side)
        .cloned()
}

fn ok_cycles(r: &Value) -> Vec<Value> {
    r["cycles"]
        .as_array()
        .map(|c| c.iter().filter(|c| c["error"].is_null()).cloned().collect())
        .unwrap_or_default()
}

/// Wait until the source's job has `n` successful cycles; its state.
fn wait_cycles(pool: &Path, lun: &str, n: usize, src: &Gateway, dst: &Gateway) -> Value {
    let t = Instant::now();
    loop {
        let r = replication(pool, lun, "source").expect("the source lists its replication");
        if ok_cycles(&r).len() >= n {
            return r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "{n} cycles did not complete: {r}\nsource:\n{}\ntarget:\n{}",
            src.stderr_log(),
            dst.stderr_log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn snapshot_names(sock: &Path, lun: &str) -> Vec<String> {
    let v = api(sock, "GET", &format!("/v1/luns/{lun}/snapshots"), None, 200);
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// The hash of snapshot `snap` of `lun`'s first disk, through a clone.
fn snapshot_hash(gw: &Gateway, lun: &str, snap: &str) -> String {
    let c = api(
        &gw.control(),
        "POST",
        &format!("/v1/luns/{lun}/clone"),
        Some(json!({"snapshot": snap, "name": format!("{lun}-{snap}")})),
        201,
    );
    export_hash(&tcp(gw), c["exports"][0].as_str().unwrap())
}

#[test]
fn checkpoints_ship_incrementally_and_a_failover_serves_the_newest() {
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vm1", "offset", &["64M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    let src = Gateway::start(&["--pool", a_s]);
    let dst = Gateway::start(&["--pool", b_s, "--migration-listen", "127.0.0.1:0"]);
    let to = migration_addr(&dst);
    let export = "vm1/disk0";
    // 16 MiB beyond the writer's blocks: the first cycle carries it, the
    // later ones must not.
    fill(&tcp(&src), export, 16 * MIB, 16 << 20, 5);
    let (stop, count, h) = run_writer(Address::Tcp(src.addr()), export);
    wait_ops(&count, 200);

    let (ok, res, all) = lunctl_json(&[
        "replicate",
        "vm1",
        "--pool",
        a_s,
        "--to",
        &to,
        "--every",
        "1s",
        "--keep",
        "4",
    ]);
    assert!(ok, "{all}");
    assert_eq!(res["state"], "running", "{res}");
    let r = wait_cycles(a.path(), "vm1", 3, &src, &dst);
    let cycles = ok_cycles(&r);
    eprintln!("cycles: {}", serde_json::to_string(&cycles).unwrap());
    assert!(cycles[0]["bytes"].as_u64().unwrap() >= 16 * MIB, "{r}");
    for c in &cycles[1..] {
        // Only the increment: the layer frozen since the last checkpoint
        // (the writer touches 4 MiB) and the label ranges.
        assert!(c["bytes"].as_u64().unwrap() < 8 * MIB, "{r}");
        assert!(c["layers_reused"].as_u64().unwrap() >= 1, "{r}");
    }
    let rep = replication(b.path(), "vm1", "replica").expect("the target lists the replica");
    assert!(rep["checkpoint"]["name"].as_str().is_some(), "{rep}");
    // Not exported on the target.
    assert!(NbdClient::connect(&tcp(&dst), export).is_err());
    assert!(!b.path().join("vm1.lun").exists());

    // A restarted replication resumes from the checkpoint both sides hold.
    let (ok, _, all) = lunctl_json(&["replicate", "vm1", "--pool", a_s, "--stop"]);
    assert!(ok, "{all}");
    thread::sleep(Duration::from_millis(300));
    let (ok, _, all) = lunctl_json(&[
        "replicate",
        "vm1",
        "--pool",
        a_s,
        "--to",
        &to,
        "--every",
        "1s",
        "--keep",
        "4",
    ]);
    assert!(ok, "{all}");
    let r = wait_cycles(a.path(), "vm1", 2, &src, &dst);
    let again = ok_cycles(&r);
    assert!(again[0]["bytes"].as_u64().unwrap() < 8 * MIB, "{r}");
    assert!(again[0]["layers_reused"].as_u64().unwrap() >= 1, "{r}");

    stop.store(true, Ordering::Relaxed);
    let seen = h.join().unwrap();
    assert_clean(&seen);
    // One more checkpoint after the writer stopped, then the source dies.
    let n = ok_cycles(&r).len();
    wait_cycles(a.path(), "vm1", n + 1, &src, &dst);
    let mut src = src;
    src.send_signal(libc::SIGKILL);
    src.wait_exit(Duration::from_secs(10));
    drop(src);

    let (ok, fo, all) = lunctl_json(&["failover", "vm1", "--pool", b_s]);
    assert!(ok, "{all}\ntarget:\n{}", dst.stderr_log());
    let cp = fo["checkpoint"]["name"].as_str().unwrap().to_string();
    assert_eq!(fo["exports"], json!(["vm1/disk0"]), "{fo}");
    eprintln!("failed over to {cp}: {fo}");
    assert!(b.path().join("vm1.lun").is_file());
    assert!(!b
        .path()
        .join(".lungate-replicas")
        .read_dir()
        .map(|mut d| d.next().is_some())
        .unwrap_or(false));
    // A second failover has nothing to promote.
    let (ok, _, all) = lunctl_json(&["failover", "vm1", "--pool", b_s]);
    assert!(!ok && all.contains("no replica"), "{all}");

    // The source's copy, read after a restart: the promoted LUN is its
    // snapshot `cp`, and every checkpoint both keep reads the same.
    let src = Gateway::start(&["--pool", a_s]);
    let served = export_hash(&tcp(&dst), export);
    let here = snapshot_names(&src.control(), "vm1");
    let there = snapshot_names(&dst.control(), "vm1");
    assert!(
        there.contains(&cp) && here.contains(&cp),
        "{here:?} {there:?}"
    );
    assert_eq!(served, snapshot_hash(&src, "vm1", &cp));
    let mut seen_hashes = std::collections::HashSet::new();
    seen_hashes.insert(served.clone());
    for s in there.iter().filter(|s| here.contains(s) && **s != cp) {
        let h = snapshot_hash(&src, "vm1", s);
        assert_eq!(h, snapshot_hash(&dst, "vm1", s), "checkpoint {s}");
        seen_hashes.insert(h);
    }
    // Checkpoints taken while the writer ran differ from each other.
    assert!(seen_hashes.len() >= 2, "{here:?} {there:?}");
    assert_eq!(snapshot_hash(&dst, "vm1", &cp), served);
    // The promoted LUN takes writes and survives a restart of its gateway.
    fill(&tcp(&dst), export, 0, 1 << 20, 9);
    src.stop_ok();
    dst.stop_ok();
}

#[test]
fn a_refused_replica_creates_nothing_on_the_target() {
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vm2", "offset", &["16M"], "16M");
    create_lun(b.path(), "vm2", "offset", &["16M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    let src = Gateway::start(&["--pool", a_s]);
    let dst = Gateway::start(&["--pool", b_s, "--migration-listen", "127.0.0.1:0"]);
    let to = migration_addr(&dst);
    let before = clean_tree(b.path());
    let (ok, _, all) = lunctl_json(&[
        "replicate",
        "vm2",
        "--pool",
        a_s,
        "--to",
        &to,
        "--every",
        "200ms",
    ]);
    assert!(ok, "{all}");
    let t = Instant::now();
    let r = loop {
        let r = replication(a.path(), "vm2", "source").unwrap();
        if r["cycles"].as_array().is_some_and(|c| c.len() >= 2) {
            break r;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{r}");
        thread::sleep(Duration::from_millis(50));
    };
    let err = r["error"].as_str().unwrap_or_default();
    assert!(err.contains("already has"), "{r}");
    assert!(ok_cycles(&r).is_empty(), "{r}");
    let (ok, _, all) = lunctl_json(&["replicate", "vm2", "--pool", a_s, "--stop"]);
    assert!(ok, "{all}");
    thread::sleep(Duration::from_millis(500));
    assert_eq!(clean_tree(b.path()), before);
    assert!(replication(b.path(), "vm2", "replica").is_none());
    // A refused cycle's snapshot is no checkpoint: the source deleted it.
    let snaps = snapshot_names(&src.control(), "vm2");
    assert!(snaps.is_empty(), "{snaps:?}");
    // And nothing to fail over.
    let (ok, _, all) = lunctl_json(&["failover", "vm2", "--pool", b_s]);
    assert!(!ok && all.contains("no replica"), "{all}");
    src.stop_ok();
    dst.stop_ok();
}

#[test]
fn a_failover_refuses_without_a_checkpoint_or_while_receiving_unless_forced() {
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vm3", "offset", &["16M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    let src = Gateway::start(&["--pool", a_s]);
    // Every cycle waits 2 s on the target, received and verified, before
    // its commit.
    let dst = Gateway::start_env(
        &["--pool", b_s, "--migration-listen", "127.0.0.1:0"],
        &[("LUNGATE_TEST_MIGRATION_STALL", "replica-commit:2000")],
    );
    let to = migration_addr(&dst);
    let first = fill(&tcp(&src), "vm3/disk0", 0, 1 << 20, 21);
    let (ok, _, all) = lunctl_json(&[
        "replicate",
        "vm3",
        "--pool",
        a_s,
        "--to",
        &to,
        "--every",
        "200ms",
    ]);
    assert!(ok, "{all}");
    // The first cycle is being received: no checkpoint is complete.
    let t = Instant::now();
    while !dst
        .stderr_log()
        .contains("migration stalled at replica-commit")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{}",
            dst.stderr_log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let (ok, _, all) = lunctl_json(&["failover", "vm3", "--pool", b_s]);
    assert!(!ok, "{all}");
    assert!(all.contains("no complete checkpoint"), "{all}");
    // After it, the next cycle is received (stalled) again.
    wait_cycles(a.path(), "vm3", 1, &src, &dst);
    let second = fill(&tcp(&src), "vm3/disk0", 0, 1 << 20, 22);
    assert_ne!(first, second);
    thread::sleep(Duration::from_millis(500));
    let rep = replication(b.path(), "vm3", "replica").unwrap();
    assert_eq!(rep["state"], "receiving", "{rep}");
    assert_eq!(rep["checkpoint"]["name"], "replica-1", "{rep}");
    let (ok, _, all) = lunctl_json(&["failover", "vm3", "--pool", b_s]);
    assert!(!ok && all.contains("receiving a cycle"), "{all}");
    let (ok, fo, all) = lunctl_json(&["failover", "vm3", "--pool", b_s, "--force"]);
    assert!(ok, "{all}\n{}", dst.stderr_log());
    assert_eq!(fo["aborted_cycle"], true, "{fo}");
    assert_eq!(fo["checkpoint"]["name"], "replica-1", "{fo}");
    // The promoted LUN is the first checkpoint, not the aborted cycle's.
    assert_eq!(read(&tcp(&dst), "vm3/disk0", 0, 1 << 20), first);
    let (ok, _, all) = lunctl_json(&["replicate", "vm3", "--pool", a_s, "--stop"]);
    assert!(ok, "{all}");
    src.stop_ok();
    dst.stop_ok();
}

#[test]
fn a_target_killed_mid_cycle_keeps_its_checkpoint_and_the_next_cycle_is_incremental() {
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vm4", "offset", &["32M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    let src = Gateway::start(&["--pool", a_s]);
    // A fixed port, so the restarted target is where the source dials.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut dst = Gateway::start_env(
        &["--pool", b_s, "--migration-listen", &listen],
        &[("LUNGATE_TEST_MIGRATION_STALL", "replica-commit:1500")],
    );
    let first = fill(&tcp(&src), "vm4/disk0", 0, 8 << 20, 41);
    let (ok, _, all) = lunctl_json(&[
        "replicate",
        "vm4",
        "--pool",
        a_s,
        "--to",
        &listen,
        "--every",
        "200ms",
    ]);
    assert!(ok, "{all}");
    wait_cycles(a.path(), "vm4", 1, &src, &dst);
    let second = fill(&tcp(&src), "vm4/disk0", 0, 1 << 20, 42);
    // The next cycle is received and verified, stalled before its commit:
    // the target dies there.
    let t = Instant::now();
    while dst
        .stderr_log()
        .matches("migration stalled at replica-commit")
        .count()
        < 2
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{}",
            dst.stderr_log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    dst.send_signal(libc::SIGKILL);
    dst.wait_exit(Duration::from_secs(10));
    drop(dst);
    let dir = b.path().join(".lungate-replicas");
    let replica = dir.read_dir().unwrap().next().unwrap().unwrap().path();
    let rec: Value =
        serde_json::from_slice(&std::fs::read(replica.join("replica.json")).unwrap()).unwrap();
    assert_eq!(rec["checkpoint"]["name"], "replica-1", "{rec}");

    // The fixed port may be briefly taken (an ephemeral port of some other
    // connection on this host, or the source's own retry dialling it
    // connecting to itself): try again for a while.
    let mut tries = 0;
    let dst = loop {
        match Gateway::try_start(&["--pool", b_s, "--migration-listen", &listen]) {
            Ok(g) => break g,
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("restarting the target: {e}; again");
                thread::sleep(Duration::from_millis(250));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let before = ok_cycles(&replication(a.path(), "vm4", "source").unwrap()).len();
    let r = wait_cycles(a.path(), "vm4", before + 1, &src, &dst);
    let c = ok_cycles(&r).last().unwrap().clone();
    assert!(c["bytes"].as_u64().unwrap() < 4 << 20, "{r}");
    assert!(c["layers_reused"].as_u64().unwrap() >= 1, "{r}");
    let (ok, _, all) = lunctl_json(&["replicate", "vm4", "--pool", a_s, "--stop"]);
    assert!(ok, "{all}");
    thread::sleep(Duration::from_millis(500));
    // What the killed cycle left was cleaned up (a cycle that was arriving
    // when the replication stopped ends too).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while replica.join("incoming").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "incoming/ stays: {}",
            dst.stderr_log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let (ok, fo, all) = lunctl_json(&["failover", "vm4", "--pool", b_s]);
    assert!(ok, "{all}\n{}", dst.stderr_log());
    eprintln!("failed over: {fo}");
    let got = read(&tcp(&dst), "vm4/disk0", 0, 8 << 20);
    assert_eq!(got[..1 << 20], second[..]);
    assert_eq!(got[1 << 20..], first[1 << 20..]);
    src.stop_ok();
    dst.stop_ok();
}
