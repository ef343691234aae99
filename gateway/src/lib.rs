//! lungate: the NBD gateway that serves the disk regions of LUN files.
//!
//! Layers, top to bottom: [`server`] (listeners, accept loop, shutdown) →
//! [`nbd`] (wire format, handshake, transmission) → [`export`] (region view:
//! bounds checks, offset into the LUN) → [`served`] (one LUN: its volume,
//! the live-switch [`switch`] gate, the io_uring fast path) →
//! `lungate_block::volume` / `lungate_block::engine`. [`control`] is the
//! HTTP/JSON control API over the [`registry`] of served LUNs; [`migrate`]
//! moves a VM's LUNs to another gateway or pool while they serve. [`memory`]
//! bounds what connections may hold, gateway-wide and per connection. A
//! layer only calls the one beneath it; [`config`] wires them together
//! from a `lungate_config::GatewayConfig`; [`coordinator`] shares RBD
//! pools with other gateways through etcd.

pub mod config;
pub mod control;
pub mod coordinator;
pub mod demo;
pub mod export;
pub mod memory;
pub mod migrate;
pub mod nbd;
pub mod registry;
pub mod served;
pub mod server;
pub mod switch;
