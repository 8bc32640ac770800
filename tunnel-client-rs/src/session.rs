//! One WebSocket session with the runner: HELLO negotiation, the read loop that dispatches frames to
//! connection tasks, keepalive, the agent's heartbeats (`--agent`), and teardown of every connection when the
//! session ends.
//!
//! The read loop never waits on a connection. Everything it does per frame is immediate: a non-blocking
//! queue push charged against that connection's bounded budget, an atomic credit grant, a `try_send` of a
//! control frame. A local service that stops reading therefore costs only its own connection.

use crate::config::Config;
use crate::conn::{self, Flow, Inbound, Kill, Outbound, Shared};
use crate::frame::{self, Decoded, Frame, Hello, MsgType, Proto, FEATURE_FLOW_CONTROL};
use crate::net::Ws;
use crate::writer;
use bytes::Bytes;
use futures_util::StreamExt;
use log::{debug, info, warn};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Control frames waiting for the writer. Only a runner that stops reading while it keeps sending can fill
/// this; the session is then declared dead rather than buffering without bound.
const CTRL_QUEUE: usize = 4096;
/// DATA frames waiting for the writer, shared by all connections (each up to one read chunk).
const DATA_QUEUE: usize = 64;
/// More concurrent connections than this is a runaway runner, not a workload.
const MAX_CONNECTIONS: usize = 16384;
/// DATA payloads smaller than this are copied out of the WebSocket read buffer before being queued.
const COPY_BELOW: usize = 16 * 1024;
/// A runner silent for this many ping intervals is considered dead.
const SILENT_INTERVALS: u32 = 3;

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The runner closed the WebSocket with a close frame.
    RunnerClosed,
    /// The connection broke, timed out or the runner misbehaved.
    Lost(String),
    /// We were asked to stop.
    Shutdown,
}

/// Whether the runner speaks the flow-control extension. Decided by its first binary message: a runner that
/// supports extensions sends HELLO first; anything else means a seed-protocol runner.
enum Negotiation {
    Pending,
    Decided(Option<Flow>),
}

struct ConnEntry {
    generation: u64,
    proto: Proto,
    /// The runner sent CLOSE: it must send no more DATA, and a repeated CLOSE is not queued again.
    closed_by_runner: bool,
    tx: mpsc::UnboundedSender<Inbound>,
    shared: Arc<Shared>,
}

struct Session {
    cfg: Arc<Config>,
    out: Outbound,
    negotiation: Negotiation,
    conns: HashMap<u32, ConnEntry>,
    tasks: JoinSet<(u32, u64)>,
    generation: u64,
    /// Malformed frames seen, to keep a misbehaving runner from flooding the log.
    malformed: u64,
}

/// Serve one connected WebSocket until it ends. All connections opened in it are closed before returning.
pub async fn run(ws: Ws, cfg: Arc<Config>, mut shutdown: watch::Receiver<bool>) -> End {
    let (sink, mut stream) = ws.split();
    let (ctrl_tx, ctrl_rx) = mpsc::channel(CTRL_QUEUE);
    let (express_tx, express_rx) = mpsc::channel(DATA_QUEUE);
    let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
    let mut writer = tokio::spawn(writer::run(sink, ctrl_rx, express_rx, data_rx));
    let mut s = Session {
        negotiation: if cfg.flow_control { Negotiation::Pending } else { Negotiation::Decided(None) },
        cfg: cfg.clone(),
        out: Outbound { ctrl: ctrl_tx, express: express_tx, data: data_tx },
        conns: HashMap::new(),
        tasks: JoinSet::new(),
        generation: 0,
        malformed: 0,
    };
    if cfg.flow_control {
        // HELLO must be our first binary message.
        let hello = Hello { features: FEATURE_FLOW_CONTROL, window: cfg.window };
        let _ = s.out.ctrl.try_send(Message::Binary(hello.encode()));
    }

    // Guest agent mode: heartbeats from now on (seq 0 at once), queued behind the HELLO above.
    let mut agent = cfg
        .agent
        .map(|every| tokio::spawn(crate::agent::run(s.out.ctrl.clone(), every, crate::agent::Sources::default())));

    let interval = cfg.ping_interval;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut writer_done = false;

    let end = loop {
        tokio::select! {
            msg = stream.next() => {
                let msg = match msg {
                    None => break End::Lost("connection closed without a close frame".into()),
                    Some(Err(e)) => break End::Lost(format!("read error: {e}")),
                    Some(Ok(m)) => m,
                };
                last_heard = Instant::now();
                match msg {
                    Message::Binary(b) => {
                        if let Err(end) = s.on_binary(b) {
                            break end;
                        }
                    }
                    Message::Close(frame) => {
                        match frame {
                            Some(f) => info!("runner closed the tunnel (code {}, {:?})", u16::from(f.code), f.reason.as_str()),
                            None => info!("runner closed the tunnel"),
                        }
                        break End::RunnerClosed;
                    }
                    // The tunnel protocol is binary only (text is the agent's, and it only sends); tungstenite
                    // answers WebSocket pings itself.
                    Message::Text(t) => debug!("ignoring text message of {} bytes", t.len()),
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
            Some(done) = s.tasks.join_next() => s.forget(done),
            _ = ping.tick() => {
                let silent = last_heard.elapsed();
                if silent >= interval * SILENT_INTERVALS {
                    break End::Lost(format!("runner silent for {:.1} s", silent.as_secs_f64()));
                }
                let ping = frame::encode(MsgType::Ping, Proto::Tcp, 0, 0, b"");
                // A WebSocket ping too: a seed-protocol runner may ignore tunnel PINGs, but its WebSocket
                // library answers these, and any answer proves it alive.
                for m in [Message::Binary(ping), Message::Ping(Bytes::new())] {
                    if s.out.ctrl.try_send(m).is_err() {
                        break;
                    }
                }
            }
            r = &mut writer, if !writer_done => {
                writer_done = true;
                break End::Lost(match r {
                    Ok(Ok(())) => "writer stopped".into(),
                    Ok(Err(e)) => format!("write error: {e}"),
                    Err(e) => format!("writer task failed: {e}"),
                });
            }
            _ = shutdown.changed() => {
                let _ = s.out.ctrl.try_send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Away,
                    reason: "tunnel client stopping".into(),
                })));
                break End::Shutdown;
            }
        }
    };

    // The agent holds a sender of the control queue: it must be gone before the writer can see the end.
    if let Some(task) = agent.take() {
        task.abort();
        let _ = task.await;
    }
    let open = s.conns.len();
    s.teardown().await;
    if open > 0 {
        info!("closed {open} local connection(s) with the tunnel");
    }
    // Finish the WebSocket closing handshake where there is one: the writer sends our close frame (or
    // tungstenite its automatic reply to the runner's), then reading drains until the peer's answer.
    drop(s);
    if matches!(end, End::RunnerClosed | End::Shutdown) && !writer_done {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = (&mut writer).await;
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
    }
    writer.abort();
    end
}

impl Session {
    fn on_binary(&mut self, msg: Bytes) -> Result<(), End> {
        let f = match frame::decode(msg) {
            Ok(Decoded::Frame(f)) => f,
            Ok(Decoded::Unknown { type_code, client_id, .. }) => {
                debug!("ignoring unknown message type 0x{type_code:02x} (client id {client_id})");
                return Ok(());
            }
            Err(e) => {
                self.malformed += 1;
                if self.malformed <= 5 || self.malformed.is_power_of_two() {
                    warn!("ignoring malformed frame: {e} ({} so far)", self.malformed);
                }
                return Ok(());
            }
        };
        if let Negotiation::Pending = self.negotiation {
            self.negotiation = Negotiation::Decided(self.negotiate(&f));
            if f.kind == MsgType::Hello {
                return Ok(());
            }
        }
        match f.kind {
            MsgType::Connect => self.open(f),
            MsgType::Data => {
                self.deliver(f);
                Ok(())
            }
            MsgType::Close => {
                if let Some(c) = self.conns.get_mut(&f.client_id) {
                    if !c.closed_by_runner {
                        c.closed_by_runner = true;
                        let _ = c.tx.send(Inbound::Close);
                    }
                }
                Ok(())
            }
            MsgType::Window => {
                self.grant(&f);
                Ok(())
            }
            MsgType::Ping => self.ctrl(frame::encode(MsgType::Pong, f.proto, f.client_id, 0, b"")),
            MsgType::Pong => Ok(()),
            MsgType::Hello => {
                debug!("ignoring HELLO after the first message");
                Ok(())
            }
            MsgType::Error => {
                // ERROR aborts a connection in either direction (kohakuriver_proto's ContainerTunnel sends it
                // when a user session ends): drop it now so the id can be reused, the task shuts the socket.
                if let Some(c) = self.conns.remove(&f.client_id) {
                    info!("connection {} aborted by the runner", f.client_id);
                    c.shared.kill(Kill::Aborted);
                }
                Ok(())
            }
            MsgType::Connected => {
                debug!("ignoring CONNECTED from the runner (client id {})", f.client_id);
                Ok(())
            }
        }
    }

    /// Decide flow control from the runner's first message.
    fn negotiate(&self, first: &Frame) -> Option<Flow> {
        if first.kind != MsgType::Hello {
            info!("runner sent no HELLO: seed protocol, bounded per-connection buffers");
            return None;
        }
        let hello = match Hello::parse(&first.payload) {
            Ok(h) => h,
            Err(e) => {
                warn!("malformed HELLO from the runner ({e}): seed protocol");
                return None;
            }
        };
        if hello.features & FEATURE_FLOW_CONTROL == 0 {
            info!("runner HELLO without flow control (features 0x{:x}): seed protocol", hello.features);
            return None;
        }
        if hello.window == 0 {
            warn!("runner announced a zero window: sending waits for WINDOW credit");
        }
        info!("flow control on: window to runner {} B, from runner {} B", hello.window, self.cfg.window);
        Some(Flow { send_window: hello.window, recv_window: self.cfg.window })
    }

    fn flow(&self) -> Option<Flow> {
        match self.negotiation {
            Negotiation::Decided(f) => f,
            Negotiation::Pending => None,
        }
    }

    /// Queue a control frame without waiting. Failing means the runner stopped reading while it keeps
    /// talking to us: the session cannot make progress.
    fn ctrl(&self, frame: Bytes) -> Result<(), End> {
        match self.out.ctrl.try_send(Message::Binary(frame)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err(End::Lost(format!("{CTRL_QUEUE} control frames unsent: runner is not reading")))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(End::Lost("writer stopped".into())),
        }
    }

    fn open(&mut self, f: Frame) -> Result<(), End> {
        let id = f.client_id;
        let refuse = |reason: &str| {
            warn!("conn {id} {}:{}: {reason}", f.proto, f.port);
            frame::encode(MsgType::Error, f.proto, id, 0, reason.as_bytes())
        };
        if self.conns.contains_key(&id) {
            // Ids are the runner's to allocate; a duplicate is its bug. The live connection is kept.
            return self.ctrl(refuse("client id already in use"));
        }
        if f.port == 0 {
            return self.ctrl(refuse("port 0 is not a valid target"));
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            return self.ctrl(refuse("too many connections on this tunnel"));
        }
        let flow = self.flow();
        let rx_limit = match flow {
            Some(fl) => fl.recv_window as usize,
            None => self.cfg.legacy_buffer,
        };
        let shared = Arc::new(Shared::new(rx_limit, flow));
        let (tx, inbound) = mpsc::unbounded_channel();
        self.generation += 1;
        let ctx = conn::Ctx {
            id,
            generation: self.generation,
            proto: f.proto,
            port: f.port,
            flow,
            shared: shared.clone(),
            inbound,
            out: self.out.clone(),
            cfg: self.cfg.clone(),
        };
        self.tasks.spawn(conn::run(ctx));
        let entry = ConnEntry { generation: self.generation, proto: f.proto, closed_by_runner: false, tx, shared };
        self.conns.insert(id, entry);
        Ok(())
    }

    fn deliver(&mut self, f: Frame) {
        let id = f.client_id;
        let Some(c) = self.conns.get(&id) else {
            debug!("DATA for unknown connection {id} dropped");
            return;
        };
        if c.closed_by_runner {
            debug!("DATA after CLOSE for connection {id} dropped");
            return;
        }
        match c.shared.rx.charge(f.payload.len()) {
            crate::flow::Charge::Accepted => {
                // The payload is a slice of tungstenite's read buffer and keeps that whole buffer alive while
                // queued. Small payloads are copied out so a stalled connection holding many of them pins
                // only their own bytes; large ones are worth keeping zero-copy.
                let payload = if f.payload.len() < COPY_BELOW { Bytes::copy_from_slice(&f.payload) } else { f.payload };
                // A send error means the task already finished; its entry is removed when it is joined.
                let _ = c.tx.send(Inbound::Data(payload));
            }
            crate::flow::Charge::Overflow { .. } if c.proto == Proto::Udp => {
                debug!("conn {id} udp: datagram dropped, local queue full");
            }
            crate::flow::Charge::Overflow { queued } => {
                if self.flow().is_some() {
                    warn!("conn {id} tcp: runner exceeded the window ({queued} B unacknowledged); closing it");
                } else {
                    warn!(
                        "conn {id} tcp: local service is not reading, {queued} B buffered (limit {} B); closing it",
                        self.cfg.legacy_buffer
                    );
                }
                c.shared.kill(Kill::Overflow);
                // Forget it now so later frames for this id are dropped instead of queued.
                self.conns.remove(&id);
            }
        }
    }

    fn grant(&self, f: &Frame) {
        if self.flow().is_none() {
            return;
        }
        let credit = match frame::parse_window(&f.payload) {
            Ok(c) => c,
            Err(e) => {
                warn!("ignoring WINDOW for {}: {e}", f.client_id);
                return;
            }
        };
        if let Some(send) = self.conns.get(&f.client_id).and_then(|c| c.shared.credit.as_ref()) {
            send.grant(credit);
        }
    }

    fn forget(&mut self, done: Result<(u32, u64), tokio::task::JoinError>) {
        match done {
            Ok((id, generation)) => {
                if self.conns.get(&id).is_some_and(|c| c.generation == generation) {
                    self.conns.remove(&id);
                }
            }
            Err(e) => warn!("connection task failed: {e}"),
        }
    }

    /// Close every local connection (the WebSocket is gone, nothing more can be sent for them).
    async fn teardown(&mut self) {
        for (_, c) in self.conns.drain() {
            c.shared.kill(Kill::SessionEnded);
        }
        let tasks = &mut self.tasks;
        let drained =
            tokio::time::timeout(Duration::from_secs(2), async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!("{} connection task(s) did not stop in time; aborting them", self.tasks.len());
            self.tasks.shutdown().await;
        }
    }
}
