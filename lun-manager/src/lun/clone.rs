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
        if self.is_block {
            return Err(Error::Invalid(format!(
                "{}: clones of block-device LUNs are not supported",
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
        let mut label = self.label.clone();
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
            let file = Arc::new(file);
            let cfg = volume_config(path, file.clone(), &label, VolumeOptions::default());
            let vol = self.volume.clone_to(snapshot, cfg)?;
            // The snapshot's directory still names this LUN.
            let (mut dir, slot) = Self::read_dir_as(path, &vol, &label, self.uuid())?;
            dir.lun = label.uuid;
            let mut lun = Lun {
                path: path.into(),
                file,
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
            lun.backing_size = fileops::backing_size(&lun.file).ctx(path, "size")?;
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
        let layers = self.volume.layers_dir().to_path_buf();
        let Lun {
            path,
            file,
            volume,
            label,
            is_block,
            ..
        } = self;
        // Nothing of the volume is wanted any more; skip its final flush.
        if let Ok(v) = Arc::try_unwrap(volume) {
            v.crash();
        }
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
        }
        if layers.is_dir() {
            std::fs::remove_dir_all(&layers).ctx(&layers, "remove layers directory")?;
        }
        Ok(())
    }
}
