//! The control API end to end: every route through curl over the unix
//! socket (and TCP with a bearer token), with its errors, on a real
//! gateway serving real LUNs, with NBD clients checking the data.

use std::os::unix::fs::PermissionsExt;

use lungate_tests::*;
use serde_json::json;

#[test]
fn every_route_works_over_the_unix_socket_with_contract_shapes_and_errors() {
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let sock = gw.control();
    assert_eq!(
        sock,
        pool.path().join(".lungate.sock"),
        "default control socket"
    );
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");

    // exports, luns, stats
    let ex = api(&sock, "GET", "/v1/exports", None, 200);
    let names: Vec<&str> = ex
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 6, "{ex}");
    let off0 = ex
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "off/disk0")
        .unwrap();
    assert_eq!(off0["lun"], "off");
    assert_eq!(off0["disk"], 0);
    assert_eq!(off0["size"], 64 << 20);
    assert_eq!(off0["read_only"], false);
    assert_eq!(off0["connections"], 0);
    let lun_uuid = off0["lun_uuid"].as_str().unwrap().to_string();
    let luns = api(&sock, "GET", "/v1/luns", None, 200);
    let off = luns
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "off")
        .unwrap();
    assert_eq!(off["layout"], "offset");
    assert_eq!(off["uuid"], lun_uuid.as_str());
    assert_eq!(off["snapshots"], 0);
    assert!(off["path"].as_str().unwrap().ends_with("off.lun"));
    let st = api(&sock, "GET", "/v1/stats", None, 200);
    assert_eq!(st["switch"]["count"], 0, "{st}");
    assert_eq!(st["exports"].as_array().unwrap().len(), 6);
    let algn = luns
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "algn")
        .unwrap();
    assert_eq!(algn["layout"], "aligned");

    let uri = gw.uri("off/disk0");
    qemu_io_ok(&uri, &["write -P 0x41 0 1M", "write -P 0x42 8M 64k"]);

    // snapshot: created, duplicate, bad bodies, unknown LUN
    let s = api(
        &sock,
        "POST",
        "/v1/luns/off/snapshots",
        Some(json!({"name": "s1", "description": "first"})),
        201,
    );
    assert_eq!(s["snapshot"]["name"], "s1");
    assert_eq!(s["snapshot"]["description"], "first");
    assert_eq!(s["snapshot"]["current"], true);
    assert!(s["pause_us"].as_u64().is_some(), "{s}");
    let dup = api(
        &sock,
        "POST",
        "/v1/luns/off/snapshots",
        Some(json!({"name": "s1"})),
        409,
    );
    assert!(dup["error"].as_str().unwrap().contains("exists"), "{dup}");
    api(
        &sock,
        "POST",
        "/v1/luns/off/snapshots",
        Some(json!({"nam": "x"})),
        400,
    );
    let r = http(
        &Control::Unix(&sock),
        "POST",
        "/v1/luns/off/snapshots",
        Some(b"{not json"),
        false,
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].is_string());
    api(
        &sock,
        "POST",
        "/v1/luns/off/snapshots",
        Some(json!({"name": ""})),
        400,
    );
    let nf = api(
        &sock,
        "POST",
        "/v1/luns/nope/snapshots",
        Some(json!({"name": "s"})),
        404,
    );
    assert!(nf["error"].as_str().unwrap().contains("nope"));
    api(&sock, "GET", "/v1/luns/nope/snapshots", None, 404);
    api(&sock, "GET", "/v1/nothing", None, 404);

    // snapshots by name and by UUID
    let list = api(&sock, "GET", "/v1/luns/off/snapshots", None, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "s1");
    for k in ["created", "parent", "layer", "current", "description"] {
        assert!(list[0].get(k).is_some(), "SnapshotInfo lacks {k}: {list}");
    }
    let by_uuid = api(
        &sock,
        "GET",
        &format!("/v1/luns/{lun_uuid}/snapshots"),
        None,
        200,
    );
    assert_eq!(by_uuid, list);

    // diff and diff-file after a change
    qemu_io_ok(&uri, &["write -P 0x51 0 64k"]);
    let d = api(&sock, "GET", "/v1/luns/off/diff?from=s1", None, 200);
    let changes = d["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{d}");
    assert_eq!(changes[0]["kind"], "data");
    assert_eq!(changes[0]["length"], 64 << 10);
    api(&sock, "GET", "/v1/luns/off/diff", None, 400);
    api(&sock, "GET", "/v1/luns/off/diff?from=zz", None, 404);
    let file = http(
        &Control::Unix(&sock),
        "GET",
        "/v1/luns/off/diff-file?from=s1",
        None,
        false,
    );
    assert_eq!(file.status, 200);
    assert_eq!(&file.body[..8], b"LGDIFF02");

    // revert: the snapshot's data is back; the diff file re-applies the change
    let rv = api(
        &sock,
        "POST",
        "/v1/luns/off/revert",
        Some(json!({"snapshot": "s1"})),
        200,
    );
    assert!(rv["pause_us"].as_u64().is_some());
    qemu_io_ok(&uri, &["read -P 0x41 0 1M", "read -P 0x42 8M 64k"]);
    api(
        &sock,
        "POST",
        "/v1/luns/off/revert",
        Some(json!({"snapshot": "zz"})),
        404,
    );
    api(&sock, "POST", "/v1/luns/off/revert", Some(json!({})), 400);
    let mut bad = file.body.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    let r = http(
        &Control::Unix(&sock),
        "POST",
        "/v1/luns/off/apply-diff",
        Some(&bad),
        true,
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    qemu_io_ok(&uri, &["read -P 0x41 0 64k"]);
    let r = http(
        &Control::Unix(&sock),
        "POST",
        "/v1/luns/off/apply-diff",
        Some(&file.body),
        true,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json(), json!({}));
    qemu_io_ok(&uri, &["read -P 0x51 0 64k", "read -P 0x41 64k 960k"]);
    // a diff of another size is refused
    let r = http(
        &Control::Unix(&sock),
        "POST",
        "/v1/luns/trunc/apply-diff",
        Some(&file.body),
        true,
    );
    assert_eq!(r.status, 400);

    // clone: exported at once, holds the snapshot's data
    let c = api(
        &sock,
        "POST",
        "/v1/luns/off/clone",
        Some(json!({"snapshot": "s1", "name": "offc"})),
        201,
    );
    assert_eq!(c["name"], "offc");
    assert_eq!(c["exports"], json!(["offc/disk0", "offc/disk1"]));
    assert!(c["path"].as_str().unwrap().ends_with("offc.lun"));
    assert_ne!(c["uuid"], lun_uuid.as_str());
    qemu_io_ok(
        &gw.uri("offc/disk0"),
        &["read -P 0x41 0 1M", "read -P 0x42 8M 64k"],
    );
    qemu_io_ok(&gw.uri("offc/disk0"), &["write -P 0x61 0 64k"]);
    qemu_io_ok(&uri, &["read -P 0x51 0 64k"]);
    api(
        &sock,
        "POST",
        "/v1/luns/off/clone",
        Some(json!({"snapshot": "s1", "name": "offc"})),
        409,
    );
    api(
        &sock,
        "POST",
        "/v1/luns/off/clone",
        Some(json!({"snapshot": "zz", "name": "offd"})),
        404,
    );
    api(
        &sock,
        "POST",
        "/v1/luns/off/clone",
        Some(json!({"snapshot": "s1", "name": "../x"})),
        400,
    );
    let ex = api(&sock, "GET", "/v1/exports", None, 200);
    assert_eq!(ex.as_array().unwrap().len(), 8);

    // usage, flatten, delete
    let u = api(&sock, "GET", "/v1/luns/off/usage", None, 200);
    let layers = u.as_array().unwrap();
    assert!(layers.len() >= 2, "{u}");
    assert_eq!(layers.iter().filter(|l| l["live"] == true).count(), 1);
    for k in [
        "layer",
        "path",
        "snapshot",
        "in_chain",
        "external",
        "allocated_bytes",
        "disk_bytes",
    ] {
        assert!(layers[0].get(k).is_some(), "LayerUsage lacks {k}: {u}");
    }
    assert_eq!(
        api(&sock, "POST", "/v1/luns/offc/flatten", None, 200),
        json!({})
    );
    qemu_io_ok(
        &gw.uri("offc/disk0"),
        &[
            "read -P 0x61 0 64k",
            "read -P 0x41 64k 960k",
            "read -P 0x42 8M 64k",
        ],
    );
    assert_eq!(
        api(&sock, "DELETE", "/v1/luns/off/snapshots/s1", None, 200),
        json!({})
    );
    api(&sock, "DELETE", "/v1/luns/off/snapshots/s1", None, 404);
    qemu_io_ok(&uri, &["read -P 0x51 0 64k", "read -P 0x42 8M 64k"]);
    qemu_io_ok(&gw.uri("offc/disk0"), &["read -P 0x42 8M 64k"]);

    let st = api(&sock, "GET", "/v1/stats", None, 200);
    // Only snapshot and revert switch layers; a clone reads a frozen
    // snapshot and pauses no one.
    assert_eq!(st["switch"]["count"], 2, "snapshot, revert: {st}");
    for k in ["p50_us", "p99_us", "max_us", "held_requests"] {
        assert!(st["switch"][k].as_u64().is_some(), "{st}");
    }
    let e = st["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "off/disk0")
        .unwrap();
    assert!(
        e["writes"].as_u64().unwrap() >= 3 && e["bytes_read"].as_u64().unwrap() > 0,
        "{e}"
    );
    gw.stop_ok();
    assert!(!sock.exists(), "control socket removed at exit");
    pool.assert_hidden_unchanged();
}

#[test]
fn tcp_control_requires_the_bearer_token() {
    let pool = Pool::all_layouts();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "pools = [{:?}]\n[control]\ntcp = \"127.0.0.1:0\"\ntoken_file = {:?}\n",
            pool.arg(),
            token.to_str().unwrap()
        ),
    )
    .unwrap();
    let gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    let addr = gw.control_tcp();
    let r = http(&Control::Tcp(addr, None), "GET", "/v1/luns", None, false);
    assert_eq!(r.status, 401);
    assert!(r.json()["error"].is_string());
    let r = http(
        &Control::Tcp(addr, Some("s3cret-tokeN")),
        "GET",
        "/v1/luns",
        None,
        false,
    );
    assert_eq!(r.status, 401);
    let r = http(
        &Control::Tcp(addr, Some("s3cret")),
        "GET",
        "/v1/luns",
        None,
        false,
    );
    assert_eq!(r.status, 401);
    let r = http(
        &Control::Tcp(addr, Some("s3cret-token")),
        "GET",
        "/v1/luns",
        None,
        false,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().unwrap().len(), 3);
    let r = http(
        &Control::Tcp(addr, Some("s3cret-token")),
        "POST",
        "/v1/luns/trunc/snapshots",
        Some(br#"{"name":"t1"}"#),
        false,
    );
    assert_eq!(r.status, 201);
    // the unix socket needs no token
    api(&gw.control(), "GET", "/v1/luns/trunc/snapshots", None, 200);
    gw.stop_ok();

    // TCP without a token file is a configuration error
    std::fs::write(
        &cfg,
        format!(
            "pools = [{:?}]\n[control]\ntcp = \"127.0.0.1:0\"\n",
            pool.arg()
        ),
    )
    .unwrap();
    let err = Gateway::try_start(&["--config", cfg.to_str().unwrap()])
        .err()
        .unwrap();
    assert!(err.contains("token_file"), "{err}");
}

/// `curl` over HTTPS to the control API with extra arguments (headers);
/// the HTTP status, or 0 when no HTTP exchange happened.
fn https_status(ca: &std::path::Path, url: &str, extra: &[&str]) -> u16 {
    let mut cmd = std::process::Command::new(require_tool("curl"));
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(ca)
        .args(extra)
        .arg(url);
    let o = run_timeout(&mut cmd, CMD_TIMEOUT);
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// `control.tls`: the TCP listener speaks HTTPS with the gateway's
/// certificate (plain HTTP gets no answer), and the bearer token is
/// checked strictly: exactly one `Authorization` header, `Bearer`, one
/// space, the token; a second header, a second space or a different
/// token is 401.
#[test]
fn tcp_control_over_tls_with_a_strict_bearer_token() {
    let pool = Pool::all_layouts();
    let certs = TlsCerts::generate();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "pools = [{:?}]\n[tls]\ncert = {:?}\nkey = {:?}\n\
             [control]\ntcp = \"127.0.0.1:0\"\ntoken_file = {:?}\ntls = true\n",
            pool.arg(),
            certs.path_str("server-cert.pem"),
            certs.path_str("server-key.pem"),
            token.to_str().unwrap()
        ),
    )
    .unwrap();
    let gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    assert!(
        gw.stdout_lines()
            .iter()
            .any(|l| l.starts_with("control tcp ") && l.ends_with(" tls")),
        "{:?}",
        gw.stdout_lines()
    );
    let addr = gw.control_tcp();
    let url = format!("https://127.0.0.1:{}/v1/luns", addr.port());
    let ca = certs.file("ca-cert.pem");
    let good = "Authorization: Bearer s3cret-token";
    assert_eq!(https_status(&ca, &url, &["-H", good]), 200);
    assert_eq!(https_status(&ca, &url, &[]), 401, "no token");
    assert_eq!(
        https_status(&ca, &url, &["-H", good, "-H", good]),
        401,
        "two Authorization headers"
    );
    assert_eq!(
        https_status(&ca, &url, &["-H", "Authorization: Bearer  s3cret-token"]),
        401,
        "two spaces"
    );
    assert_eq!(
        https_status(&ca, &url, &["-H", "Authorization: Bearer s3cret-tokeN"]),
        401,
        "wrong token"
    );
    // Plain HTTP on the TLS port is not answered.
    let plain = format!("http://127.0.0.1:{}/v1/luns", addr.port());
    assert_eq!(https_status(&ca, &plain, &["-H", good]), 0);
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

#[test]
fn a_lun_served_by_one_gateway_is_refused_by_another() {
    let pool = Pool::all_layouts();
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[export]]\nname = \"x/disk0\"\nlun = {:?}\n",
            pool.lun("off").path.to_str().unwrap()
        ),
    )
    .unwrap();
    let err = Gateway::try_start(&["--config", cfg.to_str().unwrap()])
        .err()
        .unwrap();
    assert!(err.contains("in use by another process"), "{err}");
    // a second gateway on the same pool cannot take its control socket either
    let err = Gateway::try_start(&["--pool", pool.arg()]).err().unwrap();
    assert!(err.contains("in use"), "{err}");
    gw.stop_ok();
    // once the first is gone the LUN can be served again
    let gw2 = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    qemu_io_ok(&gw2.uri("x/disk0"), &["read 0 4k"]);
    gw2.stop_ok();
    pool.assert_hidden_unchanged();
}

/// `lunctl` on a LUN a gateway serves goes through that gateway's control
/// API (found in the LUN's owner record), and every operation covers the
/// VM's secondary disk too: snapshot, clone (secondary cloned and
/// re-referenced, new identities) and revert, checked through NBD.
#[test]
fn lunctl_routes_to_the_gateway_and_operations_cover_secondary_disks() {
    let mut pool = Pool::new();
    pool.add("vm", "offset", &["32M"], "8M");
    pool.add("data", "truncate", &["16M"], "8M");
    let vm = pool.lun("vm").path.clone();
    let data = pool.lun("data").path.clone();
    lunctl(&[
        "attach-secondary",
        vm.to_str().unwrap(),
        data.to_str().unwrap(),
    ]);
    let gw = Gateway::start(&["--pool", pool.arg()]);
    qemu_io_ok(&gw.uri("vm/disk0"), &["write -P 0x11 0 1M"]);
    qemu_io_ok(&gw.uri("data/disk0"), &["write -P 0x22 0 1M"]);
    // `lunctl owner` names the gateway from its owner record.
    let owner = |path: &std::path::Path| {
        let out = lunctl(&["--json", "owner", path.to_str().unwrap()]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let o = owner(&vm);
    assert_eq!(o["source"], "record", "{o}");
    assert_eq!(o["owner"]["owner"], "lungate", "{o}");
    assert_eq!(o["owner"]["pid"], gw.pid(), "{o}");
    assert_eq!(o["owner"]["host"], lungate_block::sys::hostname(), "{o}");
    assert_eq!(
        o["owner"]["control"],
        gw.control().display().to_string(),
        "{o}"
    );
    assert!(o["owner"]["since"].as_u64().is_some_and(|s| s > 0), "{o}");

    // Direct file access is refused while the gateway owns the LUN; the
    // snapshot goes to the gateway instead.
    let out = lunctl(&["snapshot", vm.to_str().unwrap(), "s1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("served by lungate (PID {})", gw.pid())),
        "{err}"
    );
    let sock = gw.control();
    for l in ["vm", "data"] {
        let s = api(&sock, "GET", &format!("/v1/luns/{l}/snapshots"), None, 200);
        assert_eq!(s[0]["name"], "s1", "{l} has the group snapshot: {s}");
    }
    let out = std::process::Command::new(bin("lunctl"))
        .args(["resize", vm.to_str().unwrap(), "--disk", "0=64M"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop it or use its control API"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    qemu_io_ok(&gw.uri("vm/disk0"), &["write -P 0x33 0 1M"]);
    qemu_io_ok(&gw.uri("data/disk0"), &["write -P 0x44 0 1M"]);

    // Clone through lunctl: the secondary is cloned too and exported.
    let out = lunctl(&["clone", vm.to_str().unwrap(), "s1", "vm2"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("exported as vm2/disk0"), "{said}");
    qemu_io_ok(&gw.uri("vm2/disk0"), &["read -P 0x11 0 1M"]);
    qemu_io_ok(&gw.uri("vm2-data/disk0"), &["read -P 0x22 0 1M"]);
    let luns = api(&sock, "GET", "/v1/luns", None, 200);
    let uuid_of = |n: &str| {
        luns.as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == n)
            .unwrap_or_else(|| panic!("{n} not served: {luns}"))["uuid"]
            .clone()
    };
    assert_ne!(uuid_of("vm2"), uuid_of("vm"));
    assert_ne!(uuid_of("vm2-data"), uuid_of("data"));

    // Revert through lunctl: both disks come back.
    lunctl(&["revert", vm.to_str().unwrap(), "s1"]);
    qemu_io_ok(&gw.uri("vm/disk0"), &["read -P 0x11 0 1M"]);
    qemu_io_ok(&gw.uri("data/disk0"), &["read -P 0x22 0 1M"]);
    gw.stop_ok();
    let o = owner(&vm);
    assert_eq!(o["source"], "lock", "{o}");
    assert!(o["owner"].is_null(), "{o}");

    // After the gateway: lunctl works on the files directly, and the
    // scanner shows the clone under its parent.
    let out = lunctl(&["snapshots", vm.to_str().unwrap(), "--json"]);
    let snaps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snaps[0]["name"], "s1", "{snaps}");
    let out = lunctl(&["scan", "--json", pool.arg()]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = r.to_string();
    assert!(s.contains("vm2") && s.contains("s1"), "{s}");
    pool.assert_hidden_unchanged();
}

#[test]
fn a_group_op_names_the_other_gateway_that_serves_a_secondary() {
    let mut pool = Pool::new();
    pool.add("vm", "offset", &["16M"], "8M");
    pool.add("data", "offset", &["16M"], "8M");
    let vm = pool.lun("vm").path.clone();
    let data = pool.lun("data").path.clone();
    lunctl(&[
        "attach-secondary",
        vm.to_str().unwrap(),
        data.to_str().unwrap(),
    ]);
    // A second gateway serves only the secondary, through an [[export]];
    // the pool's gateway then serves the primary and skips the secondary.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("other.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[export]]\nname = \"data/disk0\"\nlun = {:?}\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let ctl = dir.path().join("other.sock");
    let other = Gateway::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--control",
        ctl.to_str().unwrap(),
    ]);
    let gw = Gateway::start(&["--pool", pool.arg()]);
    qemu_io_ok(&gw.uri("vm/disk0"), &["write -P 0x51 0 64k"]);
    let r = api(
        &gw.control(),
        "POST",
        "/v1/luns/vm/snapshots",
        Some(serde_json::json!({"name": "s1"})),
        409,
    );
    let msg = r.to_string();
    assert!(
        msg.contains("served by another lungate")
            && msg.contains(&format!("PID {}", other.pid()))
            && msg.contains("data"),
        "{msg}"
    );
    // Nothing changed: no snapshot on either disk, the guest's data intact.
    assert_eq!(
        api(&gw.control(), "GET", "/v1/luns/vm/snapshots", None, 200),
        serde_json::json!([])
    );
    assert_eq!(
        api(&ctl, "GET", "/v1/luns/data/snapshots", None, 200),
        serde_json::json!([])
    );
    qemu_io_ok(&gw.uri("vm/disk0"), &["read -P 0x51 0 64k"]);
    gw.stop_ok();
    other.stop_ok();
}

/// A revert a crash interrupted (its intent file left in the pool) is
/// finished when the next gateway starts, before it serves: the disk reads
/// as the snapshot, and the LUN's owner record names the new gateway, not
/// the one whose record came back with the snapshot's state.
#[test]
fn a_revert_finished_at_start_leaves_the_new_gateways_owner_record() {
    use lun_manager::format::state::{Owner, RecordType};
    let owner = |p: &std::path::Path| -> Option<Owner> {
        lun_manager::Lun::open(p, lun_manager::Access::ReadOnly)
            .unwrap()
            .record_json(RecordType::Owner, 0)
            .unwrap()
    };
    let mut pool = Pool::new();
    let path = pool.add("vm", "offset", &["2M"], "1M").path.clone();
    let gw1 = Gateway::start(&["--pool", pool.arg()]);
    let first = gw1.pid();
    qemu_io_ok(&gw1.uri("vm/disk0"), &["write -P 0x31 0 64k"]);
    let c = lungate_api::Client::new(&gw1.control()).unwrap();
    c.snapshot("vm", "s", "").unwrap();
    qemu_io_ok(&gw1.uri("vm/disk0"), &["write -P 0x32 0 64k"]);
    gw1.stop_ok();
    assert_eq!(owner(&path).map(|o| o.pid), Some(first));

    // What Group::revert writes before it touches a volume.
    let intent = pool.path().join(".vm.group-op");
    std::fs::write(&intent, br#"{"op":"revert","name":"s"}"#).unwrap();
    let gw2 = Gateway::start(&["--pool", pool.arg()]);
    assert!(!intent.exists(), "the intent outlived the recovery");
    qemu_io_ok(&gw2.uri("vm/disk0"), &["read -P 0x31 0 64k"]);
    let rec = owner(&path).expect("an owner record");
    assert_eq!(
        rec.pid,
        gw2.pid(),
        "after the recovered revert the owner record names {rec:?}"
    );
    assert!(rec.control.is_some(), "{rec:?}");
    gw2.stop_ok();
    pool.assert_hidden_unchanged();
}
