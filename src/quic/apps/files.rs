//! Files under a served root: a request's path resolved strictly inside it (hq-interop and
//! HTTP/3 share this).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    Missing,
    /// The path leaves the root (`..`, an absolute part, a symbolic link pointing out).
    Outside,
}

/// The file `target` names under `root` (canonical: [`crate::quic::Quic`] canonicalizes
/// `--root` once at start), refusing anything that is not strictly inside it.
pub(crate) fn resolve(root: &Path, target: &str) -> Result<PathBuf, Refusal> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let Some(relative) = path.strip_prefix('/') else {
        return Err(Refusal::Outside);
    };
    let mut joined = root.to_path_buf();
    for part in Path::new(relative).components() {
        match part {
            Component::Normal(name) => {
                if name.as_encoded_bytes().contains(&0) {
                    return Err(Refusal::Outside);
                }
                joined.push(name);
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(Refusal::Outside)
            }
        }
    }
    // A symbolic link inside the root may point outside it: compare the real paths.
    let real = joined.canonicalize().map_err(|_| Refusal::Missing)?;
    if !real.starts_with(root) {
        return Err(Refusal::Outside);
    }
    Ok(real)
}

/// The kernel refused `openat2` once (ENOSYS: before Linux 5.6): [`open_beneath`] says so
/// at once from then on, and callers resolve by path ([`resolve`]).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Why [`open_beneath`] opened nothing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OpenFailure {
    /// A 404: missing, outside the root, not openable.
    Refused(Refusal),
    /// No `openat2` in this kernel (Linux 5.6 has it): resolve by path instead.
    Unsupported,
    /// [`open_cached`] only: the lookup would have waited.
    WouldBlock,
}

/// Reads `len` bytes from the start of `file` if they are in the page cache now
/// (`preadv2(RWF_NOWAIT)`); `None` when the read would wait, comes up short, or this file
/// system cannot say.
pub(crate) fn read_cached(file: &File, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: one iovec over `buf`, which outlives the call; `file` is an open descriptor.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
    (n >= 0 && n as usize == len).then_some(buf)
}

/// A directory descriptor for `root`, for [`open_beneath`].
pub(crate) fn root_dir(root: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_PATH)
        .open(root)?;
    Ok(OwnedFd::from(dir))
}

/// Opens for reading the file `target` (a request path: `/` first, query and fragment
/// ignored) names beneath the directory `root`, in one system call: `openat2` with
/// `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`, so the kernel itself refuses `..` past the
/// root and symbolic links that lead out of it (EXDEV), with no window between a check and
/// the open. May block (a cold dentry cache, a FIFO): call it where blocking is allowed.
pub(crate) fn open_beneath(root: &OwnedFd, target: &str) -> Result<File, OpenFailure> {
    open_with(root, target, 0, 0)
}

/// [`open_beneath`] that never blocks, for a worker: `RESOLVE_CACHED` (Linux 5.12) fails with
/// EAGAIN unless every path component is in the dentry cache, and `O_NONBLOCK` keeps a FIFO
/// from waiting for a writer. `Ok(None)` when it would have had to wait (or this kernel
/// cannot say): ask the blocking pool.
pub(crate) fn open_cached(root: &OwnedFd, target: &str) -> Result<Option<File>, Refusal> {
    match open_with(root, target, libc::RESOLVE_CACHED, libc::O_NONBLOCK) {
        Ok(file) => Ok(Some(file)),
        // A cached negative entry is a real answer; EAGAIN, EINVAL (an older kernel's
        // RESOLVE_CACHED) and ENOSYS are not.
        Err(OpenFailure::Refused(refusal)) => Err(refusal),
        Err(OpenFailure::Unsupported | OpenFailure::WouldBlock) => Ok(None),
    }
}

fn open_with(root: &OwnedFd, target: &str, resolve: u64, flags: i32) -> Result<File, OpenFailure> {
    if NO_OPENAT2.load(Ordering::Relaxed) {
        return Err(OpenFailure::Unsupported);
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    let Some(relative) = path.strip_prefix('/') else {
        return Err(OpenFailure::Refused(Refusal::Outside));
    };
    let relative = if relative.is_empty() { "." } else { relative };
    let Ok(c_path) = std::ffi::CString::new(relative) else {
        return Err(OpenFailure::Refused(Refusal::Outside));
    };
    // SAFETY: `open_how` is a plain C struct for which all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | flags) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS | resolve;
    // SAFETY: openat2(2) with a directory descriptor we own, a NUL-terminated path and an
    // `open_how` of the size passed; it returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c_path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        return Err(match errno {
            Some(libc::ENOSYS) => {
                if !NO_OPENAT2.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "openat2 is missing (Linux 5.6 has it): files are resolved by path"
                    );
                }
                OpenFailure::Unsupported
            }
            Some(libc::EXDEV) => OpenFailure::Refused(Refusal::Outside),
            Some(libc::EAGAIN | libc::EINVAL) if resolve & libc::RESOLVE_CACHED != 0 => {
                OpenFailure::WouldBlock
            }
            _ => OpenFailure::Refused(Refusal::Missing),
        });
    }
    // SAFETY: `fd` is a descriptor openat2 just returned, owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_root_only() {
        let root = std::env::temp_dir().join(format!("udpring-hq-{}", std::process::id()));
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.txt"), b"a").unwrap();
        let root = root.canonicalize().unwrap();
        assert_eq!(
            resolve(&root, "/sub/a.txt").unwrap(),
            root.join("sub/a.txt").canonicalize().unwrap()
        );
        assert!(resolve(&root, "/./sub//a.txt?x=1").is_ok());
        assert_eq!(resolve(&root, "/missing"), Err(Refusal::Missing));
        for bad in [
            "/../etc/passwd",
            "/sub/../../etc/passwd",
            "etc/passwd",
            "/sub/\0",
        ] {
            assert_eq!(resolve(&root, bad), Err(Refusal::Outside), "{bad}");
        }
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        assert_eq!(resolve(&root, "/out/passwd"), Err(Refusal::Outside));
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn open_beneath_refuses_what_leaves_the_root() {
        let root = std::env::temp_dir().join(format!("udpring-beneath-{}", std::process::id()));
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.txt"), b"a").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        std::os::unix::fs::symlink("sub/a.txt", root.join("in")).unwrap();
        let dir = root_dir(&root).unwrap();
        let read = |t: &str| {
            open_beneath(&dir, t).map(|mut f| {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut f, &mut s).unwrap();
                s
            })
        };
        assert_eq!(read("/sub/a.txt").unwrap(), "a");
        assert_eq!(read("/./sub//a.txt?x=1").unwrap(), "a");
        assert_eq!(read("/in").unwrap(), "a", "a link that stays inside");
        assert_eq!(
            read("/missing"),
            Err(OpenFailure::Refused(Refusal::Missing))
        );
        for bad in ["/../etc/passwd", "/sub/../../etc/passwd", "/out/passwd"] {
            assert_eq!(
                read(bad),
                Err(OpenFailure::Refused(Refusal::Outside)),
                "{bad}"
            );
        }
        assert_eq!(
            read("etc/passwd"),
            Err(OpenFailure::Refused(Refusal::Outside))
        );
        assert_eq!(read("/sub/\0"), Err(OpenFailure::Refused(Refusal::Outside)));
        let _ = std::fs::remove_dir_all(root);
    }
}
