//! An AF_XDP socket with its UMEM and its four rings, owned by types.
//!
//! The UMEM is one anonymous mapping, registered with the socket (the kernel pins its pages)
//! and split into frames of [`FRAME_SIZE`] bytes. A frame is always in exactly one place,
//! which [`Xsk`] tracks: on the fill ring (the kernel may write it), on the RX ring or held
//! by the worker after it was read (the worker reads it; the kernel does not touch it), free
//! (the worker may write it), or on the TX ring until the completion ring gives it back (the
//! kernel reads it). Bytes are reached only through [`Xsk::rx_frame`] and
//! [`Xsk::tx_frame_mut`], which check that state: no slice ever covers a frame the kernel may
//! write, and an address the kernel hands back that names no frame it had is counted and
//! dropped, never used.
//!
//! Drop order is part of the contract: the socket's descriptor is closed first (the kernel
//! stops using the rings and the UMEM), then the rings are unmapped, then the UMEM.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// Bytes per UMEM frame (a page: a 1,500-byte MTU frame fits with the kernel's 256 bytes of
/// headroom, and so does a 3,500-byte one).
pub const FRAME_SIZE: u32 = 4096;

/// Where a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// On the fill ring or the RX ring: the kernel's to write.
    Fill,
    /// Read from the RX ring, held by the worker until it goes back on the fill ring.
    Rx,
    /// The worker's to write.
    Free,
    /// On the TX ring until its completion.
    Tx,
}

/// A mapping of `len` bytes, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn anonymous(len: usize) -> io::Result<Mapping> {
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        Mapping::checked(p, len)
    }

    fn ring(fd: RawFd, len: usize, offset: u64) -> io::Result<Mapping> {
        // SAFETY: maps the ring the kernel made for `fd` at `offset`, shared with it; no
        // existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                offset as libc::off_t,
            )
        };
        Mapping::checked(p, len)
    }

    fn checked(p: *mut libc::c_void, len: usize) -> io::Result<Mapping> {
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly one mapping made in `checked`, unmapped once here;
        // no reference into it outlives its owner (rings and frames borrow their `Xsk`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One of the four rings: a producer index, a consumer index, flags and `size` entries of
/// `T`, shared with the kernel. The side this process plays is fixed by which methods it
/// calls: [`Ring::produce`] for fill and TX, [`Ring::consume`] for RX and completion.
struct Ring<T: Copy> {
    /// Held for its drop: the pointers below point into it.
    _map: Mapping,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    flags: *const AtomicU32,
    descs: *mut T,
    mask: u32,
    size: u32,
}

impl<T: Copy> Ring<T> {
    fn map(fd: RawFd, off: &libc::xdp_ring_offset, size: u32, pgoff: u64) -> io::Result<Ring<T>> {
        let len = off.desc as usize + size as usize * std::mem::size_of::<T>();
        let map = Mapping::ring(fd, len, pgoff)?;
        let base = map.ptr.as_ptr();
        for field in [off.producer, off.consumer, off.flags] {
            if field as usize + 4 > len || field % 4 != 0 {
                return Err(io::Error::other("AF_XDP ring offsets outside the ring"));
            }
        }
        // SAFETY: every offset was checked to lie inside the mapping (the kernel's layout:
        // two u32 indices, a u32 flags word, then the entries).
        unsafe {
            Ok(Ring {
                producer: base.add(off.producer as usize).cast(),
                consumer: base.add(off.consumer as usize).cast(),
                flags: base.add(off.flags as usize).cast(),
                descs: base.add(off.desc as usize).cast(),
                mask: size - 1,
                size,
                _map: map,
            })
        }
    }

    fn index(&self, which: *const AtomicU32) -> &AtomicU32 {
        // SAFETY: `which` is one of this ring's index words, inside `self.map`, aligned, and
        // only ever accessed atomically by both sides.
        unsafe { &*which }
    }

    /// Writes up to `items.len()` entries the other side may consume; returns how many fit.
    fn produce(&self, items: impl ExactSizeIterator<Item = T>) -> usize {
        let prod = self.index(self.producer).load(Ordering::Relaxed);
        let cons = self.index(self.consumer).load(Ordering::Acquire);
        let free = self.size - prod.wrapping_sub(cons);
        let mut n = 0u32;
        for item in items.take(free as usize) {
            // SAFETY: the entry at `prod + n` is between the consumer and the producer's new
            // value, so the kernel does not read it until the release store below.
            unsafe {
                self.descs
                    .add((prod.wrapping_add(n) & self.mask) as usize)
                    .write(item)
            };
            n += 1;
        }
        if n > 0 {
            self.index(self.producer)
                .store(prod.wrapping_add(n), Ordering::Release);
        }
        n as usize
    }

    /// Free entries for [`Ring::produce`].
    fn room(&self) -> u32 {
        let prod = self.index(self.producer).load(Ordering::Relaxed);
        let cons = self.index(self.consumer).load(Ordering::Acquire);
        self.size - prod.wrapping_sub(cons)
    }

    /// Reads up to `max` entries the kernel produced, handing each to `f`.
    fn consume(&self, max: usize, mut f: impl FnMut(T)) -> usize {
        let cons = self.index(self.consumer).load(Ordering::Relaxed);
        let prod = self.index(self.producer).load(Ordering::Acquire);
        let n = prod.wrapping_sub(cons).min(self.size).min(max as u32);
        for i in 0..n {
            // SAFETY: entries between the consumer and the producer (acquired above) were
            // written by the kernel and are not rewritten until the consumer moves past them.
            f(unsafe {
                self.descs
                    .add((cons.wrapping_add(i) & self.mask) as usize)
                    .read()
            });
        }
        if n > 0 {
            self.index(self.consumer)
                .store(cons.wrapping_add(n), Ordering::Release);
        }
        n as usize
    }

    fn needs_wakeup(&self) -> bool {
        self.index(self.flags).load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }
}

/// What [`Xsk::bind`] got from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// The driver DMAs straight into the UMEM.
    ZeroCopy,
    /// The kernel copies each frame between its buffers and the UMEM.
    Copy,
}

/// The socket's kernel-side counters (`XDP_STATISTICS`).
#[derive(Debug, Default, Clone, Copy)]
pub struct XskStats {
    /// Frames dropped for want of a fill-ring frame.
    pub rx_dropped: u64,
    /// Frames dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// TX descriptors the kernel found invalid.
    pub tx_invalid: u64,
}

/// An AF_XDP socket bound to one queue of an interface, with its UMEM and rings.
pub struct Xsk {
    // Declared, and so dropped, first: see the module's drop order.
    fd: OwnedFd,
    fill: Ring<u64>,
    completion: Ring<u64>,
    rx: Ring<libc::xdp_desc>,
    tx: Ring<libc::xdp_desc>,
    umem: Mapping,
    owner: Vec<Owner>,
    /// Frames the worker may write.
    free: Vec<u32>,
    /// Frames read from RX, waiting to go back on the fill ring.
    refill: Vec<u64>,
    /// Addresses from the RX or completion ring that named no frame of that ring: refused.
    pub refused: u64,
    pub mode: CopyMode,
}

fn setsockopt<T>(fd: RawFd, opt: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: the kernel reads `size_of::<T>()` bytes from `value`, a live reference.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_XDP,
            opt,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn getsockopt<T: Default>(fd: RawFd, opt: libc::c_int) -> io::Result<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, a live local of that size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_XDP,
            opt,
            &mut value as *mut T as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

impl Default for Wrapper {
    fn default() -> Self {
        // SAFETY: plain integers; all-zero is a valid value.
        Wrapper(unsafe { std::mem::zeroed() })
    }
}
struct Wrapper(libc::xdp_mmap_offsets);

/// Opens an AF_XDP socket (the probe: `EAFNOSUPPORT` where the kernel lacks it).
pub fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Xsk {
    /// A socket on queue `queue` of `ifindex` with a UMEM of `frames` frames (half for
    /// receiving, half for sending) and rings of `ring` entries (powers of two). Zero-copy is
    /// tried first unless `copy` forces copy mode.
    pub fn bind(ifindex: u32, queue: u32, frames: u32, ring: u32, copy: bool) -> io::Result<Xsk> {
        if !ring.is_power_of_two() || frames < 2 * ring {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "AF_XDP: rings of a power of two, and at least twice as many frames",
            ));
        }
        let fd = open_socket()?;
        let raw = fd.as_raw_fd();
        let len = frames as usize * FRAME_SIZE as usize;
        let umem = Mapping::anonymous(len)?;
        // SAFETY: zeroed then filled in; the kernel reads it once.
        let mut reg: libc::xdp_umem_reg = unsafe { std::mem::zeroed() };
        reg.addr = umem.ptr.as_ptr() as u64;
        reg.len = len as u64;
        reg.chunk_size = FRAME_SIZE;
        reg.headroom = 0;
        setsockopt(raw, libc::XDP_UMEM_REG, &reg)?;
        for opt in [
            libc::XDP_UMEM_FILL_RING,
            libc::XDP_UMEM_COMPLETION_RING,
            libc::XDP_RX_RING,
            libc::XDP_TX_RING,
        ] {
            setsockopt(raw, opt, &ring)?;
        }
        let off = getsockopt::<Wrapper>(raw, libc::XDP_MMAP_OFFSETS)?.0;
        let fill = Ring::map(raw, &off.fr, ring, libc::XDP_UMEM_PGOFF_FILL_RING)?;
        let completion = Ring::map(raw, &off.cr, ring, libc::XDP_UMEM_PGOFF_COMPLETION_RING)?;
        let rx = Ring::map(raw, &off.rx, ring, libc::XDP_PGOFF_RX_RING as u64)?;
        let tx = Ring::map(raw, &off.tx, ring, libc::XDP_PGOFF_TX_RING as u64)?;
        let mut xsk = Xsk {
            fd,
            fill,
            completion,
            rx,
            tx,
            umem,
            owner: vec![Owner::Free; frames as usize],
            free: (0..frames).rev().collect(),
            refill: Vec::with_capacity(ring as usize),
            refused: 0,
            mode: CopyMode::Copy,
        };
        // Half the frames on the fill ring before binding, so the first frames find room.
        let rx_frames: Vec<u64> = (0..ring)
            .map(|_| xsk.take_free().expect("frames"))
            .collect();
        for &a in &rx_frames {
            xsk.owner[(a / u64::from(FRAME_SIZE)) as usize] = Owner::Fill;
        }
        xsk.fill.produce(rx_frames.into_iter());
        let mut sa = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: libc::XDP_USE_NEED_WAKEUP,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        let bind = |sa: &libc::sockaddr_xdp| {
            // SAFETY: `sa` is a live sockaddr_xdp of the size given.
            let r = unsafe {
                libc::bind(
                    raw,
                    sa as *const libc::sockaddr_xdp as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
                )
            };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let zero_copy = if copy {
            Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
        } else {
            sa.sxdp_flags |= libc::XDP_ZEROCOPY;
            bind(&sa)
        };
        match zero_copy {
            Ok(()) => xsk.mode = CopyMode::ZeroCopy,
            Err(_) => {
                sa.sxdp_flags = libc::XDP_USE_NEED_WAKEUP | libc::XDP_COPY;
                bind(&sa)?;
            }
        }
        Ok(xsk)
    }

    fn take_free(&mut self) -> Option<u64> {
        self.free
            .pop()
            .map(|i| u64::from(i) * u64::from(FRAME_SIZE))
    }

    /// The frame an address from the kernel lies in, if it is one the pool has.
    fn frame_of(&self, addr: u64) -> Option<usize> {
        let i = (addr / u64::from(FRAME_SIZE)) as usize;
        (i < self.owner.len()).then_some(i)
    }

    /// Reads up to `max` received frames into `out` as (address, length); read the bytes with
    /// [`Xsk::rx_frame`] and give the frame back with [`Xsk::recycle`].
    pub fn receive(&mut self, max: usize, out: &mut Vec<(u64, u32)>) {
        let owner = &mut self.owner;
        let refused = &mut self.refused;
        self.rx.consume(max, |d: libc::xdp_desc| {
            let i = (d.addr / u64::from(FRAME_SIZE)) as usize;
            let in_frame = (d.addr % u64::from(FRAME_SIZE)) + u64::from(d.len);
            match owner.get_mut(i) {
                Some(o) if *o == Owner::Fill && in_frame <= u64::from(FRAME_SIZE) => {
                    *o = Owner::Rx;
                    out.push((d.addr, d.len));
                }
                _ => *refused += 1,
            }
        });
    }

    /// The bytes of a frame read from RX and not yet recycled; `None` for anything else.
    pub fn rx_frame(&self, addr: u64, len: u32) -> Option<&[u8]> {
        let i = self.frame_of(addr)?;
        if self.owner[i] != Owner::Rx
            || (addr % u64::from(FRAME_SIZE)) + u64::from(len) > u64::from(FRAME_SIZE)
        {
            return None;
        }
        // SAFETY: the frame is the worker's (Rx: off the fill ring, so the kernel does not
        // write it until `recycle` puts it back, which needs `&mut self` and so ends this
        // borrow), and `addr + len` lies inside it, inside the UMEM mapping.
        Some(unsafe {
            std::slice::from_raw_parts(self.umem.ptr.as_ptr().add(addr as usize), len as usize)
        })
    }

    /// Gives a received frame back (it goes on the fill ring at the next [`Xsk::refill`]).
    pub fn recycle(&mut self, addr: u64) {
        if let Some(i) = self.frame_of(addr) {
            if self.owner[i] == Owner::Rx {
                self.owner[i] = Owner::Fill;
                self.refill.push((i as u64) * u64::from(FRAME_SIZE));
            }
        }
    }

    /// Puts recycled frames on the fill ring.
    pub fn refill(&mut self) {
        if self.refill.is_empty() {
            return;
        }
        let n = self.fill.produce(self.refill.iter().copied());
        self.refill.drain(..n);
    }

    /// Takes back what the kernel finished sending.
    pub fn complete(&mut self) -> usize {
        let owner = &mut self.owner;
        let free = &mut self.free;
        let refused = &mut self.refused;
        self.completion.consume(usize::MAX, |addr: u64| {
            let i = (addr / u64::from(FRAME_SIZE)) as usize;
            match owner.get_mut(i) {
                Some(o) if *o == Owner::Tx => {
                    *o = Owner::Free;
                    free.push(i as u32);
                }
                _ => *refused += 1,
            }
        })
    }

    /// A free frame to write a frame into: its address and its bytes. `None` when every
    /// send frame is on the TX ring (or the TX ring has no room).
    pub fn tx_frame_mut(&mut self) -> Option<(u64, &mut [u8])> {
        if self.tx.room() == 0 {
            return None;
        }
        let i = *self.free.last()?;
        // SAFETY: a Free frame is nowhere in the kernel's rings, so nothing else reads or
        // writes it while this borrow of `self` lasts; it lies inside the UMEM mapping.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                self.umem.ptr.as_ptr().add(i as usize * FRAME_SIZE as usize),
                FRAME_SIZE as usize,
            )
        };
        Some((u64::from(i) * u64::from(FRAME_SIZE), bytes))
    }

    /// Puts the frame [`Xsk::tx_frame_mut`] gave, `len` bytes long, on the TX ring.
    pub fn send(&mut self, addr: u64, len: u32) -> bool {
        let Some(i) = self.frame_of(addr) else {
            return false;
        };
        if self.owner[i] != Owner::Free || len > FRAME_SIZE || self.free.last() != Some(&(i as u32))
        {
            return false;
        }
        let desc = libc::xdp_desc {
            addr,
            len,
            options: 0,
        };
        if self.tx.produce(std::iter::once(desc)) == 1 {
            self.free.pop();
            self.owner[i] = Owner::Tx;
            true
        } else {
            false
        }
    }

    /// Asks the kernel to send what is on the TX ring (copy mode always needs it; zero-copy
    /// only when the ring says so).
    pub fn kick(&self) {
        if self.mode == CopyMode::ZeroCopy && !self.tx.needs_wakeup() {
            return;
        }
        self.kick_now();
    }

    /// Where the fill ring asks for it (zero-copy drivers that sleep), wakes the receive
    /// side: a non-blocking zero-length `recvfrom`.
    pub fn wake_rx(&self) {
        if self.mode != CopyMode::ZeroCopy || !self.fill.needs_wakeup() {
            return;
        }
        // SAFETY: a zero-length recvfrom on our own socket; nothing is written to memory.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
    }

    /// Asks the kernel to send what is on the TX ring, whatever the ring's flag says.
    pub fn kick_now(&self) {
        // SAFETY: a zero-length sendto on our own socket; nothing is read from memory.
        unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
    }

    /// The kernel's counters for this socket.
    pub fn stats(&self) -> XskStats {
        match getsockopt::<Stats>(self.fd.as_raw_fd(), libc::XDP_STATISTICS) {
            Ok(Stats(s)) => XskStats {
                rx_dropped: s.rx_dropped + s.rx_fill_ring_empty_descs,
                rx_ring_full: s.rx_ring_full,
                tx_invalid: s.tx_invalid_descs,
            },
            Err(_) => XskStats::default(),
        }
    }

    /// Frames in flight on the TX ring.
    pub fn tx_in_flight(&self) -> usize {
        self.owner.iter().filter(|o| **o == Owner::Tx).count()
    }
}

struct Stats(libc::xdp_statistics);

impl Default for Stats {
    fn default() -> Self {
        // SAFETY: plain integers; all-zero is a valid value.
        Stats(unsafe { std::mem::zeroed() })
    }
}

impl AsRawFd for Xsk {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
