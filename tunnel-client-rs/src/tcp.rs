//! One TCP connection to `127.0.0.1:{port}`: connect, answer CONNECTED or ERROR, then pump both directions.
//!
//! CLOSE is a half-close, like a TCP FIN: local EOF sends CLOSE after the last DATA (same FIFO, so it cannot
//! overtake it), and the runner's CLOSE shuts down the write side of the local socket while its read side
//! keeps going, so request/response exchanges such as `printf req | nc` work. The connection is over once
//! both directions are closed, on a local socket error, when it stays half-closed and idle for
//! `--half-close-timeout` (a peer that never closes its side must not pin a socket forever), or when the
//! session kills it.

use crate::conn::{Ctx, Inbound, Kill, Meter, Outbound, Shared};
use crate::flow::CreditReturn;
use crate::frame::{self, MsgType, Proto, HEADER_LEN};
use bytes::{BufMut, BytesMut};
use log::{debug, info, warn};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Local read size: large reads mean fewer frames and less per-frame work on every hop; it stays within the
/// default window so a few chunks are in flight at once.
pub const READ_CHUNK: usize = 256 * 1024;

enum Outcome {
    Done,
    LocalError(&'static str, io::Error),
    Killed(Kill),
    HalfCloseTimeout,
}

pub async fn run(ctx: Ctx) {
    let label = ctx.label();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ctx.port));
    let shared = ctx.shared.clone();

    let connect = tokio::time::timeout(ctx.cfg.connect_timeout, TcpStream::connect(addr));
    let stream = tokio::select! {
        r = connect => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return fail(&ctx, &format!("connect to {addr} failed: {e}")).await,
            Err(_) => {
                let secs = ctx.cfg.connect_timeout.as_secs_f64();
                return fail(&ctx, &format!("connect to {addr} timed out after {secs:.1} s")).await;
            }
        },
        reason = shared.killed() => {
            if reason == Kill::Overflow {
                ctx.send_error("too much data queued before the connection was established").await;
            }
            return;
        }
    };
    // Interactive protocols (ssh, shells, RPC) must not wait for Nagle; bulk transfers use large writes anyway.
    if let Err(e) = stream.set_nodelay(true) {
        debug!("{label}: TCP_NODELAY: {e}");
    }
    if !ctx.out.ctrl(ctx.frame(MsgType::Connected, b"")).await {
        return;
    }
    info!("{label}: connected");

    let meter = Meter::new();
    let mut close_sent = false;
    let Ctx { id, flow, mut inbound, out, cfg, .. } = ctx;
    let (mut rd, mut wr) = stream.into_split();
    let outcome = {
        let up = uplink(&mut rd, id, &shared, &out, &meter);
        let recv_window = flow.map(|f| f.recv_window);
        let down = downlink(&mut wr, id, &mut inbound, &shared, recv_window, &out, &meter);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let half_closed = up_done != down_done;
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => { up_done = true; close_sent = true; meter.touch(); }
                    Err(e) => break Outcome::LocalError("read", e),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => { down_done = true; meter.touch(); }
                    Err(e) => break Outcome::LocalError("write", e),
                },
                reason = shared.killed() => break Outcome::Killed(reason),
                _ = idle_for(&meter, cfg.half_close_timeout), if half_closed => break Outcome::HalfCloseTimeout,
            }
            if up_done && down_done {
                break Outcome::Done;
            }
        }
    };

    let stats = || meter.summary();
    let send_close = match outcome {
        Outcome::Done => {
            info!("{label}: closed ({})", stats());
            false
        }
        Outcome::LocalError(op, e) => {
            info!("{label}: local {op} failed: {e}; closing ({})", stats());
            true
        }
        Outcome::HalfCloseTimeout => {
            info!("{label}: half-closed and idle for too long; closing ({})", stats());
            true
        }
        // The session already logged why.
        Outcome::Killed(Kill::Overflow) => true,
        Outcome::Killed(_) => {
            debug!("{label}: closed with the tunnel ({})", stats());
            false
        }
    };
    if send_close && !close_sent {
        let _ = out.stream(&shared, frame::encode(MsgType::Close, Proto::Tcp, id, 0, b"")).await;
    }
    // Orderly FIN for the local peer (a no-op if the runner's CLOSE already did it); dropping both halves
    // then releases the socket.
    let _ = wr.shutdown().await;
}

async fn fail(ctx: &Ctx, reason: &str) {
    warn!("{}: {reason}", ctx.label());
    ctx.send_error(reason).await;
}

/// `Meter::idle_for`, or never when there is no limit.
async fn idle_for(meter: &Meter, limit: Option<std::time::Duration>) {
    match limit {
        Some(t) => meter.idle_for(t).await,
        None => std::future::pending().await,
    }
}

/// Local socket -> runner. With flow control it reads only as much as the runner has credited, so a runner
/// side that stops consuming stops this connection's reads (and nothing else). Sends CLOSE after the last
/// DATA on local EOF.
async fn uplink(
    rd: &mut OwnedReadHalf,
    id: u32,
    shared: &Arc<Shared>,
    out: &Outbound,
    meter: &Meter,
) -> io::Result<()> {
    let credit = shared.credit.as_ref();
    let session_gone = || io::Error::new(io::ErrorKind::BrokenPipe, "tunnel session ended");
    let header = frame::header(MsgType::Data, Proto::Tcp, id, 0);
    let mut buf = BytesMut::new();
    loop {
        let allowed = match credit {
            Some(c) => c.wait().await.min(READ_CHUNK as u64) as usize,
            None => READ_CHUNK,
        };
        // The frame is built in place: header first, then the socket data read right behind it, so the
        // payload is never copied on its way to the writer.
        buf.reserve(HEADER_LEN + allowed);
        buf.put_slice(&header);
        match rd.try_read_buf(&mut (&mut buf).limit(allowed)) {
            Ok(0) => {
                let close = frame::encode(MsgType::Close, Proto::Tcp, id, 0, b"");
                return if out.stream(shared, close).await { Ok(()) } else { Err(session_gone()) };
            }
            Ok(n) => {
                if let Some(c) = credit {
                    c.consume(n as u64);
                }
                meter.sent(n);
                if !out.stream(shared, buf.split().freeze()).await {
                    return Err(session_gone());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing to read: give the buffer back while waiting, so an idle connection holds no
                // read buffer (thousands of idle connections must stay cheap).
                buf = BytesMut::new();
                rd.readable().await?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runner -> local socket. Returns after the runner's CLOSE, having shut down the local write side.
async fn downlink(
    wr: &mut OwnedWriteHalf,
    id: u32,
    inbound: &mut mpsc::UnboundedReceiver<Inbound>,
    shared: &Shared,
    recv_window: Option<u32>,
    out: &Outbound,
    meter: &Meter,
) -> io::Result<()> {
    let mut credit_return = recv_window.map(CreditReturn::new);
    while let Some(Inbound::Data(chunk)) = inbound.recv().await {
        wr.write_all(&chunk).await?;
        meter.received(chunk.len());
        shared.rx.discharge(chunk.len());
        if let Some(cr) = credit_return.as_mut() {
            if let Some(credit) = cr.written(chunk.len()) {
                // A failed send means the session is ending; the kill signal follows.
                let _ = out.ctrl(frame::encode_window(Proto::Tcp, id, credit)).await;
            }
        }
    }
    // CLOSE from the runner (or the session dropped our queue): no more data will come.
    wr.shutdown().await
}
