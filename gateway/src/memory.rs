//! Memory bounds for NBD connections: one gateway-wide budget
//! ([`MemoryBudget`], `max_memory`) and, inside it, one account per
//! connection ([`ConnMemory`], `max_in_flight`).
//!
//! Every buffer a request holds (a WRITE payload piece, a READ reply piece
//! waiting for the socket) is charged to its connection before it is
//! allocated and released once it is written to disk or to the socket, as
//! a [`Credit`]. A request never holds more than [`REQUEST_OVERHEAD`] +
//! [`STREAM_WINDOW`] bytes at once, whatever its length: larger requests are
//! streamed through that window in pieces of at most [`PIECE`] bytes.
//!
//! Each connection reserves [`CONN_FLOOR`] of the gateway budget when it is
//! accepted: its own buffers plus room for one request. Up to that floor it
//! never waits for anybody else, so a connection can always make progress
//! however many others sit on memory; beyond it, it borrows from what the
//! floors leave free, up to its own cap, but never from the last quarter of
//! the budget, which is kept for the floors of connections still to come. A
//! client that does not read its replies therefore pins at most its cap;
//! once the borrowable part is used up the others run on their floors, and
//! new clients are still admitted. A connection that cannot get its floor
//! is refused at accept: the budget also bounds how many connections there
//! are.
//!
//! Memory freed when connections close is handed back to the kernel
//! ([`MemoryBudget::run_trimmer`]): glibc keeps freed heap pages otherwise.
//!
//! This module only counts; it never allocates the buffers it accounts for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Largest buffer of one streamed piece (a READ reply chunk, a slice of a
/// WRITE payload).
pub const PIECE: u64 = 512 * 1024;
/// Most data one request holds at once (1 MiB): requests up to this length
/// are handled whole, longer ones in [`PIECE`]s, two at a time (one being
/// read while the other is written).
pub const STREAM_WINDOW: u64 = 2 * PIECE;
/// Charge per request on top of its data, so payload-less requests are
/// bounded too (task, header, reply, extents).
pub const REQUEST_OVERHEAD: u64 = 4096;
/// Per-connection buffers outside any request: the socket read-ahead
/// (256 KiB), the reply batch buffer (288 KiB), TLS records.
pub const CONN_OVERHEAD: u64 = 1024 * 1024;
/// The largest charge of one request.
pub const MAX_REQUEST_CHARGE: u64 = REQUEST_OVERHEAD + STREAM_WINDOW;
/// What a connection reserves of the gateway budget when it is accepted.
pub const CONN_FLOOR: u64 = CONN_OVERHEAD + MAX_REQUEST_CHARGE;

// The config crate's documented minimum must hold a request's window. A
// floor comes to about 2 MiB.
const _: () = assert!(lungate_config::MIN_IN_FLIGHT >= MAX_REQUEST_CHARGE);

/// Default `max_memory`: an eighth of the machine's memory, or of the
/// cgroup's limit if that is lower, and at least the config minimum.
pub fn default_limit() -> u64 {
    let ram = physical_memory().unwrap_or(8 << 30);
    let limit = cgroup_limit().map_or(ram, |c| c.min(ram));
    (limit / 8).max(lungate_config::MIN_MEMORY)
}

fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `memory.max` of this process's cgroup (v2), if it sets one.
fn cgroup_limit() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.max", path.trim())).ok()?;
    max.trim().parse().ok()
}

/// The gateway-wide budget (`max_memory`).
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: Mutex<u64>,
    /// Woken whenever memory comes back.
    freed: Notify,
    /// A connection closed since the last trim.
    trim_wanted: AtomicBool,
    trim: Notify,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            used: Mutex::new(0),
            freed: Notify::new(),
            trim_wanted: AtomicBool::new(false),
            trim: Notify::new(),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved or charged right now, all connections together.
    pub fn used(&self) -> u64 {
        *self.lock()
    }

    /// How many connections fit (each reserves [`CONN_FLOOR`]).
    pub fn max_connections(&self) -> u64 {
        self.limit / CONN_FLOOR
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take `n` bytes: for a connection's floor anything up to the limit,
    /// for borrowing only what leaves the last quarter free.
    fn try_take(&self, n: u64, floor: bool) -> bool {
        let cap = if floor {
            self.limit
        } else {
            self.limit - self.limit / 4
        };
        let mut used = self.lock();
        match used.checked_add(n) {
            Some(u) if u <= cap => {
                *used = u;
                true
            }
            _ => false,
        }
    }

    fn give(&self, n: u64) {
        if n == 0 {
            return;
        }
        {
            let mut used = self.lock();
            *used = used.saturating_sub(n);
        }
        self.freed.notify_waiters();
    }

    /// The account of a new connection whose requests may hold up to
    /// `cap` bytes, or `None` when the budget has no room for its floor.
    pub fn connection(self: &Arc<Self>, cap: u64) -> Option<Arc<ConnMemory>> {
        if !self.try_take(CONN_FLOOR, true) {
            return None;
        }
        Some(Arc::new(ConnMemory {
            global: self.clone(),
            cap: cap.max(MAX_REQUEST_CHARGE),
            used: Mutex::new(0),
            freed: Notify::new(),
        }))
    }

    /// Until `stop`: shortly after connections close, return the heap
    /// memory they freed to the kernel (`malloc_trim`), at most a few times
    /// a second however many close.
    pub async fn run_trimmer(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.trim.notified() => {}
            }
            // Let a burst of closing connections finish first.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if self.trim_wanted.swap(false, Ordering::AcqRel) {
                let _ = tokio::task::spawn_blocking(trim_heap).await;
            }
        }
    }
}

/// Give freed heap pages back to the kernel.
fn trim_heap() {
    // SAFETY: malloc_trim only walks glibc's own arenas; it takes no
    // pointer and is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One connection's account inside the gateway budget.
#[derive(Debug)]
pub struct ConnMemory {
    global: Arc<MemoryBudget>,
    cap: u64,
    /// Bytes charged to this connection's requests.
    used: Mutex<u64>,
    freed: Notify,
}

/// The part of a connection's floor that is for requests.
const OWN: u64 = MAX_REQUEST_CHARGE;

/// Bytes of `used` beyond the connection's own share: borrowed from the
/// gateway budget.
fn borrowed(used: u64) -> u64 {
    used.saturating_sub(OWN)
}

impl ConnMemory {
    pub fn cap(&self) -> u64 {
        self.cap
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Charge `n` bytes (at most [`MAX_REQUEST_CHARGE`]), waiting while the
    /// connection is at its cap or the gateway budget has no room for what
    /// goes beyond the connection's own share.
    pub async fn acquire(self: &Arc<Self>, n: u64) -> Credit {
        debug_assert!(n <= MAX_REQUEST_CHARGE);
        loop {
            let own = self.freed.notified();
            let global = self.global.freed.notified();
            tokio::pin!(own, global);
            own.as_mut().enable();
            global.as_mut().enable();
            if let Some(c) = self.try_acquire(n) {
                return c;
            }
            tokio::select! {
                _ = own => {}
                _ = global => {}
            }
        }
    }

    /// [`ConnMemory::acquire`] without waiting.
    pub fn try_acquire(self: &Arc<Self>, n: u64) -> Option<Credit> {
        let mut used = self.lock();
        let after = *used + n;
        // A connection with nothing charged may always take one request.
        if after > self.cap && *used != 0 {
            return None;
        }
        let need = borrowed(after) - borrowed(*used);
        if need > 0 && !self.global.try_take(need, false) {
            return None;
        }
        *used = after;
        Some(Credit {
            conn: self.clone(),
            n,
        })
    }

    fn release(&self, n: u64) {
        let back = {
            let mut used = self.lock();
            let before = *used;
            *used = before.saturating_sub(n);
            borrowed(before) - borrowed(*used)
        };
        self.global.give(back);
        self.freed.notify_waiters();
    }

    /// Bytes charged right now.
    pub fn used(&self) -> u64 {
        *self.lock()
    }
}

impl Drop for ConnMemory {
    fn drop(&mut self) {
        // Every credit holds an Arc of this account, so nothing is charged
        // any more: only the floor goes back.
        self.global.give(CONN_FLOOR);
        self.global.trim_wanted.store(true, Ordering::Release);
        self.global.trim.notify_one();
    }
}

/// Bytes charged to a connection, released on drop.
#[derive(Debug)]
pub struct Credit {
    conn: Arc<ConnMemory>,
    n: u64,
}

impl Credit {
    pub fn bytes(&self) -> u64 {
        self.n
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        self.conn.release(self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_bound_the_number_of_connections() {
        let b = MemoryBudget::new(3 * CONN_FLOOR + 10);
        assert_eq!(b.max_connections(), 3);
        let c: Vec<_> = (0..3).map(|_| b.connection(64 << 20).unwrap()).collect();
        assert!(b.connection(64 << 20).is_none());
        drop(c);
        assert_eq!(b.used(), 0);
        assert!(b.connection(64 << 20).is_some());
    }

    #[test]
    fn a_connection_always_has_its_floor_and_borrows_the_rest() {
        let b = MemoryBudget::new(64 * CONN_FLOOR);
        let hog = b.connection(1 << 30).unwrap();
        let honest = b.connection(1 << 30).unwrap();
        // The hog takes its own share and then all it may borrow: up to
        // three quarters of the budget.
        let mut held = vec![];
        while let Some(c) = hog.try_acquire(MAX_REQUEST_CHARGE) {
            held.push(c);
        }
        assert!(b.used() <= b.limit() / 4 * 3);
        assert!(b.used() + MAX_REQUEST_CHARGE > b.limit() / 4 * 3);
        // New connections still get their floors from the last quarter.
        let late: Vec<_> = (0..15).map(|_| b.connection(1 << 30).unwrap()).collect();
        drop(late);
        // The other connection still runs one request at a time on its own.
        let one = honest.try_acquire(MAX_REQUEST_CHARGE).expect("floor");
        assert!(honest.try_acquire(MAX_REQUEST_CHARGE).is_none());
        drop(one);
        assert!(honest.try_acquire(MAX_REQUEST_CHARGE).is_some());
        // What the hog borrowed goes back to the budget as it is released.
        drop(held);
        assert_eq!(b.used(), 2 * CONN_FLOOR);
    }

    #[test]
    fn the_per_connection_cap_holds_but_one_request_always_fits() {
        let b = MemoryBudget::new(1 << 30);
        let c = b.connection(MAX_REQUEST_CHARGE).unwrap();
        let first = c.try_acquire(MAX_REQUEST_CHARGE).unwrap();
        assert!(c.try_acquire(1).is_none());
        drop(first);
        assert_eq!(c.used(), 0);
    }

    #[tokio::test]
    async fn a_waiting_acquire_wakes_when_memory_comes_back() {
        let b = MemoryBudget::new(1 << 30);
        let c = b.connection(MAX_REQUEST_CHARGE).unwrap();
        let first = c.try_acquire(MAX_REQUEST_CHARGE).unwrap();
        let c2 = c.clone();
        let waiter = tokio::spawn(async move { c2.acquire(REQUEST_OVERHEAD).await.bytes() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(first);
        assert_eq!(waiter.await.unwrap(), REQUEST_OVERHEAD);
    }
}
