//! One worker: a thread that owns a SO_REUSEPORT socket and its io_uring and runs the
//! completion loop (submit and wait, drain a batch of completions, one `match` on the
//! operation kind, hand datagrams to the handler, flush replies).
//!
//! The parts, in the order data flows through them:
//! - `io`: the ring and every byte of memory the kernel touches, the ledger of operations in
//!   flight, and the teardown order that keeps that memory alive until the kernel is done.
//! - `receive`: the backlog of received datagrams (each holding its buffer) and the handler
//!   calls that consume it, with backpressure when reply slots run out.
//! - `router`: which session a datagram belongs to (sans-IO, unit-tested).
//! - `sessions`: opening and closing sessions and their sockets, idle expiry, posted work.
//!
//! Control flows one way: completions fill the backlog, the backlog is handed to the handler,
//! the handler's requests (replies, closing its session) are queued, and the loop carries them
//! out at the end of the turn. Closing a session never routes a datagram; what its socket
//! still held goes back into the backlog for the next pass.

mod handover;
mod io;
mod receive;
mod router;
mod sessions;
mod shared;
mod timer;

use std::collections::VecDeque;
use std::io as stdio;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::buf_ring::BufRing;
use crate::config::{ServerConfig, SessionMode};
use crate::datagram::{CONTROL_LEN, RECVMSG_OUT_LEN, SOCKADDR_IN6_LEN, SOCKADDR_IN_LEN};
use crate::handler::{Reply, SessionHandler};
use crate::op::{OpKind, UserData};
use crate::ring::{has_more, Completion, Ring};
use crate::send_pool::{send_errno, SendPool};
use crate::session::{Limits, Millis, SessionTable};
use crate::socket::BoundSocket;
use crate::stats::Stats;

use io::Io;
use receive::Pending;
use router::{Router, Source};
use sessions::SessionSockets;
use timer::{HandlerTimer, TimerStep};

pub use shared::{Posted, ServerShared, WorkerShared};

/// A turn that drained at least this many completions counts as busy: the next wait may
/// hold out for a batch (`--batch-wait`).
const BUSY_TURN: usize = 8;

/// Calls of the handler's timer per loop turn at most: a handler whose deadline stays in the
/// past cannot keep the worker from its completions.
const TIMER_CALLS_PER_TURN: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// The listener was handed over (`handover`): sessions with sockets of their own are
    /// still served, nothing new arrives through the listener.
    Released,
    Draining {
        deadline: Instant,
    },
}

/// Limits an error log line to one per second, counting what it held back.
struct LogLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    fn new() -> LogLimit {
        LogLimit {
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since last time)` when a line may be logged now.
    fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < Duration::from_secs(1) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// How the loop waits.
struct Pacing {
    shutdown_timeout: Duration,
    batch_wait: Option<Duration>,
    batch_size: usize,
    busy_poll: Option<Duration>,
}

pub struct Worker<H: SessionHandler> {
    io: Io,
    socket: BoundSocket,
    fd: RawFd,
    id: usize,
    handler: H,
    shared: Arc<WorkerShared>,
    server: Arc<ServerShared>,
    stats: Stats,
    backlog: VecDeque<Pending>,
    completions: Vec<Completion>,
    /// Completions the last turn drained (`completions` is emptied as they are dispatched).
    turn_completions: usize,
    name_space: usize,
    control_space: usize,
    backpressured: bool,
    state: State,
    pacing: Pacing,
    recv_log: LogLimit,
    send_log: LogLimit,
    socket_log: LogLimit,
    mode: SessionMode,
    router: Router<H::State>,
    /// The one worker-wide state of `--sessions none`.
    stateless: Option<H::State>,
    socks: SessionSockets,
    posted: Vec<Posted>,
    amplification_factor: u64,
    /// Shutdown has closed every session (after answering what was received).
    sessions_closed: bool,
    /// `--max-datagram`: longer datagrams are counted as truncated, even inside a GRO train.
    max_datagram: usize,
    started: Instant,
    now_ms: Millis,
    /// `ServerConfig::ecn`: receives carry the TOS / traffic class byte.
    ecn: bool,
    /// The handler's timer (`SessionHandler::next_timer`).
    timer: HandlerTimer,
    /// The handler's deadline had passed at the end of the last turn and a slot was free:
    /// the next wait does not block.
    timer_ready: bool,
}

impl<H: SessionHandler> Worker<H> {
    /// Builds the ring, buffers and pool for `socket`. Runs on the worker's own thread
    /// (SINGLE_ISSUER rings belong to the thread that creates them).
    pub fn new(
        id: usize,
        socket: BoundSocket,
        config: &ServerConfig,
        handler: H,
        shared: Arc<WorkerShared>,
        server: Arc<ServerShared>,
    ) -> stdio::Result<Worker<H>> {
        // Per-client sockets may be IPv4 under an IPv6 listener: always leave room for the
        // larger address when sessions have their own sockets.
        let own_sockets = matches!(
            config.sessions,
            SessionMode::Connected | SessionMode::PortPerClient
        );
        let name_space = if socket.is_v6 || own_sockets {
            SOCKADDR_IN6_LEN
        } else {
            SOCKADDR_IN_LEN
        };
        let control_space = if socket.wants_pktinfo || socket.gro || config.ecn {
            CONTROL_LEN
        } else {
            0
        };
        // A GRO receive holds up to 64 KiB of merged datagrams whatever --max-datagram says
        // (a shorter buffer would truncate the train). The buffers are anonymous memory: a
        // page is resident only once a receive has written into it.
        let payload_room = if socket.gro {
            config.max_datagram.max(usize::from(u16::MAX))
        } else {
            config.max_datagram
        };
        let buf_len = RECVMSG_OUT_LEN + name_space + control_space + payload_room;
        let buffers = usize::from(config.buffers);
        // Every buffer and every send slot can have a completion outstanding at once, plus
        // the wake-up read, the tick, cancels and slack: size the completion queue for all of
        // them. Session sockets only add receives that share the same buffers.
        let cq_entries = (buffers + config.send_slots + 256).next_power_of_two() as u32;
        let sq_entries = 512u32.min(cq_entries);
        let ring = Ring::new(sq_entries, cq_entries)
            .map_err(|e| stdio::Error::new(e.kind(), crate::ring::explain_setup_error(&e)))?;
        let bufs = BufRing::new(config.buffers, buf_len as u32, io::BUF_GROUP)?;
        let sends = SendPool::new(
            config.send_slots,
            config.max_datagram,
            socket.is_v6,
            config.gso,
        )?;
        let fd = socket.socket.as_raw_fd();
        let io = Io::new(
            ring,
            bufs,
            sends,
            name_space,
            control_space,
            fd,
            shared.wake_fd.as_raw_fd(),
        )?;
        let limits = Limits {
            idle_timeout_ms: config.idle_timeout.as_millis().max(1) as Millis,
            max_sessions_per_worker: config.max_sessions_per_worker,
            max_sessions: config.max_sessions,
            max_new_per_sec: config.max_new_sessions_per_sec,
            max_per_source: config.max_sessions_per_source,
        };
        let sessions = SessionTable::new(limits, server.sessions_total.clone());
        let started = server.started;
        let mut worker = Worker {
            io,
            socket,
            fd,
            id,
            handler,
            shared,
            server,
            stats: Stats::default(),
            backlog: VecDeque::with_capacity(buffers),
            completions: Vec::with_capacity(cq_entries as usize),
            turn_completions: 0,
            name_space,
            control_space,
            backpressured: false,
            state: State::Running,
            pacing: Pacing {
                shutdown_timeout: config.shutdown_timeout,
                batch_wait: config.batch_wait,
                batch_size: config.batch_size,
                busy_poll: config.busy_poll,
            },
            recv_log: LogLimit::new(),
            send_log: LogLimit::new(),
            socket_log: LogLimit::new(),
            mode: config.sessions,
            router: Router::new(sessions, id),
            stateless: None,
            socks: SessionSockets::new(config.max_connected, config.recv_buffer_bytes.min(1 << 20)),
            posted: Vec::new(),
            amplification_factor: u64::from(config.amplification_factor),
            sessions_closed: false,
            max_datagram: config.max_datagram,
            started,
            now_ms: 0,
            ecn: config.ecn,
            timer: HandlerTimer::default(),
            timer_ready: false,
        };
        if worker.mode == SessionMode::None {
            let info = worker.stateless_info();
            worker.stateless = Some(worker.handler.session_open(&info));
        }
        Ok(worker)
    }

    pub fn task_run_mode(&self) -> crate::ring::TaskRunMode {
        self.io.task_run_mode()
    }

    pub fn recv_buffer(&self) -> usize {
        self.socket.recv_buffer
    }

    /// Runs until shutdown is requested and everything in flight has completed; returns the
    /// final counters.
    pub fn run(mut self) -> stdio::Result<Stats> {
        let result = self.run_loop();
        // From now on posts are refused; what was posted before is handled here: its session
        // has closed (shutdown closes them all), so it is counted, never lost silently.
        self.stats.deferred_dropped += self.shared.close().len() as u64;
        self.shared.counters.publish(&self.stats);
        result.map(|()| self.stats)
    }

    fn run_loop(&mut self) -> stdio::Result<()> {
        self.io.arm_wake()?;
        self.io.arm_recv()?;
        loop {
            self.wait()?;
            // One clock read per turn: session activity is stamped with it, no syscall.
            self.now_ms = self.started.elapsed().as_millis() as Millis;
            // Parked sockets close once the kernel has taken every queued entry (the sends
            // naming them were pushed in the turn that parked them).
            self.close_parked_sockets();
            let mut completions = std::mem::take(&mut self.completions);
            completions.clear();
            self.io.ring().drain(&mut completions);
            self.turn_completions = completions.len();
            // Each completion is dispatched by value, once: one that names a buffer is spent
            // taking it.
            for c in completions.drain(..) {
                self.dispatch(c)?;
            }
            self.completions = completions;
            self.process_backlog();
            // Closed sessions' sockets: what they still hold joins the backlog.
            if self.retire_sockets() {
                self.process_backlog();
            }
            self.service_timer()?;
            // Shutting down, with everything received answered: the handler's goodbyes
            // (`on_shutdown`) are queued here, so that this turn's flush sends them.
            self.close_sessions_when_drained();
            self.flush_sends();
            self.io.bufs.publish();
            if self.serving() {
                if self.state == State::Running
                    && !self.io.ledger.recv_armed
                    && self.io.bufs.available() > 0
                {
                    self.stats.rearms += 1;
                    self.io.arm_recv()?;
                }
                self.rearm_sessions()?;
            }
            self.end_when_released_and_idle()?;
            self.stats.sessions_open = self.router.sessions.len() as u64;
            self.shared.counters.publish(&self.stats);
            if let State::Draining { deadline } = self.state {
                if self.sessions_closed
                    && self.io.in_flight() == 0
                    && self.backlog.is_empty()
                    && !self.socks.busy()
                {
                    // Push out anything the last turn queued (the replies were counted as
                    // queued, the kernel must see them).
                    self.io.submit()?;
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        worker = self.id,
                        in_flight = self.io.in_flight(),
                        "shutdown timed out with operations in flight; their buffers are leaked, not freed"
                    );
                    return Ok(());
                }
            }
        }
    }

    /// Submits the turn's entries and waits for completions, unless work is ready without
    /// them (datagrams in the backlog with reply slots free, sockets to close).
    fn wait(&mut self) -> stdio::Result<()> {
        let ready = (!self.backlog.is_empty() && self.io.sends.free_slots() > 0)
            || self.socks.busy()
            || (self.timer_ready && self.io.sends.free_slots() > 0);
        let (want, timeout) = match (self.state, self.pacing.batch_wait) {
            _ if ready => (0, None),
            (State::Running | State::Released, None) => (1, None),
            // Gather a batch only while batches are coming: at low load a timed wait
            // would fire its timer for nothing on every turn.
            (State::Running | State::Released, Some(wait))
                if self.turn_completions >= BUSY_TURN =>
            {
                (self.pacing.batch_size, Some(wait))
            }
            (State::Running | State::Released, Some(_)) => (1, None),
            // While draining, wake up to notice the deadline even if nothing completes.
            (State::Draining { .. }, _) => (1, Some(Duration::from_millis(20))),
        };
        if want == 1 && timeout.is_none() && self.serving() && self.spin()? {
            return Ok(());
        }
        self.stats.enters += 1;
        self.io.submit_and_wait(want, timeout)
    }

    /// `--busy-poll`: after a busy turn, poll for completions without sleeping for up to the
    /// configured time before the blocking wait. Each poll is an `io_uring_enter` with a zero
    /// timeout, which runs the ring's deferred work (the receives) and returns at once. While
    /// the worker polls it never sleeps, so senders pay no wake-up; the price is a core kept
    /// busy for that long after each burst. Returns whether completions arrived.
    fn spin(&mut self) -> stdio::Result<bool> {
        let Some(budget) = self.pacing.busy_poll else {
            return Ok(false);
        };
        if self.turn_completions == 0 {
            return Ok(false); // idle: do not burn a core waiting for nothing
        }
        let until = Instant::now() + budget;
        loop {
            self.stats.enters += 1;
            self.io.submit_and_wait(1, Some(Duration::ZERO))?;
            if self.io.ring().has_completions() {
                return Ok(true);
            }
            if Instant::now() >= until {
                return Ok(false);
            }
        }
    }

    /// The completion table: one arm per operation kind.
    fn dispatch(&mut self, c: Completion) -> stdio::Result<()> {
        let Some(ud) = UserData::decode(c.user_data()) else {
            // We never submit kind 0 or an unknown kind: this is a bug somewhere, not input.
            self.stats.stale_completions += 1;
            tracing::error!(
                user_data = c.user_data(),
                "completion with an unknown user_data"
            );
            return Ok(());
        };
        match ud.kind {
            OpKind::Recv => {
                if !has_more(c.flags()) && ud.generation == self.io.ledger.recv_generation {
                    self.io.ledger.recv_armed = false;
                }
                self.take_received(c, Source::Listener);
            }
            OpKind::SessionRecv => self.on_session_recv(ud, c),
            OpKind::Send => self.on_send(ud, c),
            OpKind::Wake => {
                self.io.ledger.wake_armed = false;
                self.read_posted();
                if self.shared.shutdown.load(Ordering::Acquire) {
                    self.begin_drain()?;
                } else {
                    if self.shared.release.load(Ordering::Acquire) {
                        self.release_listener()?;
                    }
                    if self.serving() {
                        self.io.arm_wake()?;
                    }
                }
            }
            OpKind::Tick => {
                self.io.ledger.tick_armed = false;
                self.expire_sessions()?;
            }
            OpKind::Timer => {
                // Fired (-ETIME) or cancelled: either way the timeout is no longer armed. A
                // stale generation cannot occur (one armed at a time), but is harmless.
                if ud.generation == self.io.ledger.timer_generation {
                    self.io.ledger.timer_armed = false;
                    self.timer.fired();
                }
            }
            OpKind::TimerUpdate => {
                // 0, or -ENOENT when the timeout had fired first: nothing else to do.
                self.io.ledger.timer_updating = false;
                self.timer.updated();
            }
            OpKind::Cancel => self.io.ledger.cancels = self.io.ledger.cancels.saturating_sub(1),
        }
        Ok(())
    }

    fn on_send(&mut self, ud: UserData, c: Completion) {
        match self.io.sends.complete(ud) {
            None => self.stats.stale_completions += 1,
            Some(done) if c.result() < 0 => {
                let segments = u64::from(done.segments);
                self.stats.send_errors += segments;
                let errno = -c.result();
                // A kernel or device that cannot segment says EIO or EINVAL to a train: stop
                // building trains (one log line) and carry on with plain sends.
                if segments > 1 && (errno == libc::EIO || errno == libc::EINVAL) {
                    self.stats.gso_refused += 1;
                }
                if segments > 1
                    && (errno == libc::EIO || errno == libc::EINVAL)
                    && self.io.sends.gso()
                {
                    self.io.sends.disable_gso();
                    tracing::warn!(worker = self.id, error = %send_errno(c.result()), "UDP GSO refused; sending datagrams one by one");
                } else if let Some(held_back) = self.send_log.check() {
                    tracing::warn!(worker = self.id, error = %send_errno(c.result()), held_back, "send failed");
                }
            }
            Some(done) => {
                self.stats.tx_datagrams += u64::from(done.segments);
                self.stats.tx_bytes += c.result() as u64;
                if done.segments > 1 {
                    self.stats.gso_trains += 1;
                }
            }
        }
    }

    /// The handler's last chance to queue replies (`on_shutdown`): they are flushed and
    /// completed before the worker exits, like every other reply.
    fn tell_handler_shutdown(&mut self) {
        let mut reply = Reply::unaddressed(&mut self.io.sends, &mut self.stats, self.fd);
        self.handler.on_shutdown(Instant::now(), &mut reply);
    }

    /// Asks the handler when it wants its timer and carries out the step (see `timer`): calls
    /// `on_timer` when the instant has passed and a reply slot is free, else arms or brings
    /// forward the one timeout. Not while draining: shutdown closes the handler's state.
    fn service_timer(&mut self) -> stdio::Result<()> {
        self.timer_ready = false;
        if self.state != State::Running {
            return Ok(());
        }
        for _ in 0..TIMER_CALLS_PER_TURN {
            let Some(wanted) = self.handler.next_timer() else {
                return Ok(());
            };
            let now = Instant::now();
            let step = self
                .timer
                .plan(now, Some(wanted), self.io.sends.free_slots() > 0);
            match step {
                TimerStep::Idle => return Ok(()),
                TimerStep::Fire => {
                    self.stats.handler_timers += 1;
                    let mut reply =
                        Reply::unaddressed(&mut self.io.sends, &mut self.stats, self.fd);
                    self.handler.on_timer(now, &mut reply);
                }
                TimerStep::Arm(after) => {
                    self.io.arm_timer(after)?;
                    self.timer.note(step, Some(wanted));
                    return Ok(());
                }
                TimerStep::Update(after) => {
                    self.io.update_timer(after)?;
                    self.timer.note(step, Some(wanted));
                    return Ok(());
                }
            }
        }
        // Still due after the turn's calls: come back without blocking.
        self.timer_ready = true;
        Ok(())
    }

    /// Pushes the turn's replies to the ring; they reach the kernel with the next wait.
    fn flush_sends(&mut self) {
        if let Err(e) = self.io.flush() {
            // The submission queue could not take them (the completion queue is overflowing):
            // the replies are dropped and counted; UDP peers retransmit.
            self.stats.send_dropped += e.dropped;
            if let Some(held_back) = self.send_log.check() {
                tracing::warn!(worker = self.id, error = %e.error, dropped = e.dropped, held_back, "replies dropped: submission failed");
            }
        }
    }

    fn begin_drain(&mut self) -> stdio::Result<()> {
        if !self.serving() {
            return Ok(());
        }
        self.state = State::Draining {
            deadline: Instant::now() + self.pacing.shutdown_timeout,
        };
        if self.io.ledger.recv_armed {
            let generation = self.io.ledger.recv_generation;
            self.io.cancel(UserData::new(OpKind::Recv, generation, 0))?;
        }
        if self.io.ledger.tick_armed {
            self.io.cancel(UserData::new(OpKind::Tick, 0, 0))?;
        }
        if self.io.ledger.timer_armed {
            let target = self.io.timer_user_data();
            self.io.cancel(target)?;
        }
        // Sessions stay open until the listener's receive has ended and everything it took
        // has been answered (`close_sessions_when_drained`).
        Ok(())
    }

    /// While draining: once the listener's receive has delivered its last completion and the
    /// backlog is empty, every datagram received has been answered; close the sessions
    /// (their handlers see `session_close`) and let the drain finish.
    ///
    /// Until then the sessions are open, so work posted to them is taken every turn (the
    /// wake-up read is not armed again while draining): a deferred reply posted now is sent,
    /// not counted as dropped at exit. So is what `on_shutdown` posts through session
    /// handles, taken right before the sessions close.
    fn close_sessions_when_drained(&mut self) {
        if !matches!(self.state, State::Draining { .. }) || self.sessions_closed {
            return;
        }
        self.read_posted();
        if self.io.ledger.recv_armed || !self.backlog.is_empty() {
            return;
        }
        self.sessions_closed = true;
        self.tell_handler_shutdown();
        self.read_posted();
        // Datagrams forwarded meanwhile still find their sessions (while reply slots last);
        // what is left is counted as `shutdown_dropped` in the next turns.
        self.process_backlog();
        self.close_all_sessions();
    }
}
