//! A headless Chromium (Debian's `chromium`, installed by scripts/setup)
//! driven over the DevTools protocol on a pipe: `--remote-debugging-pipe`
//! reads commands on the child's fd 3 and writes replies and events on its
//! fd 4, each message one JSON object ended by a NUL byte. No port is
//! opened, so nothing else on the machine can reach the browser.
//!
//! The browser runs with a fresh profile in a temporary directory, never
//! talks to the network (no first run, no background networking, no
//! component updates, no sync, no QUIC), and is ended by PID when the
//! [`Chromium`] is dropped.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long one DevTools command may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Chromium {
    child: Child,
    commands: File,
    replies: mpsc::Receiver<Value>,
    next_id: u64,
    /// Events received and not yet looked at, in order.
    events: Vec<Value>,
    _profile: tempfile::TempDir,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Chromium {
    /// Start the browser. `log` receives its stderr.
    pub fn launch(log: &Path) -> Chromium {
        let exe = lungate_tests::require_tool("chromium");
        let profile = tempfile::tempdir().expect("profile directory");
        let (cmd_r, cmd_w) = pipe();
        let (ev_r, ev_w) = pipe();
        let (to_child, from_child) = (cmd_r.as_raw_fd(), ev_w.as_raw_fd());
        let mut c = Command::new(exe);
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).expect("chromium log file"));
        // SAFETY: between fork and exec this only calls fcntl and dup2,
        // which are async-signal-safe, on descriptors the parent keeps open.
        unsafe {
            c.pre_exec(move || {
                // Either end may already be 3 or 4: move both aside first.
                let a = libc::fcntl(to_child, libc::F_DUPFD_CLOEXEC, 10);
                let b = libc::fcntl(from_child, libc::F_DUPFD_CLOEXEC, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c.spawn().expect("start chromium");
        // The child's ends stay with the child only, so its exit is our EOF.
        drop((cmd_r, ev_w));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(File::from(ev_r));
            let mut buf = Vec::new();
            let mut byte = [0u8; 64 * 1024];
            loop {
                let n = match r.read(&mut byte) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&byte[..n]);
                while let Some(end) = buf.iter().position(|&b| b == 0) {
                    let msg: Vec<u8> = buf.drain(..=end).collect();
                    match serde_json::from_slice::<Value>(&msg[..end]) {
                        Ok(v) => {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                        Err(e) => panic!("chromium sent a message that is not JSON: {e}"),
                    }
                }
            }
        });
        Chromium {
            child,
            commands: File::from(cmd_w),
            replies: rx,
            next_id: 1,
            events: Vec::new(),
            _profile: profile,
        }
    }

    fn recv(&mut self, deadline: Instant, what: &str) -> Value {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.replies.recv_timeout(left) {
            Ok(v) => v,
            Err(e) => panic!("chromium: no answer to {what} ({e:?})"),
        }
    }

    /// Send `method` (to the page of `session`, or to the browser) and
    /// return its result; panics on a protocol error.
    pub fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("chromium: sending {method}: {e}"));
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let v = self.recv(deadline, method);
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("chromium: {method} failed: {e}");
                }
                return v["result"].clone();
            }
            self.events.push(v);
        }
    }

    /// Wait for event `method` of `session`; earlier events are kept.
    pub fn wait_event(&mut self, session: &str, method: &str, timeout: Duration) -> Value {
        let is = |v: &Value| v["method"] == method && v["sessionId"] == session;
        if let Some(i) = self.events.iter().position(is) {
            return self.events.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.recv(deadline, method);
            if is(&v) {
                return v;
            }
            self.events.push(v);
        }
    }

    /// Take every event received so far for `session`.
    pub fn take_events(&mut self, session: &str) -> Vec<Value> {
        // Let the browser's queue drain: a cheap round trip.
        self.call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": "0"}),
        );
        let (mine, rest) = std::mem::take(&mut self.events)
            .into_iter()
            .partition(|v| v["sessionId"] == session);
        self.events = rest;
        mine
    }

    /// A new tab, its session attached, with the page, runtime, log and
    /// network domains on and a `width` × `height` CSS-pixel viewport.
    pub fn new_page(&mut self, width: u32, height: u32) -> String {
        let t = self.call(None, "Target.createTarget", json!({"url": "about:blank"}));
        let a = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": t["targetId"], "flatten": true}),
        );
        let s = a["sessionId"].as_str().expect("sessionId").to_string();
        for m in [
            "Page.enable",
            "Runtime.enable",
            "Log.enable",
            "Network.enable",
        ] {
            self.call(Some(&s), m, json!({}));
        }
        self.viewport(&s, width, height);
        s
    }

    pub fn viewport(&mut self, session: &str, width: u32, height: u32) {
        self.call(
            Some(session),
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
    }

    /// Load `url` and wait for its load event.
    pub fn navigate(&mut self, session: &str, url: &str) {
        let r = self.call(Some(session), "Page.navigate", json!({ "url": url }));
        assert!(r.get("errorText").is_none(), "loading {url}: {r}");
        self.wait_event(session, "Page.loadEventFired", CALL_TIMEOUT);
    }

    /// Evaluate `expr` in the page and return its value (JSON-serialisable
    /// values only); panics if it throws.
    pub fn eval(&mut self, session: &str, expr: &str) -> Value {
        let r = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("script threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// A PNG of the whole page (the viewport grown to the page's height,
    /// `width` kept).
    pub fn screenshot(&mut self, session: &str, width: u32) -> Vec<u8> {
        use base64::Engine;
        let m = self.call(Some(session), "Page.getLayoutMetrics", json!({}));
        let h = m["cssContentSize"]["height"]
            .as_f64()
            .unwrap_or(900.0)
            .ceil();
        self.viewport(session, width, (h as u32).clamp(1, 16_384));
        let shot = self.call(
            Some(session),
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("png data"))
            .expect("base64 png")
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.call_quietly();
        if lungate_tests::wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            // By PID: ours alone.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Chromium {
    /// `Browser.close`, without waiting for (or insisting on) an answer.
    fn call_quietly(&mut self) -> std::io::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        let mut bytes = serde_json::to_vec(&json!({"id": id, "method": "Browser.close"}))?;
        bytes.push(0);
        self.commands.write_all(&bytes)
    }
}
