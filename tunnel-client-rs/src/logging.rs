//! A minimal stderr logger: one line per event, `<RFC 3339 UTC time> <LEVEL> <message>`. `--log-file`
//! points stderr itself at the file (so a panic message lands there too); no log crate features are needed
//! beyond that, which keeps the static binary small.

use log::{LevelFilter, Log, Metadata, Record};
use std::io::Write;

struct StderrLogger {
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // Our own lines only; dependencies (tungstenite, rustls) log at trace/debug for their internals.
        metadata.level() <= self.level
            && (metadata.target().starts_with("tunnel_client") || metadata.level() <= log::Level::Warn)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(record.level(), record.args());
        // One write per line so lines from different threads never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

fn format_line(level: log::Level, message: impl std::fmt::Display) -> String {
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    format!("{now} {level:<5} {message}\n")
}

/// Append one log line to `path` without installing the logger: exec mode reports its own setup errors
/// this way before it forks (when no logger exists yet and stderr belongs to the task).
pub fn append_line(path: &std::path::Path, level: log::Level, message: impl std::fmt::Display) {
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).create(true).open(path) {
        let _ = f.write_all(format_line(level, message).as_bytes());
    }
}

/// Parse a `--log-level` value.
pub fn parse_level(text: &str) -> Result<LevelFilter, String> {
    text.trim()
        .parse::<LevelFilter>()
        .map_err(|_| format!("--log-level must be one of off, error, warn, info, debug, trace; got {text:?}"))
}

/// Install the logger (once per process; later calls are ignored).
pub fn init(level: LevelFilter) {
    if log::set_boxed_logger(Box::new(StderrLogger { level })).is_ok() {
        log::set_max_level(level);
    }
}
