//! The HTTP side of the endpoint: one poll(2) loop on one thread, at most
//! [`Limits::max_connections`] connections, each closed after [`Limits::timeout`].

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::{Encoder, TextEncoder};

use udpring::Stats;

use super::Families;

/// What the endpoint allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// How long a connection has to send its request and read the whole answer.
    pub timeout: Duration,
}

/// The default [`Limits::max_connections`]: a few scrapers and a person with curl, with room.
pub const MAX_CONNECTIONS: usize = 64;
/// The default [`Limits::timeout`] (`--metrics-timeout`).
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// A request head longer than this is answered 431 and closed: a scrape's is a few lines.
const MAX_REQUEST_BYTES: usize = 8192;
/// How long accepting pauses after it failed for want of descriptors or memory.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How often a refusal or timeout is logged, at most.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: MAX_CONNECTIONS,
            timeout: TIMEOUT,
        }
    }
}

/// A running metrics endpoint. Dropping it (or [`MetricsServer::shutdown`]) stops it.
pub struct MetricsServer {
    local_addr: SocketAddr,
    /// Closed to stop the thread: its end then polls readable (EOF).
    wake: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

/// Serves the worker counters `source` returns (index = worker id) at `GET /metrics` on
/// `addr`; port 0 picks a free port ([`MetricsServer::local_addr`] tells which).
pub fn serve(
    addr: SocketAddr,
    limits: Limits,
    source: impl Fn() -> Vec<Stats> + Send + Sync + 'static,
) -> io::Result<MetricsServer> {
    serve_with(addr, limits, move |families: &mut Families| {
        families.worker_counters(&source());
    })
}

/// Like [`serve`], with the families of each scrape built by `collect`: the extension point
/// for families beyond the worker counters (`Families::gauge` adds a level such as a queue
/// depth beside them).
pub fn serve_with(
    addr: SocketAddr,
    limits: Limits,
    collect: impl Fn(&mut Families) + Send + 'static,
) -> io::Result<MetricsServer> {
    if limits.max_connections == 0 || limits.timeout.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the metrics endpoint needs room for a connection and a timeout above zero",
        ));
    }
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let (wake, woken) = UnixStream::pair()?;
    let thread = std::thread::Builder::new()
        .name("udpring-metrics".into())
        .spawn(move || {
            let mut endpoint = Endpoint {
                listener,
                woken,
                limits,
                connections: Vec::with_capacity(limits.max_connections),
                refused: 0,
                accept_paused_until: None,
                timed_out: 0,
                log: RateLimitedLog::default(),
            };
            if let Err(e) = endpoint.run(&collect) {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        })?;
    Ok(MetricsServer {
        local_addr,
        wake: Some(wake),
        thread: Some(thread),
    })
}

impl MetricsServer {
    /// The address it listens on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops serving, closes the listener and every connection, and waits for the thread: at
    /// most the time one scrape in progress takes to build its answer.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        drop(self.wake.take());
        if thread.join().is_err() {
            tracing::error!("metrics thread panicked");
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The serving thread's state.
struct Endpoint {
    listener: TcpListener,
    woken: UnixStream,
    limits: Limits,
    /// At most `limits.max_connections`.
    connections: Vec<Connection>,
    refused: u64,
    timed_out: u64,
    /// Set when accept failed for want of descriptors or memory: the listener then stays
    /// readable, and polling it again at once would spin.
    accept_paused_until: Option<Instant>,
    log: RateLimitedLog,
}

/// One client connection, non-blocking.
struct Connection {
    stream: TcpStream,
    /// When it is closed, answered or not.
    deadline: Instant,
    /// The request head read so far.
    request: Vec<u8>,
    /// The answer and how much of it is written, once the request is complete.
    answer: Option<(Vec<u8>, usize)>,
}

/// What a connection does after an event.
enum Next {
    Keep,
    Close,
}

impl Endpoint {
    /// Polls until [`MetricsServer`] closes its end of the wake pair.
    fn run(&mut self, collect: &impl Fn(&mut Families)) -> io::Result<()> {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.limits.max_connections + 2);
        loop {
            fds.clear();
            fds.push(pollfd(self.woken.as_raw_fd(), libc::POLLIN));
            let now = Instant::now();
            if self.accept_paused_until.is_some_and(|until| until <= now) {
                self.accept_paused_until = None;
            }
            let listen_events = match self.accept_paused_until {
                Some(_) => 0,
                None => libc::POLLIN,
            };
            fds.push(pollfd(self.listener.as_raw_fd(), listen_events));
            for c in &self.connections {
                let events = if c.answer.is_some() {
                    libc::POLLOUT
                } else {
                    libc::POLLIN
                };
                fds.push(pollfd(c.stream.as_raw_fd(), events));
            }
            let timeout_ms = self
                .connections
                .iter()
                .map(|c| c.deadline)
                .chain(self.accept_paused_until)
                .min()
                .map_or(-1, |at| {
                    // Rounded up, so the loop does not spin until the deadline passes.
                    let left = at.saturating_duration_since(Instant::now());
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
                });
            // SAFETY: `fds` is a live, initialised array of `fds.len()` pollfds, which the
            // kernel writes `revents` of; it is not touched until poll returns.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[0].revents != 0 {
                return Ok(());
            }
            // The connections' pollfds follow the wake pair's and the listener's, in order.
            let (refused, timed_out) = (self.refused, self.timed_out);
            let mut slot = 2;
            self.connections.retain_mut(|c| {
                let revents = fds[slot].revents;
                slot += 1;
                revents == 0 || matches!(c.on_ready(collect, refused, timed_out), Next::Keep)
            });
            self.expire();
            if fds[1].revents != 0 {
                self.accept();
            }
        }
    }

    /// Closes the connections whose time is up.
    fn expire(&mut self) {
        let now = Instant::now();
        let before = self.connections.len();
        self.connections.retain(|c| c.deadline > now);
        let expired = (before - self.connections.len()) as u64;
        if expired > 0 {
            self.timed_out += expired;
            self.log.note(format_args!(
                "metrics connections closed after {:?} without a complete exchange: {} so far",
                self.limits.timeout, self.timed_out
            ));
        }
    }

    /// Accepts every pending connection: kept up to the limit, answered 503 beyond it.
    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The client reset before the accept: the next one.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                // Out of descriptors or memory: the connection stays queued; try again in a
                // moment (what is pending is not lost, and the serving goes on).
                Err(e) => {
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    self.log
                        .note(format_args!("metrics endpoint cannot accept: {e}"));
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.connections.len() >= self.limits.max_connections {
                self.refused += 1;
                // Best effort: an empty send buffer takes these few bytes at once; a client
                // that cannot take them gets the close alone.
                let _ = (&stream).write(&status_only("HTTP/1.1", 503, "Service Unavailable"));
                self.log.note(format_args!(
                    "metrics endpoint at its limit of {} connections: {} refused so far",
                    self.limits.max_connections, self.refused
                ));
                continue;
            }
            self.connections.push(Connection {
                stream,
                deadline: Instant::now() + self.limits.timeout,
                request: Vec::new(),
                answer: None,
            });
        }
    }
}

impl Connection {
    /// Reads the request or writes the answer, as far as the socket allows. `refused` and
    /// `timed_out` are the endpoint's own counts, for the answer.
    fn on_ready(&mut self, collect: &impl Fn(&mut Families), refused: u64, timed_out: u64) -> Next {
        if self.answer.is_none() {
            let mut buf = [0u8; 2048];
            loop {
                match (&self.stream).read(&mut buf) {
                    // Closed before the request was complete.
                    Ok(0) => return Next::Close,
                    Ok(n) => self.request.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return Next::Close,
                }
                if head_end(&self.request).is_some() || self.request.len() > MAX_REQUEST_BYTES {
                    break;
                }
            }
            match head_end(&self.request) {
                Some(end) => {
                    let collect = |families: &mut Families| {
                        collect(families);
                        families.process_counter(
                            "metrics_connections_refused",
                            "Metrics connections answered 503 and closed: the endpoint had its most open.",
                            refused,
                        );
                        families.process_counter(
                            "metrics_connections_timed_out",
                            "Metrics connections closed because the request and answer took longer than the timeout.",
                            timed_out,
                        );
                    };
                    self.answer = Some((answer(&self.request[..end], &collect), 0));
                }
                None if self.request.len() > MAX_REQUEST_BYTES => {
                    let version = version_of(&self.request);
                    let body = status_only(version, 431, "Request Header Fields Too Large");
                    self.answer = Some((body, 0));
                }
                None => return Next::Keep,
            }
        }
        let Some((bytes, written)) = &mut self.answer else {
            return Next::Keep;
        };
        while *written < bytes.len() {
            match (&self.stream).write(&bytes[*written..]) {
                Ok(0) => return Next::Close,
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Next::Close,
            }
        }
        // One answer per connection (`Connection: close`).
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        Next::Close
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Where the request head ends (after its blank line), if it has.
fn head_end(request: &[u8]) -> Option<usize> {
    request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// The version to answer in: HTTP/1.0 to a 1.0 client, HTTP/1.1 to everyone else.
fn version_of(request: &[u8]) -> &'static str {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    if line.trim_ascii_end().ends_with(b"HTTP/1.0") {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    }
}

/// The answer to one request head.
fn answer(head: &[u8], collect: &impl Fn(&mut Families)) -> Vec<u8> {
    let version = version_of(head);
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut words = line.trim_ascii_end().split(|&b| b == b' ');
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return status_only(version, 400, "Bad Request");
    };
    // Prometheus asks for exactly `/metrics`; a query string (some proxies add one) is ignored.
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    match (path, method) {
        (b"/metrics", b"GET" | b"HEAD") => {
            let mut families = Families::new();
            collect(&mut families);
            let body = families.encode();
            let mut out = format!(
                "{version} 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                TextEncoder::new().format_type(),
                body.len()
            )
            .into_bytes();
            if method == b"GET" {
                out.extend_from_slice(&body);
            }
            out
        }
        (b"/metrics", _) => with_body(version, "405 Method Not Allowed", "only GET\n"),
        _ => with_body(version, "404 Not Found", "not found; try /metrics\n"),
    }
}

fn with_body(version: &str, status: &str, body: &str) -> Vec<u8> {
    format!(
        "{version} {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn status_only(version: &str, code: u16, reason: &str) -> Vec<u8> {
    format!("{version} {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

/// A warning at most every [`LOG_EVERY`]: a flood of connections must not flood the log.
#[derive(Default)]
struct RateLimitedLog {
    last: Option<Instant>,
}

impl RateLimitedLog {
    fn note(&mut self, line: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        let due = match self.last {
            None => true,
            Some(at) => now.duration_since(at) >= LOG_EVERY,
        };
        if due {
            self.last = Some(now);
            tracing::warn!("{line}");
        }
    }
}
