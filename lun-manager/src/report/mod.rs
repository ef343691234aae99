//! Renderers for a [`ScanReport`]: a table for people (`lunctl scan`), JSON
//! for programs (`--json`: the report as is), and a self-contained HTML
//! page ([`html`]) with a card per VM.
//!
//! Both the table and the page draw each VM's snapshot tree from
//! [`tree_rows`], so they cannot disagree. Every node says whose it is: a
//! snapshot is `VM@SNAP`, the live LUN is `VM now`, and a clone is a node
//! naming the clone, which is a VM of its own with its own entry (its
//! snapshots and its `now` are drawn there, not under its parent).

mod html;

pub use html::html;

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::scan::{CloneRef, ScanReport, SnapshotReport, VmReport};
use crate::size::human;

/// One node of a VM's tree.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Node<'a> {
    /// A snapshot of the VM.
    Snapshot(&'a SnapshotReport),
    /// A VM cloned from the snapshot the node hangs under.
    Clone(&'a CloneRef),
    /// The VM's live LUN, continuing from the snapshot it hangs under.
    Now,
}

/// A node in drawing order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TreeRow<'a> {
    pub depth: usize,
    /// Row index of the node it hangs under.
    pub parent: Option<usize>,
    pub node: Node<'a>,
}

/// Deeper trees are drawn flat from here on (the report stays bounded and
/// readable on hostile input; no node is dropped).
pub(crate) const MAX_DEPTH: usize = 64;

/// The tree of `vm` in drawing order: each snapshot under the one it was
/// taken after, each clone under the snapshot it came from, and `now`
/// under the snapshot the live LUN continues from. Every snapshot and
/// clone of the VM appears exactly once, even when their recorded parents
/// form no tree (a cycle or a missing parent puts them at the top).
pub(crate) fn tree_rows(vm: &VmReport) -> Vec<TreeRow<'_>> {
    let mut rows: Vec<TreeRow<'_>> = Vec::new();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut stack: Vec<Work<'_>> = Vec::new();
    let mut roots_done = false;
    loop {
        if stack.is_empty() {
            if !roots_done {
                roots_done = true;
                push_under(vm, &mut stack, None, None, 0);
            } else if let Some(s) = vm
                .snapshots
                .iter()
                .find(|s| !seen.contains(s.name.as_str()))
            {
                // Its recorded parent is missing or on a cycle.
                stack.push(Work::Snapshot(s, None, 0));
            } else {
                break;
            }
            continue;
        }
        match stack.pop().expect("not empty") {
            Work::Now(at, depth) => rows.push(TreeRow {
                depth,
                parent: at,
                node: Node::Now,
            }),
            Work::Snapshot(s, at, depth) => {
                if !seen.insert(&s.name) {
                    continue;
                }
                let r = rows.len();
                rows.push(TreeRow {
                    depth,
                    parent: at,
                    node: Node::Snapshot(s),
                });
                let below = (depth + 1).min(MAX_DEPTH);
                for c in vm.clones.iter().filter(|c| c.snapshot == s.name) {
                    rows.push(TreeRow {
                        depth: below,
                        parent: Some(r),
                        node: Node::Clone(c),
                    });
                }
                push_under(vm, &mut stack, Some(&s.name), Some(r), below);
            }
        }
    }
    let live_drawn = vm
        .live_from
        .as_deref()
        .is_some_and(|l| vm.snapshots.iter().any(|s| s.name == l));
    if !live_drawn {
        rows.push(TreeRow {
            depth: 0,
            parent: None,
            node: Node::Now,
        });
    }
    // Clones of a snapshot deleted since (its layers are kept for them).
    for c in &vm.clones {
        if !vm.snapshots.iter().any(|s| s.name == c.snapshot) {
            rows.push(TreeRow {
                depth: 0,
                parent: None,
                node: Node::Clone(c),
            });
        }
    }
    rows
}

/// Work left in [`tree_rows`], on a stack (no recursion: a chain of
/// thousands of snapshots must not exhaust the stack).
enum Work<'a> {
    Snapshot(&'a SnapshotReport, Option<usize>, usize),
    Now(Option<usize>, usize),
}

/// Push what hangs under snapshot `parent` (drawn in this order: the
/// snapshots taken after it, then `now` if the live LUN continues from
/// it), in reverse.
fn push_under<'a>(
    vm: &'a VmReport,
    stack: &mut Vec<Work<'a>>,
    parent: Option<&str>,
    at: Option<usize>,
    depth: usize,
) {
    if parent.is_some() && parent == vm.live_from.as_deref() {
        stack.push(Work::Now(at, depth));
    }
    for s in vm
        .snapshots
        .iter()
        .rev()
        .filter(|s| s.parent.as_deref() == parent)
    {
        stack.push(Work::Snapshot(s, at, depth));
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

/// The space a snapshot's layer takes, for people.
pub(crate) fn space(s: &SnapshotReport) -> String {
    s.disk_bytes.map(human).unwrap_or_else(|| "? B".into())
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
        if let Some(p) = &vm.parent {
            let _ = writeln!(o, "  parent: {p} (a clone)");
        }
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
                    let from = s
                        .parent
                        .as_ref()
                        .map(|p| format!(" (clone of {p})"))
                        .unwrap_or_default();
                    let _ = writeln!(
                        o,
                        "  secondary: {} ({}) {} [{}]{from}",
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
            for row in tree_rows(vm) {
                let pad = "  ".repeat(row.depth + 2);
                let _ = match row.node {
                    Node::Snapshot(s) => {
                        let desc = if s.description.is_empty() {
                            String::new()
                        } else {
                            format!("  {:?}", s.description)
                        };
                        writeln!(
                            o,
                            "{pad}snapshot {}@{}  {}  {}{desc}",
                            vm.name,
                            s.name,
                            utc(s.created),
                            space(s)
                        )
                    }
                    Node::Clone(c) => writeln!(
                        o,
                        "{pad}clone {}  from {}@{}  {}",
                        c.name, vm.name, c.snapshot, c.path
                    ),
                    Node::Now => writeln!(o, "{pad}* {} now (live)", vm.name),
                };
            }
        }
        for w in &vm.warnings {
            let _ = writeln!(o, "  warning: {w}");
        }
    }
    if !r.damaged.is_empty() {
        let _ = writeln!(o, "\nDAMAGED");
        for d in &r.damaged {
            let _ = writeln!(o, "  {}: {}", d.path, d.reason);
        }
    }
    let clones = r.vms.iter().filter(|v| v.parent.is_some()).count();
    let _ = writeln!(
        o,
        "\n{} VM(s) ({clones} of them clones), {} damaged, {} other file(s) skipped",
        r.vms.len(),
        r.damaged.len(),
        r.skipped.len()
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Layout;
    use uuid::Uuid;

    fn snap(name: &str, parent: Option<&str>) -> SnapshotReport {
        SnapshotReport {
            name: name.into(),
            parent: parent.map(Into::into),
            created: 0,
            description: String::new(),
            disk_bytes: Some(4096),
        }
    }

    fn vm(snaps: Vec<SnapshotReport>, live: Option<&str>, clones: Vec<CloneRef>) -> VmReport {
        VmReport {
            name: "web".into(),
            uuid: Uuid::nil(),
            path: "p".into(),
            layout: Layout::Offset,
            lun_size: 0,
            vcpus: None,
            memory: None,
            disks: vec![],
            state_region: 0,
            parent: None,
            parent_uuid: None,
            secondaries: vec![],
            snapshots: snaps,
            live_from: live.map(Into::into),
            layers: None,
            clones,
            warnings: vec![],
        }
    }

    fn clone_of(name: &str, snap: &str) -> CloneRef {
        CloneRef {
            name: name.into(),
            uuid: Uuid::new_v4(),
            path: format!("{name}.lun"),
            snapshot: snap.into(),
        }
    }

    fn shape(v: &VmReport) -> Vec<String> {
        tree_rows(v)
            .iter()
            .map(|r| {
                let n = match r.node {
                    Node::Snapshot(s) => format!("s:{}", s.name),
                    Node::Clone(c) => format!("c:{}", c.name),
                    Node::Now => "now".into(),
                };
                format!("{}{n}", " ".repeat(r.depth))
            })
            .collect()
    }

    #[test]
    fn snapshots_nest_clones_hang_under_their_snapshot_and_now_is_drawn_once() {
        let v = vm(
            vec![
                snap("clean", None),
                snap("updated", Some("clean")),
                snap("exp", Some("clean")),
            ],
            Some("exp"),
            vec![clone_of("t", "clean"), clone_of("old", "gone")],
        );
        assert_eq!(
            shape(&v),
            ["s:clean", " c:t", " s:updated", " s:exp", "  now", "c:old"]
        );
    }

    #[test]
    fn snapshots_whose_parents_form_no_tree_are_still_drawn_once() {
        let v = vm(
            vec![
                snap("a", Some("b")),
                snap("b", Some("a")),
                snap("c", Some("x")),
            ],
            None,
            vec![],
        );
        let s = shape(&v);
        for n in ["s:a", "s:b", "s:c"] {
            assert_eq!(s.iter().filter(|x| x.trim() == n).count(), 1, "{s:?}");
        }
        assert_eq!(s.iter().filter(|x| x.trim() == "now").count(), 1, "{s:?}");
    }

    #[test]
    fn a_deep_chain_is_cut_in_indentation_only() {
        let mut snaps = vec![snap("s0", None)];
        for i in 1..300 {
            snaps.push(snap(&format!("s{i}"), Some(&format!("s{}", i - 1))));
        }
        let v = vm(snaps, Some("s299"), vec![]);
        let rows = tree_rows(&v);
        assert_eq!(rows.len(), 301);
        assert!(rows.iter().all(|r| r.depth <= MAX_DEPTH));
    }

    #[test]
    fn utc_is_the_civil_date() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_795_431_388), "2026-11-23 10:56:28 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
