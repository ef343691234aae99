//! `lunctl`: provision, inspect, resize and scan lungate LUNs.
//!
//! Parses arguments, calls the `lun_manager` library, prints. Human output by
//! default, `--json` on every read command. Exit codes: 0 success, 1 the
//! operation failed (the message says why), 2 bad command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lun_manager::format::state::{Identity, RecordType, SecondaryDisks, SnapshotTree};
use lun_manager::lun::Found;
use lun_manager::size::{human, parse_size};
use lun_manager::{pool, report, scan, Access, CreateSpec, Layout, Lun};
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
        Cmd::Inspect { lun, json } => inspect(&lun.path()?, json)?,
        Cmd::List { pool: dir, json } => list(&dir, json)?,
        Cmd::Resize { lun, disk, memory } => {
            let path = lun.path()?;
            if disk.is_empty() && memory.is_none() {
                return Err("resize needs --disk N=SIZE or --memory SIZE".into());
            }
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
            let l = Lun::open(&path, Access::ReadWrite).map_err(|e| e.to_string())?;
            let name = l.name().to_string();
            l.delete().map_err(|e| e.to_string())?;
            println!("deleted {name} ({})", path.display());
        }
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

fn create(a: CreateArgs) -> Result<(), String> {
    let path = match (&a.pool, &a.path) {
        (Some(dir), _) => {
            pool::require(dir).map_err(|e| e.to_string())?;
            lun_manager::format::validate_name(&a.name)?;
            pool::lun_path(dir, &a.name)
        }
        (None, Some(p)) => p.clone(),
        (None, None) => unreachable!("clap requires --pool or --path"),
    };
    if let Some(dir) = &a.pool {
        // Names are unique in a pool: exports are named after them.
        for p in pool::list_luns(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            if let Ok(l) = Lun::open(&p, Access::ReadOnly) {
                if l.name() == a.name {
                    return Err(format!(
                        "pool {} already has a VM named {:?} ({})",
                        dir.display(),
                        a.name,
                        p.display()
                    ));
                }
            }
        }
    }
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
        "lun_size": label.lun_size,
        "backing_size": l.backing_size(),
        "block_device": l.is_block_device(),
        "generation": label.generation,
        "label_slot": l.label_slot(),
        "created": label.created,
        "updated": label.updated,
        "label_checksum": match l.found() { Found::Normal => "ok".to_string(), Found::OneSlot(w) => format!("ok (other slot: {w})"), Found::Recovered(w) => format!("recovered: {w}") },
        "regions": label.regions,
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
