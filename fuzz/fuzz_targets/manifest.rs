//! The manifest slot decoder (`volume::manifest::decode`: header, blake3,
//! JSON body, `Manifest::validate`).
//!
//! Mode bit 0 makes the slot self-consistent before decoding (the body
//! length field from the input's length, the blake3 trailer recomputed),
//! so mutations of the JSON body reach serde and the structural checks.
//! Properties: no input panics; an accepted slot validates, and
//! re-encoding it gives a slot that decodes to the same manifest and
//! generation and is a fixed point of decode+encode (the JSON body itself
//! is not canonical: whitespace and key order may differ); with any single
//! bit flipped an accepted slot is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lungate_block::volume::manifest::{decode, encode};
use lungate_fuzz::{assert_every_flip_refused, fix_blake3, Input};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let body = inp.rest();
    let _ = decode(body);
    let mut b = body.to_vec();
    if mode & 1 != 0 {
        if b.len() < 96 {
            b.resize(96, 0);
        }
        let n = (b.len() - 96) as u32;
        b[12..16].copy_from_slice(&n.to_le_bytes());
        let at = b.len() - 32;
        fix_blake3(&mut b, at);
    }
    let Ok((m, generation)) = decode(&b) else {
        return;
    };
    assert!(m.validate().is_ok());
    let e = encode(&m, generation);
    let (m2, g2) = decode(&e).expect("a re-encoded manifest decodes");
    assert_eq!((&m2, g2), (&m, generation));
    assert_eq!(encode(&m2, g2), e, "decode+encode is not a fixed point");
    assert_every_flip_refused(&b, 2048, |c| decode(c).is_ok());
});
