//! The layout each snapshot was taken with: a layered LUN that grew keeps
//! its older snapshots' regions where they were (see `docs/volumes.md`,
//! "Growing a layered LUN"). Before a resize changes the label, the label's
//! layout is recorded on every snapshot that has none
//! ([`Volume::record_layouts`]); a snapshot without a record has the
//! current layout.

use serde::{Deserialize, Serialize};

use super::*;

/// Where a snapshot's regions were: the LUN size and each region's range,
/// by region name (`label`, `state`, `disk0`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLayout {
    pub lun_size: u64,
    pub regions: Vec<RegionSpan>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpan {
    pub name: String,
    pub offset: u64,
    pub length: u64,
}

impl SnapshotLayout {
    pub fn of(label: &Label) -> SnapshotLayout {
        SnapshotLayout {
            lun_size: label.lun_size,
            regions: label
                .regions
                .iter()
                .map(|r| RegionSpan {
                    name: r.name(),
                    offset: r.offset,
                    length: r.length,
                })
                .collect(),
        }
    }

    pub fn region(&self, name: &str) -> Option<&RegionSpan> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The regions whose length differs from `now`'s (or that `now` lacks
    /// or adds), as `name old -> new` (0 for a region one side lacks).
    pub fn size_changes(&self, now: &SnapshotLayout) -> Vec<(String, u64, u64)> {
        let mut names: Vec<&str> = self.regions.iter().map(|r| r.name.as_str()).collect();
        names.extend(now.regions.iter().map(|r| r.name.as_str()));
        names.sort_unstable();
        names.dedup();
        names
            .into_iter()
            .filter(|n| *n != "label")
            .filter_map(|n| {
                let a = self.region(n).map_or(0, |r| r.length);
                let b = now.region(n).map_or(0, |r| r.length);
                (a != b).then(|| (n.to_string(), a, b))
            })
            .collect()
    }
}

impl Lun {
    /// The layout snapshot `name` was taken with (the current one unless
    /// the LUN was resized after it).
    pub fn snapshot_layout(&self, name: &str) -> Result<SnapshotLayout> {
        match self.volume.snapshot_layouts().remove(name) {
            None => Ok(SnapshotLayout::of(&self.label)),
            Some(v)
                if v.get(lungate_block::volume::manifest::LOST_LAYOUT)
                    .is_some() =>
            {
                Err(Error::Invalid(format!(
                    "{}: snapshot {name} was taken before the LUN was resized, and `lunctl repair` \
                     could not recover where its regions were when it rebuilt the manifest; \
                     reading, reverting to or cloning it is refused. `lunctl delete-snapshot {} \
                     {name}` removes it",
                    self.name(),
                    self.name()
                )))
            }
            Some(v) => serde_json::from_value(v).map_err(|e| Error::Damaged {
                path: self.volume.layers_dir().to_path_buf(),
                why: format!("the layout recorded for snapshot {name} is unreadable: {e}"),
            }),
        }
    }

    /// Every snapshot whose layout differs from the current one, with it.
    pub fn resized_snapshots(&self) -> Result<Vec<(String, SnapshotLayout)>> {
        let now = SnapshotLayout::of(&self.label);
        let mut out = Vec::new();
        for s in self.volume.snapshots() {
            let l = self.snapshot_layout(&s.name)?;
            if l != now {
                out.push((s.name, l));
            }
        }
        Ok(out)
    }

    /// Refuse an operation that would read or continue from snapshot
    /// `name` with the current layout when it was taken with another.
    pub(crate) fn same_layout_as(&self, name: &str, what: &str) -> Result<()> {
        let then = self.snapshot_layout(name)?;
        let now = SnapshotLayout::of(&self.label);
        if then == now {
            return Ok(());
        }
        let changes: Vec<String> = then
            .size_changes(&now)
            .iter()
            .map(|(n, a, b)| format!("{n} was {a} bytes, is {b}"))
            .collect();
        Err(Error::Invalid(format!(
            "{}: snapshot {name} was taken before the LUN was resized ({}); {what} is refused \
             because its regions lie where they were then. `lunctl clone {} {name} NEW` makes \
             a LUN with the snapshot's sizes",
            self.name(),
            if changes.is_empty() {
                "regions moved".to_string()
            } else {
                changes.join(", ")
            },
            self.name()
        )))
    }

    /// The label a clone of snapshot `name` starts from: the current label
    /// with the snapshot's size and region ranges.
    pub(crate) fn label_of_snapshot(&self, name: &str) -> Result<Label> {
        let then = self.snapshot_layout(name)?;
        let mut label = self.label.clone();
        label.lun_size = then.lun_size;
        label.regions.retain(|r| then.region(&r.name()).is_some());
        for r in &mut label.regions {
            let s = then.region(&r.name()).expect("kept above");
            r.offset = s.offset;
            r.length = s.length;
        }
        if label.regions.len() != then.regions.len() {
            return Err(Error::Damaged {
                path: self.volume.layers_dir().to_path_buf(),
                why: format!(
                    "the layout recorded for snapshot {name} names regions the LUN does not have"
                ),
            });
        }
        Ok(label)
    }
}

/// A snapshot as the control API and `lunctl snapshots` show it, without
/// its sizes (see [`Lun::snapshot_list`]).
pub fn wire_snapshot(s: lungate_block::volume::SnapshotInfo) -> lungate_api::types::SnapshotInfo {
    lungate_api::types::SnapshotInfo {
        name: s.name,
        description: s.description,
        created: s.created,
        parent: s.parent,
        layer: s.layer,
        current: s.current,
        sizes: vec![],
    }
}

impl Lun {
    /// The LUN's snapshots, oldest first, as the control API and `lunctl
    /// snapshots` show them: each with the region sizes it had when they
    /// differ from now (the LUN was resized after it). A gateway and an
    /// offline `lunctl` answer with this one list.
    pub fn snapshot_list(&self) -> Result<Vec<lungate_api::types::SnapshotInfo>> {
        let now = SnapshotLayout::of(&self.label);
        let mut out = Vec::new();
        let lost = self.volume.snapshot_layouts();
        for s in self.volume.snapshots() {
            let is_lost = lost.get(&s.name).is_some_and(|v| {
                v.get(lungate_block::volume::manifest::LOST_LAYOUT)
                    .is_some()
            });
            let sizes = if is_lost {
                // Older than a resize, sizes unknown (see `snapshot_layout`).
                vec![]
            } else {
                self.snapshot_layout(&s.name)?.size_changes(&now)
            };
            let mut row = wire_snapshot(s);
            row.sizes = sizes
                .into_iter()
                .map(|(region, bytes, now)| lungate_api::types::RegionSize { region, bytes, now })
                .collect();
            out.push(row);
        }
        Ok(out)
    }
}
