//! Scrub: read every checksummed data cluster of every layer of a volume
//! (live, snapshots, layers kept for clones) and check it against the
//! checksum its layer committed, while guest I/O goes on.
//!
//! Each cluster is checked under its shard lock (shared) and the state
//! lock (shared), taken in the data path's order, so a cluster is never
//! read while a writer fills or frees it; a cluster whose layer or mapping
//! changed since the list was taken is skipped (what replaced it is newer
//! and summed by its own commit).

use std::collections::HashMap;

use serde::Serialize;
use uuid::Uuid;

use super::engine::Volume;
use super::{read, Result};
use crate::progress::Progress;

/// One cluster whose bytes differ from their checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScrubError {
    pub layer: Uuid,
    /// The snapshot the layer holds, if any.
    pub snapshot: Option<String>,
    /// Whether the layer is the live one.
    pub live: bool,
    /// Virtual cluster and its byte offset in the volume.
    pub cluster: u64,
    pub offset: u64,
    /// Physical cluster in the layer's object.
    pub phys: u64,
    /// Views (`live`, snapshot names) that read this cluster from the
    /// damaged layer.
    pub affected: Vec<String>,
    /// Views that hold another version of the cluster which passes its
    /// checksum (an older or newer copy to restore from).
    pub intact_in: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScrubReport {
    /// Layers that keep checksums, and those that do not (a base LUN
    /// file, layers made before checksums were turned on).
    pub layers_checked: usize,
    pub layers_without_checksums: usize,
    /// Clusters read and verified, and their bytes.
    pub clusters_checked: u64,
    pub bytes_checked: u64,
    /// Data clusters of checksummed layers not summed yet (written since
    /// the last commit, or deferred by one); the next flush sums them.
    pub clusters_unsummed: u64,
    pub errors: Vec<ScrubError>,
}

impl Volume {
    /// Verify every checksummed cluster (see the module docs). Reports
    /// `scrub` progress in bytes.
    pub fn scrub(&self, progress: &mut dyn Progress) -> Result<ScrubReport> {
        let mut report = ScrubReport::default();
        // (layer, snapshot, live, clusters) taken under one short lock.
        let mut work = Vec::new();
        {
            let st = read(&self.state);
            if st.plain {
                report.layers_without_checksums = 1;
                return Ok(report);
            }
            let names: HashMap<Uuid, String> = st
                .manifest
                .snapshots
                .iter()
                .map(|s| (s.layer, s.name.clone()))
                .collect();
            let top = st.layer(st.top).id();
            for n in st.nodes.iter().flatten() {
                match n.layer.delta().filter(|d| d.checksums()) {
                    Some(d) => {
                        report.layers_checked += 1;
                        let (sums, unsummed) = d.summed_clusters();
                        report.clusters_unsummed += unsummed;
                        work.push((d.id, names.get(&d.id).cloned(), d.id == top, sums));
                    }
                    None => report.layers_without_checksums += 1,
                }
            }
        }
        let cs = self.geo.cluster_size;
        let total: u64 = work
            .iter()
            .map(|w| w.3.len() as u64 * cs)
            .sum::<u64>()
            .max(1);
        let mut done = 0u64;
        progress.update("scrub", 0, total);
        let mut buf = vec![0u8; cs as usize];
        for (layer, snapshot, live, sums) in work {
            for (vc, phys, sum) in sums {
                let n = self.cluster_len(vc);
                let _g = self.shard(vc).read_blocking();
                let st = read(&self.state);
                let Some(&slot) = st.by_id.get(&layer) else {
                    break; // merged away meanwhile
                };
                let Some(d) = st.layer(slot).delta() else {
                    break;
                };
                if d.sum_for(vc, phys) != Some(sum) {
                    continue;
                }
                d.read_data(phys, 0, &mut buf[..n])?;
                report.clusters_checked += 1;
                report.bytes_checked += n as u64;
                if !d.verify(vc, sum, &buf[..n]) {
                    tracing::error!(
                        layer = %layer,
                        cluster = vc,
                        phys,
                        "scrub: data checksum mismatch"
                    );
                    let (affected, intact_in) = self.views_of(&st, slot, vc)?;
                    report.errors.push(ScrubError {
                        layer,
                        snapshot: snapshot.clone(),
                        live,
                        cluster: vc,
                        offset: vc * cs,
                        phys,
                        affected,
                        intact_in,
                    });
                }
                done += cs;
                if done % (256 * cs) == 0 {
                    progress.update("scrub", done, total);
                }
            }
        }
        progress.update("scrub", total, total);
        Ok(report)
    }

    /// For a damaged cluster `vc` of the layer in `slot`: the views that
    /// read it from there, and those holding a version of it that passes
    /// its checksum. The caller holds the cluster's shard.
    fn views_of(
        &self,
        st: &super::engine::State,
        slot: u16,
        vc: u64,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let mut views: Vec<(String, Vec<u16>)> = vec![("live".into(), st.chain.clone())];
        for s in &st.manifest.snapshots {
            if let Some(&at) = st.by_id.get(&s.layer) {
                views.push((s.name.clone(), st.chain_of(at)));
            }
        }
        let (mut affected, mut intact) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; self.cluster_len(vc)];
        for (name, chain) in views {
            let e = st.walk(&chain, vc);
            if e == 0 {
                continue; // the base (unchecked) or zeros: no checked copy
            }
            let (s, v) = (super::engine::slot_of(e), super::engine::val_of(e));
            if s == slot {
                affected.push(name);
                continue;
            }
            if super::journal::kind(v) != super::journal::KIND_DATA {
                continue;
            }
            let d = st.delta(s);
            let phys = super::journal::phys(v);
            if let Some(sum) = d.sum_for(vc, phys) {
                d.read_data(phys, 0, &mut buf)?;
                if d.verify(vc, sum, &buf) {
                    intact.push(name);
                }
            }
        }
        Ok((affected, intact))
    }
}
