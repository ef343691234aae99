//! Renderers for a [`ScanReport`]: a table for people, JSON for programs,
//! and a self-contained HTML page that draws each VM.

mod html;

pub use html::html;

use std::collections::BTreeSet;
use std::fmt::Write;

use uuid::Uuid;

use crate::format::state::SnapshotNode;
use crate::scan::{CloneReport, ScanReport, VmReport};
use crate::size::human;

/// One node of a VM's drawn tree: a snapshot, a clone, or the live LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TreeRow {
    pub depth: usize,
    /// Row index of the node it hangs under.
    pub parent: Option<usize>,
    pub kind: RowKind,
    pub label: String,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowKind {
    Snapshot,
    Clone,
    Now,
}

/// The snapshot tree of `vm` in drawing order: each snapshot under the one
/// it was taken after, each clone under the snapshot it came from (with its
/// own tree below it), and `now` under the snapshot the live LUN continues
/// from.
pub(crate) fn tree_rows(vm: &VmReport) -> Vec<TreeRow> {
    let mut t = Tree {
        clones: &vm.clones,
        seen: BTreeSet::from([vm.uuid]),
        rows: Vec::new(),
    };
    t.owner(vm.uuid, &vm.snapshots, vm.live_from.as_deref(), None, 0);
    t.rows
}

/// Deeper trees are cut (the report stays bounded on hostile input).
const MAX_DEPTH: usize = 128;

struct Tree<'a> {
    clones: &'a [CloneReport],
    /// Clones already drawn (a damaged lineage cannot loop).
    seen: BTreeSet<Uuid>,
    rows: Vec<TreeRow>,
}

impl<'a> Tree<'a> {
    fn push(
        &mut self,
        depth: usize,
        parent: Option<usize>,
        kind: RowKind,
        label: &str,
        detail: String,
    ) -> usize {
        self.rows.push(TreeRow {
            depth,
            parent,
            kind,
            label: label.to_string(),
            detail,
        });
        self.rows.len() - 1
    }

    /// The tree of one VM or clone, hanging under row `at`.
    fn owner(
        &mut self,
        owner: Uuid,
        snaps: &[SnapshotNode],
        live_from: Option<&str>,
        at: Option<usize>,
        depth: usize,
    ) {
        if depth > MAX_DEPTH {
            return;
        }
        self.under(owner, snaps, live_from, None, at, depth);
        if !snaps.iter().any(|s| Some(s.name.as_str()) == live_from) {
            self.push(depth, at, RowKind::Now, "now", "live".into());
        }
        // Clones of a snapshot deleted since (its layers are kept for them).
        let clones = self.clones;
        for c in clones
            .iter()
            .filter(|c| c.parent_uuid == owner && !snaps.iter().any(|s| s.name == c.snapshot))
        {
            self.clone_of(c, at, depth);
        }
    }

    /// Snapshots taken after `parent`, their clones and their subtrees.
    fn under(
        &mut self,
        owner: Uuid,
        snaps: &[SnapshotNode],
        live_from: Option<&str>,
        parent: Option<&str>,
        at: Option<usize>,
        depth: usize,
    ) {
        if depth > MAX_DEPTH {
            return;
        }
        for s in snaps.iter().filter(|s| s.parent.as_deref() == parent) {
            let r = self.push(depth, at, RowKind::Snapshot, &s.name, s.description.clone());
            let clones = self.clones;
            for c in clones
                .iter()
                .filter(|c| c.parent_uuid == owner && c.snapshot == s.name)
            {
                self.clone_of(c, Some(r), depth + 1);
            }
            self.under(owner, snaps, live_from, Some(&s.name), Some(r), depth + 1);
        }
        if parent.is_some() && parent == live_from {
            self.push(depth, at, RowKind::Now, "now", "live".into());
        }
    }

    fn clone_of(&mut self, c: &CloneReport, at: Option<usize>, depth: usize) {
        if !self.seen.insert(c.uuid) {
            return;
        }
        let r = self.push(
            depth,
            at,
            RowKind::Clone,
            &c.name,
            format!("from {}@{}  {}", c.parent, c.snapshot, c.path),
        );
        self.owner(
            c.uuid,
            &c.snapshots,
            c.live_from.as_deref(),
            Some(r),
            depth + 1,
        );
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// JSON, pretty-printed.
pub fn json(r: &ScanReport) -> String {
    serde_json::to_string_pretty(r).expect("report serialises")
}

/// A table for people.
pub fn table(r: &ScanReport) -> String {
    let mut o = String::new();
    if r.vms.is_empty() {
        o.push_str("no VMs found\n");
    } else {
        let _ = writeln!(
            o,
            "{:<20} {:<9} {:>6} {:>10}  {:<38} DISKS",
            "VM", "LAYOUT", "VCPUS", "MEMORY", "UUID"
        );
    }
    for vm in &r.vms {
        let disks: Vec<String> = vm
            .disks
            .iter()
            .map(|d| format!("disk{}={}", d.index, human(d.size)))
            .collect();
        let _ = writeln!(
            o,
            "{:<20} {:<9} {:>6} {:>10}  {:<38} {}",
            vm.name,
            vm.layout.to_string(),
            vm.vcpus
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".into()),
            vm.memory.map(human).unwrap_or_else(|| "?".into()),
            vm.uuid.to_string(),
            disks.join(" ")
        );
        let _ = writeln!(o, "  path: {}", vm.path);
        for d in &vm.disks {
            let _ = writeln!(
                o,
                "  disk{}: {} export {} id {}",
                d.index,
                human(d.size),
                d.export,
                d.id.as_deref().unwrap_or("?")
            );
        }
        for s in &vm.secondaries {
            match &s.path {
                Some(p) => {
                    let sizes: Vec<String> = s.disks.iter().map(|d| human(d.size)).collect();
                    let _ = writeln!(
                        o,
                        "  secondary: {} ({}) {} [{}]",
                        s.name,
                        s.uuid,
                        p,
                        sizes.join(", ")
                    );
                }
                None => {
                    let _ = writeln!(o, "  secondary: {} NOT FOUND", s.uuid);
                }
            }
        }
        if let Some(l) = &vm.layers {
            let _ = writeln!(
                o,
                "  layers: {} ({} layer(s), {} on disk)",
                l.dir,
                l.count,
                human(l.disk_bytes)
            );
        }
        if !vm.snapshots.is_empty() || !vm.clones.is_empty() {
            let _ = writeln!(o, "  snapshots and clones:");
            for r in tree_rows(vm) {
                let pad = "  ".repeat(r.depth + 2);
                let _ = match r.kind {
                    RowKind::Snapshot if r.detail.is_empty() => {
                        writeln!(o, "{pad}snapshot {}", r.label)
                    }
                    RowKind::Snapshot => writeln!(o, "{pad}snapshot {}  {:?}", r.label, r.detail),
                    RowKind::Clone => writeln!(o, "{pad}clone {}  {}", r.label, r.detail),
                    RowKind::Now => writeln!(o, "{pad}* now (live)"),
                };
            }
        }
        for w in &vm.warnings {
            let _ = writeln!(o, "  warning: {w}");
        }
        for c in &vm.clones {
            for w in &c.warnings {
                let _ = writeln!(o, "  warning: clone {}: {w}", c.name);
            }
        }
    }
    if !r.damaged.is_empty() {
        let _ = writeln!(o, "\nDAMAGED");
        for d in &r.damaged {
            let _ = writeln!(o, "  {}: {}", d.path, d.reason);
        }
    }
    let _ = writeln!(
        o,
        "\n{} VM(s), {} damaged, {} other file(s) skipped",
        r.vms.len(),
        r.damaged.len(),
        r.skipped.len()
    );
    o
}
