//! End-to-end tests of the client against an in-test WebSocket server playing the runner, with local
//! services on 127.0.0.1 playing the container's services. Every data-path test runs twice: with the
//! flow-control extension negotiated, and against a seed-protocol runner that never sends HELLO.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tunnel_client::frame::{self, Hello, MsgType, Proto, DEFAULT_WINDOW, FEATURE_FLOW_CONTROL};

async fn setup(opts: RunnerOpts) -> (FakeRunner, RunnerSession, Client) {
    let mut runner = FakeRunner::start(opts).await;
    let client = Client::start(config(&runner));
    let session = runner.session().await;
    assert_eq!(session.flow_on(), opts.hello.is_some(), "negotiation");
    (runner, session, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_carries_path_token_and_hello() {
    let (_runner, session, client) = setup(RunnerOpts::flow()).await;
    assert_eq!(session.path, "/ws/tunnel/kohakuriver-task-1");
    assert_eq!(session.authorization.as_deref(), Some("Bearer test-secret"));
    assert_eq!(session.client_hello, Some(Hello { features: FEATURE_FLOW_CONTROL, window: DEFAULT_WINDOW }));
    client.stop().await;

    // Without a token there is no Authorization header; with --no-flow-control no HELLO either.
    let mut runner = FakeRunner::start(RunnerOpts::flow()).await;
    let mut cfg = config(&runner);
    cfg.token = None;
    cfg.flow_control = false;
    let client = Client::start(cfg);
    let session = runner.session().await;
    assert_eq!(session.authorization, None);
    assert_eq!(session.client_hello, None);
    assert!(!session.flow_on());
    let echo = tcp_echo().await;
    let mut s = session.open_tcp(echo).await;
    s.tx.send(b"seed protocol").await;
    assert_eq!(&s.rx.recv().await.expect("echo")[..], b"seed protocol");
    client.stop().await;
}

async fn echo_64mib(opts: RunnerOpts) {
    const TOTAL: usize = 64 << 20;
    let (_runner, session, client) = setup(opts).await;
    let echo = tcp_echo().await;
    let RStream { tx, mut rx } = session.open_tcp(echo).await;
    let started = Instant::now();
    // Without flow control nothing in the tunnel paces a sender, so the sender paces itself the way real
    // bulk protocols do (ssh keeps at most a 2 MiB channel window in flight): at most 2 MiB unechoed.
    let paced = opts.hello.is_none();
    let echoed = std::sync::Arc::new(tokio::sync::watch::channel(0usize).0);
    let progress = echoed.clone();
    let sender = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut sent = 0usize;
        let mut progress = progress.subscribe();
        for i in 0..64u64 {
            let chunk = pattern(1 << 20, i + 1);
            hasher.update(&chunk);
            for piece in chunk.chunks(256 * 1024) {
                if paced {
                    let _ = progress.wait_for(|&e| sent - e <= (2 << 20) - piece.len()).await;
                }
                tx.send(piece).await;
                sent += piece.len();
            }
        }
        tx.close();
        hasher.finalize()
    });
    let mut hasher = Sha256::new();
    let mut received = 0usize;
    while let Some(b) = rx.recv().await {
        received += b.len();
        hasher.update(&b);
        echoed.send_replace(received);
    }
    let sent_digest = within("sender", sender).await.expect("sender task");
    assert_eq!(received, TOTAL, "echoed byte count");
    assert_eq!(hasher.finalize(), sent_digest, "sha256 of the echo");
    let secs = started.elapsed().as_secs_f64();
    eprintln!("64 MiB echo ({}): {secs:.2} s, {:.0} MiB/s each way", mode(&opts), 64.0 / secs);
    client.stop().await;
}

fn mode(opts: &RunnerOpts) -> &'static str {
    if opts.hello.is_some() {
        "flow control"
    } else {
        "seed protocol"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_64mib_checksummed_flow() {
    echo_64mib(RunnerOpts::flow()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_64mib_checksummed_legacy() {
    echo_64mib(RunnerOpts::legacy()).await;
}

async fn concurrent_200(opts: RunnerOpts) {
    let (_runner, session, client) = setup(opts).await;
    let session = std::sync::Arc::new(session);
    let echo = tcp_echo().await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let session = session.clone();
        set.spawn(async move {
            let RStream { tx, mut rx } = session.open_tcp(echo).await;
            let data = pattern(32 * 1024 + i as usize, i);
            let expected = data.clone();
            let send = tokio::spawn(async move {
                tx.send(&data).await;
                tx.close();
            });
            let got = rx.read_to_end().await;
            send.await.expect("send");
            assert_eq!(got.len(), expected.len(), "connection {i} length");
            assert!(got == expected, "connection {i} content");
        });
    }
    while let Some(r) = within("200 connections", set.join_next()).await {
        r.expect("connection task");
    }
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_flow() {
    concurrent_200(RunnerOpts::flow()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_legacy() {
    concurrent_200(RunnerOpts::legacy()).await;
}

async fn udp_echo_roundtrips(opts: RunnerOpts) {
    let (_runner, session, client) = setup(opts).await;
    let port = udp_echo().await;
    let RStream { tx, mut rx } = session.open(Proto::Udp, port).await.expect("udp CONNECTED");
    for (i, size) in [1usize, 0, 100, 1400, 9000, 60000, 65507].into_iter().enumerate() {
        let datagram = pattern(size, i as u64 + 1);
        tx.send_datagram(&datagram);
        let echoed = rx.recv().await.expect("echoed datagram");
        assert_eq!(echoed.len(), size, "one DATA per datagram, boundaries kept");
        assert!(echoed[..] == datagram[..]);
    }
    // CLOSE from the runner ends the UDP connection; the client answers with CLOSE.
    tx.close();
    assert_eq!(rx.recv().await, None);
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_flow() {
    udp_echo_roundtrips(RunnerOpts::flow()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_legacy() {
    udp_echo_roundtrips(RunnerOpts::legacy()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_datagrams_beyond_credit_are_dropped() {
    // A 256 KiB window (not DEFAULT_WINDOW, which may change): the arithmetic below depends on it.
    let opts = RunnerOpts { hello: Some(256 * 1024), auto_credit: false, auto_pong: true };
    let mut runner = FakeRunner::start(opts).await;
    let mut cfg = config(&runner);
    cfg.udp_idle_timeout = Duration::from_millis(1000);
    let client = Client::start(cfg);
    let session = runner.session().await;
    // We (the runner) announced 256 KiB: the client may send that much before we return credit.
    let port = udp_echo().await;
    let RStream { tx, mut rx } = session.open(Proto::Udp, port).await.expect("udp");
    let big = pattern(60000, 1);
    for _ in 0..4 {
        tx.send_datagram(&big);
        assert_eq!(rx.recv().await.map(|b| b.len()), Some(60000));
    }
    // 240000 of 262144 bytes used: the next 60000-byte echo exceeds the credit and is dropped.
    tx.send_datagram(&big);
    assert!(rx.recv_timeout(Duration::from_millis(300)).await.is_err(), "datagram beyond credit must be dropped");
    rx.grant(120_000);
    tx.send_datagram(&big);
    assert_eq!(rx.recv().await.map(|b| b.len()), Some(60000));
    // Idle expiry closes the connection with CLOSE.
    assert_eq!(within("idle close", rx.recv()).await, None);
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_port_gives_error() {
    let (_runner, session, client) = setup(RunnerOpts::flow()).await;
    let port = closed_port().await;
    let reason = session.open(Proto::Tcp, port).await.err().expect("ERROR for a refused port");
    assert!(reason.contains("refused"), "reason: {reason}");
    // Port 0 is refused too, and the tunnel keeps working afterwards.
    let reason = session.open(Proto::Tcp, 0).await.err().expect("ERROR for port 0");
    assert!(reason.contains("port 0"), "reason: {reason}");
    let echo = tcp_echo().await;
    let mut s = session.open_tcp(echo).await;
    s.tx.send(b"still fine").await;
    assert_eq!(&s.rx.recv().await.expect("echo")[..], b"still fine");
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_restart_reconnects_and_closes_old_connections() {
    let mut runner = FakeRunner::start(RunnerOpts::flow()).await;
    let addr = runner.addr;
    let client = Client::start(config(&runner));
    let session = runner.session().await;
    let (watch_port, mut ended) = tcp_watch_eof().await;
    let _old = session.open_tcp(watch_port).await;

    runner.kill().await;
    drop(session);
    // The old local connection is closed once the tunnel is lost.
    within("old local connection closed", ended.recv()).await.expect("eof");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let restarted = Instant::now();
    let mut runner = FakeRunner::start_on(addr, RunnerOpts::flow()).await;
    let session = runner.session().await;
    let echo = tcp_echo().await;
    let mut s = session.open_tcp(echo).await;
    s.tx.send(b"after restart").await;
    assert_eq!(&s.rx.recv().await.expect("echo")[..], b"after restart");
    let took = restarted.elapsed();
    assert!(took < Duration::from_secs(2), "reconnect and a working connection took {took:?}");
    client.stop().await;
}

async fn stalled_reader(opts: RunnerOpts) {
    let mut runner = FakeRunner::start(opts).await;
    let mut cfg = config(&runner);
    cfg.legacy_buffer = 256 * 1024;
    let client = Client::start(cfg);
    let session = runner.session().await;
    let (stalled_port, _kept) = tcp_stalled().await;
    let echo = tcp_echo().await;

    let RStream { tx: stalled_tx, rx: mut stalled_rx } = session.open_tcp(stalled_port).await;
    let flood = tokio::spawn(async move {
        // With flow control this blocks once the client's window is used up; without, it is all sent.
        stalled_tx.send(&pattern(16 << 20, 3)).await;
        stalled_tx
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut s = session.open_tcp(echo).await;
    let mut worst = Duration::ZERO;
    for i in 0..50u64 {
        let msg = pattern(1024, i);
        let t = Instant::now();
        s.tx.send(&msg).await;
        let mut got = Vec::new();
        while got.len() < msg.len() {
            got.extend_from_slice(&s.rx.recv().await.expect("echo"));
        }
        worst = worst.max(t.elapsed());
        assert!(got == msg);
    }
    eprintln!("stalled reader ({}): worst echo round trip on the other connection {worst:?}", mode(&opts));
    assert!(worst < Duration::from_millis(500), "the other connection was delayed: {worst:?}");

    if opts.hello.is_some() {
        // Flow control: the runner side is held back by credit, nothing was dropped or closed.
        assert!(!flood.is_finished(), "sender must be waiting for WINDOW credit");
        assert!(stalled_rx.recv_timeout(Duration::from_millis(100)).await.is_err(), "no CLOSE under flow control");
        // A runner that ignores the window gets that one connection closed: one DATA frame larger than the
        // window is a violation whatever the kernel buffers have absorbed.
        flood.abort();
        let overrun = session.open_tcp(stalled_port).await;
        overrun.tx.send_unchecked(&pattern(DEFAULT_WINDOW as usize + 1, 9));
        let mut overrun_rx = overrun.rx;
        assert_eq!(overrun_rx.recv().await, None, "window overrun must close the connection");
    } else {
        // Seed protocol: the bounded buffer overflowed and the client closed just that connection.
        assert_eq!(stalled_rx.recv().await, None, "overflowing connection gets CLOSE");
        within("flood sender", flood).await.expect("flood");
    }
    // The other connection is unaffected throughout.
    s.tx.send(b"still here").await;
    assert_eq!(&s.rx.recv().await.expect("echo")[..], b"still here");
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_local_reader_does_not_delay_others_flow() {
    stalled_reader(RunnerOpts::flow()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_local_reader_does_not_delay_others_legacy() {
    stalled_reader(RunnerOpts::legacy()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_respects_the_runner_window() {
    const WINDOW: u32 = 16 * 1024;
    let opts = RunnerOpts { hello: Some(WINDOW), auto_credit: false, auto_pong: true };
    let (_runner, session, client) = setup(opts).await;
    let total = 1 << 20;
    let source = tcp_source(total).await;
    let RStream { tx: _tx, mut rx } = session.open_tcp(source).await;
    let mut got = Vec::new();
    while let Ok(Some(b)) = rx.recv_timeout(Duration::from_millis(300)).await {
        got.extend_from_slice(&b);
    }
    assert_eq!(got.len(), WINDOW as usize, "exactly one window in flight before credit");
    rx.grant(WINDOW);
    while let Ok(Some(b)) = rx.recv_timeout(Duration::from_millis(300)).await {
        got.extend_from_slice(&b);
    }
    assert_eq!(got.len(), 2 * WINDOW as usize, "one more window after one grant");
    rx.grant(u32::MAX);
    while let Some(b) = rx.recv().await {
        got.extend_from_slice(&b);
    }
    assert!(got == pattern(total, 7), "all data, in order, then CLOSE");
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_both_ways() {
    for opts in [RunnerOpts::flow(), RunnerOpts::legacy()] {
        let (_runner, session, client) = setup(opts).await;
        let port = tcp_read_then_answer().await;
        let RStream { tx, mut rx } = session.open_tcp(port).await;
        let body = pattern(3 << 20, 5);
        tx.send(&body).await;
        // Runner CLOSE = EOF for the local service, which then answers on the still-open other direction,
        // and its EOF comes back as CLOSE after the last data.
        tx.close();
        let answer = rx.read_to_end().await;
        let expected = format!("{} {}", body.len(), hex::encode(Sha256::digest(&body)));
        assert_eq!(String::from_utf8_lossy(&answer), expected, "{}", mode(&opts));
        client.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_close_before_connected_are_kept_in_order() {
    for opts in [RunnerOpts::flow(), RunnerOpts::legacy()] {
        let (_runner, session, client) = setup(opts).await;
        let port = tcp_read_then_answer().await;
        let body = pattern(100_000, 11);
        let mut s = session.open_pipelined(port, &body).await;
        let answer = s.rx.read_to_end().await;
        let expected = format!("{} {}", body.len(), hex::encode(Sha256::digest(&body)));
        assert_eq!(String::from_utf8_lossy(&answer), expected, "{}", mode(&opts));
        client.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_half_closed_connection_is_reaped() {
    let mut runner = FakeRunner::start(RunnerOpts::flow()).await;
    let mut cfg = config(&runner);
    cfg.half_close_timeout = Some(Duration::from_millis(300));
    let client = Client::start(cfg);
    let session = runner.session().await;
    // The service never reads and never closes: after the runner's CLOSE the connection is half-closed for
    // good, and the client gives up on it once it has been idle for the timeout.
    let (port, _kept) = tcp_stalled().await;
    let mut s = session.open_tcp(port).await;
    let closed = Instant::now();
    s.tx.close();
    assert_eq!(s.rx.recv().await, None, "client closes the idle half-closed connection");
    let took = closed.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "took {took:?}");
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_and_junk_is_ignored() {
    let (_runner, mut session, client) = setup(RunnerOpts::legacy()).await;
    session.send_raw(frame::encode(MsgType::Ping, Proto::Tcp, 7, 0, b""));
    let pong = session.next_control().await;
    assert_eq!((pong.kind, pong.client_id), (MsgType::Pong, 7));

    // Unknown type, short frame, unknown proto, text message, frames for unknown ids: all ignored.
    session.send_raw(bytes::Bytes::from_static(&[0x0a, 0, 0, 0, 0, 1, 0, 0, 0xab, 0xcd]));
    session.send_raw(bytes::Bytes::from_static(&[0x03, 0, 0, 0, 0]));
    session.send_raw(bytes::Bytes::from_static(&[0x01, 0x02, 0, 0, 0, 9, 0, 80]));
    session.send_message(Message::text("CONNECTED"));
    session.send_raw(frame::encode(MsgType::Data, Proto::Tcp, 999, 0, b"nobody"));
    session.send_raw(frame::encode(MsgType::Close, Proto::Tcp, 999, 0, b""));
    session.send_raw(frame::encode_window(Proto::Tcp, 999, 10));
    session.send_raw(frame::encode(MsgType::Connected, Proto::Tcp, 999, 0, b""));
    session.send_raw(Hello { features: 1, window: 5 }.encode());

    session.send_raw(frame::encode(MsgType::Ping, Proto::Udp, 8, 0, b""));
    let pong = session.next_control().await;
    assert_eq!((pong.kind, pong.proto, pong.client_id), (MsgType::Pong, Proto::Udp, 8));
    let echo = tcp_echo().await;
    let mut s = session.open_tcp(echo).await;
    s.tx.send(b"ok").await;
    assert_eq!(&s.rx.recv().await.expect("echo")[..], b"ok");
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pings_and_reconnects_when_runner_goes_silent() {
    let opts = RunnerOpts::flow();
    let mut runner = FakeRunner::start(opts).await;
    let mut cfg = config(&runner);
    cfg.ping_interval = Duration::from_millis(100);
    let client = Client::start(cfg);
    let mut session = runner.session().await;
    let ping = session.next_control().await;
    assert_eq!((ping.kind, ping.client_id), (MsgType::Ping, 0));

    session.freeze(true);
    let frozen = Instant::now();
    let _second = runner.session().await;
    let took = frozen.elapsed();
    // 3 silent intervals (300 ms) plus at most one interval of tick granularity plus a short backoff.
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(2), "took {took:?}");
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_close_reconnects_unless_exit_on_close() {
    let (mut runner, session, client) = setup(RunnerOpts::flow()).await;
    session.close();
    let _again = runner.session().await;
    assert!(!client.task.is_finished());
    client.stop().await;

    let mut runner = FakeRunner::start(RunnerOpts::flow()).await;
    let mut cfg = config(&runner);
    cfg.exit_on_close = true;
    let client = Client::start(cfg);
    let session = runner.session().await;
    session.close();
    let result = within("client exit", client.task).await.expect("join");
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_after_max_reconnect_failures() {
    let port = closed_port().await;
    let mut cfg = tunnel_client::config::Config::new(&format!("ws://127.0.0.1:{port}"), "c1").expect("cfg");
    cfg.max_reconnect = 3;
    cfg.reconnect_delay = Duration::from_millis(10);
    let client = Client::start(cfg);
    let result = within("give up", client.task).await.expect("join");
    match result {
        Err(tunnel_client::RunError::GaveUp { attempts, .. }) => assert_eq!(attempts, 3),
        other => panic!("expected GaveUp, got {other:?}"),
    }
}

/// ERROR from the runner aborts that connection at once (the user's session ended): the local service sees
/// its socket closed, and the id can be used again by a new CONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_error_aborts_the_connection() {
    for opts in [RunnerOpts::flow(), RunnerOpts::legacy()] {
        let (_runner, session, client) = setup(opts).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let RStream { tx, rx: _rx } = session.open_tcp(port).await;
        let (mut accepted, _) = within("accept", listener.accept()).await.unwrap();
        session.send_raw(frame::encode(MsgType::Error, Proto::Tcp, tx.id, 0, b"session ended"));
        let mut buf = [0u8; 16];
        let n = within("local EOF after ERROR", async {
            use tokio::io::AsyncReadExt;
            accepted.read(&mut buf).await.unwrap_or(0)
        })
        .await;
        assert_eq!(n, 0, "{}", mode(&opts));
        client.stop().await;
    }
}
