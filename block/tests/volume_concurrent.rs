//! Guest I/O from several threads while snapshots, flushes, block-status
//! queries and snapshot deletes run: no deadlock, and every thread reads back
//! exactly what it last wrote to its own clusters.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lungate_block::volume::Volume;

const CS: u64 = 4096;
const THREADS: u64 = 4;
const PER_THREAD: u64 = 64;

#[test]
fn io_threads_and_tree_operations_run_together() {
    let d = tempfile::tempdir().unwrap();
    let size = THREADS * PER_THREAD * CS;
    let vol = Arc::new(Volume::open(common::lun_config(d.path(), "c", size, CS, None)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let vol = vol.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let base = t * PER_THREAD * CS;
                let mut model = vec![0u8; (PER_THREAD * CS) as usize];
                // Until the maintenance thread has run all its cycles.
                let mut i = 0u64;
                while i < 2000 || !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let c = (i * 7 + t) % PER_THREAD;
                    let off = c * CS + (i % 3) * 1000;
                    let len = (1 + (i * 131) % 3000).min(PER_THREAD * CS - off);
                    let byte = (i % 251) as u8 + 1;
                    if i % 17 == 0 {
                        vol.trim(base + c * CS, CS).unwrap();
                        model[(c * CS) as usize..((c + 1) * CS) as usize].fill(0);
                    } else {
                        let data = vec![byte; len as usize];
                        vol.write(base + off, &data).unwrap();
                        model[off as usize..(off + len) as usize].fill(byte);
                    }
                    if i % 200 == 0 {
                        let mut b = vec![0u8; model.len()];
                        vol.read(base, &mut b).unwrap();
                        assert!(b == model, "thread {t} step {i}: read-back differs");
                    }
                }
                let mut b = vec![0u8; model.len()];
                vol.read(base, &mut b).unwrap();
                assert!(b == model, "thread {t}: final read-back differs");
            })
        })
        .collect();
    let maint = {
        let vol = vol.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while n < 6 {
                vol.snapshot(&format!("s{n}"), "").unwrap();
                vol.flush().unwrap();
                vol.extents(0, vol.size()).unwrap();
                if n >= 2 {
                    // Merges an older layer into its child under I/O.
                    vol.delete_snapshot(&format!("s{}", n - 2)).unwrap();
                }
                n += 1;
            }
            stop.store(true, Ordering::SeqCst);
        })
    };
    maint.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(vol.snapshots().len(), 2, "s4 and s5 remain");
}
