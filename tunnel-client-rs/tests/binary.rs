//! The real binary: flags and KOHAKURIVER_* environment, the token from the environment, a clean exit on
//! SIGTERM with a WebSocket close, clear errors for bad settings, --log-file. Exec mode: tests/exec.rs.

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tunnel-client");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_configures_the_binary_and_sigterm_stops_it() {
    let mut runner = FakeRunner::start(RunnerOpts::flow()).await;
    let child = Command::new(BIN)
        .env_clear()
        .env("KOHAKURIVER_TUNNEL_URL", runner.url())
        .env("KOHAKURIVER_CONTAINER_ID", "kohakuriver-vps-42")
        .env("KOHAKURIVER_TUNNEL_TOKEN", "from-env")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tunnel-client");
    let session = runner.session().await;
    assert_eq!(session.path, "/ws/tunnel/kohakuriver-vps-42");
    assert_eq!(session.authorization.as_deref(), Some("Bearer from-env"));
    let echo = tcp_echo().await;
    let mut s = session.open_tcp(echo).await;
    s.tx.send(b"via the binary").await;
    assert_eq!(&s.rx.recv().await.expect("echo")[..], b"via the binary");

    let pid = child.id().expect("pid").to_string();
    let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(status.success());
    // The client closes the WebSocket (the session ends) and exits 0.
    session.wait_closed().await;
    let out = within("exit after SIGTERM", child.wait_with_output()).await.expect("wait");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit status {:?}, log:\n{log}", out.status);
    assert!(log.contains("connected to ws://"), "log:\n{log}");
    assert!(log.contains("conn 1 tcp:"), "one line per connection event:\n{log}");
}

#[tokio::test]
async fn bad_settings_are_named() {
    let cases: [(&[&str], &str); 4] = [
        (&["--container-id", "c"], "--runner-url"),
        (&["--runner-url", "http://x", "--container-id", "c"], "ws://"),
        (&["--runner-url", "ws://x", "--container-id", "c", "--log-level", "loud"], "--log-level"),
        (&["--runner-url", "ws://x", "--container-id", "c", "--max-backoff", "0"], "--max-backoff"),
    ];
    for (args, expected) in cases {
        let out = Command::new(BIN).env_clear().args(args).output().await.expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn gives_up_with_status_1_after_max_reconnect() {
    let port = closed_port().await;
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(BIN)
            .env_clear()
            .args(["--runner-url", &format!("ws://127.0.0.1:{port}"), "--container-id", "c"])
            .args(["--max-reconnect", "2", "--reconnect-delay", "0.01"])
            .output(),
    )
    .await
    .expect("timely exit")
    .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("giving up after 2 failed attempts"), "{err}");
}

#[tokio::test]
async fn log_file_takes_the_log_instead_of_stderr() {
    let port = closed_port().await;
    let log = std::env::temp_dir().join(format!("tunnel-client-binary-{}.log", std::process::id()));
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(BIN)
            .env_clear()
            .args(["--runner-url", &format!("ws://127.0.0.1:{port}"), "--container-id", "c"])
            .args(["--max-reconnect", "1", "--log-file"])
            .arg(&log)
            .output(),
    )
    .await
    .expect("timely exit")
    .expect("run");
    let written = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert!(written.contains("giving up after 1 failed attempts"), "{written}");
}
