//! How a long library operation (flatten, a merging delete-snapshot,
//! applying a diff, moving regions on resize, prefilling disks) tells its
//! caller how far it is. The library only reports; drawing a bar or
//! writing JSON events is the caller's job (`lungate_cli::Reporter` in the
//! binaries), so the gateway can run the same code silently.
//!
//! A report is `(phase, done, total)` in bytes: phases follow one another,
//! each starts at `done == 0` and ends at `done == total`, and within a
//! phase `done` never falls (`total` may grow when the work is found as it
//! goes, e.g. one merge after another). The phases, by operation:
//!
//! | operation | phases |
//! |---|---|
//! | `Group::flatten` | its own `(done, total)` callback in clusters (lunctl reports them as bytes, `copy`) |
//! | `Group::delete_snapshot_with` | `merge` (only when layers are merged) |
//! | `Group::apply_diff_with` | `apply` (the caller reports `verify` as it reads the file) |
//! | `Lun::resize_disk_with`, `Lun::resize_memory_with` | `move`, `zero` |
//! | `Lun::create_prefilled` | `prefill` |

/// Receives progress reports. Every `FnMut(&'static str, u64, u64)`
/// closure is one.
pub trait Progress {
    fn update(&mut self, phase: &'static str, done: u64, total: u64);
}

impl<F: FnMut(&'static str, u64, u64)> Progress for F {
    fn update(&mut self, phase: &'static str, done: u64, total: u64) {
        self(phase, done, total)
    }
}

/// A sink for callers that do not show progress.
pub fn silent() -> impl Progress {
    |_: &'static str, _: u64, _: u64| {}
}
