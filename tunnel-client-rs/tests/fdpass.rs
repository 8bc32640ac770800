//! The real binary in fd-pass mode (`tunnel-client --fdpass SOCKET`, `kr ssh`'s ProxyCommand), run as ssh
//! runs it: stdout is a Unix socket on which the descriptor must arrive. A real ssh and sshd take the
//! passed socket in tests/integration/test_ssh_fdpass.py.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tunnel-client");

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fdpass-bin-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("temp dir");
    dir
}

/// ssh's side: one byte and one descriptor, as OpenSSH's `mm_receive_fd` reads them.
fn receive_fd(sock: RawFd) -> Option<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; the buffers it points at live until the end of this function.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        if libc::recvmsg(sock, &mut msg, 0) != 1 {
            return None;
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return None;
        }
        Some(OwnedFd::from_raw_fd(libc::CMSG_DATA(cmsg).cast::<libc::c_int>().read_unaligned()))
    }
}

/// Run `tunnel-client ARGS` with stdout on a Unix socket (ssh's end is returned) and stderr captured.
fn run(args: &[&str]) -> (std::process::Child, UnixStream) {
    let (ssh_end, proxy_stdout) = UnixStream::pair().expect("pair");
    let child = Command::new(BIN)
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::from(OwnedFd::from(proxy_stdout)))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tunnel-client");
    (child, ssh_end)
}

#[test]
fn the_probe_answers() {
    let out = Command::new(BIN).arg("--fdpass-probe").env_clear().output().expect("run");
    assert!(out.status.success());
    assert_eq!(out.stdout, b"fdpass 1\n");
}

#[test]
fn the_tunnel_reaches_ssh_and_the_mode_is_quick() {
    let dir = temp_dir("ok");
    let path = dir.join("s");
    let listener = UnixListener::bind(&path).expect("bind");
    let (tunnel, mut sshd) = UnixStream::pair().expect("pair");
    let started = Instant::now();
    let (child, ssh_end) = run(&["--fdpass", path.to_str().unwrap()]);
    let (conn, _) = listener.accept().expect("accept");
    let asked = started.elapsed();
    // kr's side of the hand-over, with the same sendmsg layout as ssh_fast.py's.
    let fd = tunnel.as_raw_fd();
    let mut byte = [b'k'];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut control = [0u64; 8];
    // SAFETY: as in receive_fd; one control message with one int fits the 64-byte buffer.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
        libc::CMSG_DATA(cmsg).cast::<libc::c_int>().write_unaligned(fd);
        assert_eq!(libc::sendmsg(conn.as_raw_fd(), &msg, 0), 1);
    }
    drop(tunnel);
    let received = UnixStream::from(receive_fd(ssh_end.as_raw_fd()).expect("a descriptor on stdout"));
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{:?}", out.status);
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    sshd.write_all(b"SSH-2.0-test\r\n").expect("write");
    let mut banner = [0u8; 14];
    (&received).read_exact(&mut banner).expect("read");
    assert_eq!(&banner, b"SSH-2.0-test\r\n");
    // Generous on a loaded machine; a Python passer takes 10-20 ms just to start.
    assert!(asked < Duration::from_millis(500), "asked after {asked:?}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn failures_exit_1_and_say_nothing() {
    let dir = temp_dir("fail");
    // No listener at all.
    let (child, _ssh_end) = run(&["--fdpass", dir.join("missing").to_str().unwrap()]);
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // kr gave up: it closes the connection without a descriptor.
    let path = dir.join("s");
    let listener = UnixListener::bind(&path).expect("bind");
    let (child, _ssh_end) = run(&["--fdpass", path.to_str().unwrap()]);
    drop(listener.accept().expect("accept"));
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn other_arguments_are_the_clients() {
    // `--fdpass` without its socket is not this mode: clap reports it, as for any unknown use.
    let out = Command::new(BIN).arg("--fdpass").env_clear().output().expect("run");
    assert_eq!(out.status.code(), Some(2));
}
