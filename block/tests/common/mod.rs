//! What the volume tests share: a fresh LUN file and its volume config.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;

use lungate_block::engine::IoEngine;
use lungate_block::volume::{VolumeConfig, VolumeOptions};
use uuid::Uuid;

/// `DIR/NAME.lun`, a new sparse file of `size` bytes, as a read-write
/// volume with `cluster` byte clusters, a fresh LUN UUID, nothing
/// protected, on `engine` (none: the asynchronous calls run inline).
pub fn lun_config(
    dir: &Path,
    name: &str,
    size: u64,
    cluster: u64,
    engine: Option<IoEngine>,
) -> VolumeConfig {
    let path = dir.join(format!("{name}.lun"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    f.set_len(size).unwrap();
    VolumeConfig {
        lun_path: path,
        file: Arc::new(f),
        lun_uuid: Uuid::new_v4(),
        size,
        protected: vec![],
        options: VolumeOptions {
            cluster_size: cluster as u32,
            read_only: false,
        },
        engine,
    }
}
