//! Pushing the turn's replies: GSO trains built from consecutive replies to one peer, one
//! `SENDMSG` per train, and the accounting when the ring refuses an entry.

use io_uring::{opcode, squeue, types};

use super::{FlushError, SendPool, SlotState, Submit};
use crate::datagram::{encode_udp_segment, MAX_GSO_SEGMENTS};
use crate::op::{OpKind, UserData};

impl SendPool {
    /// Pushes every queued reply to `sink`, joining consecutive replies to the same peer into
    /// GSO trains. Returns the number of `SENDMSG` entries pushed. When a push fails, that
    /// entry and every one after it are dropped: their slots go back to the free list (each
    /// exactly once) and `FlushError::dropped` counts their datagrams.
    pub fn flush(&mut self, sink: &mut impl Submit) -> Result<usize, FlushError> {
        let mut pushed = 0;
        let mut i = 0;
        while i < self.queued.len() {
            let head = self.queued[i];
            // The replies after the head that joined its train are already free again.
            let next = if self.gso {
                self.extend_train(head, i + 1)
            } else {
                i + 1
            };
            let entry = self.seal(head);
            let meta = &mut self.meta[head as usize];
            debug_assert_eq!(meta.state, SlotState::Queued);
            meta.state = SlotState::InFlight;
            self.in_flight += 1;
            // SAFETY: the entry points at slot `head`'s headers and data, inside allocations
            // that are freed only by `Drop` and only when no slot is in flight (else leaked);
            // the slot is `InFlight` from here until `complete` sees its completion, and no
            // method writes an `InFlight` slot (`headers_mut`/`data_mut` assert it).
            if let Err(error) = unsafe { sink.push(&entry) } {
                // Not pushed: the head and everything queued after its train are dropped.
                let meta = &mut self.meta[head as usize];
                meta.state = SlotState::Queued;
                self.in_flight -= 1;
                let mut dropped = u64::from(meta.segments);
                self.release(head);
                let rest = std::mem::take(&mut self.queued);
                for &index in &rest[next..] {
                    dropped += 1;
                    self.release(index);
                }
                self.queued = rest;
                self.queued.clear();
                return Err(FlushError { error, dropped });
            }
            pushed += 1;
            i = next;
        }
        self.queued.clear();
        Ok(pushed)
    }

    /// Writes the slot's control messages and builds its `SENDMSG` entry.
    fn seal(&mut self, index: u32) -> squeue::Entry {
        let meta = &self.meta[index as usize];
        let (fd, pktinfo_len, segments, segment_len, len) = (
            meta.dest.fd,
            meta.pktinfo_len,
            meta.segments,
            meta.segment_len,
            meta.len,
        );
        let user_data = UserData::new(OpKind::Send, meta.generation, index).encode();
        let h = self.headers_mut(index);
        let mut control_len = pktinfo_len;
        if segments > 1 {
            // CONTROL_LEN holds packet-info and UDP_SEGMENT together (tested in datagram).
            control_len =
                encode_udp_segment(&mut h.control, control_len, segment_len).unwrap_or(control_len);
        }
        h.iov.iov_len = len;
        h.msg.msg_controllen = control_len;
        h.msg.msg_control = if control_len == 0 {
            std::ptr::null_mut()
        } else {
            h.control.as_mut_ptr().cast()
        };
        opcode::SendMsg::new(types::Fd(fd), &h.msg)
            .build()
            .user_data(user_data)
    }

    /// Appends the replies queued after `head` (from `next` on) to `head`'s train while they
    /// go to the same peer from the same address and keep the train valid: every segment but
    /// the last has the first one's size, at most 64 segments and 65,507 bytes. Joined slots
    /// are released (their bytes now live in the head's buffer). Returns the index of the
    /// first reply not taken.
    fn extend_train(&mut self, head: u32, mut next: usize) -> usize {
        let cap = self.slot_capacity.min(crate::config::MAX_UDP4_PAYLOAD);
        let (dest, segment) = {
            let h = &self.meta[head as usize];
            (h.dest, h.len)
        };
        if segment == 0 || segment > usize::from(u16::MAX) {
            return next;
        }
        let mut total = segment;
        let mut count = 1usize;
        while next < self.queued.len() && count < MAX_GSO_SEGMENTS {
            let index = self.queued[next];
            let s = &self.meta[index as usize];
            let len = s.len;
            if s.dest != dest || len == 0 || len > segment || total + len > cap {
                break;
            }
            debug_assert_eq!(s.state, SlotState::Queued);
            // SAFETY: both slots are `Queued` (ours, not read by the kernel) and distinct, so
            // the two stretches of the data area do not overlap; `total + len <= cap <=
            // slot_capacity` keeps the write inside the head's stretch.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.data.as_ptr().add(index as usize * self.slot_capacity),
                    self.data
                        .as_ptr()
                        .add(head as usize * self.slot_capacity + total),
                    len,
                );
            }
            total += len;
            count += 1;
            next += 1;
            self.release(index);
            if len < segment {
                // A shorter segment ends a train.
                break;
            }
        }
        let h = &mut self.meta[head as usize];
        h.len = total;
        h.segments = count as u16;
        h.segment_len = segment as u16;
        next
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;

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
        let h = &p.meta[head as usize];
        assert_eq!(h.segments, 4);
        assert_eq!(h.segment_len, 4);
        assert_eq!(h.len, 14);
        assert_eq!(&p.data_mut(head)[..14], b"aaaabbbbccccdd");
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
