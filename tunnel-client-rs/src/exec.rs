//! The process plumbing of exec mode (`tunnel-client --exec -- COMMAND...`), and the only unsafe code of the
//! crate: a double fork that leaves the tunnel client running in the background, detached, and an `execvp`
//! that turns this process into the container's command.
//!
//! Why this shape: the runner makes the client the container's entrypoint, but the task's command must stay
//! the process docker's init started (same PID, argv, exit status, signals from `docker stop`). So this
//! process forks the client away and then *becomes* the command. The client is a grandchild: it is
//! reparented to the init (which reaps it), it is not a child of the command (a shell's `wait` never waits
//! for it) and, after `setsid`, it is in neither the command's process group nor its session (a terminal's
//! Ctrl-C does not reach it).
//!
//! Safety argument, once for the whole module: [`fork_client`] must be called while the process has exactly
//! one thread (before the tokio runtime or any other thread exists; `main` guarantees that). Forking a
//! single-threaded process copies a consistent heap and no lock can be held by a thread that does not exist
//! in the child, so the grandchild may run ordinary Rust code (allocate, build the runtime). The
//! intermediate child only calls async-signal-safe functions (`close`, `setsid`, `fork`, `write`, `_exit`)
//! anyway, and exits with `_exit` so no Rust destructor or atexit handler runs twice.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

/// Which process [`fork_client`] returned in.
#[derive(Debug)]
pub enum Forked {
    /// The original process: exec the command next. `client` is the background client's pid when the
    /// intermediate child could report it.
    Command { client: Option<libc::pid_t> },
    /// The detached grandchild: run the tunnel client.
    Client,
}

/// Double fork (see the module comment). Returns twice on success: once in this process, after the
/// intermediate child has been reaped (no zombie is left), once in the detached grandchild.
///
/// The caller must ensure the process is single-threaded.
pub fn fork_client() -> io::Result<Forked> {
    let mut fds = [0 as libc::c_int; 2];
    // The pipe carries the grandchild's pid back, so a failed exec can stop the client it started.
    // SAFETY: `fds` is a valid array of two ints, as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (read_end, write_end) = (fds[0], fds[1]);
    // SAFETY: the process is single-threaded (the caller's contract), so the child is a full, consistent copy.
    let middle = unsafe { libc::fork() };
    if middle < 0 {
        let err = io::Error::last_os_error();
        close(read_end);
        close(write_end);
        return Err(err);
    }
    if middle == 0 {
        // Intermediate child: only async-signal-safe calls, then _exit.
        // SAFETY: close/setsid/fork/write/_exit are async-signal-safe and touch no Rust state.
        unsafe {
            libc::close(read_end);
            // Cannot fail: a freshly forked child is never a process-group leader.
            libc::setsid();
            let grandchild = libc::fork();
            if grandchild == 0 {
                libc::close(write_end);
                return Ok(Forked::Client);
            }
            if grandchild < 0 {
                libc::_exit(1);
            }
            let pid = grandchild.to_ne_bytes();
            // A short or failed write only loses the pid; the parent copes with that.
            libc::write(write_end, pid.as_ptr().cast(), pid.len());
            libc::_exit(0);
        }
    }
    close(write_end);
    let client = read_pid(read_end);
    close(read_end);
    match wait_for(middle) {
        Ok(status) if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 => Ok(Forked::Command { client }),
        Ok(_) => Err(io::Error::other("the second fork failed")),
        // ECHILD: SIGCHLD is ignored (inherited), so the kernel reaped the child itself; it reported the
        // grandchild's pid, or failed before doing so.
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) && client.is_some() => Ok(Forked::Command { client }),
        Err(e) => Err(e),
    }
}

/// Point stdin and stdout at /dev/null and stderr at `log` (or /dev/null), so the background client never
/// reads the task's input nor writes into its captured output, and its log (and any panic message) lands
/// in the log file.
pub fn detach_stdio(log: Option<&File>) -> io::Result<()> {
    let null = File::options().read(true).write(true).open("/dev/null")?;
    redirect(&null, libc::STDIN_FILENO)?;
    redirect(&null, libc::STDOUT_FILENO)?;
    redirect(log.unwrap_or(&null), libc::STDERR_FILENO)
}

/// Make `target` (0, 1 or 2) refer to `file`'s open file description.
pub fn redirect(file: &File, target: libc::c_int) -> io::Result<()> {
    // SAFETY: dup2 on an fd we own onto a standard descriptor; std's stdio handles are unbuffered for
    // stderr and we have written nothing to stdout, so no buffered byte goes to the wrong place.
    if unsafe { libc::dup2(file.as_raw_fd(), target) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Replace this process with `command` (searched in PATH like a shell does). Returns only when that fails:
/// the caller reports the error (127 for a missing command, 126 otherwise, as shells do).
pub fn exec(command: &[OsString]) -> io::Error {
    let argv: Vec<CString> = match command.iter().map(|a| CString::new(a.as_bytes())).collect() {
        Ok(v) => v,
        // Unreachable for real argv (the kernel hands out NUL-terminated strings), but not a panic.
        Err(_) => return io::Error::from_raw_os_error(libc::EINVAL),
    };
    if argv.is_empty() {
        return io::Error::from_raw_os_error(libc::EINVAL);
    }
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: Rust's runtime sets SIGPIPE to "ignore" at start-up and ignored signals survive execve; the
    // command must get the default (`yes | head` relies on it). Handled signals reset by themselves.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // SAFETY: `ptrs` is a NULL-terminated array of pointers into `argv`, which outlives the call.
    unsafe { libc::execvp(ptrs[0], ptrs.as_ptr()) };
    io::Error::last_os_error()
}

/// Ask the background client to stop (the command could not be started, so nobody needs the tunnel).
pub fn terminate(pid: libc::pid_t) {
    // SAFETY: kill has no memory-safety preconditions; pid is a process we created moments ago.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

fn read_pid(fd: libc::c_int) -> Option<libc::pid_t> {
    let mut buf = [0u8; std::mem::size_of::<libc::pid_t>()];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reads into the unfilled tail of `buf`, within its bounds.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        match n {
            n if n > 0 => got += n as usize,
            n if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => return None,
        }
    }
    Some(libc::pid_t::from_ne_bytes(buf))
}

fn wait_for(pid: libc::pid_t) -> io::Result<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        if unsafe { libc::waitpid(pid, &mut status, 0) } >= 0 {
            return Ok(status);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn close(fd: libc::c_int) {
    // SAFETY: fd is one of our pipe ends, closed once.
    unsafe { libc::close(fd) };
}
