//! The hidden state region's record types and the JSON payloads of the
//! records that have one (docs/lun-format.md, *Record types*). The
//! directory that indexes them, with its checksums and crash-safe update,
//! is `lun_manager::format::state`; this module is only the shared
//! vocabulary, so the gateway, `lunctl` and `vmm-shim` read the same types.

use uuid::Uuid;

/// Record types. The numbers are on disk and never reused.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum RecordType {
    /// JSON [`HardwareConfig`].
    HardwareConfig,
    /// Opaque vCPU state blob; instance = vCPU number.
    VcpuState,
    /// Opaque device state blob; instance = device number.
    DeviceState,
    /// JSON [`MemoryMap`]: guest-physical extents of a memory image.
    MemoryMap,
    /// Raw memory image bytes; instance = image number.
    MemoryImage,
    /// JSON snapshot tree.
    SnapshotTree,
    /// JSON [`Identity`].
    Identity,
    /// JSON [`SecondaryDisks`].
    SecondaryDisks,
    /// JSON [`Owner`] lock record.
    Owner,
    /// JSON [`GuestService`]: the guest state service's key and the VM's
    /// generation counter (`vmm-shim`).
    GuestService,
}

impl RecordType {
    pub const ALL: [RecordType; 10] = [
        RecordType::HardwareConfig,
        RecordType::VcpuState,
        RecordType::DeviceState,
        RecordType::MemoryMap,
        RecordType::MemoryImage,
        RecordType::SnapshotTree,
        RecordType::Identity,
        RecordType::SecondaryDisks,
        RecordType::Owner,
        RecordType::GuestService,
    ];

    pub fn code(self) -> u16 {
        match self {
            RecordType::HardwareConfig => 1,
            RecordType::VcpuState => 2,
            RecordType::DeviceState => 3,
            RecordType::MemoryMap => 4,
            RecordType::MemoryImage => 5,
            RecordType::SnapshotTree => 6,
            RecordType::Identity => 7,
            RecordType::SecondaryDisks => 8,
            RecordType::Owner => 9,
            RecordType::GuestService => 10,
        }
    }

    /// Whether the payload is JSON (the others are opaque or raw bytes).
    pub fn is_json(self) -> bool {
        !matches!(
            self,
            RecordType::VcpuState | RecordType::DeviceState | RecordType::MemoryImage
        )
    }

    pub fn from_code(c: u16) -> Option<RecordType> {
        Self::ALL.into_iter().find(|t| t.code() == c)
    }

    pub fn name(self) -> &'static str {
        match self {
            RecordType::HardwareConfig => "hardware-config",
            RecordType::VcpuState => "vcpu-state",
            RecordType::DeviceState => "device-state",
            RecordType::MemoryMap => "memory-map",
            RecordType::MemoryImage => "memory-image",
            RecordType::SnapshotTree => "snapshot-tree",
            RecordType::Identity => "identity",
            RecordType::SecondaryDisks => "secondary-disks",
            RecordType::Owner => "owner",
            RecordType::GuestService => "guest-service",
        }
    }
}

impl std::fmt::Display for RecordType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RecordType {
    type Err = String;

    /// A record type by its name (`memory-image`) or its number (`5`).
    fn from_str(s: &str) -> Result<RecordType, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s || s.parse::<u16>().ok() == Some(t.code()))
            .ok_or_else(|| {
                format!(
                    "unknown state record type {s:?} (known: {})",
                    Self::ALL.map(|t| t.name()).join(", ")
                )
            })
    }
}

/// Hardware configuration of the VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HardwareConfig {
    pub vcpus: u32,
    pub memory_bytes: u64,
    #[serde(default)]
    pub devices: Vec<Device>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Device {
    /// e.g. "virtio-blk", "serial".
    pub kind: String,
    /// Disk index for block devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<u32>,
}

/// The original identity of each disk, which guests see and which survives
/// snapshot and revert.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub disks: Vec<DiskIdentity>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskIdentity {
    pub index: u32,
    /// 16 bytes, hex.
    pub id: String,
    /// Export name at creation (`NAME/diskN`).
    pub export_name: String,
    pub description: String,
}

impl DiskIdentity {
    pub fn id_bytes(&self) -> Option<[u8; 16]> {
        parse_hex16(&self.id)
    }
}

/// References to secondary disks held in other LUNs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecondaryDisks {
    pub disks: Vec<SecondaryRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecondaryRef {
    pub lun_uuid: Uuid,
    /// VM name of the secondary LUN when it was attached (informational).
    pub name: String,
    /// Where it was found when attached (a hint; the scanner matches by UUID).
    pub path_hint: String,
    pub attached: u64,
}

/// Snapshot tree; populated by the volume engine.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotTree {
    pub snapshots: Vec<SnapshotNode>,
    /// LUN this one was cloned from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<CloneOrigin>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotNode {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub created: u64,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CloneOrigin {
    pub lun_uuid: Uuid,
    pub snapshot: String,
}

/// Guest-physical layout of a memory image record.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryMap {
    pub extents: Vec<MemoryExtent>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryExtent {
    pub guest_addr: u64,
    pub length: u64,
    /// Which memory-image record instance holds it, and where in it.
    pub image: u16,
    pub image_offset: u64,
}

/// Who owns the LUN (a running gateway or shim): the lock record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub since: u64,
    /// Unix socket path of the owner's control API (a gateway), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<String>,
}

/// The guest state service's settings (`vmm-shim`, docs/vmm-shim.md):
/// the per-VM key that authenticates the guest's requests and the VM's
/// generation counter, which changes when the VM becomes a new copy of
/// itself (a clone), like VMGenID.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestService {
    /// The 16-byte SipHash-2-4 key, 32 hex digits.
    pub key: String,
    /// Starts at 1; `vmm-shim` adds one when it finds the record in a LUN
    /// whose UUID is not `lun_uuid` (the record was copied by a clone).
    pub generation: u64,
    /// The LUN this record was last stamped for.
    pub lun_uuid: Uuid,
}

impl GuestService {
    /// The key's 16 bytes, or `None` if `key` is not 32 hex digits.
    pub fn key_bytes(&self) -> Option<[u8; 16]> {
        parse_hex16(&self.key)
    }
}

/// 32 hex digits as 16 bytes.
pub fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    let s = s.as_bytes();
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let h = std::str::from_utf8(&s[2 * i..2 * i + 2]).ok()?;
        *o = u8::from_str_radix(h, 16).ok()?;
    }
    Some(out)
}

/// 16 bytes as 32 lowercase hex digits.
pub fn hex16(b: &[u8; 16]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_types_parse_by_name_and_number_and_codes_are_unique() {
        for t in RecordType::ALL {
            assert_eq!(t.name().parse::<RecordType>().unwrap(), t);
            assert_eq!(t.code().to_string().parse::<RecordType>().unwrap(), t);
            assert_eq!(RecordType::from_code(t.code()), Some(t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.name());
        }
        let mut codes: Vec<u16> = RecordType::ALL.iter().map(|t| t.code()).collect();
        codes.dedup();
        assert_eq!(codes.len(), RecordType::ALL.len());
        assert!("memory".parse::<RecordType>().is_err());
    }

    #[test]
    fn hex_keys_round_trip_and_bad_ones_are_refused() {
        let k = [0xa5u8; 16];
        assert_eq!(parse_hex16(&hex16(&k)), Some(k));
        assert_eq!(parse_hex16("00"), None);
        assert_eq!(parse_hex16(&"zz".repeat(16)), None);
    }
}
