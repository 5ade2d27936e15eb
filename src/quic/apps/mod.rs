//! The built-in QUIC services, written on the public [`App`] API like any user's: `h3`
//! (HTTP/3 GET and HEAD of the files under the root, [`crate::quic::h3`]), `hq-interop`
//! ([`hq`]) and `echo` ([`echo`]), chosen per connection by the client's ALPN.

pub(super) mod echo;
pub(crate) mod files;
pub(super) mod hq;

use std::path::Path;
use std::sync::Arc;

use super::api::{App, Decision, Established, NewConnection};
use super::conn::{Connection, StreamId};
use super::h3::{BlockingPool, FileService, H3App, H3Conn, H3Message, ALPN_H3};
use super::Counters;

/// The ALPN protocol of the echo service.
pub const ALPN_ECHO: &[u8] = b"echo";
/// The ALPN protocol of HTTP/0.9 over QUIC (the interop runner's `hq-interop`).
pub const ALPN_HQ: &[u8] = b"hq-interop";

/// The application error code a connection of another ALPN is refused with (the TLS
/// configuration offers only the built-in ones, so it is unreachable but for a
/// misconfiguration).
const REFUSED_ALPN: u64 = 0x100;

/// `h3`, `hq-interop` and `echo`, by ALPN: what `udpring serve --app quic` runs.
pub struct Builtin {
    root: Option<Arc<Path>>,
    counters: Arc<Counters>,
    h3: H3App<FileService>,
}

impl Builtin {
    pub(super) fn new(
        root: Option<Arc<Path>>,
        counters: Arc<Counters>,
        pool: Arc<BlockingPool>,
    ) -> Builtin {
        let h3 = H3App::new(FileService::new(root.clone()), pool, counters.clone());
        Builtin { root, counters, h3 }
    }
}

/// A built-in connection's state (its streams' progress).
pub struct BuiltinConn(Kind);

enum Kind {
    Echo(echo::EchoConn),
    Hq(hq::HqConn),
    H3(H3Conn),
}

impl App for Builtin {
    type Conn = BuiltinConn;
    type Message = H3Message;

    fn on_new_connection(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        info: &NewConnection<'_>,
    ) -> Decision<BuiltinConn> {
        let kind = match info.alpn {
            ALPN_ECHO => Kind::Echo(echo::EchoConn::default()),
            ALPN_HQ => Kind::Hq(hq::HqConn::default()),
            ALPN_H3 => match self.h3.on_new_connection(conn, info) {
                Decision::Accept(state) => Kind::H3(state),
                Decision::Refuse(code) => return Decision::Refuse(code),
            },
            _ => return Decision::Refuse(REFUSED_ALPN),
        };
        Decision::Accept(BuiltinConn(kind))
    }

    fn on_established(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut BuiltinConn,
        info: &Established,
    ) {
        if let Kind::H3(s) = &mut state.0 {
            self.h3.on_established(conn, s, info);
        }
    }

    fn on_stream_opened(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut BuiltinConn,
        id: StreamId,
    ) {
        match &mut state.0 {
            Kind::Echo(s) => s.opened(conn, id),
            Kind::Hq(s) => s.opened(conn, id),
            Kind::H3(s) => self.h3.on_stream_opened(conn, s, id),
        }
    }

    fn on_readable(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut BuiltinConn,
        id: StreamId,
    ) {
        match &mut state.0 {
            Kind::Echo(s) => s.pump(conn, id),
            Kind::Hq(s) => s.pump(conn, id, self.root.as_deref(), &self.counters),
            Kind::H3(s) => self.h3.on_readable(conn, s, id),
        }
    }

    fn on_writable(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut BuiltinConn,
        id: StreamId,
    ) {
        self.on_readable(conn, state, id)
    }

    fn on_finished(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut BuiltinConn,
        id: StreamId,
    ) {
        match &mut state.0 {
            Kind::Echo(s) => s.forget(id),
            Kind::Hq(s) => s.forget(id),
            Kind::H3(s) => self.h3.on_finished(conn, s, id),
        }
    }

    /// The peer gave up its side: ours is abandoned too, so the stream's credit comes back
    /// to the peer (a bidirectional stream counts against its limit until both sides end).
    fn on_reset(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut BuiltinConn,
        id: StreamId,
        code: u64,
    ) {
        if let Kind::H3(s) = &mut state.0 {
            return self.h3.on_reset(conn, s, id, code);
        }
        let _ = conn.reset(id, 0);
        self.on_finished(conn, state, id);
    }

    fn on_stopped(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut BuiltinConn,
        id: StreamId,
        code: u64,
    ) {
        if let Kind::H3(s) = &mut state.0 {
            return self.h3.on_stopped(conn, s, id, code);
        }
        // Both our halves end: the send half reset, and the receive half stopped, so that
        // quinn frees the stream (it does once both halves are closed) and renews the
        // peer's credit, whatever the peer does with its sending side.
        let _ = conn.reset(id, 0);
        let _ = conn.stop_sending(id, 0);
        self.on_finished(conn, state, id);
    }

    fn on_streams_available(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut BuiltinConn,
        bidi: bool,
    ) {
        if let Kind::H3(s) = &mut state.0 {
            self.h3.on_streams_available(conn, s, bidi);
        }
    }

    fn on_message(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut BuiltinConn,
        message: H3Message,
    ) {
        // Only HTTP/3 connections hand out their Remote (to the blocking pool).
        if let Kind::H3(s) = &mut state.0 {
            self.h3.on_message(conn, s, message);
        }
    }
}
