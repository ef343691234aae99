//! The guest state service on ports A and B (docs/vmm-shim.md, *Ports A
//! and B*): software in the guest asks for save, list, restore, delete,
//! reconfigure and info; each request returns at once with an id, and its
//! result arrives later as an event.
//!
//! This module owns the wire format, the credentials (a SipHash-2-4-128
//! MAC with the per-VM key, an epoch and a strictly increasing sequence
//! number) and the event queue. It never performs an operation: accepted
//! requests go to the controller, which queues their results here.
//!
//! Request (guest memory, little-endian):
//!
//! | off  | len | field |
//! |------|-----|-------|
//! | 0    | 4   | magic `LGRQ` |
//! | 4    | 2   | version 1 |
//! | 6    | 2   | op: 1 save, 2 list, 3 restore, 4 delete, 5 reconfigure, 6 info |
//! | 8    | 8   | epoch (from the boot parameters or the latest event) |
//! | 16   | 8   | sequence number, greater than any before in this epoch |
//! | 24   | 4   | name length (≤ 64) |
//! | 28   | 4   | app data length (≤ 4096) |
//! | 32   | 8   | arg0 (reconfigure: memory bytes) |
//! | 40   | 8   | arg1 (reconfigure: vCPU count) |
//! | 48   | 64  | name (snapshot), zero padded |
//! | 112  | n   | app data, zero padded to a multiple of 8 |
//! | 112+n| 16  | MAC: SipHash-2-4-128 with the VM's key over bytes 0..112+n |

use std::collections::VecDeque;

use siphasher::sip128::{Hasher128, SipHasher24};

use crate::memory::GuestRam;

pub const REQ_MAGIC: u32 = u32::from_le_bytes(*b"LGRQ");
pub const EV_MAGIC: u32 = u32::from_le_bytes(*b"LGEV");
pub const HEADER: usize = 112;
pub const MAX_NAME: usize = 64;
pub const MAX_DATA: usize = 4096;
/// Largest event: the guest's buffer must hold this many bytes.
pub const MAX_EVENT: usize = 8192;
const MAX_TEXT: usize = 4000;

/// Event kinds.
pub mod kind {
    pub const SAVED: u16 = 1;
    pub const LISTED: u16 = 2;
    pub const RESTORED: u16 = 3;
    pub const DELETED: u16 = 4;
    pub const RECONFIGURED: u16 = 5;
    pub const INFO: u16 = 6;
    pub const ERROR: u16 = 7;
    pub const RESUMED: u16 = 8;
    pub const HARDWARE: u16 = 9;
    pub const GENERATION: u16 = 10;
    /// After `vmm-shim migrate`, to the guest resumed on the new host: the
    /// source's LUN name as text, the guest downtime so far (µs, u64: from
    /// the source's pause to the target's resume, by the two hosts' clocks).
    pub const MIGRATED: u16 = 11;
}

/// Event flags.
pub mod flag {
    /// Delivered to the guest restored to (or resumed at) the save point,
    /// not to the one that asked.
    pub const AFTER_RESTORE: u32 = 1;
    /// The text was cut to fit the event.
    pub const TRUNCATED: u32 = 2;
}

/// Event status values (0: done).
pub mod status {
    pub const OK: u32 = 0;
    pub const BAD_MAC: u32 = 1;
    pub const REPLAYED: u32 = 2;
    pub const WRONG_EPOCH: u32 = 3;
    pub const MALFORMED: u32 = 4;
    pub const FAILED: u32 = 5;
    pub const REFUSED: u32 = 6;
    pub const NOT_FOUND: u32 = 7;
}

/// A request the service accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Save {
        name: String,
        data: Vec<u8>,
    },
    List,
    Restore {
        name: String,
        data: Vec<u8>,
    },
    Delete {
        name: String,
    },
    Reconfigure {
        memory: u64,
        vcpus: u32,
    },
    Info,
    /// Move the VM to the gateway whose migration listener is `to`
    /// (`HOST:PORT`; empty: the first such entry of the VM's policy
    /// `migrate_to`); `data` comes back with the `migrated` event on the
    /// new host.
    Migrate {
        to: String,
        data: Vec<u8>,
    },
}

/// One event waiting for the guest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub kind: u16,
    pub id: u32,
    pub status: u32,
    pub flags: u32,
    pub text: Vec<u8>,
    pub data: Vec<u8>,
}

impl Event {
    pub fn new(kind: u16, id: u32) -> Event {
        Event {
            kind,
            id,
            status: status::OK,
            flags: 0,
            text: Vec::new(),
            data: Vec::new(),
        }
    }

    pub fn error(id: u32, status: u32, message: &str) -> Event {
        Event {
            status,
            ..Event::new(kind::ERROR, id).with_text(message.as_bytes())
        }
    }

    pub fn with_text(mut self, t: &[u8]) -> Event {
        if t.len() > MAX_TEXT {
            self.text = t[..MAX_TEXT].to_vec();
            self.flags |= flag::TRUNCATED;
        } else {
            self.text = t.to_vec();
        }
        self
    }

    pub fn with_data(mut self, d: &[u8]) -> Event {
        self.data = d[..d.len().min(MAX_DATA)].to_vec();
        self
    }

    /// The bytes the guest receives (header, text, data).
    pub fn encode(&self, epoch: u64) -> Vec<u8> {
        let mut b = Vec::with_capacity(40 + self.text.len() + self.data.len());
        b.extend_from_slice(&EV_MAGIC.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&self.kind.to_le_bytes());
        b.extend_from_slice(&self.id.to_le_bytes());
        b.extend_from_slice(&self.status.to_le_bytes());
        b.extend_from_slice(&epoch.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.text.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.text);
        b.extend_from_slice(&self.data);
        b
    }
}

/// What a save keeps of the service (the `state-service` part of the
/// machine record); the epoch and sequence start afresh on every boot,
/// restore and resume.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceState {
    pub next_id: u32,
    /// The id the last request of each vCPU got (what `IN` on port A
    /// returns), so a guest paused between its `OUT` and its `IN` still
    /// learns its id after a restore.
    pub last_ids: Vec<u32>,
    pub queue: Vec<Event>,
}

pub struct StateService {
    key: [u8; 16],
    epoch: u64,
    last_seq: u64,
    next_id: u32,
    last_ids: Vec<u32>,
    queue: VecDeque<Event>,
    vm: String,
}

/// The MAC over `msg` with `key`.
pub fn mac(key: &[u8; 16], msg: &[u8]) -> [u8; 16] {
    let mut h = SipHasher24::new_with_key(key);
    std::hash::Hasher::write(&mut h, msg);
    h.finish128().as_bytes()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl StateService {
    pub fn new(vm: &str, key: [u8; 16], epoch: u64, vcpus: u32, saved: ServiceState) -> Self {
        let mut last_ids = saved.last_ids;
        last_ids.resize(vcpus as usize, 0);
        StateService {
            key,
            epoch,
            last_seq: 0,
            next_id: saved.next_id.max(1),
            last_ids,
            queue: saved.queue.into(),
            vm: vm.to_string(),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn snapshot(&self) -> ServiceState {
        ServiceState {
            next_id: self.next_id,
            last_ids: self.last_ids.clone(),
            queue: self.queue.iter().cloned().collect(),
        }
    }

    pub fn push(&mut self, e: Event) {
        self.queue.push_back(e);
    }

    pub fn last_id(&self, vcpu: u32) -> u32 {
        self.last_ids.get(vcpu as usize).copied().unwrap_or(0)
    }

    pub fn next_len(&self) -> u32 {
        self.queue
            .front()
            .map(|e| e.encode(self.epoch).len() as u32)
            .unwrap_or(0)
    }

    /// Copy the next event to guest address `addr` and drop it.
    pub fn deliver(&mut self, ram: &GuestRam, addr: u64) {
        if let Some(e) = self.queue.front() {
            if ram.write(addr, &e.encode(self.epoch)).is_ok() {
                self.queue.pop_front();
            }
        }
    }

    fn refuse(&mut self, id: u32, status: u32, why: &str) {
        eprintln!("vmm-shim: {}: refused guest request {id}: {why}", self.vm);
        self.queue.push_back(Event::error(id, status, why));
    }

    /// A request at guest address `addr` (port A). Every request gets an
    /// id; one that fails its checks is answered with an error event and
    /// changes nothing else.
    pub fn submit(&mut self, vcpu: u32, ram: &GuestRam, addr: u64) -> Option<(u32, Request)> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        if let Some(slot) = self.last_ids.get_mut(vcpu as usize) {
            *slot = id;
        }
        let mut h = [0u8; HEADER];
        if ram.read(addr, &mut h).is_err() {
            self.refuse(
                id,
                status::MALFORMED,
                "request address is outside guest memory",
            );
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4"));
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8"));
        if u32_at(0) != REQ_MAGIC || u16::from_le_bytes([h[4], h[5]]) != 1 {
            self.refuse(id, status::MALFORMED, "bad request magic or version");
            return None;
        }
        let name_len = u32_at(24) as usize;
        let data_len = u32_at(28) as usize;
        if name_len > MAX_NAME || data_len > MAX_DATA {
            self.refuse(
                id,
                status::MALFORMED,
                &format!(
                    "name length {name_len} > {MAX_NAME} or data length {data_len} > {MAX_DATA}"
                ),
            );
            return None;
        }
        let padded = data_len.div_ceil(8) * 8;
        let mut rest = vec![0u8; padded + 16];
        if ram.read(addr + HEADER as u64, &mut rest).is_err() {
            self.refuse(id, status::MALFORMED, "request runs past guest memory");
            return None;
        }
        let mut msg = h.to_vec();
        msg.extend_from_slice(&rest[..padded]);
        if !ct_eq(&mac(&self.key, &msg), &rest[padded..]) {
            self.refuse(
                id,
                status::BAD_MAC,
                "wrong MAC (is the guest's key this VM's?)",
            );
            return None;
        }
        let (epoch, seq) = (u64_at(8), u64_at(16));
        if epoch != self.epoch {
            self.refuse(
                id,
                status::WRONG_EPOCH,
                &format!("epoch {epoch:#x} is not the current one"),
            );
            return None;
        }
        if seq <= self.last_seq {
            self.refuse(
                id,
                status::REPLAYED,
                &format!("sequence {seq} is not above {} (a replay)", self.last_seq),
            );
            return None;
        }
        self.last_seq = seq;
        let name = match std::str::from_utf8(&h[48..48 + name_len]) {
            Ok(s) => s.to_string(),
            Err(_) => {
                self.refuse(id, status::MALFORMED, "name is not UTF-8");
                return None;
            }
        };
        let data = rest[..data_len].to_vec();
        let needs_name = |name: &str| -> Result<(), String> {
            if name.is_empty() {
                return Err("this request needs a snapshot name".into());
            }
            if !name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
                || name.starts_with(['.', '-'])
            {
                return Err(format!(
                    "snapshot name {name:?} must be [A-Za-z0-9._-], not starting with . or -"
                ));
            }
            Ok(())
        };
        let r = match u16::from_le_bytes([h[6], h[7]]) {
            1 => needs_name(&name).map(|()| Request::Save { name, data }),
            2 => Ok(Request::List),
            3 => needs_name(&name).map(|()| Request::Restore { name, data }),
            4 => needs_name(&name).map(|()| Request::Delete { name }),
            5 => u32::try_from(u64_at(40))
                .map(|vcpus| Request::Reconfigure {
                    memory: u64_at(32),
                    vcpus,
                })
                .map_err(|_| "vCPU count does not fit 32 bits".to_string()),
            6 => Ok(Request::Info),
            7 => {
                if name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b".:-[]".contains(&c))
                {
                    Ok(Request::Migrate { to: name, data })
                } else {
                    Err(format!("migration target {name:?} is not HOST:PORT"))
                }
            }
            op => Err(format!("unknown op {op}")),
        };
        match r {
            Ok(r) => Some((id, r)),
            Err(why) => {
                self.refuse(id, status::MALFORMED, &why);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 16] = [7; 16];

    fn request(op: u16, epoch: u64, seq: u64, name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER];
        b[0..4].copy_from_slice(&REQ_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&1u16.to_le_bytes());
        b[6..8].copy_from_slice(&op.to_le_bytes());
        b[8..16].copy_from_slice(&epoch.to_le_bytes());
        b[16..24].copy_from_slice(&seq.to_le_bytes());
        b[24..28].copy_from_slice(&(name.len() as u32).to_le_bytes());
        b[28..32].copy_from_slice(&(data.len() as u32).to_le_bytes());
        b[48..48 + name.len()].copy_from_slice(name.as_bytes());
        b.extend_from_slice(data);
        b.resize(HEADER + data.len().div_ceil(8) * 8, 0);
        let m = mac(&KEY, &b);
        b.extend_from_slice(&m);
        b
    }

    fn service() -> (StateService, GuestRam) {
        let ram = GuestRam::new(1 << 20).unwrap();
        (
            StateService::new("t", KEY, 99, 1, ServiceState::default()),
            ram,
        )
    }

    #[test]
    fn siphash_128_matches_the_reference_vector() {
        // SipHash-2-4-128, key 00..0f, empty message (vectors.h).
        let key: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            mac(&key, &[]),
            [
                0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6, 0x72, 0x14, 0xc7, 0x55,
                0x02, 0x93
            ]
        );
    }

    #[test]
    fn a_good_request_is_accepted_and_a_replay_refused() {
        let (mut s, ram) = service();
        let r = request(1, 99, 1, "snap", b"hello");
        ram.write(0x1000, &r).unwrap();
        let (id, req) = s.submit(0, &ram, 0x1000).unwrap();
        assert_eq!(
            req,
            Request::Save {
                name: "snap".into(),
                data: b"hello".to_vec()
            }
        );
        assert_eq!(s.last_id(0), id);
        assert!(s.submit(0, &ram, 0x1000).is_none(), "replay accepted");
        let e = s.snapshot().queue.pop().unwrap();
        assert_eq!((e.kind, e.status), (kind::ERROR, status::REPLAYED));
    }

    #[test]
    fn wrong_mac_stale_epoch_and_bad_names_are_refused_with_events() {
        let (mut s, ram) = service();
        let mut r = request(1, 99, 1, "snap", b"");
        let n = r.len();
        r[n - 1] ^= 1;
        ram.write(0, &r).unwrap();
        assert!(s.submit(0, &ram, 0).is_none());
        ram.write(0, &request(1, 98, 2, "snap", b"")).unwrap();
        assert!(s.submit(0, &ram, 0).is_none());
        ram.write(0, &request(1, 99, 3, "../x", b"")).unwrap();
        assert!(s.submit(0, &ram, 0).is_none());
        ram.write(0, &request(9, 99, 4, "", b"")).unwrap();
        assert!(s.submit(0, &ram, 0).is_none());
        let st: Vec<u32> = s.snapshot().queue.iter().map(|e| e.status).collect();
        assert_eq!(
            st,
            vec![
                status::BAD_MAC,
                status::WRONG_EPOCH,
                status::MALFORMED,
                status::MALFORMED
            ]
        );
        // The forged and stale ones did not move the sequence; the two
        // authentic but malformed ones did (they must not be replayable).
        ram.write(0, &request(2, 99, 4, "", b"")).unwrap();
        assert!(s.submit(0, &ram, 0).is_none());
        ram.write(0, &request(2, 99, 5, "", b"")).unwrap();
        assert_eq!(s.submit(0, &ram, 0).map(|x| x.1), Some(Request::List));
    }

    #[test]
    fn events_are_delivered_in_order_with_the_current_epoch() {
        let (mut s, ram) = service();
        s.push(Event::new(kind::SAVED, 5).with_text(b"n").with_data(b"abc"));
        s.push(Event::new(kind::INFO, 6));
        let len = s.next_len() as usize;
        assert_eq!(len, 40 + 1 + 3);
        s.deliver(&ram, 0x100);
        let mut b = vec![0u8; len];
        ram.read(0x100, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), kind::SAVED);
        assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 99);
        assert_eq!(&b[40..], b"nabc");
        assert_eq!(s.next_len(), 40);
        s.deliver(&ram, 0x100);
        assert_eq!(s.next_len(), 0);
    }
}
