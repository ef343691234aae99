//! How a long library operation (flatten, a merging delete-snapshot,
//! applying a diff, moving regions on resize, prefilling disks) tells its
//! caller how far it is: [`Progress`], defined beside the volume in
//! `lungate_block::progress` and used by both crates. The library only
//! reports; drawing a bar or writing JSON events is the caller's job
//! (`lungate_cli::Reporter` in the binaries), so the gateway can run the
//! same code silently.
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
//! | `import::import_raw` | `import` |
//! | `Volume::scrub` (`Group::scrub`) | `scrub`, in bytes of data clusters read |

pub use lungate_block::progress::{silent, Progress};
