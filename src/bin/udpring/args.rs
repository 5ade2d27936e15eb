//! The command line's arguments. Every `serve` option that sets a [`ServerConfig`] field
//! takes its default from [`ServerConfig::default`], so `--help`, the option left out and a
//! library user's `ServerConfig::default()` all mean the same server.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use udpring::config::Steer;
use udpring::{ServerConfig, SessionMode};

use crate::load::LoadArgs;

#[derive(Parser, Debug)]
#[command(
    name = "udpring",
    version,
    about = "High-throughput UDP server on io_uring",
    long_about = "udpring serves UDP on Linux with io_uring: one worker thread per CPU, each with \
its own SO_REUSEPORT socket and ring, multishot receive into provided buffers and batched replies.\n\n\
Examples:\n  udpring serve                          echo on 127.0.0.1:9000, one worker per CPU\n  \
udpring serve --bind [::]:7 --app echo  dual-stack echo on every address\n  \
udpring serve --app sockperf --workers 1  answer `sockperf ping-pong`\n  \
udpring probe                          which io_uring features this kernel has\n\n\
Logging: one line per event on stderr, plain text unless stderr is a terminal; \
RUST_LOG=debug for more (default info)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve UDP until SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Print the kernel version and each io_uring feature udpring uses, yes or no.
    Probe,
    /// UDP request/response load generator (closed loop, or open loop with --rate).
    Load(LoadArgs),
}

/// The library's defaults, built once: `default_value_t` asks for one field per option.
fn defaults() -> &'static ServerConfig {
    static DEFAULTS: OnceLock<ServerConfig> = OnceLock::new();
    DEFAULTS.get_or_init(ServerConfig::default)
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to serve on. `0.0.0.0` or `[::]` (dual-stack) serve every address, and replies
    /// leave from the address each request was sent to. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR:PORT", default_value_t = defaults().bind)]
    bind: SocketAddr,
    /// Worker threads, each with its own socket and io_uring. The default is one per CPU
    /// this process may run on.
    #[arg(long, value_name = "N", default_value_t = defaults().workers)]
    workers: usize,
    /// What to answer with: echo (RFC 862), discard (RFC 863), or sockperf.
    #[arg(long, value_enum, default_value_t = App::Echo)]
    pub app: App,
    /// Pin worker i to the i-th CPU this process may use.
    #[arg(long)]
    pin_cpus: bool,
    /// Largest datagram received whole, in bytes; larger ones are counted as truncated and
    /// dropped. The default takes every legal UDP/IPv4 payload.
    #[arg(long, value_name = "BYTES", default_value_t = defaults().max_datagram)]
    max_datagram: usize,
    /// Provided receive buffers per worker (power of two, at most 32768). Each holds one
    /// datagram; untouched pages cost no memory.
    #[arg(long, value_name = "N", default_value_t = defaults().buffers)]
    buffers: u16,
    /// Reply slots per worker: replies in flight before the worker stops taking datagrams.
    #[arg(long, value_name = "N", default_value_t = defaults().send_slots)]
    send_slots: usize,
    /// Socket receive buffer (SO_RCVBUF) to ask for, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = defaults().recv_buffer_bytes)]
    recv_buffer: usize,
    /// Socket send buffer (SO_SNDBUF) to ask for, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = defaults().send_buffer_bytes)]
    send_buffer: usize,
    /// Send each reply on its own instead of joining consecutive replies to the same peer
    /// into UDP GSO trains.
    #[arg(long)]
    no_gso: bool,
    /// Do not enable UDP_GRO: every datagram is its own receive (no kernel coalescing of
    /// same-size datagrams from one client, and smaller receive buffers).
    #[arg(long)]
    no_gro: bool,
    /// Let the kernel hold a worker asleep up to this long (e.g. 20us) to gather
    /// --batch-size completions per wake-up: fewer wake-ups and less CPU per datagram under
    /// load, at the cost of that much added latency. 0 wakes on every completion.
    #[arg(long, value_name = "DUR", default_value_t = Dur::from(defaults().batch_wait))]
    batch_wait: Dur,
    /// After a busy loop turn, poll the ring without sleeping for up to this long (e.g. 50us)
    /// before blocking: senders stop paying for wake-ups and replies go out sooner, at the cost
    /// of a core kept busy after each burst. 0 never polls.
    #[arg(long, value_name = "DUR", default_value_t = Dur::from(defaults().busy_poll))]
    busy_poll: Dur,
    /// Completions to gather per wake-up when --batch-wait is set.
    #[arg(long, value_name = "N", default_value_t = defaults().batch_size)]
    batch_size: usize,
    /// How peers are tracked: none (stateless), shared (sessions demultiplexed on the worker's
    /// socket, no descriptor per client), connected (a socket per client bound to this address
    /// and port and connected to the peer: the seed article's Linux model), port-per-client (a
    /// socket per client on a new port the client must switch to: its IOCP model).
    #[arg(long, value_enum, default_value_t = Sessions::from(defaults().sessions))]
    sessions: Sessions,
    /// Close a session (and its socket) after this long without a datagram.
    #[arg(long, value_name = "DUR", default_value_t = Dur(defaults().idle_timeout))]
    pub idle_timeout: Dur,
    /// Sessions in all workers together; new peers beyond it are refused and counted.
    #[arg(long, value_name = "N", default_value_t = defaults().max_sessions)]
    max_sessions: usize,
    /// Sessions per worker, or `none` for no limit beyond --max-sessions.
    #[arg(long, value_name = "N", default_value_t = Limit(defaults().max_sessions_per_worker))]
    max_sessions_per_worker: Limit<usize>,
    /// New sessions per second per worker, or `none`.
    #[arg(long, value_name = "N", default_value_t = Limit(defaults().max_new_sessions_per_sec))]
    max_new_sessions_per_sec: Limit<u32>,
    /// Sessions per source IP address, or `none`.
    #[arg(long, value_name = "N", default_value_t = Limit(defaults().max_sessions_per_source))]
    max_sessions_per_source: Limit<u32>,
    /// Connected per-client sockets on the port (--sessions connected); beyond it new peers
    /// are served on the shared socket. Each one lengthens the kernel's lookup for datagrams
    /// from unknown peers (kernel-notes/connected-sockets.md).
    #[arg(long, value_name = "N", default_value_t = defaults().max_connected)]
    max_connected: usize,
    /// Stateless address validation: a new peer is answered with a cookie (a keyed MAC of its
    /// address and time) and gets a session only when it sends a datagram carrying it, so
    /// spoofed-source floods cost no state. Needs --sessions other than none; clients must
    /// speak the cookie exchange (kernel-notes/operations.md). With --app quic: QUIC's own
    /// Retry tokens, with --sessions none.
    #[arg(long)]
    pub validate_peers: bool,
    /// How often the cookie key changes; a cookie lives at most twice this long.
    #[arg(long, value_name = "DUR", default_value_t = Dur(defaults().cookie_rotation))]
    cookie_rotation: Dur,
    /// Until a peer is validated, reply bytes are at most this many times the bytes received
    /// from it, whatever the handler asks (RFC 9000 section 8 uses 3). 0 turns it off.
    #[arg(long, value_name = "N", default_value_t = defaults().amplification_factor)]
    amplification_factor: u32,
    /// Take over from the udpring serving --bind: receive its listening sockets (and what is
    /// queued on them), start serving, then tell it to finish what it still serves and exit 0.
    /// Without a running udpring on the address, start as usual. Sockets are taken only from
    /// a process of this user or root, and only UDP sockets bound to --bind with
    /// SO_REUSEPORT; anything else is refused in one line naming the peer, and exit 1.
    /// --app quic: QUIC connections survive it. Where the kernel loads udpring's SK_REUSEPORT
    /// eBPF program (Linux 4.19, CAP_BPF and CAP_NET_ADMIN), the new process binds sockets of
    /// its own and takes the next generation: new connections go to it, the old process's
    /// connections keep reaching the old process, which accepts no new ones and exits 0
    /// once its last connection closes (or after --drain-timeout). Elsewhere a line at start
    /// says so, and QUIC connections end at a takeover.
    #[arg(long)]
    pub takeover: bool,
    /// --app quic, after a --takeover that left this process its connections: how long it
    /// keeps driving them before it closes the rest (CONNECTION_CLOSE) and exits.
    #[arg(long, value_name = "DUR", default_value_t = Dur(std::time::Duration::from_secs(60)))]
    pub drain_timeout: Dur,
    /// How datagrams of new peers are spread over the workers: `none` (the kernel's
    /// SO_REUSEPORT hash) or `cpu` (the worker pinned to the CPU that received the packet;
    /// needs --pin-cpus and one worker per allowed CPU).
    #[arg(long, value_enum, default_value_t = SteerArg::from(defaults().steer))]
    steer: SteerArg,
    /// Also serve through AF_XDP on the interface IFACE (issue 17): one AF_XDP socket and
    /// worker per receive queue, beside the ring workers; an XDP program udpring loads
    /// itself sends UDP for --bind's address and port to them, and everything else
    /// (ARP, ICMP, other ports, IP options and fragments) to the kernel, where the ring
    /// workers serve what reaches the socket. The program is detached when the process
    /// ends, also by SIGKILL. --sessions none and datagram apps only (not --app quic).
    /// Where the kernel has no AF_XDP or refuses the program (CAP_BPF, CAP_NET_ADMIN), one
    /// line says so and the ring path serves alone. Replies go to the MAC address the
    /// peer's frames came from; the peer's checksums must be complete (on a veth, turn
    /// the sender's TX checksum offload off).
    #[arg(long, value_name = "IFACE")]
    xdp: Option<String>,
    /// With --xdp: `auto` (native XDP where the driver has it, else generic), `native`
    /// (an error without driver support) or `generic`.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto, requires = "xdp")]
    xdp_mode: XdpModeArg,
    /// With --xdp: copy mode even where the driver could do zero-copy.
    #[arg(long, requires = "xdp")]
    xdp_copy: bool,
    /// With --xdp: entries of each AF_XDP ring (a power of two, 64..=16384); the UMEM holds
    /// twice as many 4 KiB frames per queue.
    #[arg(long, value_name = "N", default_value_t = 2048, requires = "xdp")]
    xdp_ring: u32,
    /// --app quic: the certificate chain to present (PEM). Without it a self-signed
    /// certificate for `localhost` and the listen address is made at start, written to a
    /// file whose path is printed, and its SHA-256 fingerprint logged.
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// --app quic: the private key of --cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    /// --app quic: the directory whose files ALPN `h3` (HTTP/3 GET and HEAD, content-type by
    /// extension) and `hq-interop` (`GET /path`) serve; no file outside it is ever served.
    /// Without it every request gets a 404.
    #[arg(long, value_name = "DIR")]
    pub root: Option<std::path::PathBuf>,
    /// --app quic: above this many handshakes in flight on a worker, a new client must
    /// return a Retry token (prove its address) before it gets any connection state, so a
    /// flood of Initials from spoofed sources costs at most this much state per worker.
    /// Counted in retries_busy.
    #[arg(long, value_name = "N",
          default_value_t = udpring::quic::QuicConfig::DEFAULT_RETRY_ABOVE_HANDSHAKES)]
    pub quic_retry_above: usize,
    /// --app quic: at this many handshakes in flight on a worker, new clients are refused
    /// (CONNECTION_REFUSED), validated or not. Counted in refused_busy.
    #[arg(long, value_name = "N",
          default_value_t = udpring::quic::QuicConfig::DEFAULT_MAX_HANDSHAKES)]
    pub quic_max_handshakes: usize,
    /// --app quic: refuse 0-RTT (early) data from resumed clients; they still resume, with
    /// one round trip more before their first request.
    #[arg(long = "no-0rtt")]
    pub no_0rtt: bool,
    /// --app quic: this host's QUIC-LB server ID (1 to 15 bytes in hex, e.g. 0a0b0c). Server
    /// connection IDs then follow the QUIC-LB plaintext format (first octet, server ID,
    /// worker, random), so a load balancer in front of several hosts routes each connection
    /// to its host by the server ID, whatever the client's address does. Without it: 8-byte
    /// IDs whose first byte is the worker.
    #[arg(long, value_name = "HEX", value_parser = parse_server_id)]
    pub quic_server_id: Option<ServerId>,
    /// --app quic, with --quic-server-id: the QUIC-LB config rotation codepoint (0 to 6) in
    /// the top bits of every connection ID's first octet.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "quic_server_id",
          value_parser = clap::value_parser!(u8).range(0..=6))]
    pub quic_lb_config_id: u8,
    /// --app quic: the stateless reset key, read from FILE (at least 32 bytes, raw; at most
    /// 4096). Give every host of a fleet the same file: a host that receives a connection of
    /// another (after the load balancer moved it) resets it, and the client learns at once
    /// instead of waiting for its idle timeout. Without it, a random key per start.
    #[arg(long, value_name = "FILE")]
    pub stateless_reset_key: Option<std::path::PathBuf>,
    /// --app quic: TLS sessions kept for resumption, all workers together (0: none). Each
    /// handshake issues two single-use tickets; the oldest are evicted first.
    #[arg(long, value_name = "N", default_value_t = udpring::quic::DEFAULT_SESSION_CACHE)]
    pub session_cache: usize,
    /// --app quic: how long a session stays resumable (rotation: a ticket older than this
    /// gets a full handshake). Sessions pass to the next process with --takeover.
    #[arg(long, value_name = "DUR", default_value_t = Dur(udpring::quic::DEFAULT_SESSION_LIFETIME),
          value_parser = parse_positive_dur)]
    pub session_lifetime: Dur,
    /// Serve Prometheus metrics (text format 0.0.4) at http://ADDR:PORT/metrics. Bind it to
    /// loopback or a trusted interface. One thread serves at most 64 connections at once;
    /// more are answered 503 (counted in udpring_metrics_connections_refused_total).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// How long a metrics connection has to send its request and read the answer before it
    /// is closed (counted in udpring_metrics_connections_timed_out_total).
    #[arg(long, value_name = "DUR", default_value_t = Dur(crate::metrics::TIMEOUT),
          value_parser = parse_positive_dur)]
    metrics_timeout: Dur,
    /// Log a counter summary this often (e.g. 10s, 500ms), skipped when nothing was counted
    /// since the last one. 0 logs the counters only at exit.
    #[arg(long, value_name = "DUR", default_value_t = Dur(Duration::ZERO))]
    stats_interval: Dur,
}

impl ServeArgs {
    /// The server these options describe.
    pub fn config(&self) -> ServerConfig {
        let d = defaults();
        ServerConfig {
            bind: self.bind,
            workers: self.workers,
            // A switch turns on what the default leaves off (and the reverse for --no-gso).
            pin_cpus: d.pin_cpus || self.pin_cpus,
            max_datagram: self.max_datagram,
            buffers: self.buffers,
            send_slots: self.send_slots,
            recv_buffer_bytes: self.recv_buffer,
            send_buffer_bytes: self.send_buffer,
            gso: d.gso && !self.no_gso,
            gro: d.gro && !self.no_gro,
            batch_wait: self.batch_wait.or_off(),
            batch_size: self.batch_size,
            busy_poll: self.busy_poll.or_off(),
            sessions: self.sessions.into(),
            idle_timeout: self.idle_timeout.0,
            max_sessions: self.max_sessions,
            max_sessions_per_worker: self.max_sessions_per_worker.0,
            max_new_sessions_per_sec: self.max_new_sessions_per_sec.0,
            max_sessions_per_source: self.max_sessions_per_source.0,
            max_connected: self.max_connected,
            validate_peers: d.validate_peers || self.validate_peers,
            cookie_rotation: self.cookie_rotation.0,
            amplification_factor: self.amplification_factor,
            steer: self.steer.into(),
            xdp: self.xdp.as_ref().map(|iface| udpring::xdp::XdpConfig {
                mode: self.xdp_mode.into(),
                force_copy: self.xdp_copy,
                ring: self.xdp_ring,
                ..udpring::xdp::XdpConfig::new(iface)
            }),
            // Options without a flag keep the library's value.
            ..d.clone()
        }
    }

    /// How often to log the counters; `None` only at exit.
    pub fn stats_interval(&self) -> Option<Duration> {
        self.stats_interval.or_off()
    }

    /// What the metrics endpoint allows its clients.
    pub fn metrics_limits(&self) -> crate::metrics::Limits {
        crate::metrics::Limits {
            timeout: self.metrics_timeout.0,
            ..crate::metrics::Limits::default()
        }
    }
}

/// A duration above zero (`--metrics-timeout`: zero would close every connection at once).
/// A `--quic-server-id` value: its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerId(pub Vec<u8>);

/// `--quic-server-id`: 1 to 15 bytes of hex.
fn parse_server_id(s: &str) -> Result<ServerId, String> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("hex digits, two per byte (e.g. 0a0b0c)".into());
    }
    let bytes: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("checked hex"))
        .collect();
    if bytes.is_empty() || bytes.len() > udpring::quic::cid::MAX_SERVER_ID {
        return Err(format!(
            "{} bytes: a QUIC-LB server ID has 1 to {}",
            bytes.len(),
            udpring::quic::cid::MAX_SERVER_ID
        ));
    }
    Ok(ServerId(bytes))
}

fn parse_positive_dur(s: &str) -> Result<Dur, String> {
    let d: Dur = s.parse()?;
    if d.0.is_zero() {
        return Err("must be above zero".into());
    }
    Ok(d)
}

/// The built-in handlers, by name on the command line (`--app`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum App {
    /// RFC 862 echo.
    Echo,
    /// RFC 863 discard.
    Discard,
    /// Replies to `sockperf ping-pong` / `under-load` clients.
    Sockperf,
    /// QUIC (quinn-proto): ALPN `h3` (HTTP/3 files under --root), `hq-interop` and `echo`,
    /// chosen by the client.
    Quic,
}

/// `--sessions`: the library's [`SessionMode`] by its command-line name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sessions {
    /// Stateless: every datagram stands alone.
    None,
    /// Peers demultiplexed in user space on the worker's socket; no descriptor per client.
    Shared,
    /// A socket per client bound to the listener's address and port, connected to the peer.
    Connected,
    /// A socket per client on a new kernel-chosen port; the first reply comes from it.
    PortPerClient,
}

impl From<SessionMode> for Sessions {
    fn from(mode: SessionMode) -> Sessions {
        match mode {
            SessionMode::None => Sessions::None,
            SessionMode::Shared => Sessions::Shared,
            SessionMode::Connected => Sessions::Connected,
            SessionMode::PortPerClient => Sessions::PortPerClient,
        }
    }
}

impl From<Sessions> for SessionMode {
    fn from(mode: Sessions) -> SessionMode {
        match mode {
            Sessions::None => SessionMode::None,
            Sessions::Shared => SessionMode::Shared,
            Sessions::Connected => SessionMode::Connected,
            Sessions::PortPerClient => SessionMode::PortPerClient,
        }
    }
}

/// `--xdp-mode`: where the XDP program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum XdpModeArg {
    /// Native where the driver has it, generic otherwise.
    Auto,
    /// In the driver only.
    Native,
    /// The generic hook (any interface).
    Generic,
}

impl From<XdpModeArg> for udpring::xdp::XdpMode {
    fn from(m: XdpModeArg) -> udpring::xdp::XdpMode {
        match m {
            XdpModeArg::Auto => udpring::xdp::XdpMode::Auto,
            XdpModeArg::Native => udpring::xdp::XdpMode::Native,
            XdpModeArg::Generic => udpring::xdp::XdpMode::Generic,
        }
    }
}

/// `--steer`: the library's [`Steer`] by its command-line name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SteerArg {
    /// The kernel's SO_REUSEPORT hash of the 4-tuple.
    None,
    /// The worker pinned to the CPU that received the packet (needs `--pin-cpus`).
    Cpu,
}

impl From<Steer> for SteerArg {
    fn from(steer: Steer) -> SteerArg {
        match steer {
            Steer::None => SteerArg::None,
            Steer::Cpu => SteerArg::Cpu,
        }
    }
}

impl From<SteerArg> for Steer {
    fn from(steer: SteerArg) -> Steer {
        match steer {
            SteerArg::None => Steer::None,
            SteerArg::Cpu => Steer::Cpu,
        }
    }
}

/// Parses durations written as `250ms`, `30s`, `5m`, `1h`, `1500us` or plain seconds (`2`,
/// `0.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration '{s}': expected e.g. 500ms, 30s, 5m"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "ns" => value / 1e9,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit '{other}' in '{s}': use ns, us, ms, s, m or h"
            ))
        }
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("duration '{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A duration as the command line writes it (`30s`, `500ms`, `20us`; `0` for off), so that
/// `--help` shows defaults in the form the option accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    /// Zero means the feature is off.
    fn or_off(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl From<Option<Duration>> for Dur {
    fn from(d: Option<Duration>) -> Dur {
        Dur(d.unwrap_or(Duration::ZERO))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let nanos = d.as_nanos();
        if nanos == 0 {
            write!(f, "0")
        } else if nanos % 1_000_000_000 == 0 {
            write!(f, "{}s", d.as_secs())
        } else if nanos % 1_000_000 == 0 {
            write!(f, "{}ms", d.as_millis())
        } else if nanos % 1_000 == 0 {
            write!(f, "{}us", d.as_micros())
        } else {
            write!(f, "{nanos}ns")
        }
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Dur, String> {
        parse_duration(s).map(Dur)
    }
}

/// An integer whose largest value means "no limit", written `none` on the command line (the
/// library spells "no limit" as the type's maximum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit<T>(pub T);

/// The integer types a [`Limit`] holds, with the value that means "no limit".
pub trait Unbounded: Copy + PartialEq + fmt::Display + FromStr {
    const NONE: Self;
}

impl Unbounded for usize {
    const NONE: usize = usize::MAX;
}

impl Unbounded for u32 {
    const NONE: u32 = u32::MAX;
}

impl<T: Unbounded> fmt::Display for Limit<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == T::NONE {
            write!(f, "none")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl<T: Unbounded> FromStr for Limit<T> {
    type Err = String;
    fn from_str(s: &str) -> Result<Limit<T>, String> {
        if s == "none" {
            return Ok(Limit(T::NONE));
        }
        s.parse()
            .map(Limit)
            .map_err(|_| format!("expected a whole number or `none`, got '{s}'"))
    }
}

#[cfg(test)]
mod tests;
