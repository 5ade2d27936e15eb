//! Server options, their defaults and their validation: [`ServerConfig`] (also at the crate
//! root) and the choices it names.

use std::net::SocketAddr;
use std::time::Duration;

/// How peers are tracked (`--sessions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionMode {
    /// Stateless: every datagram stands alone.
    None,
    /// Peers demultiplexed in user space on the worker's socket; no descriptor per client.
    Shared,
    /// The seed article's Linux model: a socket per client bound to the listener's address and
    /// port and connected to the peer.
    Connected,
    /// The seed article's IOCP model: a socket per client on a new kernel-chosen port; the
    /// first reply comes from it and the client continues there.
    PortPerClient,
}

/// Which worker a datagram from a new peer goes to (`--steer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    /// The kernel's SO_REUSEPORT hash of the 4-tuple.
    None,
    /// The worker pinned to the CPU that received the packet (a reuseport program; needs
    /// `pin_cpus` and one worker per allowed CPU).
    Cpu,
}

/// Everything a server needs to start. `Default` gives what `udpring serve` uses with no flags.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address every worker binds (with SO_REUSEPORT). Port 0 picks one port for all workers.
    pub bind: SocketAddr,
    /// Worker threads, each with its own socket and ring.
    pub workers: usize,
    /// Pin worker `i` to the `i`-th CPU this process may use.
    pub pin_cpus: bool,
    /// Largest datagram received whole; larger ones are counted as truncated and dropped.
    pub max_datagram: usize,
    /// Provided receive buffers per worker (a power of two, at most 32768).
    pub buffers: u16,
    /// Reply slots per worker: replies in flight before the worker applies backpressure.
    pub send_slots: usize,
    /// SO_RCVBUF to ask for, in bytes.
    pub recv_buffer_bytes: usize,
    /// SO_SNDBUF to ask for, in bytes.
    pub send_buffer_bytes: usize,
    /// Send a turn's replies to one peer as UDP GSO trains (`UDP_SEGMENT`, Linux 4.18).
    pub gso: bool,
    /// Enable `UDP_GRO` (Linux 5.0) on the workers' sockets: the kernel merges same-size
    /// datagrams of one flow into one receive, which the worker splits again (handlers see
    /// one datagram each unless they take whole trains). Receive buffers then hold 64 KiB.
    pub gro: bool,
    /// Ask the kernel for each datagram's ECN codepoint (`IP_RECVTOS`, `IPV6_RECVTCLASS`):
    /// [`crate::Datagram::ecn`]. Off by default: one more control message per receive.
    pub ecn: bool,
    /// Route QUIC short-header packets to the worker their destination connection ID names
    /// (a reuseport BPF program, `crate::quic::route`); everything else by the kernel's hash.
    pub cid_routing: bool,
    /// With `cid_routing`: where the worker's index sits in the destination connection ID
    /// (0; past the first octet and the server ID with a QUIC-LB configuration). Set by
    /// `Quic::configure`.
    pub cid_worker_offset: u8,
    /// With `cid_routing`: the length of every server connection ID (the routing program
    /// checks a Handshake packet's destination CID against it). Set by `Quic::configure`.
    pub cid_len: u8,
    /// With `cid_routing`: route with the `SK_REUSEPORT` eBPF program and the socket map
    /// shared across `--takeover` (`crate::reuseport`), so that a successor's workers get the
    /// new connections while this process's connections stay here. Where the kernel refuses
    /// it (no CAP_BPF, Linux before 4.19) one line says so and classic BPF routes by worker
    /// alone. On by default.
    pub generation_routing: bool,
    /// With `generation_routing`: this process's generation, which its CIDs carry (0 to 15).
    /// Set from the takeover ([`crate::ops::takeover::Handover::generation`]).
    pub generation: u8,
    /// With `generation_routing`: the socket map of the process taken over from, which this
    /// one joins (its sockets beside the old process's, in the same reuseport group; the
    /// instance guard then does not apply). `None`: a map of its own.
    pub routing_map: Option<crate::reuseport::RoutingMap>,
    /// Send every datagram with don't-fragment set, ignoring the kernel's path MTU estimate
    /// (`IP_PMTUDISC_PROBE`): for stacks that discover the path MTU themselves (QUIC).
    pub dont_fragment: bool,
    /// When set, each wait asks the kernel for `batch_size` completions and lets it hold the
    /// worker asleep up to this long to gather them (DEFER_TASKRUN then wakes the worker
    /// once per batch instead of once per datagram). Trades latency for CPU; off by default.
    pub batch_wait: Option<Duration>,
    /// Completions to wait for when `batch_wait` is set.
    pub batch_size: usize,
    /// After a busy turn, poll for completions without sleeping for up to this long before
    /// blocking. Off by default: it keeps a core busy.
    pub busy_poll: Option<Duration>,
    /// How peers are tracked.
    pub sessions: SessionMode,
    /// A session with no datagram for this long is closed (and its socket).
    pub idle_timeout: Duration,
    /// Sessions in all workers together; new peers beyond it are refused (counted).
    pub max_sessions: usize,
    /// Sessions per worker.
    pub max_sessions_per_worker: usize,
    /// New sessions per second per worker.
    pub max_new_sessions_per_sec: u32,
    /// Sessions per source IP address.
    pub max_sessions_per_source: u32,
    /// Connected per-client sockets on the port, all workers together; beyond it new peers are
    /// served in `shared` fashion (counted in `connected_cap`).
    pub max_connected: usize,
    /// Require a cookie (stateless address validation) before a new peer gets a session.
    pub validate_peers: bool,
    /// How often the cookie key changes; cookies live at most twice this long.
    pub cookie_rotation: Duration,
    /// Until a peer is validated, reply bytes are at most this many times the bytes received
    /// from it (RFC 9000 section 8 uses 3). 0 turns the limit off.
    pub amplification_factor: u32,
    /// How long shutdown may take to flush replies and drain in-flight operations.
    pub shutdown_timeout: Duration,
    /// Refuse to start when another socket already serves `bind` (a second SO_REUSEPORT
    /// bind would silently join its group and take a share of its traffic). Turn it off
    /// only to run several processes in one group on purpose.
    pub exclusive: bool,
    /// How datagrams are spread over the workers.
    pub steer: Steer,
    /// Also serve through AF_XDP sockets on an interface's queues (`--xdp IFACE`,
    /// [`crate::xdp`]), beside the ring workers. `None` by default.
    pub xdp: Option<crate::xdp::XdpConfig>,
}

/// Largest UDP payload over IPv4 (65,535 - 20 IP header - 8 UDP header).
pub const MAX_UDP4_PAYLOAD: usize = 65_507;
/// Largest UDP payload over IPv6 without jumbograms (65,535 - 8 UDP header).
pub const MAX_UDP6_PAYLOAD: usize = 65_527;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 9000)),
            workers: default_workers(),
            pin_cpus: false,
            max_datagram: MAX_UDP4_PAYLOAD,
            buffers: 1024,
            send_slots: 1024,
            recv_buffer_bytes: 4 << 20,
            send_buffer_bytes: 4 << 20,
            gso: true,
            gro: true,
            ecn: false,
            cid_routing: false,
            cid_worker_offset: 0,
            cid_len: 8,
            generation_routing: true,
            generation: 0,
            routing_map: None,
            dont_fragment: false,
            batch_wait: None,
            batch_size: 32,
            busy_poll: None,
            sessions: SessionMode::None,
            idle_timeout: Duration::from_secs(30),
            max_sessions: 100_000,
            max_sessions_per_worker: usize::MAX,
            max_new_sessions_per_sec: u32::MAX,
            max_sessions_per_source: u32::MAX,
            max_connected: 1024,
            validate_peers: false,
            cookie_rotation: Duration::from_secs(30),
            amplification_factor: 3,
            shutdown_timeout: Duration::from_millis(900),
            exclusive: true,
            steer: Steer::None,
            xdp: None,
        }
    }
}

/// One worker per CPU this process may run on.
pub(crate) fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl ServerConfig {
    /// Checks the options against each other and the kernel's limits; the error is one line
    /// naming the option and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        if self.workers == 0 || self.workers > 1024 {
            return Err(format!("--workers must be 1..=1024, got {}", self.workers));
        }
        if self.max_datagram == 0 || self.max_datagram > MAX_UDP6_PAYLOAD {
            return Err(format!(
                "--max-datagram must be 1..={MAX_UDP6_PAYLOAD} bytes, got {}",
                self.max_datagram
            ));
        }
        if !self.buffers.is_power_of_two() || self.buffers > 32768 {
            return Err(format!(
                "--buffers must be a power of two from 1 to 32768 (the kernel's buffer-ring limit), got {}",
                self.buffers
            ));
        }
        if self.send_slots == 0 || self.send_slots > 65_536 {
            return Err(format!(
                "--send-slots must be 1..=65536, got {}",
                self.send_slots
            ));
        }
        if self.validate_peers && self.sessions == SessionMode::None {
            return Err(
                "--validate-peers needs --sessions shared|connected|port-per-client: it gates the creation of per-peer state".to_string(),
            );
        }
        if self.cookie_rotation < Duration::from_secs(1) {
            return Err("--cookie-rotation must be at least 1s".to_string());
        }
        if let Some(x) = &self.xdp {
            if matches!(
                self.sessions,
                SessionMode::Connected | SessionMode::PortPerClient
            ) {
                let mode = if self.sessions == SessionMode::Connected {
                    "connected"
                } else {
                    "port-per-client"
                };
                return Err(format!(
                    "--xdp cannot serve --sessions {mode}: its sessions need sockets of their own, which AF_XDP frames never reach (use --sessions none, or drop --xdp)"
                ));
            }
            if self.sessions != SessionMode::None {
                return Err("--xdp serves --sessions none only: the AF_XDP workers keep no per-peer state (sessions, limits, cookies); use the ring path for shared sessions".to_string());
            }
            if self.cid_routing {
                return Err("--xdp does not serve QUIC (--app quic): its connection-ID routing is a reuseport program, which AF_XDP frames bypass".to_string());
            }
            if !x.ring.is_power_of_two() || !(64..=16384).contains(&x.ring) {
                return Err(format!(
                    "--xdp-ring must be a power of two from 64 to 16384, got {}",
                    x.ring
                ));
            }
        }
        if let Some(p) = self.busy_poll {
            if p > Duration::from_millis(10) {
                return Err(format!("--busy-poll must be at most 10ms, got {p:?}"));
            }
        }
        if self.steer == Steer::Cpu && !self.pin_cpus {
            return Err(
                "--steer cpu needs --pin-cpus (and one worker per allowed CPU)".to_string(),
            );
        }
        if self.idle_timeout < Duration::from_millis(1) {
            return Err("--idle-timeout must be at least 1ms".to_string());
        }
        if self.batch_wait.is_some()
            && (self.batch_size == 0 || self.batch_size > usize::from(self.buffers))
        {
            return Err(format!(
                "--batch-size must be 1..=--buffers ({}), got {}",
                self.buffers, self.batch_size
            ));
        }
        if let Some(w) = self.batch_wait {
            if w > Duration::from_millis(100) {
                return Err(format!(
                    "--batch-wait must be at most 100ms (it delays replies), got {w:?}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_do_not() {
        assert!(ServerConfig::default().validate().is_ok());
        let bad = [
            ServerConfig {
                workers: 0,
                ..Default::default()
            },
            ServerConfig {
                max_datagram: 0,
                ..Default::default()
            },
            ServerConfig {
                max_datagram: 70_000,
                ..Default::default()
            },
            ServerConfig {
                buffers: 1000,
                ..Default::default()
            },
            ServerConfig {
                send_slots: 0,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
