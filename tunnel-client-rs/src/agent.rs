//! Guest agent mode (`--agent`): inside a VM VPS the tunnel client is also the agent that tells the runner
//! the VM is alive. After each successful attach it sends a heartbeat at once (seq 0, the phone-home), then
//! one every `--agent-interval`, as WebSocket TEXT messages on the tunnel's own WebSocket: the tunnel
//! protocol is binary only, so text never mixes with frames, and the runner reads it with
//! `kohakuriver_proto.agent.parse_agent_message`.
//!
//! A heartbeat goes on the writer's control queue as a message of its own (never inside a binary frame's
//! bytes): the queue is served first, so a heartbeat does not wait behind bulk DATA, and at one small message
//! per interval it takes nothing measurable from the data either.
//!
//! The figures: `/proc/uptime`, `/proc/loadavg`, `/proc/meminfo` (MemTotal, MemAvailable), `statvfs("/")`
//! (total and available to unprivileged users, as `df` shows), the entries of `/proc/driver/nvidia/gpus`
//! (0 without the NVIDIA driver) and `/proc/sys/kernel/hostname`. Something unreadable is sent as 0 (or an
//! empty hostname) rather than not at all: the heartbeat is first of all a sign of life. Every value is
//! clamped to what the runner accepts, so a strange kernel never makes a live VM look dead.
//!
//! The encoding is byte for byte the Python encoder's (compact, keys in order, ASCII only, floats in their
//! shortest round-trip form): `tests/agent_vectors.rs` checks it against `tests/vectors/agent_heartbeat.json`.

use log::{debug, warn};
use std::ffi::CString;
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// The message type and version the runner reads (`kohakuriver_proto.agent.HEARTBEAT_TYPE`, `VERSION`).
pub const HEARTBEAT_TYPE: &str = "agent.heartbeat";
pub const VERSION: u32 = 1;
/// The runner's bounds (`kohakuriver_proto.agent`): values are clamped to them before sending.
pub const MAX_HOSTNAME: usize = 255;
pub const MAX_UPTIME: f64 = 1e10;
pub const MAX_LOAD: f64 = 1e6;
pub const MAX_GPUS: u64 = 4096;
const MAX_INT: u64 = i64::MAX as u64;
/// Default of `--agent-interval` (seconds).
pub const DEFAULT_INTERVAL: f64 = 5.0;

/// One heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub struct Heartbeat {
    pub seq: u64,
    pub hostname: String,
    pub uptime_seconds: f64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub gpus: u64,
}

impl Heartbeat {
    /// The TEXT message: `{"type":"agent.heartbeat","version":1,"seq":..,...}`, values clamped to the
    /// runner's bounds.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(320);
        out.push_str("{\"type\":\"");
        out.push_str(HEARTBEAT_TYPE);
        let _ = write!(out, "\",\"version\":{VERSION},\"seq\":{}", self.seq.min(MAX_INT));
        out.push_str(",\"hostname\":");
        push_json_string(&mut out, &clean_hostname(&self.hostname));
        for (key, value, max) in [
            ("uptime_seconds", self.uptime_seconds, MAX_UPTIME),
            ("load1", self.load1, MAX_LOAD),
            ("load5", self.load5, MAX_LOAD),
            ("load15", self.load15, MAX_LOAD),
        ] {
            let _ = write!(out, ",\"{key}\":{}", format_float(value, max));
        }
        for (key, value, max) in [
            ("memory_total_bytes", self.memory_total_bytes, MAX_INT),
            ("memory_available_bytes", self.memory_available_bytes, MAX_INT),
            ("disk_total_bytes", self.disk_total_bytes, MAX_INT),
            ("disk_free_bytes", self.disk_free_bytes, MAX_INT),
            ("gpus", self.gpus, MAX_GPUS),
        ] {
            let _ = write!(out, ",\"{key}\":{}", value.min(max));
        }
        out.push('}');
        out
    }
}

/// A float as Python's `repr` writes it within the runner's bounds: Rust's `{:?}` is the same shortest
/// round-trip form ("0.0", "12.5", "1000000.0"); the two differ only in exponent notation (Python "1e-05" and
/// "1e+16", Rust "1e-5" and "1e16"), so values too small to matter are sent as 0 and the upper bound keeps
/// them below 1e16. NaN and negatives are 0.
fn format_float(value: f64, max: f64) -> String {
    let v = if value.is_nan() || value < 1e-4 { 0.0 } else { value.min(max) };
    format!("{v:?}")
}

/// JSON string with Python's `json.dumps(ensure_ascii=True)` escapes: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`,
/// `\f`, every other character outside printable ASCII as `\uXXXX` (lowercase hex, surrogate pairs above the
/// BMP).
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// The hostname as the runner accepts it: one line, no control characters or line separators (replaced by
/// `?`), at most `MAX_HOSTNAME` characters, the kernel's trailing newline dropped.
pub fn clean_hostname(raw: &str) -> String {
    raw.trim_end_matches(['\n', '\r'])
        .chars()
        .map(|c| if c.is_control() || c == '\u{2028}' || c == '\u{2029}' { '?' } else { c })
        .take(MAX_HOSTNAME)
        .collect()
}

/// `/proc/uptime`: "351.92 1234.56" -> 351.92.
pub fn parse_uptime(text: &str) -> Option<f64> {
    text.split_ascii_whitespace().next()?.parse().ok().filter(|v: &f64| v.is_finite())
}

/// `/proc/loadavg`: "0.08 0.03 0.01 1/123 4567" -> (0.08, 0.03, 0.01).
pub fn parse_loadavg(text: &str) -> Option<(f64, f64, f64)> {
    let mut it = text.split_ascii_whitespace().map(|v| v.parse::<f64>().ok().filter(|v| v.is_finite()));
    Some((it.next()??, it.next()??, it.next()??))
}

/// `/proc/meminfo`: (MemTotal, MemAvailable) in bytes (the file says kB, meaning KiB). A kernel older than
/// 3.14 has no MemAvailable: MemFree + Buffers + Cached is the estimate it would have given.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let (mut total, mut available, mut free, mut buffers, mut cached) = (None, None, None, None, None);
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else { continue };
        let slot = match key {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            "MemFree" => &mut free,
            "Buffers" => &mut buffers,
            "Cached" => &mut cached,
            _ => continue,
        };
        let mut words = rest.split_ascii_whitespace();
        let number = words.next().and_then(|n| n.parse::<u64>().ok());
        let scale = match words.next() {
            Some("kB") => 1024,
            None => 1,
            Some(_) => continue,
        };
        *slot = number.map(|n| n.saturating_mul(scale));
    }
    let available =
        available.or_else(|| Some(free?.saturating_add(buffers.unwrap_or(0)).saturating_add(cached.unwrap_or(0))));
    Some((total?, available?))
}

/// `statvfs(path)`: (total, available to unprivileged users) in bytes.
pub fn disk_usage(path: &Path) -> std::io::Result<(u64, u64)> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs only writes into the zeroed struct we own; the path is a valid NUL-terminated string
    // that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok(((st.f_blocks as u64).saturating_mul(unit), (st.f_bavail as u64).saturating_mul(unit)))
}

/// Entries of the NVIDIA driver's GPU directory (one per GPU); 0 when it does not exist.
pub fn count_gpus(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|entries| entries.filter(|e| e.is_ok()).count() as u64).unwrap_or(0)
}

/// Where the figures are read (tests point these at fixtures).
#[derive(Clone, Debug)]
pub struct Sources {
    pub proc: PathBuf,
    pub disk: PathBuf,
}

impl Default for Sources {
    fn default() -> Self {
        Self { proc: PathBuf::from("/proc"), disk: PathBuf::from("/") }
    }
}

/// Read every figure now (blocking file system calls: run it off the runtime's threads).
pub fn sample(sources: &Sources, seq: u64) -> Heartbeat {
    let read = |rel: &str| std::fs::read_to_string(sources.proc.join(rel)).ok();
    let (load1, load5, load15) = read("loadavg").as_deref().and_then(parse_loadavg).unwrap_or((0.0, 0.0, 0.0));
    let (memory_total_bytes, memory_available_bytes) =
        read("meminfo").as_deref().and_then(parse_meminfo).unwrap_or((0, 0));
    let (disk_total_bytes, disk_free_bytes) = disk_usage(&sources.disk).unwrap_or((0, 0));
    Heartbeat {
        seq,
        hostname: read("sys/kernel/hostname").map(|h| clean_hostname(&h)).unwrap_or_default(),
        uptime_seconds: read("uptime").as_deref().and_then(parse_uptime).unwrap_or(0.0),
        load1,
        load5,
        load15,
        memory_total_bytes,
        memory_available_bytes,
        disk_total_bytes,
        disk_free_bytes,
        gpus: count_gpus(&sources.proc.join("driver/nvidia/gpus")),
    }
}

/// The agent of one WebSocket session: seq 0 at once, then one heartbeat per `interval`, onto the writer's
/// control queue. Ends when the queue is closed (the session ended); the session also aborts it.
pub async fn run(ctrl: mpsc::Sender<Message>, interval: Duration, sources: Sources) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut skipped = 0u64;
    for seq in 0u64.. {
        ticks.tick().await;
        let src = sources.clone();
        let heartbeat = match tokio::task::spawn_blocking(move || sample(&src, seq)).await {
            Ok(h) => h,
            Err(e) => {
                warn!("agent: reading the figures failed: {e}");
                continue;
            }
        };
        match ctrl.try_send(Message::text(heartbeat.encode())) {
            Ok(()) => {}
            // Only a runner that stopped reading fills the control queue; the session notices that itself.
            Err(mpsc::error::TrySendError::Full(_)) => {
                skipped += 1;
                if skipped.is_power_of_two() {
                    debug!("agent: control queue full, {skipped} heartbeat(s) skipped");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:        2015280 kB\nMemFree:          123456 kB\n\
                           MemAvailable:    1747400 kB\nBuffers:           20000 kB\nCached:           300000 kB\n\
                           HugePages_Total:       0\n";

    #[test]
    fn proc_files_parse() {
        assert_eq!(parse_uptime("351.92 1234.56\n"), Some(351.92));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("nan 1"), None);
        assert_eq!(parse_loadavg("0.08 0.03 0.01 1/123 4567\n"), Some((0.08, 0.03, 0.01)));
        assert_eq!(parse_loadavg("0.08 0.03"), None);
        assert_eq!(parse_loadavg("a b c"), None);
        assert_eq!(parse_meminfo(MEMINFO), Some((2015280 * 1024, 1747400 * 1024)));
        // Before Linux 3.14: no MemAvailable, estimated as MemFree + Buffers + Cached.
        let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 200 kB\n";
        assert_eq!(parse_meminfo(old), Some((1000 * 1024, 310 * 1024)));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n"), None);
    }

    #[test]
    fn hostnames_are_cleaned() {
        assert_eq!(clean_hostname("vps-1\n"), "vps-1");
        assert_eq!(clean_hostname("a\tb\u{7f}c\u{85}d\u{2028}"), "a?b?c?d?");
        assert_eq!(clean_hostname(&"h".repeat(300)).chars().count(), MAX_HOSTNAME);
        assert_eq!(clean_hostname("é☃"), "é☃");
    }

    #[test]
    fn values_are_clamped_to_the_runners_bounds() {
        let hb = Heartbeat {
            seq: u64::MAX,
            hostname: "x\n".into(),
            uptime_seconds: f64::INFINITY,
            load1: f64::NAN,
            load5: -1.0,
            load15: 1e-7,
            memory_total_bytes: u64::MAX,
            memory_available_bytes: 0,
            disk_total_bytes: 1,
            disk_free_bytes: 2,
            gpus: 10_000,
        };
        let text = hb.encode();
        assert!(text.contains("\"seq\":9223372036854775807,\"hostname\":\"x\""), "{text}");
        assert!(text.contains("\"uptime_seconds\":10000000000.0,\"load1\":0.0,\"load5\":0.0,\"load15\":0.0"));
        assert!(text.contains("\"memory_total_bytes\":9223372036854775807,"));
        assert!(text.ends_with("\"gpus\":4096}"));
    }

    #[test]
    fn a_fixture_tree_is_read() {
        let dir = std::env::temp_dir().join(format!("agent-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sys/kernel")).unwrap();
        std::fs::create_dir_all(dir.join("driver/nvidia/gpus/0000:01:00.0")).unwrap();
        std::fs::create_dir_all(dir.join("driver/nvidia/gpus/0000:02:00.0")).unwrap();
        std::fs::write(dir.join("uptime"), "351.92 1234.56\n").unwrap();
        std::fs::write(dir.join("loadavg"), "0.08 0.03 0.01 1/123 4567\n").unwrap();
        std::fs::write(dir.join("meminfo"), MEMINFO).unwrap();
        std::fs::write(dir.join("sys/kernel/hostname"), "vps-7\n").unwrap();
        let hb = sample(&Sources { proc: dir.clone(), disk: dir.clone() }, 3);
        assert_eq!(hb.seq, 3);
        assert_eq!(hb.hostname, "vps-7");
        assert_eq!((hb.uptime_seconds, hb.load1, hb.load5, hb.load15), (351.92, 0.08, 0.03, 0.01));
        assert_eq!((hb.memory_total_bytes, hb.memory_available_bytes), (2015280 * 1024, 1747400 * 1024));
        assert_eq!(hb.gpus, 2);
        assert!(hb.disk_total_bytes > 0 && hb.disk_free_bytes <= hb.disk_total_bytes);
        assert!(hb.encode().contains("\"uptime_seconds\":351.92,\"load1\":0.08,\"load5\":0.03,\"load15\":0.01,"));
        // Nothing readable: zeros and an empty hostname, still a heartbeat.
        let empty = sample(&Sources { proc: dir.join("missing"), disk: dir.join("missing") }, 0);
        assert_eq!(empty.hostname, "");
        assert_eq!((empty.memory_total_bytes, empty.disk_total_bytes, empty.gpus), (0, 0, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
