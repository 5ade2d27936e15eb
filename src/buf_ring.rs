//! The provided-buffer ring (io_uring_register_buf_ring(3), kernel 5.19): a ring of buffer
//! descriptors the kernel takes from when a multishot receive needs somewhere to put a datagram.
//!
//! We own both the descriptor ring and the buffers. Both are anonymous mappings made once at
//! start-up and never moved: the kernel keeps their addresses. The kernel consumes entries at
//! the head; we hand buffers back at the tail (`recycle`) and make them visible with one
//! release store of the tail per loop turn (`publish`).

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// A registered ring of `entries` buffers of `buf_len` bytes each, in buffer group `bgid`.
pub struct BufRing {
    ring: Mapping,
    bufs: Mapping,
    entries: u16,
    buf_len: u32,
    stride: usize,
    bgid: u16,
    /// Our copy of the tail: entries written but maybe not yet published.
    tail: u16,
    /// Buffers the kernel has handed us (in completions) and we have not recycled yet.
    held: usize,
}

impl BufRing {
    /// Allocates the descriptor ring and the buffers and fills the ring with every buffer.
    /// `entries` must be a power of two no larger than 32768 (the kernel's limit).
    pub fn new(entries: u16, buf_len: u32, bgid: u16) -> io::Result<BufRing> {
        if !entries.is_power_of_two() || entries > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer count must be a power of two no larger than 32768",
            ));
        }
        let stride = buffer_stride(buf_len as usize);
        let ring = Mapping::new(usize::from(entries) * std::mem::size_of::<BufRingEntry>())?;
        let bufs = Mapping::new(stride * usize::from(entries))?;
        let mut this = BufRing {
            ring,
            bufs,
            entries,
            buf_len,
            stride,
            bgid,
            tail: 0,
            held: usize::from(entries),
        };
        for bid in 0..entries {
            this.recycle(bid);
        }
        this.publish();
        Ok(this)
    }

    /// Registers the ring with `uring` under this ring's group id.
    ///
    /// # Safety
    /// The kernel keeps the ring's and the buffers' addresses: `uring` must be dropped (or the
    /// group unregistered) before `self` is, and no receive that selects from this group may be
    /// in flight when it is.
    pub unsafe fn register(&self, uring: &IoUring) -> io::Result<()> {
        // SAFETY: the ring mapping is page-aligned, holds `entries` descriptors and lives as
        // long as `self`; the caller guarantees `self` outlives the registration.
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                self.ring.ptr.as_ptr() as u64,
                self.entries,
                self.bgid,
                0,
            )
        }
    }

    pub fn group(&self) -> u16 {
        self.bgid
    }

    pub fn buf_len(&self) -> u32 {
        self.buf_len
    }

    /// Buffers currently lent to us by the kernel and not recycled.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Buffers the kernel can still fill.
    pub fn available(&self) -> usize {
        usize::from(self.entries) - self.held
    }

    /// Marks buffer `bid` as handed to us by a completion.
    pub fn take(&mut self, bid: u16) {
        debug_assert!(bid < self.entries);
        self.held += 1;
    }

    /// The first `len` bytes of buffer `bid`, as written by the kernel.
    pub fn buffer(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid < self.entries, "buffer id {bid} out of range");
        let len = len.min(self.buf_len as usize);
        let offset = usize::from(bid) * self.stride;
        // SAFETY: `offset + len` lies inside the buffer mapping (bid < entries, len <= buf_len
        // <= stride). The kernel wrote this buffer before posting the completion that named it
        // and does not touch it again until we recycle it, which needs `&mut self`.
        unsafe { std::slice::from_raw_parts(self.bufs.ptr.as_ptr().add(offset), len) }
    }

    /// Hands buffer `bid` back to the kernel (visible after the next `publish`).
    pub fn recycle(&mut self, bid: u16) {
        assert!(bid < self.entries, "buffer id {bid} out of range");
        let index = ring_index(self.tail, self.entries);
        let addr = self.bufs.ptr.as_ptr() as u64 + (usize::from(bid) * self.stride) as u64;
        // SAFETY: `index < entries`, so the entry lies inside the ring mapping. The kernel only
        // reads entries between its head and the published tail; this one is past the tail.
        let entry = unsafe { &mut *self.ring.ptr.as_ptr().cast::<BufRingEntry>().add(index) };
        entry.set_addr(addr);
        entry.set_len(self.buf_len);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.held = self.held.saturating_sub(1);
    }

    /// Makes every recycled buffer visible to the kernel.
    pub fn publish(&self) {
        // SAFETY: the tail field overlays the `resv` field of entry 0 inside the ring mapping,
        // which is 16-byte aligned; the kernel reads it with acquire semantics.
        let tail = unsafe {
            AtomicU16::from_ptr(
                BufRingEntry::tail(self.ring.ptr.as_ptr().cast::<BufRingEntry>()) as *mut u16,
            )
        };
        tail.store(self.tail, Ordering::Release);
    }
}

/// Where entry number `tail` goes in a ring of `entries` (a power of two): the u16 tail wraps
/// naturally and the mask keeps the low bits.
#[inline]
pub fn ring_index(tail: u16, entries: u16) -> usize {
    usize::from(tail & (entries - 1))
}

/// Distance between buffers: whole cache lines, and never an exact multiple of 4 KiB, so the
/// headers of consecutive buffers do not all fall into the same cache sets.
pub fn buffer_stride(buf_len: usize) -> usize {
    let stride = buf_len.div_ceil(64) * 64;
    if stride % 4096 == 0 {
        stride + 64
    } else {
        stride
    }
}

/// An anonymous, page-aligned, zero-filled mapping that never moves.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
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
        // SAFETY: `ptr`/`len` describe a mapping we made and nobody else unmaps.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the mapping is plain memory owned by one BufRing; moving it to another thread (the
// worker that builds the ring) is sound.
unsafe impl Send for Mapping {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_index_wraps_with_the_u16_tail() {
        assert_eq!(ring_index(0, 8), 0);
        assert_eq!(ring_index(7, 8), 7);
        assert_eq!(ring_index(8, 8), 0);
        assert_eq!(ring_index(u16::MAX, 8), 7);
        assert_eq!(ring_index(u16::MAX.wrapping_add(1), 8), 0);
        assert_eq!(ring_index(40_000, 32768), 40_000 - 32768);
    }

    #[test]
    fn stride_avoids_4k_aliasing() {
        assert_eq!(buffer_stride(1), 64);
        assert_eq!(buffer_stride(64), 64);
        assert_eq!(buffer_stride(65), 128);
        assert_eq!(buffer_stride(4096), 4096 + 64);
        assert_eq!(buffer_stride(65_536), 65_536 + 64);
        assert!(buffer_stride(65_507 + 120) >= 65_507 + 120);
    }

    #[test]
    fn recycle_and_hold_accounting() {
        let mut ring = BufRing::new(4, 100, 0).unwrap();
        assert_eq!(ring.held(), 0);
        assert_eq!(ring.available(), 4);
        ring.take(2);
        ring.take(3);
        assert_eq!(ring.held(), 2);
        assert_eq!(ring.buffer(2, 1000).len(), 100);
        ring.recycle(3);
        ring.publish();
        assert_eq!(ring.held(), 1);
        assert_eq!(ring.tail, 5);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(BufRing::new(3, 10, 0).is_err());
        assert!(BufRing::new(0, 10, 0).is_err());
    }
}
