//! Boots the guest under `qemu-system-x86_64` with one virtio disk backed by
//! an NBD URI, and reads the guest's verdict from the serial console.
//!
//! TCG only: on this host `-enable-kvm` hangs at guest kernel boot (nested
//! KVM) and `-cpu host` aborts; see docs/vm-test.md.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use lungate_tests::{require_tool, run_timeout};

/// How long one boot may take before qemu is killed (by PID) and the test
/// fails. A boot takes about 8 s under TCG on an idle machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// What one boot printed and how it ended.
#[derive(Debug)]
pub struct Boot {
    pub status: ExitStatus,
    pub elapsed: Duration,
    /// Everything the guest printed on ttyS0 (and qemu on stderr).
    pub console: String,
    pub results: Results,
}

/// The `LUNGATE-RESULT key=value` lines of a console log, and any
/// `LUNGATE-FAIL` lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Results {
    pub values: BTreeMap<String, String>,
    pub failures: Vec<String>,
    /// Keys printed more than once (a result must be printed exactly once).
    pub repeated: Vec<String>,
}

impl Results {
    pub fn parse(console: &str) -> Results {
        let mut r = Results::default();
        for line in console.lines() {
            // The serial line may carry a carriage return or terminal escape
            // sequences before the marker; the marker itself is plain text.
            let line = line.trim_end_matches('\r');
            if let Some(at) = line.find("LUNGATE-FAIL ") {
                r.failures
                    .push(line[at + "LUNGATE-FAIL ".len()..].to_string());
            } else if let Some(at) = line.find("LUNGATE-RESULT ") {
                let kv = &line[at + "LUNGATE-RESULT ".len()..];
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                if r.values.insert(k.to_string(), v.to_string()).is_some() {
                    r.repeated.push(k.to_string());
                }
            }
        }
        r
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }
}

/// The qemu command line for one boot.
pub fn command(kernel: &Path, initrd: &Path, drive_uri: &str, size: u64, phase: u32) -> Command {
    command_with(kernel, initrd, drive_uri, size, phase, "")
}

/// [`command`] with more words for the kernel command line (`extra`).
pub fn command_with(
    kernel: &Path,
    initrd: &Path,
    drive_uri: &str,
    size: u64,
    phase: u32,
    extra: &str,
) -> Command {
    let append =
        format!("console=ttyS0 panic=-1 quiet lungate.size={size} lungate.phase={phase} {extra}");
    // A comma inside a -drive value must be doubled. discard=unmap passes
    // the guest's discards on to the NBD server as TRIM.
    let drive = format!(
        "file={},format=raw,if=virtio,cache=none,discard=unmap",
        drive_uri.replace(',', ",,")
    );
    let mut cmd = Command::new(require_tool("qemu-system-x86_64"));
    cmd.args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot"])
        // No NIC: no iPXE option ROM to load.
        .args(["-net", "none"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(append)
        .arg("-drive")
        .arg(drive);
    cmd
}

/// Boots once and returns the console; panics (after killing qemu) if the
/// boot does not end within [`BOOT_TIMEOUT`].
pub fn boot(kernel: &Path, initrd: &Path, drive_uri: &str, size: u64, phase: u32) -> Boot {
    let mut cmd = command(kernel, initrd, drive_uri, size, phase);
    let start = Instant::now();
    let out = run_timeout(&mut cmd, BOOT_TIMEOUT);
    let elapsed = start.elapsed();
    let console = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Boot {
        status: out.status,
        elapsed,
        results: Results::parse(&console),
        console,
    }
}

/// A boot in progress, its console read as it comes (for a host that acts
/// while the guest runs).
pub struct Running {
    child: std::process::Child,
    console: std::sync::Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    start: Instant,
}

/// Starts `cmd` with its stdout and stderr collected as they come.
pub fn spawn(mut cmd: Command) -> Running {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let console = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut readers = Vec::new();
    let outs: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("stdout")),
        Box::new(child.stderr.take().expect("stderr")),
    ];
    for mut r in outs {
        let c = console.clone();
        readers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                c.lock()
                    .expect("console")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }));
    }
    Running {
        child,
        console,
        readers,
        start: Instant::now(),
    }
}

impl Running {
    pub fn console(&self) -> String {
        self.console.lock().expect("console").clone()
    }

    /// Waits up to `timeout` for `marker` on the console; false if the
    /// guest ended or the time ran out first.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.console().contains(marker) {
                return true;
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return self.console().contains(marker);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Waits for the guest to power off (killing qemu, by PID, after
    /// [`BOOT_TIMEOUT`]) and returns the boot.
    pub fn finish(mut self) -> Boot {
        let deadline = self.start + BOOT_TIMEOUT;
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                break self.child.wait().expect("wait for qemu");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let console = self.console();
        Boot {
            status,
            elapsed: self.start.elapsed(),
            results: Results::parse(&console),
            console,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_parse_markers_behind_escape_sequences() {
        let log = "SeaBIOS\r\n\x1b[2J\x1b[0mLUNGATE-RESULT phase=1\r\n\
                   [    1.0] random kernel line\n\
                   LUNGATE-RESULT sum.a b=c=d\n\
                   LUNGATE-RESULT phase=1\n\
                   LUNGATE-FAIL mount /dev/vda1\n";
        let r = Results::parse(log);
        assert_eq!(r.get("phase"), Some("1"));
        assert_eq!(r.get("sum.a b"), Some("c=d"));
        assert_eq!(r.values.len(), 2);
        assert_eq!(r.repeated, vec!["phase".to_string()]);
        assert_eq!(r.failures, vec!["mount /dev/vda1".to_string()]);
    }

    #[test]
    fn drive_option_doubles_commas_and_command_line_carries_size_and_phase() {
        let cmd = command(
            Path::new("/k"),
            Path::new("/i"),
            "nbd+unix:///a/disk0?socket=/tmp/x,y",
            67108864,
            2,
        );
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(
            &"file=nbd+unix:///a/disk0?socket=/tmp/x,,y,format=raw,if=virtio,cache=none,discard=unmap"
                .to_string()
        ));
        assert!(args
            .iter()
            .any(|a| a.contains("lungate.size=67108864") && a.contains("lungate.phase=2")));
        assert!(args.windows(2).any(|w| w == ["-accel", "tcg"]));
    }
}
