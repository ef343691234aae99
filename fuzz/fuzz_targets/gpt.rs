//! The GPT reader of the `offset` layout (`format::gpt::read`: our bounds
//! on the header, then the `gpt` crate), over an in-memory LUN.
//!
//! The input lays out a LUN of 34..=65569 sectors: bytes for its start
//! (protective MBR, primary header, entries) and bytes for its end (backup
//! entries and header). With mode bit 0 the target recomputes both
//! headers' CRCs (entry array and header) as a writer would, so mutations
//! reach the reader's checks behind them. Properties: no input panics or
//! makes the reader allocate beyond libFuzzer's memory limit; every
//! partition returned lies at a representable byte range; a window
//! shorter than the file is read as its own disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lun_manager::format::gpt;
use lungate_fuzz::{crc32, memfd_sparse, Input};

const SECTOR: usize = 512;

/// Recompute the CRCs of the GPT header at `lba`, if it has the signature
/// and names a sane entry array inside `b`.
fn fix_header(b: &mut [u8], lba: usize) {
    let at = lba * SECTOR;
    if b.len() < at + SECTOR || &b[at..at + 8] != b"EFI PART" {
        return;
    }
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let hsize = (u32_at(b, at + 12) as usize).clamp(92, SECTOR);
    let entries_lba = u64::from_le_bytes(b[at + 72..at + 80].try_into().unwrap());
    let (num, size) = (u32_at(b, at + 80) as usize, u32_at(b, at + 84) as usize);
    if let Some(len) = num.checked_mul(size).filter(|l| *l <= 1 << 20) {
        let start = usize::try_from(entries_lba)
            .ok()
            .and_then(|l| l.checked_mul(SECTOR));
        if let Some(s) = start.filter(|s| s.checked_add(len).is_some_and(|e| e <= b.len())) {
            let c = crc32(&b[s..s + len]);
            b[at + 88..at + 92].copy_from_slice(&c.to_le_bytes());
        }
    }
    b[at + 16..at + 20].copy_from_slice(&[0; 4]);
    let c = crc32(&b[at..at + hsize]);
    b[at + 16..at + 20].copy_from_slice(&c.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let sectors = 34 + usize::from(inp.u16());
    let split = usize::from(inp.u16());
    let rest = inp.rest();
    let (head, tail) = rest.split_at(split.min(rest.len()));
    let len = sectors * SECTOR;
    let mut b = vec![0u8; len];
    let h = head.len().min(len);
    b[..h].copy_from_slice(&head[..h]);
    let t = tail.len().min(len);
    b[len - t..].copy_from_slice(&tail[..t]);
    if mode & 1 != 0 {
        fix_header(&mut b, 1);
        fix_header(&mut b, sectors - 1);
    }
    // The reader takes the LUN's bytes as a store object (a file or an
    // RBD image); a memfd behind the file store's object.
    let f = lungate_block::store::file::FileObject::new(
        "memfd".into(),
        std::sync::Arc::new(memfd_sparse(&b)),
        None,
    );
    if let Ok((_guid, parts)) = gpt::read(&f, len as u64) {
        for p in &parts {
            assert!(p.offset.checked_add(p.length).is_some(), "{p:?}");
        }
    }
    // The reader must also cope with a window shorter than the file.
    let _ = gpt::read(&f, (len / 2) as u64 & !511);
});
