//! The discovery scanner: finds VM LUNs in pool directories, files and block
//! devices with no database, by partition-type GUID or footer magic plus the
//! label checksum. Secondary-disk LUNs and clones are attached to the VM
//! that references them instead of being listed as VMs of their own.
//!
//! The scanner only ever opens read-only and never panics on bad input: a
//! file that is not a LUN is skipped, a damaged one is listed with the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use uuid::Uuid;

use crate::error::Error;
use crate::format::state::{Identity, RecordType, SnapshotNode, SnapshotTree};
use crate::format::Layout;
use crate::lun::{Access, Lun};

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
    pub secondaries: Vec<SecondaryReport>,
    pub snapshots: Vec<SnapshotNode>,
    /// LUNs cloned from this VM, by name and UUID.
    pub clones: Vec<CloneReport>,
    pub warnings: Vec<String>,
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
}

#[derive(Debug, Clone, Serialize)]
pub struct CloneReport {
    pub name: String,
    pub disks: Vec<DiskReport>,
    pub uuid: Uuid,
    pub path: String,
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
                        if p.file_name().is_some_and(|n| n == crate::pool::MARKER) {
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
        secondaries: Vec::new(),
        snapshots: tree.snapshots.clone(),
        clones: Vec::new(),
        warnings,
    };
    Ok(Found {
        path: path.to_path_buf(),
        vm,
        secondary_uuids,
        clone_of: tree.clone_of.map(|c| (c.lun_uuid, c.snapshot)),
    })
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

/// Attach secondaries and clones to the VMs that reference them.
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
    let mut attached = BTreeSet::new();
    let mut vms: Vec<VmReport> = Vec::new();
    for (i, f) in found.iter().enumerate() {
        if by_uuid.get(&f.vm.uuid) != Some(&i) {
            continue;
        }
        let mut vm = f.vm.clone();
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
                    });
                }
            }
        }
        vms.push(vm);
    }
    // Clones hang under their parent VM (which may itself be a clone).
    let mut clone_of: BTreeMap<usize, (Uuid, String)> = BTreeMap::new();
    for (i, f) in found.iter().enumerate() {
        if let Some((parent, snap)) = &f.clone_of {
            if by_uuid.contains_key(parent) && by_uuid.get(&f.vm.uuid) == Some(&i) {
                clone_of.insert(i, (*parent, snap.clone()));
            }
        }
    }
    for (i, (parent, snap)) in &clone_of {
        let c = &found[*i].vm;
        if let Some(p) = vms.iter_mut().find(|v| v.uuid == *parent) {
            p.clones.push(CloneReport {
                name: c.name.clone(),
                disks: c.disks.clone(),
                uuid: c.uuid,
                path: c.path.clone(),
                snapshot: snap.clone(),
            });
        }
    }
    attached.extend(clone_of.keys().copied());
    let attached_uuids: BTreeSet<Uuid> = attached.iter().map(|&j| found[j].vm.uuid).collect();
    vms.retain(|v| !attached_uuids.contains(&v.uuid));
    vms.sort_by(|a, b| a.name.cmp(&b.name).then(a.path.cmp(&b.path)));
    report.vms = vms;
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
            },
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        (p, bytes)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(150))]
        /// Random corruption anywhere in the metadata (GPT, label slots,
        /// state directory, footer) never crashes the scanner, and a LUN
        /// is either reported, reported damaged or skipped — never lost
        /// silently while its label is intact.
        #[test]
        fn scanner_survives_random_metadata_corruption(
            truncate in any::<bool>(),
            hits in proptest::collection::vec((0u64..(21 * MIB), any::<u8>()), 1..24),
            cut in proptest::option::of(0u64..(21 * MIB)),
        ) {
            let d = tempfile::tempdir().unwrap();
            let layout = if truncate { Layout::Truncate } else { Layout::Offset };
            let (p, bytes) = make(d.path(), layout);
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
