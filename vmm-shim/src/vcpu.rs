//! vCPUs: the state a save keeps of each (registers, special registers,
//! FPU/xsave, XCRs, LAPIC, MSRs, pending events, MP state, debug
//! registers), and the thread that runs one.
//!
//! A vCPU thread owns its `VcpuFd`. It runs the guest and hands port
//! exits to the [`Bus`]; it stops when asked: the controller raises its
//! pause flag and kicks it with a signal, whose handler sets
//! `immediate_exit` so `KVM_RUN` returns `EINTR` even if the signal lands
//! just before the guest is entered. Before its state is read the thread
//! runs once more with `immediate_exit` set, which completes a pending
//! port exit (an `IN` whose data the guest has not received yet) without
//! entering the guest, so a saved vCPU is never half-way through an
//! instruction.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};
use zerocopy::{FromBytes, IntoBytes};

use crate::devices::Bus;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: {op}: {source}")]
    Kvm {
        index: u32,
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {why}")]
    State { index: u32, why: String },
}

/// Everything KVM keeps of one vCPU, as a save stores it.
pub struct VcpuState {
    pub index: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
}

const MAGIC: &[u8; 8] = b"LGVCPU01";

/// Section tags of the `vcpu-state` record (docs/vmm-shim.md).
mod tag {
    pub const REGS: u32 = 1;
    pub const SREGS: u32 = 2;
    pub const FPU: u32 = 3;
    pub const XSAVE: u32 = 4;
    pub const XCRS: u32 = 5;
    pub const LAPIC: u32 = 6;
    pub const MSRS: u32 = 7;
    pub const EVENTS: u32 = 8;
    pub const MP_STATE: u32 = 9;
    pub const DEBUGREGS: u32 = 10;
}

fn section(out: &mut Vec<u8>, t: u32, bytes: &[u8]) {
    out.extend_from_slice(&t.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl VcpuState {
    /// The `vcpu-state` record payload: magic, index, section count, then
    /// (tag u32, length u32, the KVM structure's bytes) per section.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&10u32.to_le_bytes());
        section(&mut out, tag::REGS, self.regs.as_bytes());
        section(&mut out, tag::SREGS, self.sregs.as_bytes());
        section(&mut out, tag::FPU, &encode_fpu(&self.fpu));
        section(&mut out, tag::XSAVE, self.xsave.as_bytes());
        section(&mut out, tag::XCRS, self.xcrs.as_bytes());
        section(&mut out, tag::LAPIC, self.lapic.as_bytes());
        section(&mut out, tag::MSRS, self.msrs.as_bytes());
        section(&mut out, tag::EVENTS, self.events.as_bytes());
        section(&mut out, tag::MP_STATE, self.mp_state.as_bytes());
        section(&mut out, tag::DEBUGREGS, self.debugregs.as_bytes());
        out
    }

    /// Parse a `vcpu-state` payload; every section must be present once
    /// and have its structure's exact size.
    pub fn decode(b: &[u8]) -> Result<VcpuState, String> {
        if b.len() < 16 || &b[..8] != MAGIC {
            return Err("not a vcpu-state record (magic)".into());
        }
        let index = u32::from_le_bytes(b[8..12].try_into().expect("4"));
        let count = u32::from_le_bytes(b[12..16].try_into().expect("4"));
        let mut at = 16usize;
        let mut parts: Vec<Option<&[u8]>> = vec![None; 11];
        for _ in 0..count {
            let head = b
                .get(at..at + 8)
                .ok_or("vcpu-state record ends inside a section header")?;
            let t = u32::from_le_bytes(head[..4].try_into().expect("4"));
            let len = u32::from_le_bytes(head[4..].try_into().expect("4")) as usize;
            let body = at
                .checked_add(8 + len)
                .and_then(|end| b.get(at + 8..end))
                .ok_or_else(|| format!("vcpu-state section {t} runs past the record"))?;
            let slot = parts
                .get_mut(t as usize)
                .filter(|_| t != 0)
                .ok_or_else(|| format!("unknown vcpu-state section {t}"))?;
            if slot.replace(body).is_some() {
                return Err(format!("vcpu-state section {t} appears twice"));
            }
            at += 8 + len;
        }
        if at != b.len() {
            return Err("bytes after the last vcpu-state section".into());
        }
        fn get<T: FromBytes>(parts: &[Option<&[u8]>], t: u32, name: &str) -> Result<T, String> {
            let b = parts[t as usize].ok_or_else(|| format!("vcpu-state has no {name}"))?;
            T::read_from_bytes(b).map_err(|_| {
                format!(
                    "vcpu-state {name} is {} bytes, not {}",
                    b.len(),
                    std::mem::size_of::<T>()
                )
            })
        }
        let msr_bytes = parts[tag::MSRS as usize].ok_or("vcpu-state has no MSRs")?;
        let msrs = <[kvm_msr_entry]>::ref_from_bytes(msr_bytes)
            .map_err(|_| "vcpu-state MSR section is not whole entries".to_string())?
            .to_vec();
        Ok(VcpuState {
            index,
            regs: get(&parts, tag::REGS, "regs")?,
            sregs: get(&parts, tag::SREGS, "sregs")?,
            fpu: decode_fpu(parts[tag::FPU as usize].ok_or("vcpu-state has no fpu")?)?,
            xsave: get(&parts, tag::XSAVE, "xsave")?,
            xcrs: get(&parts, tag::XCRS, "xcrs")?,
            lapic: get(&parts, tag::LAPIC, "lapic")?,
            msrs,
            events: get(&parts, tag::EVENTS, "events")?,
            mp_state: get(&parts, tag::MP_STATE, "mp_state")?,
            debugregs: get(&parts, tag::DEBUGREGS, "debugregs")?,
        })
    }

    /// Read the state of a stopped vCPU (its pending port exit finished).
    pub fn capture(index: u32, fd: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, VcpuError> {
        let k = |op| move |source| VcpuError::Kvm { index, op, source };
        let mut msrs = Msrs::new(msr_list.len()).map_err(|e| VcpuError::State {
            index,
            why: format!("MSR buffer: {e:?}"),
        })?;
        for (e, &i) in msrs.as_mut_slice().iter_mut().zip(msr_list) {
            e.index = i;
        }
        let n = fd.get_msrs(&mut msrs).map_err(k("KVM_GET_MSRS"))?;
        if n != msr_list.len() {
            return Err(VcpuError::State {
                index,
                why: format!(
                    "KVM_GET_MSRS read {n} of {} MSRs (stopped at {:#x})",
                    msr_list.len(),
                    msr_list[n]
                ),
            });
        }
        Ok(VcpuState {
            index,
            regs: fd.get_regs().map_err(k("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(k("KVM_GET_SREGS"))?,
            fpu: fd.get_fpu().map_err(k("KVM_GET_FPU"))?,
            xsave: fd.get_xsave().map_err(k("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(k("KVM_GET_XCRS"))?,
            lapic: fd.get_lapic().map_err(k("KVM_GET_LAPIC"))?,
            msrs: msrs.as_slice().to_vec(),
            events: fd.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?,
            debugregs: fd.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Load this state into a fresh vCPU (CPUID already set).
    pub fn apply(&self, fd: &VcpuFd) -> Result<(), VcpuError> {
        let index = self.index;
        let k = |op| move |source| VcpuError::Kvm { index, op, source };
        // Order matters: special registers (modes) before the rest, the
        // LAPIC before events, MSRs after sregs (EFER).
        fd.set_sregs(&self.sregs).map_err(k("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(k("KVM_SET_REGS"))?;
        fd.set_fpu(&self.fpu).map_err(k("KVM_SET_FPU"))?;
        // SAFETY: `self.xsave` is a whole kvm_xsave read by KVM_GET_XSAVE
        // (legacy 4 KiB area), the size KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(k("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(k("KVM_SET_XCRS"))?;
        fd.set_lapic(&self.lapic).map_err(k("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|e| VcpuError::State {
            index,
            why: format!("MSR list: {e:?}"),
        })?;
        let n = fd.set_msrs(&msrs).map_err(k("KVM_SET_MSRS"))?;
        if n != self.msrs.len() {
            return Err(VcpuError::State {
                index,
                why: format!(
                    "this host's KVM refused MSR {:#x} ({} of {} set)",
                    self.msrs[n].index,
                    n,
                    self.msrs.len()
                ),
            });
        }
        fd.set_vcpu_events(&self.events)
            .map_err(k("KVM_SET_VCPU_EVENTS"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(k("KVM_SET_MP_STATE"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(k("KVM_SET_DEBUGREGS"))?;
        Ok(())
    }
}

/// `kvm_fpu` field by field (it has no byte view): 416 bytes.
fn encode_fpu(f: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(416);
    for r in &f.fpr {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.fcw.to_le_bytes());
    b.extend_from_slice(&f.fsw.to_le_bytes());
    b.push(f.ftwx);
    b.push(f.pad1);
    b.extend_from_slice(&f.last_opcode.to_le_bytes());
    b.extend_from_slice(&f.last_ip.to_le_bytes());
    b.extend_from_slice(&f.last_dp.to_le_bytes());
    for r in &f.xmm {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.mxcsr.to_le_bytes());
    b.extend_from_slice(&f.pad2.to_le_bytes());
    b
}

fn decode_fpu(b: &[u8]) -> Result<kvm_fpu, String> {
    if b.len() != 416 {
        return Err(format!("vcpu-state fpu is {} bytes, not 416", b.len()));
    }
    let mut f = kvm_fpu::default();
    for (i, r) in f.fpr.iter_mut().enumerate() {
        r.copy_from_slice(&b[i * 16..i * 16 + 16]);
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
    f.fcw = u16_at(128);
    f.fsw = u16_at(130);
    f.ftwx = b[132];
    f.pad1 = b[133];
    f.last_opcode = u16_at(134);
    f.last_ip = u64_at(136);
    f.last_dp = u64_at(144);
    for (i, r) in f.xmm.iter_mut().enumerate() {
        r.copy_from_slice(&b[152 + i * 16..168 + i * 16]);
    }
    f.mxcsr = u32::from_le_bytes(b[408..412].try_into().expect("4"));
    f.pad2 = u32::from_le_bytes(b[412..416].try_into().expect("4"));
    Ok(f)
}

// ----- the vCPU thread --------------------------------------------------------

thread_local! {
    /// This thread's `kvm_run`, for the kick signal's handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own mapped kvm_run,
            // set while its VcpuFd is alive and cleared before it drops;
            // a one-byte store is async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Install the kick handler (once per process).
pub fn init_kick() -> Result<(), String> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut r = Ok(());
    ONCE.call_once(|| {
        r = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| format!("cannot install the vCPU kick handler: {e}"));
    });
    r
}

/// What the controller tells a parked vCPU.
pub enum Ctl {
    Resume,
    Stop,
}

/// What a vCPU thread reports.
pub enum Report {
    /// Stopped as asked; its state (or why it could not be read).
    Parked(Result<Box<VcpuState>, VcpuError>),
    /// The guest wrote the exit port.
    GuestExit(u8),
    /// The vCPU cannot go on (a KVM error, a triple fault).
    Failed(String),
}

pub struct VcpuThread {
    pub index: u32,
    thread: Option<JoinHandle<()>>,
    ctl: Sender<Ctl>,
    pause: Arc<AtomicBool>,
}

impl VcpuThread {
    /// Start running `fd` (its state already set) on its own thread.
    pub fn spawn(
        index: u32,
        fd: VcpuFd,
        bus: Arc<Bus>,
        msr_list: Arc<Vec<u32>>,
        report: Sender<(u32, Report)>,
    ) -> Result<VcpuThread, String> {
        let (ctl_tx, ctl_rx) = std::sync::mpsc::channel();
        let pause = Arc::new(AtomicBool::new(false));
        let p = pause.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || run(index, fd, bus, msr_list, p, ctl_rx, report))
            .map_err(|e| format!("cannot start the vCPU {index} thread: {e}"))?;
        Ok(VcpuThread {
            index,
            thread: Some(thread),
            ctl: ctl_tx,
            pause,
        })
    }

    /// Ask the vCPU to park; its [`Report::Parked`] follows.
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        if let Some(t) = &self.thread {
            let _ = t.kill(kick_signal());
        }
    }

    pub fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
        let _ = self.ctl.send(Ctl::Resume);
    }

    /// Stop the thread for good (after it parked or exited).
    pub fn stop(mut self) {
        self.pause.store(true, Ordering::SeqCst);
        let _ = self.ctl.send(Ctl::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.kill(kick_signal());
            let _ = t.join();
        }
    }
}

impl Drop for VcpuThread {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.pause.store(true, Ordering::SeqCst);
            let _ = self.ctl.send(Ctl::Stop);
            let _ = t.kill(kick_signal());
            let _ = t.join();
        }
    }
}

fn run(
    index: u32,
    mut fd: VcpuFd,
    bus: Arc<Bus>,
    msr_list: Arc<Vec<u32>>,
    pause: Arc<AtomicBool>,
    ctl: Receiver<Ctl>,
    report: Sender<(u32, Report)>,
) {
    KVM_RUN.with(|p| p.set(fd.get_kvm_run() as *mut kvm_run));
    let send = |r| {
        let _ = report.send((index, r));
    };
    loop {
        if pause.load(Ordering::SeqCst) {
            // Complete a pending port exit without entering the guest.
            fd.set_kvm_immediate_exit(1);
            let _ = fd.run();
            fd.set_kvm_immediate_exit(0);
            send(Report::Parked(
                VcpuState::capture(index, &fd, &msr_list).map(Box::new),
            ));
            match ctl.recv() {
                Ok(Ctl::Resume) => continue,
                Ok(Ctl::Stop) | Err(_) => break,
            }
        }
        let exit = match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let (port, mut buf, n) = (port, [0u8; 8], data.len().min(8));
                buf[..n].copy_from_slice(&data[..n]);
                bus.io_out(index, port, &buf[..n])
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.io_in(index, port, data);
                None
            }
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::Shutdown) => Some(Report::Failed(format!(
                "vCPU {index}: the guest shut down (triple fault)"
            ))),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: KVM filled the `internal` member for this exit.
                let sub = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Some(Report::Failed(format!(
                    "vCPU {index}: KVM internal error (suberror {sub}) at rip {:#x}",
                    fd.get_regs().map(|r| r.rip).unwrap_or(0)
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(Report::Failed(format!(
                "vCPU {index}: entry failed (reason {reason:#x}, cpu {cpu})"
            ))),
            Ok(other) => Some(Report::Failed(format!(
                "vCPU {index}: unexpected exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(Report::Failed(format!("vCPU {index}: KVM_RUN: {e}"))),
        };
        if let Some(r) = exit {
            send(r);
            // Wait to be told what to do next: stop, mostly.
            match ctl.recv() {
                Ok(Ctl::Resume) => continue,
                Ok(Ctl::Stop) | Err(_) => break,
            }
        }
    }
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let mut s = VcpuState {
            index: 2,
            regs: kvm_regs {
                rip: 0x100000,
                rax: 7,
                ..Default::default()
            },
            sregs: kvm_sregs {
                cr3: 0x9000,
                ..Default::default()
            },
            fpu: kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                last_ip: 0x1234,
                ..Default::default()
            },
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }],
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state { mp_state: 3 },
            debugregs: kvm_debugregs::default(),
        };
        s.fpu.xmm[15][3] = 0xab;
        s.xsave.region[1023] = 0xdead_beef;
        s.lapic.regs[1023] = 5;
        s
    }

    #[test]
    fn vcpu_state_round_trips_through_its_record() {
        let s = sample();
        let b = s.encode();
        let d = VcpuState::decode(&b).unwrap();
        assert_eq!(d.encode(), b);
        assert_eq!((d.index, d.regs.rip, d.sregs.cr3), (2, 0x100000, 0x9000));
        assert_eq!((d.fpu.xmm[15][3], d.fpu.last_ip), (0xab, 0x1234));
        assert_eq!(d.xsave.region[1023], 0xdead_beef);
        assert_eq!(d.msrs.len(), 1);
        assert_eq!((d.msrs[0].index, d.msrs[0].data), (0x10, 99));
    }

    #[test]
    fn damaged_vcpu_records_are_refused_not_misread() {
        let b = sample().encode();
        for cut in [0, 10, 16, 30, b.len() - 1] {
            assert!(VcpuState::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = b.clone();
        extra.push(0);
        assert!(VcpuState::decode(&extra).is_err());
        // A section that claims more bytes than there are.
        let mut long = b.clone();
        long[20] = 0xff;
        assert!(VcpuState::decode(&long).is_err());
        let mut magic = b;
        magic[0] ^= 1;
        assert!(VcpuState::decode(&magic).is_err());
    }
}
