//! Wire framing for both NBD phases, as tokio-util `Decoder`/`Encoder`s.
//!
//! Decoding is a pure function over a `BytesMut`: it returns `Ok(None)` when
//! it needs more bytes, checks every length before using it, and never
//! panics on any input. An option longer than the option cap is consumed
//! and discarded as it arrives, never buffered, and then reported as a
//! frame so the caller can answer with an error instead of hanging up.
//! Transmission requests decode to their header only (compact or extended,
//! as negotiated): the session reads a WRITE's payload itself, in pieces.
//!
//! This module knows nothing about exports, TLS or sockets.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::proto::{
    chunk, cmd_flags, Command, EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_HEADER_LEN,
    EXTENDED_REQUEST_MAGIC, IHAVEOPT, MAX_STRING_LEN, OPTION_HEADER_LEN, OPTION_REPLY_MAGIC,
    REQUEST_HEADER_LEN, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("option magic {found:#018x} is not IHAVEOPT")]
    BadOptionMagic { found: u64 },
    #[error("request magic {found:#010x} is not the negotiated {expected:#010x}")]
    BadRequestMagic { found: u32, expected: u32 },
    #[error("a simple reply was about to be sent although extended headers were negotiated")]
    SimpleReplyWhenExtended,
    #[error("reply payload of {len} bytes does not fit the 32-bit length field")]
    ReplyTooLarge { len: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

// ---------------------------------------------------------------------------
// Option haggling
// ---------------------------------------------------------------------------

/// One client option with its whole payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRequest {
    pub option: u32,
    pub data: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionFrame {
    Request(OptionRequest),
    /// The option's payload exceeded the cap; it was read and discarded.
    TooBig {
        option: u32,
        len: u32,
    },
    /// The payload is beyond even the skip limit: nothing was consumed and
    /// the stream cannot be resynchronised; the caller answers and hangs up.
    Absurd {
        option: u32,
        len: u32,
    },
}

/// Decodes client options; encodes option replies and the
/// NBD_OPT_EXPORT_NAME answer.
#[derive(Debug)]
pub struct OptionCodec {
    max_len: u32,
    skip_limit: u32,
    skipping: Option<Skip>,
}

#[derive(Debug)]
struct Skip {
    option: u32,
    len: u32,
    remaining: u64,
}

impl OptionCodec {
    /// `max_len`: largest option payload buffered; longer ones up to
    /// `skip_limit` are discarded as they arrive, longer still are `Absurd`.
    pub fn new(max_len: u32, skip_limit: u32) -> Self {
        OptionCodec {
            max_len,
            skip_limit,
            skipping: None,
        }
    }
}

impl Decoder for OptionCodec {
    type Item = OptionFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<OptionFrame>, CodecError> {
        if let Some(skip) = &mut self.skipping {
            let n = (src.len() as u64).min(skip.remaining);
            src.advance(n as usize);
            skip.remaining -= n;
            if skip.remaining > 0 {
                return Ok(None);
            }
            let (option, len) = (skip.option, skip.len);
            self.skipping = None;
            return Ok(Some(OptionFrame::TooBig { option, len }));
        }
        if src.len() < OPTION_HEADER_LEN {
            src.reserve(OPTION_HEADER_LEN - src.len());
            return Ok(None);
        }
        let magic = be_u64(src, 0);
        if magic != IHAVEOPT {
            return Err(CodecError::BadOptionMagic { found: magic });
        }
        let option = be_u32(src, 8);
        let len = be_u32(src, 12);
        if len > self.skip_limit.max(self.max_len) {
            return Ok(Some(OptionFrame::Absurd { option, len }));
        }
        if len > self.max_len {
            src.advance(OPTION_HEADER_LEN);
            self.skipping = Some(Skip {
                option,
                len,
                remaining: u64::from(len),
            });
            return self.decode(src);
        }
        let total = OPTION_HEADER_LEN + len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(OPTION_HEADER_LEN);
        let data = src.split_to(len as usize).freeze();
        Ok(Some(OptionFrame::Request(OptionRequest { option, data })))
    }
}

/// One option reply (`NBD_REP_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply: u32,
    pub data: Bytes,
}

impl OptionReply {
    pub fn ack(option: u32) -> Self {
        OptionReply {
            option,
            reply: super::proto::rep::ACK,
            data: Bytes::new(),
        }
    }

    /// An error reply carrying a human-readable message (truncated to the
    /// NBD string limit).
    pub fn error(option: u32, reply: u32, message: &str) -> Self {
        OptionReply {
            option,
            reply,
            data: Bytes::copy_from_slice(truncate_str(message, MAX_STRING_LEN).as_bytes()),
        }
    }
}

/// What NBD_OPT_EXPORT_NAME answers on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size: u64,
    pub flags: u16,
    /// Send the 124 reserved zero bytes (client did not set NO_ZEROES).
    pub zeroes: bool,
}

impl Encoder<OptionReply> for OptionCodec {
    type Error = CodecError;

    fn encode(&mut self, item: OptionReply, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = u32::try_from(item.data.len()).map_err(|_| CodecError::ReplyTooLarge {
            len: item.data.len(),
        })?;
        dst.reserve(20 + item.data.len());
        dst.put_u64(OPTION_REPLY_MAGIC);
        dst.put_u32(item.option);
        dst.put_u32(item.reply);
        dst.put_u32(len);
        dst.put_slice(&item.data);
        Ok(())
    }
}

impl Encoder<ExportNameReply> for OptionCodec {
    type Error = CodecError;

    fn encode(&mut self, item: ExportNameReply, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.reserve(10 + 124);
        dst.put_u64(item.size);
        dst.put_u16(item.flags);
        if item.zeroes {
            dst.put_bytes(0, 124);
        }
        Ok(())
    }
}

/// Parse the NBD_OPT_INFO / NBD_OPT_GO payload: name and info requests.
/// `None` if the lengths are inconsistent (the caller answers
/// NBD_REP_ERR_INVALID).
pub fn parse_info_request(data: &[u8]) -> Option<(Bytes, Vec<u16>)> {
    let name_len = usize::try_from(be_u32_opt(data, 0)?).ok()?;
    // name_len MUST be no larger than data length - 6
    if name_len > data.len().checked_sub(6)? {
        return None;
    }
    let name = Bytes::copy_from_slice(&data[4..4 + name_len]);
    let n = usize::from(be_u16_opt(data, 4 + name_len)?);
    let rest = &data[4 + name_len + 2..];
    if rest.len() != n * 2 {
        return None;
    }
    let infos = rest.chunks_exact(2).map(|c| be_u16(c, 0)).collect();
    Some((name, infos))
}

/// Parse NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: export name
/// and queries. `None` if any length runs past the payload.
pub fn parse_meta_request(data: &[u8]) -> Option<(Bytes, Vec<Bytes>)> {
    let name_len = usize::try_from(be_u32_opt(data, 0)?).ok()?;
    let name_end = 4usize.checked_add(name_len)?;
    let name = Bytes::copy_from_slice(data.get(4..name_end)?);
    let count = be_u32_opt(data, name_end)?;
    let mut at = name_end + 4;
    // Each query needs at least its 4-byte length: bound the count before
    // allocating anything from it.
    if u64::from(count) * 4 > (data.len() - at) as u64 {
        return None;
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let qlen = usize::try_from(be_u32_opt(data, at)?).ok()?;
        let qend = (at + 4).checked_add(qlen)?;
        queries.push(Bytes::copy_from_slice(data.get(at + 4..qend)?));
        at = qend;
    }
    if at != data.len() {
        return None;
    }
    Some((name, queries))
}

fn be_u32_opt(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(be_u32(s, 0))
}
fn be_u16_opt(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(be_u16(s, 0))
}

/// Payload builders for option replies.
pub mod reply_data {
    use super::*;

    /// NBD_REP_SERVER: name length, name, optional description.
    pub fn server(name: &str, description: Option<&str>) -> Bytes {
        let d = description.unwrap_or("");
        let mut b = BytesMut::with_capacity(4 + name.len() + d.len());
        b.put_u32(name.len() as u32);
        b.put_slice(name.as_bytes());
        b.put_slice(d.as_bytes());
        b.freeze()
    }

    pub fn info_export(size: u64, flags: u16) -> Bytes {
        let mut b = BytesMut::with_capacity(12);
        b.put_u16(super::super::proto::info::EXPORT);
        b.put_u64(size);
        b.put_u16(flags);
        b.freeze()
    }

    pub fn info_string(kind: u16, s: &str) -> Bytes {
        let mut b = BytesMut::with_capacity(2 + s.len());
        b.put_u16(kind);
        b.put_slice(s.as_bytes());
        b.freeze()
    }

    pub fn info_block_size(min: u32, pref: u32, max: u32) -> Bytes {
        let mut b = BytesMut::with_capacity(14);
        b.put_u16(super::super::proto::info::BLOCK_SIZE);
        b.put_u32(min);
        b.put_u32(pref);
        b.put_u32(max);
        b.freeze()
    }

    pub fn meta_context(id: u32, name: &str) -> Bytes {
        let mut b = BytesMut::with_capacity(4 + name.len());
        b.put_u32(id);
        b.put_slice(name.as_bytes());
        b.freeze()
    }
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// One transmission request header, compact or extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: Command,
    pub handle: u64,
    pub offset: u64,
    /// Effect length, or for a request with a payload (a WRITE) the
    /// payload's length. Compact headers carry 32 bits of it.
    pub length: u64,
    /// Payload bytes that follow this header on the wire: a WRITE's
    /// length, or an extended request's length when it sets
    /// `NBD_CMD_FLAG_PAYLOAD_LEN`.
    pub payload: u64,
}

/// Decodes transmission request headers; encodes replies. The payload after
/// a header is not part of the frame: the session reads it in pieces
/// ([`RequestHeader::payload`] bytes), so no length a client sends decides
/// how much is buffered.
#[derive(Debug, Clone, Copy)]
pub struct RequestCodec {
    /// `NBD_OPT_EXTENDED_HEADERS` was negotiated: 32-byte requests with
    /// 64-bit lengths, 32-byte extended reply headers.
    extended: bool,
}

impl RequestCodec {
    pub fn new(extended: bool) -> Self {
        RequestCodec { extended }
    }

    pub fn extended(&self) -> bool {
        self.extended
    }
}

impl Decoder for RequestCodec {
    type Item = RequestHeader;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RequestHeader>, CodecError> {
        let len = if self.extended {
            EXTENDED_REQUEST_HEADER_LEN
        } else {
            REQUEST_HEADER_LEN
        };
        if src.len() < len {
            return Ok(None);
        }
        let magic = be_u32(src, 0);
        let want = if self.extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != want {
            return Err(CodecError::BadRequestMagic {
                found: magic,
                expected: want,
            });
        }
        let flags = be_u16(src, 4);
        let command = Command::from_wire(be_u16(src, 6));
        let (length, payload) = if self.extended {
            let length = be_u64(src, 24);
            // A WRITE always carries its data, flag or not: the spec says it
            // MUST set PAYLOAD_LEN, but libnbd without strict mode sends the
            // payload without the flag, and reading the two the same way
            // keeps framing either way.
            let payload = if flags & cmd_flags::PAYLOAD_LEN != 0 || command == Command::Write {
                length
            } else {
                0
            };
            (length, payload)
        } else {
            let length = u64::from(be_u32(src, 24));
            (length, if command == Command::Write { length } else { 0 })
        };
        let header = RequestHeader {
            flags,
            command,
            handle: be_u64(src, 8),
            offset: be_u64(src, 16),
            length,
            payload,
        };
        src.advance(len);
        Ok(Some(header))
    }
}

/// The payload of one structured (or extended) reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload {
    None,
    OffsetData {
        offset: u64,
        data: Bytes,
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`: (length, flags) descriptors.
    BlockStatus {
        context: u32,
        extents: Vec<(u32, u32)>,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (extended headers only): 64-bit
    /// lengths and status.
    BlockStatusExt {
        context: u32,
        extents: Vec<(u64, u64)>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
}

impl ChunkPayload {
    fn kind(&self) -> u16 {
        match self {
            ChunkPayload::None => chunk::NONE,
            ChunkPayload::OffsetData { .. } => chunk::OFFSET_DATA,
            ChunkPayload::OffsetHole { .. } => chunk::OFFSET_HOLE,
            ChunkPayload::BlockStatus { .. } => chunk::BLOCK_STATUS,
            ChunkPayload::BlockStatusExt { .. } => chunk::BLOCK_STATUS_EXT,
            ChunkPayload::Error { .. } => chunk::ERROR,
            ChunkPayload::ErrorOffset { .. } => chunk::ERROR_OFFSET,
        }
    }

    /// Payload length on the wire.
    fn len(&self) -> usize {
        match self {
            ChunkPayload::None => 0,
            ChunkPayload::OffsetData { data, .. } => 8 + data.len(),
            ChunkPayload::OffsetHole { .. } => 12,
            ChunkPayload::BlockStatus { extents, .. } => 4 + 8 * extents.len(),
            ChunkPayload::BlockStatusExt { extents, .. } => 8 + 16 * extents.len(),
            ChunkPayload::Error { message, .. } => 6 + truncate_str(message, MAX_STRING_LEN).len(),
            ChunkPayload::ErrorOffset { message, .. } => {
                14 + truncate_str(message, MAX_STRING_LEN).len()
            }
        }
    }
}

/// One server message of the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Simple reply; `data` only for a successful READ. With `data: None`
    /// and error 0 it is also the header a streamed READ's data follows.
    Simple {
        handle: u64,
        error: u32,
        data: Option<Bytes>,
    },
    /// One structured reply chunk; with extended headers an extended one,
    /// which repeats the request's `offset`.
    Chunk {
        handle: u64,
        offset: u64,
        flags: u16,
        payload: ChunkPayload,
    },
}

/// Cut `s` to at most `max` bytes on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

impl RequestCodec {
    /// Encode `reply` into `dst`, except a data payload longer than
    /// `copy_limit` bytes, which is returned to be written after `dst`
    /// without copying it.
    pub fn encode_split(
        &self,
        reply: &Reply,
        dst: &mut BytesMut,
        copy_limit: usize,
    ) -> Result<Option<Bytes>, CodecError> {
        let mut tail = None;
        let mut data_out = |dst: &mut BytesMut, data: &Bytes| {
            if data.len() > copy_limit {
                tail = Some(data.clone());
            } else {
                dst.put_slice(data);
            }
        };
        match reply {
            Reply::Simple {
                handle,
                error,
                data,
            } => {
                if self.extended {
                    // Extended headers forbid simple replies.
                    return Err(CodecError::SimpleReplyWhenExtended);
                }
                dst.reserve(16);
                dst.put_u32(SIMPLE_REPLY_MAGIC);
                dst.put_u32(*error);
                dst.put_u64(*handle);
                if let Some(d) = data {
                    data_out(dst, d);
                }
            }
            Reply::Chunk {
                handle,
                offset: request_offset,
                flags,
                payload,
            } => {
                let len = payload.len();
                if self.extended {
                    dst.reserve(32 + len.min(copy_limit.saturating_add(16)));
                    dst.put_u32(EXTENDED_REPLY_MAGIC);
                    dst.put_u16(*flags);
                    dst.put_u16(payload.kind());
                    dst.put_u64(*handle);
                    dst.put_u64(*request_offset);
                    dst.put_u64(len as u64);
                } else {
                    let len32 =
                        u32::try_from(len).map_err(|_| CodecError::ReplyTooLarge { len })?;
                    dst.reserve(20 + len.min(copy_limit.saturating_add(8)));
                    dst.put_u32(STRUCTURED_REPLY_MAGIC);
                    dst.put_u16(*flags);
                    dst.put_u16(payload.kind());
                    dst.put_u64(*handle);
                    dst.put_u32(len32);
                }
                match payload {
                    ChunkPayload::None => {}
                    ChunkPayload::OffsetData { offset, data } => {
                        dst.put_u64(*offset);
                        data_out(dst, data);
                    }
                    ChunkPayload::OffsetHole { offset, length } => {
                        dst.put_u64(*offset);
                        dst.put_u32(*length);
                    }
                    ChunkPayload::BlockStatus { context, extents } => {
                        dst.put_u32(*context);
                        for (l, f) in extents {
                            dst.put_u32(*l);
                            dst.put_u32(*f);
                        }
                    }
                    ChunkPayload::BlockStatusExt { context, extents } => {
                        let n = u32::try_from(extents.len())
                            .map_err(|_| CodecError::ReplyTooLarge { len })?;
                        dst.put_u32(*context);
                        dst.put_u32(n);
                        for (l, f) in extents {
                            dst.put_u64(*l);
                            dst.put_u64(*f);
                        }
                    }
                    ChunkPayload::Error { error, message } => {
                        let m = truncate_str(message, MAX_STRING_LEN);
                        dst.put_u32(*error);
                        dst.put_u16(m.len() as u16);
                        dst.put_slice(m.as_bytes());
                    }
                    ChunkPayload::ErrorOffset {
                        error,
                        message,
                        offset,
                    } => {
                        let m = truncate_str(message, MAX_STRING_LEN);
                        dst.put_u32(*error);
                        dst.put_u16(m.len() as u16);
                        dst.put_slice(m.as_bytes());
                        dst.put_u64(*offset);
                    }
                }
            }
        }
        Ok(tail)
    }
}

impl Encoder<Reply> for RequestCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Reply, dst: &mut BytesMut) -> Result<(), CodecError> {
        let tail = self.encode_split(&item, dst, usize::MAX)?;
        debug_assert!(tail.is_none());
        Ok(())
    }
}

/// Client-side encoders and a reply decoder, used by the unit tests to
/// round-trip frames (the server itself never needs them).
#[cfg(test)]
pub(crate) mod client {
    use super::*;

    pub fn encode_option(option: u32, data: &[u8], dst: &mut BytesMut) {
        dst.put_u64(IHAVEOPT);
        dst.put_u32(option);
        dst.put_u32(data.len() as u32);
        dst.put_slice(data);
    }

    /// A compact (`extended` false, 32-bit length) or extended request.
    pub fn encode_request(h: &RequestHeader, extended: bool, payload: &[u8], dst: &mut BytesMut) {
        dst.put_u32(if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        });
        dst.put_u16(h.flags);
        dst.put_u16(h.command.to_wire());
        dst.put_u64(h.handle);
        dst.put_u64(h.offset);
        if extended {
            dst.put_u64(h.length);
        } else {
            dst.put_u32(h.length as u32);
        }
        dst.put_slice(payload);
    }

    /// Decode one structured chunk: (flags, type, handle, payload).
    pub fn decode_chunk(src: &mut BytesMut) -> Option<(u16, u16, u64, Bytes)> {
        if src.len() < 20 || be_u32(src, 0) != STRUCTURED_REPLY_MAGIC {
            return None;
        }
        let len = be_u32(src, 16) as usize;
        if src.len() < 20 + len {
            return None;
        }
        let (flags, kind, handle) = (be_u16(src, 4), be_u16(src, 6), be_u64(src, 8));
        src.advance(20);
        Some((flags, kind, handle, src.split_to(len).freeze()))
    }

    /// Decode one extended chunk: (flags, type, handle, offset, payload).
    pub fn decode_extended(src: &mut BytesMut) -> Option<(u16, u16, u64, u64, Bytes)> {
        if src.len() < 32 || be_u32(src, 0) != EXTENDED_REPLY_MAGIC {
            return None;
        }
        let len = usize::try_from(be_u64(src, 24)).ok()?;
        if src.len() < 32 + len {
            return None;
        }
        let (flags, kind, handle, offset) = (
            be_u16(src, 4),
            be_u16(src, 6),
            be_u64(src, 8),
            be_u64(src, 16),
        );
        src.advance(32);
        Some((flags, kind, handle, offset, src.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::client::*;
    use super::*;
    use crate::nbd::proto::{opt, rep};
    use proptest::prelude::*;

    fn header(command: Command, length: u64) -> RequestHeader {
        RequestHeader {
            flags: 1,
            command,
            handle: 0xdead_beef_0bad_cafe,
            offset: 4096,
            length,
            payload: if command == Command::Write { length } else { 0 },
        }
    }

    #[test]
    fn option_round_trip_in_pieces() {
        let mut wire = BytesMut::new();
        encode_option(opt::GO, b"hello", &mut wire);
        encode_option(opt::ABORT, b"", &mut wire);
        let mut codec = OptionCodec::new(1024, 1 << 20);
        let mut buf = BytesMut::new();
        let mut got = vec![];
        // Feed one byte at a time: decode must wait, never misparse.
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            vec![
                OptionFrame::Request(OptionRequest {
                    option: opt::GO,
                    data: Bytes::from_static(b"hello")
                }),
                OptionFrame::Request(OptionRequest {
                    option: opt::ABORT,
                    data: Bytes::new()
                }),
            ]
        );
    }

    #[test]
    fn oversized_option_is_skipped_then_reported() {
        let mut wire = BytesMut::new();
        encode_option(77, &vec![7u8; 5000], &mut wire);
        encode_option(opt::LIST, b"", &mut wire);
        let mut codec = OptionCodec::new(4096, 1 << 20);
        let mut buf = BytesMut::new();
        let mut got = vec![];
        for piece in wire.chunks(333) {
            buf.put_slice(piece);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                got.push(f);
            }
            assert!(buf.len() < 400, "skipped payload must not accumulate");
        }
        assert_eq!(
            got[0],
            OptionFrame::TooBig {
                option: 77,
                len: 5000
            }
        );
        assert!(matches!(&got[1], OptionFrame::Request(r) if r.option == opt::LIST));
    }

    #[test]
    fn absurd_lengths_are_reported_without_waiting_for_payload() {
        let mut buf = BytesMut::new();
        encode_option(opt::GO, b"", &mut buf);
        buf[12..16].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert_eq!(
            OptionCodec::new(1024, 1 << 20).decode(&mut buf).unwrap(),
            Some(OptionFrame::Absurd {
                option: opt::GO,
                len: 0xffff_fff0
            })
        );
    }

    #[test]
    fn bad_option_magic_is_an_error() {
        let mut buf = BytesMut::from(&[0u8; 16][..]);
        assert!(matches!(
            OptionCodec::new(10, 10).decode(&mut buf),
            Err(CodecError::BadOptionMagic { found: 0 })
        ));
    }

    #[test]
    fn option_reply_layout() {
        let mut dst = BytesMut::new();
        OptionCodec::new(0, 0)
            .encode(
                OptionReply::error(opt::GO, rep::ERR_UNKNOWN, "no"),
                &mut dst,
            )
            .unwrap();
        assert_eq!(&dst[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(be_u32(&dst, 8), opt::GO);
        assert_eq!(be_u32(&dst, 12), rep::ERR_UNKNOWN);
        assert_eq!(be_u32(&dst, 16), 2);
        assert_eq!(&dst[20..], b"no");
    }

    #[test]
    fn export_name_reply_with_and_without_zeroes() {
        let mut c = OptionCodec::new(0, 0);
        let mut dst = BytesMut::new();
        let r = ExportNameReply {
            size: 1 << 30,
            flags: 3,
            zeroes: true,
        };
        c.encode(r, &mut dst).unwrap();
        assert_eq!(dst.len(), 134);
        dst.clear();
        c.encode(ExportNameReply { zeroes: false, ..r }, &mut dst)
            .unwrap();
        assert_eq!(dst.len(), 10);
    }

    #[test]
    fn headers_decode_and_leave_the_payload() {
        let mut wire = BytesMut::new();
        encode_request(&header(Command::Write, 5), false, b"abcde", &mut wire);
        encode_request(&header(Command::Read, 4096), false, b"", &mut wire);
        let mut codec = RequestCodec::new(false);
        let mut buf = BytesMut::new();
        let mut got = vec![];
        // One byte at a time: decode waits, never misparses.
        for b in wire.iter().take(28) {
            buf.put_u8(*b);
            if let Some(h) = codec.decode(&mut buf).unwrap() {
                got.push(h);
            }
        }
        assert_eq!(got, vec![header(Command::Write, 5)]);
        assert!(buf.is_empty(), "the payload is not part of the frame");
        buf.put_slice(&wire[28..]);
        assert_eq!(&buf[..5], b"abcde");
        buf.advance(5);
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(header(Command::Read, 4096))
        );
    }

    #[test]
    fn extended_headers_carry_64_bit_lengths_and_the_payload_flag() {
        let mut codec = RequestCodec::new(true);
        let mut buf = BytesMut::new();
        let trim = RequestHeader {
            flags: 0,
            command: Command::Trim,
            handle: 7,
            offset: 1 << 40,
            length: 5 << 32,
            payload: 0,
        };
        encode_request(&trim, true, b"", &mut buf);
        assert_eq!(buf.len(), 32);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(trim));
        let write = RequestHeader {
            flags: cmd_flags::PAYLOAD_LEN,
            command: Command::Write,
            handle: 8,
            offset: 0,
            length: 3,
            payload: 3,
        };
        encode_request(&write, true, b"xyz", &mut buf);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(write));
        assert_eq!(&buf[..], b"xyz");
        // Without PAYLOAD_LEN the length is an effect length: no payload;
        // except for WRITE, whose data follows anyway (libnbd's non-strict
        // mode sends it so).
        let mut h = write;
        h.flags = 0;
        buf.clear();
        encode_request(&h, true, b"", &mut buf);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().payload, 3);
        h.command = Command::Read;
        encode_request(&h, true, b"", &mut buf);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().payload, 0);
        // A compact header where an extended one is due is refused.
        buf.clear();
        encode_request(&trim, false, &[0; 4], &mut buf);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::BadRequestMagic { .. })
        ));
    }

    #[test]
    fn bad_request_magic_is_an_error() {
        let mut buf = BytesMut::from(&[0xffu8; 28][..]);
        assert!(matches!(
            RequestCodec::new(false).decode(&mut buf),
            Err(CodecError::BadRequestMagic {
                found: 0xffff_ffff,
                ..
            })
        ));
    }

    #[test]
    fn simple_reply_layout_and_split() {
        let data = Bytes::from(vec![9u8; 100]);
        let r = Reply::Simple {
            handle: 42,
            error: 0,
            data: Some(data.clone()),
        };
        let codec = RequestCodec::new(false);
        let mut dst = BytesMut::new();
        assert_eq!(codec.encode_split(&r, &mut dst, 1000).unwrap(), None);
        assert_eq!(dst.len(), 116);
        dst.clear();
        let tail = codec.encode_split(&r, &mut dst, 10).unwrap();
        assert_eq!(dst.len(), 16);
        assert_eq!(tail, Some(data));
        assert_eq!(be_u32(&dst, 0), SIMPLE_REPLY_MAGIC);
        assert_eq!(be_u64(&dst, 8), 42);
        dst.clear();
        assert!(matches!(
            RequestCodec::new(true).encode_split(&r, &mut dst, 10),
            Err(CodecError::SimpleReplyWhenExtended)
        ));
    }

    #[test]
    fn extended_chunks_repeat_the_request_offset_and_use_64_bit_status() {
        let mut codec = RequestCodec::new(true);
        let mut dst = BytesMut::new();
        let payload = ChunkPayload::BlockStatusExt {
            context: 1,
            extents: vec![(5 << 32, 3), (4096, 0)],
        };
        codec
            .encode(
                Reply::Chunk {
                    handle: 9,
                    offset: 1 << 33,
                    flags: 1,
                    payload,
                },
                &mut dst,
            )
            .unwrap();
        let (flags, kind, handle, offset, body) = decode_extended(&mut dst).unwrap();
        assert_eq!(
            (flags, kind, handle, offset),
            (1, chunk::BLOCK_STATUS_EXT, 9, 1 << 33)
        );
        assert_eq!(body.len(), 8 + 2 * 16);
        assert_eq!(be_u32(&body, 0), 1, "context id");
        assert_eq!(be_u32(&body, 4), 2, "descriptor count");
        assert_eq!(be_u64(&body, 8), 5 << 32);
        assert_eq!(be_u64(&body, 16), 3);
        assert!(dst.is_empty());
    }

    #[test]
    fn structured_chunks_round_trip() {
        let cases = vec![
            (ChunkPayload::None, 0usize),
            (
                ChunkPayload::OffsetData {
                    offset: 512,
                    data: Bytes::from_static(b"xyz"),
                },
                11,
            ),
            (
                ChunkPayload::OffsetHole {
                    offset: 1024,
                    length: 4096,
                },
                12,
            ),
            (
                ChunkPayload::BlockStatus {
                    context: 1,
                    extents: vec![(4096, 3), (8192, 0)],
                },
                20,
            ),
            (
                ChunkPayload::Error {
                    error: 22,
                    message: "bad".into(),
                },
                9,
            ),
            (
                ChunkPayload::ErrorOffset {
                    error: 5,
                    message: "io".into(),
                    offset: 7,
                },
                16,
            ),
        ];
        for (payload, len) in cases {
            let kind = payload.kind();
            let mut dst = BytesMut::new();
            let mut codec = RequestCodec::new(false);
            codec
                .encode(
                    Reply::Chunk {
                        handle: 9,
                        offset: 0,
                        flags: 1,
                        payload,
                    },
                    &mut dst,
                )
                .unwrap();
            let (flags, k, handle, body) = decode_chunk(&mut dst).unwrap();
            assert_eq!((flags, k, handle, body.len()), (1, kind, 9, len));
            assert!(dst.is_empty());
        }
    }

    #[test]
    fn error_messages_are_capped_at_the_string_limit() {
        let mut dst = BytesMut::new();
        let long = "ü".repeat(5000);
        RequestCodec::new(false)
            .encode(
                Reply::Chunk {
                    handle: 1,
                    offset: 0,
                    flags: 1,
                    payload: ChunkPayload::Error {
                        error: 22,
                        message: long,
                    },
                },
                &mut dst,
            )
            .unwrap();
        let (_, _, _, body) = decode_chunk(&mut dst).unwrap();
        let mlen = be_u16(&body, 4) as usize;
        assert!(mlen <= MAX_STRING_LEN);
        assert_eq!(body.len(), 6 + mlen);
        assert!(std::str::from_utf8(&body[6..]).is_ok());
    }

    #[test]
    fn info_request_parsing() {
        let mut d = BytesMut::new();
        d.put_u32(3);
        d.put_slice(b"abc");
        d.put_u16(2);
        d.put_u16(1);
        d.put_u16(3);
        let (name, infos) = parse_info_request(&d).unwrap();
        assert_eq!((&name[..], infos), (&b"abc"[..], vec![1, 3]));
        // name length past the end, count inconsistent, trailing garbage
        assert!(parse_info_request(&[0, 0, 0, 9, 0, 0]).is_none());
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 2, 0, 1]).is_none());
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 0, 1]).is_none());
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]).is_none());
        assert_eq!(
            parse_info_request(&[0, 0, 0, 0, 0, 0]),
            Some((Bytes::new(), vec![]))
        );
    }

    #[test]
    fn meta_request_parsing() {
        let mut d = BytesMut::new();
        d.put_u32(1);
        d.put_slice(b"e");
        d.put_u32(2);
        d.put_u32(5);
        d.put_slice(b"base:");
        d.put_u32(15);
        d.put_slice(b"base:allocation");
        let (name, q) = parse_meta_request(&d).unwrap();
        assert_eq!(&name[..], b"e");
        assert_eq!(
            q,
            vec![Bytes::from("base:"), Bytes::from("base:allocation")]
        );
        let mut bad = d.clone();
        bad.truncate(d.len() - 1);
        assert!(parse_meta_request(&bad).is_none());
        let mut huge_count = BytesMut::new();
        huge_count.put_u32(0);
        huge_count.put_u32(u32::MAX);
        assert!(parse_meta_request(&huge_count).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes, fed in arbitrary pieces, never panic the option
        /// decoder, and every frame it yields respects the cap.
        #[test]
        fn option_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                      valid_prefix in any::<bool>(),
                                      cut in 1usize..64, cap in 0u32..300) {
            let mut input = BytesMut::new();
            if valid_prefix { input.put_u64(IHAVEOPT); }
            input.put_slice(&bytes);
            let mut codec = OptionCodec::new(cap, 2 * cap);
            let mut buf = BytesMut::new();
            'outer: for piece in input.chunks(cut) {
                buf.put_slice(piece);
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(OptionFrame::Request(r))) => prop_assert!(r.data.len() as u32 <= cap),
                        Ok(Some(OptionFrame::TooBig { len, .. })) => prop_assert!(len > cap && len <= 2 * cap),
                        Ok(Some(OptionFrame::Absurd { len, .. })) => { prop_assert!(len > 2 * cap); break 'outer; }
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
            }
        }

        /// Same for transmission requests, compact and extended: a header
        /// is consumed whole or not at all, and only a WRITE (compact) or a
        /// PAYLOAD_LEN request (extended) announces a payload.
        #[test]
        fn request_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                       valid_magic in any::<bool>(), extended in any::<bool>(),
                                       cut in 1usize..64) {
            let mut input = BytesMut::new();
            if valid_magic {
                input.put_u32(if extended { EXTENDED_REQUEST_MAGIC } else { REQUEST_MAGIC });
            }
            input.put_slice(&bytes);
            let mut codec = RequestCodec::new(extended);
            let mut buf = BytesMut::new();
            'outer: for piece in input.chunks(cut) {
                buf.put_slice(piece);
                loop {
                    let before = buf.len();
                    match codec.decode(&mut buf) {
                        Ok(Some(h)) => {
                            prop_assert_eq!(before - buf.len(), if extended { 32 } else { 28 });
                            if extended {
                                let carries = h.flags & cmd_flags::PAYLOAD_LEN != 0 || h.command == Command::Write;
                                prop_assert_eq!(h.payload != 0, carries && h.length != 0);
                            } else {
                                prop_assert!(h.length <= u64::from(u32::MAX));
                                prop_assert_eq!(h.payload, if h.command == Command::Write { h.length } else { 0 });
                            }
                            // The caller consumes the payload; here it is skipped.
                            let skip = (h.payload as usize).min(buf.len());
                            buf.advance(skip);
                        }
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
            }
        }

        /// Request headers round-trip for any field values.
        #[test]
        fn request_round_trip(flags in any::<u16>(), cmd in 0u16..12, handle in any::<u64>(),
                              offset in any::<u64>(), len in any::<u32>(), extended in any::<bool>()) {
            let command = Command::from_wire(cmd);
            let payload = if extended {
                if flags & cmd_flags::PAYLOAD_LEN != 0 || command == Command::Write { u64::from(len) } else { 0 }
            } else if command == Command::Write {
                u64::from(len)
            } else {
                0
            };
            let h = RequestHeader { flags, command, handle, offset, length: u64::from(len), payload };
            let mut buf = BytesMut::new();
            encode_request(&h, extended, &[], &mut buf);
            let got = RequestCodec::new(extended).decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(got, h);
            prop_assert!(buf.is_empty());
        }

        /// The option-payload parsers never panic and never return slices
        /// longer than their input.
        #[test]
        fn option_payload_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Some((name, infos)) = parse_info_request(&bytes) {
                prop_assert_eq!(4 + name.len() + 2 + 2 * infos.len(), bytes.len());
            }
            if let Some((name, queries)) = parse_meta_request(&bytes) {
                let sum: usize = queries.iter().map(|q| 4 + q.len()).sum();
                prop_assert_eq!(4 + name.len() + 4 + sum, bytes.len());
            }
        }
    }
}
