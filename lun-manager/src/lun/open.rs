//! Opening a LUN: finding a valid label (either slot, or the footer a crash
//! left), reading its state directory through the volume, and bringing
//! derived structures (GPT, footer) back in line with the label.

use super::*;

impl Lun {
    // ----- opening -------------------------------------------------------

    pub fn open(path: &Path, access: Access) -> Result<Lun> {
        Lun::open_with(path, access, None)
    }

    /// [`Lun::open`], with the volume's asynchronous data path on `engine`
    /// (a gateway serving the LUN).
    pub fn open_with(path: &Path, access: Access, engine: Option<IoEngine>) -> Result<Lun> {
        let backing = Backing::open(path, access)?;
        let backing_size = backing.base.byte_len().ctx(path, "size")?;
        let is_block = backing.base.is_block_device();
        let (label, label_slot, found, mut warnings) =
            Self::find_label(path, &*backing.base, backing_size)?;
        if label.lun_size > backing_size {
            return Err(Error::Damaged {
                path: path.into(),
                why: format!(
                    "truncated: the label needs {} bytes but the backing has {backing_size}",
                    label.lun_size
                ),
            });
        }
        if label.layout.has_gpt() {
            warnings.extend(gpt::check(&*backing.base, &label));
        }
        let volume = open_volume(path, &backing, &label, access, engine)?;
        warnings.extend(volume.warnings());
        let (dir, dir_slot) = Self::read_dir(path, &volume, &label)?;
        let mut lun = Lun {
            path: path.into(),
            backing,
            access,
            label,
            label_slot,
            dir,
            dir_slot,
            backing_size,
            is_block,
            found,
            warnings,
            volume: Arc::new(volume),
        };
        if access == Access::ReadWrite {
            lun.repair()?;
        }
        Ok(lun)
    }

    /// Locate the label. The footer (truncate layout) is checked first and,
    /// when it carries our magic, is authoritative: in the truncate layout
    /// the guest owns byte 0 onwards, so a label-looking block inside the
    /// disk must never be consulted while a footer exists. Then an
    /// interrupted resize's footer (only when the tail is an unwritten
    /// hole), then the aligned layout's slots in the first MiB, then the
    /// offset layout's label at the GPT's label partition (always 1 MiB).
    ///
    /// The aligned slots come before the offset label because in the
    /// aligned layout byte 1 MiB onwards is the guest's: with its slots
    /// present (even damaged) nothing the guest wrote is consulted. In the
    /// offset layout the first MiB is never the guest's, so its empty
    /// aligned slots cannot be forged.
    pub(super) fn find_label(
        path: &Path,
        file: &dyn Object,
        backing: u64,
    ) -> Result<(Label, u64, Found, Vec<String>)> {
        let damaged = |why: String| Error::Damaged {
            path: path.into(),
            why,
        };
        let accept = |label: Label, slot: u64, other_bad: Option<String>, at: u64, want: Layout| {
            if label.layout != want || label.label_region().offset != at {
                return Err(damaged(format!(
                    "{} label found at {at} says it lives at {}",
                    label.layout,
                    label.label_region().offset
                )));
            }
            let mut warnings = Vec::new();
            let found = match other_bad {
                Some(why) => {
                    warnings.push(format!("one label slot is damaged: {why}"));
                    Found::OneSlot(why)
                }
                None => Found::Normal,
            };
            Ok((label, slot, found, warnings))
        };
        if backing >= LABEL_REGION_LEN {
            let tail = (backing - 1) & !(ALIGN - 1);
            match read_slots(file, Layout::Truncate, tail, backing) {
                SlotRead::Nothing => {}
                SlotRead::Bad(errs) => {
                    return Err(damaged(format!(
                        "footer label at {tail}: {}",
                        errs.join("; ")
                    )))
                }
                SlotRead::Good {
                    label,
                    slot,
                    other_bad,
                } => return accept(label, slot, other_bad, tail, Layout::Truncate),
            }
            if let Some((label, slot)) = Self::recover_footer(file, backing) {
                let why = format!(
                    "footer found at {} instead of the end of the file ({backing}): an interrupted resize",
                    label.label_region().offset
                );
                return Ok((label, slot, Found::Recovered(why.clone()), vec![why]));
            }
        }
        match read_slots(file, Layout::Aligned, 0, backing) {
            SlotRead::Nothing => {}
            SlotRead::Bad(errs) => {
                return Err(damaged(format!(
                    "aligned label in the first MiB: {}",
                    errs.join("; ")
                )))
            }
            SlotRead::Good {
                label,
                slot,
                other_bad,
            } => return accept(label, slot, other_bad, 0, Layout::Aligned),
        }
        let mut at = OFFSET_LABEL_AT;
        if let Ok((_, parts)) = gpt::read(file, backing) {
            if let Some(p) = parts
                .iter()
                .find(|p| p.type_guid == crate::format::LABEL_TYPE_GUID)
            {
                at = p.offset;
            }
        }
        match read_slots(file, Layout::Offset, at, backing) {
            SlotRead::Nothing => Err(Error::NotALun {
                path: path.into(),
                why: "no lungate GPT partition, label or footer".into(),
            }),
            SlotRead::Bad(errs) => Err(damaged(format!("label at {at}: {}", errs.join("; ")))),
            SlotRead::Good {
                label,
                slot,
                other_bad,
            } => accept(label, slot, other_bad, at, Layout::Offset),
        }
    }

    /// After an interrupted truncate-layout resize the file was extended but
    /// the new footer not yet written: the end is a hole. Walk data extents
    /// backwards for the newest footer that sits where it says it lives.
    pub(super) fn recover_footer(file: &dyn Object, backing: u64) -> Option<(Label, u64)> {
        if backing < LABEL_REGION_LEN {
            return None;
        }
        let tail = (backing - 1) & !(ALIGN - 1);
        let ext = file.data_extents(0, backing).ok()?;
        // Only when the tail itself holds no data: a fresh extension.
        if ext.iter().any(|(o, l)| o + l > tail) {
            return None;
        }
        for (o, l) in ext.iter().rev().take(64) {
            let at = (o + l - 1) & !(ALIGN - 1);
            if let SlotRead::Good { label, slot, .. } =
                read_slots(file, Layout::Truncate, at, backing)
            {
                if label.layout == Layout::Truncate && label.label_region().offset == at {
                    return Some((label, slot));
                }
            }
        }
        None
    }

    pub(super) fn read_dir(path: &Path, vol: &Volume, label: &Label) -> Result<(Directory, u64)> {
        Self::read_dir_as(path, vol, label, label.uuid)
    }

    /// Read the directory expecting LUN UUID `owner` (a clone's state region
    /// starts with its parent's directory).
    pub(super) fn read_dir_as(
        path: &Path,
        vol: &Volume,
        label: &Label,
        owner: Uuid,
    ) -> Result<(Directory, u64)> {
        let st = *label.state_region();
        let mut best: Option<(Directory, u64)> = None;
        let mut errors = Vec::new();
        for slot in 0..2u64 {
            let mut b = vec![0u8; DIR_SLOT_SIZE];
            vol.read(st.offset + slot * DIR_SLOT_SIZE as u64, &mut b)?;
            match Directory::decode(&b, owner, state::data_start(label.layout)) {
                Ok(d) if d.region_len > st.length => errors.push(format!(
                    "slot {slot}: directory covers {} bytes but the state region has {}",
                    d.region_len, st.length
                )),
                Ok(d) => {
                    if best
                        .as_ref()
                        .is_none_or(|(x, _)| d.generation > x.generation)
                    {
                        best = Some((d, slot));
                    }
                }
                Err(state::DirError::NoMagic) => {}
                Err(e) => errors.push(format!("slot {slot}: {e}")),
            }
        }
        best.ok_or_else(|| Error::Damaged {
            path: path.into(),
            why: format!(
                "no valid state directory ({})",
                if errors.is_empty() {
                    "both slots empty".to_string()
                } else {
                    errors.join("; ")
                }
            ),
        })
    }

    /// The LUN UUID of the LUN at `path`, from its label alone (no state
    /// directory, no volume): for finding secondary disks by UUID.
    pub fn probe_uuid(path: &Path) -> Result<Uuid> {
        Ok(Self::probe_label(path)?.uuid)
    }

    /// The validated label of the LUN at `path`, read without opening its
    /// state or its volume (cheap enough to ask of every LUN in a pool).
    pub fn probe_label(path: &Path) -> Result<Label> {
        let b = Backing::open(path, Access::ReadOnly)?;
        let backing = b.base.byte_len().ctx(path, "size")?;
        let (label, ..) = Self::find_label(path, &*b.base, backing)?;
        Ok(label)
    }

    /// Bring derived structures back in line with the label: rewrite a GPT
    /// that disagrees with it, re-home a footer found by recovery.
    pub(super) fn repair(&mut self) -> Result<()> {
        if let Found::Recovered(_) = self.found {
            // The extension past the recovered LUN holds nothing committed.
            if !self.is_block {
                self.backing
                    .base
                    .set_len(self.label.lun_size)
                    .ctx(&self.path, "truncate after interrupted resize")?;
                self.backing_size = self.label.lun_size;
            }
            self.found = Found::Normal;
        }
        if self.label.layout.has_gpt()
            && !self.warnings.is_empty()
            && !gpt::check(&*self.backing.base, &self.label).is_empty()
        {
            gpt::write(&*self.backing.base, &self.label).ctx(&self.path, "rewrite GPT")?;
            self.sync_file()?;
        }
        Ok(())
    }
}
