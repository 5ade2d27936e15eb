//! The QUIC application API: the [`App`] trait a service implements, and what its callbacks
//! are told. One `App` value runs on each worker (made by the factory given to
//! [`super::Quic::app_handler`]); it sees only that worker's connections, on that worker's
//! thread, so it needs no locks. Each connection carries state of the application's own type
//! ([`App::Conn`]), made when the connection is admitted and given back by value when it
//! closes.
//!
//! Completion-driven, like the rest of udpring: the worker calls the app when something
//! happened (a stream opened, data arrived, a blocked stream can take more, a timer came),
//! the app acts through the [`Connection`] it is lent, and the worker sends what quinn built
//! at the end of the turn. Nothing blocks and no runtime is involved; another thread reaches
//! a connection through its [`super::Remote`].
//!
//! Admission has two steps because quinn-proto knows only the addresses of an `Incoming`
//! (the ClientHello is decrypted when the connection is accepted): [`App::on_incoming`] sees
//! the addresses and answers accept, refuse or Retry before any connection state exists;
//! [`App::on_new_connection`] sees ALPN and SNI as soon as the handshake data is ready, before
//! the handshake completes, and accepts with the connection's state or refuses with an
//! application error code.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use bytes::Bytes;

use super::conn::{Connection, StreamId};

/// What is known of a new peer when its first Initial arrives.
#[derive(Debug, Clone, Copy)]
pub struct IncomingInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The local address the Initial arrived on (wildcard binds).
    pub local_ip: Option<IpAddr>,
    /// The peer has proved it receives at its address (it returned a Retry token).
    pub validated: bool,
    /// Index of the worker that will own the connection.
    pub worker: usize,
}

/// The answer to a new peer's Initial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Start the handshake: connection state is created.
    Accept,
    /// Answer with CONNECTION_REFUSED; no state is kept.
    Refuse,
    /// Answer with a Retry (RFC 9000 section 8.1.2): no state is kept until the peer returns
    /// the token. A peer that already returned one is accepted instead (a second Retry is
    /// not allowed).
    Retry,
}

/// The handshake data of a connection: what [`App::on_new_connection`] decides on.
#[derive(Debug, Clone, Copy)]
pub struct NewConnection<'a> {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The application protocol both sides agreed on (one of [`super::QuicConfig::alpn`]).
    pub alpn: &'a [u8],
    /// The server name the client asked for (TLS SNI), if it sent one.
    pub sni: Option<&'a str>,
    /// Index of the worker that owns the connection.
    pub worker: usize,
}

/// [`App::on_new_connection`]'s decision.
#[derive(Debug)]
pub enum Decision<C> {
    /// Serve the connection with this state.
    Accept(C),
    /// Close it with this application error code (sent as CONNECTION_CLOSE; during the
    /// handshake quinn sends it as the transport error APPLICATION_ERROR, RFC 9000 section
    /// 10.2.3). [`App::on_closed`] is not called: there is no state to give back.
    Refuse(u64),
}

/// What [`App::on_established`] is told.
#[derive(Debug, Clone, Copy)]
pub struct Established {
    /// The client resumed a session (a ticket of this server's session cache, or of the
    /// process it took over with `--takeover`).
    pub resumed: bool,
    /// The client sent 0-RTT data and the server accepted it: stream data read before this
    /// callback may have been early data (replayable, RFC 9001 section 9.2).
    pub accepted_0rtt: bool,
}

/// Why a connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The application closed it ([`Connection::close`]) with this code.
    Local {
        /// The application error code sent.
        code: u64,
    },
    /// The peer closed it with an application CONNECTION_CLOSE.
    PeerApplication {
        /// The peer's application error code.
        code: u64,
        /// The peer's reason phrase.
        reason: Bytes,
    },
    /// The peer closed it with a transport error (RFC 9000 section 20.1).
    PeerTransport {
        /// The transport error code.
        code: u64,
        /// The peer's reason phrase.
        reason: Bytes,
    },
    /// This side found a protocol violation (a transport error, described).
    Transport(String),
    /// No packet for the idle timeout.
    TimedOut,
    /// The peer sent a stateless reset.
    Reset,
    /// The server shut down (CONNECTION_CLOSE with code 0 was sent).
    Shutdown,
    /// Anything else quinn reports (version mismatch, connection IDs exhausted), described.
    Other(String),
}

impl CloseReason {
    pub(super) fn from_quinn(error: quinn_proto::ConnectionError) -> CloseReason {
        use quinn_proto::ConnectionError as E;
        match error {
            E::ApplicationClosed(close) => CloseReason::PeerApplication {
                code: close.error_code.into_inner(),
                reason: close.reason,
            },
            E::ConnectionClosed(close) => CloseReason::PeerTransport {
                code: u64::from(close.error_code),
                reason: close.reason,
            },
            E::TransportError(e) => CloseReason::Transport(e.to_string()),
            E::TimedOut => CloseReason::TimedOut,
            E::Reset => CloseReason::Reset,
            E::LocallyClosed => CloseReason::Local { code: 0 },
            other => CloseReason::Other(other.to_string()),
        }
    }
}

/// A QUIC service: the callbacks of one worker's connections, with per-connection state of
/// the service's own type.
///
/// One value runs on each worker (made by the factory given to [`super::Quic::app_handler`])
/// and sees only that worker's connections, on that worker's thread: no locks. The worker
/// calls it when something happened, the app acts through the [`Connection`] it is lent, and
/// the worker sends what quinn built at the end of the turn. Nothing blocks and no runtime is
/// involved; another thread reaches a connection through its [`super::Remote`].
///
/// Admission has two steps, because quinn-proto knows only the addresses of a new peer until
/// its ClientHello is processed: [`App::on_incoming`] sees the addresses and answers accept,
/// refuse or Retry before any connection state exists; [`App::on_new_connection`] sees ALPN
/// and SNI as soon as the handshake data is ready (before the handshake completes) and
/// accepts with the connection's state or refuses with an application error code. Then come
/// [`App::on_established`], the stream, datagram, timer and message callbacks in the order
/// their causes arrived, and last [`App::on_closed`].
///
/// Every callback but the admission ones gets the connection (`conn`) and its state
/// (`state`). Callbacks return quickly: they run on the worker's thread between its
/// completions. Every default does nothing (a readable stream nobody reads is held back by
/// flow control, not memory).
pub trait App: 'static {
    /// Per-connection state.
    type Conn: 'static;
    /// What other threads post to a connection through its [`super::Remote`] (`()` for a
    /// bare wake-up).
    type Message: Send + 'static;

    /// A new peer's first Initial: accept, refuse or ask for a Retry. The default accepts.
    fn on_incoming(&mut self, incoming: &IncomingInfo) -> Admission {
        let _ = incoming;
        Admission::Accept
    }

    /// The handshake data is ready (ALPN and SNI known): accept the connection with its
    /// state, or refuse it.
    fn on_new_connection(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        info: &NewConnection<'_>,
    ) -> Decision<Self::Conn>;

    /// The handshake completed.
    fn on_established(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        state: &mut Self::Conn,
        info: &Established,
    ) {
        let _ = (conn, state, info);
    }

    /// The peer opened stream `id` (bidirectional or unidirectional). [`App::on_readable`]
    /// follows at once for it: data that came with the opening is read there.
    fn on_stream_opened(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        state: &mut Self::Conn,
        id: StreamId,
    ) {
        let _ = (conn, state, id);
    }

    /// Stream `id` may have data, or its end, to read ([`Connection::read`],
    /// [`Connection::read_chunk`]). A reset by the peer is [`App::on_reset`] instead.
    fn on_readable(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        state: &mut Self::Conn,
        id: StreamId,
    ) {
        let _ = (conn, state, id);
    }

    /// Stream `id`, which earlier took less than it was given ([`Connection::write`]
    /// returned less than the whole), can take more.
    fn on_writable(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        state: &mut Self::Conn,
        id: StreamId,
    ) {
        let _ = (conn, state, id);
    }

    /// Everything sent on stream `id` up to its finish was acknowledged by the peer (or the
    /// peer stopped it after the finish): its send side is gone.
    fn on_finished(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        state: &mut Self::Conn,
        id: StreamId,
    ) {
        let _ = (conn, state, id);
    }

    /// The peer reset its sending side of stream `id` with `code` (RESET_STREAM): no more
    /// data comes. Called once per stream. A bidirectional stream's own send side stays open
    /// (and keeps counting against the peer's stream limit) until it is finished or reset.
    fn on_reset(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        state: &mut Self::Conn,
        id: StreamId,
        code: u64,
    ) {
        let _ = (conn, state, id, code);
    }

    /// The peer asked this side to stop sending on stream `id` with `code` (STOP_SENDING).
    /// RFC 9000 section 3.5 expects a reset in answer ([`Connection::reset`]).
    fn on_stopped(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        state: &mut Self::Conn,
        id: StreamId,
        code: u64,
    ) {
        let _ = (conn, state, id, code);
    }

    /// More streams of this direction may be opened ([`Connection::open_bi`] or
    /// [`Connection::open_uni`] returned `None` before).
    fn on_streams_available(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        state: &mut Self::Conn,
        bidi: bool,
    ) {
        let _ = (conn, state, bidi);
    }

    /// An unreliable datagram arrived (RFC 9221).
    fn on_datagram(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        state: &mut Self::Conn,
        datagram: Bytes,
    ) {
        let _ = (conn, state, datagram);
    }

    /// Datagrams that [`Connection::send_datagram`] refused for want of buffer space fit
    /// again.
    fn on_datagrams_unblocked(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        state: &mut Self::Conn,
    ) {
        let _ = (conn, state);
    }

    /// The instant set with [`Connection::set_timer`] has come (once per setting).
    fn on_timer(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        state: &mut Self::Conn,
        now: Instant,
    ) {
        let _ = (conn, state, now);
    }

    /// A message another thread posted through the connection's [`super::Remote`]. Every
    /// message a `post` accepted comes here exactly once, in the order posted; one that was
    /// on its way when the connection closed comes right before [`App::on_closed`], with
    /// the connection closed ([`Connection::is_closed`]): its data is the app's to return.
    fn on_message(
        &mut self,
        conn: &mut Connection<'_, Self::Message>,
        state: &mut Self::Conn,
        message: Self::Message,
    ) {
        let _ = (conn, state, message);
    }

    /// The connection closed: its state comes back by value. Called once per accepted
    /// connection; after it, the connection's [`super::Remote`]s refuse posts.
    fn on_closed(&mut self, state: Self::Conn, reason: &CloseReason) {
        let _ = (state, reason);
    }
}
