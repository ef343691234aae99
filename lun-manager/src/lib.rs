//! lungate's LUN manager: the on-disk format of a VM's LUN (GPT, label,
//! hidden state region), provisioning, pools, the discovery scanner and its
//! reports, and the backend I/O engine the gateway serves disks through.
//!
//! Data path seen from here: the gateway's export (region view) calls into
//! [`backend`] with byte offsets inside one region of a [`Lun`]; provisioning
//! (`lunctl`) uses [`Lun`] directly.

pub mod backend;
pub mod error;
pub mod fileops;
pub mod format;
pub mod group;
pub mod lun;
pub mod owner;
pub mod pool;
pub mod progress;
pub mod report;
pub mod scan;
pub mod size;
pub mod volume;

pub use error::{Error, Result};
pub use format::{Layout, Region, RegionKind};
pub use lun::{Access, CreateSpec, Lun};
