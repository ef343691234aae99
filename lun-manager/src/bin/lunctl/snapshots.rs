//! The snapshot commands: snapshot, snapshots, revert, delete-snapshot,
//! clone, flatten, diff, apply-diff, usage. Each runs on the whole VM (its
//! consistency group) here, or through the control API of the gateway
//! that holds the LUN ([`Target`]).
//!
//! Long ones (flatten, a merging delete-snapshot, apply-diff) report
//! progress through a [`lungate_cli::Reporter`]; through a gateway, whose
//! control API has no progress stream yet, they report one `gateway`
//! phase of unknown size (a spinner on a terminal).

use std::cell::RefCell;
use std::fmt::Write;
use std::io::Read;
use std::path::Path;

use lun_manager::group::Group;
use lun_manager::owner::{self, Probe};
use lun_manager::size::human;
use lun_manager::{control_client, Access, Lun};
use lungate_cli::{Output, Reporter};
use serde_json::json;

use crate::fail::{Fail, Res};

/// Where a snapshot command runs.
pub enum Target {
    /// This process edits the files of the whole VM (the LUN and its
    /// secondaries, one consistency group), holding every member's flock
    /// throughout.
    Direct {
        group: Group,
        _locks: Vec<owner::FileLock>,
    },
    /// A gateway holds the LUN; the command goes to its control API.
    Gateway {
        client: control_client::Client,
        /// `/v1/luns/{UUID}`: the gateway knows the LUN by its UUID.
        base: String,
        name: String,
    },
}

impl Target {
    fn name(&self) -> &str {
        match self {
            Target::Direct { group, .. } => group.primary().name(),
            Target::Gateway { name, .. } => name,
        }
    }
}

fn target(path: &Path) -> Res<Target> {
    match owner::try_lock(path)? {
        Ok(lock) => {
            let mut locks = vec![lock];
            let group = Group::open(path, Access::ReadWrite)?;
            for m in &group.members()[1..] {
                locks.push(owner::lock(m.path()).map_err(|e| {
                    let f = Fail::from(e);
                    Fail::new(
                        f.exit,
                        format!(
                            "{} (a secondary disk of {}): {}",
                            m.path().display(),
                            group.primary().name(),
                            f.msg
                        ),
                    )
                })?);
            }
            Ok(Target::Direct {
                group,
                _locks: locks,
            })
        }
        Err(Probe::Gateway { pid, control }) => {
            // The label alone names the LUN; its state is the gateway's.
            let label = Lun::probe_label(path)?;
            eprintln!(
                "lunctl: {} is served by lungate (PID {pid}); using its control API at {}",
                label.name,
                control.display()
            );
            let client = control_client::Client::new(&control)?;
            Ok(Target::Gateway {
                client,
                base: format!("/v1/luns/{}", label.uuid),
                name: label.name,
            })
        }
        Err(busy) => Err(owner::busy_error(path, &busy).into()),
    }
}

/// A snapshot as `snapshots` shows it (from the volume or a gateway).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SnapRow {
    name: String,
    #[serde(default)]
    description: String,
    created: u64,
    parent: Option<String>,
    layer: uuid::Uuid,
    current: bool,
}

fn rows<T: serde::Serialize>(v: &T) -> Res<Vec<SnapRow>> {
    serde_json::from_value(serde_json::to_value(v).expect("json"))
        .map_err(|e| Fail::from(format!("unexpected snapshot list: {e}")))
}

pub fn snapshot(out: &Output, path: &Path, snap: &str, desc: &str) -> Res {
    let t = target(path)?;
    let info = match &t {
        Target::Direct { group, .. } => rows(&[group.snapshot(snap, desc)?])?.remove(0),
        Target::Gateway { client, base, .. } => {
            let v: serde_json::Value = client.post(
                &format!("{base}/snapshots"),
                &json!({"name": snap, "description": desc}),
            )?;
            rows(&[&v["snapshot"]])?.remove(0)
        }
    };
    out.result(
        "snapshot",
        &json!({ "lun": t.name(), "snapshot": info }),
        || {
            format!(
                "snapshot {} of {} taken{}\n",
                info.name,
                t.name(),
                info.parent
                    .as_ref()
                    .map(|p| format!(" (after {p})"))
                    .unwrap_or_default()
            )
        },
    );
    Ok(())
}

pub fn list(out: &Output, path: &Path) -> Res {
    let t = target(path)?;
    let list = match &t {
        Target::Direct { group, .. } => rows(&group.snapshots())?,
        Target::Gateway { client, base, .. } => {
            client.get::<Vec<SnapRow>>(&format!("{base}/snapshots"))?
        }
    };
    out.document(&list, || snapshot_tree(t.name(), &list));
    Ok(())
}

/// The snapshot tree for people: each snapshot under the one it was taken
/// after, and `now` under the snapshot the live LUN continues from.
fn snapshot_tree(name: &str, list: &[SnapRow]) -> String {
    fn walk(list: &[SnapRow], parent: Option<&str>, prefix: &str, depth: usize, o: &mut String) {
        let kids: Vec<&SnapRow> = list
            .iter()
            .filter(|s| s.parent.as_deref() == parent)
            .collect();
        let now_here = parent.is_some_and(|p| list.iter().any(|s| s.current && s.name == p));
        let n = kids.len() + usize::from(now_here);
        for (i, s) in kids.iter().enumerate() {
            let last = i + 1 == n;
            let desc = if s.description.is_empty() {
                String::new()
            } else {
                format!("  {:?}", s.description)
            };
            o.push_str(&format!(
                "{prefix}{} {}  {}{desc}\n",
                if last { "└─" } else { "├─" },
                s.name,
                lun_manager::report::utc(s.created)
            ));
            if depth < 256 {
                let p = format!("{prefix}{}", if last { "   " } else { "│  " });
                walk(list, Some(&s.name), &p, depth + 1, o);
            }
        }
        if now_here {
            o.push_str(&format!("{prefix}└─ ● now (live)\n"));
        }
    }
    let mut o = format!("{name}\n");
    if list.is_empty() {
        o.push_str("└─ ● now (live, no snapshots)\n");
        return o;
    }
    walk(list, None, "", 0, &mut o);
    if !list.iter().any(|s| s.current) {
        o.push_str("(the live LUN descends from no snapshot: flattened or a clone)\n");
    }
    o
}

pub fn revert(out: &Output, path: &Path, snap: &str) -> Res {
    let mut t = target(path)?;
    let pause_us = match &mut t {
        Target::Direct { group, .. } => {
            group.revert(snap)?;
            None
        }
        Target::Gateway { client, base, .. } => {
            let v: serde_json::Value =
                client.post(&format!("{base}/revert"), &json!({"snapshot": snap}))?;
            Some(v["pause_us"].clone())
        }
    };
    out.result(
        "revert",
        &json!({ "lun": t.name(), "snapshot": snap, "pause_us": pause_us }),
        || match &pause_us {
            None => format!("{} reverted to snapshot {snap}\n", t.name()),
            Some(p) => format!(
                "{} reverted to snapshot {snap} (guests paused {p} µs)\n",
                t.name()
            ),
        },
    );
    Ok(())
}

/// Wait for a gateway's answer with a spinner (its API has no progress).
fn via_gateway<T>(
    rep: &mut Reporter,
    f: impl FnOnce() -> Result<T, control_client::Error>,
) -> Res<T> {
    rep.waiting("gateway");
    let r = f();
    rep.finish();
    Ok(r?)
}

pub fn delete(out: &Output, path: &Path, snap: &str) -> Res {
    let t = target(path)?;
    let mut rep = out.progress("delete-snapshot");
    match &t {
        Target::Direct { group, .. } => {
            let r = group.delete_snapshot_with(snap, &mut |p, d, tot| rep.update(p, d, tot));
            rep.finish();
            r?
        }
        Target::Gateway { client, base, .. } => {
            via_gateway(&mut rep, || {
                client.delete::<serde_json::Value>(&format!(
                    "{base}/snapshots/{}",
                    control_client::encode(snap)
                ))
            })?;
        }
    }
    out.result(
        "delete-snapshot",
        &json!({ "lun": t.name(), "snapshot": snap }),
        || format!("snapshot {snap} of {} deleted\n", t.name()),
    );
    Ok(())
}

/// `NEW_NAME.lun` (and one clone per secondary disk) next to the source,
/// each with a new identity, made from snapshot `snap` in O(1).
fn op_clone(group: &Group, snap: &str, new_name: &str) -> Res<Group> {
    lun_manager::format::validate_name(new_name)?;
    let lun = group.primary();
    if lun.is_block_device() {
        return Err(format!(
            "{}: a LUN on a block device cannot be cloned into a file next to it; \
             clone a LUN that lives in a pool",
            lun.name()
        )
        .into());
    }
    // Group::clone refuses a taken file or VM name, for every disk.
    Ok(group.clone(snap, new_name)?)
}

pub fn clone(out: &Output, path: &Path, snap: &str, new_name: &str) -> Res {
    let t = target(path)?;
    let (clone_path, exports): (String, Vec<String>) = match &t {
        Target::Direct { group, .. } => {
            let c = op_clone(group, snap, new_name)?;
            let exports = c
                .members()
                .iter()
                .flat_map(|m| {
                    m.disks()
                        .iter()
                        .map(|d| format!("{}/disk{}", m.name(), d.index))
                        .collect::<Vec<_>>()
                })
                .collect();
            (c.primary().path().display().to_string(), exports)
        }
        Target::Gateway { client, base, .. } => {
            let v: serde_json::Value = client.post(
                &format!("{base}/clone"),
                &json!({"snapshot": snap, "name": new_name}),
            )?;
            let exports = v["exports"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            (v["path"].as_str().unwrap_or("?").to_string(), exports)
        }
    };
    let served = matches!(t, Target::Gateway { .. });
    out.result(
        "clone",
        &json!({
            "lun": t.name(),
            "snapshot": snap,
            "clone": new_name,
            "path": clone_path,
            "exports": exports,
            "served": served,
        }),
        || {
            if served {
                format!(
                    "cloned {} at snapshot {snap} as {new_name} ({clone_path}); exported as {}\n",
                    t.name(),
                    exports.join(", ")
                )
            } else {
                format!(
                    "cloned {} at snapshot {snap} as {new_name} ({clone_path})\n",
                    t.name()
                )
            }
        },
    );
    Ok(())
}

pub fn flatten(out: &Output, path: &Path) -> Res {
    let t = target(path)?;
    let mut rep = out.progress("flatten");
    match &t {
        Target::Direct { group, .. } => {
            // The group counts clusters; report bytes of the whole VM.
            let bytes: u64 = group.members().iter().map(|m| m.volume().size()).sum();
            let r = group.flatten(|done, total| {
                let b = u128::from(done) * u128::from(bytes) / u128::from(total.max(1));
                rep.update("copy", u64::try_from(b).unwrap_or(bytes), bytes)
            });
            rep.finish();
            r?
        }
        Target::Gateway { client, base, .. } => {
            via_gateway(&mut rep, || {
                client.post::<serde_json::Value>(&format!("{base}/flatten"), &json!({}))
            })?;
        }
    }
    out.result("flatten", &json!({ "lun": t.name() }), || {
        format!(
            "{} flattened: it reads no shared layer any more\n",
            t.name()
        )
    });
    Ok(())
}

pub fn diff(out: &Output, path: &Path, from: &str, to: Option<&str>, file: Option<&Path>) -> Res {
    let t = target(path)?;
    let query = format!(
        "from={}{}",
        control_client::encode(from),
        to.map(|x| format!("&to={}", control_client::encode(x)))
            .unwrap_or_default()
    );
    if let Some(file) = file {
        let n = write_diff_file(&t, from, to, file, &query)?;
        out.result(
            "diff",
            &json!({
                "lun": t.name(),
                "from": from,
                "to": to,
                "file": file,
                "bytes": n,
            }),
            || {
                format!(
                    "diff of {} from {from} to {} written to {} ({})\n",
                    t.name(),
                    to.unwrap_or("now"),
                    file.display(),
                    human(n)
                )
            },
        );
        return Ok(());
    }
    let (changes, lun_regions) = match &t {
        Target::Direct { group, .. } => (
            serde_json::to_value(group.diff(from, to)?).expect("json"),
            Some(group.primary().label().regions.clone()),
        ),
        Target::Gateway { client, base, .. } => {
            let v: serde_json::Value = client.get(&format!("{base}/diff?{query}"))?;
            (v["changes"].clone(), None)
        }
    };
    let doc = json!({ "changes": changes });
    if out.is_json() {
        out.document(&doc, String::new);
        return Ok(());
    }
    let regions = match lun_regions {
        Some(r) => r,
        None => Lun::open(path, Access::ReadOnly)?.label().regions.clone(),
    };
    out.document(&doc, || {
        let list = changes.as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            return format!("no changes from {from} to {}\n", to.unwrap_or("now"));
        }
        let mut o = format!("{:>14} {:>12}  {:<5} WHERE\n", "OFFSET", "LENGTH", "KIND");
        let mut total = 0;
        for c in &list {
            let (off, len) = (
                c["offset"].as_u64().unwrap_or(0),
                c["length"].as_u64().unwrap_or(0),
            );
            total += len;
            let at = regions
                .iter()
                .find(|r| r.offset <= off && off < r.end())
                .map(|r| format!("{} +{}", r.name(), off - r.offset))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                o,
                "{off:>14} {len:>12}  {:<5} {at}",
                c["kind"].as_str().unwrap_or("?")
            );
        }
        let _ = writeln!(
            o,
            "{} extent(s), {} changed from {from} to {}",
            list.len(),
            human(total),
            to.unwrap_or("now")
        );
        o
    });
    Ok(())
}

fn write_diff_file(t: &Target, from: &str, to: Option<&str>, out: &Path, query: &str) -> Res<u64> {
    let at = |e: std::io::Error| Fail::from(format!("{}: {e}", out.display()));
    Ok(match t {
        Target::Direct { group, .. } => {
            let f = std::fs::File::create(out).map_err(at)?;
            let mut w = std::io::BufWriter::new(f);
            let n = group.write_diff(from, to, &mut w)?;
            let f = w
                .into_inner()
                .map_err(|e| Fail::from(format!("{}: {}", out.display(), e.error())))?;
            f.sync_all().map_err(at)?;
            n
        }
        Target::Gateway { client, base, .. } => {
            let b = client.get_bytes(&format!("{base}/diff-file?{query}"))?;
            std::fs::write(out, &b).map_err(at)?;
            b.len() as u64
        }
    })
}

/// Reads a diff file and reports how much of it was read (`verify`: the
/// library checks it as it reads, before it writes anything).
struct Counted<'a, R> {
    inner: R,
    read: u64,
    total: u64,
    rep: &'a RefCell<Reporter>,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        self.rep
            .borrow_mut()
            .update("verify", self.read.min(self.total), self.total);
        Ok(n)
    }
}

pub fn apply_diff(out: &Output, path: &Path, file: &Path) -> Res {
    let mut t = target(path)?;
    let name = t.name().to_string();
    let at = |e: std::io::Error| Fail::from(format!("{}: {e}", file.display()));
    let rep = RefCell::new(out.progress("apply-diff"));
    let fields = match &mut t {
        Target::Direct { group, .. } => {
            let f = std::fs::File::open(file).map_err(|e| {
                let exit = if e.kind() == std::io::ErrorKind::NotFound {
                    lungate_cli::Exit::NotFound
                } else {
                    lungate_cli::Exit::Failed
                };
                Fail::new(exit, format!("{}: {e}", file.display()))
            })?;
            let total = f.metadata().map_err(at)?.len();
            rep.borrow_mut().update("verify", 0, total);
            let mut r = Counted {
                inner: std::io::BufReader::new(f),
                read: 0,
                total,
                rep: &rep,
            };
            let info = group
                .apply_diff_with(&mut r, &mut |p, d, t| rep.borrow_mut().update(p, d, t))
                .map_err(|e| {
                    let f = Fail::from(e);
                    Fail::new(f.exit, format!("{}: {}", file.display(), f.msg))
                })?;
            rep.borrow_mut().finish();
            let bytes: u64 = info
                .sections
                .iter()
                .flat_map(|s| &s.changes)
                .map(|c| c.length)
                .sum();
            json!({
                "lun": name,
                "file": file,
                "from": info.from,
                "to": info.to,
                "sections": info.sections.len(),
                "extents": info.sections.iter().map(|s| s.changes.len()).sum::<usize>(),
                "bytes": bytes,
            })
        }
        Target::Gateway { client, base, .. } => {
            let b = std::fs::read(file).map_err(at)?;
            via_gateway(&mut rep.borrow_mut(), || {
                client.post_bytes::<serde_json::Value>(&format!("{base}/apply-diff"), b)
            })?;
            json!({ "lun": name, "file": file })
        }
    };
    out.result("apply-diff", &fields, || match fields.get("from") {
        Some(from) => format!(
            "applied {} ({} to {}) to {name}: {} LUN section(s), {} extent(s), {}\n",
            file.display(),
            from.as_str().unwrap_or("?"),
            fields["to"].as_str().unwrap_or("now"),
            fields["sections"],
            fields["extents"],
            human(fields["bytes"].as_u64().unwrap_or(0))
        ),
        None => format!("applied {} to {name}\n", file.display()),
    });
    Ok(())
}

pub fn usage(out: &Output, path: &Path) -> Res {
    let t = target(path)?;
    let list: serde_json::Value = match &t {
        Target::Direct { group, .. } => serde_json::to_value(group.usage()).expect("json"),
        Target::Gateway { client, base, .. } => client.get(&format!("{base}/usage"))?,
    };
    out.document(&list, || usage_text(t.name(), &list));
    Ok(())
}

fn usage_text(name: &str, list: &serde_json::Value) -> String {
    let mut o = format!(
        "{:<36}  {:<16} {:<13} {:>10} {:>10}\n",
        "LAYER", "SNAPSHOT", "ROLE", "ALLOCATED", "ON DISK"
    );
    let (mut own, mut shared) = (0, 0);
    for l in list.as_array().into_iter().flatten() {
        let role = if l["live"] == true {
            "live"
        } else if l["external"] == true {
            "shared (parent)"
        } else if l["in_chain"] == true {
            "in chain"
        } else {
            "not in chain"
        };
        let disk = l["disk_bytes"].as_u64().unwrap_or(0);
        if l["external"] == true {
            shared += disk;
        } else {
            own += disk;
        }
        let layer = l["layer"].as_str().unwrap_or("?");
        let base = l["path"].as_str().is_some_and(|p| !p.ends_with(".delta"));
        let _ = writeln!(
            o,
            "{:<36}  {:<16} {:<13} {:>10} {:>10}",
            layer,
            l["snapshot"]
                .as_str()
                .unwrap_or(if base { "(base)" } else { "-" }),
            role,
            human(l["allocated_bytes"].as_u64().unwrap_or(0)),
            human(disk)
        );
    }
    let _ = writeln!(
        o,
        "{} on disk in {name}'s own files, {} in shared parent layers",
        human(own),
        human(shared)
    );
    o
}
