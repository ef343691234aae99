//! A lazily allocated two-level table of `u64` entries indexed by cluster
//! number. Zero means "no entry". Level 1 is a vector with one pointer per
//! [`PAGE`] clusters (8 bytes per 512 clusters: 256 KiB for 1 TiB at 64 KiB
//! clusters); level-2 pages of 4 KiB exist only where some entry is set, so
//! memory follows the allocated clusters, not the virtual size. Lookup is
//! two array indexings, whatever the chain depth.

/// Entries per level-2 page.
pub const PAGE: usize = 512;

#[derive(Clone)]
pub struct Table {
    l1: Vec<Option<Box<[u64; PAGE]>>>,
    clusters: u64,
    count: usize,
}

impl Table {
    pub fn new(clusters: u64) -> Table {
        let pages = clusters.div_ceil(PAGE as u64) as usize;
        Table {
            l1: vec![None; pages],
            clusters,
            count: 0,
        }
    }

    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    /// Number of non-zero entries.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Level-2 pages allocated (for memory accounting and tests).
    pub fn pages(&self) -> usize {
        self.l1.iter().filter(|p| p.is_some()).count()
    }

    #[inline]
    pub fn get(&self, vc: u64) -> u64 {
        let (p, i) = ((vc / PAGE as u64) as usize, (vc % PAGE as u64) as usize);
        match self.l1.get(p) {
            Some(Some(page)) => page[i],
            _ => 0,
        }
    }

    /// Set entry `vc` (which must be `< clusters`); returns the old value.
    pub fn set(&mut self, vc: u64, v: u64) -> u64 {
        let (p, i) = ((vc / PAGE as u64) as usize, (vc % PAGE as u64) as usize);
        let Some(slot) = self.l1.get_mut(p) else {
            debug_assert!(false, "cluster {vc} beyond table of {}", self.clusters);
            return 0;
        };
        if slot.is_none() {
            if v == 0 {
                return 0;
            }
            *slot = Some(Box::new([0u64; PAGE]));
        }
        let page = slot.as_mut().expect("allocated above");
        let old = std::mem::replace(&mut page[i], v);
        match (old == 0, v == 0) {
            (true, false) => self.count += 1,
            (false, true) => self.count -= 1,
            _ => {}
        }
        old
    }

    /// Every non-zero entry in cluster order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.l1.iter().enumerate().flat_map(|(p, page)| {
            page.iter().flat_map(move |page| {
                page.iter()
                    .enumerate()
                    .filter(|(_, &v)| v != 0)
                    .map(move |(i, &v)| ((p * PAGE + i) as u64, v))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_table_allocates_pages_only_where_set() {
        // 1 TiB at 64 KiB clusters.
        let mut t = Table::new(1 << 24);
        assert_eq!(t.pages(), 0);
        assert_eq!(t.get(12345), 0);
        t.set(12345, 7);
        t.set((1 << 24) - 1, 9);
        assert_eq!(t.pages(), 2);
        assert_eq!(t.count(), 2);
        assert_eq!(t.get(12345), 7);
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            vec![(12345, 7), ((1 << 24) - 1, 9)]
        );
        assert_eq!(t.set(12345, 0), 7);
        assert_eq!(t.count(), 1);
        // Clearing an entry in an absent page allocates nothing.
        t.set(5, 0);
        assert_eq!(t.pages(), 2);
    }
}
