//! The control API's requests and replies (docs/control-api.md,
//! docs/openapi.yaml), one type per JSON shape. The gateway serialises
//! exactly these and `lunctl` and `vmm-shim` deserialise them, so there is
//! one definition of every route's wire format.
//!
//! Request bodies refuse unknown fields (a typo is a 400, not a silently
//! ignored option); replies accept them, so an older client keeps working
//! against a newer gateway that adds a field.

use uuid::Uuid;

use crate::records::RecordType;

/// Every error reply: a 4xx/5xx status with this body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// The reply of a route that returns nothing: `{}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Empty {}

/// How a LUN lays out its regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Offset,
    Truncate,
    Aligned,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Offset => "offset",
            Layout::Truncate => "truncate",
            Layout::Aligned => "aligned",
        })
    }
}

/// `GET /v1/exports`: one element per export.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportInfo {
    pub name: String,
    /// The served LUN's name (`None` for an export that is not a LUN's disk).
    pub lun: Option<String>,
    pub lun_uuid: Option<Uuid>,
    pub disk: u32,
    pub size: u64,
    pub read_only: bool,
    pub connections: u64,
}

/// `GET /v1/stats`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub exports: Vec<ExportStats>,
    pub switch: SwitchSummary,
}

/// Counters of one export since the gateway started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportStats {
    pub name: String,
    pub reads: u64,
    /// WRITE, WRITE_ZEROES and TRIM.
    pub writes: u64,
    pub bytes_read: u64,
    /// WRITE payloads only.
    pub bytes_written: u64,
    pub errors: u64,
    pub in_flight: u64,
}

/// The live switch's pauses since the gateway started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SwitchSummary {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Requests that waited in a holding queue, over all pauses.
    pub held_requests: u64,
}

/// `GET /v1/luns`: one element per served LUN.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LunInfo {
    pub name: String,
    pub path: std::path::PathBuf,
    pub uuid: Uuid,
    pub layout: Layout,
    /// How many snapshots it has.
    pub snapshots: usize,
}

/// One snapshot (`GET /v1/luns/{lun}/snapshots` lists them, oldest first).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Unix seconds.
    pub created: u64,
    /// The nearest older snapshot on this snapshot's branch.
    pub parent: Option<String>,
    /// The frozen layer's UUID.
    pub layer: Uuid,
    /// Whether the live volume descends directly from this snapshot.
    pub current: bool,
    /// The regions whose size at this snapshot differs from the LUN's
    /// now (the LUN was resized after it); empty when none does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sizes: Vec<RegionSize>,
}

/// A region's size in a snapshot taken before a resize, and now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionSize {
    /// `state`, `disk0`, … (0 bytes: the region did not exist yet).
    pub region: String,
    pub bytes: u64,
    pub now: u64,
}

/// `POST /v1/luns/{lun}/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// The reply to a snapshot: 201 with the snapshot and the I/O pause.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotTaken {
    pub snapshot: SnapshotInfo,
    pub pause_us: u64,
}

/// `POST /v1/luns/{lun}/revert`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    pub snapshot: String,
}

/// The reply to an operation that ran inside a live switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Paused {
    /// How long the LUN's I/O was held, µs.
    pub pause_us: u64,
}

/// `POST /v1/luns/{lun}/clone`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    pub snapshot: String,
    pub name: String,
}

/// The reply to a clone: 201 with the new LUN and its exports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cloned {
    pub name: String,
    pub path: std::path::PathBuf,
    pub uuid: Uuid,
    pub exports: Vec<String>,
}

/// The query of `GET /v1/luns/{lun}/diff` and `/diff-file`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffQuery {
    pub from: String,
    /// `None`: the live volume.
    pub to: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Data,
    Zero,
}

/// One changed extent, in LUN byte offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    pub offset: u64,
    pub length: u64,
    pub kind: ChangeKind,
}

/// The reply of `GET /v1/luns/{lun}/diff`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Diff {
    pub changes: Vec<Change>,
}

/// `GET /v1/luns/{lun}/usage`: one element per layer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerUsage {
    pub layer: Uuid,
    pub path: std::path::PathBuf,
    pub snapshot: Option<String>,
    /// The live, writable layer.
    pub live: bool,
    /// Part of the live chain.
    pub in_chain: bool,
    /// Belongs to another volume (this one is a clone of it).
    pub external: bool,
    /// Clusters the layer holds × cluster size (the whole size for a base).
    pub allocated_bytes: u64,
    /// Bytes its file occupies on disk.
    pub disk_bytes: u64,
}

/// `POST /v1/luns/{lun}/scrub`: every data checksum of the VM checked,
/// one report per member LUN (the primary first, then its secondaries).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Scrub {
    pub luns: Vec<LunScrub>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LunScrub {
    pub path: std::path::PathBuf,
    /// Layers that keep checksums, and those that do not (the base LUN
    /// file, layers of a LUN made without `--checksums`).
    pub layers_checked: usize,
    pub layers_without_checksums: usize,
    pub clusters_checked: u64,
    pub bytes_checked: u64,
    /// Data clusters not summed yet (written since the last flush).
    pub clusters_unsummed: u64,
    pub errors: Vec<ScrubError>,
}

/// A cluster whose bytes differ from their committed checksum.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScrubError {
    pub layer: Uuid,
    pub snapshot: Option<String>,
    pub live: bool,
    pub cluster: u64,
    /// Byte offset of the cluster in the LUN.
    pub offset: u64,
    pub phys: u64,
    /// Views (`live`, snapshot names) that read the damaged cluster.
    pub affected: Vec<String>,
    /// Views holding another version of the cluster that passes its
    /// checksum (to restore from).
    pub intact_in: Vec<String>,
}

impl Scrub {
    /// Damaged clusters over every member.
    pub fn error_count(&self) -> usize {
        self.luns.iter().map(|l| l.errors.len()).sum()
    }
}

// ----- state records -------------------------------------------------------

/// One record of a served LUN's state directory
/// (`GET /v1/luns/{lun}/records`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordInfo {
    #[serde(rename = "type")]
    pub rtype: RecordType,
    pub instance: u16,
    pub length: u64,
    /// blake3 of the payload, 64 hex digits.
    pub blake3: String,
}

/// The reply of `GET /v1/luns/{lun}/records`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Records {
    /// The state directory's generation.
    pub generation: u64,
    /// Bytes of the state region payloads may use, and bytes in use.
    pub capacity: u64,
    pub used: u64,
    pub records: Vec<RecordInfo>,
}

/// A record to write in a [`RecordBatch`]: its payload is the next
/// `length` bytes of the body after the header.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordPut {
    #[serde(rename = "type")]
    pub rtype: RecordType,
    pub instance: u16,
    pub length: u64,
}

/// A record to remove in a [`RecordBatch`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordRef {
    #[serde(rename = "type")]
    pub rtype: RecordType,
    pub instance: u16,
}

/// The header of `POST /v1/luns/{lun}/records`: every record it writes and
/// removes becomes current in one new directory generation, or none does.
///
/// The body is `u32` little-endian header length, the header as JSON, then
/// each `put`'s payload in order, back to back (see
/// [`RecordBatch::encode_header`]). Payloads stream: the gateway writes
/// them to free space as they arrive and commits the directory at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordBatch {
    #[serde(default)]
    pub put: Vec<RecordPut>,
    #[serde(default)]
    pub remove: Vec<RecordRef>,
}

/// Largest JSON header a record batch may have.
pub const MAX_BATCH_HEADER: u32 = 1 << 20;

impl RecordBatch {
    /// The body's first bytes: header length and header.
    pub fn encode_header(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("record batch serialises");
        let mut out = Vec::with_capacity(4 + json.len());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out
    }

    /// Bytes of payload that follow the header.
    pub fn payload_len(&self) -> Option<u64> {
        self.put
            .iter()
            .try_fold(0u64, |a, p| a.checked_add(p.length))
    }

    /// Length of the whole body.
    pub fn body_len(&self) -> Option<u64> {
        let header = serde_json::to_vec(self).ok()?.len() as u64;
        self.payload_len()?.checked_add(4 + header)
    }
}

/// The reply of a record batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordsWritten {
    /// The state directory's new generation.
    pub generation: u64,
}

/// The response header that carries a streamed record's blake3 (64 hex
/// digits), so a client checks what it received end to end.
pub const BLAKE3_HEADER: &str = "x-lungate-blake3";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_keep_the_documented_field_names() {
        let s = SnapshotTaken {
            snapshot: SnapshotInfo {
                name: "s1".into(),
                description: "d".into(),
                created: 7,
                parent: None,
                layer: Uuid::nil(),
                current: true,
                sizes: vec![],
            },
            pause_us: 3,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["snapshot"]["parent"], serde_json::Value::Null);
        assert_eq!(v["pause_us"], 3);
        let c = Change {
            offset: 1,
            length: 2,
            kind: ChangeKind::Zero,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"offset":1,"length":2,"kind":"zero"}"#
        );
        assert_eq!(serde_json::to_string(&Empty {}).unwrap(), "{}");
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        assert!(serde_json::from_str::<SnapshotRequest>(r#"{"name":"a","nmae":"b"}"#).is_err());
        let r: SnapshotRequest = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
        assert_eq!(r.description, "");
    }

    #[test]
    fn a_batch_header_is_its_length_then_json() {
        let b = RecordBatch {
            put: vec![RecordPut {
                rtype: RecordType::MemoryImage,
                instance: 1,
                length: 4096,
            }],
            remove: vec![RecordRef {
                rtype: RecordType::MemoryImage,
                instance: 0,
            }],
        };
        let h = b.encode_header();
        let n = u32::from_le_bytes(h[..4].try_into().unwrap()) as usize;
        assert_eq!(n + 4, h.len());
        let back: RecordBatch = serde_json::from_slice(&h[4..]).unwrap();
        assert_eq!(back, b);
        assert_eq!(b.body_len(), Some(h.len() as u64 + 4096));
        assert!(String::from_utf8_lossy(&h[4..]).contains(r#""type":"memory-image""#));
    }
}

// ----- migrations ------------------------------------------------------------

/// `POST /v1/luns/{lun}/migrate`: move the VM's LUNs to another gateway
/// (`to`) or to another pool of this one (`to_pool`). Exactly one of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The target gateway's migration listener, `HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A pool directory this gateway serves (its path or its name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_pool: Option<String>,
    /// The pool on the target gateway (a pool directory's name); default:
    /// its first pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pool: Option<String>,
    /// Guest-visible pause budget, ms; default `[migration] downtime_ms`
    /// or 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Bytes per second the copy may use; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<u64>,
    /// Keep the source's copy (under `POOL/NAME.migrated-ID/`) instead of
    /// deleting it.
    #[serde(default)]
    pub keep_source: bool,
    /// Move the clones of the VM's layers too (otherwise a VM with clones
    /// is refused, naming them).
    #[serde(default)]
    pub with_dependents: bool,
    /// The bearer token to present; default: `[migration] token_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Hold before the switch: once the rounds fit the budget, keep copying
    /// round after round until `POST /v1/migrations/{id}/release` (or fail
    /// after `hold_ms`). `vmm-shim migrate` holds while it writes the
    /// guest's last memory pages and vCPU state into the state region.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
    /// How long a hold may last, ms (default 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_ms: Option<u64>,
    /// Slow the guests' writes when the copy rounds stop shrinking, until
    /// they converge (default: on; `false` turns it off, and a migration
    /// that does not converge within `max_rounds` then fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_converge: Option<bool>,
}

/// Which way a migration goes, seen from the gateway reporting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outgoing,
    Incoming,
    /// Between two pools of this gateway.
    Local,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Asking the target to admit it.
    Preparing,
    /// Copying frozen layers and the live layer's first pass.
    Copying,
    /// Copying what changed meanwhile, round after round.
    Rounds,
    /// I/O paused: last changes, verification, commit.
    Switching,
    /// The source paused without an answer to its commit: asking the target
    /// whether it committed.
    InDoubt,
    /// Committed: the target owns the LUNs; the source forwards the
    /// connections it had and finishes.
    Forwarding,
    Done,
    Aborted,
    Failed,
}

impl MigrationPhase {
    /// Whether the migration is over (one way or the other).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationPhase::Done | MigrationPhase::Aborted | MigrationPhase::Failed
        )
    }
}

/// One migration (`GET /v1/migrations`, `GET /v1/migrations/{id}`), with
/// the final report's figures once it is over.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationInfo {
    pub id: Uuid,
    /// The VM (its primary LUN's name).
    pub lun: String,
    /// Every LUN that moves: the primary, its secondary disks, dependents.
    pub members: Vec<String>,
    pub direction: Direction,
    /// The other gateway (`HOST:PORT`), or the target pool of a local move.
    pub peer: String,
    pub phase: MigrationPhase,
    /// Bytes sent (or, incoming, received) so far, every round together.
    pub bytes: u64,
    /// Bytes the bulk copy has to send (frozen files and the live layer's
    /// first pass); later rounds add to `bytes` beyond it.
    pub bulk_bytes: u64,
    /// Copy rounds after the bulk pass.
    pub rounds: u32,
    /// The measured copy rate, bytes per second.
    pub rate: u64,
    /// Bytes the guests have dirtied since the last round.
    pub dirty_bytes: u64,
    pub downtime_ms: u64,
    /// The guest-visible pause of the switch, µs (once it happened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_us: Option<u64>,
    /// Requests that waited in the holding queue during the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<u64>,
    /// Control operations queued during the migration (run on the target).
    pub queued_ops: u64,
    /// A held migration (`hold`) has converged and waits for its release.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// Whether the source throttles the guests' writes when the rounds
    /// stop shrinking.
    #[serde(default)]
    pub auto_converge: bool,
    /// The write rate the gates admit now, bytes per second (while the
    /// throttle is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_rate: Option<u64>,
    /// Copy rounds that ran with the guests' writes throttled.
    #[serde(default)]
    pub throttle_rounds: u32,
    /// The lowest write rate admitted, bytes per second (if it throttled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_min_rate: Option<u64>,
    /// Guest writes whose admission the throttle delayed.
    #[serde(default)]
    pub throttled_writes: u64,
    /// Where the source kept its copy (`keep_source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_source: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix seconds.
    pub started: u64,
    pub elapsed_ms: u64,
}

// ----- replication (docs/migration.md, "Replication and failover") --------

/// `POST /v1/luns/{lun}/replicate`: ship the VM's changes to another
/// gateway continuously, with a checkpoint (a snapshot `replica-SEQ` on
/// both sides) every `every_ms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicateRequest {
    /// The target gateway's migration listener, `HOST:PORT`.
    pub to: String,
    /// The pool on the target gateway; default: its first pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pool: Option<String>,
    /// Interval between checkpoints, ms (at least 100).
    pub every_ms: u64,
    /// Replication snapshots kept on the source (and so on the target);
    /// default 2, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
    /// Bytes per second a cycle may use; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<u64>,
    /// The bearer token to present; default: `[migration] token_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Which side of a replication a gateway is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaSide {
    /// This gateway serves the LUN and ships its checkpoints.
    Source,
    /// This gateway holds a replica (not exported) and receives them.
    Replica,
}

/// A checkpoint: a snapshot both sides hold, complete on the target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The snapshot's name, `replica-SEQ`.
    pub name: String,
    pub seq: u64,
    /// When the source took it, seconds since the epoch.
    pub created: u64,
}

/// One replication cycle, as the source ran it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CycleInfo {
    pub seq: u64,
    /// Payload bytes sent (frozen layers the target lacked, the label).
    pub bytes: u64,
    /// Frozen files (the LUN file, layers) sent whole / already on the target.
    pub layers_sent: u32,
    pub layers_reused: u32,
    pub elapsed_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A replication (`GET /v1/replications`): a source job, or a replica
/// this gateway holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicationInfo {
    pub lun: String,
    pub uuid: Uuid,
    pub side: ReplicaSide,
    /// The target (`HOST:PORT`) of a source; the source's address of a
    /// replica.
    pub peer: String,
    /// `running`, `stopped`, `failed` (source); `idle`, `receiving`,
    /// `promoted` (replica).
    pub state: String,
    pub every_ms: u64,
    /// The newest complete checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// The latest cycles, oldest first (a source keeps the last 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cycles: Vec<CycleInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/replicas/{lun}/failover` on the target's gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    /// The pool holding the replica; default: the first that has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Abort a cycle being received and promote the previous checkpoint.
    #[serde(default)]
    pub force: bool,
}

/// What a failover promoted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailedOver {
    pub lun: String,
    pub members: Vec<String>,
    pub checkpoint: Checkpoint,
    pub exports: Vec<String>,
    /// A cycle was being received and was aborted (`force`).
    pub aborted_cycle: bool,
}
