//! lungate's wire vocabulary, shared by the gateway and its clients
//! (`lunctl`, `vmm-shim`), so each message has one definition:
//!
//! * [`types`]: the control API's requests and replies (docs/control-api.md);
//! * [`records`]: the hidden state region's record types and JSON payloads
//!   (docs/lun-format.md);
//! * [`client`]: a typed blocking client of the control API;
//! * [`migrate`]: the gateway-to-gateway migration protocol's messages and
//!   frames;
//! * [`nbd`]: NBD protocol constants and a small blocking NBD client.
//!
//! Nothing here touches a LUN file: the on-disk directory, volumes and
//! locks belong to `lun_manager`, serving to the gateway.

pub mod client;
pub mod etcd;
pub mod migrate;
pub mod nbd;
pub mod records;
pub mod types;

pub use client::Client;
