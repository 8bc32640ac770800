//! Test harness: a WebSocket server playing the runner, local services inside "the container" (here:
//! 127.0.0.1), and helpers to start the client. Shared by the integration tests and the bench example.
#![allow(dead_code, clippy::result_large_err)]

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tunnel_client::config::Config;
use tunnel_client::flow::SendCredit;
use tunnel_client::frame::{self, Decoded, Frame, Hello, MsgType, Proto, FEATURE_FLOW_CONTROL};

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Await with the harness timeout, panicking with `what` if it passes.
pub async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(TIMEOUT, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---------------------------------------------------------------------------------------------- runner

#[derive(Clone, Copy, Debug)]
pub struct RunnerOpts {
    /// `Some(window)`: answer the client's HELLO with flow control and this window. `None`: a seed-protocol
    /// runner that never sends HELLO.
    pub hello: Option<u32>,
    /// Return WINDOW credit as soon as the test consumes data (off: the test grants by hand).
    pub auto_credit: bool,
    /// Answer tunnel PINGs with PONG.
    pub auto_pong: bool,
}

impl RunnerOpts {
    pub fn flow() -> Self {
        Self { hello: Some(frame::DEFAULT_WINDOW), auto_credit: true, auto_pong: true }
    }
    pub fn legacy() -> Self {
        Self { hello: None, auto_credit: true, auto_pong: true }
    }
}

pub struct FakeRunner {
    pub addr: SocketAddr,
    sessions: mpsc::UnboundedReceiver<RunnerSession>,
    accept: JoinHandle<()>,
}

impl FakeRunner {
    pub async fn start(opts: RunnerOpts) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), opts).await
    }

    pub async fn start_on(addr: SocketAddr, opts: RunnerOpts) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind runner");
        let addr = listener.local_addr().expect("addr");
        let (tx, sessions) = mpsc::unbounded_channel();
        let accept = tokio::spawn(async move {
            // Session tasks live in this set: stopping the runner aborts them, like a runner process dying.
            let mut set = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let tx = tx.clone();
                set.spawn(serve(stream, opts, tx));
            }
        });
        Self { addr, sessions, accept }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The next client that connected (after the HELLO exchange).
    pub async fn session(&mut self) -> RunnerSession {
        within("a client session", self.sessions.recv()).await.expect("runner stopped")
    }

    /// Stop abruptly: listener and every session go away without a close frame.
    pub async fn kill(self) {
        self.accept.abort();
        let _ = self.accept.await;
    }
}

#[derive(Debug)]
pub enum Event {
    Connected,
    Error(String),
    Data(Bytes),
    Close,
}

struct Slot {
    events: mpsc::UnboundedSender<Event>,
    credit: Arc<SendCredit>,
}

/// The runner's view of one tunnel WebSocket.
pub struct RunnerSession {
    pub path: String,
    pub authorization: Option<String>,
    pub client_hello: Option<Hello>,
    /// Negotiated: (window the client announced = what we may send per connection, our window).
    pub flow: Option<(u32, u32)>,
    pub opts: RunnerOpts,
    out: mpsc::UnboundedSender<Message>,
    slots: Arc<Mutex<HashMap<u32, Slot>>>,
    /// Frames not addressed to an open connection (PING, PONG, unknown...), and close notification.
    pub control: mpsc::UnboundedReceiver<Frame>,
    next_id: AtomicU32,
    paused: watch::Sender<bool>,
    closed: Arc<Notify>,
    closed_flag: Arc<AtomicBool>,
}

async fn serve(stream: TcpStream, opts: RunnerOpts, sessions: mpsc::UnboundedSender<RunnerSession>) {
    let _ = stream.set_nodelay(true);
    let seen: Arc<Mutex<(String, Option<String>)>> = Arc::default();
    let seen2 = seen.clone();
    let callback = move |req: &Request, resp: Response| {
        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        *seen2.lock().expect("lock") = (req.uri().path().to_string(), auth);
        Ok(resp)
    };
    let config = WebSocketConfig::default().max_message_size(Some(64 << 20));
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await else {
        return;
    };
    let (path, authorization) = seen.lock().expect("lock").clone();
    let (mut sink, mut stream) = ws.split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
    let writer = AbortOnDrop(tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if sink.feed(m).await.is_err() {
                return;
            }
            while let Ok(m) = out_rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    }));
    if let Some(window) = opts.hello {
        let _ = out.send(Message::Binary(Hello { features: FEATURE_FLOW_CONTROL, window }.encode()));
    }
    // The client's first binary message is its HELLO, if it speaks the extension.
    let mut client_hello = None;
    let mut first: Option<Frame> = None;
    if let Ok(Some(Ok(Message::Binary(b)))) = tokio::time::timeout(Duration::from_secs(2), stream.next()).await {
        match frame::decode(b) {
            Ok(Decoded::Frame(f)) if f.kind == MsgType::Hello => client_hello = Hello::parse(&f.payload).ok(),
            Ok(Decoded::Frame(f)) => first = Some(f),
            _ => {}
        }
    }
    let flow = match (opts.hello, client_hello) {
        (Some(ours), Some(h)) if h.features & FEATURE_FLOW_CONTROL != 0 => Some((h.window, ours)),
        _ => None,
    };
    let slots: Arc<Mutex<HashMap<u32, Slot>>> = Arc::default();
    let (control_tx, control) = mpsc::unbounded_channel();
    let (paused, mut paused_rx) = watch::channel(false);
    let closed = Arc::new(Notify::new());
    let closed_flag = Arc::new(AtomicBool::new(false));
    let session = RunnerSession {
        path,
        authorization,
        client_hello,
        flow,
        opts,
        out: out.clone(),
        slots: slots.clone(),
        control,
        next_id: AtomicU32::new(1),
        paused,
        closed: closed.clone(),
        closed_flag: closed_flag.clone(),
    };
    if sessions.send(session).is_err() {
        return;
    }
    let route = |f: Frame| {
        let slots = slots.lock().expect("lock");
        let slot = slots.get(&f.client_id);
        match (f.kind, slot) {
            (MsgType::Connected, Some(s)) => drop(s.events.send(Event::Connected)),
            (MsgType::Error, Some(s)) => {
                drop(s.events.send(Event::Error(String::from_utf8_lossy(&f.payload).into_owned())))
            }
            (MsgType::Data, Some(s)) => drop(s.events.send(Event::Data(f.payload))),
            (MsgType::Close, Some(s)) => drop(s.events.send(Event::Close)),
            (MsgType::Window, Some(s)) => {
                if let Ok(c) = frame::parse_window(&f.payload) {
                    s.credit.grant(c);
                }
            }
            (MsgType::Ping, _) if opts.auto_pong => {
                let _ = out.send(Message::Binary(frame::encode(MsgType::Pong, f.proto, f.client_id, 0, b"")));
                let _ = control_tx.send(f);
            }
            _ => drop(control_tx.send(f)),
        }
    };
    if let Some(f) = first {
        route(f);
    }
    loop {
        if *paused_rx.borrow() {
            // Frozen: read nothing (not even WebSocket pings) until resumed or the session is dropped.
            if paused_rx.changed().await.is_err() {
                break;
            }
            continue;
        }
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if let Ok(Decoded::Frame(f)) = frame::decode(b) {
                        route(f);
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            r = paused_rx.changed() => if r.is_err() { break },
        }
    }
    closed_flag.store(true, Ordering::SeqCst);
    closed.notify_waiters();
    // One more read flushes tungstenite's automatic close reply; then drop both halves (the writer task
    // holds the other one) so the TCP connection closes, as a server does after the closing handshake.
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    drop(stream);
    drop(writer);
}

/// Aborts the task when dropped, so an aborted session takes its writer (and the socket) down with it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl RunnerSession {
    pub fn flow_on(&self) -> bool {
        self.flow.is_some()
    }

    pub fn send_raw(&self, bytes: Bytes) {
        let _ = self.out.send(Message::Binary(bytes));
    }

    pub fn send_message(&self, m: Message) {
        let _ = self.out.send(m);
    }

    /// Close the WebSocket cleanly (close frame).
    pub fn close(&self) {
        let _ = self.out.send(Message::Close(None));
    }

    /// Stop (or resume) reading from the client entirely: a hung runner.
    pub fn freeze(&self, frozen: bool) {
        let _ = self.paused.send(frozen);
    }

    pub async fn wait_closed(&self) {
        let notified = self.closed.notified();
        if self.closed_flag.load(Ordering::SeqCst) {
            return;
        }
        within("the session to close", notified).await;
    }

    /// Next frame not routed to a connection.
    pub async fn next_control(&mut self) -> Frame {
        within("a control frame", self.control.recv()).await.expect("session ended")
    }

    /// Send CONNECT and wait for CONNECTED (Ok) or ERROR (Err(reason)).
    pub async fn open(&self, proto: Proto, port: u16) -> Result<RStream, String> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, mut events) = mpsc::unbounded_channel();
        let send_window = self.flow.map(|f| f.0).unwrap_or(u32::MAX);
        let credit = Arc::new(SendCredit::new(send_window));
        self.slots.lock().expect("lock").insert(id, Slot { events: tx, credit: credit.clone() });
        self.send_raw(frame::encode(MsgType::Connect, proto, id, port, b""));
        match within("CONNECTED or ERROR", events.recv()).await {
            Some(Event::Connected) => {}
            Some(Event::Error(reason)) => return Err(reason),
            other => panic!("unexpected answer to CONNECT: {other:?}"),
        }
        let tx = RSender { id, proto, credit, out: self.out.clone(), flow: self.flow.is_some(), chunk: 64 * 1024 };
        let recv_window = self.flow.map(|f| f.1);
        let rx = RReceiver {
            id,
            proto,
            events,
            out: self.out.clone(),
            auto_credit: self.opts.auto_credit && recv_window.is_some(),
        };
        Ok(RStream { tx, rx })
    }

    /// CONNECT, DATA and CLOSE back to back, before the client could have answered: the client must keep
    /// the early data and the CLOSE, in order, until its local connection is up.
    pub async fn open_pipelined(&self, port: u16, data: &[u8]) -> RStream {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, mut events) = mpsc::unbounded_channel();
        let credit = Arc::new(SendCredit::new(u32::MAX));
        self.slots.lock().expect("lock").insert(id, Slot { events: tx, credit: credit.clone() });
        self.send_raw(frame::encode(MsgType::Connect, Proto::Tcp, id, port, b""));
        self.send_raw(frame::encode(MsgType::Data, Proto::Tcp, id, 0, data));
        self.send_raw(frame::encode(MsgType::Close, Proto::Tcp, id, 0, b""));
        match within("CONNECTED", events.recv()).await {
            Some(Event::Connected) => {}
            other => panic!("unexpected answer to CONNECT: {other:?}"),
        }
        let out = self.out.clone();
        let tx = RSender { id, proto: Proto::Tcp, credit, out: out.clone(), flow: false, chunk: 64 * 1024 };
        let auto_credit = self.opts.auto_credit && self.flow.is_some();
        RStream { tx, rx: RReceiver { id, proto: Proto::Tcp, events, out, auto_credit } }
    }

    pub async fn open_tcp(&self, port: u16) -> RStream {
        self.open(Proto::Tcp, port).await.expect("CONNECT refused")
    }
}

/// Both directions of one tunneled connection, as the runner sees it.
pub struct RStream {
    pub tx: RSender,
    pub rx: RReceiver,
}

#[derive(Clone)]
pub struct RSender {
    pub id: u32,
    proto: Proto,
    credit: Arc<SendCredit>,
    out: mpsc::UnboundedSender<Message>,
    flow: bool,
    /// Largest DATA payload `send` puts in one frame.
    pub chunk: usize,
}

impl RSender {
    /// Send bytes as DATA frames of at most `chunk` bytes, respecting the client's window when flow control
    /// is on.
    pub async fn send(&self, mut data: &[u8]) {
        while !data.is_empty() {
            let mut n = data.len().min(self.chunk);
            if self.flow {
                n = n.min(self.credit.wait().await as usize);
                self.credit.consume(n as u64);
            }
            let _ = self.out.send(Message::Binary(frame::encode(MsgType::Data, self.proto, self.id, 0, &data[..n])));
            data = &data[n..];
        }
    }

    /// One UDP datagram (one DATA frame), ignoring credit.
    pub fn send_datagram(&self, datagram: &[u8]) {
        let _ = self.out.send(Message::Binary(frame::encode(MsgType::Data, self.proto, self.id, 0, datagram)));
    }

    /// DATA regardless of credit (to test how the client treats a runner that overruns its window).
    pub fn send_unchecked(&self, data: &[u8]) {
        self.send_datagram(data)
    }

    pub fn close(&self) {
        let _ = self.out.send(Message::Binary(frame::encode(MsgType::Close, self.proto, self.id, 0, b"")));
    }
}

pub struct RReceiver {
    pub id: u32,
    proto: Proto,
    events: mpsc::UnboundedReceiver<Event>,
    out: mpsc::UnboundedSender<Message>,
    auto_credit: bool,
}

impl RReceiver {
    /// Next chunk of data; `None` once the client sent CLOSE (or ERROR).
    pub async fn recv(&mut self) -> Option<Bytes> {
        match within("data from the client", self.events.recv()).await {
            Some(Event::Data(b)) => {
                if self.auto_credit && !b.is_empty() {
                    self.grant(b.len() as u32);
                }
                Some(b)
            }
            Some(Event::Close) | Some(Event::Error(_)) | None => None,
            Some(Event::Connected) => panic!("second CONNECTED"),
        }
    }

    /// Like `recv` but waiting at most `d`; `Err(())` on timeout.
    pub async fn recv_timeout(&mut self, d: Duration) -> Result<Option<Bytes>, ()> {
        match tokio::time::timeout(d, self.events.recv()).await {
            Err(_) => Err(()),
            Ok(Some(Event::Data(b))) => {
                if self.auto_credit && !b.is_empty() {
                    self.grant(b.len() as u32);
                }
                Ok(Some(b))
            }
            Ok(_) => Ok(None),
        }
    }

    pub fn grant(&self, credit: u32) {
        let _ = self.out.send(Message::Binary(frame::encode_window(self.proto, self.id, credit)));
    }

    /// Read until CLOSE, returning everything.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(b) = self.recv().await {
            all.extend_from_slice(&b);
        }
        all
    }
}

// ---------------------------------------------------------------------------------------------- client

pub struct Client {
    stop: watch::Sender<bool>,
    pub task: JoinHandle<Result<(), tunnel_client::RunError>>,
}

impl Client {
    pub fn start(cfg: Config) -> Self {
        init_logging();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(tunnel_client::run(cfg, rx));
        Self { stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = within("client stop", self.task).await;
    }
}

pub fn config(runner: &FakeRunner) -> Config {
    let mut cfg = Config::new(&runner.url(), "kohakuriver-task-1").expect("config");
    cfg.token = Some("test-secret".into());
    cfg
}

pub fn init_logging() {
    let level = std::env::var("TEST_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(log::LevelFilter::Warn);
    tunnel_client::logging::init(level);
}

// ---------------------------------------------------------------------------------------------- services

/// TCP echo service; returns its port.
pub async fn tcp_echo() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// A service that accepts and then never reads; the returned sockets stay open (kept in the vector). Its
/// receive buffer is small so the stall reaches the client quickly instead of after megabytes of kernel
/// buffering.
pub async fn tcp_stalled() -> (u16, Arc<Mutex<Vec<TcpStream>>>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let listener = socket.listen(16).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let kept: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let k = kept.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            k.lock().expect("lock").push(s);
        }
    });
    (port, kept)
}

/// A service that reads everything until EOF, then answers with the byte count and a sha256, then closes.
pub async fn tcp_read_then_answer() -> u16 {
    use sha2::Digest;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if s.read_to_end(&mut all).await.is_ok() {
                    let answer = format!("{} {}", all.len(), hex::encode(sha2::Sha256::digest(&all)));
                    let _ = s.write_all(answer.as_bytes()).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// A service that writes `len` bytes of `pattern(len, 7)` on every connection, then closes.
pub async fn tcp_source(len: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let data = Arc::new(pattern(len, 7));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let data = data.clone();
            tokio::spawn(async move {
                let _ = s.write_all(&data).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// A service that accepts and reports every connection's end (EOF or error) on the channel.
pub async fn tcp_watch_eof() -> (u16, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                let _ = tx.send(());
            });
        }
    });
    (port, rx)
}

/// UDP echo service; returns its port.
pub async fn udp_echo() -> u16 {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let port = sock.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    port
}

/// A port nothing listens on.
pub async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

/// Deterministic pseudo-random bytes (xorshift), cheap enough for tens of MiB.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
