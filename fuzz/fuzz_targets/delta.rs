//! A delta layer's metadata: the header slot decoder (`Header::decode`),
//! the choice between the two slots with its torn-write rules
//! (`layer::read_header`), the journal decoder (`journal::decode`) and the
//! whole open of a delta object (`Delta::open`: header, identity,
//! geometry, journal replay, double mapping, file length).
//!
//! The input picks a geometry (cluster size 4 KiB..2 MiB, up to 65535
//! clusters, a partial last cluster), then holds header slot 0, header
//! slot 1 and journal bytes; the object is an in-memory file with the
//! slots at 0 and 4096, the journal bytes at the start of both journal
//! areas and a chosen length. Mode bits make parts self-consistent so
//! mutations reach the checks behind them: 1 recomputes the slots'
//! checksums, 2 writes the expected layer, LUN and geometry into the slots
//! first, 4 recomputes every journal record's checksum and sets both
//! slots' journal length to the journal's. Properties: no input panics;
//! an accepted slot re-encodes to itself and refuses any flipped bit; an
//! accepted journal re-encodes record by record to itself and refuses any
//! flipped bit; an opened delta maps exactly what replaying its journal
//! gives, each physical cluster at most once, inside the file.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use lungate_block::store::file::FileObject;
use lungate_block::volume::header::{Geometry, Header, HEADER_SIZE};
use lungate_block::volume::journal;
use lungate_block::volume::layer::{read_header, Delta};
use lungate_fuzz::{assert_every_flip_refused, fix_blake3, memfd, padded, Input};
use uuid::Uuid;

const LAYER: Uuid = Uuid::from_u128(0x1111_2222_3333_4444_5555_6666_7777_8888);
const LUN: Uuid = Uuid::from_u128(0x9999_aaaa_bbbb_cccc_dddd_eeee_ffff_0001);

/// Record boundaries of a journal that decoded: re-encode each record.
fn reencode(jb: &[u8], first_seq: u64, clusters: u64, max_phys: u64) -> Vec<u8> {
    let (mut at, mut seq, mut out) = (0usize, first_seq, Vec::new());
    while at < jb.len() {
        let n = u32::from_le_bytes(jb[at + 4..at + 8].try_into().unwrap()) as usize;
        let len = 16 + 16 * n + 32;
        let (entries, next) = journal::decode(&jb[at..at + len], seq, clusters, max_phys)
            .expect("a record of an accepted journal decodes alone");
        out.extend_from_slice(&journal::encode(&entries, seq).0);
        (at, seq) = (at + len, next);
    }
    out
}

/// Recompute the checksum of every record whose header is there; clamp
/// entry counts so the records tile the bytes.
fn fix_journal(jb: &mut [u8]) {
    let mut at = 0usize;
    while jb.len() - at >= 48 {
        let n = u32::from_le_bytes(jb[at + 4..at + 8].try_into().unwrap()) as usize;
        let fit = (jb.len() - at - 48) / 16;
        let n = n.clamp(1, journal::MAX_PER_RECORD).min(fit.max(1));
        if 48 + 16 * n > jb.len() - at {
            return;
        }
        jb[at + 4..at + 8].copy_from_slice(&(n as u32).to_le_bytes());
        let sum_at = at + 16 + 16 * n;
        let sum = blake3::hash(&jb[at..sum_at]);
        jb[sum_at..sum_at + 32].copy_from_slice(sum.as_bytes());
        at = sum_at + 32;
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let cs = 4096u64 << (inp.u8() % 10);
    let clusters = u64::from(inp.u16()).max(1);
    let size = clusters * cs - u64::from(inp.u16()) % cs;
    let extra = u64::from(inp.u8());
    let first_seq = u64::from(inp.u8());
    let Some(geo) = Geometry::new(cs, size) else {
        return;
    };
    let mut slots = [
        padded(inp.take(HEADER_SIZE), HEADER_SIZE),
        padded(inp.take(HEADER_SIZE), HEADER_SIZE),
    ];
    let mut jb = inp.rest().to_vec();
    // The identity Delta::open expects: fixed ones written into the slots
    // (mode 2), else what slot 0 names (real files as seeds).
    let (layer, lun) = if mode & 2 != 0 {
        (LAYER, LUN)
    } else {
        let id = |o: usize| Uuid::from_slice(&slots[0][o..o + 16]).expect("16 bytes");
        (id(24), id(56))
    };
    if mode & 4 != 0 {
        fix_journal(&mut jb);
    }
    for s in &mut slots {
        if mode & 2 != 0 {
            s[0..8].copy_from_slice(b"LGDELTA\0");
            s[8..10].copy_from_slice(&1u16.to_le_bytes());
            s[12..16].copy_from_slice(&(cs as u32).to_le_bytes());
            s[24..40].copy_from_slice(LAYER.as_bytes());
            s[56..72].copy_from_slice(LUN.as_bytes());
            s[72..80].copy_from_slice(&size.to_le_bytes());
            s[104..112].copy_from_slice(&first_seq.to_le_bytes());
            s[112..120].copy_from_slice(&geo.data_start.to_le_bytes());
            s[120..128].copy_from_slice(&geo.area_len.to_le_bytes());
        }
        if mode & 4 != 0 {
            s[96..104].copy_from_slice(&(jb.len() as u64).to_le_bytes());
        }
        if mode & 1 != 0 {
            fix_blake3(s, HEADER_SIZE - 32);
        }
    }

    for s in &slots {
        if let Ok(h) = Header::decode(s) {
            assert_eq!(
                &h.encode()[..],
                &s[..],
                "an accepted header did not re-encode to itself"
            );
            assert_every_flip_refused(s, 256, |c| Header::decode(c).is_ok());
        }
    }

    let max_phys = ((u64::MAX - geo.data_start) / cs - 1).min((1 << 46) - 1);
    if let Ok((entries, _)) = journal::decode(&jb, first_seq, geo.clusters, max_phys) {
        assert_eq!(reencode(&jb, first_seq, geo.clusters, max_phys), jb);
        assert!(entries.iter().all(|(vc, _)| *vc < geo.clusters));
        assert_every_flip_refused(&jb, 256, |c| {
            journal::decode(c, first_seq, geo.clusters, max_phys).is_ok()
        });
    }

    // The object: slots, the journal at the start of both areas, a length
    // of the data area's start plus `extra` clusters.
    let mut file = [slots[0].as_slice(), slots[1].as_slice()].concat();
    let jmax = (geo.area_len as usize).min(jb.len());
    let len = geo.data_start + extra * cs;
    let f = memfd(&file, len);
    for area in 0..2 {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&jb[..jmax], geo.area_at(area))
            .expect("write memfd");
    }
    file.clear();
    let obj = Arc::new(FileObject::new(
        PathBuf::from("fuzz.delta"),
        Arc::new(f),
        None,
    ));
    let picked = read_header(&*obj);
    let Ok((d, _warnings)) = Delta::open(obj, layer, lun, geo) else {
        return;
    };
    let (h, _, _) = picked.expect("Delta::open accepted a header read_header refused");
    assert_eq!(d.header(), h);
    // What the journal replay must give: the committed bytes as the file
    // holds them (zeros past what the input wrote).
    let committed = padded(&jb[..jmax], h.journal_len as usize);
    let (entries, _) = journal::decode(&committed, h.first_seq, geo.clusters, max_phys)
        .expect("Delta::open accepted a journal that does not decode");
    let mut want = HashMap::new();
    for (vc, v) in entries {
        want.insert(vc, v);
    }
    for vc in 0..geo.clusters {
        assert_eq!(
            d.get(vc),
            want.get(&vc).copied().unwrap_or(0),
            "cluster {vc}"
        );
    }
    let mut phys = HashSet::new();
    for (vc, v) in &want {
        if journal::kind(*v) == journal::KIND_DATA {
            let p = journal::phys(*v);
            assert!(phys.insert(p), "physical cluster {p} mapped twice");
            assert!(
                geo.phys_offset(p) < len,
                "cluster {vc} maps past the file's end"
            );
        }
    }
});
