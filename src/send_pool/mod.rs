//! The preallocated pool of reply slots. Each slot owns a `msghdr`, its `iovec`, the peer
//! address, a control buffer and a data buffer; all of it is allocated once and never moves,
//! because the kernel reads it until the `SENDMSG` completes.
//!
//! A slot moves through three states, kept in [`SlotState`] and checked on every move:
//! `Free` → `Queued` (a reply was written into it this turn) → `InFlight` (its `SENDMSG` was
//! pushed) → `Free` (its completion arrived). Only `Free` and `Queued` slots are ours to
//! write; the kernel reads an `InFlight` slot's headers and data. So the pool holds that
//! memory through raw pointers, never through a Rust reference that would also cover the
//! slots the kernel is reading, and `Drop` leaks it rather than free it while any slot is in
//! flight.
//!
//! Replies are queued during a loop turn and pushed to the ring by `flush` at the end of it.
//! Consecutive replies to the same peer are sent as one UDP GSO train (`UDP_SEGMENT`): one
//! `SENDMSG`, one pass through the socket layer, segmented by the kernel into the same
//! datagrams, in the same order. On loopback this removes most of the per-datagram send cost.
//!
//! GSO is switched off only on evidence ([`SendPool::gso_evidence`]): `EIO` to a train means
//! the kernel or device cannot segment at all (kernel `udp_send_skb`), so trains stop for the
//! pool; `EINVAL` to a train can be the destination's own doing (a route whose MTU is smaller
//! than the segment), so trains stop to that destination only, until a lone datagram to it
//! goes through; any other error says nothing about GSO.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::ptr::NonNull;

use io_uring::squeue;

use crate::datagram::{CONTROL_LEN, MAX_GSO_SEGMENTS};
use crate::op::{next_generation, OpKind, UserData};

mod append;
mod flush;
mod gso;
mod queue;

pub use append::QueueMark;
pub use gso::GsoEvidence;
use gso::Hold;

/// End of a train's member chain.
const NO_SLOT: u32 = u32::MAX;

/// The most slots a pool may have (twice the command line's limit). Sizes are checked
/// against this and [`MAX_SLOT_CAPACITY`] before anything is allocated.
pub const MAX_SLOTS: usize = 1 << 17;

/// The most bytes a slot may hold: a UDP datagram, or a ready-made GSO train, is at most
/// 64 KiB.
pub const MAX_SLOT_CAPACITY: usize = 1 << 16;

/// Why a reply was not queued. Each case is counted in `send_dropped`.
// `non_exhaustive`: a new reason is not a breaking change for handlers that match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// Every send slot is in use; the engine applies backpressure before calling a handler
    /// again, but a handler that sends several replies per datagram can run out.
    PoolExhausted,
    /// The reply is longer than a send slot (`--max-datagram`).
    TooLong,
    /// An IPv6 destination on an IPv4 socket.
    AddressFamily,
    /// The peer is not validated and the reply would exceed its anti-amplification budget.
    /// A ready-made train is charged whole: over the budget, none of its datagrams is sent.
    AmplificationLimit,
    /// The destination is no address to send to: an unspecified address or port 0, such as
    /// [`Reply::send`](crate::Reply::send) from a timer or shutdown call, which answers no
    /// datagram. Refused before the kernel sees it (the kernel would answer `EINVAL`).
    NoDestination,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SendError::PoolExhausted => "no free send slot",
            SendError::TooLong => "reply longer than --max-datagram",
            SendError::AddressFamily => "destination address family does not match the socket",
            SendError::AmplificationLimit => {
                "peer not validated: reply exceeds the anti-amplification budget"
            }
            SendError::NoDestination => {
                "no destination: unspecified address or port 0 (a timer or shutdown reply \
                 answers no datagram; use send_to)"
            }
        })
    }
}

impl std::error::Error for SendError {}

/// Where a reply goes: which socket, to whom, from which local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dest {
    pub fd: RawFd,
    pub peer: SocketAddr,
    /// Source address (packet-info) for a wildcard-bound socket.
    pub local: Option<IpAddr>,
    /// The socket is connected to `peer`: send without an address.
    pub connected: bool,
}

impl Dest {
    /// Whether `peer` is an address a datagram can go to: not unspecified (also not as an
    /// IPv4-mapped IPv6 address), not port 0.
    fn is_addressable(&self) -> bool {
        self.peer.port() != 0 && !self.peer.ip().to_canonical().is_unspecified()
    }
}

/// How a reply leaves, beyond its destination: what a transport stack (QUIC) decides per
/// transmit. `Default` is a plain datagram.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendOptions {
    /// The payload is a ready-made UDP GSO train: datagrams of this many bytes, the last one
    /// possibly shorter (at most 64 of them). It goes out as one `SENDMSG` with a
    /// `UDP_SEGMENT` message and is never regrouped with other replies. Where the kernel
    /// refused GSO, the train is split over several slots instead.
    pub segment_size: Option<usize>,
    /// The local address to send from (`IP_PKTINFO` / `IPV6_PKTINFO`), for a socket bound to
    /// a wildcard address. `None`: the address the datagram being answered arrived on.
    pub source: Option<IpAddr>,
    /// The ECN codepoint (0..=3) for the IP header (`IP_TOS` / `IPV6_TCLASS`). A reply with a
    /// mark is sent on its own, never joined to a train of replies without one.
    pub ecn: u8,
}

/// Where pushed entries go: the ring, or a stand-in in tests.
pub trait Submit {
    /// Queues `entry` for the kernel.
    ///
    /// # Safety
    /// Every pointer inside `entry` must stay valid and unmoved until the kernel posts the
    /// operation's final completion.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()>;
}

/// The part of a slot the kernel reads while the send is in flight.
#[repr(C)]
struct SlotHeaders {
    msg: libc::msghdr,
    /// `iov[0]` is the slot's own data; a train head lists its members' data after it.
    iov: [libc::iovec; MAX_GSO_SEGMENTS],
    name: [u8; 28],
    control: [u8; CONTROL_LEN],
}

/// Where a slot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Holds a reply written this turn, not yet pushed.
    Queued,
    /// Pushed: the kernel may be reading the slot's headers and data.
    InFlight,
}

/// Our bookkeeping for a slot; the kernel never sees it.
struct SlotMeta {
    state: SlotState,
    dest: Dest,
    /// Bytes of this slot's reply.
    len: usize,
    /// The next member of this slot's GSO train (`NO_SLOT`: none), from flush to completion.
    next: u32,
    /// Bytes of `control` the packet-info message uses (0 without one).
    pktinfo_len: usize,
    /// `name` holds `dest.peer` encoded (it is re-encoded only when the peer changes).
    name_valid: bool,
    /// Datagrams this slot's send carries (more than one for a GSO train head).
    segments: u16,
    /// The slot heads the `SENDMSG` it is in flight with (set by `seal`): its completion is
    /// the one that frees the train. A member of a train is in flight but no head.
    head: bool,
    /// The segment size of a ready-made train in this one slot (0: a single datagram).
    train_segment: u16,
    /// ECN codepoint to mark the datagrams with (0: none, no control message).
    ecn: u8,
    /// A plain reply (`queue`), or a train built of them in this slot, that the next plain
    /// reply to the same destination may join in place (`append.rs`).
    appendable: bool,
    generation: u32,
}

/// The outcome of a send completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    /// Datagrams the completed send carried.
    pub segments: u16,
    /// Where they went.
    pub dest: Dest,
}

/// `flush` could not push every queued reply; the ones not pushed were dropped.
#[derive(Debug)]
pub struct FlushError {
    pub error: io::Error,
    /// Replies (datagrams) dropped, for the `send_dropped` counter.
    pub dropped: u64,
}

/// A fixed set of reply slots with a free list.
pub struct SendPool {
    /// `count` slot headers, from a leaked boxed slice; freed in `Drop` if nothing is in
    /// flight.
    headers: NonNull<SlotHeaders>,
    /// `count * stride` bytes of reply data, likewise.
    data: NonNull<u8>,
    count: usize,
    slot_capacity: usize,
    /// Bytes between slots: twice `slot_capacity`, so a train built in one slot
    /// (`append.rs`) always has `slot_capacity` bytes of room for its next datagram.
    stride: usize,
    meta: Vec<SlotMeta>,
    free: Vec<u32>,
    /// Slots filled this turn, in order, not yet pushed to the ring.
    queued: Vec<u32>,
    socket_is_v6: bool,
    gso: bool,
    /// Destinations whose trains the kernel refused with `EINVAL`, and what is known of them
    /// (see `gso_evidence`). Empty almost always, so the per-reply check is one `is_empty`.
    held: HashMap<Dest, Hold, BuildHasherDefault<flush::FoldHasher>>,
    /// A descriptor registered in the ring's file table, and its slot: sends from it name the
    /// slot (`IOSQE_FIXED_FILE`) instead of the descriptor.
    fixed_file: Option<(RawFd, u32)>,
    /// Scratch space of `flush`, kept to avoid allocating per turn.
    trains: Vec<flush::Train>,
    open_trains: flush::OpenTrains,
    /// Tests of the turn's grouping (`flush.rs`) turn writing trains in place off, so that
    /// every reply takes a slot of its own as it did before `append.rs`.
    #[cfg(test)]
    pub(crate) no_append: bool,
}

// SAFETY: the pointers are the pool's own heap allocations, used only through `&mut self`
// (like a `Box`); the kernel's reads do not depend on which thread owns the pool.
unsafe impl Send for SendPool {}

impl SendPool {
    /// `count` slots of `slot_capacity` bytes each; unconnected destinations are encoded for
    /// an IPv6 socket when `socket_is_v6`. The data area is one zeroed allocation; pages the
    /// replies never touch are never made resident.
    ///
    /// `InvalidInput` for more than [`MAX_SLOTS`] slots or more than [`MAX_SLOT_CAPACITY`]
    /// bytes a slot, checked before anything is allocated: the pool hands the kernel pointers
    /// computed from these numbers, so an overflowed product would let it (and `data_mut`)
    /// reach far past a too-small allocation.
    pub fn new(
        count: usize,
        slot_capacity: usize,
        socket_is_v6: bool,
        gso: bool,
    ) -> io::Result<SendPool> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        if count > MAX_SLOTS {
            return Err(invalid(format!(
                "send pool: {count} slots, at most {MAX_SLOTS} allowed"
            )));
        }
        if slot_capacity > MAX_SLOT_CAPACITY {
            return Err(invalid(format!(
                "send pool: {slot_capacity}-byte slots, at most {MAX_SLOT_CAPACITY} bytes allowed"
            )));
        }
        let stride = slot_capacity * 2;
        let data_len = count.checked_mul(stride).ok_or_else(|| {
            invalid(format!(
                "send pool: {count} slots of {slot_capacity} bytes overflow usize"
            ))
        })?;
        let headers: Box<[SlotHeaders]> = (0..count)
            .map(|_| SlotHeaders {
                // SAFETY: msghdr and iovec are plain C structs for which all-zero is valid.
                msg: unsafe { std::mem::zeroed() },
                // SAFETY: as above.
                iov: unsafe { std::mem::zeroed() },
                name: [0; 28],
                control: [0; CONTROL_LEN],
            })
            .collect();
        let data: Box<[u8]> = vec![0u8; data_len].into_boxed_slice();
        let headers = NonNull::new(Box::into_raw(headers).cast::<SlotHeaders>())
            .expect("Box::into_raw is never null");
        let data =
            NonNull::new(Box::into_raw(data).cast::<u8>()).expect("Box::into_raw is never null");
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let pool = SendPool {
            headers,
            data,
            count,
            slot_capacity,
            stride,
            meta: (0..count)
                .map(|_| SlotMeta {
                    state: SlotState::Free,
                    dest: Dest {
                        fd: -1,
                        peer: unspecified,
                        local: None,
                        connected: false,
                    },
                    len: 0,
                    next: NO_SLOT,
                    pktinfo_len: 0,
                    name_valid: false,
                    segments: 1,
                    head: false,
                    train_segment: 0,
                    ecn: 0,
                    appendable: false,
                    generation: 0,
                })
                .collect(),
            // Pop from the end: hand out low slots first.
            free: (0..count as u32).rev().collect(),
            queued: Vec::with_capacity(count),
            socket_is_v6,
            gso,
            held: HashMap::default(),
            fixed_file: None,
            trains: Vec::with_capacity(count),
            open_trains: flush::OpenTrains::default(),
            #[cfg(test)]
            no_append: false,
        };
        for index in 0..count {
            let h = pool.headers_ptr(index);
            // SAFETY: `h` points at slot `index`'s headers, inside the allocation, which no
            // reference covers; the pointers stored are into the same slot (name, iov) and
            // into the slot's own stretch of the data area (index < count).
            unsafe {
                (*h).iov[0].iov_base = pool.data.as_ptr().add(index * stride).cast();
                (*h).msg.msg_name = std::ptr::addr_of_mut!((*h).name).cast();
                (*h).msg.msg_iov = std::ptr::addr_of_mut!((*h).iov).cast();
                (*h).msg.msg_iovlen = 1;
            }
        }
        Ok(pool)
    }

    /// Slots a reply can still take this turn.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// `SENDMSG`s the kernel still has to complete (a train is one: its head). A scan of
    /// every slot, for tests: the worker's ledger counts what is in flight
    /// (`worker/ledger.rs`), and `Drop` asks `any_in_flight`.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.meta
            .iter()
            .filter(|m| m.state == SlotState::InFlight && m.head)
            .count()
    }

    /// Whether the kernel may be reading any slot (one pushed and not completed).
    fn any_in_flight(&self) -> bool {
        self.meta.iter().any(|m| m.state == SlotState::InFlight)
    }

    pub fn slot_capacity(&self) -> usize {
        self.slot_capacity
    }

    /// Sends from `fd` name registered file slot `slot` from now on.
    pub fn use_fixed_file(&mut self, fd: RawFd, slot: u32) {
        self.fixed_file = Some((fd, slot));
    }

    /// Stops building GSO trains.
    #[cfg(test)]
    pub fn disable_gso(&mut self) {
        self.gso = false;
    }

    fn headers_ptr(&self, index: usize) -> *mut SlotHeaders {
        assert!(index < self.count);
        // SAFETY: index < count: inside the headers allocation.
        unsafe { self.headers.as_ptr().add(index) }
    }

    /// Slot `index`'s headers, which must be ours (not in flight).
    fn headers_mut(&mut self, index: u32) -> &mut SlotHeaders {
        assert_ne!(self.meta[index as usize].state, SlotState::InFlight);
        // SAFETY: the slot is not in flight, so the kernel does not read it, and `&mut self`
        // makes this the only reference to it; the reference covers this slot only.
        unsafe { &mut *self.headers_ptr(index as usize) }
    }

    /// Slot `index`'s data buffer, which must be ours (not in flight).
    fn data_mut(&mut self, index: u32) -> &mut [u8] {
        assert_ne!(self.meta[index as usize].state, SlotState::InFlight);
        assert!((index as usize) < self.count);
        // SAFETY: as in `headers_mut`; the slice is this slot's stretch of the data area.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.data.as_ptr().add(index as usize * self.stride),
                self.slot_capacity,
            )
        }
    }

    /// Withdraws the reply queued last (not yet flushed), freeing its slot.
    pub fn cancel_last(&mut self) {
        if let Some(index) = self.queued.pop() {
            self.release(index);
        }
    }

    /// Returns a queued slot to the free list under a new generation.
    fn release(&mut self, index: u32) {
        self.release_from(index, SlotState::Queued);
    }

    /// Returns a slot in state `from` to the free list under a new generation. Any other
    /// state is a bookkeeping bug (a slot released twice, or one the kernel may be reading):
    /// caught here before the free list can hand the slot out twice.
    fn release_from(&mut self, index: u32, from: SlotState) {
        let meta = &mut self.meta[index as usize];
        assert_eq!(
            meta.state, from,
            "send slot {index} released while {:?}",
            meta.state
        );
        meta.next = NO_SLOT;
        meta.head = false;
        meta.state = SlotState::Free;
        meta.generation = next_generation(meta.generation);
        self.free.push(index);
    }

    /// Frees the train a `Send` completion names. `None` when the `UserData` is not what a
    /// train was submitted with (another kind, a slot outside the pool, a generation that no
    /// longer matches, a slot not in flight, a member of a train rather than its head): the
    /// caller counts it. Checked in every build: freeing a slot the kernel still reads would
    /// let the next reply overwrite it.
    pub fn complete(&mut self, ud: UserData) -> Option<Completed> {
        if ud.kind != OpKind::Send {
            return None;
        }
        let meta = self.meta.get(ud.slot as usize)?;
        if meta.state != SlotState::InFlight || !meta.head || meta.generation != ud.generation {
            return None;
        }
        let done = Completed {
            segments: meta.segments,
            dest: meta.dest,
        };
        self.release_train(ud.slot, SlotState::InFlight);
        Some(done)
    }

    /// Releases a train's head and every member, each from state `from`; returns how many
    /// slots (datagrams) that was.
    fn release_train(&mut self, head: u32, from: SlotState) -> u64 {
        let mut index = head;
        let mut released = 0;
        while index != NO_SLOT {
            let next = self.meta[index as usize].next;
            self.release_from(index, from);
            released += 1;
            index = next;
        }
        released
    }
}

impl Drop for SendPool {
    fn drop(&mut self) {
        if self.any_in_flight() {
            // The kernel may still read these slots: leak them rather than free them. The
            // worker drains to zero before it drops the pool, so this happens only when
            // shutdown timed out.
            tracing::debug!("leaking send slots still in flight");
            return;
        }
        // SAFETY: both pointers came from `Box::into_raw` of boxed slices of exactly these
        // lengths, are freed only here, and nothing is in flight, so the kernel holds no
        // pointer into them.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.headers.as_ptr(),
                self.count,
            )));
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.data.as_ptr(),
                self.count * self.stride,
            )));
        }
    }
}

/// The errno of a failed send, for logs.
pub fn send_errno(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}

#[cfg(test)]
pub(super) mod test_util;

#[cfg(test)]
mod tests;
