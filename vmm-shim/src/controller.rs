//! The shim's controller: one thread that owns the running VM and does
//! everything that changes it: boot, the guest's and the operator's save,
//! list, restore, delete, reconfigure and info, resume, stop.
//!
//! ```text
//!  guest ──port A──▶ vCPU thread ──GuestRequest──▶ controller ──▶ gateway
//!  guest ◀─port B── state service ◀──events────── controller     control API
//!  operator ──unix socket──▶ control thread ──Operator──▶ controller
//! ```
//!
//! Save: park every vCPU (a pending port exit finished), flush the disk
//! through NBD, write vCPU, device and memory state as one record batch,
//! take one snapshot of the VM's consistency group, resume. Restore: check
//! the saved state fits the configured hardware (or refuse, changing
//! nothing), stop the VM, revert the group through the gateway's live
//! switch, build a fresh VM from the records and resume it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lungate_api::client::Client;
use lungate_api::records::{GuestService, HardwareConfig, RecordType};
use lungate_api::types::{RecordBatch, RecordPut};
use uuid::Uuid;

use crate::control::{OpReply, OpRequest};
use crate::devices::block::BlockDevice;
use crate::devices::serial::Serial;
use crate::devices::{Bus, GuestRequest};
use crate::layout::{BootParams, GuestMode, BOOT_PARAMS, LOAD, PAGE, PAYLOAD_MAGIC};
use crate::snapshot::{self, Baseline, HardwareChange, Machine, PageMap, SAVE_PREFIX};
use crate::state::{flag, kind, status, Event, Request, ServiceState, StateService};
use crate::vcpu::{Report, VcpuState, VcpuThread};
use crate::vm::Vm;

/// Everything the controller hears.
pub enum Msg {
    Vcpu(u32, Report),
    Guest(GuestRequest),
    /// A command, where to answer, and word that the answer went out.
    Operator(OpRequest, Sender<OpReply>, Receiver<()>),
}

/// How `run` starts the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Boot the payload.
    Boot { mode: GuestMode, arg: u32 },
    /// Revert to a saved snapshot and continue from it.
    Restore(String),
    /// Continue from the state records in the live state region (what
    /// `stop` left, or what a clone inherited from its snapshot).
    Resume,
}

pub struct Options {
    pub name: String,
    pub start: Start,
    pub fill: bool,
    pub timeout: Option<Duration>,
}

struct Running {
    vm: Vm,
    threads: Vec<VcpuThread>,
    service: Arc<Mutex<StateService>>,
    memory: u64,
    vcpus: u32,
    baseline: Option<Baseline>,
}

pub struct Controller {
    opts: Options,
    client: Client,
    /// The LUN as the gateway knows it (its UUID).
    lun: String,
    lun_uuid: Uuid,
    key: [u8; 16],
    generation: u64,
    block: Arc<Mutex<BlockDevice>>,
    serial: Arc<Mutex<Serial>>,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    deferred: VecDeque<Msg>,
    vm: Option<Running>,
    /// The guest-service record was another LUN's when this run began.
    generation_moved_at_start: bool,
    /// How many VMs this run built; the running one's number.
    instance: u64,
    /// `vmm-shim migrate` moved the VM away: this shim is done.
    migrated_away: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn new_epoch() -> u64 {
    Uuid::new_v4().as_u64_pair().0
}

fn or_bitmaps(a: &mut [u64], b: &[u64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x |= *y;
    }
}

/// Why a guest request or an operator command failed, with the status
/// the guest's error event carries.
struct Failure {
    status: u32,
    message: String,
}

fn failed(message: impl Into<String>) -> Failure {
    Failure {
        status: status::FAILED,
        message: message.into(),
    }
}

impl Controller {
    /// Connect to the gateway and the disk; `lun_uuid` names the LUN.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        opts: Options,
        client: Client,
        lun_uuid: Uuid,
        block: BlockDevice,
        serial: Serial,
        tx: Sender<Msg>,
        rx: Receiver<Msg>,
    ) -> Result<Controller, String> {
        let lun = lun_uuid.to_string();
        let mut c = Controller {
            opts,
            client,
            lun,
            lun_uuid,
            key: [0; 16],
            generation: 0,
            block: Arc::new(Mutex::new(block)),
            serial: Arc::new(Mutex::new(serial)),
            tx,
            rx,
            deferred: VecDeque::new(),
            vm: None,
            generation_moved_at_start: false,
            instance: 0,
            migrated_away: false,
        };
        c.generation_moved_at_start = c.refresh_identity()?;
        Ok(c)
    }

    /// Read the guest-service record; a record stamped for another LUN
    /// was copied by a clone: the VM is a new copy, its generation moves
    /// on. Returns whether it did.
    fn refresh_identity(&mut self) -> Result<bool, String> {
        let gs: GuestService = self
            .client
            .record_json(&self.lun, RecordType::GuestService, 0)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "{}: the LUN has no guest key (guest-service record); `lunctl guest-key {}` makes one",
                    self.opts.name, self.opts.name
                )
            })?;
        self.key = gs
            .key_bytes()
            .ok_or_else(|| format!("{}: the guest key is not 32 hex digits", self.opts.name))?;
        let mut moved = false;
        let mut gs = gs;
        if gs.lun_uuid != self.lun_uuid {
            gs.generation += 1;
            gs.lun_uuid = self.lun_uuid;
            let b = serde_json::to_vec(&gs).expect("serialises");
            self.put_record(RecordType::GuestService, b)?;
            moved = true;
        }
        self.generation = gs.generation;
        Ok(moved)
    }

    fn put_record(&self, t: RecordType, b: Vec<u8>) -> Result<(), String> {
        let batch = RecordBatch {
            put: vec![RecordPut {
                rtype: t,
                instance: 0,
                length: b.len() as u64,
            }],
            remove: vec![],
        };
        self.client
            .write_records(&self.lun, &batch, |_, s| s.write(&b))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn hardware(&self) -> Result<HardwareConfig, String> {
        let hw: HardwareConfig = self
            .client
            .record_json(&self.lun, RecordType::HardwareConfig, 0)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{}: the LUN has no hardware-config record", self.opts.name))?;
        if hw.memory_bytes == 0 {
            return Err(format!(
                "{}: the LUN has no memory (hardware-config memory_bytes is 0): it holds disks \
                 only; a VM LUN needs lunctl create --memory SIZE",
                self.opts.name
            ));
        }
        crate::vm::check_hardware(hw.memory_bytes, hw.vcpus)
            .map_err(|e| format!("{}: {e}", self.opts.name))?;
        Ok(hw)
    }

    // ----- building a VM --------------------------------------------------

    /// Make the VM's service, bus and threads around a prepared `vm`.
    fn launch(
        &mut self,
        mut vm: Vm,
        service: StateService,
        baseline: Option<Baseline>,
    ) -> Result<(), String> {
        let service = Arc::new(Mutex::new(service));
        let (req_tx, req_rx) = std::sync::mpsc::channel::<GuestRequest>();
        // Forward guest requests into the controller's one channel.
        let fwd = self.tx.clone();
        std::thread::Builder::new()
            .name("requests".into())
            .spawn(move || {
                for r in req_rx {
                    if fwd.send(Msg::Guest(r)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        self.instance += 1;
        let bus = Arc::new(Bus {
            instance: self.instance,
            ram: vm.ram.clone(),
            serial: self.serial.clone(),
            block: self.block.clone(),
            state: service.clone(),
            requests: req_tx,
        });
        let (rep_tx, rep_rx) = std::sync::mpsc::channel::<(u32, Report)>();
        let fwd = self.tx.clone();
        std::thread::Builder::new()
            .name("reports".into())
            .spawn(move || {
                for (i, r) in rep_rx {
                    if fwd.send(Msg::Vcpu(i, r)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        let memory = vm.ram.size();
        let fds = std::mem::take(&mut vm.vcpus);
        let vcpus = fds.len() as u32;
        let mut threads = Vec::with_capacity(fds.len());
        for (i, fd) in fds.into_iter().enumerate() {
            threads.push(VcpuThread::spawn(
                i as u32,
                fd,
                bus.clone(),
                vm.msr_list.clone(),
                rep_tx.clone(),
            )?);
        }
        self.vm = Some(Running {
            vm,
            threads,
            service,
            memory,
            vcpus,
            baseline,
        });
        Ok(())
    }

    fn boot(&mut self, mode: GuestMode, arg: u32) -> Result<(), String> {
        let hw = self.hardware()?;
        let vm = Vm::new(hw.memory_bytes, hw.vcpus, None).map_err(|e| e.to_string())?;
        crate::boot::write_tables(&vm.ram).map_err(|e| e.to_string())?;
        let image = crate::payload::IMAGE;
        if image.get(16..24) != Some(&PAYLOAD_MAGIC[..]) {
            return Err("the built-in payload has no LGPAYLD1 magic".into());
        }
        vm.ram.load(LOAD, image).map_err(|e| e.to_string())?;
        if self.opts.fill {
            fill_memory(&vm.ram, LOAD + image.len() as u64).map_err(|e| e.to_string())?;
        }
        let epoch = new_epoch();
        let (disk_bytes, disks) = {
            let b = lock(&self.block);
            (b.size(0), b.count() as u32)
        };
        let bp = BootParams {
            mode,
            memory: hw.memory_bytes,
            vcpus: hw.vcpus,
            arg,
            key: self.key,
            epoch,
            disk_bytes,
            disks,
        };
        vm.ram
            .load(BOOT_PARAMS, &bp.encode())
            .map_err(|e| e.to_string())?;
        for i in 0..hw.vcpus as usize {
            vm.reset_vcpu(i).map_err(|e| e.to_string())?;
        }
        let service = StateService::new(
            &self.opts.name,
            self.key,
            epoch,
            hw.vcpus,
            ServiceState::default(),
        );
        self.launch(vm, service, None)
    }

    /// Build a fresh VM from the live records, as `hw` says, and queue
    /// `events` after the saved ones. Called after a revert (restore) or
    /// on its own (resume).
    fn load(
        &mut self,
        hw: &HardwareConfig,
        mut events: Vec<Event>,
        generation_moved: bool,
    ) -> Result<HardwareChange, String> {
        let saved = snapshot::read_saved(&self.client, &self.lun)?;
        let host = Vm::host_cpuid().map_err(|e| e.to_string())?;
        let change = snapshot::check_restore(&saved.machine, hw.memory_bytes, hw.vcpus, &host)?;
        let vm = Vm::new(hw.memory_bytes, hw.vcpus, Some(saved.machine.cpuid.clone()))
            .map_err(|e| e.to_string())?;
        snapshot::load_memory(&self.client, &self.lun, &vm.ram, &saved.map)?;
        for v in &saved.vcpus {
            // The MSRs this host can set; a saved one it cannot is refused.
            v.apply(&vm.vcpus[v.index as usize])
                .map_err(|e| e.to_string())?;
        }
        for i in saved.machine.vcpus..hw.vcpus {
            vm.reset_vcpu(i as usize).map_err(|e| e.to_string())?;
        }
        vm.set_clock(&kvm_bindings::kvm_clock_data {
            clock: saved.machine.clock_ns,
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
        let epoch = new_epoch();
        let mut service = StateService::new(
            &self.opts.name,
            self.key,
            epoch,
            hw.vcpus,
            saved.machine.service.clone(),
        );
        for e in saved.machine.after_restore.iter().cloned() {
            if e.kind == kind::MIGRATED {
                // Filled in below, with the downtime.
                events.insert(0, e);
            } else {
                service.push(e);
            }
        }
        if change.changed() {
            events.push(Event::new(kind::HARDWARE, 0).with_data(&change.data()));
        }
        if generation_moved {
            let mut d = self.lun_uuid.as_bytes().to_vec();
            d.extend_from_slice(&self.generation.to_le_bytes());
            events.push(Event::new(kind::GENERATION, 0).with_data(&d));
        }
        if let Some(at) = saved.machine.migrated_at_ns {
            // The first resume after `vmm-shim migrate`: the guest was
            // paused on the source at `at`. The guest that asked for it
            // gets its request's event (its app data) from the save; an
            // operator's migration gets one of its own.
            let downtime_us = now_ns().saturating_sub(at) / 1000;
            eprintln!(
                "vmm-shim: {}: resumed after a migration; guest downtime {downtime_us} µs",
                self.opts.name
            );
            println!("migrated downtime_us {downtime_us}");
            if !saved
                .machine
                .after_restore
                .iter()
                .any(|e| e.kind == kind::MIGRATED)
            {
                events.insert(0, Event::new(kind::MIGRATED, 0));
            }
            for e in events.iter_mut().filter(|e| e.kind == kind::MIGRATED) {
                *e = e
                    .clone()
                    .with_text(format!("downtime_us={downtime_us}").as_bytes());
            }
        }
        for e in events {
            service.push(e);
        }
        let mut map = PageMap::from_record(&saved.map, saved.machine.memory_bytes / PAGE)?;
        map.resize(hw.memory_bytes / PAGE);
        let baseline = Baseline {
            map,
            images: saved.images,
        };
        self.launch(vm, service, Some(baseline))?;
        Ok(change)
    }

    // ----- pausing ----------------------------------------------------------

    /// Park every vCPU; their states in index order.
    fn pause_all(&mut self) -> Result<Vec<VcpuState>, String> {
        let r = self.vm.as_ref().ok_or("no VM is running")?;
        for t in &r.threads {
            t.request_pause();
        }
        let n = r.threads.len();
        let mut states: Vec<Option<VcpuState>> = (0..n).map(|_| None).collect();
        let mut got = 0;
        while got < n {
            match self.rx.recv_timeout(Duration::from_secs(30)) {
                Ok(Msg::Vcpu(i, Report::Parked(s))) => {
                    let s = s.map_err(|e| e.to_string())?;
                    states[i as usize] = Some(*s);
                    got += 1;
                }
                Ok(Msg::Vcpu(i, Report::GuestExit(code))) => {
                    self.deferred
                        .push_back(Msg::Vcpu(i, Report::GuestExit(code)));
                    return Err(format!("the guest exited ({code}) while being paused"));
                }
                Ok(Msg::Vcpu(i, Report::Failed(e))) => {
                    self.deferred
                        .push_back(Msg::Vcpu(i, Report::Failed(e.clone())));
                    return Err(e);
                }
                Ok(other) => self.deferred.push_back(other),
                Err(_) => return Err("a vCPU did not stop within 30 s".into()),
            }
        }
        Ok(states.into_iter().map(|s| s.expect("all parked")).collect())
    }

    fn resume_all(&self) {
        if let Some(r) = &self.vm {
            for t in &r.threads {
                t.resume();
            }
        }
    }

    fn stop_vm(&mut self) {
        if let Some(r) = self.vm.take() {
            for t in r.threads {
                t.stop();
            }
        }
    }

    // ----- operations -------------------------------------------------------

    fn save_names(&self) -> Result<Vec<String>, String> {
        Ok(self
            .client
            .snapshots(&self.lun)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|s| s.description.starts_with(SAVE_PREFIX))
            .map(|s| s.name)
            .collect())
    }

    /// Pause, write the state records, snapshot (if `snap`), resume.
    fn save(
        &mut self,
        snap: Option<&str>,
        request: Option<(u32, Vec<u8>)>,
    ) -> Result<serde_json::Value, Failure> {
        if let Some(name) = snap {
            if self
                .client
                .snapshots(&self.lun)
                .map_err(|e| failed(e.to_string()))?
                .iter()
                .any(|s| s.name == name)
            {
                return Err(failed(format!("a snapshot named {name:?} already exists")));
            }
        }
        let t0 = Instant::now();
        let states = self.pause_all().map_err(failed)?;
        let r = self.write_live(&states, snap, request, None);
        let snapshot_us = match (&r, snap) {
            (Ok(_), Some(name)) => {
                let t = Instant::now();
                let desc = format!("{SAVE_PREFIX} at {}", now());
                match self.client.snapshot(&self.lun, name, &desc) {
                    Ok(_) => Ok(t.elapsed().as_micros() as u64),
                    Err(e) => Err(failed(e.to_string())),
                }
            }
            _ => Ok(0),
        };
        self.resume_all();
        let pause_us = t0.elapsed().as_micros() as u64;
        let stats = r?;
        let snapshot_us = snapshot_us?;
        Ok(serde_json::json!({
            "snapshot": snap,
            "pause_us": pause_us,
            "records_us": stats.records_us,
            "snapshot_us": snapshot_us,
            "full": stats.full,
            "pages_written": stats.pages_written,
            "image_bytes": stats.image_bytes,
        }))
    }

    /// With the vCPUs parked: flush the disk and write every record. The
    /// last save of a migration passes the pages its pre-copy found dirty
    /// but did not write, and when the guest was paused (Unix ns).
    fn write_live(
        &mut self,
        states: &[VcpuState],
        snap: Option<&str>,
        request: Option<(u32, Vec<u8>)>,
        migration: Option<(&[u64], u64, Option<Event>)>,
    ) -> Result<snapshot::SaveStats, Failure> {
        lock(&self.block)
            .flush()
            .map_err(|e| failed(format!("disk flush: {e}")))?;
        let r = self.vm.as_mut().expect("running");
        let clock = r.vm.clock().map_err(|e| failed(e.to_string()))?;
        let mut dirty = r.vm.dirty_log().map_err(|e| failed(e.to_string()))?;
        or_bitmaps(&mut dirty, &r.vm.ram.take_vmm_dirty());
        let mut after = Vec::new();
        if let Some((carried, _, ev)) = &migration {
            or_bitmaps(&mut dirty, carried);
            after.extend(ev.clone());
        }
        if let (Some((id, data)), Some(name)) = (request, snap) {
            let mut e = Event::new(kind::SAVED, id)
                .with_text(name.as_bytes())
                .with_data(&data);
            e.flags |= flag::AFTER_RESTORE;
            after.push(e);
        }
        let machine = Machine {
            version: 1,
            memory_bytes: r.memory,
            vcpus: r.vcpus,
            cpuid: r.vm.cpuid.clone(),
            msrs: r.vm.msr_list.to_vec(),
            clock_ns: clock.clock,
            service: lock(&r.service).snapshot(),
            after_restore: after,
            used_bytes: 0,
            saved_at: now(),
            migrated_at_ns: migration.as_ref().map(|(_, at, _)| *at),
        };
        let old_vcpus = r.vcpus;
        let paused = snapshot::Paused {
            ram: &r.vm.ram,
            vcpus: states,
            dirty: &dirty,
            old_vcpus,
        };
        match snapshot::write_state(
            &self.client,
            &self.lun,
            paused,
            machine,
            r.baseline.as_ref(),
        ) {
            Ok((b, stats)) => {
                r.baseline = Some(b);
                Ok(stats)
            }
            Err(e) => {
                // The dirty log is spent: the next save writes everything.
                r.baseline = None;
                Err(failed(e))
            }
        }
    }

    /// `vmm-shim migrate`: move the running VM with its LUN to the gateway
    /// at `to`. The gateway migrates the LUN with a hold (it copies and
    /// keeps copying, but does not switch until released); meanwhile the
    /// guest's memory is pre-copied into the state region in rounds driven
    /// by KVM's dirty log, so the gateway's rounds carry it too. When the
    /// memory left fits, the vCPUs park, the last dirty pages, the vCPU and
    /// device state go in as one record batch (the live state a `run
    /// --resume` continues from), the disk is flushed and the migration is
    /// released: its switch moves the LUN, and with it the whole VM. Once
    /// the target owns the LUN this VM stops for good; if the migration
    /// fails instead, the guest resumes here, having lost nothing.
    fn migrate(
        &mut self,
        to: String,
        target_pool: Option<String>,
        downtime_ms: Option<u64>,
        request: Option<(u32, Vec<u8>)>,
    ) -> Result<serde_json::Value, Failure> {
        use lungate_api::types::{MigrateRequest, MigrationPhase};
        if self.vm.is_none() {
            return Err(failed("no VM is running"));
        }
        let t0 = Instant::now();
        let req = MigrateRequest {
            to: Some(to.clone()),
            target_pool,
            downtime_ms,
            hold: true,
            hold_ms: Some(120_000),
            ..Default::default()
        };
        let id = self
            .client
            .migrate(&self.lun, &req)
            .map_err(|e| failed(format!("the gateway refused the migration: {e}")))?
            .id;
        let info = |c: &Client| c.migration(id).map_err(|e| failed(e.to_string()));
        let lun = self.lun.clone();
        let abort = move |c: &Client, why: String| {
            let _ = c.abort_migration(&lun);
            failed(why)
        };
        // Pre-copy, the guest running.
        let (mut pending, mut full) = {
            let r = self.vm.as_ref().expect("checked");
            match &r.baseline {
                Some(b) => (b.clone(), false),
                None => {
                    // After a boot: a first image must not reuse an
                    // instance the live records' map still points at.
                    let images = snapshot::read_saved(&self.client, &self.lun)
                        .map(|s| s.images)
                        .unwrap_or_default();
                    (
                        Baseline {
                            map: PageMap::zero(r.vm.ram.pages()),
                            images,
                        },
                        true,
                    )
                }
            }
        };
        let budget = Duration::from_millis(downtime_ms.unwrap_or(50));
        let (mut rounds, mut precopy_bytes) = (0u32, 0u64);
        let mut rate = 0f64; // bytes per second, measured on big rounds
        let mut last: Option<(u64, Duration)> = None; // pages, time
        let carried = loop {
            let r = self.vm.as_mut().expect("checked");
            let mut dirty = r.vm.dirty_log().map_err(|e| failed(e.to_string()))?;
            or_bitmaps(&mut dirty, &r.vm.ram.take_vmm_dirty());
            let n: u64 = dirty.iter().map(|w| u64::from(w.count_ones())).sum();
            // The last pages fit when a round that wrote at least as many
            // took at most half the budget (a round's time is mostly its
            // request, not its bytes), or at the measured rate.
            let fits = n == 0
                || last.is_some_and(|(k, t)| n <= k && t <= budget / 2)
                || (rate > 0.0
                    && Duration::try_from_secs_f64((n * PAGE) as f64 / rate)
                        .is_ok_and(|left| left <= budget / 2));
            if !full && (fits || rounds >= 10) {
                break dirty;
            }
            let t = Instant::now();
            let s = snapshot::precopy(
                &self.client,
                &self.lun,
                &r.vm.ram,
                &dirty,
                full,
                &mut pending,
            )
            .map_err(|e| abort(&self.client, format!("memory pre-copy: {e}")))?;
            // The pre-copied images exist now: a later save builds on them.
            r.baseline = Some(pending.clone());
            full = false;
            rounds += 1;
            precopy_bytes += s.image_bytes;
            last = Some((n, t.elapsed()));
            if s.image_bytes >= 1 << 20 {
                rate = s.image_bytes as f64 / t.elapsed().as_secs_f64().max(1e-6);
            }
            let i = info(&self.client)?;
            if i.phase.is_final() {
                return Err(failed(format!(
                    "the LUN's migration ended ({:?}): {}",
                    i.phase,
                    i.error.unwrap_or_default()
                )));
            }
        };
        // Wait for the gateway's copy to converge before pausing the guest.
        loop {
            let i = info(&self.client)?;
            if i.held {
                break;
            }
            if i.phase.is_final() {
                return Err(failed(format!(
                    "the LUN's migration ended ({:?}): {}",
                    i.phase,
                    i.error.unwrap_or_default()
                )));
            }
            if t0.elapsed() > Duration::from_secs(120) {
                return Err(abort(
                    &self.client,
                    "the LUN's copy did not converge within 120 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The switch: park, write the rest, release, wait for the commit.
        let paused = Instant::now();
        let paused_at_ns = now_ns();
        let states = match self.pause_all() {
            Ok(s) => s,
            Err(e) => {
                self.resume_all();
                return Err(abort(&self.client, e));
            }
        };
        // The guest that asked gets its answer on the new host.
        let answer = request.map(|(id, data)| {
            let mut e = Event::new(kind::MIGRATED, id).with_data(&data);
            e.flags |= flag::AFTER_RESTORE;
            e
        });
        let stats =
            match self.write_live(&states, None, None, Some((&carried, paused_at_ns, answer))) {
                Ok(s) => s,
                Err(f) => {
                    self.resume_all();
                    return Err(abort(&self.client, f.message));
                }
            };
        let records_us = paused.elapsed().as_micros() as u64;
        if let Err(e) = self.client.release_migration(id) {
            self.resume_all();
            return Err(abort(&self.client, format!("release the migration: {e}")));
        }
        let end = loop {
            match self.client.migration(id) {
                Ok(i) if matches!(i.phase, MigrationPhase::Forwarding | MigrationPhase::Done) => {
                    break Ok(i)
                }
                Ok(i) if i.phase.is_final() => {
                    break Err(format!("{:?}: {}", i.phase, i.error.unwrap_or_default()))
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(2)),
                // The gateway is the one that knows: keep the guest parked
                // rather than risk running it on both hosts.
                Err(e) => {
                    if paused.elapsed() > Duration::from_secs(300) {
                        break Err(format!(
                            "the gateway does not answer ({e}); the VM stays parked"
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        match end {
            Ok(i) => {
                self.stop_vm();
                self.migrated_away = true;
                let source_pause_us = paused.elapsed().as_micros() as u64;
                eprintln!(
                    "vmm-shim: {}: migrated to {to} ({rounds} memory rounds, {precopy_bytes} bytes pre-copied); the guest is paused here since {source_pause_us} µs and resumes on the new host",
                    self.opts.name
                );
                Ok(serde_json::json!({
                    "migrated": true,
                    "to": to,
                    "migration": id,
                    "memory_rounds": rounds,
                    "memory_precopy_bytes": precopy_bytes,
                    "memory_final_bytes": stats.image_bytes,
                    "final_pages": stats.pages_written,
                    "records_us": records_us,
                    "source_pause_us": source_pause_us,
                    "lun_pause_us": i.pause_us,
                    "lun_bytes": i.bytes,
                    "lun_rounds": i.rounds,
                    "paused_at_ns": paused_at_ns,
                    "elapsed_ms": t0.elapsed().as_millis() as u64,
                }))
            }
            Err(e) => {
                if e.contains("stays parked") {
                    return Err(failed(e));
                }
                // Not committed: the source still owns the LUN, whose live
                // records hold this very state; go on here.
                self.resume_all();
                Err(failed(format!(
                    "the migration failed, the VM goes on here: {e}"
                )))
            }
        }
    }

    /// Where a guest's migration request goes: its own `HOST:PORT`, or
    /// (empty) the first `HOST:PORT` entry of the VM's policy `migrate_to`
    /// (the gateway checks the policy either way).
    fn guest_target(&self, to: String) -> Result<String, Failure> {
        if !to.is_empty() {
            return Ok(to);
        }
        let refused = |m: String| Failure {
            status: status::REFUSED,
            message: m,
        };
        let p: Option<lungate_api::records::Policy> = self
            .client
            .record_json(&self.lun, RecordType::Policy, 0)
            .map_err(|e| failed(e.to_string()))?;
        p.and_then(|p| {
            p.migrate_to
                .into_iter()
                .find(|r| r.parse::<std::net::SocketAddr>().is_ok())
        })
        .ok_or_else(|| {
            refused(
                "the request names no target and the VM's policy has no HOST:PORT in migrate_to"
                    .into(),
            )
        })
    }

    /// Revert to `snap` and continue from it on the configured hardware.
    fn restore(
        &mut self,
        snap: &str,
        request: Option<(u32, Vec<u8>)>,
    ) -> Result<serde_json::Value, Failure> {
        let t0 = Instant::now();
        let list = self
            .client
            .snapshots(&self.lun)
            .map_err(|e| failed(e.to_string()))?;
        let Some(s) = list.iter().find(|s| s.name == snap) else {
            return Err(Failure {
                status: status::NOT_FOUND,
                message: format!("no save named {snap:?}"),
            });
        };
        if !s.description.starts_with(SAVE_PREFIX) {
            return Err(Failure {
                status: status::NOT_FOUND,
                message: format!("snapshot {snap:?} is a disk snapshot, not a vmm-shim save"),
            });
        }
        // Everything that can refuse, before anything changes.
        let hw = self.hardware().map_err(failed)?;
        let saved = snapshot::read_machine_in(&self.client, &self.lun, snap).map_err(failed)?;
        let host = Vm::host_cpuid().map_err(|e| failed(e.to_string()))?;
        snapshot::check_restore(&saved, hw.memory_bytes, hw.vcpus, &host).map_err(|m| Failure {
            status: status::REFUSED,
            message: m,
        })?;
        self.stop_vm();
        let paused = self
            .client
            .revert(&self.lun, snap)
            .map_err(|e| failed(format!("revert: {e}")))?;
        // The revert brought back the snapshot's records, its hardware
        // config among them: the configured one applies.
        let now_hw = self.hardware().map_err(failed)?;
        if now_hw != hw {
            self.put_record(
                RecordType::HardwareConfig,
                serde_json::to_vec(&hw).expect("serialises"),
            )
            .map_err(failed)?;
        }
        let moved = self.refresh_identity().map_err(failed)?;
        let mut ev = Event::new(kind::RESTORED, 0).with_text(snap.as_bytes());
        if let Some((id, data)) = request {
            ev.id = id;
            ev = ev.with_data(&data);
        }
        let change = self.load(&hw, vec![ev], moved).map_err(failed)?;
        Ok(serde_json::json!({
            "snapshot": snap,
            "restore_us": t0.elapsed().as_micros() as u64,
            "revert_pause_us": paused.pause_us,
            "memory_bytes": change.new_memory,
            "vcpus": change.new_vcpus,
            "hardware_changed": change.changed(),
        }))
    }

    fn info_event(&self, id: u32) -> Event {
        let r = self.vm.as_ref().expect("running");
        let mut d = self.lun_uuid.as_bytes().to_vec();
        d.extend_from_slice(&self.generation.to_le_bytes());
        d.extend_from_slice(&r.memory.to_le_bytes());
        d.extend_from_slice(&r.vcpus.to_le_bytes());
        Event::new(kind::INFO, id)
            .with_text(self.opts.name.as_bytes())
            .with_data(&d)
    }

    fn queue(&self, e: Event) {
        if let Some(r) = &self.vm {
            lock(&r.service).push(e);
        }
    }

    fn guest(&mut self, g: GuestRequest) {
        let id = g.id;
        let result: Result<Option<Event>, Failure> = match g.request {
            Request::Save { name, data } => {
                self.save(Some(&name), Some((id, data.clone()))).map(|_| {
                    Some(
                        Event::new(kind::SAVED, id)
                            .with_text(name.as_bytes())
                            .with_data(&data),
                    )
                })
            }
            Request::List => self
                .save_names()
                .map(|n| Some(Event::new(kind::LISTED, id).with_text(n.join("\n").as_bytes())))
                .map_err(failed),
            Request::Restore { name, data } => {
                // Its completion goes to the restored guest.
                self.restore(&name, Some((id, data))).map(|_| None)
            }
            Request::Delete { name } => {
                if !self
                    .save_names()
                    .map_err(failed)
                    .is_ok_and(|n| n.contains(&name))
                {
                    Err(Failure {
                        status: status::NOT_FOUND,
                        message: format!("no save named {name:?}"),
                    })
                } else {
                    self.client
                        .delete_snapshot(&self.lun, &name)
                        .map(|_| Some(Event::new(kind::DELETED, id).with_text(name.as_bytes())))
                        .map_err(|e| failed(e.to_string()))
                }
            }
            Request::Reconfigure { memory, vcpus } => self
                .reconfigure(memory, vcpus)
                .map(|()| Some(Event::new(kind::RECONFIGURED, id))),
            Request::Info => Ok(Some(self.info_event(id))),
            Request::Migrate { to, data } => self
                .guest_target(to)
                .and_then(|to| self.migrate(to, None, None, Some((id, data))))
                .map(|_| None),
        };
        match result {
            Ok(Some(e)) => self.queue(e),
            Ok(None) => {}
            Err(f) => {
                eprintln!(
                    "vmm-shim: {}: guest request {id} failed: {}",
                    self.opts.name, f.message
                );
                self.queue(Event::error(id, f.status, &f.message));
            }
        }
    }

    fn reconfigure(&self, memory: u64, vcpus: u32) -> Result<(), Failure> {
        crate::vm::check_hardware(memory, vcpus).map_err(|m| Failure {
            status: status::REFUSED,
            message: m,
        })?;
        let mut hw = self.hardware().map_err(failed)?;
        hw.memory_bytes = memory;
        hw.vcpus = vcpus;
        self.put_record(
            RecordType::HardwareConfig,
            serde_json::to_vec(&hw).expect("serialises"),
        )
        .map_err(|m| Failure {
            status: status::REFUSED,
            message: m,
        })
    }

    fn operator(&mut self, op: OpRequest) -> (OpReply, bool) {
        let reply = |r: Result<serde_json::Value, Failure>| match r {
            Ok(v) => OpReply::ok(v),
            Err(f) => OpReply::err(f.message),
        };
        match op {
            OpRequest::Save { snapshot } => {
                let name = snapshot.unwrap_or_else(|| format!("save-{}", now()));
                (reply(self.save(Some(&name), None)), false)
            }
            OpRequest::List => (
                reply(
                    self.save_names()
                        .map(|n| serde_json::json!({ "saves": n }))
                        .map_err(failed),
                ),
                false,
            ),
            OpRequest::Restore { snapshot } => (reply(self.restore(&snapshot, None)), false),
            OpRequest::Migrate {
                to,
                target_pool,
                downtime_ms,
            } => {
                let r = self.migrate(to, target_pool, downtime_ms, None);
                let stop = r.is_ok();
                (reply(r), stop)
            }
            OpRequest::Stop => {
                let r = self
                    .pause_all()
                    .map_err(failed)
                    .and_then(|states| self.write_live(&states, None, None, None))
                    .map(|s| serde_json::json!({ "stopped": true, "image_bytes": s.image_bytes }));
                let stop = r.is_ok();
                if !stop {
                    self.resume_all();
                }
                (reply(r), stop)
            }
        }
    }

    /// Start the VM as `opts.start` says and run it until the guest
    /// leaves through its exit port (its code is returned), `stop`, or an
    /// error.
    pub fn run(&mut self) -> Result<u8, String> {
        match self.opts.start.clone() {
            Start::Boot { mode, arg } => self.boot(mode, arg)?,
            Start::Restore(snap) => {
                let saved = {
                    // A placeholder guest is not needed: restore works with no VM.
                    self.restore(&snap, None).map_err(|f| f.message)?
                };
                eprintln!("vmm-shim: {}: restored {saved}", self.opts.name);
            }
            Start::Resume => {
                let hw = self.hardware()?;
                let moved = self.generation_moved_at_start;
                self.load(&hw, vec![Event::new(kind::RESUMED, 0)], moved)?;
            }
        }
        println!("ready");
        let deadline = self.opts.timeout.map(|t| Instant::now() + t);
        loop {
            let msg = match self.deferred.pop_front() {
                Some(m) => m,
                None => {
                    let wait = deadline
                        .map(|d| d.saturating_duration_since(Instant::now()))
                        .unwrap_or(Duration::from_secs(3600));
                    match self.rx.recv_timeout(wait) {
                        Ok(m) => m,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            if deadline.is_some_and(|d| Instant::now() >= d) {
                                self.stop_vm();
                                return Err(format!(
                                    "{}: the guest did not finish within {:?}",
                                    self.opts.name,
                                    self.opts.timeout.unwrap_or_default()
                                ));
                            }
                            continue;
                        }
                        Err(_) => return Err("controller channel closed".into()),
                    }
                }
            };
            match msg {
                Msg::Vcpu(_, Report::GuestExit(code)) => {
                    self.stop_vm();
                    let _ = lock(&self.block).flush();
                    return Ok(code);
                }
                Msg::Vcpu(_, Report::Failed(e)) => {
                    self.stop_vm();
                    return Err(e);
                }
                Msg::Vcpu(_, Report::Parked(_)) => {}
                Msg::Guest(g) => {
                    if self.vm.is_some() && g.instance == self.instance {
                        self.guest(g);
                    } else {
                        eprintln!(
                            "vmm-shim: {}: dropped request {} of a VM a restore replaced",
                            self.opts.name, g.id
                        );
                    }
                    if self.migrated_away {
                        return Ok(0);
                    }
                    if self.vm.is_none() {
                        return Err(format!(
                            "{}: the VM is gone after a failed restore",
                            self.opts.name
                        ));
                    }
                }
                Msg::Operator(op, reply, written) => {
                    let (r, stop) = self.operator(op);
                    let _ = reply.send(r);
                    if stop {
                        self.stop_vm();
                        let _ = written.recv_timeout(Duration::from_secs(5));
                        return Ok(0);
                    }
                    if self.vm.is_none() {
                        return Err(format!(
                            "{}: the VM is gone after a failed restore",
                            self.opts.name
                        ));
                    }
                }
            }
        }
    }
}

/// Benchmark aid: fill memory above the payload with non-zero data, as a
/// guest that used all its memory would leave it.
fn fill_memory(ram: &crate::memory::GuestRam, from: u64) -> Result<(), crate::memory::MemoryError> {
    let start = from.div_ceil(1 << 20) * (1 << 20);
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut at = start.max(8 << 20);
    while at < ram.size() {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = (ram.size() - at).min(chunk.len() as u64) as usize;
        ram.load(at, &chunk[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Where the operator socket of VM `name` in `pool` is.
pub fn socket_path(pool: &std::path::Path, name: &str) -> PathBuf {
    pool.join(format!(".{name}.vmm-shim.sock"))
}
