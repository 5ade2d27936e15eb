//! Shared plumbing for the baseline echo servers (benchmarks only): argument parsing,
//! SIGINT/SIGTERM handling and socket setup.
#![allow(dead_code)] // each example uses a subset

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use socket2::{Domain, Protocol, Socket, Type};

/// Largest datagram we echo.
pub const MAX_DGRAM: usize = 65_535;
/// Socket buffer size requested for SO_RCVBUF / SO_SNDBUF.
pub const SOCK_BUF: usize = 4 << 20;

/// Set by the signal handler.
pub static STOP: AtomicBool = AtomicBool::new(false);
/// If >= 0, the signal handler writes one byte here (self-pipe wake-up).
pub static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// Command line shared by all baselines.
#[derive(clap::Parser, Debug)]
pub struct Args {
    /// Address to bind, IP:PORT.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub bind: SocketAddr,
}

/// Command line of the baselines whose receive buffers are sized to the run (`bench.py` passes
/// the largest payload it sends, rounded up).
#[derive(clap::Parser, Debug)]
pub struct SizedArgs {
    #[command(flatten)]
    pub common: Args,
    /// Largest datagram to receive, in bytes; a longer one is truncated (and counted).
    #[arg(long, default_value_t = 2048, value_name = "BYTES",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub max_size: u16,
}

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: write(2) is async-signal-safe; `b` is a valid 1-byte buffer. A failed
        // write is harmless (the flag is set anyway).
        unsafe {
            libc::write(fd, (&b as *const u8).cast(), 1);
        }
    }
}

/// Installs SIGINT/SIGTERM handlers that set [`STOP`] (no SA_RESTART, so blocking calls
/// return EINTR).
pub fn install_signal_handlers() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags).
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: `sa` is a valid sigaction whose handler only touches atomics and write(2);
        // a null old-action pointer is allowed.
        let rc = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether a stop signal arrived.
pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// A bound, non-blocking UDP socket with 4 MiB buffers (best effort).
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = sock.set_recv_buffer_size(SOCK_BUF);
    let _ = sock.set_send_buffer_size(SOCK_BUF);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock)
}

/// Announces the bound address on stderr (the bench script waits for the server to answer).
pub fn announce(sock: &Socket) {
    match sock.local_addr().ok().and_then(|a| a.as_socket()) {
        Some(a) => eprintln!("listening on {a}"),
        None => eprintln!("listening"),
    }
}

/// Epoll instance with one fd registered for EPOLLIN (level-triggered).
pub fn epoll_for(fd: RawFd) -> std::io::Result<RawFd> {
    // SAFETY: plain syscall with a valid flag.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 0,
    };
    // SAFETY: `ep` and `fd` are open descriptors; `ev` is a valid epoll_event.
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ep)
}

/// Waits up to 100 ms for readiness; returns true if `fd` is readable.
pub fn wait_readable(ep: RawFd) -> bool {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: `ev` has room for the one event requested.
    let n = unsafe { libc::epoll_wait(ep, &mut ev, 1, 100) };
    n > 0
}

/// One `recvmmsg(MSG_WAITFORONE)` on a blocking socket into `msgs`: how many datagrams came,
/// 0 after EINTR (a stop signal: the caller's loop condition decides) or another error.
///
/// # Safety
/// Every header in `msgs` must point at buffers and addresses that live, and stay put, for
/// the call.
pub unsafe fn recv_batch(fd: RawFd, msgs: &mut [libc::mmsghdr]) -> usize {
    // SAFETY: the caller's contract: the headers point at live buffers.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            msgs.len() as u32,
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        )
    };
    usize::try_from(n).unwrap_or(0)
}

/// Sends `msgs` on a blocking socket, retrying after a partial send: a full send buffer
/// waits instead of dropping; a datagram (or train) the kernel refuses outright is skipped
/// (sendmmsg(2) reports an error only for the first message).
///
/// # Safety
/// Every header in `msgs` must point at buffers and addresses that live for the call.
pub unsafe fn send_all_blocking(fd: RawFd, msgs: &mut [libc::mmsghdr]) {
    let mut done = 0;
    while done < msgs.len() && !stopping() {
        // SAFETY: the caller's contract: msgs[done..] point at live buffers/addresses.
        let rc =
            unsafe { libc::sendmmsg(fd, msgs[done..].as_mut_ptr(), (msgs.len() - done) as u32, 0) };
        if rc > 0 {
            done += rc as usize;
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            done += 1;
        }
    }
}
