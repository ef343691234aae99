//! Engine tests on real temporary files (ext4/xfs/tmpfs, wherever TMPDIR
//! is). Every behaviour test runs against both engines through
//! `both_engines!`, so they cannot drift apart.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use super::*;

const MIB: u64 = 1 << 20;

/// An engine whose reads all go through its workers (no inline fast path),
/// so the suite tests the engine itself.
fn engine(kind: EngineKind) -> IoEngine {
    let e = IoEngine::build(kind, 2).unwrap_or_else(|e| {
        panic!("cannot start the {kind} engine on this machine: {e} (io_uring needs Linux 5.7+ and must not be blocked by seccomp or kernel.io_uring_disabled)")
    });
    e.set_inline_reads(false);
    e
}

/// The production configuration: io_uring plus inline RWF_NOWAIT reads.
fn inline_engine() -> IoEngine {
    let e = engine(EngineKind::Uring);
    e.set_inline_reads(true);
    e
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

fn temp_file(len: u64) -> Arc<File> {
    let f = tempfile::tempfile().expect("temp file");
    f.set_len(len).expect("set_len");
    Arc::new(f)
}

/// A file of `len` bytes, every byte `fill`, written through to disk so its
/// blocks are allocated.
fn filled_file(len: u64, fill: u8) -> Arc<File> {
    let f = temp_file(len);
    f.write_all_at(&vec![fill; len as usize], 0).unwrap();
    f.sync_all().unwrap();
    f
}

fn pread(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    file.read_exact_at(&mut b, offset).unwrap();
    b
}

/// 512-byte blocks allocated to the file.
fn blocks(file: &File) -> u64 {
    file.metadata().unwrap().blocks()
}

/// Deterministic xorshift generator: reproducible failures, no extra deps.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn ext(offset: u64, length: u64, data: bool) -> Extent {
    Extent {
        offset,
        length,
        data,
    }
}

/// Each test in the list runs against the io_uring engine, the sync engine,
/// and io_uring with inline reads.
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod uring_engine {
            $(#[test] fn $name() { super::$name(super::engine(super::EngineKind::Uring)) })*
        }
        mod sync_engine {
            $(#[test] fn $name() { super::$name(super::engine(super::EngineKind::Sync)) })*
        }
        mod uring_inline_reads {
            $(#[test] fn $name() { super::$name(super::inline_engine()) })*
        }
    };
}

both_engines!(
    read_write_round_trips_at_random_offsets,
    large_transfers_round_trip,
    read_across_end_of_file_fails_with_unexpected_eof,
    fua_writes_and_flush_succeed_and_data_reads_back,
    punch_hole_reads_back_zeros_and_leaves_a_hole,
    write_zeroes_with_trim_deallocates,
    write_zeroes_without_trim_keeps_blocks_allocated,
    zero_fallback_writes_zeros_when_fallocate_is_skipped,
    extents_report_a_known_sparse_pattern,
    os_errors_keep_their_errno,
    zero_length_requests_complete_without_io,
    many_concurrent_ops_from_several_threads_complete_with_correct_data,
    dropping_the_engine_completes_queued_ops_and_returns,
    dropping_the_engine_after_aborting_tasks_does_not_hang,
    reads_of_evicted_pages_return_the_data,
);

fn read_write_round_trips_at_random_offsets(engine: IoEngine) {
    const SIZE: u64 = 4 * MIB;
    let file = temp_file(SIZE);
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    block_on(async {
        for i in 0..300 {
            let len = 1 + rng.below(70_000);
            let off = rng.below(SIZE - len);
            let data = rng.bytes(len as usize);
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            engine
                .write(&file, off, Bytes::from(data), i % 7 == 0)
                .await
                .unwrap();

            let len = 1 + rng.below(70_000);
            let off = rng.below(SIZE - len);
            let got = engine.read(&file, off, len as usize).await.unwrap();
            assert_eq!(got.len() as u64, len);
            assert!(
                got[..] == model[off as usize..(off + len) as usize],
                "iteration {i}: read of {len} bytes at {off} differs from what was written"
            );
        }
    });
    // An independent reader agrees with the model.
    assert!(pread(&file, 0, SIZE as usize) == model);
}

fn large_transfers_round_trip(engine: IoEngine) {
    let file = temp_file(8 * MIB);
    let data = Rng(7).bytes(3 * MIB as usize + 12_345);
    block_on(async {
        engine
            .write(&file, MIB + 1, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        let got = engine.read(&file, MIB + 1, data.len()).await.unwrap();
        assert!(got[..] == data[..]);
    });
    assert!(pread(&file, MIB + 1, data.len()) == data);
}

fn read_across_end_of_file_fails_with_unexpected_eof(engine: IoEngine) {
    let file = temp_file(0);
    file.write_all_at(&[5u8; 10_000], 0).unwrap();
    block_on(async {
        let e = engine.read(&file, 9_000, 2_000).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("offset 9000") && msg.contains("after 1000 bytes"),
            "{msg}"
        );

        let e = engine.read(&file, 10_000, 1).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(e.to_string().contains("after 0 bytes"), "{e}");

        let all = engine.read(&file, 0, 10_000).await.unwrap();
        assert!(all.iter().all(|&b| b == 5));
    });
}

fn fua_writes_and_flush_succeed_and_data_reads_back(engine: IoEngine) {
    let file = temp_file(MIB);
    block_on(async {
        engine
            .write(&file, 4096, Bytes::from_static(&[0xA5; 8192]), true)
            .await
            .unwrap();
        engine
            .write(&file, 100, Bytes::from_static(b"not yet durable"), false)
            .await
            .unwrap();
        engine.flush(&file).await.unwrap();
    });
    assert_eq!(pread(&file, 4096, 8192), vec![0xA5; 8192]);
    assert_eq!(pread(&file, 100, 15), b"not yet durable");
}

fn punch_hole_reads_back_zeros_and_leaves_a_hole(engine: IoEngine) {
    let file = filled_file(4 * MIB, 0xAB);
    let before = blocks(&file);
    block_on(async {
        engine.punch_hole(&file, MIB, MIB).await.unwrap();
        let got = engine
            .read(&file, MIB - 100, MIB as usize + 200)
            .await
            .unwrap();
        assert!(got[..100].iter().all(|&b| b == 0xAB));
        assert!(got[100..100 + MIB as usize].iter().all(|&b| b == 0));
        assert!(got[100 + MIB as usize..].iter().all(|&b| b == 0xAB));

        // Unaligned: exactly these bytes become zeros.
        engine
            .punch_hole(&file, 3 * MIB + 100, 5_000)
            .await
            .unwrap();
        let got = engine.read(&file, 3 * MIB, 8192).await.unwrap();
        assert!(got[..100].iter().all(|&b| b == 0xAB));
        assert!(got[100..5_100].iter().all(|&b| b == 0));
        assert!(got[5_100..].iter().all(|&b| b == 0xAB));
    });
    assert_eq!(
        file.metadata().unwrap().len(),
        4 * MIB,
        "size must not change"
    );
    assert!(
        blocks(&file) <= before - 2048,
        "1 MiB should be deallocated"
    );
    let map = engine.extents(&file, 0, 3 * MIB).unwrap();
    assert_eq!(
        map,
        vec![
            ext(0, MIB, true),
            ext(MIB, MIB, false),
            ext(2 * MIB, MIB, true)
        ]
    );
}

fn write_zeroes_with_trim_deallocates(engine: IoEngine) {
    let file = filled_file(4 * MIB, 0x11);
    let before = blocks(&file);
    block_on(async {
        engine
            .write_zeroes(&file, 2 * MIB, MIB, true)
            .await
            .unwrap();
        let got = engine.read(&file, 2 * MIB, MIB as usize).await.unwrap();
        assert!(got.iter().all(|&b| b == 0));
    });
    assert!(blocks(&file) <= before - 2048);
    assert_eq!(
        engine.extents(&file, 2 * MIB, MIB).unwrap(),
        vec![ext(2 * MIB, MIB, false)]
    );
}

fn write_zeroes_without_trim_keeps_blocks_allocated(engine: IoEngine) {
    let file = filled_file(4 * MIB, 0x22);
    let before = blocks(&file);
    block_on(async {
        engine
            .write_zeroes(&file, MIB, 2 * MIB, false)
            .await
            .unwrap();
        engine.write_zeroes(&file, 7, 4_000, false).await.unwrap();
        let got = engine.read(&file, 0, 4 * MIB as usize).await.unwrap();
        assert!(got[..7].iter().all(|&b| b == 0x22));
        assert!(got[7..4_007].iter().all(|&b| b == 0));
        assert!(got[4_007..MIB as usize].iter().all(|&b| b == 0x22));
        assert!(got[MIB as usize..3 * MIB as usize].iter().all(|&b| b == 0));
        assert!(got[3 * MIB as usize..].iter().all(|&b| b == 0x22));
    });
    assert!(
        blocks(&file) >= before,
        "blocks went from {before} to {}",
        blocks(&file)
    );
}

fn zero_fallback_writes_zeros_when_fallocate_is_skipped(engine: IoEngine) {
    let file = filled_file(6 * MIB, 0x33);
    let before = blocks(&file);
    // Longer than one zero chunk, unaligned at both ends.
    let (off, len) = (MIB / 2 + 3, 3 * MIB + 77);
    block_on(async {
        engine
            .zero(&file, off, len, ZeroPlan::WriteOnly)
            .await
            .unwrap();
    });
    let got = pread(&file, 0, 6 * MIB as usize);
    let (a, b) = (off as usize, (off + len) as usize);
    assert!(got[..a].iter().all(|&x| x == 0x33));
    assert!(got[a..b].iter().all(|&x| x == 0));
    assert!(got[b..].iter().all(|&x| x == 0x33));
    assert!(blocks(&file) >= before, "zero writes must not deallocate");
}

fn extents_report_a_known_sparse_pattern(engine: IoEngine) {
    let file = temp_file(16 * MIB);
    file.write_all_at(&vec![1u8; MIB as usize], MIB).unwrap();
    file.write_all_at(&[2u8; 4096], 5 * MIB).unwrap();
    // Two adjacent writes make one data run.
    file.write_all_at(&[3u8; 4096], 10 * MIB).unwrap();
    file.write_all_at(&[4u8; 4096], 10 * MIB + 4096).unwrap();
    file.sync_all().unwrap();

    assert_eq!(
        engine.extents(&file, 0, 16 * MIB).unwrap(),
        vec![
            ext(0, MIB, false),
            ext(MIB, MIB, true),
            ext(2 * MIB, 3 * MIB, false),
            ext(5 * MIB, 4096, true),
            ext(5 * MIB + 4096, 5 * MIB - 4096, false),
            ext(10 * MIB, 8192, true),
            ext(10 * MIB + 8192, 6 * MIB - 8192, false),
        ]
    );
    // A window starting inside data and ending inside data is clipped.
    assert_eq!(
        engine
            .extents(&file, MIB + MIB / 2, 3 * MIB + MIB / 2 + 2048)
            .unwrap(),
        vec![
            ext(MIB + MIB / 2, MIB / 2, true),
            ext(2 * MIB, 3 * MIB, false),
            ext(5 * MIB, 2048, true),
        ]
    );
    // Past end of file is a hole; an empty range has no runs.
    assert_eq!(
        engine.extents(&file, 15 * MIB, 4 * MIB).unwrap(),
        vec![ext(15 * MIB, 4 * MIB, false)]
    );
    assert_eq!(engine.extents(&file, 3 * MIB, 0).unwrap(), vec![]);
    assert!(engine.extents(&file, u64::MAX - 1, 10).is_err());
}

fn os_errors_keep_their_errno(engine: IoEngine) {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    tmp.as_file().set_len(MIB).unwrap();
    let ro = Arc::new(File::open(tmp.path()).unwrap());
    let wo = Arc::new(OpenOptions::new().write(true).open(tmp.path()).unwrap());
    block_on(async {
        let e = engine
            .write(&ro, 0, Bytes::from_static(b"x"), false)
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        let e = engine.read(&wo, 0, 10).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        let e = engine.write_zeroes(&ro, 0, 4096, true).await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        let e = engine.read(&ro, u64::MAX - 5, 10).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    });
}

fn zero_length_requests_complete_without_io(engine: IoEngine) {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    // Read-only: any actual write or fallocate would fail with EBADF.
    let ro = Arc::new(File::open(tmp.path()).unwrap());
    block_on(async {
        assert!(engine.read(&ro, 1 << 40, 0).await.unwrap().is_empty());
        engine.write(&ro, 0, Bytes::new(), false).await.unwrap();
        engine.punch_hole(&ro, 0, 0).await.unwrap();
        engine.write_zeroes(&ro, 0, 0, false).await.unwrap();
    });
}

fn many_concurrent_ops_from_several_threads_complete_with_correct_data(engine: IoEngine) {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 250;
    const BLOCK: u64 = 4096;
    let file = temp_file(THREADS * PER_THREAD * BLOCK);
    let pattern = |block: u64| -> Vec<u8> { Rng(block * 2 + 1).bytes(BLOCK as usize) };
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (engine, file) = (engine.clone(), file.clone());
            thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    // All 250 are spawned before any runs, so they are in
                    // flight together (1000 across the threads).
                    let mut set = tokio::task::JoinSet::new();
                    for i in 0..PER_THREAD {
                        let (engine, file) = (engine.clone(), file.clone());
                        let block = t * PER_THREAD + i;
                        set.spawn(async move {
                            let data = pattern(block);
                            let at = block * BLOCK;
                            engine
                                .write(&file, at, Bytes::from(data.clone()), block % 50 == 0)
                                .await
                                .unwrap();
                            if block % 97 == 0 {
                                engine.flush(&file).await.unwrap();
                            }
                            let got = engine.read(&file, at, BLOCK as usize).await.unwrap();
                            assert!(got[..] == data[..], "block {block} read back wrong");
                        });
                    }
                    let mut n = 0;
                    while let Some(r) = set.join_next().await {
                        r.unwrap();
                        n += 1;
                    }
                    assert_eq!(n, PER_THREAD);
                });
            })
        })
        .collect();
    for t in threads {
        t.join().expect("submitter thread failed");
    }
    for block in 0..THREADS * PER_THREAD {
        assert!(pread(&file, block * BLOCK, BLOCK as usize) == pattern(block));
    }
}

fn reads_of_evicted_pages_return_the_data(engine: IoEngine) {
    let file = temp_file(2 * MIB);
    let data = Rng(11).bytes(2 * MIB as usize);
    file.write_all_at(&data, 0).unwrap();
    file.sync_all().unwrap();
    // Drop the (clean) pages from the cache so an inline RWF_NOWAIT read
    // misses and the engine has to read from the device. Every other page
    // is evicted, so some reads hit partially and continue in the engine.
    for page in (0..2 * MIB).step_by(8192) {
        // SAFETY: posix_fadvise takes no pointers.
        let r = unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                page as libc::off_t,
                4096,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(r, 0, "posix_fadvise");
    }
    block_on(async {
        for (off, len) in [
            (0u64, 65536usize),
            (4096, 16384),
            (100_000, 60_000),
            (MIB, 4096),
            (MIB + 4096, 3),
        ] {
            let got = engine.read(&file, off, len).await.unwrap();
            assert!(
                got[..] == data[off as usize..off as usize + len],
                "read {len} at {off}"
            );
        }
    });
}

/// Run `f` on another thread and fail the test if it does not return in
/// time (rather than hang the test run).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not return within {secs} s"))
}

fn dropping_the_engine_completes_queued_ops_and_returns(engine: IoEngine) {
    let file = filled_file(4 * MIB, 0x5A);
    // Far more requests than the rings hold, submitted without awaiting.
    let mut waiting = Vec::new();
    for i in 0..2000u64 {
        let (reply, rx) = oneshot::channel();
        let op = if i % 2 == 0 {
            Op::Read {
                buf: Vec::with_capacity(65536),
                len: 65536,
            }
        } else {
            Op::Write {
                data: Bytes::from_static(&[0x5A; 4096]),
                fua: false,
            }
        };
        engine.submit(Request {
            file: file.clone(),
            offset: (i * 4096) % (4 * MIB - 65536),
            op,
            reply,
        });
        waiting.push(rx);
    }
    within(60, "dropping the engine", move || drop(engine));
    // Drop returned, so every worker has exited; each request got an answer.
    for (i, rx) in waiting.into_iter().enumerate() {
        match rx.blocking_recv() {
            Ok(Ok(b)) => {
                if i % 2 == 0 {
                    assert_eq!(b.len(), 65536);
                    assert!(b.iter().all(|&x| x == 0x5A));
                }
            }
            Ok(Err(e)) => panic!("request {i} failed: {e}"),
            Err(_) => panic!("request {i} was dropped without an answer"),
        }
    }
}

fn dropping_the_engine_after_aborting_tasks_does_not_hang(engine: IoEngine) {
    let file = filled_file(4 * MIB, 1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let (engine, file) = (engine.clone(), file.clone());
        tasks.push(rt.spawn(async move {
            loop {
                let at = (i * 8192) % (3 * MIB);
                engine.read(&file, at, 65536).await.unwrap();
                engine
                    .write(&file, at, Bytes::from_static(&[1; 4096]), false)
                    .await
                    .unwrap();
            }
        }));
    }
    thread::sleep(Duration::from_millis(200));
    for t in &tasks {
        t.abort();
    }
    // Dropping the runtime drops the aborted tasks and their engine clones,
    // with their last requests possibly still in the rings.
    within(60, "shutting down the runtime and the engine", move || {
        drop(rt);
        drop(engine);
    });
    assert!(pread(&file, 0, 4096).iter().all(|&b| b == 1));
}

#[test]
fn engine_kind_parses_and_displays() {
    for (s, k) in [
        ("auto", EngineKind::Auto),
        ("uring", EngineKind::Uring),
        ("io_uring", EngineKind::Uring),
        ("SYNC", EngineKind::Sync),
    ] {
        assert_eq!(s.parse::<EngineKind>().unwrap(), k);
    }
    for k in [EngineKind::Auto, EngineKind::Uring, EngineKind::Sync] {
        assert_eq!(k.to_string().parse::<EngineKind>().unwrap(), k);
    }
    let e = "aio".parse::<EngineKind>().unwrap_err();
    assert!(e.to_string().contains("\"aio\""), "{e}");
}

#[test]
fn auto_uses_io_uring_exactly_when_the_probe_passes() {
    let e = IoEngine::build(EngineKind::Auto, 1).unwrap();
    let expected = match uring::probe() {
        Ok(()) => "io_uring",
        Err(_) => "sync",
    };
    assert_eq!(e.name(), expected);
    assert_eq!(e.workers(), 1);
    assert_eq!(engine(EngineKind::Sync).name(), "sync");
}

#[test]
fn zero_workers_picks_a_default() {
    let e = IoEngine::build(EngineKind::Sync, 0).unwrap();
    assert!(e.workers() >= 4, "{e:?}");
}

#[test]
fn engine_and_its_futures_are_send_and_sync() {
    fn send_sync<T: Send + Sync + Clone>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<IoEngine>();
    let e = engine(EngineKind::Sync);
    let file = temp_file(4096);
    send(&e.read(&file, 0, 1));
    send(&e.write(&file, 0, Bytes::new(), false));
    send(&e.flush(&file));
    send(&e.punch_hole(&file, 0, 1));
    send(&e.write_zeroes(&file, 0, 1, true));
}

/// A loop device over a sparse temp file, detached on drop.
struct LoopDevice {
    path: String,
    _backing: tempfile::NamedTempFile,
}

impl LoopDevice {
    fn new(len: u64) -> LoopDevice {
        let backing = tempfile::NamedTempFile::new().unwrap();
        backing.as_file().set_len(len).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing.path())
            .output()
            .expect("losetup (util-linux, see scripts/setup) must be installed");
        assert!(
            out.status.success(),
            "losetup failed (needs root and loop devices): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice {
            path: String::from_utf8(out.stdout).unwrap().trim().to_string(),
            _backing: backing,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.path])
            .status();
    }
}

/// Block devices take the other branches: fallocate modes map to discard /
/// write-zeroes and refuse unaligned ranges, lseek reports all data.
#[test]
#[ignore = "needs root and loop devices; run: cargo test -p lun-manager -- --ignored block_device"]
fn block_device_reads_writes_and_zeroes_on_every_engine() {
    const SIZE: u64 = 64 * MIB;
    let dev = LoopDevice::new(SIZE);
    for engine in [
        engine(EngineKind::Uring),
        engine(EngineKind::Sync),
        inline_engine(),
    ] {
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev.path)
                .unwrap(),
        );
        let data = Rng(3).bytes(3 * MIB as usize);
        block_on(async {
            engine
                .write(&file, 1000, Bytes::from(data.clone()), true)
                .await
                .unwrap();
            let got = engine.read(&file, 1000, data.len()).await.unwrap();
            assert!(got[..] == data[..], "{}", engine.name());

            // Aligned: the device zeroes (or discards) the range itself.
            engine.punch_hole(&file, MIB, MIB).await.unwrap();
            // Unaligned: fallocate refuses, the engine writes zeros.
            engine.punch_hole(&file, 100, 5_000).await.unwrap();
            engine
                .write_zeroes(&file, 2 * MIB + 7, 10_000, false)
                .await
                .unwrap();
            engine.flush(&file).await.unwrap();

            let got = engine.read(&file, 0, 4 * MIB as usize).await.unwrap();
            let mut want = vec![0u8; 4 * MIB as usize];
            want[1000..1000 + data.len()].copy_from_slice(&data);
            want[100..5_100].fill(0);
            want[MIB as usize..2 * MIB as usize].fill(0);
            want[2 * MIB as usize + 7..2 * MIB as usize + 10_007].fill(0);
            assert!(got[..] == want[..], "{}", engine.name());

            let e = engine.read(&file, SIZE - 10, 20).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        });
        assert_eq!(
            engine.extents(&file, 0, SIZE).unwrap(),
            vec![ext(0, SIZE, true)]
        );
    }
}
