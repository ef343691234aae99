//! The NBD protocol (NetworkBlockDevice/nbd doc/proto.md): constants
//! ([`proto`]), framing ([`codec`]), the fixed-newstyle handshake
//! ([`handshake`]), the transmission phase ([`session`] and its reply
//! [`writer`]), TLS ([`tls`]) and the byte stream under them
//! ([`transport`]).

pub mod codec;
pub mod handshake;
pub mod proto;
pub mod session;
pub mod tls;
pub mod transport;
pub mod writer;
