//! lungate against the NBD project's own conformance client
//! (`nbd-tester-client`, every mode it has) and against libnbd 1.22, a
//! client that negotiates extended headers (64-bit lengths and block
//! status) first, and that can start a server by socket activation. Both
//! are built from `../shared/conformance` into `target/conformance` (by
//! `scripts/setup`, or here on first use; a rebuild is skipped when the
//! sources did not change).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use lungate_tests::*;

/// The repository's `../shared/conformance`.
fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance")
}

/// `target/conformance`, built once per test run.
fn tools() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dest = profile_dir()
            .parent()
            .expect("profile dir has a parent")
            .join("conformance");
        let out = run_timeout(
            Command::new("bash")
                .arg(shared().join("build.sh"))
                .arg(&dest),
            Duration::from_secs(900),
        );
        assert_success("build.sh (../shared/conformance)", &out);
        dest
    })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The nbd test suite's certificates: CA, server and client (2432-bit RSA
/// keys, which some TLS stacks refuse) and a self-signed client.
fn certs() -> PathBuf {
    tools().join("share/nbd-tests/certs")
}

fn cert(name: &str) -> String {
    certs().join(name).to_str().expect("utf-8 path").to_string()
}

/// A command for one of libnbd 1.22's tools (nbdsh, nbdinfo, nbdcopy),
/// with Debian's python first on PATH (nbdsh runs `python3 -m nbd`).
fn libnbd(tool: &str) -> Command {
    let d = tools();
    let mut cmd = Command::new(d.join("libnbd/bin").join(tool));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![PathBuf::from("/usr/bin")];
    dirs.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(dirs).expect("PATH"))
        .env("LD_LIBRARY_PATH", d.join("libnbd/lib"))
        .env("PYTHONPATH", d.join("libnbd/python"));
    cmd
}

/// Runs `run-tester.sh` with `modes` against `gw`'s export; returns its
/// output (one PASS/FAIL line per mode).
fn tester(gw: &Gateway, export: &str, modes: &[&str], tls: bool) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(shared().join("run-tester.sh"))
        .arg(tools())
        .arg("127.0.0.1")
        .arg(gw.port().to_string())
        .arg(export)
        .args(modes)
        .env("NBD_SOCK", gw.unix_path())
        .env("TIMEOUT", "300")
        .env("LOGDIR", gw.scratch().join("tester-logs"));
    if tls {
        cmd.env("NBD_TLS_DIR", certs());
    }
    // The tester's zeroing step uses libnbd's python module from DEST.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![PathBuf::from("/usr/bin")];
    dirs.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(dirs).expect("PATH"));
    run_timeout(&mut cmd, Duration::from_secs(1800))
}

fn assert_all_pass(out: &Output, modes: &[&str]) {
    let t = text(out);
    for m in modes {
        assert!(
            t.lines()
                .any(|l| l.split_whitespace().take(2).eq(["PASS", m])),
            "mode {m} did not pass:\n{t}"
        );
    }
    assert!(
        out.status.success() && t.contains(&format!("{} passed, 0 failed", modes.len())),
        "nbd-tester-client:\n{t}"
    );
    eprintln!("{t}");
}

fn tls_args() -> Vec<String> {
    vec![
        "--tls-cert".into(),
        cert("server-cert.pem"),
        "--tls-key".into(),
        cert("server-key.pem"),
        "--tls-ca".into(),
        cert("ca-cert.pem"),
    ]
}

/// Every mode nbd-tester-client has, over TCP, the unix socket and TLS,
/// against one gateway with `--tls on` and the suite's 2432-bit RSA keys:
/// 1 KiB reads and writes, FUA and flush, oversize reads, the integrity
/// traces (the huge one has requests of 49,865,728 bytes), the handshake
/// test, NBD_OPT_LIST, and TLS including a client whose certificate no
/// CA signed (the handshake must fail). `rowrite` runs against a read-only
/// gateway. Not one hidden byte of the LUN changes.
#[test]
fn nbd_tester_client_passes_every_mode() {
    tools();
    let mut pool = Pool::new();
    pool.add("vm1", "offset", &["256M"], "16M");
    let mut args = vec!["--pool".to_string(), pool.arg().to_string()];
    args.extend(["--tls".into(), "on".into()]);
    args.extend(tls_args());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut gw = Gateway::start(&a);
    let modes = [
        "read",
        "write",
        "flush",
        "oversize",
        "integrity",
        "integrityhuge",
        "handshake",
        "list",
        "unix",
        "unix-write",
        "unix-integrity",
        "tls",
        "tlshuge",
        "tlswrongcert",
    ];
    let out = tester(&gw, "vm1/disk0", &modes, true);
    assert_all_pass(&out, &modes);
    assert!(
        gw.stderr_log().contains("invalid peer certificate"),
        "tlswrongcert was not refused for its certificate:\n{}",
        gw.stderr_log()
    );
    gw.assert_running();
    gw.stop_ok();

    let mut ro = Gateway::start(&["--pool", pool.arg(), "--read-only"]);
    let out = tester(&ro, "vm1/disk0", &["rowrite", "read"], false);
    assert_all_pass(&out, &["rowrite", "read"]);
    ro.assert_running();
    ro.stop_ok();
    pool.assert_hidden_unchanged();
}

/// `integrity-loose` sends a request that overlaps an in-flight write at
/// once. The spec lets a server reorder such requests, so this mode is
/// not a conformance requirement, but lungate, which applies every write
/// before replying and runs requests as they come, passes it.
#[test]
fn nbd_tester_client_loose_integrity_passes() {
    tools();
    let mut pool = Pool::new();
    pool.add("vm1", "offset", &["256M"], "16M");
    let mut gw = Gateway::start(&["--pool", pool.arg()]);
    let out = tester(&gw, "vm1/disk0", &["integrity-loose"], false);
    assert_all_pass(&out, &["integrity-loose"]);
    gw.assert_running();
    gw.stop_ok();
}

/// libnbd 1.22 over TLS with a directory holding only the CA: no client
/// certificate. `true` if it could read the export.
fn anonymous_tls_client_gets_in(gw: &Gateway) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(certs().join("ca-cert.pem"), dir.path().join("ca-cert.pem")).expect("copy CA");
    let uri = format!(
        "nbds://localhost:{}/vm1/disk0?tls-certificates={}",
        gw.port(),
        dir.path().display()
    );
    let out = run_timeout(
        libnbd("nbdinfo").args(["--size", &uri]),
        Duration::from_secs(60),
    );
    out.status.success()
}

/// `tls.verify_peer` (`--tls-verify-peer`, qemu-nbd's verify-peer=on): a
/// client must present a certificate signed by `tls.ca`. The suite's
/// client (2432-bit RSA, signed by the CA) passes the tls mode, the
/// self-signed one is refused, and a client without a certificate is
/// refused, where without verify_peer it is let in as anonymous.
#[test]
fn tls_verify_peer_requires_a_certificate_signed_by_the_ca() {
    tools();
    let mut pool = Pool::new();
    pool.add("vm1", "offset", &["64M"], "16M");
    let mut args = vec!["--pool".to_string(), pool.arg().to_string()];
    args.extend(["--tls".into(), "require".into(), "--tls-verify-peer".into()]);
    args.extend(tls_args());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut gw = Gateway::start(&a);
    let out = tester(&gw, "vm1/disk0", &["tls", "tlswrongcert"], true);
    assert_all_pass(&out, &["tls", "tlswrongcert"]);
    assert!(
        !anonymous_tls_client_gets_in(&gw),
        "a client without a certificate got in despite --tls-verify-peer"
    );
    gw.assert_running();
    gw.stop_ok();

    // Without verify_peer the same anonymous client is served.
    let a: Vec<&str> = a
        .into_iter()
        .filter(|x| *x != "--tls-verify-peer")
        .collect();
    let gw = Gateway::start(&a);
    assert!(
        anonymous_tls_client_gets_in(&gw),
        "without --tls-verify-peer a client need not present a certificate"
    );
    gw.stop_ok();
}

/// Runs an nbdsh (libnbd 1.22) program against `uri`; returns stdout.
fn nbdsh122(uri: &str, program: &str) -> String {
    let out = run_timeout(
        libnbd("nbdsh").env("URI", uri).args(["-c", program]),
        Duration::from_secs(300),
    );
    assert_success("nbdsh (libnbd 1.22)", &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Extended headers with libnbd 1.22: negotiated when asked for (and by
/// default), refused by nobody when not; 64-bit effect lengths (one
/// WRITE_ZEROES and one TRIM of 5 GiB), 64-bit block status (one extent
/// longer than 4 GiB), data at offsets past 4 GiB, and the shared
/// checker script, all on a sparse 8 GiB disk.
#[test]
fn libnbd_negotiates_extended_headers_and_uses_64_bit_lengths() {
    tools();
    let mut pool = Pool::new();
    pool.add("big", "offset", &["8G"], "16M");
    let mut gw = Gateway::start(&["--pool", pool.arg()]);
    let uri = gw.uri("big/disk0");

    let out = run_timeout(
        Command::new("bash")
            .arg(shared().join("check-extended-headers.sh"))
            .arg(tools())
            .arg(&uri)
            .arg("--require")
            .env(
                "PATH",
                format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
            ),
        Duration::from_secs(120),
    );
    assert_success("check-extended-headers.sh --require", &out);

    let info = run_timeout(libnbd("nbdinfo").arg(&uri), Duration::from_secs(60));
    assert_success("nbdinfo", &info);
    assert!(
        text(&info).contains("using extended packets"),
        "nbdinfo 1.22 did not use extended packets:\n{}",
        text(&info)
    );

    let program = r#"
import os
G = 1 << 30
h.set_request_extended_headers(True)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(os.environ["URI"])
assert h.get_extended_headers_negotiated(), "extended headers not negotiated"
size = h.get_size()
assert size == 8 * G, size
# Data past 4 GiB.
data = bytes((i * 7 + 3) & 0xff for i in range(1 << 20))
h.pwrite(data, 6 * G + 4096)
assert h.pread(len(data), 6 * G + 4096) == data
# One zero request and one trim request longer than 32 bits.
h.pwrite(b"\xaa" * 65536, G)
h.zero(5 * G, G)
assert h.pread(65536, G) == bytes(65536), "5 GiB zero did not zero"
h.trim(5 * G, G)
# 64-bit block status: one query over 7 GiB.
if hasattr(h, "block_status_64"):
    ext = []
    def cb64(meta, off, entries, err):
        ext.extend(entries)  # (length, flags) pairs
        return 0
    h.block_status_64(7 * G, 0, cb64)
    longest = max(l for l, f in ext)
    print("extents", len(ext), "longest", longest)
    assert longest > 4 * G, ext
# Back to the data past 4 GiB, still there.
assert h.pread(len(data), 6 * G + 4096) == data
h.shutdown()

# Without asking: structured replies, compact headers.
c = nbd.NBD()
c.set_request_extended_headers(False)
c.connect_uri(os.environ["URI"])
assert not c.get_extended_headers_negotiated()
assert c.get_structured_replies_negotiated()
assert c.pread(len(data), 6 * G + 4096) == data
c.shutdown()
print("EXTENDED OK")
"#;
    let out = nbdsh122(&uri, program);
    assert!(out.contains("EXTENDED OK"), "{out}");
    assert!(
        out.contains("longest"),
        "libnbd 1.22 has no block_status_64: {out}"
    );
    assert!(
        gw.stderr_log().contains("extended=true"),
        "the gateway did not log an extended-headers session"
    );
    gw.assert_running();
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// The changed-blocks context (`qemu:dirty-bitmap:SNAP`) with extended
/// headers: one BLOCK_STATUS_EXT chunk per selected context, 64-bit
/// descriptor lengths (a clean run of 6 GiB before the one dirty cluster)
/// and one query covering a whole 8 GiB disk; without extended headers the
/// same bitmap in compact chunks.
#[test]
fn libnbd_reads_dirty_bitmaps_with_64_bit_block_status() {
    tools();
    let mut pool = Pool::new();
    pool.add("big", "offset", &["8G"], "16M");
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let uri = gw.uri("big/disk0");
    qemu_io_ok(&uri, &["write -P 0xa0 0 1M"]);
    api(
        &gw.control(),
        "POST",
        "/v1/luns/big/snapshots",
        Some(serde_json::json!({ "name": "s" })),
        201,
    );
    qemu_io_ok(&uri, &["write -P 0xb0 6G 4k"]);
    let program = r#"
import os
G = 1 << 30
C = 64 << 10
for ext in (True, False):
    h = nbd.NBD()
    h.set_request_extended_headers(ext)
    h.add_meta_context("qemu:dirty-bitmap:s")
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(os.environ["URI"])
    assert h.get_extended_headers_negotiated() == ext
    assert h.can_meta_context("qemu:dirty-bitmap:s")
    got = {}
    def cb64(meta, off, entries, err):
        assert meta not in got, "one chunk per context"
        got[meta] = list(entries)
        return 0
    if ext:
        # One query over the whole disk, 64-bit lengths.
        h.block_status_64(8 * G, 0, cb64)
        d = got["qemu:dirty-bitmap:s"]
        assert d == [(6 * G, 0), (C, 1), (2 * G - C, 0)], d
    else:
        # Compact requests stop below 4 GiB; the dirty cluster at 6 GiB
        # is found from where the client asks.
        h.block_status_64(4 * G - C, 0, cb64)
        assert got["qemu:dirty-bitmap:s"] == [(4 * G - C, 0)], got
        del got["qemu:dirty-bitmap:s"]
        rest = {}
        def cb(meta, off, entries, err):
            rest[meta] = list(entries)
            return 0
        h.block_status_64(2 * G + C, 6 * G - C, cb)
        assert rest["qemu:dirty-bitmap:s"] == [(C, 0), (C, 1), (2 * G - C, 0)], rest
    assert "base:allocation" in got, got
    h.shutdown()
print("DIRTY EXT OK")
"#;
    let out = nbdsh122(&uri, program);
    assert!(out.contains("DIRTY EXT OK"), "{out}");
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

/// The shared checker script (every command, flag and option libnbd can
/// send, structured and not, strict and not) with libnbd 1.22, once with
/// extended headers and once without; and nbdcopy 1.22 (extended headers,
/// four connections: multi-conn) copying random data in and out.
#[test]
fn libnbd_1_22_checks_every_command_with_and_without_extended_headers() {
    tools();
    let mut pool = Pool::new();
    pool.add("vm", "offset", &["64M"], "16M");
    let mut gw = Gateway::start(&["--pool", pool.arg()]);
    let size = pool.lun("vm").disk_sizes[0];
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nbdsh_all.py");
    for (ext, uri) in [
        ("1", gw.uri("vm/disk0")),
        ("0", gw.uri("vm/disk0")),
        ("1", gw.unix_uri("vm/disk0")),
    ] {
        let out = run_timeout(
            libnbd("nbdsh")
                .env("NBDSH_URI", &uri)
                .env("NBDSH_SIZE", size.to_string())
                .env("NBDSH_EXTENDED", ext)
                .arg("-c")
                .arg(format!(
                    "exec(open({:?}).read())",
                    script.display().to_string()
                )),
            Duration::from_secs(300),
        );
        assert_success(&format!("nbdsh_all.py extended={ext} {uri}"), &out);
        assert!(text(&out).contains("NBDSH_ALL OK"), "{}", text(&out));
    }

    let src = gw.scratch().join("src.raw");
    let back = gw.scratch().join("back.raw");
    std::fs::write(&src, pattern_bytes(size as usize, 0xc0f1)).expect("write src");
    for (what, args) in [
        ("in", vec![src.display().to_string(), gw.uri("vm/disk0")]),
        ("out", vec![gw.uri("vm/disk0"), back.display().to_string()]),
    ] {
        let out = run_timeout(
            libnbd("nbdcopy")
                .args(["--connections=4", "--requests=16"])
                .args(&args)
                .stdout(Stdio::piped()),
            Duration::from_secs(300),
        );
        assert_success(&format!("nbdcopy {what}"), &out);
    }
    assert!(
        std::fs::read(&src).expect("src") == std::fs::read(&back).expect("back"),
        "nbdcopy 1.22 round trip changed the data"
    );
    gw.assert_running();
    gw.stop_ok();
    pool.assert_hidden_unchanged();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Socket activation (`LISTEN_PID`/`LISTEN_FDS`) with two real launchers:
/// libnbd 1.22's `connect_systemd_socket_activation` (what `nbdinfo [ CMD ]`
/// uses: a unix socket) and systemd's `systemd-socket-activate` (a TCP
/// socket, the gateway started on the first connection). The gateway
/// serves the socket it was given and binds nothing of its own.
#[test]
fn socket_activation_with_libnbd_and_systemd_socket_activate() {
    tools();
    let mut pool = Pool::new();
    pool.add("vm", "offset", &["64M"], "16M");
    let lungate = bin("lungate");
    let program = format!(
        r#"
h.set_export_name("vm/disk0")
h.connect_systemd_socket_activation([{lungate:?}, "serve", "--pool", {pool:?}])
assert h.get_size() == 64 << 20, h.get_size()
assert h.get_extended_headers_negotiated()
h.pwrite(b"activated" * 512, 1 << 20)
assert h.pread(9 * 512, 1 << 20) == b"activated" * 512
h.shutdown()
print("ACTIVATED OK")
"#,
        lungate = lungate.display().to_string(),
        pool = pool.arg(),
    );
    let out = run_timeout(
        libnbd("nbdsh").args(["-c", &program]),
        Duration::from_secs(120),
    );
    assert_success("nbdsh connect_systemd_socket_activation", &out);
    assert!(text(&out).contains("ACTIVATED OK"), "{}", text(&out));
    assert!(
        text(&out).contains("socket activation: serving the passed-in sockets"),
        "the gateway did not say it was socket-activated:\n{}",
        text(&out)
    );
    let list = run_timeout(
        libnbd("nbdinfo")
            .args(["--list", "--", "["])
            .arg(&lungate)
            .args(["serve", "--pool", pool.arg(), "]"]),
        Duration::from_secs(120),
    );
    assert_success("nbdinfo --list [ lungate serve ]", &list);
    assert!(text(&list).contains("vm/disk0"), "{}", text(&list));

    // systemd-socket-activate listens, and starts the gateway with the
    // socket when the first client connects.
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("gw.log");
    let mut child = Command::new(require_tool("systemd-socket-activate"))
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg(&lungate)
        .args(["serve", "--pool", pool.arg()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start systemd-socket-activate");
    let uri = format!("nbd://127.0.0.1:{port}/vm/disk0");
    let mut served = None;
    for _ in 0..100 {
        let o = run_timeout(
            Command::new(require_tool("qemu-io")).args([
                "-f",
                "raw",
                "-c",
                "read -P 0x61 1048576 1",
                &uri,
            ]),
            CMD_TIMEOUT,
        );
        if o.status.success() {
            served = Some(o);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill(2) on our own unreaped child's PID, which
    // systemd-socket-activate replaced with the gateway (it execs it).
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = wait_timeout(&mut child, STOP_TIMEOUT);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let o = served.unwrap_or_else(|| panic!("qemu-io never got served on {uri}:\n{log}"));
    assert!(
        !text(&o).contains("Pattern verification failed"),
        "{}",
        text(&o)
    );
    assert!(
        log.contains("socket activation: serving the passed-in sockets"),
        "{log}"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the socket-activated gateway did not exit cleanly: {status:?}\n{log}"
    );
    // (No hidden-digest check here: these gateways, unknown to the
    // harness, write their owner records into the state region.)
}
