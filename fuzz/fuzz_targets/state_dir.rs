//! The state region's directory slot decoder (`Directory::decode`) and the
//! allocator that runs on what it returns.
//!
//! The input is the start of a 64 KiB slot (the rest zeros, as in a fresh
//! slot); the first byte picks the mode (bit 0: recompute the checksum so
//! the fuzzer reaches the entry checks) and the next 16 the LUN UUID the
//! caller expects (bit 1: take it from the slot itself). Properties: no
//! input panics; an accepted slot re-encodes to exactly itself; entries
//! lie inside the data area and never overlap; `allocate` returns space
//! that overlaps no entry; a single flipped bit is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lun_manager::format::state::{Directory, DATA_START, DIR_SLOT_SIZE};
use lungate_fuzz::{assert_every_flip_refused, fix_blake3, padded, Input};
use uuid::Uuid;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let want = Uuid::from_bytes(inp.take(16).try_into().unwrap_or([0; 16]));
    let alloc = inp.u64() >> (inp.u8() % 64);
    let body = inp.rest();
    let _ = Directory::decode(body, want, lun_manager::format::state::DATA_START);
    let mut b = padded(body, DIR_SLOT_SIZE);
    if mode & 1 != 0 {
        fix_blake3(&mut b, DIR_SLOT_SIZE - 32);
    }
    let lun = if mode & 2 != 0 {
        Uuid::from_slice(&b[24..40]).expect("16 bytes")
    } else {
        want
    };
    let Ok(d) = Directory::decode(&b, lun, lun_manager::format::state::DATA_START) else {
        return;
    };
    assert_eq!(
        d.encode(),
        b,
        "an accepted directory did not re-encode to itself"
    );
    for (i, e) in d.entries.iter().enumerate() {
        assert!(e.offset >= DATA_START && e.end() <= d.region_len, "{e:?}");
        for x in &d.entries[..i] {
            assert!(
                e.length == 0 || x.length == 0 || e.end() <= x.offset || x.end() <= e.offset,
                "{e:?} overlaps {x:?}"
            );
        }
    }
    if let Some(at) = d.allocate(alloc, d.region_len) {
        let end = at.checked_add(alloc).expect("allocation end overflows");
        assert!(
            at >= DATA_START && end <= d.region_len,
            "allocated [{at}, {end})"
        );
        for e in d.entries.iter().filter(|e| e.length > 0) {
            assert!(
                alloc == 0 || end <= e.offset || e.end() <= at,
                "allocated over {e:?}"
            );
        }
    }
    // 64 KiB: sample 512 positions.
    assert_every_flip_refused(&b, 512, |c| {
        Directory::decode(c, lun, lun_manager::format::state::DATA_START).is_ok()
    });
});
