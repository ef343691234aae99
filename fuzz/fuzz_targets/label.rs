//! The label block decoder (`Label::decode`, with `Label::validate`).
//!
//! The first input byte picks the mode: bit 0 set recomputes the blake3
//! checksum over the mutated block first, so the fuzzer reaches every field
//! check behind it. Properties: no input panics; an accepted block
//! re-encodes to exactly itself (the format is canonical: reserved bytes
//! and padding must be zero) but for the minor version, which a reader
//! accepts whatever it is and a writer sets to its own; with any single
//! bit flipped it is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lun_manager::format::label::{Label, LABEL_SIZE, VERSION_MINOR};
use lungate_fuzz::{assert_every_flip_refused, fix_blake3, padded, Input};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let body = inp.rest();
    // Any length, as read from a file of any size.
    let _ = Label::decode(body);
    let mut b = padded(body, LABEL_SIZE);
    if mode & 1 != 0 {
        fix_blake3(&mut b, LABEL_SIZE - 32);
    }
    if let Ok(l) = Label::decode(&b) {
        let mut want = b.clone();
        want[10..12].copy_from_slice(&VERSION_MINOR.to_le_bytes());
        fix_blake3(&mut want, LABEL_SIZE - 32);
        assert_eq!(
            &l.encode()[..],
            &want[..],
            "an accepted label did not re-encode to itself"
        );
        assert!(l.validate().is_ok());
        assert_every_flip_refused(&b, LABEL_SIZE, |c| Label::decode(c).is_ok());
    }
});
