//! The guest ABI: where the shim puts things in guest-physical memory and
//! which I/O ports its devices answer (docs/vmm-shim.md, *The guest's
//! view*). The payload (guest/payload.s) uses the same numbers.

/// Page size of guest memory and of the dirty log.
pub const PAGE: u64 = 4096;
/// The GDT the boot vCPU state points at.
pub const GDT: u64 = 0x1000;
/// Boot parameters ([`BootParams`]).
pub const BOOT_PARAMS: u64 = 0x2000;
/// Identity-mapping page tables: PML4, PDPT, then four page directories.
pub const PML4: u64 = 0x9000;
/// Stacks grow down from here, 16 KiB per vCPU (vCPU 0 highest).
pub const STACK_TOP: u64 = 0x80000;
pub const STACK_SIZE: u64 = 0x4000;
/// Where the payload image is loaded; vCPU 0 starts here, the others 8
/// bytes further on.
pub const LOAD: u64 = 0x100000;
pub const AP_ENTRY: u64 = LOAD + 8;
/// The payload image's magic, at LOAD + 16.
pub const PAYLOAD_MAGIC: &[u8; 8] = b"LGPAYLD1";

/// Memory limits: enough for the payload's fixed layout, and below the
/// LAPIC/IOAPIC MMIO window (the shim maps one slot from 0).
pub const MIN_MEMORY: u64 = 4 << 20;
pub const MAX_MEMORY: u64 = 3 << 30;
/// vCPUs: the boot stacks must fit below [`STACK_TOP`] above 0x10000.
pub const MAX_VCPUS: u32 = 24;

/// COM1: writes to the data register go to the console.
pub const SERIAL: u16 = 0x3f8;
/// Port A: requests to the state service.
pub const PORT_A: u16 = 0x5a0;
/// Port B: events from the state service.
pub const PORT_B: u16 = 0x5a4;
/// The paravirtual block device's doorbell.
pub const PORT_BLK: u16 = 0x5b0;
/// The payload's exit: the byte written is the run's result (0 = pass).
pub const PORT_EXIT: u16 = 0x5f0;

/// Guest modes the payload knows (boot parameter `mode`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum GuestMode {
    Selftest = 1,
    Writer = 2,
    Badmac = 3,
    Hwcheck = 4,
    Identity = 5,
    Dirty = 6,
    Migrate = 7,
}

/// The boot parameters block at [`BOOT_PARAMS`].
#[derive(Debug, Clone, Copy)]
pub struct BootParams {
    pub mode: GuestMode,
    pub memory: u64,
    pub vcpus: u32,
    pub arg: u32,
    pub key: [u8; 16],
    pub epoch: u64,
    pub disk_bytes: u64,
    pub disks: u32,
}

impl BootParams {
    pub const MAGIC: u32 = u32::from_le_bytes(*b"LGBP");

    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..4].copy_from_slice(&Self::MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(self.mode as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.memory.to_le_bytes());
        b[16..20].copy_from_slice(&self.vcpus.to_le_bytes());
        b[20..24].copy_from_slice(&self.arg.to_le_bytes());
        b[24..40].copy_from_slice(&self.key);
        b[40..48].copy_from_slice(&self.epoch.to_le_bytes());
        b[48..56].copy_from_slice(&self.disk_bytes.to_le_bytes());
        b[56..60].copy_from_slice(&self.disks.to_le_bytes());
        b
    }
}
