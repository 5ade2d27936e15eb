//! `--takeover` trusts no peer (issue 14, defect 4): a process of another user offering on the
//! abstract name, a peer that names a huge socket count, and peers that offer the wrong
//! descriptors are refused with one line naming the peer's pid and uid, exit 1, and nothing
//! is served on what they offered.

use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{ExitStatus, Stdio};
use std::thread::JoinHandle;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::common::*;
use crate::ops::process::*;

/// The uid (and gid) of `nobody`, the other user.
const NOBODY: u32 = 65534;

/// Runs `udpring serve --bind ADDR --takeover --workers 1`, which must exit within [`WAIT`]
/// (it is killed otherwise, and the test fails); returns its status and stderr.
fn take_over(addr: SocketAddr) -> (ExitStatus, String) {
    let mut child = udpring()
        .args(["serve", "--bind", &addr.to_string(), "--takeover"])
        .args(["--workers", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("udpring starts");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let mut status = None;
    wait_until(WAIT, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    let status = status.unwrap_or_else(|| {
        panic!("--takeover did not exit within {WAIT:?}:\nstdout: {stdout}\nstderr: {stderr}")
    });
    (status, stderr)
}

/// The refusal: exit 1 and exactly one line, the one that names the peer.
fn assert_refused(status: ExitStatus, stderr: &str, peer_pid: u32, peer_uid: u32, why: &str) {
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    let expected = format!("takeover refused: peer pid {peer_pid} uid {peer_uid} {why}");
    assert!(lines[0].contains(&expected), "{expected:?} in {stderr}");
}

/// An address with a port that was free a moment ago.
fn free_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
}

/// Another local user's udpring offers takeover under the name a root `--takeover` looks
/// for. Root refuses its sockets (the offer itself would hand them over).
#[test]
fn a_takeover_peer_of_another_user_is_refused() {
    if !kernel_supports_udpring() {
        return;
    }
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("needs root, to start a udpring as another user (nobody)");
        return;
    }
    // A target directory under a private home cannot be entered by nobody: then nobody runs a
    // copy in a directory of its own under the temporary directory.
    let runs_as_nobody = |path: &std::path::Path| {
        std::process::Command::new(path)
            .arg("--version")
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_udpring"));
    let copy_dir = std::env::temp_dir().join(format!("udpring-nobody-{}", std::process::id()));
    let binary = if runs_as_nobody(&built) {
        built
    } else {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::create_dir_all(&copy_dir);
        let _ = std::fs::set_permissions(&copy_dir, std::fs::Permissions::from_mode(0o755));
        let copy = copy_dir.join("udpring");
        let _ = std::fs::copy(&built, &copy);
        let _ = std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755));
        copy
    };
    if !runs_as_nobody(&binary) {
        let _ = std::fs::remove_dir_all(&copy_dir);
        skip_or_fail(&format!(
            "nobody (uid {NOBODY}) cannot run {} or a copy of it in {}",
            env!("CARGO_BIN_EXE_udpring"),
            copy_dir.display()
        ));
        return;
    }
    let mut cmd = std::process::Command::new(&binary);
    cmd.args(["serve", "--bind", "127.0.0.1:0", "--workers", "1"])
        .uid(NOBODY)
        .gid(NOBODY);
    let other = spawn_serving(cmd);
    let other_pid = other.pid();
    let (status, stderr) = take_over(other.addr);
    let client = client_for(other.addr);
    let still_served = round_trip(&client, other.addr, b"still nobody's").is_some();
    let f = other.term();
    let _ = std::fs::remove_dir_all(&copy_dir);
    assert_refused(
        status,
        &stderr,
        other_pid,
        NOBODY,
        "is neither this user nor root",
    );
    assert!(still_served, "the other user's server serves on");
    assert!(
        !f.stderr.contains("listeners handed over"),
        "nothing was handed over:\n{}",
        f.stderr
    );
}

/// A trusted (same-user) peer in this test process, listening on the abstract name for
/// `addr`, speaking takeover version 1 as an older udpring does: it closes the connection on
/// the version-3 and version-2 hellos (the new process then asks again in version 1), reads the `/1` hello,
/// sends `messages` (payload, descriptor), then waits until the other side closes or says
/// something (`go`), and returns what it said.
fn fake_offer(addr: SocketAddr, messages: Vec<(String, Option<OwnedFd>)>) -> JoinHandle<String> {
    let listener = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).expect("socket");
    let name = SockAddr::unix(format!("\0udpring/{addr}")).expect("abstract name");
    listener.bind(&name).expect("bind the takeover name");
    listener.listen(1).expect("listen");
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let conn = loop {
            let (conn, _) = listener.accept().expect("accept");
            conn.set_read_timeout(Some(WAIT)).expect("timeout");
            let n = (&conn).read(&mut buf).expect("hello");
            match &buf[..n] {
                b"udpring-takeover/1" => break conn,
                // Closed: version 1 knows no other.
                b"udpring-takeover/3" | b"udpring-takeover/2" => continue,
                other => panic!("hello {:?}", String::from_utf8_lossy(other)),
            }
        };
        for (payload, fd) in &messages {
            send_with_fd(
                &conn,
                payload.as_bytes(),
                fd.as_ref().map(|f| f.as_raw_fd()),
            );
        }
        // EOF when the new process exits; `go` if it chose to serve.
        let n = (&conn).read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).to_string()
    })
}

/// One SOCK_SEQPACKET message with `fd` attached as SCM_RIGHTS (unix(7)).
fn send_with_fd(conn: &Socket, payload: &[u8], fd: Option<RawFd>) {
    #[repr(C, align(8))]
    struct Control([u8; 32]);
    let mut control = Control([0; 32]);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain data; the fields used are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE/CMSG_LEN compute sizes from a constant.
        let (space, len) = unsafe {
            let n = std::mem::size_of::<RawFd>() as u32;
            (libc::CMSG_SPACE(n) as usize, libc::CMSG_LEN(n) as usize)
        };
        assert!(space <= control.0.len());
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `msg` points at `control`, zeroed, aligned for cmsghdr and CMSG_SPACE(4)
        // bytes long, so the first header and its one descriptor lie inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `msg` points at `iov` (at `payload`) and `control`, live for the call.
    let n = unsafe { libc::sendmsg(conn.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    assert!(n >= 0, "sendmsg: {}", std::io::Error::last_os_error());
}

/// This process, as the peer the refusal names.
fn me() -> (u32, u32) {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    (std::process::id(), unsafe { libc::geteuid() })
}

#[test]
fn a_huge_socket_count_is_refused_without_allocating() {
    if !kernel_supports_udpring() {
        return;
    }
    let addr = free_addr();
    let peer = fake_offer(addr, vec![("sockets 1099511627776".into(), None)]);
    let (status, stderr) = take_over(addr);
    assert_eq!(peer.join().expect("peer"), "", "no go");
    let (pid, uid) = me();
    assert_refused(
        status,
        &stderr,
        pid,
        uid,
        "offered 1099511627776 sockets; 1..=1024 are accepted",
    );
}

/// A UDP socket with SO_REUSEPORT (or not) bound to `addr`.
fn udp(addr: SocketAddr, reuse_port: bool) -> OwnedFd {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    s.set_reuse_port(reuse_port).expect("SO_REUSEPORT");
    s.bind(&addr.into()).expect("bind");
    s.into()
}

/// One wrong descriptor after a good one: refused, naming which and why; nothing served.
fn refuses_offered(wrong: impl FnOnce(SocketAddr) -> OwnedFd, why: &str) {
    let addr = free_addr();
    let peer = fake_offer(
        addr,
        vec![
            ("sockets 2".into(), None),
            ("socket 0".into(), Some(udp(addr, true))),
            ("socket 1".into(), Some(wrong(addr))),
        ],
    );
    let (status, stderr) = take_over(addr);
    assert_eq!(peer.join().expect("peer"), "", "no go");
    let (pid, uid) = me();
    assert_refused(
        status,
        &stderr,
        pid,
        uid,
        &format!("offered as socket 1 {why}"),
    );
}

#[test]
fn a_takeover_peer_offering_a_tcp_socket_is_refused() {
    if !kernel_supports_udpring() {
        return;
    }
    refuses_offered(
        |addr| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("tcp");
            s.set_reuse_port(true).expect("SO_REUSEPORT");
            s.bind(&addr.into()).expect("bind");
            s.into()
        },
        "a socket of type",
    );
}

#[test]
fn a_takeover_peer_offering_a_socket_bound_elsewhere_is_refused() {
    if !kernel_supports_udpring() {
        return;
    }
    refuses_offered(
        |_| udp("127.0.0.1:0".parse().expect("literal"), true),
        "a UDP socket bound to 127.0.0.1:",
    );
}

#[test]
fn a_takeover_peer_offering_a_socket_without_reuseport_is_refused() {
    if !kernel_supports_udpring() {
        return;
    }
    // The good socket 0 holds the address with SO_REUSEPORT, so the wrong one is bound to
    // the same IP on a port of its own; the check then names the address first. Offered
    // alone on its own address instead, the missing SO_REUSEPORT is what is refused.
    let plain = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = plain.local_addr().expect("addr");
    let peer = fake_offer(
        addr,
        vec![
            ("sockets 1".into(), None),
            ("socket 0".into(), Some(OwnedFd::from(plain))),
        ],
    );
    let (status, stderr) = take_over(addr);
    assert_eq!(peer.join().expect("peer"), "", "no go");
    let (pid, uid) = me();
    assert_refused(
        status,
        &stderr,
        pid,
        uid,
        "offered as socket 0 a UDP socket without SO_REUSEPORT",
    );
}

/// The library holds handed-over sockets to the same rule, however they arrived.
#[test]
fn start_with_sockets_refuses_a_handed_over_socket_without_reuseport() {
    if !kernel_supports_udpring() {
        return;
    }
    let plain = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = plain.local_addr().expect("addr");
    let e = udpring::Server::start_with_sockets(
        config(&addr.to_string(), 1),
        vec![OwnedFd::from(plain)],
        udpring::ops::SocketOrigin::HandedOver,
        |_| udpring::apps::Echo,
    )
    .err()
    .expect("refused");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("SO_REUSEPORT"), "{e}");
}
