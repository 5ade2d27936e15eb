//! A worker's kernel side: the ring, the listening socket, the memory the kernel reads for
//! the worker's own requests (the receive `msghdr`, the wake-up and timer words) and the
//! ledger of everything in flight. Every `SQE` the worker submits is pushed here and
//! recorded in the ledger; the receiver's buffers and the send pool's slots, which the kernel
//! also reads and writes, belong to their parts (`receive`, `send`) and are freed by them
//! only while the ledger shows nothing in flight.
//!
//! Teardown order is part of soundness: `Drop` closes the ring *before* any of this memory is
//! freed, and frees it only if the ledger shows nothing in flight; otherwise it is leaked (the
//! kernel cancels outstanding requests asynchronously after the ring's file is closed and may
//! still write into it). The listening socket closes after the ring.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use io_uring::{opcode, squeue, types};

use super::ledger::Ledger;
use crate::op::{OpKind, UserData};
use crate::ring::{Completion, Ring};
use crate::send_pool::Submit;
use crate::session::SessionId;
use crate::socket::BoundSocket;

/// The buffer group every worker's receive ring registers. Each worker has its own io_uring,
/// so the ids do not collide; `BufRing` remembers which io_uring its registration belongs to
/// and unregisters only from that one.
pub(super) const BUF_GROUP: u16 = 0;

/// The listener's slot in the ring's registered file table.
const LISTENER_SLOT: u32 = 0;

pub(super) struct Io {
    /// Dropped by hand in `Drop`, before the memory below.
    ring: ManuallyDrop<Ring>,
    /// The listening socket: every receive and reply naming it is in the ledger, and it
    /// closes (as a field, after `Drop::drop`) only once the ring has.
    listener: BoundSocket,
    /// The listener is slot 0 of the ring's registered file table (`IORING_REGISTER_FILES`,
    /// 5.1): its receive and the replies sent from it name the slot, and the kernel skips the
    /// per-request `fget`/`fput` of the descriptor.
    listener_fixed: bool,
    wake_fd: RawFd,
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
    ledger: Ledger,
}

/// The send pool's pushes (`SendPool::flush`): each entry is a send, recorded in the ledger
/// once the ring has taken it.
impl Submit for Io {
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: our caller upholds `Submit::push`'s contract, which is `Ring::push`'s.
        unsafe { self.ring.push(entry) }?;
        self.ledger.pushed(OpKind::Send, 0);
        Ok(())
    }
}

impl Io {
    /// Takes the ring and the listening socket; receives will use `name_space` and
    /// `control_space` bytes of each buffer for the peer's address and control messages.
    pub fn new(
        ring: Ring,
        listener: BoundSocket,
        name_space: usize,
        control_space: usize,
        wake_fd: RawFd,
    ) -> Io {
        let listener_fixed = ring
            .uring()
            .submitter()
            .register_files(&[listener.socket.as_raw_fd()])
            .is_ok();
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut recv_msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_msg.msg_namelen = name_space as u32;
        recv_msg.msg_controllen = control_space;
        Io {
            ring: ManuallyDrop::new(ring),
            listener,
            listener_fixed,
            wake_fd,
            recv_msg: ManuallyDrop::new(recv_msg),
            wake_buf: ManuallyDrop::new(Box::new(0)),
            tick_spec: ManuallyDrop::new(Box::new(types::Timespec::new())),
            timer_spec: ManuallyDrop::new(Box::new(types::Timespec::new())),
            timer_update_spec: ManuallyDrop::new(Box::new(types::Timespec::new())),
            ledger: Ledger::default(),
        }
    }

    /// The ring, for registrations tied to it (the receiver's buffer group).
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn listener(&self) -> &BoundSocket {
        &self.listener
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.socket.as_raw_fd()
    }

    /// The listener's slot in the registered file table, if the kernel took it.
    pub fn listener_slot(&self) -> Option<u32> {
        self.listener_fixed.then_some(LISTENER_SLOT)
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Records a completion in the ledger (see `Ledger::completed`).
    #[inline]
    pub fn completed(&mut self, ud: UserData, more: bool) -> bool {
        self.ledger.completed(ud, more)
    }

    /// Moves the completions the kernel has posted into `out`.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        self.ring.drain(out)
    }

    pub fn has_completions(&mut self) -> bool {
        self.ring.has_completions()
    }

    /// Entries pushed that the kernel has not taken yet.
    pub fn unsubmitted(&mut self) -> usize {
        self.ring.unsubmitted()
    }

    pub fn task_run_mode(&self) -> crate::ring::TaskRunMode {
        self.ring.mode()
    }

    /// Operations the kernel has yet to complete.
    pub fn in_flight(&self) -> usize {
        self.ledger.in_flight()
    }

    pub fn submit_and_wait(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        self.ring.submit_and_wait(want, timeout)
    }

    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit()
    }

    /// Arms the listener's multishot receive.
    pub fn arm_recv(&mut self) -> io::Result<()> {
        let ud = self.ledger.next(OpKind::Recv);
        let msg = &**self.recv_msg;
        let entry = if self.listener_fixed {
            opcode::RecvMsgMulti::new(types::Fixed(LISTENER_SLOT), msg, BUF_GROUP).build()
        } else {
            opcode::RecvMsgMulti::new(types::Fd(self.listener_fd()), msg, BUF_GROUP).build()
        }
        .user_data(ud.encode());
        // SAFETY: `recv_msg` is boxed (it never moves) and freed only after the ring is closed
        // with nothing in flight (`Drop`); the kernel writes only into buffers of `BUF_GROUP`,
        // which the receiver frees only once it has unregistered them with nothing in flight
        // (`Receiver::release_buffers`), or leaks. The listener closes after the ring.
        unsafe { self.push(&entry, ud) }
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
        unsafe { self.push(&entry, ud) }
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
        debug_assert!(!self.ledger.wake_armed());
        // SAFETY: `wake_buf` is boxed, 8 bytes, and freed only after the ring is closed with
        // nothing in flight; `wake_armed` keeps a second read from sharing it.
        unsafe { self.push(&entry, UserData::new(OpKind::Wake, 0, 0)) }
    }

    /// Arms the idle timer `after_ms` from now (at least 1 ms). One at a time.
    pub fn arm_tick(&mut self, after_ms: u64) -> io::Result<()> {
        debug_assert!(!self.ledger.tick_armed());
        let after_ms = after_ms.max(1);
        **self.tick_spec = types::Timespec::new()
            .sec(after_ms / 1000)
            .nsec(((after_ms % 1000) * 1_000_000) as u32);
        let entry = opcode::Timeout::new(&**self.tick_spec)
            .build()
            .user_data(UserData::new(OpKind::Tick, 0, 0).encode());
        // SAFETY: `tick_spec` is boxed, freed only after the ring is closed with nothing in
        // flight, and rewritten only here, while no timeout is armed (asserted above).
        unsafe { self.push(&entry, UserData::new(OpKind::Tick, 0, 0)) }
    }

    /// Arms the handler's timer `after` from now. One at a time.
    pub fn arm_timer(&mut self, after: Duration) -> io::Result<()> {
        debug_assert!(!self.ledger.timer_armed());
        **self.timer_spec = timespec(after);
        let ud = self.ledger.next(OpKind::Timer);
        let entry = opcode::Timeout::new(&**self.timer_spec)
            .build()
            .user_data(ud.encode());
        // SAFETY: `timer_spec` is boxed, freed only after the ring is closed with nothing in
        // flight, and rewritten only here, while no handler timer is armed (asserted above).
        unsafe { self.push(&entry, ud) }
    }

    /// Moves the armed handler timer to `after` from now (`IORING_TIMEOUT_UPDATE`, 5.11).
    /// One update at a time; its completion says whether the timer was still armed.
    pub fn update_timer(&mut self, after: Duration) -> io::Result<()> {
        debug_assert!(!self.ledger.timer_updating());
        **self.timer_update_spec = timespec(after);
        let entry =
            opcode::TimeoutUpdate::new(self.ledger.timer().encode(), &**self.timer_update_spec)
                .build()
                .user_data(UserData::new(OpKind::TimerUpdate, 0, 0).encode());
        // SAFETY: `timer_update_spec` is boxed, freed only after the ring is closed with
        // nothing in flight, and rewritten only here, while no update is in flight (asserted
        // above; the ledger flag clears on the update's completion).
        unsafe { self.push(&entry, UserData::new(OpKind::TimerUpdate, 0, 0)) }
    }

    /// Cancels the operation `target` names; its final completion still arrives.
    pub fn cancel(&mut self, target: UserData) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target.encode())
            .build()
            .user_data(UserData::new(OpKind::Cancel, 0, 0).encode());
        // SAFETY: a cancel request carries no pointers.
        unsafe { self.push(&entry, UserData::new(OpKind::Cancel, 0, 0)) }
    }

    /// Pushes `entry`, which carries `ud`, and records it in the ledger.
    ///
    /// # Safety
    /// As `Ring::push`: every pointer inside `entry` stays valid and unmoved until the kernel
    /// posts the operation's final completion.
    unsafe fn push(&mut self, entry: &squeue::Entry, ud: UserData) -> io::Result<()> {
        // SAFETY: our caller upholds `Ring::push`'s contract.
        unsafe { self.ring.push(entry) }?;
        self.ledger.pushed(ud.kind, ud.generation);
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
        let in_flight = self.in_flight();
        if in_flight == 0 {
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
                "leaking receive headers and timer words still in use by the kernel"
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
        // `listener` closes after this body, as a field: after the ring.
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::net::UdpSocket;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::time::Instant;

    use super::*;
    use crate::ring::has_more;
    use crate::send_pool::{Dest, SendPool};
    use crate::socket::bind_worker_socket;

    /// An `Io` on a fresh ring and a loopback listener, with the eventfd its wake-up read
    /// names (keep it alive as long as the `Io`); `None` where io_uring is unavailable.
    pub(in crate::worker) fn io() -> Option<(Io, OwnedFd)> {
        let Ok(ring) = Ring::new(8, 16) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "io_uring unavailable"
            );
            eprintln!("skipped: io_uring unavailable");
            return None;
        };
        let listener =
            bind_worker_socket("127.0.0.1:0".parse().unwrap(), 1 << 16, 1 << 16, false).unwrap();
        let wake = crate::sys::eventfd().unwrap();
        let io = Io::new(ring, listener, 16, 0, wake.as_raw_fd());
        Some((io, wake))
    }

    /// Issue 14, shape: the send pool kept its own count of sends in flight beside the
    /// ledger. Now the ledger is the one count: each send the pool pushes through `Io` is in
    /// it until its completion.
    #[test]
    fn sends_are_in_the_ledger_from_push_to_completion() {
        let Some((mut io, _wake)) = io() else {
            return;
        };
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut pool = SendPool::new(4, 64, false, false).unwrap();
        let dest = Dest {
            fd: io.listener_fd(),
            peer: peer.local_addr().unwrap(),
            local: None,
            connected: false,
        };
        // Without GSO, two replies are two entries.
        pool.queue_bytes(dest, b"one").unwrap();
        pool.queue_bytes(dest, b"two").unwrap();
        assert_eq!(pool.flush(&mut io).unwrap(), 2);
        assert_eq!(io.in_flight(), 2);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut completions = Vec::new();
        while io.in_flight() > 0 {
            assert!(Instant::now() < deadline, "the sends never completed");
            io.submit_and_wait(1, Some(Duration::from_millis(100)))
                .unwrap();
            io.drain(&mut completions);
            for c in completions.drain(..) {
                let ud = UserData::decode(c.user_data()).unwrap();
                assert_eq!(ud.kind, OpKind::Send);
                assert_eq!(c.result(), 3);
                assert!(pool.complete(ud).is_some());
                assert!(io.completed(ud, has_more(c.flags())));
            }
        }
        assert_eq!(pool.free_slots(), 4);
    }
}
