//! What the session and a connection task share: the handle the session keeps per connection, the context a
//! connection task runs with, and the teardown signal.
//!
//! The session's read loop talks to a connection only through non-blocking operations (an unbounded channel
//! whose content is bounded by [`RxQueue`](crate::flow::RxQueue) accounting, atomics, `Notify`), so one
//! connection can never hold up the read loop and with it every other connection on the tunnel.

use crate::config::Config;
use crate::flow::{RxQueue, SendCredit};
use crate::frame::{self, MsgType, Proto};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message;

/// What the read loop hands a connection task.
#[derive(Debug)]
pub enum Inbound {
    Data(Bytes),
    /// The runner will send no more data: half-close the local socket (TCP) or end the connection (UDP).
    Close,
}

/// Why the session tears a connection down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kill {
    None = 0,
    /// The runner overran our window, or (without flow control) the local service stopped reading and the
    /// bounded buffer filled: close this connection and tell the runner with CLOSE.
    Overflow = 1,
    /// The WebSocket is gone (reconnect or exit): close the local socket, nothing can be sent.
    SessionEnded = 2,
    /// The runner sent ERROR for this connection: abort it (the user's session ended or the runner reset it);
    /// no CLOSE goes back, the runner has already forgotten the id.
    Aborted = 3,
}

/// Negotiated flow control of a session, copied into every connection it opens.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    /// Credit a new connection starts with towards the runner (the runner's announced window).
    pub send_window: u32,
    /// What we announced: the runner may have this much DATA in flight towards us per connection.
    pub recv_window: u32,
}

#[derive(Debug)]
pub struct Shared {
    pub rx: RxQueue,
    /// `Some` when flow control is on.
    pub credit: Option<SendCredit>,
    kill_reason: AtomicU8,
    kill: Notify,
    /// This connection's DATA/CLOSE frames queued and not yet fed to the WebSocket, and the lane they are in
    /// (see [`Outbound::stream`]).
    unwritten: AtomicUsize,
    in_express: AtomicBool,
    drained: Notify,
}

impl Shared {
    pub fn new(rx_limit: usize, flow: Option<Flow>) -> Self {
        Self {
            rx: RxQueue::new(rx_limit),
            credit: flow.map(|f| SendCredit::new(f.send_window)),
            kill_reason: AtomicU8::new(Kill::None as u8),
            kill: Notify::new(),
            unwritten: AtomicUsize::new(0),
            in_express: AtomicBool::new(false),
            drained: Notify::new(),
        }
    }

    pub fn kill(&self, reason: Kill) {
        self.kill_reason.store(reason as u8, Ordering::Release);
        // notify_one stores a permit if the task is not waiting right now, so the signal is never lost.
        self.kill.notify_one();
    }

    /// Resolves once the session asked this connection to go away; returns why.
    pub async fn killed(&self) -> Kill {
        loop {
            match self.kill_reason.load(Ordering::Acquire) {
                1 => return Kill::Overflow,
                2 => return Kill::SessionEnded,
                3 => return Kill::Aborted,
                _ => self.kill.notified().await,
            }
        }
    }
}

/// DATA payloads up to this size may take the express lane.
pub const EXPRESS_MAX: usize = 16 * 1024;

/// A DATA or CLOSE frame on its way to the writer, with the connection whose order it keeps (`None`: a
/// frame that needs no ordering bookkeeping, such as a UDP datagram).
#[derive(Debug)]
pub struct Queued {
    pub frame: Bytes,
    pub owner: Option<Arc<Shared>>,
}

impl Queued {
    /// The writer fed this frame to the WebSocket.
    pub fn written(&self) {
        if let Some(owner) = &self.owner {
            if owner.unwritten.fetch_sub(1, Ordering::AcqRel) == 1 {
                owner.drained.notify_one();
            }
        }
    }
}

/// The outgoing side of the WebSocket, as seen by connection tasks.
#[derive(Clone, Debug)]
pub struct Outbound {
    /// Small control frames (CONNECTED, ERROR, WINDOW, PONG...). The writer serves this queue first.
    pub ctrl: mpsc::Sender<Message>,
    /// Small DATA frames of connections with nothing else queued (an interactive keystroke or reply), served
    /// before bulk data, so they do not wait behind other connections' full windows.
    pub express: mpsc::Sender<Queued>,
    /// Bulk DATA, and the CLOSE that follows a connection's last DATA.
    pub data: mpsc::Sender<Queued>,
}

impl Outbound {
    /// Queue a control frame; false when the session is gone.
    pub async fn ctrl(&self, frame: Bytes) -> bool {
        self.ctrl.send(Message::Binary(frame)).await.is_ok()
    }

    /// Queue a frame that needs no ordering with others of its connection (UDP); false when the session is
    /// gone.
    pub async fn data(&self, frame: Bytes) -> bool {
        self.data.send(Queued { frame, owner: None }).await.is_ok()
    }

    /// Queue a DATA or CLOSE frame of a stream connection, keeping its frames in order: a frame joins the
    /// lane its connection's unwritten frames are in. A small frame of a connection with nothing unwritten
    /// takes the express lane; a large one never does, and waits for the connection's express frames to be
    /// written first (the writer serves that lane first, so the wait is short). Only the connection's own
    /// task calls this, one frame at a time. False when the session is gone.
    pub async fn stream(&self, owner: &Arc<Shared>, frame: Bytes) -> bool {
        let small = frame.len() <= frame::HEADER_LEN + EXPRESS_MAX;
        let express = loop {
            if owner.unwritten.load(Ordering::Acquire) == 0 {
                owner.in_express.store(small, Ordering::Relaxed);
                break small;
            }
            if small || !owner.in_express.load(Ordering::Relaxed) {
                break owner.in_express.load(Ordering::Relaxed);
            }
            owner.drained.notified().await;
        };
        owner.unwritten.fetch_add(1, Ordering::AcqRel);
        let lane = if express { &self.express } else { &self.data };
        lane.send(Queued { frame, owner: Some(owner.clone()) }).await.is_ok()
    }
}

/// Everything a connection task needs.
pub struct Ctx {
    pub id: u32,
    pub generation: u64,
    pub proto: Proto,
    pub port: u16,
    pub flow: Option<Flow>,
    pub shared: Arc<Shared>,
    pub inbound: mpsc::UnboundedReceiver<Inbound>,
    pub out: Outbound,
    pub cfg: Arc<Config>,
}

impl Ctx {
    /// `conn 7 tcp:8080`, the prefix of every log line about this connection.
    pub fn label(&self) -> String {
        format!("conn {} {}:{}", self.id, self.proto, self.port)
    }

    pub fn frame(&self, kind: MsgType, payload: &[u8]) -> Bytes {
        frame::encode(kind, self.proto, self.id, 0, payload)
    }

    /// Tell the runner this connection failed to open.
    pub async fn send_error(&self, reason: &str) {
        let _ = self.out.ctrl(self.frame(MsgType::Error, reason.as_bytes())).await;
    }
}

/// Run one connection to completion; the session learns it is over from the returned key.
pub async fn run(ctx: Ctx) -> (u32, u64) {
    let key = (ctx.id, ctx.generation);
    match ctx.proto {
        Proto::Tcp => crate::tcp::run(ctx).await,
        Proto::Udp => crate::udp::run(ctx).await,
    }
    key
}

/// Byte counters and last-activity clock of one connection, shared by its two directions without locks
/// (atomics keep the connection future `Send`).
pub struct Meter {
    started: std::time::Instant,
    last_ms: AtomicU64,
    to_runner: AtomicU64,
    from_runner: AtomicU64,
}

impl Meter {
    pub fn new() -> Self {
        Self {
            started: std::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            to_runner: AtomicU64::new(0),
            from_runner: AtomicU64::new(0),
        }
    }

    pub fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// `n` bytes read locally and sent to the runner.
    pub fn sent(&self, n: usize) {
        self.to_runner.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// `n` bytes from the runner handed to the local socket.
    pub fn received(&self, n: usize) {
        self.from_runner.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// Resolves once nothing happened for `idle`.
    pub async fn idle_for(&self, idle: std::time::Duration) {
        loop {
            let last = std::time::Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.started + last + idle;
            if std::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }

    /// `1.2 MiB to the runner, 3 KiB from it, 2.1 s` for the close log line.
    pub fn summary(&self) -> String {
        format!(
            "{} to the runner, {} from it, {:.1} s",
            human_bytes(self.to_runner.load(Ordering::Relaxed)),
            human_bytes(self.from_runner.load(Ordering::Relaxed)),
            self.started.elapsed().as_secs_f64()
        )
    }
}

impl Default for Meter {
    fn default() -> Self {
        Self::new()
    }
}

/// Human-readable byte count for connection summaries.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound() -> (Outbound, mpsc::Receiver<Queued>, mpsc::Receiver<Queued>) {
        let (ctrl, _ctrl_rx) = mpsc::channel(8);
        let (express, express_rx) = mpsc::channel(64);
        let (data, data_rx) = mpsc::channel(64);
        (Outbound { ctrl, express, data }, express_rx, data_rx)
    }

    fn data(len: usize) -> Bytes {
        frame::encode(MsgType::Data, Proto::Tcp, 1, 0, &vec![0u8; len])
    }

    #[tokio::test]
    async fn small_frames_of_an_idle_connection_take_the_express_lane() {
        let (out, mut express, mut bulk) = outbound();
        let conn = Arc::new(Shared::new(1 << 20, None));
        assert!(out.stream(&conn, data(64)).await);
        express.try_recv().unwrap().written();
        assert!(out.stream(&conn, data(EXPRESS_MAX + 1)).await);
        assert!(express.try_recv().is_err());
        // Behind its own bulk frame, a small frame (and the CLOSE) stays in the bulk lane, in order.
        assert!(out.stream(&conn, data(3)).await);
        let (first, second) = (bulk.try_recv().unwrap(), bulk.try_recv().unwrap());
        assert_eq!(first.frame.len(), frame::HEADER_LEN + EXPRESS_MAX + 1);
        assert_eq!(second.frame.len(), frame::HEADER_LEN + 3);
        first.written();
        second.written();
        assert!(out.stream(&conn, data(3)).await);
        assert!(express.try_recv().is_ok(), "nothing unwritten any more: express again");
    }

    #[tokio::test]
    async fn a_large_frame_waits_for_its_connections_express_frames_to_be_written() {
        let (out, mut express, mut bulk) = outbound();
        let conn = Arc::new(Shared::new(1 << 20, None));
        assert!(out.stream(&conn, data(10)).await);
        let big = {
            let (out, conn) = (out.clone(), conn.clone());
            tokio::spawn(async move { out.stream(&conn, data(EXPRESS_MAX * 2)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(bulk.try_recv().is_err(), "the large frame overtook an unwritten express frame");
        express.try_recv().unwrap().written();
        assert!(big.await.unwrap());
        assert_eq!(bulk.try_recv().unwrap().frame.len(), frame::HEADER_LEN + EXPRESS_MAX * 2);
    }
}
