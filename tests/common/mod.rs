//! Helpers shared by the integration tests: servers on port 0, clients with bounded waits,
//! and the feature gate that skips locally but fails under CI.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use udpring::{Features, Server, ServerConfig, SessionHandler};

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(5);

/// Returns `false` (after printing why) when a test must be skipped because the kernel lacks
/// what udpring needs. Under `CI=true` it panics instead: the CI kernel has every feature.
pub fn kernel_supports_udpring() -> bool {
    let features = Features::probe();
    match features.check_required() {
        Ok(()) => true,
        Err(reason) => {
            if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                panic!("CI=true and a required kernel feature is missing: {reason}");
            }
            eprintln!("skipped: {reason}");
            false
        }
    }
}

/// A loopback config on port 0 with `workers` workers.
pub fn config(bind: &str, workers: usize) -> ServerConfig {
    ServerConfig {
        bind: bind.parse().expect("test address parses"),
        workers,
        ..ServerConfig::default()
    }
}

pub fn start<H: SessionHandler>(
    config: ServerConfig,
    factory: impl Fn(usize) -> H + Send + Sync + 'static,
) -> Server {
    Server::start(config, factory).expect("server starts")
}

/// A client socket of the server's family on loopback, with a read timeout and a big
/// receive buffer.
pub fn client_for(server: SocketAddr) -> UdpSocket {
    let bind = if server.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    };
    let sock = UdpSocket::bind(bind).expect("client binds");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout set");
    let s2 = socket2::SockRef::from(&sock);
    let _ = s2.set_recv_buffer_size(4 << 20);
    sock
}

/// Loopback address to send to for a server bound to `addr` (which may be a wildcard).
pub fn target(addr: SocketAddr) -> SocketAddr {
    let mut t = addr;
    if t.ip().is_unspecified() {
        t.set_ip(if t.is_ipv4() {
            "127.0.0.1".parse().expect("literal")
        } else {
            "::1".parse().expect("literal")
        });
    }
    t
}

/// Sends `payload` and waits (bounded) for one reply.
pub fn round_trip(
    sock: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
) -> Option<(Vec<u8>, SocketAddr)> {
    sock.send_to(payload, to).expect("send");
    let mut buf = vec![0u8; 70_000];
    recv_retrying(sock, &mut buf)
        .ok()
        .map(|(n, from)| (buf[..n].to_vec(), from))
}

/// `recv_from` that retries when a signal interrupts it (a socket with a read timeout
/// returns EINTR instead of restarting).
pub fn recv_retrying(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    loop {
        match sock.recv_from(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Polls `cond` until it holds or `WAIT` passes.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}
