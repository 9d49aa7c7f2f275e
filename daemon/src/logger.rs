//! A `log` backend writing `cowsnapd: LEVEL: message` lines to stderr
//! (journald or the test harness keeps them).

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) && record.target().starts_with("cowsnapd") {
            let level = match record.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            eprintln!("cowsnapd: {level}: {}", record.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger: info and up when `verbose`, else warnings and up.
pub fn init(verbose: bool) {
    static LOGGER: StderrLogger = StderrLogger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(if verbose {
            LevelFilter::Info
        } else {
            LevelFilter::Warn
        });
    }
}
