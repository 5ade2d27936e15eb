//! Baseline echo server on tokio (benchmarks only): current-thread runtime with IO enabled,
//! a plain `recv_from` / `send_to` loop.
//!
//! `cargo run --release --example baseline_tokio -- --bind 127.0.0.1:9000`

mod common;

use std::os::fd::IntoRawFd;
use std::sync::atomic::Ordering;

use clap::Parser;

fn main() -> std::io::Result<()> {
    let args = common::Args::parse();
    // Self-pipe: the signal handler writes a byte, the runtime wakes up and stops.
    let (wake_rx, wake_tx) = std::os::unix::net::UnixStream::pair()?;
    wake_rx.set_nonblocking(true)?;
    wake_tx.set_nonblocking(true)?;
    common::WAKE_FD.store(wake_tx.into_raw_fd(), Ordering::SeqCst);
    common::install_signal_handlers()?;
    let sock = common::bind_udp(args.bind)?;
    common::announce(&sock);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let sock = tokio::net::UdpSocket::from_std(sock.into())?;
        let wake = tokio::net::UnixStream::from_std(wake_rx)?;
        let mut buf = vec![0u8; common::MAX_DGRAM];
        while !common::stopping() {
            tokio::select! {
                _ = wake.readable() => {}
                r = sock.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        let _ = sock.send_to(&buf[..n], from).await;
                    }
                }
            }
        }
        Ok(())
    })
}
