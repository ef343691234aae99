//! lungate: the NBD gateway that serves the disk regions of LUN files.
//!
//! Layers, top to bottom: [`server`] (listeners, accept loop, shutdown) →
//! [`nbd`] (wire format, handshake, transmission) → [`export`] (region view:
//! bounds checks, offset into the LUN file) → `lun_manager::backend`
//! (I/O engine). A layer only calls the one beneath it; [`config`] wires
//! them together from a `lungate_config::GatewayConfig`.

pub mod config;
pub mod demo;
pub mod export;
pub mod nbd;
pub mod server;
