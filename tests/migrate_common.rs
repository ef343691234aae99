//! Helpers both migration test files use: a sequence-numbered NBD
//! writer with read-back verification, pool directories, `lunctl migrate`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use lungate_api::nbd::client::{Address, NbdClient};
use lungate_tests::*;

pub const BLOCK: usize = 4096;
/// Blocks the writer cycles through (at the start of disk 0).
pub const BLOCKS: u64 = 1024;

/// The bytes of block `k` after write number `seq`.
pub fn block(k: u64, seq: u64) -> Vec<u8> {
    let mut b = pattern_bytes(BLOCK, seq.wrapping_mul(0x9e37_79b9) ^ k);
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&k.to_le_bytes());
    b
}

/// What a writer saw.
pub struct Seen {
    pub ops: u64,
    pub failures: Vec<String>,
    pub mismatches: u64,
    /// The last sequence number written to each block (0: never).
    pub model: Vec<u64>,
}

/// Sequence-numbered writes with read-back verification on one NBD
/// connection, until `stop`; every 16th write also reads an older block.
pub fn writer(addr: Address, export: String, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) -> Seen {
    let mut seen = Seen {
        ops: 0,
        failures: Vec::new(),
        mismatches: 0,
        model: vec![0; BLOCKS as usize],
    };
    let mut c = match NbdClient::connect(&addr, &export) {
        Ok(c) => c,
        Err(e) => {
            seen.failures.push(format!("connect: {e}"));
            return seen;
        }
    };
    let mut seq = 0u64;
    let mut buf = vec![0u8; BLOCK];
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let k = (seq * 7) % BLOCKS;
        let data = block(k, seq);
        if let Err(e) = c.write_at(k * BLOCK as u64, &data) {
            seen.failures.push(format!("write #{seq}: {e}"));
            break;
        }
        seen.model[k as usize] = seq;
        if let Err(e) = c.read_at(k * BLOCK as u64, &mut buf) {
            seen.failures.push(format!("read #{seq}: {e}"));
            break;
        }
        if buf != data {
            seen.mismatches += 1;
        }
        if seq % 16 == 0 {
            let j = (seq * 13) % BLOCKS;
            if let Err(e) = c.read_at(j * BLOCK as u64, &mut buf) {
                seen.failures.push(format!("read back #{seq}: {e}"));
                break;
            }
            let want = match seen.model[j as usize] {
                0 => None,
                s => Some(block(j, s)),
            };
            if let Some(w) = want {
                if buf != w {
                    seen.mismatches += 1;
                }
            }
        }
        if seq % 64 == 0 {
            if let Err(e) = c.flush() {
                seen.failures.push(format!("flush #{seq}: {e}"));
                break;
            }
        }
        seen.ops = seq;
        count.store(seq, Ordering::Relaxed);
    }
    if seen.failures.is_empty() {
        if let Err(e) = c.disconnect() {
            seen.failures.push(format!("disconnect: {e}"));
        }
    }
    seen
}

/// Check every block the writer wrote, through a new connection.
pub fn verify(addr: &Address, export: &str, model: &[u64]) {
    let mut c = NbdClient::connect(addr, export).unwrap_or_else(|e| panic!("{addr} {export}: {e}"));
    let mut buf = vec![0u8; BLOCK];
    let mut bad = 0;
    for (k, &s) in model.iter().enumerate() {
        c.read_at(k as u64 * BLOCK as u64, &mut buf).unwrap();
        let want = if s == 0 {
            vec![0u8; BLOCK]
        } else {
            block(k as u64, s)
        };
        if buf != want {
            bad += 1;
        }
    }
    c.disconnect().unwrap();
    assert_eq!(bad, 0, "{bad} blocks read back wrong from {addr} {export}");
}

/// Fill `[0, len)` of an export with `fill`, then flush.
pub fn fill(addr: &Address, export: &str, off: u64, len: usize, seed: u64) -> Vec<u8> {
    let mut c = NbdClient::connect(addr, export).unwrap();
    let data = pattern_bytes(len, seed);
    c.write_at(off, &data).unwrap();
    c.flush().unwrap();
    c.disconnect().unwrap();
    data
}

pub fn read(addr: &Address, export: &str, off: u64, len: usize) -> Vec<u8> {
    let mut c = NbdClient::connect(addr, export).unwrap();
    let mut b = vec![0u8; len];
    c.read_at(off, &mut b).unwrap();
    c.disconnect().unwrap();
    b
}

pub fn migration_addr(gw: &Gateway) -> String {
    gw.stdout_lines()
        .iter()
        .find_map(|l| l.strip_prefix("migration tcp "))
        .map(|a| a.trim().to_string())
        .expect("gateway printed no `migration tcp` line")
}

/// A new pool directory (`lunctl pool init`).
pub fn pool_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    lunctl(&["pool", "init", d.path().to_str().unwrap()]);
    d
}

pub fn tcp(gw: &Gateway) -> Address {
    Address::Tcp(gw.addr())
}

/// `lunctl --json migrate ARGS`: its final JSON object and whether it
/// exited 0.
pub fn lunctl_migrate(args: &[&str]) -> (bool, serde_json::Value, String) {
    let mut full = vec!["--json", "migrate"];
    full.extend_from_slice(args);
    let out = run_timeout(
        std::process::Command::new(bin("lunctl")).args(&full),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .unwrap_or(serde_json::Value::Null);
    let all = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), last, all)
}

/// Files and directories under `dir` (recursively), relative.
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name == ".lungate.sock" {
                continue;
            }
            out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// [`tree`] without an empty migration state directory (what a pool that
/// answered a migration may keep; it holds no file of one).
pub fn clean_tree(dir: &Path) -> Vec<PathBuf> {
    let t = tree(dir);
    let state = PathBuf::from(".lungate-migrations");
    if t.iter().filter(|p| p.starts_with(&state)).count() == 1 {
        return t.into_iter().filter(|p| *p != state).collect();
    }
    t
}

pub fn run_writer(
    addr: Address,
    export: &str,
) -> (Arc<AtomicBool>, Arc<AtomicU64>, thread::JoinHandle<Seen>) {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let (s, c, e) = (stop.clone(), count.clone(), export.to_string());
    let h = thread::spawn(move || writer(addr, e, s, c));
    (stop, count, h)
}

/// Wait until the writer has done `n` more operations.
pub fn wait_ops(count: &AtomicU64, n: u64) {
    let start = count.load(Ordering::Relaxed);
    let t = Instant::now();
    while count.load(Ordering::Relaxed) < start + n {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the writer made no progress"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

pub fn assert_clean(seen: &Seen) {
    assert!(
        seen.failures.is_empty(),
        "failed requests: {:?}",
        seen.failures
    );
    assert_eq!(seen.mismatches, 0, "mismatched reads");
    assert!(seen.ops > 0);
}

/// Requests [`migrate_under_writer`] waits for before and after the move.
pub const UNDER_WRITER_OPS: u64 = 300;

/// `lunctl --json migrate ARGS` while the sequence-numbered writer runs
/// on `export` of `src` through one connection held open across the
/// switch: [`UNDER_WRITER_OPS`] requests before the migration and as many
/// after it (forwarded to the new owner). Asserts the migration ended `done` and
/// every request was answered right; returns the migration's result and
/// what the writer saw. `dst` is the target, whose log a failure shows.
pub fn migrate_under_writer(
    src: &Gateway,
    dst: &Gateway,
    export: &str,
    args: &[&str],
) -> (serde_json::Value, Seen) {
    let ops = UNDER_WRITER_OPS;
    let (stop, count, h) = run_writer(Address::Tcp(src.addr()), export);
    wait_ops(&count, ops);
    let (ok, res, all) = lunctl_migrate(args);
    if !ok {
        stop.store(true, Ordering::Relaxed);
        let _ = h.join();
        panic!(
            "lunctl migrate {args:?} failed: {all}\nsource:\n{}\ntarget:\n{}",
            src.stderr_log(),
            dst.stderr_log()
        );
    }
    assert_eq!(res["type"], "result", "{all}");
    assert_eq!(res["phase"], "done", "{res}");
    wait_ops(&count, ops);
    stop.store(true, Ordering::Relaxed);
    let seen = h.join().unwrap();
    assert_clean(&seen);
    (res, seen)
}
