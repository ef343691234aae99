//! The diff file: the changes between two snapshots (or a snapshot and the
//! live volume) of one or more volumes, with the bytes, so that
//! [`apply`] replays them on another copy. One section per volume (a
//! consistency group writes its primary first, then its secondaries in the
//! order its state region lists them).
//!
//! Layout (little-endian; see docs/volumes.md):
//!
//! ```text
//! file header   0   8  magic "LGDIFF01"
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
//!              36   4  reserved, zero
//!              40   8  extent count m
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
//! passed and every section matches its target's size, cluster size and
//! LUN UUID.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use uuid::Uuid;

use super::error::{Error, IoCtx, Result};
use super::{Change, ChangeKind, Volume};
use crate::progress::Progress;

pub const MAGIC: &[u8; 8] = b"LGDIFF01";
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
    for (i, (vol, changes)) in sections.iter().enumerate() {
        let mut s = Vec::with_capacity(48);
        s.extend_from_slice(SECTION_MAGIC);
        s.extend_from_slice(&(i as u32).to_le_bytes());
        s.extend_from_slice(vol.lun_uuid().as_bytes());
        s.extend_from_slice(&vol.size().to_le_bytes());
        s.extend_from_slice(&(vol.cluster_size() as u32).to_le_bytes());
        s.extend_from_slice(&[0u8; 4]);
        s.extend_from_slice(&(changes.len() as u64).to_le_bytes());
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
    if &hdr[0..8] != MAGIC {
        return Err(bad("not a lungate diff file (no LGDIFF01 magic)"));
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
        if sh[36..40] != [0; 4] {
            return Err(bad(format!("section {i}: reserved bytes are not zero")));
        }
        let lun = Uuid::from_slice(&sh[8..24]).expect("16");
        let size = u64::from_le_bytes(sh[24..32].try_into().expect("8"));
        let cluster_size = u32::from_le_bytes(sh[32..36].try_into().expect("4"));
        let m = u64::from_le_bytes(sh[40..48].try_into().expect("8"));
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

/// Check that `info`'s sections fit `targets` one for one (same count,
/// LUN UUID, size and cluster size).
pub fn check_targets(info: &DiffInfo, targets: &[&Volume]) -> Result<()> {
    if info.sections.len() != targets.len() {
        return Err(bad(format!(
            "it holds {} volume(s); the target has {}",
            info.sections.len(),
            targets.len()
        )));
    }
    for (i, (s, v)) in info.sections.iter().zip(targets).enumerate() {
        if s.lun != v.lun_uuid() {
            return Err(bad(format!(
                "section {i} is for LUN {}; the target is LUN {}",
                s.lun,
                v.lun_uuid()
            )));
        }
        if s.size != v.size() || s.cluster_size as u64 != v.cluster_size() {
            return Err(bad(format!(
                "section {i}: size {} / cluster size {} differ from the target's {} / {}",
                s.size,
                s.cluster_size,
                v.size(),
                v.cluster_size()
            )));
        }
    }
    Ok(())
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
    check_targets(info, targets)?;
    let total: u64 = info
        .sections
        .iter()
        .flat_map(|s| &s.changes)
        .map(|c| c.length)
        .sum();
    let mut replayed = 0;
    progress.update("apply", 0, total);
    let mut at = 16 + info.from.len() as u64 + info.to.as_ref().map_or(0, |t| t.len() as u64);
    let mut buf = vec![0u8; CHUNK];
    for (s, v) in info.sections.iter().zip(targets) {
        at += 48;
        for c in &s.changes {
            at += 24;
            match c.kind {
                ChangeKind::Zero => {
                    v.write_zeroes(c.offset, c.length, true)?;
                    replayed += c.length;
                    progress.update("apply", replayed, total);
                }
                ChangeKind::Data => {
                    spool
                        .seek(SeekFrom::Start(at))
                        .ctx(spool_path, "seek diff spool")?;
                    let mut done = 0;
                    while done < c.length {
                        let n = (c.length - done).min(CHUNK as u64) as usize;
                        spool
                            .read_exact(&mut buf[..n])
                            .ctx(spool_path, "read diff spool")?;
                        v.write(c.offset + done, &buf[..n])?;
                        done += n as u64;
                        replayed += n as u64;
                        progress.update("apply", replayed, total);
                    }
                    at += c.length;
                }
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
    let info = verify(r, &mut spool, &spool_path)?;
    check_targets(&info, targets)?;
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
