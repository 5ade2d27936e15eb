//! The memory a provided-buffer ring lives in: anonymous mappings that never move (the
//! kernel keeps their addresses) and are unmapped only by their owner's `Drop`.

use std::io;
use std::ptr::NonNull;

/// An anonymous, page-aligned, zero-filled mapping that never moves.
pub(super) struct Mapping {
    pub(super) ptr: NonNull<u8>,
    pub(super) len: usize,
}

impl Mapping {
    /// A mapping of nothing, to put in the place of one that is leaked.
    pub(super) fn empty() -> Mapping {
        Mapping {
            ptr: NonNull::dangling(),
            len: 0,
        }
    }

    pub(super) fn new(len: usize) -> io::Result<Mapping> {
        let len = len.max(1);
        // SAFETY: an anonymous private mapping with no address hint touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return; // `empty()`: nothing was mapped
        }
        // SAFETY: `ptr`/`len` describe a mapping we made and nobody else unmaps; the owner
        // (`BufRing::drop`) leaks instead of dropping while the kernel may use it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        #[cfg(test)]
        UNMAPPED.with(|n| n.set(n.get() + 1));
    }
}

#[cfg(test)]
thread_local! {
    /// Mappings this thread unmapped (for teardown tests: whether an address is still mapped
    /// cannot tell, since another test's thread may map the same range again at once).
    pub(super) static UNMAPPED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

// SAFETY: the mapping is plain memory owned by one BufRing; moving it to another thread (the
// worker that builds the ring) is sound.
unsafe impl Send for Mapping {}
