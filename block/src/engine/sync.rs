//! The synchronous engine: a small pool of threads running pread, pwrite,
//! fdatasync and fallocate. Used where io_uring is unavailable (old kernels,
//! seccomp profiles that block it, `kernel.io_uring_disabled`) or when
//! chosen with `[io] engine = "sync"` (or `lungate serve --engine sync`).
//!
//! The queue lock is held only to push or pop a request, never across a
//! system call.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use bytes::Bytes;

use super::op::{
    fallocate_unsupported, retryable, BackendError, Op, Request, ZeroPlan, MAX_TRANSFER, ZEROS,
    ZERO_CHUNK,
};

pub(crate) const NAME: &str = "sync";

struct Queue {
    items: VecDeque<Request>,
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A worker that panicked while holding the lock cannot have left the
        // queue half-updated (push/pop are single calls), so keep going.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct SyncEngine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl SyncEngine {
    pub(crate) fn new(workers: usize) -> io::Result<SyncEngine> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                items: VecDeque::with_capacity(256),
                closing: false,
            }),
            ready: Condvar::new(),
        });
        let mut engine = SyncEngine {
            shared,
            threads: Vec::with_capacity(workers),
        };
        for i in 0..workers.max(1) {
            let shared = engine.shared.clone();
            // On error `engine` drops here, which stops the threads already
            // started.
            let t = thread::Builder::new()
                .name(format!("lungate-sync-{i}"))
                .spawn(move || worker(&shared))?;
            engine.threads.push(t);
        }
        Ok(engine)
    }

    pub(crate) fn workers(&self) -> usize {
        self.threads.len()
    }

    pub(crate) fn submit(&self, req: Request) {
        self.shared.lock().items.push_back(req);
        self.shared.ready.notify_one();
    }
}

impl Drop for SyncEngine {
    /// Workers finish everything already queued, then exit.
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.ready.notify_all();
        let me = thread::current().id();
        for t in self.threads.drain(..) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

fn worker(shared: &Shared) {
    loop {
        let req = {
            let mut q = shared.lock();
            loop {
                if let Some(r) = q.items.pop_front() {
                    break r;
                }
                if q.closing {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        // A panic is a bug in this module; contain it so one bad request
        // cannot take the pool down. Its reply is dropped during unwinding,
        // which the waiting future reports as a stopped-engine error.
        let _ = panic::catch_unwind(AssertUnwindSafe(|| run(req)));
    }
}

/// Execute one request to completion on the calling thread.
fn run(req: Request) {
    let Request {
        file,
        offset,
        op,
        reply,
    } = req;
    let done = |r: io::Result<()>| r.map(|()| Bytes::new());
    let result = match op {
        Op::Read { buf, len } => read(&file, offset, buf, len),
        Op::Write { data, fua } => done(write_all(&file, offset, &data).and_then(|()| {
            if fua {
                file.sync_data()
            } else {
                Ok(())
            }
        })),
        Op::Flush => done(file.sync_data()),
        Op::Zero { len, plan } => done(zero(&file, offset, len, plan)),
    };
    let _ = reply.send(result);
}

fn read(file: &File, offset: u64, mut buf: Vec<u8>, len: usize) -> io::Result<Bytes> {
    debug_assert!(buf.capacity() >= len && buf.len() <= len);
    let mut done = buf.len();
    while done < len {
        let want = (len - done).min(MAX_TRANSFER);
        // SAFETY: `buf` has capacity for `len` bytes, so `[done, done+want)`
        // lies inside its allocation; pread writes at most `want` bytes
        // there and touches nothing else. The bytes become part of the
        // vector only through `set_len` below, after the kernel wrote them.
        let r = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(done).cast(),
                want,
                (offset + done as u64) as libc::off_t,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error().is_some_and(retryable) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(BackendError::ShortRead {
                offset,
                len: len as u64,
                done: done as u64,
            }
            .into());
        }
        done += r as usize;
    }
    // SAFETY: `[0, buf.len())` was initialised before the call and the loop
    // above had pread write every byte of `[buf.len(), len)`; `len <=
    // capacity`.
    unsafe { buf.set_len(len) };
    Ok(Bytes::from(buf))
}

fn write_all(file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut done = 0usize;
    while done < data.len() {
        let chunk = &data[done..data.len().min(done + MAX_TRANSFER)];
        // SAFETY: `chunk` is a live, initialised slice; pwrite only reads it.
        let r = unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                chunk.as_ptr().cast(),
                chunk.len(),
                (offset + done as u64) as libc::off_t,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error().is_some_and(retryable) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(BackendError::WriteZero {
                offset,
                len: data.len() as u64,
                done: done as u64,
            }
            .into());
        }
        done += r as usize;
    }
    Ok(())
}

fn zero(file: &File, offset: u64, len: u64, plan: ZeroPlan) -> io::Result<()> {
    for &mode in plan.modes() {
        let e = match crate::sys::fallocate(file, mode, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        match e.raw_os_error() {
            Some(errno) if fallocate_unsupported(errno) => continue,
            _ => return Err(e),
        }
    }
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK as u64) as usize;
        write_all(file, offset + done, &ZEROS[..n])?;
        done += n as u64;
    }
    Ok(())
}
