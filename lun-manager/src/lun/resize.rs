//! Growing a disk or the state region while keeping every byte.

use super::*;

impl Lun {
    // ----- resize --------------------------------------------------------

    /// Grow disk `index` to `new_len` bytes, or add disk `index` when it is
    /// the next free index. Never shrinks; never loses a byte.
    pub fn resize_disk(&mut self, index: u32, new_len: u64) -> Result<()> {
        self.resize_disk_with(index, new_len, &mut crate::progress::silent())
    }

    /// [`Lun::resize_disk`], reporting the regions it moves (`move`) and
    /// the space it zeroes (`zero`) to `progress`.
    pub fn resize_disk_with(
        &mut self,
        index: u32,
        new_len: u64,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let new_len = align_up(new_len)
            .ok_or_else(|| Error::Invalid(format!("size {new_len} is too large")))?;
        match self.region(RegionKind::Disk, index) {
            Some(r) if new_len < r.length => Err(Error::Invalid(format!(
                "disk{index} is {} bytes; shrinking to {new_len} would lose data and is refused",
                r.length
            ))),
            Some(r) if new_len == r.length => Ok(()),
            Some(_) => self.grow(RegionKind::Disk, index, new_len, progress),
            None if index as usize == self.disks().len() => {
                if self.disks().len() >= MAX_DISKS {
                    return Err(Error::Invalid(format!(
                        "a LUN holds at most {MAX_DISKS} disks"
                    )));
                }
                if new_len == 0 {
                    return Err(Error::Invalid("a new disk needs a size".into()));
                }
                self.grow(RegionKind::Disk, index, new_len, progress)?;
                let mut id: Identity = self
                    .record_json(RecordType::Identity, 0)?
                    .unwrap_or(Identity { disks: vec![] });
                id.disks.push(state::DiskIdentity {
                    index,
                    id: crate::format::label::hex(Uuid::new_v4().as_bytes()),
                    export_name: format!("{}/disk{index}", self.name()),
                    description: format!("lungate {} disk{index}", self.name()),
                });
                let mut hw: HardwareConfig = self.hardware()?;
                hw.devices.push(state::Device {
                    kind: "virtio-blk".into(),
                    disk: Some(index),
                });
                self.put_records(&[
                    (RecordType::Identity, 0, json(&id)),
                    (RecordType::HardwareConfig, 0, json(&hw)),
                ])
            }
            None => Err(Error::Invalid(format!(
                "no disk{index}: the LUN has disks 0..{}; a new disk must be disk{}",
                self.disks().len(),
                self.disks().len()
            ))),
        }
    }

    pub fn hardware(&self) -> Result<HardwareConfig> {
        self.record_json(RecordType::HardwareConfig, 0)?
            .ok_or_else(|| Error::Record {
                path: self.path.clone(),
                record: "hardware-config".into(),
                why: "missing".into(),
            })
    }

    /// Set the VM's memory size, growing the state region to hold it.
    pub fn resize_memory(&mut self, memory: u64) -> Result<()> {
        self.resize_memory_with(memory, &mut crate::progress::silent())
    }

    /// [`Lun::resize_memory`], reporting to `progress` as
    /// [`Lun::resize_disk_with`] does.
    pub fn resize_memory_with(&mut self, memory: u64, progress: &mut dyn Progress) -> Result<()> {
        let need = state::state_region_len(self.label.layout, memory)
            .ok_or_else(|| Error::Invalid(format!("memory size {memory} is too large")))?;
        let st = *self.label.state_region();
        if need > st.length {
            self.grow(RegionKind::State, 0, need, progress)?;
        }
        let mut hw = self.hardware()?;
        hw.memory_bytes = memory;
        self.put_records(&[(RecordType::HardwareConfig, 0, json(&hw))])
    }

    /// The crash-safe grow protocol (docs/lun-format.md, "Resize"):
    /// 1. extend the file if the new layout needs more room;
    /// 2. copy every region in the way to free space, sync;
    /// 3. label N+1: moved regions at their new homes, sync;
    /// 4. zero the range the grown region will cover, sync;
    /// 5. label N+2: the region at its new length, sync;
    /// 6. zero what the moved regions left behind; rewrite the GPT.
    pub(super) fn grow(
        &mut self,
        kind: RegionKind,
        index: u32,
        new_len: u64,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        self.writable()?;
        let old = self.label.clone();
        // An RBD LUN's bytes are an image: extended with `rbd resize`,
        // copied and zeroed through it (the file's calls otherwise).
        let file = self.backing.file.clone();
        if file.is_none() && !self.volume.snapshots().is_empty() {
            return Err(Error::Invalid(format!(
                "{}: an RBD LUN with snapshots is not resized yet: its snapshots are RBD \
                 snapshots of the same image, and a grow moves or lengthens regions whose \
                 old places those snapshots would need recorded (a file LUN keeps them in its \
                 manifest; an RBD LUN has none yet). Clone the snapshots you need into new \
                 LUNs (`lunctl clone`), delete them (`lunctl delete-snapshot`), then resize",
                self.name()
            )));
        }
        if file.is_none() && self.volume.is_layered() {
            // Snapshots were taken and deleted: the image's tree, which
            // names its size, records nothing and goes (a no-op, whenever a
            // crash comes). A clone's names its parent: flattened first.
            let forgot = match self.volume.native() {
                Some(t) => t.forget_if_empty()?,
                None => false,
            };
            if !forgot {
                return Err(Error::Invalid(format!(
                    "{}: this RBD LUN is a clone whose bytes still come partly from its \
                     parent's snapshot; `lunctl flatten {}` first, then resize",
                    self.name(),
                    self.name()
                )));
            }
        }
        // RBD: no snapshots (refused above), so no layout to keep; its
        // volume writes the image directly, as the copies below do.
        let layered = self.volume.is_layered() && file.is_some();
        if layered && Arc::strong_count(&self.volume) > 1 {
            return Err(Error::Invalid(format!(
                "{}: the LUN's volume is in use by another handle (a gateway serving it?); \
                 a layered LUN is resized offline",
                self.name()
            )));
        }
        let old_protected = self.volume.protected().to_vec();
        let target = old.region(kind, index).copied();
        let tgt_off = target.map(|r| r.offset);
        let layout = old.layout;
        // Regions that stay put: everything but the target, the movers, and
        // (truncate layout) the footer, which follows the end of the file.
        let want_end = tgt_off.map(|o| o.checked_add(new_len));
        if let Some(None) = want_end {
            return Err(Error::Invalid("new size overflows".into()));
        }
        let grow_range = target.map(|r| (r.end(), r.offset + new_len));
        let is_mover = |r: &Region| {
            if Some(*r) == target {
                return false;
            }
            if layout == Layout::Truncate && r.kind == RegionKind::Label {
                return false;
            }
            matches!(grow_range, Some((s, e)) if r.offset < e && s < r.end())
        };
        if layout.has_gpt() {
            if let Some(m) = old
                .regions
                .iter()
                .find(|r| is_mover(r) && r.kind == RegionKind::Label)
            {
                return Err(Error::Invalid(format!(
                    "cannot grow {kind}{index} over the label region at {}",
                    m.offset
                )));
            }
        }
        let movers: Vec<Region> = old
            .regions
            .iter()
            .filter(|r| is_mover(r))
            .copied()
            .collect();
        // Occupied while copying: every old region, plus the target's new extent.
        let mut busy: Vec<(u64, u64)> = old.regions.iter().map(|r| (r.offset, r.end())).collect();
        if let (Some(t), Some(Some(e))) = (target, want_end) {
            busy.push((t.offset, e));
        }
        if layered {
            // Moved regions are copied through the volume, which refuses
            // its protected bytes (the old backup GPT) until the label
            // moves on.
            busy.extend(self.volume.protected().iter().map(|r| (r.start, r.end)));
        }
        // Aligned: the label region [0, 1 MiB) and disk0 are busy, so
        // nothing is placed below disk0's end.
        let floor = match layout {
            Layout::Offset => OFFSET_LABEL_AT,
            Layout::Truncate | Layout::Aligned => 0,
        };
        let data_limit = |lun_size: u64| match layout {
            Layout::Offset | Layout::Aligned => lun_size - OFFSET_TAIL_RESERVED,
            Layout::Truncate => lun_size - LABEL_REGION_LEN,
        };
        let mut placed: Vec<Region> = Vec::new();
        let mut to_place: Vec<Region> = movers.clone();
        if target.is_none() {
            to_place.push(Region {
                kind,
                index,
                offset: 0,
                length: new_len,
                guid: Uuid::new_v4(),
            });
        }
        let mut lun_size = old.lun_size;
        for r in &to_place {
            let fit = first_fit(&busy, floor, data_limit(lun_size), r.length);
            let at = match fit {
                Some(at) => at,
                None if self.is_block => {
                    return Err(Error::Invalid(format!(
                        "{}: not enough free space on the block device for {} ({} bytes)",
                        self.path.display(),
                        r.name(),
                        r.length
                    )))
                }
                None => {
                    // Place past everything, including the old tail MiB.
                    let end = busy
                        .iter()
                        .map(|b| b.1)
                        .max()
                        .unwrap_or(0)
                        .max(old.lun_size);
                    lun_size = end
                        .checked_add(r.length)
                        .and_then(|x| x.checked_add(MIB))
                        .ok_or_else(|| Error::Invalid("new size overflows".into()))?;
                    end
                }
            };
            busy.push((at, at + r.length));
            placed.push(Region { offset: at, ..*r });
        }
        if let Some(Some(e)) = want_end {
            // The target's own growth may need a bigger file.
            let limit = data_limit(lun_size);
            if e > limit {
                if self.is_block {
                    return Err(Error::Invalid(format!(
                        "{}: growing {kind}{index} to {new_len} bytes needs {} more bytes than the block device has",
                        self.path.display(),
                        e - limit
                    )));
                }
                let end = busy
                    .iter()
                    .map(|b| b.1)
                    .max()
                    .unwrap_or(0)
                    .max(old.lun_size);
                lun_size = lun_size.max(end.max(e) + MIB);
            }
        }
        if self.is_block {
            lun_size = old.lun_size;
        }
        let base = self.backing.base.clone();
        // 1. room
        if lun_size > self.backing_size {
            match &file {
                Some(f) => f.set_len(lun_size),
                None => base.set_len(lun_size),
            }
            .ctx(&self.path, "extend")?;
            self.backing_size = lun_size;
            if layout.has_gpt() {
                // The current partitions, the backup at the new end: the
                // tail is never an unwritten extension, which the label
                // search would take for an interrupted truncate resize and
                // walk the guest's data for a footer.
                gpt::write_in(&*self.backing.base, &old, lun_size).ctx(&self.path, "extend GPT")?;
                self.sync_file()?;
            }
        }
        if layered {
            // Every snapshot keeps the layout it was taken with; then the
            // volume grows (its own commit) before anything is copied.
            self.volume
                .record_layouts(&json_value(&super::layouts::SnapshotLayout::of(&old)))?;
            kill_point("layouts");
            if lun_size > self.volume.size() {
                self.volume.grow(lun_size)?;
                self.reopen_volume()?;
            }
            kill_point("volume");
        }
        // 2. copy movers
        let total: u64 = movers.iter().map(|r| r.length).sum();
        let mut moved = 0;
        progress.update("move", 0, total);
        for m in &movers {
            let dst = placed.iter().find(|p| p.guid == m.guid).expect("placed");
            // Holes are skipped: what they would have copied counts as done.
            let before = moved;
            if layered {
                self.copy_in_volume(m.offset, dst.offset, m.length, |n| {
                    moved += n;
                    progress.update("move", moved, total);
                })?;
            } else if let Some(f) = &file {
                fileops::copy_range(f, m.offset, dst.offset, m.length, |n| {
                    moved += n;
                    progress.update("move", moved, total);
                })
                .ctx(&self.path, "copy region")?;
            } else {
                copy_object(&*base, m.offset, dst.offset, m.length, |n| {
                    moved += n;
                    progress.update("move", moved, total);
                })
                .ctx(&self.path, "copy region")?;
            }
            moved = before + m.length;
            progress.update("move", moved, total);
        }
        self.sync()?;
        kill_point("copied");
        // 3. label N+1
        let mut mid = old.clone();
        mid.lun_size = lun_size;
        for r in mid.regions.iter_mut() {
            if let Some(p) = placed.iter().find(|p| p.guid == r.guid) {
                *r = *p;
            }
            if layout == Layout::Truncate && r.kind == RegionKind::Label {
                r.offset = lun_size - LABEL_REGION_LEN;
            }
        }
        self.commit_label(mid.clone())?;
        kill_point("label-moved");
        // 4. zero the range the region grows into (it held moved data).
        let mut fin = mid.clone();
        // One `zero` phase over every range zeroed from here on; its total
        // grows as ranges are added, `done` never falls.
        let (mut zeroed, mut zero_total) = (0u64, 0u64);
        // A layered LUN's old bytes belong to its snapshots too: zeros go
        // into the live layer, never into the file.
        let vol = |l: &Lun| l.volume.clone();
        let mut zero = |file: Option<&File>, vol: Option<Arc<Volume>>, off: u64, len: u64| {
            zero_total += len;
            progress.update("zero", zeroed, zero_total);
            let r = match (vol, file) {
                (Some(v), _) => v
                    .write_zeroes(off, len, true)
                    .map_err(|e| std::io::Error::other(e.to_string())),
                (None, Some(file)) => fileops::zero_range_with(file, off, len, |d| {
                    progress.update("zero", zeroed + d, zero_total)
                }),
                (None, None) => base.zero_range(off, len),
            };
            zeroed += len;
            r
        };
        match target {
            Some(t) => {
                let (s, e) = (t.end(), t.offset + new_len);
                zero(file.as_deref(), layered.then(|| vol(self)), s, e - s)
                    .ctx(&self.path, "zero new space")?;
                for r in fin.regions.iter_mut() {
                    if r.guid == t.guid {
                        r.length = new_len;
                    }
                }
            }
            None => {
                let p = placed.last().expect("new region placed");
                zero(
                    file.as_deref(),
                    layered.then(|| vol(self)),
                    p.offset,
                    p.length,
                )
                .ctx(&self.path, "zero new disk")?;
                fin.regions.push(*p);
                fin.regions.sort_by_key(|r| (r.kind, r.index));
            }
        }
        self.sync()?;
        kill_point("zeroed");
        // 5. label N+2
        self.commit_label(fin.clone())?;
        kill_point("label-grown");
        // 6. clean up what is no longer any region's.
        let mut vacated: Vec<(u64, u64)> = movers.iter().map(|r| (r.offset, r.end())).collect();
        if layout == Layout::Truncate && old.label_region().offset != fin.label_region().offset {
            vacated.push((old.label_region().offset, old.label_region().end()));
        }
        if layout.has_gpt() && fin.lun_size != old.lun_size {
            vacated.push((old.lun_size - OFFSET_TAIL_RESERVED, old.lun_size));
        }
        for (s, e) in vacated {
            for (gs, ge) in subtract(s, e, &fin.regions) {
                zero(file.as_deref(), layered.then(|| vol(self)), gs, ge - gs)
                    .ctx(&self.path, "zero vacated")?;
            }
        }
        if layered {
            // What the old label protected and the new one does not (the
            // old backup GPT, a truncate layout's old footer) was never any
            // layer's: zeroed in the file, so no stale label or GPT stays.
            let gone =
                lungate_block::volume::diff::clip_ranges(&old_protected, self.volume.protected());
            let f = file.as_ref().expect("a layered LUN here is a file");
            for r in gone {
                fileops::zero_range(f, r.start, r.end - r.start)
                    .ctx(&self.path, "zero old label bytes")?;
            }
        }
        if layout.has_gpt() {
            gpt::write(&*self.backing.base, &self.label).ctx(&self.path, "rewrite GPT")?;
        }
        self.sync()?;
        self.sync_file()?;
        if kind == RegionKind::State {
            // Let the directory cover the grown region.
            let d = self.dir.clone();
            self.commit_dir(Directory {
                region_len: new_len,
                ..d
            })?;
        }
        self.warnings.clear();
        Ok(())
    }

    /// Copy `[src, src+len)` to `[dst, dst+len)` through the volume (into
    /// the live layer; the snapshots keep the old bytes where they were).
    /// Extents that read as zeros are written as zeros, never skipped: the
    /// destination was free space, whose bytes are no region's.
    fn copy_in_volume(
        &self,
        src: u64,
        dst: u64,
        len: u64,
        mut done: impl FnMut(u64),
    ) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let mut buf = vec![0u8; CHUNK as usize];
        for x in self.volume.extents(src, len)? {
            let to = dst + (x.offset - src);
            if !x.data {
                self.volume.write_zeroes(to, x.length, true)?;
                done(x.length);
                continue;
            }
            let mut at = 0;
            while at < x.length {
                let n = (x.length - at).min(CHUNK);
                let b = &mut buf[..n as usize];
                self.volume.read(x.offset + at, b)?;
                self.volume.write(to + at, b)?;
                at += n;
                done(n);
            }
        }
        Ok(())
    }
}

/// Copy `[src, src+len)` to `[dst, dst+len)` within `obj` (an RBD image),
/// in 1 MiB pieces; ranges the object reports as holes are written as
/// zeros (the destination is free space whose bytes are no region's).
fn copy_object(
    obj: &dyn lungate_block::store::Object,
    src: u64,
    dst: u64,
    len: u64,
    mut done: impl FnMut(u64),
) -> std::io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut at = 0;
    for (o, l) in obj.data_extents(src, src + len)? {
        let (s, e) = (o.max(src), (o + l).min(src + len));
        if s >= e {
            continue;
        }
        if s > src + at {
            obj.zero_range(dst + at, s - src - at)?;
            done(s - src - at);
        }
        let mut o = s;
        while o < e {
            let n = (e - o).min(CHUNK);
            let b = &mut buf[..n as usize];
            obj.read_at(b, o)?;
            obj.write_at(b, dst + (o - src))?;
            o += n;
            done(n);
        }
        at = at.max(e - src);
    }
    if at < len {
        obj.zero_range(dst + at, len - at)?;
        done(len - at);
    }
    Ok(())
}

fn json_value<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("plain data serialises")
}

/// Test hook for the crash tests: with `LUNGATE_TEST_RESIZE_KILL=STEP` the
/// process ends on the spot (no destructor runs, as under SIGKILL) when a
/// layered resize reaches STEP (`layouts`, `volume`, `copied`,
/// `label-moved`, `zeroed`, `label-grown`).
fn kill_point(step: &str) {
    if std::env::var_os("LUNGATE_TEST_RESIZE_KILL").is_some_and(|v| v == step) {
        std::process::exit(137);
    }
}
