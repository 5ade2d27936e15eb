//! `udpring load`: a cheap, single-threaded UDP request/response load generator.
//!
//! Each client owns one connected, non-blocking UDP socket (its own source port). All sockets
//! sit in one level-triggered epoll set; replies are drained with `recvmmsg` (64 per call) and
//! new requests leave through `sendmmsg`, one call per client refill.
//!
//! Two modes:
//! * closed loop (default): every client keeps `--window` requests in flight; each answer (or
//!   give-up) immediately triggers the next request of that client;
//! * open loop (`--rate R`): request `k` is *scheduled* at `start + k / R`, handed round-robin
//!   to the clients, and its latency is measured from the scheduled time, so a stalled server
//!   (or generator) shows up in the latency instead of silently lowering the offered load
//!   (no coordinated omission).
//!
//! Every request carries a per-client sequence number; replies are matched by it. Unanswered
//! requests are resent with the same sequence number after `--timeout`, doubling the timeout
//! each time, and given up after `--retries` resends.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use socket2::{Domain, Protocol, Socket, Type};

/// Wire format of the requests.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Plain echo: bytes 0..8 = u64 sequence number (big-endian), 8..12 = u32 client id
    /// (big-endian), then padding. Any server that echoes datagrams back works.
    Echo,
    /// sockperf ping-pong: 14-byte big-endian header (u64 seq, u16 flags = CLIENT|PONG_REQUEST,
    /// u32 total length), then padding. Works against `sockperf server` and echo servers.
    Sockperf,
}

impl Proto {
    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Echo => "echo",
            Proto::Sockperf => "sockperf",
        }
    }

    /// Smallest payload that holds this protocol's header.
    pub fn min_size(self) -> usize {
        match self {
            Proto::Echo => ECHO_MIN_LEN,
            Proto::Sockperf => SOCKPERF_HEADER_LEN,
        }
    }
}

/// Smallest echo request: just the sequence number.
pub const ECHO_MIN_LEN: usize = 8;
/// Size of the sockperf message header (u64 seq, u16 flags, u32 length).
pub const SOCKPERF_HEADER_LEN: usize = 14;
/// sockperf flag: the message was sent by a client.
pub const SOCKPERF_FLAG_CLIENT: u16 = 1;
/// sockperf flag: the client wants a reply.
pub const SOCKPERF_FLAG_PONG_REQUEST: u16 = 2;
/// Largest UDP payload over IPv4.
pub const MAX_PAYLOAD: usize = 65_507;
/// Messages per `recvmmsg` / `sendmmsg` call.
const BATCH: usize = 64;
/// Largest value recorded in the latency histogram (µs); larger values are clamped.
const HIST_MAX_US: u64 = 600_000_000;

/// Arguments of `udpring load`.
#[derive(clap::Args, Debug, Clone)]
#[command(about = "UDP request/response load generator (closed loop, or open loop with --rate)")]
pub struct LoadArgs {
    /// Server to load, as IP:PORT (IPv6 as [ADDR]:PORT).
    #[arg(long, value_name = "ADDR:PORT")]
    pub target: SocketAddr,

    /// Number of clients; each has its own UDP socket and source port.
    #[arg(long, default_value_t = 64, value_name = "C",
          value_parser = clap::value_parser!(u32).range(1..=16_000))]
    pub clients: u32,

    /// Requests in flight per client (closed-loop mode; ignored with --rate).
    #[arg(long, default_value_t = 8, value_name = "W",
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub window: u32,

    /// Request payload size in bytes (at least 8 for echo, 14 for sockperf).
    #[arg(long, default_value_t = 64, value_name = "S")]
    pub size: usize,

    /// How long to send after the warm-up, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_name = "DUR", value_parser = parse_duration,
          conflicts_with = "requests")]
    pub duration: Duration,

    /// Stop after N measured requests instead of after --duration.
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,

    /// Open loop: total requests per second on a fixed schedule; latency is measured from each
    /// request's scheduled send time (no coordinated omission).
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,

    /// Request format.
    #[arg(long, value_enum, default_value_t = Proto::Echo)]
    pub proto: Proto,

    /// First retransmission timeout; doubles after each resend.
    #[arg(long, default_value = "200ms", value_name = "DUR", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Resends of an unanswered request before it is given up.
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=16))]
    pub retries: u32,

    /// Print the final report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,

    /// No per-second progress line on stderr.
    #[arg(long)]
    pub quiet: bool,

    /// Run this long before measuring; requests sent during warm-up are not counted.
    #[arg(long, default_value = "0s", value_name = "DUR", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Upper bound on the retransmission timeout: the doubling stops here [default: none].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub max_timeout: Option<Duration>,

    /// After sending stops, keep retransmitting until every request is answered or given up
    /// (so `outstanding` is 0 and sent = answered + given up). Without it, requests still
    /// unanswered one --timeout after sending stops are reported as outstanding.
    #[arg(long)]
    pub settle: bool,

    /// Servers that answer from another port (udpring --sessions port-per-client): use
    /// unconnected sockets, accept replies from any port of the target's address, and send
    /// each client's new requests to the address its latest reply came from. Resends go to
    /// --target (the session's port may have closed meanwhile).
    #[arg(long)]
    pub follow_reply_port: bool,
}

/// Parses `10s`, `500ms`, `250us`, `2m`, `1.5s`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (expected e.g. 10s, 500ms)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Writes the request header for `seq` into `buf` (whose length is the request size).
/// Bytes after the header are left untouched (callers prefill padding once).
pub fn encode_request(proto: Proto, buf: &mut [u8], seq: u64, client: u32) {
    match proto {
        Proto::Echo => {
            buf[..8].copy_from_slice(&seq.to_be_bytes());
            if buf.len() >= 12 {
                buf[8..12].copy_from_slice(&client.to_be_bytes());
            }
        }
        Proto::Sockperf => {
            let flags = SOCKPERF_FLAG_CLIENT | SOCKPERF_FLAG_PONG_REQUEST;
            let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
            buf[..8].copy_from_slice(&seq.to_be_bytes());
            buf[8..10].copy_from_slice(&flags.to_be_bytes());
            buf[10..14].copy_from_slice(&len.to_be_bytes());
        }
    }
}

/// Extracts the sequence number from a reply, or `None` if the datagram is not a reply to
/// `client` in this protocol.
pub fn decode_reply(proto: Proto, buf: &[u8], client: u32) -> Option<u64> {
    let seq = u64::from_be_bytes(buf.get(..8)?.try_into().ok()?);
    match proto {
        Proto::Echo => {
            if let Some(id) = buf.get(8..12) {
                if id != client.to_be_bytes() {
                    return None;
                }
            }
        }
        Proto::Sockperf => {
            // A sockperf server clears CLIENT in its reply, an echo server does not; both are
            // fine. Only insist that the header is complete.
            if buf.len() < SOCKPERF_HEADER_LEN {
                return None;
            }
        }
    }
    Some(seq)
}

/// Retransmission timeout after `resends` resends: `base * 2^resends` (saturating).
pub fn backoff(base: Duration, resends: u32) -> Duration {
    match 1u32.checked_shl(resends) {
        Some(factor) => base.checked_mul(factor).unwrap_or(Duration::MAX),
        None => Duration::MAX,
    }
}

/// [`backoff`], capped at `cap` when one is given (`--max-timeout`).
pub fn capped_backoff(base: Duration, resends: u32, cap: Option<Duration>) -> Duration {
    let t = backoff(base, resends);
    cap.map_or(t, |c| t.min(c.max(base)))
}

/// Longest a request can stay pending before it is given up: the sum of its timeouts.
pub fn give_up_after(base: Duration, retries: u32, cap: Option<Duration>) -> Duration {
    (0..=retries).fold(Duration::ZERO, |acc, r| {
        acc.saturating_add(capped_backoff(base, r, cap))
    })
}

/// One request of a client, in flight or settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Latency origin: first send (closed loop) or scheduled send time (open loop).
    pub origin: Instant,
    /// Resends so far.
    pub resends: u32,
    /// Still waiting for a reply.
    pub pending: bool,
    /// Sent after the warm-up, so it counts in the report.
    pub counted: bool,
}

/// Requests of one client, indexed by sequence number (sequence numbers are consecutive, so
/// lookup is `seq - base`). Settled requests at the front are dropped.
#[derive(Debug)]
pub struct Outstanding {
    base_seq: u64,
    slots: VecDeque<Slot>,
    pending: usize,
}

impl Outstanding {
    /// Empty table whose first request gets `first_seq`.
    pub fn new(first_seq: u64) -> Self {
        Outstanding {
            base_seq: first_seq,
            slots: VecDeque::new(),
            pending: 0,
        }
    }

    /// Registers a new pending request and returns its sequence number.
    pub fn push(&mut self, origin: Instant, counted: bool) -> u64 {
        let seq = self.base_seq + self.slots.len() as u64;
        self.slots.push_back(Slot {
            origin,
            resends: 0,
            pending: true,
            counted,
        });
        self.pending += 1;
        seq
    }

    /// Requests still waiting for a reply.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// The pending request `seq`, if any.
    pub fn get_pending_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        let idx = usize::try_from(seq.checked_sub(self.base_seq)?).ok()?;
        self.slots.get_mut(idx).filter(|s| s.pending)
    }

    /// Settles request `seq` (answered or given up) and returns it; `None` if it is unknown or
    /// already settled (a duplicate or stray reply).
    pub fn settle(&mut self, seq: u64) -> Option<Slot> {
        let slot = self.get_pending_mut(seq)?;
        slot.pending = false;
        let out = *slot;
        self.pending -= 1;
        while self.slots.front().is_some_and(|s| !s.pending) {
            self.slots.pop_front();
            self.base_seq += 1;
        }
        Some(out)
    }

    /// Iterates over pending requests.
    pub fn iter_pending(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(|s| s.pending)
    }
}

/// Retransmission timers: one FIFO per resend level. All entries of a level have the same
/// timeout and are pushed in time order, so each FIFO is sorted and push/pop are O(1).
/// Entries are invalidated lazily (the slot is checked when the timer fires).
#[derive(Debug)]
pub struct Timers {
    levels: Vec<VecDeque<(Instant, u32, u64)>>,
}

impl Timers {
    /// Timers for `retries` resends (levels 0..=retries).
    pub fn new(retries: u32) -> Self {
        Timers {
            levels: (0..=retries).map(|_| VecDeque::new()).collect(),
        }
    }

    /// Arms a timer for `(client, seq)` at resend level `level`.
    pub fn push(&mut self, level: u32, deadline: Instant, client: u32, seq: u64) {
        if let Some(q) = self.levels.get_mut(level as usize) {
            q.push_back((deadline, client, seq));
        }
    }

    /// Pops one expired timer: `(level, client, seq)`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(u32, u32, u64)> {
        for (level, q) in self.levels.iter_mut().enumerate() {
            if q.front().is_some_and(|t| t.0 <= now) {
                let (_, client, seq) = q.pop_front()?;
                return Some((level as u32, client, seq));
            }
        }
        None
    }

    /// Earliest armed deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.levels
            .iter()
            .filter_map(|q| q.front().map(|t| t.0))
            .min()
    }

    /// Drops all timers.
    pub fn clear(&mut self) {
        self.levels.iter_mut().for_each(VecDeque::clear);
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    fn from_hist(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// Final report of a load run. Counters cover requests first sent after the warm-up.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub target: SocketAddr,
    pub proto: Proto,
    pub clients: u32,
    pub window: u32,
    pub size: usize,
    /// Open-loop rate, or `None` for closed loop.
    pub rate: Option<f64>,
    /// Measured interval (after warm-up, until the last answer or the end of sending).
    pub elapsed_s: f64,
    pub sent: u64,
    pub answered: u64,
    pub retransmitted: u64,
    pub given_up: u64,
    /// Still unanswered after the final drain.
    pub outstanding: u64,
    /// Replies that matched no pending request (duplicates, late, foreign).
    pub stray: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
    /// Answered requests per second.
    pub throughput: f64,
    pub latency: Latency,
    /// Generator CPU (getrusage RUSAGE_SELF) over the measured interval and drain.
    pub cpu_user_s: f64,
    pub cpu_sys_s: f64,
    /// Generator CPU as % of one core over the same interval.
    pub cpu_pct: f64,
}

impl LoadReport {
    /// `sent == answered + given_up + outstanding`.
    pub fn invariant_ok(&self) -> bool {
        self.sent == self.answered + self.given_up + self.outstanding
    }

    /// Requests not answered (given up or still outstanding), % of sent.
    pub fn loss_pct(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            (self.given_up + self.outstanding) as f64 * 100.0 / self.sent as f64
        }
    }

    /// The report as one JSON object (no trailing newline).
    pub fn to_json(&self) -> String {
        let l = &self.latency;
        let rate = self.rate.map_or_else(|| "null".to_string(), fmt_f);
        let mut s = String::with_capacity(768);
        // Writing into a String cannot fail.
        let _ =
            write!(
            s,
            "{{\"target\":\"{}\",\"proto\":\"{}\",\"mode\":\"{}\",\"clients\":{},\"window\":{},\
             \"size\":{},\"rate\":{},\"elapsed_s\":{},\"sent\":{},\"answered\":{},\
             \"retransmitted\":{},\"given_up\":{},\"outstanding\":{},\"stray\":{},\
             \"send_errors\":{},\"recv_errors\":{},\"loss_pct\":{},\"throughput\":{},\
             \"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\
             \"mean_us\":{},\"cpu_user_s\":{},\"cpu_sys_s\":{},\"cpu_pct\":{},\
             \"invariant_ok\":{}}}",
            self.target,
            self.proto.name(),
            if self.rate.is_some() { "open" } else { "closed" },
            self.clients,
            self.window,
            self.size,
            rate,
            fmt_f(self.elapsed_s),
            self.sent,
            self.answered,
            self.retransmitted,
            self.given_up,
            self.outstanding,
            self.stray,
            self.send_errors,
            self.recv_errors,
            fmt_f(self.loss_pct()),
            fmt_f(self.throughput),
            l.p50_us,
            l.p90_us,
            l.p99_us,
            l.p999_us,
            l.max_us,
            fmt_f(l.mean_us),
            fmt_f(self.cpu_user_s),
            fmt_f(self.cpu_sys_s),
            fmt_f(self.cpu_pct),
            self.invariant_ok(),
        );
        s
    }
}

/// JSON-safe float (no NaN/inf).
fn fmt_f(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".to_string()
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.rate {
            Some(r) => format!("open loop {r:.0} req/s"),
            None => format!("closed loop, window {}", self.window),
        };
        let l = &self.latency;
        writeln!(
            f,
            "target {} proto {} size {} B, {} clients, {}",
            self.target,
            self.proto.name(),
            self.size,
            self.clients,
            mode
        )?;
        writeln!(
            f,
            "throughput  {:.0} answered/s over {:.2} s",
            self.throughput, self.elapsed_s
        )?;
        writeln!(
            f,
            "latency µs  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.1}",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us
        )?;
        writeln!(
            f,
            "requests    sent {}  answered {}  given up {}  outstanding {}  (loss {:.3}%)",
            self.sent,
            self.answered,
            self.given_up,
            self.outstanding,
            self.loss_pct()
        )?;
        writeln!(
            f,
            "            retransmitted {}  stray {}  send errors {}  recv errors {}",
            self.retransmitted, self.stray, self.send_errors, self.recv_errors
        )?;
        writeln!(
            f,
            "invariant   sent = answered + given up + outstanding: {}",
            if self.invariant_ok() {
                "ok"
            } else {
                "VIOLATED"
            }
        )?;
        write!(
            f,
            "generator   cpu user {:.2} s  sys {:.2} s  = {:.1}% of one core",
            self.cpu_user_s, self.cpu_sys_s, self.cpu_pct
        )
    }
}

/// Validates the arguments.
fn check_args(args: &LoadArgs) -> io::Result<()> {
    let invalid = |m: String| Err(io::Error::new(io::ErrorKind::InvalidInput, m));
    let min = args.proto.min_size();
    if args.size < min || args.size > MAX_PAYLOAD {
        return invalid(format!(
            "--size {} out of range for --proto {} ({min}..={MAX_PAYLOAD})",
            args.size,
            args.proto.name()
        ));
    }
    if let Some(r) = args.rate {
        if !(r.is_finite() && r > 0.0) {
            return invalid(format!("--rate must be a positive number, got {r}"));
        }
    }
    if args.requests == Some(0) {
        return invalid("--requests must be at least 1".into());
    }
    if args.timeout.is_zero() {
        return invalid("--timeout must be positive".into());
    }
    Ok(())
}

/// Runs the generator, printing progress (unless `--quiet`) and the final report
/// (JSON with `--json`).
pub fn run_cli(args: &LoadArgs) -> io::Result<()> {
    let report = run(args)?;
    // Not println!: a closed stdout (e.g. a broken pipe) is an error, not a panic.
    let mut out = io::stdout().lock();
    if args.json {
        writeln!(out, "{}", report.to_json())?;
    } else {
        writeln!(out, "{report}")?;
    }
    out.flush()?;
    if !report.invariant_ok() {
        return Err(io::Error::other(
            "accounting invariant violated: sent != answered + given up + outstanding",
        ));
    }
    Ok(())
}

/// CPU time of this process (user, system) in seconds.
fn cpu_times() -> (f64, f64) {
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

/// One client: its socket (connected, unless --follow-reply-port) and its requests.
struct Client {
    sock: Socket,
    out: Outstanding,
    /// --follow-reply-port: where this client's requests go (the target until a reply
    /// arrives from another port of the target's address).
    dest: Option<RawAddr>,
}

/// A socket address in the kernel's format, for `sendmmsg`/`sendto` on unconnected sockets.
#[derive(Clone, Copy)]
struct RawAddr {
    addr: SocketAddr,
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    fn new(addr: SocketAddr) -> Self {
        // SAFETY: an all-zero sockaddr_storage is a valid value of this plain C struct.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin)
                };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6)
                };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        RawAddr {
            addr,
            storage,
            len: len as libc::socklen_t,
        }
    }
}

/// Parses a source address filled in by `recvmmsg`.
fn parse_sockaddr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(storage.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says sockaddr_in and the kernel wrote at least its size.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says sockaddr_in6 and the kernel wrote at least its size.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::new(ip.into(), u16::from_be(sin6.sin6_port)))
        }
        _ => None,
    }
}

/// Counters for requests first sent after the warm-up.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    sent: u64,
    answered: u64,
    retransmitted: u64,
    given_up: u64,
    stray: u64,
    send_errors: u64,
    recv_errors: u64,
}

/// Per-second progress counters (all requests, warm-up included).
#[derive(Debug, Default)]
struct Interval {
    sent: u64,
    answered: u64,
    given_up: u64,
}

fn new_hist() -> io::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3)
        .map_err(|e| io::Error::other(format!("histogram: {e}")))
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, HIST_MAX_US);
    // `us` is clamped into the histogram's bounds, so recording cannot fail.
    let _ = h.record(us);
}

fn open_client(target: SocketAddr, connect: bool) -> io::Result<Socket> {
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

fn errno_is(e: &io::Error, codes: &[i32]) -> bool {
    e.raw_os_error().is_some_and(|c| codes.contains(&c))
}

/// Scratch buffers for `sendmmsg` / `recvmmsg`. Pointers into the buffers are rebuilt for
/// every call, so nothing here is self-referential.
struct Io {
    size: usize,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
    recv_len: usize,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    /// Source addresses of received datagrams (--follow-reply-port).
    names: Vec<libc::sockaddr_storage>,
}

impl Io {
    fn new(size: usize) -> Self {
        let recv_len = (size + 64).max(2048);
        Io {
            size,
            // Padding byte pattern; headers are written over it per request.
            send_buf: vec![0xA5; size * BATCH],
            recv_buf: vec![0; recv_len * BATCH],
            recv_len,
            // SAFETY: all-zero iovec/mmsghdr (null pointers, zero lengths) are valid values.
            iov: vec![unsafe { std::mem::zeroed() }; BATCH],
            // SAFETY: as above.
            msgs: vec![unsafe { std::mem::zeroed() }; BATCH],
            // SAFETY: an all-zero sockaddr_storage is a valid value.
            names: vec![unsafe { std::mem::zeroed() }; BATCH],
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
    fn send_batch(&mut self, fd: RawFd, n: usize, dest: Option<&RawAddr>) -> io::Result<usize> {
        let n = n.min(BATCH);
        Self::prepare(
            &mut self.iov[..n],
            &mut self.msgs[..n],
            &mut self.send_buf,
            self.size,
        );
        if let Some(d) = dest {
            for m in &mut self.msgs[..n] {
                // The kernel only reads msg_name on send; `d` outlives the call.
                m.msg_hdr.msg_name = (&d.storage as *const libc::sockaddr_storage)
                    .cast_mut()
                    .cast();
                m.msg_hdr.msg_namelen = d.len;
            }
        }
        let mut done = 0;
        while done < n {
            let left = u32::try_from(n - done).unwrap_or(u32::MAX);
            // SAFETY: msgs[done..n] are initialised mmsghdrs whose iovecs point into
            // `send_buf`, which outlives the call; msg_name is null (connected socket) or
            // points at `dest`, which outlives the call.
            let rc = unsafe {
                libc::sendmmsg(fd, self.msgs[done..].as_mut_ptr(), left, libc::MSG_DONTWAIT)
            };
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

    /// One `recvmmsg` of up to BATCH datagrams; returns how many arrived (0 on EAGAIN).
    /// With `names`, each datagram's source address is kept (see [`Io::source`]).
    fn recv_batch(&mut self, fd: RawFd, names: bool) -> io::Result<usize> {
        Self::prepare(
            &mut self.iov,
            &mut self.msgs,
            &mut self.recv_buf,
            self.recv_len,
        );
        if names {
            for (m, name) in self.msgs.iter_mut().zip(self.names.iter_mut()) {
                m.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
                m.msg_hdr.msg_namelen =
                    std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            }
        }
        loop {
            // SAFETY: msgs[..BATCH] are initialised mmsghdrs whose iovecs point into
            // `recv_buf` (BATCH chunks of recv_len bytes) and whose msg_name is null or
            // points into `names` (room for a sockaddr_storage each); both outlive the call.
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
    fn source(&self, i: usize) -> Option<SocketAddr> {
        parse_sockaddr(&self.names[i], self.msgs[i].msg_hdr.msg_namelen)
    }

    /// Payload of received datagram `i` of the last `recv_batch`.
    fn received(&self, i: usize) -> &[u8] {
        let len = (self.msgs[i].msg_len as usize).min(self.recv_len);
        &self.recv_buf[i * self.recv_len..i * self.recv_len + len]
    }
}

/// Level-triggered epoll set with microsecond timeouts (epoll_pwait2, falling back to
/// epoll_wait rounded up to whole milliseconds on old kernels).
struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
    pwait2: bool,
}

impl Epoll {
    fn new(cap: usize) -> io::Result<Self> {
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

    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
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
    fn wait(&mut self, timeout: Duration) -> io::Result<usize> {
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

/// The generator's state for one run.
struct Gen<'a> {
    args: &'a LoadArgs,
    clients: Vec<Client>,
    timers: Timers,
    io: Io,
    c: Counters,
    iv: Interval,
    hist: Histogram<u64>,
    iv_hist: Histogram<u64>,
    /// Counting starts once the warm-up is over.
    counting: bool,
    /// Measured requests issued so far (for --requests).
    issued_counted: u64,
    last_answer: Option<Instant>,
    /// Closed loop: clients whose window must be refilled.
    refill: Vec<u32>,
    /// `--target` in the kernel's format (resends under --follow-reply-port).
    target_raw: RawAddr,
    refill_flag: Vec<bool>,
}

impl<'a> Gen<'a> {
    fn quota_left(&self) -> u64 {
        match self.args.requests {
            Some(n) if self.counting => n.saturating_sub(self.issued_counted),
            _ => u64::MAX,
        }
    }

    /// Issues `origins.len()` new requests on client `ci` (batched `sendmmsg`).
    fn issue(&mut self, ci: u32, origins: &[Instant]) {
        let size = self.args.size;
        let proto = self.args.proto;
        let counted = self.counting;
        let now = Instant::now();
        let first_timeout = self.args.timeout;
        for chunk in origins.chunks(BATCH) {
            let client = &mut self.clients[ci as usize];
            for (i, &origin) in chunk.iter().enumerate() {
                let seq = client.out.push(origin, counted);
                self.timers.push(0, now + first_timeout, ci, seq);
                encode_request(
                    proto,
                    &mut self.io.send_buf[i * size..(i + 1) * size],
                    seq,
                    ci,
                );
            }
            let n = chunk.len() as u64;
            self.iv.sent += n;
            if counted {
                self.c.sent += n;
                self.issued_counted += n;
            }
            let fd = client.sock.as_raw_fd();
            let took = self
                .io
                .send_batch(fd, chunk.len(), client.dest.as_ref())
                .unwrap_or_default();
            // Requests the kernel refused stay pending; the retransmit timer resends them.
            if counted {
                self.c.send_errors += (chunk.len() - took) as u64;
            }
        }
    }

    /// Closed loop: tops up client `ci` to its window.
    fn refill_client(&mut self, ci: u32, now: Instant) {
        let pending = self.clients[ci as usize].out.pending();
        let want = (self.args.window as usize).saturating_sub(pending);
        let want = want.min(usize::try_from(self.quota_left()).unwrap_or(usize::MAX));
        if want == 0 {
            return;
        }
        let origins = [now; BATCH];
        let mut left = want;
        while left > 0 {
            let n = left.min(BATCH);
            self.issue(ci, &origins[..n]);
            left -= n;
        }
    }

    fn mark_refill(&mut self, ci: u32) {
        if !self.refill_flag[ci as usize] {
            self.refill_flag[ci as usize] = true;
            self.refill.push(ci);
        }
    }

    /// Fires expired retransmission timers: resend, or give up after `--retries` resends.
    fn fire_timers(&mut self, now: Instant, closed_loop: bool) {
        let retries = self.args.retries;
        let size = self.args.size;
        while let Some((level, ci, seq)) = self.timers.pop_due(now) {
            let client = &mut self.clients[ci as usize];
            let Some(slot) = client.out.get_pending_mut(seq) else {
                continue; // answered meanwhile
            };
            if slot.resends != level {
                continue; // stale timer
            }
            if level < retries {
                slot.resends += 1;
                let counted = slot.counted;
                let fd = client.sock.as_raw_fd();
                self.timers.push(
                    level + 1,
                    now + capped_backoff(self.args.timeout, level + 1, self.args.max_timeout),
                    ci,
                    seq,
                );
                let buf = &mut self.io.send_buf[..size];
                encode_request(self.args.proto, buf, seq, ci);
                // --follow-reply-port: resends go to the target itself, which always reaches
                // the server: the session's port may have closed on idle while every datagram
                // of this client was lost (the server then answers from a new port).
                let (name, namelen) = match client.dest.as_ref().map(|_| &self.target_raw) {
                    Some(d) => ((&d.storage as *const libc::sockaddr_storage).cast(), d.len),
                    None => (std::ptr::null(), 0),
                };
                // SAFETY: `buf` is a valid readable buffer of `size` bytes for the call;
                // `fd` is the client's open socket, connected when `name` is null, and
                // `name` otherwise points at `namelen` bytes of the client's destination.
                let rc = unsafe {
                    libc::sendto(
                        fd,
                        buf.as_ptr().cast(),
                        size,
                        libc::MSG_DONTWAIT,
                        name,
                        namelen,
                    )
                };
                if counted {
                    self.c.retransmitted += 1;
                    if rc < 0 {
                        self.c.send_errors += 1;
                    }
                }
            } else {
                if let Some(s) = client.out.settle(seq) {
                    self.iv.given_up += 1;
                    if s.counted {
                        self.c.given_up += 1;
                    }
                }
                if closed_loop {
                    self.mark_refill(ci);
                }
            }
        }
    }

    /// Drains client `ci`'s socket; returns whether any request was answered.
    fn drain(&mut self, ci: u32) -> bool {
        let mut answered_any = false;
        // Bounded per wake-up for fairness; level-triggered epoll brings us back.
        for _ in 0..16 {
            let fd = self.clients[ci as usize].sock.as_raw_fd();
            let follow = self.args.follow_reply_port;
            let n = match self.io.recv_batch(fd, follow) {
                Ok(n) => n,
                Err(_) => {
                    // E.g. ECONNREFUSED from an ICMP port unreachable: count, keep going.
                    if self.counting {
                        self.c.recv_errors += 1;
                    }
                    continue;
                }
            };
            if n == 0 {
                break;
            }
            let now = Instant::now();
            for i in 0..n {
                // An unconnected socket hears from anyone: only the target's address counts.
                let from = if follow { self.io.source(i) } else { None };
                let seq = if follow && from.map(|a| a.ip()) != Some(self.args.target.ip()) {
                    None
                } else {
                    decode_reply(self.args.proto, self.io.received(i), ci)
                };
                let client = &mut self.clients[ci as usize];
                let settled = seq.and_then(|s| client.out.settle(s));
                if let (Some(_), Some(from), Some(dest)) = (settled, from, client.dest.as_mut()) {
                    if dest.addr != from {
                        *dest = RawAddr::new(from);
                    }
                }
                match settled {
                    Some(slot) => {
                        answered_any = true;
                        self.iv.answered += 1;
                        let lat = now.saturating_duration_since(slot.origin);
                        record(&mut self.iv_hist, lat);
                        if slot.counted {
                            self.c.answered += 1;
                            record(&mut self.hist, lat);
                            self.last_answer = Some(now);
                        }
                    }
                    None => {
                        if self.counting {
                            self.c.stray += 1;
                        }
                    }
                }
            }
            if n < BATCH {
                break;
            }
        }
        answered_any
    }

    fn outstanding(&self) -> usize {
        self.clients.iter().map(|c| c.out.pending()).sum()
    }

    fn progress(&mut self, secs: f64) {
        let l = Latency::from_hist(&self.iv_hist);
        let settled = self.iv.answered + self.iv.given_up;
        let loss = if settled == 0 {
            0.0
        } else {
            self.iv.given_up as f64 * 100.0 / settled as f64
        };
        eprintln!(
            "[{:>6.1}s]{} sent/s {:>9.0}  answered/s {:>9.0}  loss {:>6.3}%  p50 {:>6} µs  p99 {:>7} µs",
            secs,
            if self.counting { "" } else { " warmup" },
            self.iv.sent as f64,
            self.iv.answered as f64,
            loss,
            l.p50_us,
            l.p99_us
        );
        self.iv = Interval::default();
        self.iv_hist.reset();
    }
}

/// Runs the generator and returns its report (prints progress unless `--quiet`).
pub fn run(args: &LoadArgs) -> io::Result<LoadReport> {
    check_args(args)?;
    // Finer timer slack so open-loop wake-ups land close to their schedule (best effort).
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and affects only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 5_000 as libc::c_ulong);
    }

    let n_clients = args.clients;
    let mut epoll = Epoll::new(n_clients as usize)?;
    let mut clients = Vec::with_capacity(n_clients as usize);
    for ci in 0..n_clients {
        let sock = open_client(args.target, !args.follow_reply_port)?;
        epoll.add(sock.as_raw_fd(), u64::from(ci))?;
        clients.push(Client {
            sock,
            out: Outstanding::new(1),
            dest: args.follow_reply_port.then(|| RawAddr::new(args.target)),
        });
    }
    let mut g = Gen {
        args,
        clients,
        timers: Timers::new(args.retries),
        io: Io::new(args.size),
        c: Counters::default(),
        iv: Interval::default(),
        hist: new_hist()?,
        iv_hist: new_hist()?,
        counting: false,
        issued_counted: 0,
        last_answer: None,
        refill: Vec::new(),
        refill_flag: vec![false; n_clients as usize],
        target_raw: RawAddr::new(args.target),
    };

    let closed_loop = args.rate.is_none();
    let start = Instant::now();
    let measure_start = start + args.warmup;
    let send_end = match args.requests {
        Some(_) => None,
        None => Some(measure_start + args.duration),
    };
    let mut cpu0 = cpu_times();
    let mut next_progress = start + Duration::from_secs(1);
    // Open loop: requests scheduled so far.
    let mut scheduled: u64 = 0;
    let rate = args.rate.unwrap_or(0.0);
    let sched_at = |k: u64| start + Duration::from_secs_f64(k as f64 / rate);
    let mut per_client: Vec<Vec<Instant>> = vec![Vec::new(); n_clients as usize];

    if closed_loop {
        for ci in 0..n_clients {
            g.mark_refill(ci);
        }
    }
    let mut sending = true;
    let mut drain_deadline = start;
    let mut send_stop = start;

    loop {
        let now = Instant::now();
        if !g.counting && now >= measure_start {
            g.counting = true;
            cpu0 = cpu_times();
        }
        if sending {
            let done = match (send_end, args.requests) {
                (Some(end), _) => now >= end,
                (None, Some(n)) => g.counting && g.issued_counted >= n,
                (None, None) => false,
            };
            if done {
                sending = false;
                send_stop = now;
                if args.settle {
                    // Every pending request is answered or given up by then (plus slack
                    // for the last resend's reply in flight).
                    drain_deadline = now
                        + give_up_after(args.timeout, args.retries, args.max_timeout)
                        + args.timeout;
                } else {
                    drain_deadline = now + args.timeout;
                    g.timers.clear();
                }
            }
        }
        if !sending && (g.outstanding() == 0 || now >= drain_deadline) {
            break;
        }
        if !sending && args.settle {
            // Resends and give-ups continue; no new requests (so nothing to refill).
            g.fire_timers(now, false);
        }

        if sending {
            g.fire_timers(now, closed_loop);
            if closed_loop {
                let todo = std::mem::take(&mut g.refill);
                for &ci in &todo {
                    g.refill_flag[ci as usize] = false;
                    g.refill_client(ci, now);
                }
                g.refill = todo;
                g.refill.clear();
            } else {
                // Everything scheduled up to now, capped per iteration so replies keep
                // being read when far behind (late requests keep their scheduled origin).
                // Request k is due at start + k/rate, so floor(elapsed*rate)+1 are due now.
                let due = ((now - start).as_secs_f64() * rate) as u64 + 1;
                let mut n = due.saturating_sub(scheduled).min(4096);
                n = n.min(g.quota_left());
                for k in scheduled..scheduled + n {
                    // During warm-up all requests count as uncounted; once counting starts
                    // the quota applies.
                    per_client[(k % u64::from(n_clients)) as usize].push(sched_at(k));
                }
                scheduled += n;
                for (ci, origins) in per_client.iter_mut().enumerate() {
                    if !origins.is_empty() {
                        g.issue(ci as u32, origins);
                        origins.clear();
                    }
                }
            }
        }

        if !args.quiet && now >= next_progress {
            g.progress((now - start).as_secs_f64());
            next_progress += Duration::from_secs(1);
        }

        // Sleep until the next thing to do.
        let mut wake = next_progress;
        if sending {
            if let Some(t) = g.timers.next_deadline() {
                wake = wake.min(t);
            }
            if let Some(end) = send_end {
                wake = wake.min(end);
            }
            if !g.counting {
                wake = wake.min(measure_start);
            }
            if !closed_loop {
                wake = wake.min(sched_at(scheduled));
            }
        } else {
            wake = wake.min(drain_deadline);
            if args.settle {
                if let Some(t) = g.timers.next_deadline() {
                    wake = wake.min(t);
                }
            }
        }
        let timeout = if !g.refill.is_empty() {
            Duration::ZERO
        } else {
            wake.saturating_duration_since(Instant::now())
        };
        let n = epoll.wait(timeout)?;
        for i in 0..n {
            let ci = epoll.events[i].u64 as u32;
            if g.drain(ci) && closed_loop && sending {
                g.refill_client(ci, Instant::now());
            }
        }
    }

    let end = Instant::now();
    let cpu1 = cpu_times();
    let measured_end = g.last_answer.map_or(send_stop, |t| t.max(send_stop));
    let elapsed = measured_end.saturating_duration_since(measure_start);
    let wall = end.saturating_duration_since(measure_start).as_secs_f64();
    let outstanding_counted: u64 = g
        .clients
        .iter()
        .map(|c| c.out.iter_pending().filter(|s| s.counted).count() as u64)
        .sum();
    let (cpu_user_s, cpu_sys_s) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    let elapsed_s = elapsed.as_secs_f64();
    Ok(LoadReport {
        target: args.target,
        proto: args.proto,
        clients: args.clients,
        window: args.window,
        size: args.size,
        rate: args.rate,
        elapsed_s,
        sent: g.c.sent,
        answered: g.c.answered,
        retransmitted: g.c.retransmitted,
        given_up: g.c.given_up,
        outstanding: outstanding_counted,
        stray: g.c.stray,
        send_errors: g.c.send_errors,
        recv_errors: g.c.recv_errors,
        throughput: if elapsed_s > 0.0 {
            g.c.answered as f64 / elapsed_s
        } else {
            0.0
        },
        latency: Latency::from_hist(&g.hist),
        cpu_user_s,
        cpu_sys_s,
        cpu_pct: if wall > 0.0 {
            (cpu_user_s + cpu_sys_s) * 100.0 / wall
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn echo_roundtrip() {
        let mut buf = vec![0u8; 64];
        encode_request(Proto::Echo, &mut buf, 0x0102_0304_0506_0708, 7);
        assert_eq!(&buf[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&buf[8..12], &[0, 0, 0, 7]);
        assert_eq!(
            decode_reply(Proto::Echo, &buf, 7),
            Some(0x0102_0304_0506_0708)
        );
        // Another client's reply is not ours.
        assert_eq!(decode_reply(Proto::Echo, &buf, 8), None);
        // Minimal 8-byte request: seq only.
        let mut small = [0u8; 8];
        encode_request(Proto::Echo, &mut small, 42, 3);
        assert_eq!(decode_reply(Proto::Echo, &small, 9), Some(42));
        assert_eq!(decode_reply(Proto::Echo, &small[..7], 3), None);
    }

    #[test]
    fn sockperf_header() {
        let mut buf = vec![0xEEu8; 64];
        encode_request(Proto::Sockperf, &mut buf, 5, 1);
        assert_eq!(&buf[..8], &5u64.to_be_bytes());
        assert_eq!(u16::from_be_bytes([buf[8], buf[9]]), 3); // CLIENT | PONG_REQUEST
        assert_eq!(u32::from_be_bytes([buf[10], buf[11], buf[12], buf[13]]), 64);
        assert_eq!(buf[14], 0xEE, "padding untouched");
        assert_eq!(decode_reply(Proto::Sockperf, &buf, 1), Some(5));
        // A sockperf server's reply has CLIENT cleared; still a reply.
        buf[9] = 2;
        assert_eq!(decode_reply(Proto::Sockperf, &buf, 1), Some(5));
        assert_eq!(decode_reply(Proto::Sockperf, &buf[..13], 1), None);
    }

    #[test]
    fn seq_matching() {
        let t = Instant::now();
        let mut o = Outstanding::new(1);
        let s1 = o.push(t, true);
        let s2 = o.push(t, false);
        let s3 = o.push(t, true);
        assert_eq!((s1, s2, s3), (1, 2, 3));
        assert_eq!(o.pending(), 3);
        // Out of order answer.
        assert!(o.settle(2).is_some_and(|s| !s.counted));
        assert_eq!(o.pending(), 2);
        // Duplicate and unknown replies are strays.
        assert!(o.settle(2).is_none());
        assert!(o.settle(0).is_none());
        assert!(o.settle(99).is_none());
        assert!(o.settle(1).is_some());
        // Front settled: 1 and 2 dropped, 3 still addressable.
        assert_eq!(o.slots.len(), 1);
        assert!(o.get_pending_mut(3).is_some());
        assert!(o.settle(3).is_some_and(|s| s.counted));
        assert_eq!(o.pending(), 0);
        assert_eq!(o.push(t, true), 4);
        assert!(o.settle(1).is_none(), "old seq after compaction is stray");
    }

    #[test]
    fn backoff_schedule() {
        let base = Duration::from_millis(200);
        let got: Vec<_> = (0..4).map(|r| backoff(base, r).as_millis()).collect();
        assert_eq!(got, vec![200, 400, 800, 1600]);
        assert_eq!(backoff(base, 40), Duration::MAX);
    }

    #[test]
    fn timers_fire_in_order_per_level() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut tm = Timers::new(2);
        tm.push(0, t0 + ms(10), 0, 1);
        tm.push(0, t0 + ms(20), 1, 1);
        tm.push(1, t0 + ms(5), 2, 9);
        tm.push(5, t0, 0, 0); // beyond --retries: ignored
        assert_eq!(tm.next_deadline(), Some(t0 + ms(5)));
        assert_eq!(tm.pop_due(t0), None);
        let mut fired = Vec::new();
        while let Some(x) = tm.pop_due(t0 + ms(15)) {
            fired.push(x);
        }
        fired.sort();
        assert_eq!(fired, vec![(0, 0, 1), (1, 2, 9)]);
        assert_eq!(tm.next_deadline(), Some(t0 + ms(20)));
        tm.clear();
        assert_eq!(tm.next_deadline(), None);
    }

    #[test]
    fn report_invariant_and_json() {
        let r = LoadReport {
            target: "127.0.0.1:9000".parse().expect("valid literal"),
            proto: Proto::Sockperf,
            clients: 2,
            window: 4,
            size: 64,
            rate: None,
            elapsed_s: 1.0,
            sent: 10,
            answered: 7,
            retransmitted: 3,
            given_up: 2,
            outstanding: 1,
            stray: 0,
            send_errors: 0,
            recv_errors: 0,
            throughput: 7.0,
            latency: Latency::default(),
            cpu_user_s: 0.1,
            cpu_sys_s: 0.2,
            cpu_pct: 30.0,
        };
        assert!(r.invariant_ok());
        assert!((r.loss_pct() - 30.0).abs() < 1e-9);
        let j = r.to_json();
        assert!(j.starts_with('{') && j.ends_with('}'));
        assert!(j.contains("\"answered\":7"));
        assert!(j.contains("\"rate\":null"));
        assert!(j.contains("\"invariant_ok\":true"));
    }

    #[test]
    fn capped_backoff_and_give_up_time() {
        let ms = Duration::from_millis;
        assert_eq!(capped_backoff(ms(50), 3, None), ms(400));
        assert_eq!(capped_backoff(ms(50), 3, Some(ms(200))), ms(200));
        assert_eq!(
            capped_backoff(ms(50), 0, Some(ms(10))),
            ms(50),
            "never below base"
        );
        // 50 + 100 + 200 + 200
        assert_eq!(give_up_after(ms(50), 3, Some(ms(200))), ms(550));
        assert_eq!(give_up_after(ms(50), 2, None), ms(350));
    }

    #[test]
    fn raw_addr_round_trip() {
        for a in ["10.77.0.1:9000", "[::1]:7", "127.0.0.1:65535"] {
            let addr: SocketAddr = a.parse().expect("valid literal");
            let r = RawAddr::new(addr);
            assert_eq!(parse_sockaddr(&r.storage, r.len), Some(addr));
        }
        let r = RawAddr::new("127.0.0.1:1".parse().expect("valid literal"));
        assert_eq!(parse_sockaddr(&r.storage, 4), None, "short address");
    }

    /// An echo thread on loopback (a main and another socket), stopped when the returned
    /// flag is set. `answer` gets each request, its source and whether it came to the main
    /// socket, and returns the socket to reply from (0 main, 1 other; `None` drops it).
    fn echo_thread<F>(
        mut answer: F,
    ) -> (
        SocketAddr,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )
    where
        F: FnMut(&[u8], SocketAddr, bool) -> Option<usize> + Send + 'static,
    {
        let main = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        let other = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        main.set_nonblocking(true).expect("non-blocking");
        other.set_nonblocking(true).expect("non-blocking");
        let target = main.local_addr().expect("bound socket has an address");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let h = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let mut idle = true;
                for (on_main, s) in [(true, &main), (false, &other)] {
                    if let Ok((n, from)) = s.recv_from(&mut buf) {
                        idle = false;
                        match answer(&buf[..n], from, on_main) {
                            Some(0) => drop(main.send_to(&buf[..n], from)),
                            Some(_) => drop(other.send_to(&buf[..n], from)),
                            None => {}
                        }
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        });
        (target, stop, h)
    }

    fn test_args(target: SocketAddr) -> LoadArgs {
        LoadArgs {
            target,
            clients: 4,
            window: 2,
            size: 32,
            duration: Duration::from_millis(300),
            requests: None,
            rate: None,
            proto: Proto::Echo,
            timeout: Duration::from_millis(20),
            retries: 6,
            json: true,
            quiet: true,
            warmup: Duration::ZERO,
            max_timeout: Some(Duration::from_millis(40)),
            settle: false,
            follow_reply_port: false,
        }
    }

    /// --settle: the first copy of every request is dropped, yet every request is answered
    /// and none is left outstanding.
    #[test]
    fn settle_answers_every_request_despite_loss() {
        let mut seen = std::collections::HashSet::new();
        let (target, stop, h) = echo_thread(move |req, from, _| {
            let key = (req[..12].to_vec(), from);
            seen.insert(key).then_some(()).map_or(Some(0), |()| None)
        });
        let args = LoadArgs {
            requests: Some(200),
            settle: true,
            ..test_args(target)
        };
        let r = run(&args).expect("load run");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().expect("echo thread");
        assert_eq!(r.sent, 200, "{r}");
        assert_eq!(r.answered, 200, "{r}");
        assert_eq!((r.given_up, r.outstanding), (0, 0), "{r}");
        assert!(r.retransmitted >= 200, "{r}");
    }

    /// --follow-reply-port: the server answers the first request of a client from its main
    /// port's sibling and expects everything after it there (like port-per-client).
    #[test]
    fn follow_reply_port_switches_to_the_reply_source() {
        let mut switched = std::collections::HashSet::new();
        let mut wrong = 0u64;
        let wrong_seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let w2 = wrong_seen.clone();
        // Requests on the main port from a peer already answered from the other port are
        // counted as wrong (but still answered, from the other port).
        let (target, stop, h) = echo_thread(move |_req, from, on_main| {
            if on_main && !switched.insert(from) {
                wrong += 1;
                w2.store(wrong, std::sync::atomic::Ordering::Relaxed);
            }
            Some(1)
        });
        let args = LoadArgs {
            requests: Some(400),
            settle: true,
            follow_reply_port: true,
            window: 1,
            ..test_args(target)
        };
        let r = run(&args).expect("load run");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().expect("echo thread");
        assert_eq!((r.answered, r.given_up, r.outstanding), (400, 0, 0), "{r}");
        // With window 1 each client sends a new request to the main port only once; resends
        // (none expected on an idle loopback) also go there.
        let wrong = wrong_seen.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            wrong <= r.retransmitted,
            "{wrong} requests to the main port; {r}"
        );
    }

    /// End to end against an in-process echo thread on loopback (bounded: 300 ms).
    #[test]
    fn closed_loop_against_echo_thread() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        server
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set timeout");
        let target = server.local_addr().expect("bound socket has an address");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let h = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], from);
                }
            }
        });
        let args = LoadArgs {
            target,
            clients: 4,
            window: 2,
            size: 32,
            duration: Duration::from_millis(300),
            requests: None,
            rate: None,
            proto: Proto::Sockperf,
            timeout: Duration::from_millis(100),
            retries: 2,
            json: true,
            quiet: true,
            warmup: Duration::ZERO,
            max_timeout: None,
            settle: false,
            follow_reply_port: false,
        };
        let r = run(&args).expect("load run");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().expect("echo thread");
        assert!(r.answered > 0, "{r}");
        assert!(r.invariant_ok(), "{r}");
    }
}
