//! The HTML scan report, checked in a real browser.
//!
//! Real `lunctl` commands make a pool with several VMs (two disks, a
//! secondary disk, both layouts), a snapshot tree with branches, clones
//! (one of a clone), damaged LUNs and garbage files. `lunctl scan --html`
//! writes the report; headless Chromium (DevTools protocol over a pipe,
//! `browser/cdp.rs`) renders it at 1280 px, keeps a full-page screenshot
//! and the rendered DOM under `target/test-artifacts/`, and collects what
//! is drawn (`browser/facts.js`). [`judge`] then compares that with what
//! the commands made: every VM (clones too, with `parent: VM@SNAP`),
//! disk, secondary disk, snapshot (time, description, space used, under
//! the right parent), clone (linking to its own card), one `now` per VM,
//! every damaged LUN with its reason, every garbage file; every node
//! naming whose it is; nothing wider than the page; no script error, no
//! console error, no request leaving the file.
//!
//! The judge is shown to fail: the same page with a VM card, a snapshot,
//! a clone, a damage reason removed, a node hidden or an element too wide
//! is rejected for exactly that, and a page with a script error is caught.

#[path = "browser/cdp.rs"]
mod cdp;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use lungate_tests::{lunctl, profile_dir};
use serde_json::Value;

const WIDTH: u32 = 1280;
/// A node taller than this is squeezed (a readable one is three lines at
/// most, even with a long description).
const MAX_NODE_HEIGHT: u64 = 110;
/// Snapshots in a row: deeper than the report indents.
const CHAIN: usize = 30;
const LONG_NAME: &str =
    "before-the-quarterly-maintenance-window-of-the-storage-cluster-and-the-kernel-upgrade";
const LONG_DESCRIPTION: &str = "pre-upgrade-baseline-taken-by-the-automation-\
    run-4711-of-the-nightly-pipeline-with-every-service-stopped-and-the-caches-\
    flushed-so-that-a-revert-brings-back-exactly-this-state-including-memory";
const FACTS: &str = include_str!("browser/facts.js");

/// What the pool holds, by construction.
struct Expected {
    vms: Vec<Vm>,
    /// File name and a word its reason must contain.
    damaged: Vec<(&'static str, &'static str)>,
    skipped: Vec<&'static str>,
}

struct Vm {
    name: &'static str,
    parent: Option<&'static str>,
    disks: Vec<(&'static str, &'static str)>,
    secondaries: Vec<&'static str>,
    /// Name, the snapshot it was taken after, description.
    snapshots: Vec<(&'static str, Option<&'static str>, &'static str)>,
    /// Clone name and the snapshot it came from.
    clones: Vec<(&'static str, &'static str)>,
    /// The snapshot the live LUN continues from.
    now_under: Option<&'static str>,
}

fn write_data(lun: &Path, disk_offset: u64, len: usize, seed: u8) {
    let l = lun_manager::Lun::open(lun, lun_manager::Access::ReadWrite).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
    let v = l.volume();
    v.write(l.disks()[0].offset + disk_offset, &data).unwrap();
    v.flush().unwrap();
}

/// Make the pool with lunctl and return what it holds.
fn build_pool(p: &Path) -> Expected {
    let ps = p.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--pool", ps]);
        lunctl(&a);
    };
    lunctl(&["pool", "init", ps]);
    run(&[
        "create", "web", "--disk", "2G", "--disk", "512M", "--memory", "256M", "--vcpus", "2",
    ]);
    run(&[
        "create", "web-data", "--disk", "10G", "--memory", "0", "--layout", "truncate",
    ]);
    run(&["attach-secondary", "web", "web-data"]);
    run(&[
        "create", "db", "--disk", "4G", "--memory", "512M", "--layout", "truncate",
    ]);
    let web = p.join("web.lun");
    write_data(&web, 0, 1 << 20, 1);
    run(&["snapshot", "web", "clean", "--description", "fresh install"]);
    write_data(&web, 4 << 20, 2 << 20, 2);
    run(&[
        "snapshot",
        "web",
        "updated",
        "--description",
        "after upgrade",
    ]);
    run(&["revert", "web", "clean"]);
    write_data(&web, 8 << 20, 1 << 20, 3);
    run(&[
        "snapshot",
        "web",
        "experiment",
        "--description",
        "try the new kernel",
    ]);
    run(&["clone", "web", "clean", "web-test"]);
    run(&["clone", "web", "updated", "web-exp"]);
    write_data(&p.join("web-test.lun"), 0, 1 << 20, 4);
    run(&[
        "snapshot",
        "web-test",
        "t1",
        "--description",
        "test baseline",
    ]);
    run(&["clone", "web-test", "t1", "web-test2"]);
    // Long words must wrap, not widen the page; a deep chain must stop
    // indenting before it leaves the card.
    run(&[
        "snapshot",
        "db",
        LONG_NAME,
        "--description",
        LONG_DESCRIPTION,
    ]);
    run(&["create", "chain", "--disk", "64M", "--memory", "1M"]);
    for i in 0..CHAIN {
        run(&["snapshot", "chain", &format!("s{i:02}")]);
    }
    // Damaged: a bad label checksum, and a truncated file.
    run(&["create", "broken", "--disk", "8M", "--memory", "1M"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p.join("broken.lun"))
        .unwrap();
    f.write_all_at(b"XX", (1 << 20) + 130).unwrap();
    run(&["create", "cut", "--disk", "64M", "--memory", "1M"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(p.join("cut.lun"))
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    // Garbage.
    let noise: Vec<u8> = (0..(3u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(p.join("garbage.img"), noise).unwrap();
    std::fs::write(p.join("notes.txt"), "not a disk\n").unwrap();

    let web_disks = vec![("disk0", "2 GiB"), ("disk1", "512 MiB")];
    let chain: Vec<(&'static str, Option<&'static str>, &'static str)> = (0..CHAIN)
        .map(|i| {
            let name: &'static str = format!("s{i:02}").leak();
            let parent = (i > 0).then(|| &*format!("s{:02}", i - 1).leak());
            (name, parent, "")
        })
        .collect();
    Expected {
        vms: vec![
            Vm {
                name: "chain",
                parent: None,
                disks: vec![("disk0", "64 MiB")],
                secondaries: vec![],
                snapshots: chain,
                clones: vec![],
                now_under: Some(format!("s{:02}", CHAIN - 1).leak()),
            },
            Vm {
                name: "db",
                parent: None,
                disks: vec![("disk0", "4 GiB")],
                secondaries: vec![],
                snapshots: vec![(LONG_NAME, None, LONG_DESCRIPTION)],
                clones: vec![],
                now_under: Some(LONG_NAME),
            },
            Vm {
                name: "web",
                parent: None,
                disks: web_disks.clone(),
                secondaries: vec!["web-data"],
                snapshots: vec![
                    ("clean", None, "fresh install"),
                    ("updated", Some("clean"), "after upgrade"),
                    ("experiment", Some("clean"), "try the new kernel"),
                ],
                clones: vec![("web-test", "clean"), ("web-exp", "updated")],
                now_under: Some("experiment"),
            },
            Vm {
                name: "web-exp",
                parent: Some("web@updated"),
                disks: web_disks.clone(),
                secondaries: vec!["web-exp-web-data"],
                snapshots: vec![],
                clones: vec![],
                now_under: None,
            },
            Vm {
                name: "web-test",
                parent: Some("web@clean"),
                disks: web_disks.clone(),
                secondaries: vec!["web-test-web-data"],
                snapshots: vec![("t1", None, "test baseline")],
                clones: vec![("web-test2", "t1")],
                now_under: Some("t1"),
            },
            Vm {
                name: "web-test2",
                parent: Some("web-test@t1"),
                disks: web_disks,
                secondaries: vec!["web-test2-web-test-web-data"],
                snapshots: vec![],
                clones: vec![],
                now_under: None,
            },
        ],
        damaged: vec![("broken.lun", "checksum"), ("cut.lun", "truncated")],
        skipped: vec!["garbage.img", "notes.txt"],
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Whether node `n` of `vm` is drawn under snapshot `parent` (none: at the
/// top): nested in its node, or, past the indentation limit, saying
/// "after VM@PARENT" beside the node above it.
fn hangs_under(n: &Value, vm: &str, parent: Option<&str>) -> bool {
    let nested = n["under"].as_str() == parent.map(|p| format!("snapshot:{p}")).as_deref();
    let said = parent.is_some_and(|p| s(&n["text"]).contains(&format!("(after {vm}@{p})")));
    nested || said
}

/// Everything wrong with the rendered page `f` (facts.js) against `e`.
fn judge(f: &Value, e: &Expected) -> Vec<String> {
    let mut bad = Vec::new();
    // `width` is the viewport less its vertical scrollbar: what the page
    // has to fit in a 1280 px window.
    if f["viewport"].as_u64() != Some(u64::from(WIDTH)) {
        bad.push(format!("viewport is {} px, not {WIDTH}", f["viewport"]));
    }
    if f["scroll_width"].as_u64() > f["width"].as_u64() {
        bad.push(format!(
            "the page scrolls sideways: {} px wide in {}",
            f["scroll_width"], f["width"]
        ));
    }
    for o in f["overflow"].as_array().into_iter().flatten() {
        bad.push(format!("overflows the page: {}", s(o)));
    }
    let empty = vec![];
    let arr = |k: &str| f[k].as_array().unwrap_or(&empty);
    // VM list and cards: exactly the expected VMs, each once.
    let mut names: Vec<&str> = arr("vms").iter().map(|v| s(&v["name"])).collect();
    names.sort_unstable();
    let mut want: Vec<&str> = e.vms.iter().map(|v| v.name).collect();
    want.sort_unstable();
    if names != want {
        bad.push(format!("VM cards {names:?}, expected {want:?}"));
    }
    for vm in &e.vms {
        let row = arr("list").iter().find(|r| r["vm"] == vm.name);
        match row {
            None => bad.push(format!("{}: not in the VM list", vm.name)),
            Some(r) => {
                if r["visible"] != true || !s(&r["text"]).contains(vm.name) || r["link_ok"] != true
                {
                    bad.push(format!(
                        "{}: VM list row not shown or not linked: {r}",
                        vm.name
                    ));
                }
                if let Some(p) = vm.parent {
                    if !s(&r["text"]).contains(p) {
                        bad.push(format!("{}: VM list does not say parent {p}: {r}", vm.name));
                    }
                }
            }
        }
        let Some(card) = arr("vms").iter().find(|c| c["name"] == vm.name) else {
            bad.push(format!("{}: no card", vm.name));
            continue;
        };
        if card["visible"] != true || !s(&card["heading"]).contains(vm.name) {
            bad.push(format!("{}: card not shown: {card}", vm.name));
        }
        match vm.parent {
            Some(p) => {
                if card["parent"] != p
                    || !s(&card["heading"]).contains(&format!("parent: {p}"))
                    || card["parent_link_ok"] != true
                {
                    bad.push(format!(
                        "{}: card does not show parent {p}: {card}",
                        vm.name
                    ));
                }
            }
            None => {
                if !card["parent"].is_null() {
                    bad.push(format!("{}: a parent it does not have: {card}", vm.name));
                }
            }
        }
        for (d, size) in &vm.disks {
            let ok = card["disks"].as_array().into_iter().flatten().any(|x| {
                x["disk"] == *d
                    && x["visible"] == true
                    && s(&x["text"]).contains(d)
                    && s(&x["text"]).contains(size)
            });
            if !ok {
                bad.push(format!("{}: {d} ({size}) not shown", vm.name));
            }
        }
        for sec in &vm.secondaries {
            let ok = card["secondaries"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|x| x["name"] == *sec && x["visible"] == true && s(&x["text"]).contains(sec));
            if !ok {
                bad.push(format!("{}: secondary disk {sec} not shown", vm.name));
            }
        }
        let nodes: Vec<&Value> = arr("nodes")
            .iter()
            .filter(|n| n["owner"] == vm.name)
            .collect();
        for n in &nodes {
            if n["card"] != vm.name {
                bad.push(format!("{}: a node outside its card: {n}", vm.name));
            }
            if n["visible"] != true {
                bad.push(format!("{}: a node not shown: {n}", vm.name));
            }
            // Readable: not squeezed into a column by deep indentation.
            if n["height"].as_u64() > Some(MAX_NODE_HEIGHT) {
                bad.push(format!(
                    "{}: a node squeezed to {} px high: {n}",
                    vm.name, n["height"]
                ));
            }
            if !s(&n["text"]).contains(vm.name) {
                bad.push(format!(
                    "{}: a node that does not say whose it is: {n}",
                    vm.name
                ));
            }
        }
        let node = |kind: &str, name: &str| {
            nodes
                .iter()
                .find(|n| n["kind"] == kind && n["name"] == name)
                .copied()
        };
        for (snap, parent, desc) in &vm.snapshots {
            let Some(n) = node("snapshot", snap) else {
                bad.push(format!("{}: snapshot {snap} not shown", vm.name));
                continue;
            };
            let t = s(&n["text"]);
            let has_space = ["B used", "KiB used", "MiB used", "GiB used"]
                .iter()
                .any(|u| t.contains(u));
            if !t.contains(&format!("{}@{snap}", vm.name))
                || !t.contains(" UTC")
                || !t.contains(desc)
                || !has_space
            {
                bad.push(format!(
                    "{}: snapshot {snap} lacks its name, time, description or space: {t:?}",
                    vm.name
                ));
            }
            if !hangs_under(n, vm.name, *parent) {
                bad.push(format!(
                    "{}: snapshot {snap} drawn under {}, expected {parent:?}",
                    vm.name, n["under"]
                ));
            }
        }
        for (c, snap) in &vm.clones {
            let Some(n) = node("clone", c) else {
                bad.push(format!("{}: clone {c} not shown", vm.name));
                continue;
            };
            let t = s(&n["text"]);
            if !t.contains(&format!("clone {c}"))
                || !t.contains(&format!("from {}@{snap}", vm.name))
            {
                bad.push(format!("{}: clone node says {t:?}", vm.name));
            }
            if n["link_ok"] != true {
                bad.push(format!(
                    "{}: clone {c} does not link to its card: {n}",
                    vm.name
                ));
            }
            if n["under"].as_str() != Some(&format!("snapshot:{snap}")) {
                bad.push(format!(
                    "{}: clone {c} drawn under {}, expected snapshot {snap}",
                    vm.name, n["under"]
                ));
            }
        }
        let nows: Vec<&&Value> = nodes.iter().filter(|n| n["kind"] == "now").collect();
        if nows.len() != 1 {
            bad.push(format!(
                "{}: {} live nodes, expected 1",
                vm.name,
                nows.len()
            ));
        }
        for n in nows {
            if !s(&n["text"]).contains(&format!("{} now", vm.name)) {
                bad.push(format!("{}: live node says {:?}", vm.name, n["text"]));
            }
            if !hangs_under(n, vm.name, vm.now_under) {
                bad.push(format!(
                    "{}: now drawn under {}, expected {:?}",
                    vm.name, n["under"], vm.now_under
                ));
            }
        }
        let extra = nodes
            .iter()
            .filter(|n| {
                n["kind"] == "snapshot" && !vm.snapshots.iter().any(|x| n["name"] == x.0)
                    || n["kind"] == "clone" && !vm.clones.iter().any(|x| n["name"] == x.0)
            })
            .count();
        if extra > 0 {
            bad.push(format!("{}: {extra} node(s) it does not have", vm.name));
        }
    }
    for (file, word) in &e.damaged {
        let ok = arr("damaged").iter().any(|r| {
            s(&r["path"]).ends_with(file)
                && r["visible"] == true
                && s(&r["text"]).contains(file)
                && s(&r["text"]).contains(word)
        });
        if !ok {
            bad.push(format!("damaged {file} not shown with its reason ({word})"));
        }
    }
    if arr("damaged").len() != e.damaged.len() {
        bad.push(format!(
            "{} damaged rows, expected {}",
            arr("damaged").len(),
            e.damaged.len()
        ));
    }
    for file in &e.skipped {
        let ok = arr("skipped")
            .iter()
            .any(|r| s(&r["path"]).ends_with(file) && r["visible"] == true);
        if !ok {
            bad.push(format!("garbage file {file} not listed among other files"));
        }
    }
    bad
}

/// Script errors, console errors, failed loads and requests for anything
/// but the report itself, from the page's events.
fn page_errors(events: &[Value], report_url: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for ev in events {
        let p = &ev["params"];
        match s(&ev["method"]) {
            "Runtime.exceptionThrown" => bad.push(format!(
                "script error: {}",
                p["exceptionDetails"]["exception"]["description"]
            )),
            "Runtime.consoleAPICalled" if p["type"] == "error" || p["type"] == "assert" => {
                bad.push(format!("console error: {}", p["args"]))
            }
            "Log.entryAdded" if p["entry"]["level"] == "error" => {
                bad.push(format!("log error: {}", p["entry"]["text"]))
            }
            "Network.requestWillBeSent" if s(&p["request"]["url"]) != report_url => {
                bad.push(format!("request for {}", p["request"]["url"]))
            }
            "Network.loadingFailed" => bad.push(format!("failed load: {}", p["errorText"])),
            _ => {}
        }
    }
    bad
}

fn artifacts() -> PathBuf {
    let d = profile_dir()
        .parent()
        .expect("target directory")
        .join("test-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn facts(b: &mut cdp::Chromium, session: &str) -> Value {
    let v = b.eval(session, FACTS);
    serde_json::from_str(v.as_str().expect("facts are a JSON string")).expect("facts JSON")
}

#[test]
fn the_scan_report_shows_every_vm_disk_snapshot_clone_and_damage_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let expected = build_pool(&pool);
    let out_dir = artifacts();
    let html = out_dir.join("scan-report.html");
    let scan = lunctl(&[
        "scan",
        pool.to_str().unwrap(),
        "--json",
        "--html",
        html.to_str().unwrap(),
    ]);
    // The JSON report agrees with the pool: clones are VMs with a parent.
    let r: Value = serde_json::from_slice(&scan.stdout).unwrap();
    for vm in &expected.vms {
        let j = r["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vm.name)
            .unwrap_or_else(|| panic!("{} missing from scan --json: {r}", vm.name));
        assert_eq!(j["parent"].as_str(), vm.parent, "{}: {j}", vm.name);
    }

    let url = format!("file://{}", html.display());
    let mut b = cdp::Chromium::launch(&out_dir.join("chromium.log"));
    let page = b.new_page(WIDTH, 900);
    b.navigate(&page, &url);
    let seen = facts(&mut b, &page);
    let dom = b.eval(&page, "document.documentElement.outerHTML");
    std::fs::write(out_dir.join("scan-report.dom.html"), s(&dom)).unwrap();
    let errors = page_errors(&b.take_events(&page), &url);
    let png = b.screenshot(&page, WIDTH);
    let shot = out_dir.join("scan-report.png");
    std::fs::write(&shot, &png).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "screenshot {} is no real picture ({} bytes)",
        shot.display(),
        png.len()
    );
    let problems = judge(&seen, &expected);
    assert!(
        problems.is_empty() && errors.is_empty(),
        "the report at {} (screenshot {}):\n{}\n{}\nfacts: {seen:#}",
        html.display(),
        shot.display(),
        problems.join("\n"),
        errors.join("\n")
    );
    eprintln!("screenshot of the scan report: {}", shot.display());

    // The judge rejects a page that lost something, for that thing.
    let web = |q: &str| format!("document.querySelector('section.vm[data-vm=\"web\"] {q}')");
    let losses = [
        (
            "document.querySelector('section.vm[data-vm=\"web-test\"]').remove()".to_string(),
            "web-test: no card",
        ),
        (
            format!(
                "{}.remove()",
                web("li.node[data-kind=snapshot][data-name=updated]")
            ),
            "web: snapshot updated not shown",
        ),
        (
            format!(
                "{}.remove()",
                web("li.node[data-kind=clone][data-name=web-exp]")
            ),
            "web: clone web-exp not shown",
        ),
        (
            "document.querySelector('#damaged tbody tr:last-child td:last-child').textContent = ''"
                .to_string(),
            "damaged cut.lun not shown with its reason",
        ),
        (
            format!(
                "{}.style.visibility = 'hidden'",
                web("li.node[data-kind=snapshot][data-name=clean] > .pill")
            ),
            "web: a node not shown",
        ),
        (
            "document.querySelector('section.vm[data-vm=\"db\"] h2').style.width = '2000px'"
                .to_string(),
            "overflows the page",
        ),
    ];
    for (damage, expect) in losses {
        b.viewport(&page, WIDTH, 900);
        b.navigate(&page, &url);
        b.eval(&page, &format!("{damage}; 0"));
        let p = judge(&facts(&mut b, &page), &expected);
        assert!(
            p.iter().any(|x| x.contains(expect)),
            "after `{damage}` the judge should say {expect:?}, it said {p:#?}"
        );
    }
    // And a script error on a page is caught.
    let bad_page = dir.path().join("bad.html");
    std::fs::write(
        &bad_page,
        "<!DOCTYPE html><p>x</p><script>throw new Error('boom')</script>",
    )
    .unwrap();
    let bad_url = format!("file://{}", bad_page.display());
    b.navigate(&page, &bad_url);
    let errs = page_errors(&b.take_events(&page), &bad_url);
    assert!(errs.iter().any(|e| e.contains("boom")), "{errs:?}");
}
