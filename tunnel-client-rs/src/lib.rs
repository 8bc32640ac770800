//! KohakuRiver in-container tunnel client.
//!
//! One WebSocket to the runner (`{runner_url}/ws/tunnel/{container_id}`) carries every forwarded connection
//! of the container as `>BBIH` frames (DESIGN section 4). The runner asks for connections with CONNECT; this
//! client dials `127.0.0.1:{port}` inside the container and relays DATA both ways, with per-connection flow
//! control when the runner negotiates it, and bounded buffers when it does not.
//!
//! Modules, from the wire up: [`frame`] (encoding), [`flow`] (credit and queue accounting), [`conn`]
//! (what the session and a connection share), [`tcp`] / [`udp`] (one task per connection), [`writer`] (the
//! single WebSocket writer), [`session`] (one WebSocket's read loop), [`net`] (connect/upgrade/TLS),
//! [`backoff`] and this file's [`run`] (the reconnect loop), [`config`], [`logging`]; [`exec`] is the process
//! plumbing of exec mode (the client in the background of the container's command); [`agent`] the heartbeats
//! of guest agent mode (`--agent`, inside a VM VPS).

pub mod agent;
pub mod backoff;
pub mod config;
pub mod conn;
pub mod exec;
pub mod flow;
pub mod frame;
pub mod logging;
pub mod net;
pub mod session;
pub mod tcp;
pub mod udp;
pub mod writer;

use backoff::Backoff;
use config::Config;
use log::{info, warn};
use session::End;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A session shorter than this does not reset the backoff, so a runner that accepts and immediately drops
/// the tunnel is retried with growing delays instead of in a tight loop.
const STABLE_SESSION: Duration = Duration::from_secs(2);

/// Why [`run`] gave up.
#[derive(Debug)]
pub enum RunError {
    /// Bad settings (for example an unreadable `--ca-file`).
    Setup(String),
    /// `--max-reconnect` consecutive attempts failed.
    GaveUp { attempts: u32, last: String },
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Setup(e) => f.write_str(e),
            Self::GaveUp { attempts, last } => write!(f, "giving up after {attempts} failed attempts: {last}"),
        }
    }
}

impl std::error::Error for RunError {}

/// Keep the tunnel up until `shutdown` turns true (or its sender is dropped), the runner closes cleanly with
/// `exit_on_close`, or `max_reconnect` consecutive attempts fail.
pub async fn run(cfg: Config, mut shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    let cfg = Arc::new(cfg);
    let tls = net::tls_connector(&cfg).map_err(RunError::Setup)?;
    let url = cfg.tunnel_url();
    let mut backoff = Backoff::new(cfg.reconnect_delay, cfg.max_backoff);
    let mut failures = 0u32;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let attempt = tokio::select! {
            r = net::connect(&cfg, tls.clone()) => r,
            _ = shutdown.changed() => return Ok(()),
        };
        match attempt {
            Ok(ws) => {
                if failures > 0 {
                    info!("connected to {url} after {failures} failed attempt(s)");
                } else {
                    info!("connected to {url}");
                }
                failures = 0;
                let started = Instant::now();
                let end = session::run(ws, cfg.clone(), shutdown.clone()).await;
                if started.elapsed() >= STABLE_SESSION {
                    backoff.reset();
                }
                match end {
                    End::Shutdown => {
                        info!("stopped");
                        return Ok(());
                    }
                    End::RunnerClosed if cfg.exit_on_close => {
                        info!("exiting (--exit-on-close)");
                        return Ok(());
                    }
                    // A runner restarting closes cleanly too: come back unless told otherwise.
                    End::RunnerClosed => info!("reconnecting"),
                    End::Lost(reason) => warn!("tunnel lost: {reason}; reconnecting"),
                }
            }
            Err(reason) => {
                failures += 1;
                if cfg.max_reconnect > 0 && failures >= cfg.max_reconnect {
                    return Err(RunError::GaveUp { attempts: failures, last: reason });
                }
                warn!("cannot reach {url}: {reason} (attempt {failures})");
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}
