//! QUIC on the engine: one `quinn_proto::Endpoint` per worker, driven by a [`crate::Handler`].
//!
//! - Datagrams go into `Endpoint::handle` (GRO trains are taken whole and fed segment by
//!   segment); the connections they touch are marked and driven once per loop turn, through
//!   the handler timer with an instant already past (so a turn's datagrams make one round of
//!   transmits, not one per datagram).
//! - Transmits (`poll_transmit`, up to 43 datagrams of a GSO train in one send slot) leave
//!   through [`crate::Reply::send_to_with`] with their segment size, source address and ECN
//!   codepoint. quinn is asked for no more datagrams than can leave now
//!   ([`crate::Reply::train_room`]: a slot's worth with GSO, no more than the free slots
//!   without, where a train takes a slot per datagram). When the send pool is full the
//!   handler stops polling: quinn keeps what it has not yet packetised, nothing is dropped,
//!   and the handler asks to be called again as soon as a slot is free.
//! - Connection timers: a heap of the connections' `poll_timeout`s (stale entries skipped
//!   lazily); its first is the handler's `next_timer`, for which the worker keeps one
//!   timeout SQE. A turn costs O(log n) per due timer, not a scan of the connections.
//! - Connection IDs carry the worker's index (`route.rs`) and a reuseport program sends
//!   short-header packets to that worker, so migration and NAT rebinding keep reaching the
//!   owner with any number of workers.
//! - Address validation: with `validate_peers`, a new peer's Initial is answered with a
//!   Retry; only a peer that returns the token gets connection state. Without it the same
//!   happens above `retry_above_handshakes` handshakes in flight on the worker, and at
//!   `max_handshakes` new peers are refused.
//! - Fairness: dirty connections are driven round robin, at most 20 datagrams each before
//!   the next one's turn.
//! - Resumption and 0-RTT ([`sessions`]): one session cache for all workers, single-use
//!   tickets, early data unless [`QuicConfig::early_data`] is off; the cache passes to the
//!   next process over `--takeover`.
//!
//! - Applications: a service implements [`App`] (per-connection state of its own type,
//!   callbacks for admission, streams, datagrams, timers, messages from other threads) and
//!   runs with [`Quic::app_handler`]; the built-in echo and hq-interop ([`Builtin`]) are
//!   written on it. A [`Connection`] is lent to each callback; a [`Remote`] reaches a
//!   connection from any thread. `examples/quic_relay.rs` is a service to start from.
//!
//! Design notes and measurements: `kernel-notes/quic.md`.

mod api;
mod apps;
pub mod cid;
mod conn;
mod dispatch;
pub mod h3;
mod handler;
mod remote;
pub(crate) mod route;
pub mod sessions;
pub mod tls;
mod transport;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn_proto::crypto::rustls::QuicServerConfig;
use quinn_proto::EndpointConfig;

use crate::config::{ServerConfig, SessionMode};

pub use api::{Admission, App, CloseReason, Decision, Established, IncomingInfo, NewConnection};
pub use apps::{Builtin, BuiltinConn, ALPN_ECHO, ALPN_HQ};
pub use conn::{
    ConnId, ConnStats, Connection, DatagramError, Recv, StreamError, StreamId, Written,
};
pub use h3::ALPN_H3;
use handler::Limits;
pub use handler::QuicHandler;
pub use remote::{PostError, PostRefusal, Remote};
pub use sessions::SessionCache;
pub use tls::Identity;
pub use transport::{Congestion, TransportConfig, MAX_UDP_PAYLOAD, MIN_UDP_PAYLOAD};

/// The smallest UDP payload QUIC works with: a client's Initial is padded to at least this
/// (RFC 9000 section 14.1), so `--max-datagram` may not be below it.
pub const MIN_DATAGRAM: usize = 1200;

/// Bidirectional streams a peer may have open at once on a connection; more wait for
/// MAX_STREAMS, which quinn sends as streams close. The QUIC interop runner's `multiplexing`
/// case fails a server whose `initial_max_streams_bidi` is above 1000 (it requests 2000
/// files over one connection to see stream credit renewed): 1000 is the most it allows.
pub const MAX_CONCURRENT_BIDI_STREAMS: u32 = 1000;
/// Sessions a server keeps for resumption unless told otherwise ([`QuicConfig::session_cache`]).
pub const DEFAULT_SESSION_CACHE: usize = 65_536;
/// How long a session stays resumable unless told otherwise ([`QuicConfig::session_lifetime`]).
pub const DEFAULT_SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// The most bytes of sessions handed to the process that takes over (`--takeover`): the
/// newest sessions that fit (a full cache of typical sessions, about 150 bytes each, fits).
pub const MAX_SESSION_EXPORT: usize = 16 << 20;

/// The shortest stateless reset key accepted (HMAC-SHA256's own length).
pub const MIN_RESET_KEY: usize = 32;

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
    /// The application protocols offered, in the server's order of preference; empty: the
    /// built-in `echo` and `hq-interop` ([`Quic::handler`]). A user's [`App`] lists its own.
    pub alpn: Vec<Vec<u8>>,
    /// Stream limits, windows, keep-alive, congestion control, datagrams, initial RTT,
    /// UDP payload size.
    pub transport: TransportConfig,
    /// Above this many handshakes in flight on a worker, a new peer must return a Retry
    /// token before it gets connection state (as with `validate_peers`, for that peer only):
    /// a flood of Initials from spoofed sources then costs no more state than this. Counted
    /// in `retries_busy`.
    pub retry_above_handshakes: usize,
    /// At this many handshakes in flight on a worker, new peers are refused with
    /// CONNECTION_REFUSED, validated or not. Counted in `refused_busy`.
    pub max_handshakes: usize,
    /// Resumed clients may send 0-RTT (early) data (`--no-0rtt` turns it off; resumption
    /// stays).
    pub early_data: bool,
    /// Sessions kept for resumption, all workers together (0: no tickets, no resumption).
    pub session_cache: usize,
    /// How long a session stays resumable (the cache's rotation: an entry is gone after it).
    pub session_lifetime: Duration,
    /// Server connection IDs in QUIC-LB's plaintext format with this configuration
    /// (`--quic-server-id`, `--quic-lb-config-id`), so that a load balancer routes by the
    /// server ID; `None`: today's 8-byte IDs ([`cid`]).
    pub load_balancer: Option<cid::LbConfig>,
    /// The key stateless reset tokens are derived from (HMAC-SHA256; at least
    /// [`MIN_RESET_KEY`] bytes): shared by a fleet (`--stateless-reset-key FILE`), a host that
    /// receives a connection of another's resets it and its client learns at once. `None`: a
    /// random key per start.
    pub stateless_reset_key: Option<Vec<u8>>,
}

impl QuicConfig {
    /// Handshakes in flight per worker above which new peers get a Retry first.
    pub const DEFAULT_RETRY_ABOVE_HANDSHAKES: usize = 256;
    /// Handshakes in flight per worker at which new peers are refused.
    pub const DEFAULT_MAX_HANDSHAKES: usize = 4096;

    /// `identity` with the defaults: no root, no forced validation, a 30 s idle timeout,
    /// Retry above 256 handshakes in flight per worker and refusal at 4096, 0-RTT on,
    /// [`DEFAULT_SESSION_CACHE`] sessions for [`DEFAULT_SESSION_LIFETIME`], the built-in
    /// ALPNs, [`TransportConfig::default`].
    pub fn new(identity: Identity) -> QuicConfig {
        QuicConfig {
            identity,
            root: None,
            validate_peers: false,
            idle_timeout: Duration::from_secs(30),
            retry_above_handshakes: Self::DEFAULT_RETRY_ABOVE_HANDSHAKES,
            max_handshakes: Self::DEFAULT_MAX_HANDSHAKES,
            early_data: true,
            session_cache: DEFAULT_SESSION_CACHE,
            session_lifetime: DEFAULT_SESSION_LIFETIME,
            alpn: Vec::new(),
            transport: TransportConfig::default(),
            load_balancer: None,
            stateless_reset_key: None,
        }
    }
}

/// The QUIC service shared by all workers: the TLS and transport configuration, the keys
/// every worker's endpoint must agree on (stateless reset, Retry tokens), and the counters.
pub struct Quic {
    server_config: Arc<quinn_proto::ServerConfig>,
    /// The stateless reset key and the largest UDP payload; each worker adds its CID
    /// generator.
    endpoint_config: EndpointConfig,
    root: Option<Arc<std::path::Path>>,
    limits: Limits,
    sessions: Arc<SessionCache>,
    /// The layout of the server connection IDs.
    cid_format: cid::CidFormat,
    /// HTTP/3's blocking pool (file opens and reads), shared by the workers; its threads
    /// start with its first job.
    pool: Arc<h3::BlockingPool>,
    /// Each worker's handler counts in its own [`Counters`]; a read sums them.
    counters: Arc<std::sync::Mutex<Vec<Arc<Counters>>>>,
    /// The process generation the CIDs of handlers made from now on carry
    /// ([`Quic::set_generation`]).
    generation: std::sync::atomic::AtomicU8,
    /// Set by [`Quic::drain`]: every handler drops new peers' Initials from then on.
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl Quic {
    /// The service for `config`: TLS with its ALPN protocols (`echo` and `hq-interop` when
    /// none are given), the transport settings, the keys every worker's endpoint shares.
    /// Fails on an identity rustls refuses or a transport setting out of range.
    pub fn new(config: QuicConfig) -> io::Result<Quic> {
        if config.max_handshakes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the QUIC handshake cap (--quic-max-handshakes) must be at least 1",
            ));
        }
        let builtin: [&[u8]; 3] = [ALPN_H3, ALPN_HQ, ALPN_ECHO];
        let alpn: Vec<&[u8]> = if config.alpn.is_empty() {
            builtin.to_vec()
        } else {
            config.alpn.iter().map(Vec::as_slice).collect()
        };
        let mut tls = tls::server_config(&config.identity, &alpn)?;
        // One cache for every worker: a ticket resumes on whichever worker the kernel picks.
        let sessions = Arc::new(SessionCache::new(
            config.session_cache,
            config.session_lifetime,
        ));
        tls::enable_resumption(&mut tls, sessions.clone(), config.early_data);
        let crypto = QuicServerConfig::try_from(tls).map_err(io::Error::other)?;
        let mut server_config = quinn_proto::ServerConfig::with_crypto(Arc::new(crypto));
        let transport = config.transport.build(config.idle_timeout)?;
        server_config.transport_config(Arc::new(transport));
        let reset_key = match &config.stateless_reset_key {
            Some(key) if key.len() < MIN_RESET_KEY => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "the stateless reset key has {} bytes: at least {MIN_RESET_KEY}",
                        key.len()
                    ),
                ))
            }
            Some(key) => ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            None => {
                let rng = ring::rand::SystemRandom::new();
                ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
                    .map_err(|_| io::Error::other("cannot generate the stateless reset key"))?
            }
        };
        let mut endpoint_config = EndpointConfig::new(Arc::new(reset_key));
        endpoint_config
            .max_udp_payload_size(config.transport.max_udp_payload)
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the QUIC max_udp_payload is out of range",
                )
            })?;
        let root = match config.root {
            Some(root) => Some(Arc::from(root.canonicalize().map_err(|e| {
                io::Error::new(e.kind(), format!("--root {}: {e}", root.display()))
            })?)),
            None => None,
        };
        Ok(Quic {
            server_config: Arc::new(server_config),
            endpoint_config,
            root,
            limits: Limits {
                validate_peers: config.validate_peers,
                retry_above: config.retry_above_handshakes,
                max_handshakes: config.max_handshakes,
            },
            sessions,
            cid_format: config
                .load_balancer
                .map(cid::CidFormat::load_balanced)
                .unwrap_or_default(),
            pool: Arc::default(),
            counters: Arc::default(),
            generation: Default::default(),
            draining: Arc::default(),
        })
    }

    /// The process generation this server's CIDs carry (0 to 15; `--takeover` takes the one
    /// after the old process's, so the reuseport program tells their connections apart). Set
    /// it before the workers' handlers are made.
    pub fn set_generation(&self, generation: u8) {
        self.generation.store(
            generation % crate::reuseport::GENERATIONS,
            Ordering::Relaxed,
        );
    }

    /// Stops accepting new connections on every worker (after a takeover that left this
    /// process its connections): a new peer's Initial is dropped, counted in
    /// `refused_draining`, and its retransmission reaches the process that took over. The
    /// connections open go on until they close ([`QuicStats::open`]).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// A handle that drains this server from another thread ([`Quic::drain`]).
    pub fn drainer(&self) -> impl Fn() + Send + Sync + 'static {
        let draining = self.draining.clone();
        move || draining.store(true, Ordering::Release)
    }

    /// Sets the engine options the QUIC handler relies on: stateless dispatch (quinn keeps
    /// the per-connection state), ECN reports, no engine anti-amplification budget (quinn
    /// enforces RFC 9000's own), connection-ID routing between workers, no engine cookie
    /// gate (validation is QUIC's Retry), and don't-fragment on every datagram (the handler
    /// runs quinn's path MTU discovery, whose probes must not pass fragmented), with the
    /// routing program reading the worker where this server's CIDs carry it. Fails for
    /// more workers than a CID byte can name, and for a `max_datagram` below
    /// [`MIN_DATAGRAM`].
    pub fn configure(&self, config: &mut ServerConfig) -> io::Result<()> {
        Quic::check_engine(config)?;
        config.ecn = true;
        config.amplification_factor = 0;
        config.validate_peers = false;
        config.cid_routing = true;
        config.cid_worker_offset = self.cid_format.worker_offset() as u8;
        config.cid_len = self.cid_format.len() as u8;
        config.dont_fragment = true;
        Ok(())
    }

    /// What [`Quic::configure`] refuses, checked without a `Quic` (before a certificate is
    /// made): a `max_datagram` below [`MIN_DATAGRAM`], more than 256 workers, sessions.
    pub fn check_engine(config: &ServerConfig) -> io::Result<()> {
        if config.max_datagram < MIN_DATAGRAM {
            // Every Initial is at least 1200 bytes (RFC 9000 section 14.1): below that the
            // worker would count each one as truncated and drop it, and nobody could connect.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "--app quic needs --max-datagram of at least {MIN_DATAGRAM} bytes \
                     (QUIC's smallest Initial, RFC 9000 section 14.1), not {}",
                    config.max_datagram
                ),
            ));
        }
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
        Ok(())
    }

    /// Worker `worker`'s handler running the built-in echo and hq-interop (call it from the
    /// server's factory). It counts in counters of its own, which [`Quic::stats`] adds to
    /// the others'.
    pub fn handler(&self, worker: usize) -> QuicHandler<Builtin> {
        let counters = self.worker_counters();
        let app = Builtin::new(self.root.clone(), counters.clone(), self.pool.clone());
        self.handler_with(worker, app, counters)
    }

    /// Worker `worker`'s handler running `app` (call it from the server's factory, with one
    /// `app` per worker). The ALPN protocols `app` serves are [`QuicConfig::alpn`].
    pub fn app_handler<A: App>(&self, worker: usize, app: A) -> QuicHandler<A> {
        let counters = self.worker_counters();
        self.handler_with(worker, app, counters)
    }

    /// Worker `worker`'s handler serving HTTP/3 with `service` (one per worker, like
    /// [`Quic::app_handler`]'s app); its blocking work and body pieces run on this server's
    /// blocking pool. Give [`QuicConfig::alpn`] as `[ALPN_H3]`: a connection of another ALPN
    /// is refused.
    pub fn h3_handler<S: h3::Service>(
        &self,
        worker: usize,
        service: S,
    ) -> QuicHandler<h3::H3App<S>> {
        let counters = self.worker_counters();
        let app = h3::H3App::new(service, self.pool.clone(), counters.clone());
        self.handler_with(worker, app, counters)
    }

    /// A new handler's own counters, registered for [`Quic::stats`].
    fn worker_counters(&self) -> Arc<Counters> {
        let counters = Arc::new(Counters::default());
        lock(&self.counters).push(counters.clone());
        counters
    }

    fn handler_with<A: App>(
        &self,
        worker: usize,
        app: A,
        counters: Arc<Counters>,
    ) -> QuicHandler<A> {
        QuicHandler::new(
            worker as u8,
            app,
            self.server_config.clone(),
            &self.endpoint_config,
            self.cid_format
                .clone()
                .with_generation(self.generation.load(Ordering::Relaxed)),
            self.limits,
            counters,
            self.draining.clone(),
        )
    }

    /// The session cache every worker resumes from (for `--takeover`: export it in the old
    /// process, import it in the new one before it serves).
    pub fn sessions(&self) -> &Arc<SessionCache> {
        &self.sessions
    }

    /// The counters of all workers' handlers so far, summed.
    pub fn stats(&self) -> QuicStats {
        sum(&lock(&self.counters))
    }

    /// Each handler's counters, in the order the handlers were made (worker order when the
    /// server's factory makes one per worker).
    pub fn worker_stats(&self) -> Vec<QuicStats> {
        lock(&self.counters).iter().map(|c| c.snapshot()).collect()
    }

    /// A reader of the counters that outlives `self` (for the factory closure's owner).
    pub fn stats_source(&self) -> impl Fn() -> QuicStats + Send + Sync + 'static {
        let counters = self.counters.clone();
        move || sum(&lock(&counters))
    }
}

/// The registry of the handlers' counters; a handler that panicked while it held the lock
/// (it never does: the lock is taken only to push or read) leaves a list still whole.
fn lock(
    counters: &std::sync::Mutex<Vec<Arc<Counters>>>,
) -> std::sync::MutexGuard<'_, Vec<Arc<Counters>>> {
    counters
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sum(counters: &[Arc<Counters>]) -> QuicStats {
    let mut total = QuicStats::default();
    for c in counters {
        total.add(&c.snapshot());
    }
    total
}

macro_rules! quic_counters {
    ($( $(#[doc = $doc:expr])* $name:ident, )*) => {
        /// What the QUIC handlers counted: all workers together ([`Quic::stats`]) or one
        /// ([`Quic::worker_stats`]).
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct QuicStats {
            $( $(#[doc = $doc])* pub $name: u64, )*
        }

        /// One worker's [`QuicStats`]: written by that worker's handler alone, read by any
        /// thread (a sum over the workers). Atomics only so that a reader sees whole
        /// values; no two threads ever write one, so an update is a plain load and store,
        /// not a locked read-modify-write, and no cache line is shared between workers.
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub(crate) struct Counters {
            $( $name: AtomicU64, )*
        }

        impl Counters {
            fn snapshot(&self) -> QuicStats {
                QuicStats { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }

        impl QuicStats {
            /// Adds `other`'s counts to these.
            pub fn add(&mut self, other: &QuicStats) {
                $( self.$name += other.$name; )*
            }

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
    /// Retries sent because the handshakes in flight were above
    /// `retry_above_handshakes` (without `validate_peers`; also counted in `retries`).
    retries_busy,
    /// Initials refused because the handshakes in flight were at `max_handshakes` (also
    /// counted in `refused`).
    refused_busy,
    /// New peers' Initials dropped because this process drains after a takeover (the
    /// retransmission reaches the process that took over).
    refused_draining,
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
    /// HTTP/3 requests read whole (their HEADERS decoded and valid).
    h3_requests,
    /// HTTP/3 responses sent to their end (finished).
    h3_responses,
    /// HTTP/3 errors: malformed requests (stream errors), protocol violations (connection
    /// errors), a body cut short by a read error, a service's blocking work that panicked.
    h3_errors,
    /// HTTP/3 requests answered 503, or bodies reset, because the blocking pool's queue was
    /// full.
    h3_busy,
    /// HTTP/3 requests of an unsafe method in 0-RTT early data, answered 425 (Too Early).
    h3_too_early,
    /// Connections closed with CONNECTION_CLOSE because the server shut down.
    closed_at_shutdown,
    /// Connections established by resuming a session (a ticket from the shared cache).
    resumed,
    /// Resumed connections whose 0-RTT data was accepted.
    early_data_accepted,
    /// Bidirectional streams opened by early data (before the handshake completed).
    early_streams,
}

impl QuicStats {
    /// Connections held now: accepted and not yet drained.
    pub fn open(&self) -> u64 {
        self.accepted.saturating_sub(self.drained)
    }
}

impl Counters {
    /// Counts one. Only the owning worker calls it (its handler and that handler's app, see
    /// [`Counters`]), so a load and a store cannot lose another writer's update.
    pub(crate) fn add(&self, field: impl Fn(&Counters) -> &AtomicU64) {
        let counter = field(self);
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}
