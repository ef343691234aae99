//! The command-line conventions every lungate binary follows (`lunctl`,
//! `lungate`, and `vmm-shim` once it exists), in one place so they cannot
//! drift apart:
//!
//! * [`exit`]: the exit codes, the same in every command of every binary;
//! * [`output`]: `--json` — a JSON document for read commands, newline-
//!   delimited JSON events ending in a `result` (or `error`) object for
//!   commands that change something;
//! * [`progress`]: the progress of a long operation, as an indicatif bar on
//!   a terminal or as NDJSON `progress` events with `--json`;
//! * [`docs`]: shell completions and man pages generated from the binary's
//!   own clap definition (`BIN completions bash|zsh|fish`, `BIN man DIR`).
//!
//! A binary adds the two documentation subcommands with one variant,
//! `#[command(flatten)] Doc(lungate_cli::DocCmd)`, and runs them with one
//! call, `lungate_cli::docs::run(Cli::command(), &doc, EXIT_NOTE)`.
//!
//! This crate knows nothing of LUNs, volumes or the gateway: library code
//! reports progress through a plain callback, `(phase, done, total)`, which
//! a [`progress::Reporter`] renders.

pub mod docs;
pub mod exit;
pub mod output;
pub mod progress;

pub use docs::DocCmd;
pub use exit::Exit;
pub use output::{Format, Output};
pub use progress::Reporter;
