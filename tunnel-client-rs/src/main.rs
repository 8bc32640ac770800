//! `tunnel-client`: parse flags and environment, set up logging and the runtime, run until stopped.
//!
//! Exec mode (`tunnel-client --exec [OPTIONS] -- COMMAND [ARGS...]`, the container entrypoint the runner
//! uses): fork the same client into the background, detached, then replace this process with COMMAND. The
//! client's troubles never become the command's: any setup error is logged (to `--log-file`, if any) and
//! the command runs without the tunnel.
//!
//! Fd-pass mode (`tunnel-client --fdpass SOCKET`, `kr ssh`'s ProxyCommand): `fdpass.rs`, dispatched first,
//! before clap, so that it costs only the process start.

use clap::{CommandFactory, Parser};
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tunnel_client::config::{self, Args, Config};
use tunnel_client::exec::{self, Forked};
use tunnel_client::logging;

mod fdpass;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    if let Some(code) = fdpass::requested(&argv) {
        return code;
    }
    let (front, command) = config::split_command(argv.clone());
    let exec_requested = front.iter().skip(1).any(|a| a == "--exec");
    match command {
        Some(command) if exec_requested && !command.is_empty() => exec_mode(&front, command),
        // Everything else is parsed exactly as before exec mode existed (`-- x` alone stays a usage error).
        _ => {
            let args = Args::parse_from(argv);
            if args.exec {
                Args::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "--exec needs the command to run: tunnel-client --exec [OPTIONS] -- COMMAND [ARGS...]",
                    )
                    .exit();
            }
            standalone(args)
        }
    }
}

/// The client in the foreground, as a process of its own.
fn standalone(args: Args) -> ExitCode {
    let level = match logging::parse_level(&args.log_level) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tunnel-client: {e}");
            return ExitCode::from(2);
        }
    };
    let log_file = args.log_file.clone();
    let threads = args.threads;
    let cfg = match Config::from_args(args, |name| std::env::var(name).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tunnel-client: {e}");
            return ExitCode::from(2);
        }
    };
    // Bad settings were reported on the terminal above; from here on the log (and any panic) goes to the file.
    if let Some(path) = &log_file {
        if let Err(e) = open_log(path).and_then(|f| exec::redirect(&f, libc::STDERR_FILENO)) {
            eprintln!("tunnel-client: cannot open --log-file {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    logging::init(level);
    run_client(cfg, threads)
}

/// What the background client of exec mode needs, all validated before the fork.
struct Background {
    cfg: Config,
    level: log::LevelFilter,
    threads: u8,
    log_file: Option<PathBuf>,
}

/// A reason to run the command without the tunnel, and where to say so.
struct NoTunnel {
    log_file: Option<PathBuf>,
    level: log::Level,
    message: String,
}

fn exec_mode(front: &[OsString], command: Vec<OsString>) -> ExitCode {
    let background = match prepare_background(front) {
        Ok(b) => b,
        Err(why) => {
            if let Some(path) = &why.log_file {
                logging::append_line(
                    path,
                    why.level,
                    format!("{}; running the command without the tunnel", why.message),
                );
            }
            return run_command(&command, None);
        }
    };
    let command_pid = std::process::id();
    // No thread exists yet (no runtime, no logger, nothing spawned): fork_client's precondition.
    match exec::fork_client() {
        Ok(Forked::Client) => run_in_background(background, command_pid),
        Ok(Forked::Command { client }) => run_command(&command, client),
        Err(e) => {
            if let Some(path) = &background.log_file {
                logging::append_line(path, log::Level::Error, format!("cannot start the background client: {e}"));
            }
            run_command(&command, None)
        }
    }
}

fn prepare_background(front: &[OsString]) -> Result<Background, NoTunnel> {
    let env = |name: &str| std::env::var(name).ok();
    let args = Args::try_parse_exec(front).map_err(|e| NoTunnel {
        log_file: config::log_file_hint(front, env),
        level: log::Level::Error,
        message: e.to_string().lines().next().unwrap_or("bad arguments").to_string(),
    })?;
    let log_file = args.log_file.clone();
    let failed = |message: String| NoTunnel { log_file: log_file.clone(), level: log::Level::Error, message };
    // No URL means the runner disabled the tunnel for this container: not an error.
    let url_given = args.runner_url.is_some() || env("KOHAKURIVER_TUNNEL_URL").is_some_and(|u| !u.trim().is_empty());
    if !url_given {
        return Err(NoTunnel {
            log_file: log_file.clone(),
            level: log::Level::Info,
            message: "KOHAKURIVER_TUNNEL_URL is not set".into(),
        });
    }
    let level = logging::parse_level(&args.log_level).map_err(failed)?;
    let threads = args.threads;
    let mut cfg = Config::from_args(args, env).map_err(failed)?;
    // The command outlives any runner outage, so the tunnel must come back whenever the runner does.
    cfg.max_reconnect = 0;
    Ok(Background { cfg, level, threads, log_file })
}

/// The detached grandchild: leave the task's stdio alone, then run the client as usual.
fn run_in_background(b: Background, command_pid: u32) -> ExitCode {
    // Unopenable log file: run silently rather than not at all (there is nowhere to report it).
    let log = b.log_file.as_deref().and_then(|p| open_log(p).ok());
    if exec::detach_stdio(log.as_ref()).is_err() {
        return ExitCode::FAILURE;
    }
    drop(log); // stderr now holds the file open.
    logging::init(b.level);
    log::info!("exec mode: running in the background of the container's command (pid {command_pid})");
    run_client(b.cfg, b.threads)
}

/// Become the command; only returns (with the shell's status for it) when that is impossible.
fn run_command(command: &[OsString], client: Option<libc::pid_t>) -> ExitCode {
    let err = exec::exec(command);
    // Nothing will use the tunnel now, and the client must not outlive this process's exit.
    if let Some(pid) = client {
        exec::terminate(pid);
    }
    let name = command.first().map(|c| c.to_string_lossy()).unwrap_or_default();
    eprintln!("tunnel-client: cannot run {name}: {err}");
    let missing = err.kind() == std::io::ErrorKind::NotFound;
    ExitCode::from(if missing { 127 } else { 126 })
}

fn open_log(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().append(true).create(true).open(path)
}

/// Build the runtime and keep the tunnel up until a signal (or a fatal error).
fn run_client(cfg: Config, threads: u8) -> ExitCode {
    keep_freed_memory();
    // A container may see many host CPUs; two threads already move several hundred MiB/s per connection,
    // and every container runs its own client, so more would only cost memory and wakeups.
    let workers = match usize::from(threads) {
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
            log::error!("cannot start the runtime: {e}");
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

/// Every read of a busy connection allocates a fresh 256 KiB frame buffer and frees one the writer is done
/// with. With glibc's defaults the heap top is trimmed (and big blocks unmapped) over and over, so each new
/// buffer is faulted in and zeroed again by the kernel: a tenth of the client's CPU in a bulk transfer.
/// Keeping freed memory for reuse costs at most what the windows allow in flight.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
