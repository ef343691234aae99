//! Provisioning a new LUN: lay out its regions, write the GPT, the state
//! directory and its records, and publish the label last.

use super::*;

impl Lun {
    // ----- creation ------------------------------------------------------

    /// Provision a new LUN at `path`: a new sparse file (which must not
    /// exist) or an existing block device large enough for it.
    pub fn create(path: &Path, spec: &CreateSpec) -> Result<Lun> {
        Self::create_inner(path, spec, None)
    }

    /// [`Lun::create`], and give every disk region real storage before the
    /// label is published (`fileops::allocate_range`: a file is fully
    /// allocated, so the guest can never hit ENOSPC; a block device's disk
    /// regions are overwritten with zeros, so nothing a previous user left
    /// there shows through). Reports the `prefill` phase to `progress`. An
    /// interrupted prefill leaves no LUN behind, only an unlabelled file or
    /// device.
    pub fn create_prefilled(
        path: &Path,
        spec: &CreateSpec,
        progress: &mut dyn Progress,
    ) -> Result<Lun> {
        Self::create_inner(path, spec, Some(progress))
    }

    pub(super) fn create_inner(
        path: &Path,
        spec: &CreateSpec,
        prefill: Option<&mut dyn Progress>,
    ) -> Result<Lun> {
        crate::format::validate_name(&spec.name).map_err(Error::Invalid)?;
        if spec.disks.is_empty() {
            return Err(Error::Invalid("a LUN needs at least one --disk".into()));
        }
        if spec.disks.len() > MAX_DISKS {
            return Err(Error::Invalid(format!(
                "{} disks requested; a LUN holds at most {MAX_DISKS}",
                spec.disks.len()
            )));
        }
        if spec.vcpus == 0 || spec.vcpus > 1024 {
            return Err(Error::Invalid(format!(
                "vcpus {} not in 1..=1024",
                spec.vcpus
            )));
        }
        let mut disks = Vec::new();
        for (i, &d) in spec.disks.iter().enumerate() {
            if d == 0 {
                return Err(Error::Invalid(format!("disk{i} has size 0")));
            }
            disks.push(
                align_up(d)
                    .ok_or_else(|| Error::Invalid(format!("disk{i} size {d} is too large")))?,
            );
        }
        if spec.layout == Layout::Aligned && disks[0] <= SHADOW_LEN {
            return Err(Error::Invalid(format!(
                "the aligned layout shadows the first {} of disk0, so disk0 must be larger; {} was asked for",
                crate::size::human(SHADOW_LEN),
                crate::size::human(spec.disks[0])
            )));
        }
        let state_len = state::state_region_len(spec.layout, spec.memory)
            .ok_or_else(|| Error::Invalid(format!("memory size {} is too large", spec.memory)))?;
        let too_big = || Error::Invalid("the requested sizes overflow a 64-bit LUN".into());
        let region = |kind, index, offset, length| Region {
            kind,
            index,
            offset,
            length,
            guid: Uuid::new_v4(),
        };
        let mut regions = Vec::new();
        let mut at;
        match spec.layout {
            Layout::Offset => {
                regions.push(region(
                    RegionKind::Label,
                    0,
                    OFFSET_LABEL_AT,
                    LABEL_REGION_LEN,
                ));
                at = OFFSET_LABEL_AT + LABEL_REGION_LEN;
                regions.push(region(RegionKind::State, 0, at, state_len));
                at = at.checked_add(state_len).ok_or_else(too_big)?;
                for (i, &d) in disks.iter().enumerate() {
                    regions.push(region(RegionKind::Disk, i as u32, at, d));
                    at = at.checked_add(d).ok_or_else(too_big)?;
                }
            }
            Layout::Truncate | Layout::Aligned => {
                if spec.layout == Layout::Aligned {
                    // The first MiB: MBR, GPT and both label slots for the
                    // host; the shadowed range of disk0 for the guest.
                    regions.push(region(RegionKind::Label, 0, 0, LABEL_REGION_LEN));
                }
                regions.push(region(RegionKind::Disk, 0, 0, disks[0]));
                at = disks[0];
                regions.push(region(RegionKind::State, 0, at, state_len));
                at = at.checked_add(state_len).ok_or_else(too_big)?;
                for (i, &d) in disks.iter().enumerate().skip(1) {
                    regions.push(region(RegionKind::Disk, i as u32, at, d));
                    at = at.checked_add(d).ok_or_else(too_big)?;
                }
            }
        }
        // Offset, aligned: the last MiB holds the backup GPT. Truncate: the footer.
        let mut lun_size = at.checked_add(MIB).ok_or_else(too_big)?;

        let rbd = crate::backing::is_rbd(path);
        if rbd && prefill.is_some() {
            return Err(Error::Invalid(format!(
                "{}: --prefill is for files and block devices (an RBD image allocates as it is written)",
                path.display()
            )));
        }
        let (file, is_block) = match OpenOptions::new().read(true).write(true).open(path) {
            _ if rbd => (None, false),
            Ok(f) if fileops::is_block_device(&f).ctx(path, "stat")? => {
                let dev = fileops::backing_size(&f).ctx(path, "size")?;
                let dev = dev & !(ALIGN - 1);
                if dev < lun_size {
                    return Err(Error::Invalid(format!(
                        "{}: block device has {dev} usable bytes, the LUN needs {lun_size}",
                        path.display()
                    )));
                }
                lun_size = dev;
                (Some(f), true)
            }
            Ok(_) => return Err(Error::Exists { path: path.into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                Some(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(path)
                        .ctx(path, "create")?,
                ),
                false,
            ),
            Err(e) => return Err(e).ctx(path, "open"),
        };
        if spec.layout == Layout::Truncate {
            regions.push(region(
                RegionKind::Label,
                0,
                lun_size - MIB,
                LABEL_REGION_LEN,
            ));
        }
        regions.sort_by_key(|r| (r.kind, r.index));
        let t = now();
        let label = Label {
            generation: 1,
            uuid: Uuid::new_v4(),
            layout: spec.layout,
            name: spec.name.clone(),
            lun_size,
            created: t,
            updated: t,
            cluster_size: spec.cluster_size,
            regions,
        };
        label
            .validate()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let backing = match file {
            Some(file) => {
                let layers = lungate_block::store::file::layers_dir(path);
                if layers.exists() {
                    if !is_block {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(Error::Invalid(format!(
                        "{} exists (layers of an older LUN of that name?); remove it first",
                        layers.display()
                    )));
                }
                Backing::from_file(path, file)
            }
            None => Backing::create_rbd(path, label.lun_size)?,
        };
        let result = Self::initialise(path, backing, is_block, label, spec, prefill);
        if result.is_err() && !is_block {
            if rbd {
                #[cfg(feature = "rbd")]
                let _ = Backing::remove_rbd(path);
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
        result
    }

    pub(super) fn initialise(
        path: &Path,
        backing: Backing,
        is_block: bool,
        label: Label,
        spec: &CreateSpec,
        prefill: Option<&mut dyn Progress>,
    ) -> Result<Lun> {
        let base = backing.base.clone();
        if !is_block && !backing.is_rbd() {
            base.set_len(label.lun_size).ctx(path, "size new LUN")?;
        }
        let st = *label.state_region();
        // Clear both metadata slots of a reused block device so stale
        // structures can never be mistaken for ours: the directory, the
        // label, and with a GPT the first and last MiB (where an older
        // aligned label or truncate footer could sit). The aligned
        // layout's shadow area is the guest's first MiB: it starts zero,
        // never with what the device held.
        base.zero_range(st.offset, 2 * DIR_SLOT_SIZE as u64)
            .ctx(path, "clear state")?;
        base.zero_range(label.label_region().offset, LABEL_REGION_LEN)
            .ctx(path, "clear label")?;
        if label.layout.has_gpt() {
            base.zero_range(0, MIB).ctx(path, "clear GPT")?;
            base.zero_range(label.lun_size - MIB, MIB)
                .ctx(path, "clear backup GPT")?;
        }
        if label.layout == Layout::Aligned {
            base.zero_range(st.offset + state::SHADOW_AT, SHADOW_LEN)
                .ctx(path, "clear shadow area")?;
        }
        let volume = Arc::new(open_volume(
            path,
            &backing,
            &label,
            Access::ReadWrite,
            None,
        )?);
        let mut lun = Lun {
            path: path.into(),
            backing,
            volume,
            access: Access::ReadWrite,
            dir: Directory::new(label.uuid, st.length, state::data_start(label.layout)),
            dir_slot: 1,
            label,
            label_slot: 1,
            backing_size: 0,
            is_block,
            found: Found::Normal,
            warnings: Vec::new(),
        };
        lun.backing_size = base.byte_len().ctx(path, "size")?;
        if spec.checksums {
            // Before the first record: every byte the volume holds is summed.
            lun.volume.enable_checksums()?;
        }
        let hw = HardwareConfig {
            vcpus: spec.vcpus,
            memory_bytes: spec.memory,
            devices: (0..spec.disks.len() as u32)
                .map(|i| state::Device {
                    kind: "virtio-blk".into(),
                    disk: Some(i),
                })
                .collect(),
        };
        let identity = Identity {
            disks: (0..spec.disks.len() as u32)
                .map(|i| state::DiskIdentity {
                    index: i,
                    id: crate::format::label::hex(Uuid::new_v4().as_bytes()),
                    export_name: format!("{}/disk{i}", spec.name),
                    description: format!("lungate {} disk{i}", spec.name),
                })
                .collect(),
        };
        lun.put_records(&[
            (RecordType::HardwareConfig, 0, json(&hw)),
            (RecordType::Identity, 0, json(&identity)),
            (RecordType::SnapshotTree, 0, json(&SnapshotTree::default())),
            (
                RecordType::SecondaryDisks,
                0,
                json(&SecondaryDisks::default()),
            ),
        ])?;
        if let Some(progress) = prefill {
            let disks = lun.disks();
            let total: u64 = disks.iter().map(|d| d.length).sum();
            let mut done = 0;
            progress.update("prefill", 0, total);
            for d in &disks {
                let file = lun.backing.file.clone().expect("prefill is for files");
                fileops::allocate_range(&file, d.offset, d.length, |n| {
                    progress.update("prefill", done + n, total)
                })
                .ctx(path, "prefill disk")?;
                done += d.length;
            }
            // Durable before the label makes the LUN exist.
            lun.sync_file()?;
        }
        lun.publish_new_label()?;
        Ok(lun)
    }

    /// The last step of making a LUN (create, clone): its label, the commit
    /// point, written after everything else is durable, into slot 0; then
    /// the GPT (offset layout) and a final sync.
    pub(super) fn publish_new_label(&mut self) -> Result<()> {
        let label = self.label.clone();
        self.write_label_slot(&label, 0)?;
        self.label_slot = 0;
        if self.label.layout.has_gpt() {
            gpt::write(&*self.backing.base, &self.label).ctx(&self.path, "write GPT")?;
        }
        self.sync_file()
    }
}
