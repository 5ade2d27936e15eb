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
//! Peers can also be served as sessions ([`SessionHandler`], [`SessionMode`]): demultiplexed
//! in user space (`Shared`), on a connected socket per client (`Connected`, the "UDP accept"
//! model) or on a port per client (`PortPerClient`, the IOCP model), with idle timeouts on a
//! timeout SQE, admission limits, deferred replies through a `Send` [`SessionHandle`], and
//! optional stateless address validation ([`cookie`]).
//!
//! Operations: [`Server::start`] refuses an address another socket already serves (a second
//! `SO_REUSEPORT` bind would silently share its traffic); [`Server::offer_takeover`] and
//! [`takeover::request`] hand the listening sockets to the next process for a restart that
//! loses nothing queued; [`Server::start_with_sockets`] serves sockets bound elsewhere (handed
//! over, or from systemd: [`activation::listen_fds`]); [`Steer::Cpu`] sends each datagram to
//! the worker pinned to the CPU that received it.
//!
//! Minimum kernel: Linux 6.0 (multishot recvmsg); 6.1+ for DEFER_TASKRUN; 6.13+ for
//! `Connected` sessions at scale (UDP 4-tuple hash).
//!
//! Features: `cli` (on by default) builds the `udpring` command line and its dependencies
//! (argument parsing, the load generator, the metrics endpoint, a log subscriber). A library
//! user depends on udpring with `default-features = false` and gets none of them; the library
//! logs through `tracing` and leaves the choice of subscriber to the application. `quic`
//! (on with `cli`) adds the `quic` module: quinn-proto on the engine, with rustls on `ring`.
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

// The engine's internals: `pub(crate)` so that they stay changeable and the compiler reports
// what is dead. The `internals` feature (on with `cli`, and for the fuzz targets and the
// micro-benchmarks) exposes the pure parsers and the ownership types to them, hidden from docs.
macro_rules! internal_modules {
    ($($name:ident),* $(,)?) => {
        $(
            #[cfg(feature = "internals")]
            #[doc(hidden)]
            pub mod $name;
            #[cfg(not(feature = "internals"))]
            mod $name;
        )*
    };
}

internal_modules!(buf_ring, datagram, op);

pub mod activation;
mod apps;
mod config;
pub mod cookie;
mod directory;
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
mod ring;
mod send_pool;
mod server;
mod session;
mod session_socket;
mod socket;
pub mod sockperf;
mod stats;
mod steer;
mod sys;
pub mod takeover;
mod worker;

pub use apps::{App, Discard, Echo, Sockperf};
pub use config::{
    parse_duration, ServerConfig, SessionMode, Steer, MAX_UDP4_PAYLOAD, MAX_UDP6_PAYLOAD,
};
pub use features::{Feature, Features};
pub use handler::{
    Datagram, DeferredError, Handler, Reply, SessionHandle, SessionHandler, SessionInfo,
};
pub use harness::Harness;
pub use ring::TaskRunMode;
pub use send_pool::{SendError, SendOptions};
pub use server::{Server, SocketOrigin};
pub use session::{CloseReason, SessionId};
pub use stats::Stats;

/// The running kernel's release string (for logs and reports).
pub fn kernel_release() -> String {
    sys::kernel_release()
}

/// Blocks SIGINT/SIGTERM in the calling thread. Call it before [`Server::start`] so the
/// workers inherit the mask, then wait for the signals with [`wait_shutdown_signal`].
pub fn block_shutdown_signals() -> std::io::Result<()> {
    sys::block_shutdown_signals()
}

/// Waits up to `timeout` for SIGINT or SIGTERM blocked by [`block_shutdown_signals`].
pub fn wait_shutdown_signal(timeout: std::time::Duration) -> std::io::Result<Option<i32>> {
    sys::wait_shutdown_signal(timeout)
}
