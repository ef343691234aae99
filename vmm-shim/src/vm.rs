//! The VM and its memory: a KVM VM with the in-kernel irqchip (so each
//! vCPU has a LAPIC to save), one memory slot from guest-physical 0 with
//! dirty logging on, and its vCPUs with a CPUID table. A restore builds a
//! fresh `Vm` and loads the saved state into it.

use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_userspace_memory_region, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::boot;
use crate::layout::{MAX_MEMORY, MAX_VCPUS, MIN_MEMORY, PAGE};
use crate::memory::GuestRam;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
}

/// One CPUID entry as a save keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl CpuidEntry {
    fn from_kvm(e: &kvm_cpuid_entry2) -> CpuidEntry {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }

    fn to_kvm(self) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: self.function,
            index: self.index,
            flags: self.flags,
            eax: self.eax,
            ebx: self.ebx,
            ecx: self.ecx,
            edx: self.edx,
            ..Default::default()
        }
    }
}

pub struct Vm {
    fd: VmFd,
    pub ram: Arc<GuestRam>,
    pub vcpus: Vec<VcpuFd>,
    /// MSRs every save reads and every restore writes.
    pub msr_list: Arc<Vec<u32>>,
    pub cpuid: Vec<CpuidEntry>,
}

/// Check a hardware configuration the shim can run.
pub fn check_hardware(memory: u64, vcpus: u32) -> Result<(), String> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&memory) || memory % (1 << 20) != 0 {
        return Err(format!(
            "memory {memory} bytes: vmm-shim runs {} MiB to {} MiB, in whole MiB",
            MIN_MEMORY >> 20,
            MAX_MEMORY >> 20
        ));
    }
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(format!("{vcpus} vCPUs: vmm-shim runs 1 to {MAX_VCPUS}"));
    }
    Ok(())
}

impl Vm {
    /// The CPUID table this host's KVM supports.
    pub fn host_cpuid() -> Result<Vec<CpuidEntry>, VmError> {
        let kvm = Kvm::new().map_err(VmError::Open)?;
        let c = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Kvm {
                op: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        Ok(c.as_slice().iter().map(CpuidEntry::from_kvm).collect())
    }

    /// A VM with `memory` bytes and `vcpus` vCPUs, showing the guest
    /// `cpuid` (the host's table at boot; a saved one at restore).
    pub fn new(memory: u64, vcpus: u32, cpuid: Option<Vec<CpuidEntry>>) -> Result<Vm, VmError> {
        check_hardware(memory, vcpus).map_err(VmError::Config)?;
        let kvm = Kvm::new().map_err(VmError::Open)?;
        let k = |op| move |source| VmError::Kvm { op, source };
        let fd = kvm.create_vm().map_err(k("KVM_CREATE_VM"))?;
        fd.set_tss_address(0xfffb_d000)
            .map_err(k("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(k("KVM_CREATE_IRQCHIP"))?;
        let ram = Arc::new(GuestRam::new(memory)?);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: memory,
            userspace_addr: ram.host_base(),
        };
        // SAFETY: the region is `ram`'s own mapping of exactly `memory`
        // bytes, which lives (in `Vm::ram`) as long as the VM that uses it.
        unsafe { fd.set_user_memory_region(region) }.map_err(k("KVM_SET_USER_MEMORY_REGION"))?;
        let cpuid = match cpuid {
            Some(c) => c,
            None => kvm
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(k("KVM_GET_SUPPORTED_CPUID"))?
                .as_slice()
                .iter()
                .map(CpuidEntry::from_kvm)
                .collect(),
        };
        let mut fds = Vec::with_capacity(vcpus as usize);
        for i in 0..vcpus {
            let v = fd.create_vcpu(u64::from(i)).map_err(k("KVM_CREATE_VCPU"))?;
            let entries: Vec<kvm_cpuid_entry2> = cpuid
                .iter()
                .map(|e| {
                    let mut e = e.to_kvm();
                    // The initial APIC ID is the vCPU's index.
                    if e.function == 1 {
                        e.ebx = (e.ebx & 0x00ff_ffff) | (i << 24);
                    }
                    if e.function == 0xb || e.function == 0x1f {
                        e.edx = i;
                    }
                    e
                })
                .collect();
            let c = CpuId::from_entries(&entries)
                .map_err(|e| VmError::Config(format!("CPUID table: {e:?}")))?;
            v.set_cpuid2(&c).map_err(k("KVM_SET_CPUID2"))?;
            fds.push(v);
        }
        let msr_list = Arc::new(probe_msrs(&kvm, &fds[0])?);
        Ok(Vm {
            fd,
            ram,
            vcpus: fds,
            msr_list,
            cpuid,
        })
    }

    /// Set vCPU `i` to the boot protocol's entry state.
    pub fn reset_vcpu(&self, i: usize) -> Result<(), VmError> {
        let v = &self.vcpus[i];
        let k = |op| move |source| VmError::Kvm { op, source };
        let s = v.get_sregs().map_err(k("KVM_GET_SREGS"))?;
        v.set_sregs(&boot::sregs(s)).map_err(k("KVM_SET_SREGS"))?;
        v.set_regs(&boot::regs(i as u32))
            .map_err(k("KVM_SET_REGS"))?;
        v.set_fpu(&boot::fpu()).map_err(k("KVM_SET_FPU"))?;
        // Every vCPU runs at once (no INIT/SIPI dance in the payload).
        v.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        })
        .map_err(k("KVM_SET_MP_STATE"))?;
        Ok(())
    }

    /// Pages the guest wrote since the last call (KVM clears the log).
    pub fn dirty_log(&self) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(0, usize::try_from(self.ram.size()).expect("mapped"))
            .map_err(|source| VmError::Kvm {
                op: "KVM_GET_DIRTY_LOG",
                source,
            })
    }

    pub fn clock(&self) -> Result<kvm_clock_data, VmError> {
        self.fd.get_clock().map_err(|source| VmError::Kvm {
            op: "KVM_GET_CLOCK",
            source,
        })
    }

    pub fn set_clock(&self, c: &kvm_clock_data) -> Result<(), VmError> {
        let c = kvm_clock_data {
            clock: c.clock,
            ..Default::default()
        };
        self.fd.set_clock(&c).map_err(|source| VmError::Kvm {
            op: "KVM_SET_CLOCK",
            source,
        })
    }

    pub fn pages(&self) -> u64 {
        self.ram.size() / PAGE
    }
}

/// The MSRs of this host's list that a vCPU can both read and write back.
fn probe_msrs(kvm: &Kvm, v: &VcpuFd) -> Result<Vec<u32>, VmError> {
    let list = kvm.get_msr_index_list().map_err(|source| VmError::Kvm {
        op: "KVM_GET_MSR_INDEX_LIST",
        source,
    })?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let Ok(mut m) = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            continue;
        };
        if v.get_msrs(&mut m).ok() != Some(1) {
            continue;
        }
        if v.set_msrs(&m).ok() == Some(1) {
            ok.push(index);
        }
    }
    Ok(ok)
}
