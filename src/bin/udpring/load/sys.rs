//! The load generator's system calls: client sockets, socket addresses in the kernel's format,
//! batched `sendmmsg` / `recvmmsg`, single resends, the epoll set and process CPU time. All of
//! the load generator's `unsafe` code lives here.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use udpring::datagram::{decode_sockaddr, encode_sockaddr, SOCKADDR_IN6_LEN};

/// Messages per `recvmmsg` / `sendmmsg` call.
pub(super) const BATCH: usize = 64;

/// CPU time of this process (user, system) in seconds.
pub(super) fn cpu_times() -> (f64, f64) {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; RUSAGE_SELF is a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return (0.0, 0.0);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// Sets this thread's timer slack to `ns` nanoseconds (best effort; errors are ignored).
pub(super) fn set_timer_slack(ns: libc::c_ulong) {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, ns);
    }
}

/// Sends `buf` as one datagram on `fd`: to `dest`, or to the connected socket's peer when
/// `dest` is `None`.
pub(super) fn send_to(fd: RawFd, buf: &[u8], dest: Option<&RawAddr>) -> io::Result<usize> {
    let (name, namelen) = match dest {
        Some(d) => (d.as_ptr(), d.len),
        None => (std::ptr::null(), 0),
    };
    // SAFETY: `buf` is a valid readable buffer of `buf.len()` bytes for the call; `fd` is the
    // client's open socket, connected when `name` is null, and `name` otherwise points at
    // `namelen` bytes of the destination, which outlives the call.
    let rc = unsafe {
        libc::sendto(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            name,
            namelen,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// A socket address in the kernel's format, for `sendmmsg`/`sendto` on unconnected sockets.
/// The bytes come from the library's codec ([`encode_sockaddr`]), the one the server's replies
/// use too.
#[derive(Clone, Copy)]
pub(super) struct RawAddr {
    pub(super) addr: SocketAddr,
    bytes: [u8; SOCKADDR_IN6_LEN],
    len: libc::socklen_t,
}

impl RawAddr {
    /// `addr` for a socket of its own family: how [`open_client`] opens the clients' sockets
    /// for the target.
    pub(super) fn new(addr: SocketAddr) -> Self {
        // An address always encodes for a socket of its own family; only an IPv6 address
        // for an IPv4 socket does not.
        Self::for_socket(addr, addr.is_ipv6())
            .expect("an address encodes for a socket of its own family")
    }

    /// `addr` for a socket of the given family; `None` for an IPv6 address and an IPv4
    /// socket.
    pub(super) fn for_socket(addr: SocketAddr, socket_is_v6: bool) -> Option<Self> {
        let mut bytes = [0u8; SOCKADDR_IN6_LEN];
        let len = encode_sockaddr(addr, socket_is_v6, &mut bytes)?;
        Some(RawAddr { addr, bytes, len })
    }

    /// The `msg_name` / `dest_addr` pointer; the kernel only reads through it.
    fn as_ptr(&self) -> *const libc::sockaddr {
        self.bytes.as_ptr().cast()
    }
}

pub(super) fn open_client(target: SocketAddr, connect: bool) -> io::Result<Socket> {
    let sock = Socket::new(
        Domain::for_address(target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    sock.set_nonblocking(true)?;
    // Best effort: the kernel clamps to net.core.{r,w}mem_max.
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    let local: SocketAddr = match target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => (Ipv4Addr::LOCALHOST, 0).into(),
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(ip) if ip.is_loopback() => (Ipv6Addr::LOCALHOST, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    sock.bind(&local.into())?;
    if connect {
        sock.connect(&target.into())?;
    }
    Ok(sock)
}

fn errno_is(e: &io::Error, codes: &[i32]) -> bool {
    e.raw_os_error().is_some_and(|c| codes.contains(&c))
}

/// Scratch buffers for `sendmmsg` / `recvmmsg`. Pointers into the buffers are rebuilt for
/// every call, so nothing here is self-referential.
pub(super) struct Io {
    size: usize,
    pub(super) send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
    recv_len: usize,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    /// Source addresses of received datagrams (--follow-reply-port), as the kernel writes
    /// them: a UDP socket's peer is a `sockaddr_in` or `sockaddr_in6`, so this is room enough.
    names: Vec<[u8; SOCKADDR_IN6_LEN]>,
}

impl Io {
    pub(super) fn new(size: usize) -> Self {
        let recv_len = (size + 64).max(2048);
        Io {
            size,
            // Padding byte pattern; headers are written over it per request.
            send_buf: vec![0xA5; size * BATCH],
            recv_buf: vec![0; recv_len * BATCH],
            recv_len,
            // SAFETY: all-zero iovec/mmsghdr (null pointers, zero lengths) are valid values.
            iov: vec![unsafe { std::mem::zeroed() }; BATCH],
            // SAFETY: as above.
            msgs: vec![unsafe { std::mem::zeroed() }; BATCH],
            names: vec![[0; SOCKADDR_IN6_LEN]; BATCH],
        }
    }

    /// Points `msgs[..n]` at `n` consecutive chunks of `len` bytes of `buf`.
    fn prepare(iov: &mut [libc::iovec], msgs: &mut [libc::mmsghdr], buf: &mut [u8], len: usize) {
        for (i, (v, m)) in iov.iter_mut().zip(msgs.iter_mut()).enumerate() {
            v.iov_base = buf[i * len..].as_mut_ptr().cast();
            v.iov_len = len;
            m.msg_hdr.msg_name = std::ptr::null_mut();
            m.msg_hdr.msg_namelen = 0;
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = std::ptr::null_mut();
            m.msg_hdr.msg_controllen = 0;
            m.msg_hdr.msg_flags = 0;
            m.msg_len = 0;
        }
    }

    /// Sends the first `n` (<= BATCH) encoded requests of `send_buf` on `fd`: to `dest`, or
    /// on the connected socket's peer when `dest` is `None`. Returns how many the kernel
    /// took; the first error is returned only if nothing was sent.
    pub(super) fn send_batch(
        &mut self,
        fd: RawFd,
        n: usize,
        dest: Option<&RawAddr>,
    ) -> io::Result<usize> {
        let n = n.min(BATCH);
        Self::prepare(
            &mut self.iov[..n],
            &mut self.msgs[..n],
            &mut self.send_buf,
            self.size,
        );
        if let Some(d) = dest {
            for m in &mut self.msgs[..n] {
                // The kernel only reads msg_name on send; `d` outlives the call.
                m.msg_hdr.msg_name = d.as_ptr().cast_mut().cast();
                m.msg_hdr.msg_namelen = d.len;
            }
        }
        let mut done = 0;
        while done < n {
            let left = u32::try_from(n - done).unwrap_or(u32::MAX);
            // SAFETY: msgs[done..n] are initialised mmsghdrs whose iovecs point into
            // `send_buf`, which outlives the call; msg_name is null (connected socket) or
            // points at `dest`, which outlives the call.
            let rc = unsafe {
                libc::sendmmsg(fd, self.msgs[done..].as_mut_ptr(), left, libc::MSG_DONTWAIT)
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return if done > 0 { Ok(done) } else { Err(e) };
            }
            if rc == 0 {
                break;
            }
            done += rc as usize;
        }
        Ok(done)
    }

    /// One `recvmmsg` of up to BATCH datagrams; returns how many arrived (0 on EAGAIN).
    /// With `names`, each datagram's source address is kept (see [`Io::source`]).
    pub(super) fn recv_batch(&mut self, fd: RawFd, names: bool) -> io::Result<usize> {
        Self::prepare(
            &mut self.iov,
            &mut self.msgs,
            &mut self.recv_buf,
            self.recv_len,
        );
        if names {
            for (m, name) in self.msgs.iter_mut().zip(self.names.iter_mut()) {
                m.msg_hdr.msg_name = name.as_mut_ptr().cast();
                m.msg_hdr.msg_namelen = SOCKADDR_IN6_LEN as libc::socklen_t;
            }
        }
        loop {
            // SAFETY: msgs[..BATCH] are initialised mmsghdrs whose iovecs point into
            // `recv_buf` (BATCH chunks of recv_len bytes) and whose msg_name is null or
            // points into `names` (room for a sockaddr_in6 each, the namelen given); both
            // outlive the call.
            let rc = unsafe {
                libc::recvmmsg(
                    fd,
                    self.msgs.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                return Ok(rc as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    /// Source address of received datagram `i` of the last `recv_batch(.., true)`.
    pub(super) fn source(&self, i: usize) -> Option<SocketAddr> {
        // The kernel sets msg_namelen to the address's full length, which may exceed the
        // room given (then the address was cut and does not decode).
        let len = self.msgs[i].msg_hdr.msg_namelen as usize;
        decode_sockaddr(self.names[i].get(..len)?).ok()
    }

    /// Payload of received datagram `i` of the last `recv_batch`.
    pub(super) fn received(&self, i: usize) -> &[u8] {
        let len = (self.msgs[i].msg_len as usize).min(self.recv_len);
        &self.recv_buf[i * self.recv_len..i * self.recv_len + len]
    }
}

/// Level-triggered epoll set with microsecond timeouts (epoll_pwait2, falling back to
/// epoll_wait rounded up to whole milliseconds on old kernels).
pub(super) struct Epoll {
    fd: OwnedFd,
    pub(super) events: Vec<libc::epoll_event>,
    pwait2: bool,
}

impl Epoll {
    pub(super) fn new(cap: usize) -> io::Result<Self> {
        // SAFETY: plain syscall with a valid flag.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll {
            // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; cap.clamp(1, 1024)],
            pwait2: true,
        })
    }

    pub(super) fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both descriptors are open; `ev` is a valid epoll_event.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout`; returns the number of ready events in `self.events`.
    pub(super) fn wait(&mut self, timeout: Duration) -> io::Result<usize> {
        let max = i32::try_from(self.events.len()).unwrap_or(i32::MAX);
        let rc = if self.pwait2 {
            let ts = libc::timespec {
                tv_sec: timeout.as_secs().min(3600) as libc::time_t,
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            };
            // SAFETY: epoll_pwait2(epfd, events, maxevents, timeout, sigmask, sigsetsize):
            // `events` has room for `max` entries, `ts` is a valid timespec, and a null
            // sigmask leaves the signal mask unchanged.
            unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    self.fd.as_raw_fd(),
                    self.events.as_mut_ptr(),
                    max,
                    &ts as *const libc::timespec,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                ) as i32
            }
        } else {
            let ms = timeout.as_micros().div_ceil(1000).min(3_600_000) as i32;
            // SAFETY: `events` has room for `max` entries.
            unsafe { libc::epoll_wait(self.fd.as_raw_fd(), self.events.as_mut_ptr(), max, ms) }
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if errno_is(&e, &[libc::ENOSYS]) && self.pwait2 {
                self.pwait2 = false;
                return Ok(0);
            }
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(rc as usize)
    }
}
