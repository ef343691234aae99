//! The manifest: which layers exist, their parents, the snapshot names,
//! which layer is the live top, which other volumes (clones) depend on our
//! layers, and the progress of a flatten. It lives in the layers directory
//! as two slot files, `manifest.0` and `manifest.1`, each holding a complete
//! copy:
//!
//! | off      | len | field                                      |
//! |----------|-----|--------------------------------------------|
//! | 0        | 8   | magic `LGMANIF\0`                          |
//! | 8        | 2   | version (1)                                |
//! | 10       | 2   | reserved, zero                             |
//! | 12       | 4   | body length n                              |
//! | 16       | 8   | generation                                 |
//! | 24       | 16  | LUN UUID                                   |
//! | 40       | 24  | reserved, zero                             |
//! | 64       | n   | body: JSON [`Manifest`]                    |
//! | 64 + n   | 32  | blake3 of bytes 0..64+n                    |
//!
//! A commit writes generation g+1 to slot 0, `fdatasync`, then to slot 1,
//! `fdatasync`. A crash tears at most one slot and the other holds either
//! the old or the new generation whole; at rest both slots are equal, so a
//! single damaged slot loses nothing and is reported and rewritten.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{corrupt, IoCtx, Result};

pub const MAGIC: &[u8; 8] = b"LGMANIF\0";
/// The key of the layout a rebuild records for a snapshot whose layout it
/// could not recover (`{"lost": "why"}`): the owner must refuse to read
/// the snapshot with a layout it does not know.
pub const LOST_LAYOUT: &str = "lost";
pub const VERSION: u16 = 1;
const HDR: usize = 64;
const SUM: usize = 32;
/// A manifest larger than this is refused as damaged.
pub const MAX_BODY: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub lun: Uuid,
    pub size: u64,
    pub cluster_size: u32,
    /// The LUN file (the base) as a name in the pool, for clones that reach
    /// it (older manifests: an absolute path).
    pub lun_path: PathBuf,
    /// Delta layers stored in this directory.
    pub layers: Vec<LayerRec>,
    /// The live, writable layer.
    pub top: Uuid,
    pub snapshots: Vec<SnapRec>,
    /// Volumes in other layers directories whose chains pass through one of
    /// our layers (clones). Those layers and their ancestors are pinned.
    #[serde(default)]
    pub dependents: Vec<Dependent>,
    #[serde(default)]
    pub flatten: Option<FlattenRec>,
    /// Layers a commit dropped whose files may still exist (a crash came
    /// between the commit and the file's removal). Only these, and layer
    /// files that provably hold nothing, are ever removed at open: a layer
    /// file no manifest accounts for is kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<Uuid>,
    /// New layers (live, revert, clones) keep data checksums: a checksum
    /// of every data cluster, checked on every read (see
    /// [`super::layer`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checksums: bool,
    /// The owner's layout (a LUN's regions) at the time of each snapshot
    /// taken before the volume grew, by the snapshot's layer; a snapshot
    /// without an entry has the current layout. Opaque to the volume,
    /// recorded by [`crate::volume::Volume::record_layouts`] before the
    /// owner moves or grows a region (see `docs/volumes.md`, "Growing a
    /// layered LUN"). A rebuild ([`super::repair`]) that finds a snapshot
    /// taken before a grow and cannot read its layout from a damaged slot
    /// records [`LOST_LAYOUT`] for it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub layouts: std::collections::BTreeMap<Uuid, serde_json::Value>,
    /// RBD store only (a file store never sets these, so its manifests are
    /// unchanged): the image holding the live bytes when it is not the LUN
    /// image itself (a revert made it a clone, see `store/rbd/tree.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<String>,
    /// RBD store only: the image holding each snapshot layer's RBD snapshot
    /// when it is not the LUN image (a snapshot taken after a revert).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub images: std::collections::BTreeMap<Uuid, String>,
    /// RBD store only: each revert clone image of the LUN and the snapshot
    /// layer it was cloned from (its RBD parent, kept while it exists).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub forks: std::collections::BTreeMap<String, Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRec {
    pub id: Uuid,
    pub parent: Parent,
    pub created: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Parent {
    /// The LUN file itself (raw, every cluster present).
    Base,
    /// Nothing: clusters the layer lacks read as zeros (after a flatten).
    None,
    /// Another layer in this directory.
    Layer { id: Uuid },
    /// A layer (or the base, when `id` is that LUN's UUID) of another
    /// volume of the same pool (a clone's link to its parent): `dir` names
    /// its layers directory within the pool and `lun` is its LUN UUID, so
    /// the pool can move or be renamed; resolved by
    /// [`crate::store::file::resolve_peer`]. Manifests written before names
    /// hold an absolute `dir` and no `lun`.
    External {
        dir: PathBuf,
        id: Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lun: Option<Uuid>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapRec {
    pub name: String,
    /// A layer in `layers`, or the LUN UUID for the base.
    pub layer: Uuid,
    pub created: u64,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependent {
    /// The clone's layers directory, a name in the pool (older manifests:
    /// an absolute path).
    pub dir: PathBuf,
    pub lun: Uuid,
    pub layer: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlattenRec {
    pub layer: Uuid,
    /// First cluster not yet copied.
    pub next: u64,
}

impl Manifest {
    pub fn layer(&self, id: Uuid) -> Option<&LayerRec> {
        self.layers.iter().find(|l| l.id == id)
    }

    pub fn snapshot(&self, name: &str) -> Option<&SnapRec> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    /// Structural checks: unique ids and names, parents that exist, no
    /// cycles, a top that exists.
    pub fn validate(&self) -> Result<(), String> {
        let known = |id: Uuid| id == self.lun || self.layer(id).is_some();
        for (i, l) in self.layers.iter().enumerate() {
            if l.id == self.lun || self.layers[..i].iter().any(|x| x.id == l.id) {
                return Err(format!("layer {} listed twice", l.id));
            }
            if let Parent::Layer { id } = l.parent {
                if self.layer(id).is_none() {
                    return Err(format!("layer {} has unknown parent {id}", l.id));
                }
            }
        }
        for l in &self.layers {
            let mut at = l;
            for _ in 0..=self.layers.len() {
                match at.parent {
                    Parent::Layer { id } => at = self.layer(id).expect("checked above"),
                    _ => break,
                }
            }
            if matches!(at.parent, Parent::Layer { .. }) {
                return Err(format!("layer {} is in a parent cycle", l.id));
            }
        }
        if self.layer(self.top).is_none() {
            return Err(format!("top layer {} is not listed", self.top));
        }
        for (i, s) in self.snapshots.iter().enumerate() {
            if self.snapshots[..i].iter().any(|x| x.name == s.name) {
                return Err(format!("snapshot {:?} listed twice", s.name));
            }
            if !known(s.layer) || s.layer == self.top {
                return Err(format!(
                    "snapshot {:?} names layer {}, which is not a frozen layer",
                    s.name, s.layer
                ));
            }
        }
        if let Some(r) = self.retired.iter().find(|r| known(**r)) {
            return Err(format!("retired layer {r} is still listed"));
        }
        if let Some(f) = &self.flatten {
            if self.layer(f.layer).is_none()
                || f.next > self.size.div_ceil(self.cluster_size as u64)
            {
                return Err(format!("flatten record {f:?} is out of range"));
            }
        }
        Ok(())
    }
}

pub fn encode(m: &Manifest, generation: u64) -> Vec<u8> {
    let body = serde_json::to_vec(m).expect("manifest serialises");
    let mut b = vec![0u8; HDR];
    b[0..8].copy_from_slice(MAGIC);
    b[8..10].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(body.len() as u32).to_le_bytes());
    b[16..24].copy_from_slice(&generation.to_le_bytes());
    b[24..40].copy_from_slice(m.lun.as_bytes());
    b.extend_from_slice(&body);
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    b
}

/// Decode one slot file's bytes. Never panics.
pub fn decode(b: &[u8]) -> Result<(Manifest, u64), String> {
    if b.len() < HDR + SUM {
        return Err(format!("{} bytes is too short", b.len()));
    }
    if &b[0..8] != MAGIC {
        return Err("bad magic".into());
    }
    let n = u32::from_le_bytes(b[12..16].try_into().expect("4")) as usize;
    if n > MAX_BODY || b.len() != HDR + n + SUM {
        return Err(format!(
            "body length {n} does not match the file length {}",
            b.len()
        ));
    }
    if blake3::hash(&b[..HDR + n]).as_bytes() != &b[HDR + n..] {
        return Err("checksum mismatch".into());
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != VERSION {
        return Err(format!("unsupported version {version}"));
    }
    if b[10..12] != [0, 0] || b[40..HDR].iter().any(|&c| c != 0) {
        return Err("reserved bytes are not zero".into());
    }
    let generation = u64::from_le_bytes(b[16..24].try_into().expect("8"));
    let lun = Uuid::from_slice(&b[24..40]).expect("16");
    let m: Manifest = serde_json::from_slice(&b[HDR..HDR + n]).map_err(|e| format!("body: {e}"))?;
    if m.lun != lun {
        return Err(format!(
            "header LUN {lun} differs from the body's {}",
            m.lun
        ));
    }
    m.validate()?;
    Ok((m, generation))
}

/// What can still be read of a slot [`decode`] refuses: its generation,
/// its body as JSON and whether the checksum held, when the header's
/// magic and length are whole and the body parses. For a repair that
/// salvages what the layers' headers cannot tell (the owner's layouts);
/// nothing else may trust it.
pub fn salvage(b: &[u8]) -> Option<(u64, serde_json::Value, bool)> {
    if b.len() < HDR + SUM || &b[0..8] != MAGIC {
        return None;
    }
    let n = u32::from_le_bytes(b[12..16].try_into().expect("4")) as usize;
    if n > MAX_BODY || b.len() != HDR + n + SUM {
        return None;
    }
    let sum_ok = blake3::hash(&b[..HDR + n]).as_bytes() == &b[HDR + n..];
    let generation = u64::from_le_bytes(b[16..24].try_into().expect("8"));
    let body = serde_json::from_slice(&b[HDR..HDR + n]).ok()?;
    Some((generation, body, sum_ok))
}

pub fn slot_path(dir: &Path, slot: u32) -> PathBuf {
    dir.join(format!("manifest.{slot}"))
}

/// What reading both slots found.
pub struct Loaded {
    pub manifest: Manifest,
    pub generation: u64,
    /// Problems with one slot (the other was good); the caller rewrites.
    pub warnings: Vec<String>,
}

/// Read both slots. `Ok(None)` when neither slot file exists.
pub fn load(dir: &Path) -> Result<Option<Loaded>> {
    let mut best: Option<(Manifest, u64)> = None;
    let mut problems = Vec::new();
    let mut present = 0;
    for slot in 0..2 {
        let p = slot_path(dir, slot);
        let b = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                problems.push(format!("{}: missing", p.display()));
                continue;
            }
            Err(e) => return Err(e).ctx(&p, "read manifest"),
        };
        present += 1;
        match decode(&b) {
            Ok((m, g)) => {
                if let Some((_, bg)) = &best {
                    if *bg != g {
                        problems.push(format!(
                            "manifest slots hold generations {bg} and {g} (an interrupted commit)"
                        ));
                    }
                }
                if best.as_ref().is_none_or(|(_, bg)| g > *bg) {
                    best = Some((m, g));
                }
            }
            Err(why) => problems.push(format!("{}: {why}", p.display())),
        }
    }
    if present == 0 {
        return Ok(None);
    }
    match best {
        Some((manifest, generation)) => Ok(Some(Loaded {
            manifest,
            generation,
            warnings: problems,
        })),
        None => Err(corrupt(
            dir,
            format!("no valid manifest slot ({})", problems.join("; ")),
        )),
    }
}

fn write_slot(path: &Path, bytes: &[u8]) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .ctx(path, "open manifest slot")?;
    f.write_all_at(bytes, 0).ctx(path, "write manifest slot")?;
    f.set_len(bytes.len() as u64)
        .ctx(path, "truncate manifest slot")?;
    f.sync_all().ctx(path, "fsync manifest slot")
}

/// Commit `m` as generation `generation` to both slots, one after the other.
pub fn store(dir: &Path, m: &Manifest, generation: u64) -> Result<()> {
    debug_assert!(m.validate().is_ok(), "{:?}", m.validate());
    let b = encode(m, generation);
    let created = !slot_path(dir, 0).exists() || !slot_path(dir, 1).exists();
    write_slot(&slot_path(dir, 0), &b)?;
    if created {
        sync_dir(dir)?;
    }
    write_slot(&slot_path(dir, 1), &b)?;
    if created {
        sync_dir(dir)?;
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(dir, "fsync directory")
}

/// Write `bytes` to a new file and make it and its name durable.
pub fn create_file(path: &Path, bytes: &[u8]) -> Result<File> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(path, "create")?;
    f.write_all(bytes).ctx(path, "write")?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        let lun = Uuid::new_v4();
        let a = Uuid::new_v4();
        let b = Uuid::new_v4();
        Manifest {
            lun,
            size: 64 << 20,
            cluster_size: 65536,
            lun_path: "/pool/x.lun".into(),
            layers: vec![
                LayerRec {
                    id: a,
                    parent: Parent::Base,
                    created: 1,
                },
                LayerRec {
                    id: b,
                    parent: Parent::Layer { id: a },
                    created: 2,
                },
            ],
            top: b,
            snapshots: vec![
                SnapRec {
                    name: "s0".into(),
                    layer: lun,
                    created: 1,
                    description: String::new(),
                },
                SnapRec {
                    name: "s1".into(),
                    layer: a,
                    created: 2,
                    description: "d".into(),
                },
            ],
            dependents: vec![],
            flatten: None,
            retired: vec![],
            checksums: false,
            layouts: Default::default(),
            live: None,
            images: Default::default(),
            forks: Default::default(),
        }
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        assert_eq!(decode(&encode(&m, 9)).unwrap(), (m, 9));
    }

    #[test]
    fn every_single_byte_corruption_is_rejected() {
        let b = encode(&sample(), 9);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x20;
            assert!(decode(&c).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn structural_errors_are_rejected() {
        let mut m = sample();
        m.layers[0].parent = Parent::Layer { id: m.layers[1].id };
        assert!(m.validate().unwrap_err().contains("cycle"));
        let mut m = sample();
        m.snapshots[1].layer = m.top;
        assert!(m.validate().is_err());
        let mut m = sample();
        m.snapshots.push(m.snapshots[0].clone());
        assert!(m.validate().is_err());
    }
}
