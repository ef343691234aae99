//! The copy-on-write volume engine: a LUN's byte range served through a
//! chain of layers (the raw LUN file at the bottom, sparse delta files
//! above it), with O(1) snapshots, reverts, clones, snapshot deletion by
//! merging, flatten, diff and space accounting.
//!
//! This module owns the layers directory `POOL/NAME.layers/` next to
//! `POOL/NAME.lun`: the [`manifest`] (the layer tree), the delta files
//! ([`layer`], [`header`], [`journal`]). It must not touch the LUN file
//! except through reads and the writes a guest asks for, and never the
//! label region, which is not layered (see `docs/volumes.md`).
//!
//! Concurrency: every I/O holds the chain lock shared for its duration and
//! a per-cluster shard lock while it resolves and touches one cluster; the
//! in-memory index is locked only around lookups and updates, never across
//! I/O. Tree operations (snapshot, revert, delete, clone, flatten) are
//! serialised by a maintenance mutex and take the chain lock exclusively
//! only for their short commit step, which also drains in-flight I/O.

pub mod diff;
pub mod dirty;
pub mod error;
pub mod header;
pub mod journal;
pub mod layer;
pub mod manifest;
pub mod repair;
pub mod scrub;
pub mod table;

mod engine;
mod grow;
mod io;
mod native;

pub use io::VolumeDevice;
pub use native::StoreVolume;

pub use engine::{
    Change, ChangeKind, LayerUsage, SnapshotInfo, Volume, VolumeConfig, VolumeOptions,
};
pub use error::{Error, Result};
pub use scrub::{ScrubError, ScrubReport};

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

// A panic while a lock is held leaves plain data behind (no invariant spans
// a panic point), so poisoning is ignored.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
pub(crate) fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
pub(crate) fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}
