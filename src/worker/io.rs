//! A worker's kernel side: the ring, the memory the kernel reads and writes (provided
//! buffers, send slots, the receive `msghdr`, the wake-up and timer words) and the ledger of
//! operations in flight. Every `SQE` the worker submits is built and pushed here.
//!
//! Teardown order is part of soundness: `Drop` unregisters the buffer group and closes the
//! ring *before* any of that memory is freed, and frees it only if the ledger shows nothing in
//! flight; otherwise it is leaked (the kernel cancels outstanding requests asynchronously after
//! the ring's file is closed and may still write into it).

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, squeue, types};

use crate::buf_ring::{BufRing, RecvBuf};
use crate::op::{next_generation, OpKind, UserData};
use crate::ring::{buffer_id, Completion, Ring};
use crate::send_pool::{FlushError, SendPool, Submit};
use crate::session::SessionId;

/// The buffer group every worker's receive ring registers. Each worker has its own io_uring,
/// so the ids do not collide; `BufRing` remembers which io_uring its registration belongs to
/// and unregisters only from that one.
pub(super) const BUF_GROUP: u16 = 0;

/// The listener's slot in the ring's registered file table.
const LISTENER_SLOT: u32 = 0;

/// The operations a worker has armed, besides sends (which the send pool counts): shutdown
/// waits for all of them to complete, and `Io::drop` frees memory only when they have.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// The listener's multishot receive is armed (under `recv_generation`).
    pub recv_armed: bool,
    pub recv_generation: u32,
    pub wake_armed: bool,
    pub tick_armed: bool,
    /// The handler's timer is armed (under `timer_generation`).
    pub timer_armed: bool,
    pub timer_generation: u32,
    /// An update of the handler's timer is in flight.
    pub timer_updating: bool,
    pub cancels: usize,
    /// Session sockets with a multishot receive armed.
    pub session_recvs: usize,
}

impl Ledger {
    fn armed(&self) -> usize {
        usize::from(self.recv_armed)
            + usize::from(self.wake_armed)
            + usize::from(self.tick_armed)
            + usize::from(self.timer_armed)
            + usize::from(self.timer_updating)
            + self.cancels
            + self.session_recvs
    }
}

pub(super) struct Io {
    /// Dropped by hand in `Drop`, before the memory below.
    ring: ManuallyDrop<Ring>,
    pub bufs: BufRing,
    pub sends: SendPool,
    /// The template header of every multishot receive: name and control lengths.
    recv_msg: ManuallyDrop<Box<libc::msghdr>>,
    /// Where the wake-up eventfd read lands.
    wake_buf: ManuallyDrop<Box<u64>>,
    /// The idle timer's timespec, read by the kernel until the timeout completes.
    tick_spec: ManuallyDrop<Box<types::Timespec>>,
    /// The handler timer's timespec, and the one of its update: each read by the kernel until
    /// its request completes.
    timer_spec: ManuallyDrop<Box<types::Timespec>>,
    timer_update_spec: ManuallyDrop<Box<types::Timespec>>,
    pub ledger: Ledger,
    listener_fd: RawFd,
    /// The listener is slot 0 of the ring's registered file table (`IORING_REGISTER_FILES`,
    /// 5.1): its receive and the replies sent from it name the slot, and the kernel skips the
    /// per-request `fget`/`fput` of the descriptor.
    listener_fixed: bool,
    wake_fd: RawFd,
}

impl Submit for Ring {
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: our caller upholds `Submit::push`'s contract, which is `Ring::push`'s.
        unsafe { Ring::push(self, entry) }
    }
}

impl Io {
    /// Registers `bufs` with `ring` and takes ownership of all of it.
    pub fn new(
        ring: Ring,
        mut bufs: BufRing,
        sends: SendPool,
        name_space: usize,
        control_space: usize,
        listener_fd: RawFd,
        wake_fd: RawFd,
    ) -> io::Result<Io> {
        let listener_fixed = ring
            .uring()
            .submitter()
            .register_files(&[listener_fd])
            .is_ok();
        let mut sends = sends;
        if listener_fixed {
            sends.use_fixed_file(listener_fd, LISTENER_SLOT);
        }
        bufs.register(&ring).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot register the provided buffer ring ({e}): needs Linux 5.19+"),
            )
        })?;
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut recv_msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_msg.msg_namelen = name_space as u32;
        recv_msg.msg_controllen = control_space;
        Ok(Io {
            ring: ManuallyDrop::new(ring),
            bufs,
            sends,
            recv_msg: ManuallyDrop::new(recv_msg),
            wake_buf: ManuallyDrop::new(Box::new(0)),
            tick_spec: ManuallyDrop::new(Box::new(types::Timespec::new())),
            timer_spec: ManuallyDrop::new(Box::new(types::Timespec::new())),
            timer_update_spec: ManuallyDrop::new(Box::new(types::Timespec::new())),
            ledger: Ledger::default(),
            listener_fd,
            listener_fixed,
            wake_fd,
        })
    }

    pub fn ring(&mut self) -> &mut Ring {
        &mut self.ring
    }

    pub fn task_run_mode(&self) -> crate::ring::TaskRunMode {
        self.ring.mode()
    }

    /// Operations the kernel has yet to complete.
    pub fn in_flight(&self) -> usize {
        self.ledger.armed() + self.sends.in_flight()
    }

    pub fn submit_and_wait(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        self.ring.submit_and_wait(want, timeout)
    }

    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit()
    }

    /// The buffer a receive completion filled, taken out of the ring; the completion is spent
    /// (it is not `Copy`), so one completion yields at most one token. `None` when the
    /// completion carries no buffer, failed, or names a buffer outside the ring or one that is
    /// lent already (counted by the caller).
    pub fn take_buffer(&mut self, c: Completion) -> Option<RecvBuf> {
        let bid = buffer_id(c.flags())?;
        let len = u32::try_from(c.result()).ok()?;
        let kind = UserData::decode(c.user_data()).map(|ud| ud.kind);
        debug_assert!(matches!(kind, Some(OpKind::Recv | OpKind::SessionRecv)));
        // SAFETY: only `Ring::drain` makes a `Completion`, from this ring's completion queue
        // (`Io` owns the one ring and the one buffer ring), and it is consumed here, so the
        // kernel reported `bid` filled once. The only requests with BUFFER_SELECT are our
        // multishot receives, and each selects from `BUF_GROUP`, which only `bufs` registers
        // on this ring. `take` refuses an id that is lent already in every build.
        unsafe { self.bufs.take(bid, len) }
    }

    /// Pushes the turn's replies (they reach the kernel with the next enter).
    pub fn flush(&mut self) -> Result<usize, FlushError> {
        self.sends.flush(&mut *self.ring)
    }

    /// Arms the listener's multishot receive.
    pub fn arm_recv(&mut self) -> io::Result<()> {
        let generation = next_generation(self.ledger.recv_generation);
        let ud = UserData::new(OpKind::Recv, generation, 0);
        let msg = &**self.recv_msg;
        let entry = if self.listener_fixed {
            opcode::RecvMsgMulti::new(types::Fixed(LISTENER_SLOT), msg, BUF_GROUP).build()
        } else {
            opcode::RecvMsgMulti::new(types::Fd(self.listener_fd), msg, BUF_GROUP).build()
        }
        .user_data(ud.encode());
        // SAFETY: `recv_msg` is boxed (it never moves) and freed only after the ring is closed
        // with nothing in flight (`Drop`); the kernel writes only into buffers of `BUF_GROUP`,
        // which `bufs` owns under the same rule.
        unsafe { self.ring.push(&entry) }?;
        self.ledger.recv_generation = generation;
        self.ledger.recv_armed = true;
        Ok(())
    }

    /// Arms the multishot receive of session `id`'s own socket `fd`. The caller keeps `fd`
    /// open until the request's final completion. Always `RECVMSG`, also on a connected
    /// socket: a payload-only `RECV` would be cheaper, but a few datagrams of other peers
    /// still reach a socket just after its `connect()` returns (they were looked up before
    /// it), and only the source address in the `RECVMSG` header lets the router send them to
    /// their own sessions (tried: `connect_race_loses_nothing_and_misroutes_nothing` then saw
    /// another client's datagram attributed to the socket's peer).
    pub fn arm_session_recv(&mut self, fd: RawFd, id: SessionId) -> io::Result<()> {
        let ud = UserData::new(OpKind::SessionRecv, id.generation, id.slot);
        let entry = opcode::RecvMsgMulti::new(types::Fd(fd), &**self.recv_msg, BUF_GROUP)
            .build()
            .user_data(ud.encode());
        // SAFETY: as in `arm_recv`; the descriptor's lifetime is the caller's promise.
        unsafe { self.ring.push(&entry) }?;
        self.ledger.session_recvs += 1;
        Ok(())
    }

    /// Arms the read of the wake-up eventfd (kept open by the worker's `WorkerShared`).
    pub fn arm_wake(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.wake_fd),
            (&mut **self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(UserData::new(OpKind::Wake, 0, 0).encode());
        debug_assert!(!self.ledger.wake_armed);
        // SAFETY: `wake_buf` is boxed, 8 bytes, and freed only after the ring is closed with
        // nothing in flight; `wake_armed` keeps a second read from sharing it.
        unsafe { self.ring.push(&entry) }?;
        self.ledger.wake_armed = true;
        Ok(())
    }

    /// Arms the idle timer `after_ms` from now (at least 1 ms). One at a time.
    pub fn arm_tick(&mut self, after_ms: u64) -> io::Result<()> {
        debug_assert!(!self.ledger.tick_armed);
        let after_ms = after_ms.max(1);
        **self.tick_spec = types::Timespec::new()
            .sec(after_ms / 1000)
            .nsec(((after_ms % 1000) * 1_000_000) as u32);
        let entry = opcode::Timeout::new(&**self.tick_spec)
            .build()
            .user_data(UserData::new(OpKind::Tick, 0, 0).encode());
        // SAFETY: `tick_spec` is boxed, freed only after the ring is closed with nothing in
        // flight, and rewritten only here, while no timeout is armed (asserted above).
        unsafe { self.ring.push(&entry) }?;
        self.ledger.tick_armed = true;
        Ok(())
    }

    /// Arms the handler's timer `after` from now. One at a time.
    pub fn arm_timer(&mut self, after: Duration) -> io::Result<()> {
        debug_assert!(!self.ledger.timer_armed);
        **self.timer_spec = timespec(after);
        let generation = next_generation(self.ledger.timer_generation);
        let entry = opcode::Timeout::new(&**self.timer_spec)
            .build()
            .user_data(UserData::new(OpKind::Timer, generation, 0).encode());
        // SAFETY: `timer_spec` is boxed, freed only after the ring is closed with nothing in
        // flight, and rewritten only here, while no handler timer is armed (asserted above).
        unsafe { self.ring.push(&entry) }?;
        self.ledger.timer_generation = generation;
        self.ledger.timer_armed = true;
        Ok(())
    }

    /// The `user_data` of the armed handler timer (to update or cancel it).
    pub fn timer_user_data(&self) -> UserData {
        UserData::new(OpKind::Timer, self.ledger.timer_generation, 0)
    }

    /// Moves the armed handler timer to `after` from now (`IORING_TIMEOUT_UPDATE`, 5.11).
    /// One update at a time; its completion says whether the timer was still armed.
    pub fn update_timer(&mut self, after: Duration) -> io::Result<()> {
        debug_assert!(!self.ledger.timer_updating);
        **self.timer_update_spec = timespec(after);
        let entry =
            opcode::TimeoutUpdate::new(self.timer_user_data().encode(), &**self.timer_update_spec)
                .build()
                .user_data(UserData::new(OpKind::TimerUpdate, 0, 0).encode());
        // SAFETY: `timer_update_spec` is boxed, freed only after the ring is closed with
        // nothing in flight, and rewritten only here, while no update is in flight (asserted
        // above; the ledger flag clears on the update's completion).
        unsafe { self.ring.push(&entry) }?;
        self.ledger.timer_updating = true;
        Ok(())
    }

    /// Cancels the operation `target` names; its final completion still arrives.
    pub fn cancel(&mut self, target: UserData) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target.encode())
            .build()
            .user_data(UserData::new(OpKind::Cancel, 0, 0).encode());
        // SAFETY: a cancel request carries no pointers.
        unsafe { self.ring.push(&entry) }?;
        self.ledger.cancels += 1;
        Ok(())
    }
}

/// A relative timeout of `after`, at least 1 µs (a zero timespec would fire at once, which is
/// what "at least" rounds to anyway).
fn timespec(after: Duration) -> types::Timespec {
    let after = after.max(Duration::from_micros(1));
    types::Timespec::new()
        .sec(after.as_secs())
        .nsec(after.subsec_nanos())
}

impl Drop for Io {
    fn drop(&mut self) {
        if self.bufs.refused() > 0 {
            // Each one a bug (a buffer reported twice, a token recycled twice or into the
            // wrong ring), refused so the kernel never wrote into a buffer being read.
            tracing::error!(
                refused = self.bufs.refused(),
                "receive buffer tokens were refused"
            );
        }
        let in_flight = self.in_flight();
        if in_flight == 0 {
            // SAFETY: no receive is in flight (the ledger counts every armed one), so none can
            // be holding a buffer of the group.
            if let Err(e) = unsafe { self.bufs.unregister(&self.ring) } {
                tracing::warn!(error = %e, "cannot unregister the provided buffer ring");
            }
            // The registered file table holds its own reference to the listener: released
            // here, the socket closes with its descriptor. Left to the ring's asynchronous
            // teardown, the port stays bound for a while after the process has exited, and
            // a server started right after finds it taken.
            if self.listener_fixed {
                if let Err(e) = self.ring.uring().submitter().unregister_files() {
                    tracing::warn!(error = %e, "cannot unregister the ring's file table");
                }
            }
        } else {
            // The loop logged why (a shutdown timeout or a ring error); one line per event.
            tracing::debug!(
                in_flight,
                "leaking receive buffers and send slots still in use by the kernel"
            );
        }
        // SAFETY: dropped exactly once, here; the fields below are not used by it.
        unsafe { ManuallyDrop::drop(&mut self.ring) };
        if in_flight == 0 {
            // SAFETY: the ring is closed and nothing was in flight: the kernel holds no
            // pointer into these boxes. Each is dropped exactly once, here.
            unsafe {
                ManuallyDrop::drop(&mut self.recv_msg);
                ManuallyDrop::drop(&mut self.wake_buf);
                ManuallyDrop::drop(&mut self.tick_spec);
                ManuallyDrop::drop(&mut self.timer_spec);
                ManuallyDrop::drop(&mut self.timer_update_spec);
            }
        }
        // `bufs` and `sends` drop after this body, as fields: `bufs` unmaps only if it was
        // unregistered above, `sends` frees only if none of its slots is in flight; either
        // leaks otherwise.
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::buf_ring::BufRing;

    fn io_for(listener: RawFd, wake: RawFd) -> Option<Io> {
        let Ok(ring) = Ring::new(8, 16) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "io_uring unavailable"
            );
            eprintln!("skipped: io_uring unavailable");
            return None;
        };
        let bufs = BufRing::new(4, 4096, BUF_GROUP).unwrap();
        let sends = SendPool::new(4, 64, false, false).unwrap();
        Some(Io::new(ring, bufs, sends, 16, 0, listener, wake).unwrap())
    }

    /// Issue 14, defect 7: a `Copy` completion could be handed to `take_buffer` twice and
    /// yield two tokens for one buffer. Now a completion is spent taking its buffer, and a
    /// second completion naming a buffer that is still out (a kernel bug) is refused.
    #[test]
    fn a_buffer_is_taken_once() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let wake = crate::sys::eventfd().unwrap();
        let Some(mut io) = io_for(socket.as_raw_fd(), wake.as_raw_fd()) else {
            return;
        };
        // IORING_CQE_F_BUFFER with buffer id 2 above IORING_CQE_BUFFER_SHIFT (16).
        let flags = 1 | (2 << 16);
        let ud = UserData::new(OpKind::Recv, 0, 0).encode();
        // SAFETY: no receive was ever armed on this ring, so the kernel selects and writes no
        // buffer of the group. The second completion names buffer 2 again on purpose.
        let (first, again) = unsafe {
            (
                Completion::forged(ud, 40, flags),
                Completion::forged(ud, 40, flags),
            )
        };
        let buf = io.take_buffer(first).expect("the buffer");
        assert_eq!(io.bufs.bytes(&buf).len(), 40);
        assert!(
            io.take_buffer(again).is_none(),
            "a second token for buffer 2"
        );
        assert_eq!(io.bufs.available(), 3);
        assert_eq!(io.bufs.refused(), 1);
        io.bufs.recycle(buf);
        assert_eq!(io.bufs.available(), 4);
    }

    /// Issue 8, finding 2: the worker freed the buffers before the ring went. Now teardown
    /// closes the ring first and frees only what no armed operation can reach.
    #[test]
    fn teardown_frees_buffers_only_when_nothing_is_in_flight() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let wake = crate::sys::eventfd().unwrap();
        let fd = socket.as_raw_fd();

        // A receive armed and never completed: the buffers stay mapped after the drop.
        let Some(mut io) = io_for(fd, wake.as_raw_fd()) else {
            return;
        };
        io.arm_recv().unwrap();
        io.submit().unwrap();
        assert_eq!(io.in_flight(), 1);
        let (addr, len) = io.bufs.buffers_range();
        drop(io);
        assert!(BufRing::buffers_mapped_at(addr, len), "in flight: leaked");

        // Nothing armed: the group is unregistered, the ring closed, the buffers unmapped.
        let io = io_for(fd, wake.as_raw_fd()).unwrap();
        let (addr, len) = io.bufs.buffers_range();
        drop(io);
        assert!(!BufRing::buffers_mapped_at(addr, len), "idle: freed");
    }
}
