//! `lungate demo`: make sure a pool with the demo LUN exists, then serve
//! it with the embedded `config/demo.toml` settings.

use std::path::Path;

use lun_manager::{CreateSpec, Layout, Lun};
use lungate_config::{ConfigError, DemoConfig, GatewayConfig};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("embedded demo configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("demo layout {0}")]
    Layout(String),
    #[error("cannot prepare demo pool {path}: {source}")]
    Lun {
        path: String,
        source: lun_manager::Error,
    },
}

/// Create `dir` as a pool holding the demo LUN unless it is already there;
/// return the gateway configuration that serves it.
pub fn prepare(dir: &Path) -> Result<(GatewayConfig, String), DemoError> {
    let demo = DemoConfig::embedded()?;
    let lun_err = |source| DemoError::Lun {
        path: dir.display().to_string(),
        source,
    };
    if !lun_manager::pool::is_pool(dir) {
        lun_manager::pool::init(dir).map_err(lun_err)?;
    }
    let path = lun_manager::pool::lun_path(dir, &demo.lun.name);
    if !path.exists() {
        let layout: Layout = demo.lun.layout.parse().map_err(DemoError::Layout)?;
        let spec = CreateSpec {
            name: demo.lun.name.clone(),
            disks: demo.lun.disks.iter().map(|d| d.0).collect(),
            memory: demo.lun.memory.0,
            vcpus: demo.lun.vcpus,
            layout,
            cluster_size: 0,
            checksums: false,
        };
        Lun::create(&path, &spec).map_err(lun_err)?;
        tracing::info!(lun = %path.display(), "created demo LUN");
    }
    let mut cfg = demo.gateway;
    cfg.pools = vec![dir.to_path_buf()];
    cfg.validate()?;
    Ok((cfg, format!("{}/disk0", demo.lun.name)))
}
