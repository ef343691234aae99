//! The payload guest, assembled from guest/payload.s by build.rs.

/// The flat image, loaded at [`crate::layout::LOAD`].
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/payload.bin"));
