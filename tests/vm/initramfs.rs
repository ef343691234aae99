//! The guest of the real-VM test: finds the host's kernel and builds, at
//! test time, an initramfs of busybox-static, the kernel modules the guest
//! needs for a virtio disk, and the guest script `tests/vm/init.sh` as
//! `/init`.
//!
//! The archive is written here as an uncompressed `newc` cpio (the kernel
//! unpacks it as is; skipping gzip also saves the guest a decompression
//! that is slow under TCG). Nothing it builds is committed: it lives in the
//! test's temp dir. It never needs root: device nodes are cpio entries, not
//! files on the host.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use lungate_tests::{require_tool, run_ok};

/// The guest's PID 1.
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// Modules the guest loads, by name; their dependencies come from
/// `modules.dep`, and any of them built into the kernel is left out.
pub const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "ext4"];

/// Busybox applets `/init` runs; the busybox on the host must have them.
const APPLETS: &[&str] = &[
    "sh",
    "mount",
    "umount",
    "insmod",
    "cat",
    "echo",
    "dd",
    "wc",
    "printf",
    "fdisk",
    "mke2fs",
    "seq",
    "mkdir",
    "sha256sum",
    "sync",
    "blockdev",
    "head",
    "tr",
    "cut",
    "usleep",
    "sleep",
    "poweroff",
    "blkdiscard",
    "fstrim",
    "rm",
];

/// A kernel image and the module tree that belongs to it.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    pub release: String,
    pub modules: PathBuf,
}

impl Kernel {
    /// `LUNGATE_VM_KERNEL` if set, else the newest readable
    /// `/boot/vmlinuz-*-cloud-amd64` whose `/lib/modules/<release>` exists.
    /// Panics naming `scripts/setup` if there is none.
    pub fn find() -> Kernel {
        if let Some(image) = std::env::var_os("LUNGATE_VM_KERNEL") {
            let image = PathBuf::from(image);
            return Kernel::from_image(&image)
                .unwrap_or_else(|e| panic!("LUNGATE_VM_KERNEL={}: {e}", image.display()));
        }
        let mut images: Vec<PathBuf> = fs::read_dir("/boot")
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        images.retain(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        });
        images.sort();
        let mut why = Vec::new();
        for image in images.iter().rev() {
            match Kernel::from_image(image) {
                Ok(k) => return k,
                Err(e) => why.push(format!("{}: {e}", image.display())),
            }
        }
        panic!(
            "no usable guest kernel /boot/vmlinuz-*-cloud-amd64 ({}): run scripts/setup \
             (it installs linux-image-cloud-amd64 and makes the image readable)",
            if why.is_empty() {
                "none installed".to_string()
            } else {
                why.join("; ")
            }
        );
    }

    fn from_image(image: &Path) -> Result<Kernel, String> {
        let name = image
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| "not a UTF-8 file name".to_string())?;
        let release = name
            .strip_prefix("vmlinuz-")
            .ok_or_else(|| format!("{name:?} does not start with vmlinuz-"))?
            .to_string();
        fs::File::open(image).map_err(|e| format!("cannot read the image: {e}"))?;
        let modules = Path::new("/lib/modules").join(&release);
        if !modules.join("modules.dep").is_file() {
            return Err(format!("{}/modules.dep is missing", modules.display()));
        }
        Ok(Kernel {
            image: image.to_path_buf(),
            release,
            modules,
        })
    }
}

/// Kernel module names compare with `-` and `_` as the same character.
fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// What `modules.dep` and `modules.builtin` say about a set of modules.
#[derive(Debug, PartialEq, Eq)]
pub struct ModulePlan {
    /// Module files (relative to the module tree) in load order:
    /// every module after all of its dependencies.
    pub load: Vec<String>,
    /// Wanted modules that are built into the kernel.
    pub builtin: Vec<String>,
}

#[derive(Debug)]
pub enum PlanError {
    Unknown(String),
    Malformed { line: usize, text: String },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::Unknown(m) => {
                write!(
                    f,
                    "module {m} is neither in modules.dep nor in modules.builtin"
                )
            }
            PlanError::Malformed { line, text } => {
                write!(f, "modules.dep line {line} has no ':': {text:?}")
            }
        }
    }
}

/// Resolves `wanted` against the text of `modules.dep` and
/// `modules.builtin` into a load order.
pub fn plan_modules(dep: &str, builtin: &str, wanted: &[&str]) -> Result<ModulePlan, PlanError> {
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for (i, line) in dep.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (file, rest) = line.split_once(':').ok_or_else(|| PlanError::Malformed {
            line: i + 1,
            text: line.to_string(),
        })?;
        let Some(name) = module_name(file) else {
            continue;
        };
        let needs = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(name, (file.to_string(), needs));
    }
    let builtins: BTreeSet<String> = builtin.lines().filter_map(module_name).collect();

    let mut plan = ModulePlan {
        load: Vec::new(),
        builtin: Vec::new(),
    };
    let mut seen = BTreeSet::new();
    // Iterative depth-first walk: a module is emitted once all of its
    // dependencies are.
    for want in wanted {
        let want = want.replace('-', "_");
        if builtins.contains(&want) {
            plan.builtin.push(want);
            continue;
        }
        let (file, _) = deps
            .get(&want)
            .ok_or_else(|| PlanError::Unknown(want.clone()))?;
        let mut stack = vec![(file.clone(), false)];
        while let Some((file, expanded)) = stack.pop() {
            if seen.contains(&file) {
                continue;
            }
            if expanded {
                seen.insert(file.clone());
                plan.load.push(file);
                continue;
            }
            let name = module_name(&file).ok_or_else(|| PlanError::Unknown(file.clone()))?;
            let (_, needs) = deps.get(&name).ok_or(PlanError::Unknown(name))?;
            stack.push((file.clone(), true));
            for n in needs.iter().rev() {
                if !seen.contains(n) {
                    stack.push((n.clone(), false));
                }
            }
        }
    }
    Ok(plan)
}

/// A `newc` cpio archive written entry by entry.
pub struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Cpio<W> {
        Cpio {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: {} bytes do not fit a newc entry", data.len()),
            )
        })?;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so the archive is reproducible
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check (only for the crc format)
        ];
        self.ino += 1;
        let mut head = String::from("070701");
        for f in fields {
            head.push_str(&format!("{f:08x}"));
        }
        self.put(head.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, (major, minor), &[])
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The bytes of a module file, decompressed with the host's tool if the
/// distribution ships it compressed (busybox insmod loads plain `.ko`).
fn module_bytes(path: &Path) -> Vec<u8> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
        Some(t) => run_ok(Command::new(require_tool(t)).arg("-dc").arg(path)).stdout,
    }
}

/// True if the ELF file asks for a program interpreter (is dynamically
/// linked); such a busybox cannot run alone in the initramfs.
fn elf_is_dynamic(bin: &[u8]) -> Result<bool, String> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| bin.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        bin.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bin.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if bin.get(..5) != Some(b"\x7fELF\x02") || bin.get(5) != Some(&1) {
        return Err("not a little-endian 64-bit ELF file".into());
    }
    let phoff = u64_at(0x20).ok_or("truncated ELF header")?;
    let phentsize = u16_at(0x36).ok_or("truncated ELF header")? as usize;
    let phnum = u16_at(0x38).ok_or("truncated ELF header")? as usize;
    let phoff = usize::try_from(phoff).map_err(|_| format!("program headers at {phoff}"))?;
    for i in 0..phnum {
        let at = phentsize
            .checked_mul(i)
            .and_then(|o| o.checked_add(phoff))
            .ok_or("program header offset overflows")?;
        let kind = u32_at(at).ok_or_else(|| format!("program header {i} at {at} is truncated"))?;
        if kind == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A built initramfs and what went into it.
#[derive(Debug)]
pub struct Initramfs {
    pub path: PathBuf,
    pub modules: Vec<String>,
    pub builtin: Vec<String>,
}

/// Builds `dir/initramfs.cpio` for `kernel`: busybox as `/bin/busybox` with
/// its applets as symlinks, the modules of [`GUEST_MODULES`] under
/// `/modules` with their load order in `/modules.order`, and `/init`.
pub fn build(dir: &Path, kernel: &Kernel) -> Initramfs {
    let busybox_path = Path::new("/bin/busybox");
    let busybox = fs::read(busybox_path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}: run scripts/setup (busybox-static)",
            busybox_path.display()
        )
    });
    match elf_is_dynamic(&busybox) {
        Ok(false) => {}
        Ok(true) => panic!(
            "{} is dynamically linked and cannot run in the guest: run scripts/setup \
             (it installs busybox-static)",
            busybox_path.display()
        ),
        Err(e) => panic!("{}: {e}", busybox_path.display()),
    }
    let list = run_ok(Command::new(busybox_path).arg("--list")).stdout;
    let have: BTreeSet<&str> = std::str::from_utf8(&list)
        .expect("busybox --list is UTF-8")
        .lines()
        .collect();
    let missing: Vec<_> = APPLETS.iter().filter(|a| !have.contains(*a)).collect();
    assert!(
        missing.is_empty(),
        "{} lacks the applets {missing:?}: run scripts/setup (busybox-static)",
        busybox_path.display()
    );

    let read = |name: &str| {
        let p = kernel.modules.join(name);
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    };
    let plan = plan_modules(
        &read("modules.dep"),
        &read("modules.builtin"),
        GUEST_MODULES,
    )
    .unwrap_or_else(|e| panic!("kernel {}: {e}", kernel.release));

    let path = dir.join("initramfs.cpio");
    let file = fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut cpio = Cpio::new(io::BufWriter::new(file));
    let mut modules = Vec::new();
    let result = (|| -> io::Result<()> {
        for d in ["bin", "dev", "proc", "sys", "mnt", "modules"] {
            cpio.dir(d)?;
        }
        // The kernel opens /dev/console for init's stdio before init mounts
        // devtmpfs.
        cpio.char_dev("dev/console", 0o600, 5, 1)?;
        cpio.file("bin/busybox", 0o755, &busybox)?;
        for applet in &have {
            if *applet != "busybox" && !applet.contains('/') {
                cpio.symlink(&format!("bin/{applet}"), "busybox")?;
            }
        }
        let mut order = String::new();
        for file in &plan.load {
            let name = module_name(file).expect("planned modules have module names");
            let ko = format!("{name}.ko");
            cpio.file(
                &format!("modules/{ko}"),
                0o644,
                &module_bytes(&kernel.modules.join(file)),
            )?;
            order.push_str(&ko);
            order.push('\n');
            modules.push(name);
        }
        cpio.file("modules.order", 0o644, order.as_bytes())?;
        cpio.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
        Ok(())
    })();
    result
        .and_then(|()| cpio.finish().map(drop))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    Initramfs {
        path,
        modules,
        builtin: plan.builtin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";
    const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n";

    #[test]
    fn plan_loads_every_dependency_before_its_user_and_each_once() {
        let plan = plan_modules(DEP, BUILTIN, &["virtio_pci", "virtio-blk", "ext4"]).unwrap();
        assert_eq!(plan.builtin, vec!["ext4".to_string()]);
        let names: Vec<String> = plan.load.iter().map(|f| module_name(f).unwrap()).collect();
        assert_eq!(
            names,
            [
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_ring",
                "virtio",
                "virtio_pci",
                "virtio_blk"
            ]
        );
        assert_eq!(plan.load[5], "kernel/drivers/block/virtio_blk.ko.xz");
    }

    #[test]
    fn plan_names_a_module_the_kernel_does_not_have() {
        let e = plan_modules(DEP, BUILTIN, &["virtio_scsi"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "module virtio_scsi is neither in modules.dep nor in modules.builtin"
        );
        let e = plan_modules("garbage line\n", "", &["x"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "modules.dep line 1 has no ':': \"garbage line\""
        );
    }

    #[test]
    fn elf_check_tells_static_from_dynamic_and_rejects_garbage() {
        assert_eq!(elf_is_dynamic(&fs::read("/bin/sh").unwrap()), Ok(true));
        assert!(elf_is_dynamic(b"#!/bin/sh\n").is_err());
        // A header that claims program headers past its end.
        let mut h = vec![0u8; 64];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        h[0x20] = 200;
        h[0x36] = 56;
        h[0x38] = 1;
        assert!(elf_is_dynamic(&h).is_err());
    }

    /// The archive is read back by the real `cpio` tool.
    #[test]
    fn cpio_archive_lists_back_with_gnu_cpio() {
        let mut c = Cpio::new(Vec::new());
        c.dir("bin").unwrap();
        c.file("bin/odd", 0o755, b"12345").unwrap();
        c.symlink("bin/sh", "busybox").unwrap();
        c.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let bytes = c.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        fs::write(&archive, &bytes).unwrap();
        let out = run_ok(Command::new("sh").arg("-c").arg(format!(
            "{} -itv < {}",
            require_tool("cpio").display(),
            archive.display()
        )));
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 4, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" bin"),
            "{listing}"
        );
        assert!(
            lines[1].starts_with("-rwxr-xr-x") && lines[1].contains(" 5 "),
            "{listing}"
        );
        assert!(lines[1].ends_with(" bin/odd"), "{listing}");
        assert!(lines[2].starts_with("lrwxrwxrwx") && lines[2].ends_with("bin/sh -> busybox"));
        assert!(
            lines[3].starts_with("crw-------") && lines[3].contains("5,"),
            "{listing}"
        );
    }
}
