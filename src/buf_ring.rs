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

/// A received datagram's buffer, lent to us by the kernel: the only way to read it
/// ([`BufRing::bytes`]) and the only way to give it back ([`BufRing::recycle`], which consumes
/// it). It cannot be copied, so a buffer is recycled at most once; forgetting to recycle it is
/// caught by a debug assertion when it is dropped.
#[derive(Debug)]
pub struct RecvBuf {
    bid: u16,
    len: u32,
}

impl RecvBuf {
    /// Bytes the kernel wrote into the buffer (the `recvmsg_out` header, name, control and
    /// payload).
    fn len(&self) -> usize {
        self.len as usize
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        // `recycle` forgets the token, so reaching this is a leaked buffer: the ring shrinks
        // by one for good. Not unsafe, but a bug.
        debug_assert!(
            std::thread::panicking(),
            "receive buffer {} dropped without being recycled",
            self.bid
        );
    }
}

/// A ring of `entries` buffers of `buf_len` bytes each, for buffer group `bgid`.
///
/// Ownership of each buffer is in the types: a buffer is either in the ring (the kernel's to
/// fill) or out as a [`RecvBuf`] (ours to read). The bookkeeping bitmap `lent` double-checks
/// this in debug builds.
pub struct BufRing {
    ring: Mapping,
    bufs: Mapping,
    entries: u16,
    buf_len: u32,
    stride: usize,
    bgid: u16,
    /// Our copy of the tail: entries written but maybe not yet published.
    tail: u16,
    /// Buffers out as `RecvBuf`s.
    held: usize,
    /// One bit per buffer: set while it is out as a `RecvBuf`.
    lent: Vec<u64>,
    /// Registered with a ring and not unregistered: the kernel may write into the buffers, so
    /// `Drop` must not unmap them.
    registered: bool,
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
            held: 0,
            lent: vec![0; usize::from(entries).div_ceil(64)],
            registered: false,
        };
        for bid in 0..entries {
            this.push_entry(bid);
        }
        this.publish();
        Ok(this)
    }

    /// Registers the ring with `uring` under this ring's group id (`IORING_REGISTER_PBUF_RING`,
    /// 5.19). From now on the kernel may write into any buffer in the ring; `Drop` leaks the
    /// memory rather than unmap it unless [`BufRing::unregister`] ran first.
    pub fn register(&mut self, uring: &IoUring) -> io::Result<()> {
        self.register_with_flags(uring, 0)
    }

    /// `register` with `IOU_PBUF_RING_*` flags (for the kernel probe).
    pub fn register_with_flags(&mut self, uring: &IoUring, flags: u16) -> io::Result<()> {
        // SAFETY: the descriptor mapping is page-aligned, holds `entries` descriptors and is
        // never unmapped while `registered` is set (see `Drop`), so the kernel's pointer into
        // it stays valid for as long as the registration lasts.
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                self.ring.ptr.as_ptr() as u64,
                self.entries,
                self.bgid,
                flags,
            )
        }?;
        self.registered = true;
        Ok(())
    }

    /// Unregisters the group, after which the kernel no longer takes buffers from it and
    /// `Drop` may unmap the memory.
    ///
    /// # Safety
    /// No receive that selects from this group may be in flight on `uring`: such a request
    /// may already have picked a buffer and still be writing into it.
    pub unsafe fn unregister(&mut self, uring: &IoUring) -> io::Result<()> {
        if self.registered {
            uring.submitter().unregister_buf_ring(self.bgid)?;
            self.registered = false;
        }
        Ok(())
    }

    /// Buffers the kernel can still fill.
    pub fn available(&self) -> usize {
        usize::from(self.entries) - self.held
    }

    /// Takes buffer `bid`, which a receive completion reported it filled with `len` bytes.
    /// `None` (a kernel bug, counted by the caller) for an id outside the ring.
    ///
    /// # Safety
    /// `bid` and `len` must come from a completion of a receive that selected from this
    /// ring's group, and that completion must be passed here once: the kernel then no longer
    /// touches the buffer until it is recycled.
    pub unsafe fn take(&mut self, bid: u16, len: u32) -> Option<RecvBuf> {
        if bid >= self.entries {
            return None;
        }
        let (word, bit) = lent_bit(bid);
        debug_assert!(
            self.lent[word] & bit == 0,
            "buffer {bid} reported filled while it is still lent"
        );
        self.lent[word] |= bit;
        self.held += 1;
        Some(RecvBuf {
            bid,
            len: len.min(self.buf_len),
        })
    }

    /// What the kernel wrote into `buf`.
    pub fn bytes<'a>(&'a self, buf: &'a RecvBuf) -> &'a [u8] {
        debug_assert!(buf.bid < self.entries);
        let offset = usize::from(buf.bid) * self.stride;
        // SAFETY: `offset + len` lies inside the buffer mapping (bid < entries, checked by
        // `take`; len <= buf_len <= stride). A `RecvBuf` exists only between `take` (the
        // kernel finished writing and will not touch the buffer again) and `recycle` (which
        // consumes it), so nothing writes these bytes while the returned slice lives.
        unsafe { std::slice::from_raw_parts(self.bufs.ptr.as_ptr().add(offset), buf.len()) }
    }

    /// Hands `buf` back to the kernel (visible after the next `publish`).
    pub fn recycle(&mut self, buf: RecvBuf) {
        let bid = buf.bid;
        std::mem::forget(buf);
        let (word, bit) = lent_bit(bid);
        debug_assert!(self.lent[word] & bit != 0, "buffer {bid} recycled twice");
        self.lent[word] &= !bit;
        self.held -= 1;
        self.push_entry(bid);
    }

    /// Writes buffer `bid`'s descriptor after the tail.
    fn push_entry(&mut self, bid: u16) {
        let index = ring_index(self.tail, self.entries);
        let addr = self.bufs.ptr.as_ptr() as u64 + (usize::from(bid) * self.stride) as u64;
        // SAFETY: `index < entries`, so the entry lies inside the descriptor mapping. The
        // kernel reads only entries between its head and the published tail; this one is past
        // the tail, and at most `entries` buffers exist, so it is not one the kernel has yet
        // to consume.
        let entry = unsafe { &mut *self.ring.ptr.as_ptr().cast::<BufRingEntry>().add(index) };
        entry.set_addr(addr);
        entry.set_len(self.buf_len);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every recycled buffer visible to the kernel.
    pub fn publish(&self) {
        // SAFETY: the tail field overlays the `resv` field of entry 0 inside the descriptor
        // mapping, which is page-aligned; the kernel reads it with acquire semantics and
        // never writes it.
        let tail = unsafe {
            AtomicU16::from_ptr(
                BufRingEntry::tail(self.ring.ptr.as_ptr().cast::<BufRingEntry>()) as *mut u16,
            )
        };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.registered {
            // The kernel may still write into the buffers: leaking them is the only sound
            // choice. The worker unregisters before it drops the ring, so this happens only
            // when shutdown left receives in flight.
            tracing::debug!(
                group = self.bgid,
                "leaking a provided-buffer ring the kernel may still use"
            );
            std::mem::forget(std::mem::replace(&mut self.ring, Mapping::empty()));
            std::mem::forget(std::mem::replace(&mut self.bufs, Mapping::empty()));
        }
    }
}

#[cfg(test)]
impl BufRing {
    /// Whether the buffer memory is still mapped (for teardown tests): `msync` fails with
    /// ENOMEM on an unmapped range.
    pub(crate) fn buffers_mapped_at(addr: usize, len: usize) -> bool {
        // SAFETY: msync only inspects the page range; it never dereferences it from Rust.
        unsafe { libc::msync(addr as *mut libc::c_void, len, libc::MS_ASYNC) == 0 }
    }

    /// Where the buffers are mapped, and how long the mapping is.
    pub(crate) fn buffers_range(&self) -> (usize, usize) {
        (self.bufs.ptr.as_ptr() as usize, self.bufs.len)
    }
}

fn lent_bit(bid: u16) -> (usize, u64) {
    (usize::from(bid / 64), 1u64 << (bid % 64))
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
    /// A mapping of nothing, to put in the place of one that is leaked.
    fn empty() -> Mapping {
        Mapping {
            ptr: NonNull::dangling(),
            len: 0,
        }
    }

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
        if self.len == 0 {
            return; // `empty()`: nothing was mapped
        }
        // SAFETY: `ptr`/`len` describe a mapping we made and nobody else unmaps; the owner
        // (`BufRing::drop`) leaks instead of dropping while the kernel may use it.
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
    fn take_read_recycle_accounting() {
        let mut ring = BufRing::new(4, 100, 0).unwrap();
        assert_eq!(ring.available(), 4);
        // SAFETY: not registered with any ring: no kernel writes these buffers.
        let (a, b) = unsafe { (ring.take(2, 1000).unwrap(), ring.take(3, 5).unwrap()) };
        assert_eq!(ring.available(), 2);
        assert_eq!(ring.bytes(&a).len(), 100, "clamped to the buffer length");
        assert_eq!(ring.bytes(&b).len(), 5);
        ring.recycle(b);
        ring.recycle(a);
        ring.publish();
        assert_eq!(ring.available(), 4);
        assert_eq!(ring.tail, 6);
        // SAFETY: as above.
        assert!(unsafe { ring.take(4, 1) }.is_none(), "id outside the ring");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "still lent")]
    fn a_buffer_reported_twice_is_caught() {
        let mut ring = BufRing::new(4, 100, 0).unwrap();
        // SAFETY: not registered; this test breaks `take`'s contract on purpose to check that
        // the debug bookkeeping notices.
        let _a = unsafe { ring.take(1, 10) };
        // SAFETY: as above.
        let _b = unsafe { ring.take(1, 10) };
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "without being recycled")]
    fn a_dropped_buffer_is_caught() {
        let mut ring = BufRing::new(4, 100, 0).unwrap();
        // SAFETY: not registered.
        drop(unsafe { ring.take(1, 10) });
    }

    /// Issue 8, finding 2: buffers the kernel may still fill must not be unmapped. Dropped
    /// while registered, the ring leaks them; unregistered first, it unmaps them.
    #[test]
    fn a_registered_ring_is_never_unmapped() {
        let Ok(uring) = io_uring::IoUring::new(8) else {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "io_uring unavailable");
            eprintln!("skipped: io_uring unavailable");
            return;
        };
        let mut registered = BufRing::new(4, 4096, 3).unwrap();
        registered.register(&uring).unwrap();
        let (addr, len) = registered.buffers_range();
        drop(registered);
        assert!(BufRing::buffers_mapped_at(addr, len), "leaked, not unmapped");

        let mut unregistered = BufRing::new(4, 4096, 4).unwrap();
        unregistered.register(&uring).unwrap();
        // SAFETY: no request was submitted on `uring`.
        unsafe { unregistered.unregister(&uring) }.unwrap();
        let (addr, len) = unregistered.buffers_range();
        drop(unregistered);
        assert!(!BufRing::buffers_mapped_at(addr, len), "unmapped once unregistered");
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(BufRing::new(3, 10, 0).is_err());
        assert!(BufRing::new(0, 10, 0).is_err());
    }
}
