//! `lunctl resize` of a LUN on Ceph RBD (the `rbd` feature), on the
//! throwaway cluster of tests/ceph.rs: the image grows (`rbd resize`), the
//! label, state region and disk regions are rewritten as for a file LUN
//! (regions in the way move, the grown part reads zero), a gateway serves
//! the new sizes to nbdinfo and qemu-io with every byte written before,
//! and an RBD LUN with snapshots is refused, saying why and what to do.
//!
//! Needs the binaries built with `--features rbd` (scripts/test does).

use std::process::Command;

use lungate_tests::ceph::Cluster;
use lungate_tests::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn size_of(uri: &str) -> u64 {
    let out = run_ok(Command::new(require_tool("nbdinfo")).args(["--size", uri]));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn check_clean(lun: &str, what: &str) {
    let v = json_of(&lunctl(&["--json", "inspect", lun]));
    assert_eq!(v["warnings"], json!([]), "{what}: {v}");
    for r in v["state"]["records"].as_array().unwrap() {
        assert_eq!(r["checksum"], "ok", "{what}: {r}");
    }
}

#[test]
fn an_rbd_lun_grows_its_disks_and_state_and_is_served_at_the_new_sizes_with_every_byte() {
    let c = Cluster::shared();
    for layout in ["truncate", "offset", "aligned"] {
        let ns = format!("resize-{layout}");
        let pool = c.pool(&ns);
        let out = lunctl(&[
            "create", "--pool", &pool, "--layout", layout, "--disk", "16M", "--disk", "8M",
            "--memory", "4M", "vm",
        ]);
        assert_success("lunctl create", &out);
        let lun = format!("rbd:rbd/{ns}/vm.lun:conf={}", c.conf().display());
        let image = format!("rbd/{ns}/vm.lun");
        let size_before = json_of(
            &Command::new(require_tool("rbd"))
                .env("CEPH_CONF", c.conf())
                .args(["info", "--format", "json", &image])
                .output()
                .unwrap(),
        )["size"]
            .as_u64()
            .unwrap();

        let gw = Gateway::start(&["--pool", &pool]);
        qemu_io_ok(
            &gw.uri("vm/disk0"),
            &["write -P 0x11 0 1M", "write -P 0x12 15M 1M"],
        );
        qemu_io_ok(
            &gw.uri("vm/disk1"),
            &["write -P 0x21 0 1M", "write -P 0x22 7M 1M"],
        );
        gw.stop_ok();

        // Growing disk0 moves what follows it; then the state region and
        // disk1 grow too.
        let out = lunctl(&["resize", &lun, "--disk", "0=40M"]);
        assert_success("lunctl resize --disk 0=40M", &out);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("disk0 is now 40 MiB"),
            "{layout}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_success(
            "lunctl resize --memory",
            &lunctl(&["resize", &lun, "--memory", "12M"]),
        );
        assert_success(
            "lunctl resize --disk 1=12M",
            &lunctl(&["resize", &lun, "--disk", "1=12M"]),
        );
        check_clean(&lun, layout);
        let v = json_of(&lunctl(&["--json", "inspect", &lun]));
        assert_eq!(v["hardware"]["memory_bytes"], 12 * MIB, "{layout}: {v}");
        let size_after = json_of(
            &Command::new(require_tool("rbd"))
                .env("CEPH_CONF", c.conf())
                .args(["info", "--format", "json", &image])
                .output()
                .unwrap(),
        )["size"]
            .as_u64()
            .unwrap();
        assert!(
            size_after >= size_before + 32 * MIB,
            "{layout}: the image grew from {size_before} to {size_after}"
        );

        let gw = Gateway::start(&["--pool", &pool]);
        let d0 = gw.uri("vm/disk0");
        let d1 = gw.uri("vm/disk1");
        assert_eq!(size_of(&d0), 40 * MIB, "{layout}");
        assert_eq!(size_of(&d1), 12 * MIB, "{layout}");
        qemu_io_ok(
            &d0,
            &[
                "read -P 0x11 0 1M",
                "read -P 0x12 15M 1M",
                "read -P 0 16M 24M",
                "write -P 0x13 39M 1M",
                "read -P 0x13 39M 1M",
            ],
        );
        qemu_io_ok(
            &d1,
            &[
                "read -P 0x21 0 1M",
                "read -P 0x22 7M 1M",
                "read -P 0 8M 4M",
                "write -P 0x23 11M 1M",
                "read -P 0x23 11M 1M",
            ],
        );
        gw.stop_ok();
        check_clean(&lun, layout);

        // With a snapshot (an RBD snapshot of the image) the resize is
        // refused, changes nothing and names the way out; without it, it
        // runs again.
        assert_success("lunctl snapshot", &lunctl(&["snapshot", &lun, "s1"]));
        let out = run_timeout(
            Command::new(bin("lunctl")).args(["resize", &lun, "--disk", "0=48M"]),
            CMD_TIMEOUT,
        );
        assert!(!out.status.success(), "{layout}: resized with a snapshot");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("RBD LUN with snapshots is not resized")
                && e.contains("lunctl clone")
                && e.contains("lunctl delete-snapshot"),
            "{layout}: {e}"
        );
        let d0u = {
            let gw = Gateway::start(&["--pool", &pool]);
            let n = size_of(&gw.uri("vm/disk0"));
            gw.stop_ok();
            n
        };
        assert_eq!(
            d0u,
            40 * MIB,
            "{layout}: the refused resize changed nothing"
        );
        assert_success(
            "lunctl delete-snapshot",
            &lunctl(&["delete-snapshot", &lun, "s1"]),
        );
        assert_success(
            "lunctl resize --disk 0=48M",
            &lunctl(&["resize", &lun, "--disk", "0=48M"]),
        );
        let gw = Gateway::start(&["--pool", &pool]);
        let d0u = gw.uri("vm/disk0");
        assert_eq!(size_of(&d0u), 48 * MIB, "{layout}");
        qemu_io_ok(
            &d0u,
            &[
                "read -P 0x11 0 1M",
                "read -P 0x13 39M 1M",
                "read -P 0 40M 8M",
            ],
        );
        gw.stop_ok();
        check_clean(&lun, layout);
    }
}

/// An RBD resize killed at each step after the image grew (the process
/// ends as under SIGKILL: no destructor runs; its RBD lock is removed as
/// an operator would) leaves a LUN a gateway serves at the old or the new
/// size with every byte of both disks, clean once served; running the
/// resize again completes it.
#[test]
fn an_rbd_resize_killed_at_any_step_leaves_the_lun_before_or_after_it() {
    let c = Cluster::shared();
    let ns = "resize-kill";
    let pool = c.pool(ns);
    for step in ["copied", "label-moved", "zeroed", "label-grown"] {
        let name = format!("k-{step}");
        let out = lunctl(&[
            "create", "--pool", &pool, "--disk", "16M", "--disk", "8M", "--memory", "4M", &name,
        ]);
        assert_success("lunctl create", &out);
        let lun = format!("rbd:rbd/{ns}/{name}.lun:conf={}", c.conf().display());
        let gw = Gateway::start(&["--pool", &pool]);
        qemu_io_ok(
            &gw.uri(&format!("{name}/disk0")),
            &["write -P 0x31 0 1M", "write -P 0x32 15M 1M"],
        );
        qemu_io_ok(
            &gw.uri(&format!("{name}/disk1")),
            &["write -P 0x41 0 1M", "write -P 0x42 7M 1M"],
        );
        gw.stop_ok();
        let out = run_timeout(
            Command::new(bin("lunctl"))
                .args(["resize", &lun, "--disk", "0=40M"])
                .env("LUNGATE_TEST_RESIZE_KILL", step),
            CMD_TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(137), "{step}: {out:?}");
        // The dead lunctl still holds the image's exclusive lock: removed
        // as an operator does after a crash (`rbd lock rm`, which
        // blocklists the dead client first).
        let image = format!("rbd/{ns}/{name}.lun");
        let locks: serde_json::Value =
            serde_json::from_str(&c.rbd(&["lock", "ls", "--format", "json", &image]))
                .expect("rbd lock ls JSON");
        let held: Vec<(String, String)> = match &locks {
            serde_json::Value::Array(v) => v
                .iter()
                .map(|l| {
                    (
                        l["id"].as_str().unwrap().into(),
                        l["locker"].as_str().unwrap().into(),
                    )
                })
                .collect(),
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(id, l)| (id.clone(), l["locker"].as_str().unwrap().into()))
                .collect(),
            other => panic!("{step}: rbd lock ls: {other}"),
        };
        assert_eq!(held.len(), 1, "{step}: {locks}");
        for (id, locker) in &held {
            c.rbd(&["lock", "rm", &image, id, locker]);
        }
        let check = |want: u64| {
            let gw = Gateway::start(&["--pool", &pool]);
            let d0 = gw.uri(&format!("{name}/disk0"));
            let size = size_of(&d0);
            assert!(
                size == 16 * MIB || size == want,
                "{step}: disk0 is {size} bytes"
            );
            qemu_io_ok(&d0, &["read -P 0x31 0 1M", "read -P 0x32 15M 1M"]);
            if size > 16 * MIB {
                qemu_io_ok(&d0, &[&format!("read -P 0 16M {}", size - 16 * MIB)]);
            }
            qemu_io_ok(
                &gw.uri(&format!("{name}/disk1")),
                &["read -P 0x41 0 1M", "read -P 0x42 7M 1M"],
            );
            gw.stop_ok();
            size
        };
        check(40 * MIB);
        // A GPT left behind by the kill is derived data: the gateway's
        // read-write open rewrote it from the label.
        check_clean(&lun, step);
        assert_success(
            "lunctl resize again",
            &lunctl(&["resize", &lun, "--disk", "0=40M"]),
        );
        check_clean(&lun, step);
        assert_eq!(
            check(40 * MIB),
            40 * MIB,
            "{step}: the second resize completed"
        );
    }
}
