//! Assembles the payload guest (guest/payload.s) with binutils' `as` and
//! links it with `ld` into one flat image loaded at 1 MiB; src/payload.rs
//! includes the result. `scripts/setup` installs binutils.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let what = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {what}: {e} (install binutils: scripts/setup does)")
    });
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn main() {
    let src = PathBuf::from("guest/payload.s");
    let script = PathBuf::from("guest/link.ld");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", script.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let obj = out.join("payload.o");
    let bin = out.join("payload.bin");
    run(Command::new("as")
        .arg("--64")
        .arg("--fatal-warnings")
        .arg("-o")
        .arg(&obj)
        .arg(&src));
    run(Command::new("ld")
        .args(["-nostdlib", "-static", "--oformat=binary", "-T"])
        .arg(&script)
        .arg("-o")
        .arg(&bin)
        .arg(&obj));
}
