//! A throwaway Ceph cluster (one mon, one MemStore OSD, pool `rbd`) for the
//! RBD tests, started with ../shared/ceph/ceph-up.sh on free 127.0.0.1
//! ports in a temp directory, and an etcd server for the coordination
//! tests.
//!
//! One cluster serves every test of a test binary ([`Cluster::shared`]);
//! each test works in its own RBD namespace. The cluster stops itself: a
//! watchdog shell started with it runs ../shared/ceph/ceph-down.sh (by the
//! daemons' recorded PIDs) and removes the directory once the test process
//! has exited, however it exits.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{require_tool, run_timeout};

/// How long the cluster may take to come up (about 10 s here, slower when
/// the machine is busy).
const UP_TIMEOUT: Duration = Duration::from_secs(240);

/// ../shared/ceph, from the repository root.
fn shared_ceph() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/ceph")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

pub struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    /// The cluster of this test process, started on first use.
    pub fn shared() -> &'static Cluster {
        static C: OnceLock<Cluster> = OnceLock::new();
        C.get_or_init(Cluster::start)
    }

    fn start() -> Cluster {
        for t in ["ceph-mon", "ceph-osd", "rbd", "ceph", "uuidgen", "bc"] {
            require_tool(t);
        }
        let dir = tempfile::Builder::new()
            .prefix("lungate-ceph-")
            .tempdir()
            .expect("tempdir")
            .keep();
        let t0 = Instant::now();
        let mut up = Command::new("bash");
        up.arg(shared_ceph().join("ceph-up.sh"))
            .env("CEPH_DIR", &dir)
            .env("OBJECTSTORE", "memstore")
            .env("OSD_SIZE_GB", "3")
            .env("WITH_MGR", "0")
            .env("MON_V2_PORT", free_port().to_string())
            .env("MON_V1_PORT", free_port().to_string());
        // The watchdog first: it stops whatever ceph-up.sh managed to start
        // even if that fails half-way.
        watchdog(&dir);
        let out = run_timeout(&mut up, UP_TIMEOUT);
        assert!(
            out.status.success(),
            "ceph-up.sh failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "ceph cluster up in {:.1?} at {}",
            t0.elapsed(),
            dir.display()
        );
        let conf = dir.join("ceph.conf");
        Cluster { dir, conf }
    }

    pub fn conf(&self) -> &Path {
        &self.conf
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `rbd:rbd/NAMESPACE:conf=FILE`: a pool of its own for one test,
    /// created with `lunctl pool init --conf`.
    pub fn pool(&self, namespace: &str) -> String {
        let out = crate::lunctl(&[
            "pool",
            "init",
            &format!("rbd:rbd/{namespace}"),
            "--conf",
            self.conf.to_str().expect("utf-8"),
        ]);
        crate::assert_success("lunctl pool init", &out);
        format!("rbd:rbd/{namespace}:conf={}", self.conf.display())
    }

    /// `rbd export` of `rbd/NS/IMAGE` into a file in `dir`: the image's
    /// bytes, for the file tools.
    pub fn export(&self, ns: &str, image: &str, dir: &Path) -> PathBuf {
        let out = dir.join(image);
        let _ = std::fs::remove_file(&out);
        self.rbd(&[
            "export",
            "--no-progress",
            &format!("rbd/{ns}/{image}"),
            out.to_str().expect("utf-8"),
        ]);
        out
    }

    /// The `rbd` CLI against this cluster.
    pub fn rbd(&self, args: &[&str]) -> String {
        let out = run_timeout(
            Command::new(require_tool("rbd"))
                .env("CEPH_CONF", &self.conf)
                .args(args),
            crate::CMD_TIMEOUT,
        );
        crate::assert_success(&format!("rbd {args:?}"), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Runs ceph-down.sh (PURGE=1) for `dir` once this process has exited.
fn watchdog(dir: &Path) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         CEPH_DIR='{dir}' PURGE=1 bash '{down}' >/dev/null 2>&1",
        pid = std::process::id(),
        dir = dir.display(),
        down = shared_ceph().join("ceph-down.sh").display(),
    );
    // `setsid -f` forks the watchdog into a session of its own and returns.
    let st = Command::new("setsid")
        .args(["-f", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("start the cluster's watchdog");
    assert!(st.success(), "setsid -f: {st}");
}

/// An etcd server on free 127.0.0.1 ports with its data in a temp
/// directory; ended (by PID) on drop.
pub struct Etcd {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("lungate-etcd-")
            .tempdir()
            .expect("tempdir");
        let client = format!("http://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let child = Command::new(require_tool("etcd"))
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("etcd.log")).expect("log"))
            .spawn()
            .expect("start etcd");
        let e = Etcd {
            child,
            endpoint: client,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = run_timeout(
                Command::new(require_tool("curl")).args([
                    "-sf",
                    "-XPOST",
                    &format!("{}/v3/maintenance/status", e.endpoint),
                    "-d",
                    "{}",
                ]),
                Duration::from_secs(5),
            );
            if out.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "etcd not up within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        e
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
