//! The diff file verifier (`volume::diff::verify`), which reads a whole
//! diff file into a spool while checking its structure and blake3 trailer
//! before `apply` writes anything.
//!
//! Mode bit 0 recomputes the trailer's blake3 over the mutated bytes, so
//! mutations reach the structural checks; mode bit 1 instead builds a
//! well-formed file from the input (names, sections, extents and data
//! chosen by it) with the format's encoder as docs/volumes.md specifies it,
//! which must verify. Properties: no input panics; an accepted file has
//! non-empty, ascending, non-overlapping extents inside each section's
//! size, its spool holds every byte before the checksum, and it
//! re-encodes from what was decoded to exactly itself (the format is
//! canonical); with any single bit flipped it is refused.
#![no_main]

use std::io::{Read, Seek, SeekFrom};

use libfuzzer_sys::fuzz_target;
use lungate_block::volume::diff::{verify, DiffInfo};
use lungate_block::volume::ChangeKind;
use lungate_fuzz::{fix_blake3, memfd, Input};

/// Encode `info` with the data extents' bytes taken from `data` in order.
/// `v1`: the format before base digests (magic LGDIFF01, no base ranges).
fn encode(info: &DiffInfo, v1: bool, data: &mut impl FnMut(u64) -> Vec<u8>) -> Vec<u8> {
    let to = info.to.as_deref().unwrap_or("");
    let mut b = Vec::new();
    b.extend_from_slice(if v1 { b"LGDIFF01" } else { b"LGDIFF02" });
    b.extend_from_slice(&(info.sections.len() as u32).to_le_bytes());
    b.extend_from_slice(&(info.from.len() as u16).to_le_bytes());
    b.extend_from_slice(&(to.len() as u16).to_le_bytes());
    b.extend_from_slice(info.from.as_bytes());
    b.extend_from_slice(to.as_bytes());
    for (i, s) in info.sections.iter().enumerate() {
        b.extend_from_slice(b"LGDS");
        b.extend_from_slice(&(i as u32).to_le_bytes());
        b.extend_from_slice(s.lun.as_bytes());
        b.extend_from_slice(&s.size.to_le_bytes());
        b.extend_from_slice(&s.cluster_size.to_le_bytes());
        b.extend_from_slice(&(s.base.len() as u32).to_le_bytes());
        b.extend_from_slice(&(s.changes.len() as u64).to_le_bytes());
        for r in &s.base {
            b.extend_from_slice(&r.start.to_le_bytes());
            b.extend_from_slice(&r.end.to_le_bytes());
        }
        if let Some(d) = s.base_digest {
            b.extend_from_slice(&d);
        }
        for c in &s.changes {
            b.extend_from_slice(&c.offset.to_le_bytes());
            b.extend_from_slice(&c.length.to_le_bytes());
            b.push(match c.kind {
                ChangeKind::Data => 1,
                ChangeKind::Zero => 2,
            });
            b.extend_from_slice(&[0; 7]);
            if c.kind == ChangeKind::Data {
                b.extend_from_slice(&data(c.length));
            }
        }
    }
    b.extend_from_slice(b"LGDIFEND");
    b.extend_from_slice(&[0; 32]);
    let at = b.len() - 32;
    fix_blake3(&mut b, at);
    b
}

/// A well-formed diff built from the input.
fn build(inp: &mut Input) -> Vec<u8> {
    let v1 = inp.u8() & 1 != 0;
    use lungate_block::volume::diff::SectionInfo;
    use lungate_block::volume::Change;
    let name = |inp: &mut Input, min: usize| {
        let n = usize::from(inp.u8() % 129).max(min);
        String::from_utf8_lossy(inp.take(n))
            .chars()
            .take(n)
            .collect::<String>()
    };
    let mut from = name(inp, 1);
    while from.len() > 128 {
        from.pop();
    }
    if from.is_empty() {
        from.push('s');
    }
    let mut to = name(inp, 0);
    while to.len() > 128 {
        to.pop();
    }
    let mut sections = Vec::new();
    for _ in 0..(inp.u8() % 3 + 1) {
        let size = u64::from(inp.u32()) + 1;
        let cluster_size = inp.u32();
        let lun = uuid::Uuid::from_u128(u128::from(inp.u64()));
        let mut changes = Vec::new();
        let mut at = 0u64;
        for _ in 0..(inp.u8() % 5) {
            let offset = at.saturating_add(u64::from(inp.u16()));
            let length = u64::from(inp.u8() % 64) + 1;
            if offset.checked_add(length).is_none_or(|e| e > size) {
                break;
            }
            let kind = if inp.u8() & 1 == 0 {
                ChangeKind::Data
            } else {
                ChangeKind::Zero
            };
            changes.push(Change {
                offset,
                length,
                kind,
            });
            at = offset + length;
        }
        let mut base = Vec::new();
        let mut end = 0u64;
        for _ in 0..if v1 { 0 } else { inp.u8() % 4 } {
            let start = end.saturating_add(u64::from(inp.u16()));
            let stop = start.saturating_add(u64::from(inp.u8()) + 1);
            if stop > size {
                break;
            }
            base.push(start..stop);
            end = stop;
        }
        let base_digest = (!base.is_empty()).then(|| {
            let mut d = [0u8; 32];
            d.copy_from_slice(&lungate_fuzz::padded(inp.take(32), 32));
            d
        });
        sections.push(SectionInfo {
            lun,
            size,
            cluster_size,
            changes,
            base,
            base_digest,
            base_only: false,
        });
    }
    let info = DiffInfo {
        from,
        to: (!to.is_empty()).then_some(to),
        sections,
    };
    let fill = inp.u8();
    encode(&info, v1, &mut |n| vec![fill; n as usize])
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let b = if mode & 2 != 0 {
        build(&mut inp)
    } else {
        let mut b = inp.rest().to_vec();
        if mode & 1 != 0 && b.len() >= 32 {
            let at = b.len() - 32;
            fix_blake3(&mut b, at);
        }
        b
    };
    let check = |b: &[u8]| {
        let mut spool = memfd(&[], 0);
        verify(&mut &b[..], &mut spool, std::path::Path::new("spool")).map(|i| (i, spool))
    };
    let r = check(&b);
    if mode & 2 != 0 {
        assert!(r.is_ok(), "a well-formed diff was refused: {:?}", r.err());
    }
    let Ok((info, mut spool)) = r else { return };
    for s in &info.sections {
        let mut end = 0;
        for c in &s.changes {
            assert!(c.length > 0 && c.offset >= end, "{c:?}");
            end = c.offset + c.length;
            assert!(end <= s.size, "{c:?} beyond {}", s.size);
        }
    }
    let mut spooled = Vec::new();
    spool.seek(SeekFrom::Start(0)).unwrap();
    spool.read_to_end(&mut spooled).unwrap();
    assert_eq!(
        &spooled[..],
        &b[..b.len() - 32],
        "the spool is not the file before its checksum"
    );
    // Data extents' bytes in file order, as re-encoding consumes them.
    let mut at = 16 + info.from.len() + info.to.as_ref().map_or(0, |t| t.len());
    let mut chunks = Vec::new();
    for s in &info.sections {
        at += 48 + 16 * s.base.len() + if s.base_digest.is_some() { 32 } else { 0 };
        for c in &s.changes {
            at += 24;
            if c.kind == ChangeKind::Data {
                chunks.push(b[at..at + c.length as usize].to_vec());
                at += c.length as usize;
            }
        }
    }
    let mut it = chunks.into_iter();
    let again = encode(&info, &b[..8] == b"LGDIFF01", &mut |_| {
        it.next().expect("one chunk per data extent")
    });
    assert_eq!(again, b, "an accepted diff did not re-encode to itself");
    lungate_fuzz::assert_every_flip_refused(&b, 512, |c| check(c).is_ok());
});
