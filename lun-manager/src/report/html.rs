//! The HTML scan report: one self-contained page (inline CSS, no scripts,
//! no external resources) an operator opens in a browser. It holds
//!
//! * a summary and the **VM list** (clones included, each with its
//!   `parent: VM@SNAP`), every name linking to its card;
//! * a **card per VM**: identity, disks (a bar per disk, by size),
//!   secondary disks, and the snapshot tree drawn as a graph of nested
//!   nodes where every node says whose it is (`web@clean`, `web now`, a
//!   clone node linking to the clone's own card), snapshots with their
//!   time, description and space used;
//! * the **damaged LUNs** with their reasons, and the **other files**
//!   (not LUNs) with why they were skipped.
//!
//! The layout wraps instead of overflowing (long paths and UUIDs break,
//! deep trees stop indenting at [`NEST_MAX`]), so it fits a 1280 px
//! window; `tests/report_browser.rs` checks that in a real Chromium. Its
//! elements carry `data-*` attributes (`data-vm`, `data-kind`,
//! `data-owner`, `data-name`, `data-path`) so a test can find each thing
//! the report must show and then check what a person sees there.

use std::collections::BTreeMap;
use std::fmt::Write;

use uuid::Uuid;

use super::{space, tree_rows, utc, Node, TreeRow};
use crate::scan::{ScanReport, VmReport};
use crate::size::human;

/// Tree levels indented; deeper nodes are drawn at this level, each
/// naming the node it hangs under.
pub(crate) const NEST_MAX: usize = 12;

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const CSS: &str = "\
*{box-sizing:border-box}\
body{font-family:system-ui,'DejaVu Sans',sans-serif;margin:0;background:#f6f7f9;color:#1d2329;line-height:1.4}\
main{max-width:1200px;margin:0 auto;padding:1.2em 1.5em}\
h1{font-size:1.45em;margin:.2em 0}h2{font-size:1.2em;margin:0 0 .3em}h3{font-size:1em;margin:1em 0 .4em;color:#3b4650}\
a{color:#1f5fd1}code{font-family:'DejaVu Sans Mono',ui-monospace,monospace;font-size:.8rem;overflow-wrap:anywhere}\
.meta{color:#5a6570;font-size:.9em;margin:.2em 0;overflow-wrap:anywhere}\
section{background:#fff;border:1px solid #d5d9de;border-radius:8px;padding:1em 1.2em;margin:1em 0;min-width:0}\
section.clone{border-left:5px solid #4f9a4f}\
table{border-collapse:collapse;width:100%;margin:.4em 0}\
td,th{border-bottom:1px solid #e4e7eb;padding:.3em .6em;text-align:left;font-size:.9em;vertical-align:top;overflow-wrap:anywhere}\
th{color:#5a6570;font-weight:600}\
.badge{display:inline-block;font-size:.75em;font-weight:500;padding:.1em .55em;border-radius:1em;background:#e6f6e6;color:#2c6b2c;border:1px solid #9fcf9f;vertical-align:middle}\
.bar{display:block;height:.55em;background:#2f6feb;border-radius:3px;margin:.35em 0 .15em;min-width:4px}\
.ok{color:#2c6b2c}.warn{color:#a15c00}\
ul.warnings{margin:.5em 0;padding-left:1.2em}\
#damaged{background:#fff4f4;border-color:#e0a0a0}\
.tree ul{list-style:none;margin:0;padding-left:.9em}\
.tree>ul{padding-left:0}\
.tree li{position:relative;padding:.18em 0 .18em 1.2em}\
.tree li::before{content:'';position:absolute;left:0;top:0;bottom:0;border-left:2px solid #9aa5b1}\
.tree li:last-child::before{bottom:auto;height:1.15em}\
.tree li::after{content:'';position:absolute;left:0;top:1.15em;width:1.1em;border-top:2px solid #9aa5b1}\
.pill{display:inline-block;max-width:100%;padding:.2em .8em;border-radius:1em;border:1px solid;overflow-wrap:anywhere}\
.snapshot>.pill{background:#fff7db;border-color:#b0a060}\
.clone>.pill{background:#e6f6e6;border-color:#4f9a4f}\
.now>.pill{background:#e3ecff;border-color:#2f6feb}\
.when,.space,.under{color:#5a6570;font-size:.9em}\
q{font-style:italic}";

/// Render the whole report as one HTML document.
pub fn html(r: &ScanReport) -> String {
    let cards: BTreeMap<Uuid, &str> = r.vms.iter().map(|v| (v.uuid, v.name.as_str())).collect();
    let clones = r.vms.iter().filter(|v| v.parent.is_some()).count();
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>lungate scan: {} VM(s), {} damaged</title><style>{CSS}</style></head><body><main>\n\
         <header><h1>lungate scan</h1><p class=\"meta\" id=\"summary\">{} VM(s) ({clones} of them clones), \
         {} damaged LUN(s), {} other file(s) · scanned <code>{}</code></p></header>\n",
        r.vms.len(),
        r.damaged.len(),
        r.vms.len(),
        r.damaged.len(),
        r.skipped.len(),
        esc(&r.roots.join(", "))
    );
    vm_list(&mut o, r, &cards);
    for vm in &r.vms {
        vm_card(&mut o, vm, &cards);
    }
    o.push_str("<section id=\"damaged\"><h2>Damaged LUNs</h2>");
    if r.damaged.is_empty() {
        o.push_str("<p class=\"ok\">None.</p>");
    } else {
        o.push_str("<table><thead><tr><th>Path</th><th>Reason</th></tr></thead><tbody>");
        for d in &r.damaged {
            let _ = write!(
                o,
                "<tr data-path=\"{}\"><td><code>{}</code></td><td>{}</td></tr>",
                esc(&d.path),
                esc(&d.path),
                esc(&d.reason)
            );
        }
        o.push_str("</tbody></table>");
    }
    o.push_str("</section>\n<section id=\"skipped\"><h2>Other files (not LUNs)</h2>");
    if r.skipped.is_empty() {
        o.push_str("<p class=\"meta\">None.</p>");
    } else {
        o.push_str(
            "<table><thead><tr><th>Path</th><th>Why it is not a LUN</th></tr></thead><tbody>",
        );
        for s in &r.skipped {
            let _ = write!(
                o,
                "<tr data-path=\"{}\"><td><code>{}</code></td><td>{}</td></tr>",
                esc(&s.path),
                esc(&s.path),
                esc(&s.reason)
            );
        }
        o.push_str("</tbody></table>");
    }
    o.push_str("</section>\n</main></body></html>\n");
    o
}

fn card_id(uuid: &Uuid) -> String {
    format!("vm-{uuid}")
}

/// `VM@SNAP`, linked to the parent's card when it is in the report.
fn parent_link(vm: &VmReport, cards: &BTreeMap<Uuid, &str>) -> String {
    let Some(p) = &vm.parent else {
        return String::new();
    };
    match vm.parent_uuid.filter(|u| cards.contains_key(u)) {
        Some(u) => format!("<a href=\"#{}\">{}</a>", card_id(&u), esc(p)),
        None => esc(p),
    }
}

fn vm_list(o: &mut String, r: &ScanReport, cards: &BTreeMap<Uuid, &str>) {
    o.push_str("<section id=\"vm-list\"><h2>VMs</h2>");
    if r.vms.is_empty() {
        o.push_str("<p class=\"meta\">No VMs found.</p></section>\n");
        return;
    }
    o.push_str(
        "<table><thead><tr><th>VM</th><th>Parent</th><th>Layout</th><th>vCPU</th>\
         <th>Memory</th><th>Disks</th><th>Snapshots</th><th>Clones</th><th>Status</th></tr></thead><tbody>",
    );
    for vm in &r.vms {
        let disks: Vec<String> = vm.disks.iter().map(|d| human(d.size)).collect();
        let status = if vm.warnings.is_empty() {
            "<span class=\"ok\">ok</span>".to_string()
        } else {
            format!(
                "<span class=\"warn\">{} warning(s)</span>",
                vm.warnings.len()
            )
        };
        let _ =
            write!(
            o,
            "<tr data-vm=\"{}\"><td><a href=\"#{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}{}</td><td>{}</td><td>{}</td><td>{status}</td></tr>",
            esc(&vm.name),
            card_id(&vm.uuid),
            esc(&vm.name),
            if vm.parent.is_some() {
                parent_link(vm, cards)
            } else {
                "—".into()
            },
            vm.layout,
            vm.vcpus.map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
            vm.memory.map(human).unwrap_or_else(|| "?".into()),
            esc(&disks.join(", ")),
            if vm.secondaries.is_empty() {
                String::new()
            } else {
                format!(" + {} secondary", vm.secondaries.len())
            },
            vm.snapshots.len(),
            vm.clones.len()
        );
    }
    o.push_str("</tbody></table></section>\n");
}

fn vm_card(o: &mut String, vm: &VmReport, cards: &BTreeMap<Uuid, &str>) {
    let _ = write!(
        o,
        "<section class=\"vm{}\" id=\"{}\" data-vm=\"{}\" data-uuid=\"{}\"{}><h2>{}{}</h2>\
         <p class=\"meta\">{} layout · {} vCPU · {} memory · UUID <code>{}</code></p>\
         <p class=\"meta\"><code>{}</code></p>",
        if vm.parent.is_some() { " clone" } else { "" },
        card_id(&vm.uuid),
        esc(&vm.name),
        vm.uuid,
        vm.parent
            .as_ref()
            .map(|p| format!(" data-parent=\"{}\"", esc(p)))
            .unwrap_or_default(),
        esc(&vm.name),
        if vm.parent.is_some() {
            format!(
                " <span class=\"badge\">clone · parent: {}</span>",
                parent_link(vm, cards)
            )
        } else {
            String::new()
        },
        vm.layout,
        vm.vcpus
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into()),
        vm.memory.map(human).unwrap_or_else(|| "?".into()),
        vm.uuid,
        esc(&vm.path)
    );
    let max = vm.disks.iter().map(|d| d.size).max().unwrap_or(1).max(1);
    o.push_str(
        "<table class=\"disks\"><thead><tr><th>Disk</th><th>Size</th><th>Export</th>\
         <th>Identity</th></tr></thead><tbody>",
    );
    for d in &vm.disks {
        let pct = (u128::from(d.size) * 100 / u128::from(max)).max(1);
        let _ = write!(
            o,
            "<tr class=\"disk\" data-vm=\"{}\" data-disk=\"disk{}\"><td>disk{}</td>\
             <td>{}<span class=\"bar\" style=\"width:{pct}%\"></span></td>\
             <td><code>{}</code></td><td><code>{}</code></td></tr>",
            esc(&vm.name),
            d.index,
            d.index,
            human(d.size),
            esc(&d.export),
            esc(d.id.as_deref().unwrap_or("?"))
        );
    }
    for s in &vm.secondaries {
        let size: u64 = s.disks.iter().map(|d| d.size).sum();
        let _ =
            write!(
            o,
            "<tr class=\"secondary\" data-vm=\"{}\" data-secondary=\"{}\"><td>secondary {}</td>\
             <td>{}</td><td colspan=\"2\"><code>{}</code>{}</td></tr>",
            esc(&vm.name),
            esc(&s.name),
            if s.path.is_some() {
                esc(&s.name)
            } else {
                format!("<code>{}</code>", s.uuid)
            },
            if s.path.is_some() {
                human(size)
            } else {
                "missing".into()
            },
            esc(s.path.as_deref().unwrap_or("not found in the scanned paths")),
            s.parent
                .as_ref()
                .map(|p| format!(" · clone of {}", esc(p)))
                .unwrap_or_default()
        );
    }
    o.push_str("</tbody></table>");
    o.push_str("<h3>Snapshots and clones</h3>");
    tree(o, vm, cards);
    if !vm.warnings.is_empty() {
        o.push_str("<ul class=\"warnings\">");
        for w in &vm.warnings {
            let _ = write!(o, "<li class=\"warn\">⚠ {}</li>", esc(w));
        }
        o.push_str("</ul>");
    }
    o.push_str("</section>\n");
}

/// What a node says: whose it is, and (snapshots) when, how much, why.
fn pill(vm: &VmReport, row: &TreeRow<'_>, cards: &BTreeMap<Uuid, &str>) -> String {
    let owner = esc(&vm.name);
    match row.node {
        Node::Snapshot(s) => format!(
            "<b>{owner}@{}</b> <span class=\"when\">{}</span> · <span class=\"space\">{} used</span>{}",
            esc(&s.name),
            utc(s.created),
            space(s),
            if s.description.is_empty() {
                String::new()
            } else {
                format!(" · <q>{}</q>", esc(&s.description))
            }
        ),
        Node::Clone(c) => {
            let name = if cards.contains_key(&c.uuid) {
                format!("<a href=\"#{}\"><b>{}</b></a>", card_id(&c.uuid), esc(&c.name))
            } else {
                format!("<b>{}</b>", esc(&c.name))
            };
            format!(
                "clone {name} <span class=\"under\">from {owner}@{}</span>",
                esc(&c.snapshot)
            )
        }
        // A clone's live LUN that no snapshot of its own precedes reads
        // its parent's snapshot: say which.
        Node::Now => match (&vm.parent, row.parent) {
            (Some(p), None) => format!(
                "● <b>{owner} now</b> <span class=\"under\">(live, from {})</span>",
                esc(p)
            ),
            _ => format!("● <b>{owner} now</b> <span class=\"under\">(live)</span>"),
        },
    }
}

/// The tree as nested lists: rows come in preorder with their depth, so a
/// list opens when the depth grows and closes when it falls.
fn tree(o: &mut String, vm: &VmReport, cards: &BTreeMap<Uuid, &str>) {
    let rows = tree_rows(vm);
    o.push_str("<div class=\"tree\" data-owner=\"");
    o.push_str(&esc(&vm.name));
    o.push_str("\"><ul>");
    let mut level = 0;
    for (i, row) in rows.iter().enumerate() {
        let d = row.depth.min(NEST_MAX);
        if i > 0 {
            if d > level {
                o.push_str("<ul>");
            } else {
                o.push_str("</li>");
                for _ in d..level {
                    o.push_str("</ul></li>");
                }
            }
        }
        level = d;
        let (kind, name) = match row.node {
            Node::Snapshot(s) => ("snapshot", s.name.as_str()),
            Node::Clone(c) => ("clone", c.name.as_str()),
            Node::Now => ("now", "now"),
        };
        // Drawn flat past NEST_MAX: say what it hangs under.
        let under = match row.parent {
            Some(p) if row.depth >= NEST_MAX => match rows[p].node {
                Node::Snapshot(s) => format!(
                    " <span class=\"under\">(after {}@{})</span>",
                    esc(&vm.name),
                    esc(&s.name)
                ),
                _ => String::new(),
            },
            _ => String::new(),
        };
        let _ = write!(
            o,
            "<li class=\"node {kind}\" data-kind=\"{kind}\" data-owner=\"{}\" data-name=\"{}\">\
             <span class=\"pill\">{}{under}</span>",
            esc(&vm.name),
            esc(name),
            pill(vm, row, cards)
        );
    }
    if !rows.is_empty() {
        o.push_str("</li>");
        for _ in 0..level {
            o.push_str("</ul></li>");
        }
    }
    o.push_str("</ul></div>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<a href='x'>&</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;"
        );
    }
}
