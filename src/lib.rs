//! # udpring
//!
//! High-throughput UDP services on Linux, built on io_uring.
//!
//! Architecture: one worker thread per CPU. Each worker owns a UDP socket bound with
//! SO_REUSEPORT to the shared address (the kernel spreads peers over the workers), its own
//! io_uring, a ring of provided receive buffers and a fixed pool of reply slots. A single
//! multishot `RECVMSG` keeps receiving into the provided buffers; each datagram is handed to
//! the user's [`Handler`] borrowed from its buffer; replies are `SENDMSG`s submitted in one
//! batch per loop turn. Completions are dispatched on a typed `user_data` (the IOCP operation
//! table of the seed article, made safe by generations). Nothing on the datagram path
//! allocates or locks.
//!
//! Minimum kernel: Linux 6.0 (multishot recvmsg); 6.1+ for DEFER_TASKRUN; 6.13+ for
//! `Connected` sessions at scale (UDP 4-tuple hash).
//!
//! ## The API
//!
//! At the root, what every server uses: [`Server`] started from a [`ServerConfig`] and a
//! factory of handlers, one per worker; a stateless [`Handler`] or a [`SessionHandler`] with
//! per-peer state (tracked as the [`SessionMode`] says, and told about each session in a
//! [`SessionInfo`]); each [`Datagram`] and the [`Reply`] to answer it through, with
//! [`SendOptions`] for what a transport stack decides per send and [`SendError`] when a reply
//! is not queued; a [`SessionHandle`] for replies made later or from another thread; the
//! counters, [`Stats`]. The details live in modules named for what they are used for:
//!
//! - [`config`]: the choices [`ServerConfig`] names ([`config::Steer`]) and the UDP limits;
//! - [`session`]: session ids, close reasons, why a deferred reply was refused;
//! - [`apps`]: ready-made handlers (echo, discard, sockperf) and the sockperf header;
//! - [`cookie`]: stateless address validation (cookies, Retry messages);
//! - [`ops`]: restarts without loss ([`ops::takeover`]), systemd socket activation
//!   ([`ops::activation`]), the shutdown signals;
//! - [`kernel`]: the one-time feature probe, the ring set-up, and the socket-address and
//!   control-message codec for programs that make their own system calls;
//! - [`testing`]: a handler driven without sockets, for unit tests;
//! - `quic` (feature `quic`): QUIC on the engine (quinn-proto, rustls on `ring`).
//!
//! Peers can be served as sessions: demultiplexed in user space ([`SessionMode::Shared`]),
//! on a connected socket per client ([`SessionMode::Connected`], the "UDP accept" model) or
//! on a port per client ([`SessionMode::PortPerClient`], the IOCP model), with idle timeouts
//! on a timeout SQE, admission limits, deferred replies through a `Send` [`SessionHandle`],
//! and optional stateless address validation ([`cookie`]).
//!
//! Operations: [`Server::start`] refuses an address another socket already serves (a second
//! `SO_REUSEPORT` bind would silently share its traffic); [`Server::offer_takeover`] and
//! [`ops::takeover::request`] hand the listening sockets to the next process for a restart
//! that loses nothing queued; [`Server::start_with_sockets`] serves sockets bound elsewhere
//! (handed over, or from systemd: [`ops::activation::listen_fds`]); [`config::Steer::Cpu`]
//! sends each datagram to the worker pinned to the CPU that received it.
//!
//! Features: `cli` (on by default) builds the `udpring` command line and its dependencies
//! (argument parsing, the load generator, the metrics endpoint, a log subscriber); it adds
//! nothing to the library's API. A library user depends on udpring with
//! `default-features = false` and gets none of them; the library logs through `tracing` and
//! leaves the choice of subscriber to the application. `quic` (on with `cli`) adds the `quic`
//! module.
//!
//! ## Examples
//!
//! Each of these starts a server on `127.0.0.1:0`, sends itself datagrams with a
//! `std::net::UdpSocket`, checks the answers and exits 0 (`cargo test` runs them too):
//!
//! - `examples/dns.rs` (`cargo run --example dns`): a stateless DNS-like [`Handler`] that
//!   answers A queries from a table, writing the answer straight into the send buffer;
//! - `examples/sessions.rs` (`cargo run --example sessions`): a [`SessionHandler`] with
//!   per-peer state, on a connected socket per client, and its close reasons;
//! - `examples/deferred.rs` (`cargo run --example deferred`): replies made on another thread
//!   through a [`SessionHandle`].
//!
//! The smallest server, in upper case:
//!
//! ```no_run
//! use udpring::{Datagram, Handler, Reply, Server, ServerConfig};
//!
//! struct Upper;
//! impl Handler for Upper {
//!     fn on_datagram(&mut self, d: &Datagram<'_>, reply: &mut Reply<'_>) {
//!         let _ = reply.send_with(|buf| {
//!             let n = d.payload.len().min(buf.len());
//!             for (o, i) in buf[..n].iter_mut().zip(d.payload) {
//!                 *o = i.to_ascii_uppercase();
//!             }
//!             n
//!         });
//!     }
//! }
//!
//! let server = Server::start(ServerConfig::default(), |_worker| Upper)?;
//! println!("listening on {}", server.local_addr());
//! # server.shutdown()?;
//! # Ok::<(), std::io::Error>(())
//! ```

#![warn(missing_docs)]

// The engine's internals: `pub(crate)` so that they stay changeable and the compiler reports
// what is dead. The `internals` feature (for the fuzz targets and the micro-benchmarks, never
// on by default) exposes the pure parsers and the ownership types to them, hidden from docs.
macro_rules! internal_modules {
    ($($name:ident),* $(,)?) => {
        $(
            #[cfg(feature = "internals")]
            #[doc(hidden)]
            #[allow(missing_docs)]
            pub mod $name;
            #[cfg(not(feature = "internals"))]
            mod $name;
        )*
    };
}

internal_modules!(buf_ring, datagram, op);

mod activation;
pub mod apps;
pub mod config;
pub mod cookie;
mod directory;
mod ebpf;
mod features;
mod guard;
mod handler;
mod harness;
#[cfg(feature = "quic")]
pub mod quic;
#[cfg(not(feature = "quic"))]
mod quic {
    //! Without the `quic` feature only the routing program is built (the engine attaches it
    //! when `ServerConfig::cid_routing` is set); the CID helpers serve the QUIC handler.
    #[allow(dead_code)]
    #[path = "route.rs"]
    pub mod route;
}
pub(crate) mod reuseport;
mod ring;
mod send_pool;
mod server;
pub mod session;
mod session_socket;
mod shared;
mod socket;
mod stats;
mod steer;
mod sys;
mod takeover;
mod worker;
pub mod xdp;

pub use config::{ServerConfig, SessionMode};
pub use handler::{Datagram, Handler, Reply, SessionHandle, SessionHandler, SessionInfo};
pub use send_pool::{SendError, SendOptions};
pub use server::Server;
pub use stats::Stats;

/// The running kernel: what the one-time probe found ([`Features`](kernel::Features)), how the
/// rings were set up, and the byte layouts of what the kernel reads and writes for UDP.
pub mod kernel {
    pub use crate::features::{Feature, Features};
    pub use crate::ring::TaskRunMode;

    /// The running kernel's release string (`uname -r`), for logs and reports.
    pub fn kernel_release() -> String {
        crate::sys::kernel_release()
    }

    /// Socket addresses and UDP control messages in the kernel's byte layout, for programs
    /// that make their own `sendmsg`/`recvmsg` calls next to a server (a load generator, a
    /// client): the same code the engine uses, so both ends of a test share one
    /// implementation. Pure functions over byte slices: no system calls, no `unsafe`.
    pub mod wire {
        pub use crate::datagram::{
            decode_sockaddr, encode_sockaddr, encode_udp_segment, find_gro_segment_size,
            ParseError, CONTROL_LEN, MAX_GSO_SEGMENTS, SOCKADDR_IN6_LEN, SOCKADDR_IN_LEN,
        };
    }
}

/// Running a server in production: restarts that lose nothing queued
/// ([`takeover`](ops::takeover)), sockets from a service manager
/// ([`activation`](ops::activation)), where served sockets came from
/// ([`SocketOrigin`](ops::SocketOrigin)), and waiting for the shutdown signals.
pub mod ops {
    pub use crate::reuseport::RoutingMap;
    pub use crate::server::SocketOrigin;

    /// Handing the listening sockets from a running server to its successor: the old process
    /// calls [`Server::offer_takeover`](crate::Server::offer_takeover), the new one
    /// [`request`](takeover::request)s the sockets and serves them with
    /// [`Server::start_with_sockets`](crate::Server::start_with_sockets).
    pub mod takeover {
        pub use crate::takeover::{
            request, socket_name, Handover, StateExport, TakeoverOffer, MAX_SOCKETS, MAX_STATE,
        };
    }

    /// systemd socket activation (`sd_listen_fds(3)`): the sockets a service manager passed.
    pub mod activation {
        pub use crate::activation::{listen_fds, ListenFds, MAX_LISTEN_FDS};
    }

    /// Blocks SIGINT and SIGTERM in the calling thread. Call it before
    /// [`Server::start`](crate::Server::start) so the workers inherit the mask, then wait for
    /// the signals with [`wait_shutdown_signal`].
    pub fn block_shutdown_signals() -> std::io::Result<()> {
        crate::sys::block_shutdown_signals()
    }

    /// Waits up to `timeout` for SIGINT or SIGTERM blocked by [`block_shutdown_signals`]:
    /// `Some(signal number)`, or `None` when the time ran out.
    pub fn wait_shutdown_signal(timeout: std::time::Duration) -> std::io::Result<Option<i32>> {
        crate::sys::wait_shutdown_signal(timeout)
    }
}

/// Testing handlers without sockets or a ring.
pub mod testing {
    pub use crate::harness::Harness;
}
