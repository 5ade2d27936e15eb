//! Session lifecycle inside a worker: opening a session (and its own socket in `connected`
//! and `port-per-client` modes), closing it, retiring its socket without losing what is
//! queued on it, idle expiry on a timeout SQE, and work posted from other threads (deferred
//! replies, forwarded datagrams). Routing rules are in `router`, the bookkeeping in
//! `crate::session`; both are sans-IO.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;

use super::receive::Pending;
use super::router::{SessionEntry, SessionSock, Source};
use super::{Posted, Worker};
use crate::config::SessionMode;
use crate::cookie;
use crate::handler::{SessionHandler, SessionInfo};
use crate::op::UserData;
use crate::ring::{has_more, Completion};
use crate::send_pool::Dest;
use crate::session::{CloseReason, Refusal, SessionId};
use crate::session_socket;

/// Datagrams read from a retiring socket at most, per read.
const RETIRE_READ_LIMIT: usize = 1024;

/// Per-client sockets on their way out, and the settings for new ones.
pub(super) struct SessionSockets {
    /// Sockets whose receive is being cancelled, by session; retired on its final completion.
    cancelling: HashMap<SessionId, OwnedFd>,
    /// Sockets no receive uses any more: what they hold is read into the backlog this turn.
    retiring: Vec<OwnedFd>,
    /// Sockets read and waiting to be closed. Replies already pushed may still name them:
    /// they stay open until the kernel has consumed every queued entry (the kernel resolves
    /// a descriptor number when it issues the request), so a number reused by a new socket
    /// never receives someone else's reply (`closable`).
    parked: Vec<OwnedFd>,
    /// Sessions whose socket needs its receive armed.
    rearm: Vec<SessionId>,
    expired: Vec<SessionId>,
    max_connected: usize,
    recv_buffer: usize,
}

impl SessionSockets {
    pub fn new(max_connected: usize, recv_buffer: usize) -> SessionSockets {
        SessionSockets {
            cancelling: HashMap::new(),
            retiring: Vec::new(),
            parked: Vec::new(),
            rearm: Vec::new(),
            expired: Vec::new(),
            max_connected,
            recv_buffer,
        }
    }

    /// Sockets wait to be read or closed: the loop must not sleep before it has done so.
    pub fn busy(&self) -> bool {
        !self.retiring.is_empty() || !self.parked.is_empty()
    }

    /// Parks a socket that has been read: it closes once no queued entry can name it.
    fn park(&mut self, fd: OwnedFd) {
        self.parked.push(fd);
    }

    /// The parked sockets that may be closed now, given the ring's `unsubmitted` entries:
    /// every one once the kernel has consumed all that was pushed (each reply naming a
    /// parked socket was pushed in the turn that parked it, and no later one can name it:
    /// its session is gone), none while an entry is still queued (the kernel may have taken
    /// only part of the queue, or none of it: `Ring::submit_and_wait`), since that entry may
    /// name one and would reach whatever socket reuses the number.
    fn closable(&mut self, unsubmitted: usize) -> Vec<OwnedFd> {
        if unsubmitted > 0 {
            return Vec::new();
        }
        std::mem::take(&mut self.parked)
    }
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

    /// Sends a Retry from the listening socket, if the datagram that asked for it was large
    /// enough that the Retry stays within the anti-amplification factor.
    pub(super) fn send_retry(&mut self, peer: SocketAddr, local: Option<IpAddr>, received: usize) {
        let Some(jar) = self.server.cookies.as_ref() else {
            return;
        };
        if self.amplification_factor > 0
            && cookie::PREFIX_LEN as u64 > self.amplification_factor * received as u64
        {
            self.stats.amplification_limited += 1;
            return;
        }
        let message = cookie::retry_message(&jar.mint(&peer, (self.now_ms / 1000) as u32));
        let dest = Dest {
            fd: self.fd,
            peer,
            local,
            connected: false,
        };
        match self.io.sends.queue_bytes(dest, &message) {
            Ok(_) => self.stats.retries_sent += 1,
            Err(_) => self.stats.send_dropped += 1,
        }
    }

    /// Admits and opens a session for `peer`, with its own socket in the modes that have one
    /// (falling back to none, counted, when descriptors or `--max-connected` run out).
    pub(super) fn open_session(
        &mut self,
        peer: SocketAddr,
        local: Option<IpAddr>,
        validated: bool,
    ) -> Option<SessionId> {
        if !self.running() {
            // Shutdown has closed the sessions: the datagram that asked for one is dropped.
            self.stats.shutdown_dropped += 1;
            return None;
        }
        if let Err(refusal) = self.router.sessions.admit(&peer, self.now_ms) {
            match refusal {
                Refusal::WorkerFull => self.stats.refused_worker_full += 1,
                Refusal::TotalFull => self.stats.refused_total_full += 1,
                Refusal::RateLimited => self.stats.refused_rate += 1,
                Refusal::SourceFull => self.stats.refused_source += 1,
            }
            return None;
        }
        let sock = self.open_session_socket(peer, local);
        let own_socket = sock.is_some();
        let id = self.router.sessions.insert(
            peer,
            self.now_ms,
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
            worker: self.id,
            id,
            own_socket,
        };
        let state = self.handler.session_open(&info);
        if let Some(entry) = self.router.sessions.get_mut(id) {
            entry.value.state = Some(state);
        }
        self.stats.sessions_opened += 1;
        if own_socket {
            self.socks.rearm.push(id);
        }
        // Not while draining: a new timer would hold the drain open until it fired.
        if !self.io.ledger.tick_armed && self.serving() {
            let idle = self.router.sessions.limits().idle_timeout_ms;
            if let Err(e) = self.io.arm_tick(idle) {
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
        let total = &self.server.connected_total;
        if connected && total.fetch_add(1, Ordering::Relaxed) >= self.socks.max_connected {
            total.fetch_sub(1, Ordering::Relaxed);
            self.stats.connected_cap += 1;
            return None;
        }
        let port = if connected {
            self.socket.local_addr.port()
        } else {
            0
        };
        let result = match session_socket::local_for(self.socket.local_addr, local, peer, port) {
            Some(bind) => session_socket::open(bind, peer, self.socks.recv_buffer),
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
                    total.fetch_sub(1, Ordering::Relaxed);
                }
                if session_socket::is_fd_exhaustion(&e) {
                    self.stats.fd_exhausted += 1;
                } else {
                    self.stats.session_socket_errors += 1;
                }
                if let Some(held_back) = self.socket_log.check() {
                    tracing::warn!(worker = self.id, %peer, error = %e, held_back, "per-client socket not opened; serving the peer on the shared socket");
                }
                None
            }
        }
    }

    /// Ends a session: tells the handler, marks its handles closed and starts retiring its
    /// socket (cancelling the socket's receive first; the socket is retired on the final
    /// completion, so the kernel never writes for a socket number that was reused). Routes
    /// nothing: what the socket still holds is read later in the turn (`retire_sockets`).
    pub(super) fn close_session(&mut self, id: SessionId, reason: CloseReason) {
        let Some(entry) = self.router.sessions.remove(id) else {
            return;
        };
        let peer = entry.peer;
        let session = entry.value;
        if let Some(closed) = &session.closed {
            closed.store(true, Ordering::Release);
        }
        self.router.abandon(peer, &self.server);
        match reason {
            CloseReason::Idle => self.stats.closed_idle += 1,
            CloseReason::HandlerClosed => self.stats.closed_by_handler += 1,
            CloseReason::Shutdown => self.stats.closed_shutdown += 1,
        }
        let info = SessionInfo {
            peer,
            local: session.local,
            worker: self.id,
            id,
            own_socket: session.sock.is_some(),
        };
        if let Some(state) = session.state {
            self.handler.session_close(state, &info, reason);
        }
        let Some(sock) = session.sock else {
            return;
        };
        if sock.connected {
            self.server.connected_total.fetch_sub(1, Ordering::Relaxed);
        }
        if !sock.recv_armed {
            self.socks.retiring.push(sock.fd);
            return;
        }
        let target = UserData::new(crate::op::OpKind::SessionRecv, id.generation, id.slot);
        if let Err(e) = self.io.cancel(target) {
            // Without a cancel the receive stays armed; the descriptor stays open in
            // `cancelling` so the kernel never reads into a reused socket number.
            tracing::error!(worker = self.id, error = %e, "cannot cancel a session receive");
        }
        self.socks.cancelling.insert(id, sock.fd);
    }

    /// Reads what the turn's retired sockets still hold into the backlog (a peer that kept
    /// sending while its session closed gets a new session instead of silence) and parks
    /// them until the sends naming them are submitted. Returns whether it added datagrams.
    pub(super) fn retire_sockets(&mut self) -> bool {
        let mut added = false;
        for fd in std::mem::take(&mut self.socks.retiring) {
            let fd = self.requeue_held(fd);
            added = true;
            self.socks.park(fd);
        }
        added
    }

    /// Closes the parked sockets once the kernel has taken every queued entry (the replies
    /// naming them were pushed in the turn that parked them), reading each one last time
    /// right before `close()`. Only a datagram that arrives in the microsecond between that
    /// read and `close()` is lost; the peer's retransmission then reaches the listener.
    /// While entries are still queued they stay parked, and `busy` keeps the loop entering
    /// the kernel without sleeping until it has taken them.
    pub(super) fn close_parked_sockets(&mut self) {
        let unsubmitted = self.io.ring().unsubmitted();
        for fd in self.socks.closable(unsubmitted) {
            drop(self.requeue_held(fd));
        }
    }

    /// Moves what is queued on `fd` into the backlog, routed as if it reached the listener;
    /// datagrams longer than `--max-datagram` are counted as truncated, as on the receive
    /// path.
    fn requeue_held(&mut self, fd: OwnedFd) -> OwnedFd {
        let (fd, drained) = session_socket::drain(fd, self.max_datagram, RETIRE_READ_LIMIT);
        self.stats.truncated += drained.truncated;
        for (peer, payload) in drained.datagrams {
            self.stats.rx_datagrams += 1;
            self.stats.rx_bytes += payload.len() as u64;
            self.backlog.push_back(Pending::Owned {
                peer,
                local: None,
                payload,
                source: Source::Listener,
            });
        }
        fd
    }

    pub(super) fn close_all_sessions(&mut self) {
        for id in self.router.sessions.ids() {
            self.close_session(id, CloseReason::Shutdown);
        }
        if let Some(state) = self.stateless.take() {
            let info = self.stateless_info();
            self.handler
                .session_close(state, &info, CloseReason::Shutdown);
        }
    }

    /// A completion of a session socket's multishot receive.
    pub(super) fn on_session_recv(&mut self, ud: UserData, c: Completion) {
        let id = SessionId {
            slot: ud.slot,
            generation: ud.generation,
        };
        if !has_more(c.flags()) {
            let ledger = &mut self.io.ledger;
            ledger.session_recvs = ledger.session_recvs.saturating_sub(1);
            if let Some(fd) = self.socks.cancelling.remove(&id) {
                self.socks.retiring.push(fd);
            } else if let Some(entry) = self.router.sessions.get_mut(id) {
                if let Some(sock) = entry.value.sock.as_mut() {
                    sock.recv_armed = false;
                    if self.serving() {
                        self.socks.rearm.push(id);
                        if c.result() >= 0 || c.result() == -libc::ENOBUFS {
                            self.stats.rearms += 1;
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
        if self.socks.rearm.is_empty() || self.io.bufs.available() == 0 {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.socks.rearm);
        for id in pending {
            let Some(entry) = self.router.sessions.get_mut(id) else {
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
            self.io.arm_session_recv(sock.fd.as_raw_fd(), id)?;
            sock.recv_armed = true;
        }
        Ok(())
    }

    /// The idle timer fired: close what has been idle for the whole timeout, re-arm.
    pub(super) fn expire_sessions(&mut self) -> io::Result<()> {
        let mut expired = std::mem::take(&mut self.socks.expired);
        expired.clear();
        self.router.sessions.expired(self.now_ms, &mut expired);
        for &id in &expired {
            self.close_session(id, CloseReason::Idle);
        }
        self.socks.expired = expired;
        if self.serving() {
            if let Some(due) = self.router.sessions.next_check() {
                self.io.arm_tick(due.saturating_sub(self.now_ms))?;
            }
        }
        Ok(())
    }

    /// Takes the work other threads posted: deferred replies are queued, forwarded
    /// datagrams join the backlog.
    pub(super) fn read_posted(&mut self) {
        let mut posted = std::mem::take(&mut self.posted);
        self.shared.collect(&mut posted);
        for work in posted.drain(..) {
            match work {
                Posted::DeferredReply { session, payload } => self.send_deferred(session, &payload),
                Posted::ForwardedDatagram {
                    peer,
                    local,
                    payload,
                } => self.backlog.push_back(Pending::Owned {
                    peer,
                    local,
                    payload,
                    source: Source::Forwarded,
                }),
            }
        }
        self.posted = posted;
    }

    fn send_deferred(&mut self, id: SessionId, payload: &[u8]) {
        let factor = self.amplification_factor;
        let Some(entry) = self.router.sessions.get_mut(id) else {
            self.stats.deferred_dropped += 1;
            return;
        };
        if !entry.value.validated && factor > 0 {
            if payload.len() as u64 > entry.value.budget {
                self.stats.amplification_limited += 1;
                return;
            }
            entry.value.budget -= payload.len() as u64;
        }
        let dest = entry.value.dest(entry.peer, self.fd, None);
        match self.io.sends.queue_bytes(dest, payload) {
            Ok(_) => self.stats.deferred_sent += 1,
            Err(_) => self.stats.send_dropped += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    use io_uring::{opcode, squeue, types};

    use super::*;
    use crate::ring::Ring;

    /// An SQE flag bit no kernel defines (include/uapi/linux/io_uring.h stops at bit 6):
    /// `io_init_req` refuses the entry with `-EINVAL`, and `io_submit_sqes` stops there,
    /// leaving every later entry in the queue, as an `EBUSY` or `EAGAIN` enter leaves all.
    const UNDEFINED_SQE_FLAG: u8 = 1 << 7;

    /// Issue 14, defect 6: a parked session socket was closed after the next enter whatever
    /// that enter had submitted, so a reply still queued behind it named a descriptor number
    /// that a new session's socket could take, and went to that socket's peer. Now a parked
    /// socket closes only once the kernel has consumed every queued entry.
    #[test]
    fn a_parked_socket_outlives_every_queued_entry_naming_it() {
        let Ok(mut ring) = Ring::new(8, 16) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "io_uring unavailable"
            );
            eprintln!("skipped: io_uring unavailable");
            return;
        };
        let old_peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let new_peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        new_peer.set_nonblocking(true).unwrap();
        // The closing session's socket, connected to its peer, and a reply to it queued
        // behind an entry the kernel refuses.
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(old_peer.local_addr().unwrap()).unwrap();
        let number = sock.as_raw_fd();
        static PAYLOAD: &[u8] = b"for the old peer";
        let refused = opcode::Nop::new()
            .build()
            .flags(squeue::Flags::from_bits_retain(UNDEFINED_SQE_FLAG))
            .user_data(1);
        let reply = opcode::Send::new(types::Fd(number), PAYLOAD.as_ptr(), PAYLOAD.len() as u32)
            .build()
            .user_data(2);
        // SAFETY: the Nop carries no pointer; the Send points at a static.
        unsafe {
            ring.push(&refused).unwrap();
            ring.push(&reply).unwrap();
        }
        let mut socks = SessionSockets::new(0, 0);
        socks.park(OwnedFd::from(sock));
        ring.submit().unwrap();
        assert_eq!(
            ring.unsubmitted(),
            1,
            "the kernel stops at the refused entry; the reply stays queued"
        );
        // What the worker does next turn: close what may be closed, then open a socket for
        // a new peer, which takes the lowest free descriptor number.
        for fd in socks.closable(ring.unsubmitted()) {
            drop(fd);
        }
        let newcomer = UdpSocket::bind("127.0.0.1:0").unwrap();
        newcomer.connect(new_peer.local_addr().unwrap()).unwrap();
        assert_ne!(
            newcomer.as_raw_fd(),
            number,
            "the parked socket was closed with a reply naming it still queued"
        );
        // The next enter takes the reply; it leaves from the parked socket, to its peer.
        let mut completions = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !completions.iter().any(|c: &Completion| c.user_data() == 2) {
            assert!(Instant::now() < deadline, "no completion for the reply");
            ring.submit_and_wait(1, Some(Duration::from_millis(100)))
                .unwrap();
            ring.drain(&mut completions);
        }
        assert_eq!(ring.unsubmitted(), 0);
        let sent = completions.iter().find(|c| c.user_data() == 2).unwrap();
        assert_eq!(sent.result(), PAYLOAD.len() as i32);
        old_peer
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 64];
        let n = old_peer.recv(&mut buf).expect("the reply reaches its peer");
        assert_eq!(&buf[..n], PAYLOAD);
        assert!(new_peer.recv(&mut buf).is_err(), "nothing for the new peer");
        // Nothing is queued any more: now it closes.
        assert_eq!(socks.closable(ring.unsubmitted()).len(), 1);
        assert!(!socks.busy());
    }
}
