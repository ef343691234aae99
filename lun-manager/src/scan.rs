//! The discovery scanner: finds VM LUNs in pool directories, files and block
//! devices with no database, by partition-type GUID or footer magic plus the
//! label checksum. Secondary-disk LUNs are attached to the VM that
//! references them instead of being listed as VMs of their own. A clone is
//! a VM with its own identity: it is listed as one, with `parent` naming
//! the VM and snapshot it came from (`web@clean`), and its parent lists it
//! among its `clones`.
//!
//! A LUN's snapshot layers live in `NAME.layers/` beside it; the scanner
//! reads that directory's manifest for the snapshot tree (with the space
//! each snapshot's layer takes) and, for a clone, the snapshot of which VM
//! it came from. Files inside a layers directory are never LUN candidates.
//!
//! The scanner only ever reads (it never replays a journal, removes an
//! orphan or rewrites a manifest) and never panics on bad input: a file
//! that is not a LUN is skipped, a damaged one (label, state or manifest) is
//! listed with the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use uuid::Uuid;

use crate::error::Error;
use crate::format::state::{Identity, RecordType, SnapshotTree};
use crate::format::Layout;
use crate::lun::{Access, Lun};
use lungate_block::volume::manifest::{self, Manifest, Parent};

#[derive(Debug, Clone, Serialize)]
pub struct ScanReport {
    /// The paths the scan was asked to look at.
    pub roots: Vec<String>,
    pub vms: Vec<VmReport>,
    pub damaged: Vec<Damaged>,
    /// Files that are not LUNs.
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    pub name: String,
    pub uuid: Uuid,
    pub path: String,
    pub layout: Layout,
    pub lun_size: u64,
    pub vcpus: Option<u32>,
    pub memory: Option<u64>,
    pub disks: Vec<DiskReport>,
    pub state_region: u64,
    /// For a clone: `VM@SNAP`, the VM and snapshot it was cloned from (the
    /// VM by its LUN UUID when it was not in the scanned paths).
    pub parent: Option<String>,
    /// The LUN UUID of the VM named in `parent`.
    pub parent_uuid: Option<Uuid>,
    pub secondaries: Vec<SecondaryReport>,
    /// Oldest first; each names the snapshot it was taken after.
    pub snapshots: Vec<SnapshotReport>,
    /// The snapshot the live LUN continues from, if any.
    pub live_from: Option<String>,
    /// The snapshot layers directory, when there is one.
    pub layers: Option<LayersReport>,
    /// VMs cloned from this VM's snapshots (each is in the report's `vms`
    /// too, with `parent` naming this VM).
    pub clones: Vec<CloneRef>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    pub name: String,
    /// The snapshot it was taken after.
    pub parent: Option<String>,
    /// Unix seconds.
    pub created: u64,
    pub description: String,
    /// Bytes its layer occupies on disk (for the first snapshot, whose
    /// layer is the LUN file itself: the whole file's). `None` when the
    /// layer's file could not be measured.
    pub disk_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayersReport {
    pub dir: String,
    /// Delta layers the manifest lists.
    pub count: usize,
    /// Bytes the listed delta files occupy on disk.
    pub disk_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub index: u32,
    pub size: u64,
    pub offset: u64,
    /// 16-byte disk identity, hex.
    pub id: Option<String>,
    pub export: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SecondaryReport {
    pub uuid: Uuid,
    pub name: String,
    /// Where the scan found it; `None` when it was not in the scanned paths.
    pub path: Option<String>,
    pub disks: Vec<DiskReport>,
    /// When the secondary disk's LUN is itself a clone (the secondary of a
    /// cloned VM): `LUN@SNAP` it came from.
    pub parent: Option<String>,
}

/// A clone of one of a VM's snapshots, as its parent lists it.
#[derive(Debug, Clone, Serialize)]
pub struct CloneRef {
    pub name: String,
    pub uuid: Uuid,
    pub path: String,
    /// The parent's snapshot it was cloned from.
    pub snapshot: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Damaged {
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Everything the scan learned about one LUN before grouping.
struct Found {
    path: PathBuf,
    vm: VmReport,
    secondary_uuids: Vec<Uuid>,
    clone_of: Option<(Uuid, String)>,
}

pub use lungate_block::store::file::layers_dir;

fn in_layers_dir(p: &Path) -> bool {
    let Some(dir) = p.parent() else {
        return false;
    };
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".layers"));
    let own_file = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".delta") || n.starts_with("manifest."));
    named
        && (own_file
            || manifest::slot_path(dir, 0).exists()
            || manifest::slot_path(dir, 1).exists())
}

/// Scan `roots`: directories (their entries, not recursively), regular
/// files and block devices.
pub fn scan(roots: &[PathBuf]) -> ScanReport {
    let mut report = ScanReport {
        roots: roots.iter().map(|p| p.display().to_string()).collect(),
        vms: Vec::new(),
        damaged: Vec::new(),
        skipped: Vec::new(),
    };
    let mut candidates = BTreeSet::new();
    for root in roots {
        if crate::backing::is_rbd(root) {
            rbd_root(root, &mut candidates, &mut report);
            continue;
        }
        match std::fs::metadata(root) {
            Err(e) => report.skipped.push(Skipped {
                path: root.display().to_string(),
                reason: format!("cannot stat: {e}"),
            }),
            Ok(md) if md.is_dir() => match std::fs::read_dir(root) {
                Err(e) => report.skipped.push(Skipped {
                    path: root.display().to_string(),
                    reason: format!("cannot list: {e}"),
                }),
                Ok(rd) => {
                    for e in rd.filter_map(|e| e.ok()) {
                        let p = e.path();
                        if p.file_name().is_some_and(|n| n == crate::pool::MARKER)
                            || in_layers_dir(&p)
                        {
                            continue;
                        }
                        match std::fs::metadata(&p) {
                            Ok(m) if m.is_file() || m.file_type().is_block_device() => {
                                candidates.insert(p);
                            }
                            _ => {}
                        }
                    }
                }
            },
            Ok(md) if md.is_file() && in_layers_dir(root) => {}
            Ok(md) if md.is_file() || md.file_type().is_block_device() => {
                candidates.insert(root.clone());
            }
            Ok(_) => report.skipped.push(Skipped {
                path: root.display().to_string(),
                reason: "not a file, directory or block device".into(),
            }),
        }
    }
    let mut found: Vec<Found> = Vec::new();
    for path in candidates {
        // The gpt crate is third-party code reading untrusted bytes: a
        // panic inside it must not take the scan down.
        let probe = std::panic::catch_unwind(|| probe(&path));
        match probe {
            Ok(Ok(f)) => found.push(f),
            Ok(Err(Error::NotALun { why, .. })) => report.skipped.push(Skipped {
                path: path.display().to_string(),
                reason: why,
            }),
            Ok(Err(Error::Damaged { why, .. })) => report.damaged.push(Damaged {
                path: path.display().to_string(),
                reason: why,
            }),
            Ok(Err(e)) => report.damaged.push(Damaged {
                path: path.display().to_string(),
                reason: strip_path(&e.to_string(), &path),
            }),
            Err(_) => report.damaged.push(Damaged {
                path: path.display().to_string(),
                reason: "unreadable structure (the parser gave up)".into(),
            }),
        }
    }
    group(&mut report, found);
    report
}

/// An RBD root: one LUN image (`rbd:POOL[/NS]/NAME.lun`) or the `*.lun`
/// images of a pool (`rbd:POOL[/NS]`).
fn rbd_root(root: &Path, candidates: &mut BTreeSet<PathBuf>, report: &mut ScanReport) {
    let s = root.to_string_lossy();
    let head = s.split(':').nth(1).unwrap_or_default();
    if head.ends_with(&format!(".{}", crate::pool::EXT)) {
        candidates.insert(root.to_path_buf());
        return;
    }
    match crate::pool::list_luns(root) {
        Ok(luns) => candidates.extend(luns),
        Err(e) => report.skipped.push(Skipped {
            path: root.display().to_string(),
            reason: format!("cannot list: {e}"),
        }),
    }
}

fn strip_path(msg: &str, path: &Path) -> String {
    let p = format!("{}: ", path.display());
    msg.strip_prefix(&p).unwrap_or(msg).to_string()
}

fn probe(path: &Path) -> Result<Found, Error> {
    let lun = Lun::open(path, Access::ReadOnly)?;
    let mut warnings: Vec<String> = lun.warnings().to_vec();
    for (rec, problem) in lun.verify_records() {
        if let Some(p) = problem {
            warnings.push(format!("record {rec}: {}", strip_path(&p, path)));
        }
    }
    let hw = lun.hardware().ok();
    let ident: Option<Identity> = lun.record_json(RecordType::Identity, 0).ok().flatten();
    let tree: SnapshotTree = lun
        .record_json(RecordType::SnapshotTree, 0)
        .ok()
        .flatten()
        .unwrap_or_default();
    let secondary_uuids = lun
        .secondaries()
        .map(|s| s.disks.iter().map(|d| d.lun_uuid).collect())
        .unwrap_or_default();
    let layers = read_layers(path, &lun).map_err(|why| Error::Damaged {
        path: path.to_path_buf(),
        why,
    })?;
    let (snapshots, live_from, layers_report, clone_of) = match layers {
        Some(l) => {
            warnings.extend(l.warnings);
            let (snaps, live) = snapshot_tree(&l.manifest, &layers_dir(path), path);
            let pool = path.parent().unwrap_or(Path::new("."));
            let clone_of = match clone_source(&l.manifest, pool) {
                Ok(c) => c,
                Err(w) => {
                    warnings.push(w);
                    None
                }
            };
            (snaps, live, Some(l.report), clone_of)
        }
        // An RBD LUN's tree is its image's RBD snapshots, described by the
        // volume (the manifest it keeps in the image's metadata).
        None if lun.is_rbd() => {
            let snaps = lun.volume().snapshots();
            let live = snaps.iter().find(|s| s.current).map(|s| s.name.clone());
            (
                snaps
                    .into_iter()
                    .map(|n| SnapshotReport {
                        name: n.name,
                        parent: n.parent,
                        created: n.created,
                        description: n.description,
                        disk_bytes: None,
                    })
                    .collect(),
                live,
                None,
                tree.clone_of.map(|c| (c.lun_uuid, c.snapshot)),
            )
        }
        None => (
            tree.snapshots
                .iter()
                .map(|n| SnapshotReport {
                    name: n.name.clone(),
                    parent: n.parent.clone(),
                    created: n.created,
                    description: n.description.clone(),
                    disk_bytes: None,
                })
                .collect(),
            None,
            None,
            tree.clone_of.map(|c| (c.lun_uuid, c.snapshot)),
        ),
    };
    let vm = VmReport {
        name: lun.name().to_string(),
        uuid: lun.uuid(),
        path: path.display().to_string(),
        layout: lun.layout(),
        lun_size: lun.label().lun_size,
        vcpus: hw.as_ref().map(|h| h.vcpus),
        memory: hw.as_ref().map(|h| h.memory_bytes),
        disks: disk_reports(&lun, ident.as_ref()),
        state_region: lun.label().state_region().length,
        parent: None,
        parent_uuid: None,
        secondaries: Vec::new(),
        snapshots,
        live_from,
        layers: layers_report,
        clones: Vec::new(),
        warnings,
    };
    Ok(Found {
        path: path.to_path_buf(),
        vm,
        secondary_uuids,
        clone_of,
    })
}

struct Layers {
    manifest: Manifest,
    report: LayersReport,
    warnings: Vec<String>,
}

/// Read `NAME.layers/` (read-only). `Err` is why the LUN cannot be used: a
/// manifest with no valid slot, or one that belongs to another LUN.
fn read_layers(path: &Path, lun: &Lun) -> Result<Option<Layers>, String> {
    let dir = layers_dir(path);
    if !dir.is_dir() {
        return Ok(None);
    }
    let shown = dir.display().to_string();
    let loaded = match manifest::load(&dir) {
        Ok(Some(l)) => l,
        // The volume refuses a directory whose layers lost their manifest,
        // so an empty one is all that is left here: no snapshots.
        Ok(None) => return Ok(None),
        Err(e) => {
            return Err(format!(
                "snapshot layers: {}",
                strip_path(&e.to_string(), &dir)
            ))
        }
    };
    let m = loaded.manifest;
    if m.lun != lun.uuid() || m.size != lun.label().lun_size {
        return Err(format!(
            "snapshot layers {shown} are for LUN {} of {} bytes, not this LUN ({} of {} bytes)",
            m.lun,
            m.size,
            lun.uuid(),
            lun.label().lun_size
        ));
    }
    let mut warnings: Vec<String> = loaded
        .warnings
        .iter()
        .map(|w| format!("snapshot layers: {w}"))
        .collect();
    let mut disk_bytes = 0;
    for l in &m.layers {
        let f = dir.join(format!("{}.delta", l.id));
        match std::fs::metadata(&f) {
            Ok(md) => disk_bytes += std::os::unix::fs::MetadataExt::blocks(&md) * 512,
            Err(e) => warnings.push(format!("snapshot layer {}: {e}", f.display())),
        }
    }
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.filter_map(|e| e.ok()) {
            let n = e.file_name();
            let Some(stem) = n.to_str().and_then(|n| n.strip_suffix(".delta")) else {
                continue;
            };
            if Uuid::parse_str(stem).is_ok_and(|id| m.layer(id).is_none()) {
                warnings.push(format!(
                    "{}: an uncommitted layer (removed at the next read-write open)",
                    e.path().display()
                ));
            }
        }
    }
    if m.flatten.is_some() {
        warnings.push("an interrupted flatten (lunctl flatten resumes it)".into());
    }
    Ok(Some(Layers {
        report: LayersReport {
            dir: shown,
            count: m.layers.len(),
            disk_bytes,
        },
        manifest: m,
        warnings,
    }))
}

/// The parent of a layer inside this manifest (the base's parent is none).
fn parent_in(m: &Manifest, id: Uuid) -> Option<Uuid> {
    if id == m.lun {
        return None;
    }
    match &m.layer(id)?.parent {
        Parent::Base => Some(m.lun),
        Parent::Layer { id } => Some(*id),
        Parent::None | Parent::External { .. } => None,
    }
}

/// The nearest named layer strictly above `id` (towards the base).
fn named_above(m: &Manifest, id: Uuid) -> Option<String> {
    let mut at = parent_in(m, id);
    for _ in 0..=m.layers.len() + 1 {
        let x = at?;
        if let Some(s) = m.snapshots.iter().find(|s| s.layer == x) {
            return Some(s.name.clone());
        }
        at = parent_in(m, x);
    }
    None
}

/// Bytes a file occupies on disk.
fn on_disk(p: &Path) -> Option<u64> {
    std::fs::metadata(p)
        .ok()
        .map(|md| std::os::unix::fs::MetadataExt::blocks(&md) * 512)
}

/// Snapshots with their parents and the space of their layers (in `dir`,
/// or the LUN file at `lun` for the base), and the one the live layer
/// continues from.
fn snapshot_tree(m: &Manifest, dir: &Path, lun: &Path) -> (Vec<SnapshotReport>, Option<String>) {
    let nodes = m
        .snapshots
        .iter()
        .map(|s| SnapshotReport {
            name: s.name.clone(),
            parent: named_above(m, s.layer),
            created: s.created,
            description: s.description.clone(),
            disk_bytes: if s.layer == m.lun {
                on_disk(lun)
            } else {
                on_disk(&dir.join(format!("{}.delta", s.layer)))
            },
        })
        .collect();
    let live = if m.layer(m.top).is_some() {
        named_above(m, m.top)
    } else {
        None
    };
    (nodes, live)
}

/// For a clone: the LUN UUID and snapshot name it was cloned from, read from
/// the parent's manifest. `Err` is a warning (the parent's layers are gone
/// or damaged).
fn clone_source(m: &Manifest, pool: &Path) -> Result<Option<(Uuid, String)>, String> {
    let mut at = m.top;
    for _ in 0..=m.layers.len() {
        let Some(l) = m.layer(at) else {
            return Ok(None);
        };
        match &l.parent {
            Parent::Layer { id } => at = *id,
            Parent::External { dir, id, lun } => {
                let dir = &lungate_block::store::file::resolve_peer(pool, dir, *lun)
                    .map_err(|e| e.to_string())?;
                let pm = match manifest::load(dir) {
                    Ok(Some(p)) => p.manifest,
                    Ok(None) => {
                        return Err(format!(
                            "clone of a snapshot in {}, which holds no manifest",
                            dir.display()
                        ))
                    }
                    Err(e) => return Err(format!("clone of a snapshot in {}: {e}", dir.display())),
                };
                let snap = pm
                    .snapshots
                    .iter()
                    .find(|s| s.layer == *id)
                    .map(|s| s.name.clone())
                    .unwrap_or_else(|| "(deleted snapshot)".into());
                return Ok(Some((pm.lun, snap)));
            }
            Parent::Base | Parent::None => return Ok(None),
        }
    }
    Ok(None)
}

fn disk_reports(lun: &Lun, ident: Option<&Identity>) -> Vec<DiskReport> {
    lun.disks()
        .iter()
        .map(|d| DiskReport {
            index: d.index,
            size: d.length,
            offset: d.offset,
            id: ident
                .and_then(|i| i.disks.iter().find(|x| x.index == d.index))
                .map(|x| x.id.clone()),
            export: format!("{}/disk{}", lun.name(), d.index),
        })
        .collect()
}

/// Attach secondaries to the VMs that reference them, name each clone's
/// parent and list it among its parent's clones, and order the VMs so each
/// clone follows the VM it came from.
fn group(report: &mut ScanReport, found: Vec<Found>) {
    let mut by_uuid: BTreeMap<Uuid, usize> = BTreeMap::new();
    for (i, f) in found.iter().enumerate() {
        if let Some(&first) = by_uuid.get(&f.vm.uuid) {
            report.damaged.push(Damaged {
                path: f.path.display().to_string(),
                reason: format!(
                    "same LUN UUID {} as {}: a byte copy; give one a new identity before use",
                    f.vm.uuid,
                    found[first].path.display()
                ),
            });
        } else {
            by_uuid.insert(f.vm.uuid, i);
        }
    }
    let unique = |i: usize| by_uuid.get(&found[i].vm.uuid) == Some(&i);
    // `VM@SNAP` of a clone, by the parent's name when it was scanned.
    let parent_of = |i: usize| {
        found[i].clone_of.as_ref().map(|(p, snap)| {
            let who = match by_uuid.get(p) {
                Some(&j) if j != i => found[j].vm.name.clone(),
                _ => p.to_string(),
            };
            (format!("{who}@{snap}"), *p)
        })
    };
    let mut attached = BTreeSet::new();
    let mut vms: Vec<(usize, VmReport)> = Vec::new();
    for (i, f) in found.iter().enumerate() {
        if !unique(i) {
            continue;
        }
        let mut vm = f.vm.clone();
        if let Some((parent, uuid)) = parent_of(i) {
            vm.parent = Some(parent);
            vm.parent_uuid = Some(uuid);
        }
        for u in &f.secondary_uuids {
            match by_uuid.get(u) {
                Some(&j) => {
                    attached.insert(j);
                    let s = &found[j].vm;
                    vm.secondaries.push(SecondaryReport {
                        uuid: *u,
                        name: s.name.clone(),
                        path: Some(s.path.clone()),
                        disks: s.disks.clone(),
                        parent: parent_of(j).map(|p| p.0),
                    });
                }
                None => {
                    vm.warnings.push(format!(
                        "secondary disk LUN {u} was not found in the scanned paths"
                    ));
                    vm.secondaries.push(SecondaryReport {
                        uuid: *u,
                        name: String::new(),
                        path: None,
                        disks: Vec::new(),
                        parent: None,
                    });
                }
            }
        }
        vms.push((i, vm));
    }
    vms.retain(|(i, _)| !attached.contains(i));
    // A clone names its parent; the parent (when it is a VM here) lists it.
    let index: BTreeMap<usize, usize> = vms.iter().enumerate().map(|(k, (i, _))| (*i, k)).collect();
    let mut children: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for k in 0..vms.len() {
        let i = vms[k].0;
        let Some((p, snap)) = &found[i].clone_of else {
            continue;
        };
        match by_uuid.get(p).filter(|&&j| j != i) {
            Some(j) => {
                if let Some(&pk) = index.get(j) {
                    let c = &vms[k].1;
                    let r = CloneRef {
                        name: c.name.clone(),
                        uuid: c.uuid,
                        path: c.path.clone(),
                        snapshot: snap.clone(),
                    };
                    vms[pk].1.clones.push(r);
                    children.entry(pk).or_default().push(k);
                }
            }
            None => vms[k].1.warnings.push(format!(
                "clone of snapshot {snap} of LUN {p}, which was not found in the scanned paths"
            )),
        }
    }
    let key = |v: &VmReport| (v.name.clone(), v.path.clone());
    for v in &mut vms {
        v.1.clones
            .sort_by(|a, b| a.name.cmp(&b.name).then(a.path.cmp(&b.path)));
    }
    for c in children.values_mut() {
        c.sort_by_key(|&k| key(&vms[k].1));
    }
    // Roots by name, each followed by its clones, depth first. A VM on a
    // lineage cycle (damaged records) has no root: it goes last.
    let is_child: BTreeSet<usize> = children.values().flatten().copied().collect();
    let mut roots: Vec<usize> = (0..vms.len()).filter(|k| !is_child.contains(k)).collect();
    roots.sort_by_key(|&k| key(&vms[k].1));
    let mut order = Vec::with_capacity(vms.len());
    let mut placed = BTreeSet::new();
    let mut stack: Vec<usize> = roots.into_iter().rev().collect();
    while let Some(k) = stack.pop() {
        if !placed.insert(k) {
            continue;
        }
        order.push(k);
        if let Some(c) = children.get(&k) {
            stack.extend(c.iter().rev());
        }
    }
    let mut rest: Vec<usize> = (0..vms.len()).filter(|k| !placed.contains(k)).collect();
    rest.sort_by_key(|&k| key(&vms[k].1));
    order.extend(rest);
    let mut slots: Vec<Option<VmReport>> = vms.into_iter().map(|(_, v)| Some(v)).collect();
    report.vms = order
        .into_iter()
        .map(|k| slots[k].take().expect("each VM once"))
        .collect();
    report.damaged.sort_by(|a, b| a.path.cmp(&b.path));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Layout, MIB};
    use crate::lun::CreateSpec;
    use proptest::prelude::*;
    use std::os::unix::fs::FileExt;

    fn make(dir: &Path, layout: Layout) -> (PathBuf, Vec<u8>) {
        let p = dir.join(format!("{layout}.lun"));
        Lun::create(
            &p,
            &CreateSpec {
                name: "f".into(),
                disks: vec![2 * MIB],
                memory: 0,
                vcpus: 1,
                layout,
                cluster_size: 0,
                checksums: false,
            },
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        (p, bytes)
    }

    fn snapshotted(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.lun"));
        Lun::create(
            &p,
            &CreateSpec {
                name: name.into(),
                disks: vec![2 * MIB],
                memory: 0,
                vcpus: 1,
                layout: Layout::Offset,
                cluster_size: 0,
                checksums: false,
            },
        )
        .unwrap();
        let l = Lun::open(&p, Access::ReadWrite).unwrap();
        let v = lungate_block::volume::Volume::open(l.volume_config(Default::default())).unwrap();
        v.snapshot("s1", "").unwrap();
        v.snapshot("s2", "").unwrap();
        v.close().unwrap();
        p
    }

    #[test]
    fn damaged_manifest_is_a_reason_and_the_scan_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = snapshotted(d.path(), "vm");
        let dir = layers_dir(&p);
        let r = scan(&[d.path().to_path_buf()]);
        assert_eq!(r.vms[0].snapshots.len(), 2);
        assert_eq!(r.vms[0].snapshots[1].parent.as_deref(), Some("s1"));
        assert_eq!(r.vms[0].live_from.as_deref(), Some("s2"));
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        // One damaged slot: a warning, the other slot is used.
        let s0 = manifest::slot_path(&dir, 0);
        let mut b = std::fs::read(&s0).unwrap();
        b[70] ^= 1;
        std::fs::write(&s0, &b).unwrap();
        let r = scan(&[d.path().to_path_buf()]);
        assert_eq!(r.vms.len(), 1);
        assert!(r.vms[0].warnings.iter().any(|w| w.contains("checksum")));
        assert_eq!(std::fs::read(&s0).unwrap(), b, "the scanner never repairs");
        // Both damaged: the LUN is listed as damaged with the reason.
        let s1 = manifest::slot_path(&dir, 1);
        std::fs::write(&s1, b"garbage").unwrap();
        let r = scan(&[d.path().to_path_buf()]);
        assert!(r.vms.is_empty());
        assert!(
            r.damaged[0].reason.contains("no valid manifest slot"),
            "{:?}",
            r.damaged
        );
        // Scanning inside the layers directory finds and skips nothing.
        let r = scan(&[dir.clone(), s1]);
        assert!(r.vms.is_empty() && r.skipped.is_empty() && r.damaged.is_empty());
    }

    #[test]
    fn a_clone_whose_parent_was_not_scanned_is_a_vm_with_a_warning() {
        // A clone lives in its parent's pool; scanning only the clone's
        // file leaves the parent unscanned.
        let a = tempfile::tempdir().unwrap();
        let src = snapshotted(a.path(), "src");
        let dst = a.path().join("dst.lun");
        let sl = Lun::open(&src, Access::ReadWrite).unwrap();
        sl.clone_from_snapshot("s1", &dst, "dst", uuid::Uuid::new_v4(), None)
            .unwrap();
        drop(sl);
        let r = scan(std::slice::from_ref(&dst));
        assert_eq!(r.vms[0].name, "dst");
        assert!(
            r.vms[0]
                .warnings
                .iter()
                .any(|w| w.contains("clone of snapshot s1")),
            "{:?}",
            r.vms[0].warnings
        );
        assert_eq!(
            r.vms[0].parent.as_deref(),
            Some(format!("{}@s1", r.vms[0].parent_uuid.unwrap()).as_str()),
            "an unscanned parent is named by its LUN UUID"
        );
        let r = scan(&[a.path().to_path_buf()]);
        let names: Vec<&str> = r.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["src", "dst"], "a clone is a VM, after its parent");
        assert_eq!(r.vms[0].clones[0].name, "dst");
        assert_eq!(r.vms[0].clones[0].snapshot, "s1");
        assert_eq!(r.vms[1].parent.as_deref(), Some("src@s1"));
        assert_eq!(r.vms[1].parent_uuid, Some(r.vms[0].uuid));
        assert!(r.vms[1].warnings.is_empty(), "{:?}", r.vms[1].warnings);
        let rows = crate::report::table(&r);
        assert!(rows.contains("clone dst  from src@s1"), "{rows}");
        assert!(rows.contains("parent: src@s1"), "{rows}");
        assert!(rows.contains("* src now (live)"), "{rows}");
    }

    #[test]
    fn an_aligned_lun_is_found_by_its_gpt_and_reported_like_the_others() {
        let d = tempfile::tempdir().unwrap();
        let (p, _) = make(d.path(), Layout::Aligned);
        let r = scan(&[d.path().to_path_buf()]);
        assert_eq!(r.vms.len(), 1, "{:?}", r.damaged);
        let vm = &r.vms[0];
        assert_eq!(vm.layout, Layout::Aligned);
        assert_eq!((vm.disks[0].offset, vm.disks[0].size), (0, 2 * MIB));
        assert!(vm.warnings.is_empty(), "{:?}", vm.warnings);
        // Both label slots in the first MiB damaged: listed as damaged,
        // with the reason, never skipped as "not a LUN".
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        for at in crate::format::ALIGNED_LABEL_SLOTS {
            f.write_all_at(b"garbage!", at + 64).unwrap();
        }
        drop(f);
        let r = scan(&[d.path().to_path_buf()]);
        assert!(r.vms.is_empty() && r.skipped.is_empty());
        assert!(
            r.damaged[0]
                .reason
                .contains("aligned label in the first MiB"),
            "{:?}",
            r.damaged
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random bytes in both manifest slots never crash the scanner.
        #[test]
        fn scanner_survives_random_manifests(
            junk in proptest::collection::vec(any::<u8>(), 0..400),
            hits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8),
        ) {
            let d = tempfile::tempdir().unwrap();
            let p = snapshotted(d.path(), "m");
            let dir = layers_dir(&p);
            let s0 = manifest::slot_path(&dir, 0);
            let mut b = std::fs::read(&s0).unwrap();
            for (at, v) in &hits {
                let n = b.len();
                b[at % n] = *v;
            }
            std::fs::write(&s0, &b).unwrap();
            std::fs::write(manifest::slot_path(&dir, 1), &junk).unwrap();
            let r = scan(&[d.path().to_path_buf()]);
            prop_assert_eq!(r.vms.len() + r.damaged.len(), 1);
            prop_assert!(r.skipped.is_empty());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(150))]
        /// Random corruption anywhere in the metadata (GPT, label slots,
        /// state directory, footer) never crashes the scanner, and a LUN
        /// is either reported, reported damaged or skipped — never lost
        /// silently while its label is intact.
        #[test]
        fn scanner_survives_random_metadata_corruption(
            layout in 0usize..3,
            hits in proptest::collection::vec((0u64..(21 * MIB), any::<u8>()), 1..24),
            cut in proptest::option::of(0u64..(21 * MIB)),
        ) {
            let d = tempfile::tempdir().unwrap();
            let (p, bytes) = make(d.path(), Layout::ALL[layout]);
            let len = bytes.len() as u64;
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            for (at, v) in &hits {
                // Aim at the metadata: the first 4 MiB and the last MiB.
                let at = if at % 2 == 0 { at % (4 * MIB) } else { len - 1 - (at % MIB) };
                f.write_all_at(&[*v], at).unwrap();
            }
            if let Some(c) = cut {
                f.set_len(c.min(len)).unwrap();
            }
            drop(f);
            let r = scan(&[d.path().to_path_buf()]);
            prop_assert_eq!(r.vms.len() + r.damaged.len() + r.skipped.len(), 1);
        }
    }
}
