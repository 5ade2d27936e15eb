//! systemd socket activation (sd_listen_fds(3)): the service manager binds the sockets of a
//! `.socket` unit and passes them to the service as descriptors 3, 4, … with `LISTEN_FDS` (how
//! many), `LISTEN_PID` (for which process) and `LISTEN_FDNAMES` (their names). Because the
//! manager keeps them open between restarts, datagrams that arrive while the service restarts
//! wait in their queues instead of being refused.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The sockets passed to this process, or `None` when it was not socket-activated (no
/// `LISTEN_FDS`, or `LISTEN_PID` names another process, e.g. a parent that forgot to unset
/// them). Takes ownership of descriptors 3 … 3+N-1; call it once, early, before anything else
/// opens descriptors. The variables are left in place (removing them is not thread-safe);
/// `LISTEN_PID` keeps children from taking the sockets as theirs.
pub fn listen_fds() -> io::Result<Option<Vec<OwnedFd>>> {
    let Ok(count) = std::env::var("LISTEN_FDS") else {
        return Ok(None);
    };
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    if !for_us {
        return Ok(None);
    }
    let count: RawFd = count.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("LISTEN_FDS is not a number: {count:?}"),
        )
    })?;
    if !(1..=1024).contains(&count) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("LISTEN_FDS must be 1..=1024 sockets, got {count}"),
        ));
    }
    let mut fds = Vec::with_capacity(count as usize);
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        // SAFETY: fcntl(F_GETFD) only inspects the descriptor number.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("LISTEN_FDS={count} but descriptor {fd} is not open"),
            ));
        }
        // SAFETY: the service manager passed descriptors 3.. for this process
        // (`LISTEN_PID` says so) and nothing in it has used them: they are open (checked
        // above) and owned by nobody else. Ownership moves into the returned vector.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(Some(fds))
}

/// The names systemd gave the passed sockets (`FileDescriptorName=`, default the socket
/// unit's name), for the log.
pub fn listen_fd_names() -> Vec<String> {
    std::env::var("LISTEN_FDNAMES")
        .map(|names| names.split(':').map(str::to_string).collect())
        .unwrap_or_default()
}
