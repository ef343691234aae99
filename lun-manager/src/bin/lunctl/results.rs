//! The `result` objects lunctl prints with `--json` (docs/lunctl.md,
//! "Machine output"): one type per command, so the contract scripts rely
//! on has one definition. `lungate_cli::Output::result` adds `type`, `op`
//! and `exit_code` beside these fields.

use std::path::Path;

use lungate_api::types::SnapshotInfo;
use serde::Serialize;
use uuid::Uuid;

#[derive(Serialize)]
pub struct PoolReady<'a> {
    pub pool: &'a Path,
}

#[derive(Serialize)]
pub struct Disk {
    pub index: u32,
    pub size: u64,
    pub export: String,
}

#[derive(Serialize)]
pub struct Created<'a> {
    pub lun: &'a str,
    pub uuid: Uuid,
    pub path: &'a Path,
    pub layout: lun_manager::Layout,
    pub disks: Vec<Disk>,
    pub prefilled: bool,
    pub checksums: bool,
}

#[derive(Serialize)]
pub struct Imported<'a> {
    pub lun: &'a str,
    pub uuid: Uuid,
    pub path: &'a Path,
    pub layout: lun_manager::Layout,
    pub disks: Vec<Disk>,
    pub image: &'a Path,
    /// Bytes of the image.
    pub image_bytes: u64,
    /// Bytes of data copied (holes and zero blocks are not).
    pub copied_bytes: u64,
}

#[derive(Serialize)]
pub struct Resized<'a> {
    pub lun: &'a str,
    pub path: &'a Path,
    /// Every disk's size, disk0 first.
    pub disks: Vec<u64>,
    pub memory: Option<u64>,
    pub state_region: u64,
    pub lun_size: u64,
}

#[derive(Serialize)]
pub struct Attached<'a> {
    pub lun: &'a str,
    pub secondary: &'a str,
    pub secondary_uuid: Uuid,
}

#[derive(Serialize)]
pub struct Deleted<'a> {
    pub lun: &'a str,
    pub path: &'a Path,
}

#[derive(Serialize)]
pub struct SnapshotTaken<'a> {
    pub lun: &'a str,
    pub snapshot: &'a SnapshotInfo,
    /// How long the guests' I/O was held, when a gateway took it.
    pub pause_us: Option<u64>,
}

#[derive(Serialize)]
pub struct Reverted<'a> {
    pub lun: &'a str,
    pub snapshot: &'a str,
    /// How long the guests' I/O was held, when a gateway reverted it.
    pub pause_us: Option<u64>,
}

#[derive(Serialize)]
pub struct SnapshotDeleted<'a> {
    pub lun: &'a str,
    pub snapshot: &'a str,
}

#[derive(Serialize)]
pub struct Cloned<'a> {
    pub lun: &'a str,
    pub snapshot: &'a str,
    pub clone: &'a str,
    pub path: &'a str,
    /// The clone's exports (its secondaries' too).
    pub exports: &'a [String],
    /// Whether a gateway made the clone and serves it already.
    pub served: bool,
}

#[derive(Serialize)]
pub struct Flattened<'a> {
    pub lun: &'a str,
}

#[derive(Serialize)]
pub struct DiffWritten<'a> {
    pub lun: &'a str,
    pub from: &'a str,
    /// `None`: the live LUN.
    pub to: Option<&'a str>,
    pub file: &'a Path,
    pub bytes: u64,
}

/// Through a gateway (whose reply has no details) every field but `lun`
/// and `file` is null.
#[derive(Serialize)]
pub struct DiffApplied<'a> {
    pub lun: &'a str,
    pub file: &'a Path,
    pub from: Option<String>,
    /// `None` with `from` set: the diff ran to the live LUN.
    pub to: Option<String>,
    pub sections: Option<usize>,
    pub extents: Option<usize>,
    pub bytes: Option<u64>,
    /// Sections applied to another LUN whose disks matched the diff's base
    /// (only their disk extents were written).
    pub base_matched: Option<usize>,
}
