//! Human sizes: the workspace's one size grammar lives in
//! `lungate_config::size` (shared with the TOML files); re-exported here
//! for the LUN manager's callers.

pub use lungate_config::size::{human, parse_size};
