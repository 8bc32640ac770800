//! `tunnel-client`: parse flags and environment, set up logging and the runtime, run until stopped.

use clap::Parser;
use std::process::ExitCode;
use tunnel_client::config::{Args, Config};
use tunnel_client::logging;

fn main() -> ExitCode {
    let args = Args::parse();
    let threads = usize::from(args.threads);
    let level = match logging::parse_level(&args.log_level) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tunnel-client: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(level);
    let cfg = match Config::from_args(args, |name| std::env::var(name).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tunnel-client: {e}");
            return ExitCode::from(2);
        }
    };
    // A container may see many host CPUs; two threads already move several hundred MiB/s per connection,
    // and every container runs its own client, so more would only cost memory and wakeups.
    let workers = match threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(2),
        n => n,
    };
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tunnel-client: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            log::info!("signal received; closing the tunnel");
            let _ = stop_tx.send(true);
            // Keep the sender alive: dropping it would also read as "stop", which is fine, but explicit.
            std::future::pending::<()>().await;
        });
        log::info!("tunnel-client {} starting for container {}", env!("CARGO_PKG_VERSION"), cfg.container_id);
        let run = tokio::spawn(tunnel_client::run(cfg, stop_rx));
        match run.await.unwrap_or_else(|e| Err(tunnel_client::RunError::Setup(format!("client task failed: {e}")))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                log::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGTERM (docker stop) or SIGINT.
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
