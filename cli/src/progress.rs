//! The progress of a long operation (flatten, a merging delete-snapshot,
//! apply-diff, resize, create --prefill; migrate, replicate and scrub when
//! they come): library code calls a plain `(phase, done, total)` callback;
//! a [`Reporter`] turns the calls into
//!
//! * an indicatif bar on stderr when stderr is a terminal (drawn only once
//!   the operation has run for [`BAR_DELAY`], so quick ones never flash),
//! * NDJSON `progress` events on stdout with `--json`
//!   (`{"type":"progress","op":"flatten","phase":"copy","done":…,
//!   "total":…,"unit":"bytes","elapsed_ms":…}`), at most one per
//!   [`EVENT_INTERVAL`] per phase, and always the first and last of each
//!   phase,
//! * nothing otherwise (a script reading plain text gets plain text).
//!
//! A new long command plugs in with three lines:
//!
//! ```ignore
//! let mut rep = out.progress("migrate");
//! let moved = migrate(&lun, &target, &mut |phase, done, total| rep.update(phase, done, total))?;
//! rep.finish();
//! out.result("migrate", &moved, || format!("migrated {} bytes\n", moved.bytes));
//! ```

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output::{Event, Output};

/// How long an operation runs before its bar is drawn.
pub const BAR_DELAY: Duration = Duration::from_millis(300);
/// The least time between two `progress` events of one phase.
pub const EVENT_INTERVAL: Duration = Duration::from_millis(200);

/// Renders one operation's progress. Dropping it clears its bar.
pub struct Reporter {
    out: Output,
    op: &'static str,
    terminal: bool,
    started: Instant,
    bar: Option<ProgressBar>,
    bar_shown: bool,
    /// The phase of the last update, and its numbers.
    last: Option<(&'static str, u64, Option<u64>)>,
    /// When the last event went out and what it said, and whether `last`
    /// still has to go out.
    emitted: Option<Instant>,
    sent: Option<(&'static str, u64, Option<u64>)>,
    pending: bool,
}

impl Reporter {
    pub(crate) fn new(out: Output, op: &'static str, terminal: bool) -> Reporter {
        Reporter {
            out,
            op,
            terminal,
            started: Instant::now(),
            bar: None,
            bar_shown: false,
            last: None,
            emitted: None,
            sent: None,
            pending: false,
        }
    }

    /// `done` of `total` bytes of `phase` are done. Phases come one after
    /// another; within one, `done` only grows.
    pub fn update(&mut self, phase: &'static str, done: u64, total: u64) {
        self.step(phase, done.min(total), Some(total));
    }

    /// `phase` is running and its size is unknown (another process, such
    /// as a gateway, does the work): a spinner, one event.
    pub fn waiting(&mut self, phase: &'static str) {
        self.step(phase, 0, None);
    }

    /// The operation is over: the last state goes out if it has not, and
    /// the bar is cleared.
    pub fn finish(&mut self) {
        if self.pending {
            self.emit();
        }
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }

    fn step(&mut self, phase: &'static str, done: u64, total: Option<u64>) {
        let new_phase = self.last.map(|l| l.0) != Some(phase);
        if new_phase && self.pending {
            self.emit(); // the previous phase's last numbers
        }
        self.last = Some((phase, done, total));
        self.pending = true;
        if self.out.is_json() {
            let due = new_phase
                || Some(done) == total
                || self.emitted.is_none_or(|t| t.elapsed() >= EVENT_INTERVAL);
            if due {
                self.emit();
            }
        } else if self.terminal {
            self.draw(new_phase, phase, done, total);
        }
    }

    fn emit(&mut self) {
        self.pending = false;
        if !self.out.is_json() {
            return;
        }
        let Some((phase, done, total)) = self.last else {
            return;
        };
        if self.sent == self.last {
            return; // said already
        }
        self.sent = self.last;
        self.emitted = Some(Instant::now());
        self.out.event(&Event::Progress {
            op: self.op,
            phase,
            done,
            total,
            unit: "bytes",
            elapsed_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }

    fn draw(&mut self, new_phase: bool, phase: &'static str, done: u64, total: Option<u64>) {
        if new_phase {
            if let Some(b) = self.bar.take() {
                b.finish_and_clear();
            }
            let (b, template) = match total {
                Some(t) => (
                    ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::hidden()),
                    // wide_bar takes what the terminal has left: one line.
                    "{prefix} {msg} [{wide_bar}] {bytes}/{total_bytes} ({eta})",
                ),
                None => (
                    ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden()),
                    "{prefix} {msg} {spinner} {elapsed}",
                ),
            };
            b.set_style(
                ProgressStyle::with_template(template)
                    .expect("static template")
                    .progress_chars("=> "),
            );
            b.set_prefix(self.op);
            b.set_message(phase);
            if total.is_none() {
                b.enable_steady_tick(Duration::from_millis(120));
            }
            self.bar = Some(b);
            self.bar_shown = false;
        }
        let Some(b) = &self.bar else { return };
        if let Some(t) = total {
            b.set_length(t); // a phase's total may grow as work is found
        }
        b.set_position(done);
        if !self.bar_shown && self.started.elapsed() >= BAR_DELAY {
            b.set_draw_target(ProgressDrawTarget::stderr());
            self.bar_shown = true;
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::tests::Buf;
    use crate::output::Format;

    fn json_reporter(op: &'static str) -> (Reporter, Buf) {
        let b = Buf::default();
        let o = Output::to_writer("t", Format::Json, Box::new(b.clone()));
        (o.progress(op), b)
    }

    #[test]
    fn every_phase_reports_its_first_and_last_numbers_and_done_never_falls() {
        let (mut r, b) = json_reporter("apply-diff");
        for d in (0..=1000).step_by(10) {
            r.update("verify", d, 1000);
        }
        for d in (0..=500).step_by(5) {
            r.update("apply", d, 500);
        }
        r.finish();
        let l = b.lines();
        assert!(l
            .iter()
            .all(|e| e["type"] == "progress" && e["op"] == "apply-diff"));
        let phase = |p: &str| -> Vec<u64> {
            l.iter()
                .filter(|e| e["phase"] == p)
                .map(|e| e["done"].as_u64().unwrap())
                .collect()
        };
        let (v, a) = (phase("verify"), phase("apply"));
        assert_eq!((v[0], *v.last().unwrap()), (0, 1000), "{v:?}");
        assert_eq!((a[0], *a.last().unwrap()), (0, 500), "{a:?}");
        assert!(v.windows(2).all(|w| w[0] <= w[1]) && a.windows(2).all(|w| w[0] <= w[1]));
        // Throttled: far fewer events than updates.
        assert!(l.len() < 20, "{} events", l.len());
        assert_eq!(l[0]["total"], 1000);
        assert_eq!(l[0]["unit"], "bytes");
    }

    #[test]
    fn a_throttled_last_update_still_goes_out_at_finish() {
        let (mut r, b) = json_reporter("flatten");
        r.update("copy", 0, 100);
        r.update("copy", 40, 100); // within EVENT_INTERVAL: held back
        r.finish();
        let done: Vec<u64> = b
            .lines()
            .iter()
            .map(|e| e["done"].as_u64().unwrap())
            .collect();
        assert_eq!(done, [0, 40]);
    }

    #[test]
    fn the_same_numbers_go_out_once() {
        let (mut r, b) = json_reporter("flatten");
        r.update("copy", 100, 100);
        r.update("copy", 100, 100);
        r.finish();
        assert_eq!(b.lines().len(), 1);
    }

    #[test]
    fn waiting_is_one_event_of_unknown_total() {
        let (mut r, b) = json_reporter("flatten");
        r.waiting("gateway");
        r.finish();
        let l = b.lines();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0]["phase"], "gateway");
        assert!(l[0]["total"].is_null());
    }

    #[test]
    fn human_output_without_a_terminal_prints_nothing() {
        let b = Buf::default();
        let o = Output::to_writer("t", Format::Human, Box::new(b.clone()));
        let mut r = o.progress("resize");
        r.update("move", 5, 10);
        r.finish();
        assert!(b.0.lock().unwrap().is_empty());
    }
}
