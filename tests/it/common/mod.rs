//! Helpers shared by the integration tests: servers on port 0, clients whose every wait has a
//! deadline, polling for a condition instead of sleeping, datagram accounting that includes
//! the kernel's drops, and the gate that skips locally but fails under CI.
#![allow(dead_code)]

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use udpring::kernel::Features;
use udpring::{Server, ServerConfig, SessionHandler, SessionMode, Stats};

#[cfg(feature = "quic")]
pub mod quic;

/// Every wait for something that must happen is bounded by this.
pub const WAIT: Duration = Duration::from_secs(5);

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(5);

/// Whether the tests run in CI (`CI=true`), where every prerequisite must be present.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The project rule for tests that need something the machine may lack (a kernel feature,
/// root, a tool): skip locally with one line saying why, fail under `CI=true`.
#[track_caller]
pub fn skip_or_fail(reason: &str) {
    if in_ci() {
        panic!("CI=true and a prerequisite is missing: {reason}");
    }
    eprintln!("skipped: {reason}");
}

/// Returns `false` (after printing why) when a test must be skipped because the kernel lacks
/// what udpring needs. Under `CI=true` it panics instead: the CI kernel has every feature.
#[track_caller]
pub fn kernel_supports_udpring() -> bool {
    match Features::probe().check_required() {
        Ok(()) => true,
        Err(reason) => {
            skip_or_fail(&reason.to_string());
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

/// A session-mode config on 127.0.0.1:0, with buffers for a thousand peers at once.
pub fn session_config(mode: SessionMode, workers: usize) -> ServerConfig {
    ServerConfig {
        sessions: mode,
        buffers: 4096,
        ..config("127.0.0.1:0", workers)
    }
}

pub fn start<H: SessionHandler>(
    config: ServerConfig,
    factory: impl Fn(usize) -> H + Send + Sync + 'static,
) -> Server {
    Server::start(config, factory).expect("server starts")
}

/// A client socket of the server's family on loopback with a big receive buffer (so that
/// replies cannot be dropped on the client's side). Waits on it go through [`recv_within`].
pub fn client_for(server: SocketAddr) -> UdpSocket {
    let bind = if server.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    };
    let sock = UdpSocket::bind(bind).expect("client binds");
    let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(4 << 20);
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

/// Receives one datagram, waiting at most `limit`. A signal interrupting the wait (a socket
/// with a read timeout returns EINTR instead of restarting) does not end it early.
pub fn recv_within(
    sock: &UdpSocket,
    buf: &mut [u8],
    limit: Duration,
) -> std::io::Result<(usize, SocketAddr)> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv_from(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(ErrorKind::TimedOut.into())
            }
            other => return other,
        }
    }
}

/// Sends `payload` and waits up to `limit` for one reply.
pub fn round_trip_within(
    sock: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
    limit: Duration,
) -> Option<(Vec<u8>, SocketAddr)> {
    sock.send_to(payload, to).expect("send");
    let mut buf = vec![0u8; 70_000];
    recv_within(sock, &mut buf, limit)
        .ok()
        .map(|(n, from)| (buf[..n].to_vec(), from))
}

/// Sends `payload` and waits up to [`WAIT`] for one reply.
pub fn round_trip(
    sock: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
) -> Option<(Vec<u8>, SocketAddr)> {
    round_trip_within(sock, to, payload, WAIT)
}

/// Sends `payload` and checks that NO reply arrives within `quiet`. The fixed wait is the
/// point: this checks that something does not happen. Returns the unexpected reply, if any.
pub fn no_reply_within(
    sock: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
    quiet: Duration,
) -> Option<Vec<u8>> {
    round_trip_within(sock, to, payload, quiet).map(|(reply, _)| reply)
}

/// Polls `cond` until it holds or `limit` passes; returns whether it held. Callers assert on
/// the result with a message that shows the state at the deadline.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Datagrams that reached the server's listening sockets, whatever became of them: handed to
/// the handler, dropped as truncated or malformed, or dropped by the kernel because the
/// receive queue was full (`SO_MEMINFO` drops). Under load the kernel may drop, so tests
/// compare this, not `rx_datagrams`, with what they sent.
pub fn arrived(c: &Stats) -> u64 {
    c.rx_datagrams + c.truncated + c.malformed + c.kernel_drops
}

/// The field-by-field sum of per-worker counters.
pub fn sum(per_worker: &[Stats]) -> Stats {
    let mut total = Stats::default();
    for c in per_worker {
        total.add(c);
    }
    total
}

/// Receives on every client (without blocking on any one of them) until `expected`
/// datagrams have arrived in all, or `limit` passes. Returns what each client got, in order.
pub fn collect_replies(
    clients: &[UdpSocket],
    expected: usize,
    limit: Duration,
) -> Vec<Vec<(Vec<u8>, SocketAddr)>> {
    let mut got: Vec<Vec<(Vec<u8>, SocketAddr)>> = vec![Vec::new(); clients.len()];
    let mut total = 0;
    let mut buf = vec![0u8; 70_000];
    for c in clients {
        c.set_nonblocking(true).expect("nonblocking");
    }
    wait_until(limit, || {
        for (i, c) in clients.iter().enumerate() {
            loop {
                match c.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        got[i].push((buf[..n].to_vec(), from));
                        total += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("client {i}: recv: {e}"),
                }
            }
        }
        total >= expected
    });
    for c in clients {
        c.set_nonblocking(false).expect("blocking");
    }
    got
}

/// Descriptors open in this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Marks a process of this test binary started by [`alone`] to run one test.
const ALONE: &str = "UDPRING_TEST_ALONE";

/// For a test that needs the process to itself (it counts `/proc/self/fd`, or lowers
/// `RLIMIT_NOFILE`), in a test binary whose other tests run in parallel threads. Call it
/// first, with `module_path!()` and the test function's name: in a fresh process of this
/// binary started to run that test alone, it returns `true` and the caller runs its body;
/// anywhere else it starts that process, passes its output on, fails if the test failed there
/// (or did not run), and returns `false`, and the caller returns.
#[track_caller]
pub fn alone(module: &str, test: &str) -> bool {
    // Test names as the harness knows them: the path below the crate root.
    let module = module.split_once("::").map_or("", |(_, rest)| rest);
    let name = if module.is_empty() {
        test.to_string()
    } else {
        format!("{module}::{test}")
    };
    if std::env::var(ALONE).is_ok_and(|n| n == name) {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(exe)
        .args([
            &name,
            "--exact",
            "--include-ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(ALONE, &name)
        .output()
        .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(
        out.status.success(),
        "{name}, alone in a process: {}",
        out.status
    );
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "{name} did not run alone in its process:\n{stdout}"
    );
    false
}

/// Moves the calling thread into network namespace `ns` (sockets it makes from then on are
/// there; other threads are not moved).
pub fn enter_netns(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
    // SAFETY: setns(2) on a descriptor we hold open; it changes only this thread's namespace.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}
