//! lungate's LUN manager: the on-disk format of a VM's LUN (GPT, label,
//! hidden state region), provisioning, pools, the consistency group, the
//! discovery scanner and its reports, and `lunctl`.
//!
//! A [`Lun`] opens its copy-on-write volume from `lungate_block` (the data
//! path lives there); this crate knows the LUN's format, the block crate
//! never does.

pub mod backing;
pub mod error;
pub mod format;
pub mod group;
pub mod import;
pub mod lun;
pub mod owner;
pub mod pool;
pub mod progress;
pub mod report;
pub mod scan;
pub mod size;

pub use error::{Error, Result};
pub use format::{Layout, Region, RegionKind};
pub use lun::{Access, CreateSpec, Lun};
