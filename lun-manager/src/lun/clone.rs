//! A new VM from a snapshot (a LUN file with a fresh identity whose volume
//! is a clone), and deleting a LUN.

use super::*;

impl Lun {
    /// Make a new LUN at `path` (which must not exist) from snapshot
    /// `snapshot` of this one: a fresh label (new LUN UUID, name
    /// `new_name`, new region GUIDs; same size and layout), a sparse file,
    /// and a chain of one empty delta on the snapshot
    /// ([`Volume::clone_to`]). Its state is the snapshot's, re-stamped:
    /// the directory carries the new UUID, the Identity record new disk
    /// IDs and export names, the snapshot-tree record the origin, the owner
    /// record is dropped, and `secondaries` (when given) replaces the
    /// secondary-disk references. The label is written last: until then
    /// the file is not a LUN.
    pub fn clone_from_snapshot(
        &self,
        snapshot: &str,
        path: &Path,
        new_name: &str,
        uuid: Uuid,
        secondaries: Option<SecondaryDisks>,
    ) -> Result<Lun> {
        crate::format::validate_name(new_name).map_err(Error::Invalid)?;
        if self.is_block && self.path.starts_with("/dev") {
            return Err(Error::Invalid(format!(
                "{}: a block-device LUN reached under /dev has no pool to clone into; \
                 link it into one (lunctl create NAME --pool DIR --device DEVICE)",
                self.path.display()
            )));
        }
        let layers = lungate_block::store::file::layers_dir(path);
        if layers.exists() {
            return Err(Error::Invalid(format!(
                "{} exists (layers of an older LUN of that name?); remove it first",
                layers.display()
            )));
        }
        let t = now();
        // The snapshot's own sizes and offsets (a LUN resized after it
        // keeps its regions there).
        let mut label = self.label_of_snapshot(snapshot)?;
        label.generation = 1;
        label.uuid = uuid;
        label.name = new_name.into();
        label.created = t;
        label.updated = t;
        for r in &mut label.regions {
            r.guid = Uuid::new_v4();
        }
        label
            .validate()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        if self.is_rbd() {
            return self.clone_rbd(snapshot, path, label, secondaries);
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::Exists { path: path.into() })
            }
            Err(e) => return Err(e).ctx(path, "create"),
        };
        let made = (|| {
            file.set_len(label.lun_size).ctx(path, "size clone")?;
            let backing = Backing::from_file(path, file);
            let file = backing.file.clone().expect("a file");
            let cfg = volume_config(path, file, &label, VolumeOptions::default());
            let vol = self.volume.clone_to(snapshot, cfg)?;
            self.restamp_clone(snapshot, path, backing, label, vol, secondaries)
        })();
        if made.is_err() {
            // The file is ours (created above); of the layers, only what
            // the clone's volume made under its UUID is removed.
            let _ = std::fs::remove_file(path);
            for dir in [lungate_block::store::file::staging_dir(&layers), layers] {
                let _ = lungate_block::store::file::remove_layers_of(&dir, uuid);
            }
        }
        made
    }

    /// [`Lun::clone_from_snapshot`] of an RBD LUN: a protected RBD
    /// snapshot cloned into image `path` of the same pool (`rbd_clone`),
    /// whose label region and state directory are wiped at once (until the
    /// new label is published the image is not a LUN), then re-stamped as a
    /// file clone is.
    fn clone_rbd(
        &self,
        snapshot: &str,
        path: &Path,
        label: Label,
        secondaries: Option<SecondaryDisks>,
    ) -> Result<Lun> {
        if !crate::backing::is_rbd(path) {
            return Err(Error::Invalid(format!(
                "{}: a clone of an RBD LUN is an image in its pool (rbd:POOL/NAME.lun)",
                path.display()
            )));
        }
        #[cfg(feature = "rbd")]
        {
            let (mine, theirs) = (
                crate::backing::image_spec(&self.path)?,
                crate::backing::image_spec(path)?,
            );
            if mine.pool.pool != theirs.pool.pool || mine.pool.namespace != theirs.pool.namespace {
                return Err(Error::Invalid(format!(
                    "clone target {} is not in the pool of {}: a clone lives beside its parent",
                    path.display(),
                    self.path.display()
                )));
            }
            let cfg = super::store_volume(path, &label, VolumeOptions::default());
            let vol = self
                .volume
                .clone_native(snapshot, &theirs.image, cfg)
                .map_err(|e| match e {
                    lungate_block::volume::Error::Io { source, .. }
                        if source.raw_os_error() == Some(libc::EEXIST) =>
                    {
                        Error::Exists { path: path.into() }
                    }
                    e => e.into(),
                })?;
            let base = vol.store().base().clone();
            let l = &label;
            let wipe = || -> Result<()> {
                base.zero_range(l.label_region().offset, LABEL_REGION_LEN)
                    .ctx(path, "wipe the parent's label")?;
                base.sync().ctx(path, "flush")
            };
            let made = wipe().and_then(|()| {
                let backing = Backing::from_rbd_object(theirs.clone(), base.clone());
                self.restamp_clone(snapshot, path, backing, label.clone(), vol, secondaries)
            });
            if made.is_err() {
                let _ = Backing::remove_rbd(path);
            }
            made
        }
        #[cfg(not(feature = "rbd"))]
        {
            let _ = (snapshot, label, secondaries);
            Err(Error::Invalid(format!(
                "{}: this build has no Ceph RBD support",
                path.display()
            )))
        }
    }

    /// The part of a clone both stores share: the snapshot's state,
    /// re-stamped with the new identity, then the new label (the commit
    /// point).
    fn restamp_clone(
        &self,
        snapshot: &str,
        path: &Path,
        backing: Backing,
        label: Label,
        vol: Volume,
        secondaries: Option<SecondaryDisks>,
    ) -> Result<Lun> {
        let new_name = label.name.clone();
        let new_name = new_name.as_str();
        {
            // The snapshot's directory still names this LUN.
            let (mut dir, slot) = Self::read_dir_as(path, &vol, &label, self.uuid())?;
            dir.lun = label.uuid;
            let base = backing.base.clone();
            let mut lun = Lun {
                path: path.into(),
                backing,
                access: Access::ReadWrite,
                label,
                label_slot: 1,
                dir: dir.clone(),
                dir_slot: slot,
                backing_size: 0,
                is_block: false,
                found: Found::Normal,
                warnings: Vec::new(),
                volume: Arc::new(vol),
            };
            lun.backing_size = base.byte_len().ctx(path, "size")?;
            // Both slots get the re-stamped directory, so no slot of the
            // clone names another LUN.
            lun.commit_dir(dir.clone())?;
            lun.commit_dir(lun.dir.clone())?;
            let mut id: Identity = lun
                .record_json(RecordType::Identity, 0)?
                .unwrap_or(Identity { disks: vec![] });
            for d in &mut id.disks {
                d.id = crate::format::label::hex(Uuid::new_v4().as_bytes());
                d.export_name = format!("{new_name}/disk{}", d.index);
                d.description = format!(
                    "lungate {new_name} disk{} (clone of {}@{snapshot})",
                    d.index,
                    self.name()
                );
            }
            let mut tree: SnapshotTree = lun
                .record_json(RecordType::SnapshotTree, 0)?
                .unwrap_or_default();
            tree.snapshots.clear();
            tree.clone_of = Some(state::CloneOrigin {
                lun_uuid: self.uuid(),
                snapshot: snapshot.into(),
            });
            let mut recs = vec![
                (RecordType::Identity, 0, json(&id)),
                (RecordType::SnapshotTree, 0, json(&tree)),
            ];
            if let Some(s) = &secondaries {
                recs.push((RecordType::SecondaryDisks, 0, json(s)));
            }
            lun.put_records(&recs)?;
            lun.remove_record(RecordType::Owner, 0)?;
            lun.sync()?;
            lun.publish_new_label()?;
            Ok(lun)
        }
    }

    /// Delete the LUN: a file is removed (and its layers directory); a
    /// block device has its label, GPT and state directory wiped so it is no
    /// longer recognised. Refused while clones depend on its layers.
    pub fn delete(self) -> Result<()> {
        self.writable()?;
        let deps = self.volume.dependents();
        if !deps.is_empty() {
            return Err(Error::Invalid(format!(
                "{} cannot be deleted: clones depend on its layers: {}; delete or flatten them first",
                self.name(),
                deps.iter()
                    .map(|d| d.with_extension("lun").display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if self.is_rbd() {
            return self.delete_rbd();
        }
        let layers = self.volume.layers_dir().to_path_buf();
        let Lun {
            path,
            backing,
            volume,
            label,
            is_block,
            ..
        } = self;
        // Nothing of the volume is wanted any more; skip its final flush.
        if let Ok(v) = Arc::try_unwrap(volume) {
            v.crash();
        }
        let file = backing.file.expect("a file LUN");
        if !is_block {
            // The LUN file is the commit point; a crash before the layers
            // are gone leaves a directory no LUN names, which `create`
            // refuses to reuse.
            std::fs::remove_file(&path).ctx(&path, "remove")?;
        } else {
            let l = &label;
            fileops::zero_range(&file, l.label_region().offset, LABEL_REGION_LEN)
                .ctx(&path, "wipe label")?;
            fileops::zero_range(&file, l.state_region().offset, 2 * DIR_SLOT_SIZE as u64)
                .ctx(&path, "wipe state directory")?;
            if l.layout.has_gpt() {
                fileops::zero_range(&file, 0, MIB).ctx(&path, "wipe GPT")?;
                fileops::zero_range(&file, l.lun_size - MIB, MIB).ctx(&path, "wipe GPT")?;
            }
            file.sync_data().ctx(&path, "fdatasync")?;
            // A device linked into a pool (`lunctl create --device`): the
            // link goes with the label.
            if path
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
            {
                std::fs::remove_file(&path).ctx(&path, "remove the device's link")?;
            }
        }
        if layers.is_dir() {
            std::fs::remove_dir_all(&layers).ctx(&layers, "remove layers directory")?;
        }
        Ok(())
    }

    /// Delete an RBD LUN: its label first (from then on it is no LUN),
    /// then its snapshots, then the image, once this process's handles on
    /// it are closed.
    fn delete_rbd(self) -> Result<()> {
        let l = self.label.clone();
        let base = self.backing.base.clone();
        base.zero_range(l.label_region().offset, LABEL_REGION_LEN)
            .ctx(&self.path, "wipe label")?;
        base.sync().ctx(&self.path, "flush")?;
        self.volume.destroy_native()?;
        let path = self.path.clone();
        drop(base);
        let Lun {
            volume, backing, ..
        } = self;
        if let Ok(v) = Arc::try_unwrap(volume) {
            v.crash();
        }
        drop(backing);
        #[cfg(feature = "rbd")]
        Backing::remove_rbd(&path)?;
        let _ = path;
        Ok(())
    }
}
