//! QUIC on the engine: one `quinn_proto::Endpoint` per worker, driven by a [`crate::Handler`].
//!
//! - Datagrams go into `Endpoint::handle` (GRO trains are taken whole and fed segment by
//!   segment); the connections they touch are marked and driven once per loop turn, through
//!   the handler timer with an instant already past (so a turn's datagrams make one round of
//!   transmits, not one per datagram).
//! - Transmits (`poll_transmit`, up to 43 datagrams of a GSO train in one send slot) leave
//!   through [`crate::Reply::send_to_with`] with their segment size, source address and ECN
//!   codepoint. When the send pool is full the handler stops polling: quinn keeps what it
//!   has not yet packetised, nothing is dropped, and the handler asks to be called again as
//!   soon as a slot is free.
//! - Connection timers: the earliest of the connections' `poll_timeout` is the handler's
//!   `next_timer`; the worker keeps one timeout SQE for it.
//! - Connection IDs carry the worker's index ([`route`]) and a reuseport program sends
//!   short-header packets to that worker, so migration and NAT rebinding keep reaching the
//!   owner with any number of workers.
//! - Address validation: with `validate_peers`, a new peer's Initial is answered with a
//!   Retry; only a peer that returns the token gets connection state.
//!
//! Design notes and measurements: `kernel-notes/quic.md`.

mod app;
mod handler;
pub mod route;
pub mod tls;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn_proto::crypto::rustls::QuicServerConfig;
use quinn_proto::{IdleTimeout, TransportConfig, VarInt};

use crate::config::{ServerConfig, SessionMode};

pub use app::{ALPN_ECHO, ALPN_HQ};
pub use handler::QuicHandler;
pub use tls::Identity;

/// What the QUIC service needs.
#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// The certificate chain and key presented to clients.
    pub identity: Identity,
    /// Files served over `hq-interop`; `None` answers every request with 404.
    pub root: Option<PathBuf>,
    /// New peers must return a Retry token before any connection state exists for them.
    pub validate_peers: bool,
    /// A connection with no packet for this long is closed (QUIC's max_idle_timeout).
    pub idle_timeout: Duration,
}

/// The QUIC service shared by all workers: the TLS and transport configuration, the keys
/// every worker's endpoint must agree on (stateless reset, Retry tokens), and the counters.
pub struct Quic {
    server_config: Arc<quinn_proto::ServerConfig>,
    reset_key: Arc<ring::hmac::Key>,
    root: Option<Arc<std::path::Path>>,
    validate_peers: bool,
    counters: Arc<Counters>,
}

impl Quic {
    pub fn new(config: QuicConfig) -> io::Result<Quic> {
        let tls = tls::server_config(&config.identity, &[ALPN_ECHO, ALPN_HQ])?;
        let crypto = QuicServerConfig::try_from(tls).map_err(io::Error::other)?;
        let mut server_config = quinn_proto::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = TransportConfig::default();
        let idle = IdleTimeout::try_from(config.idle_timeout).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the QUIC idle timeout must be below 2^62 ms",
            )
        })?;
        transport
            .max_idle_timeout(Some(idle))
            .max_concurrent_bidi_streams(VarInt::from_u32(1024))
            .max_concurrent_uni_streams(VarInt::from_u32(0));
        server_config.transport_config(Arc::new(transport));
        let rng = ring::rand::SystemRandom::new();
        let reset_key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .map_err(|_| io::Error::other("cannot generate the stateless reset key"))?;
        let root = match config.root {
            Some(root) => Some(Arc::from(root.canonicalize().map_err(|e| {
                io::Error::new(e.kind(), format!("--root {}: {e}", root.display()))
            })?)),
            None => None,
        };
        Ok(Quic {
            server_config: Arc::new(server_config),
            reset_key: Arc::new(reset_key),
            root,
            validate_peers: config.validate_peers,
            counters: Arc::new(Counters::default()),
        })
    }

    /// Sets the engine options the QUIC handler relies on: stateless dispatch (quinn keeps
    /// the per-connection state), ECN reports, no engine anti-amplification budget (quinn
    /// enforces RFC 9000's own), connection-ID routing between workers, no engine cookie
    /// gate (validation is QUIC's Retry), and don't-fragment on every datagram (the handler
    /// runs quinn's path MTU discovery, whose probes must not pass fragmented). Fails for
    /// more workers than a CID byte can name.
    pub fn configure(config: &mut ServerConfig) -> io::Result<()> {
        if config.workers > 256 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "--app quic serves at most 256 workers (a connection ID names its worker in one byte)",
            ));
        }
        if config.sessions != SessionMode::None {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "--app quic needs --sessions none: connections are QUIC's own state",
            ));
        }
        config.ecn = true;
        config.amplification_factor = 0;
        config.validate_peers = false;
        config.cid_routing = true;
        config.dont_fragment = true;
        Ok(())
    }

    /// Worker `worker`'s handler (call it from the server's factory).
    pub fn handler(&self, worker: usize) -> QuicHandler {
        QuicHandler::new(
            worker as u8,
            self.server_config.clone(),
            self.reset_key.clone(),
            self.root.clone(),
            self.validate_peers,
            self.counters.clone(),
        )
    }

    /// The counters of all workers' handlers so far.
    pub fn stats(&self) -> QuicStats {
        self.counters.snapshot()
    }

    /// A reader of the counters that outlives `self` (for the factory closure's owner).
    pub fn stats_source(&self) -> impl Fn() -> QuicStats + Send + Sync + 'static {
        let counters = self.counters.clone();
        move || counters.snapshot()
    }
}

macro_rules! quic_counters {
    ($( $(#[doc = $doc:expr])* $name:ident, )*) => {
        /// What the QUIC handlers counted, all workers together.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct QuicStats {
            $( $(#[doc = $doc])* pub $name: u64, )*
        }

        /// The shared, atomically updated form of [`QuicStats`] (updated on connection
        /// events, never per packet).
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $( $name: AtomicU64, )*
        }

        impl Counters {
            fn snapshot(&self) -> QuicStats {
                QuicStats { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }

        impl QuicStats {
            /// `name=value` for every counter, for logs.
            pub fn summary(&self) -> String {
                [$( format!("{}={}", stringify!($name), self.$name), )*].join(" ")
            }
        }
    };
}

quic_counters! {
    /// Connections accepted (handshake started).
    accepted,
    /// Connections whose state was freed (closed, timed out or failed, then drained).
    drained,
    /// Initials answered with a Retry (`validate_peers`): no state kept.
    retries,
    /// Initials refused (a bad token, too many connections) or not accepted.
    refused,
    /// Stateless resets sent (a short-header packet for a connection this worker does not
    /// have: routing failed, or the connection is long gone).
    stateless_resets,
    /// Short-header packets whose connection ID names another worker and that found no
    /// connection here (answered with a stateless reset, or dropped).
    misrouted,
    /// Datagrams the endpoint dropped without any answer (garbage, unsupported versions that
    /// get no Version Negotiation, packets of drained connections).
    ignored,
    /// Times the send pool was full with transmits still to poll (resumed on a free slot).
    blocked,
    /// Bidirectional streams accepted.
    streams,
    /// hq-interop requests answered with a file.
    hq_files,
    /// hq-interop requests for a missing file (404).
    hq_missing,
    /// hq-interop requests refused: malformed, or a path outside the root.
    hq_refused,
    /// Connections closed with CONNECTION_CLOSE because the server shut down.
    closed_at_shutdown,
}

impl Counters {
    fn add(&self, field: impl Fn(&Counters) -> &AtomicU64) {
        field(self).fetch_add(1, Ordering::Relaxed);
    }
}
