//! The allocation-map journal of a delta layer: checksummed records of
//! `(virtual cluster, entry)` pairs appended to the current journal area.
//! Only the first `journal_len` bytes named by the committed header count,
//! so a record is either wholly committed or ignored; inside the committed
//! length every record must verify, which makes any corruption an error
//! rather than a silent loss.
//!
//! Record (little-endian):
//!
//! | off        | len      | field                                  |
//! |------------|----------|----------------------------------------|
//! | 0          | 4        | magic `LGJR`                           |
//! | 4          | 4        | entry count n (1..=4096)               |
//! | 8          | 8        | sequence number                        |
//! | 16         | 16 × n   | entries: cluster u64, value u64        |
//! | 16 + 16n   | 32       | blake3 of bytes 0..16+16n              |
//!
//! Entry value: bits 0–1 kind (1 = data, 2 = zero, 3 = checksum), bits
//! 2–63 the physical cluster index (kind 1), zero (kind 2), or the 62-bit
//! checksum of the cluster the data entry just before it maps (kind 3,
//! layers made with checksums only; see [`super::layer`]).

pub const MAGIC: &[u8; 4] = b"LGJR";
pub const MAX_PER_RECORD: usize = 4096;
const HDR: usize = 16;
const SUM: usize = 32;

pub const KIND_DATA: u64 = 1;
pub const KIND_ZERO: u64 = 2;
pub const KIND_SUM: u64 = 3;

/// The checksum entry for a cluster checksum (62 bits are kept).
pub fn sum_entry(sum: u64) -> u64 {
    (sum << 2) | KIND_SUM
}

/// On-disk (and per-layer in-memory) entry for a data cluster.
pub fn data(phys: u64) -> u64 {
    (phys << 2) | KIND_DATA
}

pub const ZERO: u64 = KIND_ZERO;

pub fn kind(v: u64) -> u64 {
    v & 3
}

pub fn phys(v: u64) -> u64 {
    v >> 2
}

/// Bytes `n` entries take once encoded.
pub fn encoded_len(n: usize) -> u64 {
    let records = n.div_ceil(MAX_PER_RECORD) as u64;
    records * (HDR + SUM) as u64 + n as u64 * 16
}

/// Encode `entries` as records numbered from `seq`; returns the bytes and
/// the next sequence number.
pub fn encode(entries: &[(u64, u64)], mut seq: u64) -> (Vec<u8>, u64) {
    let mut out = Vec::with_capacity(encoded_len(entries.len()) as usize);
    for chunk in entries.chunks(MAX_PER_RECORD) {
        let start = out.len();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        for (vc, v) in chunk {
            out.extend_from_slice(&vc.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        let sum = blake3::hash(&out[start..]);
        out.extend_from_slice(sum.as_bytes());
        seq += 1;
    }
    (out, seq)
}

/// Decode a committed journal: `b` is exactly the committed bytes of the
/// current area. Returns entries in order and the next sequence number, or
/// a description of the first problem. Never panics.
pub fn decode(
    b: &[u8],
    first_seq: u64,
    clusters: u64,
    max_phys: u64,
) -> Result<(Vec<(u64, u64)>, u64), String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut seq = first_seq;
    while at < b.len() {
        let rest = &b[at..];
        if rest.len() < HDR + SUM {
            return Err(format!("record at {at}: truncated header"));
        }
        if &rest[0..4] != MAGIC {
            return Err(format!("record at {at}: bad magic"));
        }
        let n = u32::from_le_bytes(rest[4..8].try_into().expect("4")) as usize;
        if n == 0 || n > MAX_PER_RECORD {
            return Err(format!(
                "record at {at}: entry count {n} not in 1..={MAX_PER_RECORD}"
            ));
        }
        let len = HDR + 16 * n + SUM;
        if rest.len() < len {
            return Err(format!(
                "record at {at}: {len} bytes but only {} committed",
                rest.len()
            ));
        }
        let body = &rest[..len - SUM];
        if blake3::hash(body).as_bytes() != &rest[len - SUM..len] {
            return Err(format!("record at {at}: checksum mismatch"));
        }
        let s = u64::from_le_bytes(rest[8..16].try_into().expect("8"));
        if s != seq {
            return Err(format!("record at {at}: sequence {s}, expected {seq}"));
        }
        for i in 0..n {
            let e = &body[HDR + 16 * i..HDR + 16 * i + 16];
            let vc = u64::from_le_bytes(e[0..8].try_into().expect("8"));
            let v = u64::from_le_bytes(e[8..16].try_into().expect("8"));
            if vc >= clusters {
                return Err(format!(
                    "record at {at}, entry {i}: cluster {vc} beyond the volume's {clusters}"
                ));
            }
            let ok = match kind(v) {
                KIND_DATA => phys(v) <= max_phys,
                KIND_ZERO => phys(v) == 0,
                KIND_SUM => true,
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "record at {at}, entry {i}: invalid value {v:#x} for cluster {vc}"
                ));
            }
            out.push((vc, v));
        }
        at += len;
        seq += 1;
    }
    Ok((out, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_across_chunks() {
        let entries: Vec<(u64, u64)> = (0..5000u64).map(|i| (i, data(i))).collect();
        let (b, next) = encode(&entries, 7);
        assert_eq!(b.len() as u64, encoded_len(entries.len()));
        assert_eq!(next, 9);
        let (back, n2) = decode(&b, 7, 10_000, 10_000).unwrap();
        assert_eq!(back, entries);
        assert_eq!(n2, 9);
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let entries = vec![(3u64, data(0)), (9, ZERO), (4, data(1))];
        let (b, _) = encode(&entries, 1);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x01;
            assert!(decode(&c, 1, 64, 64).is_err(), "flip at {i} accepted");
        }
        assert!(decode(&b, 2, 64, 64).is_err(), "wrong sequence accepted");
        assert!(
            decode(&b, 1, 5, 64).is_err(),
            "out-of-range cluster accepted"
        );
    }
}
