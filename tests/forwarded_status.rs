//! Block status on an NBD connection a migration forwards: a client that
//! selected `qemu:dirty-bitmap:SNAP` before its LUN moved to another
//! gateway (or another pool of its gateway) keeps reading the changed
//! blocks through the source, answered by the new owner (docs/migration.md,
//! "What happens").

#[path = "migrate_common.rs"]
mod common;

use common::*;
use lungate_tests::*;
use serde_json::json;

/// A LUN with snapshot s1 and changes after it in pool `a`, served by
/// `src`; an nbdsh connection reads its bitmap, `lunctl migrate vm
/// --pool A TO...` moves it, and the same connection must read the same
/// bitmap, then see its own write in it as a new connection to `dst`
/// does.
fn bitmap_survives(src: &Gateway, dst: &Gateway, a_s: &str, to: &str) {
    let uri = src.uri("vm/disk0");
    qemu_io_ok(&uri, &["write -P 0xa0 0 4M"]);
    api(
        &src.control(),
        "POST",
        "/v1/luns/vm/snapshots",
        Some(json!({"name": "s1"})),
        201,
    );
    // After s1: 64 KiB at 1 MiB and 1 MiB at 8 MiB.
    qemu_io_ok(&uri, &["write -P 0xb1 1M 64k", "write -P 0xb0 8M 1M"]);

    let program = r#"
import os, subprocess
M = 1 << 20
ctx = "qemu:dirty-bitmap:s1"

def connect(uri):
    h = nbd.NBD()
    h.add_meta_context(ctx)
    h.connect_uri(uri)
    assert h.can_meta_context(ctx)
    return h

def status(h):
    got = []
    def cb(meta, off, entries, err):
        assert meta == ctx, meta
        got.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(32 * M, 0, cb)
    return got

h = connect(os.environ["SRC"])
before = status(h)
assert before == [(M, 0), (64 << 10, 1), (7 * M - (64 << 10), 0), (M, 1), (23 * M, 0)], before
subprocess.run([os.environ["LUNCTL"], "migrate", "vm", "--pool", os.environ["POOL"]]
               + os.environ["TO"].split(), check=True, capture_output=True)
# The same connection, now forwarded to the new owner.
after = status(h)
assert after == before, (after, before)
# A write through it shows in its bitmap, as the new owner reports it.
h.pwrite(b"\xc0" * (64 << 10), 20 * M)
h.flush()
forwarded = status(h)
assert forwarded != before, forwarded
fresh = connect(os.environ["DST"])
assert forwarded == status(fresh), (forwarded, status(fresh))
def dirty_at(runs, where):
    at = 0
    for n, f in runs:
        if at <= where < at + n:
            return f == 1
        at += n
    return False
assert dirty_at(forwarded, 20 * M) and not dirty_at(before, 20 * M), forwarded
assert h.pread(512, 20 * M) == b"\xc0" * 512
fresh.shutdown()
h.shutdown()
print("FORWARDED STATUS OK")
"#;
    let out = run_timeout(
        nbdsh()
            .env("SRC", &uri)
            .env("DST", dst.uri("vm/disk0"))
            .env("TO", to)
            .env("LUNCTL", bin("lunctl"))
            .env("POOL", a_s)
            .args(["-c", program]),
        std::time::Duration::from_secs(180),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("FORWARDED STATUS OK"),
        "{text}\nsource:\n{}\ntarget:\n{}",
        src.stderr_log(),
        dst.stderr_log()
    );
}

#[test]
fn a_connection_opened_before_a_migration_reads_the_dirty_bitmap_from_the_new_owner() {
    let (a, b) = (pool_dir(), pool_dir());
    let (a_s, b_s) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    create_lun(a.path(), "vm", "offset", &["32M"], "16M");
    let src = Gateway::start(&["--pool", a_s]);
    let dst = Gateway::start(&["--pool", b_s, "--migration-listen", "127.0.0.1:0"]);
    bitmap_survives(&src, &dst, a_s, &format!("--to {}", migration_addr(&dst)));
    assert!(b.path().join("vm.lun").is_file());
    src.stop_ok();
    dst.stop_ok();
}

#[test]
fn a_connection_opened_before_a_move_between_pools_reads_the_dirty_bitmap_from_the_new_pool() {
    let (a, b) = (pool_dir(), pool_dir());
    let (a_s, b_s) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    create_lun(a.path(), "vm", "offset", &["32M"], "16M");
    let gw = Gateway::start(&["--pool", a_s, "--pool", b_s]);
    bitmap_survives(&gw, &gw, a_s, &format!("--to-pool {b_s}"));
    assert!(b.path().join("vm.lun").is_file() && !a.path().join("vm.lun").exists());
    gw.stop_ok();
}
