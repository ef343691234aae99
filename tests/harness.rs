//! Shared harness for lungate's end-to-end tests.
//!
//! It finds the built `lungate` and `lunctl` binaries, creates LUNs in
//! throwaway pools with `lunctl`, runs a real `lungate serve` child and
//! parses its stdout contract, and runs real clients (qemu-io, nbdinfo,
//! nbdsh, ...) with a timeout on every wait. Children are ended by PID only,
//! never by name. It does not mock anything: a test that uses it talks to
//! the real server over real sockets.

pub mod ceph;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a gateway may take to print `ready`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a gateway may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit for one client command (qemu-io, nbdinfo, lunctl, ...).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(90);

/// The directory holding the built binaries of the profile this test was
/// built with: `<target>/<profile>`, found from the test executable
/// (`<target>/<profile>/deps/<test>-<hash>`), or from `CARGO_TARGET_DIR`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test executable has a parent")
        .to_path_buf();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    if dir.exists() {
        return dir;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug")
}

/// Path of a workspace binary (`lungate`, `lunctl`). Panics if it has not
/// been built.
pub fn bin(name: &str) -> PathBuf {
    let mut candidates = vec![profile_dir().join(name)];
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        let profile = profile_dir()
            .file_name()
            .map(|p| p.to_os_string())
            .unwrap_or_else(|| "debug".into());
        candidates.push(PathBuf::from(t).join(profile).join(name));
    }
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "{name} not found (looked at {candidates:?}): build it first: cargo build --workspace --bins"
    );
}

/// Path of an external tool on PATH. Panics naming `scripts/setup` if it is
/// missing: a test never skips silently.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
        let p = dir.join(name);
        if is_executable(&p) {
            return p;
        }
    }
    panic!("{name} not found: run scripts/setup");
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A printable form of a command line, for panic messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push('\'');
            s.push_str(&a);
            s.push('\'');
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` to completion with stdout and stderr captured, killing it (by
/// PID) and panicking if it takes longer than `timeout`. The exit status is
/// returned as is: check it with [`assert_success`] or inspect it.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    let out = drain(child.stdout.take().expect("piped stdout"));
    let err = drain(child.stderr.take().expect("piped stderr"));
    let status = match wait_timeout(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            // A grandchild (a server the command started) may still hold
            // the pipes open: wait for the output only briefly.
            let stdout = out.take_within(Duration::from_secs(2));
            let stderr = err.take_within(Duration::from_secs(2));
            panic!(
                "`{what}` did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
    };
    Output {
        status,
        stdout: out.take(),
        stderr: err.take(),
    }
}

/// Runs `cmd` with [`CMD_TIMEOUT`] and panics with its output unless it
/// exits 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let what = describe(cmd);
    let out = run_timeout(cmd, CMD_TIMEOUT);
    assert_success(&what, &out);
    out
}

/// Panics with the command's output unless it exited 0.
pub fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "`{what}` failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pipe read to its end on a thread of its own.
struct Drain(mpsc::Receiver<Vec<u8>>);

impl Drain {
    /// Everything, once the writing end is closed.
    fn take(self) -> Vec<u8> {
        self.0.recv().unwrap_or_default()
    }

    /// Everything if the pipe closes within `t`, else nothing.
    fn take_within(self, t: Duration) -> Vec<u8> {
        self.0.recv_timeout(t).unwrap_or_default()
    }
}

fn drain<R: Read + Send + 'static>(mut r: R) -> Drain {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    Drain(rx)
}

/// Polls `child` until it exits or `timeout` passes (`None`).
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Runs every command at the same time (one thread each, each with
/// `timeout`) and returns their outputs in order.
pub fn run_parallel(cmds: Vec<Command>, timeout: Duration) -> Vec<Output> {
    let handles: Vec<_> = cmds
        .into_iter()
        .map(|mut c| thread::spawn(move || run_timeout(&mut c, timeout)))
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| panic!("a parallel command panicked"))
        })
        .collect()
}

/// Put one state record, `rtype` #0 holding `bytes`, into `lun`'s state
/// region through the control API at `sock`.
pub fn put_record(sock: &Path, lun: &str, rtype: lungate_api::records::RecordType, bytes: &[u8]) {
    use lungate_api::types::{RecordBatch, RecordPut};
    let batch = RecordBatch {
        put: vec![RecordPut {
            rtype,
            instance: 0,
            length: bytes.len() as u64,
        }],
        remove: vec![],
    };
    lungate_api::client::Client::new(sock)
        .unwrap()
        .write_records(lun, &batch, |_, s| s.write(bytes))
        .unwrap_or_else(|e| panic!("put {rtype} of {lun}: {e}"));
}

/// Runs `lunctl ARGS`, panicking with its stderr if it fails.
pub fn lunctl(args: &[&str]) -> Output {
    run_ok(Command::new(bin("lunctl")).args(args))
}

/// Creates `pool/NAME.lun` with `lunctl create` and returns its path.
pub fn create_lun(pool: &Path, name: &str, layout: &str, disks: &[&str], memory: &str) -> PathBuf {
    let pool_s = pool.to_str().expect("utf-8 pool path");
    let mut args = vec!["create", name, "--pool", pool_s];
    for d in disks {
        args.push("--disk");
        args.push(d);
    }
    args.extend(["--memory", memory, "--layout", layout]);
    lunctl(&args);
    let path = pool.join(format!("{name}.lun"));
    assert!(
        path.is_file(),
        "lunctl create {name} exited 0 but {} does not exist",
        path.display()
    );
    path
}

/// Blake3 of every byte of the LUN outside its disk regions (GPT, label,
/// state, gaps), via `lun_manager`.
pub fn hidden_digest(lun: &Path) -> [u8; 32] {
    let l = lun_manager::Lun::open(lun, lun_manager::Access::ReadOnly)
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", lun.display()));
    l.hidden_digest()
        .unwrap_or_else(|e| panic!("hidden_digest of {}: {e}", lun.display()))
}

/// `(offset, length)` of each disk region in the backing file, in index
/// order, from `lun_manager`.
pub fn disk_regions(lun: &Path) -> Vec<(u64, u64)> {
    lun_manager::Lun::open(lun, lun_manager::Access::ReadOnly)
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", lun.display()))
        .disks()
        .iter()
        .map(|r| (r.offset, r.length))
        .collect()
}

/// `len` bytes of disk `disk` at disk offset `offset`, read from the LUN
/// file where lungate keeps each byte (a LUN without snapshot layers): at
/// the disk region's offset, and in the aligned layout the shadowed first
/// MiB of disk0 from the state region's shadow area. The mapping is the
/// LUN's own ([`lun_manager::Lun::disk_view`]), the one its exports use.
pub fn disk_file_bytes(lun: &Path, disk: u32, offset: u64, len: usize) -> Vec<u8> {
    let l = lun_manager::Lun::open(lun, lun_manager::Access::ReadOnly)
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", lun.display()));
    let view = l
        .disk_view(disk)
        .unwrap_or_else(|| panic!("{}: no disk{disk}", lun.display()));
    let pieces = view
        .pieces(offset, len as u64)
        .unwrap_or_else(|e| panic!("{} disk{disk}: {e}", lun.display()));
    let mut out = Vec::with_capacity(len);
    for p in pieces.iter() {
        out.extend(file_bytes(lun, p.at, p.len as usize));
    }
    out
}

/// The ranges of the LUN file that hold guest disk bytes (every disk's
/// view's ranges), sorted.
pub fn guest_file_ranges(lun: &Path) -> Vec<std::ops::Range<u64>> {
    let l = lun_manager::Lun::open(lun, lun_manager::Access::ReadOnly)
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", lun.display()));
    let mut v: Vec<_> = l
        .disks()
        .iter()
        .filter_map(|d| l.disk_view(d.index))
        .flat_map(|v| v.device_ranges())
        .collect();
    v.sort_by_key(|r| r.start);
    v
}

/// `len` bytes of `path` at `offset`.
pub fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset)
        .unwrap_or_else(|e| panic!("read {} bytes of {} at {offset}: {e}", len, path.display()));
    b
}

/// Parses a `lunctl` size ("64M", "1G", "4096", "512K", "1T") into bytes.
pub fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        Some(b'T' | b't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .unwrap_or_else(|e| panic!("bad size {s:?}: {e}"));
    n.checked_mul(mult)
        .unwrap_or_else(|| panic!("size {s:?} overflows u64"))
}

/// A disk size as `lunctl` stores it: rounded up to 1 MiB.
pub fn disk_size(s: &str) -> u64 {
    parse_size(s).div_ceil(1 << 20) * (1 << 20)
}

/// One LUN of a [`Pool`] and what the tests expect of it.
#[derive(Debug, Clone)]
pub struct LunInfo {
    pub name: String,
    pub path: PathBuf,
    /// "offset", "truncate" or "aligned".
    pub layout: String,
    /// Expected size of each disk export, in bytes, in index order.
    pub disk_sizes: Vec<u64>,
    /// [`hidden_digest`] right after creation; see [`baseline`].
    pub hidden: [u8; 32],
}

/// The reference hidden digest of each LUN a [`Pool`] created, by path.
/// A read-write gateway writes its `Owner` record (who serves the LUN, its
/// control socket) into the state region when it starts, before any client
/// can connect; [`Gateway::try_start`] therefore takes the reference again,
/// once `ready`, for every LUN whose owner record names that gateway. What
/// the tests then prove is what matters: nothing a client sends changes a
/// hidden byte.
static BASELINES: std::sync::Mutex<Vec<(PathBuf, [u8; 32])>> = std::sync::Mutex::new(Vec::new());

/// The hidden blocks ([`lun_manager::Lun::hidden_blocks`]) behind each
/// baseline, so a failed [`Pool::assert_hidden_unchanged`] can name what
/// changed.
type Blocks = Vec<(u64, [u8; 32])>;
static BASELINE_BLOCKS: std::sync::Mutex<Vec<(PathBuf, Blocks)>> =
    std::sync::Mutex::new(Vec::new());

fn hidden_blocks(lun: &Path) -> Blocks {
    lun_manager::Lun::open(lun, lun_manager::Access::ReadOnly)
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", lun.display()))
        .hidden_blocks()
        .unwrap_or_else(|e| panic!("hidden_blocks of {}: {e}", lun.display()))
}

/// Which blocks differ between `was` and the LUN at `path` now, each named
/// by the part of the LUN it lies in (label region, a state directory
/// slot, a state record, free state space, or elsewhere).
fn describe_hidden_change(path: &Path, was: &Blocks) -> String {
    use lun_manager::format::state::DIR_SLOT_SIZE;
    let now = hidden_blocks(path);
    let old: BTreeMap<u64, [u8; 32]> = was.iter().copied().collect();
    let new: BTreeMap<u64, [u8; 32]> = now.iter().copied().collect();
    let mut changed: Vec<(u64, &str)> = Vec::new();
    for (o, h) in &old {
        match new.get(o) {
            None => changed.push((*o, "now zero")),
            Some(n) if n != h => changed.push((*o, "changed")),
            _ => {}
        }
    }
    for o in new.keys() {
        if !old.contains_key(o) {
            changed.push((*o, "was zero"));
        }
    }
    changed.sort();
    let Ok(l) = lun_manager::Lun::open(path, lun_manager::Access::ReadOnly) else {
        return format!("{} blocks differ: {changed:?}", changed.len());
    };
    let st = *l.label().state_region();
    let dir = l.directory();
    let name = |o: u64| -> String {
        if o >= st.offset && o < st.offset + st.length {
            let rel = o - st.offset;
            if rel < 2 * DIR_SLOT_SIZE as u64 {
                return format!("state directory slot {}", rel / DIR_SLOT_SIZE as u64);
            }
            for e in &dir.entries {
                if rel + 4096 > e.offset && rel < e.offset + e.length {
                    return format!("state record {}#{}", e.rtype.name(), e.instance);
                }
            }
            return format!("state region +{rel:#x} (no current record)");
        }
        if o < st.offset {
            return "before the state region (GPT, label)".into();
        }
        "after the state region".into()
    };
    let list: Vec<String> = changed
        .iter()
        .take(24)
        .map(|(o, how)| format!("{o:#x} {how} ({})", name(*o)))
        .collect();
    format!(
        "{} of {} hidden blocks differ (directory generation now {}): {}",
        changed.len(),
        old.len().max(new.len()),
        dir.generation,
        list.join("; ")
    )
}

/// The reference digest of the LUN at `path` (its creation digest unless a
/// gateway has since claimed it).
pub fn baseline(path: &Path) -> Option<[u8; 32]> {
    BASELINES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, d)| *d)
}

fn set_baseline(path: &Path, d: [u8; 32]) {
    let blocks = hidden_blocks(path);
    {
        let mut bb = BASELINE_BLOCKS.lock().unwrap_or_else(|e| e.into_inner());
        match bb.iter_mut().find(|(p, _)| p == path) {
            Some(e) => e.1 = blocks,
            None => bb.push((path.to_path_buf(), blocks)),
        }
    }
    let mut b = BASELINES.lock().unwrap_or_else(|e| e.into_inner());
    match b.iter_mut().find(|(p, _)| p == path) {
        Some(e) => e.1 = d,
        None => b.push((path.to_path_buf(), d)),
    }
}

/// Re-take the reference digest of every known LUN whose owner record
/// names gateway `pid`.
fn rebaseline_owned_by(pid: u32) {
    let paths: Vec<PathBuf> = BASELINES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    for p in paths {
        let Ok(l) = lun_manager::Lun::open(&p, lun_manager::Access::ReadOnly) else {
            continue;
        };
        let owned = l
            .record_json::<lun_manager::format::state::Owner>(
                lun_manager::format::state::RecordType::Owner,
                0,
            )
            .ok()
            .flatten()
            .is_some_and(|o| o.pid == pid);
        if owned {
            set_baseline(&p, hidden_digest(&p));
        }
    }
}

impl LunInfo {
    /// Export name of disk `i`: `NAME/diskI`.
    pub fn export(&self, i: usize) -> String {
        format!("{}/disk{i}", self.name)
    }

    /// Bytes at the start of disk `i` that the aligned layout shadows (the
    /// guest's partition table, kept in the state region and always
    /// reported as data by block status): 1 MiB of an aligned disk0, else 0.
    pub fn shadowed(&self, i: usize) -> u64 {
        if self.layout == "aligned" && i == 0 {
            lun_manager::format::SHADOW_LEN
        } else {
            0
        }
    }
}

/// A fresh pool directory (removed on drop) and the LUNs created in it.
pub struct Pool {
    dir: tempfile::TempDir,
    pub luns: Vec<LunInfo>,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

impl Pool {
    pub fn new() -> Pool {
        let dir = tempfile::Builder::new()
            .prefix("lungate-pool-")
            .tempdir()
            .expect("create temp pool dir");
        lun_manager::pool::init(dir.path())
            .unwrap_or_else(|e| panic!("init pool {}: {e}", dir.path().display()));
        Pool {
            dir,
            luns: Vec::new(),
        }
    }

    /// A pool with one LUN of each layout: `off` (offset layout, disks
    /// 64M and 32M), `trunc` (truncate layout, disks 48M and 16M) and
    /// `algn` (aligned layout, disks 40M and 16M).
    pub fn all_layouts() -> Pool {
        let mut p = Pool::new();
        p.add("off", "offset", &["64M", "32M"], "16M");
        p.add("trunc", "truncate", &["48M", "16M"], "16M");
        p.add("algn", "aligned", &["40M", "16M"], "16M");
        p
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The pool directory as a `&str`, for command lines.
    pub fn arg(&self) -> &str {
        self.dir.path().to_str().expect("utf-8 temp path")
    }

    /// Creates a LUN with `lunctl create` and records its hidden digest.
    pub fn add(&mut self, name: &str, layout: &str, disks: &[&str], memory: &str) -> &LunInfo {
        let path = create_lun(self.path(), name, layout, disks, memory);
        let hidden = hidden_digest(&path);
        set_baseline(&path, hidden);
        self.luns.push(LunInfo {
            name: name.to_string(),
            path,
            layout: layout.to_string(),
            disk_sizes: disks.iter().map(|d| disk_size(d)).collect(),
            hidden,
        });
        self.luns.last().expect("just pushed")
    }

    pub fn lun(&self, name: &str) -> &LunInfo {
        self.luns
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("no LUN {name} in the pool"))
    }

    /// Every export `(NAME/diskN, size)` the gateway should serve.
    pub fn exports(&self) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        for l in &self.luns {
            for (i, s) in l.disk_sizes.iter().enumerate() {
                v.push((l.export(i), *s));
            }
        }
        v
    }

    /// Panics unless every LUN's bytes outside its disk regions are exactly
    /// as they were right after creation.
    pub fn assert_hidden_unchanged(&self) {
        for l in &self.luns {
            let now = hidden_digest(&l.path);
            let want = baseline(&l.path).unwrap_or(l.hidden);
            if now != want {
                let was = BASELINE_BLOCKS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .find(|(p, _)| p == &l.path)
                    .map(|(_, b)| b.clone());
                let what = was
                    .map(|b| describe_hidden_change(&l.path, &b))
                    .unwrap_or_default();
                panic!(
                    "hidden bytes of {} ({} layout) changed: before {} after {}; {what}",
                    l.path.display(),
                    l.layout,
                    hex(&want),
                    hex(&now)
                );
            }
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

enum StdoutEvent {
    Line(String),
    Eof,
}

/// A running `lungate serve` child, listening on an ephemeral TCP port on
/// 127.0.0.1 and on a unix socket in its own temp dir.
pub struct Gateway {
    child: Option<Child>,
    tcp: Option<SocketAddr>,
    unix: Option<PathBuf>,
    log: PathBuf,
    stdout_lines: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Spawns `lungate serve --listen 127.0.0.1:0 --unix <tmp>/nbd.sock ARGS`
    /// and waits for its `ready` line. Panics with the gateway's stderr if
    /// it exits or is not ready within [`START_TIMEOUT`].
    pub fn start(args: &[&str]) -> Gateway {
        match Gateway::try_start(args) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`Gateway::start`], but returns the failure (with the gateway's
    /// exit status and stderr) instead of panicking, for tests that expect a
    /// configuration to be refused.
    pub fn try_start(args: &[&str]) -> Result<Gateway, String> {
        Gateway::try_start_env(args, &[])
    }

    /// [`Gateway::start`] with extra environment variables for the child
    /// (test hooks such as `LUNGATE_TEST_MIGRATION_STALL`).
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Gateway {
        match Gateway::try_start_env(args, env) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        }
    }

    pub fn try_start_env(args: &[&str], env: &[(&str, &str)]) -> Result<Gateway, String> {
        Gateway::try_start_with(None, "127.0.0.1:0", args, env)
    }

    /// [`Gateway::start`] inside network namespace `ns` (the test's own
    /// second "host", see [`NetNs`]), its NBD listener on `listen` there.
    pub fn start_in(ns: &NetNs, listen: &str, args: &[&str]) -> Gateway {
        Gateway::try_start_with(Some(ns), listen, args, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start_with(
        ns: Option<&NetNs>,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Gateway, String> {
        let dir = tempfile::Builder::new()
            .prefix("lungate-gw-")
            .tempdir()
            .expect("create gateway temp dir");
        let sock = dir.path().join("nbd.sock");
        let log = dir.path().join("stderr.log");
        // `ip netns exec` enters the namespace and execs the gateway: the
        // child's PID is the gateway's.
        let mut cmd = match ns {
            Some(n) => {
                let mut c = Command::new(require_tool("ip"));
                c.args(["netns", "exec", &n.name]).arg(bin("lungate"));
                c
            }
            None => Command::new(bin("lungate")),
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--unix")
            .arg(&sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("create gateway log"));
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let what = describe(&cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));

        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let keep = Arc::clone(&lines);
        // Keeps draining stdout after `ready` so the child never blocks on a
        // full pipe; sends fail silently once start() stops listening.
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                keep.lock().expect("stdout lines").push(line.clone());
                let _ = tx.send(StdoutEvent::Line(line));
            }
            let _ = tx.send(StdoutEvent::Eof);
        });

        let mut gw = Gateway {
            child: Some(child),
            tcp: None,
            unix: None,
            log,
            stdout_lines: lines,
            dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(StdoutEvent::Line(line)) => {
                    if let Some(addr) = line.strip_prefix("listening tcp ") {
                        let addr = addr.trim().parse().map_err(|e| {
                            gw.failure(&what, &format!("bad tcp address in {line:?}: {e}"))
                        })?;
                        gw.tcp = Some(addr);
                    } else if let Some(p) = line.strip_prefix("listening unix ") {
                        gw.unix = Some(PathBuf::from(p.trim()));
                    } else if line.trim() == "ready" {
                        if let Some(c) = &gw.child {
                            rebaseline_owned_by(c.id());
                        }
                        break;
                    }
                }
                Ok(StdoutEvent::Eof) => {
                    return Err(gw.failure(&what, "closed stdout before printing `ready`"))
                }
                Err(_) => {
                    return Err(gw.failure(&what, &format!("not ready within {START_TIMEOUT:?}")))
                }
            }
        }
        if gw.tcp.is_none() {
            return Err(gw.failure(&what, "printed `ready` without a `listening tcp` line"));
        }
        if gw.unix.as_deref() != Some(sock.as_path()) {
            return Err(gw.failure(
                &what,
                &format!(
                    "listening unix line {:?} does not name {}",
                    gw.unix,
                    sock.display()
                ),
            ));
        }
        Ok(gw)
    }

    /// Ends the child (SIGKILL if it is still running) and describes why
    /// it failed, with its stdout and stderr.
    fn failure(&mut self, what: &str, why: &str) -> String {
        let status = self.child.take().map(|mut c| {
            if let Ok(Some(s)) = c.try_wait() {
                return s.to_string();
            }
            let _ = c.kill();
            c.wait().map(|s| s.to_string()).unwrap_or_default()
        });
        format!(
            "`{what}` {why} (exit: {})\nstdout:\n{}\nstderr:\n{}",
            status.unwrap_or_default(),
            self.stdout_lines.lock().expect("stdout lines").join("\n"),
            self.stderr_log()
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("gateway child").id()
    }

    /// The TCP address the gateway listens on.
    pub fn addr(&self) -> SocketAddr {
        self.tcp.expect("gateway tcp address")
    }

    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    pub fn unix_path(&self) -> &Path {
        self.unix.as_deref().expect("gateway unix socket")
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr())
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix_path().display())
    }

    /// A temp dir that lives as long as the gateway (for client files).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// Panics with the gateway's stderr if the child has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("gateway child");
        if let Ok(Some(s)) = child.try_wait() {
            panic!(
                "gateway pid {} exited unexpectedly with {s}\nstderr:\n{}",
                child.id(),
                self.stderr_log()
            );
        }
    }

    /// Sends `sig` (SIGSTOP, SIGCONT, ...) to the gateway, by PID.
    pub fn send_signal(&self, sig: libc::c_int) {
        signal(self.child.as_ref().expect("gateway child"), sig);
    }

    /// SIGSTOP the gateway and wait until every one of its threads has
    /// stopped. kill(2) returns before they have: a thread running on
    /// another CPU keeps going until it sees the signal, and on a loaded
    /// machine it may still answer a request or two meanwhile.
    pub fn freeze(&self) {
        self.send_signal(libc::SIGSTOP);
        let task = PathBuf::from(format!("/proc/{}/task", self.pid()));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stopped = std::fs::read_dir(&task)
                .expect("the gateway's /proc task list")
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
                // The state follows the ")" closing the command name.
                .all(|st| {
                    st.rsplit_once(") ")
                        .is_some_and(|(_, r)| r.starts_with('T'))
                });
            if stopped {
                return;
            }
            assert!(Instant::now() < deadline, "the gateway did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `timeout` for the gateway to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_timeout(self.child.as_mut().expect("gateway child"), timeout)
    }

    /// Everything the gateway wrote to stderr so far.
    pub fn stderr_log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Every stdout line the gateway printed so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout_lines.lock().expect("stdout lines").clone()
    }

    /// Sends SIGTERM (by PID) and waits up to [`STOP_TIMEOUT`] for a clean
    /// exit; on timeout sends SIGKILL and panics with the log.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("gateway child");
        signal(&child, libc::SIGTERM);
        match wait_timeout(&mut child, STOP_TIMEOUT) {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "gateway pid {} did not exit within {STOP_TIMEOUT:?} of SIGTERM\nstderr:\n{}",
                    child.id(),
                    self.stderr_log()
                );
            }
        }
    }

    /// [`Gateway::stop`] and assert it exited 0.
    pub fn stop_ok(self) {
        let log = self.log.clone();
        let status = self.stop();
        assert!(
            status.success(),
            "gateway exited with {status} after SIGTERM\nstderr:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// Sends `sig` to `child` by its PID, if it has not been reaped.
fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours;
    // the PID is our own unreaped child, so it cannot have been reused.
    unsafe {
        libc::kill(pid, sig);
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if thread::panicking() {
                eprintln!(
                    "--- lungate pid {} stderr ---\n{}\n--- end ---",
                    child.id(),
                    self.stderr_log()
                );
            }
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// A command for `nbdsh` with /usr/bin first on PATH, so it runs with the
/// system python that has the libnbd module.
pub fn nbdsh() -> Command {
    let nbdsh = require_tool("nbdsh");
    let mut cmd = Command::new(nbdsh);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![PathBuf::from("/usr/bin")];
    dirs.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(dirs).expect("PATH"));
    cmd
}

/// `qemu-io -f raw -c CMD... URI`, with its output returned (not checked).
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut cmd = Command::new(require_tool("qemu-io"));
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    run_timeout(&mut cmd, CMD_TIMEOUT)
}

/// [`qemu_io`], panicking unless it exits 0 with no failed command.
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let out = qemu_io(uri, cmds);
    let what = format!("qemu-io {cmds:?} {uri}");
    assert_success(&what, &out);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for bad in ["Pattern verification failed", "failed:", "error", "Error"] {
        assert!(!text.contains(bad), "`{what}` reported {bad:?}:\n{text}");
    }
    text
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failure can be
/// reproduced from the seed.
pub fn pattern_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A throwaway CA, server certificate (for 127.0.0.1 / localhost) and
/// client certificate made with openssl, in the file names libnbd and
/// QEMU's `tls-creds-x509` expect: ca-cert.pem, server-cert.pem,
/// server-key.pem, client-cert.pem, client-key.pem.
pub struct TlsCerts {
    dir: tempfile::TempDir,
}

impl TlsCerts {
    pub fn generate() -> TlsCerts {
        let openssl = require_tool("openssl");
        let dir = tempfile::Builder::new()
            .prefix("lungate-tls-")
            .tempdir()
            .expect("create tls temp dir");
        let d = dir.path();
        let ossl = |args: &[&str]| {
            run_ok(Command::new(&openssl).current_dir(d).args(args));
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        // CA
        let mut a = vec!["req", "-x509", "-days", "2", "-subj", "/CN=lungate test CA"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        ossl(&a);
        for (who, cn, ext) in [
            (
                "server",
                "127.0.0.1",
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth\n\
                 subjectAltName=IP:127.0.0.1,DNS:localhost\n",
            ),
            (
                "client",
                "lungate test client",
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=clientAuth\n",
            ),
        ] {
            std::fs::write(d.join(format!("{who}.ext")), ext).expect("write ext file");
            let key = format!("{who}-key.pem");
            let csr = format!("{who}.csr");
            let cert = format!("{who}-cert.pem");
            let ext_file = format!("{who}.ext");
            let subj = format!("/CN={cn}");
            let mut a = vec!["req", "-new", "-subj", &subj];
            a.extend(ec);
            a.extend(["-keyout", &key, "-out", &csr]);
            ossl(&a);
            ossl(&[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-extfile",
                &ext_file,
                "-out",
                &cert,
            ]);
        }
        TlsCerts { dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `--tls-cert server-cert.pem --tls-key server-key.pem` (owned strings
    /// for a gateway command line).
    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path_str("server-cert.pem"),
            "--tls-key".into(),
            self.path_str("server-key.pem"),
        ]
    }

    pub fn path_str(&self, name: &str) -> String {
        self.file(name)
            .to_str()
            .expect("utf-8 temp path")
            .to_string()
    }
}

impl Gateway {
    /// The control API unix socket from the `control unix PATH` line.
    pub fn control(&self) -> PathBuf {
        self.stdout_lines()
            .iter()
            .find_map(|l| l.strip_prefix("control unix "))
            .map(|p| PathBuf::from(p.trim()))
            .expect("gateway printed no `control unix` line")
    }

    /// The control API TCP address from the `control tcp ADDR` line.
    pub fn control_tcp(&self) -> SocketAddr {
        self.stdout_lines()
            .iter()
            .find_map(|l| l.strip_prefix("control tcp "))
            // "control tcp ADDR" or "control tcp ADDR tls"
            .and_then(|a| a.split_whitespace().next())
            .map(|a| a.parse().expect("control tcp address"))
            .expect("gateway printed no `control tcp` line")
    }
}

/// One HTTP exchange with the control API through `curl`: status and body.
pub struct HttpReply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "reply body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Where a control request goes.
pub enum Control<'a> {
    Unix(&'a Path),
    Tcp(SocketAddr, Option<&'a str>),
}

/// `curl` one request (`body` sent as-is; JSON content type unless `raw`).
pub fn http(to: &Control, method: &str, path: &str, body: Option<&[u8]>, raw: bool) -> HttpReply {
    let curl = require_tool("curl");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("body");
    let mut cmd = Command::new(curl);
    cmd.args(["-s", "-S", "-X", method, "-o"])
        .arg(&out)
        .args(["-w", "%{http_code}"]);
    let url = match to {
        Control::Unix(sock) => {
            cmd.arg("--unix-socket").arg(sock);
            format!("http://lungate{path}")
        }
        Control::Tcp(addr, token) => {
            if let Some(t) = token {
                cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
            }
            format!("http://{addr}{path}")
        }
    };
    if let Some(b) = body {
        let f = dir.path().join("req");
        std::fs::write(&f, b).expect("write request body");
        cmd.arg("--data-binary").arg(format!("@{}", f.display()));
        cmd.arg("-H").arg(if raw {
            "Content-Type: application/octet-stream"
        } else {
            "Content-Type: application/json"
        });
    }
    cmd.arg(url);
    let o = run_timeout(&mut cmd, Duration::from_secs(120));
    assert_success(&format!("curl {method} {path}"), &o);
    let status: u16 = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .expect("curl printed the status");
    HttpReply {
        status,
        body: std::fs::read(&out).unwrap_or_default(),
    }
}

/// JSON request over the unix socket; panics unless the status is `want`.
pub fn api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    want: u16,
) -> serde_json::Value {
    let b = body.map(|v| v.to_string().into_bytes());
    let r = http(&Control::Unix(sock), method, path, b.as_deref(), false);
    assert_eq!(
        r.status,
        want,
        "{method} {path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// A network namespace the test makes as a second host, joined to this
/// one by a veth pair on a /30 of its own: `10.231.N.1` here, `10.231.N.2`
/// there (loopback up on both sides). Removed, with the pair, on drop.
pub struct NetNs {
    pub name: String,
    /// This side's address.
    pub here: std::net::Ipv4Addr,
    /// The namespace's address.
    pub there: std::net::Ipv4Addr,
}

impl NetNs {
    pub fn create() -> NetNs {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A subnet and names per process and namespace (interface names
        // stay within 15 bytes).
        let id = (std::process::id() % 10_000) * 10 + n % 10;
        let net = (std::process::id() * 7 + n) % 250 + 1;
        let ns = NetNs {
            name: format!("lgt{id}"),
            here: std::net::Ipv4Addr::new(10, 231, net as u8, 1),
            there: std::net::Ipv4Addr::new(10, 231, net as u8, 2),
        };
        let (a, b) = (format!("lga{id}"), format!("lgb{id}"));
        let ip = require_tool("ip");
        let run = |args: &[&str]| run_ok(Command::new(&ip).args(args));
        run(&["netns", "add", &ns.name]);
        run(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        run(&["link", "set", &b, "netns", &ns.name]);
        run(&["addr", "add", &format!("{}/30", ns.here), "dev", &a]);
        run(&["link", "set", &a, "up"]);
        let inside = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &ns.name, "ip"];
            full.extend_from_slice(args);
            run(&full);
        };
        inside(&["addr", "add", &format!("{}/30", ns.there), "dev", &b]);
        inside(&["link", "set", &b, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn poke(path: &Path, offset: u64, byte: u8) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open LUN for writing");
        f.write_all_at(&[byte], offset).expect("poke");
    }

    /// The oracle every end-to-end test relies on: writes inside a disk
    /// (where the disk's view keeps its bytes: the region, and in the
    /// aligned layout the shadow area but not the first MiB) leave the
    /// hidden digest alone, one changed byte outside them (in a gap, the
    /// GPT, the label or the state) changes it.
    #[test]
    fn hidden_digest_sees_one_byte_outside_the_disk_regions() {
        let pool = Pool::all_layouts();
        for l in &pool.luns {
            for r in guest_file_ranges(&l.path) {
                poke(&l.path, r.start, 0xee);
                poke(&l.path, r.end - 1, 0xee);
            }
        }
        pool.assert_hidden_unchanged();
        for l in &pool.luns {
            let regions = guest_file_ranges(&l.path);
            let size = std::fs::metadata(&l.path).expect("stat").len();
            // The byte right before and after each guest range, and the
            // first and last byte of the file, when they are not a guest's.
            let mut outside: Vec<u64> = regions.iter().map(|r| r.end).collect();
            outside.extend(regions.iter().filter_map(|r| r.start.checked_sub(1)));
            outside.extend([0, size - 1]);
            outside.retain(|&x| x < size && !regions.iter().any(|r| r.contains(&x)));
            assert!(!outside.is_empty(), "{}: no hidden byte to poke", l.name);
            for at in outside {
                // Compared with the digest just before: restoring a byte
                // in a hole leaves a block allocated, and the digest also
                // covers where the data extents are.
                let base = hidden_digest(&l.path);
                let before = file_bytes(&l.path, at, 1)[0];
                poke(&l.path, at, before ^ 0xff);
                // Noticed either as a different digest or as a LUN that no
                // longer opens (a damaged label or state directory).
                let p = l.path.clone();
                let after = std::panic::catch_unwind(move || hidden_digest(&p));
                assert!(
                    after.as_ref().map_or(true, |d| *d != base),
                    "{} ({}): changing byte {at} went unnoticed",
                    l.name,
                    l.layout
                );
                poke(&l.path, at, before);
            }
        }
    }

    #[test]
    fn sizes_parse_like_lunctl() {
        assert_eq!(parse_size("4096"), 4096);
        assert_eq!(parse_size("64M"), 64 << 20);
        assert_eq!(parse_size("1G"), 1 << 30);
        assert_eq!(disk_size("4097"), 1 << 20);
        assert_eq!(disk_size("1500K"), 2 << 20);
        assert_eq!(disk_size("3M"), 3 << 20);
    }
}
