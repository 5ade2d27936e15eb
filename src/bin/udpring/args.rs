//! The command line's arguments. Every `serve` option that sets a [`ServerConfig`] field
//! takes its default from [`ServerConfig::default`], so `--help`, the option left out and a
//! library user's `ServerConfig::default()` all mean the same server.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use clap::{Parser, Subcommand};
use udpring::{App, ServerConfig, SessionMode, Steer};

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
    Serve(ServeArgs),
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
    #[arg(long, value_enum, default_value_t = defaults().sessions)]
    sessions: SessionMode,
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
    /// Without a running udpring on the address, start as usual.
    #[arg(long)]
    pub takeover: bool,
    /// How datagrams of new peers are spread over the workers: `none` (the kernel's
    /// SO_REUSEPORT hash) or `cpu` (the worker pinned to the CPU that received the packet;
    /// needs --pin-cpus and one worker per allowed CPU).
    #[arg(long, value_enum, default_value_t = defaults().steer)]
    steer: Steer,
    /// --app quic: the certificate chain to present (PEM). Without it a self-signed
    /// certificate for `localhost` and the listen address is made at start, written to a
    /// file whose path is printed, and its SHA-256 fingerprint logged.
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// --app quic: the private key of --cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    /// --app quic: the directory whose files ALPN `hq-interop` serves (`GET /path`); no file
    /// outside it is ever served. Without it every request gets a 404 text.
    #[arg(long, value_name = "DIR")]
    pub root: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics (text format 0.0.4) at http://ADDR:PORT/metrics. Bind it to
    /// loopback or a trusted interface.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
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
            sessions: self.sessions,
            idle_timeout: self.idle_timeout.0,
            max_sessions: self.max_sessions,
            max_sessions_per_worker: self.max_sessions_per_worker.0,
            max_new_sessions_per_sec: self.max_new_sessions_per_sec.0,
            max_sessions_per_source: self.max_sessions_per_source.0,
            max_connected: self.max_connected,
            validate_peers: d.validate_peers || self.validate_peers,
            cookie_rotation: self.cookie_rotation.0,
            amplification_factor: self.amplification_factor,
            steer: self.steer,
            // Options without a flag keep the library's value.
            ..d.clone()
        }
    }

    /// How often to log the counters; `None` only at exit.
    pub fn stats_interval(&self) -> Option<Duration> {
        self.stats_interval.or_off()
    }
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
        udpring::parse_duration(s).map(Dur)
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
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn serve(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(["udpring", "serve"].iter().chain(args))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.command {
            Command::Serve(s) => s,
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn no_options_is_the_library_default() {
        let args = serve(&[]);
        let (got, want) = (args.config(), ServerConfig::default());
        // ServerConfig has no PartialEq (a library type need not promise one); its Debug
        // lists every field.
        assert_eq!(format!("{got:?}"), format!("{want:?}"));
        assert_eq!(
            args.stats_interval(),
            None,
            "the stats line is off by default"
        );
    }

    #[test]
    fn options_reach_the_config() {
        let c = serve(&[
            "--workers=3",
            "--batch-wait=20us",
            "--idle-timeout=1500ms",
            "--max-sessions-per-worker=10",
            "--max-new-sessions-per-sec=none",
            "--no-gso",
            "--stats-interval=2s",
        ]);
        assert_eq!(c.stats_interval(), Some(Duration::from_secs(2)));
        let c = c.config();
        assert_eq!(c.workers, 3);
        assert_eq!(c.batch_wait, Some(Duration::from_micros(20)));
        assert_eq!(c.idle_timeout, Duration::from_millis(1500));
        assert_eq!(c.max_sessions_per_worker, 10);
        assert_eq!(c.max_new_sessions_per_sec, u32::MAX);
        assert!(!c.gso);
        assert!(serve(&["--busy-poll=0"]).config().busy_poll.is_none());
    }

    #[test]
    fn durations_and_limits_print_as_they_parse() {
        for d in [
            Duration::ZERO,
            Duration::from_secs(30),
            Duration::from_millis(900),
            Duration::from_micros(20),
            Duration::from_nanos(1500),
        ] {
            assert_eq!(Dur(d).to_string().parse::<Dur>(), Ok(Dur(d)), "{d:?}");
        }
        assert_eq!(Dur(Duration::from_secs(30)).to_string(), "30s");
        assert_eq!(Limit(u32::MAX).to_string(), "none");
        assert_eq!("none".parse::<Limit<usize>>(), Ok(Limit(usize::MAX)));
        assert_eq!("7".parse::<Limit<u32>>(), Ok(Limit(7)));
        assert!("seven".parse::<Limit<u32>>().is_err());
    }

    #[test]
    fn help_shows_the_defaults() {
        Cli::command().debug_assert();
        let mut cmd = Cli::command();
        let serve = cmd.find_subcommand_mut("serve").expect("serve subcommand");
        let help = serve.render_long_help().to_string();
        let d = ServerConfig::default();
        for expected in [
            format!("[default: {}]", d.bind),
            format!("[default: {}]", d.buffers),
            format!("[default: {}]", Dur(d.idle_timeout)),
            "[default: none]".to_string(),
            "[default: 0]".to_string(),
        ] {
            assert!(help.contains(&expected), "{expected} missing:\n{help}");
        }
    }
}
