//! Planned handover of RBD LUNs between two gateways on one Ceph cluster,
//! coordinated through etcd (docs/scale-out.md): `lunctl --coordinator …
//! migrate NAME --to HOST:PORT` on an RBD LUN moves its ownership (the
//! etcd key, the RBD exclusive lock, the fence key) to the other gateway
//! with no data copy, while an NBD client writes sequence-numbered blocks
//! on a connection to the old owner and reads each back. Every request
//! must succeed; the connection is forwarded to the new owner.
//!
//! Needs the `rbd` feature (tests/Cargo.toml); the throwaway cluster and
//! etcd start here.

#[path = "migrate_common.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use lungate_tests::ceph::{Cluster, Etcd};
use lungate_tests::*;

/// The value of etcd key `key`, if it exists.
fn etcd_text(endpoint: &str, key: &str) -> Option<String> {
    let out = run_ok(
        std::process::Command::new(require_tool("etcdctl"))
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", endpoint, "get", "--print-value-only", key]),
    );
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!v.is_empty()).then_some(v)
}

/// The PID etcd names as the owner of LUN `name` in namespace `ns`.
fn owner_pid(ep: &str, ns: &str, name: &str) -> Option<u32> {
    let v = etcd_text(ep, &format!("/lungate/luns/rbd/{ns}/{name}.lun"))?;
    let v: serde_json::Value = serde_json::from_str(&v).expect("owner value is JSON");
    v["pid"].as_u64().map(|p| p as u32)
}

/// The exports a gateway lists.
fn listed(gw: &Gateway) -> Vec<String> {
    let out = run_ok(
        std::process::Command::new(require_tool("nbdinfo")).args(["--list", &gw.unix_uri("")]),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export=\"")?.strip_suffix("\":"))
        .map(str::to_string)
        .collect()
}

/// Clients holding the RBD exclusive lock of `rbd/NS/IMAGE`.
fn lockers(c: &Cluster, image: &str) -> usize {
    c.rbd(&["lock", "ls", image]).matches("client.").count()
}

/// Two gateways on pool `rbd/NS` and one etcd: `a` starts first and owns
/// the LUNs made before; `b` has a migration listener. `a_env` goes to
/// `a` (test hooks).
struct Pair {
    ep: String,
    pool: String,
    a: Gateway,
    b: Gateway,
    _etcd: Etcd,
    _work: tempfile::TempDir,
}

fn pair(ns: &str, luns: &[&str], a_env: &[(&str, &str)]) -> Pair {
    pair_env(ns, luns, a_env, &[])
}

/// [`pair`], with `b_env` for `b`.
fn pair_env(ns: &str, luns: &[&str], a_env: &[(&str, &str)], b_env: &[(&str, &str)]) -> Pair {
    let c = Cluster::shared();
    let etcd = Etcd::start();
    let ep = etcd.endpoint.trim_start_matches("http://").to_string();
    let pool = c.pool(ns);
    for n in luns {
        let out = lunctl(&[
            "create", "--pool", &pool, "--disk", "8M", "--memory", "4M", n,
        ]);
        assert_success("lunctl create", &out);
    }
    let work = tempfile::tempdir().expect("tempdir");
    let cfg = work.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[coordinator]\nlease_ttl = 3\n[migration]\ntimeout = 5\n",
    )
    .expect("config");
    let coord = format!("etcd://{ep}");
    let args = |n: &str| -> Vec<String> {
        vec![
            "--config".into(),
            cfg.display().to_string(),
            "--pool".into(),
            pool.clone(),
            "--coordinator".into(),
            coord.clone(),
            "--control".into(),
            work.path().join(format!("{n}.sock")).display().to_string(),
            "--migration-listen".into(),
            "127.0.0.1:0".into(),
        ]
    };
    let a_args = args("a");
    let a = Gateway::start_env(
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
        a_env,
    );
    let want: Vec<String> = luns.iter().map(|n| format!("{n}/disk0")).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !want.iter().all(|e| listed(&a).contains(e)) {
        assert!(
            Instant::now() < deadline,
            "gateway a does not serve {want:?}: {}",
            a.stderr_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let b_args = args("b");
    let b = Gateway::start_env(
        &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
        b_env,
    );
    Pair {
        ep,
        pool,
        a,
        b,
        _etcd: etcd,
        _work: work,
    }
}

impl Pair {
    fn lunctl_migrate(&self, name: &str, extra: &[&str]) -> (bool, serde_json::Value, String) {
        let coord = format!("etcd://{}", self.ep);
        let to = migration_addr(&self.b);
        let mut args = vec![
            "--coordinator",
            &coord,
            "--pool",
            &self.pool,
            name,
            "--to",
            &to,
        ];
        args.extend_from_slice(extra);
        lunctl_migrate(&args)
    }

    /// Start `lunctl migrate NAME --to b` in a thread and wait until
    /// `gateway`'s log says the migration stalled at `step` (a
    /// `LUNGATE_TEST_MIGRATION_STALL` of that gateway); the thread answers
    /// what `lunctl migrate` did.
    fn migrate_until_stalled(
        &self,
        name: &str,
        gateway: &Gateway,
        step: &str,
    ) -> std::thread::JoinHandle<(bool, serde_json::Value, String)> {
        let (ep, pool, to, name) = (
            self.ep.clone(),
            self.pool.clone(),
            migration_addr(&self.b),
            name.to_string(),
        );
        let h = std::thread::spawn(move || {
            let coord = format!("etcd://{ep}");
            lunctl_migrate(&["--coordinator", &coord, "--pool", &pool, &name, "--to", &to])
        });
        let want = format!("migration stalled at {step}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !gateway.stderr_log().contains(&want) {
            assert!(
                Instant::now() < deadline,
                "no stall: {}",
                gateway.stderr_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        h
    }
}

/// The planned handover: zero failed or mismatched requests on the
/// connection the client had to the old owner, which is forwarded; the
/// new owner holds the etcd key, the only RBD lock and the fence key, and
/// serves every block and the snapshot tree; the old one serves nothing.
#[test]
fn a_planned_handover_under_a_sequence_numbered_writer_loses_and_fails_nothing() {
    let c = Cluster::shared();
    let mut p = pair("ho1", &["h1"], &[]);
    let coord = format!("etcd://{}", p.ep);
    let out = lunctl(&[
        "--coordinator",
        &coord,
        "snapshot",
        "--pool",
        &p.pool,
        "h1",
        "before",
    ]);
    assert_success("lunctl snapshot", &out);
    assert_eq!(owner_pid(&p.ep, "ho1", "h1"), Some(p.a.pid()));
    let (stop, count, h) = run_writer(tcp(&p.a), "h1/disk0");
    wait_ops(&count, 200);
    let (ok, v, all) = p.lunctl_migrate("h1", &[]);
    assert!(
        ok,
        "lunctl migrate failed: {all}\n--- a ---\n{}\n--- b ---\n{}",
        p.a.stderr_log(),
        p.b.stderr_log()
    );
    assert_eq!(v["phase"], "done", "{v}");
    eprintln!("handover report: {v}");
    assert!(v["pause_us"].as_u64().is_some(), "{v}");
    assert_eq!(v["bytes"], 0, "a handover copies nothing: {v}");
    // The forwarded connection keeps working.
    wait_ops(&count, 200);
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().expect("writer");
    assert_clean(&seen);
    // Exactly one owner, and it is b: etcd, the lock, the fence key.
    assert_eq!(owner_pid(&p.ep, "ho1", "h1"), Some(p.b.pid()));
    assert_eq!(lockers(c, "rbd/ho1/h1.lun"), 1);
    let fence = etcd_text(&p.ep, "/lungate/fence/rbd/ho1/h1.lun").expect("a fence key");
    let locks = c.rbd(&["lock", "ls", "rbd/ho1/h1.lun"]);
    assert!(
        locks.contains(fence.split('/').next().unwrap_or(&fence)),
        "the fence key {fence:?} does not name the lock holder: {locks}"
    );
    assert!(!listed(&p.a).contains(&"h1/disk0".to_string()));
    assert!(listed(&p.b).contains(&"h1/disk0".to_string()));
    // Every block reads back on the new owner, over a new connection.
    verify(&tcp(&p.b), "h1/disk0", &seen.model);
    // The tree came along (it lives in the image): the snapshot is there,
    // and a snapshot through lunctl now goes to b.
    let out = lunctl(&[
        "--coordinator",
        &coord,
        "--json",
        "snapshots",
        "--pool",
        &p.pool,
        "h1",
    ]);
    assert_success("lunctl snapshots", &out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"before\""),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = lunctl(&[
        "--coordinator",
        &coord,
        "snapshot",
        "--pool",
        &p.pool,
        "h1",
        "after",
    ]);
    assert_success("lunctl snapshot on the new owner", &out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("PID {}", p.b.pid())),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for l in p.a.stderr_log().lines().filter(|l| l.contains("handover")) {
        eprintln!("a: {l}");
    }
    for l in p.b.stderr_log().lines().filter(|l| l.contains("handover")) {
        eprintln!("b: {l}");
    }
    assert!(
        !p.a.stderr_log().contains(" ERROR "),
        "{}",
        p.a.stderr_log()
    );
    p.a.assert_running();
    p.b.assert_running();
}

/// `lunctl migrate --abort` at the last step before the commit (the
/// target holds the images' locks): the target closes them, the source
/// takes its locks back and goes on serving; nothing failed.
#[test]
fn an_aborted_handover_leaves_the_source_owning_and_serving() {
    let c = Cluster::shared();
    let mut p = pair(
        "ho2",
        &["h2"],
        &[("LUNGATE_TEST_MIGRATION_STALL", "committing:3000")],
    );
    let (stop, count, h) = run_writer(tcp(&p.a), "h2/disk0");
    wait_ops(&count, 100);
    let migrate = p.migrate_until_stalled("h2", &p.a, "committing");
    // The target holds the lock now.
    assert_eq!(lockers(c, "rbd/ho2/h2.lun"), 1);
    let coord = format!("etcd://{}", p.ep);
    let out = lunctl(&[
        "--coordinator",
        &coord,
        "migrate",
        "--pool",
        &p.pool,
        "h2",
        "--abort",
    ]);
    assert_success("lunctl migrate --abort", &out);
    let (ok, v, all) = migrate.join().expect("lunctl");
    assert!(!ok, "the migration should not complete: {all}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("Aborted") && e.contains("aborted by request")),
        "{v}\n{all}"
    );
    wait_ops(&count, 200);
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().expect("writer");
    assert_clean(&seen);
    assert_eq!(owner_pid(&p.ep, "ho2", "h2"), Some(p.a.pid()));
    assert_eq!(lockers(c, "rbd/ho2/h2.lun"), 1);
    assert!(listed(&p.a).contains(&"h2/disk0".to_string()));
    assert!(!listed(&p.b).contains(&"h2/disk0".to_string()));
    verify(&tcp(&p.a), "h2/disk0", &seen.model);
    // a still holds the lock: a write on a new connection works.
    qemu_io_ok(
        &p.a.uri("h2/disk0"),
        &["write -P 0x5a 0 4k", "read -P 0x5a 0 4k"],
    );
    assert!(
        !p.a.stderr_log().contains("breaking it"),
        "{}",
        p.a.stderr_log()
    );
    p.a.assert_running();
    p.b.assert_running();
}

/// SIGKILL of the source at the last step before the commit: etcd still
/// names it, so the target closes the images; once the dead source's
/// lease expires the target claims the LUN like any other and serves
/// every write the client saw answered.
#[test]
fn a_source_killed_before_the_handover_commit_fails_over_to_one_owner() {
    let c = Cluster::shared();
    let p = pair(
        "ho3",
        &["h3"],
        &[("LUNGATE_TEST_MIGRATION_STALL", "committing:10000")],
    );
    let (stop, count, h) = run_writer(tcp(&p.a), "h3/disk0");
    wait_ops(&count, 100);
    let migrate = p.migrate_until_stalled("h3", &p.a, "committing");
    let Pair {
        ep,
        a,
        mut b,
        _etcd,
        _work,
        ..
    } = p;
    let a_pid = a.pid();
    drop(a); // SIGKILL
    let (ok, _, _) = migrate.join().expect("lunctl");
    assert!(!ok);
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().expect("writer");
    assert!(!seen.failures.is_empty(), "the writer's gateway died");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listed(&b).contains(&"h3/disk0".to_string()) {
        assert!(
            Instant::now() < deadline,
            "b does not take the LUN over: {}",
            b.stderr_log()
        );
        let o = owner_pid(&ep, "ho3", "h3");
        assert!(
            o.is_none() || o == Some(a_pid) || o == Some(b.pid()),
            "{o:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(owner_pid(&ep, "ho3", "h3"), Some(b.pid()));
    assert_eq!(lockers(c, "rbd/ho3/h3.lun"), 1);
    // The write parked when the source died never ran: every write the
    // client saw answered, and nothing else, is on the new owner.
    verify(&tcp(&b), "h3/disk0", &seen.model);
    b.assert_running();
}

/// SIGKILL of the target after the commit point, before it serves: etcd
/// names it, so the source never serves the LUN on its own again (its
/// forwarded connection fails); once the dead target's lease expires the
/// LUN fails over (its lock broken) and every write the client saw
/// answered is there.
#[test]
fn a_target_killed_after_the_handover_commit_loses_the_lun_by_its_lease_and_nothing_else() {
    let c = Cluster::shared();
    let p = pair_env(
        "ho4",
        &["h4"],
        &[],
        &[("LUNGATE_TEST_MIGRATION_STALL", "committed:10000")],
    );
    let (stop, count, h) = run_writer(tcp(&p.a), "h4/disk0");
    wait_ops(&count, 100);
    let migrate = p.migrate_until_stalled("h4", &p.b, "committed");
    let Pair {
        ep,
        mut a,
        b,
        _etcd,
        _work,
        ..
    } = p;
    let b_pid = b.pid();
    assert_eq!(
        owner_pid(&ep, "ho4", "h4"),
        Some(b_pid),
        "the commit point passed"
    );
    drop(b); // SIGKILL
    let _ = migrate.join().expect("lunctl");
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().expect("writer");
    // Never two owners: until b's lease expires nobody serves the LUN,
    // then a claims it again.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let o = owner_pid(&ep, "ho4", "h4");
        assert!(
            o.is_none() || o == Some(b_pid) || o == Some(a.pid()),
            "{o:?}"
        );
        if o == Some(a.pid()) && listed(&a).contains(&"h4/disk0".to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a does not take the LUN back: {}",
            a.stderr_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(lockers(c, "rbd/ho4/h4.lun"), 1);
    // The write parked at the switch went nowhere: exactly the answered
    // writes are there.
    verify(&tcp(&a), "h4/disk0", &seen.model);
    a.assert_running();
}
