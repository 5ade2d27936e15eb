//! Thin wrappers over the few raw libc calls the engine makes outside io_uring: eventfd,
//! signal masks, CPU affinity, uname and resource limits.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Turns the result of a libc call that returns -1 and sets `errno` on failure into an
/// `io::Result`. Each caller makes its own `unsafe` call and states, at that call, why its
/// arguments are valid.
pub(crate) fn cvt(res: libc::c_int) -> io::Result<libc::c_int> {
    if res == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(res)
    }
}

/// A non-blocking eventfd, used to wake a worker's ring from another thread.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointers.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `fd` was just returned by eventfd(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter, waking whoever reads it.
pub fn eventfd_signal(fd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: u64 = 1;
    // SAFETY: the buffer is `one`, a live local of 8 bytes, the length passed; `fd` is an open
    // descriptor borrowed for the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    if n == -1 {
        return Err(io::Error::last_os_error());
    }
    debug_assert_eq!(n, 8);
    Ok(())
}

/// The shutdown signals, blocked in every thread so that only `wait_signal` sees them.
fn shutdown_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live local.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    set
}

/// Blocks SIGINT and SIGTERM in the calling thread; threads spawned after inherit the mask.
pub fn block_shutdown_signals() -> io::Result<()> {
    let set = shutdown_sigset();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits up to `timeout` for SIGINT or SIGTERM; returns the signal number, or `None` on timeout.
/// An interruption by another signal waits again for the time that is left.
pub fn wait_shutdown_signal(timeout: std::time::Duration) -> io::Result<Option<i32>> {
    let set = shutdown_sigset();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ts = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `set` and `ts` are live locals; a null siginfo pointer is allowed.
        let rc = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
        if rc >= 0 {
            return Ok(Some(rc));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) => return Ok(None),
            Some(libc::EINTR) if !left.is_zero() => continue,
            Some(libc::EINTR) => return Ok(None),
            _ => return Err(err),
        }
    }
}

/// 16 random bytes from the kernel (getrandom(2)), for secrets such as the cookie key.
pub fn random_key() -> io::Result<[u8; 16]> {
    let mut key = [0u8; 16];
    let mut filled = 0;
    while filled < key.len() {
        // SAFETY: the buffer is the unfilled tail of `key`, a live local, and the length
        // passed is exactly that tail's length.
        let n =
            unsafe { libc::getrandom(key[filled..].as_mut_ptr().cast(), key.len() - filled, 0) };
        let n = if n == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n)
        };
        match n {
            Ok(n) => filled += n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(key)
}

/// CPUs this process may run on, in ascending order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live local cpu_set_t and the size passed is its size.
    cvt(unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) })?;
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE and `set` is initialised.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: callers pass a CPU number from `allowed_cpus`, below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live, initialised local cpu_set_t and the size passed is its size.
    cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}

/// The running kernel's release string, e.g. "6.18.44".
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a live local utsname, which uname(2) fills.
    if cvt(unsafe { libc::uname(&mut uts) }).is_err() {
        return "unknown".to_string();
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Parses "6.18.44-foo" into (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_version_parses_common_forms() {
        assert_eq!(kernel_version("6.18.44-fc-v595"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(kernel_version("6.1"), Some((6, 1)));
        assert_eq!(kernel_version("garbage"), None);
    }

    /// Reads the eventfd's counter, which resets it; `None` when nothing was signalled (the
    /// descriptor is non-blocking: EAGAIN).
    fn read_counter(fd: &OwnedFd) -> Option<u64> {
        use std::os::fd::AsRawFd;
        let mut value: u64 = 0;
        // SAFETY: the buffer is `value`, a live local of 8 bytes, the length passed; `fd` is
        // an open descriptor borrowed for the call.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
        if n == -1 {
            let err = io::Error::last_os_error();
            assert_eq!(err.raw_os_error(), Some(libc::EAGAIN), "read: {err}");
            return None;
        }
        assert_eq!(n, 8);
        Some(value)
    }

    /// Whether the eventfd is readable now (a zero-timeout poll).
    fn readable(fd: &OwnedFd) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one live pollfd, the count passed.
        let n = cvt(unsafe { libc::poll(&mut pfd, 1, 0) }).expect("poll");
        n == 1 && pfd.revents & libc::POLLIN != 0
    }

    #[test]
    fn eventfd_signals() {
        let fd = eventfd().unwrap();
        assert!(!readable(&fd), "a new eventfd is quiet");
        assert_eq!(read_counter(&fd), None, "and non-blocking");
        eventfd_signal(&fd).unwrap();
        assert!(readable(&fd), "one signal wakes a poller");
        eventfd_signal(&fd).unwrap();
        assert_eq!(read_counter(&fd), Some(2), "both signals are counted");
        assert!(!readable(&fd), "reading resets the counter");
        assert_eq!(read_counter(&fd), None);
        eventfd_signal(&fd).unwrap();
        assert_eq!(read_counter(&fd), Some(1), "it signals again after a read");
    }
}
