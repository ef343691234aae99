//! `lunctl migrate` and `lunctl migrations`: live migration of a VM's LUNs
//! to another gateway or another pool, run by the gateway that serves the
//! LUN (docs/migration.md). lunctl starts it through that gateway's
//! control API, follows it with a progress bar (bytes, rounds, rate) or
//! NDJSON progress events, and prints the final report: bytes sent,
//! rounds, the guest-visible pause and the parked-request count.
//!
//! A move to another pool of a LUN no gateway serves runs offline:
//! lunctl starts `lungate move` (the gateway binary beside its own, or
//! on PATH), which runs the same engine with no listener and exits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lun_manager::owner::{self, Probe};
use lun_manager::size::{human, parse_size};
use lun_manager::Lun;
use lungate_api::client as control;
use lungate_api::types::{MigrateRequest, MigrationInfo, MigrationPhase};
use lungate_cli::{Exit, Output};

use crate::fail::{Fail, Res};

/// What `lunctl migrate` was asked.
pub struct Args {
    pub to: Option<String>,
    pub to_pool: Option<String>,
    pub target_pool: Option<String>,
    pub downtime_ms: Option<u64>,
    pub max_rate: Option<String>,
    pub keep_source: bool,
    pub with_dependents: bool,
    pub auto_converge: bool,
    pub token_file: Option<PathBuf>,
    pub abort: bool,
}

/// The control API of the gateway serving `path`, and the LUN's UUID ref.
pub(crate) fn gateway(path: &Path) -> Res<(control::Client, String, String)> {
    if let Some(reg) = crate::snapshots::etcd_owner(path)? {
        // A coordinated RBD LUN: etcd names the gateway that serves it.
        let control = crate::snapshots::owner_control(path, &reg)?;
        let label = Lun::probe_label(path)?;
        let client = control::Client::new(&control)?;
        return Ok((client, control::uuid_ref(label.uuid), label.name));
    }
    match owner::try_lock(path)? {
        Ok(_lock) => Err(Fail::new(
            Exit::Failed,
            format!(
                "{} is not served by a gateway: a live migration runs in the gateway that serves it \
                 (start `lungate serve --pool ...`)",
                path.display()
            ),
        )),
        Err(Probe::Gateway { control, .. }) => {
            let label = Lun::probe_label(path)?;
            let client = control::Client::new(&control)?;
            Ok((client, control::uuid_ref(label.uuid), label.name))
        }
        Err(busy) => Err(owner::busy_error(path, &busy).into()),
    }
}

fn summary(i: &MigrationInfo) -> String {
    let mut s = format!(
        "{} → {}: {:?}, {} sent in {} round(s) after the bulk copy, {} ms",
        i.members.join(", "),
        i.peer,
        i.phase,
        human(i.bytes),
        i.rounds,
        i.elapsed_ms
    );
    if let Some(p) = i.pause_us {
        s.push_str(&format!(
            ", guest-visible pause {:.1} ms ({} parked request(s))",
            p as f64 / 1000.0,
            i.parked.unwrap_or(0)
        ));
    }
    if let Some(r) = i.throttle_min_rate {
        s.push_str(&format!(
            ", guest writes throttled in {} round(s) down to {}/s ({} delayed)",
            i.throttle_rounds,
            human(r),
            i.throttled_writes
        ));
    }
    if i.queued_ops > 0 {
        s.push_str(&format!(
            ", {} queued operation(s) run on the new owner",
            i.queued_ops
        ));
    }
    if let Some(k) = &i.kept_source {
        s.push_str(&format!(", source kept at {}", k.display()));
    }
    if let Some(e) = &i.error {
        s.push_str(&format!(": {e}"));
    }
    s
}

/// The `lungate` binary: beside this `lunctl`, or on PATH.
fn lungate_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("lungate")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("lungate"))
}

/// `--to-pool` of a LUN no gateway serves: `lungate move`, to its end.
fn offline(out: &Output, path: &Path, to_pool: &str, a: &Args) -> Res {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pool = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let bin = lungate_bin();
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("move")
        .arg(&name)
        .arg("--pool")
        .arg(&pool)
        .arg("--to-pool")
        .arg(to_pool)
        .arg("--json");
    if a.keep_source {
        cmd.arg("--keep-source");
    }
    if a.with_dependents {
        cmd.arg("--with-dependents");
    }
    if let Some(r) = &a.max_rate {
        cmd.arg("--max-rate").arg(r);
    }
    if std::env::var_os("LUNGATE_LOG").is_none() {
        cmd.env("LUNGATE_LOG", "warn");
    }
    let mut rep = out.progress("migrate");
    rep.waiting("offline move");
    let done = cmd.output();
    rep.finish();
    let done = done.map_err(|e| {
        Fail::new(
            Exit::Failed,
            format!(
                "{} is not served by a gateway, so the move runs offline, but {} cannot be run ({e}):                  install lungate beside lunctl or on PATH, or run `lungate move {name} --pool {} --to-pool {to_pool}`",
                path.display(),
                bin.display(),
                pool.display()
            ),
        )
    })?;
    let stdout = String::from_utf8_lossy(&done.stdout);
    let stderr = String::from_utf8_lossy(&done.stderr);
    if !done.status.success() {
        let why = stderr
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("lungate: "))
            .unwrap_or(stderr.trim());
        return Err(Fail::new(
            Exit::Failed,
            format!("the offline move of {name} did not complete: {why}"),
        ));
    }
    let info: MigrationInfo = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| {
            Fail::new(
                Exit::Failed,
                format!("lungate move printed no report: {stdout}{stderr}"),
            )
        })?;
    out.result("migrate", &info, || {
        format!("moved offline {}\n", summary(&info))
    });
    Ok(())
}

pub fn migrate(out: &Output, path: &Path, a: Args) -> Res {
    if let (Some(to_pool), None, false) = (&a.to_pool, &a.to, a.abort) {
        // No gateway serves it: nothing can be paused or forwarded, and the
        // move runs here, offline.
        if owner::try_lock(path)?.is_ok() {
            return offline(out, path, to_pool, &a);
        }
    }
    let (client, lun, name) = gateway(path)?;
    if a.abort {
        let i = client.abort_migration(&lun)?;
        out.result("migrate", &i, || {
            format!("abort of migration {} of {name} requested\n", i.id)
        });
        return Ok(());
    }
    let token = match &a.token_file {
        None => None,
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| format!("{}: {e}", f.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        ),
    };
    let max_rate = match &a.max_rate {
        None => None,
        Some(r) => Some(
            parse_size(r).map_err(|e| Fail::new(Exit::Usage, format!("--max-rate {r:?}: {e}")))?,
        ),
    };
    let req = MigrateRequest {
        to: a.to,
        to_pool: a.to_pool,
        target_pool: a.target_pool,
        downtime_ms: a.downtime_ms,
        max_rate,
        keep_source: a.keep_source,
        with_dependents: a.with_dependents,
        token,
        // Absent means on: the gateway's default.
        auto_converge: (!a.auto_converge).then_some(false),
        ..Default::default()
    };
    let started = client.migrate(&lun, &req)?;
    let id = started.id;
    let mut rep = out.progress("migrate");
    let mut last = started;
    // The gateway runs it; follow it until it is over.
    while !last.phase.is_final() {
        std::thread::sleep(Duration::from_millis(100));
        last = match client.migration(id) {
            Ok(i) => i,
            Err(e) => {
                rep.finish();
                return Err(e.into());
            }
        };
        match last.phase {
            MigrationPhase::Preparing => rep.waiting("prepare"),
            MigrationPhase::Copying => {
                rep.update("copy", last.bytes, last.bulk_bytes.max(last.bytes))
            }
            MigrationPhase::Rounds if last.throttle_rate.is_some() => rep.update(
                "rounds (writes throttled)",
                last.bytes,
                last.bytes.saturating_add(last.dirty_bytes),
            ),
            MigrationPhase::Rounds => rep.update(
                "rounds",
                last.bytes,
                last.bytes.saturating_add(last.dirty_bytes),
            ),
            MigrationPhase::Switching | MigrationPhase::InDoubt => rep.waiting("switch"),
            MigrationPhase::Forwarding => rep.waiting("finish"),
            _ => {}
        }
    }
    rep.finish();
    match last.phase {
        MigrationPhase::Done => {
            out.result("migrate", &last, || {
                format!("migrated {}\n", summary(&last))
            });
            Ok(())
        }
        _ => Err(Fail::new(
            Exit::Failed,
            format!(
                "migration {id} of {name} did not complete; the source keeps serving it: {}",
                summary(&last)
            ),
        )),
    }
}

/// `lunctl migrations --pool P` (or `--control SOCKET`).
pub fn list(out: &Output, pool: Option<&Path>, control_sock: Option<&Path>) -> Res {
    let sock = match (control_sock, pool) {
        (Some(s), _) => s.to_path_buf(),
        (None, Some(p)) => p.join(".lungate.sock"),
        (None, None) => {
            return Err(Fail::new(
                Exit::Usage,
                "give --pool DIR or --control SOCKET",
            ))
        }
    };
    let client = control::Client::new(&sock)?;
    let v = client.migrations()?;
    out.document(&v, || {
        if v.is_empty() {
            return "no migrations\n".into();
        }
        let mut s = String::new();
        for i in &v {
            s.push_str(&format!("{}  {:?}  {}\n", i.id, i.direction, summary(i)));
        }
        s
    });
    Ok(())
}
