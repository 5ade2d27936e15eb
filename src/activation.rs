//! systemd socket activation (sd_listen_fds(3)): the service manager binds the sockets of a
//! `.socket` unit and passes them to the service as descriptors 3, 4, … with `LISTEN_FDS` (how
//! many), `LISTEN_PID` (for which process) and `LISTEN_FDNAMES` (their names). Because the
//! manager keeps them open between restarts, datagrams that arrive while the service restarts
//! wait in their queues instead of being refused.
//!
//! The descriptors are taken once per process, as `sd_listen_fds(1)` does: the first call of
//! [`listen_fds`] owns them and unsets the variables; every later call gets nothing. So no
//! safe call can wrap a descriptor number a second time, after its first owner closed it and
//! the number went to something else (issue 14).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The most descriptors accepted, checked before anything is sized from `LISTEN_FDS`.
pub const MAX_LISTEN_FDS: usize = 1024;

/// Whether this process has looked for passed descriptors already.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The sockets the service manager passed, in the order it passed them.
#[derive(Debug)]
pub struct ListenFds {
    /// Descriptors 3 … 3+N-1, owned now (`FD_CLOEXEC` set: a child does not inherit them).
    pub fds: Vec<OwnedFd>,
    /// Their names (`FileDescriptorName=`, default the socket unit's name), from
    /// `LISTEN_FDNAMES`; empty when it was not set.
    pub names: Vec<String>,
}

/// The sockets passed to this process, or `None` when it was not socket-activated (no
/// `LISTEN_FDS`, or `LISTEN_PID` names another process) or when an earlier call already took
/// them. Call it early, before other threads run: like `sd_listen_fds(1)` it unsets
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` (so neither a later call nor a child takes
/// the sockets as theirs), and changing the environment races with C code reading it in
/// another thread.
///
/// An error (a bad `LISTEN_FDS`, a descriptor in the range not open) takes nothing: every
/// descriptor is checked before any is owned, so none is closed by the error either.
pub fn listen_fds() -> io::Result<Option<ListenFds>> {
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Ok(None);
    }
    let count = std::env::var("LISTEN_FDS").ok();
    let pid = std::env::var("LISTEN_PID").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let Some(count) = count else {
        return Ok(None);
    };
    if pid.and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(None);
    }
    let count: usize = count.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("LISTEN_FDS is not a number: {count:?}"),
        )
    })?;
    if !(1..=MAX_LISTEN_FDS).contains(&count) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("LISTEN_FDS must be 1..={MAX_LISTEN_FDS} sockets, got {count}"),
        ));
    }
    // In range: at most 3 + 1024.
    let end = LISTEN_FDS_START + count as RawFd;
    for fd in LISTEN_FDS_START..end {
        // SAFETY: fcntl(F_GETFD) only inspects the descriptor number.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("LISTEN_FDS={count} but descriptor {fd} is not open"),
            ));
        }
    }
    let fds = (LISTEN_FDS_START..end)
        .map(|fd| {
            // SAFETY: the service manager passed descriptors 3.. for this process
            // (`LISTEN_PID` says so), each is open (checked above), and nothing in it has
            // owned them: `TAKEN` lets this happen once per process, and the variables that
            // name them are gone. Ownership moves into the returned vector.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: fcntl(F_SETFD) on a descriptor this process owns (just above).
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            owned
        })
        .collect();
    let names = names
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    Ok(Some(ListenFds { fds, names }))
}
