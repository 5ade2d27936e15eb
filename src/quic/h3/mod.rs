//! HTTP/3 (RFC 9114) on the QUIC [`App`] API: ALPN `h3`, a user's [`Service`] called with
//! an [`http::Request`] and answered with an [`http::Response`] streamed out under flow
//! control, and [`FileService`], the GET/HEAD file server `udpring serve --app quic` offers.
//!
//! The parts: the codec (`frame`, `qpack`: static table only, announced as such), the
//! connection state machine (`session`: control and QPACK streams, request streams,
//! RFC 9114 section 8's stream and connection errors), and the blocking pool (`pool`):
//! whatever may block (a service's [`Handled::Blocking`] work, a body's next piece) runs
//! there and is posted back through the connection's [`crate::quic::Remote`], so a
//! cold-cache read never stalls the worker's other connections.
//!
//! 0-RTT: a request that arrived as early data reaches the service only with GET or HEAD
//! ([`RequestInfo::early_data`] says so); any other method is answered 425 (Too Early,
//! RFC 8470) and the client retries after the handshake.
//!
//! Not done: server push (never promised: no MAX_PUSH_ID is acted on), a dynamic QPACK
//! table, request bodies (read and discarded), extended CONNECT.

pub(crate) mod frame;
mod parse;
mod pool;
pub(crate) mod qpack;
mod service;
mod session;
mod tables;

use std::sync::Arc;

pub use pool::BlockingPool;
pub use service::{content_type, Body, BodySource, FileService, Handled, RequestInfo, Service};
pub use session::{H3Conn, H3Message};

use super::api::{App, Decision, Established, NewConnection};
use super::conn::{Connection, StreamId};
use super::Counters;
use session::Ctx;

/// The ALPN protocol of HTTP/3.
pub const ALPN_H3: &[u8] = b"h3";

/// The application error code a connection of another ALPN is refused with.
const REFUSED_ALPN: u64 = frame::code::NO_ERROR as u64;

/// HTTP/3 on a worker: `service` answers its requests (made by [`super::Quic::h3_handler`]).
pub struct H3App<S: Service> {
    service: S,
    pool: Arc<BlockingPool>,
    counters: Arc<Counters>,
}

impl<S: Service> H3App<S> {
    pub(super) fn new(service: S, pool: Arc<BlockingPool>, counters: Arc<Counters>) -> H3App<S> {
        H3App {
            service,
            pool,
            counters,
        }
    }

    fn ctx(&mut self) -> Ctx<'_, S> {
        Ctx {
            service: &mut self.service,
            pool: &self.pool,
            counters: &self.counters,
        }
    }
}

impl<S: Service> App for H3App<S> {
    type Conn = H3Conn;
    type Message = H3Message;

    fn on_new_connection(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        info: &NewConnection<'_>,
    ) -> Decision<H3Conn> {
        if info.alpn != ALPN_H3 {
            return Decision::Refuse(REFUSED_ALPN);
        }
        let mut state = H3Conn::default();
        // SETTINGS as early as the connection can send (0.5-RTT), for a 0-RTT client's sake.
        state.open_control(conn);
        Decision::Accept(state)
    }

    fn on_established(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut H3Conn,
        _info: &Established,
    ) {
        state.open_control(conn);
    }

    fn on_stream_opened(
        &mut self,
        _conn: &mut Connection<'_, H3Message>,
        state: &mut H3Conn,
        id: StreamId,
    ) {
        state.opened(id);
    }

    fn on_readable(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut H3Conn,
        id: StreamId,
    ) {
        state.pump(conn, id, &mut self.ctx());
    }

    fn on_writable(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut H3Conn,
        id: StreamId,
    ) {
        state.pump(conn, id, &mut self.ctx());
    }

    fn on_finished(
        &mut self,
        _conn: &mut Connection<'_, H3Message>,
        state: &mut H3Conn,
        id: StreamId,
    ) {
        state.forget(id);
    }

    fn on_reset(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut H3Conn,
        id: StreamId,
        _code: u64,
    ) {
        state.peer_reset(conn, &self.counters, id);
    }

    fn on_stopped(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut H3Conn,
        id: StreamId,
        _code: u64,
    ) {
        state.stopped(conn, id);
    }

    fn on_streams_available(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut H3Conn,
        bidi: bool,
    ) {
        if !bidi {
            state.open_control(conn);
        }
    }

    fn on_message(
        &mut self,
        conn: &mut Connection<'_, H3Message>,
        state: &mut H3Conn,
        message: H3Message,
    ) {
        state.message(conn, message, &mut self.ctx());
    }
}
