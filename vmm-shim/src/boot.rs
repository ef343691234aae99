//! The payload's boot protocol: identity-mapping page tables and a GDT in
//! guest memory, and each vCPU's registers at entry (long mode, paging and
//! SSE on, interrupts off). A vCPU added by a restore onto more vCPUs gets
//! this same state: it is the "reset state" of the shim's machine.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

use crate::layout::{AP_ENTRY, BOOT_PARAMS, GDT, LOAD, PML4, STACK_SIZE, STACK_TOP};
use crate::memory::{GuestRam, MemoryError};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT entries: null, 64-bit code, data, TSS (two slots).
const GDT_ENTRIES: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
    0,
];

/// Write the page tables (first 4 GiB, 2 MiB pages) and the GDT.
pub fn write_tables(ram: &GuestRam) -> Result<(), MemoryError> {
    let pdpt = PML4 + 0x1000;
    ram.load(PML4, &(pdpt | 0x3).to_le_bytes())?;
    for i in 0..4u64 {
        let pd = PML4 + 0x2000 + i * 0x1000;
        ram.load(pdpt + i * 8, &(pd | 0x3).to_le_bytes())?;
        let mut table = vec![0u8; 4096];
        for (j, e) in table.chunks_exact_mut(8).enumerate() {
            let addr = (i << 30) | ((j as u64) << 21);
            e.copy_from_slice(&(addr | 0x83).to_le_bytes());
        }
        ram.load(pd, &table)?;
    }
    let gdt: Vec<u8> = GDT_ENTRIES.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.load(GDT, &gdt)
}

fn segment(selector: u16, type_: u8, s: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers at entry: long mode with the tables above.
pub fn sregs(mut s: kvm_sregs) -> kvm_sregs {
    let code = segment(0x08, 0xb, 1, 1, 0);
    let data = segment(0x10, 0x3, 1, 0, 1);
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        s: 0,
        g: 0,
        ..segment(0x18, 0xb, 0, 0, 0)
    };
    s.gdt.base = GDT;
    s.gdt.limit = (GDT_ENTRIES.len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    s.cr3 = PML4;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// General registers at entry for vCPU `index`.
pub fn regs(index: u32) -> kvm_regs {
    kvm_regs {
        rip: if index == 0 { LOAD } else { AP_ENTRY },
        rsp: STACK_TOP - u64::from(index) * STACK_SIZE,
        rdi: u64::from(index),
        rsi: BOOT_PARAMS,
        rflags: 0x2,
        ..Default::default()
    }
}

/// x87/SSE state at entry (the architectural reset values).
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}
