//! The worker's sessions: opening one (with its own socket in `connected` and
//! `port-per-client` modes, `session_sockets`), handing it its datagrams, closing it, idle
//! expiry on a timeout SQE, and work posted from other threads (deferred replies, forwarded
//! datagrams). Routing rules are in `router`, the bookkeeping in `crate::session`; both are
//! sans-IO. The handler, the sender and `Io` are handed in by the loop for each call.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::io::Io;
use super::receive::Incoming;
use super::router::{Route, Router, SessionEntry};
use super::send::Sender;
use super::session_sockets::SessionSockets;
use crate::config::{ServerConfig, SessionMode};
use crate::cookie;
use crate::handler::{Datagram, SessionCtx, SessionHandler, SessionInfo};
use crate::send_pool::Dest;
use crate::session::{CloseReason, Limits, Millis, Refusal, SessionId, SessionTable};
use crate::session_socket::Drained;
use crate::shared::{Posted, ServerShared, WorkerShared};
use crate::stats::Stats;

pub(super) struct Sessions<S> {
    /// The session table and the rules that route datagrams to its sessions.
    router: Router<S>,
    sockets: SessionSockets,
    /// `--sessions none`: one worker-wide session, `stateless`.
    stateless_mode: bool,
    /// The one worker-wide state of `--sessions none` (`None` once closed at shutdown).
    stateless: Option<S>,
    /// Sessions whose socket needs its receive armed.
    rearm: Vec<SessionId>,
    /// Scratch space of `expire` and `read_posted`, kept to avoid allocating per turn.
    expired: Vec<SessionId>,
    posted: Vec<Posted>,
    amplification_factor: u64,
    server: Arc<ServerShared>,
    /// This worker's mailbox (session handles post to it).
    shared: Arc<WorkerShared>,
    worker: usize,
}

impl<S> Sessions<S> {
    /// An empty table under the limits of `config`; `listener` is the listening socket's
    /// address.
    pub fn new(
        config: &ServerConfig,
        listener: SocketAddr,
        server: Arc<ServerShared>,
        shared: Arc<WorkerShared>,
        worker: usize,
    ) -> Sessions<S> {
        let limits = Limits {
            idle_timeout_ms: config.idle_timeout.as_millis().max(1) as Millis,
            max_sessions_per_worker: config.max_sessions_per_worker,
            max_sessions: config.max_sessions,
            max_new_per_sec: config.max_new_sessions_per_sec,
            max_per_source: config.max_sessions_per_source,
        };
        let table = SessionTable::new(limits, server.sessions_total.clone());
        Sessions {
            router: Router::new(table, worker),
            sockets: SessionSockets::new(config, listener, worker),
            stateless_mode: config.sessions == SessionMode::None,
            stateless: None,
            rearm: Vec::new(),
            expired: Vec::new(),
            posted: Vec::new(),
            amplification_factor: u64::from(config.amplification_factor),
            server,
            shared,
            worker,
        }
    }

    /// Sessions open.
    pub fn len(&self) -> usize {
        self.router.table().len()
    }

    /// `--sessions none`: no per-peer sessions.
    #[inline]
    pub fn stateless_mode(&self) -> bool {
        self.stateless_mode
    }

    fn stateless_info(&self) -> SessionInfo {
        SessionInfo {
            peer: SocketAddr::new(self.sockets.listener().ip(), 0),
            local: None,
            worker: self.worker,
            id: SessionId {
                slot: u32::MAX,
                generation: 0,
            },
            own_socket: false,
        }
    }

    /// `--sessions none`: opens the one worker-wide session, at start.
    pub fn open_stateless<H: SessionHandler<State = S>>(&mut self, handler: &mut H) {
        if self.stateless_mode {
            let info = self.stateless_info();
            self.stateless = Some(handler.session_open(&info));
        }
    }

    /// Which session a datagram belongs to (see `router`).
    #[inline]
    pub fn route(&mut self, incoming: &Incoming<'_>, now: Millis, stats: &mut Stats) -> Route {
        self.router.route(
            incoming.source,
            incoming.peer,
            incoming.payload,
            now,
            &self.server,
            stats,
        )
    }

    /// The session `route` asked for was not opened: give up the peer's claim.
    pub fn abandon(&self, peer: SocketAddr) {
        self.router.abandon(peer, &self.server);
    }

    /// Hands a datagram to another worker, which owns its peer.
    pub fn forward(&self, owner: usize, incoming: &Incoming<'_>, stats: &mut Stats) {
        let work = Posted::ForwardedDatagram {
            peer: incoming.peer,
            local: incoming.local,
            payload: incoming.payload.to_vec(),
        };
        match self.server.workers.get(owner).map(|w| w.post(work)) {
            Some(Ok(())) => stats.forwarded += 1,
            _ => stats.deferred_dropped += 1,
        }
    }

    /// Sends a Retry from the listening socket, if the datagram that asked for it was large
    /// enough (`received` bytes) that the Retry stays within the anti-amplification factor.
    pub fn send_retry(
        &self,
        peer: SocketAddr,
        local: Option<IpAddr>,
        received: usize,
        now: Millis,
        sender: &mut Sender,
        stats: &mut Stats,
    ) {
        let Some(jar) = self.server.cookies.as_ref() else {
            return;
        };
        if self.amplification_factor > 0
            && cookie::PREFIX_LEN as u64 > self.amplification_factor * received as u64
        {
            stats.amplification_limited += 1;
            return;
        }
        let message = cookie::retry_message(&jar.mint(&peer, (now / 1000) as u32));
        let dest = Dest {
            fd: sender.listener_fd(),
            peer,
            local,
            connected: false,
        };
        match sender.queue_bytes(dest, &message) {
            Ok(_) => stats.retries_sent += 1,
            Err(_) => stats.send_dropped += 1,
        }
    }

    /// Admits and opens a session for `peer`, with its own socket in the modes that have one
    /// (falling back to none, counted, when descriptors or `--max-connected` run out). While
    /// `serving`, the idle timer is armed if it is not.
    #[allow(clippy::too_many_arguments)]
    pub fn open<H: SessionHandler<State = S>>(
        &mut self,
        peer: SocketAddr,
        local: Option<IpAddr>,
        validated: bool,
        now: Millis,
        serving: bool,
        handler: &mut H,
        io: &mut Io,
        stats: &mut Stats,
    ) -> Option<SessionId> {
        if let Err(refusal) = self.router.table_mut().admit(&peer, now) {
            match refusal {
                Refusal::WorkerFull => stats.refused_worker_full += 1,
                Refusal::TotalFull => stats.refused_total_full += 1,
                Refusal::RateLimited => stats.refused_rate += 1,
                Refusal::SourceFull => stats.refused_source += 1,
            }
            return None;
        }
        let sock = self
            .sockets
            .open(peer, local, &self.server.connected_total, stats);
        let own_socket = sock.is_some();
        let id = self.router.table_mut().insert(
            peer,
            now,
            SessionEntry {
                state: None,
                sock,
                closed: None,
                local,
                validated,
                budget: 0,
            },
        );
        let info = SessionInfo {
            peer,
            local,
            worker: self.worker,
            id,
            own_socket,
        };
        let state = handler.session_open(&info);
        if let Some(entry) = self.router.table_mut().get_mut(id) {
            entry.value.state = Some(state);
        }
        stats.sessions_opened += 1;
        if own_socket {
            self.rearm.push(id);
        }
        // Not while draining: a new timer would hold the drain open until it fired.
        if !io.ledger().tick_armed() && serving {
            let idle = self.router.table().limits().idle_timeout_ms;
            if let Err(e) = io.arm_tick(idle) {
                tracing::error!(worker = self.worker, error = %e, "cannot arm the idle timer");
            }
        }
        Some(id)
    }

    /// Calls the handler for session `id` with the payload past its first `strip` bytes.
    /// Returns whether the handler asked to close the session.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub fn deliver<H: SessionHandler<State = S>>(
        &mut self,
        id: SessionId,
        incoming: &Incoming<'_>,
        strip: usize,
        now: Millis,
        handler: &mut H,
        sender: &mut Sender,
        stats: &mut Stats,
    ) -> bool {
        let payload = &incoming.payload[strip.min(incoming.payload.len())..];
        let Some(entry) = self.router.table_mut().get_mut(id) else {
            return false;
        };
        entry.last_active = now;
        let session = &mut entry.value;
        let dest = session.dest(entry.peer, sender.listener_fd(), incoming.local);
        let limited = !session.validated && self.amplification_factor > 0;
        if limited {
            session.budget = session
                .budget
                .saturating_add(self.amplification_factor * payload.len() as u64);
        }
        let datagram = Datagram {
            peer: incoming.peer,
            local: incoming.local,
            payload,
            worker: self.worker,
            ecn: incoming.ecn,
        };
        let Some(state) = session.state.as_mut() else {
            return false;
        };
        let ctx = SessionCtx {
            id,
            worker: &self.shared,
            closed: &mut session.closed,
            close_requested: false,
        };
        let budget = if limited {
            Some(&mut session.budget)
        } else {
            None
        };
        let mut reply = sender.reply(stats, dest, Some(ctx), budget);
        match incoming.train {
            Some(segment) => handler.session_train(state, &datagram, segment, &mut reply),
            None => handler.session_datagram(state, &datagram, &mut reply),
        }
        reply.session.is_some_and(|s| s.close_requested)
    }

    /// `--sessions none`: calls the handler with the worker-wide state.
    #[inline]
    pub fn deliver_stateless<H: SessionHandler<State = S>>(
        &mut self,
        incoming: &Incoming<'_>,
        handler: &mut H,
        sender: &mut Sender,
        stats: &mut Stats,
    ) {
        let Some(state) = self.stateless.as_mut() else {
            // Closed at shutdown: no handler state is left to take it.
            stats.shutdown_dropped += 1;
            return;
        };
        let payload = incoming.payload;
        // No per-peer state here: the anti-amplification budget is per datagram.
        let mut budget = self.amplification_factor * payload.len() as u64;
        let datagram = Datagram {
            peer: incoming.peer,
            local: incoming.local,
            payload,
            worker: self.worker,
            ecn: incoming.ecn,
        };
        let dest = Dest {
            fd: sender.listener_fd(),
            peer: incoming.peer,
            local: incoming.local,
            connected: false,
        };
        let budget = (self.amplification_factor > 0).then_some(&mut budget);
        let mut reply = sender.reply(stats, dest, None, budget);
        match incoming.train {
            Some(segment) => handler.session_train(state, &datagram, segment, &mut reply),
            None => handler.session_datagram(state, &datagram, &mut reply),
        }
    }

    /// Ends a session: tells the handler, marks its handles closed and starts retiring its
    /// socket (`SessionSockets::retire`). Routes nothing: what the socket still holds is read
    /// later in the turn (`read_retiring`).
    pub fn close<H: SessionHandler<State = S>>(
        &mut self,
        id: SessionId,
        reason: CloseReason,
        handler: &mut H,
        io: &mut Io,
        stats: &mut Stats,
    ) {
        let Some(entry) = self.router.table_mut().remove(id) else {
            return;
        };
        let peer = entry.peer;
        let session = entry.value;
        if let Some(closed) = &session.closed {
            closed.store(true, Ordering::Release);
        }
        self.router.abandon(peer, &self.server);
        match reason {
            CloseReason::Idle => stats.closed_idle += 1,
            CloseReason::HandlerClosed => stats.closed_by_handler += 1,
            CloseReason::Shutdown => stats.closed_shutdown += 1,
        }
        let info = SessionInfo {
            peer,
            local: session.local,
            worker: self.worker,
            id,
            own_socket: session.sock.is_some(),
        };
        if let Some(state) = session.state {
            handler.session_close(state, &info, reason);
        }
        if let Some(sock) = session.sock {
            self.sockets
                .retire(id, sock, &self.server.connected_total, io);
        }
    }

    /// Shutdown: closes every session, and the worker-wide one of `--sessions none`.
    pub fn close_all<H: SessionHandler<State = S>>(
        &mut self,
        handler: &mut H,
        io: &mut Io,
        stats: &mut Stats,
    ) {
        for id in self.router.table().ids() {
            self.close(id, CloseReason::Shutdown, handler, io, stats);
        }
        if let Some(state) = self.stateless.take() {
            let info = self.stateless_info();
            handler.session_close(state, &info, CloseReason::Shutdown);
        }
    }

    /// The listener was handed over: sessions served through it (`shared` mode, and in the
    /// other modes those over --max-connected or whose socket could not be opened) will
    /// never hear from their peer here again; their datagrams reach the new process, which
    /// opens sessions of its own for them. Closes those.
    pub fn close_listener_sessions<H: SessionHandler<State = S>>(
        &mut self,
        handler: &mut H,
        io: &mut Io,
        stats: &mut Stats,
    ) {
        for id in self.router.table().ids() {
            if !self.has_own_socket(id) {
                self.close(id, CloseReason::Shutdown, handler, io, stats);
            }
        }
    }

    fn has_own_socket(&self, id: SessionId) -> bool {
        self.router
            .table()
            .get(id)
            .is_some_and(|e| e.value.sock.is_some())
    }

    /// Some session is served on a socket of its own (which keeps a released worker
    /// serving).
    pub fn any_own_socket(&self) -> bool {
        self.sockets.own_sockets()
            && self
                .router
                .table()
                .ids()
                .into_iter()
                .any(|id| self.has_own_socket(id))
    }

    /// The multishot receive of session `id`'s socket ended (its completion without
    /// `F_MORE`, whose result was `result`): the socket retires if the session has closed,
    /// else its receive is armed again while `serving`.
    pub fn recv_ended(&mut self, id: SessionId, result: i32, serving: bool, stats: &mut Stats) {
        if self.sockets.recv_ended(id) {
            return;
        }
        let Some(entry) = self.router.table_mut().get_mut(id) else {
            return;
        };
        if let Some(sock) = entry.value.sock.as_mut() {
            sock.recv_armed = false;
            if serving {
                self.rearm.push(id);
                if result >= 0 || result == -libc::ENOBUFS {
                    stats.rearms += 1;
                }
            }
        }
    }

    /// Arms the receive of every session socket that needs it, while `buffers_available`.
    pub fn rearm(&mut self, io: &mut Io, buffers_available: bool) -> io::Result<()> {
        if self.rearm.is_empty() || !buffers_available {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.rearm);
        for id in pending {
            let Some(entry) = self.router.table_mut().get_mut(id) else {
                continue;
            };
            let Some(sock) = entry.value.sock.as_mut() else {
                continue;
            };
            if sock.recv_armed {
                continue;
            }
            // The socket stays open until this request's final completion: closing a session
            // cancels the receive and keeps the descriptor in `cancelling` until then.
            io.arm_session_recv(sock.fd.as_raw_fd(), id)?;
            sock.recv_armed = true;
        }
        Ok(())
    }

    /// The idle timer fired: close what has been idle for the whole timeout, re-arm while
    /// `serving`.
    pub fn expire<H: SessionHandler<State = S>>(
        &mut self,
        now: Millis,
        serving: bool,
        handler: &mut H,
        io: &mut Io,
        stats: &mut Stats,
    ) -> io::Result<()> {
        let mut expired = std::mem::take(&mut self.expired);
        expired.clear();
        self.router.table_mut().expired(now, &mut expired);
        for &id in &expired {
            self.close(id, CloseReason::Idle, handler, io, stats);
        }
        self.expired = expired;
        if serving {
            if let Some(due) = self.router.table().next_check() {
                io.arm_tick(due.saturating_sub(now))?;
            }
        }
        Ok(())
    }

    /// Takes the work other threads posted: deferred replies are queued, forwarded
    /// datagrams go to `forwarded` (the receiver's backlog).
    pub fn read_posted(
        &mut self,
        sender: &mut Sender,
        stats: &mut Stats,
        mut forwarded: impl FnMut(SocketAddr, Option<IpAddr>, Vec<u8>),
    ) {
        let mut posted = std::mem::take(&mut self.posted);
        self.shared.collect(&mut posted);
        for work in posted.drain(..) {
            match work {
                Posted::DeferredReply { session, payload } => {
                    self.send_deferred(session, &payload, sender, stats)
                }
                Posted::ForwardedDatagram {
                    peer,
                    local,
                    payload,
                } => forwarded(peer, local, payload),
                // The turn this wake-up started is all it asked for.
                Posted::Wake => {}
            }
        }
        self.posted = posted;
    }

    fn send_deferred(
        &mut self,
        id: SessionId,
        payload: &[u8],
        sender: &mut Sender,
        stats: &mut Stats,
    ) {
        let factor = self.amplification_factor;
        let Some(entry) = self.router.table_mut().get_mut(id) else {
            stats.deferred_dropped += 1;
            return;
        };
        if !entry.value.validated && factor > 0 {
            if payload.len() as u64 > entry.value.budget {
                stats.amplification_limited += 1;
                return;
            }
            entry.value.budget -= payload.len() as u64;
        }
        let dest = entry.value.dest(entry.peer, sender.listener_fd(), None);
        match sender.queue_bytes(dest, payload) {
            Ok(_) => stats.deferred_sent += 1,
            Err(_) => stats.send_dropped += 1,
        }
    }

    /// Session sockets wait to be read or closed (see `SessionSockets::busy`).
    pub fn sockets_busy(&self) -> bool {
        self.sockets.busy()
    }

    /// See `SessionSockets::read_retiring`.
    pub fn read_retiring(&mut self, requeue: impl FnMut(Drained)) -> bool {
        self.sockets.read_retiring(requeue)
    }

    /// See `SessionSockets::close_parked`.
    pub fn close_parked(&mut self, unsubmitted: usize, requeue: impl FnMut(Drained)) {
        self.sockets.close_parked(unsubmitted, requeue)
    }
}
