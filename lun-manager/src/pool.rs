//! Pools: a directory of sparse LUN files named `NAME.lun`, marked by a
//! `.lungate-pool` file so a typo never provisions into the wrong place.
//!
//! An RBD pool (`rbd:POOL[/NAMESPACE]`, with the `rbd` feature) is the
//! same: images named `NAME.lun` in that pool and namespace, marked by a
//! RADOS object `.lungate-pool` in the namespace. Every function here takes
//! either kind of pool path.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

pub const MARKER: &str = ".lungate-pool";
pub const EXT: &str = "lun";

#[cfg(feature = "rbd")]
fn rbd_pool(dir: &Path) -> Result<lungate_block::store::rbd::PoolSpec> {
    lungate_block::store::rbd::PoolSpec::parse(&dir.to_string_lossy()).map_err(Error::Invalid)
}

#[cfg(feature = "rbd")]
fn rbd_marker(dir: &Path) -> Result<bool> {
    let spec = rbd_pool(dir)?;
    let pool = lungate_block::store::rbd::Pool::open(&spec).ctx(dir, "connect to the RBD pool")?;
    Ok(pool
        .read_object(MARKER, 4096)
        .ctx(dir, "read pool marker")?
        .is_some())
}

/// Create (or adopt) `dir` as a pool.
pub fn init(dir: &Path) -> Result<()> {
    if crate::backing::is_rbd(dir) {
        return init_rbd(dir);
    }
    std::fs::create_dir_all(dir).ctx(dir, "create pool directory")?;
    let marker = dir.join(MARKER);
    if !marker.exists() {
        std::fs::write(
            &marker,
            format!("{{\"lungate_pool\":1,\"created\":{}}}\n", crate::lun::now()),
        )
        .ctx(&marker, "write pool marker")?;
    }
    Ok(())
}

#[cfg(feature = "rbd")]
fn init_rbd(dir: &Path) -> Result<()> {
    let spec = rbd_pool(dir)?;
    lungate_block::store::rbd::Pool::init(&spec).ctx(dir, "initialise the RBD pool")?;
    let pool = lungate_block::store::rbd::Pool::open(&spec).ctx(dir, "connect to the RBD pool")?;
    if pool
        .read_object(MARKER, 4096)
        .ctx(dir, "read pool marker")?
        .is_none()
    {
        pool.write_object(
            MARKER,
            format!("{{\"lungate_pool\":1,\"created\":{}}}\n", crate::lun::now()).as_bytes(),
        )
        .ctx(dir, "write pool marker")?;
    }
    Ok(())
}

#[cfg(not(feature = "rbd"))]
fn init_rbd(dir: &Path) -> Result<()> {
    Err(crate::backing::Backing::open(dir, crate::Access::ReadOnly).unwrap_err())
}

pub fn is_pool(dir: &Path) -> bool {
    if crate::backing::is_rbd(dir) {
        #[cfg(feature = "rbd")]
        return rbd_marker(dir).unwrap_or(false);
        #[cfg(not(feature = "rbd"))]
        return false;
    }
    dir.join(MARKER).is_file()
}

/// Refuse to provision into a directory that is not a pool.
pub fn require(dir: &Path) -> Result<()> {
    if crate::backing::is_rbd(dir) {
        #[cfg(feature = "rbd")]
        if rbd_marker(dir)? {
            return Ok(());
        }
        return Err(Error::Invalid(format!(
            "{} is not a lungate pool (no {MARKER} object; create it with: lunctl pool init {})",
            dir.display(),
            dir.display()
        )));
    }
    if !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "pool {} does not exist (create it with: lunctl pool init {})",
            dir.display(),
            dir.display()
        )));
    }
    if !is_pool(dir) {
        return Err(Error::Invalid(format!(
            "{} is not a lungate pool (no {MARKER}; create it with: lunctl pool init {})",
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// Path of LUN `name` in pool `dir`.
pub fn lun_path(dir: &Path, name: &str) -> PathBuf {
    #[cfg(feature = "rbd")]
    if let Ok(spec) = rbd_pool(dir) {
        return spec.image(&format!("{name}.{EXT}")).path();
    }
    dir.join(format!("{name}.{EXT}"))
}

/// Whether a LUN file or RBD image exists at `path`.
pub fn lun_exists(path: &Path) -> bool {
    if crate::backing::is_rbd(path) {
        return crate::backing::Backing::open(path, crate::Access::ReadOnly).is_ok();
    }
    path.exists()
}

/// The `*.lun` files of a pool directory, sorted by name.
/// The LUN in pool `dir` whose VM is named `name`, if any (names are
/// unique in a pool: exports are named after them). Reads labels only;
/// files whose label cannot be read are not counted.
pub fn find_vm(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    Ok(list_luns(dir)
        .ctx(dir, "list pool")?
        .into_iter()
        .find(|p| crate::Lun::probe_label(p).is_ok_and(|l| l.name == name)))
}

pub fn list_luns(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    if crate::backing::is_rbd(dir) {
        #[cfg(feature = "rbd")]
        {
            let spec = rbd_pool(dir).map_err(std::io::Error::other)?;
            let pool = lungate_block::store::rbd::Pool::open(&spec)?;
            return Ok(pool
                .list()?
                .into_iter()
                .filter(|n| n.ends_with(&format!(".{EXT}")))
                .map(|n| spec.image(&n).path())
                .collect());
        }
        #[cfg(not(feature = "rbd"))]
        return Err(std::io::Error::other(format!(
            "{}: this build has no Ceph RBD support",
            dir.display()
        )));
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        // A LUN file, or a link to a block device (`lunctl create --device`).
        .filter(|p| {
            p.extension().is_some_and(|x| x == EXT)
                && std::fs::metadata(p).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.is_file() || m.file_type().is_block_device()
                })
        })
        .collect();
    v.sort();
    Ok(v)
}
