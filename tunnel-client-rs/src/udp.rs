//! One UDP "connection": a socket bound to 127.0.0.1:0 and connected to `127.0.0.1:{port}`, one DATA frame
//! per datagram in each direction. UDP has no handshake, so CONNECTED is sent as soon as the socket exists;
//! the connection ends on the runner's CLOSE, on idle expiry or when the session goes away.

use crate::conn::{Ctx, Inbound, Kill, Meter};
use crate::flow::CreditReturn;
use crate::frame::{self, MsgType, Proto};
use log::{debug, info, warn};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::UdpSocket;

/// Largest UDP payload over IPv4 is 65507 bytes; a buffer of 64 KiB never truncates one.
const MAX_DATAGRAM: usize = 65536;

enum Outcome {
    ClosedByRunner,
    Idle,
    Killed(Kill),
    SessionGone,
}

pub async fn run(ctx: Ctx) {
    let label = ctx.label();
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, ctx.port));
    let sock = match open(target).await {
        Ok(s) => s,
        Err(e) => {
            let reason = format!("udp socket for {target} failed: {e}");
            warn!("{label}: {reason}");
            ctx.send_error(&reason).await;
            return;
        }
    };
    if !ctx.out.ctrl(ctx.frame(MsgType::Connected, b"")).await {
        return;
    }
    info!("{label}: udp socket ready");

    let meter = Meter::new();
    let dropped = AtomicU64::new(0);
    let Ctx { id, flow, mut inbound, out, cfg, shared, .. } = ctx;

    let uplink = async {
        // Datagrams are usually small: receive into one scratch buffer and copy each into an exact-size
        // frame, rather than pinning a 64 KiB buffer per queued datagram.
        let mut scratch = vec![0u8; MAX_DATAGRAM];
        loop {
            match sock.recv(&mut scratch).await {
                Ok(n) => {
                    meter.touch();
                    // Datagrams beyond the runner's credit are dropped, not queued (DESIGN section 4).
                    if let Some(credit) = shared.credit.as_ref() {
                        if !credit.try_consume(n as u64) {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                    meter.sent(n);
                    if !out.data(frame::encode(MsgType::Data, Proto::Udp, id, 0, &scratch[..n])).await {
                        return;
                    }
                }
                // ICMP port unreachable and friends: the service may come (back) later; not fatal for UDP.
                // The pause keeps a persistent error from spinning.
                Err(e) => {
                    debug!("{label}: recv: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    };

    let downlink = async {
        let mut credit_return = flow.map(|f| CreditReturn::new(f.recv_window));
        while let Some(Inbound::Data(datagram)) = inbound.recv().await {
            if let Err(e) = sock.send(&datagram).await {
                debug!("{label}: send: {e}");
            }
            meter.received(datagram.len());
            shared.rx.discharge(datagram.len());
            if let Some(cr) = credit_return.as_mut() {
                if let Some(credit) = cr.written(datagram.len()) {
                    let _ = out.ctrl(frame::encode_window(Proto::Udp, id, credit)).await;
                }
            }
        }
    };

    let outcome = tokio::select! {
        _ = uplink => Outcome::SessionGone,
        _ = downlink => Outcome::ClosedByRunner,
        _ = meter.idle_for(cfg.udp_idle_timeout) => Outcome::Idle,
        reason = shared.killed() => Outcome::Killed(reason),
    };
    let summary =
        format!("{}, {} datagrams dropped for lack of credit", meter.summary(), dropped.load(Ordering::Relaxed));
    let send_close = match outcome {
        Outcome::ClosedByRunner => {
            info!("{label}: closed by the runner ({summary})");
            true
        }
        Outcome::Idle => {
            info!("{label}: idle for {:.0} s; closing ({summary})", cfg.udp_idle_timeout.as_secs_f64());
            true
        }
        Outcome::Killed(Kill::Overflow) => true,
        Outcome::Killed(_) | Outcome::SessionGone => {
            debug!("{label}: closed with the tunnel ({summary})");
            false
        }
    };
    if send_close {
        // Answering the runner's CLOSE too lets either side's bookkeeping forget the id.
        let _ = out.data(frame::encode(MsgType::Close, Proto::Udp, id, 0, b"")).await;
    }
}

async fn open(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
    sock.connect(target).await?;
    Ok(sock)
}
