//! The snapshot commands: snapshot, snapshots, revert, delete-snapshot,
//! clone, flatten, diff, apply-diff, usage, and repair of a lost snapshot
//! manifest. Each runs on the whole VM (its
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
use lun_manager::{Access, Lun};
use lungate_api::client as control;
use lungate_api::etcd;
use lungate_api::types as wire;
use lungate_cli::{Exit, Output, Reporter};

use crate::fail::{Fail, Res};
use crate::results;

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
        client: control::Client,
        /// The LUN's UUID: the gateway knows it by that.
        lun: String,
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

/// `HOST:PORT` of the etcd that `--coordinator` named.
static COORDINATOR: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub fn set_coordinator(addr: String) {
    let _ = COORDINATOR.set(addr);
}

/// The gateway etcd names as the owner of the RBD LUN at `path`, when
/// `--coordinator` is given (`None` otherwise, or for a file LUN).
pub(crate) fn etcd_owner(path: &Path) -> Res<Option<etcd::Registration>> {
    let Some(addr) = COORDINATOR.get() else {
        return Ok(None);
    };
    if !lun_manager::backing::is_rbd(path) {
        return Ok(None);
    }
    etcd::owner_blocking(addr, path).map_err(|e| Fail::new(Exit::Failed, e.to_string()))
}

/// The control API of the gateway `reg` (etcd's owner of `path`), which
/// must run on this host: its control socket is a unix socket.
pub(crate) fn owner_control(path: &Path, reg: &etcd::Registration) -> Res<std::path::PathBuf> {
    let here = owner::hostname();
    let remote = || owner::Error::Owned {
        lun: path.display().to_string(),
        owner: format!("lungate gateway {}, the owner in etcd", reg.name),
        pid: reg.pid,
        host: reg.host.clone(),
    };
    if reg.host != here {
        return Err(remote().into());
    }
    reg.control_socket().map(Path::to_path_buf).ok_or_else(|| {
        Fail::new(
            Exit::Busy,
            format!(
                "{}: served by lungate gateway {} (PID {}), which has no control socket (start it with --control)",
                path.display(),
                reg.name,
                reg.pid
            ),
        )
    })
}

fn target(path: &Path) -> Res<Target> {
    if let Some(reg) = etcd_owner(path)? {
        // etcd decides who owns a coordinated LUN, whatever a record in
        // the LUN still says.
        let control = owner_control(path, &reg)?;
        let label = Lun::probe_label(path)?;
        eprintln!(
            "lunctl: {} is served by lungate gateway {} (PID {}, the owner in etcd); using its control API at {}",
            label.name,
            reg.name,
            reg.pid,
            control.display()
        );
        return Ok(Target::Gateway {
            client: control::Client::new(&control)?,
            lun: control::uuid_ref(label.uuid),
            name: label.name,
        });
    }
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
            let client = control::Client::new(&control)?;
            Ok(Target::Gateway {
                client,
                lun: control::uuid_ref(label.uuid),
                name: label.name,
            })
        }
        Err(busy) => Err(owner::busy_error(path, &busy).into()),
    }
}

/// A snapshot as `snapshots` shows it (from the volume or a gateway).
type SnapRow = wire::SnapshotInfo;

fn row(s: lungate_block::volume::SnapshotInfo) -> SnapRow {
    lun_manager::lun::layouts::wire_snapshot(s)
}

/// The rows of `group`'s snapshots, each with the region sizes it had when
/// they differ from now (the LUN was resized after it).
fn rows_of(group: &Group) -> Res<Vec<SnapRow>> {
    Ok(group.primary().snapshot_list()?)
}

pub fn snapshot(out: &Output, path: &Path, snap: &str, desc: &str) -> Res {
    let t = target(path)?;
    let (info, pause_us) = match &t {
        Target::Direct { group, .. } => (row(group.snapshot(snap, desc)?), None),
        Target::Gateway { client, lun, .. } => {
            let r = client.snapshot(lun, snap, desc)?;
            (r.snapshot, Some(r.pause_us))
        }
    };
    out.result(
        "snapshot",
        &results::SnapshotTaken {
            lun: t.name(),
            snapshot: &info,
            pause_us,
        },
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
        Target::Direct { group, .. } => rows_of(group)?,
        Target::Gateway { client, lun, .. } => client.snapshots(lun)?,
    };
    out.document(&list, || snapshot_tree(t.name(), &list));
    Ok(())
}

/// The snapshot tree for people: each snapshot under the one it was taken
/// after, and `VM now` under the snapshot the live LUN continues from.
fn snapshot_tree(name: &str, list: &[SnapRow]) -> String {
    fn walk(
        vm: &str,
        list: &[SnapRow],
        parent: Option<&str>,
        prefix: &str,
        depth: usize,
        o: &mut String,
    ) {
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
            let sizes = if s.sizes.is_empty() {
                String::new()
            } else {
                let v: Vec<String> = s
                    .sizes
                    .iter()
                    .map(|z| format!("{} {} (now {})", z.region, human(z.bytes), human(z.now)))
                    .collect();
                format!("  [{}]", v.join(", "))
            };
            o.push_str(&format!(
                "{prefix}{} {}  {}{sizes}{desc}\n",
                if last { "└─" } else { "├─" },
                s.name,
                lun_manager::report::utc(s.created)
            ));
            if depth < 256 {
                let p = format!("{prefix}{}", if last { "   " } else { "│  " });
                walk(vm, list, Some(&s.name), &p, depth + 1, o);
            }
        }
        if now_here {
            o.push_str(&format!("{prefix}└─ ● {vm} now (live)\n"));
        }
    }
    let mut o = format!("{name}\n");
    if list.is_empty() {
        o.push_str(&format!("└─ ● {name} now (live, no snapshots)\n"));
        return o;
    }
    walk(name, list, None, "", 0, &mut o);
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
        Target::Gateway { client, lun, .. } => Some(client.revert(lun, snap)?.pause_us),
    };
    out.result(
        "revert",
        &results::Reverted {
            lun: t.name(),
            snapshot: snap,
            pause_us,
        },
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
fn via_gateway<T>(rep: &mut Reporter, f: impl FnOnce() -> Result<T, control::Error>) -> Res<T> {
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
        Target::Gateway { client, lun, .. } => {
            via_gateway(&mut rep, || client.delete_snapshot(lun, snap))?;
        }
    }
    out.result(
        "delete-snapshot",
        &results::SnapshotDeleted {
            lun: t.name(),
            snapshot: snap,
        },
        || format!("snapshot {snap} of {} deleted\n", t.name()),
    );
    Ok(())
}

/// `NEW_NAME.lun` (and one clone per secondary disk) next to the source,
/// each with a new identity, made from snapshot `snap` in O(1).
fn op_clone(group: &Group, snap: &str, new_name: &str) -> Res<Group> {
    lun_manager::format::validate_name(new_name)?;
    let lun = group.primary();
    if lun.is_block_device() && lun.path().starts_with("/dev") {
        return Err(format!(
            "{}: a LUN on a block device reached under /dev cannot be cloned into a file next to it; \
             link it into a pool (lunctl create NAME --pool DIR --device DEVICE) and clone it there",
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
        Target::Gateway { client, lun, .. } => {
            let c = client.clone_lun(lun, snap, new_name)?;
            (c.path.display().to_string(), c.exports)
        }
    };
    let served = matches!(t, Target::Gateway { .. });
    out.result(
        "clone",
        &results::Cloned {
            lun: t.name(),
            snapshot: snap,
            clone: new_name,
            path: &clone_path,
            exports: &exports,
            served,
        },
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
        Target::Gateway { client, lun, .. } => {
            via_gateway(&mut rep, || client.flatten(lun))?;
        }
    }
    out.result("flatten", &results::Flattened { lun: t.name() }, || {
        format!(
            "{} flattened: it reads no shared layer any more\n",
            t.name()
        )
    });
    Ok(())
}

pub fn diff(out: &Output, path: &Path, from: &str, to: Option<&str>, file: Option<&Path>) -> Res {
    let t = target(path)?;
    if let Some(file) = file {
        let n = write_diff_file(&t, from, to, file)?;
        out.result(
            "diff",
            &results::DiffWritten {
                lun: t.name(),
                from,
                to,
                file,
                bytes: n,
            },
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
            group
                .diff(from, to)?
                .into_iter()
                .map(|c| wire::Change {
                    offset: c.offset,
                    length: c.length,
                    kind: match c.kind {
                        lungate_block::volume::ChangeKind::Data => wire::ChangeKind::Data,
                        lungate_block::volume::ChangeKind::Zero => wire::ChangeKind::Zero,
                    },
                })
                .collect(),
            Some(group.primary().label().regions.clone()),
        ),
        Target::Gateway { client, lun, .. } => (client.diff(lun, from, to)?.changes, None),
    };
    let doc = wire::Diff { changes };
    if out.is_json() {
        out.document(&doc, String::new);
        return Ok(());
    }
    let regions = match lun_regions {
        Some(r) => r,
        None => Lun::open(path, Access::ReadOnly)?.label().regions.clone(),
    };
    out.document(&doc, || {
        let list = &doc.changes;
        if list.is_empty() {
            return format!("no changes from {from} to {}\n", to.unwrap_or("now"));
        }
        let mut o = format!("{:>14} {:>12}  {:<5} WHERE\n", "OFFSET", "LENGTH", "KIND");
        let mut total = 0;
        for c in list {
            let (off, len) = (c.offset, c.length);
            total += len;
            let at = regions
                .iter()
                .find(|r| r.offset <= off && off < r.end())
                .map(|r| format!("{} +{}", r.name(), off - r.offset))
                .unwrap_or_else(|| "-".into());
            let kind = match c.kind {
                wire::ChangeKind::Data => "data",
                wire::ChangeKind::Zero => "zero",
            };
            let _ = writeln!(o, "{off:>14} {len:>12}  {kind:<5} {at}");
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

fn write_diff_file(t: &Target, from: &str, to: Option<&str>, out: &Path) -> Res<u64> {
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
        Target::Gateway { client, lun, .. } => {
            let b = client.diff_file(lun, from, to)?;
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
    let at = |e: std::io::Error| {
        let exit = if e.kind() == std::io::ErrorKind::NotFound {
            lungate_cli::Exit::NotFound
        } else {
            lungate_cli::Exit::Failed
        };
        Fail::new(exit, format!("{}: {e}", file.display()))
    };
    let rep = RefCell::new(out.progress("apply-diff"));
    let mut done = results::DiffApplied {
        lun: &name,
        file,
        from: None,
        to: None,
        sections: None,
        extents: None,
        bytes: None,
        base_matched: None,
    };
    match &mut t {
        Target::Direct { group, .. } => {
            let f = std::fs::File::open(file).map_err(at)?;
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
            let changes = || info.sections.iter().flat_map(|s| &s.changes);
            done.sections = Some(info.sections.len());
            done.extents = Some(changes().count());
            done.bytes = Some(changes().map(|c| c.length).sum());
            done.base_matched = Some(info.sections.iter().filter(|s| s.base_only).count());
            done.from = Some(info.from);
            done.to = info.to;
        }
        Target::Gateway { client, lun, .. } => {
            let b = std::fs::read(file).map_err(at)?;
            via_gateway(&mut rep.borrow_mut(), || client.apply_diff(lun, b))?;
        }
    }
    out.result("apply-diff", &done, || match &done.from {
        Some(from) => format!(
            "applied {} ({from} to {}) to {name}: {} LUN section(s), {} extent(s), {}{}\n",
            file.display(),
            done.to.as_deref().unwrap_or("now"),
            done.sections.unwrap_or(0),
            done.extents.unwrap_or(0),
            human(done.bytes.unwrap_or(0)),
            match done.base_matched {
                Some(n) if n > 0 => format!(
                    "; {n} onto another LUN whose disks hold the base {from} (disk extents only)"
                ),
                _ => String::new(),
            }
        ),
        None => format!("applied {} to {name}\n", file.display()),
    });
    Ok(())
}

pub fn usage(out: &Output, path: &Path) -> Res {
    let t = target(path)?;
    let list: Vec<wire::LayerUsage> = match &t {
        Target::Direct { group, .. } => group
            .usage()
            .into_iter()
            .map(|u| wire::LayerUsage {
                layer: u.layer,
                path: u.path,
                snapshot: u.snapshot,
                live: u.live,
                in_chain: u.in_chain,
                external: u.external,
                allocated_bytes: u.allocated_bytes,
                disk_bytes: u.disk_bytes,
            })
            .collect(),
        Target::Gateway { client, lun, .. } => client.usage(lun)?,
    };
    out.document(&list, || usage_text(t.name(), &list));
    Ok(())
}

fn usage_text(name: &str, list: &[wire::LayerUsage]) -> String {
    let mut o = format!(
        "{:<36}  {:<16} {:<13} {:>10} {:>10}\n",
        "LAYER", "SNAPSHOT", "ROLE", "ALLOCATED", "ON DISK"
    );
    let (mut own, mut shared) = (0, 0);
    for l in list {
        let role = if l.live {
            "live"
        } else if l.external {
            "shared (parent)"
        } else if l.in_chain {
            "in chain"
        } else {
            "not in chain"
        };
        if l.external {
            shared += l.disk_bytes;
        } else {
            own += l.disk_bytes;
        }
        let base = l.path.extension().is_none_or(|e| e != "delta");
        let _ = writeln!(
            o,
            "{:<36}  {:<16} {:<13} {:>10} {:>10}",
            l.layer.to_string(),
            l.snapshot
                .as_deref()
                .unwrap_or(if base { "(base)" } else { "-" }),
            role,
            human(l.allocated_bytes),
            human(l.disk_bytes)
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

/// Rebuild the manifest under the LUN's lock, then open the LUN as a
/// gateway would, to show it is whole again.
pub fn repair(out: &Output, path: &Path) -> Res {
    use lungate_block::volume::{repair, VolumeOptions};
    let _lock = owner::lock(path)?;
    let label = Lun::probe_label(path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Fail::from(format!("{}: {e}", path.display())))?;
    let cfg = lun_manager::lun::volume_config(
        path,
        std::sync::Arc::new(file),
        &label,
        VolumeOptions {
            cluster_size: label.volume_cluster_size(),
            read_only: false,
        },
    );
    let r = repair::rebuild_manifest(&cfg, &|p| Lun::probe_uuid(p).ok())
        .map_err(lun_manager::Error::from)?;
    let l = Lun::open(path, Access::ReadWrite).map_err(|e| {
        let f = Fail::from(e);
        Fail::new(
            f.exit,
            format!(
                "manifest rebuilt, but the LUN still does not open: {}",
                f.msg
            ),
        )
    })?;
    let snaps = l.volume().snapshots().len();
    drop(l);
    out.result("repair", &r, || {
        let mut o = format!(
            "rebuilt {} from {} layer(s): live layer {}, {snaps} snapshot(s): {}\n",
            r.dir.display(),
            r.layers,
            r.top,
            r.snapshots.join(", ")
        );
        if !r.recovered.is_empty() {
            let _ = writeln!(
                o,
                "named layers that had no snapshot name: {} (revert to them, or delete them with delete-snapshot)",
                r.recovered.join(", ")
            );
        }
        for p in &r.left_out {
            let _ = writeln!(o, "left out {} (empty, never committed)", p.display());
        }
        for p in &r.kept_aside {
            let _ = writeln!(o, "kept the damaged manifest slot as {}", p.display());
        }
        if r.dependents > 0 {
            let _ = writeln!(o, "{} clone(s) depend on these layers", r.dependents);
        }
        if !r.layouts_kept.is_empty() {
            let _ = writeln!(
                o,
                "kept the layouts of {} (taken before a resize) from the old manifest{}",
                r.layouts_kept.join(", "),
                if r.layouts_unchecked {
                    ", whose checksum failed: check their sizes with `lunctl snapshots`"
                } else {
                    ""
                }
            );
        }
        if !r.layouts_lost.is_empty() {
            let _ = writeln!(
                o,
                "the layouts of {} (taken before a resize) were in no readable manifest: \
                 reverting to or cloning them is refused; delete them with delete-snapshot",
                r.layouts_lost.join(", ")
            );
        }
        if !r.old_manifest_read && !r.snapshots.is_empty() {
            let _ = writeln!(
                o,
                "no old manifest slot was readable: a snapshot taken before a resize that did \
                 not enlarge the LUN now has the current sizes; if there was one, clone it \
                 and check the clone before you revert to it"
            );
        }
        o
    });
    Ok(())
}

/// Check every data checksum of the VM; exits "damaged" when a cluster
/// fails, after reporting which.
pub fn scrub(out: &Output, path: &Path) -> Res {
    let t = target(path)?;
    let mut rep = out.progress("scrub");
    let r = match &t {
        Target::Direct { group, .. } => {
            let r = group.scrub(&mut |p, d, tot| rep.update(p, d, tot));
            rep.finish();
            r?
        }
        Target::Gateway { client, lun, .. } => via_gateway(&mut rep, || client.scrub(lun))?,
    };
    out.document(&r, || scrub_text(&r));
    match r.error_count() {
        0 => Ok(()),
        n => Err(Fail::new(
            lungate_cli::Exit::Damaged,
            format!(
                "{}: {n} cluster{} fail their data checksum",
                t.name(),
                if n == 1 { "" } else { "s" }
            ),
        )),
    }
}

fn scrub_text(r: &wire::Scrub) -> String {
    let mut o = String::new();
    for l in &r.luns {
        let _ = writeln!(
            o,
            "{}: {} clusters ({}) checked in {} layer{}, {} not summed yet, {} without checksums, {} bad",
            l.path.display(),
            l.clusters_checked,
            human(l.bytes_checked),
            l.layers_checked,
            if l.layers_checked == 1 { "" } else { "s" },
            l.clusters_unsummed,
            if l.layers_without_checksums == 1 {
                "1 layer".to_string()
            } else {
                format!("{} layers", l.layers_without_checksums)
            },
            l.errors.len()
        );
        for e in &l.errors {
            let _ = writeln!(
                o,
                "  BAD cluster {} (LUN offset {}) in layer {} ({}): read by {}; intact copy in {}",
                e.cluster,
                e.offset,
                e.layer,
                match (&e.snapshot, e.live) {
                    (Some(s), _) => format!("snapshot {s}"),
                    (None, true) => "live".to_string(),
                    (None, false) => "unnamed".to_string(),
                },
                list_or(&e.affected, "no view"),
                list_or(&e.intact_in, "no snapshot"),
            );
        }
    }
    o
}

fn list_or(v: &[String], none: &str) -> String {
    if v.is_empty() {
        none.to_string()
    } else {
        v.join(", ")
    }
}

/// Who `lunctl owner` names: etcd's registration of the gateway, or the
/// `Owner` record a gateway holding the LUN's lock wrote (its own fields:
/// program, host, PID, start time, control socket).
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Holder {
    Etcd(etcd::Registration),
    Record(lungate_api::records::Owner),
}

/// `lunctl owner`: who serves the LUN. With `--coordinator`, for an RBD
/// LUN, etcd's owner (authoritative: a key bound to that gateway's lease);
/// otherwise what the LUN's lock and owner record say.
pub fn owner(out: &Output, path: &Path) -> Res {
    let label = Lun::probe_label(path)?;
    let (source, holder) = match etcd_owner(path)? {
        Some(r) => ("etcd", Some(Holder::Etcd(r))),
        None if COORDINATOR.get().is_some() && lun_manager::backing::is_rbd(path) => ("etcd", None),
        None => match owner::probe_record(path)? {
            (Probe::Free, _) => ("lock", None),
            (Probe::Gateway { .. }, Some(rec)) => ("record", Some(Holder::Record(rec))),
            (busy, _) => return Err(owner::busy_error(path, &busy).into()),
        },
    };
    let doc = serde_json::json!({
        "lun": label.name,
        "path": path.display().to_string(),
        "source": source,
        "owner": holder,
    });
    out.document(&doc, || match &holder {
        None => format!("{} is not served by any gateway ({source})\n", label.name),
        Some(Holder::Etcd(r)) => {
            let mut t = format!(
                "{} is served by {} (PID {} on {}; from {source})\n",
                label.name, r.name, r.pid, r.host
            );
            for l in &r.listen {
                let _ = writeln!(t, "  {l}");
            }
            t
        }
        Some(Holder::Record(r)) => {
            let mut t = format!(
                "{} is served by {} (PID {} on {}; from its owner record)\n",
                label.name, r.owner, r.pid, r.host
            );
            if let Some(c) = &r.control {
                let _ = writeln!(t, "  control unix {c}");
            }
            t
        }
    });
    Ok(())
}
