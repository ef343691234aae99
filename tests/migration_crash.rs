//! SIGKILL of the source or the target gateway at each step of a live
//! migration (the test hook `LUNGATE_TEST_MIGRATION_STALL=STEP:MS` holds
//! the migration at that step so the kill lands there), then a restart:
//! exactly one gateway owns the LUN afterwards (its file is in exactly one
//! pool, exactly one gateway serves the export) and it reads back every
//! write the client saw acknowledged.

#[path = "migrate_common.rs"]
mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use lungate_api::nbd::client::NbdClient;
use lungate_tests::*;

const STALL_MS: &str = "20000";

fn wait_log(gw: &Gateway, what: &str) {
    let t = Instant::now();
    while !gw.stderr_log().contains(what) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never logged {what:?}:\n{}",
            gw.stderr_log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn serves(gw: &Gateway, export: &str) -> bool {
    NbdClient::connect(&tcp(gw), export).is_ok()
}

/// Exactly one of the two pools holds the LUN, and the gateway on it
/// serves it with the writer's data; the other does not serve it.
fn one_owner(
    owner: &Gateway,
    owner_pool: &Path,
    other: &Gateway,
    other_pool: &Path,
    model: &[u64],
) {
    let export = "vm/disk0";
    assert!(
        owner_pool.join("vm.lun").is_file(),
        "the owner's pool lost the LUN"
    );
    assert!(
        !other_pool.join("vm.lun").exists(),
        "both pools hold the LUN"
    );
    let t = Instant::now();
    while !serves(owner, export) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the owner does not serve the LUN:\n{}",
            owner.stderr_log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(!serves(other, export), "both gateways serve the LUN");
    verify(&tcp(owner), export, model);
}

/// Write through the source until `count` ops, then stop and return what
/// the writer saw acknowledged.
fn some_writes(gw: &Gateway) -> Seen {
    let (stop, count, h) = run_writer(tcp(gw), "vm/disk0");
    wait_ops(&count, 400);
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().unwrap();
    assert!(seen.failures.is_empty() && seen.mismatches == 0);
    seen
}

struct Setup {
    a: tempfile::TempDir,
    b: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let (a, b) = (pool_dir(), pool_dir());
        create_lun(a.path(), "vm", "offset", &["32M"], "16M");
        Setup { a, b }
    }
    fn a(&self) -> &str {
        self.a.path().to_str().unwrap()
    }
    fn b(&self) -> &str {
        self.b.path().to_str().unwrap()
    }
    fn source(&self, stall: Option<&str>) -> Gateway {
        let env: Vec<(&str, String)> = stall
            .map(|s| ("LUNGATE_TEST_MIGRATION_STALL", format!("{s}:{STALL_MS}")))
            .into_iter()
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Gateway::start_env(&["--pool", self.a()], &env)
    }
    fn target(&self, stall: Option<&str>, port: &str) -> Gateway {
        let env: Vec<(&str, String)> = stall
            .map(|s| ("LUNGATE_TEST_MIGRATION_STALL", format!("{s}:{STALL_MS}")))
            .into_iter()
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Gateway::start_env(
            &[
                "--pool",
                self.b(),
                "--migration-listen",
                &format!("127.0.0.1:{port}"),
            ],
            &env,
        )
    }
    /// Start `lunctl migrate` in the background (it fails or hangs when a
    /// gateway dies under it; only the gateways' state is checked).
    fn migrate(&self, to: &str) -> thread::JoinHandle<(bool, serde_json::Value, String)> {
        let (a, to) = (self.a().to_string(), to.to_string());
        thread::spawn(move || lunctl_migrate(&["vm", "--pool", &a, "--to", &to]))
    }
}

fn port_of(addr: &str) -> String {
    addr.rsplit_once(':').unwrap().1.to_string()
}

/// The source dies before its commit (at each of its steps before it): on
/// restart it owns the LUN; the target removed its staging.
#[test]
fn the_source_killed_before_the_commit_keeps_the_lun() {
    for step in ["prepared", "copied", "paused", "committing"] {
        let s = Setup::new();
        let src = s.source(Some(step));
        let dst = s.target(None, "0");
        let to = migration_addr(&dst);
        let seen = some_writes(&src);
        let m = s.migrate(&to);
        wait_log(&src, &format!("migration stalled at {step}"));
        drop(src); // SIGKILL
        let _ = m.join();
        let src = s.source(None);
        one_owner(&src, s.a.path(), &dst, s.b.path(), &seen.model);
        assert!(
            !s.b.path().join("vm.layers").exists(),
            "{step}: the target kept a staged copy"
        );
        // It can migrate again, to the end.
        let (ok, res, all) = lunctl_migrate(&["vm", "--pool", s.a(), "--to", &to]);
        assert!(ok, "{step}: the second migration failed: {all}");
        assert_eq!(res["phase"], "done");
        one_owner(&dst, s.b.path(), &src, s.a.path(), &seen.model);
        eprintln!("source killed at {step}: one owner, data intact");
    }
}

/// The target dies after its commit record, before it answered: the
/// source waits (guests paused, nothing served twice); the restarted
/// target finishes the commit and owns the LUN; the source retires its
/// copy.
#[test]
fn the_target_killed_after_its_commit_owns_the_lun_after_restart() {
    let s = Setup::new();
    let src = s.source(None);
    let dst = s.target(Some("committed"), "0");
    let to = migration_addr(&dst);
    let port = port_of(&to);
    let seen = some_writes(&src);
    let m = s.migrate(&to);
    wait_log(&dst, "migration stalled at committed");
    drop(dst); // SIGKILL
    let dst = s.target(None, &port);
    let (ok, res, all) = m.join().unwrap();
    assert!(
        ok,
        "the migration did not complete after the target's restart: {all}"
    );
    assert_eq!(res["phase"], "done");
    one_owner(&dst, s.b.path(), &src, s.a.path(), &seen.model);
}

/// The target dies before its commit: the source keeps the LUN (the
/// migration fails there) and the restarted target removes its staging.
#[test]
fn the_target_killed_before_its_commit_leaves_the_source_owner() {
    let s = Setup::new();
    let src = s.source(Some("copied"));
    let dst = s.target(None, "0");
    let to = migration_addr(&dst);
    let port = port_of(&to);
    let seen = some_writes(&src);
    let m = s.migrate(&to);
    wait_log(&src, "migration stalled at copied");
    drop(dst); // SIGKILL, with a staging area in its pool
    let dst = s.target(None, &port);
    let (ok, _res, all) = m.join().unwrap();
    assert!(!ok, "{all}");
    one_owner(&src, s.a.path(), &dst, s.b.path(), &seen.model);
    let left: Vec<_> = std::fs::read_dir(s.b.path().join(".lungate-migrations"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the target kept {left:?}");
}
