//! Baseline echo server, the seed article's Linux model (benchmarks only): one non-blocking
//! UDP socket in a level-triggered epoll; every `epoll_wait` wake-up does exactly ONE
//! `recvfrom` and ONE `sendto`, then goes back to `epoll_wait`.
//!
//! `cargo run --release --example baseline_recvfrom -- --bind 127.0.0.1:9000`

mod common;

use std::os::fd::AsRawFd;

use clap::Parser;

fn main() -> std::io::Result<()> {
    let args = common::Args::parse();
    common::install_signal_handlers()?;
    let sock = common::bind_udp(args.bind)?;
    let fd = sock.as_raw_fd();
    let ep = common::epoll_for(fd)?;
    common::announce(&sock);
    let mut buf = vec![0u8; common::MAX_DGRAM];
    while !common::stopping() {
        if !common::wait_readable(ep) {
            continue;
        }
        // SAFETY: an all-zero sockaddr_storage is a valid value.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `buf` is writable for its length; `from`/`from_len` describe a valid
        // sockaddr_storage; `fd` is open.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_storage).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            continue; // EAGAIN (spurious wake-up) or EINTR
        }
        // SAFETY: `buf[..n]` was just filled; `from` holds the sender's address of length
        // `from_len` as written by the kernel. Errors (e.g. full buffer) drop the reply.
        unsafe {
            libc::sendto(
                fd,
                buf.as_ptr().cast(),
                n as usize,
                0,
                (&from as *const libc::sockaddr_storage).cast(),
                from_len,
            );
        }
    }
    Ok(())
}
