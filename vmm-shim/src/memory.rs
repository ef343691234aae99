//! Guest memory: one anonymous mapping from guest-physical 0, registered
//! with KVM with dirty logging on, plus a bitmap of the pages the shim's
//! own devices wrote (KVM logs only the guest's writes). Together they say
//! which pages an incremental save must write.
//!
//! This module owns the mapping and the bitmaps; it knows nothing about
//! records or the gateway.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::PAGE;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory: {why}")]
    Map { size: u64, why: String },
    #[error("guest access at {addr:#x} + {len} is outside guest memory ({size} bytes)")]
    OutOfRange { addr: u64, len: u64, size: u64 },
}

pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
    /// One bit per page written by the shim since the last [`GuestRam::take_vmm_dirty`].
    vmm_dirty: Vec<AtomicU64>,
}

impl GuestRam {
    /// `size` bytes of zeroed memory (a multiple of the page size).
    pub fn new(size: u64) -> Result<GuestRam, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::Map {
            size,
            why: "larger than the address space".into(),
        })?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).map_err(|e| {
            MemoryError::Map {
                size,
                why: e.to_string(),
            }
        })?;
        let pages = size.div_ceil(PAGE);
        let words = usize::try_from(pages.div_ceil(64)).expect("fits: the mapping does");
        Ok(GuestRam {
            mem,
            size,
            vmm_dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn pages(&self) -> u64 {
        self.size / PAGE
    }

    /// Host address of guest-physical 0, for KVM's memory slot.
    pub fn host_base(&self) -> u64 {
        self.mem
            .get_host_address(GuestAddress(0))
            .expect("guest memory starts at 0") as u64
    }

    fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        if addr.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(MemoryError::OutOfRange {
                addr,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check(addr, buf.len() as u64)?;
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: buf.len() as u64,
                size: self.size,
            })
    }

    /// Write as the shim (a device): the pages are marked dirty for the
    /// next incremental save.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.check(addr, buf.len() as u64)?;
        self.mem
            .write_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: buf.len() as u64,
                size: self.size,
            })?;
        if !buf.is_empty() {
            let first = addr / PAGE;
            let last = (addr + buf.len() as u64 - 1) / PAGE;
            for p in first..=last {
                self.vmm_dirty[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Write without marking pages dirty: loading a saved image or the
    /// boot image, which the records already hold or which a full save
    /// writes anyway.
    pub fn load(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.check(addr, buf.len() as u64)?;
        self.mem
            .write_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError::OutOfRange {
                addr,
                len: buf.len() as u64,
                size: self.size,
            })
    }

    pub fn read_u32(&self, addr: u64) -> Result<u32, MemoryError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// The shim's dirty bitmap (one bit per page), cleared.
    pub fn take_vmm_dirty(&self) -> Vec<u64> {
        self.vmm_dirty
            .iter()
            .map(|w| w.swap(0, Ordering::Relaxed))
            .collect()
    }
}
