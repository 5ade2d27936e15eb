//! io_uring set-up with flag fallback, submission and completion harvesting.
//!
//! Pushing an entry is the one `unsafe` act of the engine: the entry carries raw pointers
//! (a `msghdr`, a buffer) that the kernel will read or write until the operation completes.

use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use io_uring::{cqueue, squeue, types, IoUring};

/// The set-up flags a ring ended up with, for logs and `udpring probe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskRunMode {
    /// `SINGLE_ISSUER | DEFER_TASKRUN` (6.1): completions are posted only when we wait, in one
    /// batch, on our own thread; no inter-processor interrupts to run task work.
    Deferred,
    /// `COOP_TASKRUN | TASKRUN_FLAG` (5.19): task work waits for our next kernel entry.
    Cooperative,
    /// No task-run flag: the kernel interrupts the thread to run task work.
    Plain,
}

impl TaskRunMode {
    /// The set-up flags, as the kernel's headers spell them.
    pub fn describe(self) -> &'static str {
        match self {
            TaskRunMode::Deferred => "SINGLE_ISSUER|DEFER_TASKRUN",
            TaskRunMode::Cooperative => "COOP_TASKRUN|TASKRUN_FLAG",
            TaskRunMode::Plain => "no task-run flags",
        }
    }
}

/// A completion copied out of the completion queue.
///
/// Neither `Copy` nor `Clone`, and made only by [`Ring::drain`]: a completion that names a
/// provided buffer is the kernel's word that the buffer is filled and ours, so it must be
/// spent once (taking the buffer consumes it) and cannot be made up by safe code.
#[derive(Debug)]
pub struct Completion {
    user_data: u64,
    result: i32,
    flags: u32,
}

impl Completion {
    /// The `user_data` of the request it completes.
    #[inline]
    pub fn user_data(&self) -> u64 {
        self.user_data
    }

    /// The request's result: a count, or a negated errno.
    #[inline]
    pub fn result(&self) -> i32 {
        self.result
    }

    /// `IORING_CQE_F_*` flags (`F_MORE`, `F_BUFFER` with the buffer id above them).
    #[inline]
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// A completion the kernel did not post, for tests.
    ///
    /// # Safety
    /// If `flags` names a provided buffer, that buffer must not be one the kernel can write
    /// (its ring is not registered) and must not be named by another live completion.
    #[cfg(test)]
    pub(crate) unsafe fn forged(user_data: u64, result: i32, flags: u32) -> Completion {
        Completion {
            user_data,
            result,
            flags,
        }
    }
}

/// Where ring identities come from: never reused within a process.
static NEXT_RING_ID: AtomicU64 = AtomicU64::new(1);

/// One worker's ring.
///
/// Not `Send`: the registered ring index (below) is an index into the *thread's* table of
/// registered rings (`current->io_uring->registered_rings`), so enters and the unregistration
/// in `Drop` must happen on the thread that made the ring, as does every submission of a
/// `SINGLE_ISSUER` ring.
pub struct Ring {
    uring: IoUring,
    mode: TaskRunMode,
    /// The ring's own descriptor registered with `IORING_REGISTER_RING_FDS` (5.18): every enter
    /// passes this index with `IORING_ENTER_REGISTERED_RING`, which skips the kernel's file
    /// lookup (`fdget`/`fdput`) on each `io_uring_enter`. `None` where the kernel refused it.
    /// Unregistered in `Drop`: the thread's table holds a reference to the ring's file (the
    /// ring outlives its descriptor until the thread exits) and has only 16 places.
    registered_index: Option<u32>,
    /// This ring's identity, for registrations tied to it (a buffer group).
    id: u64,
    _not_send: PhantomData<*const ()>,
}

// From include/uapi/linux/io_uring.h; the libc crate does not carry them.
const IORING_ENTER_GETEVENTS: u32 = 1 << 0;
const IORING_ENTER_EXT_ARG: u32 = 1 << 3;
const IORING_ENTER_REGISTERED_RING: u32 = 1 << 4;
const IORING_ENTER_NO_IOWAIT: u32 = 1 << 7;
const IORING_REGISTER_RING_FDS: libc::c_uint = 20;
const IORING_UNREGISTER_RING_FDS: libc::c_uint = 21;

/// `struct io_uring_rsrc_update`.
#[repr(C)]
struct RsrcUpdate {
    offset: u32,
    resv: u32,
    data: u64,
}

/// `struct io_uring_getevents_arg` (with `IORING_ENTER_EXT_ARG`).
#[repr(C)]
struct GeteventsArg {
    sigmask: u64,
    sigmask_sz: u32,
    min_wait_usec: u32,
    ts: u64,
}

/// Registers `uring`'s descriptor for `IORING_ENTER_REGISTERED_RING`; its index, or `None`.
fn register_ring_fd(uring: &IoUring) -> Option<u32> {
    let mut update = RsrcUpdate {
        // u32::MAX: let the kernel pick a free slot and write it back here.
        offset: u32::MAX,
        resv: 0,
        data: uring.as_raw_fd() as u64,
    };
    // SAFETY: `update` is a live local holding one `io_uring_rsrc_update`, the count passed;
    // the kernel reads it and writes the chosen index back into `offset` during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            uring.as_raw_fd(),
            IORING_REGISTER_RING_FDS,
            &mut update as *mut RsrcUpdate,
            1,
        )
    };
    (rc == 1).then_some(update.offset)
}

/// Removes registered ring index `index` from this thread's table.
fn unregister_ring_fd(uring: &IoUring, index: u32) -> io::Result<()> {
    let mut update = RsrcUpdate {
        offset: index,
        resv: 0,
        data: 0,
    };
    // SAFETY: as in `register_ring_fd`: `update` is a live local holding the one entry the
    // count says; the kernel reads `offset` during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            uring.as_raw_fd(),
            IORING_UNREGISTER_RING_FDS,
            &mut update as *mut RsrcUpdate,
            1,
        )
    };
    match rc {
        1 => Ok(()),
        -1 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::other(
            "IORING_UNREGISTER_RING_FDS removed nothing",
        )),
    }
}

/// Explains an io_uring set-up failure in terms of what the user can do about it.
pub fn explain_setup_error(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring is not available: the kernel lacks io_uring (needs Linux 5.1+, udpring needs 6.0+) or a seccomp profile hides it; run udpring outside the sandbox or allow io_uring_setup/io_uring_enter/io_uring_register".to_string(),
        Some(libc::EPERM) => "io_uring is not permitted: sysctl kernel.io_uring_disabled is set (set it to 0, or 1 and add this user to kernel.io_uring_group) or a container seccomp profile blocks it (allow io_uring_setup/io_uring_enter/io_uring_register)".to_string(),
        Some(libc::ENOMEM) => "io_uring set-up ran out of locked memory: raise RLIMIT_MEMLOCK (ulimit -l) or use fewer buffers".to_string(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "out of file descriptors while creating the ring: raise ulimit -n".to_string(),
        _ => format!("io_uring set-up failed: {err}"),
    }
}

impl Ring {
    /// Builds a ring with `sq_entries` submission slots and `cq_entries` completion slots,
    /// asking for the cheapest task-run mode and falling back when the kernel says EINVAL.
    pub fn new(sq_entries: u32, cq_entries: u32) -> io::Result<Ring> {
        let attempts = [
            TaskRunMode::Deferred,
            TaskRunMode::Cooperative,
            TaskRunMode::Plain,
        ];
        let mut last_err = None;
        for mode in attempts {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(cq_entries).setup_clamp();
            match mode {
                TaskRunMode::Deferred => {
                    builder.setup_single_issuer().setup_defer_taskrun();
                }
                TaskRunMode::Cooperative => {
                    builder.setup_coop_taskrun().setup_taskrun_flag();
                }
                TaskRunMode::Plain => {}
            }
            match builder.build(sq_entries) {
                Ok(uring) => {
                    let registered_index = register_ring_fd(&uring);
                    return Ok(Ring {
                        uring,
                        mode,
                        registered_index,
                        id: NEXT_RING_ID.fetch_add(1, Ordering::Relaxed),
                        _not_send: PhantomData,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("io_uring set-up failed")))
    }

    pub fn mode(&self) -> TaskRunMode {
        self.mode
    }

    pub fn uring(&self) -> &IoUring {
        &self.uring
    }

    /// This ring's identity: unique in the process, never reused.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Queues `entry`, submitting what is queued first if the submission queue is full.
    ///
    /// # Safety
    /// Every pointer inside `entry` (message headers, buffers, addresses) must stay valid and
    /// unmoved until the kernel posts the operation's final completion.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller upholds the pointer-validity contract stated above.
            let pushed = unsafe { self.uring.submission().push(entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            // Full: hand what is queued to the kernel and try again.
            match self.uring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is overflowing; the caller drains it next turn.
                    // Waiting here cannot help, so report it.
                    return Err(e);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits what is queued and waits for at least `want` completions, or until `timeout`.
    /// Interrupted and timed-out waits return normally: the caller just drains what is there.
    ///
    /// Returning `Ok` does not mean every queued entry reached the kernel: it may take only
    /// some (it stops at the first entry that fails to initialise, `io_submit_sqes`) or none
    /// (`EBUSY`: completions overflowed and must be reaped first; `EAGAIN`: no memory for
    /// requests now), and then it does not wait either. What it left stays queued, in
    /// order, for the next enter: [`Ring::unsubmitted`] says how many, and nothing such an
    /// entry names (a descriptor, a buffer) may be released until it is 0. The caller reaps
    /// the completions that are there and enters again.
    ///
    /// One raw `io_uring_enter`, so that it can use the registered ring index (the crate's
    /// `Submitter` forgets a registration between calls).
    pub fn submit_and_wait(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        let (to_submit, cq_overflow, taskrun) = {
            let sq = self.uring.submission();
            (sq.len() as u32, sq.cq_overflow(), sq.taskrun())
        };
        let mut flags = 0;
        // Deferred task work (the receives) runs only in an enter that asks for events.
        if want > 0 || cq_overflow || taskrun {
            flags |= IORING_ENTER_GETEVENTS;
        }
        let ts;
        let arg;
        let (arg_ptr, arg_len) = match timeout {
            None => (std::ptr::null(), 0),
            Some(t) => {
                ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                arg = GeteventsArg {
                    sigmask: 0,
                    sigmask_sz: 8, // _NSIG / 8; ignored without a mask
                    min_wait_usec: 0,
                    ts: &ts as *const types::Timespec as u64,
                };
                flags |= IORING_ENTER_EXT_ARG;
                (
                    &arg as *const GeteventsArg as *const libc::c_void,
                    std::mem::size_of::<GeteventsArg>(),
                )
            }
        };
        // A worker waiting for datagrams is idle, not waiting for storage: without this flag
        // (6.15, IORING_FEAT_NO_IOWAIT) every wait with requests in flight goes through
        // `io_schedule_prepare`/`finish` and counts as iowait.
        if flags & IORING_ENTER_GETEVENTS != 0 && self.uring.params().is_feature_no_iowait() {
            flags |= IORING_ENTER_NO_IOWAIT;
        }
        let fd = match self.registered_index {
            Some(index) => {
                flags |= IORING_ENTER_REGISTERED_RING;
                index as libc::c_int
            }
            None => self.uring.as_raw_fd(),
        };
        // SAFETY: `fd` is this ring's descriptor or its registered index (flagged as such);
        // `arg_ptr` is null or points at `arg`, a live local whose `ts` points at `ts`, also a
        // live local, both read by the kernel only during the call; the entries submitted were
        // pushed under `push`'s contract.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                fd,
                to_submit,
                want as u32,
                flags,
                arg_ptr,
                arg_len,
            )
        };
        if rc >= 0 {
            // `rc` entries were consumed; any others stay queued (see `unsubmitted`).
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) | Some(libc::ETIME) => Ok(()),
            // The kernel took nothing and waited for nothing: whatever was queued is still
            // queued (`unsubmitted` says so, and keeps what the entries name alive); reaping
            // completions is what lets the kernel take them at the next enter.
            Some(libc::EBUSY) | Some(libc::EAGAIN) => Ok(()),
            _ => Err(e),
        }
    }

    /// Entries pushed but not yet consumed by the kernel (the submission queue's tail minus
    /// the head the kernel has advanced). The kernel resolves an entry's descriptor when it
    /// first issues it, inside the enter that consumes it (`io_issue_sqe` ->
    /// `io_assign_file`; later only for linked or `IOSQE_ASYNC` entries, which the engine
    /// never submits), so a descriptor that a pushed entry names may be closed (and its
    /// number reused) only once this is 0.
    pub fn unsubmitted(&mut self) -> usize {
        self.uring.submission().len()
    }

    /// Whether enters use the registered ring index.
    pub fn ring_fd_registered(&self) -> bool {
        self.registered_index.is_some()
    }

    /// Submits what is queued without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        self.submit_and_wait(0, None)
    }

    /// Whether completions are waiting in the completion queue.
    pub fn has_completions(&mut self) -> bool {
        let mut cq = self.uring.completion();
        cq.sync();
        !cq.is_empty()
    }

    /// Moves every available completion into `out` (which keeps its capacity across turns).
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        let mut cq = self.uring.completion();
        cq.sync();
        for cqe in &mut cq {
            out.push(Completion {
                user_data: cqe.user_data(),
                result: cqe.result(),
                flags: cqe.flags(),
            });
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Before the descriptor closes (the `uring` field drops after this body): the
        // thread's table entry refers to the ring's file, not to the descriptor.
        if let Some(index) = self.registered_index.take() {
            if let Err(e) = unregister_ring_fd(&self.uring, index) {
                tracing::warn!(error = %e, index, "cannot unregister the ring's descriptor");
            }
        }
    }
}

/// Whether more completions will follow for a multishot request.
#[inline]
pub fn has_more(flags: u32) -> bool {
    cqueue::more(flags)
}

/// The provided buffer a completion used, if any.
#[inline]
pub fn buffer_id(flags: u32) -> Option<u16> {
    cqueue::buffer_select(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14, defect 7: `Completion` was `Copy`, so one completion could yield two buffer
    /// tokens. This does not compile if `Completion` is `Copy` or `Clone` (the two impls
    /// below then both apply and the call is ambiguous).
    #[test]
    fn a_completion_cannot_be_duplicated() {
        trait AmbiguousIfDuplicable<A> {
            fn check() {}
        }
        impl<T: ?Sized> AmbiguousIfDuplicable<()> for T {}
        struct IsClone;
        impl<T: Clone> AmbiguousIfDuplicable<IsClone> for T {}
        <Completion as AmbiguousIfDuplicable<_>>::check();
        <crate::buf_ring::RecvBuf as AmbiguousIfDuplicable<_>>::check();
    }

    /// Issue 14, defect 9: `IORING_REGISTER_RING_FDS` was never undone, so each ring a thread
    /// made and dropped kept a place in the thread's table (16 of them) and kept the ring's
    /// file open until the thread exited: from the 17th ring on, enters went unregistered.
    #[test]
    fn dropped_rings_give_back_their_registered_index() {
        let outcome = std::thread::spawn(|| {
            let first = match Ring::new(8, 16) {
                Ok(ring) => ring,
                Err(e) => return Err(format!("io_uring unavailable: {e}")),
            };
            if !first.ring_fd_registered() {
                return Err("the kernel refuses IORING_REGISTER_RING_FDS".to_string());
            }
            drop(first);
            for n in 1..40 {
                let ring = Ring::new(8, 16).expect("ring");
                assert!(ring.ring_fd_registered(), "ring {n} could not register");
            }
            Ok(())
        })
        .join()
        .expect("the test thread panicked");
        if let Err(why) = outcome {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("skipped: {why}");
        }
    }

    #[test]
    fn ring_ids_are_unique() {
        let (Ok(a), Ok(b)) = (Ring::new(8, 16), Ring::new(8, 16)) else {
            return;
        };
        assert_ne!(a.id(), b.id());
    }
}
