//! The handler API and the built-in handlers (`--app echo|discard|sockperf`).
//!
//! A handler runs on its worker's thread, one instance per worker, so it needs no locks. It is
//! given each datagram's bytes borrowed straight from the kernel-filled receive buffer (no
//! copy) and a [`Reply`] to answer through; replies are batched and submitted once per loop
//! turn.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::send_pool::{Dest, SendError, SendOptions, SendPool};
use crate::session::{CloseReason, SessionId};
use crate::shared::{Posted, WorkerShared};
use crate::stats::Stats;

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// Who sent it. IPv4 peers of a dual-stack socket appear as plain IPv4.
    pub peer: SocketAddr,
    /// The local address it was sent to, when the socket is bound to a wildcard address; a
    /// reply leaves from it, so a multi-homed host answers from the address it was asked on.
    pub local: Option<IpAddr>,
    /// The payload, borrowed from the receive buffer until the handler returns.
    pub payload: &'a [u8],
    /// Index of the worker (and ring) that received it.
    pub worker: usize,
    /// The ECN codepoint of its IP header (0 Not-ECT, 1 ECT(1), 2 ECT(0), 3 CE), from the
    /// `IP_TOS` / `IPV6_TCLASS` control message; 0 unless `ServerConfig::ecn` asks for it.
    pub ecn: u8,
}

impl<'a> Datagram<'a> {
    /// A datagram from `peer` with no local address, on worker 0, without an ECN mark: for
    /// tests, benchmarks and handlers that call each other (set the other fields after).
    pub fn new(peer: SocketAddr, payload: &'a [u8]) -> Datagram<'a> {
        Datagram {
            peer,
            local: None,
            payload,
            worker: 0,
            ecn: 0,
        }
    }
}

/// Serves datagrams on one worker, statelessly. Create one per worker with the factory given
/// to [`crate::Server::start`]; it lives on that worker's thread and so needs no
/// synchronisation. Every `Handler` is also a [`SessionHandler`] whose state is `()`.
pub trait Handler: 'static {
    /// `true`: a UDP GRO receive (several same-size datagrams of one peer that the kernel
    /// merged) goes to [`Handler::on_train`] whole, as QUIC stacks that take a batch prefer.
    /// `false` (the default): the engine splits it and calls `on_datagram` once per
    /// datagram, pausing between them while no reply slot is free.
    const WHOLE_TRAINS: bool = false;

    /// Called once per received datagram, exactly once, in arrival order for that socket.
    fn on_datagram(&mut self, datagram: &Datagram<'_>, reply: &mut Reply<'_>);

    /// With `WHOLE_TRAINS`: called once per GRO receive of more than one datagram. Every
    /// datagram in `train.payload` is `segment_size` bytes but the last, which may be
    /// shorter. The default hands each to `on_datagram`.
    fn on_train(&mut self, train: &Datagram<'_>, segment_size: usize, reply: &mut Reply<'_>) {
        for payload in train.payload.chunks(segment_size.max(1)) {
            self.on_datagram(&Datagram { payload, ..*train }, reply);
        }
    }

    /// The instant the handler wants [`Handler::on_timer`] called at, if any. Asked after
    /// every loop turn; the worker keeps one timeout armed for it. An instant already past
    /// means "as soon as a reply slot is free" (a handler that stopped sending because the
    /// pool was full resumes that way).
    fn next_timer(&mut self) -> Option<Instant> {
        None
    }

    /// The instant from [`Handler::next_timer`] has come. `reply` has no datagram to answer:
    /// send with [`Reply::send_to`] or [`Reply::send_to_with`].
    fn on_timer(&mut self, now: Instant, reply: &mut Reply<'_>) {
        let _ = (now, reply);
    }

    /// The server is shutting down: every datagram received so far has been handed over, and
    /// what is queued on `reply` now still goes out before the worker exits (a protocol's
    /// goodbye, such as QUIC's CONNECTION_CLOSE). Called once per worker.
    fn on_shutdown(&mut self, now: Instant, reply: &mut Reply<'_>) {
        let _ = (now, reply);
    }
}

/// What a session handler is told about a session.
#[derive(Debug, Clone, Copy)]
pub struct SessionInfo {
    /// The peer (unspecified for the worker-wide session of `SessionMode::None`).
    pub peer: SocketAddr,
    /// The local address the session's first datagram arrived on (wildcard binds).
    pub local: Option<IpAddr>,
    /// Index of the worker that serves the session.
    pub worker: usize,
    /// The session's id in its worker, unique while it is open.
    pub id: SessionId,
    /// The session has its own socket (`connected` or `port-per-client` mode, when one could
    /// be opened).
    pub own_socket: bool,
}

/// Serves peers as sessions with per-session state of the handler's own type.
///
/// With `--sessions shared|connected|port-per-client`, `session_open` runs on a peer's
/// first datagram, `session_datagram` for each datagram with that peer's state, and
/// `session_close` when the
/// session ends (idle, evicted, shutdown). With `--sessions none` there is one worker-wide
/// session: opened at start (peer unspecified) and closed at shutdown.
pub trait SessionHandler: 'static {
    /// The per-session state: made by `session_open`, handed to every callback of the
    /// session, given back by value to `session_close`.
    type State: 'static;
    /// As [`Handler::WHOLE_TRAINS`]: whether GRO trains go to `session_train` whole.
    const WHOLE_TRAINS: bool = false;
    /// A new peer's first datagram arrived (it is passed to `session_datagram` next).
    fn session_open(&mut self, session: &SessionInfo) -> Self::State;
    /// One datagram of the session, exactly once.
    fn session_datagram(
        &mut self,
        state: &mut Self::State,
        datagram: &Datagram<'_>,
        reply: &mut Reply<'_>,
    );
    /// With `WHOLE_TRAINS`: a GRO receive of several datagrams of `segment_size` bytes (the
    /// last may be shorter). The default hands each to `session_datagram`.
    fn session_train(
        &mut self,
        state: &mut Self::State,
        train: &Datagram<'_>,
        segment_size: usize,
        reply: &mut Reply<'_>,
    ) {
        for payload in train.payload.chunks(segment_size.max(1)) {
            self.session_datagram(state, &Datagram { payload, ..*train }, reply);
        }
    }

    /// As [`Handler::next_timer`]: worker-wide, not per session.
    fn next_timer(&mut self) -> Option<Instant> {
        None
    }

    /// As [`Handler::on_timer`].
    fn on_timer(&mut self, now: Instant, reply: &mut Reply<'_>) {
        let _ = (now, reply);
    }

    /// As [`Handler::on_shutdown`]; called before the sessions close.
    fn on_shutdown(&mut self, now: Instant, reply: &mut Reply<'_>) {
        let _ = (now, reply);
    }

    /// The session ended; its socket (if any) is being closed.
    fn session_close(&mut self, state: Self::State, session: &SessionInfo, reason: CloseReason) {
        let _ = (state, session, reason);
    }
}

impl<H: Handler> SessionHandler for H {
    type State = ();
    const WHOLE_TRAINS: bool = H::WHOLE_TRAINS;

    fn session_open(&mut self, _session: &SessionInfo) {}

    #[inline]
    fn session_datagram(&mut self, _: &mut (), datagram: &Datagram<'_>, reply: &mut Reply<'_>) {
        self.on_datagram(datagram, reply)
    }

    #[inline]
    fn session_train(
        &mut self,
        _: &mut (),
        train: &Datagram<'_>,
        segment_size: usize,
        reply: &mut Reply<'_>,
    ) {
        self.on_train(train, segment_size, reply)
    }

    #[inline]
    fn next_timer(&mut self) -> Option<Instant> {
        Handler::next_timer(self)
    }

    fn on_timer(&mut self, now: Instant, reply: &mut Reply<'_>) {
        Handler::on_timer(self, now, reply)
    }

    fn on_shutdown(&mut self, now: Instant, reply: &mut Reply<'_>) {
        Handler::on_shutdown(self, now, reply)
    }
}

/// Why a deferred reply was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeferredError {
    /// The session has closed; nothing was sent.
    SessionClosed,
    /// The worker has stopped.
    WorkerStopped,
}

impl std::fmt::Display for DeferredError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeferredError::SessionClosed => "the session is closed",
            DeferredError::WorkerStopped => "the worker has stopped",
        })
    }
}

impl std::error::Error for DeferredError {}

/// A cloneable, `Send` handle to a session, for replies made later or from another thread
/// (the seed article's `PostQueuedCompletionStatus` + `IO_EX_SEND`). The owning worker is woken
/// through its ring (an eventfd read it keeps armed) and sends from the session's socket; the
/// caller never blocks on it.
#[derive(Clone)]
pub struct SessionHandle {
    pub(crate) worker: Arc<WorkerShared>,
    pub(crate) id: SessionId,
    pub(crate) closed: Arc<AtomicBool>,
}

impl SessionHandle {
    /// Queues `bytes` for the session's peer. Fails at once if the session is known to be
    /// closed; a session that closes while the reply is on its way drops it and counts it
    /// (`deferred_dropped`).
    pub fn send(&self, bytes: &[u8]) -> Result<(), DeferredError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(DeferredError::SessionClosed);
        }
        self.worker
            .post(Posted::DeferredReply {
                session: self.id,
                payload: bytes.to_vec(),
            })
            .map_err(|_| DeferredError::WorkerStopped)
    }

    /// Whether the session has closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("id", &self.id)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The session a datagram belongs to, as the reply path sees it.
pub(crate) struct SessionCtx<'a> {
    pub id: SessionId,
    pub worker: &'a Arc<WorkerShared>,
    /// Created on the first `session_handle()` call; set when the session closes.
    pub closed: &'a mut Option<Arc<AtomicBool>>,
    pub close_requested: bool,
}

/// The way a handler answers. Every reply is queued for the kernel or counted as dropped:
/// nothing is lost silently.
pub struct Reply<'a> {
    pub(crate) pool: &'a mut SendPool,
    pub(crate) counters: &'a mut Stats,
    pub(crate) dest: Dest,
    /// The worker's listening socket, for `send_to` other peers.
    pub(crate) listener_fd: RawFd,
    pub(crate) session: Option<SessionCtx<'a>>,
    /// Bytes that may still be sent for an unvalidated peer (`None`: no limit).
    pub(crate) budget: Option<&'a mut u64>,
    /// The worker's mailbox (`None` in the sans-IO harness, which has no worker).
    pub(crate) worker: Option<&'a Arc<WorkerShared>>,
}

impl<'a> Reply<'a> {
    /// A reply with no datagram to answer (timers, shutdown): it sends only to explicit
    /// destinations, from the worker's listening socket `listener_fd`. Its own destination is
    /// `0.0.0.0:0`, which the pool refuses (`SendError::NoDestination`): `send` and
    /// `send_with` fail here instead of reaching the kernel.
    pub(crate) fn unaddressed(
        pool: &'a mut SendPool,
        counters: &'a mut Stats,
        listener_fd: RawFd,
    ) -> Reply<'a> {
        Reply {
            pool,
            counters,
            dest: Dest {
                fd: listener_fd,
                peer: SocketAddr::from(([0, 0, 0, 0], 0)),
                local: None,
                connected: false,
            },
            listener_fd,
            session: None,
            budget: None,
            worker: None,
        }
    }
}

impl Reply<'_> {
    /// Sends `bytes` back to the datagram's sender (from the session's own socket, if it has
    /// one). In [`Handler::on_timer`] and [`Handler::on_shutdown`] there is no sender:
    /// `SendError::NoDestination` (use [`Reply::send_to`]).
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), SendError> {
        let dest = self.dest;
        self.queue(dest, bytes)
    }

    /// Builds the reply in place: `fill` writes into the send buffer (`max_len()` bytes) and
    /// returns the reply's length. Saves a copy when the reply is computed, not copied. As
    /// [`Reply::send`], `SendError::NoDestination` where there is no datagram to answer.
    pub fn send_with(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> Result<(), SendError> {
        let mark = self.pool.queued_len();
        let result = self.pool.queue(self.dest, fill);
        self.settle(mark, result)
    }

    /// Sends `bytes` to another address from the worker's listening socket (relays, fan-out).
    pub fn send_to(&mut self, peer: SocketAddr, bytes: &[u8]) -> Result<(), SendError> {
        let dest = Dest {
            fd: self.listener_fd,
            peer,
            local: self.dest.local,
            connected: false,
        };
        self.queue(dest, bytes)
    }

    /// Sends what a transport stack built (a QUIC `Transmit`): `fill` writes the payload into
    /// the send buffer (`max_len()` bytes) and returns its length; `options` carry a GSO
    /// segment size (the payload is then one ready-made train, sent as one `SENDMSG` and
    /// never regrouped), a source address and an ECN codepoint. Sent from the listening
    /// socket.
    pub fn send_to_with(
        &mut self,
        peer: SocketAddr,
        options: SendOptions,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<(), SendError> {
        let dest = self.transmit_dest(peer, options.source);
        let mark = self.pool.queued_len();
        let result = self.pool.queue_with(dest, options, fill);
        self.settle(mark, result)
    }

    /// How many datagrams of `segment_size` bytes one [`Reply::send_to_with`] train to `peer`
    /// (from `source`, as in [`SendOptions::source`]) can carry now, at most 64: never more
    /// than `max_len()` holds, and where GSO trains cannot go to `peer` (`--no-gso`, GSO
    /// switched off after an `EIO`, `peer` held after an `EINVAL`: each datagram then takes
    /// a slot of its own) never more than [`Reply::capacity`]. 0 when no slot is free. A transport stack that asks its state machine for no more datagrams
    /// than this (quinn's `poll_transmit(max_datagrams)`) never has a transmit refused for
    /// want of slots after counting it sent.
    pub fn train_room(
        &self,
        peer: SocketAddr,
        source: Option<IpAddr>,
        segment_size: usize,
    ) -> usize {
        self.pool
            .train_room(&self.transmit_dest(peer, source), segment_size)
    }

    /// Whether a [`Reply::send_to_with`] train to `peer` (from `source`) goes out as one GSO
    /// send now, rather than one datagram per slot.
    pub fn trains_to(&self, peer: SocketAddr, source: Option<IpAddr>) -> bool {
        self.pool.trains_to(&self.transmit_dest(peer, source))
    }

    /// Where [`Reply::send_to_with`] sends to `peer` from `source`.
    fn transmit_dest(&self, peer: SocketAddr, source: Option<IpAddr>) -> Dest {
        Dest {
            fd: self.listener_fd,
            peer,
            local: source.or(self.dest.local),
            connected: false,
        }
    }

    fn queue(&mut self, dest: Dest, bytes: &[u8]) -> Result<(), SendError> {
        let mark = self.pool.queued_len();
        let result = self.pool.queue_bytes(dest, bytes);
        self.settle(mark, result)
    }

    /// Counts a failed reply, or charges a queued one to the peer's anti-amplification budget
    /// (withdrawing it when the budget is spent: whatever the handler asks, an unvalidated
    /// peer never gets more than its budget). `mark` is the pool's `queued_len()` from before
    /// the reply was queued: a train spread over several slots (no GSO) is charged and
    /// withdrawn whole, never only its last slot.
    fn settle(
        &mut self,
        mark: crate::send_pool::QueueMark,
        result: Result<usize, SendError>,
    ) -> Result<(), SendError> {
        match result {
            Err(e) => {
                self.counters.send_dropped += 1;
                Err(e)
            }
            Ok(len) => match self.budget.as_deref_mut() {
                Some(budget) if (len as u64) > *budget => {
                    self.pool.cancel_since(mark);
                    self.counters.amplification_limited += 1;
                    Err(SendError::AmplificationLimit)
                }
                Some(budget) => {
                    *budget -= len as u64;
                    Ok(())
                }
                None => Ok(()),
            },
        }
    }

    /// Replies that can still be queued in this loop turn. The engine guarantees at least one
    /// when it calls a handler.
    pub fn capacity(&self) -> usize {
        self.pool.free_slots()
    }

    /// The longest reply a send slot holds (`--max-datagram`).
    pub fn max_len(&self) -> usize {
        self.pool.slot_capacity()
    }

    /// Records that this datagram was bad input (counted as `bad_input`).
    pub fn count_bad_input(&mut self) {
        self.counters.bad_input += 1;
    }

    /// A handle for replying to this datagram's session later or from another thread. `None`
    /// with `--sessions none`.
    pub fn session_handle(&mut self) -> Option<SessionHandle> {
        let ctx = self.session.as_mut()?;
        let closed = ctx
            .closed
            .get_or_insert_with(|| Arc::new(AtomicBool::new(false)))
            .clone();
        Some(SessionHandle {
            worker: ctx.worker.clone(),
            id: ctx.id,
            closed,
        })
    }

    /// The worker's mailbox, for a handler that queues work of its own and must be woken
    /// from other threads (`quic::Remote`). `None` without a worker (the harness).
    #[cfg_attr(not(feature = "quic"), allow(dead_code))]
    pub(crate) fn worker(&self) -> Option<&Arc<WorkerShared>> {
        self.worker
    }

    /// Closes this datagram's session once the handler returns (`session_close` with
    /// [`CloseReason::HandlerClosed`]). No effect with `--sessions none`.
    pub fn close_session(&mut self) {
        if let Some(ctx) = self.session.as_mut() {
            ctx.close_requested = true;
        }
    }
}
