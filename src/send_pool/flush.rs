//! Pushing the turn's replies. Consecutive replies to one peer are a train in one slot
//! already (`append.rs`); the rest to one peer anywhere in the turn's batch (per-peer order
//! kept) form a UDP GSO train here: one `SENDMSG` over the members' slots (gathered into the
//! head's when the train fits it) with a `UDP_SEGMENT` control message, which the kernel
//! segments back into the same datagrams, in the same order. A train keeps the GSO rules
//! (kernel `udp_send_skb`): every segment but the last has the first one's size, at most
//! 64 segments and 65,507 bytes.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

use super::{Dest, FlushError, SendPool, SlotState, Submit, NO_SLOT};
use crate::config::MAX_UDP4_PAYLOAD;
use crate::datagram::{encode_ecn, encode_udp_segment, MAX_GSO_SEGMENTS};
use crate::op::{OpKind, UserData};

/// A train being assembled: a chain of slots through `SlotMeta::next`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Train {
    head: u32,
    tail: u32,
    count: u16,
    /// The first segment's size: later ones may not be larger, and a smaller one ends it.
    segment: usize,
    bytes: usize,
}

/// The newest train of each destination that can still take segments.
pub(crate) type OpenTrains = HashMap<Dest, usize, BuildHasherDefault<FoldHasher>>;

/// A multiply-and-fold hash for the per-turn destination table: the keys are ours (a
/// descriptor and an address), not attacker-chosen collisions worth SipHash's cost, and the
/// table lives for one flush.
#[derive(Default)]
pub(crate) struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// An `IORING_OP_SEND` of `len` bytes at `base` to the address at `name` (none when
/// `namelen` is 0: a connected socket).
/// `fixed`: the descriptor's slot in the registered file table, if it has one.
fn send_to(
    fd: RawFd,
    fixed: Option<u32>,
    base: *mut u8,
    len: usize,
    name: *const u8,
    namelen: libc::socklen_t,
) -> squeue::Entry {
    let send = match fixed {
        Some(slot) => opcode::Send::new(types::Fixed(slot), base, len as u32),
        None => opcode::Send::new(types::Fd(fd), base, len as u32),
    };
    if namelen == 0 {
        send.build()
    } else {
        send.dest_addr(name.cast()).dest_addr_len(namelen).build()
    }
}

impl SendPool {
    /// Pushes every queued reply to `sink`, grouping replies to one destination into GSO
    /// trains when GSO is on. Returns the number of `SENDMSG` entries pushed. When a push
    /// fails, that entry and every one after it are dropped: their slots go back to the free
    /// list (each exactly once) and `FlushError::dropped` counts their datagrams.
    pub fn flush(&mut self, sink: &mut impl Submit) -> Result<usize, FlushError> {
        self.build_trains();
        let trains = std::mem::take(&mut self.trains);
        let mut result = Ok(trains.len());
        for (n, train) in trains.iter().enumerate() {
            let entry = self.seal(train);
            // SAFETY: the entry points at the head's headers (msghdr, iovec list, address,
            // control) and at every member's data, inside allocations that are freed only by
            // `Drop` and only when nothing is in flight (else leaked). `seal` marked the head
            // and every member `InFlight`; they stay so until `complete` sees the entry's
            // completion, and no method writes an `InFlight` slot (`headers_mut`/`data_mut`
            // assert it).
            if let Err(error) = unsafe { sink.push(&entry) } {
                let mut dropped = self.release_train(train.head, SlotState::InFlight);
                for later in &trains[n + 1..] {
                    dropped += self.release_train(later.head, SlotState::Queued);
                }
                result = Err(FlushError { error, dropped });
                break;
            }
        }
        self.trains = trains;
        self.trains.clear();
        self.queued.clear();
        result
    }

    /// Chains the queued replies into trains, in the order of each train's first reply.
    fn build_trains(&mut self) {
        self.trains.clear();
        self.open_trains.clear();
        // The last destination's open train: replies to one peer come in runs (a GRO train
        // answered datagram by datagram), and a comparison is cheaper than a table lookup.
        let mut last: Option<(Dest, usize)> = None;
        for i in 0..self.queued.len() {
            let index = self.queued[i];
            let (dest, len, own) = {
                let m = &mut self.meta[index as usize];
                m.next = NO_SLOT;
                // A ready-made train or an ECN-marked reply travels alone.
                (m.dest, m.len, m.train_segment != 0 || m.ecn != 0)
            };
            let joinable = !own && len > 0 && len <= usize::from(u16::MAX) && self.trains_to(&dest);
            if joinable {
                let open = match last {
                    Some((d, t)) if d == dest => Some(t),
                    _ => self.open_trains.get(&dest).copied(),
                };
                if let Some(t) = open {
                    let train = &mut self.trains[t];
                    if len <= train.segment && train.bytes + len <= MAX_UDP4_PAYLOAD {
                        self.meta[train.tail as usize].next = index;
                        train.tail = index;
                        train.count += 1;
                        train.bytes += len;
                        if len < train.segment || usize::from(train.count) == MAX_GSO_SEGMENTS {
                            // A shorter segment ends a train, and so does the 64th.
                            self.open_trains.remove(&dest);
                            last = None;
                        } else {
                            last = Some((dest, t));
                        }
                        continue;
                    }
                }
            }
            let t = self.trains.len();
            self.trains.push(Train {
                head: index,
                tail: index,
                count: 1,
                segment: len,
                bytes: len,
            });
            if joinable {
                // A newer train replaces an older one that could not take this reply, so a
                // later reply never joins a train sent before one it follows.
                self.open_trains.insert(dest, t);
                last = Some((dest, t));
            }
        }
    }

    /// Fills the head's iovec list and control messages, marks the train `InFlight` (the
    /// head as the one slot its completion may name) and builds its `SENDMSG` entry.
    fn seal(&mut self, train: &Train) -> squeue::Entry {
        let head = train.head;
        let (fd, pktinfo_len, generation, ecn, train_segment, peer_is_v4) = {
            let m = &self.meta[head as usize];
            (
                m.dest.fd,
                m.pktinfo_len,
                m.generation,
                m.ecn,
                m.train_segment,
                m.dest.peer.is_ipv4(),
            )
        };
        let data = self.data.as_ptr();
        let capacity = self.slot_capacity;
        let stride = self.stride;
        let fixed_file = self.fixed_file;
        assert_ne!(self.meta[head as usize].state, SlotState::InFlight);
        assert!((head as usize) < self.count);
        // SAFETY: the head is `Queued` (asserted), so the kernel does not read its headers and
        // nothing else refers to them; `headers_ptr` bounds-checks the index. The reference
        // covers the head's headers only, while the loop below reads `self.meta`.
        let h = unsafe { &mut *self.headers_ptr(head as usize) };
        let mut index = head;
        let mut n = 0;
        while index != NO_SLOT {
            let m = &self.meta[index as usize];
            debug_assert_eq!(m.state, SlotState::Queued);
            // Pointer arithmetic only: the kernel dereferences it, within the slot's stretch.
            h.iov[n].iov_base = data.wrapping_add(index as usize * stride).cast();
            h.iov[n].iov_len = m.len;
            n += 1;
            index = m.next;
        }
        debug_assert_eq!(n, usize::from(train.count));
        h.msg.msg_iovlen = n as _;
        if n > 1 && train.bytes <= capacity {
            // Gathered into the head's own stretch, the train is one iovec: the kernel then
            // copies it with one `copy_from_user` instead of one per segment, each from
            // another slot's page (issue 17: 16 iovecs of 64 B cost the kernel's
            // `_copy_from_iter` about six times what one iovec of 1 KiB does). The members
            // stay in flight with the head until its completion (nothing resends a refused
            // train: its datagrams are counted as send errors), their own copies unread.
            let head_at = head as usize * stride;
            let mut at = h.iov[0].iov_len;
            for k in 1..n {
                let (src, len) = (h.iov[k].iov_base.cast::<u8>(), h.iov[k].iov_len);
                // SAFETY: `src` is member k's stretch and the destination the head's, at
                // `head_at + at .. head_at + at + len`, inside the head's stretch since
                // `at + len <= train.bytes <= capacity`; the member is another slot, so the
                // ranges do not overlap. Every slot of the train is `Queued`: no kernel read
                // and no reference covers their data.
                unsafe {
                    std::ptr::copy_nonoverlapping(src, data.add(head_at + at), len);
                }
                at += len;
            }
            debug_assert_eq!(at, train.bytes);
            h.iov[0].iov_len = at;
            h.msg.msg_iovlen = 1;
        }
        let mut control_len = pktinfo_len;
        // CONTROL_LEN holds packet-info, the ECN mark and UDP_SEGMENT together (tested in
        // datagram).
        if ecn != 0 {
            control_len =
                encode_ecn(&mut h.control, control_len, peer_is_v4, ecn).unwrap_or(control_len);
        }
        let segment = if n > 1 {
            train.segment as u16
        } else {
            train_segment
        };
        if segment != 0 {
            control_len =
                encode_udp_segment(&mut h.control, control_len, segment).unwrap_or(control_len);
        }
        h.msg.msg_controllen = control_len;
        h.msg.msg_control = if control_len == 0 {
            std::ptr::null_mut()
        } else {
            h.control.as_mut_ptr().cast()
        };
        // A lone datagram without control messages goes out as IORING_OP_SEND with a
        // destination address (the kernel's sendto path): the kernel then copies no msghdr,
        // no iovec array and no control buffer from us for it.
        let plain = n == 1 && control_len == 0;
        let (namelen, name) = (h.msg.msg_namelen, h.name.as_ptr());
        let (base, len) = (h.iov[0].iov_base.cast::<u8>(), h.iov[0].iov_len);
        let slot = fixed_file.and_then(|(fixed, slot)| (fixed == fd).then_some(slot));
        let entry = match (slot, plain) {
            (_, true) => send_to(fd, slot, base, len, name, namelen),
            (Some(slot), false) => opcode::SendMsg::new(types::Fixed(slot), &h.msg).build(),
            (None, false) => opcode::SendMsg::new(types::Fd(fd), &h.msg).build(),
        }
        .user_data(UserData::new(OpKind::Send, generation, head).encode());
        if train_segment == 0 {
            self.meta[head as usize].segments = train.count;
        }
        let mut index = head;
        while index != NO_SLOT {
            let m = &mut self.meta[index as usize];
            m.state = SlotState::InFlight;
            m.head = index == head;
            index = m.next;
        }
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::{SendError, SendOptions};
    use super::*;

    /// The trains `build_trains` made: each as the list of slot payload first bytes.
    fn trains(p: &mut SendPool) -> Vec<(Vec<u8>, usize)> {
        p.build_trains();
        let trains = p.trains.clone();
        trains
            .iter()
            .map(|t| {
                let mut firsts = Vec::new();
                let mut index = t.head;
                while index != NO_SLOT {
                    firsts.push(p.data_mut(index)[0]);
                    index = p.meta[index as usize].next;
                }
                assert_eq!(firsts.len(), usize::from(t.count));
                (firsts, t.segment)
            })
            .collect()
    }

    /// Issue 8, finding 1: a push that fails after a train was joined released the last
    /// joined slot twice and left the head in flight forever.
    #[test]
    fn a_push_failing_after_a_train_returns_every_slot_exactly_once() {
        for room in 0..4 {
            let mut p = pool(16, 64);
            // Train of three to peer A, then B, then a train of two to C, then D.
            for peer in ["A", "A", "A", "B", "C", "C", "D"] {
                let port = 5000 + peer.as_bytes()[0] as u16;
                queue_bytes(&mut p, &format!("127.0.0.1:{port}"), b"abcd").unwrap();
            }
            let mut sink = FailingSink {
                room,
                accepted: Vec::new(),
            };
            let err = p.flush(&mut sink).unwrap_err();
            // Entries: [A x3], [B], [C x2], [D]; `room` of them were pushed.
            let segments = [3u64, 1, 2, 1];
            assert_eq!(err.dropped, segments[room..].iter().sum::<u64>());
            assert_eq!(p.in_flight(), room);
            free_list_is_a_set(&p);
            for ud in sink.accepted.clone() {
                assert!(p.complete(ud).is_some());
            }
            assert_eq!(p.in_flight(), 0);
            assert_eq!(p.free_slots(), 16, "room {room}: every slot back, once");
            free_list_is_a_set(&p);
        }
    }

    #[test]
    fn replies_to_one_peer_anywhere_in_the_batch_form_one_train_in_order() {
        let mut p = pool(16, 64);
        // A and B interleaved; A's third is shorter (ends its train); A's fourth starts a new one.
        for (peer, byte, len) in [
            ("127.0.0.1:5", 1u8, 4),
            ("127.0.0.1:6", 2, 4),
            ("127.0.0.1:5", 3, 4),
            ("127.0.0.1:6", 4, 4),
            ("127.0.0.1:5", 5, 2),
            ("127.0.0.1:5", 7, 4),
            ("127.0.0.1:6", 6, 4),
        ] {
            queue_bytes(&mut p, peer, &vec![byte; len]).unwrap();
        }
        assert_eq!(
            trains(&mut p),
            vec![(vec![1, 3, 5], 4), (vec![2, 4, 6], 4), (vec![7], 4)]
        );
    }

    #[test]
    fn trains_keep_the_gso_rules() {
        // A longer reply does not join; empty replies never join.
        let mut p = pool(4, 64);
        queue_bytes(&mut p, "127.0.0.1:5", b"aa").unwrap();
        queue_bytes(&mut p, "127.0.0.1:5", b"bbb").unwrap();
        assert_eq!(trains(&mut p).len(), 2);
        let mut p = pool(4, 64);
        queue_bytes(&mut p, "127.0.0.1:5", b"").unwrap();
        queue_bytes(&mut p, "127.0.0.1:5", b"").unwrap();
        assert_eq!(trains(&mut p).len(), 2);
        // At most 64 segments.
        let mut p = pool(70, 16);
        for _ in 0..70 {
            queue_bytes(&mut p, "127.0.0.1:5", &[1u8; 10]).unwrap();
        }
        let t = trains(&mut p);
        assert_eq!((t[0].0.len(), t[1].0.len()), (64, 6));
        // At most 65,507 bytes: 1,400-byte segments, 46 fit (64,400), the 47th does not.
        let mut p = pool(50, 1400);
        for _ in 0..50 {
            queue_bytes(&mut p, "127.0.0.1:5", &[1u8; 1400]).unwrap();
        }
        let t = trains(&mut p);
        assert_eq!((t[0].0.len(), t[1].0.len()), (46, 4));
        // Different source address or socket: different trains.
        let mut p = pool(4, 64);
        let mut d = dest("127.0.0.1:5");
        p.queue_bytes(d, b"x").unwrap();
        d.fd = 4;
        p.queue_bytes(d, b"x").unwrap();
        assert_eq!(trains(&mut p).len(), 2);
    }

    #[test]
    fn a_ready_made_train_or_a_marked_reply_is_never_regrouped() {
        let mut p = pool(8, 64);
        let d = dest("127.0.0.1:5");
        queue_bytes(&mut p, "127.0.0.1:5", b"xxxx").unwrap();
        let train = SendOptions {
            segment_size: Some(4),
            ..SendOptions::default()
        };
        p.queue_with(d, train, |buf| {
            buf[..10].copy_from_slice(b"aaaabbbbcc");
            10
        })
        .unwrap();
        let marked = SendOptions {
            ecn: 2,
            ..SendOptions::default()
        };
        p.queue_with(d, marked, |buf| {
            buf[..4].copy_from_slice(b"mmmm");
            4
        })
        .unwrap();
        queue_bytes(&mut p, "127.0.0.1:5", b"yyyy").unwrap();
        assert_eq!(
            trains(&mut p),
            vec![(vec![b'x', b'y'], 4), (vec![b'a'], 10), (vec![b'm'], 4)]
        );
        let mut sink = FailingSink {
            room: 8,
            accepted: Vec::new(),
        };
        assert_eq!(p.flush(&mut sink).unwrap(), 3);
        let segments: Vec<u16> = sink
            .accepted
            .clone()
            .into_iter()
            .map(|ud| p.complete(ud).unwrap().segments)
            .collect();
        assert_eq!(segments, vec![2, 3, 1], "the ready-made train carries 3");
        // More than 64 segments is refused, and the slot comes back.
        let many = SendOptions {
            segment_size: Some(1),
            ..SendOptions::default()
        };
        assert_eq!(p.queue_with(d, many, |_| 65), Err(SendError::TooLong));
        assert_eq!(p.free_slots(), 8);
    }

    #[test]
    fn without_gso_a_ready_made_train_is_split_over_slots() {
        let mut p = pool(4, 64);
        p.disable_gso();
        let d = dest("127.0.0.1:5");
        let train = SendOptions {
            segment_size: Some(4),
            ecn: 1,
            ..SendOptions::default()
        };
        p.queue_with(d, train, |buf| {
            buf[..10].copy_from_slice(b"aaaabbbbcc");
            10
        })
        .unwrap();
        let mut out = Vec::new();
        p.take_queued(|_, bytes| out.push(bytes.to_vec()));
        assert_eq!(
            out,
            vec![b"aaaa".to_vec(), b"bbbb".to_vec(), b"cc".to_vec()]
        );
        // Not enough slots for every segment: refused whole.
        let long = |buf: &mut [u8]| {
            buf[..20].fill(1);
            20
        };
        assert_eq!(p.queue_with(d, train, long), Err(SendError::PoolExhausted));
        assert_eq!(p.free_slots(), 4);
    }

    /// A train that fits one slot is gathered into the head's buffer: one iovec, the bytes
    /// in order.
    #[test]
    fn a_train_that_fits_a_slot_is_gathered_into_one_iovec() {
        let mut p = pool(8, 64);
        for b in [&b"aaaa"[..], b"bbbb", b"cc"] {
            queue_bytes(&mut p, "127.0.0.1:5", b).unwrap();
        }
        let mut sink = FailingSink {
            room: 8,
            accepted: Vec::new(),
        };
        assert_eq!(p.flush(&mut sink).unwrap(), 1);
        let ud = sink.accepted[0];
        // SAFETY: reading the head's headers and data without a reference; the test plays
        // the kernel.
        let (iovlen, bytes) = unsafe {
            let h = p.headers_ptr(ud.slot as usize);
            let iov = (*h).iov[0];
            (
                (*h).msg.msg_iovlen,
                std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len).to_vec(),
            )
        };
        assert_eq!(iovlen, 1);
        assert_eq!(bytes, b"aaaabbbbcc");
        assert_eq!(p.free_slots(), 5, "members stay in flight with the head");
        assert_eq!(p.complete(ud).map(|done| done.segments), Some(3));
        assert_eq!(p.free_slots(), 8);
        free_list_is_a_set(&p);
    }

    /// A train larger than one slot goes out over its members' own buffers.
    #[test]
    fn a_train_larger_than_a_slot_is_one_entry_over_its_members_own_buffers() {
        let mut p = pool(8, 8);
        for b in [&b"aaaa"[..], b"bbbb", b"cc"] {
            queue_bytes(&mut p, "127.0.0.1:5", b).unwrap();
        }
        let mut sink = FailingSink {
            room: 8,
            accepted: Vec::new(),
        };
        assert_eq!(p.flush(&mut sink).unwrap(), 1);
        let ud = sink.accepted[0];
        let head = ud.slot as usize;
        // SAFETY: reading the head's headers without a reference; the test plays the kernel.
        let (iovlen, lens) = unsafe {
            let h = p.headers_ptr(head);
            let lens: Vec<usize> = (0..3).map(|i| (*h).iov[i].iov_len).collect();
            ((*h).msg.msg_iovlen, lens)
        };
        assert_eq!(iovlen, 3);
        assert_eq!(lens, vec![4, 4, 2]);
        assert_eq!(p.free_slots(), 5, "members stay in flight with the head");
        assert_eq!(p.complete(ud).map(|done| done.segments), Some(3));
        assert_eq!(p.free_slots(), 8);
        free_list_is_a_set(&p);
    }

    /// The grouping rules, written plainly: a reply joins its destination's newest open train
    /// when it is no longer than the train's first one (and fits); a shorter one or the 64th
    /// closes the train; one that cannot join starts a new train.
    fn reference(replies: &[(u16, usize)]) -> Vec<Vec<usize>> {
        let mut trains: Vec<(u16, usize, usize, bool, Vec<usize>)> = Vec::new();
        for (i, &(port, len)) in replies.iter().enumerate() {
            let open = trains.iter().rposition(|t| t.3 && t.0 == port);
            if let Some(t) = open {
                let train = &mut trains[t];
                if len <= train.1 && train.2 + len <= MAX_UDP4_PAYLOAD {
                    train.2 += len;
                    train.4.push(i);
                    if len < train.1 || train.4.len() == MAX_GSO_SEGMENTS {
                        train.3 = false;
                    }
                    continue;
                }
                train.3 = false;
            }
            trains.push((port, len, len, true, vec![i]));
        }
        trains.into_iter().map(|t| t.4).collect()
    }

    #[test]
    fn small_and_large_batches_group_by_the_same_rules() {
        // A deterministic mix of three peers and a few lengths, including shorter ones.
        let mut x = 7u32;
        for count in [5usize, 12, 16, 17, 40, 200] {
            let replies: Vec<(u16, usize)> = (0..count)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (
                        5000 + (x >> 16) as u16 % 3,
                        [8, 8, 8, 6, 10][(x >> 8) as usize % 5],
                    )
                })
                .collect();
            let mut p = pool(count, 16);
            for (i, &(port, len)) in replies.iter().enumerate() {
                let mut payload = vec![0u8; len];
                payload[0] = i as u8;
                queue_bytes(&mut p, &format!("127.0.0.1:{port}"), &payload).unwrap();
            }
            let got: Vec<Vec<usize>> = trains(&mut p)
                .into_iter()
                .map(|(firsts, _)| firsts.into_iter().map(usize::from).collect())
                .collect();
            let want: Vec<Vec<usize>> = reference(&replies)
                .into_iter()
                .map(|t| t.into_iter().map(|i| i % 256).collect())
                .collect();
            assert_eq!(got, want, "{count} replies");
        }
    }
}
