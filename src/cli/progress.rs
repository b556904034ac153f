//! Progress bars on stderr with rate and ETA; hidden when stderr is not a terminal (logs, CI,
//! pipes) or with `--quiet`, so only the final report is printed there.
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

fn visible(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

fn styled(pb: ProgressBar, template: &str) -> ProgressBar {
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// A bar over the bytes of an input file (the ETA holds for lines of any size); the message
/// carries the counts.
pub fn bytes(total: u64, quiet: bool) -> ProgressBar {
    if !visible(quiet) {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    styled(
        ProgressBar::new(total),
        "{prefix} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta}) {msg}",
    )
}

/// A bar over a number of items (resources, files).
pub fn items(total: u64, quiet: bool) -> ProgressBar {
    if !visible(quiet) {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    styled(
        ProgressBar::new(total),
        "{prefix} [{elapsed_precise}] [{wide_bar}] {human_pos}/{human_len} ({per_sec}, ETA {eta}) {msg}",
    )
}
