//! The state-record routes end to end on a real gateway: a batch streams
//! in and commits atomically, reads stream out with their checksum, a
//! refused or cut-short batch changes nothing, gateway-managed records are
//! read-only, and none of it is reachable through the disk export.

use std::io::Read;

use lungate_api::records::{HardwareConfig, RecordType};
use lungate_api::types::{RecordBatch, RecordPut, RecordRef};
use lungate_api::Client;
use lungate_tests::*;

fn put(rtype: RecordType, instance: u16, length: u64) -> RecordPut {
    RecordPut {
        rtype,
        instance,
        length,
    }
}

#[test]
fn record_batches_stream_commit_atomically_and_stay_out_of_the_disk_export() {
    let mut pool = Pool::new();
    pool.add("vm", "offset", &["16M"], "32M");
    let gw = Gateway::start(&["--pool", pool.arg()]);
    let c = Client::new(&gw.control()).unwrap();
    let before = c.records("vm").unwrap();
    assert!(before
        .records
        .iter()
        .any(|r| r.rtype == RecordType::HardwareConfig));

    // A 20 MiB image (bigger than any one chunk) and a vCPU blob, in one batch.
    let image = pattern_bytes(20 << 20, 7);
    let batch = RecordBatch {
        put: vec![
            put(RecordType::MemoryImage, 0, image.len() as u64),
            put(RecordType::VcpuState, 0, 5),
        ],
        remove: vec![],
    };
    let w = c
        .write_records("vm", &batch, |i, sink| match i {
            0 => image.chunks(777_777).try_for_each(|p| sink.write(p)),
            _ => sink.write(b"regs!"),
        })
        .unwrap();
    assert_eq!(w.generation, before.generation + 1);
    let mut r = c.record_reader("vm", RecordType::MemoryImage, 0).unwrap();
    assert_eq!(r.len(), image.len() as u64);
    let mut back = Vec::new();
    r.read_to_end(&mut back).unwrap();
    assert!(back == image, "image read back differs");
    assert_eq!(
        c.record("vm", RecordType::VcpuState, 0).unwrap().unwrap(),
        b"regs!"
    );
    assert_eq!(c.record("vm", RecordType::VcpuState, 9).unwrap(), None);

    // Replace the blob and remove the image in one commit.
    let batch = RecordBatch {
        put: vec![put(RecordType::VcpuState, 0, 3)],
        remove: vec![RecordRef {
            rtype: RecordType::MemoryImage,
            instance: 0,
        }],
    };
    c.write_records("vm", &batch, |_, s| s.write(b"new"))
        .unwrap();
    assert_eq!(c.record("vm", RecordType::MemoryImage, 0).unwrap(), None);
    let gen = c.records("vm").unwrap().generation;

    // A payload cut short: refused, and the directory has not moved.
    let batch = RecordBatch {
        put: vec![
            put(RecordType::VcpuState, 0, 4),
            put(RecordType::MemoryImage, 1, 1 << 20),
        ],
        remove: vec![],
    };
    let e = c
        .write_records("vm", &batch, |i, s| {
            if i == 0 {
                s.write(b"lost")
            } else {
                Err(std::io::Error::other("source failed"))
            }
        })
        .unwrap_err();
    assert!(e.to_string().contains("source failed"), "{e}");
    let now = c.records("vm").unwrap();
    assert_eq!(now.generation, gen);
    assert_eq!(
        c.record("vm", RecordType::VcpuState, 0).unwrap().unwrap(),
        b"new"
    );

    // Gateway-managed records are read-only; a bad hardware config is refused.
    for t in [
        RecordType::Owner,
        RecordType::Identity,
        RecordType::SnapshotTree,
    ] {
        let b = RecordBatch {
            put: vec![put(t, 0, 2)],
            remove: vec![],
        };
        let e = c
            .write_records("vm", &b, |_, s| s.write(b"{}"))
            .unwrap_err();
        assert_eq!(e.status(), Some(400), "{t}: {e}");
    }
    let huge = serde_json::to_vec(&HardwareConfig {
        vcpus: 1,
        memory_bytes: 1 << 30,
        devices: vec![],
    })
    .unwrap();
    let b = RecordBatch {
        put: vec![put(RecordType::HardwareConfig, 0, huge.len() as u64)],
        remove: vec![],
    };
    let e = c
        .write_records("vm", &b, |_, s| s.write(&huge))
        .unwrap_err();
    assert!(e.to_string().contains("needs a state region"), "{e}");
    assert_eq!(c.records("vm").unwrap().generation, gen);

    // More than the state region holds: refused with the reason, even
    // though the gateway stops writing payload early.
    let b = RecordBatch {
        put: vec![put(RecordType::MemoryImage, 5, 200 << 20)],
        remove: vec![],
    };
    let chunk = vec![3u8; 1 << 20];
    let e = c
        .write_records("vm", &b, |_, s| (0..200).try_for_each(|_| s.write(&chunk)))
        .unwrap_err();
    assert!(e.to_string().contains("state region full"), "{e}");
    assert_eq!(c.records("vm").unwrap().generation, gen);

    // Unknown LUN and unknown type are clear errors.
    let e = c.records("nope").unwrap_err();
    assert_eq!(e.status(), Some(404));
    let e = c
        .get::<serde_json::Value>("/v1/luns/vm/records/memory/0")
        .unwrap_err();
    assert!(e.to_string().contains("unknown state record type"), "{e}");

    // None of it is visible through the guest's disk: still all zeros.
    qemu_io_ok(&gw.uri("vm/disk0"), &["read -P 0 0 16M"]);
    drop(c);
    gw.stop_ok();
}

#[test]
fn the_typed_client_speaks_tcp_with_the_bearer_token_and_streams_records_there_too() {
    use lungate_api::client::Endpoint;
    let mut pool = Pool::new();
    pool.add("vm", "offset", &["16M"], "32M");
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "tok-123\n").unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "pools = [{:?}]\n[control]\ntcp = \"127.0.0.1:0\"\ntoken_file = {:?}\n",
            pool.arg(),
            token.to_str().unwrap()
        ),
    )
    .unwrap();
    let gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    let addr = gw.control_tcp();
    let bad = Client::connect(Endpoint::Tcp {
        addr,
        token: "tok-124".into(),
    })
    .unwrap();
    assert_eq!(bad.luns().unwrap_err().status(), Some(401));
    let c = Client::connect(Endpoint::Tcp {
        addr,
        token: "tok-123".into(),
    })
    .unwrap();
    assert_eq!(c.luns().unwrap()[0].name, "vm");
    let image = pattern_bytes(3 << 20, 9);
    let batch = RecordBatch {
        put: vec![put(RecordType::MemoryImage, 0, image.len() as u64)],
        remove: vec![],
    };
    c.write_records("vm", &batch, |_, s| s.write(&image))
        .unwrap();
    let mut back = Vec::new();
    c.record_reader("vm", RecordType::MemoryImage, 0)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == image);
    gw.stop_ok();
}
