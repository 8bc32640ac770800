//! `tunnel-client --fdpass SOCKET`: the ProxyCommand of `kr ssh ID` (OpenSSH's `ProxyUseFdpass=yes`).
//!
//! `kr ssh` opens the tunnel to the VPS's sshd itself (the `REQUEST_TUNNEL` handshake with the host's SSH
//! proxy) and hands ssh the connected socket, so no process copies the session's bytes. ssh can only take a
//! socket from its ProxyCommand: it runs the command with its stdout on a Unix socket and expects one
//! descriptor there (`SCM_RIGHTS`, one byte of data), then the command's exit. The command cannot simply
//! inherit the tunnel from `kr`: ssh closes every descriptor above stderr when it starts (`closefrom(3)`),
//! before it runs its ProxyCommand. So `kr` listens on a Unix socket in a fresh 0700 directory and this mode
//! connects to it (`SOCKET`), receives the tunnel's descriptor and sends it on to ssh through stdout.
//!
//! Why here: the same few lines in Python cost a second interpreter start (~15 ms) on the time of every
//! `kr ssh`; this static binary starts in about a millisecond, and `kr` finds it where the runner does.
//! It is dispatched in `main` before clap and the rest of the client, and does nothing else.
//!
//! Failures exit 1 without a word: when `kr` gives up on the tunnel (the proxy refused, the VPS is gone) it
//! has already killed ssh and printed its one line, and nothing may reach the terminal after it. ssh says
//! what happened in every other case. `--fdpass-probe` prints [`PROBE_ANSWER`]: `kr` runs it once per binary
//! (cached by size and modification time) so that an older build without this mode is never used.
//!
//! The second unsafe module of the crate (with `exec`): `recvmsg`/`sendmsg` with a control message, which
//! std does not offer on stable Rust.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// The flag of this mode: `tunnel-client --fdpass SOCKET`.
pub const FLAG: &str = "--fdpass";
/// `tunnel-client --fdpass-probe` prints [`PROBE_ANSWER`] and a newline: this build has the mode.
pub const PROBE_FLAG: &str = "--fdpass-probe";
pub const PROBE_ANSWER: &str = "fdpass 1";
/// How long `kr` may take to hand the tunnel over (it may still be opening it: ssh starts first).
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The mode `argv` asks for, if it is one of this module's (exactly `--fdpass SOCKET` or `--fdpass-probe`).
pub fn requested(argv: &[OsString]) -> Option<ExitCode> {
    match argv {
        [_, flag, socket] if flag == FLAG => Some(run(Path::new(socket))),
        [_, flag] if flag == PROBE_FLAG => {
            println!("{PROBE_ANSWER}");
            Some(ExitCode::SUCCESS)
        }
        _ => None,
    }
}

/// Pass the descriptor from `socket` to stdout; 0 when ssh has it, else 1, silently (see the module comment).
fn run(socket: &Path) -> ExitCode {
    // SAFETY: fd 1 stays open for the whole process; nothing else closes it.
    let stdout = unsafe { BorrowedFd::borrow_raw(libc::STDOUT_FILENO) };
    match pass(socket, stdout, TIMEOUT) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Connect to the Unix socket `socket`, receive one descriptor (waiting at most `timeout`) and send it
/// through `out` as ssh's `ProxyUseFdpass` expects it.
pub fn pass(socket: &Path, out: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let from = UnixStream::connect(socket)?;
    from.set_read_timeout(Some(timeout))?;
    let fd = receive_fd(from.as_raw_fd())?;
    send_fd(out.as_raw_fd(), fd.as_raw_fd())
}

/// Room for one control message with a few descriptors, aligned as `cmsghdr` needs.
#[repr(C)]
union ControlBuffer {
    _align: libc::cmsghdr,
    bytes: [u8; 64],
}

/// Receive one byte and the first descriptor of an `SCM_RIGHTS` message from the socket `sock` (any other
/// descriptors that came with it are closed). An error when the peer closed or sent no descriptor.
pub fn receive_fd(sock: RawFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut control = ControlBuffer { bytes: [0; 64] };
    // SAFETY: an all-zero msghdr is valid (null name, no buffers); the fields set below point at live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: any bit pattern is a valid byte array; the buffer outlives msg.
    msg.msg_control = unsafe { control.bytes.as_mut_ptr() }.cast();
    msg.msg_controllen = std::mem::size_of::<ControlBuffer>() as _;
    let n = loop {
        // SAFETY: msg describes valid buffers (iov: 1 byte; control: 64 bytes) for the duration of the call.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/NXTHDR walk the control buffer recvmsg filled, within msg_controllen; CMSG_DATA
    // of an SCM_RIGHTS message holds (cmsg_len - CMSG_LEN(0)) / 4 ints, read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let count =
                    ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    match fds.into_iter().next() {
        Some(fd) if !truncated => Ok(fd), // the rest, if any, are closed as the iterator drops
        _ if n == 0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed without a descriptor")),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "no descriptor received")),
    }
}

/// Send the descriptor `fd` over the Unix socket `sock` with one zero byte, as OpenSSH's own `mm_send_fd`
/// does (ssh's `mm_receive_fd` wants exactly one byte and one descriptor).
pub fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut control = ControlBuffer { bytes: [0; 64] };
    // SAFETY: as in receive_fd; CMSG_SPACE(4) (24 bytes on Linux) fits the 64-byte buffer.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: see receive_fd.
    msg.msg_control = unsafe { control.bytes.as_mut_ptr() }.cast();
    let size = std::mem::size_of::<libc::c_int>() as u32;
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size) } as _;
    // SAFETY: the buffer holds one control message of CMSG_SPACE(4) bytes, so FIRSTHDR is non-null and
    // CMSG_DATA has room for one int.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size) as _;
        libc::CMSG_DATA(cmsg).cast::<libc::c_int>().write_unaligned(fd);
    }
    loop {
        // SAFETY: msg describes valid buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n == 1 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if n < 0 && err.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(if n < 0 { err } else { io::Error::new(io::ErrorKind::WriteZero, "nothing sent") });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    fn temp_socket(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fdpass-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("temp dir");
        dir.join("s")
    }

    /// `kr`'s side (a listener handing over one end of a socket pair) -> `pass` -> "ssh's" socket: the
    /// descriptor that arrives is the very socket `kr` had (bytes written to its peer come out of it).
    #[test]
    fn the_descriptor_reaches_the_other_side() {
        let path = temp_socket("ok");
        let listener = UnixListener::bind(&path).expect("bind");
        let (tunnel, mut sshd) = UnixStream::pair().expect("pair");
        let kr = std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            send_fd(conn.as_raw_fd(), tunnel.as_raw_fd()).expect("send");
        });
        let (ssh_end, proxy_stdout) = UnixStream::pair().expect("pair");
        // SAFETY: proxy_stdout lives until the end of the test.
        pass(&path, unsafe { BorrowedFd::borrow_raw(proxy_stdout.as_raw_fd()) }, TIMEOUT).expect("pass");
        kr.join().expect("kr thread");
        let received = UnixStream::from(receive_fd(ssh_end.as_raw_fd()).expect("receive"));
        sshd.write_all(b"SSH-2.0-test\r\n").expect("write");
        let mut banner = [0u8; 14];
        (&received).read_exact(&mut banner).expect("read");
        assert_eq!(&banner, b"SSH-2.0-test\r\n");
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }

    #[test]
    fn a_peer_that_closes_without_a_descriptor_is_an_error() {
        let path = temp_socket("closed");
        let listener = UnixListener::bind(&path).expect("bind");
        let kr = std::thread::spawn(move || drop(listener.accept().expect("accept")));
        let (_ssh_end, proxy_stdout) = UnixStream::pair().expect("pair");
        // SAFETY: proxy_stdout lives until the end of the test.
        let err = pass(&path, unsafe { BorrowedFd::borrow_raw(proxy_stdout.as_raw_fd()) }, TIMEOUT).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        kr.join().expect("kr thread");
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }

    #[test]
    fn bytes_without_a_descriptor_are_an_error() {
        let (a, b) = UnixStream::pair().expect("pair");
        (&a).write_all(b"k").expect("write");
        let err = receive_fd(b.as_raw_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_peer_that_never_answers_times_out() {
        let path = temp_socket("silent");
        let _listener = UnixListener::bind(&path).expect("bind"); // never accepts: the connect still succeeds
        let (_ssh_end, proxy_stdout) = UnixStream::pair().expect("pair");
        let started = std::time::Instant::now();
        // SAFETY: proxy_stdout lives until the end of the test.
        let out = unsafe { BorrowedFd::borrow_raw(proxy_stdout.as_raw_fd()) };
        let err = pass(&path, out, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(150));
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }

    #[test]
    fn only_the_exact_forms_are_this_modes() {
        let argv = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(requested(&argv(&["tunnel-client"])).is_none());
        assert!(requested(&argv(&["tunnel-client", "--fdpass"])).is_none());
        assert!(requested(&argv(&["tunnel-client", "--fdpass", "a", "b"])).is_none());
        assert!(requested(&argv(&["tunnel-client", "--runner-url", "ws://x"])).is_none());
    }
}
