//! Pools: a directory of sparse LUN files named `NAME.lun`, marked by a
//! `.lungate-pool` file so a typo never provisions into the wrong place.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

pub const MARKER: &str = ".lungate-pool";
pub const EXT: &str = "lun";

/// Create (or adopt) `dir` as a pool.
pub fn init(dir: &Path) -> Result<()> {
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

pub fn is_pool(dir: &Path) -> bool {
    dir.join(MARKER).is_file()
}

/// Refuse to provision into a directory that is not a pool.
pub fn require(dir: &Path) -> Result<()> {
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
    dir.join(format!("{name}.{EXT}"))
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
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == EXT) && p.is_file())
        .collect();
    v.sort();
    Ok(v)
}
