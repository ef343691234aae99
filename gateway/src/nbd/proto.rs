//! NBD protocol constants and the plain enums built from them. They live in
//! `lungate_api::nbd::proto`, shared with the NBD client that `vmm-shim`
//! uses; this module re-exports them so the server's code names them as
//! before.

pub use lungate_api::nbd::proto::*;
