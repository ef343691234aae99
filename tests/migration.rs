//! Live migration end to end (docs/migration.md): two real gateways on
//! 127.0.0.1 with a pool each (or one gateway with two pools), `lunctl
//! migrate`, and an NBD client (the project's blocking client, one
//! connection held open across the switch) writing sequence-numbered
//! blocks and reading each back while the LUN moves. Every request must
//! succeed and every read must return the last write; the connection the
//! client had before the switch is forwarded to the new owner, and new
//! connections are served there only.

#[path = "migrate_common.rs"]
mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

use lungate_api::nbd::client::{Address, NbdClient};
use lungate_tests::*;
use serde_json::json;

#[test]
fn a_lun_with_a_snapshot_migrates_between_two_gateways_under_writes() {
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vm1", "offset", &["64M"], "16M");
    create_lun(a.path(), "vm1data", "offset", &["16M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    // A secondary disk: it moves with the VM, in the same switch.
    lunctl(&["attach-secondary", "vm1", "vm1data", "--pool", a_s]);
    let src = Gateway::start(&["--pool", a_s]);
    let data = fill(&tcp(&src), "vm1data/disk0", 1 << 20, 2 << 20, 13);
    let dst = Gateway::start(&["--pool", b_s, "--migration-listen", "127.0.0.1:0"]);
    let to = migration_addr(&dst);
    let export = "vm1/disk0";

    // Data under the snapshot, beyond the writer's blocks.
    let frozen = fill(&tcp(&src), export, 8 << 20, 4 << 20, 11);
    api(
        &src.control(),
        "POST",
        "/v1/luns/vm1/snapshots",
        Some(json!({"name": "s1", "description": "before the move"})),
        201,
    );
    // ... then overwritten in the live layer.
    let live = fill(&tcp(&src), export, 8 << 20, 1 << 20, 12);
    let snaps_before = api(&src.control(), "GET", "/v1/luns/vm1/snapshots", None, 200);

    let (res, seen) =
        migrate_under_writer(&src, &dst, export, &["vm1", "--pool", a_s, "--to", &to]);
    assert_eq!(res["members"], json!(["vm1", "vm1data"]), "{res}");
    assert!(res["bytes"].as_u64().unwrap() >= 5 << 20, "{res}");
    assert!(res["pause_us"].as_u64().is_some(), "{res}");
    assert!(res["parked"].as_u64().is_some(), "{res}");
    eprintln!(
        "migrated: {} bytes, {} rounds, pause {} us, {} parked, {} ms",
        res["bytes"], res["rounds"], res["pause_us"], res["parked"], res["elapsed_ms"]
    );
    for l in src
        .stderr_log()
        .lines()
        .filter(|l| l.contains("migration committed"))
    {
        eprintln!("source: {l}");
    }
    for l in dst.stderr_log().lines().filter(|l| l.contains("_us=")) {
        eprintln!("target: {l}");
    }
    eprintln!(
        "writer: {} sequence-numbered writes, all verified",
        seen.ops
    );

    // The target owns it: its pool has the LUN, the source's does not.
    assert!(b.path().join("vm1.lun").is_file());
    assert!(!a.path().join("vm1.lun").exists());
    assert!(b.path().join("vm1data.lun").is_file());
    assert!(!a.path().join("vm1data.lun").exists());
    assert_eq!(read(&tcp(&dst), "vm1data/disk0", 1 << 20, 2 << 20), data);
    // New connections: the source no longer offers the export; the target does.
    assert!(NbdClient::connect(&tcp(&src), export).is_err());
    verify(&tcp(&dst), export, &seen.model);
    assert_eq!(read(&tcp(&dst), export, 8 << 20, 1 << 20), live);
    assert_eq!(
        read(&tcp(&dst), export, 9 << 20, 3 << 20),
        frozen[1 << 20..]
    );
    // The snapshot tree arrived whole and the snapshot reads as it was.
    let snaps_after = api(&dst.control(), "GET", "/v1/luns/vm1/snapshots", None, 200);
    assert_eq!(snaps_before, snaps_after);
    let c = api(
        &dst.control(),
        "POST",
        "/v1/luns/vm1/clone",
        Some(json!({"snapshot": "s1", "name": "vm1-s1"})),
        201,
    );
    let clone_export = c["exports"][0].as_str().unwrap().to_string();
    assert_eq!(read(&tcp(&dst), &clone_export, 8 << 20, 4 << 20), frozen);
    // Both gateways list it.
    let m = lunctl(&["--json", "migrations", "--pool", a_s]);
    let v: serde_json::Value = serde_json::from_slice(&m.stdout).unwrap();
    assert_eq!(v[0]["phase"], "done", "{v}");
    assert_eq!(v[0]["direction"], "outgoing", "{v}");
    let m = lunctl(&["--json", "migrations", "--pool", b_s]);
    let v: serde_json::Value = serde_json::from_slice(&m.stdout).unwrap();
    assert_eq!(v[0]["direction"], "incoming", "{v}");
    // The target serves the LUN after a restart too (it owns it for good).
    drop(src);
    dst.stop_ok();
    let dst = Gateway::start(&["--pool", b_s]);
    verify(&tcp(&dst), export, &seen.model);
    dst.stop_ok();
}

#[test]
fn a_lun_moves_between_two_pools_of_one_gateway_under_writes() {
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vm2", "offset", &["32M"], "16M");
    create_lun(a.path(), "vm2data", "offset", &["16M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    // A secondary disk moves with the VM, in the same switch.
    lunctl(&["attach-secondary", "vm2", "vm2data", "--pool", a_s]);
    let gw = Gateway::start(&["--pool", a_s, "--pool", b_s]);
    let data = fill(&tcp(&gw), "vm2data/disk0", 1 << 20, 2 << 20, 23);
    let export = "vm2/disk0";
    let frozen = fill(&tcp(&gw), export, 4 << 20, 2 << 20, 21);
    api(
        &gw.control(),
        "POST",
        "/v1/luns/vm2/snapshots",
        Some(json!({"name": "s1"})),
        201,
    );
    let (stop, count, h) = run_writer(tcp(&gw), export);
    wait_ops(&count, 300);
    let (ok, res, all) = lunctl_migrate(&["vm2", "--pool", a_s, "--to-pool", b_s]);
    assert!(
        ok,
        "lunctl migrate --to-pool failed: {all}\n{}",
        gw.stderr_log()
    );
    assert_eq!(res["phase"], "done", "{res}");
    assert_eq!(res["direction"], "local", "{res}");
    assert_eq!(res["members"], json!(["vm2", "vm2data"]), "{res}");
    assert!(res["pause_us"].as_u64().is_some(), "{res}");
    wait_ops(&count, 300);
    // A new connection during the forwarding period is served from pool B.
    verify_prefix(&tcp(&gw), export);
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().unwrap();
    assert_clean(&seen);
    assert!(b.path().join("vm2.lun").is_file());
    assert!(!a.path().join("vm2.lun").exists());
    assert!(b.path().join("vm2data.lun").is_file());
    assert!(!a.path().join("vm2data.lun").exists());
    assert_eq!(read(&tcp(&gw), "vm2data/disk0", 1 << 20, 2 << 20), data);
    verify(&tcp(&gw), export, &seen.model);
    let c = api(
        &gw.control(),
        "POST",
        "/v1/luns/vm2/clone",
        Some(json!({"snapshot": "s1", "name": "vm2-s1"})),
        201,
    );
    let clone_export = c["exports"][0].as_str().unwrap().to_string();
    assert_eq!(read(&tcp(&gw), &clone_export, 4 << 20, 2 << 20), frozen);
    let luns = api(&gw.control(), "GET", "/v1/luns", None, 200);
    let paths: Vec<String> = luns
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["name"] == "vm2")
        .map(|l| l["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(paths.len(), 1, "{luns}");
    assert!(
        paths[0].starts_with(b_s)
            || Path::new(&paths[0]).starts_with(std::fs::canonicalize(b.path()).unwrap()),
        "{luns}"
    );
    gw.stop_ok();
}

/// A new connection reads the export (the served LUN answers).
fn verify_prefix(addr: &Address, export: &str) {
    let mut c = NbdClient::connect(addr, export).unwrap();
    let mut b = vec![0u8; BLOCK];
    c.read_at(0, &mut b).unwrap();
    c.disconnect().unwrap();
}

#[test]
fn refusals_name_their_reason_and_create_nothing_on_the_target() {
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vm3", "offset", &["16M"], "16M");
    // The same name already in the target pool.
    create_lun(b.path(), "vm3", "offset", &["16M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    let src = Gateway::start(&["--pool", a_s]);
    let before = clean_tree(b.path());

    let c = pool_dir();
    let c_s = c.path().to_str().unwrap();
    let before_c = clean_tree(c.path());
    let check = |dst: &Gateway, pool: &Path, want: &str, extra: &[&str]| {
        let to = migration_addr(dst);
        let mut args = vec!["vm3", "--pool", a_s, "--to", &to];
        args.extend_from_slice(extra);
        let (ok, res, all) = lunctl_migrate(&args);
        assert!(!ok, "migration should be refused ({want}): {all}");
        assert_eq!(res["type"], "error", "{all}");
        let msg = res["error"].as_str().unwrap_or_default().to_string();
        assert!(
            msg.contains(want),
            "refusal {msg:?} does not say {want:?}\n{all}"
        );
        let was = if pool == b.path() { &before } else { &before_c };
        assert_eq!(
            &clean_tree(pool),
            was,
            "the target made files for a refused migration"
        );
        // The source still serves, unchanged.
        assert!(a.path().join("vm3.lun").is_file());
        fill(&tcp(&src), "vm3/disk0", 0, 4096, 5);
    };

    {
        let dst = Gateway::start(&["--pool", b_s, "--migration-listen", "127.0.0.1:0"]);
        check(&dst, b.path(), "already has", &[]);
        dst.stop_ok();
    }
    {
        let dst = Gateway::start(&[
            "--pool",
            b_s,
            "--migration-listen",
            "127.0.0.1:0",
            "--migration-allow",
            "192.0.2.0/24",
        ]);
        check(
            &dst,
            b.path(),
            "not in the target's migration allow list",
            &[],
        );
        dst.stop_ok();
    }
    {
        let etc = tempfile::tempdir().unwrap();
        let cfg = etc.path().join("gw-token.toml");
        let tok = etc.path().join("gw-token");
        std::fs::write(&tok, "s3cret\n").unwrap();
        std::fs::write(
            &cfg,
            format!("[migration]\ntoken_file = {:?}\nreserve = \"1000T\"\n", tok),
        )
        .unwrap();
        let cfg_s = cfg.to_str().unwrap();
        let dst = Gateway::start(&[
            "--config",
            cfg_s,
            "--pool",
            c_s,
            "--migration-listen",
            "127.0.0.1:0",
        ]);
        check(&dst, c.path(), "token", &[]);
        let wrong = etc.path().join("wrong-token");
        std::fs::write(&wrong, "nope\n").unwrap();
        check(
            &dst,
            c.path(),
            "token",
            &["--token-file", wrong.to_str().unwrap()],
        );
        // With the right token, the space check refuses it (the reserve
        // is larger than any disk).
        check(
            &dst,
            c.path(),
            "not enough free space",
            &["--token-file", tok.to_str().unwrap()],
        );
        dst.stop_ok();
        let _ = std::fs::remove_file(cfg);
        let _ = std::fs::remove_file(tok);
        let _ = std::fs::remove_file(wrong);
    }
    {
        // A clone reads through the VM's layers: refused by the source, with
        // the dependents named.
        let dst = Gateway::start(&["--pool", c_s, "--migration-listen", "127.0.0.1:0"]);
        api(
            &src.control(),
            "POST",
            "/v1/luns/vm3/snapshots",
            Some(json!({"name": "base"})),
            201,
        );
        api(
            &src.control(),
            "POST",
            "/v1/luns/vm3/clone",
            Some(json!({"snapshot": "base", "name": "vm3c"})),
            201,
        );
        check(
            &dst,
            c.path(),
            "clones that depend on its layers: vm3c",
            &[],
        );
        // With --with-dependents the clone moves along, in the same switch.
        let to = migration_addr(&dst);
        let (ok, res, all) =
            lunctl_migrate(&["vm3", "--pool", a_s, "--to", &to, "--with-dependents"]);
        assert!(ok, "--with-dependents: {all}\n{}", dst.stderr_log());
        assert_eq!(res["members"], json!(["vm3", "vm3c"]), "{res}");
        assert!(c.path().join("vm3.lun").is_file() && c.path().join("vm3c.lun").is_file());
        assert!(!a.path().join("vm3.lun").exists() && !a.path().join("vm3c.lun").exists());
        let snaps = api(&dst.control(), "GET", "/v1/luns/vm3/snapshots", None, 200);
        assert_eq!(snaps[0]["name"], "base", "{snaps}");
        verify_prefix(&tcp(&dst), "vm3c/disk0");
        dst.stop_ok();
    }
    src.stop_ok();
}

#[test]
fn an_abort_or_a_timeout_leaves_the_source_serving_and_the_target_clean() {
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vm4", "offset", &["32M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    let src = Gateway::start_env(
        &["--pool", a_s],
        &[("LUNGATE_TEST_MIGRATION_STALL", "copied:3000")],
    );
    let dst = Gateway::start(&["--pool", b_s, "--migration-listen", "127.0.0.1:0"]);
    let to = migration_addr(&dst);
    let before = clean_tree(b.path());
    let export = "vm4/disk0";
    fill(&tcp(&src), export, 0, 1 << 20, 3);
    let (stop, count, h) = run_writer(tcp(&src), export);
    wait_ops(&count, 100);

    // --abort while the source stalls after the bulk copy.
    let (a2, to2) = (a_s.to_string(), to.clone());
    let m = thread::spawn(move || lunctl_migrate(&["vm4", "--pool", &a2, "--to", &to2]));
    let t = Instant::now();
    loop {
        let log = src.stderr_log();
        if log.contains("migration stalled at copied") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never reached the stall:\n{log}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let ab = lunctl(&["--json", "migrate", "vm4", "--pool", a_s, "--abort"]);
    assert!(ab.status.success());
    let (ok, res, all) = m.join().unwrap();
    assert!(!ok, "an aborted migration reported success: {all}");
    assert!(
        res["error"].as_str().unwrap_or("").contains("abort"),
        "{all}"
    );
    wait_ops(&count, 200);
    // Nothing left on the target (its staging is removed on the abort).
    let t = Instant::now();
    while clean_tree(b.path()) != before {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "target left {:?}",
            tree(b.path())
        );
        thread::sleep(Duration::from_millis(50));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&lunctl(&["--json", "migrations", "--pool", a_s]).stdout).unwrap();
    assert_eq!(v[0]["phase"], "aborted", "{v}");
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().unwrap();
    assert_clean(&seen);
    assert!(a.path().join("vm4.lun").is_file());
    verify(&tcp(&src), export, &seen.model);

    // The target goes away mid-copy: the step times out, the source serves.
    drop(dst);
    let (ok, _res, all) = lunctl_migrate(&["vm4", "--pool", a_s, "--to", &to]);
    assert!(!ok, "{all}");
    verify(&tcp(&src), export, &seen.model);
    src.stop_ok();
}

#[test]
fn a_snapshot_asked_for_during_a_migration_runs_on_the_new_owner() {
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vm5", "offset", &["16M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    let src = Gateway::start_env(
        &["--pool", a_s],
        &[("LUNGATE_TEST_MIGRATION_STALL", "copied:2000")],
    );
    let dst = Gateway::start(&["--pool", b_s, "--migration-listen", "127.0.0.1:0"]);
    let to = migration_addr(&dst);
    let (a2, to2) = (a_s.to_string(), to.clone());
    let m = thread::spawn(move || lunctl_migrate(&["vm5", "--pool", &a2, "--to", &to2]));
    let t = Instant::now();
    while !src.stderr_log().contains("migration stalled at copied") {
        assert!(t.elapsed() < Duration::from_secs(60), "never stalled");
        thread::sleep(Duration::from_millis(20));
    }
    // Queued while the LUN moves; answered by the target after the switch.
    let sock = src.control();
    let snap = thread::spawn(move || {
        api(
            &sock,
            "POST",
            "/v1/luns/vm5/snapshots",
            Some(json!({"name": "during", "description": "queued"})),
            201,
        )
    });
    let (ok, res, all) = m.join().unwrap();
    assert!(ok, "{all}");
    assert_eq!(res["queued_ops"], 1, "{res}");
    let taken = snap
        .join()
        .expect("the queued snapshot was not answered 201");
    assert_eq!(taken["snapshot"]["name"], "during");
    let list = api(&dst.control(), "GET", "/v1/luns/vm5/snapshots", None, 200);
    assert_eq!(list[0]["name"], "during", "{list}");
    assert_eq!(list[0]["description"], "queued", "{list}");
    // After the move, the source sends control operations elsewhere.
    let r = http(
        &Control::Unix(&src.control()),
        "POST",
        "/v1/luns/vm5/snapshots",
        Some(br#"{"name": "late"}"#),
        false,
    );
    assert_ne!(
        r.status / 100,
        2,
        "the source still took a snapshot of a LUN it gave away"
    );
    src.stop_ok();
    dst.stop_ok();
}

fn put_policy(sock: &Path, lun: &str, json: &str) {
    put_record(
        sock,
        lun,
        lungate_api::records::RecordType::Policy,
        json.as_bytes(),
    );
}

#[test]
fn the_vms_policy_decides_where_it_may_go_and_travels_with_it() {
    use lungate_api::records::{Policy, RecordType};
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vm6", "offset", &["16M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    let etc = tempfile::tempdir().unwrap();
    let cfg = etc.path().join("gw-b.toml");
    std::fs::write(&cfg, "[migration]\nname = \"gw-b\"\n").unwrap();
    let src = Gateway::start(&["--pool", a_s]);
    let dst = Gateway::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--pool",
        b_s,
        "--migration-listen",
        "127.0.0.1:0",
    ]);
    let to = migration_addr(&dst);
    let before = clean_tree(b.path());
    let refused = |want: &str| {
        let (ok, res, all) = lunctl_migrate(&["vm6", "--pool", a_s, "--to", &to]);
        assert!(!ok, "{all}");
        let msg = res["error"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{msg:?} does not say {want:?}");
        assert_eq!(clean_tree(b.path()), before);
    };
    put_policy(&src.control(), "vm6", r#"{"migrate_to": ["192.0.2.0/24"]}"#);
    refused("policy does not allow migrating it to");
    put_policy(&src.control(), "vm6", r#"{"gateways": ["gw-c"]}"#);
    refused("policy does not admit it on gateway gw-b");
    let pol = r#"{"migrate_to": ["127.0.0.0/8"], "gateways": ["gw-b"], "keep_snapshots": 3}"#;
    put_policy(&src.control(), "vm6", pol);
    let (ok, res, all) = lunctl_migrate(&["vm6", "--pool", a_s, "--to", &to]);
    assert!(ok, "{all}");
    assert_eq!(res["phase"], "done");
    // The record arrived with the VM, and the target reads it.
    let c = lungate_api::client::Client::new(&dst.control()).unwrap();
    let got: Option<Policy> = c.record_json("vm6", RecordType::Policy, 0).unwrap();
    assert_eq!(got, Some(serde_json::from_str::<Policy>(pol).unwrap()));
    // The target enforces it: with keep_snapshots 3, a fourth snapshot
    // deletes the oldest.
    for n in ["r1", "r2", "r3", "r4"] {
        api(
            &dst.control(),
            "POST",
            "/v1/luns/vm6/snapshots",
            Some(json!({"name": n})),
            201,
        );
    }
    let names: Vec<String> = api(&dst.control(), "GET", "/v1/luns/vm6/snapshots", None, 200)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["r2", "r3", "r4"]);
    src.stop_ok();
    dst.stop_ok();
}

#[test]
fn a_lun_with_data_checksums_migrates_and_scrubs_clean_on_the_target() {
    let (a, b) = (pool_dir(), pool_dir());
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    lunctl(&[
        "create",
        "vm7",
        "--pool",
        a_s,
        "--disk",
        "16M",
        "--memory",
        "16M",
        "--checksums",
    ]);
    let src = Gateway::start(&["--pool", a_s]);
    let dst = Gateway::start(&["--pool", b_s, "--migration-listen", "127.0.0.1:0"]);
    let to = migration_addr(&dst);
    let frozen = fill(&tcp(&src), "vm7/disk0", 0, 2 << 20, 71);
    api(
        &src.control(),
        "POST",
        "/v1/luns/vm7/snapshots",
        Some(json!({"name": "s1"})),
        201,
    );
    let live = fill(&tcp(&src), "vm7/disk0", 1 << 20, 1 << 20, 72);
    let scrub = |pool: &str| -> serde_json::Value {
        let out = lunctl(&["--json", "scrub", "vm7", "--pool", pool]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let doc = text
            .lines()
            .collect::<Vec<_>>()
            .join("\n")
            .split_once("\n{\n")
            .map(|(_, rest)| format!("{{\n{rest}"))
            .unwrap_or(text.clone());
        serde_json::from_str(&doc).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    let before = scrub(a_s);
    let (ok, res, all) = lunctl_migrate(&["vm7", "--pool", a_s, "--to", &to]);
    assert!(ok, "{all}\n{}", dst.stderr_log());
    assert_eq!(res["phase"], "done");
    assert_eq!(read(&tcp(&dst), "vm7/disk0", 0, 1 << 20), frozen[..1 << 20]);
    assert_eq!(read(&tcp(&dst), "vm7/disk0", 1 << 20, 1 << 20), live);
    // Every cluster of every layer verifies against its checksum there.
    let after = scrub(b_s);
    eprintln!("scrub: source {before}\ntarget {after}");
    let l = &after["luns"][0];
    assert_eq!(l["errors"], json!([]), "{after}");
    assert_eq!(l["clusters_unsummed"], 0, "{after}");
    assert_eq!(
        l["layers_without_checksums"], before["luns"][0]["layers_without_checksums"],
        "source {before}\ntarget {after}"
    );
    src.stop_ok();
    dst.stop_ok();
}

/// What an aligned LUN keeps outside its guest's bytes, taken from its file:
/// the label, `sfdisk --dump` of lungate's own GPT, every state record but
/// the owner's (its bytes), and the hidden blocks.
struct Hidden {
    label: lun_manager::format::label::Label,
    gpt: String,
    records: Vec<(String, Vec<u8>)>,
    blocks: Vec<(u64, [u8; 32])>,
}

fn hidden_of(lun: &Path) -> Hidden {
    use lun_manager::format::state::RecordType;
    let l = lun_manager::Lun::open(lun, lun_manager::Access::ReadOnly)
        .unwrap_or_else(|e| panic!("open {}: {e}", lun.display()));
    assert!(
        l.warnings().is_empty(),
        "{}: {:?}",
        lun.display(),
        l.warnings()
    );
    let mut records = Vec::new();
    for e in &l.directory().entries {
        if e.rtype == RecordType::Owner {
            continue;
        }
        let b = l
            .record(e.rtype, e.instance)
            .unwrap_or_else(|err| panic!("{}: record {:?}: {err}", lun.display(), e.rtype))
            .expect("a listed record");
        records.push((format!("{}#{}", e.rtype.name(), e.instance), b));
    }
    records.sort();
    Hidden {
        label: l.label().clone(),
        gpt: sfdisk_dump(lun),
        records,
        blocks: l.hidden_blocks().unwrap(),
    }
}

/// `sfdisk --dump` of a LUN file, its path replaced by `LUN`; sfdisk must
/// not complain (it checks both GPT headers, the backup at the end of the
/// file included).
fn sfdisk_dump(path: &Path) -> String {
    let out = run_ok(
        std::process::Command::new(require_tool("sfdisk"))
            .arg("--dump")
            .arg(path),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.trim().is_empty(),
        "sfdisk complains about {}: {err}",
        path.display()
    );
    String::from_utf8_lossy(&out.stdout).replace(path.to_str().unwrap(), "LUN")
}

/// The aligned layout (guest disk0 at byte 0 of the LUN, lungate's GPT at
/// LBA 0, the guest's first MiB kept in the state region's shadow area)
/// moves between two gateways while a client writes into the shadowed
/// range and past it; on the target the export reads every write, the
/// LUN file still starts with lungate's GPT, every guest block past the
/// first MiB sits at its own offset of the file, the shadowed blocks sit in
/// the shadow area, and nothing hidden changed but the owner record.
#[test]
fn an_aligned_lun_migrates_between_two_gateways_under_writes() {
    use lun_manager::format::SHADOW_LEN;
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vma", "aligned", &["40M", "16M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    let src = Gateway::start(&["--pool", a_s]);
    let dst = Gateway::start(&["--pool", b_s, "--migration-listen", "127.0.0.1:0"]);
    let to = migration_addr(&dst);
    let export = "vma/disk0";
    let src_lun = a.path().join("vma.lun");
    let dst_lun = b.path().join("vma.lun");
    // disk0 at byte 0: the writer's 4 MiB cover the shadowed first MiB and
    // 3 MiB past it; more data further on, and in disk1 (no shadow there).
    assert_eq!(disk_regions(&src_lun)[0].0, 0, "aligned disk0 starts at 0");
    let far = fill(&tcp(&src), export, 24 << 20, 4 << 20, 31);
    let d1 = fill(&tcp(&src), "vma/disk1", 0, 2 << 20, 32);
    let before = hidden_of(&src_lun);
    assert!(before.gpt.contains("lungate-disk0"), "{}", before.gpt);

    let (stop, count, h) = run_writer(tcp(&src), export);
    wait_ops(&count, 1200);
    let (ok, res, all) = lunctl_migrate(&["vma", "--pool", a_s, "--to", &to]);
    assert!(
        ok,
        "lunctl migrate failed: {all}\nsource:\n{}\ntarget:\n{}",
        src.stderr_log(),
        dst.stderr_log()
    );
    assert_eq!(res["phase"], "done", "{res}");
    assert_eq!(res["members"], json!(["vma"]), "{res}");
    // The connection opened before the switch keeps working, forwarded.
    let at_switch = count.load(Ordering::Relaxed);
    let t = Instant::now();
    while count.load(Ordering::Relaxed) < at_switch + 300
        && !h.is_finished()
        && t.elapsed() < Duration::from_secs(60)
    {
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().unwrap();
    assert_clean(&seen);
    assert!(
        seen.ops >= at_switch + 300,
        "the writer made no progress after the switch ({} ops, {at_switch} at the switch)",
        seen.ops
    );
    let shadowed = (SHADOW_LEN / BLOCK as u64) as usize;
    assert!(
        seen.model[..shadowed].iter().all(|&s| s > 0)
            && seen.model[shadowed..].iter().all(|&s| s > 0),
        "the writer wrote every block, in the shadowed range and past it"
    );
    assert!(dst_lun.is_file() && !src_lun.exists());
    assert!(NbdClient::connect(&tcp(&src), export).is_err());

    // Through the target's export.
    verify(&tcp(&dst), export, &seen.model);
    assert_eq!(read(&tcp(&dst), export, 24 << 20, 4 << 20), far);
    assert_eq!(read(&tcp(&dst), "vma/disk1", 0, 2 << 20), d1);
    let size = NbdClient::connect(&tcp(&dst), export).unwrap().size();
    assert_eq!(size, 40 << 20, "disk0's size on the target");
    dst.stop_ok();

    // In the target's LUN file: every block past the shadowed range at its
    // own offset; the shadowed ones where the LUN's view keeps them (the
    // shadow area), not at LBA 0, which holds lungate's GPT as before.
    let mut misplaced = Vec::new();
    for (k, &s) in seen.model.iter().enumerate() {
        let at = k as u64 * BLOCK as u64;
        let want = block(k as u64, s);
        let got = if at >= SHADOW_LEN {
            file_bytes(&dst_lun, at, BLOCK)
        } else {
            disk_file_bytes(&dst_lun, 0, at, BLOCK)
        };
        if got != want {
            misplaced.push(k);
        }
    }
    assert!(
        misplaced.is_empty(),
        "blocks not where they belong: {misplaced:?}"
    );
    assert_eq!(file_bytes(&dst_lun, 24 << 20, 4 << 20), far);
    assert_ne!(
        file_bytes(&dst_lun, 0, BLOCK),
        block(0, seen.model[0]),
        "the guest's block 0 landed on lungate's GPT"
    );
    let after = hidden_of(&dst_lun);
    let sector0 = file_bytes(&dst_lun, 0, 512);
    assert_eq!(
        &sector0[510..512],
        &[0x55, 0xAA],
        "protective MBR signature"
    );
    assert_eq!(sector0[446 + 4], 0xEE, "LBA 0 holds a protective MBR");
    assert_eq!(&file_bytes(&dst_lun, 512, 8)[..], b"EFI PART");
    assert_eq!(after.gpt, before.gpt, "lungate's GPT changed in the move");
    assert_eq!(after.label, before.label, "the label changed in the move");
    assert_eq!(after.records, before.records, "a state record changed");
    // Hidden blocks: only the state directory and the owner record (the
    // target's gateway now owns it) may differ.
    let st = *after.label.state_region();
    let lun = lun_manager::Lun::open(&dst_lun, lun_manager::Access::ReadOnly).unwrap();
    let owner: Vec<_> = lun
        .directory()
        .entries
        .iter()
        .filter(|e| e.rtype == lun_manager::format::state::RecordType::Owner)
        .map(|e| st.offset + e.offset..st.offset + e.end())
        .collect();
    let dir_end = st.offset + 2 * lun_manager::format::state::DIR_SLOT_SIZE as u64;
    let allowed = |o: u64| {
        (st.offset..dir_end).contains(&o) || owner.iter().any(|r| o + 4096 > r.start && o < r.end)
    };
    let old: std::collections::BTreeMap<_, _> = before.blocks.iter().copied().collect();
    let new: std::collections::BTreeMap<_, _> = after.blocks.iter().copied().collect();
    let changed: Vec<u64> = old
        .keys()
        .chain(new.keys())
        .copied()
        .filter(|o| old.get(o) != new.get(o) && !allowed(*o))
        .collect();
    assert!(
        changed.is_empty(),
        "hidden blocks changed in the move (state region at {:#x}): {changed:x?}",
        st.offset
    );

    // The target serves it after a restart, and a write straddling the end
    // of the shadowed range is split there as on the source.
    let dst = Gateway::start(&["--pool", b_s]);
    verify(&tcp(&dst), export, &seen.model);
    let straddle = fill(&tcp(&dst), export, SHADOW_LEN - 8192, 16384, 33);
    dst.stop_ok();
    assert_eq!(
        disk_file_bytes(&dst_lun, 0, SHADOW_LEN - 8192, 16384),
        straddle
    );
    assert_eq!(file_bytes(&dst_lun, SHADOW_LEN, 8192), straddle[8192..]);
    assert_eq!(sfdisk_dump(&dst_lun), before.gpt);
}

/// `[migration] tls` with a `cert:` allow rule: the target admits the
/// source that presents the named client certificate (the LUN moves under
/// writes, over TLS), and refuses with a reason, creating nothing, a
/// source without one and a source that does not speak TLS.
#[test]
fn over_tls_the_target_admits_only_the_certificate_its_rules_name() {
    let certs = TlsCerts::generate();
    let (a, b, c) = (pool_dir(), pool_dir(), pool_dir());
    create_lun(a.path(), "vmt", "offset", &["32M"], "16M");
    create_lun(c.path(), "vmu", "offset", &["16M"], "16M");
    let (a_s, b_s, c_s) = (
        a.path().to_str().unwrap(),
        b.path().to_str().unwrap(),
        c.path().to_str().unwrap(),
    );
    let etc = tempfile::tempdir().unwrap();
    let conf = |name: &str, text: String| {
        let p = etc.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let ca = certs.path_str("ca-cert.pem");
    let target_cfg = conf(
        "target.toml",
        format!(
            "[tls]\nmode = \"on\"\ncert = {:?}\nkey = {:?}\nca = {ca:?}\n\n[migration]\ntls = true\nallow = [\"cert:lungate test client\"]\n",
            certs.path_str("server-cert.pem"),
            certs.path_str("server-key.pem"),
        ),
    );
    let with_cert = conf(
        "with-cert.toml",
        format!(
            "[tls]\nca = {ca:?}\n\n[migration]\ntls = true\nclient_cert = {:?}\nclient_key = {:?}\n",
            certs.path_str("client-cert.pem"),
            certs.path_str("client-key.pem"),
        ),
    );
    let no_cert = conf(
        "no-cert.toml",
        format!("[tls]\nca = {ca:?}\n\n[migration]\ntls = true\n"),
    );
    let dst = Gateway::start(&[
        "--config",
        &target_cfg,
        "--pool",
        b_s,
        "--migration-listen",
        "127.0.0.1:0",
    ]);
    let to = migration_addr(&dst);
    let before = clean_tree(b.path());

    // No client certificate: TLS works, the rule does not match.
    let anon = Gateway::start(&["--config", &no_cert, "--pool", c_s]);
    let (ok, res, all) = lunctl_migrate(&["vmu", "--pool", c_s, "--to", &to]);
    assert!(!ok, "admitted without the named certificate: {all}");
    let msg = res["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("not in the target's migration allow list"),
        "{all}"
    );
    assert_eq!(clean_tree(b.path()), before, "files made for a refusal");
    fill(&tcp(&anon), "vmu/disk0", 0, 4096, 9);
    anon.stop_ok();

    // Plain TCP to a TLS listener: no admission, a clear error.
    let plain = Gateway::start(&["--pool", c_s]);
    let (ok, res, all) = lunctl_migrate(&["vmu", "--pool", c_s, "--to", &to]);
    assert!(
        !ok,
        "a plain-TCP source was admitted by a TLS listener: {all}"
    );
    assert_eq!(res["type"], "error", "{all}");
    assert_eq!(clean_tree(b.path()), before, "files made for a refusal");
    fill(&tcp(&plain), "vmu/disk0", 0, 4096, 10);
    plain.stop_ok();
    assert!(c.path().join("vmu.lun").is_file());

    // The certificate the rule names: admitted, and the LUN moves under
    // writes with every request answered right.
    let src = Gateway::start(&["--config", &with_cert, "--pool", a_s]);
    let export = "vmt/disk0";
    let (_, seen) = migrate_under_writer(&src, &dst, export, &["vmt", "--pool", a_s, "--to", &to]);
    assert!(b.path().join("vmt.lun").is_file());
    assert!(!a.path().join("vmt.lun").exists());
    verify(&tcp(&dst), export, &seen.model);
    drop(src);
    dst.stop_ok();
}

/// A target that accepts the connection and then says nothing: the step
/// times out (`[migration] timeout`), the migration ends as an error and
/// the source keeps serving its writer without a failed request.
#[test]
fn a_silent_target_times_out_and_the_source_keeps_serving() {
    let a = pool_dir();
    create_lun(a.path(), "vms", "offset", &["16M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let etc = tempfile::tempdir().unwrap();
    let cfg = etc.path().join("src.toml");
    std::fs::write(&cfg, "[migration]\ntimeout = 2\n").unwrap();
    let src = Gateway::start(&["--config", cfg.to_str().unwrap(), "--pool", a_s]);
    // A peer that accepts and never answers (nor closes).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = silent.local_addr().unwrap().to_string();
    let (done, until) = std::sync::mpsc::channel::<()>();
    let held = thread::spawn(move || {
        let (s, _) = silent.accept().unwrap();
        let _ = until.recv();
        drop(s);
    });
    let export = "vms/disk0";
    let (stop, count, h) = run_writer(tcp(&src), export);
    wait_ops(&count, 100);
    let t = Instant::now();
    let (ok, res, all) = lunctl_migrate(&["vms", "--pool", a_s, "--to", &to]);
    let took = t.elapsed();
    assert!(!ok, "a silent target accepted a migration: {all}");
    assert!(
        res["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no answer within 2s"),
        "the error does not say it timed out: {all}"
    );
    assert!(
        took < Duration::from_secs(12),
        "gave up only after {took:?} with a 2 s step timeout"
    );
    wait_ops(&count, 200);
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().unwrap();
    assert_clean(&seen);
    verify(&tcp(&src), export, &seen.model);
    let v: serde_json::Value =
        serde_json::from_slice(&lunctl(&["--json", "migrations", "--pool", a_s]).stdout).unwrap();
    assert_eq!(v[0]["phase"], "failed", "{v}");
    assert!(
        v[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no answer"),
        "{v}"
    );
    done.send(()).unwrap();
    held.join().unwrap();
    src.stop_ok();
}

/// The target on a second host: a network namespace the test makes, with
/// its own address on a veth pair (docs/testing.md). The LUN moves under
/// the sequence-numbered writer; the writer's connection, forwarded by the
/// source, reaches the target across the link, and new connections are
/// served there.
#[test]
fn a_lun_migrates_to_a_gateway_on_another_host_under_writes() {
    let ns = NetNs::create();
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vmn", "offset", &["32M"], "16M");
    let (a_s, b_s) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    let src = Gateway::start(&["--pool", a_s]);
    let there = ns.there.to_string();
    let dst = Gateway::start_in(
        &ns,
        &format!("{there}:0"),
        &["--pool", b_s, "--migration-listen", &format!("{there}:0")],
    );
    let to = migration_addr(&dst);
    assert!(to.starts_with(&format!("{there}:")), "{to}");
    assert_eq!(dst.addr().ip().to_string(), there);
    let export = "vmn/disk0";
    let (_, seen) = migrate_under_writer(&src, &dst, export, &["vmn", "--pool", a_s, "--to", &to]);
    // The forwarded connection came from this side of the link.
    let from_here = format!("client={}:", ns.here);
    assert!(
        dst.stderr_log().contains(&from_here),
        "no connection from {} on the target:\n{}",
        ns.here,
        dst.stderr_log()
    );
    assert!(b.path().join("vmn.lun").is_file());
    assert!(!a.path().join("vmn.lun").exists());
    assert!(NbdClient::connect(&tcp(&src), export).is_err());
    verify(&tcp(&dst), export, &seen.model);
    drop(src);
    dst.stop_ok();
}

/// The running (or last) migration `lunctl migrations` lists for `pool`.
fn last_migration(pool: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_slice(&lunctl(&["--json", "migrations", "--pool", pool]).stdout).unwrap();
    v.as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default()
}

/// A writer faster than the copy: `--max-rate 4M` and the sequence-numbered
/// writer re-dirtying its 64 clusters (4 MiB) every fraction of a second
/// mean every round leaves as much dirty as it sent, far over what 50 ms
/// at 4 MiB/s can carry. Without auto-converge the migration fails after
/// `max_rounds` (8) and the source keeps serving; with it the gate slows
/// the writes until the rounds shrink, an abort while throttled lifts the
/// throttle at once, and the next migration converges and switches — with
/// every request of the one connection answered right throughout.
#[test]
fn an_uncapped_writer_converges_only_by_throttling_its_writes() {
    let (a, b) = (pool_dir(), pool_dir());
    create_lun(a.path(), "vmf", "offset", &["16M"], "16M");
    let a_s = a.path().to_str().unwrap();
    let b_s = b.path().to_str().unwrap();
    let etc = tempfile::tempdir().unwrap();
    let cfg = etc.path().join("src.toml");
    std::fs::write(&cfg, "[migration]\nmax_rounds = 8\n").unwrap();
    // Every migration stalls 3 s after its first round (an abort's moment).
    let src = Gateway::start_env(
        &["--config", cfg.to_str().unwrap(), "--pool", a_s],
        &[("LUNGATE_TEST_MIGRATION_STALL", "rounds:3000")],
    );
    let dst = Gateway::start(&["--pool", b_s, "--migration-listen", "127.0.0.1:0"]);
    let to = migration_addr(&dst);
    let before = clean_tree(b.path());
    let export = "vmf/disk0";
    let (stop, count, h) = run_writer(tcp(&src), export);
    wait_ops(&count, 300);
    let t = Instant::now();
    wait_ops(&count, 300);
    let unthrottled = t.elapsed();
    let args = ["vmf", "--pool", a_s, "--to", &to, "--max-rate", "4M"];

    // 1. Auto-converge off: it cannot converge, and says why.
    let mut off = args.to_vec();
    off.push("--no-auto-converge");
    let (ok, res, all) = lunctl_migrate(&off);
    assert!(!ok, "converged without a throttle: {all}");
    let msg = res["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("did not converge") && msg.contains("auto-converge is off"),
        "{all}"
    );
    let m = last_migration(a_s);
    assert_eq!(m["phase"], "failed", "{m}");
    assert_eq!(m["auto_converge"], false, "{m}");
    assert_eq!(m["rounds"], 8, "{m}");
    assert_eq!(m["throttled_writes"], 0, "{m}");
    assert!(m.get("throttle_min_rate").is_none(), "{m}");
    // The source serves on, the target made nothing.
    wait_ops(&count, 200);
    assert!(a.path().join("vmf.lun").is_file());
    let t = Instant::now();
    while clean_tree(b.path()) != before {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{:?}",
            tree(b.path())
        );
        thread::sleep(Duration::from_millis(50));
    }

    // 2. Auto-converge on, aborted while it throttles: the writes run at
    // full speed again.
    let stalls = |g: &Gateway| {
        g.stderr_log()
            .matches("migration stalled at rounds")
            .count()
    };
    let stalled = stalls(&src);
    let a2 = a_s.to_string();
    let args2: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mig = thread::spawn(move || {
        let v: Vec<&str> = args2.iter().map(|s| s.as_str()).collect();
        lunctl_migrate(&v)
    });
    let t = Instant::now();
    while stalls(&src) == stalled {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{}",
            src.stderr_log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let m = last_migration(&a2);
    assert_eq!(m["phase"], "rounds", "{m}");
    assert_eq!(m["auto_converge"], true, "{m}");
    let rate = m["throttle_rate"]
        .as_u64()
        .expect("throttled while stalled");
    assert!(
        rate < 4 << 20,
        "writes admitted at {rate} B/s, not below the copy's 4 MiB/s"
    );
    let ab = lunctl(&["--json", "migrate", "vmf", "--pool", a_s, "--abort"]);
    assert!(ab.status.success());
    let (ok, _, all) = mig.join().unwrap();
    assert!(!ok, "{all}");
    let t = Instant::now();
    wait_ops(&count, 300);
    let after_abort = t.elapsed();
    assert!(
        after_abort < unthrottled * 4 + Duration::from_secs(2),
        "300 requests took {after_abort:?} after the abort, {unthrottled:?} before any migration: \
         the throttle outlived the migration"
    );

    // 3. Auto-converge on: the writes slow down until the rounds fit.
    let (ok, res, all) = lunctl_migrate(&args);
    if !ok {
        stop.store(true, Ordering::Relaxed);
        let _ = h.join();
        panic!(
            "did not converge with auto-converge: {all}\nsource:\n{}",
            src.stderr_log()
        );
    }
    assert_eq!(res["phase"], "done", "{res}");
    assert_eq!(res["auto_converge"], true, "{res}");
    assert!(res["throttle_rounds"].as_u64().unwrap() >= 1, "{res}");
    assert!(res["throttled_writes"].as_u64().unwrap() > 0, "{res}");
    let min = res["throttle_min_rate"].as_u64().expect("throttled");
    assert!(min < 4 << 20, "{res}");
    assert!(res.get("throttle_rate").is_none(), "{res}");
    assert!(res["rounds"].as_u64().unwrap() <= 8, "{res}");
    eprintln!(
        "converged: {} rounds, {} throttled, down to {} B/s, {} writes delayed, pause {} us",
        res["rounds"], res["throttle_rounds"], min, res["throttled_writes"], res["pause_us"]
    );
    // The forwarded connection runs at full speed on the new owner.
    let t = Instant::now();
    wait_ops(&count, 300);
    let after = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().unwrap();
    assert_clean(&seen);
    assert!(
        after < unthrottled * 6 + Duration::from_secs(3),
        "300 forwarded requests took {after:?} (before: {unthrottled:?})"
    );
    assert!(b.path().join("vmf.lun").is_file());
    assert!(!a.path().join("vmf.lun").exists());
    verify(&tcp(&dst), export, &seen.model);
    src.stop_ok();
    dst.stop_ok();
}
