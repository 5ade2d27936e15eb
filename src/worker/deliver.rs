//! Delivery: what happens to one received datagram, for one loop turn's backlog. The router
//! decides (an open session, a new one, another worker, a Retry, a drop) and `Delivery`
//! carries the decision out with the parts the loop lends it: sessions to open and close,
//! the handler to call, the sender its replies go through, `Io` for the requests opening or
//! closing a session needs. Made by the loop once per pass over the backlog; nothing here
//! allocates per datagram.

use std::net::{IpAddr, SocketAddr};

use super::io::Io;
use super::receive::{Incoming, Sink};
use super::router::{Route, Source};
use super::send::Sender;
use super::sessions::Sessions;
use crate::handler::SessionHandler;
use crate::session::{CloseReason, Millis, SessionId};
use crate::stats::Stats;

pub(super) struct Delivery<'a, H: SessionHandler> {
    pub handler: &'a mut H,
    pub sessions: &'a mut Sessions<H::State>,
    pub sender: &'a mut Sender,
    pub io: &'a mut Io,
    /// The turn's clock reading.
    pub now_ms: Millis,
    /// New sessions may be opened (`Lifecycle::opens_sessions`).
    pub opens: bool,
    /// The worker is not draining (`Lifecycle::serving`).
    pub serving: bool,
}

impl<H: SessionHandler> Sink for Delivery<'_, H> {
    const WHOLE_TRAINS: bool = H::WHOLE_TRAINS;

    #[inline]
    fn can_reply(&self) -> bool {
        self.sender.free_slots() > 0
    }

    /// Routes one datagram (see `router`) and carries the decision out.
    #[inline]
    fn deliver(&mut self, incoming: Incoming<'_>, stats: &mut Stats) {
        if self.sessions.stateless_mode() {
            if incoming.source != Source::Forwarded {
                self.sessions
                    .deliver_stateless(&incoming, self.handler, self.sender, stats);
            }
            return;
        }
        match self.sessions.route(&incoming, self.now_ms, stats) {
            Route::Session { id, strip } => self.session_datagram(id, &incoming, strip, stats),
            Route::Open { validated, strip } => {
                match self.open(incoming.peer, incoming.local, validated, stats) {
                    Some(id) => self.session_datagram(id, &incoming, strip, stats),
                    None => self.sessions.abandon(incoming.peer),
                }
            }
            Route::Forward(owner) => self.sessions.forward(owner, &incoming, stats),
            Route::Retry => self.sessions.send_retry(
                incoming.peer,
                incoming.local,
                incoming.payload.len(),
                self.now_ms,
                self.sender,
                stats,
            ),
            Route::Drop => {}
        }
    }
}

impl<H: SessionHandler> Delivery<'_, H> {
    /// Calls the handler for session `id`; closes the session afterwards if the handler
    /// asked to (which only queues its socket for retiring: nothing is routed from here).
    #[inline]
    fn session_datagram(
        &mut self,
        id: SessionId,
        incoming: &Incoming<'_>,
        strip: usize,
        stats: &mut Stats,
    ) {
        let close = self.sessions.deliver(
            id,
            incoming,
            strip,
            self.now_ms,
            self.handler,
            self.sender,
            stats,
        );
        if close {
            self.sessions
                .close(id, CloseReason::HandlerClosed, self.handler, self.io, stats);
        }
    }

    fn open(
        &mut self,
        peer: SocketAddr,
        local: Option<IpAddr>,
        validated: bool,
        stats: &mut Stats,
    ) -> Option<SessionId> {
        if !self.opens {
            // Shutdown has closed the sessions: the datagram that asked for one is dropped.
            stats.shutdown_dropped += 1;
            return None;
        }
        self.sessions.open(
            peer,
            local,
            validated,
            self.now_ms,
            self.serving,
            self.handler,
            self.io,
            stats,
        )
    }
}
