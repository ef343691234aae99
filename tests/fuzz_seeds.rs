//! Writes the seed corpora of the fuzz targets (`fuzz/seeds/TARGET/`)
//! from real structures: a pool made by the real `lunctl`, a snapshot and
//! writes through the LUN manager, a diff file, and hand-made NBD and
//! control-API traffic. Each seed starts with the parameter bytes its
//! target reads first (see `fuzz/fuzz_targets/`).
//!
//! Ignored by default (the seeds are checked in);
//! `cargo test -p lungate-tests --test fuzz_seeds -- --ignored` rewrites
//! them.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use lun_manager::group::Group;
use lun_manager::{Access, Lun};
use lungate_api::nbd::proto::{opt, IHAVEOPT, REQUEST_MAGIC};
use lungate_tests::*;

fn seeds() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds")
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    let d = seeds().join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
}

fn option(o: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&o.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn request(extended: bool, flags: u16, cmd: u16, off: u64, len: u64, payload: &[u8]) -> Vec<u8> {
    let magic: u32 = if extended { 0x21e4_1c71 } else { REQUEST_MAGIC };
    let mut b = magic.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&7u64.to_be_bytes());
    b.extend_from_slice(&off.to_be_bytes());
    if extended {
        b.extend_from_slice(&len.to_be_bytes());
    } else {
        b.extend_from_slice(&(len as u32).to_be_bytes());
    }
    b.extend_from_slice(payload);
    b
}

#[test]
#[ignore]
fn write_fuzz_seeds() {
    let mut pool = Pool::new();
    let off = pool.add("s", "offset", &["1M"], "1M").path.clone();
    let trunc = pool.add("t", "truncate", &["1M", "1M"], "1M").path.clone();

    // Labels, GPT, state directory.
    for (name, path) in [("offset", &off), ("truncate", &trunc)] {
        let l = Lun::open(path, Access::ReadOnly).unwrap();
        put("label", name, &[&[0u8][..], &l.label().encode()].concat());
        let mut sd = vec![0u8];
        sd.extend_from_slice(l.uuid().as_bytes());
        sd.extend_from_slice(&(64u64 << 10).to_le_bytes());
        sd.push(0);
        sd.extend_from_slice(&l.directory().encode());
        put("state_dir", name, &sd);
    }
    {
        let f = std::fs::File::open(&off).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        let sectors = len / 512;
        let mut head = vec![0u8; 34 * 512];
        f.read_exact_at(&mut head, 0).unwrap();
        let mut tail = vec![0u8; 33 * 512];
        let tail_at = (len - tail.len()) as u64;
        f.read_exact_at(&mut tail, tail_at).unwrap();
        let mut g = vec![0u8];
        g.extend_from_slice(&((sectors - 34) as u16).to_le_bytes());
        g.extend_from_slice(&(head.len() as u16).to_le_bytes());
        g.extend_from_slice(&head);
        g.extend_from_slice(&tail);
        put("gpt", "offset", &g);
    }

    // Layers: a snapshot, writes into the live delta, a flush.
    let g = Group::open(&off, Access::ReadWrite).unwrap();
    let base = g.primary().disks()[0].offset;
    let v = g.primary().volume().clone();
    v.write(base, &[1u8; 70_000]).unwrap();
    g.snapshot("before", "the first snapshot").unwrap();
    v.write(base + 200_000, &[2u8; 5000]).unwrap();
    v.trim(base, 65536).unwrap();
    v.flush().unwrap();
    let layers = off.with_extension("layers");
    put(
        "manifest",
        "two-layers",
        &[
            &[0u8][..],
            &std::fs::read(layers.join("manifest.0")).unwrap(),
        ]
        .concat(),
    );
    let live = v.chain()[0];
    let delta = std::fs::read(layers.join(format!("{live}.delta"))).unwrap();
    let cs = v.cluster_size();
    let clusters = v.size().div_ceil(cs);
    let hdr = |slot: usize| &delta[slot * 4096..(slot + 1) * 4096];
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let gen = |slot| u64_at(hdr(slot), 16);
    let cur = if gen(0) > gen(1) { 0 } else { 1 };
    let h = hdr(cur);
    let area = u32::from_le_bytes(h[92..96].try_into().unwrap()) as u64;
    let jlen = u64_at(h, 96) as usize;
    let first_seq = u64_at(h, 104);
    let data_start = u64_at(h, 112);
    let area_len = u64_at(h, 120);
    let area_at = (data_start - 2 * area_len) + area * area_len;
    let journal = &delta[area_at as usize..area_at as usize + jlen];
    let mut d = vec![0u8, cs.trailing_zeros() as u8 - 12];
    d.extend_from_slice(&(clusters as u16).to_le_bytes());
    d.extend_from_slice(&((clusters * cs - v.size()) as u16).to_le_bytes());
    let extra = (delta.len() as u64).saturating_sub(data_start).div_ceil(cs);
    d.push(extra.min(255) as u8);
    d.push(first_seq.min(255) as u8);
    d.extend_from_slice(hdr(0));
    d.extend_from_slice(hdr(1));
    d.extend_from_slice(journal);
    put("delta", "live", &d);

    // A diff file from the snapshot to the live volume.
    let mut diff = Vec::new();
    g.write_diff("before", None, &mut diff).unwrap();
    put("diff_file", "before-live", &[&[0u8][..], &diff].concat());
    drop(g);

    // NBD options and requests.
    let mut go = Vec::new();
    go.extend_from_slice(&6u32.to_be_bytes());
    go.extend_from_slice(b"s/disk");
    go.extend_from_slice(&2u16.to_be_bytes());
    go.extend_from_slice(&[0, 3, 0, 1]);
    let mut meta = Vec::new();
    meta.extend_from_slice(&6u32.to_be_bytes());
    meta.extend_from_slice(b"s/disk");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    let mut o = vec![64u8, 0, 1, 7];
    for (n, data) in [
        (opt::STRUCTURED_REPLY, &[][..]),
        (opt::LIST, &[][..]),
        (opt::SET_META_CONTEXT, &meta[..]),
        (opt::INFO, &go[..]),
        (opt::GO, &go[..]),
        (opt::EXTENDED_HEADERS, &[][..]),
    ] {
        o.extend_from_slice(&option(n, data));
    }
    put("nbd_option", "haggling", &o);
    for extended in [false, true] {
        let mut r = vec![u8::from(extended) | 0x0e];
        r.extend_from_slice(&request(extended, 0, 0, 4096, 512, &[]));
        r.extend_from_slice(&request(extended, 1, 1, 0, 16, &[0xab; 16]));
        r.extend_from_slice(&request(extended, 0, 3, 0, 0, &[]));
        r.extend_from_slice(&request(extended, 8, 7, 0, 1 << 20, &[]));
        r.extend_from_slice(&request(extended, 0, 2, 0, 0, &[]));
        put(
            "nbd_request",
            if extended { "extended" } else { "compact" },
            &r,
        );
    }

    // Control API bodies (the first byte selects the decoder).
    let bodies: [(u8, &str); 12] = [
        (
            0,
            r#"{"name":"before-upgrade","description":"kernel 6.12"}"#,
        ),
        (1, r#"{"snapshot":"before-upgrade"}"#),
        (2, r#"{"snapshot":"before-upgrade","name":"vm2"}"#),
        (4, "from=s1&to=s2"),
        (
            5,
            r#"{"vcpus":2,"memory_bytes":67108864,"devices":[{"kind":"virtio-blk","disk":0}]}"#,
        ),
        (
            6,
            r#"{"disks":[{"index":0,"id":"00112233445566778899aabbccddeeff","export_name":"vm/disk0","description":""}]}"#,
        ),
        (
            7,
            r#"{"disks":[{"lun_uuid":"6a8f3b1c-2d4e-4f60-8a9b-0c1d2e3f4a5b","name":"data","path_hint":"data.lun","attached":1700000000}]}"#,
        ),
        (
            8,
            r#"{"snapshots":[{"name":"s1","created":1,"description":"d"},{"name":"s2","parent":"s1","created":2}],"clone_of":{"lun_uuid":"6a8f3b1c-2d4e-4f60-8a9b-0c1d2e3f4a5b","snapshot":"s1"}}"#,
        ),
        (
            9,
            r#"{"extents":[{"guest_addr":0,"length":4096,"image":0,"image_offset":0}]}"#,
        ),
        (
            10,
            r#"{"owner":"lungate","host":"h","pid":1,"since":2,"control":"/p/.lungate.sock"}"#,
        ),
        (
            11,
            r#"{"key":"00112233445566778899aabbccddeeff","generation":1,"lun_uuid":"6a8f3b1c-2d4e-4f60-8a9b-0c1d2e3f4a5b"}"#,
        ),
        (12, "memory-image"),
    ];
    for (i, (which, body)) in bodies.iter().enumerate() {
        put(
            "control_api",
            &format!("body{i}"),
            &[&[*which][..], body.as_bytes()].concat(),
        );
    }
    let batch = br#"{"put":[{"type":"hardware-config","instance":0,"length":3}],"remove":[{"type":"vcpu-state","instance":1}]}"#;
    let mut b = vec![3u8];
    b.extend_from_slice(&(batch.len() as u32).to_le_bytes());
    b.extend_from_slice(batch);
    b.extend_from_slice(b"{}\n");
    put("control_api", "batch", &b);
}
