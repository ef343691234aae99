//! lungate's data path below the NBD wire layer, and nothing else (no
//! HTTP, no CLI, no GPT or label): the copy-on-write [`volume`] of a LUN,
//! the [`engine`] that does its file I/O (io_uring worker rings, or a
//! thread pool of plain system calls), and [`sys`], the one place that
//! makes the file system calls the volume and provisioning need; long
//! operations report through [`progress::Progress`].
//!
//! The LUN format (label, state region, GPT) lives in `lun-manager`, which
//! builds a [`volume::VolumeConfig`] from a LUN's label; this crate never
//! looks inside the bytes it stores.

pub mod device;
pub mod engine;
pub mod progress;
pub mod region;
pub mod store;
pub mod sys;
pub mod volume;

pub use device::{BlockDevice, Caps, Chunk, Extent, IoFuture};
pub use region::Region;
