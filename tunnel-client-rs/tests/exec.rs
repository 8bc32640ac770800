//! Exec mode with the real binary: `tunnel-client --exec [OPTIONS] -- COMMAND...` becomes COMMAND (same
//! PID, argv, exit status, signals, stdio) while a detached client keeps the tunnel in the background.
//!
//! Every test gives its processes a unique KOHAKURIVER_CONTAINER_ID; the `Marked` guard finds them by that
//! entry in /proc/<pid>/environ and kills whatever is left (exec mode's client retries for ever).

mod common;

use common::{tcp_echo, within, FakeRunner, RunnerOpts};
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tunnel-client");
const DEADLINE: Duration = Duration::from_secs(20);

/// The processes one test caused, recognised by a unique container id in their environment.
struct Marked {
    id: String,
    /// An address nothing listens on: the client keeps retrying (and logging) without a runner.
    dead_url: String,
}

impl Marked {
    fn new(test: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        Self { id: format!("exec-test-{}-{test}", std::process::id()), dead_url: format!("ws://127.0.0.1:{port}") }
    }

    /// The binary with a clean environment holding only PATH, the container id and `url` (if any).
    fn command(&self, url: Option<&str>) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        cmd.env("KOHAKURIVER_CONTAINER_ID", &self.id).env("KOHAKURIVER_TUNNEL_TOKEN", "exec-secret");
        if let Some(url) = url {
            cmd.env("KOHAKURIVER_TUNNEL_URL", url);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }

    /// `--exec [extra] -- sh -c SCRIPT` against the dead URL, fast retries so the client logs a lot.
    fn sh(&self, extra: &[&str], script: &str) -> Command {
        let mut cmd = self.command(Some(&self.dead_url));
        cmd.args(["--exec", "--reconnect-delay", "0.01", "--max-backoff", "0.05"]).args(extra);
        cmd.args(["--", "sh", "-c", script]);
        cmd
    }

    fn pids(&self) -> Vec<u32> {
        let entry = format!("KOHAKURIVER_CONTAINER_ID={}", self.id);
        let mut out = vec![];
        for dir in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Some(pid) = dir.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Ok(env) = std::fs::read(dir.path().join("environ")) {
                if env.split(|b| *b == 0).any(|e| e == entry.as_bytes()) {
                    out.push(pid);
                }
            }
        }
        out
    }

    /// Running tunnel clients of this test other than `command_pid` (which is the binary until it execs).
    fn clients(&self, command_pid: u32) -> Vec<u32> {
        self.pids()
            .into_iter()
            .filter(|p| *p != command_pid && stat(*p).is_some_and(|s| s.comm == "tunnel-client"))
            .collect()
    }

    /// Wait (bounded) until none of this test's processes is left.
    fn assert_none_left(&self) {
        let until = Instant::now() + Duration::from_secs(5);
        while !self.pids().is_empty() {
            assert!(Instant::now() < until, "processes left behind: {:?}", self.pids());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}.log", self.id))
    }
}

impl Drop for Marked {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        let _ = std::fs::remove_file(self.log_path());
    }
}

/// The fields of /proc/<pid>/stat the tests look at.
struct Stat {
    comm: String,
    ppid: u32,
    pgrp: u32,
    session: u32,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp session ...": comm may contain spaces and parentheses, so split at the last ')'.
    let (head, tail) = text.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let f: Vec<&str> = tail.split_whitespace().collect();
    Some(Stat { comm, ppid: f[1].parse().ok()?, pgrp: f[2].parse().ok()?, session: f[3].parse().ok()? })
}

/// `cmd.output()` with a deadline (a client holding the task's pipes open would make it hang).
fn output(mut cmd: Command) -> Output {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(cmd.output()));
    rx.recv_timeout(DEADLINE).expect("the command finished in time").expect("run the binary")
}

fn wait_output(child: Child) -> Output {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    rx.recv_timeout(DEADLINE).expect("the command finished in time").expect("wait")
}

/// Read stdout lines until `line` (the command is ready); returns the reader for the rest.
fn wait_for_line(child: &mut Child, line: &str) -> BufReader<std::process::ChildStdout> {
    let mut reader = BufReader::new(child.stdout.take().expect("stdout piped"));
    let mut got = String::new();
    reader.read_line(&mut got).expect("read stdout");
    assert_eq!(got.trim_end(), line);
    reader
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn exit_status_is_the_commands() {
    let m = Marked::new("status");
    let out = output(m.sh(&[], "exit 7"));
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
}

#[test]
fn argv_reaches_the_command_byte_for_byte() {
    let m = Marked::new("argv");
    let args: Vec<OsString> = vec![
        "with space".into(),
        "--".into(),
        "-x".into(),
        "".into(),
        "ünïcødé ✓".into(),
        "--exec".into(),
        "--log-file=/nope".into(),
        OsString::from_vec(vec![0xff, 0xfe, b'\n', b'\t']),
    ];
    let mut cmd = m.command(Some(&m.dead_url));
    cmd.args(["--exec", "--", "sh", "-c", r#"for a in "$0" "$@"; do printf '%s\0' "$a"; done"#]).args(&args);
    let out = output(cmd);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    // `sh -c SCRIPT a b...` makes `a` $0, so the script prints "$0" "$@": every argument, in order.
    let mut expected = vec![];
    for a in &args {
        expected.extend_from_slice(a.as_bytes());
        expected.push(0);
    }
    assert_eq!(out.stdout, expected);
}

#[test]
fn the_tasks_stdout_and_stderr_carry_only_the_commands_output() {
    let m = Marked::new("stdio");
    // The client fails to connect every few ms meanwhile and logs each attempt at --log-level debug.
    let out = output(m.sh(&["--log-level", "debug"], "sleep 0.3; echo out; echo err >&2"));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    // Without --log-file the background client writes nothing anywhere: it ran, though.
    assert!(!m.log_path().exists());
}

#[test]
fn the_command_is_the_process_that_was_started() {
    let m = Marked::new("pid");
    let mut cmd = m.sh(&[], "echo $$; grep SigIgn /proc/$$/status");
    let child = cmd.spawn().expect("spawn");
    let pid = child.id();
    let out = wait_output(child);
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some(pid.to_string().as_str()), "exec replaced the started process");
    // Rust ignores SIGPIPE at start-up; the command must get the default disposition back (bit 13 - 1).
    let ignored = lines.next().and_then(|l| l.strip_prefix("SigIgn:")).expect("SigIgn line").trim();
    let mask = u64::from_str_radix(ignored, 16).expect("hex mask");
    assert_eq!(mask & (1 << 12), 0, "SIGPIPE is ignored in the command: SigIgn {ignored}");
}

#[test]
fn sigterm_to_the_started_process_reaches_the_command() {
    let m = Marked::new("sigterm");
    let mut child =
        m.sh(&[], r#"trap "exit 42" TERM; echo ready; while :; do sleep 0.1; done"#).spawn().expect("spawn");
    let _rest = wait_for_line(&mut child, "ready");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let out = wait_output(child);
    assert_eq!(out.status.code(), Some(42), "stderr: {}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_client_serves_the_tunnel_detached_from_the_command() {
    let m = Marked::new("client");
    let mut runner = FakeRunner::start(RunnerOpts::flow()).await;
    let mut cmd = m.command(Some(&runner.url()));
    // Generic names belong to the task in exec mode: none of these may break or redirect the tunnel.
    cmd.env("LOG_LEVEL", "loud").env("CONTAINER_ID", "someone-else").env("RUNNER_URL", m.dead_url.as_str());
    cmd.args(["--exec", "--", "sh", "-c", "echo ready; while :; do sleep 0.1; done"]);
    let mut child = cmd.spawn().expect("spawn");
    let pid = child.id();
    let _rest = wait_for_line(&mut child, "ready");

    let session = within("the client connects", runner.session()).await;
    assert_eq!(session.path, format!("/ws/tunnel/{}", m.id));
    assert_eq!(session.authorization.as_deref(), Some("Bearer exec-secret"));
    let mut s = session.open_tcp(tcp_echo().await).await;
    s.tx.send(b"through the background client").await;
    assert_eq!(&within("echo", s.rx.recv()).await.expect("echo")[..], b"through the background client");

    let clients = m.clients(pid);
    assert_eq!(clients.len(), 1, "exactly one background client: {clients:?}");
    let (client, command) = (stat(clients[0]).expect("client stat"), stat(pid).expect("command stat"));
    assert_eq!(command.comm, "sh");
    assert_ne!(client.ppid, pid, "the client is not a child of the command");
    assert_ne!(client.pgrp, command.pgrp, "nor in its process group");
    assert_ne!(client.session, command.session, "nor in its session");
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{}/fd/{fd}", clients[0])).expect("fd link");
        assert_eq!(target, PathBuf::from("/dev/null"), "client fd {fd}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_shell_wait_in_the_command_does_not_wait_for_the_client() {
    let m = Marked::new("wait");
    let started = Instant::now();
    let out = output(m.sh(&[], "sleep 0.2 & wait; echo done"));
    assert_eq!(text(&out.stdout), "done\n");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[test]
fn a_command_that_cannot_run_gives_the_shell_status_and_leaves_no_client() {
    let m = Marked::new("missing");
    let mut cmd = m.command(Some(&m.dead_url));
    cmd.args(["--exec", "--", "no-such-command-for-exec-test", "arg"]);
    let out = output(cmd);
    assert_eq!(out.status.code(), Some(127));
    let err = text(&out.stderr);
    assert!(err.starts_with("tunnel-client: cannot run no-such-command-for-exec-test: "), "{err}");
    m.assert_none_left();

    let file = m.log_path(); // any file without the execute bit
    std::fs::write(&file, "not a program").expect("write");
    let mut cmd = m.command(Some(&m.dead_url));
    cmd.args(["--exec", "--"]).arg(&file);
    let out = output(cmd);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    m.assert_none_left();
}

#[test]
fn exec_without_a_command_is_a_usage_error() {
    let m = Marked::new("usage");
    for args in [&["--exec"][..], &["--exec", "--"], &["--", "true"]] {
        let mut cmd = m.command(Some(&m.dead_url));
        cmd.args(args);
        let out = output(cmd);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("Usage:"), "{args:?}");
    }
    m.assert_none_left();
}

#[test]
fn without_a_tunnel_url_the_command_runs_alone() {
    let m = Marked::new("nourl");
    let mut cmd = m.command(None);
    cmd.args(["--exec", "--", "sh", "-c", "echo ready; sleep 0.5; exit 5"]);
    let mut child = cmd.spawn().expect("spawn");
    let pid = child.id();
    let _rest = wait_for_line(&mut child, "ready");
    // Any client would have been forked before the command started.
    assert_eq!(m.clients(pid), Vec::<u32>::new());
    assert_eq!(wait_output(child).status.code(), Some(5));
}

#[test]
fn setup_errors_go_to_the_log_file_and_the_command_still_runs() {
    let m = Marked::new("setup");
    let log = m.log_path();
    let mut cmd = m.command(Some("http://not-a-websocket"));
    cmd.env("KOHAKURIVER_TUNNEL_LOG", &log).args(["--exec", "--", "sh", "-c", "echo ran; exit 3"]);
    let out = output(cmd);
    assert_eq!((out.status.code(), text(&out.stdout), text(&out.stderr)), (Some(3), "ran\n".into(), "".into()));

    let mut cmd = m.command(Some(&m.dead_url));
    cmd.args(["--exec", "--no-such-flag", "--log-file"]).arg(&log).args(["--", "sh", "-c", "exit 4"]);
    let out = output(cmd);
    assert_eq!((out.status.code(), text(&out.stderr)), (Some(4), "".into()));
    m.assert_none_left();

    let written = std::fs::read_to_string(&log).expect("log file");
    assert!(written.contains("runner url must start with ws://"), "{written}");
    assert!(written.contains("--no-such-flag"), "{written}");
    assert_eq!(written.matches("running the command without the tunnel").count(), 2, "{written}");
}

#[test]
fn the_log_file_receives_the_background_clients_log() {
    let m = Marked::new("logfile");
    let log = m.log_path();
    let mut child = m
        .sh(&[], "echo ready; while :; do sleep 0.1; done")
        .env("KOHAKURIVER_TUNNEL_LOG", &log)
        .spawn()
        .expect("spawn");
    let _rest = wait_for_line(&mut child, "ready");
    let until = Instant::now() + DEADLINE;
    loop {
        let written = std::fs::read_to_string(&log).unwrap_or_default();
        if written.contains("cannot reach") {
            assert!(written.contains(&format!("(pid {})", child.id())), "{written}");
            break;
        }
        assert!(Instant::now() < until, "no retry logged: {written}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = wait_output(child);
    assert_eq!(text(&out.stderr), "", "the log went to the file only");
}
