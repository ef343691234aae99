//! Crash consistency: a client writes, flushes and snapshots (through the
//! control API) while the gateway is SIGKILLed at random points, many times.
//! After each restart every write acknowledged before a completed FLUSH (or
//! snapshot) reads back exactly; `lunctl inspect --json` reports the label
//! and every state record checksum ok; every snapshot the client saw created
//! is listed; at the end every snapshot reads back exactly as the data was
//! when it was taken.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lun_manager::{Access, Lun};
use lungate_block::volume::Volume;
use lungate_tests::*;

const NBLOCKS: usize = 64;
const BS: usize = 64 << 10;
const ROUNDS: u64 = 10;

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/crash_workload.py")
}

fn python() -> Command {
    let mut c = Command::new("/usr/bin/python3");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![std::path::PathBuf::from("/usr/bin")];
    dirs.extend(std::env::split_paths(&path));
    c.env("PATH", std::env::join_paths(dirs).unwrap());
    c
}

/// What the client knows about the disk, replayed from its log.
#[derive(Default)]
struct Model {
    /// Last acknowledged value per block (`None`: unknown, e.g. torn).
    cur: Vec<Option<u8>>,
    /// Values at the last completed flush or snapshot.
    durable: Vec<Option<u8>>,
    /// Values written (sent) since then, per block.
    pending: Vec<BTreeSet<u8>>,
    /// Snapshot name → contents, for snapshots the client saw created (or
    /// requested: those are checked only if listed).
    snaps: BTreeMap<String, Vec<Option<u8>>>,
    confirmed: BTreeSet<String>,
}

impl Model {
    fn new() -> Model {
        Model {
            cur: vec![Some(0); NBLOCKS],
            durable: vec![Some(0); NBLOCKS],
            pending: vec![BTreeSet::new(); NBLOCKS],
            ..Default::default()
        }
    }

    fn settle(&mut self) {
        self.durable = self.cur.clone();
        self.pending.iter_mut().for_each(|p| p.clear());
    }

    fn replay(&mut self, log: &str) {
        for line in log.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.first().copied() {
                Some("W") => {
                    let (b, v): (usize, u8) = (f[1].parse().unwrap(), f[2].parse().unwrap());
                    self.pending[b].insert(v);
                }
                Some("A") => {
                    let (b, v): (usize, u8) = (f[1].parse().unwrap(), f[2].parse().unwrap());
                    self.cur[b] = Some(v);
                }
                Some("F") => self.settle(),
                Some("s") => {
                    self.snaps.insert(f[1].to_string(), self.cur.clone());
                }
                Some("S") => {
                    self.confirmed.insert(f[1].to_string());
                    self.settle();
                }
                _ => {}
            }
        }
    }

    /// Allowed byte values per block after a crash (`None`: anything).
    fn allowed(&self) -> HashMap<String, Option<Vec<u8>>> {
        (0..NBLOCKS)
            .map(|b| {
                let a = self.durable[b].map(|d| {
                    let mut s = self.pending[b].clone();
                    s.insert(d);
                    s.into_iter().collect()
                });
                (b.to_string(), a)
            })
            .collect()
    }
}

fn verify(gw: &Gateway, model: &mut Model, round: u64) {
    let expect = serde_json::to_string(&model.allowed()).unwrap();
    let out = run_ok(python().args([
        script().to_str().unwrap(),
        "verify",
        &gw.uri("c/disk0"),
        &NBLOCKS.to_string(),
        &BS.to_string(),
        &expect,
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["bad"],
        serde_json::json!([]),
        "round {round}: blocks acknowledged before a completed FLUSH do not read back: {}\nallowed: {expect}",
        v["bad"]
    );
    for b in 0..NBLOCKS {
        let a = v["actual"][b.to_string()].as_i64().unwrap();
        model.cur[b] = u8::try_from(a).ok();
    }
    model.settle();
}

fn inspect_ok(lun: &Path, round: u64) {
    let out = lunctl(&["inspect", "--json", lun.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["label_checksum"], "ok", "round {round}: {v}");
    let recs = v["state"]["records"].as_array().expect("state records");
    assert!(!recs.is_empty());
    for r in recs {
        assert_eq!(r["checksum"], "ok", "round {round}: {r}");
    }
}

#[test]
fn sigkill_at_random_points_loses_no_flushed_write_and_no_snapshot() {
    let mut pool = Pool::new();
    let lun = pool.add("c", "offset", &["16M"], "16M").path.clone();
    let log = pool.path().join("workload.log");
    let mut model = Model::new();
    let mut seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("CRASH_SEED={seed}");
    let started = Instant::now();
    for round in 0..ROUNDS {
        let gw = Gateway::start(&["--pool", pool.arg()]);
        verify(&gw, &mut model, round);
        let listed: BTreeSet<String> = api(&gw.control(), "GET", "/v1/luns/c/snapshots", None, 200)
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        for s in &model.confirmed {
            assert!(
                listed.contains(s),
                "round {round}: snapshot {s} was created but is gone"
            );
        }
        for s in &listed {
            assert!(
                model.snaps.contains_key(s),
                "round {round}: unknown snapshot {s}"
            );
        }

        std::fs::write(&log, "").unwrap();
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut client = python()
            .args([
                script().to_str().unwrap(),
                "run",
                &gw.uri("c/disk0"),
                gw.control().to_str().unwrap(),
                "c",
                log.to_str().unwrap(),
                &(seed >> 16).to_string(),
                &NBLOCKS.to_string(),
                &BS.to_string(),
                &format!("r{round}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the workload");
        std::thread::sleep(Duration::from_millis(300 + (seed >> 40) % 700));
        // SAFETY: kill(2) with our own child's PID and a signal number.
        unsafe {
            libc::kill(gw.pid() as libc::pid_t, libc::SIGKILL);
        }
        drop(gw);
        let status = wait_timeout(&mut client, Duration::from_secs(30));
        if status.is_none() {
            let _ = client.kill();
            let _ = client.wait();
            panic!("round {round}: the workload did not notice the gateway died");
        }
        let text = std::fs::read_to_string(&log).unwrap();
        let events = text.lines().count();
        assert!(
            text.lines().last().is_some_and(|l| l.starts_with('E')),
            "round {round}: workload ended without seeing the kill:\n{}",
            text.lines().rev().take(5).collect::<Vec<_>>().join("\n")
        );
        eprintln!(
            "round {round}: {events} events, {} flushes, {} snapshots",
            text.lines().filter(|l| *l == "F").count(),
            text.lines().filter(|l| l.starts_with("S ")).count()
        );
        model.replay(&text);
        inspect_ok(&lun, round);
    }

    // A last restart: the data, then every snapshot, read back exactly.
    let gw = Gateway::start(&["--pool", pool.arg()]);
    verify(&gw, &mut model, ROUNDS);
    let listed: Vec<String> = api(&gw.control(), "GET", "/v1/luns/c/snapshots", None, 200)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    gw.stop_ok();
    inspect_ok(&lun, ROUNDS);
    assert!(!model.confirmed.is_empty(), "no snapshot was ever made");
    let l = Lun::open(&lun, Access::ReadWrite).unwrap();
    let base = l.disks()[0].offset;
    let v = Volume::open(l.volume_config(Default::default())).unwrap();
    let mut buf = vec![0u8; BS];
    for name in &listed {
        let want = &model.snaps[name];
        for (b, w) in want.iter().enumerate() {
            let Some(w) = w else { continue };
            v.read_snapshot(name, base + (b * BS) as u64, &mut buf)
                .unwrap();
            assert!(
                buf.iter().all(|x| x == w),
                "snapshot {name} block {b}: want {w}, found {:?}",
                buf.iter().collect::<BTreeSet<_>>()
            );
        }
    }
    eprintln!(
        "{ROUNDS} kills, {} snapshots verified, {:?}",
        listed.len(),
        started.elapsed()
    );
    drop(v);
    pool.assert_hidden_unchanged();
}
