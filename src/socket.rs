//! Socket set-up for a worker: SO_REUSEPORT so every worker binds the same address and the
//! kernel spreads peers across them, big buffers, and packet-info so a wildcard-bound server
//! can reply from the address it was asked on.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::sys::cvt;

/// What a bound worker socket ended up with.
pub struct BoundSocket {
    pub socket: Socket,
    pub local_addr: SocketAddr,
    /// The socket is AF_INET6 (addresses are encoded as `sockaddr_in6`).
    pub is_v6: bool,
    /// Bound to a wildcard address: datagrams carry packet-info and replies use it.
    pub wants_pktinfo: bool,
    /// SO_RCVBUF as the kernel reports it (twice what was granted, see socket(7)).
    pub recv_buffer: usize,
    /// `UDP_GRO` is on: a receive may hold a train of datagrams.
    pub gro: bool,
}

impl BoundSocket {
    /// What a bound, configured socket serving `local_addr` reports about itself.
    fn new(socket: Socket, local_addr: SocketAddr, gro: bool) -> io::Result<BoundSocket> {
        let recv_buffer = socket.recv_buffer_size()?;
        Ok(BoundSocket {
            socket,
            local_addr,
            is_v6: local_addr.is_ipv6(),
            wants_pktinfo: local_addr.ip().is_unspecified(),
            recv_buffer,
            gro,
        })
    }
}

/// Opens a UDP socket with SO_REUSEPORT, sized buffers and packet-info, and binds it.
pub fn bind_worker_socket(
    addr: SocketAddr,
    recv_buffer: usize,
    send_buffer: usize,
    gro: bool,
) -> io::Result<BoundSocket> {
    let domain = Domain::for_address(addr);
    let socket = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    let is_v6 = addr.is_ipv6();
    let wildcard = addr.ip().is_unspecified();
    if is_v6 && wildcard {
        // `[::]` serves IPv4 too (dual-stack), whatever net.ipv6.bindv6only says.
        socket.set_only_v6(false)?;
    }
    configure(&socket, wildcard, is_v6, recv_buffer, send_buffer)?;
    // A kernel without UDP_GRO (before 5.0) refuses the option: serve without it (the probe
    // reports the feature missing).
    let gro = gro && set_int(&socket, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
    socket
        .bind(&addr.into())
        .map_err(|e| explain_bind_error(addr, e))?;
    let local_addr = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound socket has no inet address"))?;
    BoundSocket::new(socket, local_addr, gro)
}

/// Packet-info for wildcard sockets and the buffer sizes: what every worker socket gets,
/// bound here or adopted.
fn configure(
    socket: &Socket,
    wildcard: bool,
    is_v6: bool,
    recv_buffer: usize,
    send_buffer: usize,
) -> io::Result<()> {
    if wildcard {
        // IPv4 datagrams (also those reaching a dual-stack socket) report IP_PKTINFO;
        // IPv6 ones report IPV6_PKTINFO.
        set_int(socket, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
        if is_v6 {
            set_int(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        }
    }
    // SO_RCVBUFFORCE goes past net.core.rmem_max when we have CAP_NET_ADMIN; otherwise fall
    // back to the capped request. Under load a small receive buffer loses requests.
    if set_int(
        socket,
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        clamp_int(recv_buffer),
    )
    .is_err()
    {
        socket.set_recv_buffer_size(recv_buffer)?;
    }
    if set_int(
        socket,
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        clamp_int(send_buffer),
    )
    .is_err()
    {
        socket.set_send_buffer_size(send_buffer)?;
    }
    Ok(())
}

/// Takes over a socket bound elsewhere (handed over by the process it replaces, or passed by
/// systemd): checks that it is a bound UDP socket, bound to `expected` when that is given, and
/// gives it what [`bind_worker_socket`] gives its own. `gro`: `Some(on)` sets `UDP_GRO`;
/// `None` keeps what the socket has, because the process handing it over still receives on
/// it: turning GRO on under a worker whose buffers were sized without it would truncate.
pub fn adopt_worker_socket(
    socket: Socket,
    expected: Option<SocketAddr>,
    recv_buffer: usize,
    send_buffer: usize,
    gro: Option<bool>,
) -> io::Result<BoundSocket> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    if socket.r#type()? != Type::DGRAM {
        return Err(invalid("a passed socket is not a datagram socket".into()));
    }
    if socket.protocol()? != Some(Protocol::UDP) {
        return Err(invalid("a passed socket is not a UDP socket".into()));
    }
    let local_addr = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| invalid("a passed socket is not an IPv4 or IPv6 socket".into()))?;
    if local_addr.port() == 0 {
        return Err(invalid(format!(
            "a passed socket is not bound ({local_addr})"
        )));
    }
    if let Some(expected) = expected {
        let port_ok = expected.port() == 0 || expected.port() == local_addr.port();
        if !port_ok || expected.ip() != local_addr.ip() {
            return Err(invalid(format!(
                "a passed socket is bound to {local_addr}, not {expected}"
            )));
        }
    }
    // Descriptors passed by systemd are inherited without FD_CLOEXEC.
    socket.set_cloexec(true)?;
    let is_v6 = local_addr.is_ipv6();
    let wildcard = local_addr.ip().is_unspecified();
    configure(&socket, wildcard, is_v6, recv_buffer, send_buffer)?;
    let gro = match gro {
        // Read back where the kernel can say (getsockopt UDP_GRO); otherwise trust the set.
        Some(on) => {
            let set = set_int(&socket, libc::SOL_UDP, libc::UDP_GRO, libc::c_int::from(on));
            get_int(&socket, libc::SOL_UDP, libc::UDP_GRO).map_or(on && set.is_ok(), |v| v != 0)
        }
        None => get_int(&socket, libc::SOL_UDP, libc::UDP_GRO).is_ok_and(|v| v != 0),
    };
    BoundSocket::new(socket, local_addr, gro)
}

/// Asks the kernel to report each datagram's TOS / traffic class byte, whose two low bits are
/// its ECN codepoint: `IP_RECVTOS` for IPv4 (also on a dual-stack socket), `IPV6_RECVTCLASS`
/// for IPv6.
pub fn enable_ecn_reports(bound: &BoundSocket) -> io::Result<()> {
    if bound.is_v6 {
        set_int(&bound.socket, libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS, 1)?;
        if !bound.local_addr.ip().is_unspecified() {
            return Ok(());
        }
    }
    set_int(&bound.socket, libc::IPPROTO_IP, libc::IP_RECVTOS, 1)
}

/// Sets don't-fragment on every datagram without using the kernel's path MTU estimate
/// (`IP_PMTUDISC_PROBE`, `IPV6_PMTUDISC_PROBE`): a datagram too large for the path is lost
/// instead of fragmented, which is what a stack that probes the path MTU itself (QUIC's
/// DPLPMTUD) needs to see. IPv4 too on a dual-stack socket.
pub fn set_dont_fragment(bound: &BoundSocket) -> io::Result<()> {
    if bound.is_v6 {
        set_int(
            &bound.socket,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        )?;
        if !bound.local_addr.ip().is_unspecified() {
            return Ok(());
        }
    }
    set_int(
        &bound.socket,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_PROBE,
    )
}

fn clamp_int(v: usize) -> libc::c_int {
    v.min(libc::c_int::MAX as usize) as libc::c_int
}

fn set_int(socket: &Socket, level: i32, name: i32, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value points at `value`, a live local of exactly the length
    // passed; the kernel only reads it during the call.
    cvt(unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

fn get_int(socket: &Socket, level: i32, name: i32) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals; the kernel writes at most `len` bytes into
    // `value` and the length it wrote into `len`.
    cvt(unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// Datagrams the kernel dropped on `socket` (receive queue full, memory pressure):
/// `SK_MEMINFO_DROPS` of `SO_MEMINFO`, readable from any thread without disturbing the worker.
pub fn kernel_drops(socket: &Socket) -> io::Result<u64> {
    // SK_MEMINFO_VARS is 9 on current kernels; ask for a little more room.
    let mut info = [0u32; 16];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is a live local array of `len` bytes and `len` a live local; the kernel
    // writes at most `len` bytes and stores the length it wrote back into `len`.
    cvt(unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    const SK_MEMINFO_DROPS: usize = 8;
    if (len as usize) < (SK_MEMINFO_DROPS + 1) * 4 {
        return Err(io::Error::other("SO_MEMINFO too short"));
    }
    Ok(u64::from(info[SK_MEMINFO_DROPS]))
}

/// Rewrites a bind error into one line that names the cause and the fix.
pub fn explain_bind_error(addr: SocketAddr, err: io::Error) -> io::Error {
    let msg = match err.raw_os_error() {
        Some(libc::EADDRINUSE) => format!(
            "cannot bind {addr}: address in use by a socket without SO_REUSEPORT or owned by another user; stop that process or choose another --bind port"
        ),
        Some(libc::EACCES) => format!(
            "cannot bind {addr}: permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE (or lower net.ipv4.ip_unprivileged_port_start)"
        ),
        Some(libc::EADDRNOTAVAIL) => format!(
            "cannot bind {addr}: that address is not configured on this host; use one of its addresses or 0.0.0.0 / [::]"
        ),
        Some(libc::EAFNOSUPPORT) => format!(
            "cannot bind {addr}: the address family is not supported here (IPv6 disabled?)"
        ),
        _ => format!("cannot bind {addr}: {err}"),
    };
    io::Error::new(err.kind(), msg)
}
