//! The preallocated pool of reply slots. Each slot owns a `msghdr`, its `iovec`, the peer
//! address, a control buffer and a data buffer; all of it is allocated once and never moves,
//! because the kernel reads it until the `SENDMSG` completes.
//!
//! Replies are queued during a loop turn and pushed to the ring by `flush` at the end of it.
//! Consecutive replies to the same peer are sent as one UDP GSO train (`UDP_SEGMENT`): one
//! `SENDMSG`, one pass through the socket layer, segmented by the kernel into the same
//! datagrams, in the same order. On loopback this removes most of the per-datagram send cost.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

use io_uring::{opcode, types};

use crate::datagram::{
    encode_pktinfo, encode_sockaddr, encode_udp_segment, CONTROL_LEN, MAX_GSO_SEGMENTS,
};
use crate::op::{next_generation, OpKind, UserData};
use crate::ring::Ring;

/// Why a reply was not queued. Each case is counted in `send_dropped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// Every send slot is in use; the engine applies backpressure before calling a handler
    /// again, but a handler that sends several replies per datagram can run out.
    PoolExhausted,
    /// The reply is longer than a send slot (`--max-datagram`).
    TooLong,
    /// An IPv6 destination on an IPv4 socket.
    AddressFamily,
    /// The peer is not validated and the reply would exceed its anti-amplification budget.
    AmplificationLimit,
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
        })
    }
}

impl std::error::Error for SendError {}

/// Where a reply goes: which socket, to whom, from which local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dest {
    pub fd: RawFd,
    pub peer: SocketAddr,
    /// Source address (packet-info) for a wildcard-bound socket.
    pub local: Option<IpAddr>,
    /// The socket is connected to `peer`: send without an address.
    pub connected: bool,
}

#[repr(C)]
struct SendSlot {
    msg: libc::msghdr,
    iov: libc::iovec,
    name: [u8; 28],
    control: [u8; CONTROL_LEN],
    /// Bytes of `control` the packet-info message uses (0 without one).
    pktinfo_len: usize,
    dest: Dest,
    /// Datagrams this slot carries (more than one for a GSO train).
    segments: u16,
    /// Size of every segment but the last, for a train.
    segment_len: u16,
    generation: u32,
    in_flight: bool,
}

/// The outcome of a send completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    /// Datagrams the completed send carried.
    pub segments: u16,
}

/// A fixed set of reply slots with a free list.
pub struct SendPool {
    slots: Box<[SendSlot]>,
    data: Box<[u8]>,
    slot_capacity: usize,
    free: Vec<u32>,
    /// Slots filled this turn, in order, not yet pushed to the ring.
    queued: Vec<u32>,
    socket_is_v6: bool,
    gso: bool,
}

impl SendPool {
    /// `count` slots of `slot_capacity` bytes each; unconnected destinations are encoded for
    /// an IPv6 socket when `socket_is_v6`. The data area is one zeroed allocation; pages the
    /// replies never touch are never made resident.
    pub fn new(count: usize, slot_capacity: usize, socket_is_v6: bool, gso: bool) -> SendPool {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut slots: Box<[SendSlot]> = (0..count)
            .map(|_| SendSlot {
                // SAFETY: msghdr and iovec are plain C structs for which all-zero is valid.
                msg: unsafe { std::mem::zeroed() },
                // SAFETY: as above.
                iov: unsafe { std::mem::zeroed() },
                name: [0; 28],
                control: [0; CONTROL_LEN],
                pktinfo_len: 0,
                dest: Dest {
                    fd: -1,
                    peer: unspecified,
                    local: None,
                    connected: false,
                },
                segments: 1,
                segment_len: 0,
                generation: 0,
                in_flight: false,
            })
            .collect();
        let mut data = vec![0u8; count * slot_capacity].into_boxed_slice();
        for (i, slot) in slots.iter_mut().enumerate() {
            // SAFETY: `i * slot_capacity` is inside `data` (i < count).
            slot.iov.iov_base = unsafe { data.as_mut_ptr().add(i * slot_capacity) }.cast();
            slot.msg.msg_name = slot.name.as_mut_ptr().cast();
            slot.msg.msg_iov = &mut slot.iov;
            slot.msg.msg_iovlen = 1;
        }
        SendPool {
            slots,
            data,
            slot_capacity,
            // Pop from the end: hand out low slots first.
            free: (0..count as u32).rev().collect(),
            queued: Vec::with_capacity(count),
            socket_is_v6,
            gso,
        }
    }

    /// Slots a reply can still take this turn.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Slots queued or in flight.
    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Sends the kernel still has to complete.
    pub fn in_flight(&self) -> usize {
        self.in_use() - self.queued.len()
    }

    pub fn slot_capacity(&self) -> usize {
        self.slot_capacity
    }

    /// Whether GSO trains are in use.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Stops building GSO trains (after the kernel refused one).
    pub fn disable_gso(&mut self) {
        self.gso = false;
    }

    /// Queues a reply to `dest` whose payload `fill` writes into the slot's buffer, returning
    /// its length. The kernel sees it at the next `flush`.
    pub fn queue(
        &mut self,
        dest: Dest,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<usize, SendError> {
        let index = self.free.pop().ok_or(SendError::PoolExhausted)?;
        match self.prepare(index, dest, fill) {
            Ok(len) => {
                self.queued.push(index);
                Ok(len)
            }
            Err(e) => {
                self.free.push(index);
                Err(e)
            }
        }
    }

    /// Queues a copy of `bytes` for `dest`.
    pub fn queue_bytes(&mut self, dest: Dest, bytes: &[u8]) -> Result<usize, SendError> {
        self.queue(dest, |buf| {
            let n = bytes.len().min(buf.len());
            buf[..n].copy_from_slice(&bytes[..n]);
            // Longer than the slot: `queue` sees the real length and refuses it (TooLong).
            bytes.len()
        })
    }

    fn prepare(
        &mut self,
        index: u32,
        dest: Dest,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<usize, SendError> {
        let start = index as usize * self.slot_capacity;
        let len = fill(&mut self.data[start..start + self.slot_capacity]);
        if len > self.slot_capacity {
            return Err(SendError::TooLong);
        }
        let slot = &mut self.slots[index as usize];
        if dest.connected {
            // A connected socket sends to its peer; an address would only cost a route lookup.
            slot.msg.msg_namelen = 0;
        } else if slot.dest.peer != dest.peer || slot.dest.connected || slot.msg.msg_namelen == 0 {
            slot.msg.msg_namelen = encode_sockaddr(dest.peer, self.socket_is_v6, &mut slot.name)
                .ok_or(SendError::AddressFamily)?;
        }
        if slot.dest.local != dest.local || (dest.local.is_some() && slot.pktinfo_len == 0) {
            slot.pktinfo_len = match dest.local {
                Some(ip) => encode_pktinfo(ip, &mut slot.control),
                None => 0,
            };
        }
        slot.dest = dest;
        slot.iov.iov_len = len;
        slot.segments = 1;
        Ok(len)
    }

    /// Pushes every queued reply to `ring`, joining consecutive replies to the same peer into
    /// GSO trains. Returns the number of `SENDMSG` entries pushed.
    pub fn flush(&mut self, ring: &mut Ring) -> io::Result<usize> {
        let mut pushed = 0;
        let mut i = 0;
        while i < self.queued.len() {
            let head = self.queued[i];
            i += 1;
            if self.gso {
                i = self.extend_train(head, i);
            }
            let slot = &mut self.slots[head as usize];
            let fd = slot.dest.fd;
            let mut control_len = slot.pktinfo_len;
            if slot.segments > 1 {
                // CONTROL_LEN holds packet-info and UDP_SEGMENT together (tested in datagram).
                control_len = encode_udp_segment(&mut slot.control, control_len, slot.segment_len)
                    .unwrap_or(control_len);
            }
            slot.msg.msg_controllen = control_len;
            slot.msg.msg_control = if control_len == 0 {
                std::ptr::null_mut()
            } else {
                slot.control.as_mut_ptr().cast()
            };
            let user_data = UserData::new(OpKind::Send, slot.generation, head).encode();
            let entry = opcode::SendMsg::new(types::Fd(fd), &slot.msg)
                .build()
                .user_data(user_data);
            slot.in_flight = true;
            // SAFETY: the msghdr, iovec, address, control and data buffers belong to this
            // slot, live in boxed slices that never move, and are not reused until the
            // completion for this generation arrives (`complete`): the slot is off the free
            // list until then.
            if let Err(e) = unsafe { ring.push(&entry) } {
                // Not pushed: drop this and the rest, freeing their slots, and report.
                let rest: Vec<u32> = self.queued.drain(i - 1..).collect();
                for index in rest {
                    self.release(index);
                }
                self.queued.clear();
                return Err(e);
            }
            pushed += 1;
        }
        self.queued.clear();
        Ok(pushed)
    }

    /// Appends the replies queued after `head` (from `next` on) to `head`'s train while they
    /// go to the same peer from the same address and keep the train valid: every segment but
    /// the last has the first one's size, at most 64 segments and 65,507 bytes. Returns the
    /// index of the first reply not taken.
    fn extend_train(&mut self, head: u32, mut next: usize) -> usize {
        let cap = self.slot_capacity.min(crate::config::MAX_UDP4_PAYLOAD);
        let (dest, segment) = {
            let h = &self.slots[head as usize];
            (h.dest, h.iov.iov_len)
        };
        if segment == 0 || segment > usize::from(u16::MAX) {
            return next;
        }
        let mut total = segment;
        let mut count = 1usize;
        while next < self.queued.len() && count < MAX_GSO_SEGMENTS {
            let index = self.queued[next];
            let s = &self.slots[index as usize];
            let len = s.iov.iov_len;
            if s.dest != dest || len == 0 || len > segment || total + len > cap {
                break;
            }
            let from = index as usize * self.slot_capacity;
            let to = head as usize * self.slot_capacity + total;
            self.data.copy_within(from..from + len, to);
            total += len;
            count += 1;
            next += 1;
            self.free.push(index);
            if len < segment {
                // A shorter segment ends a train.
                break;
            }
        }
        let h = &mut self.slots[head as usize];
        h.iov.iov_len = total;
        h.segments = count as u16;
        h.segment_len = segment as u16;
        next
    }

    /// Withdraws the reply queued last (not yet flushed), freeing its slot.
    pub fn cancel_last(&mut self) {
        if let Some(index) = self.queued.pop() {
            self.release(index);
        }
    }

    /// Hands every queued reply to `f` instead of the kernel and frees its slot (for driving
    /// handlers without a socket: tests, benchmarks).
    pub(crate) fn take_queued(&mut self, mut f: impl FnMut(SocketAddr, &[u8])) {
        let queued = std::mem::take(&mut self.queued);
        for &index in &queued {
            let slot = &self.slots[index as usize];
            let start = index as usize * self.slot_capacity;
            f(slot.dest.peer, &self.data[start..start + slot.iov.iov_len]);
            self.release(index);
        }
        self.queued = queued;
        self.queued.clear();
    }

    fn release(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        slot.in_flight = false;
        slot.generation = next_generation(slot.generation);
        self.free.push(index);
    }

    /// Frees the slot a `Send` completion names. `None` when the completion is stale (its
    /// generation no longer matches, or the slot is not in flight): the caller counts it.
    pub fn complete(&mut self, ud: UserData) -> Option<Completed> {
        let slot = self.slots.get_mut(ud.slot as usize)?;
        if !slot.in_flight || slot.generation != ud.generation {
            return None;
        }
        let segments = slot.segments;
        self.release(ud.slot);
        Some(Completed { segments })
    }
}

/// The errno of a failed send, for logs.
pub fn send_errno(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(count: usize, cap: usize) -> SendPool {
        SendPool::new(count, cap, false, true)
    }

    fn dest(peer: &str) -> Dest {
        Dest {
            fd: 3,
            peer: peer.parse().unwrap(),
            local: None,
            connected: false,
        }
    }

    fn queue_bytes(p: &mut SendPool, peer: &str, bytes: &[u8]) -> Result<usize, SendError> {
        p.queue(dest(peer), |b| {
            b[..bytes.len()].copy_from_slice(bytes);
            bytes.len()
        })
    }

    #[test]
    fn complete_checks_generation_and_frees() {
        let mut p = pool(2, 16);
        let index = p.free.pop().unwrap();
        p.slots[index as usize].in_flight = true;
        let ud = UserData::new(OpKind::Send, 0, index);
        assert_eq!(p.complete(ud), Some(Completed { segments: 1 }));
        assert_eq!(p.free_slots(), 2);
        // The same completion again is stale: the slot moved to generation 1.
        assert_eq!(p.complete(ud), None);
        assert_eq!(p.complete(UserData::new(OpKind::Send, 0, 99)), None);
    }

    #[test]
    fn queue_rejects_overlong_and_wrong_family_and_frees_the_slot() {
        let mut p = pool(1, 8);
        assert_eq!(
            p.queue(dest("[::1]:5"), |_| 0),
            Err(SendError::AddressFamily)
        );
        assert_eq!(p.queue(dest("127.0.0.1:5"), |_| 9), Err(SendError::TooLong));
        assert_eq!(p.free_slots(), 1);
        assert_eq!(queue_bytes(&mut p, "127.0.0.1:5", b"abc"), Ok(3));
        assert_eq!(p.free_slots(), 0);
        assert_eq!(
            queue_bytes(&mut p, "127.0.0.1:5", b"x"),
            Err(SendError::PoolExhausted)
        );
    }

    #[test]
    fn consecutive_same_peer_replies_form_one_train() {
        let mut p = pool(8, 64);
        for b in [b"aaaa", b"bbbb", b"cccc"] {
            queue_bytes(&mut p, "127.0.0.1:5", b).unwrap();
        }
        queue_bytes(&mut p, "127.0.0.1:5", b"dd").unwrap(); // shorter: ends the train
        queue_bytes(&mut p, "127.0.0.1:5", b"eeee").unwrap(); // new train
        queue_bytes(&mut p, "127.0.0.1:6", b"ffff").unwrap(); // other peer
        let head = p.queued[0];
        let next = p.extend_train(head, 1);
        assert_eq!(next, 4);
        let h = &p.slots[head as usize];
        assert_eq!(h.segments, 4);
        assert_eq!(h.segment_len, 4);
        assert_eq!(h.iov.iov_len, 14);
        let start = head as usize * 64;
        assert_eq!(&p.data[start..start + 14], b"aaaabbbbccccdd");
        // The three joined slots went back to the free list.
        assert_eq!(p.free_slots(), 2 + 3);
        let head2 = p.queued[4];
        assert_eq!(p.extend_train(head2, 5), 5, "different peer does not join");
    }

    #[test]
    fn longer_or_empty_replies_do_not_join_and_trains_respect_limits() {
        let mut p = pool(4, 64);
        queue_bytes(&mut p, "127.0.0.1:5", b"aa").unwrap();
        queue_bytes(&mut p, "127.0.0.1:5", b"bbb").unwrap();
        assert_eq!(p.extend_train(p.queued[0], 1), 1);
        let mut p = pool(4, 64);
        queue_bytes(&mut p, "127.0.0.1:5", b"").unwrap();
        queue_bytes(&mut p, "127.0.0.1:5", b"").unwrap();
        assert_eq!(p.extend_train(p.queued[0], 1), 1);
        // Capacity: 3 x 30 bytes do not fit a 64-byte slot; the train stops at 2.
        let mut p = pool(4, 64);
        for _ in 0..3 {
            queue_bytes(&mut p, "127.0.0.1:5", &[1u8; 30]).unwrap();
        }
        assert_eq!(p.extend_train(p.queued[0], 1), 2);
        // At most 64 segments.
        let mut p = pool(70, 65_536);
        for _ in 0..70 {
            queue_bytes(&mut p, "127.0.0.1:5", &[1u8; 10]).unwrap();
        }
        assert_eq!(p.extend_train(p.queued[0], 1), 64);
    }
}
