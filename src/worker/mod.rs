//! One worker: a thread that owns a SO_REUSEPORT socket and its io_uring and runs the
//! completion loop (submit and wait, drain a batch of completions, one `match` on the
//! operation kind, hand datagrams to the handler, flush replies).
//!
//! The worker is made of parts, each a type owning its fields, in the order data flows
//! through them:
//! - `io`: the ring, the listening socket, the memory the kernel reads for the worker's own
//!   requests, and the `ledger` of everything in flight (sends included).
//! - `receive`: the receiver: provided buffers, the backlog of received datagrams (each
//!   holding its buffer), parsing and the split of GRO trains, backpressure.
//! - `deliver`: one datagram's way to the handler: the `router`'s decision (sans-IO) carried
//!   out with the sessions, the handler and the sender.
//! - `sessions`: opening and closing sessions (and their sockets, `session_sockets`), idle
//!   expiry, posted work.
//! - `send`: the sender: reply slots, the replies' push to the ring, their completions.
//! - `lifecycle`: running, released, draining; `pacing`: how the loop waits; `timer`: the
//!   handler's timer; `log_limit`: rate-limited warnings.
//!
//! Control flows one way: completions fill the receiver's backlog, the backlog is handed to
//! the handler through `Delivery`, the handler's requests (replies, closing its session) are
//! queued, and the loop carries them out at the end of the turn. Closing a session never
//! routes a datagram; what its socket still held goes back into the backlog for the next
//! pass. The loop below is the only place that holds more than one part: it lends each
//! part the others it needs for one call, and no part reaches into another's fields.

mod deliver;
mod io;
mod ledger;
mod lifecycle;
mod log_limit;
mod pacing;
mod receive;
mod router;
mod send;
mod session_sockets;
mod sessions;
mod timer;

use std::io as stdio;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ServerConfig;
use crate::handler::SessionHandler;
use crate::op::{OpKind, UserData};
use crate::ring::{has_more, Completion, Ring};
use crate::session::{Millis, SessionId};
use crate::shared::{ServerShared, WorkerShared};
use crate::socket::BoundSocket;
use crate::stats::Stats;

use deliver::Delivery;
use io::Io;
use lifecycle::{Finish, Lifecycle};
use pacing::Pacing;
use receive::{Layout, Receiver};
use router::Source;
use send::Sender;
use sessions::Sessions;
use timer::{HandlerTimer, TimerStep};

/// Calls of the handler's timer per loop turn at most: a handler whose deadline stays in the
/// past cannot keep the worker from its completions.
const TIMER_CALLS_PER_TURN: usize = 4;

/// The worker's clock: read once per turn, in milliseconds since the server started (the
/// origin all workers share, so cookie timestamps agree). Session activity is stamped with
/// it, no syscall.
struct Clock {
    started: Instant,
    now_ms: Millis,
}

impl Clock {
    fn tick(&mut self) {
        self.now_ms = self.started.elapsed().as_millis() as Millis;
    }
}

/// One worker: its parts and the loop's own state.
pub struct Worker<H: SessionHandler> {
    // Declaration order is drop order, after `Drop::drop` (which unregisters the receive
    // buffers while the ring is open): `io` closes the ring and the listener first, then the
    // receiver and the sender free the memory the kernel read, each only if nothing was in
    // flight.
    io: Io,
    receiver: Receiver,
    sender: Sender,
    sessions: Sessions<H::State>,
    handler: H,
    /// The handler's timer (`SessionHandler::next_timer`).
    timer: HandlerTimer,
    lifecycle: Lifecycle,
    pacing: Pacing,
    shared: Arc<WorkerShared>,
    stats: Stats,
    /// The turn's completions (emptied as they are dispatched; kept for its capacity).
    completions: Vec<Completion>,
    clock: Clock,
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
        let layout = Layout::new(&socket, config);
        // Every buffer and every send slot can have a completion outstanding at once, plus
        // the wake-up read, the tick, cancels and slack: size the completion queue for all of
        // them. Session sockets only add receives that share the same buffers.
        let cq_entries =
            (usize::from(config.buffers) + config.send_slots + 256).next_power_of_two() as u32;
        let sq_entries = 512u32.min(cq_entries);
        let ring = Ring::new(sq_entries, cq_entries)
            .map_err(|e| stdio::Error::new(e.kind(), crate::ring::explain_setup_error(&e)))?;
        let listener = socket.local_addr;
        let io = Io::new(
            ring,
            socket,
            layout.name_space,
            layout.control_space,
            shared.wake_fd.as_raw_fd(),
        );
        let sender = Sender::new(config, &io, id, shared.clone())?;
        // From here on the buffers are registered: nothing below fails, and the worker's
        // `Drop` unregisters them.
        let receiver = Receiver::new(&io, layout, config, id)?;
        let sessions = Sessions::new(config, listener, server.clone(), shared.clone(), id);
        let mut worker = Worker {
            io,
            receiver,
            sender,
            sessions,
            handler,
            timer: HandlerTimer::default(),
            lifecycle: Lifecycle::new(config, id),
            pacing: Pacing::new(config),
            shared,
            stats: Stats::default(),
            completions: Vec::with_capacity(cq_entries as usize),
            clock: Clock {
                started: server.started,
                now_ms: 0,
            },
        };
        worker.sessions.open_stateless(&mut worker.handler);
        Ok(worker)
    }

    pub fn task_run_mode(&self) -> crate::ring::TaskRunMode {
        self.io.task_run_mode()
    }

    pub fn recv_buffer(&self) -> usize {
        self.io.listener().recv_buffer
    }

    /// Runs until shutdown is requested and everything in flight has completed; returns the
    /// final counters.
    pub fn run(mut self) -> stdio::Result<Stats> {
        let result = self.run_loop();
        // From now on posts are refused; what was posted before is handled here: its session
        // has closed (shutdown closes them all), so it is counted, never lost silently.
        let unhandled = self.shared.close();
        self.stats.deferred_dropped += unhandled
            .iter()
            .filter(|work| !matches!(work, crate::shared::Posted::Wake))
            .count() as u64;
        self.shared.counters.publish(&self.stats);
        result.map(|()| self.stats)
    }

    fn run_loop(&mut self) -> stdio::Result<()> {
        self.io.arm_wake()?;
        self.io.arm_recv()?;
        // A handler may want its timer before anything arrives: ask it before the first
        // wait, or a deadline already set at start would wait for the first completion.
        self.service_timer()?;
        loop {
            self.wait()?;
            self.clock.tick();
            // Parked sockets close once the kernel has taken every queued entry (the sends
            // naming them were pushed in the turn that parked them).
            let unsubmitted = self.io.unsubmitted();
            self.sessions.close_parked(unsubmitted, |drained| {
                self.receiver.requeue(drained, &mut self.stats)
            });
            let mut completions = std::mem::take(&mut self.completions);
            completions.clear();
            self.io.drain(&mut completions);
            self.pacing.turn(completions.len());
            // Each completion is dispatched by value, once: one that names a buffer is spent
            // taking it.
            for c in completions.drain(..) {
                self.dispatch(c)?;
            }
            self.completions = completions;
            self.process_backlog();
            // Closed sessions' sockets: what they still hold joins the backlog.
            let read = self
                .sessions
                .read_retiring(|drained| self.receiver.requeue(drained, &mut self.stats));
            if read {
                self.process_backlog();
            }
            self.service_timer()?;
            // Shutting down, with everything received answered: the handler's goodbyes
            // (`on_shutdown`) are queued here, so that this turn's flush sends them.
            self.close_sessions_when_drained();
            self.sender.flush(&mut self.io, &mut self.stats);
            self.receiver.publish();
            if self.lifecycle.serving() {
                if self.lifecycle.receiving()
                    && self.io.ledger().recv().is_none()
                    && self.receiver.available() > 0
                {
                    self.stats.rearms += 1;
                    self.io.arm_recv()?;
                }
                let buffers = self.receiver.available() > 0;
                self.sessions.rearm(&mut self.io, buffers)?;
            }
            self.end_when_released_and_idle()?;
            self.stats.sessions_open = self.sessions.len() as u64;
            self.receiver.count_refused(&mut self.stats);
            self.shared.counters.publish(&self.stats);
            let idle = self.io.in_flight() == 0
                && self.receiver.is_idle()
                && !self.sessions.sockets_busy();
            match self.lifecycle.finished(idle, self.io.in_flight()) {
                Finish::No => {}
                Finish::Done => {
                    // Push out anything the last turn queued (the replies were counted as
                    // queued, the kernel must see them).
                    self.io.submit()?;
                    return Ok(());
                }
                Finish::TimedOut => return Ok(()),
            }
        }
    }

    /// Submits the turn's entries and waits for completions, unless work is ready without
    /// them (datagrams in the backlog with reply slots free, sockets to close, a due timer).
    fn wait(&mut self) -> stdio::Result<()> {
        let can_reply = self.sender.free_slots() > 0;
        let ready = (!self.receiver.is_idle() && can_reply)
            || self.sessions.sockets_busy()
            || (self.timer.ready() && can_reply);
        let wait = self.pacing.plan(ready, !self.lifecycle.serving());
        if let Some(budget) = wait.spin {
            if self.spin(budget)? {
                return Ok(());
            }
        }
        self.stats.enters += 1;
        self.io.submit_and_wait(wait.want, wait.timeout)
    }

    /// `--busy-poll`: polls for completions without sleeping for up to `budget`. Each poll is
    /// an `io_uring_enter` with a zero timeout, which runs the ring's deferred work (the
    /// receives) and returns at once. Returns whether completions arrived.
    fn spin(&mut self, budget: Duration) -> stdio::Result<bool> {
        let until = Instant::now() + budget;
        loop {
            self.stats.enters += 1;
            self.io.submit_and_wait(1, Some(Duration::ZERO))?;
            if self.io.has_completions() {
                return Ok(true);
            }
            if Instant::now() >= until {
                return Ok(false);
            }
        }
    }

    /// The completion table: one arm per operation kind. The ledger sees each completion
    /// first.
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
        let more = has_more(c.flags());
        let current = self.io.completed(ud, more);
        match ud.kind {
            OpKind::Recv => self.receiver.take(c, Source::Listener, &mut self.stats),
            OpKind::SessionRecv => {
                let id = SessionId {
                    slot: ud.slot,
                    generation: ud.generation,
                };
                if !more {
                    let serving = self.lifecycle.serving();
                    self.sessions
                        .recv_ended(id, c.result(), serving, &mut self.stats);
                }
                // A datagram read from a closing session's socket still gets routed (to a new
                // session for its peer), so nothing the kernel delivered is lost.
                self.receiver.take(c, Source::Session(id), &mut self.stats);
            }
            OpKind::Send => self.sender.complete(ud, &c, &mut self.stats),
            OpKind::Wake => {
                self.read_posted();
                if self.shared.shutdown.load(Ordering::Acquire) {
                    self.begin_drain()?;
                } else {
                    if self.shared.release.load(Ordering::Acquire) {
                        self.release_listener()?;
                    }
                    if self.lifecycle.serving() {
                        self.io.arm_wake()?;
                    }
                }
            }
            OpKind::Tick => {
                let serving = self.lifecycle.serving();
                self.sessions.expire(
                    self.clock.now_ms,
                    serving,
                    &mut self.handler,
                    &mut self.io,
                    &mut self.stats,
                )?;
            }
            OpKind::Timer => {
                // A stale generation cannot occur (one armed at a time), but is harmless.
                if current {
                    self.timer.fired();
                }
            }
            // 0, or -ENOENT when the timeout had fired first: nothing else to do.
            OpKind::TimerUpdate => self.timer.updated(),
            OpKind::Cancel => {}
        }
        Ok(())
    }

    /// Hands the backlog to the handler (see `Receiver::deliver`, `Delivery`).
    fn process_backlog(&mut self) {
        let mut delivery = Delivery {
            handler: &mut self.handler,
            sessions: &mut self.sessions,
            sender: &mut self.sender,
            io: &mut self.io,
            now_ms: self.clock.now_ms,
            opens: self.lifecycle.opens_sessions(),
            serving: self.lifecycle.serving(),
        };
        self.receiver.deliver(&mut delivery, &mut self.stats);
    }

    /// Takes the work other threads posted (see `Sessions::read_posted`).
    fn read_posted(&mut self) {
        let receiver = &mut self.receiver;
        self.sessions
            .read_posted(&mut self.sender, &mut self.stats, |peer, local, payload| {
                receiver.forwarded(peer, local, payload)
            });
    }

    /// Asks the handler when it wants its timer and carries out the step (see `timer`): calls
    /// `on_timer` when the instant has passed and a reply slot is free, else arms or brings
    /// forward the one timeout. Not while draining: shutdown closes the handler's state.
    fn service_timer(&mut self) -> stdio::Result<()> {
        self.timer.set_ready(false);
        if !self.lifecycle.receiving() {
            return Ok(());
        }
        for _ in 0..TIMER_CALLS_PER_TURN {
            let Some(wanted) = self.handler.next_timer() else {
                return Ok(());
            };
            let now = Instant::now();
            let step = self
                .timer
                .plan(now, Some(wanted), self.sender.free_slots() > 0);
            match step {
                TimerStep::Idle => return Ok(()),
                TimerStep::Fire => {
                    self.stats.handler_timers += 1;
                    let mut reply = self.sender.unaddressed(&mut self.stats);
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
        self.timer.set_ready(true);
        Ok(())
    }

    /// Shutdown was asked for: stop receiving and cancel the timers. Sessions stay open until
    /// the listener's receive has ended and everything it took has been answered
    /// (`close_sessions_when_drained`).
    fn begin_drain(&mut self) -> stdio::Result<()> {
        if !self.lifecycle.drain(Instant::now()) {
            return Ok(());
        }
        if let Some(recv) = self.io.ledger().recv() {
            self.io.cancel(recv)?;
        }
        if self.io.ledger().tick_armed() {
            self.io.cancel(UserData::new(OpKind::Tick, 0, 0))?;
        }
        if self.io.ledger().timer_armed() {
            let target = self.io.ledger().timer();
            self.io.cancel(target)?;
        }
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
        if !self.lifecycle.sessions_to_close() {
            return;
        }
        self.read_posted();
        if self.io.ledger().recv().is_some() || !self.receiver.is_idle() {
            return;
        }
        self.lifecycle.sessions_closed();
        // The handler's last chance to queue replies: they are flushed and completed before
        // the worker exits, like every other reply.
        let mut reply = self.sender.unaddressed(&mut self.stats);
        self.handler.on_shutdown(Instant::now(), &mut reply);
        self.read_posted();
        // Datagrams forwarded meanwhile still find their sessions (while reply slots last);
        // what is left is counted as `shutdown_dropped` in the next turns.
        self.process_backlog();
        self.sessions
            .close_all(&mut self.handler, &mut self.io, &mut self.stats);
    }

    /// The listener is handed over (see `lifecycle`): stop receiving on it for good. What
    /// the receive already took (its completions up to the final one the cancel brings) is
    /// answered before the worker drains; only sessions with sockets of their own keep it
    /// serving after that.
    fn release_listener(&mut self) -> stdio::Result<()> {
        if !self.lifecycle.release() {
            return Ok(());
        }
        if let Some(recv) = self.io.ledger().recv() {
            self.io.cancel(recv)?;
        }
        self.sessions
            .close_listener_sessions(&mut self.handler, &mut self.io, &mut self.stats);
        Ok(())
    }

    /// A released worker whose listener receive has ended, with nothing pending and no
    /// session on a socket of its own left, asks itself to shut down (through its own
    /// wake-up, so the drain starts from the one place that begins it). Sessions a datagram
    /// from the backlog opened on the listener after the release are closed by that drain.
    fn end_when_released_and_idle(&mut self) -> stdio::Result<()> {
        if !self.lifecycle.released()
            || self.io.ledger().recv().is_some()
            || !self.receiver.is_idle()
            || self.sessions.sockets_busy()
            || self.shared.shutdown.load(Ordering::Acquire)
        {
            return Ok(());
        }
        if !self.sessions.any_own_socket() {
            self.shared.request_shutdown()?;
        }
        Ok(())
    }
}

impl<H: SessionHandler> Drop for Worker<H> {
    /// Teardown is part of soundness (TigerBeetle's rule: drain to zero before freeing).
    /// The receive buffers are unregistered here, while the ring is open, and only if the
    /// ledger shows nothing in flight; then the fields drop in declaration order: `io` closes
    /// the ring (and frees its own headers only if nothing was in flight), the receiver
    /// unmaps the buffers only if they were unregistered, the sender frees its slots only if
    /// none is in flight. Whatever the kernel may still touch is leaked, never freed.
    fn drop(&mut self) {
        self.receiver.release_buffers(&self.io);
    }
}
