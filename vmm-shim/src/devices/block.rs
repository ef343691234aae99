//! The paravirtual disks: the guest writes the guest-physical address of a
//! 32-byte request descriptor to the doorbell port, the device does the
//! I/O through its NBD connection to that disk's export on the gateway
//! (like any NBD client: the shim never opens the LUN file) and writes the
//! status back before the `OUT` returns. Every disk region of the LUN is
//! one disk, numbered as in the LUN (`NAME/disk0`, `NAME/disk1`, …).
//!
//! Descriptor (little-endian): op u32 (0 read, 1 write, 2 flush, 3 size),
//! status u32 (written: 0 ok, 1 I/O error, 2 out of range, 3 bad request),
//! sector u64 (512 bytes; op 3 writes the disk size in bytes here), count
//! u32 (sectors, at most 2048), disk u32, buffer u64 (guest-physical).

use lungate_api::nbd::client::{Address, NbdClient};

use crate::memory::GuestRam;

pub const SECTOR: u64 = 512;
/// Largest request: 1 MiB.
pub const MAX_SECTORS: u32 = 2048;

pub mod status {
    pub const OK: u32 = 0;
    pub const IO: u32 = 1;
    pub const RANGE: u32 = 2;
    pub const BAD: u32 = 3;
}

struct Disk {
    nbd: NbdClient,
    export: String,
}

pub struct BlockDevice {
    disks: Vec<Disk>,
    addr: Address,
}

impl BlockDevice {
    /// Connect to every export in `exports` (disk 0 first).
    pub fn connect(addr: &Address, exports: &[String]) -> Result<BlockDevice, String> {
        let mut disks = Vec::with_capacity(exports.len());
        for e in exports {
            let nbd = NbdClient::connect(addr, e).map_err(|x| format!("disk {e}: {x}"))?;
            disks.push(Disk {
                nbd,
                export: e.clone(),
            });
        }
        if disks.is_empty() {
            return Err("the LUN has no disk to attach".into());
        }
        Ok(BlockDevice {
            disks,
            addr: addr.clone(),
        })
    }

    pub fn count(&self) -> usize {
        self.disks.len()
    }

    /// Disk `i`'s size in bytes (0 if there is no such disk).
    pub fn size(&self, i: usize) -> u64 {
        self.disks.get(i).map(|d| d.nbd.size()).unwrap_or(0)
    }

    pub fn exports(&self) -> Vec<&str> {
        self.disks.iter().map(|d| d.export.as_str()).collect()
    }

    pub fn address(&self) -> &Address {
        &self.addr
    }

    /// Make every completed write of every disk durable (a save does this
    /// first).
    pub fn flush(&mut self) -> Result<(), String> {
        for d in &mut self.disks {
            d.nbd
                .flush()
                .map_err(|e| format!("disk {}: {e}", d.export))?;
        }
        Ok(())
    }

    pub fn doorbell(&mut self, ram: &GuestRam, desc: u64) {
        let mut d = [0u8; 32];
        if ram.read(desc, &mut d).is_err() {
            return;
        }
        let op = u32::from_le_bytes(d[0..4].try_into().expect("4"));
        let sector = u64::from_le_bytes(d[8..16].try_into().expect("8"));
        let count = u32::from_le_bytes(d[16..20].try_into().expect("4"));
        let disk = u32::from_le_bytes(d[20..24].try_into().expect("4")) as usize;
        let buf = u64::from_le_bytes(d[24..32].try_into().expect("8"));
        let status = match self.disks.get_mut(disk) {
            None => status::BAD,
            Some(d) => Self::execute(d, ram, desc, op, sector, count, buf),
        };
        let _ = ram.write(desc + 4, &status.to_le_bytes());
    }

    fn execute(
        d: &mut Disk,
        ram: &GuestRam,
        desc: u64,
        op: u32,
        sector: u64,
        count: u32,
        buf: u64,
    ) -> u32 {
        let size = d.nbd.size();
        if op == 3 {
            let _ = ram.write(desc + 8, &size.to_le_bytes());
            return status::OK;
        }
        if op == 2 {
            return match d.nbd.flush() {
                Ok(()) => status::OK,
                Err(_) => status::IO,
            };
        }
        if count == 0 || count > MAX_SECTORS {
            return status::BAD;
        }
        let len = u64::from(count) * SECTOR;
        let Some(offset) = sector.checked_mul(SECTOR) else {
            return status::RANGE;
        };
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return status::RANGE;
        }
        let mut data = vec![0u8; len as usize];
        match op {
            0 => {
                if d.nbd.read_at(offset, &mut data).is_err() {
                    return status::IO;
                }
                match ram.write(buf, &data) {
                    Ok(()) => status::OK,
                    Err(_) => status::BAD,
                }
            }
            1 => {
                if ram.read(buf, &mut data).is_err() {
                    return status::BAD;
                }
                match d.nbd.write_at(offset, &data) {
                    Ok(()) => status::OK,
                    Err(_) => status::IO,
                }
            }
            _ => status::BAD,
        }
    }
}
