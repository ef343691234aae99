//! The migration protocol's vocabulary: the typed, versioned messages two
//! gateways exchange to move a VM's LUNs (or one gateway with itself, for
//! a move between its pools), and the frames they travel in. The state
//! machines that send and answer them live in the gateway
//! (`gateway/src/migrate/`, whose `protocol.rs` draws the sequence); this
//! module is only what both sides must agree on, so it has one definition.
//!
//! # Frames
//!
//! Every frame is a big-endian `u32` length `n` (at most [`MAX_FRAME`],
//! checked before anything is reserved), then `n` bytes: a one-byte kind
//! and its body.
//!
//! | kind | body |
//! | ---: | --- |
//! | 1 | a [`Message`] as JSON |
//! | 2 | data: [`ObjectRef`] (19 bytes), offset `u64`, grain `u32`, piece count `u32`, one blake3 per piece (32 bytes each), then the bytes |
//! | 3 | zeros: [`ObjectRef`], offset `u64`, grain `u32`, length `u64` |
//!
//! A data frame's bytes are cut into pieces on the object's grain grid
//! (`grain`-aligned cells; the first and last may be partial only at the
//! object's ends), each with its own blake3, which the receiver checks
//! before it writes a byte. A zero frame makes a range read as zeros.
//!
//! [`Tally`] is the manifest check both sides keep: a sum, over every cell
//! of every object, of a hash of what the cell last received (its bytes'
//! blake3, or "zeros"). The sender's tally travels in [`Message::Commit`];
//! the receiver commits only if its own, computed from what it verified
//! and applied, is equal.

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use uuid::Uuid;

/// The protocol version this build speaks; both sides must speak the same.
pub const VERSION: u32 = 1;
/// Longest frame (its length prefix excluded).
pub const MAX_FRAME: u32 = 17 << 20;
/// Largest payload of one data frame a sender produces.
pub const MAX_DATA: usize = 1 << 20;
/// Grain of the raw files copied whole (a LUN's base, frozen layers).
pub const FILE_GRAIN: u32 = 1 << 20;

const KIND_MESSAGE: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_ZERO: u8 = 3;
const OBJECT_LEN: usize = 19;

/// What a data or zero frame writes to.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ObjectRef {
    /// Index of the LUN in [`Prepare::members`].
    pub member: u16,
    pub kind: ObjectKind,
    /// The layer, for [`ObjectKind::Layer`]; nil otherwise.
    pub layer: Uuid,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectKind {
    /// The member's live volume, by LUN byte offset (what guests see, and
    /// the state region).
    View,
    /// The LUN file's own bytes (its label, and the frozen base of a
    /// layered LUN).
    Base,
    /// A frozen layer file's bytes.
    Layer,
}

impl ObjectKind {
    fn code(self) -> u8 {
        match self {
            ObjectKind::View => 0,
            ObjectKind::Base => 1,
            ObjectKind::Layer => 2,
        }
    }
    fn from_code(c: u8) -> Option<ObjectKind> {
        Some(match c {
            0 => ObjectKind::View,
            1 => ObjectKind::Base,
            2 => ObjectKind::Layer,
            _ => return None,
        })
    }
}

impl ObjectRef {
    pub fn view(member: u16) -> ObjectRef {
        ObjectRef {
            member,
            kind: ObjectKind::View,
            layer: Uuid::nil(),
        }
    }
    pub fn base(member: u16) -> ObjectRef {
        ObjectRef {
            member,
            kind: ObjectKind::Base,
            layer: Uuid::nil(),
        }
    }
    pub fn layer(member: u16, id: Uuid) -> ObjectRef {
        ObjectRef {
            member,
            kind: ObjectKind::Layer,
            layer: id,
        }
    }
    fn put(&self, b: &mut BytesMut) {
        b.put_u16(self.member);
        b.put_u8(self.kind.code());
        b.put_slice(self.layer.as_bytes());
    }
    fn get(b: &mut &[u8]) -> Result<ObjectRef, FrameError> {
        if b.len() < OBJECT_LEN {
            return Err(FrameError::Short("object reference"));
        }
        let member = b.get_u16();
        let kind = ObjectKind::from_code(b.get_u8()).ok_or(FrameError::BadObject)?;
        let mut id = [0u8; 16];
        b.copy_to_slice(&mut id);
        let layer = Uuid::from_bytes(id);
        if (kind == ObjectKind::Layer) == layer.is_nil() {
            return Err(FrameError::BadObject);
        }
        Ok(ObjectRef {
            member,
            kind,
            layer,
        })
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            ObjectKind::View => write!(f, "member {} volume", self.member),
            ObjectKind::Base => write!(f, "member {} LUN file", self.member),
            ObjectKind::Layer => write!(f, "member {} layer {}", self.member, self.layer),
        }
    }
}

/// One frame on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Message(Message),
    Data(Data),
    Zero {
        object: ObjectRef,
        offset: u64,
        grain: u32,
        length: u64,
    },
}

/// Bytes for an object, cut into grain-grid pieces with their hashes.
#[derive(Debug, Clone, PartialEq)]
pub struct Data {
    pub object: ObjectRef,
    pub offset: u64,
    pub grain: u32,
    pub hashes: Vec<[u8; 32]>,
    pub payload: Bytes,
}

/// The pieces `(offset, length)` of `[offset, offset + len)` on the grid
/// of `grain`: cut at every multiple of `grain`.
pub fn pieces(offset: u64, len: u64, grain: u32) -> impl Iterator<Item = (u64, u64)> {
    let g = u64::from(grain.max(1));
    let end = offset.saturating_add(len);
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let cut = (at / g + 1).saturating_mul(g).min(end);
        let p = (at, cut - at);
        at = cut;
        Some(p)
    })
}

impl Data {
    /// `payload` for `[offset, offset + payload.len())` of `object`, hashed
    /// piece by piece.
    pub fn new(object: ObjectRef, offset: u64, grain: u32, payload: Bytes) -> Data {
        let hashes = pieces(offset, payload.len() as u64, grain)
            .map(|(o, l)| {
                let s = (o - offset) as usize;
                *blake3::hash(&payload[s..s + l as usize]).as_bytes()
            })
            .collect();
        Data {
            object,
            offset,
            grain,
            hashes,
            payload,
        }
    }

    /// Check every piece against its hash; the index of the first bad one.
    pub fn verify(&self) -> Result<(), FrameError> {
        for (i, (o, l)) in pieces(self.offset, self.payload.len() as u64, self.grain).enumerate() {
            let s = (o - self.offset) as usize;
            if blake3::hash(&self.payload[s..s + l as usize]).as_bytes() != &self.hashes[i] {
                return Err(FrameError::Checksum {
                    object: self.object,
                    offset: o,
                    length: l,
                });
            }
        }
        Ok(())
    }
}

/// Why bytes could not be decoded as a frame. Fatal for the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLong(u32),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame too short for its {0}")]
    Short(&'static str),
    #[error("bad object reference")]
    BadObject,
    #[error("grain {0} is not a power of two in 4096..=4194304")]
    Grain(u32),
    #[error("data frame with {count} hashes for {len} bytes at {offset} (grain {grain})")]
    Pieces {
        count: u32,
        len: usize,
        offset: u64,
        grain: u32,
    },
    #[error("range at {offset} + {length} overflows 64 bits")]
    Overflow { offset: u64, length: u64 },
    #[error("message is not valid JSON of this protocol: {0}")]
    Json(String),
    #[error("{object}: bytes at {offset} + {length} fail their blake3")]
    Checksum {
        object: ObjectRef,
        offset: u64,
        length: u64,
    },
}

fn check_grain(g: u32) -> Result<(), FrameError> {
    if g.is_power_of_two() && (4096..=4 << 20).contains(&g) {
        Ok(())
    } else {
        Err(FrameError::Grain(g))
    }
}

impl Frame {
    /// Append the frame, length prefix first.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        match self {
            Frame::Message(m) => {
                out.put_u8(KIND_MESSAGE);
                let json = serde_json::to_vec(m).expect("messages serialise");
                out.put_slice(&json);
            }
            Frame::Data(d) => {
                out.put_u8(KIND_DATA);
                d.object.put(out);
                out.put_u64(d.offset);
                out.put_u32(d.grain);
                out.put_u32(d.hashes.len() as u32);
                for h in &d.hashes {
                    out.put_slice(h);
                }
                out.put_slice(&d.payload);
            }
            Frame::Zero {
                object,
                offset,
                grain,
                length,
            } => {
                out.put_u8(KIND_ZERO);
                object.put(out);
                out.put_u64(*offset);
                out.put_u32(*grain);
                out.put_u64(*length);
            }
        }
        let n = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&n.to_be_bytes());
    }

    /// Take one frame off the front of `buf`: `Ok(None)` when more bytes
    /// are needed (nothing consumed), `Err` when the bytes are not a frame.
    /// The length is checked before anything is reserved.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let n = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
        if n > MAX_FRAME {
            return Err(FrameError::TooLong(n));
        }
        if n == 0 {
            return Err(FrameError::Empty);
        }
        if buf.len() < 4 + n as usize {
            buf.reserve(4 + n as usize - buf.len());
            return Ok(None);
        }
        buf.advance(4);
        let body = buf.split_to(n as usize).freeze();
        Self::parse(body).map(Some)
    }

    fn parse(body: Bytes) -> Result<Frame, FrameError> {
        let kind = body[0];
        let mut b: &[u8] = &body[1..];
        match kind {
            KIND_MESSAGE => serde_json::from_slice(b)
                .map(Frame::Message)
                .map_err(|e| FrameError::Json(e.to_string())),
            KIND_DATA => {
                let object = ObjectRef::get(&mut b)?;
                if b.len() < 16 {
                    return Err(FrameError::Short("data header"));
                }
                let offset = b.get_u64();
                let grain = b.get_u32();
                check_grain(grain)?;
                let count = b.get_u32();
                let hash_bytes = (count as usize)
                    .checked_mul(32)
                    .filter(|&h| h <= b.len())
                    .ok_or(FrameError::Short("hashes"))?;
                let mut hashes = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let mut h = [0u8; 32];
                    b.copy_to_slice(&mut h);
                    hashes.push(h);
                }
                debug_assert_eq!(hash_bytes, 32 * hashes.len());
                let at = body.len() - b.len();
                let payload = body.slice(at..);
                let len = payload.len();
                offset.checked_add(len as u64).ok_or(FrameError::Overflow {
                    offset,
                    length: len as u64,
                })?;
                let want = pieces(offset, len as u64, grain).count();
                if len == 0 || want != count as usize {
                    return Err(FrameError::Pieces {
                        count,
                        len,
                        offset,
                        grain,
                    });
                }
                Ok(Frame::Data(Data {
                    object,
                    offset,
                    grain,
                    hashes,
                    payload,
                }))
            }
            KIND_ZERO => {
                let object = ObjectRef::get(&mut b)?;
                if b.len() != 20 {
                    return Err(FrameError::Short("zero range"));
                }
                let offset = b.get_u64();
                let grain = b.get_u32();
                check_grain(grain)?;
                let length = b.get_u64();
                offset
                    .checked_add(length)
                    .ok_or(FrameError::Overflow { offset, length })?;
                Ok(Frame::Zero {
                    object,
                    offset,
                    grain,
                    length,
                })
            }
            k => Err(FrameError::Kind(k)),
        }
    }
}

// ----- messages ----------------------------------------------------------

/// The control messages, in the order a migration uses them (see the
/// sequence in `gateway/src/migrate/protocol.rs` and docs/migration.md).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum Message {
    /// Source → target, first: who is asking, and its credential.
    Hello {
        version: u32,
        gateway: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Target → source: the version it speaks. A different version is
    /// answered with [`Message::Denied`] instead.
    Welcome {
        version: u32,
        gateway: String,
    },
    /// Source → target: what would move. Answered by `Permitted` or
    /// `Denied`; nothing is created on the target before `Permitted`.
    Prepare(Box<Prepare>),
    Permitted {
        /// The target's NBD port, for forwarding existing connections.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nbd_port: Option<u16>,
        /// Whether its NBD listener speaks TLS (forwarding upgrades with
        /// STARTTLS).
        #[serde(default)]
        nbd_tls: bool,
        /// A handover: the target's etcd identity, which the source makes
        /// the owner of the LUNs' keys at the commit point.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<EtcdOwner>,
    },
    Denied {
        denial: Denial,
    },
    /// Source → target: every frozen file of `member` (its base, its
    /// frozen layers) has been sent; the target builds the live layer and
    /// opens the member's volume, then takes [`ObjectKind::View`] frames.
    FilesDone {
        member: u16,
    },
    /// Source → target: the end of copy round `round` (0 is the bulk pass
    /// over the live layer).
    RoundEnd {
        round: u32,
    },
    /// Target → source: everything up to `RoundEnd { round }` is applied.
    RoundDone {
        round: u32,
    },
    /// Source → target, with the source's I/O paused and the last dirty
    /// clusters sent: make the LUNs yours if everything verifies.
    Commit {
        tally: String,
        frames: u64,
        bytes: u64,
    },
    /// Target → source: committed; the LUNs are served here now.
    Complete {
        exports: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nbd_port: Option<u16>,
    },
    /// Source → target: control operations that arrived during the
    /// migration, to run here, in order.
    Ops {
        ops: Vec<QueuedOp>,
    },
    OpsDone {
        results: Vec<OpOutcome>,
    },
    /// Source → target, in a handover: every member's I/O is paused and
    /// flushed and its RBD exclusive lock released; open the images (taking
    /// the locks) but do not serve them yet.
    Release,
    /// Target → source: the images are open and locked here; `fences`
    /// are this gateway's RBD lock owners, one per member, which the
    /// source records as the LUNs' fence keys in the commit transaction.
    Locked {
        fences: Vec<String>,
    },
    /// Source → target, in a handover: the etcd keys are yours (the commit
    /// transaction succeeded); serve the LUNs. Answered by `Complete`.
    HandedOver,
    /// Source → target: the source has retired its copy.
    Finish,
    /// Target → source: the migration is over.
    Ack,
    /// Either side: stop; the target removes everything it made.
    Abort {
        reason: String,
    },
    /// Either side: something failed; the migration is aborted.
    Failed {
        error: String,
    },
    /// Target → source, after `Permitted` of a replica cycle
    /// (`Prepare::replica`): what it holds of each member already (its
    /// LUN file, frozen layers with the same parent as in the source's
    /// manifest). The source sends only the rest.
    ReplicaHolds {
        members: Vec<ReplicaHold>,
    },
    /// Source → target: every file of the cycle is sent; make checkpoint
    /// `name` (a snapshot in the manifest of `Prepare`) the replica's
    /// newest if everything verifies. Answered by `Checkpointed`.
    ReplicaCommit {
        name: String,
        seq: u64,
        created: u64,
        tally: String,
        frames: u64,
        bytes: u64,
    },
    /// Target → source: checkpoint `name` is complete and durable here.
    Checkpointed {
        name: String,
    },
    /// Source → target, on a new connection, after a crash: did migration
    /// `migration` commit?
    Query {
        migration: Uuid,
    },
    Status {
        migration: Uuid,
        state: MigrationState,
    },
}

/// What a target knows about a migration it was asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    /// Committed here: the target owns the LUNs.
    Committed,
    /// Not committed (aborted, never seen, or cleaned up after a crash):
    /// the source owns them.
    Unknown,
}

/// What the source asks the target to admit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Prepare {
    pub migration: Uuid,
    /// The target pool (a pool directory's name); the target's first pool
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The VM's LUNs: the primary first, then its secondary disks, then
    /// (with `--with-dependents`) the clones of its layers.
    pub members: Vec<Member>,
    /// The primary's policy record, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::records::Policy>,
    /// Keep it as a replica (no forwarding, no ownership change): a
    /// checkpoint of a replication stream (see docs/migration.md).
    #[serde(default)]
    pub replica: bool,
    /// A planned handover of RBD LUNs between gateways of one cluster
    /// (docs/scale-out.md): no data is copied, the members' images (these
    /// paths, in member order) change owner in etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<Vec<String>>,
}

/// What a replica holds of one member (see [`Message::ReplicaHolds`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaHold {
    /// Its LUN file (the base and label) is there from an earlier cycle.
    pub base: bool,
    /// Frozen layers it has, unchanged.
    pub layers: Vec<Uuid>,
    /// blake3 of its LUN file's label ranges (`Member::protected`, in
    /// order), hex: the source sends them only when its own differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_blake3: Option<String>,
}

/// A gateway's identity in etcd: the value of every LUN key it owns and
/// the lease those keys are bound to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EtcdOwner {
    pub value: String,
    pub lease: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Primary,
    Secondary,
    Dependent,
}

/// One LUN that moves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    /// VM name; the file is `NAME.lun` on both sides.
    pub name: String,
    pub uuid: Uuid,
    pub role: Role,
    /// Length of the LUN file.
    pub file_len: u64,
    /// The volume's size (the LUN's byte range).
    pub size: u64,
    pub cluster_size: u32,
    /// Byte ranges of the LUN file that are not layered (label, GPT).
    pub protected: Vec<[u64; 2]>,
    /// Bytes that will be written on the target (for its space check).
    pub allocated: u64,
    /// Disk regions `(index, offset, length)`: where existing connections
    /// are forwarded.
    pub disks: Vec<[u64; 3]>,
    /// The layers of a layered LUN; `None` for a plain one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Layers>,
}

/// A layered LUN's manifest and files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layers {
    /// The volume manifest's body (JSON, docs/volumes.md), as the source
    /// has it; the target writes it as its own.
    pub manifest: String,
    /// blake3 of `manifest`, hex.
    pub manifest_blake3: String,
    /// The live (top) layer, which the target creates empty and fills
    /// through [`ObjectKind::View`] frames.
    pub live: Uuid,
    /// The live layer's parent: the LUN's UUID for the base.
    pub live_parent: Uuid,
    /// Frozen layer files, copied as they are.
    pub frozen: Vec<LayerFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerFile {
    pub id: Uuid,
    pub len: u64,
}

/// Why a target refused a migration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Denial {
    #[error("protocol version mismatch: the target speaks {target}, the source {sender}")]
    Version { target: u32, sender: u32 },
    #[error("source {peer} is not in the target's migration allow list")]
    NotAllowed { peer: String },
    #[error("missing or wrong migration token")]
    Unauthorized,
    #[error(
        "not enough free space in target pool {pool}: {needed} bytes needed, {available} available"
    )]
    NoSpace {
        pool: String,
        needed: u64,
        available: u64,
    },
    #[error("target pool {pool} already has {what} {value}")]
    Exists {
        pool: String,
        what: String,
        value: String,
    },
    #[error("the VM's policy does not admit it on gateway {gateway}")]
    Policy { gateway: String },
    #[error("the target serves no pool named {pool:?}")]
    NoPool { pool: String },
    #[error("the target cannot take it: {why}")]
    Unsupported { why: String },
}

/// A control operation queued during a migration, run on the target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum QueuedOp {
    Snapshot {
        lun: String,
        name: String,
        description: String,
    },
    Revert {
        lun: String,
        snapshot: String,
    },
    DeleteSnapshot {
        lun: String,
        snapshot: String,
    },
    Clone {
        lun: String,
        snapshot: String,
        name: String,
    },
    Flatten {
        lun: String,
    },
}

/// The result of a [`QueuedOp`]: the JSON body and HTTP status the
/// operation's route would have answered.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OpOutcome {
    pub status: u16,
    pub body: serde_json::Value,
}

// ----- the manifest check --------------------------------------------------

/// A 256-bit sum over the cells of every object of what each cell last
/// received (see the module docs). Order-independent across cells, exact
/// per cell: both sides compute it from the frames they sent or verified
/// and applied.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    cells: HashMap<(ObjectRef, u64), [u8; 32]>,
    sum: [u64; 4],
}

const ZERO_MARK: [u8; 32] = [0xff; 32];

fn add256(a: &mut [u64; 4], b: &[u8; 32], sub: bool) {
    let mut carry = false;
    for (i, limb) in a.iter_mut().enumerate() {
        let v = u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8"));
        if sub {
            let (r, o1) = limb.overflowing_sub(v);
            let (r, o2) = r.overflowing_sub(u64::from(carry));
            *limb = r;
            carry = o1 || o2;
        } else {
            let (r, o1) = limb.overflowing_add(v);
            let (r, o2) = r.overflowing_add(u64::from(carry));
            *limb = r;
            carry = o1 || o2;
        }
    }
}

impl Tally {
    fn cell_hash(object: &ObjectRef, offset: u64, len: u64, content: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&object.member.to_le_bytes());
        h.update(&[object.kind.code()]);
        h.update(object.layer.as_bytes());
        h.update(&offset.to_le_bytes());
        h.update(&len.to_le_bytes());
        h.update(content);
        *h.finalize().as_bytes()
    }

    fn set(&mut self, object: ObjectRef, cell: u64, offset: u64, len: u64, content: &[u8; 32]) {
        let new = Self::cell_hash(&object, offset, len, content);
        if let Some(old) = self.cells.insert((object, cell), new) {
            add256(&mut self.sum, &old, true);
        }
        add256(&mut self.sum, &new, false);
    }

    /// Record a verified data frame.
    pub fn data(&mut self, d: &Data) {
        let g = u64::from(d.grain);
        for ((o, l), h) in pieces(d.offset, d.payload.len() as u64, d.grain).zip(&d.hashes) {
            self.set(d.object, o / g, o, l, h);
        }
    }

    /// Record a zero range.
    pub fn zero(&mut self, object: ObjectRef, offset: u64, grain: u32, length: u64) {
        let g = u64::from(grain);
        for (o, l) in pieces(offset, length, grain) {
            self.set(object, o / g, o, l, &ZERO_MARK);
        }
    }

    /// Record a data or zero frame (a message counts nothing); the data
    /// bytes it carries.
    pub fn frame(&mut self, f: &Frame) -> u64 {
        match f {
            Frame::Data(d) => {
                self.data(d);
                d.payload.len() as u64
            }
            Frame::Zero {
                object,
                offset,
                grain,
                length,
            } => {
                self.zero(*object, *offset, *grain, *length);
                0
            }
            Frame::Message(_) => 0,
        }
    }

    /// The sum, 64 hex digits.
    pub fn digest(&self) -> String {
        self.sum.iter().map(|l| format!("{l:016x}")).collect()
    }

    /// Cells recorded.
    pub fn cells(&self) -> usize {
        self.cells.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: &Frame) -> Frame {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        // Fed one byte at a time, the decoder asks for more until the end.
        let mut partial = BytesMut::new();
        let n = b.len();
        for (i, byte) in b.iter().enumerate() {
            partial.put_u8(*byte);
            let r = Frame::decode(&mut partial).unwrap();
            if i + 1 < n {
                assert!(r.is_none(), "decoded early at byte {i} of {n}");
            } else {
                assert!(partial.is_empty());
                return r.unwrap();
            }
        }
        unreachable!()
    }

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let m = Message::Denied {
            denial: Denial::NoSpace {
                pool: "p".into(),
                needed: 10,
                available: 3,
            },
        };
        assert_eq!(roundtrip(&Frame::Message(m.clone())), Frame::Message(m));
        let v = serde_json::to_value(Message::RoundDone { round: 3 }).unwrap();
        assert_eq!(v, serde_json::json!({"msg": "round-done", "round": 3}));
    }

    #[test]
    fn oversized_and_malformed_frames_are_refused_before_allocation() {
        let mut b = BytesMut::from(&(MAX_FRAME + 1).to_be_bytes()[..]);
        assert_eq!(
            Frame::decode(&mut b),
            Err(FrameError::TooLong(MAX_FRAME + 1))
        );
        let mut b = BytesMut::from(&[0, 0, 0, 1, 9][..]);
        assert_eq!(Frame::decode(&mut b), Err(FrameError::Kind(9)));
        // A data frame whose hash count does not match its length.
        let d = Data::new(ObjectRef::view(0), 0, 4096, Bytes::from(vec![1u8; 8192]));
        let mut bad = d.clone();
        bad.hashes.pop();
        let mut b = BytesMut::new();
        Frame::Data(bad).encode(&mut b);
        assert!(matches!(
            Frame::decode(&mut b),
            Err(FrameError::Pieces { count: 1, .. })
        ));
        // A layer object without a layer id.
        let mut b = BytesMut::new();
        Frame::Zero {
            object: ObjectRef {
                member: 0,
                kind: ObjectKind::Layer,
                layer: Uuid::nil(),
            },
            offset: 0,
            grain: 4096,
            length: 1,
        }
        .encode(&mut b);
        assert_eq!(Frame::decode(&mut b), Err(FrameError::BadObject));
        let mut b = BytesMut::new();
        Frame::Zero {
            object: ObjectRef::view(0),
            offset: u64::MAX,
            grain: 4096,
            length: 2,
        }
        .encode(&mut b);
        assert!(matches!(
            Frame::decode(&mut b),
            Err(FrameError::Overflow { .. })
        ));
    }

    #[test]
    fn a_flipped_payload_bit_fails_its_piece_hash() {
        let d = Data::new(
            ObjectRef::base(1),
            4096,
            4096,
            Bytes::from(vec![7u8; 3 * 4096]),
        );
        d.verify().unwrap();
        let mut p = d.payload.to_vec();
        p[5000] ^= 1;
        let bad = Data {
            payload: Bytes::from(p),
            ..d
        };
        assert_eq!(
            bad.verify(),
            Err(FrameError::Checksum {
                object: ObjectRef::base(1),
                offset: 8192,
                length: 4096
            })
        );
    }

    #[test]
    fn the_tally_depends_on_what_each_cell_last_got_not_on_order() {
        let o = ObjectRef::view(0);
        let a = Data::new(o, 0, 4096, Bytes::from(vec![1u8; 8192]));
        let b = Data::new(o, 4096, 4096, Bytes::from(vec![2u8; 4096]));
        let mut t1 = Tally::default();
        t1.data(&a);
        t1.data(&b);
        let mut t2 = Tally::default();
        t2.zero(o, 0, 4096, 8192);
        t2.data(&b);
        t2.data(&a);
        t2.data(&b);
        assert_eq!(t1.digest(), t2.digest());
        assert_eq!(t1.cells(), 2);
        let mut t3 = t1.clone();
        t3.zero(o, 4096, 4096, 4096);
        assert_ne!(t1.digest(), t3.digest());
    }

    proptest! {
        #[test]
        fn data_frames_round_trip(off in 0u64..1 << 40, len in 1usize..20000, g in 12u32..16, seed in any::<u8>()) {
            let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
            let d = Data::new(ObjectRef::layer(3, Uuid::from_u128(7)), off, 1 << g, Bytes::from(payload));
            let back = roundtrip(&Frame::Data(d.clone()));
            prop_assert_eq!(&back, &Frame::Data(d));
            if let Frame::Data(d) = back { prop_assert!(d.verify().is_ok()); }
        }

        #[test]
        fn pieces_cover_the_range_on_the_grid(off in 0u64..1 << 30, len in 0u64..1 << 22, g in 12u32..20) {
            let grain = 1u32 << g;
            let v: Vec<(u64, u64)> = pieces(off, len, grain).collect();
            prop_assert_eq!(v.iter().map(|p| p.1).sum::<u64>(), len);
            let mut at = off;
            for (o, l) in &v {
                prop_assert_eq!(*o, at);
                prop_assert!(*l > 0 && *l <= u64::from(grain));
                prop_assert_eq!(o / u64::from(grain), (o + l - 1) / u64::from(grain));
                at += l;
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = BytesMut::from(&bytes[..]);
            let _ = Frame::decode(&mut b);
        }
    }
}
