//! `lunctl`: provision, inspect, resize and scan lungate LUNs, and take,
//! list, revert, delete, clone, flatten and diff their snapshots.
//!
//! Parses arguments, calls the `lun_manager` library, prints. Human output by
//! default, `--json` on every read command. Exit codes: 0 success, 1 the
//! operation failed (the message says why), 2 bad command line.
//!
//! Snapshot commands run in one of two modes, chosen per LUN by
//! [`owner::probe`]: *direct* (this process edits the files while holding
//! the LUN's flock) or *gateway* (a running lungate holds the LUN: the
//! operation goes to its control API). Anything else holding the LUN is
//! refused with who it is.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lun_manager::format::state::{Identity, RecordType, SecondaryDisks, SnapshotTree};
use lun_manager::group::Group;
use lun_manager::lun::Found;
use lun_manager::owner::{self, Probe};
use lun_manager::size::{human, parse_size};
use lun_manager::{pool, progress, report, scan, Access, CreateSpec, Layout, Lun};
use lungate_api::client as control;
use lungate_api::types as wire;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "lunctl",
    version,
    about = "Provision and inspect lungate VM LUNs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage pools (directories of LUN files)
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Create a VM LUN in a pool, or on a file or block device with --path
    Create(CreateArgs),
    /// Create a VM LUN whose disk0 is a copy of a raw disk image
    Import(ImportArgs),
    /// Show a LUN's regions, sizes, identity, state records and checksums
    Inspect {
        #[command(flatten)]
        lun: LunRef,
        #[arg(long)]
        json: bool,
    },
    /// List the LUNs in a pool
    List {
        #[arg(long, value_name = "DIR")]
        pool: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Grow a disk (or add the next one) or the state region, keeping all data
    Resize {
        #[command(flatten)]
        lun: LunRef,
        /// N=SIZE: grow disk N to SIZE (N = number of disks adds a disk)
        #[arg(long, value_name = "N=SIZE", conflicts_with = "memory")]
        disk: Vec<String>,
        /// New guest memory size; grows the state region to hold it
        #[arg(long, value_name = "SIZE")]
        memory: Option<String>,
    },
    /// Record SECONDARY_LUN as a secondary disk of LUN (by UUID)
    AttachSecondary {
        /// The VM's LUN (path, or name with --pool)
        lun: String,
        /// The secondary disk's LUN (path, or name with --pool)
        secondary: String,
        #[arg(long, value_name = "DIR")]
        pool: Option<PathBuf>,
    },
    /// Delete a LUN (removes the file; wipes the label of a block device)
    Delete {
        #[command(flatten)]
        lun: LunRef,
        /// Confirm: the LUN and every byte in it are destroyed
        #[arg(long)]
        yes: bool,
    },
    /// Take a snapshot of the whole LUN (disks and state) named SNAP
    Snapshot {
        #[command(flatten)]
        lun: LunRef,
        snap: String,
        #[arg(long, value_name = "TEXT", default_value = "")]
        description: String,
    },
    /// Show a LUN's snapshots as a tree
    Snapshots {
        #[command(flatten)]
        lun: LunRef,
        #[arg(long)]
        json: bool,
    },
    /// Throw away everything written since snapshot SNAP and continue from it
    Revert {
        #[command(flatten)]
        lun: LunRef,
        snap: String,
    },
    /// Delete snapshot SNAP (other snapshots and clones keep their data)
    DeleteSnapshot {
        #[command(flatten)]
        lun: LunRef,
        snap: String,
    },
    /// Make NEW_NAME.lun next to LUN, a new VM starting from snapshot SNAP
    Clone {
        #[command(flatten)]
        lun: LunRef,
        snap: String,
        new_name: String,
    },
    /// Copy everything a clone reads from shared layers into its own, so
    /// it depends on no other LUN (resumes where an interrupted run stopped)
    Flatten {
        #[command(flatten)]
        lun: LunRef,
    },
    /// List what changed between snapshot FROM and snapshot TO (default:
    /// the live LUN), or write it as a diff file with --out
    Diff {
        #[command(flatten)]
        lun: LunRef,
        from: String,
        to: Option<String>,
        #[arg(long, conflicts_with = "out")]
        json: bool,
        /// Write a diff file (apply it with apply-diff)
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Apply a diff file written by `diff --out` to LUN
    ApplyDiff {
        #[command(flatten)]
        lun: LunRef,
        file: PathBuf,
    },
    /// Space used by each layer of the LUN
    Usage {
        #[command(flatten)]
        lun: LunRef,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a LUN's lost snapshot manifest from its layers' headers
    /// (the LUN is refused until then; see docs/volumes.md)
    Repair {
        #[command(flatten)]
        lun: LunRef,
        #[arg(long)]
        json: bool,
    },
    /// Find VM LUNs in pool directories, files and block devices
    Scan {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Also write a self-contained HTML report to FILE
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Create a pool directory (or adopt an existing directory)
    Init { dir: PathBuf },
}

#[derive(Args)]
struct CreateArgs {
    /// VM name (letters, digits, '.', '_', '-'); exports are NAME/disk0…
    name: String,
    /// Pool directory; the LUN becomes DIR/NAME.lun
    #[arg(long, value_name = "DIR", required_unless_present = "path")]
    pool: Option<PathBuf>,
    /// Create at this file or block device path instead of in a pool
    #[arg(long, value_name = "PATH", conflicts_with = "pool")]
    path: Option<PathBuf>,
    /// Disk size (repeat for more disks), e.g. 20G
    #[arg(long, required = true, value_name = "SIZE")]
    disk: Vec<String>,
    /// Guest memory, e.g. 2G; sizes the hidden state region
    #[arg(long, value_name = "SIZE")]
    memory: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, default_value = "offset")]
    layout: Layout,
    /// Cluster size of the copy-on-write volume (snapshots, clones): a
    /// power of two from 4K to 2M; fixed at creation
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    cluster_size: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ImportArgs {
    /// The raw disk image (a file or block device; read, never changed)
    image: PathBuf,
    /// VM name (letters, digits, '.', '_', '-'); exports are NAME/disk0…
    name: String,
    /// Pool directory; the LUN becomes DIR/NAME.lun
    #[arg(long, value_name = "DIR", required_unless_present = "path")]
    pool: Option<PathBuf>,
    /// Create at this file or block device path instead of in a pool
    #[arg(long, value_name = "PATH", conflicts_with = "pool")]
    path: Option<PathBuf>,
    /// Size of disk0 (default: the image's, rounded up to 1M)
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    /// More disks after the imported disk0 (repeat), e.g. 20G
    #[arg(long, value_name = "SIZE")]
    disk: Vec<String>,
    /// Guest memory, e.g. 2G; sizes the hidden state region
    #[arg(long, value_name = "SIZE")]
    memory: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// aligned keeps every block of the image at its own offset but the first MiB
    #[arg(long, default_value = "offset")]
    layout: Layout,
    /// Cluster size of the copy-on-write volume: a power of two from 4K to 2M
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    cluster_size: String,
    #[arg(long)]
    json: bool,
}

/// A LUN named by path, or by VM name with --pool.
#[derive(Args)]
struct LunRef {
    /// LUN path, or VM name with --pool
    lun: String,
    #[arg(long, value_name = "DIR")]
    pool: Option<PathBuf>,
}

impl LunRef {
    fn path(&self) -> Result<PathBuf, String> {
        resolve(&self.lun, self.pool.as_deref())
    }
}

fn resolve(lun: &str, pool: Option<&Path>) -> Result<PathBuf, String> {
    match pool {
        Some(dir) if !lun.contains('/') => {
            let p = pool::lun_path(dir, lun);
            if !p.exists() {
                return Err(format!("no LUN named {lun:?} in pool {}", dir.display()));
            }
            Ok(p)
        }
        _ => Ok(PathBuf::from(lun)),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lunctl: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The flock for a direct edit, refusing a LUN something else holds (a
/// gateway included: these commands have no control API route).
fn lock(path: &Path) -> Result<owner::FileLock, String> {
    owner::lock(path).map_err(|e| e.to_string())
}

fn size(s: &str, what: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| format!("{what}: {e}"))
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Pool {
            cmd: PoolCmd::Init { dir },
        } => {
            pool::init(&dir).map_err(|e| e.to_string())?;
            println!("pool {} ready", dir.display());
        }
        Cmd::Create(a) => create(a)?,
        Cmd::Import(a) => import(a)?,
        Cmd::Inspect { lun, json } => inspect(&lun.path()?, json)?,
        Cmd::List { pool: dir, json } => list(&dir, json)?,
        Cmd::Resize { lun, disk, memory } => {
            let path = lun.path()?;
            if disk.is_empty() && memory.is_none() {
                return Err("resize needs --disk N=SIZE or --memory SIZE".into());
            }
            let _lock = lock(&path)?;
            let mut l = Lun::open(&path, Access::ReadWrite).map_err(|e| e.to_string())?;
            for d in &disk {
                let (n, s) = d
                    .split_once('=')
                    .ok_or_else(|| format!("--disk {d:?}: expected N=SIZE, e.g. 0=40G"))?;
                let n: u32 = n
                    .parse()
                    .map_err(|_| format!("--disk {d:?}: {n:?} is not a disk number"))?;
                let s = size(s, "--disk")?;
                l.resize_disk(n, s).map_err(|e| e.to_string())?;
                println!("disk{n} is now {}", human(l.disks()[n as usize].length));
            }
            if let Some(m) = memory {
                let m = size(&m, "--memory")?;
                l.resize_memory(m).map_err(|e| e.to_string())?;
                println!(
                    "memory is now {} (state region {})",
                    human(m),
                    human(l.label().state_region().length)
                );
            }
        }
        Cmd::AttachSecondary {
            lun,
            secondary,
            pool,
        } => {
            let p = resolve(&lun, pool.as_deref())?;
            let s = resolve(&secondary, pool.as_deref())?;
            let other = Lun::open(&s, Access::ReadOnly).map_err(|e| e.to_string())?;
            let _lock = lock(&p)?;
            let mut l = Lun::open(&p, Access::ReadWrite).map_err(|e| e.to_string())?;
            l.attach_secondary(&other).map_err(|e| e.to_string())?;
            println!(
                "attached {} ({}) to {} as a secondary disk",
                other.name(),
                other.uuid(),
                l.name()
            );
        }
        Cmd::Delete { lun, yes } => {
            let path = lun.path()?;
            if !yes {
                return Err(format!(
                    "refusing to delete {} without --yes (every byte in it is destroyed)",
                    path.display()
                ));
            }
            let lock = lock(&path)?;
            let l = Lun::open(&path, Access::ReadWrite).map_err(|e| e.to_string())?;
            let name = l.name().to_string();
            // Refused while clones read its snapshots; removes its layers.
            l.delete().map_err(|e| e.to_string())?;
            drop(lock);
            println!("deleted {name} ({})", path.display());
        }
        Cmd::Snapshot {
            lun,
            snap,
            description,
        } => snapshot(&lun.path()?, &snap, &description)?,
        Cmd::Snapshots { lun, json } => snapshots(&lun.path()?, json)?,
        Cmd::Revert { lun, snap } => revert(&lun.path()?, &snap)?,
        Cmd::DeleteSnapshot { lun, snap } => delete_snapshot(&lun.path()?, &snap)?,
        Cmd::Clone {
            lun,
            snap,
            new_name,
        } => clone(&lun.path()?, &snap, &new_name)?,
        Cmd::Flatten { lun } => flatten(&lun.path()?)?,
        Cmd::Diff {
            lun,
            from,
            to,
            json,
            out,
        } => diff(&lun.path()?, &from, to.as_deref(), json, out.as_deref())?,
        Cmd::ApplyDiff { lun, file } => apply_diff(&lun.path()?, &file)?,
        Cmd::Usage { lun, json } => usage(&lun.path()?, json)?,
        Cmd::Repair { lun, json } => repair(&lun.path()?, json)?,
        Cmd::Scan { paths, json, html } => {
            let r = scan::scan(&paths);
            if let Some(f) = html {
                std::fs::write(&f, report::html(&r))
                    .map_err(|e| format!("{}: {e}", f.display()))?;
            }
            if json {
                println!("{}", report::json(&r));
            } else {
                print!("{}", report::table(&r));
            }
        }
    }
    Ok(())
}

/// Where a new LUN named `name` goes (`--pool` or `--path`), refusing a
/// name the pool already has.
fn new_lun_path(name: &str, pool: Option<&Path>, path: Option<&Path>) -> Result<PathBuf, String> {
    let Some(dir) = pool else {
        return Ok(path.expect("clap requires --pool or --path").to_path_buf());
    };
    pool::require(dir).map_err(|e| e.to_string())?;
    lun_manager::format::validate_name(name)?;
    if let Some(path) = pool::find_vm(dir, name).map_err(|e| e.to_string())? {
        return Err(lun_manager::Error::NameTaken {
            pool: dir.to_path_buf(),
            name: name.to_string(),
            path,
        }
        .to_string());
    }
    Ok(pool::lun_path(dir, name))
}

fn cluster_size_arg(s: &str) -> Result<u32, String> {
    let cs = size(s, "--cluster-size")?;
    u32::try_from(cs)
        .ok()
        .filter(|&c| c != 0 && lun_manager::format::label::valid_cluster_size(c))
        .ok_or_else(|| format!("--cluster-size {s}: must be a power of two from 4K to 2M"))
}

fn import(a: ImportArgs) -> Result<(), String> {
    use lun_manager::import;
    let path = new_lun_path(&a.name, a.pool.as_deref(), a.path.as_deref())?;
    let image_len = std::fs::File::open(&a.image)
        .and_then(|f| lungate_block::sys::backing_size(&f))
        .map_err(|e| format!("{}: {e}", a.image.display()))?;
    let fits = import::disk_size_for(a.layout, image_len)
        .ok_or_else(|| format!("{}: {image_len} bytes is too large", a.image.display()))?;
    let disk0 = match &a.size {
        Some(s) => size(s, "--size")?.max(fits),
        None => fits,
    };
    let mut disks = vec![disk0];
    for d in &a.disk {
        disks.push(size(d, "--disk")?);
    }
    let spec = CreateSpec {
        name: a.name.clone(),
        disks,
        memory: size(&a.memory, "--memory")?,
        vcpus: a.vcpus,
        layout: a.layout,
        cluster_size: cluster_size_arg(&a.cluster_size)?,
    };
    let (lun, done) = import::import_raw(&a.image, &path, &spec).map_err(|e| e.to_string())?;
    if a.json {
        let mut v = describe(&lun);
        v["imported"] = json!({
            "image": a.image.display().to_string(),
            "image_bytes": done.image_len,
            "copied_bytes": done.copied,
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(());
    }
    println!(
        "imported {} ({}, {} of data) as disk0 of {} ({}, {} layout) at {}",
        a.image.display(),
        human(done.image_len),
        human(done.copied),
        lun.name(),
        lun.uuid(),
        lun.layout(),
        path.display()
    );
    for d in lun.disks() {
        println!(
            "  disk{}: {} export {}/disk{}",
            d.index,
            human(d.length),
            lun.name(),
            d.index
        );
    }
    Ok(())
}

fn create(a: CreateArgs) -> Result<(), String> {
    let path = new_lun_path(&a.name, a.pool.as_deref(), a.path.as_deref())?;
    let disks = a
        .disk
        .iter()
        .map(|d| size(d, "--disk"))
        .collect::<Result<Vec<_>, _>>()?;
    let spec = CreateSpec {
        name: a.name.clone(),
        disks,
        memory: size(&a.memory, "--memory")?,
        vcpus: a.vcpus,
        layout: a.layout,
        cluster_size: cluster_size_arg(&a.cluster_size)?,
    };
    let lun = Lun::create(&path, &spec).map_err(|e| e.to_string())?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&describe(&lun)).expect("json")
        );
    } else {
        println!(
            "created {} ({}, {} layout) at {}",
            lun.name(),
            lun.uuid(),
            lun.layout(),
            path.display()
        );
        for d in lun.disks() {
            println!(
                "  disk{}: {} export {}/disk{}",
                d.index,
                human(d.length),
                lun.name(),
                d.index
            );
        }
    }
    Ok(())
}

/// Everything `inspect --json` shows.
fn describe(l: &Lun) -> serde_json::Value {
    let label = l.label();
    let ident: Option<Identity> = l.record_json(RecordType::Identity, 0).ok().flatten();
    let tree: Option<SnapshotTree> = l.record_json(RecordType::SnapshotTree, 0).ok().flatten();
    let sec: Option<SecondaryDisks> = l.record_json(RecordType::SecondaryDisks, 0).ok().flatten();
    let records: Vec<_> = l
        .directory()
        .entries
        .iter()
        .map(|e| {
            let checksum = match l.record(e.rtype, e.instance) {
                Ok(_) => "ok".to_string(),
                Err(x) => x.to_string(),
            };
            json!({
                "type": e.rtype.name(),
                "instance": e.instance,
                "offset": e.offset,
                "length": e.length,
                "checksum": checksum,
            })
        })
        .collect();
    json!({
        "path": l.path().display().to_string(),
        "name": l.name(),
        "uuid": l.uuid().to_string(),
        "layout": l.layout(),
        "cluster_size": l.label().volume_cluster_size(),
        "lun_size": label.lun_size,
        "backing_size": l.backing_size(),
        "block_device": l.is_block_device(),
        "generation": label.generation,
        "label_slot": l.label_slot(),
        "created": label.created,
        "updated": label.updated,
        "label_checksum": match l.found() { Found::Normal => "ok".to_string(), Found::OneSlot(w) => format!("ok (other slot: {w})"), Found::Recovered(w) => format!("recovered: {w}") },
        "regions": label.regions,
        "shadow": shadow(l),
        "hardware": l.hardware().ok(),
        "identity": ident,
        "secondaries": sec,
        "snapshots": tree,
        "state": {
            "directory_generation": l.directory().generation,
            "used": l.directory().used_bytes(),
            "size": label.state_region().length,
            "records": records,
        },
        "warnings": l.warnings(),
    })
}

/// The aligned layout's shadowed range: which disk bytes live where.
fn shadow(l: &Lun) -> Option<serde_json::Value> {
    match l.disk_view(0)? {
        lungate_block::region::View::Aligned(m) => Some(json!({
            "disk": 0,
            "length": m.shadow_len(),
            "lun_offset": m.shadow_at(),
        })),
        lungate_block::region::View::Window { .. } => None,
    }
}

/// Rebuild the manifest under the LUN's lock, then open the LUN as a
/// gateway would, to show it is whole again.
fn repair(path: &Path, as_json: bool) -> Result<(), String> {
    use lungate_block::volume::{repair, VolumeOptions};
    let _lock = lock(path)?;
    let label = Lun::probe_label(path).map_err(|e| e.to_string())?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let cfg = lun_manager::lun::volume_config(
        path,
        std::sync::Arc::new(file),
        &label,
        VolumeOptions {
            cluster_size: label.volume_cluster_size(),
            read_only: false,
        },
    );
    let r =
        repair::rebuild_manifest(&cfg, &|p| Lun::probe_uuid(p).ok()).map_err(|e| e.to_string())?;
    let l = Lun::open(path, Access::ReadWrite)
        .map_err(|e| format!("manifest rebuilt, but the LUN still does not open: {e}"))?;
    let snaps = l.volume().snapshots().len();
    drop(l);
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("report serialises")
        );
        return Ok(());
    }
    println!(
        "rebuilt {} from {} layer(s): live layer {}, {snaps} snapshot(s): {}",
        r.dir.display(),
        r.layers,
        r.top,
        r.snapshots.join(", ")
    );
    if !r.recovered.is_empty() {
        println!(
            "named layers that had no snapshot name: {} (revert to them, or delete them with delete-snapshot)",
            r.recovered.join(", ")
        );
    }
    for p in &r.left_out {
        println!("left out {} (empty, never committed)", p.display());
    }
    for p in &r.kept_aside {
        println!("kept the damaged manifest slot as {}", p.display());
    }
    if r.dependents > 0 {
        println!("{} clone(s) depend on these layers", r.dependents);
    }
    Ok(())
}

fn inspect(path: &Path, as_json: bool) -> Result<(), String> {
    let l = Lun::open(path, Access::ReadOnly).map_err(|e| e.to_string())?;
    let v = describe(&l);
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(());
    }
    let label = l.label();
    println!("LUN        {}", l.path().display());
    println!("name       {}", l.name());
    println!("uuid       {}", l.uuid());
    println!("layout     {}", l.layout());
    println!(
        "clusters   {} (copy-on-write volume)",
        human(u64::from(l.label().volume_cluster_size()))
    );
    println!(
        "size       {} ({} bytes; backing {} bytes)",
        human(label.lun_size),
        label.lun_size,
        l.backing_size()
    );
    println!(
        "label      generation {}, slot {}, checksum {}",
        label.generation,
        l.label_slot(),
        v["label_checksum"].as_str().unwrap_or("?")
    );
    if let Ok(hw) = l.hardware() {
        println!(
            "hardware   {} vCPU, {} memory",
            hw.vcpus,
            human(hw.memory_bytes)
        );
    }
    println!("regions");
    let mut regions = label.regions.clone();
    regions.sort_by_key(|r| r.offset);
    for r in &regions {
        println!(
            "  {:<8} offset {:>14}  length {:>14}  ({})",
            r.name(),
            r.offset,
            r.length,
            human(r.length)
        );
    }
    if let (Some(len), Some(at)) = (
        v["shadow"]["length"].as_u64(),
        v["shadow"]["lun_offset"].as_u64(),
    ) {
        println!(
            "  shadow   disk0 bytes [0, {len}) live at offset {at} (state region + {})",
            at - label.state_region().offset
        );
    }
    if let Some(id) = v["identity"]["disks"].as_array() {
        println!("identity");
        for d in id {
            println!(
                "  disk{} id {} export {}",
                d["index"],
                d["id"].as_str().unwrap_or("?"),
                d["export_name"].as_str().unwrap_or("?")
            );
        }
    }
    if let Some(s) = v["secondaries"]["disks"].as_array() {
        for d in s {
            println!(
                "secondary  {} ({})",
                d["name"].as_str().unwrap_or("?"),
                d["lun_uuid"].as_str().unwrap_or("?")
            );
        }
    }
    println!(
        "state      {} used of {}, directory generation {}",
        human(l.directory().used_bytes()),
        human(label.state_region().length),
        l.directory().generation
    );
    for r in v["state"]["records"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} #{:<3} {:>10} bytes  checksum {}",
            r["type"].as_str().unwrap_or("?"),
            r["instance"],
            r["length"],
            r["checksum"].as_str().unwrap_or("?")
        );
    }
    for w in l.warnings() {
        println!("warning    {w}");
    }
    Ok(())
}

fn list(dir: &Path, as_json: bool) -> Result<(), String> {
    pool::require(dir).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for p in pool::list_luns(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        match Lun::open(&p, Access::ReadOnly) {
            Ok(l) => rows.push(json!({
                "path": p.display().to_string(),
                "name": l.name(),
                "uuid": l.uuid().to_string(),
                "layout": l.layout(),
                "disks": l.disks().iter().map(|d| d.length).collect::<Vec<_>>(),
                "memory": l.hardware().ok().map(|h| h.memory_bytes),
                "status": if l.warnings().is_empty() { "ok".to_string() } else { l.warnings().join("; ") },
            })),
            Err(e) => rows.push(json!({
                "path": p.display().to_string(),
                "status": format!("error: {e}"),
            })),
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
        return Ok(());
    }
    if rows.is_empty() {
        println!("no LUNs in pool {}", dir.display());
        return Ok(());
    }
    println!(
        "{:<20} {:<9} {:<24} {:<10} STATUS",
        "NAME", "LAYOUT", "DISKS", "MEMORY"
    );
    for r in rows {
        let disks: Vec<String> = r["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_u64())
            .map(human)
            .collect();
        println!(
            "{:<20} {:<9} {:<24} {:<10} {}",
            r["name"].as_str().unwrap_or("?"),
            r["layout"].as_str().unwrap_or("?"),
            disks.join(","),
            r["memory"]
                .as_u64()
                .map(human)
                .unwrap_or_else(|| "?".into()),
            r["status"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

// ----- snapshot commands ---------------------------------------------------

/// Where a snapshot command runs.
enum Target {
    /// This process edits the files of the whole VM (the LUN and its
    /// secondaries, one consistency group), holding every member's flock
    /// throughout.
    Direct {
        group: Group,
        _locks: Vec<owner::FileLock>,
    },
    /// A gateway holds the LUN; the command goes to its control API.
    Gateway {
        client: control::Client,
        /// The LUN's UUID: the gateway knows it by that.
        lun: String,
        name: String,
    },
}

impl Target {
    fn name(&self) -> &str {
        match self {
            Target::Direct { group, .. } => group.primary().name(),
            Target::Gateway { name, .. } => name,
        }
    }
}

fn target(path: &Path) -> Result<Target, String> {
    match owner::try_lock(path).map_err(|e| e.to_string())? {
        Ok(lock) => {
            let mut locks = vec![lock];
            let group = Group::open(path, Access::ReadWrite).map_err(|e| e.to_string())?;
            for m in &group.members()[1..] {
                locks.push(owner::lock(m.path()).map_err(|e| {
                    format!(
                        "{} (a secondary disk of {}): {e}",
                        m.path().display(),
                        group.primary().name()
                    )
                })?);
            }
            Ok(Target::Direct {
                group,
                _locks: locks,
            })
        }
        Err(Probe::Gateway { pid, control }) => {
            // The label alone names the LUN; its state is the gateway's.
            let label = Lun::probe_label(path).map_err(|e| e.to_string())?;
            eprintln!(
                "lunctl: {} is served by lungate (PID {pid}); using its control API at {}",
                label.name,
                control.display()
            );
            let client = control::Client::new(&control).map_err(|e| e.to_string())?;
            Ok(Target::Gateway {
                client,
                lun: control::uuid_ref(label.uuid),
                name: label.name,
            })
        }
        Err(busy) => Err(owner::busy_error(path, &busy).to_string()),
    }
}

fn gw<T>(r: Result<T, control::Error>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

fn gerr(e: lun_manager::Error) -> String {
    e.to_string()
}

/// A snapshot as `snapshots` shows it (from the volume or a gateway).
type SnapRow = wire::SnapshotInfo;

fn row(s: lungate_block::volume::SnapshotInfo) -> SnapRow {
    wire::SnapshotInfo {
        name: s.name,
        description: s.description,
        created: s.created,
        parent: s.parent,
        layer: s.layer,
        current: s.current,
    }
}

fn rows(v: Vec<lungate_block::volume::SnapshotInfo>) -> Vec<SnapRow> {
    v.into_iter().map(row).collect()
}

fn op_flatten(group: &Group) -> Result<(), String> {
    let p = group.primary();
    let size = p.volume().size();
    let cs = p.volume().cluster_size();
    let bar = progress::bar(size, "flatten");
    let r = group.flatten(|done, _total| bar.set_position(done.saturating_mul(cs).min(size)));
    bar.finish_and_clear();
    r.map_err(gerr)
}

/// `NEW_NAME.lun` (and one clone per secondary disk) next to the source,
/// each with a new identity, made from snapshot `snap` in O(1).
fn op_clone(group: &Group, snap: &str, new_name: &str) -> Result<PathBuf, String> {
    lun_manager::format::validate_name(new_name)?;
    let lun = group.primary();
    if lun.is_block_device() {
        return Err(format!(
            "{}: a LUN on a block device cannot be cloned into a file next to it; \
             clone a LUN that lives in a pool",
            lun.name()
        ));
    }
    // Group::clone refuses a taken file or VM name, for every disk.
    let c = group.clone(snap, new_name).map_err(gerr)?;
    Ok(c.primary().path().to_path_buf())
}

fn snapshot(path: &Path, snap: &str, desc: &str) -> Result<(), String> {
    let t = target(path)?;
    let info = match &t {
        Target::Direct { group, .. } => row(group.snapshot(snap, desc).map_err(gerr)?),
        Target::Gateway { client, lun, .. } => gw(client.snapshot(lun, snap, desc))?.snapshot,
    };
    println!(
        "snapshot {} of {} taken{}",
        info.name,
        t.name(),
        info.parent
            .map(|p| format!(" (after {p})"))
            .unwrap_or_default()
    );
    Ok(())
}

fn snapshots(path: &Path, as_json: bool) -> Result<(), String> {
    let t = target(path)?;
    let list = match &t {
        Target::Direct { group, .. } => rows(group.snapshots()),
        Target::Gateway { client, lun, .. } => gw(client.snapshots(lun))?,
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&list).expect("json"));
        return Ok(());
    }
    print!("{}", snapshot_tree(t.name(), &list));
    Ok(())
}

/// The snapshot tree for people: each snapshot under the one it was taken
/// after, and `now` under the snapshot the live LUN continues from.
fn snapshot_tree(name: &str, list: &[SnapRow]) -> String {
    fn walk(list: &[SnapRow], parent: Option<&str>, prefix: &str, depth: usize, o: &mut String) {
        let kids: Vec<&SnapRow> = list
            .iter()
            .filter(|s| s.parent.as_deref() == parent)
            .collect();
        let now_here = parent.is_some_and(|p| list.iter().any(|s| s.current && s.name == p));
        let n = kids.len() + usize::from(now_here);
        for (i, s) in kids.iter().enumerate() {
            let last = i + 1 == n;
            let desc = if s.description.is_empty() {
                String::new()
            } else {
                format!("  {:?}", s.description)
            };
            o.push_str(&format!(
                "{prefix}{} {}  {}{desc}\n",
                if last { "└─" } else { "├─" },
                s.name,
                utc(s.created)
            ));
            if depth < 256 {
                let p = format!("{prefix}{}", if last { "   " } else { "│  " });
                walk(list, Some(&s.name), &p, depth + 1, o);
            }
        }
        if now_here {
            o.push_str(&format!("{prefix}└─ ● now (live)\n"));
        }
    }
    let mut o = format!("{name}\n");
    if list.is_empty() {
        o.push_str("└─ ● now (live, no snapshots)\n");
        return o;
    }
    walk(list, None, "", 0, &mut o);
    if !list.iter().any(|s| s.current) {
        o.push_str("(the live LUN descends from no snapshot: flattened or a clone)\n");
    }
    o
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn revert(path: &Path, snap: &str) -> Result<(), String> {
    let mut t = target(path)?;
    match &mut t {
        Target::Direct { group, .. } => {
            group.revert(snap).map_err(gerr)?;
            println!("{} reverted to snapshot {snap}", t.name());
        }
        Target::Gateway { client, lun, .. } => {
            let p = gw(client.revert(lun, snap))?;
            println!(
                "{} reverted to snapshot {snap} (guests paused {} µs)",
                t.name(),
                p.pause_us
            );
        }
    }
    Ok(())
}

fn delete_snapshot(path: &Path, snap: &str) -> Result<(), String> {
    let t = target(path)?;
    match &t {
        Target::Direct { group, .. } => group.delete_snapshot(snap).map_err(gerr)?,
        Target::Gateway { client, lun, .. } => {
            gw(client.delete_snapshot(lun, snap))?;
        }
    }
    println!("snapshot {snap} of {} deleted", t.name());
    Ok(())
}

fn clone(path: &Path, snap: &str, new_name: &str) -> Result<(), String> {
    let t = target(path)?;
    match &t {
        Target::Direct { group, .. } => {
            let p = op_clone(group, snap, new_name)?;
            println!(
                "cloned {} at snapshot {snap} as {new_name} ({})",
                t.name(),
                p.display()
            );
        }
        Target::Gateway { client, lun, .. } => {
            let c = gw(client.clone_lun(lun, snap, new_name))?;
            println!(
                "cloned {} at snapshot {snap} as {new_name} ({}); exported as {}",
                t.name(),
                c.path.display(),
                c.exports.join(", ")
            );
        }
    }
    Ok(())
}

fn flatten(path: &Path) -> Result<(), String> {
    let t = target(path)?;
    match &t {
        Target::Direct { group, .. } => op_flatten(group)?,
        Target::Gateway { client, lun, .. } => {
            gw(client.flatten(lun))?;
        }
    }
    println!("{} flattened: it reads no shared layer any more", t.name());
    Ok(())
}

fn diff(
    path: &Path,
    from: &str,
    to: Option<&str>,
    as_json: bool,
    out: Option<&Path>,
) -> Result<(), String> {
    let t = target(path)?;
    if let Some(out) = out {
        let n = match &t {
            Target::Direct { group, .. } => {
                let f =
                    std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
                let mut w = std::io::BufWriter::new(f);
                let n = group.write_diff(from, to, &mut w).map_err(gerr)?;
                let f = w
                    .into_inner()
                    .map_err(|e| format!("{}: {}", out.display(), e.error()))?;
                f.sync_all()
                    .map_err(|e| format!("{}: {e}", out.display()))?;
                n
            }
            Target::Gateway { client, lun, .. } => {
                let b = gw(client.diff_file(lun, from, to))?;
                std::fs::write(out, &b).map_err(|e| format!("{}: {e}", out.display()))?;
                b.len() as u64
            }
        };
        println!(
            "diff of {} from {from} to {} written to {} ({})",
            t.name(),
            to.unwrap_or("now"),
            out.display(),
            human(n)
        );
        return Ok(());
    }
    let (changes, lun_regions) = match &t {
        Target::Direct { group, .. } => (
            group
                .diff(from, to)
                .map_err(gerr)?
                .into_iter()
                .map(|c| wire::Change {
                    offset: c.offset,
                    length: c.length,
                    kind: match c.kind {
                        lungate_block::volume::ChangeKind::Data => wire::ChangeKind::Data,
                        lungate_block::volume::ChangeKind::Zero => wire::ChangeKind::Zero,
                    },
                })
                .collect(),
            Some(group.primary().label().regions.clone()),
        ),
        Target::Gateway { client, lun, .. } => (gw(client.diff(lun, from, to))?.changes, None),
    };
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&wire::Diff { changes }).expect("json")
        );
        return Ok(());
    }
    let regions = match lun_regions {
        Some(r) => r,
        None => Lun::open(path, Access::ReadOnly)
            .map_err(|e| e.to_string())?
            .label()
            .regions
            .clone(),
    };
    let list = changes;
    if list.is_empty() {
        println!("no changes from {from} to {}", to.unwrap_or("now"));
        return Ok(());
    }
    println!("{:>14} {:>12}  {:<5} WHERE", "OFFSET", "LENGTH", "KIND");
    let mut total = 0;
    for c in &list {
        let (o, l) = (c.offset, c.length);
        total += l;
        let at = regions
            .iter()
            .find(|r| r.offset <= o && o < r.end())
            .map(|r| format!("{} +{}", r.name(), o - r.offset))
            .unwrap_or_else(|| "-".into());
        let kind = match c.kind {
            wire::ChangeKind::Data => "data",
            wire::ChangeKind::Zero => "zero",
        };
        println!("{o:>14} {l:>12}  {kind:<5} {at}");
    }
    println!(
        "{} extent(s), {} changed from {from} to {}",
        list.len(),
        human(total),
        to.unwrap_or("now")
    );
    Ok(())
}

fn apply_diff(path: &Path, file: &Path) -> Result<(), String> {
    let mut t = target(path)?;
    let name = t.name().to_string();
    match &mut t {
        Target::Direct { group, .. } => {
            let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
            let info = group
                .apply_diff(&mut std::io::BufReader::new(f))
                .map_err(|e| format!("{}: {e}", file.display()))?;
            println!(
                "applied {} ({} to {}) to {name}: {} LUN section(s)",
                file.display(),
                info.from,
                info.to.as_deref().unwrap_or("now"),
                info.sections.len()
            );
        }
        Target::Gateway { client, lun, .. } => {
            let b = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
            gw(client.apply_diff(lun, b))?;
            println!("applied {} to {}", file.display(), t.name());
        }
    }
    Ok(())
}

fn usage(path: &Path, as_json: bool) -> Result<(), String> {
    let t = target(path)?;
    let list: Vec<wire::LayerUsage> = match &t {
        Target::Direct { group, .. } => group
            .usage()
            .into_iter()
            .map(|u| wire::LayerUsage {
                layer: u.layer,
                path: u.path,
                snapshot: u.snapshot,
                live: u.live,
                in_chain: u.in_chain,
                external: u.external,
                allocated_bytes: u.allocated_bytes,
                disk_bytes: u.disk_bytes,
            })
            .collect(),
        Target::Gateway { client, lun, .. } => gw(client.usage(lun))?,
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&list).expect("json"));
        return Ok(());
    }
    println!(
        "{:<36}  {:<16} {:<13} {:>10} {:>10}",
        "LAYER", "SNAPSHOT", "ROLE", "ALLOCATED", "ON DISK"
    );
    let (mut own, mut shared) = (0, 0);
    for l in &list {
        let role = if l.live {
            "live"
        } else if l.external {
            "shared (parent)"
        } else if l.in_chain {
            "in chain"
        } else {
            "not in chain"
        };
        let disk = l.disk_bytes;
        if l.external {
            shared += disk;
        } else {
            own += disk;
        }
        let base = l.path.extension().is_none_or(|e| e != "delta");
        println!(
            "{:<36}  {:<16} {:<13} {:>10} {:>10}",
            l.layer.to_string(),
            l.snapshot
                .as_deref()
                .unwrap_or(if base { "(base)" } else { "-" }),
            role,
            human(l.allocated_bytes),
            human(disk)
        );
    }
    println!(
        "{} on disk in {}'s own files, {} in shared parent layers",
        human(own),
        t.name(),
        human(shared)
    );
    Ok(())
}
