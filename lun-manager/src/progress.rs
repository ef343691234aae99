//! Progress bars for long operations (region moves, flatten): shown on a
//! terminal, hidden when stderr is not one, so scripts get clean output.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A byte-count bar with `msg`, or a hidden one when stderr is no terminal.
pub fn bar(total: u64, msg: &'static str) -> ProgressBar {
    if total < (64 << 20) || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    b.set_message(msg);
    b
}
