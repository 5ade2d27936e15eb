//! The reference for every ratio of `make bench`: the lean recvmmsg echo loop a user would
//! write (benchmarks only). One blocking UDP socket; `recvmmsg(MSG_WAITFORONE)` fills up to 64
//! buffers of `--max-size` bytes (it sleeps only until the first datagram, then takes what is
//! queued), and one `sendmmsg` answers the batch. No epoll and no final EAGAIN call per burst.
//!
//! `cargo run --release --example baseline_recvmmsg -- --bind 127.0.0.1:9000 --max-size 2048`

mod common;

use std::os::fd::AsRawFd;

use clap::Parser;

const BATCH: usize = 64;

/// Receive slots and their headers. Allocated once: every header points into `bufs`, `addrs`
/// and `iov`, which never move after [`Batch::new`].
struct Batch {
    slot_bytes: usize,
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new(slot_bytes: usize) -> Self {
        let mut b = Batch {
            slot_bytes,
            bufs: vec![0; BATCH * slot_bytes],
            // SAFETY: all-zero sockaddr_storage / iovec / mmsghdr are valid values.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            // SAFETY: as above.
            iov: vec![unsafe { std::mem::zeroed() }; BATCH],
            // SAFETY: as above.
            msgs: vec![unsafe { std::mem::zeroed() }; BATCH],
        };
        for i in 0..BATCH {
            b.iov[i].iov_base = b.bufs[i * slot_bytes..].as_mut_ptr().cast();
            let h = &mut b.msgs[i].msg_hdr;
            h.msg_name = (&mut b.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut b.iov[i];
            h.msg_iovlen = 1;
            b.rearm(i);
        }
        b
    }

    /// Restores slot `i` for a receive after it carried a reply (the reply shortened
    /// `iov_len` and the kernel shortened `msg_namelen`).
    fn rearm(&mut self, i: usize) {
        self.iov[i].iov_len = self.slot_bytes;
        self.msgs[i].msg_hdr.msg_namelen =
            std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    }
}

fn main() -> std::io::Result<()> {
    let args = common::SizedArgs::parse();
    common::install_signal_handlers()?;
    let sock = common::bind_udp(args.common.bind)?;
    sock.set_nonblocking(false)?;
    let fd = sock.as_raw_fd();
    common::announce(&sock);
    let mut b = Batch::new(usize::from(args.max_size));
    let mut truncated = 0u64;
    while !common::stopping() {
        // SAFETY: b.msgs holds BATCH armed headers pointing into b.bufs / b.addrs / b.iov,
        // which live (and stay put) across the call.
        let n = unsafe { common::recv_batch(fd, &mut b.msgs) };
        if n == 0 {
            continue; // EINTR (a stop signal: the loop condition decides) or a transient error
        }
        for i in 0..n {
            // Reply with exactly the received bytes to the received address (msg_namelen was
            // set by the kernel).
            let m = &b.msgs[i];
            truncated += u64::from(m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0);
            b.iov[i].iov_len = m.msg_len as usize;
        }
        // SAFETY: the first n headers point at the received buffers and addresses in b.
        unsafe { common::send_all_blocking(fd, &mut b.msgs[..n]) };
        for i in 0..n {
            b.rearm(i);
        }
    }
    if truncated > 0 {
        eprintln!(
            "{truncated} datagrams were longer than --max-size {} and truncated",
            args.max_size
        );
    }
    Ok(())
}
