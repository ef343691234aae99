//! vmm-shim end to end on this machine's real /dev/kvm: the payload guest
//! runs against a real gateway (its disk over NBD, its state through the
//! control API) and checks what it sees; the operator drives the running
//! shim through its socket and the gateway through lunctl.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lungate_api::nbd::client::{Address, NbdClient};
use lungate_api::records::{GuestService, HardwareConfig, RecordType};
use lungate_api::Client;
use lungate_tests::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A `vmm-shim run` child with its serial console in a temp file.
struct Shim {
    child: Option<Child>,
    serial: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

fn shim_args(pool: &Pool, gw: &Gateway, name: &str) -> Vec<String> {
    vec![
        "run".into(),
        name.into(),
        "--pool".into(),
        pool.arg().into(),
        "--control".into(),
        gw.control().display().to_string(),
        "--nbd".into(),
        format!("unix:{}", gw.unix_path().display()),
        "--timeout".into(),
        "100".into(),
    ]
}

impl Shim {
    /// Start `vmm-shim run NAME … EXTRA` and wait for `ready`.
    fn start(pool: &Pool, gw: &Gateway, name: &str, extra: &[&str]) -> Shim {
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.txt");
        let stderr = dir.path().join("stderr.txt");
        let mut cmd = Command::new(bin("vmm-shim"));
        cmd.args(shim_args(pool, gw, name))
            .arg("--serial")
            .arg(&serial)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let mut child = cmd.spawn().expect("start vmm-shim");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if l.trim() == "ready" {
                    let _ = tx.send(());
                }
            }
        });
        let s = Shim {
            child: Some(child),
            serial,
            stderr,
            _dir: dir,
        };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            panic!("vmm-shim not ready:\n{}", s.stderr_log());
        }
        s
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn stderr_log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Wait until the serial console shows `text`.
    fn wait_serial(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.serial().contains(text) {
            assert!(
                Instant::now() < deadline,
                "serial never showed {text:?}:\n{}\nstderr:\n{}",
                self.serial(),
                self.stderr_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the shim to exit; its exit code.
    fn wait(mut self) -> (i32, String, String) {
        let mut c = self.child.take().unwrap();
        let st = wait_timeout(&mut c, RUN_TIMEOUT).unwrap_or_else(|| {
            let _ = c.kill();
            let _ = c.wait();
            panic!("vmm-shim did not exit:\n{}", self.stderr_log())
        });
        (st.code().unwrap_or(-1), self.serial(), self.stderr_log())
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `vmm-shim OP NAME … --pool P --json`; the parsed reply and the status.
fn op(pool: &Pool, args: &[&str]) -> (serde_json::Value, bool) {
    let mut cmd = Command::new(bin("vmm-shim"));
    cmd.args(args).args(["--pool", pool.arg(), "--json"]);
    let out = run_timeout(&mut cmd, CMD_TIMEOUT);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{}: not JSON ({e}): {}\n{}",
            describe(&cmd),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.success())
}

fn op_ok(pool: &Pool, args: &[&str]) -> serde_json::Value {
    let (v, ok) = op(pool, args);
    assert!(ok && v["ok"] == true, "vmm-shim {args:?}: {v}");
    v
}

fn run_to_end(pool: &Pool, gw: &Gateway, name: &str, extra: &[&str]) -> (i32, String, String) {
    Shim::start(pool, gw, name, extra).wait()
}

fn saves(gw: &Gateway, lun: &str) -> Vec<String> {
    Client::new(&gw.control())
        .unwrap()
        .snapshots(lun)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect()
}

/// Every record of the LUN's state directory reads back with a good
/// checksum, and the guest's disk export is exactly the disk region: the
/// guest's disk traffic never reached the hidden region.
fn assert_hidden_intact(gw: &Gateway, lun: &str, disk: u64) {
    let c = Client::new(&gw.control()).unwrap();
    let dir = c.records(lun).unwrap();
    assert!(!dir.records.is_empty());
    for r in &dir.records {
        let mut rd = c.record_reader(lun, r.rtype, r.instance).unwrap();
        std::io::copy(&mut rd, &mut std::io::sink())
            .unwrap_or_else(|e| panic!("{} #{}: {e}", r.rtype, r.instance));
    }
    let ex = c.exports().unwrap();
    let e = ex
        .iter()
        .find(|e| e.name == format!("{lun}/disk0"))
        .unwrap();
    assert_eq!(e.size, disk, "the guest's export is the disk region only");
    // A write one byte past the export is refused by the gateway.
    let out = Command::new(require_tool("qemu-io"))
        .args(["-f", "raw", "-c", &format!("write {disk} 512")])
        .arg(gw.uri(&format!("{lun}/disk0")))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || text.contains("error") || text.contains("Input/output"),
        "a write past the export end was accepted: {text}"
    );
}

fn new_pool(memory: &str) -> Pool {
    let mut pool = Pool::new();
    pool.add("vm", "offset", &["16M"], memory);
    pool
}

#[test]
fn selftest_guest_saves_lists_restores_and_finds_memory_registers_disk_and_app_data_as_saved() {
    // Two disks: the guest checks both come back to the save point.
    let mut pool = Pool::new();
    pool.add("vm", "offset", &["16M", "8M"], "32M");
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let (code, serial, err) = run_to_end(&pool, &gw, "vm", &["--guest", "selftest"]);
    assert_eq!(code, 0, "serial:\n{serial}\nstderr:\n{err}");
    for step in [
        "payload: saved, going on",
        "payload: restored to the save point",
        "SELFTEST PASS",
    ] {
        assert!(serial.contains(step), "missing {step:?}:\n{serial}");
    }
    // The guest deleted its save at the end, and its reconfiguration (one
    // more vCPU, applied at its restore) is the VM's hardware now.
    assert!(saves(&gw, "vm").is_empty(), "{:?}", saves(&gw, "vm"));
    let hw: HardwareConfig = Client::new(&gw.control())
        .unwrap()
        .record_json("vm", RecordType::HardwareConfig, 0)
        .unwrap()
        .unwrap();
    assert_eq!(hw.vcpus, 2);
    // Disk 1 is back at the save point too: block 0 stamped (100, counter 1000).
    let mut d1 =
        NbdClient::connect(&Address::Unix(gw.unix_path().to_path_buf()), "vm/disk1").unwrap();
    let mut b = [0u8; 16];
    d1.read_at(0, &mut b).unwrap();
    assert_eq!(
        (
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            u64::from_le_bytes(b[8..].try_into().unwrap())
        ),
        (100, 1000)
    );
    d1.disconnect().unwrap();
    assert_hidden_intact(&gw, "vm", 16 << 20);
    gw.stop_ok();
}

#[test]
fn an_operator_save_while_the_guest_writes_then_restore_keeps_disk_and_memory_consistent() {
    let pool = new_pool("32M");
    // Two vCPUs: the halted one must be parked and saved too.
    lunctl(&["set-hardware", "vm", "--pool", pool.arg(), "--vcpus", "2"]);
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let shim = Shim::start(&pool, &gw, "vm", &["--guest", "writer"]);
    shim.wait_serial("payload: writer");
    std::thread::sleep(Duration::from_millis(300));
    let s1 = op_ok(&pool, &["save", "vm", "s1"]);
    assert_eq!(s1["full"], true, "{s1}");
    std::thread::sleep(Duration::from_millis(300));
    let s2 = op_ok(&pool, &["save", "vm", "s2"]);
    assert_eq!(s2["full"], false, "the second save is incremental: {s2}");
    assert!(
        s2["image_bytes"].as_u64().unwrap() < s1["image_bytes"].as_u64().unwrap(),
        "{s1} {s2}"
    );
    let l = op_ok(&pool, &["list", "vm"]);
    assert_eq!(l["saves"], serde_json::json!(["s1", "s2"]));
    std::thread::sleep(Duration::from_millis(300));
    op_ok(&pool, &["restore", "vm", "s1"]);
    let (code, serial, err) = shim.wait();
    assert_eq!(code, 0, "serial:\n{serial}\nstderr:\n{err}");
    assert!(serial.contains("WRITER CONSISTENT"), "{serial}");
    assert_hidden_intact(&gw, "vm", 16 << 20);
    gw.stop_ok();
}

#[test]
fn wrong_and_replayed_credentials_are_refused_logged_and_change_nothing() {
    let pool = new_pool("32M");
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let (code, serial, err) = run_to_end(&pool, &gw, "vm", &["--guest", "badmac"]);
    assert_eq!(code, 0, "serial:\n{serial}\nstderr:\n{err}");
    for why in ["wrong MAC", "(a replay)", "is not the current one"] {
        assert!(err.contains(why), "refusal {why:?} not logged:\n{err}");
    }
    // Only the one good save exists.
    assert_eq!(saves(&gw, "vm"), vec!["good".to_string()]);
    gw.stop_ok();
}

#[test]
fn a_save_restores_after_the_gateway_and_the_shim_restart() {
    let pool = new_pool("32M");
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let shim = Shim::start(&pool, &gw, "vm", &["--guest", "writer"]);
    shim.wait_serial("payload: writer");
    std::thread::sleep(Duration::from_millis(300));
    op_ok(&pool, &["save", "vm", "before"]);
    std::thread::sleep(Duration::from_millis(300));
    let v = op_ok(&pool, &["stop", "vm"]);
    assert_eq!(v["stopped"], true);
    let (code, _, err) = shim.wait();
    assert_eq!(code, 0, "{err}");
    gw.stop_ok();

    let gw = Gateway::start(&["--pool", pool.arg()]);
    let (code, serial, err) = run_to_end(&pool, &gw, "vm", &["--restore", "before"]);
    assert_eq!(code, 0, "serial:\n{serial}\nstderr:\n{err}");
    assert!(serial.contains("WRITER CONSISTENT"), "{serial}");
    gw.stop_ok();
}

#[test]
fn a_restore_onto_more_memory_and_vcpus_adapts_the_state_and_refusals_change_nothing() {
    // 64M of state region room, running at 32M first.
    let pool = new_pool("64M");
    lunctl(&[
        "set-hardware",
        "vm",
        "--pool",
        pool.arg(),
        "--memory",
        "32M",
    ]);
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let shim = Shim::start(&pool, &gw, "vm", &["--guest", "hwcheck"]);
    shim.wait_serial("payload: saved, going on");
    let c = Client::new(&gw.control()).unwrap();

    // Less memory than the guest used: refused, the guest runs on.
    lunctl(&[
        "set-hardware",
        "vm",
        "--pool",
        pool.arg(),
        "--memory",
        "16M",
    ]);
    let gen = c.records("vm").unwrap().generation;
    let (v, ok) = op(&pool, &["restore", "vm", "hw"]);
    assert!(!ok, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("memory shrunk below what the guest used"), "{e}");
    assert_eq!(c.records("vm").unwrap().generation, gen, "records changed");
    assert_eq!(saves(&gw, "vm"), vec!["hw".to_string()]);
    op_ok(&pool, &["list", "vm"]);

    // A CPU feature this host lacks: the live records claim one (as a
    // state saved on another host would), and resuming them is refused.
    let v = op_ok(&pool, &["stop", "vm"]);
    assert_eq!(v["stopped"], true);
    assert_eq!(shim.wait().0, 0);
    let machine = c.record("vm", RecordType::DeviceState, 0).unwrap().unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&machine).unwrap();
    let leaf7 = m["cpuid"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["function"] == 7 && e["index"] == 0)
        .expect("CPUID leaf 7");
    let ebx = leaf7["ebx"].as_u64().unwrap() as u32;
    let bit = (!ebx).trailing_zeros();
    leaf7["ebx"] = (ebx | (1 << bit)).into();
    let forged = serde_json::to_vec(&m).unwrap();
    put_record(&gw.control(), "vm", RecordType::DeviceState, &forged);
    lunctl(&[
        "set-hardware",
        "vm",
        "--pool",
        pool.arg(),
        "--memory",
        "32M",
    ]);
    let gen = c.records("vm").unwrap().generation;
    let mut cmd = Command::new(bin("vmm-shim"));
    cmd.args(shim_args(&pool, &gw, "vm")).arg("--resume");
    let out = run_timeout(&mut cmd, CMD_TIMEOUT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("leaf 0x7.0 ebx bit {bit}"))
            && err.contains("this host's KVM does not support"),
        "{err}"
    );
    assert_eq!(c.records("vm").unwrap().generation, gen, "records changed");

    // More memory and vCPUs: the guest sees both and the new vCPUs run.
    lunctl(&[
        "set-hardware",
        "vm",
        "--pool",
        pool.arg(),
        "--memory",
        "64M",
        "--vcpus",
        "3",
    ]);
    let (code, serial, err) = run_to_end(&pool, &gw, "vm", &["--restore", "hw"]);
    assert_eq!(code, 0, "serial:\n{serial}\nstderr:\n{err}");
    assert!(
        serial.contains("HWCHECK OK 0000000004000000 0000000000000003"),
        "{serial}"
    );
    let hw: HardwareConfig = c
        .record_json("vm", RecordType::HardwareConfig, 0)
        .unwrap()
        .unwrap();
    assert_eq!((hw.memory_bytes, hw.vcpus), (64 << 20, 3));
    gw.stop_ok();
}

#[test]
fn a_clone_resumes_with_a_new_identity_and_generation() {
    let pool = new_pool("32M");
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let shim = Shim::start(&pool, &gw, "vm", &["--guest", "identity"]);
    shim.wait_serial("payload: saved, going on");
    assert!(shim
        .serial()
        .contains("IDENTITY generation 0000000000000001"));
    lunctl(&["clone", "vm", "base", "vm2", "--pool", pool.arg()]);
    let (code, serial, err) = run_to_end(&pool, &gw, "vm2", &["--resume"]);
    assert_eq!(code, 0, "serial:\n{serial}\nstderr:\n{err}");
    assert!(
        serial.contains("IDENTITY CHANGED generation 0000000000000002"),
        "{serial}"
    );
    let c = Client::new(&gw.control()).unwrap();
    let gs: GuestService = c
        .record_json("vm2", RecordType::GuestService, 0)
        .unwrap()
        .unwrap();
    let vm2 = c
        .luns()
        .unwrap()
        .into_iter()
        .find(|l| l.name == "vm2")
        .unwrap();
    assert_eq!((gs.generation, gs.lun_uuid), (2, vm2.uuid));
    // The original keeps its identity.
    let gs1: GuestService = c
        .record_json("vm", RecordType::GuestService, 0)
        .unwrap()
        .unwrap();
    assert_eq!(gs1.generation, 1);
    op_ok(&pool, &["stop", "vm"]);
    assert_eq!(shim.wait().0, 0);
    gw.stop_ok();
}

fn shim_fails(args: &[&str]) -> String {
    let mut cmd = Command::new(bin("vmm-shim"));
    cmd.args(args);
    let out: Output = run_timeout(&mut cmd, CMD_TIMEOUT);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&cmd));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cli_errors_name_the_unknown_vm_the_missing_gateway_and_a_lun_without_memory() {
    let mut pool = new_pool("32M");
    pool.add("data", "offset", &["16M"], "0");
    let p = pool.arg().to_string();
    // No gateway yet.
    let e = shim_fails(&["run", "vm", "--pool", &p]);
    assert!(
        e.contains("no gateway answers at") && e.contains(".lungate.sock"),
        "{e}"
    );
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let nbd = format!("unix:{}", gw.unix_path().display());
    let e = shim_fails(&["run", "nope", "--pool", &p, "--nbd", &nbd]);
    assert!(
        e.contains("unknown VM \"nope\"") && e.contains("data, vm"),
        "{e}"
    );
    let e = shim_fails(&["run", "data", "--pool", &p, "--nbd", &nbd]);
    assert!(e.contains("has no memory"), "{e}");
    let e = shim_fails(&["save", "vm", "s1", "--pool", &p]);
    assert!(e.contains("no vmm-shim is running this VM"), "{e}");
    let e = shim_fails(&[
        "run",
        "vm",
        "--pool",
        &p,
        "--restore",
        "nope",
        "--nbd",
        &nbd,
    ]);
    assert!(e.contains("no save named \"nope\""), "{e}");
    gw.stop_ok();
}

#[test]
fn lunctl_shows_the_guest_key_and_set_hardware_checks_the_state_region() {
    let pool = new_pool("32M");
    let p = pool.arg().to_string();
    let key = String::from_utf8(lunctl(&["guest-key", "vm", "--pool", &p]).stdout).unwrap();
    assert_eq!(key.trim().len(), 32, "{key}");
    assert!(key.trim().bytes().all(|c| c.is_ascii_hexdigit()));
    // 32M of memory gives a state region too small for 64M.
    let out = run_timeout(
        Command::new(bin("lunctl")).args(["set-hardware", "vm", "--pool", &p, "--memory", "64M"]),
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the state region is"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lunctl(&["set-hardware", "vm", "--pool", &p, "--vcpus", "2"]);
    // Through a gateway the same commands use its control API.
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let again = String::from_utf8(lunctl(&["guest-key", "vm", "--pool", &p]).stdout).unwrap();
    assert_eq!(again, key);
    lunctl(&["set-hardware", "vm", "--pool", &p, "--memory", "16M"]);
    let c = Client::new(&gw.control()).unwrap();
    let hw: HardwareConfig = c
        .record_json("vm", RecordType::HardwareConfig, 0)
        .unwrap()
        .unwrap();
    assert_eq!((hw.memory_bytes, hw.vcpus), (16 << 20, 2));
    gw.stop_ok();
    let _ = Path::new(&p);
}

/// Two gateways for a VM migration: `a` serves the VM "vm" (16 MiB disk,
/// 32 MiB memory), `b` an empty pool and a migration listener at the
/// returned address.
fn migration_pair() -> (Pool, Pool, Gateway, Gateway, String) {
    let pool = new_pool("32M");
    let target = Pool::new();
    let a = Gateway::start(&["--pool", pool.arg()]);
    let b = Gateway::start(&["--pool", target.arg(), "--migration-listen", "127.0.0.1:0"]);
    let to = b
        .stdout_lines()
        .iter()
        .find_map(|l| {
            l.strip_prefix("migration tcp ")
                .map(|a| a.trim().to_string())
        })
        .expect("gateway b printed no `migration tcp` line");
    (pool, target, a, b, to)
}

/// A `vmm-shim run vm --incoming` on `gw`, waiting for the VM to arrive.
struct Incoming {
    child: Child,
    serial: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Incoming {
    fn start(pool: &Pool, gw: &Gateway) -> Incoming {
        let dir = tempfile::tempdir().unwrap();
        let (serial, stderr) = (dir.path().join("serial.txt"), dir.path().join("stderr.txt"));
        let child = Command::new(bin("vmm-shim"))
            .args(shim_args(pool, gw, "vm"))
            .args(["--incoming", "--serial"])
            .arg(&serial)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start the receiving vmm-shim");
        Incoming {
            child,
            serial,
            stderr,
            _dir: dir,
        }
    }

    /// Wait for the resumed guest to finish: it must exit 0 having checked
    /// its disk against its memory (`WRITER CONSISTENT`). The serial
    /// console and the reported guest downtime, µs.
    fn finish_consistent(mut self) -> (String, u64) {
        let st = wait_timeout(&mut self.child, RUN_TIMEOUT).unwrap_or_else(|| {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "the receiving shim did not finish:\n{}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            )
        });
        let out = {
            use std::io::Read;
            let mut s = String::new();
            self.child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            s
        };
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        assert_eq!(st.code(), Some(0), "serial:\n{serial}\nstderr:\n{err}");
        assert!(serial.contains("WRITER CONSISTENT"), "{serial}");
        let downtime: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("migrated downtime_us "))
            .and_then(|d| d.trim().parse().ok())
            .unwrap_or_else(|| panic!("no downtime reported:\n{out}\n{err}"));
        assert!(downtime > 0, "{out}");
        (serial, downtime)
    }
}

/// After a VM migration: `b` serves the VM with its save `before`, `a`
/// serves it no more, and the hidden region arrived intact.
fn assert_moved(a: Gateway, b: Gateway) {
    assert_eq!(saves(&b, "vm"), vec!["before".to_string()]);
    let on_a = Client::new(&a.control()).unwrap().luns().unwrap();
    assert!(on_a.iter().all(|l| l.name != "vm"), "a still serves vm");
    assert_hidden_intact(&b, "vm", 16 << 20);
    a.stop_ok();
    b.stop_ok();
}

/// `vmm-shim migrate`: the writer guest runs on gateway a's pool; a second
/// shim waits with `run --incoming` on gateway b's. The VM moves with its
/// LUN: memory pre-copied while the guest runs, the last pages and the
/// vCPU state at the switch. On b the guest resumes from exactly that
/// point, checks that its in-memory log matches every block of its disk
/// (`WRITER CONSISTENT`) and exits 0; the source shim exits 0 too, its
/// gateway serves the LUN no more, and the downtime is reported.
#[test]
fn a_running_vm_migrates_with_its_lun_and_resumes_on_the_other_gateway() {
    let (pool, target, a, b, to) = migration_pair();
    let src = Shim::start(&pool, &a, "vm", &["--guest", "writer"]);
    src.wait_serial("payload: writer");
    // Some state worth moving: writes logged in memory and on disk, and an
    // earlier save, so the pre-copy builds on a baseline.
    std::thread::sleep(Duration::from_millis(300));
    op_ok(&pool, &["save", "vm", "before"]);
    std::thread::sleep(Duration::from_millis(300));
    // The receiving shim: started before the migration, it waits.
    let dst = Incoming::start(&target, &b);
    let (v, ok) = op(&pool, &["migrate", "vm", "--to", &to]);
    assert!(
        ok && v["migrated"] == true,
        "vmm-shim migrate: {v}\nsource shim:\n{}",
        src.stderr_log()
    );
    assert!(v["memory_rounds"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["memory_precopy_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["lun_pause_us"].as_u64().is_some(), "{v}");
    // The source shim is done: its VM stopped for good, exit 0.
    let (code, _, err) = src.wait();
    assert_eq!(code, 0, "the source shim: {err}");
    let (_, downtime) = dst.finish_consistent();
    eprintln!("guest downtime {downtime} µs; source report {v}");
    assert_moved(a, b);
}

/// The guest asks for its own migration over port A (the `migrate`
/// payload: no target named, so the VM's policy names it) with app data;
/// on the new host its `migrated` event carries that app data (else the
/// payload fails with 41/42) before the writer's consistency check.
#[test]
fn a_guest_that_asks_for_its_migration_gets_its_app_data_on_the_new_host() {
    let (pool, target, a, b, to) = migration_pair();
    let policy = format!(r#"{{"migrate_to": ["{to}"]}}"#);
    put_record(&a.control(), "vm", RecordType::Policy, policy.as_bytes());
    lunctl(&["snapshot", "vm", "before", "--pool", pool.arg()]);
    let dst = Incoming::start(&target, &b);
    let src = Shim::start(&pool, &a, "vm", &["--guest", "migrate"]);
    // The guest's own request moves it; the source shim then exits 0.
    let (code, serial, err) = src.wait();
    assert_eq!(
        code, 0,
        "the source shim:\nserial:\n{serial}\nstderr:\n{err}"
    );
    assert!(err.contains("migrated to"), "{err}");
    let (serial, downtime) = dst.finish_consistent();
    assert!(
        serial.contains("payload: migrated with my app data"),
        "{serial}"
    );
    eprintln!("guest-requested migration: guest downtime {downtime} µs");
    assert_moved(a, b);
}

/// A migration that cannot happen (nothing listens at `--to`) is refused
/// with the reason, and the VM goes on where it runs: it still saves and
/// restores consistently afterwards.
#[test]
fn a_failed_vm_migration_leaves_the_vm_running_where_it_was() {
    let pool = new_pool("32M");
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let shim = Shim::start(&pool, &gw, "vm", &["--guest", "writer"]);
    shim.wait_serial("payload: writer");
    // A port that was free a moment ago: nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (v, ok) = op(&pool, &["migrate", "vm", "--to", &dead]);
    assert!(!ok && v["ok"] == false, "{v}");
    let e = v["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("migration") && e.contains(&dead),
        "the error names the migration and the target: {v}"
    );
    let l = Client::new(&gw.control()).unwrap().luns().unwrap();
    assert!(
        l.iter().any(|l| l.name == "vm"),
        "the LUN stays served here"
    );
    std::thread::sleep(Duration::from_millis(300));
    op_ok(&pool, &["save", "vm", "after"]);
    std::thread::sleep(Duration::from_millis(300));
    op_ok(&pool, &["restore", "vm", "after"]);
    let (code, serial, err) = shim.wait();
    assert_eq!(code, 0, "serial:\n{serial}\nstderr:\n{err}");
    assert!(serial.contains("WRITER CONSISTENT"), "{serial}");
    gw.stop_ok();
}
