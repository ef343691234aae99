//! Renderers for a [`ScanReport`]: a table for people, JSON for programs,
//! and a self-contained HTML page that draws each VM.

mod html;

pub use html::html;

use std::fmt::Write;

use crate::scan::ScanReport;
use crate::size::human;

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
        for s in &vm.snapshots {
            let _ = writeln!(
                o,
                "  snapshot: {}{}",
                s.name,
                s.parent
                    .as_ref()
                    .map(|p| format!(" (parent {p})"))
                    .unwrap_or_default()
            );
        }
        for c in &vm.clones {
            let _ = writeln!(
                o,
                "  clone: {} from snapshot {} at {}",
                c.name, c.snapshot, c.path
            );
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
    let _ = writeln!(
        o,
        "\n{} VM(s), {} damaged, {} other file(s) skipped",
        r.vms.len(),
        r.damaged.len(),
        r.skipped.len()
    );
    o
}
