//! The load generator's system calls: client sockets, socket addresses in the kernel's format,
//! batched `sendmmsg` / `recvmmsg` (with `--gso`, of GSO trains and coalesced receives),
//! single resends, the epoll set and process CPU time. All of the load generator's `unsafe`
//! code lives here.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use udpring::kernel::wire::{
    decode_sockaddr, encode_sockaddr, encode_udp_segment, find_gro_segment_size, CONTROL_LEN,
    SOCKADDR_IN6_LEN,
};

use super::gso::{split_gro, train_lens, GRO_RECV_LEN};

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

/// Turns on `UDP_GRO` (Linux 5.0): the kernel may then hand several datagrams of one size
/// from the same sender to one receive, with their size in a control message (udp(7)).
pub(super) fn enable_gro(sock: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `sock` is an open socket; the option value is a valid c_int whose size is given,
    // and the kernel only reads it during the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Room for one message's control data, aligned as `struct cmsghdr` must be (cmsg(3)).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

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
    /// `--gso`: receives may be coalesced (`UDP_GRO`), so each has room for a whole GRO
    /// buffer and for the control message that gives its segment size.
    gro: bool,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    /// Control data per message: the `UDP_SEGMENT` of each train sent, the `UDP_GRO` of each
    /// receive. A call's pointers are rebuilt before it, so sends and receives share them.
    controls: Vec<Control>,
    /// Requests in each train of the last `send_trains`.
    train_lens: [usize; BATCH],
    /// Source addresses of received datagrams (--follow-reply-port), as the kernel writes
    /// them: a UDP socket's peer is a `sockaddr_in` or `sockaddr_in6`, so this is room enough.
    names: Vec<[u8; SOCKADDR_IN6_LEN]>,
}

impl Io {
    /// Buffers for `size`-byte requests; with `gro`, each receive has room for a coalesced
    /// buffer (64 KiB each, touched only as far as the kernel writes).
    pub(super) fn new(size: usize, gro: bool) -> Self {
        let recv_len = if gro {
            GRO_RECV_LEN
        } else {
            (size + 64).max(2048)
        };
        Io {
            size,
            // Padding byte pattern; headers are written over it per request.
            send_buf: vec![0xA5; size * BATCH],
            recv_buf: vec![0; recv_len * BATCH],
            recv_len,
            gro,
            controls: vec![Control([0; CONTROL_LEN]); BATCH],
            train_lens: [0; BATCH],
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
        set_dest(&mut self.msgs[..n], dest);
        // SAFETY: msgs[..n] were just pointed at `send_buf` (whole requests, inside it), with
        // no control data, and at `dest` or no name; both outlive the call.
        unsafe { sendmmsg_all(fd, &mut self.msgs[..n]) }
    }

    /// Sends the first `n` (<= BATCH) encoded requests of `send_buf` on `fd` as UDP GSO
    /// trains of `per_train` requests (the last one shorter when `n` is not a multiple): one
    /// message per train, its `UDP_SEGMENT` control message giving the request size, so the
    /// kernel cuts it into exactly the requests laid out in it. Returns how many requests the
    /// kernel took; the first error is returned only if nothing was sent.
    pub(super) fn send_trains(
        &mut self,
        fd: RawFd,
        n: usize,
        per_train: usize,
        dest: Option<&RawAddr>,
    ) -> io::Result<usize> {
        let n = n.min(BATCH);
        let segment_len = u16::try_from(self.size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "request too large"))?;
        let mut trains = 0;
        let mut start_bytes = 0;
        for (t, len) in train_lens(n, per_train).enumerate() {
            let bytes = len * self.size;
            let v = &mut self.iov[t];
            v.iov_base = self.send_buf[start_bytes..start_bytes + bytes]
                .as_mut_ptr()
                .cast();
            v.iov_len = bytes;
            start_bytes += bytes;
            let control = &mut self.controls[t].0;
            // CONTROL_LEN has room for one UDP_SEGMENT message (24 bytes) by construction.
            let control_len = encode_udp_segment(control, 0, segment_len).unwrap_or(0);
            let m = &mut self.msgs[t];
            m.msg_hdr.msg_name = std::ptr::null_mut();
            m.msg_hdr.msg_namelen = 0;
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = control.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = control_len;
            m.msg_hdr.msg_flags = 0;
            m.msg_len = 0;
            self.train_lens[t] = len;
            trains = t + 1;
        }
        set_dest(&mut self.msgs[..trains], dest);
        // SAFETY: msgs[..trains] were just pointed at `send_buf` (whole requests, inside it),
        // at their aligned control buffers in `controls` (each holding one complete
        // UDP_SEGMENT message of the length given) and at `dest` or no name; all outlive the
        // call.
        let sent = unsafe { sendmmsg_all(fd, &mut self.msgs[..trains]) }?;
        Ok(self.train_lens[..sent].iter().sum())
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
        if self.gro {
            for (m, control) in self.msgs.iter_mut().zip(self.controls.iter_mut()) {
                m.msg_hdr.msg_control = control.0.as_mut_ptr().cast();
                m.msg_hdr.msg_controllen = CONTROL_LEN;
            }
        }
        loop {
            // SAFETY: msgs[..BATCH] are initialised mmsghdrs whose iovecs point into
            // `recv_buf` (BATCH chunks of recv_len bytes), whose msg_name is null or points
            // into `names` (room for a sockaddr_in6 each, the namelen given) and whose
            // msg_control is null or points at an aligned `controls` entry of CONTROL_LEN
            // bytes; all outlive the call.
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

    /// The datagrams in receive `i` of the last `recv_batch`: one, or with `UDP_GRO` as many
    /// as the kernel coalesced into it.
    pub(super) fn datagrams(&self, i: usize) -> impl Iterator<Item = &[u8]> {
        let len = (self.msgs[i].msg_len as usize).min(self.recv_len);
        let buf = &self.recv_buf[i * self.recv_len..i * self.recv_len + len];
        let segment_len = if self.gro {
            // The kernel sets msg_controllen to what it wrote.
            let control_len = self.msgs[i].msg_hdr.msg_controllen.min(CONTROL_LEN);
            find_gro_segment_size(&self.controls[i].0[..control_len])
        } else {
            None
        };
        split_gro(buf, segment_len)
    }
}

/// Points every message at `dest`, or at no name (the connected socket's peer) for `None`.
fn set_dest(msgs: &mut [libc::mmsghdr], dest: Option<&RawAddr>) {
    if let Some(d) = dest {
        for m in msgs {
            // The kernel only reads msg_name on send; `d` outlives the call.
            m.msg_hdr.msg_name = d.as_ptr().cast_mut().cast();
            m.msg_hdr.msg_namelen = d.len;
        }
    }
}

/// `sendmmsg` until every message is sent or the kernel refuses one; returns how many were
/// sent, the first error only if none was.
///
/// # Safety
/// Every message's `msg_iov`, `msg_name` and `msg_control` must point at memory that is valid
/// for the lengths given and outlives the call.
unsafe fn sendmmsg_all(fd: RawFd, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let n = msgs.len();
    let mut done = 0;
    while done < n {
        let left = u32::try_from(n - done).unwrap_or(u32::MAX);
        // SAFETY: msgs[done..] are `left` initialised mmsghdrs whose pointers the caller
        // guarantees valid for the call.
        let rc = unsafe { libc::sendmmsg(fd, msgs[done..].as_mut_ptr(), left, libc::MSG_DONTWAIT) };
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A window of 37 requests leaves as trains of 16, 16 and 5; on a socket with `UDP_GRO`
    /// the kernel hands each train over whole (`udp_unexpected_gso` lets a GRO socket take
    /// GSO packets as they are), and splitting the receives gives back every request in
    /// order.
    #[test]
    fn trains_arrive_coalesced_and_split_back_into_the_requests() {
        let size = 100;
        let receiver =
            open_client("127.0.0.1:9".parse().expect("literal"), false).expect("receiver socket");
        enable_gro(&receiver).expect("UDP_GRO (Linux 5.0+)");
        let to = receiver
            .local_addr()
            .expect("bound")
            .as_socket()
            .expect("an inet address");
        let sender = open_client(to, true).expect("sender socket");
        let mut io = Io::new(size, true);
        for (i, request) in io.send_buf.chunks_mut(size).enumerate() {
            request.fill(i as u8);
        }
        let sent = io
            .send_trains(sender.as_raw_fd(), 37, 16, None)
            .expect("the kernel takes UDP GSO trains");
        assert_eq!(sent, 37);

        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut receives = 0;
        let deadline = Instant::now() + Duration::from_secs(2);
        while got.len() < 37 && Instant::now() < deadline {
            let n = io
                .recv_batch(receiver.as_raw_fd(), false)
                .expect("recvmmsg");
            receives += n;
            for i in 0..n {
                got.extend(io.datagrams(i).map(<[u8]>::to_vec));
            }
            if n == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let want: Vec<Vec<u8>> = (0..37u8).map(|i| vec![i; size]).collect();
        assert_eq!(got, want);
        assert!(receives <= 3, "{receives} receives for 3 trains");
    }
}
