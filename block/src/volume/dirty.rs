//! Dirty-cluster tracking: which clusters of the live volume changed since
//! a consumer (a migration's copy rounds, an incremental backup) last
//! looked.
//!
//! A consumer starts a [`DirtyTracker`]; from then on every write, zeroing
//! or trim through either data path sets the bits of the clusters it
//! touches, and a revert sets them all (the live view changed wholesale).
//! [`DirtyTracker::take`] hands back the changed ranges and clears them in
//! one atomic swap per word, so a write racing a take lands in this take
//! or the next, never in neither. Dropping the tracker stops it. With no
//! tracker running a write pays one relaxed atomic load.
//!
//! Memory: one bit per cluster, a word per 64 clusters (a 1 TiB volume at
//! 64 KiB clusters: 2 MiB per tracker).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// The trackers of one volume.
#[derive(Debug, Default)]
pub(super) struct DirtySet {
    any: AtomicBool,
    trackers: Mutex<Vec<Weak<Bitmap>>>,
}

#[derive(Debug)]
struct Bitmap {
    words: Box<[AtomicU64]>,
    clusters: u64,
    cluster_size: u64,
    size: u64,
}

impl DirtySet {
    /// Mark clusters `[first, last]` dirty in every running tracker.
    pub(super) fn mark(&self, first: u64, last: u64) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        let trackers = super::lock(&self.trackers);
        for t in trackers.iter().filter_map(Weak::upgrade) {
            t.mark(first, last);
        }
    }

    /// Mark every cluster (the live view changed as a whole).
    pub(super) fn mark_all(&self) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        let trackers = super::lock(&self.trackers);
        for t in trackers.iter().filter_map(Weak::upgrade) {
            if t.clusters > 0 {
                t.mark(0, t.clusters - 1);
            }
        }
    }

    pub(super) fn start(self: &Arc<Self>, size: u64, cluster_size: u64) -> DirtyTracker {
        let clusters = size.div_ceil(cluster_size);
        let words = (0..clusters.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        let map = Arc::new(Bitmap {
            words,
            clusters,
            cluster_size,
            size,
        });
        let mut t = super::lock(&self.trackers);
        t.retain(|w| w.strong_count() > 0);
        t.push(Arc::downgrade(&map));
        self.any.store(true, Ordering::Release);
        DirtyTracker {
            map,
            set: Arc::downgrade(self),
        }
    }

    /// Forget stopped trackers (called when one is dropped).
    fn prune(&self) {
        let mut t = super::lock(&self.trackers);
        t.retain(|w| w.strong_count() > 0);
        self.any.store(!t.is_empty(), Ordering::Release);
    }
}

impl Bitmap {
    fn mark(&self, first: u64, last: u64) {
        let last = last.min(self.clusters.saturating_sub(1));
        let mut c = first;
        while c <= last {
            let w = (c / 64) as usize;
            let lo = c % 64;
            let hi = (last - (c - lo)).min(63);
            let bits = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            self.words[w].fetch_or(bits, Ordering::AcqRel);
            c = c - lo + 64;
        }
    }
}

/// A running dirty-cluster tracker of one volume (see the module docs).
#[derive(Debug)]
pub struct DirtyTracker {
    map: Arc<Bitmap>,
    set: Weak<DirtySet>,
}

impl Drop for DirtyTracker {
    fn drop(&mut self) {
        let set = std::mem::take(&mut self.set);
        // The bitmap goes first, so the prune sees it gone.
        self.map = Arc::new(Bitmap {
            words: Box::new([]),
            clusters: 0,
            cluster_size: 1,
            size: 0,
        });
        if let Some(s) = set.upgrade() {
            s.prune();
        }
    }
}

impl DirtyTracker {
    /// The byte ranges `(offset, length)` of the clusters changed since
    /// the tracker started or the last take, merged and in order; their
    /// bits are cleared.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let m = &self.map;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, w) in m.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let c = i as u64 * 64 + b;
                let start = c * m.cluster_size;
                let end = (start + m.cluster_size).min(m.size);
                match out.last_mut() {
                    Some((o, l)) if *o + *l == start => *l = end - *o,
                    _ => out.push((start, end - start)),
                }
            }
        }
        out
    }

    /// Dirty clusters right now, without clearing them.
    pub fn count(&self) -> u64 {
        self.map
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    pub fn cluster_size(&self) -> u64 {
        self.map.cluster_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_merge_into_ranges_and_take_clears_them() {
        let set = Arc::new(DirtySet::default());
        let t = set.start(1000 * 4096 + 100, 4096);
        set.mark(3, 5);
        set.mark(6, 6);
        set.mark(63, 64);
        set.mark(1000, 1000);
        assert_eq!(t.count(), 7);
        assert_eq!(
            t.take(),
            vec![
                (3 * 4096, 4 * 4096),
                (63 * 4096, 2 * 4096),
                (1000 * 4096, 100)
            ]
        );
        assert_eq!(t.count(), 0);
        assert!(t.take().is_empty());
        set.mark(0, 200);
        assert_eq!(t.take(), vec![(0, 201 * 4096)]);
    }

    #[test]
    fn without_a_tracker_marks_are_free_and_stopped_trackers_are_forgotten() {
        let set = Arc::new(DirtySet::default());
        set.mark(0, 10);
        let t = set.start(1 << 20, 4096);
        assert!(set.any.load(Ordering::Relaxed));
        drop(t);
        assert!(!set.any.load(Ordering::Relaxed));
    }
}
