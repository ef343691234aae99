//! The VM's settings for vmm-shim: the hardware configuration it boots
//! and restores with (`set-hardware`), and the key the guest's software
//! signs its state-service requests with (`guest-key`; `create` makes
//! one). Both are state records, changed directly under the LUN's flock or
//! through the gateway that serves the LUN.

use std::path::Path;

use lun_manager::format::state::{GuestService, HardwareConfig, RecordType};
use lun_manager::owner::{self, Probe};
use lun_manager::size::human;
use lun_manager::{Access, Lun};
use lungate_api::client as control;
use lungate_api::types as wire;
use lungate_cli::Output;
use serde::Serialize;

use crate::fail::{Fail, Res};

fn json_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("record types serialise")
}

/// A fresh guest-service record: a random 16-byte key, generation 1.
pub fn new_guest_service(lun: uuid::Uuid) -> Res<GuestService> {
    let mut key = [0u8; 16];
    getrandom::fill(&mut key).map_err(|e| format!("no random bytes for the guest key: {e}"))?;
    Ok(GuestService {
        key: lungate_api::records::hex16(&key),
        generation: 1,
        lun_uuid: lun,
    })
}

/// Give a LUN just created its guest-service record.
pub fn install_guest_service(lun: &mut Lun) -> Res {
    let service = new_guest_service(lun.uuid())?;
    lun.put_records(&[(RecordType::GuestService, 0, json_bytes(&service))])?;
    Ok(())
}

/// Where a state-record change goes: this process (holding the LUN's
/// flock) or the gateway that serves the LUN.
enum RecordTarget {
    Direct {
        lun: Box<Lun>,
        _lock: owner::FileLock,
    },
    Gateway {
        client: control::Client,
        lun: String,
    },
}

fn record_target(path: &Path) -> Res<RecordTarget> {
    match owner::try_lock(path)? {
        Ok(lock) => Ok(RecordTarget::Direct {
            lun: Box::new(Lun::open(path, Access::ReadWrite)?),
            _lock: lock,
        }),
        Err(Probe::Gateway { pid, control: sock }) => {
            let label = Lun::probe_label(path)?;
            eprintln!(
                "lunctl: {} is served by lungate (PID {pid}); using its control API at {}",
                label.name,
                sock.display()
            );
            Ok(RecordTarget::Gateway {
                client: control::Client::new(&sock)?,
                lun: control::uuid_ref(label.uuid),
            })
        }
        Err(busy) => Err(owner::busy_error(path, &busy).into()),
    }
}

impl RecordTarget {
    fn get<T: serde::de::DeserializeOwned>(&self, t: RecordType) -> Res<Option<T>> {
        Ok(match self {
            RecordTarget::Direct { lun, .. } => lun.record_json(t, 0)?,
            RecordTarget::Gateway { client, lun } => client.record_json(lun, t, 0)?,
        })
    }

    fn put(&mut self, t: RecordType, payload: Vec<u8>) -> Res {
        match self {
            RecordTarget::Direct { lun, .. } => Ok(lun.put_records(&[(t, 0, payload)])?),
            RecordTarget::Gateway { client, lun } => {
                let batch = wire::RecordBatch {
                    put: vec![wire::RecordPut {
                        rtype: t,
                        instance: 0,
                        length: payload.len() as u64,
                    }],
                    remove: vec![],
                };
                client.write_records(lun, &batch, |_, sink| sink.write(&payload))?;
                Ok(())
            }
        }
    }

    fn uuid(&self) -> Res<uuid::Uuid> {
        match self {
            RecordTarget::Direct { lun, .. } => Ok(lun.uuid()),
            RecordTarget::Gateway { lun, .. } => lun
                .parse()
                .map_err(|e| Fail::from(format!("LUN reference {lun:?}: {e}"))),
        }
    }

    /// The LUN's layout and the length of its state region.
    fn state_region_len(&self, path: &Path) -> Res<(lun_manager::Layout, u64)> {
        let label = match self {
            RecordTarget::Direct { lun, .. } => lun.label().clone(),
            RecordTarget::Gateway { .. } => Lun::probe_label(path)?,
        };
        Ok((label.layout, label.state_region().length))
    }
}

#[derive(Serialize)]
struct Hardware {
    vcpus: u32,
    memory: u64,
}

pub fn set_hardware(out: &Output, path: &Path, memory: Option<String>, vcpus: Option<u32>) -> Res {
    if memory.is_none() && vcpus.is_none() {
        return Err(Fail::new(
            lungate_cli::Exit::Usage,
            "set-hardware needs --memory SIZE and/or --vcpus N",
        ));
    }
    let mut t = record_target(path)?;
    let mut hw: HardwareConfig = t
        .get(RecordType::HardwareConfig)?
        .ok_or_else(|| format!("{}: no hardware-config record", path.display()))?;
    if let Some(m) = memory {
        let m = lun_manager::size::parse_size(&m).map_err(|e| format!("--memory: {e}"))?;
        if m == 0 || m % (1 << 20) != 0 {
            return Err(format!("--memory {}: must be a non-zero multiple of 1M", human(m)).into());
        }
        let (layout, have) = t.state_region_len(path)?;
        let need = lun_manager::format::state::state_region_len(layout, m)
            .ok_or_else(|| format!("--memory {m}: too large"))?;
        if need > have {
            return Err(format!(
                "--memory {}: the state region is {} and must be {} for that memory (two images); grow it with lunctl resize --memory (offline)",
                human(m),
                human(have),
                human(need)
            )
            .into());
        }
        hw.memory_bytes = m;
    }
    if let Some(n) = vcpus {
        if n == 0 || n > 255 {
            return Err(format!("--vcpus {n}: must be 1 to 255").into());
        }
        hw.vcpus = n;
    }
    t.put(RecordType::HardwareConfig, json_bytes(&hw))?;
    out.result(
        "set-hardware",
        &Hardware {
            vcpus: hw.vcpus,
            memory: hw.memory_bytes,
        },
        || {
            format!(
                "hardware is now {} vCPU, {} memory (applied at the next boot or restore)\n",
                hw.vcpus,
                human(hw.memory_bytes)
            )
        },
    );
    Ok(())
}

#[derive(Serialize)]
struct Key {
    key: String,
    generation: u64,
}

pub fn guest_key(out: &Output, path: &Path) -> Res {
    let mut t = record_target(path)?;
    let service = match t.get::<GuestService>(RecordType::GuestService)? {
        Some(s) => s,
        None => {
            let s = new_guest_service(t.uuid()?)?;
            t.put(RecordType::GuestService, json_bytes(&s))?;
            eprintln!("lunctl: the LUN had no guest key; made one");
            s
        }
    };
    let key = Key {
        key: service.key.clone(),
        generation: service.generation,
    };
    out.document(&key, || format!("{}\n", service.key));
    Ok(())
}
