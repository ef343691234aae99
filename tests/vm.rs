//! Real-VM end-to-end test: a QEMU guest partitions, formats and fills a
//! lungate disk over NBD, then a second boot mounts and verifies it.
//!
//! For each layout (offset, truncate, aligned) the test creates a LUN with two disks,
//! serves it with the real `lungate`, and boots a Linux guest (the host's
//! Debian cloud kernel plus a busybox initramfs built at test time, see
//! tests/vm/initramfs.rs) with `NAME/disk0` as its virtio disk: first over
//! TCP, then over the unix socket. The guest script (tests/vm/init.sh)
//! reports every check on the serial console; the host asserts each of
//! them, and then looks at the same bytes from outside: the LUN file where
//! the disk's view keeps them (the disk region; for the aligned layout's
//! disk0 the first MiB in the state region's shadow area and every other
//! block at its own offset), and the export copied out through NBD. Across
//! both boots the bytes outside the disks, and the LUN's other disk, must
//! not change; on the aligned LUN, lungate's own GPT at LBA 0 stays intact
//! (sfdisk). See docs/vm-test.md.

#[path = "vm/initramfs.rs"]
mod initramfs;
#[path = "vm/qemu.rs"]
mod qemu;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use lungate_tests::{hex, require_tool, run_ok, Gateway, Pool};

use initramfs::Kernel;
use qemu::Boot;

/// Sector where the guest's partition starts, and the sectors it leaves
/// free at the end of the disk for the tail marker (see init.sh).
const PART_START: u64 = 2048;
const TAIL_GAP: u64 = 2048;
const HELLO: &str = "hello from the lungate guest\n";

/// One run of a disk in the file that backs it: `len` bytes from disk
/// offset `disk` live at file offset `file`.
#[derive(Debug, Clone, Copy)]
struct Piece {
    disk: u64,
    file: u64,
    len: u64,
}

/// Where a disk lives inside the file that backs it: its pieces in disk
/// order (one for a plain window; two for the aligned layout's disk0).
#[derive(Debug, Clone)]
struct Placement {
    pieces: Vec<Piece>,
}

impl Placement {
    fn window(offset: u64, length: u64) -> Placement {
        Placement {
            pieces: vec![Piece {
                disk: 0,
                file: offset,
                len: length,
            }],
        }
    }

    fn length(&self) -> u64 {
        self.pieces.iter().map(|p| p.len).sum()
    }

    /// The disk's bytes `[offset, offset + len)` as the file holds them.
    fn read(&self, path: &Path, offset: u64, len: usize) -> Vec<u8> {
        let end = offset + len as u64;
        let mut out = Vec::with_capacity(len);
        for p in &self.pieces {
            let (lo, hi) = (offset.max(p.disk), end.min(p.disk + p.len));
            if lo < hi {
                out.extend(read_at(path, p.file + (lo - p.disk), (hi - lo) as usize));
            }
        }
        assert_eq!(out.len(), len, "{offset}+{len} outside the disk");
        out
    }
}

/// Each disk of the LUN at `lun`, placed by the LUN's own disk views.
fn disk_placements(lun: &Path) -> Vec<Placement> {
    let l = lun_manager::Lun::open(lun, lun_manager::Access::ReadOnly)
        .unwrap_or_else(|e| panic!("open {}: {e}", lun.display()));
    l.disks()
        .iter()
        .map(|r| {
            let v = l.disk_view(r.index).expect("a disk's view");
            let pieces = v.pieces(0, r.length).expect("the whole disk");
            Placement {
                pieces: pieces
                    .iter()
                    .map(|p| Piece {
                        disk: p.disk,
                        file: p.at,
                        len: p.len,
                    })
                    .collect(),
            }
        })
        .collect()
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {len} bytes at {offset} of {}: {e}", path.display()));
    buf
}

fn region_digest(path: &Path, disk: &Placement) -> [u8; 32] {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in &disk.pieces {
        let mut done = 0u64;
        while done < p.len {
            let n = (p.len - done).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], p.file + done)
                .unwrap_or_else(|e| panic!("read {} at {}: {e}", path.display(), p.file + done));
            h.update(&buf[..n]);
            done += n as u64;
        }
    }
    *h.finalize().as_bytes()
}

fn sha256_file(path: &Path) -> String {
    let out = run_ok(Command::new(require_tool("sha256sum")).arg(path));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sha256sum {} printed nothing", path.display()))
        .to_string()
}

fn seq_text() -> String {
    (1..=200_000).map(|i| format!("{i}\n")).collect()
}

/// Panics with the console log unless the guest finished `phase` cleanly.
fn assert_boot_finished(what: &str, b: &Boot, phase: u32) {
    let r = &b.results;
    assert!(
        r.failures.is_empty() && r.repeated.is_empty(),
        "{what}: guest reported failures {:?} / repeated results {:?}\nconsole:\n{}",
        r.failures,
        r.repeated,
        b.console
    );
    assert_eq!(
        r.get("done"),
        Some(phase.to_string().as_str()),
        "{what}: guest did not finish phase {phase} (qemu {})\nconsole:\n{}",
        b.status,
        b.console
    );
    assert!(
        b.status.success(),
        "{what}: qemu exited with {}\nconsole:\n{}",
        b.status,
        b.console
    );
}

fn assert_results(what: &str, b: &Boot, expected: &BTreeMap<String, String>) {
    assert_eq!(
        &b.results.values, expected,
        "{what}: guest results differ from the expected ones\nconsole:\n{}",
        b.console
    );
}

/// What the host reads back through NBD: the export copied out with
/// `qemu-img convert`, and its partition split off for the e2fsprogs tools.
struct Exported {
    image: Vec<u8>,
    part: PathBuf,
}

/// Copies the export out, compares it with the file where the disk lives
/// (and, past `same_from`, with the file at the very same offsets), and
/// checks the guest's filesystem with e2fsprogs.
fn export_and_check(
    uri: &str,
    lun: &Path,
    disk: &Placement,
    same_from: Option<u64>,
    dir: &Path,
    tag: &str,
) -> Exported {
    let img = dir.join(format!("{tag}-export.img"));
    run_ok(
        Command::new(require_tool("qemu-img"))
            .args(["convert", "-f", "raw", "-O", "raw", uri])
            .arg(&img),
    );
    let image = fs::read(&img).unwrap_or_else(|e| panic!("read {}: {e}", img.display()));
    fs::remove_file(&img).ok();
    let length = disk.length();
    assert_eq!(
        image.len() as u64,
        length,
        "{tag}: {uri} copied out {} bytes, the disk is {length}",
        image.len(),
    );
    let region = disk.read(lun, 0, length as usize);
    if let Some(at) = image.iter().zip(&region).position(|(a, b)| a != b) {
        panic!(
            "{tag}: byte {at} of {uri} differs from where {} keeps it ({:?})",
            lun.display(),
            disk.pieces
        );
    }
    if let Some(from) = same_from {
        // Every guest block past the shadowed range is the LUN block of
        // the same number.
        let file = read_at(lun, from, (length - from) as usize);
        if let Some(at) = image[from as usize..]
            .iter()
            .zip(&file)
            .position(|(a, b)| a != b)
        {
            panic!(
                "{tag}: guest byte {} is not at the same offset of {}",
                from + at as u64,
                lun.display()
            );
        }
    }

    let sectors = length / 512;
    let start = (PART_START * 512) as usize;
    let end = ((sectors - TAIL_GAP) * 512) as usize;
    let part = dir.join(format!("{tag}-part.img"));
    fs::write(&part, &image[start..end])
        .unwrap_or_else(|e| panic!("write {}: {e}", part.display()));

    let blkid = run_ok(
        Command::new(require_tool("blkid"))
            .args(["-p", "-o", "export"])
            .arg(&part),
    );
    let blkid = String::from_utf8_lossy(&blkid.stdout);
    assert!(
        blkid.lines().any(|l| l == "TYPE=ext2") && blkid.lines().any(|l| l == "LABEL=lungate-vm"),
        "{tag}: blkid does not see the guest's ext2 filesystem on partition 1:\n{blkid}"
    );
    let fsck = run_ok(Command::new(require_tool("e2fsck")).arg("-fn").arg(&part));
    let fsck_out = String::from_utf8_lossy(&fsck.stdout);
    assert!(
        fsck_out.contains("lungate-vm:"),
        "{tag}: e2fsck did not check the lungate-vm filesystem:\n{fsck_out}"
    );
    Exported { image, part }
}

/// `debugfs -R "cat PATH"` on a filesystem image.
fn debugfs_cat(part: &Path, file: &str) -> Vec<u8> {
    run_ok(
        Command::new(require_tool("debugfs"))
            .arg("-R")
            .arg(format!("cat {file}"))
            .arg(part),
    )
    .stdout
}

/// Panics unless sector 0 of the disk (at the region's offset in the LUN
/// file) holds the guest's MBR with one Linux partition where the guest
/// put it.
fn assert_mbr(sector: &[u8], disk_len: u64, tag: &str) {
    assert_eq!(
        &sector[510..512],
        &[0x55, 0xAA],
        "{tag}: no MBR signature at byte 510 of the disk region: {}",
        hex(&sector[446..512])
    );
    let entry = &sector[446..462];
    let le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64;
    assert_eq!(entry[4], 0x83, "{tag}: partition 1 type: {}", hex(entry));
    assert_eq!(le(&entry[8..12]), PART_START, "{tag}: partition 1 start");
    assert_eq!(
        le(&entry[12..16]),
        disk_len / 512 - PART_START - TAIL_GAP,
        "{tag}: partition 1 length in sectors"
    );
    assert!(
        sector[462..510].iter().all(|&b| b == 0),
        "{tag}: partitions 2-4 are not empty: {}",
        hex(&sector[462..510])
    );
}

/// The kernel, the initramfs built for it, and the temp dir holding it and
/// the files the host extracts.
struct Guest {
    kernel: Kernel,
    initrd: PathBuf,
    work: tempfile::TempDir,
}

impl Guest {
    /// Checks every tool the test needs (naming scripts/setup if one is
    /// missing) and builds the initramfs.
    fn prepare(tag: &str) -> Guest {
        for tool in [
            "qemu-system-x86_64",
            "qemu-img",
            "blkid",
            "debugfs",
            "e2fsck",
            "sha256sum",
        ] {
            require_tool(tool);
        }
        let kernel = Kernel::find();
        let work = tempfile::Builder::new()
            .prefix("lungate-vm-")
            .tempdir()
            .expect("create vm temp dir");
        let initrd = initramfs::build(work.path(), &kernel);
        eprintln!(
            "vm {tag}: kernel {} with modules {:?} (built in: {:?})",
            kernel.release, initrd.modules, initrd.builtin
        );
        Guest {
            kernel,
            initrd: initrd.path,
            work,
        }
    }

    fn boot(&self, tag: &str, uri: &str, size: u64, phase: u32) -> Boot {
        let b = qemu::boot(&self.kernel.image, &self.initrd, uri, size, phase);
        eprintln!(
            "vm {tag}: boot {phase} ({uri}) took {:.1} s",
            b.elapsed.as_secs_f64()
        );
        assert_boot_finished(&format!("{tag} boot {phase}"), &b, phase);
        b
    }
}

/// Where the guest's disk comes from.
struct Target<'a> {
    /// Names the run in messages ("offset", "truncate", "qemu-nbd").
    tag: &'a str,
    /// The file that holds the disk, and where in it.
    backing: &'a Path,
    disk: Placement,
    /// From this disk offset on, every disk byte sits at the same offset
    /// of `backing` (the aligned layout: past the shadowed first MiB).
    same_from: Option<u64>,
    /// NBD URIs of the disk for boot 1 and boot 2.
    uris: [String; 2],
    /// Panics unless every byte of `backing` outside the disk is as it was
    /// and the server still runs; called after each boot.
    assert_outside_unchanged: &'a mut dyn FnMut(&str),
}

/// Boot 1: the guest checks the disk size and its end, partitions it,
/// makes an ext2 filesystem and writes files; the host then finds the
/// partition table, the tail marker and the files in the backing file and
/// through NBD. Boot 2: the guest mounts the filesystem, verifies every file
/// and writes one more; the host checks that one and runs e2fsck.
fn guest_round_trip(guest: &Guest, t: Target<'_>) {
    let tag = t.tag;
    let size = t.disk.length();
    let sectors = size / 512;
    let common = |phase: u32| -> BTreeMap<String, String> {
        [
            ("phase", phase.to_string()),
            ("size", size.to_string()),
            ("last_read", "512".to_string()),
            ("pastend_read", "0".to_string()),
            ("part_start", PART_START.to_string()),
            (
                "part_sectors",
                (sectors - PART_START - TAIL_GAP).to_string(),
            ),
            ("done", phase.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };

    let b1 = guest.boot(tag, &t.uris[0], size, 1);
    (t.assert_outside_unchanged)(&format!("{tag} after boot 1"));

    let sector0 = t.disk.read(t.backing, 0, 512);
    assert_mbr(&sector0, size, &format!("{tag} after boot 1"));
    let tail = t.disk.read(t.backing, size - 512, 512);
    let marker = format!("LUNGATE-TAIL size={size}\n");
    assert!(
        tail.starts_with(marker.as_bytes()) && tail[marker.len()..].iter().all(|&b| b == 0),
        "{tag}: the last sector of the disk in {} does not hold the guest's tail marker: {:?}",
        t.backing.display(),
        String::from_utf8_lossy(&tail)
    );

    let dir = guest.work.path();
    let ex = export_and_check(
        &t.uris[0],
        t.backing,
        &t.disk,
        t.same_from,
        dir,
        &format!("{tag}-1"),
    );
    assert_eq!(
        &ex.image[..512],
        &sector0[..],
        "{tag}: sector 0 through NBD and in the file"
    );
    assert_eq!(
        debugfs_cat(&ex.part, "/hello.txt"),
        HELLO.as_bytes(),
        "{tag}: hello.txt"
    );
    let seq = debugfs_cat(&ex.part, "/seq.txt");
    assert!(
        seq == seq_text().as_bytes(),
        "{tag}: seq.txt as the host reads it differs ({} bytes)",
        seq.len()
    );
    let files = dir.join(format!("{tag}-files"));
    fs::create_dir(&files).expect("create files dir");
    let mut sums = BTreeMap::new();
    for (file, content) in [("hello.txt", HELLO.as_bytes().to_vec()), ("seq.txt", seq)] {
        let p = files.join(file);
        fs::write(&p, content).expect("write extracted file");
        sums.insert(format!("sum.{file}"), sha256_file(&p));
    }
    let random = files.join("random.bin");
    run_ok(
        Command::new(require_tool("debugfs"))
            .arg("-R")
            .arg(format!("dump /random.bin {}", random.display()))
            .arg(&ex.part),
    );
    let random_len = fs::metadata(&random).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        random_len,
        4 << 20,
        "{tag}: random.bin as the host reads it"
    );
    sums.insert("sum.random.bin".to_string(), sha256_file(&random));

    let mut expected = common(1);
    expected.extend(sums.clone());
    for (k, v) in [
        ("start_nonzero", "0"),
        ("pastend_write", "refused"),
        ("tail", "written"),
        ("discard", "ok"),
        ("mkfs", "ext2"),
        ("files", "written"),
    ] {
        expected.insert(k.to_string(), v.to_string());
    }
    assert_results(&format!("{tag} boot 1"), &b1, &expected);

    let b2 = guest.boot(tag, &t.uris[1], size, 2);
    let mut expected = common(2);
    expected.extend(sums);
    for (k, v) in [
        ("tail", "ok"),
        ("files", "ok"),
        ("fstrim", "ok"),
        ("phase2_write", "ok"),
    ] {
        expected.insert(k.to_string(), v.to_string());
    }
    assert_results(&format!("{tag} boot 2"), &b2, &expected);
    (t.assert_outside_unchanged)(&format!("{tag} after boot 2"));

    let ex = export_and_check(
        &t.uris[1],
        t.backing,
        &t.disk,
        t.same_from,
        dir,
        &format!("{tag}-2"),
    );
    assert_eq!(
        debugfs_cat(&ex.part, "/phase2.txt"),
        b"second boot\n",
        "{tag}: phase2.txt"
    );
    assert_eq!(
        debugfs_cat(&ex.part, "/hello.txt"),
        HELLO.as_bytes(),
        "{tag}: hello.txt after boot 2"
    );
    let ls = run_ok(
        Command::new(require_tool("debugfs"))
            .args(["-R", "ls -p /"])
            .arg(&ex.part),
    );
    // `ls -p` lines are /INODE/MODE/UID/GID/NAME/SIZE/.
    let names: Vec<String> = String::from_utf8_lossy(&ls.stdout)
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .collect();
    for want in ["hello.txt", "seq.txt", "SHA256SUMS", "small", "phase2.txt"] {
        assert!(
            names.iter().any(|n| n == want),
            "{tag}: no {want} in / after boot 2: {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n == "random.bin"),
        "{tag}: random.bin, removed in boot 2, is still in /: {names:?}"
    );
}

/// A LUN with two disks served by lungate; the guest gets disk0, over TCP
/// in boot 1 and over the unix socket in boot 2.
fn lungate_guest_round_trip(layout: &str, name: &str, disks: &[&str]) {
    let guest = Guest::prepare(layout);
    let mut pool = Pool::new();
    // `lunctl create` wants an initialised pool; `pool init` is idempotent,
    // so this stays correct if the harness's Pool::new starts doing it.
    lungate_tests::lunctl(&["pool", "init", pool.arg()]);
    pool.add(name, layout, disks, "16M");
    let lun = pool.lun(name).clone();
    let placed = disk_placements(&lun.path);
    assert_eq!(
        placed.len(),
        disks.len(),
        "disk regions of {}",
        lun.path.display()
    );
    let (disk0, disk1) = (placed[0].clone(), placed[1].clone());
    assert_eq!(disk0.length(), lun.disk_sizes[0], "disk0 length");
    let shadow = lun.shadowed(0);
    let same_from = (shadow > 0).then_some(shadow);
    if shadow > 0 {
        // The LUN's own view says so: past the shadowed range, disk0 is the
        // LUN at the same offsets.
        let rest = disk0.pieces.last().expect("a piece");
        assert!(
            rest.disk == shadow && rest.file == shadow,
            "{:?}",
            disk0.pieces
        );
    }
    let host_gpt = (layout == "aligned").then(|| sfdisk_dump(&lun.path));
    let disk1_before = region_digest(&lun.path, &disk1);

    let mut gw = Gateway::start(&["--pool", pool.arg()]);
    let export = lun.export(0);
    let uris = [gw.uri(&export), gw.unix_uri(&export)];
    let mut outside = |when: &str| {
        gw.assert_running();
        pool.assert_hidden_unchanged();
        assert!(
            region_digest(&lun.path, &disk1) == disk1_before,
            "{when}: disk1 of {} changed, though the guest only had disk0",
            lun.path.display()
        );
    };
    guest_round_trip(
        &guest,
        Target {
            tag: layout,
            backing: &lun.path,
            disk: disk0.clone(),
            same_from,
            uris,
            assert_outside_unchanged: &mut outside,
        },
    );

    gw.stop_ok();
    pool.assert_hidden_unchanged();
    assert_mbr(
        &disk0.read(&lun.path, 0, 512),
        disk0.length(),
        &format!("{layout} at the end"),
    );
    assert!(
        region_digest(&lun.path, &disk1) == disk1_before,
        "{layout}: disk1 of {} changed after the gateway stopped",
        lun.path.display()
    );
    if let Some(before) = host_gpt {
        assert_lungate_gpt_at_lba0(&lun.path, &before);
    }
}

/// `sfdisk --dump` of a LUN file.
fn sfdisk_dump(path: &Path) -> String {
    let out = run_ok(Command::new(require_tool("sfdisk")).arg("--dump").arg(path));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.trim().is_empty(),
        "sfdisk complains about {}: {err}",
        path.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// After the guest partitioned, formatted and wrote its disk twice, the
/// aligned LUN's first sectors still hold lungate's protective MBR and GPT
/// (exactly the table it was created with, both headers valid), with the
/// guest's partition nowhere in it.
fn assert_lungate_gpt_at_lba0(lun: &Path, before: &str) {
    let sector0 = read_at(lun, 0, 512);
    assert_eq!(
        &sector0[510..512],
        &[0x55, 0xAA],
        "protective MBR signature"
    );
    assert_eq!(
        sector0[446 + 4],
        0xEE,
        "LBA 0 holds a protective MBR: {}",
        hex(&sector0[446..462])
    );
    assert_eq!(
        &read_at(lun, 512, 8)[..],
        b"EFI PART",
        "GPT header at LBA 1"
    );
    let now = sfdisk_dump(lun);
    assert_eq!(now, before, "lungate's GPT changed");
    for want in [
        "lungate-label",
        "lungate-state",
        "lungate-disk0",
        "lungate-disk1",
    ] {
        assert!(now.contains(want), "{want} missing from\n{now}");
    }
    assert!(
        !now.contains("type=83"),
        "the guest's Linux partition shows in the LUN's GPT:\n{now}"
    );
    let l = lun_manager::Lun::open(lun, lun_manager::Access::ReadOnly)
        .unwrap_or_else(|e| panic!("open {}: {e}", lun.display()));
    assert!(
        l.warnings().is_empty(),
        "{}: {:?}",
        lun.display(),
        l.warnings()
    );
}

#[test]
fn offset_layout_guest_partitions_formats_and_remounts_disk() {
    lungate_guest_round_trip("offset", "vmoff", &["64M", "32M"]);
}

#[test]
fn truncate_layout_guest_partitions_formats_and_remounts_disk() {
    lungate_guest_round_trip("truncate", "vmtrunc", &["48M", "16M"]);
}

/// The aligned layout: the guest's MBR goes to the shadow area, every
/// other block to the LUN block of the same number, and lungate's GPT at
/// LBA 0 survives the guest's fdisk, mke2fs, discards and writes.
#[test]
fn aligned_layout_guest_partitions_formats_and_remounts_disk() {
    lungate_guest_round_trip("aligned", "vmalgn", &["40M", "16M"]);
}

/// A `qemu-nbd` child, ended by PID when dropped.
struct QemuNbd(std::process::Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The same round trip against QEMU's own NBD server exporting a window of
/// a plain file (1 MiB of pattern, the 32 MiB disk, 1 MiB of pattern): it
/// proves the guest and the host checks themselves, so a failure of the
/// lungate runs above points at lungate.
#[test]
fn reference_qemu_nbd_guest_partitions_formats_and_remounts_disk() {
    let guest = Guest::prepare("qemu-nbd");
    let qemu_nbd = require_tool("qemu-nbd");
    let dir = tempfile::Builder::new()
        .prefix("lungate-vm-ref-")
        .tempdir()
        .expect("create reference temp dir");
    let file = dir.path().join("disk.raw");
    let (offset, length) = (1u64 << 20, 32u64 << 20);
    let disk = Placement::window(offset, length);
    let pad = lungate_tests::pattern_bytes(1 << 20, 0x5eed);
    {
        let f = File::create(&file).expect("create reference file");
        f.write_all_at(&pad, 0).expect("write head pad");
        f.write_all_at(&pad, offset + length)
            .expect("write tail pad");
    }
    let sock = dir.path().join("nbd.sock");
    let child = Command::new(qemu_nbd)
        .args(["--image-opts", "-t", "-x", "ref/disk0", "-k"])
        .arg(&sock)
        .arg(format!(
            "driver=raw,offset={},size={},file.driver=file,file.filename={}",
            offset,
            length,
            file.display()
        ))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    let mut server = QemuNbd(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(s)) = server.0.try_wait() {
            panic!(
                "qemu-nbd exited with {s} before creating {}",
                sock.display()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd did not create {}",
            sock.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///ref/disk0?socket={}", sock.display());
    let mut outside = |when: &str| {
        if let Ok(Some(s)) = server.0.try_wait() {
            panic!("{when}: qemu-nbd exited with {s}");
        }
        let head = read_at(&file, 0, pad.len());
        let tail = read_at(&file, offset + length, pad.len());
        assert!(
            head == pad && tail == pad,
            "{when}: bytes around the qemu-nbd window changed"
        );
    };
    guest_round_trip(
        &guest,
        Target {
            tag: "qemu-nbd",
            backing: &file,
            disk,
            same_from: None,
            uris: [uri.clone(), uri],
            assert_outside_unchanged: &mut outside,
        },
    );
}

/// A real guest keeps writing while its LUN migrates to another gateway
/// (issue 10): QEMU's one NBD connection stays with the source, which
/// forwards it to the target after the switch. The guest writes
/// sequence-numbered 4 KiB blocks with direct I/O, each flushed, and any
/// failed write fails its run; it then reads every block back through the
/// forwarded connection, and the host reads them on the target.
#[test]
fn a_guest_keeps_writing_through_a_live_migration() {
    use lungate_api::nbd::client::{Address, NbdClient};
    const WRITES: u64 = 600;
    let guest = Guest::prepare("migrate");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_s, b_s) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    for p in [a_s, b_s] {
        lungate_tests::lunctl(&["pool", "init", p]);
    }
    lungate_tests::create_lun(a.path(), "vmmig", "offset", &["32M"], "16M");
    let src = Gateway::start(&["--pool", a_s]);
    let dst = Gateway::start(&["--pool", b_s, "--migration-listen", "127.0.0.1:0"]);
    let to = dst
        .stdout_lines()
        .iter()
        .find_map(|l| {
            l.strip_prefix("migration tcp ")
                .map(|a| a.trim().to_string())
        })
        .expect("the target's migration listener");
    let export = "vmmig/disk0";
    let mut run = qemu::spawn(qemu::command_with(
        &guest.kernel.image,
        &guest.initrd,
        &src.uri(export),
        32 << 20,
        3,
        &format!("lungate.writes={WRITES}"),
    ));
    assert!(
        run.wait_for("LUNGATE-RESULT writing=1", qemu::BOOT_TIMEOUT),
        "the guest never started writing:\n{}",
        run.console()
    );
    let out = lungate_tests::lunctl(&["--json", "migrate", "vmmig", "--pool", a_s, "--to", &to]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "migration failed: {stdout}{}\nsource:\n{}\ntarget:\n{}",
        String::from_utf8_lossy(&out.stderr),
        src.stderr_log(),
        dst.stderr_log()
    );
    let at_switch = run.console();
    assert!(
        !at_switch.contains(&format!("written={WRITES}")),
        "the guest finished writing before the migration ended; the test proves nothing"
    );
    let last: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a JSON result");
    assert_eq!(last["phase"], "done", "{last}");
    eprintln!(
        "vm migrate: {} bytes in {} rounds, pause {} us, {} parked",
        last["bytes"], last["rounds"], last["pause_us"], last["parked"]
    );
    let boot = run.finish();
    eprintln!(
        "vm migrate: boot 3 took {:.1} s",
        boot.elapsed.as_secs_f64()
    );
    assert_boot_finished("migrate boot 3", &boot, 3);
    assert_eq!(
        boot.results.get("written"),
        Some(WRITES.to_string().as_str())
    );
    assert_eq!(
        boot.results.get("verified"),
        Some(WRITES.to_string().as_str())
    );
    // The target owns the LUN and holds every block the guest wrote.
    assert!(b.path().join("vmmig.lun").is_file());
    assert!(!a.path().join("vmmig.lun").exists());
    let mut c =
        NbdClient::connect(&Address::Tcp(dst.addr()), export).expect("connect to the target");
    let mut all = vec![0u8; (WRITES * 4096) as usize];
    c.read_at(256 * 4096, &mut all).expect("read on the target");
    for (i, blk) in all.chunks(4096).enumerate() {
        let want = format!("LGSEQ {i:08}\n");
        assert_eq!(
            &blk[..want.len()],
            want.as_bytes(),
            "block {} on the target",
            256 + i
        );
        assert!(
            blk[want.len()..].iter().all(|&x| x == 0),
            "block {} tail",
            256 + i
        );
    }
    let _ = c.disconnect();
    drop(src);
    dst.stop_ok();
}
