//! The library's error type: every variant names what failed and the values
//! involved, so `lunctl` can print it as is.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::format::label::LabelError;
use crate::format::state::DirError;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a lungate LUN ({why})")]
    NotALun { path: PathBuf, why: String },
    #[error("{path}: damaged LUN: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error("{path}: label: {source}")]
    Label {
        path: PathBuf,
        #[source]
        source: LabelError,
    },
    #[error("{path}: state directory: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: DirError,
    },
    #[error("{0}")]
    Invalid(String),
    /// `0` says which snapshot and in which LUN.
    #[error("{0}")]
    NoSnapshot(String),
    #[error("{0}")]
    SnapshotExists(String),
    #[error("{what}: offset {offset} + length {len} exceeds region size {size}")]
    OutOfBounds {
        what: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{path}: opened read-only")]
    ReadOnly { path: PathBuf },
    #[error("{path} already exists")]
    Exists { path: PathBuf },
    #[error("pool {pool} already has a VM named {name:?} ({path})")]
    NameTaken {
        pool: PathBuf,
        name: String,
        path: PathBuf,
    },
    #[error("{path}: state record {record}: {why}")]
    Record {
        path: PathBuf,
        record: String,
        why: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a path and an operation name to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, path: &std::path::Path, op: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, path: &std::path::Path, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            op,
            source,
        })
    }
}
