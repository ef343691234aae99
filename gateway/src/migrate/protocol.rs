//! The migration protocol on the wire: one connection per migration, the
//! frames of `lungate_api::migrate` (typed messages as JSON, data as
//! checksummed binary pieces), and the steps below. Version
//! [`lungate_api::migrate::VERSION`]; a target answers another version with
//! a `version` denial before anything else.
//!
//! ```text
//!  source gateway                                          target gateway
//!  ──────────────                                          ──────────────
//!  (TLS handshake, when [migration] tls)
//!  Hello{version, gateway, token} ───────────────────────▶ version, token,
//!                                 ◀─────────────────────── allow rules:
//!                                  Welcome | Denied{why}
//!  Prepare{members, layers,       ───────────────────────▶ admission: pool,
//!          manifest, policy}                               space, name and
//!                                 ◀─────────────────────── UUID clash, policy
//!                                 Permitted | Denied{why}   (nothing made yet)
//!  start dirty tracking                                    record `staged`,
//!  ── copy ──                                              staging directory
//!  Data{LUN file, frozen layers}  ───────────────────────▶ blake3 per piece,
//!  FilesDone{member}              ───────────────────────▶ build live layer,
//!  Data|Zero{view} (bulk pass)    ───────────────────────▶ open its volume
//!  RoundEnd{0}                    ───────────────────────▶
//!                                 ◀─────────────────────── RoundDone{0}
//!  ── rounds: clusters dirtied meanwhile, until they fit --downtime-ms ──
//!  Data|Zero{view}, RoundEnd{n}   ───────────────────────▶
//!                                 ◀─────────────────────── RoundDone{n}
//!  ── switch ──
//!  pause every member's gate (drain in-flight, park new requests FIFO)
//!  Data|Zero{view} (last dirty clusters, state region included),
//!  Data{LUN file: label and GPT}  ───────────────────────▶
//!  record `switching`
//!  Commit{tally, frames, bytes}   ───────────────────────▶ tally equal? flush,
//!                                                          record `committed`
//!                                                          (the commit point),
//!                                                          move into the pool,
//!                                 ◀─────────────────────── lock, serve
//!                                  Complete{exports, nbd}
//!  swap each gate's layer below to an NBD client of the
//!  target's exports, drop our exports, resume: parked
//!  requests go to the target in arrival order
//!  Ops{queued control operations} ───────────────────────▶ run them in order
//!                                 ◀─────────────────────── OpsDone{results}
//!  retire our copy, drop our record
//!  Finish                         ───────────────────────▶ record `done`
//!                                 ◀─────────────────────── Ack
//!
//!  abort (refusal, error, timeout, `lunctl migrate --abort`) before
//!  Commit: Abort{reason} ─────────▶ remove every file made, drop record;
//!  the source resumes its gates and runs queued operations itself.
//!  After a crash with a `switching` record: Query{id} ──▶ Status{committed
//!  | unknown}: the source retires its copy, or serves it again.
//! ```
//!
//! Ownership is decided by one durable write: the target's `committed`
//! record. Before it the source owns the LUNs (a crash of either side ends
//! in an abort); after it the target does (a source that restarts with a
//! `switching` record asks, and does not serve the LUN until it knows).
//!
//! This module is the connection ([`Link`]): framing with the length
//! checked before anything is reserved, a timeout on every receive, and
//! writes that queue data frames and flush at message boundaries.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use lungate_api::migrate::{Frame, FrameError, Message};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite};

pub use lungate_api::migrate::VERSION;

/// The frames of `lungate_api::migrate` as a tokio-util codec.
#[derive(Debug, Default, Clone, Copy)]
pub struct Codec;

impl Decoder for Codec {
    type Item = Frame;
    type Error = LinkError;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, LinkError> {
        Frame::decode(src).map_err(LinkError::Frame)
    }
}

impl Encoder<Frame> for Codec {
    type Error = LinkError;
    fn encode(&mut self, f: Frame, dst: &mut BytesMut) -> Result<(), LinkError> {
        f.encode(dst);
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame: {0}")]
    Frame(FrameError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the other side closed the connection")]
    Closed,
    #[error("unexpected {got} while waiting for {want}")]
    Unexpected { got: String, want: &'static str },
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// One migration connection.
pub struct Link {
    rx: FramedRead<BoxRead, Codec>,
    tx: FramedWrite<BoxWrite, Codec>,
    /// Who is at the other end (for messages).
    pub peer: String,
}

/// A short name of a frame, for errors.
pub fn describe(f: &Frame) -> String {
    match f {
        Frame::Message(m) => serde_json::to_value(m)
            .ok()
            .and_then(|v| v.get("msg").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| "a message".into()),
        Frame::Data(d) => format!("data for {}", d.object),
        Frame::Zero { object, .. } => format!("zeros for {object}"),
    }
}

impl Link {
    pub fn new<S>(stream: S, peer: String) -> Link
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let mut tx = FramedWrite::new(Box::new(w) as BoxWrite, Codec);
        // Data frames are queued up to here before the socket is written.
        tx.set_backpressure_boundary(2 << 20);
        Link {
            rx: FramedRead::with_capacity(Box::new(r) as BoxRead, Codec, 2 << 20),
            tx,
            peer,
        }
    }

    /// Queue a frame (data frames: written when the buffer fills or at the
    /// next [`Link::send`]).
    pub async fn feed(&mut self, f: Frame) -> Result<(), LinkError> {
        self.tx.feed(f).await
    }

    /// Send a frame and everything queued before it.
    pub async fn send(&mut self, f: Frame) -> Result<(), LinkError> {
        self.tx.send(f).await
    }

    pub async fn send_msg(&mut self, m: Message) -> Result<(), LinkError> {
        self.send(Frame::Message(m)).await
    }

    /// The next frame, within `timeout`.
    /// The source's next frame on a target's side, or why none comes:
    /// `cancel` fired (the error is `cancelled`), the source closed the
    /// connection, or the link failed or stayed quiet for `idle`.
    pub async fn recv_from_source(
        &mut self,
        idle: Duration,
        cancel: &tokio_util::sync::CancellationToken,
        cancelled: &str,
    ) -> Result<Frame, String> {
        let f = tokio::select! {
            _ = cancel.cancelled() => return Err(cancelled.into()),
            f = self.recv(idle) => f,
        };
        match f {
            Ok(f) => Ok(f),
            Err(LinkError::Closed) => Err("the source closed the connection".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn recv(&mut self, timeout: Duration) -> Result<Frame, LinkError> {
        match tokio::time::timeout(timeout, self.rx.next()).await {
            Err(_) => Err(LinkError::Timeout(timeout)),
            Ok(None) => Err(LinkError::Closed),
            Ok(Some(r)) => r,
        }
    }

    /// The next frame, which must be a message.
    pub async fn recv_msg(
        &mut self,
        timeout: Duration,
        want: &'static str,
    ) -> Result<Message, LinkError> {
        match self.recv(timeout).await? {
            Frame::Message(m) => Ok(m),
            f => Err(LinkError::Unexpected {
                got: describe(&f),
                want,
            }),
        }
    }
}
