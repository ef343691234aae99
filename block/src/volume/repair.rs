//! Rebuilding a lost manifest from the layers' own headers
//! (`lunctl repair`).
//!
//! A volume whose layers directory holds layer files but no valid manifest
//! is refused at open (nothing is served, nothing removed). Every delta
//! header names its layer, its LUN, its parent and, once frozen, the
//! snapshot it holds, so the tree can be put back together:
//!
//! * every layer file of this LUN must verify whole (header, journal,
//!   length); a damaged one stops the repair, since a tree without it
//!   would serve wrong data;
//! * the live top is the newest unfrozen leaf; other unfrozen leaves that
//!   never committed a byte are left out (the next open removes them);
//! * frozen layers keep their snapshot names; a layer that holds data but
//!   has no name (an old top a crash left behind, a snapshot whose name
//!   was never written) becomes a snapshot `recovered-<uuid prefix>`, and a
//!   base other layers grow from becomes `recovered-base`, so every byte is
//!   reachable and can be deleted by the usual commands;
//! * parents outside the directory (a clone's) are found among the pool's
//!   other layers directories and LUN files; clones that depend on this
//!   volume are found the same way.
//!
//! The damaged manifest slots are kept beside the new ones as
//! `manifest.N.damaged`. The owner's layouts of snapshots taken before the
//! volume grew are in no header: they are read back from the newest
//! damaged slot whose body still parses, and recorded as lost when none
//! does (the owner then refuses to read such a snapshot).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::error::{corrupt, Error, IoCtx, Result};
use super::header::Header;
use super::layer::{holds_nothing, read_header, Delta};
use super::manifest::{self, Dependent, LayerRec, Manifest, Parent, SnapRec};
use super::VolumeConfig;
use crate::store::file::{delta_path, layers_dir, FileStore};
use crate::store::{Object, Store};

/// What [`rebuild_manifest`] put back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rebuilt {
    pub dir: PathBuf,
    pub layers: usize,
    pub top: Uuid,
    /// Snapshot names, oldest first (recovered ones included).
    pub snapshots: Vec<String>,
    /// Names given to layers that had none.
    pub recovered: Vec<String>,
    pub dependents: usize,
    /// Layer files left out of the tree (empty, never committed).
    pub left_out: Vec<PathBuf>,
    /// Damaged manifest slots moved aside.
    pub kept_aside: Vec<PathBuf>,
    /// Snapshots whose layout (taken before the volume grew) was read back
    /// from a damaged slot.
    pub layouts_kept: Vec<String>,
    /// Whether that slot's checksum failed (its body still parsed).
    pub layouts_unchecked: bool,
    /// Whether any old slot still parsed. When none did, a snapshot taken
    /// before a resize that did not enlarge the LUN (a region grown into
    /// free space inside it) cannot be told from its layer: it keeps the
    /// current layout.
    pub old_manifest_read: bool,
    /// Snapshots taken before the volume grew whose layout no slot held:
    /// recorded as lost ([`manifest::LOST_LAYOUT`]).
    pub layouts_lost: Vec<String>,
}

struct Found {
    header: Header,
    path: PathBuf,
    obj: std::sync::Arc<dyn Object>,
}

fn short(id: Uuid) -> String {
    id.simple().to_string()[..8].to_string()
}

/// Rebuild the manifest of the volume `cfg` describes from its layer
/// headers. Refuses when the manifest is valid (nothing to repair) or when
/// any layer file of this LUN fails verification. The caller holds the
/// LUN's lock, so no one else opens the volume meanwhile.
///
/// `lun_uuid_of(path)` tells the LUN UUID of a LUN file in the pool (the
/// caller knows the LUN format; this crate does not), so a clone's parent
/// that is another LUN's base can be found.
pub fn rebuild_manifest(
    cfg: &VolumeConfig,
    lun_uuid_of: &dyn Fn(&Path) -> Option<Uuid>,
) -> Result<Rebuilt> {
    let dir = layers_dir(&cfg.lun_path);
    if !dir.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        return Err(Error::Invalid(format!(
            "{} is not a layers directory: the LUN has no snapshots to repair",
            dir.display()
        )));
    }
    match manifest::load(&dir) {
        Ok(Some(_)) => {
            return Err(Error::Invalid(format!(
                "{}: the manifest is valid; nothing to repair",
                dir.display()
            )))
        }
        Ok(None) | Err(Error::Corrupt { .. }) => {}
        Err(e) => return Err(e),
    }
    let pool = match cfg.lun_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };

    // Every layer file of this LUN, verified.
    let store = FileStore::new(&cfg.lun_path, cfg.file.clone(), None, true);
    let mut found: BTreeMap<Uuid, Found> = BTreeMap::new();
    // Spares a crash left before any manifest named them hold nothing
    // flushed: left out, like empty uncommitted leaves.
    let mut spares = Vec::new();
    for id in store.list_layers()? {
        let obj = store.open_layer(id, false)?;
        let path = obj.name().to_path_buf();
        let (header, _, _) = read_header(&*obj)?;
        if header.layer != id {
            return Err(corrupt(
                &path,
                format!("header names layer {}, not {id}", header.layer),
            ));
        }
        if header.lun != cfg.lun_uuid {
            return Err(corrupt(
                &path,
                format!(
                    "belongs to LUN {}, not {}: move it out of {} first",
                    header.lun,
                    cfg.lun_uuid,
                    dir.display()
                ),
            ));
        }
        if header.spare() {
            spares.push(path);
            continue;
        }
        found.insert(id, Found { header, path, obj });
    }
    if found.is_empty() {
        return Err(Error::Invalid(format!(
            "{} holds no layer files: the LUN opens without snapshots",
            dir.display()
        )));
    }
    // Layers made before the volume grew keep their smaller size: the
    // volume is as large as its largest layer (at least the LUN's label
    // size; larger after a grow the label had not caught up with).
    let first = &found
        .values()
        .max_by_key(|f| f.header.size)
        .expect("non-empty")
        .header;
    let geo = first.geometry().ok_or_else(|| {
        corrupt(
            &dir,
            format!(
                "layer geometry cluster {} / size {} is invalid",
                first.cluster_size, first.size
            ),
        )
    })?;
    if geo.size < cfg.size {
        return Err(corrupt(
            &dir,
            format!(
                "layers are {} bytes; the LUN is {} bytes",
                geo.size, cfg.size
            ),
        ));
    }
    for f in found.values() {
        if f.header.cluster_size as u64 != geo.cluster_size || f.header.geometry().is_none() {
            return Err(corrupt(
                &f.path,
                format!(
                    "cluster size {} / size {} differ from the other layers' {} / {}",
                    f.header.cluster_size, f.header.size, geo.cluster_size, geo.size
                ),
            ));
        }
    }
    for (id, f) in &found {
        // Journal and file length, exactly as an open checks them.
        Delta::open(f.obj.clone(), *id, cfg.lun_uuid, geo)?;
    }

    // Parents, in the directory or elsewhere in the pool.
    let me = dir.canonicalize().ctx(&dir, "resolve layers directory")?;
    let mut parent: HashMap<Uuid, Parent> = HashMap::new();
    for (id, f) in &found {
        let p = f.header.parent;
        let rec = if p == cfg.lun_uuid {
            Parent::Base
        } else if p.is_nil() {
            Parent::None
        } else if found.contains_key(&p) {
            Parent::Layer { id: p }
        } else {
            let (xdir, xlun) = find_external(&pool, &me, p, lun_uuid_of)?.ok_or_else(|| {
                corrupt(
                    &f.path,
                    format!(
                        "parent layer {p} is in no layers directory or LUN of pool {}",
                        pool.display()
                    ),
                )
            })?;
            Parent::External {
                dir: xdir,
                id: p,
                lun: Some(xlun),
            }
        };
        parent.insert(*id, rec);
    }
    let mut children: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for (id, p) in &parent {
        if let Parent::Layer { id: pid } = p {
            children.entry(*pid).or_default().push(*id);
        }
    }

    // The live top: the newest unfrozen leaf.
    let leaves: Vec<&Uuid> = found
        .keys()
        .filter(|id| !children.contains_key(id))
        .collect();
    let top: Uuid = **leaves
        .iter()
        .filter(|id| !found[id].header.frozen())
        .max_by_key(|id| (found[id].header.created, found[id].header.generation, ***id))
        .ok_or_else(|| {
            corrupt(
                &dir,
                "every leaf layer is frozen: the live layer is missing, so the LUN's current data cannot be told",
            )
        })?;
    let mut left_out = spares;
    let mut keep: HashSet<Uuid> = found.keys().copied().collect();
    for id in &leaves {
        let h = &found[id].header;
        if **id != top && !h.frozen() && holds_nothing(&*found[id].obj, cfg.lun_uuid) {
            keep.remove(id);
            left_out.push(found[id].path.clone());
        }
    }

    // Snapshots: frozen names, recovered names for unnamed data.
    let created_of = |id: Uuid| -> u64 {
        children
            .get(&id)
            .into_iter()
            .flatten()
            .filter(|c| keep.contains(c))
            .map(|c| found[c].header.created)
            .min()
            .unwrap_or(found[&id].header.created)
    };
    let mut snapshots: Vec<SnapRec> = Vec::new();
    let mut recovered = Vec::new();
    let mut taken: HashSet<String> = HashSet::new();
    let mut to_freeze = Vec::new();
    for id in found.keys().filter(|id| keep.contains(id) && **id != top) {
        let h = &found[id].header;
        let is_leaf = !children
            .get(id)
            .is_some_and(|c| c.iter().any(|c| keep.contains(c)));
        let name = if h.frozen() && !h.name.is_empty() {
            h.name.clone()
        } else if !h.frozen() || is_leaf {
            // Data nobody can reach without a name: an unfrozen old top,
            // or a frozen leaf whose name was never recorded.
            to_freeze.push(*id);
            format!("recovered-{}", short(*id))
        } else {
            continue; // an unnamed interior layer, as merges leave them
        };
        let name = if taken.contains(&name) {
            format!("{name}-{}", short(*id))
        } else {
            name
        };
        if name.starts_with("recovered-") {
            recovered.push(name.clone());
        }
        taken.insert(name.clone());
        snapshots.push(SnapRec {
            name,
            layer: *id,
            created: created_of(*id),
            description: h.description.clone(),
        });
    }
    let from_base: Vec<u64> = keep
        .iter()
        .filter(|id| parent[id] == Parent::Base)
        .map(|id| found[id].header.created)
        .collect();
    if let Some(&created) = from_base.iter().min() {
        let mut name = "recovered-base".to_string();
        if taken.contains(&name) {
            name = format!("recovered-base-{}", short(cfg.lun_uuid));
        }
        recovered.push(name.clone());
        snapshots.push(SnapRec {
            name,
            layer: cfg.lun_uuid,
            created,
            description: "the LUN file itself, below every layer".into(),
        });
    }
    // Oldest first; within one second, ancestors before descendants.
    let depth = |id: Uuid| -> usize {
        let mut n = 0;
        let mut at = id;
        while let Some(Parent::Layer { id: p }) = parent.get(&at) {
            n += 1;
            at = *p;
        }
        if id == cfg.lun_uuid {
            0
        } else {
            n + 1
        }
    };
    snapshots.sort_by_key(|s| (s.created, depth(s.layer), s.name.clone()));

    // The owner's layouts of snapshots taken before a grow are in no
    // header: read back from the newest damaged slot whose body parses;
    // a snapshot whose layer is smaller than the volume and has none there
    // is recorded as lost, so the owner never reads it with today's layout.
    let salvaged = salvage_layouts(&dir, cfg.lun_uuid)?;
    let base_size = keep
        .iter()
        .filter(|id| parent[id] == Parent::Base)
        .map(|id| found[id].header.size)
        .min();
    let mut layouts = BTreeMap::new();
    let (mut layouts_kept, mut layouts_lost) = (Vec::new(), Vec::new());
    for s in &snapshots {
        if let Some(v) = salvaged.as_ref().and_then(|(l, _)| l.get(&s.layer)) {
            layouts.insert(s.layer, v.clone());
            layouts_kept.push(s.name.clone());
            continue;
        }
        let size = found.get(&s.layer).map(|f| f.header.size).or(base_size);
        if size.is_some_and(|z| z < geo.size) {
            layouts.insert(
                s.layer,
                serde_json::json!({ manifest::LOST_LAYOUT: "rebuilt by lunctl repair" }),
            );
            layouts_lost.push(s.name.clone());
        }
    }
    let old_manifest_read = salvaged.is_some();
    let layouts_unchecked = !layouts_kept.is_empty() && salvaged.is_some_and(|(_, ok)| !ok);

    let mut layers: Vec<LayerRec> = keep
        .iter()
        .map(|id| LayerRec {
            id: *id,
            parent: parent[id].clone(),
            created: found[id].header.created,
        })
        .collect();
    layers.sort_by_key(|l| (l.created, l.id));
    let m = Manifest {
        lun: cfg.lun_uuid,
        size: geo.size,
        cluster_size: geo.cluster_size as u32,
        lun_path: PathBuf::from(cfg.lun_path.file_name().unwrap_or_default()),
        layers,
        top,
        snapshots,
        dependents: find_dependents(&pool, &me, cfg.lun_uuid)?,
        flatten: None,
        retired: vec![],
        checksums: found.get(&top).is_some_and(|f| f.header.checksums()),
        layouts,
        live: None,
        images: Default::default(),
        forks: Default::default(),
    };
    m.validate()
        .map_err(|why| corrupt(&dir, format!("rebuilt manifest is inconsistent: {why}")))?;

    for id in &to_freeze {
        let name = &m
            .snapshots
            .iter()
            .find(|s| s.layer == *id)
            .expect("named above")
            .name;
        let (d, _) = Delta::open(store.open_layer(*id, true)?, *id, cfg.lun_uuid, geo)?;
        d.set_frozen(name, "recovered by lunctl repair")?;
    }
    let mut kept_aside = Vec::new();
    for slot in 0..2 {
        let p = manifest::slot_path(&dir, slot);
        if p.symlink_metadata().is_ok() {
            let aside = dir.join(format!("manifest.{slot}.damaged"));
            std::fs::rename(&p, &aside).ctx(&p, "keep damaged manifest slot")?;
            kept_aside.push(aside);
        }
    }
    manifest::store(&dir, &m, 1)?;
    Ok(Rebuilt {
        dir,
        layers: m.layers.len(),
        top,
        snapshots: m.snapshots.iter().map(|s| s.name.clone()).collect(),
        recovered,
        dependents: m.dependents.len(),
        left_out,
        kept_aside,
        layouts_kept,
        layouts_unchecked,
        old_manifest_read,
        layouts_lost,
    })
}

/// The `layouts` of the newest slot in `dir` that still reads (see
/// [`manifest::salvage`]) and names LUN `lun`, by layer, and whether that
/// slot's checksum held. `None` when no slot reads.
fn salvage_layouts(
    dir: &Path,
    lun: Uuid,
) -> Result<Option<(BTreeMap<Uuid, serde_json::Value>, bool)>> {
    let mut best: Option<(u64, BTreeMap<Uuid, serde_json::Value>, bool)> = None;
    for slot in 0..2 {
        let p = manifest::slot_path(dir, slot);
        let b = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).ctx(&p, "read manifest"),
        };
        let Some((generation, body, sum_ok)) = manifest::salvage(&b) else {
            continue;
        };
        if body.get("lun").and_then(|v| v.as_str()) != Some(lun.to_string().as_str()) {
            continue;
        }
        let layouts: BTreeMap<Uuid, serde_json::Value> = match body.get("layouts") {
            None => BTreeMap::new(),
            Some(v) => match serde_json::from_value(v.clone()) {
                Ok(l) => l,
                Err(_) => continue,
            },
        };
        if best.as_ref().is_none_or(|(g, _, _)| generation > *g) {
            best = Some((generation, layouts, sum_ok));
        }
    }
    Ok(best.map(|(_, l, ok)| (l, ok)))
}

/// The layers directory in `pool` (other than `me`) that holds layer `id`,
/// or the layers directory of the pool's LUN whose UUID is `id`.
fn find_external(
    pool: &Path,
    me: &Path,
    id: Uuid,
    lun_uuid_of: &dyn Fn(&Path) -> Option<Uuid>,
) -> Result<Option<(PathBuf, Uuid)>> {
    let name = |p: &Path| PathBuf::from(p.file_name().unwrap_or_default());
    for e in std::fs::read_dir(pool).ctx(pool, "list pool")? {
        let p = e.ctx(pool, "list pool")?.path();
        let Ok(md) = p.symlink_metadata() else {
            continue;
        };
        let canon = p.canonicalize().unwrap_or_else(|_| p.clone());
        if md.is_dir() && p.extension().is_some_and(|x| x == "layers") && canon != me {
            if delta_path(&p, id).symlink_metadata().is_ok() {
                if let Ok(Some(l)) = manifest::load(&p) {
                    return Ok(Some((name(&p), l.manifest.lun)));
                }
            }
        } else if md.is_file()
            && p.extension().is_some_and(|x| x == "lun")
            && lun_uuid_of(&p) == Some(id)
        {
            return Ok(Some((name(&layers_dir(&p)), id)));
        }
    }
    Ok(None)
}

/// Clones in `pool` whose layers name one of the layers of LUN `lun`
/// (layers directory `me`) as parent.
fn find_dependents(pool: &Path, me: &Path, lun: Uuid) -> Result<Vec<Dependent>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(pool).ctx(pool, "list pool")? {
        let p = e.ctx(pool, "list pool")?.path();
        if !p.symlink_metadata().is_ok_and(|m| m.is_dir())
            || p.extension().is_none_or(|x| x != "layers")
        {
            continue;
        }
        let Ok(Some(l)) = manifest::load(&p) else {
            continue;
        };
        let canon = p.canonicalize().unwrap_or_else(|_| p.clone());
        if canon == me {
            continue;
        }
        for rec in &l.manifest.layers {
            if let Parent::External { dir, id, lun: xl } = &rec.parent {
                let ours = match xl {
                    Some(u) => *u == lun,
                    None => dir.canonicalize().unwrap_or_else(|_| dir.clone()) == me,
                };
                if ours {
                    out.push(Dependent {
                        dir: PathBuf::from(p.file_name().unwrap_or_default()),
                        lun: l.manifest.lun,
                        layer: *id,
                    });
                }
            }
        }
    }
    Ok(out)
}
