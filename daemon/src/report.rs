//! How `cowsnap ctl` shows an RPC's progress to a person, on stderr: on a
//! terminal a live bar (indicatif) under the stages passed so far; when
//! stderr is not a terminal, plain lines (every stage and every dump
//! figure the daemon sends, transferred bytes at most once a second), so
//! that logs and scripts read the same words. Results go to stdout, not
//! here.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::proto::DumpProgress;

/// Transferred bytes are reported as plain lines at most this often.
const PLAIN_BYTES_EVERY: Duration = Duration::from_secs(1);

pub struct Reporter {
    out: Output,
    /// What the transferred bytes are (`sent`, `exported`).
    verb: &'static str,
}

enum Output {
    Bar(ProgressBar),
    Plain { last_bytes: Option<Instant> },
}

impl Reporter {
    /// A bar when stderr is a terminal, else plain lines. `total`: the
    /// bytes a transfer will move, when known.
    pub fn for_stderr(verb: &'static str, total: Option<u64>) -> Reporter {
        if std::io::stderr().is_terminal() {
            Reporter::bar(verb, total, ProgressDrawTarget::stderr())
        } else {
            Reporter::plain(verb)
        }
    }

    pub fn plain(verb: &'static str) -> Reporter {
        Reporter {
            out: Output::Plain { last_bytes: None },
            verb,
        }
    }

    pub fn bar(verb: &'static str, total: Option<u64>, target: ProgressDrawTarget) -> Reporter {
        let bar = match total {
            Some(total) => {
                let bar = ProgressBar::with_draw_target(Some(total), target);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {elapsed:>4} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar
            }
            None => {
                let bar = ProgressBar::with_draw_target(None, target);
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar
            }
        };
        bar.enable_steady_tick(Duration::from_millis(120));
        Reporter {
            out: Output::Bar(bar),
            verb,
        }
    }

    /// A stage passed (`dumping`, `transferred`): a line above the bar.
    pub fn stage(&mut self, word: &str) {
        match &self.out {
            Output::Bar(bar) => {
                bar.println(word);
                bar.set_message(word.to_string());
            }
            Output::Plain { .. } => eprintln!("{word}"),
        }
    }

    /// The engine's figures while it dumps.
    pub fn dump(&mut self, p: &DumpProgress) {
        match &self.out {
            Output::Bar(bar) => bar.set_message(dump_message(p)),
            Output::Plain { .. } => eprintln!("{}", dump_line(p)),
        }
    }

    /// `done` bytes moved so far.
    pub fn bytes(&mut self, done: u64) {
        match &mut self.out {
            Output::Bar(bar) => {
                if bar.length().is_some() {
                    bar.set_position(done);
                } else {
                    bar.set_message(format!("{} {}", HumanBytes(done), self.verb));
                }
            }
            Output::Plain { last_bytes } => {
                let due = match last_bytes {
                    Some(t) => t.elapsed() >= PLAIN_BYTES_EVERY,
                    None => true,
                };
                if due {
                    eprintln!("{}", bytes_line(done, self.verb));
                    *last_bytes = Some(Instant::now());
                }
            }
        }
    }

    /// Takes the bar away (the result line follows on stdout).
    pub fn finish(self) {
        if let Output::Bar(bar) = self.out {
            bar.finish_and_clear();
        }
    }
}

/// A dump figure as a plain line.
pub fn dump_line(p: &DumpProgress) -> String {
    format!(
        "pages scanned {} stored {}, {} bytes written, frozen {} ms",
        p.pages_scanned, p.pages_stored, p.bytes_written, p.frozen_ms
    )
}

/// A dump figure as the bar's message.
fn dump_message(p: &DumpProgress) -> String {
    format!(
        "dumping: {} pages scanned, {} stored, {} written, frozen {} ms",
        p.pages_scanned,
        p.pages_stored,
        HumanBytes(p.bytes_written),
        p.frozen_ms
    )
}

pub fn bytes_line(done: u64, verb: &str) -> String {
    format!("{done} bytes {verb}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_say_the_figures() {
        let p = DumpProgress {
            pages_scanned: 10,
            pages_stored: 4,
            bytes_written: 16384,
            frozen_ms: 7,
        };
        assert_eq!(
            dump_line(&p),
            "pages scanned 10 stored 4, 16384 bytes written, frozen 7 ms"
        );
        assert_eq!(
            dump_message(&p),
            "dumping: 10 pages scanned, 4 stored, 16.00 KiB written, frozen 7 ms"
        );
        assert_eq!(bytes_line(5, "sent"), "5 bytes sent");
    }

    /// The bar runs (hidden here) through every kind of report.
    #[test]
    fn a_bar_takes_every_report() {
        for total in [None, Some(100)] {
            let mut r = Reporter::bar("sent", total, ProgressDrawTarget::hidden());
            r.stage("dumping");
            r.dump(&DumpProgress::default());
            r.bytes(50);
            if let Output::Bar(bar) = &r.out {
                match total {
                    Some(_) => assert_eq!(bar.position(), 50),
                    None => assert_eq!(bar.message(), "50 B sent"),
                }
            }
            r.finish();
        }
    }
}
