//! NBD (NetworkBlockDevice/nbd doc/proto.md): the protocol's constants,
//! shared with the gateway's server ([`proto`]), and a blocking client of
//! one export ([`client`]).

pub mod client;
pub mod proto;
