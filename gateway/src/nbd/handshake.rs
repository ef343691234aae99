//! Fixed-newstyle handshake: greeting, client flags, option haggling, and
//! the STARTTLS upgrade. Ends with either the transmission phase (after
//! NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or a closed connection.
//!
//! Policy (which exports a peer may see, TLS mode) comes in through
//! [`HandshakeCtx`]; this module only applies it to options.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use lungate_config::{Peer, TlsMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

use super::codec::{
    parse_info_request, parse_meta_request, reply_data, CodecError, ExportNameReply, OptionCodec,
    OptionFrame, OptionReply,
};
use super::proto::{
    client_flags, handshake_flags, info, opt, rep, tx_flags, BASE_ALLOCATION, IHAVEOPT, NBDMAGIC,
};
use super::transport::Transport;
use crate::export::{Export, Exports};

/// Largest option payload buffered. The biggest legitimate options are
/// INFO/GO and meta-context queries: a few 4 KiB strings.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Oversized options up to this length are read and discarded; longer
/// ones end the connection (the spec allows a hard disconnect for lengths
/// that amount to denial of service).
pub const OPTION_SKIP_LIMIT: u32 = 1024 * 1024;
/// Options one connection may send before it is considered abusive.
pub const MAX_OPTIONS: u32 = 4096;
/// Most metadata contexts one SET_META_CONTEXT may select: every one costs
/// a reply chunk (and a look at the volume) on every BLOCK_STATUS.
pub const MAX_SELECTED_CONTEXTS: usize = 64;
/// The qemu namespace's dirty-bitmap contexts (qemu docs/interop/nbd.rst):
/// `qemu:dirty-bitmap:NAME`, flag 1 set where the extent is dirty.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("client flags {flags:#x} set unknown bits")]
    UnknownClientFlags { flags: u32 },
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE (flags {flags:#x}); lungate speaks only fixed newstyle")]
    NotFixedNewstyle { flags: u32 },
    #[error("NBD_OPT_EXPORT_NAME for {name:?}: no such export for this client")]
    UnknownExport { name: String },
    #[error("NBD_OPT_EXPORT_NAME before STARTTLS while TLS is required")]
    TlsRequired,
    #[error("NBD_OPT_EXPORT_NAME after extended headers were negotiated (the spec forbids it)")]
    ExportNameAfterExtended,
    #[error("client sent {0} bytes after NBD_OPT_STARTTLS before the TLS handshake")]
    DataBeforeTls(usize),
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(std::io::Error),
    #[error(
        "option {option} claims {len} bytes of data, beyond the {OPTION_SKIP_LIMIT}-byte limit"
    )]
    AbsurdOption { option: u32, len: u32 },
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("connection closed in the middle of an option")]
    Truncated,
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A metadata context the gateway offers for an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: holes and zeros.
    BaseAllocation,
    /// `qemu:dirty-bitmap:SNAP`: what changed since snapshot SNAP of the
    /// export's LUN (written, trimmed or zeroed), in export offsets.
    DirtyBitmap(String),
}

impl MetaContext {
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => BASE_ALLOCATION.to_string(),
            MetaContext::DirtyBitmap(snap) => format!("{DIRTY_BITMAP_PREFIX}{snap}"),
        }
    }
}

/// A context SET_META_CONTEXT selected, with the id its BLOCK_STATUS
/// chunks carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub id: u32,
    pub context: MetaContext,
}

/// What the handshake needs from the server.
pub struct HandshakeCtx {
    pub exports: Arc<Exports>,
    pub tls_mode: TlsMode,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// What the client and server agreed on.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub export: Arc<Export>,
    pub structured: bool,
    /// `NBD_OPT_EXTENDED_HEADERS` (implies structured replies).
    pub extended: bool,
    /// The metadata contexts selected for this export (BLOCK_STATUS
    /// answers one chunk for each).
    pub contexts: Vec<Selected>,
    pub flags: u16,
}

pub enum Outcome {
    /// Enter transmission; `buffered` holds bytes already read past the
    /// last option.
    Transmission {
        io: Transport,
        buffered: BytesMut,
        negotiated: Negotiated,
        peer: Peer,
    },
    /// The client aborted or went away.
    Closed,
}

/// Transmission flags for `export`, given whether structured replies (or
/// extended headers) were negotiated.
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    use tx_flags::*;
    let mut f = HAS_FLAGS | SEND_FLUSH | CAN_MULTI_CONN | SEND_CACHE;
    if export.read_only {
        f |= READ_ONLY;
    } else {
        f |= SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | SEND_FAST_ZERO;
    }
    if structured {
        f |= SEND_DF;
    }
    f
}

struct State {
    io: Transport,
    rbuf: BytesMut,
    wbuf: BytesMut,
    codec: OptionCodec,
    peer: Peer,
    structured: bool,
    extended: bool,
    /// Export name the last successful SET_META_CONTEXT was for, and what
    /// it selected.
    meta_for: Option<(Bytes, Vec<Selected>)>,
}

impl State {
    fn queue(&mut self, reply: OptionReply) -> Result<(), HandshakeError> {
        self.codec.encode(reply, &mut self.wbuf)?;
        Ok(())
    }

    async fn send(&mut self) -> Result<(), HandshakeError> {
        self.io.write_all(&self.wbuf).await?;
        self.io.flush().await?;
        self.wbuf.clear();
        Ok(())
    }

    async fn reply(&mut self, reply: OptionReply) -> Result<(), HandshakeError> {
        self.queue(reply)?;
        self.send().await
    }

    async fn next_option(&mut self) -> Result<Option<OptionFrame>, HandshakeError> {
        loop {
            if let Some(f) = self.codec.decode(&mut self.rbuf)? {
                return Ok(Some(f));
            }
            self.rbuf.reserve(4096);
            if self.io.read_buf(&mut self.rbuf).await? == 0 {
                return if self.rbuf.is_empty() {
                    Ok(None)
                } else {
                    Err(HandshakeError::Truncated)
                };
            }
        }
    }
}

/// Run the handshake on a freshly accepted connection.
pub async fn negotiate(
    mut io: Transport,
    peer: Peer,
    ctx: &HandshakeCtx,
) -> Result<Outcome, HandshakeError> {
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..].copy_from_slice(
        &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
    );
    io.write_all(&greeting).await?;
    io.flush().await?;

    let flags = match io.read_u32().await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Outcome::Closed),
        Err(e) => return Err(e.into()),
    };
    if flags & !client_flags::KNOWN != 0 {
        return Err(HandshakeError::UnknownClientFlags { flags });
    }
    if flags & client_flags::FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle { flags });
    }
    let no_zeroes = flags & client_flags::NO_ZEROES != 0;

    let mut st = State {
        io,
        rbuf: BytesMut::with_capacity(4096),
        wbuf: BytesMut::with_capacity(4096),
        codec: OptionCodec::new(MAX_OPTION_LEN, OPTION_SKIP_LIMIT),
        peer,
        structured: false,
        extended: false,
        meta_for: None,
    };
    let mut count = 0u32;
    loop {
        count += 1;
        if count > MAX_OPTIONS {
            return Err(HandshakeError::TooManyOptions);
        }
        let req = match st.next_option().await? {
            None => return Ok(Outcome::Closed),
            Some(OptionFrame::TooBig { option, len }) => {
                st.reply(OptionReply::error(
                    option,
                    rep::ERR_TOO_BIG,
                    &format!("option length {len} exceeds the limit of {MAX_OPTION_LEN} bytes"),
                ))
                .await?;
                continue;
            }
            Some(OptionFrame::Absurd { option, len }) => {
                let _ = st
                    .reply(OptionReply::error(
                        option,
                        rep::ERR_TOO_BIG,
                        &format!("option length {len} is absurd; closing the connection"),
                    ))
                    .await;
                return Err(HandshakeError::AbsurdOption { option, len });
            }
            Some(OptionFrame::Request(r)) => r,
        };
        let (o, data) = (req.option, req.data);
        tracing::debug!(option = opt::name(o), code = o, len = data.len(), "option");
        let tls_done = st.io.is_tls();

        if ctx.tls_mode == TlsMode::Require && !tls_done && o != opt::STARTTLS && o != opt::ABORT {
            if o == opt::EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            st.reply(OptionReply::error(
                o,
                rep::ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            ))
            .await?;
            continue;
        }

        match o {
            opt::EXPORT_NAME => {
                if st.extended {
                    return Err(HandshakeError::ExportNameAfterExtended);
                }
                let Some(export) = lookup_for_transmission(ctx, &st, &data) else {
                    return Err(HandshakeError::UnknownExport {
                        name: String::from_utf8_lossy(&data).into_owned(),
                    });
                };
                let negotiated = finish(&st, export, &data);
                let reply = ExportNameReply {
                    size: negotiated.export.size(),
                    flags: negotiated.flags,
                    zeroes: !no_zeroes,
                };
                st.codec.encode(reply, &mut st.wbuf)?;
                st.send().await?;
                return Ok(Outcome::Transmission {
                    io: st.io,
                    buffered: st.rbuf,
                    negotiated,
                    peer: st.peer,
                });
            }
            opt::ABORT => {
                // The client may already be gone; the ACK is best effort.
                let _ = st.reply(OptionReply::ack(o)).await;
                let _ = st.io.shutdown().await;
                return Ok(Outcome::Closed);
            }
            opt::LIST => {
                if !data.is_empty() {
                    st.reply(OptionReply::error(
                        o,
                        rep::ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    ))
                    .await?;
                    continue;
                }
                let visible: Vec<Arc<Export>> = ctx
                    .exports
                    .current()
                    .iter()
                    .filter(|e| e.allows(&st.peer))
                    .cloned()
                    .collect();
                for e in visible {
                    st.queue(OptionReply {
                        option: o,
                        reply: rep::SERVER,
                        data: reply_data::server(&e.name, e.description.as_deref()),
                    })?;
                }
                st.reply(OptionReply::ack(o)).await?;
            }
            opt::STARTTLS => {
                if !data.is_empty() {
                    st.reply(OptionReply::error(
                        o,
                        rep::ERR_INVALID,
                        "NBD_OPT_STARTTLS takes no data",
                    ))
                    .await?;
                    continue;
                }
                if tls_done {
                    st.reply(OptionReply::error(
                        o,
                        rep::ERR_INVALID,
                        "TLS is already running",
                    ))
                    .await?;
                    continue;
                }
                let Some(acceptor) = ctx.tls.clone().filter(|_| ctx.tls_mode != TlsMode::Off)
                else {
                    st.reply(OptionReply::error(
                        o,
                        rep::ERR_POLICY,
                        "TLS is not enabled on this server",
                    ))
                    .await?;
                    continue;
                };
                st.reply(OptionReply::ack(o)).await?;
                if !st.rbuf.is_empty() {
                    return Err(HandshakeError::DataBeforeTls(st.rbuf.len()));
                }
                let tls = acceptor
                    .accept(st.io)
                    .await
                    .map_err(HandshakeError::TlsHandshake)?;
                st.peer.cert_names = super::tls::peer_identities(tls.get_ref().1);
                tracing::info!(identities = ?st.peer.cert_names, "TLS established");
                st.io = Transport::Tls(Box::new(tls));
                // The spec forbids keeping negotiation state across STARTTLS.
                st.structured = false;
                st.extended = false;
                st.meta_for = None;
            }
            opt::INFO | opt::GO => {
                let Some((name, infos)) = parse_info_request(&data) else {
                    st.reply(OptionReply::error(
                        o,
                        rep::ERR_INVALID,
                        "malformed NBD_OPT_INFO/GO payload: lengths do not add up",
                    ))
                    .await?;
                    continue;
                };
                let export = match lookup_for_transmission(ctx, &st, &name) {
                    Some(e) => e,
                    None => {
                        let (code, msg) = refusal(ctx, &st, &name);
                        st.reply(OptionReply::error(o, code, &msg)).await?;
                        continue;
                    }
                };
                let negotiated = finish(&st, export, &name);
                let e = &negotiated.export;
                st.queue(OptionReply {
                    option: o,
                    reply: rep::INFO,
                    data: reply_data::info_export(e.size(), negotiated.flags),
                })?;
                if infos.contains(&info::NAME) {
                    st.queue(OptionReply {
                        option: o,
                        reply: rep::INFO,
                        data: reply_data::info_string(info::NAME, &e.name),
                    })?;
                }
                if let (true, Some(d)) = (infos.contains(&info::DESCRIPTION), &e.description) {
                    st.queue(OptionReply {
                        option: o,
                        reply: rep::INFO,
                        data: reply_data::info_string(info::DESCRIPTION, d),
                    })?;
                }
                // Always sent: lungate's maximum differs from the default.
                st.queue(OptionReply {
                    option: o,
                    reply: rep::INFO,
                    data: reply_data::info_block_size(
                        e.block.minimum,
                        e.block.preferred,
                        e.block.maximum,
                    ),
                })?;
                st.reply(OptionReply::ack(o)).await?;
                if o == opt::GO {
                    return Ok(Outcome::Transmission {
                        io: st.io,
                        buffered: st.rbuf,
                        negotiated,
                        peer: st.peer,
                    });
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    st.reply(OptionReply::error(
                        o,
                        rep::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    ))
                    .await?;
                    continue;
                }
                if st.extended {
                    st.reply(OptionReply::error(
                        o,
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated; they take precedence",
                    ))
                    .await?;
                    continue;
                }
                st.structured = true;
                st.reply(OptionReply::ack(o)).await?;
            }
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    st.reply(OptionReply::error(
                        o,
                        rep::ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS takes no data",
                    ))
                    .await?;
                    continue;
                }
                st.extended = true;
                st.reply(OptionReply::ack(o)).await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = o == opt::SET_META_CONTEXT;
                if set {
                    // Replaced even when this request fails.
                    st.meta_for = None;
                }
                if !st.structured && !st.extended {
                    st.reply(OptionReply::error(
                        o,
                        rep::ERR_INVALID,
                        "negotiate NBD_OPT_STRUCTURED_REPLY or NBD_OPT_EXTENDED_HEADERS first",
                    ))
                    .await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&data) else {
                    st.reply(OptionReply::error(
                        o,
                        rep::ERR_INVALID,
                        "malformed meta context payload: lengths do not add up",
                    ))
                    .await?;
                    continue;
                };
                let Some(export) = lookup_for_transmission(ctx, &st, &name) else {
                    let (code, msg) = refusal(ctx, &st, &name);
                    st.reply(OptionReply::error(o, code, &msg)).await?;
                    continue;
                };
                let snapshots = export.snapshot_names();
                let selected = match select_contexts(&queries, set, &snapshots) {
                    Ok(s) => s,
                    Err(msg) => {
                        st.reply(OptionReply::error(o, rep::ERR_INVALID, &msg))
                            .await?;
                        continue;
                    }
                };
                if set && selected.len() > MAX_SELECTED_CONTEXTS {
                    st.reply(OptionReply::error(
                        o,
                        rep::ERR_TOO_BIG,
                        &format!(
                            "{} metadata contexts asked for; at most {MAX_SELECTED_CONTEXTS} may be selected",
                            selected.len()
                        ),
                    ))
                    .await?;
                    continue;
                }
                let mut chosen = Vec::with_capacity(selected.len());
                for (i, context) in selected.into_iter().enumerate() {
                    // LIST replies carry the reserved id 0; SET numbers its
                    // selection from 1.
                    let id = if set { i as u32 + 1 } else { 0 };
                    st.queue(OptionReply {
                        option: o,
                        reply: rep::META_CONTEXT,
                        data: reply_data::meta_context(id, &context.name()),
                    })?;
                    chosen.push(Selected { id, context });
                }
                if set && !chosen.is_empty() {
                    st.meta_for = Some((name, chosen));
                }
                st.reply(OptionReply::ack(o)).await?;
            }
            other => {
                st.reply(OptionReply::error(
                    other,
                    rep::ERR_UNSUP,
                    &format!("option {other} ({}) is not supported", opt::name(other)),
                ))
                .await?;
            }
        }
    }
}

/// The export `name` if this client may enter transmission with it now.
fn lookup_for_transmission(ctx: &HandshakeCtx, st: &State, name: &[u8]) -> Option<Arc<Export>> {
    ctx.exports.current().visible(name, &st.peer).cloned()
}

/// How to refuse an INFO/GO/meta request for `name`: exports that only
/// certificate holders may use answer TLS_REQD before the upgrade (the
/// spec's SELECTIVETLS rule); everything else missing or denied looks
/// unknown.
fn refusal(ctx: &HandshakeCtx, st: &State, name: &[u8]) -> (u32, String) {
    let shown = String::from_utf8_lossy(name);
    if !st.io.is_tls() && ctx.tls_mode == TlsMode::On {
        if let Some(e) = std::str::from_utf8(name)
            .ok()
            .and_then(|n| ctx.exports.current().get(n).cloned())
        {
            if !e.allow.is_empty() && e.allow.iter().all(|r| r.needs_tls()) {
                return (
                    rep::ERR_TLS_REQD,
                    format!("export {shown:?} requires TLS: send NBD_OPT_STARTTLS first"),
                );
            }
        }
    }
    (rep::ERR_UNKNOWN, format!("export {shown:?} not found"))
}

fn finish(st: &State, export: Arc<Export>, name: &[u8]) -> Negotiated {
    let contexts = match &st.meta_for {
        Some((n, c)) if n.as_ref() == name => c.clone(),
        _ => Vec::new(),
    };
    let flags = transmission_flags(&export, st.structured || st.extended);
    Negotiated {
        export,
        structured: st.structured,
        extended: st.extended,
        contexts,
        flags,
    }
}

/// The contexts a query list selects (SET) or lists (LIST) for an export
/// whose LUN has `snapshots`, in the order first asked for, each once.
/// Queries of other namespaces, and names the export does not have (a
/// snapshot that does not exist), are ignored as the spec requires.
///
/// `base:` lists `base:allocation`; `qemu:` and `qemu:dirty-bitmap:` list
/// every dirty bitmap (qemu's own wildcards); in SET they select nothing.
/// No query lists everything; SET with none selects nothing.
fn select_contexts(
    queries: &[Bytes],
    set: bool,
    snapshots: &[String],
) -> Result<Vec<MetaContext>, String> {
    let bitmaps = || snapshots.iter().cloned().map(MetaContext::DirtyBitmap);
    let mut out: Vec<MetaContext> = Vec::new();
    if queries.is_empty() {
        if !set {
            out.push(MetaContext::BaseAllocation);
            out.extend(bitmaps());
        }
        return Ok(out);
    }
    for q in queries {
        let q = std::str::from_utf8(q).map_err(|_| "query is not UTF-8".to_string())?;
        let Some((ns, leaf)) = q.split_once(':') else {
            return Err(format!("query {q:?} lacks a namespace and colon"));
        };
        let hits: Vec<MetaContext> = match (ns, leaf) {
            ("base", "allocation") => vec![MetaContext::BaseAllocation],
            ("base", "") if !set => vec![MetaContext::BaseAllocation],
            ("qemu", "" | "dirty-bitmap:") if !set => bitmaps().collect(),
            ("qemu", _) => match leaf.strip_prefix("dirty-bitmap:") {
                Some(snap) if !snap.is_empty() && snapshots.iter().any(|s| s == snap) => {
                    vec![MetaContext::DirtyBitmap(snap.to_string())]
                }
                _ => vec![],
            },
            _ => vec![],
        };
        for h in hits {
            if !out.contains(&h) {
                out.push(h);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: &[&str]) -> Vec<Bytes> {
        v.iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    fn names(r: Result<Vec<MetaContext>, String>) -> Vec<String> {
        r.unwrap().iter().map(MetaContext::name).collect()
    }

    #[test]
    fn context_selection_follows_the_spec() {
        let none: &[String] = &[];
        assert_eq!(
            names(select_contexts(&[], false, none)),
            ["base:allocation"],
            "LIST all"
        );
        assert!(
            names(select_contexts(&[], true, none)).is_empty(),
            "SET none"
        );
        assert_eq!(
            names(select_contexts(&q(&["base:"]), false, none)),
            ["base:allocation"]
        );
        assert!(names(select_contexts(&q(&["base:"]), true, none)).is_empty());
        assert_eq!(
            names(select_contexts(&q(&["base:allocation"]), true, none)),
            ["base:allocation"]
        );
        assert!(names(select_contexts(&q(&["qemu:dirty-bitmap:x"]), true, none)).is_empty());
        assert_eq!(
            names(select_contexts(
                &q(&["base:nope", "base:allocation"]),
                true,
                none
            )),
            ["base:allocation"]
        );
        assert!(select_contexts(&q(&["nocolon"]), true, none).is_err());
    }

    #[test]
    fn dirty_bitmaps_are_offered_for_each_snapshot_and_only_those() {
        let snaps = vec!["base".to_string(), "nightly".to_string()];
        let all = [
            "base:allocation",
            "qemu:dirty-bitmap:base",
            "qemu:dirty-bitmap:nightly",
        ];
        assert_eq!(
            names(select_contexts(&[], false, &snaps)),
            all,
            "LIST everything"
        );
        for wildcard in ["qemu:", "qemu:dirty-bitmap:"] {
            assert_eq!(
                names(select_contexts(&q(&[wildcard]), false, &snaps)),
                &all[1..],
                "LIST {wildcard}"
            );
            assert!(
                names(select_contexts(&q(&[wildcard]), true, &snaps)).is_empty(),
                "SET {wildcard} selects nothing"
            );
        }
        assert_eq!(
            names(select_contexts(
                &q(&[
                    "qemu:dirty-bitmap:nightly",
                    "base:allocation",
                    "qemu:dirty-bitmap:nightly"
                ]),
                true,
                &snaps
            )),
            ["qemu:dirty-bitmap:nightly", "base:allocation"],
            "in the order asked, each once"
        );
        for unknown in [
            "qemu:dirty-bitmap:gone",
            "qemu:dirty-bitmap:",
            "qemu:dirty-bitmap:base2",
            "qemu:allocation-depth",
            "qemu:base",
            "x-other:dirty-bitmap:base",
        ] {
            assert!(
                names(select_contexts(&q(&[unknown]), true, &snaps)).is_empty(),
                "{unknown} selects nothing"
            );
        }
        assert_eq!(
            names(select_contexts(
                &q(&["qemu:dirty-bitmap:base"]),
                false,
                &snaps
            )),
            ["qemu:dirty-bitmap:base"],
            "LIST of one name"
        );
    }
}
