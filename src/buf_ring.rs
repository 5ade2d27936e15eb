//! The provided-buffer ring (io_uring_register_buf_ring(3), kernel 5.19): a ring of buffer
//! descriptors the kernel takes from when a multishot receive needs somewhere to put a datagram.
//!
//! We own both the descriptor ring and the buffers. Both are anonymous mappings made once at
//! start-up and never moved: the kernel keeps their addresses. The kernel consumes entries at
//! the head; we hand buffers back at the tail (`recycle`) and make them visible with one
//! release store of the tail per loop turn (`publish`).
//!
//! Who may touch a buffer is checked in release builds too, because a mistake here lets the
//! kernel write into bytes a handler is reading: a buffer is either in the ring or out as a
//! [`RecvBuf`], and the bitmap `lent` says which, so a buffer id reported twice or recycled
//! twice is refused (and counted) rather than put in the ring twice. A `RecvBuf` names the
//! ring it came from; another ring refuses it. Each check is one compare or one bit test.

use std::io;
use std::ptr::addr_of_mut;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use crate::ring::Ring;
use crate::stats::Stats;

mod mapping;

use mapping::Mapping;
#[cfg(test)]
use mapping::UNMAPPED;

/// Bytes one buffer may have at most: a datagram is at most 64 KiB, plus the `recvmsg_out`
/// header, the address and the control messages. Larger requests are refused before anything
/// is mapped.
pub const MAX_BUF_LEN: u32 = 1 << 20;

/// The kernel's limit on a provided-buffer ring's entries (`io_register_pbuf_ring`).
pub const MAX_ENTRIES: u16 = 1 << 15;

/// `struct io_uring_buf` from include/uapi/linux/io_uring.h: one descriptor of the ring. The
/// `resv` field of entry 0 is the ring's tail (`struct io_uring_buf_ring` overlays it), which
/// the kernel reads while we write other entries: the descriptors are therefore written
/// field by field through raw pointers, never through a reference to a whole entry.
#[repr(C)]
struct BufDesc {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () = assert!(std::mem::size_of::<BufDesc>() == 16);
const _: () = assert!(
    std::mem::size_of::<BufDesc>() == std::mem::size_of::<io_uring::types::BufRingEntry>()
);

/// Where ring identities come from: a process-wide counter, so that no two rings (also not
/// one dropped and a new one made later) share an id.
static NEXT_RING_ID: AtomicU64 = AtomicU64::new(1);

/// A received datagram's buffer, lent to us by the kernel: the only way to read it
/// ([`BufRing::bytes`]) and the only way to give it back ([`BufRing::recycle`], which consumes
/// it). It cannot be copied or cloned, and it names the ring it came from.
///
/// Dropping one without recycling it is not unsafe: the buffer simply stays out of the ring
/// (the kernel never gets it back), as when a worker leaves with datagrams in its backlog.
#[derive(Debug)]
pub struct RecvBuf {
    /// The `BufRing::id` of the ring that lent it.
    ring: u64,
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

/// A ring of `entries` buffers of `buf_len` bytes each, for buffer group `bgid`.
///
/// Ownership of each buffer is in the types: a buffer is either in the ring (the kernel's to
/// fill) or out as a [`RecvBuf`] (ours to read); the bitmap `lent` checks this in every
/// build.
pub struct BufRing {
    ring: Mapping,
    bufs: Mapping,
    /// This ring's identity, carried by every `RecvBuf` it lends.
    id: u64,
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
    /// Ids reported filled while lent, tokens of other rings, buffers recycled twice: each a
    /// bug somewhere, refused instead of letting the kernel write into a buffer being read.
    refused: u64,
    /// The `Ring::id` of the io_uring the group is registered with, until unregistered: the
    /// kernel may write into the buffers, so `Drop` must not unmap them. Every worker uses
    /// group 0 on its own ring, so the group id alone does not say which registration is ours.
    registered: Option<u64>,
}

/// `InvalidInput` with `message`.
fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

impl BufRing {
    /// Allocates the descriptor ring and the buffers and fills the ring with every buffer.
    /// `entries` must be a power of two no larger than [`MAX_ENTRIES`] (the kernel's limit),
    /// `buf_len` from 1 to [`MAX_BUF_LEN`]; the sizes are checked before anything is mapped.
    pub fn new(entries: u16, buf_len: u32, bgid: u16) -> io::Result<BufRing> {
        if !entries.is_power_of_two() || entries > MAX_ENTRIES {
            return Err(invalid(format!(
                "buffer count must be a power of two no larger than {MAX_ENTRIES}, got {entries}"
            )));
        }
        if buf_len == 0 || buf_len > MAX_BUF_LEN {
            return Err(invalid(format!(
                "receive buffer length must be 1..={MAX_BUF_LEN} bytes, got {buf_len}"
            )));
        }
        let stride = buffer_stride(buf_len as usize);
        let ring_len = usize::from(entries)
            .checked_mul(std::mem::size_of::<BufDesc>())
            .ok_or_else(|| invalid("buffer ring descriptors overflow usize".to_string()))?;
        let bufs_len = stride
            .checked_mul(usize::from(entries))
            .ok_or_else(|| invalid(format!("{entries} buffers of {stride} bytes overflow usize")))?;
        let ring = Mapping::new(ring_len)?;
        let bufs = Mapping::new(bufs_len)?;
        let mut this = BufRing {
            ring,
            bufs,
            id: NEXT_RING_ID.fetch_add(1, Ordering::Relaxed),
            entries,
            buf_len,
            stride,
            bgid,
            tail: 0,
            held: 0,
            lent: vec![0; usize::from(entries).div_ceil(64)],
            refused: 0,
            registered: None,
        };
        for bid in 0..entries {
            this.push_entry(bid);
        }
        this.publish();
        Ok(this)
    }

    /// Registers the ring with `ring` under this ring's group id (`IORING_REGISTER_PBUF_RING`,
    /// 5.19). From now on the kernel may write into any buffer in the ring; `Drop` leaks the
    /// memory rather than unmap it unless [`BufRing::unregister`] ran first, on the same ring.
    pub fn register(&mut self, ring: &Ring) -> io::Result<()> {
        self.register_with_flags(ring, 0)
    }

    /// `register` with `IOU_PBUF_RING_*` flags (for the kernel probe). A ring registered
    /// already (with any io_uring) is refused: one registration per ring, so that
    /// `unregister` knows where to undo it.
    pub fn register_with_flags(&mut self, ring: &Ring, flags: u16) -> io::Result<()> {
        if self.registered.is_some() {
            return Err(invalid(format!(
                "buffer group {} is registered already",
                self.bgid
            )));
        }
        // SAFETY: the descriptor mapping is page-aligned, holds `entries` descriptors and is
        // never unmapped while `registered` is set (see `Drop`), so the kernel's pointer into
        // it stays valid for as long as the registration lasts.
        unsafe {
            ring.uring().submitter().register_buf_ring_with_flags(
                self.ring.ptr.as_ptr() as u64,
                self.entries,
                self.bgid,
                flags,
            )
        }?;
        self.registered = Some(ring.id());
        Ok(())
    }

    /// Unregisters the group from `ring`, after which the kernel no longer takes buffers
    /// from it and `Drop` may unmap the memory. A ring not registered is left alone; one
    /// registered with another io_uring is refused (`InvalidInput`) and stays registered:
    /// unregistering "group `bgid`" there would remove that io_uring's own group instead.
    ///
    /// # Safety
    /// No receive that selects from this group may be in flight on `ring`: such a request
    /// may already have picked a buffer and still be writing into it.
    pub unsafe fn unregister(&mut self, ring: &Ring) -> io::Result<()> {
        match self.registered {
            None => Ok(()),
            Some(id) if id == ring.id() => {
                ring.uring().submitter().unregister_buf_ring(self.bgid)?;
                self.registered = None;
                Ok(())
            }
            Some(_) => Err(invalid(format!(
                "buffer group {} is registered with another io_uring",
                self.bgid
            ))),
        }
    }

    /// Buffers the kernel can still fill.
    pub fn available(&self) -> usize {
        usize::from(self.entries) - self.held
    }

    /// Tokens and ids refused so far (see the module comment): each one a bug, never input.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Puts the refusals so far into `stats.buffer_tokens_refused` (a running total of this
    /// ring, which the worker's counters carry once per loop turn).
    pub fn count_refused(&self, stats: &mut Stats) {
        stats.buffer_tokens_refused = self.refused;
    }

    /// Takes buffer `bid`, which a receive completion reported it filled with `len` bytes.
    /// `None` (a kernel bug, counted by the caller) for an id outside the ring or one that is
    /// lent already (reported twice): the bitmap check runs in every build.
    ///
    /// # Safety
    /// `bid` must come from a completion of a receive that selected from this ring's group,
    /// reported once: the kernel then no longer touches the buffer until it is recycled.
    pub unsafe fn take(&mut self, bid: u16, len: u32) -> Option<RecvBuf> {
        if bid >= self.entries {
            return None;
        }
        let (word, bit) = lent_bit(bid);
        if self.lent[word] & bit != 0 {
            self.refused += 1;
            return None;
        }
        self.lent[word] |= bit;
        self.held += 1;
        Some(RecvBuf {
            ring: self.id,
            bid,
            len: len.min(self.buf_len),
        })
    }

    /// What the kernel wrote into `buf`. A token of another ring reads as empty (which the
    /// receive path counts as malformed): its id means nothing here.
    pub fn bytes<'a>(&'a self, buf: &'a RecvBuf) -> &'a [u8] {
        if buf.ring != self.id || buf.bid >= self.entries {
            return &[];
        }
        let offset = usize::from(buf.bid) * self.stride;
        // SAFETY: `offset + len` lies inside the buffer mapping (bid < entries, checked above;
        // len <= buf_len <= stride, clamped by `take`). The token is this ring's (checked
        // above) and exists only between `take` (the kernel finished writing and will not
        // touch the buffer again until it is back in the ring) and `recycle` (which consumes
        // it), so nothing writes these bytes while the returned slice lives.
        unsafe { std::slice::from_raw_parts(self.bufs.ptr.as_ptr().add(offset), buf.len()) }
    }

    /// Hands `buf` back to the kernel (visible after the next `publish`). A token of another
    /// ring, or a buffer that is not lent (recycled twice), is refused and counted: putting it
    /// in the ring would let the kernel write into a buffer someone else may be reading.
    pub fn recycle(&mut self, buf: RecvBuf) {
        let (ring, bid) = (buf.ring, buf.bid);
        if ring != self.id || bid >= self.entries {
            self.refused += 1;
            return;
        }
        let (word, bit) = lent_bit(bid);
        if self.lent[word] & bit == 0 {
            self.refused += 1;
            return;
        }
        self.lent[word] &= !bit;
        self.held -= 1;
        self.push_entry(bid);
    }

    /// The descriptor ring's first entry.
    fn descs(&self) -> *mut BufDesc {
        self.ring.ptr.as_ptr().cast::<BufDesc>()
    }

    /// Writes buffer `bid`'s descriptor after the tail.
    fn push_entry(&mut self, bid: u16) {
        let index = ring_index(self.tail, self.entries);
        let addr = self.bufs.ptr.as_ptr() as u64 + (usize::from(bid) * self.stride) as u64;
        // SAFETY: `index < entries`, so the entry lies inside the descriptor mapping (which
        // `new` sized for `entries` descriptors and which is 16-byte aligned: page-aligned).
        // The kernel reads only entries between its head and the published tail; this one is
        // past the tail, and at most `entries` buffers exist, so it is not one the kernel has
        // yet to consume. Only `addr`, `len` and `bid` are written, each through its own raw
        // place: no reference covers the entry, so none covers entry 0's `resv`, the tail the
        // kernel may be reading (stored atomically by `publish`).
        unsafe {
            let desc = self.descs().add(index);
            addr_of_mut!((*desc).addr).write(addr);
            addr_of_mut!((*desc).len).write(self.buf_len);
            addr_of_mut!((*desc).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every recycled buffer visible to the kernel.
    pub fn publish(&self) {
        // SAFETY: the tail is the `resv` field of entry 0 inside the descriptor mapping, which
        // is page-aligned (so the u16 is aligned) and lives as long as `self`; the kernel reads
        // it with acquire semantics (`smp_load_acquire` in `io_ring_buffer_select`) and never
        // writes it, and we access it only through this atomic.
        let tail = unsafe { AtomicU16::from_ptr(addr_of_mut!((*self.descs()).resv)) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.registered.is_some() {
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

#[cfg(test)]
mod tests;
