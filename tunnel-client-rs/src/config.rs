//! Command line and environment. `Args` is what clap parses; `Config` is the validated settings the
//! rest of the client uses (tests build a `Config` directly).

use crate::frame::DEFAULT_WINDOW;
use clap::{CommandFactory, FromArgMatches, Parser};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Environment variable holding the per-container secret. It is read from the environment only, never
/// from a flag, so the secret does not show up in `ps` output inside the container.
pub const TOKEN_ENV: &str = "KOHAKURIVER_TUNNEL_TOKEN";

#[derive(Parser, Debug)]
#[command(
    name = "tunnel-client",
    version,
    override_usage = "tunnel-client [OPTIONS]\n       tunnel-client --exec [OPTIONS] -- COMMAND [ARGS...]",
    about = "KohakuRiver in-container tunnel client: keeps one WebSocket to the runner and opens TCP/UDP \
             connections to services inside the container on demand.",
    after_help = "The per-container secret is read from KOHAKURIVER_TUNNEL_TOKEN and sent as \
                  `Authorization: Bearer <token>` on the WebSocket upgrade.\n\n\
                  Exec mode: `tunnel-client --exec [OPTIONS] -- COMMAND [ARGS...]` starts the client detached in \
                  the background and replaces itself with COMMAND (same PID, argv, exit status and signals). \
                  The client then retries for ever, logs only to --log-file, never makes COMMAND fail, and \
                  reads only the KOHAKURIVER_* variables (RUNNER_URL, CONTAINER_ID, LOG_LEVEL, ... belong to the \
                  task). Without KOHAKURIVER_TUNNEL_URL (or --runner-url) COMMAND runs alone."
)]
pub struct Args {
    /// Runner WebSocket base URL, ws:// or wss:// (falls back to KOHAKURIVER_TUNNEL_URL).
    #[arg(long, env = "RUNNER_URL")]
    pub runner_url: Option<String>,

    /// Container id this client registers for (falls back to KOHAKURIVER_CONTAINER_ID).
    #[arg(long, env = "CONTAINER_ID")]
    pub container_id: Option<String>,

    /// Initial reconnect backoff in seconds; doubles per failed attempt, with jitter.
    #[arg(long, env = "RECONNECT_DELAY", default_value_t = 0.15)]
    pub reconnect_delay: f64,

    /// Give up after this many consecutive failed connection attempts (0 = retry forever).
    #[arg(long, env = "MAX_RECONNECT", default_value_t = 0)]
    pub max_reconnect: u32,

    /// Cap of the reconnect backoff in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub max_backoff: f64,

    /// Exit (status 0) when the runner closes the WebSocket cleanly, instead of reconnecting.
    #[arg(long)]
    pub exit_on_close: bool,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Seconds between tunnel PINGs; a runner silent for 3 intervals is considered dead.
    #[arg(long, default_value_t = 10.0)]
    pub ping_interval: f64,

    /// Per-connection receive window announced in HELLO (bytes).
    #[arg(long, default_value_t = DEFAULT_WINDOW)]
    pub window: u32,

    /// Do not announce the flow-control extension (serve the seed protocol only).
    #[arg(long)]
    pub no_flow_control: bool,

    /// Without flow control: bytes a connection may queue towards a slow local service before it is closed.
    #[arg(long, default_value_t = 4 << 20)]
    pub legacy_buffer: usize,

    /// Seconds a UDP connection may stay idle (no datagram either way) before it is closed.
    #[arg(long, default_value_t = 120.0)]
    pub udp_idle_timeout: f64,

    /// Seconds a half-closed TCP connection (CLOSE went one way only) may stay idle before it is torn down
    /// (0 = no limit).
    #[arg(long, default_value_t = 300.0)]
    pub half_close_timeout: f64,

    /// Seconds allowed for the local TCP connect and for the WebSocket handshake.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,

    /// Runtime worker threads (0 = one per CPU, at most 2; 1 = a single-threaded runtime).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=64))]
    pub threads: u8,

    /// Extra PEM CA certificates to trust for wss:// (besides the built-in web PKI roots).
    #[arg(long, env = "KOHAKURIVER_TUNNEL_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Append the log to this file instead of stderr (in exec mode: instead of nowhere).
    #[arg(long, env = LOG_FILE_ENV)]
    pub log_file: Option<PathBuf>,

    /// Exec mode: run the client in the background and replace this process with the command after `--`.
    #[arg(long)]
    pub exec: bool,

    /// Guest agent (inside a VM VPS): send the runner a heartbeat (uptime, load, memory, disk, GPUs) right
    /// after each connect and then every --agent-interval, as text messages on the tunnel's WebSocket.
    #[arg(long)]
    pub agent: bool,

    /// Seconds between agent heartbeats (with --agent).
    #[arg(long, env = AGENT_INTERVAL_ENV, default_value_t = crate::agent::DEFAULT_INTERVAL)]
    pub agent_interval: f64,
}

/// Environment variable for `--agent-interval`.
pub const AGENT_INTERVAL_ENV: &str = "KOHAKURIVER_AGENT_INTERVAL";

/// Environment variable naming the log file (the runner's way to ask for a log in exec mode).
pub const LOG_FILE_ENV: &str = "KOHAKURIVER_TUNNEL_LOG";

/// Settings whose environment fallbacks have generic names (`RUNNER_URL`, `LOG_LEVEL`, ...). In exec mode
/// the environment is the task's: an image that sets `LOG_LEVEL=warning` or its own `CONTAINER_ID` must not
/// break or misdirect the tunnel, so these read flags only there.
const GENERIC_ENV_ARGS: [&str; 5] = ["runner_url", "container_id", "reconnect_delay", "max_reconnect", "log_level"];

impl Args {
    /// Parse the options of exec mode (the part of argv before `--`, program name first): the same flags,
    /// without the generic environment fallbacks.
    pub fn try_parse_exec(front: &[OsString]) -> Result<Self, clap::Error> {
        let mut cmd = Self::command();
        for id in GENERIC_ENV_ARGS {
            cmd = cmd.mut_arg(id, |a| a.env(None::<&'static str>));
        }
        Self::from_arg_matches(&cmd.try_get_matches_from(front)?)
    }
}

/// Split argv at its first literal `--`: the client's own arguments (program name first) and, if there was
/// a `--`, everything after it verbatim (the command of exec mode, which may itself contain `--`).
pub fn split_command(mut argv: Vec<OsString>) -> (Vec<OsString>, Option<Vec<OsString>>) {
    // argv[0] is the program name, never the separator.
    match argv.iter().skip(1).position(|a| a == "--") {
        Some(i) => {
            let command = argv.split_off(i + 2);
            argv.pop();
            (argv, Some(command))
        }
        None => (argv, None),
    }
}

/// Where the log should go according to `front` and the environment, found without clap: used to report
/// that clap rejected `front` in exec mode, where stderr is the task's.
pub fn log_file_hint(front: &[OsString], env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let mut args = front.iter().skip(1);
    while let Some(a) = args.next() {
        if a == "--log-file" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = a.to_str().and_then(|a| a.strip_prefix("--log-file=")) {
            return Some(PathBuf::from(path));
        }
    }
    env(LOG_FILE_ENV).filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// `ws://` or `wss://` base URL without a trailing slash.
    pub runner_url: String,
    pub container_id: String,
    pub token: Option<String>,
    pub reconnect_delay: Duration,
    pub max_backoff: Duration,
    pub max_reconnect: u32,
    pub exit_on_close: bool,
    pub ping_interval: Duration,
    pub window: u32,
    pub flow_control: bool,
    pub legacy_buffer: usize,
    pub udp_idle_timeout: Duration,
    pub half_close_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    /// Guest agent mode: the heartbeat interval (None: no heartbeats).
    pub agent: Option<Duration>,
}

impl Config {
    /// Defaults for everything but the two required settings (what tests and the bench start from).
    pub fn new(runner_url: &str, container_id: &str) -> Result<Self, String> {
        Ok(Self {
            runner_url: validate_url(runner_url)?,
            container_id: validate_container_id(container_id)?,
            token: None,
            reconnect_delay: Duration::from_millis(150),
            max_backoff: Duration::from_secs(5),
            max_reconnect: 0,
            exit_on_close: false,
            ping_interval: Duration::from_secs(10),
            window: DEFAULT_WINDOW,
            flow_control: true,
            legacy_buffer: 4 << 20,
            udp_idle_timeout: Duration::from_secs(120),
            half_close_timeout: Some(Duration::from_secs(300)),
            connect_timeout: Duration::from_secs(10),
            ca_file: None,
            agent: None,
        })
    }

    /// Combine parsed arguments with the KOHAKURIVER_* fallbacks and validate everything, naming the
    /// offending setting in the error.
    pub fn from_args(args: Args, env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let url = args
            .runner_url
            .or_else(|| env("KOHAKURIVER_TUNNEL_URL"))
            .ok_or("--runner-url (or RUNNER_URL / KOHAKURIVER_TUNNEL_URL) is required")?;
        let id = args
            .container_id
            .or_else(|| env("KOHAKURIVER_CONTAINER_ID"))
            .ok_or("--container-id (or CONTAINER_ID / KOHAKURIVER_CONTAINER_ID) is required")?;
        let mut cfg = Self::new(&url, &id)?;
        cfg.token = env(TOKEN_ENV).filter(|t| !t.is_empty());
        if let Some(t) = &cfg.token {
            // The token goes into an HTTP header: refuse what would break or inject into it.
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!("{TOKEN_ENV} must be printable ASCII without spaces"));
            }
        }
        // Both positive: a zero delay would make the reconnect loop spin.
        cfg.reconnect_delay = seconds("--reconnect-delay", args.reconnect_delay)?;
        cfg.max_backoff = seconds("--max-backoff", args.max_backoff)?;
        if cfg.max_backoff < cfg.reconnect_delay {
            return Err("--max-backoff must not be smaller than --reconnect-delay".into());
        }
        cfg.max_reconnect = args.max_reconnect;
        cfg.exit_on_close = args.exit_on_close;
        cfg.ping_interval = seconds("--ping-interval", args.ping_interval)?;
        if args.window == 0 {
            return Err("--window must be at least 1 byte".into());
        }
        cfg.window = args.window;
        cfg.flow_control = !args.no_flow_control;
        if args.legacy_buffer < 64 * 1024 {
            return Err("--legacy-buffer must be at least 65536 bytes".into());
        }
        cfg.legacy_buffer = args.legacy_buffer;
        cfg.udp_idle_timeout = seconds("--udp-idle-timeout", args.udp_idle_timeout)?;
        cfg.half_close_timeout = if args.half_close_timeout == 0.0 {
            None
        } else {
            Some(seconds("--half-close-timeout", args.half_close_timeout)?)
        };
        cfg.connect_timeout = seconds("--connect-timeout", args.connect_timeout)?;
        cfg.ca_file = args.ca_file;
        let interval = seconds("--agent-interval", args.agent_interval)?;
        cfg.agent = args.agent.then_some(interval);
        Ok(cfg)
    }

    /// `{runner_url}/ws/tunnel/{container_id}`.
    pub fn tunnel_url(&self) -> String {
        format!("{}/ws/tunnel/{}", self.runner_url, self.container_id)
    }
}

/// A duration flag in seconds. Sub-millisecond values are typos, not intentions (and a zero delay or interval
/// would spin a loop); "no limit" settings handle 0 before calling this.
fn seconds(name: &str, value: f64) -> Result<Duration, String> {
    if !value.is_finite() || !(0.001..=86_400.0).contains(&value) {
        return Err(format!("{name} must be between 0.001 and 86400 seconds, got {value}"));
    }
    Ok(Duration::from_secs_f64(value))
}

fn validate_url(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| format!("runner url must start with ws:// or wss://, got {url:?}"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("runner url has no host: {url:?}"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#') {
        return Err(format!("runner url must be a plain base URL (no spaces, query or fragment): {url:?}"));
    }
    Ok(url.to_string())
}

/// Docker container names are `[a-zA-Z0-9][a-zA-Z0-9_.-]*`; anything else would need escaping in the URL
/// path, so it is rejected rather than guessed at.
fn validate_container_id(id: &str) -> Result<String, String> {
    let ok = id.len() <= 255
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        return Err(format!("container id must match [a-zA-Z0-9][a-zA-Z0-9_.-]*, got {id:?}"));
    }
    Ok(id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let args = Args::try_parse_from(std::iter::once("tunnel-client").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_args(args, |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn fallbacks_and_token() {
        let cfg = parse(
            &[],
            &[
                ("KOHAKURIVER_TUNNEL_URL", "ws://172.30.0.1:8001/"),
                ("KOHAKURIVER_CONTAINER_ID", "kohakuriver-task-1"),
                ("KOHAKURIVER_TUNNEL_TOKEN", "s3cret"),
            ],
        )
        .expect("valid");
        assert_eq!(cfg.tunnel_url(), "ws://172.30.0.1:8001/ws/tunnel/kohakuriver-task-1");
        assert_eq!(cfg.token.as_deref(), Some("s3cret"));
        assert_eq!(cfg.max_backoff, Duration::from_secs(5));
    }

    #[test]
    fn flags_win_and_errors_name_the_setting() {
        let cfg =
            parse(&["--runner-url", "wss://r:1", "--container-id", "c1", "--max-backoff", "2"], &[]).expect("valid");
        assert_eq!(cfg.tunnel_url(), "wss://r:1/ws/tunnel/c1");
        assert!(parse(&["--container-id", "c"], &[]).unwrap_err().contains("--runner-url"));
        assert!(parse(&["--runner-url", "http://x", "--container-id", "c"], &[]).unwrap_err().contains("ws://"));
        assert!(parse(&["--runner-url", "ws://x", "--container-id", "../etc"], &[])
            .unwrap_err()
            .contains("container id"));
        let e = parse(&["--runner-url", "ws://x", "--container-id", "c", "--ping-interval", "0"], &[]).unwrap_err();
        assert!(e.contains("--ping-interval"));
    }

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn agent_mode_and_its_interval() {
        let base = [("KOHAKURIVER_TUNNEL_URL", "ws://r:1"), ("KOHAKURIVER_CONTAINER_ID", "vps-1")];
        assert_eq!(parse(&[], &base).expect("valid").agent, None);
        assert_eq!(parse(&["--agent"], &base).expect("valid").agent, Some(Duration::from_secs(5)));
        let cfg = parse(&["--agent", "--agent-interval", "0.2"], &base).expect("valid");
        assert_eq!(cfg.agent, Some(Duration::from_millis(200)));
        let args = Args::try_parse_from(["tc", "--agent"]).expect("parse");
        assert_eq!(args.agent_interval, crate::agent::DEFAULT_INTERVAL);
        assert!(parse(&["--agent", "--agent-interval", "0"], &base).unwrap_err().contains("--agent-interval"));
        // The interval is checked even without --agent: a typo should not wait for the day it is used.
        assert!(parse(&["--agent-interval=-1"], &base).unwrap_err().contains("--agent-interval"));
    }

    #[test]
    fn argv_splits_at_the_first_separator_only() {
        let (front, command) = split_command(os(&["tc", "--exec", "--", "sh", "--", "-x", ""]));
        assert_eq!(front, os(&["tc", "--exec"]));
        assert_eq!(command, Some(os(&["sh", "--", "-x", ""])));
        assert_eq!(split_command(os(&["tc", "--exec", "--"])), (os(&["tc", "--exec"]), Some(vec![])));
        assert_eq!(split_command(os(&["tc", "--exec"])), (os(&["tc", "--exec"]), None));
        // The program name is never taken for the separator.
        assert_eq!(split_command(os(&["--", "x"])), (os(&["--", "x"]), None));
    }

    #[test]
    fn exec_parsing_drops_the_generic_environment_fallbacks() {
        // The environment itself is exercised with the real binary (tests/exec.rs); here: the ids exist and
        // the reset takes effect (a renamed field would otherwise make `mut_arg` panic at run time).
        let mut cmd = Args::command();
        for id in GENERIC_ENV_ARGS {
            assert!(cmd.get_arguments().any(|a| a.get_id() == id && a.get_env().is_some()), "{id} has an env");
            cmd = cmd.mut_arg(id, |a| a.env(None::<&'static str>));
            assert!(cmd.get_arguments().any(|a| a.get_id() == id && a.get_env().is_none()), "{id} reset");
        }
        let args = Args::try_parse_exec(&os(&["tc", "--exec", "--log-file", "/x.log"])).expect("parse");
        assert!(args.exec);
        assert_eq!(args.log_file, Some(PathBuf::from("/x.log")));
        assert!(Args::try_parse_exec(&os(&["tc", "--exec", "--bogus"])).is_err());
    }

    #[test]
    fn log_file_hint_prefers_the_flag() {
        let env = |k: &str| (k == LOG_FILE_ENV).then(|| "/env.log".to_string());
        assert_eq!(log_file_hint(&os(&["tc", "--log-file", "/a"]), env), Some(PathBuf::from("/a")));
        assert_eq!(log_file_hint(&os(&["tc", "--bad", "--log-file=/b"]), env), Some(PathBuf::from("/b")));
        assert_eq!(log_file_hint(&os(&["tc", "--bad"]), env), Some(PathBuf::from("/env.log")));
        assert_eq!(log_file_hint(&os(&["tc"]), |_| None), None);
    }
}
