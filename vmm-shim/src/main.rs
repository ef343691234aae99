//! `vmm-shim`: run a VM from its LUN through a lungate gateway, and save,
//! list, restore and stop it from the host (docs/vmm-shim.md).
//!
//! Exit codes: `run` exits with the payload's result (0: every check held)
//! or 1 if the shim failed; the other commands 0 on success, 1 on failure,
//! 2 on bad usage. `completions` and `man` are the shared documentation
//! subcommands of every lungate binary (lungate_cli::DocCmd).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use lungate_api::client::Client;
use lungate_api::nbd::client::Address;
use lungate_cli::{DocCmd, Exit};
use vmm_shim::control::{self, OpRequest};
use vmm_shim::controller::{self, Controller, Options, Start};
use vmm_shim::devices::block::BlockDevice;
use vmm_shim::devices::serial::Serial;
use vmm_shim::layout::GuestMode;

#[derive(Parser)]
#[command(
    name = "vmm-shim",
    version,
    about = "Run lungate VMs on KVM",
    after_help = Exit::table(&EXITS)
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct VmRef {
    /// The VM's name (its LUN's name)
    name: String,
    /// The pool the gateway serves it from
    #[arg(long, value_name = "DIR")]
    pool: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the VM until its guest exits or `vmm-shim stop`
    Run {
        #[command(flatten)]
        vm: VmRef,
        /// The gateway's control socket (default POOL/.lungate.sock)
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// The gateway's NBD listener: unix:PATH or HOST:PORT
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10809")]
        nbd: String,
        /// Write the serial console here (default: stdout)
        #[arg(long, value_name = "FILE")]
        serial: Option<PathBuf>,
        /// The payload guest's mode
        #[arg(long, value_enum, default_value = "selftest")]
        guest: GuestMode,
        /// The mode's parameter (dirty: pages per round)
        #[arg(long, default_value_t = 0)]
        guest_arg: u32,
        /// Revert to this save and continue from it instead of booting
        #[arg(long, value_name = "SNAP", conflicts_with = "resume")]
        restore: Option<String>,
        /// Continue from the state records in the live state region
        #[arg(long)]
        resume: bool,
        /// Wait for the VM to arrive by `vmm-shim migrate` (its LUN served
        /// by this gateway), then continue from its state records
        #[arg(long, conflicts_with_all = ["restore", "resume"])]
        incoming: bool,
        /// Give up (exit 1) if the guest has not exited by then
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// Benchmarks: fill the memory above the payload with data first
        #[arg(long, hide = true)]
        bench_fill: bool,
    },
    /// Save the running VM (disks and state, one atomic point) as SNAP
    Save {
        #[command(flatten)]
        vm: VmRef,
        snapshot: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the VM's saves
    List {
        #[command(flatten)]
        vm: VmRef,
        #[arg(long)]
        json: bool,
    },
    /// Revert the running VM to save SNAP and continue from there
    Restore {
        #[command(flatten)]
        vm: VmRef,
        snapshot: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop the running VM, keeping its state in the live records
    /// (`run --resume` continues from it)
    Stop {
        #[command(flatten)]
        vm: VmRef,
        #[arg(long)]
        json: bool,
    },
    /// Move the running VM with its LUN to another gateway (start `vmm-shim
    /// run --incoming` there first); the guest is paused only for the last
    /// memory pages, its vCPU state and the LUN's switch
    Migrate {
        #[command(flatten)]
        vm: VmRef,
        /// The target gateway's migration listener
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// The pool on the target gateway (default: its first)
        #[arg(long, value_name = "NAME")]
        target_pool: Option<String>,
        /// The LUN's pause budget, and half of it for the last memory pages
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Doc(DocCmd),
}

/// The exit codes of the host commands (`run` exits with the guest's own
/// result, see the module docs).
const EXITS: [Exit; 3] = [Exit::Ok, Exit::Failed, Exit::Usage];

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Doc(d) => lungate_cli::docs::main(Cli::command(), &d, &EXITS),
        Cmd::Run {
            vm,
            control,
            nbd,
            serial,
            guest,
            guest_arg,
            restore,
            resume,
            incoming,
            timeout,
            bench_fill,
        } => {
            let start = match (restore, resume || incoming) {
                (Some(s), _) => Start::Restore(s),
                (None, true) => Start::Resume,
                (None, false) => Start::Boot {
                    mode: guest,
                    arg: guest_arg,
                },
            };
            let r = if incoming {
                wait_incoming(&vm, control.as_deref(), timeout)
            } else {
                Ok(())
            };
            match r.and_then(|()| run(vm, control, &nbd, serial, start, timeout, bench_fill)) {
                Ok(code) => {
                    if code != 0 {
                        eprintln!("vmm-shim: the guest reported failure {code}");
                    }
                    ExitCode::from(code)
                }
                Err(e) => {
                    eprintln!("vmm-shim: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Save { vm, snapshot, json } => op(&vm, &OpRequest::Save { snapshot }, json),
        Cmd::List { vm, json } => op(&vm, &OpRequest::List, json),
        Cmd::Restore { vm, snapshot, json } => op(&vm, &OpRequest::Restore { snapshot }, json),
        Cmd::Stop { vm, json } => op(&vm, &OpRequest::Stop, json),
        Cmd::Migrate {
            vm,
            to,
            target_pool,
            downtime_ms,
            json,
        } => op(
            &vm,
            &OpRequest::Migrate {
                to,
                target_pool,
                downtime_ms,
            },
            json,
        ),
    }
}

fn op(vm: &VmRef, req: &OpRequest, json: bool) -> ExitCode {
    let sock = controller::socket_path(&vm.pool, &vm.name);
    match control::call(&sock, req) {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).expect("json"));
            } else if let Some(e) = &r.error {
                eprintln!("vmm-shim: error: {}: {e}", vm.name);
            } else {
                match req {
                    OpRequest::Save { .. } => println!(
                        "saved {} as {} (guest paused {} µs)",
                        vm.name,
                        r.data["snapshot"].as_str().unwrap_or("?"),
                        r.data["pause_us"]
                    ),
                    OpRequest::List => {
                        for n in r.data["saves"].as_array().into_iter().flatten() {
                            println!("{}", n.as_str().unwrap_or("?"));
                        }
                    }
                    OpRequest::Restore { snapshot } => println!(
                        "{} restored to {snapshot} ({} µs)",
                        vm.name, r.data["restore_us"]
                    ),
                    OpRequest::Stop => println!("{} stopped; its state is in its LUN", vm.name),
                    OpRequest::Migrate { to, .. } => println!(
                        "{} migrated to {to}: {} memory rounds, the guest paused here {} µs (the LUN's switch {} µs)",
                        vm.name,
                        r.data["memory_rounds"],
                        r.data["source_pause_us"],
                        r.data["lun_pause_us"]
                    ),
                }
            }
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("vmm-shim: error: {}: {e}", vm.name);
            ExitCode::from(1)
        }
    }
}

fn parse_nbd(s: &str) -> Result<Address, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        return Ok(Address::Unix(PathBuf::from(p)));
    }
    s.parse()
        .map(Address::Tcp)
        .map_err(|e| format!("--nbd {s:?}: expected unix:PATH or HOST:PORT ({e})"))
}

/// `run --incoming`: wait until the gateway serves the VM's LUN, which it
/// lists once the migration committed there.
fn wait_incoming(
    vm: &VmRef,
    control: Option<&std::path::Path>,
    timeout: Option<u64>,
) -> Result<(), String> {
    let sock = control.map_or_else(|| vm.pool.join(".lungate.sock"), PathBuf::from);
    let client = Client::new(&sock).map_err(|e| e.to_string())?;
    let limit = Duration::from_secs(timeout.unwrap_or(300));
    let t0 = std::time::Instant::now();
    println!("waiting for {}", vm.name);
    while !client
        .luns()
        .is_ok_and(|l| l.iter().any(|l| l.name == vm.name))
    {
        if t0.elapsed() > limit {
            return Err(format!(
                "{} did not arrive at the gateway at {} within {} s",
                vm.name,
                sock.display(),
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn run(
    vm: VmRef,
    control: Option<PathBuf>,
    nbd: &str,
    serial: Option<PathBuf>,
    start: Start,
    timeout: Option<u64>,
    fill: bool,
) -> Result<u8, String> {
    vmm_shim::vcpu::init_kick()?;
    let nbd = parse_nbd(nbd)?;
    let sock = control.unwrap_or_else(|| vm.pool.join(".lungate.sock"));
    let client = Client::new(&sock).map_err(|e| e.to_string())?;
    let luns = client.luns().map_err(|e| {
        format!(
            "no gateway answers at {} ({e}); start `lungate serve --pool {}` first",
            sock.display(),
            vm.pool.display()
        )
    })?;
    let lun = luns.iter().find(|l| l.name == vm.name).ok_or_else(|| {
        format!(
            "unknown VM {:?}: the gateway at {} serves {}",
            vm.name,
            sock.display(),
            if luns.is_empty() {
                "no LUNs".to_string()
            } else {
                luns.iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )
    })?;
    // Every disk of the LUN, as the gateway exports them.
    let mut disks: Vec<(u32, String)> = client
        .exports()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|e| e.lun_uuid == Some(lun.uuid))
        .map(|e| (e.disk, e.name))
        .collect();
    disks.sort();
    if disks.iter().enumerate().any(|(i, (d, _))| *d as usize != i) {
        return Err(format!(
            "{}: the gateway exports disks {:?}, not 0..n",
            vm.name,
            disks.iter().map(|d| d.0).collect::<Vec<_>>()
        ));
    }
    let exports: Vec<String> = disks.into_iter().map(|d| d.1).collect();
    let block = BlockDevice::connect(&nbd, &exports)
        .map_err(|e| format!("the VM's disks at {nbd}: {e}"))?;
    let out: Box<dyn std::io::Write + Send> = match &serial {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("--serial {}: {e}", p.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let opsock = controller::socket_path(&vm.pool, &vm.name);
    let listener = control::bind(&opsock)?;
    let opts = Options {
        name: vm.name.clone(),
        start,
        fill,
        timeout: timeout.map(Duration::from_secs),
    };
    let mut c = Controller::new(
        opts,
        client,
        lun.uuid,
        block,
        Serial::new(out),
        tx.clone(),
        rx,
    );
    let r = c.as_mut().map_err(|e| e.clone()).and_then(|c| {
        control::serve(listener, tx);
        println!("control unix {}", opsock.display());
        c.run()
    });
    let _ = std::fs::remove_file(&opsock);
    r
}
