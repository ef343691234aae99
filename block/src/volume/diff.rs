//! The diff file: the changes between two snapshots (or a snapshot and the
//! live volume) of one or more volumes, with the bytes, so that
//! [`apply`] replays them on another copy. One section per volume (a
//! consistency group writes its primary first, then its secondaries in the
//! order its state region lists them).
//!
//! Layout (little-endian; see docs/volumes.md):
//!
//! ```text
//! file header   0   8  magic "LGDIFF02" ("LGDIFF01": the same with r = 0)
//!               8   4  section count n (1..=64)
//!              12   2  from-name length f (1..=128)
//!              14   2  to-name length t (0..=128; 0 = the live volume)
//!              16   f  from name, UTF-8
//!            16+f   t  to name, UTF-8
//! section       0   4  "LGDS"
//!               4   4  section index (0, 1, ...)
//!               8  16  LUN UUID
//!              24   8  volume size
//!              32   4  cluster size
//!              36   4  base range count r (0..=64)
//!              40   8  extent count m
//!              48  16r base ranges: start, end (ascending, unprotected)
//!          48+16r   32  base digest (only when r > 0): Volume::content_digest
//!                       of `from` over the base ranges
//! extent        0   8  offset
//!               8   8  length (> 0)
//!              16   1  kind: 1 data, 2 zero
//!              17   7  reserved, zero
//!              24   -  `length` data bytes (kind 1 only)
//! trailer       0   8  "LGDIFEND"
//!               8  32  blake3 of every byte before these 32
//! ```
//!
//! Extents of a section are in ascending, non-overlapping order and lie
//! inside the volume and outside its protected (label/GPT) ranges.
//! [`apply`] copies the whole input to a spool file while checking its
//! structure and hash, and writes nothing to any volume unless every check
//! passed and every section matches its target's size and cluster size,
//! and either its LUN UUID (every extent is applied) or, for another LUN,
//! its base: the same base ranges (the disks) holding bytes whose digest
//! is the section's base digest — then only the extents inside the base
//! ranges are applied (the state region carries the target's own
//! identity).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use uuid::Uuid;

use super::error::{Error, IoCtx, Result};
use super::{Change, ChangeKind, Volume};
use crate::progress::Progress;

pub const MAGIC: &[u8; 8] = b"LGDIFF02";
/// Diff files written before base digests; read, never written.
pub const MAGIC_V1: &[u8; 8] = b"LGDIFF01";
pub const MAX_BASE_RANGES: usize = 64;
pub const SECTION_MAGIC: &[u8; 4] = b"LGDS";
pub const TRAILER_MAGIC: &[u8; 8] = b"LGDIFEND";
pub const MAX_SECTIONS: u32 = 64;
pub const NAME_MAX: usize = 128;
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const CHUNK: usize = 1 << 20;

/// What one section of a diff file is about.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SectionInfo {
    pub lun: Uuid,
    pub size: u64,
    pub cluster_size: u32,
    pub changes: Vec<Change>,
    /// The ranges the base digest covers (the member's disks); empty when
    /// the file has no base digest.
    pub base: Vec<std::ops::Range<u64>>,
    #[serde(serialize_with = "hex_digest")]
    pub base_digest: Option<[u8; 32]>,
    /// Set by [`check_targets`]: the target is another LUN with the same
    /// base, so only the extents inside `base` are applied.
    pub base_only: bool,
}

fn hex_digest<S: serde::Serializer>(
    d: &Option<[u8; 32]>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&d.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        None => s.serialize_none(),
    }
}

/// One section to write: a volume, its changes (clipped to unprotected
/// ranges) and the ranges its base digest covers (empty: none).
pub struct Section<'a> {
    pub volume: &'a Volume,
    pub changes: Vec<Change>,
    pub base: Vec<std::ops::Range<u64>>,
}

/// `ranges` minus the protected ones, ascending.
pub fn clip_ranges(
    ranges: &[std::ops::Range<u64>],
    protected: &[std::ops::Range<u64>],
) -> Vec<std::ops::Range<u64>> {
    let as_changes: Vec<Change> = ranges
        .iter()
        .filter(|r| r.start < r.end)
        .map(|r| Change {
            offset: r.start,
            length: r.end - r.start,
            kind: ChangeKind::Data,
        })
        .collect();
    let mut out: Vec<_> = clip(&as_changes, protected)
        .into_iter()
        .map(|c| c.offset..c.offset + c.length)
        .collect();
    out.sort_by_key(|r| r.start);
    out
}

/// A verified diff file's header and extents (the data stays in the spool).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiffInfo {
    pub from: String,
    pub to: Option<String>,
    pub sections: Vec<SectionInfo>,
}

struct Hashing<'a, W: Write> {
    inner: &'a mut W,
    hash: blake3::Hasher,
    written: u64,
}

impl<W: Write> Hashing<'_, W> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.hash.update(b);
        self.written += b.len() as u64;
        self.inner
            .write_all(b)
            .map_err(|e| Error::Invalid(format!("writing the diff: {e}")))
    }
}

/// Cut the protected ranges out of `changes`.
pub fn clip(changes: &[Change], protected: &[std::ops::Range<u64>]) -> Vec<Change> {
    let mut out = Vec::new();
    for c in changes {
        let mut pieces = vec![(c.offset, c.offset + c.length)];
        for p in protected {
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    if p.end <= s || e <= p.start {
                        vec![(s, e)]
                    } else {
                        [(s, p.start.max(s)), (p.end.min(e), e)]
                            .into_iter()
                            .filter(|(a, b)| a < b)
                            .collect()
                    }
                })
                .collect();
        }
        out.extend(pieces.into_iter().map(|(s, e)| Change {
            offset: s,
            length: e - s,
            kind: c.kind,
        }));
    }
    out
}

/// Write a diff file of `sections` (each a volume and its changes, already
/// clipped to unprotected ranges) between snapshot `from` and `to` (the live
/// volume when `None`). Data comes from `to`. Returns the bytes written.
pub fn write(
    sections: &[(&Volume, Vec<Change>)],
    from: &str,
    to: Option<&str>,
    w: &mut impl Write,
) -> Result<u64> {
    let s: Vec<Section<'_>> = sections
        .iter()
        .map(|(v, c)| Section {
            volume: v,
            changes: c.clone(),
            base: Vec::new(),
        })
        .collect();
    write_sections(&s, from, to, w)
}

/// [`write`] with base ranges per section: each gets the digest of what
/// `from` holds there, so the file applies to any LUN with that base.
pub fn write_sections(
    sections: &[Section<'_>],
    from: &str,
    to: Option<&str>,
    w: &mut impl Write,
) -> Result<u64> {
    let to_name = to.unwrap_or("");
    if from.is_empty() || from.len() > NAME_MAX || to_name.len() > NAME_MAX {
        return Err(Error::Invalid(format!(
            "snapshot names {from:?} / {to_name:?} must be 1 to {NAME_MAX} bytes"
        )));
    }
    if sections.is_empty() || sections.len() > MAX_SECTIONS as usize {
        return Err(Error::Invalid(format!(
            "a diff holds 1 to {MAX_SECTIONS} volumes, not {}",
            sections.len()
        )));
    }
    let mut h = Hashing {
        inner: w,
        hash: blake3::Hasher::new(),
        written: 0,
    };
    let mut hdr = Vec::with_capacity(16 + from.len() + to_name.len());
    hdr.extend_from_slice(MAGIC);
    hdr.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    hdr.extend_from_slice(&(from.len() as u16).to_le_bytes());
    hdr.extend_from_slice(&(to_name.len() as u16).to_le_bytes());
    hdr.extend_from_slice(from.as_bytes());
    hdr.extend_from_slice(to_name.as_bytes());
    h.put(&hdr)?;
    let mut buf = vec![0u8; CHUNK];
    for (i, sec) in sections.iter().enumerate() {
        let (vol, changes) = (sec.volume, &sec.changes);
        if sec.base.len() > MAX_BASE_RANGES {
            return Err(Error::Invalid(format!(
                "section {i}: {} base ranges (at most {MAX_BASE_RANGES})",
                sec.base.len()
            )));
        }
        let digest = if sec.base.is_empty() {
            None
        } else {
            Some(vol.content_digest(Some(from), &sec.base)?)
        };
        let mut s = Vec::with_capacity(48);
        s.extend_from_slice(SECTION_MAGIC);
        s.extend_from_slice(&(i as u32).to_le_bytes());
        s.extend_from_slice(vol.lun_uuid().as_bytes());
        s.extend_from_slice(&vol.size().to_le_bytes());
        s.extend_from_slice(&(vol.cluster_size() as u32).to_le_bytes());
        s.extend_from_slice(&(sec.base.len() as u32).to_le_bytes());
        s.extend_from_slice(&(changes.len() as u64).to_le_bytes());
        for r in &sec.base {
            s.extend_from_slice(&r.start.to_le_bytes());
            s.extend_from_slice(&r.end.to_le_bytes());
        }
        if let Some(d) = digest {
            s.extend_from_slice(&d);
        }
        h.put(&s)?;
        for c in changes {
            let mut e = [0u8; 24];
            e[0..8].copy_from_slice(&c.offset.to_le_bytes());
            e[8..16].copy_from_slice(&c.length.to_le_bytes());
            e[16] = match c.kind {
                ChangeKind::Data => KIND_DATA,
                ChangeKind::Zero => KIND_ZERO,
            };
            h.put(&e)?;
            if c.kind == ChangeKind::Data {
                let mut done = 0;
                while done < c.length {
                    let n = (c.length - done).min(CHUNK as u64) as usize;
                    match to {
                        Some(name) => vol.read_snapshot(name, c.offset + done, &mut buf[..n])?,
                        None => vol.read(c.offset + done, &mut buf[..n])?,
                    }
                    h.put(&buf[..n])?;
                    done += n as u64;
                }
            }
        }
    }
    h.put(TRAILER_MAGIC)?;
    let sum = *h.hash.finalize().as_bytes();
    h.inner
        .write_all(&sum)
        .map_err(|e| Error::Invalid(format!("writing the diff: {e}")))?;
    Ok(h.written + 32)
}

fn bad(why: impl Into<String>) -> Error {
    Error::Invalid(format!("diff file refused: {}", why.into()))
}

/// Reads from the input, copies into the spool, hashes, counts.
struct Spooler<'a, R: Read> {
    r: &'a mut R,
    spool: &'a mut File,
    spool_path: &'a Path,
    hash: blake3::Hasher,
    at: u64,
}

impl<R: Read> Spooler<'_, R> {
    fn take(&mut self, b: &mut [u8]) -> Result<()> {
        self.r.read_exact(b).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad(format!("truncated at byte {}", self.at))
            } else {
                bad(format!("reading at byte {}: {e}", self.at))
            }
        })?;
        self.hash.update(b);
        self.spool
            .write_all(b)
            .ctx(self.spool_path, "write diff spool")?;
        self.at += b.len() as u64;
        Ok(())
    }
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Read a whole diff file from `r` into `spool` (an empty scratch file),
/// checking its structure and its blake3 trailer. Nothing is applied.
pub fn verify(r: &mut impl Read, spool: &mut File, spool_path: &Path) -> Result<DiffInfo> {
    let mut s = Spooler {
        r,
        spool,
        spool_path,
        hash: blake3::Hasher::new(),
        at: 0,
    };
    let mut hdr = [0u8; 16];
    s.take(&mut hdr)?;
    let v1 = &hdr[0..8] == MAGIC_V1;
    if &hdr[0..8] != MAGIC && !v1 {
        return Err(bad(
            "not a lungate diff file (no LGDIFF02 or LGDIFF01 magic)",
        ));
    }
    let n = u32::from_le_bytes(hdr[8..12].try_into().expect("4"));
    let fl = u16::from_le_bytes([hdr[12], hdr[13]]) as usize;
    let tl = u16::from_le_bytes([hdr[14], hdr[15]]) as usize;
    if n == 0 || n > MAX_SECTIONS || fl == 0 || fl > NAME_MAX || tl > NAME_MAX {
        return Err(bad(format!(
            "header: {n} sections, names of {fl} and {tl} bytes"
        )));
    }
    let mut names = vec![0u8; fl + tl];
    s.take(&mut names)?;
    let text = |b: &[u8]| {
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| bad("snapshot name is not UTF-8"))
    };
    let from = text(&names[..fl])?;
    let to = if tl == 0 {
        None
    } else {
        Some(text(&names[fl..])?)
    };
    let mut sections = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for i in 0..n {
        let mut sh = [0u8; 48];
        s.take(&mut sh)?;
        if &sh[0..4] != SECTION_MAGIC || u32::from_le_bytes(sh[4..8].try_into().expect("4")) != i {
            return Err(bad(format!("section {i}: bad section header")));
        }
        let r = u32::from_le_bytes(sh[36..40].try_into().expect("4")) as usize;
        if v1 && r != 0 {
            return Err(bad(format!("section {i}: reserved bytes are not zero")));
        }
        if r > MAX_BASE_RANGES {
            return Err(bad(format!(
                "section {i}: {r} base ranges (at most {MAX_BASE_RANGES})"
            )));
        }
        let lun = Uuid::from_slice(&sh[8..24]).expect("16");
        let size = u64::from_le_bytes(sh[24..32].try_into().expect("8"));
        let cluster_size = u32::from_le_bytes(sh[32..36].try_into().expect("4"));
        let m = u64::from_le_bytes(sh[40..48].try_into().expect("8"));
        let mut base = Vec::with_capacity(r);
        for j in 0..r {
            let (a, b) = (s.u64()?, s.u64()?);
            if a >= b
                || b > size
                || base
                    .last()
                    .is_some_and(|p: &std::ops::Range<u64>| p.end > a)
            {
                return Err(bad(format!(
                    "section {i} base range {j}: [{a}, {b}) is empty, out of order or beyond the size {size}"
                )));
            }
            base.push(a..b);
        }
        let base_digest = if r > 0 {
            let mut d = [0u8; 32];
            s.take(&mut d)?;
            Some(d)
        } else {
            None
        };
        let mut changes = Vec::new();
        let mut end = 0u64;
        for j in 0..m {
            let offset = s.u64()?;
            let length = s.u64()?;
            let mut k = [0u8; 8];
            s.take(&mut k)?;
            let kind = match k[0] {
                KIND_DATA => ChangeKind::Data,
                KIND_ZERO => ChangeKind::Zero,
                x => return Err(bad(format!("section {i} extent {j}: kind {x}"))),
            };
            if k[1..] != [0; 7] {
                return Err(bad(format!(
                    "section {i} extent {j}: reserved bytes are not zero"
                )));
            }
            match offset.checked_add(length) {
                Some(e) if length > 0 && offset >= end && e <= size => end = e,
                _ => {
                    return Err(bad(format!(
                        "section {i} extent {j}: [{offset}, +{length}) is empty, out of order or beyond the size {size}"
                    )))
                }
            }
            if kind == ChangeKind::Data {
                let mut left = length;
                while left > 0 {
                    let c = left.min(CHUNK as u64) as usize;
                    s.take(&mut buf[..c])?;
                    left -= c as u64;
                }
            }
            changes.push(Change {
                offset,
                length,
                kind,
            });
        }
        sections.push(SectionInfo {
            lun,
            size,
            cluster_size,
            changes,
            base,
            base_digest,
            base_only: false,
        });
    }
    let mut t = [0u8; 8];
    s.take(&mut t)?;
    if &t != TRAILER_MAGIC {
        return Err(bad("no trailer where the extents end"));
    }
    let want = *s.hash.finalize().as_bytes();
    let mut sum = [0u8; 32];
    s.r.read_exact(&mut sum)
        .map_err(|_| bad("truncated in the trailer checksum"))?;
    if sum != want {
        return Err(bad("blake3 checksum mismatch"));
    }
    let mut extra = [0u8; 1];
    match s.r.read(&mut extra) {
        Ok(0) => {}
        Ok(_) => return Err(bad("bytes after the trailer")),
        Err(e) => return Err(bad(format!("reading past the trailer: {e}"))),
    }
    s.spool.flush().ctx(spool_path, "write diff spool")?;
    Ok(DiffInfo { from, to, sections })
}

/// Check that `info`'s sections fit `targets` one for one: same count,
/// size and cluster size, and either the same LUN UUID or, for another
/// LUN, the same base: `bases[i]` (the target member's disks, clipped to
/// its unprotected ranges; empty when not known) equal to the section's
/// base ranges and holding bytes with the section's base digest. Marks
/// such sections [`SectionInfo::base_only`].
pub fn check_targets(
    info: &mut DiffInfo,
    targets: &[&Volume],
    bases: &[Vec<std::ops::Range<u64>>],
) -> Result<()> {
    if info.sections.len() != targets.len() {
        return Err(bad(format!(
            "it holds {} volume(s); the target has {}",
            info.sections.len(),
            targets.len()
        )));
    }
    for (i, (s, v)) in info.sections.iter_mut().zip(targets).enumerate() {
        if s.size != v.size() || s.cluster_size as u64 != v.cluster_size() {
            let whose = if s.lun == v.lun_uuid() {
                format!("section {i}:")
            } else {
                format!(
                    "section {i} is for LUN {}, the target is LUN {}:",
                    s.lun,
                    v.lun_uuid()
                )
            };
            return Err(bad(format!(
                "{whose} size {} / cluster size {} differ from the target's {} / {}",
                s.size,
                s.cluster_size,
                v.size(),
                v.cluster_size()
            )));
        }
        s.base_only = false;
        if s.lun == v.lun_uuid() {
            continue;
        }
        let Some(want) = s.base_digest else {
            return Err(bad(format!(
                "section {i} is for LUN {}; the target is LUN {}, and the file records no base \
                 digest to check the target against (written by an older lunctl: apply it to its own LUN)",
                s.lun,
                v.lun_uuid()
            )));
        };
        let theirs = bases.get(i).map(Vec::as_slice).unwrap_or(&[]);
        if theirs != s.base.as_slice() {
            return Err(bad(format!(
                "section {i} is for LUN {} with disks at {:?}; the target LUN {} has its disks at {:?}",
                s.lun,
                s.base,
                v.lun_uuid(),
                theirs
            )));
        }
        if v.content_digest(None, &s.base)? != want {
            return Err(bad(format!(
                "section {i} is for LUN {}; the target LUN {} does not hold its base {:?} \
                 (its disks differ from that snapshot): apply the earlier diffs of the chain first",
                s.lun,
                v.lun_uuid(),
                info.from
            )));
        }
        s.base_only = true;
    }
    Ok(())
}

/// The pieces of `c` to apply: all of it, or (base only) its parts inside
/// `base`.
fn pieces(c: &Change, base_only: bool, base: &[std::ops::Range<u64>]) -> Vec<(u64, u64)> {
    let (s, e) = (c.offset, c.offset + c.length);
    if !base_only {
        return vec![(s, e)];
    }
    base.iter()
        .map(|r| (r.start.max(s), r.end.min(e)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// Replay a verified spool onto `targets` (checked by [`check_targets`]).
/// Idempotent: every extent holds absolute contents, so a replay
/// interrupted by a crash is finished by replaying again. Reports the
/// bytes of the extents replayed (phase `apply`) to `progress`.
pub fn replay(
    info: &DiffInfo,
    spool: &mut File,
    spool_path: &Path,
    targets: &[&Volume],
    progress: &mut dyn Progress,
) -> Result<()> {
    let total: u64 = info
        .sections
        .iter()
        .flat_map(|s| s.changes.iter().map(move |c| (s, c)))
        .flat_map(|(s, c)| pieces(c, s.base_only, &s.base))
        .map(|(a, b)| b - a)
        .sum();
    let mut replayed = 0;
    progress.update("apply", 0, total);
    let mut at = 16 + info.from.len() as u64 + info.to.as_ref().map_or(0, |t| t.len() as u64);
    let mut buf = vec![0u8; CHUNK];
    for (s, v) in info.sections.iter().zip(targets) {
        at += 48 + 16 * s.base.len() as u64 + if s.base_digest.is_some() { 32 } else { 0 };
        for c in &s.changes {
            at += 24;
            for (ps, pe) in pieces(c, s.base_only, &s.base) {
                match c.kind {
                    ChangeKind::Zero => {
                        v.write_zeroes(ps, pe - ps, true)?;
                        replayed += pe - ps;
                        progress.update("apply", replayed, total);
                    }
                    ChangeKind::Data => {
                        spool
                            .seek(SeekFrom::Start(at + (ps - c.offset)))
                            .ctx(spool_path, "seek diff spool")?;
                        let mut done = 0;
                        while done < pe - ps {
                            let n = (pe - ps - done).min(CHUNK as u64) as usize;
                            spool
                                .read_exact(&mut buf[..n])
                                .ctx(spool_path, "read diff spool")?;
                            v.write(ps + done, &buf[..n])?;
                            done += n as u64;
                            replayed += n as u64;
                            progress.update("apply", replayed, total);
                        }
                    }
                }
            }
            if c.kind == ChangeKind::Data {
                at += c.length;
            }
        }
        v.flush()?;
    }
    Ok(())
}

/// Verify the whole diff read from `r` (spooled to an unlinked scratch
/// file in `scratch_dir`), check it against `targets`, then replay it.
/// Nothing is written to a target unless the whole file verified.
pub fn apply(r: &mut impl Read, scratch_dir: &Path, targets: &[&Volume]) -> Result<DiffInfo> {
    apply_with(r, scratch_dir, targets, &mut crate::progress::silent())
}

/// [`apply`], reporting the replay (phase `apply`) to `progress`.
pub fn apply_with(
    r: &mut impl Read,
    scratch_dir: &Path,
    targets: &[&Volume],
    progress: &mut dyn Progress,
) -> Result<DiffInfo> {
    apply_to_bases(r, scratch_dir, targets, &[], progress)
}

/// [`apply_with`], also onto targets of other LUNs whose base matches:
/// `bases[i]` are target `i`'s disk ranges (see [`check_targets`]).
pub fn apply_to_bases(
    r: &mut impl Read,
    scratch_dir: &Path,
    targets: &[&Volume],
    bases: &[Vec<std::ops::Range<u64>>],
    progress: &mut dyn Progress,
) -> Result<DiffInfo> {
    let spool_path = scratch_dir.join(format!(
        ".lgdiff-spool-{}-{}",
        std::process::id(),
        Uuid::new_v4()
    ));
    let mut spool = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&spool_path)
        .ctx(&spool_path, "create diff spool")?;
    // Unlinked at once: the open handle is all we need, and a crash leaves
    // nothing behind.
    let _ = std::fs::remove_file(&spool_path);
    let mut info = verify(r, &mut spool, &spool_path)?;
    check_targets(&mut info, targets, bases)?;
    replay(&info, &mut spool, &spool_path, targets, progress)?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{VolumeConfig, VolumeOptions};
    use std::sync::Arc;

    fn volume(dir: &Path, name: &str, lun: Uuid) -> Volume {
        let path = dir.join(format!("{name}.lun"));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(64 * 4096).unwrap();
        Volume::open(VolumeConfig {
            lun_path: path,
            file: Arc::new(f),
            lun_uuid: lun,
            size: 64 * 4096,
            protected: std::iter::once(0..4096).collect(),
            options: VolumeOptions {
                cluster_size: 4096,
                read_only: false,
            },
            engine: None,
        })
        .unwrap()
    }

    #[test]
    fn every_single_byte_corruption_is_refused_before_anything_is_written() {
        let d = tempfile::tempdir().unwrap();
        let lun = Uuid::new_v4();
        let src = volume(d.path(), "src", lun);
        src.snapshot("a", "").unwrap();
        src.write(4096 + 100, &[7u8; 300]).unwrap();
        src.write(10 * 4096, &[9u8; 4096]).unwrap();
        let changes = clip(&src.diff("a", None).unwrap(), src.protected());
        let mut file = Vec::new();
        write(&[(&src, changes)], "a", None, &mut file).unwrap();
        let dst = volume(d.path(), "dst", lun);
        let before = std::fs::read(d.path().join("dst.lun")).unwrap();
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x01;
            assert!(
                apply(&mut &bad[..], d.path(), &[&dst]).is_err(),
                "flip at {i} accepted"
            );
        }
        for n in 0..file.len() {
            assert!(
                apply(&mut &file[..n], d.path(), &[&dst]).is_err(),
                "truncation to {n} accepted"
            );
        }
        assert_eq!(std::fs::read(d.path().join("dst.lun")).unwrap(), before);
        // No scratch file is left behind.
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains("spool"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let info = apply(&mut &file[..], d.path(), &[&dst]).unwrap();
        assert_eq!(info.from, "a");
        assert_eq!(info.to, None);
        let (mut a, mut b) = (vec![0u8; 64 * 4096], vec![0u8; 64 * 4096]);
        src.read(0, &mut a).unwrap();
        dst.read(0, &mut b).unwrap();
        assert!(a == b);
    }

    #[test]
    fn clip_cuts_protected_ranges_out() {
        let c = |offset, length| Change {
            offset,
            length,
            kind: ChangeKind::Data,
        };
        assert_eq!(
            clip(&[c(0, 100), c(150, 100)], &[10..20, 200..210]),
            vec![c(0, 10), c(20, 80), c(150, 50), c(210, 40)]
        );
        let all = std::iter::once(0..100).collect::<Vec<_>>();
        assert_eq!(clip(&[c(10, 10)], &all), vec![]);
    }
}
