//! A self-contained HTML report (inline CSS and SVG, no scripts, no external
//! resources): one card per VM with its disks, secondary disks and its
//! snapshot/clone tree drawn as a graph.

use std::fmt::Write;

use super::{tree_rows, RowKind, TreeRow};
use crate::scan::{ScanReport, VmReport};
use crate::size::human;

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

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:2em;background:#f6f7f9;color:#1d2329}\
h1{font-size:1.4em}.vm{background:#fff;border:1px solid #d5d9de;border-radius:8px;padding:1em 1.2em;margin:1em 0}\
.vm h2{margin:0 0 .3em;font-size:1.15em}.meta{color:#5a6570;font-size:.9em}\
table{border-collapse:collapse;margin:.6em 0}td,th{border-bottom:1px solid #e4e7eb;padding:.25em .8em;text-align:left;font-size:.9em}\
.warn{color:#a15c00}.damaged{background:#fff4f4;border-color:#e0a0a0}code{font-size:.85em}";

/// Render the whole report as one HTML document.
pub fn html(r: &ScanReport) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>lungate scan</title><style>{CSS}</style></head><body>\n\
         <h1>lungate scan: {} VM(s), {} damaged</h1>\n<p class=\"meta\">Scanned: {}</p>\n",
        r.vms.len(),
        r.damaged.len(),
        esc(&r.roots.join(", "))
    );
    for vm in &r.vms {
        vm_card(&mut o, vm);
    }
    if !r.damaged.is_empty() {
        o.push_str("<div class=\"vm damaged\"><h2>Damaged LUNs</h2><table><tr><th>Path</th><th>Reason</th></tr>");
        for d in &r.damaged {
            let _ = write!(
                o,
                "<tr><td><code>{}</code></td><td>{}</td></tr>",
                esc(&d.path),
                esc(&d.reason)
            );
        }
        o.push_str("</table></div>\n");
    }
    let _ = write!(
        o,
        "<p class=\"meta\">{} other file(s) skipped (not LUNs).</p>\n</body></html>\n",
        r.skipped.len()
    );
    o
}

fn vm_card(o: &mut String, vm: &VmReport) {
    let _ = writeln!(
        o,
        "<div class=\"vm\" id=\"vm-{}\"><h2>{}</h2><div class=\"meta\">{} layout · {} vCPU · {} memory · UUID <code>{}</code><br><code>{}</code></div>",
        esc(&vm.uuid.to_string()),
        esc(&vm.name),
        vm.layout,
        vm.vcpus.map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
        vm.memory.map(human).unwrap_or_else(|| "?".into()),
        vm.uuid,
        esc(&vm.path)
    );
    o.push_str(&svg(vm));
    o.push_str("<table><tr><th>Disk</th><th>Size</th><th>Export</th><th>Identity</th></tr>");
    for d in &vm.disks {
        let _ = write!(
            o,
            "<tr><td>disk{}</td><td>{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
            d.index,
            human(d.size),
            esc(&d.export),
            esc(d.id.as_deref().unwrap_or("?"))
        );
    }
    for s in &vm.secondaries {
        let _ = write!(
            o,
            "<tr><td>secondary {}</td><td>{}</td><td colspan=\"2\"><code>{}</code></td></tr>",
            esc(&s.name),
            s.disks
                .iter()
                .map(|d| human(d.size))
                .collect::<Vec<_>>()
                .join(", "),
            esc(s.path.as_deref().unwrap_or("not found"))
        );
    }
    o.push_str("</table>");
    for w in &vm.warnings {
        let _ = write!(o, "<p class=\"warn\">⚠ {}</p>", esc(w));
    }
    for c in &vm.clones {
        for w in &c.warnings {
            let _ = write!(
                o,
                "<p class=\"warn\">⚠ clone {}: {}</p>",
                esc(&c.name),
                esc(w)
            );
        }
    }
    o.push_str("</div>\n");
}

/// What a tree node says (cut to stay readable; the full text is its title).
fn row_text(r: &TreeRow) -> String {
    let t = match r.kind {
        RowKind::Snapshot if r.detail.is_empty() => format!("snapshot {}", r.label),
        RowKind::Snapshot => format!("snapshot {} — {}", r.label, r.detail),
        RowKind::Clone => format!("clone {} ({})", r.label, r.detail),
        RowKind::Now => "● now (live)".to_string(),
    };
    t.chars().take(80).collect()
}

fn row_width(text: &str) -> usize {
    text.chars().count() * 7 + 24
}

/// Draw the VM: its node, a bar per disk (width by size), dashed boxes for
/// secondary disks, and the snapshot tree with clones as leaves.
fn svg(vm: &VmReport) -> String {
    let mut items: Vec<(String, String, &str)> = Vec::new(); // label, sub, style
    for d in &vm.disks {
        items.push((format!("disk{}", d.index), human(d.size), "disk"));
    }
    for s in &vm.secondaries {
        let size: u64 = s.disks.iter().map(|d| d.size).sum();
        items.push((
            format!("secondary {}", s.name),
            if s.path.is_some() {
                human(size)
            } else {
                "missing".into()
            },
            "secondary",
        ));
    }
    let tree = if vm.snapshots.is_empty() && vm.clones.is_empty() {
        Vec::new()
    } else {
        tree_rows(vm)
    };
    let rows = items.len().max(1) + tree.len();
    let h = 30 + rows * 34;
    let width = tree
        .iter()
        .map(|r| 200 + r.depth.min(16) * 28 + row_width(&row_text(r)) + 10)
        .max()
        .unwrap_or(0)
        .max(760);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{h}\" role=\"img\" aria-label=\"{}\" style=\"font:12px system-ui,sans-serif\">",
        esc(&vm.name)
    );
    let _ = write!(
        s,
        "<rect x=\"4\" y=\"10\" width=\"150\" height=\"28\" rx=\"6\" fill=\"#2f6feb\"/><text x=\"14\" y=\"29\" fill=\"#fff\">{}</text>",
        esc(&vm.name)
    );
    let max = vm.disks.iter().map(|d| d.size).max().unwrap_or(1).max(1);
    for (i, (label, sub, style)) in items.iter().enumerate() {
        let y = 10 + i * 34;
        let (w, fill, dash) = match *style {
            "disk" => {
                let size = vm.disks.get(i).map(|d| d.size).unwrap_or(max);
                (120 + (280 * size / max) as usize, "#d9e6ff", "")
            }
            _ => (260, "#f1f1f1", " stroke-dasharray=\"5 3\""),
        };
        let _ = write!(
            s,
            "<line x1=\"154\" y1=\"24\" x2=\"200\" y2=\"{}\" stroke=\"#8a96a3\"/>\
             <rect x=\"200\" y=\"{y}\" width=\"{w}\" height=\"28\" rx=\"4\" fill=\"{fill}\" stroke=\"#5b7bb5\"{dash}/>\
             <text x=\"208\" y=\"{}\">{} · {}</text>",
            y + 14,
            y + 19,
            esc(label),
            esc(sub)
        );
    }
    let base = 10 + items.len().max(1) * 34;
    if !tree.is_empty() {
        let _ = write!(
            s,
            "<text x=\"4\" y=\"{}\" fill=\"#5a6570\">snapshots</text>",
            base + 17
        );
    }
    for (i, r) in tree.iter().enumerate() {
        let y = base + i * 34;
        let x = 200 + r.depth.min(16) * 28;
        // An elbow from the node it hangs under (or from the VM's label).
        let (px, py) = match r.parent {
            Some(p) => (200 + tree[p].depth.min(16) * 28 + 12, base + p * 34 + 26),
            None => (160, base + 13),
        };
        let _ = write!(
            s,
            "<path d=\"M{px} {py} V{} H{x}\" fill=\"none\" stroke=\"#9aa5b1\"/>",
            y + 13
        );
        let (fill, stroke, w) = match r.kind {
            RowKind::Snapshot => ("#fff7db", "#b0a060", 220),
            RowKind::Clone => ("#e6f6e6", "#4f9a4f", 300),
            RowKind::Now => ("#e3ecff", "#2f6feb", 110),
        };
        let text = row_text(r);
        let w = row_width(&text).max(w);
        let _ = write!(
            s,
            "<rect x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"26\" rx=\"13\" fill=\"{fill}\" stroke=\"{stroke}\"/>\
             <text x=\"{}\" y=\"{}\"><title>{}</title>{}</text>",
            x + 10,
            y + 17,
            esc(&format!("{} {}", r.label, r.detail)),
            esc(&text)
        );
    }
    s.push_str("</svg>");
    s
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
