//! The control API's bodies and what it reads back from the state region:
//! JSON request bodies through axum's own `Json` extractor (snapshot,
//! revert, clone), the diff query through axum's `Query`, the record
//! batch (its length-prefixed JSON header and the length arithmetic the
//! handler relies on), every JSON state record payload, record type names
//! and the hex keys and disk IDs of records.
//!
//! The first byte picks what the rest is. Properties: no input panics;
//! whatever decodes re-encodes to something that decodes to the same value;
//! record types and hex strings that parse print back as what was parsed
//! (lowercase hex); a batch's payload and body lengths are `None` exactly
//! when they overflow.
#![no_main]

use axum::extract::Query;
use axum::http::Uri;
use axum::Json;
use libfuzzer_sys::fuzz_target;
use lungate_api::records::{
    hex16, parse_hex16, GuestService, HardwareConfig, Identity, MemoryMap, Owner, RecordType,
    SecondaryDisks, SnapshotTree,
};
use lungate_api::types::{
    CloneRequest, DiffQuery, RecordBatch, RevertRequest, SnapshotRequest, MAX_BATCH_HEADER,
};
use lungate_fuzz::Input;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Through the extractor the gateway uses for request bodies.
fn body<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(b: &[u8]) -> Option<T> {
    let Json(v) = Json::<T>::from_bytes(b).ok()?;
    let again = serde_json::to_vec(&v).expect("serialises");
    let Json(w) = Json::<T>::from_bytes(&again).expect("a re-encoded body decodes");
    assert_eq!(v, w);
    Some(v)
}

/// As `lun_manager` reads a JSON record payload.
fn record<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(b: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(b).ok()?;
    let again = serde_json::to_vec(&v).expect("serialises");
    let w: T = serde_json::from_slice(&again).expect("a re-encoded record decodes");
    assert_eq!(v, w);
    Some(v)
}

fn hex(s: &str) {
    if let Some(b) = parse_hex16(s) {
        assert_eq!(
            hex16(&b),
            s.to_ascii_lowercase(),
            "{s:?} parsed as {b:02x?}"
        );
    }
}

fn batch(b: &[u8]) {
    // The handler's framing: u32 header length, the JSON header, payloads.
    let mut inp = Input::new(b);
    let hlen = inp.u32();
    if hlen > MAX_BATCH_HEADER {
        return;
    }
    let json = inp.take(hlen as usize);
    let Ok(batch) = serde_json::from_slice::<RecordBatch>(json) else {
        return;
    };
    let sum: Option<u64> = batch
        .put
        .iter()
        .try_fold(0u64, |a, p| a.checked_add(p.length));
    assert_eq!(batch.payload_len(), sum);
    let header = batch.encode_header();
    let n = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    assert_eq!(n + 4, header.len());
    let back: RecordBatch = serde_json::from_slice(&header[4..]).expect("header decodes");
    assert_eq!(back, batch);
    assert_eq!(
        batch.body_len(),
        sum.and_then(|s| s.checked_add(header.len() as u64))
    );
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let which = inp.u8();
    let b = inp.rest();
    let text = std::str::from_utf8(b).ok();
    match which % 16 {
        0 => drop(body::<SnapshotRequest>(b)),
        1 => drop(body::<RevertRequest>(b)),
        2 => drop(body::<CloneRequest>(b)),
        3 => batch(b),
        4 => {
            let mut u = b"/v1/luns/vm/diff?".to_vec();
            u.extend_from_slice(b);
            if let Ok(uri) = Uri::try_from(u) {
                let _ = Query::<DiffQuery>::try_from_uri(&uri);
            }
        }
        5 => drop(record::<HardwareConfig>(b)),
        6 => {
            if let Some(i) = record::<Identity>(b) {
                for d in &i.disks {
                    hex(&d.id);
                    let _ = d.id_bytes();
                }
            }
        }
        7 => drop(record::<SecondaryDisks>(b)),
        8 => drop(record::<SnapshotTree>(b)),
        9 => drop(record::<MemoryMap>(b)),
        10 => drop(record::<Owner>(b)),
        11 => {
            if let Some(g) = record::<GuestService>(b) {
                hex(&g.key);
            }
        }
        12 => {
            if let Some(t) = text.and_then(|s| s.parse::<RecordType>().ok()) {
                assert_eq!(t.name().parse::<RecordType>().ok(), Some(t));
                assert_eq!(RecordType::from_code(t.code()), Some(t));
            }
        }
        13 => {
            if let Some(s) = text {
                hex(s);
            }
        }
        14 => drop(record::<RecordType>(b)),
        _ => {
            if let Some(s) = text {
                if lun_manager::format::validate_name(s).is_ok() {
                    assert!(
                        !s.is_empty() && !s.contains('/') && !s.starts_with('.'),
                        "{s:?}"
                    );
                }
            }
        }
    }
});
