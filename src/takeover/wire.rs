//! The takeover socket's messages: one datagram of a `SOCK_SEQPACKET` Unix socket each,
//! with at most one descriptor attached (`SCM_RIGHTS`, unix(7)), and the peer's
//! credentials (`SO_PEERCRED`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use socket2::Socket;

use crate::sys::cvt;

/// Waits up to `timeout_ms` for `socket` to be readable.
pub(super) fn readable(socket: &Socket, timeout_ms: libc::c_int) -> bool {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one live, initialised pollfd and the count passed is 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// Room for one `SCM_RIGHTS` message with one descriptor, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct OneFdControl([u8; 32]);

/// Sends one message, with `fd` attached as `SCM_RIGHTS` when given.
pub(super) fn send(socket: &Socket, payload: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    let mut control = OneFdControl([0; 32]);
    // SAFETY: msghdr is plain data; every field used is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE and CMSG_LEN compute sizes from a constant; no memory is read.
        let (space, len) = unsafe {
            let n = std::mem::size_of::<RawFd>() as u32;
            (libc::CMSG_SPACE(n) as usize, libc::CMSG_LEN(n) as usize)
        };
        debug_assert!(space <= control.0.len());
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `msg` points at `control`, a live, zeroed, cmsghdr-aligned buffer of
        // `space` bytes, enough for one header and one descriptor (CMSG_SPACE); so
        // CMSG_FIRSTHDR is non-null and CMSG_DATA lies inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `msg` points at `iov` (which points at `payload`) and at `control`, all live
    // for the call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message into `buf`, with the descriptor it carries, if any. A message cut
/// short or carrying more than one descriptor is an error (and the extra ones are closed).
pub(super) fn recv(socket: &Socket, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = OneFdControl([0; 32]);
    // SAFETY: msghdr is plain data; every field used is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len();
    let n = loop {
        // SAFETY: `msg` points at `iov` (which points at `buf`, `buf.len()` bytes) and at
        // `control` (its full length), all live and writable for the call.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // Every descriptor the kernel installed is taken into an `OwnedFd` before anything is
    // checked, so each error below closes them all (the kernel itself closes those that did
    // not fit, the case it flags with MSG_CTRUNC: scm_detach_fds in net/core/scm.c).
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to `msg.msg_controllen`; CMSG_FIRSTHDR and
    // CMSG_NXTHDR stay inside it, and each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / 4 descriptors that are now ours and nobody else's.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len).saturating_sub(libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 || fds.len() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a takeover message cut short (MSG_TRUNC, MSG_CTRUNC) or with several descriptors",
        ));
    }
    Ok((n, fds.pop()))
}

/// The peer's pid and uid (`SO_PEERCRED`, unix(7)).
pub(super) fn peer_cred(socket: &Socket) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals; the kernel writes at most `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred)
}
