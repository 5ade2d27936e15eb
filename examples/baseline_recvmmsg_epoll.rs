//! What a heavier recvmmsg loop costs: the project's first recvmmsg baseline, kept as the row
//! `recvmmsg-epoll` of `make bench` (benchmarks only; NOT the reference for ratios). One
//! non-blocking UDP socket in a level-triggered epoll; on readiness `recvmmsg` batches of 64
//! into 64 KiB slots until EAGAIN (a final empty call per burst), each batch answered with
//! `sendmmsg` (partial sends retried). It cost about 11% more server CPU per datagram than the
//! lean loop in `baseline_recvmmsg.rs`, which is the reference for every ratio.
//!
//! `cargo run --release --example baseline_recvmmsg_epoll -- --bind 127.0.0.1:9000`

mod common;

use std::os::fd::{AsRawFd, RawFd};

use clap::Parser;

const BATCH: usize = 64;

struct Batch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            bufs: vec![0; BATCH * common::MAX_DGRAM],
            // SAFETY: all-zero sockaddr_storage / iovec / mmsghdr are valid values.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            // SAFETY: as above.
            iov: vec![unsafe { std::mem::zeroed() }; BATCH],
            // SAFETY: as above.
            msgs: vec![unsafe { std::mem::zeroed() }; BATCH],
        }
    }

    /// Resets every header for a full-size receive.
    fn arm(&mut self) {
        for i in 0..BATCH {
            self.iov[i].iov_base = self.bufs[i * common::MAX_DGRAM..].as_mut_ptr().cast();
            self.iov[i].iov_len = common::MAX_DGRAM;
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.msgs[i].msg_len = 0;
        }
    }
}

/// Sends msgs[..n], retrying partial sends; waits briefly (bounded) when the buffer is full.
fn send_all(fd: RawFd, msgs: &mut [libc::mmsghdr]) {
    let mut done = 0;
    let mut full_waits = 0;
    while done < msgs.len() {
        // SAFETY: msgs[done..] are initialised headers pointing at live buffers/addresses.
        let rc =
            unsafe { libc::sendmmsg(fd, msgs[done..].as_mut_ptr(), (msgs.len() - done) as u32, 0) };
        if rc > 0 {
            done += rc as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) if full_waits < 10 => {
                full_waits += 1;
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: `p` is one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 10) };
            }
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) => return, // give up on the rest
            _ => done += 1, // this datagram cannot be sent: skip it
        }
    }
}

fn main() -> std::io::Result<()> {
    let args = common::Args::parse();
    common::install_signal_handlers()?;
    let sock = common::bind_udp(args.bind)?;
    let fd = sock.as_raw_fd();
    let ep = common::epoll_for(fd)?;
    common::announce(&sock);
    let mut b = Batch::new();
    while !common::stopping() {
        if !common::wait_readable(ep) {
            continue;
        }
        while !common::stopping() {
            b.arm();
            // SAFETY: b.msgs holds BATCH armed headers pointing into b.bufs / b.addrs, which
            // live across the call.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    b.msgs.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                break; // EAGAIN (drained), EINTR, or error: back to epoll
            }
            let n = n as usize;
            for i in 0..n {
                // Reply with exactly the received bytes to the received address
                // (msg_namelen was set by the kernel).
                b.iov[i].iov_len = b.msgs[i].msg_len as usize;
            }
            send_all(fd, &mut b.msgs[..n]);
        }
    }
    Ok(())
}
