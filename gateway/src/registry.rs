//! What the running gateway serves: the exports (what NBD clients see) and
//! the served LUNs behind them (what the control API operates on), plus the
//! settings a LUN added at run time (a clone) is exported with.

use std::path::Path;
use std::sync::{Arc, RwLock};

use lungate_config::AllowRule;

use crate::export::{BlockSizes, ExportError, Exports};
use crate::served::ServedLun;
use crate::switch::SwitchStats;

#[derive(Debug)]
pub struct Registry {
    pub exports: Arc<Exports>,
    luns: RwLock<Vec<Arc<ServedLun>>>,
    pub switch_stats: Arc<SwitchStats>,
    pub read_only: bool,
    pub block: BlockSizes,
    pub pool_allow: Vec<AllowRule>,
    /// The control socket named in the `Owner` records of LUNs this
    /// gateway opens at run time (clones).
    pub control: Option<std::path::PathBuf>,
    /// Migrations this gateway runs or answers, and their settings.
    pub migrate: crate::migrate::Hub,
}

impl Registry {
    pub fn new(
        exports: Arc<Exports>,
        luns: Vec<Arc<ServedLun>>,
        switch_stats: Arc<SwitchStats>,
        read_only: bool,
        block: BlockSizes,
        pool_allow: Vec<AllowRule>,
        control: Option<std::path::PathBuf>,
    ) -> Registry {
        let mut luns = luns;
        luns.sort_by(|a, b| a.key.cmp(&b.key));
        Registry {
            exports,
            luns: RwLock::new(luns),
            switch_stats,
            read_only,
            block,
            pool_allow,
            control,
            migrate: Default::default(),
        }
    }

    pub fn luns(&self) -> Vec<Arc<ServedLun>> {
        self.luns.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A served LUN by name or UUID.
    pub fn find(&self, id: &str) -> Option<Arc<ServedLun>> {
        self.luns()
            .into_iter()
            .find(|l| l.lun.name() == id || l.lun.uuid().to_string() == id)
    }

    pub fn find_path(&self, path: &Path) -> Option<Arc<ServedLun>> {
        let key = std::fs::canonicalize(path).ok()?;
        self.luns().into_iter().find(|l| l.key == key)
    }

    /// Serve a LUN opened at run time: its disks become `NAME/diskN`.
    /// Returns the export names added.
    pub fn add(&self, lun: Arc<ServedLun>) -> Result<Vec<String>, ExportError> {
        let exports =
            crate::export::pool_exports(&lun, self.read_only, self.block, &self.pool_allow)?;
        let names: Vec<String> = exports.iter().map(|e| e.name.clone()).collect();
        let refused = self.exports.add(exports);
        for n in &refused {
            tracing::warn!(export = %n, lun = %lun.lun.path().display(), "export name already taken; not exported");
        }
        self.luns
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(lun);
        Ok(names.into_iter().filter(|n| !refused.contains(n)).collect())
    }

    /// Stop offering `lun`: its exports and its entry go (connections
    /// already open keep their exports; see [`crate::migrate`]). Returns the
    /// export names removed.
    pub fn retire(&self, lun: &Arc<ServedLun>) -> Vec<String> {
        let names = self.exports.remove_lun(lun);
        self.luns
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|l| !Arc::ptr_eq(l, lun));
        names
    }

    /// Serve a LUN that arrived by migration, in place of any LUN of the
    /// same UUID served here (a move between this gateway's pools: the
    /// LUN it left). Returns the export names added.
    pub fn adopt(&self, lun: Arc<ServedLun>) -> Result<Vec<String>, ExportError> {
        for old in self.luns() {
            if old.lun.uuid() == lun.lun.uuid() && !Arc::ptr_eq(&old, &lun) {
                self.retire(&old);
            }
        }
        self.add(lun)
    }
}
