//! The handshake's option decoder (`OptionCodec`) and the payload parsers
//! of NBD_OPT_INFO/GO and NBD_OPT_{LIST,SET}_META_CONTEXT.
//!
//! Properties: no input panics; the frames do not depend on how the stream
//! is cut into reads (all at once or in pieces of 1..=256 bytes); a decoded
//! option re-encodes to exactly the bytes it consumed; an accepted INFO/GO
//! or META payload re-encodes to itself (both formats are canonical).
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use lungate::nbd::codec::{parse_info_request, parse_meta_request, OptionCodec, OptionFrame};
use lungate_api::nbd::proto::IHAVEOPT;
use lungate_fuzz::Input;
use tokio_util::codec::Decoder;

#[derive(Debug, PartialEq)]
enum End {
    NeedMore,
    Absurd,
    Error,
}

/// Feed `stream` in pieces of `piece` bytes; frames, how it ended, and the
/// bytes left unconsumed.
fn decode_all(max: u32, skip: u32, stream: &[u8], piece: usize) -> (Vec<OptionFrame>, End, usize) {
    let mut c = OptionCodec::new(max, skip);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    loop {
        match c.decode(&mut buf) {
            Ok(Some(f @ OptionFrame::Absurd { .. })) => {
                frames.push(f);
                return (frames, End::Absurd, buf.len() + stream.len() - fed);
            }
            Ok(Some(f)) => frames.push(f),
            Ok(None) => {
                if fed == stream.len() {
                    return (frames, End::NeedMore, buf.len());
                }
                let n = piece.min(stream.len() - fed);
                buf.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
            }
            Err(_) => return (frames, End::Error, buf.len() + stream.len() - fed),
        }
    }
}

fn encode_info(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(name.len() as u32);
    b.put_slice(name);
    b.put_u16(infos.len() as u16);
    for i in infos {
        b.put_u16(*i);
    }
    b.to_vec()
}

fn encode_meta(name: &[u8], queries: &[bytes::Bytes]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(name.len() as u32);
    b.put_slice(name);
    b.put_u32(queries.len() as u32);
    for q in queries {
        b.put_u32(q.len() as u32);
        b.put_slice(q);
    }
    b.to_vec()
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    // Small caps, so payloads past them (skipped) and absurd lengths are
    // both reachable with short inputs.
    let max = u32::from(inp.u8()) * 8;
    let skip = max + u32::from(inp.u16());
    let piece = usize::from(inp.u8()) + 1;
    let stream = inp.rest();

    let whole = decode_all(max, skip, stream, stream.len().max(1));
    let pieces = decode_all(max, skip, stream, piece);
    assert_eq!(whole, pieces, "frames depend on how the stream was read");

    // Re-encode the leading run of whole requests: exactly the bytes they
    // consumed.
    let mut again = BytesMut::new();
    for f in &whole.0 {
        let OptionFrame::Request(r) = f else { break };
        again.put_u64(IHAVEOPT);
        again.put_u32(r.option);
        again.put_u32(r.data.len() as u32);
        again.put_slice(&r.data);
    }
    assert_eq!(
        &stream[..again.len()],
        &again[..],
        "an option did not re-encode to its bytes"
    );

    for f in &whole.0 {
        let OptionFrame::Request(r) = f else { continue };
        if let Some((name, infos)) = parse_info_request(&r.data) {
            assert_eq!(encode_info(&name, &infos), &r.data[..], "INFO/GO payload");
        }
        if let Some((name, queries)) = parse_meta_request(&r.data) {
            assert_eq!(
                encode_meta(&name, &queries),
                &r.data[..],
                "META_CONTEXT payload"
            );
        }
    }
});
