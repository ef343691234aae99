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
    /// JSON [`Policy`]: where the VM may migrate, which gateways may admit
    /// it, how many snapshots it keeps.
    Policy,
}

impl RecordType {
    pub const ALL: [RecordType; 11] = [
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
        RecordType::Policy,
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
            RecordType::Policy => 11,
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
            RecordType::Policy => "policy",
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

/// The VM's policy, which travels with it and which every gateway that
/// serves it enforces (`lunctl policy`, docs/migration.md):
///
/// * `migrate_to`: where `lunctl migrate --to` may send it (`HOST:PORT`,
///   an IP address or a CIDR block, matched against the destination's
///   address); empty: anywhere;
/// * `gateways`: the gateways (by their migration name, `[migration]
///   name`, default the host name) that may admit it; empty: any;
/// * `keep_snapshots`: after a snapshot is taken, the oldest snapshots
///   beyond this many are deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrate_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_snapshots: Option<u32>,
}

impl Policy {
    /// May the VM go to `to` (a `HOST:PORT` as given to `--to`)?
    pub fn allows_destination(&self, to: &str) -> bool {
        if self.migrate_to.is_empty() {
            return true;
        }
        let addr: Option<std::net::SocketAddr> = to.parse().ok();
        self.migrate_to.iter().any(|rule| {
            if rule == to {
                return true;
            }
            let Some(a) = addr else { return false };
            match rule.split_once('/') {
                Some((net, bits)) => match (net.parse::<std::net::IpAddr>(), bits.parse::<u32>()) {
                    (Ok(n), Ok(b)) => in_block(a.ip(), n, b),
                    _ => false,
                },
                None => rule
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip == a.ip()),
            }
        })
    }

    /// May gateway `name` admit the VM?
    pub fn admits(&self, name: &str) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == name)
    }
}

fn in_block(ip: std::net::IpAddr, net: std::net::IpAddr, bits: u32) -> bool {
    use std::net::IpAddr;
    match (ip.to_canonical(), net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// 32 hex digits as 16 bytes.
pub fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    let s = s.as_bytes();
    // Hex digits only: `from_str_radix` alone would take "+1" as a byte.
    if s.len() != 32 || !s.iter().all(u8::is_ascii_hexdigit) {
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
    fn a_policy_matches_destinations_by_address_block_and_gateways_by_name() {
        let p = Policy {
            migrate_to: vec![
                "10.0.0.0/8".into(),
                "192.0.2.7".into(),
                "host-b:7000".into(),
            ],
            gateways: vec!["gw-b".into()],
            keep_snapshots: Some(3),
        };
        assert!(p.allows_destination("10.1.2.3:7000"));
        assert!(p.allows_destination("192.0.2.7:1"));
        assert!(p.allows_destination("host-b:7000"));
        assert!(!p.allows_destination("127.0.0.1:7000"));
        assert!(!p.allows_destination("host-c:7000"));
        assert!(p.admits("gw-b") && !p.admits("gw-c"));
        assert!(Policy::default().allows_destination("anything:1"));
        assert!(Policy::default().admits("any"));
        assert!(serde_json::from_str::<Policy>(r#"{"keep":1}"#).is_err());
    }

    #[test]
    fn hex_keys_round_trip_and_bad_ones_are_refused() {
        let k = [0xa5u8; 16];
        assert_eq!(parse_hex16(&hex16(&k)), Some(k));
        assert_eq!(parse_hex16("00"), None);
        assert_eq!(parse_hex16(&"zz".repeat(16)), None);
        // Found by the control_api fuzz target: a sign is no hex digit.
        assert_eq!(parse_hex16("00+12233445566778899aabbccddeeff"), None);
        assert_eq!(parse_hex16("-1".repeat(16).as_str()), None);
    }
}
