//! The io_uring engine: `workers` threads, each owning one ring.
//!
//! Submitters (any thread, usually tokio tasks) push a [`Request`] onto a
//! worker's queue — a mutex around a `Vec`, held only for the push — and
//! wake the worker through an eventfd, but only if no wake is already
//! pending (`notified`). The worker keeps an `IORING_OP_READ` on that eventfd
//! armed in its own ring, so it sleeps in a single `io_uring_enter` and
//! wakes for either completions or new work. On every wake it takes the
//! whole queue at once (swapping vectors, so no allocation in steady state),
//! pushes one SQE per request and submits them all with one system call.
//!
//! Each request lives in a slot of a fixed-size slab until its final CQE;
//! the slot index is the SQE's `user_data`. A slot owns the buffer the
//! kernel reads from or writes into, which is what makes the raw pointers
//! in the SQEs sound (see [`Slot::sqe`]). Short transfers and EINTR/EAGAIN
//! are resubmitted from the same slot; fallocate modes the file refuses fall
//! through to the next step of the [`ZeroPlan`].
//!
//! Shutdown: when the engine is dropped, workers stop re-arming the wake
//! read, finish everything queued or in flight, and exit once the ring is
//! empty. A worker that dies abnormally (a panic, or a ring that refuses
//! `io_uring_enter`) fails every request it holds and leaks — never frees —
//! buffers the kernel may still write into.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::op::{
    fallocate_unsupported, retryable, BackendError, Op, Reply, Request, ZeroPlan, MAX_TRANSFER,
    ZEROS, ZERO_CHUNK,
};

pub(crate) const NAME: &str = "io_uring";

/// Submission queue size per ring; the completion queue is twice that.
const RING_ENTRIES: u32 = 256;

/// Requests in a ring at once. Each has at most one SQE outstanding and one
/// entry stays free for the wake read, so pushing an SQE never finds the
/// queue full and the completion queue cannot overflow.
const MAX_IN_FLIGHT: usize = RING_ENTRIES as usize - 1;

/// `user_data` of the eventfd wake read; slot indices are far below it.
const WAKE: u64 = u64::MAX;

fn stopped() -> io::Error {
    BackendError::Stopped { engine: NAME }.into()
}

/// Check that io_uring works here with everything this engine uses: a ring
/// can be built, the opcodes exist, a NOP completes, and the kernel has
/// fast poll (5.7+; without it the wake read on a non-blocking eventfd
/// would complete with EAGAIN instead of waiting).
pub(crate) fn probe() -> io::Result<()> {
    let unavailable = |why: String| io::Error::from(BackendError::Unavailable { why });
    let mut ring =
        IoUring::new(2).map_err(|e| unavailable(format!("cannot create a ring: {e}")))?;
    if !ring.params().is_feature_fast_poll() {
        return Err(unavailable(
            "kernel lacks IORING_FEAT_FAST_POLL (needs Linux 5.7 or newer)".into(),
        ));
    }
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| unavailable(format!("cannot probe supported opcodes: {e}")))?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
    ] {
        if !probe.is_supported(code) {
            return Err(unavailable(format!("kernel lacks IORING_OP_{name}")));
        }
    }
    let nop = opcode::Nop::new().build().user_data(1);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| unavailable("cannot queue a NOP".into()))?;
    ring.submit_and_wait(1)
        .map_err(|e| unavailable(format!("cannot submit a NOP: {e}")))?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| unavailable("a NOP produced no completion".into()))?;
    if cqe.result() < 0 {
        let e = io::Error::from_raw_os_error(-cqe.result());
        return Err(unavailable(format!("a NOP failed: {e}")));
    }
    Ok(())
}

/// A non-blocking eventfd: the submitters' doorbell.
struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers and returns a new descriptor.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local. The only failure on a
        // valid eventfd is EAGAIN when the counter is saturated, in which
        // case a wake is pending anyway.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                (&one as *const u64).cast(),
                mem::size_of::<u64>(),
            )
        };
    }
}

/// What a submitter and its worker share.
struct Shared {
    queue: Mutex<Vec<Request>>,
    /// A wake is pending: the eventfd was written and the worker has not yet
    /// consumed it. Saves a system call per request under load.
    notified: AtomicBool,
    /// The engine was dropped: finish up and exit.
    closing: AtomicBool,
    /// The worker has exited; nothing pushed now would ever run.
    stopped: AtomicBool,
    wake: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<Request>> {
        // Pushes and swaps cannot leave the vector half-updated.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, req: Request) {
        if self.stopped.load(SeqCst) {
            return req.finish(Err(stopped()));
        }
        self.lock().push(req);
        // The worker clears `notified` before it takes the queue, so either
        // it sees this request on its next take, or this swap sees `false`
        // and wakes it.
        if !self.notified.swap(true, SeqCst) {
            self.wake.signal();
        }
        // The worker may have died between the check above and the push.
        if self.stopped.load(SeqCst) {
            self.fail_queued();
        }
    }

    fn fail_queued(&self) {
        let queued = mem::take(&mut *self.lock());
        for r in queued {
            r.finish(Err(stopped()));
        }
    }
}

struct Handle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

pub(crate) struct UringEngine {
    workers: Vec<Handle>,
    next: AtomicUsize,
}

impl UringEngine {
    pub(crate) fn new(workers: usize) -> io::Result<UringEngine> {
        let mut engine = UringEngine {
            workers: Vec::with_capacity(workers),
            next: AtomicUsize::new(0),
        };
        for i in 0..workers.max(1) {
            let shared = Arc::new(Shared {
                queue: Mutex::new(Vec::with_capacity(MAX_IN_FLIGHT)),
                notified: AtomicBool::new(false),
                closing: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
                wake: EventFd::new()?,
            });
            // The ring is built on the worker thread: with SINGLE_ISSUER only
            // the creating thread may submit to it.
            let (ready_tx, ready_rx) = mpsc::sync_channel(1);
            let worker_shared = shared.clone();
            let thread = thread::Builder::new()
                .name(format!("lungate-uring-{i}"))
                .spawn(move || match build_ring() {
                    Ok(ring) => {
                        let _ = ready_tx.send(Ok(()));
                        Worker::new(ring, worker_shared).run();
                    }
                    Err(e) => {
                        worker_shared.stopped.store(true, SeqCst);
                        let _ = ready_tx.send(Err(e));
                    }
                })?;
            engine.workers.push(Handle {
                shared,
                thread: Some(thread),
            });
            // On error `engine` drops here and stops the workers started.
            ready_rx
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("io_uring worker exited during setup")))?;
        }
        Ok(engine)
    }

    pub(crate) fn workers(&self) -> usize {
        self.workers.len()
    }

    pub(crate) fn submit(&self, req: Request) {
        let n = self.workers.len();
        let i = if n == 1 {
            0
        } else {
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n
        };
        self.workers[i].shared.push(req);
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        for w in &self.workers {
            w.shared.closing.store(true, SeqCst);
            w.shared.wake.signal();
        }
        let me = thread::current().id();
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                if t.thread().id() != me {
                    let _ = t.join();
                }
            }
        }
    }
}

/// Build a ring with the cheapest completion handling the kernel offers.
/// DEFER_TASKRUN (6.1) runs completion work only when the worker waits for
/// completions anyway; COOP_TASKRUN (5.19) at least spares it an interrupt
/// per completion. Must run on the thread that will submit.
fn build_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::builder().setup_coop_taskrun().build(RING_ENTRIES))
        .or_else(|_| IoUring::new(RING_ENTRIES))
}

/// What a slot is doing now. Fallocate steps fall through to the next mode
/// of their plan, then to writing zeros.
enum Work {
    Read {
        buf: Vec<u8>,
        len: usize,
    },
    Write {
        data: Bytes,
        fua: bool,
    },
    Sync,
    Fallocate {
        len: u64,
        plan: ZeroPlan,
        mode: usize,
    },
    WriteZeros {
        len: u64,
    },
}

/// A request in the ring.
struct Slot {
    file: Arc<File>,
    offset: u64,
    /// Bytes already transferred (reads, writes, zero writes).
    done: u64,
    work: Work,
    reply: Reply,
}

impl Slot {
    fn new(req: Request) -> Slot {
        // A read may arrive with a prefix already read inline.
        let done = match &req.op {
            Op::Read { buf, .. } => buf.len() as u64,
            _ => 0,
        };
        let work = match req.op {
            Op::Read { buf, len } => Work::Read { buf, len },
            Op::Write { data, fua } => Work::Write { data, fua },
            Op::Flush => Work::Sync,
            Op::Zero { len, plan } if plan.modes().is_empty() => Work::WriteZeros { len },
            Op::Zero { len, plan } => Work::Fallocate { len, plan, mode: 0 },
        };
        Slot {
            file: req.file,
            offset: req.offset,
            done,
            work,
            reply: req.reply,
        }
    }

    /// The SQE for this slot's next step.
    fn sqe(&mut self) -> squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let at = self.offset + self.done;
        let done = self.done as usize;
        match &mut self.work {
            Work::Read { buf, len } => {
                let n = (*len - done).min(MAX_TRANSFER);
                // SAFETY: pointer arithmetic only: `buf` has capacity `len`
                // and `done < len`, so the pointer stays inside its allocation.
                let ptr = unsafe { buf.as_mut_ptr().add(done) };
                // The kernel writes up to `n` bytes at `ptr` until the CQE
                // arrives. That memory is the spare capacity of a Vec owned
                // by this slot; the slot is removed from the slab only after
                // its final CQE, moving the slot does not move the heap
                // buffer, and nothing else reads or writes it meanwhile.
                opcode::Read::new(fd, ptr, n as u32).offset(at).build()
            }
            Work::Write { data, fua } => {
                let rest = &data[done..];
                let n = rest.len().min(MAX_TRANSFER);
                // The kernel reads `rest` until the CQE; the slot holds a
                // reference to the immutable `Bytes` storage until then.
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, rest.as_ptr(), n as u32)
                    .offset(at)
                    .rw_flags(flags)
                    .build()
            }
            Work::Sync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Work::Fallocate { len, plan, mode } => opcode::Fallocate::new(fd, *len)
                .offset(at)
                .mode(plan.modes()[*mode])
                .build(),
            Work::WriteZeros { len } => {
                let n = (*len - self.done).min(ZERO_CHUNK as u64) as usize;
                // `ZEROS` is a static: valid and immutable forever.
                opcode::Write::new(fd, ZEROS.as_ptr(), n as u32)
                    .offset(at)
                    .build()
            }
        }
    }

    /// Account for a CQE. `None`: submit the next step from this slot;
    /// `Some`: the request is finished with this result.
    fn advance(&mut self, res: i32) -> Option<io::Result<Bytes>> {
        if res < 0 {
            let errno = -res;
            if retryable(errno) {
                return None;
            }
            if let Work::Fallocate { len, plan, mode } = self.work {
                if fallocate_unsupported(errno) {
                    self.work = if mode + 1 < plan.modes().len() {
                        Work::Fallocate {
                            len,
                            plan,
                            mode: mode + 1,
                        }
                    } else {
                        Work::WriteZeros { len }
                    };
                    return None;
                }
            }
            return Some(Err(io::Error::from_raw_os_error(errno)));
        }
        let n = res as u64;
        let (offset, done) = (self.offset, self.done);
        let total = match &mut self.work {
            Work::Sync | Work::Fallocate { .. } => return Some(Ok(Bytes::new())),
            Work::Read { len, .. } if n == 0 => {
                let len = *len as u64;
                return Some(Err(BackendError::ShortRead { offset, len, done }.into()));
            }
            Work::Read { len, .. } => *len as u64,
            Work::Write { data, .. } => data.len() as u64,
            Work::WriteZeros { len } => *len,
        };
        if n == 0 {
            let len = total;
            return Some(Err(BackendError::WriteZero { offset, len, done }.into()));
        }
        self.done += n;
        if self.done < total {
            return None;
        }
        match &mut self.work {
            Work::Read { buf, len } => {
                // SAFETY: `[0, done)` at creation was initialised by the
                // submitter, and the kernel reported writing the rest of
                // `[0, len)` across this slot's reads; `len <= capacity`.
                unsafe { buf.set_len(*len) };
                Some(Ok(Bytes::from(mem::take(buf))))
            }
            _ => Some(Ok(Bytes::new())),
        }
    }
}

struct Worker {
    ring: IoUring,
    shared: Arc<Shared>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Requests taken from the queue while every slot was busy.
    backlog: VecDeque<Request>,
    /// The other half of the queue swap; keeps its capacity.
    incoming: Vec<Request>,
    cqes: Vec<(u64, i32)>,
    /// Target of the wake read. Boxed so its address is stable while the
    /// read is in the ring.
    wake_buf: Box<u64>,
    wake_armed: bool,
}

impl Worker {
    fn new(ring: IoUring, shared: Arc<Shared>) -> Worker {
        Worker {
            ring,
            shared,
            slots: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
            free: (0..MAX_IN_FLIGHT).rev().collect(),
            in_flight: 0,
            backlog: VecDeque::new(),
            incoming: Vec::with_capacity(MAX_IN_FLIGHT),
            cqes: Vec::with_capacity(2 * RING_ENTRIES as usize),
            wake_buf: Box::new(0),
            wake_armed: false,
        }
    }

    fn run(mut self) {
        self.arm_wake();
        loop {
            self.take_queue();
            if self.shared.closing.load(SeqCst) {
                // Requests pushed just before the engine was dropped.
                self.take_queue();
                if self.in_flight == 0 && self.backlog.is_empty() && !self.wake_armed {
                    return;
                }
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => thread::yield_now(),
                // EINTR: a signal; EBUSY: completions must be reaped first.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring worker cannot enter its ring; stopping");
                    return;
                }
            }
            self.reap();
        }
    }

    fn arm_wake(&mut self) {
        let ptr: *mut u64 = &mut *self.wake_buf;
        let sqe = opcode::Read::new(
            types::Fd(self.shared.wake.0.as_raw_fd()),
            ptr.cast(),
            mem::size_of::<u64>() as u32,
        )
        .build()
        .user_data(WAKE);
        self.wake_armed = true;
        self.push(sqe);
    }

    /// Take everything queued and start as much as the slab holds.
    fn take_queue(&mut self) {
        mem::swap(&mut *self.shared.lock(), &mut self.incoming);
        let mut incoming = mem::take(&mut self.incoming);
        for req in incoming.drain(..) {
            self.backlog.push_back(req);
        }
        self.incoming = incoming;
        while self.in_flight < MAX_IN_FLIGHT {
            let Some(req) = self.backlog.pop_front() else {
                break;
            };
            self.start(req);
        }
    }

    fn start(&mut self, req: Request) {
        let Some(idx) = self.free.pop() else {
            // Unreachable while `in_flight < MAX_IN_FLIGHT`; keep it queued.
            self.backlog.push_front(req);
            return;
        };
        self.in_flight += 1;
        self.slots[idx] = Some(Slot::new(req));
        self.submit_slot(idx);
    }

    fn submit_slot(&mut self, idx: usize) {
        if let Some(slot) = self.slots[idx].as_mut() {
            let sqe = slot.sqe().user_data(idx as u64);
            self.push(sqe);
        }
    }

    fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every SQE built by this worker points only at memory
            // that stays valid until its CQE is reaped: a slot's buffer (see
            // `Slot::sqe`), the static `ZEROS`, or the boxed `wake_buf`. The
            // file descriptors are kept open by the slot's `Arc<File>` and
            // by the `Shared` that owns the eventfd.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            // Cannot happen given MAX_IN_FLIGHT; hand the kernel what is
            // queued to make room rather than drop an operation.
            if let Err(e) = self.ring.submit() {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) {
                    tracing::error!(error = %e, "io_uring worker cannot submit");
                }
                self.reap();
            }
        }
    }

    fn reap(&mut self) {
        let mut cqes = mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &cqes {
            if user_data == WAKE {
                self.wake_armed = false;
                // Cleared before the next `take_queue`: see `Shared::push`.
                self.shared.notified.store(false, SeqCst);
                if !self.shared.closing.load(SeqCst) {
                    self.arm_wake();
                }
                continue;
            }
            let idx = user_data as usize;
            let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            match slot.advance(res) {
                None => self.submit_slot(idx),
                Some(result) => {
                    if let Some(slot) = self.slots[idx].take() {
                        self.free.push(idx);
                        self.in_flight -= 1;
                        let _ = slot.reply.send(result);
                    }
                }
            }
        }
        self.cqes = cqes;
    }
}

impl Drop for Worker {
    /// Runs on normal exit (nothing left) and on abnormal exit (a panic or a
    /// broken ring), where it must not leave a future waiting forever.
    fn drop(&mut self) {
        self.shared.stopped.store(true, SeqCst);
        for req in self.backlog.drain(..).chain(self.incoming.drain(..)) {
            req.finish(Err(stopped()));
        }
        self.shared.fail_queued();
        for slot in self.slots.iter_mut().filter_map(Option::take) {
            let Slot {
                file, work, reply, ..
            } = slot;
            // The kernel may still be reading or writing this buffer (the
            // ring is closed only after this function returns, and closing
            // it cancels requests asynchronously): leak it, and the file
            // with it, rather than free memory under an in-flight request.
            mem::forget(work);
            mem::forget(file);
            let _ = reply.send(Err(stopped()));
        }
        if self.wake_armed {
            mem::forget(mem::replace(&mut self.wake_buf, Box::new(0)));
        }
    }
}
