//! The reply writer of one connection: one task that puts every reply on
//! the wire, batching small ones into few syscalls (headers and small
//! payloads copied into one buffer, large payloads written straight from
//! their own `Bytes`).
//!
//! Each message carries what it holds of the connection's memory account
//! ([`Hold`]); that is released only once the message is on the wire, so a
//! client that does not read its replies keeps its own requests waiting at
//! the reader, never the gateway's memory growing.
//!
//! A simple-reply READ longer than the streaming window is one
//! [`Outgoing::Stream`]: its header and data pieces must be contiguous on
//! the wire, so the writer sends them in order before anything else; other
//! replies wait in the queue meanwhile.

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::codec::{Reply, RequestCodec};
use super::transport::BoxWriter;
use crate::memory::Credit;

/// Payloads up to this size are copied into the batch buffer; larger ones
/// are written from their own buffer.
const COPY_LIMIT: usize = 32 * 1024;
/// Write the batch buffer out once it holds this much.
const FLUSH_AT: usize = 256 * 1024;

/// Memory a message keeps charged until it has been written.
#[derive(Debug, Default)]
pub struct Hold {
    /// The request's credit (on its last message).
    pub credit: Option<Credit>,
    /// One piece of the request's streaming window.
    pub piece: Option<OwnedSemaphorePermit>,
}

impl Hold {
    pub fn credit(credit: Credit) -> Hold {
        Hold {
            credit: Some(credit),
            piece: None,
        }
    }
}

/// One data piece of a streamed reply and its window slot.
pub type Piece = (Bytes, OwnedSemaphorePermit);

pub enum Outgoing {
    Reply {
        reply: Reply,
        hold: Hold,
    },
    /// A simple-reply READ sent in pieces: `head` (error 0), then exactly
    /// `total` bytes from `first` and `rest`. A piece that cannot be read
    /// arrives as `Err`, or `rest` ends early: the writer then hangs up,
    /// which is what the spec requires once a successful header is out.
    Stream {
        head: Reply,
        total: u64,
        first: Piece,
        rest: mpsc::UnboundedReceiver<Result<Piece, ()>>,
        credit: Credit,
    },
}

pub type Tx = mpsc::UnboundedSender<Outgoing>;

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] super::codec::CodecError),
    #[error("a streamed read failed after its reply header was sent ({sent} of {total} bytes); hanging up as the spec requires")]
    StreamBroken { sent: u64, total: u64 },
}

/// Write replies until every sender is gone, then shut the stream down.
/// On an error `failed` is cancelled so the reader stops too.
pub async fn write_replies(
    mut w: BoxWriter,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    codec: RequestCodec,
    failed: CancellationToken,
) -> Result<(), WriterError> {
    let mut buf = BytesMut::with_capacity(FLUSH_AT + COPY_LIMIT);
    let mut holds: Vec<Hold> = Vec::with_capacity(64);
    let res = async {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    Outgoing::Reply { reply, hold } => {
                        holds.push(hold);
                        let tail = codec.encode_split(&reply, &mut buf, COPY_LIMIT)?;
                        if let Some(data) = tail {
                            w.write_all(&buf).await?;
                            buf.clear();
                            w.write_all(&data).await?;
                        } else if buf.len() >= FLUSH_AT {
                            w.write_all(&buf).await?;
                            buf.clear();
                        }
                    }
                    Outgoing::Stream {
                        head,
                        total,
                        first,
                        rest,
                        credit,
                    } => {
                        codec.encode_split(&head, &mut buf, COPY_LIMIT)?;
                        w.write_all(&buf).await?;
                        buf.clear();
                        stream(&mut w, total, first, rest).await?;
                        drop(credit);
                    }
                }
                next = rx.try_recv().ok();
            }
            if !buf.is_empty() {
                w.write_all(&buf).await?;
                buf.clear();
            }
            w.flush().await?;
            holds.clear();
        }
        w.shutdown().await?;
        Ok(())
    }
    .await;
    if res.is_err() {
        failed.cancel();
    }
    res
}

async fn stream(
    w: &mut BoxWriter,
    total: u64,
    first: Piece,
    mut rest: mpsc::UnboundedReceiver<Result<Piece, ()>>,
) -> Result<(), WriterError> {
    let mut sent = 0u64;
    let mut piece = Some(first);
    while let Some((data, slot)) = piece.take() {
        w.write_all(&data).await?;
        sent += data.len() as u64;
        drop(slot);
        if sent >= total {
            return Ok(());
        }
        piece = match rest.recv().await {
            Some(Ok(p)) => Some(p),
            Some(Err(())) | None => None,
        };
    }
    Err(WriterError::StreamBroken { sent, total })
}
