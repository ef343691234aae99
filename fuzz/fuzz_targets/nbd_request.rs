//! The transmission phase's request decoder (`RequestCodec`), compact
//! (28-byte, 32-bit length) and extended (32-byte, 64-bit length) headers,
//! with the session's framing around it: a request's payload follows its
//! header and is skipped here as the session reads it.
//!
//! Properties: no input panics; the headers do not depend on how the
//! stream is cut into reads; each header re-encodes to exactly the bytes
//! it was decoded from (both forms are canonical); the payload length is
//! the header's length exactly when the request carries data (a WRITE, or
//! an extended request with PAYLOAD_LEN) and zero otherwise.
#![no_main]

use bytes::{Buf, BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use lungate::nbd::codec::{RequestCodec, RequestHeader};
use lungate_api::nbd::proto::{cmd_flags, Command, EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC};
use lungate_fuzz::Input;
use tokio_util::codec::Decoder;

/// Headers with the stream offset each started at, and whether decoding
/// ended in an error.
fn decode_all(extended: bool, stream: &[u8], piece: usize) -> (Vec<(usize, RequestHeader)>, bool) {
    let mut c = RequestCodec::new(extended);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let (mut fed, mut consumed, mut skip) = (0usize, 0usize, 0u64);
    loop {
        if skip > 0 {
            let n = (buf.len() as u64).min(skip) as usize;
            buf.advance(n);
            consumed += n;
            skip -= n as u64;
        }
        let decoded = if skip > 0 {
            Ok(None)
        } else {
            c.decode(&mut buf)
        };
        match decoded {
            Ok(Some(h)) => {
                out.push((consumed, h));
                consumed += if extended { 32 } else { 28 };
                skip = h.payload;
            }
            Ok(None) => {
                if fed == stream.len() {
                    return (out, false);
                }
                let n = piece.min(stream.len() - fed);
                buf.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
            }
            Err(_) => return (out, true),
        }
    }
}

fn encode(h: &RequestHeader, extended: bool) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    });
    b.put_u16(h.flags);
    b.put_u16(h.command.to_wire());
    b.put_u64(h.handle);
    b.put_u64(h.offset);
    if extended {
        b.put_u64(h.length);
    } else {
        b.put_u32(u32::try_from(h.length).expect("a compact length fits 32 bits"));
    }
    b.to_vec()
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let extended = mode & 1 != 0;
    let piece = usize::from(mode >> 1) + 1;
    let stream = inp.rest();

    let whole = decode_all(extended, stream, stream.len().max(1));
    let pieces = decode_all(extended, stream, piece);
    assert_eq!(whole, pieces, "headers depend on how the stream was read");

    for (at, h) in &whole.0 {
        let bytes = encode(h, extended);
        assert_eq!(
            &stream[*at..*at + bytes.len()],
            &bytes[..],
            "header at {at} did not re-encode"
        );
        assert_eq!(Command::from_wire(h.command.to_wire()), h.command);
        let carries =
            h.command == Command::Write || (extended && h.flags & cmd_flags::PAYLOAD_LEN != 0);
        assert_eq!(h.payload, if carries { h.length } else { 0 }, "{h:?}");
        let _ = h.command.allowed_flags(extended);
    }
});
