//! The volume's asynchronous data path under real concurrency, on real
//! files and the real I/O engine: concurrent partial writes into one
//! cluster all land, reads racing trims and reallocation never return
//! another cluster's bytes, and a copy-on-write over zeros writes only the
//! new bytes.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use lungate_block::engine::{EngineKind, IoEngine};
use lungate_block::store::file::layers_dir;
use lungate_block::volume::{Volume, VolumeConfig, VolumeDevice};
use lungate_block::BlockDevice;

fn volume(dir: &Path, size: u64, cluster: u32, fill: Option<u8>) -> (Arc<Volume>, VolumeConfig) {
    let engine = IoEngine::new(EngineKind::Auto, 2).unwrap();
    let cfg = common::lun_config(dir, "v", size, cluster.into(), Some(engine));
    if let Some(b) = fill {
        cfg.file.write_all_at(&vec![b; size as usize], 0).unwrap();
    }
    (Arc::new(Volume::open(cfg.clone()).unwrap()), cfg)
}

fn block(cluster: u64, slot: u64, gen: u8) -> Vec<u8> {
    let mut b = vec![gen; 4096];
    b[..8].copy_from_slice(&cluster.to_le_bytes());
    b[8..16].copy_from_slice(&slot.to_le_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_partial_writes_into_one_cluster_all_land() {
    let d = tempfile::tempdir().unwrap();
    let (v, _) = volume(d.path(), 64 << 20, 64 << 10, Some(0x11));
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || v2.snapshot("base", "").unwrap())
        .await
        .unwrap();
    let dev = VolumeDevice::new(v.clone());
    // 16 writers per cluster, each its own 4 KiB of it, over 8 clusters:
    // every first write to a cluster races the others to allocate it.
    let mut tasks = Vec::new();
    for c in 0..8u64 {
        for s in 0..16u64 {
            let dev = dev.clone();
            tasks.push(tokio::spawn(async move {
                let off = c * (64 << 10) + s * 4096;
                dev.write(off, Bytes::from(block(c, s, 0x40)), false)
                    .await
                    .unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    dev.flush().await.unwrap();
    for c in 0..8u64 {
        let got = dev.read(c * (64 << 10), 64 << 10).await.unwrap();
        for s in 0..16u64 {
            let at = (s * 4096) as usize;
            assert_eq!(
                &got[at..at + 4096],
                &block(c, s, 0x40)[..],
                "cluster {c} slot {s}"
            );
        }
    }
    // The snapshot still reads as the base.
    let mut b = vec![0u8; 64 << 10];
    v.read_snapshot("base", 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_trims_never_see_another_clusters_bytes() {
    let d = tempfile::tempdir().unwrap();
    let clusters = 32u64;
    let cs = 4096u64;
    let (v, cfg) = volume(d.path(), clusters * cs, cs as u32, None);
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || v2.snapshot("s", "").unwrap())
        .await
        .unwrap();
    let dev = VolumeDevice::new(v.clone());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    // Writers rewrite whole clusters with their own number; trimmers free
    // them (and flushers commit, so freed clusters are reused).
    for w in 0..3u64 {
        let (dev, stop) = (dev.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let c = (i * 7 + w) % clusters;
                match i % 5 {
                    0..=2 => dev
                        .write(c * cs, Bytes::from(block(c, 0, (i % 200) as u8 + 1)), false)
                        .await
                        .unwrap(),
                    3 => dev.trim(c * cs, cs).await.unwrap(),
                    _ => dev.flush().await.unwrap(),
                }
                i += 1;
                // Page-cache hits complete without suspending: let the
                // clock and the other tasks run.
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut readers = Vec::new();
    for r in 0..3u64 {
        let (dev, stop) = (dev.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let c = (n * 13 + r) % clusters;
                let b = dev.read(c * cs, cs as usize).await.unwrap();
                let zero = b.iter().all(|&x| x == 0);
                let own = u64::from_le_bytes(b[..8].try_into().unwrap()) == c;
                assert!(zero || own, "cluster {c} read another cluster's bytes");
                n += 1;
                tokio::task::yield_now().await;
            }
            n
        }));
    }
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    assert!(reads > 100, "only {reads} reads ran");
    // Freed clusters are reused once their trim is committed: the live
    // layer holds at most one cluster per virtual cluster plus what the
    // last commit had not released yet.
    dev.flush().await.unwrap();
    let top = v.chain()[0];
    let delta = layers_dir(&cfg.lun_path).join(format!("{top}.delta"));
    let len = std::fs::metadata(&delta).unwrap().len();
    let data = len.saturating_sub(2 << 20);
    assert!(
        data <= 4 * clusters * cs,
        "the live layer grew to {len} bytes for {clusters} clusters: freed clusters are not reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_on_write_over_zeros_writes_only_the_new_bytes() {
    let d = tempfile::tempdir().unwrap();
    let cs = 64u64 << 10;
    // A sparse base (all holes): 4 KiB writes into fresh clusters.
    let (v, cfg) = volume(d.path(), 64 << 20, cs as u32, None);
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || v2.snapshot("s", "").unwrap())
        .await
        .unwrap();
    let dev = VolumeDevice::new(v.clone());
    for c in 0..64u64 {
        dev.write(c * cs + 8192, Bytes::from(vec![0x5a; 4096]), false)
            .await
            .unwrap();
    }
    dev.flush().await.unwrap();
    for c in 0..64u64 {
        let b = dev.read(c * cs, cs as usize).await.unwrap();
        assert!(b[..8192].iter().all(|&x| x == 0));
        assert!(b[8192..12288].iter().all(|&x| x == 0x5a));
        assert!(b[12288..].iter().all(|&x| x == 0));
    }
    let top = v.chain()[0];
    let delta = layers_dir(&cfg.lun_path).join(format!("{top}.delta"));
    let md = std::fs::metadata(&delta).unwrap();
    // Each cluster took its 4 KiB and one block for its last byte, not 64 KiB.
    let data_bytes = md.blocks() * 512;
    assert!(
        data_bytes < 64 * 16 * 4096,
        "{data_bytes} bytes allocated for 64 partial clusters"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_tracking_sees_every_change_through_both_paths() {
    let d = tempfile::tempdir().unwrap();
    let cs = 64u64 << 10;
    let (v, _) = volume(d.path(), 64 << 20, cs as u32, None);
    let dev = VolumeDevice::new(v.clone());
    dev.write(5 * cs + 10, Bytes::from(vec![1u8; 100]), false)
        .await
        .unwrap();
    let t = v.track_dirty();
    assert!(t.take().is_empty(), "a new tracker starts clean");
    // Async write spanning two clusters, a sync write, a trim, a zeroing.
    dev.write(2 * cs - 10, Bytes::from(vec![2u8; 20]), false)
        .await
        .unwrap();
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || v2.write(10 * cs, &[3u8; 10]).unwrap())
        .await
        .unwrap();
    dev.trim(20 * cs, cs).await.unwrap();
    dev.write_zeroes(30 * cs + 1, 5, false).await.unwrap();
    assert_eq!(
        t.take(),
        vec![(cs, 2 * cs), (10 * cs, cs), (20 * cs, cs), (30 * cs, cs)]
    );
    assert!(t.take().is_empty());
    // A snapshot changes nothing live; a revert changes the whole view.
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || {
        v2.snapshot("s", "").unwrap();
    })
    .await
    .unwrap();
    assert!(t.take().is_empty());
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || v2.revert("s").unwrap())
        .await
        .unwrap();
    assert_eq!(t.take(), vec![(0, 64 << 20)]);
    // Writes racing takes are all seen by some take.
    let mut seen = std::collections::BTreeSet::new();
    let writer = {
        let dev = dev.clone();
        tokio::spawn(async move {
            for c in 0..200u64 {
                dev.write((c % 512) * cs, Bytes::from(vec![4u8; 512]), false)
                    .await
                    .unwrap();
            }
        })
    };
    while !writer.is_finished() {
        for (o, l) in t.take() {
            seen.extend((o / cs)..((o + l) / cs));
        }
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    for (o, l) in t.take() {
        seen.extend((o / cs)..((o + l) / cs));
    }
    assert_eq!(seen, (0..200u64).collect());
    drop(t);
    let t2 = v.track_dirty();
    assert!(t2.take().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_io_goes_on_while_a_snapshot_delete_merges() {
    let d = tempfile::tempdir().unwrap();
    let cs = 4096u64;
    let clusters = 16384u64; // 64 MiB in one layer to merge
    let (v, _) = volume(d.path(), clusters * cs, cs as u32, None);
    let dev = VolumeDevice::new(v.clone());
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || v2.snapshot("a", "").unwrap())
        .await
        .unwrap();
    // Layer x (live until snapshot b) holds every cluster.
    for c in 0..clusters / 16 {
        dev.write(
            c * 16 * cs,
            Bytes::from(vec![(c % 250) as u8 + 1; 16 * 4096]),
            false,
        )
        .await
        .unwrap();
    }
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || {
        v2.snapshot("b", "").unwrap();
    })
    .await
    .unwrap();
    // Deleting "b" leaves x unnamed with one child (the live layer): the
    // delete merges x's 16384 clusters into it.
    let merging = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let during = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let io = {
        let (dev, merging, during) = (dev.clone(), merging.clone(), during.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while merging.load(std::sync::atomic::Ordering::SeqCst) {
                let c = (i * 7919) % clusters;
                if i % 2 == 0 {
                    let b = dev.read(c * cs, 4096).await.unwrap();
                    let want = ((c / 16) % 250) as u8 + 1;
                    assert!(b[100] == want || b[100] == 0xee, "cluster {c}");
                } else {
                    dev.write(c * cs + 100, Bytes::from(vec![0xee; 1]), false)
                        .await
                        .unwrap();
                }
                if merging.load(std::sync::atomic::Ordering::SeqCst) {
                    during.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                i += 1;
                tokio::task::yield_now().await;
            }
        })
    };
    // Let the guest get going, then delete.
    while during.load(std::sync::atomic::Ordering::SeqCst) < 10 {
        tokio::task::yield_now().await;
    }
    let before = during.load(std::sync::atomic::Ordering::SeqCst);
    let v2 = v.clone();
    tokio::task::spawn_blocking(move || v2.delete_snapshot("b").unwrap())
        .await
        .unwrap();
    let after = during.load(std::sync::atomic::Ordering::SeqCst);
    merging.store(false, std::sync::atomic::Ordering::SeqCst);
    io.await.unwrap();
    assert!(
        after > before + 10,
        "guest I/O stalled for the whole merge ({} requests completed during it)",
        after - before
    );
    assert_eq!(v.chain().len(), 2, "x was merged away");
    let mut b = vec![0u8; 4096];
    v.read_snapshot("a", 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}
