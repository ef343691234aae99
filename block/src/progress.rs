//! How a long operation of the data path (a flatten, a merge while a
//! snapshot is deleted, a diff replayed, a range allocated) tells its
//! caller how far it is. This crate only reports; drawing a bar or writing
//! JSON events is the caller's job (`lungate_cli::Reporter` in the
//! binaries), so the gateway runs the same code silently.
//!
//! A report is `(phase, done, total)` in bytes: phases follow one another,
//! each starts at `done == 0` and ends at `done == total`, and within a
//! phase `done` never falls (`total` may grow when the work is found as it
//! goes, e.g. one merge after another).

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
