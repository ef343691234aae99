//! Pools and LUNs: `pool init`, `create`, `import`, `inspect`, `list`,
//! `resize`, `attach-secondary`, `delete`. Each writing command holds the LUN's
//! flock while it runs (a gateway-held LUN is refused: these commands have
//! no control API route).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use lun_manager::format::state::{Identity, RecordType, SecondaryDisks, SnapshotTree};
use lun_manager::lun::Found;
use lun_manager::owner;
use lun_manager::size::{human, parse_size};
use lun_manager::{pool, Access, CreateSpec, Lun};
use lungate_cli::Output;
use serde_json::json;

use crate::fail::{Fail, Res};
use crate::results;
use crate::{CreateArgs, ImportArgs};

fn size(s: &str, what: &str) -> Res<u64> {
    parse_size(s).map_err(|e| Fail::from(format!("{what}: {e}")))
}

pub fn pool_init(out: &Output, dir: &Path) -> Res {
    pool::init(dir)?;
    out.result("pool-init", &results::PoolReady { pool: dir }, || {
        format!("pool {} ready\n", dir.display())
    });
    Ok(())
}

/// Where a new LUN named `name` goes (`--pool` or `--path`), refusing a
/// name the pool already has.
fn new_lun_path(name: &str, pool: Option<&Path>, path: Option<&Path>) -> Res<PathBuf> {
    let Some(dir) = pool else {
        return Ok(path.expect("clap requires --pool or --path").to_path_buf());
    };
    pool::require(dir)?;
    lun_manager::format::validate_name(name)?;
    if let Some(path) = pool::find_vm(dir, name)? {
        return Err(lun_manager::Error::NameTaken {
            pool: dir.to_path_buf(),
            name: name.to_string(),
            path,
        }
        .into());
    }
    Ok(pool::lun_path(dir, name))
}

fn cluster_size_arg(s: &str) -> Res<u32> {
    let cs = size(s, "--cluster-size")?;
    Ok(u32::try_from(cs)
        .ok()
        .filter(|&c| c != 0 && lun_manager::format::label::valid_cluster_size(c))
        .ok_or_else(|| format!("--cluster-size {s}: must be a power of two from 4K to 2M"))?)
}

fn disk_rows(lun: &Lun) -> Vec<results::Disk> {
    lun.disks()
        .iter()
        .map(|d| results::Disk {
            index: d.index,
            size: d.length,
            export: format!("{}/disk{}", lun.name(), d.index),
        })
        .collect()
}

fn disk_lines(o: &mut String, lun: &Lun) {
    for d in lun.disks() {
        let _ = writeln!(
            o,
            "  disk{}: {} export {}/disk{}",
            d.index,
            human(d.length),
            lun.name(),
            d.index
        );
    }
}

pub fn import(out: &Output, a: ImportArgs) -> Res {
    use lun_manager::import;
    let path = new_lun_path(&a.name, a.pool.as_deref(), a.path.as_deref())?;
    let image_len = std::fs::File::open(&a.image)
        .and_then(|f| lungate_block::sys::backing_size(&f))
        .map_err(|e| Fail::from(format!("{}: {e}", a.image.display())))?;
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
        // Not offered by `import` yet (create --checksums is).
        checksums: false,
    };
    let mut rep = out.progress("import");
    let r = import::import_raw(&a.image, &path, &spec, &mut |p, d, t| rep.update(p, d, t));
    rep.finish();
    let (mut lun, done) = r?;
    crate::guest::install_guest_service(&mut lun)?;
    out.result(
        "import",
        &results::Imported {
            lun: lun.name(),
            uuid: lun.uuid(),
            path: &path,
            layout: lun.layout(),
            disks: disk_rows(&lun),
            image: &a.image,
            image_bytes: done.image_len,
            copied_bytes: done.copied,
        },
        || {
            let mut o = format!(
                "imported {} ({}, {} of data) as disk0 of {} ({}, {} layout) at {}\n",
                a.image.display(),
                human(done.image_len),
                human(done.copied),
                lun.name(),
                lun.uuid(),
                lun.layout(),
                path.display()
            );
            disk_lines(&mut o, &lun);
            o
        },
    );
    Ok(())
}

/// `--device`: link `dev` (a block device) into the pool at `link`,
/// refusing anything else. The link goes again if the create fails.
fn link_device(dev: &Path, link: &Path) -> Res<()> {
    use std::os::unix::fs::FileTypeExt;
    let md = std::fs::metadata(dev).map_err(|e| format!("--device {}: {e}", dev.display()))?;
    if !md.file_type().is_block_device() {
        return Err(format!(
            "--device {}: not a block device (a LUN file goes in the pool without --device)",
            dev.display()
        )
        .into());
    }
    let dev = std::fs::canonicalize(dev).map_err(|e| format!("--device {}: {e}", dev.display()))?;
    std::os::unix::fs::symlink(&dev, link)
        .map_err(|e| format!("link {} to {}: {e}", link.display(), dev.display()))?;
    Ok(())
}

pub fn create(out: &Output, a: CreateArgs) -> Res {
    let path = new_lun_path(&a.name, a.pool.as_deref(), a.path.as_deref())?;
    if let Some(dev) = &a.device {
        link_device(dev, &path)?;
    }
    let r = create_at(out, &a, &path);
    if r.is_err() && a.device.is_some() {
        let _ = std::fs::remove_file(&path);
    }
    r
}

fn create_at(out: &Output, a: &CreateArgs, path: &Path) -> Res {
    let path = path.to_path_buf();
    let disks = a
        .disk
        .iter()
        .map(|d| size(d, "--disk"))
        .collect::<Res<Vec<_>>>()?;
    let cluster_size = cluster_size_arg(&a.cluster_size)?;
    let spec = CreateSpec {
        name: a.name.clone(),
        disks,
        memory: size(&a.memory, "--memory")?,
        vcpus: a.vcpus,
        layout: a.layout,
        cluster_size,
        checksums: a.checksums,
    };
    let lun = if a.prefill {
        let mut rep = out.progress("create");
        let r = Lun::create_prefilled(&path, &spec, &mut |p, d, t| rep.update(p, d, t));
        rep.finish();
        r?
    } else {
        Lun::create(&path, &spec)?
    };
    let mut lun = lun;
    crate::guest::install_guest_service(&mut lun)?;
    let disks = disk_rows(&lun);
    out.result(
        "create",
        &results::Created {
            lun: lun.name(),
            uuid: lun.uuid(),
            path: &path,
            layout: lun.layout(),
            disks,
            prefilled: a.prefill,
            checksums: lun.volume().checksums(),
        },
        || {
            let mut o = format!(
                "created {} ({}, {} layout{}{}) at {}\n",
                lun.name(),
                lun.uuid(),
                lun.layout(),
                if a.prefill { ", prefilled" } else { "" },
                if a.checksums { ", data checksums" } else { "" },
                path.display()
            );
            disk_lines(&mut o, &lun);
            o
        },
    );
    Ok(())
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

/// Everything `inspect --json` shows.
fn describe(l: &Lun) -> serde_json::Value {
    let label = l.label();
    let ident: Option<Identity> = l.record_json(RecordType::Identity, 0).ok().flatten();
    let tree: Option<SnapshotTree> = l.record_json(RecordType::SnapshotTree, 0).ok().flatten();
    let sec: Option<SecondaryDisks> = l.record_json(RecordType::SecondaryDisks, 0).ok().flatten();
    // Snapshots taken before a resize: the sizes they keep.
    let now = lun_manager::lun::layouts::SnapshotLayout::of(label);
    let resized: Vec<_> = l
        .resized_snapshots()
        .unwrap_or_default()
        .into_iter()
        .map(|(name, then)| {
            let sizes: Vec<_> = then
                .size_changes(&now)
                .into_iter()
                .map(|(region, bytes, now)| json!({"region": region, "bytes": bytes, "now": now}))
                .collect();
            json!({"snapshot": name, "lun_size": then.lun_size, "sizes": sizes})
        })
        .collect();
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
        "resized_snapshots": resized,
        "state": {
            "directory_generation": l.directory().generation,
            "used": l.directory().used_bytes(),
            "size": label.state_region().length,
            "records": records,
        },
        "warnings": l.warnings(),
    })
}

pub fn inspect(out: &Output, path: &Path) -> Res {
    let l = Lun::open(path, Access::ReadOnly)?;
    let v = describe(&l);
    out.document(&v, || inspect_text(&l, &v));
    Ok(())
}

fn inspect_text(l: &Lun, v: &serde_json::Value) -> String {
    let mut o = String::new();
    let label = l.label();
    let _ = writeln!(o, "LUN        {}", l.path().display());
    let _ = writeln!(o, "name       {}", l.name());
    let _ = writeln!(o, "uuid       {}", l.uuid());
    let _ = writeln!(o, "layout     {}", l.layout());
    let _ = writeln!(
        o,
        "clusters   {} (copy-on-write volume)",
        human(u64::from(l.label().volume_cluster_size()))
    );
    let _ = writeln!(
        o,
        "size       {} ({} bytes; backing {} bytes)",
        human(label.lun_size),
        label.lun_size,
        l.backing_size()
    );
    let _ = writeln!(
        o,
        "label      generation {}, slot {}, checksum {}",
        label.generation,
        l.label_slot(),
        v["label_checksum"].as_str().unwrap_or("?")
    );
    if let Ok(hw) = l.hardware() {
        let _ = writeln!(
            o,
            "hardware   {} vCPU, {} memory",
            hw.vcpus,
            human(hw.memory_bytes)
        );
    }
    let _ = writeln!(o, "regions");
    let mut regions = label.regions.clone();
    regions.sort_by_key(|r| r.offset);
    for r in &regions {
        let _ = writeln!(
            o,
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
        let _ = writeln!(
            o,
            "  shadow   disk0 bytes [0, {len}) live at offset {at} (state region + {})",
            at - label.state_region().offset
        );
    }
    if let Some(id) = v["identity"]["disks"].as_array() {
        let _ = writeln!(o, "identity");
        for d in id {
            let _ = writeln!(
                o,
                "  disk{} id {} export {}",
                d["index"],
                d["id"].as_str().unwrap_or("?"),
                d["export_name"].as_str().unwrap_or("?")
            );
        }
    }
    if let Some(s) = v["secondaries"]["disks"].as_array() {
        for d in s {
            let _ = writeln!(
                o,
                "secondary  {} ({})",
                d["name"].as_str().unwrap_or("?"),
                d["lun_uuid"].as_str().unwrap_or("?")
            );
        }
    }
    let _ = writeln!(
        o,
        "state      {} used of {}, directory generation {}",
        human(l.directory().used_bytes()),
        human(label.state_region().length),
        l.directory().generation
    );
    for r in v["state"]["records"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  {:<16} #{:<3} {:>10} bytes  checksum {}",
            r["type"].as_str().unwrap_or("?"),
            r["instance"],
            r["length"],
            r["checksum"].as_str().unwrap_or("?")
        );
    }
    for r in v["resized_snapshots"].as_array().into_iter().flatten() {
        let sizes: Vec<String> = r["sizes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|z| {
                format!(
                    "{} {} (now {})",
                    z["region"].as_str().unwrap_or("?"),
                    human(z["bytes"].as_u64().unwrap_or(0)),
                    human(z["now"].as_u64().unwrap_or(0))
                )
            })
            .collect();
        let _ = writeln!(
            o,
            "snapshot   {} keeps its sizes from before a resize: {}",
            r["snapshot"].as_str().unwrap_or("?"),
            if sizes.is_empty() {
                "regions moved".to_string()
            } else {
                sizes.join(", ")
            }
        );
    }
    for w in l.warnings() {
        let _ = writeln!(o, "warning    {w}");
    }
    o
}

pub fn list(out: &Output, dir: &Path) -> Res {
    pool::require(dir)?;
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
    out.document(&rows, || list_text(dir, &rows));
    Ok(())
}

fn list_text(dir: &Path, rows: &[serde_json::Value]) -> String {
    if rows.is_empty() {
        return format!("no LUNs in pool {}\n", dir.display());
    }
    let mut o = format!(
        "{:<20} {:<9} {:<24} {:<10} STATUS\n",
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
        let _ = writeln!(
            o,
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
    o
}

pub fn resize(out: &Output, path: &Path, disk: &[String], memory: Option<String>) -> Res {
    if disk.is_empty() && memory.is_none() {
        return Err("resize needs --disk N=SIZE or --memory SIZE"
            .to_string()
            .into());
    }
    // Parse everything before touching the LUN.
    let mut grow = Vec::new();
    for d in disk {
        let (n, s) = d
            .split_once('=')
            .ok_or_else(|| format!("--disk {d:?}: expected N=SIZE, e.g. 0=40G"))?;
        let n: u32 = n
            .parse()
            .map_err(|_| format!("--disk {d:?}: {n:?} is not a disk number"))?;
        grow.push((n, size(s, "--disk")?));
    }
    let memory = memory.map(|m| size(&m, "--memory")).transpose()?;
    // Resizing moves regions under the guest's feet: the control API has
    // no resize, so a served LUN is resized offline.
    let _lock = owner::lock(path).map_err(|e| {
        let held = matches!(e, owner::Error::Owned { .. } | owner::Error::Locked { .. });
        let f = Fail::from(e);
        if held {
            Fail::new(
                f.exit,
                format!(
                    "{}; resize is offline (it moves regions, and a gateway has no resize): \
                     stop the process serving the LUN, resize, then serve it again",
                    f.msg
                ),
            )
        } else {
            f
        }
    })?;
    let mut l = Lun::open(path, Access::ReadWrite)?;
    let mut text = String::new();
    let mut rep = out.progress("resize");
    for (n, s) in grow {
        l.resize_disk_with(n, s, &mut |p, d, t| rep.update(p, d, t))?;
        let _ = writeln!(
            text,
            "disk{n} is now {}",
            human(l.disks()[n as usize].length)
        );
    }
    if let Some(m) = memory {
        l.resize_memory_with(m, &mut |p, d, t| rep.update(p, d, t))?;
        let _ = writeln!(
            text,
            "memory is now {} (state region {})",
            human(m),
            human(l.label().state_region().length)
        );
    }
    rep.finish();
    out.result(
        "resize",
        &results::Resized {
            lun: l.name(),
            path,
            disks: l.disks().iter().map(|d| d.length).collect(),
            memory: l.hardware().ok().map(|h| h.memory_bytes),
            state_region: l.label().state_region().length,
            lun_size: l.label().lun_size,
        },
        || text,
    );
    Ok(())
}

pub fn attach_secondary(out: &Output, p: &Path, s: &Path) -> Res {
    let other = Lun::open(s, Access::ReadOnly)?;
    let _lock = owner::lock(p)?;
    let mut l = Lun::open(p, Access::ReadWrite)?;
    l.attach_secondary(&other)?;
    out.result(
        "attach-secondary",
        &results::Attached {
            lun: l.name(),
            secondary: other.name(),
            secondary_uuid: other.uuid(),
        },
        || {
            format!(
                "attached {} ({}) to {} as a secondary disk\n",
                other.name(),
                other.uuid(),
                l.name()
            )
        },
    );
    Ok(())
}

pub fn delete(out: &Output, path: &Path, yes: bool) -> Res {
    if !yes {
        return Err(format!(
            "refusing to delete {} without --yes (every byte in it is destroyed)",
            path.display()
        )
        .into());
    }
    let lock = owner::lock(path)?;
    let l = Lun::open(path, Access::ReadWrite)?;
    let name = l.name().to_string();
    // Refused while clones read its snapshots; removes its layers.
    l.delete()?;
    drop(lock);
    out.result("delete", &results::Deleted { lun: &name, path }, || {
        format!("deleted {name} ({})\n", path.display())
    });
    Ok(())
}
