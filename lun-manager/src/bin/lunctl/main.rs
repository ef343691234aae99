//! `lunctl`: provision, inspect, resize and scan lungate LUNs, and take,
//! list, revert, delete, clone, flatten and diff their snapshots.
//!
//! Parses arguments, calls the `lun_manager` library, prints through
//! [`lungate_cli::Output`]: text for people by default; with `--json` a
//! JSON document from a read command, and NDJSON `progress` events plus a
//! final `result` (or `error`) object from a command that changes
//! something. Exit codes are [`lungate_cli::Exit`]'s, chosen from the kind
//! of error ([`fail`]).
//!
//! Snapshot commands run in one of two modes, chosen per LUN by
//! [`lun_manager::owner::try_lock`]: *direct* (this process edits the files
//! while holding the LUN's flock) or *gateway* (a running lungate holds the
//! LUN: the operation goes to its control API). Anything else holding the
//! LUN is refused with who it is.
//!
//! Files: `provision.rs` (pools, create, import, inspect, list, resize,
//! attach, delete), `snapshots.rs` (every snapshot command, and repair of a lost
//! snapshot manifest), `guest.rs` (vmm-shim's hardware and guest key),
//! `results.rs` (the `--json` result objects),
//! `fail.rs` (exit codes).

mod fail;
mod guest;
mod migrate;
mod provision;
mod replicate;
mod results;
mod snapshots;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use lun_manager::{pool, report, scan, Layout};
use lungate_cli::{DocCmd, Exit, Output};

use fail::{Fail, Res};

#[derive(Parser)]
#[command(
    name = "lunctl",
    version,
    about = "Provision and inspect lungate VM LUNs",
    after_help = Exit::table(&EXITS)
)]
struct Cli {
    /// Output for programs: a JSON document (read commands), or NDJSON
    /// progress events and a final result or error object (commands that
    /// change something)
    #[arg(long, global = true)]
    json: bool,
    /// etcd of coordinated gateways (etcd://HOST:PORT): the owner of an
    /// RBD LUN is the gateway etcd names, and commands for a LUN it serves
    /// go to its control API
    #[arg(long, global = true, value_name = "URL")]
    coordinator: Option<String>,
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
    },
    /// List the LUNs in a pool
    List {
        #[arg(long, value_name = "DIR")]
        pool: PathBuf,
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
    /// Show which gateway serves a LUN (from etcd with --coordinator)
    Owner {
        #[command(flatten)]
        lun: LunRef,
    },
    /// Show a LUN's snapshots as a tree
    Snapshots {
        #[command(flatten)]
        lun: LunRef,
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
    /// Read every data cluster of a LUN made with --checksums (live and
    /// snapshots) and check it; exits 5 (damaged) naming each bad cluster
    Scrub {
        #[command(flatten)]
        lun: LunRef,
    },
    /// Space used by each layer of the LUN
    Usage {
        #[command(flatten)]
        lun: LunRef,
    },
    /// Change the VM's memory size and vCPU count (applied by vmm-shim at
    /// the next boot or restore; a saved state is adapted to it then)
    SetHardware {
        #[command(flatten)]
        lun: LunRef,
        #[arg(long, value_name = "SIZE")]
        memory: Option<String>,
        #[arg(long, value_name = "N")]
        vcpus: Option<u32>,
    },
    /// Show the key the guest's software signs its state-service requests
    /// with (install it in the guest); gives an older LUN one first
    GuestKey {
        #[command(flatten)]
        lun: LunRef,
    },
    /// Rebuild a LUN's lost snapshot manifest from its layers' headers
    /// (the LUN is refused until then; see docs/volumes.md)
    Repair {
        #[command(flatten)]
        lun: LunRef,
    },
    /// Move a served VM (its LUNs, state region and snapshot tree) live to
    /// another gateway (--to) or another pool of its gateway (--to-pool)
    Migrate {
        #[command(flatten)]
        lun: LunRef,
        /// The target gateway's migration listener, HOST:PORT
        #[arg(long, value_name = "HOST:PORT", required_unless_present_any = ["to_pool", "abort"], conflicts_with = "to_pool")]
        to: Option<String>,
        /// A pool of the same gateway (its path or name)
        #[arg(long, value_name = "POOL")]
        to_pool: Option<String>,
        /// The pool on the target gateway (default: its first)
        #[arg(long, value_name = "NAME", requires = "to")]
        target_pool: Option<String>,
        /// Guest-visible pause budget in ms (default: the gateway's, 50)
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        /// Copy bandwidth limit per second, e.g. 200M
        #[arg(long, value_name = "RATE")]
        max_rate: Option<String>,
        /// Keep the source copy as POOL/NAME.migrated-ID/
        #[arg(long)]
        keep_source: bool,
        /// Also move the clones that depend on the VM's layers
        #[arg(long)]
        with_dependents: bool,
        /// Never slow the guests' writes: a VM that writes faster than the
        /// copy then fails to converge (the source keeps serving it)
        #[arg(long)]
        no_auto_converge: bool,
        /// File whose first line is the target's migration token
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Abort the VM's running migration (the source keeps serving)
        #[arg(long, conflicts_with_all = ["to", "to_pool"])]
        abort: bool,
    },
    /// List the migrations a gateway runs, answers or finished lately
    Migrations {
        /// A pool the gateway serves (its control socket is DIR/.lungate.sock)
        #[arg(long, value_name = "DIR", required_unless_present = "control")]
        pool: Option<PathBuf>,
        /// The gateway's control socket
        #[arg(long, value_name = "SOCKET")]
        control: Option<PathBuf>,
    },
    /// Ship a served VM's changes to another gateway continuously, with a
    /// checkpoint (snapshot replica-SEQ on both sides) every interval
    Replicate {
        #[command(flatten)]
        lun: LunRef,
        /// The target gateway's migration listener, HOST:PORT
        #[arg(long, value_name = "HOST:PORT", required_unless_present = "stop")]
        to: Option<String>,
        /// The pool on the target gateway (default: its first)
        #[arg(long, value_name = "NAME", requires = "to")]
        target_pool: Option<String>,
        /// Interval between checkpoints: 30s, 500ms, 5m (default 30s)
        #[arg(long, value_name = "INTERVAL", requires = "to")]
        every: Option<String>,
        /// Replication snapshots kept on both sides (default 2)
        #[arg(long, value_name = "N", requires = "to")]
        keep: Option<u32>,
        /// Bandwidth limit per second of a cycle, e.g. 200M
        #[arg(long, value_name = "RATE", requires = "to")]
        max_rate: Option<String>,
        /// File whose first line is the target's migration token
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Stop the VM's replication (the checkpoints stay)
        #[arg(long, conflicts_with = "to")]
        stop: bool,
    },
    /// List the replications a gateway runs and the replicas it holds
    Replications {
        /// A pool the gateway serves (its control socket is DIR/.lungate.sock)
        #[arg(long, value_name = "DIR", required_unless_present = "control")]
        pool: Option<PathBuf>,
        /// The gateway's control socket
        #[arg(long, value_name = "SOCKET")]
        control: Option<PathBuf>,
    },
    /// On the target: promote a replica's newest complete checkpoint and serve it
    Failover {
        /// The replicated VM's name (or its LUN UUID)
        name: String,
        /// The pool holding the replica (its gateway's control socket is DIR/.lungate.sock)
        #[arg(long, value_name = "DIR", required_unless_present = "control")]
        pool: Option<PathBuf>,
        /// The gateway's control socket
        #[arg(long, value_name = "SOCKET")]
        control: Option<PathBuf>,
        /// Abort a cycle being received and promote the previous checkpoint
        #[arg(long)]
        force: bool,
    },
    /// Find VM LUNs in pool directories, files and block devices
    Scan {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Also write a self-contained HTML report to FILE
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
    #[command(flatten)]
    Doc(DocCmd),
}

impl Cmd {
    /// The operation's name in JSON events (`"op": "delete-snapshot"`).
    fn op(&self) -> &'static str {
        match self {
            Cmd::Pool { .. } => "pool-init",
            Cmd::Create(_) => "create",
            Cmd::Import(_) => "import",
            Cmd::Inspect { .. } => "inspect",
            Cmd::List { .. } => "list",
            Cmd::Resize { .. } => "resize",
            Cmd::AttachSecondary { .. } => "attach-secondary",
            Cmd::Delete { .. } => "delete",
            Cmd::Snapshot { .. } => "snapshot",
            Cmd::Snapshots { .. } => "snapshots",
            Cmd::Owner { .. } => "owner",
            Cmd::Revert { .. } => "revert",
            Cmd::DeleteSnapshot { .. } => "delete-snapshot",
            Cmd::Clone { .. } => "clone",
            Cmd::Flatten { .. } => "flatten",
            Cmd::Diff { .. } => "diff",
            Cmd::ApplyDiff { .. } => "apply-diff",
            Cmd::Usage { .. } => "usage",
            Cmd::Scrub { .. } => "scrub",
            Cmd::SetHardware { .. } => "set-hardware",
            Cmd::GuestKey { .. } => "guest-key",
            Cmd::Repair { .. } => "repair",
            Cmd::Migrate { .. } => "migrate",
            Cmd::Migrations { .. } => "migrations",
            Cmd::Replicate { .. } => "replicate",
            Cmd::Replications { .. } => "replications",
            Cmd::Failover { .. } => "failover",
            Cmd::Scan { .. } => "scan",
            Cmd::Doc(DocCmd::Completions { .. }) => "completions",
            Cmd::Doc(DocCmd::Man { .. }) => "man",
        }
    }
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Create a pool directory (or adopt an existing directory), or mark
    /// an RBD pool `rbd:POOL[/NAMESPACE]` as a lungate pool (initialising
    /// the pool and creating the namespace when needed)
    Init {
        dir: PathBuf,
        /// Ceph configuration file, for an RBD pool (default: $CEPH_CONF,
        /// then /etc/ceph/ceph.conf); becomes `:conf=FILE` of the pool's name
        #[arg(long, value_name = "FILE")]
        conf: Option<PathBuf>,
        /// cephx user (without `client.`), for an RBD pool; becomes `:id=USER`
        #[arg(long, value_name = "USER")]
        id: Option<String>,
    },
}

#[derive(Args)]
struct CreateArgs {
    /// VM name (letters, digits, '.', '_', '-'); exports are NAME/disk0, NAME/disk1, ...
    name: String,
    /// Pool directory; the LUN becomes DIR/NAME.lun
    #[arg(long, value_name = "DIR", required_unless_present = "path")]
    pool: Option<PathBuf>,
    /// Create at this file or block device path instead of in a pool
    #[arg(long, value_name = "PATH", conflicts_with = "pool")]
    path: Option<PathBuf>,
    /// With --pool: put the LUN on this block device (a SAN LUN, a
    /// partition), linked into the pool as DIR/NAME.lun; its snapshot and
    /// clone layers live in the pool directory
    #[arg(long, value_name = "DEVICE", requires = "pool")]
    device: Option<PathBuf>,
    /// Disk size (repeat for more disks), e.g. 20G
    #[arg(long, required = true, value_name = "SIZE")]
    disk: Vec<String>,
    /// Guest memory, e.g. 2G; sizes the hidden state region
    #[arg(long, value_name = "SIZE")]
    memory: String,
    /// Virtual CPUs of the VM
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// offset: a GPT the host recognises, disks served at their offsets;
    /// truncate: disk0 at byte 0 (the guest's own partition table at LBA
    /// 0), served truncated; aligned: disk0 at byte 0 and lungate's GPT at
    /// LBA 0 (the guest's first MiB kept in the state region)
    #[arg(long, default_value = "offset", value_parser = layout_parser())]
    layout: Layout,
    /// Cluster size of the copy-on-write volume (snapshots, clones): a
    /// power of two from 4K to 2M; fixed at creation
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    cluster_size: String,
    /// Give every disk byte real storage before the LUN exists: a file is
    /// fully allocated (no ENOSPC later), a block device's disk regions are
    /// overwritten with zeros (nothing a previous user left shows through)
    #[arg(long)]
    prefill: bool,
    /// Keep a checksum of every data cluster (disks and state), checked on
    /// every read, so silent corruption below the gateway fails the read
    /// (EIO) instead of reaching the guest; `lunctl scrub` checks them all.
    /// Costs a copy on the first write to a cluster after each flush
    #[arg(long)]
    checksums: bool,
}

#[derive(Args)]
struct ImportArgs {
    /// The raw disk image (a file or block device; read, never changed)
    image: PathBuf,
    /// VM name (letters, digits, '.', '_', '-'); exports are NAME/disk0, NAME/disk1, ...
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
    /// Virtual CPUs of the VM
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// As for create; aligned keeps every block of the image at its own
    /// offset in the LUN but the first MiB
    #[arg(long, default_value = "offset", value_parser = layout_parser())]
    layout: Layout,
    /// Cluster size of the copy-on-write volume: a power of two from 4K to 2M
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    cluster_size: String,
}

/// `offset`, `truncate` or `aligned`, listed so completions offer them.
fn layout_parser() -> impl clap::builder::TypedValueParser<Value = Layout> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["offset", "truncate", "aligned"])
        .map(|s| s.parse::<Layout>().expect("a listed layout"))
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
    fn path(&self) -> Res<PathBuf> {
        resolve(&self.lun, self.pool.as_deref())
    }
}

fn resolve(lun: &str, pool: Option<&Path>) -> Res<PathBuf> {
    match pool {
        Some(dir) if !lun.contains('/') => {
            let p = pool::lun_path(dir, lun);
            if !pool::lun_exists(&p) {
                return Err(Fail::not_found(format!(
                    "no LUN named {lun:?} in pool {}",
                    dir.display()
                )));
            }
            Ok(p)
        }
        _ => Ok(PathBuf::from(lun)),
    }
}

/// The exit codes lunctl uses (all of them).
const EXITS: [Exit; 6] = Exit::ALL;

fn main() -> ExitCode {
    let cli: Cli = lungate_cli::output::parse_args("lunctl");
    if let Cmd::Doc(d) = &cli.cmd {
        return lungate_cli::docs::main(Cli::command(), d, &EXITS);
    }
    let out = Output::new("lunctl", cli.json);
    let op = cli.cmd.op();
    if let Some(url) = &cli.coordinator {
        let c = lungate_config::CoordinatorConfig {
            url: Some(url.clone()),
            ..Default::default()
        };
        match c.endpoint() {
            Ok(Some(addr)) => snapshots::set_coordinator(addr),
            Ok(None) => {}
            Err(e) => {
                return out
                    .error(op, Exit::Usage, &format!("--coordinator: {e}"))
                    .into()
            }
        }
    }
    match run(cli.cmd, &out) {
        Ok(()) => Exit::Ok.into(),
        Err(f) => out.error(op, f.exit, &f.msg).into(),
    }
}

/// `rbd:POOL` with `--conf`/`--id` as QEMU-style `:conf=`/`:id=` options.
fn rbd_options(dir: PathBuf, conf: Option<PathBuf>, id: Option<String>) -> Result<PathBuf, Fail> {
    if conf.is_none() && id.is_none() {
        return Ok(dir);
    }
    if !lun_manager::backing::is_rbd(&dir) {
        return Err(Fail::new(
            lungate_cli::Exit::Usage,
            format!(
                "--conf and --id are for RBD pools (rbd:POOL[/NAMESPACE]), not {}",
                dir.display()
            ),
        ));
    }
    let mut s = dir.display().to_string();
    if let Some(i) = id {
        s.push_str(&format!(":id={i}"));
    }
    if let Some(c) = conf {
        s.push_str(&format!(":conf={}", c.display()));
    }
    Ok(PathBuf::from(s))
}

fn run(cmd: Cmd, out: &Output) -> Res {
    match cmd {
        Cmd::Pool {
            cmd: PoolCmd::Init { dir, conf, id },
        } => provision::pool_init(out, &rbd_options(dir, conf, id)?),
        Cmd::Create(a) => provision::create(out, a),
        Cmd::Import(a) => provision::import(out, a),
        Cmd::Inspect { lun } => provision::inspect(out, &lun.path()?),
        Cmd::List { pool } => provision::list(out, &pool),
        Cmd::Resize { lun, disk, memory } => provision::resize(out, &lun.path()?, &disk, memory),
        Cmd::AttachSecondary {
            lun,
            secondary,
            pool,
        } => provision::attach_secondary(
            out,
            &resolve(&lun, pool.as_deref())?,
            &resolve(&secondary, pool.as_deref())?,
        ),
        Cmd::Delete { lun, yes } => provision::delete(out, &lun.path()?, yes),
        Cmd::Snapshot {
            lun,
            snap,
            description,
        } => snapshots::snapshot(out, &lun.path()?, &snap, &description),
        Cmd::Snapshots { lun } => snapshots::list(out, &lun.path()?),
        Cmd::Owner { lun } => snapshots::owner(out, &lun.path()?),
        Cmd::Revert { lun, snap } => snapshots::revert(out, &lun.path()?, &snap),
        Cmd::DeleteSnapshot { lun, snap } => snapshots::delete(out, &lun.path()?, &snap),
        Cmd::Clone {
            lun,
            snap,
            new_name,
        } => snapshots::clone(out, &lun.path()?, &snap, &new_name),
        Cmd::Flatten { lun } => snapshots::flatten(out, &lun.path()?),
        Cmd::Diff {
            lun,
            from,
            to,
            out: file,
        } => snapshots::diff(out, &lun.path()?, &from, to.as_deref(), file.as_deref()),
        Cmd::ApplyDiff { lun, file } => snapshots::apply_diff(out, &lun.path()?, &file),
        Cmd::Usage { lun } => snapshots::usage(out, &lun.path()?),
        Cmd::Scrub { lun } => snapshots::scrub(out, &lun.path()?),
        Cmd::SetHardware { lun, memory, vcpus } => {
            guest::set_hardware(out, &lun.path()?, memory, vcpus)
        }
        Cmd::GuestKey { lun } => guest::guest_key(out, &lun.path()?),
        Cmd::Repair { lun } => snapshots::repair(out, &lun.path()?),
        Cmd::Migrate {
            lun,
            to,
            to_pool,
            target_pool,
            downtime_ms,
            max_rate,
            keep_source,
            with_dependents,
            no_auto_converge,
            token_file,
            abort,
        } => migrate::migrate(
            out,
            &lun.path()?,
            migrate::Args {
                to,
                to_pool,
                target_pool,
                downtime_ms,
                max_rate,
                keep_source,
                with_dependents,
                auto_converge: !no_auto_converge,
                token_file,
                abort,
            },
        ),
        Cmd::Migrations { pool, control } => {
            migrate::list(out, pool.as_deref(), control.as_deref())
        }
        Cmd::Replicate {
            lun,
            to,
            target_pool,
            every,
            keep,
            max_rate,
            token_file,
            stop,
        } => replicate::replicate(
            out,
            &lun.path()?,
            replicate::Args {
                to,
                target_pool,
                every,
                keep,
                max_rate,
                token_file,
                stop,
            },
        ),
        Cmd::Replications { pool, control } => {
            replicate::list(out, pool.as_deref(), control.as_deref())
        }
        Cmd::Failover {
            name,
            pool,
            control,
            force,
        } => replicate::failover(out, &name, pool.as_deref(), control.as_deref(), force),
        Cmd::Scan { paths, html } => {
            let r = scan::scan(&paths);
            if let Some(f) = html {
                std::fs::write(&f, report::html(&r))
                    .map_err(|e| format!("{}: {e}", f.display()))?;
            }
            out.document(&r, || report::table(&r));
            Ok(())
        }
        Cmd::Doc(_) => unreachable!("handled in main"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
