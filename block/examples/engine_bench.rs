//! 4 KiB random-read IOPS of the backend engines at a fixed queue depth on a
//! page-cached file.
//!
//! cargo run --release -p lun-manager --example engine_bench -- \
//!     [--size-mib 1024] [--secs 5] [--qd 32] [--runtime-threads 2] [--file PATH]
//!     [--engines uring:1:inline,uring:1,uring:2,sync:2,sync:4]
//!
//! Engines are KIND:WORKERS[:inline] (0 workers = default; `inline` turns
//! on inline RWF_NOWAIT reads, which production uses).
//!
//! Without `--file`, a file of `--size-mib` is created in TMPDIR, filled,
//! and read once so it is in the page cache; it is removed afterwards.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lungate_block::engine::{EngineKind, IoEngine};

const BLOCK: u64 = 4096;

struct Args {
    size_mib: u64,
    secs: u64,
    qd: usize,
    runtime_threads: usize,
    file: Option<PathBuf>,
    engines: Vec<(EngineKind, usize, bool)>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        size_mib: 1024,
        secs: 5,
        qd: 32,
        runtime_threads: 2,
        file: None,
        engines: vec![
            (EngineKind::Uring, 1, true),
            (EngineKind::Uring, 1, false),
            (EngineKind::Uring, 2, false),
            (EngineKind::Sync, 2, false),
            (EngineKind::Sync, 4, false),
        ],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{v:?}: {e}"));
        match flag.as_str() {
            "--size-mib" => a.size_mib = num(value()?)?,
            "--secs" => a.secs = num(value()?)?,
            "--qd" => a.qd = num(value()?)? as usize,
            "--runtime-threads" => a.runtime_threads = num(value()?)? as usize,
            "--file" => a.file = Some(PathBuf::from(value()?)),
            "--engines" => {
                a.engines = value()?
                    .split(',')
                    .map(|e| {
                        let mut parts = e.split(':');
                        let kind = parts.next().unwrap_or_default();
                        let kind = kind.parse::<EngineKind>().map_err(|e| e.to_string())?;
                        let n = num(parts.next().unwrap_or("0").to_string())? as usize;
                        let inline = match parts.next() {
                            None => false,
                            Some("inline") => true,
                            Some(x) => return Err(format!("{x:?}: expected \"inline\"")),
                        };
                        Ok((kind, n, inline))
                    })
                    .collect::<Result<_, String>>()?
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(a)
}

/// Fill `path` with `size` bytes of non-zero data and read it back once so
/// it is resident in the page cache.
fn prepare(path: &PathBuf, size: u64) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8 + 1).collect();
    for _ in 0..size / chunk.len() as u64 {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    let f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        f.read_exact_at(&mut buf, off)?;
        off += buf.len() as u64;
    }
    Ok(())
}

/// Removes the bench file it created, also when a run panics.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct Outcome {
    iops: f64,
    mean_us: f64,
    /// Process CPU time (user + system, all threads) per read: the cost
    /// that stays meaningful on a machine shared with other work.
    cpu_us_per_op: f64,
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage writes one rusage struct into the zeroed local.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn run(engine: &IoEngine, file: &Arc<File>, blocks: u64, args: &Args) -> Outcome {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.runtime_threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let ops = Arc::new(AtomicU64::new(0));
    let busy_ns = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let cpu0 = cpu_time();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..args.qd {
            let (engine, file) = (engine.clone(), file.clone());
            let (ops, busy_ns, stop) = (ops.clone(), busy_ns.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                let (mut n, mut ns) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let at = (x % blocks) * BLOCK;
                    let t0 = Instant::now();
                    let b = engine.read(&file, at, BLOCK as usize).await.expect("read");
                    ns += t0.elapsed().as_nanos() as u64;
                    assert_eq!(b.len(), BLOCK as usize);
                    n += 1;
                    // Inline reads complete without ever returning Pending;
                    // yield so all QD tasks interleave, as requests from a
                    // socket would. Same cost for every engine.
                    tokio::task::yield_now().await;
                }
                ops.fetch_add(n, Ordering::Relaxed);
                busy_ns.fetch_add(ns, Ordering::Relaxed);
            }));
        }
        tokio::time::sleep(Duration::from_secs(args.secs)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.expect("bench task");
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu0).as_secs_f64();
    let n = ops.load(Ordering::Relaxed);
    Outcome {
        iops: n as f64 / elapsed,
        mean_us: busy_ns.load(Ordering::Relaxed) as f64 / n.max(1) as f64 / 1000.0,
        cpu_us_per_op: cpu * 1e6 / n.max(1) as f64,
    }
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("engine_bench: {e}");
        std::process::exit(2);
    });
    let mut cleanup = Cleanup(None);
    let path = match &args.file {
        Some(p) => p.clone(),
        None => {
            let p = std::env::temp_dir().join(format!("lungate-bench-{}.img", std::process::id()));
            eprintln!("preparing {} MiB at {}", args.size_mib, p.display());
            cleanup.0 = Some(p.clone());
            prepare(&p, args.size_mib << 20).expect("prepare bench file");
            p
        }
    };
    let file = Arc::new(File::open(&path).expect("open bench file"));
    let blocks = file.metadata().expect("stat").len() / BLOCK;
    println!(
        "4 KiB random reads, QD{}, {} s, {} MiB page-cached file, {} tokio threads",
        args.qd,
        args.secs,
        (blocks * BLOCK) >> 20,
        args.runtime_threads
    );
    for &(kind, workers, inline) in &args.engines {
        let engine = IoEngine::new(kind, workers).expect("engine");
        engine.set_inline_reads(inline);
        let workers = engine.workers();
        let r = run(&engine, &file, blocks, &args);
        println!(
            "{:>8} workers={workers} inline={inline:<5}: {:>9.0} IOPS  mean latency {:>7.1} us  CPU {:.2} us/op",
            engine.name(),
            r.iops,
            r.mean_us,
            r.cpu_us_per_op
        );
    }
}
