//! Throughput of one TCP connection through the real tunnel-client binary, against an in-process runner
//! stand-in, compared with raw loopback TCP measured in the same run. Driven by bench/tunnel_client.py;
//! prints one JSON object on stdout.
//!
//!   cargo run --release --example bench -- --binary target/release/tunnel-client --mib 1024
//!
//! Directions: "to_container" = runner -> client -> local service (an upload into the container),
//! "from_container" = local service -> client -> runner (a download from it).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PIECE: usize = 1 << 20;

struct Args {
    binary: String,
    bytes: usize,
    /// Per-connection window both sides announce (flow-control mode).
    window: u32,
}

fn args() -> Args {
    let mut a = Args {
        binary: "target/release/tunnel-client".into(),
        bytes: 1 << 30,
        window: tunnel_client::frame::DEFAULT_WINDOW,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--binary" => a.binary = it.next().expect("--binary PATH"),
            "--mib" => a.bytes = it.next().and_then(|v| v.parse::<usize>().ok()).expect("--mib N") << 20,
            "--window" => a.window = it.next().and_then(|v| v.parse().ok()).expect("--window BYTES"),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn mib_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

/// A local service that reads and discards `total` bytes, then reports the time it finished.
async fn sink(total: usize) -> (u16, tokio::sync::oneshot::Receiver<Instant>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (done, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        while got < total {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        assert_eq!(got, total, "sink received everything");
        let _ = done.send(Instant::now());
    });
    (port, rx)
}

/// A local service that writes `total` bytes from `data` (repeated) and closes.
async fn source(total: usize, data: Arc<Vec<u8>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut sent = 0;
        while sent < total {
            let n = (total - sent).min(data.len());
            if s.write_all(&data[..n]).await.is_err() {
                return;
            }
            sent += n;
        }
        let _ = s.shutdown().await;
    });
    port
}

async fn raw_loopback(total: usize, data: Arc<Vec<u8>>) -> f64 {
    let (port, done) = sink(total).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = (total - sent).min(data.len());
        s.write_all(&data[..n]).await.expect("write");
        sent += n;
    }
    let end = done.await.expect("sink");
    mib_s(total, (end - t0).as_secs_f64())
}

#[tokio::main]
async fn main() {
    let a = args();
    let data = Arc::new(pattern(PIECE, 42));
    // Warm-up, then the baseline.
    raw_loopback(64 << 20, data.clone()).await;
    let raw = raw_loopback(a.bytes, data.clone()).await;

    // Flow-control mode, as with the project's runner. (Against a seed-protocol runner nothing paces the
    // sender, so an upload benchmark would only measure how fast the bounded buffer overflows.)
    let opts = RunnerOpts { hello: Some(a.window), ..RunnerOpts::flow() };
    let window = a.window.to_string();
    let mut runner = FakeRunner::start(opts).await;
    let mut child = tokio::process::Command::new(&a.binary)
        .args(["--runner-url", &runner.url(), "--container-id", "bench", "--log-level", "warn", "--window", &window])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", a.binary));
    let session = runner.session().await;

    // Runner -> container.
    let (port, done) = sink(a.bytes).await;
    let mut s = session.open_tcp(port).await;
    s.tx.chunk = 256 * 1024;
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < a.bytes {
        let n = (a.bytes - sent).min(PIECE);
        s.tx.send(&data[..n]).await;
        sent += n;
    }
    let end = within("upload", done).await.expect("sink");
    let to_container = mib_s(a.bytes, (end - t0).as_secs_f64());
    s.tx.close();

    // Container -> runner.
    let port = source(a.bytes, data.clone()).await;
    let t0 = Instant::now();
    let mut s = session.open_tcp(port).await;
    let mut got = 0;
    while let Some(b) = s.rx.recv().await {
        got += b.len();
    }
    let from_container = mib_s(got, t0.elapsed().as_secs_f64());
    assert_eq!(got, a.bytes, "download size");

    // SIGTERM lets the client close the tunnel the way `docker stop` would; SIGKILL only if it hangs.
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    }
    if tokio::time::timeout(std::time::Duration::from_secs(5), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
    println!(
        "{{\"bytes\": {}, \"window\": {}, \"raw_loopback_mib_s\": {raw:.1}, \"to_container_mib_s\": {to_container:.1}, \"from_container_mib_s\": {from_container:.1}}}",
        a.bytes,
        a.window,
    );
}
