//! The live-switch gate of one served LUN: a holding queue in front of its
//! data path, as a layer of the LUN's block-device stack ([`GateDevice`],
//! between the region views of its exports and its volume).
//!
//! Every request of every export of the LUN takes an [`Entry`] from the
//! gate when it reaches this layer, and holds the resulting [`Pass`] while
//! its I/O runs below. [`Gate::pause`] stops admitting (new entries are
//! parked in one FIFO), waits until no pass is out (the in-flight requests
//! drained), and hands back a [`Paused`] guard; the operation (snapshot,
//! revert, clone) runs while it is held. Releasing the guard admits the
//! parked entries in arrival order. No request fails or is answered early
//! because of a switch: it only waits.
//!
//! A migration that does not converge also slows the LUN's writers here
//! ([`Gate::throttle`]): while a [`Throttle`] lives, writes are admitted at
//! most at its rate (reads never wait), in the order they came; a delayed
//! write only waits, it never fails. Dropping the throttle lets every
//! delayed write through at once.
//!
//! The gate itself knows nothing about volumes or NBD; it only counts.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lungate_block::device::{BlockDevice, Caps, Chunk, Extent, IoFuture};
use tokio::sync::{oneshot, Notify};

/// Pause durations of every gate of the gateway, for `/v1/stats`.
#[derive(Debug, Default)]
pub struct SwitchStats {
    inner: Mutex<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    count: u64,
    held_requests: u64,
    max_us: u64,
    /// The most recent pauses (at most [`KEEP`]), for percentiles.
    recent: VecDeque<u64>,
}

const KEEP: usize = 65536;

/// A snapshot of [`SwitchStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct SwitchSummary {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Requests that waited in a holding queue, over all pauses.
    pub held_requests: u64,
}

impl SwitchStats {
    fn record(&self, us: u64, held: u64) {
        let mut s = lock(&self.inner);
        s.count += 1;
        s.held_requests += held;
        s.max_us = s.max_us.max(us);
        if s.recent.len() == KEEP {
            s.recent.pop_front();
        }
        s.recent.push_back(us);
    }

    pub fn summary(&self) -> SwitchSummary {
        let s = lock(&self.inner);
        let mut v: Vec<u64> = s.recent.iter().copied().collect();
        v.sort_unstable();
        let pct = |p: usize| -> u64 {
            if v.is_empty() {
                0
            } else {
                v[((v.len() - 1) * p).div_ceil(100)]
            }
        };
        SwitchSummary {
            count: s.count,
            p50_us: pct(50),
            p99_us: pct(99),
            max_us: s.max_us,
            held_requests: s.held_requests,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain counters: a panic elsewhere leaves nothing half-updated.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct State {
    /// Passes out (requests running).
    active: u64,
    paused: bool,
    parked: VecDeque<oneshot::Sender<Pass>>,
    /// Entries parked during the current pause.
    held: u64,
    pace: Pace,
}

/// Write admission while a [`Throttle`] lives: a token bucket kept as the
/// virtual time at which the next write may go.
#[derive(Debug, Default)]
struct Pace {
    /// Bytes per second admitted, and the grain a write's cost counts in
    /// (a write touching part of a cluster dirties all of it).
    limit: Option<(f64, u64)>,
    /// When the next write may be admitted.
    next: Option<Instant>,
    /// The admission of the last write that was delayed or queued behind
    /// one: a later write waits for it, so writes keep their order.
    last: Option<oneshot::Receiver<()>>,
    /// Writes that waited, and how long in all (µs), since the gate was
    /// made.
    delayed: u64,
    delayed_us: u64,
}

/// Counters of a gate's write throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThrottleCounts {
    /// Writes whose admission waited for the throttle.
    pub delayed: u64,
    /// Their waits together, µs.
    pub delayed_us: u64,
}

#[derive(Debug)]
pub struct Gate {
    state: Mutex<State>,
    drained: Notify,
    /// Woken when the throttle changes (delayed writes look again).
    paced: Notify,
    /// Serialises pauses of this gate.
    switching: Arc<tokio::sync::Mutex<()>>,
    stats: Arc<SwitchStats>,
}

/// Permission to run one request; dropping it marks the request done.
#[derive(Debug)]
pub struct Pass {
    gate: Arc<Gate>,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut st = lock(&self.gate.state);
        st.active -= 1;
        if st.active == 0 && st.paused {
            drop(st);
            self.gate.drained.notify_waiters();
        }
    }
}

/// A place in line: admitted at once, or parked until the switch ends.
#[derive(Debug)]
pub enum Entry {
    Go(Pass),
    Parked(oneshot::Receiver<Pass>),
}

impl Entry {
    /// Wait for the pass. A parked entry is admitted when the pause ends,
    /// in the order it was parked.
    pub async fn ready(self) -> Pass {
        match self {
            Entry::Go(p) => p,
            // The sender is dropped only by `release`, which always sends
            // first; a gate dropped mid-pause (shutdown) never happens while
            // a request holds an entry, because the request holds the gate.
            Entry::Parked(rx) => rx.await.expect("holding queue released"),
        }
    }
}

impl Gate {
    pub fn new(stats: Arc<SwitchStats>) -> Arc<Gate> {
        Arc::new(Gate {
            state: Mutex::new(State::default()),
            drained: Notify::new(),
            paced: Notify::new(),
            switching: Arc::new(tokio::sync::Mutex::new(())),
            stats,
        })
    }

    /// Take a place in line. Synchronous: the order of calls is the order
    /// of the holding queue.
    pub fn enter(self: &Arc<Self>) -> Entry {
        let mut st = lock(&self.state);
        if st.paused {
            let (tx, rx) = oneshot::channel();
            st.parked.push_back(tx);
            st.held += 1;
            Entry::Parked(rx)
        } else {
            st.active += 1;
            Entry::Go(Pass { gate: self.clone() })
        }
    }

    /// Stop admitting and wait for every running request to finish.
    pub async fn pause(self: &Arc<Self>) -> Paused {
        let serial = self.switching.clone().lock_owned().await;
        let start = Instant::now();
        lock(&self.state).paused = true;
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if lock(&self.state).active == 0 {
                break;
            }
            drained.await;
        }
        Paused {
            gate: self.clone(),
            start,
            done: false,
            _serial: serial,
        }
    }

    /// Requests running now.
    pub fn active(&self) -> u64 {
        lock(&self.state).active
    }

    /// Admit writes at most at `rate` bytes per second (each write costs
    /// the `grain`s it touches) until the returned guard is dropped (its
    /// [`Throttle::set`] changes the rate). One throttle per gate at a
    /// time: dropping one lifts the gate's throttle.
    pub fn throttle(self: &Arc<Self>, rate: u64, grain: u64) -> Throttle {
        let t = Throttle { gate: self.clone() };
        t.set(rate, grain);
        t
    }

    pub fn throttle_counts(&self) -> ThrottleCounts {
        let st = lock(&self.state);
        ThrottleCounts {
            delayed: st.pace.delayed,
            delayed_us: st.pace.delayed_us,
        }
    }

    /// A write of `len` bytes at `offset` (or a flush, `len` 0) takes its
    /// place among the throttled writes: `None` when no throttle is on and
    /// no write waits (it enters the gate at once).
    pub(crate) fn pace(self: &Arc<Self>, offset: u64, len: u64) -> Option<PaceSlot> {
        let mut st = lock(&self.state);
        let p = &mut st.pace;
        if let Some(rx) = &mut p.last {
            if !matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
                p.last = None;
            }
        }
        let at = match p.limit {
            Some((rate, grain)) => {
                let cost = if len == 0 {
                    0
                } else {
                    let first = offset / grain;
                    let last = offset.saturating_add(len - 1) / grain;
                    (last - first + 1).saturating_mul(grain)
                };
                let now = Instant::now();
                let start = p.next.map_or(now, |n| n.max(now));
                p.next = Some(start + Duration::from_secs_f64(cost as f64 / rate));
                Some(start)
            }
            None if p.last.is_some() => None,
            None => return None,
        };
        let (tx, rx) = oneshot::channel();
        let prev = p.last.replace(rx);
        Some(PaceSlot {
            gate: self.clone(),
            prev,
            at,
            done: Some(tx),
        })
    }

    fn release(self: &Arc<Self>, start: Instant) -> u64 {
        let mut st = lock(&self.state);
        st.paused = false;
        let held = std::mem::take(&mut st.held);
        while let Some(tx) = st.parked.pop_front() {
            st.active += 1;
            // If the receiver is gone the pass comes back in the error and
            // its drop undoes the count (after we unlock).
            if let Err(pass) = tx.send(Pass { gate: self.clone() }) {
                st.active -= 1;
                std::mem::forget(pass);
            }
        }
        drop(st);
        let us = start.elapsed().as_micros() as u64;
        self.stats.record(us, held);
        us
    }
}

/// Writes of a gate are paced while this lives (see [`Gate::throttle`]).
#[derive(Debug)]
pub struct Throttle {
    gate: Arc<Gate>,
}

impl Throttle {
    /// Change the rate (bytes per second, at least 1) and grain.
    pub fn set(&self, rate: u64, grain: u64) {
        let mut st = lock(&self.gate.state);
        st.pace.limit = Some((rate.max(1) as f64, grain.max(1)));
        drop(st);
        self.gate.paced.notify_waiters();
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let mut st = lock(&self.gate.state);
        st.pace.limit = None;
        st.pace.next = None;
        drop(st);
        // Delayed writes go now, in their order.
        self.gate.paced.notify_waiters();
    }
}

/// One write's place among the throttled ones.
pub(crate) struct PaceSlot {
    gate: Arc<Gate>,
    /// The previous throttled write's admission.
    prev: Option<oneshot::Receiver<()>>,
    /// When the bucket lets it go (`None`: only queued behind others).
    at: Option<Instant>,
    done: Option<oneshot::Sender<()>>,
}

impl PaceSlot {
    /// Wait for the writes before it and for its time (or for the
    /// throttle to go), then take its place in the gate's line.
    async fn enter(mut self) -> Entry {
        let t0 = Instant::now();
        if let Some(prev) = self.prev.take() {
            // An error: that write was dropped (its client went); its
            // place is free all the same.
            let _ = prev.await;
        }
        if let Some(at) = self.at {
            loop {
                let changed = self.gate.paced.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if lock(&self.gate.state).pace.limit.is_none() || Instant::now() >= at {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = changed => {}
                }
            }
        }
        let entry = self.gate.enter();
        let waited = t0.elapsed().as_micros() as u64;
        if waited >= 100 {
            let mut st = lock(&self.gate.state);
            st.pace.delayed += 1;
            st.pace.delayed_us += waited;
        }
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
        entry
    }
}

/// The gate is closed and drained while this lives; dropping it (or
/// [`Paused::resume`]) releases the holding queue in arrival order.
pub struct Paused {
    gate: Arc<Gate>,
    start: Instant,
    done: bool,
    _serial: tokio::sync::OwnedMutexGuard<()>,
}

impl Paused {
    /// Requests parked in the holding queue so far during this pause.
    pub fn held(&self) -> u64 {
        lock(&self.gate.state).held
    }

    /// Release the queue; the pause length in microseconds.
    pub fn resume(mut self) -> u64 {
        self.done = true;
        self.gate.release(self.start)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if !self.done {
            self.gate.release(self.start);
        }
    }
}

/// The gate as a layer of the block-device stack: each call takes its
/// place in line when it is made and runs the layer below once admitted,
/// holding its pass until that completes.
///
/// The layer below is read when the pass is granted, not when the call is
/// made, so [`GateDevice::swap`] during a pause sends every parked request
/// (and every later one) to the new layer: how a migration hands a LUN's
/// existing connections to its new owner (`crate::migrate`).
pub struct GateDevice {
    gate: Arc<Gate>,
    inner: Arc<RwLock<Arc<dyn BlockDevice>>>,
}

impl GateDevice {
    pub fn new(gate: Arc<Gate>, inner: Arc<dyn BlockDevice>) -> GateDevice {
        GateDevice {
            gate,
            inner: Arc::new(RwLock::new(inner)),
        }
    }

    /// Replace the layer below. Only while the gate is paused (`_paused`
    /// proves it), so no request is running on the old layer and every
    /// parked one runs on the new one.
    pub fn swap(&self, paused: &Paused, inner: Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> {
        assert!(
            Arc::ptr_eq(&paused.gate, &self.gate),
            "a gate device swapped under another gate's pause"
        );
        std::mem::replace(
            &mut *self.inner.write().unwrap_or_else(|e| e.into_inner()),
            inner,
        )
    }

    fn below(inner: &RwLock<Arc<dyn BlockDevice>>) -> Arc<dyn BlockDevice> {
        inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn through<T: Send + 'static>(
        &self,
        op: impl FnOnce(&dyn BlockDevice) -> IoFuture<T> + Send + 'static,
    ) -> IoFuture<T> {
        let entry = self.gate.enter();
        if let Entry::Go(pass) = entry {
            // Admitted at once: the layer below cannot change before the
            // pass is dropped (a swap needs the gate drained).
            let fut = op(&*Self::below(&self.inner));
            return Box::pin(async move {
                let _pass = pass;
                fut.await
            });
        }
        let inner = self.inner.clone();
        Box::pin(async move {
            let _pass = entry.ready().await;
            let below = Self::below(&inner);
            op(&*below).await
        })
    }

    /// [`Self::through`] for a request that writes `[offset, offset +
    /// len)` (or a flush, `len` 0, which keeps its place behind delayed
    /// writes): paced by the gate's throttle, if one is on.
    fn through_write<T: Send + 'static>(
        &self,
        offset: u64,
        len: u64,
        op: impl FnOnce(&dyn BlockDevice) -> IoFuture<T> + Send + 'static,
    ) -> IoFuture<T> {
        let Some(slot) = self.gate.pace(offset, len) else {
            return self.through(op);
        };
        let inner = self.inner.clone();
        Box::pin(async move {
            let _pass = slot.enter().await.ready().await;
            let below = Self::below(&inner);
            op(&*below).await
        })
    }
}

impl BlockDevice for GateDevice {
    fn size(&self) -> u64 {
        Self::below(&self.inner).size()
    }
    fn caps(&self) -> Caps {
        Self::below(&self.inner).caps()
    }
    fn read(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
        self.through(move |d| d.read(offset, len))
    }
    fn read_chunks(&self, offset: u64, len: usize) -> IoFuture<Vec<Chunk>> {
        self.through(move |d| d.read_chunks(offset, len))
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        let len = data.len() as u64;
        self.through_write(offset, len, move |d| d.write(offset, data, fua))
    }
    fn flush(&self) -> IoFuture<()> {
        self.through_write(0, 0, |d| d.flush())
    }
    // A trim or a zeroing sends no data in a copy round (zero frames):
    // it costs one grain, so it keeps its place among writes but is not
    // held back by its length.
    fn trim(&self, offset: u64, len: u64) -> IoFuture<()> {
        self.through_write(offset, len.min(1), move |d| d.trim(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<()> {
        self.through_write(offset, len.min(1), move |d| {
            d.write_zeroes(offset, len, may_trim)
        })
    }
    fn extents(&self, offset: u64, len: u64) -> IoFuture<Vec<Extent>> {
        self.through(move |d| d.extents(offset, len))
    }
    fn cache(&self, offset: u64, len: u64) -> IoFuture<()> {
        self.through(move |d| d.cache(offset, len))
    }
    fn changed_since(
        &self,
        snapshot: &str,
        offset: u64,
        len: u64,
    ) -> IoFuture<Vec<std::ops::Range<u64>>> {
        let snapshot = snapshot.to_owned();
        self.through(move |d| d.changed_since(&snapshot, offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn pause_waits_for_running_requests_and_releases_parked_ones_in_order() {
        let stats = Arc::new(SwitchStats::default());
        let gate = Gate::new(stats.clone());
        let running = gate.enter().ready().await;
        let g2 = gate.clone();
        let pausing = tokio::spawn(async move { g2.pause().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !pausing.is_finished(),
            "pause must wait for the running request"
        );
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..5 {
            let e = gate.enter();
            assert!(matches!(e, Entry::Parked(_)));
            let order = order.clone();
            waiters.push(tokio::spawn(async move {
                let _p = e.ready().await;
                order.lock().unwrap().push(i);
            }));
        }
        drop(running);
        let paused = pausing.await.unwrap();
        assert_eq!(gate.active(), 0);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            order.lock().unwrap().is_empty(),
            "nothing runs during the pause"
        );
        paused.resume();
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(order.lock().unwrap().len(), 5);
        let s = stats.summary();
        assert_eq!((s.count, s.held_requests), (1, 5));
        assert!(s.max_us >= 20_000, "{s:?}");
        assert!(matches!(gate.enter(), Entry::Go(_)));
    }

    #[tokio::test]
    async fn a_throttle_paces_writes_in_order_and_lifting_it_lets_them_all_go() {
        let gate = Gate::new(Arc::new(SwitchStats::default()));
        const G: u64 = 64 << 10;
        // 10 clusters a second: a write every 100 ms.
        let throttle = gate.throttle(10 * G, G);
        let t0 = Instant::now();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut writes = Vec::new();
        for i in 0..6u64 {
            // 4 KiB writes, each in a cluster of its own.
            let slot = gate.pace(i * G, 4096).expect("throttled");
            let order = order.clone();
            writes.push(tokio::spawn(async move {
                let _pass = slot.enter().await.ready().await;
                order.lock().unwrap().push((i, t0.elapsed()));
            }));
        }
        // Reads are never paced.
        let r = Instant::now();
        drop(gate.enter().ready().await);
        assert!(r.elapsed() < Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let admitted = order.lock().unwrap().len() as u128;
        let by = t0.elapsed().as_millis();
        // Write i goes at i * 100 ms: never earlier, whatever the load.
        assert!(
            admitted >= 1 && admitted <= by / 100 + 1,
            "{admitted} writes admitted in {by} ms at 10 a second"
        );
        let lifted = t0.elapsed();
        drop(throttle);
        for w in writes {
            w.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let ids: Vec<u64> = order.iter().map(|o| o.0).collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4, 5], "writes kept their order");
        // Its turn was at 500 ms: lifting the throttle let it go before.
        if lifted < Duration::from_millis(450) {
            assert!(
                order[5].1 < Duration::from_millis(500),
                "the last write waited {:?} (throttle lifted at {lifted:?})",
                order[5].1
            );
        }
        let c = gate.throttle_counts();
        assert!(c.delayed >= 4, "{c:?}");
        // With no throttle and nothing waiting, writes are not paced.
        assert!(gate.pace(0, 4096).is_none());
    }
}
