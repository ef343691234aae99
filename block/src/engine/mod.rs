//! Backend I/O engine: positional reads and writes, flush, hole punching,
//! zeroing and allocation maps on a LUN's backing file or block device.
//!
//! One API, [`IoEngine`], with two implementations chosen once, at
//! construction: io_uring worker rings (`uring.rs`) and a thread pool doing
//! plain system calls (`sync.rs`). Both run the same requests with the same
//! semantics and pass the same tests. The futures complete through a oneshot
//! channel, so they work under any executor. Small reads first try the page
//! cache on the caller's thread without blocking (`nowait.rs`).
//!
//! This layer knows nothing of regions or exports: callers (the export
//! layer) check that a request stays inside its region before it gets here.
//!
//! The kind is chosen once, by the caller (the gateway's configuration);
//! nothing here reads the environment. See docs/backend.md.

mod nowait;
mod op;
mod sync;
mod uring;

use std::fmt;
use std::fs::File;
use std::io;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

pub use crate::device::Extent;
pub use op::BackendError;
use op::{check_range, Op, Request, ZeroPlan};

/// Which engine to run: the one enum the configuration (`[io] engine`),
/// the command line (`--engine`) and the engine share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring if it works here, else sync (with one warning).
    #[default]
    Auto,
    /// io_uring or an error.
    #[serde(alias = "io_uring", alias = "io-uring")]
    Uring,
    /// Thread pool with pread/pwrite.
    Sync,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Auto => "auto",
            EngineKind::Uring => "uring",
            EngineKind::Sync => "sync",
        })
    }
}

impl FromStr for EngineKind {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<EngineKind, BackendError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(EngineKind::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(EngineKind::Uring),
            "sync" => Ok(EngineKind::Sync),
            _ => Err(BackendError::UnknownEngine {
                value: s.to_string(),
            }),
        }
    }
}

fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Default io_uring workers: one ring per two CPUs, at most four. A ring
/// thread mostly copies page-cache data or waits, so fewer threads than
/// CPUs leaves room for the network side.
fn default_uring_workers() -> usize {
    (available_cpus() / 2).clamp(1, 4)
}

/// Default sync threads: each blocks for a whole request, so more than
/// CPUs are needed to keep a device queue busy.
fn default_sync_workers() -> usize {
    (available_cpus() * 2).clamp(4, 16)
}

enum Engine {
    Uring(uring::UringEngine),
    Sync(sync::SyncEngine),
}

struct Inner {
    engine: Engine,
    /// Try small reads inline with RWF_NOWAIT first (see [`nowait`]).
    /// Cleared for good the first time the kernel says it cannot.
    inline_reads: AtomicBool,
}

/// Async file I/O, cheap to clone. Worker threads stop when the last clone
/// is dropped, after finishing every request already submitted.
#[derive(Clone)]
pub struct IoEngine {
    inner: Arc<Inner>,
}

impl fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoEngine")
            .field("name", &self.name())
            .field("workers", &self.workers())
            .field("inline_reads", &self.inline_reads())
            .finish()
    }
}

impl IoEngine {
    /// Build an engine with `workers` threads (0: a default for the
    /// engine). `Auto` uses
    /// io_uring if a probe succeeds, else the sync engine with one
    /// `tracing::warn!` saying why; `Uring` fails instead.
    pub fn new(kind: EngineKind, workers: usize) -> io::Result<IoEngine> {
        IoEngine::build(kind, workers)
    }

    fn build(kind: EngineKind, workers: usize) -> io::Result<IoEngine> {
        let uring = |workers: usize| {
            uring::probe()?;
            let n = if workers == 0 {
                default_uring_workers()
            } else {
                workers
            };
            uring::UringEngine::new(n)
        };
        let sync = |workers: usize| {
            let n = if workers == 0 {
                default_sync_workers()
            } else {
                workers
            };
            sync::SyncEngine::new(n)
        };
        let engine = match kind {
            EngineKind::Uring => Engine::Uring(uring(workers)?),
            EngineKind::Sync => Engine::Sync(sync(workers)?),
            EngineKind::Auto => match uring(workers) {
                Ok(e) => Engine::Uring(e),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring is unavailable, using the sync I/O engine");
                    Engine::Sync(sync(workers)?)
                }
            },
        };
        Ok(IoEngine {
            inner: Arc::new(Inner {
                engine,
                inline_reads: AtomicBool::new(true),
            }),
        })
    }

    /// Whether reads of up to 64 KiB are first tried on the calling thread
    /// with `preadv2(RWF_NOWAIT)`, which succeeds only from the page cache
    /// and never blocks. On by default; turned off automatically where the
    /// kernel or file does not support it. Affects every clone.
    pub fn set_inline_reads(&self, on: bool) {
        self.inner.inline_reads.store(on, Ordering::Relaxed);
    }

    pub fn inline_reads(&self) -> bool {
        self.inner.inline_reads.load(Ordering::Relaxed)
    }

    /// `"io_uring"` or `"sync"`.
    pub fn name(&self) -> &'static str {
        match &self.inner.engine {
            Engine::Uring(_) => uring::NAME,
            Engine::Sync(_) => sync::NAME,
        }
    }

    /// Number of worker threads (rings for io_uring).
    pub fn workers(&self) -> usize {
        match &self.inner.engine {
            Engine::Uring(e) => e.workers(),
            Engine::Sync(e) => e.workers(),
        }
    }

    /// Read exactly `len` bytes at `offset`. End of file inside the range is
    /// an `UnexpectedEof` error naming offset, length and bytes read.
    pub async fn read(&self, file: &Arc<File>, offset: u64, len: usize) -> io::Result<Bytes> {
        check_range(offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let mut buf = Vec::new();
        buf.try_reserve_exact(len)
            .map_err(|_| BackendError::NoMemory { len })?;
        if len <= nowait::INLINE_READ_MAX && self.inline_reads() {
            match nowait::read(file, offset, &mut buf, len)? {
                nowait::Outcome::Complete => return Ok(Bytes::from(buf)),
                nowait::Outcome::WouldBlock => {}
                nowait::Outcome::Unsupported => {
                    tracing::debug!(
                        "RWF_NOWAIT reads unsupported here; reading through the engine only"
                    );
                    self.set_inline_reads(false);
                }
            }
        }
        // The engine continues after whatever prefix was read inline.
        self.run(file, offset, Op::Read { buf, len }).await
    }

    /// Write all of `data` at `offset`. With `fua` the data is on stable
    /// storage when this returns (RWF_DSYNC, or write + fdatasync).
    pub async fn write(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> io::Result<()> {
        check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return if fua { self.flush(file).await } else { Ok(()) };
        }
        self.run(file, offset, Op::Write { data, fua })
            .await
            .map(drop)
    }

    /// fdatasync: every write that completed before this call is on stable
    /// storage when it returns.
    pub async fn flush(&self, file: &Arc<File>) -> io::Result<()> {
        self.run(file, 0, Op::Flush).await.map(drop)
    }

    /// Deallocate `[offset, offset+len)` where the file can; it reads back
    /// as zeros either way (zeroed in place or written with zeros where
    /// punching is refused). The file size never changes.
    pub async fn punch_hole(&self, file: &Arc<File>, offset: u64, len: u64) -> io::Result<()> {
        self.zero(file, offset, len, ZeroPlan::Trim).await
    }

    /// Make `[offset, offset+len)` read as zeros. `may_trim`: deallocating
    /// is allowed (punch first); without it the range stays allocated.
    pub async fn write_zeroes(
        &self,
        file: &Arc<File>,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> io::Result<()> {
        let plan = if may_trim {
            ZeroPlan::Trim
        } else {
            ZeroPlan::NoTrim
        };
        self.zero(file, offset, len, plan).await
    }

    /// Data and hole runs covering exactly `[offset, offset+len)`; see
    /// [`Extent`]. Runs on the calling thread (a few lseek calls).
    pub fn extents(&self, file: &File, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        check_range(offset, len)?;
        crate::sys::extents(file, offset, len)
    }

    async fn zero(
        &self,
        file: &Arc<File>,
        offset: u64,
        len: u64,
        plan: ZeroPlan,
    ) -> io::Result<()> {
        check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.run(file, offset, Op::Zero { len, plan })
            .await
            .map(drop)
    }

    async fn run(&self, file: &Arc<File>, offset: u64, op: Op) -> io::Result<Bytes> {
        let (reply, done) = oneshot::channel();
        self.submit(Request {
            file: file.clone(),
            offset,
            op,
            reply,
        });
        // The sender is dropped without a value only if a worker died.
        done.await.unwrap_or_else(|_| {
            Err(BackendError::Stopped {
                engine: self.name(),
            }
            .into())
        })
    }

    fn submit(&self, req: Request) {
        match &self.inner.engine {
            Engine::Uring(e) => e.submit(req),
            Engine::Sync(e) => e.submit(req),
        }
    }
}

#[cfg(test)]
mod tests;
