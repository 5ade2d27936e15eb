//! Trains written in place (issue 17): a plain reply to the destination of the reply queued
//! just before it is written straight after that reply, in the same slot, and joins it as a
//! UDP GSO train when the GSO rules allow (every segment the first one's size but the last,
//! which may be shorter and ends the train; at most 64 segments; the train within
//! `slot_capacity` and 65,507 bytes). A GRO train answered datagram by datagram so becomes
//! one slot holding one contiguous train: one copy per reply (the handler's), no slot per
//! reply, no gathering at flush.
//!
//! A slot's stretch of the data area is twice `slot_capacity` (`SendPool::stride`), and a
//! train stays within the first `slot_capacity` bytes, so the next reply always gets
//! `slot_capacity` bytes to write into, as it would in a slot of its own. A reply that then
//! cannot join (larger than the segment, the train full) moves to a slot of its own, which
//! is checked to be free before it is written: nothing written is lost for want of a slot.
//!
//! [`QueueMark`] and [`SendPool::cancel_since`] withdraw a reply that joined a train as
//! exactly as one in a slot of its own (the anti-amplification budget of issue 14 relies
//! on it).

use std::net::SocketAddr;

use super::{Dest, SendError, SendPool, SlotState};
use crate::config::MAX_UDP4_PAYLOAD;
use crate::datagram::MAX_GSO_SEGMENTS;

/// What was queued at a moment: a mark for [`SendPool::cancel_since`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueMark {
    slots: usize,
    /// The last slot as it was (a train may grow in it after the mark).
    last_len: usize,
    last_segments: u16,
    last_train_segment: u16,
    last_appendable: bool,
}

impl SendPool {
    /// A mark for [`SendPool::cancel_since`].
    pub fn queued_len(&self) -> QueueMark {
        let mut mark = QueueMark {
            slots: self.queued.len(),
            last_len: 0,
            last_segments: 1,
            last_train_segment: 0,
            last_appendable: false,
        };
        if let Some(&last) = self.queued.last() {
            let m = &self.meta[last as usize];
            mark.last_len = m.len;
            mark.last_segments = m.segments;
            mark.last_train_segment = m.train_segment;
            mark.last_appendable = m.appendable;
        }
        mark
    }

    /// Withdraws every reply queued after `mark` (from [`SendPool::queued_len`]): the slots
    /// taken since, freed (all the slots one request took, a train spread over several when
    /// GSO is off), and the datagrams that joined the last slot's train since, cut off.
    pub fn cancel_since(&mut self, mark: QueueMark) {
        while self.queued.len() > mark.slots {
            self.cancel_last();
        }
        if mark.slots > 0 && self.queued.len() == mark.slots {
            let index = self.queued[mark.slots - 1];
            let m = &mut self.meta[index as usize];
            m.len = mark.last_len;
            m.segments = mark.last_segments;
            m.train_segment = mark.last_train_segment;
            m.appendable = mark.last_appendable;
        }
    }

    /// Withdraws everything queued (tests).
    #[cfg(test)]
    pub(super) fn cancel_all(&mut self) {
        while !self.queued.is_empty() {
            self.cancel_last();
        }
    }

    /// The slot queued last, if a plain reply to `dest` may be written after it: its reply
    /// (or train) is plain and open and to `dest`, trains go to `dest`, and a slot is free
    /// for a reply that turns out not to fit the train.
    pub(super) fn appendable_last(&self, dest: &Dest) -> Option<u32> {
        #[cfg(test)]
        if self.no_append {
            return None;
        }
        let &last = self.queued.last()?;
        let m = &self.meta[last as usize];
        (m.appendable && m.dest == *dest && !self.free.is_empty() && self.trains_to(dest))
            .then_some(last)
    }

    /// Writes a reply after the train in slot `last` (from `appendable_last`) and joins it
    /// there, or moves it to a slot of its own.
    pub(super) fn append(
        &mut self,
        last: u32,
        dest: Dest,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<usize, SendError> {
        let (at, segment, segments) = {
            let m = &self.meta[last as usize];
            debug_assert_eq!(m.state, SlotState::Queued);
            let segment = if m.segments > 1 {
                usize::from(m.train_segment)
            } else {
                m.len
            };
            (m.len, segment, usize::from(m.segments))
        };
        // A train stays within `slot_capacity`, so `at + slot_capacity <= stride`.
        assert!(at <= self.slot_capacity && (last as usize) < self.count);
        let start = last as usize * self.stride + at;
        // SAFETY: the slot is Queued (not in flight: the kernel does not read it), `&mut self`
        // makes this the only reference into the data area, and the range
        // `start .. start + slot_capacity` lies within the slot's stride (asserted above),
        // past the bytes of the replies it holds.
        let region = unsafe {
            std::slice::from_raw_parts_mut(self.data.as_ptr().add(start), self.slot_capacity)
        };
        let len = fill(region);
        if len > self.slot_capacity {
            return Err(SendError::TooLong);
        }
        let joins = len > 0
            && len <= segment
            && segment <= usize::from(u16::MAX)
            && at + len <= self.slot_capacity.min(MAX_UDP4_PAYLOAD)
            && segments < MAX_GSO_SEGMENTS;
        if joins {
            let m = &mut self.meta[last as usize];
            m.len += len;
            m.segments += 1;
            m.train_segment = segment as u16;
            // A shorter segment ends a train, and so does the 64th.
            m.appendable = len == segment && usize::from(m.segments) < MAX_GSO_SEGMENTS;
            return Ok(len);
        }
        // It cannot join: to a slot of its own (`appendable_last` checked one is free).
        let index = *self.free.last().ok_or(SendError::PoolExhausted)?;
        let to = index as usize * self.stride;
        // SAFETY: both ranges lie inside the data area (`start + len <= last's stride end`,
        // `to + len <= index's`), in two different slots (the free one is not queued), so
        // they do not overlap; neither slot is in flight.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.data.as_ptr().add(start),
                self.data.as_ptr().add(to),
                len,
            )
        };
        self.meta[last as usize].appendable = false;
        // The bytes are in place: the fill only reports their length.
        self.queue_fresh(dest, |_| len, true)
    }

    /// Hands every queued reply to `f` instead of the kernel and frees its slot (for driving
    /// handlers without a socket: tests, benchmarks).
    pub(crate) fn take_queued(&mut self, mut f: impl FnMut(SocketAddr, &[u8])) {
        self.drain_queued(|dest, _, bytes| f(dest.peer, bytes));
    }

    /// Hands every queued datagram to `f` with its destination and ECN mark (a train as its
    /// segments), and frees the slots: for a path that sends by other means than the
    /// pool's messages (AF_XDP, which builds frames).
    pub(crate) fn drain_queued(&mut self, mut f: impl FnMut(&Dest, u8, &[u8])) {
        let queued = std::mem::take(&mut self.queued);
        for &index in &queued {
            let (dest, ecn, len, segment) = {
                let m = &self.meta[index as usize];
                let segment = if m.segments > 1 {
                    usize::from(m.train_segment)
                } else {
                    m.len
                };
                (m.dest, m.ecn, m.len, segment.max(1))
            };
            let start = index as usize * self.stride;
            assert!(len <= self.stride && (index as usize) < self.count);
            // SAFETY: the slot is Queued (not in flight), `&mut self` makes this the only
            // reference into the data area, and `start .. start + len` is within its stride.
            let bytes = unsafe { std::slice::from_raw_parts(self.data.as_ptr().add(start), len) };
            for datagram in bytes.chunks(segment) {
                f(&dest, ecn, datagram);
            }
            if len == 0 {
                f(&dest, ecn, &[]);
            }
            self.release(index);
        }
        self.queued = queued;
        self.queued.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::SendOptions;
    use super::*;
    use crate::stats::Stats;

    fn datagrams(p: &mut SendPool) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        p.take_queued(|peer, bytes| out.push((peer, bytes.to_vec())));
        out
    }

    fn payload(tag: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| tag.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn consecutive_replies_to_one_peer_become_one_train_in_one_slot() {
        let mut p = appending_pool(8, 2048);
        for i in 0..16u8 {
            let n = p
                .queue(dest("10.0.0.1:1"), |buf| {
                    // Every reply gets a whole slot's room, joined or not.
                    assert_eq!(buf.len(), 2048);
                    buf[..64].copy_from_slice(&payload(i, 64));
                    64
                })
                .unwrap();
            assert_eq!(n, 64);
        }
        assert_eq!(p.free_slots(), 7, "one slot for the sixteen");
        let head = p.queued[0] as usize;
        assert_eq!(
            (
                p.meta[head].len,
                p.meta[head].segments,
                p.meta[head].train_segment
            ),
            (1024, 16, 64)
        );
        let got = datagrams(&mut p);
        let want: Vec<_> = (0..16u8)
            .map(|i| ("10.0.0.1:1".parse().unwrap(), payload(i, 64)))
            .collect();
        assert_eq!(got, want);
        assert_eq!(p.free_slots(), 8);
    }

    #[test]
    fn a_train_in_place_keeps_the_gso_rules() {
        let a = "10.0.0.1:1";
        let mut p = appending_pool(16, 1000);
        // Larger than the segment: a slot of its own, bytes intact.
        queue_bytes(&mut p, a, &payload(1, 100)).unwrap();
        queue_bytes(&mut p, a, &payload(2, 100)).unwrap();
        queue_bytes(&mut p, a, &payload(3, 150)).unwrap();
        assert_eq!(p.queued.len(), 2);
        // A shorter one joins and ends its train.
        queue_bytes(&mut p, a, &payload(4, 150)).unwrap();
        queue_bytes(&mut p, a, &payload(5, 20)).unwrap();
        queue_bytes(&mut p, a, &payload(6, 150)).unwrap();
        assert_eq!(p.queued.len(), 3);
        // Another destination in between: a slot of its own, and the next to A too.
        queue_bytes(&mut p, "10.0.0.2:2", &payload(7, 150)).unwrap();
        queue_bytes(&mut p, a, &payload(8, 150)).unwrap();
        assert_eq!(p.queued.len(), 5);
        // The train stays within the slot: 150 + 150 + ... up to 900 of 1,000 bytes.
        for i in 0..5 {
            queue_bytes(&mut p, a, &payload(9 + i, 150)).unwrap();
        }
        let last = *p.queued.last().unwrap() as usize;
        assert_eq!(p.meta[last].len, 900);
        assert_eq!(p.queued.len(), 5);
        queue_bytes(&mut p, a, &payload(14, 150)).unwrap();
        assert_eq!(p.queued.len(), 6, "past the slot's 1,000 bytes: a new slot");
        let got: Vec<Vec<u8>> = datagrams(&mut p).into_iter().map(|(_, b)| b).collect();
        let mut want = vec![
            payload(1, 100),
            payload(2, 100),
            payload(3, 150),
            payload(4, 150),
            payload(5, 20),
            payload(6, 150),
            payload(7, 150),
            payload(8, 150),
        ];
        want.extend((0..6).map(|i| payload(9 + i, 150)));
        assert_eq!(got, want);
        // 64 segments at most.
        let mut p = appending_pool(4, 65_507);
        for i in 0..65u8 {
            queue_bytes(&mut p, a, &payload(i, 10)).unwrap();
        }
        let first = p.queued[0] as usize;
        assert_eq!(p.meta[first].segments, 64);
        assert_eq!(p.queued.len(), 2);
    }

    #[test]
    fn nothing_joins_where_trains_cannot_go_or_after_a_ready_made_train() {
        let a = "10.0.0.1:1";
        let mut p = appending_pool(8, 1000);
        p.disable_gso();
        queue_bytes(&mut p, a, b"one").unwrap();
        queue_bytes(&mut p, a, b"two").unwrap();
        assert_eq!(p.queued.len(), 2, "GSO off: a slot each");
        let mut p = appending_pool(8, 1000);
        let train = SendOptions {
            segment_size: Some(10),
            ..SendOptions::default()
        };
        p.queue_with(dest(a), train, |buf| {
            buf[..30].fill(1);
            30
        })
        .unwrap();
        queue_bytes(&mut p, a, &[2; 10]).unwrap();
        assert_eq!(p.queued.len(), 2, "a transport's train is never extended");
        // The last free slot is kept for a reply that turns out not to fit.
        let mut p = appending_pool(1, 1000);
        queue_bytes(&mut p, a, b"only").unwrap();
        assert_eq!(
            queue_bytes(&mut p, a, b"more"),
            Err(SendError::PoolExhausted)
        );
    }

    #[test]
    fn a_joined_reply_is_withdrawn_exactly() {
        let a = "10.0.0.1:1";
        let mut p = appending_pool(4, 1000);
        queue_bytes(&mut p, a, &payload(1, 50)).unwrap();
        queue_bytes(&mut p, a, &payload(2, 50)).unwrap();
        let mark = p.queued_len();
        queue_bytes(&mut p, a, &payload(3, 50)).unwrap();
        queue_bytes(&mut p, a, &payload(4, 60)).unwrap(); // a slot of its own
        p.cancel_since(mark);
        assert_eq!(p.free_slots(), 3);
        queue_bytes(&mut p, a, &payload(5, 50)).unwrap();
        let got: Vec<Vec<u8>> = datagrams(&mut p).into_iter().map(|(_, b)| b).collect();
        assert_eq!(got, vec![payload(1, 50), payload(2, 50), payload(5, 50)]);
    }

    /// The anti-amplification budget (issue 14) holds for replies that join a train: the one
    /// over the budget is withdrawn, the ones within it stay, charged one by one.
    #[test]
    fn the_amplification_budget_withdraws_a_joined_reply() {
        let mut p = appending_pool(8, 2000);
        let mut stats = Stats::default();
        let mut budget = 3000u64;
        {
            let mut reply = budgeted_reply(&mut p, &mut stats, &mut budget);
            for i in 0..2u8 {
                assert_eq!(reply.send(&payload(i, 1200)), Ok(()));
            }
            assert_eq!(
                reply.send(&payload(9, 1200)),
                Err(SendError::AmplificationLimit)
            );
            assert_eq!(reply.send(&payload(3, 600)), Ok(()));
        }
        assert_eq!((budget, stats.amplification_limited), (0, 1));
        let got: Vec<Vec<u8>> = datagrams(&mut p).into_iter().map(|(_, b)| b).collect();
        assert_eq!(
            got,
            vec![payload(0, 1200), payload(1, 1200), payload(3, 600)]
        );
    }
}
