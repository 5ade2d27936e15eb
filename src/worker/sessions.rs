//! Session routing inside a worker: which session a datagram belongs to, per-client sockets
//! (`connected`, `port-per-client`), idle expiry on a timeout SQE, deferred and forwarded
//! datagrams from the mailbox. The bookkeeping itself is sans-IO in `crate::session`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types};

use super::{Letter, Payload, Source, State, Worker, BUF_GROUP};
use crate::config::SessionMode;
use crate::cookie::{self, CookieError, CookieJar};
use crate::handler::{SessionHandler, SessionInfo};
use crate::op::{OpKind, UserData};
use crate::ring::{has_more, Completion};
use crate::send_pool::Dest;
use crate::session::{CloseReason, Refusal, SessionId};
use crate::session_socket;

/// A session's own socket.
pub(super) struct SessionSock {
    pub fd: OwnedFd,
    pub recv_armed: bool,
    /// Counted against `--max-connected`.
    pub connected: bool,
}

/// What the worker keeps per session.
pub(super) struct Live<S> {
    /// `None` only between insertion and `session_open` returning.
    pub state: Option<S>,
    pub sock: Option<SessionSock>,
    /// Shared with session handles; set when the session closes.
    pub closed: Option<Arc<AtomicBool>>,
    /// The local address the session's first datagram arrived on.
    pub local: Option<IpAddr>,
    /// The peer proved its address with a cookie: no anti-amplification limit.
    pub validated: bool,
    /// Bytes that may still be sent to an unvalidated peer.
    pub budget: u64,
}

impl<S> Live<S> {
    /// Where replies to this session go: its own socket (connected: no address), or the
    /// worker's socket with the peer's address and the local address it asked on.
    pub(super) fn dest(&self, peer: SocketAddr, listener_fd: RawFd, local: Option<IpAddr>) -> Dest {
        match &self.sock {
            Some(sock) => Dest {
                fd: sock.fd.as_raw_fd(),
                peer,
                local: None,
                connected: true,
            },
            None => Dest {
                fd: listener_fd,
                peer,
                local: local.or(self.local),
                connected: false,
            },
        }
    }
}

/// What the cookie gate decided for a datagram from a peer without a session.
enum Gate {
    /// No validation asked, or a valid cookie (stripped from the payload).
    Pass { validated: bool },
    /// Answered with a Retry, or dropped and counted.
    Stop,
}

/// Where a datagram goes.
enum Target {
    Session(SessionId),
    /// Another worker owns the peer (connected mode).
    Forward(usize),
    /// No session and none may be opened (counted).
    Refused,
}

impl<H: SessionHandler> Worker<H> {
    pub(super) fn stateless_info(&self) -> SessionInfo {
        SessionInfo {
            peer: SocketAddr::new(self.socket.local_addr.ip(), 0),
            local: None,
            worker: self.id,
            id: SessionId {
                slot: u32::MAX,
                generation: 0,
            },
            own_socket: false,
        }
    }

    /// Routes one datagram in a session mode and hands it to its session's handler.
    pub(super) fn route(
        &mut self,
        source: Source,
        peer: SocketAddr,
        local: Option<IpAddr>,
        mut payload: Payload,
    ) {
        let target = match source {
            Source::Session(id) => match self.sessions.get(id) {
                // Established: the kernel picked this session's socket by its 4-tuple.
                Some(e) if e.peer == peer => {
                    self.strip_cookie(peer, &mut payload);
                    Target::Session(id)
                }
                // Read from a per-client socket but sent by someone else (the bind/connect
                // window) or by a peer whose session has just closed: route it as if it had
                // reached the listener. Nothing is dropped, nothing reaches the wrong session.
                Some(_) => {
                    self.counters.strays += 1;
                    self.route_new(peer, local, &mut payload)
                }
                None => self.route_new(peer, local, &mut payload),
            },
            Source::Listener => self.route_new(peer, local, &mut payload),
        };
        match target {
            Target::Session(id) => self.deliver_to_session(id, peer, local, payload),
            Target::Forward(owner) => {
                let payload = payload.to_vec(&self.bufs);
                match self.fleet.workers.get(owner).map(|w| {
                    w.post(Letter::Forwarded {
                        peer,
                        local,
                        payload,
                    })
                }) {
                    Some(Ok(())) => self.counters.forwarded += 1,
                    _ => self.counters.deferred_dropped += 1,
                }
            }
            Target::Refused => {}
        }
    }

    /// The session for a datagram that did not arrive on its peer's own socket: an existing
    /// one, another worker's, or a new one.
    fn route_new(
        &mut self,
        peer: SocketAddr,
        local: Option<IpAddr>,
        payload: &mut Payload,
    ) -> Target {
        if let Some(id) = self.sessions.lookup(&peer) {
            self.strip_cookie(peer, payload);
            return Target::Session(id);
        }
        if let Some(directory) = &self.fleet.directory {
            if let Err(owner) = directory.claim(peer, self.id) {
                return Target::Forward(owner);
            }
        }
        let opened = match self.cookie_gate(peer, local, payload) {
            Gate::Pass { validated } => self.open_session(peer, local, validated),
            Gate::Stop => None,
        };
        match opened {
            Some(id) => Target::Session(id),
            None => {
                if let Some(directory) = &self.fleet.directory {
                    directory.release(&peer, self.id);
                }
                Target::Refused
            }
        }
    }

    /// With `--validate-peers`, a peer without a session must show a valid cookie before any
    /// state exists for it; otherwise it gets a Retry carrying one (within the
    /// anti-amplification limit) and nothing else.
    fn cookie_gate(
        &mut self,
        peer: SocketAddr,
        local: Option<IpAddr>,
        payload: &mut Payload,
    ) -> Gate {
        let Some(jar) = self.fleet.cookies.as_ref() else {
            return Gate::Pass { validated: false };
        };
        let now_secs = (self.now_ms / 1000) as u32;
        let bytes = payload.bytes(&self.bufs);
        let received = bytes.len();
        let verdict = cookie::split_cookie(bytes).map(|(c, _)| (*c, jar.check(&peer, c, now_secs)));
        match verdict {
            None => {
                self.send_retry(peer, local, received, now_secs);
                Gate::Stop
            }
            Some((_, Err(CookieError::Forged))) => {
                self.counters.cookies_forged += 1;
                Gate::Stop
            }
            Some((_, Err(_))) => {
                self.counters.cookies_expired += 1;
                self.send_retry(peer, local, received, now_secs);
                Gate::Stop
            }
            Some((c, Ok(()))) => {
                let epoch = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
                if !self
                    .fleet
                    .used_cookies
                    .lock()
                    .first_use(CookieJar::tag(&c), epoch)
                {
                    self.counters.cookies_replayed += 1;
                    self.send_retry(peer, local, received, now_secs);
                    return Gate::Stop;
                }
                self.counters.cookies_accepted += 1;
                payload.strip(cookie::PREFIX_LEN);
                Gate::Pass { validated: true }
            }
        }
    }

    /// Removes a valid cookie prefix from a datagram of an existing session (clients repeat
    /// it until they get a real answer).
    fn strip_cookie(&self, peer: SocketAddr, payload: &mut Payload) {
        let Some(jar) = self.fleet.cookies.as_ref() else {
            return;
        };
        let now_secs = (self.now_ms / 1000) as u32;
        let valid = cookie::split_cookie(payload.bytes(&self.bufs))
            .map(|(c, _)| jar.check(&peer, c, now_secs).is_ok())
            .unwrap_or(false);
        if valid {
            payload.strip(cookie::PREFIX_LEN);
        }
    }

    /// Sends a Retry from the listening socket, if the datagram that asked for it was large
    /// enough that the Retry stays within the anti-amplification factor.
    fn send_retry(
        &mut self,
        peer: SocketAddr,
        local: Option<IpAddr>,
        received: usize,
        now_secs: u32,
    ) {
        let Some(jar) = self.fleet.cookies.as_ref() else {
            return;
        };
        if self.amplification_factor > 0
            && cookie::PREFIX_LEN as u64 > self.amplification_factor * received as u64
        {
            self.counters.amplification_limited += 1;
            return;
        }
        let message = cookie::retry_message(&jar.mint(&peer, now_secs));
        let dest = Dest {
            fd: self.fd,
            peer,
            local,
            connected: false,
        };
        match self.sends.queue_bytes(dest, &message) {
            Ok(_) => self.counters.retries_sent += 1,
            Err(_) => self.counters.send_dropped += 1,
        }
    }

    /// Admits and opens a session for `peer`, with its own socket in the modes that have one
    /// (falling back to none, counted, when descriptors or `--max-connected` run out).
    fn open_session(
        &mut self,
        peer: SocketAddr,
        local: Option<IpAddr>,
        validated: bool,
    ) -> Option<SessionId> {
        if self.state != State::Running {
            return None;
        }
        if let Err(refusal) = self.sessions.admit(&peer, self.now_ms) {
            match refusal {
                Refusal::WorkerFull => self.counters.refused_worker_full += 1,
                Refusal::TotalFull => self.counters.refused_total_full += 1,
                Refusal::RateLimited => self.counters.refused_rate += 1,
                Refusal::SourceFull => self.counters.refused_source += 1,
            }
            return None;
        }
        let sock = self.open_session_socket(peer, local);
        let own_socket = sock.is_some();
        let now = self.now_ms;
        let id = self.sessions.insert(
            peer,
            now,
            Live {
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
            worker: self.id,
            id,
            own_socket,
        };
        let state = self.handler.session_open(&info);
        if let Some(entry) = self.sessions.get_mut(id) {
            entry.value.state = Some(state);
        }
        self.counters.sessions_opened += 1;
        if own_socket {
            self.rearm.push(id);
        }
        if !self.tick_armed {
            let idle = self.sessions.limits().idle_timeout_ms;
            if let Err(e) = self.arm_tick(idle) {
                tracing::error!(worker = self.id, error = %e, "cannot arm the idle timer");
            }
        }
        Some(id)
    }

    fn open_session_socket(
        &mut self,
        peer: SocketAddr,
        local: Option<IpAddr>,
    ) -> Option<SessionSock> {
        let connected = match self.mode {
            SessionMode::Connected => true,
            SessionMode::PortPerClient => false,
            SessionMode::None | SessionMode::Shared => return None,
        };
        if connected
            && self.fleet.connected_total.fetch_add(1, Ordering::Relaxed) >= self.max_connected
        {
            self.fleet.connected_total.fetch_sub(1, Ordering::Relaxed);
            self.counters.connected_cap += 1;
            return None;
        }
        let port = if connected {
            self.socket.local_addr.port()
        } else {
            0
        };
        let result = match session_socket::local_for(self.socket.local_addr, local, peer, port) {
            Some(bind) => session_socket::open(bind, peer, self.session_recv_buffer),
            None => Err(io::Error::other(
                "no local address for the per-client socket (packet-info missing)",
            )),
        };
        match result {
            Ok(fd) => Some(SessionSock {
                fd,
                recv_armed: false,
                connected,
            }),
            Err(e) => {
                if connected {
                    self.fleet.connected_total.fetch_sub(1, Ordering::Relaxed);
                }
                if session_socket::is_fd_exhaustion(&e) {
                    self.counters.fd_exhausted += 1;
                } else {
                    self.counters.session_socket_errors += 1;
                }
                if let Some(held_back) = self.socket_log.check() {
                    tracing::warn!(worker = self.id, %peer, error = %e, held_back, "per-client socket not opened; serving the peer on the shared socket");
                }
                None
            }
        }
    }

    /// Ends a session: tells the handler, marks its handles closed and closes its socket
    /// (after cancelling the socket's receive; the descriptor is closed on its final
    /// completion, so the kernel never writes for a socket number that was reused).
    pub(super) fn close_session(&mut self, id: SessionId, reason: CloseReason) {
        let Some(entry) = self.sessions.remove(id) else {
            return;
        };
        let peer = entry.peer;
        let live = entry.value;
        if let Some(closed) = &live.closed {
            closed.store(true, Ordering::Release);
        }
        if let Some(directory) = &self.fleet.directory {
            directory.release(&peer, self.id);
        }
        match reason {
            CloseReason::Idle => self.counters.closed_idle += 1,
            CloseReason::HandlerClosed => self.counters.closed_by_handler += 1,
            CloseReason::Shutdown => self.counters.closed_shutdown += 1,
        }
        let info = SessionInfo {
            peer,
            local: live.local,
            worker: self.id,
            id,
            own_socket: live.sock.is_some(),
        };
        if let Some(state) = live.state {
            self.handler.session_close(state, &info, reason);
        }
        if let Some(sock) = live.sock {
            if sock.connected {
                self.fleet.connected_total.fetch_sub(1, Ordering::Relaxed);
            }
            if sock.recv_armed {
                let target = UserData::new(OpKind::SessionRecv, id.generation, id.slot);
                if let Err(e) = self.cancel(target) {
                    // Without a cancel the receive stays armed; the descriptor stays open in
                    // `closing` so the kernel never reads into a reused socket number.
                    tracing::error!(worker = self.id, error = %e, "cannot cancel a session receive");
                }
                self.closing.insert(id, sock.fd);
            } else {
                self.retire_socket(sock.fd);
            }
        }
    }

    /// Takes a session socket that no receive uses any more out of service: routes whatever
    /// is queued on it now (a peer that kept sending while its session closed gets a new
    /// session instead of silence) and parks it until the sends that name it are issued.
    fn retire_socket(&mut self, fd: OwnedFd) {
        let fd = self.reroute_queued(fd);
        self.graveyard.push(fd);
    }

    /// Closes the parked sockets, reading each one last time right before `close()`. Only a
    /// datagram that arrives in the microsecond between that read and `close()` is lost; the
    /// peer's retransmission then reaches the listener.
    pub(super) fn bury(&mut self) {
        if self.graveyard.is_empty() {
            return;
        }
        for fd in std::mem::take(&mut self.graveyard) {
            drop(self.reroute_queued(fd));
        }
    }

    fn reroute_queued(&mut self, fd: OwnedFd) -> OwnedFd {
        let (fd, queued) = session_socket::drain(fd, self.sends.slot_capacity(), 1024);
        for (peer, payload) in queued {
            self.counters.rx_datagrams += 1;
            self.counters.rx_bytes += payload.len() as u64;
            self.route(Source::Listener, peer, None, Payload::Owned(payload));
        }
        fd
    }

    pub(super) fn close_all_sessions(&mut self) -> io::Result<()> {
        for id in self.sessions.ids() {
            self.close_session(id, CloseReason::Shutdown);
        }
        if let Some(state) = self.stateless.take() {
            let info = self.stateless_info();
            self.handler
                .session_close(state, &info, CloseReason::Shutdown);
        }
        Ok(())
    }

    /// A completion of a session socket's multishot receive.
    pub(super) fn on_session_recv(&mut self, ud: UserData, c: Completion) {
        let id = SessionId {
            slot: ud.slot,
            generation: ud.generation,
        };
        if !has_more(c.flags) {
            self.session_recvs_armed = self.session_recvs_armed.saturating_sub(1);
            if let Some(fd) = self.closing.remove(&id) {
                self.retire_socket(fd);
            } else if let Some(entry) = self.sessions.get_mut(id) {
                if let Some(sock) = entry.value.sock.as_mut() {
                    sock.recv_armed = false;
                    if self.state == State::Running {
                        self.rearm.push(id);
                        if c.result >= 0 || c.result == -libc::ENOBUFS {
                            self.counters.rearms += 1;
                        }
                    }
                }
            }
        }
        // A datagram read from a closing session's socket still gets routed (to a new
        // session for its peer), so nothing the kernel delivered is lost.
        self.take_received(c, Source::Session(id));
    }

    /// Arms the receive of every session socket that needs it, while buffers are available.
    pub(super) fn rearm_sessions(&mut self) -> io::Result<()> {
        if self.rearm.is_empty() || self.bufs.available() == 0 {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.rearm);
        for id in pending {
            let Some(entry) = self.sessions.get_mut(id) else {
                continue;
            };
            let Some(sock) = entry.value.sock.as_mut() else {
                continue;
            };
            if sock.recv_armed {
                continue;
            }
            let ud = UserData::new(OpKind::SessionRecv, id.generation, id.slot);
            let entry = opcode::RecvMsgMulti::new(
                types::Fd(sock.fd.as_raw_fd()),
                &**self.recv_msg,
                BUF_GROUP,
            )
            .build()
            .user_data(ud.encode());
            // SAFETY: `recv_msg` is boxed and outlives the ring; the socket stays open until
            // this request's final completion (`closing` keeps it while a cancel is pending).
            unsafe { self.ring.push(&entry) }?;
            sock.recv_armed = true;
            self.session_recvs_armed += 1;
        }
        Ok(())
    }

    /// The idle timer fired: close what has been idle for the whole timeout, re-arm.
    pub(super) fn expire_sessions(&mut self) -> io::Result<()> {
        let mut expired = std::mem::take(&mut self.expired);
        expired.clear();
        self.sessions.expired(self.now_ms, &mut expired);
        for &id in &expired {
            self.close_session(id, CloseReason::Idle);
        }
        self.expired = expired;
        if self.state == State::Running {
            if let Some(due) = self.sessions.next_check() {
                self.arm_tick(due.saturating_sub(self.now_ms))?;
            }
        }
        Ok(())
    }

    /// Arms the idle timer `after_ms` from now (at least 1 ms).
    fn arm_tick(&mut self, after_ms: u64) -> io::Result<()> {
        let after_ms = after_ms.max(1);
        **self.tick_spec = types::Timespec::new()
            .sec(after_ms / 1000)
            .nsec(((after_ms % 1000) * 1_000_000) as u32);
        let entry = opcode::Timeout::new(&**self.tick_spec)
            .build()
            .user_data(UserData::new(OpKind::Tick, 0, 0).encode());
        // SAFETY: `tick_spec` is boxed, outlives the ring and is not rewritten while this
        // timeout is armed (`tick_armed` guards every call).
        unsafe { self.ring.push(&entry) }?;
        self.tick_armed = true;
        Ok(())
    }

    /// Handles letters posted from other threads: deferred replies and forwarded datagrams.
    pub(super) fn read_mail(&mut self) {
        let mut mail = std::mem::take(&mut self.mail);
        std::mem::swap(&mut mail, &mut *self.shared.mailbox.lock());
        for letter in mail.drain(..) {
            match letter {
                Letter::Deferred { session, payload } => self.send_deferred(session, &payload),
                Letter::Forwarded {
                    peer,
                    local,
                    payload,
                } => {
                    if self.mode == SessionMode::None {
                        continue;
                    }
                    let mut payload = Payload::Owned(payload);
                    match self.route_new(peer, local, &mut payload) {
                        Target::Session(id) => self.deliver_to_session(id, peer, local, payload),
                        // Owned elsewhere now (the session closed and moved): one more hop.
                        Target::Forward(owner) => {
                            let payload = payload.to_vec(&self.bufs);
                            let _ = self.fleet.workers[owner].post(Letter::Forwarded {
                                peer,
                                local,
                                payload,
                            });
                        }
                        Target::Refused => {}
                    }
                }
            }
        }
        self.mail = mail;
    }

    fn send_deferred(&mut self, id: SessionId, payload: &[u8]) {
        let factor = self.amplification_factor;
        let Some(entry) = self.sessions.get_mut(id) else {
            self.counters.deferred_dropped += 1;
            return;
        };
        if !entry.value.validated && factor > 0 {
            if payload.len() as u64 > entry.value.budget {
                self.counters.amplification_limited += 1;
                return;
            }
            entry.value.budget -= payload.len() as u64;
        }
        let dest = entry.value.dest(entry.peer, self.fd, None);
        match self.sends.queue_bytes(dest, payload) {
            Ok(_) => self.counters.deferred_sent += 1,
            Err(_) => self.counters.send_dropped += 1,
        }
    }
}
