//! The state directory and its records: read, verify, put, stream, remove;
//! each change commits a new directory generation into the other slot.

use super::*;

impl Lun {
    // ----- state records -------------------------------------------------

    /// Read and verify one record's payload.
    ///
    /// A layered LUN's directory may have changed under the cached copy (a
    /// revert through [`Lun::volume`] without [`Lun::reload_state`]): a
    /// missing or mismatching record is looked up again in a fresh read of
    /// the directory before it is reported.
    pub fn record(&self, rtype: RecordType, instance: u16) -> Result<Option<Vec<u8>>> {
        match self.record_in(&self.dir, rtype, instance) {
            Ok(Some(b)) => Ok(Some(b)),
            r if !self.volume.is_layered() => r,
            r => match Self::read_dir(&self.path, &self.volume, &self.label) {
                Ok((fresh, _)) if fresh != self.dir => self.record_in(&fresh, rtype, instance),
                _ => r,
            },
        }
    }

    pub(super) fn record_in(
        &self,
        dir: &Directory,
        rtype: RecordType,
        instance: u16,
    ) -> Result<Option<Vec<u8>>> {
        let Some(e) = dir.find(rtype, instance).copied() else {
            return Ok(None);
        };
        let len = usize::try_from(e.length).map_err(|_| self.rec_err(&e, "too large"))?;
        let mut b = vec![0u8; len];
        self.read_region(RegionKind::State, 0, e.offset, &mut b)?;
        if blake3::hash(&b).as_bytes() != &e.checksum {
            return Err(self.rec_err(&e, "payload checksum mismatch"));
        }
        Ok(Some(b))
    }

    /// A layered LUN re-reads its directory before changing it, so a
    /// revert done through the volume directly can never be overwritten
    /// by a stale cached directory.
    /// Re-read the state directory before changing it: another handle on
    /// the same volume ([`Lun::share`]) or a revert may have moved it on.
    pub(super) fn fresh_dir(&mut self) -> Result<()> {
        if self.dir.generation == 0 {
            // Being created: no directory has been committed yet.
            return Ok(());
        }
        self.reload_state()
    }

    pub fn record_json<T: serde::de::DeserializeOwned>(
        &self,
        rtype: RecordType,
        instance: u16,
    ) -> Result<Option<T>> {
        match self.record(rtype, instance)? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Record {
                    path: self.path.clone(),
                    record: rtype.name().into(),
                    why: format!("bad JSON: {e}"),
                }),
        }
    }

    pub(super) fn rec_err(&self, e: &Entry, why: &str) -> Error {
        Error::Record {
            path: self.path.clone(),
            record: format!("{} #{}", e.rtype.name(), e.instance),
            why: why.into(),
        }
    }

    /// Verify every record's checksum; returns (record, problem) pairs.
    pub fn verify_records(&self) -> Vec<(String, Option<String>)> {
        self.dir
            .entries
            .iter()
            .map(|e| {
                let name = format!("{} #{}", e.rtype.name(), e.instance);
                let r = self
                    .record(e.rtype, e.instance)
                    .err()
                    .map(|x| x.to_string());
                (name, r)
            })
            .collect()
    }

    /// Replace (or add) records atomically: payloads to free space, sync,
    /// then one new directory generation.
    pub fn put_records(&mut self, recs: &[(RecordType, u16, Vec<u8>)]) -> Result<()> {
        self.writable()?;
        self.fresh_dir()?;
        let st = *self.label.state_region();
        let mut next = self.dir.clone();
        // While writing, both the old and the new payloads must stay intact.
        let mut busy = self.dir.clone();
        for (rtype, instance, payload) in recs {
            let len = payload.len() as u64;
            let off = busy.allocate(len, st.length).ok_or_else(|| Error::Record {
                path: self.path.clone(),
                record: rtype.name().into(),
                why: format!(
                    "state region full: {len} bytes do not fit (region {} bytes, {} used); grow it with lunctl resize --memory",
                    st.length,
                    self.dir.used_bytes()
                ),
            })?;
            if busy.entries.len() >= state::MAX_ENTRIES * 2 {
                return Err(Error::Invalid("too many state records".into()));
            }
            let e = Entry {
                rtype: *rtype,
                instance: *instance,
                flags: 0,
                offset: off,
                length: len,
                checksum: *blake3::hash(payload).as_bytes(),
            };
            self.volume.write(st.offset + off, payload)?;
            busy.entries.push(Entry {
                instance: u16::MAX,
                ..e
            });
            next.entries
                .retain(|x| !(x.rtype == *rtype && x.instance == *instance));
            next.entries.push(e);
        }
        if next.entries.len() > state::MAX_ENTRIES {
            return Err(Error::Invalid(format!(
                "state directory would hold {} records; the limit is {}",
                next.entries.len(),
                state::MAX_ENTRIES
            )));
        }
        next.entries.sort_by_key(|e| (e.rtype, e.instance));
        next.region_len = st.length;
        self.sync()?;
        self.commit_dir(next)
    }

    /// The current directory entry of a record, read afresh (another
    /// handle or a revert may have moved the directory on).
    pub fn record_entry(&mut self, rtype: RecordType, instance: u16) -> Result<Option<Entry>> {
        self.fresh_dir()?;
        Ok(self.dir.find(rtype, instance).copied())
    }

    /// Read part of a record's payload: `buf.len()` bytes from `at` inside
    /// it. The caller checks the whole payload against `e.checksum`.
    pub fn read_record_at(&self, e: &Entry, at: u64, buf: &mut [u8]) -> Result<()> {
        let end = at.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > e.length) {
            return Err(Error::Invalid(format!(
                "read of {} bytes at {at} runs past the end of {} #{} ({} bytes)",
                buf.len(),
                e.rtype.name(),
                e.instance,
                e.length
            )));
        }
        self.read_region(RegionKind::State, 0, e.offset + at, buf)
    }

    /// Write the records `puts` (type, instance, length) with payloads read
    /// from `src` back to back, and remove `removes`, in one new directory
    /// generation; returns it. Payloads stream through a 1 MiB buffer to
    /// free space (the space of every current record, removed ones
    /// included, stays intact until the commit), so a crash or a short
    /// `src` leaves the previous directory current and changes nothing.
    /// `check` sees the whole payload of each record whose type is JSON
    /// (at most [`MAX_JSON_RECORD`] bytes) before anything is committed.
    pub fn write_records_from(
        &mut self,
        puts: &[(RecordType, u16, u64)],
        removes: &[(RecordType, u16)],
        src: &mut dyn std::io::Read,
        check: &mut RecordCheck<'_>,
    ) -> Result<u64> {
        self.writable()?;
        self.fresh_dir()?;
        let st = *self.label.state_region();
        let mut next = self.dir.clone();
        let mut busy = self.dir.clone();
        for (i, (rtype, instance, _)) in puts.iter().enumerate() {
            if puts[..i]
                .iter()
                .any(|(t, n, _)| t == rtype && n == instance)
            {
                return Err(Error::Invalid(format!(
                    "{} #{instance} is written twice in one batch",
                    rtype.name()
                )));
            }
        }
        let mut buf = vec![0u8; 1 << 20];
        for (rtype, instance, len) in puts {
            let (rtype, instance, len) = (*rtype, *instance, *len);
            let off = busy.allocate(len, st.length).ok_or_else(|| Error::Record {
                path: self.path.clone(),
                record: format!("{} #{instance}", rtype.name()),
                why: format!(
                    "state region full: {len} bytes do not fit (region {} bytes, {} used)",
                    st.length,
                    busy.used_bytes()
                ),
            })?;
            if busy.entries.len() >= state::MAX_ENTRIES * 2 {
                return Err(Error::Invalid("too many state records".into()));
            }
            let json = rtype.is_json();
            if json && len > MAX_JSON_RECORD {
                return Err(Error::Invalid(format!(
                    "{} #{instance}: {len} bytes exceeds the {MAX_JSON_RECORD}-byte limit of a JSON record",
                    rtype.name()
                )));
            }
            let mut kept = Vec::new();
            let mut hasher = blake3::Hasher::new();
            let mut done = 0u64;
            while done < len {
                let n = usize::try_from((len - done).min(buf.len() as u64)).expect("≤ 1 MiB");
                src.read_exact(&mut buf[..n]).map_err(|e| Error::Record {
                    path: self.path.clone(),
                    record: format!("{} #{instance}", rtype.name()),
                    why: format!("payload ended after {done} of {len} bytes: {e}"),
                })?;
                hasher.update(&buf[..n]);
                if json {
                    kept.extend_from_slice(&buf[..n]);
                }
                self.volume.write(st.offset + off + done, &buf[..n])?;
                done += n as u64;
            }
            if json {
                check(rtype, instance, &kept).map_err(|why| Error::Record {
                    path: self.path.clone(),
                    record: format!("{} #{instance}", rtype.name()),
                    why,
                })?;
            }
            let e = Entry {
                rtype,
                instance,
                flags: 0,
                offset: off,
                length: len,
                checksum: *hasher.finalize().as_bytes(),
            };
            busy.entries.push(Entry {
                instance: u16::MAX,
                ..e
            });
            next.entries
                .retain(|x| !(x.rtype == rtype && x.instance == instance));
            next.entries.push(e);
        }
        for (rtype, instance) in removes {
            next.entries
                .retain(|x| !(x.rtype == *rtype && x.instance == *instance));
        }
        if next.entries.len() > state::MAX_ENTRIES {
            return Err(Error::Invalid(format!(
                "state directory would hold {} records; the limit is {}",
                next.entries.len(),
                state::MAX_ENTRIES
            )));
        }
        next.entries.sort_by_key(|e| (e.rtype, e.instance));
        next.region_len = st.length;
        self.sync()?;
        self.commit_dir(next)?;
        Ok(self.dir.generation)
    }

    /// One record's payload as snapshot `snap` holds it (a JSON record or
    /// another small one, at most [`MAX_JSON_RECORD`] bytes), verified;
    /// `None` if the snapshot's directory has no such record. Reads the
    /// frozen snapshot, so nothing live changes.
    pub fn snapshot_record(
        &self,
        snap: &str,
        rtype: RecordType,
        instance: u16,
    ) -> Result<Option<Vec<u8>>> {
        // The state region where it was when the snapshot was taken.
        let mut st = *self.label.state_region();
        if let Some(r) = self.snapshot_layout(snap)?.region("state") {
            st.offset = r.offset;
            st.length = r.length;
        }
        let mut best: Option<Directory> = None;
        for slot in 0..2u64 {
            let mut b = vec![0u8; DIR_SLOT_SIZE];
            self.volume
                .read_snapshot(snap, st.offset + slot * DIR_SLOT_SIZE as u64, &mut b)?;
            if let Ok(d) = Directory::decode(&b, self.uuid(), state::data_start(self.layout())) {
                if best.as_ref().is_none_or(|x| d.generation > x.generation) {
                    best = Some(d);
                }
            }
        }
        let d = best.ok_or_else(|| Error::Record {
            path: self.path.clone(),
            record: format!("snapshot {snap}"),
            why: "no valid state directory in the snapshot".into(),
        })?;
        let Some(e) = d.find(rtype, instance).copied() else {
            return Ok(None);
        };
        if e.length > MAX_JSON_RECORD {
            return Err(Error::Invalid(format!(
                "{} #{instance} of snapshot {snap} is {} bytes; only records up to {MAX_JSON_RECORD} bytes are read from a snapshot",
                rtype.name(),
                e.length
            )));
        }
        let mut b = vec![0u8; usize::try_from(e.length).expect("capped")];
        self.volume
            .read_snapshot(snap, st.offset + e.offset, &mut b)?;
        if blake3::hash(&b).as_bytes() != &e.checksum {
            return Err(self.rec_err(&e, "payload checksum mismatch in the snapshot"));
        }
        Ok(Some(b))
    }

    /// Remove a record (its space is free once the new directory is current).
    pub fn remove_record(&mut self, rtype: RecordType, instance: u16) -> Result<bool> {
        self.writable()?;
        self.fresh_dir()?;
        let mut next = self.dir.clone();
        let before = next.entries.len();
        next.entries
            .retain(|e| !(e.rtype == rtype && e.instance == instance));
        if next.entries.len() == before {
            return Ok(false);
        }
        self.commit_dir(next)?;
        Ok(true)
    }

    pub(super) fn commit_dir(&mut self, mut next: Directory) -> Result<()> {
        let st = *self.label.state_region();
        next.generation = self.dir.generation + 1;
        let slot = 1 - self.dir_slot;
        self.volume
            .write(st.offset + slot * DIR_SLOT_SIZE as u64, &next.encode())?;
        self.sync()?;
        self.dir = next;
        self.dir_slot = slot;
        Ok(())
    }
}
