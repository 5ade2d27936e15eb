//! Zero-downtime restart: a running server hands its listening sockets to the process that
//! replaces it, over a Unix socket with `SCM_RIGHTS` (unix(7)), the way nginx hands its
//! sockets to a new master. Both processes then hold the same socket files, so what the
//! kernel has queued on them moves with them: nothing queued is dropped (issue 11).
//!
//! The running server listens on an abstract-namespace `SOCK_SEQPACKET` socket named
//! `udpring/ADDR` (its bound address; abstract names live in the network namespace and
//! vanish with the process). The exchange, one message each:
//! 1. new → old: `udpring-takeover/1`
//! 2. old → new: `sockets N`, then N messages `socket I`, each carrying one descriptor, in
//!    worker order (the order they joined the SO_REUSEPORT group)
//! 3. the new process starts its workers on them; only then new → old: `go`. If it fails or
//!    exits instead, the old one sees the connection close and keeps serving.
//! 4. old: stops offering (closes its named socket), releases its listeners
//!    ([`Server::release_listeners`]) and answers `done`; the new process may now offer
//!    takeover itself under the same name.
//!
//! Only a process of the same user (or root) is served: an abstract socket has no file
//! permissions, so the peer's credentials (`SO_PEERCRED`) are checked instead.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::server::Server;
use crate::sys::cvt;

const HELLO: &[u8] = b"udpring-takeover/1";
/// How long either side waits for the other's next message. The new process's wait before
/// `go` includes starting its workers.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the offering thread looks at its stop flag.
const POLL_MS: libc::c_int = 100;

/// The abstract socket name a server bound to `addr` offers takeover under.
pub fn socket_name(addr: SocketAddr) -> String {
    format!("udpring/{addr}")
}

fn abstract_addr(addr: SocketAddr) -> io::Result<SockAddr> {
    SockAddr::unix(format!("\0{}", socket_name(addr)))
}

/// A running server's offer to hand its sockets over, served by a thread of its own until
/// it is dropped or a takeover completes.
pub struct TakeoverOffer {
    stop: Arc<AtomicBool>,
    taken: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TakeoverOffer {
    /// Whether another process has taken the sockets over (the listeners are released).
    pub fn taken_over(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }
}

impl Drop for TakeoverOffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Server {
    /// Offers this server's listening sockets to a process that asks for them with
    /// [`request`] (`udpring serve --takeover`). Fails with `AddrInUse` if another process
    /// offers under the same name.
    pub fn offer_takeover(&self) -> io::Result<TakeoverOffer> {
        let listener = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
        listener.bind(&abstract_addr(self.local_addr())?)?;
        listener.listen(4)?;
        let sockets = self.listeners();
        let release = self.releaser();
        let stop = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, taken) = (stop.clone(), taken.clone());
            std::thread::Builder::new()
                .name("udpring-takeover".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        if !readable(&listener, POLL_MS) {
                            continue;
                        }
                        let Ok((conn, _)) = listener.accept() else {
                            continue;
                        };
                        match hand_over(&conn, &sockets, &stop) {
                            Ok(pid) => {
                                // No one else may ask once the sockets are gone: stop
                                // offering before saying `done`, which frees the name.
                                drop(listener);
                                release();
                                taken.store(true, Ordering::Release);
                                tracing::info!(pid, "listeners handed over; finishing what this process still serves");
                                let _ = send(&conn, b"done", None);
                                return;
                            }
                            Err(e) => tracing::warn!(error = %e, "takeover did not complete; still serving"),
                        }
                    }
                })?
        };
        Ok(TakeoverOffer {
            stop,
            taken,
            thread: Some(thread),
        })
    }
}

/// Serves one takeover request up to the `go`; returns the new process's pid.
fn hand_over(conn: &Socket, sockets: &[Socket], stop: &AtomicBool) -> io::Result<u32> {
    // Short read timeouts, so that a shutdown of this process (the offer dropped) is not held
    // up by a new process that takes its time.
    conn.set_read_timeout(Some(Duration::from_millis(POLL_MS as u64)))?;
    conn.set_write_timeout(Some(STEP_TIMEOUT))?;
    let cred = peer_cred(conn)?;
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid != me && cred.uid != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "pid {} (uid {}) asked for the sockets; only uid {me} may take over",
                cred.pid, cred.uid
            ),
        ));
    }
    let mut buf = [0u8; 64];
    let (n, _) = recv_or_stop(conn, &mut buf, stop)?;
    if &buf[..n] != HELLO {
        return Err(io::Error::other(format!(
            "pid {} does not speak {}",
            cred.pid,
            String::from_utf8_lossy(HELLO)
        )));
    }
    send(conn, format!("sockets {}", sockets.len()).as_bytes(), None)?;
    for (i, s) in sockets.iter().enumerate() {
        send(conn, format!("socket {i}").as_bytes(), Some(s.as_raw_fd()))?;
    }
    tracing::info!(
        pid = cred.pid,
        sockets = sockets.len(),
        "listeners passed to a new process; serving until it says go"
    );
    let (n, _) = recv_or_stop(conn, &mut buf, stop)?;
    match &buf[..n] {
        b"go" => Ok(cred.pid as u32),
        [] => Err(io::Error::other(format!(
            "pid {} closed the connection before go (it could not start)",
            cred.pid
        ))),
        other => Err(io::Error::other(format!(
            "pid {} sent {:?} instead of go",
            cred.pid,
            String::from_utf8_lossy(other)
        ))),
    }
}

/// The sockets of a running server, received; it keeps serving until [`Handover::complete`].
pub struct Handover {
    conn: Socket,
    sockets: Vec<OwnedFd>,
    pid: u32,
}

impl Handover {
    /// The received listening sockets, in worker order (for [`Server::start_with_sockets`]
    /// with [`crate::SocketOrigin::HandedOver`]).
    pub fn take_sockets(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.sockets)
    }

    /// The pid of the process handing them over.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Tells the old process to go (call it once this process serves) and waits until it has
    /// stopped offering. Dropping a `Handover` without calling it leaves the old process
    /// serving.
    pub fn complete(self) -> io::Result<()> {
        send(&self.conn, b"go", None)?;
        let mut buf = [0u8; 16];
        let (n, _) = recv(&self.conn, &mut buf)?;
        if &buf[..n] != b"done" {
            return Err(io::Error::other(format!(
                "pid {} did not confirm the takeover",
                self.pid
            )));
        }
        Ok(())
    }
}

/// Asks the server offering takeover for `addr` for its sockets. `Ok(None)` when nothing
/// offers them (no server, or one that has already handed them over).
pub fn request(addr: SocketAddr) -> io::Result<Option<Handover>> {
    let conn = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
    match conn.connect(&abstract_addr(addr)?) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT)) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    }
    conn.set_read_timeout(Some(STEP_TIMEOUT))?;
    conn.set_write_timeout(Some(STEP_TIMEOUT))?;
    let pid = peer_cred(&conn)?.pid as u32;
    send(&conn, HELLO, None)?;
    let mut buf = [0u8; 64];
    let (n, _) = recv(&conn, &mut buf)?;
    let count: usize = std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|s| s.strip_prefix("sockets "))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::other(format!(
                "pid {pid} refused the takeover or answered {:?}",
                String::from_utf8_lossy(&buf[..n])
            ))
        })?;
    let mut sockets = Vec::with_capacity(count);
    for i in 0..count {
        let (_, fd) = recv(&conn, &mut buf)?;
        sockets.push(fd.ok_or_else(|| {
            io::Error::other(format!("pid {pid} sent socket {i} without a descriptor"))
        })?);
    }
    Ok(Some(Handover { conn, sockets, pid }))
}

/// [`recv`] on a socket with a short read timeout, retried until a message arrives, `stop`
/// is set, or [`STEP_TIMEOUT`] passes.
fn recv_or_stop(
    conn: &Socket,
    buf: &mut [u8],
    stop: &AtomicBool,
) -> io::Result<(usize, Option<OwnedFd>)> {
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    loop {
        match recv(conn, buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Acquire) {
                    return Err(io::Error::other("this server is shutting down"));
                }
                if std::time::Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the new process took too long",
                    ));
                }
            }
            other => return other,
        }
    }
}

/// Waits up to `timeout_ms` for `socket` to be readable.
fn readable(socket: &Socket, timeout_ms: libc::c_int) -> bool {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one live, initialised pollfd and the count passed is 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// Room for one `SCM_RIGHTS` message with one descriptor, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct OneFdControl([u8; 32]);

/// Sends one message, with `fd` attached as `SCM_RIGHTS` when given.
fn send(socket: &Socket, payload: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    let mut control = OneFdControl([0; 32]);
    // SAFETY: msghdr is plain data; every field used is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE and CMSG_LEN compute sizes from a constant; no memory is read.
        let (space, len) = unsafe {
            let n = std::mem::size_of::<RawFd>() as u32;
            (libc::CMSG_SPACE(n) as usize, libc::CMSG_LEN(n) as usize)
        };
        debug_assert!(space <= control.0.len());
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `msg` points at `control`, a live, zeroed, cmsghdr-aligned buffer of
        // `space` bytes, enough for one header and one descriptor (CMSG_SPACE); so
        // CMSG_FIRSTHDR is non-null and CMSG_DATA lies inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `msg` points at `iov` (which points at `payload`) and at `control`, all live
    // for the call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message into `buf`, with the descriptor it carries, if any. A message cut
/// short or carrying more than one descriptor is an error (and the extra ones are closed).
fn recv(socket: &Socket, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = OneFdControl([0; 32]);
    // SAFETY: msghdr is plain data; every field used is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len();
    let n = loop {
        // SAFETY: `msg` points at `iov` (which points at `buf`, `buf.len()` bytes) and at
        // `control` (its full length), all live and writable for the call.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to `msg.msg_controllen`; CMSG_FIRSTHDR and
    // CMSG_NXTHDR stay inside it, and each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / 4 descriptors that are now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count =
                    ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 || fds.len() > 1 {
        return Err(io::Error::other("takeover message cut short or malformed"));
    }
    Ok((n, fds.pop()))
}

/// The peer's pid and uid (`SO_PEERCRED`, unix(7)).
fn peer_cred(socket: &Socket) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals; the kernel writes at most `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor survives the trip: the received one is the same socket file.
    #[test]
    fn a_descriptor_crosses_a_seqpacket_pair() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        send(&a, b"socket 0", Some(udp.as_raw_fd())).unwrap();
        let mut buf = [0u8; 16];
        let (n, fd) = recv(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"socket 0");
        let got = Socket::from(fd.expect("a descriptor"));
        assert_eq!(
            got.local_addr().unwrap().as_socket(),
            Some(udp.local_addr().unwrap())
        );
        send(&a, b"go", None).unwrap();
        assert!(recv(&b, &mut buf).unwrap().1.is_none());
    }
}
