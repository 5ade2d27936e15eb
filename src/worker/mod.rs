//! One worker: a thread that owns a SO_REUSEPORT socket, an io_uring, a provided-buffer ring
//! and a pool of reply slots, and runs the completion loop: submit and wait, drain a batch of
//! completions, one `match` on the operation kind, hand datagrams to the handler, recycle.
//! Session routing (per-client sockets, idle expiry, deferred replies) is in `sessions.rs`.

mod deliver;
mod sessions;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::ManuallyDrop;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use parking_lot::Mutex;

use crate::buf_ring::BufRing;
use crate::config::{ServerConfig, SessionMode};
use crate::datagram::{CONTROL_LEN, RECVMSG_OUT_LEN, SOCKADDR_IN6_LEN, SOCKADDR_IN_LEN};
use crate::directory::Directory;
use crate::handler::SessionHandler;
use crate::op::{next_generation, OpKind, UserData};
use crate::ring::{buffer_id, has_more, Completion, Ring};
use crate::send_pool::{send_errno, SendPool};
use crate::session::{Limits, Millis, SessionId, SessionTable};
use crate::socket::BoundSocket;
use crate::stats::{SharedStats, Stats};

use deliver::Payload;
use sessions::Live;

/// The buffer group every worker's receive ring registers (each worker has its own ring, so
/// the ids do not collide).
const BUF_GROUP: u16 = 0;

/// A turn that drained at least this many completions counts as busy: the next wait may
/// hold out for a batch (`--batch-wait`).
const BUSY_TURN: usize = 8;

/// Work posted to a worker from another thread.
pub enum Letter {
    /// A reply made through a [`crate::handler::SessionHandle`].
    Deferred {
        session: SessionId,
        payload: Vec<u8>,
    },
    /// A datagram another worker received for a peer this worker owns.
    Forwarded {
        peer: SocketAddr,
        local: Option<IpAddr>,
        payload: Vec<u8>,
    },
}

/// What a worker shares with the other threads.
pub struct WorkerShared {
    pub counters: SharedStats,
    /// Written to wake the worker's ring from another thread.
    pub wake_fd: OwnedFd,
    pub shutdown: AtomicBool,
    mailbox: Mutex<Vec<Letter>>,
    stopped: AtomicBool,
}

impl WorkerShared {
    pub fn new() -> io::Result<WorkerShared> {
        Ok(WorkerShared {
            counters: SharedStats::default(),
            wake_fd: crate::sys::eventfd()?,
            shutdown: AtomicBool::new(false),
            mailbox: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
        })
    }

    /// Asks the worker to stop: it stops receiving, flushes replies, cancels what is in
    /// flight and returns.
    pub fn request_shutdown(&self) -> io::Result<()> {
        self.shutdown.store(true, Ordering::Release);
        crate::sys::eventfd_signal(&self.wake_fd)
    }

    /// Hands `letter` to the worker and wakes it (once per batch of letters). `Err` when the
    /// worker has stopped.
    pub fn post(&self, letter: Letter) -> Result<(), Letter> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(letter);
        }
        let was_empty = {
            let mut mailbox = self.mailbox.lock();
            let was_empty = mailbox.is_empty();
            mailbox.push(letter);
            was_empty
        };
        // The worker empties the whole mailbox per wake-up, so only the first letter of a
        // batch needs to write the eventfd.
        if was_empty {
            let _ = crate::sys::eventfd_signal(&self.wake_fd);
        }
        Ok(())
    }
}

/// Where a pending datagram was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Listener,
    Session(SessionId),
}

/// A received datagram waiting for the handler: it holds buffer `bid` until then.
#[derive(Debug, Clone, Copy)]
struct Pending {
    bid: u16,
    len: usize,
    source: Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Draining { deadline: Instant },
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

/// Cookies already used to open a session, by key epoch (older epochs are pruned: their
/// cookies no longer validate anyway).
#[derive(Default)]
pub struct UsedCookies {
    tags: HashMap<[u8; 16], u32>,
    pruned_epoch: u32,
}

impl UsedCookies {
    /// Records `tag`; `false` when it was already there (a replay).
    pub fn first_use(&mut self, tag: [u8; 16], epoch: u32) -> bool {
        if epoch > self.pruned_epoch + 1 {
            self.tags.retain(|_, e| *e + 1 >= epoch);
            self.pruned_epoch = epoch.saturating_sub(1);
        }
        self.tags.insert(tag, epoch).is_none()
    }
}

/// Everything the workers of one server share.
pub struct Fleet {
    /// Every worker's shared part, by worker id (for forwarding between workers).
    pub workers: Vec<Arc<WorkerShared>>,
    /// Session owners, for `connected` mode with several workers.
    pub directory: Option<Directory>,
    /// Sessions open in all workers.
    pub sessions_total: Arc<AtomicUsize>,
    /// Connected per-client sockets open in all workers.
    pub connected_total: AtomicUsize,
    /// `--validate-peers`: mints and checks cookies (the same keys in every worker).
    pub cookies: Option<crate::cookie::CookieJar>,
    pub used_cookies: Mutex<UsedCookies>,
    /// The common clock origin (cookie timestamps must agree between workers).
    pub started: Instant,
}

/// Field order matters: the ring is dropped first, so the kernel lets go of the buffers,
/// message headers and send slots below before they are freed.
pub struct Worker<H: SessionHandler> {
    ring: Ring,
    // Memory the kernel points at. `Drop` frees it only when nothing is in flight.
    bufs: ManuallyDrop<BufRing>,
    sends: ManuallyDrop<SendPool>,
    recv_msg: ManuallyDrop<Box<libc::msghdr>>,
    wake_buf: ManuallyDrop<Box<u64>>,
    tick_spec: ManuallyDrop<Box<types::Timespec>>,
    socket: BoundSocket,
    fd: RawFd,
    id: usize,
    handler: H,
    shared: Arc<WorkerShared>,
    fleet: Arc<Fleet>,
    counters: Stats,
    backlog: VecDeque<Pending>,
    completions: Vec<Completion>,
    name_space: usize,
    control_space: usize,
    recv_armed: bool,
    recv_generation: u32,
    wake_armed: bool,
    tick_armed: bool,
    cancels_in_flight: usize,
    session_recvs_armed: usize,
    backpressured: bool,
    state: State,
    shutdown_timeout: Duration,
    batch_wait: Option<Duration>,
    batch_size: usize,
    busy_poll: Option<Duration>,
    recv_log: LogLimit,
    send_log: LogLimit,
    socket_log: LogLimit,
    // Sessions.
    mode: SessionMode,
    sessions: SessionTable<Live<H::State>>,
    /// The one worker-wide state of `--sessions none`.
    stateless: Option<H::State>,
    /// Session sockets whose receive is being cancelled; closed on its final completion.
    closing: HashMap<SessionId, OwnedFd>,
    rearm: Vec<SessionId>,
    expired: Vec<SessionId>,
    /// Session sockets closed this turn. Replies already queued may still name them: the
    /// descriptors stay open until the next `io_uring_enter` has submitted those sends (the
    /// kernel resolves a descriptor number when it issues the request), so a number reused by
    /// a new socket never receives someone else's reply.
    graveyard: Vec<OwnedFd>,
    mail: Vec<Letter>,
    max_connected: usize,
    amplification_factor: u64,
    session_recv_buffer: usize,
    started: Instant,
    now_ms: Millis,
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
        fleet: Arc<Fleet>,
    ) -> io::Result<Worker<H>> {
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
        let control_space = if socket.wants_pktinfo { CONTROL_LEN } else { 0 };
        let buf_len = RECVMSG_OUT_LEN + name_space + control_space + config.max_datagram;
        let buffers = usize::from(config.buffers);
        // Every buffer and every send slot can have a completion outstanding at once, plus
        // the wake-up read, the tick, cancels and slack: size the completion queue for all of
        // them. Session sockets only add receives that share the same buffers.
        let cq_entries = (buffers + config.send_slots + 256).next_power_of_two() as u32;
        let sq_entries = 512u32.min(cq_entries);
        let ring = Ring::new(sq_entries, cq_entries)
            .map_err(|e| io::Error::new(e.kind(), crate::ring::explain_setup_error(&e)))?;
        let bufs = BufRing::new(config.buffers, buf_len as u32, BUF_GROUP)?;
        // SAFETY: `ring` is declared before `bufs` in `Worker`, so it is dropped first, and
        // `Drop` leaks the buffers if operations are still in flight at that point.
        unsafe { bufs.register(ring.uring()) }.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot register the provided buffer ring ({e}): needs Linux 5.19+"),
            )
        })?;
        let sends = SendPool::new(
            config.send_slots,
            config.max_datagram,
            socket.is_v6,
            config.gso,
        );
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut recv_msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_msg.msg_namelen = name_space as u32;
        recv_msg.msg_controllen = control_space;
        let fd = socket.socket.as_raw_fd();
        let limits = Limits {
            idle_timeout_ms: config.idle_timeout.as_millis().max(1) as Millis,
            max_sessions_per_worker: config.max_sessions_per_worker,
            max_sessions: config.max_sessions,
            max_new_per_sec: config.max_new_sessions_per_sec,
            max_per_source: config.max_sessions_per_source,
        };
        let sessions = SessionTable::new(limits, fleet.sessions_total.clone());
        let mut worker = Worker {
            ring,
            bufs: ManuallyDrop::new(bufs),
            sends: ManuallyDrop::new(sends),
            recv_msg: ManuallyDrop::new(recv_msg),
            wake_buf: ManuallyDrop::new(Box::new(0)),
            tick_spec: ManuallyDrop::new(Box::new(types::Timespec::new())),
            socket,
            fd,
            id,
            handler,
            shared,
            fleet,
            counters: Stats::default(),
            backlog: VecDeque::with_capacity(buffers),
            completions: Vec::with_capacity(cq_entries as usize),
            name_space,
            control_space,
            recv_armed: false,
            recv_generation: 0,
            wake_armed: false,
            tick_armed: false,
            cancels_in_flight: 0,
            session_recvs_armed: 0,
            backpressured: false,
            state: State::Running,
            shutdown_timeout: config.shutdown_timeout,
            batch_wait: config.batch_wait,
            busy_poll: config.busy_poll,
            batch_size: config.batch_size,
            recv_log: LogLimit::new(),
            send_log: LogLimit::new(),
            socket_log: LogLimit::new(),
            mode: config.sessions,
            sessions,
            stateless: None,
            closing: HashMap::new(),
            rearm: Vec::new(),
            expired: Vec::new(),
            graveyard: Vec::new(),
            mail: Vec::new(),
            max_connected: config.max_connected,
            amplification_factor: u64::from(config.amplification_factor),
            session_recv_buffer: config.recv_buffer_bytes.min(1 << 20),
            started: Instant::now(),
            now_ms: 0,
        };
        worker.started = worker.fleet.started;
        if worker.mode == SessionMode::None {
            let info = worker.stateless_info();
            worker.stateless = Some(worker.handler.session_open(&info));
        }
        Ok(worker)
    }

    pub fn task_run_mode(&self) -> crate::ring::TaskRunMode {
        self.ring.mode()
    }

    pub fn recv_buffer(&self) -> usize {
        self.socket.recv_buffer
    }

    /// Runs until shutdown is requested and everything in flight has completed; returns the
    /// final counters.
    pub fn run(mut self) -> io::Result<Stats> {
        let result = self.run_loop();
        // From now on letters cannot be delivered: senders get an error instead.
        self.shared.stopped.store(true, Ordering::Release);
        self.counters.deferred_dropped += self.shared.mailbox.lock().drain(..).count() as u64;
        self.shared.counters.publish(&self.counters);
        result.map(|()| self.counters)
    }

    fn run_loop(&mut self) -> io::Result<()> {
        self.arm_wake()?;
        self.arm_recv()?;
        loop {
            let (want, timeout) = match (self.state, self.batch_wait) {
                (State::Running, None) => (1, None),
                // Gather a batch only while batches are coming: at low load a timed wait
                // would fire its timer for nothing on every turn.
                (State::Running, Some(wait)) if self.completions.len() >= BUSY_TURN => {
                    (self.batch_size, Some(wait))
                }
                (State::Running, Some(_)) => (1, None),
                // While draining, wake up to notice the deadline even if nothing completes.
                (State::Draining { .. }, _) => (1, Some(Duration::from_millis(20))),
            };
            if !(self.state == State::Running && want == 1 && timeout.is_none() && self.spin()?) {
                self.counters.enters += 1;
                self.ring.submit_and_wait(want, timeout)?;
            }
            self.bury();
            // One clock read per turn: session activity is stamped with it, no syscall.
            self.now_ms = self.started.elapsed().as_millis() as Millis;
            let mut completions = std::mem::take(&mut self.completions);
            completions.clear();
            self.ring.drain(&mut completions);
            for c in &completions {
                self.dispatch(*c)?;
            }
            self.completions = completions;
            self.process_backlog();
            self.flush_sends()?;
            if !self.graveyard.is_empty() {
                // Submit now so the sends naming these descriptors are issued, then close.
                self.ring.submit()?;
                self.bury();
                // What the last reads found may have been answered: queue those too.
                self.process_backlog();
                self.flush_sends()?;
            }
            self.bufs.publish();
            if self.state == State::Running {
                if !self.recv_armed && self.bufs.available() > 0 {
                    self.counters.rearms += 1;
                    self.arm_recv()?;
                }
                self.rearm_sessions()?;
            }
            self.counters.sessions_open = self.sessions.len() as u64;
            self.shared.counters.publish(&self.counters);
            if let State::Draining { deadline } = self.state {
                if self.in_flight() == 0 && self.backlog.is_empty() {
                    // Push out anything the last turn queued (the replies were counted as
                    // queued, the kernel must see them).
                    self.ring.submit()?;
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        worker = self.id,
                        in_flight = self.in_flight(),
                        "shutdown timed out with operations in flight"
                    );
                    return Ok(());
                }
            }
        }
    }

    /// `--busy-poll`: after a busy turn, poll for completions without sleeping for up to the
    /// configured time before the blocking wait. Each poll is an `io_uring_enter` with a zero
    /// timeout, which runs the ring's deferred work (the receives) and returns at once. While
    /// the worker polls it never sleeps, so senders pay no wake-up; the price is a core kept
    /// busy for that long after each burst. Returns whether completions arrived.
    fn spin(&mut self) -> io::Result<bool> {
        let Some(budget) = self.busy_poll else {
            return Ok(false);
        };
        if self.completions.is_empty() {
            return Ok(false); // idle: do not burn a core waiting for nothing
        }
        let until = Instant::now() + budget;
        loop {
            self.counters.enters += 1;
            self.ring.submit_and_wait(1, Some(Duration::ZERO))?;
            if self.ring.has_completions() {
                return Ok(true);
            }
            if Instant::now() >= until {
                return Ok(false);
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.sends.in_flight()
            + usize::from(self.recv_armed)
            + usize::from(self.wake_armed)
            + usize::from(self.tick_armed)
            + self.cancels_in_flight
            + self.session_recvs_armed
    }

    /// The completion table: one arm per operation kind.
    fn dispatch(&mut self, c: Completion) -> io::Result<()> {
        let Some(ud) = UserData::decode(c.user_data) else {
            // We never submit kind 0 or an unknown kind: this is a bug somewhere, not input.
            self.counters.stale_completions += 1;
            tracing::error!(
                user_data = c.user_data,
                "completion with an unknown user_data"
            );
            return Ok(());
        };
        match ud.kind {
            OpKind::Recv => self.on_recv(ud, c),
            OpKind::SessionRecv => self.on_session_recv(ud, c),
            OpKind::Send => self.on_send(ud, c),
            OpKind::Wake => {
                self.wake_armed = false;
                self.read_mail();
                if self.shared.shutdown.load(Ordering::Acquire) {
                    self.begin_drain()?;
                } else if self.state == State::Running {
                    self.arm_wake()?;
                }
            }
            OpKind::Tick => {
                self.tick_armed = false;
                self.expire_sessions()?;
            }
            OpKind::Cancel => {
                self.cancels_in_flight = self.cancels_in_flight.saturating_sub(1);
            }
        }
        Ok(())
    }

    fn on_send(&mut self, ud: UserData, c: Completion) {
        match self.sends.complete(ud) {
            None => self.counters.stale_completions += 1,
            Some(done) if c.result < 0 => {
                let segments = u64::from(done.segments);
                self.counters.send_errors += segments;
                let errno = -c.result;
                // A kernel or device that cannot segment says EIO or EINVAL to a train: stop
                // building trains (one log line) and carry on with plain sends.
                if segments > 1 && (errno == libc::EIO || errno == libc::EINVAL) && self.sends.gso()
                {
                    self.sends.disable_gso();
                    tracing::warn!(worker = self.id, error = %send_errno(c.result), "UDP GSO refused; sending datagrams one by one");
                } else if let Some(held_back) = self.send_log.check() {
                    tracing::warn!(worker = self.id, error = %send_errno(c.result), held_back, "send failed");
                }
            }
            Some(done) => {
                self.counters.tx_datagrams += u64::from(done.segments);
                self.counters.tx_bytes += c.result as u64;
                if done.segments > 1 {
                    self.counters.gso_trains += 1;
                }
            }
        }
    }

    fn on_recv(&mut self, ud: UserData, c: Completion) {
        if !has_more(c.flags) && ud.generation == self.recv_generation {
            self.recv_armed = false;
        }
        self.take_received(c, Source::Listener);
    }

    /// Queues a receive completion's datagram for the handler, or counts its error.
    fn take_received(&mut self, c: Completion, source: Source) {
        if c.result >= 0 {
            match buffer_id(c.flags) {
                Some(bid) => {
                    self.bufs.take(bid);
                    // Never grows: each pending entry holds a distinct buffer.
                    self.backlog.push_back(Pending {
                        bid,
                        len: c.result as usize,
                        source,
                    });
                }
                None => self.counters.malformed += 1,
            }
            return;
        }
        match -c.result {
            // The ring ran dry: the multishot request ended. It is armed again at the end of
            // the turn, once the handler has returned buffers.
            libc::ENOBUFS => self.counters.enobufs += 1,
            libc::ECANCELED => {}
            errno => {
                self.counters.recv_errors += 1;
                if let Some(held_back) = self.recv_log.check() {
                    tracing::warn!(worker = self.id, error = %io::Error::from_raw_os_error(errno), held_back, "receive failed");
                }
            }
        }
    }

    /// Pushes the turn's replies to the ring; they reach the kernel with the next wait.
    fn flush_sends(&mut self) -> io::Result<()> {
        if let Err(e) = self.sends.flush(&mut self.ring) {
            // The submission queue could not take them (the completion queue is overflowing):
            // the replies are dropped and counted; UDP peers retransmit.
            self.counters.send_dropped += 1;
            if let Some(held_back) = self.send_log.check() {
                tracing::warn!(worker = self.id, error = %e, held_back, "replies dropped: submission failed");
            }
        }
        Ok(())
    }

    fn arm_recv(&mut self) -> io::Result<()> {
        self.recv_generation = next_generation(self.recv_generation);
        let ud = UserData::new(OpKind::Recv, self.recv_generation, 0);
        let entry = opcode::RecvMsgMulti::new(types::Fd(self.fd), &**self.recv_msg, BUF_GROUP)
            .build()
            .user_data(ud.encode());
        // SAFETY: `recv_msg` is boxed and lives as long as the ring (dropped after it); the
        // kernel takes buffers only from our registered ring.
        unsafe { self.ring.push(&entry) }?;
        self.recv_armed = true;
        Ok(())
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.shared.wake_fd.as_raw_fd()),
            (&mut **self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(UserData::new(OpKind::Wake, 0, 0).encode());
        // SAFETY: `wake_buf` is boxed and outlives the ring; the eventfd is kept open by
        // `shared`, which the worker holds until it returns.
        unsafe { self.ring.push(&entry) }?;
        self.wake_armed = true;
        Ok(())
    }

    /// Cancels the operation `target` names; its final completion still arrives.
    fn cancel(&mut self, target: UserData) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target.encode())
            .build()
            .user_data(UserData::new(OpKind::Cancel, 0, 0).encode());
        // SAFETY: a cancel request carries no pointers.
        unsafe { self.ring.push(&entry) }?;
        self.cancels_in_flight += 1;
        Ok(())
    }

    fn begin_drain(&mut self) -> io::Result<()> {
        if self.state != State::Running {
            return Ok(());
        }
        self.state = State::Draining {
            deadline: Instant::now() + self.shutdown_timeout,
        };
        if self.recv_armed {
            self.cancel(UserData::new(OpKind::Recv, self.recv_generation, 0))?;
        }
        if self.tick_armed {
            self.cancel(UserData::new(OpKind::Tick, 0, 0))?;
        }
        self.close_all_sessions()
    }
}

impl<H: SessionHandler> Drop for Worker<H> {
    fn drop(&mut self) {
        if self.in_flight() > 0 {
            // The kernel may still write into this memory after the ring's file is closed
            // (its teardown is asynchronous); leaking it is the only safe choice. This happens
            // only when shutdown timed out or the loop failed.
            tracing::warn!(
                worker = self.id,
                in_flight = self.in_flight(),
                "leaking receive buffers and send slots still in use by the kernel"
            );
            return;
        }
        // SAFETY: nothing is in flight, so the kernel holds no pointer into this memory, and
        // each field is dropped exactly once, here.
        unsafe {
            ManuallyDrop::drop(&mut self.bufs);
            ManuallyDrop::drop(&mut self.sends);
            ManuallyDrop::drop(&mut self.recv_msg);
            ManuallyDrop::drop(&mut self.wake_buf);
            ManuallyDrop::drop(&mut self.tick_spec);
        }
    }
}
