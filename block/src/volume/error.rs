//! The volume engine's error type: every variant names what failed and the
//! values involved.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// On-disk metadata failed a check: checksum, magic, a field out of range.
    #[error("{path}: corrupt volume metadata: {why}")]
    Corrupt { path: PathBuf, why: String },
    /// A data cluster's bytes differ from the checksum its layer committed
    /// (silent corruption below us: the medium, a stray writer, a bit flip).
    #[error("{path}: cluster {cluster} (physical {phys}) of layer {layer} fails its data checksum: its bytes changed after they were committed")]
    DataChecksum {
        path: PathBuf,
        layer: uuid::Uuid,
        cluster: u64,
        phys: u64,
    },
    #[error("offset {offset} + length {len} exceeds volume size {size}")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error(
        "range [{offset}, +{len}) touches the label region [{start}, {end}), which is not layered and cannot be written through the volume"
    )]
    Protected {
        offset: u64,
        len: u64,
        start: u64,
        end: u64,
    },
    #[error("no snapshot named {0:?}")]
    NoSnapshot(String),
    #[error("a snapshot named {0:?} already exists")]
    SnapshotExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}: volume opened read-only")]
    ReadOnly(PathBuf),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a path and an operation name to an `io::Error`.
pub(crate) trait IoCtx<T> {
    fn ctx(self, path: &Path, op: &'static str) -> Result<T>;
}

impl<T> IoCtx<T> for io::Result<T> {
    fn ctx(self, path: &Path, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            op,
            source,
        })
    }
}

pub(crate) fn corrupt(path: &Path, why: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        why: why.into(),
    }
}
